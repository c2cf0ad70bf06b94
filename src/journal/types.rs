//! The journal's vocabulary: what a transaction does ([`TxnKind`]), where it
//! is ([`TxnState`] and its one transition function), its steps
//! ([`StepPhase`], [`StepOp`]), the records the journal answers with, what
//! the engine hands it ([`NewTxn`], [`NewStep`]) and its options.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{JournalError, Result};
use crate::chain::{Chain, CheckpointDef};
use crate::owner::Owner;

/// What a transaction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnKind {
    /// Make libvirt equal a chain given by the caller.
    Sync,
    /// Re-apply a domain's committed chain.
    Resync,
    /// Adopt libvirt's current checkpoints (no libvirt change).
    Import,
}

/// The state of a transaction. The only transitions are those of
/// [`TxnState::next`], and every one is journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TxnState {
    /// Intent committed; steps towards the target are being applied.
    Applying,
    /// The before-image is being restored.
    RollingBack,
    /// libvirt equals the target; the chain is the domain's committed chain.
    Committed,
    /// libvirt equals the before-image again.
    RolledBack,
}

/// What moves a transaction from one state to the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnEvent {
    /// libvirt was seen equal to the target.
    Commit,
    /// A step was refused, or recovery chose to roll back.
    BeginRollback,
    /// libvirt was seen equal to the before-image.
    FinishRollback,
}

impl TxnState {
    /// The one transition function: the state after `event`, or `None` when
    /// the event is not allowed in this state.
    pub fn next(self, event: TxnEvent) -> Option<TxnState> {
        use {TxnEvent as E, TxnState as S};
        match (self, event) {
            (S::Applying, E::Commit) => Some(S::Committed),
            (S::Applying, E::BeginRollback) => Some(S::RollingBack),
            (S::RollingBack, E::BeginRollback) => Some(S::RollingBack),
            (S::RollingBack, E::FinishRollback) => Some(S::RolledBack),
            _ => None,
        }
    }

    /// Still open (applying or rolling back)?
    pub fn is_open(self) -> bool {
        matches!(self, TxnState::Applying | TxnState::RollingBack)
    }

    /// The name stored in the journal and printed by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TxnState::Applying => "applying",
            TxnState::RollingBack => "rolling_back",
            TxnState::Committed => "committed",
            TxnState::RolledBack => "rolled_back",
        }
    }

    pub(super) fn parse(s: &str) -> Result<TxnState> {
        Ok(match s {
            "applying" => TxnState::Applying,
            "rolling_back" => TxnState::RollingBack,
            "committed" => TxnState::Committed,
            "rolled_back" => TxnState::RolledBack,
            other => return Err(JournalError::decode("transaction state", other)),
        })
    }
}

impl TxnKind {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            TxnKind::Sync => "sync",
            TxnKind::Resync => "resync",
            TxnKind::Import => "import",
        }
    }

    pub(super) fn parse(s: &str) -> Result<TxnKind> {
        Ok(match s {
            "sync" => TxnKind::Sync,
            "resync" => TxnKind::Resync,
            "import" => TxnKind::Import,
            other => return Err(JournalError::decode("transaction kind", other)),
        })
    }
}

/// Which half of a transaction a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepPhase {
    /// Towards the target.
    Apply,
    /// Back to the before-image.
    Rollback,
}

impl StepPhase {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            StepPhase::Apply => "apply",
            StepPhase::Rollback => "rollback",
        }
    }
}

/// A step's libvirt call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOp {
    /// Delete a checkpoint's metadata.
    Delete,
    /// Redefine a checkpoint from XML.
    Redefine,
}

/// A planned step, before it is journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewStep {
    /// The call.
    pub op: StepOp,
    /// The checkpoint it concerns.
    pub checkpoint: String,
    /// The redefine XML (redefine only).
    pub xml: Option<String>,
    /// The definition this step replaces or deletes, if libvirt had one.
    pub before: Option<CheckpointDef>,
}

/// A journaled step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Apply or rollback.
    pub phase: StepPhase,
    /// Order within the phase.
    pub seq: u32,
    /// The step itself.
    #[serde(flatten)]
    pub step: NewStep,
    /// Recorded as done (a cache: it may lag behind libvirt).
    pub done: bool,
}

/// A transaction as the journal holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRecord {
    /// Transaction id.
    pub id: Uuid,
    /// The domain.
    pub domain: String,
    /// What it does.
    pub kind: TxnKind,
    /// Where it is.
    pub state: TxnState,
    /// The chain as given (sync only).
    pub chain: Option<Chain>,
    /// The target definitions, parent first.
    pub target: Vec<CheckpointDef>,
    /// libvirt's checkpoints when the transaction was planned.
    pub before: Vec<CheckpointDef>,
    /// The process that owns it.
    pub owner: Owner,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 time of the last change.
    pub updated_at: String,
    /// RFC 3339 time it ended, if it did.
    pub finished_at: Option<String>,
    /// Why it was rolled back, if it was.
    pub error: Option<String>,
    /// Mutating libvirt calls made so far (every attempt, all phases).
    pub libvirt_calls: u64,
}

/// A transaction summary for status and history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnSummary {
    /// Transaction id.
    pub id: Uuid,
    /// The domain.
    pub domain: String,
    /// What it does.
    pub kind: TxnKind,
    /// Where it is.
    pub state: TxnState,
    /// The owner.
    pub owner: Owner,
    /// Steps recorded done in the current phase.
    pub done: u64,
    /// Steps in the current phase.
    pub total: u64,
    /// Checkpoints in the target.
    pub target_len: u64,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 end time.
    pub finished_at: Option<String>,
    /// Why it was rolled back.
    pub error: Option<String>,
    /// Mutating libvirt calls made.
    pub libvirt_calls: u64,
}

/// A domain's last committed chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    /// The domain.
    pub domain: String,
    /// The chain as given, when it came from a sync.
    pub chain: Option<Chain>,
    /// The definitions libvirt holds, parent first.
    pub defs: Vec<CheckpointDef>,
    /// The transaction that committed it.
    pub txn: Uuid,
    /// RFC 3339 commit time.
    pub committed_at: String,
}

/// A new transaction to journal.
#[derive(Debug, Clone, Copy)]
pub struct NewTxn<'a> {
    /// Transaction id.
    pub id: Uuid,
    /// The domain.
    pub domain: &'a str,
    /// What it does.
    pub kind: TxnKind,
    /// The chain as given.
    pub chain: Option<&'a Chain>,
    /// Target definitions.
    pub target: &'a [CheckpointDef],
    /// Before-image.
    pub before: &'a [CheckpointDef],
    /// The owning process.
    pub owner: &'a Owner,
    /// The planned apply steps.
    pub steps: &'a [NewStep],
}

/// The outcome of [`Journal::begin`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// The transaction and its steps are durably recorded.
    Started,
    /// The domain already has an open transaction; nothing was written.
    Open(Box<TxnRecord>),
}

/// Tunables of the journal (`StoreOptions::journal`).
#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// How long to wait for another process's write lock.
    pub busy_timeout: Duration,
    /// Limit the file's size in pages (tests use it to simulate a full disk).
    pub max_page_count: Option<u64>,
}

impl Default for JournalOptions {
    fn default() -> Self {
        JournalOptions {
            busy_timeout: Duration::from_secs(10),
            max_page_count: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_machine_allows_only_its_transitions() {
        use {TxnEvent as E, TxnState as S};
        let all_states = [S::Applying, S::RollingBack, S::Committed, S::RolledBack];
        let all_events = [E::Commit, E::BeginRollback, E::FinishRollback];
        let mut allowed = Vec::new();
        for s in all_states {
            for e in all_events {
                if let Some(n) = s.next(e) {
                    allowed.push((s, e, n));
                }
            }
        }
        assert_eq!(
            allowed,
            vec![
                (S::Applying, E::Commit, S::Committed),
                (S::Applying, E::BeginRollback, S::RollingBack),
                (S::RollingBack, E::BeginRollback, S::RollingBack),
                (S::RollingBack, E::FinishRollback, S::RolledBack),
            ]
        );
        assert!(S::Applying.is_open() && S::RollingBack.is_open());
        assert!(!S::Committed.is_open() && !S::RolledBack.is_open());
        for s in all_states {
            assert_eq!(S::parse(s.as_str()).unwrap(), s);
        }
    }
}
