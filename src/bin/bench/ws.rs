//! `ws-idle` and `ws-fanout`: the WebSocket side of `idle` and `fanout`.
//! Raw client sockets (handshake and frames written by hand, so the client
//! side costs as little as possible) spread over 127.0.0.x source addresses;
//! pushgate subscribes with one `subscribe` op per connection on `/v1/ws`,
//! Nchan with its WebSocket subscriber (`/ws?id=CHANNEL`). Server CPU and
//! RSS come from /proc, as in `fanout`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Mutex;

use crate::target::{Kind, Target};
use crate::{Opts, now_ns, pct};

pub async fn run(mode: &str, opts: &Opts) -> Result<Value, String> {
    match mode {
        "ws-idle" => idle(opts).await,
        _ => fanout(opts).await,
    }
}

fn source_ip(i: usize, per_source: usize) -> Ipv4Addr {
    let n = (i / per_source) as u32;
    Ipv4Addr::new(127, 0, (1 + n / 250) as u8, (2 + n % 250) as u8)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A masked client frame (RFC 6455 5.3: clients always mask).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// One complete server frame at the start of `buf`: (opcode, payload range, frame length).
fn parse_frame(buf: &[u8]) -> Option<(u8, std::ops::Range<usize>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= at + len).then_some((opcode, at..at + len, at + len))
}

/// Opens one WebSocket from `source`, subscribed to `channel`; returns the
/// socket and any bytes read past the subscription's confirmation.
async fn open_ws(
    target: &Target,
    source: Ipv4Addr,
    channel: &str,
) -> Result<(TcpStream, Vec<u8>), String> {
    let pushgate = matches!(target.kind, Kind::Pushgate);
    let path = if pushgate {
        "/v1/ws".to_string()
    } else {
        format!("/ws?id={channel}")
    };
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind(SocketAddr::new(source.into(), 0))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let mut s = sock
        .connect(target.addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.addr
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    let rest = loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk))
            .await
            .map_err(|_| "no handshake reply in 30 s".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed during the handshake".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 101") {
                return Err(format!(
                    "handshake refused: {}",
                    String::from_utf8_lossy(&buf[..end])
                ));
            }
            break buf.split_off(end + 4);
        }
    };
    if !pushgate {
        return Ok((s, rest));
    }
    let op = format!("{{\"op\":\"subscribe\",\"channels\":[\"{channel}\"]}}");
    s.write_all(&client_frame(1, op.as_bytes()))
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = rest;
    loop {
        while let Some((opcode, payload, len)) = parse_frame(&buf) {
            let text = buf[payload].to_vec();
            buf.drain(..len);
            if opcode == 1 && find(&text, b"\"op\":\"subscribed\"").is_some() {
                return Ok((s, buf));
            }
            if opcode == 1 && find(&text, b"\"op\":\"error\"").is_some() {
                return Err(String::from_utf8_lossy(&text).into_owned());
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut chunk))
            .await
            .map_err(|_| "no `subscribed` in 30 s".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before `subscribed`".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn open_many(
    target: &Arc<Target>,
    channel: &str,
    conns: usize,
) -> Result<Vec<(TcpStream, Vec<u8>)>, String> {
    let mut out = Vec::with_capacity(conns);
    let mut pending = Vec::new();
    for i in 0..conns {
        let target = target.clone();
        let channel = channel.to_string();
        pending.push(tokio::spawn(async move {
            open_ws(&target, source_ip(i, 2000), &channel).await
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

/// RSS per idle WebSocket connection (subscribed to one channel):
/// (RSS with N open − RSS before) / N.
pub async fn idle(opts: &Opts) -> Result<Value, String> {
    let conns: usize = opts.get("conns", 1000);
    let target = Arc::new(Target::start(&opts.str("target", "pushgate"), &[]).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = target.rss_kib();
    let sockets = open_many(&target, "idle", conns).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = target.rss_kib();
    let per_conn = after.saturating_sub(before) as f64 * 1024.0 / conns as f64;
    drop(sockets);
    Ok(json!({
        "mode": "ws-idle", "target": target.name(), "connections": conns,
        "rss_before_kib": before, "rss_after_kib": after,
        "rss_per_connection_bytes": per_conn.round(),
    }))
}

struct Shared {
    received: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    /// When the last event arrived anywhere (unix ns).
    last_ns: AtomicU64,
    /// Readers that got fewer / more events than were published.
    short: AtomicU64,
    over: AtomicU64,
}

/// Reads frames, answering pings and counting events with their
/// publish→receive latency (events carry `"t":<unix ns>`).
async fn reader(mut s: TcpStream, mut buf: Vec<u8>, expected: usize, shared: Arc<Shared>) {
    let mut lat = Vec::with_capacity(expected);
    let mut chunk = vec![0u8; 16 * 1024];
    let mut got = 0;
    'outer: while got < expected {
        while let Some((opcode, payload, len)) = parse_frame(&buf) {
            match opcode {
                9 => {
                    let pong = client_frame(10, &buf[payload.clone()]);
                    if s.write_all(&pong).await.is_err() {
                        break 'outer;
                    }
                }
                8 => break 'outer,
                _ => {
                    let p = &buf[payload];
                    if let Some(pos) = find(p, b"\"t\":") {
                        let digits: String = p[pos + 4..]
                            .iter()
                            .take_while(|b| b.is_ascii_digit())
                            .map(|b| *b as char)
                            .collect();
                        let t: u64 = digits.parse().unwrap_or(0);
                        let now = now_ns();
                        lat.push(now.saturating_sub(t) / 1000);
                        shared.last_ns.fetch_max(now, Ordering::Relaxed);
                        got += 1;
                    }
                }
            }
            buf.drain(..len);
        }
        if got >= expected {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(60), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    shared.received.fetch_add(got as u64, Ordering::Relaxed);
    if got < expected {
        shared.short.fetch_add(1, Ordering::Relaxed);
    } else if got > expected {
        shared.over.fetch_add(1, Ordering::Relaxed);
    }
    shared.latencies_us.lock().await.extend(lat);
}

/// N WebSocket subscribers on one channel; M events published back to back
/// (or at `--rate` per second); deliveries/s, server CPU per delivery, latency.
pub async fn fanout(opts: &Opts) -> Result<Value, String> {
    let subs: usize = opts.get("subs", 1000);
    let events: usize = opts.get("events", 200);
    let rate: f64 = opts.get("rate", 0.0);
    let pad = "x".repeat(opts.get("pad", 40));
    let target = Arc::new(Target::start(&opts.str("target", "pushgate"), &[]).await?);
    let sockets = open_many(&target, "fan", subs).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = target.rss_kib();

    let shared = Arc::new(Shared {
        received: AtomicU64::new(0),
        latencies_us: Mutex::new(Vec::new()),
        last_ns: AtomicU64::new(0),
        short: AtomicU64::new(0),
        over: AtomicU64::new(0),
    });
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|(s, buf)| tokio::spawn(reader(s, buf, events, shared.clone())))
        .collect();

    let publishers: usize = opts.get("publishers", 1).max(1);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(publishers)
        .build()
        .map_err(|e| e.to_string())?;
    let cpu0 = target.cpu_us();
    let started = Instant::now();
    let started_ns = now_ns();
    // `publishers` tasks take turns on one shared counter; with `--rate` each
    // keeps its share of the rate.
    let left = Arc::new(AtomicU64::new(events as u64));
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let (client, target, left, pad) =
            (client.clone(), target.clone(), left.clone(), pad.clone());
        let gap = (rate > 0.0).then(|| Duration::from_secs_f64(publishers as f64 / rate));
        tasks.push(tokio::spawn(async move {
            let mut next = Instant::now();
            while left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                if let Some(gap) = gap {
                    tokio::time::sleep_until(next.into()).await;
                    next += gap;
                }
                let (url, body) = target.publish_request("fan", now_ns(), &pad);
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
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let published = started.elapsed();
    for r in readers {
        let _ = r.await;
    }
    let elapsed = started.elapsed();
    let cpu = target.cpu_us() - cpu0;
    let received = shared.received.load(Ordering::Relaxed);
    let mut lat = std::mem::take(&mut *shared.latencies_us.lock().await);
    lat.sort_unstable();
    Ok(json!({
        "mode": "ws-fanout", "target": target.name(), "subscribers": subs, "events": events,
        "rate_per_s": rate, "publishers": publishers, "expected_deliveries": subs * events, "deliveries": received,
        "publish_seconds": published.as_secs_f64(), "seconds": elapsed.as_secs_f64(),
        // Until the last event arrived (a reader short of events waits out its
        // read timeout, which would otherwise count as delivery time).
        "deliveries_per_s": (received as f64 / (shared.last_ns.load(Ordering::Relaxed).saturating_sub(started_ns).max(1) as f64 / 1e9)).round(),
        "readers_short": shared.short.load(Ordering::Relaxed), "readers_over": shared.over.load(Ordering::Relaxed),
        "server_cpu_us_per_delivery": (cpu as f64 / received.max(1) as f64 * 100.0).round() / 100.0,
        "server_cpu_seconds": cpu as f64 / 1e6,
        "latency_ms": {"p50": pct(&lat, 0.5) as f64 / 1000.0, "p99": pct(&lat, 0.99) as f64 / 1000.0, "max": lat.last().copied().unwrap_or(0) as f64 / 1000.0},
        "rss_idle_kib": rss_idle, "rss_after_kib": target.rss_kib(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = client_frame(1, b"hello");
        assert_eq!(f[0], 0x81);
        assert_eq!(f[1], 0x80 | 5);
        let server = [0x81u8, 3, b'a', b'b', b'c', 0x89, 0];
        let (op, p, len) = parse_frame(&server).unwrap();
        assert_eq!((op, &server[p], len), (1, &b"abc"[..], 5));
        let (op, _, len) = parse_frame(&server[5..]).unwrap();
        assert_eq!((op, len), (9, 2));
        assert!(parse_frame(&[0x81, 126, 0]).is_none());
    }
}
