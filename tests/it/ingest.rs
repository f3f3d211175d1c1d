//! Inbound webhooks over real HTTP: every kind verified, deduplicated,
//! routed and inspectable; every refusal with the contract's code.

use std::time::Duration;

use pushgate::config::{ByteSize, Dur, RouteConfig, SourceConfig};
use pushgate::ingest::hmac::{Algorithm, Encoding};
use pushgate::ingest::{github, hmac, shopify, standard, stripe};
use serde_json::{Value, json};

use crate::common::*;

const T: Duration = Duration::from_secs(10);
/// Two secrets per source: the first is being rotated out.
const OLD: &str = "whsec_c2VjcmV0LW9uZQ==";
const NEW: &str = "whsec_c2VjcmV0LXR3bw==";
const WRONG: &str = "whsec_d3Jvbmctc2VjcmV0";
const KINDS: [&str; 5] = ["stripe", "github", "shopify", "standard", "hmac"];

pub fn source(kind: &str) -> SourceConfig {
    let mut s = SourceConfig {
        name: kind.into(),
        kind: kind.into(),
        secrets: vec![OLD.into(), NEW.into()],
        channel: Some("user:{data.object.metadata.user_id}".into()),
        fallback_channel: Some(format!("fallback-{kind}")),
        ..Default::default()
    };
    if kind == "hmac" {
        s.header = Some("x-signature".into());
        s.prefix = Some("sha256=".into());
        s.id_header = Some("x-delivery-id".into());
    }
    if kind == "none" {
        s.secrets.clear();
        s.allow_unsigned = true;
    }
    s
}

fn now() -> i64 {
    pushgate::auth::unix_now() as i64
}

/// A payload as providers send it: pretty-printed, with a trailing newline.
/// Stripe and Standard Webhooks read `id`/`type` from it. `2000.50` and the
/// big integer would not survive a re-serialization through `Value`.
pub fn payload(id: &str, user: Option<&str>) -> String {
    let metadata = match user {
        Some(u) => format!("{{\"user_id\": \"{u}\"}}"),
        None => "{}".to_string(),
    };
    format!(
        "{{\n  \"id\": \"{id}\",\n  \"type\": \"payment_intent.succeeded\",\n  \"data\": {{\n    \"object\": {{\n      \"amount\": 2000,\n      \"amount_decimal\": 2000.50,\n      \"big\": 12345678901234567890123,\n      \"metadata\": {metadata}\n    }}\n  }}\n}}\n"
    )
}

/// What the payload looks like in an envelope: the same tokens, no line breaks.
const AS_WRITTEN: &str =
    "\"amount\":2000,\"amount_decimal\":2000.50,\"big\":12345678901234567890123";

/// The headers the provider of `kind` would send, signed with `secret` at `ts`.
pub fn sign(kind: &str, secret: &str, body: &[u8], ts: i64, id: &str) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = vec![("content-type".into(), "application/json".into())];
    let mut add = |k: &str, v: String| h.push((k.to_string(), v));
    match kind {
        "stripe" => add(
            "stripe-signature",
            stripe::signature_header(secret, ts, body),
        ),
        "github" => {
            add(
                "x-hub-signature-256",
                github::signature_header(secret, body),
            );
            add("x-github-event", "payment_intent".into());
            add("x-github-delivery", id.into());
        }
        "shopify" => {
            add(
                "x-shopify-hmac-sha256",
                shopify::signature_header(secret, body),
            );
            add("x-shopify-topic", "payment_intent.succeeded".into());
            add("x-shopify-webhook-id", id.into());
        }
        "standard" => {
            add("webhook-id", id.into());
            add("webhook-timestamp", ts.to_string());
            add(
                "webhook-signature",
                standard::signature_header(secret, id, ts, body).unwrap(),
            );
        }
        "hmac" => {
            add(
                "x-signature",
                hmac::signature_header(secret, body, Algorithm::Sha256, Encoding::Hex, "sha256="),
            );
            add("x-delivery-id", id.into());
        }
        _ => {}
    }
    h
}

/// The header that carries the signature, per kind.
fn signature_header(kind: &str) -> &'static str {
    match kind {
        "stripe" => "stripe-signature",
        "github" => "x-hub-signature-256",
        "shopify" => "x-shopify-hmac-sha256",
        "standard" => "webhook-signature",
        "hmac" => "x-signature",
        _ => unreachable!(),
    }
}

pub async fn post(
    s: &TestServer,
    path: &str,
    headers: &[(String, String)],
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut req = s.client.post(s.url(path)).body(body);
    for (k, v) in headers {
        req = req.header(k, v);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn error_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no error code>")
}

/// All events of `channel` in the log, via polling.
pub async fn events(s: &TestServer, channel: &str) -> Vec<Value> {
    let r: Value = s
        .client
        .get(s.url(&format!(
            "/v1/events?channel={channel}&after=earliest&limit=1000"
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["events"].as_array().unwrap().clone()
}

async fn server_with_every_kind() -> TestServer {
    TestServer::with(|c| {
        c.server.max_body = ByteSize(64 * 1024);
        for kind in KINDS {
            c.sources.push(source(kind));
        }
    })
    .await
}

/// One kind through every case the issue lists.
async fn exercise(s: &TestServer, kind: &str) {
    let path = format!("/webhooks/{kind}");
    let user = format!("u-{kind}");
    let mut sub = s.sse(&format!("channel=user:{user}")).await;

    // Valid, signed with the newer secret: stored, routed, pushed, raw bytes kept.
    let body = payload(&format!("evt_{kind}_1"), Some(&user));
    let (st, v) = post(
        s,
        &path,
        &sign(kind, NEW, body.as_bytes(), now(), &format!("evt_{kind}_1")),
        body.clone(),
    )
    .await;
    assert_eq!(st, 200, "{kind}: valid delivery: {v}");
    assert_eq!(v["duplicate"], false, "{kind}");
    let first_id = v["id"].as_str().unwrap().to_string();
    let ev = sub
        .next_timeout(T)
        .await
        .expect("event on the routed channel");
    assert_eq!(ev.id.as_deref(), Some(first_id.as_str()), "{kind}");
    assert!(
        ev.data.contains(AS_WRITTEN),
        "{kind}: the payload is stored as written, not re-serialized: {}",
        ev.data
    );
    let env = ev.json();
    assert_eq!(env["channel"], format!("user:{user}"));
    assert_eq!(env["source"], kind);
    assert_eq!(env["source_id"], format!("evt_{kind}_1"));
    let expected_type = if kind == "github" {
        "payment_intent" // X-GitHub-Event; the body has no `action`
    } else {
        "payment_intent.succeeded"
    };
    assert_eq!(env["type"], expected_type, "{kind}");

    // Rotation: the older secret still works.
    let body2 = payload(&format!("evt_{kind}_2"), Some(&user));
    let (st, v) = post(
        s,
        &path,
        &sign(kind, OLD, body2.as_bytes(), now(), &format!("evt_{kind}_2")),
        body2.clone(),
    )
    .await;
    assert_eq!(st, 200, "{kind}: second secret: {v}");
    assert_eq!(v["duplicate"], false);

    // Duplicate: same id, first cursor, nothing new stored or pushed.
    let (st, v) = post(
        s,
        &path,
        &sign(kind, NEW, body.as_bytes(), now(), &format!("evt_{kind}_1")),
        body.clone(),
    )
    .await;
    assert_eq!(st, 200, "{kind}: duplicate: {v}");
    assert_eq!(v["duplicate"], true, "{kind}");
    assert_eq!(
        v["id"],
        first_id.as_str(),
        "{kind}: a duplicate answers the first cursor"
    );

    // Two identical deliveries at the same moment: one stored, both answered.
    let body3 = payload(&format!("evt_{kind}_3"), Some(&user));
    let h3 = sign(kind, NEW, body3.as_bytes(), now(), &format!("evt_{kind}_3"));
    let (a, b) = tokio::join!(
        post(s, &path, &h3, body3.clone()),
        post(s, &path, &h3, body3.clone())
    );
    assert_eq!(
        (a.0, b.0),
        (200, 200),
        "{kind}: concurrent copies: {a:?} {b:?}"
    );
    assert_eq!(
        a.1["id"], b.1["id"],
        "{kind}: both copies answer the same cursor"
    );
    let dups = [&a.1, &b.1]
        .iter()
        .filter(|v| v["duplicate"] == true)
        .count();
    assert_eq!(
        dups, 1,
        "{kind}: exactly one copy is the duplicate: {a:?} {b:?}"
    );

    // Refusals store nothing.
    let tampered = body.replace("2000", "2001");
    let (st, v) = post(
        s,
        &path,
        &sign(kind, NEW, body.as_bytes(), now(), "evt_t"),
        tampered,
    )
    .await;
    assert_eq!(
        (st, error_code(&v)),
        (401, "invalid_signature"),
        "{kind}: tampered body"
    );
    let (st, v) = post(
        s,
        &path,
        &sign(kind, WRONG, body.as_bytes(), now(), "evt_w"),
        body.clone(),
    )
    .await;
    assert_eq!(
        (st, error_code(&v)),
        (401, "invalid_signature"),
        "{kind}: wrong secret"
    );
    let mut missing = sign(kind, NEW, body.as_bytes(), now(), "evt_m");
    missing.retain(|(k, _)| k != signature_header(kind));
    let (st, v) = post(s, &path, &missing, body.clone()).await;
    assert_eq!(
        (st, error_code(&v)),
        (401, "invalid_signature"),
        "{kind}: missing header"
    );
    if kind == "stripe" || kind == "standard" {
        for ts in [now() - 3600, now() + 3600] {
            let (st, v) = post(
                s,
                &path,
                &sign(kind, NEW, body.as_bytes(), ts, "evt_old"),
                body.clone(),
            )
            .await;
            assert_eq!(
                (st, error_code(&v)),
                (400, "timestamp_out_of_tolerance"),
                "{kind}: timestamp {ts}"
            );
        }
        // Positive control beside it: within tolerance.
        let b = payload(&format!("evt_{kind}_skew"), Some(&user));
        let (st, v) = post(
            s,
            &path,
            &sign(
                kind,
                NEW,
                b.as_bytes(),
                now() - 200,
                &format!("evt_{kind}_skew"),
            ),
            b.clone(),
        )
        .await;
        assert_eq!(
            st, 200,
            "{kind}: 200 s of skew is within the default 300 s: {v}"
        );
    }
    let not_json = "{\"id\": \"evt_bad\", ";
    let (st, v) = post(
        s,
        &path,
        &sign(kind, NEW, not_json.as_bytes(), now(), "evt_bad"),
        not_json,
    )
    .await;
    assert_eq!(
        (st, error_code(&v)),
        (400, "invalid_json"),
        "{kind}: signed but not JSON"
    );
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(100 * 1024));
    let (st, v) = post(
        s,
        &path,
        &sign(kind, NEW, big.as_bytes(), now(), "evt_big"),
        big.clone(),
    )
    .await;
    assert_eq!(
        (st, error_code(&v)),
        (413, "payload_too_large"),
        "{kind}: oversize"
    );
    let r = s.client.get(s.url(&path)).send().await.unwrap();
    assert_eq!(r.status(), 405, "{kind}: GET");
    let v: Value = r.json().await.unwrap();
    assert_eq!(error_code(&v), "method_not_allowed");
    let r = s.client.put(s.url(&path)).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 405, "{kind}: PUT");

    // A template field that is missing routes to the fallback channel.
    let mut fallback = s.sse(&format!("channel=fallback-{kind}")).await;
    let body4 = payload(&format!("evt_{kind}_4"), None);
    let (st, v) = post(
        s,
        &path,
        &sign(kind, NEW, body4.as_bytes(), now(), &format!("evt_{kind}_4")),
        body4,
    )
    .await;
    assert_eq!(st, 200, "{kind}: {v}");
    let ev = fallback
        .next_timeout(T)
        .await
        .expect("event on the fallback channel");
    assert_eq!(ev.json()["channel"], format!("fallback-{kind}"));
    assert_eq!(ev.json()["source_id"], format!("evt_{kind}_4"));

    // The log holds exactly the accepted, distinct deliveries.
    let stored = events(s, &format!("user:{user}")).await;
    let ids: Vec<&str> = stored
        .iter()
        .map(|e| e["source_id"].as_str().unwrap())
        .collect();
    let mut expected = vec![
        format!("evt_{kind}_1"),
        format!("evt_{kind}_2"),
        format!("evt_{kind}_3"),
    ];
    if kind == "stripe" || kind == "standard" {
        expected.push(format!("evt_{kind}_skew"));
    }
    assert_eq!(
        ids, expected,
        "{kind}: nothing refused or duplicated was stored"
    );
}

#[tokio::test]
async fn every_kind_verifies_dedupes_routes_and_refuses() {
    let s = server_with_every_kind().await;
    for kind in KINDS {
        exercise(&s, kind).await;
    }
    for path in ["/webhooks/nope", "/webhooks/%FF%FE"] {
        let (st, v) = post(&s, path, &[], "{}").await;
        assert_eq!((st, error_code(&v)), (404, "unknown_source"), "{path}");
    }
}

#[tokio::test]
async fn unsigned_source_and_its_defaults() {
    let s = TestServer::with(|c| c.sources.push(source("none"))).await;
    let mut sub = s.sse("channel=user:anon").await;
    let body = payload("evt_n1", Some("anon"));
    let (st, v) = post(&s, "/webhooks/none", &[], body.clone()).await;
    assert_eq!(st, 200, "{v}");
    let env = sub.next_timeout(T).await.unwrap().json();
    assert_eq!(env["source_id"], "evt_n1", "body id is the dedupe key");
    assert_eq!(env["type"], "payment_intent.succeeded");
    let (_, v) = post(&s, "/webhooks/none", &[], body).await;
    assert_eq!(v["duplicate"], true);
    let (st, v) = post(&s, "/webhooks/none", &[], "[1, 2]").await;
    assert_eq!(st, 200, "any JSON is accepted: {v}");
    let fallback = events(&s, "fallback-none").await;
    assert_eq!(fallback.len(), 1);
    assert_eq!(fallback[0]["type"], "webhook", "no type in the body");
    assert_eq!(
        fallback[0]["source_id"],
        Value::Null,
        "no id: no dedupe key"
    );
}

/// Nobody can verify an unsigned (`kind = "none"`) source, so each
/// delivery counts against the client's `limits.invalid_per_client`
/// budget: one address is throttled (429, nothing stored), while another
/// address and signed sources are not (positive controls).
#[tokio::test]
async fn an_unsigned_source_is_throttled_per_client() {
    let s = TestServer::with(|c| {
        c.limits.invalid_per_client = 3;
        c.server.trusted_proxies = vec!["127.0.0.1".into()];
        c.sources.push(source("none"));
        c.sources.push(source("stripe"));
    })
    .await;
    let from = |ip: &str| {
        vec![
            ("content-type".to_string(), "application/json".to_string()),
            ("x-forwarded-for".to_string(), ip.to_string()),
        ]
    };
    let mut statuses = Vec::new();
    for i in 0..10 {
        let body = payload(&format!("evt_u{i}"), Some("flood"));
        let (st, v) = post(&s, "/webhooks/none", &from("203.0.113.7"), body).await;
        if st == 429 {
            assert_eq!(error_code(&v), "rate_limited", "{v}");
        }
        statuses.push(st);
    }
    let accepted = statuses.iter().filter(|st| **st == 200).count();
    assert!(
        statuses.contains(&429) && accepted >= 3,
        "the unsigned flood is throttled after its budget: {statuses:?}"
    );
    assert_eq!(
        events(&s, "user:flood").await.len(),
        accepted,
        "a throttled delivery stores nothing"
    );
    // Positive controls: another client of the same source, and a signed
    // delivery from the throttled client, are accepted.
    let body = payload("evt_other", Some("other"));
    let (st, v) = post(&s, "/webhooks/none", &from("203.0.113.8"), body).await;
    assert_eq!(st, 200, "another client is not throttled: {v}");
    let body = payload("evt_signed", Some("signed"));
    let mut h = sign("stripe", NEW, body.as_bytes(), now(), "");
    h.push(("x-forwarded-for".into(), "203.0.113.7".into()));
    let (st, v) = post(&s, "/webhooks/stripe", &h, body).await;
    assert_eq!(st, 200, "a valid signature is never throttled: {v}");
}

#[tokio::test]
async fn github_form_encoded_and_action_types() {
    let s = TestServer::with(|c| {
        let mut g = source("github");
        g.channel = Some("repo:{repository.full_name}".into());
        c.sources.push(g);
    })
    .await;
    let json_text =
        r#"{"action":"opened","number":7,"repository":{"full_name":"octo-org/webapp"}}"#;
    let form: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", json_text)
        .finish();
    let headers = vec![
        (
            "content-type".to_string(),
            "application/x-www-form-urlencoded".to_string(),
        ),
        ("x-github-event".into(), "pull_request".into()),
        ("x-github-delivery".into(), "d-1".into()),
        (
            "x-hub-signature-256".into(),
            github::signature_header(NEW, form.as_bytes()),
        ),
    ];
    let mut sub = s.sse("channel=repo:octo-org/webapp").await;
    let (st, v) = post(&s, "/webhooks/github", &headers, form.clone()).await;
    assert_eq!(st, 200, "{v}");
    let ev = sub.next_timeout(T).await.unwrap();
    assert!(
        ev.data.contains(&format!("\"data\":{json_text}")),
        "{}",
        ev.data
    );
    let env = ev.json();
    assert_eq!(env["type"], "pull_request.opened");
    assert_eq!(env["source_id"], "d-1");
    // The signature covers the raw form body, not the decoded JSON.
    let mut wrong = headers.clone();
    wrong[3].1 = github::signature_header(NEW, json_text.as_bytes());
    let (st, _) = post(&s, "/webhooks/github", &wrong, form).await;
    assert_eq!(st, 401);
}

#[tokio::test]
async fn rules_route_to_several_channels_with_one_dedupe_key() {
    let s = TestServer::with(|c| {
        let mut src = source("stripe");
        src.routes = vec![RouteConfig {
            types: vec!["invoice.*".into(), "customer.subscription.*".into()],
            channels: vec!["billing:{data.object.customer}".into(), "billing".into()],
        }];
        c.sources.push(src);
    })
    .await;
    let mut billing = s.sse("channel=billing").await;
    let mut customer = s.sse("channel=billing:cus_9").await;
    let body = r#"{"id":"evt_inv","type":"invoice.paid","data":{"object":{"customer":"cus_9","metadata":{"user_id":"1"}}}}"#;
    let h = sign("stripe", NEW, body.as_bytes(), now(), "");
    let (st, v) = post(&s, "/webhooks/stripe", &h, body).await;
    assert_eq!(st, 200, "{v}");
    let a = customer.next_timeout(T).await.unwrap().json();
    let b = billing.next_timeout(T).await.unwrap().json();
    assert_eq!(
        v["id"], a["id"],
        "the reply names the first channel's event"
    );
    assert_ne!(a["id"], b["id"], "one log event per channel");
    assert_eq!(
        (a["source_id"].as_str(), b["source_id"].as_str()),
        (Some("evt_inv"), Some("evt_inv"))
    );
    let (_, v) = post(&s, "/webhooks/stripe", &h, body).await;
    assert_eq!(v["duplicate"], true);
    assert_eq!(v["id"], a["id"]);
    // A type no rule matches takes the source's channel.
    let other = r#"{"id":"evt_pi","type":"payment_intent.succeeded","data":{"object":{"metadata":{"user_id":"1"}}}}"#;
    let (st, _) = post(
        &s,
        "/webhooks/stripe",
        &sign("stripe", NEW, other.as_bytes(), now(), ""),
        other,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(events(&s, "user:1").await.len(), 1);
    assert_eq!(events(&s, "billing").await.len(), 1);
}

#[tokio::test]
async fn inspector_keeps_headers_bodies_and_reasons() {
    let s = TestServer::with(|c| c.sources.push(source("stripe"))).await;
    let body = payload("evt_i1", Some("7"));
    let mut h = sign("stripe", NEW, body.as_bytes(), now(), "");
    h.push(("authorization".into(), "Bearer do-not-keep".into()));
    let (st, accepted) = post(&s, "/webhooks/stripe", &h, body.clone()).await;
    assert_eq!(st, 200);
    let (st, _) = post(
        &s,
        "/webhooks/stripe",
        &sign("stripe", WRONG, b"{}", now(), ""),
        "{\"x\":1}",
    )
    .await;
    assert_eq!(st, 401);
    let (st, _) = post(
        &s,
        "/webhooks/stripe",
        &sign("stripe", NEW, b"nope", now(), ""),
        "nope",
    )
    .await;
    assert_eq!(st, 400);

    let list: Value = s
        .client
        .get(s.url("/v1/inbound?source=stripe"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = list["inbound"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{list}");
    assert_eq!(items[0]["reason"], "invalid_json", "newest first");
    assert_eq!(items[1]["reason"], "invalid_signature");
    assert_eq!(items[2]["status"], "accepted");
    assert_eq!(items[2]["event_ids"], json!([accepted["id"]]));
    assert_eq!(items[2]["channels"], json!(["user:7"]));
    assert_eq!(items[2]["source_id"], "evt_i1");

    let rejected: Value = s
        .client
        .get(s.url("/v1/inbound?status=rejected&limit=1"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rejected["inbound"].as_array().unwrap().len(), 1);
    assert_eq!(rejected["inbound"][0]["reason"], "invalid_json");
    let before = rejected["next_before"].as_str().unwrap();
    let older: Value = s
        .client
        .get(s.url(&format!("/v1/inbound?status=rejected&before={before}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(older["inbound"][0]["reason"], "invalid_signature");

    let id = items[2]["id"].as_str().unwrap();
    let one: Value = s
        .client
        .get(s.url(&format!("/v1/inbound/{id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["body"], body, "the raw body, byte for byte");
    assert_eq!(one["body_truncated"], false);
    let headers = one["headers"].as_array().unwrap();
    let find = |name: &str| headers.iter().find(|p| p[0] == name).map(|p| p[1].clone());
    assert_eq!(find("stripe-signature"), Some(json!(h[1].1)));
    assert_eq!(
        find("authorization"),
        Some(json!("[redacted]")),
        "credentials are not kept"
    );
    let bad_id = items[1]["id"].as_str().unwrap();
    let bad: Value = s
        .client
        .get(s.url(&format!("/v1/inbound/{bad_id}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(bad["status"], "rejected");
    assert_eq!(bad["body"], "{\"x\":1}");
    assert!(bad["message"].as_str().unwrap().contains("secret"), "{bad}");

    for (path, status, code) in [
        ("/v1/inbound/999999", 404, "not_found"),
        ("/v1/inbound/abc", 404, "not_found"),
        ("/v1/inbound/%FF", 404, "not_found"),
        ("/v1/inbound?status=maybe", 400, "invalid_status"),
        ("/v1/inbound?limit=0", 400, "invalid_limit"),
    ] {
        let r = s.client.get(s.url(path)).send().await.unwrap();
        assert_eq!(r.status(), status, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(error_code(&v), code, "{path}");
    }
}

#[tokio::test]
async fn inspector_needs_an_admin_key_outside_development() {
    let s = TestServer::with(|c| {
        c.auth.admin_keys = vec!["ak_test".into()];
        c.auth.publish_keys = vec!["pk_test".into()];
        c.sources.push(source("stripe"));
    })
    .await;
    let r = s.client.get(s.url("/v1/inbound")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = s
        .client
        .get(s.url("/v1/inbound"))
        .bearer_auth("pk_test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a publish key is not an admin key");
    let r = s
        .client
        .get(s.url("/v1/inbound"))
        .bearer_auth("ak_test")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Webhooks need no key: their signature is their credential.
    let body = payload("evt_k", Some("1"));
    let (st, v) = post(
        &s,
        "/webhooks/stripe",
        &sign("stripe", NEW, body.as_bytes(), now(), ""),
        body,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let r = s.client.get(s.url("/webhooks/demo")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let (st, _) = post(&s, "/webhooks/demo", &[], "{}").await;
    assert_eq!(st, 404, "no demo source outside development mode");
}

#[tokio::test]
async fn a_valid_signature_is_never_rate_limited() {
    let s = TestServer::with(|c| {
        c.limits.invalid_per_client = 2;
        c.sources.push(source("stripe"));
    })
    .await;
    let body = payload("evt_rl", Some("1"));
    let bad = sign("stripe", WRONG, body.as_bytes(), now(), "");
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(post(&s, "/webhooks/stripe", &bad, body.clone()).await.0);
    }
    assert!(
        statuses.contains(&429),
        "failed checks are limited: {statuses:?}"
    );
    for i in 0..5 {
        let b = payload(&format!("evt_ok{i}"), Some("1"));
        let (st, v) = post(
            &s,
            "/webhooks/stripe",
            &sign("stripe", NEW, b.as_bytes(), now(), ""),
            b,
        )
        .await;
        assert_eq!(
            st, 200,
            "valid delivery {i} right after the limit was hit: {v}"
        );
    }
}

#[tokio::test]
async fn dedupe_outlives_retention() {
    let s = TestServer::with(|c| {
        c.store.retention = Dur::parse("1s").unwrap();
        c.sources.push(source("stripe"));
    })
    .await;
    let body = payload("evt_keep", Some("r"));
    let h = sign("stripe", NEW, body.as_bytes(), now(), "");
    let (st, first) = post(&s, "/webhooks/stripe", &h, body.clone()).await;
    assert_eq!(st, 200);
    assert_eq!(events(&s, "user:r").await.len(), 1);
    let deadline = tokio::time::Instant::now() + T;
    while !events(&s, "user:r").await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never pruned the event"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, again) = post(&s, "/webhooks/stripe", &h, body).await;
    assert_eq!(st, 200);
    assert_eq!(
        again["duplicate"], true,
        "Stripe retries for days: still a duplicate"
    );
    assert_eq!(again["id"], first["id"]);
    assert!(
        events(&s, "user:r").await.is_empty(),
        "nothing stored again"
    );
}

#[tokio::test]
async fn bad_templates_stop_serve_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    let mut bad = source("stripe");
    bad.channel = Some("user:{data.object.metadata.user_id".into());
    config.sources.push(bad);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = tokio::time::timeout(T, pushgate::serve(listener, config, std::future::pending()))
        .await
        .expect("serve fails at once instead of running");
    let err = result
        .expect_err("a bad template is a start-up error")
        .to_string();
    assert!(err.contains("sources[0].channel"), "{err}");
}

#[tokio::test]
async fn cli_serve_exits_2_on_a_bad_source() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pushgate.toml");
    std::fs::write(
        &file,
        "[[sources]]\nname = \"stripe\"\nkind = \"stripe\"\nsecrets = [\"whsec_x\"]\nchannel = \"user:{data.object\"\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .args(["serve", "--config"])
        .arg(&file)
        .env("PUSHGATE_SERVER__LISTEN", "127.0.0.1:0")
        .env(
            "PUSHGATE_STORE__URL",
            format!("sqlite://{}/log.db", dir.path().display()),
        )
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("sources[0].channel"), "{stderr}");
}

/// README's "webhooks in one minute", with the real binaries: `pushgate
/// serve` prints the demo secret, `pushgate send` signs with it, and the
/// event arrives on the user's stream.
#[tokio::test]
async fn development_demo_source_end_to_end() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .arg("serve")
        .env("PUSHGATE_SERVER__LISTEN", "127.0.0.1:0")
        .env(
            "PUSHGATE_STORE__URL",
            format!("sqlite://{}/log.db", dir.path().display()),
        )
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut base, mut secret) = (None, None);
    while base.is_none() || secret.is_none() {
        let line = tokio::time::timeout(T, lines.next_line())
            .await
            .expect("banner")
            .unwrap()
            .expect("the banner names the URL and the demo secret");
        if let Some(url) = line.strip_prefix("pushgate listening on ") {
            base = Some(url.trim().to_string());
        }
        if let Some(at) = line.find("secret whsec_") {
            secret = Some(line[at + 7..].trim_end_matches(':').trim().to_string());
        }
    }
    let (base, secret) = (base.unwrap(), secret.unwrap());
    let client = reqwest::Client::new();
    for _ in 0..100 {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sub = SseClient::connect(
        &client,
        &format!("{base}/v1/stream?channel=user:demo"),
        None,
    )
    .await;
    let send = |secret: String| {
        let base = base.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_pushgate"))
                .args([
                    "send",
                    "stripe",
                    "--url",
                    &format!("{base}/webhooks/demo"),
                    "--secret",
                    &secret,
                ])
                .args(["--data", "data.object.metadata.user_id=demo"])
                .output()
                .await
                .unwrap()
        }
    };
    let out = send("whsec_wrong".into()).await;
    assert_eq!(out.status.code(), Some(1), "a refused webhook is a failure");
    assert!(String::from_utf8_lossy(&out.stdout).contains("401"));
    let out = send(secret).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("200 ") && stdout.contains("\"duplicate\":false"),
        "{stdout}"
    );
    let env = sub
        .next_timeout(T)
        .await
        .expect("the payment reaches the browser")
        .json();
    assert_eq!(env["type"], "payment_intent.succeeded");
    assert_eq!(env["source"], "demo");
    assert_eq!(env["data"]["data"]["object"]["metadata"]["user_id"], "demo");
    assert!(env["source_id"].as_str().unwrap().starts_with("evt_"));
    child.kill().await.unwrap();
}

/// `pushgate send` for every kind against sources configured the way the
/// docs say, and each sample lands where its routing sends it.
#[tokio::test]
async fn cli_send_every_kind() {
    let s = TestServer::with(|c| {
        for kind in ["stripe", "github", "shopify", "standard", "hmac", "none"] {
            let mut src = source(kind);
            src.channel = None;
            src.fallback_channel = Some(format!("sent-{kind}"));
            if kind == "hmac" {
                src.id_header = None;
                src.id_field = Some("id".into());
            }
            c.sources.push(src);
        }
    })
    .await;
    let cases: [(&str, &[&str], &str); 9] = [
        ("stripe", &[], "payment_intent.succeeded"),
        ("stripe", &["--event", "invoice.paid"], "invoice.paid"),
        (
            "stripe",
            &["--event", "customer.subscription.updated"],
            "customer.subscription.updated",
        ),
        ("github", &[], "push"),
        (
            "github",
            &["--event", "pull_request"],
            "pull_request.opened",
        ),
        ("shopify", &[], "orders/create"),
        ("standard", &["--event", "user.created"], "user.created"),
        ("hmac", &["--data", "data.amount:=5"], "invoice.paid"),
        ("none", &[], "invoice.paid"),
    ];
    for (kind, extra, expected_type) in cases {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_pushgate"));
        cmd.args(["send", kind, "--url", &s.url(&format!("/webhooks/{kind}"))]);
        if kind != "none" {
            cmd.args(["--secret", NEW]);
        }
        let out = cmd.args(extra).output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{kind} {extra:?}: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.starts_with("200 "), "{stdout}");
        let stored = events(&s, &format!("sent-{kind}")).await;
        let last = stored.last().expect("stored");
        assert_eq!(last["type"], expected_type, "{kind} {extra:?}");
        assert!(
            last["source_id"].is_string(),
            "{kind}: every sample carries an id: {last}"
        );
    }
    assert_eq!(
        events(&s, "sent-hmac").await[0]["data"]["data"]["amount"],
        5
    );
}

#[tokio::test]
async fn concurrent_distinct_and_duplicate_deliveries() {
    let s = TestServer::with(|c| c.sources.push(source("standard"))).await;
    // 40 distinct messages, each sent 3 times at once.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let id = format!("msg_c{i}");
        let body = payload(&id, Some("c"));
        let h = sign("standard", NEW, body.as_bytes(), now(), &id);
        for _ in 0..3 {
            let (client, url, h, body) = (
                s.client.clone(),
                s.url("/webhooks/standard"),
                h.clone(),
                body.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut req = client.post(url).body(body);
                for (k, v) in &h {
                    req = req.header(k, v);
                }
                let r = req.send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.json::<Value>().await.unwrap()
            }));
        }
    }
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    let fresh = replies.iter().filter(|v| v["duplicate"] == false).count();
    assert_eq!(fresh, 40, "each message stored once");
    assert_eq!(events(&s, "user:c").await.len(), 40);
}

/// The same pipeline on PostgreSQL: accepted, duplicates (also two at once),
/// refusals recorded, inspector reads, event on the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_on_postgresql() {
    let db = crate::pg::PgTestDb::create().await;
    let s = TestServer::with(|c| {
        c.store.url = db.url.clone();
        c.sources.push(source("standard"));
        c.sources.push(source("none"));
    })
    .await;
    let mut sub = s.sse("channel=user:pg").await;
    let body = payload("msg_pg1", Some("pg"));
    let h = sign("standard", NEW, body.as_bytes(), now(), "msg_pg1");
    let (a, b) = tokio::join!(
        post(&s, "/webhooks/standard", &h, body.clone()),
        post(&s, "/webhooks/standard", &h, body.clone())
    );
    assert_eq!((a.0, b.0), (200, 200), "{a:?} {b:?}");
    assert_eq!(a.1["id"], b.1["id"]);
    assert_eq!(
        [&a.1, &b.1]
            .iter()
            .filter(|v| v["duplicate"] == true)
            .count(),
        1,
        "{a:?} {b:?}"
    );
    let ev = sub.next_timeout(T).await.expect("event on the stream");
    assert!(ev.data.contains(AS_WRITTEN), "{}", ev.data);
    let (st, _) = post(
        &s,
        "/webhooks/standard",
        &sign("standard", WRONG, body.as_bytes(), now(), "msg_x"),
        body.clone(),
    )
    .await;
    assert_eq!(st, 401);
    // A body id with a NUL (which PostgreSQL's TEXT cannot hold) is still one key.
    let nul = "{\"id\": \"evt\\u0000x\", \"type\": \"t\"}";
    for duplicate in [false, true] {
        let (st, v) = post(&s, "/webhooks/none", &[], nul).await;
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["duplicate"], duplicate);
    }
    let list: Value = s
        .client
        .get(s.url("/v1/inbound?source=standard"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = list["inbound"].as_array().unwrap();
    assert_eq!(items.len(), 3, "{list}");
    assert_eq!(items[0]["reason"], "invalid_signature");
    let accepted = items
        .iter()
        .find(|i| i["duplicate"] == false && i["status"] == "accepted")
        .unwrap();
    let one: Value = s
        .client
        .get(s.url(&format!("/v1/inbound/{}", accepted["id"].as_str().unwrap())))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["body"], body);
    assert_eq!(events(&s, "user:pg").await.len(), 1);
}
