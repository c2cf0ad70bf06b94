//! A transaction's steps between the planner and the journal: a plan's
//! steps as the rows the journal keeps (with their XML and before-images),
//! and a phase's rows read back as the steps the planner replays.

use std::collections::VecDeque;

use uuid::Uuid;

use crate::chain::CheckpointDef;
use crate::journal::{Journal, JournalError, NewStep, StepOp, StepPhase, StepRecord};
use crate::plan::{Plan, Step};
use crate::xml::{parse_checkpoint, render_checkpoint};

/// Journal rows read back per batch by [`RoundSteps::Journaled`].
const BATCH: usize = 256;

/// The plan's steps as journal rows, in the order of the calls.
pub(super) fn journal_steps(plan: &Plan) -> Vec<NewStep> {
    into_journal_steps(plan.steps.clone())
}

/// [`journal_steps`], consuming the steps: each definition is then held
/// once, as its row's XML.
pub(super) fn into_journal_steps(steps: Vec<Step>) -> Vec<NewStep> {
    steps
        .into_iter()
        .map(|s| match s {
            Step::Delete { before } => NewStep {
                op: StepOp::Delete,
                checkpoint: before.name.clone(),
                xml: None,
                before: Some(before),
                detail: None,
            },
            Step::Redefine { def, before, .. } => NewStep {
                op: StepOp::Redefine,
                xml: Some(render_checkpoint(&def)),
                checkpoint: def.name,
                before,
                detail: None,
            },
        })
        .collect()
}

/// The steps one round makes, each with its journal sequence number.
pub(super) enum RoundSteps {
    /// A plan made in memory, its rows already journaled.
    Planned(std::iter::Zip<std::vec::IntoIter<Step>, std::vec::IntoIter<u32>>),
    /// The phase's journaled steps `next..end`, read back a batch at a
    /// time: a long chain's steps are megabytes, never all held at once.
    Journaled {
        /// The next sequence number to read.
        next: u32,
        /// One past the last.
        end: u32,
        /// Read and not yet made.
        batch: VecDeque<(Step, u32)>,
    },
}

/// What [`RoundSteps::next`] gives.
#[allow(clippy::large_enum_variant)] // one at a time, moved out at once
pub(super) enum Next {
    /// The next step and its sequence number.
    Step(Step, u32),
    /// No step left.
    End,
    /// A journaled row cannot be read back as a step: the round plans
    /// afresh from libvirt instead.
    Unreadable,
}

impl RoundSteps {
    /// A plan's steps and their sequence numbers.
    pub(super) fn planned(plan: Plan, seqs: Vec<u32>) -> Self {
        RoundSteps::Planned(plan.steps.into_iter().zip(seqs))
    }

    /// The first `count` steps journaled for the phase.
    pub(super) fn journaled(count: u32) -> Self {
        RoundSteps::Journaled {
            next: 0,
            end: count,
            batch: VecDeque::new(),
        }
    }

    /// The next step, reading the next batch of rows when it is needed.
    pub(super) fn next(
        &mut self,
        journal: &Journal,
        txn: Uuid,
        phase: StepPhase,
    ) -> Result<Next, JournalError> {
        match self {
            RoundSteps::Planned(steps) => {
                Ok(steps.next().map_or(Next::End, |(s, q)| Next::Step(s, q)))
            }
            RoundSteps::Journaled { next, end, batch } => {
                if batch.is_empty() && *next < *end {
                    let limit = BATCH.min((*end - *next) as usize);
                    for r in journal.steps_from(txn, phase, *next, limit)? {
                        if r.seq >= *end {
                            break;
                        }
                        let Some(s) = step(r.step.op, r.step.xml.as_deref(), r.step.before) else {
                            return Ok(Next::Unreadable);
                        };
                        *next = r.seq + 1;
                        batch.push_back((s, r.seq));
                    }
                    if batch.is_empty() {
                        // Fewer rows than journaled: not the steps begun with.
                        return Ok(Next::Unreadable);
                    }
                }
                Ok(batch
                    .pop_front()
                    .map_or(Next::End, |(s, q)| Next::Step(s, q)))
            }
        }
    }
}

/// A phase's journaled steps as the planner replays them, with their
/// recorded-done flags; `None` when a row cannot be read back.
pub(super) fn replayable(rows: &[StepRecord]) -> Option<Vec<(Step, bool)>> {
    rows.iter()
        .map(|r| {
            Some((
                step(r.step.op, r.step.xml.as_deref(), r.step.before.clone())?,
                r.done,
            ))
        })
        .collect()
}

/// One row's step: a redefine whose definition equals what libvirt had is
/// a forced one (it only moves the current checkpoint).
fn step(op: StepOp, xml: Option<&str>, before: Option<CheckpointDef>) -> Option<Step> {
    Some(match op {
        StepOp::Delete => Step::Delete { before: before? },
        StepOp::Redefine => {
            let def = parse_checkpoint(xml?).ok()?;
            Step::Redefine {
                forced: before.as_ref() == Some(&def),
                before,
                def,
            }
        }
        // A lifecycle transaction's removals are not the planner's.
        StepOp::Purge | StepOp::RemoveBitmap => return None,
    })
}
