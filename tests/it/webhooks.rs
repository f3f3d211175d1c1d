//! Outbound webhooks (contract §3.4): a real pushgate delivers to real
//! receivers on loopback addresses, and every delivery is verified with the
//! official `standardwebhooks` library and with pushgate's own verifier.
//! No test sends traffic to any non-loopback address.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use pushgate::config::{Config, Dur};
use pushgate::deliver::sign;
use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(15);

// ---- a real receiver ---------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("delivery body is JSON")
    }
}

/// What the receiver answers to its n-th request (0-based): status, headers, body.
type Behaviour = dyn Fn(usize, &Received) -> (u16, Vec<(String, String)>, String) + Send + Sync;

#[derive(Clone)]
struct RecvState {
    log: Arc<Mutex<Vec<Received>>>,
    behaviour: Arc<Behaviour>,
}

pub struct Receiver {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    /// A receiver on `ip` (a loopback address) answering 200 to everything.
    pub async fn ok(ip: &str) -> Receiver {
        Receiver::start(ip, |_, _| (200, vec![], "thanks".into())).await
    }

    pub async fn start(
        ip: &str,
        behaviour: impl Fn(usize, &Received) -> (u16, Vec<(String, String)>, String)
        + Send
        + Sync
        + 'static,
    ) -> Receiver {
        let listener = tokio::net::TcpListener::bind(format!("{ip}:0"))
            .await
            .unwrap_or_else(|e| panic!("bind receiver on {ip}: {e}"));
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let state = RecvState {
            log: log.clone(),
            behaviour: Arc::new(behaviour),
        };
        let app = axum::Router::new().fallback(receive).with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, log, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn received(&self) -> Vec<Received> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until `n` requests arrived; panics after `timeout`.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let start = Instant::now();
        loop {
            let got = self.received();
            if got.len() >= n {
                return got;
            }
            assert!(
                start.elapsed() < timeout,
                "receiver {} got {} of {n} requests in {timeout:?}",
                self.addr,
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(s): State<RecvState>,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let r = Received {
        path: uri.path().to_string(),
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        body,
        at: Instant::now(),
    };
    let n = {
        let mut log = s.log.lock().unwrap();
        log.push(r.clone());
        log.len() - 1
    };
    let (status, extra, body) = (s.behaviour)(n, &r);
    let mut resp = (StatusCode::from_u16(status).unwrap(), body).into_response();
    for (k, v) in extra {
        resp.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    resp
}

// ---- verification --------------------------------------------------------------

/// Verifies every delivery with pushgate's own verifier and with the official
/// `standardwebhooks` npm package (tests/js; installed by scripts/test.sh).
pub fn verify_all(secret: &str, deliveries: &[Received]) {
    let key = sign::secret_key(secret).expect("secret");
    let now = pushgate::store::now_ms() / 1000;
    for d in deliveries {
        sign::verify(
            std::slice::from_ref(&key),
            Some(&d.id),
            Some(&d.timestamp),
            Some(&d.signature),
            &d.body,
            now,
            300,
        )
        .unwrap_or_else(|e| panic!("own verifier refused {}: {e}", d.id));
    }
    let results = standardwebhooks_verify(secret, deliveries);
    assert_eq!(results.len(), deliveries.len());
    for (d, r) in deliveries.iter().zip(results) {
        assert_eq!(r, "ok", "standardwebhooks refused {}: {r}", d.id);
    }
}

pub fn standardwebhooks_verify(secret: &str, deliveries: &[Received]) -> Vec<String> {
    use std::io::Write;
    let js = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/js");
    assert!(
        std::path::Path::new(js)
            .join("node_modules/standardwebhooks")
            .exists(),
        "the npm package standardwebhooks is missing: run scripts/test.sh (or `npm install` in tests/js)"
    );
    let input = json!({
        "secret": secret,
        "deliveries": deliveries.iter().map(|d| json!({
            "headers": {
                "webhook-id": d.id,
                "webhook-timestamp": d.timestamp,
                "webhook-signature": d.signature,
            },
            "body": String::from_utf8(d.body.to_vec()).unwrap(),
        })).collect::<Vec<_>>(),
    });
    let mut child = std::process::Command::new("node")
        .arg("verify-webhooks.mjs")
        .current_dir(js)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("node must be installed");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "node verifier failed");
    serde_json::from_slice(&out.stdout).expect("verifier output")
}

// ---- API helpers ---------------------------------------------------------------

pub fn fast(c: &mut Config, schedule: &[&str]) {
    c.delivery.retry_schedule = schedule.iter().map(|s| Dur::parse(s).unwrap()).collect();
    c.delivery.poll_interval = Dur::parse("100ms").unwrap();
}

pub fn allow_loopback(c: &mut Config) {
    c.delivery.allow_targets = vec!["127.0.0.0/8".into(), "::1/128".into()];
}

pub async fn create_endpoint(s: &TestServer, body: Value) -> Value {
    let r = s
        .client
        .post(s.url("/v1/endpoints"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert_eq!(status, 201, "create endpoint: {v}");
    v
}

async fn get_json(s: &TestServer, path: &str) -> Value {
    let r = s.client.get(s.url(path)).send().await.unwrap();
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

async fn attempts(s: &TestServer, id: &str) -> Vec<Value> {
    get_json(s, &format!("/v1/endpoints/{id}/attempts")).await["attempts"]
        .as_array()
        .unwrap()
        .clone()
}

/// Polls the attempts list until `pred` holds.
async fn wait_attempts(
    s: &TestServer,
    id: &str,
    what: &str,
    pred: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let a = attempts(s, id).await;
        if pred(&a) {
            return a;
        }
        assert!(start.elapsed() < T, "timed out waiting for {what}: {a:#?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_endpoint(
    s: &TestServer,
    id: &str,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let e = get_json(s, &format!("/v1/endpoints/{id}")).await;
        if pred(&e) {
            return e;
        }
        assert!(start.elapsed() < T, "timed out waiting for {what}: {e:#}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn error_of(r: reqwest::Response) -> (u16, String, String) {
    let status = r.status().as_u16();
    let v: Value = r.json().await.expect("JSON error body");
    (
        status,
        v["error"]["code"].as_str().unwrap_or_default().to_string(),
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

// ---- tests -----------------------------------------------------------------------

#[tokio::test]
async fn deliveries_are_signed_envelopes_that_verify_with_the_official_library() {
    let s = TestServer::with(|c| {
        fast(c, &["0s", "1s"]);
        allow_loopback(c);
    })
    .await;
    let rx = Receiver::ok("127.0.0.1").await;
    let ep = create_endpoint(
        &s,
        json!({"url": rx.url("/hook"), "channels": ["orders:*", "billing"], "types": ["order.*"]}),
    )
    .await;
    let secret = ep["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_"));
    let id = ep["id"].as_str().unwrap();

    let mut expected = Vec::new();
    for i in 0..5 {
        expected.push(
            s.publish(&format!("orders:{i}"), "order.created", json!({"n": i}))
                .await,
        );
    }
    expected.push(s.publish("billing", "order.paid", json!({"n": 5})).await);
    // Not matching: other channel, other type.
    s.publish("shipping", "order.created", json!({})).await;
    s.publish("orders:1", "refund.created", json!({})).await;
    s.publish("orders", "order.created", json!({})).await;
    let sentinel = s.publish("orders:9", "order.done", json!({})).await;
    expected.push(sentinel.clone());

    let got = rx.wait_for(expected.len(), T).await;
    // Deliveries run concurrently: wait for the queue to drain, then compare sets.
    wait_attempts(&s, id, "all succeeded", |a| {
        a.len() == expected.len() && a.iter().all(|x| x["status"] == "succeeded")
    })
    .await;
    let got_after = rx.received();
    assert_eq!(
        got_after.len(),
        got.len(),
        "nothing unexpected arrived: {got_after:?}"
    );
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected);
    for r in &got {
        assert_eq!(r.path, "/hook");
        let env = r.json();
        assert_eq!(
            r.id,
            format!(
                "msg_{}_{}",
                env["id"].as_str().unwrap().split('-').next().unwrap(),
                id.trim_start_matches("ep_")
            )
        );
        assert!(
            env["channel"].is_string() && env["time"].is_string() && env["source"] == "publish"
        );
    }
    // Bytes on the wire are the envelope SSE carries.
    let first = &got[0];
    let cursor = first.json()["id"].as_str().unwrap().to_string();
    let page = get_json(
        &s,
        &format!(
            "/v1/events?channel={}&after=earliest&limit=1000",
            first.json()["channel"].as_str().unwrap()
        ),
    )
    .await;
    let same = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["id"] == cursor)
        .unwrap();
    assert_eq!(&first.json(), same);

    verify_all(secret, &got);
    // A tampered body or another secret does not verify (positive control above).
    let mut tampered = got[0].clone();
    tampered.body = Bytes::from([&tampered.body[..], b" "].concat());
    let r = standardwebhooks_verify(secret, &[tampered]);
    assert_ne!(r[0], "ok");
    let other = sign::generate_secret();
    assert_ne!(standardwebhooks_verify(&other, &got[..1])[0], "ok");

    let metrics = s
        .client
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("pushgate_webhook_attempts_total{result=\"succeeded\"} 7"),
        "{metrics}"
    );
}

#[tokio::test]
async fn retries_follow_the_schedule_with_one_webhook_id() {
    let s = TestServer::with(|c| {
        fast(c, &["0s", "200ms", "400ms"]);
        allow_loopback(c);
    })
    .await;
    let rx = Receiver::start("127.0.0.1", |n, _| {
        if n < 2 {
            (500, vec![], format!("boom {n}"))
        } else {
            (200, vec![], "ok".into())
        }
    })
    .await;
    let ep = create_endpoint(&s, json!({"url": rx.url("/"), "channels": ["jobs"]})).await;
    let id = ep["id"].as_str().unwrap();
    let cursor = s.publish("jobs", "job.done", json!({"j": 1})).await;

    let got = rx.wait_for(3, T).await;
    assert!(
        got.iter().all(|r| r.id == got[0].id),
        "one webhook-id across attempts"
    );
    let gap1 = got[1].at - got[0].at;
    let gap2 = got[2].at - got[1].at;
    assert!(gap1 >= Duration::from_millis(200), "{gap1:?}");
    assert!(gap2 >= Duration::from_millis(400), "{gap2:?}");
    assert!(
        gap1 < Duration::from_secs(2) && gap2 < Duration::from_secs(2),
        "{gap1:?} {gap2:?}"
    );
    verify_all(ep["secret"].as_str().unwrap(), &got);

    let a = wait_attempts(&s, id, "three attempts", |a| a.len() == 3).await;
    let summary: Vec<(u64, &str, u64)> = a
        .iter()
        .map(|x| {
            (
                x["attempt"].as_u64().unwrap(),
                x["status"].as_str().unwrap(),
                x["response_status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (3, "succeeded", 200),
            (2, "failed", 500),
            (1, "failed", 500)
        ]
    );
    for x in &a {
        assert_eq!(x["event_id"], cursor.as_str());
        assert_eq!(x["webhook_id"], got[0].id.as_str());
        assert!(x["at"].as_str().unwrap().ends_with('Z'));
    }
    assert_eq!(a[2]["response_body"], "boom 0");
    assert_eq!(a[2]["error"], "HTTP 500 Internal Server Error");
    assert!(a[0]["error"].is_null());
}

#[tokio::test]
async fn an_exhausted_message_is_failed_and_replay_delivers_it_again() {
    let s = TestServer::with(|c| {
        fast(c, &["0s", "100ms"]);
        allow_loopback(c);
    })
    .await;
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    let rx = Receiver::start("127.0.0.1", move |_, _| {
        if h.load(std::sync::atomic::Ordering::SeqCst) {
            (204, vec![], String::new())
        } else {
            (503, vec![], "down".into())
        }
    })
    .await;
    let before = s.publish("audit", "x.old", json!({})).await;
    let ep = create_endpoint(&s, json!({"url": rx.url("/"), "channels": ["audit"]})).await;
    let id = ep["id"].as_str().unwrap();
    let cursor = s.publish("audit", "x.new", json!({"v": 1})).await;
    let a = wait_attempts(&s, id, "two failed attempts, nothing pending", |a| {
        a.len() == 2 && a.iter().all(|x| x["status"] == "failed")
    })
    .await;
    assert_eq!(a[0]["attempt"], 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 2, "no third attempt past the schedule");
    assert!(
        rx.received()
            .iter()
            .all(|r| r.json()["id"] == cursor.as_str()),
        "the endpoint gets nothing from before it existed"
    );

    healthy.store(true, std::sync::atomic::Ordering::SeqCst);
    for bad in [
        json!({"since": "nope"}),
        json!({"since": "5-zzzzzz"}),
        json!({}),
        json!({"since": before, "x": 1}),
    ] {
        let r = s
            .client
            .post(s.url(&format!("/v1/endpoints/{id}/replay")))
            .json(&bad)
            .send()
            .await
            .unwrap();
        let (status, code, _) = error_of(r).await;
        assert_eq!(status, 400, "{bad}");
        assert!(
            code == "invalid_cursor" || code == "invalid_endpoint",
            "{code}"
        );
    }
    let r = s
        .client
        .post(s.url(&format!("/v1/endpoints/{id}/replay")))
        .json(&json!({"since": before}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"queued": 1}));
    let got = rx.wait_for(3, T).await;
    assert_eq!(
        got[2].id, got[0].id,
        "a replay keeps the message's webhook-id"
    );
    assert_eq!(got[2].json()["id"], cursor.as_str());
    wait_attempts(&s, id, "the replay succeeded", |a| {
        a.first()
            .is_some_and(|x| x["status"] == "succeeded" && x["response_status"] == 204)
    })
    .await;

    // `earliest` replays the retained history: both events (the old one too, explicitly asked).
    let r = s
        .client
        .post(s.url(&format!("/v1/endpoints/{id}/replay")))
        .json(&json!({"since": "earliest"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"queued": 2}));
    rx.wait_for(5, T).await;
}

#[tokio::test]
async fn gone_disables_and_retry_after_is_honoured_within_the_schedule() {
    let s = TestServer::with(|c| {
        fast(c, &["0s", "100ms", "2s"]);
        allow_loopback(c);
    })
    .await;
    let gone = Receiver::start("127.0.0.1", |_, _| (410, vec![], "gone".into())).await;
    let busy = Receiver::start("127.0.0.1", |n, _| match n {
        0 => (429, vec![("retry-after".into(), "1".into())], String::new()),
        1 => (
            503,
            vec![("retry-after".into(), "3600".into())],
            String::new(),
        ),
        _ => (200, vec![], String::new()),
    })
    .await;
    let g = create_endpoint(&s, json!({"url": gone.url("/"), "channels": ["c"]})).await;
    let b = create_endpoint(&s, json!({"url": busy.url("/"), "channels": ["c"]})).await;
    s.publish("c", "t", json!({})).await;

    let e = wait_endpoint(&s, g["id"].as_str().unwrap(), "410 disables", |e| {
        e["enabled"] == false
    })
    .await;
    assert!(
        e["disabled_reason"].as_str().unwrap().contains("410"),
        "{e}"
    );

    let got = busy.wait_for(3, T).await;
    let gap1 = got[1].at - got[0].at;
    let gap2 = got[2].at - got[1].at;
    assert!(
        gap1 >= Duration::from_millis(1000),
        "Retry-After: 1 was honoured: {gap1:?}"
    );
    assert!(gap1 < Duration::from_millis(1900), "{gap1:?}");
    assert!(
        gap2 >= Duration::from_secs(2) && gap2 < Duration::from_secs(3),
        "Retry-After: 3600 is cut to the longest delay (2s): {gap2:?}"
    );
    assert!(
        got.iter().all(|r| r.id == got[0].id),
        "one message, three attempts"
    );
    // A second event reaches only the endpoint that is still enabled.
    s.publish("c", "t", json!({})).await;
    busy.wait_for(4, T).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        gone.received().len(),
        1,
        "a disabled endpoint gets nothing new"
    );
    let r = s
        .client
        .post(s.url(&format!(
            "/v1/endpoints/{}/replay",
            g["id"].as_str().unwrap()
        )))
        .json(&json!({"since":"earliest"}))
        .send()
        .await
        .unwrap();
    let (status, code, _) = error_of(r).await;
    assert_eq!((status, code.as_str()), (409, "endpoint_disabled"));
    let _ = b;
}

#[tokio::test]
async fn an_endpoint_failing_for_too_long_is_disabled_with_the_reason() {
    let s = TestServer::with(|c| {
        fast(c, &["0s", "150ms", "150ms", "150ms", "150ms", "150ms"]);
        c.delivery.disable_after = Dur::parse("300ms").unwrap();
        allow_loopback(c);
    })
    .await;
    let rx = Receiver::start("127.0.0.1", |_, _| (500, vec![], String::new())).await;
    let ep = create_endpoint(&s, json!({"url": rx.url("/"), "channels": ["c"]})).await;
    let id = ep["id"].as_str().unwrap();
    s.publish("c", "t", json!({})).await;
    let e = wait_endpoint(&s, id, "disabled", |e| e["enabled"] == false).await;
    let reason = e["disabled_reason"].as_str().unwrap();
    assert!(
        reason.contains("disable_after") && reason.contains("HTTP 500"),
        "{reason}"
    );
    assert!(e["failing_since"].is_string());
    let n = rx.received().len();
    assert!(
        (2..6).contains(&n),
        "disabled before the schedule ran out: {n}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx.received().len(),
        n,
        "nothing is sent to a disabled endpoint"
    );

    // Enabling it again clears the reason, and pending deliveries resume.
    let r = s
        .client
        .patch(s.url(&format!("/v1/endpoints/{id}")))
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["enabled"], true);
    assert!(v["disabled_reason"].is_null() && v["failing_since"].is_null());
    rx.wait_for(n + 1, T).await;
}

#[tokio::test]
async fn rotation_signs_with_both_secrets_during_the_overlap() {
    let s = TestServer::with(|c| {
        fast(c, &["0s"]);
        allow_loopback(c);
    })
    .await;
    let rx = Receiver::ok("127.0.0.1").await;
    let ep = create_endpoint(&s, json!({"url": rx.url("/"), "channels": ["c"]})).await;
    let id = ep["id"].as_str().unwrap();
    let old = ep["secret"].as_str().unwrap().to_string();
    let r: Value = s
        .client
        .post(s.url(&format!("/v1/endpoints/{id}/rotate")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let new = r["secret"].as_str().unwrap().to_string();
    assert!(new.starts_with("whsec_") && new != old);
    assert!(r["previous_secret_expires_at"].is_string());
    let shown: Value = get_json(&s, &format!("/v1/endpoints/{id}/secret")).await;
    assert_eq!(shown["secret"], new.as_str());
    assert_eq!(shown["secrets"].as_array().unwrap().len(), 2);
    assert!(
        get_json(&s, &format!("/v1/endpoints/{id}"))
            .await
            .get("secret")
            .is_none(),
        "GET never shows secrets"
    );

    s.publish("c", "t", json!({})).await;
    let got = rx.wait_for(1, T).await;
    assert_eq!(
        got[0].signature.split(' ').count(),
        2,
        "{}",
        got[0].signature
    );
    verify_all(&old, &got);
    verify_all(&new, &got);

    // With no overlap the old secret stops at once.
    let r: Value = s
        .client
        .post(s.url(&format!("/v1/endpoints/{id}/rotate")))
        .json(&json!({"overlap": "0s"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let newest = r["secret"].as_str().unwrap().to_string();
    s.publish("c", "t", json!({})).await;
    let got = rx.wait_for(2, T).await;
    assert_eq!(got[1].signature.split(' ').count(), 1);
    verify_all(&newest, &got[1..]);
    assert_ne!(standardwebhooks_verify(&new, &got[1..])[0], "ok");
}

#[tokio::test]
async fn endpoints_api_validates_and_changes_nothing_on_bad_input() {
    let s = TestServer::with(|c| {
        c.auth.admin_keys = vec!["ak_test".into()];
        c.auth.publish_keys = vec!["pk_test".into()];
        c.delivery.allow_targets = vec!["127.0.0.2/32".into()];
    })
    .await;
    let post = |body: Value, key: Option<&'static str>| {
        let mut r = s.client.post(s.url("/v1/endpoints")).json(&body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let good = json!({"url": "http://127.0.0.2:9/hook", "channels": ["c"]});
    assert_eq!(
        error_of(post(good.clone(), None).await.unwrap()).await.1,
        "unauthorized"
    );
    assert_eq!(
        error_of(post(good.clone(), Some("pk_test")).await.unwrap())
            .await
            .0,
        401
    );

    let cases = [
        (
            json!({"url": "http://127.0.0.1:9/", "channels": ["c"]}),
            "forbidden_target",
        ),
        (
            json!({"url": "http://[::1]:9/", "channels": ["c"]}),
            "forbidden_target",
        ),
        (
            json!({"url": "http://[::ffff:127.0.0.1]:9/", "channels": ["c"]}),
            "forbidden_target",
        ),
        (
            json!({"url": "http://169.254.169.254/latest", "channels": ["c"]}),
            "forbidden_target",
        ),
        (
            json!({"url": "http://10.0.0.1/", "channels": ["c"]}),
            "forbidden_target",
        ),
        (
            json!({"url": "ftp://example.com/", "channels": ["c"]}),
            "invalid_url",
        ),
        (
            json!({"url": "not a url", "channels": ["c"]}),
            "invalid_url",
        ),
        (
            json!({"url": "http://user:pw@example.com/", "channels": ["c"]}),
            "invalid_url",
        ),
        (
            json!({"url": format!("http://example.com/{}", "a".repeat(3000)), "channels": ["c"]}),
            "invalid_url",
        ),
        (
            json!({"url": "http://example.com/", "channels": []}),
            "invalid_channel",
        ),
        (
            json!({"url": "http://example.com/", "channels": ["bad channel"]}),
            "invalid_channel",
        ),
        (
            json!({"url": "http://example.com/", "channels": ["c"], "types": [""]}),
            "invalid_type",
        ),
        (
            json!({"url": "http://example.com/", "channels": ["c"], "rate_limit": 0}),
            "invalid_rate_limit",
        ),
        (
            json!({"url": "http://example.com/", "channels": ["c"], "secret": "whsec_short"}),
            "invalid_secret",
        ),
        (
            json!({"url": "http://example.com/", "channels": ["c"], "colour": "red"}),
            "invalid_endpoint",
        ),
        (json!({"channels": ["c"]}), "invalid_endpoint"),
        (json!([1, 2]), "invalid_endpoint"),
    ];
    for (body, code) in cases {
        let (status, got, message) =
            error_of(post(body.clone(), Some("ak_test")).await.unwrap()).await;
        assert_eq!((status, got.as_str()), (400, code), "{body}: {message}");
        if code == "forbidden_target" {
            assert!(message.contains("may not target"), "{message}");
        }
    }
    let r = s
        .client
        .post(s.url("/v1/endpoints"))
        .bearer_auth("ak_test")
        .header("content-type", "application/json")
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.1, "invalid_json");
    let list: Value = s
        .client
        .get(s.url("/v1/endpoints"))
        .bearer_auth("ak_test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["endpoints"], json!([]), "nothing was stored");

    // Positive control: the same shapes, valid, are accepted (127.0.0.2 is allow-listed).
    let r = post(json!({"url": "http://127.0.0.2:9/hook", "channels": ["c", "user:*"], "types": ["invoice.*"], "description": "billing", "rate_limit": 5}), Some("ak_test")).await.unwrap();
    assert_eq!(r.status(), 201);
    let ep: Value = r.json().await.unwrap();
    let id = ep["id"].as_str().unwrap();
    assert!(id.starts_with("ep_"));
    assert_eq!(ep["rate_limit"], 5);
    let path = format!("/v1/endpoints/{id}");
    let get = s.client.get(s.url(&path)).send().await.unwrap();
    assert_eq!(get.status(), 401, "reading an endpoint needs the admin key");

    let patch = |body: Value| {
        s.client
            .patch(s.url(&path))
            .bearer_auth("ak_test")
            .json(&body)
            .send()
    };
    let (status, code, _) =
        error_of(patch(json!({"url": "http://127.0.0.1:9/"})).await.unwrap()).await;
    assert_eq!((status, code.as_str()), (400, "forbidden_target"));
    let (_, code, _) = error_of(patch(json!({"channels": ["ok", "not ok"]})).await.unwrap()).await;
    assert_eq!(code, "invalid_channel");
    let v: Value = patch(json!({"types": [], "rate_limit": null, "description": "all"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["types"], json!([]));
    assert!(v["rate_limit"].is_null());
    assert_eq!(
        v["channels"],
        json!(["c", "user:*"]),
        "fields not named are kept"
    );
    let v: Value = patch(json!({"enabled": false}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["enabled"], false);
    assert_eq!(v["disabled_reason"], "disabled through the API");

    let list: Value = s
        .client
        .get(s.url("/v1/endpoints"))
        .bearer_auth("ak_test")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["endpoints"].as_array().unwrap().len(), 1);
    assert!(list["endpoints"][0].get("secret").is_none());
    let r = s
        .client
        .get(s.url(&format!("{path}/attempts?status=weird")))
        .bearer_auth("ak_test")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(r).await.1, "invalid_status");
    let r = s
        .client
        .delete(s.url(&path))
        .bearer_auth("ak_test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    for req in [
        s.client.get(s.url(&path)),
        s.client.delete(s.url(&path)),
        s.client.get(s.url(&format!("{path}/attempts"))),
        s.client.post(s.url(&format!("{path}/rotate"))),
    ] {
        let (status, code, _) = error_of(req.bearer_auth("ak_test").send().await.unwrap()).await;
        assert_eq!((status, code.as_str()), (404, "endpoint_not_found"));
    }
}

#[tokio::test]
async fn loopback_targets_are_refused_while_an_allowed_one_receives_and_redirects_are_not_followed()
{
    let s = TestServer::with(|c| {
        fast(c, &["0s"]);
        c.delivery.allow_targets = vec!["127.0.0.2/32".into()];
    })
    .await;
    let forbidden_v4 = Receiver::ok("127.0.0.1").await;
    let forbidden_v6 = Receiver::ok("[::1]").await;
    let port = forbidden_v4.addr.port();
    let target = forbidden_v4.url("/stolen");
    let allowed = Receiver::start("127.0.0.2", move |_, r| {
        if r.path == "/redirect" {
            (
                302,
                vec![("location".into(), target.clone())],
                String::new(),
            )
        } else {
            (200, vec![], String::new())
        }
    })
    .await;

    // Literal loopback addresses are refused at creation, with the reason.
    for url in [
        forbidden_v4.url("/"),
        format!("http://[::1]:{}/", forbidden_v6.addr.port()),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
    ] {
        let r = s
            .client
            .post(s.url("/v1/endpoints"))
            .json(&json!({"url": url, "channels": ["c"]}))
            .send()
            .await
            .unwrap();
        let (status, code, message) = error_of(r).await;
        assert_eq!((status, code.as_str()), (400, "forbidden_target"), "{url}");
        assert!(
            message.contains("loopback") || message.contains("IPv4-mapped"),
            "{message}"
        );
    }
    // A name is checked on what it resolves to, at delivery.
    let by_name = create_endpoint(
        &s,
        json!({"url": format!("http://localhost:{port}/by-name"), "channels": ["c"]}),
    )
    .await;
    let ok = create_endpoint(&s, json!({"url": allowed.url("/ok"), "channels": ["c"]})).await;
    let redirect = create_endpoint(
        &s,
        json!({"url": allowed.url("/redirect"), "channels": ["c"]}),
    )
    .await;
    s.publish("c", "t", json!({"n": 1})).await;

    let got = allowed.wait_for(2, T).await;
    verify_all(
        ok["secret"].as_str().unwrap(),
        &got.iter()
            .filter(|r| r.path == "/ok")
            .cloned()
            .collect::<Vec<_>>(),
    );
    let a = wait_attempts(
        &s,
        by_name["id"].as_str().unwrap(),
        "the name's attempt",
        |a| a.first().is_some_and(|x| x["status"] == "failed"),
    )
    .await;
    let error = a[0]["error"].as_str().unwrap();
    assert!(
        error.starts_with("forbidden_target")
            && error.contains("localhost")
            && error.contains("loopback"),
        "{error}"
    );
    assert!(a[0]["response_status"].is_null(), "nothing was sent");
    let a = wait_attempts(
        &s,
        redirect["id"].as_str().unwrap(),
        "the redirect's attempt",
        |a| a.first().is_some_and(|x| x["status"] == "failed"),
    )
    .await;
    assert_eq!(a[0]["response_status"], 302);
    assert!(
        a[0]["error"].as_str().unwrap().contains("not followed"),
        "{}",
        a[0]
    );
    let a = wait_attempts(
        &s,
        ok["id"].as_str().unwrap(),
        "the allowed delivery",
        |a| a.first().is_some_and(|x| x["status"] == "succeeded"),
    )
    .await;
    assert_eq!(a[0]["response_status"], 200);

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        forbidden_v4.received().is_empty(),
        "nothing reached 127.0.0.1: {:?}",
        forbidden_v4.received()
    );
    assert!(forbidden_v6.received().is_empty(), "nothing reached [::1]");
}

#[tokio::test]
async fn allow_private_targets_lifts_the_guard_for_development() {
    let s = TestServer::with(|c| {
        fast(c, &["0s"]);
        c.delivery.allow_private_targets = true;
    })
    .await;
    let rx = Receiver::ok("127.0.0.1").await;
    let ep = create_endpoint(
        &s,
        json!({"url": format!("http://localhost:{}/dev", rx.addr.port()), "channels": ["c"]}),
    )
    .await;
    s.publish("c", "t", json!({})).await;
    let got = rx.wait_for(1, T).await;
    verify_all(ep["secret"].as_str().unwrap(), &got);
}

#[tokio::test]
async fn a_dead_endpoint_does_not_delay_a_healthy_one() {
    let timeout = Duration::from_secs(4);
    let s = TestServer::with(|c| {
        fast(c, &["0s", "10s"]);
        c.delivery.timeout = Dur(timeout);
        c.delivery.workers = 8;
        c.delivery.per_endpoint = 2;
        allow_loopback(c);
    })
    .await;
    // Accepts connections and never answers.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    let dead_task = tokio::spawn(async move {
        while let Ok((sock, _)) = dead.accept().await {
            h.lock().unwrap().push(sock);
        }
    });
    let healthy = Receiver::ok("127.0.0.1").await;
    let d = create_endpoint(
        &s,
        json!({"url": format!("http://{dead_addr}/"), "channels": ["c"]}),
    )
    .await;
    create_endpoint(&s, json!({"url": healthy.url("/"), "channels": ["c"]})).await;

    let started = Instant::now();
    let batch: Vec<Value> = (0..40)
        .map(|i| json!({"channel": "c", "type": "t", "data": {"i": i}}))
        .collect();
    let r = s
        .client
        .post(s.url("/v1/publish"))
        .json(&json!({"events": batch}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    healthy.wait_for(40, timeout).await;
    let took = started.elapsed();
    assert!(took < timeout, "healthy deliveries finished in {took:?}");
    let a = attempts(&s, d["id"].as_str().unwrap()).await;
    assert!(
        a.iter().all(|x| x["status"] == "pending"),
        "the dead endpoint has not timed out yet: {a:?}"
    );
    assert!(
        !held.lock().unwrap().is_empty(),
        "the dead endpoint was being tried"
    );
    assert!(
        held.lock().unwrap().len() <= 2,
        "per_endpoint caps the dead endpoint's connections"
    );

    let a = wait_attempts(
        &s,
        d["id"].as_str().unwrap(),
        "the dead endpoint's timeout",
        |a| a.iter().any(|x| x["status"] == "failed"),
    )
    .await;
    let failed = a.iter().find(|x| x["status"] == "failed").unwrap();
    assert!(
        failed["error"].as_str().unwrap().contains("timed out"),
        "{failed}"
    );
    dead_task.abort();
}

// ---- on PostgreSQL -------------------------------------------------------------

/// The whole path on PostgreSQL: endpoint created over the API, an event
/// published, delivered signed to a real loopback receiver, retried once
/// (the first attempt gets a 500), and both attempts listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_on_postgresql_with_a_retry() {
    let db = crate::pg::PgTestDb::create().await;
    let s = TestServer::with(|c| {
        c.store.url = db.url.clone();
        fast(c, &["0s", "200ms", "400ms"]);
        c.delivery.allow_private_targets = true;
    })
    .await;
    let rx = Receiver::start("127.0.0.1", |n, _| {
        if n == 0 {
            (500, vec![], "not yet".into())
        } else {
            (200, vec![], "ok".into())
        }
    })
    .await;
    let ep = create_endpoint(&s, json!({"url": rx.url("/pg"), "channels": ["orders:*"]})).await;
    let id = ep["id"].as_str().unwrap();
    s.publish("other", "order.created", json!({"skip": true}))
        .await;
    let cursor = s
        .publish("orders:1", "order.created", json!({"n": 1}))
        .await;

    let got = rx.wait_for(2, T).await;
    assert_eq!(got[0].id, got[1].id, "one webhook-id across attempts");
    assert_eq!(got[1].json()["id"], cursor.as_str());
    assert_eq!(got[1].json()["data"], json!({"n": 1}));
    verify_all(ep["secret"].as_str().unwrap(), &got);
    let a = wait_attempts(&s, id, "two attempts", |a| a.len() == 2).await;
    let shape: Vec<(&str, u64)> = a
        .iter()
        .map(|x| {
            (
                x["status"].as_str().unwrap(),
                x["response_status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(shape, [("succeeded", 200), ("failed", 500)]);
    assert_eq!(a[1]["response_body"], "not yet");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rx.received().len(), 2, "nothing else was sent");
}

/// Two nodes on one PostgreSQL both run the dispatcher and the workers:
/// events published on either node reach the receiver exactly once each
/// (a healthy receiver, so no lease ever ends: no duplicate either).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_one_delivery_queue_without_duplicates() {
    let db = crate::pg::PgTestDb::create().await;
    let node = || {
        let url = db.url.clone();
        TestServer::with(move |c| {
            c.store.url = url;
            fast(c, &["0s", "1s"]);
            c.delivery.allow_private_targets = true;
        })
    };
    let a = node().await;
    let b = node().await;
    let rx = Receiver::ok("127.0.0.1").await;
    let ep = create_endpoint(&a, json!({"url": rx.url("/both"), "channels": ["jobs"]})).await;
    let id = ep["id"].as_str().unwrap();
    // The endpoint is visible from the other node too.
    assert_eq!(get_json(&b, &format!("/v1/endpoints/{id}")).await["id"], id);

    let mut expected = Vec::new();
    for i in 0..20 {
        let s = if i % 2 == 0 { &a } else { &b };
        expected.push(s.publish("jobs", "job.done", json!({"i": i})).await);
    }
    rx.wait_for(expected.len(), T).await;
    wait_attempts(&b, id, "all succeeded", |x| {
        x.len() == expected.len() && x.iter().all(|y| y["status"] == "succeeded")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = rx.received();
    let mut ids: Vec<String> = got
        .iter()
        .map(|r| r.json()["id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    expected.sort();
    assert_eq!(ids, expected, "each event delivered exactly once");
    verify_all(ep["secret"].as_str().unwrap(), &got);
}
