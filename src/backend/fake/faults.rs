//! Fault injection, the seams of the `testing` feature: which operation a
//! fault strikes ([`Op`]), when ([`Phase`]) and from which call on
//! ([`Fault`]); the call counters; a simulated refusal of one definition;
//! planted crash leftovers. Every [`Backend`](crate::backend::Backend)
//! call of the fake but the leftover ones goes through
//! [`FakeBackend::call`], which counts it and strikes the fault due.

use std::collections::HashMap;

use super::errors::code;
use super::{FakeBackend, State};
use crate::backend::{BackendError, BackendErrorKind as K};
#[cfg(feature = "testing")]
use crate::chain::CheckpointDef;

/// Which backend operation a fault or a counter refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// [`Backend::list`](crate::backend::Backend::list)
    List,
    /// [`Backend::redefine`](crate::backend::Backend::redefine)
    Redefine,
    /// [`Backend::delete`](crate::backend::Backend::delete)
    Delete,
    /// [`Backend::purge`](crate::backend::Backend::purge)
    Purge,
    /// [`Backend::domain_info`](crate::backend::Backend::domain_info)
    DomainInfo,
}

/// When an injected fault strikes relative to the call's effect.
// Without the `testing` feature nothing injects a fault: every call still
// looks for one (and finds none), so the variants are matched, never built.
#[cfg_attr(not(feature = "testing"), allow(dead_code))]
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

/// The armed faults, each with the matching calls it has seen, and the
/// call counters.
#[derive(Debug, Default)]
pub(super) struct Faults {
    armed: Vec<(Fault, u64)>,
    calls: HashMap<Op, u64>,
}

impl Faults {
    /// Count the call and return the fault that strikes it, if any.
    fn enter(&mut self, op: Op) -> Option<(Phase, K)> {
        *self.calls.entry(op).or_default() += 1;
        for (f, seen) in &mut self.armed {
            if f.op.is_none_or(|o| o == op) {
                *seen += 1;
                if *seen == f.nth || (f.forever && *seen > f.nth) {
                    return Some((f.phase, f.kind));
                }
            }
        }
        None
    }
}

impl FakeBackend {
    /// Run one call of `op` on the state: counted, and failed before or
    /// after its effect when a fault strikes it.
    pub(super) fn call<T>(
        &self,
        op: Op,
        f: impl FnOnce(&mut State) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut st = self.lock();
        match st.faults.enter(op) {
            None => f(&mut st),
            Some((Phase::BeforeEffect, kind)) => Err(fault_error(kind)),
            Some((Phase::AfterEffect, kind)) => {
                let _ = f(&mut st);
                Err(fault_error(kind))
            }
        }
    }
}

/// The error an injected fault returns (a lost connection as libvirt's).
fn fault_error(kind: K) -> BackendError {
    match kind {
        K::ConnectionLost => BackendError::with_code(
            kind,
            code::SYSTEM_ERROR,
            "End of file while reading data: Input/output error (injected)",
        ),
        _ => BackendError::new(kind, "injected fault"),
    }
}

/// The seams: public only with the `testing` feature.
#[cfg(feature = "testing")]
impl FakeBackend {
    /// Leave a crash leftover for checkpoint `name`, as a daemon killed
    /// while rewriting its metadata does: `content` is what a restart
    /// would load (`None`: the file was cut short); `stale`: it is older
    /// than the running daemon (otherwise it may be being written now).
    pub fn plant_leftover(
        &self,
        domain: &str,
        name: &str,
        content: Option<CheckpointDef>,
        stale: bool,
    ) {
        if let Some(d) = self.lock().domain(domain) {
            d.leftovers.insert(name.to_string(), (content, stale));
        }
    }

    /// Make every redefine of exactly this definition fail with
    /// `InvalidArgument`, as libvirt refuses a definition it finds invalid.
    pub fn refuse_def(&self, domain: &str, def: &CheckpointDef) {
        if let Some(d) = self.lock().domain(domain) {
            d.refused.push(def.clone());
        }
    }

    /// Inject a fault; faults are checked in the order they were added.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.armed.push((fault, 0));
    }

    /// Remove every injected fault (the daemon is back).
    pub fn clear_faults(&self) {
        self.lock().faults.armed.clear();
    }

    /// How many calls of `op` were made (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.lock().faults.calls.get(&op).copied().unwrap_or(0)
    }

    /// Reset the call counters.
    pub fn reset_calls(&self) {
        self.lock().faults.calls.clear();
    }
}
