//! An in-memory backend that behaves like libvirt's qemu driver, written as
//! the specification of the behaviour the store relies on, with fault
//! injection for simulation tests.
//!
//! What it does like libvirt 11.3 (each line is covered by the conformance
//! suite, `tests/conformance.rs`, that also runs against real libvirt), with
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
//! - listing is libvirt's topological order: depth first from the roots,
//!   siblings most recently (re)defined first; a delete moves the children
//!   to the front of their new parent's list, in their order;
//! - crash leftovers ([`FakeBackend::plant_leftover`], `NAME.xml.new`, as a
//!   daemon killed while rewriting a checkpoint's metadata leaves them):
//!   a restart loads every readable one — a checkpoint libvirt no longer
//!   has comes back, one it has gets the leftover's definition (the worse
//!   of the two orders libvirt's directory may give) — and keeps the file;
//!   a delete leaves it; a redefine of its checkpoint consumes it (libvirt's
//!   rewrites of the checkpoint that stops or starts being current, which
//!   consume that one's leftover too, are not modelled). The fake reads its
//!   leftovers like a local daemon's ([`Backend::leftovers`]), and removes
//!   only stale ones.

mod faults;
mod model;
mod schema;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use super::{
    Backend, BackendError, BackendErrorKind as K, DomainDisk, DomainInfo, Leftover, LeftoverScan,
};
use crate::chain::{is_valid_checkpoint_name, CheckpointDef};
use crate::xml::parse_checkpoint;
#[cfg(feature = "testing")]
pub use faults::Phase;
pub use faults::{Fault, Op};
use model::{current_after_restart, FakeDomain};
use schema::{check_redefine_xml, normalise_line_ends, schema_error};

/// libvirt's error codes the fake reproduces.
mod code {
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

#[derive(Debug, Default)]
struct State {
    domains: Vec<FakeDomain>,
    faults: Vec<(Fault, u64)>,
    calls: HashMap<Op, u64>,
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
        st.domains.push(FakeDomain {
            name: name.into(),
            uuid: uuid.into(),
            running,
            disks: targets
                .iter()
                .map(|t| DomainDisk {
                    target: (*t).into(),
                    format: Some("qcow2".into()),
                    source: Some(format!("/fake/{name}/{t}.qcow2").into()),
                    backing: Vec::new(),
                })
                .collect(),
            bitmaps: targets
                .iter()
                .map(|t| ((*t).to_string(), BTreeSet::new()))
                .collect(),
            ..FakeDomain::default()
        });
    }

    /// Remove a domain and its checkpoint metadata.
    pub fn undefine_domain(&self, name: &str) {
        self.lock().domains.retain(|d| d.name != name);
    }

    /// Start or stop a domain (checkpoint metadata and bitmaps stay).
    pub fn set_running(&self, domain: &str, running: bool) {
        if let Some(d) = self.lock().domains.iter_mut().find(|d| d.is(domain)) {
            d.running = running;
        }
    }

    /// Add a bitmap to a disk's image (what `qemu-img bitmap --add` does).
    pub fn add_bitmap(&self, domain: &str, target: &str, bitmap: &str) {
        let mut st = self.lock();
        if let Some(d) = st.domains.iter_mut().find(|d| d.is(domain)) {
            d.bitmaps
                .entry(target.into())
                .or_default()
                .insert(bitmap.into());
        }
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
        let mut st = self.lock();
        let d = find(&mut st, domain)?;
        if !d.running {
            return Err(BackendError::with_code(
                K::Unsupported,
                code::OPERATION_UNSUPPORTED,
                "Operation not supported: cannot create checkpoint for inactive domain",
            ));
        }
        if !is_valid_checkpoint_name(name) {
            return Err(schema_error());
        }
        if d.checkpoints.contains_key(name) {
            return Err(BackendError::with_code(
                K::Other,
                code::INTERNAL_ERROR,
                format!("internal error: bitmap '{name}' already exists"),
            ));
        }
        let parent = d.current.clone();
        let disks: BTreeMap<String, String> = d
            .disks
            .iter()
            .map(|k| (k.target.clone(), name.to_string()))
            .collect();
        for t in disks.keys() {
            d.bitmaps.entry(t.clone()).or_default().insert(name.into());
        }
        d.checkpoints.insert(
            name.into(),
            CheckpointDef {
                name: name.into(),
                parent: parent.clone(),
                creation_time,
                description: None,
                disks,
            },
        );
        d.link(name, parent.clone());
        d.current = Some(name.into());
        Ok(parent)
    }

    /// The hidden current checkpoint (no libvirt API reads it; tests of the
    /// fake may).
    pub fn current(&self, domain: &str) -> Option<String> {
        self.lock()
            .domains
            .iter()
            .find(|d| d.is(domain))
            .and_then(|d| d.current.clone())
    }

    /// Restart the daemon: load every readable crash leftover (which
    /// stays, now older than the daemon), then recompute the current
    /// checkpoint as libvirt does: the leaf of a single line, or none.
    pub fn restart(&self) {
        let mut st = self.lock();
        for d in &mut st.domains {
            let loaded: Vec<CheckpointDef> = d
                .leftovers
                .values()
                .filter_map(|(c, _)| c.clone())
                .collect();
            for def in loaded {
                let name = def.name.clone();
                let parent = def.parent.clone().filter(|p| d.checkpoints.contains_key(p));
                if let Some(old) = d.checkpoints.insert(name.clone(), def) {
                    d.unlink(&name, old.parent);
                }
                d.link(&name, parent);
            }
            for l in d.leftovers.values_mut() {
                l.1 = true;
            }
            let defs: Vec<CheckpointDef> = d.checkpoints.values().cloned().collect();
            d.current = current_after_restart(&defs);
        }
    }

    /// The domain's checkpoints, parents first, read without counting a
    /// call or striking a fault (for test assertions).
    pub fn peek(&self, domain: &str) -> Vec<CheckpointDef> {
        self.lock()
            .domains
            .iter()
            .find(|d| d.is(domain))
            .map(FakeDomain::listing)
            .unwrap_or_default()
    }

    /// Replace a domain's checkpoints directly (test set-up), current = the
    /// newest leaf. Siblings list in the order given.
    pub fn set_checkpoints(&self, domain: &str, defs: Vec<CheckpointDef>) {
        let mut st = self.lock();
        if let Some(d) = st.domains.iter_mut().find(|d| d.is(domain)) {
            d.replace_all(defs);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock (a simulated crash) leaves the
        // state as libvirt would: whatever was applied stays applied.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn find<'a>(st: &'a mut State, domain: &str) -> Result<&'a mut FakeDomain, BackendError> {
    st.domains.iter_mut().find(|d| d.is(domain)).ok_or_else(|| {
        BackendError::with_code(
            K::NoDomain,
            code::NO_DOMAIN,
            format!("Domain not found: no domain with matching name '{domain}'"),
        )
    })
}

fn invalid(message: String) -> BackendError {
    BackendError::with_code(K::InvalidArgument, code::INVALID_ARG, message)
}

impl Backend for FakeBackend {
    fn list(&self, domain: &str) -> Result<Vec<CheckpointDef>, BackendError> {
        self.call(Op::List, |st| Ok(find(st, domain)?.listing()))
    }

    fn redefine(&self, domain: &str, xml: &str, validate: bool) -> Result<(), BackendError> {
        self.call(Op::Redefine, |st| {
            let d = find(st, domain)?;
            let xml = normalise_line_ends(xml);
            let embedded_uuid = check_redefine_xml(&xml)?;
            let mut def = parse_checkpoint(&xml)
                .map_err(|e| BackendError::with_code(K::InvalidArgument, code::XML_ERROR, format!("XML error: {e}")))?;
            // libvirt reads an empty description as none.
            if def.description.as_deref() == Some("") {
                def.description = None;
            }
            if d.refused.contains(&def) {
                return Err(invalid(format!("invalid argument: checkpoint {} refused (simulated)", def.name)));
            }
            if let Some(p) = &def.parent {
                if *p == def.name {
                    return Err(invalid(format!("invalid argument: cannot set moment {p} as its own parent")));
                }
                let Some(mut other) = d.checkpoints.get(p) else {
                    return Err(invalid(format!("invalid argument: parent {p} for moment {} not found", def.name)));
                };
                // A cycle: walking up from the new parent reaches this one.
                while let Some(up) = &other.parent {
                    if *up == def.name {
                        return Err(invalid(format!(
                            "invalid argument: parent {} would create cycle to {}",
                            other.name, def.name
                        )));
                    }
                    match d.checkpoints.get(up) {
                        Some(o) => other = o,
                        None => break,
                    }
                }
            }
            if let Some(u) = embedded_uuid {
                let same = matches!(
                    (uuid::Uuid::parse_str(&u), uuid::Uuid::parse_str(&d.uuid)),
                    (Ok(a), Ok(b)) if a == b
                );
                if !same {
                    return Err(invalid(format!(
                        "invalid argument: definition for checkpoint {} must use uuid {}",
                        def.name, d.uuid
                    )));
                }
            }
            if validate {
                if !d.running {
                    return Err(BackendError::with_code(
                        K::NotRunning,
                        code::OPERATION_INVALID,
                        "Requested operation is not valid: domain is not running",
                    ));
                }
                // libvirt checks the bitmap named after the checkpoint, on
                // the disks the domain has (a detached disk is tolerated).
                for target in def.disks.keys() {
                    let Some(present) = d.bitmaps.get(target) else { continue };
                    if !present.contains(&def.name) {
                        return Err(BackendError::with_code(
                            K::Inconsistent,
                            code::CHECKPOINT_INCONSISTENT,
                            format!(
                                "checkpoint inconsistent: missing or broken bitmap '{}' for disk '{target}'",
                                def.name
                            ),
                        ));
                    }
                }
            }
            let becomes_current = d.current.is_none() || def.parent.is_some() && def.parent == d.current;
            let name = def.name.clone();
            // libvirt's rewrite of NAME.xml goes through NAME.xml.new.
            d.leftovers.remove(&name);
            let parent = def.parent.clone();
            if let Some(old) = d.checkpoints.insert(name.clone(), def) {
                d.unlink(&name, old.parent);
            }
            d.link(&name, parent);
            if becomes_current {
                d.current = Some(name);
            }
            Ok(())
        })
    }

    fn delete(&self, domain: &str, name: &str) -> Result<(), BackendError> {
        self.call(Op::Delete, |st| {
            let d = find(st, domain)?;
            let Some(gone) = d.checkpoints.remove(name) else {
                return Err(BackendError::with_code(
                    K::NoCheckpoint,
                    code::NO_DOMAIN_CHECKPOINT,
                    format!("Domain checkpoint not found: no domain checkpoint with matching name '{name}'"),
                ));
            };
            d.unlink(name, gone.parent.clone());
            let orphans = d.children.remove(&Some(name.to_string())).unwrap_or_default();
            for c in &orphans {
                if let Some(child) = d.checkpoints.get_mut(c) {
                    child.parent = gone.parent.clone();
                }
            }
            let siblings = d.children.entry(gone.parent.clone()).or_default();
            siblings.splice(0..0, orphans);
            if d.current.as_deref() == Some(name) {
                d.current = gone.parent;
            }
            Ok(())
        })
    }

    fn domain_info(&self, domain: &str) -> Result<DomainInfo, BackendError> {
        self.call(Op::DomainInfo, |st| {
            let d = find(st, domain)?;
            Ok(DomainInfo {
                name: d.name.clone(),
                uuid: d.uuid.clone(),
                running: d.running,
                disks: d.disks.clone(),
            })
        })
    }

    fn describe(&self) -> String {
        "fake".into()
    }

    fn leftovers(&self, domain: &str) -> Result<LeftoverScan, BackendError> {
        let mut st = self.lock();
        let d = find(&mut st, domain)?;
        Ok(LeftoverScan::Checked(
            d.leftovers
                .iter()
                .map(|(name, (content, stale))| Leftover {
                    checkpoint: name.clone(),
                    path: leftover_path(&d.name, name),
                    content: content.clone(),
                    modified: std::time::SystemTime::UNIX_EPOCH,
                    stale: *stale,
                })
                .collect(),
        ))
    }

    fn remove_leftover(&self, domain: &str, leftover: &Leftover) -> Result<(), BackendError> {
        let mut st = self.lock();
        let d = find(&mut st, domain)?;
        let name = &leftover.checkpoint;
        let refuse = |why: &str| {
            Err(BackendError::new(
                K::Other,
                format!("{}: {why}", leftover.path.display()),
            ))
        };
        if leftover.path != leftover_path(&d.name, name) {
            return refuse("not a leftover of this domain");
        }
        if d.checkpoints.contains_key(name) {
            return refuse("libvirt lists its checkpoint: redefine it instead");
        }
        match d.leftovers.get(name) {
            None => Ok(()),
            Some((_, false)) => refuse("may be being written now: left alone"),
            Some(_) => {
                d.leftovers.remove(name);
                Ok(())
            }
        }
    }
}

/// Where the fake says a leftover lives.
fn leftover_path(domain: &str, name: &str) -> std::path::PathBuf {
    format!("/fake/{domain}/checkpoint/{name}.xml.new").into()
}
