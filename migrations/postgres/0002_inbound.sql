-- The inspector's record of inbound webhooks (src/ingest, Store::append_webhook).
-- `capped = false`: an accepted new message, removed with its first event by
-- retention; `capped = true`: a refusal or a duplicate, of which only the
-- newest INBOUND_CAPPED_KEEP (1000) are kept. `body` NULL means "the same
-- bytes as the data of event `first_seq`" (stored once).
CREATE TABLE inbound (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    time_ms BIGINT NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    duplicate BOOLEAN NOT NULL,
    capped BOOLEAN NOT NULL,
    reason TEXT,
    detail TEXT,
    source_id TEXT,
    type TEXT,
    channels TEXT NOT NULL,
    seqs TEXT NOT NULL,
    first_seq BIGINT,
    headers TEXT NOT NULL,
    body BYTEA,
    body_size BIGINT NOT NULL
);
CREATE INDEX inbound_by_source ON inbound (source, id);
CREATE INDEX inbound_capped ON inbound (id) WHERE capped;
CREATE INDEX inbound_by_event ON inbound (first_seq) WHERE NOT capped;
