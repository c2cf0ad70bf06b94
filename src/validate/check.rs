//! The checks of libvirt's checkpoints against the bitmaps: a shut-off
//! domain's images read in-process, a running domain checked by libvirt;
//! and the findings about libvirt's own files (crash leftovers) and the
//! disks checkpoints name that the domain no longer has.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::rules::{bitmap_findings, BitmapFinding, InUse};
use super::{backend_err, Finding, FindingKind};
use crate::backend::{
    Backend, BackendError, BackendErrorKind, BitmapState, DomainDisk, DomainInfo, LeftoverScan,
};
use crate::bitmaps::images::{DiskChain, ImageError, ImageReader, Indexed};
use crate::chain::{order_defs, CheckpointDef};
use crate::error::Result;

/// The state of one validation run.
pub(super) struct Check<'a> {
    info: &'a DomainInfo,
    libvirt: &'a [CheckpointDef],
    reader: &'a dyn ImageReader,
    /// What was found, in the report's order.
    pub(super) findings: Vec<Finding>,
    /// Checkpoints with a finding or an unknown on some disk.
    pub(super) bad: HashSet<String>,
    /// Image files read (every layer of every disk).
    pub(super) images_read: usize,
    /// Checkpoints libvirt checked (a running domain).
    pub(super) validations: usize,
    /// What was not checked, and why.
    pub(super) notes: Vec<String>,
}

/// A disk's chain as read, or why it is unknown.
enum Read {
    Chain(DiskChain),
    Unknown,
}

impl<'a> Check<'a> {
    pub(super) fn new(
        info: &'a DomainInfo,
        libvirt: &'a [CheckpointDef],
        reader: &'a dyn ImageReader,
    ) -> Self {
        Check {
            info,
            libvirt,
            reader,
            findings: Vec::new(),
            bad: HashSet::new(),
            images_read: 0,
            validations: 0,
            notes: Vec::new(),
        }
    }

    /// Check libvirt's checkpoints against the bitmaps: by libvirt when the
    /// domain runs, in its images when it is shut off (or stops meanwhile).
    /// Returns whether the domain was checked running.
    ///
    /// # Errors
    ///
    /// libvirt's, other than a domain that stopped.
    pub(super) fn run(
        &mut self,
        backend: &dyn Backend,
        domain: &str,
        journal: &[CheckpointDef],
    ) -> std::result::Result<bool, BackendError> {
        if !self.info.running {
            self.stopped(journal);
            return Ok(false);
        }
        match self.running(backend, domain) {
            Ok(()) => {
                self.notes.push(
                    "the domain is running: bitmaps checked by libvirt; orphans not looked for"
                        .into(),
                );
                Ok(true)
            }
            // The domain stopped since it was looked up: check its images.
            Err(e) if e.kind == BackendErrorKind::NotRunning => {
                self.notes.push(
                    "the domain stopped during validation: its images were checked instead".into(),
                );
                self.findings.clear();
                self.bad.clear();
                self.stopped(journal);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Read one disk's chain, recording an unreadable image as a finding;
    /// also a note when the chain goes on where it was not followed.
    fn read(&mut self, disk: &DomainDisk) -> (Read, Option<String>) {
        let Some(source) = &disk.source else {
            self.unreadable(
                disk,
                None,
                "the disk has no local file or block device source: its bitmaps cannot be read"
                    .into(),
            );
            return (Read::Unknown, None);
        };
        if disk.format.as_deref().is_some_and(|f| f != "qcow2") {
            return (Read::Chain(DiskChain::default()), None);
        }
        match self.reader.read_chain(source) {
            Ok(chain) => {
                self.images_read += chain.layers.len();
                let note = chain.unfollowed.as_ref().map(|name| {
                    format!(
                        "disk {}: backing file {name:?} is not a local file and was not read; bitmaps below it \
                         not checked",
                        disk.target
                    )
                });
                (Read::Chain(chain), note)
            }
            Err(ImageError::NotQcow2 { .. }) => {
                self.images_read += 1;
                (Read::Chain(DiskChain::default()), None)
            }
            Err(ImageError::Unreadable { path, reason }) => {
                self.images_read += 1;
                self.unreadable(disk, Some(path), reason);
                (Read::Unknown, None)
            }
        }
    }

    fn unreadable(&mut self, disk: &DomainDisk, image: Option<std::path::PathBuf>, detail: String) {
        self.findings.push(Finding {
            kind: FindingKind::UnreadableImage,
            checkpoint: None,
            disk: Some(disk.target.clone()),
            image,
            detail,
        });
    }

    /// The findings about one checkpoint's bitmap on one disk; any makes
    /// the checkpoint unusable.
    fn bitmap(&mut self, def: &CheckpointDef, disk: &DomainDisk, found: Vec<BitmapFinding>) {
        if !found.is_empty() {
            self.bad.insert(def.name.clone());
        }
        for (kind, image, detail) in found {
            self.findings.push(Finding {
                kind,
                checkpoint: Some(def.name.clone()),
                disk: Some(disk.target.clone()),
                image: image.or_else(|| disk.source.clone()),
                detail,
            });
        }
    }

    /// The image checks of a shut-off domain: each disk's chain read once.
    fn stopped(&mut self, journal: &[CheckpointDef]) {
        for disk in &self.info.disks {
            self.stopped_disk(disk, journal);
        }
    }

    fn stopped_disk(&mut self, disk: &DomainDisk, journal: &[CheckpointDef]) {
        let libvirt = self.libvirt;
        let named: Vec<(&CheckpointDef, &str)> = libvirt
            .iter()
            .filter_map(|d| d.disks.get(&disk.target).map(|b| (d, b.as_str())))
            .collect();
        let (read, note) = self.read(disk);
        self.notes.extend(note);
        let Read::Chain(chain) = read else {
            self.bad.extend(named.iter().map(|(d, _)| d.name.clone()));
            return;
        };
        let indexed = Indexed::new(&chain);
        for (def, bitmap) in &named {
            self.bitmap(def, disk, bitmap_findings(&indexed, bitmap, InUse::Damage));
        }
        let known: HashSet<&str> = named
            .iter()
            .map(|(_, b)| *b)
            .chain(
                journal
                    .iter()
                    .filter_map(|d| d.disks.get(&disk.target).map(String::as_str)),
            )
            .collect();
        self.orphans(disk, &chain, &known);
    }

    /// The bitmaps of a disk's top image that no checkpoint names for it.
    fn orphans(&mut self, disk: &DomainDisk, chain: &DiskChain, known: &HashSet<&str>) {
        let Some(top) = chain.layers.first() else {
            return;
        };
        for b in top
            .bitmaps
            .iter()
            .filter(|b| !known.contains(b.name.as_str()))
        {
            self.findings.push(Finding {
                kind: FindingKind::OrphanBitmap,
                checkpoint: Some(b.name.clone()),
                disk: Some(disk.target.clone()),
                image: Some(top.path.clone()),
                detail: format!(
                    "bitmap {} is in the top image but no checkpoint names it for this disk",
                    b.name
                ),
            });
        }
    }

    /// libvirt's check of a running domain, read per checkpoint and per
    /// disk ([`Backend::bitmap_states`]): nothing is written. Where the
    /// backend cannot check per disk, each checkpoint is redefined exactly
    /// as libvirt holds it with `REDEFINE_VALIDATE` instead, which names
    /// only the first bad disk ([`Check::running_whole`]). Findings are
    /// ordered as a shut-off domain's: per disk, then libvirt's order.
    fn running(
        &mut self,
        backend: &dyn Backend,
        domain: &str,
    ) -> std::result::Result<(), BackendError> {
        let mut unusable = Vec::new();
        for (i, def) in self.libvirt.iter().enumerate() {
            let states = match backend.bitmap_states(domain, &def.name) {
                Ok(states) => states,
                Err(e) if e.kind == BackendErrorKind::Unsupported && i == 0 => {
                    self.notes.push(format!(
                        "libvirt's per-disk check is not available ({}): each checkpoint was redefined as \
                         libvirt holds it with REDEFINE_VALIDATE, which names only its first bad disk",
                        e.message
                    ));
                    return self.running_whole(backend, domain);
                }
                Err(e) => return Err(e),
            };
            self.validations += 1;
            for s in states
                .into_iter()
                .filter(|s| s.state == BitmapState::Unusable)
            {
                let disk = self.info.disks.iter().position(|d| d.target == s.target);
                unusable.push((disk, i, s.target));
            }
        }
        unusable.sort();
        let (libvirt, mut on_disk) = (self.libvirt, OnDisk::default());
        for (_, i, target) in unusable {
            let def = &libvirt[i];
            let why = format!(
                "libvirt finds a missing or broken bitmap '{}' for disk '{target}'",
                def.name
            );
            self.unusable(def, &target, &why, &mut on_disk);
        }
        Ok(())
    }

    /// The fallback of [`Check::running`]: every checkpoint redefined
    /// with exactly the XML libvirt holds ([`Backend::checkpoint_xml`],
    /// `<domain>` included) and `REDEFINE_VALIDATE`, parent first, the
    /// leaf's branch last, so libvirt's hidden *current* checkpoint stays
    /// on the leaf (a refused redefine changes nothing). libvirt stops at
    /// the first bad disk of each checkpoint.
    fn running_whole(
        &mut self,
        backend: &dyn Backend,
        domain: &str,
    ) -> std::result::Result<(), BackendError> {
        let mut on_disk = OnDisk::default();
        for def in order_defs(self.libvirt) {
            let xml = backend.checkpoint_xml(domain, &def.name)?;
            self.validations += 1;
            let e = match backend.redefine(domain, &xml, true) {
                Ok(()) => continue,
                Err(e) if e.kind == BackendErrorKind::Inconsistent => e,
                Err(e) => return Err(e),
            };
            let why = format!("libvirt refused to validate it: {}", e.message);
            match refused_disk(def, &e.message, self.info) {
                Some(target) => self.unusable(def, target, &why, &mut on_disk),
                None => {
                    self.bad.insert(def.name.clone());
                    self.findings.push(Finding {
                        kind: FindingKind::InconsistentBitmap,
                        checkpoint: Some(def.name.clone()),
                        disk: None,
                        image: None,
                        detail: why,
                    });
                }
            }
        }
        Ok(())
    }

    /// A bitmap libvirt finds missing or broken on a running domain: the
    /// image on disk tells which, by the same rules as a shut-off domain's
    /// except that a bitmap in use is expected there — missing when it is
    /// in no layer, the rule it breaks when it breaks one, inconsistent
    /// (QEMU's copy differs from the file's) otherwise.
    fn unusable(&mut self, def: &CheckpointDef, target: &str, why: &str, on_disk: &mut OnDisk) {
        self.bad.insert(def.name.clone());
        let Some(disk) = self.info.disks.iter().find(|d| d.target == target) else {
            return;
        };
        if !on_disk.0.contains_key(target) {
            // A note about an unfollowed backing file is the shut-off
            // check's: here libvirt has read the whole chain.
            let (read, _) = self.read(disk);
            on_disk.0.insert(target.to_string(), read);
        }
        let bitmap = def
            .disks
            .get(target)
            .map_or(def.name.as_str(), String::as_str);
        let found = on_disk_findings(on_disk.0.get(target), bitmap);
        let found = found
            .into_iter()
            .map(|(kind, image, detail)| (kind, image, format!("{why}; {detail}")))
            .collect();
        self.bitmap(def, disk, found);
    }
}

/// What the image on disk says of a bitmap libvirt finds missing or broken
/// on a running domain; never empty.
fn on_disk_findings(read: Option<&Read>, bitmap: &str) -> Vec<BitmapFinding> {
    let found = match read {
        Some(Read::Chain(chain)) => bitmap_findings(&Indexed::new(chain), bitmap, InUse::Expected),
        _ => vec![(
            FindingKind::InconsistentBitmap,
            None,
            "the image on disk could not be read".to_string(),
        )],
    };
    if found.is_empty() {
        return vec![(
            FindingKind::InconsistentBitmap,
            None,
            format!("bitmap {bitmap} looks sound in the image on disk, which lags behind QEMU's"),
        )];
    }
    found
}

/// The chains of a running domain's disks read so far (only where libvirt
/// found a bad bitmap).
#[derive(Default)]
struct OnDisk(HashMap<String, Read>);

/// The disk a refused validation is about: the one libvirt's message names
/// ("... for disk 'vda'") if the checkpoint names it, else the checkpoint's
/// only disk the domain has.
fn refused_disk<'a>(def: &'a CheckpointDef, message: &str, info: &DomainInfo) -> Option<&'a str> {
    let mut attached = def.disks.keys().filter(|t| info.has_target(t));
    if let Some(named) = message
        .rsplit_once("for disk '")
        .and_then(|(_, rest)| rest.split_once('\''))
    {
        if let Some(t) = def.disks.keys().find(|t| **t == named.0) {
            return Some(t.as_str());
        }
    }
    match (attached.next(), attached.next()) {
        (Some(t), None) => Some(t.as_str()),
        _ => None,
    }
}

/// Notes for checkpoints naming disks the domain no longer has (libvirt
/// tolerates them: a disk may have been detached).
pub(super) fn detached_notes(libvirt: &[CheckpointDef], info: &DomainInfo) -> Vec<String> {
    let mut by_target: BTreeMap<&str, usize> = BTreeMap::new();
    for d in libvirt {
        for t in d.disks.keys().filter(|t| !info.has_target(t)) {
            *by_target.entry(t).or_default() += 1;
        }
    }
    by_target
        .into_iter()
        .map(|(t, n)| {
            format!("{n} checkpoint(s) name disk {t}, which the domain no longer has: not checked")
        })
        .collect()
}

/// libvirt's crash leftovers among the domain's checkpoint files, each a
/// finding; where the files cannot be read, a note says so.
pub(super) fn leftover_findings(
    backend: &dyn Backend,
    domain: &str,
    libvirt: &[CheckpointDef],
    findings: &mut Vec<Finding>,
    notes: &mut Vec<String>,
) -> Result<()> {
    match backend
        .leftovers(domain)
        .map_err(backend_err(domain, "leftovers"))?
    {
        LeftoverScan::CannotCheck(why) => notes.push(format!(
            "libvirt's metadata files not checked for crash leftovers: {why}"
        )),
        LeftoverScan::Checked(found) => findings.extend(found.iter().map(|l| Finding {
            kind: FindingKind::LibvirtLeftover,
            checkpoint: Some(l.checkpoint.clone()),
            disk: None,
            image: Some(l.path.clone()),
            detail: format!(
                "{}; a sync, recover or import of the domain repairs it",
                crate::leftovers::effect(l, libvirt.iter().find(|d| d.name == l.checkpoint))
            ),
        })),
    }
    Ok(())
}
