//! Request policy that the hyper routes and the lean SSE path
//! (`server::sse_h1`) must apply identically, written once.
//!
//! Owns: how an `ApiError` becomes bytes on the wire, the CORS decision for
//! an `Origin`, the failed-check limiter call after a refusal, and the trace
//! span of a request. Invariants: a request refused on either path gets the
//! same status, headers and JSON body; an origin is allowed on one path
//! exactly when it is on the other; request spans carry method and path
//! only, never the query string (it may hold `?token=`).

use std::net::IpAddr;

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::error::ApiError;
use crate::limits::Limits;

/// The error's body: `ApiError::body`, the rendering `IntoResponse` uses.
pub fn error_body(e: &ApiError) -> Bytes {
    e.body()
}

/// The header lines of an error response besides framing, as
/// `(name, value)`: the content type and, when set, `retry-after` (the
/// same headers `IntoResponse` sets).
pub fn error_headers(e: &ApiError) -> Vec<(&'static str, String)> {
    let mut h = vec![("content-type", "application/json".to_string())];
    if let Some(secs) = e.retry_after {
        h.push(("retry-after", secs.to_string()));
    }
    h
}

/// What a response says to a cross-origin reader.
#[derive(Debug, PartialEq, Eq)]
pub enum Cors {
    /// Same-origin only: no CORS headers.
    Deny,
    /// `*` is configured: any page may read, without credentials.
    Any,
    /// A listed origin: echoed, with credentials (the cookie flow).
    Origin(HeaderValue),
}

/// The CORS decision for `origin` under `server.cors_origins` (already
/// validated by `Config`): a listed origin wins over `*`, so a listed page
/// keeps its credentials.
pub fn cors(allowed: &[String], origin: Option<&HeaderValue>) -> Cors {
    let Some(origin) = origin else {
        return Cors::Deny;
    };
    let listed = origin.to_str().is_ok_and(|o| {
        allowed
            .iter()
            .any(|a| a != "*" && crate::auth::normalize_origin(a) == o)
    });
    if listed {
        Cors::Origin(origin.clone())
    } else if allowed.iter().any(|a| a == "*") {
        Cors::Any
    } else {
        Cors::Deny
    }
}

/// Response headers a cross-origin page may read (besides the safelisted
/// ones): the router's CORS layer exposes the same.
pub const EXPOSED: http::HeaderName = http::header::RETRY_AFTER;

/// The CORS header lines of a response, for the decision.
pub fn cors_headers(decision: &Cors) -> Vec<(&'static str, HeaderValue)> {
    let expose = (
        "access-control-expose-headers",
        HeaderValue::from_static(EXPOSED.as_str()),
    );
    match decision {
        Cors::Deny => Vec::new(),
        Cors::Any => vec![
            ("access-control-allow-origin", HeaderValue::from_static("*")),
            expose,
        ],
        Cors::Origin(o) => vec![
            ("access-control-allow-origin", o.clone()),
            (
                "access-control-allow-credentials",
                HeaderValue::from_static("true"),
            ),
            expose,
            ("vary", HeaderValue::from_static("origin")),
        ],
    }
}

/// Counts a refused key, token or signature check (any 401 or 403) against
/// the client; past `limits.invalid_per_client` the answer becomes 429.
/// Responses that passed their checks are never touched.
pub fn after_check(limits: &Limits, client: IpAddr, status: StatusCode) -> Option<ApiError> {
    if !matches!(status, StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) {
        return None;
    }
    limits.record_invalid(client).err().map(ApiError::from)
}

/// The span every request runs in.
pub fn request_span(method: &http::Method, path: &str) -> tracing::Span {
    tracing::info_span!("http", method = %method, path = %path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origins(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn cors_decision() {
        let o = HeaderValue::from_static("https://app.example");
        let other = HeaderValue::from_static("https://evil.example");
        assert_eq!(cors(&[], Some(&o)), Cors::Deny);
        assert_eq!(
            cors(&origins(&["https://app.example/"]), Some(&o)),
            Cors::Origin(o.clone())
        );
        assert_eq!(
            cors(&origins(&["https://app.example"]), Some(&other)),
            Cors::Deny
        );
        assert_eq!(cors(&origins(&["*"]), Some(&other)), Cors::Any);
        assert_eq!(
            cors(&origins(&["*", "https://app.example"]), Some(&o)),
            Cors::Origin(o.clone())
        );
        assert_eq!(cors(&origins(&["*"]), None), Cors::Deny);
    }

    #[test]
    fn error_bytes_are_the_contracts_shape() {
        let mut e = ApiError::bad_request("invalid_channel", "bad \"name\"");
        e.retry_after = Some(3);
        let body: serde_json::Value = serde_json::from_slice(&error_body(&e)).unwrap();
        assert_eq!(body["error"]["code"], "invalid_channel");
        assert_eq!(body["error"]["message"], "bad \"name\"");
        assert!(error_headers(&e).contains(&("retry-after", "3".into())));
    }
}
