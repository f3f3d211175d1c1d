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

async fn publish_batch(s: &TestServer, channel: &str, n: usize, start: usize) -> Vec<String> {
    let events: Vec<Value> = (start..start + n)
        .map(|i| json!({"channel": channel, "type": "n", "data": {"i": i}}))
        .collect();
    let r: Value = s
        .client
        .post(s.url("/v1/publish"))
        .json(&json!({"events": events}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn batch_is_consecutive_and_idempotency_keys_dedupe() {
    let s = TestServer::start().await;
    let ids = publish_batch(&s, "b", 5, 0).await;
    let seqs: Vec<i64> = ids.iter().map(|c| seq_of(c)).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive: {seqs:?}"
    );

    let post = |body: Value| {
        let c = s.client.clone();
        let url = s.url("/v1/publish");
        async move {
            c.post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let first = post(json!({"channel":"b","type":"t","data":{},"id":"key-1"})).await;
    let again = post(json!({"events":[{"channel":"b","type":"t","data":{},"id":"key-1"},{"channel":"b","data":2}]})).await;
    assert_eq!(again["duplicate"], json!([true, false]));
    assert_eq!(
        again["ids"][0], first["ids"][0],
        "a repeat answers with the first cursor"
    );
    let all = read_all(&s.client, &s.base, "b").await;
    assert_eq!(all.len(), 7, "the repeated key stored nothing");
}

#[tokio::test]
async fn multi_channel_stream_in_log_order_and_resume_precedence() {
    let s = TestServer::start().await;
    let a1 = s.publish("a", "t", json!(1)).await;
    let _b1 = s.publish("b", "t", json!(2)).await;
    let _c1 = s.publish("c", "t", json!(3)).await;
    let a2 = s.publish("a", "t", json!(4)).await;

    // since=earliest replays history of both channels, in log order, no c.
    let mut sub = s.sse("channel=a&channel=b&since=earliest").await;
    let got: Vec<Value> = vec![
        sub.next_timeout(T).await.unwrap().json(),
        sub.next_timeout(T).await.unwrap().json(),
        sub.next_timeout(T).await.unwrap().json(),
    ];
    assert_eq!(
        got.iter().map(|e| e["data"].clone()).collect::<Vec<_>>(),
        vec![json!(1), json!(2), json!(4)]
    );
    assert_eq!(got[2]["id"], a2);

    // Query last_event_id resumes; a Last-Event-ID header overrides both.
    let mut sub = s.sse(&format!("channel=a&last_event_id={a1}")).await;
    assert_eq!(sub.next_timeout(T).await.unwrap().json()["data"], json!(4));
    let mut sub = SseClient::connect(
        &s.client,
        &s.url("/v1/stream?channel=a&since=earliest&last_event_id=x"),
        Some(&a2),
    )
    .await;
    let live = s.publish("a", "t", json!(5)).await;
    let ev = sub.next_timeout(T).await.unwrap();
    assert_eq!(
        ev.id.as_deref(),
        Some(live.as_str()),
        "header cursor wins; nothing replayed"
    );

    // ?named=1 adds the event line; unknown parameters are ignored.
    let mut sub = s
        .sse(&format!(
            "channel=a&last_event_id={a1}&named=1&polyfill=xyz"
        ))
        .await;
    assert_eq!(
        sub.next_timeout(T).await.unwrap().event.as_deref(),
        Some("t")
    );
}

/// 4 publishers × 250 events while the subscriber drops and reconnects with
/// Last-Event-ID every ~100 events: every acknowledged event exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resume_race_loses_nothing_and_repeats_nothing() {
    let s = TestServer::start().await;
    let mut sub = s.sse("channel=race").await;
    let mut publishers = Vec::new();
    for p in 0..4 {
        let client = s.client.clone();
        let url = s.url("/v1/publish");
        publishers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..250 {
                let r: Value = client
                    .post(&url)
                    .json(&json!({"channel":"race","type":"n","data":{"p":p,"i":i}}))
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                acked.push(r["ids"][0].as_str().unwrap().to_string());
            }
            acked
        }));
    }
    let mut seen: Vec<String> = Vec::new();
    let mut reconnects = 0;
    while seen.len() < 1000 {
        let ev = sub.next_timeout(T).await.expect("stream ended");
        seen.push(ev.id.clone().unwrap());
        if seen.len().is_multiple_of(100) {
            reconnects += 1;
            drop(sub);
            sub = SseClient::connect(
                &s.client,
                &s.url("/v1/stream?channel=race"),
                seen.last().map(|s| s.as_str()),
            )
            .await;
        }
    }
    let mut acked: Vec<String> = Vec::new();
    for p in publishers {
        acked.extend(p.await.unwrap());
    }
    assert!(reconnects >= 9);
    let seqs: Vec<i64> = seen.iter().map(|c| seq_of(c)).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing, so no duplicate"
    );
    let mut acked_sorted = acked.clone();
    acked_sorted.sort_by_key(|c| seq_of(c));
    assert_eq!(
        seen, acked_sorted,
        "exactly the acknowledged events, in log order"
    );
}

/// One subscriber stops reading while 50,000 events flow. The other gets all
/// of them meanwhile; server memory stays bounded; the slow one then gets all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_consumer_slows_no_one_and_loses_nothing() {
    const N: usize = 50_000;
    // 50,000 events of ~1.1 KB flow past the stalled reader: ~55 MB, more
    // than the kernel's socket buffers hold. The server may not keep them.
    const RSS_GROWTH_BOUND_KIB: u64 = 40 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(dir.path(), &[("PUSHGATE_SERVER__SUBSCRIBER_QUEUE", "1024")]);
    let client = reqwest::Client::new();
    // The stalled reader is a raw socket speaking HTTP/1.0 (so the body is
    // not chunked): nothing on the client side reads or buffers for it.
    let mut slow = tokio::net::TcpStream::connect(server.base.trim_start_matches("http://"))
        .await
        .unwrap();
    {
        use tokio::io::AsyncWriteExt;
        slow.write_all(
            b"GET /v1/stream?channel=flood HTTP/1.0\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .unwrap();
    }
    let mut fast = SseClient::connect(&client, &server.url("/v1/stream?channel=flood"), None).await;
    let rss_before = server.rss_kib();

    let publisher = {
        let client = client.clone();
        let url = server.url("/v1/publish");
        tokio::spawn(async move {
            let pad = "x".repeat(1000);
            for batch in 0..(N / 500) {
                let events: Vec<Value> = (0..500)
                    .map(|i| json!({"channel":"flood","type":"n","data":{"i": batch * 500 + i, "pad": pad}}))
                    .collect();
                let r = client
                    .post(&url)
                    .json(&json!({"events": events}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
    };
    let mut last = -1i64;
    let mut peak_rss = 0;
    for n in 0..N {
        let ev = fast
            .next_timeout(Duration::from_secs(60))
            .await
            .expect("fast stream");
        let i = ev.json()["data"]["i"].as_i64().unwrap();
        assert_eq!(i, last + 1, "fast subscriber in order");
        last = i;
        if n.is_multiple_of(5000) {
            peak_rss = peak_rss.max(server.rss_kib());
        }
    }
    publisher.await.unwrap();
    peak_rss = peak_rss.max(server.rss_kib());
    let growth = peak_rss.saturating_sub(rss_before);
    eprintln!("server RSS before {rss_before} KiB, peak {peak_rss} KiB, growth {growth} KiB");
    assert!(
        growth < RSS_GROWTH_BOUND_KIB,
        "server RSS grew {growth} KiB with a stalled reader"
    );

    let metrics = client
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lags: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pushgate_subscriber_lags_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    assert!(
        lags >= 1.0,
        "the stalled subscriber overflowed its queue and fell back to the log"
    );

    // Now the slow one reads: every event, in order, nothing missing.
    use tokio::io::AsyncReadExt;
    let mut buf = String::new();
    let mut expected = 0i64;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut in_body = false;
    while expected < N as i64 {
        let n = tokio::time::timeout(Duration::from_secs(60), slow.read(&mut chunk))
            .await
            .expect("slow stream stalled")
            .unwrap();
        assert!(n > 0, "slow stream ended after {expected} events");
        buf.push_str(std::str::from_utf8(&chunk[..n]).unwrap());
        if !in_body {
            let Some(end) = buf.find("\r\n\r\n") else {
                continue;
            };
            assert!(
                buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200"),
                "{}",
                &buf[..end]
            );
            buf.drain(..end + 4);
            in_body = true;
        }
        while let Some(pos) = buf.find("\n\n") {
            let block: String = buf.drain(..pos + 2).collect();
            if let Some(data) = block.lines().find_map(|l| l.strip_prefix("data: ")) {
                let v: Value = serde_json::from_str(data).unwrap();
                assert_eq!(
                    v["data"]["i"].as_i64().unwrap(),
                    expected,
                    "slow subscriber in order"
                );
                expected += 1;
            }
        }
    }
}

/// kill -9 during a publish flood: every acknowledged event survives, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::spawn(dir.path(), &[]);
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let mut flooders = Vec::new();
    for p in 0..6 {
        let client = client.clone();
        let url = server.url("/v1/publish");
        let acked = acked.clone();
        flooders.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("p{p}-{i}");
                let Ok(r) = client
                    .post(&url)
                    .json(&json!({"channel":"crash","type":"n","data":{"k":key},"id":key}))
                    .send()
                    .await
                else {
                    return;
                };
                let Ok(v) = r.json::<Value>().await else {
                    return;
                };
                acked
                    .lock()
                    .unwrap()
                    .push((key, v["ids"][0].as_str().unwrap().to_string()));
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kill9();
    for f in flooders {
        f.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > 50, "the flood ran ({} acked)", acked.len());

    let server = ServerProcess::spawn(dir.path(), &[]);
    let events = read_all(&client, &server.base, "crash").await;
    let mut by_id = std::collections::HashMap::new();
    for e in &events {
        *by_id
            .entry(e["id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert!(by_id.values().all(|n| *n == 1), "no event twice");
    for (key, id) in &acked {
        assert_eq!(
            by_id.get(id),
            Some(&1),
            "acknowledged {key} ({id}) is in the log once"
        );
    }
    eprintln!(
        "{} acknowledged, {} in the log after kill -9",
        acked.len(),
        events.len()
    );
}

#[tokio::test]
async fn expired_foreign_and_unparsable_cursors_reset_to_the_oldest_retained() {
    let s =
        TestServer::with(|c| c.store.retention = pushgate::config::Dur::parse("2s").unwrap()).await;
    let old1 = s.publish("r", "t", json!("old1")).await;
    let _old2 = s.publish("r", "t", json!("old2")).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let fresh = s.publish("r", "t", json!("fresh")).await;

    let tag = fresh.split_once('-').unwrap().1.to_string();
    let foreign = format!("1-{}", if tag == "zzzzzz" { "yyyyyy" } else { "zzzzzz" });
    for (cursor, reason) in [
        (old1.as_str(), "cursor_expired"),
        (foreign.as_str(), "cursor_foreign"),
        ("garbage", "cursor_invalid"),
        ("999999-x", "cursor_foreign"),
    ] {
        let mut sub =
            SseClient::connect(&s.client, &s.url("/v1/stream?channel=r"), Some(cursor)).await;
        let reset = sub.next_timeout(T).await.unwrap();
        assert_eq!(reset.event.as_deref(), Some("pushgate.reset"), "{cursor}");
        assert_eq!(reset.json()["reason"], reason, "{cursor}");
        let ev = sub.next_timeout(T).await.unwrap();
        assert_eq!(
            ev.id.as_deref(),
            Some(fresh.as_str()),
            "continues from the oldest retained"
        );

        let v: Value = s
            .client
            .get(s.url(&format!("/v1/events?channel=r&after={cursor}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(v["reset"], true, "{cursor}");
        assert_eq!(v["events"][0]["id"], fresh.as_str());
    }
    // A cursor ahead of the log resets too; a valid one does not.
    let ahead = format!("{}-{tag}", seq_of(&fresh) + 100);
    let v: Value = s
        .client
        .get(s.url(&format!("/v1/events?channel=r&after={ahead}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["reset"], true);
    let v: Value = s
        .client
        .get(s.url(&format!("/v1/events?channel=r&after={fresh}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["reset"], false);
    assert_eq!(v["events"], json!([]));
}

#[tokio::test]
async fn polling_pages_never_repeat_or_skip_and_long_poll_wakes() {
    let s = TestServer::start().await;
    // Without `after`: an empty page at the current end.
    s.publish("p", "t", json!(0)).await;
    let v: Value = s
        .client
        .get(s.url("/v1/events?channel=p"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["events"], json!([]));
    let mut next = v["next"].as_str().unwrap().to_string();
    publish_batch(&s, "p", 25, 1).await;
    publish_batch(&s, "other", 5, 0).await;
    let mut got = Vec::new();
    loop {
        let v: Value = s
            .client
            .get(s.url(&format!("/v1/events?channel=p&after={next}&limit=10")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = v["events"].as_array().unwrap();
        assert!(page.len() <= 10);
        next = v["next"].as_str().unwrap().to_string();
        if page.is_empty() {
            break;
        }
        got.extend(page.iter().map(|e| e["data"]["i"].as_i64().unwrap()));
    }
    assert_eq!(got, (1..=25).collect::<Vec<_>>());

    // Long-poll: held until an event arrives.
    let waiter = {
        let c = s.client.clone();
        let url = s.url(&format!("/v1/events?channel=p&after={next}&wait=20"));
        tokio::spawn(async move {
            c.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "long-poll holds");
    let id = s.publish("p", "t", json!("wake")).await;
    let v = tokio::time::timeout(T, waiter).await.unwrap().unwrap();
    assert_eq!(v["events"][0]["id"], id.as_str());
    assert_eq!(v["next"], id.as_str());

    // wait ends with an empty page whose next still resumes correctly.
    let started = std::time::Instant::now();
    let v: Value = s
        .client
        .get(s.url(&format!("/v1/events?channel=p&after={id}&wait=0.5")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(450));
    assert_eq!(v["events"], json!([]));
    assert_eq!(v["next"], id.as_str());

    // Bad parameters are clear errors.
    for (q, code) in [
        ("channel=p&limit=x", "invalid_limit"),
        ("channel=p&wait=-1", "invalid_wait"),
        ("", "missing_channel"),
        ("channel=bad%20name", "invalid_channel"),
    ] {
        let r = s
            .client
            .get(s.url(&format!("/v1/events?{q}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{q}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{q}");
    }
}

#[tokio::test]
async fn bad_input_is_refused_clearly_and_stores_nothing() {
    let s = TestServer::with(|c| c.server.max_body = pushgate::config::ByteSize(64 * 1024)).await;
    let head_before: Value = s
        .client
        .get(s.url("/v1/events?channel=x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (
            s.client
                .post(s.url("/v1/publish"))
                .header("content-type", "application/json")
                .body("{not json"),
            400,
            "invalid_json",
        ),
        (
            s.client.post(s.url("/v1/publish")).body(""),
            400,
            "invalid_json",
        ),
        (
            s.client
                .post(s.url("/v1/publish"))
                .header("content-type", "application/json")
                .body("[1,2]"),
            400,
            "invalid_event",
        ),
        (
            s.client
                .post(s.url("/v1/publish"))
                .json(&json!({"channel":"a b","data":1})),
            400,
            "invalid_channel",
        ),
        (
            s.client
                .post(s.url("/v1/publish"))
                .json(&json!({"channel":"","data":1})),
            400,
            "invalid_channel",
        ),
        (
            s.client
                .post(s.url("/v1/publish"))
                .json(&json!({"channel":"x".repeat(201),"data":1})),
            400,
            "invalid_channel",
        ),
        (
            s.client.post(s.url("/v1/publish")).json(&json!({"data":1})),
            400,
            "invalid_channel",
        ),
        (
            s.client
                .post(s.url("/v1/publish"))
                .json(&json!({"events":[]})),
            400,
            "invalid_event",
        ),
        (
            s.client
                .post(s.url("/v1/publish"))
                .json(&json!({"events":[{"channel":"ok","data":1},{"channel":"no way","data":2}]})),
            400,
            "invalid_channel",
        ),
        (
            s.client
                .post(s.url("/v1/publish"))
                .json(&json!({"channel":"ok","type":"a\nb"})),
            400,
            "invalid_type",
        ),
        (
            s.client
                .post(s.url("/v1/publish"))
                .json(&json!({"channel":"ok","id":"k\u{0}"})),
            400,
            "invalid_id",
        ),
        (
            s.client
                .post(s.url("/v1/publish"))
                .header("content-type", "application/json")
                .body(format!(
                    "{{\"channel\":\"ok\",\"data\":\"{}\"}}",
                    "x".repeat(100_000)
                )),
            413,
            "payload_too_large",
        ),
        (
            s.client.get(s.url("/v1/stream?channel=a%0Ab")),
            400,
            "invalid_channel",
        ),
        (s.client.get(s.url("/v1/stream")), 400, "missing_channel"),
        (
            s.client.put(s.url("/v1/publish")),
            405,
            "method_not_allowed",
        ),
        (s.client.get(s.url("/v1/nothing")), 404, "not_found"),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "case {i}");
        let v: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("case {i}: JSON error body: {e}"));
        assert_eq!(v["error"]["code"], code, "case {i}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "case {i}"
        );
    }
    // A streamed (chunked) oversized body is cut off while streaming, too.
    let chunks = futures_util::stream::iter(
        (0..200).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b' '; 4096]))),
    );
    let r = s
        .client
        .post(s.url("/v1/publish"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);

    let head_after: Value = s
        .client
        .get(s.url("/v1/events?channel=x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        head_before["next"], head_after["next"],
        "nothing was stored"
    );
    // …and the server is fine.
    s.publish("ok", "t", json!(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_and_slow_connections_time_out_and_the_server_stays_fine() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s =
        TestServer::with(|c| c.server.header_timeout = pushgate::config::Dur::parse("1s").unwrap())
            .await;
    // Thousands of connections that never send a byte.
    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(tokio::net::TcpStream::connect(s.addr).await.unwrap());
    }
    // A client that sends its request head one byte every 300 ms.
    let mut slow = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    let started = std::time::Instant::now();
    let mut closed_after = None;
    for b in head.iter() {
        if slow.write_all(&[*b]).await.is_err() {
            closed_after = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 256];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(300), slow.read(&mut buf)).await
        {
            // 0 = closed; anything else must be a timeout status, never a served request.
            let text = String::from_utf8_lossy(&buf[..n]).to_string();
            assert!(
                n == 0 || text.contains("408"),
                "slow head was served: {text}"
            );
            closed_after = Some(started.elapsed());
            break;
        }
    }
    let closed_after = closed_after.expect("the slow client was never cut off");
    assert!(
        closed_after < Duration::from_secs(5),
        "cut off after {closed_after:?}"
    );

    // Meanwhile the server serves real clients.
    let id = s.publish("fine", "t", json!(1)).await;
    assert!(!id.is_empty());
    // And it closed the idle connections after the header timeout.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut closed = 0;
    for c in idle.iter_mut().take(100) {
        let mut buf = [0u8; 64];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(200), c.read(&mut buf)).await
        {
            closed += 1;
        }
    }
    assert_eq!(closed, 100, "idle connections are closed by the server");
}

#[tokio::test]
async fn http2_streams_share_one_connection() {
    let s = TestServer::start().await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let mut a = SseClient::connect(&h2, &s.url("/v1/stream?channel=h2a"), None).await;
    let mut b = SseClient::connect(&h2, &s.url("/v1/stream?channel=h2b"), None).await;
    let ida = s.publish("h2a", "t", json!(1)).await;
    let idb = s.publish("h2b", "t", json!(2)).await;
    assert_eq!(
        a.next_timeout(T).await.unwrap().id.as_deref(),
        Some(ida.as_str())
    );
    assert_eq!(
        b.next_timeout(T).await.unwrap().id.as_deref(),
        Some(idb.as_str())
    );
    let r = h2.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
}

#[tokio::test]
async fn sigterm_closes_streams_and_exits_zero_keeping_every_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::spawn(dir.path(), &[]);
    let client = reqwest::Client::new();
    let mut sub = SseClient::connect(&client, &server.url("/v1/stream?channel=term"), None).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let r: Value = client
            .post(server.url("/v1/publish"))
            .json(&json!({"channel":"term","data":i}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        ids.push(r["ids"][0].as_str().unwrap().to_string());
    }
    for _ in 0..20 {
        sub.next_timeout(T).await.unwrap();
    }
    let started = std::time::Instant::now();
    unsafe_sigterm(server.pid);
    assert!(
        sub.next_timeout(Duration::from_secs(10)).await.is_none(),
        "the stream ends"
    );
    let status = server.child.wait().unwrap();
    assert!(status.success(), "exit 0, got {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let server = ServerProcess::spawn(dir.path(), &[]);
    let events = read_all(&client, &server.base, "term").await;
    assert_eq!(
        events
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_string())
            .collect::<Vec<_>>(),
        ids
    );
}

fn unsafe_sigterm(pid: u32) {
    let ok = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(ok.success());
}

#[tokio::test]
async fn tls_with_alpn_serves_http2_and_http1() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (Debian package openssl) is needed for the TLS test");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let s = TestServer::with(|c| {
        c.server.tls_cert = Some(cert.clone());
        c.server.tls_key = Some(key.clone());
    })
    .await;
    let base = format!("https://localhost:{}", s.addr.port());
    for (client, version) in [
        (
            reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .resolve("localhost", s.addr)
                .build()
                .unwrap(),
            reqwest::Version::HTTP_2,
        ),
        (
            reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .resolve("localhost", s.addr)
                .http1_only()
                .build()
                .unwrap(),
            reqwest::Version::HTTP_11,
        ),
    ] {
        let r = client
            .post(format!("{base}/v1/publish"))
            .json(&json!({"channel":"tls","data":1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), version);
        let mut sub = SseClient::connect(
            &client,
            &format!("{base}/v1/stream?channel=tls&since=earliest"),
            None,
        )
        .await;
        assert_eq!(sub.next_timeout(T).await.unwrap().json()["data"], json!(1));
    }
}

#[tokio::test]
async fn a_closed_stream_is_unregistered_at_once() {
    let s = TestServer::start().await;
    let gauge = |text: String| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix("pushgate_open_streams{transport=\"sse\"} "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(-1.0)
    };
    let sub = s.sse("channel=bye").await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let sub2 = SseClient::connect(&h2, &s.url("/v1/stream?channel=bye"), None).await;
    let metrics = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(gauge(metrics), 2.0, "both streams counted");
    drop(sub);
    drop(sub2);
    drop(h2);
    let mut open = -1.0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        open = gauge(
            s.client
                .get(s.url("/metrics"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
        if open == 0.0 {
            break;
        }
    }
    assert_eq!(
        open, 0.0,
        "closed streams are dropped without waiting for a write to fail"
    );
}
