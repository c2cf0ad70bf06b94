//! What the store's operations answer: the one wire format. Every JSON
//! document the command prints with `--json`, and every dict the Python
//! module returns, is one of these types serialised as it is, fields in
//! the order written here.

use crate::bitmaps::{Degraded, Unverified};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::ErrorDoc;
use crate::journal::{StepPhase, TxnKind, TxnState, TxnSummary};
use crate::owner::Owner;
use crate::plan::{Plan, Step};

/// How far one round of libvirt calls has got, for a progress display.
///
/// A phase may take more than one round (a resume plans afresh after a
/// lost connection), so `done` may start again from zero with a new
/// `total`; `done == total` ends a round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// How [`crate::Store::recover`] finishes an interrupted transaction.
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

/// What [`crate::Store::sync`], [`crate::Store::resync`] and
/// [`crate::Store::import`] did (`sync` and `import` documents).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// The checkpoint libvirt refused, when the transaction was rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Disks left out of their checkpoint because the bitmap is missing or
    /// unusable (`--bitmaps degrade`); a checkpoint whose every disk is
    /// here was not redefined.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<Degraded>,
    /// Disks whose bitmaps nobody could check: defined as asked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unverified: Vec<Unverified>,
    /// A re-apply: checkpoints libvirt has after the committed leaf (a
    /// backup made since), kept and joined to the committed chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adopted: Vec<String>,
    /// A re-apply: other checkpoints libvirt has that the committed chain
    /// does not, kept as libvirt has them (never deleted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<String>,
}

/// What [`crate::Store::plan`] would do (the `plan` document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanReport {
    /// The domain.
    pub domain: String,
    /// The libvirt calls, in order.
    pub steps: Vec<PlanStep>,
    /// Target checkpoints libvirt already has.
    pub unchanged: Vec<String>,
    /// Things the caller should know.
    pub warnings: Vec<String>,
    /// Disks the sync would leave out of their checkpoint (missing or
    /// unusable bitmap).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<Degraded>,
    /// Disks whose bitmaps nobody could check.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unverified: Vec<Unverified>,
    /// A re-apply: checkpoints after the committed leaf it would adopt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub adopted: Vec<String>,
    /// A re-apply: other checkpoints of libvirt's it would keep.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<String>,
}

/// One planned libvirt call, as `plan` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum PlanStep {
    /// Delete a checkpoint's metadata.
    Delete {
        /// The checkpoint.
        checkpoint: String,
        /// Its parent in libvirt now.
        parent: Option<String>,
    },
    /// Redefine a checkpoint.
    Redefine {
        /// The checkpoint.
        checkpoint: String,
        /// Its parent in the target.
        parent: Option<String>,
        /// libvirt has a different definition under this name.
        replaces: bool,
        /// Same content as libvirt's: redefined only to move libvirt's
        /// hidden current checkpoint.
        forced: bool,
    },
}

impl PlanStep {
    /// The checkpoint this step concerns.
    pub fn checkpoint(&self) -> &str {
        match self {
            PlanStep::Delete { checkpoint, .. } | PlanStep::Redefine { checkpoint, .. } => {
                checkpoint
            }
        }
    }
}

impl PlanReport {
    pub(crate) fn new(domain: String, plan: &Plan, warnings: Vec<String>) -> PlanReport {
        let steps = plan
            .steps
            .iter()
            .map(|s| match s {
                Step::Delete { before } => PlanStep::Delete {
                    checkpoint: before.name.clone(),
                    parent: before.parent.clone(),
                },
                Step::Redefine {
                    def,
                    before,
                    forced,
                } => PlanStep::Redefine {
                    checkpoint: def.name.clone(),
                    parent: def.parent.clone(),
                    replaces: before.is_some(),
                    forced: *forced,
                },
            })
            .collect();
        PlanReport {
            domain,
            steps,
            unchanged: plan.unchanged.clone(),
            warnings,
            degraded: Vec::new(),
            unverified: Vec::new(),
            adopted: Vec::new(),
            foreign: Vec::new(),
        }
    }
}

/// One transaction finished by [`crate::Store::recover`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recovered {
    /// The transaction.
    pub txn: Uuid,
    /// The domain.
    pub domain: String,
    /// Committed or rolled back.
    pub outcome: Outcome,
    /// Mutating libvirt calls the recovery made.
    pub libvirt_calls: u64,
    /// Checkpoints that appeared after the transaction began (a backup
    /// between the crash and the recovery): kept as libvirt has them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub foreign: Vec<String>,
    /// Things the caller should know (libvirt's crash leftovers repaired).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// A transaction [`crate::Store::recover`] could not finish; it stays open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverFailure {
    /// The transaction.
    pub txn: Uuid,
    /// The domain.
    pub domain: String,
    /// Why, as an error document (kind, exit code, message, hint).
    pub error: ErrorDoc,
}

/// What [`crate::Store::recover`] did, transaction by transaction (the
/// `recover` document).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverReport {
    /// Transactions finished (committed or rolled back).
    pub recovered: Vec<Recovered>,
    /// Transactions whose recovery failed; they stay open.
    pub failed: Vec<RecoverFailure>,
    /// Every transaction still open afterwards (a live owner's, and the
    /// failed ones), as `status` shows it.
    pub left_open: Vec<Incomplete>,
}

impl RecoverReport {
    /// The worst failure's kind, if any failed (the command's exit code).
    pub fn worst(&self) -> Option<&RecoverFailure> {
        self.failed.iter().max_by_key(|f| f.error.exit_code)
    }
}

/// An open transaction as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Incomplete {
    /// The transaction.
    pub txn: Uuid,
    /// The domain.
    pub domain: String,
    /// What it does.
    pub kind: TxnKind,
    /// Applying or rolling back.
    pub state: TxnState,
    /// Its owner.
    pub owner: Owner,
    /// Whether a live process (or thread) holds it: then `recover` leaves
    /// it alone.
    pub owner_alive: bool,
    /// Steps recorded done in the current phase.
    pub done: u64,
    /// Steps in the current phase.
    pub total: u64,
    /// Checkpoints in the target.
    pub checkpoints: u64,
    /// RFC 3339 start time.
    pub started_at: String,
}

impl Incomplete {
    pub(crate) fn new(s: TxnSummary, owner_alive: bool) -> Incomplete {
        Incomplete {
            txn: s.id,
            domain: s.domain,
            kind: s.kind,
            state: s.state,
            owner: s.owner,
            owner_alive,
            done: s.done,
            total: s.total,
            checkpoints: s.target_len,
            started_at: s.started_at,
        }
    }
}

/// A domain's committed chain as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

/// The answer to [`crate::Store::status`] (the `status` document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Open transactions.
    pub incomplete: Vec<Incomplete>,
    /// Committed chains.
    pub domains: Vec<DomainStatus>,
}

/// A domain's transactions, newest first (the `history` document).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    /// The domain.
    pub domain: String,
    /// Its transactions, newest first.
    pub transactions: Vec<HistoryEntry>,
}

/// One transaction in a [`History`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    /// The transaction.
    pub txn: Uuid,
    /// What it did.
    pub kind: TxnKind,
    /// Where it ended (or is).
    pub state: TxnState,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 end time; `None` while open.
    pub finished_at: Option<String>,
    /// Checkpoints in its target.
    pub checkpoints: u64,
    /// Steps recorded done in its last phase.
    pub done: u64,
    /// Steps in its last phase.
    pub total: u64,
    /// Mutating libvirt calls made.
    pub libvirt_calls: u64,
    /// Why it was rolled back, if it was.
    pub error: Option<String>,
}

impl From<TxnSummary> for HistoryEntry {
    fn from(s: TxnSummary) -> HistoryEntry {
        HistoryEntry {
            txn: s.id,
            kind: s.kind,
            state: s.state,
            started_at: s.started_at,
            finished_at: s.finished_at,
            checkpoints: s.target_len,
            done: s.done,
            total: s.total,
            libvirt_calls: s.libvirt_calls,
            error: s.error,
        }
    }
}
