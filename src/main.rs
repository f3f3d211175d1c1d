//! The `pushgate` binary: logging setup, then the CLI. Nothing else lives
//! here; invariant: `anyhow` and process exit codes stop at this edge (and
//! the CLI), the library returns typed errors.
//!
//! Logs go to stderr: human-readable with colours on a terminal, without
//! colour codes otherwise (files, journald, pipes), and one JSON object per
//! line with `PUSHGATE_LOG_FORMAT=json`.

use std::io::IsTerminal;

use clap::Parser;

#[tokio::main]
async fn main() {
    init_logging();
    let cli = pushgate::cli::Cli::parse();
    std::process::exit(pushgate::cli::run(cli).await);
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PUSHGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match std::env::var("PUSHGATE_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().flatten_event(true).init(),
        other => {
            if let Ok(f) = other
                && !f.is_empty()
                && f != "text"
            {
                eprintln!(
                    "pushgate: PUSHGATE_LOG_FORMAT={f:?} is not \"json\" or \"text\"; using text"
                );
            }
            let colour = std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(colour).init()
        }
    }
}
