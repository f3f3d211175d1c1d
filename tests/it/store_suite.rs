//! The store test suite: the same tests against every `Store`, opened the
//! way `serve` opens it (`store::open` with a URL). Each test gets a fresh
//! log: a new SQLite file, or a new PostgreSQL database.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use pushgate::config::StoreConfig;
use pushgate::store::{
    self, Appended, AttemptOutcome, AttemptStatus, Bounds, ClaimWant, CommitFeed, Delivery,
    EndpointPatch, Event, Health, INBOUND_CAPPED_KEEP, InboundFilter, InboundStatus, NewDelivery,
    NewEndpoint, NewInbound, NewMessage, NextStep, OutboxAdvance, QueueStats, Retention, Seq,
    Store, StoreError, now_ms,
};
use serde_json::value::RawValue;

use crate::pg::PgTestDb;

/// A fresh log that can be opened (and reopened) by URL.
pub enum Log {
    Sqlite(tempfile::TempDir),
    Postgres(PgTestDb),
}

impl Log {
    pub async fn sqlite() -> Log {
        Log::Sqlite(tempfile::tempdir().unwrap())
    }

    pub async fn postgres() -> Log {
        Log::Postgres(PgTestDb::create().await)
    }

    pub fn url(&self) -> String {
        match self {
            Log::Sqlite(dir) => format!("sqlite://{}/log.db", dir.path().display()),
            Log::Postgres(db) => db.url.clone(),
        }
    }

    pub async fn open(&self) -> (Arc<dyn Store>, CommitFeed) {
        let config = StoreConfig {
            url: self.url(),
            pool_size: 4,
            ..StoreConfig::default()
        };
        store::open(&config).await.expect("open store")
    }
}

fn msg(channel: &str, id: Option<&str>) -> NewMessage {
    NewMessage {
        channels: vec![channel.into()],
        kind: "t".into(),
        source: "publish".into(),
        source_id: id.map(str::to_string),
        key_scope: String::new(),
        data: RawValue::from_string("{\"n\":1}".into()).unwrap(),
    }
}

fn appended(seqs: Vec<Seq>, duplicate: bool) -> Appended {
    Appended { seqs, duplicate }
}

/// Receives from the feed until `count` events arrived (or panics after 10 s).
async fn feed_events(feed: &mut CommitFeed, count: usize) -> Vec<Event> {
    let mut got = Vec::new();
    while got.len() < count {
        let batch = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .unwrap_or_else(|_| panic!("feed delivered {} of {count} events", got.len()))
            .expect("feed open");
        got.extend(batch.iter().cloned());
    }
    got
}

pub async fn append_read_dedupe_and_reopen(log: Log) {
    let (store, mut feed) = log.open().await;
    let out = store
        .append(vec![
            msg("a", Some("k1")),
            msg("b", None),
            msg("a", Some("k1")),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], appended(vec![1], false));
    assert_eq!(out[1], appended(vec![2], false));
    assert_eq!(out[2], appended(vec![1], true));
    let fed = feed_events(&mut feed, 2).await;
    assert_eq!(fed.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2]);

    let page = store.read(&["a".into()], 0, 10).await.unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].data.get(), "{\"n\":1}");
    assert_eq!(page.events[0].source_id.as_deref(), Some("k1"));
    assert_eq!(page.scanned_to, 2);
    let page = store.read(&["a".into(), "b".into()], 0, 1).await.unwrap();
    assert_eq!(
        page.scanned_to, 1,
        "a full page resumes after its last event"
    );
    assert_eq!(
        store.bounds().await.unwrap(),
        Bounds {
            pruned_through: 0,
            head: 2
        }
    );

    let tag = store.log_tag().to_string();
    store.close().await;
    assert!(
        matches!(
            store.append(vec![msg("a", None)]).await,
            Err(StoreError::Closed)
        ),
        "appends after close fail with Closed"
    );
    let (store, _feed) = log.open().await;
    assert_eq!(store.log_tag(), tag, "the log keeps its identity");
    let out = store
        .append(vec![msg("a", Some("k1")), msg("a", None)])
        .await
        .unwrap();
    assert!(out[0].duplicate);
    assert_eq!(out[1].seqs, vec![3], "seqs continue after a restart");
    store.close().await;
}

pub async fn prune_keeps_seqs_monotonic_and_dedupe_outlives_events(log: Log) {
    let (store, _feed) = log.open().await;
    store
        .append(vec![msg("a", Some("k")), msg("a", None)])
        .await
        .unwrap();
    let removed = store
        .prune(Retention {
            max_age_ms: -1_000_000,
            max_events: 0,
            dedupe_window_ms: i64::MAX,
        })
        .await
        .unwrap();
    assert_eq!(removed, 2);
    assert_eq!(
        store.bounds().await.unwrap(),
        Bounds {
            pruned_through: 2,
            head: 2
        }
    );
    let out = store
        .append(vec![msg("a", Some("k")), msg("a", None)])
        .await
        .unwrap();
    assert!(out[0].duplicate, "dedupe survives retention");
    assert_eq!(out[1].seqs, vec![3], "an emptied log never reuses a seq");
    store.close().await;
    let (store, _feed) = log.open().await;
    assert_eq!(store.bounds().await.unwrap().head, 3);
    store
        .prune(Retention {
            max_age_ms: i64::MAX,
            max_events: 0,
            dedupe_window_ms: -1_000_000,
        })
        .await
        .unwrap();
    let out = store.append(vec![msg("a", Some("k"))]).await.unwrap();
    assert!(
        !out[0].duplicate,
        "past the dedupe window a key is new again"
    );
    store.close().await;
}

pub async fn prune_by_count_keeps_the_newest(log: Log) {
    let (store, _feed) = log.open().await;
    let batch: Vec<NewMessage> = (0..10).map(|_| msg("a", None)).collect();
    store.append(batch).await.unwrap();
    let removed = store
        .prune(Retention {
            max_age_ms: i64::MAX,
            max_events: 4,
            dedupe_window_ms: i64::MAX,
        })
        .await
        .unwrap();
    assert_eq!(removed, 6);
    assert_eq!(
        store.bounds().await.unwrap(),
        Bounds {
            pruned_through: 6,
            head: 10
        }
    );
    let page = store.read(&["a".into()], 0, 100).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![7, 8, 9, 10]
    );
    store.close().await;
}

pub async fn batches_are_consecutive_and_multi_channel_messages_share_a_key(log: Log) {
    let (store, mut feed) = log.open().await;
    let mut fanned = msg("a", Some("wh_1"));
    fanned.channels = vec!["a".into(), "b".into(), "c".into()];
    let out = store
        .append(vec![msg("x", None), fanned.clone(), msg("y", None)])
        .await
        .unwrap();
    assert_eq!(out[0], appended(vec![1], false));
    assert_eq!(out[1], appended(vec![2, 3, 4], false));
    assert_eq!(out[2], appended(vec![5], false));
    let again = store.append(vec![fanned]).await.unwrap();
    assert_eq!(
        again[0],
        appended(vec![2], true),
        "a duplicate answers with the first cursor"
    );
    let fed = feed_events(&mut feed, 5).await;
    let channels: Vec<&str> = fed.iter().map(|e| e.channel.as_str()).collect();
    assert_eq!(channels, ["x", "a", "b", "c", "y"]);
    let page = store.read(&["c".into(), "y".into()], 2, 100).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![4, 5]
    );
    assert_eq!(page.scanned_to, 5);
    let page = store.read(&["nobody".into()], 0, 100).await.unwrap();
    assert!(page.events.is_empty());
    assert_eq!(page.scanned_to, 5, "an empty page scanned to the head");
    store.close().await;
}

/// Many concurrent appenders: every seq is used once, densely; the feed
/// delivers each event once, in order; a key raced by many is stored once.
pub async fn concurrent_appends_are_dense_ordered_and_deduped(log: Log) {
    let (store, mut feed) = log.open().await;
    let mut tasks = Vec::new();
    for t in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..20 {
                let batch = vec![msg(&format!("c{}", (t + i) % 3), None); 1 + (i % 3)];
                out.extend(store.append(batch).await.unwrap());
                out.extend(
                    store
                        .append(vec![msg("race", Some("the-key"))])
                        .await
                        .unwrap(),
                );
            }
            out
        }));
    }
    let mut all: Vec<Appended> = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let fresh_keys = all
        .iter()
        .filter(|a| !a.duplicate)
        .flat_map(|a| a.seqs.iter().copied())
        .collect::<Vec<_>>();
    let unique: HashSet<Seq> = fresh_keys.iter().copied().collect();
    assert_eq!(unique.len(), fresh_keys.len(), "no seq is handed out twice");
    let total = fresh_keys.len();
    assert_eq!(
        *unique.iter().max().unwrap() as usize,
        total,
        "seqs are dense"
    );
    let dupes = all.iter().filter(|a| a.duplicate).count();
    assert_eq!(dupes, 16 * 20 - 1, "the raced key is stored exactly once");
    let firsts: HashSet<Seq> = all
        .iter()
        .filter(|a| a.duplicate)
        .map(|a| a.seqs[0])
        .collect();
    assert_eq!(
        firsts.len(),
        1,
        "every duplicate names the same first cursor"
    );

    let fed = feed_events(&mut feed, total).await;
    assert_eq!(
        fed.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=total as Seq).collect::<Vec<_>>(),
        "the feed carries every event once, in log order"
    );
    store.close().await;
}

fn inbound(body: &str, reason: Option<&str>) -> NewInbound {
    NewInbound {
        source: "stripe".into(),
        headers: vec![("stripe-signature".into(), "t=1,v1=00".into())],
        body: bytes::Bytes::copy_from_slice(body.as_bytes()),
        body_size: body.len() as u64,
        reason: reason.map(str::to_string),
        detail: reason.map(|r| format!("because {r}")),
    }
}

/// The inspector's records (`append_webhook`, `record_rejected`, reads and
/// retention), the same on every store.
pub async fn webhook_records_live_with_their_events(log: Log) {
    let (store, mut feed) = log.open().await;
    let mut m = msg("user:1", Some("evt_1"));
    m.channels.push("billing".into());
    m.source = "stripe".into();
    let (first, id) = store
        .append_webhook(m.clone(), inbound("{\"n\":1}", None))
        .await
        .unwrap();
    assert_eq!(first, appended(vec![1, 2], false));
    assert_eq!(
        feed_events(&mut feed, 2).await.len(),
        2,
        "fed like any append"
    );
    // A trailing newline: the body is not the stored data, so it is kept apart.
    let (dup, dup_id) = store
        .append_webhook(m, inbound("{\"n\":1}\n", None))
        .await
        .unwrap();
    assert_eq!(dup, appended(vec![1], true));
    assert!(dup_id > id, "ids increase");
    let rejected = store
        .record_rejected(inbound("junk", Some("invalid_signature")))
        .await
        .unwrap();
    assert!(rejected > dup_id);

    let got = store.get_inbound(id).await.unwrap().unwrap();
    assert_eq!(got.status, InboundStatus::Accepted);
    assert!(!got.duplicate);
    assert_eq!(
        got.body.as_deref(),
        Some(&b"{\"n\":1}"[..]),
        "read back whole"
    );
    assert_eq!(
        got.headers,
        vec![("stripe-signature".to_string(), "t=1,v1=00".to_string())]
    );
    assert_eq!(got.seqs, vec![1, 2]);
    assert_eq!(got.channels, vec!["user:1", "billing"]);
    assert_eq!(got.source_id.as_deref(), Some("evt_1"));
    assert_eq!(got.kind.as_deref(), Some("t"));
    let got = store.get_inbound(dup_id).await.unwrap().unwrap();
    assert!(got.duplicate);
    assert_eq!(got.seqs, vec![1]);
    assert_eq!(got.body.as_deref(), Some(&b"{\"n\":1}\n"[..]));
    let got = store.get_inbound(rejected).await.unwrap().unwrap();
    assert_eq!(got.status, InboundStatus::Rejected);
    assert_eq!(got.reason.as_deref(), Some("invalid_signature"));
    assert_eq!(got.detail.as_deref(), Some("because invalid_signature"));
    assert_eq!(got.body.as_deref(), Some(&b"junk"[..]));
    assert_eq!(store.get_inbound(rejected + 1000).await.unwrap(), None);

    let all = store
        .list_inbound(InboundFilter {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        all.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![rejected, dup_id, id],
        "newest first"
    );
    assert!(all.iter().all(|r| r.body.is_none() && r.headers.is_empty()));
    let only = |status, source: &str, before| InboundFilter {
        status: Some(status),
        source: Some(source.into()),
        limit: 10,
        before,
    };
    let count = |f| {
        let store = store.clone();
        async move { store.list_inbound(f).await.unwrap().len() }
    };
    assert_eq!(
        count(only(InboundStatus::Accepted, "stripe", None)).await,
        2
    );
    assert_eq!(
        count(only(InboundStatus::Accepted, "stripe", Some(dup_id))).await,
        1
    );
    assert_eq!(
        count(only(InboundStatus::Rejected, "stripe", None)).await,
        1
    );
    assert_eq!(
        count(only(InboundStatus::Rejected, "github", None)).await,
        0
    );

    // Retention takes an accepted record with its events; refusals stay.
    store
        .prune(Retention {
            max_age_ms: -1_000_000,
            max_events: 0,
            dedupe_window_ms: i64::MAX,
        })
        .await
        .unwrap();
    assert_eq!(store.get_inbound(id).await.unwrap(), None);
    assert!(store.get_inbound(rejected).await.unwrap().is_some());
    store.close().await;
}

/// Refusals and duplicates are capped by count; accepted records are not.
pub async fn inbound_refusals_are_capped_by_count(log: Log) {
    let (store, _feed) = log.open().await;
    let mut m = msg("a", Some("kept"));
    m.source = "stripe".into();
    let (_, accepted) = store.append_webhook(m, inbound("{}", None)).await.unwrap();
    // The cap is per source: a quiet source's refusal outlives a noisy one's.
    let mut quiet = inbound("quiet", Some("invalid_signature"));
    quiet.source = "github".into();
    let quiet = store.record_rejected(quiet).await.unwrap();
    let extra = 5;
    let mut last = 0;
    for i in 0..INBOUND_CAPPED_KEEP + extra {
        last = store
            .record_rejected(inbound(&format!("{i}"), Some("invalid_signature")))
            .await
            .unwrap();
    }
    let rejected = store
        .list_inbound(InboundFilter {
            status: Some(InboundStatus::Rejected),
            source: Some("stripe".into()),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rejected.len(), INBOUND_CAPPED_KEEP);
    assert!(
        store.get_inbound(quiet).await.unwrap().is_some(),
        "another source's refusal is not pushed out"
    );
    assert_eq!(rejected[0].id, last, "the newest are kept");
    let oldest = store
        .get_inbound(rejected.last().unwrap().id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(oldest.body.as_deref(), Some(format!("{extra}").as_bytes()));
    assert!(
        store.get_inbound(accepted).await.unwrap().is_some(),
        "accepted records are not counted against the cap"
    );
    store.close().await;
}

// ---- outbound webhooks: endpoints, the outbox cursor, the delivery queue ----

pub fn new_endpoint(id: &str) -> NewEndpoint {
    NewEndpoint {
        id: id.into(),
        url: "http://example.com/".into(),
        channels: vec!["a".into()],
        types: vec![],
        description: String::new(),
        enabled: true,
        rate_limit: None,
        secret: "whsec_x".into(),
    }
}

pub fn delivery(endpoint: &str, seq: Seq, due: i64) -> NewDelivery {
    NewDelivery {
        endpoint_id: endpoint.into(),
        seq,
        event_id: format!("{seq}-t"),
        msg_id: format!("msg_{seq}"),
        payload: bytes::Bytes::from_static(b"{}"),
        next_ms: due,
    }
}

pub fn outcome(d: &Delivery, next: NextStep, health: Health) -> AttemptOutcome {
    AttemptOutcome {
        delivery_id: d.id,
        endpoint_id: d.endpoint_id.clone(),
        event_id: d.event_id.clone(),
        msg_id: d.msg_id.clone(),
        attempt: d.attempt,
        succeeded: next == NextStep::Succeeded,
        response_status: Some(500),
        response_body: None,
        error: None,
        duration_ms: 1,
        at_ms: now_ms(),
        next,
        health,
    }
}

pub async fn outbox_cursor_claims_leases_and_attempts(log: Log) {
    let (store, _feed) = log.open().await;
    store.append(vec![msg("a", None)]).await.unwrap();
    let ep = store.create_endpoint(new_endpoint("ep_1")).await.unwrap();
    assert_eq!(ep.from_seq, 1, "an endpoint starts at the head");
    assert_eq!(store.get_endpoint("ep_1").await.unwrap(), Some(ep.clone()));
    assert_eq!(store.list_endpoints().await.unwrap(), vec![ep]);
    assert_eq!(store.get_endpoint("ep_2").await.unwrap(), None);
    assert!(
        store.create_endpoint(new_endpoint("ep_1")).await.is_err(),
        "ids are unique"
    );

    // The cursor moves only from where it is, together with its rows.
    assert_eq!(store.outbox_cursor().await.unwrap(), 0);
    let adv = |from, to| Some(OutboxAdvance { from, to });
    assert!(
        !store
            .enqueue_deliveries(vec![delivery("ep_1", 1, 0)], adv(5, 6))
            .await
            .unwrap()
    );
    assert!(
        store
            .list_attempts("ep_1", None, 10)
            .await
            .unwrap()
            .is_empty(),
        "a refused advance writes nothing"
    );
    assert!(
        store
            .enqueue_deliveries(
                vec![delivery("ep_1", 1, 0), delivery("ep_1", 2, 0)],
                adv(0, 2)
            )
            .await
            .unwrap()
    );
    assert_eq!(store.outbox_cursor().await.unwrap(), 2);

    let want = || {
        vec![ClaimWant {
            endpoint_id: "ep_1".into(),
            max: 1,
        }]
    };
    let now = now_ms();
    let c = store
        .claim_deliveries(want(), now, now + 60_000)
        .await
        .unwrap();
    assert_eq!(c.deliveries.len(), 1);
    let first = c.deliveries[0].clone();
    assert_eq!(
        (first.seq, first.attempt, first.url.as_str()),
        (1, 1, "http://example.com/")
    );
    assert_eq!(
        c.next_due,
        vec![("ep_1".to_string(), Some(0))],
        "the second row is due"
    );
    let c = store
        .claim_deliveries(want(), now, now + 60_000)
        .await
        .unwrap();
    assert_eq!(c.deliveries[0].seq, 2, "a leased row is not claimed twice");
    assert_eq!(
        c.next_due[0].1,
        Some(now + 60_000),
        "next due: the lease's end"
    );
    assert!(
        store
            .claim_deliveries(want(), now, now + 60_000)
            .await
            .unwrap()
            .deliveries
            .is_empty()
    );

    // The first fails and is rescheduled; the endpoint starts failing.
    store
        .record_attempts(vec![outcome(
            &first,
            NextStep::RetryAt(now - 1),
            Health::Failed,
        )])
        .await
        .unwrap();
    let e = store.get_endpoint("ep_1").await.unwrap().unwrap();
    assert!(e.failing_since_ms.is_some());
    let again = store
        .claim_deliveries(want(), now, now + 60_000)
        .await
        .unwrap()
        .deliveries;
    assert_eq!((again[0].seq, again[0].attempt), (1, 2));
    // A result from the lost first lease changes nothing; the holder's does.
    store
        .record_attempts(vec![outcome(&first, NextStep::GiveUp, Health::Failed)])
        .await
        .unwrap();
    let pending = store
        .list_attempts("ep_1", Some(AttemptStatus::Pending), 10)
        .await
        .unwrap();
    assert_eq!(pending.len(), 2, "{pending:?}");
    store
        .record_attempts(vec![outcome(
            &again[0],
            NextStep::Succeeded,
            Health::Succeeded,
        )])
        .await
        .unwrap();
    let e = store.get_endpoint("ep_1").await.unwrap().unwrap();
    assert_eq!(e.failing_since_ms, None, "a success clears the failure");
    let all = store.list_attempts("ep_1", None, 10).await.unwrap();
    let shape: Vec<(&str, u32)> = all.iter().map(|a| (a.status.as_str(), a.attempt)).collect();
    assert_eq!(
        shape,
        [
            ("pending", 2),
            ("succeeded", 2),
            ("failed", 1),
            ("failed", 1)
        ]
    );
    let failed = store
        .list_attempts("ep_1", Some(AttemptStatus::Failed), 10)
        .await
        .unwrap();
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0].response_status, Some(500));

    // A lease held when its node died comes back: on SQLite (one process
    // owns the log) at the next open, on PostgreSQL (other nodes may hold
    // leases) when it ends.
    store.close().await;
    let (store, _feed) = log.open().await;
    let at = match log {
        Log::Sqlite(_) => now_ms(),
        Log::Postgres(_) => {
            let still_held = store
                .claim_deliveries(want(), now_ms(), now_ms() + 60_000)
                .await
                .unwrap();
            assert!(still_held.deliveries.is_empty(), "a live lease is kept");
            now + 60_001
        }
    };
    let c = store
        .claim_deliveries(want(), at, at + 60_000)
        .await
        .unwrap();
    assert_eq!((c.deliveries[0].seq, c.deliveries[0].attempt), (2, 2));

    // Patching: rotation keeps the previous secret until it expires.
    let e = store
        .update_endpoint(
            "ep_1",
            EndpointPatch {
                url: Some("http://example.org/x".into()),
                rate_limit: Some(Some(7)),
                rotate: Some(pushgate::store::SecretRotation {
                    secret: "whsec_y".into(),
                    previous_expires_ms: now_ms() + 60_000,
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.url.as_str(), e.rate_limit, e.secrets.len()),
        ("http://example.org/x", Some(7), 2)
    );
    assert_eq!(e.secrets[0].secret, "whsec_y");
    assert_eq!(store.get_endpoint("ep_1").await.unwrap(), Some(e));
    assert!(
        store
            .update_endpoint("ep_2", EndpointPatch::default())
            .await
            .unwrap()
            .is_none()
    );

    // Disabling stops claims; deleting removes everything.
    let e = store
        .update_endpoint(
            "ep_1",
            EndpointPatch {
                enabled: Some(false),
                disabled_reason: Some("why".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (e.enabled, e.disabled_reason.as_deref()),
        (false, Some("why"))
    );
    store
        .enqueue_deliveries(vec![delivery("ep_1", 3, 0)], None)
        .await
        .unwrap();
    let c = store
        .claim_deliveries(want(), now_ms(), now_ms() + 1)
        .await
        .unwrap();
    assert!(c.deliveries.is_empty());
    assert_eq!(c.next_due, vec![("ep_1".to_string(), None)]);
    assert!(
        store.prune_deliveries(now_ms() + 1).await.unwrap() >= 3,
        "finished rows and attempts go"
    );
    assert!(store.delete_endpoint("ep_1").await.unwrap());
    assert!(!store.delete_endpoint("ep_1").await.unwrap());
    assert!(
        store
            .list_attempts("ep_1", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.list_endpoints().await.unwrap().is_empty());
    store.close().await;
}

/// Keys are unique per `(source, key_scope)`: another publisher's key
/// stores its own event, the same publisher's repeat is a duplicate of its
/// first — in one batch or across batches.
pub async fn idempotency_keys_are_scoped_to_their_publisher(log: Log) {
    let (store, _feed) = log.open().await;
    let scoped = |scope: &str, channel: &str| NewMessage {
        key_scope: scope.into(),
        ..msg(channel, Some("order-123"))
    };
    let out = store
        .append(vec![
            scoped("sub:browser", "chat"),
            scoped("key:backend", "user"),
        ])
        .await
        .unwrap();
    assert_eq!(out[0], appended(vec![1], false));
    assert_eq!(out[1], appended(vec![2], false), "another publisher's key");
    let out = store
        .append(vec![
            scoped("key:backend", "user"),
            scoped("", "user"),
            scoped("", "other"),
        ])
        .await
        .unwrap();
    assert_eq!(
        out[0],
        appended(vec![2], true),
        "the same publisher repeats"
    );
    assert_eq!(out[1], appended(vec![3], false));
    assert_eq!(out[2], appended(vec![3], true), "within one batch too");
    assert_eq!(store.bounds().await.unwrap().head, 3);
    store.close().await;
}

/// The queue's depth and earliest due time count pending work only: a
/// finished delivery leaves them.
pub async fn queue_stats_count_pending_work(log: Log) {
    let (store, _feed) = log.open().await;
    assert_eq!(store.queue_stats().await.unwrap(), QueueStats::default());
    store.create_endpoint(new_endpoint("ep_1")).await.unwrap();
    let batch = vec![delivery("ep_1", 1, 1_000), delivery("ep_1", 2, 2_000)];
    assert!(store.enqueue_deliveries(batch, None).await.unwrap());
    assert_eq!(
        store.queue_stats().await.unwrap(),
        QueueStats {
            depth: 2,
            first_due_ms: Some(1_000)
        }
    );
    let want = vec![ClaimWant {
        endpoint_id: "ep_1".into(),
        max: 1,
    }];
    let now = now_ms();
    let claimed = store
        .claim_deliveries(want, now, now + 60_000)
        .await
        .unwrap();
    let d = &claimed.deliveries[0];
    store
        .record_attempts(vec![outcome(d, NextStep::Succeeded, Health::Succeeded)])
        .await
        .unwrap();
    assert_eq!(
        store.queue_stats().await.unwrap(),
        QueueStats {
            depth: 1,
            first_due_ms: Some(2_000)
        },
        "the finished one left"
    );
    store.close().await;
}

macro_rules! store_suite {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Log::sqlite().await).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Log::postgres().await).await;
                }
            )*
        }
    };
}

store_suite!(
    append_read_dedupe_and_reopen,
    prune_keeps_seqs_monotonic_and_dedupe_outlives_events,
    prune_by_count_keeps_the_newest,
    batches_are_consecutive_and_multi_channel_messages_share_a_key,
    concurrent_appends_are_dense_ordered_and_deduped,
    webhook_records_live_with_their_events,
    inbound_refusals_are_capped_by_count,
    outbox_cursor_claims_leases_and_attempts,
    idempotency_keys_are_scoped_to_their_publisher,
    queue_stats_count_pending_work,
);
