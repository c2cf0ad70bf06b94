//! libvirt's errors as [`BackendError`]s: [`classify`] turns a libvirt
//! error code (`virErrorNumber`) and the subsystem that raised it
//! (`virErrorDomain`) into the [`BackendErrorKind`](crate::backend::BackendErrorKind)
//! the engine branches on; the raw code stays in [`BackendError::code`] and
//! libvirt's message in [`BackendError::message`].

use virt::sys;

use crate::backend::{BackendError, BackendErrorKind as K};

/// A libvirt error as a [`BackendError`].
pub(super) fn error(e: &virt::error::Error) -> BackendError {
    let code = e.code().to_raw() as i32;
    let from = e.domain().to_raw() as i32;
    BackendError {
        kind: classify(code, from, e.message()),
        code,
        message: e.message().to_string(),
    }
}

/// The kind of a libvirt error, from its code (`virErrorNumber`), the
/// subsystem that raised it (`virErrorDomain`) and, as a last resort for a
/// broken connection, its message.
pub fn classify(code: i32, from: i32, message: &str) -> K {
    let code = code as u32;
    let from = from as u32;
    let rpc = from == sys::VIR_FROM_RPC || from == sys::VIR_FROM_REMOTE;
    match code {
        sys::VIR_ERR_NO_CONNECT | sys::VIR_ERR_INVALID_CONN => K::ConnectionLost,
        sys::VIR_ERR_SYSTEM_ERROR | sys::VIR_ERR_INTERNAL_ERROR | sys::VIR_ERR_RPC if rpc => {
            K::ConnectionLost
        }
        sys::VIR_ERR_SYSTEM_ERROR if message.contains("End of file while reading data") => {
            K::ConnectionLost
        }
        // virCheckFlags: a driver that lacks a flag (the test driver and
        // REDEFINE_VALIDATE) says so with VIR_ERR_INVALID_ARG.
        sys::VIR_ERR_INVALID_ARG if message.starts_with("unsupported flags") => K::Unsupported,
        sys::VIR_ERR_INVALID_ARG
        | sys::VIR_ERR_XML_ERROR
        | sys::VIR_ERR_XML_DETAIL
        | sys::VIR_ERR_XML_INVALID_SCHEMA
        | sys::VIR_ERR_CONFIG_UNSUPPORTED => K::InvalidArgument,
        sys::VIR_ERR_NO_DOMAIN_CHECKPOINT => K::NoCheckpoint,
        sys::VIR_ERR_NO_DOMAIN => K::NoDomain,
        sys::VIR_ERR_OPERATION_INVALID => K::NotRunning,
        sys::VIR_ERR_CHECKPOINT_INCONSISTENT => K::Inconsistent,
        sys::VIR_ERR_NO_SUPPORT
        | sys::VIR_ERR_ARGUMENT_UNSUPPORTED
        | sys::VIR_ERR_OPERATION_UNSUPPORTED => K::Unsupported,
        _ => K::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_the_codes_the_engine_branches_on() {
        let c = |code: u32, from: u32, msg: &str| classify(code as i32, from as i32, msg);
        let conf = sys::VIR_FROM_DOMAIN_CHECKPOINT;
        assert_eq!(
            c(
                8,
                conf,
                "invalid argument: parent c1 for moment c2 not found"
            ),
            K::InvalidArgument
        );
        assert_eq!(
            c(sys::VIR_ERR_XML_ERROR, sys::VIR_FROM_XML, ""),
            K::InvalidArgument
        );
        assert_eq!(
            c(sys::VIR_ERR_XML_INVALID_SCHEMA, sys::VIR_FROM_XML, ""),
            K::InvalidArgument
        );
        assert_eq!(c(103, sys::VIR_FROM_QEMU, ""), K::NoCheckpoint);
        assert_eq!(c(42, sys::VIR_FROM_QEMU, ""), K::NoDomain);
        assert_eq!(
            c(55, sys::VIR_FROM_QEMU, "domain is not running"),
            K::NotRunning
        );
        assert_eq!(c(109, sys::VIR_FROM_QEMU, ""), K::Inconsistent);
        assert_eq!(
            c(sys::VIR_ERR_NO_SUPPORT, sys::VIR_FROM_TEST, ""),
            K::Unsupported
        );
        assert_eq!(
            c(sys::VIR_ERR_ARGUMENT_UNSUPPORTED, sys::VIR_FROM_TEST, ""),
            K::Unsupported
        );
        let flags = "unsupported flags (0x4) in function testDomainCheckpointCreateXML";
        assert_eq!(
            c(sys::VIR_ERR_INVALID_ARG, sys::VIR_FROM_TEST, flags),
            K::Unsupported
        );
        assert_eq!(
            c(
                38,
                sys::VIR_FROM_RPC,
                "End of file while reading data: Input/output error"
            ),
            K::ConnectionLost
        );
        assert_eq!(
            c(
                1,
                sys::VIR_FROM_RPC,
                "internal error: client socket is closed"
            ),
            K::ConnectionLost
        );
        assert_eq!(
            c(38, sys::VIR_FROM_NONE, "End of file while reading data"),
            K::ConnectionLost
        );
        // A system error inside the daemon (say, writing a metadata file) is
        // not a lost connection.
        assert_eq!(c(38, sys::VIR_FROM_QEMU, "cannot write file"), K::Other);
        assert_eq!(
            c(sys::VIR_ERR_OPERATION_FAILED, sys::VIR_FROM_QEMU, ""),
            K::Other
        );
    }
}
