//! Outbound webhooks: every event that matches an endpoint leaves as a signed
//! `POST`, retried from a durable queue until it succeeds or its schedule
//! runs out.
//!
//! Three loops, all driven by the store:
//! - the **dispatcher** walks the log after the durable outbox cursor and, in
//!   one transaction per page, queues a delivery for each matching enabled
//!   endpoint and moves the cursor. The append path is untouched: the hub's
//!   feeder only wakes the dispatcher, which also polls, so a missed wake-up
//!   costs at most `delivery.poll_interval`;
//! - the **workers**: one scheduler leases due deliveries and runs each
//!   attempt as a task, at most `delivery.workers` at once and at most
//!   `delivery.per_endpoint` per endpoint (and its `rate_limit`), so a slow or
//!   dead endpoint holds only its own slots and never delays the others;
//! - **maintenance** prunes finished deliveries and attempts past retention.
//!
//! Invariants: an event committed to the log reaches each matching endpoint
//! at least once, across crashes (the cursor moves with the rows it
//! created; a leased row returns when its lease ends); every attempt of one
//! message carries the same `webhook-id`; nothing is sent to an address the
//! [`ssrf::TargetPolicy`] refuses, and redirects are never followed.

pub mod sign;
pub mod ssrf;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinSet;

use crate::auth::Pattern;
use crate::config::Config;
use crate::hub::EncodedEvent;
use crate::store::{
    AttemptOutcome, ClaimWant, Delivery, Endpoint, Event, Health, NewDelivery, NextStep,
    OutboxAdvance, Seq, Store, StoreError, now_ms,
};
use ssrf::{GuardedResolver, TargetPolicy};

/// Events the dispatcher reads per transaction.
const DISPATCH_PAGE: usize = 1000;
/// How long pages without deliveries may move the dispatcher on before the
/// durable cursor follows.
const CURSOR_FLUSH: Duration = Duration::from_secs(1);
/// Bytes of a response body kept with its attempt.
pub const RESPONSE_BODY_KEPT: usize = 4096;
/// How long in-flight attempts may finish at shutdown before they are cut
/// (their rows are leased and come back on the next start).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// The longest wait between retries of a store that keeps failing.
const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(60);
/// Attempts recorded in one transaction at most.
const RECORD_BATCH: usize = 256;
/// With fewer free workers than this, a finished attempt waits
/// `COALESCE_WAIT` for others before the next claim.
const COALESCE_FREE_SLOTS: usize = 8;
const COALESCE_WAIT: Duration = Duration::from_millis(1);
/// Claims in a row before the scheduler waits again (a bound, not a tuning knob).
const MAX_CLAIM_ROUNDS: usize = 64;
/// Added to the request timeouts to make a lease: a lease must outlive its attempt.
const LEASE_MARGIN: Duration = Duration::from_secs(10);

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

/// The dispatcher's position: how far it has read, and how far the store
/// knows it has (the durable outbox cursor).
struct Outbox {
    read_to: Seq,
    persisted: Seq,
    persisted_at: Instant,
}

impl Outbox {
    fn at(cursor: Seq) -> Outbox {
        Outbox {
            read_to: cursor,
            persisted: cursor,
            persisted_at: Instant::now(),
        }
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

/// What the receiver (or the network) said.
#[derive(Debug, Default)]
struct Response {
    status: Option<u16>,
    body: Option<String>,
    error: Option<String>,
    retry_after: Option<Duration>,
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

    // ---- dispatcher ---------------------------------------------------------

    /// Queues the deliveries of every committed event, forever.
    pub async fn run_dispatcher(self: Arc<Self>) {
        let poll = self.config.delivery.poll_interval.0;
        let mut outbox: Option<Outbox> = None;
        let mut backoff = poll;
        loop {
            let step = match &mut outbox {
                Some(ob) => self.dispatch_page(ob).await,
                None => self.store.outbox_cursor().await.map(|c| {
                    outbox = Some(Outbox::at(c));
                    true
                }),
            };
            match step {
                Ok(true) => {
                    backoff = poll;
                    continue;
                }
                Ok(false) => backoff = poll,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "outbox dispatcher: store error");
                    outbox = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ERROR_BACKOFF);
                    continue;
                }
            }
            tokio::select! {
                _ = self.wake_dispatcher.notified() => {}
                _ = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// Queues the deliveries of one page of the log after `ob.read_to`;
    /// returns whether it moved on (false: nothing new to read).
    async fn dispatch_page(&self, ob: &mut Outbox) -> Result<bool, StoreError> {
        let page = self.store.read_log(ob.read_to, DISPATCH_PAGE).await?;
        if page.scanned_to <= ob.read_to {
            if ob.persisted < ob.read_to {
                // Idle: store how far the pages without deliveries went.
                self.commit_outbox(ob, Vec::new(), ob.read_to).await?;
            }
            return Ok(false);
        }
        // Endpoints are read after the events: one created meanwhile has a
        // `from_seq` at or above every event of this page.
        let matchers: Vec<Matcher> = self
            .store
            .list_endpoints()
            .await?
            .iter()
            .filter(|e| e.enabled)
            .map(Matcher::new)
            .collect();
        let now = now_ms();
        let due = self.first_due(now);
        let mut deliveries = Vec::new();
        for event in &page.events {
            let mut payload: Option<Bytes> = None;
            for m in matchers.iter().filter(|m| m.wants(event)) {
                let payload = payload
                    .get_or_insert_with(|| EncodedEvent::encode(event, &self.log_tag).json)
                    .clone();
                deliveries.push(self.new_delivery(event, &m.endpoint_id, payload, due));
            }
        }
        if deliveries.is_empty() && ob.persisted_at.elapsed() < CURSOR_FLUSH {
            // Nothing to queue: moving the durable cursor can wait, so pages
            // without deliveries cost the writer no transaction of their own.
            // Re-reading them after a crash queues nothing new for an
            // endpoint created since (its `from_seq` is later).
            ob.read_to = page.scanned_to;
            return Ok(true);
        }
        let mut touched: Vec<String> = deliveries.iter().map(|d| d.endpoint_id.clone()).collect();
        touched.sort_unstable();
        touched.dedup();
        if self.commit_outbox(ob, deliveries, page.scanned_to).await? {
            for id in touched {
                self.queued(&id, due);
            }
        }
        Ok(true)
    }

    /// Queues `deliveries` and moves the durable cursor to `to`, in one
    /// transaction. If another node moved the cursor first, nothing is
    /// written and reading continues from where that node got to.
    async fn commit_outbox(
        &self,
        ob: &mut Outbox,
        deliveries: Vec<NewDelivery>,
        to: Seq,
    ) -> Result<bool, StoreError> {
        let advance = OutboxAdvance {
            from: ob.persisted,
            to,
        };
        if self
            .store
            .enqueue_deliveries(deliveries, Some(advance))
            .await?
        {
            *ob = Outbox::at(to);
            Ok(true)
        } else {
            *ob = Outbox::at(self.store.outbox_cursor().await?);
            Ok(false)
        }
    }

    fn new_delivery(
        &self,
        event: &Event,
        endpoint_id: &str,
        payload: Bytes,
        due: i64,
    ) -> NewDelivery {
        NewDelivery {
            endpoint_id: endpoint_id.to_string(),
            seq: event.seq,
            event_id: crate::store::format_cursor(event.seq, &self.log_tag),
            msg_id: message_id(event.seq, endpoint_id),
            payload,
            next_ms: due,
        }
    }

    /// Queues every event after `after` (up to `until`) that matches
    /// `endpoint`, at most `max` of them. Returns how many were queued and,
    /// when `max` cut it short, the seq to continue after.
    pub async fn replay(
        &self,
        endpoint: &Endpoint,
        after: Seq,
        until: Seq,
        max: usize,
    ) -> Result<(usize, Option<Seq>), StoreError> {
        let matcher = Matcher::new(endpoint);
        let mut cursor = after;
        let mut queued = 0;
        while cursor < until {
            let page = self.store.read_log(cursor, DISPATCH_PAGE).await?;
            let due = self.first_due(now_ms());
            let mut batch = Vec::new();
            let mut last = cursor.max(page.scanned_to.min(until));
            for event in page.events.iter().filter(|e| e.seq <= until) {
                if queued + batch.len() == max {
                    last = event.seq - 1;
                    break;
                }
                if matcher.matches(event) {
                    let payload = EncodedEvent::encode(event, &self.log_tag).json;
                    batch.push(self.new_delivery(event, &endpoint.id, payload, due));
                }
            }
            let n = batch.len();
            if n > 0 {
                self.store.enqueue_deliveries(batch, None).await?;
                queued += n;
                self.queued(&endpoint.id, due);
            }
            if last <= cursor {
                break;
            }
            cursor = last;
            if queued == max && cursor < until {
                return Ok((queued, Some(cursor)));
            }
        }
        Ok((queued, None))
    }

    // ---- workers ------------------------------------------------------------

    /// Asks the workers to stop; `run_workers` returns after the grace period.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Leases due deliveries and runs their attempts until `stop`.
    pub async fn run_workers(self: Arc<Self>) {
        let cfg = &self.config.delivery;
        let lease = cfg.timeout.0 + cfg.connect_timeout.0 + LEASE_MARGIN;
        let mut stop = self.stop.subscribe();
        let mut sched = Scheduler::new(cfg.workers.max(1), cfg.per_endpoint.max(1));
        let mut tasks: JoinSet<(String, Option<i64>)> = JoinSet::new();
        let (recorder, recordings) = mpsc::channel(RECORD_BATCH);
        let recording = tokio::spawn(record(self.store.clone(), recordings));
        let mut refresh_at = Instant::now();
        let mut list_backoff = cfg.poll_interval.0;
        loop {
            if *stop.borrow() {
                break;
            }
            let changed = self
                .endpoints_changed
                .swap(false, std::sync::atomic::Ordering::AcqRel);
            if changed || Instant::now() >= refresh_at {
                match self.store.list_endpoints().await {
                    Ok(list) => {
                        sched.set_endpoints(&list);
                        list_backoff = cfg.poll_interval.0;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, retry_in = ?list_backoff, "webhook workers: cannot list endpoints");
                        list_backoff = (list_backoff * 2).min(MAX_ERROR_BACKOFF);
                    }
                }
                refresh_at = Instant::now() + list_backoff;
            }
            for (id, due) in self.queued_hint.lock().expect("hint lock").drain() {
                sched.hint(&id, due);
            }
            // Claim until every free worker has work or nothing is due.
            let mut rounds = 0;
            loop {
                let now = now_ms();
                let wants = sched.wants(now, tasks.len());
                if wants.is_empty() {
                    break;
                }
                let asked = wants.len();
                let lease_until = now + lease.as_millis() as i64;
                let claimed = match self.store.claim_deliveries(wants, now, lease_until).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook workers: claim failed");
                        break;
                    }
                };
                for (id, due) in &claimed.next_due {
                    sched.set_next_due(id, *due);
                }
                let got = claimed.deliveries.len();
                for d in claimed.deliveries {
                    sched.started(&d.endpoint_id);
                    let this = self.clone();
                    let recorder = recorder.clone();
                    tasks.spawn(async move {
                        let id = d.endpoint_id.clone();
                        (id, this.attempt(d, recorder).await)
                    });
                }
                rounds += 1;
                if rounds >= MAX_CLAIM_ROUNDS || (got == 0 && asked == 0) {
                    break;
                }
            }
            // With every worker busy only a finished attempt frees one: due
            // work must not make this loop spin.
            let due_in = if tasks.len() >= sched.workers {
                None
            } else {
                sched.next_wake(now_ms())
            };
            let wait = due_in
                .map(|ms| Duration::from_millis(ms.max(0) as u64))
                .unwrap_or(cfg.poll_interval.0)
                .min(refresh_at.saturating_duration_since(Instant::now()));
            tokio::select! {
                Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                    let workers = sched.workers;
                    let mut finish = |done: Result<(String, Option<i64>), tokio::task::JoinError>| {
                        if let Ok((id, retry_at)) = done {
                            sched.finished(&id, retry_at);
                        }
                    };
                    finish(done);
                    while let Some(done) = tasks.try_join_next() {
                        finish(done);
                    }
                    // Under load, let a few more attempts finish so one
                    // claim (one transaction) refills several slots.
                    if tasks.len() + COALESCE_FREE_SLOTS > workers {
                        tokio::time::sleep(COALESCE_WAIT).await;
                        while let Some(done) = tasks.try_join_next() {
                            finish(done);
                        }
                    }
                }
                _ = self.wake_workers.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
        // Let in-flight attempts finish briefly; the rest are cut and their
        // leased rows come back on the next start.
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        drop(recorder);
        let _ = recording.await;
    }

    /// One attempt: send, then record it with its consequences. Returns the
    /// time of the next attempt, if one was scheduled.
    async fn attempt(&self, d: Delivery, recorder: mpsc::Sender<Recording>) -> Option<i64> {
        let started = Instant::now();
        let at_ms = now_ms();
        let response = self.send(&d).await;
        let duration_ms = started.elapsed().as_millis() as i64;
        let (next, health) = self.judge(&d, &response, now_ms());
        if next == NextStep::Succeeded {
            self.attempts_succeeded.increment(1);
        } else {
            self.attempts_failed.increment(1);
        }
        if let Health::Disable(reason) = &health {
            tracing::warn!(endpoint = %d.endpoint_id, %reason, "disabling webhook endpoint");
        }
        let outcome = AttemptOutcome {
            delivery_id: d.id,
            endpoint_id: d.endpoint_id.clone(),
            event_id: d.event_id.clone(),
            msg_id: d.msg_id.clone(),
            attempt: d.attempt,
            succeeded: next == NextStep::Succeeded,
            response_status: response.status,
            response_body: response.body,
            error: response.error,
            duration_ms,
            at_ms,
            next,
            health,
        };
        let (done, recorded) = oneshot::channel();
        if recorder.send((outcome, done)).await.is_ok() {
            let _ = recorded.await;
        }
        match next {
            NextStep::RetryAt(at) => Some(at),
            _ => None,
        }
    }

    /// Sends one signed POST; never follows a redirect, never reaches a refused address.
    async fn send(&self, d: &Delivery) -> Response {
        let url = match url::Url::parse(&d.url) {
            Ok(u) => u,
            Err(e) => return Response::error(format!("invalid url: {e}")),
        };
        if let Err(refusal) = self.policy.check_url(&url) {
            return Response::error(format!("forbidden_target: {refusal}"));
        }
        let now = now_ms();
        let keys: Vec<Vec<u8>> = d
            .secrets
            .iter()
            .filter(|s| s.expires_ms.is_none_or(|exp| exp > now))
            .filter_map(|s| sign::secret_key(&s.secret).ok())
            .collect();
        let mut req = self
            .client
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json");
        for (name, value) in sign::headers(&keys, &d.msg_id, now / 1000, &d.payload) {
            req = req.header(name, value);
        }
        let mut resp = match req.body(d.payload.clone()).send().await {
            Ok(r) => r,
            Err(e) => return Response::error(describe(&e, &self.config)),
        };
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let mut body = Vec::new();
        let mut error = None;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    let room = RESPONSE_BODY_KEPT - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if body.len() >= RESPONSE_BODY_KEPT {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    error = Some(describe(&e, &self.config));
                    break;
                }
            }
        }
        if error.is_none() && !status.is_success() {
            error = Some(if status.is_redirection() {
                format!("HTTP {status} (redirects are not followed)")
            } else {
                format!("HTTP {status}")
            });
        }
        Response {
            status: Some(status.as_u16()),
            body: (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned()),
            error,
            retry_after,
        }
    }

    /// What follows from a response: the delivery's next step and the
    /// endpoint's health.
    fn judge(&self, d: &Delivery, r: &Response, now: i64) -> (NextStep, Health) {
        let cfg = &self.config.delivery;
        let status = r.status.unwrap_or(0);
        if r.error.is_none() && (200..300).contains(&status) {
            return (NextStep::Succeeded, Health::Succeeded);
        }
        if status == 410 {
            return (
                NextStep::GiveUp,
                Health::Disable("the endpoint answered 410 Gone".into()),
            );
        }
        let schedule = &cfg.retry_schedule;
        let next = match schedule.get(d.attempt as usize) {
            None => NextStep::GiveUp,
            Some(delay) => {
                let mut wait = jitter(delay.0);
                if matches!(status, 429 | 503)
                    && let Some(asked) = r.retry_after
                {
                    let longest = schedule.iter().map(|d| d.0).max().unwrap_or_default();
                    wait = wait.max(asked.min(longest));
                }
                NextStep::RetryAt(now + wait.as_millis() as i64)
            }
        };
        let error = r.error.as_deref().unwrap_or("failed");
        let health = match d.failing_since_ms {
            Some(since) if now - since >= cfg.disable_after.0.as_millis() as i64 => {
                Health::Disable(format!(
                    "failing without a success since {} (longer than delivery.disable_after = {}); last error: {error}",
                    rfc3339(since),
                    humantime::format_duration(cfg.disable_after.0)
                ))
            }
            _ => Health::Failed,
        };
        (next, health)
    }

    // ---- maintenance --------------------------------------------------------

    /// Removes finished deliveries and attempts older than the log's retention.
    pub async fn run_maintenance(self: Arc<Self>) {
        let keep = self.config.store.retention.0;
        let every = (keep / 2).clamp(Duration::from_secs(1), Duration::from_secs(300));
        loop {
            tokio::time::sleep(every).await;
            let before = now_ms() - keep.as_millis().min(i64::MAX as u128) as i64;
            match self.store.prune_deliveries(before).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(removed = n, "pruned finished webhook deliveries"),
                Err(e) => tracing::warn!(error = %e, "pruning webhook deliveries failed"),
            }
        }
    }
}

impl Response {
    fn error(message: String) -> Response {
        Response {
            error: Some(message),
            ..Response::default()
        }
    }
}

/// An attempt's outcome on its way to the store, and who waits for it.
type Recording = (AttemptOutcome, oneshot::Sender<()>);

/// Records attempts in batches (group commit: one sync for all the attempts
/// that finished meanwhile). The store may be briefly unavailable; if it
/// stays so, the batch is dropped, the leases end and the deliveries are
/// attempted again (at least once).
async fn record(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Recording>) {
    let mut batch: Vec<Recording> = Vec::with_capacity(RECORD_BATCH);
    while rx.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        let outcomes: Vec<AttemptOutcome> = batch.iter().map(|(o, _)| o.clone()).collect();
        for backoff in [100u64, 500, 2000, 0] {
            match store.record_attempts(outcomes.clone()).await {
                Ok(()) | Err(StoreError::Closed) => break,
                Err(e) if backoff > 0 => {
                    tracing::warn!(error = %e, "cannot record webhook attempts; retrying");
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "webhook attempts not recorded; their leases will expire")
                }
            }
        }
        for (_, done) in batch.drain(..) {
            let _ = done.send(());
        }
    }
}

/// A network error, with the reason a person needs first.
fn describe(e: &reqwest::Error, config: &Config) -> String {
    if let Some(refusal) = ssrf::find_refusal(e) {
        return format!("forbidden_target: {refusal}");
    }
    if e.is_timeout() {
        return format!(
            "timed out (delivery.timeout = {}, connect_timeout = {})",
            humantime::format_duration(config.delivery.timeout.0),
            humantime::format_duration(config.delivery.connect_timeout.0)
        );
    }
    let mut text = String::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let part = err.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
        cur = err.source();
    }
    text
}

/// `Retry-After`: delta-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// Up to 20% later than scheduled, never earlier, so retries of many
/// messages that failed together spread out.
fn jitter(d: Duration) -> Duration {
    use rand::Rng;
    if d.is_zero() {
        return d;
    }
    d.mul_f64(1.0 + rand::rng().random_range(0.0..0.2))
}

pub fn rfc3339(ms: i64) -> String {
    humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64),
    )
    .to_string()
}

/// The worker pool's bookkeeping: what is in flight per endpoint, when each
/// endpoint next has something due, and its rate-limit bucket. Pure state,
/// no I/O, so fairness is decided in one place.
struct Scheduler {
    workers: usize,
    per_endpoint: usize,
    /// Enabled endpoints in a stable order; claims start at `rotate` so that
    /// when workers are scarce every endpoint gets its turn.
    endpoints: Vec<(String, Option<u32>)>,
    rotate: usize,
    in_flight: HashMap<String, usize>,
    /// Earliest known due time; absent = unknown (probe it).
    next_due: HashMap<String, i64>,
    buckets: HashMap<String, Bucket>,
}

struct Bucket {
    tokens: f64,
    at_ms: i64,
}

impl Scheduler {
    fn new(workers: usize, per_endpoint: usize) -> Scheduler {
        Scheduler {
            workers,
            per_endpoint,
            endpoints: Vec::new(),
            rotate: 0,
            in_flight: HashMap::new(),
            next_due: HashMap::new(),
            buckets: HashMap::new(),
        }
    }

    /// A fresh list of endpoints: forget what we knew, probe every one again
    /// (another node, or a missed hint, may have queued something).
    fn set_endpoints(&mut self, list: &[Endpoint]) {
        self.endpoints = list
            .iter()
            .filter(|e| e.enabled)
            .map(|e| (e.id.clone(), e.rate_limit))
            .collect();
        self.next_due.clear();
        let live: std::collections::HashSet<&str> =
            self.endpoints.iter().map(|(id, _)| id.as_str()).collect();
        self.buckets.retain(|id, _| live.contains(id.as_str()));
    }

    fn hint(&mut self, id: &str, due: i64) {
        if let Some(known) = self.next_due.get_mut(id) {
            *known = (*known).min(due);
        }
    }

    fn set_next_due(&mut self, id: &str, due: Option<i64>) {
        self.next_due
            .insert(id.to_string(), due.unwrap_or(i64::MAX));
    }

    fn started(&mut self, id: &str) {
        *self.in_flight.entry(id.to_string()).or_default() += 1;
        if let Some(b) = self.buckets.get_mut(id) {
            b.tokens -= 1.0;
        }
    }

    fn finished(&mut self, id: &str, retry_at: Option<i64>) {
        if let Some(n) = self.in_flight.get_mut(id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.in_flight.remove(id);
            }
        }
        if let Some(at) = retry_at {
            self.hint(id, at);
        }
    }

    /// Whole tokens available to a rate-limited endpoint now.
    fn tokens(&mut self, id: &str, rate: Option<u32>, now: i64) -> usize {
        let Some(rate) = rate.filter(|r| *r > 0) else {
            return usize::MAX;
        };
        let b = self.buckets.entry(id.to_string()).or_insert(Bucket {
            tokens: rate as f64,
            at_ms: now,
        });
        let elapsed = (now - b.at_ms).max(0) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * rate as f64).min(rate as f64);
        b.at_ms = now;
        b.tokens.max(0.0) as usize
    }

    /// What to claim now: for each endpoint with a free slot, something
    /// (possibly) due and a token, up to its share of the free workers.
    fn wants(&mut self, now: i64, running: usize) -> Vec<ClaimWant> {
        let mut budget = self.workers.saturating_sub(running);
        let mut wants = Vec::new();
        let n = self.endpoints.len();
        let mut visited = 0;
        while visited < n && budget > 0 {
            let (id, rate) = self.endpoints[(self.rotate + visited) % n].clone();
            visited += 1;
            if self.next_due.get(&id).is_some_and(|due| *due > now) {
                continue;
            }
            let free = self
                .per_endpoint
                .saturating_sub(self.in_flight.get(&id).copied().unwrap_or(0));
            let max = free.min(self.tokens(&id, rate, now)).min(budget);
            if max == 0 {
                continue;
            }
            budget -= max;
            // Asked now; the claim reports its real next due time.
            self.next_due.insert(id.clone(), i64::MAX);
            wants.push(ClaimWant {
                endpoint_id: id,
                max,
            });
        }
        if n > 0 {
            self.rotate = (self.rotate + visited) % n;
        }
        wants
    }

    /// Milliseconds until something could be claimed by an endpoint with a
    /// free slot; `None` if nothing is known to be due.
    fn next_wake(&mut self, now: i64) -> Option<i64> {
        let mut soonest: Option<i64> = None;
        for i in 0..self.endpoints.len() {
            let (id, rate) = self.endpoints[i].clone();
            if self.in_flight.get(&id).copied().unwrap_or(0) >= self.per_endpoint {
                continue;
            }
            let Some(due) = self.next_due.get(&id).copied() else {
                return Some(0);
            };
            if due == i64::MAX {
                continue;
            }
            let mut at = due;
            if let Some(r) = rate.filter(|r| *r > 0)
                && self.tokens(&id, rate, now) == 0
            {
                let missing = 1.0 - self.buckets.get(&id).map(|b| b.tokens).unwrap_or(0.0);
                at = at.max(now + (missing * 1000.0 / r as f64).ceil() as i64);
            }
            soonest = Some(soonest.map_or(at, |s: i64| s.min(at)));
        }
        soonest.map(|at| at - now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(id: &str, rate: Option<u32>) -> Endpoint {
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
    fn a_saturated_endpoint_leaves_the_workers_to_the_others() {
        let mut s = Scheduler::new(4, 2);
        s.set_endpoints(&[endpoint("ep_dead", None), endpoint("ep_ok", None)]);
        let wants = s.wants(1000, 0);
        assert_eq!(wants.len(), 2);
        assert!(wants.iter().all(|w| w.max == 2), "{wants:?}");
        s.set_next_due("ep_dead", Some(0));
        s.set_next_due("ep_ok", Some(0));
        s.started("ep_dead");
        s.started("ep_dead");
        let wants = s.wants(1000, 2);
        assert_eq!(wants.len(), 1, "the dead endpoint is at its cap");
        assert_eq!(wants[0].endpoint_id, "ep_ok");
        assert_eq!(wants[0].max, 2);
    }

    #[test]
    fn scarce_workers_rotate_over_endpoints() {
        let mut s = Scheduler::new(1, 4);
        s.set_endpoints(&[
            endpoint("a", None),
            endpoint("b", None),
            endpoint("c", None),
        ]);
        let mut firsts = Vec::new();
        for _ in 0..3 {
            let w = s.wants(0, 0);
            assert_eq!(w.len(), 1);
            firsts.push(w[0].endpoint_id.clone());
            s.next_due.clear();
        }
        firsts.sort();
        assert_eq!(firsts, ["a", "b", "c"]);
    }

    #[test]
    fn rate_limits_hold_back_claims_until_a_token_is_back() {
        let mut s = Scheduler::new(10, 10);
        s.set_endpoints(&[endpoint("slow", Some(2))]);
        let w = s.wants(0, 0);
        assert_eq!(w[0].max, 2, "a full bucket is the burst");
        s.started("slow");
        s.started("slow");
        s.finished("slow", None);
        s.finished("slow", None);
        s.set_next_due("slow", Some(0));
        assert!(s.wants(100, 0).is_empty(), "no token yet");
        let wake = s.next_wake(100).unwrap();
        assert!((300..=500).contains(&wake), "{wake}");
        assert_eq!(s.wants(600, 0)[0].max, 1);
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
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(message_id(42, "ep_abc"), "msg_42_abc");
    }
}
