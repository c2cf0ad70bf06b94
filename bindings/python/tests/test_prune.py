"""`Store.prune`: the dry run and the apply on a shut-off domain's real
images, the document's shape, and bad input raised before any change."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, List

import pytest

import ckptstore

from conftest import chain_for, checkpoint_ids
from test_typing import check


def image_bitmaps(image: str) -> List[str]:
    out = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", image], check=True, capture_output=True, text=True
    ).stdout
    data = json.loads(out)["format-specific"]["data"]
    return sorted(b["name"] for b in data.get("bitmaps", []))


def test_prune_keep_two(domains: Any, db: Path) -> None:
    dom = domains("py-prune", disks=2)
    ids = checkpoint_ids(5)
    dom.add_bitmaps(ids)
    store = ckptstore.Store(db)
    store.sync(chain_for(dom, ids))

    dry = store.prune(dom.name, keep=2)
    check("PruneReport", dry)
    assert dry["applied"] is False and dry["txn"] is None
    assert dry["pruned"] == ids[:3] and dry["kept"] == ids[3:]
    check("RemovedBitmap", dry["bitmaps_removed"][0])
    assert all(image_bitmaps(i) == sorted(ids) for i in dom.images)

    done = store.prune(dom.name, keep=2, apply=True)
    assert done["applied"] is True and done["txn"]
    assert done["libvirt_calls"] == 3
    assert all(image_bitmaps(i) == sorted(ids[3:]) for i in dom.images)
    assert store.history(dom.name)["transactions"][0]["kind"] == "prune"


def test_prune_bad_input_changes_nothing(domains: Any, db: Path) -> None:
    dom = domains("py-prune-bad")
    store = ckptstore.Store(db)
    for kwargs in [{}, {"keep": 2, "older_than": "7d"}, {"older_than": "7x"}, {"keep": 0}]:
        with pytest.raises(ckptstore.BadInput) as e:
            store.prune(dom.name, **kwargs)
        assert e.value.doc["exit_code"] == 2
    assert store.status()["domains"] == []
