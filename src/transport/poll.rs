//! Polling and long-polling: `GET /v1/events?channel=A&after=C&limit=100&wait=25`.
//!
//! Invariants:
//! - `next` is always the cursor to send next: it never repeats an event and
//!   never skips one (it may move past events of other channels);
//! - a long-poll that finds nothing registers with the hub and then waits
//!   without touching the database until the hub wakes it, the wait ends, or
//!   the server shuts down;
//! - a request with `wait` holds one of its client's stream slots
//!   (`limits.streams_per_client`) while it is open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderValue, header};

use super::{cursor, query_pairs, query_value, requested_channels, resolve_start};
use crate::AppState;
use crate::api::error::ApiError;
use crate::auth::Credentials;
use crate::hub::{EncodedEvent, Signal};
use crate::metrics::GaugeGuard;
use crate::store::Seq;

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;
const MAX_WAIT_SECS: f64 = 60.0;

pub async fn events(
    State(app): State<Arc<AppState>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(raw.as_deref());
    let channels = requested_channels(&app, &pairs)?;
    let creds = Credentials::from_request(&headers, query_value(&pairs, "token"));
    app.auth.authorize_subscribe(&creds, &channels)?;

    let limit = match query_value(&pairs, "limit") {
        None | Some("") => DEFAULT_LIMIT,
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ApiError::bad_request("invalid_limit", "limit must be a positive integer")
            })?
            .min(MAX_LIMIT),
    };
    let wait = match query_value(&pairs, "wait") {
        None | Some("") => 0.0,
        Some(v) => v
            .parse::<f64>()
            .ok()
            .filter(|w| w.is_finite() && *w >= 0.0)
            .ok_or_else(|| {
                ApiError::bad_request("invalid_wait", "wait must be a number of seconds")
            })?
            .min(MAX_WAIT_SECS),
    };
    let after_text = query_value(&pairs, "after").filter(|v| !v.is_empty());
    // A long-poll is an open stream for `limits.streams_per_client`.
    let _slot = if wait > 0.0 {
        Some(app.limits.open_stream(client.ip())?)
    } else {
        None
    };

    let start = resolve_start(&app, after_text).await?;
    let reset = start.reset.is_some();
    let page = app.store.read(&channels, start.after, limit).await?;
    if !page.events.is_empty() || wait == 0.0 {
        let encoded: Vec<EncodedEvent> = page
            .events
            .iter()
            .map(|e| EncodedEvent::encode(e, app.store.log_tag()))
            .collect();
        app.metrics.deliveries_poll.increment(encoded.len() as u64);
        return Ok(reply(&app, encoded.iter(), page.scanned_to, reset));
    }

    // Long-poll: register, then look once more (an event may have committed
    // between the read and the registration), then sleep on the hub.
    let _open = GaugeGuard::new(&app.metrics.streams_poll);
    let subscription = app.hub.subscribe(&channels);
    let page = app.store.read(&channels, page.scanned_to, limit).await?;
    if !page.events.is_empty() {
        let encoded: Vec<EncodedEvent> = page
            .events
            .iter()
            .map(|e| EncodedEvent::encode(e, app.store.log_tag()))
            .collect();
        app.metrics.deliveries_poll.increment(encoded.len() as u64);
        return Ok(reply(&app, encoded.iter(), page.scanned_to, reset));
    }
    let last = page.scanned_to;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
    let mut pending: Vec<Arc<EncodedEvent>> = Vec::new();
    loop {
        let signal = tokio::time::timeout_at(deadline, subscription.signal(&mut pending)).await;
        match signal {
            Err(_) | Ok(Signal::Closed) => return Ok(reply(&app, std::iter::empty(), last, reset)),
            Ok(Signal::Ping) => continue,
            Ok(Signal::Lagged) => {
                app.metrics.lagged_subscribers.increment(1);
                let page = app.store.read(&channels, last, limit).await?;
                let encoded: Vec<EncodedEvent> = page
                    .events
                    .iter()
                    .map(|e| EncodedEvent::encode(e, app.store.log_tag()))
                    .collect();
                app.metrics.deliveries_poll.increment(encoded.len() as u64);
                return Ok(reply(&app, encoded.iter(), page.scanned_to, reset));
            }
            Ok(Signal::Events) => {
                pending.retain(|e| e.seq > last);
                if pending.is_empty() {
                    continue;
                }
                // More than a page queued: return the first page; `next` is its last event.
                pending.truncate(limit);
                let next = pending.last().map(|e| e.seq).unwrap_or(last);
                app.metrics.deliveries_poll.increment(pending.len() as u64);
                return Ok(reply(&app, pending.iter().map(|e| &**e), next, reset));
            }
        }
    }
}

/// Writes the page without re-serializing any event: the envelopes are
/// already JSON.
fn reply<'a>(
    app: &AppState,
    events: impl Iterator<Item = &'a EncodedEvent>,
    next: Seq,
    reset: bool,
) -> Response {
    let mut b = BytesMut::with_capacity(256);
    b.put_slice(b"{\"events\":[");
    for (i, e) in events.enumerate() {
        if i > 0 {
            b.put_u8(b',');
        }
        b.put_slice(&e.json);
    }
    b.put_slice(format!("],\"next\":\"{}\",\"reset\":{reset}}}", cursor(app, next)).as_bytes());
    let mut resp = b.freeze().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
