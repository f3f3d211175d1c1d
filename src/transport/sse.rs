//! Server-Sent Events: `GET /v1/stream?channel=A&channel=B`.
//!
//! The response body frames what a `feed::Feed` yields and is polled
//! directly by hyper — no task, channel or timer per connection. Invariants:
//! - which events, in which order, exactly once, is the feed's business;
//!   this module only turns its items into SSE bytes;
//! - each batch the feed yields leaves in one chunk (one write);
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
use http::{HeaderMap, HeaderValue};
use http_body::Frame;

use super::{query_pairs, query_value, requested_channels};
use crate::AppState;
use crate::auth::Credentials;
use crate::clock::unix_now;
use crate::envelope::EncodedEvent;
use crate::error::ApiError;
use crate::feed::{Batch, Bound, Closure, Feed, Item};
use crate::limits::StreamSlot;
use crate::metrics::GaugeGuard;
use crate::store::{ResetReason, format_cursor};

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

    let feed = Feed::open(
        &app.hub,
        &app.store,
        &channels,
        cursor_text,
        Bound::default(),
        app.metrics.lagged_subscribers.clone(),
    )
    .await?;
    let named = matches!(query_value(&pairs, "named"), Some("1" | "true"));

    Ok(SseBody {
        preamble: Some(preamble(app)),
        feed,
        named,
        done: false,
        expires_at: grant.and_then(|g| g.expires_at),
        deliveries: app.metrics.deliveries_sse.clone(),
        _open: GaugeGuard::new(&app.metrics.streams_sse),
        _slot: slot,
    })
}

/// The first chunk: the `retry:` hint.
fn preamble(app: &AppState) -> Bytes {
    Bytes::from(format!(
        "retry: {}\n: pushgate\n\n",
        app.config.server.sse_retry.0.as_millis()
    ))
}

/// The reset notice carries the new resume point as its id, so a browser
/// that reconnects right away does not reset twice.
fn reset_frame(reason: ResetReason, resume_from: &str) -> Bytes {
    Bytes::from(format!(
        "event: pushgate.reset\nid: {resume_from}\ndata: {{\"reason\":\"{}\",\"resume_from\":\"{resume_from}\"}}\n\n",
        reason.as_str()
    ))
}

/// An event stream as an HTTP body: polled by hyper, or by `server::sse_h1`.
/// It only frames what its `Feed` yields.
pub struct SseBody {
    preamble: Option<Bytes>,
    feed: Feed,
    named: bool,
    done: bool,
    expires_at: Option<u64>,
    deliveries: metrics::Counter,
    _open: GaugeGuard,
    _slot: StreamSlot,
}

impl SseBody {
    fn bytes_of<'a>(&self, e: &'a EncodedEvent) -> &'a Bytes {
        if self.named { e.sse_named() } else { &e.sse }
    }

    /// One chunk (one write) for the whole batch.
    fn frame_batch(&self, batch: &Batch) -> Bytes {
        self.deliveries.increment(batch.events.len() as u64);
        match batch.events.as_slice() {
            [one] => self.bytes_of(one).clone(),
            many => {
                let len = many.iter().map(|e| self.bytes_of(e).len()).sum();
                let mut b = BytesMut::with_capacity(len);
                for e in many {
                    b.put_slice(self.bytes_of(e));
                }
                b.freeze()
            }
        }
    }
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
            if this.done {
                return Poll::Ready(None);
            }
            let Some(item) = ready!(this.feed.poll_next(cx)) else {
                return Poll::Ready(None);
            };
            // Checked on every wake-up, so a busy stream ends on time too;
            // an idle one ends on the next heartbeat.
            if !matches!(item, Item::Closed(_))
                && this.expires_at.is_some_and(|exp| unix_now() >= exp)
            {
                this.done = true;
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                    b"event: pushgate.expired\ndata: {\"reason\":\"token_expired\"}\n\n",
                )))));
            }
            let chunk = match item {
                Item::Reset {
                    reason,
                    resume_from,
                } => reset_frame(reason, &format_cursor(resume_from, this.feed.log_tag())),
                Item::Events(batch) => this.frame_batch(&batch),
                Item::CaughtUp => continue,
                Item::Heartbeat => Bytes::from_static(b": ping\n\n"),
                Item::Closed(Closure::Shutdown) => return Poll::Ready(None),
                Item::Closed(Closure::Store(e)) => {
                    // End the stream; the client reconnects with its cursor.
                    tracing::warn!(error = %e, "SSE log read failed");
                    return Poll::Ready(None);
                }
            };
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
    }
}
