//! The journal: one SQLite file in WAL mode with `synchronous=FULL`, holding
//! each domain's committed chain, every transaction with its target and
//! before-image, its steps, and the history. Marking a step done is the one
//! commit that does not wait for the disk (see [`Journal::step_done`]), and
//! it never writes the transaction's row, which holds the whole chain: the
//! call counter lives in a small row of its own (`txn_progress`).
//!
//! Architecture invariant: this module knows nothing of backends. It stores
//! and answers; the engine decides.
//!
//! The code map: `types.rs` (transaction kinds and states with the one
//! transition function, steps, records, what the engine hands in, options),
//! `error.rs` ([`JournalError`]), `txns.rs` (a transaction's intent, state
//! changes, end and owner), `steps.rs` (steps and the count of libvirt
//! calls), `queries.rs` (what the engine and the command read back),
//! `migrate.rs` (the schema's numbered migrations), `counters.rs` (the
//! monotonic transaction counters and what `metrics` reads),
//! `validations.rs` (each domain's last validate report); this file holds
//! [`Journal`]: opening it with its asserted settings, and the commit
//! without fsync.

mod counters;
mod docs;
mod error;
mod migrate;
mod queries;
mod steps;
mod txns;
mod types;
mod validations;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::{SecondsFormat, Utc};
use rusqlite::types::{Type, ValueRef};
use rusqlite::{Connection, OptionalExtension, Params, Row, Transaction, TransactionBehavior};
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

pub(crate) use counters::{kind_name, TXN_KINDS};
#[cfg(feature = "testing")]
pub use counters::{CommittedSize, Counter, MetricsSnapshot, Validation};
pub use error::{JournalError, SqliteCause};
#[cfg(feature = "testing")]
pub use migrate::{Migration, MIGRATIONS, SCHEMA_VERSION};
pub use types::{
    Begin, Committed, JournalOptions, NewStep, NewTxn, StepOp, StepPhase, StepRecord, TxnEvent,
    TxnKind, TxnRecord, TxnState, TxnSummary,
};

use error::{SqlContext, Unreadable};

type Result<T> = std::result::Result<T, JournalError>;

/// The journal. Share it between threads by reference; several processes
/// may open the same file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    conn: Mutex<Connection>,
}

/// Prepared statements kept per connection: every query of the journal
/// (about 20) stays prepared, those of a step above all.
const STATEMENT_CACHE: usize = 32;

impl Journal {
    /// Open (creating with mode 0600 if absent) and migrate the journal at
    /// `path`, asserting WAL, `synchronous=FULL`, foreign keys and the busy
    /// timeout.
    ///
    /// # Errors
    ///
    /// [`JournalError::NewerSchema`] (file untouched), `Corrupt`, `ReadOnly`,
    /// `Io`, `Setting` when a durability setting did not take effect.
    #[cfg(any(test, feature = "testing"))]
    pub fn open(path: &Path) -> Result<Journal> {
        Journal::open_with(path, &JournalOptions::default())
    }

    /// [`Journal::open`] with options.
    ///
    /// # Errors
    ///
    /// As [`Journal::open`].
    pub fn open_with(path: &Path, opts: &JournalOptions) -> Result<Journal> {
        // Several processes opening a new journal at once race for the
        // switch to WAL and the first migration; SQLite answers some of
        // those races with "database is locked" without waiting for the
        // busy timeout, so the whole opening is retried within it.
        let deadline = Instant::now() + opts.busy_timeout;
        loop {
            match Journal::try_open(path, opts) {
                Err(JournalError::Locked { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn try_open(path: &Path, opts: &JournalOptions) -> Result<Journal> {
        create_0600(path)?;
        let mut conn = Connection::open(path).sql("open")?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.busy_timeout(opts.busy_timeout)
            .sql("PRAGMA busy_timeout")?;
        // Refuse a newer schema before changing anything in the file.
        migrate::check_not_newer(&conn)?;
        set_durability(&conn, opts)?;
        migrate::migrate(&mut conn)?;
        Ok(Journal {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    /// The journal's file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while the lock was held rolled back its SQLite transaction
        // (the guard's drop); the connection itself is still sound.
        self.conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Run `work` in one write transaction and commit it durably.
    fn write<T>(&self, work: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        write(&mut self.conn(), work)
    }

    /// [`Journal::write`] for progress only: committed without waiting for
    /// the disk (see [`without_fsync`]).
    fn write_progress<T>(&self, work: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
        without_fsync(&mut self.conn(), |conn| write(conn, work))
    }

    /// `PRAGMA integrity_check`: `"ok"` when the file is sound.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    #[cfg(any(test, feature = "testing"))]
    pub fn integrity_check(&self) -> Result<String> {
        let rows: Vec<String> = self
            .conn()
            .all("PRAGMA integrity_check", [], |r| r.get(0))?;
        Ok(rows.join("\n"))
    }
}

/// Create the file ourselves so it is 0600 from its first byte (SQLite
/// gives the -wal and -shm files the same mode); refuse a directory.
fn create_0600(path: &Path) -> Result<()> {
    if path.exists() {
        if fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            return Err(JournalError::io(format!(
                "{} is a directory",
                path.display()
            )));
        }
        return Ok(());
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(JournalError::ReadOnly {
            detail: format!("{}: {e}", path.display()),
            cause: None,
        }),
        Err(e) => Err(JournalError::io(format!("{}: {e}", path.display()))),
    }
}

/// Switch to WAL with `synchronous=FULL` and foreign keys, then read every
/// setting back: one that did not take effect is a [`JournalError::Setting`].
fn set_durability(conn: &Connection, opts: &JournalOptions) -> Result<()> {
    let mode: String = conn.one("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    expect("journal_mode", "wal", &mode.to_lowercase())?;
    conn.pragma_update(None, "synchronous", "FULL")
        .sql("PRAGMA synchronous = FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")
        .sql("PRAGMA foreign_keys = ON")?;
    if let Some(max) = opts.max_page_count {
        conn.query_row(&format!("PRAGMA max_page_count={max}"), [], |_| Ok(()))
            .sql("PRAGMA max_page_count")?;
    }
    let setting = |sql: &'static str| -> Result<String> {
        conn.one(sql, [], |r| r.get::<_, i64>(0))
            .map(|v| v.to_string())
    };
    expect("synchronous", "2", &setting("PRAGMA synchronous")?)?;
    expect("foreign_keys", "1", &setting("PRAGMA foreign_keys")?)?;
    expect(
        "busy_timeout",
        &opts.busy_timeout.as_millis().to_string(),
        &setting("PRAGMA busy_timeout")?,
    )
}

fn expect(name: &'static str, expected: &str, found: &str) -> Result<()> {
    if expected == found {
        Ok(())
    } else {
        Err(JournalError::Setting {
            name,
            expected: expected.into(),
            found: found.into(),
        })
    }
}

/// Run `work` in one write transaction (`BEGIN IMMEDIATE`: the write lock
/// first, so that what it reads cannot change before it writes) and commit
/// it. An error rolls everything back.
fn write<T>(conn: &mut Connection, work: impl FnOnce(&Transaction<'_>) -> Result<T>) -> Result<T> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .sql("BEGIN IMMEDIATE")?;
    let out = work(&tx)?;
    tx.commit().sql("COMMIT")?;
    Ok(out)
}

/// Run `f`, whose commit need not be durable at once, with
/// `synchronous=NORMAL`: in WAL mode the commit is written to the WAL but
/// not synced, and the next `FULL` commit (or checkpoint) syncs it along.
/// `FULL` is set back before the connection's lock is released, whatever
/// `f` returned, so every other commit stays durable.
fn without_fsync<T>(
    conn: &mut Connection,
    f: impl FnOnce(&mut Connection) -> Result<T>,
) -> Result<T> {
    conn.pragma_update(None, "synchronous", "NORMAL")
        .sql("PRAGMA synchronous = NORMAL")?;
    let result = f(conn);
    conn.pragma_update(None, "synchronous", "FULL")
        .sql("PRAGMA synchronous = FULL")?;
    result
}

/// The journal's queries: each through the connection's statement cache,
/// each failure a [`JournalError`] that names its SQL. (A transaction is a
/// connection too.)
trait Sql {
    /// Run a statement; the rows it changed.
    fn exec(&self, sql: &'static str, params: impl Params) -> Result<usize>;
    /// The one row of a query, read by `read`.
    fn one<T>(
        &self,
        sql: &'static str,
        params: impl Params,
        read: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<T>;
    /// The first row of a query, if any.
    fn first<T>(
        &self,
        sql: &'static str,
        params: impl Params,
        read: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>>;
    /// Every row of a query.
    fn all<T>(
        &self,
        sql: &'static str,
        params: impl Params,
        read: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>>;
}

impl Sql for Connection {
    fn exec(&self, sql: &'static str, params: impl Params) -> Result<usize> {
        self.prepare_cached(sql)
            .and_then(|mut stmt| stmt.execute(params))
            .sql(sql)
    }

    fn one<T>(
        &self,
        sql: &'static str,
        params: impl Params,
        read: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<T> {
        self.prepare_cached(sql)
            .and_then(|mut stmt| stmt.query_row(params, read))
            .sql(sql)
    }

    fn first<T>(
        &self,
        sql: &'static str,
        params: impl Params,
        read: impl FnOnce(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Option<T>> {
        self.prepare_cached(sql)
            .and_then(|mut stmt| stmt.query_row(params, read))
            .optional()
            .sql(sql)
    }

    fn all<T>(
        &self,
        sql: &'static str,
        params: impl Params,
        read: impl FnMut(&Row<'_>) -> rusqlite::Result<T>,
    ) -> Result<Vec<T>> {
        self.prepare_cached(sql)
            .and_then(|mut stmt| stmt.query_map(params, read)?.collect())
            .sql(sql)
    }
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Serialising plain data structures to a String cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

/// Column `col` of a row, JSON read in place (a chain is megabytes: never
/// copied first); NULL reads as JSON `null`, `None` for an `Option`. A value
/// that does not parse is unreadable: `what: why`.
fn json<T: DeserializeOwned>(r: &Row<'_>, col: &str, what: &'static str) -> rusqlite::Result<T> {
    let idx = r.as_ref().column_index(col)?;
    let value = r.get_ref(idx)?;
    let text = match value {
        // Documents written in pieces are BLOBs of UTF-8 JSON (`docs`).
        ValueRef::Text(t) | ValueRef::Blob(t) => t,
        ValueRef::Null => b"null",
        other => {
            return Err(rusqlite::Error::InvalidColumnType(
                idx,
                col.into(),
                other.data_type(),
            ))
        }
    };
    serde_json::from_slice(text).map_err(|e| Unreadable::new(what, e).at(idx, value.data_type()))
}

/// Column `col` of a row, a transaction id.
fn txn_id(r: &Row<'_>, col: &str) -> rusqlite::Result<Uuid> {
    let idx = r.as_ref().column_index(col)?;
    let text: String = r.get(idx)?;
    Uuid::parse_str(&text).map_err(|e| Unreadable::new("transaction id", e).at(idx, Type::Text))
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::chain::CheckpointDef;
    use crate::owner::Owner;

    fn synchronous(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    /// A journal holding one open transaction of two steps.
    pub(in crate::journal) fn journal_with_txn(dir: &Path) -> (Journal, Uuid) {
        let j = Journal::open(&dir.join("journal.db")).unwrap();
        let step = NewStep {
            op: StepOp::Delete,
            checkpoint: "c".into(),
            xml: None,
            before: None,
            detail: None,
        };
        let id = begin(&j, &[], &[], &[step.clone(), step]);
        (j, id)
    }

    /// A new open sync of domain `d`, begun: its id.
    pub(in crate::journal) fn begin(
        j: &Journal,
        target: &[CheckpointDef],
        before: &[CheckpointDef],
        steps: &[NewStep],
    ) -> Uuid {
        let owner = Owner {
            pid: 1,
            boot_id: "test".into(),
            start: 1,
        };
        let id = Uuid::new_v4();
        let new = NewTxn {
            id,
            domain: "d",
            kind: TxnKind::Sync,
            chain: None,
            target,
            before,
            owner: &owner,
            steps,
        };
        assert_eq!(j.begin(new).unwrap(), Begin::Started);
        id
    }

    #[test]
    fn only_progress_skips_the_fsync_and_full_is_back_even_after_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (j, txn) = journal_with_txn(dir.path());
        j.step_done(txn, StepPhase::Apply, 0).unwrap();
        assert_eq!(synchronous(&j.conn()), 2, "FULL after a step");
        let mut conn = j.conn();
        let r: Result<()> = without_fsync(&mut conn, |c| {
            assert_eq!(synchronous(c), 1, "NORMAL inside");
            Err(JournalError::io("failed inside".into()))
        });
        assert!(matches!(r, Err(JournalError::Io { .. })));
        assert_eq!(synchronous(&conn), 2, "FULL after a failed commit");
    }
}
