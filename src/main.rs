//! The `pushgate` binary: logging setup, then the CLI. Nothing else lives
//! here; invariant: `anyhow` and process exit codes stop at this edge (and
//! the CLI), the library returns typed errors.

use clap::Parser;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PUSHGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = pushgate::cli::Cli::parse();
    std::process::exit(pushgate::cli::run(cli).await);
}
