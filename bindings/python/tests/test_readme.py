"""The README's agent start-up (section "Python") runs as written, against
a test domain and a journal of the test's own."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from conftest import REPO, chain_for, checkpoint_ids, expected


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    [code] = re.findall(r"```python\n(.*?)```", section, re.S)
    return code


def test_the_readme_start_up_runs(domains: Any, db: Path, capsys: Any) -> None:
    code = readme_example()
    assert '"/var/lib/ckptstore/journal.db"' in code
    code = code.replace('"/var/lib/ckptstore/journal.db"', repr(str(db)))
    dom = domains("readme")
    chain = chain_for(dom, checkpoint_ids(3))
    for run in range(2):
        exec(compile(code, "README.md", "exec"), {"chain": chain, "__name__": "agent"})
        out = capsys.readouterr()
        assert out.out == ["committed 3\n", "unchanged 0\n"][run], out
        assert out.err.count("libvirt calls") == [4, 0][run], out.err
    assert dom.checkpoints() == expected(chain)
