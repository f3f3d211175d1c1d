//! `GET /openapi.json` against the router: every route the router serves is
//! in the document and vice versa, and an example request of every
//! documented operation gets a status (and content type) the document lists.

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::common::TestServer;

const ADMIN: &str = "ak_openapi_test";

/// `(METHOD, path)` of every `.route(…)` in `api::router`, read from its
/// source: the router has no runtime listing of its routes.
fn router_routes() -> BTreeSet<(String, String)> {
    let src = include_str!("../../src/api/mod.rs");
    let start = src.find("pub fn router(").expect("router fn");
    let end = start + src[start..].find(".fallback(").expect("fallback");
    let body = &src[start..end];
    let mut out = BTreeSet::new();
    for chunk in body.split(".route(").skip(1) {
        let path = chunk.split('"').nth(1).expect("route path literal");
        for m in ["get", "post", "put", "patch", "delete"] {
            let called = chunk.match_indices(&format!("{m}(")).any(|(i, _)| {
                i == 0
                    || !chunk.as_bytes()[i - 1].is_ascii_alphanumeric()
                        && chunk.as_bytes()[i - 1] != b'_'
            });
            if called {
                out.insert((m.to_uppercase(), path.to_string()));
            }
        }
    }
    out
}

fn doc_operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (m, _) in item.as_object().unwrap() {
            if m != "parameters" {
                out.insert((m.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn the_router_and_the_document_name_the_same_routes() {
    let doc: Value = serde_json::from_str(pushgate::api::openapi::DOCUMENT).unwrap();
    let routes = router_routes();
    // Positive control for the source reader: it sees routes of each kind.
    assert!(routes.contains(&("GET".into(), "/v1/stream".into())));
    assert!(routes.contains(&("PATCH".into(), "/v1/endpoints/{id}".into())));
    assert!(routes.contains(&("DELETE".into(), "/v1/endpoints/{id}".into())));
    assert!(!routes.contains(&("GET".into(), "/v1/publish".into())));
    assert_eq!(routes, doc_operations(&doc));
}

struct Checker {
    doc: Value,
    seen: BTreeSet<(String, String)>,
}

impl Checker {
    /// Asserts that `resp` (to `method` on the documented `template`) has a
    /// status the operation lists explicitly, with the listed content type;
    /// an error is the contract's JSON error. Returns the body.
    async fn check(&mut self, method: &str, template: &str, resp: reqwest::Response) -> Value {
        self.seen.insert((method.to_string(), template.to_string()));
        let status = resp.status().as_u16().to_string();
        let op = &self.doc["paths"][template][method.to_lowercase()];
        assert!(op.is_object(), "{method} {template} is not documented");
        let documented = &op["responses"][&status];
        assert!(
            documented.is_object(),
            "{method} {template} answered {status}, which the document does not list"
        );
        let documented = match documented["$ref"].as_str() {
            Some(r) => &self.doc["components"]["responses"][r.rsplit('/').next().unwrap()],
            None => documented,
        };
        let ct = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let bytes = resp.bytes().await.unwrap_or_default();
        if let Some(content) = documented["content"].as_object() {
            let ct = ct.unwrap_or_else(|| panic!("{method} {template}: no content type"));
            let essence = |s: &str| s.split(';').next().unwrap().trim().to_string();
            assert!(
                content.keys().any(|k| essence(k) == essence(&ct)),
                "{method} {template} {status}: content type {ct} is not documented"
            );
        }
        let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.starts_with('2') && status != "101" {
            assert!(
                body["error"]["code"].is_string() && body["error"]["message"].is_string(),
                "{method} {template} {status}: not the JSON error: {body}"
            );
        }
        body
    }
}

#[tokio::test]
async fn every_documented_operation_answers_a_documented_status() {
    let s = TestServer::with(|c| c.auth.admin_keys = vec![ADMIN.into()]).await;
    let doc: Value = s
        .client
        .get(s.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let mut c = Checker {
        doc,
        seen: BTreeSet::new(),
    };
    let http = &s.client;
    let get = |p: &str| http.get(s.url(p));
    let post = |p: &str| http.post(s.url(p));
    let admin = |r: reqwest::RequestBuilder| r.bearer_auth(ADMIN);

    for p in [
        "/",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/demo",
        "/client.js",
        "/client.d.ts",
    ] {
        let r = get(p).send().await.unwrap();
        assert_eq!(r.status(), 200, "{p}");
        c.check("GET", p, r).await;
    }
    // Not in development mode: the Pay button does not exist.
    let r = post("/demo/pay").send().await.unwrap();
    assert_eq!(r.status(), 404);
    c.check("POST", "/demo/pay", r).await;

    // Publish: refused without a key (positive control: accepted with one).
    let ev = json!({"channel": "orders", "type": "t", "data": {"a": 1}});
    let r = post("/v1/publish").json(&ev).send().await.unwrap();
    assert_eq!(r.status(), 401);
    c.check("POST", "/v1/publish", r).await;
    let r = admin(post("/v1/publish")).json(&ev).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let v = c.check("POST", "/v1/publish", r).await;
    let cursor = v["ids"][0].as_str().unwrap().to_string();
    let r = admin(post("/v1/publish"))
        .json(&json!({"events": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    c.check("POST", "/v1/publish", r).await;

    let r = post("/webhooks/nosuch")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    c.check("POST", "/webhooks/{source}", r).await;

    for (p, t) in [
        ("/v1/inbound", "/v1/inbound"),
        ("/v1/inbound/1", "/v1/inbound/{id}"),
    ] {
        let r = get(p).send().await.unwrap();
        assert_eq!(r.status(), 401);
        c.check("GET", t, r).await;
    }
    let r = admin(get("/v1/inbound")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    c.check("GET", "/v1/inbound", r).await;
    let r = admin(get("/v1/inbound/999999")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    c.check("GET", "/v1/inbound/{id}", r).await;

    // Delivery: the stream's headers are enough (it stays open).
    let r = admin(get("/v1/stream?channel=orders&after=earliest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    c.seen.insert(("GET".into(), "/v1/stream".into()));
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    drop(r);
    let r = get("/v1/stream").send().await.unwrap();
    assert_eq!(r.status(), 400);
    c.check("GET", "/v1/stream", r).await;
    let r = admin(get("/v1/events?channel=orders&after=earliest"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v = c.check("GET", "/v1/events", r).await;
    assert_eq!(v["events"][0]["id"], cursor.as_str());
    let r = get("/v1/events?channel=orders").send().await.unwrap();
    assert_eq!(r.status(), 401);
    c.check("GET", "/v1/events", r).await;
    // No upgrade headers: 426 (the WebSocket suite covers 101).
    let r = get("/v1/ws").send().await.unwrap();
    assert_eq!(r.status(), 426);
    c.check("GET", "/v1/ws", r).await;

    // Endpoints, one lifecycle.
    let r = get("/v1/endpoints").send().await.unwrap();
    assert_eq!(r.status(), 401);
    c.check("GET", "/v1/endpoints", r).await;
    let r = admin(get("/v1/endpoints")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    c.check("GET", "/v1/endpoints", r).await;
    let r = admin(post("/v1/endpoints"))
        .json(&json!({"url": "ftp://x", "channels": ["orders"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    c.check("POST", "/v1/endpoints", r).await;
    let r = admin(post("/v1/endpoints"))
        .json(
            &json!({"url": "https://93.184.215.14/hook", "channels": ["orders"], "enabled": false}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ep = c.check("POST", "/v1/endpoints", r).await;
    let id = ep["id"].as_str().unwrap();
    let one = format!("/v1/endpoints/{id}");
    let t = "/v1/endpoints/{id}";
    let r = admin(get(&one)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    c.check("GET", t, r).await;
    let r = admin(http.patch(s.url(&one)))
        .json(&json!({"description": "d"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    c.check("PATCH", t, r).await;
    let r = admin(get(&format!("{one}/secret"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    c.check("GET", "/v1/endpoints/{id}/secret", r).await;
    let r = admin(get(&format!("{one}/attempts"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    c.check("GET", "/v1/endpoints/{id}/attempts", r).await;
    let r = admin(post(&format!("{one}/rotate"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    c.check("POST", "/v1/endpoints/{id}/rotate", r).await;
    // Disabled: replay is refused with 409 …
    let r = admin(post(&format!("{one}/replay")))
        .json(&json!({"since": "earliest"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    c.check("POST", "/v1/endpoints/{id}/replay", r).await;
    // … and accepted once enabled.
    let r = admin(http.patch(s.url(&one)))
        .json(&json!({"enabled": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = admin(post(&format!("{one}/replay")))
        .json(&json!({"since": "earliest"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    c.check("POST", "/v1/endpoints/{id}/replay", r).await;
    let r = admin(http.delete(s.url(&one))).send().await.unwrap();
    assert_eq!(r.status(), 204);
    c.check("DELETE", t, r).await;
    let r = admin(http.delete(s.url(&one))).send().await.unwrap();
    assert_eq!(r.status(), 404);
    c.check("DELETE", t, r).await;

    let all = doc_operations(&c.doc);
    assert_eq!(c.seen, all, "every documented operation is exercised");
    s.stop().await;
}
