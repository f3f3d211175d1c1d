//! Issue 11: the attacker's reproductions, each refused, each beside a
//! legitimate request of the same shape that still works.
//! (Item 2: stalled bodies and connections; item 4: development mode's
//! Origin and Host checks, and JSON-only bodies in every mode.)

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::common::*;
use crate::ingest::{payload, sign, source};

/// The second secret of `ingest::source`.
const SECRET: &str = "whsec_c2VjcmV0LXR3bw==";
const T: Duration = Duration::from_secs(15);

/// A raw HTTP/1.1 response: status, headers (lower-case), body.
#[derive(Debug)]
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

/// Reads one response (head + `content-length` body, or to EOF).
async fn read_response(stream: &mut TcpStream) -> Option<Raw> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match tokio::time::timeout(T, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no response within {T:?}"),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: Option<usize> = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok());
    let mut body = buf[head_end..].to_vec();
    if let Some(len) = len {
        while body.len() < len {
            match tokio::time::timeout(T, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                _ => break,
            }
        }
        body.truncate(len);
    }
    Some(Raw {
        status,
        head,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// Whether the server closed the connection (EOF or reset) within `T`.
async fn closed(stream: &mut TcpStream) -> bool {
    let mut chunk = [0u8; 1024];
    loop {
        match tokio::time::timeout(T, stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

async fn raw(addr: SocketAddr, request: String) -> Raw {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_response(&mut s).await.expect("a response")
}

/// A connection from another loopback address (each is its own client).
async fn connect_from(ip: &str, to: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    sock.connect(to).await.unwrap()
}

/// Sends a request head announcing `declared` bytes and `sent` of them, then
/// stalls (the issue's slow-body attack).
async fn stalled_body(addr: SocketAddr, path: &str, declared: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b' '; sent]).await.unwrap();
    s
}

/// Stalled bodies that stay stalled: one the server has already answered
/// (a probe got in between and it was the one refused) is replaced.
struct Stalls {
    addr: SocketAddr,
    declared: usize,
    sent: usize,
    conns: Vec<TcpStream>,
}

impl Stalls {
    async fn open(addr: SocketAddr, n: usize, declared: usize, sent: usize) -> Stalls {
        let mut conns = Vec::new();
        for _ in 0..n {
            conns.push(stalled_body(addr, "/v1/publish", declared, sent).await);
        }
        Stalls {
            addr,
            declared,
            sent,
            conns,
        }
    }

    async fn keep(&mut self) {
        for c in &mut self.conns {
            let mut probe = [0u8; 1];
            let answered = !matches!(c.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
            if answered {
                *c = stalled_body(self.addr, "/v1/publish", self.declared, self.sent).await;
            }
        }
    }
}

async fn publish_sized(s: &TestServer, pad: usize) -> (u16, Value, Option<String>) {
    let r = s
        .client
        .post(s.url("/v1/publish"))
        .json(&json!({"channel": "c", "data": "x".repeat(pad)}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (status, r.json().await.unwrap_or(Value::Null), retry)
}

/// Retries `f` until it reports true (the server needs a moment to see what
/// a raw socket did); panics after 200 tries.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never happened: {what}");
}

// ─── item 2: bodies and connections ────────────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408_and_its_connection_is_closed() {
    let s = TestServer::with(|c| {
        c.limits.body_timeout = pushgate::config::Dur(Duration::from_millis(800));
        c.sources.push(source("stripe"));
    })
    .await;
    // The issue's attack, small: announce 4 KiB, send all but 100 bytes, stall.
    let mut stalled = stalled_body(s.addr, "/webhooks/stripe", 4096, 3996).await;
    let r = read_response(&mut stalled).await.expect("an answer");
    assert_eq!(
        (r.status, r.code().as_str()),
        (408, "request_timeout"),
        "{r:?}"
    );
    assert!(r.head.contains("application/json"));
    assert!(closed(&mut stalled).await, "the connection is closed");

    // A byte at a time does not extend the deadline.
    let mut trickle = stalled_body(s.addr, "/v1/publish", 64, 0).await;
    let mut answer = None;
    for _ in 0..64 {
        if trickle.write_all(b" ").await.is_err() {
            break;
        }
        tokio::select! {
            r = read_response(&mut trickle) => { answer = r; break; }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let r = answer.expect("answered before the body was complete");
    assert_eq!((r.status, r.code().as_str()), (408, "request_timeout"));

    // Positive control: a body sent in pieces well within the deadline.
    let body = payload("evt_slow_ok", Some("7"));
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    let mut head = format!(
        "POST /webhooks/stripe HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n",
        s.addr,
        body.len()
    );
    for (k, v) in sign(
        "stripe",
        SECRET,
        body.as_bytes(),
        pushgate::auth::unix_now() as i64,
        "",
    ) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    c.write_all(head.as_bytes()).await.unwrap();
    let (a, b) = body.as_bytes().split_at(body.len() / 2);
    c.write_all(a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.write_all(b).await.unwrap();
    let r = read_response(&mut c).await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["duplicate"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_flight_are_capped_by_count() {
    let s = TestServer::with(|c| c.limits.bodies_in_flight = 2).await;
    let mut stalled = Stalls::open(s.addr, 2, 1000, 10).await;
    let mut refused = None;
    for _ in 0..200 {
        let (status, v, retry) = publish_sized(&s, 10).await;
        if status == 503 {
            refused = Some((v, retry));
            break;
        }
        stalled.keep().await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let (v, retry) = refused.expect("a third body is refused");
    assert_eq!(v["error"]["code"], "server_busy");
    assert!(retry.is_some(), "Retry-After");
    // Requests without a body are not held up.
    let r = s
        .client
        .get(s.url("/v1/events?channel=c"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The slots come back when the stalled clients go away.
    drop(stalled);
    eventually("publishing works again", || async {
        publish_sized(&s, 10).await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_in_flight_are_capped_by_bytes() {
    let s = TestServer::with(|c| {
        c.server.max_body = pushgate::config::ByteSize(32 << 10);
        c.limits.body_bytes_in_flight = pushgate::config::ByteSize(64 << 10);
    })
    .await;
    // Two clients hold 60,000 bytes between them...
    let mut stalled = Stalls::open(s.addr, 2, 32 << 10, 30_000).await;
    // ...so a 10 kB body does not fit...
    let mut refused = false;
    for _ in 0..200 {
        let (status, v, _) = publish_sized(&s, 10_000).await;
        if status == 503 {
            assert_eq!(v["error"]["code"], "server_busy");
            refused = true;
            break;
        }
        stalled.keep().await;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(refused, "a body past the byte cap is refused");
    // ...but a small one still does.
    let (status, v, _) = publish_sized(&s, 100).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_client_are_capped_in_the_accept_loop() {
    let s = TestServer::with(|c| c.limits.connections_per_client = 3).await;
    let healthz = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = connect_from("127.0.0.2", s.addr).await;
        c.write_all(healthz.as_bytes()).await.unwrap();
        assert_eq!(read_response(&mut c).await.unwrap().status, 200);
        held.push(c);
    }
    // The fourth from the same address is closed unread.
    let mut fourth = connect_from("127.0.0.2", s.addr).await;
    let _ = fourth.write_all(healthz.as_bytes()).await;
    assert!(read_response(&mut fourth).await.is_none(), "refused");
    // Another client is not affected.
    let mut other = connect_from("127.0.0.3", s.addr).await;
    other.write_all(healthz.as_bytes()).await.unwrap();
    assert_eq!(read_response(&mut other).await.unwrap().status, 200);
    // Closing one gives its slot back.
    held.pop();
    let mut back = false;
    for _ in 0..200 {
        let mut c = connect_from("127.0.0.2", s.addr).await;
        let _ = c.write_all(healthz.as_bytes()).await;
        if read_response(&mut c).await.is_some_and(|r| r.status == 200) {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(back, "a slot comes back");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_are_not_capped() {
    let s = TestServer::with(|c| {
        c.limits.connections_per_client = 2;
        c.server.trusted_proxies = vec!["127.0.0.4".into()];
    })
    .await;
    let healthz = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n\r\n", s.addr);
    let mut held = Vec::new();
    for i in 0..6 {
        let mut c = connect_from("127.0.0.4", s.addr).await;
        c.write_all(healthz.as_bytes()).await.unwrap();
        let r = read_response(&mut c).await;
        assert_eq!(r.map(|r| r.status), Some(200), "connection {i}");
        held.push(c);
    }
}

// ─── item 4: development mode's Origin and Host; JSON bodies ───────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_refuses_state_changes_from_foreign_pages() {
    let s = TestServer::start().await;
    let own = format!("http://{}", s.addr);
    let endpoint = r#"{"url":"https://attacker.example/hook","channels":["*"],"enabled":true}"#;
    // The issue's reproduction: a cross-site "simple" request.
    let r = s
        .client
        .post(s.url("/v1/endpoints"))
        .header("origin", "https://evil.example")
        .header("content-type", "text/plain")
        .body(endpoint)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "forbidden_origin");
    // Nor with a JSON type, nor on the other write routes.
    for (path, body) in [
        ("/v1/endpoints", endpoint),
        ("/v1/publish", r#"{"channel":"user:42","data":1}"#),
        ("/demo/pay", ""),
    ] {
        let r = s
            .client
            .post(s.url(path))
            .header("origin", "https://evil.example")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }
    let list: Value = s
        .client
        .get(s.url("/v1/endpoints"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        list["endpoints"].as_array().map(Vec::len),
        Some(0),
        "{list}"
    );
    assert!(read_all(&s.client, &s.base, "user:42").await.is_empty());

    // Positive controls: the server's own pages, loopback pages and curl.
    for origin in [Some(own.as_str()), Some("http://localhost:3000"), None] {
        let mut req = s
            .client
            .post(s.url("/v1/endpoints"))
            .json(&json!({"url": "https://example.com/hook", "channels": ["orders"]}));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        assert_eq!(req.send().await.unwrap().status(), 201, "{origin:?}");
    }
    let r = s
        .client
        .post(s.url("/demo/pay"))
        .header("origin", &own)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the demo page's Pay button");
    // Reading is not a state change: a foreign page's GET is left to CORS.
    let r = s
        .client
        .get(s.url("/v1/events?channel=x"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_refuses_websockets_from_foreign_pages() {
    let s = TestServer::start().await;
    let upgrade = |origin: &str| {
        let mut req = format!("ws://{}/v1/ws", s.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    match upgrade("https://evil.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            let v: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or(b"")).unwrap();
            assert_eq!(v["error"]["code"], "forbidden_origin");
        }
        other => panic!("expected a 403, got {:?}", other.map(|_| ())),
    }
    // Positive control: the server's own page.
    let (mut ws, resp) = upgrade(&format!("http://{}", s.addr))
        .await
        .expect("upgrade");
    assert_eq!(resp.status(), 101);
    let _ = ws.close(None).await;
    let _ = ws.next().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_mode_answers_only_to_loopback_names() {
    let s = TestServer::start().await;
    let port = s.addr.port();
    // The issue's DNS-rebinding reproduction, on the inspector and on both
    // SSE paths (the lean HTTP/1 one and hyper's).
    for path in [
        "/v1/inbound",
        "/v1/stream?channel=a",
        "/v1/events?channel=a",
    ] {
        let r = raw(
            s.addr,
            format!(
                "GET {path} HTTP/1.1\r\nHost: attacker.example:{port}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (421, "misdirected_request"),
            "{path}: {r:?}"
        );
    }
    // Positive controls: loopback names and addresses.
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        "app.localhost".into(),
    ] {
        let r = raw(
            s.addr,
            format!("GET /v1/inbound HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(r.status, 200, "{host}: {r:?}");
    }
    let mut sse = TcpStream::connect(s.addr).await.unwrap();
    sse.write_all(
        format!("GET /v1/stream?channel=a HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut first = [0u8; 12];
    sse.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_keys_any_host_is_answered() {
    let s = TestServer::with(|c| c.auth.publish_keys = vec!["pk_h".into()]).await;
    let r = raw(
        s.addr,
        "GET /healthz HTTP/1.1\r\nHost: pushgate.example.com\r\nConnection: close\r\n\r\n".into(),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_routes_refuse_other_content_types_in_every_mode() {
    let s = TestServer::with(|c| {
        c.auth.publish_keys = vec!["pk_j".into()];
        c.auth.public_channels = vec!["j".into()];
        c.sources.push(source("stripe"));
    })
    .await;
    let event = r#"{"channel":"j","data":1}"#;
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut req = s
            .client
            .post(s.url("/v1/publish"))
            .bearer_auth("pk_j")
            .body(event);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 415, "{ct:?}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unsupported_media_type");
    }
    assert!(read_all(&s.client, &s.base, "j").await.is_empty());
    // Positive controls: JSON with parameters; webhooks in whatever type
    // their provider uses (the signature authenticates them).
    let r = s
        .client
        .post(s.url("/v1/publish"))
        .bearer_auth("pk_j")
        .header("content-type", "application/json; charset=utf-8")
        .body(event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = payload("evt_plain", Some("1"));
    let mut headers = sign(
        "stripe",
        SECRET,
        body.as_bytes(),
        pushgate::auth::unix_now() as i64,
        "",
    );
    headers.retain(|(k, _)| k != "content-type");
    headers.push(("content-type".into(), "text/plain".into()));
    let (status, v) = crate::ingest::post(&s, "/webhooks/stripe", &headers, body).await;
    assert_eq!(status, 200, "{v}");
}

// ─── item 6: refusals are limited before they are written ──────────────────

async fn rejected_records(s: &TestServer) -> Vec<Value> {
    let v: Value = s
        .client
        .get(s.url("/v1/inbound?status=rejected&limit=500"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["inbound"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_refusals_are_not_recorded_and_records_keep_64_kib() {
    let s = TestServer::with(|c| {
        c.limits.invalid_per_client = 5;
        c.sources.push(source("stripe"));
    })
    .await;
    // The issue's reproduction: 60 bad-signature posts.
    let wrong = "whsec_d3Jvbmctc2VjcmV0";
    let body = payload("evt_bad", Some("1"));
    let bad = sign(
        "stripe",
        wrong,
        body.as_bytes(),
        pushgate::auth::unix_now() as i64,
        "",
    );
    let (mut refused, mut limited) = (0, 0);
    for _ in 0..60 {
        let (status, v) = crate::ingest::post(&s, "/webhooks/stripe", &bad, body.clone()).await;
        match status {
            401 => refused += 1,
            429 => {
                assert_eq!(v["error"]["code"], "rate_limited");
                limited += 1;
            }
            other => panic!("unexpected {other}: {v}"),
        }
    }
    assert!(limited > 0, "the limiter answered some: {refused} x 401");
    let records = rejected_records(&s).await;
    assert_eq!(
        records.len(),
        refused,
        "only the 401s are recorded ({limited} x 429)"
    );
    assert!(records.iter().all(|r| r["reason"] == "invalid_signature"));

    // Positive control: a valid delivery right after is accepted.
    let good = payload("evt_good", Some("1"));
    let headers = sign(
        "stripe",
        SECRET,
        good.as_bytes(),
        pushgate::auth::unix_now() as i64,
        "",
    );
    let (status, v) = crate::ingest::post(&s, "/webhooks/stripe", &headers, good).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_record_keeps_the_first_64_kib() {
    let s = TestServer::with(|c| c.sources.push(source("stripe"))).await;
    let wrong = "whsec_d3Jvbmctc2VjcmV0";
    let now = pushgate::auth::unix_now() as i64;
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(100_000));
    let small = "{\"pad\":\"x\"}".to_string();
    for body in [&big, &small] {
        let h = sign("stripe", wrong, body.as_bytes(), now, "");
        let (status, _) = crate::ingest::post(&s, "/webhooks/stripe", &h, body.clone()).await;
        assert_eq!(status, 401);
    }
    let records = rejected_records(&s).await;
    assert_eq!(records.len(), 2);
    let one = |id: &Value| {
        let url = s.url(&format!("/v1/inbound/{}", id.as_str().unwrap()));
        let client = s.client.clone();
        async move {
            client
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    // Newest first: the small one is kept whole (the control)...
    let small_record = one(&records[0]["id"]).await;
    assert_eq!(small_record["body"], small.as_str());
    assert_eq!(small_record["body_truncated"], false);
    // ...the big one is cut at 64 KiB and says so.
    let big_record = one(&records[1]["id"]).await;
    assert_eq!(big_record["size"], big.len());
    assert_eq!(big_record["body_truncated"], true);
    assert_eq!(big_record["body"].as_str().unwrap().len(), 64 << 10);
}

/// Rejected records of one source, counted page by page.
async fn count_rejected(s: &TestServer, source: &str) -> usize {
    let mut n = 0;
    let mut before = String::new();
    loop {
        let v: Value = s
            .client
            .get(s.url("/v1/inbound"))
            .query(&[("status", "rejected"), ("source", source), ("limit", "500")])
            .query(
                &[("before", before.as_str())]
                    .iter()
                    .filter(|(_, b)| !b.is_empty())
                    .collect::<Vec<_>>(),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        n += v["inbound"].as_array().unwrap().len();
        match v["next_before"].as_str() {
            Some(b) => before = b.to_string(),
            None => return n,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refusal_cap_is_per_source() {
    let s = TestServer::with(|c| {
        c.limits.invalid_per_client = 0;
        c.store.synchronous = "normal".into();
        c.sources.push(source("stripe"));
        c.sources.push(source("github"));
    })
    .await;
    let wrong = "whsec_d3Jvbmctc2VjcmV0";
    let now = pushgate::auth::unix_now() as i64;
    let body = payload("evt_noise", Some("1"));
    // A quiet source's one refusal, and one for a name nobody configured...
    let h = sign("github", wrong, body.as_bytes(), now, "gh-1");
    assert_eq!(
        crate::ingest::post(&s, "/webhooks/github", &h, body.clone())
            .await
            .0,
        401
    );
    for name in ["nope-1", "nope-2"] {
        let (status, _) = crate::ingest::post(&s, &format!("/webhooks/{name}"), &[], "{}").await;
        assert_eq!(status, 404);
    }
    // ...then a noisy sender past the cap.
    let h = sign("stripe", wrong, body.as_bytes(), now, "");
    for _ in 0..1010 {
        assert_eq!(
            crate::ingest::post(&s, "/webhooks/stripe", &h, body.clone())
                .await
                .0,
            401
        );
    }
    assert_eq!(
        count_rejected(&s, "stripe").await,
        1000,
        "the noisy source is capped"
    );
    assert_eq!(
        count_rejected(&s, "github").await,
        1,
        "the quiet one keeps its refusal"
    );
    assert_eq!(
        count_rejected(&s, "(unknown)").await,
        2,
        "unknown names share one bucket"
    );
}
