-- The durable log on PostgreSQL (see src/store/postgres.rs and
-- docs/architecture.md, "Cursor order on PostgreSQL").

-- Key/value facts about the log that every node shares (the log tag).
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row: the highest seq ever assigned and the highest seq removed by
-- retention. Appenders read and advance `head` while holding the append
-- lock, so seq order is commit order on every node.
CREATE TABLE log_state (
    singleton BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (singleton),
    head BIGINT NOT NULL,
    pruned_through BIGINT NOT NULL
) WITH (fillfactor = 50);
INSERT INTO log_state (singleton, head, pruned_through) VALUES (TRUE, 0, 0);

CREATE TABLE events (
    seq BIGINT PRIMARY KEY,
    channel TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    source_id TEXT,
    time_ms BIGINT NOT NULL,
    -- The payload exactly as it arrived (json would also keep the text, but
    -- costs a parse on every insert that the API layer already did).
    data TEXT NOT NULL
);
CREATE INDEX events_by_channel ON events (channel, seq);

-- Dedupe keys outlive the events they name (store.dedupe_window).
CREATE TABLE dedupe (
    source TEXT NOT NULL,
    source_id TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    time_ms BIGINT NOT NULL,
    PRIMARY KEY (source, source_id)
);
CREATE INDEX dedupe_by_time ON dedupe (time_ms);
