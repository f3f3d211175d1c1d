//! `pushgate-bench attack slowbody|slowloris|heads|nonreader|badsig`: one
//! hostile client pattern from issue 11 against a fresh pushgate with its
//! default limits, reporting the server's RSS and CPU during the attack
//! beside what a normal client saw meanwhile (publish round trips and SSE
//! delivery latency, from another loopback address: the victim is not the
//! attacker). `PUSHGATE_BIN` picks the binary, so a build from before the
//! fixes can be measured with the same command.
//!
//! Options: `--conns N` attacking connections (default per attack),
//! `--seconds S` (default 20), `--sources K` spread the attack over K
//! loopback addresses 127.0.1.x (default 1), `--concurrency C` (badsig).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use crate::target::Target;
use crate::{Opts, now_ns, pct};

/// The victim's address; attackers use 127.0.0.1 or 127.0.1.x.
const VICTIM: &str = "127.0.0.2";

pub async fn attack(opts: &Opts) -> Result<Value, String> {
    let kind = opts.str("kind", "");
    let default_conns = match kind.as_str() {
        "slowbody" => 100,
        "slowloris" => 300,
        "heads" => 150,
        "nonreader" => 6,
        "badsig" => 0,
        _ => {
            return Err(
                "attack needs one of slowbody|slowloris|heads|nonreader|badsig".to_string(),
            );
        }
    };
    let conns: usize = opts.get("conns", default_conns);
    let seconds: f64 = opts.get("seconds", 20.0);
    let sources: u8 = opts.get("sources", 1u8).max(1);
    // Empty values remove the bench's own overrides: the server's defaults apply.
    let target = Target::start(
        "pushgate",
        &[
            ("PUSHGATE_LIMITS__CONNECTIONS_PER_CLIENT", ""),
            ("PUSHGATE_LIMITS__STREAMS_PER_CLIENT", ""),
            ("PUSHGATE_LOG", "error"),
        ],
    )
    .await?;
    let addr = target.addr;
    if kind == "nonreader" {
        prepare_big_events(addr).await?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = target.rss_kib();

    let stop = Arc::new(tokio::sync::Notify::new());
    let stats = Arc::new(AttackStats::default());
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut attackers = Vec::new();
    let attacker_ip = |i: usize| -> IpAddr {
        if sources == 1 {
            "127.0.0.1".parse().unwrap()
        } else {
            format!("127.0.1.{}", 1 + (i % sources as usize))
                .parse()
                .unwrap()
        }
    };
    match kind.as_str() {
        "badsig" => {
            let c: usize = opts.get("concurrency", 8);
            for i in 0..c {
                attackers.push(tokio::spawn(badsig(
                    addr,
                    attacker_ip(i),
                    until,
                    stats.clone(),
                )));
            }
        }
        _ => {
            for i in 0..conns {
                let k = kind.clone();
                attackers.push(tokio::spawn(hold(
                    k,
                    addr,
                    attacker_ip(i),
                    until,
                    stats.clone(),
                )));
            }
        }
    }

    // The victim: a subscriber and a publisher from another address.
    let probe = tokio::spawn(probe(addr, until, stop.clone()));
    let cpu0 = target.cpu_us();
    let t0 = Instant::now();
    let mut rss_max = rss_before;
    let mut open_max = 0;
    let mut open_late = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(250)).await;
        rss_max = rss_max.max(target.rss_kib());
        let open = stats.open.load(Ordering::Relaxed);
        open_max = open_max.max(open);
        if until.saturating_duration_since(Instant::now()) > Duration::from_millis(500) {
            // The last sample well before the attackers stop by themselves.
            open_late = open;
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let cpu_pct = (target.cpu_us() - cpu0) as f64 / 1e6 / wall * 100.0;
    let rss_end = target.rss_kib();
    stop.notify_waiters();
    let probe = probe.await.map_err(|e| e.to_string())?;
    for a in attackers {
        a.abort();
    }
    Ok(json!({
        "mode": "attack",
        "attack": kind,
        "binary": std::env::var("PUSHGATE_BIN").unwrap_or_else(|_| "pushgate (beside pushgate-bench)".into()),
        "attacking_connections": conns,
        "attacker_addresses": sources,
        "seconds": seconds,
        "server": {
            "rss_before_kib": rss_before,
            "rss_max_kib": rss_max,
            "rss_end_kib": rss_end,
            "cpu_percent_of_one_core": (cpu_pct * 10.0).round() / 10.0,
        },
        "attacker": {
            "connections_open_max": open_max,
            "connections_open_near_end": open_late,
            "connects": stats.connects.load(Ordering::Relaxed),
            "refused_or_closed": stats.closed.load(Ordering::Relaxed),
            "requests": stats.requests.load(Ordering::Relaxed),
            "answered_401": stats.s401.load(Ordering::Relaxed),
            "answered_429": stats.s429.load(Ordering::Relaxed),
            "answered_other": stats.other.load(Ordering::Relaxed),
        },
        "normal_client": probe,
    }))
}

#[derive(Default)]
struct AttackStats {
    open: AtomicU64,
    connects: AtomicU64,
    closed: AtomicU64,
    requests: AtomicU64,
    s401: AtomicU64,
    s429: AtomicU64,
    other: AtomicU64,
}

async fn connect_from(ip: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(ip, 0))?;
    // A client that reads nothing should also buffer little.
    let _ = sock.set_recv_buffer_size(4096);
    sock.connect(to).await
}

/// One attacking connection, reopened whenever the server closes it.
async fn hold(kind: String, addr: SocketAddr, ip: IpAddr, until: Instant, stats: Arc<AttackStats>) {
    while Instant::now() < until {
        let Ok(mut s) = connect_from(ip, addr).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        stats.connects.fetch_add(1, Ordering::Relaxed);
        stats.open.fetch_add(1, Ordering::Relaxed);
        let _ = attack_one(&kind, addr, &mut s, until).await;
        stats.open.fetch_sub(1, Ordering::Relaxed);
        stats.closed.fetch_add(1, Ordering::Relaxed);
        // Do not spin on a server that refuses at once.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs one connection's attack until the server closes it (an error) or
/// the attack ends (Ok).
async fn attack_one(
    kind: &str,
    addr: SocketAddr,
    s: &mut TcpStream,
    until: Instant,
) -> std::io::Result<()> {
    let host = format!("Host: {addr}\r\n");
    match kind {
        "slowbody" => {
            // The attack: announce 1 MiB, send all but 100 bytes, then
            // a byte every 5 s.
            let head = format!(
                "POST /webhooks/demo HTTP/1.1\r\n{host}Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n"
            );
            s.write_all(head.as_bytes()).await?;
            let chunk = vec![b' '; 64 << 10];
            let mut left = 1048576 - 100;
            while left > 0 {
                let n = left.min(chunk.len());
                s.write_all(&chunk[..n]).await?;
                left -= n;
            }
            trickle(s, until, Duration::from_secs(5), b" ").await
        }
        "slowloris" => {
            let head = format!("GET /healthz HTTP/1.1\r\n{host}");
            s.write_all(head.as_bytes()).await?;
            trickle(s, until, Duration::from_secs(5), b"X-a: b\r\n").await
        }
        "heads" => {
            // Issue item 3: a 7 KB head on the stream route that never ends.
            let head = format!(
                "GET /v1/stream?channel=a HTTP/1.1\r\n{host}X-Pad: {}",
                "p".repeat(7000)
            );
            s.write_all(head.as_bytes()).await?;
            trickle(s, until, Duration::from_secs(60), b"").await
        }
        "nonreader" => {
            // Half SSE, half long-polling, from the oldest event; never read.
            let path = if s.local_addr()?.port() % 2 == 0 {
                "/v1/stream?channel=big&since=earliest"
            } else {
                "/v1/events?channel=big&after=earliest&limit=1000"
            };
            let head = format!("GET {path} HTTP/1.1\r\n{host}\r\n");
            s.write_all(head.as_bytes()).await?;
            trickle(s, until, Duration::from_secs(60), b"").await
        }
        _ => Ok(()),
    }
}

/// Writes `byte` every `every` until the attack ends; notices a close by
/// the server (a failed write, or EOF on a peek).
async fn trickle(
    s: &mut TcpStream,
    until: Instant,
    every: Duration,
    bytes: &[u8],
) -> std::io::Result<()> {
    loop {
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        let wake = (now + every).min(until);
        let mut probe = [0u8; 1];
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {
                if !bytes.is_empty() {
                    s.write_all(bytes).await?;
                }
            }
            r = s.peek(&mut probe) => match r {
                Ok(0) | Err(_) => return Err(std::io::ErrorKind::ConnectionAborted.into()),
                // An answer (408, 503…): the server is done with us.
                Ok(_) => return Err(std::io::ErrorKind::ConnectionAborted.into()),
            }
        }
    }
}

/// Bad-signature Stripe posts of 256 KiB, as fast as they are answered.
async fn badsig(addr: SocketAddr, ip: IpAddr, until: Instant, stats: Arc<AttackStats>) {
    let client = reqwest::Client::builder()
        .local_address(ip)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let body = format!(
        "{{\"id\":\"evt_bad\",\"pad\":\"{}\"}}",
        "x".repeat(256 << 10)
    );
    let sig = format!("t={},v1={}", now_ns() / 1_000_000_000, "0".repeat(64));
    while Instant::now() < until {
        let r = client
            .post(format!("http://{addr}/webhooks/demo"))
            .header("content-type", "application/json")
            .header("stripe-signature", &sig)
            .body(body.clone())
            .send()
            .await;
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let counter = match r.map(|r| r.status().as_u16()) {
            Ok(401) => &stats.s401,
            Ok(429) => &stats.s429,
            _ => &stats.other,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// 40 events of 0.9 MiB (issue item 5), published before the attack.
async fn prepare_big_events(addr: SocketAddr) -> Result<(), String> {
    let client = reqwest::Client::new();
    let pad = "x".repeat(900 << 10);
    for i in 0..40 {
        let r = client
            .post(format!("http://{addr}/v1/publish"))
            .header("content-type", "application/json")
            .body(format!(
                "{{\"channel\":\"big\",\"data\":{{\"i\":{i},\"pad\":\"{pad}\"}}}}"
            ))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(format!("publishing the big events: {}", r.status()));
        }
    }
    Ok(())
}

/// The normal client: publishes to `probe` every 100 ms and reads the same
/// channel over SSE; returns round-trip and delivery latencies (ms).
async fn probe(addr: SocketAddr, until: Instant, stop: Arc<tokio::sync::Notify>) -> Value {
    let client = reqwest::Client::builder()
        .local_address(VICTIM.parse::<IpAddr>().unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let delivered = Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let sse_errors = Arc::new(AtomicU64::new(0));
    let reader = {
        let client = client.clone();
        let delivered = delivered.clone();
        let sse_errors = sse_errors.clone();
        tokio::spawn(async move {
            loop {
                let resp = client
                    .get(format!("http://{addr}/v1/stream?channel=probe"))
                    .timeout(Duration::from_secs(3600))
                    .send()
                    .await;
                let Ok(resp) = resp.and_then(|r| r.error_for_status()) else {
                    sse_errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let mut body = resp.bytes_stream();
                let mut buf = Vec::new();
                while let Some(Ok(chunk)) = body.next().await {
                    buf.extend_from_slice(&chunk);
                    while let Some(p) = buf.windows(2).position(|w| w == b"\n\n") {
                        let block: Vec<u8> = buf.drain(..p + 2).collect();
                        let text = String::from_utf8_lossy(&block);
                        for line in text.lines() {
                            if let Some(data) = line.strip_prefix("data: ")
                                && let Ok(v) = serde_json::from_str::<Value>(data)
                                && let Some(t) = v["data"]["t"].as_u64()
                            {
                                let ms = now_ns().saturating_sub(t) / 1_000_000;
                                delivered.lock().unwrap().push(ms);
                            }
                        }
                    }
                }
                sse_errors.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Let the subscription open before the first publish.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut round_trips = Vec::new();
    let mut failed = 0u64;
    let mut sent = 0u64;
    while Instant::now() < until {
        let t = now_ns();
        let started = Instant::now();
        let r = client
            .post(format!("http://{addr}/v1/publish"))
            .header("content-type", "application/json")
            .body(format!("{{\"channel\":\"probe\",\"data\":{{\"t\":{t}}}}}"))
            .send()
            .await;
        sent += 1;
        match r {
            Ok(r) if r.status().is_success() => {
                round_trips.push(started.elapsed().as_millis() as u64)
            }
            _ => failed += 1,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Late deliveries still count, up to a second.
    tokio::select! {
        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        _ = stop.notified() => {}
    }
    reader.abort();
    let mut delivered = delivered.lock().unwrap().clone();
    delivered.sort_unstable();
    round_trips.sort_unstable();
    json!({
        "publishes": sent,
        "publishes_failed": failed,
        "publish_ms": {"p50": pct(&round_trips, 0.5), "p99": pct(&round_trips, 0.99), "max": round_trips.last().copied().unwrap_or(0)},
        "delivered": delivered.len(),
        "delivery_ms": {"p50": pct(&delivered, 0.5), "p99": pct(&delivered, 0.99), "max": delivered.last().copied().unwrap_or(0)},
        "sse_reconnects": sse_errors.load(Ordering::Relaxed),
    })
}
