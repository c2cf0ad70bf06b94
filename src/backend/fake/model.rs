//! The domain model: a domain's checkpoints, libvirt's sibling lists and
//! listing order, the hidden current checkpoint and how a daemon restart
//! recomputes it.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::backend::DomainDisk;
use crate::chain::CheckpointDef;

/// One domain as the fake's daemon holds it.
#[derive(Debug, Clone, Default)]
pub(super) struct FakeDomain {
    pub(super) name: String,
    pub(super) uuid: String,
    pub(super) running: bool,
    pub(super) disks: Vec<DomainDisk>,
    /// Bitmap names present in each disk's image, by target.
    pub(super) bitmaps: BTreeMap<String, BTreeSet<String>>,
    /// Checkpoints by name.
    pub(super) checkpoints: HashMap<String, CheckpointDef>,
    /// libvirt's sibling lists: parent (`None`: the roots) → children,
    /// the most recently linked first.
    pub(super) children: HashMap<Option<String>, Vec<String>>,
    pub(super) current: Option<String>,
    /// Definitions libvirt will refuse to redefine (a simulated refusal).
    pub(super) refused: Vec<CheckpointDef>,
    /// Crash leftovers by checkpoint name: what libvirt would load from
    /// each (`None`: cut short), and whether it is stale.
    pub(super) leftovers: BTreeMap<String, (Option<CheckpointDef>, bool)>,
}

impl FakeDomain {
    /// Link a checkpoint under its parent, in front of its siblings.
    pub(super) fn link(&mut self, name: &str, parent: Option<String>) {
        self.children
            .entry(parent)
            .or_default()
            .insert(0, name.to_string());
    }

    pub(super) fn unlink(&mut self, name: &str, parent: Option<String>) {
        if let Some(list) = self.children.get_mut(&parent) {
            list.retain(|c| c != name);
        }
    }

    /// Depth first from the roots, siblings in list order.
    pub(super) fn listing(&self) -> Vec<CheckpointDef> {
        let mut out = Vec::with_capacity(self.checkpoints.len());
        let mut stack: Vec<&str> = Vec::new();
        if let Some(roots) = self.children.get(&None) {
            stack.extend(roots.iter().rev().map(String::as_str));
        }
        while let Some(n) = stack.pop() {
            if let Some(d) = self.checkpoints.get(n) {
                out.push(d.clone());
                if let Some(list) = self.children.get(&Some(n.to_string())) {
                    stack.extend(list.iter().rev().map(String::as_str));
                }
            }
        }
        out
    }

    /// Replace every checkpoint, linking each under its parent (or as a
    /// root when the parent is missing) so that siblings list in the order
    /// given.
    pub(super) fn replace_all(&mut self, defs: Vec<CheckpointDef>) {
        self.current = recompute_current(&defs);
        self.checkpoints.clear();
        self.children.clear();
        let names: BTreeSet<String> = defs.iter().map(|d| d.name.clone()).collect();
        for d in defs.into_iter().rev() {
            let parent = d
                .parent
                .clone()
                .filter(|p| names.contains(p) && *p != d.name);
            let name = d.name.clone();
            if self.checkpoints.insert(name.clone(), d).is_none() {
                self.link(&name, parent);
            }
        }
    }

    pub(super) fn is(&self, domain: &str) -> bool {
        if self.name == domain {
            return true;
        }
        match (
            uuid::Uuid::parse_str(domain),
            uuid::Uuid::parse_str(&self.uuid),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

fn recompute_current(defs: &[CheckpointDef]) -> Option<String> {
    crate::chain::leaf_of(defs).map(|d| d.name.clone())
}

/// The current checkpoint libvirt sets when it loads a domain's checkpoints
/// at start-up: walking down from the roots while there is exactly one
/// child, the leaf it reaches; none when it meets a branch, or when there
/// are several roots (libvirt's `virDomainMomentFindLeaf`).
pub(super) fn current_after_restart(defs: &[CheckpointDef]) -> Option<String> {
    let names: BTreeSet<&str> = defs.iter().map(|d| d.name.as_str()).collect();
    let mut children: HashMap<Option<&str>, Vec<&str>> = HashMap::new();
    for d in defs {
        let parent = d.parent.as_deref().filter(|p| names.contains(p));
        children.entry(parent).or_default().push(d.name.as_str());
    }
    let mut at: Option<&str> = None;
    loop {
        match children.get(&at).map(Vec::as_slice) {
            Some([only]) => at = Some(only),
            None | Some([]) => return at.map(String::from),
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::FakeBackend;

    #[test]
    fn a_restart_makes_the_leaf_of_a_line_current_and_nothing_else() {
        let d = |name: &str, parent: Option<&str>, t: i64| CheckpointDef {
            name: name.into(),
            parent: parent.map(Into::into),
            creation_time: t,
            description: None,
            disks: BTreeMap::from([("vda".to_string(), name.to_string())]),
        };
        let fake = FakeBackend::new();
        fake.define_domain("r", "93a5c045-6457-2c09-e56c-927cdf34e178", &["vda"], true);
        let after = |defs: Vec<CheckpointDef>| {
            fake.set_checkpoints("r", defs);
            fake.restart();
            fake.current("r")
        };
        assert_eq!(after(vec![]), None);
        assert_eq!(
            after(vec![
                d("a", None, 1),
                d("b", Some("a"), 2),
                d("c", Some("b"), 3)
            ])
            .as_deref(),
            Some("c")
        );
        // A branch anywhere, or a second root: none, whatever the times.
        assert_eq!(
            after(vec![
                d("a", None, 1),
                d("b", Some("a"), 2),
                d("c", Some("a"), 3)
            ]),
            None
        );
        assert_eq!(
            after(vec![d("a", None, 1), d("b", Some("a"), 2), d("x", None, 3)]),
            None
        );
    }
}
