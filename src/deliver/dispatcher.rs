//! The dispatcher: turns committed events into queued deliveries.
//!
//! Invariant: the durable outbox cursor moves in the same transaction as the
//! deliveries created for the events it passes, so after a crash every
//! event is dispatched at least once and none is skipped; endpoints are read
//! after the events of a page, so an endpoint created meanwhile (its
//! `from_seq` at or above the page) never gets events from before it existed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{Deliverer, MAX_ERROR_BACKOFF, Matcher, message_id};
use crate::clock::now_ms;
use crate::envelope::EncodedEvent;
use crate::store::{Endpoint, Event, NewDelivery, OutboxAdvance, Seq, StoreError, format_cursor};

/// Events the dispatcher reads per transaction.
const DISPATCH_PAGE: usize = 1000;
/// How long pages without deliveries may move the dispatcher on before the
/// durable cursor follows.
const CURSOR_FLUSH: Duration = Duration::from_secs(1);

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
impl Deliverer {
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
            event_id: format_cursor(event.seq, &self.log_tag),
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
}
