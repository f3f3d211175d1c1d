//! `pushgate-bench deliver`: outbound webhooks to a local receiver.
//!
//! Starts a fresh pushgate (`target::Target`), a receiver on 127.0.0.1 in
//! this process, and `--endpoints` endpoints (one path each) subscribed to
//! one channel. Nchan has no outbound webhooks, so there is no peer row.
//! Two phases:
//! - throughput: publish `--events` events in batches as fast as the server
//!   acknowledges, and time until every endpoint has every event
//!   (deliveries/s, server CPU per delivery);
//! - latency: publish `--rate` events/s for `--seconds`, and measure from
//!   just before each publish to each delivery's arrival (p50/p99/max).
//!
//! Prints one JSON object. Traffic stays on loopback.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use serde_json::{Value, json};

use crate::Opts;
use crate::target::Target;

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

pub async fn deliver(opts: &Opts) -> Result<Value, String> {
    let endpoints: usize = opts.get("endpoints", 100);
    let events: usize = opts.get("events", 1000);
    let batch: usize = opts.get("batch", 50).max(1);
    let rate: u64 = opts.get("rate", 20).max(1);
    let seconds: u64 = opts.get("seconds", 5);
    let workers: usize = opts.get("workers", 64);
    let per_endpoint: usize = opts.get("per-endpoint", 4);
    // `--store postgres://…` (a fresh database) runs the server on it;
    // without it, a fresh SQLite file.
    let store = opts.str("store", "");
    let tally = Arc::new(Mutex::new(Tally::default()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let receiver = listener.local_addr().map_err(|e| e.to_string())?;
    let app = axum::Router::new()
        .fallback(axum::routing::post(receive))
        .with_state(tally.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });

    let workers_env = workers.to_string();
    let per_endpoint_env = per_endpoint.to_string();
    let mut env = vec![
        ("PUSHGATE_DELIVERY__ALLOW_TARGETS", r#"["127.0.0.1/32"]"#),
        ("PUSHGATE_DELIVERY__WORKERS", &workers_env),
        ("PUSHGATE_DELIVERY__PER_ENDPOINT", &per_endpoint_env),
    ];
    if !store.is_empty() {
        env.push(("PUSHGATE_STORE__URL", store.as_str()));
    }
    let server = Target::start("pushgate", &env).await?;
    let base = format!("http://{}", server.addr);
    let client = reqwest::Client::new();
    for i in 0..endpoints {
        let r = client
            .post(format!("{base}/v1/endpoints"))
            .json(&json!({"url": format!("http://{receiver}/ep/{i}"), "channels": ["bench"]}))
            .send()
            .await
            .map_err(|e| format!("create endpoint: {e}"))?;
        if r.status() != 201 {
            return Err(format!("create endpoint: {}", r.status()));
        }
    }

    // Throughput.
    let expected = events * endpoints;
    let cpu_before = server.cpu_us();
    let started = Instant::now();
    let mut n = 0u64;
    while (n as usize) < events {
        let size = batch.min(events - n as usize);
        let events: Vec<Value> = (0..size)
            .map(|k| json!({"channel": "bench", "type": "bench.tick", "data": {"n": n + k as u64}}))
            .collect();
        n += size as u64;
        let r = client
            .post(format!("{base}/v1/publish"))
            .json(&json!({"events": events}))
            .send()
            .await
            .map_err(|e| format!("publish: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("publish: {}", r.status()));
        }
    }
    let published_in = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(600);
    while tally.lock().unwrap().total < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed();
    let delivered = tally.lock().unwrap().total;
    let server_cpu_s = (server.cpu_us() - cpu_before) as f64 / 1e6;
    let complete = {
        let t = tally.lock().unwrap();
        (0..events as u64).all(|i| t.per_event.get(&i).copied().unwrap_or(0) >= endpoints)
    };
    let rss_after_throughput = server.rss_kib();

    // Latency at a fixed rate.
    tally.lock().unwrap().latencies_us.clear();
    let total_before = tally.lock().unwrap().total;
    let count = rate * seconds;
    let gap = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
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
            .map_err(|e| format!("publish: {e}"))?;
        if !r.status().is_success() {
            return Err(format!("publish: {}", r.status()));
        }
    }
    let want = total_before + count as usize * endpoints;
    let deadline = Instant::now() + Duration::from_secs(120);
    while tally.lock().unwrap().total < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut lat = tally.lock().unwrap().latencies_us.clone();
    lat.sort_unstable();

    let out = json!({
        "mode": "deliver",
        "target": "pushgate",
        "endpoints": endpoints,
        "workers": workers,
        "per_endpoint": per_endpoint,
        "throughput": {
            "events": events,
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
            "events_per_second": rate,
            "events": count,
            "deliveries": lat.len(),
            "p50_ms": crate::pct(&lat, 0.50) as f64 / 1000.0,
            "p99_ms": crate::pct(&lat, 0.99) as f64 / 1000.0,
            "max_ms": lat.last().map(|v| *v as f64 / 1000.0).unwrap_or(0.0),
        },
    });
    Ok(out)
}
