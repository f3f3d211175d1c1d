//! Who may publish, subscribe and administer.
//!
//! One check for every transport: SSE, polling, publish, WebSocket and the
//! admin API all call `Auth`. Invariants:
//! - no private channel is readable without a token that grants it;
//! - keys are compared in constant time (over their SHA-256, so not even the
//!   length leaks);
//! - a token's algorithm must be the configured one (no `none`, no HS/RS
//!   confusion);
//! - development mode (no keys at all) grants everything, and only exists on
//!   a loopback listener (enforced by `serve`).

use std::time::{SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("the token does not grant channel `{0}`")]
    Forbidden(String),
    #[error("cannot load the JWT key: {0}")]
    BadKey(String),
}

/// A channel pattern from a grant or `public_channels`: exact, or a prefix
/// ending in `*` that matches one or more further characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern(String);

impl Pattern {
    pub fn new(p: &str) -> Pattern {
        Pattern(p.to_string())
    }
    pub fn matches(&self, channel: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => channel.len() > prefix.len() && channel.starts_with(prefix),
            None => self.0 == channel,
        }
    }
}

pub fn any_matches(patterns: &[Pattern], channel: &str) -> bool {
    patterns.iter().any(|p| p.matches(channel))
}

/// The `pushgate` claim of a subscriber token.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChannelGrants {
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default)]
    pub pushgate: ChannelGrants,
}

/// A verified subscriber token.
#[derive(Debug, Clone)]
pub struct Grant {
    pub subject: Option<String>,
    /// Unix seconds; an open stream ends when it passes.
    pub expires_at: Option<u64>,
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
}

impl Grant {
    pub fn can_subscribe(&self, channel: &str) -> bool {
        any_matches(&self.subscribe, channel)
    }
    pub fn can_publish(&self, channel: &str) -> bool {
        any_matches(&self.publish, channel)
    }
}

/// What a request presented, from wherever a client can put it.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    pub bearer: Option<String>,
    pub query_token: Option<String>,
    pub cookie_token: Option<String>,
}

impl Credentials {
    pub fn from_request(headers: &HeaderMap, query_token: Option<&str>) -> Credentials {
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let cookie_token = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == "pushgate_token")
            .map(|(_, v)| v.to_string())
            .filter(|t| !t.is_empty());
        Credentials {
            bearer,
            query_token: query_token.map(str::to_string).filter(|t| !t.is_empty()),
            cookie_token,
        }
    }

    /// The subscriber token: header first, then query, then cookie.
    pub fn token(&self) -> Option<&str> {
        self.bearer
            .as_deref()
            .or(self.query_token.as_deref())
            .or(self.cookie_token.as_deref())
    }
}

/// Who a publish request is, for rate limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Publisher {
    Development,
    Key(usize),
    Subject(String),
}

pub struct Auth {
    development: bool,
    publish_keys: Vec<[u8; 32]>,
    admin_keys: Vec<[u8; 32]>,
    public_channels: Vec<Pattern>,
    jwt: Option<(DecodingKey, Validation)>,
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

fn key_index(keys: &[[u8; 32]], presented: &str) -> Option<usize> {
    let d = digest(presented);
    // Compare against every key so timing does not tell which one matched.
    let mut found = None;
    for (i, k) in keys.iter().enumerate() {
        if bool::from(k.ct_eq(&d)) {
            found = Some(i);
        }
    }
    found
}

/// Leeway for `exp` and `nbf`, for clocks that disagree a little.
const LEEWAY_SECS: u64 = 5;

impl Auth {
    pub fn new(config: &AuthConfig) -> Result<Auth, AuthError> {
        let jwt = if let Some(path) = &config.jwt_public_key_file {
            let pem = std::fs::read(path)
                .map_err(|e| AuthError::BadKey(format!("{}: {e}", path.display())))?;
            let (key, alg) = if let Ok(k) = DecodingKey::from_rsa_pem(&pem) {
                (k, Algorithm::RS256)
            } else if let Ok(k) = DecodingKey::from_ec_pem(&pem) {
                (k, Algorithm::ES256)
            } else {
                return Err(AuthError::BadKey(format!(
                    "{}: not an RSA or EC public key in PEM",
                    path.display()
                )));
            };
            Some((key, validation(alg)))
        } else {
            config.jwt_secret.as_ref().map(|s| {
                (
                    DecodingKey::from_secret(s.as_bytes()),
                    validation(Algorithm::HS256),
                )
            })
        };
        Ok(Auth {
            development: config.is_development(),
            publish_keys: config.publish_keys.iter().map(|k| digest(k)).collect(),
            admin_keys: config.admin_keys.iter().map(|k| digest(k)).collect(),
            public_channels: config
                .public_channels
                .iter()
                .map(|p| Pattern::new(p))
                .collect(),
            jwt,
        })
    }

    pub fn is_development(&self) -> bool {
        self.development
    }

    pub fn is_public(&self, channel: &str) -> bool {
        any_matches(&self.public_channels, channel)
    }

    /// Verifies a subscriber token.
    pub fn verify_token(&self, token: &str) -> Result<Grant, AuthError> {
        let Some((key, validation)) = &self.jwt else {
            return Err(AuthError::Unauthorized(
                "subscriber tokens are not enabled (no auth.jwt_secret or jwt_public_key_file)"
                    .into(),
            ));
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, validation)
            .map_err(|e| AuthError::Unauthorized(format!("invalid token: {e}")))?;
        let c = data.claims;
        Ok(Grant {
            subject: c.sub,
            expires_at: c.exp,
            subscribe: c
                .pushgate
                .subscribe
                .iter()
                .map(|p| Pattern::new(p))
                .collect(),
            publish: c.pushgate.publish.iter().map(|p| Pattern::new(p)).collect(),
        })
    }

    /// May these credentials read every one of `channels`? Returns the grant
    /// (if a token was presented) so open streams can end when it expires.
    pub fn authorize_subscribe(
        &self,
        creds: &Credentials,
        channels: &[String],
    ) -> Result<Option<Grant>, AuthError> {
        if self.development {
            return Ok(None);
        }
        let grant = creds.token().map(|t| self.verify_token(t)).transpose()?;
        for ch in channels {
            if self.is_public(ch) {
                continue;
            }
            match &grant {
                None => {
                    return Err(AuthError::Unauthorized(format!(
                        "channel `{ch}` is private: a token is required"
                    )));
                }
                Some(g) if g.can_subscribe(ch) => {}
                Some(_) => return Err(AuthError::Forbidden(ch.clone())),
            }
        }
        Ok(grant)
    }

    /// May these credentials publish to every one of `channels`? A publish
    /// key may publish anywhere; a token only where its `publish` grant says.
    pub fn authorize_publish(
        &self,
        creds: &Credentials,
        channels: &[&str],
    ) -> Result<Publisher, AuthError> {
        if self.development {
            return Ok(Publisher::Development);
        }
        if let Some(bearer) = &creds.bearer
            && let Some(i) = key_index(&self.publish_keys, bearer)
        {
            return Ok(Publisher::Key(i));
        }
        let Some(token) = creds.token() else {
            return Err(AuthError::Unauthorized(
                "a publish key or token is required (Authorization: Bearer …)".into(),
            ));
        };
        if self.jwt.is_none() {
            return Err(AuthError::Unauthorized("unknown publish key".into()));
        }
        let grant = self.verify_token(token)?;
        if let Some(ch) = channels.iter().find(|ch| !grant.can_publish(ch)) {
            return Err(AuthError::Forbidden(ch.to_string()));
        }
        Ok(Publisher::Subject(grant.subject.unwrap_or_default()))
    }

    pub fn authorize_admin(&self, creds: &Credentials) -> Result<(), AuthError> {
        if self.development {
            return Ok(());
        }
        match &creds.bearer {
            Some(b) if key_index(&self.admin_keys, b).is_some() => Ok(()),
            Some(_) => Err(AuthError::Unauthorized("unknown admin key".into())),
            None => Err(AuthError::Unauthorized(
                "an admin key is required (Authorization: Bearer …)".into(),
            )),
        }
    }
}

fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY_SECS;
    v.validate_nbf = true;
    v.validate_exp = true;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    v
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_patterns() {
        let p = Pattern::new("prices.*");
        assert!(p.matches("prices.AAPL"));
        assert!(!p.matches("pricesX"));
        assert!(!p.matches("prices"));
        assert!(!p.matches("prices."));
        assert!(Pattern::new("user:42").matches("user:42"));
        assert!(!Pattern::new("user:42").matches("user:421"));
        assert!(Pattern::new("*").matches("anything"));
    }

    #[test]
    fn credentials_from_every_carrier() {
        let mut h = HeaderMap::new();
        h.insert("cookie", "a=b; pushgate_token=tok3".parse().unwrap());
        let c = Credentials::from_request(&h, None);
        assert_eq!(c.token(), Some("tok3"));
        let c = Credentials::from_request(&h, Some("tok2"));
        assert_eq!(c.token(), Some("tok2"));
        h.insert("authorization", "Bearer tok1".parse().unwrap());
        let c = Credentials::from_request(&h, Some("tok2"));
        assert_eq!(c.token(), Some("tok1"));
    }

    #[test]
    fn keys_compare_by_digest() {
        let keys = vec![digest("pk_a"), digest("pk_b")];
        assert_eq!(key_index(&keys, "pk_b"), Some(1));
        assert_eq!(key_index(&keys, "pk_"), None);
        assert_eq!(key_index(&keys, ""), None);
    }
}
