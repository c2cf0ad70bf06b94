//! libvirt's checkpoint metadata and its hidden *current* checkpoint, as
//! the planner simulates them: the rules `src/backend/fake.rs` writes down
//! and the conformance suite holds to real libvirt.
//!
//! - redefine needs the parent to exist and refuses a cycle; it replaces a
//!   checkpoint of the same name and keeps its children;
//! - a redefined checkpoint becomes current when there is no current one or
//!   when its parent is the current one; a replaced current one stays
//!   current (whatever its new parent);
//! - delete re-parents the children to the deleted one's parent, and
//!   deleting the current one makes its parent current;
//! - after a daemon restart the current one is the leaf of a single line
//!   from a single root, otherwise there is none ([`after_restart`]).
//!
//! A [`Model`] follows several possible current checkpoints at once (one
//! per place the planner thinks the current one may be), because content
//! does not depend on where the current one is, but where it ends does.

use std::collections::{HashMap, HashSet};

use crate::chain::CheckpointDef;

/// One checkpoint in the model.
#[derive(Debug, Clone, Copy)]
struct Node<'a> {
    /// Its definition apart from the parent.
    def: &'a CheckpointDef,
    /// Its parent now (a delete re-parents, a redefine may name another).
    parent: Option<&'a str>,
}

/// Why libvirt would refuse a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Delete of a checkpoint libvirt does not have.
    NoCheckpoint,
    /// Redefine under a parent libvirt does not have.
    NoParent,
    /// Redefine that would make a checkpoint its own ancestor.
    Cycle,
    /// A replayed step found another definition than it recorded.
    Diverged,
}

/// Do two definitions agree on everything but the parent?
fn same_but_parent(a: &CheckpointDef, b: &CheckpointDef) -> bool {
    a.name == b.name
        && a.creation_time == b.creation_time
        && a.description == b.description
        && a.disks == b.disks
}

/// A content comparison kept up to date as the model changes: how many
/// names differ between the model and a reference set of definitions.
#[derive(Debug, Clone)]
struct Reference<'a> {
    defs: HashMap<&'a str, &'a CheckpointDef>,
    differing: usize,
}

/// What a daemon restart looks at: how many roots there are, how many
/// checkpoints have more than one child, and which have none.
#[derive(Debug, Clone, Default)]
struct Shape<'a> {
    kids: HashMap<&'a str, usize>,
    roots: usize,
    forks: usize,
    childless: HashSet<&'a str>,
}

impl<'a> Shape<'a> {
    fn of(nodes: &HashMap<&'a str, Node<'a>>) -> Shape<'a> {
        let mut s = Shape::default();
        for name in nodes.keys() {
            s.kids.insert(name, 0);
            s.childless.insert(name);
        }
        for n in nodes.values() {
            s.link(n.parent, nodes);
        }
        s
    }

    /// One more child under `parent` (a root when libvirt lacks it).
    fn link(&mut self, parent: Option<&str>, nodes: &HashMap<&'a str, Node<'a>>) {
        match parent.and_then(|p| nodes.get_key_value(p)) {
            Some((&p, _)) => {
                let k = self.kids.entry(p).or_default();
                *k += 1;
                match *k {
                    1 => {
                        self.childless.remove(p);
                    }
                    2 => self.forks += 1,
                    _ => {}
                }
            }
            None => self.roots += 1,
        }
    }

    /// One child less under `parent`.
    fn unlink(&mut self, parent: Option<&str>, nodes: &HashMap<&'a str, Node<'a>>) {
        match parent.and_then(|p| nodes.get_key_value(p)) {
            Some((&p, _)) => {
                let k = self.kids.entry(p).or_default();
                *k = k.saturating_sub(1);
                match *k {
                    0 => {
                        self.childless.insert(p);
                    }
                    1 => self.forks = self.forks.saturating_sub(1),
                    _ => {}
                }
            }
            None => self.roots = self.roots.saturating_sub(1),
        }
    }

    /// Where a restart puts the current checkpoint: the leaf of a single
    /// line from a single root, else none.
    fn after_restart(&self) -> Option<&'a str> {
        if self.roots == 1 && self.forks == 0 && self.childless.len() == 1 {
            self.childless.iter().next().copied()
        } else {
            None
        }
    }
}

/// libvirt's checkpoints of one domain, and where its current checkpoint
/// is for each of several starting points.
#[derive(Debug, Clone)]
pub(crate) struct Model<'a> {
    nodes: HashMap<&'a str, Node<'a>>,
    /// Parent → children, built at the first delete; entries go stale when
    /// a child moves and are checked against the child's parent.
    children: Option<HashMap<&'a str, Vec<&'a str>>>,
    /// The current checkpoint, one per starting point.
    currents: Vec<Option<&'a str>>,
    /// The definitions the planner is heading for.
    goal: HashMap<&'a str, &'a CheckpointDef>,
    /// Checkpoints whose content and every ancestor's equal the goal's: the
    /// path up from them is the goal's, so a cycle check may stop there.
    /// Only ever grows by redefines; anything that could shrink it clears
    /// it (it is an optimisation: empty is always right).
    clean: HashSet<&'a str>,
    check_cycles: bool,
    reference: Option<Reference<'a>>,
    /// Kept when a daemon restart may happen along a replay.
    shape: Option<Shape<'a>>,
}

impl<'a> Model<'a> {
    /// The model of `listing`, with the current checkpoint at each of
    /// `currents` (a name libvirt does not have counts as none), heading
    /// for `goal`.
    pub(crate) fn new(
        listing: &'a [CheckpointDef],
        currents: impl IntoIterator<Item = Option<&'a str>>,
        goal: &[&'a CheckpointDef],
    ) -> Model<'a> {
        let nodes: HashMap<&str, Node> = listing
            .iter()
            .map(|d| {
                (
                    d.name.as_str(),
                    Node {
                        def: d,
                        parent: d.parent.as_deref(),
                    },
                )
            })
            .collect();
        let currents = currents
            .into_iter()
            .map(|c| c.and_then(|c| nodes.get_key_value(c).map(|(k, _)| *k)))
            .collect();
        Model {
            nodes,
            children: None,
            currents,
            goal: goal.iter().map(|d| (d.name.as_str(), *d)).collect(),
            clean: HashSet::new(),
            check_cycles: true,
            reference: None,
            shape: None,
        }
    }

    /// Replay calls libvirt accepted: no cycle checks (libvirt made them),
    /// and keep what a daemon restart looks at ([`Model::restarted`]).
    pub(crate) fn trusting(mut self) -> Self {
        self.check_cycles = false;
        self.shape = Some(Shape::of(&self.nodes));
        self
    }

    /// Add where a daemon restart now would put the current checkpoint to
    /// the places it may be (a trusting model only).
    pub(crate) fn restarted(&mut self) {
        let Some(shape) = &self.shape else {
            return;
        };
        let at = if self.nodes.is_empty() {
            None
        } else {
            shape.after_restart()
        };
        if !self.currents.contains(&at) {
            self.currents.push(at);
        }
    }

    /// Keep count of the names whose content differs from `reference`.
    pub(crate) fn compare_with(&mut self, reference: &'a [CheckpointDef]) {
        let defs: HashMap<&str, &CheckpointDef> =
            reference.iter().map(|d| (d.name.as_str(), d)).collect();
        let mut r = Reference { defs, differing: 0 };
        r.differing = self
            .nodes
            .iter()
            .filter(|(n, node)| !r.defs.get(*n).is_some_and(|d| node_is(node, d)))
            .count()
            + r.defs
                .keys()
                .filter(|n| !self.nodes.contains_key(*n))
                .count();
        self.reference = Some(r);
    }

    /// Does the model equal the reference by content?
    pub(crate) fn matches_reference(&self) -> bool {
        self.reference.as_ref().is_some_and(|r| r.differing == 0)
    }

    /// The current checkpoint for each starting point.
    pub(crate) fn currents(&self) -> &[Option<&'a str>] {
        &self.currents
    }

    /// Does libvirt have this checkpoint?
    pub(crate) fn has(&self, name: &str) -> bool {
        self.nodes.contains_key(name)
    }

    /// The checkpoint's definition as libvirt has it now.
    pub(crate) fn def(&self, name: &str) -> Option<CheckpointDef> {
        self.nodes.get(name).map(|n| {
            let mut d = n.def.clone();
            d.parent = n.parent.map(str::to_string);
            d
        })
    }

    /// Does libvirt's checkpoint of that name equal the goal's?
    pub(crate) fn settled(&self, name: &str) -> bool {
        match (self.nodes.get(name), self.goal.get(name)) {
            (Some(n), Some(g)) => node_is(n, g),
            _ => false,
        }
    }

    /// Recompute which checkpoints are clean, visiting the goal parent
    /// first (`order`).
    pub(crate) fn mark_clean(&mut self, order: &[&'a CheckpointDef]) {
        self.clean.clear();
        for d in order {
            let up_clean = d.parent.as_deref().is_none_or(|p| self.clean.contains(p));
            if up_clean && self.settled(&d.name) {
                self.clean.insert(d.name.as_str());
            }
        }
    }

    /// Keep the reference count right around a change of `name`.
    fn touch(&mut self, name: &'a str, change: impl FnOnce(&mut Self)) {
        let was = self.reference.is_some().then(|| self.ref_equal(name));
        change(self);
        if let Some(was) = was {
            let now = self.ref_equal(name);
            if let Some(r) = &mut self.reference {
                match (was, now) {
                    (true, false) => r.differing += 1,
                    (false, true) => r.differing = r.differing.saturating_sub(1),
                    _ => {}
                }
            }
        }
    }

    fn ref_equal(&self, name: &str) -> bool {
        let Some(r) = &self.reference else {
            return true;
        };
        match (self.nodes.get(name), r.defs.get(name)) {
            (Some(n), Some(d)) => node_is(n, d),
            (None, None) => true,
            _ => false,
        }
    }

    fn children_index(&mut self) -> &mut HashMap<&'a str, Vec<&'a str>> {
        let nodes = &self.nodes;
        self.children.get_or_insert_with(|| {
            let mut c: HashMap<&str, Vec<&str>> = HashMap::new();
            for (name, n) in nodes {
                if let Some(p) = n.parent {
                    c.entry(p).or_default().push(name);
                }
            }
            c
        })
    }

    /// Delete a checkpoint's metadata.
    pub(crate) fn delete(&mut self, name: &str) -> Result<(), Refusal> {
        let Some((&key, &gone)) = self.nodes.get_key_value(name) else {
            return Err(Refusal::NoCheckpoint);
        };
        self.clean.clear();
        self.children_index();
        let orphans = self
            .children
            .as_mut()
            .and_then(|c| c.remove(key))
            .unwrap_or_default();
        if let Some(shape) = &mut self.shape {
            shape.unlink(gone.parent, &self.nodes);
            if shape.kids.remove(key).unwrap_or(0) >= 2 {
                shape.forks = shape.forks.saturating_sub(1);
            }
            shape.childless.remove(key);
        }
        self.touch(key, |m| {
            m.nodes.remove(key);
        });
        let mut moved = Vec::new();
        for child in orphans {
            if self.nodes.get(child).is_some_and(|n| n.parent == Some(key)) {
                self.touch(child, |m| {
                    if let Some(n) = m.nodes.get_mut(child) {
                        n.parent = gone.parent;
                    }
                });
                moved.push(child);
            }
        }
        if let Some(shape) = &mut self.shape {
            for _ in &moved {
                shape.link(gone.parent, &self.nodes);
            }
        }
        if let (Some(p), Some(index)) = (gone.parent, self.children.as_mut()) {
            index.entry(p).or_default().extend(moved);
        }
        for c in &mut self.currents {
            if *c == Some(key) {
                *c = gone
                    .parent
                    .and_then(|p| self.nodes.get_key_value(p).map(|(k, _)| *k));
            }
        }
        Ok(())
    }

    /// Redefine a checkpoint: `def`'s content under `parent`.
    pub(crate) fn redefine(
        &mut self,
        def: &'a CheckpointDef,
        parent: Option<&'a str>,
    ) -> Result<(), Refusal> {
        let name = def.name.as_str();
        if let Some(p) = parent {
            if p == name {
                return Err(Refusal::Cycle);
            }
            if !self.nodes.contains_key(p) {
                return Err(Refusal::NoParent);
            }
        }
        let new = Node { def, parent };
        let to_goal = self.goal.get(name).is_some_and(|g| node_is(&new, g));
        if self.check_cycles {
            self.check_cycle(name, parent, &new)?;
        }
        // A parent the model holds lends its key, so the model borrows
        // only what outlives it.
        let parent = parent.and_then(|p| self.nodes.get_key_value(p).map(|(k, _)| *k));
        let new = Node { def, parent };
        let was_clean = self.clean.contains(name);
        if let Some(shape) = &mut self.shape {
            match self.nodes.get(name) {
                Some(old) => shape.unlink(old.parent, &self.nodes),
                None => {
                    shape.kids.insert(name, 0);
                    shape.childless.insert(name);
                }
            }
            shape.link(parent, &self.nodes);
        }
        self.touch(name, |m| {
            m.nodes.insert(name, new);
        });
        if let (Some(p), Some(index)) = (parent, self.children.as_mut()) {
            index.entry(p).or_default().push(name);
        }
        if to_goal {
            if parent.is_none_or(|p| self.clean.contains(p)) {
                self.clean.insert(name);
            }
        } else if was_clean {
            self.clean.clear();
        }
        for c in &mut self.currents {
            if c.is_none() || (parent.is_some() && *c == parent) {
                *c = Some(name);
            }
        }
        Ok(())
    }

    /// Would redefining `name` under `parent` make it its own ancestor?
    fn check_cycle(&self, name: &str, parent: Option<&str>, new: &Node) -> Result<(), Refusal> {
        let Some(old) = self.nodes.get(name) else {
            // A new checkpoint is nobody's ancestor.
            return Ok(());
        };
        if old.parent == new.parent {
            return Ok(());
        }
        // A clean checkpoint's ancestors are its goal ancestors, which
        // hold `name` only if `name` is clean itself.
        let stop_at_clean = !self.clean.contains(name);
        let mut up = parent;
        let mut hops = 0usize;
        while let Some(p) = up {
            if p == name {
                return Err(Refusal::Cycle);
            }
            if (stop_at_clean && self.clean.contains(p)) || hops > self.nodes.len() {
                break;
            }
            up = self.nodes.get(p).and_then(|n| n.parent);
            hops += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
impl<'a> Model<'a> {
    /// Every checkpoint, by name, and the current ones: a state's identity
    /// for exhaustive searches.
    pub(crate) fn state(&self) -> (Vec<CheckpointDef>, Vec<Option<&'a str>>) {
        let mut names: Vec<&str> = self.nodes.keys().copied().collect();
        names.sort_unstable();
        let defs = names.iter().filter_map(|n| self.def(n)).collect();
        (defs, self.currents.clone())
    }

    /// Where a daemon restart now would put the current checkpoint, from
    /// the shape a trusting model keeps up to date.
    pub(crate) fn restart_point(&self) -> Option<&'a str> {
        let shape = self.shape.as_ref()?;
        if self.nodes.is_empty() {
            None
        } else {
            shape.after_restart()
        }
    }

    /// Names libvirt has.
    pub(crate) fn names(&self) -> Vec<&'a str> {
        let mut names: Vec<&'a str> = self.nodes.keys().copied().collect();
        names.sort_unstable();
        names
    }
}

/// Does a node hold exactly this definition?
fn node_is(n: &Node, d: &CheckpointDef) -> bool {
    n.parent == d.parent.as_deref() && same_but_parent(n.def, d)
}

/// The current checkpoint libvirt sets when it loads a domain's
/// checkpoints at start-up: from the single root, down while there is
/// exactly one child, the leaf it reaches; none when there are several
/// roots or a branch (libvirt's `virDomainMomentFindLeaf`).
pub(crate) fn after_restart(defs: &[CheckpointDef]) -> Option<&str> {
    let names: HashSet<&str> = defs.iter().map(|d| d.name.as_str()).collect();
    let mut children: HashMap<Option<&str>, Vec<&str>> = HashMap::new();
    for d in defs {
        let parent = d.parent.as_deref().filter(|p| names.contains(p));
        children.entry(parent).or_default().push(d.name.as_str());
    }
    let mut at: Option<&str> = None;
    for _ in 0..=defs.len() {
        match children.get(&at).map(Vec::as_slice) {
            Some([only]) => at = Some(only),
            None | Some([]) => return at,
            Some(_) => return None,
        }
    }
    None
}
