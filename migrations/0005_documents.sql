-- ckptstore journal, schema 5: the large JSON documents out of the rows
-- that change.
--
-- SQLite rewrites a whole row to change one of its columns, and reads every
-- column to do so. A transaction's row changes state several times, and it
-- held the chain, the target and the before-image: megabytes for a long
-- chain, loaded and copied in memory at each change (and once more to copy
-- the target into `domains` at the commit).
--
-- Each document is now a row of `txn_docs`, written once and never updated:
-- inserted as a zeroblob of its length (SQLite keeps a trailing zeroblob
-- unexpanded), then filled in pieces through incremental blob I/O, so that
-- neither SQLite nor ckptstore holds it whole. `domains` keeps its own copy
-- of the committed chain in its last columns, copied in pieces at the
-- commit. Documents written from schema 5 on are BLOBs holding UTF-8 JSON;
-- older ones stay TEXT (SQL reading them as JSON casts: CAST(json AS TEXT)).
-- `items` and `checkpoints` keep the array lengths that status and metrics
-- report, so that they need not parse the documents.

CREATE TABLE txn_docs (
    txn_id TEXT NOT NULL REFERENCES txns(id) ON DELETE CASCADE,
    name   TEXT NOT NULL CHECK (name IN ('chain', 'target', 'before')),
    items  INTEGER,                          -- the array's length (target, before); NULL for the chain
    json   BLOB NOT NULL,                    -- UTF-8 JSON, last: written in pieces
    PRIMARY KEY (txn_id, name)
);

INSERT INTO txn_docs (txn_id, name, items, json)
    SELECT id, 'chain', NULL, chain_json FROM txns WHERE chain_json IS NOT NULL;
INSERT INTO txn_docs (txn_id, name, items, json)
    SELECT id, 'target', json_array_length(target_json), target_json FROM txns;
INSERT INTO txn_docs (txn_id, name, items, json)
    SELECT id, 'before', json_array_length(before_json), before_json FROM txns;

ALTER TABLE txns DROP COLUMN chain_json;
ALTER TABLE txns DROP COLUMN target_json;
ALTER TABLE txns DROP COLUMN before_json;

CREATE TABLE domains_v5 (
    domain       TEXT PRIMARY KEY,
    txn_id       TEXT NOT NULL,
    committed_at TEXT NOT NULL,
    checkpoints  INTEGER NOT NULL,           -- defs_json's length
    chain_json   BLOB,                       -- NULL when adopted by import
    defs_json    BLOB NOT NULL               -- [CheckpointDef], parent first
);
INSERT INTO domains_v5 (domain, txn_id, committed_at, checkpoints, chain_json, defs_json)
    SELECT domain, txn_id, committed_at, json_array_length(defs_json), chain_json, defs_json
    FROM domains;
DROP TABLE domains;
ALTER TABLE domains_v5 RENAME TO domains;
