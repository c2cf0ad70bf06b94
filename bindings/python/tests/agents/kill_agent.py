"""An agent that dies in the middle of a sync, as a crashed agent would.

    kill_agent.py DB URI CHAIN_FILE step K    # SIGKILL from the progress callback at its K-th call
    kill_agent.py DB URI CHAIN_FILE timer MS  # SIGKILL from another thread after MS milliseconds

Each progress document is printed as one JSON line before anything else
happens; a sync that ends prints {"report": ...}.
"""

import json
import os
import signal
import sys
import threading
from pathlib import Path

import ckptstore


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    db, uri, chain_file, mode, arg = sys.argv[1:6]
    chain = json.loads(Path(chain_file).read_text())
    store = ckptstore.Store(db, connect=uri)
    calls = 0

    def progress(p: dict) -> None:
        nonlocal calls
        print(json.dumps(p), flush=True)
        if mode == "step" and calls == int(arg):
            die()
        calls += 1

    if mode == "timer":
        # The timer thread runs while the sync has the GIL released.
        timer = threading.Timer(float(arg) / 1000, die)
        timer.daemon = True
        timer.start()
    report = store.sync(chain, progress=progress)
    print(json.dumps({"report": report}), flush=True)


main()
