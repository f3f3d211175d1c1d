//! Checks every request passes before a route sees it: what kind of body it
//! sends, and — in development mode, where no key protects anything — who
//! sent it (`Origin`) and to which name (`Host`).
//!
//! Invariants:
//! - in every mode, a request that carries a body to any route but
//!   `/webhooks/{source}` must say `Content-Type: application/json` (or a
//!   `+json` type), else 415 `unsupported_media_type`. A web page can send a
//!   cross-site "simple" request only as `text/plain`, form data or a bare
//!   blob, so no such request reaches a JSON handler. Webhooks are exempt:
//!   providers choose their content type (GitHub posts forms) and the
//!   signature, not the type, is what authenticates them;
//! - in development mode (no keys), a request that changes state (any method
//!   but GET, HEAD and OPTIONS, and every WebSocket upgrade) from a browser
//!   page of another origin is refused with 403 `forbidden_origin`. Allowed:
//!   no `Origin` (curl, backends), the server's own origin, loopback pages
//!   (`http://localhost:3000`), and the origins in `server.cors_origins`;
//! - in development mode on loopback, `Host` must be a loopback name or
//!   address (`localhost`, `*.localhost`, `127.0.0.0/8`, `[::1]`), else 421
//!   `misdirected_request`: a DNS-rebinding page reaches us under its own
//!   name, and is refused before it can read anything. (With `--insecure`
//!   the operator chose other names; nothing is checked.) The lean SSE path
//!   calls [`check_host`] itself.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode, header};
use http_body::Body as _;

use super::error::ApiError;
use crate::AppState;
use crate::config::Config;

/// Routes whose bodies are not ours to type.
const ANY_BODY_ROUTES: &[&str] = &["/webhooks/{source}"];

/// Middleware running [`check`] on every routed request.
pub async fn guard(State(app): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str());
    let has_body = req.body().size_hint().exact() != Some(0);
    if let Err(e) = check(&app.config, req.method(), route, req.headers(), has_body) {
        return e.into_response();
    }
    next.run(req).await
}

/// All of this module's checks, in the order a client should fix them:
/// the name it used, where it comes from, then what it sends.
pub fn check(
    config: &Config,
    method: &Method,
    route: Option<&str>,
    headers: &HeaderMap,
    has_body: bool,
) -> Result<(), ApiError> {
    check_host(config, headers)?;
    if config.auth.is_development() && changes_state(method, headers) {
        check_origin(config, headers)?;
    }
    if has_body && route.is_some_and(|r| !ANY_BODY_ROUTES.contains(&r)) {
        check_json(headers)?;
    }
    Ok(())
}

/// Development mode on loopback: `Host` must name the loopback interface.
/// A request without `Host` (HTTP/1.0) comes from no browser and passes.
pub fn check_host(config: &Config, headers: &HeaderMap) -> Result<(), ApiError> {
    if !config.auth.is_development() || config.insecure {
        return Ok(());
    }
    let Some(host) = headers.get(header::HOST) else {
        return Ok(());
    };
    let shown = String::from_utf8_lossy(host.as_bytes());
    let ok = host
        .to_str()
        .ok()
        .and_then(split_host)
        .is_some_and(is_loopback_host);
    if ok {
        return Ok(());
    }
    let shown: String = shown
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    Err(ApiError::new(
        StatusCode::MISDIRECTED_REQUEST,
        "misdirected_request",
        format!(
            "development mode answers only to loopback names (localhost, 127.0.0.1, [::1]), not `{shown}`"
        ),
    ))
}

/// A browser page of another origin may not change state in development mode.
pub fn check_origin(config: &Config, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin
        .to_str()
        .map(crate::auth::normalize_origin)
        .unwrap_or_default();
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    let same = authority.is_some_and(|a| {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|h| h.trim().eq_ignore_ascii_case(a))
    });
    let loopback = authority.and_then(split_host).is_some_and(is_loopback_host);
    let listed = config
        .server
        .cors_origins
        .iter()
        .any(|o| o != "*" && crate::auth::normalize_origin(o) == origin);
    if same || loopback || listed {
        return Ok(());
    }
    let shown: String = origin
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden_origin",
        format!(
            "development mode does not let a page from `{shown}` change anything (list it in server.cors_origins to allow it)"
        ),
    ))
}

/// The body must be JSON.
pub fn check_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let essence = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match essence.as_deref() {
        Some(t)
            if t == "application/json"
                || (t.starts_with("application/") && t.ends_with("+json")) =>
        {
            Ok(())
        }
        other => {
            let shown: String = other
                .unwrap_or("none")
                .chars()
                .filter(|c| !c.is_control())
                .take(100)
                .collect();
            Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("the body must be sent as Content-Type: application/json (got `{shown}`)"),
            ))
        }
    }
}

/// Methods that change state, and WebSocket upgrades (a page can open a
/// socket to any origin; only the server can refuse it).
fn changes_state(method: &Method, headers: &HeaderMap) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
        || headers.contains_key(header::UPGRADE)
}

/// The host part of a `Host` header or an origin's authority: `name`,
/// `name:port`, `[v6]` or `[v6]:port`. `None` if it is none of those.
fn split_host(authority: &str) -> Option<&str> {
    let a = authority.trim();
    if let Some(rest) = a.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        return (after.is_empty() || port_ok(after.strip_prefix(':')?)).then_some(v6);
    }
    match a.rsplit_once(':') {
        Some((host, port)) => port_ok(port).then_some(host),
        None => Some(a),
    }
}

fn port_ok(port: &str) -> bool {
    !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

/// `localhost`, `*.localhost` (browsers resolve these to loopback
/// themselves, so no DNS answer can move them), or a loopback address.
fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    if host == "localhost" || host.ends_with(".localhost") {
        return true;
    }
    host.parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> Config {
        Config::load(None, Vec::new()).unwrap()
    }

    fn keyed() -> Config {
        let mut c = dev();
        c.auth.publish_keys = vec!["pk".into()];
        c
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn code(r: Result<(), ApiError>) -> Option<&'static str> {
        r.err().map(|e| e.code)
    }

    #[test]
    fn loopback_names() {
        for ok in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.",
            "app.localhost:3000",
            "127.0.0.1",
            "127.1.2.3:80",
            "[::1]:8080",
            "[::ffff:127.0.0.1]",
        ] {
            assert!(split_host(ok).is_some_and(is_loopback_host), "{ok}");
        }
        for bad in [
            "attacker.example:8080",
            "localhost.attacker.example",
            "10.0.0.1",
            "[::2]",
            "127.0.0.1:80:80",
            "[::1]x",
            "localhost:",
            "",
        ] {
            assert!(!split_host(bad).is_some_and(is_loopback_host), "{bad}");
        }
    }

    #[test]
    fn host_is_checked_only_in_development_on_loopback() {
        let evil = headers(&[("host", "attacker.example:8080")]);
        assert_eq!(code(check_host(&dev(), &evil)), Some("misdirected_request"));
        assert_eq!(code(check_host(&keyed(), &evil)), None);
        let mut insecure = dev();
        insecure.insecure = true;
        assert_eq!(code(check_host(&insecure, &evil)), None);
        assert_eq!(
            code(check_host(&dev(), &headers(&[("host", "127.0.0.1:8080")]))),
            None
        );
        assert_eq!(code(check_host(&dev(), &HeaderMap::new())), None);
    }

    #[test]
    fn origins_in_development() {
        let c = dev();
        let at = |origin: &str| headers(&[("host", "127.0.0.1:8080"), ("origin", origin)]);
        assert_eq!(
            code(check_origin(&c, &at("https://evil.example"))),
            Some("forbidden_origin")
        );
        assert_eq!(
            code(check_origin(&c, &at("null"))),
            Some("forbidden_origin")
        );
        assert_eq!(code(check_origin(&c, &at("http://127.0.0.1:8080"))), None);
        assert_eq!(code(check_origin(&c, &at("http://localhost:3000"))), None);
        assert_eq!(code(check_origin(&c, &headers(&[("host", "x")]))), None);
        let mut listed = dev();
        listed.server.cors_origins = vec!["https://app.example.com/".into()];
        assert_eq!(
            code(check_origin(&listed, &at("https://app.example.com"))),
            None
        );
        let mut any = dev();
        any.server.cors_origins = vec!["*".into()];
        assert_eq!(
            code(check_origin(&any, &at("https://evil.example"))),
            Some("forbidden_origin")
        );
    }

    #[test]
    fn only_state_changes_are_checked_for_origin() {
        let c = dev();
        let evil = headers(&[
            ("host", "127.0.0.1:8080"),
            ("origin", "https://evil.example"),
        ]);
        assert_eq!(
            code(check(&c, &Method::GET, Some("/v1/events"), &evil, false)),
            None
        );
        assert_eq!(
            code(check(&c, &Method::POST, Some("/v1/publish"), &evil, false)),
            Some("forbidden_origin")
        );
        let mut upgrade = evil.clone();
        upgrade.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert_eq!(
            code(check(&c, &Method::GET, Some("/v1/ws"), &upgrade, false)),
            Some("forbidden_origin")
        );
        assert_eq!(
            code(check(
                &keyed(),
                &Method::POST,
                Some("/v1/publish"),
                &evil,
                false
            )),
            None
        );
    }

    #[test]
    fn json_bodies_everywhere_but_webhooks() {
        let c = keyed();
        let text = headers(&[("content-type", "text/plain")]);
        let json = headers(&[("content-type", "Application/JSON; charset=utf-8")]);
        let post = |h: &HeaderMap, route: &str, body: bool| {
            code(check(&c, &Method::POST, Some(route), h, body))
        };
        assert_eq!(
            post(&text, "/v1/publish", true),
            Some("unsupported_media_type")
        );
        assert_eq!(
            post(&HeaderMap::new(), "/v1/publish", true),
            Some("unsupported_media_type")
        );
        assert_eq!(post(&json, "/v1/publish", true), None);
        assert_eq!(
            post(
                &headers(&[("content-type", "application/merge-patch+json")]),
                "/v1/endpoints/{id}",
                true
            ),
            None
        );
        assert_eq!(
            post(&text, "/v1/publish", false),
            None,
            "no body, nothing to type"
        );
        assert_eq!(post(&text, "/webhooks/{source}", true), None);
        assert_eq!(
            code(check(&c, &Method::POST, None, &text, true)),
            None,
            "404 decides"
        );
    }
}
