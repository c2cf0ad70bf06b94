//! The engine: [`Store`] joins the journal and a backend. It runs the one
//! state machine of a transaction — plan, commit the intent, apply, verify,
//! commit; or roll back to the before-image — and recovers transactions
//! whose owner died.
//!
//! libvirt is the truth for progress: every phase starts by listing
//! libvirt's checkpoints and comparing them by content with the goal, so a
//! step whose outcome is unknown is never assumed done or undone.
//!
//! The code map: `options.rs` (how a store is opened, the test seams),
//! `report.rs` (what the operations answer: the wire format), `txn.rs`
//! (the transaction driver and recovery), `ensure.rs` (one checkpoint
//! made usable: `ensure`), `pool.rs` (the worker pool of
//! independent domains); this file holds [`Store`] and its operations.

mod arrivals;
mod ensure;
mod lifecycle;
mod options;
mod pool;
mod prune;
mod reapply;
mod reclaim;
mod report;
mod steps;
mod txn;

use std::collections::HashSet;
use std::ops::ControlFlow;
use std::path::Path;

use tracing::{info, warn};
use uuid::Uuid;

pub use ensure::{DiskMode, EnsureDisk, EnsureReport};
#[cfg(feature = "testing")]
pub use options::{Hook, Liveness, Seams};
pub use options::{ProgressFn, StoreOptions, CRASH_POINTS};
pub use prune::{PruneReport, RemovedBitmap, Retention};
pub use reclaim::ReclaimReport;
pub use report::{
    DomainStatus, History, HistoryEntry, Incomplete, Outcome, PlanReport, PlanStep, Policy,
    Progress, RecoverFailure, RecoverReport, Recovered, Status, SyncReport,
};

use crate::backend::Backend;
use crate::bitmaps::images::{ImageReader, Qcow2Reader};
use crate::bitmaps::{Bad, BitmapPolicy, Checked, How};
use crate::chain::{leaf_of, root_of, Chain, CheckpointDef, ValidChain};
use crate::error::{Error, ErrorDoc, Result};
use crate::journal::{
    Begin, Committed, Journal, JournalError, NewTxn, StepPhase, TxnKind, TxnRecord, TxnSummary,
};
use crate::lock::{DomainLock, Locks};
use crate::owner::Owner;
use crate::plan::plan;
use pool::parallel_map;
use txn::{backend_err, Txn};

/// The store: a journal plus the engine. Share one between threads.
pub struct Store {
    journal: Journal,
    locks: Locks,
    opts: StoreOptions,
    owner: Owner,
}

// The journal's path and the owner say which store it is; the locks and
// options add nothing to read.
#[allow(clippy::missing_fields_in_debug)]
impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("journal", &self.journal.path())
            .field("owner", &self.owner)
            .finish()
    }
}

impl Store {
    /// Open the journal at `path` with default options.
    ///
    /// # Errors
    ///
    /// [`Error::Journal`] when the journal cannot be used.
    pub fn open(path: impl AsRef<Path>) -> Result<Store> {
        Store::open_with(path, StoreOptions::default())
    }

    /// Open the journal at `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Journal`] when the journal cannot be used.
    pub fn open_with(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        let journal = Journal::open_with(path.as_ref(), &opts.journal)?;
        // The journal exists now: its real path names the lock folder, so
        // that every path that reaches the journal (a symlink, a relative
        // path) reaches the same locks.
        let real = std::fs::canonicalize(journal.path()).unwrap_or_else(|_| journal.path().into());
        #[cfg(feature = "testing")]
        let owner = opts.seams.owner.clone().unwrap_or_else(Owner::current);
        #[cfg(not(feature = "testing"))]
        let owner = Owner::current();
        Ok(Store {
            journal,
            locks: Locks::beside(&real),
            opts,
            owner,
        })
    }

    /// The journal itself (the `testing` feature: journal tests and
    /// benches).
    #[cfg(feature = "testing")]
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    #[cfg(not(feature = "testing"))]
    pub(crate) fn journal(&self) -> &Journal {
        &self.journal
    }

    fn point(&self, name: &'static str) {
        // Without the `testing` and `failpoints` features a crash point is
        // only a name.
        let _ = name;
        #[cfg(feature = "testing")]
        if let Some(h) = &self.opts.seams.hook {
            h(name);
        }
        fail::fail_point!(name);
    }

    /// Tell the progress callback; `Err(Aborted)` when it asks to stop.
    fn report_progress(
        &self,
        txn: &Txn<'_>,
        phase: StepPhase,
        done: u64,
        total: u64,
    ) -> Result<()> {
        let Some(f) = self.opts.progress.as_ref().filter(|_| total > 0) else {
            return Ok(());
        };
        let go_on = f(&Progress {
            txn: txn.id,
            domain: txn.domain.to_string(),
            phase,
            done,
            total,
        });
        match go_on {
            ControlFlow::Continue(()) => Ok(()),
            ControlFlow::Break(()) => {
                warn!(txn = %txn.id, "stopped by the progress callback; the transaction stays open");
                Err(Error::Aborted {
                    domain: txn.domain.to_string(),
                    txn: txn.id,
                })
            }
        }
    }

    fn alive(&self, o: &Owner) -> bool {
        #[cfg(feature = "testing")]
        if let Some(f) = &self.opts.seams.liveness {
            return f(o);
        }
        o.is_alive()
    }

    /// May the caller, holding the domain's lock, take over `t`? Its owner
    /// is dead, or it is this store's own identity (a transaction an error
    /// left open). A live owner in another process that holds no lock left
    /// the transaction open after an error and may still recover it.
    pub(crate) fn orphaned(&self, t: &TxnRecord) -> bool {
        t.owner == self.owner || !self.alive(&t.owner)
    }

    /// Is an open transaction's owner alive (`status`, `metrics`)?
    pub(crate) fn owner_alive(&self, s: &TxnSummary) -> bool {
        self.locks.is_held(&s.domain) || self.alive(&s.owner)
    }

    /// Take the domain's lock, held until the returned guard is dropped.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`] when another writer (thread or process) holds it;
    /// [`Error::Journal`] when the lock folder cannot be written.
    pub(crate) fn lock_domain(&self, domain: &str) -> Result<DomainLock> {
        match self.locks.try_lock(domain) {
            Ok(Some(lock)) => Ok(lock),
            Ok(None) => {
                let open = self.journal.incomplete(Some(domain))?.into_iter().next();
                Err(Error::Busy {
                    domain: domain.to_string(),
                    txn: open.as_ref().map(|t| t.id),
                    owner: open.map(|t| t.owner),
                })
            }
            Err(e) => Err(Error::Journal(JournalError::io(format!(
                "cannot lock domain {domain} beside the journal: {e}"
            )))),
        }
    }

    /// Make the domain's libvirt checkpoints exactly `chain`, all or nothing.
    ///
    /// A dead owner's open transaction on the domain is recovered first.
    ///
    /// # Errors
    ///
    /// [`Error::Chain`] or [`Error::UnknownTarget`] for bad input (nothing
    /// changed); [`Error::Busy`]; [`Error::Refused`] when libvirt refused a
    /// step (rolled back); [`Error::Backend`] when libvirt is unreachable;
    /// [`Error::Journal`].
    pub fn sync(&self, backend: &dyn Backend, chain: Chain) -> Result<SyncReport> {
        let valid = chain.validate()?;
        let domain = valid.domain();
        self.check_targets(backend, &domain, valid.targets().into_iter())?;
        let warnings = detached_warnings(&valid);
        self.apply_degrading(
            backend,
            &domain,
            TxnKind::Sync,
            Some(valid.chain()),
            &|| valid.defs(),
            warnings,
        )
    }

    /// Show what [`Store::sync`] would do, changing nothing.
    ///
    /// # Errors
    ///
    /// As [`Store::sync`], without `Busy` or `Refused`.
    pub fn plan(&self, backend: &dyn Backend, chain: Chain) -> Result<PlanReport> {
        let valid = chain.validate()?;
        let domain = valid.domain();
        self.check_targets(backend, &domain, valid.targets().into_iter())?;
        let warnings = detached_warnings(&valid);
        self.preview(
            backend,
            domain,
            &valid.defs(),
            warnings,
            false,
            Some(valid.chain()),
        )
    }

    /// Show what [`Store::resync`] would do (a re-apply of the domain's
    /// committed chain), changing nothing: the same document as
    /// [`Store::plan`].
    ///
    /// # Errors
    ///
    /// As [`Store::resync`], without `Busy` or `Refused`.
    pub fn plan_resync(&self, backend: &dyn Backend, domain: &str) -> Result<PlanReport> {
        let re = self.reapply_target(backend, domain)?;
        self.preview(
            backend,
            domain.to_string(),
            &re.target(),
            re.warnings.clone(),
            true,
            re.chain(),
        )
    }

    /// The plan from libvirt's checkpoints to `target`, with the warnings
    /// of the chain, of open transactions and of the planner.
    fn preview(
        &self,
        backend: &dyn Backend,
        domain: String,
        target: &[CheckpointDef],
        mut warnings: Vec<String>,
        reapply: bool,
        chain: Option<&Chain>,
    ) -> Result<PlanReport> {
        for t in self.journal.incomplete(Some(&domain))? {
            let who = if self.orphaned(&t) {
                "will be recovered first"
            } else {
                "is held by a live process (busy)"
            };
            warnings.push(format!("transaction {} on domain {domain} {who}", t.id));
        }
        let current = backend
            .list(&domain)
            .map_err(backend_err(&domain, "list", None))?;
        let goal = reapply::goal(
            reapply,
            target.to_vec(),
            chain,
            &current,
            self.opts.prune_foreign,
        );
        warnings.extend(goal.warnings);
        let checked = self.check_bitmaps(
            backend,
            &domain,
            &current,
            goal.target,
            &goal.keep,
            &Bad::new(),
        )?;
        warnings.extend(txn::dropped_warnings(&checked));
        let plan = plan(&current, &checked.target);
        warnings.extend(plan.warnings.iter().cloned());
        let mut report = PlanReport::new(domain, &plan, warnings);
        report.degraded = checked.degraded;
        report.unverified = checked.unverified;
        report.adopted = goal.adopted;
        report.foreign = goal.foreign;
        Ok(report)
    }

    /// The domain's committed chain as a chain file: what `sync --chain`
    /// takes, and makes no call for while libvirt holds it.
    ///
    /// A chain committed by a sync comes back as it was given. One adopted
    /// by `import` is described from libvirt's definitions: `vm_id` is the
    /// domain's UUID (asked of `backend`), each disk's id is its target
    /// name, each checkpoint's disks are those whose bitmap it names.
    ///
    /// # Errors
    ///
    /// [`Error::NoCommittedChain`]; [`Error::NotExportable`] when libvirt
    /// keeps a checkpoint under a bitmap of another name;
    /// [`Error::Backend`] (an imported chain's domain lookup);
    /// [`Error::Journal`].
    pub fn export(&self, backend: &dyn Backend, domain: &str) -> Result<Chain> {
        let committed = self
            .journal
            .committed(domain)?
            .ok_or_else(|| Error::NoCommittedChain {
                domain: domain.to_string(),
            })?;
        if let Some(chain) = committed.chain {
            return Ok(chain);
        }
        let info =
            backend
                .domain_info(domain)
                .map_err(backend_err(domain, "domain lookup", None))?;
        let not = |reason: String| Error::NotExportable {
            domain: domain.to_string(),
            reason,
        };
        let vm_id = Uuid::parse_str(&info.uuid)
            .map_err(|_| not(format!("libvirt gives the UUID {:?}", info.uuid)))?;
        let chain = chain_of(domain, vm_id, &committed.defs).map_err(&not)?;
        // What sync would refuse is no export.
        chain.clone().validate().map_err(|e| not(e.to_string()))?;
        Ok(chain)
    }

    /// Re-apply the domain's last committed chain (after a transient domain
    /// was recreated, or libvirt lost its metadata).
    ///
    /// # Errors
    ///
    /// [`Error::NoCommittedChain`]; otherwise as [`Store::sync`].
    pub fn resync(&self, backend: &dyn Backend, domain: &str) -> Result<SyncReport> {
        let re = self.reapply_target(backend, domain)?;
        self.apply_degrading(
            backend,
            domain,
            TxnKind::Resync,
            re.chain(),
            &|| re.target(),
            re.warnings.clone(),
        )
    }

    /// What a re-apply of the domain's committed chain aims at; its disk
    /// targets checked against the domain.
    fn reapply_target(&self, backend: &dyn Backend, domain: &str) -> Result<Reapply> {
        let committed = self
            .journal
            .committed(domain)?
            .ok_or_else(|| Error::NoCommittedChain {
                domain: domain.to_string(),
            })?;
        let re = match committed.chain {
            Some(chain) => {
                let valid = chain.validate()?;
                Reapply {
                    warnings: detached_warnings(&valid),
                    source: Source::Chain(valid),
                }
            }
            None => Reapply {
                source: Source::Imported(committed.defs),
                warnings: Vec::new(),
            },
        };
        let targets = match &re.source {
            Source::Chain(valid) => valid.targets(),
            Source::Imported(defs) => defs
                .iter()
                .flat_map(|d| d.disks.keys().map(String::as_str))
                .collect(),
        };
        self.check_targets(backend, domain, targets.into_iter())?;
        Ok(re)
    }

    /// Adopt the domain's current libvirt checkpoints as its committed chain.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`] when a live process holds the domain;
    /// [`Error::Backend`]; [`Error::Journal`].
    pub fn import(&self, backend: &dyn Backend, domain: &str) -> Result<SyncReport> {
        let _lock = self.lock_domain(domain)?;
        let recovered = self.recover_domain_first(backend, domain)?;
        let warnings = crate::leftovers::repair(backend, domain);
        let current = backend
            .list(domain)
            .map_err(backend_err(domain, "list", None))?;
        let id = Uuid::new_v4();
        let new = NewTxn {
            id,
            domain,
            kind: TxnKind::Import,
            chain: None,
            target: &current,
            before: &current,
            owner: &self.owner,
            steps: &[],
        };
        self.busy_if_open(
            domain,
            self.journal.record_unchanged(new, self.opts.history)?,
        )?;
        info!(txn = %id, domain, checkpoints = current.len(), "imported libvirt's checkpoints");
        Ok(SyncReport {
            txn: id,
            domain: domain.to_string(),
            outcome: Outcome::Unchanged,
            redefined: Vec::new(),
            deleted: Vec::new(),
            unchanged: current.iter().map(|d| d.name.clone()).collect(),
            libvirt_calls: 0,
            warnings,
            recovered,
            refused: None,
            degraded: Vec::new(),
            unverified: Vec::new(),
            adopted: Vec::new(),
            foreign: Vec::new(),
        })
    }

    /// Finish (or, with [`Policy::Rollback`], undo) every open transaction
    /// whose owner is dead, optionally of one domain only. Transactions of
    /// live owners are left alone.
    ///
    /// Every transaction is reported: those finished, those that failed
    /// (with the error; they stay open) and every transaction still open
    /// afterwards. One domain that cannot be recovered (gone for good,
    /// unreachable) does not hide the others.
    ///
    /// Domains are recovered in parallel by at most
    /// [`StoreOptions::workers`] threads; each domain's calls stay
    /// sequential.
    ///
    /// # Errors
    ///
    /// [`Error::Journal`] when the journal cannot be read at all.
    pub fn recover(
        &self,
        backend: &dyn Backend,
        policy: Policy,
        domain: Option<&str>,
    ) -> Result<RecoverReport> {
        let open = self.journal.incomplete(domain)?;
        let results = parallel_map(open, self.opts.workers, |t| {
            (
                t.id,
                t.domain.clone(),
                self.recover_one(backend, &t, policy),
            )
        });
        let mut report = RecoverReport::default();
        for (txn, domain, r) in results {
            match r {
                Ok(Some(r)) => report.recovered.push(r),
                Ok(None) => {}
                Err(error) => {
                    warn!(%txn, %domain, %error, "recovery failed; the transaction stays open");
                    report.failed.push(RecoverFailure {
                        txn,
                        domain,
                        error: ErrorDoc::from(&error),
                    });
                }
            }
        }
        report.left_open = self.status(domain)?.incomplete;
        Ok(report)
    }

    /// [`Store::resync`] of several domains, in parallel by at most
    /// [`StoreOptions::workers`] threads (a host restart re-applies every
    /// transient domain's chain). Results are in the order given.
    pub fn resync_many(
        &self,
        backend: &dyn Backend,
        domains: &[String],
    ) -> Vec<Result<SyncReport>> {
        parallel_map(domains.iter().collect(), self.opts.workers, |d| {
            self.resync(backend, d)
        })
    }

    /// Open transactions with progress and owner liveness, and every
    /// domain's committed chain.
    ///
    /// # Errors
    ///
    /// [`Error::Journal`].
    pub fn status(&self, domain: Option<&str>) -> Result<Status> {
        let incomplete = self
            .journal
            .incomplete_summaries(domain)?
            .into_iter()
            .map(|s| {
                let alive = self.owner_alive(&s);
                Incomplete::new(s, alive)
            })
            .collect();
        let domains = self
            .journal
            .all_committed()?
            .into_iter()
            .filter(|c| domain.is_none_or(|d| d == c.domain))
            .map(|c| domain_status(&c))
            .collect();
        Ok(Status {
            incomplete,
            domains,
        })
    }

    /// A domain's committed chain, if it has one.
    ///
    /// # Errors
    ///
    /// [`Error::Journal`].
    pub fn committed(&self, domain: &str) -> Result<Option<Committed>> {
        Ok(self.journal.committed(domain)?)
    }

    /// A domain's past and open transactions, newest first.
    ///
    /// # Errors
    ///
    /// [`Error::Journal`].
    pub fn history(&self, domain: &str, limit: usize) -> Result<History> {
        Ok(History {
            domain: domain.to_string(),
            transactions: self
                .journal
                .history(domain, limit)?
                .into_iter()
                .map(HistoryEntry::from)
                .collect(),
        })
    }

    fn check_targets<'a>(
        &self,
        backend: &dyn Backend,
        domain: &str,
        targets: impl Iterator<Item = &'a str>,
    ) -> Result<()> {
        let info =
            backend
                .domain_info(domain)
                .map_err(backend_err(domain, "domain lookup", None))?;
        for t in targets {
            if !info.has_target(t) {
                let known: Vec<&str> = info.disks.iter().map(|d| d.target.as_str()).collect();
                return Err(Error::UnknownTarget {
                    domain: domain.to_string(),
                    target: t.to_string(),
                    known: known.join(", "),
                });
            }
        }
        Ok(())
    }

    /// The bitmap check before an intent (see [`crate::bitmaps`]); under
    /// `strict`, a missing or unusable bitmap refuses here, before any
    /// libvirt call that changes anything.
    fn check_bitmaps(
        &self,
        backend: &dyn Backend,
        domain: &str,
        current: &[CheckpointDef],
        target: Vec<CheckpointDef>,
        keep: &HashSet<String>,
        refused: &Bad,
    ) -> Result<Checked> {
        if self.opts.bitmaps == BitmapPolicy::Ignore {
            return Ok(Checked {
                target,
                ..Checked::default()
            });
        }
        let info =
            backend
                .domain_info(domain)
                .map_err(backend_err(domain, "domain lookup", None))?;
        let checked = crate::bitmaps::check(
            backend,
            domain,
            &info,
            current,
            target,
            &How {
                policy: self.opts.bitmaps,
                reader: self.images(),
                keep,
                refused,
            },
        )
        .map_err(backend_err(domain, "bitmap check", None))?;
        if self.opts.bitmaps == BitmapPolicy::Strict && !checked.degraded.is_empty() {
            return Err(Error::MissingBitmaps {
                domain: domain.to_string(),
                disks: checked.degraded,
            });
        }
        Ok(checked)
    }

    /// Where a shut-off domain's images are read from.
    fn images(&self) -> &dyn ImageReader {
        #[cfg(feature = "testing")]
        if let Some(r) = &self.opts.seams.images {
            return r.as_ref();
        }
        &Qcow2Reader
    }

    fn busy_if_open(&self, domain: &str, b: Begin) -> Result<()> {
        match b {
            Begin::Started => Ok(()),
            Begin::Open(t) => Err(Error::Busy {
                domain: domain.to_string(),
                txn: Some(t.id),
                owner: Some(t.owner),
            }),
        }
    }
}

/// The goal of a re-apply: the committed chain (when a sync gave one),
/// its definitions, and the warnings about it.
struct Reapply {
    source: Source,
    warnings: Vec<String>,
}

/// Where a re-apply's definitions come from.
enum Source {
    /// The committed chain file, validated.
    Chain(ValidChain),
    /// An imported chain: the definitions libvirt had.
    Imported(Vec<CheckpointDef>),
}

impl Reapply {
    /// The chain to journal, if the committed chain came from one.
    fn chain(&self) -> Option<&Chain> {
        match &self.source {
            Source::Chain(valid) => Some(valid.chain()),
            Source::Imported(_) => None,
        }
    }

    /// The definitions to aim at, made afresh for each attempt (a long
    /// chain's are megabytes: never held twice).
    fn target(&self) -> Vec<CheckpointDef> {
        match &self.source {
            Source::Chain(valid) => valid.defs(),
            Source::Imported(defs) => defs.clone(),
        }
    }
}

/// A chain file describing `defs` (an imported chain): disk ids are the
/// target names.
fn chain_of(
    domain: &str,
    vm_id: Uuid,
    defs: &[CheckpointDef],
) -> std::result::Result<Chain, String> {
    for d in defs {
        if let Some((target, bitmap)) = d.disks.iter().find(|(_, b)| **b != d.name) {
            return Err(format!(
                "checkpoint {} names bitmap {bitmap:?} on disk {target}, and a chain names each bitmap after its checkpoint",
                d.name
            ));
        }
        if chrono::DateTime::from_timestamp(d.creation_time, 0).is_none() {
            return Err(format!(
                "checkpoint {} has creation time {}",
                d.name, d.creation_time
            ));
        }
    }
    let empty = Chain {
        scope: None,
        vm_id,
        domain: Some(domain.to_string()),
        disks: std::collections::BTreeMap::new(),
        checkpoints: Vec::new(),
    };
    Ok(reapply::with_defs(&empty, defs))
}

fn detached_warnings(v: &ValidChain) -> Vec<String> {
    v.detached()
        .iter()
        .map(|d| {
            format!(
                "checkpoint {} names disk {}, which is no longer attached: left out",
                d.checkpoint, d.disk
            )
        })
        .collect()
}

fn domain_status(c: &Committed) -> DomainStatus {
    DomainStatus {
        domain: c.domain.clone(),
        checkpoints: c.defs.len(),
        root: root_of(&c.defs).map(|d| d.name.clone()),
        leaf: leaf_of(&c.defs).map(|d| d.name.clone()),
        txn: c.txn,
        committed_at: c.committed_at.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use std::sync::{Arc, Mutex};

    use chrono::DateTime;

    use super::*;
    use crate::backend::fake::FakeBackend;
    use crate::chain::Checkpoint;

    #[test]
    fn progress_counts_every_call_of_a_round() {
        let disk = Uuid::from_u128(1).to_string();
        let chain = Chain {
            scope: None,
            vm_id: Uuid::from_u128(2),
            domain: Some("vm".into()),
            disks: BTreeMap::from([(disk.clone(), "sda".to_string())]),
            checkpoints: (0..3u128)
                .map(|i| Checkpoint {
                    id: Uuid::from_u128(100 + i).to_string(),
                    parent: i
                        .checked_sub(1)
                        .map(|p| Uuid::from_u128(100 + p).to_string()),
                    created: DateTime::from_timestamp(1_600_000_000 + i as i64, 0).unwrap(),
                    description: None,
                    disks: vec![disk.clone()],
                })
                .collect(),
        };
        let fake = FakeBackend::new();
        fake.define_domain(
            "vm",
            "93a5c045-6457-2c09-e56c-927cdf34e178",
            &["sda"],
            false,
        );
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let progress: ProgressFn = Arc::new(move |p: &Progress| {
            assert_eq!((p.domain.as_str(), p.phase), ("vm", StepPhase::Apply));
            sink.lock().unwrap().push((p.done, p.total));
            ControlFlow::Continue(())
        });
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            progress: Some(progress),
            ..StoreOptions::default()
        };
        let store = Store::open_with(dir.path().join("j.db"), opts).unwrap();
        store.sync(&fake, chain.clone()).unwrap();
        assert_eq!(*seen.lock().unwrap(), vec![(0, 3), (1, 3), (2, 3), (3, 3)]);
        // A sync with nothing to do makes no call and reports nothing.
        seen.lock().unwrap().clear();
        assert_eq!(
            store.sync(&fake, chain).unwrap().outcome,
            Outcome::Unchanged
        );
        assert!(seen.lock().unwrap().is_empty());
    }
}
