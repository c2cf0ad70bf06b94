"""3. Error mapping: each failure raises its subclass of ckptstore.Error
with the command's exit code, kind and hint; where the README promises it,
libvirt's checkpoints and the journal's bytes are as they were."""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Type

import ckptstore
import pytest

from conftest import chain_for, checkpoint_ids, cli, expected, write_chain

CLASSES: Dict[int, Type[ckptstore.Error]] = {
    1: ckptstore.RolledBack,
    2: ckptstore.BadInput,
    3: ckptstore.Busy,
    4: ckptstore.Unreachable,
    5: ckptstore.JournalError,
}


# The journal is read, checkpointed and edited by another process: in this
# one, closing any descriptor of the file would drop the POSIX locks the
# module's SQLite holds on it (and Python's sqlite3 is another SQLite).
JOURNAL_TOOL = """
import hashlib, sqlite3, sys
from pathlib import Path
what, db = sys.argv[1], sys.argv[2]
if what == "hash":
    for suffix in ["", "-wal"]:
        p = Path(db + suffix)
        data = p.read_bytes() if p.exists() else b""
        print(hashlib.sha256(data).hexdigest() if data else "none")
else:
    c = sqlite3.connect(db)
    if what == "newer":
        version = c.execute("PRAGMA user_version").fetchone()[0]
        c.execute(f"PRAGMA user_version = {version + 1}")
        c.commit()
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
"""


def journal_tool(what: str, db: Path) -> List[str]:
    out = subprocess.run(
        [sys.executable, "-c", JOURNAL_TOOL, what, str(db)], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def journal_bytes(db: Path) -> List[str]:
    """Hashes of the journal's file and its write-ahead log (absent or empty: "none")."""
    return journal_tool("hash", db)


def quiesce(db: Path) -> None:
    """Every change in the journal's file, its write-ahead log emptied: its
    bytes are what failures must leave."""
    journal_tool("quiesce", db)


def raises(cls: Type[ckptstore.Error], call: Callable[[], Any]) -> ckptstore.Error:
    with pytest.raises(cls) as info:
        call()
    e = info.value
    assert isinstance(e, ckptstore.Error)
    assert type(e) is cls
    assert CLASSES[e.exit_code] is cls
    assert (e.exit_code, e.kind) == (cls.exit_code, cls.kind)
    assert e.doc == {"kind": e.kind, "exit_code": e.exit_code, "message": e.message, "hint": e.hint}
    assert str(e) == e.message
    assert e.message and e.hint and "\n" not in e.message
    return e


def same_error_as_command(e: ckptstore.Error, out: Any, message_too: bool = True) -> None:
    """The command failed the same way: exit code, kind, hint (and message)."""
    assert out.code == e.exit_code, out.stderr
    doc = out.doc["error"]
    assert (doc["kind"], doc["exit_code"], doc["hint"]) == (e.kind, e.exit_code, e.hint)
    if message_too:
        assert doc["message"] == e.message
    assert out.stderr.strip().splitlines()[-1].startswith("ckptstore: ")


@pytest.fixture
def committed(domains: Any, db: Path, tmp_path: Path) -> Any:
    """A domain with a committed chain of 3 checkpoints, and a store."""
    dom = domains("errors")
    ids = checkpoint_ids(3)
    dom.add_bitmaps(ids)
    chain = chain_for(dom, ids)
    store = ckptstore.Store(db)
    store.sync(chain)
    quiesce(db)
    return dom, chain, store


def unchanged(dom: Any, chain: Any, db: Path, before: Any) -> None:
    assert dom.checkpoints() == expected(chain)
    assert journal_bytes(db) == before


def test_bad_input_changes_nothing(committed: Any, db: Path, tmp_path: Path) -> None:
    dom, chain, store = committed
    before = journal_bytes(db)
    other = dict(chain, checkpoints=[dict(c) for c in chain["checkpoints"]])

    # Malformed JSON: serde's message with line and column, as the command's.
    e = raises(ckptstore.BadInput, lambda: store.sync('{"vm_id": '))
    assert "line 1 column 10" in e.message
    out = cli(db, "sync", "--chain", write_chain(tmp_path / "bad.json", '{"vm_id": '))
    same_error_as_command(e, out, message_too=False)
    assert out.doc["error"]["message"].endswith(e.message.split("not valid: ", 1)[1])

    # A cycle, a duplicate id, a dangling parent: the library's own message.
    cyc = json.loads(json.dumps(other))
    cyc["checkpoints"][0]["parent"] = cyc["checkpoints"][2]["id"]
    dup = json.loads(json.dumps(other))
    dup["checkpoints"].append(dict(dup["checkpoints"][1]))
    for bad, words in [(cyc, "cycle"), (dup, "more than once")]:
        e = raises(ckptstore.BadInput, lambda: store.sync(bad))
        assert words in e.message
        same_error_as_command(e, cli(db, "sync", "--chain", write_chain(tmp_path / "c.json", bad)))
        e = raises(ckptstore.BadInput, lambda: store.plan(bad))
        same_error_as_command(e, cli(db, "plan", "--chain", tmp_path / "c.json"))

    # A disk target the domain lacks (libvirt would not check it).
    target = json.loads(json.dumps(other))
    target["disks"] = {k: "vdz" for k in target["disks"]}
    e = raises(ckptstore.BadInput, lambda: store.sync(target))
    assert "vdz" in e.message
    same_error_as_command(e, cli(db, "sync", "--chain", write_chain(tmp_path / "t.json", target)))

    # Wrong types, an unknown key, things JSON cannot hold: serde's message.
    for bad in [
        42,
        [chain],
        dict(other, vm_id=7),
        dict(other, checkpoints="none"),
        dict(other, extra=1),
        dict(other, disks={1: "vda"}),
        dict(other, checkpoints=[dict(other["checkpoints"][0], created=object())]),
        dict(other, checkpoints=[dict(other["checkpoints"][0], created=float("nan"))]),
        b"\xff\xfe",
        "",
    ]:
        e = raises(ckptstore.BadInput, lambda: store.sync(bad))
        assert e.message.startswith("the chain is not valid: ")
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    e = raises(ckptstore.BadInput, lambda: store.sync({"checkpoints": deep}))
    assert "deeper than 128" in e.message

    # Arguments of the module itself.
    raises(ckptstore.BadInput, lambda: store.recover(policy="undo"))
    raises(ckptstore.BadInput, lambda: store.history(dom.name, limit=-1))
    unchanged(dom, chain, db, before)


def test_unknown_domain_and_daemon_down_are_unreachable(committed: Any, db: Path, tmp_path: Path) -> None:
    dom, chain, store = committed
    before = journal_bytes(db)
    gone = dict(chain, domain="ckpt-py-no-such-domain")
    e = raises(ckptstore.Unreachable, lambda: store.sync(gone))
    assert "ckpt-py-no-such-domain" in e.message
    # The command names the URI in its message; kind and hint as the library's.
    out = cli(db, "sync", "--chain", write_chain(tmp_path / "gone.json", gone))
    assert out.code == 4 and out.doc["error"]["kind"] == "unreachable"
    raises(ckptstore.Unreachable, lambda: store.validate("ckpt-py-no-such-domain"))
    raises(ckptstore.Unreachable, lambda: store.import_domain("ckpt-py-no-such-domain"))

    # The daemon down: no daemon answers at that socket.
    down = "qemu+unix:///system?socket=" + str(tmp_path / "no-daemon.sock")
    off = ckptstore.Store(db, connect=down)
    assert off.uri.startswith("qemu+unix:///system")
    e = raises(ckptstore.Unreachable, lambda: off.sync(chain))
    out = cli(db, "sync", "--chain", write_chain(tmp_path / "c.json", chain), uri=down)
    # The command prints libvirt's part only; the module the library's whole line.
    same_error_as_command(e, out, message_too=False)
    assert e.message.endswith(": " + out.doc["error"]["message"])
    e = raises(ckptstore.Unreachable, lambda: off.plan(chain))
    raises(ckptstore.Unreachable, lambda: off.resync(dom.name))
    # What needs no libvirt still works.
    assert off.status()["domains"][0]["domain"] == dom.name
    unchanged(dom, chain, db, before)


def test_busy_while_another_thread_holds_the_domain(committed: Any, db: Path, tmp_path: Path) -> None:
    dom, chain, store = committed
    longer = chain_for(dom, [c["id"] for c in chain["checkpoints"]] + checkpoint_ids(2))
    inside, release = threading.Event(), threading.Event()
    result: Dict[str, Any] = {}

    def hold(p: Any) -> None:
        inside.set()
        release.wait(60)

    def writer() -> None:
        result["report"] = store.sync(longer, progress=hold)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert inside.wait(60), "the writer reached its first libvirt call"
        e = raises(ckptstore.Busy, lambda: store.sync(chain))
        assert dom.name in e.message
        same_error_as_command(e, cli(db, "sync", "--chain", write_chain(tmp_path / "c.json", chain)))
        raises(ckptstore.Busy, lambda: store.resync(dom.name))
        raises(ckptstore.Busy, lambda: ckptstore.Store(db).import_domain(dom.name))
        # status shows the writer alive; recover leaves it alone.
        st = store.status()
        assert [(i["domain"], i["owner_alive"]) for i in st["incomplete"]] == [(dom.name, True)]
        assert store.recover()["recovered"] == []
    finally:
        release.set()
        t.join(120)
    assert result["report"]["outcome"] == "committed"
    assert dom.checkpoints() == expected(longer)


def test_a_refused_step_rolls_back_with_its_report(committed: Any, db: Path) -> None:
    dom, chain, store = committed
    before = dom.checkpoints()
    new = checkpoint_ids(3)
    longer = chain_for(dom, [c["id"] for c in chain["checkpoints"]] + new)

    # After the first new checkpoint is redefined, another client deletes
    # its metadata: libvirt refuses the next one ("parent ... not found").
    def meddle(p: Any) -> None:
        if p["phase"] == "apply" and p["done"] == 1:
            dom.delete_metadata(new[0])

    e = raises(ckptstore.RolledBack, lambda: store.sync(longer, progress=meddle))
    assert f"libvirt refused checkpoint {new[1]}" in e.message
    assert e.report is not None
    assert (e.report["outcome"], e.report["refused"]) == ("rolled_back", new[1])
    assert e.txn == e.report["txn"]
    assert dom.checkpoints() == before
    hist = store.history(dom.name, limit=1)["transactions"][0]
    assert (hist["txn"], hist["state"]) == (e.txn, "rolled_back")


def test_a_refused_step_matches_the_command_on_the_test_driver(db: Path, tmp_path: Path) -> None:
    # libvirt's test driver loads this node; an inactive domain there
    # refuses every checkpoint redefine (as in cli/tests/command/cli.rs).
    node = tmp_path / "node.xml"
    node.write_text(
        "<node>\n<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>"
        "<name>stopped-vm</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>"
        "<devices><disk type='file' device='disk'><source file='/nonexistent/vda.qcow2'/>"
        "<target dev='vda' bus='virtio'/></disk></devices><test:runstate>5</test:runstate></domain>\n</node>\n"
    )
    uri = f"test://{node}"
    disk = "22e5a7d6-5409-482d-bda4-f5939b27aad4"
    chain = {
        "vm_id": "93a5c045-6457-2c09-e56c-927cdf34e178",
        "domain": "stopped-vm",
        "disks": {disk: "vda"},
        "checkpoints": [
            {"id": "7b1e2a8c-0c1f-4a0e-9a52-2f6f3b7d9c10", "created": "2019-03-12T23:52:00Z", "disks": [disk]},
        ],
    }
    e = raises(ckptstore.RolledBack, lambda: ckptstore.Store(db, connect=uri).sync(chain))
    out = cli(tmp_path / "cli.db", "sync", "--chain", write_chain(tmp_path / "c.json", chain), uri=uri)
    same_error_as_command(e, out, message_too=False)
    doc = out.doc
    error = doc.pop("error")
    assert e.txn is not None and e.report is not None
    assert error["message"].replace(doc.pop("txn"), "T") == e.message.replace(e.txn, "T")
    report = dict(e.report)
    assert report.pop("txn") == e.txn
    assert report["outcome"] == "rolled_back"
    assert json.dumps(report) == json.dumps(doc)


@pytest.mark.parametrize("damage", ["random", "scribbled", "truncated", "first-page", "newer"])
def test_a_corrupt_or_newer_journal_is_left_byte_for_byte(
    damage: str, committed: Any, db: Path, tmp_path: Path
) -> None:
    dom, chain, store = committed
    # No connection of this process may stay open on the damaged file.
    del store
    committed = None
    gc.collect()
    # Damaged by plain writes, with no connection open anywhere.
    if damage == "random":
        db.write_bytes(bytes(range(256)) * 64)
    elif damage == "scribbled":
        data = db.read_bytes()
        rng = random.Random(7)
        db.write_bytes(data[:4096] + bytes(rng.randrange(256) for _ in data[4096:]))
    elif damage == "truncated":
        db.write_bytes(db.read_bytes()[:50])
    elif damage == "first-page":
        db.write_bytes(db.read_bytes()[:4096])
    else:
        journal_tool("newer", db)
    before = journal_bytes(db)
    # A damaged file may still open (its first page is whole); every
    # operation is refused.
    checks: list = [
        lambda: ckptstore.Store(db).sync(chain),
        lambda: ckptstore.Store(db).status(),
        lambda: ckptstore.Store(db).recover(),
    ]
    errors = []
    for check in checks:
        with pytest.raises(ckptstore.Error) as info:
            check()
        errors.append(info.value)
    for e in errors:
        assert type(e) is ckptstore.JournalError, e
        assert e.exit_code == 5
    if damage == "newer":
        assert "newer" in errors[0].message
    out = cli(db, "status")
    assert out.code == 5 and out.doc["error"]["kind"] == "journal"
    assert out.doc["error"]["hint"] == errors[1].hint
    assert journal_bytes(db) == before
    assert dom.checkpoints() == expected(chain)


def test_a_panic_is_an_exception_and_the_store_goes_on(db: Path) -> None:
    store = ckptstore.Store(db)
    e = raises(ckptstore.Unreachable, lambda: store._panic("deliberate"))
    assert "panic: deliberate" in e.message
    assert "recover" in e.hint
    assert store.status() == {"incomplete": [], "domains": []}


def test_exception_classes() -> None:
    assert issubclass(ckptstore.Error, Exception)
    for code, cls in CLASSES.items():
        assert issubclass(cls, ckptstore.Error)
        assert cls.exit_code == code
        assert cls.__module__ == "ckptstore"
    assert [ckptstore.RolledBack.kind, ckptstore.BadInput.kind, ckptstore.Busy.kind] == [
        "rolled_back",
        "bad_input",
        "busy",
    ]
    assert (ckptstore.Unreachable.kind, ckptstore.JournalError.kind) == ("unreachable", "journal")
