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
use hmac::{Hmac, Mac};
use http::{HeaderValue, Request, StatusCode, header};
use rand::Rng;
use serde_json::{Value, json};
use sha2::Sha256;
use tower::ServiceExt;

use super::error::ApiError;
use crate::AppState;

const PAGE: &str = include_str!("demo.html");
const CLIENT_JS: &str = include_str!("../../clients/js/pushgate.js");
const CLIENT_DTS: &str = include_str!("../../clients/js/pushgate.d.ts");

/// The demo source's name and the user its payments belong to (contract 6).
pub const DEMO_SOURCE: &str = "demo";
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

/// `Stripe-Signature` for `body` at unix time `ts`: `t=…,v1=<hex HMAC-SHA256
/// of "{t}.{body}" keyed with the whsec_ string's bytes>`.
pub fn stripe_signature(secret: &str, ts: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(ts.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={ts},v1={}", hex::encode(mac.finalize().into_bytes()))
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
    let secret = app
        .config
        .sources
        .iter()
        .find(|s| s.name == DEMO_SOURCE && s.kind == "stripe")
        .and_then(|s| s.secrets.first())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "demo_unavailable",
                "there is no `demo` Stripe source to sign for (development mode adds one)",
            )
        })?;
    let now = crate::auth::unix_now();
    let amount = 2000 + rand::rng().random_range(0..8) * 500;
    let body = serde_json::to_vec(&payment_event(amount, now)).expect("JSON");
    let mut req = Request::post(format!("/webhooks/{DEMO_SOURCE}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header("stripe-signature", stripe_signature(secret, now, &body))
        .header(header::USER_AGENT, "Stripe/1.0 (+https://stripe.com/docs/webhooks) pushgate-demo")
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
    fn stripe_signature_matches_stripes_documented_scheme() {
        // HMAC-SHA256("whsec_test", "1700000000.{}"), computed independently
        // with `printf '1700000000.{}' | openssl dgst -sha256 -hmac whsec_test`.
        assert_eq!(
            stripe_signature("whsec_test", 1_700_000_000, b"{}"),
            "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
    }

    #[test]
    fn the_payment_routes_to_the_demo_user() {
        let e = payment_event(2500, 1);
        assert_eq!(e["type"], "payment_intent.succeeded");
        assert_eq!(e["data"]["object"]["metadata"]["user_id"], "demo");
        assert_eq!(e["data"]["object"]["amount"], 2500);
        assert!(e["id"].as_str().unwrap().starts_with("evt_"));
    }
}
