"""Metrics: `Store.metrics()` is the command's `metrics --json` document,
`Store.metrics_text()` its Prometheus text, on the same journal."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import ckptstore

from conftest import CLI, chain_for, checkpoint_ids, cli
from test_typing import check


def test_metrics_and_its_text_equal_the_command(domains: Any, db: Path) -> None:
    dom = domains("metrics", disks=2)
    ids = checkpoint_ids(3)
    dom.add_bitmaps(ids)
    store = ckptstore.Store(db)
    assert store.metrics() == {"domains": []}
    store.sync(chain_for(dom, ids))
    store.sync(chain_for(dom, ids))
    report = store.validate(dom.name)
    assert report["ok"], report

    doc = store.metrics()
    cli_doc = cli(db, "metrics").doc
    assert doc == cli_doc
    assert json.dumps(doc) == json.dumps(cli_doc), "the same keys in the same order"
    check("Metrics", doc)
    (d,) = doc["domains"]
    check("DomainMetrics", d)
    check("OpenTransactions", d["open_transactions"])
    check("TxnCount", d["transactions"][0])
    check("LastValidate", d["last_validate"])
    check("FindingCount", d["last_validate"]["findings"][0])
    assert (d["domain"], d["checkpoints"]) == (dom.name, 3)
    sync = [t for t in d["transactions"] if t["kind"] == "sync"]
    assert sync == [
        {"kind": "sync", "outcome": "committed", "count": 2},
        {"kind": "sync", "outcome": "rolled_back", "count": 0},
    ]
    assert all(f["count"] == 0 for f in d["last_validate"]["findings"])

    text = store.metrics_text()
    assert isinstance(text, str)
    assert f'ckptstore_checkpoints{{domain="{dom.name}"}} 3\n' in text
    shown = subprocess.run([str(CLI), "--db", str(db), "metrics"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == text
