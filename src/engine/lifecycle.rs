//! The lifecycle driver: one journaled transaction of destructive and
//! metadata actions ([`Action`]) — libvirt's real delete, a bitmap removed
//! from an image, a metadata delete, a redefine — run by `prune` and
//! `reclaim`. Same guarantees as a sync: the intent (kind, before-image,
//! target, the actions as steps) is committed before the first action;
//! each action is idempotent (an absent checkpoint or bitmap is done), is
//! marked done, and libvirt is verified by content against the target
//! before the commit; the same crash points are passed.
//!
//! A removal cannot be undone. So a lifecycle transaction rolls back (to
//! its before-image, metadata only) only while none of its removals
//! (`purge`, `remove_bitmap`) can have been made; once one may have been,
//! `recover --rollback` finishes it instead, with a warning.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, info_span, warn};
use uuid::Uuid;

use super::arrivals::Known;
use super::report::{Outcome, Policy, Recovered};
use super::txn::{backend_err, PhaseError, Txn};
use super::Store;
use crate::backend::{Backend, BackendError, BackendErrorKind};
use crate::bitmaps::images::ImageReader;
use crate::bitmaps::remove::{ImageEditError, ImageEditor, QemuImg, Removed};
use crate::chain::{Chain, CheckpointDef};
use crate::error::{Error, Result};
use crate::journal::{
    JournalError, NewStep, NewTxn, StepOp, StepPhase, StepRecord, TxnEvent, TxnKind, TxnRecord,
    TxnState,
};
use crate::plan::same_content;
use crate::xml::{parse_checkpoint, render_checkpoint};

/// One destructive or metadata action of a lifecycle transaction, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// libvirt's real delete (running domain): metadata and bitmaps.
    Purge {
        /// The checkpoint as libvirt lists it.
        checkpoint: CheckpointDef,
    },
    /// `qemu-img bitmap --remove` (shut-off domain) of the bitmap named
    /// `checkpoint` (a checkpoint's bitmap is named after it; an orphan
    /// bitmap by its own name) from the layer `image` of disk `target`.
    RemoveBitmap {
        /// The bitmap's name.
        checkpoint: String,
        /// The disk's target.
        target: String,
        /// The layer that holds the bitmap.
        image: PathBuf,
    },
    /// A metadata-only delete.
    DeleteMetadata {
        /// The checkpoint as libvirt lists it.
        checkpoint: CheckpointDef,
    },
    /// A redefine (a checkpoint degraded to fewer disks, say).
    Redefine {
        /// The new definition.
        def: CheckpointDef,
    },
}

/// The `detail` of a `remove_bitmap` step.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Detail {
    target: String,
    image: PathBuf,
}

impl Action {
    /// Its journal row; `listing` is libvirt's checkpoints (a redefine's
    /// before-image).
    fn step(&self, listing: &[CheckpointDef]) -> NewStep {
        let (op, checkpoint, xml, before, detail) = match self {
            Action::Purge { checkpoint } => (
                StepOp::Purge,
                checkpoint.name.clone(),
                None,
                Some(checkpoint.clone()),
                None,
            ),
            Action::RemoveBitmap {
                checkpoint,
                target,
                image,
            } => (
                StepOp::RemoveBitmap,
                checkpoint.clone(),
                None,
                None,
                serde_json::to_string(&Detail {
                    target: target.clone(),
                    image: image.clone(),
                })
                .ok(),
            ),
            Action::DeleteMetadata { checkpoint } => (
                StepOp::Delete,
                checkpoint.name.clone(),
                None,
                Some(checkpoint.clone()),
                None,
            ),
            Action::Redefine { def } => (
                StepOp::Redefine,
                def.name.clone(),
                Some(render_checkpoint(def)),
                listing.iter().find(|d| d.name == def.name).cloned(),
                None,
            ),
        };
        NewStep {
            op,
            checkpoint,
            xml,
            before,
            detail,
        }
    }

    /// The action a journal row holds; `None` when it cannot be read.
    fn from_step(s: &NewStep) -> Option<Action> {
        Some(match s.op {
            StepOp::Purge => Action::Purge {
                checkpoint: s.before.clone()?,
            },
            StepOp::RemoveBitmap => {
                let d: Detail = serde_json::from_str(s.detail.as_deref()?).ok()?;
                Action::RemoveBitmap {
                    checkpoint: s.checkpoint.clone(),
                    target: d.target,
                    image: d.image,
                }
            }
            StepOp::Delete => Action::DeleteMetadata {
                checkpoint: s.before.clone()?,
            },
            StepOp::Redefine => Action::Redefine {
                def: parse_checkpoint(s.xml.as_deref()?).ok()?,
            },
        })
    }

    /// A removal, which cannot be undone.
    fn removes(&self) -> bool {
        matches!(self, Action::Purge { .. } | Action::RemoveBitmap { .. })
    }

    fn name(&self) -> &str {
        match self {
            Action::Purge { checkpoint } | Action::DeleteMetadata { checkpoint } => {
                &checkpoint.name
            }
            Action::RemoveBitmap { checkpoint, .. } => checkpoint,
            Action::Redefine { def } => &def.name,
        }
    }
}

/// What [`Store::run_lifecycle`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LifecycleRun {
    /// The transaction (recorded even when there was nothing to do).
    pub txn: Uuid,
    /// libvirt calls that change something (purges, deletes, redefines).
    pub libvirt_calls: u64,
    /// Bitmaps removed from image files.
    pub images_changed: u64,
    /// Recoveries made first, libvirt's crash leftovers repaired.
    pub warnings: Vec<String>,
}

/// What one action did.
struct Effect {
    calls: u64,
    images: u64,
}

/// Why an action failed.
enum ActError {
    Backend(&'static str, BackendError),
    Image(ImageEditError),
}

impl Store {
    /// Journal the intent (kind, before = libvirt's listing, target = the
    /// listing expected afterwards, chain = the new committed chain or None, steps = actions),
    /// then apply each action idempotently, mark it done, verify libvirt by content
    /// against `target`, and commit (the target — with `chain` — becomes the committed chain).
    ///
    /// A refused action rolls the transaction back while none of its
    /// removals may have been made; otherwise the transaction stays open
    /// for `recover`.
    ///
    /// # Errors
    ///
    /// [`Error::Busy`]; [`Error::Refused`]; [`Error::Backend`];
    /// [`Error::ImageInUse`], [`Error::ImageEdit`] (left open);
    /// [`Error::Diverged`]; [`Error::Journal`].
    pub(crate) fn run_lifecycle(
        &self,
        backend: &dyn Backend,
        domain: &str,
        kind: TxnKind,
        chain: Option<&Chain>,
        target: Vec<CheckpointDef>,
        actions: Vec<Action>,
    ) -> Result<LifecycleRun> {
        let _lock = self.lock_domain(domain)?;
        let mut warnings: Vec<String> = self
            .recover_domain_first(backend, domain)?
            .iter()
            .map(|r| {
                format!(
                    "recovered interrupted transaction {} first ({:?})",
                    r.txn, r.outcome
                )
            })
            .collect();
        let before = backend
            .list(domain)
            .map_err(backend_err(domain, "list", None))?;
        let id = Uuid::new_v4();
        let span = info_span!("lifecycle", txn = %id, domain, kind = ?kind);
        let _e = span.enter();
        let steps: Vec<NewStep> = actions.iter().map(|a| a.step(&before)).collect();
        let new = NewTxn {
            id,
            domain,
            kind,
            chain,
            target: &target,
            before: &before,
            owner: &self.owner,
            steps: &steps,
        };
        if actions.is_empty() {
            self.busy_if_open(
                domain,
                self.journal.record_unchanged(new, self.opts.history)?,
            )?;
            return Ok(LifecycleRun {
                txn: id,
                libvirt_calls: 0,
                images_changed: 0,
                warnings,
            });
        }
        self.busy_if_open(domain, self.journal.begin(new)?)?;
        self.point("txn.intent_committed");
        info!(steps = steps.len(), "intent committed");
        let mut txn = Txn {
            id,
            domain,
            calls: 0,
            warnings: Vec::new(),
            validate: false,
            known: Known::of(&before, &target),
            arrived: Vec::new(),
            applied: None,
        };
        let mut images = 0;
        let applied = self.apply_actions(backend, &mut txn, &target, &mut images);
        let outcome = self.end_lifecycle(backend, &mut txn, &before, applied)?;
        warnings.append(&mut txn.warnings);
        debug_assert_eq!(outcome, Outcome::Committed);
        Ok(LifecycleRun {
            txn: id,
            libvirt_calls: txn.calls,
            images_changed: images,
            warnings,
        })
    }

    /// Commit an applied lifecycle transaction, or, when an action was
    /// refused, roll it back if none of its removals may have been made.
    fn end_lifecycle(
        &self,
        backend: &dyn Backend,
        txn: &mut Txn<'_>,
        before: &[CheckpointDef],
        applied: std::result::Result<(), PhaseError>,
    ) -> Result<Outcome> {
        match applied {
            Ok(()) => {
                self.journal
                    .finish(txn.id, TxnEvent::Commit, self.opts.history)?;
                self.point("txn.finished");
                info!(calls = txn.calls, "committed");
                Ok(Outcome::Committed)
            }
            Err(PhaseError::Refused(checkpoint, source)) => {
                if self.removals_made(backend, txn)? {
                    return Err(Error::Refused {
                        domain: txn.domain.to_string(),
                        txn: txn.id,
                        checkpoint,
                        source,
                        rolled_back: false,
                        report: None,
                    });
                }
                Err(self.roll_back(backend, txn, before, checkpoint, source))
            }
            Err(PhaseError::Other(e)) => Err(e),
        }
    }

    /// Run the transaction's pending actions in order, then verify libvirt
    /// against `target` by content.
    fn apply_actions(
        &self,
        backend: &dyn Backend,
        txn: &mut Txn<'_>,
        target: &[CheckpointDef],
        images: &mut u64,
    ) -> std::result::Result<(), PhaseError> {
        let domain = txn.domain;
        let rows = self.journal.steps(txn.id, StepPhase::Apply)?;
        let total = rows.len() as u64;
        let mut done = rows.iter().filter(|r| r.done).count() as u64;
        self.report_progress(txn, StepPhase::Apply, done, total)
            .map_err(PhaseError::Other)?;
        for r in rows.iter().filter(|r| !r.done) {
            let action = Action::from_step(&r.step).ok_or_else(|| unreadable(r))?;
            self.point("step.before_call");
            if !self.journal.still_owns(txn.id, &self.owner)? {
                return Err(PhaseError::Other(Error::TakenOver {
                    domain: domain.to_string(),
                    txn: txn.id,
                }));
            }
            let result = self.act_retrying(backend, domain, &action);
            self.point("step.after_call");
            match result {
                Ok(effect) => {
                    txn.calls += effect.calls;
                    *images += effect.images;
                    if effect.calls > 0 {
                        self.journal.step_done(txn.id, StepPhase::Apply, r.seq)?;
                    } else {
                        self.journal
                            .mark_observed(txn.id, StepPhase::Apply, &[r.seq])?;
                    }
                    self.point("step.recorded");
                    done += 1;
                    self.report_progress(txn, StepPhase::Apply, done, total)
                        .map_err(PhaseError::Other)?;
                }
                Err(ActError::Backend(op, e)) => {
                    warn!(op, checkpoint = action.name(), error = %e, "libvirt call failed");
                    let _ = self.journal.count_call(txn.id);
                    txn.calls += 1;
                    if e.is_connection() || e.kind == BackendErrorKind::NoDomain {
                        return Err(PhaseError::Other(backend_err(domain, op, Some(txn.id))(e)));
                    }
                    return Err(PhaseError::Refused(action.name().to_string(), e));
                }
                Err(ActError::Image(e)) => {
                    warn!(checkpoint = action.name(), error = %e, "bitmap removal failed");
                    return Err(PhaseError::Other(image_error(domain, Some(txn.id), e)));
                }
            }
        }
        let after = backend
            .list(domain)
            .map_err(|e| PhaseError::Other(backend_err(domain, "list", Some(txn.id))(e)))?;
        if !same_content(&after, target) {
            return Err(PhaseError::Other(Error::Diverged {
                domain: domain.to_string(),
                txn: txn.id,
            }));
        }
        txn.warnings
            .extend(crate::leftovers::repair(backend, domain));
        self.point("phase.verified");
        Ok(())
    }

    /// [`Store::act`], again after a lost connection (every action is
    /// idempotent), as many times as a phase waits for libvirt.
    fn act_retrying(
        &self,
        backend: &dyn Backend,
        domain: &str,
        action: &Action,
    ) -> std::result::Result<Effect, ActError> {
        let mut lost = 0;
        let mut calls = 0;
        loop {
            match self.act(backend, domain, action) {
                Err(ActError::Backend(_, e))
                    if e.is_connection() && lost < self.opts.reconnect_attempts =>
                {
                    lost += 1;
                    calls += 1;
                    warn!(error = %e, attempt = lost, "connection to libvirt lost; the action is tried again");
                    std::thread::sleep(self.opts.reconnect_delay);
                }
                Ok(mut effect) => {
                    effect.calls += calls;
                    return Ok(effect);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One action, idempotently: a purge or delete of an absent
    /// checkpoint, the removal of an absent bitmap and a redefine of
    /// content libvirt holds are done.
    fn act(
        &self,
        backend: &dyn Backend,
        domain: &str,
        action: &Action,
    ) -> std::result::Result<Effect, ActError> {
        let call = |op, r: std::result::Result<(), BackendError>| match r {
            Ok(()) => Ok(Effect {
                calls: 1,
                images: 0,
            }),
            Err(e) if e.kind == BackendErrorKind::NoCheckpoint => {
                debug!(op, "already gone");
                Ok(Effect {
                    calls: 1,
                    images: 0,
                })
            }
            Err(e) => Err(ActError::Backend(op, e)),
        };
        match action {
            Action::Purge { checkpoint } => call("purge", backend.purge(domain, &checkpoint.name)),
            Action::DeleteMetadata { checkpoint } => {
                call("delete", backend.delete(domain, &checkpoint.name))
            }
            Action::Redefine { def } => {
                let held = backend
                    .list(domain)
                    .map_err(|e| ActError::Backend("list", e))?;
                if held.iter().any(|d| d == def) {
                    return Ok(Effect {
                        calls: 0,
                        images: 0,
                    });
                }
                backend
                    .redefine(domain, &render_checkpoint(def), false)
                    .map_err(|e| ActError::Backend("redefine", e))?;
                Ok(Effect {
                    calls: 1,
                    images: 0,
                })
            }
            Action::RemoveBitmap {
                checkpoint, image, ..
            } => match self.editor().remove_bitmap(image, checkpoint) {
                Ok(Removed::Removed) => Ok(Effect {
                    calls: 0,
                    images: 1,
                }),
                Ok(Removed::AlreadyGone) => Ok(Effect {
                    calls: 0,
                    images: 0,
                }),
                Err(e) => Err(ActError::Image(e)),
            },
        }
    }

    /// May one of the transaction's removals have been made? Those
    /// recorded done were; the first pending one may have been in flight,
    /// and libvirt or the image says whether it was (when they cannot
    /// tell, it is taken as made).
    fn removals_made(&self, backend: &dyn Backend, txn: &Txn<'_>) -> Result<bool> {
        let rows = self.journal.steps(txn.id, StepPhase::Apply)?;
        let actions: Vec<(Option<Action>, bool)> = rows
            .iter()
            .map(|r| (Action::from_step(&r.step), r.done))
            .collect();
        if actions
            .iter()
            .any(|(a, done)| *done && a.as_ref().is_none_or(Action::removes))
        {
            return Ok(true);
        }
        let Some((next, _)) = actions.iter().find(|(_, done)| !done) else {
            return Ok(false);
        };
        Ok(match next {
            None => true,
            Some(Action::Purge { checkpoint }) => match backend.list(txn.domain) {
                Ok(listing) => !listing.iter().any(|d| d.name == checkpoint.name),
                Err(_) => true,
            },
            Some(Action::RemoveBitmap {
                checkpoint, image, ..
            }) => !layer_holds(self.images(), image, checkpoint).unwrap_or(false),
            Some(_) => false,
        })
    }

    /// Recover an open lifecycle transaction (the caller took it over and
    /// holds the domain's lock). Resume runs its pending actions again;
    /// a rollback restores the before-image's metadata while none of its
    /// removals may have been made, and otherwise finishes it (a removal
    /// cannot be undone) with a warning.
    pub(super) fn recover_lifecycle(
        &self,
        backend: &dyn Backend,
        t: &TxnRecord,
        policy: Policy,
    ) -> Result<Recovered> {
        let span = info_span!("recover", txn = %t.id, domain = %t.domain);
        let _e = span.enter();
        info!(state = t.state.as_str(), ?policy, previous_owner = %t.owner, "recovering a lifecycle transaction");
        let mut txn = Txn {
            id: t.id,
            domain: &t.domain,
            calls: 0,
            warnings: Vec::new(),
            validate: false,
            known: Known::of(&t.before, &t.target),
            arrived: Vec::new(),
            applied: None,
        };
        let forward = match (t.state, policy) {
            (TxnState::Applying, Policy::Resume) => true,
            (TxnState::Applying, Policy::Rollback) => {
                let made = self.removals_made(backend, &txn)?;
                if made {
                    let note = format!(
                        "transaction {} removed checkpoints or bitmaps already, which cannot be undone: finished instead of rolled back",
                        t.id
                    );
                    warn!("{note}");
                    txn.warnings.push(note);
                }
                made
            }
            _ => false,
        };
        let outcome = if forward {
            let mut images = 0;
            let applied = self.apply_actions(backend, &mut txn, &t.target, &mut images);
            match self.end_lifecycle(backend, &mut txn, &t.before, applied) {
                Ok(o) => o,
                Err(
                    e @ Error::Refused {
                        rolled_back: true, ..
                    },
                ) => {
                    warn!(error = %e, "resume refused by libvirt; rolled back");
                    Outcome::RolledBack
                }
                Err(e) => return Err(e),
            }
        } else {
            self.recover_by_rollback(backend, &mut txn, t)?
        };
        info!(?outcome, calls = txn.calls, "recovered");
        Ok(txn.recovered(t, outcome))
    }

    /// Where a shut-off domain's bitmaps are removed.
    pub(super) fn editor(&self) -> &dyn ImageEditor {
        #[cfg(feature = "testing")]
        if let Some(e) = &self.opts.seams.editor {
            return e.as_ref();
        }
        &QemuImg
    }
}

/// Does the layer `image` itself hold the bitmap `name`?
fn layer_holds(
    reader: &dyn ImageReader,
    image: &Path,
    name: &str,
) -> std::result::Result<bool, crate::bitmaps::images::ImageError> {
    let chain = reader.read_chain(image)?;
    Ok(chain
        .layers
        .first()
        .is_some_and(|l| l.bitmaps.iter().any(|b| b.name == name)))
}

/// A removal's failure as the library's error.
pub(super) fn image_error(domain: &str, txn: Option<Uuid>, e: ImageEditError) -> Error {
    match e {
        ImageEditError::InUse { image, message } => Error::ImageInUse {
            domain: domain.to_string(),
            image,
            message,
            txn,
        },
        ImageEditError::Failed { image, message } => Error::ImageEdit {
            domain: domain.to_string(),
            image,
            message,
            txn,
        },
    }
}

fn unreadable(r: &StepRecord) -> PhaseError {
    PhaseError::Other(Error::Journal(JournalError::decode(
        "lifecycle step",
        format!(
            "step {} ({:?} of {}) cannot be read back",
            r.seq, r.step.op, r.step.checkpoint
        ),
    )))
}
