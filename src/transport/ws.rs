//! WebSocket: `GET /v1/ws` (contract 3.2), the two-way transport.
//!
//! One task per connection drives everything: client frames, the hub, acks
//! of publishes and the heartbeat; there is no per-connection timer or
//! channel. The frame codec is tokio-tungstenite, whose CI runs the Autobahn
//! conformance suite; the upgrade is taken from hyper directly, so that task
//! holds a single copy of the connection's state. Invariants:
//! - each `subscribe` op is its own `feed::Feed` (hub registration and
//!   cursor); which events, in which order, exactly once, is the feed's
//!   business, this module only frames them;
//! - every event's frame is the shared encoding (`ws_text`); all pending
//!   frames are fed, then flushed once (one write);
//! - every connection also holds one *control* registration under a name no
//!   event can carry, so the hub's heartbeat (protocol ping, token expiry,
//!   dead peers) and shutdown (close 1012) reach connections that subscribe
//!   to nothing;
//! - a bad frame gets an `error` op and changes nothing; memory per
//!   connection is bounded: client messages by `websocket.max_message`,
//!   subscriptions by `MAX_SUBSCRIPTIONS`, queued events by the hub's bound,
//!   in-flight publishes by `websocket.max_inflight_publishes`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::{cursor, query_pairs, query_value};
use crate::AppState;
use crate::auth::{Credentials, Grant};
use crate::error::ApiError;
use crate::feed::{Bound, Closure, Feed, Item};
use crate::hub::{Signal, Subscription};
use crate::limits::StreamSlot;
use crate::message::to_message;
use crate::metrics::GaugeGuard;
use crate::store::{StoreError, format_cursor, valid_channel};
/// `subscribe` ops one connection may hold at once.
const MAX_SUBSCRIPTIONS: usize = 64;
/// Bytes of frames tungstenite gathers before it writes; we flush after each
/// batch anyway, so this only splits very large batches. Not preallocated.
const WRITE_BATCH: usize = 16 << 10;
/// The hub registration that carries heartbeat and shutdown to every
/// connection. Not a valid channel name, so no event is ever routed to it.
const CONTROL: &str = "\u{0}ws-control";
/// Longest `ref` echoed back.
const MAX_REF_LEN: usize = 200;

pub const CLOSE_RESTART: u16 = 1012;
pub const CLOSE_AUTH: u16 = 4001;
pub const CLOSE_SLOW: u16 = 4008;
const CLOSE_TOO_BIG: u16 = 1009;
const CLOSE_INTERNAL: u16 = 1011;

pub async fn upgrade(
    State(app): State<Arc<AppState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    RawQuery(raw): RawQuery,
    mut req: Request,
) -> Result<Response, ApiError> {
    let accept = handshake_accept(req.headers())?;
    let pairs = query_pairs(raw.as_deref());
    let creds = Credentials::from_request(req.headers(), query_value(&pairs, "token"));
    // A credential that is presented must be good (401 before upgrading);
    // none at all reaches public channels only.
    let grant = app.auth.authenticate(&creds)?;
    let slot = app.limits.open_stream(client.ip())?;
    let on_upgrade = hyper::upgrade::on(&mut req);
    drop(req);
    // Boxed so the task's future holds one pointer to it, not a second copy.
    let conn = Box::new(Connection::new(app, creds, grant, slot));
    tokio::spawn(conn.serve(on_upgrade));
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    Ok(resp)
}

/// Checks an RFC 6455 opening handshake; returns `Sec-WebSocket-Accept`.
/// (The upgrade is done here rather than by axum's extractor so that the
/// connection's task holds a single copy of its state: an idle connection
/// is mostly that task.)
fn handshake_accept(headers: &HeaderMap) -> Result<HeaderValue, ApiError> {
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    let refuse = |why: &str| {
        ApiError::new(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            format!("this is a WebSocket endpoint: {why}"),
        )
    };
    if !has(header::CONNECTION, "upgrade") || !has(header::UPGRADE, "websocket") {
        return Err(refuse(
            "send `Connection: upgrade` and `Upgrade: websocket`",
        ));
    }
    if !has(header::SEC_WEBSOCKET_VERSION, "13") {
        return Err(refuse("only `Sec-WebSocket-Version: 13` is spoken"));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| refuse("`Sec-WebSocket-Key` is missing"))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Ok(HeaderValue::from_str(&accept).expect("base64 is a header value"))
}

fn codec_config(cfg: &crate::config::WebSocketConfig) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(cfg.read_buffer.0)
        .write_buffer_size(WRITE_BATCH)
        .max_message_size(Some(cfg.max_message.0))
        .max_frame_size(Some(cfg.max_message.0))
}

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// One `subscribe` op: its feed (channels, cursor, hub registration) and
/// the `ref` its resets echo.
struct ChannelSub {
    feed: Feed,
    reference: Option<Ref>,
}

impl ChannelSub {
    /// Frames whatever this subscription's feed has ready into `out`, one
    /// batch per call, so a long catch-up is written batch by batch.
    fn poll_into(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<Message>,
        metrics: &crate::metrics::Metrics,
    ) -> Result<(), StoreError> {
        loop {
            let Poll::Ready(Some(item)) = self.feed.poll_next(cx) else {
                return Ok(());
            };
            match item {
                Item::Events(batch) => {
                    out.extend(batch.events.iter().map(|e| text_frame(e.ws_text().clone())));
                    metrics.deliveries_ws.increment(batch.events.len() as u64);
                    return Ok(());
                }
                Item::Reset {
                    reason,
                    resume_from,
                } => out.push(op_frame(json!({
                    "op": "reset", "reason": reason.as_str(),
                    "resume_from": format_cursor(resume_from, self.feed.log_tag()),
                    "channels": self.feed.channels(), "ref": self.reference,
                }))),
                // The control registration handles heartbeat and shutdown.
                Item::CaughtUp | Item::Heartbeat | Item::Closed(Closure::Shutdown) => {}
                Item::Closed(Closure::Store(e)) => return Err(e),
            }
        }
    }
}

/// The hub's bytes are the envelope JSON, which is UTF-8 by construction;
/// checking it again costs a few ns and keeps this module free of `unsafe`.
fn text_frame(bytes: Bytes) -> Message {
    Message::Text(Utf8Bytes::try_from(bytes).expect("envelopes are UTF-8 JSON"))
}

/// A client's `ref`: echoed back on the reply, never interpreted.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
enum Ref {
    Text(String),
    Number(serde_json::Number),
}

#[derive(Deserialize)]
struct ClientOp {
    op: Option<String>,
    channels: Option<Vec<String>>,
    since: Option<String>,
    channel: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    data: Option<Box<RawValue>>,
    #[serde(rename = "ref")]
    reference: Option<Ref>,
    id: Option<String>,
    token: Option<String>,
}

/// Just the `ref`, to answer a frame whose other fields are wrong.
#[derive(Deserialize)]
struct RefOnly {
    #[serde(rename = "ref")]
    reference: Option<Ref>,
}

/// Frames a client may send per second, refilled continuously.
struct FrameBudget {
    per_second: f64,
    tokens: f64,
    refilled: Instant,
    /// Frames refused in a row; a client that ignores the errors is closed.
    refused: u32,
}

impl FrameBudget {
    fn new(per_second: u32) -> FrameBudget {
        FrameBudget {
            per_second: per_second as f64,
            tokens: per_second as f64,
            refilled: Instant::now(),
            refused: 0,
        }
    }

    fn take(&mut self) -> bool {
        if self.per_second == 0.0 {
            return true;
        }
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused = 0;
            true
        } else {
            self.refused += 1;
            false
        }
    }

    fn exhausted(&self) -> bool {
        self.per_second > 0.0 && self.refused as f64 > self.per_second
    }
}

struct Connection {
    app: Arc<AppState>,
    /// What the upgrade presented: publishes are checked against it.
    creds: Credentials,
    /// The verified token (or admin key), if any: subscriptions are checked
    /// against it, and the connection ends when it expires.
    grant: Option<Grant>,
    control: Subscription,
    subs: Vec<ChannelSub>,
    /// Frames to write at the end of this turn of the loop.
    out: Vec<Message>,
    /// Created on the first publish: most connections never publish, and an
    /// empty `FuturesOrdered` still allocates.
    publishes: Publishes,
    budget: FrameBudget,
    /// When a ping went out with nothing heard from the peer since.
    silent_since: Option<Instant>,
    _slot: StreamSlot,
    _open: GaugeGuard,
}

fn close(code: u16, reason: &'static str) -> CloseFrame {
    CloseFrame {
        code: code.into(),
        reason: Utf8Bytes::from_static(reason),
    }
}

fn op_frame(value: Value) -> Message {
    Message::Text(Utf8Bytes::from(value.to_string()))
}

fn error_frame(code: &str, message: impl Into<String>, reference: Option<&Ref>) -> Message {
    op_frame(json!({"op": "error", "code": code, "message": message.into(), "ref": reference}))
}

fn api_error_frame(e: ApiError, reference: Option<&Ref>) -> Message {
    error_frame(e.code, e.message, reference)
}

impl Connection {
    fn new(
        app: Arc<AppState>,
        creds: Credentials,
        grant: Option<Grant>,
        slot: StreamSlot,
    ) -> Connection {
        Connection {
            control: app.hub.subscribe(&[CONTROL.to_string()]),
            budget: FrameBudget::new(app.config.websocket.messages_per_second),
            _open: GaugeGuard::new(&app.metrics.streams_ws),
            creds,
            grant,
            subs: Vec::new(),
            out: Vec::new(),
            publishes: None,
            silent_since: None,
            _slot: slot,
            app,
        }
    }

    /// The connection's whole life, as one task: finish the upgrade, then
    /// serve frames until either side ends it.
    async fn serve(mut self: Box<Self>, on_upgrade: OnUpgrade) {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let cfg = self.app.config.websocket.clone();
        let mut socket: Socket = WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            Some(codec_config(&cfg)),
        )
        .await;
        let closing = loop {
            let mut ignored = Vec::new();
            tokio::select! {
                biased;
                signal = self.control.signal(&mut ignored) => match signal {
                    Signal::Closed => break Some(close(CLOSE_RESTART, "server restart")),
                    Signal::Ping => if let Some(c) = self.on_heartbeat(&cfg) { break Some(c) },
                    Signal::Events | Signal::Lagged => {}
                },
                incoming = socket.next(), if in_flight(&self.publishes) < cfg.max_inflight_publishes => match incoming {
                    None => break None,
                    Some(Err(e)) => {
                        if is_capacity_error(&e) {
                            self.out.push(error_frame(
                                "message_too_large",
                                format!("messages are limited to {} bytes", cfg.max_message.0),
                                None,
                            ));
                            break Some(close(CLOSE_TOO_BIG, "message too large"));
                        }
                        tracing::debug!(error = %e, "WebSocket read failed");
                        break None;
                    }
                    // Boxed: its state (a parsed op, a log read) is large and
                    // rare; idle connections should not carry room for it.
                    Some(Ok(msg)) => if let Some(c) = Box::pin(self.on_message(msg)).await { break Some(c) },
                },
                Some(reply) = next_reply(&mut self.publishes), if in_flight(&self.publishes) > 0 => self.out.push(reply),
                polled = std::future::poll_fn(|cx| {
                    let before = self.out.len();
                    for sub in self.subs.iter_mut() {
                        if let Err(e) = sub.poll_into(cx, &mut self.out, &self.app.metrics) {
                            return Poll::Ready(Err(e));
                        }
                    }
                    if self.out.len() > before { Poll::Ready(Ok(())) } else { Poll::Pending }
                }) => if let Err(e) = polled {
                    tracing::warn!(error = %e, "WebSocket log read failed");
                    break Some(close(CLOSE_INTERNAL, "log unavailable; reconnect"));
                },
            }
            if !self.out.is_empty() {
                let frames = std::mem::take(&mut self.out);
                match tokio::time::timeout(cfg.send_timeout.0, send_all(&mut socket, frames)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break None,
                    Err(_) => break Some(close(CLOSE_SLOW, "too slow")),
                }
            }
        };
        // Best effort, bounded: a peer that stopped reading gets no more of
        // our time. After a close frame, wait briefly for the peer's reply
        // (the closing handshake), so our close is not lost to a reset.
        let handshake = closing.is_some();
        let frames: Vec<Message> = std::mem::take(&mut self.out)
            .into_iter()
            .chain(closing.map(|c| Message::Close(Some(c))))
            .collect();
        if !frames.is_empty() {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
                if send_all(&mut socket, frames).await.is_ok() && handshake {
                    while let Some(Ok(_)) = socket.next().await {}
                }
            })
            .await;
        }
    }

    /// The hub's heartbeat: end an expired token, drop a silent peer, ping.
    fn on_heartbeat(&mut self, cfg: &crate::config::WebSocketConfig) -> Option<CloseFrame> {
        if self.grant.as_ref().is_some_and(Grant::is_expired) {
            self.out.push(error_frame(
                "token_expired",
                "the token has expired; reconnect with a new one",
                None,
            ));
            return Some(close(CLOSE_AUTH, "token expired"));
        }
        let now = Instant::now();
        match self.silent_since {
            Some(since) if now.duration_since(since) >= cfg.pong_timeout.0 => {
                return Some(close(CLOSE_SLOW, "no pong"));
            }
            Some(_) => {}
            None => self.silent_since = Some(now),
        }
        self.out.push(Message::Ping(Bytes::new()));
        None
    }

    async fn on_message(&mut self, msg: Message) -> Option<CloseFrame> {
        self.silent_since = None;
        if !self.budget.take() {
            if self.budget.exhausted() {
                return Some(close(CLOSE_SLOW, "rate limited"));
            }
            if matches!(msg, Message::Text(_) | Message::Binary(_)) {
                self.out.push(error_frame(
                    "rate_limited",
                    format!(
                        "at most {} messages per second; this one was dropped",
                        self.app.config.websocket.messages_per_second
                    ),
                    None,
                ));
            }
            return None;
        }
        match msg {
            Message::Text(text) => return self.on_text(text.as_str()).await,
            Message::Binary(_) => self.out.push(error_frame(
                "invalid_frame",
                "send JSON text frames, not binary",
                None,
            )),
            // Pings are answered by the codec; any frame proves the peer alive.
            Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_) => {}
        }
        None
    }

    /// Answers one op; `Some` closes the connection.
    async fn on_text(&mut self, text: &str) -> Option<CloseFrame> {
        let op: ClientOp = match serde_json::from_str(text) {
            Ok(op) => op,
            Err(e) => {
                let reference = serde_json::from_str::<RefOnly>(text)
                    .ok()
                    .and_then(|r| r.reference);
                let (code, message) = if e.is_data() {
                    (
                        "invalid_op",
                        format!("the op does not have the expected shape: {e}"),
                    )
                } else {
                    ("invalid_json", format!("the frame is not valid JSON: {e}"))
                };
                self.out
                    .push(error_frame(code, message, reference.as_ref()));
                return None;
            }
        };
        if let Some(r) = &op.reference
            && let Ref::Text(t) = r
            && t.len() > MAX_REF_LEN
        {
            self.out.push(error_frame(
                "invalid_ref",
                format!("`ref` is limited to {MAX_REF_LEN} bytes"),
                None,
            ));
            return None;
        }
        match op.op.as_deref() {
            // An op that grants access checks the token's expiry itself, not
            // only the heartbeat: an expired token reads nothing more.
            // (`publish` verifies the token again; `refresh` brings a new one.)
            Some("subscribe") if self.grant.as_ref().is_some_and(Grant::is_expired) => {
                self.out.push(error_frame(
                    "token_expired",
                    "the token has expired; reconnect with a new one",
                    op.reference.as_ref(),
                ));
                return Some(close(CLOSE_AUTH, "token expired"));
            }
            Some("subscribe") => self.subscribe(op).await,
            Some("unsubscribe") => self.unsubscribe(op).await,
            Some("publish") => self.publish(op),
            Some("refresh") => self.refresh(op),
            Some("ping") => self
                .out
                .push(op_frame(json!({"op": "pong", "ref": op.reference}))),
            Some(other) => {
                let shown: String = other.chars().take(40).collect();
                self.out.push(error_frame(
                    "unknown_op",
                    format!(
                        "unknown op `{shown}`: use subscribe, unsubscribe, publish, refresh or ping"
                    ),
                    op.reference.as_ref(),
                ));
            }
            None => self.out.push(error_frame(
                "invalid_op",
                "every frame needs an `op`",
                op.reference.as_ref(),
            )),
        }
        None
    }

    /// The `channels` of an op: each valid, at least one, at most the cap.
    fn channels_of(&self, op: &mut ClientOp) -> Result<Vec<String>, ApiError> {
        let mut channels: Vec<String> = Vec::new();
        for name in op.channels.take().unwrap_or_default() {
            if !valid_channel(&name) {
                return Err(ApiError::invalid_channel(&name));
            }
            if !channels.contains(&name) {
                channels.push(name);
            }
        }
        if channels.is_empty() {
            return Err(ApiError::bad_request(
                "missing_channel",
                "name at least one channel: \"channels\":[\"NAME\"]",
            ));
        }
        let cap = self.app.config.limits.channels_per_subscription;
        if cap > 0 && channels.len() > cap {
            return Err(ApiError::bad_request(
                "too_many_channels",
                format!("at most {cap} channels per subscription"),
            ));
        }
        Ok(channels)
    }

    async fn subscribe(&mut self, mut op: ClientOp) {
        let reference = op.reference.take();
        let channels = match self.channels_of(&mut op) {
            Ok(c) => c,
            Err(e) => return self.out.push(api_error_frame(e, reference.as_ref())),
        };
        if self.subs.len() >= MAX_SUBSCRIPTIONS {
            return self.out.push(error_frame(
                "too_many_subscriptions",
                format!("at most {MAX_SUBSCRIPTIONS} subscriptions per connection"),
                reference.as_ref(),
            ));
        }
        if let Some(dup) = channels
            .iter()
            .find(|c| self.subs.iter().any(|s| s.feed.channels().contains(c)))
        {
            return self.out.push(error_frame(
                "already_subscribed",
                format!("`{dup}` is already subscribed on this connection"),
                reference.as_ref(),
            ));
        }
        if let Err(e) = self
            .app
            .auth
            .check_subscribe(self.grant.as_ref(), &channels)
        {
            return self.out.push(api_error_frame(e.into(), reference.as_ref()));
        }
        let since = op.since.as_deref().filter(|s| !s.is_empty());
        let feed = match open_feed(&self.app, &channels, since).await {
            Ok(f) => f,
            Err(e) => return self.out.push(api_error_frame(e.into(), reference.as_ref())),
        };
        let at = cursor(&self.app, feed.cursor());
        self.out.push(op_frame(json!({
            "op": "subscribed", "channels": channels, "cursor": at, "ref": reference,
        })));
        // A reset, if the cursor could not be honoured, is the feed's first item.
        // Most connections hold one subscription: room for exactly the
        // next one, not the four a first `push` would make.
        self.subs.reserve_exact(1);
        self.subs.push(ChannelSub { feed, reference });
    }

    async fn unsubscribe(&mut self, mut op: ClientOp) {
        let reference = op.reference.take();
        let channels = match self.channels_of(&mut op) {
            Ok(c) => c,
            Err(e) => return self.out.push(api_error_frame(e, reference.as_ref())),
        };
        let mut removed: Vec<String> = Vec::new();
        let mut kept: Vec<ChannelSub> = Vec::with_capacity(self.subs.len());
        for sub in std::mem::take(&mut self.subs) {
            let (gone, stay): (Vec<String>, Vec<String>) = sub
                .feed
                .channels()
                .iter()
                .cloned()
                .partition(|c| channels.contains(c));
            if gone.is_empty() {
                kept.push(sub);
                continue;
            }
            removed.extend(gone);
            if !stay.is_empty() {
                // Re-register the rest and read the log from this cursor:
                // events queued on the old registration are not lost.
                let at = cursor(&self.app, sub.feed.cursor());
                match open_feed(&self.app, &stay, Some(&at)).await {
                    Ok(feed) => kept.push(ChannelSub {
                        feed,
                        reference: sub.reference,
                    }),
                    Err(e) => {
                        self.subs = kept;
                        return self.out.push(api_error_frame(e.into(), reference.as_ref()));
                    }
                }
            }
        }
        self.subs = kept;
        if removed.is_empty() {
            return self.out.push(error_frame(
                "not_subscribed",
                "none of these channels is subscribed on this connection",
                reference.as_ref(),
            ));
        }
        self.out.push(op_frame(
            json!({"op": "unsubscribed", "channels": removed, "ref": reference}),
        ));
    }

    fn publish(&mut self, op: ClientOp) {
        let reference = op.reference;
        let mut message = match to_message(op.channel, op.kind, op.data, op.id, "ws") {
            Ok(m) => m,
            Err(e) => return self.out.push(api_error_frame(e.into(), reference.as_ref())),
        };
        let publisher = match self
            .app
            .auth
            .authorize_publish(&self.creds, &[message.channels[0].as_str()])
        {
            Ok(p) => p,
            Err(e) => {
                return self.out.push(api_error_frame(e.into(), reference.as_ref()));
            }
        };
        if let Err(e) = self.app.limits.check_publish(&publisher, 1) {
            return self.out.push(api_error_frame(e.into(), reference.as_ref()));
        }
        message.key_scope = self.app.auth.idempotency_scope(&publisher);
        let app = self.app.clone();
        let publishes = self.publishes.get_or_insert_with(FuturesOrdered::new);
        publishes.push_back(Box::pin(async move {
            let started = Instant::now();
            match app.store.append(vec![message]).await {
                Ok(appended) => {
                    app.metrics
                        .append_seconds
                        .record(started.elapsed().as_secs_f64());
                    let first = &appended[0];
                    if !first.duplicate {
                        app.metrics
                            .events_appended
                            .increment(first.seqs.len() as u64);
                    }
                    let id = format_cursor(first.seqs[0], app.store.log_tag());
                    op_frame(json!({
                        "op": "ack", "ref": reference, "id": id, "duplicate": first.duplicate,
                    }))
                }
                Err(e) => api_error_frame(e.into(), reference.as_ref()),
            }
        }));
    }

    fn refresh(&mut self, op: ClientOp) {
        let reference = op.reference;
        let Some(token) = op.token.filter(|t| !t.is_empty()) else {
            return self.out.push(error_frame(
                "invalid_op",
                "refresh needs a `token`",
                reference.as_ref(),
            ));
        };
        if self.app.auth.is_development() {
            return self.out.push(op_frame(
                json!({"op": "refreshed", "exp": null, "ref": reference}),
            ));
        }
        let grant = match self.app.auth.verify_token(&token) {
            Ok(g) => g,
            Err(e) => {
                return self.out.push(api_error_frame(e.into(), reference.as_ref()));
            }
        };
        // The new token must still cover everything this connection reads.
        for sub in &self.subs {
            if let Err(e) = self
                .app
                .auth
                .check_subscribe(Some(&grant), sub.feed.channels())
            {
                return self.out.push(api_error_frame(e.into(), reference.as_ref()));
            }
        }
        let exp = grant.expires_at;
        // From now on the new token is the connection's credential.
        self.creds.bearer = None;
        self.creds.query_token = Some(token);
        self.grant = Some(grant);
        self.out.push(op_frame(
            json!({"op": "refreshed", "exp": exp, "ref": reference}),
        ));
    }
}

/// Registers with the hub and resolves the start (the feed's rule).
async fn open_feed(
    app: &Arc<AppState>,
    channels: &[String],
    since: Option<&str>,
) -> Result<Feed, StoreError> {
    Feed::open(
        &app.hub,
        &app.store,
        channels,
        since,
        Bound::default(),
        app.metrics.lagged_subscribers.clone(),
    )
    .await
}

type Publishes = Option<FuturesOrdered<BoxFuture<'static, Message>>>;

fn in_flight(publishes: &Publishes) -> usize {
    publishes.as_ref().map_or(0, FuturesOrdered::len)
}

async fn next_reply(publishes: &mut Publishes) -> Option<Message> {
    match publishes {
        Some(p) => p.next().await,
        None => None,
    }
}

/// Feeds every frame, then flushes once: one write for the whole batch.
async fn send_all(
    socket: &mut Socket,
    frames: Vec<Message>,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    for frame in frames {
        socket.feed(frame).await?;
    }
    socket.flush().await
}

fn is_capacity_error(e: &tokio_tungstenite::tungstenite::Error) -> bool {
    matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_budget_refills_and_closes_persistent_offenders() {
        let mut b = FrameBudget::new(3);
        assert!(b.take() && b.take() && b.take());
        assert!(!b.take(), "the fourth frame in the same instant is refused");
        assert!(!b.exhausted());
        for _ in 0..3 {
            b.take();
        }
        assert!(b.exhausted(), "a client that ignores the errors is closed");
        b.refilled -= std::time::Duration::from_secs(1);
        assert!(b.take(), "a second later the budget is back");
        assert!(!b.exhausted());
        let mut unlimited = FrameBudget::new(0);
        assert!((0..10_000).all(|_| unlimited.take()));
    }

    #[test]
    fn control_name_can_never_carry_an_event() {
        assert!(!valid_channel(CONTROL));
    }
}
