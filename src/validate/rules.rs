//! The rules: what one disk's chain says about one bitmap, as libvirt's
//! backup code judges it (`qemuBlockBitmapChainIsValid`), and which
//! checkpoint is still usable for an incremental backup.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;

use super::FindingKind;
use crate::backend::DomainInfo;
use crate::bitmaps::bitmap_problems;
#[cfg(test)]
use crate::bitmaps::images::DiskChain;
use crate::bitmaps::images::Indexed;
pub(super) use crate::bitmaps::InUse;
use crate::chain::{spine_path, CheckpointDef};

/// One finding about a bitmap on one disk: its kind, the layer concerned
/// (`None`: the disk's image itself), and the detail.
pub(super) type BitmapFinding = (FindingKind, Option<PathBuf>, String);

/// What one disk's chain says about one bitmap, on a stopped domain.
/// Empty when the bitmap is usable.
#[cfg(test)]
pub(super) fn check_bitmap(chain: &DiskChain, bitmap: &str) -> Vec<BitmapFinding> {
    bitmap_findings(&Indexed::new(chain), bitmap, InUse::Damage)
}

/// What one disk's chain says about one bitmap, as findings (libvirt's
/// rules, [`crate::bitmaps::bitmap_problems`]). Empty when usable.
pub(super) fn bitmap_findings(
    disk: &Indexed<'_>,
    bitmap: &str,
    in_use: InUse,
) -> Vec<BitmapFinding> {
    bitmap_problems(disk, bitmap, in_use)
        .into_iter()
        .map(|(p, layer, detail)| (FindingKind::from(p), layer, detail))
        .collect()
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
