//! What `metrics` reads from the journal, and the counters it needs.
//!
//! The journal prunes old finished transactions, so counting `txns` rows
//! would go backwards: each finished transaction adds one to its
//! `(domain, kind, outcome)` row of `counters` (migration 0004) in the same
//! SQLite transaction that finishes it ([`count_finished`], called by
//! `finish` and `record_unchanged`), and those rows are never deleted.
//! [`Journal::metrics_snapshot`] reads everything `metrics` shows in one
//! read transaction: the committed chains' sizes (never their JSON), the
//! counters, the open transactions and each domain's last `validate`.

use rusqlite::{named_params, Connection, Row};

use super::queries::{read_summary, INCOMPLETE_SUMMARIES};
use super::types::StepState;
use super::{Journal, Result, Sql, SqlContext};
use super::{TxnKind, TxnState, TxnSummary};

/// Every transaction kind, in the order `metrics` lists them.
pub(crate) const TXN_KINDS: &[TxnKind] = TxnKind::ALL;

/// A transaction kind's name, as stored and serialised (`sync`, ...).
pub(crate) fn kind_name(kind: TxnKind) -> &'static str {
    kind.stored_name()
}

/// Add one to the counter of a transaction that has just finished (its row
/// already holds its final state).
const COUNT_FINISHED: &str = "INSERT INTO counters (domain, kind, outcome, count, last_at) \
     SELECT domain, kind, state, 1, :now FROM txns WHERE id = :id \
     ON CONFLICT(domain, kind, outcome) DO UPDATE SET count = count + 1, last_at = excluded.last_at";

const COMMITTED_SIZES: &str = "SELECT domain, checkpoints, \
     committed_at FROM domains ORDER BY domain";

const COUNTERS: &str =
    "SELECT domain, kind, outcome, count, last_at FROM counters ORDER BY domain, kind, outcome";

const VALIDATIONS: &str =
    "SELECT domain, validated_at, report_json FROM validations ORDER BY domain";

/// A domain's committed chain, by size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedSize {
    /// The domain.
    pub domain: String,
    /// Checkpoints in its committed chain.
    pub checkpoints: u64,
    /// RFC 3339 time the chain was committed.
    pub committed_at: String,
}

/// How many transactions of a domain and kind finished one way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// The domain.
    pub domain: String,
    /// What the transactions did.
    pub kind: TxnKind,
    /// How they ended: committed (with or without libvirt calls) or rolled
    /// back.
    pub outcome: TxnState,
    /// How many, ever (never decreases).
    pub count: u64,
    /// RFC 3339 time the last one finished.
    pub last_at: String,
}

/// A domain's last `validate` report, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validation {
    /// The domain (the journal's name for it).
    pub domain: String,
    /// RFC 3339 time of the validate.
    pub validated_at: String,
    /// The report, as JSON.
    pub report_json: String,
}

/// What `metrics` reads, all from one read transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Every committed chain's size, by domain.
    pub committed: Vec<CommittedSize>,
    /// Every counter, by domain, kind, outcome.
    pub counters: Vec<Counter>,
    /// The open transactions, oldest first.
    pub open: Vec<TxnSummary>,
    /// Each domain's last validate, by domain.
    pub validations: Vec<Validation>,
}

impl Journal {
    /// Everything `metrics` shows, read in one transaction (a consistent
    /// snapshot; a committed chain is sized by SQLite, never decoded).
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn metrics_snapshot(&self) -> Result<MetricsSnapshot> {
        let mut conn = self.conn();
        let tx = conn.transaction().sql("BEGIN")?;
        let snapshot = MetricsSnapshot {
            committed: tx.all(COMMITTED_SIZES, [], read_size)?,
            counters: tx.all(COUNTERS, [], read_counter)?,
            open: tx.all(
                &INCOMPLETE_SUMMARIES,
                named_params! {":domain": None::<&str>, ":done": StepState::Done},
                read_summary,
            )?,
            validations: tx.all(VALIDATIONS, [], read_validation)?,
        };
        tx.finish().sql("COMMIT")?;
        Ok(snapshot)
    }
}

/// Count a transaction that has just finished (see the module
/// documentation); called inside the write transaction that finishes it.
pub(super) fn count_finished(conn: &Connection, id: &str, ts: &str) -> Result<()> {
    conn.exec(COUNT_FINISHED, named_params! {":id": id, ":now": ts})
        .map(|_| ())
}

fn read_size(r: &Row<'_>) -> rusqlite::Result<CommittedSize> {
    Ok(CommittedSize {
        domain: r.get("domain")?,
        checkpoints: r.get::<_, i64>("checkpoints")? as u64,
        committed_at: r.get("committed_at")?,
    })
}

fn read_counter(r: &Row<'_>) -> rusqlite::Result<Counter> {
    Ok(Counter {
        domain: r.get("domain")?,
        kind: r.get("kind")?,
        outcome: r.get("outcome")?,
        count: r.get::<_, i64>("count")? as u64,
        last_at: r.get("last_at")?,
    })
}

fn read_validation(r: &Row<'_>) -> rusqlite::Result<Validation> {
    Ok(Validation {
        domain: r.get("domain")?,
        validated_at: r.get("validated_at")?,
        report_json: r.get("report_json")?,
    })
}
