-- Idempotency keys belong to a publisher (issue 11, item 1): unique on
-- (source, scope, source_id) instead of (source, source_id). `scope` is ''
-- for webhook sources and for development mode, the publisher's identity
-- otherwise (src/auth.rs, `Auth::idempotency_scope`). Keys stored before
-- this step keep scope '': a publisher's retry that straddles the upgrade
-- is not recognised (outside development mode), nothing else changes.
-- SQLite cannot change a primary key in place: the table is rebuilt.
CREATE TABLE dedupe_scoped (
    source TEXT NOT NULL,
    scope TEXT NOT NULL,
    source_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    PRIMARY KEY (source, scope, source_id)
) WITHOUT ROWID;
INSERT INTO dedupe_scoped (source, scope, source_id, first_seq, time_ms)
    SELECT source, '', source_id, first_seq, time_ms FROM dedupe;
DROP TABLE dedupe;
ALTER TABLE dedupe_scoped RENAME TO dedupe;
CREATE INDEX dedupe_by_time ON dedupe (time_ms);
