//! The engine: [`Store`] joins the journal and a backend. It runs the one
//! state machine of a transaction — plan, commit the intent, apply, verify,
//! commit; or roll back to the before-image — and recovers transactions
//! whose owner died.
//!
//! libvirt is the truth for progress: every phase starts by listing
//! libvirt's checkpoints and comparing them by content with the goal, so a
//! step whose outcome is unknown is never assumed done or undone.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, info_span, warn};
use uuid::Uuid;

use crate::backend::{Backend, BackendError, BackendErrorKind};
use crate::chain::{leaf_of, root_of, Chain, CheckpointDef, ValidChain};
use crate::error::{Error, Result};
use crate::journal::{
    Begin, Committed, Journal, JournalOptions, NewStep, NewTxn, StepOp, StepPhase, TxnEvent,
    TxnKind, TxnRecord, TxnState, TxnSummary,
};
use crate::owner::Owner;
use crate::plan::{plan, plan_from, replay_journal, same_content, Current, Plan, Replayed, Step};
use crate::xml::{parse_checkpoint, render_checkpoint};

/// A hook called at every named crash point (see [`CRASH_POINTS`]).
pub type Hook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// A liveness test for transaction owners.
pub type Liveness = Arc<dyn Fn(&Owner) -> bool + Send + Sync>;

/// A progress callback (see [`StoreOptions::progress`]).
pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

/// How far one round of libvirt calls has got, for a progress display.
///
/// A phase may take more than one round (a resume plans afresh after a
/// lost connection), so `done` may start again from zero with a new
/// `total`; `done == total` ends a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The transaction.
    pub txn: Uuid,
    /// The domain.
    pub domain: String,
    /// Towards the target, or back to the before-image.
    pub phase: StepPhase,
    /// Calls of this round made so far.
    pub done: u64,
    /// Calls this round will make.
    pub total: u64,
}

/// Every named point where a process may die, in the order one
/// transaction passes them. Simulation tests crash at each; the
/// `failpoints` feature exposes them to the real binary through the `fail`
/// crate.
pub const CRASH_POINTS: &[&str] = &[
    "txn.intent_committed",
    "step.before_call",
    "step.after_call",
    "step.recorded",
    "phase.verified",
    "txn.rollback_begun",
    "txn.finished",
    "recover.taken_over",
];

/// How [`Store::recover`] finishes an interrupted transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Go on to the target (a transaction already rolling back finishes its
    /// rollback).
    #[default]
    Resume,
    /// Restore the before-image.
    Rollback,
}

/// How a transaction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// libvirt equals the target.
    Committed,
    /// libvirt already equalled the target: no libvirt call was made.
    Unchanged,
    /// libvirt equals the before-image.
    RolledBack,
}

/// What [`Store::sync`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    /// The transaction.
    pub txn: Uuid,
    /// The domain.
    pub domain: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Checkpoints redefined (in order; forced ones included).
    pub redefined: Vec<String>,
    /// Checkpoints deleted.
    pub deleted: Vec<String>,
    /// Target checkpoints libvirt already had.
    pub unchanged: Vec<String>,
    /// Mutating libvirt calls made (redefine + delete).
    pub libvirt_calls: u64,
    /// Things the caller should know (detached disks, recovered leftovers).
    pub warnings: Vec<String>,
    /// Transactions of this domain recovered before this one started.
    pub recovered: Vec<Recovered>,
}

/// What [`Store::plan`] would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanReport {
    /// The domain.
    pub domain: String,
    /// The steps, in order.
    pub plan: Plan,
    /// Things the caller should know.
    pub warnings: Vec<String>,
}

/// One transaction finished by [`Store::recover`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovered {
    /// The transaction.
    pub txn: Uuid,
    /// The domain.
    pub domain: String,
    /// Committed or rolled back.
    pub outcome: Outcome,
    /// Mutating libvirt calls the recovery made.
    pub libvirt_calls: u64,
}

/// An open transaction as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incomplete {
    /// The journal's summary.
    #[serde(flatten)]
    pub summary: TxnSummary,
    /// Whether its owner is alive (then `recover` leaves it alone).
    pub owner_alive: bool,
}

/// A domain's committed chain as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainStatus {
    /// The domain.
    pub domain: String,
    /// How many checkpoints.
    pub checkpoints: usize,
    /// The root of the leaf's branch.
    pub root: Option<String>,
    /// The newest leaf.
    pub leaf: Option<String>,
    /// The transaction that committed it.
    pub txn: Uuid,
    /// When.
    pub committed_at: String,
}

/// The answer to [`Store::status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// Open transactions.
    pub incomplete: Vec<Incomplete>,
    /// Committed chains.
    pub domains: Vec<DomainStatus>,
}

/// Options of [`Store::open_with`].
#[derive(Clone)]
pub struct StoreOptions {
    /// Finished transactions kept per domain.
    pub history: usize,
    /// How many times a lost connection is waited for before a transaction
    /// is left open for `recover`.
    pub reconnect_attempts: u32,
    /// Delay between those attempts.
    pub reconnect_delay: Duration,
    /// Journal tunables.
    pub journal: JournalOptions,
    /// The identity this store writes as owner (default: this process).
    pub owner: Option<Owner>,
    /// How owners are judged alive (default: [`Owner::is_alive`]).
    pub liveness: Option<Liveness>,
    /// Called at every crash point (simulation tests).
    pub hook: Option<Hook>,
    /// Threads that work on different domains at once (recover, resync of
    /// many domains). Calls within one domain are always sequential.
    pub workers: usize,
    /// Called before the first libvirt call of a round and after each call
    /// that succeeded (for a progress bar; must be quick).
    pub progress: Option<ProgressFn>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history: 100,
            reconnect_attempts: 10,
            reconnect_delay: Duration::from_millis(500),
            journal: JournalOptions::default(),
            owner: None,
            liveness: None,
            hook: None,
            workers: 4,
            progress: None,
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("history", &self.history)
            .field("reconnect_attempts", &self.reconnect_attempts)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("owner", &self.owner)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// Transactions some thread of this process is working on right now. A
/// transaction owned by this process but not in this set was left open by
/// an error and may be recovered.
static ACTIVE: Mutex<BTreeSet<Uuid>> = Mutex::new(BTreeSet::new());

struct Claim(Uuid);

impl Claim {
    fn take(id: Uuid) -> Option<Claim> {
        ACTIVE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id)
            .then_some(Claim(id))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        ACTIVE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0);
    }
}

/// The store: a journal plus the engine. Share one between threads.
pub struct Store {
    journal: Journal,
    opts: StoreOptions,
    owner: Owner,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("journal", &self.journal.path())
            .field("owner", &self.owner)
            .finish()
    }
}

/// Why a phase stopped.
enum PhaseError {
    /// libvirt refused a step.
    Refused(String, BackendError),
    /// Another error (unreachable, lost for good, journal, diverged).
    Other(Error),
}

impl From<crate::journal::JournalError> for PhaseError {
    fn from(e: crate::journal::JournalError) -> Self {
        PhaseError::Other(Error::Journal(e))
    }
}

/// A transaction being driven.
struct Txn<'a> {
    id: Uuid,
    domain: &'a str,
    calls: u64,
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
        let owner = opts.owner.clone().unwrap_or_else(Owner::current);
        Ok(Store {
            journal,
            opts,
            owner,
        })
    }

    /// The journal (read access for queries and checks).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn point(&self, name: &'static str) {
        if let Some(h) = &self.opts.hook {
            h(name);
        }
        fail::fail_point!(name);
    }

    fn report_progress(&self, txn: &Txn<'_>, phase: StepPhase, done: u64, total: u64) {
        if let (Some(f), true) = (&self.opts.progress, total > 0) {
            f(&Progress {
                txn: txn.id,
                domain: txn.domain.to_string(),
                phase,
                done,
                total,
            });
        }
    }

    fn alive(&self, o: &Owner) -> bool {
        match &self.opts.liveness {
            Some(f) => f(o),
            None => o.is_alive(),
        }
    }

    /// May this process take over `t`? Its owner is dead, or it is this
    /// store's own identity and no thread is working on it.
    fn orphaned(&self, t: &TxnRecord) -> bool {
        t.owner == self.owner || !self.alive(&t.owner)
    }

    /// Is `t` held by someone alive: another live process, or a thread of
    /// this process working on it right now? (Validation reports such a
    /// domain as busy instead of reading it mid-transaction.)
    pub(crate) fn is_held(&self, t: &TxnRecord) -> bool {
        let working = ACTIVE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&t.id);
        working || !self.orphaned(t)
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
        let target = valid.defs();
        self.apply(
            backend,
            &domain,
            TxnKind::Sync,
            Some(valid.chain()),
            target,
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
        let mut warnings = detached_warnings(&valid);
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
        let plan = plan(&current, &valid.defs());
        warnings.extend(plan.warnings.iter().cloned());
        Ok(PlanReport {
            domain,
            plan,
            warnings,
        })
    }

    /// Re-apply the domain's last committed chain (after a transient domain
    /// was recreated, or libvirt lost its metadata).
    ///
    /// # Errors
    ///
    /// [`Error::NoCommittedChain`]; otherwise as [`Store::sync`].
    pub fn resync(&self, backend: &dyn Backend, domain: &str) -> Result<SyncReport> {
        let committed = self
            .journal
            .committed(domain)?
            .ok_or_else(|| Error::NoCommittedChain {
                domain: domain.to_string(),
            })?;
        let (chain, target, warnings) = match committed.chain {
            Some(chain) => {
                let valid = chain.validate()?;
                let warnings = detached_warnings(&valid);
                (Some(valid.chain().clone()), valid.defs(), warnings)
            }
            None => (None, committed.defs, Vec::new()),
        };
        let targets: BTreeSet<&str> = target
            .iter()
            .flat_map(|d| d.disks.keys().map(String::as_str))
            .collect();
        self.check_targets(backend, domain, targets.into_iter())?;
        self.apply(
            backend,
            domain,
            TxnKind::Resync,
            chain.as_ref(),
            target,
            warnings,
        )
    }

    /// Adopt the domain's current libvirt checkpoints as its committed chain.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`] when a live process holds the domain;
    /// [`Error::Backend`]; [`Error::Journal`].
    pub fn import(&self, backend: &dyn Backend, domain: &str) -> Result<SyncReport> {
        let recovered = self.recover_domain_first(backend, domain)?;
        let current = backend
            .list(domain)
            .map_err(backend_err(domain, "list", None))?;
        let id = Uuid::new_v4();
        let _claim = Claim::take(id);
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
            warnings: Vec::new(),
            recovered,
        })
    }

    /// Finish (or, with [`Policy::Rollback`], undo) every open transaction
    /// whose owner is dead, optionally of one domain only. Transactions of
    /// live owners are left alone.
    ///
    /// # Errors
    ///
    /// The first transaction that could not be finished stops the
    /// recovery with its error; it stays open.
    ///
    /// Domains are recovered in parallel by at most
    /// [`StoreOptions::workers`] threads; each domain's calls stay
    /// sequential.
    pub fn recover(
        &self,
        backend: &dyn Backend,
        policy: Policy,
        domain: Option<&str>,
    ) -> Result<Vec<Recovered>> {
        let open = self.journal.incomplete(domain)?;
        let results = parallel_map(open, self.opts.workers, |t| {
            self.recover_one(backend, &t, policy)
        });
        let mut out = Vec::new();
        for r in results {
            if let Some(r) = r? {
                out.push(r);
            }
        }
        Ok(out)
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

    /// Recover one open transaction if it is orphaned; `None` when another
    /// live process or thread holds it.
    fn recover_one(
        &self,
        backend: &dyn Backend,
        t: &TxnRecord,
        policy: Policy,
    ) -> Result<Option<Recovered>> {
        let Some(_claim) = Claim::take(t.id) else {
            return Ok(None);
        };
        if !self.orphaned(t) || !self.journal.take_over(t.id, &t.owner, &self.owner)? {
            return Ok(None);
        }
        self.point("recover.taken_over");
        let span = info_span!("recover", txn = %t.id, domain = %t.domain);
        let _e = span.enter();
        info!(state = t.state.as_str(), ?policy, previous_owner = %t.owner, "recovering");
        let mut txn = Txn {
            id: t.id,
            domain: &t.domain,
            calls: 0,
        };
        let outcome = match (t.state, policy) {
            (TxnState::Applying, Policy::Resume) => {
                match self.run_phase(backend, &mut txn, StepPhase::Apply, &t.target, None) {
                    Ok(()) => {
                        self.journal
                            .finish(t.id, TxnEvent::Commit, self.opts.history)?;
                        self.point("txn.finished");
                        Outcome::Committed
                    }
                    // libvirt refuses the target: the transaction ends
                    // rolled back, which is a recovery too.
                    Err(PhaseError::Refused(checkpoint, source)) => {
                        match self.roll_back(backend, &mut txn, &t.before, checkpoint, source) {
                            e @ Error::Refused {
                                rolled_back: true, ..
                            } => {
                                warn!(error = %e, "resume refused by libvirt; rolled back");
                                Outcome::RolledBack
                            }
                            e => return Err(e),
                        }
                    }
                    Err(PhaseError::Other(e)) => return Err(e),
                }
            }
            _ => {
                if t.state == TxnState::Applying {
                    self.journal.transition(
                        t.id,
                        TxnEvent::BeginRollback,
                        Some("rollback requested by recover"),
                    )?;
                    self.point("txn.rollback_begun");
                }
                match self.run_phase(backend, &mut txn, StepPhase::Rollback, &t.before, None) {
                    Ok(()) => {
                        self.journal
                            .finish(t.id, TxnEvent::FinishRollback, self.opts.history)?;
                        self.point("txn.finished");
                        Outcome::RolledBack
                    }
                    Err(PhaseError::Refused(checkpoint, source)) => {
                        return Err(Error::Refused {
                            domain: t.domain.clone(),
                            txn: t.id,
                            checkpoint,
                            source,
                            rolled_back: false,
                        })
                    }
                    Err(PhaseError::Other(e)) => return Err(e),
                }
            }
        };
        info!(?outcome, calls = txn.calls, "recovered");
        Ok(Some(Recovered {
            txn: t.id,
            domain: t.domain.clone(),
            outcome,
            libvirt_calls: txn.calls,
        }))
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
            .map(|s| Incomplete {
                owner_alive: self.alive(&s.owner),
                summary: s,
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
    pub fn history(&self, domain: &str, limit: usize) -> Result<Vec<TxnSummary>> {
        Ok(self.journal.history(domain, limit)?)
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

    fn busy_if_open(&self, domain: &str, b: Begin) -> Result<()> {
        match b {
            Begin::Started => Ok(()),
            Begin::Open(t) => Err(Error::Busy {
                domain: domain.to_string(),
                txn: t.id,
                owner: t.owner,
            }),
        }
    }

    /// Recover an orphaned open transaction on `domain`, or fail with
    /// `Busy` when a live process holds it.
    fn recover_domain_first(&self, backend: &dyn Backend, domain: &str) -> Result<Vec<Recovered>> {
        let mut out = Vec::new();
        for t in self.journal.incomplete(Some(domain))? {
            match self.recover_one(backend, &t, Policy::Resume) {
                Ok(Some(r)) => out.push(r),
                Ok(None) => {
                    return Err(Error::Busy {
                        domain: domain.to_string(),
                        txn: t.id,
                        owner: t.owner,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// The transaction: plan against libvirt, commit the intent, apply,
    /// verify, commit — or roll back when libvirt refuses a step.
    fn apply(
        &self,
        backend: &dyn Backend,
        domain: &str,
        kind: TxnKind,
        chain: Option<&Chain>,
        target: Vec<CheckpointDef>,
        mut warnings: Vec<String>,
    ) -> Result<SyncReport> {
        let recovered = self.recover_domain_first(backend, domain)?;
        for r in &recovered {
            warnings.push(format!(
                "recovered interrupted transaction {} first ({:?})",
                r.txn, r.outcome
            ));
        }
        let current = backend
            .list(domain)
            .map_err(backend_err(domain, "list", None))?;
        let plan = plan(&current, &target);
        warnings.extend(plan.warnings.iter().cloned());
        let id = Uuid::new_v4();
        let span = info_span!("txn", txn = %id, domain);
        let _e = span.enter();
        // Claimed before it exists, so no other thread can mistake it for
        // an orphan.
        let _claim = Claim::take(id);
        let steps = journal_steps(&plan);
        let new = NewTxn {
            id,
            domain,
            kind,
            chain,
            target: &target,
            before: &current,
            owner: &self.owner,
            steps: &steps,
        };
        let mut report = SyncReport {
            txn: id,
            domain: domain.to_string(),
            outcome: Outcome::Unchanged,
            redefined: plan.redefined(),
            deleted: plan.deleted(),
            unchanged: plan.unchanged.clone(),
            libvirt_calls: 0,
            warnings,
            recovered,
        };
        if plan.is_empty() {
            self.busy_if_open(
                domain,
                self.journal.record_unchanged(new, self.opts.history)?,
            )?;
            info!("libvirt already matches: nothing to do");
            return Ok(report);
        }
        self.busy_if_open(domain, self.journal.begin(new)?)?;
        // The steps' XML is in the journal now; the plan drives the calls.
        let planned = steps.len();
        drop(steps);
        self.point("txn.intent_committed");
        info!(steps = planned, "intent committed");
        let mut txn = Txn {
            id,
            domain,
            calls: 0,
        };
        match self.run_phase(backend, &mut txn, StepPhase::Apply, &target, Some(plan)) {
            Ok(()) => {
                self.journal
                    .finish(id, TxnEvent::Commit, self.opts.history)?;
                self.point("txn.finished");
                report.outcome = Outcome::Committed;
                report.libvirt_calls = txn.calls;
                info!(calls = txn.calls, "committed");
                Ok(report)
            }
            Err(PhaseError::Refused(checkpoint, source)) => {
                Err(self.roll_back(backend, &mut txn, &current, checkpoint, source))
            }
            Err(PhaseError::Other(e)) => Err(e),
        }
    }

    /// libvirt refused a step of the apply phase: restore the before-image
    /// and return the error describing the refusal.
    fn roll_back(
        &self,
        backend: &dyn Backend,
        txn: &mut Txn<'_>,
        before: &[CheckpointDef],
        checkpoint: String,
        source: BackendError,
    ) -> Error {
        warn!(%checkpoint, error = %source, "libvirt refused a step; rolling back");
        let msg = format!("libvirt refused checkpoint {checkpoint}: {source}");
        if let Err(e) = self
            .journal
            .transition(txn.id, TxnEvent::BeginRollback, Some(&msg))
        {
            return e.into();
        }
        self.point("txn.rollback_begun");
        let rolled_back = match self.run_phase(backend, txn, StepPhase::Rollback, before, None) {
            Ok(()) => match self
                .journal
                .finish(txn.id, TxnEvent::FinishRollback, self.opts.history)
            {
                Ok(_) => {
                    self.point("txn.finished");
                    true
                }
                Err(e) => return e.into(),
            },
            Err(PhaseError::Refused(..)) => false,
            Err(PhaseError::Other(e)) => return e,
        };
        Error::Refused {
            domain: txn.domain.to_string(),
            txn: txn.id,
            checkpoint,
            source,
            rolled_back,
        }
    }

    /// Drive libvirt to `goal`: execute the plan (or plan from libvirt's
    /// state), then list and compare by content; repeat while libvirt
    /// differs. A lost connection is waited for and reconciled by content.
    fn run_phase(
        &self,
        backend: &dyn Backend,
        txn: &mut Txn<'_>,
        phase: StepPhase,
        goal: &[CheckpointDef],
        first: Option<Plan>,
    ) -> std::result::Result<(), PhaseError> {
        let mut plan_given = first;
        let mut lost = 0u32;
        let mut rounds = 0u32;
        loop {
            match self.round(backend, txn, phase, goal, plan_given.take()) {
                Ok(true) => {
                    self.point("phase.verified");
                    return Ok(());
                }
                Ok(false) => {
                    rounds += 1;
                    if rounds > 5 {
                        return Err(PhaseError::Other(Error::Diverged {
                            domain: txn.domain.to_string(),
                            txn: txn.id,
                        }));
                    }
                }
                Err(PhaseError::Other(Error::Backend { source, op, .. }))
                    if matches!(
                        source.kind,
                        BackendErrorKind::ConnectionLost | BackendErrorKind::Unreachable
                    ) =>
                {
                    lost += 1;
                    warn!(%source, attempt = lost, "connection to libvirt lost; the step's outcome is unknown");
                    if lost > self.opts.reconnect_attempts {
                        return Err(PhaseError::Other(Error::Backend {
                            domain: txn.domain.to_string(),
                            op,
                            txn: Some(txn.id),
                            source,
                        }));
                    }
                    std::thread::sleep(self.opts.reconnect_delay);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One round: execute `given` or a fresh plan, then verify. `Ok(true)`
    /// when libvirt equals the goal.
    fn round(
        &self,
        backend: &dyn Backend,
        txn: &mut Txn<'_>,
        phase: StepPhase,
        goal: &[CheckpointDef],
        given: Option<Plan>,
    ) -> std::result::Result<bool, PhaseError> {
        let domain = txn.domain;
        let lost = |op| backend_err(domain, op, Some(txn.id));
        let (plan, seqs) = match given {
            Some(p) => {
                let n = p.steps.len() as u32;
                (p, (0..n).collect::<Vec<u32>>())
            }
            None => {
                let current = backend
                    .list(domain)
                    .map_err(|e| PhaseError::Other(lost("list")(e)))?;
                let journaled = self.journal.steps(txn.id, phase)?;
                let at = self.replayed(txn.id, phase, &journaled, &current)?;
                let plan = plan_from(&current, goal, &at.current);
                let seqs = self.match_steps(txn.id, phase, &plan, &journaled, at.made)?;
                (plan, seqs)
            }
        };
        let total = plan.steps.len() as u64;
        let mut done = 0;
        self.report_progress(txn, phase, done, total);
        for (step, seq) in plan.steps.iter().zip(seqs) {
            self.point("step.before_call");
            let started = Instant::now();
            let result = match step {
                Step::Delete { before } => backend.delete(domain, &before.name),
                Step::Redefine { def, .. } => {
                    backend.redefine(domain, &render_checkpoint(def), false)
                }
            };
            let ms = started.elapsed().as_secs_f64() * 1e3;
            txn.calls += 1;
            self.point("step.after_call");
            match result {
                Ok(()) => {
                    debug!(
                        op = op_name(step),
                        checkpoint = step.checkpoint(),
                        ms,
                        "libvirt call"
                    );
                    self.journal.step_done(txn.id, phase, seq)?;
                    self.point("step.recorded");
                    done += 1;
                    self.report_progress(txn, phase, done, total);
                }
                // Deleting what is already gone reaches the step's goal.
                Err(e)
                    if matches!(step, Step::Delete { .. })
                        && e.kind == BackendErrorKind::NoCheckpoint =>
                {
                    debug!(
                        op = "delete",
                        checkpoint = step.checkpoint(),
                        ms,
                        "already gone"
                    );
                    self.journal.step_done(txn.id, phase, seq)?;
                    self.point("step.recorded");
                    done += 1;
                    self.report_progress(txn, phase, done, total);
                }
                Err(e) => {
                    warn!(op = op_name(step), checkpoint = step.checkpoint(), ms, error = %e, "libvirt call failed");
                    // Best effort: the count is informative only.
                    let _ = self.journal.count_call(txn.id);
                    if e.is_outcome_unknown() || e.kind == BackendErrorKind::Unreachable {
                        return Err(PhaseError::Other(lost(op_name(step))(e)));
                    }
                    if e.kind == BackendErrorKind::NoDomain {
                        return Err(PhaseError::Other(lost(op_name(step))(e)));
                    }
                    return Err(PhaseError::Refused(step.checkpoint().to_string(), e));
                }
            }
        }
        // The plan holds a copy of every definition: let it go before
        // libvirt's listing makes another.
        drop(plan);
        let after = backend
            .list(domain)
            .map_err(|e| PhaseError::Other(lost("list")(e)))?;
        Ok(same_content(&after, goal))
    }

    /// Give each step of a fresh plan a journal row, so that the phase's
    /// rows stay its calls in the order they are made (what
    /// `plan::replay_journal` needs): the pending steps libvirt shows were
    /// made (`made`, the call in flight when the journal stopped) are marked
    /// done; pending rows are reused in order while the plan repeats them;
    /// the rest of the plan is appended and the pending rows it no longer
    /// makes are dropped.
    fn match_steps(
        &self,
        txn: Uuid,
        phase: StepPhase,
        plan: &Plan,
        journaled: &[crate::journal::StepRecord],
        made: Option<usize>,
    ) -> std::result::Result<Vec<u32>, PhaseError> {
        let new_steps = journal_steps(plan);
        let done = journaled.iter().take_while(|r| r.done).count();
        let made = made.unwrap_or(done).clamp(done, journaled.len());
        let observed: Vec<u32> = journaled[done..made].iter().map(|r| r.seq).collect();
        self.journal.mark_observed(txn, phase, &observed)?;
        let mut pending = journaled[made..].iter().filter(|r| !r.done).peekable();
        let mut seqs = Vec::with_capacity(new_steps.len());
        let mut to_add = Vec::new();
        for s in &new_steps {
            let same = |r: &&crate::journal::StepRecord| {
                (r.step.op, r.step.checkpoint.as_str(), r.step.xml.as_deref())
                    == (s.op, s.checkpoint.as_str(), s.xml.as_deref())
            };
            match pending.peek() {
                Some(r) if to_add.is_empty() && same(r) => {
                    seqs.push(Some(r.seq));
                    pending.next();
                }
                _ => {
                    seqs.push(None);
                    to_add.push(s.clone());
                }
            }
        }
        let stale: Vec<u32> = pending.map(|r| r.seq).collect();
        self.journal.drop_steps(txn, phase, &stale)?;
        let mut added = self.journal.add_steps(txn, phase, &to_add)?.into_iter();
        Ok(seqs
            .into_iter()
            .map(|s| s.or_else(|| added.next()).unwrap_or(u32::MAX))
            .collect())
    }

    /// Where a transaction is before a round that plans afresh: its
    /// journaled steps replayed from its before-image
    /// (`plan::replay_journal`).
    fn replayed(
        &self,
        txn: Uuid,
        phase: StepPhase,
        journaled: &[crate::journal::StepRecord],
        listing: &[CheckpointDef],
    ) -> std::result::Result<Replayed, PhaseError> {
        let before = self.journal.txn(txn)?.before;
        let apply = match phase {
            StepPhase::Apply => replayable(journaled),
            StepPhase::Rollback => replayable(&self.journal.steps(txn, StepPhase::Apply)?),
        };
        let rollback = match phase {
            StepPhase::Apply => Some(Vec::new()),
            StepPhase::Rollback => replayable(journaled),
        };
        let (Some(apply), Some(rollback)) = (apply, rollback) else {
            return Ok(Replayed {
                current: Current::assumed(listing),
                made: None,
            });
        };
        let mut phases: Vec<&[(Step, bool)]> = vec![&apply];
        if phase == StepPhase::Rollback {
            phases.push(&rollback);
        }
        Ok(replay_journal(
            &before,
            &Current::assumed(&before),
            &phases,
            listing,
        ))
    }
}

/// Apply `f` to every item with at most `workers` threads; results in the
/// items' order.
fn parallel_map<T: Send, R: Send>(
    items: Vec<T>,
    workers: usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<R> {
    let n = items.len();
    let workers = workers.clamp(1, n.max(1));
    if workers == 1 {
        return items.into_iter().map(f).collect();
    }
    let queue = Mutex::new(items.into_iter().enumerate());
    let results = Mutex::new((0..n).map(|_| None).collect::<Vec<Option<R>>>());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some((i, item)) = next else { break };
                let r = f(item);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = Some(r);
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .flatten()
        .collect()
}

fn op_name(step: &Step) -> &'static str {
    match step {
        Step::Delete { .. } => "delete",
        Step::Redefine { .. } => "redefine",
    }
}

fn backend_err<'a>(
    domain: &'a str,
    op: &'static str,
    txn: Option<Uuid>,
) -> impl Fn(BackendError) -> Error + 'a {
    move |source| Error::Backend {
        domain: domain.to_string(),
        op,
        txn,
        source,
    }
}

fn journal_steps(plan: &Plan) -> Vec<NewStep> {
    plan.steps
        .iter()
        .map(|s| match s {
            Step::Delete { before } => NewStep {
                op: StepOp::Delete,
                checkpoint: before.name.clone(),
                xml: None,
                before: Some(before.clone()),
            },
            Step::Redefine { def, before, .. } => NewStep {
                op: StepOp::Redefine,
                checkpoint: def.name.clone(),
                xml: Some(render_checkpoint(def)),
                before: before.clone(),
            },
        })
        .collect()
}

/// A phase's journaled steps as the planner replays them, with their
/// recorded-done flags; `None` when a row cannot be read back.
fn replayable(rows: &[crate::journal::StepRecord]) -> Option<Vec<(Step, bool)>> {
    rows.iter()
        .map(|r| {
            let step = match r.step.op {
                StepOp::Delete => Step::Delete {
                    before: r.step.before.clone()?,
                },
                StepOp::Redefine => {
                    let def = parse_checkpoint(r.step.xml.as_deref()?).ok()?;
                    Step::Redefine {
                        forced: r.step.before.as_ref() == Some(&def),
                        before: r.step.before.clone(),
                        def,
                    }
                }
            };
            Some((step, r.done))
        })
        .collect()
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

    use chrono::DateTime;

    use super::*;
    use crate::backend::fake::FakeBackend;
    use crate::chain::Checkpoint;

    #[test]
    fn progress_counts_every_call_of_a_round() {
        let disk = Uuid::from_u128(1);
        let chain = Chain {
            vm_id: Uuid::from_u128(2),
            domain: Some("vm".into()),
            disks: BTreeMap::from([(disk, "sda".to_string())]),
            checkpoints: (0..3u128)
                .map(|i| Checkpoint {
                    id: Uuid::from_u128(100 + i),
                    parent: i.checked_sub(1).map(|p| Uuid::from_u128(100 + p)),
                    created: DateTime::from_timestamp(1_600_000_000 + i as i64, 0).unwrap(),
                    description: None,
                    disks: vec![disk],
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
