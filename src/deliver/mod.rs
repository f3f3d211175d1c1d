//! Outbound webhooks: every event that matches an endpoint leaves as a signed
//! `POST`, retried from a durable queue until it succeeds or its schedule
//! runs out.
//!
//! Three loops, all driven by the store, one file each:
//! - the **dispatcher** (`dispatcher.rs`) walks the log after the durable outbox cursor and, in
//!   one transaction per page, queues a delivery for each matching enabled
//!   endpoint and moves the cursor. The append path is untouched: the hub's
//!   feeder only wakes the dispatcher, which also polls, so a missed wake-up
//!   costs at most `delivery.poll_interval`;
//! - the **workers** (`workers.rs`): one scheduler (`schedule.rs`, pure
//!   bookkeeping) leases due deliveries and runs each
//!   attempt as a task, at most `delivery.workers` at once and at most
//!   `delivery.per_endpoint` per endpoint (and its `rate_limit`), so a slow or
//!   dead endpoint holds only its own slots and never delays the others;
//! - **maintenance** (`workers.rs`) prunes finished deliveries and attempts past retention.
//!
//! Invariants: an event committed to the log reaches each matching endpoint
//! at least once, across crashes (the cursor moves with the rows it
//! created; a leased row returns when its lease ends); every attempt of one
//! message carries the same `webhook-id`; nothing is sent to an address the
//! [`ssrf::TargetPolicy`] refuses, and redirects are never followed; an
//! attempt that panics or is cut at shutdown still gives its endpoint's
//! concurrency slot back (`schedule::Slot` is an RAII guard).

mod dispatcher;
mod schedule;
pub mod sign;
pub mod ssrf;
mod workers;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::channel::Pattern;
use crate::config::Config;
use crate::store::{Endpoint, Event, Seq, Store};
use ssrf::{GuardedResolver, TargetPolicy};
pub use workers::RESPONSE_BODY_KEPT;

/// The longest wait between retries of a store that keeps failing.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("cannot build the HTTP client for outbound webhooks: {0}")]
    Client(#[from] reqwest::Error),
}

/// The `webhook-id` of an event's message to an endpoint: stable across
/// retries and replays, distinct per endpoint.
pub fn message_id(seq: Seq, endpoint_id: &str) -> String {
    format!(
        "msg_{seq}_{}",
        endpoint_id.strip_prefix("ep_").unwrap_or(endpoint_id)
    )
}

/// An endpoint's subscription, compiled once per dispatched page.
pub struct Matcher {
    pub endpoint_id: String,
    from_seq: Seq,
    channels: Vec<Pattern>,
    types: Vec<Pattern>,
}

impl Matcher {
    pub fn new(e: &Endpoint) -> Matcher {
        Matcher {
            endpoint_id: e.id.clone(),
            from_seq: e.from_seq,
            channels: e.channels.iter().map(|p| Pattern::new(p)).collect(),
            types: e.types.iter().map(|p| Pattern::new(p)).collect(),
        }
    }

    /// Channel and type match (ignores `from_seq`: replay uses this too).
    pub fn matches(&self, event: &Event) -> bool {
        self.channels.iter().any(|p| p.matches(&event.channel))
            && (self.types.is_empty() || self.types.iter().any(|p| p.matches(&event.kind)))
    }

    fn wants(&self, event: &Event) -> bool {
        event.seq > self.from_seq && self.matches(event)
    }
}

pub struct Deliverer {
    store: Arc<dyn Store>,
    config: Arc<Config>,
    policy: Arc<TargetPolicy>,
    client: reqwest::Client,
    log_tag: String,
    wake_dispatcher: Notify,
    wake_workers: Notify,
    /// Endpoints that just got deliveries queued, with the earliest due
    /// time: the workers probe them without waiting for their next poll.
    queued_hint: Mutex<HashMap<String, i64>>,
    /// Set when endpoints were created, changed or deleted.
    endpoints_changed: std::sync::atomic::AtomicBool,
    stop: watch::Sender<bool>,
    attempts_succeeded: metrics::Counter,
    attempts_failed: metrics::Counter,
}

impl Deliverer {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn Store>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<Deliverer, DeliverError> {
        let d = &config.delivery;
        let policy = Arc::new(TargetPolicy::new(d));
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver::new(policy.clone())))
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve names itself, past the guard.
            .no_proxy()
            .timeout(d.timeout.0)
            .connect_timeout(d.connect_timeout.0)
            .user_agent(concat!("pushgate-webhooks/", env!("CARGO_PKG_VERSION")))
            // Endpoints often share a host (one receiver, many paths).
            .pool_max_idle_per_host(d.workers.max(1))
            .build()?;
        Ok(Deliverer {
            log_tag: store.log_tag().to_string(),
            store,
            policy,
            client,
            wake_dispatcher: Notify::new(),
            wake_workers: Notify::new(),
            queued_hint: Mutex::new(HashMap::new()),
            endpoints_changed: Default::default(),
            stop: watch::channel(false).0,
            attempts_succeeded: metrics.webhook_attempts_succeeded.clone(),
            attempts_failed: metrics.webhook_attempts_failed.clone(),
            config,
        })
    }

    pub fn policy(&self) -> &TargetPolicy {
        &self.policy
    }

    /// New events are in the log (called by the hub's feeder).
    pub fn events_committed(&self) {
        self.wake_dispatcher.notify_one();
    }

    /// Endpoints were created, changed or deleted.
    pub fn endpoints_changed(&self) {
        self.endpoints_changed
            .store(true, std::sync::atomic::Ordering::Release);
        self.wake_workers.notify_one();
    }

    /// Deliveries of `endpoint_id` were queued, the first due at `due_ms`.
    fn queued(&self, endpoint_id: &str, due_ms: i64) {
        let mut hint = self.queued_hint.lock().expect("hint lock");
        let entry = hint.entry(endpoint_id.to_string()).or_insert(due_ms);
        *entry = (*entry).min(due_ms);
        drop(hint);
        self.wake_workers.notify_one();
    }

    /// When a new message's first attempt is due.
    fn first_due(&self, now: i64) -> i64 {
        now + self.config.delivery.retry_schedule[0].0.as_millis() as i64
    }

    /// Asks the workers to stop; `run_workers` returns after the grace period.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn endpoint(id: &str, rate: Option<u32>) -> Endpoint {
        Endpoint {
            id: id.into(),
            url: "https://example.com/hook".into(),
            channels: vec!["orders".into()],
            types: vec![],
            description: String::new(),
            enabled: true,
            disabled_reason: None,
            rate_limit: rate,
            secrets: vec![],
            from_seq: 0,
            failing_since_ms: None,
            created_ms: 0,
            updated_ms: 0,
        }
    }

    #[test]
    fn matching_by_channel_type_and_start() {
        let mut e = endpoint("ep_1", None);
        e.channels = vec!["billing:*".into(), "orders".into()];
        e.types = vec!["invoice.*".into()];
        e.from_seq = 10;
        let m = Matcher::new(&e);
        let ev = |seq, channel: &str, kind: &str| Event {
            seq,
            channel: channel.into(),
            kind: kind.into(),
            source: "publish".into(),
            source_id: None,
            time_ms: 0,
            data: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        };
        assert!(m.wants(&ev(11, "billing:cus_1", "invoice.paid")));
        assert!(m.wants(&ev(11, "orders", "invoice.created")));
        assert!(
            !m.wants(&ev(10, "orders", "invoice.created")),
            "before the endpoint existed"
        );
        assert!(
            m.matches(&ev(10, "orders", "invoice.created")),
            "replay ignores from_seq"
        );
        assert!(!m.wants(&ev(11, "orders", "charge.succeeded")));
        assert!(!m.wants(&ev(11, "billing", "invoice.paid")));
        e.types.clear();
        assert!(Matcher::new(&e).wants(&ev(11, "orders", "anything")));
    }

    #[test]
    fn message_ids() {
        assert_eq!(message_id(42, "ep_abc"), "msg_42_abc");
    }
}
