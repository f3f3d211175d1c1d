//! The workers: lease due deliveries, run each attempt as a task, record
//! the outcomes; and maintenance, which prunes what is finished.
//!
//! Invariants: at most `delivery.workers` attempts at once and at most
//! `delivery.per_endpoint` per endpoint (`schedule.rs` decides, and every
//! attempt holds its endpoint's slot as an RAII guard, so a panicking or
//! cancelled attempt gives it back); a lease outlives its attempt; an
//! outcome that cannot be recorded leaves the lease to expire, so the
//! delivery is attempted again (at least once, never lost).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::schedule::{Scheduler, Slot};
use super::{Deliverer, MAX_ERROR_BACKOFF, sign, ssrf};
use crate::clock::{now_ms, rfc3339};
use crate::config::Config;
use crate::store::{AttemptOutcome, Delivery, Health, NextStep, Store, StoreError};

/// Bytes of a response body kept with its attempt.
pub const RESPONSE_BODY_KEPT: usize = 4096;
/// How long in-flight attempts may finish at shutdown before they are cut
/// (their rows are leased and come back on the next start).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
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

/// What the receiver (or the network) said.
#[derive(Debug, Default)]
struct Response {
    status: Option<u16>,
    body: Option<String>,
    error: Option<String>,
    retry_after: Option<Duration>,
}

/// The attempts in flight: each task returns its endpoint and the time of
/// its next attempt, if one was scheduled.
type Attempts = JoinSet<(String, Option<i64>)>;

/// Runs `attempt` as a task that holds `slot` until it ends — returns,
/// panics or is aborted — so the endpoint's concurrency slot always comes back.
fn spawn_attempt<F>(tasks: &mut Attempts, slot: Slot, attempt: F)
where
    F: Future<Output = Option<i64>> + Send + 'static,
{
    tasks.spawn(async move {
        let id = slot.endpoint_id().to_string();
        let retry_at = attempt.await;
        drop(slot);
        (id, retry_at)
    });
}

impl Deliverer {
    /// Leases due deliveries and runs their attempts until `stop`.
    pub async fn run_workers(self: Arc<Self>) {
        let cfg = &self.config.delivery;
        let lease = cfg.timeout.0 + cfg.connect_timeout.0 + LEASE_MARGIN;
        let mut stop = self.stop.subscribe();
        let mut sched = Scheduler::new(cfg.workers.max(1), cfg.per_endpoint.max(1));
        let mut tasks = Attempts::new();
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
                    let slot = sched.started(&d.endpoint_id);
                    let this = self.clone();
                    let recorder = recorder.clone();
                    spawn_attempt(
                        &mut tasks,
                        slot,
                        async move { this.attempt(d, recorder).await },
                    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deliver::tests::endpoint;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("7"), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }

    /// A panicking attempt gives its endpoint's slot back (refusal), and the
    /// slot is really held while an attempt runs (positive control).
    #[tokio::test]
    async fn a_panicking_attempt_gives_its_slot_back() {
        let mut s = Scheduler::new(4, 1);
        s.set_endpoints(&[endpoint("ep_1", None)]);
        assert_eq!(s.wants(0, 0).len(), 1);
        let mut tasks = Attempts::new();
        let (release, released) = oneshot::channel::<()>();
        spawn_attempt(&mut tasks, s.started("ep_1"), async move {
            let _ = released.await;
            panic!("attempt blew up");
        });
        s.set_next_due("ep_1", Some(0));
        assert_eq!(s.in_flight("ep_1"), 1);
        assert!(s.wants(0, 1).is_empty(), "the slot is held while it runs");
        release.send(()).unwrap();
        let done = tasks.join_next().await.expect("one task");
        assert!(done.unwrap_err().is_panic());
        assert_eq!(s.in_flight("ep_1"), 0, "the panic gave the slot back");
        s.set_next_due("ep_1", Some(0));
        assert_eq!(s.wants(0, 0).len(), 1, "the endpoint gets work again");
        // Aborted at shutdown: the same.
        spawn_attempt(&mut tasks, s.started("ep_1"), std::future::pending());
        assert_eq!(s.in_flight("ep_1"), 1);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        assert_eq!(s.in_flight("ep_1"), 0, "an aborted attempt gave it back");
    }
}
