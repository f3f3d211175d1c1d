//! The inspector's admin API: what arrived at `POST /webhooks/{source}`.
//!
//! `GET /v1/inbound?source=&status=accepted|rejected&limit=&before=` lists
//! records newest first (without bodies); `GET /v1/inbound/{id}` returns one
//! with its headers, raw body, verdict and reason. Invariant: admin
//! credentials are required (open only in development mode), and bad
//! parameters are refused with the contract's JSON errors.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use base64::Engine;
use http::HeaderMap;
use serde_json::{Value, json};

use crate::AppState;
use crate::auth::Credentials;
use crate::clock::rfc3339;
use crate::error::ApiError;
use crate::store::{InboundFilter, InboundRecord, InboundStatus};
use crate::transport::{query_pairs, query_value};

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;

pub async fn list(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Json<Value>, ApiError> {
    app.auth
        .authorize_admin(&Credentials::from_request(&headers, None))?;
    let pairs = query_pairs(raw.as_deref());
    let nonempty = |k: &str| query_value(&pairs, k).filter(|v| !v.is_empty());
    let status = nonempty("status")
        .map(|s| {
            InboundStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request("invalid_status", "status must be accepted or rejected")
            })
        })
        .transpose()?;
    let limit = super::parse_limit(nonempty("limit"), DEFAULT_LIMIT, MAX_LIMIT)?;
    let before = nonempty("before")
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| ApiError::bad_request("invalid_before", "before must be a record id"))
        })
        .transpose()?;
    let records = app
        .store
        .list_inbound(InboundFilter {
            source: nonempty("source").map(str::to_string),
            status,
            before,
            limit,
        })
        .await?;
    let next = (records.len() == limit)
        .then(|| records.last().map(|r| r.id.to_string()))
        .flatten();
    let items: Vec<Value> = records.iter().map(|r| summary(&app, r)).collect();
    Ok(Json(json!({"inbound": items, "next_before": next})))
}

pub async fn get(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = id.map(|Path(id)| id).unwrap_or_default();
    app.auth
        .authorize_admin(&Credentials::from_request(&headers, None))?;
    let not_found = || ApiError::not_found("not_found", format!("no inbound record `{id}`"));
    let numeric: i64 = id.parse().map_err(|_| not_found())?;
    let record = app
        .store
        .get_inbound(numeric)
        .await?
        .ok_or_else(not_found)?;
    let mut out = summary(&app, &record);
    let obj = out.as_object_mut().expect("summary is an object");
    obj.insert("headers".into(), json!(record.headers));
    let body = record.body.unwrap_or_default();
    obj.insert(
        "body_truncated".into(),
        json!((body.len() as u64) < record.body_size),
    );
    match std::str::from_utf8(&body) {
        Ok(text) => {
            obj.insert("body".into(), json!(text));
            obj.insert("body_base64".into(), Value::Null);
        }
        Err(_) => {
            obj.insert("body".into(), Value::Null);
            obj.insert(
                "body_base64".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(&body)),
            );
        }
    }
    Ok(Json(out))
}

fn summary(app: &AppState, r: &InboundRecord) -> Value {
    let time = rfc3339(r.time_ms);
    let event_ids: Vec<String> = r.seqs.iter().map(|s| app.cursor(*s)).collect();
    json!({
        "id": r.id.to_string(),
        "time": time,
        "source": r.source,
        "status": r.status.as_str(),
        "duplicate": r.duplicate,
        "reason": r.reason,
        "message": r.detail,
        "source_id": r.source_id,
        "type": r.kind,
        "channels": r.channels,
        "event_ids": event_ids,
        "size": r.body_size,
    })
}
