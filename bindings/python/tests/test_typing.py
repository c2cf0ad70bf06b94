"""Typing: the stub (`_native.pyi`, with `py.typed`) matches what the module
returns and accepts, and mypy checks an agent's calls against it."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Tuple

import ckptstore
import ckptstore._native

from conftest import chain_for, checkpoint_ids

STUB = Path(ckptstore._native.__file__).with_name("_native.pyi")


def typed_dicts() -> Dict[str, List[Tuple[str, bool]]]:
    """Each TypedDict of the stub: its fields in order, and whether each is required."""
    out = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(b, ast.Name) and b.id == "TypedDict" for b in node.bases
        ):
            fields = []
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    ann = ast.unparse(item.annotation)
                    fields.append((item.target.id, not ann.startswith("NotRequired")))
            out[node.name] = fields
    return out


def check(name: str, doc: Dict[str, Any], ordered: bool = True) -> None:
    """`doc` has every required field of the stub's `name`, no other, and
    (a document of the module) in the stub's order."""
    fields = typed_dicts()[name]
    names = [f for f, _ in fields]
    required = [f for f, req in fields if req]
    assert set(required) <= set(doc), (name, required, list(doc))
    assert set(doc) <= set(names), (name, names, list(doc))
    if ordered:
        assert [k for k in names if k in doc] == list(doc), (name, names, list(doc))


def test_the_stub_describes_every_document(domains: Any, db: Path) -> None:
    dom = domains("typing")
    ids = checkpoint_ids(2)
    dom.add_bitmaps(ids)
    chain = chain_for(dom, ids, description="typed")
    store = ckptstore.Store(db)
    seen: List[Any] = []
    # The input's keys come in any order.
    check("Chain", chain, ordered=False)
    check("ChainCheckpoint", chain["checkpoints"][0], ordered=False)
    plan = store.plan(chain)
    check("PlanReport", plan)
    check("PlanStep", plan["steps"][0])
    sync = store.sync(chain, progress=seen.append)
    check("SyncReport", sync)
    check("Progress", seen[0])
    status = store.status()
    check("Status", status)
    check("DomainStatus", status["domains"][0])
    history = store.history(dom.name)
    check("History", history)
    check("HistoryEntry", history["transactions"][0])
    report = store.validate(dom.name)
    check("Report", report)
    check("ReclaimReport", store.reclaim(dom.name))
    check("RecoverReport", store.recover())

    # An open transaction: status's Incomplete, its owner, recover's Recovered.
    more = chain_for(dom, ids + checkpoint_ids(1))

    def stop(p: Any) -> None:
        raise KeyboardInterrupt

    try:
        store.sync(more, progress=stop)
    except KeyboardInterrupt:
        pass
    incomplete = store.status()["incomplete"][0]
    check("Incomplete", incomplete)
    check("Owner", incomplete["owner"])
    recovered = store.recover()
    check("Recovered", recovered["recovered"][0])

    # A finding, an error document.
    dom.delete_metadata(more["checkpoints"][-1]["id"])
    findings = store.validate(dom.name)["findings"]
    check("Finding", findings[0])
    try:
        store.sync({"vm_id": "x"})
    except ckptstore.BadInput as e:
        check("ErrorDoc", e.doc)


def test_the_stub_names_every_method_and_parameter() -> None:
    tree = ast.parse(STUB.read_text())
    [store] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Store"]
    stubbed = {}
    for f in store.body:
        if isinstance(f, ast.FunctionDef) and not any(
            isinstance(d, ast.Name) and d.id == "property" for d in f.decorator_list
        ):
            args = f.args.args[1:]
            defaults = [None] * (len(args) - len(f.args.defaults)) + [ast.unparse(d) for d in f.args.defaults]
            stubbed[f.name] = [(a.arg, d) for a, d in zip(args, defaults)]
    runtime = {}
    for name, member in inspect.getmembers(ckptstore.Store):
        if name.startswith("_") and name != "__init__":
            continue
        if name == "__init__":
            sig = inspect.signature(ckptstore.Store)
        elif callable(member):
            sig = inspect.signature(member)
        else:
            continue
        params = [p for p in sig.parameters.values() if p.name != "self"]
        runtime[name] = [
            (p.name, None if p.default is inspect.Parameter.empty else repr(p.default)) for p in params
        ]
    assert runtime.pop("__init__") == stubbed.pop("__init__")
    assert runtime == stubbed


AGENT = """
    from typing import Any, Dict
    import ckptstore

    def start(path: str, chain: Dict[str, Any]) -> int:
        store = ckptstore.Store(path, connect="qemu:///system")
        for failure in store.recover()["failed"]:
            print(failure["domain"], failure["error"]["hint"])
        try:
            report = store.sync(chain, progress=lambda p: print(p["done"], p["total"]))
        except ckptstore.Busy as e:
            return e.exit_code
        except ckptstore.Error as e:
            print(e.hint, e.txn)
            return e.exit_code
        if report["outcome"] == "rolled_back":
            return 1
        checked = store.validate(report["domain"])
        print(checked["usable"], [f["kind"] for f in checked["findings"]])
        store.recover("vm", policy="rollback")
        return report["libvirt_calls"]
"""

BAD_AGENT = """
    import ckptstore

    store = ckptstore.Store("/tmp/j.db")
    store.recover(policy="undo")
    report = store.sync({"vm_id": "x"})
    print(report["libvirt_call"])
    store.history()
    try:
        store.status()
    except ckptstore.Error as e:
        print(e.exit_cod)
"""


def mypy(tmp_path: Path, name: str, source: str) -> subprocess.CompletedProcess:
    file = tmp_path / name
    file.write_text(textwrap.dedent(source))
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(file)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )


def test_mypy_checks_an_agents_calls(tmp_path: Path) -> None:
    good = mypy(tmp_path, "agent.py", AGENT)
    assert good.returncode == 0, good.stdout
    bad = mypy(tmp_path, "bad_agent.py", BAD_AGENT)
    assert bad.returncode == 1, bad.stdout
    lines = {int(line.split(":")[1]) for line in bad.stdout.splitlines() if ": error:" in line}
    # policy="undo", the misspelt key, the missing domain, the misspelt attribute.
    assert lines == {5, 7, 8, 12}, bad.stdout
