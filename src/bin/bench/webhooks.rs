//! `pushgate-bench webhooks`: signed Stripe webhooks from many concurrent
//! senders against a running pushgate; reports accepted webhooks per second
//! and the time to 200 (p50/p99/max) as one JSON object.
//!
//! It starts nothing itself: point it at a server and at a `stripe` source
//! (in development mode, the `demo` source and the secret `serve` prints):
//!
//! ```sh
//! pushgate-bench webhooks --url http://127.0.0.1:8080/webhooks/demo \
//!     --secret whsec_… --concurrency 64 --seconds 20
//! ```
//!
//! Every event id is new (a random run id plus a counter), so nothing is
//! answered as a duplicate; a 200 means the event is durable in the log.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Opts;

/// A realistic `payment_intent.succeeded` event (about 1 KiB, pretty-printed
/// like Stripe's), unique per call. Formatted from a template so the load
/// generator spends its CPU on sending, not on building JSON.
fn event(run: &str, sender: usize, n: u64, now: i64) -> Vec<u8> {
    format!(
        r#"{{
  "id": "evt_bench_{run}_{sender}_{n}",
  "object": "event",
  "api_version": "2024-06-20",
  "created": {now},
  "data": {{
    "object": {{
      "id": "pi_bench_{run}_{sender}_{n}",
      "object": "payment_intent",
      "amount": 2000,
      "amount_received": 2000,
      "currency": "usd",
      "customer": "cus_Bench0000001",
      "description": "Pushgate Pro (monthly)",
      "latest_charge": "ch_3Nx0000000000000000000",
      "livemode": false,
      "metadata": {{
        "user_id": "bench-{sender}",
        "order_id": "{n}"
      }},
      "payment_method": "pm_1Nx0000000000000000000",
      "payment_method_types": [
        "card"
      ],
      "receipt_email": "jenny.rosen@example.com",
      "status": "succeeded"
    }}
  }},
  "livemode": false,
  "pending_webhooks": 1,
  "request": {{
    "id": "req_bench",
    "idempotency_key": null
  }},
  "type": "payment_intent.succeeded"
}}"#
    )
    .into_bytes()
}

#[derive(Default)]
struct Tally {
    accepted: u64,
    duplicates: u64,
    failed: u64,
    /// Time to 200 of accepted webhooks, in microseconds (measured phase only).
    latencies_us: Vec<u32>,
}

/// Options: `--url` and `--secret` (required), `--concurrency 64`,
/// `--seconds 20`, `--warmup 2` (seconds sent before measuring),
/// `--server-pid PID` (to report the server's CPU per webhook).
pub async fn webhooks(opts: &Opts) -> Result<Value, String> {
    let url = opts.str("url", "");
    let secret = opts.str("secret", "");
    if url.is_empty() || secret.is_empty() {
        return Err("webhooks: --url URL and --secret WHSEC are required (a running server's stripe source, e.g. the `demo` one `pushgate serve` prints)".into());
    }
    let concurrency: usize = opts.get("concurrency", 64).max(1);
    let duration = Duration::from_secs_f64(opts.get("seconds", 20.0));
    // Optional: the server's pid, to report its CPU per accepted webhook.
    let server_pid = Some(opts.get("server-pid", 0u32)).filter(|p| *p > 0);
    let warmup = Duration::from_secs_f64(opts.get("warmup", 2.0));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client");
    let run_id = format!("{:08x}", rand::random::<u32>());
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (url, secret) = (Arc::new(url), Arc::new(secret));
    let mut tasks = Vec::with_capacity(concurrency);
    for sender in 0..concurrency {
        let (client, url, secret, run_id) =
            (client.clone(), url.clone(), secret.clone(), run_id.clone());
        let (measuring, stop) = (measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let now = pushgate::auth::unix_now() as i64;
                let body = event(&run_id, sender, n, now);
                let sig = pushgate::ingest::stripe::signature_header(&secret, now, &body);
                let started = Instant::now();
                let result = client
                    .post(url.as_str())
                    .header("content-type", "application/json")
                    .header("stripe-signature", sig)
                    .body(body)
                    .send()
                    .await;
                let ok = match result {
                    Ok(r) if r.status() == 200 => match r.bytes().await {
                        Ok(b) => Some(!contains(&b, b"\"duplicate\":true")),
                        Err(_) => None,
                    },
                    Ok(r) => {
                        if tally.failed == 0 {
                            let status = r.status();
                            let text = r.text().await.unwrap_or_default();
                            eprintln!("sender {sender}: {status} {text}");
                        }
                        None
                    }
                    Err(e) => {
                        if tally.failed == 0 {
                            eprintln!("sender {sender}: {e}");
                        }
                        None
                    }
                };
                let elapsed = started.elapsed();
                if !measuring.load(Ordering::Relaxed) {
                    continue;
                }
                match ok {
                    Some(true) => {
                        tally.accepted += 1;
                        tally
                            .latencies_us
                            .push(elapsed.as_micros().min(u32::MAX as u128) as u32);
                    }
                    Some(false) => tally.duplicates += 1,
                    None => tally.failed += 1,
                }
            }
            tally
        }));
    }
    tokio::time::sleep(warmup).await;
    measuring.store(true, Ordering::Relaxed);
    let cpu_before = server_pid.map(process_cpu_us);
    let own_before = process_cpu_us(std::process::id());
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    measuring.store(false, Ordering::Relaxed);
    let measured = started.elapsed();
    let server_cpu_us = server_pid
        .zip(cpu_before)
        .map(|(pid, before)| process_cpu_us(pid).saturating_sub(before));
    let own_cpu_us = process_cpu_us(std::process::id()).saturating_sub(own_before);
    stop.store(true, Ordering::Relaxed);

    let mut total = Tally::default();
    for t in tasks {
        let t = t.await.map_err(|e| e.to_string())?;
        total.accepted += t.accepted;
        total.duplicates += t.duplicates;
        total.failed += t.failed;
        total.latencies_us.extend(t.latencies_us);
    }
    total.latencies_us.sort_unstable();
    let pct = |p: f64| -> f64 {
        if total.latencies_us.is_empty() {
            return 0.0;
        }
        let i = ((total.latencies_us.len() as f64 * p).ceil() as usize)
            .clamp(1, total.latencies_us.len())
            - 1;
        total.latencies_us[i] as f64 / 1000.0
    };
    let secs = measured.as_secs_f64();
    if total.accepted == 0 {
        return Err(format!(
            "webhooks: nothing was accepted ({} failed); see the first error above",
            total.failed
        ));
    }
    Ok(json!({
        "mode": "webhooks",
        "target": url.as_str(),
        "concurrency": concurrency,
        "duration_s": (secs * 100.0).round() / 100.0,
        "accepted": total.accepted,
        "accepted_per_s": (total.accepted as f64 / secs).round(),
        "duplicates": total.duplicates,
        "failed": total.failed,
        "time_to_200_ms": {
            "p50": pct(0.50),
            "p90": pct(0.90),
            "p99": pct(0.99),
            "max": pct(1.0),
        },
        "server_cpu_us_per_webhook": server_cpu_us.map(|us| us / total.accepted.max(1)),
        "bench_cpu_us_per_webhook": own_cpu_us / total.accepted.max(1),
    }))
}

/// utime + stime of a process (all its threads), in microseconds.
fn process_cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| f.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks * 10_000 // USER_HZ is 100 on Linux
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
