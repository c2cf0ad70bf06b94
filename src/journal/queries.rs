//! Reading the journal: one transaction, the open ones, summaries with
//! progress for status and history, and each domain's committed chain.
//! Each row is read by column name into its record.

use std::sync::LazyLock;

use rusqlite::{named_params, params, Connection, Row};
use uuid::Uuid;

use super::types::{StepState, OPEN_STATES};
use super::{json, txn_id, Journal, JournalError, Result, Sql};
use super::{Committed, TxnRecord, TxnState, TxnSummary};
use crate::owner::Owner;

/// The columns of a [`TxnRecord`], selected `FROM txns`; the call count and
/// the last change add the row's `txn_progress`.
const TXN_COLS: &str = "id, domain, kind, state, \
     (SELECT d.json FROM txn_docs d WHERE d.txn_id = txns.id AND d.name = 'chain') AS chain_json, \
     (SELECT d.json FROM txn_docs d WHERE d.txn_id = txns.id AND d.name = 'target') AS target_json, \
     (SELECT d.json FROM txn_docs d WHERE d.txn_id = txns.id AND d.name = 'before') AS before_json, \
     owner_pid, owner_boot_id, owner_start, started_at, \
     MAX(updated_at, COALESCE((SELECT p.updated_at FROM txn_progress p WHERE p.txn_id = txns.id), '')) \
     AS updated_at, finished_at, error, \
     libvirt_calls + COALESCE((SELECT p.calls FROM txn_progress p WHERE p.txn_id = txns.id), 0) \
     AS libvirt_calls";

static TXN: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {TXN_COLS} FROM txns WHERE id = ?1"));

static OPEN_TXN: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {TXN_COLS} FROM txns WHERE domain = ?1 AND {}",
        *OPEN_STATES
    )
});

static INCOMPLETE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {TXN_COLS} FROM txns WHERE {} AND (?1 IS NULL OR domain = ?1) ORDER BY rowid",
        *OPEN_STATES
    )
});

pub(super) static INCOMPLETE_SUMMARIES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} WHERE {} AND (:domain IS NULL OR domain = :domain) ORDER BY rowid",
        summary_select(),
        *OPEN_STATES
    )
});

static HISTORY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{} WHERE domain = :domain ORDER BY rowid DESC LIMIT :limit",
        summary_select()
    )
});

const COMMITTED_COLS: &str = "domain, chain_json, defs_json, txn_id, committed_at";

static COMMITTED: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {COMMITTED_COLS} FROM domains WHERE domain = ?1"));

static ALL_COMMITTED: LazyLock<String> =
    LazyLock::new(|| format!("SELECT {COMMITTED_COLS} FROM domains ORDER BY domain"));

/// The columns of a [`TxnSummary`], `FROM txns t`: the steps counted are
/// those of the phase the state runs ([`TxnState::phase`]).
fn summary_select() -> String {
    let phase = TxnState::ALL
        .iter()
        .map(|s| format!("WHEN '{}' THEN '{}'", s.as_str(), s.phase().stored_name()))
        .collect::<Vec<_>>()
        .join(" ");
    let steps = format!(
        "SELECT COUNT(*) FROM steps s WHERE s.txn_id = t.id AND s.phase = CASE t.state {phase} END"
    );
    format!(
        "SELECT t.id AS id, t.domain AS domain, t.kind AS kind, t.state AS state, \
         t.owner_pid AS owner_pid, t.owner_boot_id AS owner_boot_id, t.owner_start AS owner_start, \
         ({steps} AND s.state = :done) AS done, ({steps}) AS total, \
         (SELECT d.items FROM txn_docs d WHERE d.txn_id = t.id AND d.name = 'target') AS target_len, t.started_at AS started_at, \
         t.finished_at AS finished_at, t.error AS error, \
         t.libvirt_calls + COALESCE((SELECT p.calls FROM txn_progress p WHERE p.txn_id = t.id), 0) \
         AS libvirt_calls \
         FROM txns t"
    )
}

impl Journal {
    /// One transaction.
    ///
    /// # Errors
    ///
    /// SQLite errors; `Decode` when it does not exist.
    pub fn txn(&self, id: Uuid) -> Result<TxnRecord> {
        self.conn()
            .first(&TXN, [id.to_string()], read_txn)?
            .ok_or_else(|| JournalError::decode("transaction", format!("{id} does not exist")))
    }

    /// Open transactions (all domains, or one), oldest first.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn incomplete(&self, domain: Option<&str>) -> Result<Vec<TxnRecord>> {
        self.conn().all(&INCOMPLETE, [domain], read_txn)
    }

    /// Summaries with progress of the open transactions.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn incomplete_summaries(&self, domain: Option<&str>) -> Result<Vec<TxnSummary>> {
        self.conn().all(
            &INCOMPLETE_SUMMARIES,
            named_params! {":domain": domain, ":done": StepState::Done},
            read_summary,
        )
    }

    /// A domain's transactions, newest first, at most `limit`.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn history(&self, domain: &str, limit: usize) -> Result<Vec<TxnSummary>> {
        self.conn().all(
            &HISTORY,
            named_params! {
                ":domain": domain,
                ":done": StepState::Done,
                ":limit": i64::try_from(limit).unwrap_or(i64::MAX),
            },
            read_summary,
        )
    }

    /// A domain's last committed chain.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn committed(&self, domain: &str) -> Result<Option<Committed>> {
        self.conn().first(&COMMITTED, [domain], read_committed)
    }

    /// Every domain's committed chain, by domain name.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn all_committed(&self) -> Result<Vec<Committed>> {
        self.conn().all(&ALL_COMMITTED, [], read_committed)
    }
}

/// The domain's open transaction, if it has one.
pub(super) fn open_txn(conn: &Connection, domain: &str) -> Result<Option<TxnRecord>> {
    conn.first(&OPEN_TXN, params![domain], read_txn)
}

fn read_owner(r: &Row<'_>) -> rusqlite::Result<Owner> {
    Ok(Owner {
        pid: r.get("owner_pid")?,
        boot_id: r.get("owner_boot_id")?,
        start: r.get::<_, i64>("owner_start")? as u64,
    })
}

fn read_txn(r: &Row<'_>) -> rusqlite::Result<TxnRecord> {
    Ok(TxnRecord {
        id: txn_id(r, "id")?,
        domain: r.get("domain")?,
        kind: r.get("kind")?,
        state: r.get("state")?,
        chain: json(r, "chain_json", "chain")?,
        target: json(r, "target_json", "target")?,
        before: json(r, "before_json", "before-image")?,
        owner: read_owner(r)?,
        started_at: r.get("started_at")?,
        updated_at: r.get("updated_at")?,
        finished_at: r.get("finished_at")?,
        error: r.get("error")?,
        libvirt_calls: r.get::<_, i64>("libvirt_calls")? as u64,
    })
}

pub(super) fn read_summary(r: &Row<'_>) -> rusqlite::Result<TxnSummary> {
    Ok(TxnSummary {
        id: txn_id(r, "id")?,
        domain: r.get("domain")?,
        kind: r.get("kind")?,
        state: r.get("state")?,
        owner: read_owner(r)?,
        done: r.get::<_, i64>("done")? as u64,
        total: r.get::<_, i64>("total")? as u64,
        target_len: r.get::<_, i64>("target_len")? as u64,
        started_at: r.get("started_at")?,
        finished_at: r.get("finished_at")?,
        error: r.get("error")?,
        libvirt_calls: r.get::<_, i64>("libvirt_calls")? as u64,
    })
}

fn read_committed(r: &Row<'_>) -> rusqlite::Result<Committed> {
    Ok(Committed {
        domain: r.get("domain")?,
        chain: json(r, "chain_json", "committed chain")?,
        defs: json(r, "defs_json", "committed definitions")?,
        txn: txn_id(r, "txn_id")?,
        committed_at: r.get("committed_at")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::StepPhase;

    /// SQLite's plan for `sql` with `params`, one line per step.
    fn plan(j: &Journal, sql: &str, params: impl rusqlite::Params) -> String {
        let conn = j.conn();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt
            .query_map(params, |r| r.get::<_, String>("detail"))
            .unwrap();
        rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn the_open_transactions_are_read_from_the_partial_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = super::super::tests::journal_with_txn(dir.path());
        let incomplete = plan(&j, &INCOMPLETE, [None::<&str>]);
        assert!(incomplete.contains("txns_open"), "{incomplete}");
        let summaries = plan(
            &j,
            &INCOMPLETE_SUMMARIES,
            named_params! {":domain": None::<&str>, ":done": StepState::Done},
        );
        assert!(summaries.contains("txns_open"), "{summaries}");
        let open = plan(&j, &OPEN_TXN, ["d"]);
        assert!(open.contains("txns_one_open_per_domain"), "{open}");
    }

    #[test]
    fn summaries_count_the_steps_of_the_phase_the_state_runs() {
        let dir = tempfile::tempdir().unwrap();
        let (j, txn) = super::super::tests::journal_with_txn(dir.path());
        j.step_done(txn, StepPhase::Apply, 0).unwrap();
        let s = &j.incomplete_summaries(Some("d")).unwrap()[0];
        assert_eq!((s.done, s.total, s.state), (1, 2, TxnState::Applying));
        j.transition(txn, super::super::TxnEvent::BeginRollback, None)
            .unwrap();
        let one = crate::journal::NewStep {
            op: crate::journal::StepOp::Delete,
            checkpoint: "c".into(),
            xml: None,
            before: None,
            detail: None,
        };
        j.add_steps(txn, StepPhase::Rollback, &[one]).unwrap();
        let s = &j.history("d", 10).unwrap()[0];
        assert_eq!((s.done, s.total, s.state), (0, 1, TxnState::RollingBack));
        assert!(j.incomplete_summaries(Some("other")).unwrap().is_empty());
    }

    #[test]
    fn an_unreadable_row_is_a_decode_error_naming_its_value_and_query() {
        let dir = tempfile::tempdir().unwrap();
        let (j, txn) = super::super::tests::journal_with_txn(dir.path());
        j.conn()
            .execute(
                "UPDATE txn_docs SET json = '[{' WHERE txn_id = ?1 AND name = 'target'",
                [txn.to_string()],
            )
            .unwrap();
        let e = j.txn(txn).unwrap_err();
        assert!(
            matches!(&e, JournalError::Decode { detail, .. } if detail.starts_with("target: ")),
            "{e:?}"
        );
        assert_eq!(e.query(), Some(TXN.as_str()));
        j.conn()
            .execute_batch("PRAGMA ignore_check_constraints = ON")
            .unwrap();
        j.conn()
            .execute(
                "UPDATE txns SET kind = 'bogus' WHERE id = ?1",
                [txn.to_string()],
            )
            .unwrap();
        j.conn()
            .execute(
                "UPDATE txn_docs SET json = '[]' WHERE txn_id = ?1 AND name = 'target'",
                [txn.to_string()],
            )
            .unwrap();
        assert_eq!(
            j.incomplete(None).unwrap_err().to_string(),
            "journal holds an unreadable value: transaction kind: bogus"
        );
    }
}
