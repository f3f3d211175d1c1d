//! `GET /openapi.json`: the OpenAPI 3.1 description of every HTTP route.
//!
//! The document is written by hand in `docs/openapi.json` and compiled in.
//! Invariant: it names exactly the routes `api::router` serves, each with
//! the statuses its handler answers; `tests/it/openapi.rs` checks both
//! against the router's source and a running server, so it cannot drift,
//! and `scripts/fuzz-api.sh` fuzzes a real server against it.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, header};

/// The document, as served (and as checked by the tests).
pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

pub async fn document() -> Response {
    let mut resp = DOCUMENT.into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_is_openapi_3_1_json() {
        let v: serde_json::Value = serde_json::from_str(super::DOCUMENT).unwrap();
        assert_eq!(v["openapi"], "3.1.0");
        assert!(v["paths"].as_object().is_some_and(|p| !p.is_empty()));
    }
}
