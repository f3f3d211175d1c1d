//! The core path: publish → log → hub → SSE / polling.

use std::time::Duration;

use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(10);

#[tokio::test]
async fn publish_reaches_sse_with_the_contract_envelope() {
    let s = TestServer::start().await;
    let mut sub = s.sse("channel=user:42").await;
    assert_eq!(sub.headers["content-type"], "text/event-stream");
    assert_eq!(sub.headers["cache-control"], "no-store");
    assert_eq!(sub.headers["x-accel-buffering"], "no");

    let r: Value = s
        .client
        .post(s.url("/v1/publish"))
        .json(&json!({"channel":"user:42","type":"payment_intent.succeeded","data":{"amount":2000},"id":"evt_1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = r["ids"][0].as_str().unwrap().to_string();
    assert_eq!(r["duplicate"], json!([false]));

    let ev = sub.next_timeout(T).await.expect("event");
    assert!(sub.retry.is_some(), "a retry: line comes first");
    assert_eq!(ev.id.as_deref(), Some(id.as_str()));
    assert_eq!(ev.event, None, "no event: line, so onmessage gets it");
    let env = ev.json();
    let keys: Vec<&str> = env
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        [
            "channel",
            "data",
            "id",
            "source",
            "source_id",
            "time",
            "type"
        ]
    );
    assert_eq!(env["id"], id);
    assert_eq!(env["channel"], "user:42");
    assert_eq!(env["type"], "payment_intent.succeeded");
    assert_eq!(env["source"], "publish");
    assert_eq!(env["source_id"], "evt_1");
    assert_eq!(env["data"], json!({"amount": 2000}));
    let time = env["time"].as_str().unwrap();
    assert!(
        time.ends_with('Z') && time.len() == 24,
        "RFC 3339 with millis: {time}"
    );
}
