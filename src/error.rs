//! The one error type every HTTP handler returns, and the one place domain
//! errors become HTTP.
//!
//! Invariants: every failure leaves as the contract's JSON shape
//! `{"error":{"code":"…","message":"…"}}` with the status that goes with its
//! code; internal details (SQL, paths) are logged, not sent. Domain modules
//! (auth, limits, store, ingest, message, channel) define their own
//! `thiserror` enums and never import this module: the `From` impls below
//! are the only mapping from a domain failure to a status and a code, so
//! handlers match on types, never on message strings.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::json;

use crate::auth::AuthError;
use crate::channel::InvalidChannel;
use crate::ingest::Rejection;
use crate::limits::LimitError;
use crate::message::MessageError;
use crate::store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn invalid_json(e: impl std::fmt::Display) -> ApiError {
        ApiError::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
    }
    pub fn invalid_channel(name: &str) -> ApiError {
        InvalidChannel::new(name).into()
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn payload_too_large(limit: usize) -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than {limit} bytes"),
        )
    }
    pub fn too_many_requests(code: &'static str, retry_after: u64) -> ApiError {
        ApiError {
            retry_after: Some(retry_after.max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                code,
                "too many requests; slow down",
            )
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        match e {
            AuthError::Unauthorized(m) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m)
            }
            AuthError::Forbidden(_) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            AuthError::BadKey(m) => {
                tracing::error!(error = %m, "auth misconfigured");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "authentication is misconfigured",
                )
            }
        }
    }
}

/// Only a transient store failure (busy, locked, connection lost, shutting
/// down) tells the client to retry; a corrupt database or a refused
/// statement will not get better by retrying, so it is a plain 500.
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::error!(error = %e, transient = e.is_transient(), "store error");
        if e.is_transient() {
            ApiError {
                retry_after: Some(1),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the event log is unavailable; nothing was stored, retry later",
                )
            }
        } else {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the event log failed; nothing was stored",
            )
        }
    }
}

impl From<InvalidChannel> for ApiError {
    fn from(e: InvalidChannel) -> ApiError {
        ApiError::bad_request("invalid_channel", e.to_string())
    }
}

impl From<MessageError> for ApiError {
    fn from(e: MessageError) -> ApiError {
        let code = match &e {
            MessageError::MissingChannel | MessageError::InvalidChannel(_) => "invalid_channel",
            MessageError::InvalidType => "invalid_type",
            MessageError::InvalidId => "invalid_id",
        };
        ApiError::bad_request(code, e.to_string())
    }
}

impl From<LimitError> for ApiError {
    fn from(e: LimitError) -> ApiError {
        match e {
            LimitError::RateLimited { retry_after } => {
                ApiError::too_many_requests("rate_limited", retry_after)
            }
            LimitError::BatchTooLarge { .. } => {
                ApiError::bad_request("batch_too_large", e.to_string())
            }
            LimitError::TooManyStreams { retry_after, .. } => ApiError {
                message: e.to_string(),
                ..ApiError::too_many_requests("too_many_streams", retry_after)
            },
        }
    }
}

impl From<Rejection> for ApiError {
    fn from(r: Rejection) -> ApiError {
        match r {
            Rejection::InvalidSignature(m) => {
                ApiError::new(StatusCode::UNAUTHORIZED, "invalid_signature", m)
            }
            Rejection::TimestampOutOfTolerance(m) => {
                ApiError::bad_request("timestamp_out_of_tolerance", m)
            }
            Rejection::InvalidJson(m) => ApiError::bad_request("invalid_json", m),
        }
    }
}

impl ApiError {
    /// The contract's JSON error body, `{"error":{"code":…,"message":…}}`:
    /// the one rendering, used by the router and the lean SSE path alike.
    pub fn body(&self) -> bytes::Bytes {
        json!({"error": {"code": self.code, "message": self.message}})
            .to_string()
            .into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, self.body()).into_response();
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_errors_map_to_the_contracts_codes() {
        let e = ApiError::from(LimitError::RateLimited { retry_after: 3 });
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (StatusCode::TOO_MANY_REQUESTS, "rate_limited", Some(3))
        );
        let e = ApiError::from(LimitError::TooManyStreams {
            open: 4,
            retry_after: 5,
        });
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (StatusCode::TOO_MANY_REQUESTS, "too_many_streams", Some(5))
        );
        assert_eq!(
            e.message,
            "this address already has 4 open streams (limits.streams_per_client); close one first"
        );
        let e = ApiError::from(LimitError::BatchTooLarge {
            events: 9,
            per_second: 5,
        });
        assert_eq!(
            (e.status, e.code, e.retry_after),
            (StatusCode::BAD_REQUEST, "batch_too_large", None)
        );
        for (m, code) in [
            (MessageError::MissingChannel, "invalid_channel"),
            (
                MessageError::InvalidChannel(InvalidChannel::new("a b")),
                "invalid_channel",
            ),
            (MessageError::InvalidType, "invalid_type"),
            (MessageError::InvalidId, "invalid_id"),
        ] {
            let e = ApiError::from(m);
            assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, code));
        }
        let e = ApiError::from(Rejection::InvalidSignature("no".into()));
        assert_eq!(
            (e.status, e.code),
            (StatusCode::UNAUTHORIZED, "invalid_signature")
        );
    }
}
