"""6. Packaging: the extension links the system's libvirt.so.0 (no wheel
carries libvirt), one libvirt is loaded in a process that also uses
libvirt-python, and `import ckptstore` works in the machine's Python 3.11
interpreters."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import ckptstore
import ckptstore._native

EXTENSION = Path(ckptstore._native.__file__).resolve()
PACKAGE = EXTENSION.parent
SITE = PACKAGE.parent


def ldd(path: Path) -> Dict[str, str]:
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    libs = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>":
            libs[parts[0]] = parts[2]
    return libs


def test_the_extension_links_the_system_libvirt() -> None:
    assert EXTENSION.name == "_native.abi3.so", EXTENSION
    libs = ldd(EXTENSION)
    print(f"{EXTENSION}: libvirt.so.0 => {libs.get('libvirt.so.0')}")
    assert "libvirt.so.0" in libs, libs
    system = Path(libs["libvirt.so.0"]).resolve()
    assert not str(system).startswith(str(SITE)), system
    assert system.parts[1] in ("lib", "usr"), system
    # An extension module does not link libpython (the interpreter has it).
    assert not [n for n in libs if n.startswith("libpython")], libs


def test_the_wheel_carries_no_libvirt() -> None:
    installed: List[str] = []
    for dist in SITE.glob("ckptstore-*.dist-info"):
        installed += [line.split(",")[0] for line in (dist / "RECORD").read_text().splitlines()]
    assert installed, "ckptstore is installed from a wheel"
    assert any(f.endswith("_native.abi3.so") for f in installed)
    assert not [f for f in installed if "libvirt" in f or ".libs/" in f], installed
    assert not (SITE / "ckptstore.libs").exists()
    assert sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__") == [
        "__init__.py",
        "_native.abi3.so",
        "_native.pyi",
        "py.typed",
    ]


def test_one_libvirt_beside_libvirt_python() -> None:
    # The agent's libvirt-python and the extension share the one library.
    code = (
        "import libvirt, ckptstore\n"
        "maps = open('/proc/self/maps').read().splitlines()\n"
        "libs = sorted({l.split()[-1] for l in maps if 'libvirt.so' in l})\n"
        "print('\\n'.join(libs))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    libs = out.stdout.split()
    assert len(libs) == 1, libs
    assert Path(libs[0]).resolve() == Path(ldd(EXTENSION)["libvirt.so.0"]).resolve()


def interpreters() -> List[str]:
    """This venv's Python, the first python3 on PATH and Debian's, each once."""
    found: Dict[str, str] = {}
    for p in [sys.executable, shutil.which("python3"), "/usr/bin/python3"]:
        if p and os.path.exists(p):
            found.setdefault(os.path.realpath(p), p)
    return list(found.values())


def test_import_in_the_machines_python(tmp_path: Path) -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "import ckptstore\n"
        "s = ckptstore.Store(sys.argv[2])\n"
        "assert s.status() == {'incomplete': [], 'domains': []}\n"
        "print(sys.version_info[:2], ckptstore.__version__, ckptstore.__file__)\n"
    )
    versions = []
    for i, python in enumerate(interpreters()):
        out = subprocess.run(
            [python, "-c", code, str(SITE), str(tmp_path / f"j{i}.db")],
            capture_output=True,
            text=True,
            # Only the module under test, not the venv's other packages.
            env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
        )
        assert out.returncode == 0, (python, out.stderr)
        print(f"{python}: {out.stdout.strip()}")
        versions.append(out.stdout.split(")")[0])
    assert any(v.startswith("(3, 11") for v in versions), versions
