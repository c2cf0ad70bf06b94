//! The rules: what one disk's chain says about one bitmap, as libvirt's
//! backup code judges it (`qemuBlockBitmapChainIsValid`): on the top
//! layer, continued down without a gap, and in every layer that holds it
//! consistent and recording.

use std::path::PathBuf;

use super::images::{Indexed, Layer, LayerBitmap};

/// What is wrong with a bitmap on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Problem {
    /// Not on the top layer (nor anywhere below).
    Missing,
    /// In use on a stopped domain, or its image's bitmaps extension is
    /// marked inconsistent.
    Inconsistent,
    /// No `auto` flag: it does not record writes.
    Disabled,
    /// In a backing layer, but missing from a layer above it.
    BrokenChain,
}

/// One problem with a bitmap on one disk: what, the layer concerned
/// (`None`: the disk's image itself), and the detail.
pub(crate) type BitmapProblem = (Problem, Option<PathBuf>, String);

/// What a bitmap in use in an image on disk means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InUse {
    /// Damage: the domain is shut off, so QEMU did not save it cleanly.
    Damage,
    /// Nothing: the domain runs, and QEMU holds every bitmap in use.
    Expected,
}

/// What one disk's chain says about one bitmap, by libvirt's rules: on the
/// top layer, continued down without a gap, and in every layer that holds
/// it consistent and recording. Empty when the bitmap is usable.
pub(crate) fn bitmap_problems(
    disk: &Indexed<'_>,
    bitmap: &str,
    in_use: InUse,
) -> Vec<BitmapProblem> {
    let layers = &disk.chain.layers;
    if layers.is_empty() {
        return vec![(
            Problem::Missing,
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
    let mut out: Vec<BitmapProblem> = gap_below(layers, &present, run, bitmap)
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
fn not_on_top(layers: &[Layer], present: &[Option<&LayerBitmap>], bitmap: &str) -> BitmapProblem {
    let top = &layers[0];
    if let Some(k) = present.iter().position(Option::is_some) {
        return (
            Problem::BrokenChain,
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
        Problem::Missing,
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
) -> Option<BitmapProblem> {
    let again = run + present.iter().skip(run).position(Option::is_some)?;
    Some((
        Problem::BrokenChain,
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
) -> Vec<BitmapProblem> {
    let mut out = Vec::new();
    if !layer.bitmaps_consistent {
        out.push((
            Problem::Inconsistent,
            Some(layer.path.clone()),
            format!(
                "the image's bitmaps extension is marked inconsistent (autoclear bit 0 clear): QEMU ignores \
                 bitmap {bitmap} and every other bitmap of it"
            ),
        ));
    } else if b.in_use && in_use == InUse::Damage {
        out.push((
            Problem::Inconsistent,
            Some(layer.path.clone()),
            format!("bitmap {bitmap} is in use on a stopped domain: QEMU did not save it cleanly"),
        ));
    }
    if !b.auto {
        out.push((
            Problem::Disabled,
            Some(layer.path.clone()),
            format!("bitmap {bitmap} is disabled (no auto flag): it does not record writes"),
        ));
    }
    out
}
