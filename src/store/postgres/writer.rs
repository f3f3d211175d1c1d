//! This node's writer: group commit of appends under the append lock.
//!
//! Invariants: one task per node takes every append waiting in its queue
//! into one transaction; the transaction takes `APPEND_LOCK` before it
//! reads the head, so seq order is commit order on every node; requests
//! that queue while it waits for the lock join the group once it is held;
//! dedupe keys are claimed in the same statement that inserts the events;
//! a group the database refuses as data is retried request by request, so
//! one bad request fails alone.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::Row;
use sqlx::postgres::PgPool;
use tokio::sync::{Notify, mpsc, oneshot};

use super::inbound::InboundColumns;
use super::{APPEND_LOCK, GROUP_TIMEOUT};
use crate::store::{Appended, InboundId, NewInbound, NewMessage, Seq, StoreError};

/// Requests the writer takes in one transaction, at most.
const MAX_GROUP: usize = 512;
/// Payload bytes the writer takes in one transaction (at least one request).
const MAX_GROUP_BYTES: usize = 16 << 20;

/// What one request gets back: its messages' outcomes and, for a webhook,
/// the id of the inspector record written with them.
pub(super) type AppendOutcome = (Vec<Appended>, Option<InboundId>);

pub(super) struct AppendRequest {
    pub(super) messages: Vec<NewMessage>,
    /// A webhook delivery (`append_webhook`: one message), recorded in the
    /// same transaction as its events.
    pub(super) inbound: Option<NewInbound>,
    pub(super) reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
}

impl AppendRequest {
    fn payload_bytes(&self) -> usize {
        self.messages
            .iter()
            .map(|m| m.data.get().len() * m.channels.len().max(1))
            .sum::<usize>()
            + self.inbound.as_ref().map_or(0, |i| i.body.len())
    }
}

pub(super) async fn run_writer(
    pool: PgPool,
    mut rx: mpsc::Receiver<AppendRequest>,
    wake: Arc<Notify>,
) {
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        top_up(&mut group, &mut rx);
        if run_group(&pool, group, &mut rx).await {
            // Our own commit: no need to wait for the notification to come back.
            wake.notify_one();
        }
    }
    // Channel closed: every sender is gone, all queued work is done.
}

/// Adds whatever is queued to the group, within the group's bounds.
fn top_up(group: &mut Vec<AppendRequest>, rx: &mut mpsc::Receiver<AppendRequest>) {
    let mut bytes: usize = group.iter().map(AppendRequest::payload_bytes).sum();
    while group.len() < MAX_GROUP && bytes < MAX_GROUP_BYTES {
        match rx.try_recv() {
            Ok(req) => {
                bytes += req.payload_bytes();
                group.push(req);
            }
            Err(_) => break,
        }
    }
}

/// Commits one group (topped up from `rx` once the lock is held); replies
/// to every request. Returns whether anything was committed.
async fn run_group(
    pool: &PgPool,
    mut group: Vec<AppendRequest>,
    rx: &mut mpsc::Receiver<AppendRequest>,
) -> bool {
    let outcome =
        match tokio::time::timeout(GROUP_TIMEOUT, append_group(pool, &mut group, Some(rx))).await {
            Ok(result) => result,
            Err(_) => Err(GroupError::Timeout),
        };
    match outcome {
        Ok((outcomes, wrote)) => {
            for (req, out) in group.into_iter().zip(outcomes) {
                let _ = req.reply.send(Ok(out));
            }
            wrote
        }
        // A request PostgreSQL refuses as data (a NUL byte in a key, say)
        // must not fail its neighbours: retry each on its own.
        Err(e) if e.is_data_error() && group.len() > 1 => {
            tracing::warn!(error = %e, "group append refused; retrying its requests one by one");
            let mut wrote = false;
            for req in group {
                let mut one = vec![req];
                let result =
                    match tokio::time::timeout(GROUP_TIMEOUT, append_group(pool, &mut one, None))
                        .await
                    {
                        Ok(Ok((mut outcomes, w))) => {
                            wrote |= w;
                            Ok(outcomes.remove(0))
                        }
                        Ok(Err(e)) => Err(e.into_store_error()),
                        Err(_) => Err(GroupError::Timeout.into_store_error()),
                    };
                if let Some(req) = one.pop() {
                    let _ = req.reply.send(result);
                }
            }
            wrote
        }
        Err(e) => {
            let e = e.into_store_error();
            for req in group {
                let _ = req.reply.send(Err(e.replicate()));
            }
            false
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum GroupError {
    #[error(transparent)]
    Db(#[from] sqlx::Error),
    #[error("the append transaction timed out")]
    Timeout,
    #[error("{0}")]
    Invariant(String),
}

impl GroupError {
    /// Errors about the values of one request (data exception, constraint,
    /// size limit), as opposed to the database being unreachable.
    fn is_data_error(&self) -> bool {
        match self {
            GroupError::Db(sqlx::Error::Database(db)) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54")),
            _ => false,
        }
    }

    fn into_store_error(self) -> StoreError {
        let e = match self {
            GroupError::Db(e) => StoreError::from(e),
            GroupError::Timeout => StoreError::unavailable(GroupError::Timeout),
            GroupError::Invariant(_) => StoreError::internal(self),
        };
        if !matches!(e, StoreError::Closed) {
            tracing::error!(error = %e, "append transaction failed");
        }
        e
    }
}

/// Reads the head, the clock and which of the group's dedupe keys are
/// already stored, in one statement. It must run after the lock statement,
/// never in it: under READ COMMITTED a statement's snapshot is taken when it
/// starts, so a head read in the statement that waited for the lock could be
/// one the previous holder has since advanced.
const READ_STATE: &str = "
SELECT l.head,
       floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint,
       k.source, k.scope, k.source_id, d.first_seq
FROM log_state l
LEFT JOIN (UNNEST($1::text[], $2::text[], $3::text[]) AS k(source, scope, source_id)
           JOIN dedupe d ON d.source = k.source AND d.scope = k.scope
                        AND d.source_id = k.source_id) ON TRUE";

/// Claims the new dedupe keys, inserts the events, advances the head and
/// notifies every node — one round trip. The notification is delivered
/// only if (and when) the transaction commits.
const WRITE_GROUP: &str = "
WITH claimed AS (
    INSERT INTO dedupe (source, scope, source_id, first_seq, time_ms)
    SELECT s, c, i, f, $1
    FROM UNNEST($2::text[], $12::text[], $3::text[], $4::bigint[]) AS t(s, c, i, f)
    ON CONFLICT (source, scope, source_id) DO NOTHING
    RETURNING 1
), inserted AS (
    INSERT INTO events (seq, channel, type, source, source_id, time_ms, data)
    SELECT seq, channel, type, source, source_id, $1, data
    FROM UNNEST($5::bigint[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[])
         AS t(seq, channel, type, source, source_id, data)
), advanced AS (
    UPDATE log_state SET head = $11
)
SELECT (SELECT count(*) FROM claimed), pg_notify('pushgate_events', $11::text)";

/// Appends the requests of one group in one transaction. Returns each
/// request's outcome and whether anything new was written. With `more`,
/// requests that queued while this node waited for the lock join the group
/// once it is held: time spent waiting becomes batching, not a second wait.
async fn append_group(
    pool: &PgPool,
    group: &mut Vec<AppendRequest>,
    more: Option<&mut mpsc::Receiver<AppendRequest>>,
) -> Result<(Vec<AppendOutcome>, bool), GroupError> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *tx)
        .await?;
    if let Some(rx) = more {
        top_up(group, rx);
    }
    let requests: Vec<&[NewMessage]> = group.iter().map(|r| r.messages.as_slice()).collect();
    let mut asked = KeyClaims::default();
    for m in requests.iter().flat_map(|r| r.iter()) {
        if let Some(id) = &m.source_id {
            asked.push(m, id, 0);
        }
    }
    let rows = sqlx::query(READ_STATE)
        .bind(&asked.source)
        .bind(&asked.scope)
        .bind(&asked.source_id)
        .fetch_all(&mut *tx)
        .await?;
    let first = rows
        .first()
        .ok_or_else(|| GroupError::Invariant("log_state has no row".into()))?;
    let head_before: Seq = first.try_get(0)?;
    let now: i64 = first.try_get(1)?;
    let mut first_seq_of: HashMap<(String, String, String), Seq> = HashMap::new();
    for row in &rows {
        let source: Option<String> = row.try_get(2)?;
        let scope: Option<String> = row.try_get(3)?;
        let source_id: Option<String> = row.try_get(4)?;
        let seq: Option<Seq> = row.try_get(5)?;
        if let (Some(source), Some(scope), Some(source_id), Some(seq)) =
            (source, scope, source_id, seq)
        {
            first_seq_of.insert((source, scope, source_id), seq);
        }
    }

    // Assign seqs in request order, exactly as one writer would.
    let mut head = head_before;
    let mut claims = KeyClaims::default();
    let mut ev: EventColumns = Default::default();
    let mut outcomes = Vec::with_capacity(requests.len());
    for request in requests {
        let mut out = Vec::with_capacity(request.len());
        for m in request.iter() {
            if let Some(id) = &m.source_id {
                let key = (m.source.clone(), m.key_scope.clone(), id.clone());
                if let Some(first) = first_seq_of.get(&key) {
                    out.push(Appended {
                        seqs: vec![*first],
                        duplicate: true,
                    });
                    continue;
                }
                first_seq_of.insert(key, head + 1);
                claims.push(m, id, head + 1);
            }
            let mut seqs = Vec::with_capacity(m.channels.len());
            for channel in &m.channels {
                head += 1;
                ev.push(head, channel, m);
                seqs.push(head);
            }
            out.push(Appended {
                seqs,
                duplicate: false,
            });
        }
        outcomes.push(out);
    }

    let records = InboundColumns::accepted(group, &outcomes);
    let wrote = !(claims.source.is_empty() && ev.seq.is_empty());
    if !wrote && records.source.is_empty() {
        // Only duplicates: nothing to write. Rolling back releases the lock.
        tx.rollback().await?;
        return Ok((outcomes.into_iter().map(|o| (o, None)).collect(), false));
    }
    if wrote {
        write_events(&mut tx, now, &claims, &ev, head).await?;
    }
    let mut ids = records.insert(&mut tx, now).await?.into_iter();
    tx.commit().await?;
    let outcomes = group
        .iter()
        .zip(outcomes)
        .map(|(req, out)| {
            let id = req.inbound.as_ref().and_then(|_| ids.next());
            (out, id)
        })
        .collect();
    Ok((outcomes, wrote))
}

async fn write_events(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    now: i64,
    claims: &KeyClaims<'_>,
    ev: &EventColumns<'_>,
    head: Seq,
) -> Result<(), GroupError> {
    let claimed: i64 = sqlx::query(WRITE_GROUP)
        .bind(now)
        .bind(&claims.source)
        .bind(&claims.source_id)
        .bind(&claims.first_seq)
        .bind(&ev.seq)
        .bind(&ev.channel)
        .bind(&ev.kind)
        .bind(&ev.source)
        .bind(&ev.source_id)
        .bind(&ev.data)
        .bind(head)
        .bind(&claims.scope)
        .fetch_one(&mut **tx)
        .await?
        .try_get(0)?;
    if claimed != claims.source.len() as i64 {
        // Every writer of `dedupe` holds the append lock, so this cannot
        // happen; if it ever does, the unique key has the last word and
        // nothing is committed.
        return Err(GroupError::Invariant(format!(
            "dedupe: claimed {claimed} of {} new keys",
            claims.source.len()
        )));
    }
    Ok(())
}

/// Dedupe keys, column by column, for `UNNEST`.
#[derive(Default)]
struct KeyClaims<'a> {
    source: Vec<&'a str>,
    scope: Vec<&'a str>,
    source_id: Vec<&'a str>,
    first_seq: Vec<Seq>,
}

impl<'a> KeyClaims<'a> {
    fn push(&mut self, m: &'a NewMessage, id: &'a str, first_seq: Seq) {
        self.source.push(&m.source);
        self.scope.push(&m.key_scope);
        self.source_id.push(id);
        self.first_seq.push(first_seq);
    }
}

/// The events of one group, column by column, for `UNNEST`.
#[derive(Default)]
struct EventColumns<'a> {
    seq: Vec<Seq>,
    channel: Vec<&'a str>,
    kind: Vec<&'a str>,
    source: Vec<&'a str>,
    source_id: Vec<Option<&'a str>>,
    data: Vec<&'a str>,
}

impl<'a> EventColumns<'a> {
    fn push(&mut self, seq: Seq, channel: &'a str, m: &'a NewMessage) {
        self.seq.push(seq);
        self.channel.push(channel);
        self.kind.push(&m.kind);
        self.source.push(&m.source);
        self.source_id.push(m.source_id.as_deref());
        self.data.push(m.data.get());
    }
}
