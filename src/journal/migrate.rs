//! Schema migrations: numbered SQL files under `migrations/`, embedded in
//! the binary, applied together with the `user_version` bump in one
//! transaction. A migration is never edited once released: a test holds
//! their SHA-256 hashes.

use rusqlite::Connection;

use super::error::SqlContext;
use super::{write, JournalError, Sql};

/// One embedded migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// File name under `migrations/`.
    pub name: &'static str,
    /// Its SQL.
    pub sql: &'static str,
}

/// Every migration, in order; schema version N is reached by applying the
/// first N.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        name: "0001_initial.sql",
        sql: include_str!("../../migrations/0001_initial.sql"),
    },
    Migration {
        name: "0002_progress.sql",
        sql: include_str!("../../migrations/0002_progress.sql"),
    },
    Migration {
        name: "0003_lifecycle.sql",
        sql: include_str!("../../migrations/0003_lifecycle.sql"),
    },
    Migration {
        name: "0004_counters.sql",
        sql: include_str!("../../migrations/0004_counters.sql"),
    },
    Migration {
        name: "0005_documents.sql",
        sql: include_str!("../../migrations/0005_documents.sql"),
    },
];

/// The schema version this build writes.
pub const SCHEMA_VERSION: u32 = MIGRATIONS.len() as u32;

pub(super) fn user_version(conn: &Connection) -> Result<u32, JournalError> {
    conn.one("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map(|v| v as u32)
}

/// Refuse a journal from a newer schema without touching it.
pub(super) fn check_not_newer(conn: &Connection) -> Result<u32, JournalError> {
    let found = user_version(conn)?;
    if found > SCHEMA_VERSION {
        return Err(JournalError::NewerSchema {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(found)
}

/// Apply every pending migration and bump `user_version`, all in one
/// transaction. Returns the number applied.
///
/// A migration may rebuild a table (SQLite cannot widen a `CHECK`): as
/// SQLite's own procedure asks, foreign keys are off while the migrations
/// run (a dropped parent table would cascade), checked before the commit
/// (`PRAGMA foreign_key_check`), and on again afterwards.
pub(super) fn migrate(conn: &mut Connection) -> Result<usize, JournalError> {
    if check_not_newer(conn)? as usize == MIGRATIONS.len() {
        return Ok(0);
    }
    conn.pragma_update(None, "foreign_keys", "OFF")
        .sql("PRAGMA foreign_keys = OFF")?;
    let applied = apply_pending(conn);
    conn.pragma_update(None, "foreign_keys", "ON")
        .sql("PRAGMA foreign_keys = ON")?;
    applied
}

fn apply_pending(conn: &mut Connection) -> Result<usize, JournalError> {
    write(conn, |tx| {
        // Read again inside the write lock: another process may have migrated.
        let found = check_not_newer(tx)?;
        let pending = &MIGRATIONS[found as usize..];
        for m in pending {
            tx.execute_batch(m.sql)
                .map_err(|e| JournalError::migration(m.name, e))?;
        }
        let broken: Option<String> = tx
            .prepare("PRAGMA foreign_key_check")
            .and_then(|mut st| {
                let mut rows = st.query([])?;
                rows.next()?.map(|r| r.get::<_, String>(0)).transpose()
            })
            .sql("PRAGMA foreign_key_check")?;
        if let (Some(table), Some(last)) = (broken, pending.last()) {
            return Err(JournalError::Migration {
                name: last.name,
                detail: format!("foreign keys broken in table {table}"),
                cause: None,
            });
        }
        if !pending.is_empty() {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .sql("PRAGMA user_version")?;
        }
        Ok(pending.len())
    })
}
