//! Checkpoints that appear in libvirt after a transaction began: a backup
//! made one while the transaction ran, or between a crash and its
//! recovery. Every phase (apply, rollback, recover's resume or rollback)
//! keeps them as libvirt has them and reports them as foreign; none is
//! ever deleted silently.

use std::borrow::Cow;
use std::collections::HashSet;

use tracing::warn;

use super::reapply::{add_extras, Extra, Reconciled};
use super::txn::Txn;
use crate::chain::CheckpointDef;

impl Txn<'_> {
    pub(super) fn known_from(
        before: &[CheckpointDef],
        target: &[CheckpointDef],
    ) -> HashSet<String> {
        before
            .iter()
            .chain(target)
            .map(|d| d.name.clone())
            .collect()
    }

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

/// The goal of a transaction's phase once libvirt lists checkpoints the
/// transaction did not know when it began — neither in its before-image
/// nor in its target (`known`): a backup made one while it ran, or between
/// a crash and its recovery. They stay as libvirt has them, each hung off
/// its nearest ancestor the goal keeps (as libvirt re-parents), and are
/// returned by name to be reported as foreign: never deleted silently.
pub(super) fn with_arrivals<'g>(
    goal: &'g [CheckpointDef],
    listing: &[CheckpointDef],
    known: &HashSet<String>,
) -> (Cow<'g, [CheckpointDef]>, Vec<String>) {
    if listing.iter().all(|d| known.contains(&d.name)) {
        return (Cow::Borrowed(goal), Vec::new());
    }
    let mut out = Reconciled {
        target: goal.to_vec(),
        ..Reconciled::default()
    };
    let held = listing.iter().map(|d| (d.name.as_str(), d)).collect();
    add_extras(&mut out, listing, &held, |d| {
        if known.contains(&d.name) {
            Extra::Drop
        } else {
            Extra::Keep
        }
    });
    (Cow::Owned(out.target), out.foreign)
}

/// libvirt's listing without the checkpoints a transaction did not know,
/// and the newest of those (by creation time).
pub(super) fn without_arrivals<'l>(
    listing: &'l [CheckpointDef],
    known: &HashSet<String>,
) -> (Cow<'l, [CheckpointDef]>, Option<String>) {
    let newest = listing
        .iter()
        .filter(|d| !known.contains(&d.name))
        .max_by_key(|d| d.creation_time)
        .map(|d| d.name.clone());
    if newest.is_none() {
        return (Cow::Borrowed(listing), None);
    }
    let ours = listing
        .iter()
        .filter(|d| known.contains(&d.name))
        .cloned()
        .collect();
    (Cow::Owned(ours), newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, parent: Option<&str>, t: i64) -> CheckpointDef {
        CheckpointDef {
            name: name.into(),
            parent: parent.map(Into::into),
            creation_time: t,
            description: None,
            disks: [("vda".to_string(), name.to_string())].into(),
        }
    }

    fn names(defs: &[CheckpointDef]) -> Vec<&str> {
        defs.iter().map(|d| d.name.as_str()).collect()
    }

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
        let known: HashSet<String> = ["a", "b", "c"].map(String::from).into();
        let (now, arrived) = with_arrivals(&goal, &listing, &known);
        assert_eq!(arrived, ["n"]);
        assert_eq!(names(&now), ["a", "b", "n"]);
        assert_eq!(now[2].parent.as_deref(), Some("b"));
        // Nothing new: the goal itself, not a copy.
        let (same, none) = with_arrivals(&goal, &listing[..3], &known);
        assert!(matches!(same, Cow::Borrowed(_)) && none.is_empty());
    }
}
