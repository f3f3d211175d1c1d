//! `POST /webhooks/{source}`: the HTTP half of inbound webhooks (contract
//! section 2.1); what a delivery means is `ingest::Source::accept`.
//!
//! Invariants:
//! - the reply is sent only after the message is durable; a repeat of a
//!   stored `(source, provider id)` answers with the first cursor and stores
//!   and pushes nothing — the database's unique key decides, so two copies
//!   arriving at once are safe;
//! - every delivery is recorded for the inspector: accepted ones in the same
//!   transaction as their events, refused ones in a table capped by count;
//! - a valid signature is never rate-limited: only refusals answered 401
//!   count toward `limits.invalid_per_client`. They are counted here, before
//!   anything is written: one past the budget is answered 429 and not
//!   recorded, so a flood of bad signatures costs no writes;
//! - a refusal's record keeps at most `REJECTED_BODY_KEEP` of its body (the
//!   inspector shows `body_truncated` and the full `size`);
//! - a source nobody can verify (`kind = "none"`) is throttled per client
//!   before anything is read: each delivery counts against the same
//!   `limits.invalid_per_client` budget (`Limits::check_unverified`).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use serde_json::json;

use super::{BodyError, CheckCounted, client_ip, read_body};
use crate::AppState;
use crate::error::ApiError;
use crate::ingest::refused_record;

/// What the record of a refused delivery keeps of its body: enough to see
/// what was sent, not a way to fill the disk at `max_body` per request.
pub const REJECTED_BODY_KEEP: usize = 64 << 10;

/// The source name refusals of unknown sources are recorded under (the name
/// that was tried is in the record's message). Not a valid source name, so
/// it cannot collide with one.
pub const UNKNOWN_SOURCES: &str = "(unknown)";

/// `POST /webhooks/{source}`.
pub async fn receive(
    State(app): State<Arc<AppState>>,
    name: Result<Path<String>, axum::extract::rejection::PathRejection>,
    req: Request,
) -> Response {
    // A name that does not even decode (`%FF`) names no source either.
    let name = name.map(|Path(n)| n).unwrap_or_default();
    match receive_inner(&app, &name, req).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn receive_inner(
    app: &Arc<AppState>,
    name: &str,
    req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers().clone();
    let client = client_ip(req.extensions());
    let Some(source) = app.sources.get(name).cloned() else {
        let shown: String = name.chars().filter(|c| !c.is_control()).take(64).collect();
        let err = ApiError::not_found(
            "unknown_source",
            format!("no source named `{shown}` is configured (see `[[sources]]`)"),
        );
        // Every unknown name shares one record bucket: the cap is per
        // source, and a sender can make up names without end.
        reject(app, UNKNOWN_SOURCES, &headers, Bytes::new(), 0, &err).await;
        return Err(err);
    };
    if source.is_unsigned()
        && let Some(ip) = client
    {
        app.limits.check_unverified(ip)?;
    }
    let body = match read_body(req, app.config.server.max_body.0).await {
        Ok(b) => b,
        Err(e @ BodyError::TooLarge { .. }) => {
            let err = ApiError::from(e);
            let declared = headers
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            reject(app, &source.name, &headers, Bytes::new(), declared, &err).await;
            return Err(err);
        }
        Err(e) => return Err(e.into()),
    };
    let accepted = match source.accept(&headers, body.clone(), crate::clock::unix_now() as i64) {
        Ok(a) => a,
        Err(rejection) => {
            let err = ApiError::from(rejection);
            return Ok(refuse(app, &source.name, &headers, body, client, err).await);
        }
    };

    let started = std::time::Instant::now();
    let (appended, _record) = app
        .store
        .append_webhook(accepted.message, accepted.inbound)
        .await?;
    app.metrics
        .append_seconds
        .record(started.elapsed().as_secs_f64());
    if appended.duplicate {
        app.metrics.webhooks_duplicate.increment(1);
    } else {
        app.metrics.webhooks_accepted.increment(1);
        app.metrics
            .events_appended
            .increment(appended.seqs.len() as u64);
    }
    let first = appended.seqs.first().copied().unwrap_or_default();
    Ok(Json(json!({
        "id": app.cursor(first),
        "duplicate": appended.duplicate,
    }))
    .into_response())
}

/// Answers a delivery its verifier refused. A failed check (401/403) is
/// counted against `limits.invalid_per_client` first: past the budget the
/// answer is 429 and nothing is written. Otherwise the refusal is recorded
/// with at most `REJECTED_BODY_KEEP` of its body.
async fn refuse(
    app: &AppState,
    source: &str,
    headers: &HeaderMap,
    body: Bytes,
    client: Option<std::net::IpAddr>,
    err: ApiError,
) -> Response {
    let failed_check = matches!(err.status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN);
    if let Some(ip) = client
        && let Some(limited) = crate::transport::policy::after_check(&app.limits, ip, err.status)
    {
        app.metrics.webhooks_rejected.increment(1);
        return counted(limited.into_response());
    }
    let size = body.len() as u64;
    let kept = body.slice(..body.len().min(REJECTED_BODY_KEEP));
    reject(app, source, headers, kept, size, &err).await;
    let resp = err.into_response();
    if failed_check { counted(resp) } else { resp }
}

fn counted(mut resp: Response) -> Response {
    resp.extensions_mut().insert(CheckCounted);
    resp
}

/// Records a refusal for the inspector. A store failure here is logged, not
/// returned: the sender gets the refusal it earned either way.
async fn reject(
    app: &AppState,
    source: &str,
    headers: &HeaderMap,
    body: Bytes,
    body_size: u64,
    err: &ApiError,
) {
    app.metrics.webhooks_rejected.increment(1);
    tracing::debug!(source, code = err.code, "webhook refused");
    let record = refused_record(source, headers, body, body_size, err.code, &err.message);
    if let Err(e) = app.store.record_rejected(record).await {
        tracing::warn!(error = %e, "could not record a refused webhook");
    }
}
