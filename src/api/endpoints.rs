//! Outbound webhook endpoints (admin API, contract §3.4):
//! `/v1/endpoints[/{id}[/rotate|/secret|/attempts|/replay]]`.
//!
//! Invariants: every route checks the admin key (`Admin`) before it reads the body;
//! an endpoint is validated whole before anything is stored (a bad field
//! changes nothing); a literal private, loopback or link-local target is
//! refused at creation and on update (`400 forbidden_target`) unless the
//! configuration allows it; secrets are returned only by create, rotate and
//! `GET …/secret`, never listed or logged.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Admin, RawBody};
use crate::AppState;
use crate::channel::Pattern;
use crate::clock::{now_ms, rfc3339};
use crate::config::Dur;
use crate::deliver::sign;
use crate::error::ApiError;
use crate::message::{MAX_TYPE_LEN, valid_type};
use crate::store::{
    AttemptStatus, AttemptView, Endpoint, EndpointPatch, NewEndpoint, Resume, SecretRotation,
    parse_cursor,
};
use crate::transport::{query_pairs, query_value};

const MAX_ENDPOINTS: usize = 10_000;
const MAX_URL_LEN: usize = 2048;
const MAX_PATTERNS: usize = 100;
const MAX_DESCRIPTION: usize = 1000;
const MAX_RATE_LIMIT: u32 = 100_000;
const DEFAULT_ATTEMPTS: usize = 100;
const MAX_ATTEMPTS: usize = 1000;
/// Events one replay request queues at most; the reply says where to go on.
const MAX_REPLAY: usize = 100_000;
const DEFAULT_OVERLAP: Duration = Duration::from_secs(24 * 3600);
const MAX_OVERLAP: Duration = Duration::from_secs(30 * 86400);

fn endpoint_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|_| ApiError::not_found("endpoint_not_found", "no such endpoint"))
}

async fn load(app: &AppState, id: &str) -> Result<Endpoint, ApiError> {
    app.store
        .get_endpoint(id)
        .await?
        .ok_or_else(|| not_found(id))
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("endpoint_not_found", format!("no endpoint `{}`", shown(id)))
}

fn shown(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Parses a JSON body into `T`, with the contract's errors.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        if e.is_data() {
            ApiError::bad_request(
                "invalid_endpoint",
                format!("the body does not have the expected shape: {e}"),
            )
        } else {
            ApiError::invalid_json(e)
        }
    })
}

/// The endpoint as the API shows it (without its secret).
pub fn endpoint_json(e: &Endpoint) -> Value {
    json!({
        "id": e.id,
        "url": e.url,
        "channels": e.channels,
        "types": e.types,
        "description": e.description,
        "enabled": e.enabled,
        "disabled_reason": e.disabled_reason,
        "rate_limit": e.rate_limit,
        "failing_since": e.failing_since_ms.map(rfc3339),
        "created_at": rfc3339(e.created_ms),
        "updated_at": rfc3339(e.updated_ms),
    })
}

fn check_url(app: &AppState, raw: &str) -> Result<String, ApiError> {
    let invalid = |why: String| ApiError::bad_request("invalid_url", why);
    if raw.len() > MAX_URL_LEN {
        return Err(invalid(format!("`url` is longer than {MAX_URL_LEN} bytes")));
    }
    let url = url::Url::parse(raw).map_err(|e| invalid(format!("`url` is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("`url` must be http:// or https://".into()));
    }
    if url.host().is_none() {
        return Err(invalid("`url` has no host".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid(
            "`url` must not carry credentials; the signature authenticates pushgate".into(),
        ));
    }
    app.deliver
        .policy()
        .check_url(&url)
        .map_err(|r| ApiError::bad_request("forbidden_target", r.to_string()))?;
    Ok(url.to_string())
}

fn check_channels(channels: &[String]) -> Result<(), ApiError> {
    if channels.is_empty() || channels.len() > MAX_PATTERNS {
        return Err(ApiError::bad_request(
            "invalid_channel",
            format!(
                "`channels` must list 1-{MAX_PATTERNS} channel names or patterns (`user:*`, `*`)"
            ),
        ));
    }
    for c in channels {
        if !Pattern::is_valid(c) {
            return Err(ApiError::invalid_channel(c));
        }
    }
    Ok(())
}

fn check_types(types: &[String]) -> Result<(), ApiError> {
    if types.len() > MAX_PATTERNS {
        return Err(ApiError::bad_request(
            "invalid_type",
            format!("`types` lists at most {MAX_PATTERNS} patterns"),
        ));
    }
    for t in types {
        if !valid_type(t) {
            return Err(ApiError::bad_request(
                "invalid_type",
                format!(
                    "each of `types` must be 1-{MAX_TYPE_LEN} bytes without control characters"
                ),
            ));
        }
    }
    Ok(())
}

fn check_description(d: &str) -> Result<(), ApiError> {
    if d.len() > MAX_DESCRIPTION {
        return Err(ApiError::bad_request(
            "invalid_description",
            format!("`description` is longer than {MAX_DESCRIPTION} bytes"),
        ));
    }
    Ok(())
}

fn check_rate_limit(r: Option<u32>) -> Result<(), ApiError> {
    if r.is_some_and(|r| r == 0 || r > MAX_RATE_LIMIT) {
        return Err(ApiError::bad_request(
            "invalid_rate_limit",
            format!("`rate_limit` is deliveries per second, 1-{MAX_RATE_LIMIT}, or null"),
        ));
    }
    Ok(())
}

fn check_secret(s: &str) -> Result<(), ApiError> {
    sign::secret_key(s)
        .map(|_| ())
        .map_err(|e| ApiError::bad_request("invalid_secret", e.to_string()))
}

fn new_endpoint_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let tail: String = (0..20)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("ep_{tail}")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    url: String,
    channels: Vec<String>,
    #[serde(default)]
    types: Vec<String>,
    #[serde(default)]
    description: String,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    rate_limit: Option<u32>,
    /// Bring your own `whsec_…` secret (e.g. when moving from another sender).
    #[serde(default)]
    secret: Option<String>,
}

fn yes() -> bool {
    true
}

pub async fn create(
    State(app): State<Arc<AppState>>,
    _admin: Admin,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let b: CreateBody = parse_body(&body)?;
    let url = check_url(&app, &b.url)?;
    check_channels(&b.channels)?;
    check_types(&b.types)?;
    check_description(&b.description)?;
    check_rate_limit(b.rate_limit)?;
    if let Some(s) = &b.secret {
        check_secret(s)?;
    }
    if app.store.list_endpoints().await?.len() >= MAX_ENDPOINTS {
        return Err(ApiError::bad_request(
            "too_many_endpoints",
            format!("at most {MAX_ENDPOINTS} endpoints; delete some first"),
        ));
    }
    let secret = b.secret.unwrap_or_else(sign::generate_secret);
    let endpoint = app
        .store
        .create_endpoint(NewEndpoint {
            id: new_endpoint_id(),
            url,
            channels: b.channels,
            types: b.types,
            description: b.description,
            enabled: b.enabled,
            rate_limit: b.rate_limit,
            secret: secret.clone(),
        })
        .await?;
    app.deliver.endpoints_changed();
    let mut v = endpoint_json(&endpoint);
    v["secret"] = json!(secret);
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

pub async fn list(
    State(app): State<Arc<AppState>>,
    _admin: Admin,
) -> Result<Json<Value>, ApiError> {
    let all = app.store.list_endpoints().await?;
    Ok(Json(json!({
        "endpoints": all.iter().map(endpoint_json).collect::<Vec<_>>()
    })))
}

pub async fn get(
    State(app): State<Arc<AppState>>,
    _admin: Admin,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let e = load(&app, &endpoint_id(path)?).await?;
    Ok(Json(endpoint_json(&e)))
}

/// `PATCH`: `null` is allowed only where it means something (`rate_limit`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    url: Option<String>,
    channels: Option<Vec<String>>,
    types: Option<Vec<String>>,
    description: Option<String>,
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    rate_limit: Option<Option<u32>>,
}

/// Tells an absent field (`None`) from an explicit `null` (`Some(None)`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

pub async fn update(
    State(app): State<Arc<AppState>>,
    _admin: Admin,
    path: Result<Path<String>, PathRejection>,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(path)?;
    let b: PatchBody = parse_body(&body)?;
    let url = b.url.as_deref().map(|u| check_url(&app, u)).transpose()?;
    if let Some(c) = &b.channels {
        check_channels(c)?;
    }
    if let Some(t) = &b.types {
        check_types(t)?;
    }
    if let Some(d) = &b.description {
        check_description(d)?;
    }
    if let Some(r) = b.rate_limit {
        check_rate_limit(r)?;
    }
    let patch = EndpointPatch {
        url,
        channels: b.channels,
        types: b.types,
        description: b.description,
        enabled: b.enabled,
        disabled_reason: Some("disabled through the API".into()),
        rate_limit: b.rate_limit,
        rotate: None,
    };
    let e = app
        .store
        .update_endpoint(&id, patch)
        .await?
        .ok_or_else(|| not_found(&id))?;
    app.deliver.endpoints_changed();
    Ok(Json(endpoint_json(&e)))
}

pub async fn delete(
    State(app): State<Arc<AppState>>,
    _admin: Admin,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = endpoint_id(path)?;
    if !app.store.delete_endpoint(&id).await? {
        return Err(not_found(&id));
    }
    app.deliver.endpoints_changed();
    Ok(StatusCode::NO_CONTENT)
}

pub async fn secret(
    State(app): State<Arc<AppState>>,
    _admin: Admin,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let e = load(&app, &endpoint_id(path)?).await?;
    let now = now_ms();
    let secrets: Vec<Value> = e
        .secrets
        .iter()
        .filter(|s| s.expires_ms.is_none_or(|x| x > now))
        .map(|s| json!({"secret": s.secret, "expires_at": s.expires_ms.map(rfc3339)}))
        .collect();
    Ok(Json(json!({
        "secret": e.secrets.first().map(|s| s.secret.clone()),
        "secrets": secrets,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    /// How long the previous secret keeps signing too (default 24h).
    overlap: Option<Dur>,
    secret: Option<String>,
}

/// Makes a new current secret; the previous one is still sent (a second
/// signature) until the overlap ends, so receivers can switch at leisure.
pub async fn rotate(
    State(app): State<Arc<AppState>>,
    _admin: Admin,
    path: Result<Path<String>, PathRejection>,
    RawBody(body): RawBody,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(path)?;
    let b: RotateBody = if body.iter().all(u8::is_ascii_whitespace) {
        RotateBody::default()
    } else {
        parse_body(&body)?
    };
    let overlap = b.overlap.map(|d| d.0).unwrap_or(DEFAULT_OVERLAP);
    if overlap > MAX_OVERLAP {
        return Err(ApiError::bad_request(
            "invalid_overlap",
            "`overlap` is at most 30d",
        ));
    }
    if let Some(s) = &b.secret {
        check_secret(s)?;
    }
    let secret = b.secret.unwrap_or_else(sign::generate_secret);
    let previous_expires_ms = now_ms() + overlap.as_millis() as i64;
    let patch = EndpointPatch {
        rotate: Some(SecretRotation {
            secret: secret.clone(),
            previous_expires_ms,
        }),
        ..EndpointPatch::default()
    };
    let e = app
        .store
        .update_endpoint(&id, patch)
        .await?
        .ok_or_else(|| not_found(&id))?;
    app.deliver.endpoints_changed();
    let mut v = endpoint_json(&e);
    v["secret"] = json!(secret);
    v["previous_secret_expires_at"] =
        json!((e.secrets.len() > 1).then(|| rfc3339(previous_expires_ms)));
    Ok(Json(v))
}

fn attempt_json(a: &AttemptView) -> Value {
    json!({
        "id": a.id,
        "event_id": a.event_id,
        "webhook_id": a.msg_id,
        "attempt": a.attempt,
        "status": a.status.as_str(),
        "response_status": a.response_status,
        "response_body": a.response_body,
        "error": a.error,
        "duration_ms": a.duration_ms,
        "at": rfc3339(a.at_ms),
    })
}

pub async fn attempts(
    State(app): State<Arc<AppState>>,
    _admin: Admin,
    path: Result<Path<String>, PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(path)?;
    let pairs = query_pairs(raw.as_deref());
    let limit = super::parse_limit(query_value(&pairs, "limit"), DEFAULT_ATTEMPTS, MAX_ATTEMPTS)?;
    let status = match query_value(&pairs, "status") {
        None | Some("") => None,
        Some("pending") => Some(AttemptStatus::Pending),
        Some("succeeded") => Some(AttemptStatus::Succeeded),
        Some("failed") => Some(AttemptStatus::Failed),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_status",
                "status is pending, succeeded or failed",
            ));
        }
    };
    load(&app, &id).await?;
    let rows = app.store.list_attempts(&id, status, limit).await?;
    Ok(Json(json!({
        "attempts": rows.iter().map(attempt_json).collect::<Vec<_>>()
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    since: String,
}

/// Queues again every retained event after `since` that matches the
/// endpoint (each with its original `webhook-id`).
pub async fn replay(
    State(app): State<Arc<AppState>>,
    _admin: Admin,
    path: Result<Path<String>, PathRejection>,
    RawBody(body): RawBody,
) -> Result<Response, ApiError> {
    let id = endpoint_id(path)?;
    let b: ReplayBody = parse_body(&body)?;
    let endpoint = load(&app, &id).await?;
    if !endpoint.enabled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "endpoint_disabled",
            format!(
                "the endpoint is disabled ({}); enable it first with PATCH {{\"enabled\":true}}",
                endpoint
                    .disabled_reason
                    .as_deref()
                    .unwrap_or("no reason recorded")
            ),
        ));
    }
    let bounds = app.store.bounds().await?;
    let (after, reset) = match parse_cursor(&b.since, app.store.log_tag(), bounds) {
        Resume::After(seq) => (seq, None),
        Resume::Reset(crate::store::ResetReason::Expired) => {
            (bounds.pruned_through, Some("cursor_expired"))
        }
        Resume::Reset(reason) => {
            return Err(ApiError::bad_request(
                "invalid_cursor",
                format!(
                    "`since` is not a cursor of this log ({}); use an event id or `earliest`",
                    reason.as_str()
                ),
            ));
        }
    };
    let (queued, next) = app
        .deliver
        .replay(&endpoint, after, bounds.head, MAX_REPLAY)
        .await?;
    let mut v = json!({ "queued": queued });
    if let Some(reason) = reset {
        v["reset"] = json!(reason);
    }
    if let Some(next) = next {
        v["next"] = json!(app.cursor(next));
    }
    Ok((StatusCode::ACCEPTED, Json(v)).into_response())
}
