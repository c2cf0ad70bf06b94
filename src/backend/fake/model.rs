//! The domain model: a domain's checkpoints, libvirt's sibling lists and
//! listing order, the hidden current checkpoint, what each call does to
//! them, how a daemon restart reloads them (crash leftovers included) and
//! recomputes the current checkpoint.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::SystemTime;

use super::errors;
use crate::backend::{
    BackendError, BackendErrorKind as K, BitmapState, DiskBitmap, DomainDisk, DomainInfo, Leftover,
    LeftoverScan,
};
use crate::chain::{is_valid_checkpoint_name, CheckpointDef};

/// One domain as the fake's daemon holds it.
#[derive(Debug, Clone, Default)]
pub(super) struct FakeDomain {
    pub(super) name: String,
    uuid: String,
    pub(super) running: bool,
    disks: Vec<DomainDisk>,
    /// Bitmap names present in each disk's image, by target.
    pub(super) bitmaps: BTreeMap<String, BTreeSet<String>>,
    /// Disks (by target) whose image another process holds open (QEMU's
    /// image lock): `qemu-img` cannot write them.
    pub(super) held: BTreeSet<String>,
    /// Checkpoints by name.
    checkpoints: HashMap<String, CheckpointDef>,
    /// libvirt's sibling lists: parent (`None`: the roots) → children,
    /// the most recently linked first.
    children: HashMap<Option<String>, Vec<String>>,
    /// The hidden current checkpoint.
    pub(super) current: Option<String>,
    /// Definitions libvirt will refuse to redefine (a simulated refusal).
    pub(super) refused: Vec<CheckpointDef>,
    /// Crash leftovers by checkpoint name: what libvirt would load from
    /// each (`None`: cut short), and whether it is stale.
    pub(super) leftovers: BTreeMap<String, (Option<CheckpointDef>, bool)>,
    /// The XML each checkpoint was last redefined with, returned as it was
    /// given by [`Backend::checkpoint_xml`](crate::backend::Backend::checkpoint_xml)
    /// (the others are rendered).
    xml: HashMap<String, String>,
}

impl FakeDomain {
    /// A shut-off or running domain with disks (target names) whose images
    /// are `/fake/<domain>/<target>.qcow2`, without bitmaps or checkpoints.
    pub(super) fn new(name: &str, uuid: &str, targets: &[&str], running: bool) -> Self {
        FakeDomain {
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
        }
    }

    /// Is this the domain named `domain` (a name or a UUID)?
    pub(super) fn is(&self, domain: &str) -> bool {
        if self.name == domain {
            return true;
        }
        same_uuid(domain, &self.uuid)
    }

    /// Its disks and run state.
    pub(super) fn info(&self) -> DomainInfo {
        DomainInfo {
            name: self.name.clone(),
            uuid: self.uuid.clone(),
            running: self.running,
            disks: self.disks.clone(),
        }
    }
}

/// The checkpoints and libvirt's sibling lists.
impl FakeDomain {
    /// Link a checkpoint under its parent, in front of its siblings.
    fn link(&mut self, name: &str, parent: Option<String>) {
        self.children
            .entry(parent)
            .or_default()
            .insert(0, name.to_string());
    }

    /// Take a checkpoint out of its parent's list.
    fn unlink(&mut self, name: &str, parent: Option<String>) {
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
        self.xml.clear();
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
}

/// The calls: what each does to the checkpoints, in libvirt's order of
/// checks.
impl FakeDomain {
    /// A new (non-redefine) checkpoint with bitmaps on every disk, as a
    /// backup makes: its parent is the current checkpoint, and it becomes
    /// current. Returns the parent it got.
    pub(super) fn create(
        &mut self,
        name: &str,
        creation_time: i64,
    ) -> Result<Option<String>, BackendError> {
        if !self.running {
            return Err(errors::inactive());
        }
        if !is_valid_checkpoint_name(name) {
            return Err(errors::schema_error());
        }
        if self.checkpoints.contains_key(name) {
            return Err(errors::bitmap_exists(name));
        }
        let parent = self.current.clone();
        let disks: BTreeMap<String, String> = self
            .disks
            .iter()
            .map(|k| (k.target.clone(), name.to_string()))
            .collect();
        for t in disks.keys() {
            self.bitmaps
                .entry(t.clone())
                .or_default()
                .insert(name.into());
        }
        self.checkpoints.insert(
            name.into(),
            CheckpointDef {
                name: name.into(),
                parent: parent.clone(),
                creation_time,
                description: None,
                disks,
            },
        );
        self.link(name, parent.clone());
        self.xml.remove(name);
        self.current = Some(name.into());
        Ok(parent)
    }

    /// Redefine a checkpoint from a definition read from a document that
    /// passed the schema (`embedded_uuid`: the UUID of its `<domain>`;
    /// `given`: the document, kept as libvirt keeps it).
    pub(super) fn redefine(
        &mut self,
        def: CheckpointDef,
        embedded_uuid: Option<&str>,
        validate: bool,
        given: &str,
    ) -> Result<(), BackendError> {
        if self.refused.contains(&def) {
            return Err(errors::invalid(format!(
                "invalid argument: checkpoint {} refused (simulated)",
                def.name
            )));
        }
        self.check_parent(&def)?;
        if let Some(u) = embedded_uuid {
            self.check_embedded_uuid(&def, u)?;
        }
        if validate {
            self.check_bitmaps(&def)?;
        }
        self.xml.insert(def.name.clone(), given.to_string());
        self.put(def);
        Ok(())
    }

    /// The parent exists, and is neither the checkpoint nor one of its
    /// descendants.
    fn check_parent(&self, def: &CheckpointDef) -> Result<(), BackendError> {
        let Some(p) = &def.parent else {
            return Ok(());
        };
        if *p == def.name {
            return Err(errors::invalid(format!(
                "invalid argument: cannot set moment {p} as its own parent"
            )));
        }
        let Some(mut other) = self.checkpoints.get(p) else {
            return Err(errors::invalid(format!(
                "invalid argument: parent {p} for moment {} not found",
                def.name
            )));
        };
        // A cycle: walking up from the new parent reaches this one.
        while let Some(up) = &other.parent {
            if *up == def.name {
                return Err(errors::invalid(format!(
                    "invalid argument: parent {} would create cycle to {}",
                    other.name, def.name
                )));
            }
            match self.checkpoints.get(up) {
                Some(o) => other = o,
                None => break,
            }
        }
        Ok(())
    }

    /// An embedded `<domain>` is this domain.
    fn check_embedded_uuid(&self, def: &CheckpointDef, uuid: &str) -> Result<(), BackendError> {
        if same_uuid(uuid, &self.uuid) {
            return Ok(());
        }
        Err(errors::invalid(format!(
            "invalid argument: definition for checkpoint {} must use uuid {}",
            def.name, self.uuid
        )))
    }

    /// `REDEFINE_VALIDATE`: the domain runs, and every disk it has holds
    /// the bitmap named after the checkpoint (a detached disk is
    /// tolerated).
    fn check_bitmaps(&self, def: &CheckpointDef) -> Result<(), BackendError> {
        if !self.running {
            return Err(errors::not_running());
        }
        for target in def.disks.keys() {
            let Some(present) = self.bitmaps.get(target) else {
                continue;
            };
            if !present.contains(&def.name) {
                return Err(errors::inconsistent(&def.name, target));
            }
        }
        Ok(())
    }

    /// Store an accepted definition: it replaces one of the same name (the
    /// children stay), goes in front of its siblings, consumes its crash
    /// leftover, and becomes current when its parent is current or there
    /// is none.
    fn put(&mut self, def: CheckpointDef) {
        let becomes_current =
            self.current.is_none() || def.parent.is_some() && def.parent == self.current;
        let name = def.name.clone();
        // libvirt's rewrite of NAME.xml goes through NAME.xml.new.
        self.leftovers.remove(&name);
        let parent = def.parent.clone();
        if let Some(old) = self.checkpoints.insert(name.clone(), def) {
            self.unlink(&name, old.parent);
        }
        self.link(&name, parent);
        if becomes_current {
            self.current = Some(name);
        }
    }

    /// Delete a checkpoint's metadata: its children move to the front of
    /// its parent's list, in their order; its parent becomes current if it
    /// was.
    pub(super) fn delete(&mut self, name: &str) -> Result<(), BackendError> {
        let Some(gone) = self.checkpoints.remove(name) else {
            return Err(errors::no_checkpoint(name));
        };
        self.unlink(name, gone.parent.clone());
        self.xml.remove(name);
        let orphans = self
            .children
            .remove(&Some(name.to_string()))
            .unwrap_or_default();
        for c in &orphans {
            // libvirt rewrites a re-parented child's XML.
            self.xml.remove(c);
            if let Some(child) = self.checkpoints.get_mut(c) {
                child.parent.clone_from(&gone.parent);
            }
        }
        let siblings = self.children.entry(gone.parent.clone()).or_default();
        siblings.splice(0..0, orphans);
        if self.current.as_deref() == Some(name) {
            self.current = gone.parent;
        }
        Ok(())
    }

    /// libvirt's real delete: refused on a shut-off domain (after the
    /// lookup); the checkpoint's bitmap leaves each of its disks' images
    /// (QEMU merges a non-root one into its parent's bitmap, which keeps its
    /// name), then its metadata goes as [`FakeDomain::delete`] does.
    pub(super) fn purge(&mut self, name: &str) -> Result<(), BackendError> {
        let Some(def) = self.checkpoints.get(name) else {
            return Err(errors::no_checkpoint(name));
        };
        if !self.running {
            return Err(errors::cannot_delete_inactive());
        }
        let disks: Vec<(String, String)> = def
            .disks
            .iter()
            .map(|(t, b)| (t.clone(), b.clone()))
            .collect();
        for (target, bitmap) in disks {
            if let Some(set) = self.bitmaps.get_mut(&target) {
                set.remove(&bitmap);
            }
        }
        self.delete(name)
    }

    /// The daemon restarts: every readable crash leftover is loaded (and
    /// stays, now older than the daemon), then the current checkpoint is
    /// the leaf of a single line, or none.
    pub(super) fn restart(&mut self) {
        let loaded: Vec<CheckpointDef> = self
            .leftovers
            .values()
            .filter_map(|(c, _)| c.clone())
            .collect();
        for def in loaded {
            let name = def.name.clone();
            let parent = def
                .parent
                .clone()
                .filter(|p| self.checkpoints.contains_key(p));
            if let Some(old) = self.checkpoints.insert(name.clone(), def) {
                self.unlink(&name, old.parent);
            }
            self.link(&name, parent);
            self.xml.remove(&name);
        }
        for l in self.leftovers.values_mut() {
            l.1 = true;
        }
        let defs: Vec<CheckpointDef> = self.checkpoints.values().cloned().collect();
        self.current = current_after_restart(&defs);
    }
}

/// What libvirt answers about one checkpoint: its XML, its bitmaps.
impl FakeDomain {
    /// The XML a checkpoint was last redefined with, as given; one the fake
    /// made or rewrote itself is rendered.
    pub(super) fn checkpoint_xml(&self, name: &str) -> Result<String, BackendError> {
        match (self.xml.get(name), self.checkpoints.get(name)) {
            (Some(xml), _) => Ok(xml.clone()),
            (None, Some(def)) => Ok(crate::xml::render_checkpoint(def)),
            (None, None) => Err(errors::no_checkpoint(name)),
        }
    }

    /// Like libvirt's `VIR_DOMAIN_CHECKPOINT_XML_SIZE`: the bitmap named
    /// after the checkpoint, looked for in each disk's bitmap set (disks the
    /// domain lacks are skipped); needs a running domain.
    pub(super) fn bitmap_states(&self, checkpoint: &str) -> Result<Vec<DiskBitmap>, BackendError> {
        let def = self
            .checkpoints
            .get(checkpoint)
            .ok_or_else(|| errors::no_checkpoint(checkpoint))?;
        if !self.running {
            return Err(errors::not_running());
        }
        Ok(def
            .disks
            .keys()
            .filter_map(|target| {
                let present = self.bitmaps.get(target)?;
                let state = if present.contains(checkpoint) {
                    BitmapState::Usable { dirty_bytes: 0 }
                } else {
                    BitmapState::Unusable
                };
                Some(DiskBitmap {
                    target: target.clone(),
                    state,
                })
            })
            .collect())
    }
}

/// The crash leftovers, read and removed like a local daemon's files.
impl FakeDomain {
    /// Every leftover, as [`Backend::leftovers`](crate::backend::Backend::leftovers)
    /// reports them.
    pub(super) fn leftovers(&self) -> LeftoverScan {
        LeftoverScan::Checked(
            self.leftovers
                .iter()
                .map(|(name, (content, stale))| Leftover {
                    checkpoint: name.clone(),
                    path: leftover_path(&self.name, name),
                    content: content.clone(),
                    modified: SystemTime::UNIX_EPOCH,
                    stale: *stale,
                })
                .collect(),
        )
    }

    /// Remove a stale leftover of a checkpoint libvirt does not list.
    pub(super) fn remove_leftover(&mut self, leftover: &Leftover) -> Result<(), BackendError> {
        let name = &leftover.checkpoint;
        let refuse = |why: &str| {
            Err(BackendError::new(
                K::Other,
                format!("{}: {why}", leftover.path.display()),
            ))
        };
        if leftover.path != leftover_path(&self.name, name) {
            return refuse("not a leftover of this domain");
        }
        if self.checkpoints.contains_key(name) {
            return refuse("libvirt lists its checkpoint: redefine it instead");
        }
        match self.leftovers.get(name) {
            None => Ok(()),
            Some((_, false)) => refuse("may be being written now: left alone"),
            Some(_) => {
                self.leftovers.remove(name);
                Ok(())
            }
        }
    }
}

/// Where the fake says a leftover lives.
fn leftover_path(domain: &str, name: &str) -> PathBuf {
    format!("/fake/{domain}/checkpoint/{name}.xml.new").into()
}

/// Two strings that are the same UUID.
fn same_uuid(a: &str, b: &str) -> bool {
    matches!(
        (uuid::Uuid::parse_str(a), uuid::Uuid::parse_str(b)),
        (Ok(a), Ok(b)) if a == b
    )
}

fn recompute_current(defs: &[CheckpointDef]) -> Option<String> {
    crate::chain::leaf_of(defs).map(|d| d.name.clone())
}

/// The current checkpoint libvirt sets when it loads a domain's checkpoints
/// at start-up: walking down from the roots while there is exactly one
/// child, the leaf it reaches; none when it meets a branch, or when there
/// are several roots (libvirt's `virDomainMomentFindLeaf`).
fn current_after_restart(defs: &[CheckpointDef]) -> Option<String> {
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
    fn checkpoint_xml_is_what_was_given_until_the_fake_changes_it() {
        use crate::backend::Backend;
        let fake = FakeBackend::new();
        fake.define_domain("x", "93a5c045-6457-2c09-e56c-927cdf34e178", &["vda"], true);
        let a = "<domaincheckpoint><name>a</name><creationTime>1</creationTime>\
                 <description>as given</description></domaincheckpoint>";
        let b = "<domaincheckpoint><name>b</name><parent><name>a</name></parent>\
                 <creationTime>2</creationTime></domaincheckpoint>";
        fake.redefine("x", a, false).unwrap();
        fake.redefine("x", b, false).unwrap();
        assert_eq!(fake.checkpoint_xml("x", "a").unwrap(), a);
        assert_eq!(fake.checkpoint_xml("x", "b").unwrap(), b);
        // Deleting a re-parents b: its XML is libvirt's rewrite now.
        fake.delete("x", "a").unwrap();
        let now = fake.checkpoint_xml("x", "b").unwrap();
        assert_eq!(crate::xml::parse_checkpoint(&now).unwrap().parent, None);
        assert_eq!(
            fake.checkpoint_xml("x", "a").unwrap_err().kind,
            K::NoCheckpoint
        );
    }

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
