//! `idle` and `fanout`: many real SSE connections (raw sockets spread over
//! 127.0.0.x source addresses, so the client side costs as little as possible),
//! one publisher, and the server's CPU and RSS from /proc.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;

use crate::target::Target;
use crate::{Opts, now_ns, pct};

/// Opens one SSE connection from `source` and waits for the first body bytes.
async fn open_sse(
    addr: SocketAddr,
    source: Ipv4Addr,
    path: &str,
) -> Result<(TcpStream, Vec<u8>), String> {
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(source.into(), 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let mut s = sock
        .connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 2048];
    let mut have = 0;
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf[have..]))
            .await
            .map_err(|_| "no response head in 30 s".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before the response head".into());
        }
        have += n;
        if let Some(end) = find(&buf[..have], b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 200") {
                return Err(format!(
                    "bad response: {}",
                    String::from_utf8_lossy(&buf[..end])
                ));
            }
            return Ok((s, buf[end + 4..have].to_vec()));
        }
        if have == buf.len() {
            return Err("response head too large".into());
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn source_ip(i: usize, per_source: usize) -> Ipv4Addr {
    let n = (i / per_source) as u32;
    Ipv4Addr::new(127, 0, (1 + n / 250) as u8, (2 + n % 250) as u8)
}

async fn open_many(
    target: &Target,
    channel: &str,
    conns: usize,
) -> Result<Vec<(TcpStream, Vec<u8>)>, String> {
    let path = target.sse_path(channel);
    let mut out = Vec::with_capacity(conns);
    let mut pending = Vec::new();
    for i in 0..conns {
        let addr = target.addr;
        let path = path.clone();
        pending.push(tokio::spawn(async move {
            open_sse(addr, source_ip(i, 2000), &path).await
        }));
        if pending.len() == 200 {
            for p in pending.drain(..) {
                out.push(p.await.map_err(|e| e.to_string())??);
            }
        }
    }
    for p in pending {
        out.push(p.await.map_err(|e| e.to_string())??);
    }
    Ok(out)
}

/// RSS per idle SSE connection: (RSS with N open − RSS before) / N.
pub async fn idle(opts: &Opts) -> Result<serde_json::Value, String> {
    let conns: usize = opts.get("conns", 1000);
    let target = Target::start(&opts.str("target", "pushgate"), &[]).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = target.rss_kib();
    let streams = open_many(&target, "idle", conns).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = target.rss_kib();
    let per_conn = (after.saturating_sub(before)) as f64 * 1024.0 / conns as f64;
    drop(streams);
    Ok(json!({
        "mode": "idle", "target": target.name(), "connections": conns,
        "rss_before_kib": before, "rss_after_kib": after,
        "rss_per_connection_bytes": per_conn.round(),
    }))
}

struct Shared {
    received: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
}

/// Reads SSE bytes, counting events and their publish→receive latency
/// (events carry their publish time as `"t":<unix ns>`).
async fn reader(mut s: TcpStream, mut buf: Vec<u8>, expected: usize, shared: Arc<Shared>) {
    let mut lat = Vec::with_capacity(expected);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut got = 0;
    while got < expected {
        while let Some(pos) = find(&buf, b"\"t\":") {
            let start = pos + 4;
            let digits = buf[start..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            if start + digits >= buf.len() {
                break; // the number may continue in the next read
            }
            let t: u64 = std::str::from_utf8(&buf[start..start + digits])
                .unwrap()
                .parse()
                .unwrap_or(0);
            lat.push(now_ns().saturating_sub(t) / 1000);
            got += 1;
            buf.drain(..start + digits);
        }
        if got >= expected {
            break;
        }
        let keep = buf.len().min(32);
        buf.drain(..buf.len() - keep);
        match tokio::time::timeout(Duration::from_secs(60), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    shared.received.fetch_add(got as u64, Ordering::Relaxed);
    shared.latencies_us.lock().await.extend(lat);
}

/// N subscribers on one channel; M events published back to back (or at
/// `--rate` per second) by one publisher; deliveries/s, server CPU per
/// delivery, latency.
pub async fn fanout(opts: &Opts) -> Result<serde_json::Value, String> {
    let subs: usize = opts.get("subs", 1000);
    let events: usize = opts.get("events", 200);
    let rate: f64 = opts.get("rate", 0.0);
    let publishers: usize = opts.get("publishers", 1);
    let pad = "x".repeat(opts.get("pad", 40));
    let target = Target::start(&opts.str("target", "pushgate"), &[]).await?;
    let streams = open_many(&target, "fan", subs).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = target.rss_kib();

    let shared = Arc::new(Shared {
        received: AtomicU64::new(0),
        latencies_us: Mutex::new(Vec::new()),
    });
    let mut readers = Vec::with_capacity(subs);
    for (s, buf) in streams {
        readers.push(tokio::spawn(reader(s, buf, events, shared.clone())));
    }

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(publishers)
        .build()
        .unwrap();
    let cpu0 = target.cpu_us();
    let started = Instant::now();
    let per_publisher = events / publishers;
    let mut pubs = Vec::new();
    for p in 0..publishers {
        let n = if p == publishers - 1 {
            events - per_publisher * (publishers - 1)
        } else {
            per_publisher
        };
        let client = client.clone();
        let reqs: Vec<(String, String)> = (0..n)
            .map(|_| target.publish_request("fan", 0, &pad))
            .collect();
        let gap = if rate > 0.0 {
            Some(Duration::from_secs_f64(publishers as f64 / rate))
        } else {
            None
        };
        pubs.push(tokio::spawn(async move {
            let mut next = Instant::now();
            for (url, body) in reqs {
                if let Some(gap) = gap {
                    tokio::time::sleep_until(next.into()).await;
                    next += gap;
                }
                // Stamp the publish time as late as possible.
                let body = body.replacen("\"t\":0", &format!("\"t\":{}", now_ns()), 1);
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("publish: {}", r.status()));
                }
            }
            Ok::<(), String>(())
        }));
    }
    for p in pubs {
        p.await.map_err(|e| e.to_string())??;
    }
    let published = started.elapsed();
    for r in readers {
        let _ = r.await;
    }
    let elapsed = started.elapsed();
    let cpu = target.cpu_us() - cpu0;
    let rss_peak = target.rss_kib();
    let received = shared.received.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *shared.latencies_us.lock().await);
    lat.sort_unstable();
    Ok(json!({
        "mode": "fanout", "target": target.name(), "subscribers": subs, "events": events,
        "rate_per_s": rate, "publishers": publishers,
        "expected_deliveries": subs * events, "deliveries": received,
        "publish_seconds": published.as_secs_f64(), "seconds": elapsed.as_secs_f64(),
        "deliveries_per_s": (received as f64 / elapsed.as_secs_f64()).round(),
        "server_cpu_us_per_delivery": (cpu as f64 / received.max(1) as f64 * 100.0).round() / 100.0,
        "server_cpu_seconds": cpu as f64 / 1e6,
        "latency_ms": {"p50": pct(&lat, 0.5) as f64 / 1000.0, "p99": pct(&lat, 0.99) as f64 / 1000.0, "max": lat.last().copied().unwrap_or(0) as f64 / 1000.0},
        "rss_idle_kib": rss_idle, "rss_after_kib": rss_peak,
    }))
}
