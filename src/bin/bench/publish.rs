//! `publish`: durable appends through the HTTP API with many concurrent
//! publishers; `sqlite-baseline`: the same rows inserted by bare SQLite in
//! batches with the same `synchronous`, for the ratio.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::target::Target;
use crate::{Opts, pct};

pub async fn publish(opts: &Opts) -> Result<serde_json::Value, String> {
    let concurrency: usize = opts.get("concurrency", 64);
    let seconds: f64 = opts.get("seconds", 5.0);
    let sync = opts.str("synchronous", "full");
    let target = Target::start(
        "pushgate",
        &[("PUSHGATE_STORE__SYNCHRONOUS", sync.as_str())],
    )
    .await?;
    let url = format!("http://{}/v1/publish", target.addr);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let cpu0 = target.cpu_us();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..concurrency {
        let client = client.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let body = format!("{{\"channel\":\"bench:{p}\",\"type\":\"bench\",\"data\":{{\"i\":{i},\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}}}}");
                let t = Instant::now();
                let r = client.post(&url).header("content-type", "application/json").body(body).send().await.map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("publish: {}", r.status()));
                }
                let _ = r.bytes().await;
                lat.push(t.elapsed().as_micros() as u64);
                i += 1;
            }
            Ok::<Vec<u64>, String>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| e.to_string())??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = target.cpu_us() - cpu0;
    lat.sort_unstable();
    Ok(json!({
        "mode": "publish", "target": "pushgate", "synchronous": sync, "concurrency": concurrency,
        "events": lat.len(), "events_per_s": (lat.len() as f64 / elapsed).round(),
        "ack_latency_ms": {"p50": pct(&lat, 0.5) as f64 / 1000.0, "p99": pct(&lat, 0.99) as f64 / 1000.0},
        "server_cpu_us_per_event": (cpu as f64 / lat.len().max(1) as f64).round(),
    }))
}

/// Bare rusqlite: the same table shape, `batch` rows per transaction, for `seconds`.
pub fn sqlite_baseline(opts: &Opts) -> Result<serde_json::Value, String> {
    let batch: usize = opts.get("batch", 64);
    let seconds: f64 = opts.get("seconds", 5.0);
    let sync = opts.str("synchronous", "full");
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut conn =
        rusqlite::Connection::open(dir.path().join("base.db")).map_err(|e| e.to_string())?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| e.to_string())?;
    conn.pragma_update(None, "synchronous", &sync)
        .map_err(|e| e.to_string())?;
    conn.execute_batch(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, channel TEXT NOT NULL, type TEXT NOT NULL,
         source TEXT NOT NULL, source_id TEXT, time_ms INTEGER NOT NULL, data TEXT NOT NULL);
         CREATE INDEX events_by_channel ON events (channel, seq);",
    )
    .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let mut n = 0u64;
    while Instant::now() < deadline {
        let tx = conn.transaction().map_err(|e| e.to_string())?;
        {
            let mut stmt = tx
                .prepare_cached("INSERT INTO events (seq, channel, type, source, source_id, time_ms, data) VALUES (?1, ?2, 'bench', 'publish', NULL, 0, ?3)")
                .map_err(|e| e.to_string())?;
            for _ in 0..batch {
                n += 1;
                stmt.execute(rusqlite::params![
                    n as i64,
                    format!("bench:{}", n % 64),
                    format!("{{\"i\":{n},\"pad\":\"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}}")
                ])
                .map_err(|e| e.to_string())?;
            }
        }
        tx.commit().map_err(|e| e.to_string())?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(json!({
        "mode": "sqlite-baseline", "synchronous": sync, "batch": batch,
        "events": n, "events_per_s": (n as f64 / elapsed).round(),
    }))
}
