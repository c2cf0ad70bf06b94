//! Checkpoints that appear in libvirt after a transaction began: a backup
//! made one while the transaction ran, or between a crash and its
//! recovery. Every phase (apply, rollback, recover's resume or rollback)
//! keeps them as libvirt has them and reports them as foreign; none is
//! ever deleted silently.
//!
//! A newcomer is a checkpoint whose name the transaction never held — or
//! one that reuses a name it held with a *newer* creation time than any
//! content the transaction knows for it (virtnbdbackup's new chain restarts
//! at `.0`, after deleting the old checkpoints and their bitmaps for real).
//! The goal's checkpoints below such a reused name are dropped: the parent
//! they named is gone, and so are their bitmaps (as a re-apply drops them,
//! `engine/reapply.rs`).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use tracing::warn;

use super::reapply::{add_extras, with_defs, Extra, Reconciled};
use super::txn::Txn;
use crate::chain::{Chain, CheckpointDef};

/// The chain that describes what a transaction applied, when newcomers
/// made it differ from its target: the chain's header (vm id, disks, scope)
/// with the applied checkpoints within its scope, so that the committed
/// chain, and `export`, show what libvirt holds. `None` for a transaction
/// that had no chain (an import keeps definitions only).
pub(super) fn applied_chain(chain: Option<&Chain>, applied: &[CheckpointDef]) -> Option<Chain> {
    let c = chain?;
    let scope = c.scope.as_deref().filter(|s| !s.is_empty());
    let header = Chain {
        vm_id: c.vm_id,
        domain: c.domain.clone(),
        scope: c.scope.clone(),
        disks: c.disks.clone(),
        checkpoints: Vec::new(),
    };
    let ours: Vec<CheckpointDef> = applied
        .iter()
        .filter(|d| scope.is_none_or(|s| d.name.starts_with(s)))
        .cloned()
        .collect();
    Some(with_defs(&header, &ours))
}

/// What a transaction knows: each checkpoint name of its before-image and
/// target, with the newest creation time it knows under that name.
#[derive(Debug, Default)]
pub(super) struct Known(HashMap<String, i64>);

impl Known {
    pub(super) fn of(before: &[CheckpointDef], target: &[CheckpointDef]) -> Known {
        let mut k: HashMap<String, i64> = HashMap::with_capacity(before.len() + target.len());
        for d in before.iter().chain(target) {
            let t = k.entry(d.name.clone()).or_insert(d.creation_time);
            *t = (*t).max(d.creation_time);
        }
        Known(k)
    }

    /// Did `d` appear after the transaction began?
    pub(super) fn is_new(&self, d: &CheckpointDef) -> bool {
        self.0.get(&d.name).is_none_or(|t| d.creation_time > *t)
    }

    fn has(&self, name: &str) -> bool {
        self.0.contains_key(name)
    }
}

impl Txn<'_> {
    /// The goal of this round: `goal` with what appeared in `listing` since
    /// the transaction began, each newcomer noted once with a warning.
    pub(super) fn goal_now<'g>(
        &mut self,
        goal: &'g [CheckpointDef],
        listing: &[CheckpointDef],
    ) -> Cow<'g, [CheckpointDef]> {
        let (now, arrived) = with_arrivals(goal, listing, &self.known);
        for name in arrived {
            if !self.arrived.contains(&name) {
                warn!(checkpoint = %name, "a checkpoint appeared after the transaction began; kept");
                self.warnings.push(format!(
                    "checkpoint {name} appeared after transaction {} began (a backup?): kept as libvirt has it (foreign)",
                    self.id
                ));
                self.arrived.push(name);
            }
        }
        now
    }
}

/// The goal of a transaction's phase once libvirt lists checkpoints that
/// appeared after it began ([`Known::is_new`]). They stay as libvirt has
/// them, each hung off its nearest ancestor the goal keeps (as libvirt
/// re-parents); the goal's checkpoints below a reused name are dropped.
/// The newcomers are returned by name, to be reported as foreign.
pub(super) fn with_arrivals<'g>(
    goal: &'g [CheckpointDef],
    listing: &[CheckpointDef],
    known: &Known,
) -> (Cow<'g, [CheckpointDef]>, Vec<String>) {
    if !listing.iter().any(|d| known.is_new(d)) {
        return (Cow::Borrowed(goal), Vec::new());
    }
    let held: HashMap<&str, &CheckpointDef> =
        listing.iter().map(|d| (d.name.as_str(), d)).collect();
    let mut out = Reconciled::default();
    // Names whose goal descendants are dropped: reused names, and what
    // hung off them.
    let mut cut: HashSet<&str> = HashSet::new();
    for def in goal {
        if def.parent.as_deref().is_some_and(|p| cut.contains(p)) {
            cut.insert(&def.name);
            continue;
        }
        match held.get(def.name.as_str()) {
            Some(newer) if known.is_new(newer) => {
                cut.insert(&def.name);
                out.foreign.push(def.name.clone());
                out.target.push((*newer).clone());
            }
            _ => out.target.push(def.clone()),
        }
    }
    // A kept reused name hangs off its nearest ancestor the goal keeps.
    let kept: HashSet<String> = out.target.iter().map(|d| d.name.clone()).collect();
    for d in &mut out.target {
        if out.foreign.contains(&d.name) {
            while let Some(p) = d.parent.clone().filter(|p| !kept.contains(p)) {
                d.parent = held.get(p.as_str()).and_then(|h| h.parent.clone());
            }
        }
    }
    add_extras(&mut out, listing, &held, |d| {
        if known.has(&d.name) && !known.is_new(d) {
            Extra::Drop
        } else {
            Extra::Keep
        }
    });
    (Cow::Owned(out.target), out.foreign)
}

/// libvirt's listing without the checkpoints that appeared after the
/// transaction began, and the newest of those (by creation time).
pub(super) fn without_arrivals<'l>(
    listing: &'l [CheckpointDef],
    known: &Known,
) -> (Cow<'l, [CheckpointDef]>, Option<String>) {
    let newest = listing
        .iter()
        .filter(|d| known.is_new(d))
        .max_by_key(|d| d.creation_time)
        .map(|d| d.name.clone());
    if newest.is_none() {
        return (Cow::Borrowed(listing), None);
    }
    let ours = listing
        .iter()
        .filter(|d| !known.is_new(d))
        .cloned()
        .collect();
    (Cow::Owned(ours), newest)
}

#[cfg(test)]
mod tests {
    use super::super::reapply::tests::{def, names};
    use super::*;

    #[test]
    fn a_checkpoint_made_after_a_transaction_began_stays_under_its_nearest_kept_ancestor() {
        // The transaction knew a, b, c and deletes c; a backup then made n
        // under c.
        let goal = vec![def("a", None, 1), def("b", Some("a"), 2)];
        let listing = vec![
            def("a", None, 1),
            def("b", Some("a"), 2),
            def("c", Some("b"), 3),
            def("n", Some("c"), 9),
        ];
        let known = Known::of(&listing[..3], &goal);
        let (now, arrived) = with_arrivals(&goal, &listing, &known);
        assert_eq!(arrived, ["n"]);
        assert_eq!(names(&now), ["a", "b", "n"]);
        assert_eq!(now[2].parent.as_deref(), Some("b"));
        // Nothing new: the goal itself, not a copy.
        let (same, none) = with_arrivals(&goal, &listing[..3], &known);
        assert!(matches!(same, Cow::Borrowed(_)) && none.is_empty());
    }

    #[test]
    fn a_name_reused_with_a_newer_time_is_kept_and_what_hung_off_it_dropped() {
        // The transaction redefines v.0 <- v.1 <- v.2; meanwhile the backup
        // tool started a new chain: v.0 again, newer, alone.
        let goal = vec![
            def("v.0", None, 1),
            def("v.1", Some("v.0"), 2),
            def("v.2", Some("v.1"), 3),
        ];
        let listing = vec![def("v.0", None, 50)];
        let known = Known::of(&[], &goal);
        let (now, arrived) = with_arrivals(&goal, &listing, &known);
        assert_eq!(arrived, ["v.0"]);
        assert_eq!(now.as_ref(), listing.as_slice());
        // A rollback that restores an older content of a name it redefined
        // newer is not fooled: both contents are the transaction's own.
        let before = vec![def("v.0", None, 1)];
        let target = vec![def("v.0", None, 7)];
        let known = Known::of(&before, &target);
        let (now, arrived) = with_arrivals(&before, &target, &known);
        assert!(arrived.is_empty() && matches!(now, Cow::Borrowed(_)));
    }
}
