//! The backend: what the store needs from libvirt, as a small synchronous,
//! object-safe trait, with two implementations — [`fake::FakeBackend`]
//! (libvirt's behaviour in memory, with fault injection) and
//! [`libvirt::LibvirtBackend`] (the real thing, over the `virt` crate).
//!
//! Errors carry a [`BackendErrorKind`] that the engine branches on; the most
//! important one is [`BackendErrorKind::ConnectionLost`]: the call's outcome
//! is unknown, and the engine must look before it decides anything.

pub mod fake;
pub mod libvirt;

use serde::{Deserialize, Serialize};

use crate::chain::CheckpointDef;
pub use crate::xml::{DomainDisk, DomainInfo};

/// What went wrong in a backend call, as a kind the engine can branch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BackendErrorKind {
    /// libvirt refused the argument: a parent that does not exist, a cycle,
    /// malformed XML (VIR_ERR_INVALID_ARG, VIR_ERR_XML_ERROR).
    InvalidArgument,
    /// No checkpoint of that name (VIR_ERR_NO_DOMAIN_CHECKPOINT).
    NoCheckpoint,
    /// No such domain (VIR_ERR_NO_DOMAIN).
    NoDomain,
    /// The operation needs a running domain, or is not valid in this state
    /// (VIR_ERR_OPERATION_INVALID).
    NotRunning,
    /// The checkpoint's bitmaps do not match (VIR_ERR_CHECKPOINT_INCONSISTENT).
    Inconsistent,
    /// The operation is not supported by this driver (VIR_ERR_NO_SUPPORT,
    /// VIR_ERR_ARGUMENT_UNSUPPORTED).
    Unsupported,
    /// The connection broke during the call: the call's outcome is unknown.
    ConnectionLost,
    /// libvirt cannot be reached at all (connect failed).
    Unreachable,
    /// Anything else.
    Other,
}

/// An error from a backend call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct BackendError {
    /// The kind the engine branches on.
    pub kind: BackendErrorKind,
    /// libvirt's error code, 0 when not from libvirt.
    pub code: i32,
    /// libvirt's message (or the fake's copy of it).
    pub message: String,
}

impl BackendError {
    /// Build an error of a kind with a message.
    pub fn new(kind: BackendErrorKind, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            code: 0,
            message: message.into(),
        }
    }

    /// Build an error of a kind carrying libvirt's error code.
    pub fn with_code(kind: BackendErrorKind, code: i32, message: impl Into<String>) -> Self {
        BackendError {
            kind,
            code,
            message: message.into(),
        }
    }

    /// The call may or may not have taken effect.
    pub fn is_outcome_unknown(&self) -> bool {
        self.kind == BackendErrorKind::ConnectionLost
    }

    /// libvirt could not be reached, or the domain does not exist.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self.kind,
            BackendErrorKind::Unreachable | BackendErrorKind::NoDomain
        )
    }
}

/// What the store needs from libvirt. Small, synchronous, object-safe, and
/// shareable between threads. `domain` is a libvirt domain name or UUID.
pub trait Backend: Send + Sync {
    /// Every checkpoint of the domain with its parsed content, parents
    /// before children.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::NoDomain`], connection errors.
    fn list(&self, domain: &str) -> Result<Vec<CheckpointDef>, BackendError>;

    /// Redefine one checkpoint from its XML (metadata only). Replaces an
    /// existing checkpoint of the same name. With `validate`, libvirt checks
    /// the real bitmaps (running domains only).
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::InvalidArgument`] when the parent is missing or a
    /// cycle would form, [`BackendErrorKind::Inconsistent`] when validation
    /// fails, [`BackendErrorKind::ConnectionLost`] when the outcome is unknown.
    fn redefine(&self, domain: &str, xml: &str, validate: bool) -> Result<(), BackendError>;

    /// Delete one checkpoint's metadata, leaving the bitmaps; its children
    /// are re-parented to its parent.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::NoCheckpoint`] when there is no such checkpoint.
    fn delete(&self, domain: &str, name: &str) -> Result<(), BackendError>;

    /// The domain's disks and run state.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::NoDomain`], connection errors.
    fn domain_info(&self, domain: &str) -> Result<DomainInfo, BackendError>;

    /// A short description for logs (never contains credentials).
    fn describe(&self) -> String;
}
