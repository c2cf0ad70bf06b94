-- ckptstore journal, schema 1.
--
-- A transaction (txn) is one sync, re-sync or import of one domain. Its row
-- holds the full target and the before-image (libvirt's checkpoints when the
-- transaction was planned), and is committed before the first libvirt call.
-- Steps are the planned calls; their state is a cache of progress that may
-- lag behind libvirt, never a source that may lie: recovery compares
-- libvirt's checkpoints with the target by content.

CREATE TABLE txns (
    id            TEXT PRIMARY KEY,          -- UUID
    domain        TEXT NOT NULL,             -- libvirt name or UUID, as the chain gives it
    kind          TEXT NOT NULL CHECK (kind IN ('sync', 'resync', 'import')),
    state         TEXT NOT NULL CHECK (state IN ('applying', 'rolling_back', 'committed', 'rolled_back')),
    chain_json    TEXT,                      -- the chain as given (NULL for import)
    target_json   TEXT NOT NULL,             -- [CheckpointDef], parent first
    before_json   TEXT NOT NULL,             -- [CheckpointDef]: libvirt's checkpoints at plan time
    owner_pid     INTEGER NOT NULL,
    owner_boot_id TEXT NOT NULL,
    owner_start   INTEGER NOT NULL,          -- process start time, clock ticks since boot
    started_at    TEXT NOT NULL,             -- RFC 3339 UTC
    updated_at    TEXT NOT NULL,
    finished_at   TEXT,
    error         TEXT,                      -- why it was rolled back, if it was
    libvirt_calls INTEGER NOT NULL DEFAULT 0 -- mutating calls made (redefine + delete)
);

-- At most one open transaction per domain: the database enforces it.
CREATE UNIQUE INDEX txns_one_open_per_domain ON txns(domain) WHERE state IN ('applying', 'rolling_back');
-- The incomplete-transaction query at start-up reads only open rows.
CREATE INDEX txns_open ON txns(state) WHERE state IN ('applying', 'rolling_back');
CREATE INDEX txns_by_domain ON txns(domain, started_at);

CREATE TABLE steps (
    txn_id      TEXT NOT NULL REFERENCES txns(id) ON DELETE CASCADE,
    phase       TEXT NOT NULL CHECK (phase IN ('apply', 'rollback')),
    seq         INTEGER NOT NULL,
    op          TEXT NOT NULL CHECK (op IN ('delete', 'redefine')),
    checkpoint  TEXT NOT NULL,
    xml         TEXT,                        -- redefine XML (NULL for delete)
    before_json TEXT,                        -- the definition it replaces or deletes, if any
    state       TEXT NOT NULL CHECK (state IN ('pending', 'done')),
    PRIMARY KEY (txn_id, phase, seq)
);

-- Each domain's last committed chain.
CREATE TABLE domains (
    domain       TEXT PRIMARY KEY,
    chain_json   TEXT,                       -- NULL when adopted by import
    defs_json    TEXT NOT NULL,              -- [CheckpointDef], parent first
    txn_id       TEXT NOT NULL,
    committed_at TEXT NOT NULL
);
