//! The real backend: libvirt through the `virt` crate, with the checkpoint
//! calls `virt` lacks in a small private `ffi` wrapper (the crate's only `unsafe`).
//!
//! The code map: `connection.rs` (the one connection per backend, opened
//! lazily and again after a loss, never locked across a call; domain
//! lookup by UUID or name), `errors.rs` (libvirt's error codes as
//! [`BackendErrorKind`](super::BackendErrorKind)s: `classify`; the raw code
//! stays in [`BackendError::code`] and libvirt's message in
//! [`BackendError::message`]), `uri.rs` (URIs and libvirt's messages
//! without credentials: [`redact_uri`], `scrub`), `ffi.rs` (the
//! `virDomainCheckpoint*` calls `virt` lacks: the crate's only `unsafe`),
//! `state.rs` (the local daemon's checkpoint metadata folder, read for
//! libvirt's crash leftovers); this file holds [`LibvirtBackend`] and its
//! [`Backend`] implementation.

mod connection;
mod errors;
#[allow(unsafe_code)]
mod ffi;
mod state;
mod uri;

use std::sync::Mutex;

use virt::connect::Connect;
use virt::sys;

pub use uri::redact_uri;

use super::{
    Backend, BackendError, BackendErrorKind as K, BitmapState, DiskBitmap, DomainInfo, Leftover,
    LeftoverScan,
};
use crate::chain::CheckpointDef;
use crate::xml::{parse_checkpoint, parse_disk_sizes, parse_domain};

/// A [`Backend`] over a libvirt connection (`qemu:///system`,
/// `qemu+ssh://host/system`, `test:///default`, ...).
///
/// # Examples
///
/// ```
/// use ckptstore::{Backend, LibvirtBackend};
///
/// // test:///default is libvirt's in-process test driver, with one
/// // running domain called "test".
/// let backend = LibvirtBackend::connect("test:///default").unwrap();
/// assert!(backend.domain_info("test").unwrap().running);
/// assert_eq!(backend.describe(), "libvirt test:///default");
/// ```
#[derive(Debug)]
pub struct LibvirtBackend {
    uri: String,
    conn: Mutex<Option<Connect>>,
}

impl LibvirtBackend {
    /// A backend for `uri` that connects on its first call.
    pub fn new(uri: &str) -> Self {
        // libvirt's default error handler prints every error to stderr; the
        // store reports errors itself.
        virt::error::clear_error_callback();
        LibvirtBackend {
            uri: uri.to_string(),
            conn: Mutex::new(None),
        }
    }

    /// A backend for `uri`, connected now.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::Unreachable`](super::BackendErrorKind::Unreachable)
    /// when libvirt cannot be reached at that URI.
    pub fn connect(uri: &str) -> Result<Self, BackendError> {
        let backend = Self::new(uri);
        backend.connection()?;
        Ok(backend)
    }

    /// Create a new checkpoint (not a redefine) from `xml`, as a backup
    /// does: libvirt adds a bitmap to every named disk of the running
    /// domain and makes the hidden current checkpoint its parent. Returns
    /// the checkpoint as libvirt then describes it. Mostly for tests.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::Unsupported`](super::BackendErrorKind::Unsupported)
    /// when the domain is not running ("cannot create checkpoint for
    /// inactive domain"), [`BackendErrorKind::InvalidArgument`](super::BackendErrorKind::InvalidArgument)
    /// for XML libvirt refuses, connection errors.
    pub fn create_checkpoint(
        &self,
        domain: &str,
        xml: &str,
    ) -> Result<CheckpointDef, BackendError> {
        let xml = self.on_domain(domain, |dom| {
            ffi::create_xml(dom, xml, 0)?.xml_desc(ffi::XML_NO_DOMAIN)
        })?;
        parse(&xml)
    }

    /// One checkpoint, looked up by name.
    ///
    /// # Errors
    ///
    /// [`BackendErrorKind::NoCheckpoint`](super::BackendErrorKind::NoCheckpoint)
    /// when there is none of that name, [`BackendErrorKind::NoDomain`](super::BackendErrorKind::NoDomain),
    /// connection errors.
    pub fn checkpoint(&self, domain: &str, name: &str) -> Result<CheckpointDef, BackendError> {
        let xml = self.on_domain(domain, |dom| {
            ffi::lookup_by_name(dom, name)?.xml_desc(ffi::XML_NO_DOMAIN)
        })?;
        parse(&xml)
    }
}

fn parse(xml: &str) -> Result<CheckpointDef, BackendError> {
    parse_checkpoint(xml).map_err(|e| {
        BackendError::new(
            K::Other,
            format!("libvirt returned unreadable checkpoint XML: {e}"),
        )
    })
}

impl LibvirtBackend {
    /// The connection's driver (`QEMU`, `Test`, ...).
    fn driver(&self) -> Result<String, BackendError> {
        let conn = self.connection()?;
        conn.driver_type().map_err(|e| {
            let err = errors::error(&e);
            if err.kind == K::ConnectionLost {
                self.forget(&conn);
            }
            err
        })
    }
}

fn unreadable(e: crate::xml::XmlError) -> BackendError {
    BackendError::new(K::Other, format!("libvirt returned unreadable XML: {e}"))
}

impl Backend for LibvirtBackend {
    fn list(&self, domain: &str) -> Result<Vec<CheckpointDef>, BackendError> {
        // Each XML is parsed as it arrives: 10,000 checkpoints' XML is
        // megabytes, never all held next to their definitions.
        let defs: Vec<Result<CheckpointDef, BackendError>> = self.on_domain(domain, |dom| {
            ffi::list_all(dom, ffi::LIST_TOPOLOGICAL)?
                .iter()
                .map(|c| c.xml_desc(ffi::XML_NO_DOMAIN).map(|x| parse(&x)))
                .collect()
        })?;
        defs.into_iter().collect()
    }

    fn redefine(&self, domain: &str, xml: &str, validate: bool) -> Result<(), BackendError> {
        let mut flags = ffi::CREATE_REDEFINE;
        if validate {
            flags |= ffi::CREATE_REDEFINE_VALIDATE;
        }
        self.on_domain(domain, |dom| ffi::create_xml(dom, xml, flags).map(drop))
    }

    fn delete(&self, domain: &str, name: &str) -> Result<(), BackendError> {
        self.on_domain(domain, |dom| {
            ffi::lookup_by_name(dom, name)?.delete(ffi::DELETE_METADATA_ONLY)
        })
    }

    /// `virDomainCheckpointDelete` with no flag: metadata and bitmaps.
    /// libvirt refuses a shut-off domain with `VIR_ERR_OPERATION_UNSUPPORTED`
    /// ("cannot delete checkpoint for inactive domain"), after the lookup:
    /// that refusal is [`K::NotRunning`].
    fn purge(&self, domain: &str, name: &str) -> Result<(), BackendError> {
        self.on_domain(domain, |dom| ffi::lookup_by_name(dom, name)?.delete(0))
            .map_err(|mut e| {
                if e.kind == K::Unsupported && e.message.contains("for inactive domain") {
                    e.kind = K::NotRunning;
                }
                e
            })
    }

    /// `virDomainCheckpointGetXMLDesc` with no flag: the full XML,
    /// `<domain>` included when libvirt stores one.
    fn checkpoint_xml(&self, domain: &str, name: &str) -> Result<String, BackendError> {
        self.on_domain(domain, |dom| ffi::lookup_by_name(dom, name)?.xml_desc(0))
    }

    /// The checkpoint's XML with `VIR_DOMAIN_CHECKPOINT_XML_SIZE`: libvirt
    /// runs `qemuBlockBitmapChainIsValid` on every bitmap disk the domain
    /// has and gives a `size` to those that pass. It merges each good
    /// bitmap into a temporary, non-persistent one in QEMU
    /// (`libvirt-tmp-size-xml`) to count it, and removes it before it
    /// answers; libvirt's metadata is not written.
    fn bitmap_states(
        &self,
        domain: &str,
        checkpoint: &str,
    ) -> Result<Vec<DiskBitmap>, BackendError> {
        // Other drivers take the flag and size nothing (the test driver):
        // only the qemu driver's sizes are its bitmap check.
        let driver = self.driver()?;
        if driver != "QEMU" {
            return Err(BackendError::new(
                K::Unsupported,
                format!("libvirt's {driver} driver does not check bitmaps per disk"),
            ));
        }
        let (xml, domain_xml) = self.on_domain(domain, |dom| {
            let xml = ffi::lookup_by_name(dom, checkpoint)?
                .xml_desc(ffi::XML_NO_DOMAIN | ffi::XML_SIZE)?;
            Ok((xml, dom.xml_desc(0)?))
        })?;
        let def = parse(&xml)?;
        let sizes = parse_disk_sizes(&xml).map_err(unreadable)?;
        let info = parse_domain(&domain_xml, true).map_err(unreadable)?;
        Ok(def
            .disks
            .keys()
            .filter(|t| info.has_target(t))
            .map(|t| DiskBitmap {
                target: t.clone(),
                state: match sizes.get(t) {
                    Some(&dirty_bytes) => BitmapState::Usable { dirty_bytes },
                    None => BitmapState::Unusable,
                },
            })
            .collect())
    }

    /// The qemu driver checks bitmaps; the test driver refuses
    /// `REDEFINE_VALIDATE`.
    fn checks_bitmaps(&self) -> Result<bool, BackendError> {
        Ok(self.driver()? == "QEMU")
    }

    fn domain_info(&self, domain: &str) -> Result<DomainInfo, BackendError> {
        let (xml, running) =
            self.on_domain(domain, |dom| Ok((dom.xml_desc(0)?, dom.is_active()?)))?;
        parse_domain(&xml, running).map_err(|e| {
            BackendError::new(
                K::Other,
                format!("libvirt returned unreadable domain XML: {e}"),
            )
        })
    }

    fn describe(&self) -> String {
        format!("libvirt {}", redact_uri(&self.uri))
    }

    /// Read where the local system daemon keeps the domain's checkpoint
    /// files (`/var/lib/libvirt/qemu/checkpoint/<domain name>/`); any other
    /// connection, or a daemon whose files cannot be told apart from
    /// another's, is [`LeftoverScan::CannotCheck`].
    fn leftovers(&self, domain: &str) -> Result<LeftoverScan, BackendError> {
        let daemon = match state::local_daemon(&self.uri) {
            Ok(d) => d,
            Err(why) => return Ok(LeftoverScan::CannotCheck(why)),
        };
        let (name, listed) = self.on_domain(domain, |dom| {
            let listed = ffi::list_all(dom, 0)?
                .iter()
                .map(ffi::Checkpoint::name)
                .collect::<Result<Vec<_>, _>>()?;
            Ok((dom.name()?, listed))
        })?;
        Ok(daemon.scan(&name, &listed))
    }

    fn remove_leftover(&self, domain: &str, leftover: &Leftover) -> Result<(), BackendError> {
        let daemon =
            state::local_daemon(&self.uri).map_err(|why| BackendError::new(K::Unsupported, why))?;
        let (name, listed) = self.on_domain(domain, |dom| {
            let listed = match ffi::lookup_by_name(dom, &leftover.checkpoint) {
                Ok(_) => true,
                Err(e) if e.code().to_raw() as i32 == sys::VIR_ERR_NO_DOMAIN_CHECKPOINT as i32 => {
                    false
                }
                Err(e) => return Err(e),
            };
            Ok((dom.name()?, listed))
        })?;
        if listed {
            return Err(BackendError::new(
                K::Other,
                format!(
                    "libvirt lists checkpoint {}: its leftover {} is repaired by redefining it, not removed",
                    leftover.checkpoint,
                    leftover.path.display()
                ),
            ));
        }
        daemon
            .remove(&name, leftover)
            .map_err(|why| BackendError::new(K::Other, why))
    }
}
