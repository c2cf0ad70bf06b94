//! A transaction's life in the journal: its intent recorded ([`Journal::begin`],
//! or at once as committed when nothing was to do), its state transitions,
//! its end (the committed chain, pruned history) and its owner (taken over,
//! still owning).

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use uuid::Uuid;

use super::queries::open_txn;
use super::steps::insert_steps;
use super::{now, to_json, Journal, JournalError, Result};
use super::{Begin, NewTxn, StepPhase, TxnEvent, TxnState};
use crate::owner::Owner;

impl Journal {
    /// Record a new transaction and its apply steps durably, unless the
    /// domain already has an open one (then nothing is written and the open
    /// one is returned).
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn begin(&self, t: NewTxn<'_>) -> Result<Begin> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(JournalError::from_sqlite)?;
        if let Some(open) = open_txn(&tx, t.domain)? {
            return Ok(Begin::Open(Box::new(open)));
        }
        insert_txn(&tx, &t, TxnState::Applying, &now())?;
        insert_steps(&tx, t.id, StepPhase::Apply, 0, t.steps)?;
        tx.commit().map_err(JournalError::from_sqlite)?;
        Ok(Begin::Started)
    }

    /// Record a transaction that needed no libvirt call as committed at
    /// once, and make its target the domain's committed chain.
    ///
    /// # Errors
    ///
    /// SQLite errors; [`Begin::Open`] semantics as [`Journal::begin`].
    pub fn record_unchanged(&self, t: NewTxn<'_>, keep: usize) -> Result<Begin> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(JournalError::from_sqlite)?;
        if let Some(open) = open_txn(&tx, t.domain)? {
            return Ok(Begin::Open(Box::new(open)));
        }
        let ts = now();
        insert_txn(&tx, &t, TxnState::Committed, &ts)?;
        commit_target(&tx, t.id, &ts)?;
        prune(&tx, t.domain, keep)?;
        tx.commit().map_err(JournalError::from_sqlite)?;
        Ok(Begin::Started)
    }

    /// Move a transaction to its next state (and record an error, if any).
    ///
    /// # Errors
    ///
    /// [`JournalError::Decode`] when the transition is not allowed from the
    /// stored state; SQLite errors.
    pub fn transition(&self, txn: Uuid, event: TxnEvent, error: Option<&str>) -> Result<TxnState> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(JournalError::from_sqlite)?;
        let state = txn_state(&tx, txn)?;
        let next = state.next(event).ok_or_else(|| {
            JournalError::decode(
                "transition",
                format!("{event:?} is not allowed in state {}", state.as_str()),
            )
        })?;
        tx.execute(
            "UPDATE txns SET state = ?2, updated_at = ?3, error = COALESCE(?4, error) WHERE id = ?1",
            params![txn.to_string(), next.as_str(), now(), error],
        )
        .map_err(JournalError::from_sqlite)?;
        tx.commit().map_err(JournalError::from_sqlite)?;
        Ok(next)
    }

    /// Close a transaction: `Commit` makes its target the domain's committed
    /// chain; `FinishRollback` leaves the committed chain as it was. History
    /// beyond `keep` finished transactions of the domain is pruned.
    ///
    /// # Errors
    ///
    /// As [`Journal::transition`].
    pub fn finish(&self, txn: Uuid, event: TxnEvent, keep: usize) -> Result<TxnState> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(JournalError::from_sqlite)?;
        let state = txn_state(&tx, txn)?;
        let next = state.next(event).filter(|s| !s.is_open()).ok_or_else(|| {
            JournalError::decode(
                "finish",
                format!("{event:?} is not allowed in state {}", state.as_str()),
            )
        })?;
        let ts = now();
        tx.execute(
            "UPDATE txns SET state = ?2, updated_at = ?3, finished_at = ?3 WHERE id = ?1",
            params![txn.to_string(), next.as_str(), ts],
        )
        .map_err(JournalError::from_sqlite)?;
        if next == TxnState::Committed {
            commit_target(&tx, txn, &ts)?;
        }
        let domain: String = tx
            .query_row(
                "SELECT domain FROM txns WHERE id = ?1",
                params![txn.to_string()],
                |r| r.get(0),
            )
            .map_err(JournalError::from_sqlite)?;
        prune(&tx, &domain, keep)?;
        tx.commit().map_err(JournalError::from_sqlite)?;
        Ok(next)
    }

    /// Hand an open transaction to a new owner, if it still has the owner
    /// the caller saw (compare-and-set: two recoverers cannot both win).
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn take_over(&self, txn: Uuid, seen: &Owner, new: &Owner) -> Result<bool> {
        let n = self
            .conn()
            .execute(
                "UPDATE txns SET owner_pid = ?4, owner_boot_id = ?5, owner_start = ?6, updated_at = ?7 \
                 WHERE id = ?1 AND owner_pid = ?2 AND owner_boot_id = ?3 AND owner_start = ?8 \
                 AND state IN ('applying', 'rolling_back')",
                params![
                    txn.to_string(),
                    seen.pid,
                    seen.boot_id,
                    new.pid,
                    new.boot_id,
                    new.start as i64,
                    now(),
                    seen.start as i64
                ],
            )
            .map_err(JournalError::from_sqlite)?;
        Ok(n == 1)
    }

    /// Does `owner` still own open transaction `txn`? (A cheap read: the
    /// engine asks before every libvirt call, so that an owner whose
    /// transaction was taken over stops.)
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn still_owns(&self, txn: Uuid, owner: &Owner) -> Result<bool> {
        self.conn()
            .query_row(
                "SELECT owner_pid = ?2 AND owner_boot_id = ?3 AND owner_start = ?4 \
                 AND state IN ('applying', 'rolling_back') FROM txns WHERE id = ?1",
                params![
                    txn.to_string(),
                    owner.pid,
                    owner.boot_id,
                    owner.start as i64
                ],
                |r| r.get(0),
            )
            .optional()
            .map(|v| v.unwrap_or(false))
            .map_err(JournalError::from_sqlite)
    }
}

fn txn_state(conn: &Connection, id: Uuid) -> Result<TxnState> {
    let s: Option<String> = conn
        .query_row(
            "SELECT state FROM txns WHERE id = ?1",
            params![id.to_string()],
            |r| r.get(0),
        )
        .optional()
        .map_err(JournalError::from_sqlite)?;
    match s {
        Some(s) => TxnState::parse(&s),
        None => Err(JournalError::decode(
            "transaction",
            format!("{id} does not exist"),
        )),
    }
}

/// Insert a transaction row in `state` (a finished one gets `finished_at`).
fn insert_txn(conn: &Connection, t: &NewTxn<'_>, state: TxnState, ts: &str) -> Result<()> {
    let mut stmt = conn
        .prepare(
            "INSERT INTO txns (id, domain, kind, state, chain_json, target_json, before_json, owner_pid, \
             owner_boot_id, owner_start, started_at, updated_at, finished_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?11, ?12)",
        )
        .map_err(JournalError::from_sqlite)?;
    // The JSON of a long chain is megabytes and SQLite keeps its own copy of
    // what is bound: each document is bound as soon as it is made and
    // dropped at once, so no two of ours are alive next to SQLite's copies.
    let bind = |stmt: &mut rusqlite::Statement<'_>, i: usize, v: &dyn rusqlite::ToSql| {
        stmt.raw_bind_parameter(i, v)
            .map_err(JournalError::from_sqlite)
    };
    bind(&mut stmt, 1, &t.id.to_string())?;
    bind(&mut stmt, 2, &t.domain)?;
    bind(&mut stmt, 3, &t.kind.as_str())?;
    bind(&mut stmt, 4, &state.as_str())?;
    bind(&mut stmt, 5, &t.chain.map(to_json))?;
    bind(&mut stmt, 6, &to_json(&t.target))?;
    bind(&mut stmt, 7, &to_json(&t.before))?;
    bind(&mut stmt, 8, &t.owner.pid)?;
    bind(&mut stmt, 9, &t.owner.boot_id)?;
    bind(&mut stmt, 10, &(t.owner.start as i64))?;
    bind(&mut stmt, 11, &ts)?;
    bind(&mut stmt, 12, &(!state.is_open()).then_some(ts))?;
    stmt.raw_execute()
        .map(|_| ())
        .map_err(JournalError::from_sqlite)
}

/// Make a transaction's target its domain's committed chain, copying the
/// stored JSON as it is (a long chain is megabytes: never decoded here).
fn commit_target(conn: &Connection, txn: Uuid, ts: &str) -> Result<()> {
    conn.execute(
        "INSERT INTO domains (domain, chain_json, defs_json, txn_id, committed_at) \
         SELECT domain, chain_json, target_json, id, ?2 FROM txns WHERE id = ?1 \
         ON CONFLICT(domain) DO UPDATE SET chain_json = excluded.chain_json, defs_json = excluded.defs_json, \
         txn_id = excluded.txn_id, committed_at = excluded.committed_at",
        params![txn.to_string(), ts],
    )
    .map(|_| ())
    .map_err(JournalError::from_sqlite)
}

/// Keep the newest `keep` finished transactions of a domain; open ones are
/// never pruned.
fn prune(conn: &Connection, domain: &str, keep: usize) -> Result<()> {
    conn.execute(
        "DELETE FROM txns WHERE domain = ?1 AND state IN ('committed', 'rolled_back') AND rowid NOT IN \
         (SELECT rowid FROM txns WHERE domain = ?1 AND state IN ('committed', 'rolled_back') \
          ORDER BY rowid DESC LIMIT ?2)",
        params![domain, keep as i64],
    )
    .map(|_| ())
    .map_err(JournalError::from_sqlite)
}
