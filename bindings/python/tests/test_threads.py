"""4. Threads: the GIL is released while the library works, so a long sync
does not stall another Python thread; one Store shared by 8 threads on 8
domains commits them all; 2 threads on one domain give exactly one Busy."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import ckptstore

from conftest import chain_for, checkpoint_ids, expected


class Ticker:
    """A Python thread that counts 1 ms sleeps: it runs only while the GIL is free."""

    def __init__(self) -> None:
        self.ticks = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            time.sleep(0.001)
            self.ticks += 1

    def __enter__(self) -> "Ticker":
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()


def test_a_long_sync_does_not_stall_another_thread(domains: Any, db: Path) -> None:
    dom = domains("threads-ticks")
    ids = checkpoint_ids(40)
    chain = chain_for(dom, ids)
    store = ckptstore.Store(db)

    # The ticker's rate with nothing else running, over about as long.
    with Ticker() as idle:
        time.sleep(1.0)
    idle_rate = idle.ticks / 1.0

    ckptstore._native._gil_stats(reset=True)
    with Ticker() as busy:
        start = time.monotonic()
        report = store.sync(chain)
        took = time.monotonic() - start
    stats = ckptstore._native._gil_stats(reset=True)
    assert report["libvirt_calls"] == 40
    assert dom.checkpoints() == expected(chain)
    rate = busy.ticks / took
    print(
        f"sync of 40 checkpoints: {took * 1000:.0f} ms; ticker {busy.ticks} ticks "
        f"({rate:.0f}/s, idle {idle_rate:.0f}/s); GIL held by the module {stats['held_ns'] / 1e6:.3f} ms "
        f"in {stats['calls']} call, released {stats['released_ns'] / 1e6:.0f} ms"
    )
    # Holding the GIL for the whole sync would leave the ticker at 0 or 1.
    assert rate >= 0.25 * idle_rate, (busy.ticks, took, idle_rate)
    assert stats["calls"] == 1
    assert stats["held_ns"] < stats["released_ns"]


def test_a_progress_callback_takes_the_gil_only_for_itself(domains: Any, db: Path) -> None:
    dom = domains("threads-callback")
    chain = chain_for(dom, checkpoint_ids(20))
    store = ckptstore.Store(db)
    seen: List[int] = []
    ckptstore._native._gil_stats(reset=True)
    with Ticker() as t:
        start = time.monotonic()
        store.sync(chain, progress=lambda p: seen.append(p["done"]))
        took = time.monotonic() - start
    stats = ckptstore._native._gil_stats(reset=True)
    assert seen == list(range(21))
    assert stats["callbacks"] == 21
    print(
        f"sync of 20 checkpoints with a progress callback: {took * 1000:.0f} ms, ticker {t.ticks} ticks; "
        f"GIL held by the module {stats['held_ns'] / 1e6:.3f} ms (max one call "
        f"{stats['max_held_ns'] / 1e6:.3f} ms), in the callback {stats['callback_ns'] / 1e6:.3f} ms"
    )
    assert t.ticks > 0


def test_eight_threads_on_eight_domains_all_commit(domains: Any, db: Path) -> None:
    doms = [domains(f"threads-{i}") for i in range(8)]
    chains = [chain_for(d, checkpoint_ids(6)) for d in doms]
    store = ckptstore.Store(db)
    barrier = threading.Barrier(8)
    results: Dict[int, Any] = {}

    def agent(i: int) -> None:
        barrier.wait()
        try:
            results[i] = store.sync(chains[i])
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    took = time.monotonic() - start
    print(f"8 threads, 8 domains, 6 checkpoints each, one Store: {took * 1000:.0f} ms")
    for i, d in enumerate(doms):
        r = results[i]
        assert isinstance(r, dict), r
        assert (r["outcome"], r["libvirt_calls"]) == ("committed", 6)
        assert d.checkpoints() == expected(chains[i])
    status = store.status()
    assert status["incomplete"] == []
    assert sorted(s["domain"] for s in status["domains"]) == sorted(d.name for d in doms)


def test_two_threads_on_one_domain_give_exactly_one_busy(domains: Any, db: Path) -> None:
    dom = domains("threads-busy")
    store = ckptstore.Store(db)
    chains = [chain_for(dom, checkpoint_ids(4)), chain_for(dom, checkpoint_ids(4))]
    finished = [threading.Event(), threading.Event()]
    barrier = threading.Barrier(2)
    results: Dict[int, Any] = {}

    def agent(i: int) -> None:
        # The thread that gets the domain waits, inside its transaction,
        # until the other has had its answer.
        def hold(p: Any) -> None:
            finished[1 - i].wait(60)

        barrier.wait()
        try:
            results[i] = store.sync(chains[i], progress=hold)
        except ckptstore.Error as e:
            results[i] = e
        finally:
            finished[i].set()

    threads = [threading.Thread(target=agent, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    busy = [i for i in range(2) if isinstance(results[i], ckptstore.Busy)]
    done = [i for i in range(2) if isinstance(results[i], dict)]
    assert len(busy) == 1 and len(done) == 1, results
    assert results[busy[0]].exit_code == 3
    assert results[done[0]]["outcome"] == "committed"
    assert dom.checkpoints() == expected(chains[done[0]])


def test_the_gil_is_held_only_around_the_library(domains: Any, db: Path) -> None:
    dom = domains("threads-gil")
    ids = checkpoint_ids(10)
    dom.add_bitmaps(ids)
    chain = chain_for(dom, ids)
    store = ckptstore.Store(db)
    calls = [
        ("plan", lambda: store.plan(chain)),
        ("sync", lambda: store.sync(chain)),
        ("sync again", lambda: store.sync(chain)),
        ("status", lambda: store.status()),
        ("history", lambda: store.history(dom.name)),
        ("validate", lambda: store.validate(dom.name)),
        ("import_domain", lambda: store.import_domain(dom.name)),
        ("recover", lambda: store.recover()),
    ]
    lines = []
    for name, call in calls:
        ckptstore._native._gil_stats(reset=True)
        call()
        s = ckptstore._native._gil_stats(reset=True)
        assert s["calls"] == 1
        if name == "sync":
            # Ten redefines, the journal's commits: all without the GIL.
            assert s["held_ns"] * 100 < s["released_ns"], s
        lines.append(f"{name} {s['held_ns'] / 1000:.0f} us held / {s['released_ns'] / 1000:.0f} us released")
    print("GIL, 10 checkpoints: " + "; ".join(lines))
