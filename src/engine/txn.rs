//! The transaction driver: plan against libvirt, commit the intent, apply,
//! verify, commit — or roll back to the before-image — and the recovery of
//! a transaction whose owner died, which runs the same phases. `apply`,
//! `roll_back` and the recovery live together: each calls the others.

use std::borrow::Cow;
use std::time::Instant;

use tracing::{debug, info, info_span, warn};
use uuid::Uuid;

use super::arrivals::{applied_chain, without_arrivals, Known};
use super::report::{Outcome, Policy, Recovered, SyncReport};
use super::steps::{into_journal_steps, journal_steps, replayable, Next, RoundSteps};
use super::{reapply, Store};
use crate::backend::{Backend, BackendError, BackendErrorKind};
use crate::bitmaps::{Bad, BitmapPolicy, Checked};
use crate::chain::{Chain, CheckpointDef};
use crate::error::{Error, Result};
use crate::journal::{NewTxn, StepPhase, StepRecord, TxnEvent, TxnKind, TxnRecord, TxnState};
use crate::plan::{plan, plan_from, replay_journal, same_content, Current, Plan, Replayed, Step};
use crate::xml::{parse_checkpoint, render_checkpoint};

/// Why a phase stopped.
pub(super) enum PhaseError {
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
pub(super) struct Txn<'a> {
    pub(super) id: Uuid,
    pub(super) domain: &'a str,
    pub(super) calls: u64,
    /// libvirt's crash leftovers repaired at the end of a phase.
    pub(super) warnings: Vec<String>,
    /// Apply-phase redefines ask libvirt to check the bitmaps
    /// (`REDEFINE_VALIDATE`).
    pub(super) validate: bool,
    /// The checkpoints of its before-image and target: any other that
    /// libvirt lists appeared after it began (`arrivals.rs`).
    pub(super) known: Known,
    /// Those that appeared, kept as foreign.
    pub(super) arrived: Vec<String>,
    /// What the last verified round found applied, when newcomers made it
    /// differ from the goal: what a commit records.
    pub(super) applied: Option<Vec<CheckpointDef>>,
}

impl Txn<'_> {
    /// What a recovery of `t` that ended with `outcome` reports.
    pub(super) fn recovered(self, t: &TxnRecord, outcome: Outcome) -> Recovered {
        Recovered {
            txn: t.id,
            domain: t.domain.clone(),
            outcome,
            libvirt_calls: self.calls,
            foreign: self.arrived,
            warnings: self.warnings,
        }
    }
}

impl Store {
    /// Recover an orphaned open transaction on `domain`, or fail with
    /// `Busy` when a live process holds it. The caller holds the domain's
    /// lock.
    pub(super) fn recover_domain_first(
        &self,
        backend: &dyn Backend,
        domain: &str,
    ) -> Result<Vec<Recovered>> {
        let mut out = Vec::new();
        for t in self.journal.incomplete(Some(domain))? {
            match self.recover_locked(backend, &t, Policy::Resume)? {
                Some(r) => out.push(r),
                None => {
                    return Err(Error::Busy {
                        domain: domain.to_string(),
                        txn: Some(t.id),
                        owner: Some(t.owner),
                    })
                }
            }
        }
        Ok(out)
    }

    /// Recover one open transaction if it is orphaned; `None` when another
    /// live writer holds its domain, or it finished meanwhile.
    pub(super) fn recover_one(
        &self,
        backend: &dyn Backend,
        t: &TxnRecord,
        policy: Policy,
    ) -> Result<Option<Recovered>> {
        let _lock = match self.lock_domain(&t.domain) {
            Ok(lock) => lock,
            Err(e) if e.is_busy() => return Ok(None),
            Err(e) => return Err(e),
        };
        // Read it again under the lock: it may have finished, or moved on,
        // since it was listed.
        let t = self.journal.txn(t.id)?;
        if !t.state.is_open() {
            return Ok(None);
        }
        self.recover_locked(backend, &t, policy)
    }

    /// [`Store::recover_one`] for a caller that holds the domain's lock.
    pub(super) fn recover_locked(
        &self,
        backend: &dyn Backend,
        t: &TxnRecord,
        policy: Policy,
    ) -> Result<Option<Recovered>> {
        if !self.orphaned(t) || !self.journal.take_over(t.id, &t.owner, &self.owner)? {
            return Ok(None);
        }
        self.point("recover.taken_over");
        if matches!(t.kind, TxnKind::Prune | TxnKind::Reclaim) {
            return self.recover_lifecycle(backend, t, policy).map(Some);
        }
        let span = info_span!("recover", txn = %t.id, domain = %t.domain);
        let _e = span.enter();
        info!(state = t.state.as_str(), ?policy, previous_owner = %t.owner, "recovering");
        let mut txn = Txn {
            id: t.id,
            domain: &t.domain,
            calls: 0,
            warnings: Vec::new(),
            // A resumed redefine asks libvirt to check bitmaps as the apply did.
            validate: self.opts.bitmaps != BitmapPolicy::Ignore
                && backend.checks_bitmaps().unwrap_or(false)
                && backend.domain_info(&t.domain).is_ok_and(|i| i.running),
            known: Known::of(&t.before, &t.target),
            arrived: Vec::new(),
            applied: None,
        };
        let outcome = match (t.state, policy) {
            (TxnState::Applying, Policy::Resume) => {
                match self.run_phase(backend, &mut txn, StepPhase::Apply, &t.target, None) {
                    Ok(()) => {
                        self.commit(&txn, t.chain.as_ref())?;
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
            _ => self.recover_by_rollback(backend, &mut txn, t)?,
        };
        info!(?outcome, calls = txn.calls, "recovered");
        Ok(Some(txn.recovered(t, outcome)))
    }

    /// The rollback `recover` was asked for: the transaction's before-image
    /// restored and the transaction ended rolled back (journaled as
    /// rolling back first, if it was not yet).
    pub(super) fn recover_by_rollback(
        &self,
        backend: &dyn Backend,
        txn: &mut Txn<'_>,
        t: &TxnRecord,
    ) -> Result<Outcome> {
        if t.state == TxnState::Applying {
            self.journal.transition(
                t.id,
                TxnEvent::BeginRollback,
                Some("rollback requested by recover"),
            )?;
            self.point("txn.rollback_begun");
        }
        match self.run_phase(backend, txn, StepPhase::Rollback, &t.before, None) {
            Ok(()) => {
                self.journal
                    .finish(t.id, TxnEvent::FinishRollback, self.opts.history)?;
                self.point("txn.finished");
                Ok(Outcome::RolledBack)
            }
            Err(PhaseError::Refused(checkpoint, source)) => Err(Error::Refused {
                domain: t.domain.clone(),
                txn: t.id,
                checkpoint,
                source,
                rolled_back: false,
                report: None,
            }),
            Err(PhaseError::Other(e)) => Err(e),
        }
    }

    /// [`Store::apply`], and under `degrade` on a running domain, once
    /// more each time libvirt's `REDEFINE_VALIDATE` refuses a checkpoint
    /// for a disk's bitmap: the refused transaction is rolled back whole
    /// (libvirt is at its before-image), and the next one leaves that disk
    /// out. Each refusal adds one (checkpoint, disk), so it ends.
    /// `target` makes the goal's definitions for each attempt: a long
    /// chain's are megabytes, and are never held twice.
    pub(super) fn apply_degrading(
        &self,
        backend: &dyn Backend,
        domain: &str,
        kind: TxnKind,
        chain: Option<&Chain>,
        target: &dyn Fn() -> Vec<CheckpointDef>,
        warnings: Vec<String>,
    ) -> Result<SyncReport> {
        let mut refused = Bad::new();
        let mut notes = Vec::new();
        loop {
            let result = self.apply(
                backend,
                domain,
                kind,
                chain,
                target(),
                warnings.clone(),
                &refused,
            );
            let again = match &result {
                Err(Error::Refused {
                    rolled_back: true,
                    checkpoint,
                    source,
                    txn,
                    ..
                }) if self.opts.bitmaps == BitmapPolicy::Degrade
                    && source.kind == BackendErrorKind::Inconsistent =>
                {
                    refused_disk(&source.message)
                        .filter(|d| {
                            !refused
                                .get(checkpoint)
                                .is_some_and(|v| v.iter().any(|(t, _)| t == d))
                        })
                        .map(|d| (checkpoint.clone(), d, source.message.clone(), *txn))
                }
                _ => None,
            };
            let Some((checkpoint, disk, message, txn)) = again else {
                let mut result = result;
                if let Ok(r) = &mut result {
                    r.warnings.extend(notes);
                }
                return result;
            };
            notes.push(format!(
                "libvirt refused checkpoint {checkpoint} for disk {disk} (transaction {txn}, rolled back); applied again without that disk"
            ));
            refused
                .entry(checkpoint)
                .or_default()
                .push((disk, format!("libvirt's REDEFINE_VALIDATE: {message}")));
        }
    }

    /// The transaction: plan against libvirt, commit the intent, apply,
    /// verify, commit — or roll back when libvirt refuses a step.
    #[allow(clippy::too_many_arguments)] // the operation's goal, and what libvirt refused before
    fn apply(
        &self,
        backend: &dyn Backend,
        domain: &str,
        kind: TxnKind,
        chain: Option<&Chain>,
        target: Vec<CheckpointDef>,
        mut warnings: Vec<String>,
        refused: &Bad,
    ) -> Result<SyncReport> {
        // Held from before libvirt is first read until the transaction
        // ends: no other writer can change libvirt or the journal between
        // our listing and our intent.
        let _lock = self.lock_domain(domain)?;
        let recovered = self.recover_domain_first(backend, domain)?;
        for r in &recovered {
            warnings.push(format!(
                "recovered interrupted transaction {} first ({:?})",
                r.txn, r.outcome
            ));
        }
        warnings.extend(crate::leftovers::repair(backend, domain));
        let current = backend
            .list(domain)
            .map_err(backend_err(domain, "list", None))?;
        let goal = if kind == TxnKind::Ensure {
            super::ensure::goal(target, &current)
        } else {
            let resync = kind == TxnKind::Resync;
            reapply::goal(resync, target, chain, &current, self.opts.prune_foreign)
        };
        warnings.extend(goal.warnings);
        let chain = goal.chain.as_deref();
        let checked =
            self.check_bitmaps(backend, domain, &current, goal.target, &goal.keep, refused)?;
        warnings.extend(dropped_warnings(&checked));
        let target = checked.target;
        let plan = plan(&current, &target);
        warnings.extend(plan.warnings.iter().cloned());
        let id = Uuid::new_v4();
        let span = info_span!("txn", txn = %id, domain);
        let _e = span.enter();
        let mut report = SyncReport {
            txn: id,
            domain: domain.to_string(),
            outcome: Outcome::Unchanged,
            redefined: plan.redefined(),
            deleted: plan.deleted(),
            unchanged: plan.unchanged,
            libvirt_calls: 0,
            warnings,
            recovered,
            refused: None,
            degraded: checked.degraded,
            unverified: checked.unverified,
            adopted: goal.adopted,
            foreign: goal.foreign,
        };
        // Each definition once at the intent's commit: as its step's XML.
        let steps = into_journal_steps(plan.steps);
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
        if steps.is_empty() {
            self.busy_if_open(
                domain,
                self.journal.record_unchanged(new, self.opts.history)?,
            )?;
            info!("libvirt already matches: nothing to do");
            return Ok(report);
        }
        self.busy_if_open(domain, self.journal.begin(new)?)?;
        self.point("txn.intent_committed");
        info!(steps = steps.len(), "intent committed");
        // The journaled steps drive the calls, read back a batch at a time
        // (a row that cannot be read back: the phase plans from libvirt and
        // the journal instead).
        let first = u32::try_from(steps.len()).ok();
        drop(steps);
        let mut txn = Txn {
            id,
            domain,
            calls: 0,
            warnings: Vec::new(),
            validate: checked.validate,
            known: Known::of(&current, &target),
            arrived: Vec::new(),
            applied: None,
        };
        let applied = self.run_phase(backend, &mut txn, StepPhase::Apply, &target, first);
        report.warnings.append(&mut txn.warnings);
        report.foreign.append(&mut txn.arrived);
        match applied {
            Ok(()) => {
                self.commit(&txn, chain)?;
                self.point("txn.finished");
                report.outcome = Outcome::Committed;
                report.libvirt_calls = txn.calls;
                info!(calls = txn.calls, "committed");
                Ok(report)
            }
            Err(PhaseError::Refused(checkpoint, source)) => {
                let mut e = self.roll_back(backend, &mut txn, &current, checkpoint.clone(), source);
                if let Error::Refused {
                    rolled_back: true,
                    report: slot,
                    ..
                } = &mut e
                {
                    // Nothing the transaction did remains.
                    report.outcome = Outcome::RolledBack;
                    report.redefined.clear();
                    report.deleted.clear();
                    report.libvirt_calls = txn.calls;
                    report.refused = Some(checkpoint);
                    *slot = Some(Box::new(report));
                }
                Err(e)
            }
            Err(PhaseError::Other(e)) => Err(e),
        }
    }

    /// Commit a transaction whose apply phase verified. When newcomers made
    /// what it applied differ from its target, that is recorded, with the
    /// chain that describes it (`chain`: the transaction's own, if any).
    fn commit(&self, txn: &Txn<'_>, chain: Option<&Chain>) -> Result<()> {
        let applied = txn.applied.as_deref();
        let described = applied.and_then(|a| applied_chain(chain, a));
        self.journal.finish_applied(
            txn.id,
            TxnEvent::Commit,
            self.opts.history,
            applied,
            described.as_ref(),
        )?;
        Ok(())
    }

    /// libvirt refused a step of the apply phase: restore the before-image
    /// and return the error describing the refusal.
    pub(super) fn roll_back(
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
            report: None,
        }
    }

    /// Drive libvirt to `goal`: execute the plan (or plan from libvirt's
    /// state), then list and compare by content; repeat while libvirt
    /// differs. A lost connection is waited for and reconciled by content.
    pub(super) fn run_phase(
        &self,
        backend: &dyn Backend,
        txn: &mut Txn<'_>,
        phase: StepPhase,
        goal: &[CheckpointDef],
        first: Option<u32>,
    ) -> std::result::Result<(), PhaseError> {
        let mut plan_given = first;
        let mut lost = 0u32;
        let mut rounds = 0u32;
        loop {
            match self.round(backend, txn, phase, goal, plan_given.take()) {
                Ok(true) => {
                    let repaired = crate::leftovers::repair(backend, txn.domain);
                    txn.warnings.extend(repaired);
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
        given: Option<u32>,
    ) -> std::result::Result<bool, PhaseError> {
        let domain = txn.domain;
        let id = txn.id;
        let lost = |op| backend_err(domain, op, Some(id));
        let (mut steps, total) = match given {
            Some(n) => (RoundSteps::journaled(n), u64::from(n)),
            None => {
                let current = backend
                    .list(domain)
                    .map_err(|e| PhaseError::Other(lost("list")(e)))?;
                let goal = txn.goal_now(goal, &current);
                let journaled = self.journal.steps(txn.id, phase)?;
                // The journal replays to libvirt without the newcomers; a
                // backup's new checkpoint became libvirt's current one.
                let (ours, newest) = without_arrivals(&current, &txn.known);
                let mut at = self.replayed(txn.id, phase, &journaled, ours.as_ref())?;
                if let Some(n) = newest {
                    let then = at.current.candidates().iter().cloned();
                    at.current = Current::one_of(std::iter::once(Some(n)).chain(then));
                }
                let plan = plan_from(&current, &goal, &at.current);
                let seqs = self.match_steps(txn.id, phase, &plan, &journaled, at.made)?;
                let total = plan.steps.len() as u64;
                (RoundSteps::planned(plan, seqs), total)
            }
        };
        let mut done = 0;
        self.report_progress(txn, phase, done, total)
            .map_err(PhaseError::Other)?;
        loop {
            let (step, seq) = match steps.next(&self.journal, txn.id, phase)? {
                Next::Step(step, seq) => (step, seq),
                Next::End => break,
                // Plan afresh from libvirt in the next round.
                Next::Unreadable => return Ok(false),
            };
            let step = &step;
            self.point("step.before_call");
            if !self.journal.still_owns(txn.id, &self.owner)? {
                return Err(PhaseError::Other(Error::TakenOver {
                    domain: domain.to_string(),
                    txn: txn.id,
                }));
            }
            let started = Instant::now();
            let result = match step {
                Step::Delete { before } => backend.delete(domain, &before.name),
                Step::Redefine { def, forced, .. } => {
                    // libvirt checks the bitmaps of what it did not have.
                    let validate = txn.validate && phase == StepPhase::Apply && !forced;
                    let xml = if *forced {
                        own_xml(backend, domain, def)
                    } else {
                        render_checkpoint(def)
                    };
                    backend.redefine(domain, &xml, validate)
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
                    self.report_progress(txn, phase, done, total)
                        .map_err(PhaseError::Other)?;
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
                    self.report_progress(txn, phase, done, total)
                        .map_err(PhaseError::Other)?;
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
        let after = backend
            .list(domain)
            .map_err(|e| PhaseError::Other(lost("list")(e)))?;
        let goal = txn.goal_now(goal, &after);
        let same = same_content(&after, &goal);
        if let (true, Cow::Owned(applied)) = (same, goal) {
            txn.applied = Some(applied);
        }
        Ok(same)
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
        journaled: &[StepRecord],
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
            let same = |r: &&StepRecord| {
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
        journaled: &[StepRecord],
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

/// The disk named in libvirt's `VIR_ERR_CHECKPOINT_INCONSISTENT` message
/// ("… missing or broken bitmap 'NAME' for disk 'vdb'").
pub(super) fn refused_disk(message: &str) -> Option<String> {
    let (_, rest) = message.rsplit_once("for disk '")?;
    let disk = rest.split('\'').next()?;
    (!disk.is_empty()).then(|| disk.to_string())
}

/// The XML of a same-content redefine (one that only moves libvirt's
/// current checkpoint): libvirt's own, `<domain>` included, so that what
/// the checkpoint's creator stored stays; ours when libvirt's cannot be
/// read or no longer has that content.
fn own_xml(backend: &dyn Backend, domain: &str, def: &CheckpointDef) -> String {
    match backend.checkpoint_xml(domain, &def.name) {
        Ok(xml) if parse_checkpoint(&xml).is_ok_and(|d| d == *def) => xml,
        _ => render_checkpoint(def),
    }
}

/// A warning for each checkpoint the bitmap check left out.
pub(super) fn dropped_warnings(checked: &Checked) -> Vec<String> {
    checked
        .dropped
        .iter()
        .map(|(name, parent)| {
            let under = parent
                .as_deref()
                .map_or_else(|| "become roots".to_string(), |p| format!("hang off {p}"));
            format!("checkpoint {name} has no usable bitmap on any disk: not redefined; its children {under}")
        })
        .collect()
}

fn op_name(step: &Step) -> &'static str {
    match step {
        Step::Delete { .. } => "delete",
        Step::Redefine { .. } => "redefine",
    }
}

pub(super) fn backend_err<'a>(
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
