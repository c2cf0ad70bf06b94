"""5. Same-process recovery: libvirtd is SIGKILLed (by the pid of
tests/support/libvirt.sh, never by name) in the middle of a sync's loop;
the sync waits for it, gives up with Unreachable and leaves its
transaction open; the daemon is started again and the same long-lived
process, with the same Store, recovers that transaction.

It kills the daemon of qemu:///system: run it only against a daemon of
your own (`make test` starts one; see TESTING.md for a private one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import ckptstore
import pytest

from conftest import REPO, chain_for, checkpoint_ids, expected

SCRIPT = REPO / "tests" / "support" / "libvirt.sh"


def daemon_pid() -> Optional[int]:
    out = subprocess.run(["bash", str(SCRIPT), "pid"], capture_output=True, text=True)
    return int(out.stdout) if out.returncode == 0 and out.stdout.strip() else None


def start_daemon() -> None:
    out = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.fixture
def daemon() -> Iterator[int]:
    pid = daemon_pid()
    assert pid, "no libvirtd started by tests/support/libvirt.sh runs: run it with `start` first"
    try:
        yield pid
    finally:
        # Whatever happened, the daemon runs again for the tests after this one.
        if daemon_pid() is None:
            start_daemon()


def test_a_sync_cut_by_a_daemon_kill_is_recovered_by_the_same_process(
    daemon: int, domains: Any, db: Path
) -> None:
    dom = domains("daemon-kill")
    ids = checkpoint_ids(8)
    dom.add_bitmaps(ids)
    chain = chain_for(dom, ids)
    store = ckptstore.Store(db)
    killed_at = []

    def kill_daemon(p: Any) -> None:
        if p["done"] == 3 and not killed_at:
            os.kill(daemon, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while not gone(daemon) and time.monotonic() < deadline:
                time.sleep(0.05)
            killed_at.append(p["done"])

    start = time.monotonic()
    with pytest.raises(ckptstore.Unreachable) as info:
        store.sync(chain, progress=kill_daemon)
    waited = time.monotonic() - start
    e = info.value
    assert killed_at == [3]
    assert e.exit_code == 4 and e.txn is not None
    assert "left open for recover" in e.message, e.message
    print(f"sync gave up {waited:.1f} s after it started: {e.message}")

    # Still down: recover fails, the transaction stays open, nothing hidden.
    down = store.recover()
    assert [f["txn"] for f in down["failed"]] == [e.txn]
    assert down["failed"][0]["error"]["exit_code"] == 4
    assert [t["txn"] for t in down["left_open"]] == [e.txn]

    start_daemon()
    assert daemon_pid() not in (None, daemon)
    [open_txn] = store.status(dom.name)["incomplete"]
    assert open_txn["txn"] == e.txn
    assert open_txn["owner"]["pid"] == os.getpid()

    # The same process, the same Store: the transaction is finished.
    report = store.recover()
    assert [(r["txn"], r["outcome"]) for r in report["recovered"]] == [(e.txn, "committed")]
    assert report["failed"] == [] and report["left_open"] == []
    assert 1 <= report["recovered"][0]["libvirt_calls"] <= 5
    assert dom.checkpoints() == expected(chain)
    again = store.sync(chain)
    assert (again["outcome"], again["libvirt_calls"]) == ("unchanged", 0)
    assert store.validate(dom.name)["ok"]
