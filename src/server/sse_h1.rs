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
//! - it only ever serves plain-text HTTP/1.x GETs of `/v1/stream` with CRLF
//!   heads; anything else goes to hyper with the bytes read so far replayed
//!   first (`Prefixed`), so hyper sees the connection from its start;
//! - the head is read as it arrives, waiting on readability (no timer), and
//!   each read's new bytes are scanned once;
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
use tokio::io::AsyncWriteExt;
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
    /// A complete `GET /v1/stream` head (with CRLF line endings): these bytes.
    SseHead(TcpStream, Vec<u8>),
    /// Anything else: hand the connection to hyper, these bytes first.
    Other(Prefixed),
}

/// Reads the start of a connection as it arrives until it can tell a
/// `GET /v1/stream` head from anything else. It sleeps on the socket's
/// readability between reads (no polling timer), and only scans the bytes
/// that are new. A head with bare LF line endings goes to hyper, which
/// answers it; so does anything longer than `MAX_HEAD` (431).
pub async fn sniff(stream: TcpStream, timeout: Duration) -> Sniffed {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf: Vec<u8> = Vec::new();
    let mut scanned = 0;
    loop {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Ok(Ok(())) => {}
            _ => return Sniffed::Nothing,
        }
        buf.reserve((MAX_HEAD + 1).saturating_sub(buf.len()).min(4096));
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return Sniffed::Nothing,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return Sniffed::Nothing,
        }
        let n = buf.len();
        let common = n.min(PREFIX.len());
        let other = buf[..common] != PREFIX[..common]
            || (n > PREFIX.len() && !matches!(buf[PREFIX.len()], b'?' | b' '));
        if other {
            return Sniffed::Other(Prefixed::new(buf, stream));
        }
        if let Some(end) = head_end(&buf, scanned) {
            let head = &buf[..end];
            let bare_lf = head
                .iter()
                .enumerate()
                .any(|(i, b)| *b == b'\n' && (i == 0 || head[i - 1] != b'\r'));
            if bare_lf {
                return Sniffed::Other(Prefixed::new(buf, stream));
            }
            // Bytes after the head (a stream's client has nothing to say)
            // are dropped with the rest of what it sends.
            buf.truncate(end);
            return Sniffed::SseHead(stream, buf);
        }
        if n > MAX_HEAD {
            return Sniffed::Other(Prefixed::new(buf, stream));
        }
        // An end marker may straddle this read and the next.
        scanned = n.saturating_sub(3);
    }
}

/// A connection as hyper serves it (plain, or under TLS). The first bytes,
/// if `sniff` already read them, are read again first, so hyper sees the
/// connection from its start. Writes get a deadline: a write that makes no
/// progress for `write_deadline` fails, and hyper closes the connection, so
/// a client that stops reading cannot hold a stream (and its batch) forever.
/// The timer exists only while a write is blocked.
pub struct Prefixed {
    prefix: Bytes,
    inner: TcpStream,
    write_deadline: Duration,
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Prefixed {
    fn new(prefix: Vec<u8>, inner: TcpStream) -> Prefixed {
        Prefixed {
            prefix: prefix.into(),
            inner,
            write_deadline: Duration::MAX,
            stalled: None,
        }
    }

    /// A connection with nothing read yet (the TLS path).
    pub fn plain(inner: TcpStream) -> Prefixed {
        Prefixed::new(Vec::new(), inner)
    }

    pub fn with_write_deadline(mut self, deadline: Duration) -> Prefixed {
        self.write_deadline = deadline;
        self
    }

    /// Tracks a write's progress: `Pending` starts the clock, anything else
    /// stops it; past the deadline the write fails.
    fn deadline<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        if self.write_deadline == Duration::MAX {
            return Poll::Pending;
        }
        let deadline = self.write_deadline;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client is not reading",
            )));
        }
        Poll::Pending
    }
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = buf.remaining().min(self.prefix.len());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            if self.prefix.is_empty() {
                self.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.deadline(cx, polled)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.deadline(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The length of the head (through its blank line, `\r\n` or bare `\n`
/// endings alike) if `seen` holds all of it; only `seen[from..]` is new.
fn head_end(seen: &[u8], from: usize) -> Option<usize> {
    let start = from.min(seen.len());
    let mut i = start;
    while let Some(off) = seen[i..].iter().position(|b| *b == b'\n') {
        let at = i + off;
        // A line feed followed by an empty line ends the head.
        match seen.get(at + 1..) {
            Some([b'\n', ..]) => return Some(at + 2),
            Some([b'\r', b'\n', ..]) => return Some(at + 3),
            _ => {}
        }
        i = at + 1;
    }
    None
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
    raw: Vec<u8>,
) {
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

/// The same for connections hyper serves; WebSockets among them close
/// slow readers themselves (`websocket.send_timeout`, with a close frame),
/// so this stays behind that.
pub fn hyper_write_deadline(config: &crate::config::Config) -> Duration {
    (config.server.heartbeat.0 * 2)
        .max(config.websocket.send_timeout.0 * 2)
        .max(Duration::from_secs(1))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_with_either_line_ending_and_only_new_bytes_scanned() {
        let crlf = b"GET /v1/stream?channel=a HTTP/1.1\r\nhost: x\r\n\r\nextra";
        assert_eq!(head_end(crlf, 0), Some(crlf.len() - 5));
        let lf = b"GET /v1/stream?channel=a HTTP/1.1\nhost: x\n\n";
        assert_eq!(head_end(lf, 0), Some(lf.len()));
        let mixed = b"GET /v1/stream HTTP/1.1\nhost: x\n\r\n";
        assert_eq!(head_end(mixed, 0), Some(mixed.len()));
        // Incomplete heads, and a marker that straddles two looks.
        assert_eq!(head_end(b"GET /v1/stream HTTP/1.1\r\nhost: x\r\n", 0), None);
        let whole = b"GET /v1/stream HTTP/1.1\r\nhost: x\r\n\r\n";
        let first_look = whole.len() - 2;
        assert_eq!(head_end(&whole[..first_look], 0), None);
        assert_eq!(
            head_end(whole, first_look.saturating_sub(3)),
            Some(whole.len())
        );
    }
}
