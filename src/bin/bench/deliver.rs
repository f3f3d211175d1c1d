//! `pushgate-bench deliver`: outbound webhooks to a local receiver.
//!
//! Starts a fresh `pushgate serve` (the binary beside this one, or
//! `--pushgate PATH`) on a temporary SQLite log, a receiver on 127.0.0.1 in
//! this process, and N endpoints (one path each) subscribed to one channel.
//! Two phases:
//! - throughput: publish `--events` events in batches as fast as the server
//!   acknowledges, and time until every endpoint has every event
//!   (deliveries/s, server CPU per delivery);
//! - latency: publish `--rate` events/s for `--seconds`, and measure from
//!   just before each publish to each delivery's arrival (p50/p99/max).
//!
//! Prints one JSON object. Traffic stays on loopback.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use serde_json::{Value, json};

struct Opts {
    endpoints: usize,
    events: usize,
    batch: usize,
    rate: u64,
    seconds: u64,
    workers: usize,
    per_endpoint: usize,
    pushgate: String,
}

fn opts(args: &[String]) -> Opts {
    let get = |name: &str| {
        args.windows(2)
            .find(|w| w[0] == format!("--{name}"))
            .map(|w| w[1].clone())
    };
    let num = |name: &str, default: u64| -> u64 {
        get(name)
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("--{name} takes a number"))
            })
            .unwrap_or(default)
    };
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("pushgate")))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "pushgate".into());
    Opts {
        endpoints: num("endpoints", 100) as usize,
        events: num("events", 1000) as usize,
        batch: num("batch", 50) as usize,
        rate: num("rate", 20),
        seconds: num("seconds", 5),
        workers: num("workers", 64) as usize,
        per_endpoint: num("per-endpoint", 4) as usize,
        pushgate: get("pushgate").unwrap_or(beside),
    }
}

#[derive(Default)]
struct Tally {
    /// Deliveries received per event number.
    per_event: HashMap<u64, usize>,
    total: usize,
    /// Microseconds from publish to arrival, latency phase only.
    latencies_us: Vec<u64>,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

async fn receive(State(tally): State<Arc<Mutex<Tally>>>, body: Bytes) -> &'static str {
    let arrived = now_us();
    let v: Value = serde_json::from_slice(&body).unwrap_or_default();
    let n = v["data"]["n"].as_u64().unwrap_or(u64::MAX);
    let sent = v["data"]["sent_us"].as_u64();
    let mut t = tally.lock().unwrap();
    *t.per_event.entry(n).or_default() += 1;
    t.total += 1;
    if let Some(sent) = sent {
        t.latencies_us.push(arrived.saturating_sub(sent));
    }
    "ok"
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
    field(11) + field(12)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn run(args: &[String]) {
    let o = opts(args);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(axum::routing::post(receive))
        .with_state(tally.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = tempfile_dir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&o.pushgate)
        .arg("serve")
        .env("PUSHGATE_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("PUSHGATE_STORE__URL", format!("sqlite://{dir}/bench.db"))
        .env("PUSHGATE_DELIVERY__ALLOW_TARGETS", r#"["127.0.0.1/32"]"#)
        .env("PUSHGATE_DELIVERY__WORKERS", o.workers.to_string())
        .env(
            "PUSHGATE_DELIVERY__PER_ENDPOINT",
            o.per_endpoint.to_string(),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", o.pushgate));
    let pid = child.id();
    let _server = Server(child);
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for i in 0..o.endpoints {
        let r = client
            .post(format!("{base}/v1/endpoints"))
            .json(&json!({"url": format!("http://{receiver}/ep/{i}"), "channels": ["bench"]}))
            .send()
            .await
            .expect("create endpoint");
        assert_eq!(r.status(), 201, "create endpoint");
    }

    // Throughput.
    let expected = o.events * o.endpoints;
    let cpu_before = cpu_ticks(pid);
    let started = Instant::now();
    let mut n = 0u64;
    while (n as usize) < o.events {
        let size = o.batch.min(o.events - n as usize);
        let events: Vec<Value> = (0..size)
            .map(|k| json!({"channel": "bench", "type": "bench.tick", "data": {"n": n + k as u64}}))
            .collect();
        n += size as u64;
        let r = client
            .post(format!("{base}/v1/publish"))
            .json(&json!({"events": events}))
            .send()
            .await
            .expect("publish");
        assert!(r.status().is_success(), "publish: {}", r.status());
    }
    let published_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while tally.lock().unwrap().total < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let delivered = tally.lock().unwrap().total;
    let ticks = cpu_ticks(pid) - cpu_before;
    let clk = 100.0; // USER_HZ on Linux
    let server_cpu_s = ticks as f64 / clk;
    let complete = {
        let t = tally.lock().unwrap();
        (0..o.events as u64).all(|i| t.per_event.get(&i).copied().unwrap_or(0) >= o.endpoints)
    };
    let rss_after_throughput = rss_kib(pid);

    // Latency at a fixed rate.
    tally.lock().unwrap().latencies_us.clear();
    let total_before = tally.lock().unwrap().total;
    let count = o.rate * o.seconds;
    let gap = Duration::from_secs_f64(1.0 / o.rate.max(1) as f64);
    let mut next = Instant::now();
    for i in 0..count {
        tokio::time::sleep_until(next.into()).await;
        next += gap;
        let body = json!({"channel": "bench", "type": "bench.latency",
                          "data": {"n": 1_000_000 + i, "sent_us": now_us()}});
        let r = client
            .post(format!("{base}/v1/publish"))
            .json(&body)
            .send()
            .await
            .expect("publish");
        assert!(r.status().is_success());
    }
    let want = total_before + count as usize * o.endpoints;
    let deadline = Instant::now() + Duration::from_secs(120);
    while tally.lock().unwrap().total < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut lat = tally.lock().unwrap().latencies_us.clone();
    lat.sort_unstable();

    let out = json!({
        "mode": "deliver",
        "target": "pushgate",
        "endpoints": o.endpoints,
        "workers": o.workers,
        "per_endpoint": o.per_endpoint,
        "throughput": {
            "events": o.events,
            "deliveries": delivered,
            "complete": complete,
            "publish_seconds": published_in.as_secs_f64(),
            "seconds": elapsed.as_secs_f64(),
            "deliveries_per_second": delivered as f64 / elapsed.as_secs_f64(),
            "server_cpu_seconds": server_cpu_s,
            "server_cpu_us_per_delivery": server_cpu_s * 1e6 / delivered.max(1) as f64,
            "server_rss_kib": rss_after_throughput,
        },
        "latency": {
            "events_per_second": o.rate,
            "events": count,
            "deliveries": lat.len(),
            "p50_ms": percentile(&lat, 0.50),
            "p99_ms": percentile(&lat, 0.99),
            "max_ms": lat.last().map(|v| *v as f64 / 1000.0).unwrap_or(0.0),
        },
    });
    println!("{}", serde_json::to_string_pretty(&out).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> String {
    let dir = std::env::temp_dir().join(format!(
        "pushgate-bench-deliver-{}-{}",
        std::process::id(),
        now_us()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir.display().to_string()
}
