//! The PostgreSQL inspector's record of inbound webhooks.
//!
//! Invariants (see `store::InboundLog`): accepted records are inserted by
//! the writer in the transaction of their group; refusals and duplicates
//! are capped to the newest `INBOUND_CAPPED_KEEP` per source on every insert; ids
//! follow insert order; a new message's body equal to its event's data is
//! stored once (`body` NULL).

use async_trait::async_trait;
use sqlx::{PgConnection, Row};
use tokio::sync::oneshot;

use super::PostgresStore;
use super::writer::AppendRequest;
use crate::store::rows::{self, Columns};
use crate::store::{
    Appended, INBOUND_CAPPED_KEEP, InboundFilter, InboundId, InboundLog, InboundRecord,
    InboundStatus, NewInbound, NewMessage, Seq, StoreError,
};

#[async_trait]
impl InboundLog for PostgresStore {
    async fn append_webhook(
        &self,
        message: NewMessage,
        inbound: NewInbound,
    ) -> Result<(Appended, InboundId), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(AppendRequest {
                messages: vec![message],
                inbound: Some(inbound),
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        let (mut appended, id) = rx.await.map_err(|_| StoreError::Closed)??;
        match (appended.pop(), id) {
            (Some(a), Some(id)) => Ok((a, id)),
            _ => Err(StoreError::internal("a webhook append returned no record")),
        }
    }

    async fn record_rejected(&self, inbound: NewInbound) -> Result<InboundId, StoreError> {
        let mut records = InboundColumns::default();
        records.push(&inbound, InboundStatus::Rejected, None, true);
        let mut tx = self.pool.begin().await.map_err(StoreError::from)?;
        let now: i64 = sqlx::query_scalar(
            "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(StoreError::from)?;
        let ids = records
            .insert(&mut tx, now)
            .await
            .map_err(StoreError::from)?;
        tx.commit().await.map_err(StoreError::from)?;
        ids.first()
            .copied()
            .ok_or_else(|| StoreError::internal("no record id"))
    }

    async fn list_inbound(&self, filter: InboundFilter) -> Result<Vec<InboundRecord>, StoreError> {
        let rows = sqlx::query(LIST_INBOUND)
            .bind(filter.source)
            .bind(filter.status.map(InboundStatus::as_str))
            .bind(filter.before)
            .bind(filter.limit.clamp(1, 10_000) as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::from)?;
        rows.iter().map(rows::inbound).collect()
    }

    async fn get_inbound(&self, id: InboundId) -> Result<Option<InboundRecord>, StoreError> {
        let Some(row) = sqlx::query(GET_INBOUND)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::from)?
        else {
            return Ok(None);
        };
        let mut record = rows::inbound(&row)?;
        record.headers = row.json(12)?;
        let body: Option<Vec<u8>> = row.try_get(13)?;
        record.body = body.map(bytes::Bytes::from);
        Ok(Some(record))
    }
}

#[derive(Default)]
pub(super) struct InboundColumns<'a> {
    pub(super) source: Vec<&'a str>,
    status: Vec<&'static str>,
    duplicate: Vec<bool>,
    reason: Vec<Option<&'a str>>,
    detail: Vec<Option<&'a str>>,
    source_id: Vec<Option<&'a str>>,
    kind: Vec<Option<&'a str>>,
    channels: Vec<String>,
    seqs: Vec<String>,
    first_seq: Vec<Option<Seq>>,
    headers: Vec<String>,
    body: Vec<Option<&'a [u8]>>,
    body_size: Vec<i64>,
}

const INSERT_INBOUND: &str = "
INSERT INTO inbound (time_ms, source, status, duplicate, capped, reason, detail, source_id,
                     type, channels, seqs, first_seq, headers, body, body_size)
SELECT $1, source, status, duplicate, duplicate OR status = 'rejected', reason, detail,
       source_id, type, channels, seqs, first_seq, headers, body, body_size
FROM UNNEST($2::text[], $3::text[], $4::bool[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::text[], $11::bigint[], $12::text[], $13::bytea[],
            $14::bigint[])
     WITH ORDINALITY
     AS t(source, status, duplicate, reason, detail, source_id, type, channels, seqs,
          first_seq, headers, body, body_size, ord)
ORDER BY ord
RETURNING id";

/// Keeps only the newest `INBOUND_CAPPED_KEEP` capped records of a source.
const TRIM_INBOUND: &str = "
DELETE FROM inbound WHERE capped AND source = $2 AND id <= (
    SELECT id FROM inbound WHERE capped AND source = $2 ORDER BY id DESC OFFSET $1 LIMIT 1)";

impl<'a> InboundColumns<'a> {
    /// The accepted deliveries of a group, with their append outcomes.
    pub(super) fn accepted(
        group: &'a [AppendRequest],
        outcomes: &[Vec<Appended>],
    ) -> InboundColumns<'a> {
        let mut c = InboundColumns::default();
        for (req, out) in group.iter().zip(outcomes) {
            let (Some(inbound), Some(m), Some(a)) =
                (&req.inbound, req.messages.first(), out.first())
            else {
                continue;
            };
            // A new message's body is usually its event's data: keep it once.
            let same = !a.duplicate && inbound.body.as_ref() == m.data.get().as_bytes();
            c.push(inbound, InboundStatus::Accepted, Some((m, a)), !same);
        }
        c
    }

    pub(super) fn push(
        &mut self,
        inbound: &'a NewInbound,
        status: InboundStatus,
        accepted: Option<(&'a NewMessage, &Appended)>,
        keep_body: bool,
    ) {
        self.source.push(&inbound.source);
        self.status.push(status.as_str());
        self.duplicate
            .push(accepted.is_some_and(|(_, a)| a.duplicate));
        self.reason.push(inbound.reason.as_deref());
        self.detail.push(inbound.detail.as_deref());
        self.source_id
            .push(accepted.and_then(|(m, _)| m.source_id.as_deref()));
        self.kind.push(accepted.map(|(m, _)| m.kind.as_str()));
        self.channels.push(
            serde_json::to_string(accepted.map_or(&[][..], |(m, _)| m.channels.as_slice()))
                .expect("strings serialize"),
        );
        self.seqs.push(
            serde_json::to_string(accepted.map_or(&[][..], |(_, a)| a.seqs.as_slice()))
                .expect("numbers serialize"),
        );
        self.first_seq
            .push(accepted.and_then(|(_, a)| a.seqs.first().copied()));
        self.headers
            .push(serde_json::to_string(&inbound.headers).expect("string pairs serialize"));
        self.body.push(keep_body.then_some(inbound.body.as_ref()));
        self.body_size
            .push(inbound.body_size.min(i64::MAX as u64) as i64);
    }

    /// Inserts the records (ids ascending in push order) and trims the capped ones.
    pub(super) async fn insert(
        &self,
        conn: &mut PgConnection,
        now: i64,
    ) -> Result<Vec<InboundId>, sqlx::Error> {
        if self.source.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids: Vec<InboundId> = sqlx::query_scalar(INSERT_INBOUND)
            .bind(now)
            .bind(&self.source)
            .bind(&self.status)
            .bind(&self.duplicate)
            .bind(&self.reason)
            .bind(&self.detail)
            .bind(&self.source_id)
            .bind(&self.kind)
            .bind(&self.channels)
            .bind(&self.seqs)
            .bind(&self.first_seq)
            .bind(&self.headers)
            .bind(&self.body)
            .bind(&self.body_size)
            .fetch_all(&mut *conn)
            .await?;
        // Identity values follow the insert order (ORDER BY ord).
        ids.sort_unstable();
        let mut capped_sources: Vec<&str> = self
            .duplicate
            .iter()
            .zip(&self.status)
            .zip(&self.source)
            .filter(|((d, s), _)| **d || **s == InboundStatus::Rejected.as_str())
            .map(|(_, source)| *source)
            .collect();
        capped_sources.sort_unstable();
        capped_sources.dedup();
        for source in capped_sources {
            sqlx::query(TRIM_INBOUND)
                .bind(INBOUND_CAPPED_KEEP as i64)
                .bind(source)
                .execute(&mut *conn)
                .await?;
        }
        Ok(ids)
    }
}

/// Records newest first; the columns `row_to_inbound` reads.
const LIST_INBOUND: &str = "
SELECT i.id, i.time_ms, i.source, i.status, i.duplicate, i.reason, i.detail, i.source_id,
       i.type, i.channels, i.seqs, i.body_size
FROM inbound i
WHERE ($1::text IS NULL OR i.source = $1)
  AND ($2::text IS NULL OR i.status = $2)
  AND ($3::bigint IS NULL OR i.id < $3)
ORDER BY i.id DESC LIMIT $4";

/// One record with headers and body (a NULL body is its event's data).
const GET_INBOUND: &str = "
SELECT i.id, i.time_ms, i.source, i.status, i.duplicate, i.reason, i.detail, i.source_id,
       i.type, i.channels, i.seqs, i.body_size,
       i.headers, COALESCE(i.body, convert_to(e.data, 'UTF8'))
FROM inbound i
LEFT JOIN events e ON i.body IS NULL AND e.seq = i.first_seq
WHERE i.id = $1";
