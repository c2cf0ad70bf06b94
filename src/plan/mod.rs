//! The planner: the libvirt calls that turn libvirt's checkpoints into a
//! target set of definitions, and leave libvirt's hidden *current*
//! checkpoint — the parent a backup's next checkpoint gets — on the
//! target's leaf (its newest checkpoint without children).
//!
//! The planner reasons with an exact model of libvirt (`model.rs`, the
//! rules of `src/backend/fake.rs`): it simulates its own candidate plans and keeps
//! the cheapest one that ends right. No API reads the current checkpoint,
//! so the planner starts from what it knows ([`Current`]): the newest leaf
//! of libvirt's listing (where a backup or the store's own last sync left
//! it), or none (where a daemon restart leaves it when the checkpoints
//! branch), or, part-way through a transaction, where the journaled steps
//! left it ([`replay_journal`]). It prefers a plan that ends right from every
//! start it thinks possible, when that costs at most one call more than the
//! plan for the likeliest start.
//!
//! Every plan has the same shape:
//!
//! 1. Extras are deleted, children first. libvirt re-parents the children
//!    of a deleted checkpoint to its parent, so a checkpoint whose target
//!    parent is the nearest kept ancestor needs no call: dropping the oldest
//!    checkpoint of a chain, a middle one or an old side branch is one
//!    delete each. Deleting the current checkpoint makes its parent current.
//! 2. What still differs is redefined, parent first, the path to the leaf
//!    before the other branches, with one of these ways to move the current
//!    checkpoint onto the leaf:
//!    - nothing, when the redefines take it there anyway;
//!    - a *walk*: same-content ("forced") redefines of the path's
//!      checkpoints below the current one, first — a redefined checkpoint
//!      becomes current when its parent is the current one, or when there
//!      is none;
//!    - a *hop*: the leaf is redefined first under the current checkpoint
//!      (so it becomes current), then, last, with its own parent — a
//!      replaced current checkpoint stays current. This reaches the leaf
//!      from anywhere, a new root included, for one or two calls.
//!
//! A plan that ends right only from the likeliest start (because covering
//! every start would cost two calls more or beyond) says so in
//! [`Plan::warnings`]. So would one that cannot end on the leaf at all; the
//! hop made after every other redefine rules that out (the path up from
//! the current checkpoint is then the target's, so the hop is no cycle).

mod model;

use std::collections::{BTreeSet, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::chain::{leaf_of, order_defs, spine_path, CheckpointDef};
use model::{after_restart, Model};

/// One planned libvirt call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    /// Delete a checkpoint's metadata; `before` is what libvirt had.
    Delete {
        /// The definition being deleted.
        before: CheckpointDef,
    },
    /// Redefine a checkpoint.
    Redefine {
        /// The definition to write.
        def: CheckpointDef,
        /// What libvirt has under that name when the step runs, if anything.
        before: Option<CheckpointDef>,
        /// Content already matches; redefined only to move libvirt's current
        /// checkpoint down to the leaf.
        forced: bool,
    },
}

impl Step {
    /// The checkpoint this step concerns.
    pub fn checkpoint(&self) -> &str {
        match self {
            Step::Delete { before } => &before.name,
            Step::Redefine { def, .. } => &def.name,
        }
    }
}

/// The calls that make libvirt equal a target, in execution order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Plan {
    /// Deletes (children first), then redefines (parents first).
    pub steps: Vec<Step>,
    /// Target checkpoints libvirt already has, untouched by the plan.
    pub unchanged: Vec<String>,
    /// Where the plan may not leave libvirt's current checkpoint on the
    /// target's leaf.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

impl Plan {
    /// Nothing to do?
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Names redefined, in order.
    pub fn redefined(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Redefine { .. }))
            .map(|s| s.checkpoint().to_string())
            .collect()
    }

    /// Names deleted, in order.
    pub fn deleted(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Delete { .. }))
            .map(|s| s.checkpoint().to_string())
            .collect()
    }
}

/// Do two sets of definitions hold the same checkpoints with the same
/// content (order ignored)?
pub fn same_content(a: &[CheckpointDef], b: &[CheckpointDef]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let by_name: HashMap<&str, &CheckpointDef> = a.iter().map(|d| (d.name.as_str(), d)).collect();
    b.iter().all(|d| by_name.get(d.name.as_str()) == Some(&d))
}

/// Where libvirt's hidden current checkpoint may be, as far as the planner
/// knows: one or more places (`None`: no current checkpoint), the likeliest
/// first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Current {
    candidates: Vec<Option<String>>,
}

impl Current {
    /// What the planner assumes before a transaction: the newest leaf of
    /// libvirt's listing — where a backup's new checkpoint, or the store's
    /// own last sync, left it — or, when the checkpoints do not form a
    /// single line, none, as after a daemon restart.
    pub fn assumed(listing: &[CheckpointDef]) -> Current {
        Current::one_of([
            leaf_of(listing).map(|d| d.name.clone()),
            after_restart(listing).map(str::to_string),
        ])
    }

    /// Several places, the likeliest first (repeats are dropped; none at
    /// all means none).
    pub fn one_of(candidates: impl IntoIterator<Item = Option<String>>) -> Current {
        let mut out: Vec<Option<String>> = Vec::new();
        for c in candidates {
            if !out.contains(&c) {
                out.push(c);
            }
        }
        if out.is_empty() {
            out.push(None);
        }
        Current { candidates: out }
    }

    /// The places, the likeliest first.
    pub fn candidates(&self) -> &[Option<String>] {
        &self.candidates
    }
}

/// Plan the calls that turn `current` (libvirt's listing) into `target`,
/// assuming libvirt's current checkpoint is where [`Current::assumed`] says.
/// When libvirt already equals the target, the plan is empty, wherever the
/// current checkpoint is: a sync with nothing to do makes no call.
pub fn plan(current: &[CheckpointDef], target: &[CheckpointDef]) -> Plan {
    plan_with(current, target, &BTreeSet::new())
}

/// [`plan`], also redefining the target checkpoints named in `force` even
/// where their content matches.
pub fn plan_with(
    current: &[CheckpointDef],
    target: &[CheckpointDef],
    force: &BTreeSet<String>,
) -> Plan {
    if force.is_empty() && same_content(current, target) {
        return Plan {
            steps: Vec::new(),
            unchanged: order_defs(target).iter().map(|d| d.name.clone()).collect(),
            warnings: Vec::new(),
        };
    }
    plan_inner(current, target, &Current::assumed(current), force)
}

/// [`plan`] from what the caller knows of libvirt's current checkpoint (for
/// example [`replay_journal`] part-way through a transaction). When libvirt
/// already equals the target, the plan is empty only if every place the
/// current checkpoint may be is the leaf; otherwise it moves it there.
pub fn plan_from(listing: &[CheckpointDef], target: &[CheckpointDef], at: &Current) -> Plan {
    plan_inner(listing, target, at, &BTreeSet::new())
}

/// What libvirt and the journal show of a transaction part-way through
/// ([`replay_journal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    /// Where libvirt's current checkpoint may be now.
    pub current: Current,
    /// How many of the last phase's journaled steps were made, as far as
    /// libvirt's content shows (recorded ones and the call in flight when
    /// the journal stopped); `None` when no replay matches libvirt.
    pub made: Option<usize>,
}

/// Replay a transaction's journaled steps to find where it is: it started
/// from `start` (its before-image) with the current checkpoint at
/// `assumed`, and has journaled `phases` (the apply steps, then the
/// rollback steps if it is rolling back; each in journal order — the order
/// of the calls — with its recorded-done flag), and libvirt lists
/// `listing`.
///
/// The steps recorded done were made, the next one may have been (its
/// outcome unknown); each step's recorded before-image must be what the
/// replay has under its name, and the content must equal the listing. The
/// daemon may have restarted while the store was not talking to it — where
/// each phase's journal stops (a crash, a lost connection, a refusal) — so
/// where a restart would have put the current checkpoint there is a
/// candidate too, after the replay's own. When no replay matches (someone
/// else changed libvirt), the current checkpoint is [`Current::assumed`] of
/// the listing.
pub fn replay_journal(
    start: &[CheckpointDef],
    assumed: &Current,
    phases: &[&[(Step, bool)]],
    listing: &[CheckpointDef],
) -> Replayed {
    let fallback = || Replayed {
        current: Current::assumed(listing),
        made: None,
    };
    let Some((last, earlier)) = phases.split_last() else {
        return fallback();
    };
    let starts = assumed.candidates().iter().map(Option::as_deref);
    let mut states = vec![Model::new(start, starts, &[]).trusting()];
    for phase in earlier {
        let done = leading_done(phase);
        let mut next = Vec::new();
        for mut m in states {
            for k in 0..=done + 1 {
                if k >= done {
                    let mut here = m.clone();
                    here.restarted();
                    next.push(here);
                }
                if k == phase.len() || replay(&mut m, &phase[k].0).is_err() {
                    break;
                }
            }
        }
        states = next;
    }
    let done = leading_done(last);
    // (steps made, current checkpoints) of each matching replay.
    let (mut near, mut anywhere) = (Vec::new(), Vec::new());
    for mut m in states {
        m.compare_with(listing);
        for k in 0..=last.len() {
            if m.matches_reference() {
                let mut here = m.clone();
                here.restarted();
                let here: Vec<Option<String>> = here
                    .currents()
                    .iter()
                    .map(|c| c.map(str::to_string))
                    .collect();
                if k == done || k == done + 1 {
                    near.push((k, here.clone()));
                }
                anywhere.push((k, here));
            }
            if k == last.len() || replay(&mut m, &last[k].0).is_err() {
                break;
            }
        }
    }
    let found = if near.is_empty() { anywhere } else { near };
    let Some(made) = found.iter().map(|(k, _)| *k).min() else {
        return fallback();
    };
    Replayed {
        current: Current::one_of(
            found
                .into_iter()
                .flat_map(|(_, c)| c)
                .chain([after_restart(listing).map(str::to_string)]),
        ),
        made: Some(made),
    }
}

fn leading_done(steps: &[(Step, bool)]) -> usize {
    steps.iter().take_while(|(_, done)| *done).count()
}

/// Replay one journaled step. A step records what libvirt had under its
/// name when it was planned; a replay that disagrees is not the path the
/// transaction took, and ends there.
fn replay<'a>(m: &mut Model<'a>, step: &'a Step) -> Result<(), model::Refusal> {
    let (name, before) = match step {
        Step::Delete { before } => (&before.name, Some(before)),
        Step::Redefine { def, before, .. } => (&def.name, before.as_ref()),
    };
    if m.def(name).as_ref() != before {
        return Err(model::Refusal::Diverged);
    }
    match step {
        Step::Delete { before } => m.delete(&before.name),
        Step::Redefine { def, .. } => m.redefine(def, def.parent.as_deref()),
    }
}

/// One redefine of a candidate plan: `def`'s content under `parent`
/// (which differs from `def.parent` only for the first half of a hop).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Call<'a> {
    def: &'a CheckpointDef,
    parent: Option<&'a str>,
}

impl<'a> Call<'a> {
    fn to(def: &'a CheckpointDef) -> Self {
        Call {
            def,
            parent: def.parent.as_deref(),
        }
    }
}

/// A candidate's simulated outcome.
struct Outcome<'a> {
    calls: Vec<Call<'a>>,
    cost: usize,
    /// Where the current checkpoint ends, per start.
    ends: Vec<Option<&'a str>>,
}

fn plan_inner(
    listing: &[CheckpointDef],
    target: &[CheckpointDef],
    at: &Current,
    force: &BTreeSet<String>,
) -> Plan {
    let order = order_defs(target);
    let index: HashMap<&str, usize> = target
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let spine: Vec<&CheckpointDef> = spine_path(target, &index)
        .into_iter()
        .map(|i| &target[i])
        .collect();
    let leaf = spine.last().copied();
    let leaf_name = leaf.map(|d| d.name.as_str());
    let tgt: HashMap<&str, &CheckpointDef> = target.iter().map(|d| (d.name.as_str(), d)).collect();

    let starts: Vec<Option<&str>> = at.candidates().iter().map(Option::as_deref).collect();
    let mut m = Model::new(listing, starts.iter().copied(), &order);
    let mut steps = Vec::new();
    for d in order_defs(listing).into_iter().rev() {
        if tgt.contains_key(d.name.as_str()) {
            continue;
        }
        let before = m.def(&d.name).unwrap_or_else(|| d.clone());
        if m.delete(&d.name).is_ok() {
            steps.push(Step::Delete { before });
        }
    }
    m.mark_clean(&order);
    let must: HashSet<&str> = order
        .iter()
        .map(|d| d.name.as_str())
        .filter(|n| !m.settled(n) || force.contains(*n))
        .collect();
    // Nothing differs: no call, unless the current checkpoint may be
    // elsewhere than the leaf.
    if steps.is_empty() && must.is_empty() && m.currents().iter().all(|c| *c == leaf_name) {
        return Plan {
            steps,
            unchanged: order.iter().map(|d| d.name.clone()).collect(),
            warnings: Vec::new(),
        };
    }

    let chosen = match leaf {
        Some(leaf) => choose(&m, &order, &spine, leaf, &must),
        None => Choice {
            calls: in_order(&order, &must, &HashSet::new()),
            warnings: Vec::new(),
        },
    };

    // The chosen calls as steps, with what libvirt has when each runs.
    let mut redefined = HashSet::new();
    for call in &chosen.calls {
        let mut def = call.def.clone();
        def.parent = call.parent.map(str::to_string);
        let before = m.def(&def.name);
        let _ = m.redefine(call.def, call.parent);
        redefined.insert(def.name.clone());
        steps.push(Step::Redefine {
            forced: before.as_ref() == Some(&def),
            before,
            def,
        });
    }
    Plan {
        steps,
        unchanged: order
            .iter()
            .filter(|d| !redefined.contains(&d.name))
            .map(|d| d.name.clone())
            .collect(),
        warnings: chosen.warnings,
    }
}

/// The target checkpoints named in `set` but not in `without`, parent
/// first, the leaf's path first, each with its target content.
fn in_order<'a>(
    order: &[&'a CheckpointDef],
    set: &HashSet<&str>,
    without: &HashSet<&str>,
) -> Vec<Call<'a>> {
    order
        .iter()
        .filter(|d| set.contains(d.name.as_str()) && !without.contains(d.name.as_str()))
        .map(|d| Call::to(d))
        .collect()
}

struct Choice<'a> {
    calls: Vec<Call<'a>>,
    warnings: Vec<String>,
}

/// Build the candidate redefine sequences, simulate them from every start,
/// and keep the cheapest that ends on the leaf from every start — unless
/// that costs more than one call above the cheapest that ends there from
/// the likeliest start.
fn choose<'a>(
    m: &Model<'a>,
    order: &[&'a CheckpointDef],
    spine: &[&'a CheckpointDef],
    leaf: &'a CheckpointDef,
    must: &HashSet<&'a str>,
) -> Choice<'a> {
    let none = HashSet::new();
    let only_leaf: HashSet<&str> = HashSet::from([leaf.name.as_str()]);
    let mut distinct: Vec<Option<&str>> = Vec::new();
    for c in m.currents() {
        if !distinct.contains(c) {
            distinct.push(*c);
        }
    }
    let pos: HashMap<&str, usize> = spine
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let somes: Vec<&str> = distinct.iter().flatten().copied().collect();
    let has_none = distinct.contains(&None);
    let highest_on_path = somes.iter().filter_map(|c| pos.get(c)).min().copied();

    let mut candidates: Vec<Vec<Call<'a>>> = Vec::new();
    // Plain: what differs, in order.
    candidates.push(in_order(order, must, &none));
    // A walk first, from just below the highest current checkpoint on the
    // path (from none: the deepest path checkpoint whose parent exists).
    if somes.iter().all(|c| pos.contains_key(c)) {
        let from = match highest_on_path {
            Some(i) if i + 1 < spine.len() => Some(i + 1),
            Some(i) => has_none.then_some(i),
            None => (1..spine.len())
                .rev()
                .find(|&j| m.has(&spine[j - 1].name))
                .or(Some(0)),
        };
        if let Some(j) = from {
            let walk: HashSet<&str> = spine[j..].iter().map(|d| d.name.as_str()).collect();
            let mut calls: Vec<Call> = spine[j..].iter().map(|d| Call::to(d)).collect();
            calls.extend(in_order(order, must, &walk));
            candidates.push(calls);
        }
    }
    // The walk in order (right from checkpoints, not from none).
    if let Some(i) = highest_on_path {
        let mut set = must.clone();
        set.extend(spine[i + 1..].iter().map(|d| d.name.as_str()));
        candidates.push(in_order(order, &set, &none));
    }
    // A hop first.
    for mut calls in hops(leaf, &distinct) {
        calls.extend(in_order(order, must, &only_leaf));
        finish_hop(leaf, &mut calls);
        candidates.push(calls);
    }

    let mut tried: Vec<Outcome<'a>> = Vec::new();
    let mut seen: Vec<Vec<Call<'a>>> = Vec::new();
    for c in candidates {
        if !seen.iter().any(|s| same_calls(s, &c)) {
            seen.push(c);
        }
    }
    let mut ordered: Vec<(usize, Vec<Call<'a>>)> = seen.clone().into_iter().enumerate().collect();
    ordered.sort_by_key(|(i, c)| (c.len(), *i));
    let goal = Some(leaf.name.as_str());
    for (_, calls) in ordered {
        if let Some(o) = simulate(m, calls) {
            tried.push(o);
        }
        if let Some(pick) = pick(&tried, goal, false) {
            return pick;
        }
    }
    // A hop last: after everything else, under wherever the current
    // checkpoint went; the path up from it is then the target's, so the
    // hop is never a cycle.
    let mut rest = m.clone();
    let calls = in_order(order, must, &only_leaf);
    if calls.iter().all(|c| rest.redefine(c.def, c.parent).is_ok()) {
        let mut after: Vec<Option<&str>> = Vec::new();
        for c in rest.currents() {
            if !after.contains(c) {
                after.push(*c);
            }
        }
        for hop in hops(leaf, &after) {
            let mut calls = calls.clone();
            calls.extend(hop);
            finish_hop(leaf, &mut calls);
            if !seen.iter().any(|s| same_calls(s, &calls)) {
                if let Some(o) = simulate(m, calls) {
                    tried.push(o);
                }
            }
        }
    }
    pick(&tried, goal, true).unwrap_or_else(|| Choice {
        // Unreachable: the plain candidate is never refused (deletes
        // first, then redefines parent first with target content).
        calls: in_order(order, must, &none),
        warnings: vec![format!(
            "no plan found that libvirt would accept while leaving {} current",
            leaf.name
        )],
    })
}

/// The same calls (by identity: every definition comes from the target)?
fn same_calls(a: &[Call], b: &[Call]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| std::ptr::eq(x.def, y.def) && x.parent == y.parent)
}

/// The first half of a hop: the leaf redefined under each current
/// checkpoint other than itself (from none, any redefine becomes current:
/// as a root, if there is no other); and the same without the one under
/// the leaf's own parent, which the second half may do. Empty when no hop
/// is needed.
fn hops<'a>(leaf: &'a CheckpointDef, currents: &[Option<&'a str>]) -> Vec<Vec<Call<'a>>> {
    let mut calls: Vec<Call> = currents
        .iter()
        .flatten()
        .filter(|c| **c != leaf.name)
        .map(|c| Call {
            def: leaf,
            parent: Some(c),
        })
        .collect();
    if calls.is_empty() && currents.contains(&None) {
        calls.push(Call {
            def: leaf,
            parent: None,
        });
    }
    if calls.is_empty() {
        return Vec::new();
    }
    let but_parent: Vec<Call> = calls
        .iter()
        .copied()
        .filter(|c| c.parent != leaf.parent.as_deref())
        .collect();
    if but_parent.len() < calls.len() {
        vec![calls, but_parent]
    } else {
        vec![calls]
    }
}

/// The second half of a hop: the leaf with its own parent, last, unless the
/// last write of it already was.
fn finish_hop<'a>(leaf: &'a CheckpointDef, calls: &mut Vec<Call<'a>>) {
    let last = calls.iter().rev().find(|c| c.def.name == leaf.name);
    if last.is_none_or(|c| c.parent != leaf.parent.as_deref()) {
        calls.push(Call::to(leaf));
    }
}

/// Run a candidate in a copy of the model; `None` when libvirt would refuse
/// a call.
fn simulate<'a>(m: &Model<'a>, calls: Vec<Call<'a>>) -> Option<Outcome<'a>> {
    let mut sim = m.clone();
    for c in &calls {
        sim.redefine(c.def, c.parent).ok()?;
    }
    Some(Outcome {
        cost: calls.len(),
        ends: sim.currents().to_vec(),
        calls,
    })
}

/// The rule of choice over the candidates simulated so far (cheapest
/// first). Without `last`, answers only once the answer cannot change.
fn pick<'a>(tried: &[Outcome<'a>], goal: Option<&'a str>, last: bool) -> Option<Choice<'a>> {
    let right_first = |o: &&Outcome| o.ends.first() == Some(&goal);
    let right_all = |o: &&Outcome| o.ends.iter().all(|e| *e == goal);
    let primary = tried.iter().filter(right_first).min_by_key(|o| o.cost);
    let robust = tried.iter().filter(right_all).min_by_key(|o| o.cost);
    match (primary, robust) {
        (Some(p), Some(r)) if r.cost <= p.cost + 1 => Some(Choice {
            calls: r.calls.clone(),
            warnings: Vec::new(),
        }),
        (Some(p), _) if last => {
            let missed: Vec<String> = p
                .ends
                .iter()
                .zip(0..)
                .filter(|(e, _)| **e != goal)
                .map(|(e, _)| name_or_none(*e))
                .collect();
            Some(Choice {
                calls: p.calls.clone(),
                warnings: vec![format!(
                    "libvirt's current checkpoint will be {} only if it is where assumed now; \
                     from another start (after a daemon restart, for example) it may end on {}",
                    name_or_none(goal),
                    missed.join(" or ")
                )],
            })
        }
        (None, _) if last => tried.iter().min_by_key(|o| o.cost).map(|o| Choice {
            calls: o.calls.clone(),
            warnings: vec![format!(
                "libvirt's current checkpoint will end on {}, not on the leaf {}: a backup's \
                 next checkpoint would hang off it",
                name_or_none(o.ends.first().copied().flatten()),
                name_or_none(goal)
            )],
        }),
        _ => None,
    }
}

fn name_or_none(n: Option<&str>) -> String {
    n.map_or_else(|| "none".to_string(), str::to_string)
}

#[cfg(test)]
mod tests;
