//! `ensure`: make one checkpoint — the base of the next incremental
//! backup — usable in libvirt, lazily, at backup time, instead of the
//! whole chain.
//!
//! The checkpoint's definition comes from the domain's committed chain (or
//! a chain file). Each of its disks is checked: the bitmap named after it
//! is usable (`incremental`) or not (`full`, with the reason). The
//! checkpoint is redefined on exactly the usable disks, under its parent
//! when libvirt lists that parent and as a root otherwise; everything else
//! libvirt holds stays as it is (an ensure never deletes). It is one
//! transaction of kind `ensure`, driven like a sync (intent first,
//! `REDEFINE_VALIDATE` on a running domain, the degrade retry, rollback,
//! recovery); its target is libvirt's listing plus the checkpoint, and
//! committing it leaves the domain's committed chain as it was.
//!
//! Where the disks are checked:
//! - a shut-off domain: its images, read in-process (`crate::bitmaps`);
//! - a running domain whose libvirt holds the checkpoint: libvirt's own
//!   per-disk check ([`Backend::bitmap_states`]); a disk libvirt's
//!   checkpoint leaves out stays out (so a second ensure makes no call);
//! - a running domain whose libvirt lacks it: `REDEFINE_VALIDATE` at the
//!   redefine, and a refused disk is left out in a new transaction;
//! - a libvirt that checks no bitmaps (the test driver): every disk is
//!   unverified, so `full`.
//!
//! libvirt's hidden current checkpoint, from which the next backup's new
//! checkpoint hangs, ends on the target's leaf — the newest checkpoint
//! without children: the ensured one when it is the newest libvirt has,
//! libvirt's newest otherwise (the planner keeps it there).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::reapply::Goal;
use super::txn::backend_err;
use super::Store;
use crate::backend::{Backend, BackendErrorKind, BitmapState, DomainInfo};
use crate::bitmaps::images::ImageReader;
use crate::bitmaps::{Bad, BitmapPolicy, Degraded, How};
use crate::chain::{order_defs, Chain, CheckpointDef};
use crate::error::{Error, Result};
use crate::journal::TxnKind;

/// What the next backup from the ensured checkpoint can do on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskMode {
    /// The checkpoint's bitmap is usable: an incremental backup from it.
    Incremental,
    /// No usable bitmap: the disk needs a full backup.
    Full,
}

/// One disk of an ensured checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsureDisk {
    /// The chain's disk id (the target name when the chain came from
    /// `import`).
    pub disk: String,
    /// The disk's target name.
    pub target: String,
    /// What the next backup can do on it.
    pub mode: DiskMode,
    /// Why it is `full` (absent when `incremental`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// What [`Store::ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnsureReport {
    /// The transaction (recorded even when nothing was to do).
    pub txn: Uuid,
    /// The domain.
    pub domain: String,
    /// The checkpoint ensured.
    pub checkpoint: String,
    /// Each disk of the checkpoint, in target order, with its mode.
    pub disks: Vec<EnsureDisk>,
    /// The checkpoint was redefined in libvirt by this call.
    pub redefined: bool,
    /// Calls that changed libvirt, in the transaction that committed.
    pub libvirt_calls: u64,
    /// Anything worth telling (a parent libvirt lacks, recoveries, libvirt's
    /// refusals that left a disk out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// The checkpoint to ensure, and each of its targets' disk id.
struct Wanted {
    def: CheckpointDef,
    ids: BTreeMap<String, String>,
}

impl Store {
    /// Make `checkpoint`, the base of the next incremental backup, usable in
    /// libvirt: redefined on exactly the disks whose bitmap is usable, as a
    /// root when libvirt lacks its parent. Its definition comes from
    /// `chain`, or else from the domain's committed chain. Idempotent;
    /// never deletes. With no usable disk it is not redefined and every
    /// disk is `full`: the per-disk mode is the answer.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownCheckpoint`], [`Error::NoCommittedChain`],
    /// [`Error::OtherDomain`], [`Error::Chain`], [`Error::UnknownTarget`]
    /// for bad input (nothing changed); [`Error::MissingBitmaps`] under
    /// `strict`; otherwise as [`Store::sync`].
    pub fn ensure(
        &self,
        backend: &dyn Backend,
        domain: &str,
        checkpoint: &str,
        chain: Option<Chain>,
    ) -> Result<EnsureReport> {
        let wanted = self.wanted(domain, checkpoint, chain)?;
        self.check_targets(backend, domain, wanted.def.disks.keys().map(String::as_str))?;
        let info =
            backend
                .domain_info(domain)
                .map_err(backend_err(domain, "domain lookup", None))?;
        let current = backend
            .list(domain)
            .map_err(backend_err(domain, "list", None))?;
        let mut full = self.unusable(backend, domain, &info, &current, &wanted.def)?;
        if self.opts.bitmaps == BitmapPolicy::Strict && !full.is_empty() {
            return Err(missing(domain, checkpoint, &full));
        }
        let mut def = wanted.def.clone();
        def.disks.retain(|t, _| !full.contains_key(t));
        let target = if def.disks.is_empty() {
            Vec::new()
        } else {
            vec![def]
        };
        let r = self
            .apply_degrading(
                backend,
                domain,
                TxnKind::Ensure,
                None,
                &|| target.clone(),
                Vec::new(),
            )
            .map_err(|e| strict_refusal(e, self.opts.bitmaps, checkpoint))?;
        for d in r.degraded.iter().filter(|d| d.checkpoint == checkpoint) {
            full.entry(d.disk.clone())
                .or_insert_with(|| d.reason.clone());
        }
        let disks = wanted
            .def
            .disks
            .keys()
            .map(|t| EnsureDisk {
                disk: wanted.ids.get(t).cloned().unwrap_or_else(|| t.clone()),
                target: t.clone(),
                mode: if full.contains_key(t) {
                    DiskMode::Full
                } else {
                    DiskMode::Incremental
                },
                reason: full.get(t).cloned(),
            })
            .collect();
        Ok(EnsureReport {
            txn: r.txn,
            domain: domain.to_string(),
            checkpoint: checkpoint.to_string(),
            disks,
            redefined: r.redefined.iter().any(|n| n == checkpoint),
            libvirt_calls: r.libvirt_calls,
            warnings: r.warnings,
        })
    }

    /// The checkpoint's definition: from `chain` (validated as a sync
    /// validates it, for this domain) or the committed chain.
    fn wanted(&self, domain: &str, checkpoint: &str, chain: Option<Chain>) -> Result<Wanted> {
        let (defs, ids, from) = match chain {
            Some(chain) => {
                let valid = chain.validate()?;
                if valid.domain() != domain {
                    return Err(Error::OtherDomain {
                        domain: domain.to_string(),
                        chain: valid.domain(),
                    });
                }
                (valid.defs(), ids_of(valid.chain()), "chain file")
            }
            None => {
                let committed =
                    self.journal
                        .committed(domain)?
                        .ok_or_else(|| Error::NoCommittedChain {
                            domain: domain.to_string(),
                        })?;
                match committed.chain {
                    Some(chain) => {
                        let valid = chain.validate()?;
                        (valid.defs(), ids_of(valid.chain()), "committed chain")
                    }
                    None => (committed.defs, BTreeMap::new(), "committed chain"),
                }
            }
        };
        let def = defs
            .into_iter()
            .find(|d| d.name == checkpoint)
            .ok_or_else(|| Error::UnknownCheckpoint {
                domain: domain.to_string(),
                checkpoint: checkpoint.to_string(),
                from,
            })?;
        Ok(Wanted { def, ids })
    }

    /// The disks of `def` whose bitmap is known not usable (or cannot be
    /// checked), with the reason: target → reason. A running domain whose
    /// libvirt lacks the checkpoint is left to `REDEFINE_VALIDATE`.
    fn unusable(
        &self,
        backend: &dyn Backend,
        domain: &str,
        info: &DomainInfo,
        current: &[CheckpointDef],
        def: &CheckpointDef,
    ) -> Result<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        if self.opts.bitmaps == BitmapPolicy::Ignore {
            return Ok(out);
        }
        let lost = backend_err(domain, "bitmap check", None);
        let every = |reason: &str| {
            def.disks
                .keys()
                .map(|t| (t.clone(), reason.to_string()))
                .collect()
        };
        if info.running {
            if !backend.checks_bitmaps().map_err(&lost)? {
                return Ok(every(
                    "unverified: this libvirt driver does not check bitmaps",
                ));
            }
            let Some(held) = current.iter().find(|d| d.name == def.name) else {
                return Ok(out);
            };
            let states = match backend.bitmap_states(domain, &def.name) {
                Ok(s) => s,
                Err(e) if e.is_connection() || e.kind == BackendErrorKind::NoDomain => {
                    return Err(lost(e))
                }
                Err(e) => return Ok(every(&format!("unverified: libvirt's check failed: {e}"))),
            };
            for t in def.disks.keys() {
                let why = if held.disks.contains_key(t) {
                    match states.iter().find(|s| s.target == *t).map(|s| s.state) {
                        Some(BitmapState::Usable { .. }) => None,
                        Some(_) => Some(format!(
                            "libvirt finds bitmap {} missing or broken",
                            def.name
                        )),
                        None => Some("unverified: libvirt did not check this disk".into()),
                    }
                } else {
                    Some(format!(
                        "libvirt's checkpoint {} has no bitmap on this disk",
                        def.name
                    ))
                };
                if let Some(why) = why {
                    out.insert(t.clone(), why);
                }
            }
            return Ok(out);
        }
        let reader: &dyn ImageReader = self.images();
        let checked = crate::bitmaps::check(
            backend,
            domain,
            info,
            current,
            vec![def.clone()],
            &How {
                policy: BitmapPolicy::Degrade,
                reader,
                keep: &HashSet::new(),
                refused: &Bad::new(),
            },
        )
        .map_err(&lost)?;
        for d in checked.degraded {
            out.entry(d.disk).or_insert(d.reason);
        }
        for u in checked.unverified {
            out.entry(u.disk)
                .or_insert_with(|| format!("unverified: {}", u.reason));
        }
        Ok(out)
    }
}

/// The goal of an ensure transaction (under the domain's lock, from
/// libvirt's listing `current`): every checkpoint libvirt has, as it has
/// it, with `target`'s checkpoint (if any) put in, as a root when libvirt
/// lacks its parent. Only that checkpoint's bitmaps are checked again.
pub(super) fn goal(target: Vec<CheckpointDef>, current: &[CheckpointDef]) -> Goal<'static> {
    let mut defs = current.to_vec();
    let mut keep: HashSet<String> = current.iter().map(|d| d.name.clone()).collect();
    let mut warnings = Vec::new();
    for mut def in target {
        let gone = def
            .parent
            .take_if(|p| !current.iter().any(|d| d.name == *p));
        if let Some(p) = gone.filter(|_| !current.contains(&def)) {
            warnings.push(format!(
                "libvirt has no checkpoint {p}, the parent of {}: redefined as a root",
                def.name
            ));
        }
        keep.remove(&def.name);
        defs.retain(|d| d.name != def.name);
        defs.push(def);
    }
    Goal {
        target: order_defs(&defs).into_iter().cloned().collect(),
        keep,
        warnings,
        ..Goal::default()
    }
}

/// Target name → the chain's disk id.
fn ids_of(chain: &Chain) -> BTreeMap<String, String> {
    chain
        .disks
        .iter()
        .map(|(id, t)| (t.clone(), id.clone()))
        .collect()
}

fn missing(domain: &str, checkpoint: &str, full: &BTreeMap<String, String>) -> Error {
    Error::MissingBitmaps {
        domain: domain.to_string(),
        disks: full
            .iter()
            .map(|(t, r)| Degraded {
                checkpoint: checkpoint.to_string(),
                disk: t.clone(),
                reason: r.clone(),
            })
            .collect(),
    }
}

/// Under `strict`, libvirt's `REDEFINE_VALIDATE` refusing the checkpoint
/// for a disk's bitmap (the transaction rolled back, libvirt as it was) is
/// [`Error::MissingBitmaps`], as the check before the intent says it.
fn strict_refusal(e: Error, policy: BitmapPolicy, checkpoint: &str) -> Error {
    match e {
        Error::Refused {
            rolled_back: true,
            checkpoint: ref refused,
            ref source,
            ref domain,
            ..
        } if policy == BitmapPolicy::Strict
            && source.kind == BackendErrorKind::Inconsistent
            && refused == checkpoint =>
        {
            let disk = super::txn::refused_disk(&source.message).unwrap_or_default();
            Error::MissingBitmaps {
                domain: domain.clone(),
                disks: vec![Degraded {
                    checkpoint: checkpoint.to_string(),
                    disk,
                    reason: format!("libvirt's REDEFINE_VALIDATE: {}", source.message),
                }],
            }
        }
        e => e,
    }
}
