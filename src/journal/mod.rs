//! The journal: one SQLite file in WAL mode with `synchronous=FULL`, holding
//! each domain's committed chain, every transaction with its target and
//! before-image, its steps, and the history. Marking a step done is the one
//! commit that does not wait for the disk (see [`Journal::step_done`]), and
//! it never writes the transaction's row, which holds the whole chain: the
//! call counter lives in a small row of its own (`txn_progress`).
//!
//! Architecture invariant: this module knows nothing of backends. It stores
//! and answers; the engine decides.

mod migrate;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[cfg(feature = "testing")]
pub use migrate::{Migration, MIGRATIONS, SCHEMA_VERSION};

use crate::chain::{Chain, CheckpointDef};
use crate::owner::Owner;

/// Why the journal cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The file is not a SQLite database, or is damaged.
    #[error("journal is corrupt: {detail}")]
    Corrupt {
        /// SQLite's message.
        detail: String,
    },
    /// The file was written by a newer ckptstore; it was left untouched.
    #[error(
        "journal has schema version {found}, newer than the {supported} this ckptstore understands"
    )]
    NewerSchema {
        /// Version in the file.
        found: u32,
        /// Newest version this build writes.
        supported: u32,
    },
    /// The file or its folder cannot be written.
    #[error("journal is read-only: {detail}")]
    ReadOnly {
        /// SQLite's or the OS's message.
        detail: String,
    },
    /// The disk (or the journal's page limit) is full.
    #[error("journal is full: {detail}")]
    Full {
        /// SQLite's message.
        detail: String,
    },
    /// Another process held the database lock longer than the busy timeout.
    #[error("journal is locked by another process: {detail}")]
    Locked {
        /// SQLite's message.
        detail: String,
    },
    /// The file cannot be opened or read.
    #[error("journal I/O error: {detail}")]
    Io {
        /// The OS's or SQLite's message.
        detail: String,
    },
    /// A durability setting did not take effect.
    #[error("journal setting {name} is {found}, expected {expected}")]
    Setting {
        /// The pragma.
        name: &'static str,
        /// What was asked for.
        expected: String,
        /// What SQLite reports.
        found: String,
    },
    /// A migration failed (and was rolled back).
    #[error("journal migration {name} failed: {detail}")]
    Migration {
        /// The migration file.
        name: &'static str,
        /// SQLite's message.
        detail: String,
    },
    /// A stored value could not be decoded.
    #[error("journal holds an unreadable value: {detail}")]
    Decode {
        /// What could not be read.
        detail: String,
    },
    /// Any other SQLite error.
    #[error("journal error: {detail}")]
    Sqlite {
        /// SQLite's message.
        detail: String,
    },
}

impl JournalError {
    pub(crate) fn from_sqlite(e: rusqlite::Error) -> JournalError {
        let detail = e.to_string();
        match e.sqlite_error_code() {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                JournalError::Corrupt { detail }
            }
            Some(ErrorCode::ReadOnly) => JournalError::ReadOnly { detail },
            Some(ErrorCode::DiskFull) => JournalError::Full { detail },
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                JournalError::Locked { detail }
            }
            Some(
                ErrorCode::CannotOpen | ErrorCode::SystemIoFailure | ErrorCode::PermissionDenied,
            ) => JournalError::Io { detail },
            _ => JournalError::Sqlite { detail },
        }
    }

    /// What to do about it, in one sentence.
    pub fn hint(&self) -> &'static str {
        match self {
            JournalError::Corrupt { .. } | JournalError::Decode { .. } => {
                "move it aside (keep it for a post-mortem) and run `ckptstore import --domain D` for each domain to rebuild it"
            }
            JournalError::NewerSchema { .. } => {
                "use the newer ckptstore that wrote it; the file was left untouched"
            }
            JournalError::ReadOnly { .. } | JournalError::Io { .. } => {
                "make the file and its folder writable by this user, or pass --db PATH"
            }
            JournalError::Full { .. } => "free space on the journal's file system, then retry",
            JournalError::Locked { .. } => {
                "another process holds the journal's lock: retry when it is done"
            }
            JournalError::Setting { .. }
            | JournalError::Migration { .. }
            | JournalError::Sqlite { .. } => "check the journal file, or pass --db PATH to use another",
        }
    }

    fn decode(what: &str, e: impl std::fmt::Display) -> JournalError {
        JournalError::Decode {
            detail: format!("{what}: {e}"),
        }
    }
}

type Result<T> = std::result::Result<T, JournalError>;

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

    fn parse(s: &str) -> Result<TxnState> {
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
    fn as_str(self) -> &'static str {
        match self {
            TxnKind::Sync => "sync",
            TxnKind::Resync => "resync",
            TxnKind::Import => "import",
        }
    }

    fn parse(s: &str) -> Result<TxnKind> {
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
    fn as_str(self) -> &'static str {
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

    /// Mark one step done and count its libvirt call.
    ///
    /// This is the one commit that does not wait for the disk: a step's
    /// state is a cache of progress that may lag behind libvirt (recovery
    /// compares libvirt's checkpoints with the target by content), so it is
    /// committed with `synchronous=NORMAL`. A crash of the process loses
    /// nothing; a power loss may lose the last steps marked done, never the
    /// intent (committed durably before the first call) and never a step
    /// older than the last durable commit, which syncs the whole WAL.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn step_done(&self, txn: Uuid, phase: StepPhase, seq: u32) -> Result<()> {
        let mut conn = self.conn();
        without_fsync(&mut conn, |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(JournalError::from_sqlite)?;
            tx.execute(
                "UPDATE steps SET state = 'done' WHERE txn_id = ?1 AND phase = ?2 AND seq = ?3",
                params![txn.to_string(), phase.as_str(), seq],
            )
            .map_err(JournalError::from_sqlite)?;
            count(&tx, txn)?;
            tx.commit().map_err(JournalError::from_sqlite)
        })
    }

    /// Mark steps done that libvirt showed are no longer needed (no call).
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn mark_observed(&self, txn: Uuid, phase: StepPhase, seqs: &[u32]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(JournalError::from_sqlite)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "UPDATE steps SET state = 'done' WHERE txn_id = ?1 AND phase = ?2 AND seq = ?3",
                )
                .map_err(JournalError::from_sqlite)?;
            for seq in seqs {
                stmt.execute(params![txn.to_string(), phase.as_str(), seq])
                    .map_err(JournalError::from_sqlite)?;
            }
        }
        tx.commit().map_err(JournalError::from_sqlite)
    }

    /// Remove pending steps a new plan no longer makes (they were never
    /// called), so that the journal's steps stay the calls in the order they
    /// are made.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn drop_steps(&self, txn: Uuid, phase: StepPhase, seqs: &[u32]) -> Result<()> {
        if seqs.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(JournalError::from_sqlite)?;
        {
            let mut stmt = tx
                .prepare_cached(
                    "DELETE FROM steps WHERE txn_id = ?1 AND phase = ?2 AND seq = ?3 \
                     AND state = 'pending'",
                )
                .map_err(JournalError::from_sqlite)?;
            for seq in seqs {
                stmt.execute(params![txn.to_string(), phase.as_str(), seq])
                    .map_err(JournalError::from_sqlite)?;
            }
        }
        tx.commit().map_err(JournalError::from_sqlite)
    }

    /// Count a libvirt call whose step could not be marked done (it failed
    /// or its outcome is unknown).
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn count_call(&self, txn: Uuid) -> Result<()> {
        count(&self.conn(), txn)
    }

    /// Append steps to a phase (recovery found more to do than planned, or a
    /// rollback was planned). Returns the sequence numbers given.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn add_steps(&self, txn: Uuid, phase: StepPhase, steps: &[NewStep]) -> Result<Vec<u32>> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(JournalError::from_sqlite)?;
        let next: u32 = tx
            .query_row(
                "SELECT COALESCE(MAX(seq) + 1, 0) FROM steps WHERE txn_id = ?1 AND phase = ?2",
                params![txn.to_string(), phase.as_str()],
                |r| r.get(0),
            )
            .map_err(JournalError::from_sqlite)?;
        let seqs = insert_steps(&tx, txn, phase, next, steps)?;
        tx.commit().map_err(JournalError::from_sqlite)?;
        Ok(seqs)
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

    /// One transaction.
    ///
    /// # Errors
    ///
    /// SQLite errors; `Decode` when it does not exist.
    pub fn txn(&self, id: Uuid) -> Result<TxnRecord> {
        get_txn(&self.conn(), id)
    }

    /// A transaction's steps of one phase, in order.
    ///
    /// # Errors
    ///
    /// SQLite errors.
    pub fn steps(&self, txn: Uuid, phase: StepPhase) -> Result<Vec<StepRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT seq, op, checkpoint, xml, before_json, state FROM steps \
                 WHERE txn_id = ?1 AND phase = ?2 ORDER BY seq",
            )
            .map_err(JournalError::from_sqlite)?;
        let rows = stmt
            .query_map(params![txn.to_string(), phase.as_str()], |r| {
                Ok((
                    r.get::<_, u32>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(JournalError::from_sqlite)?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, op, checkpoint, xml, before, state) =
                row.map_err(JournalError::from_sqlite)?;
            let op = match op.as_str() {
                "delete" => StepOp::Delete,
                "redefine" => StepOp::Redefine,
                other => return Err(JournalError::decode("step op", other)),
            };
            let before = before
                .map(|b| from_json("step before-image", &b))
                .transpose()?;
            out.push(StepRecord {
                phase,
                seq,
                step: NewStep {
                    op,
                    checkpoint,
                    xml,
                    before,
                },
                done: state == "done",
            });
        }
        Ok(out)
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

/// The columns of a [`TxnRecord`], selected `FROM txns`; the call count and
/// the last change add the row's `txn_progress`.
const TXN_COLS: &str = "id, domain, kind, state, chain_json, target_json, before_json, owner_pid, owner_boot_id, \
     owner_start, started_at, \
     MAX(updated_at, COALESCE((SELECT p.updated_at FROM txn_progress p WHERE p.txn_id = txns.id), '')), \
     finished_at, error, \
     libvirt_calls + COALESCE((SELECT p.calls FROM txn_progress p WHERE p.txn_id = txns.id), 0)";

/// Count one libvirt call of a transaction (in its own small row: the
/// transaction's row is left alone).
fn count(conn: &Connection, txn: Uuid) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO txn_progress (txn_id, calls, updated_at) VALUES (?1, 1, ?2) \
         ON CONFLICT(txn_id) DO UPDATE SET calls = calls + 1, updated_at = excluded.updated_at",
    )
    .and_then(|mut stmt| stmt.execute(params![txn.to_string(), now()]))
    .map(|_| ())
    .map_err(JournalError::from_sqlite)
}

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

fn open_txn(conn: &Connection, domain: &str) -> Result<Option<TxnRecord>> {
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

fn insert_steps(
    conn: &Connection,
    txn: Uuid,
    phase: StepPhase,
    first: u32,
    steps: &[NewStep],
) -> Result<Vec<u32>> {
    let mut stmt = conn
        .prepare_cached(
            "INSERT INTO steps (txn_id, phase, seq, op, checkpoint, xml, before_json, state) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending')",
        )
        .map_err(JournalError::from_sqlite)?;
    let mut seqs = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        let seq = first + i as u32;
        let op = match s.op {
            StepOp::Delete => "delete",
            StepOp::Redefine => "redefine",
        };
        stmt.execute(params![
            txn.to_string(),
            phase.as_str(),
            seq,
            op,
            s.checkpoint,
            s.xml,
            s.before.as_ref().map(to_json)
        ])
        .map_err(JournalError::from_sqlite)?;
        seqs.push(seq);
    }
    Ok(seqs)
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

    #[test]
    fn sqlite_errors_map_to_kinds() {
        let e = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        );
        assert!(matches!(
            JournalError::from_sqlite(e),
            JournalError::Full { .. }
        ));
        let e = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOTADB),
            None,
        );
        assert!(matches!(
            JournalError::from_sqlite(e),
            JournalError::Corrupt { .. }
        ));
        let e = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_READONLY),
            None,
        );
        assert!(matches!(
            JournalError::from_sqlite(e),
            JournalError::ReadOnly { .. }
        ));
    }

    fn synchronous(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap()
    }

    /// A journal holding one open transaction of two steps.
    fn journal_with_txn(dir: &Path) -> (Journal, Uuid) {
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

    #[test]
    fn steps_are_counted_without_writing_the_transaction_row() {
        let dir = tempfile::tempdir().unwrap();
        let (j, txn) = journal_with_txn(dir.path());
        let row = |j: &Journal| -> (i64, String) {
            j.conn()
                .query_row(
                    "SELECT libvirt_calls, updated_at FROM txns WHERE id = ?1",
                    params![txn.to_string()],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap()
        };
        let before = row(&j);
        j.step_done(txn, StepPhase::Apply, 0).unwrap();
        j.count_call(txn).unwrap();
        j.step_done(txn, StepPhase::Apply, 1).unwrap();
        assert_eq!(row(&j), before, "the transaction's row is untouched");
        let t = j.txn(txn).unwrap();
        assert_eq!(t.libvirt_calls, 3);
        assert!(t.updated_at >= before.1);
        assert_eq!(j.incomplete(None).unwrap()[0].libvirt_calls, 3);
        assert_eq!(j.incomplete_summaries(None).unwrap()[0].libvirt_calls, 3);
        assert_eq!(j.incomplete_summaries(None).unwrap()[0].done, 2);
        // A finished transaction keeps its count; pruning takes its progress along.
        j.finish(txn, TxnEvent::Commit, 0).unwrap();
        let n: i64 = j
            .conn()
            .query_row("SELECT COUNT(*) FROM txn_progress", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }
}
