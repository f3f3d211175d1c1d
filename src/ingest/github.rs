//! `kind = "github"`: `X-Hub-Signature-256: sha256=<hex>`, HMAC-SHA256 of
//! the raw body keyed with the webhook secret.
//!
//! Deliveries are JSON or form-encoded (`payload=<json>`, the "content type:
//! application/x-www-form-urlencoded" option); the signature always covers
//! the raw body, and the stored payload is the JSON text either way. Dedupe
//! key: `X-GitHub-Delivery`; type: `X-GitHub-Event`, plus `.` and the body's
//! `action` when there is one (`pull_request.opened`).

use std::borrow::Cow;

use serde_json::Value;

use super::{Delivery, Identity, Rejection, Verifier, ct_eq, hmac_sha256};

pub const HEADER: &str = "x-hub-signature-256";

pub struct GitHub {
    secrets: Vec<Vec<u8>>,
}

impl GitHub {
    pub fn new(secrets: Vec<Vec<u8>>) -> GitHub {
        GitHub { secrets }
    }
}

/// Parses `sha256=<64 hex>`.
pub fn parse_header(value: &str) -> Result<[u8; 32], Rejection> {
    let hex_sig = value.strip_prefix("sha256=").ok_or_else(|| {
        Rejection::InvalidSignature("X-Hub-Signature-256 must start with sha256=".into())
    })?;
    let mut sig = [0u8; 32];
    hex::decode_to_slice(hex_sig, &mut sig).map_err(|_| {
        Rejection::InvalidSignature("X-Hub-Signature-256 is not 64 hex digits after sha256=".into())
    })?;
    Ok(sig)
}

/// The `X-Hub-Signature-256` value GitHub would send for `body`.
pub fn signature_header(secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex::encode(hmac_sha256(secret.as_bytes(), &[body]))
    )
}

fn is_form(d: &Delivery<'_>) -> bool {
    d.header("content-type").is_some_and(|ct| {
        ct.split(';').next().is_some_and(|m| {
            m.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
    })
}

impl Verifier for GitHub {
    fn verify(&self, d: &Delivery<'_>) -> Result<(), Rejection> {
        let value = d.header(HEADER).ok_or_else(|| {
            Rejection::InvalidSignature("the X-Hub-Signature-256 header is missing".into())
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
                "X-Hub-Signature-256 does not match the body with any configured secret".into(),
            ))
        }
    }

    fn payload<'a>(&self, d: &Delivery<'a>) -> Result<Cow<'a, str>, Rejection> {
        if !is_form(d) {
            return std::str::from_utf8(d.body)
                .map(Cow::Borrowed)
                .map_err(|e| Rejection::InvalidJson(format!("the body is not UTF-8 JSON: {e}")));
        }
        url::form_urlencoded::parse(d.body)
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| v)
            .ok_or_else(|| {
                Rejection::InvalidJson("a form-encoded delivery needs a payload= field".into())
            })
    }

    fn identify(&self, d: &Delivery<'_>, payload: &Value) -> Identity {
        let event = d.header("x-github-event");
        let action = payload
            .get("action")
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty());
        Identity {
            source_id: d.header("x-github-delivery").map(str::to_string),
            kind: event.map(|e| match action {
                Some(a) => format!("{e}.{a}"),
                None => e.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn githubs_documented_example() {
        // docs.github.com, "Validating webhook deliveries".
        assert_eq!(
            signature_header("It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
        let g = GitHub::new(vec![b"It's a Secret to Everybody".to_vec()]);
        let mut h = HeaderMap::new();
        h.insert(
            HEADER,
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
                .parse()
                .unwrap(),
        );
        let d = |body: &'static [u8], h: &HeaderMap| {
            g.verify(&Delivery {
                headers: h,
                body,
                now: 0,
            })
        };
        assert_eq!(d(b"Hello, World!", &h), Ok(()));
        assert!(d(b"Hello, World?", &h).is_err());
        h.insert(
            HEADER,
            "sha256=757107EA0EB2509FC211221CCE984B8A37570B6D7586C22C46F4379C8B043E17"
                .parse()
                .unwrap(),
        );
        assert_eq!(d(b"Hello, World!", &h), Ok(()), "hex digits in either case");
        h.insert(HEADER, "sha1=757107ea".parse().unwrap());
        assert!(d(b"Hello, World!", &h).is_err());
        h.remove(HEADER);
        assert!(d(b"Hello, World!", &h).is_err());
    }

    #[test]
    fn form_encoded_payload_and_identity() {
        let g = GitHub::new(vec![b"s".to_vec()]);
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            "application/x-www-form-urlencoded".parse().unwrap(),
        );
        h.insert("x-github-event", "pull_request".parse().unwrap());
        h.insert(
            "x-github-delivery",
            "72d3162e-cc78-11e3-81ab-4c9367dc0958".parse().unwrap(),
        );
        let body = b"payload=%7B%22action%22%3A%22opened%22%2C%22n%22%3A1%7D";
        let d = Delivery {
            headers: &h,
            body,
            now: 0,
        };
        let text = g.payload(&d).unwrap();
        assert_eq!(text, r#"{"action":"opened","n":1}"#);
        let id = g.identify(&d, &serde_json::from_str(&text).unwrap());
        assert_eq!(id.kind.as_deref(), Some("pull_request.opened"));
        assert_eq!(
            id.source_id.as_deref(),
            Some("72d3162e-cc78-11e3-81ab-4c9367dc0958")
        );
        let d = Delivery {
            headers: &h,
            body: b"other=1",
            now: 0,
        };
        assert!(matches!(g.payload(&d), Err(Rejection::InvalidJson(_))));
        h.insert("x-github-event", "push".parse().unwrap());
        let d = Delivery {
            headers: &h,
            body: b"",
            now: 0,
        };
        assert_eq!(
            g.identify(&d, &json!({"ref": "main"})).kind.as_deref(),
            Some("push")
        );
    }

    proptest! {
        #[test]
        fn header_parser_never_panics(value in ".{0,200}") {
            let _ = parse_header(&value);
        }

        #[test]
        fn prefixed_inputs_never_panic(rest in "[0-9a-fA-Fg-z]{0,80}") {
            let _ = parse_header(&format!("sha256={rest}"));
        }
    }
}
