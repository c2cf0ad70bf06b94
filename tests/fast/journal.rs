//! The journal file: durability settings asserted at open, permissions,
//! migrations that never change once released, and files it must refuse
//! without touching them.

use testkit::sim;

use std::os::unix::fs::PermissionsExt;

use ckptstore::testing::{Journal, JournalError, MIGRATIONS, SCHEMA_VERSION};
use ckptstore::{Chain, CheckpointDef};
use sha2::{Digest, Sha256};
use sim::TempJournal;

/// The SHA-256 of every released migration. A released migration is never
/// edited: add a new numbered file instead.
const RELEASED: &[(&str, &str)] = &[
    (
        "0001_initial.sql",
        "496a9c7f6325d58cd10a63430d53162be56761ea29ec758ef083ae01c620d85e",
    ),
    (
        "0002_progress.sql",
        "0e33cd2a9990aa67858b5b5b0253b38a8bbd4d396eb54c705442bb2d349dbb6b",
    ),
    (
        "0003_lifecycle.sql",
        "581be6080fae329a4d279993194e6be88d8833107c53e9859cdc03d7c2f7573c",
    ),
    (
        "0004_counters.sql",
        "216534ad7a932f01ef06cefc30f4d6a4791fa8dc7b51f1a6b550cfeeef978bd3",
    ),
    (
        "0005_documents.sql",
        "a31fb2c7bd33baa8a26a47634e18cd61265073984d7f29bac585ebeee50d423c",
    ),
];

#[test]
fn released_migrations_are_never_edited() {
    assert!(
        MIGRATIONS.len() >= RELEASED.len(),
        "a released migration was removed"
    );
    for (m, (name, hash)) in MIGRATIONS.iter().zip(RELEASED) {
        assert_eq!(m.name, *name, "migrations were renamed or reordered");
        let found = format!("{:x}", Sha256::digest(m.sql.as_bytes()));
        assert_eq!(&found, hash, "migration {name} was edited after release");
    }
    // The files on disk are the ones embedded, in numbered order.
    let mut on_disk: Vec<String> =
        std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| {
                std::path::Path::new(n)
                    .extension()
                    .is_some_and(|e| e == "sql")
            })
            .collect();
    on_disk.sort();
    let embedded: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
    assert_eq!(
        on_disk, embedded,
        "every file under migrations/ must be embedded, in order"
    );
}

#[test]
fn open_asserts_durability_settings_and_creates_the_file_0600() {
    let t = TempJournal::new();
    let j = Journal::open(&t.path()).unwrap();
    let mode = std::fs::metadata(t.path()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(j);
    let conn = rusqlite::Connection::open(t.path()).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal", "WAL is persistent in the file");
    let v: u32 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(v, SCHEMA_VERSION);
}

#[test]
fn reopening_applies_nothing_twice() {
    let t = TempJournal::new();
    drop(Journal::open(&t.path()).unwrap());
    let j = Journal::open(&t.path()).unwrap();
    assert_eq!(j.integrity_check().unwrap(), "ok");
}

#[test]
fn a_schema_1_journal_keeps_its_call_counts_after_migration() {
    let t = TempJournal::new();
    {
        let conn = rusqlite::Connection::open(t.path()).unwrap();
        conn.execute_batch(MIGRATIONS[0].sql).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO txns (id, domain, kind, state, target_json, before_json, owner_pid, owner_boot_id, \
             owner_start, started_at, updated_at, libvirt_calls) \
             VALUES ('5c3e1b7a-2d4f-4a6b-8e9c-0a1b2c3d4e5f', 'd', 'sync', 'applying', '[]', '[]', 1, 'b', 1, \
             '2024-05-01T09:00:00.000Z', '2024-05-01T09:00:00.000Z', 5)",
            [],
        )
        .unwrap();
    }
    let j = Journal::open(&t.path()).unwrap();
    let id = uuid::Uuid::parse_str("5c3e1b7a-2d4f-4a6b-8e9c-0a1b2c3d4e5f").unwrap();
    assert_eq!(j.txn(id).unwrap().libvirt_calls, 5);
    j.count_call(id).unwrap();
    let t = j.txn(id).unwrap();
    assert_eq!(t.libvirt_calls, 6);
    assert!(t.updated_at.as_str() > "2024-05-01T09:00:00.000Z");
}

#[test]
fn a_schema_2_journal_keeps_its_transactions_steps_and_progress_after_migration() {
    // Schema 3 rebuilds txns and steps (wider CHECKs): every row, and the
    // progress rows that reference them, must come through, and the
    // one-open-transaction-per-domain rule must hold again.
    let t = TempJournal::new();
    let id = "5c3e1b7a-2d4f-4a6b-8e9c-0a1b2c3d4e5f";
    {
        let conn = rusqlite::Connection::open(t.path()).unwrap();
        conn.execute_batch(MIGRATIONS[0].sql).unwrap();
        conn.execute_batch(MIGRATIONS[1].sql).unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute(
            "INSERT INTO txns (id, domain, kind, state, target_json, before_json, owner_pid, owner_boot_id, \
             owner_start, started_at, updated_at, libvirt_calls) \
             VALUES (?1, 'd', 'resync', 'applying', '[]', '[]', 1, 'b', 1, \
             '2024-05-01T09:00:00.000Z', '2024-05-01T09:00:00.000Z', 2)",
            [id],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO steps (txn_id, phase, seq, op, checkpoint, xml, before_json, state) \
             VALUES (?1, 'apply', 0, 'delete', 'c0', NULL, NULL, 'done')",
            [id],
        )
        .unwrap();
        conn.execute(
            "INSERT INTO txn_progress (txn_id, calls, updated_at) VALUES (?1, 3, '2024-05-01T09:00:01.000Z')",
            [id],
        )
        .unwrap();
    }
    let j = Journal::open(&t.path()).unwrap();
    let uuid = uuid::Uuid::parse_str(id).unwrap();
    let txn = j.txn(uuid).unwrap();
    assert_eq!(
        txn.libvirt_calls, 5,
        "the schema-1 count plus the progress row"
    );
    assert_eq!(j.incomplete(Some("d")).unwrap().len(), 1);
    drop(j);
    let conn = rusqlite::Connection::open(t.path()).unwrap();
    let steps: i64 = conn
        .query_row(
            "SELECT count(*) FROM steps WHERE txn_id = ?1 AND state = 'done'",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(steps, 1);
    let second_open = conn.execute(
        "INSERT INTO txns (id, domain, kind, state, target_json, before_json, owner_pid, owner_boot_id, \
         owner_start, started_at, updated_at) \
         VALUES ('6c3e1b7a-2d4f-4a6b-8e9c-0a1b2c3d4e5f', 'd', 'prune', 'applying', '[]', '[]', 1, 'b', 1, \
         '2024-05-01T09:00:00.000Z', '2024-05-01T09:00:00.000Z')",
        [],
    );
    assert!(
        second_open.is_err(),
        "the unique open-transaction index was rebuilt"
    );
    let fk: i64 = conn
        .query_row("PRAGMA foreign_key_check", [], |_| Ok(1))
        .unwrap_or(0);
    assert_eq!(fk, 0);
}

#[test]
fn a_schema_4_journal_keeps_its_documents_and_committed_chains_after_migration() {
    // Schema 5 moves each transaction's chain, target and before-image into
    // txn_docs and rebuilds domains: every document must come through as
    // it was, the sizes status and metrics report with them.
    let t = TempJournal::new();
    let open_id = "5c3e1b7a-2d4f-4a6b-8e9c-0a1b2c3d4e5f";
    let done_id = "6c3e1b7a-2d4f-4a6b-8e9c-0a1b2c3d4e5f";
    let def = |name: &str, parent: Option<&str>| {
        serde_json::json!({
            "name": name, "parent": parent, "creation_time": 1_700_000_000,
            "disks": {"vda": name, "vdb": name},
        })
    };
    let target = serde_json::json!([def("c0", None), def("c1", Some("c0"))]).to_string();
    let before = serde_json::json!([def("c0", None)]).to_string();
    let chain = serde_json::json!({
        "vm_id": "93a5c045-6457-2c09-e56c-927cdf34e178",
        "disks": {"d0": "vda"},
        "checkpoints": [],
    })
    .to_string();
    {
        let conn = rusqlite::Connection::open(t.path()).unwrap();
        for m in &MIGRATIONS[..4] {
            conn.execute_batch(m.sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 4).unwrap();
        for (id, state, chain) in [
            (done_id, "committed", None),
            (open_id, "applying", Some(&chain)),
        ] {
            conn.execute(
                "INSERT INTO txns (id, domain, kind, state, owner_pid, owner_boot_id, owner_start, \
                 started_at, updated_at, chain_json, target_json, before_json) \
                 VALUES (?1, 'd', 'sync', ?2, 1, 'b', 1, '2024-05-01T09:00:00.000Z', \
                 '2024-05-01T09:00:00.000Z', ?3, ?4, ?5)",
                rusqlite::params![id, state, chain, target, before],
            )
            .unwrap();
        }
        conn.execute(
            "INSERT INTO domains (domain, chain_json, defs_json, txn_id, committed_at) \
             VALUES ('d', ?1, ?2, ?3, '2024-05-01T09:00:00.000Z')",
            rusqlite::params![chain, target, done_id],
        )
        .unwrap();
    }
    let j = Journal::open(&t.path()).unwrap();
    let defs = |s: &str| serde_json::from_str::<Vec<CheckpointDef>>(s).unwrap();
    let chain: Chain = serde_json::from_str(&chain).unwrap();
    let open = j.txn(uuid::Uuid::parse_str(open_id).unwrap()).unwrap();
    assert_eq!(open.target, defs(&target));
    assert_eq!(open.before, defs(&before));
    assert_eq!(open.chain.as_ref(), Some(&chain));
    let done = j.txn(uuid::Uuid::parse_str(done_id).unwrap()).unwrap();
    assert!(done.chain.is_none());
    let committed = j.committed("d").unwrap().unwrap();
    assert_eq!(committed.defs, defs(&target));
    assert_eq!(committed.chain.as_ref(), Some(&chain));
    assert_eq!(committed.txn.to_string(), done_id);
    let status = j.incomplete_summaries(Some("d")).unwrap();
    assert_eq!(status[0].target_len, 2);
    let sizes = j.metrics_snapshot().unwrap().committed;
    assert_eq!(sizes[0].checkpoints, 2);
    assert_eq!(j.integrity_check().unwrap(), "ok");
}

#[test]
fn a_newer_schema_is_refused_and_left_untouched() {
    let t = TempJournal::new();
    drop(Journal::open(&t.path()).unwrap());
    {
        let conn = rusqlite::Connection::open(t.path()).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        // Checkpoint the WAL so the file on disk holds everything.
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    let before = std::fs::read(t.path()).unwrap();
    let err = Journal::open(&t.path()).unwrap_err();
    assert_eq!(
        err,
        JournalError::NewerSchema {
            found: 99,
            supported: SCHEMA_VERSION
        }
    );
    assert_eq!(
        std::fs::read(t.path()).unwrap(),
        before,
        "the file must be left untouched"
    );
}

#[test]
fn a_corrupt_or_truncated_file_is_a_typed_error() {
    let t = TempJournal::new();
    std::fs::write(
        t.path(),
        b"this is not a sqlite database, not even close; padding padding padding",
    )
    .unwrap();
    let before = std::fs::read(t.path()).unwrap();
    assert!(matches!(
        Journal::open(&t.path()).unwrap_err(),
        JournalError::Corrupt { .. }
    ));
    assert_eq!(std::fs::read(t.path()).unwrap(), before);

    // A real journal cut in half.
    let t = TempJournal::new();
    drop(Journal::open(&t.path()).unwrap());
    {
        let conn = rusqlite::Connection::open(t.path()).unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
    }
    let bytes = std::fs::read(t.path()).unwrap();
    std::fs::write(t.path(), &bytes[..bytes.len() / 2]).unwrap();
    let e = Journal::open(&t.path()).map(|j| j.integrity_check());
    match e {
        Err(JournalError::Corrupt { .. }) => {}
        Ok(Ok(s)) => assert_ne!(s, "ok", "a truncated journal must not check ok"),
        other => panic!("unexpected: {other:?}"),
    }
}

#[test]
fn a_directory_is_not_a_journal() {
    let t = TempJournal::new();
    std::fs::create_dir(t.path()).unwrap();
    assert!(matches!(
        Journal::open(&t.path()).unwrap_err(),
        JournalError::Io { .. }
    ));
}
