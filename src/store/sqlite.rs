//! The embedded log: SQLite in WAL mode, one writer thread, a few readers.
//!
//! Invariants:
//! - only the writer thread writes; it drains every append waiting in its
//!   queue into one transaction (group commit), so one fsync acknowledges
//!   many publishers; each request runs in its own savepoint, so one bad
//!   request cannot undo its neighbours;
//! - seqs are assigned by the writer from its in-memory head, inside the
//!   transaction: commit order is seq order;
//! - every connection runs `journal_mode=WAL` and the configured
//!   `synchronous` (`FULL` by default: a commit is on disk when it returns);
//! - committed batches go to the commit feed from the writer thread, after
//!   the commit, in seq order;
//! - outbound-webhook bookkeeping (claims, attempt results, the dispatcher's
//!   pages) commits without its own sync (`write_relaxed`): it is never
//!   acknowledged to anyone, and losing it only repeats a delivery.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params, params_from_iter};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::{
    Appended, AttemptOutcome, AttemptStatus, AttemptView, Bounds, ClaimWant, Claimed, CommitFeed,
    Delivery, Endpoint, EndpointPatch, EndpointSecret, Event, Health, INBOUND_CAPPED_KEEP,
    InboundFilter, InboundId, InboundRecord, InboundStatus, NewDelivery, NewEndpoint, NewInbound,
    NewMessage, NextStep, OutboxAdvance, Page, Retention, Seq, Store, StoreError, now_ms,
};

/// Requests the writer takes in one transaction, at most.
const MAX_GROUP: usize = 512;
/// Events deleted per retention transaction, so pruning never stalls appends for long.
const PRUNE_CHUNK: i64 = 20_000;
const READERS: usize = 4;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    type TEXT NOT NULL,
    source TEXT NOT NULL,
    source_id TEXT,
    time_ms INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_channel ON events (channel, seq);
CREATE TABLE IF NOT EXISTS dedupe (
    source TEXT NOT NULL,
    source_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    time_ms INTEGER NOT NULL,
    PRIMARY KEY (source, source_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dedupe_by_time ON dedupe (time_ms);

CREATE TABLE IF NOT EXISTS endpoints (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    channels TEXT NOT NULL,
    types TEXT NOT NULL,
    description TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    disabled_reason TEXT,
    rate_limit INTEGER,
    secrets TEXT NOT NULL,
    from_seq INTEGER NOT NULL,
    failing_since_ms INTEGER,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    endpoint_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    payload BLOB NOT NULL,
    status INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    leased INTEGER NOT NULL,
    next_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (endpoint_id, next_ms) WHERE status = 0;
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries (updated_ms) WHERE status <> 0;
CREATE INDEX IF NOT EXISTS deliveries_by_endpoint ON deliveries (endpoint_id, id);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL,
    endpoint_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    msg_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    succeeded INTEGER NOT NULL,
    response_status INTEGER,
    response_body TEXT,
    error TEXT,
    duration_ms INTEGER NOT NULL,
    at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_by_endpoint ON attempts (endpoint_id, id);
CREATE INDEX IF NOT EXISTS attempts_by_time ON attempts (at_ms);
-- The inspector's record of inbound webhooks. `capped = 0`: an accepted new
-- message, removed with its first event; `capped = 1`: a refusal or a
-- duplicate, of which the newest INBOUND_CAPPED_KEEP are kept. `body` NULL
-- means \"the same bytes as the data of event `first_seq`\" (stored once).
CREATE TABLE IF NOT EXISTS inbound (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    status TEXT NOT NULL,
    duplicate INTEGER NOT NULL,
    capped INTEGER NOT NULL,
    reason TEXT,
    detail TEXT,
    source_id TEXT,
    type TEXT,
    channels TEXT NOT NULL,
    seqs TEXT NOT NULL,
    first_seq INTEGER,
    headers TEXT NOT NULL,
    body BLOB,
    body_size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS inbound_by_source ON inbound (source, id);
CREATE INDEX IF NOT EXISTS inbound_capped ON inbound (id) WHERE capped = 1;
CREATE INDEX IF NOT EXISTS inbound_by_event ON inbound (first_seq) WHERE capped = 0;
";

/// `deliveries.status` values.
const PENDING: i64 = 0;
const SUCCEEDED: i64 = 1;
const FAILED: i64 = 2;

enum WriteCmd {
    Append {
        messages: Vec<NewMessage>,
        reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
    },
    Webhook {
        message: NewMessage,
        inbound: NewInbound,
        reply: oneshot::Sender<Result<(Appended, InboundId), StoreError>>,
    },
    Rejected {
        inbound: NewInbound,
        reply: oneshot::Sender<Result<InboundId, StoreError>>,
    },
    Prune {
        retention: Retention,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Pragmas {
        reply: oneshot::Sender<rusqlite::Result<(String, i64)>>,
    },
    /// Any other write, run on the writer's connection with the current head
    /// (outbound webhooks); it replies through its own channel.
    Run(WriterJob),
}

type WriterJob = Box<dyn FnOnce(&mut Connection, Seq) + Send>;
/// The writes of one group commit, each run in its own savepoint.
enum Job {
    Append {
        messages: Vec<NewMessage>,
        reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
    },
    Webhook {
        message: NewMessage,
        inbound: NewInbound,
        reply: oneshot::Sender<Result<(Appended, InboundId), StoreError>>,
    },
    Rejected {
        inbound: NewInbound,
        reply: oneshot::Sender<Result<InboundId, StoreError>>,
    },
}

enum Outcome {
    Appended(Vec<Appended>),
    Webhook(Appended, InboundId),
    Recorded(InboundId),
}

impl Job {
    /// Answers the job's caller; a reply that does not fit the job cannot
    /// happen (outcomes are made from their own job) and reads as unavailable.
    fn reply(self, outcome: Result<Outcome, StoreError>) {
        let mismatch = || StoreError::Unavailable("internal: mismatched write outcome".into());
        match self {
            Job::Append { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Appended(a) => Ok(a),
                    _ => Err(mismatch()),
                }));
            }
            Job::Webhook { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Webhook(a, id) => Ok((a, id)),
                    _ => Err(mismatch()),
                }));
            }
            Job::Rejected { reply, .. } => {
                let _ = reply.send(outcome.and_then(|o| match o {
                    Outcome::Recorded(id) => Ok(id),
                    _ => Err(mismatch()),
                }));
            }
        }
    }
}

pub struct SqliteStore {
    tag: String,
    path: String,
    synchronous: String,
    writer_tx: Mutex<Option<mpsc::Sender<WriteCmd>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn configure(conn: &Connection, synchronous: &str) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    // The savepoint per request journals the pages it touches; past 64 KiB
    // per transaction SQLite spills that journal to a temp file, which a
    // group commit of webhooks (~1 KiB each) always reaches. It is never
    // needed after the transaction: keep it in memory.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the log at `path` and starts its writer thread.
    pub fn open(path: &str, synchronous: &str) -> Result<(SqliteStore, CommitFeed), StoreError> {
        if let Some(parent) = Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
        {
            std::fs::create_dir_all(parent).map_err(unavailable)?;
        }
        let conn = Connection::open(path).map_err(unavailable)?;
        configure(&conn, synchronous).map_err(unavailable)?;
        conn.execute_batch(SCHEMA).map_err(unavailable)?;
        let tag = log_tag(&conn).map_err(unavailable)?;
        let pruned_through = meta_seq(&conn, "pruned_through").map_err(unavailable)?;
        let max_seq: Seq = conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))
            .map_err(unavailable)?;
        let head = max_seq.max(pruned_through);
        // One process owns an SQLite log: leases left by a previous run
        // belong to deliveries that died with it, so they are due now.
        conn.execute(
            "UPDATE deliveries SET leased = 0, next_ms = ?1 WHERE status = 0 AND leased = 1",
            params![now_ms()],
        )
        .map_err(unavailable)?;

        let (writer_tx, writer_rx) = mpsc::channel(4096);
        let (feed_tx, feed_rx) = mpsc::channel(1024);
        let writer = Writer {
            conn,
            head,
            pruned_through,
            feed: feed_tx,
        };
        let thread = std::thread::Builder::new()
            .name("pushgate-sqlite-writer".into())
            .spawn(move || writer.run(writer_rx))
            .map_err(unavailable)?;
        let store = SqliteStore {
            tag,
            path: path.to_string(),
            synchronous: synchronous.to_string(),
            writer_tx: Mutex::new(Some(writer_tx)),
            writer_thread: Mutex::new(Some(thread)),
            readers: Arc::new(Mutex::new(Vec::new())),
        };
        Ok((store, feed_rx))
    }

    /// Runs `f` on the writer thread (between append groups) and waits for
    /// its result; `f` commits its own transaction.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, Seq) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(WriteCmd::Run(Box::new(move |c, head| {
                let _ = reply.send(f(c, head));
            })))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await
            .map_err(|_| StoreError::Closed)?
            .map_err(unavailable)
    }

    /// Like `write`, but commits without waiting for the disk
    /// (`synchronous=NORMAL` for this transaction only). Only for delivery
    /// bookkeeping that nobody is told about: in WAL mode the commit is in
    /// the log file at once (a killed process loses nothing) and is synced by
    /// the next synced commit; a power cut may lose the last few, which only
    /// repeats work — a lost lease or attempt result means the delivery is
    /// attempted again, a lost outbox page is queued again.
    async fn write_relaxed<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection, Seq) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let configured = self.synchronous.clone();
        self.write(move |c, head| {
            let relax = !configured.eq_ignore_ascii_case("normal");
            if relax {
                c.pragma_update(None, "synchronous", "NORMAL")?;
            }
            let result = f(c, head);
            if relax {
                c.pragma_update(None, "synchronous", &configured)?;
            }
            result
        })
        .await
    }

    fn sender(&self) -> Result<mpsc::Sender<WriteCmd>, StoreError> {
        self.writer_tx
            .lock()
            .expect("writer sender lock")
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Runs `f` on a pooled read connection, off the async runtime.
    async fn with_reader<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        let synchronous = self.synchronous.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().expect("reader pool lock").pop();
            let conn = match pooled {
                Some(c) => c,
                None => {
                    let c = Connection::open_with_flags(
                        &path,
                        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                    )?;
                    configure(&c, &synchronous)?;
                    c.pragma_update(None, "query_only", true)?;
                    c
                }
            };
            let result = f(&conn);
            let mut pool = readers.lock().expect("reader pool lock");
            if pool.len() < READERS {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)
    }

    /// `(journal_mode, synchronous)` of every open connection: the writer's
    /// and each pooled reader's. `synchronous` is 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA.
    pub async fn connection_pragmas(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(WriteCmd::Pragmas { reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        let mut out = vec![
            rx.await
                .map_err(|_| StoreError::Closed)?
                .map_err(unavailable)?,
        ];
        // Make sure at least one reader exists, then report on every pooled one.
        self.ping().await?;
        let pooled = self.readers.lock().expect("reader pool lock");
        for c in pooled.iter() {
            out.push(pragmas(c).map_err(unavailable)?);
        }
        Ok(out)
    }
}

fn pragmas(c: &Connection) -> rusqlite::Result<(String, i64)> {
    let mode: String = c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?;
    let sync: i64 = c.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    Ok((mode, sync))
}

fn log_tag(conn: &Connection) -> rusqlite::Result<String> {
    if let Some(tag) = conn
        .query_row("SELECT value FROM meta WHERE key = 'log_tag'", [], |r| {
            r.get(0)
        })
        .optional()?
    {
        return Ok(tag);
    }
    let tag = random_tag();
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('log_tag', ?1)",
        params![tag],
    )?;
    Ok(tag)
}

/// Six lowercase base-36 characters: enough to tell logs apart, short on the wire.
pub fn random_tag() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..6)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn meta_seq(conn: &Connection, key: &str) -> rusqlite::Result<Seq> {
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", params![key], |r| {
            r.get::<_, String>(0)
        })
        .optional()?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

struct Writer {
    conn: Connection,
    head: Seq,
    pruned_through: Seq,
    feed: mpsc::Sender<Arc<[Event]>>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteCmd>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(cmd) => group.push(cmd),
                    Err(_) => break,
                }
            }
            self.run_group(group);
        }
        // Channel closed: every sender is gone, all queued work is done.
    }

    fn run_group(&mut self, group: Vec<WriteCmd>) {
        let mut jobs = Vec::new();
        for cmd in group {
            match cmd {
                WriteCmd::Append { messages, reply } => jobs.push(Job::Append { messages, reply }),
                WriteCmd::Webhook {
                    message,
                    inbound,
                    reply,
                } => jobs.push(Job::Webhook {
                    message,
                    inbound,
                    reply,
                }),
                WriteCmd::Rejected { inbound, reply } => {
                    jobs.push(Job::Rejected { inbound, reply })
                }
                WriteCmd::Prune { retention, reply } => {
                    let _ = reply.send(self.prune(retention).map_err(unavailable));
                }
                WriteCmd::Pragmas { reply } => {
                    let _ = reply.send(pragmas(&self.conn));
                }
                WriteCmd::Run(f) => f(&mut self.conn, self.head),
            }
        }
        if jobs.is_empty() {
            return;
        }
        let head_before = self.head;
        let mut committed: Vec<Event> = Vec::new();
        let outcomes = match self.run_jobs(&jobs, &mut committed) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                self.head = head_before;
                let msg = e.to_string();
                tracing::error!(error = %msg, "append transaction failed");
                for job in jobs {
                    job.reply(Err(StoreError::Unavailable(msg.clone())));
                }
                return;
            }
        };
        for (job, outcome) in jobs.into_iter().zip(outcomes) {
            job.reply(outcome);
        }
        if !committed.is_empty() {
            // Blocking here is the backpressure that keeps the hub's queue bounded.
            let _ = self.feed.blocking_send(committed.into());
        }
    }

    /// Runs every job of a group in one transaction, each in its own savepoint.
    fn run_jobs(
        &mut self,
        jobs: &[Job],
        committed: &mut Vec<Event>,
    ) -> rusqlite::Result<Vec<Result<Outcome, StoreError>>> {
        let mut tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_ms();
        let mut outcomes = Vec::with_capacity(jobs.len());
        for job in jobs {
            let head_before = self.head;
            let committed_before = committed.len();
            let mut sp = tx.savepoint()?;
            let result = match job {
                Job::Append { messages, .. } => {
                    append_messages(&sp, messages, now, &mut self.head, committed)
                        .map(Outcome::Appended)
                }
                Job::Webhook {
                    message, inbound, ..
                } => append_messages(
                    &sp,
                    std::slice::from_ref(message),
                    now,
                    &mut self.head,
                    committed,
                )
                .and_then(|mut out| {
                    let appended = out.pop().expect("one outcome per message");
                    let id = insert_inbound(&sp, inbound, Some((message, &appended)), now)?;
                    Ok(Outcome::Webhook(appended, id))
                }),
                Job::Rejected { inbound, .. } => {
                    insert_inbound(&sp, inbound, None, now).map(Outcome::Recorded)
                }
            };
            match result {
                Ok(out) => {
                    sp.commit()?;
                    outcomes.push(Ok(out));
                }
                Err(e) => {
                    sp.rollback()?;
                    drop(sp);
                    self.head = head_before;
                    committed.truncate(committed_before);
                    outcomes.push(Err(unavailable(e)));
                }
            }
        }
        tx.commit()?;
        Ok(outcomes)
    }

    fn prune(&mut self, retention: Retention) -> rusqlite::Result<u64> {
        let now = now_ms();
        let mut removed = 0u64;
        loop {
            let age_cutoff = now.saturating_sub(retention.max_age_ms);
            // The first event young enough to keep; everything before it goes.
            let first_young: Option<Seq> = self
                .conn
                .query_row(
                    "SELECT seq FROM events WHERE time_ms >= ?1 ORDER BY seq LIMIT 1",
                    params![age_cutoff],
                    |r| r.get(0),
                )
                .optional()?;
            let mut keep_from = first_young.unwrap_or(self.head + 1);
            if retention.max_events > 0 {
                keep_from = keep_from.max(self.head + 1 - retention.max_events as i64);
            }
            let oldest: Option<Seq> =
                self.conn
                    .query_row("SELECT MIN(seq) FROM events", [], |r| r.get(0))?;
            let Some(oldest) = oldest.filter(|o| *o < keep_from) else {
                break;
            };
            let upto = keep_from.min(oldest + PRUNE_CHUNK) - 1;
            let tx = self.conn.transaction()?;
            let n = tx.execute("DELETE FROM events WHERE seq <= ?1", params![upto])?;
            tx.execute(
                "DELETE FROM inbound WHERE capped = 0 AND first_seq <= ?1",
                params![upto],
            )?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('pruned_through', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![upto.to_string()],
            )?;
            tx.commit()?;
            self.pruned_through = upto;
            removed += n as u64;
        }
        if retention.dedupe_window_ms < i64::MAX {
            self.conn.execute(
                "DELETE FROM dedupe WHERE time_ms < ?1",
                params![now.saturating_sub(retention.dedupe_window_ms)],
            )?;
        }
        Ok(removed)
    }
}

fn append_messages(
    conn: &Connection,
    messages: &[NewMessage],
    now: i64,
    head: &mut Seq,
    committed: &mut Vec<Event>,
) -> rusqlite::Result<Vec<Appended>> {
    let mut claim = conn.prepare_cached(
        "INSERT INTO dedupe (source, source_id, first_seq, time_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (source, source_id) DO NOTHING",
    )?;
    let mut first_of =
        conn.prepare_cached("SELECT first_seq FROM dedupe WHERE source = ?1 AND source_id = ?2")?;
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
            if claim.execute(params![m.source, id, first_seq, now])? == 0 {
                let first: Seq = first_of.query_row(params![m.source, id], |r| r.get(0))?;
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

/// Records one delivery; `accepted` is the message and its append outcome.
fn insert_inbound(
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
            "DELETE FROM inbound WHERE capped = 1 AND id <= (
                 SELECT id FROM inbound WHERE capped = 1 ORDER BY id DESC LIMIT 1 OFFSET ?1)",
        )?;
        trim.execute(params![INBOUND_CAPPED_KEEP as i64])?;
    }
    Ok(id)
}

const INBOUND_COLUMNS: &str =
    "i.id, i.time_ms, i.source, i.status, i.duplicate, i.reason, i.detail,
     i.source_id, i.type, i.channels, i.seqs, i.body_size";

fn corrupt(col: usize, e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(col, rusqlite::types::Type::Text, Box::new(e))
}

/// A row of `INBOUND_COLUMNS`, without headers and body.
fn row_to_inbound(r: &rusqlite::Row<'_>) -> rusqlite::Result<InboundRecord> {
    let status: String = r.get(3)?;
    let channels: String = r.get(9)?;
    let seqs: String = r.get(10)?;
    Ok(InboundRecord {
        id: r.get(0)?,
        time_ms: r.get(1)?,
        source: r.get(2)?,
        status: InboundStatus::parse(&status).ok_or_else(|| {
            corrupt(
                3,
                std::io::Error::other(format!("unknown inbound status `{status}`")),
            )
        })?,
        duplicate: r.get(4)?,
        reason: r.get(5)?,
        detail: r.get(6)?,
        source_id: r.get(7)?,
        kind: r.get(8)?,
        channels: serde_json::from_str(&channels).map_err(|e| corrupt(9, e))?,
        seqs: serde_json::from_str(&seqs).map_err(|e| corrupt(10, e))?,
        body_size: r.get::<_, i64>(11)?.max(0) as u64,
        headers: Vec::new(),
        body: None,
    })
}

fn row_to_event(r: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let data: String = r.get(6)?;
    let data = RawValue::from_string(data).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(6, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(Event {
        seq: r.get(0)?,
        channel: r.get(1)?,
        kind: r.get(2)?,
        source: r.get(3)?,
        source_id: r.get(4)?,
        time_ms: r.get(5)?,
        data,
    })
}

fn read_bounds(c: &Connection) -> rusqlite::Result<Bounds> {
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
            "SELECT seq, channel, type, source, source_id, time_ms, data FROM events
             WHERE {filter} seq > ? ORDER BY seq LIMIT ?"
        );
        let mut stmt = c.prepare_cached(&sql)?;
        args.push(rusqlite::types::Value::Integer(after));
        args.push(rusqlite::types::Value::Integer(limit as i64));
        let events = stmt
            .query_map(params_from_iter(args), row_to_event)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let scanned_to = if events.len() >= limit {
            events.last().map(|e| e.seq).unwrap_or(after)
        } else {
            head.max(after)
        };
        Ok(Page { events, scanned_to })
    })();
    c.execute_batch("COMMIT")?;
    result
}

// ---- Outbound webhooks ------------------------------------------------------
// Writes run on the writer thread (`WriteCmd::Run`), each in its own
// transaction, and reply after the commit; reads use the reader pool.

const ENDPOINT_COLUMNS: &str = "id, url, channels, types, description, enabled, disabled_reason, \
     rate_limit, secrets, from_seq, failing_since_ms, created_ms, updated_ms";

fn json_column<T: serde::de::DeserializeOwned>(
    r: &rusqlite::Row<'_>,
    i: usize,
) -> rusqlite::Result<T> {
    let text: String = r.get(i)?;
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn row_to_endpoint(r: &rusqlite::Row<'_>) -> rusqlite::Result<Endpoint> {
    Ok(Endpoint {
        id: r.get(0)?,
        url: r.get(1)?,
        channels: json_column(r, 2)?,
        types: json_column(r, 3)?,
        description: r.get(4)?,
        enabled: r.get(5)?,
        disabled_reason: r.get(6)?,
        rate_limit: r.get(7)?,
        secrets: json_column(r, 8)?,
        from_seq: r.get(9)?,
        failing_since_ms: r.get(10)?,
        created_ms: r.get(11)?,
        updated_ms: r.get(12)?,
    })
}

fn select_endpoint(c: &Connection, id: &str) -> rusqlite::Result<Option<Endpoint>> {
    c.prepare_cached(&format!(
        "SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE id = ?1"
    ))?
    .query_row(params![id], row_to_endpoint)
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
            to_json(&endpoint.channels),
            to_json(&endpoint.types),
            endpoint.description,
            endpoint.enabled,
            endpoint.disabled_reason,
            endpoint.rate_limit,
            to_json(&endpoint.secrets),
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
            to_json(&e.channels),
            to_json(&e.types),
            e.description,
            e.enabled,
            e.disabled_reason,
            e.rate_limit,
            to_json(&e.secrets),
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
                        json_column::<Vec<EndpointSecret>>(r, 1)?,
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
        let mut stmt = c.prepare_cached(
            "SELECT id, event_id, msg_id, attempts, next_ms FROM deliveries
             WHERE endpoint_id = ?1 AND status = 0 ORDER BY next_ms, id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![endpoint_id, limit as i64], |r| {
            let id: i64 = r.get(0)?;
            Ok(AttemptView {
                id: format!("del_{id}"),
                delivery_id: id,
                event_id: r.get(1)?,
                msg_id: r.get(2)?,
                attempt: r.get::<_, u32>(3)? + 1,
                status: AttemptStatus::Pending,
                response_status: None,
                response_body: None,
                error: None,
                duration_ms: None,
                at_ms: r.get(4)?,
            })
        })?;
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
            "SELECT id, delivery_id, event_id, msg_id, attempt, succeeded, response_status,
                 response_body, error, duration_ms, at_ms
             FROM attempts WHERE endpoint_id = ?1 {filter} ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![endpoint_id, remaining as i64], |r| {
            Ok(AttemptView {
                id: format!("att_{}", r.get::<_, i64>(0)?),
                delivery_id: r.get(1)?,
                event_id: r.get(2)?,
                msg_id: r.get(3)?,
                attempt: r.get(4)?,
                status: if r.get::<_, bool>(5)? {
                    AttemptStatus::Succeeded
                } else {
                    AttemptStatus::Failed
                },
                response_status: r.get(6)?,
                response_body: r.get(7)?,
                error: r.get(8)?,
                duration_ms: r.get(9)?,
                at_ms: r.get(10)?,
            })
        })?;
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

#[async_trait]
impl Store for SqliteStore {
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

    async fn create_endpoint(&self, endpoint: NewEndpoint) -> Result<Endpoint, StoreError> {
        self.write(move |c, head| insert_endpoint(c, head, endpoint))
            .await
    }

    async fn list_endpoints(&self) -> Result<Vec<Endpoint>, StoreError> {
        self.with_reader(|c| {
            c.prepare_cached(&format!(
                "SELECT {ENDPOINT_COLUMNS} FROM endpoints ORDER BY created_ms, id"
            ))?
            .query_map([], row_to_endpoint)?
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
            stmt.query_map(params_from_iter(args), row_to_inbound)?
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
                let mut record = row_to_inbound(r)?;
                let headers: String = r.get(12)?;
                record.headers = serde_json::from_str(&headers).map_err(|e| corrupt(12, e))?;
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

#[cfg(test)]
mod tests {
    // The behaviour every store shares (outbound webhooks included) is
    // tested by the store suite (tests/it/store_suite.rs), against SQLite
    // and PostgreSQL alike.
    use super::*;

    #[tokio::test]
    async fn every_connection_is_wal_and_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let (store, _feed) = SqliteStore::open(path.to_str().unwrap(), "full").unwrap();
        let pragmas = store.connection_pragmas().await.unwrap();
        assert!(pragmas.len() >= 2);
        for (mode, sync) in pragmas {
            assert_eq!(mode, "wal");
            assert_eq!(sync, 2, "synchronous=FULL");
        }
    }
}
