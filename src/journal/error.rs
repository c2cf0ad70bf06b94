//! [`JournalError`]: why the journal cannot be used, with the hint the
//! command prints after it.

use rusqlite::ErrorCode;

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

    pub(super) fn decode(what: &str, e: impl std::fmt::Display) -> JournalError {
        JournalError::Decode {
            detail: format!("{what}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
