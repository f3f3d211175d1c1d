//! `kind = "shopify"`: `X-Shopify-Hmac-Sha256: <base64>`, HMAC-SHA256 of the
//! raw body keyed with the app's client secret.
//!
//! Shopify signs no timestamp, so there is no tolerance; replays are caught
//! by the dedupe key `X-Shopify-Webhook-Id` (or `X-Shopify-Event-Id`). Type:
//! `X-Shopify-Topic` (`orders/create`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use super::{Delivery, Identity, Rejection, Verifier, ct_eq, hmac_sha256};

pub const HEADER: &str = "x-shopify-hmac-sha256";

pub struct Shopify {
    secrets: Vec<Vec<u8>>,
}

impl Shopify {
    pub fn new(secrets: Vec<Vec<u8>>) -> Shopify {
        Shopify { secrets }
    }
}

/// Parses the base64 of a 32-byte HMAC.
pub fn parse_header(value: &str) -> Result<[u8; 32], Rejection> {
    let bad = || {
        Rejection::InvalidSignature(
            "X-Shopify-Hmac-Sha256 is not the base64 of a SHA-256 HMAC".into(),
        )
    };
    // 32 bytes are 44 base64 characters; refuse anything longer before decoding.
    if value.len() > 64 {
        return Err(bad());
    }
    let bytes = STANDARD.decode(value).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// The `X-Shopify-Hmac-Sha256` value Shopify would send for `body`.
pub fn signature_header(secret: &str, body: &[u8]) -> String {
    STANDARD.encode(hmac_sha256(secret.as_bytes(), &[body]))
}

impl Verifier for Shopify {
    fn verify(&self, d: &Delivery<'_>) -> Result<(), Rejection> {
        let value = d.header(HEADER).ok_or_else(|| {
            Rejection::InvalidSignature("the X-Shopify-Hmac-Sha256 header is missing".into())
        })?;
        let sig = parse_header(value)?;
        if self
            .secrets
            .iter()
            .any(|key| ct_eq(&hmac_sha256(key, &[d.body]), &sig))
        {
            Ok(())
        } else {
            Err(Rejection::InvalidSignature(
                "X-Shopify-Hmac-Sha256 does not match the body with any configured secret".into(),
            ))
        }
    }

    fn identify(&self, d: &Delivery<'_>, _payload: &Value) -> Identity {
        Identity {
            source_id: d
                .header("x-shopify-webhook-id")
                .or_else(|| d.header("x-shopify-event-id"))
                .map(str::to_string),
            kind: d.header("x-shopify-topic").map(str::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use proptest::prelude::*;

    #[test]
    fn shopify_scheme() {
        // Computed independently:
        // printf 'Hello, World!' | openssl dgst -sha256 -hmac "It's a Secret to Everybody" -binary | base64
        assert_eq!(
            signature_header("It's a Secret to Everybody", b"Hello, World!"),
            "dXEH6g6yUJ/CESIczphLijdXC211hsIsRvQ3nIsEPhc="
        );
        let s = Shopify::new(vec![b"old".to_vec(), b"new".to_vec()]);
        let mut h = HeaderMap::new();
        h.insert(HEADER, signature_header("new", b"{}").parse().unwrap());
        h.insert("x-shopify-event-id", "e1".parse().unwrap());
        h.insert("x-shopify-topic", "orders/create".parse().unwrap());
        let d = Delivery {
            headers: &h,
            body: b"{}",
            now: 0,
        };
        assert_eq!(s.verify(&d), Ok(()));
        let id = s.identify(&d, &Value::Null);
        assert_eq!(id.source_id.as_deref(), Some("e1"));
        assert_eq!(id.kind.as_deref(), Some("orders/create"));
        h.insert("x-shopify-webhook-id", "w1".parse().unwrap());
        let d = Delivery {
            headers: &h,
            body: b"{ }",
            now: 0,
        };
        assert_eq!(
            s.identify(&d, &Value::Null).source_id.as_deref(),
            Some("w1")
        );
        assert!(s.verify(&d).is_err());
    }

    proptest! {
        #[test]
        fn header_parser_never_panics(value in ".{0,120}") {
            let _ = parse_header(&value);
        }

        #[test]
        fn base64ish_inputs_never_panic(value in "[A-Za-z0-9+/=]{0,70}") {
            let _ = parse_header(&value);
        }
    }
}
