//! The ways events leave pushgate to live clients: SSE, WebSocket, polling.
//!
//! What they share lives here: reading the channel list and the resume point
//! from a request, and turning a client's cursor into a place in the log.
//! Invariant: every transport registers with the hub *before* it reads the
//! log, and never delivers a seq at or below the last one it delivered, so
//! the switch from history to live has no gap and no duplicate.

pub mod poll;
pub mod sse;
pub mod ws;

use crate::AppState;
use crate::api::error::ApiError;
use crate::store::{ResetReason, Resume, Seq, format_cursor, parse_cursor, valid_channel};

/// Query pairs, decoded. Unknown keys are kept and ignored by callers.
pub fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .into_owned()
            .collect()
    })
    .unwrap_or_default()
}

pub fn query_value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// The `channel=` values: each valid, at least one, at most the configured
/// number, duplicates dropped (order kept).
pub fn requested_channels(
    app: &AppState,
    pairs: &[(String, String)],
) -> Result<Vec<String>, ApiError> {
    let mut channels: Vec<String> = Vec::new();
    for (k, v) in pairs {
        if k != "channel" {
            continue;
        }
        for name in v.split(',').filter(|s| !s.is_empty()) {
            if !valid_channel(name) {
                return Err(ApiError::invalid_channel(name));
            }
            if !channels.iter().any(|c| c == name) {
                channels.push(name.to_string());
            }
        }
    }
    if channels.is_empty() {
        return Err(ApiError::bad_request(
            "missing_channel",
            "name at least one channel: ?channel=NAME",
        ));
    }
    let cap = app.config.limits.channels_per_subscription;
    if cap > 0 && channels.len() > cap {
        return Err(ApiError::bad_request(
            "too_many_channels",
            format!("at most {cap} channels per subscription"),
        ));
    }
    Ok(channels)
}

/// Where a reader starts.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    pub after: Seq,
    /// Set when the client's cursor could not be honoured: tell it, then
    /// continue from the oldest retained event.
    pub reset: Option<ResetReason>,
}

/// Resolves a client cursor; `None` means "from now on" (the current head).
/// Call after registering with the hub.
pub async fn resolve_start(app: &AppState, cursor: Option<&str>) -> Result<Start, ApiError> {
    let bounds = app.store.bounds().await?;
    Ok(match cursor {
        None => Start {
            after: bounds.head,
            reset: None,
        },
        Some(text) => match parse_cursor(text, app.store.log_tag(), bounds) {
            Resume::After(after) => Start { after, reset: None },
            Resume::Reset(reason) => Start {
                after: bounds.pruned_through,
                reset: Some(reason),
            },
        },
    })
}

pub fn cursor(app: &AppState, seq: Seq) -> String {
    format_cursor(seq, app.store.log_tag())
}
