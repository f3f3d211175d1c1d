//! `POST /v1/publish`: one event or an atomic batch from a backend.
//!
//! Invariants: the reply is sent only after the events are durable; a batch
//! is validated whole before anything is written, so a bad event stores
//! nothing; the payload is stored as the bytes that arrived; credentials are
//! checked before the body is read, and every channel of a batch is checked
//! against a token's `publish` grant before anything is stored.

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequest, Request, State};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use super::RawBody;
use crate::AppState;
use crate::auth::Credentials;
use crate::error::ApiError;
pub use crate::message::to_message;

/// One event at the top level, or `{"events":[…]}`. (No `#[serde(flatten)]`:
/// it would buffer `data` and lose the raw bytes.)
#[derive(Deserialize)]
struct PublishBody {
    events: Option<Vec<PublishEvent>>,
    channel: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    data: Option<Box<RawValue>>,
    id: Option<String>,
}

#[derive(Deserialize, Default)]
struct PublishEvent {
    channel: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    data: Option<Box<RawValue>>,
    id: Option<String>,
}

pub async fn publish(
    State(app): State<Arc<AppState>>,
    req: Request,
) -> Result<Json<serde_json::Value>, ApiError> {
    // Credentials first: an anonymous client gets its 401 before we read
    // (up to `max_body` of) what it sends.
    let creds = Credentials::from_request(req.headers(), None);
    let publisher = app.auth.authenticate_publish(&creds)?;
    let RawBody(body) = RawBody::from_request(req, &app).await?;
    let parsed: PublishBody = serde_json::from_slice(&body).map_err(|e| {
        if e.is_data() {
            ApiError::bad_request(
                "invalid_event",
                format!("the event does not have the expected shape: {e}"),
            )
        } else {
            ApiError::invalid_json(e)
        }
    })?;
    let events = match parsed.events {
        Some(list) => {
            if list.is_empty() {
                return Err(ApiError::bad_request("invalid_event", "`events` is empty"));
            }
            let cap = app.config.limits.batch_size;
            if list.len() > cap {
                return Err(ApiError::bad_request(
                    "batch_too_large",
                    format!("at most {cap} events per batch"),
                ));
            }
            list
        }
        None => vec![PublishEvent {
            channel: parsed.channel,
            kind: parsed.kind,
            data: parsed.data,
            id: parsed.id,
        }],
    };
    let mut messages = events
        .into_iter()
        .map(|e| to_message(e.channel, e.kind, e.data, e.id, "publish"))
        .collect::<Result<Vec<_>, _>>()?;

    let channels: Vec<&str> = messages.iter().map(|m| m.channels[0].as_str()).collect();
    let publisher = publisher.authorize(&channels)?;
    app.limits.check_publish(&publisher, messages.len())?;
    let scope = app.auth.idempotency_scope(&publisher);
    for m in &mut messages {
        m.key_scope.clone_from(&scope);
    }

    let started = std::time::Instant::now();
    let appended = app.store.append(messages).await?;
    app.metrics
        .append_seconds
        .record(started.elapsed().as_secs_f64());
    let stored: u64 = appended
        .iter()
        .filter(|a| !a.duplicate)
        .map(|a| a.seqs.len() as u64)
        .sum();
    app.metrics.events_appended.increment(stored);

    let ids: Vec<String> = appended.iter().map(|a| app.cursor(a.seqs[0])).collect();
    let duplicate: Vec<bool> = appended.iter().map(|a| a.duplicate).collect();
    Ok(Json(json!({"ids": ids, "duplicate": duplicate})))
}
