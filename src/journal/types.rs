//! The journal's vocabulary: what a transaction does ([`TxnKind`]), where it
//! is ([`TxnState`] and its one transition function), its steps
//! ([`StepPhase`], [`StepOp`]), the records the journal answers with, what
//! the engine hands it ([`NewTxn`], [`NewStep`]) and its options. Each
//! enum is stored in SQLite under its name (`ToSql`, `FromSql`); the open
//! and the finished states have their SQL lists.

use std::sync::LazyLock;
use std::time::Duration;

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::error::Unreadable;
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
    /// Make one checkpoint, the base of the next incremental backup,
    /// usable in libvirt (never deletes). Its target is libvirt's
    /// checkpoints with that one; committing it leaves the domain's
    /// committed chain as it was.
    Ensure,
    /// Remove orphan and unusable bitmaps, and the checkpoints left without
    /// one.
    Reclaim,
    /// Retention: delete the oldest checkpoints with their bitmaps.
    Prune,
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
        self.stored_name()
    }

    /// The phase of the steps a transaction runs in this state (or ran
    /// last, once finished).
    pub(super) fn phase(self) -> StepPhase {
        match self {
            TxnState::Applying | TxnState::Committed => StepPhase::Apply,
            TxnState::RollingBack | TxnState::RolledBack => StepPhase::Rollback,
        }
    }
}

/// `state IN ('applying', 'rolling_back')`: the open states
/// ([`TxnState::is_open`]) as SQL. Literal values, not bound ones: SQLite
/// uses a partial index (migration 0001 has two on open rows) only when it
/// can prove from the query's text that the index covers it.
pub(super) static OPEN_STATES: LazyLock<String> = LazyLock::new(|| states_in(true));

/// `state IN ('committed', 'rolled_back')`: the finished states, as SQL.
pub(super) static FINISHED_STATES: LazyLock<String> = LazyLock::new(|| states_in(false));

fn states_in(open: bool) -> String {
    let names: Vec<String> = TxnState::ALL
        .iter()
        .filter(|s| s.is_open() == open)
        .map(|s| format!("'{}'", s.stored_name()))
        .collect();
    format!("state IN ({})", names.join(", "))
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

/// A step's libvirt call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOp {
    /// Delete a checkpoint's metadata.
    Delete,
    /// Redefine a checkpoint from XML.
    Redefine,
    /// libvirt's real delete of a checkpoint: metadata and bitmaps (a
    /// lifecycle transaction's, on a running domain).
    Purge,
    /// Remove a checkpoint's bitmap from one image file (a lifecycle
    /// transaction's, on a shut-off domain); `detail` names the disk and
    /// the image.
    RemoveBitmap,
}

/// A step's recorded progress (the journal's `steps.state`; a step record
/// shows it as `done`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum StepState {
    /// Not yet seen done.
    Pending,
    /// Its call succeeded, or libvirt showed it was not needed.
    Done,
}

/// The name each value of an enum is stored under in the journal (its serde
/// name too: a test holds them equal), every value (`ALL`), and its SQL
/// conversions: bound as its name, read back from it — any other text is
/// an unreadable value (`what: text`).
macro_rules! stored_by_name {
    ($t:ident, $what:literal, { $($v:ident => $name:literal),+ $(,)? }) => {
        impl $t {
            /// Every value.
            #[cfg_attr(not(test), allow(dead_code))]
            pub(super) const ALL: &'static [$t] = &[$($t::$v),+];

            pub(super) fn stored_name(self) -> &'static str {
                match self {
                    $($t::$v => $name),+
                }
            }

            pub(super) fn from_stored(name: &str) -> Option<$t> {
                match name {
                    $($name => Some($t::$v),)+
                    _ => None,
                }
            }
        }

        impl ToSql for $t {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.stored_name()))
            }
        }

        impl FromSql for $t {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<$t> {
                let name = value.as_str()?;
                $t::from_stored(name).ok_or_else(|| Unreadable::new($what, name).into())
            }
        }
    };
}

stored_by_name!(TxnKind, "transaction kind", {
    Sync => "sync",
    Resync => "resync",
    Import => "import",
    Ensure => "ensure",
    Reclaim => "reclaim",
    Prune => "prune",
});
stored_by_name!(TxnState, "transaction state", {
    Applying => "applying",
    RollingBack => "rolling_back",
    Committed => "committed",
    RolledBack => "rolled_back",
});
stored_by_name!(StepPhase, "step phase", {
    Apply => "apply",
    Rollback => "rollback",
});
stored_by_name!(StepOp, "step op", {
    Delete => "delete",
    Redefine => "redefine",
    Purge => "purge",
    RemoveBitmap => "remove_bitmap",
});
stored_by_name!(StepState, "step state", {
    Pending => "pending",
    Done => "done",
});

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
    /// What the op needs beyond its checkpoint, as JSON (`remove_bitmap`:
    /// `{"target": …, "image": …}`); `None` for the others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
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
        assert_eq!(S::ALL, all_states);
    }

    /// Every value of `T` is stored under its serde name and read back as
    /// itself through SQLite; any other name is an unreadable value.
    fn stored_by_name<T>(all: &[T], name: fn(T) -> &'static str, what: &str)
    where
        T: Copy + PartialEq + std::fmt::Debug + Serialize + ToSql + FromSql,
    {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        for &v in all {
            assert_eq!(serde_json::to_value(v).unwrap(), name(v), "serde's name");
            let (text, back): (String, T) = conn
                .query_row("SELECT ?1, ?1", [v], |r| Ok((r.get(0)?, r.get(1)?)))
                .unwrap();
            assert_eq!((text.as_str(), back), (name(v), v));
        }
        let e = conn
            .query_row("SELECT 'bogus'", [], |r| r.get::<_, T>(0))
            .unwrap_err();
        let e = super::super::JournalError::sqlite("q", e);
        assert_eq!(
            e.to_string(),
            format!("journal holds an unreadable value: {what}: bogus")
        );
    }

    #[test]
    fn every_enum_is_stored_under_its_name() {
        stored_by_name(TxnKind::ALL, TxnKind::stored_name, "transaction kind");
        stored_by_name(TxnState::ALL, TxnState::as_str, "transaction state");
        stored_by_name(StepPhase::ALL, StepPhase::stored_name, "step phase");
        stored_by_name(StepOp::ALL, StepOp::stored_name, "step op");
        for &s in StepState::ALL {
            assert_eq!(StepState::from_stored(s.stored_name()), Some(s));
        }
    }

    #[test]
    fn the_state_lists_are_those_of_the_schemas_partial_indexes() {
        let schema = super::super::migrate::MIGRATIONS[0].sql;
        let index = |name: &str| {
            let at = schema.find(name).unwrap();
            schema[at..].lines().next().unwrap().to_string()
        };
        // SQLite uses a partial index only when the query's own text
        // implies the index's condition: the lists must match it exactly.
        assert!(index("txns_one_open_per_domain").ends_with(&format!("WHERE {};", *OPEN_STATES)));
        assert!(index("txns_open").ends_with(&format!("WHERE {};", *OPEN_STATES)));
        assert_eq!(*OPEN_STATES, "state IN ('applying', 'rolling_back')");
        assert_eq!(*FINISHED_STATES, "state IN ('committed', 'rolled_back')");
    }
}
