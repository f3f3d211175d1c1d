//! Auth (contract section 4) and limits (section 5) against a real server:
//! channel isolation on every transport, token checks, carriers, keys, CORS,
//! rate limits, stream caps, token expiry, development mode, and secrets
//! kept out of the logs of the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pushgate::config::{Config, Dur};
use reqwest::RequestBuilder;
use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(10);
const SECRET: &str = "test-secret-0123456789-abcdefghijklmnop";
const PUBLISH_KEY: &str = "pk_test_publish_key_1";
const PUBLISH_KEY_2: &str = "pk_test_publish_key_2";
const ADMIN_KEY: &str = "ak_test_admin_key_1";

fn now() -> u64 {
    pushgate::auth::unix_now()
}

/// Keys, a secret, public channels; the failed-check limit off so tests that
/// send many bad tokens see 401s, not 429s (one test turns it on).
fn secured(c: &mut Config) {
    c.auth.jwt_secret = Some(SECRET.into());
    c.auth.publish_keys = vec![PUBLISH_KEY.into(), PUBLISH_KEY_2.into()];
    c.auth.admin_keys = vec![ADMIN_KEY.into()];
    c.auth.public_channels = vec!["prices.*".into(), "news".into()];
    c.limits.invalid_per_client = 0;
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("sign")
}

fn hs256(secret: &str, claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(secret.as_bytes()),
        claims,
    )
}

fn claims(sub: &str, subscribe: &[&str], publish: &[&str]) -> Value {
    json!({"sub": sub, "exp": now() + 600, "iat": now(),
           "pushgate": {"subscribe": subscribe, "publish": publish}})
}

/// A token for `user:{n}`: read and write that channel only.
fn user_token(n: u32) -> String {
    let ch = format!("user:{n}");
    hs256(SECRET, &claims(&n.to_string(), &[&ch], &[&ch]))
}

/// Status and JSON body (or `Null`).
async fn send(req: RequestBuilder) -> (u16, Value) {
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, body)
}

async fn publish_with(
    s: &TestServer,
    bearer: Option<&str>,
    channel: &str,
    data: Value,
) -> (u16, Value) {
    let mut req = s
        .client
        .post(s.url("/v1/publish"))
        .json(&json!({"channel": channel, "type": "t", "data": data}));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    send(req).await
}

fn sse_request(s: &TestServer, query: &str) -> RequestBuilder {
    s.client
        .get(s.url(&format!("/v1/stream?{query}")))
        .header("accept", "text/event-stream")
        .timeout(Duration::from_secs(3600))
}

async fn open_sse(req: RequestBuilder) -> Result<SseClient, (u16, Value)> {
    let r = req.send().await.expect("SSE request");
    if r.status() == 200 {
        Ok(SseClient::from_response(r))
    } else {
        let status = r.status().as_u16();
        Err((status, r.json().await.unwrap_or(Value::Null)))
    }
}

fn poll(s: &TestServer, query: &str) -> RequestBuilder {
    s.client.get(s.url(&format!("/v1/events?{query}")))
}

fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "{got:?}");
    assert_eq!(got.1["error"]["code"], code, "{got:?}");
}

#[tokio::test]
async fn user_1_never_sees_user_2_on_any_transport_but_sees_its_own() {
    let s = TestServer::with(secured).await;
    let t1 = user_token(1);

    // SSE: user 2's channel, alone or beside user 1's, is refused whole.
    for q in [
        format!("channel=user:2&token={t1}"),
        format!("channel=user:1&channel=user:2&token={t1}"),
        format!("channel=user:1,user:2&token={t1}"),
        format!("channel=user:2&since=earliest&token={t1}"),
    ] {
        let refused = open_sse(sse_request(&s, &q)).await.err().expect(&q);
        assert_error(&refused, 403, "forbidden");
    }
    // Polling and long-polling: likewise.
    for q in [
        format!("channel=user:2&after=earliest&token={t1}"),
        format!("channel=user:1&channel=user:2&after=earliest&token={t1}"),
        format!("channel=user:2&wait=1&token={t1}"),
    ] {
        assert_error(&send(poll(&s, &q)).await, 403, "forbidden");
    }
    // Publishing to user 2 with user 1's token, alone or in a batch.
    assert_error(
        &publish_with(&s, Some(&t1), "user:2", json!("forged")).await,
        403,
        "forbidden",
    );
    let batch = send(s.client.post(s.url("/v1/publish")).bearer_auth(&t1).json(
        &json!({"events": [
                {"channel": "user:1", "type": "t", "data": "ok"},
                {"channel": "user:2", "type": "t", "data": "forged"}]}),
    ))
    .await;
    assert_error(&batch, 403, "forbidden");

    // The positive control: user 1's stream is open and gets its own events,
    // interleaved in the log with user 2's, and nothing else.
    let mut sse = open_sse(sse_request(&s, &format!("channel=user:1&token={t1}")))
        .await
        .expect("user 1 may read user:1");
    let mut expected = Vec::new();
    for round in 0..3 {
        let (st, _) = publish_with(&s, Some(PUBLISH_KEY), "user:2", json!({"secret": round})).await;
        assert_eq!(st, 200);
        let (st, r) = publish_with(&s, Some(PUBLISH_KEY), "user:1", json!({"mine": round})).await;
        assert_eq!(st, 200);
        expected.push(r["ids"][0].as_str().unwrap().to_string());
        // User 1 publishing to its own channel with its token works too.
        let (st, r) = publish_with(&s, Some(&t1), "user:1", json!({"own": round})).await;
        assert_eq!(st, 200, "{r}");
        expected.push(r["ids"][0].as_str().unwrap().to_string());
    }
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        let ev = sse.next_timeout(T).await.expect("event");
        let env = ev.json();
        assert_eq!(env["channel"], "user:1", "leaked: {env}");
        assert!(!ev.data.contains("secret"), "leaked: {}", ev.data);
        got.push(ev.id.unwrap());
    }
    assert_eq!(
        got, expected,
        "user 1 gets exactly its own events, in order"
    );

    // Polling the whole history as user 1: only user 1's events.
    let (st, page) = send(poll(
        &s,
        &format!("channel=user:1&after=earliest&token={t1}"),
    ))
    .await;
    assert_eq!(st, 200);
    let ids: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert_eq!(e["channel"], "user:1", "leaked: {e}");
            e["id"].as_str().unwrap()
        })
        .collect();
    assert_eq!(ids, expected);

    // User 2's own token reads user 2's events (they were stored).
    let t2 = user_token(2);
    let (st, page) = send(poll(
        &s,
        &format!("channel=user:2&after=earliest&token={t2}"),
    ))
    .await;
    assert_eq!(st, 200);
    assert_eq!(page["events"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn private_channels_need_a_token_public_ones_do_not() {
    let s = TestServer::with(secured).await;
    // No token on a private channel: 401 on SSE, polling and publish.
    assert_error(
        &open_sse(sse_request(&s, "channel=user:1"))
            .await
            .err()
            .unwrap(),
        401,
        "unauthorized",
    );
    assert_error(
        &send(poll(&s, "channel=user:1&after=earliest")).await,
        401,
        "unauthorized",
    );
    assert_error(
        &publish_with(&s, None, "news", json!(1)).await,
        401,
        "unauthorized",
    );
    // A public channel beside a private one does not open the private one.
    assert_error(
        &open_sse(sse_request(&s, "channel=news&channel=user:1"))
            .await
            .err()
            .unwrap(),
        401,
        "unauthorized",
    );

    // Public channels: no token at all.
    let mut sse = open_sse(sse_request(&s, "channel=news&channel=prices.AAPL"))
        .await
        .expect("public channels are open");
    let (st, r) = publish_with(&s, Some(PUBLISH_KEY), "prices.AAPL", json!(187.5)).await;
    assert_eq!(st, 200);
    let ev = sse.next_timeout(T).await.unwrap();
    assert_eq!(ev.id.as_deref(), r["ids"][0].as_str());
    let (st, page) = send(poll(&s, "channel=prices.AAPL&after=earliest")).await;
    assert_eq!(st, 200);
    assert_eq!(page["events"].as_array().unwrap().len(), 1);
    // A bad token is refused even where none is needed.
    assert_error(
        &send(poll(&s, "channel=news&token=not-a-jwt")).await,
        401,
        "unauthorized",
    );
}

/// Generates keys with the `openssl` CLI (installed by scripts/test.sh).
struct Keys {
    dir: tempfile::TempDir,
}

impl Keys {
    fn new() -> Keys {
        Keys {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    /// Writes `{name}.pem` (private, PKCS#8) and `{name}.pub.pem`.
    fn generate(&self, name: &str, genpkey_args: &[&str]) {
        let private = self.path(&format!("{name}.pem"));
        let public = self.path(&format!("{name}.pub.pem"));
        let mut args = vec!["genpkey"];
        args.extend_from_slice(genpkey_args);
        args.extend_from_slice(&["-out", private.to_str().unwrap()]);
        openssl(&args);
        openssl(&[
            "pkey",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ]);
    }
    fn rsa(&self, name: &str) {
        self.generate(
            name,
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        );
    }
    fn ec(&self, name: &str, curve: &str) {
        let opt = format!("ec_paramgen_curve:{curve}");
        self.generate(name, &["-algorithm", "EC", "-pkeyopt", &opt]);
    }
    fn private(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(&format!("{name}.pem"))).unwrap()
    }
    fn public(&self, name: &str) -> PathBuf {
        self.path(&format!("{name}.pub.pem"))
    }
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("the `openssl` CLI is needed to generate test keys (scripts/test.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn b64url(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn bad_tokens_are_401_and_good_ones_work_for_every_algorithm() {
    let keys = Keys::new();
    keys.rsa("rsa");
    keys.rsa("rsa_other");
    keys.ec("ec", "P-256");
    keys.ec("ec_other", "P-256");
    let rsa = EncodingKey::from_rsa_pem(&keys.private("rsa")).unwrap();
    let rsa_other = EncodingKey::from_rsa_pem(&keys.private("rsa_other")).unwrap();
    let ec = EncodingKey::from_ec_pem(&keys.private("ec")).unwrap();
    let ec_other = EncodingKey::from_ec_pem(&keys.private("ec_other")).unwrap();
    let rsa_public_pem = std::fs::read(keys.public("rsa")).unwrap();
    let good = claims("1", &["user:1"], &[]);

    let check = |s: &TestServer, token: String, want: u16, what: &'static str| {
        let req = poll(s, &format!("channel=user:1&token={token}"));
        async move {
            let got = send(req).await;
            assert_eq!(got.0, want, "{what}: {got:?}");
            if want == 401 {
                assert_eq!(got.1["error"]["code"], "unauthorized", "{what}");
            }
        }
    };

    // HS256 configuration.
    let hs = TestServer::with(secured).await;
    check(&hs, hs256(SECRET, &good), 200, "valid HS256").await;
    let mut expired = good.clone();
    expired["exp"] = json!(now() - 60);
    check(&hs, hs256(SECRET, &expired), 401, "expired").await;
    let mut early = good.clone();
    early["nbf"] = json!(now() + 600);
    check(&hs, hs256(SECRET, &early), 401, "not yet valid").await;
    let mut recent_nbf = good.clone();
    recent_nbf["nbf"] = json!(now() - 1);
    check(&hs, hs256(SECRET, &recent_nbf), 200, "nbf passed").await;
    check(
        &hs,
        hs256("another-secret-0123456789-abcdefghij", &good),
        401,
        "forged",
    )
    .await;
    // Tampered: user 1's signed token with its claims swapped for user 2's.
    let signed = hs256(SECRET, &good);
    let parts: Vec<&str> = signed.split('.').collect();
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64url(&claims("2", &["user:*"], &[])),
        parts[2]
    );
    check(&hs, tampered, 401, "tampered").await;
    // alg: none, with and without a signature part.
    let none_header = b64url(&json!({"alg": "none", "typ": "JWT"}));
    check(
        &hs,
        format!("{none_header}.{}.", b64url(&good)),
        401,
        "alg none",
    )
    .await;
    check(
        &hs,
        format!("{none_header}.{}.{}", b64url(&good), parts[2]),
        401,
        "alg none with a signature",
    )
    .await;
    check(&hs, "garbage".into(), 401, "not a JWT").await;
    check(
        &hs,
        sign(Algorithm::RS256, &rsa, &good),
        401,
        "RS256 on HS256",
    )
    .await;
    check(
        &hs,
        sign(
            Algorithm::HS384,
            &EncodingKey::from_secret(SECRET.as_bytes()),
            &good,
        ),
        401,
        "HS384 with the right secret",
    )
    .await;

    // RS256 configuration.
    let rs = TestServer::with(|c| {
        secured(c);
        c.auth.jwt_secret = None;
        c.auth.jwt_public_key_file = Some(keys.public("rsa"));
    })
    .await;
    check(&rs, sign(Algorithm::RS256, &rsa, &good), 200, "valid RS256").await;
    check(
        &rs,
        sign(Algorithm::RS256, &rsa_other, &good),
        401,
        "other RSA key",
    )
    .await;
    check(&rs, hs256(SECRET, &good), 401, "HS256 on RS256").await;
    // The classic confusion: HMAC keyed with the server's public key.
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&rsa_public_pem),
        &good,
    );
    check(&rs, confused, 401, "HS256 keyed with the public key").await;
    check(
        &rs,
        sign(Algorithm::ES256, &ec, &good),
        401,
        "ES256 on RS256",
    )
    .await;
    check(
        &rs,
        sign(Algorithm::RS256, &rsa, &expired),
        401,
        "expired RS256",
    )
    .await;

    // ES256 configuration.
    let es = TestServer::with(|c| {
        secured(c);
        c.auth.jwt_secret = None;
        c.auth.jwt_public_key_file = Some(keys.public("ec"));
    })
    .await;
    check(&es, sign(Algorithm::ES256, &ec, &good), 200, "valid ES256").await;
    check(
        &es,
        sign(Algorithm::ES256, &ec_other, &good),
        401,
        "other EC key",
    )
    .await;
    check(
        &es,
        sign(Algorithm::RS256, &rsa, &good),
        401,
        "RS256 on ES256",
    )
    .await;
    check(&es, hs256(SECRET, &good), 401, "HS256 on ES256").await;

    // Both a secret and a public key: each algorithm with its own key only.
    let both = TestServer::with(|c| {
        secured(c);
        c.auth.jwt_public_key_file = Some(keys.public("rsa"));
    })
    .await;
    check(&both, hs256(SECRET, &good), 200, "HS256 beside RS256").await;
    check(
        &both,
        sign(Algorithm::RS256, &rsa, &good),
        200,
        "RS256 beside HS256",
    )
    .await;
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&rsa_public_pem),
        &good,
    );
    check(&both, confused, 401, "HS256 keyed with the public key").await;

    // SSE refuses a bad token the same way.
    let refused = open_sse(sse_request(
        &rs,
        &format!("channel=user:1&token={}", hs256(SECRET, &good)),
    ))
    .await
    .err()
    .unwrap();
    assert_error(&refused, 401, "unauthorized");
}

#[tokio::test]
async fn unusable_key_files_stop_start_up_with_a_reason() {
    let keys = Keys::new();
    keys.ec("p384", "P-384");
    keys.rsa("rsa");
    for (file, want) in [
        (keys.public("p384"), "P-256"),
        (keys.path("rsa.pem"), "private key"),
        (keys.path("missing.pem"), "missing.pem"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = test_config(dir.path());
        secured(&mut c);
        c.auth.jwt_public_key_file = Some(file.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let e = pushgate::serve(listener, c, std::future::pending())
            .await
            .expect_err("a bad key file must stop start-up");
        assert!(
            matches!(e, pushgate::ServeError::Auth(_)) && e.to_string().contains(want),
            "{}: {e}",
            file.display()
        );
    }
}

#[tokio::test]
async fn wildcards_match_the_rest_of_a_name_only() {
    let s = TestServer::with(|c| {
        secured(c);
        c.auth.public_channels.clear();
    })
    .await;
    let t = hs256(SECRET, &claims("w", &["prices.*"], &["chat:*"]));
    for (channel, want) in [
        ("prices.AAPL", 200),
        ("prices.a.b", 200),
        ("pricesX", 403),
        ("prices", 403),
        ("prices.", 403),
        ("xprices.AAPL", 403),
    ] {
        let got = send(poll(&s, &format!("channel={channel}&token={t}"))).await;
        assert_eq!(got.0, want, "subscribe {channel}: {got:?}");
    }
    for (channel, want) in [("chat:room1", 200), ("chat", 403), ("chatroom", 403)] {
        let got = publish_with(&s, Some(&t), channel, json!(1)).await;
        assert_eq!(got.0, want, "publish {channel}: {got:?}");
    }
}

#[tokio::test]
async fn every_token_carrier_works_and_the_cookie_respects_origins() {
    let s = TestServer::with(|c| {
        secured(c);
        c.server.cors_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let t = user_token(1);
    let cookie = format!("theme=dark; pushgate_token={t}");
    let own_origin = format!("http://{}", s.addr);

    // SSE over each carrier: open, and delivering.
    let mut streams = vec![
        open_sse(sse_request(&s, "channel=user:1").bearer_auth(&t))
            .await
            .expect("Authorization: Bearer"),
        open_sse(sse_request(&s, &format!("channel=user:1&token={t}")))
            .await
            .expect("?token="),
        open_sse(sse_request(&s, "channel=user:1").header("cookie", &cookie))
            .await
            .expect("cookie"),
        open_sse(
            sse_request(&s, "channel=user:1")
                .header("cookie", &cookie)
                .header("origin", "https://app.example.com"),
        )
        .await
        .expect("cookie from an allowed origin"),
        open_sse(
            sse_request(&s, "channel=user:1")
                .header("cookie", &cookie)
                .header("origin", &own_origin),
        )
        .await
        .expect("cookie from pushgate's own pages"),
    ];
    let (st, r) = publish_with(&s, Some(PUBLISH_KEY), "user:1", json!("hi")).await;
    assert_eq!(st, 200);
    for sse in &mut streams {
        let ev = sse.next_timeout(T).await.unwrap();
        assert_eq!(ev.id.as_deref(), r["ids"][0].as_str());
    }

    // Polling over each carrier.
    for req in [
        poll(&s, "channel=user:1&after=earliest").bearer_auth(&t),
        poll(&s, &format!("channel=user:1&after=earliest&token={t}")),
        poll(&s, "channel=user:1&after=earliest").header("cookie", &cookie),
    ] {
        let (st, page) = send(req).await;
        assert_eq!(st, 200);
        assert_eq!(page["events"].as_array().unwrap().len(), 1);
    }

    // Another site's page cannot use the cookie: not to read, not to publish.
    assert_error(
        &send(
            poll(&s, "channel=user:1")
                .header("cookie", &cookie)
                .header("origin", "https://evil.example"),
        )
        .await,
        401,
        "unauthorized",
    );
    // (A browser sends a cross-site write without a preflight only as a
    // "simple" type, which every JSON route refuses with 415; the cookie is
    // ignored whatever the type.)
    for content_type in ["text/plain", "application/json"] {
        let forged = send(
            s.client
                .post(s.url("/v1/publish"))
                .header("cookie", &cookie)
                .header("origin", "https://evil.example")
                .header("content-type", content_type)
                .body(r#"{"channel":"user:1","type":"t","data":"csrf"}"#),
        )
        .await;
        let (status, code) = if content_type == "text/plain" {
            (415, "unsupported_media_type")
        } else {
            (401, "unauthorized")
        };
        assert_error(&forged, status, code);
    }
    // The same publish from an allowed origin goes through.
    let allowed = send(
        s.client
            .post(s.url("/v1/publish"))
            .header("cookie", &cookie)
            .header("origin", "https://app.example.com")
            .json(&json!({"channel": "user:1", "type": "t", "data": "ok"})),
    )
    .await;
    assert_eq!(allowed.0, 200, "{allowed:?}");
}

#[tokio::test]
async fn publish_keys_write_admin_keys_do_everything() {
    let s = TestServer::with(secured).await;
    // A publish key publishes anywhere...
    assert_eq!(
        publish_with(&s, Some(PUBLISH_KEY), "user:7", json!(1))
            .await
            .0,
        200
    );
    // ...but reads only public channels.
    assert_error(
        &send(poll(&s, "channel=user:7&after=earliest").bearer_auth(PUBLISH_KEY)).await,
        401,
        "unauthorized",
    );
    assert_eq!(
        send(poll(&s, "channel=news").bearer_auth(PUBLISH_KEY))
            .await
            .0,
        200
    );
    // An admin key publishes and reads any channel.
    assert_eq!(
        publish_with(&s, Some(ADMIN_KEY), "user:7", json!(2))
            .await
            .0,
        200
    );
    let (st, page) = send(poll(&s, "channel=user:7&after=earliest").bearer_auth(ADMIN_KEY)).await;
    assert_eq!(st, 200);
    assert_eq!(page["events"].as_array().unwrap().len(), 2);
    let mut sse = open_sse(sse_request(&s, "channel=user:7&since=earliest").bearer_auth(ADMIN_KEY))
        .await
        .expect("admin SSE");
    assert!(sse.next_timeout(T).await.is_some());
    // The dashboard's EventSource carries it as ?token=; a cookie never does.
    assert_eq!(
        send(poll(&s, &format!("channel=user:7&token={ADMIN_KEY}")))
            .await
            .0,
        200
    );
    assert_error(
        &send(poll(&s, "channel=user:7").header("cookie", format!("pushgate_token={ADMIN_KEY}")))
            .await,
        401,
        "unauthorized",
    );
    // Unknown keys and subscriber tokens without a publish grant.
    assert_error(
        &publish_with(&s, Some("pk_wrong"), "user:7", json!(3)).await,
        401,
        "unauthorized",
    );
    let reader = hs256(SECRET, &claims("7", &["user:7"], &[]));
    assert_error(
        &publish_with(&s, Some(&reader), "user:7", json!(4)).await,
        403,
        "forbidden",
    );
}

fn retry_after(resp: &reqwest::Response) -> u64 {
    resp.headers()
        .get("retry-after")
        .expect("429 carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds")
}

#[tokio::test]
async fn publish_limits_answer_429_and_recover() {
    let s = TestServer::with(|c| {
        secured(c);
        c.limits.publish_per_key = 3;
    })
    .await;
    let publish = |bearer: String| {
        s.client
            .post(s.url("/v1/publish"))
            .bearer_auth(bearer)
            .json(&json!({"channel": "user:1", "type": "t", "data": 1}))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(publish(PUBLISH_KEY.into()).await.unwrap().status(), 200);
    }
    let limited = publish(PUBLISH_KEY.into()).await.unwrap();
    assert_eq!(limited.status(), 429);
    let wait = retry_after(&limited);
    assert!((1..=2).contains(&wait), "Retry-After {wait}");
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Per key, and per token subject.
    assert_eq!(publish(PUBLISH_KEY_2.into()).await.unwrap().status(), 200);
    let alice = hs256(SECRET, &claims("alice", &[], &["user:1"]));
    let alice_again = hs256(SECRET, &claims("alice", &["x"], &["user:*"]));
    let bob = hs256(SECRET, &claims("bob", &[], &["user:1"]));
    for _ in 0..3 {
        assert_eq!(publish(alice.clone()).await.unwrap().status(), 200);
    }
    assert_eq!(
        publish(alice_again).await.unwrap().status(),
        429,
        "a new token for the same subject shares its budget"
    );
    assert_eq!(publish(bob).await.unwrap().status(), 200);
    // A batch larger than the whole budget can never pass: 400, not 429.
    let batch = send(
        s.client
            .post(s.url("/v1/publish"))
            .bearer_auth(PUBLISH_KEY_2)
            .json(&json!({"events": [
                {"channel": "a", "data": 1}, {"channel": "a", "data": 2},
                {"channel": "a", "data": 3}, {"channel": "a", "data": 4}]})),
    )
    .await;
    assert_error(&batch, 400, "batch_too_large");
    // Recovers after Retry-After.
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(publish(PUBLISH_KEY.into()).await.unwrap().status(), 200);
}

#[tokio::test]
async fn failed_checks_answer_429_but_valid_requests_always_pass() {
    let s = TestServer::with(|c| {
        secured(c);
        c.limits.invalid_per_client = 3;
    })
    .await;
    let bad = || {
        s.client
            .post(s.url("/v1/publish"))
            .bearer_auth("pk_guess")
            .json(&json!({"channel": "a", "data": 1}))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(bad().await.unwrap().status(), 401);
    }
    let limited = bad().await.unwrap();
    assert_eq!(limited.status(), 429);
    let wait = retry_after(&limited);
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    // Requests that pass their checks are never refused for it.
    for _ in 0..5 {
        assert_eq!(
            publish_with(&s, Some(PUBLISH_KEY), "a", json!(1)).await.0,
            200
        );
        assert_eq!(send(poll(&s, "channel=news")).await.0, 200);
    }
    tokio::time::sleep(Duration::from_secs(wait)).await;
    assert_eq!(bad().await.unwrap().status(), 401, "recovered");
    // Bad tokens on reads count against the same budget.
    let mut refused_first = None;
    for i in 0..10 {
        let r = poll(&s, "channel=user:1&token=bad").send().await.unwrap();
        if r.status() == 429 {
            refused_first = Some(i);
            break;
        }
        assert_eq!(r.status(), 401);
    }
    assert!(
        refused_first.is_some_and(|i| i <= 4),
        "limited after a few: {refused_first:?}"
    );
}

#[tokio::test]
async fn streams_per_client_caps_sse_and_long_polls() {
    let s = TestServer::with(|c| {
        secured(c);
        c.limits.streams_per_client = 2;
        c.server.heartbeat = Dur(Duration::from_millis(200));
    })
    .await;
    let first = open_sse(sse_request(&s, "channel=news"))
        .await
        .expect("1st");
    let _second = open_sse(sse_request(&s, "channel=news"))
        .await
        .expect("2nd");
    let r = sse_request(&s, "channel=news").send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(retry_after(&r) >= 1);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_streams");
    let r = poll(&s, "channel=news&wait=5").send().await.unwrap();
    assert_eq!(r.status(), 429, "a long-poll is a stream");
    assert_eq!(
        send(poll(&s, "channel=news")).await.0,
        200,
        "a plain poll is not"
    );

    // Closing a stream gives its slot back (noticed by the next heartbeat).
    drop(first);
    let mut third = None;
    for _ in 0..50 {
        match open_sse(sse_request(&s, "channel=news")).await {
            Ok(c) => {
                third = Some(c);
                break;
            }
            Err((429, _)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("{e:?}"),
        }
    }
    let third = third.expect("the slot came back");
    let r = sse_request(&s, "channel=news").send().await.unwrap();
    assert_eq!(r.status(), 429, "at the cap again");

    // A long-poll that is waiting holds a slot too.
    drop(third);
    let mut waiting = None;
    for _ in 0..50 {
        let req = poll(&s, "channel=news&wait=2");
        let mut task = tokio::spawn(async move { req.send().await.unwrap().status() });
        match tokio::time::timeout(Duration::from_millis(500), &mut task).await {
            // Refused at once: the closed stream's slot is not back yet.
            Ok(status) => {
                assert_eq!(status.unwrap(), 429);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => {
                waiting = Some(task);
                break;
            }
        }
    }
    let waiting = waiting.expect("a long-poll got the freed slot");
    let r = sse_request(&s, "channel=news").send().await.unwrap();
    assert_eq!(
        r.status(),
        429,
        "the waiting long-poll holds the second slot"
    );
    assert_eq!(waiting.await.unwrap(), 200);
    assert!(
        eventually(|| async {
            sse_request(&s, "channel=news")
                .send()
                .await
                .unwrap()
                .status()
                == 200
        })
        .await,
        "and gives it back when it returns"
    );
}

/// Retries `check` for up to 5 s.
async fn eventually<F, Fut>(check: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn client_addresses_come_from_trusted_proxies_only() {
    let through_proxy = TestServer::with(|c| {
        secured(c);
        c.limits.streams_per_client = 1;
        c.server.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let from =
        |s: &TestServer, xff: &str| sse_request(s, "channel=news").header("x-forwarded-for", xff);
    let _a = open_sse(from(&through_proxy, "198.51.100.1"))
        .await
        .expect("client A");
    let _b = open_sse(from(&through_proxy, "198.51.100.2"))
        .await
        .expect("client B");
    let again = open_sse(from(&through_proxy, "203.0.113.9, 198.51.100.1")).await;
    assert_eq!(again.err().map(|e| e.0), Some(429), "client A again");

    let direct = TestServer::with(|c| {
        secured(c);
        c.limits.streams_per_client = 1;
    })
    .await;
    let _a = open_sse(from(&direct, "198.51.100.1"))
        .await
        .expect("first");
    let spoofed = open_sse(from(&direct, "198.51.100.2")).await;
    assert_eq!(
        spoofed.err().map(|e| e.0),
        Some(429),
        "X-Forwarded-For from an untrusted peer is ignored"
    );
}

#[tokio::test]
async fn an_sse_stream_ends_when_its_token_expires() {
    let s = TestServer::with(|c| {
        secured(c);
        c.server.heartbeat = Dur(Duration::from_millis(200));
    })
    .await;
    let mut short = claims("1", &["user:1"], &[]);
    let exp = now() + 2;
    short["exp"] = json!(exp);
    let mut expiring = open_sse(sse_request(
        &s,
        &format!("channel=user:1&token={}", hs256(SECRET, &short)),
    ))
    .await
    .expect("valid for now");
    let mut lasting = open_sse(sse_request(
        &s,
        &format!("channel=user:1&token={}", user_token(1)),
    ))
    .await
    .expect("valid for 10 minutes");

    // Both work before expiry.
    publish_with(&s, Some(PUBLISH_KEY), "user:1", json!("before")).await;
    assert!(expiring.next_timeout(T).await.is_some());
    assert!(lasting.next_timeout(T).await.is_some());

    let ev = expiring.next_timeout(T).await.expect("an expiry notice");
    assert_eq!(ev.event.as_deref(), Some("pushgate.expired"));
    assert_eq!(ev.json()["reason"], "token_expired");
    assert!(now() >= exp, "not before the token's exp");
    assert!(
        expiring.next_timeout(T).await.is_none(),
        "the stream is closed"
    );

    // The other stream goes on.
    let (_, r) = publish_with(&s, Some(PUBLISH_KEY), "user:1", json!("after")).await;
    let ev = lasting.next_timeout(T).await.unwrap();
    assert_eq!(ev.id.as_deref(), r["ids"][0].as_str());
}

#[tokio::test]
async fn development_mode_is_loopback_only_unless_insecure() {
    // Refused on every interface without keys...
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
    let e = pushgate::serve(listener, test_config(dir.path()), std::future::pending())
        .await
        .expect_err("development mode on 0.0.0.0");
    assert!(matches!(e, pushgate::ServeError::InsecureListen(_)), "{e}");
    assert!(e.to_string().contains("--insecure"), "{e}");

    // ...allowed with `insecure`, and with keys.
    for insecure in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        if insecure {
            config.insecure = true;
        } else {
            secured(&mut config);
        }
        let listener = tokio::net::TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(pushgate::serve(listener, config, async {
            let _ = rx.await;
        }));
        let client = reqwest::Client::new();
        let up = eventually(|| async {
            client
                .get(format!("http://127.0.0.1:{port}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(up, "insecure={insecure}: serving");
        let publish = client
            .post(format!("http://127.0.0.1:{port}/v1/publish"))
            .json(&json!({"channel": "user:1", "data": 1}))
            .send()
            .await
            .unwrap()
            .status();
        // Development mode needs no key; with keys, one is needed.
        assert_eq!(publish, if insecure { 200 } else { 401 });
        let _ = tx.send(());
        server.await.unwrap().expect("clean stop");
    }

    // The binary refuses before printing a banner, with exit code 2.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .arg("serve")
        .env_clear()
        .env("PUSHGATE_SERVER__LISTEN", "0.0.0.0:0")
        .env(
            "PUSHGATE_STORE__URL",
            format!("sqlite://{}/log.db", dir.path().display()),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
}

/// The real binary on an ephemeral port, its stderr going to a file.
struct Binary {
    child: std::process::Child,
    base: String,
    stderr: PathBuf,
}

impl Binary {
    fn start(dir: &Path, args: &[&str], env: &[(&str, String)]) -> Binary {
        let stderr = dir.join("stderr.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pushgate"));
        cmd.args(args)
            .env_clear()
            .env("PUSHGATE_SERVER__LISTEN", "127.0.0.1:0")
            .env(
                "PUSHGATE_STORE__URL",
                format!("sqlite://{}/log.db", dir.display()),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start pushgate");
        let stdout = child.stdout.take().unwrap();
        // Keep reading stdout to the end, so the banner never hits a closed pipe.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(rest) = line.strip_prefix("pushgate listening on ") {
                    let _ = tx.send(rest.trim().to_string());
                }
            }
        });
        let base = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("pushgate printed its address");
        Binary {
            child,
            base,
            stderr,
        }
    }

    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.stderr).unwrap()
    }
}

#[tokio::test]
async fn secrets_never_appear_in_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let valid = user_token(1);
    let bin = Binary::start(
        dir.path(),
        &["serve"],
        &[
            ("PUSHGATE_LOG", "debug,tower_http=debug".into()),
            ("PUSHGATE_AUTH__JWT_SECRET", SECRET.into()),
            (
                "PUSHGATE_AUTH__PUBLISH_KEYS",
                format!("[\"{PUBLISH_KEY}\"]"),
            ),
        ],
    );
    let client = reqwest::Client::new();
    let url = |p: &str| format!("{}{p}", bin.base);
    let wait_ready = eventually(|| async {
        client
            .get(url("/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(wait_ready);

    let r = client
        .get(url("/v1/stream?channel=x&token=SECRETVALUE"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(url(&format!("/v1/events?channel=user:1&token={valid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let sse = client
        .get(url(&format!("/v1/stream?channel=user:1&token={valid}")))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let r = client
        .post(url("/v1/publish"))
        .bearer_auth(PUBLISH_KEY)
        .header("cookie", format!("pushgate_token={valid}"))
        .json(&json!({"channel": "user:1", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(sse);
    // HTTP/2 requests take the router (and its request spans), not the lean
    // HTTP/1 stream path.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .get(url("/v1/stream?channel=x&token=SECRETVALUE2"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    tokio::time::sleep(Duration::from_millis(300)).await;

    let logs = bin.stop();
    // The positive control: requests were logged, by path.
    assert!(
        logs.contains("/v1/stream"),
        "request paths are logged:\n{logs}"
    );
    assert!(
        logs.contains("/v1/events"),
        "request paths are logged:\n{logs}"
    );
    for secret in ["SECRETVALUE", valid.as_str(), PUBLISH_KEY, SECRET] {
        // ("SECRETVALUE" also covers "SECRETVALUE2".)
        assert!(
            !logs.contains(secret),
            "`{secret}` leaked into the logs:\n{logs}"
        );
    }
    // Not even the token's signature or claims part on its own.
    for part in valid.split('.') {
        assert!(!logs.contains(part), "a token part leaked:\n{logs}");
    }
}

#[tokio::test]
async fn the_token_command_mints_tokens_the_server_accepts() {
    let s = TestServer::with(secured).await;
    let out = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .env_clear()
        .args([
            "token",
            "--secret",
            SECRET,
            "--sub",
            "42",
            "--subscribe",
            "user:42",
            "prices.*",
            "--publish",
            "chat:*",
            "--ttl",
            "1h",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(token.split('.').count(), 3, "just the JWT: {token}");

    let ok = send(poll(&s, &format!("channel=user:42&token={token}"))).await;
    assert_eq!(ok.0, 200, "{ok:?}");
    assert_error(
        &send(poll(&s, &format!("channel=user:43&token={token}"))).await,
        403,
        "forbidden",
    );
    assert_eq!(
        publish_with(&s, Some(&token), "chat:room1", json!("hi"))
            .await
            .0,
        200
    );
    // The claims: sub, exp about an hour ahead, the grants.
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "42");
    assert_eq!(
        claims["pushgate"]["subscribe"],
        json!(["user:42", "prices.*"])
    );
    assert_eq!(claims["pushgate"]["publish"], json!(["chat:*"]));
    let exp = claims["exp"].as_u64().unwrap();
    assert!((now() + 3590..=now() + 3600).contains(&exp), "exp {exp}");

    // From a configuration file: the secret works; a public key cannot mint.
    let dir = tempfile::tempdir().unwrap();
    let with_secret = dir.path().join("secret.toml");
    std::fs::write(&with_secret, format!("[auth]\njwt_secret = \"{SECRET}\"\n")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .env_clear()
        .args(["token", "--config"])
        .arg(&with_secret)
        .args(["--sub", "42", "--subscribe", "user:42"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(
        send(poll(&s, &format!("channel=user:42&token={token}")))
            .await
            .0,
        200
    );
    let public_only = dir.path().join("public.toml");
    std::fs::write(
        &public_only,
        "[auth]\njwt_public_key_file = \"/etc/pushgate/jwt.pub.pem\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .env_clear()
        .args(["token", "--config"])
        .arg(&public_only)
        .args(["--sub", "42", "--subscribe", "user:42"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("only a public key"), "{err}");
}

#[tokio::test]
async fn cors_answers_preflights_for_listed_origins_with_credentials() {
    let s = TestServer::with(|c| {
        secured(c);
        c.server.cors_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let preflight = |origin: &str| {
        s.client
            .request(reqwest::Method::OPTIONS, s.url("/v1/stream?channel=user:1"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header(
                "access-control-request-headers",
                "last-event-id, authorization",
            )
            .send()
    };
    let r = preflight("https://app.example.com").await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
    assert_eq!(h["access-control-allow-credentials"], "true");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in ["last-event-id", "authorization", "content-type"] {
        assert!(allowed.contains(name), "{allowed}");
    }
    let r = preflight("https://evil.example").await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    // Actual responses, errors included, carry the headers for the origin.
    let r = poll(&s, "channel=user:1")
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(r.headers()["access-control-allow-credentials"], "true");
    let sse = sse_request(&s, "channel=news")
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    assert_eq!(
        sse.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );

    // `*`: any origin, never with credentials.
    let any = TestServer::with(|c| {
        secured(c);
        c.server.cors_origins = vec!["*".into()];
    })
    .await;
    let r = any
        .client
        .get(any.url("/v1/events?channel=news"))
        .header("origin", "https://anywhere.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert!(
        r.headers()
            .get("access-control-allow-credentials")
            .is_none()
    );

    // Nothing configured: same-origin only.
    let none = TestServer::with(secured).await;
    let r = none
        .client
        .get(none.url("/v1/events?channel=news"))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
}

/// HTTP/2 streams go through the router rather than the lean HTTP/1 path:
/// the same checks, caps and CORS apply there.
#[tokio::test]
async fn the_http2_path_enforces_the_same_rules() {
    let s = TestServer::with(|c| {
        secured(c);
        c.limits.streams_per_client = 1;
        c.server.cors_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let stream = |query: String| {
        h2.get(s.url(&format!("/v1/stream?{query}")))
            .header("origin", "https://app.example.com")
            .timeout(Duration::from_secs(3600))
    };
    let t1 = user_token(1);
    let refused = open_sse(stream(format!("channel=user:2&token={t1}")))
        .await
        .err()
        .unwrap();
    assert_error(&refused, 403, "forbidden");
    let refused = open_sse(stream("channel=user:1".into()))
        .await
        .err()
        .unwrap();
    assert_error(&refused, 401, "unauthorized");

    let r = stream(format!("channel=user:1&token={t1}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let mut own = SseClient::from_response(r);
    let capped = open_sse(stream("channel=news".into())).await.err().unwrap();
    assert_error(&capped, 429, "too_many_streams");

    publish_with(&s, Some(PUBLISH_KEY), "user:2", json!("not yours")).await;
    let (_, r) = publish_with(&s, Some(PUBLISH_KEY), "user:1", json!("yours")).await;
    let ev = own.next_timeout(T).await.unwrap();
    assert_eq!(ev.id.as_deref(), r["ids"][0].as_str());
    assert_eq!(ev.json()["data"], "yours");
}
