//! The SQLite event log: appends (run by the writer), page reads, bounds.
//!
//! Invariant: a page and the head it is resumed from come from one read
//! transaction (one snapshot), so `scanned_to` never passes an event that
//! was not yet visible.

use async_trait::async_trait;
use rusqlite::{Connection, params, params_from_iter};
use tokio::sync::oneshot;

use super::writer::WriteCmd;
use super::{SqliteStore, meta_seq};
use crate::store::rows::{self, EVENT_COLUMNS};
use crate::store::{
    Appended, Bounds, Event, EventLog, NewMessage, Page, Retention, Seq, StoreError,
};

#[async_trait]
impl EventLog for SqliteStore {
    fn log_tag(&self) -> &str {
        &self.tag
    }

    async fn append(&self, messages: Vec<NewMessage>) -> Result<Vec<Appended>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(WriteCmd::Append { messages, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read(
        &self,
        channels: &[String],
        after: Seq,
        limit: usize,
    ) -> Result<Page, StoreError> {
        let channels = channels.to_vec();
        self.with_reader(move |c| read_page(c, Some(&channels), after, limit))
            .await
    }

    async fn bounds(&self) -> Result<Bounds, StoreError> {
        self.with_reader(read_bounds).await
    }

    async fn prune(&self, retention: Retention) -> Result<u64, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(WriteCmd::Prune { retention, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.sender()?;
        self.with_reader(|c| c.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    async fn read_log(&self, after: Seq, limit: usize) -> Result<Page, StoreError> {
        self.with_reader(move |c| read_page(c, None, after, limit))
            .await
    }

    async fn close(&self) {
        // Dropping the last sender lets the writer finish its queue and exit.
        self.writer_tx.lock().expect("writer sender lock").take();
        let thread = self
            .writer_thread
            .lock()
            .expect("writer thread lock")
            .take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

pub(super) fn append_messages(
    conn: &Connection,
    messages: &[NewMessage],
    now: i64,
    head: &mut Seq,
    committed: &mut Vec<Event>,
) -> rusqlite::Result<Vec<Appended>> {
    let mut claim = conn.prepare_cached(
        "INSERT INTO dedupe (source, scope, source_id, first_seq, time_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (source, scope, source_id) DO NOTHING",
    )?;
    let mut first_of = conn.prepare_cached(
        "SELECT first_seq FROM dedupe WHERE source = ?1 AND scope = ?2 AND source_id = ?3",
    )?;
    let mut insert = conn.prepare_cached(
        "INSERT INTO events (seq, channel, type, source, source_id, time_ms, data)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?;
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        let first_seq = *head + 1;
        if let Some(id) = &m.source_id {
            // The unique key decides, not a prior read: a second copy can
            // never slip in between a check and an insert.
            if claim.execute(params![m.source, m.key_scope, id, first_seq, now])? == 0 {
                let first: Seq =
                    first_of.query_row(params![m.source, m.key_scope, id], |r| r.get(0))?;
                out.push(Appended {
                    seqs: vec![first],
                    duplicate: true,
                });
                continue;
            }
        }
        let mut seqs = Vec::with_capacity(m.channels.len());
        for channel in &m.channels {
            *head += 1;
            insert.execute(params![
                *head,
                channel,
                m.kind,
                m.source,
                m.source_id,
                now,
                m.data.get()
            ])?;
            seqs.push(*head);
            committed.push(Event {
                seq: *head,
                channel: channel.clone(),
                kind: m.kind.clone(),
                source: m.source.clone(),
                source_id: m.source_id.clone(),
                time_ms: now,
                data: m.data.clone(),
            });
        }
        out.push(Appended {
            seqs,
            duplicate: false,
        });
    }
    Ok(out)
}

pub(super) fn read_bounds(c: &Connection) -> rusqlite::Result<Bounds> {
    let pruned_through = meta_seq(c, "pruned_through")?;
    let max_seq: Seq = c.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
    Ok(Bounds {
        pruned_through,
        head: max_seq.max(pruned_through),
    })
}

/// Events after `after` (of `channels`, or of every channel), in one read
/// transaction: the head and the page come from one snapshot.
fn read_page(
    c: &Connection,
    channels: Option<&[String]>,
    after: Seq,
    limit: usize,
) -> rusqlite::Result<Page> {
    let limit = limit.max(1);
    c.execute_batch("BEGIN")?;
    let result = (|| {
        let head = read_bounds(c)?.head;
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        let filter = match channels {
            Some(channels) => {
                args.extend(
                    channels
                        .iter()
                        .map(|ch| rusqlite::types::Value::Text(ch.clone())),
                );
                format!("channel IN ({}) AND", vec!["?"; channels.len()].join(","))
            }
            None => String::new(),
        };
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE {filter} seq > ? ORDER BY seq LIMIT ?"
        );
        let mut stmt = c.prepare_cached(&sql)?;
        args.push(rusqlite::types::Value::Integer(after));
        args.push(rusqlite::types::Value::Integer(limit as i64));
        let events = stmt
            .query_map(params_from_iter(args), |r| rows::event(r))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows::page(events, after, limit, head))
    })();
    c.execute_batch("COMMIT")?;
    result
}
