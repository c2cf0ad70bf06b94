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
pub(super) fn migrate(conn: &mut Connection) -> Result<usize, JournalError> {
    write(conn, |tx| {
        // Read again inside the write lock: another process may have migrated.
        let found = check_not_newer(tx)?;
        let pending = &MIGRATIONS[found as usize..];
        for m in pending {
            tx.execute_batch(m.sql)
                .map_err(|e| JournalError::migration(m.name, e))?;
        }
        if !pending.is_empty() {
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .sql("PRAGMA user_version")?;
        }
        Ok(pending.len())
    })
}
