//! The library's error type: one enum, `#[non_exhaustive]`, with the
//! context a caller needs (domain, transaction, checkpoint) and predicates
//! to branch on kinds rather than on message text.

use uuid::Uuid;

use crate::backend::{BackendError, BackendErrorKind};
use crate::chain::ChainError;
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
    /// The journal cannot be used.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl Error {
    /// Bad input: nothing was changed anywhere.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Error::Chain(_) | Error::UnknownTarget { .. } | Error::NoCommittedChain { .. }
        )
    }

    /// A live process holds the domain.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::Busy { .. } | Error::TakenOver { .. })
    }

    /// libvirt refused a step and the transaction was rolled back.
    pub fn is_rolled_back(&self) -> bool {
        matches!(
            self,
            Error::Refused {
                rolled_back: true,
                ..
            }
        )
    }

    /// libvirt cannot be reached, or the domain does not exist.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Error::Backend { source, .. } => matches!(
                source.kind,
                BackendErrorKind::Unreachable
                    | BackendErrorKind::NoDomain
                    | BackendErrorKind::ConnectionLost
            ),
            _ => false,
        }
    }

    /// The journal is corrupt, from a newer schema, read-only, full or locked.
    pub fn is_journal(&self) -> bool {
        matches!(self, Error::Journal(_))
    }

    /// The transaction this error left open or rolled back, if any.
    pub fn txn(&self) -> Option<Uuid> {
        match self {
            Error::Refused { txn, .. }
            | Error::Diverged { txn, .. }
            | Error::TakenOver { txn, .. } => Some(*txn),
            Error::Backend { txn, .. } | Error::Busy { txn, .. } => *txn,
            _ => None,
        }
    }
}

/// Shorthand for results of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;
