//! Polling and long-polling: `GET /v1/events?channel=A&after=C&limit=100&wait=25`.
//!
//! Invariants:
//! - the answer is the first batch of a `feed::Feed` opened at `after`
//!   (bounded by `limit` and by bytes); `next` is the feed's cursor after it,
//!   so it never repeats an event and never skips one (it may move past
//!   events of other channels);
//! - a long-poll that finds nothing waits on the hub without touching the
//!   database until an event comes, the wait ends, or the server shuts down;
//! - a request with `wait` holds one of its client's stream slots
//!   (`limits.streams_per_client`) while it is open.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, BytesMut};
use http::{HeaderMap, HeaderValue, header};

use super::{cursor, query_pairs, query_value, requested_channels};
use crate::AppState;
use crate::auth::Credentials;
use crate::envelope::EncodedEvent;
use crate::error::ApiError;
use crate::feed::{Bound, Closure, Feed, Item};
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

    let limit = crate::api::parse_limit(query_value(&pairs, "limit"), DEFAULT_LIMIT, MAX_LIMIT)?;
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

    let _open = (wait > 0.0).then(|| GaugeGuard::new(&app.metrics.streams_poll));
    let bound = Bound {
        events: limit,
        ..Bound::default()
    };
    let lags = app.metrics.lagged_subscribers.clone();
    let mut feed = Feed::open(&app.hub, &app.store, &channels, after_text, bound, lags).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(wait);
    let mut reset = false;
    loop {
        let item = if wait > 0.0 {
            tokio::time::timeout_at(deadline, feed.next())
                .await
                .unwrap_or(None)
        } else {
            feed.next().await
        };
        match item {
            Some(Item::Reset { .. }) => reset = true,
            // The answer is the feed's first batch.
            Some(Item::Events(batch)) => {
                app.metrics
                    .deliveries_poll
                    .increment(batch.events.len() as u64);
                return Ok(reply(&app, &batch.events, batch.cursor, reset));
            }
            Some(Item::CaughtUp) if wait == 0.0 => {
                return Ok(reply(&app, &[], feed.cursor(), reset));
            }
            Some(Item::CaughtUp | Item::Heartbeat) => {}
            Some(Item::Closed(Closure::Store(e))) => return Err(e.into()),
            // Shutdown, or the wait is over: nothing new, same cursor.
            Some(Item::Closed(Closure::Shutdown)) | None => {
                return Ok(reply(&app, &[], feed.cursor(), reset));
            }
        }
    }
}

/// Writes the page without re-serializing any event: the envelopes are
/// already JSON.
fn reply(app: &AppState, events: &[Arc<EncodedEvent>], next: Seq, reset: bool) -> Response {
    let mut b = BytesMut::with_capacity(256);
    b.put_slice(b"{\"events\":[");
    for (i, e) in events.iter().enumerate() {
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
