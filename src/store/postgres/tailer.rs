//! The commit feed on PostgreSQL: every event any node commits, to this
//! node's hub, in seq order, each once.
//!
//! Invariants: the feed is fed by reading `seq > last_seen ORDER BY seq`,
//! never by the local append path; a `pushgate_events` notification, a
//! local commit or a 1 s timer wakes the read, so a lost notification or a
//! dropped listener connection delays an event but never loses it; since
//! seq order is commit order, that read never passes over a row that
//! commits later.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::{Notify, mpsc};

use super::NOTIFY_CHANNEL;
use crate::store::rows;
use crate::store::{Event, Seq};

/// Rows the tailer reads per query.
const TAIL_BATCH: i64 = 1000;
/// The tailer looks for new rows at least this often, notification or not.
const TAIL_SAFETY_NET: Duration = Duration::from_secs(1);

/// Wakes the tailer on every notification whose head it has not seen yet,
/// and after every (re)connect, since notifications sent while it was not
/// listening are gone.
pub(super) async fn run_listener(pool: PgPool, wake: Arc<Notify>, last_seen: Arc<AtomicI64>) {
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
pub(super) async fn run_tailer(
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
            let events = match rows.iter().map(rows::event).collect::<Result<Vec<_>, _>>() {
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
