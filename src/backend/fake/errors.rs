//! libvirt's refusals as the fake returns them: the error code
//! (`virErrorNumber`), the kind the engine branches on and libvirt 11.3's
//! message, one function per refusal.

use crate::backend::{BackendError, BackendErrorKind as K};

/// libvirt's error codes the fake reproduces.
pub(super) mod code {
    pub const INTERNAL_ERROR: i32 = 1;
    pub const INVALID_ARG: i32 = 8;
    pub const XML_ERROR: i32 = 27;
    pub const XML_DETAIL: i32 = 35;
    pub const SYSTEM_ERROR: i32 = 38;
    pub const NO_DOMAIN: i32 = 42;
    pub const OPERATION_INVALID: i32 = 55;
    pub const OPERATION_UNSUPPORTED: i32 = 84;
    pub const XML_INVALID_SCHEMA: i32 = 92;
    pub const NO_DOMAIN_CHECKPOINT: i32 = 103;
    pub const CHECKPOINT_INCONSISTENT: i32 = 109;
}

/// No domain of that name or UUID.
pub(super) fn no_domain(domain: &str) -> BackendError {
    BackendError::with_code(
        K::NoDomain,
        code::NO_DOMAIN,
        format!("Domain not found: no domain with matching name '{domain}'"),
    )
}

/// No checkpoint of that name.
pub(super) fn no_checkpoint(name: &str) -> BackendError {
    BackendError::with_code(
        K::NoCheckpoint,
        code::NO_DOMAIN_CHECKPOINT,
        format!("Domain checkpoint not found: no domain checkpoint with matching name '{name}'"),
    )
}

/// An argument libvirt refuses (`VIR_ERR_INVALID_ARG`): a missing parent, a
/// cycle, a foreign UUID; `message` is libvirt's, prefix included.
pub(super) fn invalid(message: String) -> BackendError {
    BackendError::with_code(K::InvalidArgument, code::INVALID_ARG, message)
}

/// What libvirt says when its RELAX NG schema refuses the document.
pub(super) fn schema_error() -> BackendError {
    BackendError::with_code(
        K::InvalidArgument,
        code::XML_INVALID_SCHEMA,
        "XML document failed to validate against schema: Unable to validate doc against \
         /usr/share/libvirt/schemas/domaincheckpoint.rng\nElement domaincheckpoint failed to validate content\n",
    )
}

/// XML that is not well-formed, as libxml2 reports it.
pub(super) fn not_well_formed(e: String) -> BackendError {
    BackendError::with_code(
        K::InvalidArgument,
        code::XML_DETAIL,
        format!("at line 1: {e}"),
    )
}

/// A document libvirt's checkpoint parser cannot read.
pub(super) fn xml_error(e: impl std::fmt::Display) -> BackendError {
    BackendError::with_code(
        K::InvalidArgument,
        code::XML_ERROR,
        format!("XML error: {e}"),
    )
}

/// A redefine document without `<name>`.
pub(super) fn missing_name() -> BackendError {
    BackendError::with_code(
        K::InvalidArgument,
        code::XML_ERROR,
        "XML error: a redefined checkpoint must have a name",
    )
}

/// A redefine document without `<creationTime>`.
pub(super) fn missing_creation_time() -> BackendError {
    BackendError::with_code(
        K::Other,
        code::INTERNAL_ERROR,
        "internal error: missing creationTime from existing checkpoint",
    )
}

/// `REDEFINE_VALIDATE` on a domain that is not running.
pub(super) fn not_running() -> BackendError {
    BackendError::with_code(
        K::NotRunning,
        code::OPERATION_INVALID,
        "Requested operation is not valid: domain is not running",
    )
}

/// `REDEFINE_VALIDATE` found no bitmap `name` on the disk `target`.
pub(super) fn inconsistent(name: &str, target: &str) -> BackendError {
    BackendError::with_code(
        K::Inconsistent,
        code::CHECKPOINT_INCONSISTENT,
        format!("checkpoint inconsistent: missing or broken bitmap '{name}' for disk '{target}'"),
    )
}

/// A new (non-redefine) checkpoint of a domain that is not running.
pub(super) fn inactive() -> BackendError {
    BackendError::with_code(
        K::Unsupported,
        code::OPERATION_UNSUPPORTED,
        "Operation not supported: cannot create checkpoint for inactive domain",
    )
}

/// A real delete on a shut-off domain (libvirt's code is
/// `VIR_ERR_OPERATION_UNSUPPORTED`; the backend says `NotRunning`).
pub(super) fn cannot_delete_inactive() -> BackendError {
    BackendError::with_code(
        K::NotRunning,
        code::OPERATION_UNSUPPORTED,
        "Operation not supported: cannot delete checkpoint for inactive domain",
    )
}

/// A new (non-redefine) checkpoint whose name is taken.
pub(super) fn bitmap_exists(name: &str) -> BackendError {
    BackendError::with_code(
        K::Other,
        code::INTERNAL_ERROR,
        format!("internal error: bitmap '{name}' already exists"),
    )
}
