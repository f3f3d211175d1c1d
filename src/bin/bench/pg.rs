//! `pushgate-bench pg`: the PostgreSQL log with one and with three nodes.
//!
//! Starts N pushgate nodes (each its own process, the release binary, on a
//! loopback port) on a fresh database, floods them with durable publishes
//! from 64 concurrent publishers (publisher i talks to node i mod N), and
//! reads everything back over SSE on every node. Reports per node count:
//! acknowledged appends/s, publish latency, and publish→receive latency of
//! events received on a node other than the one they were published on
//! (the bench process stamps the send time and reads the receive time, so
//! one clock measures both).
//! Then measures what the append lock costs PostgreSQL by itself (`lock`):
//! single-row transactions per second from many connections, with and
//! without `pg_advisory_xact_lock`.
//!
//! Options: `--url postgres://…/postgres` (maintenance database; default
//! `postgres://postgres@127.0.0.1:5432/postgres`), `--publishers 64`,
//! `--seconds 10`, `--nodes 1,3`. The result is one JSON object; each run
//! is also printed to stderr as it finishes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use sqlx::{ConnectOptions, Connection, Executor};

use crate::Opts;
use crate::target::Target;

pub async fn pg(opts: &Opts) -> Result<Value, String> {
    let url = opts.str("url", "postgres://postgres@127.0.0.1:5432/postgres");
    let publishers: usize = opts.get("publishers", 64);
    let seconds: u64 = opts.get("seconds", 10);
    let node_counts: Vec<usize> = opts
        .str("nodes", "1,3")
        .split(',')
        .map(|n| {
            n.parse()
                .map_err(|_| format!("--nodes: `{n}` is not a number"))
        })
        .collect::<Result<_, _>>()?;
    let mut runs = Vec::new();
    for &nodes in &node_counts {
        let db = ScratchDb::create(&url).await?;
        let result = flood(&db.url, nodes, publishers, seconds).await;
        db.drop_now().await;
        let result = result?;
        eprintln!("{result}");
        runs.push(result);
    }
    let db = ScratchDb::create(&url).await?;
    let mut lock = Vec::new();
    for conns in [3usize, 64] {
        let r = lock_cost(&db.url, conns, seconds.min(5)).await;
        eprintln!("{r}");
        lock.push(r);
    }
    db.drop_now().await;
    Ok(json!({"mode": "pg", "target": "pushgate", "runs": runs, "lock": lock}))
}

struct ScratchDb {
    maintenance: String,
    name: String,
    url: String,
}

impl ScratchDb {
    async fn create(maintenance: &str) -> Result<ScratchDb, String> {
        let name = format!("pushgate_bench_{}", std::process::id());
        let mut c = connect(maintenance).await;
        c.execute(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .await
        .expect("drop old bench database");
        c.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("create bench database");
        let mut url = url::Url::parse(maintenance).map_err(|e| format!("--url: {e}"))?;
        url.set_path(&format!("/{name}"));
        Ok(ScratchDb {
            maintenance: maintenance.to_string(),
            name,
            url: url.to_string(),
        })
    }

    async fn drop_now(self) {
        let mut c = connect(&self.maintenance).await;
        let _ = c
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .await;
    }
}

async fn connect(url: &str) -> sqlx::PgConnection {
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("PostgreSQL url");
    options.connect().await.expect("connect to PostgreSQL")
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn ms(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// N nodes (separate `pushgate serve` processes, release binary) on one
/// database; `publishers` concurrent publishers, publisher i on node i mod N.
async fn flood(
    db_url: &str,
    nodes: usize,
    publishers: usize,
    seconds: u64,
) -> Result<Value, String> {
    let epoch = Instant::now();
    let mut targets = Vec::new();
    for _ in 0..nodes {
        targets.push(Target::start("pushgate", &[("PUSHGATE_STORE__URL", db_url)]).await?);
    }
    let bases: Vec<String> = targets
        .iter()
        .map(|t| format!("http://{}", t.addr))
        .collect();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(publishers)
        .build()
        .unwrap();
    for base in &bases {
        let mut ready = false;
        for _ in 0..200 {
            if let Ok(r) = client.get(format!("{base}/readyz")).send().await
                && r.status().is_success()
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !ready {
            return Err(format!("{base} never became ready"));
        }
    }
    let cpu0: Vec<u64> = targets.iter().map(|t| t.cpu_us()).collect();

    // One SSE reader per node, recording the latency of events published elsewhere.
    let mut readers = Vec::new();
    for (n, base) in bases.iter().enumerate() {
        let url = format!("{base}/v1/stream?channel=bench");
        let client = client.clone();
        readers.push(tokio::spawn(async move {
            let resp = client.get(url).send().await.expect("SSE");
            let mut stream = resp.bytes_stream();
            let mut buf: Vec<u8> = Vec::new();
            let mut cross: Vec<f64> = Vec::new();
            let mut received = 0u64;
            while let Some(Ok(chunk)) = stream.next().await {
                buf.extend_from_slice(&chunk);
                while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
                    let block: Vec<u8> = buf.drain(..end + 2).collect();
                    let text = String::from_utf8_lossy(&block);
                    let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) else {
                        continue;
                    };
                    let Ok(env) = serde_json::from_str::<Value>(data) else {
                        continue;
                    };
                    if env["data"]["stop"].as_bool() == Some(true) {
                        return (received, cross);
                    }
                    received += 1;
                    let from = env["data"]["node"].as_u64().unwrap_or(0) as usize;
                    let sent_us = env["data"]["t"].as_u64().unwrap_or(0);
                    if from != n {
                        let now_us = epoch.elapsed().as_micros() as u64;
                        cross.push(now_us.saturating_sub(sent_us) as f64 / 1000.0);
                    }
                }
            }
            (received, cross)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let client = client.clone();
        let node = p % nodes;
        let url = format!("{}/v1/publish", bases[node]);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = epoch.elapsed().as_micros() as u64;
                let started = Instant::now();
                let ok = client
                    .post(&url)
                    .json(&json!({"channel": "bench", "type": "bench", "data": {"node": node, "t": t, "pad": "x".repeat(64)}}))
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                } else {
                    failed += 1;
                }
            }
            (latencies, failed)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut publish_ms = Vec::new();
    let mut failed = 0;
    for t in tasks {
        let (l, f) = t.await.unwrap();
        publish_ms.extend(l);
        failed += f;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let _ = client
        .post(format!("{}/v1/publish", bases[0]))
        .json(&json!({"channel": "bench", "type": "stop", "data": {"stop": true}}))
        .send()
        .await;
    let mut cross_ms = Vec::new();
    let mut received = Vec::new();
    for r in readers {
        let (n, c) = tokio::time::timeout(Duration::from_secs(60), r)
            .await
            .expect("readers finish")
            .unwrap();
        received.push(n);
        cross_ms.extend(c);
    }
    let cpu_s: f64 = targets
        .iter()
        .zip(cpu0)
        .map(|(t, c0)| (t.cpu_us() - c0) as f64 / 1e6)
        .sum();
    drop(targets);
    // Group commit at work: how many append transactions carried the events
    // (each row's xmin is the transaction that inserted it).
    let (events, transactions): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT xmin::text) FROM events")
            .fetch_one(&mut connect(db_url).await)
            .await
            .map_err(|e| e.to_string())?;
    publish_ms.sort_by(f64::total_cmp);
    cross_ms.sort_by(f64::total_cmp);
    Ok(json!({
        "nodes": nodes,
        "publishers": publishers,
        "seconds": ms(elapsed),
        "acknowledged": publish_ms.len(),
        "failed": failed,
        "appends_per_s": (publish_ms.len() as f64 / elapsed).round(),
        "publish_p50_ms": ms(percentile(&publish_ms, 0.5)),
        "publish_p99_ms": ms(percentile(&publish_ms, 0.99)),
        "received_per_node": received,
        "cross_node_samples": cross_ms.len(),
        "cross_node_p50_ms": ms(percentile(&cross_ms, 0.5)),
        "cross_node_p99_ms": ms(percentile(&cross_ms, 0.99)),
        "server_cpu_s": ms(cpu_s),
        "append_transactions": transactions,
        "events_per_transaction": ms(events as f64 / transactions.max(1) as f64),
    }))
}

/// Single-row durable transactions per second from `conns` connections,
/// with and without the append lock: what serializing commits costs
/// PostgreSQL before pushgate's group commit amortizes it.
async fn lock_cost(db_url: &str, conns: usize, seconds: u64) -> Value {
    let mut setup = connect(db_url).await;
    setup
        .execute("CREATE TABLE IF NOT EXISTS lock_probe (id BIGSERIAL PRIMARY KEY, v TEXT)")
        .await
        .expect("probe table");
    let mut out = serde_json::Map::new();
    out.insert("connections".into(), conns.into());
    for locked in [false, true] {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let stop = stop.clone();
            let url = db_url.to_string();
            tasks.push(tokio::spawn(async move {
                let mut c = connect(&url).await;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut tx = c.begin().await.unwrap();
                    if locked {
                        sqlx::query("SELECT pg_advisory_xact_lock($1)")
                            .bind(pushgate::store::postgres::APPEND_LOCK)
                            .execute(&mut *tx)
                            .await
                            .unwrap();
                    }
                    sqlx::query("INSERT INTO lock_probe (v) VALUES ('x')")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                    n += 1;
                }
                n
            }));
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let key = if locked {
            "tx_per_s_locked"
        } else {
            "tx_per_s_unlocked"
        };
        out.insert(key.into(), (total as f64 / seconds as f64).round().into());
    }
    Value::Object(out)
}
