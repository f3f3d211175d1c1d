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
//!   the commit, in seq order.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params, params_from_iter};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use super::{
    Appended, Bounds, CommitFeed, Event, INBOUND_CAPPED_KEEP, InboundFilter, InboundId,
    InboundRecord, InboundStatus, NewInbound, NewMessage, Page, Retention, Seq, Store, StoreError,
    now_ms,
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
CREATE INDEX IF NOT EXISTS inbound_by_status ON inbound (status, id);
CREATE INDEX IF NOT EXISTS inbound_capped ON inbound (id) WHERE capped = 1;
CREATE INDEX IF NOT EXISTS inbound_by_event ON inbound (first_seq) WHERE capped = 0;
";

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
}

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
        let limit = limit.max(1);
        self.with_reader(move |c| {
            // One read transaction: the head and the page come from one snapshot.
            c.execute_batch("BEGIN")?;
            let result = (|| {
                let head = read_bounds(c)?.head;
                let placeholders = vec!["?"; channels.len()].join(",");
                let sql = format!(
                    "SELECT seq, channel, type, source, source_id, time_ms, data FROM events
                     WHERE channel IN ({placeholders}) AND seq > ? ORDER BY seq LIMIT ?"
                );
                let mut stmt = c.prepare_cached(&sql)?;
                let mut args: Vec<rusqlite::types::Value> = channels
                    .iter()
                    .map(|ch| rusqlite::types::Value::Text(ch.clone()))
                    .collect();
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
        })
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
    use super::*;

    fn msg(channel: &str, id: Option<&str>) -> NewMessage {
        NewMessage {
            channels: vec![channel.into()],
            kind: "t".into(),
            source: "publish".into(),
            source_id: id.map(str::to_string),
            data: RawValue::from_string("{\"n\":1}".into()).unwrap(),
        }
    }

    #[tokio::test]
    async fn append_read_dedupe_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let path = path.to_str().unwrap();
        let (store, mut feed) = SqliteStore::open(path, "full").unwrap();
        let out = store
            .append(vec![
                msg("a", Some("k1")),
                msg("b", None),
                msg("a", Some("k1")),
            ])
            .await
            .unwrap();
        assert_eq!(
            out[0],
            Appended {
                seqs: vec![1],
                duplicate: false
            }
        );
        assert_eq!(
            out[1],
            Appended {
                seqs: vec![2],
                duplicate: false
            }
        );
        assert_eq!(
            out[2],
            Appended {
                seqs: vec![1],
                duplicate: true
            }
        );
        let batch = feed.recv().await.unwrap();
        assert_eq!(batch.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);

        let page = store.read(&["a".into()], 0, 10).await.unwrap();
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.events[0].data.get(), "{\"n\":1}");
        assert_eq!(page.scanned_to, 2);
        let page = store.read(&["a".into(), "b".into()], 0, 1).await.unwrap();
        assert_eq!(
            page.scanned_to, 1,
            "a full page resumes after its last event"
        );

        let tag = store.log_tag().to_string();
        store.close().await;
        let (store, _feed) = SqliteStore::open(path, "full").unwrap();
        assert_eq!(store.log_tag(), tag, "the log keeps its identity");
        let out = store
            .append(vec![msg("a", Some("k1")), msg("a", None)])
            .await
            .unwrap();
        assert!(out[0].duplicate);
        assert_eq!(out[1].seqs, vec![3], "seqs continue after a restart");
    }

    #[tokio::test]
    async fn prune_keeps_seqs_monotonic_and_dedupe_outlives_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let path = path.to_str().unwrap();
        let (store, _feed) = SqliteStore::open(path, "full").unwrap();
        store
            .append(vec![msg("a", Some("k")), msg("a", None)])
            .await
            .unwrap();
        let removed = store
            .prune(Retention {
                max_age_ms: -1_000_000,
                max_events: 0,
                dedupe_window_ms: i64::MAX,
            })
            .await
            .unwrap();
        assert_eq!(removed, 2);
        assert_eq!(
            store.bounds().await.unwrap(),
            Bounds {
                pruned_through: 2,
                head: 2
            }
        );
        let out = store
            .append(vec![msg("a", Some("k")), msg("a", None)])
            .await
            .unwrap();
        assert!(out[0].duplicate, "dedupe survives retention");
        assert_eq!(out[1].seqs, vec![3], "an emptied log never reuses a seq");
        store.close().await;
        let (store, _feed) = SqliteStore::open(path, "full").unwrap();
        assert_eq!(store.bounds().await.unwrap().head, 3);
        store
            .prune(Retention {
                max_age_ms: i64::MAX,
                max_events: 0,
                dedupe_window_ms: -1_000_000,
            })
            .await
            .unwrap();
        let out = store.append(vec![msg("a", Some("k"))]).await.unwrap();
        assert!(
            !out[0].duplicate,
            "past the dedupe window a key is new again"
        );
    }

    fn inbound(body: &str, reason: Option<&str>) -> NewInbound {
        NewInbound {
            source: "stripe".into(),
            headers: vec![("stripe-signature".into(), "t=1,v1=00".into())],
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            body_size: body.len() as u64,
            reason: reason.map(str::to_string),
            detail: reason.map(|r| format!("because {r}")),
        }
    }

    #[tokio::test]
    async fn webhook_records_live_with_their_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let (store, mut feed) = SqliteStore::open(path.to_str().unwrap(), "full").unwrap();
        let mut m = msg("user:1", Some("evt_1"));
        m.channels.push("billing".into());
        m.source = "stripe".into();
        let (appended, id) = store
            .append_webhook(m.clone(), inbound("{\"n\":1}", None))
            .await
            .unwrap();
        assert_eq!(appended.seqs, vec![1, 2]);
        assert!(!appended.duplicate);
        assert_eq!(
            feed.recv().await.unwrap().len(),
            2,
            "pushed like any append"
        );
        // A trailing newline: the body differs from the stored data, kept apart.
        let (dup, dup_id) = store
            .append_webhook(m, inbound("{\"n\":1}\n", None))
            .await
            .unwrap();
        assert_eq!(
            dup,
            Appended {
                seqs: vec![1],
                duplicate: true
            }
        );
        assert!(dup_id > id);
        let rejected = store
            .record_rejected(inbound("junk", Some("invalid_signature")))
            .await
            .unwrap();

        let got = store.get_inbound(id).await.unwrap().unwrap();
        assert_eq!(got.status, InboundStatus::Accepted);
        assert_eq!(
            got.body.as_deref(),
            Some(&b"{\"n\":1}"[..]),
            "stored once, read back whole"
        );
        assert_eq!(
            got.headers,
            vec![("stripe-signature".to_string(), "t=1,v1=00".to_string())]
        );
        assert_eq!(got.seqs, vec![1, 2]);
        assert_eq!(got.channels, vec!["user:1", "billing"]);
        assert_eq!(got.source_id.as_deref(), Some("evt_1"));
        let got = store.get_inbound(dup_id).await.unwrap().unwrap();
        assert!(got.duplicate);
        assert_eq!(got.body.as_deref(), Some(&b"{\"n\":1}\n"[..]));
        let got = store.get_inbound(rejected).await.unwrap().unwrap();
        assert_eq!(got.status, InboundStatus::Rejected);
        assert_eq!(got.reason.as_deref(), Some("invalid_signature"));
        assert_eq!(got.detail.as_deref(), Some("because invalid_signature"));

        let all = store
            .list_inbound(InboundFilter {
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            all.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![rejected, dup_id, id],
            "newest first"
        );
        assert!(all.iter().all(|r| r.body.is_none() && r.headers.is_empty()));
        let only = |status, source: &str| InboundFilter {
            status: Some(status),
            source: Some(source.into()),
            limit: 10,
            before: None,
        };
        assert_eq!(
            store
                .list_inbound(only(InboundStatus::Accepted, "stripe"))
                .await
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            store
                .list_inbound(only(InboundStatus::Rejected, "stripe"))
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            store
                .list_inbound(only(InboundStatus::Rejected, "github"))
                .await
                .unwrap()
                .len(),
            0
        );

        // Retention takes the accepted record with its events.
        store
            .prune(Retention {
                max_age_ms: -1_000_000,
                max_events: 0,
                dedupe_window_ms: i64::MAX,
            })
            .await
            .unwrap();
        assert_eq!(store.get_inbound(id).await.unwrap(), None);
        assert!(store.get_inbound(rejected).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn refusals_are_capped_by_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let (store, _feed) = SqliteStore::open(path.to_str().unwrap(), "full").unwrap();
        let mut m = msg("a", Some("kept"));
        m.source = "stripe".into();
        let (_, accepted) = store.append_webhook(m, inbound("{}", None)).await.unwrap();
        let extra = 25;
        let mut last = 0;
        for i in 0..INBOUND_CAPPED_KEEP + extra {
            last = store
                .record_rejected(inbound(&format!("{i}"), Some("invalid_signature")))
                .await
                .unwrap();
        }
        let rejected = store
            .list_inbound(InboundFilter {
                status: Some(InboundStatus::Rejected),
                limit: 10_000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(rejected.len(), INBOUND_CAPPED_KEEP);
        assert_eq!(rejected[0].id, last, "the newest are kept");
        let oldest = store
            .get_inbound(rejected.last().unwrap().id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(oldest.body.as_deref(), Some(format!("{extra}").as_bytes()));
        assert!(
            store.get_inbound(accepted).await.unwrap().is_some(),
            "accepted records are not counted against the cap"
        );
    }

    #[tokio::test]
    async fn retention_by_count_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let (store, _feed) = SqliteStore::open(path.to_str().unwrap(), "full").unwrap();
        let batch: Vec<NewMessage> = (0..10).map(|_| msg("a", None)).collect();
        store.append(batch).await.unwrap();
        let removed = store
            .prune(Retention {
                max_age_ms: i64::MAX,
                max_events: 3,
                dedupe_window_ms: i64::MAX,
            })
            .await
            .unwrap();
        assert_eq!(removed, 7);
        let page = store.read(&["a".into()], 0, 100).await.unwrap();
        assert_eq!(
            page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![8, 9, 10]
        );
        assert_eq!(
            store.bounds().await.unwrap(),
            Bounds {
                pruned_through: 7,
                head: 10
            }
        );
    }

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
