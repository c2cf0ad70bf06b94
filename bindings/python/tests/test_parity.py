"""2. Parity: each method returns the document `ckptstore --json` prints for
the same input, key for key and in the same order (one wire format)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import ckptstore
import pytest

from conftest import chain_for, checkpoint_ids, cli, expected, write_chain

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def same(py_doc: Any, cli_doc: Any) -> None:
    """Equal, and equal as JSON text: the same keys in the same order."""
    assert py_doc == cli_doc
    assert json.dumps(py_doc) == json.dumps(cli_doc)


def without_txn(doc: Any, *txns: str) -> Any:
    """The document with the given transaction ids (new at every run) masked."""
    text = json.dumps(doc)
    for t in txns:
        text = text.replace(t, "TXN")
    return json.loads(text)


def test_plan_sync_status_validate_history_equal_the_command(domains: Any, db: Path, tmp_path: Path) -> None:
    dom = domains("parity", disks=2)
    ids = checkpoint_ids(4)
    dom.add_bitmaps(ids)
    chain = chain_for(dom, ids, description="parity")
    file = write_chain(tmp_path / "chain.json", chain)
    store = ckptstore.Store(db)

    # plan, before anything: 4 redefines.
    planned = store.plan(chain)
    same(planned, cli(db, "plan", "--chain", file).doc)
    assert [s["op"] for s in planned["steps"]] == ["redefine"] * 4
    # The chain as JSON text gives the same plan.
    same(store.plan(json.dumps(chain)), planned)
    same(store.plan(json.dumps(chain).encode()), planned)

    first = store.sync(chain)
    assert first["outcome"] == "committed"
    assert first["libvirt_calls"] == 4
    assert dom.checkpoints() == expected(chain)

    # Again through the command: unchanged, not a single call; and through
    # Python: the same document but for the transaction's id.
    again_cli = cli(db, "sync", "--chain", file)
    assert again_cli.code == 0, again_cli.stderr
    again = store.sync(chain)
    assert (again["outcome"], again["libvirt_calls"]) == ("unchanged", 0)
    same(without_txn(again, again["txn"]), without_txn(again_cli.doc, again_cli.doc["txn"]))

    same(store.plan(chain), cli(db, "plan", "--chain", file).doc)
    same(store.status(), cli(db, "status").doc)
    same(store.status(dom.name), cli(db, "status", "--domain", dom.name).doc)
    same(store.history(dom.name, limit=20), cli(db, "history", "--domain", dom.name).doc)
    same(store.history(dom.name, limit=1), cli(db, "history", "--domain", dom.name, "--limit", "1").doc)
    assert len(store.history(dom.name)["transactions"]) == 3

    report = store.validate(dom.name)
    assert report["ok"], report
    same(report, cli(db, "validate", "--domain", dom.name).doc)

    same(store.recover(), cli(db, "recover").doc)
    same(store.recover(dom.name, policy="rollback"), cli(db, "recover", "--domain", dom.name, "--rollback").doc)

    # import: the same document but for the transaction.
    imported = store.import_domain(dom.name)
    imported_cli = cli(db, "import", "--domain", dom.name)
    assert imported_cli.code == 0, imported_cli.stderr
    same(without_txn(imported, imported["txn"]), without_txn(imported_cli.doc, imported_cli.doc["txn"]))
    assert sorted(imported["unchanged"]) == sorted(ids)

    # resync of a domain that lost its metadata: both redefine everything.
    for cid in reversed(ids):
        dom.delete_metadata(cid)
    resynced = store.resync(dom.name)
    assert (resynced["outcome"], resynced["libvirt_calls"]) == ("committed", 4)
    for cid in reversed(ids):
        dom.delete_metadata(cid)
    resynced_cli = cli(db, "sync", "--domain", dom.name)
    assert resynced_cli.code == 0, resynced_cli.stderr
    same(without_txn(resynced, resynced["txn"]), without_txn(resynced_cli.doc, resynced_cli.doc["txn"]))
    assert dom.checkpoints() == expected(chain)


def test_validate_with_findings_is_the_command_document_without_its_error(
    domains: Any, db: Path, tmp_path: Path
) -> None:
    dom = domains("parity-findings")
    ids = checkpoint_ids(3)
    dom.add_bitmaps(ids[:2])  # the leaf's bitmap is missing from the image
    chain = chain_for(dom, ids)
    store = ckptstore.Store(db)
    store.sync(chain)

    report = store.validate(dom.name)
    assert not report["ok"]
    assert [f["kind"] for f in report["findings"]] == ["missing_bitmap"]
    assert report["usable"] == ids[1]
    out = cli(db, "validate", "--domain", dom.name)
    # The command exits 1 and adds its `error`; the report is the same.
    assert out.code == 1
    doc = out.doc
    error = doc.pop("error")
    assert error["exit_code"] == 1 and error["kind"] == "findings"
    same(report, doc)


def test_a_second_python_sync_makes_no_libvirt_call(domains: Any, db: Path) -> None:
    dom = domains("parity-again")
    ids = checkpoint_ids(3)
    chain = chain_for(dom, ids)
    store = ckptstore.Store(db)
    assert store.sync(chain)["libvirt_calls"] == 3
    again = store.sync(chain)
    assert (again["outcome"], again["libvirt_calls"], again["redefined"]) == ("unchanged", 0, [])
    assert again["unchanged"] == ids
    # Another Store on the same journal (another agent) agrees.
    other = ckptstore.Store(db)
    assert other.sync(chain)["libvirt_calls"] == 0


def test_progress_reports_every_call_of_a_round(domains: Any, db: Path) -> None:
    dom = domains("parity-progress")
    ids = checkpoint_ids(5)
    chain = chain_for(dom, ids)
    seen: list = []
    report = ckptstore.Store(db).sync(chain, progress=seen.append)
    assert report["libvirt_calls"] == 5
    assert [(p["done"], p["total"]) for p in seen] == [(i, 5) for i in range(6)]
    for p in seen:
        assert list(p) == ["txn", "domain", "phase", "done", "total"]
        assert (p["txn"], p["domain"], p["phase"]) == (report["txn"], dom.name, "apply")
    # No call, no progress.
    seen.clear()
    ckptstore.Store(db).sync(chain, progress=seen.append)
    assert seen == []


def test_export_and_plan_resync_equal_the_command(domains: Any, db: Path, tmp_path: Path) -> None:
    dom = domains("parity-export", disks=2)
    ids = [f"virtnbdbackup.{i}" for i in range(3)]
    dom.add_bitmaps(ids)
    chain = chain_for(dom, ids, description="export")
    store = ckptstore.Store(db)
    store.sync(chain)

    exported = store.export(dom.name)
    same(exported, cli(db, "export", "--domain", dom.name).doc)
    assert [c["id"] for c in exported["checkpoints"]] == ids
    # The export is a chain sync takes without a call.
    again = store.sync(exported)
    assert (again["outcome"], again["libvirt_calls"]) == ("unchanged", 0)

    dom.delete_metadata(ids[-1])
    preview = store.plan_resync(dom.name)
    same(preview, cli(db, "plan", "--domain", dom.name).doc)
    assert [s["op"] for s in preview["steps"]] == ["redefine"]
    assert len(dom.checkpoints()) == 2


def test_the_bitmap_policy_is_the_commands(domains: Any, db: Path, tmp_path: Path) -> None:
    """`Store(bitmaps=...)` is the command's `--bitmaps`: with a bitmap gone,
    strict raises RolledBack (exit 1) before any call, degrade leaves the
    disk out, both documents equal the command's."""
    dom = domains("parity-bitmaps", disks=2)
    ids = checkpoint_ids(2)
    dom.add_bitmaps(ids[:1])  # the second checkpoint's bitmaps are missing
    chain = chain_for(dom, ids)
    file = write_chain(tmp_path / "chain.json", chain)

    with pytest.raises(ckptstore.RolledBack) as e:
        ckptstore.Store(db, bitmaps="strict").sync(chain)
    assert e.value.exit_code == 1
    strict_cli = cli(db, "sync", "--chain", file, "--bitmaps", "strict")
    assert strict_cli.code == 1
    assert "strict refuses the sync" in str(e.value)
    assert "strict refuses the sync" in strict_cli.doc["error"]["message"]
    assert dom.checkpoints() == {}

    preview = ckptstore.Store(db, bitmaps="degrade").plan(chain)
    same(preview, cli(db, "plan", "--chain", file, "--bitmaps", "degrade").doc)
    assert {(d["checkpoint"], d["disk"]) for d in preview["degraded"]} == {(ids[1], t) for t in dom.targets}
    synced = ckptstore.Store(db, bitmaps="degrade").sync(chain)
    assert synced["redefined"] == [ids[0]]
    assert list(dom.checkpoints()) == [ids[0]]

    with pytest.raises(ckptstore.BadInput):
        ckptstore.Store(db, bitmaps="sometimes")


def test_reclaim_equals_the_command_and_apply_removes_the_orphan(domains: Any, db: Path) -> None:
    dom = domains("parity-reclaim")
    ids = checkpoint_ids(2)
    dom.add_bitmaps(ids + ["stray"])
    store = ckptstore.Store(db)
    store.sync(chain_for(dom, ids))

    dry = store.reclaim(dom.name)
    same(dry, cli(db, "reclaim", "--domain", dom.name).doc)
    assert (dry["applied"], dry["txn"]) == (False, None)
    assert [(b["target"], b["bitmap"]) for b in dry["orphans"]] == [("vda", "stray")]
    assert dry["inconsistent"] == [] and dry["checkpoints"] == []

    done = store.reclaim(dom.name, apply=True)
    assert done["applied"] and UUID.fullmatch(done["txn"])
    assert store.validate(dom.name)["ok"]
    assert store.reclaim(dom.name)["orphans"] == []
