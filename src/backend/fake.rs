//! An in-memory backend that behaves like libvirt's qemu driver, written as
//! the specification of the behaviour the store relies on, with fault
//! injection for simulation tests.
//!
//! What it does like libvirt (each line is covered by the conformance suite
//! that also runs against real libvirt):
//! - redefine needs the parent to exist: `InvalidArgument`, "parent P for
//!   moment N not found"; a self-parent or a cycle is `InvalidArgument` too;
//! - redefining an existing name replaces its definition, in place;
//! - delete (metadata only) re-parents the children to the deleted one's
//!   parent; an unknown name is `NoCheckpoint`;
//! - the hidden *current* checkpoint: a redefined checkpoint becomes current
//!   when its parent is current or there is none; deleting the current one
//!   makes its parent current; [`FakeBackend::create`] (a real, non-redefine
//!   checkpoint) takes the current one as parent;
//! - `validate` needs a running domain (`NotRunning`) and every named bitmap
//!   present in the domain's images (`Inconsistent`);
//! - listing is topological: parents before children.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use super::{Backend, BackendError, BackendErrorKind as K, DomainDisk, DomainInfo};
use crate::chain::{is_valid_checkpoint_name, CheckpointDef};
use crate::xml::parse_checkpoint;

/// Which backend operation a fault or a counter refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// [`Backend::list`]
    List,
    /// [`Backend::redefine`]
    Redefine,
    /// [`Backend::delete`]
    Delete,
    /// [`Backend::domain_info`]
    DomainInfo,
}

/// When an injected fault strikes relative to the call's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The call fails and has no effect.
    BeforeEffect,
    /// The call takes effect, then fails (the caller cannot know).
    AfterEffect,
}

/// An injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Only calls of this operation count and fail (`None`: every call).
    pub op: Option<Op>,
    /// The 1-based number of the matching call that fails first.
    pub nth: u64,
    /// Before or after the effect.
    pub phase: Phase,
    /// The error kind returned.
    pub kind: K,
    /// Keep failing every matching call from the `nth` on.
    pub forever: bool,
}

#[derive(Debug, Clone, Default)]
struct FakeDomain {
    name: String,
    uuid: String,
    running: bool,
    disks: Vec<DomainDisk>,
    /// Bitmap names present in each disk's image, by target.
    bitmaps: BTreeMap<String, BTreeSet<String>>,
    checkpoints: Vec<CheckpointDef>,
    current: Option<String>,
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
            bitmaps: targets.iter().map(|t| ((*t).to_string(), BTreeSet::new())).collect(),
            ..FakeDomain::default()
        });
    }

    /// Remove a domain and its checkpoint metadata.
    pub fn undefine_domain(&self, name: &str) {
        self.lock().domains.retain(|d| d.name != name);
    }

    /// Add a bitmap to a disk's image (what `qemu-img bitmap --add` does).
    pub fn add_bitmap(&self, domain: &str, target: &str, bitmap: &str) {
        let mut st = self.lock();
        if let Some(d) = st.domains.iter_mut().find(|d| d.name == domain) {
            d.bitmaps.entry(target.into()).or_default().insert(bitmap.into());
        }
    }

    /// Create a new (non-redefine) checkpoint with bitmaps on every disk, as
    /// a backup does: its parent is the current checkpoint, and it becomes
    /// current. Returns the parent it got.
    ///
    /// # Errors
    ///
    /// `NoDomain`, `NotRunning` (like libvirt, a real checkpoint needs a
    /// running domain), `InvalidArgument` for a bad or taken name.
    pub fn create(&self, domain: &str, name: &str, creation_time: i64) -> Result<Option<String>, BackendError> {
        let mut st = self.lock();
        let d = find(&mut st, domain)?;
        if !d.running {
            return Err(BackendError::new(K::NotRunning, "Requested operation is not valid: domain is not running"));
        }
        if !is_valid_checkpoint_name(name) || d.checkpoints.iter().any(|c| c.name == name) {
            return Err(BackendError::new(K::InvalidArgument, format!("invalid argument: checkpoint name {name}")));
        }
        let parent = d.current.clone();
        let disks: BTreeMap<String, String> = d.disks.iter().map(|k| (k.target.clone(), name.to_string())).collect();
        for t in disks.keys() {
            d.bitmaps.entry(t.clone()).or_default().insert(name.into());
        }
        d.checkpoints.push(CheckpointDef {
            name: name.into(),
            parent: parent.clone(),
            creation_time,
            description: None,
            disks,
        });
        d.current = Some(name.into());
        Ok(parent)
    }

    /// The hidden current checkpoint (no libvirt API reads it; tests of the
    /// fake may).
    pub fn current(&self, domain: &str) -> Option<String> {
        self.lock().domains.iter().find(|d| d.name == domain).and_then(|d| d.current.clone())
    }

    /// Forget the current checkpoint and recompute it as a daemon restart does.
    pub fn restart(&self) {
        let mut st = self.lock();
        for d in &mut st.domains {
            d.current = recompute_current(&d.checkpoints);
        }
    }

    /// Inject a fault; faults are checked in the order they were added.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push((fault, 0));
    }

    /// Remove every injected fault (the daemon is back).
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// How many calls of `op` were made (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// Reset the call counters.
    pub fn reset_calls(&self) {
        self.lock().calls.clear();
    }

    /// Replace a domain's checkpoints directly (test set-up), current = the
    /// newest leaf.
    pub fn set_checkpoints(&self, domain: &str, defs: Vec<CheckpointDef>) {
        let mut st = self.lock();
        if let Some(d) = st.domains.iter_mut().find(|d| d.name == domain || d.uuid == domain) {
            d.current = recompute_current(&defs);
            d.checkpoints = defs;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock (a simulated crash) leaves the
        // state as libvirt would: whatever was applied stays applied.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count the call and return the fault that strikes it, if any.
    fn enter(st: &mut State, op: Op) -> Option<(Phase, K)> {
        *st.calls.entry(op).or_default() += 1;
        for (f, seen) in &mut st.faults {
            if f.op.map_or(true, |o| o == op) {
                *seen += 1;
                if *seen == f.nth || (f.forever && *seen > f.nth) {
                    return Some((f.phase, f.kind));
                }
            }
        }
        None
    }

    fn call<T>(&self, op: Op, f: impl FnOnce(&mut State) -> Result<T, BackendError>) -> Result<T, BackendError> {
        let mut st = self.lock();
        match Self::enter(&mut st, op) {
            None => f(&mut st),
            Some((Phase::BeforeEffect, kind)) => Err(fault_error(kind)),
            Some((Phase::AfterEffect, kind)) => {
                let _ = f(&mut st);
                Err(fault_error(kind))
            }
        }
    }
}

fn fault_error(kind: K) -> BackendError {
    let msg = match kind {
        K::ConnectionLost => "End of file while reading data: Input/output error (injected)",
        _ => "injected fault",
    };
    BackendError::new(kind, msg)
}

fn find<'a>(st: &'a mut State, domain: &str) -> Result<&'a mut FakeDomain, BackendError> {
    st.domains.iter_mut().find(|d| d.name == domain || d.uuid == domain).ok_or_else(|| {
        BackendError::new(K::NoDomain, format!("Domain not found: no domain with matching name '{domain}'"))
    })
}

fn recompute_current(defs: &[CheckpointDef]) -> Option<String> {
    crate::chain::leaf_of(defs).map(|d| d.name.clone())
}

/// Parents before children; siblings in definition order.
fn topological(defs: &[CheckpointDef]) -> Vec<CheckpointDef> {
    let names: BTreeSet<&str> = defs.iter().map(|d| d.name.as_str()).collect();
    let mut out: Vec<CheckpointDef> = Vec::with_capacity(defs.len());
    let mut placed: BTreeSet<String> = BTreeSet::new();
    let mut frontier: Vec<Option<String>> = vec![None];
    while let Some(p) = frontier.pop() {
        for d in defs.iter().rev() {
            let parent_ok = match (&d.parent, &p) {
                (None, None) => true,
                (Some(dp), Some(pp)) => dp == pp,
                (Some(dp), None) => !names.contains(dp.as_str()),
                (None, Some(_)) => false,
            };
            if parent_ok && !placed.contains(&d.name) {
                placed.insert(d.name.clone());
                out.push(d.clone());
                frontier.push(Some(d.name.clone()));
            }
        }
    }
    out
}

impl Backend for FakeBackend {
    fn list(&self, domain: &str) -> Result<Vec<CheckpointDef>, BackendError> {
        self.call(Op::List, |st| Ok(topological(&find(st, domain)?.checkpoints)))
    }

    fn redefine(&self, domain: &str, xml: &str, validate: bool) -> Result<(), BackendError> {
        self.call(Op::Redefine, |st| {
            let d = find(st, domain)?;
            let def =
                parse_checkpoint(xml).map_err(|e| BackendError::new(K::InvalidArgument, format!("XML error: {e}")))?;
            if !is_valid_checkpoint_name(&def.name) {
                return Err(BackendError::new(
                    K::InvalidArgument,
                    format!("invalid argument: invalid checkpoint name '{}'", def.name),
                ));
            }
            if validate {
                if !d.running {
                    return Err(BackendError::new(
                        K::NotRunning,
                        "Requested operation is not valid: domain is not running",
                    ));
                }
                for (target, bitmap) in &def.disks {
                    let present = d.bitmaps.get(target).is_some_and(|b| b.contains(bitmap));
                    if !present {
                        return Err(BackendError::new(
                            K::Inconsistent,
                            format!("checkpoint inconsistent: missing or broken bitmap '{bitmap}' for disk '{target}'"),
                        ));
                    }
                }
            }
            if let Some(p) = &def.parent {
                if *p == def.name {
                    return Err(BackendError::new(
                        K::InvalidArgument,
                        format!("invalid argument: cannot set moment {p} as its own parent"),
                    ));
                }
                if !d.checkpoints.iter().any(|c| &c.name == p) {
                    return Err(BackendError::new(
                        K::InvalidArgument,
                        format!("invalid argument: parent {p} for moment {} not found", def.name),
                    ));
                }
                // A cycle: the new parent descends from this checkpoint.
                let mut cur = Some(p.clone());
                while let Some(c) = cur {
                    if c == def.name {
                        return Err(BackendError::new(
                            K::InvalidArgument,
                            format!("invalid argument: parent {p} would create cycle to {}", def.name),
                        ));
                    }
                    cur = d.checkpoints.iter().find(|x| x.name == c).and_then(|x| x.parent.clone());
                }
            }
            let becomes_current = d.current.is_none() || def.parent.is_some() && def.parent == d.current;
            let name = def.name.clone();
            match d.checkpoints.iter_mut().find(|c| c.name == def.name) {
                Some(slot) => *slot = def,
                None => d.checkpoints.push(def),
            }
            if becomes_current {
                d.current = Some(name);
            }
            Ok(())
        })
    }

    fn delete(&self, domain: &str, name: &str) -> Result<(), BackendError> {
        self.call(Op::Delete, |st| {
            let d = find(st, domain)?;
            let Some(pos) = d.checkpoints.iter().position(|c| c.name == name) else {
                return Err(BackendError::new(
                    K::NoCheckpoint,
                    format!("Domain checkpoint not found: no domain checkpoint with matching name '{name}'"),
                ));
            };
            let gone = d.checkpoints.remove(pos);
            for c in &mut d.checkpoints {
                if c.parent.as_deref() == Some(name) {
                    c.parent = gone.parent.clone();
                }
            }
            if d.current.as_deref() == Some(name) {
                d.current = gone.parent;
            }
            Ok(())
        })
    }

    fn domain_info(&self, domain: &str) -> Result<DomainInfo, BackendError> {
        self.call(Op::DomainInfo, |st| {
            let d = find(st, domain)?;
            Ok(DomainInfo { name: d.name.clone(), uuid: d.uuid.clone(), running: d.running, disks: d.disks.clone() })
        })
    }

    fn describe(&self) -> String {
        "fake".into()
    }
}
