"""Shared helpers of the pytest suite: throw-away libvirt domains with real
qcow2 images and bitmaps on the daemon of qemu:///system (the private one
`make test` starts), chains for them, libvirt's checkpoints read through
libvirt-python, and the command run with --json.

A test that needs the daemon fails when it does not answer: it never skips.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import libvirt
import pytest

REPO = Path(__file__).resolve().parents[3]
TESTS = Path(__file__).resolve().parent
SYSTEM_URI = "qemu:///system"
# The command, built by `cargo test --workspace` (run-tests.sh) or `cargo build`.
CLI = Path(os.environ.get("CKPTSTORE_BIN", REPO / "target" / "debug" / "ckptstore"))

# Most of the suite drives the metadata loop over images without bitmaps;
# the module and the command alike read $CKPTSTORE_BITMAPS, so both skip
# the bitmap check here (tests of the policy pass it explicitly).
os.environ.setdefault("CKPTSTORE_BITMAPS", "ignore")

_counter = itertools.count()


def _quiet(_ctx: Any, _err: Any) -> None:
    """libvirt-python prints every error on stderr unless told otherwise."""


libvirt.registerErrorHandler(_quiet, None)


def unique_name(tag: str) -> str:
    """A domain name no other test, here or in another process, uses."""
    return f"ckpt-py-{os.getpid()}-{next(_counter)}-{tag}"


def run(*cmd: Any, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if check and out.returncode != 0:
        raise AssertionError(f"{cmd} failed ({out.returncode}): {out.stderr}")
    return out


def system() -> libvirt.virConnect:
    try:
        return libvirt.open(SYSTEM_URI)
    except libvirt.libvirtError as e:
        raise AssertionError(
            "libvirtd is not running for qemu:///system: run `bash tests/support/libvirt.sh start` "
            f"(as root) ({e})"
        )


def targets(n: int) -> List[str]:
    return [f"vd{chr(ord('a') + i)}" for i in range(n)]


def domain_xml(name: str, images: List[Path]) -> str:
    """A minimal TCG domain, one qcow2 virtio disk per image, with ACPI
    (libvirt 9.0 passes -no-acpi without it, which QEMU 10 refuses)."""
    disks = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
        f"<source file='{p}'/><target dev='{t}' bus='virtio'/></disk>"
        for p, t in zip(images, targets(len(images)))
    )
    return (
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
        "<os><type arch='x86_64' machine='pc'>hvm</type></os><features><acpi/></features>"
        f"<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{disks}"
        "<memballoon model='none'/></devices></domain>"
    )


@dataclass
class Domain:
    """A defined, shut-off test domain with its images and disk ids."""

    conn: libvirt.virConnect
    name: str
    uuid: str
    dir: Path
    images: List[Path]
    disk_ids: List[str]

    @property
    def targets(self) -> List[str]:
        return targets(len(self.images))

    def add_bitmaps(self, names: List[str]) -> None:
        """Persistent bitmaps in every image (the domain must be shut off)."""
        for image in self.images:
            for n in names:
                run("qemu-img", "bitmap", "--add", image, n)

    def dom(self) -> libvirt.virDomain:
        try:
            return self.conn.lookupByName(self.name)
        except libvirt.libvirtError:
            if _alive(self.conn):
                raise
        # The daemon was restarted: a new connection.
        self.conn = system()
        return self.conn.lookupByName(self.name)

    def checkpoints(self) -> Dict[str, Tuple[Optional[str], int]]:
        """libvirt's checkpoints: name -> (parent, creation time)."""
        return checkpoints_of(self.dom())

    def delete_metadata(self, name: str) -> None:
        self.dom().checkpointLookupByName(name).delete(
            libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
        )

    def remove(self) -> None:
        try:
            conn = libvirt.open(SYSTEM_URI)
            dom = conn.lookupByName(self.name)
            if dom.isActive():
                dom.destroy()
            dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        except libvirt.libvirtError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


def _alive(conn: libvirt.virConnect) -> bool:
    try:
        return bool(conn.isAlive())
    except libvirt.libvirtError:
        return False


def checkpoints_of(dom: libvirt.virDomain) -> Dict[str, Tuple[Optional[str], int]]:
    out = {}
    for cp in dom.listAllCheckpoints():
        root = ET.fromstring(cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN))
        parent = root.find("parent/name")
        out[cp.getName()] = (
            parent.text if parent is not None else None,
            int(root.findtext("creationTime") or 0),
        )
    return out


def define_domain(conn: libvirt.virConnect, tag: str, disks: int = 1) -> Domain:
    name = unique_name(tag)
    d = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    images = [d / f"{t}.qcow2" for t in targets(disks)]
    for image in images:
        run("qemu-img", "create", "-q", "-f", "qcow2", image, "64M")
    dom = conn.defineXML(domain_xml(name, images))
    return Domain(
        conn=conn,
        name=name,
        uuid=dom.UUIDString(),
        dir=d,
        images=images,
        disk_ids=[str(uuid.uuid4()) for _ in images],
    )


@pytest.fixture
def conn() -> Iterator[libvirt.virConnect]:
    c = system()
    yield c
    try:
        c.close()
    except libvirt.libvirtError:
        pass


@pytest.fixture
def domains(conn: libvirt.virConnect) -> Iterator[Any]:
    """A factory of test domains, all removed at the end of the test."""
    made: List[Domain] = []

    def make(tag: str, disks: int = 1) -> Domain:
        d = define_domain(conn, tag, disks)
        made.append(d)
        return d

    yield make
    for d in made:
        d.remove()


def checkpoint_ids(n: int, seed: Optional[int] = None) -> List[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def chain_for(
    dom: Domain, ids: List[str], description: Optional[str] = None, start: int = 1_700_000_000
) -> Dict[str, Any]:
    """A linear chain of `ids` (parent first) over every disk of `dom`."""
    cps = []
    for i, cid in enumerate(ids):
        cp: Dict[str, Any] = {
            "id": cid,
            "parent": ids[i - 1] if i else None,
            "created": _rfc3339(start + 3600 * i),
            "disks": list(dom.disk_ids),
        }
        if description is not None:
            cp["description"] = f"{description} {i}"
        cps.append(cp)
    return {
        "vm_id": dom.uuid,
        "domain": dom.name,
        "disks": dict(zip(dom.disk_ids, dom.targets)),
        "checkpoints": cps,
    }


def _rfc3339(ts: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def expected(chain: Dict[str, Any]) -> Dict[str, Tuple[Optional[str], int]]:
    """What libvirt holds once `chain` is synced: name -> (parent, creation time)."""
    import datetime

    out = {}
    for cp in chain["checkpoints"]:
        t = datetime.datetime.strptime(cp["created"], "%Y-%m-%dT%H:%M:%SZ").replace(
            tzinfo=datetime.timezone.utc
        )
        out[cp["id"]] = (cp.get("parent"), int(t.timestamp()))
    return out


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def doc(self) -> Any:
        return json.loads(self.stdout)


def cli(db: Path, *args: Any, uri: str = SYSTEM_URI, stdin: Optional[str] = None) -> CliResult:
    """`ckptstore --db DB --connect URI --json ARGS...`."""
    assert CLI.exists(), f"the command is not built: {CLI} (run `cargo build -p ckptstore-cli`)"
    out = subprocess.run(
        [str(CLI), "--db", str(db), "--connect", uri, "--json", *[str(a) for a in args]],
        capture_output=True,
        text=True,
        input=stdin,
    )
    return CliResult(out.returncode, out.stdout, out.stderr)


def write_chain(path: Path, chain: Any) -> Path:
    path.write_text(chain if isinstance(chain, str) else json.dumps(chain, indent=2))
    return path


def python_child(script: str, *args: Any, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a helper script of tests/agents/ in a new Python process."""
    return subprocess.run(
        [sys.executable, str(TESTS / "agents" / script), *[str(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"
