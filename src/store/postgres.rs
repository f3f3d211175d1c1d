//! The shared log: PostgreSQL, so any number of pushgate nodes serve one log.
//!
//! Invariants:
//! - seq order is commit order on every node: an appending transaction takes
//!   the append lock (`pg_advisory_xact_lock(APPEND_LOCK)`) before it reads
//!   the head, and PostgreSQL releases that lock only after the commit is
//!   visible. So when seq N is visible, every seq below N is visible too, and
//!   a reader resuming "after N" can never miss a row that commits later
//!   (docs/architecture.md, "Cursor order on PostgreSQL");
//! - each node's writer task drains every append waiting in its queue into
//!   one transaction (group commit), so one lock hold and one WAL flush
//!   acknowledge many publishers; requests that queue while it waits for
//!   the lock join the group once the lock is held; the lock is held for
//!   three statements and the commit, never while waiting for clients;
//! - seqs are dense: the head lives in `log_state` and a failed transaction
//!   rolls it back with everything else — nothing is ever half-written;
//! - `(source, source_id)` is unique in `dedupe`, which outlives retention;
//! - the commit feed is fed by a tailer, not by the local append path: it
//!   reads `seq > last_seen ORDER BY seq` whenever a `pushgate_events`
//!   notification (sent by every appending transaction), a local commit or
//!   a 1 s timer wakes it, so a lost notification or a dropped connection
//!   delays an event but never loses it;
//! - migrations are embedded and run at start-up under sqlx's advisory lock,
//!   on a connection of their own, so nodes starting together are safe.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde_json::value::RawValue;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, Row};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{
    Appended, AttemptOutcome, AttemptStatus, AttemptView, Bounds, ClaimWant, Claimed, CommitFeed,
    Delivery, Endpoint, EndpointPatch, EndpointSecret, Event, Health, INBOUND_CAPPED_KEEP,
    InboundFilter, InboundId, InboundRecord, InboundStatus, NewDelivery, NewEndpoint, NewInbound,
    NewMessage, NextStep, OutboxAdvance, Page, Retention, Seq, Store, StoreError,
};

/// The advisory lock every appending transaction holds from reading the
/// head to its commit ("pushgate" in ASCII).
pub const APPEND_LOCK: i64 = 0x7075_7368_6761_7465;
/// The LISTEN/NOTIFY channel; the payload is the new head.
pub const NOTIFY_CHANNEL: &str = "pushgate_events";

/// Requests the writer takes in one transaction, at most.
const MAX_GROUP: usize = 512;
/// Payload bytes the writer takes in one transaction (at least one request).
const MAX_GROUP_BYTES: usize = 16 << 20;
/// Rows the tailer reads per query.
const TAIL_BATCH: i64 = 1000;
/// The tailer looks for new rows at least this often, notification or not.
const TAIL_SAFETY_NET: Duration = Duration::from_secs(1);
/// Events deleted per retention transaction.
const PRUNE_CHUNK: i64 = 20_000;
/// How long a request waits for a connection (also: for PostgreSQL to come back).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on one group transaction, beyond the server-side statement timeout.
const GROUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Session settings: a statement never runs (or waits for a lock) forever,
/// and a session that stops talking mid-transaction (a frozen or cut-off
/// node) is ended by the server, so it cannot hold the append lock for long.
const SESSION_OPTIONS: [(&str, &str); 3] = [
    ("statement_timeout", "10s"),
    ("idle_in_transaction_session_timeout", "5s"),
    ("application_name", "pushgate"),
];

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What one request gets back: its messages' outcomes and, for a webhook,
/// the id of the inspector record written with them.
type AppendOutcome = (Vec<Appended>, Option<InboundId>);

struct AppendRequest {
    messages: Vec<NewMessage>,
    /// A webhook delivery (`append_webhook`: one message), recorded in the
    /// same transaction as its events.
    inbound: Option<NewInbound>,
    reply: oneshot::Sender<Result<AppendOutcome, StoreError>>,
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

pub struct PostgresStore {
    tag: String,
    pool: PgPool,
    writer_tx: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The tailer and its listener; aborted on close.
    background: Mutex<Vec<JoinHandle<()>>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Unavailable(format!("bad store url: {e}")))?;
    Ok(options.options(SESSION_OPTIONS))
}

/// Connection pool with the timeouts every PostgreSQL pool here uses.
fn pool_options(max: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(max.max(2))
        .min_connections(0)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .idle_timeout(Duration::from_secs(300))
        .test_before_acquire(true)
        .after_connect(|conn, _| {
            Box::pin(async move {
                // Acknowledged means durable: a server running with
                // synchronous_commit=off would break that, so this session
                // turns it back on (and leaves stronger settings alone).
                conn.execute(
                    "SELECT set_config('synchronous_commit', 'on', false)
                     WHERE current_setting('synchronous_commit') = 'off'",
                )
                .await?;
                Ok(())
            })
        })
}

impl PostgresStore {
    /// Migrates the database, then starts this node's writer and tailer.
    pub async fn open(
        url: &str,
        pool_size: u32,
    ) -> Result<(PostgresStore, CommitFeed), StoreError> {
        let options = connect_options(url)?;
        let tag = tokio::time::timeout(GROUP_TIMEOUT, migrate_and_tag(&options))
            .await
            .map_err(|_| unavailable("timed out migrating the database"))??;
        let pool = pool_options(pool_size)
            .connect_with(options.clone())
            .await
            .map_err(unavailable)?;
        let head: Seq = sqlx::query_scalar("SELECT head FROM log_state")
            .fetch_one(&pool)
            .await
            .map_err(unavailable)?;

        let (feed_tx, feed_rx) = mpsc::channel(1024);
        let (writer_tx, writer_rx) = mpsc::channel(4096);
        let wake = Arc::new(Notify::new());
        let last_seen = Arc::new(AtomicI64::new(head));
        let writer = tokio::spawn(run_writer(pool.clone(), writer_rx, wake.clone()));
        let tailer = tokio::spawn(run_tailer(
            pool.clone(),
            feed_tx,
            wake.clone(),
            last_seen.clone(),
        ));
        // The listener has a pool of its own: it keeps its connection for
        // as long as it lives, and must not take one from the appenders.
        let listener_pool = pool_options(1)
            .max_connections(1)
            .connect_lazy_with(options);
        let listener = tokio::spawn(run_listener(listener_pool, wake, last_seen));
        let store = PostgresStore {
            tag,
            pool,
            writer_tx: Mutex::new(Some(writer_tx)),
            writer: Mutex::new(Some(writer)),
            background: Mutex::new(vec![tailer, listener]),
        };
        Ok((store, feed_rx))
    }

    fn sender(&self) -> Result<mpsc::Sender<AppendRequest>, StoreError> {
        self.writer_tx
            .lock()
            .expect("writer sender lock")
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// The pool, for tests and the benchmark that inspect the database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

/// Runs the embedded migrations on a connection of their own (closing it
/// releases sqlx's session-level migration lock even if a migration fails),
/// then reads or sets the log tag. Nodes racing here agree on one tag: the
/// first insert wins and everyone reads it back.
async fn migrate_and_tag(options: &PgConnectOptions) -> Result<String, StoreError> {
    // A migration (or waiting for another node's) may take longer than an append.
    let options = options.clone().options([("statement_timeout", "0")]);
    let mut conn: PgConnection = options.connect().await.map_err(unavailable)?;
    let result = async {
        // `run_direct` is `run` on a connection we own (sqlx's own way
        // around `run`'s higher-ranked `Acquire` bound, which spawned
        // futures cannot prove); it takes the same advisory lock.
        MIGRATOR
            .run_direct(None, &mut conn, false)
            .await
            .map_err(unavailable)?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('log_tag', $1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(super::sqlite::random_tag())
        .execute(&mut conn)
        .await
        .map_err(unavailable)?;
        sqlx::query_scalar::<_, String>("SELECT value FROM meta WHERE key = 'log_tag'")
            .fetch_one(&mut conn)
            .await
            .map_err(unavailable)
    }
    .await;
    let _ = conn.close().await;
    result
}

// ---------------------------------------------------------------- appends --

async fn run_writer(pool: PgPool, mut rx: mpsc::Receiver<AppendRequest>, wake: Arc<Notify>) {
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
                let _ = req.reply.send(Err(StoreError::Unavailable(e.to_string())));
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
        match self {
            GroupError::Db(sqlx::Error::PoolClosed) => StoreError::Closed,
            other => {
                tracing::error!(error = %other, "append transaction failed");
                StoreError::Unavailable(other.to_string())
            }
        }
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
       k.source, k.source_id, d.first_seq
FROM log_state l
LEFT JOIN (UNNEST($1::text[], $2::text[]) AS k(source, source_id)
           JOIN dedupe d ON d.source = k.source AND d.source_id = k.source_id) ON TRUE";

/// Claims the new dedupe keys, inserts the events, advances the head and
/// notifies every node — one round trip. The notification is delivered
/// only if (and when) the transaction commits.
const WRITE_GROUP: &str = "
WITH claimed AS (
    INSERT INTO dedupe (source, source_id, first_seq, time_ms)
    SELECT s, i, f, $1 FROM UNNEST($2::text[], $3::text[], $4::bigint[]) AS t(s, i, f)
    ON CONFLICT (source, source_id) DO NOTHING
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
    let mut key_sources: Vec<&str> = Vec::new();
    let mut key_ids: Vec<&str> = Vec::new();
    for m in requests.iter().flat_map(|r| r.iter()) {
        if let Some(id) = &m.source_id {
            key_sources.push(&m.source);
            key_ids.push(id);
        }
    }
    let rows = sqlx::query(READ_STATE)
        .bind(&key_sources)
        .bind(&key_ids)
        .fetch_all(&mut *tx)
        .await?;
    let first = rows
        .first()
        .ok_or_else(|| GroupError::Invariant("log_state has no row".into()))?;
    let head_before: Seq = first.try_get(0)?;
    let now: i64 = first.try_get(1)?;
    let mut first_seq_of: HashMap<(String, String), Seq> = HashMap::new();
    for row in &rows {
        let source: Option<String> = row.try_get(2)?;
        let source_id: Option<String> = row.try_get(3)?;
        let seq: Option<Seq> = row.try_get(4)?;
        if let (Some(source), Some(source_id), Some(seq)) = (source, source_id, seq) {
            first_seq_of.insert((source, source_id), seq);
        }
    }

    // Assign seqs in request order, exactly as one writer would.
    let mut head = head_before;
    let mut claims: (Vec<&str>, Vec<&str>, Vec<Seq>) = Default::default();
    let mut ev: EventColumns = Default::default();
    let mut outcomes = Vec::with_capacity(requests.len());
    for request in requests {
        let mut out = Vec::with_capacity(request.len());
        for m in request.iter() {
            if let Some(id) = &m.source_id {
                let key = (m.source.clone(), id.clone());
                if let Some(first) = first_seq_of.get(&key) {
                    out.push(Appended {
                        seqs: vec![*first],
                        duplicate: true,
                    });
                    continue;
                }
                first_seq_of.insert(key, head + 1);
                claims.0.push(&m.source);
                claims.1.push(id);
                claims.2.push(head + 1);
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
    let wrote = !(claims.0.is_empty() && ev.seq.is_empty());
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
    claims: &(Vec<&str>, Vec<&str>, Vec<Seq>),
    ev: &EventColumns<'_>,
    head: Seq,
) -> Result<(), GroupError> {
    let claimed: i64 = sqlx::query(WRITE_GROUP)
        .bind(now)
        .bind(&claims.0)
        .bind(&claims.1)
        .bind(&claims.2)
        .bind(&ev.seq)
        .bind(&ev.channel)
        .bind(&ev.kind)
        .bind(&ev.source)
        .bind(&ev.source_id)
        .bind(&ev.data)
        .bind(head)
        .fetch_one(&mut **tx)
        .await?
        .try_get(0)?;
    if claimed != claims.0.len() as i64 {
        // Every writer of `dedupe` holds the append lock, so this cannot
        // happen; if it ever does, the unique key has the last word and
        // nothing is committed.
        return Err(GroupError::Invariant(format!(
            "dedupe: claimed {claimed} of {} new keys",
            claims.0.len()
        )));
    }
    Ok(())
}

/// Inspector records, column by column, for `UNNEST`.
#[derive(Default)]
struct InboundColumns<'a> {
    source: Vec<&'a str>,
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

/// Keeps only the newest `INBOUND_CAPPED_KEEP` capped records.
const TRIM_INBOUND: &str = "
DELETE FROM inbound WHERE capped AND id <= (
    SELECT id FROM inbound WHERE capped ORDER BY id DESC OFFSET $1 LIMIT 1)";

impl<'a> InboundColumns<'a> {
    /// The accepted deliveries of a group, with their append outcomes.
    fn accepted(group: &'a [AppendRequest], outcomes: &[Vec<Appended>]) -> InboundColumns<'a> {
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

    fn push(
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
    async fn insert(
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
        let capped = self
            .duplicate
            .iter()
            .zip(&self.status)
            .any(|(d, s)| *d || *s == InboundStatus::Rejected.as_str());
        if capped {
            sqlx::query(TRIM_INBOUND)
                .bind(INBOUND_CAPPED_KEEP as i64)
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

/// A row of `LIST_INBOUND` (or `GET_INBOUND`), without headers and body.
fn row_to_inbound(row: &PgRow) -> Result<InboundRecord, StoreError> {
    let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(e.to_string());
    let status: String = row.try_get(3).map_err(|e| corrupt(&e))?;
    let channels: String = row.try_get(9).map_err(|e| corrupt(&e))?;
    let seqs: String = row.try_get(10).map_err(|e| corrupt(&e))?;
    Ok(InboundRecord {
        id: row.try_get(0).map_err(|e| corrupt(&e))?,
        time_ms: row.try_get(1).map_err(|e| corrupt(&e))?,
        source: row.try_get(2).map_err(|e| corrupt(&e))?,
        status: InboundStatus::parse(&status)
            .ok_or_else(|| corrupt(&format!("unknown inbound status `{status}`")))?,
        duplicate: row.try_get(4).map_err(|e| corrupt(&e))?,
        reason: row.try_get(5).map_err(|e| corrupt(&e))?,
        detail: row.try_get(6).map_err(|e| corrupt(&e))?,
        source_id: row.try_get(7).map_err(|e| corrupt(&e))?,
        kind: row.try_get(8).map_err(|e| corrupt(&e))?,
        channels: serde_json::from_str(&channels).map_err(|e| corrupt(&e))?,
        seqs: serde_json::from_str(&seqs).map_err(|e| corrupt(&e))?,
        body_size: row.try_get::<i64, _>(11).map_err(|e| corrupt(&e))?.max(0) as u64,
        headers: Vec::new(),
        body: None,
    })
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

// ------------------------------------------------------------ commit feed --

/// Wakes the tailer on every notification whose head it has not seen yet,
/// and after every (re)connect, since notifications sent while it was not
/// listening are gone.
async fn run_listener(pool: PgPool, wake: Arc<Notify>, last_seen: Arc<AtomicI64>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match PgListener::connect_with(&pool).await {
            Ok(mut listener) => match listener.listen(NOTIFY_CHANNEL).await {
                Ok(()) => {
                    // LISTEN is in effect: a catch-up read now misses nothing.
                    backoff = Duration::from_millis(100);
                    wake.notify_one();
                    loop {
                        match listener.try_recv().await {
                            Ok(Some(n)) => {
                                let head = n.payload().parse::<Seq>().unwrap_or(Seq::MAX);
                                if head > last_seen.load(Ordering::Acquire) {
                                    wake.notify_one();
                                }
                            }
                            // Reconnected (and listening again): catch up.
                            Ok(None) => wake.notify_one(),
                            Err(e) => {
                                tracing::warn!(error = %e, "lost the PostgreSQL notification connection");
                                break;
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "LISTEN failed"),
            },
            Err(e) => tracing::debug!(error = %e, "cannot connect the notification listener"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
        // The timer in the tailer keeps events flowing meanwhile.
        wake.notify_one();
    }
}

const TAIL_SQL: &str = "SELECT seq, channel, type, source, source_id, time_ms, data
FROM events WHERE seq > $1 ORDER BY seq LIMIT $2";

/// Feeds this node's hub with every event any node commits, in seq order,
/// each once. Because seq order is commit order, reading `seq > last_seen`
/// never passes over a row that commits later.
async fn run_tailer(
    pool: PgPool,
    feed: mpsc::Sender<Arc<[Event]>>,
    wake: Arc<Notify>,
    last_seen: Arc<AtomicI64>,
) {
    let mut tick = tokio::time::interval(TAIL_SAFETY_NET);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = wake.notified() => {}
            _ = tick.tick() => {}
        }
        loop {
            let after = last_seen.load(Ordering::Acquire);
            let rows = match sqlx::query(TAIL_SQL)
                .bind(after)
                .bind(TAIL_BATCH)
                .fetch_all(&pool)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "tailer cannot read the log; retrying");
                    }
                    failing = true;
                    break;
                }
            };
            if failing {
                tracing::info!(after, "tailer reads the log again; catching up");
                failing = false;
            }
            let full = rows.len() as i64 >= TAIL_BATCH;
            let events = match rows.iter().map(row_to_event).collect::<Result<Vec<_>, _>>() {
                Ok(events) => events,
                Err(e) => {
                    tracing::error!(error = %e, "tailer read a corrupt row");
                    break;
                }
            };
            let Some(last) = events.last().map(|e| e.seq) else {
                break;
            };
            last_seen.store(last, Ordering::Release);
            // Waiting here is the backpressure that keeps the hub's queue bounded.
            if feed.send(events.into()).await.is_err() {
                return;
            }
            if !full {
                break;
            }
        }
    }
}

// ------------------------------------------------------------------ reads --

/// A page from rows of `READ_PAGE` / `READ_LOG_PAGE`: every row carries the
/// head (column 7) from the same snapshot; a row with no seq is the head alone.
fn page_from_rows(rows: &[PgRow], after: Seq, limit: usize) -> Result<Page, StoreError> {
    let head: Seq = match rows.first() {
        Some(r) => r
            .try_get(7)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        None => return Err(StoreError::Corrupt("log_state has no row".into())),
    };
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        let seq: Option<Seq> = row
            .try_get(0)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        if seq.is_some() {
            events.push(row_to_event(row)?);
        }
    }
    let scanned_to = if events.len() >= limit {
        events.last().map(|e| e.seq).unwrap_or(after)
    } else {
        head.max(after)
    };
    Ok(Page { events, scanned_to })
}

fn row_to_event(row: &PgRow) -> Result<Event, StoreError> {
    let corrupt = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let data: String = row.try_get(6).map_err(corrupt)?;
    Ok(Event {
        seq: row.try_get(0).map_err(corrupt)?,
        channel: row.try_get(1).map_err(corrupt)?,
        kind: row.try_get(2).map_err(corrupt)?,
        source: row.try_get(3).map_err(corrupt)?,
        source_id: row.try_get(4).map_err(corrupt)?,
        time_ms: row.try_get(5).map_err(corrupt)?,
        data: RawValue::from_string(data).map_err(|e| StoreError::Corrupt(e.to_string()))?,
    })
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

// --------------------------------------------------------------- outbound --
//
// The delivery queue is shared by every node (docs/architecture.md,
// "Outbound webhooks on several nodes"):
// - a claim selects due rows `FOR UPDATE SKIP LOCKED` and, in the same
//   transaction, leases them (attempts + 1, `next_ms` = the lease's end).
//   Rows another node is claiming are skipped, not waited for; a row whose
//   lease another node committed meanwhile is re-checked against `next_ms`
//   by PostgreSQL and dropped. So a row has one holder at a time, and it
//   comes back by itself when a dead holder's lease ends;
// - the outbox cursor lives in one row (`outbox_state`) that the enqueuing
//   transaction locks `FOR UPDATE` and moves by compare-and-set: a second
//   node's dispatcher waits for the lock, sees the moved cursor, writes
//   nothing and re-reads — an event's deliveries are queued exactly once;
// - bookkeeping that only repeats deliveries when lost (claims, attempt
//   results, the dispatcher's pages) commits with `synchronous_commit = off`;
//   endpoints and replays the API acknowledges are durable first.

const PENDING: i16 = 0;
const SUCCEEDED: i16 = 1;
const FAILED: i16 = 2;
/// Finished deliveries (and attempts) deleted per transaction.
const PRUNE_DELIVERIES_CHUNK: i64 = 5_000;

const ENDPOINT_COLUMNS: &str = "id, url, channels, types, description, enabled, disabled_reason, \
     rate_limit, secrets, from_seq, failing_since_ms, created_ms, updated_ms";

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn json_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn json_column<T: serde::de::DeserializeOwned>(row: &PgRow, i: usize) -> Result<T, StoreError> {
    let text: String = row.try_get(i).map_err(corrupt)?;
    serde_json::from_str(&text).map_err(corrupt)
}

fn row_to_endpoint(row: &PgRow) -> Result<Endpoint, StoreError> {
    let rate_limit: Option<i64> = row.try_get(7).map_err(corrupt)?;
    Ok(Endpoint {
        id: row.try_get(0).map_err(corrupt)?,
        url: row.try_get(1).map_err(corrupt)?,
        channels: json_column(row, 2)?,
        types: json_column(row, 3)?,
        description: row.try_get(4).map_err(corrupt)?,
        enabled: row.try_get(5).map_err(corrupt)?,
        disabled_reason: row.try_get(6).map_err(corrupt)?,
        rate_limit: rate_limit.map(u32::try_from).transpose().map_err(corrupt)?,
        secrets: json_column(row, 8)?,
        from_seq: row.try_get(9).map_err(corrupt)?,
        failing_since_ms: row.try_get(10).map_err(corrupt)?,
        created_ms: row.try_get(11).map_err(corrupt)?,
        updated_ms: row.try_get(12).map_err(corrupt)?,
    })
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
    .map_err(unavailable)?;
    row.as_ref().map(row_to_endpoint).transpose()
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
    .map_err(unavailable)?;
    Ok(())
}

/// Turns off the commit's wait for the WAL flush, for this transaction only.
async fn relax_commit(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *conn)
        .await
        .map_err(unavailable)?;
    Ok(())
}

async fn insert_deliveries(
    conn: &mut PgConnection,
    deliveries: &[NewDelivery],
) -> Result<(), StoreError> {
    if deliveries.is_empty() {
        return Ok(());
    }
    let now = super::now_ms();
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
    // WITH ORDINALITY keeps the given order in the ids.
    sqlx::query(
        "INSERT INTO deliveries
             (endpoint_id, seq, event_id, msg_id, payload, status, attempts, leased, next_ms, updated_ms)
         SELECT e, s, ev, m, p, 0, 0, FALSE, n, $7
         FROM UNNEST($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bytea[], $6::bigint[])
              WITH ORDINALITY AS t(e, s, ev, m, p, n, ord)
         ORDER BY ord",
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
    .map_err(unavailable)?;
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
        .map_err(unavailable)?;
        let Some(endpoint) = endpoint else {
            out.next_due.push((want.endpoint_id.clone(), None));
            continue;
        };
        let url: String = endpoint.try_get(0).map_err(corrupt)?;
        let secrets: Vec<EndpointSecret> = json_column(&endpoint, 1)?;
        let failing_since_ms: Option<i64> = endpoint.try_get(2).map_err(corrupt)?;
        if want.max > 0 {
            // SKIP LOCKED: rows another node is claiming right now are not
            // waited for; a row it has leased meanwhile fails the re-check
            // of `next_ms <= now` and is not returned.
            let rows = sqlx::query(
                "WITH due AS (
                     SELECT id, next_ms FROM deliveries
                     WHERE endpoint_id = $1 AND status = 0 AND next_ms <= $2
                     ORDER BY next_ms LIMIT $3
                     FOR UPDATE SKIP LOCKED
                 )
                 UPDATE deliveries d
                 SET attempts = d.attempts + 1, leased = TRUE, next_ms = $4, updated_ms = $2
                 FROM due WHERE d.id = due.id
                 RETURNING d.id, d.seq, d.event_id, d.msg_id, d.payload, d.attempts, due.next_ms",
            )
            .bind(&want.endpoint_id)
            .bind(now)
            .bind(want.max.min(i64::MAX as usize) as i64)
            .bind(lease_until)
            .fetch_all(&mut *conn)
            .await
            .map_err(unavailable)?;
            let mut leased = Vec::with_capacity(rows.len());
            for row in &rows {
                let attempts: i32 = row.try_get(5).map_err(corrupt)?;
                let due_ms: i64 = row.try_get(6).map_err(corrupt)?;
                let payload: Vec<u8> = row.try_get(4).map_err(corrupt)?;
                leased.push((
                    due_ms,
                    Delivery {
                        id: row.try_get(0).map_err(corrupt)?,
                        endpoint_id: want.endpoint_id.clone(),
                        seq: row.try_get(1).map_err(corrupt)?,
                        event_id: row.try_get(2).map_err(corrupt)?,
                        msg_id: row.try_get(3).map_err(corrupt)?,
                        payload: payload.into(),
                        attempt: u32::try_from(attempts).map_err(corrupt)?,
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
            "SELECT MIN(next_ms) FROM deliveries WHERE endpoint_id = $1 AND status = 0",
        )
        .bind(&want.endpoint_id)
        .fetch_one(&mut *conn)
        .await
        .map_err(unavailable)?;
        out.next_due.push((want.endpoint_id.clone(), next));
    }
    Ok(out)
}

/// Records attempts (one transaction). Rows are locked in a fixed order —
/// deliveries by id, then endpoints by id — so batches recorded by several
/// nodes at once do not deadlock each other.
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
        .map_err(unavailable)?
        .rows_affected();
        // No row: the endpoint was deleted while the attempt was in flight.
        if inserted > 0 {
            recorded.push(o);
        }
    }
    let mut by_delivery = recorded.clone();
    by_delivery.sort_by_key(|o| o.delivery_id);
    for o in by_delivery {
        let (status, next_ms) = match o.next {
            NextStep::Succeeded => (SUCCEEDED, o.at_ms),
            NextStep::RetryAt(at) => (PENDING, at),
            NextStep::GiveUp => (FAILED, o.at_ms),
        };
        // Only the claim that holds the row (same attempt number) moves it on.
        sqlx::query(
            "UPDATE deliveries SET status = $3, leased = FALSE, next_ms = $4, updated_ms = $5
             WHERE id = $1 AND attempts = $2 AND status = 0",
        )
        .bind(o.delivery_id)
        .bind(i32::try_from(o.attempt).unwrap_or(i32::MAX))
        .bind(status)
        .bind(next_ms)
        .bind(o.at_ms)
        .execute(&mut *conn)
        .await
        .map_err(unavailable)?;
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
        query.execute(&mut *conn).await.map_err(unavailable)?;
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
        let rows = sqlx::query(
            "SELECT id, event_id, msg_id, attempts, next_ms FROM deliveries
             WHERE endpoint_id = $1 AND status = 0 ORDER BY next_ms, id LIMIT $2",
        )
        .bind(endpoint_id)
        .bind(limit)
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
        for r in &rows {
            let id: i64 = r.try_get(0).map_err(corrupt)?;
            let attempts: i32 = r.try_get(3).map_err(corrupt)?;
            out.push(AttemptView {
                id: format!("del_{id}"),
                delivery_id: id,
                event_id: r.try_get(1).map_err(corrupt)?,
                msg_id: r.try_get(2).map_err(corrupt)?,
                attempt: u32::try_from(attempts).map_err(corrupt)? + 1,
                status: AttemptStatus::Pending,
                response_status: None,
                response_body: None,
                error: None,
                duration_ms: None,
                at_ms: r.try_get(4).map_err(corrupt)?,
            });
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
            "SELECT id, delivery_id, event_id, msg_id, attempt, succeeded, response_status,
                 response_body, error, duration_ms, at_ms
             FROM attempts WHERE endpoint_id = $1 {filter} ORDER BY id DESC LIMIT $2"
        )))
        .bind(endpoint_id)
        .bind(remaining)
        .fetch_all(pool)
        .await
        .map_err(unavailable)?;
        for r in &rows {
            let attempt: i32 = r.try_get(4).map_err(corrupt)?;
            let response_status: Option<i32> = r.try_get(6).map_err(corrupt)?;
            out.push(AttemptView {
                id: format!("att_{}", r.try_get::<i64, _>(0).map_err(corrupt)?),
                delivery_id: r.try_get(1).map_err(corrupt)?,
                event_id: r.try_get(2).map_err(corrupt)?,
                msg_id: r.try_get(3).map_err(corrupt)?,
                attempt: u32::try_from(attempt).map_err(corrupt)?,
                status: if r.try_get::<bool, _>(5).map_err(corrupt)? {
                    AttemptStatus::Succeeded
                } else {
                    AttemptStatus::Failed
                },
                response_status: response_status
                    .map(u16::try_from)
                    .transpose()
                    .map_err(corrupt)?,
                response_body: r.try_get(7).map_err(corrupt)?,
                error: r.try_get(8).map_err(corrupt)?,
                duration_ms: r.try_get(9).map_err(corrupt)?,
                at_ms: r.try_get(10).map_err(corrupt)?,
            });
        }
    }
    Ok(out)
}

#[async_trait]
impl Store for PostgresStore {
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
            .map_err(unavailable)?;
        page_from_rows(&rows, after, limit)
    }

    async fn bounds(&self) -> Result<Bounds, StoreError> {
        let (head, pruned_through): (Seq, Seq) =
            sqlx::query_as("SELECT head, pruned_through FROM log_state")
                .fetch_one(&self.pool)
                .await
                .map_err(unavailable)?;
        Ok(Bounds {
            pruned_through,
            head,
        })
    }

    async fn prune(&self, retention: Retention) -> Result<u64, StoreError> {
        prune(&self.pool, retention).await.map_err(unavailable)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.sender()?;
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn read_log(&self, after: Seq, limit: usize) -> Result<Page, StoreError> {
        let limit = limit.max(1);
        let rows = sqlx::query(READ_LOG_PAGE)
            .bind(after)
            .bind(limit as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        page_from_rows(&rows, after, limit)
    }

    async fn create_endpoint(&self, endpoint: NewEndpoint) -> Result<Endpoint, StoreError> {
        let now = super::now_ms();
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
        .map_err(unavailable)?;
        row_to_endpoint(&row)
    }

    async fn list_endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENDPOINT_COLUMNS} FROM endpoints ORDER BY created_ms, id"
        )))
        .fetch_all(&self.pool)
        .await
        .map_err(unavailable)?;
        rows.iter().map(row_to_endpoint).collect()
    }

    async fn get_endpoint(&self, id: &str) -> Result<Option<Endpoint>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(unavailable)?;
        select_endpoint(&mut conn, id, false).await
    }

    async fn update_endpoint(
        &self,
        id: &str,
        patch: EndpointPatch,
    ) -> Result<Option<Endpoint>, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let Some(mut endpoint) = select_endpoint(&mut tx, id, true).await? else {
            return Ok(None);
        };
        patch.apply_to(&mut endpoint, super::now_ms());
        write_endpoint(&mut tx, &endpoint).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(Some(endpoint))
    }

    async fn delete_endpoint(&self, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        // Deliveries before the endpoint: the order `record_attempts` locks in.
        sqlx::query("DELETE FROM deliveries WHERE endpoint_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        sqlx::query("DELETE FROM attempts WHERE endpoint_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?;
        let n = sqlx::query("DELETE FROM endpoints WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(unavailable)?
            .rows_affected();
        tx.commit().await.map_err(unavailable)?;
        Ok(n > 0)
    }

    async fn outbox_cursor(&self) -> Result<Seq, StoreError> {
        sqlx::query_scalar("SELECT cursor FROM outbox_state")
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)
    }

    async fn enqueue_deliveries(
        &self,
        deliveries: Vec<NewDelivery>,
        advance: Option<OutboxAdvance>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        if let Some(advance) = advance {
            // The dispatcher's own progress: redone if lost in a crash.
            relax_commit(&mut tx).await?;
            // Compare-and-set under the row lock: a dispatcher on another
            // node waits here, then finds the cursor moved and writes nothing.
            let cursor: Seq = sqlx::query_scalar("SELECT cursor FROM outbox_state FOR UPDATE")
                .fetch_one(&mut *tx)
                .await
                .map_err(unavailable)?;
            if cursor != advance.from {
                return Ok(false);
            }
            sqlx::query("UPDATE outbox_state SET cursor = $1")
                .bind(advance.to)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
        }
        insert_deliveries(&mut tx, &deliveries).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(true)
    }

    async fn claim_deliveries(
        &self,
        wants: Vec<ClaimWant>,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<Claimed, StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        relax_commit(&mut tx).await?;
        let claimed = claim(&mut tx, &wants, now_ms, lease_until_ms).await?;
        tx.commit().await.map_err(unavailable)?;
        Ok(claimed)
    }

    async fn record_attempts(&self, outcomes: Vec<AttemptOutcome>) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        relax_commit(&mut tx).await?;
        insert_attempts(&mut tx, &outcomes).await?;
        tx.commit().await.map_err(unavailable)
    }

    async fn list_attempts(
        &self,
        endpoint_id: &str,
        status: Option<AttemptStatus>,
        limit: usize,
    ) -> Result<Vec<AttemptView>, StoreError> {
        select_attempts(&self.pool, endpoint_id, status, limit).await
    }

    async fn prune_deliveries(&self, before_ms: i64) -> Result<u64, StoreError> {
        let mut removed = 0;
        // Chunk by chunk: short transactions, short row locks.
        loop {
            let mut n = sqlx::query(
                "DELETE FROM deliveries WHERE id IN (
                     SELECT id FROM deliveries WHERE status <> 0 AND updated_ms < $1 LIMIT $2)",
            )
            .bind(before_ms)
            .bind(PRUNE_DELIVERIES_CHUNK)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?
            .rows_affected();
            n += sqlx::query(
                "DELETE FROM attempts WHERE id IN (
                     SELECT id FROM attempts WHERE at_ms < $1 LIMIT $2)",
            )
            .bind(before_ms)
            .bind(PRUNE_DELIVERIES_CHUNK)
            .execute(&self.pool)
            .await
            .map_err(unavailable)?
            .rows_affected();
            removed += n;
            if n == 0 {
                return Ok(removed);
            }
        }
    }

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
            _ => Err(StoreError::Unavailable(
                "internal: a webhook append returned no record".into(),
            )),
        }
    }

    async fn record_rejected(&self, inbound: NewInbound) -> Result<InboundId, StoreError> {
        let mut records = InboundColumns::default();
        records.push(&inbound, InboundStatus::Rejected, None, true);
        let mut tx = self.pool.begin().await.map_err(unavailable)?;
        let now: i64 = sqlx::query_scalar(
            "SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint",
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
        let ids = records.insert(&mut tx, now).await.map_err(unavailable)?;
        tx.commit().await.map_err(unavailable)?;
        ids.first()
            .copied()
            .ok_or_else(|| StoreError::Unavailable("internal: no record id".into()))
    }

    async fn list_inbound(&self, filter: InboundFilter) -> Result<Vec<InboundRecord>, StoreError> {
        let rows = sqlx::query(LIST_INBOUND)
            .bind(filter.source)
            .bind(filter.status.map(InboundStatus::as_str))
            .bind(filter.before)
            .bind(filter.limit.clamp(1, 10_000) as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(unavailable)?;
        rows.iter().map(row_to_inbound).collect()
    }

    async fn get_inbound(&self, id: InboundId) -> Result<Option<InboundRecord>, StoreError> {
        let Some(row) = sqlx::query(GET_INBOUND)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let mut record = row_to_inbound(&row)?;
        let headers: String = row
            .try_get(12)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        record.headers =
            serde_json::from_str(&headers).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let body: Option<Vec<u8>> = row
            .try_get(13)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        record.body = body.map(bytes::Bytes::from);
        Ok(Some(record))
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

/// Retention on a shared log: any node may prune, several may at once.
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
