//! The command line: `pushgate serve | send | listen | token | completions`.
//!
//! Owns argument parsing and what each subcommand prints; the work itself is
//! done by the library (`serve`) so the CLI stays thin.

pub mod listen;
pub mod send;
pub mod serve;
pub mod token;

use clap::{CommandFactory, Parser, Subcommand};

/// The crate version and the git revision it was built from (build.rs).
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("PUSHGATE_GIT_REV"),
    ")"
);

#[derive(Parser, Debug)]
#[command(
    name = "pushgate",
    version = VERSION,
    about = "Self-hosted real-time event gateway"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server (zero configuration: 127.0.0.1:8080, ./pushgate.db, development mode).
    Serve(serve::ServeArgs),
    /// Tail channels in the terminal, or forward each event, signed, to a local URL.
    Listen(listen::ListenArgs),
    /// Sign and send a realistic sample webhook of a provider (stripe, github, shopify, standard, hmac, none).
    Send(send::SendArgs),
    /// Mint an HS256 subscriber token (JWT) and print it.
    Token(token::TokenArgs),
    /// Print a shell completion script: `pushgate completions bash > /etc/bash_completion.d/pushgate`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Runs the CLI; the return value is the process exit code.
pub async fn run(cli: Cli) -> i32 {
    match cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Listen(args) => listen::run(args).await,
        Command::Send(args) => send::run(args).await,
        Command::Token(args) => token::run(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "pushgate",
                &mut std::io::stdout(),
            );
            0
        }
    }
}
