-- ckptstore journal, schema 3: the bitmap life cycle.
--
-- New transaction kinds: ensure (make one checkpoint, the base of the next
-- incremental backup, usable in libvirt), reclaim (remove orphan and
-- unusable bitmaps, and the checkpoints left without one) and prune
-- (retention: delete the oldest checkpoints with their bitmaps). New step
-- ops: purge (libvirt's real delete: metadata and bitmaps) and
-- remove_bitmap (a bitmap removed from an image file); `detail` holds what
-- a step needs beyond its checkpoint (for remove_bitmap: the disk and the
-- image, as JSON). SQLite cannot widen a CHECK, so both tables are rebuilt
-- (foreign keys off while this runs; the runner checks them after).
-- The rebuilt txns table puts its large JSON columns last: SQLite reaches a
-- column stored after them only by walking their overflow pages, and the
-- small ones (state, owner) are read at every step.
-- `validations` keeps each domain's last `validate` report.

CREATE TABLE txns_v3 (
    id            TEXT PRIMARY KEY,
    domain        TEXT NOT NULL,
    kind          TEXT NOT NULL CHECK (kind IN ('sync', 'resync', 'import', 'ensure', 'reclaim', 'prune')),
    state         TEXT NOT NULL CHECK (state IN ('applying', 'rolling_back', 'committed', 'rolled_back')),
    owner_pid     INTEGER NOT NULL,
    owner_boot_id TEXT NOT NULL,
    owner_start   INTEGER NOT NULL,
    started_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,
    finished_at   TEXT,
    error         TEXT,
    libvirt_calls INTEGER NOT NULL DEFAULT 0,
    chain_json    TEXT,
    target_json   TEXT NOT NULL,
    before_json   TEXT NOT NULL
);
INSERT INTO txns_v3 (id, domain, kind, state, chain_json, target_json, before_json, owner_pid,
                     owner_boot_id, owner_start, started_at, updated_at, finished_at, error, libvirt_calls)
    SELECT id, domain, kind, state, chain_json, target_json, before_json, owner_pid,
           owner_boot_id, owner_start, started_at, updated_at, finished_at, error, libvirt_calls
    FROM txns;
DROP TABLE txns;
ALTER TABLE txns_v3 RENAME TO txns;
CREATE UNIQUE INDEX txns_one_open_per_domain ON txns(domain) WHERE state IN ('applying', 'rolling_back');
CREATE INDEX txns_open ON txns(state) WHERE state IN ('applying', 'rolling_back');
CREATE INDEX txns_by_domain ON txns(domain, started_at);

CREATE TABLE steps_v3 (
    txn_id      TEXT NOT NULL REFERENCES txns(id) ON DELETE CASCADE,
    phase       TEXT NOT NULL CHECK (phase IN ('apply', 'rollback')),
    seq         INTEGER NOT NULL,
    op          TEXT NOT NULL CHECK (op IN ('delete', 'redefine', 'purge', 'remove_bitmap')),
    checkpoint  TEXT NOT NULL,
    xml         TEXT,
    before_json TEXT,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    detail      TEXT,                        -- JSON: what the op needs beyond its checkpoint
    PRIMARY KEY (txn_id, phase, seq)
);
INSERT INTO steps_v3 (txn_id, phase, seq, op, checkpoint, xml, before_json, state)
    SELECT txn_id, phase, seq, op, checkpoint, xml, before_json, state FROM steps;
DROP TABLE steps;
ALTER TABLE steps_v3 RENAME TO steps;

-- Each domain's last validate report.
CREATE TABLE validations (
    domain       TEXT PRIMARY KEY,
    validated_at TEXT NOT NULL,              -- RFC 3339 UTC
    report_json  TEXT NOT NULL               -- the validate report, as the command prints it
);
