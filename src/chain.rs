//! The chain model: checkpoints as a management system keeps them, their
//! validation, and the deterministic parent-first order.
//!
//! A [`Chain`] is what an agent hands to the store (and what the CLI reads as
//! JSON). [`Chain::validate`] turns it into a [`ValidChain`], the only form
//! the engine accepts, so an invalid chain can never reach libvirt.
//! [`CheckpointDef`] is the libvirt-side, comparable form of one checkpoint:
//! what the redefine XML says and what libvirt's XML is parsed back into.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Most checkpoints a chain may hold. libvirt itself has no limit, but every
/// redefine costs about 30 ms, so a larger chain is a mistake, not a wish.
pub const MAX_CHECKPOINTS: usize = 50_000;

/// One checkpoint as the management system records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// Stable id; also the checkpoint's libvirt name and its bitmap's name:
    /// any name libvirt accepts for a checkpoint and QEMU for a bitmap
    /// (see [`check_checkpoint_name`]), such as a UUID, `virtnbdbackup.0`
    /// or `one-31-2`.
    pub id: String,
    /// The parent checkpoint, or `None` for a root.
    #[serde(default)]
    pub parent: Option<String>,
    /// When the checkpoint was taken (libvirt keeps whole seconds).
    pub created: DateTime<Utc>,
    /// Free text; escaped in the XML, never rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The disks (by stable disk id, any non-empty string) whose bitmap
    /// this checkpoint names.
    pub disks: Vec<String>,
}

/// A domain's checkpoint chain (a tree in general), in any order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Chain {
    /// The VM's stable id.
    pub vm_id: Uuid,
    /// libvirt domain name or UUID; defaults to `vm_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// A name prefix (`"ovirt-"`): the chain manages only the checkpoints
    /// whose names start with it. Its own ids must; libvirt's other
    /// checkpoints are neither deleted nor redefined (`foreign`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// Disk id (any non-empty string) → the disk's *current* target name in
    /// the domain (`sda`, `vdb`).
    pub disks: BTreeMap<String, String>,
    /// The checkpoints, in any order.
    pub checkpoints: Vec<Checkpoint>,
}

/// The libvirt-side form of one checkpoint, compared by content.
///
/// Two definitions are equal when name, parent, creation time, description
/// and the disk target → bitmap map are equal; this is what "libvirt already
/// has this checkpoint" means everywhere in the store.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CheckpointDef {
    /// The checkpoint's libvirt name.
    pub name: String,
    /// The parent's name, `None` for a root.
    pub parent: Option<String>,
    /// `creationTime`, Unix seconds.
    pub creation_time: i64,
    /// Optional description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Disk target name → bitmap name.
    pub disks: BTreeMap<String, String>,
}

/// Why a chain was refused. Every variant names what is wrong, and nothing
/// was written anywhere when it is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainError {
    /// The chain has no checkpoints and no disks: almost certainly a mistake.
    #[error("chain for vm {0} is empty: no disks and no checkpoints")]
    Empty(Uuid),
    /// More checkpoints than [`MAX_CHECKPOINTS`].
    #[error("chain has {count} checkpoints, more than the limit of {max}")]
    TooLarge {
        /// How many the chain has.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Two checkpoints share an id.
    #[error("checkpoint {0} appears more than once")]
    Duplicate(String),
    /// A checkpoint names a parent that is not in the chain.
    #[error("checkpoint {checkpoint} names parent {parent}, which is not in the chain")]
    UnknownParent {
        /// The offending checkpoint.
        checkpoint: String,
        /// The missing parent.
        parent: String,
    },
    /// A checkpoint is its own ancestor.
    #[error("checkpoint {0} is its own ancestor (parent cycle)")]
    Cycle(String),
    /// A checkpoint names no disk at all, or only disks missing from the map.
    #[error("checkpoint {0} names no disk that is in the chain's disk map")]
    NoDisks(String),
    /// A checkpoint lists the same disk twice.
    #[error("checkpoint {checkpoint} lists disk {disk} twice")]
    DuplicateDisk {
        /// The offending checkpoint.
        checkpoint: String,
        /// The repeated disk.
        disk: String,
    },
    /// Two disks map to the same target name.
    #[error("disks {first} and {second} both map to target {target:?}")]
    DuplicateTarget {
        /// The target name.
        target: String,
        /// One disk.
        first: String,
        /// The other disk.
        second: String,
    },
    /// A disk target name libvirt would refuse or that is unsafe.
    #[error(
        "disk {disk} has target name {target:?}, which is not a valid disk target (fd, hd, sd, vd, xvd or ubd, then letters, digits or '_')"
    )]
    BadTarget {
        /// The disk.
        disk: String,
        /// The refused name.
        target: String,
    },
    /// A domain name libvirt would refuse.
    #[error(
        "domain name {0:?} is not valid (empty, too long, or contains '/' or control characters)"
    )]
    BadDomain(String),
    /// A checkpoint id that libvirt would refuse as a checkpoint name or
    /// QEMU as a bitmap name.
    #[error("checkpoint id {id:?} is not a valid checkpoint name: {reason}")]
    BadId {
        /// The refused id.
        id: String,
        /// Why.
        reason: NameError,
    },
    /// An empty disk id.
    #[error("a disk id is empty")]
    EmptyDiskId,
    /// A checkpoint id outside the chain's scope.
    #[error(
        "checkpoint {id:?} is outside the chain's scope: its name does not start with {scope:?}"
    )]
    OutOfScope {
        /// The checkpoint.
        id: String,
        /// The chain's scope.
        scope: String,
    },
    /// A creation time libvirt cannot store: libvirt writes a zero
    /// `creationTime` out without the element and then cannot read its own
    /// metadata back, and refuses negative ones.
    #[error("checkpoint {0} has a creation time at or before 1970-01-01T00:00:00Z")]
    BadTime(String),
}

/// A chain that passed [`Chain::validate`]: ids unique, parents present, no
/// cycles, every checkpoint with at least one attached disk, names valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidChain {
    chain: Chain,
    order: Vec<usize>,
    detached: Vec<DetachedDisk>,
}

/// A disk a checkpoint names but the chain's disk map no longer holds: it is
/// left out of that checkpoint's XML and reported in the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachedDisk {
    /// The checkpoint.
    pub checkpoint: String,
    /// The disk that is no longer attached.
    pub disk: String,
}

/// Make free text storable in XML 1.0 exactly as libvirt will hand it back:
/// line ends become `\n` (XML parsers normalise `\r\n` and `\r`), and control
/// characters XML cannot carry become U+FFFD. Everything else is kept; the
/// XML writer escapes metacharacters.
pub fn xml_safe_text(s: &str) -> String {
    s.replace("\r\n", "\n")
        .chars()
        .map(|c| match c {
            '\r' => '\n',
            '\n' | '\t' => c,
            c if c.is_control() || c == '\u{FFFE}' || c == '\u{FFFF}' => '\u{FFFD}',
            c => c,
        })
        .collect()
}

/// The longest checkpoint name: QEMU's limit for a bitmap name
/// (`BDRV_BITMAP_MAX_NAME_SIZE`, the qcow2 directory's `name_size`), and a
/// checkpoint's bitmap is named after it.
pub const MAX_NAME_BYTES: usize = 1023;

/// Why a name cannot be a checkpoint's (and its bitmap's) name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The empty string.
    #[error("it is empty")]
    Empty,
    /// Longer than [`MAX_NAME_BYTES`].
    #[error("it is longer than {MAX_NAME_BYTES} bytes, QEMU's limit for a bitmap name")]
    TooLong,
    /// A leading `.` (libvirt keeps a checkpoint as the file `NAME.xml`).
    #[error("it starts with '.', which libvirt refuses")]
    LeadingDot,
    /// A character outside libvirt's schema for checkpoint names.
    #[error(
        "it contains {0:?}; libvirt accepts only letters, digits, '_', '-' and '.' (not first)"
    )]
    BadChar(char),
}

/// Check a name against libvirt's rule for checkpoint names (the
/// `checkpointName` pattern of its schema, `[a-zA-Z0-9_-][a-zA-Z0-9_.-]*`)
/// and QEMU's for bitmap names (at most [`MAX_NAME_BYTES`] bytes). Such a
/// name has no `/`, no control character, nothing XML must escape, and
/// round-trips through libvirt and qcow2 as it is.
///
/// # Errors
///
/// The first rule the name breaks.
pub fn check_checkpoint_name(name: &str) -> Result<(), NameError> {
    let Some(first) = name.chars().next() else {
        return Err(NameError::Empty);
    };
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong);
    }
    if first == '.' {
        return Err(NameError::LeadingDot);
    }
    match name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.'))
    {
        Some(c) => Err(NameError::BadChar(c)),
        None => Ok(()),
    }
}

/// Whether [`check_checkpoint_name`] accepts the name.
pub fn is_valid_checkpoint_name(name: &str) -> bool {
    check_checkpoint_name(name).is_ok()
}

/// Check a disk target name against libvirt's checkpoint schema,
/// `(fd|hd|sd|vd|xvd|ubd)[a-zA-Z0-9_]+`, at most 64 characters. (The
/// schema also allows an absolute path and an `ioemu:` prefix; neither names
/// a target in a domain's XML today, and a path has no place in a name.)
pub fn is_valid_target(name: &str) -> bool {
    let rest = ["xvd", "ubd", "fd", "hd", "sd", "vd"]
        .iter()
        .find_map(|p| name.strip_prefix(p));
    name.len() <= 64
        && rest.is_some_and(|r| {
            !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// Check a libvirt domain name (or UUID string): non-empty, at most 255
/// bytes, no `/` and no control characters.
pub fn is_valid_domain(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.chars().any(|c| c == '/' || c.is_control())
}

impl Chain {
    /// The libvirt domain this chain belongs to: `domain`, or `vm_id` as a
    /// UUID string.
    pub fn domain_key(&self) -> String {
        self.domain
            .clone()
            .unwrap_or_else(|| self.vm_id.to_string())
    }

    /// Validate the chain and compute its deterministic parent-first order.
    ///
    /// # Errors
    ///
    /// A [`ChainError`] naming the first offending checkpoint, disk or name.
    pub fn validate(self) -> Result<ValidChain, ChainError> {
        self.check_size()?;
        let domain = self.domain_key();
        if !is_valid_domain(&domain) {
            return Err(ChainError::BadDomain(domain));
        }
        check_targets(&self.disks)?;
        let index = index_ids(&self.checkpoints)?;
        check_names(&self.checkpoints)?;
        check_scope(self.scope.as_deref(), &self.checkpoints)?;
        let mut detached = Vec::new();
        for c in &self.checkpoints {
            if c.created.timestamp() <= 0 {
                return Err(ChainError::BadTime(c.id.clone()));
            }
            check_parent(c, &index)?;
            detached.extend(detached_disks(c, &self.disks)?);
        }
        let order = topo_order(&self.checkpoints, &index)?;
        Ok(ValidChain {
            chain: self,
            order,
            detached,
        })
    }

    /// Not over [`MAX_CHECKPOINTS`], and not empty.
    fn check_size(&self) -> Result<(), ChainError> {
        if self.checkpoints.len() > MAX_CHECKPOINTS {
            return Err(ChainError::TooLarge {
                count: self.checkpoints.len(),
                max: MAX_CHECKPOINTS,
            });
        }
        if self.checkpoints.is_empty() && self.disks.is_empty() {
            return Err(ChainError::Empty(self.vm_id));
        }
        Ok(())
    }
}

/// Every checkpoint id a valid checkpoint name, every disk id non-empty.
fn check_names(cps: &[Checkpoint]) -> Result<(), ChainError> {
    for c in cps {
        check_checkpoint_name(&c.id).map_err(|reason| ChainError::BadId {
            id: c.id.clone(),
            reason,
        })?;
        if c.disks.iter().any(String::is_empty) {
            return Err(ChainError::EmptyDiskId);
        }
    }
    Ok(())
}

/// With a scope, every id starts with it (an empty scope is no scope).
fn check_scope(scope: Option<&str>, cps: &[Checkpoint]) -> Result<(), ChainError> {
    let Some(scope) = scope.filter(|s| !s.is_empty()) else {
        return Ok(());
    };
    match cps.iter().find(|c| !c.id.starts_with(scope)) {
        Some(c) => Err(ChainError::OutOfScope {
            id: c.id.clone(),
            scope: scope.to_string(),
        }),
        None => Ok(()),
    }
}

/// Every target name valid, and no two disks on the same target.
fn check_targets(disks: &BTreeMap<String, String>) -> Result<(), ChainError> {
    let mut targets: HashMap<&str, &str> = HashMap::new();
    for (disk, target) in disks {
        if disk.is_empty() {
            return Err(ChainError::EmptyDiskId);
        }
        if !is_valid_target(target) {
            return Err(ChainError::BadTarget {
                disk: disk.clone(),
                target: target.clone(),
            });
        }
        if let Some(first) = targets.insert(target, disk) {
            return Err(ChainError::DuplicateTarget {
                target: target.clone(),
                first: first.to_string(),
                second: disk.clone(),
            });
        }
    }
    Ok(())
}

/// Each checkpoint's position by id; refuses a repeated id.
fn index_ids(cps: &[Checkpoint]) -> Result<HashMap<&str, usize>, ChainError> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(cps.len());
    for (i, c) in cps.iter().enumerate() {
        if index.insert(&c.id, i).is_some() {
            return Err(ChainError::Duplicate(c.id.clone()));
        }
    }
    Ok(index)
}

/// The parent, if any, is another checkpoint of the chain.
fn check_parent(c: &Checkpoint, index: &HashMap<&str, usize>) -> Result<(), ChainError> {
    let Some(p) = &c.parent else {
        return Ok(());
    };
    if *p == c.id {
        return Err(ChainError::Cycle(c.id.clone()));
    }
    if !index.contains_key(p.as_str()) {
        return Err(ChainError::UnknownParent {
            checkpoint: c.id.clone(),
            parent: p.clone(),
        });
    }
    Ok(())
}

/// The checkpoint's disks that the disk map no longer holds; refuses a disk
/// listed twice, and a checkpoint with no attached disk.
fn detached_disks(
    c: &Checkpoint,
    disks: &BTreeMap<String, String>,
) -> Result<Vec<DetachedDisk>, ChainError> {
    let mut seen = BTreeSet::new();
    let mut detached = Vec::new();
    for d in &c.disks {
        if !seen.insert(d) {
            return Err(ChainError::DuplicateDisk {
                checkpoint: c.id.clone(),
                disk: d.clone(),
            });
        }
        if !disks.contains_key(d) {
            detached.push(DetachedDisk {
                checkpoint: c.id.clone(),
                disk: d.clone(),
            });
        }
    }
    // No disk of the checkpoint is in the map.
    if detached.len() == c.disks.len() {
        return Err(ChainError::NoDisks(c.id.clone()));
    }
    Ok(detached)
}

/// Kahn's algorithm over indices, ties broken by (created, id) so the order
/// is deterministic whatever order the input had.
fn topo_order(cps: &[Checkpoint], index: &HashMap<&str, usize>) -> Result<Vec<usize>, ChainError> {
    let n = cps.len();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut pending_parent = vec![false; n];
    for (i, c) in cps.iter().enumerate() {
        if let Some(p) = &c.parent {
            children[index[p.as_str()]].push(i);
            pending_parent[i] = true;
        }
    }
    let key = |i: usize| Reverse((cps[i].created, cps[i].id.as_str(), i));
    let mut ready: BinaryHeap<_> = (0..n).filter(|&i| !pending_parent[i]).map(key).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse((_, _, i))) = ready.pop() {
        order.push(i);
        for &c in &children[i] {
            ready.push(key(c));
        }
    }
    if order.len() != n {
        return Err(ChainError::Cycle(cycle_member(cps, index, &order)));
    }
    Ok(order)
}

/// Every checkpoint left out of a topological `order` sits on or below a
/// cycle; the smallest id on a cycle, for a stable message.
fn cycle_member(cps: &[Checkpoint], index: &HashMap<&str, usize>, order: &[usize]) -> String {
    let placed: BTreeSet<usize> = order.iter().copied().collect();
    let on_cycle = |i: usize| {
        let mut seen = BTreeSet::new();
        let mut cur = i;
        loop {
            if !seen.insert(cur) {
                return cur == i;
            }
            match &cps[cur].parent {
                Some(p) => cur = index[p.as_str()],
                None => return false,
            }
        }
    };
    (0..cps.len())
        .filter(|i| !placed.contains(i))
        .filter(|&i| on_cycle(i))
        .map(|i| &cps[i].id)
        .min()
        .unwrap_or(&cps[0].id)
        .clone()
}

impl ValidChain {
    /// The chain as given.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// The libvirt domain this chain belongs to.
    pub fn domain(&self) -> String {
        self.chain.domain_key()
    }

    /// Checkpoints in deterministic parent-first order.
    pub fn ordered(&self) -> impl Iterator<Item = &Checkpoint> {
        self.order.iter().map(|&i| &self.chain.checkpoints[i])
    }

    /// Disks named by checkpoints but missing from the disk map.
    pub fn detached(&self) -> &[DetachedDisk] {
        &self.detached
    }

    /// The disk target names the chain uses (the disk map's values).
    pub fn targets(&self) -> BTreeSet<&str> {
        self.chain.disks.values().map(String::as_str).collect()
    }

    /// The libvirt definitions of every checkpoint, parent first, built from
    /// the disk map's current target names. Detached disks are left out.
    pub fn defs(&self) -> Vec<CheckpointDef> {
        self.ordered()
            .map(|c| CheckpointDef {
                name: c.id.clone(),
                parent: c.parent.clone(),
                creation_time: c.created.timestamp(),
                // libvirt keeps no empty description.
                description: c
                    .description
                    .as_deref()
                    .map(xml_safe_text)
                    .filter(|d| !d.is_empty()),
                disks: c
                    .disks
                    .iter()
                    .filter_map(|d| self.chain.disks.get(d).map(|t| (t.clone(), c.id.clone())))
                    .collect(),
            })
            .collect()
    }
}

/// Order definitions parent first, deterministically (by creation time, then
/// name), with the path from the root to the leaf ([`leaf_of`]) first: each
/// of its checkpoints as soon as its parent is placed, every other branch
/// after it. Parents missing from the set are treated as roots.
///
/// Redefined in this order, the checkpoints leave libvirt's current
/// checkpoint on the leaf: each path checkpoint's parent is the current one
/// when it is redefined, so it becomes current, and once the leaf is
/// current no later checkpoint can take its place (a redefined checkpoint
/// becomes current only when its parent is the current one, and the leaf
/// has no children).
/// Cycles (which libvirt would never report) are broken by emitting the
/// remaining definitions in name order.
pub fn order_defs(defs: &[CheckpointDef]) -> Vec<&CheckpointDef> {
    let index: HashMap<&str, usize> = defs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let spine = spine(defs, &index);
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); defs.len()];
    let mut has_parent = vec![false; defs.len()];
    for (i, d) in defs.iter().enumerate() {
        if let Some(&p) = d.parent.as_deref().and_then(|p| index.get(p)) {
            if p != i {
                children[p].push(i);
                has_parent[i] = true;
            }
        }
    }
    let key = |i: usize| {
        Reverse((
            !spine.contains(&i),
            defs[i].creation_time,
            defs[i].name.as_str(),
            i,
        ))
    };
    let mut ready: BinaryHeap<_> = (0..defs.len())
        .filter(|&i| !has_parent[i])
        .map(key)
        .collect();
    let mut out = Vec::with_capacity(defs.len());
    let mut placed = vec![false; defs.len()];
    while let Some(Reverse((_, _, _, i))) = ready.pop() {
        placed[i] = true;
        out.push(&defs[i]);
        for &c in &children[i] {
            ready.push(key(c));
        }
    }
    if out.len() != defs.len() {
        let mut rest: Vec<usize> = (0..defs.len()).filter(|&i| !placed[i]).collect();
        rest.sort_by(|&a, &b| defs[a].name.cmp(&defs[b].name));
        out.extend(rest.into_iter().map(|i| &defs[i]));
    }
    out
}

/// The leaf a chain should end on: the newest checkpoint (by creation time,
/// then name) that has no children.
pub fn leaf_of(defs: &[CheckpointDef]) -> Option<&CheckpointDef> {
    let parents: BTreeSet<&str> = defs.iter().filter_map(|d| d.parent.as_deref()).collect();
    defs.iter()
        .filter(|d| !parents.contains(d.name.as_str()))
        .max_by(|a, b| (a.creation_time, &a.name).cmp(&(b.creation_time, &b.name)))
}

/// The root of the leaf's branch.
pub fn root_of(defs: &[CheckpointDef]) -> Option<&CheckpointDef> {
    let index: HashMap<&str, usize> = defs
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    spine_path(defs, &index).first().map(|&i| &defs[i])
}

/// Indices of the path root → leaf, root first.
pub(crate) fn spine_path(defs: &[CheckpointDef], index: &HashMap<&str, usize>) -> Vec<usize> {
    let Some(leaf) = leaf_of(defs) else {
        return Vec::new();
    };
    let mut path = vec![index[leaf.name.as_str()]];
    let mut seen = BTreeSet::from([path[0]]);
    while let Some(&p) = defs[*path.last().unwrap_or(&0)]
        .parent
        .as_deref()
        .and_then(|p| index.get(p))
    {
        if !seen.insert(p) {
            break;
        }
        path.push(p);
    }
    path.reverse();
    path
}

fn spine(defs: &[CheckpointDef], index: &HashMap<&str, usize>) -> BTreeSet<usize> {
    spine_path(defs, index).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    fn id(n: u128) -> String {
        Uuid::from_u128(n).to_string()
    }

    fn chain(cps: Vec<(u128, Option<u128>)>) -> Chain {
        let disk = id(1000);
        Chain {
            scope: None,
            vm_id: Uuid::from_u128(999),
            domain: None,
            disks: BTreeMap::from([(disk.clone(), "sda".to_string())]),
            checkpoints: cps
                .into_iter()
                .map(|(i, p)| Checkpoint {
                    id: id(i),
                    parent: p.map(id),
                    created: t(i as i64),
                    description: None,
                    disks: vec![disk.clone()],
                })
                .collect(),
        }
    }

    #[test]
    fn orders_parents_first_whatever_the_input_order() {
        let v = chain(vec![(3, Some(2)), (1, None), (2, Some(1))])
            .validate()
            .unwrap();
        let ids: Vec<_> = v.ordered().map(|c| c.id.clone()).collect();
        assert_eq!(ids, vec![id(1), id(2), id(3)]);
    }

    #[test]
    fn accepts_a_tree() {
        let v = chain(vec![(4, Some(1)), (1, None), (2, Some(1)), (3, Some(2))])
            .validate()
            .unwrap();
        let ids: Vec<_> = v.ordered().map(|c| c.id.clone()).collect();
        assert_eq!(ids, vec![id(1), id(2), id(3), id(4)]);
    }

    #[test]
    fn rejects_what_libvirt_or_sense_would() {
        assert_eq!(
            chain(vec![(1, None), (1, None)]).validate().unwrap_err(),
            ChainError::Duplicate(id(1))
        );
        assert_eq!(
            chain(vec![(1, Some(7))]).validate().unwrap_err(),
            ChainError::UnknownParent {
                checkpoint: id(1),
                parent: id(7)
            }
        );
        assert_eq!(
            chain(vec![(1, Some(1))]).validate().unwrap_err(),
            ChainError::Cycle(id(1))
        );
        assert_eq!(
            chain(vec![(1, None), (2, Some(3)), (3, Some(2))])
                .validate()
                .unwrap_err(),
            ChainError::Cycle(id(2))
        );
        let mut c = chain(vec![(1, None)]);
        c.checkpoints[0].disks = vec![id(5)];
        assert_eq!(c.validate().unwrap_err(), ChainError::NoDisks(id(1)));
        let mut c = chain(vec![(1, None)]);
        c.disks.insert(id(1000), "../sda".into());
        assert!(matches!(
            c.validate().unwrap_err(),
            ChainError::BadTarget { .. }
        ));
        let mut c = chain(vec![(1, None)]);
        c.domain = Some("a/b".into());
        assert!(matches!(
            c.validate().unwrap_err(),
            ChainError::BadDomain(_)
        ));
    }

    #[test]
    fn detached_disks_are_reported_and_left_out() {
        let mut c = chain(vec![(1, None)]);
        c.checkpoints[0].disks.push(id(77));
        let v = c.validate().unwrap();
        assert_eq!(
            v.detached(),
            &[DetachedDisk {
                checkpoint: id(1),
                disk: id(77)
            }]
        );
        assert_eq!(v.defs()[0].disks.len(), 1);
    }

    #[test]
    fn targets_follow_libvirts_schema() {
        for ok in ["sda", "vdb", "hdc", "xvda", "ubda", "fd0", "sd_1"] {
            assert!(is_valid_target(ok), "{ok}");
        }
        for bad in [
            "", "sd", "nvme0n1", "disk-a", "sda.1", "../sda", "vda/x", "v<a>",
        ] {
            assert!(!is_valid_target(bad), "{bad}");
        }
    }

    #[test]
    fn names_follow_libvirts_rule() {
        assert!(is_valid_checkpoint_name("c1"));
        assert!(is_valid_checkpoint_name("_a.b-c"));
        assert!(!is_valid_checkpoint_name(".hidden"));
        assert!(!is_valid_checkpoint_name("a/b"));
        assert!(!is_valid_checkpoint_name("a<b"));
        assert!(!is_valid_checkpoint_name(""));
    }

    #[test]
    fn order_defs_puts_the_leaf_path_first() {
        let d = |n: &str, p: Option<&str>, t: i64| CheckpointDef {
            name: n.into(),
            parent: p.map(Into::into),
            creation_time: t,
            description: None,
            disks: BTreeMap::new(),
        };
        // root r; branch a (older) and b (newest leaf).
        let defs = vec![
            d("b2", Some("b1"), 5),
            d("a1", Some("r"), 3),
            d("r", None, 1),
            d("b1", Some("r"), 2),
        ];
        let names: Vec<_> = order_defs(&defs).iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, vec!["r", "b1", "b2", "a1"]);
        assert_eq!(leaf_of(&defs).unwrap().name, "b2");
        assert_eq!(root_of(&defs).unwrap().name, "r");
    }
}
