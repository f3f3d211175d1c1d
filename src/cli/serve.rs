//! `pushgate serve`: load configuration, bind, print where to go, run until
//! SIGTERM or Ctrl-C.
//!
//! Invariants: a bad configuration (sources included) or an open
//! development server on a non-loopback address exits 2 before anything is
//! bound or printed; the exit code tells configuration errors (2) from
//! runtime failures (1).

use std::path::PathBuf;

use clap::Args;

use crate::config::Config;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML configuration file (contract section 5). Every key can also be
    /// set as PUSHGATE_SECTION__KEY in the environment.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Allow development mode (no keys) on a non-loopback address.
    #[arg(long)]
    pub insecure: bool,
}

/// Exit codes: 0 clean stop, 1 runtime failure, 2 bad configuration.
pub async fn run(args: ServeArgs) -> i32 {
    let mut config = match Config::load(args.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pushgate: configuration error: {e}");
            return 2;
        }
    };
    config.insecure = args.insecure;
    // Sources are checked by the code that runs them (config sits below
    // ingest); checked here too so a bad one stops start-up before binding.
    if let Err(e) = crate::ingest::Sources::from_config(&config.sources) {
        eprintln!("pushgate: configuration error: {e}");
        return 2;
    }
    // Added here rather than inside `serve` so the banner can print its secret.
    let demo_secret = crate::ingest::add_demo_source(&mut config);
    let addr = match config.listen_addr() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("pushgate: configuration error: {e}");
            return 2;
        }
    };
    // Refuse an open development server before binding or printing anything.
    if let Err(e) = crate::check_listen(&config, addr) {
        eprintln!("pushgate: {e}");
        return 2;
    }
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("pushgate: cannot listen on {addr}: {e}");
            return 1;
        }
    };
    print_banner(
        &config,
        listener.local_addr().unwrap_or(addr),
        demo_secret.as_deref(),
    );
    match crate::serve(listener, config, shutdown_signal()).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("pushgate: {e}");
            if matches!(
                e,
                crate::ServeError::InsecureListen(_) | crate::ServeError::Config(_)
            ) {
                2
            } else {
                1
            }
        }
    }
}

fn print_banner(config: &Config, addr: std::net::SocketAddr, demo_secret: Option<&str>) {
    let scheme = if config.server.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let base = format!("{scheme}://{addr}");
    println!("pushgate listening on {base}");
    println!("  dashboard:  {base}/");
    println!(
        "  publish:    curl -X POST {base}/v1/publish -H 'content-type: application/json' -d '{{\"channel\":\"news\",\"type\":\"hello\",\"data\":{{\"msg\":\"hi\"}}}}'"
    );
    println!("  subscribe:  curl -N '{base}/v1/stream?channel=news'");
    println!(
        "  log:        {}",
        crate::store::redacted_url(&config.store.url)
    );
    for source in &config.sources {
        println!(
            "  webhooks:   {base}/webhooks/{} ({})",
            source.name, source.kind
        );
    }
    if let Some(secret) = demo_secret {
        println!();
        println!("  demo Stripe source, secret {secret}:");
        println!(
            "    pushgate send stripe --url {base}/webhooks/{} --secret {secret} --data data.object.metadata.user_id=demo",
            crate::ingest::DEMO_SOURCE
        );
        println!("    curl -N '{base}/v1/stream?channel=user:demo'");
    }
    if config.auth.is_development() {
        println!();
        println!("  !! DEVELOPMENT MODE: no keys are configured, so no key or token is required");
        if addr.ip().is_loopback() {
            println!(
                "  !! anywhere. This is only allowed on a loopback address. Set auth.publish_keys,"
            );
            println!("  !! auth.admin_keys and auth.jwt_secret before exposing pushgate.");
        } else {
            println!("  !! anywhere, and --insecure put it on {addr}: ANYONE WHO CAN REACH THIS");
            println!("  !! ADDRESS CAN READ AND WRITE EVERY CHANNEL. Configure keys instead.");
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    tracing::info!("shutdown signal received");
}
