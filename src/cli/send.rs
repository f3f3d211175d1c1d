//! `pushgate send <kind> --url URL --secret S [--event TYPE] [--data k=v]…`:
//! signs and sends a realistic sample webhook of a provider, the way that
//! provider would, and prints pushgate's reply. A new user sees the whole
//! pipeline work without a provider account.
//!
//! `--data path=value` sets a string at a dotted path of the payload
//! (`data.object.metadata.user_id=42`); `--data path:=json` sets any JSON
//! value (`data.object.amount:=4900`).

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, ValueEnum};
use serde_json::{Map, Value, json};

use crate::ingest::hmac::{Algorithm, Encoding};
use crate::ingest::{github, hmac, shopify, standard, stripe};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Kind {
    Stripe,
    Github,
    Shopify,
    Standard,
    Hmac,
    None,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum AlgorithmArg {
    Sha256,
    Sha1,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum EncodingArg {
    Hex,
    Base64,
}

#[derive(Args, Debug)]
pub struct SendArgs {
    /// Which provider to imitate.
    #[arg(value_enum)]
    pub kind: Kind,
    /// Where to send it, e.g. http://127.0.0.1:8080/webhooks/demo
    #[arg(long)]
    pub url: String,
    /// The source's signing secret (not needed for `none`).
    #[arg(long, env = "PUSHGATE_SEND_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// Event type: stripe payment_intent.succeeded (default), invoice.paid,
    /// customer.subscription.updated; github push (default), pull_request;
    /// shopify orders/create (default); any other name is sent with the
    /// kind's default sample.
    #[arg(long)]
    pub event: Option<String>,
    /// Payload override: `path=string` or `path:=json`, by dotted path
    /// (repeatable), e.g. data.object.metadata.user_id=42
    #[arg(long = "data", value_name = "PATH=VALUE")]
    pub data: Vec<String>,
    /// `hmac` only: the signature header.
    #[arg(long, default_value = "x-signature")]
    pub header: String,
    /// `hmac` only: text before the signature.
    #[arg(long, default_value = "sha256=")]
    pub prefix: String,
    /// `hmac` only.
    #[arg(long, value_enum, default_value = "sha256")]
    pub algorithm: AlgorithmArg,
    /// `hmac` only.
    #[arg(long, value_enum, default_value = "hex")]
    pub encoding: EncodingArg,
    /// Also print the request that was sent.
    #[arg(long, short)]
    pub verbose: bool,
}

/// A request ready to send: headers and the exact body bytes that were signed.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Exit codes: 0 the server accepted it (2xx), 1 it did not or could not be
/// reached, 2 bad arguments.
pub async fn run(args: SendArgs) -> i32 {
    let prepared = match prepare(&args, unix_now()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pushgate send: {e:#}");
            return 2;
        }
    };
    match send(&args.url, &prepared, args.verbose).await {
        Ok(ok) => {
            if ok {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("pushgate send: {e:#}");
            1
        }
    }
}

async fn send(url: &str, prepared: &Prepared, verbose: bool) -> anyhow::Result<bool> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let mut req = client.post(url).body(prepared.body.clone());
    for (k, v) in &prepared.headers {
        req = req.header(k, v);
    }
    if verbose {
        println!("POST {url}");
        for (k, v) in &prepared.headers {
            println!("{k}: {v}");
        }
        println!();
        println!("{}", String::from_utf8_lossy(&prepared.body));
        println!();
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("could not reach {url}"))?;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    println!("{} {}", status.as_u16(), text.trim_end());
    Ok(status.is_success())
}

/// Builds the sample, applies the overrides, signs it. `now` is Unix seconds.
pub fn prepare(args: &SendArgs, now: i64) -> anyhow::Result<Prepared> {
    let secret = match (args.kind, &args.secret) {
        (Kind::None, _) => String::new(),
        (_, Some(s)) if !s.is_empty() => s.clone(),
        (kind, _) => bail!("--secret is required for {kind:?} (the source's signing secret)"),
    };
    let event = args.event.as_deref();
    let (mut body, mut headers) = match args.kind {
        Kind::Stripe => (
            stripe_sample(event.unwrap_or("payment_intent.succeeded"), now),
            vec![],
        ),
        Kind::Github => github_sample(event.unwrap_or("push")),
        Kind::Shopify => shopify_sample(event.unwrap_or("orders/create"), now),
        Kind::Standard | Kind::Hmac | Kind::None => {
            (generic_sample(event.unwrap_or("invoice.paid"), now), vec![])
        }
    };
    for assignment in &args.data {
        apply_override(&mut body, assignment)?;
    }
    // Pretty-printed, as most providers send it: the stored payload keeps
    // these exact bytes.
    let bytes = serde_json::to_vec_pretty(&body)?;
    headers.push(("content-type".into(), "application/json".into()));
    match args.kind {
        Kind::Stripe => headers.push((
            "stripe-signature".into(),
            stripe::signature_header(&secret, now, &bytes),
        )),
        Kind::Github => headers.push((
            github::HEADER.into(),
            github::signature_header(&secret, &bytes),
        )),
        Kind::Shopify => headers.push((
            shopify::HEADER.into(),
            shopify::signature_header(&secret, &bytes),
        )),
        Kind::Standard => {
            let id = format!("msg_{}", random_id(27));
            let sig = standard::signature_header(&secret, &id, now, &bytes)
                .map_err(|e| anyhow!("--secret: {e}"))?;
            headers.push(("webhook-id".into(), id));
            headers.push(("webhook-timestamp".into(), now.to_string()));
            headers.push(("webhook-signature".into(), sig));
        }
        Kind::Hmac => {
            let algorithm = match args.algorithm {
                AlgorithmArg::Sha256 => Algorithm::Sha256,
                AlgorithmArg::Sha1 => Algorithm::Sha1,
            };
            let encoding = match args.encoding {
                EncodingArg::Hex => Encoding::Hex,
                EncodingArg::Base64 => Encoding::Base64,
            };
            headers.push((
                args.header.clone(),
                hmac::signature_header(&secret, &bytes, algorithm, encoding, &args.prefix),
            ));
        }
        Kind::None => {}
    }
    Ok(Prepared {
        headers,
        body: bytes,
    })
}

/// Sets `path=string` or `path:=json` in `body`, creating objects on the way.
pub fn apply_override(body: &mut Value, assignment: &str) -> anyhow::Result<()> {
    let (path, value) = if let Some((p, v)) = assignment.split_once(":=") {
        let parsed: Value = serde_json::from_str(v)
            .with_context(|| format!("--data {assignment}: the value after := is not JSON"))?;
        (p, parsed)
    } else if let Some((p, v)) = assignment.split_once('=') {
        (p, Value::String(v.to_string()))
    } else {
        bail!("--data {assignment}: write path=value or path:=json");
    };
    let segments: Vec<&str> = path.split('.').collect();
    if path.is_empty() || segments.iter().any(|s| s.is_empty()) {
        bail!("--data {assignment}: `{path}` is not a dotted path");
    }
    let mut node = body;
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        let index = match &*node {
            Value::Array(items) => segment.parse::<usize>().ok().filter(|i| *i < items.len()),
            _ => None,
        };
        if let Some(index) = index {
            if last {
                node[index] = value;
                return Ok(());
            }
            node = &mut node[index];
            continue;
        }
        if !node.is_object() {
            *node = Value::Object(Map::new());
        }
        let map = node.as_object_mut().expect("made an object above");
        if last {
            map.insert(segment.to_string(), value);
            return Ok(());
        }
        node = map
            .entry(segment.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    Ok(())
}

fn unix_now() -> i64 {
    crate::clock::unix_now() as i64
}

fn random_id(n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn uuid_like() -> String {
    use rand::Rng;
    let b: [u8; 16] = rand::rng().random();
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Provider timestamps in the samples, in the one shape pushgate writes.
fn rfc3339(unix: i64) -> String {
    crate::clock::rfc3339(unix.saturating_mul(1000))
}

/// A Stripe event as Stripe sends it (API version 2024-06-20 shapes).
pub fn stripe_sample(kind: &str, now: i64) -> Value {
    let customer = format!("cus_{}", random_id(14));
    let object = match kind {
        "invoice.paid" => json!({
            "id": format!("in_{}", random_id(24)),
            "object": "invoice",
            "account_country": "US",
            "amount_due": 4900,
            "amount_paid": 4900,
            "amount_remaining": 0,
            "billing_reason": "subscription_cycle",
            "collection_method": "charge_automatically",
            "created": now,
            "currency": "usd",
            "customer": customer,
            "customer_email": "jenny.rosen@example.com",
            "hosted_invoice_url": "https://invoice.stripe.com/i/acct_1Nx/test_YWNjdF8x",
            "livemode": false,
            "metadata": {"user_id": "42"},
            "number": "B7A1C2D3-0004",
            "paid": true,
            "period_end": now,
            "period_start": now - 30 * 86400,
            "status": "paid",
            "subscription": format!("sub_{}", random_id(24)),
            "total": 4900
        }),
        "customer.subscription.updated" => json!({
            "id": format!("sub_{}", random_id(24)),
            "object": "subscription",
            "cancel_at_period_end": false,
            "created": now - 14 * 86400,
            "currency": "usd",
            "current_period_end": now + 30 * 86400,
            "current_period_start": now,
            "customer": customer,
            "items": {
                "object": "list",
                "data": [{
                    "id": format!("si_{}", random_id(14)),
                    "object": "subscription_item",
                    "price": {
                        "id": "price_1NxPro",
                        "object": "price",
                        "currency": "usd",
                        "product": "prod_Pro",
                        "recurring": {"interval": "month", "interval_count": 1},
                        "unit_amount": 4900
                    },
                    "quantity": 1
                }]
            },
            "livemode": false,
            "metadata": {"user_id": "42"},
            "status": "active",
            "trial_end": now
        }),
        _ => json!({
            "id": format!("pi_{}", random_id(24)),
            "object": "payment_intent",
            "amount": 2000,
            "amount_capturable": 0,
            "amount_received": 2000,
            "capture_method": "automatic_async",
            "client_secret": null,
            "created": now,
            "currency": "usd",
            "customer": customer,
            "description": "Pushgate Pro (monthly)",
            "latest_charge": format!("ch_{}", random_id(24)),
            "livemode": false,
            "metadata": {"user_id": "42", "order_id": "6735"},
            "payment_method": format!("pm_{}", random_id(24)),
            "payment_method_types": ["card"],
            "receipt_email": "jenny.rosen@example.com",
            "status": "succeeded"
        }),
    };
    let mut data = json!({"object": object});
    if kind == "customer.subscription.updated" {
        data["previous_attributes"] = json!({"status": "trialing"});
    }
    json!({
        "id": format!("evt_{}", random_id(24)),
        "object": "event",
        "api_version": "2024-06-20",
        "created": now,
        "data": data,
        "livemode": false,
        "pending_webhooks": 1,
        "request": {"id": format!("req_{}", random_id(14)), "idempotency_key": uuid_like()},
        "type": kind
    })
}

/// A GitHub delivery: body and GitHub's headers (`X-GitHub-Event`, …).
pub fn github_sample(event: &str) -> (Value, Vec<(String, String)>) {
    let repository = json!({
        "id": 123456789,
        "node_id": "R_kgDOHf1a2b",
        "name": "webapp",
        "full_name": "octo-org/webapp",
        "private": false,
        "owner": {"login": "octo-org", "id": 9919, "type": "Organization"},
        "html_url": "https://github.com/octo-org/webapp",
        "default_branch": "main"
    });
    let sender = json!({"login": "octocat", "id": 583231, "type": "User"});
    let sha = hex::encode(rand::random::<[u8; 20]>());
    let before = hex::encode(rand::random::<[u8; 20]>());
    let body = if event == "pull_request" {
        json!({
            "action": "opened",
            "number": 1347,
            "pull_request": {
                "id": 1890934412,
                "number": 1347,
                "state": "open",
                "title": "Add live payment notifications",
                "user": sender,
                "body": "Pushes each paid invoice to the user's browser.",
                "html_url": "https://github.com/octo-org/webapp/pull/1347",
                "head": {"ref": "live-notifications", "sha": sha},
                "base": {"ref": "main", "sha": before},
                "draft": false,
                "merged": false
            },
            "repository": repository,
            "sender": sender
        })
    } else {
        let commit = json!({
            "id": sha,
            "message": "Push payment events to the browser",
            "timestamp": "2026-11-29T09:00:00Z",
            "url": format!("https://github.com/octo-org/webapp/commit/{sha}"),
            "author": {"name": "Mona Lisa Octocat", "email": "mona@github.com", "username": "octocat"},
            "added": ["src/notify.js"],
            "removed": [],
            "modified": ["src/app.js"]
        });
        json!({
            "ref": "refs/heads/main",
            "before": before,
            "after": sha,
            "created": false,
            "deleted": false,
            "forced": false,
            "compare": format!("https://github.com/octo-org/webapp/compare/{}...{}", &before[..12], &sha[..12]),
            "commits": [commit],
            "head_commit": commit,
            "pusher": {"name": "octocat", "email": "mona@github.com"},
            "repository": repository,
            "sender": sender
        })
    };
    let headers = vec![
        ("user-agent".into(), "GitHub-Hookshot/7a3b2c1".into()),
        ("x-github-event".into(), event.to_string()),
        ("x-github-delivery".into(), uuid_like()),
        ("x-github-hook-id".into(), "292430182".into()),
        (
            "x-github-hook-installation-target-type".into(),
            "repository".into(),
        ),
        (
            "x-github-hook-installation-target-id".into(),
            "123456789".into(),
        ),
    ];
    (body, headers)
}

/// A Shopify `orders/create` delivery and Shopify's headers.
pub fn shopify_sample(topic: &str, now: i64) -> (Value, Vec<(String, String)>) {
    let order_id: u64 = 820_982_911_946_154_508 + rand::random::<u16>() as u64;
    let body = json!({
        "id": order_id,
        "admin_graphql_api_id": format!("gid://shopify/Order/{order_id}"),
        "name": "#1001",
        "order_number": 1001,
        "email": "jon@example.com",
        "created_at": rfc3339(now),
        "currency": "USD",
        "financial_status": "paid",
        "fulfillment_status": null,
        "subtotal_price": "45.00",
        "total_tax": "4.00",
        "total_price": "49.00",
        "customer": {
            "id": 115310627314723954u64,
            "email": "jon@example.com",
            "first_name": "Jon",
            "last_name": "Doe"
        },
        "line_items": [{
            "id": 866550311766439020u64,
            "title": "Pushgate T-shirt",
            "quantity": 1,
            "price": "45.00",
            "sku": "PG-TEE-M",
            "variant_id": 808950810,
            "product_id": 632910392
        }],
        "note_attributes": [],
        "test": true
    });
    let headers = vec![
        ("user-agent".into(), "Shopify-Captain-Hook".into()),
        ("x-shopify-topic".into(), topic.to_string()),
        (
            "x-shopify-shop-domain".into(),
            "pushgate-demo.myshopify.com".into(),
        ),
        ("x-shopify-api-version".into(), "2024-07".into()),
        ("x-shopify-webhook-id".into(), uuid_like()),
        ("x-shopify-event-id".into(), uuid_like()),
        ("x-shopify-triggered-at".into(), rfc3339(now)),
    ];
    (body, headers)
}

/// A Standard Webhooks style event (`type`, `timestamp`, `data`), also used
/// for `hmac` and `none`.
pub fn generic_sample(kind: &str, now: i64) -> Value {
    json!({
        "id": format!("evt_{}", random_id(20)),
        "type": kind,
        "timestamp": rfc3339(now),
        "data": {
            "invoice_id": format!("inv_{}", random_id(12)),
            "customer_id": format!("cus_{}", random_id(12)),
            "user_id": "42",
            "amount": 4900,
            "currency": "usd",
            "status": "paid"
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_by_dotted_path() {
        let mut v = json!({"data": {"object": {"metadata": {"user_id": "42"}}}, "list": [1, 2]});
        apply_override(&mut v, "data.object.metadata.user_id=demo").unwrap();
        apply_override(&mut v, "data.object.amount:=4900").unwrap();
        apply_override(&mut v, "new.deep.key=x=y").unwrap();
        apply_override(&mut v, "list.1:={\"a\":true}").unwrap();
        assert_eq!(v["data"]["object"]["metadata"]["user_id"], "demo");
        assert_eq!(v["data"]["object"]["amount"], 4900);
        assert_eq!(v["new"]["deep"]["key"], "x=y");
        assert_eq!(v["list"][1]["a"], true);
        assert!(apply_override(&mut v, "novalue").is_err());
        assert!(apply_override(&mut v, "a..b=1").is_err());
        assert!(apply_override(&mut v, "a:=not json").is_err());
    }

    #[test]
    fn samples_have_the_fields_routing_reads() {
        let s = stripe_sample("invoice.paid", 1_700_000_000);
        assert_eq!(s["type"], "invoice.paid");
        assert!(s["id"].as_str().unwrap().starts_with("evt_"));
        assert!(
            s["data"]["object"]["customer"]
                .as_str()
                .unwrap()
                .starts_with("cus_")
        );
        let (pr, headers) = github_sample("pull_request");
        assert_eq!(pr["action"], "opened");
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "x-github-event" && v == "pull_request")
        );
        let (_, headers) = shopify_sample("orders/create", 0);
        assert!(headers.iter().any(|(k, _)| k == "x-shopify-webhook-id"));
    }
}
