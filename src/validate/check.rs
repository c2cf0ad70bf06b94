//! The checks of libvirt's checkpoints against the bitmaps: a shut-off
//! domain's images read in-process, a running domain checked by libvirt;
//! and the findings about libvirt's own files (crash leftovers) and the
//! disks checkpoints name that the domain no longer has.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::images::{DiskChain, ImageError, ImageReader, Indexed};
use super::rules::bitmap_findings;
use super::{backend_err, Finding, FindingKind};
use crate::backend::{
    Backend, BackendError, BackendErrorKind, DomainDisk, DomainInfo, LeftoverScan,
};
use crate::chain::{order_defs, CheckpointDef};
use crate::error::Result;
use crate::xml::render_checkpoint;

/// The state of one validation run.
pub(super) struct Check<'a> {
    pub(super) info: &'a DomainInfo,
    pub(super) libvirt: &'a [CheckpointDef],
    pub(super) reader: &'a dyn ImageReader,
    pub(super) findings: Vec<Finding>,
    /// Checkpoints with a finding or an unknown on some disk.
    pub(super) bad: HashSet<String>,
}

/// A disk's chain as read, or why it is unknown.
enum Read {
    Chain(DiskChain),
    Unknown,
}

impl Check<'_> {
    /// Read one disk's chain, recording an unreadable image as a finding.
    fn read(
        &mut self,
        disk: &DomainDisk,
        images_read: &mut usize,
        notes: &mut Vec<String>,
    ) -> Read {
        let Some(source) = &disk.source else {
            self.findings.push(Finding {
                kind: FindingKind::UnreadableImage,
                checkpoint: None,
                disk: Some(disk.target.clone()),
                image: None,
                detail:
                    "the disk has no local file or block device source: its bitmaps cannot be read"
                        .into(),
            });
            return Read::Unknown;
        };
        if disk.format.as_deref().is_some_and(|f| f != "qcow2") {
            return Read::Chain(DiskChain::default());
        }
        match self.reader.read_chain(source) {
            Ok(chain) => {
                *images_read += chain.layers.len();
                if let Some(name) = &chain.unfollowed {
                    notes.push(format!(
                        "disk {}: backing file {name:?} is not a local file and was not read; bitmaps below it \
                         not checked",
                        disk.target
                    ));
                }
                Read::Chain(chain)
            }
            Err(ImageError::NotQcow2 { .. }) => {
                *images_read += 1;
                Read::Chain(DiskChain::default())
            }
            Err(ImageError::Unreadable { path, reason }) => {
                *images_read += 1;
                self.findings.push(Finding {
                    kind: FindingKind::UnreadableImage,
                    checkpoint: None,
                    disk: Some(disk.target.clone()),
                    image: Some(path),
                    detail: reason,
                });
                Read::Unknown
            }
        }
    }

    /// The image checks of a shut-off domain: each disk's chain read once.
    pub(super) fn stopped(
        &mut self,
        journal: &[CheckpointDef],
        images_read: &mut usize,
        notes: &mut Vec<String>,
    ) {
        let libvirt = self.libvirt;
        for disk in &self.info.disks {
            let named: Vec<(&CheckpointDef, &str)> = libvirt
                .iter()
                .filter_map(|d| d.disks.get(&disk.target).map(|b| (d, b.as_str())))
                .collect();
            let chain = match self.read(disk, images_read, notes) {
                Read::Chain(chain) => chain,
                Read::Unknown => {
                    self.bad.extend(named.iter().map(|(d, _)| d.name.clone()));
                    continue;
                }
            };
            let indexed = Indexed::new(&chain);
            for (def, bitmap) in &named {
                let found = bitmap_findings(&indexed, bitmap);
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
            let Some(top) = chain.layers.first() else {
                continue;
            };
            let known: HashSet<&str> = named
                .iter()
                .map(|(_, b)| *b)
                .chain(
                    journal
                        .iter()
                        .filter_map(|d| d.disks.get(&disk.target).map(String::as_str)),
                )
                .collect();
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
    }

    /// libvirt's check of a running domain: every checkpoint redefined in
    /// place with `REDEFINE_VALIDATE`, parent first, the leaf's branch last.
    pub(super) fn running(
        &mut self,
        backend: &dyn Backend,
        domain: &str,
        images_read: &mut usize,
        validations: &mut usize,
    ) -> std::result::Result<(), BackendError> {
        let mut chains: HashMap<String, Read> = HashMap::new();
        let mut ignored = Vec::new();
        for def in order_defs(self.libvirt) {
            *validations += 1;
            let e = match backend.redefine(domain, &render_checkpoint(def), true) {
                Ok(()) => continue,
                Err(e) if e.kind == BackendErrorKind::Inconsistent => e,
                Err(e) => return Err(e),
            };
            self.bad.insert(def.name.clone());
            let target = refused_disk(def, &e.message, self.info);
            let mut kind = FindingKind::InconsistentBitmap;
            let mut image = None;
            let mut on_disk = String::new();
            if let Some((target, bitmap)) = target.and_then(|t| def.disks.get_key_value(t)) {
                let disk = self.info.disks.iter().find(|d| d.target == *target);
                if let Some(disk) = disk {
                    image = disk.source.clone();
                    if !chains.contains_key(target) {
                        let read = self.read(disk, images_read, &mut ignored);
                        chains.insert(target.clone(), read);
                    }
                    if let Some(Read::Chain(chain)) = chains.get(target) {
                        if Indexed::new(chain).in_any_layer(bitmap) {
                            on_disk = format!("; bitmap {bitmap} is in the image on disk");
                        } else {
                            kind = FindingKind::MissingBitmap;
                            on_disk =
                                format!("; bitmap {bitmap} is in no layer of the image on disk");
                        }
                    }
                }
            }
            self.findings.push(Finding {
                kind,
                checkpoint: Some(def.name.clone()),
                disk: target.map(str::to_string),
                image,
                detail: format!("libvirt refused to validate it: {}{on_disk}", e.message),
            });
        }
        Ok(())
    }
}

/// The disk a refused validation is about: the one libvirt's message names
/// ("... for disk 'vda'") if the checkpoint names it, else the checkpoint's
/// only disk the domain has. Used to annotate the finding only.
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
