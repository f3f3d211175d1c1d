//! The shared log: PostgreSQL, so any number of pushgate nodes serve one log.
//!
//! Files: `writer` (this node's group commit under the append lock),
//! `tailer` (the commit feed: LISTEN/NOTIFY and a catch-up read), `log`
//! (reads and retention), `inbound` (the inspector's records), `outbound`
//! (the shared delivery queue). Migrations: `migrations/postgres/`.
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
//! - PostgreSQL's errors become `StoreError` by SQLSTATE (`From` below):
//!   connection loss, lock and serialization conflicts, timeouts and
//!   shutdowns are transient; data-corrupted states are `Corrupt`.

mod inbound;
mod log;
mod outbound;
mod tailer;
mod writer;

use std::str::FromStr;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, Row};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;

use super::rows::Columns;
use super::{BoxError, CommitFeed, Seq, StoreError};
use writer::AppendRequest;

/// The advisory lock every appending transaction holds from reading the
/// head to its commit ("pushgate" in ASCII).
pub const APPEND_LOCK: i64 = 0x7075_7368_6761_7465;
/// The LISTEN/NOTIFY channel; the payload is the new head.
pub const NOTIFY_CHANNEL: &str = "pushgate_events";

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

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

pub struct PostgresStore {
    tag: String,
    pool: PgPool,
    writer_tx: Mutex<Option<mpsc::Sender<AppendRequest>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The tailer and its listener; aborted on close.
    background: Mutex<Vec<JoinHandle<()>>>,
}

fn connect_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    let options = PgConnectOptions::from_str(url).map_err(StoreError::internal)?;
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
            .map_err(|_| StoreError::unavailable("timed out migrating the database"))??;
        let pool = pool_options(pool_size)
            .connect_with(options.clone())
            .await
            .map_err(StoreError::from)?;
        let head: Seq = sqlx::query_scalar("SELECT head FROM log_state")
            .fetch_one(&pool)
            .await
            .map_err(StoreError::from)?;

        let (feed_tx, feed_rx) = mpsc::channel(1024);
        let (writer_tx, writer_rx) = mpsc::channel(4096);
        let wake = Arc::new(Notify::new());
        let last_seen = Arc::new(AtomicI64::new(head));
        let writer = tokio::spawn(writer::run_writer(pool.clone(), writer_rx, wake.clone()));
        let tailer = tokio::spawn(tailer::run_tailer(
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
        let listener = tokio::spawn(tailer::run_listener(listener_pool, wake, last_seen));
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
    let mut conn: PgConnection = options.connect().await.map_err(StoreError::from)?;
    let result = async {
        // `run_direct` is `run` on a connection we own (sqlx's own way
        // around `run`'s higher-ranked `Acquire` bound, which spawned
        // futures cannot prove); it takes the same advisory lock.
        MIGRATOR
            .run_direct(None, &mut conn, false)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => StoreError::from(e),
                other => StoreError::internal(other),
            })?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('log_tag', $1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(super::random_tag())
        .execute(&mut conn)
        .await
        .map_err(StoreError::from)?;
        sqlx::query_scalar::<_, String>("SELECT value FROM meta WHERE key = 'log_tag'")
            .fetch_one(&mut conn)
            .await
            .map_err(StoreError::from)
    }
    .await;
    let _ = conn.close().await;
    result
}

/// Whether a SQLSTATE means "try again later": connection exceptions (08),
/// serialization failures and deadlocks (40), insufficient resources (53),
/// lock not available (55P03), a statement or idle timeout (57014, 25P03),
/// and the server shutting down or starting up (57P01-57P03).
fn transient_sqlstate(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("40")
        || code.starts_with("53")
        || matches!(
            code,
            "55P03" | "57014" | "25P03" | "57P01" | "57P02" | "57P03"
        )
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        use sqlx::Error as E;
        match &e {
            E::PoolClosed => StoreError::Closed,
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::Protocol(_) | E::BeginFailed => {
                StoreError::unavailable(e)
            }
            E::Database(db) => match db.code() {
                Some(code) if transient_sqlstate(&code) => StoreError::unavailable(e),
                // data_corrupted, index_corrupted
                Some(code) if matches!(&*code, "XX001" | "XX002") => StoreError::corrupt(e),
                _ => StoreError::internal(e),
            },
            E::RowNotFound
            | E::ColumnDecode { .. }
            | E::Decode(_)
            | E::ColumnNotFound(_)
            | E::ColumnIndexOutOfBounds { .. } => StoreError::corrupt(e),
            _ => StoreError::internal(e),
        }
    }
}

impl Columns for PgRow {
    type Error = StoreError;
    fn text(&self, i: usize) -> Result<String, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn int(&self, i: usize) -> Result<i64, StoreError> {
        Ok(self.opt_int(i)?.ok_or(sqlx::Error::ColumnDecode {
            index: i.to_string(),
            source: "NULL in a NOT NULL column".into(),
        })?)
    }
    fn opt_int(&self, i: usize) -> Result<Option<i64>, StoreError> {
        use sqlx::{Column, TypeInfo};
        let column = self.try_column(i)?;
        // Each integer width decodes only as itself.
        Ok(match column.type_info().name() {
            "INT2" => self.try_get::<Option<i16>, _>(i)?.map(i64::from),
            "INT4" => self.try_get::<Option<i32>, _>(i)?.map(i64::from),
            _ => self.try_get::<Option<i64>, _>(i)?,
        })
    }
    fn flag(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.try_get(i)?)
    }
    fn corrupt(&self, _i: usize, e: BoxError) -> StoreError {
        StoreError::Corrupt(e)
    }
}
