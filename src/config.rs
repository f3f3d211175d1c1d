//! Configuration: one TOML file plus `PUSHGATE_…` environment overrides.
//!
//! Owns the shape of `pushgate.toml` (contract section 5) and its validation.
//! Invariants: a `Config` that `load` returns is complete and valid — every
//! duration and size parsed, every listen address resolvable — so nothing
//! downstream re-validates; every error names the key that is wrong.
//!
//! Layering: config is the bottom of the crate (it imports only `channel`).
//! What a `[[sources]]` entry means — kinds, secrets, routing templates — is
//! checked by `ingest::Sources::from_config`, the code that runs it, which
//! `serve` (and `pushgate serve`, before binding) call with this config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("`{key}`: {message}")]
    Invalid { key: String, message: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub auth: AuthConfig,
    pub sources: Vec<SourceConfig>,
    pub limits: LimitsConfig,
    pub delivery: DeliveryConfig,
    pub websocket: WebSocketConfig,
    /// Set by `serve --insecure`, never by the file: allows a non-loopback
    /// listen address without keys.
    #[serde(skip)]
    pub insecure: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: String,
    pub heartbeat: Dur,
    pub max_body: ByteSize,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// SSE `retry:` hint sent to browsers at the start of every stream.
    pub sse_retry: Dur,
    /// Per-subscriber queue of events not yet written; past it the
    /// subscriber reads the log from its own cursor instead.
    pub subscriber_queue: usize,
    /// Time a client has to send a complete request head.
    pub header_timeout: Dur,
    /// Origins allowed by CORS (`*` allows any, without credentials).
    pub cors_origins: Vec<String>,
    /// Reverse proxies (CIDRs or addresses) whose `X-Forwarded-For` names
    /// the client, for per-client limits. Empty: the peer is the client.
    pub trusted_proxies: Vec<String>,
}

impl ServerConfig {
    /// `trusted_proxies` as networks (a plain address is a /32 or /128).
    pub fn trusted_proxies(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, t)| {
                t.parse::<ipnet::IpNet>()
                    .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| {
                        ConfigError::invalid(
                            format!("server.trusted_proxies[{i}]"),
                            format!("`{t}` is not an address or CIDR like 10.0.0.0/8"),
                        )
                    })
            })
            .collect()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".into(),
            heartbeat: Dur::secs(15),
            max_body: ByteSize(1 << 20),
            tls_cert: None,
            tls_key: None,
            sse_retry: Dur::secs(2),
            subscriber_queue: 4096,
            header_timeout: Dur::secs(10),
            cors_origins: Vec::new(),
            trusted_proxies: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub url: String,
    pub retention: Dur,
    /// Keep at most this many events (0 = no count limit).
    pub max_events: u64,
    pub dedupe_window: Dur,
    /// SQLite `synchronous`: `full` (default: acknowledged means on disk) or `normal`.
    pub synchronous: String,
    /// Connections the PostgreSQL pool may open.
    pub pool_size: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://pushgate.db".into(),
            retention: Dur::secs(7 * 86400),
            max_events: 0,
            dedupe_window: Dur::secs(7 * 86400),
            synchronous: "full".into(),
            pool_size: 16,
        }
    }
}

#[derive(Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub jwt_secret: Option<String>,
    pub jwt_public_key_file: Option<PathBuf>,
    pub publish_keys: Vec<String>,
    pub admin_keys: Vec<String>,
    pub public_channels: Vec<String>,
}

/// Secrets are never shown, so a `Config` may be logged.
impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field(
                "publish_keys",
                &format!("<{} redacted>", self.publish_keys.len()),
            )
            .field(
                "admin_keys",
                &format!("<{} redacted>", self.admin_keys.len()),
            )
            .field("public_channels", &self.public_channels)
            .finish()
    }
}

impl AuthConfig {
    /// Development mode: nothing configured that could authenticate anyone.
    pub fn is_development(&self) -> bool {
        self.jwt_secret.is_none()
            && self.jwt_public_key_file.is_none()
            && self.publish_keys.is_empty()
            && self.admin_keys.is_empty()
    }
}

/// One inbound webhook source (`POST /webhooks/{name}`). The fields a kind
/// does not use are ignored by it; `ingest` validates the combination.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub name: String,
    pub kind: String,
    pub secrets: Vec<String>,
    pub tolerance: Option<Dur>,
    pub channel: Option<String>,
    pub fallback_channel: Option<String>,
    pub routes: Vec<RouteConfig>,
    pub header: Option<String>,
    pub algorithm: Option<String>,
    pub encoding: Option<String>,
    pub prefix: Option<String>,
    pub id_header: Option<String>,
    pub id_field: Option<String>,
    pub type_header: Option<String>,
    pub type_field: Option<String>,
    pub allow_unsigned: bool,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    pub types: Vec<String>,
    pub channels: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub publish_per_key: u32,
    pub invalid_per_client: u32,
    pub streams_per_client: u32,
    pub channels_per_subscription: usize,
    /// Events in one publish batch.
    pub batch_size: usize,
    /// Time a client has to send a whole request body once its head has
    /// arrived; past it the request is answered 408 (0 = no deadline).
    pub body_timeout: Dur,
    /// Request bodies being received (and handled) at once, over all
    /// clients; past it 503 `server_busy` (0 = unlimited).
    pub bodies_in_flight: usize,
    /// Bytes of request bodies held at once, over all clients; past it 503
    /// `server_busy` (0 = unlimited). At least `server.max_body`.
    pub body_bytes_in_flight: ByteSize,
    /// Open connections from one client address (IPv6 by /64); past it new
    /// ones are closed at once. Trusted proxies are exempt (0 = unlimited).
    pub connections_per_client: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            publish_per_key: 0,
            invalid_per_client: 50,
            // Open streams (SSE, WebSocket, long-polls) per client address:
            // enough for many tabs and a NAT, not for one client to hold
            // the server's memory.
            streams_per_client: 128,
            channels_per_subscription: 100,
            batch_size: 1000,
            body_timeout: Dur::secs(20),
            bodies_in_flight: 256,
            body_bytes_in_flight: ByteSize(32 << 20),
            connections_per_client: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    pub allow_private_targets: bool,
    pub allow_targets: Vec<String>,
    pub retry_schedule: Vec<Dur>,
    pub timeout: Dur,
    pub connect_timeout: Dur,
    /// Deliveries in flight at once, over all endpoints.
    pub workers: usize,
    /// Deliveries in flight at once to one endpoint.
    pub per_endpoint: usize,
    /// An endpoint that has failed without a single success for this long is disabled.
    pub disable_after: Dur,
    /// How often the delivery loops look for work without being woken:
    /// events or deliveries from another node, a missed wake-up.
    pub poll_interval: Dur,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            allow_private_targets: false,
            allow_targets: Vec::new(),
            retry_schedule: ["0s", "5s", "5m", "30m", "2h", "5h", "10h", "10h"]
                .iter()
                .map(|s| Dur::parse(s).expect("default schedule parses"))
                .collect(),
            timeout: Dur::secs(15),
            connect_timeout: Dur::secs(5),
            workers: 64,
            per_endpoint: 4,
            disable_after: Dur::secs(5 * 86400),
            poll_interval: Dur::secs(1),
        }
    }
}

/// `[websocket]`: what one WebSocket connection may cost and send.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebSocketConfig {
    /// A peer that sends nothing (not even a pong) for this long after a
    /// ping is closed. Checked on each `server.heartbeat`.
    pub pong_timeout: Dur,
    /// Largest client message (and frame); larger ones close the connection (1009).
    pub max_message: ByteSize,
    /// Client frames per second (burst: as many again); 0 = unlimited.
    /// Past it frames get a `rate_limited` error; a client that keeps going is closed (4008).
    pub messages_per_second: u32,
    /// A client that does not take our pending frames within this is closed (4008).
    pub send_timeout: Dur,
    /// Initial read buffer per connection: small, so an idle connection costs little.
    pub read_buffer: ByteSize,
    /// Publishes one connection may have waiting for the log at once; past
    /// it the connection is not read until one completes.
    pub max_inflight_publishes: usize,
}

impl Default for WebSocketConfig {
    fn default() -> Self {
        WebSocketConfig {
            pong_timeout: Dur::secs(30),
            max_message: ByteSize(64 << 10),
            messages_per_second: 50,
            send_timeout: Dur::secs(10),
            read_buffer: ByteSize(512),
            max_inflight_publishes: 64,
        }
    }
}

/// A duration written the contract's way: `250ms`, `3s`, `5m`, `2h`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(pub Duration);

impl Dur {
    pub const fn secs(s: u64) -> Self {
        Dur(Duration::from_secs(s))
    }
    /// Longer than any sane setting, short enough that every timer and
    /// `Instant` arithmetic on it stays far from overflow.
    pub const MAX: Duration = Duration::from_secs(100 * 365 * 86400);

    pub fn parse(text: &str) -> Result<Self, String> {
        let d = humantime::parse_duration(text.trim())
            .map_err(|e| format!("`{text}` is not a duration like 250ms, 3s, 5m, 2h, 7d ({e})"))?;
        if d > Self::MAX {
            return Err(format!("`{text}` is longer than 100 years"));
        }
        Ok(Dur(d))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Dur::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A size: `1MiB`, `512KiB`, `64kB`, or plain bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub usize);

impl ByteSize {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: usize = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size like 1MiB or 65536"))?;
        let mult = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "kib" | "k" => 1024,
            "mb" => 1_000_000,
            "mib" | "m" => 1 << 20,
            "gb" => 1_000_000_000,
            "gib" | "g" => 1 << 30,
            _ => return Err(format!("`{text}`: unknown size unit `{unit}`")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Num(usize),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Num(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

impl Config {
    /// Reads the file (if any), applies `PUSHGATE_A__B=value` overrides from
    /// `env`, and validates. Environment values are JSON when they parse as
    /// JSON (lists, numbers, booleans), plain strings otherwise.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let (mut table, origin) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?;
                (table, p.display().to_string())
            }
            None => (toml::Table::new(), "configuration".to_string()),
        };
        let overrides: BTreeMap<String, String> = env
            .into_iter()
            // Every key lives in a section, so a variable without `__` (such
            // as PUSHGATE_LOG, the log filter) is not a configuration key.
            .filter(|(k, _)| k.starts_with("PUSHGATE_") && k.contains("__"))
            .collect();
        for (key, value) in overrides {
            apply_env_override(&mut table, &key, &value)?;
        }
        let config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                ConfigError::Parse {
                    path: origin.clone(),
                    message: format!("`{key}`: {}", e.inner()),
                }
            })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.listen_addr()?;
        if self.server.tls_cert.is_some() != self.server.tls_key.is_some() {
            return Err(ConfigError::invalid(
                "server.tls_cert",
                "tls_cert and tls_key must be set together",
            ));
        }
        if self.server.subscriber_queue < 16 {
            return Err(ConfigError::invalid(
                "server.subscriber_queue",
                "must be at least 16",
            ));
        }
        if self.server.heartbeat.0 < Duration::from_millis(100) {
            return Err(ConfigError::invalid(
                "server.heartbeat",
                "must be at least 100ms",
            ));
        }
        if !(self.store.url.starts_with("sqlite:") || self.store.url.starts_with("postgres")) {
            return Err(ConfigError::invalid(
                "store.url",
                "must start with sqlite:// or postgres://",
            ));
        }
        if !matches!(self.store.synchronous.as_str(), "full" | "normal" | "extra") {
            return Err(ConfigError::invalid(
                "store.synchronous",
                "must be full, extra or normal",
            ));
        }
        if self.store.retention.0.is_zero() {
            return Err(ConfigError::invalid("store.retention", "must be positive"));
        }
        if self.delivery.retry_schedule.is_empty() {
            return Err(ConfigError::invalid(
                "delivery.retry_schedule",
                "needs at least one entry (the first attempt)",
            ));
        }
        if self.delivery.workers == 0 {
            return Err(ConfigError::invalid("delivery.workers", "must be positive"));
        }
        if self.delivery.per_endpoint == 0 {
            return Err(ConfigError::invalid(
                "delivery.per_endpoint",
                "must be positive",
            ));
        }
        if self.delivery.timeout.0.is_zero() || self.delivery.connect_timeout.0.is_zero() {
            return Err(ConfigError::invalid(
                "delivery.timeout",
                "timeout and connect_timeout must be positive",
            ));
        }
        if self.delivery.poll_interval.0 < Duration::from_millis(10) {
            return Err(ConfigError::invalid(
                "delivery.poll_interval",
                "must be at least 10ms",
            ));
        }
        for (i, cidr) in self.delivery.allow_targets.iter().enumerate() {
            cidr.parse::<ipnet::IpNet>().map_err(|e| {
                ConfigError::invalid(format!("delivery.allow_targets[{i}]"), e.to_string())
            })?;
        }
        if self.server.cors_origins.len() > 1 && self.server.cors_origins.iter().any(|o| o == "*") {
            return Err(ConfigError::invalid(
                "server.cors_origins",
                "`*` (any origin, without credentials) must be the only entry",
            ));
        }
        for (i, origin) in self.server.cors_origins.iter().enumerate() {
            check_origin(origin)
                .map_err(|m| ConfigError::invalid(format!("server.cors_origins[{i}]"), m))?;
        }
        self.server.trusted_proxies()?;
        for (i, p) in self.auth.public_channels.iter().enumerate() {
            if !crate::channel::Pattern::is_valid(p) {
                return Err(ConfigError::invalid(
                    format!("auth.public_channels[{i}]"),
                    format!("`{p}` is not a channel name, optionally ending in `*`"),
                ));
            }
        }
        if let Some(s) = &self.auth.jwt_secret
            && s.is_empty()
        {
            return Err(ConfigError::invalid(
                "auth.jwt_secret",
                "is empty; remove it or set a long random secret",
            ));
        }
        for (key, list) in [
            ("auth.publish_keys", &self.auth.publish_keys),
            ("auth.admin_keys", &self.auth.admin_keys),
        ] {
            if let Some(i) = list.iter().position(|k| k.trim().is_empty()) {
                return Err(ConfigError::invalid(format!("{key}[{i}]"), "is empty"));
            }
        }
        if self.websocket.max_message.0 < 1024 {
            return Err(ConfigError::invalid(
                "websocket.max_message",
                "must be at least 1KiB",
            ));
        }
        if self.websocket.max_inflight_publishes == 0 {
            return Err(ConfigError::invalid(
                "websocket.max_inflight_publishes",
                "must be positive",
            ));
        }
        let in_flight = self.limits.body_bytes_in_flight.0;
        if in_flight != 0 && in_flight < self.server.max_body.0 {
            return Err(ConfigError::invalid(
                "limits.body_bytes_in_flight",
                "must be at least server.max_body (or 0 for unlimited)",
            ));
        }
        if self.limits.batch_size == 0 {
            return Err(ConfigError::invalid(
                "limits.batch_size",
                "must be positive",
            ));
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|e| {
            ConfigError::invalid(
                "server.listen",
                format!(
                    "`{}` is not an address like 127.0.0.1:8080 ({e})",
                    self.server.listen
                ),
            )
        })
    }
}

/// `https://App.example.com/` → `https://app.example.com`, the form a
/// browser's `Origin` header has.
pub fn normalize_origin(origin: &str) -> String {
    origin.trim().trim_end_matches('/').to_ascii_lowercase()
}

/// `*`, or an origin as browsers send it: `scheme://host[:port]`, no path.
fn check_origin(origin: &str) -> Result<(), String> {
    if origin == "*" {
        return Ok(());
    }
    let normalized = normalize_origin(origin);
    let url = url::Url::parse(&normalized)
        .map_err(|e| format!("`{origin}` is not an origin like https://app.example.com ({e})"))?;
    let rebuilt = url.origin().ascii_serialization();
    if !matches!(url.scheme(), "http" | "https") || rebuilt != normalized {
        return Err(format!(
            "`{origin}` is not an origin like https://app.example.com (scheme, host and port only)"
        ));
    }
    Ok(())
}

fn apply_env_override(table: &mut toml::Table, var: &str, raw: &str) -> Result<(), ConfigError> {
    let path: Vec<String> = var["PUSHGATE_".len()..]
        .split("__")
        .map(|p| p.to_ascii_lowercase())
        .collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(ConfigError::invalid(var, "malformed variable name"));
    }
    let value = env_value(raw);
    let mut node = table;
    for part in &path[..path.len() - 1] {
        let entry = node
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .ok_or_else(|| ConfigError::invalid(var, format!("`{part}` is not a section")))?;
    }
    node.insert(path[path.len() - 1].clone(), value);
    Ok(())
}

fn env_value(raw: &str) -> toml::Value {
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(
            json @ (serde_json::Value::Array(_)
            | serde_json::Value::Object(_)
            | serde_json::Value::Bool(_)
            | serde_json::Value::Number(_)),
        ) => json_to_toml(json),
        _ => toml::Value::String(raw.to_string()),
    }
}

fn json_to_toml(v: serde_json::Value) -> toml::Value {
    use serde_json::Value as J;
    match v {
        J::Null => toml::Value::String(String::new()),
        J::Bool(b) => toml::Value::Boolean(b),
        J::Number(n) => n
            .as_i64()
            .map(toml::Value::Integer)
            .unwrap_or_else(|| toml::Value::Float(n.as_f64().unwrap_or(0.0))),
        J::String(s) => toml::Value::String(s),
        J::Array(a) => toml::Value::Array(a.into_iter().map(json_to_toml).collect()),
        J::Object(o) => {
            toml::Value::Table(o.into_iter().map(|(k, v)| (k, json_to_toml(v))).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(
            Some(&p),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::load(None, Vec::new()).unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.server.heartbeat.0, Duration::from_secs(15));
        assert_eq!(c.server.max_body.0, 1 << 20);
        assert_eq!(c.store.url, "sqlite://pushgate.db");
        assert_eq!(c.delivery.retry_schedule.len(), 8);
        assert!(c.auth.is_development());
    }

    #[test]
    fn durations_and_sizes_parse() {
        let c = load_str(
            "[server]\nheartbeat = \"250ms\"\nmax_body = \"2MiB\"\n[store]\nretention = \"2h\"\ndedupe_window = \"7d\"",
            &[],
        )
        .unwrap();
        assert_eq!(c.server.heartbeat.0, Duration::from_millis(250));
        assert_eq!(c.server.max_body.0, 2 << 20);
        assert_eq!(c.store.retention.0, Duration::from_secs(7200));
        assert_eq!(c.store.dedupe_window.0, Duration::from_secs(7 * 86400));
    }

    #[test]
    fn environment_overrides_the_file_with_json_lists() {
        let c = load_str(
            "[server]\nlisten = \"127.0.0.1:1\"",
            &[
                ("PUSHGATE_SERVER__LISTEN", "127.0.0.1:9999"),
                ("PUSHGATE_AUTH__PUBLISH_KEYS", "[\"pk_1\",\"pk_2\"]"),
                ("PUSHGATE_LIMITS__STREAMS_PER_CLIENT", "7"),
                ("PUSHGATE_TOKEN", "ey.."),
                ("OTHER", "x"),
                ("PUSHGATE_LOG", "debug"),
            ],
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:9999");
        assert_eq!(c.auth.publish_keys, vec!["pk_1", "pk_2"]);
        assert_eq!(c.limits.streams_per_client, 7);
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_str("[server]\nheartbeat = \"soon\"", &[]).unwrap_err();
        assert!(e.to_string().contains("server.heartbeat"), "{e}");
        let e = load_str("[server]\nlisten = \"nowhere\"", &[]).unwrap_err();
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = load_str("[server]\nlistn = \"x\"", &[]).unwrap_err();
        assert!(e.to_string().contains("listn"), "{e}");
        let e = load_str("[store]\nurl = \"mysql://x\"", &[]).unwrap_err();
        assert!(e.to_string().contains("store.url"), "{e}");
        let e = load_str("not toml = = 1", &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }), "{e}");
    }

    #[test]
    fn auth_and_cors_settings_are_checked() {
        let ok = load_str(
            "[server]\ncors_origins = [\"https://app.example.com\", \"http://localhost:3000/\"]\ntrusted_proxies = [\"10.0.0.0/8\", \"127.0.0.1\"]\n[auth]\npublic_channels = [\"prices.*\", \"news\"]",
            &[],
        )
        .unwrap();
        assert_eq!(ok.server.trusted_proxies().unwrap().len(), 2);
        let e = load_str("[server]\ncors_origins = [\"https://a.com/path\"]", &[]).unwrap_err();
        assert!(e.to_string().contains("server.cors_origins[0]"), "{e}");
        let e = load_str("[server]\ncors_origins = [\"*\", \"https://a.com\"]", &[]).unwrap_err();
        assert!(e.to_string().contains("only entry"), "{e}");
        let e = load_str("[server]\ncors_origins = [\"a.com\"]", &[]).unwrap_err();
        assert!(e.to_string().contains("server.cors_origins[0]"), "{e}");
        let e = load_str("[server]\ntrusted_proxies = [\"proxy\"]", &[]).unwrap_err();
        assert!(e.to_string().contains("server.trusted_proxies[0]"), "{e}");
        let e = load_str("[auth]\npublic_channels = [\"a*b\"]", &[]).unwrap_err();
        assert!(e.to_string().contains("auth.public_channels[0]"), "{e}");
        let e = load_str("[auth]\njwt_secret = \"\"", &[]).unwrap_err();
        assert!(e.to_string().contains("auth.jwt_secret"), "{e}");
    }

    #[test]
    fn debug_output_hides_secrets() {
        let c = load_str(
            "[auth]\njwt_secret = \"SECRET_A\"\npublish_keys = [\"SECRET_B\"]\nadmin_keys = [\"SECRET_C\"]",
            &[],
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("SECRET_"), "{shown}");
    }

    #[test]
    fn durations_are_bounded() {
        assert!(Dur::parse("100y").is_err());
        assert!(Dur::parse("99y").is_ok());
        let e = load_str("[server]\nheartbeat = \"100000000000000000m\"", &[]).unwrap_err();
        assert!(e.to_string().contains("server.heartbeat"), "{e}");
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(ByteSize::parse("1MiB").unwrap().0, 1 << 20);
        assert_eq!(ByteSize::parse("64kB").unwrap().0, 64_000);
        assert_eq!(ByteSize::parse("100").unwrap().0, 100);
        assert!(ByteSize::parse("1XB").is_err());
        assert!(ByteSize::parse("lots").is_err());
    }
}
