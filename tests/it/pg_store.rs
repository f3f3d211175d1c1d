//! What only a shared PostgreSQL log must do: several stores (nodes) on one
//! database agree on one log, and cursor order is visibility order however
//! many of them append at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pushgate::store::postgres::PostgresStore;
use pushgate::store::{CommitFeed, EventLog, NewMessage, OutboundQueue, Seq, StoreError};
use serde_json::value::RawValue;
use sqlx::{Connection, Executor};

use crate::pg::PgTestDb;

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

async fn node(db: &PgTestDb) -> (Arc<PostgresStore>, CommitFeed) {
    let (store, feed) = PostgresStore::open(&db.url, 4).await.expect("open");
    (Arc::new(store), feed)
}

async fn drain_until(feed: &mut CommitFeed, head: Seq) -> Vec<Seq> {
    let mut seqs = Vec::new();
    while seqs.last().copied().unwrap_or(0) < head {
        let batch = tokio::time::timeout(Duration::from_secs(10), feed.recv())
            .await
            .unwrap_or_else(|_| panic!("feed stopped at {:?} before {head}", seqs.last()))
            .expect("feed open");
        seqs.extend(batch.iter().map(|e| e.seq));
    }
    seqs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once_and_share_one_log() {
    let db = PgTestDb::create().await;
    let opened = futures_util::future::join_all((0..4).map(|_| node(&db))).await;
    let tag = opened[0].0.log_tag().to_string();
    assert!(opened.iter().all(|(s, _)| s.log_tag() == tag), "one tag");
    let mut c = db.connect().await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(
        applied,
        std::fs::read_dir("migrations/postgres").unwrap().count() as i64
    );

    // An event appended on one node reaches every node's feed.
    let mut stores = Vec::new();
    let mut feeds = Vec::new();
    for (s, f) in opened {
        stores.push(s);
        feeds.push(f);
    }
    stores[0].append(vec![msg("a", None)]).await.unwrap();
    stores[3].append(vec![msg("b", None)]).await.unwrap();
    for feed in &mut feeds {
        assert_eq!(drain_until(feed, 2).await, vec![1, 2]);
    }
    for s in &stores {
        s.close().await;
    }
}

/// The reason the append lock exists. Writers on three nodes append as fast
/// as they can while a reader keeps resuming "after the last seq it saw",
/// exactly as a client with a cursor does. With a plain sequence a
/// transaction can take seq N, commit after N+1, and the reader skips it
/// forever; here the reader must see every seq, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_resuming_from_its_cursor_never_skips_a_seq() {
    let db = PgTestDb::create().await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(node(&db).await);
    }
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let store = nodes[1].0.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let channels = vec!["a".to_string(), "b".to_string()];
            let mut seen: Vec<Seq> = Vec::new();
            let mut after = 0;
            loop {
                let finished = done.load(Ordering::Acquire);
                let page = store.read(&channels, after, 1000).await.unwrap();
                seen.extend(page.events.iter().map(|e| e.seq));
                after = page.scanned_to;
                if finished && page.events.is_empty() {
                    return seen;
                }
            }
        })
    };
    let mut writers = Vec::new();
    for (i, (store, _)) in nodes.iter().enumerate() {
        for w in 0..8 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                for n in 0..40 {
                    let ch = if (i + w + n) % 2 == 0 { "a" } else { "b" };
                    store.append(vec![msg(ch, None)]).await.unwrap();
                }
            }));
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    done.store(true, Ordering::Release);
    let seen = reader.await.unwrap();
    let total = 3 * 8 * 40;
    assert_eq!(seen, (1..=total).collect::<Vec<Seq>>());
    // Every node's feed carries the whole log, in order.
    for (store, feed) in &mut nodes {
        assert_eq!(
            drain_until(feed, total).await,
            (1..=total).collect::<Vec<Seq>>()
        );
        store.close().await;
    }
}

/// PostgreSQL refuses a NUL character in text. A request carrying one fails
/// alone (nothing of it is written); the requests grouped with it succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_database_refuses_fails_alone() {
    let db = PgTestDb::create().await;
    let (store, _feed) = node(&db).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let key = if i == 7 {
                "bad\0key".to_string()
            } else {
                format!("k{i}")
            };
            store
                .append(vec![msg("a", None), msg("a", Some(&key))])
                .await
        }));
    }
    let mut ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(out) => {
                assert_ne!(i, 7);
                assert_eq!(out.len(), 2);
                assert_eq!(out[1].seqs[0], out[0].seqs[0] + 1, "a batch is consecutive");
                ok += 1;
            }
            // Refused as data: retrying will not help, so not transient.
            Err(e @ StoreError::Internal(_)) => {
                assert_eq!(i, 7, "only the bad request fails");
                assert!(!e.is_transient());
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(ok, 19);
    let b = store.bounds().await.unwrap();
    assert_eq!(b.head, 38, "the refused request wrote nothing");
    let page = store.read(&["a".into()], 0, 1000).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=38).collect::<Vec<_>>()
    );
    store.close().await;
}

/// Acknowledged means durable, even on a server configured otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_commit_synchronously_even_if_the_server_does_not() {
    let db = PgTestDb::create().await;
    let mut c = db.connect().await;
    c.execute(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {} SET synchronous_commit = off",
        db.name
    )))
    .await
    .unwrap();
    let _ = c.close().await;
    // Positive control: a plain session on this database does not sync.
    let mut plain = db.connect().await;
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut plain)
        .await
        .unwrap();
    assert_eq!(setting, "off");
    let _ = plain.close().await;

    let (store, _feed) = node(&db).await;
    let setting: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(setting, "on");
    store.close().await;
}

/// The mechanism, step by step: a transaction that holds the append lock
/// and has written seq N+1 but not committed yet. A reader must not get
/// past N, and an appender on a node must wait, then take N+2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_appender_waits_for_the_lock_holder_so_no_seq_is_passed_over() {
    use pushgate::store::postgres::APPEND_LOCK;
    let db = PgTestDb::create().await;
    let (store, mut feed) = node(&db).await;
    store.append(vec![msg("a", None)]).await.unwrap();

    let mut slow = db.connect().await;
    let mut tx = slow.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO events (seq, channel, type, source, source_id, time_ms, data)
         VALUES (2, 'a', 't', 'publish', NULL, 0, '{}')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("UPDATE log_state SET head = 2")
        .execute(&mut *tx)
        .await
        .unwrap();

    let appender = {
        let store = store.clone();
        tokio::spawn(async move { store.append(vec![msg("a", None)]).await })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!appender.is_finished(), "the appender waits for the lock");
    let page = store.read(&["a".into()], 1, 100).await.unwrap();
    assert!(page.events.is_empty(), "nothing after 1 is visible yet");
    assert_eq!(page.scanned_to, 1, "a reader cannot get past 1");

    tx.commit().await.unwrap();
    let out = appender.await.unwrap().unwrap();
    assert_eq!(
        out[0].seqs,
        vec![3],
        "the appender continues after the holder"
    );
    let page = store.read(&["a".into()], 1, 100).await.unwrap();
    assert_eq!(
        page.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert_eq!(drain_until(&mut feed, 3).await, vec![1, 2, 3]);
    store.close().await;
}

/// The commit feed does not depend on notifications arriving: a commit that
/// sends none (a lost notification) and a listener connection killed by the
/// server both delay events, never lose them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_notifications_and_a_dropped_listener_lose_nothing() {
    use pushgate::store::postgres::APPEND_LOCK;
    let db = PgTestDb::create().await;
    let (a, mut feed_a) = node(&db).await;
    let (b, mut feed_b) = node(&db).await;

    // An append that notifies no one.
    let mut raw = db.connect().await;
    let mut tx = raw.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(APPEND_LOCK)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO events (seq, channel, type, source, source_id, time_ms, data)
         VALUES (1, 'a', 't', 'publish', NULL, 0, '{}')",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("UPDATE log_state SET head = 1")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(drain_until(&mut feed_a, 1).await, vec![1]);
    assert_eq!(drain_until(&mut feed_b, 1).await, vec![1]);

    // Cut every node's notification connection, then append on B.
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_all(&mut raw)
    .await
    .unwrap();
    assert_eq!(killed, vec![true, true], "both listeners were cut");
    b.append(vec![msg("a", None), msg("b", None), msg("c", None)])
        .await
        .unwrap();
    assert_eq!(drain_until(&mut feed_a, 4).await, vec![2, 3, 4]);
    assert_eq!(drain_until(&mut feed_b, 4).await, vec![2, 3, 4]);
    // And the listeners come back by themselves.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
        )
        .fetch_one(&mut raw)
        .await
        .unwrap();
        if listening == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{listening} listeners"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    a.append(vec![msg("a", None)]).await.unwrap();
    assert_eq!(drain_until(&mut feed_b, 5).await, vec![5]);
    a.close().await;
    b.close().await;
}

// ---- the outbound delivery queue, shared by several nodes ----

/// Two nodes claim from one queue at the same time: while leases are valid
/// no delivery is handed out twice, and every one is handed out once; when
/// the leases end, every row is claimed again (at least once, by either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_never_claim_the_same_delivery_and_expired_leases_return() {
    use pushgate::store::{ClaimWant, now_ms};
    use std::collections::HashMap;

    let db = PgTestDb::create().await;
    let (a, _fa) = node(&db).await;
    let (b, _fb) = node(&db).await;
    const ENDPOINTS: usize = 4;
    const PER_ENDPOINT: i64 = 150;
    let mut all = Vec::new();
    for e in 0..ENDPOINTS {
        let id = format!("ep_{e}");
        a.create_endpoint(crate::store_suite::new_endpoint(&id))
            .await
            .unwrap();
        for seq in 1..=PER_ENDPOINT {
            all.push(crate::store_suite::delivery(&id, seq, 0));
        }
    }
    let total = all.len();
    assert!(a.enqueue_deliveries(all, None).await.unwrap());

    let start = now_ms();
    let lease_until = start + 600_000;
    let wants = || {
        (0..ENDPOINTS)
            .map(|e| ClaimWant {
                endpoint_id: format!("ep_{e}"),
                max: 7,
            })
            .collect::<Vec<_>>()
    };
    // Each node claims in a loop until the queue has nothing due for it.
    let drain = |store: Arc<PostgresStore>| async move {
        let mut got = Vec::new();
        let mut empty_rounds = 0;
        while empty_rounds < 3 {
            let c = store
                .claim_deliveries(wants(), start, lease_until)
                .await
                .expect("claim");
            if c.deliveries.is_empty() {
                empty_rounds += 1;
            } else {
                empty_rounds = 0;
            }
            got.extend(c.deliveries.into_iter().map(|d| (d.id, d.attempt)));
        }
        got
    };
    let (got_a, got_b) = tokio::join!(
        tokio::spawn(drain(a.clone())),
        tokio::spawn(drain(b.clone()))
    );
    let (got_a, got_b) = (got_a.unwrap(), got_b.unwrap());
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both nodes took part: {} / {}",
        got_a.len(),
        got_b.len()
    );
    let mut seen: HashMap<i64, u32> = HashMap::new();
    for (id, attempt) in got_a.iter().chain(&got_b) {
        assert_eq!(*attempt, 1, "a first claim");
        *seen.entry(*id).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "claimed twice under a valid lease: {twice:?}"
    );
    assert_eq!(seen.len(), total, "every delivery was claimed once");

    // Still leased: neither node gets anything, however often it asks.
    for store in [&a, &b] {
        let c = store
            .claim_deliveries(wants(), now_ms(), now_ms() + 1000)
            .await
            .unwrap();
        assert!(c.deliveries.is_empty());
        assert!(c.next_due.iter().all(|(_, due)| *due == Some(lease_until)));
    }

    // The leases end (the nodes "died"): the rows come back, once each.
    let after = lease_until + 1;
    let again = |store: Arc<PostgresStore>| async move {
        let mut got = Vec::new();
        loop {
            let c = store
                .claim_deliveries(wants(), after, after + 600_000)
                .await
                .unwrap();
            if c.deliveries.is_empty() {
                return got;
            }
            got.extend(c.deliveries.into_iter().map(|d| (d.id, d.attempt)));
        }
    };
    let (r_a, r_b) = tokio::join!(
        tokio::spawn(again(a.clone())),
        tokio::spawn(again(b.clone()))
    );
    let mut reclaimed: Vec<(i64, u32)> = r_a.unwrap().into_iter().chain(r_b.unwrap()).collect();
    reclaimed.sort();
    assert!(reclaimed.iter().all(|(_, attempt)| *attempt == 2));
    let mut ids: Vec<i64> = reclaimed.iter().map(|(id, _)| *id).collect();
    ids.dedup();
    assert_eq!(ids.len(), reclaimed.len(), "no row reclaimed twice");
    let mut expected: Vec<i64> = seen.into_keys().collect();
    expected.sort();
    assert_eq!(ids, expected, "every expired lease was claimed again");
    a.close().await;
    b.close().await;
}

/// Two nodes' dispatchers advance the outbox cursor from the same place at
/// once: exactly one wins, and only the winner's deliveries are queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_advance_the_outbox_cursor_once() {
    use pushgate::store::{AttemptStatus, OutboxAdvance};

    let db = PgTestDb::create().await;
    let (a, _fa) = node(&db).await;
    let (b, _fb) = node(&db).await;
    a.create_endpoint(crate::store_suite::new_endpoint("ep_1"))
        .await
        .unwrap();
    for round in 0..20i64 {
        let from = round * 10;
        let advance = Some(OutboxAdvance {
            from,
            to: from + 10,
        });
        let batch = || {
            (from + 1..=from + 10)
                .map(|seq| crate::store_suite::delivery("ep_1", seq, 0))
                .collect::<Vec<_>>()
        };
        let (ra, rb) = tokio::join!(
            a.enqueue_deliveries(batch(), advance),
            b.enqueue_deliveries(batch(), advance)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert!(
            ra ^ rb,
            "round {round}: exactly one advance wins ({ra}, {rb})"
        );
        assert_eq!(b.outbox_cursor().await.unwrap(), from + 10);
    }
    let pending = a
        .list_attempts("ep_1", Some(AttemptStatus::Pending), 1000)
        .await
        .unwrap();
    assert_eq!(pending.len(), 200, "each event's delivery queued once");
    a.close().await;
    b.close().await;
}

async fn due(c: &mut sqlx::PgConnection) -> Vec<(i64, i64)> {
    sqlx::query_as("SELECT delivery_id, next_ms FROM deliveries_due ORDER BY delivery_id")
        .fetch_all(c)
        .await
        .unwrap()
}

/// The queue's due work is a table of its own (issue 18): a pending delivery
/// has one row there, a lease moves its time, a retry keeps it at the new
/// time, a finished delivery leaves it while its history stays in
/// `deliveries`; so claims and the next-due read never walk finished work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_work_lives_in_its_own_table_and_finished_deliveries_leave_it() {
    use pushgate::store::{ClaimWant, Health, NextStep, now_ms};

    let db = PgTestDb::create().await;
    let (store, _feed) = node(&db).await;
    let mut c = db.connect().await;
    store
        .create_endpoint(crate::store_suite::new_endpoint("ep_1"))
        .await
        .unwrap();
    let batch = (1..=3)
        .map(|seq| crate::store_suite::delivery("ep_1", seq, 0))
        .collect();
    assert!(store.enqueue_deliveries(batch, None).await.unwrap());
    let queued = due(&mut c).await;
    assert_eq!(queued.len(), 3, "every new delivery is due work");

    let now = now_ms();
    let want = vec![ClaimWant {
        endpoint_id: "ep_1".into(),
        max: 10,
    }];
    let claimed = store
        .claim_deliveries(want.clone(), now, now + 60_000)
        .await
        .unwrap();
    assert_eq!(claimed.deliveries.len(), 3);
    assert!(
        due(&mut c).await.iter().all(|(_, at)| *at == now + 60_000),
        "a lease moves the due time to its end"
    );
    assert_eq!(
        claimed.next_due,
        vec![("ep_1".to_string(), Some(now + 60_000))]
    );

    let d = &claimed.deliveries;
    let outcomes = vec![
        crate::store_suite::outcome(&d[0], NextStep::Succeeded, Health::Succeeded),
        crate::store_suite::outcome(&d[1], NextStep::RetryAt(now + 5_000), Health::Failed),
        crate::store_suite::outcome(&d[2], NextStep::GiveUp, Health::Failed),
    ];
    store.record_attempts(outcomes).await.unwrap();
    assert_eq!(
        due(&mut c).await,
        vec![(d[1].id, now + 5_000)],
        "only the retry is still due work"
    );
    let history: i64 = sqlx::query_scalar("SELECT count(*) FROM deliveries")
        .fetch_one(&mut c)
        .await
        .unwrap();
    assert_eq!(history, 3, "finished deliveries stay for the attempts API");
    let pending = store
        .list_attempts("ep_1", Some(pushgate::store::AttemptStatus::Pending), 10)
        .await
        .unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].delivery_id, pending[0].at_ms),
        (d[1].id, now + 5_000)
    );

    // A stale result (a lease that was lost) changes nothing.
    let stale = crate::store_suite::outcome(&d[1], NextStep::Succeeded, Health::Succeeded);
    let again = store
        .claim_deliveries(want.clone(), now + 5_000, now + 70_000)
        .await
        .unwrap();
    assert_eq!(again.deliveries.len(), 1, "the retry comes back when due");
    store.record_attempts(vec![stale]).await.unwrap();
    assert_eq!(due(&mut c).await, vec![(d[1].id, now + 70_000)]);

    // Deleting the endpoint takes its due work with it.
    assert!(store.delete_endpoint("ep_1").await.unwrap());
    assert!(due(&mut c).await.is_empty());
    store.close().await;
}
