//! The library's error type: one enum, `#[non_exhaustive]`, with the
//! context a caller needs (domain, transaction, checkpoint) and predicates
//! to branch on kinds rather than on message text.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::backend::{BackendError, BackendErrorKind};
use crate::bitmaps::Degraded;
use crate::chain::ChainError;
use crate::engine::SyncReport;
use crate::journal::JournalError;
use crate::owner::Owner;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The chain was refused before anything was written.
    #[error("invalid chain: {0}")]
    Chain(#[from] ChainError),
    /// The chain names a disk target the domain does not have (libvirt
    /// would not check it).
    #[error("domain {domain} has no disk with target {target:?} (its disks: {known})")]
    UnknownTarget {
        /// The domain.
        domain: String,
        /// The target name in the chain.
        target: String,
        /// The domain's real targets, comma-separated.
        known: String,
    },
    /// `sync --domain` of a domain the journal has no committed chain for.
    #[error("the journal has no committed chain for domain {domain}")]
    NoCommittedChain {
        /// The domain.
        domain: String,
    },
    /// A live writer — another process, or another thread of this one —
    /// works on this domain, or holds an open transaction on it.
    #[error("domain {domain} is busy: {}", match (txn, owner) {
        (Some(t), Some(o)) => format!("transaction {t} is held by live process {o}"),
        _ => "another process or thread is working on it".to_string(),
    })]
    Busy {
        /// The domain.
        domain: String,
        /// The open transaction, when there is one.
        txn: Option<Uuid>,
        /// Its owner, when there is an open transaction.
        owner: Option<Owner>,
    },
    /// The transaction was taken over by another process while this one
    /// drove it (its lock was not seen: a journal reached through another
    /// lock folder, or a process of an older version). This process made
    /// no further libvirt call.
    #[error("transaction {txn} on domain {domain} was taken over by another process; this one stopped before its next libvirt call")]
    TakenOver {
        /// The domain.
        domain: String,
        /// The transaction.
        txn: Uuid,
    },
    /// libvirt refused a step; the transaction was rolled back to its
    /// before-image (or, if `rolled_back` is false, the rollback could not
    /// finish and the transaction stays open for `recover`).
    #[error("libvirt refused checkpoint {checkpoint} of domain {domain}: {source}; transaction {txn} {}",
            if *rolled_back { "was rolled back" } else { "could not be rolled back and is left for recover" })]
    Refused {
        /// The domain.
        domain: String,
        /// The transaction.
        txn: Uuid,
        /// The checkpoint whose step was refused.
        checkpoint: String,
        /// libvirt's error.
        source: BackendError,
        /// Whether libvirt is back at the before-image.
        rolled_back: bool,
        /// The rolled-back transaction's report (`outcome: rolled_back`),
        /// when a sync or re-apply was refused and rolled back.
        report: Option<Box<SyncReport>>,
    },
    /// The caller's progress callback asked to stop: the transaction stays
    /// open, exactly as if the caller had been killed there, for `recover`.
    #[error("transaction {txn} on domain {domain} was stopped by the caller's progress callback; left open for recover")]
    Aborted {
        /// The domain.
        domain: String,
        /// The transaction.
        txn: Uuid,
    },
    /// A backend call failed in a way that is not a refusal of a step: the
    /// domain does not exist, libvirt is unreachable, or the connection was
    /// lost and did not come back (the transaction, if any, stays open).
    #[error("libvirt {op} on domain {domain} failed: {source}{}",
            txn.map(|t| format!("; transaction {t} is left open for recover")).unwrap_or_default())]
    Backend {
        /// The domain.
        domain: String,
        /// The operation.
        op: &'static str,
        /// The open transaction, if one was started.
        txn: Option<Uuid>,
        /// libvirt's error.
        source: BackendError,
    },
    /// libvirt's checkpoints kept changing under the transaction (another
    /// tool is writing them); it stays open for `recover`.
    #[error("libvirt's checkpoints of domain {domain} kept changing during transaction {txn}; left open for recover")]
    Diverged {
        /// The domain.
        domain: String,
        /// The transaction.
        txn: Uuid,
    },
    /// `--bitmaps strict`: checkpoints whose bitmap is missing or unusable
    /// on a disk; refused before any libvirt call.
    #[error("domain {domain}: {} disk{} of the checkpoints to define {} no usable bitmap (first: checkpoint {}, disk {}: {}); strict refuses the sync",
            disks.len(), if disks.len() == 1 { "" } else { "s" }, if disks.len() == 1 { "has" } else { "have" },
            disks[0].checkpoint, disks[0].disk, disks[0].reason)]
    MissingBitmaps {
        /// The domain.
        domain: String,
        /// Each disk and why (never empty).
        disks: Vec<Degraded>,
    },
    /// `export` of a committed chain that a chain file cannot describe (a
    /// checkpoint libvirt keeps under a bitmap of another name).
    #[error("the committed chain of domain {domain} cannot be exported: {reason}")]
    NotExportable {
        /// The domain.
        domain: String,
        /// What a chain file cannot say.
        reason: String,
    },
    /// `ensure` of a checkpoint the chain it is taken from does not have.
    #[error("checkpoint {checkpoint} is not in domain {domain}'s {from}")]
    UnknownCheckpoint {
        /// The domain.
        domain: String,
        /// The checkpoint asked for.
        checkpoint: String,
        /// Where it was looked for: `committed chain` or `chain file`.
        from: &'static str,
    },
    /// `ensure --chain FILE` with a chain of another domain.
    #[error("the chain is for domain {chain}, not {domain}")]
    OtherDomain {
        /// The domain asked for.
        domain: String,
        /// The chain's domain.
        chain: String,
    },
    /// A shut-off domain's image that a removal must write is held open by
    /// another process (QEMU's write lock). Before the intent: refused,
    /// nothing changed (exit 2). During a transaction: it is left open for
    /// `recover` (exit 4).
    #[error("domain {domain}: image {} is in use by another process ({message}){}", image.display(),
            txn.map(|t| format!("; transaction {t} is left open for recover")).unwrap_or_default())]
    ImageInUse {
        /// The domain.
        domain: String,
        /// The image.
        image: std::path::PathBuf,
        /// `qemu-img`'s message.
        message: String,
        /// The open transaction, if one was started.
        txn: Option<Uuid>,
    },
    /// A shut-off domain's image could not be read or edited (not the
    /// lock). Before the intent: nothing changed (exit 2); during a
    /// transaction: left open for `recover` (exit 4).
    #[error("domain {domain}: image {}: {message}{}", image.display(),
            txn.map(|t| format!("; transaction {t} is left open for recover")).unwrap_or_default())]
    ImageEdit {
        /// The domain.
        domain: String,
        /// The image.
        image: std::path::PathBuf,
        /// Why.
        message: String,
        /// The open transaction, if one was started.
        txn: Option<Uuid>,
    },
    /// A retention rule that would delete what must stay (`--keep 0`, the
    /// leaf), or that cannot be read (a bad duration).
    #[error("bad retention for domain {domain}: {reason}")]
    BadRetention {
        /// The domain.
        domain: String,
        /// What is wrong.
        reason: String,
    },
    /// The journal cannot be used.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// What kind of failure an [`Error`] is: what the caller should do next,
/// and the command's exit code. Every error has exactly one kind
/// ([`Error::kind`]); callers branch on it, never on message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// libvirt refused a step and the transaction was rolled back: libvirt
    /// is as it was. Exit code 1.
    RolledBack,
    /// Bad input: nothing was changed anywhere. Exit code 2.
    BadInput,
    /// A live process or thread works on the domain, or holds its open
    /// transaction (or another tool kept changing its checkpoints). Exit
    /// code 3.
    Busy,
    /// libvirt cannot be reached or the domain does not exist, or a failure
    /// left a transaction open for `recover` (a lost connection that did
    /// not come back, a rollback libvirt refused, a stop asked by the
    /// progress callback). Exit code 4.
    Unreachable,
    /// The journal cannot be used. Exit code 5.
    Journal,
    /// `validate` found problems: not an [`Error`] (the report says what),
    /// but the `error` of the `validate` document and its exit code 1.
    Findings,
}

impl ErrorKind {
    /// The command's exit code for this kind (the one table of them).
    pub const fn exit_code(self) -> u8 {
        match self {
            ErrorKind::RolledBack => 1,
            ErrorKind::BadInput => 2,
            ErrorKind::Busy => 3,
            ErrorKind::Unreachable => 4,
            ErrorKind::Journal => 5,
            ErrorKind::Findings => 1,
        }
    }
}

impl Error {
    /// The kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Chain(_)
            | Error::UnknownTarget { .. }
            | Error::NoCommittedChain { .. }
            | Error::NotExportable { .. }
            | Error::UnknownCheckpoint { .. }
            | Error::OtherDomain { .. }
            | Error::BadRetention { .. }
            | Error::ImageInUse { txn: None, .. }
            | Error::ImageEdit { txn: None, .. } => ErrorKind::BadInput,
            Error::Busy { .. } | Error::TakenOver { .. } | Error::Diverged { .. } => {
                ErrorKind::Busy
            }
            Error::Refused {
                rolled_back: true, ..
            }
            | Error::MissingBitmaps { .. } => ErrorKind::RolledBack,
            Error::Refused {
                rolled_back: false, ..
            }
            | Error::Backend { .. }
            | Error::ImageInUse { .. }
            | Error::ImageEdit { .. }
            | Error::Aborted { .. } => ErrorKind::Unreachable,
            Error::Journal(_) => ErrorKind::Journal,
        }
    }

    /// What to do about it, in one sentence (the text after the dash of the
    /// command's error line, and the `hint` of the JSON error document).
    pub fn hint(&self) -> String {
        match self {
            Error::Chain(_) => {
                "fix the chain (its form: `ckptstore sync --help`); nothing was changed".into()
            }
            Error::UnknownTarget { .. } => {
                "update the chain's disk map to the domain's current disk targets; nothing was changed".into()
            }
            Error::NoCommittedChain { domain } => format!(
                "run `ckptstore sync --chain FILE` or `ckptstore import --domain {domain}` first; nothing was changed"
            ),
            Error::MissingBitmaps { .. } => {
                "nothing was changed; `--bitmaps degrade` leaves those disks out, or take a new full backup".into()
            }
            Error::UnknownCheckpoint { domain, .. } => format!(
                "`ckptstore export --domain {domain}` shows the committed chain; nothing was changed"
            ),
            Error::OtherDomain { .. } => {
                "give the chain of that domain, or `--domain` of this chain; nothing was changed".into()
            }
            Error::NotExportable { domain, .. } => format!(
                "`ckptstore history --domain {domain}` shows the committed transactions; nothing was changed"
            ),
            Error::Busy { .. } | Error::TakenOver { .. } => {
                "wait for that process to finish (see `ckptstore status`), then retry".into()
            }
            Error::Diverged { domain, .. } => format!(
                "another tool is changing these checkpoints: stop it, then run `ckptstore recover --domain {domain}`"
            ),
            Error::Refused {
                rolled_back: true, ..
            } => "libvirt's checkpoints are as they were before; fix the cause and retry".into(),
            Error::Refused { domain, .. } => format!(
                "run `ckptstore recover --domain {domain}` once libvirt accepts the calls again"
            ),
            Error::Aborted { domain, .. } => format!(
                "run `ckptstore recover --domain {domain}` to finish or undo it"
            ),
            Error::Backend {
                source, txn: None, ..
            } => match source.kind {
                BackendErrorKind::NoDomain => {
                    "check the domain's name or UUID (`virsh list --all`) and the libvirt URI".into()
                }
                BackendErrorKind::Unreachable | BackendErrorKind::ConnectionLost => {
                    "check that libvirtd runs and answers there (choose it with --connect or LIBVIRT_DEFAULT_URI), then retry"
                        .into()
                }
                _ => "nothing was changed; check libvirt's log, then retry".into(),
            },
            Error::Backend { .. } => {
                "the transaction is left open: run `ckptstore recover` once libvirt answers again".into()
            }
            Error::BadRetention { .. } => {
                "give --keep N (N at least 1) or --older-than DURATION (like 7d, 12h, 30m); nothing was changed".into()
            }
            Error::ImageInUse { txn: None, .. } => {
                "stop the process that holds the image (the domain, qemu-nbd, a backup), then retry; nothing was changed".into()
            }
            Error::ImageEdit { txn: None, .. } => {
                "check the image and that qemu-img runs; nothing was changed".into()
            }
            Error::ImageInUse { domain, .. } | Error::ImageEdit { domain, .. } => format!(
                "the transaction is left open: fix the image, then run `ckptstore recover --domain {domain}`"
            ),
            Error::Journal(j) => j.hint().into(),
        }
    }

    /// Bad input: nothing was changed anywhere.
    pub fn is_bad_input(&self) -> bool {
        self.kind() == ErrorKind::BadInput
    }

    /// A live process or thread holds the domain.
    pub fn is_busy(&self) -> bool {
        self.kind() == ErrorKind::Busy
    }

    /// libvirt refused a step and the transaction was rolled back.
    pub fn is_rolled_back(&self) -> bool {
        self.kind() == ErrorKind::RolledBack
    }

    /// libvirt cannot be reached, the domain does not exist, or a failure
    /// left a transaction open.
    pub fn is_unreachable(&self) -> bool {
        self.kind() == ErrorKind::Unreachable
    }

    /// The journal is corrupt, from a newer schema, read-only, full or locked.
    pub fn is_journal(&self) -> bool {
        self.kind() == ErrorKind::Journal
    }

    /// The transaction this error left open or rolled back, if any.
    pub fn txn(&self) -> Option<Uuid> {
        match self {
            Error::Refused { txn, .. }
            | Error::Diverged { txn, .. }
            | Error::TakenOver { txn, .. }
            | Error::Aborted { txn, .. } => Some(*txn),
            Error::Backend { txn, .. }
            | Error::Busy { txn, .. }
            | Error::ImageInUse { txn, .. }
            | Error::ImageEdit { txn, .. } => *txn,
            Error::Chain(_)
            | Error::UnknownTarget { .. }
            | Error::NoCommittedChain { .. }
            | Error::NotExportable { .. }
            | Error::MissingBitmaps { .. }
            | Error::UnknownCheckpoint { .. }
            | Error::OtherDomain { .. }
            | Error::BadRetention { .. }
            | Error::Journal(_) => None,
        }
    }

    /// The rolled-back report of a refused sync or re-apply.
    pub fn report(&self) -> Option<&SyncReport> {
        match self {
            Error::Refused { report, .. } => report.as_deref(),
            _ => None,
        }
    }
}

/// An error as the JSON documents carry it (`error`): its kind, the exit
/// code, the message and what to do. The command prints it, the Python
/// module raises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDoc {
    /// The kind.
    pub kind: ErrorKind,
    /// The command's exit code for it.
    pub exit_code: u8,
    /// What happened, on one line.
    pub message: String,
    /// What to do.
    pub hint: String,
}

impl ErrorDoc {
    /// A document of a kind with a message and a hint (for failures found
    /// outside the library, such as an unreadable chain file).
    pub fn new(kind: ErrorKind, message: impl Into<String>, hint: impl Into<String>) -> ErrorDoc {
        ErrorDoc {
            kind,
            exit_code: kind.exit_code(),
            message: message.into().replace('\n', " "),
            hint: hint.into(),
        }
    }
}

impl From<&Error> for ErrorDoc {
    fn from(e: &Error) -> ErrorDoc {
        ErrorDoc::new(e.kind(), e.to_string(), e.hint())
    }
}

/// Shorthand for results of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
