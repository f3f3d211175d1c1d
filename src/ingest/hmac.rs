//! `kind = "hmac"`: any sender that signs the raw body with an HMAC in one
//! header.
//!
//! Configured by `header` (required), `algorithm` (`sha256` default, or
//! `sha1`), `encoding` (`hex` default, or `base64`) and `prefix` (e.g.
//! `sha256=`, matched without regard to case). The dedupe key comes from
//! `id_header` or `id_field` (no default: a body `id` is often the id of a
//! resource, not of the delivery, and deduping on it would drop updates);
//! the type from `type_header` or `type_field`, by default the body `type`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use http::HeaderName;
use serde_json::Value;

use super::{
    Delivery, Identity, IdentityFields, Rejection, Verifier, ct_eq, hmac_sha1, hmac_sha256,
};
use crate::config::{ConfigError, SourceConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Sha256,
    Sha1,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Hex,
    Base64,
}

pub struct Generic {
    header: HeaderName,
    algorithm: Algorithm,
    encoding: Encoding,
    prefix: String,
    secrets: Vec<Vec<u8>>,
    fields: IdentityFields,
}

impl Generic {
    pub fn from_config(
        cfg: &SourceConfig,
        i: usize,
        fields: IdentityFields,
    ) -> Result<Generic, ConfigError> {
        let key = |k: &str| format!("sources[{i}].{k}");
        let header = cfg.header.as_deref().ok_or_else(|| {
            ConfigError::invalid(
                key("header"),
                "an `hmac` source needs the name of the header that carries the signature",
            )
        })?;
        let header = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
            ConfigError::invalid(key("header"), format!("`{header}` is not a header name"))
        })?;
        let algorithm = match cfg.algorithm.as_deref().unwrap_or("sha256") {
            "sha256" => Algorithm::Sha256,
            "sha1" => Algorithm::Sha1,
            other => {
                return Err(ConfigError::invalid(
                    key("algorithm"),
                    format!("`{other}` is not sha256 or sha1"),
                ));
            }
        };
        let encoding = match cfg.encoding.as_deref().unwrap_or("hex") {
            "hex" => Encoding::Hex,
            "base64" => Encoding::Base64,
            other => {
                return Err(ConfigError::invalid(
                    key("encoding"),
                    format!("`{other}` is not hex or base64"),
                ));
            }
        };
        Ok(Generic {
            header,
            algorithm,
            encoding,
            prefix: cfg.prefix.clone().unwrap_or_default(),
            secrets: cfg.secrets.iter().map(|s| s.as_bytes().to_vec()).collect(),
            fields,
        })
    }
}

/// Decodes a signature header value: `prefix` (any case) then hex or
/// base64. `None` for anything malformed.
pub fn parse_signature(value: &str, prefix: &str, encoding: Encoding) -> Option<Vec<u8>> {
    let head = value.get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return None;
    }
    let sig = value[prefix.len()..].trim();
    // The longest MAC here is 32 bytes: 64 hex digits or 44 base64 characters.
    if sig.is_empty() || sig.len() > 64 {
        return None;
    }
    match encoding {
        Encoding::Hex => hex::decode(sig).ok(),
        Encoding::Base64 => STANDARD.decode(sig).ok(),
    }
}

/// The header value a sender configured like this would send.
pub fn signature_header(
    secret: &str,
    body: &[u8],
    algorithm: Algorithm,
    encoding: Encoding,
    prefix: &str,
) -> String {
    let mac: Vec<u8> = match algorithm {
        Algorithm::Sha256 => hmac_sha256(secret.as_bytes(), &[body]).to_vec(),
        Algorithm::Sha1 => hmac_sha1(secret.as_bytes(), &[body]).to_vec(),
    };
    let sig = match encoding {
        Encoding::Hex => hex::encode(mac),
        Encoding::Base64 => STANDARD.encode(mac),
    };
    format!("{prefix}{sig}")
}

impl Verifier for Generic {
    fn verify(&self, d: &Delivery<'_>) -> Result<(), Rejection> {
        let name = self.header.as_str();
        let value = d
            .header(name)
            .ok_or_else(|| Rejection::InvalidSignature(format!("the {name} header is missing")))?;
        let sig = parse_signature(value, &self.prefix, self.encoding).ok_or_else(|| {
            let enc = match self.encoding {
                Encoding::Hex => "hex",
                Encoding::Base64 => "base64",
            };
            Rejection::InvalidSignature(format!(
                "{name} is not `{}` followed by a {enc} signature",
                self.prefix
            ))
        })?;
        let matched = self.secrets.iter().any(|key| match self.algorithm {
            Algorithm::Sha256 => ct_eq(&hmac_sha256(key, &[d.body]), &sig),
            Algorithm::Sha1 => ct_eq(&hmac_sha1(key, &[d.body]), &sig),
        });
        if matched {
            Ok(())
        } else {
            Err(Rejection::InvalidSignature(format!(
                "{name} does not match the body with any configured secret"
            )))
        }
    }

    fn identify(&self, d: &Delivery<'_>, payload: &Value) -> Identity {
        self.fields.read(d, payload, None, Some("type"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::route::Field;
    use http::HeaderMap;
    use proptest::prelude::*;
    use serde_json::json;

    fn generic(algorithm: &str, encoding: &str, prefix: &str) -> Generic {
        let cfg = SourceConfig {
            name: "g".into(),
            kind: "hmac".into(),
            secrets: vec!["old".into(), "new".into()],
            header: Some("X-Signature".into()),
            algorithm: Some(algorithm.into()),
            encoding: Some(encoding.into()),
            prefix: Some(prefix.into()),
            ..Default::default()
        };
        Generic::from_config(
            &cfg,
            0,
            IdentityFields {
                id: Some(Field::parse("headers.x-delivery").unwrap()),
                kind: Some(Field::parse("event.name").unwrap()),
            },
        )
        .unwrap()
    }

    #[test]
    fn every_combination_verifies_with_any_secret() {
        for (alg, a) in [("sha256", Algorithm::Sha256), ("sha1", Algorithm::Sha1)] {
            for (enc, e) in [("hex", Encoding::Hex), ("base64", Encoding::Base64)] {
                let g = generic(alg, enc, "sha=");
                let mut h = HeaderMap::new();
                let sig = signature_header("new", b"{}", a, e, "sha=");
                h.insert("x-signature", sig.parse().unwrap());
                let d = Delivery {
                    headers: &h,
                    body: b"{}",
                    now: 0,
                };
                assert_eq!(g.verify(&d), Ok(()), "{alg}/{enc}");
                let upper = sig.replacen("sha=", "SHA=", 1);
                h.insert("x-signature", upper.parse().unwrap());
                let d = Delivery {
                    headers: &h,
                    body: b"{}",
                    now: 0,
                };
                assert_eq!(g.verify(&d), Ok(()), "prefix in any case");
                let d = Delivery {
                    headers: &h,
                    body: b"[]",
                    now: 0,
                };
                assert!(g.verify(&d).is_err(), "{alg}/{enc} tampered");
                h.insert(
                    "x-signature",
                    sig.trim_start_matches("sha=").parse().unwrap(),
                );
                let d = Delivery {
                    headers: &h,
                    body: b"{}",
                    now: 0,
                };
                assert!(g.verify(&d).is_err(), "prefix required");
            }
        }
        // Independent: printf '{}' | openssl dgst -sha1 -hmac new
        assert_eq!(
            signature_header("new", b"{}", Algorithm::Sha1, Encoding::Hex, ""),
            "ff507566ffa8dfeb2cbd9e8c0763a7beb701502a"
        );
    }

    #[test]
    fn identity_from_configured_fields() {
        let g = generic("sha256", "hex", "");
        let mut h = HeaderMap::new();
        h.insert("x-delivery", "d-1".parse().unwrap());
        let d = Delivery {
            headers: &h,
            body: b"",
            now: 0,
        };
        let id = g.identify(&d, &json!({"event": {"name": "order.paid"}, "id": 5}));
        assert_eq!(id.source_id.as_deref(), Some("d-1"));
        assert_eq!(id.kind.as_deref(), Some("order.paid"));
    }

    proptest! {
        #[test]
        fn signature_parser_never_panics(value in ".{0,120}", prefix in ".{0,8}") {
            let _ = parse_signature(&value, &prefix, Encoding::Hex);
            let _ = parse_signature(&value, &prefix, Encoding::Base64);
        }
    }
}
