//! The embedded log: SQLite in WAL mode, one writer thread, a few readers.
//!
//! Files: `writer` (the writer thread and its group commit), `log` (events,
//! reads, retention), `inbound` (the inspector's records), `outbound` (the
//! delivery queue), `migrate` (the numbered schema in `migrations/sqlite/`).
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
//! - the schema is migrated (`PRAGMA user_version`) before the writer starts;
//! - outbound-webhook bookkeeping (claims, attempt results, the dispatcher's
//!   pages) commits without its own sync (`write_relaxed`): it is never
//!   acknowledged to anyone, and losing it only repeats a delivery;
//! - SQLite's errors become `StoreError` by their result code (`From` below):
//!   busy and locked are transient, a corrupt file is `Corrupt`.

mod inbound;
mod log;
mod migrate;
mod outbound;
mod writer;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::rows::Columns;
use super::{BoxError, CommitFeed, EventLog, Seq, StoreError, now_ms};
use writer::{WriteCmd, Writer};

const READERS: usize = 4;

/// The schema version (`PRAGMA user_version`) this build migrates to.
pub const SCHEMA_VERSION: u32 = migrate::LATEST;

pub struct SqliteStore {
    tag: String,
    path: String,
    synchronous: String,
    writer_tx: Mutex<Option<mpsc::Sender<WriteCmd>>>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
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
            std::fs::create_dir_all(parent).map_err(StoreError::internal)?;
        }
        let mut conn = Connection::open(path)?;
        configure(&conn, synchronous)?;
        migrate::run(&mut conn)?;
        let tag = log_tag(&conn)?;
        let pruned_through = meta_seq(&conn, "pruned_through")?;
        let max_seq: Seq =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
        let head = max_seq.max(pruned_through);
        // One process owns an SQLite log: leases left by a previous run
        // belong to deliveries that died with it, so they are due now.
        conn.execute(
            "UPDATE deliveries SET leased = 0, next_ms = ?1 WHERE status = 0 AND leased = 1",
            params![now_ms()],
        )?;

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
            .map_err(StoreError::internal)?;
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
        Ok(rx.await.map_err(|_| StoreError::Closed)??)
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
        .map_err(StoreError::internal)?
        .map_err(StoreError::from)
    }

    /// `(journal_mode, synchronous)` of every open connection: the writer's
    /// and each pooled reader's. `synchronous` is 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA.
    pub async fn connection_pragmas(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(WriteCmd::Pragmas { reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        let mut out = vec![rx.await.map_err(|_| StoreError::Closed)??];
        // Make sure at least one reader exists, then report on every pooled one.
        self.ping().await?;
        let pooled = self.readers.lock().expect("reader pool lock");
        for c in pooled.iter() {
            out.push(pragmas(c)?);
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
    let tag = super::random_tag();
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('log_tag', ?1)",
        params![tag],
    )?;
    Ok(tag)
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

/// SQLite's result codes, by what a caller can do: wait (busy, locked: another
/// connection holds the lock past the busy timeout), give up on the data
/// (corrupt, not a database, a value the schema does not allow), or not
/// retry at all (anything else: I/O errors, a full disk, a refused statement).
impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        use rusqlite::ErrorCode as C;
        match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.code {
                C::DatabaseBusy | C::DatabaseLocked => StoreError::unavailable(e),
                C::DatabaseCorrupt | C::NotADatabase => StoreError::corrupt(e),
                _ => StoreError::internal(e),
            },
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::Utf8Error(..) => StoreError::corrupt(e),
            _ => StoreError::internal(e),
        }
    }
}

impl Columns for rusqlite::Row<'_> {
    type Error = rusqlite::Error;
    fn text(&self, i: usize) -> rusqlite::Result<String> {
        self.get(i)
    }
    fn opt_text(&self, i: usize) -> rusqlite::Result<Option<String>> {
        self.get(i)
    }
    fn int(&self, i: usize) -> rusqlite::Result<i64> {
        self.get(i)
    }
    fn opt_int(&self, i: usize) -> rusqlite::Result<Option<i64>> {
        self.get(i)
    }
    fn flag(&self, i: usize) -> rusqlite::Result<bool> {
        self.get(i)
    }
    fn corrupt(&self, i: usize, e: BoxError) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e)
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

    /// Real errors from real connections, classified by code.
    #[test]
    fn busy_is_transient_and_corrupt_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        let a = Connection::open(&path).unwrap();
        a.pragma_update(None, "journal_mode", "WAL").unwrap();
        a.execute_batch("CREATE TABLE t (x); BEGIN IMMEDIATE; INSERT INTO t VALUES (1);")
            .unwrap();
        let b = Connection::open(&path).unwrap();
        b.busy_timeout(std::time::Duration::ZERO).unwrap();
        let busy = StoreError::from(b.execute_batch("BEGIN IMMEDIATE").unwrap_err());
        assert!(matches!(busy, StoreError::Unavailable(_)), "{busy:?}");
        assert!(busy.is_transient());
        // Positive control: once the lock is released, the same write goes through.
        a.execute_batch("COMMIT").unwrap();
        b.execute_batch("BEGIN IMMEDIATE; ROLLBACK").unwrap();

        let junk = dir.path().join("junk.db");
        std::fs::write(&junk, vec![0x5a; 8192]).unwrap();
        let c = Connection::open(&junk).unwrap();
        let corrupt = StoreError::from(
            c.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap_err(),
        );
        assert!(matches!(corrupt, StoreError::Corrupt(_)), "{corrupt:?}");
        assert!(!corrupt.is_transient());
        // Opening such a file as a log fails the same way, and says why.
        let err = SqliteStore::open(junk.to_str().unwrap(), "full")
            .err()
            .unwrap();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
        assert!(
            std::error::Error::source(&err).is_some(),
            "the cause is kept"
        );
    }
}
