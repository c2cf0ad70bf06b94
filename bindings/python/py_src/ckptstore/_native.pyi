# Types of ckptstore's extension module. Each TypedDict is one of the
# library's documents (src/engine/report.rs, src/validate.rs, src/error.rs),
# fields in the order the command prints them; tests/test_typing.py holds
# this file to the documents the module returns, and runs mypy on an agent.

import os
import pathlib
import sys
from typing import Any, Callable, List, Literal, Mapping, Optional, Union

if sys.version_info >= (3, 11):
    from typing import NotRequired, TypedDict
else:
    from typing_extensions import NotRequired, TypedDict

__version__: str

ErrorKindName = Literal["rolled_back", "bad_input", "busy", "unreachable", "journal", "findings"]
OutcomeName = Literal["committed", "unchanged", "rolled_back"]
TxnKindName = Literal["sync", "resync", "import", "ensure", "reclaim", "prune"]
TxnStateName = Literal["applying", "rolling_back", "committed", "rolled_back"]
PhaseName = Literal["apply", "rollback"]

# The input: the chain the management system keeps (the command's chain file).

class ChainCheckpoint(TypedDict):
    id: str
    parent: NotRequired[Optional[str]]
    created: str
    description: NotRequired[str]
    disks: List[str]

class Chain(TypedDict):
    vm_id: str
    domain: NotRequired[str]
    scope: NotRequired[str]
    disks: Mapping[str, str]
    checkpoints: List[ChainCheckpoint]

# The documents.

class ErrorDoc(TypedDict):
    kind: ErrorKindName
    exit_code: int
    message: str
    hint: str

class Progress(TypedDict):
    txn: str
    domain: str
    phase: PhaseName
    done: int
    total: int

class Recovered(TypedDict):
    txn: str
    domain: str
    outcome: OutcomeName
    libvirt_calls: int
    warnings: NotRequired[List[str]]

class Degraded(TypedDict):
    checkpoint: str
    disk: str
    reason: str

class Unverified(TypedDict):
    disk: str
    reason: str

class SyncReport(TypedDict):
    txn: str
    domain: str
    outcome: OutcomeName
    redefined: List[str]
    deleted: List[str]
    unchanged: List[str]
    libvirt_calls: int
    warnings: List[str]
    recovered: List[Recovered]
    refused: NotRequired[str]
    degraded: NotRequired[List[Degraded]]
    unverified: NotRequired[List[Unverified]]
    adopted: NotRequired[List[str]]
    foreign: NotRequired[List[str]]

class EnsureDisk(TypedDict):
    disk: str
    target: str
    mode: Literal["incremental", "full"]
    reason: NotRequired[str]

class EnsureReport(TypedDict):
    txn: str
    domain: str
    checkpoint: str
    disks: List[EnsureDisk]
    redefined: bool
    libvirt_calls: int
    warnings: NotRequired[List[str]]

class PlanStep(TypedDict):
    op: Literal["delete", "redefine"]
    checkpoint: str
    parent: Optional[str]
    replaces: NotRequired[bool]
    forced: NotRequired[bool]

class PlanReport(TypedDict):
    domain: str
    steps: List[PlanStep]
    unchanged: List[str]
    warnings: List[str]
    degraded: NotRequired[List[Degraded]]
    unverified: NotRequired[List[Unverified]]
    adopted: NotRequired[List[str]]
    foreign: NotRequired[List[str]]

class Owner(TypedDict):
    pid: int
    boot_id: str
    start: int

class Incomplete(TypedDict):
    txn: str
    domain: str
    kind: TxnKindName
    state: TxnStateName
    owner: Owner
    owner_alive: bool
    done: int
    total: int
    checkpoints: int
    started_at: str

class RecoverFailure(TypedDict):
    txn: str
    domain: str
    error: ErrorDoc

class RecoverReport(TypedDict):
    recovered: List[Recovered]
    failed: List[RecoverFailure]
    left_open: List[Incomplete]

class DomainStatus(TypedDict):
    domain: str
    checkpoints: int
    root: Optional[str]
    leaf: Optional[str]
    txn: str
    committed_at: str

class Status(TypedDict):
    incomplete: List[Incomplete]
    domains: List[DomainStatus]

class HistoryEntry(TypedDict):
    txn: str
    kind: TxnKindName
    state: TxnStateName
    started_at: str
    finished_at: Optional[str]
    checkpoints: int
    done: int
    total: int
    libvirt_calls: int
    error: Optional[str]

class History(TypedDict):
    domain: str
    transactions: List[HistoryEntry]

FindingKindName = Literal[
    "missing_in_libvirt",
    "unexpected_in_libvirt",
    "mismatch",
    "missing_bitmap",
    "inconsistent_bitmap",
    "disabled_bitmap",
    "broken_chain",
    "orphan_bitmap",
    "unreadable_image",
    "libvirt_leftover",
]

class Finding(TypedDict):
    kind: FindingKindName
    checkpoint: Optional[str]
    disk: Optional[str]
    image: Optional[str]
    detail: str

class BitmapRef(TypedDict):
    target: str
    image: str
    bitmap: str

class InconsistentBitmap(TypedDict):
    target: str
    image: str
    bitmap: str
    reason: Literal["in_use", "inconsistent_extension"]

class ReclaimedCheckpoint(TypedDict):
    checkpoint: str
    action: Literal["degraded", "deleted"]
    disks: List[str]

class ReclaimReport(TypedDict):
    txn: Optional[str]
    domain: str
    applied: bool
    orphans: List[BitmapRef]
    inconsistent: List[InconsistentBitmap]
    checkpoints: List[ReclaimedCheckpoint]
    foreign_bitmaps: NotRequired[List[BitmapRef]]
    libvirt_calls: int
    warnings: List[str]

class Report(TypedDict):
    domain: str
    ok: bool
    findings: List[Finding]
    usable: Optional[str]
    leaf: Optional[str]
    running: bool
    checkpoints: int
    journal_txn: Optional[str]
    images_read: int
    libvirt_validations: int
    notes: List[str]

class OpenTransactions(TypedDict):
    owner_alive: int
    owner_dead: int

class TxnCount(TypedDict):
    kind: TxnKindName
    outcome: Literal["committed", "rolled_back"]
    count: int

class FindingCount(TypedDict):
    kind: FindingKindName
    count: int

class LastValidate(TypedDict):
    validated_at: str
    findings: List[FindingCount]

class DomainMetrics(TypedDict):
    domain: str
    checkpoints: Optional[int]
    last_commit_at: Optional[str]
    open_transactions: OpenTransactions
    transactions: List[TxnCount]
    last_validate: Optional[LastValidate]

class Metrics(TypedDict):
    domains: List[DomainMetrics]

# The exceptions.

class RemovedBitmap(TypedDict):
    checkpoint: str
    target: str
    image: str

class PruneReport(TypedDict):
    txn: Optional[str]
    domain: str
    applied: bool
    pruned: List[str]
    kept: List[str]
    bitmaps_removed: List[RemovedBitmap]
    libvirt_calls: int
    warnings: List[str]

class Error(Exception):
    """A ckptstore operation failed; the fields are the command's `error` document."""

    kind: ErrorKindName
    exit_code: int
    message: str
    hint: str
    doc: ErrorDoc
    txn: Optional[str]
    report: Optional[SyncReport]

class RolledBack(Error):
    """libvirt refused a step; the transaction was rolled back (exit code 1)."""

class BadInput(Error):
    """Bad input: nothing was changed anywhere (exit code 2)."""

class Busy(Error):
    """A live process or thread holds the domain (exit code 3)."""

class Unreachable(Error):
    """libvirt unreachable, no such domain, or a transaction left open for recover (exit code 4)."""

class JournalError(Error):
    """The journal cannot be used (exit code 5)."""

# The store.

ChainInput = Union[Chain, Mapping[str, Any], str, bytes]
ProgressCallback = Callable[[Progress], object]

class Store:
    """A journal and the libvirt it keeps checkpoints for; share one between threads."""

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        connect: str = "qemu:///system",
        bitmaps: Optional[Literal["degrade", "strict", "ignore"]] = None,
    ) -> None: ...
    @property
    def path(self) -> "pathlib.Path": ...
    @property
    def uri(self) -> str: ...
    def sync(self, chain: ChainInput, progress: Optional[ProgressCallback] = None) -> SyncReport: ...
    def plan(self, chain: ChainInput) -> PlanReport: ...
    def plan_resync(self, domain: str) -> PlanReport: ...
    def export(self, domain: str) -> Chain: ...
    def resync(self, domain: str, progress: Optional[ProgressCallback] = None) -> SyncReport: ...
    def recover(
        self, domain: Optional[str] = None, policy: Literal["resume", "rollback"] = "resume"
    ) -> RecoverReport: ...
    def status(self, domain: Optional[str] = None) -> Status: ...
    def history(self, domain: str, limit: Optional[int] = None) -> History: ...
    def validate(self, domain: str) -> Report: ...
    def import_domain(self, domain: str) -> SyncReport: ...
    def metrics(self) -> Metrics: ...
    def metrics_text(self) -> str: ...
    def ensure(self, domain: str, checkpoint: str, chain: Optional[ChainInput] = None) -> EnsureReport: ...
    def prune(
        self,
        domain: str,
        keep: Optional[int] = None,
        older_than: Optional[str] = None,
        apply: bool = False,
    ) -> PruneReport: ...
    def reclaim(self, domain: str, apply: bool = False) -> ReclaimReport: ...

def _gil_stats(reset: bool = False) -> dict[str, int]: ...
