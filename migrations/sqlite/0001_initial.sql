-- The embedded log on SQLite: the schema as it stood before SQLite had
-- numbered migrations (src/store/sqlite/migrate.rs). `IF NOT EXISTS`
-- throughout, so a database made before versioning (user_version 0, these
-- tables already there) takes this step as a no-op and becomes version 1.

CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    source_id TEXT,
    time_ms INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_channel ON events (channel, seq);
CREATE TABLE IF NOT EXISTS dedupe (
    source TEXT NOT NULL,
    source_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    PRIMARY KEY (source, source_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedupe_by_time ON dedupe (time_ms);

CREATE TABLE IF NOT EXISTS endpoints (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    channels TEXT NOT NULL,
    types TEXT NOT NULL,
    description TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    disabled_reason TEXT,
    rate_limit INTEGER,
    secrets TEXT NOT NULL,
    from_seq INTEGER NOT NULL,
    failing_since_ms INTEGER,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    status INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    leased INTEGER NOT NULL,
    next_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (endpoint_id, next_ms) WHERE status = 0;
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries (updated_ms) WHERE status <> 0;
CREATE INDEX IF NOT EXISTS deliveries_by_endpoint ON deliveries (endpoint_id, id);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL,
    endpoint_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    succeeded INTEGER NOT NULL,
    response_status INTEGER,
    response_body TEXT,
    error TEXT,
    duration_ms INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_by_endpoint ON attempts (endpoint_id, id);
CREATE INDEX IF NOT EXISTS attempts_by_time ON attempts (at_ms);
-- The inspector's record of inbound webhooks. `capped = 0`: an accepted new
-- message, removed with its first event; `capped = 1`: a refusal or a
-- duplicate, of which the newest INBOUND_CAPPED_KEEP are kept. `body` NULL
-- means "the same bytes as the data of event `first_seq`" (stored once).
CREATE TABLE IF NOT EXISTS inbound (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    duplicate INTEGER NOT NULL,
    capped INTEGER NOT NULL,
    reason TEXT,
    detail TEXT,
    source_id TEXT,
    type TEXT,
    channels TEXT NOT NULL,
    seqs TEXT NOT NULL,
    first_seq INTEGER,
    headers TEXT NOT NULL,
    body BLOB,
    body_size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS inbound_by_source ON inbound (source, id);
CREATE INDEX IF NOT EXISTS inbound_capped ON inbound (id) WHERE capped = 1;
CREATE INDEX IF NOT EXISTS inbound_by_event ON inbound (first_seq) WHERE capped = 0;
