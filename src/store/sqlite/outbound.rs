//! The SQLite delivery queue: endpoints, deliveries, attempts and the
//! outbox cursor (types and invariants: `store::outbound`).
//!
//! Writes run on the writer thread (`SqliteStore::write`), each in its own
//! transaction, and reply after the commit; reads use the reader pool. A
//! claim leases rows by moving `next_ms` to the lease's end; only the claim
//! whose attempt number matches records the result.

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::writer::PRUNE_CHUNK;
use super::{SqliteStore, meta_seq};
use crate::store::rows::{
    self, ATTEMPT_COLUMNS, Columns, ENDPOINT_COLUMNS, PENDING_COLUMNS, json_text,
};
use crate::store::{
    AttemptOutcome, AttemptStatus, AttemptView, ClaimWant, Claimed, Delivery, Endpoint,
    EndpointPatch, EndpointSecret, Health, NewDelivery, NewEndpoint, NextStep, OutboundQueue,
    OutboxAdvance, QueueStats, Seq, StoreError, now_ms,
};

/// `deliveries.status` values.
const PENDING: i64 = 0;
const SUCCEEDED: i64 = 1;
const FAILED: i64 = 2;

#[async_trait]
impl OutboundQueue for SqliteStore {
    async fn create_endpoint(&self, endpoint: NewEndpoint) -> Result<Endpoint, StoreError> {
        self.write(move |c, head| insert_endpoint(c, head, endpoint))
            .await
    }

    async fn list_endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        self.with_reader(|c| {
            c.prepare_cached(&format!(
                "SELECT {ENDPOINT_COLUMNS} FROM endpoints ORDER BY created_ms, id"
            ))?
            .query_map([], |r| rows::endpoint(r))?
            .collect()
        })
        .await
    }

    async fn get_endpoint(&self, id: &str) -> Result<Option<Endpoint>, StoreError> {
        let id = id.to_string();
        self.with_reader(move |c| select_endpoint(c, &id)).await
    }

    async fn update_endpoint(
        &self,
        id: &str,
        patch: EndpointPatch,
    ) -> Result<Option<Endpoint>, StoreError> {
        let id = id.to_string();
        self.write(move |c, _| patch_endpoint(c, &id, patch)).await
    }

    async fn delete_endpoint(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.write(move |c, _| remove_endpoint(c, &id)).await
    }

    async fn outbox_cursor(&self) -> Result<Seq, StoreError> {
        self.with_reader(|c| meta_seq(c, "outbox_cursor")).await
    }

    async fn enqueue_deliveries(
        &self,
        deliveries: Vec<NewDelivery>,
        advance: Option<OutboxAdvance>,
    ) -> Result<bool, StoreError> {
        if advance.is_some() {
            // The dispatcher's own progress: redone after a power cut.
            self.write_relaxed(move |c, _| insert_deliveries(c, &deliveries, advance))
                .await
        } else {
            // A replay the API acknowledges.
            self.write(move |c, _| insert_deliveries(c, &deliveries, advance))
                .await
        }
    }

    async fn claim_deliveries(
        &self,
        wants: Vec<ClaimWant>,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<Claimed, StoreError> {
        self.write_relaxed(move |c, _| claim(c, &wants, now_ms, lease_until_ms))
            .await
    }

    async fn record_attempts(&self, outcomes: Vec<AttemptOutcome>) -> Result<(), StoreError> {
        self.write_relaxed(move |c, _| insert_attempts(c, &outcomes))
            .await
    }

    async fn list_attempts(
        &self,
        endpoint_id: &str,
        status: Option<AttemptStatus>,
        limit: usize,
    ) -> Result<Vec<AttemptView>, StoreError> {
        let id = endpoint_id.to_string();
        self.with_reader(move |c| select_attempts(c, &id, status, limit))
            .await
    }

    async fn queue_stats(&self) -> Result<QueueStats, StoreError> {
        // Both read the partial index of pending rows only.
        self.with_reader(|c| {
            c.query_row(
                "SELECT count(*), MIN(next_ms) FROM deliveries WHERE status = 0",
                [],
                |r| {
                    Ok(QueueStats {
                        depth: r.get::<_, i64>(0)?.max(0) as u64,
                        first_due_ms: r.get(1)?,
                    })
                },
            )
        })
        .await
    }

    async fn prune_deliveries(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut removed = 0;
        // Chunk by chunk, so appends are never held up for long.
        loop {
            let n = self.write(move |c, _| prune_finished(c, before_ms)).await?;
            removed += n;
            if n == 0 {
                return Ok(removed);
            }
        }
    }
}

fn select_endpoint(c: &Connection, id: &str) -> rusqlite::Result<Option<Endpoint>> {
    c.prepare_cached(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = ?1"
    ))?
    .query_row(params![id], |r| rows::endpoint(r))
    .optional()
}

fn insert_endpoint(c: &mut Connection, head: Seq, e: NewEndpoint) -> rusqlite::Result<Endpoint> {
    let now = now_ms();
    let endpoint = Endpoint {
        id: e.id,
        url: e.url,
        channels: e.channels,
        types: e.types,
        description: e.description,
        enabled: e.enabled,
        disabled_reason: None,
        rate_limit: e.rate_limit,
        secrets: vec![EndpointSecret {
            secret: e.secret,
            expires_ms: None,
        }],
        from_seq: head,
        failing_since_ms: None,
        created_ms: now,
        updated_ms: now,
    };
    c.execute(
        &format!(
            "INSERT INTO endpoints ({ENDPOINT_COLUMNS})
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
        ),
        params![
            endpoint.id,
            endpoint.url,
            json_text(&endpoint.channels),
            json_text(&endpoint.types),
            endpoint.description,
            endpoint.enabled,
            endpoint.disabled_reason,
            endpoint.rate_limit,
            json_text(&endpoint.secrets),
            endpoint.from_seq,
            endpoint.failing_since_ms,
            endpoint.created_ms,
            endpoint.updated_ms
        ],
    )?;
    Ok(endpoint)
}

fn patch_endpoint(
    c: &mut Connection,
    id: &str,
    patch: EndpointPatch,
) -> rusqlite::Result<Option<Endpoint>> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let Some(mut e) = select_endpoint(&tx, id)? else {
        return Ok(None);
    };
    patch.apply_to(&mut e, now_ms());
    tx.execute(
        "UPDATE endpoints SET url = ?2, channels = ?3, types = ?4, description = ?5, enabled = ?6,
             disabled_reason = ?7, rate_limit = ?8, secrets = ?9, failing_since_ms = ?10,
             updated_ms = ?11
         WHERE id = ?1",
        params![
            e.id,
            e.url,
            json_text(&e.channels),
            json_text(&e.types),
            e.description,
            e.enabled,
            e.disabled_reason,
            e.rate_limit,
            json_text(&e.secrets),
            e.failing_since_ms,
            e.updated_ms
        ],
    )?;
    tx.commit()?;
    Ok(Some(e))
}

fn remove_endpoint(c: &mut Connection, id: &str) -> rusqlite::Result<bool> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let n = tx.execute("DELETE FROM endpoints WHERE id = ?1", params![id])?;
    tx.execute("DELETE FROM deliveries WHERE endpoint_id = ?1", params![id])?;
    tx.execute("DELETE FROM attempts WHERE endpoint_id = ?1", params![id])?;
    tx.commit()?;
    Ok(n > 0)
}

fn insert_deliveries(
    c: &mut Connection,
    deliveries: &[NewDelivery],
    advance: Option<OutboxAdvance>,
) -> rusqlite::Result<bool> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if let Some(advance) = advance {
        if meta_seq(&tx, "outbox_cursor")? != advance.from {
            return Ok(false);
        }
        tx.prepare_cached(
            "INSERT INTO meta (key, value) VALUES ('outbox_cursor', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )?
        .execute(params![advance.to.to_string()])?;
    }
    let now = now_ms();
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO deliveries
                 (endpoint_id, seq, event_id, msg_id, payload, status, attempts, leased, next_ms, updated_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, 0, ?6, ?7)",
        )?;
        for d in deliveries {
            insert.execute(params![
                d.endpoint_id,
                d.seq,
                d.event_id,
                d.msg_id,
                &d.payload[..],
                d.next_ms,
                now
            ])?;
        }
    }
    tx.commit()?;
    Ok(true)
}

fn claim(
    c: &mut Connection,
    wants: &[ClaimWant],
    now: i64,
    lease_until: i64,
) -> rusqlite::Result<Claimed> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut out = Claimed::default();
    {
        let mut endpoint = tx.prepare_cached(
            "SELECT url, secrets, failing_since_ms FROM endpoints WHERE id = ?1 AND enabled = 1",
        )?;
        let mut due = tx.prepare_cached(
            "SELECT id, seq, event_id, msg_id, payload, attempts FROM deliveries
             WHERE endpoint_id = ?1 AND status = 0 AND next_ms <= ?2
             ORDER BY next_ms LIMIT ?3",
        )?;
        let mut lease = tx.prepare_cached(
            "UPDATE deliveries SET attempts = attempts + 1, leased = 1, next_ms = ?2, updated_ms = ?3
             WHERE id = ?1",
        )?;
        let mut next_due = tx.prepare_cached(
            "SELECT MIN(next_ms) FROM deliveries WHERE endpoint_id = ?1 AND status = 0",
        )?;
        for want in wants {
            let found = endpoint
                .query_row(params![want.endpoint_id], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.json::<Vec<EndpointSecret>>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                })
                .optional()?;
            let Some((url, secrets, failing_since_ms)) = found else {
                out.next_due.push((want.endpoint_id.clone(), None));
                continue;
            };
            if want.max > 0 {
                let rows = due
                    .query_map(params![want.endpoint_id, now, want.max as i64], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, Seq>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, Vec<u8>>(4)?,
                            r.get::<_, u32>(5)?,
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                for (id, seq, event_id, msg_id, payload, attempts) in rows {
                    lease.execute(params![id, lease_until, now])?;
                    out.deliveries.push(Delivery {
                        id,
                        endpoint_id: want.endpoint_id.clone(),
                        seq,
                        event_id,
                        msg_id,
                        payload: payload.into(),
                        attempt: attempts + 1,
                        url: url.clone(),
                        secrets: secrets.clone(),
                        failing_since_ms,
                    });
                }
            }
            let next: Option<i64> = next_due.query_row(params![want.endpoint_id], |r| r.get(0))?;
            out.next_due.push((want.endpoint_id.clone(), next));
        }
    }
    tx.commit()?;
    Ok(out)
}

/// Records a batch of attempts in one transaction (one sync for many).
fn insert_attempts(c: &mut Connection, outcomes: &[AttemptOutcome]) -> rusqlite::Result<()> {
    let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for o in outcomes {
        insert_attempt(&tx, o)?;
    }
    tx.commit()
}

fn insert_attempt(tx: &Connection, o: &AttemptOutcome) -> rusqlite::Result<()> {
    let exists = tx
        .prepare_cached("SELECT 1 FROM deliveries WHERE id = ?1")?
        .query_row(params![o.delivery_id], |_| Ok(()))
        .optional()?
        .is_some();
    if !exists {
        // The endpoint was deleted while the attempt was in flight.
        return Ok(());
    }
    tx.prepare_cached(
        "INSERT INTO attempts (delivery_id, endpoint_id, event_id, msg_id, attempt, succeeded,
             response_status, response_body, error, duration_ms, at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        o.delivery_id,
        o.endpoint_id,
        o.event_id,
        o.msg_id,
        o.attempt,
        o.succeeded,
        o.response_status,
        o.response_body,
        o.error,
        o.duration_ms,
        o.at_ms
    ])?;
    let (status, next_ms) = match o.next {
        NextStep::Succeeded => (SUCCEEDED, o.at_ms),
        NextStep::RetryAt(at) => (PENDING, at),
        NextStep::GiveUp => (FAILED, o.at_ms),
    };
    // Only the claim that holds the row (same attempt number) moves it on.
    tx.prepare_cached(
        "UPDATE deliveries SET status = ?3, leased = 0, next_ms = ?4, updated_ms = ?5
         WHERE id = ?1 AND attempts = ?2 AND status = 0",
    )?
    .execute(params![o.delivery_id, o.attempt, status, next_ms, o.at_ms])?;
    match &o.health {
        Health::Succeeded => {
            tx.prepare_cached(
                "UPDATE endpoints SET failing_since_ms = NULL
                 WHERE id = ?1 AND failing_since_ms IS NOT NULL",
            )?
            .execute(params![o.endpoint_id])?;
        }
        Health::Failed => {
            tx.prepare_cached(
                "UPDATE endpoints SET failing_since_ms = ?2
                 WHERE id = ?1 AND failing_since_ms IS NULL",
            )?
            .execute(params![o.endpoint_id, o.at_ms])?;
        }
        Health::Disable(reason) => {
            tx.prepare_cached(
                "UPDATE endpoints SET enabled = 0, disabled_reason = ?2,
                     failing_since_ms = COALESCE(failing_since_ms, ?3), updated_ms = ?3
                 WHERE id = ?1 AND enabled = 1",
            )?
            .execute(params![o.endpoint_id, reason, o.at_ms])?;
        }
    }
    Ok(())
}

fn select_attempts(
    c: &Connection,
    endpoint_id: &str,
    status: Option<AttemptStatus>,
    limit: usize,
) -> rusqlite::Result<Vec<AttemptView>> {
    let mut out = Vec::new();
    if matches!(status, None | Some(AttemptStatus::Pending)) {
        let mut stmt = c.prepare_cached(&format!(
            "SELECT {PENDING_COLUMNS} FROM deliveries
             WHERE endpoint_id = ?1 AND status = 0 ORDER BY next_ms, id LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![endpoint_id, limit as i64], |r| rows::pending(r))?;
        for row in rows {
            out.push(row?);
        }
    }
    let remaining = limit.saturating_sub(out.len());
    if remaining > 0 && status != Some(AttemptStatus::Pending) {
        let filter = match status {
            Some(AttemptStatus::Succeeded) => "AND succeeded = 1",
            Some(AttemptStatus::Failed) => "AND succeeded = 0",
            _ => "",
        };
        let mut stmt = c.prepare_cached(&format!(
            "SELECT {ATTEMPT_COLUMNS} FROM attempts
             WHERE endpoint_id = ?1 {filter} ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![endpoint_id, remaining as i64], |r| rows::attempt(r))?;
        for row in rows {
            out.push(row?);
        }
    }
    Ok(out)
}

/// Deletes one chunk of finished deliveries and old attempts.
fn prune_finished(c: &mut Connection, before_ms: i64) -> rusqlite::Result<u64> {
    let tx = c.transaction()?;
    let mut n = tx.execute(
        "DELETE FROM deliveries WHERE id IN (
             SELECT id FROM deliveries WHERE status <> 0 AND updated_ms < ?1 LIMIT ?2)",
        params![before_ms, PRUNE_CHUNK],
    )?;
    n += tx.execute(
        "DELETE FROM attempts WHERE id IN (
             SELECT id FROM attempts WHERE at_ms < ?1 LIMIT ?2)",
        params![before_ms, PRUNE_CHUNK],
    )?;
    tx.commit()?;
    Ok(n as u64)
}
