-- Idempotency keys belong to a publisher (issue 11, item 1): unique on
-- (source, scope, source_id) instead of (source, source_id). `scope` is ''
-- for webhook sources and for development mode, the publisher's identity
-- otherwise (src/auth.rs, `Auth::idempotency_scope`). Keys stored before
-- this step keep scope '': a publisher's retry that straddles the upgrade
-- is not recognised (outside development mode), nothing else changes.
ALTER TABLE dedupe ADD COLUMN scope TEXT NOT NULL DEFAULT '';
ALTER TABLE dedupe DROP CONSTRAINT dedupe_pkey;
ALTER TABLE dedupe ADD PRIMARY KEY (source, scope, source_id);
