//! pushgate: webhooks and a publish API in; one durable, ordered log;
//! SSE, WebSocket, long-polling and signed outbound webhooks out.
//!
//! Data flows through the modules in this order: `server` → `api` →
//! `ingest` / `message` → `store` (the log, the truth) → `hub` (in-memory
//! fan-out and wake-up; `envelope`: each event encoded once) → `feed` (one
//! subscription: history then live, exactly once) → `transport` (SSE,
//! WebSocket, polling: framing only); and `deliver` (outbound webhooks,
//! reading the log itself). `serve` wires them
//! together; `main` and the integration tests both call it.
//!
//! Imports only point down: domain modules (store, hub, feed, envelope,
//! ingest, deliver, auth, limits, config, channel, message, clock) never import `api`,
//! `server`, `transport`, `state` or `error` (`tests/layers.rs` enforces it;
//! docs/architecture.md draws the layers).

pub mod api;
pub mod auth;
pub mod channel;
pub mod cli;
pub mod clock;
pub mod config;
pub mod deliver;
pub mod envelope;
pub mod error;
pub mod feed;
pub mod hardening;
pub mod hub;
pub mod ingest;
pub mod limits;
pub mod message;
pub mod metrics;
pub mod server;
pub mod state;
pub mod store;
pub mod transport;

pub use state::AppState;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::auth::Auth;
use crate::config::Config;
use crate::deliver::Deliverer;
use crate::hub::Hub;
use crate::limits::Limits;
use crate::metrics::Metrics;
use crate::store::Retention;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "refusing to listen on {0} without keys: development mode is loopback-only (configure auth keys, or pass --insecure)"
    )]
    InsecureListen(std::net::SocketAddr),
    #[error("configuration error: {0}")]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Deliver(#[from] deliver::DeliverError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Development mode (no keys) is open to anyone who can connect, so it
/// only listens on loopback unless `config.insecure` (`serve --insecure`).
pub fn check_listen(config: &Config, local: std::net::SocketAddr) -> Result<(), ServeError> {
    if config.auth.is_development() && !local.ip().is_loopback() && !config.insecure {
        return Err(ServeError::InsecureListen(local));
    }
    Ok(())
}

/// How long shutdown waits for open requests before dropping them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(8);

/// Runs pushgate on `listener` until `shutdown` resolves, then closes streams
/// (clients reconnect elsewhere), finishes in-flight requests, flushes the
/// log and returns.
pub async fn serve(
    listener: TcpListener,
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let local = listener.local_addr()?;
    check_listen(&config, local)?;
    if config.auth.is_development() {
        if local.ip().is_loopback() {
            tracing::warn!(
                "DEVELOPMENT MODE: no keys are configured, so no key or token is required anywhere; loopback only"
            );
        } else {
            tracing::warn!(
                %local,
                "INSECURE: development mode on a non-loopback address (--insecure): anyone who can reach it can read and write every channel"
            );
        }
    }
    hardening::warn_disabled(&config);
    // Development mode's `demo` Stripe source (the CLI adds it earlier, to
    // print its secret; then this finds it there and adds nothing).
    ingest::add_demo_source(&mut config);
    let sources = ingest::Sources::from_config(&config.sources)?;
    let config = Arc::new(config);
    // Before the store opens, so a bad key file stops start-up cleanly.
    let auth = Auth::new(&config.auth, &config.server.cors_origins)?;
    let (store, feed) = store::open(&config.store).await?;
    let hub = Arc::new(Hub::new(store.log_tag(), config.server.subscriber_queue));
    let metrics = Metrics::new();
    let deliver = Arc::new(Deliverer::new(config.clone(), store.clone(), &metrics)?);
    let app = Arc::new(AppState {
        auth,
        limits: Limits::new(&config.limits),
        metrics,
        sources,
        config: config.clone(),
        store: store.clone(),
        hub: hub.clone(),
        deliver: deliver.clone(),
    });

    let mut background = tokio::task::JoinSet::new();
    background.spawn(feed_hub(hub.clone(), deliver.clone(), feed));
    background.spawn(heartbeat(app.clone()));
    background.spawn(retention(app.clone()));
    background.spawn(deliver.clone().run_dispatcher());
    background.spawn(deliver.clone().run_maintenance());
    let workers = tokio::spawn(deliver.clone().run_workers());

    let router = api::router(app.clone());
    let tls = server::tls_acceptor(&config.server)?;
    let result = server::run(server::Run {
        listener,
        app: app.clone(),
        router,
        tls,
        shutdown,
        on_shutdown: {
            let hub = hub.clone();
            move || hub.close_all()
        },
        drain: DRAIN_TIMEOUT,
    })
    .await;

    // Webhook attempts in flight get a moment to finish and be recorded.
    deliver.stop();
    let _ = workers.await;
    background.abort_all();
    while background.join_next().await.is_some() {}
    store.close().await;
    tracing::info!("pushgate stopped");
    result.map_err(ServeError::from)
}

/// Feeds the hub from the store's commit feed, in log order, and wakes the
/// outbound webhook dispatcher (which reads the log itself).
async fn feed_hub(hub: Arc<Hub>, deliver: Arc<Deliverer>, mut feed: store::CommitFeed) {
    while let Some(batch) = feed.recv().await {
        hub.dispatch(&batch);
        deliver.events_committed();
    }
}

async fn heartbeat(app: Arc<AppState>) {
    let mut tick = tokio::time::interval(app.config.server.heartbeat.0);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        app.hub.heartbeat();
        app.limits.retain_recent();
    }
}

async fn retention(app: Arc<AppState>) {
    let cfg = &app.config.store;
    // Prune often enough that short retentions (tests, demos) are honoured.
    let every = (cfg.retention.0 / 2).clamp(Duration::from_millis(500), Duration::from_secs(60));
    let rule = Retention {
        max_age_ms: cfg.retention.0.as_millis().min(i64::MAX as u128) as i64,
        max_events: cfg.max_events,
        dedupe_window_ms: cfg.dedupe_window.0.as_millis().min(i64::MAX as u128) as i64,
    };
    loop {
        tokio::time::sleep(every).await;
        match app.store.prune(rule).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(removed = n, "retention pruned the log"),
            Err(e) => tracing::warn!(error = %e, "retention failed"),
        }
    }
}
