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
//! `migrate.rs` (the schema's numbered migrations); this file holds
//! [`Journal`]: opening it with its asserted settings, and the commit
//! without fsync.

mod error;
mod migrate;
mod queries;
mod steps;
mod txns;
mod types;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rusqlite::Connection;
use serde::Serialize;

pub use error::JournalError;
#[cfg(feature = "testing")]
pub use migrate::{Migration, MIGRATIONS, SCHEMA_VERSION};
pub use types::{
    Begin, Committed, JournalOptions, NewStep, NewTxn, StepOp, StepPhase, StepRecord, TxnEvent,
    TxnKind, TxnRecord, TxnState, TxnSummary,
};

type Result<T> = std::result::Result<T, JournalError>;

/// The journal. Share it between threads by reference; several processes
/// may open the same file.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn to_json<T: Serialize>(v: &T) -> String {
    // Serialising plain data structures to a String cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| JournalError::decode(what, e))
}

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
        let deadline = std::time::Instant::now() + opts.busy_timeout;
        loop {
            match Journal::try_open(path, opts) {
                Err(JournalError::Locked { .. }) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn try_open(path: &Path, opts: &JournalOptions) -> Result<Journal> {
        if !path.exists() {
            // Create the file ourselves so it is 0600 from its first byte;
            // SQLite gives the -wal and -shm files the same mode.
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
            {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                    return Err(JournalError::ReadOnly {
                        detail: format!("{}: {e}", path.display()),
                    })
                }
                Err(e) => {
                    return Err(JournalError::Io {
                        detail: format!("{}: {e}", path.display()),
                    })
                }
            }
        } else if fs::metadata(path).map(|m| m.is_dir()).unwrap_or(false) {
            return Err(JournalError::Io {
                detail: format!("{} is a directory", path.display()),
            });
        }
        let mut conn = Connection::open(path).map_err(JournalError::from_sqlite)?;
        conn.busy_timeout(opts.busy_timeout)
            .map_err(JournalError::from_sqlite)?;
        // Refuse a newer schema before changing anything in the file.
        migrate::check_not_newer(&conn)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(JournalError::from_sqlite)?;
        expect("journal_mode", "wal", &mode.to_lowercase())?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(JournalError::from_sqlite)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(JournalError::from_sqlite)?;
        if let Some(max) = opts.max_page_count {
            conn.query_row(&format!("PRAGMA max_page_count={max}"), [], |_| Ok(()))
                .map_err(JournalError::from_sqlite)?;
        }
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .map_err(JournalError::from_sqlite)?;
        expect("synchronous", "2", &sync.to_string())?;
        let fk: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .map_err(JournalError::from_sqlite)?;
        expect("foreign_keys", "1", &fk.to_string())?;
        let bt: i64 = conn
            .query_row("PRAGMA busy_timeout", [], |r| r.get(0))
            .map_err(JournalError::from_sqlite)?;
        expect(
            "busy_timeout",
            &opts.busy_timeout.as_millis().to_string(),
            &bt.to_string(),
        )?;
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
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `PRAGMA integrity_check`: `"ok"` when the file is sound.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    #[cfg(any(test, feature = "testing"))]
    pub fn integrity_check(&self) -> Result<String> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("PRAGMA integrity_check")
            .map_err(JournalError::from_sqlite)?;
        let rows: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(JournalError::from_sqlite)?
            .collect::<std::result::Result<_, _>>()
            .map_err(JournalError::from_sqlite)?;
        Ok(rows.join("\n"))
    }
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
        .map_err(JournalError::from_sqlite)?;
    let result = f(conn);
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(JournalError::from_sqlite)?;
    result
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

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::owner::Owner;

    fn synchronous(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    /// A journal holding one open transaction of two steps.
    pub(in crate::journal) fn journal_with_txn(dir: &Path) -> (Journal, Uuid) {
        let j = Journal::open(&dir.join("journal.db")).unwrap();
        let owner = Owner {
            pid: 1,
            boot_id: "test".into(),
            start: 1,
        };
        let step = NewStep {
            op: StepOp::Delete,
            checkpoint: "c".into(),
            xml: None,
            before: None,
        };
        let id = Uuid::new_v4();
        let new = NewTxn {
            id,
            domain: "d",
            kind: TxnKind::Sync,
            chain: None,
            target: &[],
            before: &[],
            owner: &owner,
            steps: &[step.clone(), step],
        };
        assert_eq!(j.begin(new).unwrap(), Begin::Started);
        (j, id)
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
            Err(JournalError::Io {
                detail: "failed inside".into(),
            })
        });
        assert!(matches!(r, Err(JournalError::Io { .. })));
        assert_eq!(synchronous(&conn), 2, "FULL after a failed commit");
    }
}
