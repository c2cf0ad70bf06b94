//! The rules: what one disk's chain says about one bitmap, as libvirt's
//! backup code judges it (`qemuBlockBitmapChainIsValid`), and which
//! checkpoint is still usable for an incremental backup.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use super::images::{Indexed, Layer, LayerBitmap};
use super::FindingKind;
use crate::backend::DomainInfo;
use crate::chain::{spine_path, CheckpointDef};

/// One finding about a bitmap on one disk: its kind, the layer concerned
/// (`None`: the disk's image itself), and the detail.
pub(super) type BitmapFinding = (FindingKind, Option<PathBuf>, String);

/// What a bitmap in use in an image on disk means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum InUse {
    /// Damage: the domain is shut off, so QEMU did not save it cleanly.
    Damage,
    /// Nothing: the domain runs, and QEMU holds every bitmap in use.
    Expected,
}

/// What one disk's chain says about one bitmap, on a stopped domain.
/// Empty when the bitmap is usable.
#[cfg(test)]
pub(super) fn check_bitmap(chain: &super::images::DiskChain, bitmap: &str) -> Vec<BitmapFinding> {
    bitmap_findings(&Indexed::new(chain), bitmap, InUse::Damage)
}

/// What one disk's chain says about one bitmap, by libvirt's rules: on the
/// top layer, continued down without a gap, and in every layer that holds
/// it consistent and recording. Empty when the bitmap is usable.
pub(super) fn bitmap_findings(
    disk: &Indexed<'_>,
    bitmap: &str,
    in_use: InUse,
) -> Vec<BitmapFinding> {
    let layers = &disk.chain.layers;
    if layers.is_empty() {
        return vec![(
            FindingKind::MissingBitmap,
            None,
            format!("bitmap {bitmap} cannot exist: the disk's image is not qcow2"),
        )];
    }
    let present: Vec<Option<&LayerBitmap>> = disk
        .by_name
        .iter()
        .map(|m| m.get(bitmap).copied())
        .collect();
    let run = present.iter().take_while(|p| p.is_some()).count();
    if run == 0 {
        return vec![not_on_top(layers, &present, bitmap)];
    }
    let mut out: Vec<BitmapFinding> = gap_below(layers, &present, run, bitmap)
        .into_iter()
        .collect();
    for (layer, b) in layers.iter().zip(&present).take(run) {
        if let Some(b) = b {
            out.extend(flag_findings(layer, b, bitmap, in_use));
        }
    }
    out
}

/// Rule 1, the bitmap starts on the top layer: missing, or only below.
fn not_on_top(layers: &[Layer], present: &[Option<&LayerBitmap>], bitmap: &str) -> BitmapFinding {
    let top = &layers[0];
    if let Some(k) = present.iter().position(Option::is_some) {
        return (
            FindingKind::BrokenChain,
            Some(top.path.clone()),
            format!(
                "bitmap {bitmap} is in backing layer {k} ({}) but not in the top image",
                layers[k].path.display()
            ),
        );
    }
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
    (
        FindingKind::MissingBitmap,
        Some(top.path.clone()),
        format!("bitmap {bitmap} is not in the top image{below}{stale}"),
    )
}

/// Rule 2, no gap: once the run from the top ends, the bitmap is in no
/// layer below.
fn gap_below(
    layers: &[Layer],
    present: &[Option<&LayerBitmap>],
    run: usize,
    bitmap: &str,
) -> Option<BitmapFinding> {
    let again = run + present.iter().skip(run).position(Option::is_some)?;
    Some((
        FindingKind::BrokenChain,
        Some(layers[run].path.clone()),
        format!(
            "bitmap {bitmap} is in backing layer {again} ({}) but missing from layer {run} above it",
            layers[again].path.display()
        ),
    ))
}

/// Rule 3, in each layer that holds it: a consistent bitmaps extension,
/// not in use (on a stopped domain), recording.
fn flag_findings(
    layer: &Layer,
    b: &LayerBitmap,
    bitmap: &str,
    in_use: InUse,
) -> Vec<BitmapFinding> {
    let mut out = Vec::new();
    if !layer.bitmaps_consistent {
        out.push((
            FindingKind::InconsistentBitmap,
            Some(layer.path.clone()),
            format!(
                "the image's bitmaps extension is marked inconsistent (autoclear bit 0 clear): QEMU ignores \
                 bitmap {bitmap} and every other bitmap of it"
            ),
        ));
    } else if b.in_use && in_use == InUse::Damage {
        out.push((
            FindingKind::InconsistentBitmap,
            Some(layer.path.clone()),
            format!("bitmap {bitmap} is in use on a stopped domain: QEMU did not save it cleanly"),
        ));
    }
    if !b.auto {
        out.push((
            FindingKind::DisabledBitmap,
            Some(layer.path.clone()),
            format!("bitmap {bitmap} is disabled (no auto flag): it does not record writes"),
        ));
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

/// libvirt's newest leaf: the end of the path [`newest_usable`] walks.
pub(super) fn newest_leaf(libvirt: &[CheckpointDef]) -> Option<String> {
    let index: HashMap<&str, usize> = libvirt
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    spine_path(libvirt, &index)
        .last()
        .map(|&i| libvirt[i].name.clone())
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
