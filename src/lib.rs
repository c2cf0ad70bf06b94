#![doc = include_str!("../README.md")]
#![deny(missing_docs)]
#![deny(unsafe_code)]

// Every module is private: the public face is the list below, and nothing
// else is reachable from outside. ARCHITECTURE.md has the code map.
mod backend;
mod bitmaps;
mod chain;
mod engine;
mod error;
mod journal;
mod leftovers;
mod lock;
mod metrics;
mod owner;
mod plan;
mod qcow2;
mod validate;
mod xml;

#[cfg(feature = "testing")]
pub mod testing;

pub use backend::fake::FakeBackend;
pub use backend::libvirt::{redact_uri, LibvirtBackend};
pub use backend::{
    Backend, BackendError, BackendErrorKind, BitmapState, DiskBitmap, DomainDisk, DomainInfo,
    Leftover, LeftoverScan,
};
pub use bitmaps::{
    BitmapPolicy, BitmapRef, CheckpointAction, Degraded, InconsistentBitmap, InconsistentReason,
    ReclaimedCheckpoint, Unverified,
};
pub use chain::{
    Chain, ChainError, Checkpoint, CheckpointDef, DetachedDisk, NameError, ValidChain,
    MAX_CHECKPOINTS, MAX_NAME_BYTES,
};
pub use engine::{
    DiskMode, DomainStatus, EnsureDisk, EnsureReport, History, HistoryEntry, Incomplete, Outcome,
    PlanReport, PlanStep, Policy, Progress, ProgressFn, PruneReport, ReclaimReport, RecoverFailure,
    RecoverReport, Recovered, RemovedBitmap, Retention, Status, Store, StoreOptions, SyncReport,
    CRASH_POINTS,
};
pub use error::{Error, ErrorDoc, ErrorKind, Result};
pub use journal::{
    Committed, JournalError, JournalOptions, SqliteCause, StepPhase, TxnKind, TxnState,
};
pub use metrics::{DomainMetrics, FindingCount, LastValidate, Metrics, OpenTransactions, TxnCount};
pub use owner::Owner;
pub use qcow2::{
    read_chain as read_qcow2_chain, read_image as read_qcow2, Backing as Qcow2Backing,
    BackingChain as Qcow2Chain, Bitmap as Qcow2Bitmap, ChainEnd as Qcow2ChainEnd,
    Image as Qcow2Image, Qcow2Error, MAX_CHAIN_DEPTH,
};
pub use validate::{validate, Finding, FindingKind, Report};
