//! Property tests over every parser that sees untrusted bytes (issue 11):
//! provider signature headers, routing templates, cursors, configuration
//! values, JWT carriers (header, query, cookie), WebSocket ops and the lean
//! HTTP/1 head sniffer. Each asserts no panic, an answer, and — for every
//! refusal — the contract's error shape `{"error":{"code","message"}}`.
//!
//! Most properties go through a real server, so a panic anywhere on the path
//! (not only in the function named) shows as a dropped connection. Bounded
//! for CI (a few seconds in all); `PUSHGATE_FUZZ_CASES=5000` runs each
//! property longer.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config as RunConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::ingest::source;

const T: Duration = Duration::from_secs(10);

fn runner(default_cases: u32) -> TestRunner {
    let cases = std::env::var("PUSHGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    TestRunner::new(RunConfig {
        cases,
        failure_persistence: None,
        ..RunConfig::default()
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Fast, unlimited test servers: the properties send many refusals quickly.
fn fuzz_config(c: &mut pushgate::config::Config) {
    c.store.synchronous = "normal".into();
    c.limits.invalid_per_client = 0;
    c.websocket.messages_per_second = 0;
}

/// The contract's error: a 4xx/5xx with `{"error":{"code","message"}}`.
fn error_shape(status: u16, body: &str) -> Result<(), TestCaseError> {
    prop_assert!(status >= 400, "not an error: {status} {body}");
    let v: Value = serde_json::from_str(body)
        .map_err(|e| TestCaseError::fail(format!("{status}: not JSON ({e}): {body}")))?;
    prop_assert!(
        v["error"]["code"].as_str().is_some_and(|c| !c.is_empty()),
        "{v}"
    );
    prop_assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    Ok(())
}

async fn send(req: reqwest::RequestBuilder) -> Result<(u16, String), TestCaseError> {
    let r = req
        .send()
        .await
        .map_err(|e| TestCaseError::fail(format!("no answer (did the server panic?): {e}")))?;
    let status = r.status().as_u16();
    Ok((status, r.text().await.unwrap_or_default()))
}

/// Printable ASCII and a few bytes beyond: what a header value may carry.
fn header_text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[ -~\u{80}-\u{ff}]{{0,{max}}}")).unwrap()
}

fn valid_header(v: &str) -> Option<http::HeaderValue> {
    http::HeaderValue::from_str(v).ok()
}

// ─── provider signature headers ────────────────────────────────────────────

fn signature_value() -> impl Strategy<Value = String> {
    prop_oneof![
        header_text(120),
        "t=[0-9a-z+-]{0,14}(,v[0-9]=[0-9a-fA-F]{0,70}){0,4}(,t=[0-9]{0,5})?",
        "(sha256|sha1)?=?[0-9a-fA-F]{0,70}",
        "[A-Za-z0-9+/=]{0,50}",
        "(v[0-9a],[A-Za-z0-9+/=]{0,50} ?){0,4}",
    ]
}

#[test]
fn signature_headers_of_every_provider() {
    // The parsers alone, over any text.
    let mut r = runner(256);
    r.run(&(header_text(200), signature_value()), |(a, b)| {
        for v in [a.as_str(), b.as_str()] {
            let _ = pushgate::ingest::stripe::parse_header(v);
            let _ = pushgate::ingest::github::parse_header(v);
            let _ = pushgate::ingest::shopify::parse_header(v);
            let _ = pushgate::ingest::standard::parse_signatures(v);
            for enc in [
                pushgate::ingest::hmac::Encoding::Hex,
                pushgate::ingest::hmac::Encoding::Base64,
            ] {
                let _ = pushgate::ingest::hmac::parse_signature(v, "sha256=", enc);
            }
        }
        Ok(())
    })
    .unwrap();

    // And through the server: never accepted, always the contract's error.
    let rt = rt();
    let s = rt.block_on(TestServer::with(|c| {
        fuzz_config(c);
        for kind in ["stripe", "github", "shopify", "standard", "hmac"] {
            c.sources.push(source(kind));
        }
    }));
    let strategy = (
        prop::sample::select(vec![
            ("stripe", "stripe-signature"),
            ("github", "x-hub-signature-256"),
            ("shopify", "x-shopify-hmac-sha256"),
            ("standard", "webhook-signature"),
            ("hmac", "x-signature"),
        ]),
        signature_value(),
        "[ -~]{0,20}",
        "[0-9-]{0,12}",
        prop::collection::vec(any::<u8>(), 0..300),
    );
    let mut r = runner(96);
    r.run(&strategy, |((kind, header), value, id, ts, body)| {
        rt.block_on(async {
            let mut req = s
                .client
                .post(s.url(&format!("/webhooks/{kind}")))
                .header("content-type", "application/json")
                .body(body);
            if let Some(v) = valid_header(&value) {
                req = req.header(header, v);
            }
            for (name, v) in [("webhook-id", &id), ("webhook-timestamp", &ts)] {
                if let Some(v) = valid_header(v) {
                    req = req.header(name, v);
                }
            }
            let (status, text) = send(req).await?;
            prop_assert!(matches!(status, 400 | 401), "{kind}: {status} {text}");
            error_shape(status, &text)
        })
    })
    .unwrap();
}

// ─── routing templates ─────────────────────────────────────────────────────

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[ -~é:{}/]{0,30}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_.]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

#[test]
fn routing_templates() {
    let template = prop_oneof![
        "[ -~]{0,40}",
        "[a-z:]{0,6}(\\{[a-z_.\\-]{0,12}\\}[a-z:/]{0,4}){0,3}",
        "user:\\{(data|headers)\\.[a-z_.\\-\\[\\]0-9]{0,16}\\}",
    ];
    let mut r = runner(256);
    r.run(
        &(template, json_value(), "[ -~]{0,20}"),
        |(t, body, kind)| {
            let mut cfg = source("stripe");
            cfg.channel = Some(t.clone());
            cfg.fallback_channel = Some("fb".into());
            match pushgate::ingest::route::Routes::from_config(&cfg, 3) {
                Ok(routes) => {
                    let mut headers = http::HeaderMap::new();
                    headers.insert("x-shop", "shop.example".parse().unwrap());
                    let channels = routes.route(&kind, &body, &headers);
                    prop_assert!(!channels.is_empty());
                    for c in &channels {
                        prop_assert!(pushgate::store::valid_channel(c), "`{t}` routed to `{c}`");
                    }
                }
                Err(e) => prop_assert!(e.to_string().contains("sources[3]"), "{e}"),
            }
            Ok(())
        },
    )
    .unwrap();
}

// ─── cursors ───────────────────────────────────────────────────────────────

#[test]
fn cursors_from_clients() {
    let rt = rt();
    let s = rt.block_on(TestServer::with(fuzz_config));
    let real = rt.block_on(s.publish("c", "t", json!(1)));
    let cursor = prop_oneof![
        "[0-9]{0,25}-[a-z0-9]{0,8}",
        "-?[0-9]{1,20}",
        "[ -~]{0,40}",
        Just("earliest".to_string()),
        Just(real.clone()),
        "[0-9]{1,3}".prop_map(move |n| format!("{n}{}", &real[real.find('-').unwrap()..])),
    ];
    let mut r = runner(96);
    r.run(&cursor, |c| {
        rt.block_on(async {
            // Polling: a page (maybe with `reset`), or the contract's error.
            let (status, text) = send(
                s.client
                    .get(s.url("/v1/events"))
                    .query(&[("channel", "c"), ("after", c.as_str())]),
            )
            .await?;
            if status == 200 {
                let v: Value = serde_json::from_str(&text).unwrap();
                prop_assert!(v["next"].is_string() && v["events"].is_array(), "{v}");
            } else {
                error_shape(status, &text)?;
            }
            // SSE: `Last-Event-ID` is resumed from or reset, never refused.
            if let Some(h) = valid_header(&c) {
                let resp = s
                    .client
                    .get(s.url("/v1/stream?channel=c"))
                    .header("last-event-id", h)
                    .send()
                    .await
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let status = resp.status().as_u16();
                if status != 200 {
                    error_shape(status, &resp.text().await.unwrap_or_default())?;
                }
            }
            Ok(())
        })
    })
    .unwrap();
}

// ─── configuration values ──────────────────────────────────────────────────

#[test]
fn configuration_values() {
    let keys = vec![
        ("PUSHGATE_SERVER__LISTEN", "server.listen"),
        ("PUSHGATE_SERVER__HEARTBEAT", "server.heartbeat"),
        ("PUSHGATE_SERVER__MAX_BODY", "server.max_body"),
        ("PUSHGATE_SERVER__HEADER_TIMEOUT", "server.header_timeout"),
        ("PUSHGATE_SERVER__CORS_ORIGINS", "server.cors_origins"),
        ("PUSHGATE_SERVER__TRUSTED_PROXIES", "server.trusted_proxies"),
        (
            "PUSHGATE_SERVER__SUBSCRIBER_QUEUE",
            "server.subscriber_queue",
        ),
        ("PUSHGATE_STORE__URL", "store.url"),
        ("PUSHGATE_STORE__RETENTION", "store.retention"),
        ("PUSHGATE_STORE__SYNCHRONOUS", "store.synchronous"),
        ("PUSHGATE_AUTH__PUBLIC_CHANNELS", "auth.public_channels"),
        ("PUSHGATE_AUTH__JWT_SECRET", "auth.jwt_secret"),
        ("PUSHGATE_LIMITS__BODY_TIMEOUT", "limits.body_timeout"),
        (
            "PUSHGATE_LIMITS__BODY_BYTES_IN_FLIGHT",
            "limits.body_bytes_in_flight",
        ),
        (
            "PUSHGATE_LIMITS__CONNECTIONS_PER_CLIENT",
            "limits.connections_per_client",
        ),
        ("PUSHGATE_LIMITS__BATCH_SIZE", "limits.batch_size"),
        (
            "PUSHGATE_DELIVERY__RETRY_SCHEDULE",
            "delivery.retry_schedule",
        ),
        ("PUSHGATE_DELIVERY__ALLOW_TARGETS", "delivery.allow_targets"),
        ("PUSHGATE_WEBSOCKET__MAX_MESSAGE", "websocket.max_message"),
        ("PUSHGATE_WEBSOCKET__PONG_TIMEOUT", "websocket.pong_timeout"),
    ];
    let value = prop_oneof![
        "[ -~]{0,30}",
        "-?[0-9]{1,25}(ms|s|m|h|d|y|KiB|MiB|GiB|kB)?",
        "[1-9][0-9]{9,20}(s|m|h|d|y)",
        "[0-9]{1,3}(\\.[0-9]{1,3}){3}(/[0-9]{1,3})?(:[0-9]{1,6})?",
        "\\[(\"[ -~&&[^\"\\\\]]{0,12}\",?){0,3}\\]",
    ];
    let mut r = runner(512);
    r.run(&(prop::sample::select(keys), value), |((var, key), v)| {
        let section = key.split('.').next().unwrap();
        match pushgate::config::Config::load(None, vec![(var.to_string(), v.clone())]) {
            Ok(c) => {
                // What loads must be usable: durations have room for arithmetic.
                prop_assert!(c.server.heartbeat.0.checked_mul(4).is_some());
                prop_assert!(c.store.retention.0.checked_mul(4).is_some());
            }
            Err(e) => {
                let text = e.to_string();
                prop_assert!(text.contains(section), "{var}={v:?}: {text}");
            }
        }
        Ok(())
    })
    .unwrap();
    r.run(&"[ -~]{0,30}", |v| {
        let _ = pushgate::config::Dur::parse(&v);
        let _ = pushgate::config::ByteSize::parse(&v);
        Ok(())
    })
    .unwrap();
}

// ─── JWT carriers ──────────────────────────────────────────────────────────

fn b64(v: &Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_\\-]{0,40}\\.[A-Za-z0-9_\\-]{0,80}\\.[A-Za-z0-9_\\-]{0,43}",
        "[ -~]{0,100}",
        (json_value(), json_value(), "[A-Za-z0-9_\\-]{0,43}").prop_map(|(h, p, sig)| format!(
            "{}.{}.{sig}",
            b64(&h),
            b64(&p)
        )),
        (
            prop::sample::select(vec!["none", "HS256", "RS256", "ES256", "HS512", ""]),
            any::<i64>()
        )
            .prop_map(|(alg, exp)| format!(
                "{}.{}.",
                b64(&json!({"alg": alg, "typ": "JWT"})),
                b64(&json!({"sub": "x", "exp": exp, "subscribe": ["*"], "publish": ["*"]}))
            )),
    ]
}

#[test]
fn jwt_carriers() {
    let rt = rt();
    let s = rt.block_on(TestServer::with(|c| {
        fuzz_config(c);
        c.auth.jwt_secret = Some("fuzz-secret-that-is-long-enough-32b".into());
    }));
    let mut r = runner(128);
    r.run(&(token(), 0..5usize), |(t, carrier)| {
        rt.block_on(async {
            let mut req = s.client.get(s.url("/v1/events")).query(&[("channel", "c")]);
            match carrier {
                0 => req = req.query(&[("token", t.as_str())]),
                1 if valid_header(&format!("Bearer {t}")).is_some() => {
                    req = req.header("authorization", format!("Bearer {t}"))
                }
                2 if valid_header(&t).is_some() => req = req.header("authorization", t.clone()),
                3 if valid_header(&format!("pushgate_token={t}")).is_some() => {
                    req = req.header("cookie", format!("a=b; pushgate_token={t}; c"))
                }
                4 if valid_header(&t).is_some() => req = req.header("cookie", t.clone()),
                _ => {}
            }
            let (status, text) = send(req).await?;
            prop_assert!(matches!(status, 400 | 401 | 403), "{status} {text}");
            error_shape(status, &text)
        })
    })
    .unwrap();
}

// ─── WebSocket ops ─────────────────────────────────────────────────────────

fn ws_frame() -> impl Strategy<Value = String> {
    let op = prop::sample::select(vec![
        "subscribe",
        "unsubscribe",
        "publish",
        "refresh",
        "ping",
        "bogus",
        "",
    ]);
    let object = (
        op,
        proptest::option::of(prop::collection::vec("[ -~]{0,12}", 0..4)),
        proptest::option::of(json_value()),
        proptest::option::of("[ -~]{0,12}"),
        proptest::option::of(json_value()),
        proptest::option::of(json_value()),
    )
        .prop_map(|(op, channels, data, channel, since, reference)| {
            let mut o = json!({"op": op});
            if let Some(c) = channels {
                o["channels"] = json!(c);
            }
            if let Some(d) = data {
                o["data"] = d;
            }
            if let Some(c) = channel {
                o["channel"] = json!(c);
            }
            if let Some(s) = since {
                o["since"] = s;
            }
            if let Some(r) = reference {
                o["ref"] = r;
            }
            o.to_string()
        });
    prop_oneof![
        "[ -~]{0,80}",
        json_value().prop_map(|v| v.to_string()),
        object,
    ]
}

type WsStream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_connect(addr: SocketAddr) -> WsStream {
    tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws"))
        .await
        .expect("upgrade")
        .0
}

#[test]
fn websocket_ops() {
    let rt = rt();
    let s = rt.block_on(TestServer::with(fuzz_config));
    let ws = std::cell::RefCell::new(Some(rt.block_on(ws_connect(s.addr))));
    let n = std::cell::Cell::new(0u64);
    let mut r = runner(128);
    r.run(&ws_frame(), |frame| {
        n.set(n.get() + 1);
        let taken = ws.borrow_mut().take();
        rt.block_on(async {
            let mut conn = match taken {
                Some(c) => c,
                None => ws_connect(s.addr).await,
            };
            let sentinel = format!("sentinel-{}", n.get());
            let sent = conn.send(Message::text(frame.clone())).await.is_ok()
                && conn
                    .send(Message::text(
                        json!({"op": "ping", "ref": sentinel}).to_string(),
                    ))
                    .await
                    .is_ok();
            prop_assert!(sent, "the server went away before {frame}");
            loop {
                let next = tokio::time::timeout(T, conn.next())
                    .await
                    .map_err(|_| TestCaseError::fail(format!("no reply to {frame}")))?;
                match next {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t)
                            .map_err(|e| TestCaseError::fail(format!("{e}: {t}")))?;
                        let op = v["op"].as_str().unwrap_or_default();
                        prop_assert!(!op.is_empty(), "{v}");
                        if op == "error" {
                            prop_assert!(v["code"].is_string() && v["message"].is_string(), "{v}");
                        }
                        if op == "pong" && v["ref"] == sentinel.as_str() {
                            *ws.borrow_mut() = Some(conn);
                            return Ok(());
                        }
                    }
                    Some(Ok(Message::Close(c))) => {
                        // A deliberate close carries its code; then reconnect.
                        prop_assert!(c.is_some(), "closed without a code after {frame}");
                        return Ok(());
                    }
                    Some(Ok(_)) => continue,
                    other => {
                        return Err(TestCaseError::fail(format!(
                            "connection lost after {frame}: {other:?}"
                        )));
                    }
                }
            }
        })
    })
    .unwrap();
}

// ─── the lean HTTP/1 head sniffer ──────────────────────────────────────────

#[test]
fn stream_request_heads() {
    let rt = rt();
    let s = rt.block_on(TestServer::with(|c| {
        fuzz_config(c);
        c.server.header_timeout = pushgate::config::Dur(Duration::from_millis(300));
    }));
    let head = (
        "[?&=a-zA-Z0-9%:,._\\-]{0,40}",
        prop::sample::select(vec!["HTTP/1.1", "HTTP/1.0", "HTTP/1.x", "HTTP/2.0", ""]),
        prop::collection::vec("[ -~]{0,40}", 0..6),
        prop::sample::select(vec!["\r\n", "\r\n", "\r\n", "\n"]),
        any::<bool>(),
    );
    let mut r = runner(64);
    r.run(&head, |(query, version, lines, eol, host)| {
        let mut text = format!("GET /v1/stream{query} {version}{eol}");
        if host {
            text.push_str(&format!("Host: 127.0.0.1{eol}"));
        }
        for l in &lines {
            text.push_str(l);
            text.push_str(eol);
        }
        text.push_str(eol);
        rt.block_on(async {
            let mut c = TcpStream::connect(s.addr).await.unwrap();
            c.write_all(text.as_bytes()).await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 2048];
            // Until the head and any error body are in, or the server closes.
            loop {
                match tokio::time::timeout(T, c.read(&mut chunk)).await {
                    Err(_) => return Err(TestCaseError::fail(format!("no answer to {text:?}"))),
                    Ok(Ok(0)) | Ok(Err(_)) => break,
                    Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
                }
                if buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200") {
                    return Ok(());
                }
            }
            if buf.is_empty() {
                // Closed without a word: only for a head that never ended.
                prop_assert!(eol == "\n", "closed unanswered: {text:?}");
                return Ok(());
            }
            let resp = String::from_utf8_lossy(&buf);
            let status: u16 = resp
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| TestCaseError::fail(format!("not HTTP: {resp:?}")))?;
            // The first response only (the rest of a head may have been
            // taken as a pipelined second request).
            let (head, rest) = resp.split_once("\r\n\r\n").unwrap_or((&resp, ""));
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok());
            let body = match len {
                Some(n) => rest.get(..n).unwrap_or(rest),
                None => rest,
            };
            if matches!(status, 400 | 431) && body.is_empty() {
                // hyper's own answer to a head it cannot parse (it has no
                // hook for the body); see docs/security.md.
                return Ok(());
            }
            error_shape(status, body)
        })
    })
    .unwrap();
    // The server is still fine.
    rt.block_on(async {
        let r = s.client.get(s.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    });
}
