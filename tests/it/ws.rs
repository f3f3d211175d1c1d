//! WebSocket protocol (contract 3.2): every op and every error, with a real
//! WebSocket client (tokio-tungstenite) against a real server.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pushgate::config::{Config, Dur};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::common::*;

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "test-jwt-secret-for-ws";
const PUBLISH_KEY: &str = "pk_ws_test";

struct Ws {
    inner: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a connection ended.
#[derive(Debug, PartialEq)]
enum End {
    Close(u16),
    Dropped,
}

impl Ws {
    async fn connect(s: &TestServer, query: &str) -> Ws {
        Ws::try_connect(s, query, None).await.expect("upgrade")
    }

    async fn try_connect(
        s: &TestServer,
        query: &str,
        bearer: Option<&str>,
    ) -> Result<Ws, (u16, Value)> {
        let url = format!("ws://{}/v1/ws{query}", s.addr);
        let mut req = url.into_client_request().unwrap();
        if let Some(b) = bearer {
            req.headers_mut()
                .insert("authorization", format!("Bearer {b}").parse().unwrap());
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((inner, _)) => Ok(Ws { inner }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status().as_u16();
                let body = resp.body().clone().unwrap_or_default();
                Err((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
            }
            Err(e) => panic!("connect: {e}"),
        }
    }

    async fn send(&mut self, v: Value) {
        self.inner
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    async fn send_raw(&mut self, m: Message) {
        self.inner.send(m).await.expect("send");
    }

    /// The next JSON op (protocol pings are answered and skipped).
    async fn next(&mut self) -> Value {
        tokio::time::timeout(T, async {
            loop {
                match self.inner.next().await {
                    Some(Ok(Message::Text(t))) => {
                        return serde_json::from_str(&t).expect("JSON op");
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => panic!("expected a text frame, got {other:?}"),
                }
            }
        })
        .await
        .expect("timed out waiting for an op")
    }

    /// The next op, which must be `op`.
    async fn expect(&mut self, op: &str) -> Value {
        let v = self.next().await;
        assert_eq!(v["op"], op, "expected op {op}, got {v}");
        v
    }

    async fn expect_error(&mut self, code: &str) -> Value {
        let v = self.expect("error").await;
        assert_eq!(v["code"], code, "{v}");
        assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v
    }

    /// Reads until the connection ends; text frames on the way are returned too.
    async fn end(&mut self) -> (End, Vec<Value>) {
        let mut ops = Vec::new();
        let end = tokio::time::timeout(T, async {
            loop {
                match self.inner.next().await {
                    Some(Ok(Message::Close(Some(f)))) => return End::Close(f.code.into()),
                    Some(Ok(Message::Close(None))) => return End::Close(1005),
                    Some(Ok(Message::Text(t))) => ops.push(serde_json::from_str(&t).unwrap()),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return End::Dropped,
                }
            }
        })
        .await
        .expect("timed out waiting for the connection to end");
        (end, ops)
    }

    /// A round trip that proves the connection is still usable.
    async fn assert_alive(&mut self) {
        self.send(json!({"op":"ping","ref":"alive"})).await;
        let v = self.expect("pong").await;
        assert_eq!(v["ref"], "alive");
    }

    async fn subscribe(&mut self, channels: &[&str], since: Option<&str>) -> Value {
        let mut op = json!({"op":"subscribe","channels":channels,"ref":"s"});
        if let Some(s) = since {
            op["since"] = json!(s);
        }
        self.send(op).await;
        let v = self.expect("subscribed").await;
        assert_eq!(v["channels"], json!(channels));
        assert_eq!(v["ref"], "s");
        v
    }

    async fn event(&mut self) -> Value {
        let v = self.expect("event").await;
        v["event"].clone()
    }
}

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn now() -> u64 {
    pushgate::auth::unix_now()
}

fn secured(c: &mut Config) {
    c.auth.jwt_secret = Some(SECRET.into());
    c.auth.publish_keys = vec![PUBLISH_KEY.into()];
    c.auth.public_channels = vec!["public.*".into()];
}

async fn publish_with_key(s: &TestServer, channel: &str, data: Value) -> String {
    let r = s
        .client
        .post(s.url("/v1/publish"))
        .bearer_auth(PUBLISH_KEY)
        .json(&json!({"channel": channel, "type": "t", "data": data}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["ids"][0]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn subscribe_delivers_live_events_as_event_ops() {
    let s = TestServer::start().await;
    let mut ws = Ws::connect(&s, "").await;
    let sub = ws.subscribe(&["user:42"], None).await;
    assert!(
        sub["cursor"].as_str().is_some(),
        "subscribed carries the start cursor"
    );
    let id = s
        .publish(
            "user:42",
            "payment_intent.succeeded",
            json!({"amount": 2000}),
        )
        .await;
    s.publish("other", "t", json!(1)).await;
    let id2 = s.publish("user:42", "t", json!(2)).await;
    let e = ws.event().await;
    assert_eq!(e["id"], id);
    assert_eq!(e["channel"], "user:42");
    assert_eq!(e["type"], "payment_intent.succeeded");
    assert_eq!(e["source"], "publish");
    assert_eq!(e["data"], json!({"amount": 2000}));
    assert_eq!(ws.event().await["id"], id2, "the other channel is not sent");

    let metrics = s.client.get(s.url("/metrics")).send().await.unwrap();
    let text = metrics.text().await.unwrap();
    assert!(
        text.lines()
            .any(|l| l.starts_with("pushgate_deliveries_total{transport=\"ws\"} 2")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("pushgate_open_streams{transport=\"ws\"} 1")),
        "{text}"
    );
}

#[tokio::test]
async fn since_resumes_from_the_cursor_then_continues_live_without_duplicates() {
    let s = TestServer::start().await;
    let a = s.publish("room", "t", json!(1)).await;
    let b = s.publish("room", "t", json!(2)).await;
    let c = s.publish("room", "t", json!(3)).await;

    let mut ws = Ws::connect(&s, "").await;
    ws.subscribe(&["room"], Some(&a)).await;
    assert_eq!(ws.event().await["id"], b);
    assert_eq!(ws.event().await["id"], c);
    let d = s.publish("room", "t", json!(4)).await;
    assert_eq!(ws.event().await["id"], d);

    // `earliest` replays everything retained; a second subscription on the
    // same connection has its own cursor.
    let mut ws2 = Ws::connect(&s, "").await;
    ws2.subscribe(&["room"], Some("earliest")).await;
    for id in [&a, &b, &c, &d] {
        assert_eq!(&ws2.event().await["id"], id);
    }
    ws2.subscribe(&["other"], Some(&c)).await;
    let e = s.publish("other", "t", json!(5)).await;
    assert_eq!(ws2.event().await["id"], e);
    ws2.assert_alive().await;
}

#[tokio::test]
async fn a_cursor_that_cannot_be_honoured_gets_a_reset_op_and_continues_from_the_oldest() {
    let s = TestServer::start().await;
    let a = s.publish("room", "t", json!(1)).await;
    for bad in ["garbage", "1-someotherlog", "999999-x"] {
        let mut ws = Ws::connect(&s, "").await;
        ws.subscribe(&["room"], Some(bad)).await;
        let r = ws.expect("reset").await;
        assert!(
            ["cursor_invalid", "cursor_foreign", "cursor_ahead"]
                .contains(&r["reason"].as_str().unwrap()),
            "{r}"
        );
        assert_eq!(r["channels"], json!(["room"]));
        assert!(r["resume_from"].as_str().is_some());
        assert_eq!(
            ws.event().await["id"],
            a,
            "continues from the oldest retained event"
        );
    }
}

#[tokio::test]
async fn a_lagging_subscription_catches_up_from_the_log_in_order() {
    // A queue of 16 and a batch of 300 in one commit: the hub drops the
    // queue and the connection reads the log from its cursor.
    let s = TestServer::with(|c| c.server.subscriber_queue = 16).await;
    let mut ws = Ws::connect(&s, "").await;
    ws.subscribe(&["bulk"], None).await;
    let events: Vec<Value> = (0..300)
        .map(|i| json!({"channel":"bulk","type":"t","data":i}))
        .collect();
    let r: Value = s
        .client
        .post(s.url("/v1/publish"))
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids = r["ids"].as_array().unwrap().clone();
    for (i, id) in ids.iter().enumerate() {
        let e = ws.event().await;
        assert_eq!(&e["id"], id);
        assert_eq!(e["data"], json!(i));
    }
    let last = s.publish("bulk", "t", json!("after")).await;
    assert_eq!(
        ws.event().await["id"],
        last,
        "nothing repeats after the catch-up"
    );
}

#[tokio::test]
async fn unsubscribe_stops_only_the_named_channels() {
    let s = TestServer::start().await;
    let mut ws = Ws::connect(&s, "").await;
    ws.subscribe(&["a", "b"], None).await;
    ws.send(json!({"op":"unsubscribe","channels":["a"],"ref":7}))
        .await;
    let u = ws.expect("unsubscribed").await;
    assert_eq!(u["channels"], json!(["a"]));
    assert_eq!(u["ref"], 7);
    s.publish("a", "t", json!("gone")).await;
    let b = s.publish("b", "t", json!("kept")).await;
    assert_eq!(ws.event().await["id"], b);

    ws.send(json!({"op":"unsubscribe","channels":["a"]})).await;
    ws.expect_error("not_subscribed").await;
    ws.send(json!({"op":"unsubscribe","channels":["b"]})).await;
    ws.expect("unsubscribed").await;
    s.publish("b", "t", json!("gone too")).await;
    ws.assert_alive().await;
    // Subscribing again works once the channel is free.
    ws.subscribe(&["a"], None).await;
}

#[tokio::test]
async fn publish_is_acked_with_the_cursor_after_it_is_durable() {
    let s = TestServer::start().await;
    let mut reader = Ws::connect(&s, "").await;
    reader.subscribe(&["chat:room1"], None).await;
    let mut ws = Ws::connect(&s, "").await;
    ws.send(json!({"op":"publish","channel":"chat:room1","type":"msg","data":{"text":"hi"},"ref":"c1","id":"m-1"}))
        .await;
    let ack = ws.expect("ack").await;
    assert_eq!(ack["ref"], "c1");
    assert_eq!(ack["duplicate"], false);
    let id = ack["id"].as_str().unwrap().to_string();

    let e = reader.event().await;
    assert_eq!(e["id"], id);
    assert_eq!(e["source"], "ws");
    assert_eq!(e["source_id"], "m-1");
    assert_eq!(e["type"], "msg");
    assert_eq!(e["data"], json!({"text":"hi"}));

    // Durable: polling the log finds it.
    let page: Value = s
        .client
        .get(s.url("/v1/events?channel=chat:room1&after=earliest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["events"][0]["id"], id);

    // The same idempotency key: the first cursor, nothing new stored.
    ws.send(json!({"op":"publish","channel":"chat:room1","data":{"text":"again"},"ref":"c2","id":"m-1"}))
        .await;
    let dup = ws.expect("ack").await;
    assert_eq!(dup["ref"], "c2");
    assert_eq!(dup["id"], id);
    assert_eq!(dup["duplicate"], true);

    // Acks come back in the order the publishes were sent.
    for i in 0..20 {
        ws.send(json!({"op":"publish","channel":"chat:room1","data":i,"ref":i}))
            .await;
    }
    let mut last = String::new();
    for i in 0..20 {
        let ack = ws.expect("ack").await;
        assert_eq!(ack["ref"], i);
        let id = ack["id"].as_str().unwrap().to_string();
        let seq = |c: &str| c.split('-').next().unwrap().parse::<i64>().unwrap();
        if !last.is_empty() {
            assert!(seq(&id) > seq(&last));
        }
        last = id;
    }
}

#[tokio::test]
async fn bad_frames_get_error_ops_and_the_connection_stays_usable() {
    let s = TestServer::start().await;
    let mut ws = Ws::connect(&s, "").await;
    ws.send_raw(Message::text("{not json")).await;
    ws.expect_error("invalid_json").await;
    ws.send(json!({"channels":["a"]})).await;
    ws.expect_error("invalid_op").await;
    ws.send(json!({"op":"subscribe","channels":"a","ref":"r1"}))
        .await;
    let e = ws.expect_error("invalid_op").await;
    assert_eq!(
        e["ref"], "r1",
        "the ref is echoed even when the op is malformed"
    );
    ws.send(json!({"op":"dance","ref":3})).await;
    assert_eq!(ws.expect_error("unknown_op").await["ref"], 3);
    ws.send_raw(Message::binary(vec![1u8, 2, 3])).await;
    ws.expect_error("invalid_frame").await;
    ws.send(json!({"op":"subscribe","channels":["bad channel"]}))
        .await;
    ws.expect_error("invalid_channel").await;
    ws.send(json!({"op":"subscribe","channels":[]})).await;
    ws.expect_error("missing_channel").await;
    ws.send(json!({"op":"subscribe"})).await;
    ws.expect_error("missing_channel").await;
    let many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
    ws.send(json!({"op":"subscribe","channels":many})).await;
    ws.expect_error("too_many_channels").await;
    ws.send(json!({"op":"publish","type":"t"})).await;
    ws.expect_error("invalid_channel").await;
    ws.send(json!({"op":"publish","channel":"x","type":""}))
        .await;
    ws.expect_error("invalid_type").await;
    ws.send(json!({"op":"publish","channel":"x","id":""})).await;
    ws.expect_error("invalid_id").await;
    ws.send(json!({"op":"refresh"})).await;
    ws.expect_error("invalid_op").await;
    ws.send(json!({"op":"ping","ref":"x".repeat(201)})).await;
    ws.expect_error("invalid_ref").await;
    ws.subscribe(&["dup"], None).await;
    ws.send(json!({"op":"subscribe","channels":["dup"]})).await;
    ws.expect_error("already_subscribed").await;
    // None of it stored anything.
    let page: Value = s
        .client
        .get(s.url("/v1/events?channel=x&after=earliest"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["events"], json!([]));
    ws.assert_alive().await;
    // In development mode refresh is accepted (there is nothing to expire).
    ws.send(json!({"op":"refresh","token":"anything","ref":"r"}))
        .await;
    let r = ws.expect("refreshed").await;
    assert_eq!(r["exp"], Value::Null);
}

#[tokio::test]
async fn oversized_messages_close_with_1009_after_an_error_op() {
    let s = TestServer::with(|c| c.websocket.max_message = pushgate::config::ByteSize(4096)).await;
    let mut ok = Ws::connect(&s, "").await;
    ok.send(json!({"op":"publish","channel":"big","data":"x".repeat(3000),"ref":1}))
        .await;
    ok.expect("ack").await;

    let mut ws = Ws::connect(&s, "").await;
    ws.send(json!({"op":"publish","channel":"big","data":"x".repeat(5000)}))
        .await;
    let (end, ops) = ws.end().await;
    assert_eq!(end, End::Close(1009));
    assert_eq!(ops.len(), 1, "{ops:?}");
    assert_eq!(ops[0]["code"], "message_too_large");
    ok.assert_alive().await;
}

#[tokio::test]
async fn frames_past_the_rate_get_errors_then_the_connection_is_closed_4008() {
    let s = TestServer::with(|c| c.websocket.messages_per_second = 5).await;
    let mut ws = Ws::connect(&s, "").await;
    for i in 0..5 {
        ws.send(json!({"op":"ping","ref":i})).await;
    }
    for i in 0..5 {
        assert_eq!(ws.expect("pong").await["ref"], i);
    }
    ws.send(json!({"op":"ping"})).await;
    ws.expect_error("rate_limited").await;
    // Within the budget again a moment later.
    tokio::time::sleep(Duration::from_millis(400)).await;
    ws.assert_alive().await;
    // A client that ignores the errors is closed.
    for _ in 0..20 {
        if ws
            .inner
            .send(Message::text("{\"op\":\"ping\"}"))
            .await
            .is_err()
        {
            break;
        }
    }
    let (end, ops) = ws.end().await;
    assert_eq!(end, End::Close(4008));
    assert!(ops.iter().any(|o| o["code"] == "rate_limited"));
}

#[tokio::test]
async fn protocol_pings_keep_a_live_peer_and_a_silent_peer_is_closed() {
    let s = TestServer::with(|c| {
        c.server.heartbeat = Dur(Duration::from_millis(100));
        c.websocket.pong_timeout = Dur(Duration::from_millis(300));
    })
    .await;
    // A peer that reads (tungstenite answers pings while reading) stays open.
    let mut live = Ws::connect(&s, "").await;
    let mut pings = 0;
    let until = tokio::time::Instant::now() + Duration::from_millis(1200);
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout(Duration::from_millis(200), live.inner.next()).await {
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(Some(Ok(m))) => panic!("unexpected {m:?}"),
            Ok(other) => panic!("connection ended: {other:?}"),
            Err(_) => {}
        }
    }
    assert!(pings >= 5, "a ping on every heartbeat, got {pings}");
    live.assert_alive().await;

    // A peer that answers nothing is closed after pong_timeout.
    // (Depending on timing the close frame is read, or the server has already
    // given up on the handshake and reset the connection; either way it
    // ended, and `end` fails if it had stayed open.)
    let mut silent = Ws::connect(&s, "").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (end, _) = silent.end().await;
    assert!(matches!(end, End::Close(4008) | End::Dropped), "{end:?}");
}

#[tokio::test]
async fn shutdown_closes_with_1012() {
    let s = TestServer::start().await;
    let mut idle = Ws::connect(&s, "").await;
    idle.assert_alive().await;
    let mut subscribed = Ws::connect(&s, "").await;
    subscribed.subscribe(&["x"], None).await;
    let stopping = tokio::spawn(s.stop());
    assert_eq!(idle.end().await.0, End::Close(1012));
    assert_eq!(subscribed.end().await.0, End::Close(1012));
    stopping.await.unwrap();
}

#[tokio::test]
async fn a_plain_get_is_told_to_upgrade_in_json() {
    let s = TestServer::start().await;
    let r = s.client.get(s.url("/v1/ws")).send().await.unwrap();
    assert_eq!(r.status(), 426);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "upgrade_required");
}

#[tokio::test]
async fn streams_per_client_caps_websockets_too() {
    let s = TestServer::with(|c| c.limits.streams_per_client = 1).await;
    let mut first = Ws::connect(&s, "").await;
    first.assert_alive().await;
    let (status, body) = Ws::try_connect(&s, "", None).await.err().expect("refused");
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], "too_many_streams");
    drop(first);
    // The slot comes back when the connection ends.
    let mut again = None;
    for _ in 0..50 {
        if let Ok(ws) = Ws::try_connect(&s, "", None).await {
            again = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    again.expect("slot released").assert_alive().await;
}

#[tokio::test]
async fn auth_on_the_upgrade_and_per_subscription() {
    let s = TestServer::with(secured).await;
    // A bad token is refused before upgrading (positive controls below).
    let (status, body) = Ws::try_connect(&s, "?token=not.a.jwt", None)
        .await
        .err()
        .expect("401");
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], "unauthorized");
    let expired = token(json!({"exp": now() - 3600, "pushgate": {"subscribe": ["user:1"]}}));
    assert_eq!(
        Ws::try_connect(&s, &format!("?token={expired}"), None)
            .await
            .err()
            .unwrap()
            .0,
        401
    );
    let (status, _) = Ws::try_connect(&s, "", Some("pk_wrong"))
        .await
        .err()
        .expect("401");
    assert_eq!(status, 401);

    // No token: public channels only.
    let mut anon = Ws::connect(&s, "").await;
    anon.subscribe(&["public.prices"], None).await;
    anon.send(json!({"op":"subscribe","channels":["user:1"],"ref":"p"}))
        .await;
    assert_eq!(anon.expect_error("unauthorized").await["ref"], "p");
    anon.send(json!({"op":"publish","channel":"public.prices","data":1}))
        .await;
    anon.expect_error("unauthorized").await;

    // A token: its grants, nothing else.
    let t = token(json!({"sub":"u1","exp": now() + 3600,
        "pushgate": {"subscribe": ["user:1", "chat:*"], "publish": ["chat:*"]}}));
    let mut user = Ws::connect(&s, &format!("?token={t}")).await;
    user.subscribe(&["user:1"], None).await;
    user.send(json!({"op":"subscribe","channels":["user:2"]}))
        .await;
    user.expect_error("forbidden").await;
    user.send(json!({"op":"subscribe","channels":["chat:a","user:2"]}))
        .await;
    user.expect_error("forbidden").await;
    user.send(json!({"op":"publish","channel":"user:1","data":1,"ref":"no"}))
        .await;
    assert_eq!(user.expect_error("forbidden").await["ref"], "no");
    user.subscribe(&["chat:a"], None).await;
    user.send(json!({"op":"publish","channel":"chat:a","data":"hi","ref":"yes"}))
        .await;
    let ack = user.expect("ack").await;
    let e = user.event().await;
    assert_eq!(e["id"], ack["id"]);
    let id = publish_with_key(&s, "user:1", json!("private")).await;
    assert_eq!(user.event().await["id"], id);

    // A publish key on the upgrade may publish anywhere.
    let mut backend = Ws::try_connect(&s, "", Some(PUBLISH_KEY))
        .await
        .ok()
        .unwrap();
    backend
        .send(json!({"op":"publish","channel":"anything","data":1,"ref":1}))
        .await;
    backend.expect("ack").await;

    // refresh: a bad token is refused and changes nothing; one that no longer
    // covers the subscriptions is refused; a good one extends the connection.
    user.send(json!({"op":"refresh","token":"nope","ref":"r0"}))
        .await;
    assert_eq!(user.expect_error("unauthorized").await["ref"], "r0");
    let narrower = token(json!({"exp": now() + 7200, "pushgate": {"subscribe": ["user:1"]}}));
    user.send(json!({"op":"refresh","token":narrower})).await;
    user.expect_error("forbidden").await;
    let exp = now() + 7200;
    let wider =
        token(json!({"exp": exp, "pushgate": {"subscribe": ["user:1","chat:*"], "publish": []}}));
    user.send(json!({"op":"refresh","token":wider,"ref":"r1"}))
        .await;
    let r = user.expect("refreshed").await;
    assert_eq!(r["exp"], exp);
    assert_eq!(r["ref"], "r1");
    // The new token's grants apply from now on: publishing is no longer allowed.
    user.send(json!({"op":"publish","channel":"chat:a","data":1}))
        .await;
    user.expect_error("forbidden").await;
}

#[tokio::test]
async fn an_expiring_token_closes_with_4001_unless_refreshed() {
    let s = TestServer::with(|c| {
        secured(c);
        c.server.heartbeat = Dur(Duration::from_millis(100));
    })
    .await;
    let short = token(json!({"exp": now() + 1, "pushgate": {"subscribe": ["user:1"]}}));
    let mut ws = Ws::connect(&s, &format!("?token={short}")).await;
    ws.subscribe(&["user:1"], None).await;
    let mut refreshed = Ws::connect(&s, &format!("?token={short}")).await;
    let long = token(json!({"exp": now() + 3600, "pushgate": {"subscribe": ["user:1"]}}));
    refreshed.send(json!({"op":"refresh","token":long})).await;
    refreshed.expect("refreshed").await;

    let (end, ops) = ws.end().await;
    assert_eq!(end, End::Close(4001));
    assert!(ops.iter().any(|o| o["code"] == "token_expired"), "{ops:?}");
    // The refreshed connection outlives the first token.
    tokio::time::sleep(Duration::from_millis(500)).await;
    refreshed.assert_alive().await;
}

/// Issue 11 item 7: a token that has expired (but is still within the
/// upgrade's clock leeway) may not subscribe: the op is answered
/// `token_expired` and the connection closes with 4001 before any history is
/// read. Positive control: a live token subscribes from `earliest` and reads.
#[tokio::test]
async fn subscribe_with_an_expired_token_is_refused_and_closes() {
    let s = TestServer::with(secured).await;
    let id = publish_with_key(&s, "user:1", json!("history")).await;

    let live = token(json!({"exp": now() + 3600, "pushgate": {"subscribe": ["user:1"]}}));
    let mut ok = Ws::connect(&s, &format!("?token={live}")).await;
    ok.subscribe(&["user:1"], Some("earliest")).await;
    assert_eq!(ok.event().await["id"], id);

    // Expired 2 s ago: the upgrade's 5 s leeway lets it connect.
    let expired = token(json!({"exp": now() - 2, "pushgate": {"subscribe": ["user:1"]}}));
    let mut ws = Ws::connect(&s, &format!("?token={expired}")).await;
    ws.send(json!({"op":"subscribe","channels":["user:1"],"since":"earliest","ref":"s"}))
        .await;
    let (end, ops) = ws.end().await;
    assert_eq!(end, End::Close(4001));
    assert!(
        ops.iter()
            .any(|o| o["code"] == "token_expired" && o["ref"] == "s"),
        "{ops:?}"
    );
    assert!(
        !ops.iter()
            .any(|o| o["op"] == "event" || o["op"] == "subscribed"),
        "nothing was read: {ops:?}"
    );
}
