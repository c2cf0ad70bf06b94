//! The backend: what the store needs from libvirt, as a small synchronous,
//! object-safe trait, with two implementations — [`fake::FakeBackend`]
//! (libvirt's behaviour in memory, with fault injection) and
//! [`libvirt::LibvirtBackend`] (the real thing, over the `virt` crate).
//!
//! Errors carry a [`BackendErrorKind`] that the engine branches on; the most
//! important one is [`BackendErrorKind::ConnectionLost`]: the call's outcome
//! is unknown, and the engine must look before it decides anything.
//!
//! The code map: `fake/` (the in-memory backend: `mod.rs`, `model.rs`,
//! `schema.rs`, `errors.rs`, `faults.rs`), `libvirt/` (the real one:
//! `mod.rs`, `connection.rs`, `errors.rs`, `uri.rs`, `ffi.rs`, `state.rs`);
//! this file holds the [`Backend`] trait, [`BackendError`] and libvirt's
//! crash leftovers as the trait reports them ([`Leftover`],
//! [`LeftoverScan`]).

pub mod fake;
pub mod libvirt;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::chain::CheckpointDef;
pub use crate::xml::{DomainDisk, DomainInfo};

/// How long a leftover must have been left untouched before it is taken as
/// not being written right now, when the daemon's start cannot settle it (a
/// libvirt metadata write takes milliseconds).
pub const LEFTOVER_QUIET: Duration = Duration::from_secs(10);

/// A file libvirt left beside a checkpoint's metadata when its daemon died
/// while rewriting it: libvirt writes `NAME.xml.new`, then renames it over
/// `NAME.xml`. At its next start libvirt loads every file of the folder, so
/// a complete leftover brings its checkpoint back (or replaces its
/// definition) at every restart until something removes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// The checkpoint the file belongs to (the file name without `.xml.new`).
    pub checkpoint: String,
    /// The file.
    pub path: PathBuf,
    /// What libvirt would load from it: `None` when it is not a readable
    /// checkpoint (cut short), which libvirt skips.
    pub content: Option<CheckpointDef>,
    /// Its modification time, when scanned.
    pub modified: SystemTime,
    /// Nobody is writing it now: it is older than the daemon's current
    /// process, or untouched for ten seconds (`LEFTOVER_QUIET`).
    pub stale: bool,
}

/// What [`Backend::leftovers`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeftoverScan {
    /// The domain's checkpoint metadata folder was read: these leftovers
    /// (none, usually).
    Checked(Vec<Leftover>),
    /// The folder could not be read, and why (a remote or non-qemu
    /// connection, a daemon in another mount namespace, no permission).
    /// Nothing is assumed.
    CannotCheck(String),
}

/// What libvirt says of one disk's bitmap of one checkpoint on a running
/// domain ([`Backend::bitmap_states`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum BitmapState {
    /// The bitmap passes libvirt's check: an incremental backup from the
    /// checkpoint can read this disk.
    Usable {
        /// Bytes the bitmap holds dirty, merged down the backing chain
        /// (libvirt's `size`; the fake always says 0).
        dirty_bytes: u64,
    },
    /// The bitmap fails libvirt's check: missing from the disk's top
    /// image, or there but unusable (in use, inconsistent, disabled, read
    /// only, or a gap down the backing chain). libvirt does not say which;
    /// `REDEFINE_VALIDATE` refuses the checkpoint while it names this disk.
    Unusable,
}

/// One disk of [`Backend::bitmap_states`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DiskBitmap {
    /// The disk's target name.
    pub target: String,
    /// What libvirt says of the checkpoint's bitmap there.
    pub state: BitmapState,
}

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

    /// The connection is lost or was never made: nothing can be learned
    /// from libvirt now.
    pub fn is_connection(&self) -> bool {
        matches!(
            self.kind,
            BackendErrorKind::Unreachable | BackendErrorKind::ConnectionLost
        )
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

    /// libvirt's real delete of one checkpoint (`virDomainCheckpointDelete`
    /// with no flag): its metadata and its bitmap in every disk's image
    /// (QEMU merges a non-root checkpoint's bitmap into its parent's); its
    /// children are re-parented to its parent. Needs a running domain. The
    /// provided implementation cannot: `Unsupported`.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::NoCheckpoint`] when there is no such checkpoint,
    /// [`BackendErrorKind::NotRunning`] on a shut-off domain ("cannot
    /// delete checkpoint for inactive domain"),
    /// [`BackendErrorKind::Unsupported`], connection errors.
    fn purge(&self, domain: &str, name: &str) -> Result<(), BackendError> {
        let _ = (domain, name);
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!("{} cannot delete a checkpoint's bitmaps", self.describe()),
        ))
    }

    /// The domain's disks and run state.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::NoDomain`], connection errors.
    fn domain_info(&self, domain: &str) -> Result<DomainInfo, BackendError>;

    /// A short description for logs (never contains credentials).
    fn describe(&self) -> String;

    /// libvirt's crash leftovers ([`Leftover`]) among the domain's
    /// checkpoint metadata files. The provided implementation cannot look:
    /// only a backend that can read the daemon's state folder can.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::NoDomain`], connection errors.
    fn leftovers(&self, domain: &str) -> Result<LeftoverScan, BackendError> {
        let _ = domain;
        Ok(LeftoverScan::CannotCheck(format!(
            "{} cannot read the daemon's metadata files",
            self.describe()
        )))
    }

    /// Remove a stale leftover of a checkpoint libvirt does not list (one
    /// libvirt lists is repaired by redefining it: libvirt's own rewrite
    /// replaces the file). Refused when the file changed since it was
    /// scanned, is not stale, or libvirt lists the checkpoint.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::Unsupported`] where leftovers cannot be read
    /// (the provided implementation); [`BackendErrorKind::Other`] when the
    /// removal is refused or fails.
    fn remove_leftover(&self, domain: &str, leftover: &Leftover) -> Result<(), BackendError> {
        let _ = (domain, leftover);
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!("{} cannot remove metadata files", self.describe()),
        ))
    }

    /// The checkpoint's XML exactly as libvirt holds it: with the
    /// `<domain>` element a checkpoint libvirt created keeps
    /// (`virDomainCheckpointGetXMLDesc` without
    /// `VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN`). Redefining exactly this
    /// string changes nothing. The provided implementation renders the
    /// minimal XML of the checkpoint as [`Backend::list`] gives it.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::NoCheckpoint`] when there is no such checkpoint,
    /// [`BackendErrorKind::NoDomain`], connection errors.
    fn checkpoint_xml(&self, domain: &str, name: &str) -> Result<String, BackendError> {
        self.list(domain)?
            .iter()
            .find(|d| d.name == name)
            .map(crate::xml::render_checkpoint)
            .ok_or_else(|| {
                BackendError::new(
                    BackendErrorKind::NoCheckpoint,
                    format!("no domain checkpoint with matching name '{name}'"),
                )
            })
    }

    /// On a running domain, for every disk the checkpoint names with a
    /// bitmap and the domain has (in target order): whether the bitmap
    /// named after the checkpoint passes libvirt's check — the one
    /// `REDEFINE_VALIDATE` makes (`qemuBlockBitmapChainIsValid`), on every
    /// disk instead of up to the first bad one. Nothing is written to
    /// libvirt's metadata or to the images, so it needs no intent in the
    /// journal. The provided implementation cannot tell: `Unsupported`.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::NotRunning`] when the domain is shut off,
    /// [`BackendErrorKind::NoCheckpoint`], [`BackendErrorKind::Unsupported`]
    /// where the backend cannot check per disk, connection errors.
    fn bitmap_states(
        &self,
        domain: &str,
        checkpoint: &str,
    ) -> Result<Vec<DiskBitmap>, BackendError> {
        let _ = (domain, checkpoint);
        Err(BackendError::new(
            BackendErrorKind::Unsupported,
            format!(
                "{} cannot check a checkpoint's bitmaps per disk",
                self.describe()
            ),
        ))
    }

    /// Whether this backend checks bitmaps: `REDEFINE_VALIDATE` on a running
    /// domain and [`Backend::bitmap_states`]. libvirt's qemu driver does;
    /// its test driver refuses the flag. The provided implementation says
    /// no.
    ///
    /// # Errors
    ///
    /// Connection errors.
    fn checks_bitmaps(&self) -> Result<bool, BackendError> {
        Ok(false)
    }
}
