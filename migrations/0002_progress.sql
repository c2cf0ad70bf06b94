-- ckptstore journal, schema 2: per-step progress out of the transaction row.
--
-- Changing any column of a txns row makes SQLite write the whole row again,
-- its chain, target and before-image included: megabytes for a long chain.
-- Counting each step's libvirt call in txns.libvirt_calls did that once per
-- step. The per-call counter and its time now live in a small row of their
-- own; txns.libvirt_calls keeps what was counted there (by schema 1, and at
-- no other time), and readers add the two.

CREATE TABLE txn_progress (
    txn_id     TEXT PRIMARY KEY REFERENCES txns(id) ON DELETE CASCADE,
    calls      INTEGER NOT NULL,             -- mutating calls made (redefine + delete)
    updated_at TEXT NOT NULL                 -- RFC 3339 UTC time of the last one
) WITHOUT ROWID;
