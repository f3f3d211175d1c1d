//! The durable, ordered log: the single source of truth.
//!
//! Owns events, cursors and dedupe keys, the inspector's inbound records and
//! the outbound delivery queue — three traits by what they keep (`EventLog`,
//! `InboundLog`, `OutboundQueue`), one handle for all (`Store`). Each backend
//! is a folder (`sqlite/`, `postgres/`) with the same files; row mapping the
//! two share is in `rows`. Errors are typed by what a caller can do
//! (`StoreError::is_transient`), never matched as text.
//!
//! Invariants every implementation keeps:
//! - `append` returns only after the events are durable (committed and synced);
//! - sequence numbers are assigned inside the write transaction, so log order,
//!   commit order and visibility order are the same: a reader that has seen
//!   seq N never later finds a new event below N;
//! - `(source, key_scope, source_id)` is unique for `dedupe_window`,
//!   enforced by the database, and outlives the event's own retention;
//! - every committed batch is sent once, in log order, on the commit feed
//!   that the hub consumes (on a shared log: every batch any node commits).

pub mod outbound;
pub mod postgres;
mod rows;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

pub use outbound::{
    AttemptOutcome, AttemptStatus, AttemptView, ClaimWant, Claimed, Delivery, Endpoint,
    EndpointPatch, EndpointSecret, Health, NewDelivery, NewEndpoint, NextStep, OutboxAdvance,
    QueueStats, SecretRotation,
};

/// Position of an event in the log. Never reused, strictly increasing.
pub type Seq = i64;

/// A committed event, as read back from the log.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: Seq,
    pub channel: String,
    pub kind: String,
    pub source: String,
    pub source_id: Option<String>,
    /// Milliseconds since the Unix epoch, assigned by the writer.
    pub time_ms: i64,
    /// The payload as it arrived: valid JSON text, never re-serialized.
    pub data: Box<RawValue>,
}

/// One message to append. It becomes one log event per channel (a webhook
/// may route to several); all of them share the dedupe key.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub channels: Vec<String>,
    pub kind: String,
    pub source: String,
    /// The idempotency key (for publishes) or the provider's event id.
    pub source_id: Option<String>,
    /// Whose key `source_id` is: keys are unique per `(source, key_scope)`.
    /// Empty for a webhook source (a provider's ids are unique within it);
    /// the publisher's identity for publishes (`Auth::idempotency_scope`),
    /// so one publisher can neither suppress another's event nor learn
    /// whether a key was used.
    pub key_scope: String,
    pub data: Box<RawValue>,
}

/// The outcome of appending one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// The cursors of the message's events, one per channel; for a duplicate,
    /// the first cursor the key was stored with.
    pub seqs: Vec<Seq>,
    pub duplicate: bool,
}

/// A page read from the log.
#[derive(Debug, Default)]
pub struct Page {
    pub events: Vec<Event>,
    /// Everything up to this seq has been looked at: a reader may resume
    /// after it even if the last event returned is lower. Equals the last
    /// event's seq when the page was cut by `limit`.
    pub scanned_to: Seq,
}

/// Where the retained log begins and ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Highest seq removed by retention (0 if none): `earliest` means after it.
    pub pruned_through: Seq,
    /// Highest seq ever assigned.
    pub head: Seq,
}

/// What retention removes.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_age_ms: i64,
    /// 0 = no count limit.
    pub max_events: u64,
    pub dedupe_window_ms: i64,
}

/// What can go wrong in a store, by what the caller can do about it. The
/// database's own error is kept as the source (for logs), never matched on
/// as text: each backend classifies its errors by code when converting.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Transient: the database is busy or locked, or cannot be reached right
    /// now. The same request may succeed if retried.
    #[error("the log is unavailable: {0}")]
    Unavailable(#[source] BoxError),
    #[error("the log is shutting down")]
    Closed,
    /// The stored data (a row, a page, the file) is not what the schema says.
    /// Retrying does not help.
    #[error("corrupt data in the log: {0}")]
    Corrupt(#[source] BoxError),
    /// Anything else (a statement the database refused, a broken invariant).
    /// Retrying does not help.
    #[error("store error: {0}")]
    Internal(#[source] BoxError),
}

/// The error a store keeps as its source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl StoreError {
    pub fn unavailable(e: impl Into<BoxError>) -> StoreError {
        StoreError::Unavailable(e.into())
    }
    pub fn corrupt(e: impl Into<BoxError>) -> StoreError {
        StoreError::Corrupt(e.into())
    }
    pub fn internal(e: impl Into<BoxError>) -> StoreError {
        StoreError::Internal(e.into())
    }

    /// A copy for each of several callers failed by one write: the same
    /// kind, the source kept as its text.
    pub fn replicate(&self) -> StoreError {
        let text = |e: &BoxError| -> BoxError { e.to_string().into() };
        match self {
            StoreError::Unavailable(e) => StoreError::Unavailable(text(e)),
            StoreError::Closed => StoreError::Closed,
            StoreError::Corrupt(e) => StoreError::Corrupt(text(e)),
            StoreError::Internal(e) => StoreError::Internal(text(e)),
        }
    }

    /// Whether retrying later may succeed: busy, locked, connection lost,
    /// or this process shutting down (a retry reaches its successor or
    /// another node). The API answers 503 with `Retry-After` only for these.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::Closed)
    }
}

/// The committed batches, in log order, for the hub.
pub type CommitFeed = mpsc::Receiver<Arc<[Event]>>;

/// The log: appends, reads, retention and the identity cursors carry.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Identity of this log, carried in every cursor so a cursor from another
    /// log is recognised instead of silently misread.
    fn log_tag(&self) -> &str;

    /// Appends messages atomically (all or none) and returns after they are
    /// durable. Events are consecutive in the log in the order given.
    async fn append(&self, messages: Vec<NewMessage>) -> Result<Vec<Appended>, StoreError>;

    /// Events of `channels` with seq > `after`, in log order, at most `limit`.
    async fn read(&self, channels: &[String], after: Seq, limit: usize)
    -> Result<Page, StoreError>;

    /// Events of every channel with seq > `after`, in log order, at most
    /// `limit`; `scanned_to` as for `read`. The outbox dispatcher and replay
    /// walk the whole log with it.
    async fn read_log(&self, after: Seq, limit: usize) -> Result<Page, StoreError>;

    async fn bounds(&self) -> Result<Bounds, StoreError>;

    /// Removes what retention no longer covers; returns the number of events removed.
    async fn prune(&self, retention: Retention) -> Result<u64, StoreError>;

    /// Cheap check that the log answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Finishes in-flight appends and closes. Appends after this fail with `Closed`.
    async fn close(&self);
}

/// Inbound webhooks: the inspector's record (see `crate::ingest`).
///
/// Every delivery to `POST /webhooks/{source}` is recorded: its headers,
/// its raw body and the verdict. What every implementation keeps:
/// - an accepted delivery is recorded in the same transaction as its
///   message (`append_webhook`): there is never an event without its
///   record, nor a record of an accepted delivery without its events;
/// - a record of an accepted, new message lives as long as the message's
///   first event: `prune` removes it together with that event;
/// - records of refused deliveries and of duplicates have no event to
///   live with: only the newest `INBOUND_CAPPED_KEEP` of them are kept
///   per source (enforced on every insert), so they cannot fill the disk
///   and one noisy sender cannot push every other source's refusals out;
/// - record ids are strictly increasing and never reused.
#[async_trait]
pub trait InboundLog: Send + Sync + 'static {
    /// Appends one webhook message exactly like `append(vec![message])` (same
    /// dedupe, same durability, same commit feed) and, in the same
    /// transaction, records the delivery as accepted, linked to the
    /// message's events — or, for a duplicate, to the first stored seq.
    async fn append_webhook(
        &self,
        message: NewMessage,
        inbound: NewInbound,
    ) -> Result<(Appended, InboundId), StoreError>;

    /// Records a refused delivery (`inbound.reason` is set). Stores no event.
    async fn record_rejected(&self, inbound: NewInbound) -> Result<InboundId, StoreError>;

    /// Records matching `filter`, newest first, without headers and body.
    async fn list_inbound(&self, filter: InboundFilter) -> Result<Vec<InboundRecord>, StoreError>;

    /// One record with its headers and raw body; `None` if there is no such
    /// record (any more).
    async fn get_inbound(&self, id: InboundId) -> Result<Option<InboundRecord>, StoreError>;
}

/// Outbound webhooks (`deliver`): endpoints, the delivery queue, attempts
/// and the outbox cursor. Types and invariants: `store::outbound`. Writes
/// the API acknowledges (endpoints, replays) are durable before they
/// return, like `append`. Claims, attempt results and the dispatcher's
/// pages may skip their own sync: losing them in a crash only repeats
/// deliveries (at least once).
#[async_trait]
pub trait OutboundQueue: Send + Sync + 'static {
    /// Stores a new endpoint; `from_seq` is the log's head at that moment.
    async fn create_endpoint(&self, endpoint: NewEndpoint) -> Result<Endpoint, StoreError>;

    /// Every endpoint, oldest first.
    async fn list_endpoints(&self) -> Result<Vec<Endpoint>, StoreError>;

    async fn get_endpoint(&self, id: &str) -> Result<Option<Endpoint>, StoreError>;

    /// Applies `patch` atomically; `None` if there is no such endpoint.
    async fn update_endpoint(
        &self,
        id: &str,
        patch: EndpointPatch,
    ) -> Result<Option<Endpoint>, StoreError>;

    /// Removes the endpoint with its deliveries and attempts; `false` if absent.
    async fn delete_endpoint(&self, id: &str) -> Result<bool, StoreError>;

    /// Where the outbox dispatcher has got to: every event at or below it
    /// has its deliveries in the queue. 0 on a new log.
    async fn outbox_cursor(&self) -> Result<Seq, StoreError>;

    /// Queues `deliveries` and, with `advance`, moves the outbox cursor in the
    /// same transaction. Returns `false` (and writes nothing) when `advance`
    /// does not start at the stored cursor.
    async fn enqueue_deliveries(
        &self,
        deliveries: Vec<NewDelivery>,
        advance: Option<OutboxAdvance>,
    ) -> Result<bool, StoreError>;

    /// Leases up to `want.max` due pending deliveries of each enabled
    /// endpoint in `wants` (oldest due first): their attempt count goes up by
    /// one and `next_ms` moves to `lease_until_ms`. Reports each endpoint's
    /// next due time after the claim.
    async fn claim_deliveries(
        &self,
        wants: Vec<ClaimWant>,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> Result<Claimed, StoreError>;

    /// Records attempts, in one transaction: each with its `next` step
    /// (applied only if the delivery is still pending at that attempt, i.e.
    /// the lease was not lost) and its `health` applied to the endpoint.
    /// Attempts of deleted deliveries are skipped.
    async fn record_attempts(&self, outcomes: Vec<AttemptOutcome>) -> Result<(), StoreError>;

    /// The endpoint's pending deliveries (as `Pending` rows, soonest first),
    /// then its attempts, newest first; at most `limit` rows in all.
    /// `status` keeps only rows of that status.
    async fn list_attempts(
        &self,
        endpoint_id: &str,
        status: Option<AttemptStatus>,
        limit: usize,
    ) -> Result<Vec<AttemptView>, StoreError>;

    /// Removes finished deliveries and attempts older than `before_ms`;
    /// returns how many rows went.
    async fn prune_deliveries(&self, before_ms: i64) -> Result<u64, StoreError>;

    /// How much work is queued (for `/metrics`): a burst that outruns
    /// delivery shows here, not in memory. Costs a read of the due work only.
    async fn queue_stats(&self) -> Result<QueueStats, StoreError>;
}

/// The whole store behind one handle (`Arc<dyn Store>`): every backend is
/// all three, and every method of the three is callable on `dyn Store`.
pub trait Store: EventLog + InboundLog + OutboundQueue {}

impl<T: EventLog + InboundLog + OutboundQueue + ?Sized> Store for T {}

/// Id of an inbound record: strictly increasing, never reused.
pub type InboundId = i64;

/// Records of refused and duplicate deliveries kept, newest first.
pub const INBOUND_CAPPED_KEEP: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundStatus {
    Accepted,
    Rejected,
}

impl InboundStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            InboundStatus::Accepted => "accepted",
            InboundStatus::Rejected => "rejected",
        }
    }
    pub fn parse(text: &str) -> Option<InboundStatus> {
        match text {
            "accepted" => Some(InboundStatus::Accepted),
            "rejected" => Some(InboundStatus::Rejected),
            _ => None,
        }
    }
}

/// A delivery as it arrived, to be recorded.
#[derive(Debug, Clone, Default)]
pub struct NewInbound {
    /// The `{source}` of the URL (for an unknown source, what was asked for).
    pub source: String,
    /// Lower-case names in arrival order; credentials already redacted.
    pub headers: Vec<(String, String)>,
    /// The raw body, at most `server.max_body` bytes.
    pub body: Bytes,
    /// The body's full size: larger than `body.len()` when it was cut.
    pub body_size: u64,
    /// For a refusal: the error code (`invalid_signature`, …) and its message.
    pub reason: Option<String>,
    pub detail: Option<String>,
}

/// A recorded delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundRecord {
    pub id: InboundId,
    pub time_ms: i64,
    pub source: String,
    pub status: InboundStatus,
    /// Accepted, but its dedupe key was already stored: no new event.
    pub duplicate: bool,
    pub reason: Option<String>,
    pub detail: Option<String>,
    /// From the message (accepted deliveries only).
    pub source_id: Option<String>,
    pub kind: Option<String>,
    pub channels: Vec<String>,
    /// The seqs of the message's events; for a duplicate, the first stored seq.
    pub seqs: Vec<Seq>,
    pub body_size: u64,
    /// Filled by `get_inbound` only.
    pub headers: Vec<(String, String)>,
    /// Filled by `get_inbound` only.
    pub body: Option<Bytes>,
}

/// Which records `list_inbound` returns: all filters optional.
#[derive(Debug, Clone, Default)]
pub struct InboundFilter {
    pub source: Option<String>,
    pub status: Option<InboundStatus>,
    /// Only records older than this id (paging).
    pub before: Option<InboundId>,
    pub limit: usize,
}

/// Opens the store the URL names; the commit feed delivers what it commits.
pub async fn open(
    config: &crate::config::StoreConfig,
) -> Result<(Arc<dyn Store>, CommitFeed), StoreError> {
    if let Some(path) = config.url.strip_prefix("sqlite://") {
        let (store, feed) = sqlite::SqliteStore::open(path, &config.synchronous)?;
        Ok((Arc::new(store), feed))
    } else if config.url.starts_with("postgres://") || config.url.starts_with("postgresql://") {
        // Spawned so this future does not carry sqlx's borrowed executors
        // (whose Send proofs rustc cannot always carry through `serve`).
        let (url, pool_size) = (config.url.clone(), config.pool_size);
        let (store, feed) =
            tokio::spawn(async move { postgres::PostgresStore::open(&url, pool_size).await })
                .await
                .map_err(StoreError::internal)??;
        Ok((Arc::new(store), feed))
    } else {
        Err(StoreError::internal(format!(
            "unsupported store url `{}`",
            redacted_url(&config.url)
        )))
    }
}

/// The store URL for logs and banners: a password in it (PostgreSQL) is
/// replaced by `***`, because secrets are never printed.
pub fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// A resume point as a client wrote it, checked against the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Continue after this seq.
    After(Seq),
    /// The cursor cannot be honoured; the client is told and continues from
    /// the oldest retained event.
    Reset(ResetReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    Expired,
    ForeignLog,
    Ahead,
    Unparsable,
}

impl ResetReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::Expired => "cursor_expired",
            ResetReason::ForeignLog => "cursor_foreign",
            ResetReason::Ahead => "cursor_ahead",
            ResetReason::Unparsable => "cursor_invalid",
        }
    }
}

/// Cursors look like `1042-k3f9qz`: the seq, then the log's tag. Clients
/// never parse them; the tag lets us tell a cursor from another log.
pub fn format_cursor(seq: Seq, tag: &str) -> String {
    format!("{seq}-{tag}")
}

/// Parses a client cursor. `earliest` is before the oldest retained event.
pub fn parse_cursor(text: &str, tag: &str, bounds: Bounds) -> Resume {
    if text == "earliest" {
        return Resume::After(bounds.pruned_through);
    }
    let Some((seq, their_tag)) = text.split_once('-') else {
        return Resume::Reset(ResetReason::Unparsable);
    };
    let Ok(seq) = seq.parse::<Seq>() else {
        return Resume::Reset(ResetReason::Unparsable);
    };
    if seq < 0 {
        return Resume::Reset(ResetReason::Unparsable);
    }
    if their_tag != tag {
        return Resume::Reset(ResetReason::ForeignLog);
    }
    if seq > bounds.head {
        return Resume::Reset(ResetReason::Ahead);
    }
    if seq < bounds.pruned_through {
        return Resume::Reset(ResetReason::Expired);
    }
    Resume::After(seq)
}

pub use crate::channel::valid_channel;
pub use crate::clock::now_ms;

/// Six lowercase base-36 characters: enough to tell logs apart, short on the wire.
pub fn random_tag() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..6)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        pruned_through: 10,
        head: 100,
    };

    #[test]
    fn cursors_round_trip_and_reset_reasons() {
        assert_eq!(
            parse_cursor(&format_cursor(42, "abc"), "abc", B),
            Resume::After(42)
        );
        assert_eq!(parse_cursor("earliest", "abc", B), Resume::After(10));
        assert_eq!(parse_cursor("10-abc", "abc", B), Resume::After(10));
        assert_eq!(
            parse_cursor("9-abc", "abc", B),
            Resume::Reset(ResetReason::Expired)
        );
        assert_eq!(
            parse_cursor("101-abc", "abc", B),
            Resume::Reset(ResetReason::Ahead)
        );
        assert_eq!(
            parse_cursor("42-zzz", "abc", B),
            Resume::Reset(ResetReason::ForeignLog)
        );
        for junk in ["", "42", "x-abc", "-1-abc", "99999999999999999999-abc"] {
            assert_eq!(
                parse_cursor(junk, "abc", B),
                Resume::Reset(ResetReason::Unparsable),
                "{junk}"
            );
        }
    }

    #[test]
    fn store_urls_are_printed_without_passwords() {
        assert_eq!(
            redacted_url("postgres://pushgate:s3cret@db:5432/log"),
            "postgres://pushgate:***@db:5432/log"
        );
        assert_eq!(
            redacted_url("postgres://pushgate@db/log"),
            "postgres://pushgate@db/log"
        );
        assert_eq!(redacted_url("sqlite://pushgate.db"), "sqlite://pushgate.db");
    }
}
