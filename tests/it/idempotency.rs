//! Idempotency keys belong to their publisher (issue 11, item 1): a key
//! suppresses only its own publisher's repeats, so one publisher can neither
//! suppress another's event nor learn whether a key was used.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use pushgate::auth::unix_now;
use pushgate::config::Config;
use serde_json::{Value, json};

use crate::common::*;

const SECRET: &str = "idempotency-secret-0123456789-abcdefgh";
const PUBLISH_KEY: &str = "pk_idempotency_backend_key";
const OTHER_KEY: &str = "pk_idempotency_other_key";
const ADMIN_KEY: &str = "ak_idempotency_admin_key";

fn secured(c: &mut Config) {
    c.auth.jwt_secret = Some(SECRET.into());
    c.auth.publish_keys = vec![PUBLISH_KEY.into(), OTHER_KEY.into()];
    c.auth.admin_keys = vec![ADMIN_KEY.into()];
    c.limits.invalid_per_client = 0;
}

/// A browser user's token: may publish to `chat:room1` only.
fn browser_token(sub: &str) -> String {
    let claims = json!({"sub": sub, "exp": unix_now() + 600, "iat": unix_now(),
        "pushgate": {"subscribe": ["chat:room1"], "publish": ["chat:room1"]}});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn publish(s: &TestServer, bearer: &str, body: Value) -> Value {
    let r = s
        .client
        .post(s.url("/v1/publish"))
        .bearer_auth(bearer)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "publish {body}");
    r.json().await.unwrap()
}

/// Every retained event of `channel`, read with the admin key.
async fn stored(s: &TestServer, channel: &str) -> Vec<Value> {
    let r = s
        .client
        .get(s.url(&format!(
            "/v1/events?channel={channel}&after=earliest&limit=1000"
        )))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["events"].as_array().unwrap().clone()
}

/// The reproduction from the issue: a browser user publishes `order-123`
/// to a channel it may write; the backend's later `order-123` with the
/// publish key is its own event, stored. Positive control: the backend
/// repeating its own key is still a duplicate of its first event.
#[tokio::test]
async fn one_publishers_key_does_not_suppress_anothers_event() {
    let s = TestServer::with(secured).await;
    let browser = browser_token("browser-user");
    let first = publish(
        &s,
        &browser,
        json!({"channel":"chat:room1","data":1,"id":"order-123"}),
    )
    .await;
    assert_eq!(first["duplicate"], json!([false]));

    let backend = publish(
        &s,
        PUBLISH_KEY,
        json!({"channel":"user:42","type":"order.created","data":{"total":10},"id":"order-123"}),
    )
    .await;
    assert_eq!(
        backend["duplicate"],
        json!([false]),
        "stored, not suppressed"
    );
    assert_ne!(backend["ids"][0], first["ids"][0]);
    let events = stored(&s, "user:42").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["id"], backend["ids"][0]);
    assert_eq!(events[0]["source_id"], "order-123");

    // Positive control: the same publisher repeating its key is deduplicated,
    // and told the first cursor.
    let again = publish(
        &s,
        PUBLISH_KEY,
        json!({"channel":"user:42","type":"order.created","data":{"total":10},"id":"order-123"}),
    )
    .await;
    assert_eq!(again["duplicate"], json!([true]));
    assert_eq!(again["ids"][0], backend["ids"][0]);
    // …and so is the browser user repeating its own.
    let browser_again = publish(
        &s,
        &browser,
        json!({"channel":"chat:room1","data":1,"id":"order-123"}),
    )
    .await;
    assert_eq!(browser_again["duplicate"], json!([true]));
    assert_eq!(browser_again["ids"][0], first["ids"][0]);
    assert_eq!(stored(&s, "user:42").await.len(), 1);
    assert_eq!(stored(&s, "chat:room1").await.len(), 1);
}

/// Scopes are per publisher, not per channel: another key, and another
/// token subject, have keys of their own; one publisher's key names one
/// operation whichever channel it is sent to.
#[tokio::test]
async fn keys_are_scoped_per_publisher_not_per_channel() {
    let s = TestServer::with(secured).await;
    let a = publish(&s, PUBLISH_KEY, json!({"channel":"a","data":1,"id":"k"})).await;
    let b = publish(&s, OTHER_KEY, json!({"channel":"a","data":1,"id":"k"})).await;
    assert_eq!(
        b["duplicate"],
        json!([false]),
        "another key is another publisher"
    );
    let u1 = publish(
        &s,
        &browser_token("u1"),
        json!({"channel":"chat:room1","data":1,"id":"k"}),
    )
    .await;
    let u2 = publish(
        &s,
        &browser_token("u2"),
        json!({"channel":"chat:room1","data":1,"id":"k"}),
    )
    .await;
    assert_eq!(u1["duplicate"], json!([false]));
    assert_eq!(
        u2["duplicate"],
        json!([false]),
        "another subject is another publisher"
    );

    // Positive control, across channels: the same publisher's key on another
    // channel is the same operation, a duplicate of the first.
    let other_channel = publish(&s, PUBLISH_KEY, json!({"channel":"b","data":1,"id":"k"})).await;
    assert_eq!(other_channel["duplicate"], json!([true]));
    assert_eq!(other_channel["ids"][0], a["ids"][0]);
    assert!(stored(&s, "b").await.is_empty());
}
