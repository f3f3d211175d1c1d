//! In-memory fan-out of committed events to the subscribers of each channel.
//!
//! The hub is only a fast path and a wake-up; the log is the truth.
//! Invariants:
//! - events enter the hub only from the store's commit feed, in log order, so
//!   each subscriber's queue is in log order too;
//! - each event is encoded once (`EncodedEvent`) and the same bytes are shared
//!   by every subscriber and transport;
//! - a subscriber's queue is bounded: when it would overflow, the queue is
//!   dropped and the subscriber is marked lagged; it then reads the log from
//!   its own cursor. A slow reader costs the others nothing and holds no
//!   more memory than its bound;
//! - subscribers are woken once per committed batch, not once per event, so a
//!   transport can write all pending events together.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::store::{Event, Seq, format_cursor};

/// One event, encoded once for every transport.
#[derive(Debug)]
pub struct EncodedEvent {
    pub seq: Seq,
    pub kind: String,
    /// The envelope, as the contract shows it.
    pub json: Bytes,
    /// `id: <cursor>\ndata: <envelope>\n\n`
    pub sse: Bytes,
    sse_named: OnceLock<Bytes>,
    ws: OnceLock<Bytes>,
}

#[derive(Serialize)]
struct Envelope<'a> {
    id: &'a str,
    channel: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    source: &'a str,
    source_id: Option<&'a str>,
    time: &'a str,
    data: &'a RawValue,
}

impl EncodedEvent {
    pub fn encode(event: &Event, log_tag: &str) -> EncodedEvent {
        let cursor = format_cursor(event.seq, log_tag);
        let time = humantime::format_rfc3339_millis(
            UNIX_EPOCH + Duration::from_millis(event.time_ms.max(0) as u64),
        )
        .to_string();
        let envelope = Envelope {
            id: &cursor,
            channel: &event.channel,
            kind: &event.kind,
            source: &event.source,
            source_id: event.source_id.as_deref(),
            time: &time,
            data: &one_line(&event.data),
        };
        let json = serde_json::to_vec(&envelope).expect("envelope serializes");
        let mut sse = BytesMut::with_capacity(json.len() + cursor.len() + 13);
        sse.put_slice(b"id: ");
        sse.put_slice(cursor.as_bytes());
        sse.put_slice(b"\ndata: ");
        sse.put_slice(&json);
        sse.put_slice(b"\n\n");
        EncodedEvent {
            seq: event.seq,
            kind: event.kind.clone(),
            json: json.into(),
            sse: sse.freeze(),
            sse_named: OnceLock::new(),
            ws: OnceLock::new(),
        }
    }

    /// SSE bytes with an `event: <type>` line (`?named=1`).
    pub fn sse_named(&self) -> &Bytes {
        self.sse_named.get_or_init(|| {
            let mut b = BytesMut::with_capacity(self.sse.len() + self.kind.len() + 8);
            b.put_slice(b"event: ");
            b.put_slice(sanitize_line(&self.kind).as_bytes());
            b.put_slice(b"\n");
            b.put_slice(&self.sse);
            b.freeze()
        })
    }

    /// The WebSocket text frame payload `{"op":"event","event":<envelope>}`.
    pub fn ws_text(&self) -> &Bytes {
        self.ws.get_or_init(|| {
            let mut b = BytesMut::with_capacity(self.json.len() + 24);
            b.put_slice(b"{\"op\":\"event\",\"event\":");
            b.put_slice(&self.json);
            b.put_slice(b"}");
            b.freeze()
        })
    }
}

/// The payload without line breaks, so the envelope is one SSE `data:` line.
/// Payloads are stored as they arrived, and providers send pretty-printed
/// JSON; outside strings (where valid JSON has no raw control characters)
/// whitespace means nothing, so dropping it changes no value, key order or
/// number as written. Payloads without line breaks are used as they are.
fn one_line(data: &RawValue) -> std::borrow::Cow<'_, RawValue> {
    let text = data.get();
    if !text.bytes().any(|b| b == b'\n' || b == b'\r') {
        return std::borrow::Cow::Borrowed(data);
    }
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    match RawValue::from_string(out) {
        Ok(compact) => std::borrow::Cow::Owned(compact),
        // Cannot happen for valid JSON; keep the original rather than lose it.
        Err(_) => std::borrow::Cow::Borrowed(data),
    }
}

/// Event types come from payloads; a newline in one must not break SSE framing.
fn sanitize_line(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains(['\n', '\r']) {
        s.replace(['\n', '\r'], " ").into()
    } else {
        s.into()
    }
}

#[derive(Default)]
struct Inbox {
    queue: VecDeque<Arc<EncodedEvent>>,
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
        if inbox.queue.len() >= limit {
            inbox.queue = VecDeque::new();
            inbox.lagged = true;
            return true;
        }
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
        out: &mut Vec<Arc<EncodedEvent>>,
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

    pub async fn signal(&self, out: &mut Vec<Arc<EncodedEvent>>) -> Signal {
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

    #[test]
    fn envelope_encoding() {
        let e = EncodedEvent::encode(&event(7, "user:1"), "abc");
        assert_eq!(
            std::str::from_utf8(&e.json).unwrap(),
            r#"{"id":"7-abc","channel":"user:1","type":"t","source":"publish","source_id":null,"time":"2025-11-29T09:00:00.123Z","data":{"a":1}}"#
        );
        assert!(e.sse.starts_with(b"id: 7-abc\ndata: {"));
        assert!(e.sse.ends_with(b"}\n\n"));
        assert!(e.sse_named().starts_with(b"event: t\nid: 7-abc\n"));
        assert!(
            e.ws_text()
                .starts_with(b"{\"op\":\"event\",\"event\":{\"id\":\"7-abc\"")
        );
    }

    #[test]
    fn multi_line_payloads_become_one_line_without_changing_a_value() {
        let mut e = event(1, "a");
        e.data = RawValue::from_string(
            "{\r\n  \"z\": \"a b\\\"\\n c\",\n  \"a\": [1.50, 12345678901234567890123],\n\t\"e\": {}\n}".into(),
        )
        .unwrap();
        let enc = EncodedEvent::encode(&e, "t");
        let json = std::str::from_utf8(&enc.json).unwrap();
        assert!(
            json.ends_with(
                r#""data":{"z":"a b\"\n c","a":[1.50,12345678901234567890123],"e":{}}}"#
            ),
            "{json}"
        );
        assert!(!enc.sse.contains(&b'\r'));
        assert_eq!(
            enc.sse.iter().filter(|b| **b == b'\n').count(),
            3,
            "id line, data line, blank line"
        );
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
