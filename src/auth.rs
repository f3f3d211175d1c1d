//! Who may publish, subscribe and administer.
//!
//! One check for every transport: SSE, polling, publish, WebSocket and the
//! admin API all call `Auth`. Invariants:
//! - no private channel is readable without a token that grants it (or an
//!   admin key), checked on the whole channel list before anything is sent;
//! - keys are compared in constant time (over their SHA-256, so not even the
//!   length leaks);
//! - a token's algorithm must be one the configuration has a key for, and
//!   the key must be of that algorithm's family (no `none`, no HS/RS
//!   confusion: an HS256 token is only ever checked against `jwt_secret`);
//! - the `pushgate_token` cookie is ambient (a browser attaches it to
//!   requests other sites make), so it only counts when the request comes
//!   from no browser page, from pushgate's own origin, or from an origin in
//!   `server.cors_origins`; that keeps cross-site WebSocket hijacking and
//!   cross-site publishing out;
//! - development mode (no keys at all) grants everything, and only exists on
//!   a loopback listener unless `--insecure` (enforced by `serve`).

use base64::Engine;
use http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use crate::channel::{Pattern, any_matches};
pub use crate::clock::unix_now;
use crate::config::AuthConfig;
pub use crate::config::normalize_origin;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("the credentials do not grant channel `{0}`")]
    Forbidden(String),
    #[error("cannot load the JWT key: {0}")]
    BadKey(String),
}

/// The `pushgate` claim of a subscriber token.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChannelGrants {
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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

/// Verified subscriber credentials: a token's grants, or an admin key's
/// (everything, no expiry).
#[derive(Debug, Clone)]
pub struct Grant {
    pub subject: Option<String>,
    /// Unix seconds; an open stream ends when it passes.
    pub expires_at: Option<u64>,
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
    admin: Option<usize>,
}

impl Grant {
    pub fn can_subscribe(&self, channel: &str) -> bool {
        any_matches(&self.subscribe, channel)
    }
    pub fn can_publish(&self, channel: &str) -> bool {
        any_matches(&self.publish, channel)
    }
    pub fn is_admin(&self) -> bool {
        self.admin.is_some()
    }
    /// Whether the grant has run out (no leeway: a stream ends on time).
    pub fn is_expired(&self) -> bool {
        self.expires_at.is_some_and(|exp| unix_now() >= exp)
    }
    /// Who this is, for publish rate limits.
    pub fn publisher(&self) -> Publisher {
        match self.admin {
            Some(i) => Publisher::Admin(i),
            None => Publisher::Subject(self.subject.clone().unwrap_or_default()),
        }
    }
    fn admin(index: usize) -> Grant {
        Grant {
            subject: None,
            expires_at: None,
            subscribe: vec![Pattern::new("*")],
            publish: vec![Pattern::new("*")],
            admin: Some(index),
        }
    }
}

/// Where a browser request says it comes from, as far as cookies care.
#[derive(Clone, PartialEq, Eq)]
enum RequestOrigin {
    /// No `Origin` header: not a cross-origin browser request.
    Absent,
    /// `Origin` names the host the request was sent to.
    Same,
    /// Another origin (lowercased, as browsers send it).
    Cross(String),
}

/// What a request presented, from wherever a client can put it. `Debug`
/// never shows a secret.
#[derive(Clone)]
pub struct Credentials {
    pub bearer: Option<String>,
    pub query_token: Option<String>,
    pub cookie_token: Option<String>,
    origin: RequestOrigin,
}

impl Default for Credentials {
    fn default() -> Self {
        Credentials {
            bearer: None,
            query_token: None,
            cookie_token: None,
            origin: RequestOrigin::Absent,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("Credentials")
            .field("bearer", &shown(&self.bearer))
            .field("query_token", &shown(&self.query_token))
            .field("cookie_token", &shown(&self.cookie_token))
            .finish()
    }
}

impl Credentials {
    pub fn from_request(headers: &HeaderMap, query_token: Option<&str>) -> Credentials {
        let bearer = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let cookie_token = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == "pushgate_token")
            .map(|(_, v)| v.trim().trim_matches('"').to_string())
            .filter(|t| !t.is_empty());
        Credentials {
            bearer,
            query_token: query_token.map(str::to_string).filter(|t| !t.is_empty()),
            cookie_token,
            origin: request_origin(headers),
        }
    }

    /// The subscriber token: header first, then query, then the cookie if
    /// the request is not from another site's page. (`Auth` also accepts
    /// the cookie from origins in `server.cors_origins`.)
    pub fn token(&self) -> Option<&str> {
        self.explicit_token().or(match self.origin {
            RequestOrigin::Absent | RequestOrigin::Same => self.cookie_token.as_deref(),
            RequestOrigin::Cross(_) => None,
        })
    }

    fn explicit_token(&self) -> Option<&str> {
        self.bearer.as_deref().or(self.query_token.as_deref())
    }
}

fn request_origin(headers: &HeaderMap) -> RequestOrigin {
    let Some(origin) = headers
        .get(http::header::ORIGIN)
        .and_then(|v| v.to_str().ok())
    else {
        return RequestOrigin::Absent;
    };
    let origin = origin.trim().to_ascii_lowercase();
    let authority = origin.split_once("://").map(|(_, rest)| rest);
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(|h| h.trim().to_ascii_lowercase());
    match (authority, host) {
        (Some(a), Some(h)) if a == h => RequestOrigin::Same,
        _ => RequestOrigin::Cross(origin),
    }
}

/// Who a publish request is, for rate limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Publisher {
    Development,
    Key(usize),
    Admin(usize),
    Subject(String),
}

/// A publisher whose credentials are verified but whose channels are not
/// yet known (publish checks credentials before it reads the body).
#[derive(Debug, Clone)]
pub enum PublishAuth {
    Development,
    Key(usize),
    Token(Grant),
}

impl PublishAuth {
    /// May this publisher write to every one of `channels`?
    pub fn authorize(&self, channels: &[&str]) -> Result<Publisher, AuthError> {
        match self {
            PublishAuth::Development => Ok(Publisher::Development),
            PublishAuth::Key(i) => Ok(Publisher::Key(*i)),
            PublishAuth::Token(grant) => {
                if let Some(ch) = channels.iter().find(|ch| !grant.can_publish(ch)) {
                    return Err(AuthError::Forbidden(ch.to_string()));
                }
                Ok(grant.publisher())
            }
        }
    }
}

/// One accepted token algorithm and the key that checks it.
struct JwtKey {
    alg: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

pub struct Auth {
    development: bool,
    publish_keys: Vec<[u8; 32]>,
    admin_keys: Vec<[u8; 32]>,
    public_channels: Vec<Pattern>,
    jwt: Vec<JwtKey>,
    /// Origins whose pages may use the `pushgate_token` cookie.
    cookie_origins: Vec<String>,
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
pub const LEEWAY_SECS: u64 = 5;

/// HS256 secrets shorter than this can be brute-forced from any token.
const MIN_SECRET_LEN: usize = 32;

impl Auth {
    /// Whose idempotency keys a publisher's are (`store::NewMessage::key_scope`):
    /// a key suppresses only its own publisher's repeats. A publish or admin
    /// key is named by a digest of its digest (stable across restarts and
    /// reordering, and not the digest `Auth` compares); a token by its
    /// `sub`; development mode has one publisher, scope `""`.
    pub fn idempotency_scope(&self, publisher: &Publisher) -> String {
        let key = |kind: &str, d: Option<&[u8; 32]>| {
            let mut h = Sha256::new();
            h.update(b"pushgate idempotency scope\0");
            h.update(d.map_or(&[][..], |d| &d[..]));
            format!("{kind}:{}", hex::encode(&h.finalize()[..12]))
        };
        match publisher {
            Publisher::Development => String::new(),
            Publisher::Key(i) => key("key", self.publish_keys.get(*i)),
            Publisher::Admin(i) => key("admin", self.admin_keys.get(*i)),
            Publisher::Subject(sub) => format!("sub:{sub}"),
        }
    }

    /// `cors_origins` is `server.cors_origins`: pages there may use the cookie.
    pub fn new(config: &AuthConfig, cors_origins: &[String]) -> Result<Auth, AuthError> {
        let mut jwt = Vec::new();
        if let Some(secret) = &config.jwt_secret {
            if secret.len() < MIN_SECRET_LEN {
                tracing::warn!(
                    "auth.jwt_secret is shorter than {MIN_SECRET_LEN} bytes: anyone holding a token can guess it offline; use a long random secret"
                );
            }
            jwt.push(JwtKey {
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation: validation(Algorithm::HS256),
            });
        }
        if let Some(path) = &config.jwt_public_key_file {
            let pem = std::fs::read(path)
                .map_err(|e| AuthError::BadKey(format!("{}: {e}", path.display())))?;
            let (alg, key) = public_key_from_pem(&pem)
                .map_err(|e| AuthError::BadKey(format!("{}: {e}", path.display())))?;
            jwt.push(JwtKey {
                alg,
                key,
                validation: validation(alg),
            });
        }
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
            cookie_origins: cors_origins
                .iter()
                .filter(|o| o.as_str() != "*")
                .map(|o| normalize_origin(o))
                .collect(),
        })
    }

    pub fn is_development(&self) -> bool {
        self.development
    }

    pub fn is_public(&self, channel: &str) -> bool {
        any_matches(&self.public_channels, channel)
    }

    /// The algorithms subscriber tokens may be signed with.
    pub fn token_algorithms(&self) -> Vec<Algorithm> {
        self.jwt.iter().map(|k| k.alg).collect()
    }

    /// The token this request presents, with the cookie only where it may
    /// be used (see the module comment).
    fn token_of<'a>(&self, creds: &'a Credentials) -> Option<&'a str> {
        creds.explicit_token().or(match &creds.origin {
            RequestOrigin::Absent | RequestOrigin::Same => creds.cookie_token.as_deref(),
            RequestOrigin::Cross(o) if self.cookie_origins.iter().any(|c| c == o) => {
                creds.cookie_token.as_deref()
            }
            RequestOrigin::Cross(_) => None,
        })
    }

    /// Verifies a subscriber token.
    pub fn verify_token(&self, token: &str) -> Result<Grant, AuthError> {
        if self.jwt.is_empty() {
            return Err(AuthError::Unauthorized(
                "subscriber tokens are not enabled (no auth.jwt_secret or jwt_public_key_file)"
                    .into(),
            ));
        }
        // The header only picks which configured key to try; `decode`
        // checks the algorithm again against that key's validation.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Unauthorized(format!("invalid token: {e}")))?;
        let Some(k) = self.jwt.iter().find(|k| k.alg == header.alg) else {
            return Err(AuthError::Unauthorized(format!(
                "invalid token: signed with {:?}, but this server accepts {:?}",
                header.alg,
                self.token_algorithms()
            )));
        };
        let data = jsonwebtoken::decode::<Claims>(token, &k.key, &k.validation)
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
            admin: None,
        })
    }

    /// Verifies whatever subscriber credential the request carries: an
    /// admin key (`Authorization` or `?token=`, for the dashboard's
    /// `EventSource`; never the cookie) or a token. `Ok(None)`: nothing was
    /// presented, or development mode. A credential that is presented and
    /// bad is an error, even if only public channels are asked for.
    pub fn authenticate(&self, creds: &Credentials) -> Result<Option<Grant>, AuthError> {
        if self.development {
            return Ok(None);
        }
        if let Some(key) = creds.explicit_token() {
            if let Some(i) = key_index(&self.admin_keys, key) {
                return Ok(Some(Grant::admin(i)));
            }
            // A backend's publish key is no subscriber credential, but not
            // a bad one either: it may read public channels.
            if key_index(&self.publish_keys, key).is_some() {
                return Ok(None);
            }
        }
        self.token_of(creds)
            .map(|t| self.verify_token(t))
            .transpose()
    }

    /// May a subscriber with `grant` (from `authenticate`) read every one of
    /// `channels`? Public channels need no grant.
    pub fn check_subscribe(
        &self,
        grant: Option<&Grant>,
        channels: &[String],
    ) -> Result<(), AuthError> {
        if self.development {
            return Ok(());
        }
        for ch in channels {
            if self.is_public(ch) {
                continue;
            }
            match grant {
                None => {
                    return Err(AuthError::Unauthorized(format!(
                        "channel `{ch}` is private: a token is required"
                    )));
                }
                Some(g) if g.can_subscribe(ch) => {}
                Some(_) => return Err(AuthError::Forbidden(ch.clone())),
            }
        }
        Ok(())
    }

    /// May these credentials read every one of `channels`? Returns the grant
    /// (if any) so open streams can end when it expires.
    pub fn authorize_subscribe(
        &self,
        creds: &Credentials,
        channels: &[String],
    ) -> Result<Option<Grant>, AuthError> {
        let grant = self.authenticate(creds)?;
        self.check_subscribe(grant.as_ref(), channels)?;
        Ok(grant)
    }

    /// Checks a publisher's credentials: a publish or admin key in
    /// `Authorization`, or a token (header or cookie) whose `publish` grant
    /// is checked per channel by `PublishAuth::authorize`.
    pub fn authenticate_publish(&self, creds: &Credentials) -> Result<PublishAuth, AuthError> {
        if self.development {
            return Ok(PublishAuth::Development);
        }
        if let Some(bearer) = &creds.bearer {
            if let Some(i) = key_index(&self.publish_keys, bearer) {
                return Ok(PublishAuth::Key(i));
            }
            if let Some(i) = key_index(&self.admin_keys, bearer) {
                return Ok(PublishAuth::Token(Grant::admin(i)));
            }
            if self.jwt.is_empty() {
                return Err(AuthError::Unauthorized("unknown publish key".into()));
            }
        }
        let Some(token) = self.token_of(creds) else {
            return Err(AuthError::Unauthorized(
                "a publish key or token is required (Authorization: Bearer …)".into(),
            ));
        };
        match self.verify_token(token) {
            Ok(grant) => Ok(PublishAuth::Token(grant)),
            Err(AuthError::Unauthorized(why)) if creds.bearer.is_some() => Err(
                AuthError::Unauthorized(format!("not a publish key, and {why}")),
            ),
            Err(e) => Err(e),
        }
    }

    /// May these credentials publish to every one of `channels`? A publish
    /// or admin key may publish anywhere; a token only where its `publish`
    /// grant says.
    pub fn authorize_publish(
        &self,
        creds: &Credentials,
        channels: &[&str],
    ) -> Result<Publisher, AuthError> {
        self.authenticate_publish(creds)?.authorize(channels)
    }

    /// Admin keys only, and only from `Authorization`: they never travel in
    /// URLs or cookies.
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

/// DER of the named curves we can tell apart in a public key.
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// Reads an RSA (RS256) or P-256 (ES256) public key. Private keys and other
/// curves are refused with a message saying so, rather than accepted and
/// then failing every token.
fn public_key_from_pem(pem: &[u8]) -> Result<(Algorithm, DecodingKey), String> {
    let text = std::str::from_utf8(pem).map_err(|_| "not a PEM file".to_string())?;
    let label = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .and_then(|l| l.strip_suffix("-----"))
        .ok_or_else(|| "not a PEM file (no -----BEGIN line)".to_string())?;
    if label.contains("PRIVATE KEY") {
        return Err(
            "this is a private key; give pushgate only the public key (openssl pkey -in key.pem -pubout)"
                .into(),
        );
    }
    if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
        return Ok((Algorithm::RS256, k));
    }
    if let Ok(k) = DecodingKey::from_ec_pem(pem) {
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .map(str::trim)
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .map_err(|e| format!("bad PEM body: {e}"))?;
        let contains = |needle: &[u8]| der.windows(needle.len()).any(|w| w == needle);
        if contains(OID_EC_PUBLIC_KEY) && !contains(OID_P256) {
            return Err("EC keys must be on the P-256 curve (ES256)".into());
        }
        return Ok((Algorithm::ES256, k));
    }
    Err("not an RSA or P-256 EC public key in PEM".into())
}

/// Mints an HS256 subscriber token, as `pushgate token` does and as a
/// backend would.
pub fn mint_hs256(secret: &str, claims: &Claims) -> Result<String, AuthError> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(|e| AuthError::BadKey(e.to_string()))
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
        assert!(Pattern::is_valid("prices.*"));
        assert!(Pattern::is_valid("*"));
        assert!(Pattern::is_valid("user:42"));
        assert!(!Pattern::is_valid("pri*ces"));
        assert!(!Pattern::is_valid("a b"));
        assert!(!Pattern::is_valid(""));
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
        h.insert("authorization", "BEARER  tok4 ".parse().unwrap());
        assert_eq!(Credentials::from_request(&h, None).token(), Some("tok4"));
        h.insert("authorization", "Basic dXNlcg==".parse().unwrap());
        assert_eq!(Credentials::from_request(&h, None).bearer, None);
    }

    #[test]
    fn debug_never_shows_secrets() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer SECRET1".parse().unwrap());
        h.insert("cookie", "pushgate_token=SECRET3".parse().unwrap());
        let c = Credentials::from_request(&h, Some("SECRET2"));
        let shown = format!("{c:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }

    #[test]
    fn cookie_only_from_own_or_allowed_origins() {
        let cfg = AuthConfig {
            jwt_secret: Some("s".repeat(32)),
            ..Default::default()
        };
        let auth = Auth::new(&cfg, &["https://app.example.com/".into()]).unwrap();
        let creds = |origin: Option<&str>| {
            let mut h = HeaderMap::new();
            h.insert("cookie", "pushgate_token=tok".parse().unwrap());
            h.insert("host", "push.example.com".parse().unwrap());
            if let Some(o) = origin {
                h.insert("origin", o.parse().unwrap());
            }
            Credentials::from_request(&h, None)
        };
        let no_origin = creds(None);
        assert_eq!(auth.token_of(&no_origin), Some("tok"));
        let same = creds(Some("https://push.example.com"));
        assert_eq!(auth.token_of(&same), Some("tok"));
        let allowed = creds(Some("https://APP.example.com"));
        assert_eq!(auth.token_of(&allowed), Some("tok"));
        assert_eq!(allowed.token(), None, "without the allow-list: refused");
        let evil = creds(Some("https://evil.example"));
        assert_eq!(auth.token_of(&evil), None);
        assert_eq!(evil.token(), None);
    }

    #[test]
    fn keys_compare_by_digest() {
        let keys = vec![digest("pk_a"), digest("pk_b")];
        assert_eq!(key_index(&keys, "pk_b"), Some(1));
        assert_eq!(key_index(&keys, "pk_"), None);
        assert_eq!(key_index(&keys, ""), None);
    }

    #[test]
    fn admin_and_publish_keys_are_distinct() {
        let cfg = AuthConfig {
            publish_keys: vec!["pk_1".into()],
            admin_keys: vec!["ak_1".into()],
            ..Default::default()
        };
        let auth = Auth::new(&cfg, &[]).unwrap();
        let bearer = |k: &str| {
            let mut h = HeaderMap::new();
            h.insert("authorization", format!("Bearer {k}").parse().unwrap());
            Credentials::from_request(&h, None)
        };
        assert!(auth.authorize_admin(&bearer("ak_1")).is_ok());
        assert!(auth.authorize_admin(&bearer("pk_1")).is_err());
        assert!(auth.authorize_admin(&Credentials::default()).is_err());
        // An admin key in the query string reads (the dashboard's
        // EventSource), but is not accepted by the admin API.
        let q = Credentials::from_request(&HeaderMap::new(), Some("ak_1"));
        assert!(auth.authorize_admin(&q).is_err());
        assert!(auth.authorize_subscribe(&q, &["user:1".into()]).is_ok());
        let mut h = HeaderMap::new();
        h.insert("cookie", "pushgate_token=ak_1".parse().unwrap());
        let cookie = Credentials::from_request(&h, None);
        assert!(
            auth.authorize_subscribe(&cookie, &["user:1".into()])
                .is_err()
        );
        assert_eq!(
            auth.authorize_publish(&bearer("pk_1"), &["x"]),
            Ok(Publisher::Key(0))
        );
        assert_eq!(
            auth.authorize_publish(&bearer("ak_1"), &["x"]),
            Ok(Publisher::Admin(0))
        );
        assert!(auth.authorize_publish(&bearer("nope"), &["x"]).is_err());
        // A publish key reads nothing private; an admin key reads everything.
        let ch = vec!["user:1".to_string()];
        assert!(auth.authorize_subscribe(&bearer("pk_1"), &ch).is_err());
        assert!(auth.authorize_subscribe(&bearer("ak_1"), &ch).is_ok());
    }

    #[test]
    fn private_keys_are_refused_with_a_reason() {
        let e =
            public_key_from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .err()
                .unwrap();
        assert!(e.contains("public key"), "{e}");
        assert!(public_key_from_pem(b"hello").is_err());
    }

    #[test]
    fn minted_tokens_verify() {
        let secret = "x".repeat(40);
        let cfg = AuthConfig {
            jwt_secret: Some(secret.clone()),
            ..Default::default()
        };
        let auth = Auth::new(&cfg, &[]).unwrap();
        let claims = Claims {
            sub: Some("42".into()),
            exp: Some(unix_now() + 60),
            pushgate: ChannelGrants {
                subscribe: vec!["user:42".into()],
                publish: vec!["chat:*".into()],
            },
            ..Default::default()
        };
        let g = auth
            .verify_token(&mint_hs256(&secret, &claims).unwrap())
            .unwrap();
        assert!(g.can_subscribe("user:42") && !g.can_subscribe("user:4"));
        assert!(g.can_publish("chat:room1") && !g.can_publish("user:42"));
        assert!(
            auth.verify_token(&mint_hs256("other", &claims).unwrap())
                .is_err()
        );
    }
}
