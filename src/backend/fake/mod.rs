//! An in-memory backend that behaves like libvirt's qemu driver, written as
//! the specification of the behaviour the store relies on, with fault
//! injection for simulation tests.
//!
//! What it does like libvirt 11.3 (each line is covered by the conformance
//! suite, `tests/daemon/conformance.rs`, that also runs against real libvirt), with
//! libvirt's error codes and messages:
//! - the redefine XML is checked first as libvirt's schema does (names,
//!   disk targets, a non-empty `<disks>` when there is one, an unsigned
//!   `creationTime`): `InvalidArgument`, code 92; XML that is not
//!   well-formed is code 35; then a missing `<name>` is `InvalidArgument`,
//!   code 27, and a missing `creationTime` `Other`, code 1;
//! - a checkpoint with no `<disks>` is accepted and has no disks;
//! - a `<domain>` inside the XML must carry the domain's UUID
//!   (`InvalidArgument`, checked after the parent); libvirt's alignment of
//!   the checkpoint's disks to that embedded domain is not modelled (the
//!   store never sends one);
//! - redefine needs the parent to exist: `InvalidArgument`, "parent P for
//!   moment N not found"; a self-parent or a cycle is `InvalidArgument` too,
//!   the cycle message naming the ancestor whose parent is N;
//! - redefining an existing name replaces its definition (any parent, any
//!   creation time) and keeps its children;
//! - an empty `<description>` is no description; line ends are normalised
//!   as an XML parser does; other whitespace is kept;
//! - disk names are not checked against the domain's disks;
//! - delete (metadata only) re-parents the children to the deleted one's
//!   parent; an unknown name is `NoCheckpoint`;
//! - purge (libvirt's real delete) is delete plus the removal of the
//!   checkpoint's bitmap from each of its disks' images; an unknown name is
//!   `NoCheckpoint`, then a shut-off domain is refused ("cannot delete
//!   checkpoint for inactive domain", `NotRunning`);
//! - the hidden *current* checkpoint: a redefined checkpoint becomes current
//!   when its parent is current or there is none (a replaced current one
//!   stays current); deleting the current one makes its parent current;
//!   [`FakeBackend::create`] (a real, non-redefine checkpoint) takes the
//!   current one as parent, and needs a running domain (`Unsupported`);
//!   after a daemon restart ([`FakeBackend::restart`]) the current one is
//!   the leaf when the checkpoints form one line from one root, and there
//!   is none when they branch or have several roots;
//! - `validate` runs after the parent checks, needs a running domain
//!   (`NotRunning`) and, on every disk the domain has, a bitmap named after
//!   the checkpoint (`Inconsistent`); disks the domain lacks are skipped;
//! - [`Backend::bitmap_states`] (libvirt's `VIR_DOMAIN_CHECKPOINT_XML_SIZE`)
//!   makes the same check on every disk instead of stopping at the first
//!   bad one, and needs a running domain; [`Backend::checkpoint_xml`]
//!   returns the XML a checkpoint was last redefined with, as given (one
//!   the fake made itself is rendered);
//! - listing is libvirt's topological order: depth first from the roots,
//!   siblings most recently (re)defined first; a delete moves the children
//!   to the front of their new parent's list, in their order;
//! - crash leftovers (`NAME.xml.new`, as a daemon killed while rewriting a
//!   checkpoint's metadata leaves them; planted by the `testing` seam
//!   `FakeBackend::plant_leftover`):
//!   a restart loads every readable one — a checkpoint libvirt no longer
//!   has comes back, one it has gets the leftover's definition (the worse
//!   of the two orders libvirt's directory may give) — and keeps the file;
//!   a delete leaves it; a redefine of its checkpoint consumes it (libvirt's
//!   rewrites of the checkpoint that stops or starts being current, which
//!   consume that one's leftover too, are not modelled). The fake reads its
//!   leftovers like a local daemon's ([`Backend::leftovers`]), and removes
//!   only stale ones.
//!
//! The code map: `model.rs` (a domain's checkpoints, sibling lists, listing
//! order and hidden current checkpoint; what each call and a restart do to
//! them; its crash leftovers), `schema.rs` (the redefine document checked
//! as libvirt's schema does, element by element), `errors.rs` (libvirt's
//! codes and messages), `faults.rs` (fault injection and call counters:
//! the seams of the `testing` feature); this file holds [`FakeBackend`],
//! its set-up methods and its [`Backend`] implementation.

mod errors;
mod faults;
mod model;
mod schema;

use std::sync::{Mutex, MutexGuard};

pub use faults::Op;
#[cfg(feature = "testing")]
pub use faults::{Fault, Phase};

use super::{Backend, BackendError, DiskBitmap, DomainInfo, Leftover, LeftoverScan};
use crate::chain::CheckpointDef;
use faults::Faults;
use model::FakeDomain;
use schema::read_redefine_xml;

/// Everything the fake's daemon holds, behind one lock.
#[derive(Debug, Default)]
struct State {
    domains: Vec<FakeDomain>,
    faults: Faults,
}

impl State {
    /// The domain named `domain` (a name or a UUID), if defined.
    fn domain(&mut self, domain: &str) -> Option<&mut FakeDomain> {
        self.domains.iter_mut().find(|d| d.is(domain))
    }

    /// The domain named `domain`, or libvirt's `NoDomain`.
    fn find(&mut self, domain: &str) -> Result<&mut FakeDomain, BackendError> {
        self.domain(domain).ok_or_else(|| errors::no_domain(domain))
    }
}

/// The in-memory backend. Cheap to create; share it by reference.
#[derive(Debug, Default)]
pub struct FakeBackend {
    state: Mutex<State>,
}

impl FakeBackend {
    /// An empty backend with no domains.
    pub fn new() -> Self {
        Self::default()
    }

    /// Define a domain with disks (target names) whose images are
    /// `/fake/<domain>/<target>.qcow2`.
    pub fn define_domain(&self, name: &str, uuid: &str, targets: &[&str], running: bool) {
        let mut st = self.lock();
        st.domains.retain(|d| d.name != name);
        st.domains
            .push(FakeDomain::new(name, uuid, targets, running));
    }

    /// Remove a domain and its checkpoint metadata.
    pub fn undefine_domain(&self, name: &str) {
        self.lock().domains.retain(|d| d.name != name);
    }

    /// Start or stop a domain (checkpoint metadata and bitmaps stay).
    pub fn set_running(&self, domain: &str, running: bool) {
        if let Some(d) = self.lock().domain(domain) {
            d.running = running;
        }
    }

    /// Add a bitmap to a disk's image (what `qemu-img bitmap --add` does).
    pub fn add_bitmap(&self, domain: &str, target: &str, bitmap: &str) {
        if let Some(d) = self.lock().domain(domain) {
            d.bitmaps
                .entry(target.into())
                .or_default()
                .insert(bitmap.into());
        }
    }

    /// Remove a bitmap from a disk's image (what `qemu-img bitmap --remove`
    /// does).
    pub fn remove_bitmap(&self, domain: &str, target: &str, bitmap: &str) {
        if let Some(d) = self.lock().domain(domain) {
            if let Some(set) = d.bitmaps.get_mut(target) {
                set.remove(bitmap);
            }
        }
    }

    /// Another process opens (`true`) or closes a disk's image, as
    /// `qemu-nbd` or `qemu-io` would: it holds QEMU's image lock.
    pub fn hold_image(&self, domain: &str, target: &str, held: bool) {
        if let Some(d) = self.lock().domain(domain) {
            if held {
                d.held.insert(target.into());
            } else {
                d.held.remove(target);
            }
        }
    }

    /// Whether a process holds a disk's image open: the domain runs (its
    /// QEMU has it open) or another process holds it
    /// ([`FakeBackend::hold_image`]). `qemu-img` cannot write it then.
    pub fn image_in_use(&self, domain: &str, target: &str) -> bool {
        self.lock()
            .domain(domain)
            .is_some_and(|d| d.running || d.held.contains(target))
    }

    /// The bitmaps in a disk's image, by name (what `qemu-img info` lists).
    pub fn bitmaps(&self, domain: &str, target: &str) -> Vec<String> {
        self.lock()
            .domain(domain)
            .and_then(|d| d.bitmaps.get(target).cloned())
            .map(|set| set.into_iter().collect())
            .unwrap_or_default()
    }

    /// Create a new (non-redefine) checkpoint with bitmaps on every disk, as
    /// a backup does: its parent is the current checkpoint, and it becomes
    /// current. Returns the parent it got.
    ///
    /// # Errors
    ///
    /// `NoDomain`; `Unsupported` when the domain is not running (like
    /// libvirt: "cannot create checkpoint for inactive domain");
    /// `InvalidArgument` for a bad name; `Other` for a taken one.
    pub fn create(
        &self,
        domain: &str,
        name: &str,
        creation_time: i64,
    ) -> Result<Option<String>, BackendError> {
        self.lock().find(domain)?.create(name, creation_time)
    }

    /// The hidden current checkpoint (no libvirt API reads it; tests of the
    /// fake may).
    pub fn current(&self, domain: &str) -> Option<String> {
        self.lock().domain(domain).and_then(|d| d.current.clone())
    }

    /// Restart the daemon: load every readable crash leftover (which
    /// stays, now older than the daemon), then recompute the current
    /// checkpoint as libvirt does: the leaf of a single line, or none.
    pub fn restart(&self) {
        for d in &mut self.lock().domains {
            d.restart();
        }
    }

    /// The domain's checkpoints, parents first, read without counting a
    /// call or striking a fault (for test assertions).
    pub fn peek(&self, domain: &str) -> Vec<CheckpointDef> {
        self.lock()
            .domain(domain)
            .map(|d| d.listing())
            .unwrap_or_default()
    }

    /// Replace a domain's checkpoints directly (test set-up), current = the
    /// newest leaf. Siblings list in the order given.
    pub fn set_checkpoints(&self, domain: &str, defs: Vec<CheckpointDef>) {
        if let Some(d) = self.lock().domain(domain) {
            d.replace_all(defs);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock (a simulated crash) leaves the
        // state as libvirt would: whatever was applied stays applied.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Backend for FakeBackend {
    fn list(&self, domain: &str) -> Result<Vec<CheckpointDef>, BackendError> {
        self.call(Op::List, |st| Ok(st.find(domain)?.listing()))
    }

    fn redefine(&self, domain: &str, xml: &str, validate: bool) -> Result<(), BackendError> {
        self.call(Op::Redefine, |st| {
            let d = st.find(domain)?;
            let (def, embedded_uuid) = read_redefine_xml(xml)?;
            d.redefine(def, embedded_uuid.as_deref(), validate, xml)
        })
    }

    fn delete(&self, domain: &str, name: &str) -> Result<(), BackendError> {
        self.call(Op::Delete, |st| st.find(domain)?.delete(name))
    }

    fn purge(&self, domain: &str, name: &str) -> Result<(), BackendError> {
        self.call(Op::Purge, |st| st.find(domain)?.purge(name))
    }

    fn domain_info(&self, domain: &str) -> Result<DomainInfo, BackendError> {
        self.call(Op::DomainInfo, |st| Ok(st.find(domain)?.info()))
    }

    fn describe(&self) -> String {
        "fake".into()
    }

    fn checkpoint_xml(&self, domain: &str, name: &str) -> Result<String, BackendError> {
        self.lock().find(domain)?.checkpoint_xml(name)
    }

    fn bitmap_states(
        &self,
        domain: &str,
        checkpoint: &str,
    ) -> Result<Vec<DiskBitmap>, BackendError> {
        self.lock().find(domain)?.bitmap_states(checkpoint)
    }

    fn checks_bitmaps(&self) -> Result<bool, BackendError> {
        Ok(true)
    }

    fn leftovers(&self, domain: &str) -> Result<LeftoverScan, BackendError> {
        Ok(self.lock().find(domain)?.leftovers())
    }

    fn remove_leftover(&self, domain: &str, leftover: &Leftover) -> Result<(), BackendError> {
        self.lock().find(domain)?.remove_leftover(leftover)
    }
}
