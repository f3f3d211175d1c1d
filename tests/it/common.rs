//! Test harness: a real pushgate on an ephemeral loopback port, real clients.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use pushgate::config::Config;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub struct TestServer {
    pub addr: SocketAddr,
    pub base: String,
    pub dir: tempfile::TempDir,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), pushgate::ServeError>>>,
}

/// A configuration for tests: SQLite in `dir`, development mode.
pub fn test_config(dir: &std::path::Path) -> Config {
    let mut c = Config::load(None, Vec::new()).expect("default config");
    c.store.url = format!("sqlite://{}/log.db", dir.display());
    c
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::with(|_| {}).await
    }

    pub async fn with(adjust: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = test_config(dir.path());
        adjust(&mut config);
        TestServer::start_in(dir, config).await
    }

    /// Starts on a given directory (to restart on the same log).
    pub async fn start_in(dir: tempfile::TempDir, config: Config) -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let handle = tokio::spawn(pushgate::serve(listener, config, async move {
            let _ = rx.await;
        }));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let base = format!("http://{addr}");
        // Ready when /readyz answers.
        for _ in 0..100 {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await
                && r.status().is_success()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        TestServer {
            addr,
            base,
            dir,
            client,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Graceful stop; returns the directory so a test can restart on it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("serve task").expect("serve result");
        }
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    /// Publishes one event; returns its cursor.
    pub async fn publish(&self, channel: &str, kind: &str, data: Value) -> String {
        let r = self
            .client
            .post(self.url("/v1/publish"))
            .json(&serde_json::json!({"channel": channel, "type": kind, "data": data}))
            .send()
            .await
            .expect("publish");
        assert_eq!(r.status(), 200, "publish failed");
        let v: Value = r.json().await.unwrap();
        v["ids"][0].as_str().unwrap().to_string()
    }

    pub async fn sse(&self, query: &str) -> SseClient {
        SseClient::connect(
            &self.client,
            &self.url(&format!("/v1/stream?{query}")),
            None,
        )
        .await
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}

/// A minimal, spec-following EventSource reader over a real HTTP response.
pub struct SseClient {
    stream:
        std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buf: Vec<u8>,
    pub headers: reqwest::header::HeaderMap,
    pub comments: usize,
    pub retry: Option<u64>,
}

impl SseClient {
    pub async fn connect(
        client: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
    ) -> SseClient {
        let mut req = client
            .get(url)
            .header("accept", "text/event-stream")
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.expect("connect SSE");
        assert_eq!(resp.status(), 200, "SSE status for {url}");
        let headers = resp.headers().clone();
        SseClient {
            stream: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            headers,
            comments: 0,
            retry: None,
        }
    }

    /// Like `connect`, but a refused or failed connection is an error, not
    /// a panic (for clients that reconnect elsewhere, as browsers do).
    pub async fn try_connect(
        client: &reqwest::Client,
        url: &str,
        last_event_id: Option<&str>,
    ) -> Result<SseClient, String> {
        let mut req = client
            .get(url)
            .header("accept", "text/event-stream")
            .timeout(Duration::from_secs(3600));
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.map_err(|e| e.to_string())?;
        if resp.status() != 200 {
            return Err(format!("status {}", resp.status()));
        }
        Ok(SseClient::from_response(resp))
    }

    /// Wraps an already-sent request's response (for custom headers).
    pub fn from_response(resp: reqwest::Response) -> SseClient {
        assert_eq!(resp.status(), 200, "SSE status");
        let headers = resp.headers().clone();
        SseClient {
            stream: Box::pin(resp.bytes_stream()),
            buf: Vec::new(),
            headers,
            comments: 0,
            retry: None,
        }
    }

    /// The next event (comments and `retry:` are consumed along the way).
    /// Panics after `timeout`.
    pub async fn next_timeout(&mut self, timeout: Duration) -> Option<SseEvent> {
        tokio::time::timeout(timeout, self.next())
            .await
            .expect("timed out waiting for an SSE event")
    }

    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(pos) = find_blank_line(&self.buf) {
                let block: Vec<u8> = self.buf.drain(..pos.0).collect();
                self.buf.drain(..pos.1 - pos.0);
                let mut ev = SseEvent::default();
                let mut has_field = false;
                for line in String::from_utf8_lossy(&block).lines() {
                    if line.starts_with(':') {
                        self.comments += 1;
                        continue;
                    }
                    let (field, value) = match line.split_once(':') {
                        Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                        None => (line, ""),
                    };
                    match field {
                        "id" => {
                            ev.id = Some(value.to_string());
                            has_field = true;
                        }
                        "event" => ev.event = Some(value.to_string()),
                        "data" => {
                            if has_field && !ev.data.is_empty() {
                                ev.data.push('\n');
                            }
                            ev.data.push_str(value);
                            has_field = true;
                        }
                        "retry" => self.retry = value.parse().ok(),
                        _ => {}
                    }
                }
                if !ev.data.is_empty() {
                    return Some(ev);
                }
                continue;
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                _ => return None,
            }
        }
    }
}

fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    buf.windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| (p, p + 2))
}

/// The real `pushgate` binary as a child process (for kill -9 and SIGTERM
/// tests). Listens on an ephemeral port; its log lives in `dir`.
pub struct ServerProcess {
    pub child: std::process::Child,
    pub base: String,
    pub pid: u32,
}

impl ServerProcess {
    pub fn spawn(dir: &std::path::Path, extra_env: &[(&str, &str)]) -> ServerProcess {
        use std::io::BufRead;
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pushgate"));
        cmd.arg("serve")
            .env("PUSHGATE_SERVER__LISTEN", "127.0.0.1:0")
            .env(
                "PUSHGATE_STORE__URL",
                format!("sqlite://{}/log.db", dir.display()),
            )
            .env("PUSHGATE_LOG", "warn")
            .current_dir(dir)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn pushgate");
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(stdout).lines();
        let base = loop {
            let line = lines
                .next()
                .expect("pushgate exited before listening")
                .unwrap();
            if let Some(rest) = line.strip_prefix("pushgate listening on ") {
                break rest.trim().to_string();
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let pid = child.id();
        ServerProcess { child, base, pid }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// All events of `channel` from the start of the retained log, by polling.
pub async fn read_all(client: &reqwest::Client, base: &str, channel: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = "earliest".to_string();
    loop {
        let v: Value = client
            .get(format!(
                "{base}/v1/events?channel={channel}&after={after}&limit=1000"
            ))
            .send()
            .await
            .expect("poll")
            .json()
            .await
            .expect("poll json");
        let events = v["events"].as_array().unwrap().clone();
        after = v["next"].as_str().unwrap().to_string();
        if events.is_empty() {
            return out;
        }
        out.extend(events);
    }
}

/// The seq inside one of our cursors (tests may look; clients may not).
pub fn seq_of(cursor: &str) -> i64 {
    cursor.split('-').next().unwrap().parse().unwrap()
}
