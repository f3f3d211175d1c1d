//! The lean HTTP/1 path's head sniffer (issue 11 item 3): it waits for the
//! head as it arrives and answers every well-formed head on `/v1/stream`,
//! whatever its line endings. Each test has a client of the same shape that
//! already worked beside it.

use std::time::Duration;

use pushgate::config::Dur;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// Sends `parts` (pausing between them) and returns the response's status
/// line. The header timeout is far away, so an answer is never a timeout.
async fn status_line(s: &TestServer, parts: &[&[u8]]) -> String {
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.write_all(part).await.unwrap();
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    tokio::time::timeout(Duration::from_secs(20), async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed without an answer: {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("an answer before the header timeout");
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap().to_string()
}

async fn server() -> TestServer {
    TestServer::with(|c| c.server.header_timeout = Dur(Duration::from_secs(60))).await
}

#[tokio::test]
async fn a_stream_head_with_bare_lf_line_endings_is_answered() {
    let s = server().await;
    let lf = status_line(
        &s,
        &[b"GET /v1/stream?channel=a HTTP/1.1\nhost: 127.0.0.1\n\n"],
    )
    .await;
    assert_eq!(lf, "HTTP/1.1 200 OK");
    // A bad one the same way gets the contract's error, not a reset.
    let bad = status_line(
        &s,
        &[b"GET /v1/stream?channel=no%20way HTTP/1.1\nhost: 127.0.0.1\n\n"],
    )
    .await;
    assert!(bad.starts_with("HTTP/1.1 400"), "{bad}");
    // Positive control: the usual CRLF head.
    let crlf = status_line(
        &s,
        &[b"GET /v1/stream?channel=a HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"],
    )
    .await;
    assert_eq!(crlf, "HTTP/1.1 200 OK");
}

#[tokio::test]
async fn a_stream_head_that_arrives_in_pieces_is_answered_when_complete() {
    let s = server().await;
    // The blank line itself is split across writes.
    let pieces: [&[u8]; 4] = [
        b"GET /v1/stream?chan",
        b"nel=a HTTP/1.1\r\nhost: 127.0.0.1\r\nx-pad: ",
        &[b'p'; 3000],
        b"\r\n\r",
    ];
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    for p in pieces {
        c.write_all(p).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not complete yet: nothing is answered.
    let mut buf = [0u8; 64];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.read(&mut buf))
            .await
            .is_err(),
        "answered an incomplete head"
    );
    c.write_all(b"\n").await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), async {
        while !got.windows(2).any(|w| w == b"\r\n") {
            let n = c.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("answered once complete");
    assert!(got.starts_with(b"HTTP/1.1 200 OK"));
    // Positive control: the same head in one write.
    let whole = status_line(
        &s,
        &[b"GET /v1/stream?channel=a HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"],
    )
    .await;
    assert_eq!(whole, "HTTP/1.1 200 OK");
}

/// The whole response to `head`, read until the server closes or 5 s pass.
async fn response(s: &TestServer, head: &str) -> (String, Vec<(String, String)>, String) {
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.lines();
    let status = lines.next().unwrap().to_string();
    let mut headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .filter(|(k, _)| k.starts_with("access-control") || k == "content-type")
        .collect();
    headers.sort();
    (status, headers, body.to_string())
}

/// Issue 10 part 4: the lean path and hyper share one policy. The same
/// refused request, once through each (a CRLF head takes the lean path, a
/// bare-LF head goes to hyper), gets the same status, JSON body and CORS
/// headers, for a listed origin and for one that is not.
#[tokio::test]
async fn the_lean_path_and_hyper_refuse_alike() {
    let s = TestServer::with(|c| {
        c.server.header_timeout = Dur(Duration::from_secs(60));
        c.server.cors_origins = vec!["https://app.example".into()];
    })
    .await;
    for origin in ["https://app.example", "https://evil.example"] {
        let ask = |eol: &str| {
            format!(
                "GET /v1/stream?channel=no%20way HTTP/1.1{eol}host: 127.0.0.1{eol}origin: {origin}{eol}connection: close{eol}{eol}"
            )
        };
        let lean = response(&s, &ask("\r\n")).await;
        let hyper = response(&s, &ask("\n")).await;
        assert!(lean.0.starts_with("HTTP/1.1 400"), "{lean:?}");
        assert_eq!(lean.0, hyper.0, "status");
        // What decides access is `access-control-allow-origin`; with it, the
        // other CORS headers must match too. (Without it, hyper's CORS layer
        // still sends its fixed ones, which grant nothing.)
        let decisive = |h: &[(String, String)]| -> Vec<(String, String)> {
            let allowed = h.iter().any(|(k, _)| k == "access-control-allow-origin");
            h.iter()
                .filter(|(k, _)| allowed || !k.starts_with("access-control"))
                .cloned()
                .collect()
        };
        assert_eq!(
            decisive(&lean.1),
            decisive(&hyper.1),
            "content type and CORS headers, {origin}"
        );
        let body = |b: &str| -> serde_json::Value {
            // hyper may frame the body in chunks; the JSON is the same.
            let start = b.find('{').unwrap();
            let end = b.rfind('}').unwrap();
            serde_json::from_str(&b[start..=end]).unwrap()
        };
        assert_eq!(body(&lean.2), body(&hyper.2), "body");
        let allowed = lean
            .1
            .iter()
            .any(|(k, v)| k == "access-control-allow-origin" && v == origin);
        assert_eq!(allowed, origin == "https://app.example");
    }
}
