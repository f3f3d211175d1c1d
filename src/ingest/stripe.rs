//! `kind = "stripe"`: `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>…]`.
//!
//! The signature is HMAC-SHA256 (hex) of `"{t}.{raw body}"`, keyed with the
//! bytes of the `whsec_…` string itself. Any `v1` may match any configured
//! secret (Stripe sends several while an endpoint's secret is rolled); `t`
//! must be within the tolerance. Dedupe key: body `id`; type: body `type`.

use serde_json::Value;

use super::{
    Delivery, Identity, Rejection, Verifier, body_text, check_tolerance, ct_eq, hmac_sha256,
};

pub const HEADER: &str = "stripe-signature";

pub struct Stripe {
    secrets: Vec<Vec<u8>>,
    tolerance: u64,
}

impl Stripe {
    pub fn new(secrets: Vec<Vec<u8>>, tolerance_secs: u64) -> Stripe {
        Stripe {
            secrets,
            tolerance: tolerance_secs,
        }
    }
}

/// A parsed `Stripe-Signature` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureHeader<'a> {
    /// `t` as written: it is what was signed.
    pub timestamp_text: &'a str,
    pub timestamp: i64,
    /// Every well-formed `v1`; malformed ones can never match and are skipped.
    pub v1: Vec<[u8; 32]>,
}

/// Parses `t=…,v1=…,…`. Unknown keys (`v0`, future schemes) are ignored.
pub fn parse_header(value: &str) -> Result<SignatureHeader<'_>, Rejection> {
    let mut timestamp: Option<(&str, i64)> = None;
    let mut v1 = Vec::new();
    for item in value.split(',') {
        let Some((k, v)) = item.trim().split_once('=') else {
            continue;
        };
        match k {
            "t" => {
                if timestamp.is_some() {
                    return Err(Rejection::InvalidSignature(
                        "Stripe-Signature has more than one t=".into(),
                    ));
                }
                let ts = v.parse::<i64>().map_err(|_| {
                    Rejection::InvalidSignature("Stripe-Signature: t= is not a Unix time".into())
                })?;
                timestamp = Some((v, ts));
            }
            "v1" => {
                let mut sig = [0u8; 32];
                if hex::decode_to_slice(v, &mut sig).is_ok() {
                    v1.push(sig);
                }
            }
            _ => {}
        }
    }
    let Some((timestamp_text, timestamp)) = timestamp else {
        return Err(Rejection::InvalidSignature(
            "Stripe-Signature has no t= timestamp".into(),
        ));
    };
    if v1.is_empty() {
        return Err(Rejection::InvalidSignature(
            "Stripe-Signature has no v1= signature".into(),
        ));
    }
    Ok(SignatureHeader {
        timestamp_text,
        timestamp,
        v1,
    })
}

/// The `Stripe-Signature` value Stripe would send for `body` at `unix_ts`:
/// `t=<unix_ts>,v1=<hex>`. Used by `pushgate send`, the /demo page and tests.
pub fn signature_header(secret: &str, unix_ts: i64, body: &[u8]) -> String {
    let ts = unix_ts.to_string();
    let mac = hmac_sha256(secret.as_bytes(), &[ts.as_bytes(), b".", body]);
    format!("t={ts},v1={}", hex::encode(mac))
}

impl Verifier for Stripe {
    fn verify(&self, d: &Delivery<'_>) -> Result<(), Rejection> {
        let value = d.header(HEADER).ok_or_else(|| {
            Rejection::InvalidSignature("the Stripe-Signature header is missing".into())
        })?;
        let sig = parse_header(value)?;
        let matched = self.secrets.iter().any(|key| {
            let mac = hmac_sha256(key, &[sig.timestamp_text.as_bytes(), b".", d.body]);
            sig.v1.iter().any(|candidate| ct_eq(candidate, &mac))
        });
        if !matched {
            return Err(Rejection::InvalidSignature(
                "no v1 signature matches the body with any configured secret".into(),
            ));
        }
        check_tolerance(sig.timestamp, d.now, self.tolerance)
    }

    fn identify(&self, _d: &Delivery<'_>, payload: &Value) -> Identity {
        Identity {
            source_id: body_text(payload, "id"),
            kind: body_text(payload, "type"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use proptest::prelude::*;

    const SECRET: &str = "whsec_test_secret";
    const BODY: &[u8] = br#"{"id":"evt_1","type":"payment_intent.succeeded"}"#;

    fn verify(
        stripe: &Stripe,
        header: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), Rejection> {
        let mut h = HeaderMap::new();
        if let Some(v) = header {
            h.insert(HEADER, v.parse().unwrap());
        }
        stripe.verify(&Delivery {
            headers: &h,
            body,
            now,
        })
    }

    #[test]
    fn stripes_scheme() {
        // Computed independently: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac whsec_abc
        assert_eq!(
            signature_header("whsec_abc", 1_700_000_000, br#"{"a":1}"#),
            "t=1700000000,v1=3b843bacfb18cc5554542fdcc84d815b399c52758e508a6fcecf0a2af4efea2b"
        );
    }

    #[test]
    fn accepts_any_v1_and_any_secret() {
        let s = Stripe::new(vec![b"whsec_old".to_vec(), SECRET.as_bytes().to_vec()], 300);
        let good = signature_header(SECRET, 1000, BODY);
        assert_eq!(verify(&s, Some(&good), BODY, 1000), Ok(()));
        let v1 = good.split_once(",v1=").unwrap().1;
        let several = format!("t=1000,v1={},v0=abc,v1={v1}", "00".repeat(32));
        assert_eq!(verify(&s, Some(&several), BODY, 1000), Ok(()));
        let spaced = format!("t=1000, v1={v1}");
        assert_eq!(verify(&s, Some(&spaced), BODY, 1000), Ok(()));
    }

    #[test]
    fn refusals() {
        let s = Stripe::new(vec![SECRET.as_bytes().to_vec()], 300);
        let good = signature_header(SECRET, 1000, BODY);
        let invalid = |r: Result<(), Rejection>| matches!(r, Err(Rejection::InvalidSignature(_)));
        assert!(invalid(verify(&s, None, BODY, 1000)));
        assert!(invalid(verify(
            &s,
            Some(&good),
            b"{\"id\":\"evt_2\"}",
            1000
        )));
        let wrong = signature_header("whsec_other", 1000, BODY);
        assert!(invalid(verify(&s, Some(&wrong), BODY, 1000)));
        assert!(invalid(verify(&s, Some("t=1000"), BODY, 1000)));
        assert!(invalid(verify(&s, Some("v1=00"), BODY, 1000)));
        let v1 = good.split_once(",v1=").unwrap().1;
        assert!(invalid(verify(
            &s,
            Some(&format!("t=1001,v1={v1}")),
            BODY,
            1000
        )));
        assert!(invalid(verify(
            &s,
            Some(&format!("t=1000,t=1000,v1={v1}")),
            BODY,
            1000
        )));
        assert!(matches!(
            verify(&s, Some(&good), BODY, 1301),
            Err(Rejection::TimestampOutOfTolerance(_))
        ));
        assert!(matches!(
            verify(&s, Some(&good), BODY, 699),
            Err(Rejection::TimestampOutOfTolerance(_))
        ));
    }

    proptest! {
        #[test]
        fn header_parser_never_panics(value in ".{0,300}") {
            let _ = parse_header(&value);
        }

        #[test]
        fn header_like_inputs_never_panic(
            t in "[-+0-9a-z]{0,25}",
            sigs in proptest::collection::vec("[0-9a-fA-F=,]{0,70}", 0..5),
        ) {
            let value = format!("t={t},v1={}", sigs.join(",v1="));
            let _ = parse_header(&value);
            let s = Stripe::new(vec![SECRET.as_bytes().to_vec()], 300);
            let mut h = HeaderMap::new();
            if let Ok(v) = value.parse() {
                h.insert(HEADER, v);
                let _ = s.verify(&Delivery { headers: &h, body: BODY, now: 0 });
            }
        }
    }
}
