//! A transaction's steps between the planner and the journal: a plan's
//! steps as the rows the journal keeps (with their XML and before-images),
//! and a phase's rows read back as the steps the planner replays.

use crate::journal::{NewStep, StepOp, StepRecord};
use crate::plan::{Plan, Step};
use crate::xml::{parse_checkpoint, render_checkpoint};

/// The plan's steps as journal rows, in the order of the calls.
pub(super) fn journal_steps(plan: &Plan) -> Vec<NewStep> {
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
pub(super) fn replayable(rows: &[StepRecord]) -> Option<Vec<(Step, bool)>> {
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
