//! `pushgate listen`: tail channels in the terminal over SSE, or forward each
//! event to a local server, signed the Standard Webhooks way (like a
//! provider's CLI does for local development).
//!
//! Invariants: the last cursor seen is sent as `Last-Event-ID` on every
//! reconnect, so a disconnect loses and repeats nothing; reconnects back off
//! (250 ms doubling to 10 s, reset by a successful connect); a refused token
//! or a bad request ends the command instead of retrying forever.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use futures_util::StreamExt;

use crate::deliver::sign;

#[derive(Args, Debug)]
pub struct ListenArgs {
    /// pushgate's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Channel to tail (repeat for several).
    #[arg(long = "channel", short = 'c', required = true)]
    pub channels: Vec<String>,
    /// Subscriber token (JWT); not needed in development mode or for public channels.
    #[arg(long, env = "PUSHGATE_TOKEN")]
    pub token: Option<String>,
    /// Forward each event as a signed POST to this URL instead of printing it.
    #[arg(long)]
    pub forward_to: Option<String>,
    /// `whsec_…` secret for forwarded events; one is generated (and printed) if absent.
    #[arg(long, env = "PUSHGATE_LISTEN_SECRET")]
    pub secret: Option<String>,
    /// One JSON line per event (or per forwarded event), for scripts.
    #[arg(long)]
    pub json: bool,
    /// Start after this cursor (`earliest` = the retained history); default: from now on.
    #[arg(long)]
    pub since: Option<String>,
}

const MAX_BACKOFF: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

pub async fn run(args: ListenArgs) -> i32 {
    tokio::select! {
        result = listen(args) => match result {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("pushgate listen: {e:#}");
                1
            }
        },
        _ = tokio::signal::ctrl_c() => 0,
    }
}

struct Forwarder {
    client: reqwest::Client,
    url: String,
    key: Vec<u8>,
}

async fn listen(args: ListenArgs) -> anyhow::Result<()> {
    let base = args.url.trim_end_matches('/');
    let mut stream_url = url::Url::parse(&format!("{base}/v1/stream"))
        .with_context(|| format!("`{}` is not a URL", args.url))?;
    {
        let mut q = stream_url.query_pairs_mut();
        for c in &args.channels {
            q.append_pair("channel", c);
        }
        if args.since.as_deref() == Some("earliest") {
            q.append_pair("since", "earliest");
        }
    }
    let forward = match &args.forward_to {
        Some(to) => {
            let secret = match &args.secret {
                Some(s) => s.clone(),
                None => {
                    let s = sign::generate_secret();
                    eprintln!("forwarding signed with secret {s} (pass --secret to keep one)");
                    s
                }
            };
            let key = sign::secret_key(&secret).context("--secret")?;
            Some(Forwarder {
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(30))
                    .redirect(reqwest::redirect::Policy::none())
                    .build()?,
                url: to.clone(),
                key,
            })
        }
        None => None,
    };
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()?;
    let mut cursor: Option<String> = args.since.clone().filter(|s| s != "earliest");
    let mut backoff = FIRST_BACKOFF;
    loop {
        let mut req = client
            .get(stream_url.clone())
            .header("accept", "text/event-stream");
        if let Some(t) = &args.token {
            req = req.bearer_auth(t);
        }
        if let Some(c) = &cursor {
            req = req.header("last-event-id", c);
        }
        match req.send().await {
            Err(e) => eprintln!("cannot connect to {base}: {e}; retrying in {backoff:?}"),
            Ok(resp) if resp.status().is_success() => {
                eprintln!(
                    "listening on {} at {base}{}",
                    args.channels.join(", "),
                    cursor
                        .as_deref()
                        .map(|c| format!(" after {c}"))
                        .unwrap_or_default()
                );
                backoff = FIRST_BACKOFF;
                let ended = read_stream(resp, &mut cursor, &args, forward.as_ref()).await?;
                eprintln!("{ended}; reconnecting in {backoff:?}");
            }
            Ok(resp) => {
                let status = resp.status();
                let body = resp.text().await.unwrap_or_default();
                if status.is_client_error() && status.as_u16() != 429 {
                    bail!("{base} answered {status}: {}", body.trim());
                }
                eprintln!("{base} answered {status}; retrying in {backoff:?}");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Reads one SSE response until it ends; returns why it ended.
async fn read_stream(
    resp: reqwest::Response,
    cursor: &mut Option<String>,
    args: &ListenArgs,
    forward: Option<&Forwarder>,
) -> anyhow::Result<String> {
    let mut body = resp.bytes_stream();
    let mut parser = SseParser::default();
    loop {
        let chunk = match body.next().await {
            None => return Ok("the stream ended".into()),
            Some(Err(e)) => return Ok(format!("the stream broke: {e}")),
            Some(Ok(c)) => c,
        };
        for ev in parser.feed(&chunk) {
            match ev.event.as_deref() {
                Some("pushgate.reset") => {
                    eprintln!("the server reset the cursor: {}", ev.data);
                    *cursor = ev.id;
                }
                Some("pushgate.expired") => bail!("the token expired; get a new one"),
                _ => {
                    if ev.id.is_some() {
                        *cursor = ev.id.clone();
                    }
                    match forward {
                        Some(f) => forward_event(f, &ev, args.json).await,
                        None => print_event(&ev.data, args.json),
                    }
                }
            }
        }
    }
}

fn print_event(data: &str, one_line: bool) {
    if one_line {
        println!("{data}");
        return;
    }
    match serde_json::from_str::<serde_json::Value>(data) {
        Ok(v) => println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| data.to_string())
        ),
        Err(_) => println!("{data}"),
    }
}

async fn forward_event(f: &Forwarder, ev: &SseEvent, json_lines: bool) {
    let id = ev.id.clone().unwrap_or_default();
    let kind = serde_json::from_str::<serde_json::Value>(&ev.data)
        .ok()
        .and_then(|v| v["type"].as_str().map(str::to_string))
        .unwrap_or_default();
    let msg_id = format!("msg_{id}");
    let ts = crate::clock::now_ms() / 1000;
    let body = ev.data.clone().into_bytes();
    let mut req = f
        .client
        .post(&f.url)
        .header("content-type", "application/json");
    for (name, value) in sign::headers(std::slice::from_ref(&f.key), &msg_id, ts, &body) {
        req = req.header(name, value);
    }
    let started = Instant::now();
    let result = req.body(body).send().await;
    let ms = started.elapsed().as_millis() as u64;
    let (status, error) = match result {
        Ok(r) => (Some(r.status().as_u16()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    if json_lines {
        println!(
            "{}",
            serde_json::json!({"id": id, "type": kind, "status": status, "error": error, "ms": ms})
        );
    } else {
        match (status, error) {
            (Some(s), _) => println!("{id}  {kind}  -> {s} {} ({ms} ms)", f.url),
            (None, Some(e)) => println!("{id}  {kind}  -> failed: {e}"),
            _ => {}
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// An incremental `text/event-stream` parser (the WHATWG rules this CLI needs).
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
}

impl SseParser {
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        loop {
            let text = &self.buf;
            let end = text
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|p| (p, p + 2))
                .or_else(|| {
                    text.windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| (p, p + 4))
                });
            let Some((block_end, next)) = end else {
                return out;
            };
            let block = String::from_utf8_lossy(&self.buf[..block_end]).into_owned();
            self.buf.drain(..next);
            let mut ev = SseEvent::default();
            let mut has_data = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line, ""),
                };
                match field {
                    "id" => ev.id = Some(value.to_string()),
                    "event" => ev.event = Some(value.to_string()),
                    "data" => {
                        if has_data {
                            ev.data.push('\n');
                        }
                        ev.data.push_str(value);
                        has_data = true;
                    }
                    _ => {}
                }
            }
            if has_data {
                out.push(ev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.feed(b"retry: 2000\n: pushgate\n\nid: 1-a\nda").is_empty());
        let evs =
            p.feed(b"ta: {\"x\":1}\n\nevent: pushgate.reset\nid: 0-a\ndata: {}\n\n: ping\n\n");
        assert_eq!(
            evs,
            vec![
                SseEvent {
                    id: Some("1-a".into()),
                    event: None,
                    data: "{\"x\":1}".into()
                },
                SseEvent {
                    id: Some("0-a".into()),
                    event: Some("pushgate.reset".into()),
                    data: "{}".into()
                },
            ]
        );
    }
}
