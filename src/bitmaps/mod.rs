//! Bitmaps: what each disk's images say of a checkpoint's bitmap, and the
//! check a sync makes before its intent is committed, so that libvirt is
//! never given a checkpoint whose bitmap is gone.
//!
//! The code map: `images.rs` (where the layers and their bitmaps come
//! from: [`ImageReader`], the in-process [`Qcow2Reader`]), `rules.rs`
//! (libvirt's rules for a usable bitmap, `qemuBlockBitmapChainIsValid`),
//! `remove.rs` (a bitmap removed from a shut-off domain's image:
//! [`remove::ImageEditor`], `qemu-img bitmap --remove`);
//! this file holds the policy and the check before a redefine.
//!
//! Before the intent, for every checkpoint of the target and every disk of
//! it, the check learns whether the disk's bitmap exists and is usable:
//!
//! - **shut-off domain**: each disk's backing chain is read in-process,
//!   once, and judged by libvirt's rules (an `in_use` bitmap is damage);
//! - **running domain**: libvirt checks a checkpoint it already holds under
//!   that name per disk ([`Backend::bitmap_states`]); a checkpoint libvirt
//!   lacks is redefined with `REDEFINE_VALIDATE`, so libvirt refuses it
//!   rather than hold a checkpoint whose bitmap is gone (the refusal rolls
//!   the transaction back);
//! - a disk nobody can check (no local image, an unreadable one, a driver
//!   without bitmaps such as libvirt's test driver) is reported
//!   [`Unverified`], never taken as present or absent.
//!
//! With [`BitmapPolicy::Degrade`] a disk whose bitmap is missing or
//! unusable leaves the checkpoint's definition (libvirt then has no bitmap
//! for it: `checkpoint='no'`); a checkpoint left with no disk is not
//! redefined, and its children hang off its nearest kept ancestor.

pub(crate) mod images;
pub(crate) mod reclaim;
pub(crate) mod remove;
mod rules;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, BackendError, BackendErrorKind, BitmapState, DomainInfo};
use crate::chain::CheckpointDef;
use images::{ImageError, ImageReader, Indexed};
pub use reclaim::{
    BitmapRef, CheckpointAction, InconsistentBitmap, InconsistentReason, ReclaimedCheckpoint,
};
pub(crate) use rules::{bitmap_problems, InUse, Problem};

/// What a sync does about the bitmaps of the checkpoints it defines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BitmapPolicy {
    /// A disk whose bitmap is missing or unusable is left out of the
    /// checkpoint; a checkpoint with no disk left is not redefined. The
    /// report lists each one (`degraded`).
    #[default]
    Degrade,
    /// Any missing or unusable bitmap refuses the sync before any libvirt
    /// call (exit 1, nothing changed).
    Strict,
    /// Metadata only: no check (for callers that manage bitmaps
    /// themselves).
    Ignore,
}

impl BitmapPolicy {
    /// The policy's name (`degrade`, `strict`, `ignore`).
    pub fn as_str(self) -> &'static str {
        match self {
            BitmapPolicy::Degrade => "degrade",
            BitmapPolicy::Strict => "strict",
            BitmapPolicy::Ignore => "ignore",
        }
    }
}

/// One disk of one checkpoint whose bitmap is missing or unusable: left
/// out of the checkpoint (`degrade`), or the reason of a refusal
/// (`strict`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Degraded {
    /// The checkpoint.
    pub checkpoint: String,
    /// The disk's target name.
    pub disk: String,
    /// What is wrong with its bitmap.
    pub reason: String,
}

/// A disk whose bitmaps nobody could check: its checkpoints were defined
/// as asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unverified {
    /// The disk's target name.
    pub disk: String,
    /// Why it could not be checked.
    pub reason: String,
}

/// The outcome of the check: the target to define, and what the report
/// says of it.
#[derive(Debug, Default)]
pub(crate) struct Checked {
    /// The target, degraded where bitmaps are missing.
    pub(crate) target: Vec<CheckpointDef>,
    /// Every disk left out, and why.
    pub(crate) degraded: Vec<Degraded>,
    /// The checkpoints left with no disk, with the parent their children
    /// now hang off.
    pub(crate) dropped: Vec<(String, Option<String>)>,
    /// The disks nobody could check.
    pub(crate) unverified: Vec<Unverified>,
    /// Redefine with `REDEFINE_VALIDATE` (a running domain whose libvirt
    /// checks bitmaps).
    pub(crate) validate: bool,
}

/// How to check: the policy, where the images are read from, and the
/// checkpoints kept as libvirt has them (libvirt's own, not judged).
pub(crate) struct How<'a> {
    pub(crate) policy: BitmapPolicy,
    pub(crate) reader: &'a dyn ImageReader,
    pub(crate) keep: &'a HashSet<String>,
    /// Disks libvirt's `REDEFINE_VALIDATE` already refused in this
    /// operation: checkpoint → [(target, libvirt's message)].
    pub(crate) refused: &'a Bad,
}

/// Bad bitmaps found: checkpoint → [(target, reason)].
pub(crate) type Bad = BTreeMap<String, Vec<(String, String)>>;

/// Check the bitmaps of `target` against the domain (`info`, libvirt's
/// checkpoints `current`) and apply the policy. `Strict` returns the bad
/// disks as `degraded` with the target untouched; the caller refuses.
///
/// # Errors
///
/// A lost connection or a domain that vanished, from libvirt's per-disk
/// check.
pub(crate) fn check(
    backend: &dyn Backend,
    domain: &str,
    info: &DomainInfo,
    current: &[CheckpointDef],
    target: Vec<CheckpointDef>,
    how: &How<'_>,
) -> Result<Checked, BackendError> {
    let policy = how.policy;
    if policy == BitmapPolicy::Ignore {
        return Ok(Checked {
            target,
            ..Checked::default()
        });
    }
    let mut checked = Checked::default();
    let mut bad = if info.running {
        running(backend, domain, current, &target, &mut checked)?
    } else {
        stopped(info, &target, how.reader, &mut checked)
    };
    for (name, disks) in how.refused {
        let have = bad.entry(name.clone()).or_default();
        for (t, why) in disks {
            if !have.iter().any(|(u, _)| u == t) {
                have.push((t.clone(), why.clone()));
            }
        }
    }
    bad.retain(|name, _| !how.keep.contains(name));
    checked.degraded = bad
        .iter()
        .flat_map(|(c, disks)| {
            disks.iter().map(move |(d, r)| Degraded {
                checkpoint: c.clone(),
                disk: d.clone(),
                reason: r.clone(),
            })
        })
        .collect();
    checked.target = if policy == BitmapPolicy::Degrade {
        degrade(target, &bad, &mut checked.dropped)
    } else {
        target
    };
    Ok(checked)
}

/// A shut-off domain: each disk's chain read once, every checkpoint's
/// bitmap on it judged by libvirt's rules.
fn stopped(
    info: &DomainInfo,
    target: &[CheckpointDef],
    reader: &dyn ImageReader,
    checked: &mut Checked,
) -> Bad {
    let mut bad = Bad::new();
    let named: BTreeSet<&str> = target
        .iter()
        .flat_map(|d| d.disks.keys().map(String::as_str))
        .collect();
    for disk in info
        .disks
        .iter()
        .filter(|d| named.contains(d.target.as_str()))
    {
        let Some(path) = &disk.source else {
            checked.unverified.push(Unverified {
                disk: disk.target.clone(),
                reason: "the disk has no local image to read".into(),
            });
            continue;
        };
        let chain = match reader.read_chain(path) {
            Ok(chain) => chain,
            Err(ImageError::NotQcow2 { .. }) => {
                for def in target.iter().filter(|d| d.disks.contains_key(&disk.target)) {
                    bad.entry(def.name.clone()).or_default().push((
                        disk.target.clone(),
                        "the disk's image is not qcow2: it holds no bitmaps".into(),
                    ));
                }
                continue;
            }
            Err(ImageError::Unreadable { path, reason }) => {
                checked.unverified.push(Unverified {
                    disk: disk.target.clone(),
                    reason: format!("{} cannot be read: {reason}", path.display()),
                });
                continue;
            }
        };
        let indexed = Indexed::new(&chain);
        for def in target {
            let Some(bitmap) = def.disks.get(&disk.target) else {
                continue;
            };
            if let Some((_, _, detail)) = bitmap_problems(&indexed, bitmap, InUse::Damage)
                .into_iter()
                .next()
            {
                bad.entry(def.name.clone())
                    .or_default()
                    .push((disk.target.clone(), detail));
            }
        }
    }
    bad
}

/// A running domain: libvirt checks each checkpoint it holds under the
/// same name with another content; the ones it lacks are left to
/// `REDEFINE_VALIDATE`.
fn running(
    backend: &dyn Backend,
    domain: &str,
    current: &[CheckpointDef],
    target: &[CheckpointDef],
    checked: &mut Checked,
) -> Result<Bad, BackendError> {
    let mut bad = Bad::new();
    let disks: BTreeSet<&str> = target
        .iter()
        .flat_map(|d| d.disks.keys().map(String::as_str))
        .collect();
    let cannot = |checked: &mut Checked, reason: &str| {
        checked.unverified = disks
            .iter()
            .map(|d| Unverified {
                disk: (*d).to_string(),
                reason: reason.to_string(),
            })
            .collect();
    };
    if !backend.checks_bitmaps()? {
        cannot(checked, "this libvirt driver does not check bitmaps");
        return Ok(bad);
    }
    checked.validate = true;
    let held: HashMap<&str, &CheckpointDef> =
        current.iter().map(|d| (d.name.as_str(), d)).collect();
    for def in target {
        match held.get(def.name.as_str()) {
            Some(have) if **have == *def => continue,
            Some(_) => {}
            None => continue,
        }
        let states = match backend.bitmap_states(domain, &def.name) {
            Ok(s) => s,
            Err(e) if e.is_connection() || e.kind == BackendErrorKind::NoDomain => return Err(e),
            Err(e) => {
                cannot(checked, &format!("libvirt's per-disk check failed: {e}"));
                return Ok(bad);
            }
        };
        for s in states {
            if s.state == BitmapState::Unusable && def.disks.contains_key(&s.target) {
                bad.entry(def.name.clone()).or_default().push((
                    s.target,
                    format!("libvirt finds bitmap {} missing or broken", def.name),
                ));
            }
        }
    }
    Ok(bad)
}

/// Leave each bad disk out of its checkpoint; a checkpoint left with no
/// disk goes, and its children hang off its nearest kept ancestor.
/// `target` is parent-first.
fn degrade(
    target: Vec<CheckpointDef>,
    bad: &Bad,
    dropped: &mut Vec<(String, Option<String>)>,
) -> Vec<CheckpointDef> {
    let mut gone: HashMap<String, Option<String>> = HashMap::new();
    let mut out = Vec::with_capacity(target.len());
    for mut def in target {
        while let Some(up) = def.parent.as_ref().and_then(|p| gone.get(p)) {
            def.parent.clone_from(up);
        }
        if let Some(disks) = bad.get(&def.name) {
            for (t, _) in disks {
                def.disks.remove(t);
            }
            if def.disks.is_empty() {
                gone.insert(def.name.clone(), def.parent.clone());
                dropped.push((def.name, def.parent));
                continue;
            }
        }
        out.push(def);
    }
    out
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn degrade_drops_a_checkpoint_with_no_disk_and_reparents_its_children() {
        let target = vec![
            def("a", None, &["vda", "vdb"]),
            def("b", Some("a"), &["vda", "vdb"]),
            def("c", Some("b"), &["vda", "vdb"]),
            def("d", Some("c"), &["vda"]),
        ];
        let mut bad = Bad::new();
        bad.insert(
            "b".into(),
            vec![("vda".into(), "x".into()), ("vdb".into(), "x".into())],
        );
        bad.insert("c".into(), vec![("vdb".into(), "y".into())]);
        let mut dropped = Vec::new();
        let out = degrade(target, &bad, &mut dropped);
        assert_eq!(
            out,
            vec![
                def("a", None, &["vda", "vdb"]),
                def("c", Some("a"), &["vda"]),
                def("d", Some("c"), &["vda"]),
            ]
        );
        assert_eq!(dropped, vec![("b".to_string(), Some("a".to_string()))]);
    }

    #[test]
    fn a_dropped_root_makes_its_children_roots() {
        let target = vec![def("a", None, &["vda"]), def("b", Some("a"), &["vda"])];
        let bad = Bad::from([("a".into(), vec![("vda".into(), "gone".into())])]);
        let out = degrade(target, &bad, &mut Vec::new());
        assert_eq!(out, vec![def("b", None, &["vda"])]);
    }
}
