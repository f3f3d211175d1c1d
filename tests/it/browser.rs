//! The demo page and the client library in a real browser: headless Debian
//! Chromium driven by `tests/js/browser-*.mjs` (playwright-core), against the
//! real server — the real binary where it must restart on the same port — and
//! a real buffering nginx. Chromium, nginx, node and the npm packages are
//! installed by scripts/test.sh; when one is missing these tests fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::common::*;

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js")
}

/// Everything a browser test needs, or a failure that says how to get it.
fn require_tools() {
    assert!(
        Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: apt-get install -y chromium (scripts/test.sh does)"
    );
    assert!(
        js_dir().join("node_modules/playwright-core").exists(),
        "tests/js/node_modules/playwright-core is missing: (cd tests/js && npm install) (scripts/test.sh does)"
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.is_ok_and(|o| o.status.success()),
        "node is missing: apt-get install -y nodejs"
    );
}

/// One `node tests/js/<script> URL` run, spoken to line by line.
struct Script {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
    name: String,
}

impl Script {
    fn start(script: &str, url: &str) -> Script {
        require_tools();
        let mut child = Command::new("node")
            .arg(js_dir().join(script))
            .arg(url)
            .current_dir(js_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn node");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Script {
            child,
            stdin,
            lines,
            name: script.to_string(),
        }
    }

    /// The next line starting with `prefix`; a FAIL line or the end fails the test.
    async fn expect(&mut self, prefix: &str) -> String {
        let name = self.name.clone();
        tokio::time::timeout(Duration::from_secs(90), async {
            loop {
                let line = self
                    .lines
                    .next_line()
                    .await
                    .unwrap()
                    .unwrap_or_else(|| panic!("{name} ended before printing {prefix}"));
                println!("[{name}] {line}");
                if line.starts_with("FAIL") {
                    panic!("{name}: {line}");
                }
                if line.starts_with(prefix) {
                    return line;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name}: no {prefix} line within 90 s"))
    }

    async fn tell(&mut self, line: &str) {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn finish(mut self) -> String {
        let ok = self.expect("OK").await;
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("script exits")
            .unwrap();
        assert!(status.success(), "{} exited with {status}", self.name);
        ok
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn_on(dir: &Path, port: u16) -> ServerProcess {
    let listen = format!("127.0.0.1:{port}");
    // The demo page asks for a short backoff; keep the server's own timers short too.
    ServerProcess::spawn(
        dir,
        &[
            ("PUSHGATE_SERVER__LISTEN", &listen),
            ("PUSHGATE_SERVER__HEARTBEAT", "2s"),
        ],
    )
}

/// SIGTERM, then wait for a clean exit (contract 6: streams closed, exit 0).
fn stop(mut server: ServerProcess) {
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &server.pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            assert!(status.success(), "pushgate exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pushgate did not stop within 15 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn publish(base: &str, channel: &str, data: Value) -> String {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/publish"))
        .json(&json!({"channel": channel, "type": "notice", "data": data}))
        .send()
        .await
        .expect("publish");
    assert_eq!(r.status(), 200);
    r.json::<Value>().await.unwrap()["ids"][0]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn pay_button_signed_webhook_shows_a_toast_within_5s() {
    // What `pushgate serve` does in development mode: a `demo` Stripe source.
    let s = TestServer::with(|c| {
        pushgate::ingest::add_demo_source(c).expect("development mode adds the demo source");
    })
    .await;
    let script = Script::start("browser-toast.mjs", &s.base);
    let ok = script.finish().await;
    println!("{ok}");
    // The event is in the log, from the demo source, as a signed webhook.
    let events = read_all(&s.client, &s.base, "user:demo").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "payment_intent.succeeded");
    assert_eq!(events[0]["source"], "demo");
}

#[tokio::test]
async fn events_appended_while_the_server_was_down_arrive_once_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = spawn_on(dir.path(), port);
    let mut script = Script::start("browser-restart.mjs", &server.base);
    script.expect("LIVE").await;
    let first = publish(&server.base, "user:demo", json!({"n": 1})).await;
    script.tell(&format!("IDS {first}")).await;
    script.expect("READY").await;

    stop(server);
    // While the page's server is down, another pushgate on the same log
    // takes three events.
    let other = spawn_on(dir.path(), free_port());
    let mut ids = Vec::new();
    for n in 2..=4 {
        ids.push(publish(&other.base, "user:demo", json!({"n": n})).await);
    }
    stop(other);
    let back = spawn_on(dir.path(), port);
    script.tell(&format!("IDS {}", ids.join(" "))).await;
    println!("{}", script.finish().await);
    drop(back);
}

#[tokio::test]
async fn websocket_chat_reconnects_with_backoff_after_a_restart_and_publishes_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = spawn_on(dir.path(), port);
    let mut script = Script::start("browser-chat.mjs", &server.base);
    script.expect("READY").await;
    stop(server);
    let back = spawn_on(dir.path(), port);
    script.tell("RESTARTED").await;
    println!("{}", script.finish().await);
    // Both messages are in the log, once each.
    let chat = read_all(&reqwest::Client::new(), &back.base, "chat:demo").await;
    let texts: Vec<&str> = chat
        .iter()
        .map(|e| e["data"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["before restart", "after restart"]);
    assert!(chat.iter().all(|e| e["source"] == "ws"));
}

/// nginx in front of pushgate, configured the way that breaks SSE in the
/// wild: `proxy_buffering on`, `X-Accel-Buffering: no` ignored, and gzip on
/// `text/event-stream` (nginx alone passes small writes through as they come;
/// compressing them holds everything back until the response ends).
struct Nginx {
    child: std::process::Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Nginx {
    fn start(upstream: &str) -> Nginx {
        assert!(
            Path::new("/usr/sbin/nginx").exists(),
            "/usr/sbin/nginx is missing: apt-get install -y nginx (scripts/test.sh does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let d = dir.path().display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{upstream};
            proxy_http_version 1.1;
            proxy_buffering on;
            proxy_ignore_headers X-Accel-Buffering;
            gzip on;
            gzip_types text/event-stream;
            gzip_min_length 0;
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;
            proxy_read_timeout 120s;
        }}
    }}
}}
"#
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = std::process::Command::new("/usr/sbin/nginx")
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.path().join("error.log"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn nginx");
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            base,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn behind_a_buffering_proxy_the_client_falls_back_to_long_polling_and_misses_nothing() {
    let s = TestServer::start().await;
    let nginx = Nginx::start(&s.addr.to_string());

    // Positive control: through the proxy, nothing of a live stream arrives
    // (not the first bytes, not an event published meanwhile), while the
    // same stream straight from pushgate delivers the event.
    use futures_util::StreamExt;
    let probe = publish(&s.base, "probe", json!("held back?")).await;
    let through_proxy = async {
        let resp = reqwest::Client::new()
            .get(format!(
                "{}/v1/stream?channel=probe&since=earliest",
                nginx.base
            ))
            .header("accept-encoding", "gzip")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes_stream().next().await
    };
    let got = tokio::time::timeout(Duration::from_millis(2500), through_proxy).await;
    assert!(
        got.is_err(),
        "nginx passed the stream through ({got:?}): it is not buffering"
    );
    let mut direct = s.sse("channel=probe&since=earliest").await;
    assert_eq!(
        direct
            .next_timeout(Duration::from_secs(5))
            .await
            .unwrap()
            .id
            .as_deref(),
        Some(probe.as_str())
    );

    let mut script = Script::start("browser-proxy.mjs", &nginx.base);
    script.expect("LIVE").await;
    // Published while the page is still on its (buffered) SSE stream.
    let early = [
        publish(&s.base, "user:demo", json!({"n": 1})).await,
        publish(&s.base, "user:demo", json!({"n": 2})).await,
    ];
    script.tell(&format!("IDS {}", early.join(" "))).await;
    script.expect("POLLING").await;
    let mut late = Vec::new();
    for n in 3..=5 {
        late.push(publish(&s.base, "user:demo", json!({"n": n})).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    script.tell(&format!("IDS {}", late.join(" "))).await;
    println!("{}", script.finish().await);
}

#[tokio::test]
async fn the_client_library_and_demo_page_are_served() {
    let s = TestServer::start().await;
    let js = s.client.get(s.url("/client.js")).send().await.unwrap();
    assert_eq!(js.status(), 200);
    assert!(
        js.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/javascript")
    );
    let text = js.text().await.unwrap();
    assert!(text.contains("export class Pushgate"));
    let page = s.client.get(s.url("/demo")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.text()
            .await
            .unwrap()
            .contains("import { Pushgate } from '/client.js'")
    );
    let dts = s.client.get(s.url("/client.d.ts")).send().await.unwrap();
    assert!(
        dts.text()
            .await
            .unwrap()
            .contains("export declare class Pushgate")
    );
}

#[tokio::test]
async fn pay_exists_only_in_development_mode() {
    let s = TestServer::with(|c| c.auth.publish_keys = vec!["pk_1".into()]).await;
    let r = s.client.post(s.url("/demo/pay")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "not_found");
}

#[tokio::test]
async fn dashboard_shows_live_events_the_inspector_and_endpoints() {
    let s = TestServer::with(|c| {
        pushgate::ingest::add_demo_source(c).expect("development mode adds the demo source");
        c.delivery.allow_private_targets = true;
    })
    .await;
    // One signed webhook from the demo source, for the inspector.
    let r = s.client.post(s.url("/demo/pay")).send().await.unwrap();
    assert!(r.status().is_success(), "pay: {}", r.status());
    let script = Script::start("browser-dashboard.mjs", &s.base);
    println!("{}", script.finish().await);
    let endpoints: Value = s
        .client
        .get(s.url("/v1/endpoints"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        endpoints["endpoints"][0]["url"], "http://127.0.0.1:9/hook",
        "created from the page"
    );
}

#[tokio::test]
async fn dashboard_data_needs_the_admin_key() {
    let s = TestServer::with(|c| c.auth.admin_keys = vec!["ak_dashboard_test".into()]).await;
    assert_eq!(
        s.client.get(s.url("/")).send().await.unwrap().status(),
        200,
        "the page itself is static"
    );
    let refused = s.client.get(s.url("/v1/inbound")).send().await.unwrap();
    assert_eq!(refused.status(), 401);
    let allowed = s
        .client
        .get(s.url("/v1/inbound"))
        .bearer_auth("ak_dashboard_test")
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), 200);
    let sse = s
        .client
        .get(s.url("/v1/stream?channel=user:demo"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 401);
    let sse = s
        .client
        .get(s.url("/v1/stream?channel=user:demo&token=ak_dashboard_test"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        sse.status(),
        200,
        "the admin key reads any channel, as the dashboard does"
    );
}
