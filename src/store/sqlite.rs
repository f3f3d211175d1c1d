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
    Appended, Bounds, CommitFeed, Event, NewMessage, Page, Retention, Seq, Store, StoreError,
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
";

enum WriteCmd {
    Append {
        messages: Vec<NewMessage>,
        reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
    },
    Prune {
        retention: Retention,
        reply: oneshot::Sender<Result<u64, StoreError>>,
    },
    Pragmas {
        reply: oneshot::Sender<rusqlite::Result<(String, i64)>>,
    },
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
        let mut appends = Vec::new();
        for cmd in group {
            match cmd {
                WriteCmd::Append { messages, reply } => appends.push((messages, reply)),
                WriteCmd::Prune { retention, reply } => {
                    let _ = reply.send(self.prune(retention).map_err(unavailable));
                }
                WriteCmd::Pragmas { reply } => {
                    let _ = reply.send(pragmas(&self.conn));
                }
            }
        }
        if appends.is_empty() {
            return;
        }
        let head_before = self.head;
        let mut committed: Vec<Event> = Vec::new();
        let outcomes = match self.append_group(&appends, &mut committed) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                self.head = head_before;
                let msg = e.to_string();
                tracing::error!(error = %msg, "append transaction failed");
                for (_, reply) in appends {
                    let _ = reply.send(Err(StoreError::Unavailable(msg.clone())));
                }
                return;
            }
        };
        for ((_, reply), outcome) in appends.into_iter().zip(outcomes) {
            let _ = reply.send(outcome);
        }
        if !committed.is_empty() {
            // Blocking here is the backpressure that keeps the hub's queue bounded.
            let _ = self.feed.blocking_send(committed.into());
        }
    }

    #[allow(clippy::type_complexity)]
    fn append_group(
        &mut self,
        appends: &[(
            Vec<NewMessage>,
            oneshot::Sender<Result<Vec<Appended>, StoreError>>,
        )],
        committed: &mut Vec<Event>,
    ) -> rusqlite::Result<Vec<Result<Vec<Appended>, StoreError>>> {
        let mut tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = now_ms();
        let mut outcomes = Vec::with_capacity(appends.len());
        for (messages, _) in appends {
            let head_before = self.head;
            let committed_before = committed.len();
            let mut sp = tx.savepoint()?;
            match append_messages(&sp, messages, now, &mut self.head, committed) {
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
