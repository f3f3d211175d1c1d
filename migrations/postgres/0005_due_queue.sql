-- The delivery queue's due work in a table of its own (issue 18).
-- `deliveries` keeps every delivery (history for the attempts API and
-- replay); `deliveries_due` holds one row per pending delivery and nothing
-- else: a claim finds due work through an index that holds only due work,
-- a completion deletes its row, and the next due time is the first entry of
-- the endpoint's range. So the cost of a claim does not grow with the
-- number of finished deliveries. Updates of `deliveries` on the hot path
-- (attempts, lease, status) touch no indexed column and can be HOT.
DROP INDEX deliveries_due;
DROP INDEX deliveries_finished;

CREATE TABLE deliveries_due (
    delivery_id BIGINT PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    -- When the delivery is due: its next attempt, or its lease's end.
    next_ms BIGINT NOT NULL
) WITH (fillfactor = 50);
CREATE INDEX deliveries_due_by_endpoint ON deliveries_due (endpoint_id, next_ms);

INSERT INTO deliveries_due (delivery_id, endpoint_id, next_ms)
    SELECT id, endpoint_id, next_ms FROM deliveries WHERE status = 0;

-- Room on each page for the new version of a row updated in place.
ALTER TABLE deliveries SET (fillfactor = 70);
