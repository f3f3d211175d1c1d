//! The PostgreSQL delivery queue: endpoints, deliveries, attempts and the
//! outbox cursor (types and invariants: `store::outbound`).
//!
//! The delivery queue is shared by every node (docs/architecture.md,
//! "Outbound webhooks on several nodes"):
//! - due work has a table of its own (`deliveries_due`, migration 0005): one
//!   row per pending delivery, deleted when the delivery finishes, so claims
//!   and the next-due read (the first entry of an endpoint's range) never
//!   walk finished deliveries, and `deliveries` (the history) has no index
//!   on a column the hot path updates, so those updates can be HOT;
//! - a claim selects due rows `FOR UPDATE SKIP LOCKED` and, in the same
//!   transaction, leases them (attempts + 1, `next_ms` = the lease's end).
//!   Rows another node is claiming are skipped, not waited for; a row whose
//!   lease another node committed meanwhile is re-checked against `next_ms`
//!   by PostgreSQL and dropped. So a row has one holder at a time, and it
//!   comes back by itself when a dead holder's lease ends;
//! - the outbox cursor lives in one row (`outbox_state`) that the enqueuing
//!   transaction locks `FOR UPDATE` and moves by compare-and-set: a second
//!   node's dispatcher waits for the lock, sees the moved cursor, writes
//!   nothing and re-reads — an event's deliveries are queued exactly once;
//! - bookkeeping that only repeats deliveries when lost (claims, attempt
//!   results, the dispatcher's pages) commits with `synchronous_commit = off`;
//!   endpoints and replays the API acknowledges are durable first.

use async_trait::async_trait;
use sqlx::postgres::PgPool;
use sqlx::{PgConnection, Row};

use super::PostgresStore;
use crate::store::rows::{self, ATTEMPT_COLUMNS, Columns, ENDPOINT_COLUMNS, json_text};
use crate::store::{
    AttemptOutcome, AttemptStatus, AttemptView, ClaimWant, Claimed, Delivery, Endpoint,
    EndpointPatch, EndpointSecret, Health, NewDelivery, NewEndpoint, NextStep, OutboundQueue,
    OutboxAdvance, QueueStats, Seq, StoreError, now_ms,
};

const PENDING: i16 = 0;
const SUCCEEDED: i16 = 1;
const FAILED: i16 = 2;
/// Finished deliveries (and attempts) deleted per transaction.
const PRUNE_DELIVERIES_CHUNK: i64 = 5_000;

#[async_trait]
impl OutboundQueue for PostgresStore {
    async fn create_endpoint(&self, endpoint: NewEndpoint) -> Result<Endpoint, StoreError> {
        let now = now_ms();
        let secrets = vec![EndpointSecret {
            secret: endpoint.secret,
            expires_ms: None,
        }];
        // `from_seq` is the head in the inserting statement's snapshot: every
        // event above it commits later (seq order is commit order).
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO endpoints ({ENDPOINT_COLUMNS})
             SELECT $1, $2, $3, $4, $5, $6, NULL, $7, $8, head, NULL, $9, $9 FROM log_state
             RETURNING {ENDPOINT_COLUMNS}"
        )))
        .bind(&endpoint.id)
        .bind(&endpoint.url)
        .bind(json_text(&endpoint.channels))
        .bind(json_text(&endpoint.types))
        .bind(&endpoint.description)
        .bind(endpoint.enabled)
        .bind(endpoint.rate_limit.map(i64::from))
        .bind(json_text(&secrets))
        .bind(now)
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::from)?;
        rows::endpoint(&row)
    }

    async fn list_endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints ORDER BY created_ms, id"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(StoreError::from)?;
        rows.iter().map(rows::endpoint).collect()
    }

    async fn get_endpoint(&self, id: &str) -> Result<Option<Endpoint>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(StoreError::from)?;
        select_endpoint(&mut conn, id, false).await
    }

    async fn update_endpoint(
        &self,
        id: &str,
        patch: EndpointPatch,
    ) -> Result<Option<Endpoint>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let Some(mut endpoint) = select_endpoint(&mut tx, id, true).await? else {
            return Ok(None);
        };
        patch.apply_to(&mut endpoint, now_ms());
        write_endpoint(&mut tx, &endpoint).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(Some(endpoint))
    }

    async fn delete_endpoint(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        // Deliveries before the endpoint: the order `record_attempts` locks in.
        // Due work first: the order claims and `record_attempts` lock in.
        sqlx::query("DELETE FROM deliveries_due WHERE endpoint_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        sqlx::query("DELETE FROM deliveries WHERE endpoint_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        sqlx::query("DELETE FROM attempts WHERE endpoint_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?;
        let n = sqlx::query("DELETE FROM endpoints WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::from)?
            .rows_affected();
        tx.commit().await.map_err(StoreError::from)?;
        Ok(n > 0)
    }

    async fn outbox_cursor(&self) -> Result<Seq, StoreError> {
        sqlx::query_scalar("SELECT cursor FROM outbox_state")
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::from)
    }

    async fn enqueue_deliveries(
        &self,
        deliveries: Vec<NewDelivery>,
        advance: Option<OutboxAdvance>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        if let Some(advance) = advance {
            // The dispatcher's own progress: redone if lost in a crash.
            relax_commit(&mut tx).await?;
            // Compare-and-set under the row lock: a dispatcher on another
            // node waits here, then finds the cursor moved and writes nothing.
            let cursor: Seq = sqlx::query_scalar("SELECT cursor FROM outbox_state FOR UPDATE")
                .fetch_one(&mut *tx)
                .await
                .map_err(StoreError::from)?;
            if cursor != advance.from {
                return Ok(false);
            }
            sqlx::query("UPDATE outbox_state SET cursor = $1")
                .bind(advance.to)
                .execute(&mut *tx)
                .await
                .map_err(StoreError::from)?;
        }
        insert_deliveries(&mut tx, &deliveries).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(true)
    }

    async fn claim_deliveries(
        &self,
        wants: Vec<ClaimWant>,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<Claimed, StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        relax_commit(&mut tx).await?;
        let claimed = claim(&mut tx, &wants, now_ms, lease_until_ms).await?;
        tx.commit().await.map_err(StoreError::from)?;
        Ok(claimed)
    }

    async fn record_attempts(&self, outcomes: Vec<AttemptOutcome>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        relax_commit(&mut tx).await?;
        insert_attempts(&mut tx, &outcomes).await?;
        tx.commit().await.map_err(StoreError::from)
    }

    async fn list_attempts(
        &self,
        endpoint_id: &str,
        status: Option<AttemptStatus>,
        limit: usize,
    ) -> Result<Vec<AttemptView>, StoreError> {
        select_attempts(&self.pool, endpoint_id, status, limit).await
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        let (depth, first_due_ms): (i64, Option<i64>) =
            sqlx::query_as("SELECT count(*), min(next_ms) FROM deliveries_due")
                .fetch_one(&self.pool)
                .await?;
        Ok(QueueStats {
            depth: depth.max(0) as u64,
            first_due_ms,
        })
    }

    async fn prune_deliveries(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut removed = 0;
        // Chunk by chunk: short transactions, short row locks.
        loop {
            let mut n = sqlx::query(
                // Finished rows are the oldest ids, mostly: the scan in id
                // order stops early (there is no index on finished rows, so
                // that finishing one stays a HOT update).
                "DELETE FROM deliveries WHERE id IN (
                     SELECT id FROM deliveries WHERE status <> 0 AND updated_ms < $1
                     ORDER BY id LIMIT $2)",
            )
            .bind(before_ms)
            .bind(PRUNE_DELIVERIES_CHUNK)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?
            .rows_affected();
            n += sqlx::query(
                "DELETE FROM attempts WHERE id IN (
                     SELECT id FROM attempts WHERE at_ms < $1 LIMIT $2)",
            )
            .bind(before_ms)
            .bind(PRUNE_DELIVERIES_CHUNK)
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?
            .rows_affected();
            removed += n;
            if n == 0 {
                return Ok(removed);
            }
        }
    }
}

async fn select_endpoint(
    conn: &mut PgConnection,
    id: &str,
    lock: bool,
) -> Result<Option<Endpoint>, StoreError> {
    let lock = if lock { "FOR UPDATE" } else { "" };
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = $1 {lock}"
    )))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(StoreError::from)?;
    row.as_ref().map(rows::endpoint).transpose()
}

/// Writes every column of `e` (the row exists and is locked).
async fn write_endpoint(conn: &mut PgConnection, e: &Endpoint) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE endpoints SET url = $2, channels = $3, types = $4, description = $5, enabled = $6,
             disabled_reason = $7, rate_limit = $8, secrets = $9, failing_since_ms = $10,
             updated_ms = $11
         WHERE id = $1",
    )
    .bind(&e.id)
    .bind(&e.url)
    .bind(json_text(&e.channels))
    .bind(json_text(&e.types))
    .bind(&e.description)
    .bind(e.enabled)
    .bind(&e.disabled_reason)
    .bind(e.rate_limit.map(i64::from))
    .bind(json_text(&e.secrets))
    .bind(e.failing_since_ms)
    .bind(e.updated_ms)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::from)?;
    Ok(())
}

/// Turns off the commit's wait for the WAL flush, for this transaction only.
async fn relax_commit(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *conn)
        .await
        .map_err(StoreError::from)?;
    Ok(())
}

async fn insert_deliveries(
    conn: &mut PgConnection,
    deliveries: &[NewDelivery],
) -> Result<(), StoreError> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let mut endpoint_ids = Vec::with_capacity(deliveries.len());
    let mut seqs = Vec::with_capacity(deliveries.len());
    let mut event_ids = Vec::with_capacity(deliveries.len());
    let mut msg_ids = Vec::with_capacity(deliveries.len());
    let mut payloads = Vec::with_capacity(deliveries.len());
    let mut next = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        endpoint_ids.push(d.endpoint_id.as_str());
        seqs.push(d.seq);
        event_ids.push(d.event_id.as_str());
        msg_ids.push(d.msg_id.as_str());
        payloads.push(&d.payload[..]);
        next.push(d.next_ms);
    }
    // WITH ORDINALITY keeps the given order in the ids; each new delivery
    // is due work at once.
    sqlx::query(
        "WITH queued AS (
             INSERT INTO deliveries
                 (endpoint_id, seq, event_id, msg_id, payload, status, attempts, leased, next_ms, updated_ms)
             SELECT e, s, ev, m, p, 0, 0, FALSE, n, $7
             FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bytea[], $6::bigint[])
                  WITH ORDINALITY AS t(e, s, ev, m, p, n, ord)
             ORDER BY ord
             RETURNING id, endpoint_id, next_ms
         )
         INSERT INTO deliveries_due (delivery_id, endpoint_id, next_ms)
         SELECT id, endpoint_id, next_ms FROM queued",
    )
    .bind(endpoint_ids)
    .bind(seqs)
    .bind(event_ids)
    .bind(msg_ids)
    .bind(payloads)
    .bind(next)
    .bind(now)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::from)?;
    Ok(())
}

/// Leases the due rows of the wanted endpoints (one transaction).
async fn claim(
    conn: &mut PgConnection,
    wants: &[ClaimWant],
    now: i64,
    lease_until: i64,
) -> Result<Claimed, StoreError> {
    let mut out = Claimed::default();
    for want in wants {
        let endpoint = sqlx::query(
            "SELECT url, secrets, failing_since_ms FROM endpoints WHERE id = $1 AND enabled",
        )
        .bind(&want.endpoint_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(StoreError::from)?;
        let Some(endpoint) = endpoint else {
            out.next_due.push((want.endpoint_id.clone(), None));
            continue;
        };
        let url: String = endpoint.try_get(0).map_err(StoreError::corrupt)?;
        let secrets: Vec<EndpointSecret> = endpoint.json(1)?;
        let failing_since_ms: Option<i64> = endpoint.try_get(2).map_err(StoreError::corrupt)?;
        if want.max > 0 {
            // SKIP LOCKED: rows another node is claiming right now are not
            // waited for; a row it has leased meanwhile fails the re-check
            // of `next_ms <= now` and is not returned.
            // The due rows are locked (and leased) first, then their
            // deliveries: the order `record_attempts` and `delete_endpoint`
            // lock in too.
            let rows = sqlx::query(
                "WITH due AS (
                     SELECT delivery_id, next_ms FROM deliveries_due
                     WHERE endpoint_id = $1 AND next_ms <= $2
                     ORDER BY next_ms LIMIT $3
                     FOR UPDATE SKIP LOCKED
                 ), leased AS (
                     UPDATE deliveries_due q SET next_ms = $4
                     FROM due WHERE q.delivery_id = due.delivery_id
                     RETURNING q.delivery_id, due.next_ms AS due_ms
                 )
                 UPDATE deliveries d
                 SET attempts = d.attempts + 1, leased = TRUE, next_ms = $4, updated_ms = $2
                 FROM leased WHERE d.id = leased.delivery_id
                 RETURNING d.id, d.seq, d.event_id, d.msg_id, d.payload, d.attempts, leased.due_ms",
            )
            .bind(&want.endpoint_id)
            .bind(now)
            .bind(want.max.min(i64::MAX as usize) as i64)
            .bind(lease_until)
            .fetch_all(&mut *conn)
            .await
            .map_err(StoreError::from)?;
            let mut leased = Vec::with_capacity(rows.len());
            for row in &rows {
                let attempts: i32 = row.try_get(5).map_err(StoreError::corrupt)?;
                let due_ms: i64 = row.try_get(6).map_err(StoreError::corrupt)?;
                let payload: Vec<u8> = row.try_get(4).map_err(StoreError::corrupt)?;
                leased.push((
                    due_ms,
                    Delivery {
                        id: row.try_get(0).map_err(StoreError::corrupt)?,
                        endpoint_id: want.endpoint_id.clone(),
                        seq: row.try_get(1).map_err(StoreError::corrupt)?,
                        event_id: row.try_get(2).map_err(StoreError::corrupt)?,
                        msg_id: row.try_get(3).map_err(StoreError::corrupt)?,
                        payload: payload.into(),
                        attempt: u32::try_from(attempts).map_err(StoreError::corrupt)?,
                        url: url.clone(),
                        secrets: secrets.clone(),
                        failing_since_ms,
                    },
                ));
            }
            // RETURNING has no order: oldest due first, as selected.
            leased.sort_by_key(|(due, d)| (*due, d.id));
            out.deliveries.extend(leased.into_iter().map(|(_, d)| d));
        }
        let next: Option<i64> = sqlx::query_scalar(
            // The first entry of the endpoint's range in the due index.
            "SELECT MIN(next_ms) FROM deliveries_due WHERE endpoint_id = $1",
        )
        .bind(&want.endpoint_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(StoreError::from)?;
        out.next_due.push((want.endpoint_id.clone(), next));
    }
    Ok(out)
}

/// Records attempts (one transaction). Rows are locked in a fixed order —
/// due rows by id, then deliveries by id, then endpoints by id — so batches
/// recorded by several nodes at once do not deadlock each other, nor with a
/// claim (which locks due rows before their deliveries, and skips locked
/// due rows instead of waiting).
async fn insert_attempts(
    conn: &mut PgConnection,
    outcomes: &[AttemptOutcome],
) -> Result<(), StoreError> {
    let mut recorded: Vec<&AttemptOutcome> = Vec::with_capacity(outcomes.len());
    for o in outcomes {
        let inserted = sqlx::query(
            "INSERT INTO attempts (delivery_id, endpoint_id, event_id, msg_id, attempt, succeeded,
                 response_status, response_body, error, duration_ms, at_ms)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11
             WHERE EXISTS (SELECT 1 FROM deliveries WHERE id = $1)",
        )
        .bind(o.delivery_id)
        .bind(&o.endpoint_id)
        .bind(&o.event_id)
        .bind(&o.msg_id)
        .bind(i32::try_from(o.attempt).unwrap_or(i32::MAX))
        .bind(o.succeeded)
        .bind(o.response_status.map(i32::from))
        .bind(&o.response_body)
        .bind(&o.error)
        .bind(o.duration_ms)
        .bind(o.at_ms)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::from)?
        .rows_affected();
        // No row: the endpoint was deleted while the attempt was in flight.
        if inserted > 0 {
            recorded.push(o);
        }
    }
    let mut by_delivery = recorded.clone();
    by_delivery.sort_by_key(|o| o.delivery_id);
    let ids: Vec<i64> = by_delivery.iter().map(|o| o.delivery_id).collect();
    sqlx::query(
        "SELECT 1 FROM deliveries_due WHERE delivery_id = ANY($1)
         ORDER BY delivery_id FOR UPDATE",
    )
    .bind(&ids)
    .execute(&mut *conn)
    .await
    .map_err(StoreError::from)?;
    for o in by_delivery {
        let (status, next_ms) = match o.next {
            NextStep::Succeeded => (SUCCEEDED, o.at_ms),
            NextStep::RetryAt(at) => (PENDING, at),
            NextStep::GiveUp => (FAILED, o.at_ms),
        };
        // Only the claim that holds the row (same attempt number) moves it
        // on; a retry stays due work (at its new time), a finished delivery
        // leaves the due table.
        sqlx::query(
            "WITH moved AS (
                 UPDATE deliveries SET status = $3, leased = FALSE, next_ms = $4, updated_ms = $5
                 WHERE id = $1 AND attempts = $2 AND status = 0
                 RETURNING id
             ), finished AS (
                 DELETE FROM deliveries_due
                 WHERE $3 <> 0 AND delivery_id IN (SELECT id FROM moved)
             )
             UPDATE deliveries_due SET next_ms = $4
             WHERE $3 = 0 AND delivery_id IN (SELECT id FROM moved)",
        )
        .bind(o.delivery_id)
        .bind(i32::try_from(o.attempt).unwrap_or(i32::MAX))
        .bind(status)
        .bind(next_ms)
        .bind(o.at_ms)
        .execute(&mut *conn)
        .await
        .map_err(StoreError::from)?;
    }
    // Stable: one endpoint's outcomes keep their order.
    let mut by_endpoint = recorded;
    by_endpoint.sort_by(|a, b| a.endpoint_id.cmp(&b.endpoint_id));
    for o in by_endpoint {
        let query = match &o.health {
            Health::Succeeded => sqlx::query(
                "UPDATE endpoints SET failing_since_ms = NULL
                 WHERE id = $1 AND failing_since_ms IS NOT NULL",
            )
            .bind(&o.endpoint_id),
            Health::Failed => sqlx::query(
                "UPDATE endpoints SET failing_since_ms = $2
                 WHERE id = $1 AND failing_since_ms IS NULL",
            )
            .bind(&o.endpoint_id)
            .bind(o.at_ms),
            Health::Disable(reason) => sqlx::query(
                "UPDATE endpoints SET enabled = FALSE, disabled_reason = $2,
                     failing_since_ms = COALESCE(failing_since_ms, $3), updated_ms = $3
                 WHERE id = $1 AND enabled",
            )
            .bind(&o.endpoint_id)
            .bind(reason)
            .bind(o.at_ms),
        };
        query.execute(&mut *conn).await.map_err(StoreError::from)?;
    }
    Ok(())
}

async fn select_attempts(
    pool: &PgPool,
    endpoint_id: &str,
    status: Option<AttemptStatus>,
    limit: usize,
) -> Result<Vec<AttemptView>, StoreError> {
    let limit = limit.min(i64::MAX as usize) as i64;
    let mut out = Vec::new();
    if matches!(status, None | Some(AttemptStatus::Pending)) {
        // Pending deliveries are the endpoint's due work (the columns of
        // `rows::PENDING_COLUMNS`, the due time from the due table).
        let rows = sqlx::query(
            "SELECT d.id, d.event_id, d.msg_id, d.attempts, q.next_ms
             FROM deliveries_due q JOIN deliveries d ON d.id = q.delivery_id
             WHERE q.endpoint_id = $1 ORDER BY q.next_ms, q.delivery_id LIMIT $2",
        )
        .bind(endpoint_id)
        .bind(limit)
        .fetch_all(pool)
        .await?;
        for r in &rows {
            out.push(rows::pending(r)?);
        }
    }
    let remaining = limit - out.len() as i64;
    if remaining > 0 && status != Some(AttemptStatus::Pending) {
        let filter = match status {
            Some(AttemptStatus::Succeeded) => "AND succeeded",
            Some(AttemptStatus::Failed) => "AND NOT succeeded",
            _ => "",
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts
             WHERE endpoint_id = $1 {filter} ORDER BY id DESC LIMIT $2"
        )))
        .bind(endpoint_id)
        .bind(remaining)
        .fetch_all(pool)
        .await?;
        for r in &rows {
            out.push(rows::attempt(r)?);
        }
    }
    Ok(out)
}
