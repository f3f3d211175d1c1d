//! `/demo` (the notification demo page), `POST /demo/pay` (its Pay button)
//! and `/client.js` (the browser client library), all embedded in the binary.
//!
//! Invariants: Pay exists only in development mode (loopback, no keys); it
//! signs a Stripe `payment_intent.succeeded` for the demo user with the
//! `demo` source's own secret and hands it to this server's own
//! `POST /webhooks/demo` route in-process — the same routing, signature
//! check, dedupe and append as a real webhook, without opening a socket to a
//! caller-chosen address.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::{Html, IntoResponse, Response};
use http::{HeaderValue, Request, StatusCode, header};
use rand::Rng;
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::AppState;
use crate::error::ApiError;

const PAGE: &str = include_str!("demo.html");
const CLIENT_JS: &str = include_str!("../../clients/js/pushgate.js");
const CLIENT_DTS: &str = include_str!("../../clients/js/pushgate.d.ts");

/// The user the demo's payments belong to (contract 6): channel `user:demo`.
pub const DEMO_USER: &str = "demo";

pub async fn page() -> Response {
    let mut resp = Html(PAGE).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

pub async fn client_js() -> Response {
    script(CLIENT_JS, "text/javascript; charset=utf-8")
}

pub async fn client_dts() -> Response {
    script(CLIENT_DTS, "application/typescript; charset=utf-8")
}

fn script(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}

/// A realistic `payment_intent.succeeded` for the demo user.
pub fn payment_event(amount: u64, now: u64) -> Value {
    let mut rng = rand::rng();
    let suffix: String = (0..14)
        .map(|_| char::from(rng.sample(rand::distr::Alphanumeric)))
        .collect();
    json!({
        "id": format!("evt_demo_{suffix}"),
        "object": "event",
        "api_version": "2024-06-20",
        "created": now,
        "livemode": false,
        "type": "payment_intent.succeeded",
        "data": {"object": {
            "id": format!("pi_demo_{suffix}"),
            "object": "payment_intent",
            "amount": amount,
            "amount_received": amount,
            "currency": "usd",
            "status": "succeeded",
            "description": "pushgate demo payment",
            "metadata": {"user_id": DEMO_USER},
        }},
    })
}

/// The Pay button: development mode only.
pub async fn pay(
    State(app): State<Arc<AppState>>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Result<Response, ApiError> {
    if !app.auth.is_development() {
        return Err(ApiError::not_found(
            "not_found",
            "the demo's Pay button only exists in development mode",
        ));
    }
    let secret = crate::ingest::demo_secret(&app.config).ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "demo_unavailable",
            "there is no `demo` Stripe source to sign for (`pushgate serve` adds one in development mode)",
        )
    })?;
    let now = crate::clock::unix_now();
    let amount = 2000 + rand::rng().random_range(0..8) * 500;
    let body = serde_json::to_vec(&payment_event(amount, now)).expect("JSON");
    let mut req = Request::post(format!("/webhooks/{}", crate::ingest::DEMO_SOURCE))
        .header(header::CONTENT_TYPE, "application/json")
        .header(
            "stripe-signature",
            crate::ingest::stripe::signature_header(secret, now as i64, &body),
        )
        .header(
            header::USER_AGENT,
            "Stripe/1.0 (+https://stripe.com/docs/webhooks) pushgate-demo",
        )
        .body(Body::from(body))
        .expect("request");
    if let Some(Extension(c)) = connect {
        req.extensions_mut().insert(c);
    }
    let resp = super::router(app.clone())
        .oneshot(req)
        .await
        .unwrap_or_else(|never| match never {});
    let status = resp.status();
    let reply = axum::body::to_bytes(resp.into_body(), 64 << 10)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or(Value::Null);
    let out = json!({"webhook_status": status.as_u16(), "webhook_reply": reply, "amount": amount});
    Ok((
        if status.is_success() {
            StatusCode::OK
        } else {
            StatusCode::BAD_GATEWAY
        },
        axum::Json(out),
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payment_routes_to_the_demo_user() {
        let e = payment_event(2500, 1);
        assert_eq!(e["type"], "payment_intent.succeeded");
        assert_eq!(e["data"]["object"]["metadata"]["user_id"], "demo");
        assert_eq!(e["data"]["object"]["amount"], 2500);
        assert!(e["id"].as_str().unwrap().starts_with("evt_"));
    }
}
