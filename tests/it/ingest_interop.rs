//! Interop: signatures made by the providers' own public signing functions
//! (npm `stripe`, `@octokit/webhooks-methods`, `standardwebhooks`, run by
//! `node tests/js/sign.mjs`) are accepted; tampered ones are refused.
//! Signing in Rust here would only test our code against itself.
//!
//! Needs Node.js and `npm install` in tests/js (scripts/test.sh does it):
//! without them these tests fail, they never skip.

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::common::*;
use crate::ingest::{events, payload, post, source};

const SECRET: &str = "whsec_c2VjcmV0LXR3bw==";

/// Headers from the provider's library, for `payload` at `timestamp`.
async fn provider_sign(
    kind: &str,
    payload: &str,
    timestamp: i64,
    id: &str,
) -> Vec<(String, String)> {
    let js = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    assert!(
        js.join("node_modules/stripe").is_dir()
            && js.join("node_modules/@octokit/webhooks-methods").is_dir()
            && js.join("node_modules/standardwebhooks").is_dir(),
        "the interop tests need the providers' npm packages: run `npm install` in tests/js (scripts/test.sh does)"
    );
    let mut child = tokio::process::Command::new("node")
        .arg(js.join("sign.mjs"))
        .current_dir(&js)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the interop tests need Node.js (`node`) on PATH");
    let input = json!({"kind": kind, "secret": SECRET, "payload": payload, "timestamp": timestamp, "id": id});
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.to_string().as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    assert!(
        out.status.success(),
        "node tests/js/sign.mjs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let headers: Value = serde_json::from_slice(&out.stdout).expect("sign.mjs prints JSON");
    let mut pairs: Vec<(String, String)> = headers
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    pairs.push(("content-type".into(), "application/json".into()));
    if kind == "github" {
        pairs.push(("x-github-event".into(), "push".into()));
        pairs.push(("x-github-delivery".into(), id.into()));
    }
    pairs
}

#[tokio::test]
async fn provider_libraries_signatures_are_accepted_and_tampering_refused() {
    let s = TestServer::with(|c| {
        for kind in ["stripe", "github", "standard"] {
            let mut src = source(kind);
            src.secrets = vec![SECRET.into()];
            c.sources.push(src);
        }
    })
    .await;
    let now = pushgate::auth::unix_now() as i64;
    for kind in ["stripe", "github", "standard"] {
        let id = format!("evt_interop_{kind}");
        let body = payload(&id, Some("interop"));
        let headers = provider_sign(kind, &body, now, &id).await;
        let path = format!("/webhooks/{kind}");

        let (st, v) = post(&s, &path, &headers, body.clone()).await;
        assert_eq!(
            st, 200,
            "{kind}: the provider's own signature is accepted: {v}"
        );
        assert_eq!(v["duplicate"], false);

        let tampered = body.replace("2000", "1");
        let (st, v) = post(&s, &path, &headers, tampered).await;
        assert_eq!(st, 401, "{kind}: a tampered body is refused: {v}");
        assert_eq!(v["error"]["code"], "invalid_signature");

        let other_secret: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| {
                // Flip one hex/base64 character of the signature itself.
                if k == "stripe-signature" || k == "x-hub-signature-256" || k == "webhook-signature"
                {
                    let mut chars: Vec<char> = v.chars().collect();
                    let last = chars.len() - 2;
                    chars[last] = if chars[last] == 'a' { 'b' } else { 'a' };
                    (k.clone(), chars.into_iter().collect())
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect();
        let (st, _) = post(&s, &path, &other_secret, body.clone()).await;
        assert_eq!(st, 401, "{kind}: a tampered signature is refused");
    }
    // Timestamps made by the libraries are checked too.
    for kind in ["stripe", "standard"] {
        let id = format!("evt_old_{kind}");
        let body = payload(&id, Some("interop"));
        let headers = provider_sign(kind, &body, now - 3600, &id).await;
        let (st, v) = post(&s, &format!("/webhooks/{kind}"), &headers, body).await;
        assert_eq!(st, 400, "{kind}: {v}");
        assert_eq!(v["error"]["code"], "timestamp_out_of_tolerance");
    }
    assert_eq!(events(&s, "user:interop").await.len(), 3);
}
