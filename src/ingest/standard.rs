//! `kind = "standard"`: Standard Webhooks (standardwebhooks.com).
//!
//! Headers `webhook-id`, `webhook-timestamp` and `webhook-signature`
//! (`v1,<base64>`, several separated by spaces while secrets rotate); the
//! signature is HMAC-SHA256 of `"{id}.{timestamp}.{raw body}"` keyed with the
//! base64-decoded part of the `whsec_…` secret. Svix's `svix-*` headers are
//! read when the `webhook-*` ones are absent (the same scheme). Dedupe key:
//! `webhook-id` (it is signed); type: body `type`.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use serde_json::Value;

use super::{
    Delivery, Identity, Rejection, Verifier, body_text, check_tolerance, ct_eq, hmac_sha256,
};

pub struct Standard {
    keys: Vec<Vec<u8>>,
    tolerance: u64,
}

impl Standard {
    /// `keys` are decoded secrets (`decode_secret`).
    pub fn new(keys: Vec<Vec<u8>>, tolerance_secs: u64) -> Standard {
        Standard {
            keys,
            tolerance: tolerance_secs,
        }
    }
}

/// The key inside a `whsec_<base64>` secret (the prefix is optional).
pub fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = STANDARD
        .decode(b64)
        .or_else(|_| STANDARD_NO_PAD.decode(b64))
        .map_err(|_| "a Standard Webhooks secret is `whsec_` followed by base64".to_string())?;
    if key.is_empty() {
        return Err("the secret's key is empty".into());
    }
    Ok(key)
}

/// The `v1` signatures of a `webhook-signature` header; other versions and
/// malformed entries are skipped (they can never match).
pub fn parse_signatures(value: &str) -> Vec<[u8; 32]> {
    value
        .split(' ')
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .filter(|b64| b64.len() <= 64)
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .filter_map(|bytes| <[u8; 32]>::try_from(bytes).ok())
        .collect()
}

/// The `webhook-signature` value for one message: `v1,<base64>`.
pub fn signature_header(
    secret: &str,
    msg_id: &str,
    unix_ts: i64,
    body: &[u8],
) -> Result<String, String> {
    let key = decode_secret(secret)?;
    let ts = unix_ts.to_string();
    let mac = hmac_sha256(&key, &[msg_id.as_bytes(), b".", ts.as_bytes(), b".", body]);
    Ok(format!("v1,{}", STANDARD.encode(mac)))
}

/// `webhook-<name>`, or `svix-<name>` when the sender uses Svix's names.
fn header<'a>(d: &'a Delivery<'_>, name: &str) -> Option<&'a str> {
    d.header(&format!("webhook-{name}"))
        .or_else(|| d.header(&format!("svix-{name}")))
}

impl Verifier for Standard {
    fn verify(&self, d: &Delivery<'_>) -> Result<(), Rejection> {
        let missing =
            |h: &str| Rejection::InvalidSignature(format!("the webhook-{h} header is missing"));
        let id = header(d, "id").ok_or_else(|| missing("id"))?;
        let ts_text = header(d, "timestamp").ok_or_else(|| missing("timestamp"))?;
        let value = header(d, "signature").ok_or_else(|| missing("signature"))?;
        let ts = ts_text.parse::<i64>().map_err(|_| {
            Rejection::InvalidSignature("webhook-timestamp is not a Unix time in seconds".into())
        })?;
        let candidates = parse_signatures(value);
        if candidates.is_empty() {
            return Err(Rejection::InvalidSignature(
                "webhook-signature has no v1,<base64> signature".into(),
            ));
        }
        let matched = self.keys.iter().any(|key| {
            let mac = hmac_sha256(
                key,
                &[id.as_bytes(), b".", ts_text.as_bytes(), b".", d.body],
            );
            candidates.iter().any(|c| ct_eq(c, &mac))
        });
        if !matched {
            return Err(Rejection::InvalidSignature(
                "no v1 signature matches the message with any configured secret".into(),
            ));
        }
        check_tolerance(ts, d.now, self.tolerance)
    }

    fn identify(&self, d: &Delivery<'_>, payload: &Value) -> Identity {
        Identity {
            source_id: header(d, "id").map(str::to_string),
            kind: body_text(payload, "type"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use proptest::prelude::*;

    // The specification's test vector (standard-webhooks, libraries' tests).
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const MSG_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1_614_265_330;
    const BODY: &[u8] = br#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn headers(prefix: &str, id: &str, ts: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(format!("{prefix}-id").as_bytes()).unwrap(),
            id.parse().unwrap(),
        );
        h.insert(
            http::HeaderName::from_bytes(format!("{prefix}-timestamp").as_bytes()).unwrap(),
            ts.parse().unwrap(),
        );
        h.insert(
            http::HeaderName::from_bytes(format!("{prefix}-signature").as_bytes()).unwrap(),
            sig.parse().unwrap(),
        );
        h
    }

    #[test]
    fn specification_vector() {
        assert_eq!(
            signature_header(SECRET, MSG_ID, TS, BODY).unwrap(),
            EXPECTED
        );
        let key = decode_secret(SECRET).unwrap();
        assert_eq!(
            decode_secret("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap(),
            key
        );
        let v = Standard::new(vec![key], 300);
        for prefix in ["webhook", "svix"] {
            let h = headers(prefix, MSG_ID, &TS.to_string(), EXPECTED);
            let d = Delivery {
                headers: &h,
                body: BODY,
                now: TS,
            };
            assert_eq!(v.verify(&d), Ok(()), "{prefix}-* headers");
            assert_eq!(
                v.identify(&d, &Value::Null).source_id.as_deref(),
                Some(MSG_ID)
            );
        }
    }

    #[test]
    fn rotation_and_refusals() {
        let v = Standard::new(
            vec![
                decode_secret("whsec_c2VjcmV0LW9mLWEtcm90YXRlZC1lbmRwb2ludA==").unwrap(),
                decode_secret(SECRET).unwrap(),
            ],
            300,
        );
        let ok = |h: &HeaderMap, body: &[u8], now: i64| {
            v.verify(&Delivery {
                headers: h,
                body,
                now,
            })
        };
        let ts = TS.to_string();
        let several = format!("v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,abc {EXPECTED}");
        assert_eq!(
            ok(&headers("webhook", MSG_ID, &ts, &several), BODY, TS),
            Ok(())
        );
        let invalid = |r| matches!(r, Err(Rejection::InvalidSignature(_)));
        assert!(invalid(ok(
            &headers("webhook", MSG_ID, &ts, EXPECTED),
            b"{\"test\": 1}",
            TS
        )));
        assert!(invalid(ok(
            &headers("webhook", "msg_other", &ts, EXPECTED),
            BODY,
            TS
        )));
        assert!(invalid(ok(
            &headers("webhook", MSG_ID, "1614265331", EXPECTED),
            BODY,
            TS
        )));
        assert!(invalid(ok(
            &headers("webhook", MSG_ID, "hello", EXPECTED),
            BODY,
            TS
        )));
        assert!(invalid(ok(
            &headers("webhook", MSG_ID, &ts, "v1,"),
            BODY,
            TS
        )));
        assert!(invalid(ok(
            &headers("webhook", MSG_ID, &ts, &EXPECTED[..8]),
            BODY,
            TS
        )));
        let mut h = headers("webhook", MSG_ID, &ts, EXPECTED);
        h.remove("webhook-id");
        assert!(invalid(ok(&h, BODY, TS)));
        let h = headers("webhook", MSG_ID, &ts, EXPECTED);
        assert!(matches!(
            ok(&h, BODY, TS + 301),
            Err(Rejection::TimestampOutOfTolerance(_))
        ));
        assert!(matches!(
            ok(&h, BODY, TS - 301),
            Err(Rejection::TimestampOutOfTolerance(_))
        ));
    }

    #[test]
    fn secrets() {
        assert!(decode_secret("whsec_not base64!").is_err());
        assert!(decode_secret("whsec_").is_err());
        assert_eq!(decode_secret("whsec_c2VjcmV0").unwrap(), b"secret");
    }

    proptest! {
        #[test]
        fn signature_parser_never_panics(value in ".{0,300}") {
            let _ = parse_signatures(&value);
        }

        #[test]
        fn versioned_inputs_never_panic(entries in proptest::collection::vec("v[0-9a-z]{0,3},[A-Za-z0-9+/=]{0,60}", 0..6)) {
            let _ = parse_signatures(&entries.join(" "));
        }

        #[test]
        fn secret_decoder_never_panics(value in ".{0,100}") {
            let _ = decode_secret(&value);
        }
    }
}
