-- Outbound webhooks on PostgreSQL (src/store/postgres.rs, src/store/outbound.rs).
-- The queue is shared by every node: a node claims due rows with
-- `FOR UPDATE SKIP LOCKED` and leases them by pushing `next_ms` to the
-- lease's end, so a row is held by one node at a time and comes back by
-- itself when its holder dies.

CREATE TABLE endpoints (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    channels TEXT NOT NULL,
    types TEXT NOT NULL,
    description TEXT NOT NULL,
    enabled BOOLEAN NOT NULL,
    disabled_reason TEXT,
    rate_limit BIGINT,
    secrets TEXT NOT NULL,
    from_seq BIGINT NOT NULL,
    failing_since_ms BIGINT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- One row: every event at or below `cursor` has its deliveries queued. It
-- moves only by compare-and-set under this row's lock, in the transaction
-- that inserts those deliveries.
CREATE TABLE outbox_state (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    cursor BIGINT NOT NULL
);
INSERT INTO outbox_state (singleton, cursor) VALUES (TRUE, 0);

-- status: 0 pending, 1 succeeded, 2 failed. `attempts` counts claims: the
-- claim holding a row is the one whose attempt number equals it.
CREATE TABLE deliveries (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    payload BYTEA NOT NULL,
    status SMALLINT NOT NULL,
    attempts INTEGER NOT NULL,
    leased BOOLEAN NOT NULL,
    next_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (endpoint_id, next_ms) WHERE status = 0;
CREATE INDEX deliveries_finished ON deliveries (updated_ms) WHERE status <> 0;
CREATE INDEX deliveries_by_endpoint ON deliveries (endpoint_id, id);

CREATE TABLE attempts (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id BIGINT NOT NULL,
    endpoint_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    succeeded BOOLEAN NOT NULL,
    response_status INTEGER,
    response_body TEXT,
    error TEXT,
    duration_ms BIGINT NOT NULL,
    at_ms BIGINT NOT NULL
);
CREATE INDEX attempts_by_endpoint ON attempts (endpoint_id, id);
CREATE INDEX attempts_by_time ON attempts (at_ms);
