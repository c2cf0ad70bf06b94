-- ckptstore journal, schema 4: monotonic transaction counters.
--
-- The journal prunes old finished transactions (StoreOptions.history), so a
-- count of txns rows would go backwards. Each finished transaction adds one
-- to its (domain, kind, outcome) row here, in the same SQLite transaction
-- that finishes it; rows are never deleted. A transaction recorded as
-- committed at once (nothing to do) counts as committed. The counts start
-- from the finished transactions the journal holds when it is migrated.

CREATE TABLE counters (
    domain  TEXT NOT NULL,
    kind    TEXT NOT NULL,                   -- txns.kind
    outcome TEXT NOT NULL CHECK (outcome IN ('committed', 'rolled_back')),
    count   INTEGER NOT NULL,
    last_at TEXT NOT NULL,                   -- RFC 3339 UTC: the last one counted
    PRIMARY KEY (domain, kind, outcome)
) WITHOUT ROWID;

INSERT INTO counters (domain, kind, outcome, count, last_at)
    SELECT domain, kind, state, COUNT(*), MAX(COALESCE(finished_at, updated_at))
    FROM txns WHERE state IN ('committed', 'rolled_back')
    GROUP BY domain, kind, state;
