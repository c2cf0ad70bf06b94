//! libvirt's own crash leftovers, found and repaired.
//!
//! libvirt rewrites a checkpoint's metadata file through `virFileRewrite`:
//! it writes `NAME.xml.new`, syncs it, then renames it over `NAME.xml`. A
//! daemon killed in between leaves `NAME.xml.new` behind, and at every
//! start libvirt loads every file of the folder: a complete leftover brings
//! its checkpoint back after it was deleted, or replaces the definition
//! libvirt had — so a rollback's deletion is undone by a later restart.
//! libvirt itself never removes it; a delete does not either; only a
//! rewrite of the same checkpoint consumes it.
//!
//! [`repair`] runs at the start of every `sync` and at the end of every
//! phase of a transaction (so also in `recover` and in a rollback):
//!
//! - a leftover of a checkpoint libvirt lists is consumed by redefining
//!   that checkpoint with exactly the content libvirt lists (libvirt's own
//!   rewrite replaces the file);
//! - a stale leftover of a checkpoint libvirt does not list — older than
//!   the daemon's current process, or untouched for
//!   [`LEFTOVER_QUIET`](crate::backend::LEFTOVER_QUIET) — is removed;
//! - a recent one is left alone (the daemon may be writing it).
//!
//! Each is reported in a warning; nothing is repaired silently. Where the
//! backend cannot read the daemon's files, nothing is done (and `validate`
//! says it could not check).

use tracing::{debug, warn};

use crate::backend::{Backend, Leftover, LeftoverScan};
use crate::chain::CheckpointDef;
use crate::xml::render_checkpoint;

/// What a leftover would do at the next daemon start, given what libvirt
/// lists under its name now.
pub(crate) fn effect(l: &Leftover, listed: Option<&CheckpointDef>) -> String {
    match (&l.content, listed) {
        (None, _) => "it is cut short: libvirt skips it when it starts, and keeps it".into(),
        (Some(c), None) => format!(
            "at the next daemon start it would bring back checkpoint {} (parent {}, creationTime {}), \
             which libvirt no longer has",
            c.name,
            c.parent.as_deref().unwrap_or("none"),
            c.creation_time
        ),
        (Some(c), Some(now)) if c == now => format!(
            "it holds checkpoint {}'s current definition, which libvirt loads from it at its next start",
            c.name
        ),
        (Some(c), Some(_)) => format!(
            "at the next daemon start it may replace checkpoint {}'s definition with another one \
             (parent {}, creationTime {})",
            c.name,
            c.parent.as_deref().unwrap_or("none"),
            c.creation_time
        ),
    }
}

/// Find the domain's leftovers and repair them; returns one warning per
/// leftover found (what it would have done, and what was done about it).
/// Failures are warnings too: a repair never fails the caller.
pub(crate) fn repair(backend: &dyn Backend, domain: &str) -> Vec<String> {
    let found = match backend.leftovers(domain) {
        Ok(LeftoverScan::Checked(found)) => found,
        Ok(LeftoverScan::CannotCheck(why)) => {
            debug!(domain, %why, "libvirt's metadata files not checked for crash leftovers");
            return Vec::new();
        }
        Err(e) => {
            let w = format!("could not look for libvirt's crash leftovers: {e}");
            warn!(domain, "{w}");
            return vec![w];
        }
    };
    if found.is_empty() {
        return Vec::new();
    }
    let listed = match backend.list(domain) {
        Ok(listed) => listed,
        Err(e) => {
            let w = format!(
                "found {} crash leftover(s) of libvirt, but could not list the checkpoints to repair them: {e}",
                found.len()
            );
            warn!(domain, "{w}");
            return vec![w];
        }
    };
    // Listed ones in libvirt's order (parents first), then the others.
    let position = |l: &Leftover| {
        listed
            .iter()
            .position(|d| d.name == l.checkpoint)
            .unwrap_or(usize::MAX)
    };
    let mut found = found;
    found.sort_by_key(|l| (position(l), l.checkpoint.clone()));
    let mut warnings = Vec::with_capacity(found.len());
    for l in &found {
        let now = listed.iter().find(|d| d.name == l.checkpoint);
        let what = format!(
            "libvirt left {} behind when its daemon died while writing checkpoint {}'s metadata; {}",
            l.path.display(),
            l.checkpoint,
            effect(l, now)
        );
        let done = match now {
            Some(def) => match backend.redefine(domain, &render_checkpoint(def), false) {
                Ok(()) => format!(
                    "rewrote {} with the definition libvirt lists, which replaced the file",
                    l.checkpoint
                ),
                Err(e) => format!("rewriting {} to replace it failed: {e}", l.checkpoint),
            },
            None if l.stale => match backend.remove_leftover(domain, l) {
                Ok(()) => "removed it".into(),
                Err(e) => format!("removing it failed: {e}"),
            },
            None => format!(
                "it was written less than {} s ago and may still be being written: left alone; \
                 run sync, recover or validate again",
                crate::backend::LEFTOVER_QUIET.as_secs()
            ),
        };
        let w = format!("{what}: {done}");
        warn!(domain, "{w}");
        warnings.push(w);
    }
    warnings
}
