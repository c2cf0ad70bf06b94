//! The scan of `reclaim`: which bitmaps of a domain's images no checkpoint
//! needs (orphans), which are broken (in use on a shut-off image, or in an
//! image whose bitmaps extension is marked inconsistent), which are another
//! tool's (foreign: outside the committed chain's scope), and what becomes
//! of the checkpoints once those are gone (degraded to the disks whose
//! bitmap stays usable, or deleted when none is left).
//!
//! Pure: the caller reads the images and libvirt; this file only judges.
//! A healthy bitmap a checkpoint names is never removed.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::images::{DiskChain, Indexed, Layer};
use super::rules::{bitmap_problems, InUse};
use super::{degrade, Bad};
use crate::chain::CheckpointDef;

/// One bitmap in one image layer of one disk.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BitmapRef {
    /// The disk's target name.
    pub target: String,
    /// The image layer that holds the bitmap.
    pub image: PathBuf,
    /// The bitmap's name.
    pub bitmap: String,
}

/// Why a bitmap is inconsistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InconsistentReason {
    /// Flag `in_use` on the image of a shut-off domain: QEMU did not save
    /// it cleanly.
    InUse,
    /// The image's bitmaps extension is marked inconsistent (autoclear bit
    /// 0 clear): QEMU ignores every bitmap of the image.
    InconsistentExtension,
}

/// A broken bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InconsistentBitmap {
    /// The disk's target name.
    pub target: String,
    /// The image layer that holds the bitmap.
    pub image: PathBuf,
    /// The bitmap's name.
    pub bitmap: String,
    /// What is wrong with it.
    pub reason: InconsistentReason,
}

/// What becomes of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointAction {
    /// Redefined without the disks listed (`checkpoint='no'` for them).
    Degraded,
    /// Deleted: no disk of it keeps a usable bitmap.
    Deleted,
}

/// A checkpoint that loses disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReclaimedCheckpoint {
    /// The checkpoint.
    pub checkpoint: String,
    /// Degraded or deleted.
    pub action: CheckpointAction,
    /// The disks (targets) it loses: whose bitmap is removed or unusable
    /// (for a deleted checkpoint, all the disks it named).
    pub disks: Vec<String>,
}

/// What the scan is given.
pub(crate) struct ScanInput<'a> {
    /// The domain runs: every bitmap of its images is in use by design,
    /// and the images on disk lag behind QEMU's bitmaps, so only orphans
    /// are read from them; the checkpoints are judged by `unusable`.
    pub(crate) running: bool,
    /// Each readable disk's chain, by target.
    pub(crate) disks: &'a BTreeMap<String, DiskChain>,
    /// libvirt's checkpoints, parent first.
    pub(crate) libvirt: &'a [CheckpointDef],
    /// The committed chain's checkpoints (empty when none).
    pub(crate) committed: &'a [CheckpointDef],
    /// The committed chain's scope: a name prefix.
    pub(crate) scope: Option<&'a str>,
    /// A running domain: checkpoint → the disks whose bitmap libvirt finds
    /// missing or broken.
    pub(crate) unusable: &'a BTreeMap<String, BTreeSet<String>>,
}

/// What the scan found, and what libvirt should hold afterwards.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Bitmaps no checkpoint names (in scope).
    pub(crate) orphans: Vec<BitmapRef>,
    /// Broken bitmaps (in scope).
    pub(crate) inconsistent: Vec<InconsistentBitmap>,
    /// Bitmaps outside the scope that no checkpoint names or that are
    /// broken: another tool's, never removed.
    pub(crate) foreign: Vec<BitmapRef>,
    /// The checkpoints degraded or deleted, in libvirt's order.
    pub(crate) checkpoints: Vec<ReclaimedCheckpoint>,
    /// libvirt's checkpoints afterwards, parent first.
    pub(crate) target: Vec<CheckpointDef>,
}

impl Scan {
    /// Every bitmap to remove (orphans and inconsistent), in image order.
    pub(crate) fn removals(&self) -> Vec<BitmapRef> {
        let mut all: Vec<BitmapRef> = self
            .orphans
            .iter()
            .cloned()
            .chain(self.inconsistent.iter().map(|b| BitmapRef {
                target: b.target.clone(),
                image: b.image.clone(),
                bitmap: b.bitmap.clone(),
            }))
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Nothing to do.
    pub(crate) fn is_empty(&self) -> bool {
        self.orphans.is_empty() && self.inconsistent.is_empty() && self.checkpoints.is_empty()
    }
}

/// Judge the domain's bitmaps and checkpoints.
pub(crate) fn scan(input: &ScanInput<'_>) -> Scan {
    let in_scope = |name: &str| input.scope.is_none_or(|s| name.starts_with(s));
    let mut out = Scan::default();
    // First pass: broken bitmaps, and orphans by the names checkpoints
    // give now.
    let claimed = claims(
        input
            .libvirt
            .iter()
            .chain(input.committed.iter().filter(|d| in_scope(&d.name))),
    );
    let mut removed: HashSet<(String, String)> = HashSet::new();
    for (target, chain) in input.disks {
        for layer in &chain.layers {
            for b in &layer.bitmaps {
                let r = BitmapRef {
                    target: target.clone(),
                    image: layer.path.clone(),
                    bitmap: b.name.clone(),
                };
                let broken = broken(layer, b.in_use, input.running);
                let named = claimed.contains(&(target.clone(), b.name.clone()));
                if broken.is_none() && named {
                    continue;
                }
                if !in_scope(&b.name) {
                    out.foreign.push(r);
                    continue;
                }
                removed.insert((target.clone(), b.name.clone()));
                match broken {
                    Some(reason) => out.inconsistent.push(InconsistentBitmap {
                        target: r.target,
                        image: r.image,
                        bitmap: r.bitmap,
                        reason,
                    }),
                    None => out.orphans.push(r),
                }
            }
        }
    }
    // The checkpoints: in scope, every disk whose bitmap goes or is not
    // usable leaves; a checkpoint with none left goes.
    let mut bad = Bad::new();
    for def in input.libvirt.iter().filter(|d| in_scope(&d.name)) {
        let lost: Vec<String> = def
            .disks
            .iter()
            .filter(|(t, b)| !usable(input, &removed, &def.name, t, b))
            .map(|(t, _)| t.clone())
            .collect();
        if !lost.is_empty() {
            bad.insert(
                def.name.clone(),
                lost.into_iter().map(|t| (t, String::new())).collect(),
            );
        }
    }
    let mut dropped = Vec::new();
    out.target = degrade(input.libvirt.to_vec(), &bad, &mut dropped);
    let gone: HashSet<&str> = dropped.iter().map(|(n, _)| n.as_str()).collect();
    for def in input.libvirt {
        let Some(lost) = bad.get(&def.name) else {
            continue;
        };
        let deleted = gone.contains(def.name.as_str());
        out.checkpoints.push(ReclaimedCheckpoint {
            checkpoint: def.name.clone(),
            action: if deleted {
                CheckpointAction::Deleted
            } else {
                CheckpointAction::Degraded
            },
            disks: if deleted {
                def.disks.keys().cloned().collect()
            } else {
                lost.iter().map(|(t, _)| t.clone()).collect()
            },
        });
    }
    // Second pass: a bitmap only a degraded or deleted checkpoint named is
    // an orphan now (so a second reclaim finds nothing).
    let after = claims(
        out.target.iter().chain(
            input
                .committed
                .iter()
                .filter(|d| in_scope(&d.name) && !input.libvirt.iter().any(|l| l.name == d.name)),
        ),
    );
    for (target, chain) in input.disks {
        for layer in &chain.layers {
            for b in &layer.bitmaps {
                let key = (target.clone(), b.name.clone());
                if in_scope(&b.name) && !removed.contains(&key) && !after.contains(&key) {
                    out.orphans.push(BitmapRef {
                        target: target.clone(),
                        image: layer.path.clone(),
                        bitmap: b.name.clone(),
                    });
                }
            }
        }
    }
    out
}

/// (target, bitmap) pairs these checkpoints name.
fn claims<'a>(defs: impl Iterator<Item = &'a CheckpointDef>) -> HashSet<(String, String)> {
    defs.flat_map(|d| d.disks.iter().map(|(t, b)| (t.clone(), b.clone())))
        .collect()
}

/// Why a bitmap of this layer is broken, if it is.
fn broken(layer: &Layer, in_use: bool, running: bool) -> Option<InconsistentReason> {
    if running {
        // QEMU holds every bitmap in use and keeps the extension consistent
        // while it runs: the file says nothing of the bitmaps' health.
        None
    } else if !layer.bitmaps_consistent {
        Some(InconsistentReason::InconsistentExtension)
    } else if in_use {
        Some(InconsistentReason::InUse)
    } else {
        None
    }
}

/// Does checkpoint `name`'s bitmap `bitmap` on disk `target` stay usable?
/// A disk whose images were not read (not qcow2 is read as empty; an
/// unreadable one is absent) is kept: nobody can tell.
fn usable(
    input: &ScanInput<'_>,
    removed: &HashSet<(String, String)>,
    name: &str,
    target: &str,
    bitmap: &str,
) -> bool {
    if removed.contains(&(target.to_string(), bitmap.to_string())) {
        return false;
    }
    if input.running {
        return !input
            .unusable
            .get(name)
            .is_some_and(|disks| disks.contains(target));
    }
    let Some(chain) = input.disks.get(target) else {
        return true;
    };
    bitmap_problems(&Indexed::new(chain), bitmap, InUse::Damage).is_empty()
}

#[cfg(test)]
mod tests {
    use super::super::images::LayerBitmap;
    use super::*;

    fn def(name: &str, parent: Option<&str>, disks: &[&str]) -> CheckpointDef {
        CheckpointDef {
            name: name.into(),
            parent: parent.map(Into::into),
            creation_time: 1,
            description: None,
            disks: disks.iter().map(|t| ((*t).into(), name.into())).collect(),
        }
    }

    fn layer(path: &str, bitmaps: &[(&str, bool)]) -> Layer {
        Layer {
            path: path.into(),
            bitmaps_consistent: true,
            bitmaps: bitmaps
                .iter()
                .map(|(n, in_use)| LayerBitmap {
                    name: (*n).into(),
                    in_use: *in_use,
                    auto: true,
                })
                .collect(),
        }
    }

    fn disks(list: &[(&str, Vec<Layer>)]) -> BTreeMap<String, DiskChain> {
        list.iter()
            .map(|(t, layers)| {
                (
                    (*t).to_string(),
                    DiskChain {
                        layers: layers.clone(),
                        unfollowed: None,
                    },
                )
            })
            .collect()
    }

    fn run(
        running: bool,
        disks: &BTreeMap<String, DiskChain>,
        libvirt: &[CheckpointDef],
        committed: &[CheckpointDef],
        scope: Option<&str>,
    ) -> Scan {
        scan(&ScanInput {
            running,
            disks,
            libvirt,
            committed,
            scope,
            unusable: &BTreeMap::new(),
        })
    }

    #[test]
    fn healthy_named_bitmaps_stay_and_orphans_and_in_use_ones_go() {
        let d = disks(&[
            (
                "vda",
                vec![layer("/a", &[("c1", false), ("c2", true), ("x", false)])],
            ),
            ("vdb", vec![layer("/b", &[("c1", false), ("c2", false)])]),
        ]);
        let lv = [
            def("c1", None, &["vda", "vdb"]),
            def("c2", Some("c1"), &["vda", "vdb"]),
        ];
        let s = run(false, &d, &lv, &[], None);
        let names = |v: &[BitmapRef]| {
            v.iter()
                .map(|b| format!("{}:{}", b.target, b.bitmap))
                .collect::<Vec<_>>()
        };
        assert_eq!(names(&s.orphans), ["vda:x"]);
        assert_eq!(s.inconsistent.len(), 1);
        assert_eq!(s.inconsistent[0].bitmap, "c2");
        assert_eq!(s.inconsistent[0].reason, InconsistentReason::InUse);
        assert_eq!(
            s.checkpoints,
            [ReclaimedCheckpoint {
                checkpoint: "c2".into(),
                action: CheckpointAction::Degraded,
                disks: vec!["vda".into()],
            }]
        );
        assert_eq!(s.target[1].disks.keys().collect::<Vec<_>>(), ["vdb"]);
        assert_eq!(s.target[0], lv[0]);
    }

    #[test]
    fn a_checkpoint_with_no_usable_bitmap_is_deleted_and_its_bitmaps_freed() {
        // c2's bitmap is missing on vda and in use on vdb: deleted, c3 hangs
        // off c1; c3's healthy bitmaps stay.
        let d = disks(&[
            ("vda", vec![layer("/a", &[("c1", false), ("c3", false)])]),
            (
                "vdb",
                vec![layer("/b", &[("c1", false), ("c2", true), ("c3", false)])],
            ),
        ]);
        let lv = [
            def("c1", None, &["vda", "vdb"]),
            def("c2", Some("c1"), &["vda", "vdb"]),
            def("c3", Some("c2"), &["vda", "vdb"]),
        ];
        let s = run(false, &d, &lv, &[], None);
        assert!(s.orphans.is_empty());
        assert_eq!(s.inconsistent.len(), 1);
        assert_eq!(s.checkpoints[0].action, CheckpointAction::Deleted);
        assert_eq!(s.checkpoints[0].disks, ["vda", "vdb"]);
        assert_eq!(s.target.len(), 2);
        assert_eq!(s.target[1].parent.as_deref(), Some("c1"));
        // A second scan of the result finds nothing.
        let mut d2 = d.clone();
        for r in s.removals() {
            d2.get_mut(&r.target).unwrap().layers[0]
                .bitmaps
                .retain(|b| b.name != r.bitmap);
        }
        assert!(run(false, &d2, &s.target, &[], None).is_empty());
    }

    #[test]
    fn the_scope_keeps_other_tools_bitmaps_and_the_committed_chain_claims() {
        let d = disks(&[(
            "vda",
            vec![layer(
                "/a",
                &[
                    ("o-1", false),
                    ("o-2", false),
                    ("o-3", false),
                    ("t-1", true),
                ],
            )],
        )]);
        let lv = [def("o-1", None, &["vda"])];
        let committed = [
            def("o-1", None, &["vda"]),
            def("o-2", Some("o-1"), &["vda"]),
        ];
        let s = run(false, &d, &lv, &committed, Some("o-"));
        assert_eq!(
            s.orphans
                .iter()
                .map(|b| b.bitmap.as_str())
                .collect::<Vec<_>>(),
            ["o-3"]
        );
        assert_eq!(
            s.foreign
                .iter()
                .map(|b| b.bitmap.as_str())
                .collect::<Vec<_>>(),
            ["t-1"]
        );
        assert!(s.inconsistent.is_empty() && s.checkpoints.is_empty());
    }

    #[test]
    fn a_running_domain_reads_only_orphans_from_its_images() {
        let d = disks(&[("vda", vec![layer("/a", &[("c1", true), ("x", true)])])]);
        let lv = [def("c1", None, &["vda"]), def("c2", Some("c1"), &["vda"])];
        let unusable = BTreeMap::from([("c1".to_string(), BTreeSet::from(["vda".to_string()]))]);
        let s = scan(&ScanInput {
            running: true,
            disks: &d,
            libvirt: &lv,
            committed: &[],
            scope: None,
            unusable: &unusable,
        });
        // x: an orphan; c2's bitmap is not in the file yet (QEMU writes it
        // at shutdown), and libvirt did not find it broken: kept.
        assert_eq!(
            s.orphans
                .iter()
                .map(|b| b.bitmap.as_str())
                .collect::<Vec<_>>(),
            ["x", "c1"]
        );
        assert!(s.inconsistent.is_empty());
        assert_eq!(s.checkpoints[0].checkpoint, "c1");
        assert_eq!(s.checkpoints[0].action, CheckpointAction::Deleted);
        assert_eq!(s.target, [def("c2", None, &["vda"])]);
    }
}
