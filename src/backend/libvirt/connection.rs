//! The backend's one libvirt connection: opened lazily, kept in a mutex,
//! and used through a reference-counted clone so the lock is never held
//! across a libvirt call. A call that reports a lost connection drops it;
//! the next call opens a new one to the same URI. Domains are looked up by
//! UUID or name.

use std::sync::MutexGuard;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;

use super::errors::error;
use super::ffi;
use super::uri::{redact_uri, scrub};
use super::LibvirtBackend;
use crate::backend::{BackendError, BackendErrorKind as K};

impl LibvirtBackend {
    fn slot(&self) -> MutexGuard<'_, Option<Connect>> {
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The live connection, opened (again) when there is none or the one
    /// held has been closed by the other side.
    pub(super) fn connection(&self) -> Result<Connect, BackendError> {
        let mut slot = self.slot();
        if let Some(c) = slot.as_ref() {
            if c.is_alive().unwrap_or(false) {
                return Ok(c.clone());
            }
        }
        *slot = None;
        let c = Connect::open(Some(&self.uri)).map_err(|e| {
            let mut err = error(&e);
            err.kind = K::Unreachable;
            err.message = format!(
                "cannot connect to {}: {}",
                redact_uri(&self.uri),
                scrub(&err.message, &self.uri)
            );
            err
        })?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Drop the held connection if it is still `used` (another thread may
    /// have replaced it already).
    pub(super) fn forget(&self, used: &Connect) {
        let mut slot = self.slot();
        if slot.as_ref().is_some_and(|c| ffi::same_connection(c, used)) {
            *slot = None;
        }
    }

    /// Run `f` on the domain named `domain` (a UUID or a name), mapping
    /// libvirt's errors and noticing lost connections.
    pub(super) fn on_domain<T>(
        &self,
        domain: &str,
        f: impl FnOnce(&Domain) -> Result<T, virt::error::Error>,
    ) -> Result<T, BackendError> {
        let conn = self.connection()?;
        let result = lookup_domain(&conn, domain).and_then(|dom| f(&dom));
        result.map_err(|e| {
            let err = error(&e);
            if err.kind == K::ConnectionLost {
                self.forget(&conn);
            }
            err
        })
    }
}

/// Look a domain up by UUID (when the string is one) or by name.
fn lookup_domain(conn: &Connect, domain: &str) -> Result<Domain, virt::error::Error> {
    if uuid::Uuid::parse_str(domain).is_ok() {
        match conn.lookup_domain_by_uuid_string(domain) {
            Ok(d) => return Ok(d),
            // A name may look like a UUID; fall back to the name.
            Err(e) if e.code().to_raw() as i32 == sys::VIR_ERR_NO_DOMAIN as i32 => {}
            Err(e) => return Err(e),
        }
    }
    conn.lookup_domain_by_name(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_errors_carry_no_credentials() {
        let e = LibvirtBackend::connect("xyz://admin:hunter2@/?password=s3cret").unwrap_err();
        assert_eq!(e.kind, K::Unreachable);
        assert!(
            !e.message.contains("hunter2") && !e.message.contains("s3cret"),
            "{}",
            e.message
        );
    }

    #[test]
    fn unreachable_when_nothing_listens() {
        let e = LibvirtBackend::connect("qemu+unix:///system?socket=/nonexistent/ckptstore.sock")
            .unwrap_err();
        assert_eq!(e.kind, K::Unreachable);
        assert_ne!(e.code, 0);
    }
}
