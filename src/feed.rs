//! One subscription's view of the log: history, then live, exactly once.
//!
//! Owns contract 1 (from any cursor, every event after it, in log order,
//! exactly once, across the switch from history to live, with any number of
//! writers) so that SSE, each WebSocket subscription and long-polling only
//! frame bytes. Invariants:
//! - it registers with the hub *before* it looks at the log, so an event
//!   committed after the look is in the hub's queue, and one committed before
//!   it is in the log;
//! - it never yields a seq at or below the last cursor it yielded: whatever
//!   both the log and the hub hold is dropped by seq;
//! - after hub lag (its queue overflowed and was dropped) it reads the log
//!   again from its own cursor;
//! - it yields a reset only when its cursor truly fell out of the log: an
//!   unusable cursor at open, or retention pruning past its cursor, seen
//!   after every log read (so a read that raced a prune is never trusted);
//! - every batch is bounded by count and by bytes, and so is what it holds
//!   of the log: a log read asks for as many events as the bytes left in the
//!   batch allow at the sizes seen so far (the first read of a feed asks for
//!   a few), so a reader that does not read holds about one batch, not a
//!   page of large events.
//!
//! It knows nothing of framing, tokens or connections.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures_util::future::BoxFuture;

use crate::envelope::EncodedEvent;
use crate::hub::{Hub, Signal, Subscription};
use crate::store::{
    Bounds, Event, Page, ResetReason, Resume, Seq, Store, StoreError, parse_cursor,
};

/// How much one batch may hold. The first event of a batch is always taken,
/// whatever its size, so every event can be delivered.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub events: usize,
    /// Counted on the envelope JSON, which every framing wraps.
    pub bytes: usize,
}

impl Default for Bound {
    fn default() -> Bound {
        Bound {
            events: 500,
            bytes: 1 << 20,
        }
    }
}

/// What a feed has for its reader, in the order the reader must act on it.
#[derive(Debug)]
pub enum Item {
    /// The cursor could not be honoured (contract 1): tell the client, and
    /// continue after `resume_from` (the oldest retained event).
    Reset {
        reason: ResetReason,
        resume_from: Seq,
    },
    /// The next events, in log order, each once.
    Events(Batch),
    /// History is exhausted; from here on events come live (yielded again
    /// after a lag's re-read).
    CaughtUp,
    /// The hub's heartbeat: a moment to write a keep-alive or check a token.
    Heartbeat,
    /// The feed has ended; it yields nothing more.
    Closed(Closure),
}

#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Arc<EncodedEvent>>,
    /// Where to resume after this batch: its last event, or further when a
    /// log read scanned past events of other channels.
    pub cursor: Seq,
}

#[derive(Debug)]
pub enum Closure {
    /// The server is shutting down.
    Shutdown,
    /// The log could not be read; the client resumes from its cursor.
    Store(StoreError),
}

type Read = BoxFuture<'static, Result<(Page, Bounds), StoreError>>;

/// What the first log read assumes of an event's size, until it has seen
/// some: a feed's first read asks for `bytes / this` events (4 for 1 MiB).
const FIRST_SIZE_GUESS: usize = 256 << 10;
/// Bytes an envelope adds to a payload, roughly, for sizing reads.
const ENVELOPE_OVERHEAD: usize = 160;

enum State {
    /// Reading the log after `last`, at most `limit` events; `None` until
    /// the read starts.
    Reading(Option<(Read, usize)>),
    /// Yielding `history`; then read again (`full` page) or go live.
    Draining {
        full: bool,
    },
    /// Yield `CaughtUp`, then go live.
    CaughtUp,
    Live,
    Done,
}

pub struct Feed {
    store: Arc<dyn Store>,
    subscription: Subscription,
    bound: Bound,
    /// The last cursor yielded (or the start).
    last: Seq,
    state: State,
    /// Events of the last log read not yet yielded (a batch was cut).
    history: VecDeque<Event>,
    /// How far that read looked.
    scanned_to: Seq,
    /// History batch being filled (possibly over several reads).
    batch: Vec<Arc<EncodedEvent>>,
    batch_bytes: usize,
    /// Bytes per event at the last read, to size the next.
    event_size: usize,
    /// Live events taken from the hub, not yet yielded.
    live: VecDeque<Arc<EncodedEvent>>,
    /// A reset to yield before anything else.
    reset: Option<(ResetReason, Seq)>,
    lags: metrics::Counter,
}

impl Feed {
    /// Registers with the hub, then resolves `cursor` against the log: `None`
    /// means "from now on", `earliest` the oldest retained event, anything
    /// unusable a reset. `lags` counts hub overflows.
    pub async fn open(
        hub: &Arc<Hub>,
        store: &Arc<dyn Store>,
        channels: &[String],
        cursor: Option<&str>,
        bound: Bound,
        lags: metrics::Counter,
    ) -> Result<Feed, StoreError> {
        let subscription = hub.subscribe(channels);
        let bounds = store.bounds().await?;
        let (last, reset, state) = match cursor {
            // Anything committed after the head was read is in the queue.
            None => (bounds.head, None, State::CaughtUp),
            Some(text) => match parse_cursor(text, store.log_tag(), bounds) {
                Resume::After(after) => (after, None, State::Reading(None)),
                Resume::Reset(reason) => (
                    bounds.pruned_through,
                    Some((reason, bounds.pruned_through)),
                    State::Reading(None),
                ),
            },
        };
        Ok(Feed {
            store: store.clone(),
            subscription,
            bound: Bound {
                events: bound.events.max(1),
                bytes: bound.bytes,
            },
            last,
            state,
            history: VecDeque::new(),
            scanned_to: last,
            batch: Vec::new(),
            batch_bytes: 0,
            event_size: FIRST_SIZE_GUESS,
            live: VecDeque::new(),
            reset,
            lags,
        })
    }

    /// The last cursor yielded; right after `open`, where the feed starts.
    pub fn cursor(&self) -> Seq {
        self.last
    }

    /// The log's tag, for formatting cursors.
    pub fn log_tag(&self) -> &str {
        self.store.log_tag()
    }

    pub fn channels(&self) -> &[String] {
        self.subscription.channels()
    }

    pub async fn next(&mut self) -> Option<Item> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// `None` after `Closed` was yielded.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        if let Some((reason, resume_from)) = self.reset.take() {
            return Poll::Ready(Some(Item::Reset {
                reason,
                resume_from,
            }));
        }
        loop {
            match &mut self.state {
                State::Done => return Poll::Ready(None),
                State::Reading(None) => {
                    let limit = self.read_limit();
                    let channels = self.subscription.channels();
                    let read = read_after(&self.store, channels, self.last, limit);
                    self.state = State::Reading(Some((read, limit)));
                }
                State::Reading(Some((fut, limit))) => {
                    let limit = *limit;
                    let result = ready!(fut.as_mut().poll(cx));
                    match result {
                        Err(e) => {
                            self.state = State::Done;
                            self.batch = Vec::new();
                            return Poll::Ready(Some(Item::Closed(Closure::Store(e))));
                        }
                        // Pruned past the cursor, before or during the read:
                        // the page may have a hole, so it is not used. What
                        // the batch already holds was read whole: it goes first.
                        Ok((_, bounds)) if bounds.pruned_through > self.last => {
                            let before = self.take_batch();
                            self.last = bounds.pruned_through;
                            self.state = State::Reading(None);
                            let reset = Item::Reset {
                                reason: ResetReason::Expired,
                                resume_from: self.last,
                            };
                            return Poll::Ready(Some(match before {
                                Some(batch) => {
                                    self.reset = Some((ResetReason::Expired, self.last));
                                    Item::Events(batch)
                                }
                                None => reset,
                            }));
                        }
                        Ok((page, _)) => {
                            let full = page.events.len() >= limit;
                            if !page.events.is_empty() {
                                let bytes: usize = page
                                    .events
                                    .iter()
                                    .map(|e| e.data.get().len() + ENVELOPE_OVERHEAD)
                                    .sum();
                                self.event_size = (bytes / page.events.len()).max(1);
                            }
                            let last = self.last;
                            self.history
                                .extend(page.events.into_iter().filter(|e| e.seq > last));
                            self.scanned_to = page.scanned_to;
                            self.state = State::Draining { full };
                        }
                    }
                }
                State::Draining { full } => {
                    let full = *full;
                    self.fill_batch();
                    if !self.history.is_empty() {
                        // The batch is at its bound; the rest waits its turn.
                        let batch = self.take_batch().expect("a bounded batch is not empty");
                        return Poll::Ready(Some(Item::Events(batch)));
                    }
                    // The page is used up: everything up to its scan is seen.
                    self.history = VecDeque::new();
                    self.last = self.last.max(self.scanned_to);
                    // More history (a full page) is read on into the batch
                    // while it has room.
                    self.state = if full {
                        State::Reading(None)
                    } else {
                        State::CaughtUp
                    };
                    if (!full || self.batch.len() >= self.bound.events)
                        && let Some(batch) = self.take_batch()
                    {
                        return Poll::Ready(Some(Item::Events(batch)));
                    }
                }
                State::CaughtUp => {
                    self.state = State::Live;
                    return Poll::Ready(Some(Item::CaughtUp));
                }
                State::Live => {
                    if let Some(batch) = self.cut_live() {
                        return Poll::Ready(Some(Item::Events(batch)));
                    }
                    match ready!(self.subscription.poll_signal(cx, &mut self.live)) {
                        Signal::Events => {}
                        Signal::Lagged => {
                            self.lags.increment(1);
                            self.live = VecDeque::new();
                            self.state = State::Reading(None);
                        }
                        Signal::Ping => return Poll::Ready(Some(Item::Heartbeat)),
                        Signal::Closed => {
                            self.live = VecDeque::new();
                            self.state = State::Done;
                            return Poll::Ready(Some(Item::Closed(Closure::Shutdown)));
                        }
                    }
                }
            }
        }
    }

    /// How many events the next log read asks for: what is left of the
    /// batch's count, and of its bytes at the size seen last.
    fn read_limit(&self) -> usize {
        let events_left = self.bound.events - self.batch.len();
        let bytes_left = self.bound.bytes.saturating_sub(self.batch_bytes);
        (bytes_left / self.event_size).clamp(1, events_left.max(1))
    }

    /// Moves history into the batch, encoding each event once, until the
    /// history is used up or the batch is at its bound.
    fn fill_batch(&mut self) {
        while self.batch.len() < self.bound.events {
            let Some(e) = self.history.front() else { break };
            if e.seq <= self.last {
                self.history.pop_front();
                continue;
            }
            let enc = EncodedEvent::encode(e, self.store.log_tag());
            if !self.batch.is_empty() && self.batch_bytes + enc.json.len() > self.bound.bytes {
                break;
            }
            self.batch_bytes += enc.json.len();
            self.last = e.seq;
            self.history.pop_front();
            self.batch.push(Arc::new(enc));
        }
    }

    /// The history batch so far, with the cursor after it.
    fn take_batch(&mut self) -> Option<Batch> {
        self.batch_bytes = 0;
        let events = std::mem::take(&mut self.batch);
        (!events.is_empty()).then_some(Batch {
            events,
            cursor: self.last,
        })
    }

    fn cut_live(&mut self) -> Option<Batch> {
        let mut events = Vec::new();
        let mut bytes = 0;
        while events.len() < self.bound.events {
            let Some(e) = self.live.front() else { break };
            if e.seq <= self.last {
                self.live.pop_front();
                continue;
            }
            if !events.is_empty() && bytes + e.json.len() > self.bound.bytes {
                break;
            }
            bytes += e.json.len();
            self.last = e.seq;
            events.extend(self.live.pop_front());
        }
        if self.live.capacity() > 64 && self.live.len() < 16 {
            // Give back what a burst grew; idle feeds stay small.
            self.live.shrink_to(16);
        }
        (!events.is_empty()).then(|| Batch {
            events,
            cursor: self.last,
        })
    }
}

/// One page of the log after `after`, and the log's bounds as seen *after*
/// the page: if nothing was pruned past `after` by then, the page is whole.
fn read_after(store: &Arc<dyn Store>, channels: &[String], after: Seq, limit: usize) -> Read {
    let store = store.clone();
    let channels = channels.to_vec();
    Box::pin(async move {
        let page = store.read(&channels, after, limit).await?;
        let bounds = store.bounds().await?;
        Ok((page, bounds))
    })
}
