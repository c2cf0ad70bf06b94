//! The rules: what one disk's chain says about one bitmap, as libvirt's
//! backup code judges it (`qemuBlockBitmapChainIsValid`), and which
//! checkpoint is still usable for an incremental backup.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use super::images::{Indexed, LayerBitmap};
use super::FindingKind;
use crate::backend::DomainInfo;
use crate::chain::{spine_path, CheckpointDef};

/// One finding about a bitmap on one disk: its kind, the layer concerned
/// (`None`: the disk's image itself), and the detail.
pub(super) type BitmapFinding = (FindingKind, Option<PathBuf>, String);

/// What one disk's chain says about one bitmap. Empty when the bitmap is
/// usable.
#[cfg(test)]
pub(super) fn check_bitmap(chain: &super::images::DiskChain, bitmap: &str) -> Vec<BitmapFinding> {
    bitmap_findings(&Indexed::new(chain), bitmap)
}

pub(super) fn bitmap_findings(disk: &Indexed<'_>, bitmap: &str) -> Vec<BitmapFinding> {
    let layers = &disk.chain.layers;
    let Some(top) = layers.first() else {
        return vec![(
            FindingKind::MissingBitmap,
            None,
            format!("bitmap {bitmap} cannot exist: the disk's image is not qcow2"),
        )];
    };
    let present: Vec<Option<&LayerBitmap>> = disk
        .by_name
        .iter()
        .map(|m| m.get(bitmap).copied())
        .collect();
    let run = present.iter().take_while(|p| p.is_some()).count();
    let mut out = Vec::new();
    if run == 0 {
        match present.iter().position(Option::is_some) {
            Some(k) => out.push((
                FindingKind::BrokenChain,
                Some(top.path.clone()),
                format!(
                    "bitmap {bitmap} is in backing layer {k} ({}) but not in the top image",
                    layers[k].path.display()
                ),
            )),
            None => {
                let stale = if top.bitmaps_consistent {
                    ""
                } else {
                    " (and the image's bitmaps extension is marked inconsistent)"
                };
                let below = if layers.len() > 1 {
                    " nor in any backing layer"
                } else {
                    ""
                };
                out.push((
                    FindingKind::MissingBitmap,
                    Some(top.path.clone()),
                    format!("bitmap {bitmap} is not in the top image{below}{stale}"),
                ));
            }
        }
        return out;
    }
    if let Some(again) = present.iter().skip(run).position(Option::is_some) {
        let again = run + again;
        out.push((
            FindingKind::BrokenChain,
            Some(layers[run].path.clone()),
            format!(
                "bitmap {bitmap} is in backing layer {again} ({}) but missing from layer {run} above it",
                layers[again].path.display()
            ),
        ));
    }
    for (layer, b) in layers.iter().zip(&present).take(run) {
        let Some(b) = b else { continue };
        if !layer.bitmaps_consistent {
            out.push((
                FindingKind::InconsistentBitmap,
                Some(layer.path.clone()),
                format!(
                    "the image's bitmaps extension is marked inconsistent (autoclear bit 0 clear): QEMU ignores \
                     bitmap {bitmap} and every other bitmap of it"
                ),
            ));
        } else if b.in_use {
            out.push((
                FindingKind::InconsistentBitmap,
                Some(layer.path.clone()),
                format!(
                    "bitmap {bitmap} is in use on a stopped domain: QEMU did not save it cleanly"
                ),
            ));
        }
        if !b.auto {
            out.push((
                FindingKind::DisabledBitmap,
                Some(layer.path.clone()),
                format!("bitmap {bitmap} is disabled (no auto flag): it does not record writes"),
            ));
        }
    }
    out
}

/// The disks that take part in checkpoints: the domain's disks that at
/// least one of libvirt's checkpoints names.
pub(super) fn participating<'a>(
    libvirt: &'a [CheckpointDef],
    info: &DomainInfo,
) -> BTreeSet<&'a str> {
    libvirt
        .iter()
        .flat_map(|d| d.disks.keys())
        .filter(|t| info.has_target(t))
        .map(String::as_str)
        .collect()
}

/// The newest checkpoint on the leaf's path (leaf first, up to the root)
/// that has no finding or unknown, and names every participating disk.
pub(super) fn newest_usable(
    libvirt: &[CheckpointDef],
    bad: &HashSet<String>,
    disks: &BTreeSet<&str>,
) -> Option<String> {
    let index: HashMap<&str, usize> = libvirt
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    spine_path(libvirt, &index)
        .into_iter()
        .rev()
        .map(|i| &libvirt[i])
        .find(|d| !bad.contains(&d.name) && disks.iter().all(|t| d.disks.contains_key(*t)))
        .map(|d| d.name.clone())
}
