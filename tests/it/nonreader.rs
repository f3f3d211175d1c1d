//! Readers that do not read (issue 11 item 5): every read of the log is
//! bounded by bytes as well as by count, and an SSE stream whose client
//! stops reading is closed at the write deadline instead of holding its
//! events. Each refusal sits beside a reader of the same shape that reads.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// Just under the default 1 MiB body limit: each event is its own batch.
const BIG: usize = 900 * 1024;
const EVENTS: usize = 30;

async fn publish_big(s: &TestServer) -> Vec<String> {
    let payload = "x".repeat(BIG);
    let mut ids = Vec::new();
    for _ in 0..EVENTS {
        ids.push(s.publish("big", "t", json!(payload)).await);
    }
    ids
}

async fn open_sse_streams(s: &TestServer) -> f64 {
    let text = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with("pushgate_open_streams") && l.contains("sse"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn an_sse_client_that_stops_reading_is_closed_and_one_that_reads_gets_everything() {
    let s = TestServer::with(|c| {
        c.server.heartbeat = pushgate::config::Dur(Duration::from_millis(100));
        // hyper's connections wait for twice this (WebSockets close first).
        c.websocket.send_timeout = pushgate::config::Dur(Duration::from_secs(1));
    })
    .await;
    let ids = publish_big(&s).await;

    // The lean path (a CRLF head), then hyper (a bare-LF head goes there).
    for head in [
        &b"GET /v1/stream?channel=big&since=earliest HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"[..],
        &b"GET /v1/stream?channel=big&since=earliest HTTP/1.1\nhost: 127.0.0.1\n\n"[..],
    ] {
        stalled_client_is_closed(&s, head).await;
    }

    // Positive control: a client that reads receives every event, in order.
    let mut reader = s.sse("channel=big&since=earliest").await;
    for id in &ids {
        let e = reader
            .next_timeout(Duration::from_secs(20))
            .await
            .expect("event");
        assert_eq!(e.id.as_deref(), Some(id.as_str()));
    }
}

async fn stalled_client_is_closed(s: &TestServer, head: &[u8]) {
    // Never reads: the server's writes stall once the socket buffers fill.
    let mut stalled = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    stalled.write_all(head).await.unwrap();
    // The write deadline closes it.
    let mut closed = false;
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if open_sse_streams(s).await == 0.0 {
            closed = true;
            break;
        }
    }
    assert!(closed, "the stalled stream is still open");
    // What the kernel had buffered arrives, then the end: not every event.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stalled.read_to_end(&mut got))
        .await
        .expect("the server closed the connection")
        .ok();
    let delivered = got.windows(4).filter(|w| w == b"id: ").count();
    assert!(
        delivered < EVENTS,
        "a stalled client was sent everything ({delivered})"
    );
}

#[tokio::test]
async fn a_poll_is_bounded_by_bytes_as_well_as_by_limit() {
    let s = TestServer::start().await;
    let ids = publish_big(&s).await;
    let mut small = Vec::new();
    for i in 0..5 {
        small.push(s.publish("small", "t", json!(i)).await);
    }
    let poll = |q: String| {
        let s = &s;
        async move {
            let r = s
                .client
                .get(s.url(&format!("/v1/events?{q}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    // 100 events of 0.9 MiB would be 90 MiB: the answer is one event (the
    // first of a batch is always taken) and `next` resumes right after it.
    let page = poll("channel=big&after=earliest&limit=100".into()).await;
    let events = page["events"].as_array().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["id"], ids[0].as_str());
    assert_eq!(page["next"], ids[0].as_str());
    let page = poll(format!("channel=big&after={}&limit=100", ids[0])).await;
    assert_eq!(page["events"][0]["id"], ids[1].as_str());

    // Positive control: small events come `limit` at a time.
    let page = poll("channel=small&after=earliest&limit=100".into()).await;
    let got: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, small.iter().map(String::as_str).collect::<Vec<_>>());
    let page = poll("channel=small&after=earliest&limit=3".into()).await;
    assert_eq!(page["events"].as_array().unwrap().len(), 3);
    assert_eq!(page["next"], small[2].as_str());
}

#[test]
fn streams_per_client_has_a_non_zero_default() {
    let c = pushgate::config::Config::load(None, Vec::new()).unwrap();
    assert!(c.limits.streams_per_client > 0);
}
