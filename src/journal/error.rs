//! [`JournalError`]: why the journal cannot be used, with the hint the
//! command prints after it and, when SQLite said so, SQLite's own error and
//! the query that failed ([`SqliteCause`]). [`SqlContext::sql`] is how the
//! journal's code turns a `rusqlite` result into one; a row reader reports a
//! stored value it cannot read as [`Unreadable`].

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use rusqlite::types::{FromSqlError, Type};
use rusqlite::ErrorCode;

/// Why the journal cannot be used.
///
/// An error that came from SQLite keeps it: [`std::error::Error::source`]
/// is the `rusqlite::Error`, and [`JournalError::query`] names the query
/// that failed. The message (`Display`) is the kind's and SQLite's, as the
/// command prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum JournalError {
    /// The file is not a SQLite database, or is damaged.
    Corrupt {
        /// SQLite's message.
        detail: String,
        /// SQLite's error and the query.
        cause: Option<SqliteCause>,
    },
    /// The file was written by a newer ckptstore; it was left untouched.
    NewerSchema {
        /// Version in the file.
        found: u32,
        /// Newest version this build writes.
        supported: u32,
    },
    /// The file or its folder cannot be written.
    ReadOnly {
        /// SQLite's or the OS's message.
        detail: String,
        /// SQLite's error and the query, when SQLite said so.
        cause: Option<SqliteCause>,
    },
    /// The disk (or the journal's page limit) is full.
    Full {
        /// SQLite's message.
        detail: String,
        /// SQLite's error and the query.
        cause: Option<SqliteCause>,
    },
    /// Another process held the database lock longer than the busy timeout.
    Locked {
        /// SQLite's message.
        detail: String,
        /// SQLite's error and the query.
        cause: Option<SqliteCause>,
    },
    /// The file cannot be opened or read.
    Io {
        /// The OS's or SQLite's message.
        detail: String,
        /// SQLite's error and the query, when SQLite said so.
        cause: Option<SqliteCause>,
    },
    /// A durability setting did not take effect.
    Setting {
        /// The pragma.
        name: &'static str,
        /// What was asked for.
        expected: String,
        /// What SQLite reports.
        found: String,
    },
    /// A migration failed (and was rolled back).
    Migration {
        /// The migration file.
        name: &'static str,
        /// SQLite's message.
        detail: String,
        /// SQLite's error; the query is the migration's file name.
        cause: Option<SqliteCause>,
    },
    /// A stored value could not be decoded.
    Decode {
        /// What could not be read.
        detail: String,
        /// SQLite's error (its own source says why the value is unreadable)
        /// and the query that read it, when a row reader refused it.
        cause: Option<SqliteCause>,
    },
    /// Any other SQLite error.
    Sqlite {
        /// SQLite's message.
        detail: String,
        /// SQLite's error and the query.
        cause: Option<SqliteCause>,
    },
}

impl fmt::Display for JournalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JournalError::Corrupt { detail, .. } => write!(f, "journal is corrupt: {detail}"),
            JournalError::NewerSchema { found, supported } => write!(
                f,
                "journal has schema version {found}, newer than the {supported} this ckptstore understands"
            ),
            JournalError::ReadOnly { detail, .. } => write!(f, "journal is read-only: {detail}"),
            JournalError::Full { detail, .. } => write!(f, "journal is full: {detail}"),
            JournalError::Locked { detail, .. } => {
                write!(f, "journal is locked by another process: {detail}")
            }
            JournalError::Io { detail, .. } => write!(f, "journal I/O error: {detail}"),
            JournalError::Setting {
                name,
                expected,
                found,
            } => write!(f, "journal setting {name} is {found}, expected {expected}"),
            JournalError::Migration { name, detail, .. } => {
                write!(f, "journal migration {name} failed: {detail}")
            }
            JournalError::Decode { detail, .. } => {
                write!(f, "journal holds an unreadable value: {detail}")
            }
            JournalError::Sqlite { detail, .. } => write!(f, "journal error: {detail}"),
        }
    }
}

impl StdError for JournalError {
    /// The `rusqlite::Error` this error came from, if it came from SQLite.
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.cause().map(|c| &*c.error as &(dyn StdError + 'static))
    }
}

impl JournalError {
    /// The error of SQLite's `e` in `query`, by kind: a value a row reader
    /// found [`Unreadable`] is `Decode`, the rest by SQLite's error code.
    pub(super) fn sqlite(query: &'static str, e: rusqlite::Error) -> JournalError {
        let unreadable = match &e {
            rusqlite::Error::FromSqlConversionFailure(_, _, inner) => {
                inner.downcast_ref::<Unreadable>().map(ToString::to_string)
            }
            _ => None,
        };
        let code = e.sqlite_error_code();
        let detail = unreadable.clone().unwrap_or_else(|| e.to_string());
        let cause = Some(SqliteCause {
            query,
            error: Arc::new(e),
        });
        if unreadable.is_some() {
            return JournalError::Decode { detail, cause };
        }
        match code {
            Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
                JournalError::Corrupt { detail, cause }
            }
            Some(ErrorCode::ReadOnly) => JournalError::ReadOnly { detail, cause },
            Some(ErrorCode::DiskFull) => JournalError::Full { detail, cause },
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                JournalError::Locked { detail, cause }
            }
            Some(
                ErrorCode::CannotOpen | ErrorCode::SystemIoFailure | ErrorCode::PermissionDenied,
            ) => JournalError::Io { detail, cause },
            _ => JournalError::Sqlite { detail, cause },
        }
    }

    /// A migration's failure: `name` is its file.
    pub(super) fn migration(name: &'static str, e: rusqlite::Error) -> JournalError {
        JournalError::Migration {
            name,
            detail: e.to_string(),
            cause: Some(SqliteCause {
                query: name,
                error: Arc::new(e),
            }),
        }
    }

    /// An I/O error that did not come from SQLite.
    pub(crate) fn io(detail: String) -> JournalError {
        JournalError::Io {
            detail,
            cause: None,
        }
    }

    /// A value or a request the journal cannot make sense of (not SQLite's
    /// error): `what: e`.
    pub(crate) fn decode(what: &str, e: impl fmt::Display) -> JournalError {
        JournalError::Decode {
            detail: format!("{what}: {e}"),
            cause: None,
        }
    }

    /// The query that failed — its SQL, or the name of a migration file or
    /// of an operation that is no one statement (`open`) — when the error
    /// came from SQLite.
    pub fn query(&self) -> Option<&'static str> {
        self.cause().map(|c| c.query)
    }

    fn cause(&self) -> Option<&SqliteCause> {
        match self {
            JournalError::Corrupt { cause, .. }
            | JournalError::ReadOnly { cause, .. }
            | JournalError::Full { cause, .. }
            | JournalError::Locked { cause, .. }
            | JournalError::Io { cause, .. }
            | JournalError::Migration { cause, .. }
            | JournalError::Decode { cause, .. }
            | JournalError::Sqlite { cause, .. } => cause.as_ref(),
            JournalError::NewerSchema { .. } | JournalError::Setting { .. } => None,
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
}

/// The SQLite error a [`JournalError`] came from, and the query that
/// failed. The error itself is the `JournalError`'s
/// [`source`](std::error::Error::source).
#[derive(Debug, Clone)]
pub struct SqliteCause {
    query: &'static str,
    error: Arc<rusqlite::Error>,
}

impl SqliteCause {
    /// The query that failed (see [`JournalError::query`]).
    pub fn query(&self) -> &'static str {
        self.query
    }
}

impl PartialEq for SqliteCause {
    /// The same query and the same error (the very same, or equal as
    /// `rusqlite` compares them).
    fn eq(&self, other: &SqliteCause) -> bool {
        self.query == other.query
            && (Arc::ptr_eq(&self.error, &other.error) || *self.error == *other.error)
    }
}

impl Eq for SqliteCause {}

/// `rusqlite` results as the journal's: the error mapped to its
/// [`JournalError`] kind, kept as its source with the query.
pub(super) trait SqlContext<T> {
    /// This result, its error from `query` (the SQL, or a short name).
    fn sql(self, query: &'static str) -> Result<T, JournalError>;
}

impl<T> SqlContext<T> for rusqlite::Result<T> {
    #[inline]
    fn sql(self, query: &'static str) -> Result<T, JournalError> {
        self.map_err(|e| JournalError::sqlite(query, e))
    }
}

/// A stored value a row reader cannot read (`what: why`): carried inside
/// SQLite's conversion error, it makes a [`JournalError::Decode`].
#[derive(Debug)]
pub(super) struct Unreadable {
    what: &'static str,
    why: String,
}

impl Unreadable {
    pub(super) fn new(what: &'static str, why: impl fmt::Display) -> Unreadable {
        Unreadable {
            what,
            why: why.to_string(),
        }
    }

    /// As the error of reading column `idx`, which holds `ty`.
    pub(super) fn at(self, idx: usize, ty: Type) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(idx, ty, Box::new(self))
    }
}

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.why)
    }
}

impl StdError for Unreadable {}

impl From<Unreadable> for FromSqlError {
    fn from(u: Unreadable) -> FromSqlError {
        FromSqlError::Other(Box::new(u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: std::ffi::c_int, msg: Option<&str>) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), msg.map(Into::into))
    }

    #[test]
    fn sqlite_errors_map_to_kinds() {
        let e = failure(rusqlite::ffi::SQLITE_FULL, Some("database or disk is full"));
        assert!(matches!(
            JournalError::sqlite("q", e),
            JournalError::Full { .. }
        ));
        let e = failure(rusqlite::ffi::SQLITE_NOTADB, None);
        assert!(matches!(
            JournalError::sqlite("q", e),
            JournalError::Corrupt { .. }
        ));
        let e = failure(rusqlite::ffi::SQLITE_READONLY, None);
        assert!(matches!(
            JournalError::sqlite("q", e),
            JournalError::ReadOnly { .. }
        ));
        // A conversion that is not ours stays SQLite's.
        let e = rusqlite::Error::FromSqlConversionFailure(0, Type::Text, "not utf-8".into());
        assert!(matches!(
            JournalError::sqlite("q", e),
            JournalError::Sqlite { .. }
        ));
    }

    #[test]
    fn an_error_keeps_sqlites_error_as_its_source_and_the_query() {
        let e = JournalError::sqlite(
            "SELECT 1",
            failure(rusqlite::ffi::SQLITE_FULL, Some("database or disk is full")),
        );
        assert_eq!(e.to_string(), "journal is full: database or disk is full");
        assert_eq!(e.query(), Some("SELECT 1"));
        let source = StdError::source(&e).expect("a source");
        let sqlite = source
            .downcast_ref::<rusqlite::Error>()
            .expect("rusqlite's error");
        assert_eq!(sqlite.sqlite_error_code(), Some(ErrorCode::DiskFull));
        assert_eq!(e.clone(), e, "a clone is equal");

        let e = JournalError::decode("transition", "not allowed");
        assert!(StdError::source(&e).is_none() && e.query().is_none());
    }

    #[test]
    fn an_unreadable_value_is_a_decode_error_with_its_message() {
        let e = Unreadable::new("transaction state", "bogus").at(3, Type::Text);
        let e = JournalError::sqlite("SELECT state FROM txns", e);
        assert_eq!(
            e.to_string(),
            "journal holds an unreadable value: transaction state: bogus"
        );
        assert!(matches!(e, JournalError::Decode { cause: Some(_), .. }));
        assert_eq!(e.query(), Some("SELECT state FROM txns"));
        let unreadable = StdError::source(&e).and_then(StdError::source);
        assert_eq!(
            unreadable.map(ToString::to_string).as_deref(),
            Some("transaction state: bogus")
        );
    }
}
