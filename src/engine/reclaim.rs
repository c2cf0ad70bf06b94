//! `reclaim`: find the bitmaps and checkpoints that block backups — orphan
//! bitmaps, inconsistent ones, checkpoints left with no usable bitmap — and,
//! with `apply`, remove them in one journaled transaction (the lifecycle
//! driver). The scan itself is `bitmaps::reclaim`; this file reads the
//! domain, libvirt and the images for it, and turns its answer into
//! actions.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::lifecycle::{image_error, Action};
use super::txn::backend_err;
use super::Store;
use crate::backend::{Backend, BackendErrorKind, BitmapState, DomainInfo};
use crate::bitmaps::images::{DiskChain, ImageError};
use crate::bitmaps::reclaim::{
    scan, BitmapRef, CheckpointAction, InconsistentBitmap, ReclaimedCheckpoint, Scan, ScanInput,
};
use crate::chain::{Chain, CheckpointDef};
use crate::error::{Error, Result};
use crate::journal::{Committed, TxnKind};

/// What [`Store::reclaim`] found and did (the `reclaim` document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReclaimReport {
    /// The transaction; `None` on a dry run, or when there was nothing to
    /// do.
    pub txn: Option<Uuid>,
    /// The domain.
    pub domain: String,
    /// Whether the removals were made (`--apply`); a dry run changes
    /// nothing.
    pub applied: bool,
    /// Bitmaps no checkpoint names, in libvirt or in the committed chain
    /// within its scope.
    pub orphans: Vec<BitmapRef>,
    /// Bitmaps in use on a shut-off image, or in an image whose bitmaps
    /// extension is marked inconsistent.
    pub inconsistent: Vec<InconsistentBitmap>,
    /// Checkpoints that lose disks: degraded to the disks whose bitmap
    /// stays usable, or deleted when none is left.
    pub checkpoints: Vec<ReclaimedCheckpoint>,
    /// Bitmaps outside the committed chain's scope (another tool's) that no
    /// checkpoint names or that are broken: reported, never removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign_bitmaps: Vec<BitmapRef>,
    /// Mutating libvirt calls made.
    pub libvirt_calls: u64,
    /// Things the caller should know (disks that could not be read).
    pub warnings: Vec<String>,
}

/// What the scan was made from.
pub(super) struct Scanned {
    pub(super) info: DomainInfo,
    pub(super) libvirt: Vec<CheckpointDef>,
    pub(super) committed: Option<Committed>,
    pub(super) scan: Scan,
    pub(super) warnings: Vec<String>,
}

impl Store {
    /// Find the domain's orphan and inconsistent bitmaps and the
    /// checkpoints they leave without a usable bitmap; with `apply`, remove
    /// them in one journaled transaction (a shut-off domain's with
    /// `qemu-img bitmap --remove`, a running one's through libvirt) and
    /// degrade or delete those checkpoints, in libvirt and in the committed
    /// chain. Without `apply` nothing is changed anywhere.
    ///
    /// # Errors
    ///
    /// [`Error::Backend`] when the domain does not exist or libvirt cannot
    /// be reached; [`Error::Busy`] when a live process works on the domain;
    /// [`Error::ImageInUse`] (nothing changed) when another process holds
    /// an image a removal must write; with `apply`, the lifecycle
    /// transaction's errors (a failure part-way leaves it open for
    /// `recover`); [`Error::Journal`].
    pub fn reclaim(
        &self,
        backend: &dyn Backend,
        domain: &str,
        apply: bool,
    ) -> Result<ReclaimReport> {
        let (scanned, recovered) = {
            let _lock = self.lock_domain(domain)?;
            let mut recovered = Vec::new();
            if apply {
                // A dead owner's transaction is finished before the scan.
                for r in self.recover_domain_first(backend, domain)? {
                    recovered.push(format!(
                        "recovered interrupted transaction {} first ({:?})",
                        r.txn, r.outcome
                    ));
                }
            } else {
                for t in self.journal.incomplete(Some(domain))? {
                    if !self.orphaned(&t) {
                        return Err(Error::Busy {
                            domain: domain.to_string(),
                            txn: Some(t.id),
                            owner: Some(t.owner),
                        });
                    }
                    recovered.push(format!(
                        "transaction {} on this domain was interrupted and is still open: run recover first",
                        t.id
                    ));
                }
            }
            let scanned = self.reclaim_scan(backend, domain)?;
            if apply && !scanned.info.running {
                self.reclaim_writable(domain, &scanned.scan)?;
            }
            (scanned, recovered)
        };
        let mut report = ReclaimReport {
            txn: None,
            domain: domain.to_string(),
            applied: false,
            orphans: scanned.scan.orphans.clone(),
            inconsistent: scanned.scan.inconsistent.clone(),
            checkpoints: scanned.scan.checkpoints.clone(),
            foreign_bitmaps: scanned.scan.foreign.clone(),
            libvirt_calls: 0,
            warnings: recovered
                .into_iter()
                .chain(scanned.warnings.iter().cloned())
                .collect(),
        };
        if !apply {
            return Ok(report);
        }
        self.reclaim_apply(backend, domain, &scanned, &mut report)?;
        report.applied = true;
        Ok(report)
    }

    /// Read the domain, libvirt's checkpoints, the committed chain and each
    /// disk's images, and judge them.
    pub(super) fn reclaim_scan(&self, backend: &dyn Backend, domain: &str) -> Result<Scanned> {
        let info =
            backend
                .domain_info(domain)
                .map_err(backend_err(domain, "domain lookup", None))?;
        let libvirt = backend
            .list(domain)
            .map_err(backend_err(domain, "list", None))?;
        let committed = self.journal.committed(domain)?;
        let mut warnings = Vec::new();
        let mut disks: BTreeMap<String, DiskChain> = BTreeMap::new();
        for disk in &info.disks {
            let Some(source) = &disk.source else {
                warnings.push(format!(
                    "disk {}: no local image to read; its bitmaps were not looked at",
                    disk.target
                ));
                continue;
            };
            if disk.format.as_deref().is_some_and(|f| f != "qcow2") {
                disks.insert(disk.target.clone(), DiskChain::default());
                continue;
            }
            match self.images().read_chain(source) {
                Ok(chain) => {
                    if let Some(name) = &chain.unfollowed {
                        warnings.push(format!(
                            "disk {}: backing file {name:?} is not a local file and was not read",
                            disk.target
                        ));
                    }
                    disks.insert(disk.target.clone(), chain);
                }
                Err(ImageError::NotQcow2 { .. }) => {
                    disks.insert(disk.target.clone(), DiskChain::default());
                }
                Err(ImageError::Unreadable { path, reason }) => warnings.push(format!(
                    "disk {}: {} cannot be read ({reason}); its bitmaps were not looked at",
                    disk.target,
                    path.display()
                )),
            }
        }
        let unusable = if info.running {
            running_states(backend, domain, &libvirt, &mut warnings)?
        } else {
            BTreeMap::new()
        };
        let scope = committed
            .as_ref()
            .and_then(|c| c.chain.as_ref())
            .and_then(|c| c.scope.as_deref());
        let scan = scan(&ScanInput {
            running: info.running,
            disks: &disks,
            libvirt: &libvirt,
            committed: committed.as_ref().map_or(&[][..], |c| c.defs.as_slice()),
            scope,
            unusable: &unusable,
        });
        Ok(Scanned {
            info,
            libvirt,
            committed,
            scan,
            warnings,
        })
    }
}

/// A running domain: the disks of each checkpoint whose bitmap libvirt
/// finds missing or broken (libvirt's own check, which writes nothing).
fn running_states(
    backend: &dyn Backend,
    domain: &str,
    libvirt: &[CheckpointDef],
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut out = BTreeMap::new();
    if !backend
        .checks_bitmaps()
        .map_err(backend_err(domain, "bitmap check", None))?
    {
        warnings.push(
            "this libvirt driver does not check bitmaps: the checkpoints' bitmaps were not judged"
                .into(),
        );
        return Ok(out);
    }
    for def in libvirt {
        match backend.bitmap_states(domain, &def.name) {
            Ok(states) => {
                let bad: BTreeSet<String> = states
                    .into_iter()
                    .filter(|s| s.state == BitmapState::Unusable)
                    .map(|s| s.target)
                    .collect();
                if !bad.is_empty() {
                    out.insert(def.name.clone(), bad);
                }
            }
            Err(e) if e.is_connection() || e.kind == BackendErrorKind::NoDomain => {
                return Err(backend_err(domain, "bitmap check", None)(e));
            }
            Err(e) => {
                warnings.push(format!(
                    "libvirt could not check the bitmaps of checkpoint {}: {e}",
                    def.name
                ));
            }
        }
    }
    Ok(out)
}

impl Store {
    /// Refuse, before any change, an image another process holds open
    /// (QEMU's lock): every layer a removal writes.
    fn reclaim_writable(&self, domain: &str, scan: &Scan) -> Result<()> {
        let images: BTreeSet<PathBuf> = scan.removals().into_iter().map(|r| r.image).collect();
        for image in images {
            self.editor()
                .check_writable(&image)
                .map_err(|e| image_error(domain, None, e))?;
        }
        Ok(())
    }

    /// Apply a scan in one lifecycle transaction: the removals, then the
    /// degraded checkpoints redefined (parent first), then the deleted ones
    /// (children first); the committed chain becomes libvirt's listing
    /// afterwards.
    fn reclaim_apply(
        &self,
        backend: &dyn Backend,
        domain: &str,
        scanned: &Scanned,
        report: &mut ReclaimReport,
    ) -> Result<()> {
        if scanned.scan.is_empty() {
            return Ok(());
        }
        let actions = actions(scanned);
        let chain = scanned
            .committed
            .as_ref()
            .and_then(|c| c.chain.as_ref())
            .map(|c| new_chain(c, &scanned.scan));
        let run = self.run_lifecycle(
            backend,
            domain,
            TxnKind::Reclaim,
            chain.as_ref(),
            scanned.scan.target.clone(),
            actions,
        )?;
        report.txn = Some(run.txn);
        report.libvirt_calls = run.libvirt_calls;
        report.warnings.extend(run.warnings);
        Ok(())
    }
}

/// The actions of a reclaim, in order.
fn actions(scanned: &Scanned) -> Vec<Action> {
    let scan = &scanned.scan;
    let by_name: HashMap<&str, &CheckpointDef> = scanned
        .libvirt
        .iter()
        .map(|d| (d.name.as_str(), d))
        .collect();
    let deleted: Vec<&CheckpointDef> = scan
        .checkpoints
        .iter()
        .filter(|c| c.action == CheckpointAction::Deleted)
        .filter_map(|c| by_name.get(c.checkpoint.as_str()).copied())
        .collect();
    let degraded: HashSet<&str> = scan
        .checkpoints
        .iter()
        .filter(|c| c.action == CheckpointAction::Degraded)
        .map(|c| c.checkpoint.as_str())
        .collect();
    // Metadata first (a rollback can still restore it), removals last.
    let mut out: Vec<Action> = scan
        .target
        .iter()
        .filter(|d| degraded.contains(d.name.as_str()))
        .map(|d| Action::Redefine { def: d.clone() })
        .collect();
    for def in deleted.iter().rev() {
        out.push(Action::DeleteMetadata {
            checkpoint: (*def).clone(),
        });
    }
    if !scanned.info.running {
        for r in scan.removals() {
            out.push(Action::RemoveBitmap {
                checkpoint: r.bitmap,
                target: r.target,
                image: r.image,
            });
        }
        return out;
    }
    // A running domain, libvirt's way (vdsm's): a root checkpoint naming
    // the bitmaps to remove is defined, then deleted for real, which
    // removes them (a root's delete merges them into no parent).
    let mut groups: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for r in scan.removals() {
        groups
            .entry(r.bitmap.clone())
            .or_default()
            .insert(r.target, r.bitmap);
    }
    let taken: HashSet<&str> = scanned.libvirt.iter().map(|d| d.name.as_str()).collect();
    for (bitmap, disks) in groups {
        let def = CheckpointDef {
            name: free_name(&bitmap, &taken),
            parent: None,
            creation_time: chrono::Utc::now().timestamp(),
            description: Some(format!("ckptstore reclaim: removes bitmap {bitmap}")),
            disks,
        };
        out.push(Action::Redefine { def: def.clone() });
        out.push(Action::Purge { checkpoint: def });
    }
    out
}

/// A checkpoint name for the bitmap's removal that libvirt does not hold.
fn free_name(bitmap: &str, taken: &HashSet<&str>) -> String {
    if !taken.contains(bitmap) {
        return bitmap.to_string();
    }
    // One of these is free: `taken` holds fewer names.
    (1..=taken.len() + 1)
        .map(|i| format!("{bitmap}-reclaim-{i}"))
        .find(|n| !taken.contains(n.as_str()))
        .unwrap_or_default()
}

/// The committed chain with the scan's changes: deleted checkpoints gone
/// (their children on their nearest kept ancestor), degraded ones without
/// the disks they lose.
fn new_chain(chain: &Chain, scan: &Scan) -> Chain {
    let mut c = chain.clone();
    let ids: HashMap<&str, &str> = chain
        .disks
        .iter()
        .map(|(id, t)| (t.as_str(), id.as_str()))
        .collect();
    let mut gone: HashMap<String, Option<String>> = HashMap::new();
    for cp in &scan.checkpoints {
        match cp.action {
            CheckpointAction::Deleted => {
                let parent = chain
                    .checkpoints
                    .iter()
                    .find(|k| k.id == cp.checkpoint)
                    .and_then(|k| k.parent.clone());
                gone.insert(cp.checkpoint.clone(), parent);
            }
            CheckpointAction::Degraded => {
                if let Some(k) = c.checkpoints.iter_mut().find(|k| k.id == cp.checkpoint) {
                    k.disks.retain(|id| {
                        !cp.disks
                            .iter()
                            .any(|t| ids.get(t.as_str()) == Some(&id.as_str()))
                    });
                }
            }
        }
    }
    c.checkpoints.retain(|k| !gone.contains_key(&k.id));
    for k in &mut c.checkpoints {
        while let Some(up) = k.parent.as_ref().and_then(|p| gone.get(p)) {
            k.parent.clone_from(up);
        }
    }
    c
}
