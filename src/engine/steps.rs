//! A transaction's steps between the planner and the journal: a plan's
//! steps as the rows the journal keeps (with their XML and before-images),
//! and a phase's rows read back as the steps the planner replays.

use crate::chain::CheckpointDef;
use crate::journal::{NewStep, StepOp, StepRecord};
use crate::plan::{Plan, Step};
use crate::xml::{parse_checkpoint, render_checkpoint};

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

/// Rows back as the steps they journal, consuming them (each XML parsed
/// again); `None` when a row cannot be read back.
pub(super) fn from_journal_steps(rows: Vec<NewStep>) -> Option<Vec<Step>> {
    rows.into_iter()
        .map(|r| step(r.op, r.xml.as_deref(), r.before))
        .collect()
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
