"""`Store.ensure`: the command's `ensure` document as a dict, on a shut-off
domain with real qcow2 bitmaps; bad input raises BadInput."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import ckptstore

from conftest import chain_for, checkpoint_ids, cli, run, write_chain
from test_typing import check


def test_ensure_equals_the_command_and_a_second_makes_no_call(domains: Any, db: Path, tmp_path: Path) -> None:
    dom = domains("ensure", disks=2)
    ids = checkpoint_ids(3)
    dom.add_bitmaps(ids)
    chain = chain_for(dom, ids)
    store = ckptstore.Store(db, bitmaps="degrade")
    store.sync(chain)
    # libvirt forgets every checkpoint; the second disk loses the base's bitmap.
    for name in reversed(ids):
        dom.delete_metadata(name)
    run("qemu-img", "bitmap", "--remove", dom.images[1], ids[2])

    doc = store.ensure(dom.name, ids[2])
    check("EnsureReport", doc)
    for disk in doc["disks"]:
        check("EnsureDisk", disk)
    assert [(d["target"], d["mode"]) for d in doc["disks"]] == [
        (dom.targets[0], "incremental"),
        (dom.targets[1], "full"),
    ]
    assert "not in the top image" in doc["disks"][1]["reason"]
    assert (doc["redefined"], doc["libvirt_calls"]) == (True, 1)
    assert dom.checkpoints() == {ids[2]: (None, dom.checkpoints()[ids[2]][1])}

    # The command's document, but for its own transaction id.
    again = cli(db, "ensure", "--domain", dom.name, "--checkpoint", ids[2], "--bitmaps", "degrade").doc
    ours = store.ensure(dom.name, ids[2], chain=chain)
    assert (again["libvirt_calls"], ours["libvirt_calls"]) == (0, 0)
    assert not ours["redefined"]
    assert {**again, "txn": ""} == {**ours, "txn": ""}

    with pytest.raises(ckptstore.BadInput) as e:
        store.ensure(dom.name, "no-such-checkpoint")
    assert e.value.exit_code == 2
    assert "is not in domain" in str(e.value)
    assert cli(db, "ensure", "--domain", dom.name, "--checkpoint", "no-such-checkpoint").code == 2
    file = write_chain(tmp_path / "chain.json", chain)
    assert cli(db, "ensure", "--domain", dom.name, "--checkpoint", ids[0], "--chain", file, "--bitmaps", "degrade").code == 0
