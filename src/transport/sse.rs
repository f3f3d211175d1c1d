//! Server-Sent Events: `GET /v1/stream?channel=A&channel=B`.
//!
//! The response body is a small state machine polled directly by hyper — no
//! task, channel or timer per connection. Invariants:
//! - history is read from the log after the client's cursor, page by page,
//!   while the hub queues live events; live events at or below the last seq
//!   written are dropped, so nothing repeats and nothing is skipped;
//! - everything pending for a subscriber leaves in one chunk (one write);
//! - a lagged subscriber goes back to reading the log from its cursor;
//! - the stream ends on shutdown and when the subscriber's token expires
//!   (checked on every wake-up, so at the latest on the next heartbeat),
//!   with a `pushgate.expired` event so the client fetches a new token;
//! - every stream holds one of its client's `limits.streams_per_client`
//!   slots until it ends; credentials are checked on every channel before
//!   the slot is taken or anything is read.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::future::BoxFuture;
use http::{HeaderMap, HeaderValue};
use http_body::Frame;

use super::{Start, cursor, query_pairs, query_value, requested_channels, resolve_start};
use crate::AppState;
use crate::api::error::ApiError;
use crate::auth::{Credentials, unix_now};
use crate::hub::{EncodedEvent, Signal, Subscription};
use crate::limits::StreamSlot;
use crate::metrics::GaugeGuard;
use crate::store::{Page, Seq, Store, StoreError};

/// Events read from the log per query while catching up.
const CATCH_UP_PAGE: usize = 500;

pub async fn stream(
    State(app): State<Arc<AppState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let body = open(&app, &headers, raw.as_deref(), client.ip()).await?;
    let mut resp = Body::new(body).into_response();
    for (name, value) in RESPONSE_HEADERS {
        resp.headers_mut()
            .insert(*name, HeaderValue::from_static(value));
    }
    Ok(resp)
}

/// Headers of every SSE response (besides framing).
pub const RESPONSE_HEADERS: &[(&str, &str)] = &[
    ("content-type", "text/event-stream"),
    ("cache-control", "no-store"),
    ("x-accel-buffering", "no"),
];

/// Checks a stream request (channels, token, cursor), registers with the hub
/// and returns the body. Shared by the hyper handler and the lean HTTP/1.1
/// path in `server::sse_h1`, so both refuse and resume identically.
/// `client` is the address stream caps count against.
pub async fn open(
    app: &Arc<AppState>,
    headers: &HeaderMap,
    raw_query: Option<&str>,
    client: IpAddr,
) -> Result<SseBody, ApiError> {
    let pairs = query_pairs(raw_query);
    let channels = requested_channels(app, &pairs)?;
    let creds = Credentials::from_request(headers, query_value(&pairs, "token"));
    let grant = app.auth.authorize_subscribe(&creds, &channels)?;
    let slot = app.limits.open_stream(client)?;

    // A browser's reconnect carries Last-Event-ID; it wins over the query,
    // so a reconnect never replays history twice.
    let header_cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    let cursor_text = header_cursor
        .or_else(|| query_value(&pairs, "last_event_id").filter(|v| !v.is_empty()))
        .or_else(|| query_value(&pairs, "since").filter(|v| *v == "earliest"));

    let subscription = app.hub.subscribe(&channels);
    let start = resolve_start(app, cursor_text).await?;
    let named = matches!(query_value(&pairs, "named"), Some("1" | "true"));

    Ok(SseBody {
        preamble: Some(preamble(app, start)),
        phase: Phase::CatchUp(None),
        last: start.after,
        subscription,
        store: app.store.clone(),
        log_tag: app.store.log_tag().to_string(),
        named,
        expires_at: grant.and_then(|g| g.expires_at),
        scratch: Vec::new(),
        deliveries: app.metrics.deliveries_sse.clone(),
        lags: app.metrics.lagged_subscribers.clone(),
        _open: GaugeGuard::new(&app.metrics.streams_sse),
        _slot: slot,
    })
}

/// The first chunk: the `retry:` hint, and the reset notice if the cursor
/// could not be honoured. The reset event carries the new resume point as
/// its id, so a browser that reconnects right away does not reset twice.
fn preamble(app: &AppState, start: Start) -> Bytes {
    let mut b = BytesMut::with_capacity(160);
    b.put_slice(
        format!(
            "retry: {}\n: pushgate\n\n",
            app.config.server.sse_retry.0.as_millis()
        )
        .as_bytes(),
    );
    if let Some(reason) = start.reset {
        let resume_from = cursor(app, start.after);
        b.put_slice(
            format!(
                "event: pushgate.reset\nid: {resume_from}\ndata: {{\"reason\":\"{}\",\"resume_from\":\"{resume_from}\"}}\n\n",
                reason.as_str()
            )
            .as_bytes(),
        );
    }
    b.freeze()
}

enum Phase {
    /// Reading history after `last`; `None` until the first read is started.
    CatchUp(Option<BoxFuture<'static, Result<Page, StoreError>>>),
    Live,
    Done,
}

/// An event stream as an HTTP body: polled by hyper, or by `server::sse_h1`.
pub struct SseBody {
    preamble: Option<Bytes>,
    phase: Phase,
    /// Highest seq written to this stream (or skipped past by a full scan).
    last: Seq,
    subscription: Subscription,
    store: Arc<dyn Store>,
    log_tag: String,
    named: bool,
    expires_at: Option<u64>,
    scratch: Vec<Arc<EncodedEvent>>,
    deliveries: metrics::Counter,
    lags: metrics::Counter,
    _open: GaugeGuard,
    _slot: StreamSlot,
}

impl SseBody {
    fn bytes_of<'a>(&self, e: &'a EncodedEvent) -> &'a Bytes {
        if self.named { e.sse_named() } else { &e.sse }
    }

    /// One chunk of every queued event above `last`.
    fn take_live(&mut self) -> Option<Bytes> {
        let mut pending = std::mem::take(&mut self.scratch);
        pending.retain(|e| e.seq > self.last);
        let out = match pending.as_slice() {
            [] => None,
            [one] => Some(self.bytes_of(one).clone()),
            many => {
                let len = many.iter().map(|e| self.bytes_of(e).len()).sum();
                let mut b = BytesMut::with_capacity(len);
                for e in many {
                    b.put_slice(self.bytes_of(e));
                }
                Some(b.freeze())
            }
        };
        if let Some(e) = pending.last() {
            self.last = e.seq;
            self.deliveries.increment(pending.len() as u64);
        }
        pending.clear();
        self.scratch = pending;
        out
    }

    fn encode_page(&mut self, page: &Page) -> Option<Bytes> {
        let mut b = BytesMut::new();
        let mut n = 0;
        for e in page.events.iter().filter(|e| e.seq > self.last) {
            let enc = EncodedEvent::encode(e, &self.log_tag);
            b.put_slice(self.bytes_of(&enc));
            n += 1;
        }
        self.last = self.last.max(page.scanned_to);
        self.deliveries.increment(n);
        (n > 0).then(|| b.freeze())
    }
}

fn read_after(
    store: &Arc<dyn Store>,
    channels: &[String],
    after: Seq,
) -> BoxFuture<'static, Result<Page, StoreError>> {
    let store = store.clone();
    let channels = channels.to_vec();
    Box::pin(async move { store.read(&channels, after, CATCH_UP_PAGE).await })
}

impl http_body::Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        if let Some(p) = this.preamble.take() {
            return Poll::Ready(Some(Ok(Frame::data(p))));
        }
        loop {
            match &mut this.phase {
                Phase::Done => return Poll::Ready(None),
                Phase::CatchUp(read) => {
                    let fut = match read {
                        Some(f) => f,
                        None => read.insert(read_after(
                            &this.store,
                            this.subscription.channels(),
                            this.last,
                        )),
                    };
                    let result = ready!(fut.as_mut().poll(cx));
                    match result {
                        Ok(page) => {
                            let full = page.events.len() >= CATCH_UP_PAGE;
                            let chunk = this.encode_page(&page);
                            this.phase = if full {
                                Phase::CatchUp(None)
                            } else {
                                Phase::Live
                            };
                            if let Some(chunk) = chunk {
                                return Poll::Ready(Some(Ok(Frame::data(chunk))));
                            }
                        }
                        Err(e) => {
                            // End the stream; the client reconnects with its cursor.
                            tracing::warn!(error = %e, "SSE catch-up read failed");
                            this.phase = Phase::Done;
                        }
                    }
                }
                Phase::Live => {
                    let mut scratch = std::mem::take(&mut this.scratch);
                    let signal = this.subscription.poll_signal(cx, &mut scratch);
                    this.scratch = scratch;
                    let signal = ready!(signal);
                    // Checked on every wake-up, so a busy stream ends on
                    // time too; an idle one ends on the next heartbeat.
                    if signal != Signal::Closed
                        && this.expires_at.is_some_and(|exp| unix_now() >= exp)
                    {
                        this.scratch.clear();
                        this.phase = Phase::Done;
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                            b"event: pushgate.expired\ndata: {\"reason\":\"token_expired\"}\n\n",
                        )))));
                    }
                    match signal {
                        Signal::Events => {
                            if let Some(chunk) = this.take_live() {
                                return Poll::Ready(Some(Ok(Frame::data(chunk))));
                            }
                        }
                        Signal::Lagged => {
                            this.lags.increment(1);
                            this.phase = Phase::CatchUp(None);
                        }
                        Signal::Ping => {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                                b": ping\n\n",
                            )))));
                        }
                        Signal::Closed => this.phase = Phase::Done,
                    }
                }
            }
        }
    }
}
