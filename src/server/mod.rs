//! The listening socket: accepts connections and serves HTTP/1.1 and HTTP/2
//! on them (h2c by prior knowledge in clear text; ALPN under TLS).
//!
//! Invariants: a client gets `server.header_timeout` to send its request
//! head (slow or half-open connections are closed, not kept); on shutdown the
//! listener closes first, then streams are ended (`on_shutdown`), then open
//! requests get `drain` to finish; one client address holds at most
//! `limits.connections_per_client` connections (`conn_cap`; trusted proxies
//! exempt), refused unread in the accept loop.
//!
//! Every request carries the client's address (`ConnectInfo` for the
//! router): the peer's, or, when the peer is one of `server.trusted_proxies`,
//! the last address in `X-Forwarded-For` that is not a trusted proxy (a
//! client cannot spoof it past a proxy that appends). HTTP/2 requests get a
//! `Host` header from their `:authority`, so same-origin checks see one shape.
//!
//! Plain-text `GET /v1/stream` over HTTP/1.x is recognised from the first
//! bytes and served by `sse_h1`, which keeps no per-connection buffers
//! (hyper keeps ~16 KiB per connection, which dominates an idle stream's
//! cost). Everything else — other routes, HTTP/2, TLS — goes to hyper.

pub mod conn_cap;
mod sse_h1;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use ipnet::IpNet;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tower::ServiceExt;

use crate::config::ServerConfig;
use crate::{AppState, ServeError};

pub fn tls_acceptor(cfg: &ServerConfig) -> Result<Option<TlsAcceptor>, ServeError> {
    let (Some(cert), Some(key)) = (&cfg.tls_cert, &cfg.tls_key) else {
        return Ok(None);
    };
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| ServeError::Tls(format!("{}: {e}", p.display())))
    };
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ServeError::Tls(format!("{}: {e}", cert.display())))?;
    let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| ServeError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| ServeError::Tls(format!("{}: no private key found", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

fn builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout.0)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(cfg.heartbeat.0)
        .keep_alive_timeout(cfg.heartbeat.0 * 2)
        .max_concurrent_streams(256);
    b
}

/// The client behind `peer`: walk `X-Forwarded-For` from the right (the
/// entries our own proxies appended) past every trusted proxy.
pub fn client_addr(peer: SocketAddr, trusted: &[IpNet], headers: &http::HeaderMap) -> SocketAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(&ip.to_canonical()));
    if trusted.is_empty() || !is_trusted(peer.ip()) {
        return peer;
    }
    let mut client = peer.ip();
    let hops = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect::<Vec<_>>();
    for hop in hops.into_iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else {
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    SocketAddr::new(client, 0)
}

/// What `run` serves, and how it stops.
pub struct Run<S, F> {
    pub listener: TcpListener,
    /// Its `config.server` is the listener's configuration.
    pub app: Arc<AppState>,
    pub router: Router,
    pub tls: Option<TlsAcceptor>,
    /// Resolves when the server should stop accepting.
    pub shutdown: S,
    /// Called once the listener is closed, to end long-lived streams.
    pub on_shutdown: F,
    /// How long open requests get to finish after that.
    pub drain: Duration,
}

pub async fn run<S, F>(run: Run<S, F>) -> std::io::Result<()>
where
    S: Future<Output = ()> + Send + 'static,
    F: FnOnce(),
{
    let Run {
        listener,
        app,
        router,
        tls,
        shutdown,
        on_shutdown,
        drain,
    } = run;
    let config = app.config.clone();
    let cfg: &ServerConfig = &config.server;
    // Validated by `Config::load`.
    let trusted: Arc<[IpNet]> = cfg.trusted_proxies().unwrap_or_default().into();
    let builder = builder(cfg);
    let graceful = GracefulShutdown::new();
    let handshake_timeout = cfg.header_timeout.0;
    let write_deadline = sse_h1::hyper_write_deadline(&app.config);
    let conn_cap =
        conn_cap::ConnCap::new(app.config.limits.connections_per_client, trusted.clone());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: wait, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(slot) = conn_cap.admit(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: limits.connections_per_client");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let proxies = trusted.clone();
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            let client = client_addr(peer, &proxies, req.headers());
            req.extensions_mut().insert(ConnectInfo(client));
            if !req.headers().contains_key(http::header::HOST)
                && let Some(host) = req
                    .uri()
                    .authority()
                    .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(http::header::HOST, host);
            }
            router.clone().oneshot(req.map(axum::body::Body::new))
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let app = app.clone();
        let trusted_h1 = trusted.clone();
        match tls.clone() {
            None => {
                tokio::spawn(async move {
                    let _slot = slot;
                    let stream = match sse_h1::sniff(stream, handshake_timeout).await {
                        sse_h1::Sniffed::Nothing => return,
                        sse_h1::Sniffed::SseHead(stream, head) => {
                            sse_h1::serve(app, stream, peer, &trusted_h1, head).await;
                            return;
                        }
                        sse_h1::Sniffed::Other(stream) => {
                            stream.with_write_deadline(write_deadline)
                        }
                    };
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                });
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    let _slot = slot;
                    let Ok(Ok(tls)) = tokio::time::timeout(
                        handshake_timeout,
                        acceptor.accept(
                            sse_h1::Prefixed::plain(stream).with_write_deadline(write_deadline),
                        ),
                    )
                    .await
                    else {
                        return;
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                });
            }
        }
    }
    drop(listener);
    on_shutdown();
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(drain) => tracing::warn!("shutdown: some connections did not finish in time"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = http::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "6.6.6.6, 1.2.3.4, 10.0.0.2".parse().unwrap(),
        );
        let proxy: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "9.9.9.9:5000".parse().unwrap();
        // 6.6.6.6 was written by the client itself; 1.2.3.4 by our proxy.
        assert_eq!(client_addr(proxy, &trusted, &h).ip().to_string(), "1.2.3.4");
        assert_eq!(client_addr(stranger, &trusted, &h), stranger);
        assert_eq!(client_addr(proxy, &[], &h), proxy);
        h.insert("x-forwarded-for", "garbage".parse().unwrap());
        assert_eq!(client_addr(proxy, &trusted, &h).ip(), proxy.ip());
    }
}
