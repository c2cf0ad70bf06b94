"""1. Kill through the binding: a Python agent SIGKILLs itself in the middle
of a sync — from its progress callback at call k (after the intent
commit), or from a timer thread at a seeded moment (also before the intent
commit). A second Python process, or the command, recovers on the same
journal; libvirt ends at the target or at the before-image, never in
between, read through libvirt-python.

CKPTSTORE_PY_KILL_SEED replays the timer delays and the recoverers.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any, Dict, List

import ckptstore

from conftest import SYSTEM_URI, chain_for, checkpoint_ids, cli, expected, python_child, write_chain

# Calls of a switch between the two chains: 5 deletes, then 5 redefines;
# progress comes before the first call and after each (11 callbacks).
N = 5
STEP_KILLS = [0, 1, 4, 5, 9, 10]
MAX_TIMER_ROUNDS = 24


def test_an_agent_killed_mid_sync_is_recovered_by_python_or_the_command(
    domains: Any, db: Path, tmp_path: Path
) -> None:
    seed = int(os.environ.get("CKPTSTORE_PY_KILL_SEED", random.randrange(1 << 32)))
    print(f"CKPTSTORE_PY_KILL_SEED={seed}")
    rng = random.Random(seed)

    dom = domains("kill", disks=2)
    xs, ys = checkpoint_ids(N), checkpoint_ids(N)
    dom.add_bitmaps(xs + ys)
    chains = [chain_for(dom, xs, description="x"), chain_for(dom, ys, description="y")]
    files = [write_chain(tmp_path / f"chain{i}.json", c) for i, c in enumerate(chains)]
    store = ckptstore.Store(db)

    # Calibration: one whole switch, and how long until its first libvirt call.
    assert store.sync(chains[0])["libvirt_calls"] == N
    firsts: List[float] = []
    start = time.monotonic()
    report = store.sync(chains[1], progress=lambda p: firsts.append(time.monotonic() - start))
    whole = time.monotonic() - start
    assert report["libvirt_calls"] == 2 * N
    to_first = firsts[0]
    print(f"a whole switch: {whole * 1000:.0f} ms, its first libvirt call after {to_first * 1000:.0f} ms")
    current = 1

    counts: Dict[str, int] = {"before_intent": 0, "open": 0, "finished": 0}
    recoverers: Dict[str, int] = {"python": 0, "cli": 0}
    rounds = 0

    def one_round(mode: str, arg: float) -> str:
        nonlocal current, rounds
        rounds += 1
        target = 1 - current
        before = dom.checkpoints()
        assert before == expected(chains[current])
        agent = python_child("kill_agent.py", db, SYSTEM_URI, files[target], mode, arg)
        lines = [json.loads(line) for line in agent.stdout.splitlines()]
        if agent.returncode == 0:
            assert "report" in lines[-1], agent.stdout
        else:
            assert agent.returncode == -9, agent.stderr

        incomplete = store.status(dom.name)["incomplete"]
        recoverer = rng.choice(["python", "cli"])
        policy = rng.choice(["resume", "rollback"])
        if incomplete:
            kind = "open"
            [txn] = incomplete
            assert not txn["owner_alive"]
        elif agent.returncode == 0:
            kind = "finished"
        else:
            kind = "before_intent"
            # No intent, no libvirt call: libvirt is as it was.
            assert dom.checkpoints() == before
        counts[kind] += 1

        recoverers[recoverer] += 1
        if recoverer == "python":
            out = python_child("recover_agent.py", db, SYSTEM_URI, dom.name, policy)
            assert out.returncode == 0, out.stderr
            doc = json.loads(out.stdout)
        else:
            args = ["recover", "--domain", dom.name] + (["--rollback"] if policy == "rollback" else [])
            res = cli(db, *args)
            assert res.code == 0, res.stderr
            doc = res.doc
        assert doc["failed"] == [] and doc["left_open"] == []
        after = dom.checkpoints()
        if kind == "open":
            assert [r["outcome"] for r in doc["recovered"]] == [
                "committed" if policy == "resume" else "rolled_back"
            ]
            want = target if policy == "resume" else current
        else:
            assert doc["recovered"] == []
            want = target if kind == "finished" else current
        # The target or the before-image, never anything in between.
        assert after == expected(chains[want]), (mode, arg, kind, policy, after)
        assert store.status(dom.name)["incomplete"] == []
        if want == target and kind == "open":
            # The next sync of that chain has nothing left to do.
            again = ckptstore.Store(db).sync(chains[target])
            assert (again["outcome"], again["libvirt_calls"]) == ("unchanged", 0)
        print(
            f"round {rounds}: {mode} {arg}: {kind}, progress seen {len(lines)}, "
            f"{recoverer} recover --{policy}: {'target' if want == target else 'before-image'}"
        )
        current = want
        return kind

    # Killed from the progress callback: always after the intent commit.
    for k in STEP_KILLS:
        assert one_round("step", k) == "open"

    # Killed from a timer thread: early (about when the intent is written)
    # until two land before the intent, then anywhere in the switch.
    timer_rounds = 0
    while counts["before_intent"] < 2 and timer_rounds < MAX_TIMER_ROUNDS:
        timer_rounds += 1
        one_round("timer", round(rng.uniform(0, to_first * 1000), 1))
    for _ in range(4):
        timer_rounds += 1
        one_round("timer", round(rng.uniform(to_first * 1000, whole * 1000), 1))

    print(f"{rounds} kill rounds: {counts}; recovered by {recoverers}")
    assert counts["before_intent"] >= 2, f"{counts['before_intent']} timer kills of {timer_rounds} landed before the intent"
    assert counts["open"] >= len(STEP_KILLS)
    assert recoverers["python"] >= 1 and recoverers["cli"] >= 1

    # Whatever the last round left, the command finishes a killed agent's
    # sync to the whole chain, and the next sync makes no call.
    target = 1 - current
    agent = python_child("kill_agent.py", db, SYSTEM_URI, files[target], "step", 3)
    assert agent.returncode == -9
    res = cli(db, "recover")
    assert res.code == 0, res.stderr
    assert [r["outcome"] for r in res.doc["recovered"]] == ["committed"]
    assert dom.checkpoints() == expected(chains[target])
    again = store.sync(chains[target])
    assert (again["outcome"], again["libvirt_calls"]) == ("unchanged", 0)
    # Both chains' bitmaps are in the images: the other chain's are orphans.
    checked = store.validate(dom.name)
    other = xs if target == 1 else ys
    assert {(f["kind"], f["checkpoint"]) for f in checked["findings"]} == {("orphan_bitmap", c) for c in other}
    assert checked["usable"] == checked["leaf"] == chains[target]["checkpoints"][-1]["id"]


def test_an_exception_in_the_callback_leaves_the_transaction_for_recover(domains: Any, db: Path) -> None:
    dom = domains("kill-raise")
    ids = checkpoint_ids(4)
    chain = chain_for(dom, ids)
    store = ckptstore.Store(db)

    class AgentCrash(Exception):
        pass

    def crash(p: Any) -> None:
        if p["done"] == 2:
            raise AgentCrash("stop here")

    try:
        store.sync(chain, progress=crash)
        raise AssertionError("the callback's exception must come out")
    except AgentCrash as e:
        assert str(e) == "stop here"
    # Stopped as if the agent had died: two calls made, the rest left.
    [open_txn] = store.status(dom.name)["incomplete"]
    assert (open_txn["done"], open_txn["total"]) == (2, 4)
    assert len(dom.checkpoints()) == 2
    # This process's own transaction: recover finishes it at once.
    report = store.recover()
    assert [(r["outcome"], r["libvirt_calls"]) for r in report["recovered"]] == [("committed", 2)]
    assert dom.checkpoints() == expected(chain)
    again = store.sync(chain)
    assert (again["outcome"], again["libvirt_calls"]) == ("unchanged", 0)
