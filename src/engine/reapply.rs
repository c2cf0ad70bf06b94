//! A re-apply (`sync --domain`) next to the tools that make checkpoints:
//! what it keeps of libvirt's checkpoints that the committed chain does
//! not know.
//!
//! The committed chain is always a little stale: every backup makes a
//! checkpoint the journal never saw. So a re-apply, listing libvirt under
//! the domain's lock, reconciles before it plans:
//!
//! - **superseded**: libvirt holds a committed checkpoint's name with a
//!   *newer* creation time. A tool reused the name for a new checkpoint
//!   (virtnbdbackup's new chain restarts at `.0`). libvirt's is kept as it
//!   is, and the committed checkpoints below the old one are dropped: the
//!   parent they named is gone, and so are their bitmaps.
//! - **adopted**: a checkpoint libvirt has that descends from the
//!   committed leaf (a backup made since), each disk's bitmap named after
//!   it. It stays as libvirt has it and joins the committed chain.
//! - **foreign**: any other checkpoint libvirt has. It stays as libvirt
//!   has it (hung off its nearest kept ancestor when the re-apply drops its
//!   parent, as libvirt itself re-parents); it is reported and never
//!   deleted.
//!
//! `sync --chain` does none of this: it makes libvirt exactly the chain.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

use crate::chain::{leaf_of, Chain, Checkpoint, CheckpointDef};

/// What a re-apply aims at, and what it kept of libvirt's own.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Reconciled {
    /// The target: the committed chain with libvirt's kept checkpoints,
    /// parent first.
    pub(super) target: Vec<CheckpointDef>,
    /// Checkpoints after the committed leaf, joining the chain.
    pub(super) adopted: Vec<CheckpointDef>,
    /// Other checkpoints of libvirt's, kept as they are.
    pub(super) foreign: Vec<String>,
    /// Committed checkpoints libvirt replaced by a newer one of the same
    /// name, each with the committed checkpoints dropped below it.
    pub(super) superseded: Vec<(String, Vec<String>)>,
}

/// What becomes of a checkpoint libvirt has and the target lacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Extra {
    /// It joins the chain.
    Adopt,
    /// It stays as libvirt has it, reported as foreign.
    Keep,
    /// It goes (`--prune-foreign`, or a scoped chain's own).
    Drop,
}

/// The rules of a reconcile: the chain's scope, and whether foreign
/// checkpoints in it are pruned.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Rules<'a> {
    pub(super) scope: Option<&'a str>,
    pub(super) prune_foreign: bool,
}

impl Rules<'_> {
    fn in_scope(&self, name: &str) -> bool {
        self.scope.is_none_or(|s| name.starts_with(s))
    }
}

/// Reconcile the committed definitions (parent first) with libvirt's
/// listing (topological, as libvirt lists).
#[cfg(test)]
pub(super) fn reconcile(committed: Vec<CheckpointDef>, current: &[CheckpointDef]) -> Reconciled {
    reconcile_with(committed, current, Rules::default())
}

/// [`reconcile`] under `rules`.
pub(super) fn reconcile_with(
    committed: Vec<CheckpointDef>,
    current: &[CheckpointDef],
    rules: Rules<'_>,
) -> Reconciled {
    let held: HashMap<&str, &CheckpointDef> =
        current.iter().map(|d| (d.name.as_str(), d)).collect();
    let leaf = leaf_of(&committed).map(|d| d.name.clone());
    let mut out = Reconciled::default();
    // Committed checkpoints dropped, by the superseded one above them.
    let mut below: HashMap<String, String> = HashMap::new();
    let mut replaced: HashSet<String> = HashSet::new();
    for def in committed {
        let above = def.parent.as_ref().and_then(|p| {
            below
                .get(p)
                .cloned()
                .or_else(|| replaced.contains(p).then(|| p.clone()))
        });
        if let Some(top) = above {
            below.insert(def.name.clone(), top);
            continue;
        }
        match held.get(def.name.as_str()) {
            Some(newer) if newer.creation_time > def.creation_time => {
                replaced.insert(def.name.clone());
                out.foreign.push(def.name.clone());
                out.target.push((*newer).clone());
            }
            _ => out.target.push(def),
        }
    }
    for name in &out.foreign {
        let dropped: Vec<String> = below
            .iter()
            .filter(|(_, top)| *top == name)
            .map(|(n, _)| n.clone())
            .collect();
        let mut dropped = dropped;
        dropped.sort();
        out.superseded.push((name.clone(), dropped));
    }
    let leaf = leaf.filter(|l| !below.contains_key(l) && !replaced.contains(l));
    add_extras(&mut out, current, &held, |def| {
        if !rules.in_scope(&def.name) {
            Extra::Keep
        } else if leaf
            .as_deref()
            .is_some_and(|l| descends_from(def, l, &held))
            && def.disks.values().all(|b| *b == def.name)
        {
            Extra::Adopt
        } else if rules.prune_foreign {
            Extra::Drop
        } else {
            Extra::Keep
        }
    });
    out
}

/// Add libvirt's checkpoints the target lacks (in libvirt's order), each
/// as `decide` says; a kept one hangs off its nearest kept ancestor, as
/// libvirt re-parents the children of a checkpoint whose metadata is
/// deleted.
pub(super) fn add_extras(
    out: &mut Reconciled,
    current: &[CheckpointDef],
    held: &HashMap<&str, &CheckpointDef>,
    decide: impl Fn(&CheckpointDef) -> Extra,
) {
    let mut kept: HashSet<String> = out.target.iter().map(|d| d.name.clone()).collect();
    for h in current {
        if kept.contains(&h.name) {
            continue;
        }
        let what = decide(h);
        if what == Extra::Drop {
            continue;
        }
        let mut def = h.clone();
        while let Some(p) = def.parent.clone().filter(|p| !kept.contains(p)) {
            def.parent = held.get(p.as_str()).and_then(|d| d.parent.clone());
        }
        kept.insert(def.name.clone());
        if what == Extra::Adopt {
            out.adopted.push(def.clone());
        } else {
            out.foreign.push(def.name.clone());
        }
        out.target.push(def);
    }
}

/// What a transaction aims at once libvirt's own checkpoints are
/// reconciled: the target, the chain to record, the checkpoints kept as
/// libvirt has them (not judged by the bitmap check), and the report's
/// lists and warnings.
#[derive(Debug, Default)]
pub(super) struct Goal<'a> {
    pub(super) target: Vec<CheckpointDef>,
    /// The chain to journal: the one given, borrowed (a long chain is
    /// megabytes), or a copy that gained the adopted checkpoints.
    pub(super) chain: Option<Cow<'a, Chain>>,
    pub(super) keep: HashSet<String>,
    pub(super) adopted: Vec<String>,
    pub(super) foreign: Vec<String>,
    pub(super) warnings: Vec<String>,
}

/// The goal of a transaction: a re-apply (`reapply`) reconciles with
/// libvirt's listing `current`; a sync of a chain aims at it exactly.
pub(super) fn goal<'a>(
    reapply: bool,
    target: Vec<CheckpointDef>,
    chain: Option<&'a Chain>,
    current: &[CheckpointDef],
    prune_foreign: bool,
) -> Goal<'a> {
    let scope = chain
        .and_then(|c| c.scope.as_deref())
        .filter(|s| !s.is_empty());
    if !reapply {
        // A chain makes libvirt exactly itself, within its scope.
        let Some(scope) = scope else {
            return Goal {
                target,
                chain: chain.map(Cow::Borrowed),
                ..Goal::default()
            };
        };
        let mut out = Reconciled {
            target,
            ..Reconciled::default()
        };
        let held = current.iter().map(|d| (d.name.as_str(), d)).collect();
        add_extras(&mut out, current, &held, |d| {
            if d.name.starts_with(scope) {
                Extra::Drop
            } else {
                Extra::Keep
            }
        });
        return Goal {
            keep: out.foreign.iter().cloned().collect(),
            foreign: out.foreign,
            target: out.target,
            chain: chain.map(Cow::Borrowed),
            ..Goal::default()
        };
    }
    let r = reconcile_with(
        target,
        current,
        Rules {
            scope,
            prune_foreign,
        },
    );
    let mut warnings = Vec::new();
    for (name, dropped) in &r.superseded {
        let below = if dropped.is_empty() {
            String::new()
        } else {
            format!(
                "; the committed checkpoints below the old one are dropped: {}",
                dropped.join(", ")
            )
        };
        warnings.push(format!(
            "checkpoint {name} in libvirt is newer than the committed one of that name: kept as libvirt has it{below}"
        ));
    }
    Goal {
        chain: chain.map(|c| {
            if r.adopted.is_empty() {
                Cow::Borrowed(c)
            } else {
                Cow::Owned(with_defs(c, &r.adopted))
            }
        }),
        keep: r.foreign.iter().cloned().collect(),
        adopted: r.adopted.iter().map(|d| d.name.clone()).collect(),
        foreign: r.foreign,
        target: r.target,
        warnings,
    }
}

/// Whether `def` descends from the checkpoint `ancestor` in libvirt.
fn descends_from(
    def: &CheckpointDef,
    ancestor: &str,
    held: &HashMap<&str, &CheckpointDef>,
) -> bool {
    let mut seen = HashSet::new();
    let mut up = def.parent.as_deref();
    while let Some(p) = up {
        if p == ancestor {
            return true;
        }
        if !seen.insert(p) {
            return false;
        }
        up = held.get(p).and_then(|d| d.parent.as_deref());
    }
    false
}

/// The chain with these definitions added as checkpoints (each disk by the
/// chain's id for its target, or the target's name for a disk the map
/// lacks; a definition whose creation time a chain cannot hold is left
/// out): the adopted ones of a re-apply, or an imported chain's whole.
pub(super) fn with_defs(chain: &Chain, adopted: &[CheckpointDef]) -> Chain {
    let mut c = chain.clone();
    let ids: HashMap<String, String> = c
        .disks
        .iter()
        .map(|(id, t)| (t.clone(), id.clone()))
        .collect();
    for d in adopted {
        let Some(created) = chrono::DateTime::from_timestamp(d.creation_time, 0) else {
            continue;
        };
        let disks = d
            .disks
            .keys()
            .map(|t| match ids.get(t) {
                Some(id) => id.clone(),
                None => {
                    c.disks.insert(t.clone(), t.clone());
                    t.clone()
                }
            })
            .collect();
        c.checkpoints.push(Checkpoint {
            id: d.name.clone(),
            parent: d.parent.clone(),
            created,
            description: d.description.clone(),
            disks,
        });
    }
    c
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A checkpoint on one disk, `vda`, whose bitmap is its name.
    pub(in crate::engine) fn def(name: &str, parent: Option<&str>, t: i64) -> CheckpointDef {
        CheckpointDef {
            name: name.into(),
            parent: parent.map(Into::into),
            creation_time: t,
            description: None,
            disks: [("vda".to_string(), name.to_string())].into(),
        }
    }

    /// The names, in order.
    pub(in crate::engine) fn names(defs: &[CheckpointDef]) -> Vec<&str> {
        defs.iter().map(|d| d.name.as_str()).collect()
    }

    #[test]
    fn a_backup_after_the_committed_leaf_is_adopted() {
        let committed = vec![def("v.0", None, 1), def("v.1", Some("v.0"), 2)];
        let current = vec![
            def("v.0", None, 1),
            def("v.1", Some("v.0"), 2),
            def("v.2", Some("v.1"), 3),
        ];
        let r = reconcile(committed, &current);
        assert_eq!(names(&r.target), ["v.0", "v.1", "v.2"]);
        assert_eq!(names(&r.adopted), ["v.2"]);
        assert!(r.foreign.is_empty() && r.superseded.is_empty());
    }

    #[test]
    fn a_new_chain_supersedes_the_old_and_drops_what_hung_off_it() {
        let committed = vec![
            def("v.0", None, 1),
            def("v.1", Some("v.0"), 2),
            def("v.2", Some("v.1"), 3),
        ];
        let current = vec![def("v.0", None, 10)];
        let r = reconcile(committed, &current);
        assert_eq!(r.target, current);
        assert_eq!(r.foreign, ["v.0"]);
        assert_eq!(
            r.superseded,
            vec![(
                "v.0".to_string(),
                vec!["v.1".to_string(), "v.2".to_string()]
            )]
        );
        assert!(r.adopted.is_empty());
    }

    #[test]
    fn other_checkpoints_are_kept_as_foreign() {
        let committed = vec![def("a", None, 1), def("b", Some("a"), 2)];
        // Another tool's checkpoints: one under a, one root of its own.
        let current = vec![def("a", None, 1), def("x", Some("a"), 5), def("y", None, 6)];
        let r = reconcile(committed, &current);
        assert_eq!(names(&r.target), ["a", "b", "x", "y"]);
        assert_eq!(r.foreign, ["x", "y"]);
        assert!(r.adopted.is_empty());
    }

    #[test]
    fn prune_drops_foreign_in_scope_and_keeps_the_rest() {
        let committed = vec![def("o-a", None, 1), def("o-b", Some("o-a"), 2)];
        let current = vec![
            def("o-a", None, 1),
            def("o-b", Some("o-a"), 2),
            def("o-c", Some("o-b"), 3), // after the leaf: adopted
            def("o-x", Some("o-a"), 4), // in scope, not after the leaf
            def("t-1", None, 5),        // another tool's: out of scope
        ];
        let rules = Rules {
            scope: Some("o-"),
            prune_foreign: true,
        };
        let r = reconcile_with(committed, &current, rules);
        assert_eq!(names(&r.target), ["o-a", "o-b", "o-c", "t-1"]);
        assert_eq!(names(&r.adopted), ["o-c"]);
        assert_eq!(r.foreign, ["t-1"]);
        // Without prune, o-x stays too.
        let committed = vec![def("o-a", None, 1), def("o-b", Some("o-a"), 2)];
        let r = reconcile_with(
            committed,
            &current,
            Rules {
                scope: Some("o-"),
                prune_foreign: false,
            },
        );
        assert_eq!(r.foreign, ["o-x", "t-1"]);
    }

    #[test]
    fn lost_metadata_is_simply_the_committed_chain() {
        let committed = vec![def("a", None, 1), def("b", Some("a"), 2)];
        let r = reconcile(committed.clone(), &[]);
        assert_eq!(r.target, committed);
        assert_eq!(
            r,
            Reconciled {
                target: committed,
                ..Reconciled::default()
            }
        );
    }
}
