//! The ways events leave pushgate to live clients: SSE, WebSocket, polling.
//!
//! Each reads its events from a `feed::Feed`, which keeps contract 1 (no gap,
//! no duplicate, resets); transports only check requests and frame bytes.
//! What they share lives here: reading the channel list and the resume point
//! from a request.

pub mod policy;
pub mod poll;
pub mod sse;
pub mod ws;

use crate::AppState;
use crate::error::ApiError;
use crate::store::{Seq, format_cursor, valid_channel};

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

pub fn cursor(app: &AppState, seq: Seq) -> String {
    format_cursor(seq, app.store.log_tag())
}
