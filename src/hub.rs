//! In-memory fan-out of committed events to the subscribers of each channel.
//!
//! The hub is only a fast path and a wake-up; the log is the truth.
//! Invariants:
//! - events enter the hub only from the store's commit feed, in log order, so
//!   each subscriber's queue is in log order too;
//! - each event is encoded once (`envelope::EncodedEvent`), only if someone
//!   listens, and the same bytes are shared by every subscriber;
//! - a subscriber's queue is bounded, in events and in bytes
//!   (`QUEUE_BYTES`): when it would overflow, the queue is
//!   dropped and the subscriber is marked lagged; it then reads the log from
//!   its own cursor. A slow reader costs the others nothing and holds no
//!   more memory than its bound;
//! - subscribers are woken once per committed batch, not once per event, so a
//!   transport can write all pending events together.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

pub use crate::envelope::EncodedEvent;
use crate::store::Event;

/// Bytes of envelopes one subscriber's queue may hold. Events are shared,
/// but a queue that is not read keeps its events alive after every other
/// reader is done with them, so its bound is in bytes as well as in count.
pub const QUEUE_BYTES: usize = 4 << 20;

#[derive(Default)]
struct Inbox {
    queue: VecDeque<Arc<EncodedEvent>>,
    /// Envelope bytes in `queue`.
    bytes: usize,
    lagged: bool,
    ping: bool,
    closed: bool,
}

struct Subscriber {
    inbox: Mutex<Inbox>,
    waker: AtomicWaker,
}

impl Subscriber {
    /// Queues one event; returns whether the subscriber needs a wake-up.
    fn push(&self, event: &Arc<EncodedEvent>, limit: usize) -> bool {
        let mut inbox = self.inbox.lock().expect("inbox lock");
        if inbox.lagged || inbox.closed {
            return false;
        }
        let len = event.json.len();
        if inbox.queue.len() >= limit
            || (!inbox.queue.is_empty() && inbox.bytes + len > QUEUE_BYTES)
        {
            inbox.queue = VecDeque::new();
            inbox.bytes = 0;
            inbox.lagged = true;
            return true;
        }
        inbox.bytes += len;
        inbox.queue.push_back(event.clone());
        true
    }

    fn flag(&self, set: impl FnOnce(&mut Inbox) -> bool) {
        let changed = set(&mut self.inbox.lock().expect("inbox lock"));
        if changed {
            self.waker.wake();
        }
    }
}

/// What a subscription has for its reader.
#[derive(Debug, PartialEq, Eq)]
pub enum Signal {
    /// Events were moved into the caller's buffer, in log order.
    Events,
    /// The queue overflowed and was dropped: read the log from your cursor.
    Lagged,
    /// The heartbeat ticked: write a keep-alive (and check token expiry).
    Ping,
    /// The server is shutting down.
    Closed,
}

pub struct Hub {
    channels: RwLock<HashMap<String, Vec<Arc<Subscriber>>>>,
    queue_limit: usize,
    log_tag: String,
    closed: std::sync::atomic::AtomicBool,
}

impl Hub {
    pub fn new(log_tag: &str, queue_limit: usize) -> Hub {
        Hub {
            channels: RwLock::new(HashMap::new()),
            queue_limit,
            log_tag: log_tag.to_string(),
            closed: Default::default(),
        }
    }

    pub fn log_tag(&self) -> &str {
        &self.log_tag
    }

    /// Registers interest in `channels`. Register *before* reading the log
    /// for catch-up: anything committed after the read is then in the queue,
    /// and anything in both is dropped by seq.
    pub fn subscribe(self: &Arc<Self>, channels: &[String]) -> Subscription {
        let sub = Arc::new(Subscriber {
            inbox: Mutex::new(Inbox {
                closed: self.closed.load(std::sync::atomic::Ordering::Acquire),
                ..Inbox::default()
            }),
            waker: AtomicWaker::new(),
        });
        let mut map = self.channels.write().expect("hub lock");
        for ch in channels {
            map.entry(ch.clone()).or_default().push(sub.clone());
        }
        Subscription {
            hub: self.clone(),
            sub,
            channels: channels.to_vec(),
        }
    }

    /// Fans a committed batch out to the subscribers of each event's channel.
    pub fn dispatch(&self, batch: &[Event]) {
        // Encode only events someone listens to. A subscriber that registers
        // after this look reads the event from the log (it registered before
        // its read, and the event is already committed), so skipping is safe.
        let wanted: Vec<&Event> = {
            let map = self.channels.read().expect("hub lock");
            batch
                .iter()
                .filter(|e| map.contains_key(e.channel.as_str()))
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        let encoded: Vec<(&str, Arc<EncodedEvent>)> = wanted
            .into_iter()
            .map(|e| {
                (
                    e.channel.as_str(),
                    Arc::new(EncodedEvent::encode(e, &self.log_tag)),
                )
            })
            .collect();
        let mut to_wake: Vec<Arc<Subscriber>> = Vec::new();
        {
            let map = self.channels.read().expect("hub lock");
            for (channel, event) in &encoded {
                let Some(subs) = map.get(*channel) else {
                    continue;
                };
                for sub in subs {
                    if sub.push(event, self.queue_limit) {
                        to_wake.push(sub.clone());
                    }
                }
            }
        }
        // One wake per subscriber per batch, outside the map lock.
        to_wake.sort_unstable_by_key(|s| Arc::as_ptr(s) as usize);
        to_wake.dedup_by(|a, b| Arc::ptr_eq(a, b));
        for sub in to_wake {
            sub.waker.wake();
        }
    }

    /// Asks every subscriber to write a keep-alive.
    pub fn heartbeat(&self) {
        self.for_each_subscriber(|s| {
            s.flag(|i| {
                let was = i.ping;
                i.ping = true;
                !was
            })
        });
    }

    /// Ends every subscription (shutdown); later subscriptions start closed.
    pub fn close_all(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        self.for_each_subscriber(|s| {
            s.flag(|i| {
                let was = i.closed;
                i.closed = true;
                !was
            })
        });
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    fn for_each_subscriber(&self, f: impl Fn(&Subscriber)) {
        let subs: Vec<Arc<Subscriber>> = {
            let map = self.channels.read().expect("hub lock");
            map.values().flatten().cloned().collect()
        };
        for s in subs {
            f(&s);
        }
    }

    /// Number of (channel, subscriber) registrations; for tests and metrics.
    pub fn registrations(&self) -> usize {
        self.channels
            .read()
            .expect("hub lock")
            .values()
            .map(Vec::len)
            .sum()
    }
}

/// A live registration; dropping it unregisters.
pub struct Subscription {
    hub: Arc<Hub>,
    sub: Arc<Subscriber>,
    channels: Vec<String>,
}

impl Subscription {
    pub fn channels(&self) -> &[String] {
        &self.channels
    }

    /// Moves everything pending into `out`, or reports what else happened.
    /// Order of precedence: closed, lagged, events, ping.
    pub fn poll_signal(
        &self,
        cx: &mut Context<'_>,
        out: &mut impl Extend<Arc<EncodedEvent>>,
    ) -> Poll<Signal> {
        self.sub.waker.register(cx.waker());
        let mut inbox = self.sub.inbox.lock().expect("inbox lock");
        if inbox.closed {
            return Poll::Ready(Signal::Closed);
        }
        if inbox.lagged {
            inbox.lagged = false;
            return Poll::Ready(Signal::Lagged);
        }
        if !inbox.queue.is_empty() {
            out.extend(inbox.queue.drain(..));
            inbox.bytes = 0;
            if inbox.queue.capacity() > 64 {
                // Give back what a burst grew; idle subscribers stay small.
                inbox.queue.shrink_to(16);
            }
            return Poll::Ready(Signal::Events);
        }
        if inbox.ping {
            inbox.ping = false;
            return Poll::Ready(Signal::Ping);
        }
        Poll::Pending
    }

    pub async fn signal(&self, out: &mut impl Extend<Arc<EncodedEvent>>) -> Signal {
        std::future::poll_fn(|cx| self.poll_signal(cx, out)).await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut map = self.hub.channels.write().expect("hub lock");
        for ch in &self.channels {
            if let Some(subs) = map.get_mut(ch) {
                if let Some(pos) = subs.iter().position(|s| Arc::ptr_eq(s, &self.sub)) {
                    subs.swap_remove(pos);
                }
                if subs.is_empty() {
                    map.remove(ch);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Seq;
    use serde_json::value::RawValue;

    fn event(seq: Seq, channel: &str) -> Event {
        Event {
            seq,
            channel: channel.into(),
            kind: "t".into(),
            source: "publish".into(),
            source_id: None,
            time_ms: 1_764_406_800_123,
            data: RawValue::from_string("{\"a\":1}".into()).unwrap(),
        }
    }

    #[tokio::test]
    async fn fan_out_shares_bytes_and_respects_channels() {
        let hub = Arc::new(Hub::new("t", 100));
        let a = hub.subscribe(&["a".into()]);
        let ab = hub.subscribe(&["a".into(), "b".into()]);
        hub.dispatch(&[event(1, "a"), event(2, "b"), event(3, "c")]);
        let mut got_a = Vec::new();
        assert_eq!(a.signal(&mut got_a).await, Signal::Events);
        let mut got_ab = Vec::new();
        assert_eq!(ab.signal(&mut got_ab).await, Signal::Events);
        assert_eq!(got_a.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1]);
        assert_eq!(got_ab.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(Arc::ptr_eq(&got_a[0], &got_ab[0]), "one encoding shared");
        drop(a);
        drop(ab);
        assert_eq!(hub.registrations(), 0);
    }

    #[tokio::test]
    async fn a_queue_is_bounded_in_bytes_too() {
        let hub = Arc::new(Hub::new("t", 1000));
        let slow = hub.subscribe(&["a".into()]);
        let big = |seq| {
            let mut e = event(seq, "a");
            e.data = RawValue::from_string(format!("\"{}\"", "x".repeat(1 << 20))).unwrap();
            e
        };
        hub.dispatch(&[big(1), big(2), big(3)]);
        let mut got = Vec::new();
        assert_eq!(slow.signal(&mut got).await, Signal::Events, "3 MiB fit");
        assert_eq!(got.len(), 3);
        hub.dispatch(&(4..=8).map(big).collect::<Vec<_>>());
        let mut got = Vec::new();
        assert_eq!(slow.signal(&mut got).await, Signal::Lagged, "5 MiB do not");
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn overflow_marks_lagged_and_frees_the_queue() {
        let hub = Arc::new(Hub::new("t", 16));
        let slow = hub.subscribe(&["a".into()]);
        let batch: Vec<Event> = (1..=100).map(|i| event(i, "a")).collect();
        hub.dispatch(&batch);
        let mut got = Vec::new();
        assert_eq!(slow.signal(&mut got).await, Signal::Lagged);
        assert!(got.is_empty());
        hub.dispatch(&[event(101, "a")]);
        assert_eq!(slow.signal(&mut got).await, Signal::Events);
        assert_eq!(got[0].seq, 101, "after a lag, new events queue again");
        hub.heartbeat();
        assert_eq!(slow.signal(&mut got).await, Signal::Ping);
        hub.close_all();
        assert_eq!(slow.signal(&mut got).await, Signal::Closed);
    }
}
