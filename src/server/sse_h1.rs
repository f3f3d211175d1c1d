//! A lean HTTP/1.x path for `GET /v1/stream`: the most numerous and
//! longest-lived connections pushgate has.
//!
//! hyper keeps a read buffer (grown to 16 KiB) and an 8 KiB header buffer for
//! the whole life of a connection; for an idle event stream that is most of
//! its cost. This path parses the request head with `httparse` from a
//! transient buffer, runs the very same checks as the hyper handler
//! (`transport::sse::open`), writes the response head, and then writes each
//! chunk the body yields straight to the socket (one vectored write per
//! chunk). Invariants:
//! - it only ever sees plain-text HTTP/1.x GETs of `/v1/stream`; anything it
//!   does not recognise is left unread for hyper;
//! - errors, CORS, failed-check accounting and the request span are the
//!   router's own (`transport::policy`), so both paths answer alike;
//! - a client that closes is noticed while the stream is idle (read readiness
//!   is watched without a buffer), so its subscription is dropped at once;
//! - a client that stops reading is closed when a chunk waits longer than
//!   the write deadline (two heartbeats): it holds at most one batch until
//!   then, and resumes from its cursor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Body as _;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::AppState;
use crate::error::ApiError;
use crate::transport::{policy, sse};

const PREFIX: &[u8] = b"GET /v1/stream";
/// Request heads larger than this go to hyper (which answers 431).
const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 64;

pub enum Sniffed {
    /// The client said nothing in time, or went away.
    Nothing,
    /// A complete `GET /v1/stream` head of this many bytes is waiting.
    SseHead(usize),
    /// Anything else: hand the untouched connection to hyper.
    Other,
}

/// Looks at the first bytes without consuming them.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Sniffed {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; MAX_HEAD];
    loop {
        let n = match tokio::time::timeout_at(deadline, stream.peek(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => n,
            _ => return Sniffed::Nothing,
        };
        let seen = &buf[..n];
        let common = n.min(PREFIX.len());
        if seen[..common] != PREFIX[..common] {
            return Sniffed::Other;
        }
        if n > PREFIX.len() && !matches!(seen[PREFIX.len()], b'?' | b' ') {
            return Sniffed::Other;
        }
        if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            return Sniffed::SseHead(end + 4);
        }
        if n == buf.len() {
            return Sniffed::Other;
        }
        // Part of a head: wait for the rest (bounded by the deadline).
        if tokio::time::Instant::now() >= deadline {
            return Sniffed::Nothing;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct Head {
    http10: bool,
    query: Option<String>,
    headers: HeaderMap,
}

fn parse_head(bytes: &[u8]) -> Option<Head> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return None,
    }
    if req.method != Some("GET") {
        return None;
    }
    let path = req.path?;
    let (route, query) = match path.split_once('?') {
        Some((r, q)) => (r, Some(q.to_string())),
        None => (path, None),
    };
    if route != "/v1/stream" {
        return None;
    }
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        headers.append(name, value);
    }
    Some(Head {
        http10: req.version == Some(0),
        query,
        headers,
    })
}

pub async fn serve(
    app: Arc<AppState>,
    mut stream: TcpStream,
    peer: SocketAddr,
    trusted_proxies: &[IpNet],
    head_len: usize,
) {
    let mut raw = vec![0u8; head_len];
    if stream.read_exact(&mut raw).await.is_err() {
        return;
    }
    let Some(head) = parse_head(&raw) else {
        let e = ApiError::bad_request("invalid_request", "malformed request head");
        let _ = write_error(&mut stream, &policy::Cors::Deny, e).await;
        return;
    };
    drop(raw);
    if let Err(e) = crate::api::request_checks::check_host(&app.config, &head.headers) {
        let _ = write_error(&mut stream, &policy::Cors::Deny, e).await;
        return;
    }
    let client = super::client_addr(peer, trusted_proxies, &head.headers).ip();
    let span = policy::request_span(&http::Method::GET, "/v1/stream");
    async move {
        tracing::debug!(%client, "sse stream (http/1)");
        let cors = policy::cors(
            &app.config.server.cors_origins,
            head.headers.get(http::header::ORIGIN),
        );
        let body = match sse::open(&app, &head.headers, head.query.as_deref(), client).await {
            Ok(b) => b,
            Err(e) => {
                let e = policy::after_check(&app.limits, client, e.status).unwrap_or(e);
                let _ = write_error(&mut stream, &cors, e).await;
                return;
            }
        };
        drop(head.headers);
        let chunked = !head.http10;
        let deadline = write_deadline(&app);
        let _ = stream_body(&mut stream, &cors, body, chunked, deadline).await;
    }
    .instrument(span)
    .await
}

/// How long one chunk may wait for the client to take it: two heartbeats,
/// so a live client that reads is never closed by it (it gets a keep-alive
/// every heartbeat), at least a second.
fn write_deadline(app: &AppState) -> Duration {
    (app.config.server.heartbeat.0 * 2).max(Duration::from_secs(1))
}

async fn stream_body(
    stream: &mut TcpStream,
    cors: &policy::Cors,
    body: sse::SseBody,
    chunked: bool,
    write_deadline: Duration,
) -> std::io::Result<()> {
    let mut head = String::with_capacity(256);
    head.push_str(if chunked {
        "HTTP/1.1 200 OK\r\n"
    } else {
        "HTTP/1.0 200 OK\r\n"
    });
    for (name, value) in sse::RESPONSE_HEADERS {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    push_cors(cors, &mut head);
    head.push_str(if chunked {
        "transfer-encoding: chunked\r\n\r\n"
    } else {
        "connection: close\r\n\r\n"
    });
    stream.write_all(head.as_bytes()).await?;
    drop(head);

    let mut body = std::pin::pin!(body);
    loop {
        let next = std::future::poll_fn(|cx| {
            if client_closed(stream, cx) {
                return Poll::Ready(None);
            }
            body.as_mut().poll_frame(cx)
        })
        .await;
        let Some(Ok(frame)) = next else { break };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        // A client that does not take a chunk within the deadline is
        // closed: it resumes from its cursor, and stops holding memory.
        let write = async {
            if chunked {
                let size = format!("{:x}\r\n", data.len());
                let mut out = Bytes::from(size).chain(data).chain(&b"\r\n"[..]);
                stream.write_all_buf(&mut out).await
            } else {
                let mut data = data;
                stream.write_all_buf(&mut data).await
            }
        };
        match tokio::time::timeout(write_deadline, write).await {
            Ok(written) => written?,
            Err(_) => {
                tracing::debug!("SSE client not reading: stream closed");
                return Ok(());
            }
        }
    }
    if chunked {
        stream.write_all(b"0\r\n\r\n").await?;
    }
    stream.shutdown().await
}

/// Whether the peer has closed its side. Watches read readiness (no buffer
/// is kept); bytes a client sends on a stream are read and ignored.
fn client_closed(stream: &TcpStream, cx: &mut std::task::Context<'_>) -> bool {
    loop {
        match stream.poll_read_ready(cx) {
            Poll::Pending => return false,
            Poll::Ready(Err(_)) => return true,
            Poll::Ready(Ok(())) => {
                let mut scratch = [0u8; 64];
                match stream.try_read(&mut scratch) {
                    Ok(0) => return true,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(_) => return true,
                }
            }
        }
    }
}

async fn write_error(
    stream: &mut TcpStream,
    cors: &policy::Cors,
    e: ApiError,
) -> std::io::Result<()> {
    let body = policy::error_body(&e);
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-length: {}\r\nconnection: close\r\n",
        e.status.as_u16(),
        e.status.canonical_reason().unwrap_or(""),
        body.len()
    );
    for (name, value) in policy::error_headers(&e) {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    push_cors(cors, &mut head);
    head.push_str("\r\n");
    let mut out = Bytes::from(head).chain(body);
    stream.write_all_buf(&mut out).await?;
    stream.shutdown().await
}

/// CORS response headers for a cross-origin `EventSource`: the router's
/// decision (`transport::policy::cors`), written as header lines.
fn push_cors(cors: &policy::Cors, head: &mut String) {
    for (name, value) in policy::cors_headers(cors) {
        if let Ok(v) = value.to_str() {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
}
