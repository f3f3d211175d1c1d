//! HTTP routes: what each path does and which error shape it answers with.
//!
//! Invariants: every response that is not a success is the contract's JSON
//! error (404 and 405 included); request logs carry method and path only,
//! never the query string (it may hold `?token=`); bodies are read with the
//! configured limit and refused with 413 while streaming, never buffered whole;
//! CORS answers preflights before any route runs, and only origins listed in
//! `server.cors_origins` may send credentials (the cookie flow).

pub mod bodies;
pub mod demo;
pub mod endpoints;
pub mod error;
pub mod inbound;
pub mod openapi;
pub mod publish;
pub mod request_checks;
pub mod webhooks;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::request::Parts;
use http::{HeaderName, HeaderValue, Method, StatusCode, header};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::AppState;
use crate::auth::Credentials;
use crate::error::ApiError;
use crate::transport::{policy, poll, sse, ws};

pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/publish", post(publish::publish))
        .route("/webhooks/{source}", post(webhooks::receive))
        .route("/v1/inbound", get(inbound::list))
        .route("/v1/inbound/{id}", get(inbound::get))
        .route("/v1/stream", get(sse::stream))
        .route("/v1/events", get(poll::events))
        .route("/v1/ws", get(ws::upgrade))
        .route("/demo", get(demo::page))
        .route("/demo/pay", post(demo::pay))
        .route("/client.js", get(demo::client_js))
        .route("/client.d.ts", get(demo::client_dts))
        .route(
            "/v1/endpoints",
            get(endpoints::list).post(endpoints::create),
        )
        .route(
            "/v1/endpoints/{id}",
            get(endpoints::get)
                .patch(endpoints::update)
                .delete(endpoints::delete),
        )
        .route("/v1/endpoints/{id}/rotate", post(endpoints::rotate))
        .route("/v1/endpoints/{id}/secret", get(endpoints::secret))
        .route("/v1/endpoints/{id}/attempts", get(endpoints::attempts))
        .route("/v1/endpoints/{id}/replay", post(endpoints::replay))
        .route("/", get(dashboard))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            Arc::new(bodies::BodyGate::new(&app.config.limits)),
            bodies::guard_bodies,
        ))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            request_checks::guard,
        ))
        .layer(middleware::from_fn_with_state(
            app.clone(),
            limit_failed_checks,
        ))
        .layer(tower::util::option_layer(cors(
            &app.config.server.cors_origins,
        )))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            // The path only: a query string may carry a token.
            policy::request_span(req.method(), req.uri().path())
        }))
        .with_state(app)
}

/// CORS from `server.cors_origins`: nothing (same-origin only) when empty;
/// `*` lets any page read, without credentials; otherwise exactly the listed
/// origins, with credentials, so `EventSource(url, {withCredentials: true})`
/// can carry the `pushgate_token` cookie. (`Config` has validated the list.)
pub fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
        ])
        .expose_headers([policy::EXPOSED])
        .max_age(Duration::from_secs(3600));
    if origins.iter().any(|o| o == "*") {
        return Some(layer.allow_origin(AllowOrigin::any()));
    }
    // The lean SSE path asks the same question (`transport::policy::cors`).
    let origins = origins.to_vec();
    Some(
        layer
            .allow_origin(AllowOrigin::predicate(move |origin, _| {
                matches!(
                    policy::cors(&origins, Some(origin)),
                    policy::Cors::Origin(_)
                )
            }))
            .allow_credentials(true),
    )
}

/// Extractor for admin routes (inbound inspector, endpoints, anything that
/// shows raw payloads): an admin key in `Authorization`, else 401.
pub struct Admin;

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<AppState>) -> Result<Self, ApiError> {
        let creds = Credentials::from_request(&parts.headers, None);
        app.auth.authorize_admin(&creds)?;
        Ok(Admin)
    }
}

/// The client's address as the server saw it (the peer, or what a trusted
/// proxy forwarded), for per-client limits.
pub fn client_ip(parts_extensions: &http::Extensions) -> Option<IpAddr> {
    parts_extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// Declared or streamed past the limit (answered as soon as it is crossed).
    #[error("the body is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// The connection failed or the framing was broken mid-body.
    #[error("could not read the body: {0}")]
    Unreadable(String),
    /// Too slow, or too many bytes in flight (`bodies`).
    #[error(transparent)]
    Cut(#[from] bodies::BodyCut),
}

/// The HTTP answer to a body that could not be read: mapped here, beside
/// the type, so `error.rs` (below the HTTP layer) never names `api`.
impl From<BodyError> for ApiError {
    fn from(e: BodyError) -> ApiError {
        match e {
            BodyError::TooLarge { limit } => ApiError::payload_too_large(limit),
            BodyError::Unreadable(_) => ApiError::bad_request("invalid_body", e.to_string()),
            BodyError::Cut(cut) => ApiError::from(cut),
        }
    }
}

/// Reads `req`'s body, up to `limit` bytes: a declared `Content-Length`
/// over the limit is refused before anything is read, a streamed body as
/// soon as it crosses it.
pub async fn read_body(req: Request, limit: usize) -> Result<Bytes, BodyError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|e| {
            if let Some(cut) = bodies::cut_off(&e) {
                BodyError::Cut(cut)
            } else if is_length_limit(&e) {
                BodyError::TooLarge { limit }
            } else {
                BodyError::Unreadable(e.to_string())
            }
        })
}

/// Whether the limit (`http_body_util::LengthLimitError`) is anywhere in
/// `e`'s chain of causes: a type check, not a message match.
fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The request body, read up to `server.max_body`; larger bodies get 413
/// as soon as the limit is crossed.
pub struct RawBody(pub Bytes);

impl FromRequest<Arc<AppState>> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<AppState>) -> Result<Self, ApiError> {
        Ok(RawBody(read_body(req, app.config.server.max_body.0).await?))
    }
}

/// A `limit=` query value: absent or empty is `default`, otherwise a
/// positive integer, capped at `max`. One parser for every listing.
pub fn parse_limit(value: Option<&str>, default: usize, max: usize) -> Result<usize, ApiError> {
    match value {
        None | Some("") => Ok(default),
        Some(v) => Ok(v
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| {
                ApiError::bad_request("invalid_limit", "limit must be a positive integer")
            })?
            .min(max)),
    }
}

/// Marks a response whose failed check its handler already counted (it had
/// to know the verdict before writing anything), so it is not counted twice.
#[derive(Debug, Clone, Copy)]
pub struct CheckCounted;

/// Counts failed key, token and signature checks (every 401 and 403) per
/// client address; past `limits.invalid_per_client` per second they are
/// answered 429 instead. It runs after the handler and never touches a
/// response that passed its checks, so a valid webhook is never refused for
/// rate, whatever else its address sends. Handlers that count for
/// themselves (webhooks, before recording a refusal) mark the response
/// `CheckCounted`.
async fn limit_failed_checks(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let client = client_ip(req.extensions());
    let resp = next.run(req).await;
    if resp.extensions().get::<CheckCounted>().is_some() {
        return resp;
    }
    if let Some(ip) = client
        && let Some(limited) = policy::after_check(&app.limits, ip, resp.status())
    {
        return limited.into_response();
    }
    resp
}

async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}

/// The dashboard: live events, the inbound inspector, endpoints and attempts.
/// One static page; it talks to the same admin API as everyone else.
async fn dashboard() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("dashboard.html"))
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<Arc<AppState>>) -> Result<&'static str, ApiError> {
    if app.hub.is_closed() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    app.store.ping().await?;
    Ok("ready\n")
}

async fn render_metrics(State(app): State<Arc<AppState>>) -> Response {
    // The outbound queue as it is now (a backlog lives in the store, not in
    // memory); a store that does not answer leaves the last values.
    if let Ok(q) = app.store.queue_stats().await {
        app.metrics.webhook_queue_depth.set(q.depth as f64);
        let overdue_ms = q
            .first_due_ms
            .map_or(0, |due| crate::clock::now_ms().saturating_sub(due).max(0));
        app.metrics
            .webhook_queue_oldest_due_seconds
            .set(overdue_ms as f64 / 1000.0);
    }
    let mut resp = app.metrics.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_errors_map_to_the_contracts_codes() {
        let e = ApiError::from(BodyError::TooLarge { limit: 10 });
        assert_eq!(
            (e.status, e.code),
            (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
        );
        let e = ApiError::from(BodyError::Unreadable("reset".into()));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, "invalid_body")
        );
    }

    /// A body without `Content-Length`, arriving in chunks.
    fn streamed(chunks: usize, size: usize) -> Request {
        let stream = futures_util::stream::iter(
            (0..chunks).map(move |_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; size]))),
        );
        Request::new(axum::body::Body::from_stream(stream))
    }

    #[tokio::test]
    async fn an_oversize_streamed_body_is_too_large_by_type() {
        let e = read_body(streamed(10, 1000), 5000).await.unwrap_err();
        assert!(matches!(e, BodyError::TooLarge { limit: 5000 }), "{e:?}");
        // Positive control: the same stream within the limit is read whole.
        let b = read_body(streamed(5, 1000), 5000).await.unwrap();
        assert_eq!(b.len(), 5000);
        // A declared length over the limit is refused before reading.
        let mut req = streamed(1, 10);
        req.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("5001"));
        assert!(matches!(
            read_body(req, 5000).await,
            Err(BodyError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn a_broken_body_is_unreadable_not_too_large() {
        let stream = futures_util::stream::iter([
            Ok(Bytes::from_static(b"{\"a\":")),
            Err(std::io::Error::other("connection reset")),
        ]);
        let req = Request::new(axum::body::Body::from_stream(stream));
        let e = read_body(req, 5000).await.unwrap_err();
        assert!(matches!(e, BodyError::Unreadable(_)), "{e:?}");
    }

    #[test]
    fn one_limit_parser() {
        assert_eq!(parse_limit(None, 50, 500).unwrap(), 50);
        assert_eq!(parse_limit(Some(""), 50, 500).unwrap(), 50);
        assert_eq!(parse_limit(Some("7"), 50, 500).unwrap(), 7);
        assert_eq!(parse_limit(Some("9999"), 50, 500).unwrap(), 500);
        for bad in ["0", "-1", "x", "1.5"] {
            assert_eq!(
                parse_limit(Some(bad), 50, 500).unwrap_err().code,
                "invalid_limit"
            );
        }
    }
}
