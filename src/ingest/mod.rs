//! Inbound webhooks, the domain half of `POST /webhooks/{source}` (contract
//! section 2.1; the HTTP handler is `api::webhooks`).
//!
//! Owns the source registry (built from `config.sources` at start-up), the
//! `Verifier` trait (one implementation per provider kind, one file each),
//! and `Source::accept`, which takes a delivery's headers and raw bytes
//! through verify → parse → identify → route and returns the message and
//! its inspector record, or a typed `Rejection`. It knows nothing of HTTP
//! handlers, `AppState` or `ApiError`. Invariants:
//! - the signature is checked over the raw body bytes before any parsing,
//!   with constant-time comparisons, against every configured secret;
//! - the payload is stored as the JSON text that arrived (for GitHub's
//!   form-encoded deliveries, the decoded `payload` field), never
//!   re-serialized;
//! - the dedupe key is bounded (`bound_id`) and the type cleaned
//!   (`clean_type`, `message::MAX_TYPE_LEN`), so a payload cannot make a
//!   huge key or a type with control characters;
//! - recorded headers never hold credentials (`header_pairs` redacts them).
//!
//! What the handler adds (durability before the reply, the dedupe decided
//! by the database's unique key, refusals recorded, the unsigned-source
//! throttle) is documented in `api::webhooks`.

pub mod github;
pub mod hmac;
pub mod none;
pub mod route;
pub mod shopify;
pub mod standard;
pub mod stripe;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::Digest;
use subtle::ConstantTimeEq;

use crate::config::{Config, ConfigError, SourceConfig};
use crate::message::{MAX_ID_LEN, MAX_TYPE_LEN};
use crate::store::{NewInbound, NewMessage};
use route::{Field, Routes};

/// One delivery, as a verifier sees it.
pub struct Delivery<'a> {
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
    /// Unix seconds when it arrived.
    pub now: i64,
}

impl Delivery<'_> {
    /// A header's value, trimmed; `None` if absent, empty or not visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }
}

/// Why a delivery is refused. The message says what to fix; it never
/// contains a secret or the signature we expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// 401: no signature, a malformed one, or one that no secret produces.
    #[error("{0}")]
    InvalidSignature(String),
    /// 400: the signed timestamp is further than the tolerance from now.
    #[error("{0}")]
    TimestampOutOfTolerance(String),
    /// 400: signed, but not JSON.
    #[error("{0}")]
    InvalidJson(String),
}

/// What a verified delivery says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The provider's event or delivery id: the dedupe key.
    pub source_id: Option<String>,
    /// The event type; `webhook` when the delivery names none.
    pub kind: Option<String>,
}

/// One provider's signature scheme. Adding a provider is one file with one
/// implementation of this, plus one line in `build_verifier`.
pub trait Verifier: Send + Sync + 'static {
    /// Checks the signature over the raw body (and the signed timestamp,
    /// where the scheme has one). Runs before anything is parsed.
    fn verify(&self, delivery: &Delivery<'_>) -> Result<(), Rejection>;

    /// The JSON text to store: by default the body itself.
    fn payload<'a>(&self, delivery: &Delivery<'a>) -> Result<Cow<'a, str>, Rejection> {
        std::str::from_utf8(delivery.body)
            .map(Cow::Borrowed)
            .map_err(|e| Rejection::InvalidJson(format!("the body is not UTF-8 JSON: {e}")))
    }

    /// The dedupe key and the event type, from headers or the parsed payload.
    fn identify(&self, delivery: &Delivery<'_>, payload: &Value) -> Identity;
}

// ─── signature helpers shared by the kinds ─────────────────────────────────

pub(crate) fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    use ::hmac::Mac;
    let mut mac = ::hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

pub(crate) fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    use ::hmac::Mac;
    let mut mac = ::hmac::Hmac::<sha1::Sha1>::new_from_slice(key).expect("HMAC takes any key");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time equality (the length is not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Refuses a signed timestamp further than `tolerance` seconds from `now`,
/// in the past or in the future.
pub(crate) fn check_tolerance(ts: i64, now: i64, tolerance: u64) -> Result<(), Rejection> {
    let skew = now.abs_diff(ts);
    if skew > tolerance {
        let dir = if ts < now { "old" } else { "in the future" };
        return Err(Rejection::TimestampOutOfTolerance(format!(
            "the signed timestamp is {skew}s {dir}; the tolerance is {tolerance}s (check the sender's clock, or replay a fresh delivery)"
        )));
    }
    Ok(())
}

/// A top-level body field's text (a non-empty string or a number).
pub(crate) fn body_text(payload: &Value, key: &str) -> Option<String> {
    payload.get(key).and_then(route::scalar_text)
}

// ─── the source registry ───────────────────────────────────────────────────

/// One configured source, ready to receive.
pub struct Source {
    pub name: String,
    pub kind: String,
    verifier: Box<dyn Verifier>,
    routes: Routes,
}

/// Every configured source by name; built once at start-up.
#[derive(Default)]
pub struct Sources {
    by_name: HashMap<String, Arc<Source>>,
}

const KINDS: &[&str] = &["stripe", "github", "shopify", "standard", "hmac", "none"];
const DEFAULT_TOLERANCE_SECS: u64 = 300;

impl Sources {
    /// Checks every source (name, kind, secrets, templates, the fields the
    /// kind takes) and builds its verifier and routes. Errors name the key:
    /// `sources[2].channel: …`.
    pub fn from_config(sources: &[SourceConfig]) -> Result<Sources, ConfigError> {
        let mut by_name = HashMap::new();
        for (i, cfg) in sources.iter().enumerate() {
            let key = |k: &str| format!("sources[{i}].{k}");
            if !valid_source_name(&cfg.name) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!(
                        "`{}` is not a source name: 1-64 characters of [A-Za-z0-9_.-]",
                        cfg.name
                    ),
                ));
            }
            if by_name.contains_key(&cfg.name) {
                return Err(ConfigError::invalid(
                    key("name"),
                    format!("`{}` is used by two sources", cfg.name),
                ));
            }
            let verifier = build_verifier(cfg, i)?;
            let routes = Routes::from_config(cfg, i)?;
            by_name.insert(
                cfg.name.clone(),
                Arc::new(Source {
                    name: cfg.name.clone(),
                    kind: cfg.kind.clone(),
                    verifier,
                    routes,
                }),
            );
        }
        Ok(Sources { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Source>> {
        self.by_name.get(name)
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Source names appear in URLs, in events' `source` and as default
/// fallback channels: keep them plain.
fn valid_source_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn build_verifier(cfg: &SourceConfig, i: usize) -> Result<Box<dyn Verifier>, ConfigError> {
    let key = |k: &str| format!("sources[{i}].{k}");
    if !KINDS.contains(&cfg.kind.as_str()) {
        return Err(ConfigError::invalid(
            key("kind"),
            format!("`{}` is not one of {}", cfg.kind, KINDS.join(", ")),
        ));
    }
    let kind = cfg.kind.as_str();
    // Keys that only some kinds take: set on another kind they would be
    // silently ignored, which hides a misunderstanding.
    let only_for: [(&str, bool, &[&str]); 11] = [
        (
            "tolerance",
            cfg.tolerance.is_some(),
            &["stripe", "standard"],
        ),
        ("header", cfg.header.is_some(), &["hmac"]),
        ("algorithm", cfg.algorithm.is_some(), &["hmac"]),
        ("encoding", cfg.encoding.is_some(), &["hmac"]),
        ("prefix", cfg.prefix.is_some(), &["hmac"]),
        ("id_header", cfg.id_header.is_some(), &["hmac", "none"]),
        ("id_field", cfg.id_field.is_some(), &["hmac", "none"]),
        ("type_header", cfg.type_header.is_some(), &["hmac", "none"]),
        ("type_field", cfg.type_field.is_some(), &["hmac", "none"]),
        ("allow_unsigned", cfg.allow_unsigned, &["none"]),
        (
            "secrets",
            !cfg.secrets.is_empty(),
            &["stripe", "github", "shopify", "standard", "hmac"],
        ),
    ];
    for (name, set, kinds) in only_for {
        if set && !kinds.contains(&kind) {
            return Err(ConfigError::invalid(
                key(name),
                format!(
                    "a `{kind}` source does not take `{name}` (only {})",
                    kinds.join(", ")
                ),
            ));
        }
    }
    if kind != "none" {
        if cfg.secrets.is_empty() {
            return Err(ConfigError::invalid(
                key("secrets"),
                format!("a `{kind}` source needs at least one secret"),
            ));
        }
        if let Some(j) = cfg.secrets.iter().position(|s| s.is_empty()) {
            return Err(ConfigError::invalid(
                format!("sources[{i}].secrets[{j}]"),
                "is empty",
            ));
        }
    }
    let tolerance = match cfg.tolerance {
        Some(d) if d.0.is_zero() => {
            return Err(ConfigError::invalid(key("tolerance"), "must be positive"));
        }
        Some(d) => d.0.as_secs().max(1),
        None => DEFAULT_TOLERANCE_SECS,
    };
    let secrets = || cfg.secrets.iter().map(|s| s.as_bytes().to_vec()).collect();
    Ok(match kind {
        "stripe" => Box::new(stripe::Stripe::new(secrets(), tolerance)),
        "github" => Box::new(github::GitHub::new(secrets())),
        "shopify" => Box::new(shopify::Shopify::new(secrets())),
        "standard" => {
            let keys = cfg
                .secrets
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    standard::decode_secret(s)
                        .map_err(|e| ConfigError::invalid(format!("sources[{i}].secrets[{j}]"), e))
                })
                .collect::<Result<Vec<_>, _>>()?;
            Box::new(standard::Standard::new(keys, tolerance))
        }
        "hmac" => Box::new(hmac::Generic::from_config(
            cfg,
            i,
            identity_fields(cfg, i)?,
        )?),
        "none" => {
            if !cfg.allow_unsigned {
                return Err(ConfigError::invalid(
                    key("allow_unsigned"),
                    "a `none` source checks no signature: anyone who can reach pushgate can post to it. Set allow_unsigned = true to accept that (development only)",
                ));
            }
            Box::new(none::Unsigned::new(identity_fields(cfg, i)?))
        }
        _ => unreachable!("kind checked above"),
    })
}

/// Where the `hmac` and `none` kinds read the dedupe key and the type.
#[derive(Debug, Clone, Default)]
pub struct IdentityFields {
    pub id: Option<Field>,
    pub kind: Option<Field>,
}

impl IdentityFields {
    /// Reads both; `default_id`/`default_type` are top-level body keys used
    /// when nothing is configured.
    pub fn read(
        &self,
        delivery: &Delivery<'_>,
        payload: &Value,
        default_id: Option<&str>,
        default_type: Option<&str>,
    ) -> Identity {
        let read = |field: &Option<Field>, default: Option<&str>| match field {
            Some(f) => f.text(payload, delivery.headers),
            None => default.and_then(|k| body_text(payload, k)),
        };
        Identity {
            source_id: read(&self.id, default_id),
            kind: read(&self.kind, default_type),
        }
    }
}

fn identity_fields(cfg: &SourceConfig, i: usize) -> Result<IdentityFields, ConfigError> {
    let pick = |header: &Option<String>, field: &Option<String>, what: &str| match (header, field) {
        (Some(_), Some(_)) => Err(ConfigError::invalid(
            format!("sources[{i}].{what}_header"),
            format!("set {what}_header or {what}_field, not both"),
        )),
        (Some(h), None) => Field::parse(&format!("headers.{h}"))
            .map(Some)
            .map_err(|e| ConfigError::invalid(format!("sources[{i}].{what}_header"), e)),
        (None, Some(f)) => match Field::parse(f) {
            Ok(Field::Body(p)) => Ok(Some(Field::Body(p))),
            Ok(Field::Header(_)) => Err(ConfigError::invalid(
                format!("sources[{i}].{what}_field"),
                format!("to read a header, use {what}_header"),
            )),
            Err(e) => Err(ConfigError::invalid(
                format!("sources[{i}].{what}_field"),
                e,
            )),
        },
        (None, None) => Ok(None),
    };
    Ok(IdentityFields {
        id: pick(&cfg.id_header, &cfg.id_field, "id")?,
        kind: pick(&cfg.type_header, &cfg.type_field, "type")?,
    })
}

// ─── development mode ──────────────────────────────────────────────────────

/// Name of the Stripe source that development mode adds.
pub const DEMO_SOURCE: &str = "demo";

/// In development mode, adds the `demo` Stripe source (channel
/// `user:{data.object.metadata.user_id}`, fallback `stripe`) with a fresh
/// random secret, unless a source of that name is configured. Returns the
/// secret it made, for the start-up banner.
pub fn add_demo_source(config: &mut Config) -> Option<String> {
    if !config.auth.is_development() || config.sources.iter().any(|s| s.name == DEMO_SOURCE) {
        return None;
    }
    let secret = format!("whsec_{}", random_alphanumeric(32));
    config.sources.push(SourceConfig {
        name: DEMO_SOURCE.into(),
        kind: "stripe".into(),
        secrets: vec![secret.clone()],
        channel: Some("user:{data.object.metadata.user_id}".into()),
        fallback_channel: Some("stripe".into()),
        ..Default::default()
    });
    Some(secret)
}

/// The secret of the `demo` Stripe source, if there is one (the /demo
/// page's Pay button signs with it).
pub fn demo_secret(config: &Config) -> Option<&str> {
    config
        .sources
        .iter()
        .find(|s| s.name == DEMO_SOURCE && s.kind == "stripe")
        .and_then(|s| s.secrets.first())
        .map(String::as_str)
}

fn random_alphanumeric(n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

// ─── accepting a delivery ──────────────────────────────────────────────────

/// Headers whose values are credentials: recorded as `[redacted]`.
const REDACTED_HEADERS: &[&str] = &["authorization", "proxy-authorization", "cookie"];

/// A verified delivery, ready to append: its message and the inspector's
/// record of it (stored in the same transaction).
pub struct Accepted {
    pub message: NewMessage,
    pub inbound: NewInbound,
}

impl Source {
    /// Whether anyone at all may post to this source (`kind = "none"`):
    /// such deliveries are throttled per client like failed checks.
    pub fn is_unsigned(&self) -> bool {
        self.kind == "none"
    }

    /// Runs one delivery through verify → parse → identify → route. `now`
    /// is Unix seconds. The signature is checked over `body` before it is
    /// parsed; the payload is kept as the JSON text that arrived.
    pub fn accept(
        &self,
        headers: &HeaderMap,
        body: Bytes,
        now: i64,
    ) -> Result<Accepted, Rejection> {
        let delivery = Delivery {
            headers,
            body: &body,
            now,
        };
        self.verifier.verify(&delivery)?;
        let text = self.verifier.payload(&delivery)?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| Rejection::InvalidJson(format!("the payload is not valid JSON: {e}")))?;
        let raw = RawValue::from_string(text.into_owned())
            .map_err(|e| Rejection::InvalidJson(format!("the payload is not valid JSON: {e}")))?;
        let identity = self.verifier.identify(&delivery, &value);
        let kind = identity
            .kind
            .map(clean_type)
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "webhook".to_string());
        let source_id = identity.source_id.map(bound_id);
        let channels = self.routes.route(&kind, &value, headers);
        drop(value);
        let message = NewMessage {
            channels,
            kind,
            source: self.name.clone(),
            source_id,
            key_scope: String::new(),
            data: raw,
        };
        let inbound = NewInbound {
            source: self.name.clone(),
            headers: header_pairs(headers),
            body_size: body.len() as u64,
            body,
            reason: None,
            detail: None,
        };
        Ok(Accepted { message, inbound })
    }
}

/// The inspector's record of a refused delivery: `reason` is the error
/// code the sender got, `detail` its message. `body_size` is what arrived
/// (or was declared) even when `body` is not kept.
pub fn refused_record(
    source: &str,
    headers: &HeaderMap,
    body: Bytes,
    body_size: u64,
    reason: &str,
    detail: &str,
) -> NewInbound {
    NewInbound {
        source: source.to_string(),
        headers: header_pairs(headers),
        body,
        body_size,
        reason: Some(reason.to_string()),
        detail: Some(detail.to_string()),
    }
}

/// Headers as they arrived (names lower-case), credentials redacted.
fn header_pairs(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = name.as_str();
            let value = if REDACTED_HEADERS.contains(&name) {
                "[redacted]".to_string()
            } else {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            };
            (name.to_string(), value)
        })
        .collect()
}

/// Types come from payloads: no control characters, bounded length.
fn clean_type(kind: String) -> String {
    if kind.len() <= MAX_TYPE_LEN && !kind.chars().any(char::is_control) {
        return kind;
    }
    let mut out: String = kind.chars().filter(|c| !c.is_control()).collect();
    if out.len() > MAX_TYPE_LEN {
        let mut cut = MAX_TYPE_LEN;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

/// Ids longer than `MAX_ID_LEN` or with control characters (PostgreSQL's
/// TEXT cannot hold NUL) are replaced by their SHA-256: still one key per id.
fn bound_id(id: String) -> String {
    if id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control) {
        id
    } else {
        format!(
            "sha256:{}",
            hex::encode(sha2::Sha256::digest(id.as_bytes()))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    fn cfg(kind: &str) -> SourceConfig {
        SourceConfig {
            name: "s".into(),
            kind: kind.into(),
            secrets: vec!["whsec_c2VjcmV0".into()],
            ..Default::default()
        }
    }

    fn error_of(sources: Vec<SourceConfig>) -> String {
        match Sources::from_config(&sources) {
            Ok(_) => panic!("expected a configuration error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn every_kind_builds_with_a_secret() {
        for kind in ["stripe", "github", "shopify", "standard"] {
            Sources::from_config(&[cfg(kind)]).unwrap();
        }
        let mut h = cfg("hmac");
        h.header = Some("x-signature".into());
        Sources::from_config(&[h]).unwrap();
        let mut n = cfg("none");
        n.secrets.clear();
        n.allow_unsigned = true;
        Sources::from_config(&[n]).unwrap();
    }

    #[test]
    fn configuration_errors_name_the_key() {
        let mut c = cfg("stripe");
        c.kind = "paypal".into();
        assert!(error_of(vec![c]).contains("sources[0].kind"));
        let mut c = cfg("stripe");
        c.secrets.clear();
        assert!(error_of(vec![c]).contains("sources[0].secrets"));
        let mut c = cfg("stripe");
        c.secrets.push(String::new());
        assert!(error_of(vec![c]).contains("sources[0].secrets[1]"));
        let mut c = cfg("github");
        c.tolerance = Some(Dur::secs(10));
        assert!(error_of(vec![c]).contains("sources[0].tolerance"));
        let mut c = cfg("stripe");
        c.tolerance = Some(Dur::secs(0));
        assert!(error_of(vec![c]).contains("sources[0].tolerance"));
        let mut c = cfg("standard");
        c.secrets = vec!["whsec_not base64!".into()];
        assert!(error_of(vec![c]).contains("sources[0].secrets[0]"));
        let mut c = cfg("none");
        c.name = "open".into();
        c.secrets.clear();
        assert!(error_of(vec![cfg("github"), c]).contains("sources[1].allow_unsigned"));
        let c = cfg("hmac");
        assert!(error_of(vec![c]).contains("sources[0].header"));
        let mut c = cfg("hmac");
        c.header = Some("x-sig".into());
        c.algorithm = Some("md5".into());
        assert!(error_of(vec![c]).contains("sources[0].algorithm"));
        let mut c = cfg("hmac");
        c.header = Some("x-sig".into());
        c.id_header = Some("x-id".into());
        c.id_field = Some("id".into());
        assert!(error_of(vec![c]).contains("sources[0].id_header"));
        let mut c = cfg("stripe");
        c.header = Some("x".into());
        assert!(error_of(vec![c]).contains("sources[0].header"));
        let mut c = cfg("stripe");
        c.name = "has space".into();
        assert!(error_of(vec![c]).contains("sources[0].name"));
        assert!(error_of(vec![cfg("stripe"), cfg("github")]).contains("sources[1].name"));
        let mut c = cfg("stripe");
        c.channel = Some("user:{data.object.metadata.user_id".into());
        assert!(error_of(vec![c]).contains("sources[0].channel"));
    }

    #[test]
    fn tolerance_both_ways() {
        assert!(check_tolerance(1000, 1000, 300).is_ok());
        assert!(check_tolerance(700, 1000, 300).is_ok());
        assert!(check_tolerance(1300, 1000, 300).is_ok());
        assert!(check_tolerance(699, 1000, 300).is_err());
        assert!(check_tolerance(1301, 1000, 300).is_err());
        assert!(check_tolerance(i64::MIN, i64::MAX, 300).is_err());
    }

    #[test]
    fn types_and_ids_are_bounded() {
        assert_eq!(clean_type("invoice.paid".into()), "invoice.paid");
        assert_eq!(clean_type("a\nb".into()), "ab");
        assert_eq!(clean_type("é".repeat(150)).len(), 200);
        assert_eq!(bound_id("evt_1".into()), "evt_1");
        let long = bound_id("x".repeat(1000));
        assert!(long.starts_with("sha256:") && long.len() == 71);
        assert_eq!(long, bound_id("x".repeat(1000)));
        assert!(bound_id("evt\u{0}1".into()).starts_with("sha256:"));
    }

    #[test]
    fn demo_source_only_in_development() {
        let mut c = Config::load(None, Vec::new()).unwrap();
        let secret = add_demo_source(&mut c).expect("development adds it");
        assert!(secret.starts_with("whsec_") && secret.len() == 38);
        assert_eq!(demo_secret(&c), Some(secret.as_str()));
        assert_eq!(add_demo_source(&mut c), None, "added once");
        Sources::from_config(&c.sources).unwrap();
        let mut c = Config::load(None, Vec::new()).unwrap();
        c.auth.publish_keys = vec!["pk".into()];
        assert_eq!(add_demo_source(&mut c), None);
        assert!(c.sources.is_empty());
    }

    #[test]
    fn accept_is_a_domain_call_bytes_and_headers_in() {
        let mut n = cfg("none");
        n.secrets.clear();
        n.allow_unsigned = true;
        n.channel = Some("user:{user}".into());
        let sources = Sources::from_config(&[n]).unwrap();
        let source = sources.get("s").unwrap();
        assert!(source.is_unsigned());
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer secret".parse().unwrap());
        let body =
            Bytes::from_static(b"{\"id\": \"e1\", \"type\": \"a\\u0007b\", \"user\": \"7\"}\n");
        let ok = source.accept(&h, body.clone(), 0).unwrap();
        assert_eq!(ok.message.channels, ["user:7"]);
        assert_eq!(ok.message.kind, "ab", "control characters dropped");
        assert_eq!(ok.message.source_id.as_deref(), Some("e1"));
        assert_eq!(
            ok.message.data.get(),
            std::str::from_utf8(&body).unwrap().trim_end()
        );
        assert_eq!(ok.inbound.body, body, "the record keeps the bytes");
        assert!(
            ok.inbound
                .headers
                .contains(&("authorization".into(), "[redacted]".into()))
        );
        let refused = source.accept(&h, Bytes::from_static(b"{not json"), 0);
        assert!(matches!(refused, Err(Rejection::InvalidJson(_))));
        let signed = Sources::from_config(&[cfg("stripe")]).unwrap();
        let refused = signed.get("s").unwrap().accept(&h, body, 0);
        assert!(matches!(refused, Err(Rejection::InvalidSignature(_))));
    }

    #[test]
    fn credentials_are_not_recorded() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Basic c2VjcmV0".parse().unwrap());
        h.insert("cookie", "a=b".parse().unwrap());
        h.insert("stripe-signature", "t=1,v1=ab".parse().unwrap());
        let pairs = header_pairs(&h);
        assert!(pairs.contains(&("authorization".into(), "[redacted]".into())));
        assert!(pairs.contains(&("cookie".into(), "[redacted]".into())));
        assert!(pairs.contains(&("stripe-signature".into(), "t=1,v1=ab".into())));
    }
}
