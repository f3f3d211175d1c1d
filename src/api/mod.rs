//! HTTP routes: what each path does and which error shape it answers with.
//!
//! Invariants: every response that is not a success is the contract's JSON
//! error (404 and 405 included); request logs carry method and path only,
//! never the query string (it may hold `?token=`); bodies are read with the
//! configured limit and refused with 413 while streaming, never buffered whole.

pub mod demo;
pub mod error;
pub mod publish;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use tower_http::trace::TraceLayer;

use crate::AppState;
use crate::transport::{poll, sse, ws};
use error::ApiError;

pub fn router(app: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/publish", post(publish::publish))
        .route("/v1/stream", get(sse::stream))
        .route("/v1/events", get(poll::events))
        .route("/v1/ws", get(ws::upgrade))
        .route("/demo", get(demo::page))
        .route("/demo/pay", post(demo::pay))
        .route("/client.js", get(demo::client_js))
        .route("/client.d.ts", get(demo::client_dts))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(
            app.clone(),
            limit_failed_checks,
        ))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            // The path only: a query string may carry a token.
            tracing::info_span!("http", method = %req.method(), path = %req.uri().path())
        }))
        .with_state(app)
}

/// The request body, read up to `server.max_body`; larger bodies get 413
/// as soon as the limit is crossed.
pub struct RawBody(pub Bytes);

impl FromRequest<Arc<AppState>> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, app: &Arc<AppState>) -> Result<Self, ApiError> {
        let limit = app.config.server.max_body.0;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(ApiError::payload_too_large(limit));
        }
        match axum::body::to_bytes(req.into_body(), limit).await {
            Ok(b) => Ok(RawBody(b)),
            Err(e) => {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
                    || e.to_string().contains("length limit");
                if too_large {
                    Err(ApiError::payload_too_large(limit))
                } else {
                    Err(ApiError::bad_request(
                        "invalid_body",
                        format!("could not read the body: {e}"),
                    ))
                }
            }
        }
    }
}

/// Counts failed key, token and signature checks per client address; past
/// `limits.invalid_per_client` per second they are answered 429.
async fn limit_failed_checks(
    State(app): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let resp = next.run(req).await;
    if matches!(
        resp.status(),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    ) && let Some(ip) = client
        && let Err(limited) = app.limits.record_invalid(ip)
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
    let mut resp = app.metrics.render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
