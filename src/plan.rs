//! The planner: the diff of a target set of checkpoint definitions against
//! libvirt's current ones, as the libvirt calls that turn one into the
//! other, with the before-image of everything they replace or delete.
//!
//! Order matters, because of libvirt's hidden *current* checkpoint (the
//! parent a backup's new checkpoint will get): extras are deleted first,
//! children first, so the current one climbs back onto the chain; then
//! missing or different checkpoints are redefined parent first, which walks
//! the current one down to the chain's leaf. When a deletion may have left
//! the current checkpoint above checkpoints that already match, those are
//! redefined again ("forced" steps, same content) so the walk reaches the
//! leaf. In a tree the path to the leaf is redefined before every other
//! branch: a side branch redefined while its parent on the path is current
//! would take the current checkpoint off the path for good.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::chain::{order_defs, spine_path, CheckpointDef};

/// One planned libvirt call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    /// Delete a checkpoint's metadata; `before` is what libvirt had.
    Delete {
        /// The definition being deleted.
        before: CheckpointDef,
    },
    /// Redefine a checkpoint.
    Redefine {
        /// The definition to write.
        def: CheckpointDef,
        /// What libvirt had under that name, if anything.
        before: Option<CheckpointDef>,
        /// Content already matches; redefined only to move libvirt's current
        /// checkpoint down to the leaf.
        forced: bool,
    },
}

impl Step {
    /// The checkpoint this step concerns.
    pub fn checkpoint(&self) -> &str {
        match self {
            Step::Delete { before } => &before.name,
            Step::Redefine { def, .. } => &def.name,
        }
    }
}

/// The calls that make libvirt equal a target, in execution order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// Deletes (children first), then redefines (parents first).
    pub steps: Vec<Step>,
    /// Target checkpoints libvirt already has, untouched by the plan.
    pub unchanged: Vec<String>,
}

impl Plan {
    /// Nothing to do?
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Names redefined, in order.
    pub fn redefined(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Redefine { .. }))
            .map(|s| s.checkpoint().to_string())
            .collect()
    }

    /// Names deleted, in order.
    pub fn deleted(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Delete { .. }))
            .map(|s| s.checkpoint().to_string())
            .collect()
    }
}

/// Do two sets of definitions hold the same checkpoints with the same
/// content (order ignored)?
pub fn same_content(a: &[CheckpointDef], b: &[CheckpointDef]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let by_name: HashMap<&str, &CheckpointDef> = a.iter().map(|d| (d.name.as_str(), d)).collect();
    b.iter().all(|d| by_name.get(d.name.as_str()) == Some(&d))
}

/// Plan the calls that turn `current` into `target`.
pub fn plan(current: &[CheckpointDef], target: &[CheckpointDef]) -> Plan {
    plan_with(current, target, &BTreeSet::new())
}

/// [`plan`], also redefining the target checkpoints named in `force` (a
/// resumed transaction's forced steps that are not yet recorded done).
pub fn plan_with(
    current: &[CheckpointDef],
    target: &[CheckpointDef],
    force: &BTreeSet<String>,
) -> Plan {
    let cur: HashMap<&str, &CheckpointDef> = current.iter().map(|d| (d.name.as_str(), d)).collect();
    let tgt: HashMap<&str, &CheckpointDef> = target.iter().map(|d| (d.name.as_str(), d)).collect();

    let mut steps: Vec<Step> = order_defs(current)
        .into_iter()
        .rev()
        .filter(|d| !tgt.contains_key(d.name.as_str()))
        .map(|d| Step::Delete { before: d.clone() })
        .collect();
    let deleted: BTreeSet<&str> = steps.iter().map(Step::checkpoint).collect();

    let needed: BTreeSet<&str> = target
        .iter()
        .filter(|d| cur.get(d.name.as_str()) != Some(d))
        .map(|d| d.name.as_str())
        .collect();

    // Where may libvirt's current checkpoint sit on the leaf's path once the
    // deletes are done? Assume the deepest path checkpoint libvirt has (a
    // chain built parent first, or by backups, ends there), and lower it to
    // wherever a deleted extra hangs off the path: deleting the current
    // checkpoint makes its parent current.
    let tindex: HashMap<&str, usize> = target
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let spine: Vec<&str> = spine_path(target, &tindex)
        .into_iter()
        .map(|i| target[i].name.as_str())
        .collect();
    let spine_pos: HashMap<&str, usize> = spine.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let mut lowest: isize = spine
        .iter()
        .rposition(|n| cur.contains_key(n))
        .map_or(-1, |i| i as isize);
    for name in &deleted {
        let mut up = cur.get(name).and_then(|d| d.parent.as_deref());
        let mut hops = 0;
        while let Some(p) = up {
            if !deleted.contains(p) || hops > current.len() {
                break;
            }
            up = cur.get(p).and_then(|d| d.parent.as_deref());
            hops += 1;
        }
        let pos = match up {
            Some(p) if cur.contains_key(p) => match spine_pos.get(p) {
                Some(&i) => i as isize,
                None => continue,
            },
            _ => -1,
        };
        lowest = lowest.min(pos);
    }
    let mut forced: BTreeSet<&str> = spine
        .iter()
        .skip((lowest + 1) as usize)
        .filter(|n| !needed.contains(**n))
        .copied()
        .collect();
    forced.extend(
        force
            .iter()
            .map(String::as_str)
            .filter(|n| tgt.contains_key(n) && !needed.contains(n)),
    );

    let mut unchanged = Vec::new();
    for d in order_defs(target) {
        let name = d.name.as_str();
        if needed.contains(name) || forced.contains(name) {
            steps.push(Step::Redefine {
                def: d.clone(),
                before: cur.get(name).map(|b| (*b).clone()),
                forced: !needed.contains(name),
            });
        } else {
            unchanged.push(d.name.clone());
        }
    }
    Plan { steps, unchanged }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn d(name: &str, parent: Option<&str>, t: i64) -> CheckpointDef {
        CheckpointDef {
            name: name.into(),
            parent: parent.map(Into::into),
            creation_time: t,
            description: None,
            disks: BTreeMap::from([("sda".to_string(), name.to_string())]),
        }
    }

    fn line(n: usize) -> Vec<CheckpointDef> {
        (0..n)
            .map(|i| {
                let p = (i > 0).then(|| format!("c{}", i - 1));
                d(&format!("c{i}"), p.as_deref(), i as i64)
            })
            .collect()
    }

    fn ops(p: &Plan) -> Vec<String> {
        p.steps
            .iter()
            .map(|s| match s {
                Step::Delete { before } => format!("-{}", before.name),
                Step::Redefine {
                    def, forced: false, ..
                } => format!("+{}", def.name),
                Step::Redefine {
                    def, forced: true, ..
                } => format!("={}", def.name),
            })
            .collect()
    }

    #[test]
    fn empty_to_chain_redefines_all_parent_first() {
        let p = plan(&[], &line(3));
        assert_eq!(ops(&p), ["+c0", "+c1", "+c2"]);
    }

    #[test]
    fn equal_state_plans_nothing() {
        let p = plan(&line(4), &line(4));
        assert!(p.is_empty());
        assert_eq!(p.unchanged, ["c0", "c1", "c2", "c3"]);
    }

    #[test]
    fn prefix_redefines_only_the_rest() {
        assert_eq!(ops(&plan(&line(2), &line(4))), ["+c2", "+c3"]);
    }

    #[test]
    fn conflicting_checkpoint_is_replaced_with_its_before_image() {
        let mut cur = line(3);
        cur[1].creation_time = 99;
        let p = plan(&cur, &line(3));
        assert_eq!(ops(&p), ["+c1"]);
        assert!(
            matches!(&p.steps[0], Step::Redefine { before: Some(b), .. } if b.creation_time == 99)
        );
    }

    #[test]
    fn extras_are_deleted_children_first_and_the_path_walked_again() {
        // x1 -> x2 hang off c1; c2 already matches but current may sit on c1.
        let mut cur = line(3);
        cur.push(d("x1", Some("c1"), 10));
        cur.push(d("x2", Some("x1"), 11));
        let p = plan(&cur, &line(4));
        assert_eq!(ops(&p), ["-x2", "-x1", "=c2", "+c3"]);
    }

    #[test]
    fn extras_below_the_leaf_need_no_forced_redefine() {
        let mut cur = line(3);
        cur.push(d("x", Some("c2"), 10));
        assert_eq!(ops(&plan(&cur, &line(3))), ["-x"]);
    }

    #[test]
    fn a_tree_redefines_the_path_to_its_leaf_before_other_branches() {
        // c0 <- a (older branch), c0 <- b1 <- b2 (the newest leaf), and a
        // second root r. Redefining a while c0 is current would make a
        // current, and b1 and b2 would then not take it.
        let tree = vec![
            d("c0", None, 0),
            d("a", Some("c0"), 1),
            d("b1", Some("c0"), 2),
            d("r", None, 3),
            d("b2", Some("b1"), 4),
        ];
        assert_eq!(ops(&plan(&[], &tree)), ["+c0", "+b1", "+b2", "+a", "+r"]);
        // With c0 in libvirt (current, as its sync left it), the path goes
        // on from it.
        assert_eq!(ops(&plan(&tree[..1], &tree)), ["+b1", "+b2", "+a", "+r"]);
    }

    #[test]
    fn same_content_ignores_order() {
        let mut a = line(3);
        let b = line(3);
        a.reverse();
        assert!(same_content(&a, &b));
        a[0].description = Some("x".into());
        assert!(!same_content(&a, &b));
    }
}
