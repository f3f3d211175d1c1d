//! Outbound webhooks and `pushgate listen` against the real binary: crash
//! safety under `kill -9`, and the CLI's tailing, forwarding and resuming.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::webhooks::{Receiver, verify_all};

const T: Duration = Duration::from_secs(30);

/// `pushgate serve` as a child process on a fixed loopback port.
struct BinServer {
    child: Child,
    base: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl BinServer {
    async fn start(dir: &Path, port: u16, env: &[(&str, &str)]) -> BinServer {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pushgate"));
        cmd.arg("serve")
            .env("PUSHGATE_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env(
                "PUSHGATE_STORE__URL",
                format!("sqlite://{}/log.db", dir.display()),
            )
            .env("PUSHGATE_LOG", "warn,pushgate::deliver=info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start pushgate");
        let base = format!("http://127.0.0.1:{port}");
        let client = reqwest::Client::new();
        let start = Instant::now();
        loop {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(start.elapsed() < T, "pushgate did not start on {base}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        BinServer { child, base }
    }

    fn kill9(&mut self) {
        // SIGKILL: no shutdown path runs.
        self.child.kill().expect("kill -9");
        self.child.wait().unwrap();
    }
}

impl Drop for BinServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn every_matching_event_arrives_after_kill_9_mid_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let env = [
        ("PUSHGATE_DELIVERY__ALLOW_TARGETS", r#"["127.0.0.1/32"]"#),
        (
            "PUSHGATE_DELIVERY__RETRY_SCHEDULE",
            r#"["0s","200ms","500ms","1s"]"#,
        ),
        ("PUSHGATE_DELIVERY__TIMEOUT", "2s"),
        ("PUSHGATE_DELIVERY__POLL_INTERVAL", "100ms"),
        ("PUSHGATE_DELIVERY__PER_ENDPOINT", "2"),
    ];
    // A slow receiver, so deliveries are queued and in flight at the kill.
    let rx = Receiver::start("127.0.0.1", |_, _| {
        std::thread::sleep(Duration::from_millis(40));
        (200, vec![], String::new())
    })
    .await;
    let mut server = BinServer::start(dir.path(), port, &env).await;
    let client = reqwest::Client::new();
    let ep: Value = client
        .post(format!("{}/v1/endpoints", server.base))
        .json(&json!({"url": rx.url("/"), "channels": ["orders"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = ep["secret"].as_str().unwrap().to_string();

    let mut expected = HashSet::new();
    for round in 0..4 {
        let batch: Vec<Value> = (0..25)
            .map(|i| json!({"channel": "orders", "type": "order.created", "data": {"round": round, "i": i}}))
            .collect();
        let r: Value = client
            .post(format!("{}/v1/publish", server.base))
            .json(&json!({"events": batch}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for id in r["ids"].as_array().unwrap() {
            expected.insert(id.as_str().unwrap().to_string());
        }
    }
    // Events of another channel must not come along.
    client
        .post(format!("{}/v1/publish", server.base))
        .json(&json!({"channel": "other", "type": "x", "data": {}}))
        .send()
        .await
        .unwrap();
    rx.wait_for(3, T).await;
    server.kill9();
    let before_restart = rx.received().len();
    assert!(
        before_restart < expected.len(),
        "the kill came while deliveries were still queued ({before_restart} of {})",
        expected.len()
    );

    let server = BinServer::start(dir.path(), port, &env).await;
    let start = Instant::now();
    loop {
        let seen: HashSet<String> = rx
            .received()
            .iter()
            .map(|r| r.json()["id"].as_str().unwrap().to_string())
            .collect();
        if expected.is_subset(&seen) {
            assert!(seen.len() == expected.len(), "only matching events arrived");
            break;
        }
        assert!(
            start.elapsed() < T,
            "{} of {} events arrived after the restart",
            expected.intersection(&seen).count(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = rx.received();
    for r in &got {
        let seq = r.json()["id"]
            .as_str()
            .unwrap()
            .split('-')
            .next()
            .unwrap()
            .to_string();
        assert!(
            r.id.starts_with(&format!("msg_{seq}_")),
            "stable webhook-id {}",
            r.id
        );
    }
    verify_all(&secret, &got);
    drop(server);
}

/// Reads `listen`'s stdout line by line on a thread.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    fn of(child: &mut Child) -> Lines {
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines(rx)
    }

    fn next(&self) -> String {
        self.0
            .recv_timeout(T)
            .expect("a line from pushgate listen in time")
    }
}

fn listen(base: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pushgate"))
        .args(["listen", "--url", base, "--channel", "news"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pushgate listen")
}

async fn publish(base: &str, n: i64) -> String {
    let r: Value = reqwest::Client::new()
        .post(format!("{base}/v1/publish"))
        .json(&json!({"channel": "news", "type": "story", "data": {"n": n}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["ids"][0].as_str().unwrap().to_string()
}

#[tokio::test]
async fn listen_tails_a_channel_and_resumes_after_the_server_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut server = BinServer::start(dir.path(), port, &[]).await;
    let mut child = listen(&server.base, &["--json", "--since", "earliest"]);
    let lines = Lines::of(&mut child);
    let first = publish(&server.base, 1).await;
    let line: Value = serde_json::from_str(&lines.next()).unwrap();
    assert_eq!(line["id"], first.as_str());
    assert_eq!(line["data"], json!({"n": 1}));

    server.kill9();
    let server = BinServer::start(dir.path(), port, &[]).await;
    let second = publish(&server.base, 2).await;
    let third = publish(&server.base, 3).await;
    let got: Vec<Value> = (0..2)
        .map(|_| serde_json::from_str(&lines.next()).unwrap())
        .collect();
    assert_eq!(
        got[0]["id"],
        second.as_str(),
        "resumed after its last cursor, nothing repeated"
    );
    assert_eq!(got[1]["id"], third.as_str());
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test]
async fn listen_forwards_each_event_signed_to_a_local_url() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinServer::start(dir.path(), free_port(), &[]).await;
    let rx = Receiver::ok("127.0.0.1").await;
    let secret = pushgate::deliver::sign::generate_secret();
    let mut child = listen(
        &server.base,
        &[
            "--forward-to",
            &rx.url("/local-hook"),
            "--secret",
            &secret,
            "--json",
        ],
    );
    let lines = Lines::of(&mut child);
    // Published after listen connected: wait until its stream is open.
    let start = Instant::now();
    let mut ids = Vec::new();
    while rx.received().is_empty() {
        assert!(start.elapsed() < T, "listen never forwarded");
        ids.push(publish(&server.base, ids.len() as i64).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status: Value = serde_json::from_str(&lines.next()).unwrap();
    assert_eq!(status["status"], 200);
    let got = rx.received();
    assert_eq!(got[0].path, "/local-hook");
    assert!(ids.iter().any(|id| got[0].json()["id"] == id.as_str()));
    verify_all(&secret, &got);
    child.kill().unwrap();
    child.wait().unwrap();
}
