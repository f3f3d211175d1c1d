//! Contract 1, tested once, hard: a property test drives a `Feed` over a
//! real SQLite log while several writers append concurrently, the hub's
//! queue overflows (lag), the reader reconnects from arbitrary cursors and
//! retention prunes the log. Whatever the interleaving, every session of the
//! reader yields each event of its channels at most once, in log order, with
//! no gap, and a reset only when its cursor truly fell out of the log.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use pushgate::config::StoreConfig;
use pushgate::feed::{Bound, Closure, Feed, Item};
use pushgate::hub::Hub;
use pushgate::store::{self, NewMessage, ResetReason, Retention, Seq, Store, format_cursor};
use serde_json::value::RawValue;

const CHANNELS: [&str; 3] = ["a", "b", "c"];
/// The reader subscribes to these; "c" is traffic it must never see.
const SUBSCRIBED: [&str; 2] = ["a", "b"];
/// A small hub queue, so bursts overflow it (lag) often.
const HUB_QUEUE: usize = 4;

/// One append call: messages of (channel, payload size), appended atomically
/// by a writer of its own after it has yielded this many times.
type AppendCall = (u8, Vec<(usize, usize)>);

#[derive(Debug, Clone)]
enum Cursor {
    /// Where the last session stopped: an ordinary reconnect.
    Resume,
    /// `seq-tag` for a seq chosen as a fraction of the known head (may be
    /// pruned by now).
    Seq(u8),
    Ahead,
    Foreign,
    Garbage,
    Earliest,
    Now,
}

#[derive(Debug, Clone)]
enum Step {
    /// A new writer starts appending, concurrently with everything else.
    Append(AppendCall),
    /// Poll the feed up to this many times without waiting for the log.
    Read(u8),
    /// Let writers and log reads run.
    Yield(u8),
    /// Retention keeps only the newest `n` events.
    Prune(u8),
    Reconnect(Cursor),
}

#[derive(Debug, Clone)]
struct Plan {
    steps: Vec<Step>,
    bound: (usize, usize),
    start: Cursor,
}

fn append_call() -> impl Strategy<Value = AppendCall> {
    (
        0u8..40,
        prop::collection::vec((0..CHANNELS.len(), 0usize..300), 1..8),
    )
}

fn cursor() -> impl Strategy<Value = Cursor> {
    prop_oneof![
        4 => Just(Cursor::Resume),
        3 => any::<u8>().prop_map(Cursor::Seq),
        1 => Just(Cursor::Ahead),
        1 => Just(Cursor::Foreign),
        1 => Just(Cursor::Garbage),
        1 => Just(Cursor::Earliest),
        1 => Just(Cursor::Now),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => append_call().prop_map(Step::Append),
        6 => (1u8..12).prop_map(Step::Read),
        3 => (1u8..6).prop_map(Step::Yield),
        1 => (1u8..30).prop_map(Step::Prune),
        2 => cursor().prop_map(Step::Reconnect),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        prop::collection::vec(step(), 1..60),
        (1usize..8, 100usize..2000),
        cursor(),
    )
        .prop_map(|(steps, bound, start)| Plan {
            steps,
            bound,
            start,
        })
}

/// What one session (one open feed) yielded, checked at the end against
/// the complete record of what was committed.
#[derive(Debug, Default)]
struct Session {
    start: Seq,
    seen: Vec<Seen>,
}

#[derive(Debug)]
enum Seen {
    Event(Seq, String),
    Cursor(Seq),
    /// A reset to `resume_from`, and the log's `pruned_through` when it was seen.
    Reset(Seq, Seq),
}

struct Reader {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    bound: Bound,
    feed: Option<Feed>,
    sessions: Vec<Session>,
}

impl Reader {
    fn channels() -> Vec<String> {
        SUBSCRIBED.iter().map(|c| c.to_string()).collect()
    }

    /// Where the current session stands.
    fn pos(&self) -> Seq {
        let s = self.sessions.last().expect("a session");
        s.seen
            .iter()
            .rev()
            .map(|x| match x {
                Seen::Event(s, _) | Seen::Cursor(s) | Seen::Reset(s, _) => *s,
            })
            .next()
            .unwrap_or(s.start)
    }

    async fn open(&mut self, choice: &Cursor, known_head: Seq) -> Result<(), TestCaseError> {
        let tag = self.store.log_tag().to_string();
        let resume = self.sessions.last().map(|_| self.pos());
        self.feed = None;
        let text = match choice {
            Cursor::Resume => resume.map(|p| format_cursor(p, &tag)),
            Cursor::Seq(f) => Some(format_cursor(known_head * (*f as i64) / 255, &tag)),
            Cursor::Ahead => Some(format_cursor(known_head + 1_000_000, &tag)),
            Cursor::Foreign => Some(format_cursor(1, "someotherlog")),
            Cursor::Garbage => Some("not-a-cursor".into()),
            Cursor::Earliest => Some("earliest".into()),
            Cursor::Now => None,
        };
        // Pruning happens only between steps, so this is stable while opening.
        let bounds = self.store.bounds().await.expect("bounds");
        let expected_reset = match (choice, &text) {
            (Cursor::Ahead, _) => Some(ResetReason::Ahead),
            (Cursor::Foreign, _) => Some(ResetReason::ForeignLog),
            (Cursor::Garbage, _) => Some(ResetReason::Unparsable),
            (Cursor::Resume | Cursor::Seq(_), Some(t)) => {
                let seq: Seq = t.split_once('-').unwrap().0.parse().unwrap();
                (seq < bounds.pruned_through).then_some(ResetReason::Expired)
            }
            _ => None,
        };
        let mut feed = Feed::open(
            &self.hub,
            &self.store,
            &Self::channels(),
            text.as_deref(),
            self.bound,
            metrics::Counter::noop(),
        )
        .await
        .expect("feed opens");
        let start = feed.cursor();
        if let Some(reason) = expected_reset {
            match feed.next().await {
                Some(Item::Reset {
                    reason: got,
                    resume_from,
                }) => {
                    prop_assert_eq!(got, reason, "reset reason at open");
                    prop_assert_eq!(resume_from, bounds.pruned_through);
                    prop_assert_eq!(start, bounds.pruned_through);
                }
                other => {
                    return Err(TestCaseError::fail(format!(
                        "cursor {text:?} with bounds {bounds:?}: expected a {reason:?} reset first, got {other:?}"
                    )));
                }
            }
        }
        self.sessions.push(Session {
            start,
            seen: Vec::new(),
        });
        self.feed = Some(feed);
        Ok(())
    }

    async fn record(&mut self, item: Item) {
        let session = self.sessions.last_mut().expect("a session");
        match item {
            Item::Events(batch) => {
                for e in &batch.events {
                    let envelope: serde_json::Value = serde_json::from_slice(&e.json).unwrap();
                    let channel = envelope["channel"].as_str().unwrap().to_string();
                    session.seen.push(Seen::Event(e.seq, channel));
                }
                session.seen.push(Seen::Cursor(batch.cursor));
            }
            Item::Reset { resume_from, .. } => {
                let pruned = self.store.bounds().await.expect("bounds").pruned_through;
                session.seen.push(Seen::Reset(resume_from, pruned));
            }
            Item::CaughtUp | Item::Heartbeat => {}
            Item::Closed(Closure::Shutdown) => panic!("the hub never closes here"),
            Item::Closed(Closure::Store(e)) => panic!("log read failed: {e}"),
        }
    }

    /// Polls without waiting: whatever is ready now.
    async fn read(&mut self, polls: u8) {
        for _ in 0..polls {
            let feed = self.feed.as_mut().expect("open");
            let polled =
                std::future::poll_fn(|cx| std::task::Poll::Ready(feed.poll_next(cx))).await;
            match polled {
                std::task::Poll::Ready(Some(item)) => self.record(item).await,
                std::task::Poll::Ready(None) => panic!("feed ended"),
                std::task::Poll::Pending => tokio::task::yield_now().await,
            }
        }
    }

    /// Reads until the session has seen `target`, or fails after a long wait.
    async fn drain_to(&mut self, target: Seq) -> Result<(), TestCaseError> {
        while self.pos() < target {
            let feed = self.feed.as_mut().expect("open");
            match tokio::time::timeout(Duration::from_secs(5), feed.next()).await {
                Ok(Some(item)) => self.record(item).await,
                Ok(None) => return Err(TestCaseError::fail("feed ended")),
                Err(_) => {
                    return Err(TestCaseError::fail(format!(
                        "stuck at {} short of {target}: an event was never delivered",
                        self.pos()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The oracle: every session against everything that was committed.
fn check(sessions: &[Session], committed: &BTreeMap<Seq, String>) -> Result<(), TestCaseError> {
    let wanted = |lo: Seq, hi: Seq| -> Option<Seq> {
        committed
            .range(lo + 1..hi)
            .find(|(_, ch)| SUBSCRIBED.contains(&ch.as_str()))
            .map(|(s, _)| *s)
    };
    for (n, session) in sessions.iter().enumerate() {
        let mut pos = session.start;
        for seen in &session.seen {
            match seen {
                Seen::Event(seq, channel) => {
                    prop_assert!(
                        SUBSCRIBED.contains(&channel.as_str()),
                        "session {n}: event {seq} of unsubscribed channel {channel}"
                    );
                    prop_assert!(
                        *seq > pos,
                        "session {n}: event {seq} at or below the cursor {pos} (repeat or out of order)"
                    );
                    if let Some(missed) = wanted(pos, *seq) {
                        return Err(TestCaseError::fail(format!(
                            "session {n}: gap: event {missed} skipped between {pos} and {seq}"
                        )));
                    }
                    prop_assert_eq!(
                        committed.get(seq),
                        Some(channel),
                        "session {}: event {} was committed to its channel",
                        n,
                        seq
                    );
                    pos = *seq;
                }
                Seen::Cursor(cursor) => {
                    prop_assert!(
                        *cursor >= pos,
                        "session {n}: cursor {cursor} went back from {pos}"
                    );
                    if let Some(missed) = wanted(pos, *cursor + 1) {
                        return Err(TestCaseError::fail(format!(
                            "session {n}: gap: cursor {cursor} skipped event {missed} after {pos}"
                        )));
                    }
                    pos = *cursor;
                }
                Seen::Reset(resume_from, pruned) => {
                    prop_assert!(
                        *resume_from > pos && *resume_from <= *pruned,
                        "session {n}: reset to {resume_from} at {pos} with pruned_through {pruned}: the cursor had not fallen out"
                    );
                    pos = *resume_from;
                }
            }
        }
    }
    Ok(())
}

async fn run(plan: Plan) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        url: format!("sqlite://{}/log.db", dir.path().display()),
        synchronous: "normal".into(),
        ..StoreConfig::default()
    };
    let (store, mut commits) = store::open(&config).await.expect("open store");
    let hub = Arc::new(Hub::new(store.log_tag(), HUB_QUEUE));
    let pump = {
        let hub = hub.clone();
        tokio::spawn(async move {
            while let Some(batch) = commits.recv().await {
                hub.dispatch(&batch);
            }
        })
    };
    let committed: Arc<Mutex<BTreeMap<Seq, String>>> = Arc::default();
    let append = |w: usize, (pause, call): AppendCall| {
        let store = store.clone();
        let committed = committed.clone();
        tokio::spawn(async move {
            for _ in 0..pause {
                tokio::task::yield_now().await;
            }
            let messages: Vec<NewMessage> = call
                .iter()
                .map(|(ch, size)| NewMessage {
                    channels: vec![CHANNELS[*ch].to_string()],
                    kind: "t".into(),
                    source: format!("writer{w}"),
                    source_id: None,
                    key_scope: String::new(),
                    data: RawValue::from_string(format!("\"{}\"", "x".repeat(*size))).unwrap(),
                })
                .collect();
            let appended = store.append(messages).await.expect("append");
            let mut map = committed.lock().unwrap();
            for (a, (ch, _)) in appended.iter().zip(&call) {
                map.insert(a.seqs[0], CHANNELS[*ch].to_string());
            }
        })
    };
    let mut writers = Vec::new();
    let mut reader = Reader {
        store: store.clone(),
        hub: hub.clone(),
        bound: Bound {
            events: plan.bound.0,
            bytes: plan.bound.1,
        },
        feed: None,
        sessions: Vec::new(),
    };
    let known_head = || {
        committed
            .lock()
            .unwrap()
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
    };
    reader.open(&plan.start, known_head()).await?;
    for step in &plan.steps {
        match step {
            Step::Append(call) => writers.push(append(writers.len(), call.clone())),
            Step::Read(n) => reader.read(*n).await,
            Step::Yield(n) => {
                for _ in 0..*n {
                    tokio::task::yield_now().await;
                }
            }
            Step::Prune(keep) => {
                store
                    .prune(Retention {
                        max_age_ms: i64::MAX,
                        max_events: *keep as u64,
                        dedupe_window_ms: i64::MAX,
                    })
                    .await
                    .expect("prune");
            }
            Step::Reconnect(choice) => reader.open(choice, known_head()).await?,
        }
    }
    for w in writers {
        w.await.expect("writer");
    }
    // Everything is committed: the last session must reach the last event of
    // its channels (or be reset past it).
    let target = {
        let map = committed.lock().unwrap();
        map.iter()
            .rev()
            .find(|(_, ch)| SUBSCRIBED.contains(&ch.as_str()))
            .map(|(s, _)| *s)
            .unwrap_or(0)
    };
    let result = reader.drain_to(target).await;
    let committed = committed.lock().unwrap().clone();
    let sessions = std::mem::take(&mut reader.sessions);
    drop(reader);
    pump.abort();
    store.close().await;
    result?;
    check(&sessions, &committed)?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn feed_is_exactly_once_in_order_without_gaps(plan in plan()) {
        // Two workers: writers, the commit pump and the reader really run
        // at the same time, so interleavings vary beyond what the plan says.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(plan))?;
    }
}
