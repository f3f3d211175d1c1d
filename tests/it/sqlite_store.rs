//! What only the embedded SQLite log must do: upgrade, in place, a database
//! made by an earlier version of its schema, and answer a corrupt file with
//! 500 (retrying will not help) but a busy one with 503 + `Retry-After`.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use pushgate::store::sqlite::SCHEMA_VERSION;
use serde_json::{Value, json};

use crate::common::{TestServer, read_all, seq_of, test_config};

/// A database written by pushgate before SQLite had numbered migrations
/// (`user_version` 0), dumped with `sqlite3 log.db .dump`: five events
/// (two keyed by `id`), a webhook's inspector records, an endpoint with a
/// queued delivery and the outbox cursor.
const V0_DUMP: &str = include_str!("fixtures/sqlite_v0.sql");
fn user_version(path: &Path) -> u32 {
    let c = rusqlite::Connection::open(path).unwrap();
    c.query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn a_database_made_before_versioning_upgrades_with_its_events_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(V0_DUMP)
        .unwrap();
    assert_eq!(user_version(&path), 0, "the fixture predates versioning");
    // The log's identity, which every cursor of the fixture carries.
    let tag: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row("SELECT value FROM meta WHERE key = 'log_tag'", [], |r| {
            r.get(0)
        })
        .unwrap();

    let config = test_config(dir.path());
    let s = TestServer::start_in(dir, config).await;

    // Every event is there, byte for byte, with its cursor and the log's identity.
    let orders = read_all(&s.client, &s.base, "orders").await;
    let ids: Vec<&str> = orders.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [format!("1-{tag}"), format!("2-{tag}")]);
    assert_eq!(orders[0]["type"], "order.created");
    assert_eq!(orders[0]["source_id"], "order-1");
    assert_eq!(orders[0]["data"], json!({"n": 1, "text": "café ü"}));
    assert_eq!(orders[1]["data"], json!({"n": 2, "text": "café ü"}));
    let user = read_all(&s.client, &s.base, "user:42").await;
    assert_eq!(user.len(), 1);
    assert_eq!(user[0]["id"], format!("3-{tag}"));
    let billing = read_all(&s.client, &s.base, "billing").await;
    assert_eq!(billing.len(), 1);
    assert_eq!(billing[0]["source"], "stripe");
    assert_eq!(billing[0]["data"]["type"], "invoice.paid");
    assert_eq!(read_all(&s.client, &s.base, "audit").await.len(), 1);

    // A cursor handed out before the upgrade still resumes where it was.
    let v: Value = s
        .client
        .get(s.url(&format!("/v1/events?channel=orders&after=1-{tag}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(v["reset"], json!(true));
    assert_eq!(v["events"][0]["id"], format!("2-{tag}"));

    // Keys stored before the upgrade still hold (development mode has one
    // publisher, whose scope is the one old keys were given).
    let r: Value = s
        .client
        .post(s.url("/v1/publish"))
        .json(&json!({"channel": "orders", "data": 1, "id": "order-1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["duplicate"], json!([true]));
    assert_eq!(r["ids"][0], format!("1-{tag}"));

    // The log goes on after its old head, with the same identity.
    let cursor = s.publish("orders", "order.created", json!({"n": 6})).await;
    assert_eq!(cursor, format!("6-{tag}"));
    assert_eq!(seq_of(&cursor), 6);

    // The inspector's records and the endpoint came along.
    let inbound: Value = s
        .client
        .get(s.url("/v1/inbound"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        inbound["inbound"].as_array().map(Vec::len),
        Some(2),
        "{inbound}"
    );
    let r = s
        .client
        .get(s.url("/v1/endpoints/ep_fixture"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let dir = s.stop().await;
    assert_eq!(
        user_version(&dir.path().join("log.db")),
        SCHEMA_VERSION,
        "migrated to the latest version"
    );
}

/// Overwrites the root page of `index` with junk, as a torn write or a bad
/// disk would.
fn corrupt_index(path: &Path, index: &str) {
    {
        let c = rusqlite::Connection::open(path).unwrap();
        // Everything in the main file, nothing left in the WAL.
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        let root: u64 = c
            .query_row(
                "SELECT rootpage FROM sqlite_master WHERE name = ?1",
                [index],
                |r| r.get(0),
            )
            .unwrap();
        let page_size: u64 = c.query_row("PRAGMA page_size", [], |r| r.get(0)).unwrap();
        drop(c);
        let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.seek(SeekFrom::Start((root - 1) * page_size)).unwrap();
        f.write_all(&vec![0xA5; page_size as usize]).unwrap();
        f.sync_all().unwrap();
    }
}

async fn get(s: &TestServer, path: &str) -> reqwest::Response {
    s.client.get(s.url(path)).send().await.unwrap()
}

#[tokio::test]
async fn a_corrupt_database_answers_500_not_503() {
    let s = TestServer::start().await;
    for n in 0..3 {
        s.publish("orders", "t", json!({ "n": n })).await;
    }
    // Positive control: intact, the same read answers 200.
    let r = get(&s, "/v1/events?channel=orders&after=earliest").await;
    assert_eq!(r.status(), 200);

    let dir = s.stop().await;
    corrupt_index(&dir.path().join("log.db"), "events_by_channel");
    let config = test_config(dir.path());
    let s = TestServer::start_in(dir, config).await;
    // The server still starts and answers what does not touch the broken page.
    assert_eq!(get(&s, "/readyz").await.status(), 200);

    let r = get(&s, "/v1/events?channel=orders&after=earliest").await;
    assert_eq!(r.status(), 500, "a corrupt file is not 'retry later'");
    assert!(r.headers().get("retry-after").is_none());
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "internal");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        !message.contains("SQL"),
        "no internals in the answer: {message}"
    );
}

/// `/metrics` shows the outbound queue: how many deliveries are pending and
/// how overdue the earliest one is (a disabled endpoint's backlog here).
#[tokio::test]
async fn metrics_show_the_delivery_queue() {
    let s = TestServer::start().await;
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from {text}"))
    };
    let text = get(&s, "/metrics").await.text().await.unwrap();
    assert_eq!(metric(&text, "pushgate_webhook_queue_depth "), 0.0);
    assert_eq!(
        metric(&text, "pushgate_webhook_queue_oldest_due_seconds "),
        0.0
    );

    // An endpoint that never answers (`.invalid` never resolves): its
    // deliveries stay pending, waiting for their retries.
    let r = s
        .client
        .post(s.url("/v1/endpoints"))
        .json(&json!({"url": "https://receiver.invalid/hook", "channels": ["orders"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    s.publish("orders", "t", json!({"n": 1})).await;
    s.publish("orders", "t", json!({"n": 2})).await;
    // The dispatcher queues them in the background: wait for it, not for a time.
    let mut depth = 0.0;
    for _ in 0..500 {
        let text = get(&s, "/metrics").await.text().await.unwrap();
        depth = metric(&text, "pushgate_webhook_queue_depth ");
        if depth == 2.0 {
            assert!(metric(&text, "pushgate_webhook_queue_oldest_due_seconds ") >= 0.0);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(depth, 2.0, "both deliveries are pending");
}

#[tokio::test]
async fn a_busy_database_answers_503_with_retry_after() {
    let s = TestServer::start().await;
    // Positive control: nothing holds the lock, the publish is stored.
    s.publish("orders", "t", json!({"n": 1})).await;

    // Another process holds the write lock past the writer's busy timeout.
    let other = rusqlite::Connection::open(s.dir.path().join("log.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let r = s
        .client
        .post(s.url("/v1/publish"))
        .json(&json!({"channel": "orders", "data": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "busy is transient");
    assert_eq!(r.headers()["retry-after"], "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "store_unavailable");

    // And it was: once the lock is released, the retry is stored.
    other.execute_batch("ROLLBACK").unwrap();
    let cursor = s.publish("orders", "t", json!({"n": 2})).await;
    assert_eq!(seq_of(&cursor), 2, "the refused publish stored nothing");
}
