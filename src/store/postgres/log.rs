//! The PostgreSQL event log: appends (handed to this node's writer), page
//! reads, bounds and retention.
//!
//! Invariants: a page and the head it may be resumed from come from one
//! statement (one snapshot); retention may run on any node, several at
//! once: deletes are idempotent, `pruned_through` only grows, and pruning
//! never takes the append lock.

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgRow};
use tokio::sync::oneshot;

use super::PostgresStore;
use super::writer::AppendRequest;
use crate::store::rows::{self, Columns};
use crate::store::{Appended, Bounds, EventLog, NewMessage, Page, Retention, Seq, StoreError};

/// Events deleted per retention transaction.
const PRUNE_CHUNK: i64 = 20_000;

#[async_trait]
impl EventLog for PostgresStore {
    fn log_tag(&self) -> &str {
        &self.tag
    }

    async fn append(&self, messages: Vec<NewMessage>) -> Result<Vec<Appended>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(AppendRequest {
                messages,
                inbound: None,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx.await.map_err(|_| StoreError::Closed)??.0)
    }

    async fn read(
        &self,
        channels: &[String],
        after: Seq,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let limit = limit.max(1);
        let rows = sqlx::query(READ_PAGE)
            .bind(channels)
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        page_from_rows(&rows, after, limit)
    }

    async fn bounds(&self) -> Result<Bounds, StoreError> {
        let (head, pruned_through): (Seq, Seq) =
            sqlx::query_as("SELECT head, pruned_through FROM log_state")
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::from)?;
        Ok(Bounds {
            pruned_through,
            head,
        })
    }

    async fn prune(&self, retention: Retention) -> Result<u64, StoreError> {
        prune(&self.pool, retention).await.map_err(StoreError::from)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.sender()?;
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(StoreError::from)?;
        Ok(())
    }

    async fn read_log(&self, after: Seq, limit: usize) -> Result<Page, StoreError> {
        let limit = limit.max(1);
        let rows = sqlx::query(READ_LOG_PAGE)
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        page_from_rows(&rows, after, limit)
    }

    async fn close(&self) {
        // Dropping the last sender lets the writer finish its queue and exit.
        self.writer_tx.lock().expect("writer sender lock").take();
        let writer = self.writer.lock().expect("writer lock").take();
        if let Some(writer) = writer {
            let _ = writer.await;
        }
        for task in self.background.lock().expect("background lock").drain(..) {
            task.abort();
        }
        self.pool.close().await;
    }
}

/// A page from rows of `READ_PAGE` / `READ_LOG_PAGE`: every row carries the
/// head (column 7) from the same snapshot; a row with no seq is the head alone.
fn page_from_rows(rows: &[PgRow], after: Seq, limit: usize) -> Result<Page, StoreError> {
    let Some(first) = rows.first() else {
        return Err(StoreError::corrupt("log_state has no row"));
    };
    let head: Seq = first.int(7)?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        if row.opt_int(0)?.is_some() {
            events.push(rows::event(row)?);
        }
    }
    Ok(rows::page(events, after, limit, head))
}

/// A page and the head from one snapshot (one statement): at least one row,
/// whose event columns are NULL when the page is empty.
const READ_PAGE: &str = "
SELECT e.seq, e.channel, e.type, e.source, e.source_id, e.time_ms, e.data, l.head
FROM log_state l
LEFT JOIN LATERAL (
    SELECT * FROM events WHERE channel = ANY($1) AND seq > $2 ORDER BY seq LIMIT $3
) e ON TRUE
ORDER BY e.seq";

/// `READ_PAGE` over every channel (the outbox dispatcher, replay).
const READ_LOG_PAGE: &str = "
SELECT e.seq, e.channel, e.type, e.source, e.source_id, e.time_ms, e.data, l.head
FROM log_state l
LEFT JOIN LATERAL (
    SELECT * FROM events WHERE seq > $1 ORDER BY seq LIMIT $2
) e ON TRUE
ORDER BY e.seq";

/// Deletes are idempotent and `pruned_through` only grows, so racing nodes
/// agree; appends are not blocked (pruning never takes the append lock).
async fn prune(pool: &PgPool, retention: Retention) -> Result<u64, sqlx::Error> {
    let mut removed = 0u64;
    let mut now: i64;
    loop {
        let head: Seq;
        (head, now) = sqlx::query_as(
            "SELECT head, floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint FROM log_state",
        )
        .fetch_one(pool)
        .await?;
        let age_cutoff = now.saturating_sub(retention.max_age_ms);
        // The first event young enough to keep; everything before it goes.
        let first_young: Option<Seq> =
            sqlx::query_scalar("SELECT seq FROM events WHERE time_ms >= $1 ORDER BY seq LIMIT 1")
                .bind(age_cutoff)
                .fetch_optional(pool)
                .await?;
        let mut keep_from = first_young.unwrap_or(head + 1);
        if retention.max_events > 0 {
            keep_from = keep_from.max(head + 1 - retention.max_events.min(i64::MAX as u64) as i64);
        }
        let oldest: Option<Seq> = sqlx::query_scalar("SELECT min(seq) FROM events")
            .fetch_one(pool)
            .await?;
        let Some(oldest) = oldest.filter(|o| *o < keep_from) else {
            break;
        };
        let upto = keep_from.min(oldest + PRUNE_CHUNK) - 1;
        let mut tx = pool.begin().await?;
        let n = sqlx::query("DELETE FROM events WHERE seq <= $1")
            .bind(upto)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        // Inspector records of accepted webhooks go with their events.
        sqlx::query("DELETE FROM inbound WHERE NOT capped AND first_seq <= $1")
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE log_state SET pruned_through = greatest(pruned_through, $1)")
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        removed += n;
    }
    if retention.dedupe_window_ms < i64::MAX {
        sqlx::query("DELETE FROM dedupe WHERE time_ms < $1")
            .bind(now.saturating_sub(retention.dedupe_window_ms))
            .execute(pool)
            .await?;
    }
    Ok(removed)
}
