//! `reclaim`: its arguments, its help and its human output (the JSON is the
//! library's `ReclaimReport` as it is).

use std::fmt::Write as _;

use ckptstore::{CheckpointAction, InconsistentReason, ReclaimReport};
use clap::Args;

use crate::output::{plural, Out};

pub const RECLAIM_AFTER: &str = "\
Finds what blocks backups: orphan bitmaps (no checkpoint in libvirt, nor in the committed chain
within its scope, names them), inconsistent ones (in use on a shut-off image, or in an image whose
bitmaps extension is marked inconsistent), and the checkpoints left with no usable bitmap. Without
--apply it prints what it would do and changes nothing. With --apply it removes them in one
journaled transaction (a shut-off domain's with qemu-img bitmap --remove, refused while another
process holds the image; a running domain's through libvirt) and degrades or deletes those
checkpoints in libvirt and in the committed chain. Bitmaps outside the chain's scope are another
tool's: listed, never removed.

Example:
  $ ckptstore reclaim --domain fedora
  domain fedora: dry run, 1 orphan bitmap, 1 inconsistent bitmap, 1 checkpoint changed
    orphan        disk vda bitmap stray in /var/lib/libvirt/images/fedora.qcow2
    inconsistent  disk vda bitmap c2 in /var/lib/libvirt/images/fedora.qcow2 (in use)
    degraded      checkpoint c2 loses disk vda
  run with --apply to remove them";

#[derive(Debug, Args)]
pub struct ReclaimArgs {
    /// The libvirt domain (name or UUID)
    #[arg(long, value_name = "DOMAIN")]
    pub domain: String,
    /// Remove them (default: a dry run that changes nothing)
    #[arg(long)]
    pub apply: bool,
}

pub fn print(out: &Out, r: &ReclaimReport) -> anyhow::Result<()> {
    out.emit(r, || text(r))
}

fn text(r: &ReclaimReport) -> String {
    let (o, i, c) = (
        r.orphans.len() as u64,
        r.inconsistent.len() as u64,
        r.checkpoints.len() as u64,
    );
    let head = if r.applied {
        match r.txn {
            Some(t) => format!("removed in transaction {t}"),
            None => "nothing to do".into(),
        }
    } else {
        "dry run".into()
    };
    let mut s = format!(
        "domain {}: {head}, {o} orphan bitmap{}, {i} inconsistent bitmap{}, {c} checkpoint{} changed\n",
        r.domain,
        plural(o),
        plural(i),
        plural(c)
    );
    for b in &r.orphans {
        let _ = writeln!(
            s,
            "  orphan        disk {} bitmap {} in {}",
            b.target,
            b.bitmap,
            b.image.display()
        );
    }
    for b in &r.inconsistent {
        let why = match b.reason {
            InconsistentReason::InUse => "in use",
            InconsistentReason::InconsistentExtension => "the image's bitmaps are inconsistent",
        };
        let _ = writeln!(
            s,
            "  inconsistent  disk {} bitmap {} in {} ({why})",
            b.target,
            b.bitmap,
            b.image.display()
        );
    }
    for cp in &r.checkpoints {
        let (what, verb) = match cp.action {
            CheckpointAction::Degraded => ("degraded", "loses"),
            CheckpointAction::Deleted => ("deleted", "had"),
        };
        let _ = writeln!(
            s,
            "  {what:<13} checkpoint {} {verb} disk{} {}",
            cp.checkpoint,
            plural(cp.disks.len() as u64),
            cp.disks.join(", ")
        );
    }
    for b in &r.foreign_bitmaps {
        let _ = writeln!(
            s,
            "  foreign       disk {} bitmap {} in {} (outside the chain's scope: kept)",
            b.target,
            b.bitmap,
            b.image.display()
        );
    }
    if r.applied && r.txn.is_some() {
        let _ = writeln!(
            s,
            "  {} libvirt call{}",
            r.libvirt_calls,
            plural(r.libvirt_calls)
        );
    }
    for w in &r.warnings {
        let _ = writeln!(s, "  warning: {w}");
    }
    if !r.applied && o + i + c > 0 {
        s.push_str("run with --apply to remove them\n");
    }
    s
}
