//! The SQLite inspector's record of inbound webhooks.
//!
//! Invariants (see `store::InboundLog`): accepted records are written by the
//! writer in the savepoint of their message; refusals and duplicates are
//! capped to the newest `INBOUND_CAPPED_KEEP` per source on every insert; a new
//! message's body equal to its event's data is stored once (`body` NULL).

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
use tokio::sync::oneshot;

use super::SqliteStore;
use super::writer::WriteCmd;
use crate::store::rows::{self, Columns, INBOUND_COLUMNS};
use crate::store::{
    Appended, INBOUND_CAPPED_KEEP, InboundFilter, InboundId, InboundLog, InboundRecord,
    InboundStatus, NewInbound, NewMessage, StoreError,
};

#[async_trait]
impl InboundLog for SqliteStore {
    async fn append_webhook(
        &self,
        message: NewMessage,
        inbound: NewInbound,
    ) -> Result<(Appended, InboundId), StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(WriteCmd::Webhook {
                message,
                inbound,
                reply,
            })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn record_rejected(&self, inbound: NewInbound) -> Result<InboundId, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(WriteCmd::Rejected { inbound, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn list_inbound(&self, filter: InboundFilter) -> Result<Vec<InboundRecord>, StoreError> {
        self.with_reader(move |c| {
            let mut sql = format!("SELECT {INBOUND_COLUMNS} FROM inbound i WHERE 1 = 1");
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            if let Some(source) = filter.source {
                sql.push_str(" AND i.source = ?");
                args.push(source.into());
            }
            if let Some(status) = filter.status {
                if status == InboundStatus::Rejected {
                    // Refusals are all capped: the small partial index finds them.
                    sql.push_str(" AND i.capped = 1");
                }
                sql.push_str(" AND i.status = ?");
                args.push(status.as_str().to_string().into());
            }
            if let Some(before) = filter.before {
                sql.push_str(" AND i.id < ?");
                args.push(before.into());
            }
            sql.push_str(" ORDER BY i.id DESC LIMIT ?");
            args.push((filter.limit.clamp(1, 10_000) as i64).into());
            let mut stmt = c.prepare_cached(&sql)?;
            stmt.query_map(params_from_iter(args), |r| rows::inbound(r))?
                .collect()
        })
        .await
    }

    async fn get_inbound(&self, id: InboundId) -> Result<Option<InboundRecord>, StoreError> {
        self.with_reader(move |c| {
            let sql = format!(
                "SELECT {INBOUND_COLUMNS}, i.headers, COALESCE(i.body, e.data) FROM inbound i
                 LEFT JOIN events e ON i.body IS NULL AND e.seq = i.first_seq
                 WHERE i.id = ?1"
            );
            let mut stmt = c.prepare_cached(&sql)?;
            stmt.query_row(params![id], |r| {
                let mut record = rows::inbound(r)?;
                record.headers = r.json(12)?;
                record.body = match r.get_ref(13)? {
                    rusqlite::types::ValueRef::Blob(b) | rusqlite::types::ValueRef::Text(b) => {
                        Some(bytes::Bytes::copy_from_slice(b))
                    }
                    _ => None,
                };
                Ok(record)
            })
            .optional()
        })
        .await
    }
}

pub(super) fn insert_inbound(
    conn: &Connection,
    inbound: &NewInbound,
    accepted: Option<(&NewMessage, &Appended)>,
    now: i64,
) -> rusqlite::Result<InboundId> {
    let headers = serde_json::to_string(&inbound.headers).expect("string pairs serialize");
    let (status, duplicate, channels, seqs, first_seq, source_id, kind) = match accepted {
        Some((m, a)) => (
            InboundStatus::Accepted,
            a.duplicate,
            serde_json::to_string(&m.channels).expect("strings serialize"),
            serde_json::to_string(&a.seqs).expect("numbers serialize"),
            a.seqs.first().copied(),
            m.source_id.as_deref(),
            Some(m.kind.as_str()),
        ),
        None => (
            InboundStatus::Rejected,
            false,
            "[]".to_string(),
            "[]".to_string(),
            None,
            None,
            None,
        ),
    };
    let capped = accepted.is_none() || duplicate;
    // A new message's body is usually its event's data, byte for byte: keep it once.
    let body: Option<&[u8]> = match accepted {
        Some((m, _)) if !duplicate && inbound.body.as_ref() == m.data.get().as_bytes() => None,
        _ => Some(inbound.body.as_ref()),
    };
    let mut insert = conn.prepare_cached(
        "INSERT INTO inbound (time_ms, source, status, duplicate, capped, reason, detail,
             source_id, type, channels, seqs, first_seq, headers, body, body_size)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?;
    insert.execute(params![
        now,
        inbound.source,
        status.as_str(),
        duplicate,
        capped,
        inbound.reason,
        inbound.detail,
        source_id,
        kind,
        channels,
        seqs,
        first_seq,
        headers,
        body,
        inbound.body_size.min(i64::MAX as u64) as i64,
    ])?;
    let id = conn.last_insert_rowid();
    if capped {
        let mut trim = conn.prepare_cached(
            "DELETE FROM inbound WHERE capped = 1 AND source = ?2 AND id <= (
                 SELECT id FROM inbound WHERE capped = 1 AND source = ?2
                 ORDER BY id DESC LIMIT 1 OFFSET ?1)",
        )?;
        trim.execute(params![INBOUND_CAPPED_KEEP as i64, inbound.source])?;
    }
    Ok(id)
}
