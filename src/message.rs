//! A message as a publisher states it (`POST /v1/publish`, WebSocket
//! `publish`), checked and made ready for the log.
//!
//! Owns the limits on what an event may say about itself: the one
//! `MAX_TYPE_LEN` and `MAX_ID_LEN` every entry point uses (publish,
//! WebSocket, inbound webhooks, endpoint type filters). Invariant: a
//! `NewMessage` built here names exactly one valid channel, a type of
//! 1–200 bytes without control characters, and an idempotency key of the
//! same shape if any; failures are typed (`MessageError`), and how they
//! read on the wire is decided in `error.rs`.

use serde_json::value::RawValue;

use crate::channel::{InvalidChannel, check_channel};
use crate::store::NewMessage;

/// Longest event type, in bytes.
pub const MAX_TYPE_LEN: usize = 200;
/// Longest idempotency key (or provider event id), in bytes.
pub const MAX_ID_LEN: usize = 200;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("`channel` is required")]
    MissingChannel,
    #[error(transparent)]
    InvalidChannel(#[from] InvalidChannel),
    #[error("`type` must be 1-{MAX_TYPE_LEN} bytes without control characters")]
    InvalidType,
    #[error("`id` (the idempotency key) must be 1-{MAX_ID_LEN} bytes without control characters")]
    InvalidId,
}

/// Whether `kind` may be an event type (or a type filter).
pub fn valid_type(kind: &str) -> bool {
    !kind.is_empty() && kind.len() <= MAX_TYPE_LEN && !kind.chars().any(char::is_control)
}

/// Checks one event and makes it a message. `source` is `publish` or `ws`.
pub fn to_message(
    channel: Option<String>,
    kind: Option<String>,
    data: Option<Box<RawValue>>,
    id: Option<String>,
    source: &str,
) -> Result<NewMessage, MessageError> {
    let channel = channel.ok_or(MessageError::MissingChannel)?;
    check_channel(&channel)?;
    let kind = kind.unwrap_or_else(|| "message".to_string());
    if !valid_type(&kind) {
        return Err(MessageError::InvalidType);
    }
    if let Some(id) = &id
        && (id.is_empty() || id.len() > MAX_ID_LEN || id.chars().any(char::is_control))
    {
        return Err(MessageError::InvalidId);
    }
    let data = data.unwrap_or_else(|| RawValue::from_string("null".into()).expect("null is JSON"));
    Ok(NewMessage {
        channels: vec![channel],
        kind,
        source: source.to_string(),
        source_id: id,
        // Set by the caller once it knows the publisher.
        key_scope: String::new(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_typed() {
        let m = |c: Option<&str>, k: Option<&str>, id: Option<&str>| {
            to_message(
                c.map(Into::into),
                k.map(Into::into),
                None,
                id.map(Into::into),
                "publish",
            )
        };
        assert_eq!(
            m(None, None, None).unwrap_err(),
            MessageError::MissingChannel
        );
        assert!(matches!(
            m(Some("a b"), None, None),
            Err(MessageError::InvalidChannel(_))
        ));
        assert_eq!(
            m(Some("a"), Some(""), None).unwrap_err(),
            MessageError::InvalidType
        );
        assert_eq!(
            m(Some("a"), Some(&"t".repeat(201)), None).unwrap_err(),
            MessageError::InvalidType
        );
        assert_eq!(
            m(Some("a"), None, Some("x\n")).unwrap_err(),
            MessageError::InvalidId
        );
        // Positive control: the same shapes, valid, make a message.
        let ok = m(Some("a"), Some(&"t".repeat(200)), Some("k")).unwrap();
        assert_eq!(ok.kind.len(), 200);
        assert_eq!(ok.data.get(), "null");
        assert_eq!(m(Some("a"), None, None).unwrap().kind, "message");
    }
}
