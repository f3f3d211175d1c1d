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
