//! Reading the journal: one transaction, the open ones, summaries with
//! progress for status and history, and each domain's committed chain.

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::{from_json, Journal, JournalError, Result};
use super::{Committed, TxnKind, TxnRecord, TxnState, TxnSummary};
use crate::owner::Owner;

impl Journal {
    /// One transaction.
    ///
    /// # Errors
    ///
    /// SQLite errors; `Decode` when it does not exist.
    pub fn txn(&self, id: Uuid) -> Result<TxnRecord> {
        get_txn(&self.conn(), id)
    }

    /// Open transactions (all domains, or one), oldest first.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn incomplete(&self, domain: Option<&str>) -> Result<Vec<TxnRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(&format!(
                "SELECT {TXN_COLS} FROM txns WHERE state IN ('applying', 'rolling_back') \
                 AND (?1 IS NULL OR domain = ?1) ORDER BY rowid"
            ))
            .map_err(JournalError::from_sqlite)?;
        let rows = stmt
            .query_map(params![domain], read_txn_row)
            .map_err(JournalError::from_sqlite)?;
        rows.map(|r| r.map_err(JournalError::from_sqlite).and_then(decode_txn))
            .collect()
    }

    /// Summaries with progress of the open transactions.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn incomplete_summaries(&self, domain: Option<&str>) -> Result<Vec<TxnSummary>> {
        self.summaries(
            "state IN ('applying', 'rolling_back') AND (?1 IS NULL OR domain = ?1)",
            domain,
            None,
        )
    }

    /// A domain's transactions, newest first, at most `limit`.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn history(&self, domain: &str, limit: usize) -> Result<Vec<TxnSummary>> {
        self.summaries("domain = ?1", Some(domain), Some(limit))
    }

    fn summaries(
        &self,
        filter: &str,
        domain: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<TxnSummary>> {
        let conn = self.conn();
        let (order, lim) = match limit {
            Some(n) => ("rowid DESC", format!("LIMIT {n}")),
            None => ("rowid", String::new()),
        };
        let sql = format!(
            "SELECT t.id, t.domain, t.kind, t.state, t.owner_pid, t.owner_boot_id, t.owner_start, \
             (SELECT COUNT(*) FROM steps s WHERE s.txn_id = t.id AND s.phase = \
                 CASE t.state WHEN 'rolling_back' THEN 'rollback' WHEN 'rolled_back' THEN 'rollback' ELSE 'apply' END \
                 AND s.state = 'done'), \
             (SELECT COUNT(*) FROM steps s WHERE s.txn_id = t.id AND s.phase = \
                 CASE t.state WHEN 'rolling_back' THEN 'rollback' WHEN 'rolled_back' THEN 'rollback' ELSE 'apply' END), \
             json_array_length(t.target_json), t.started_at, t.finished_at, t.error, \
             t.libvirt_calls + COALESCE((SELECT p.calls FROM txn_progress p WHERE p.txn_id = t.id), 0) \
             FROM txns t WHERE {filter} ORDER BY {order} {lim}"
        );
        let mut stmt = conn
            .prepare_cached(&sql)
            .map_err(JournalError::from_sqlite)?;
        let rows = stmt
            .query_map(params![domain], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    Owner {
                        pid: r.get(4)?,
                        boot_id: r.get(5)?,
                        start: r.get::<_, i64>(6)? as u64,
                    },
                    r.get::<_, i64>(7)? as u64,
                    r.get::<_, i64>(8)? as u64,
                    r.get::<_, i64>(9)? as u64,
                    r.get::<_, String>(10)?,
                    r.get::<_, Option<String>>(11)?,
                    r.get::<_, Option<String>>(12)?,
                    r.get::<_, i64>(13)? as u64,
                ))
            })
            .map_err(JournalError::from_sqlite)?;
        let mut out = Vec::new();
        for row in rows {
            let (
                id,
                domain,
                kind,
                state,
                owner,
                done,
                total,
                target_len,
                started_at,
                finished_at,
                error,
                calls,
            ) = row.map_err(JournalError::from_sqlite)?;
            out.push(TxnSummary {
                id: Uuid::parse_str(&id).map_err(|e| JournalError::decode("transaction id", e))?,
                domain,
                kind: TxnKind::parse(&kind)?,
                state: TxnState::parse(&state)?,
                owner,
                done,
                total,
                target_len,
                started_at,
                finished_at,
                error,
                libvirt_calls: calls,
            });
        }
        Ok(out)
    }

    /// A domain's last committed chain.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn committed(&self, domain: &str) -> Result<Option<Committed>> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT domain, chain_json, defs_json, txn_id, committed_at FROM domains WHERE domain = ?1",
                params![domain],
                read_committed_row,
            )
            .optional()
            .map_err(JournalError::from_sqlite)?;
        row.map(decode_committed).transpose()
    }

    /// Every domain's committed chain, by domain name.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn all_committed(&self) -> Result<Vec<Committed>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT domain, chain_json, defs_json, txn_id, committed_at FROM domains ORDER BY domain")
            .map_err(JournalError::from_sqlite)?;
        let rows = stmt
            .query_map([], read_committed_row)
            .map_err(JournalError::from_sqlite)?;
        rows.map(|r| {
            r.map_err(JournalError::from_sqlite)
                .and_then(decode_committed)
        })
        .collect()
    }
}

/// The columns of a [`TxnRecord`], selected `FROM txns`; the call count and
/// the last change add the row's `txn_progress`.
const TXN_COLS: &str = "id, domain, kind, state, chain_json, target_json, before_json, owner_pid, owner_boot_id, \
     owner_start, started_at, \
     MAX(updated_at, COALESCE((SELECT p.updated_at FROM txn_progress p WHERE p.txn_id = txns.id), '')), \
     finished_at, error, \
     libvirt_calls + COALESCE((SELECT p.calls FROM txn_progress p WHERE p.txn_id = txns.id), 0)";

type TxnRow = (
    String,
    String,
    String,
    String,
    Option<String>,
    String,
    String,
    u32,
    String,
    i64,
    String,
    String,
    Option<String>,
    Option<String>,
    i64,
);

fn read_txn_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<TxnRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
        r.get(14)?,
    ))
}

fn decode_txn(row: TxnRow) -> Result<TxnRecord> {
    let (
        id,
        domain,
        kind,
        state,
        chain,
        target,
        before,
        pid,
        boot_id,
        start,
        started_at,
        updated_at,
        finished_at,
        error,
        calls,
    ) = row;
    Ok(TxnRecord {
        id: Uuid::parse_str(&id).map_err(|e| JournalError::decode("transaction id", e))?,
        domain,
        kind: TxnKind::parse(&kind)?,
        state: TxnState::parse(&state)?,
        chain: chain.map(|c| from_json("chain", &c)).transpose()?,
        target: from_json("target", &target)?,
        before: from_json("before-image", &before)?,
        owner: Owner {
            pid,
            boot_id,
            start: start as u64,
        },
        started_at,
        updated_at,
        finished_at,
        error,
        libvirt_calls: calls as u64,
    })
}

fn get_txn(conn: &Connection, id: Uuid) -> Result<TxnRecord> {
    let row = conn
        .query_row(
            &format!("SELECT {TXN_COLS} FROM txns WHERE id = ?1"),
            params![id.to_string()],
            read_txn_row,
        )
        .optional()
        .map_err(JournalError::from_sqlite)?;
    match row {
        Some(r) => decode_txn(r),
        None => Err(JournalError::decode(
            "transaction",
            format!("{id} does not exist"),
        )),
    }
}

pub(super) fn open_txn(conn: &Connection, domain: &str) -> Result<Option<TxnRecord>> {
    let row = conn
        .query_row(
            &format!("SELECT {TXN_COLS} FROM txns WHERE domain = ?1 AND state IN ('applying', 'rolling_back')"),
            params![domain],
            read_txn_row,
        )
        .optional()
        .map_err(JournalError::from_sqlite)?;
    row.map(decode_txn).transpose()
}

type CommittedRow = (String, Option<String>, String, String, String);

fn read_committed_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<CommittedRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn decode_committed(row: CommittedRow) -> Result<Committed> {
    let (domain, chain, defs, txn, committed_at) = row;
    Ok(Committed {
        domain,
        chain: chain
            .map(|c| from_json("committed chain", &c))
            .transpose()?,
        defs: from_json("committed definitions", &defs)?,
        txn: Uuid::parse_str(&txn).map_err(|e| JournalError::decode("transaction id", e))?,
        committed_at,
    })
}
