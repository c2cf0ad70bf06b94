//! `prune`: retention. The domain's oldest checkpoints (within the
//! committed chain's scope) are deleted for real, bitmaps included, in one
//! lifecycle transaction ([`super::lifecycle`]): on a running domain by
//! libvirt's real delete, oldest first; on a shut-off one by
//! `qemu-img bitmap --remove` on every layer that holds each bitmap, then a
//! metadata delete. The committed chain loses them in the same
//! transaction. The newest checkpoint — the leaf the next backup hangs off
//! — is never pruned.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::info;
use uuid::Uuid;

use super::lifecycle::{image_error, Action};
use super::txn::backend_err;
use super::Store;
use crate::backend::Backend;
use crate::bitmaps::remove::{layers_holding, ImageEditError};
use crate::chain::{Chain, CheckpointDef};
use crate::error::{Error, Result};
use crate::journal::TxnKind;

/// Which checkpoints `prune` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep the N newest (N at least 1: the newest is the leaf the next
    /// incremental backup needs).
    Keep(usize),
    /// Delete those created longer ago than this (never the newest).
    OlderThan(Duration),
}

impl Retention {
    /// A duration as the command takes it: a whole number and a unit,
    /// `s`, `m`, `h`, `d` or `w` (`7d`, `12h`, `30m`); `None` otherwise.
    pub fn parse_age(text: &str) -> Option<Duration> {
        let text = text.trim();
        let unit = text.chars().last()?;
        let secs: u64 = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        let digits = &text[..text.len() - 1];
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n: u64 = digits.parse().ok()?;
        n.checked_mul(secs).map(Duration::from_secs)
    }
}

/// One bitmap removed from an image file (a shut-off domain's prune).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemovedBitmap {
    /// The bitmap's checkpoint (the bitmap's name).
    pub checkpoint: String,
    /// The disk's target.
    pub target: String,
    /// The layer that held it.
    pub image: PathBuf,
}

/// What [`Store::prune`] did, or would do (the `prune` document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneReport {
    /// The transaction; `null` for a dry run.
    pub txn: Option<Uuid>,
    /// The domain.
    pub domain: String,
    /// `false` for a dry run: nothing was changed.
    pub applied: bool,
    /// The checkpoints deleted (or to delete), oldest first.
    pub pruned: Vec<String>,
    /// The checkpoints within scope that stay, oldest first.
    pub kept: Vec<String>,
    /// The bitmaps removed from image files (shut-off domain), in order.
    pub bitmaps_removed: Vec<RemovedBitmap>,
    /// libvirt calls that changed something.
    pub libvirt_calls: u64,
    /// Recoveries made first, libvirt's crash leftovers repaired, disks
    /// that could not be reached.
    pub warnings: Vec<String>,
}

impl Store {
    /// Delete the domain's oldest checkpoints, bitmaps included, by a
    /// retention rule; without `apply`, say what would go and change
    /// nothing (the journal included).
    ///
    /// # Errors
    ///
    /// [`Error::BadRetention`] (`Keep(0)`); [`Error::Backend`] (a missing
    /// domain, libvirt unreachable); [`Error::ImageInUse`] when an image to
    /// edit is held by another process, [`Error::ImageEdit`] when one
    /// cannot be read — both before any change; then as
    /// [`Store::run_lifecycle`].
    pub fn prune(
        &self,
        backend: &dyn Backend,
        domain: &str,
        retention: Retention,
        apply: bool,
    ) -> Result<PruneReport> {
        if retention == Retention::Keep(0) {
            return Err(Error::BadRetention {
                domain: domain.to_string(),
                reason: "--keep 0 would delete the newest checkpoint, the one the next incremental backup needs: keep at least 1".into(),
            });
        }
        let info =
            backend
                .domain_info(domain)
                .map_err(backend_err(domain, "domain lookup", None))?;
        let listing = backend
            .list(domain)
            .map_err(backend_err(domain, "list", None))?;
        let committed = self.journal.committed(domain)?;
        let scope = committed
            .as_ref()
            .and_then(|c| c.chain.as_ref())
            .and_then(|c| c.scope.clone())
            .filter(|s| !s.is_empty());
        let mut scoped: Vec<&CheckpointDef> = listing
            .iter()
            .filter(|d| scope.as_deref().is_none_or(|s| d.name.starts_with(s)))
            .collect();
        scoped.sort_by(|a, b| (a.creation_time, &a.name).cmp(&(b.creation_time, &b.name)));
        let cut = match retention {
            Retention::Keep(n) => scoped.len().saturating_sub(n),
            Retention::OlderThan(age) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let limit = i64::try_from(now.saturating_sub(age.as_secs())).unwrap_or(i64::MAX);
                scoped
                    .iter()
                    .take_while(|d| d.creation_time < limit)
                    .count()
                    .min(scoped.len().saturating_sub(1))
            }
        };
        let pruned: Vec<CheckpointDef> = scoped[..cut].iter().map(|d| (*d).clone()).collect();
        let kept: Vec<String> = scoped[cut..].iter().map(|d| d.name.clone()).collect();
        let gone: HashSet<&str> = pruned.iter().map(|d| d.name.as_str()).collect();
        let target = without(&listing, &gone);
        let mut warnings = Vec::new();
        let mut actions = Vec::new();
        let mut removed = Vec::new();
        for def in &pruned {
            if info.running {
                actions.push(Action::Purge {
                    checkpoint: def.clone(),
                });
                continue;
            }
            for (target, bitmap) in &def.disks {
                let Some(source) = info
                    .disks
                    .iter()
                    .find(|d| &d.target == target)
                    .and_then(|d| d.source.clone())
                else {
                    warnings.push(format!(
                        "checkpoint {}: disk {target} has no local image; its bitmap {bitmap} is left",
                        def.name
                    ));
                    continue;
                };
                let layers = layers_holding(self.images(), &source, bitmap).map_err(|e| {
                    let (image, message) = match e {
                        crate::bitmaps::images::ImageError::NotQcow2 { path } => {
                            (path, "not qcow2".to_string())
                        }
                        crate::bitmaps::images::ImageError::Unreadable { path, reason } => {
                            (path, reason)
                        }
                    };
                    image_error(domain, None, ImageEditError::Failed { image, message })
                })?;
                for image in layers {
                    removed.push(RemovedBitmap {
                        checkpoint: bitmap.clone(),
                        target: target.clone(),
                        image: image.clone(),
                    });
                    actions.push(Action::RemoveBitmap {
                        checkpoint: bitmap.clone(),
                        target: target.clone(),
                        image,
                    });
                }
            }
            actions.push(Action::DeleteMetadata {
                checkpoint: def.clone(),
            });
        }
        let mut report = PruneReport {
            txn: None,
            domain: domain.to_string(),
            applied: apply,
            pruned: pruned.iter().map(|d| d.name.clone()).collect(),
            kept,
            bitmaps_removed: removed,
            libvirt_calls: 0,
            warnings,
        };
        if !apply {
            return Ok(report);
        }
        // QEMU's lock: an image another process holds is refused here,
        // before the intent.
        let mut probed = HashSet::new();
        for r in &report.bitmaps_removed {
            if probed.insert(r.image.clone()) {
                self.editor()
                    .check_writable(&r.image)
                    .map_err(|e| image_error(domain, None, e))?;
            }
        }
        let chain = committed
            .and_then(|c| c.chain)
            .map(|c| chain_without(&c, &gone));
        let run = self.run_lifecycle(
            backend,
            domain,
            TxnKind::Prune,
            chain.as_ref(),
            target,
            actions,
        )?;
        info!(txn = %run.txn, pruned = report.pruned.len(), images = run.images_changed, "pruned");
        report.txn = Some(run.txn);
        report.libvirt_calls = run.libvirt_calls;
        report.warnings.extend(run.warnings);
        Ok(report)
    }
}

/// The nearest ancestor of `name` outside `gone`, by `parent_of`.
fn kept_ancestor<'a>(
    mut parent: Option<&'a str>,
    gone: &HashSet<&str>,
    parent_of: &HashMap<&'a str, Option<&'a str>>,
) -> Option<&'a str> {
    let mut steps = 0;
    while let Some(p) = parent {
        if !gone.contains(p) || steps > parent_of.len() {
            return Some(p);
        }
        parent = parent_of.get(p).copied().flatten();
        steps += 1;
    }
    None
}

/// libvirt's checkpoints after the deletes of `gone`: each child of a
/// deleted one re-parented to its nearest kept ancestor, as libvirt does.
fn without(listing: &[CheckpointDef], gone: &HashSet<&str>) -> Vec<CheckpointDef> {
    let parent_of: HashMap<&str, Option<&str>> = listing
        .iter()
        .map(|d| (d.name.as_str(), d.parent.as_deref()))
        .collect();
    listing
        .iter()
        .filter(|d| !gone.contains(d.name.as_str()))
        .map(|d| CheckpointDef {
            parent: kept_ancestor(d.parent.as_deref(), gone, &parent_of).map(str::to_string),
            ..d.clone()
        })
        .collect()
}

/// The committed chain without `gone`, its children re-parented the same
/// way (its shape, scope and disk map kept).
fn chain_without(chain: &Chain, gone: &HashSet<&str>) -> Chain {
    let parent_of: HashMap<&str, Option<&str>> = chain
        .checkpoints
        .iter()
        .map(|c| (c.id.as_str(), c.parent.as_deref()))
        .collect();
    let mut out = chain.clone();
    out.checkpoints = chain
        .checkpoints
        .iter()
        .filter(|c| !gone.contains(c.id.as_str()))
        .map(|c| {
            let mut c = c.clone();
            c.parent = kept_ancestor(c.parent.as_deref(), gone, &parent_of).map(str::to_string);
            c
        })
        .collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_parse_with_a_unit_and_nothing_else() {
        assert_eq!(
            Retention::parse_age("7d"),
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            Retention::parse_age("12h"),
            Some(Duration::from_secs(43_200))
        );
        assert_eq!(
            Retention::parse_age("30m"),
            Some(Duration::from_secs(1_800))
        );
        for bad in [
            "",
            "d",
            "7",
            "7x",
            "-1d",
            "+1d",
            "7é",
            "1.5h",
            "7 d",
            "99999999999999999999w",
        ] {
            assert_eq!(Retention::parse_age(bad), None, "{bad:?}");
        }
    }

    fn def(name: &str, parent: Option<&str>) -> CheckpointDef {
        CheckpointDef {
            name: name.into(),
            parent: parent.map(Into::into),
            creation_time: 1,
            description: None,
            disks: std::collections::BTreeMap::new(),
        }
    }

    #[test]
    fn children_of_pruned_checkpoints_hang_off_their_nearest_kept_ancestor() {
        let l = vec![
            def("a", None),
            def("b", Some("a")),
            def("c", Some("b")),
            def("d", Some("c")),
        ];
        let gone: HashSet<&str> = ["a", "c"].into();
        let out = without(&l, &gone);
        let parents: Vec<(&str, Option<&str>)> = out
            .iter()
            .map(|d| (d.name.as_str(), d.parent.as_deref()))
            .collect();
        assert_eq!(parents, [("b", None), ("d", Some("b"))]);
    }
}
