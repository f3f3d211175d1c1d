//! `pushgate token`: mints an HS256 subscriber token from the configured
//! secret (or `--secret`) and prints it on stdout, nothing else, so it can be
//! captured: `TOKEN=$(pushgate token --sub 42 --subscribe 'user:42')`.
//!
//! Only HS256 can be minted here: with RS256/ES256 pushgate holds the public
//! key only, and tokens come from whoever holds the private key.

use std::path::PathBuf;

use clap::Args;

use crate::auth::{ChannelGrants, Claims, mint_hs256};
use crate::channel::Pattern;
use crate::clock::unix_now;
use crate::config::{Config, Dur};

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Read `auth.jwt_secret` from this configuration file (PUSHGATE_…
    /// environment variables apply, as for `serve`).
    #[arg(long, short, conflicts_with = "secret")]
    pub config: Option<PathBuf>,
    /// The HS256 secret itself (instead of a configuration).
    #[arg(long, env = "PUSHGATE_TOKEN_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The token's subject (`sub`): who it is for; publish limits count per subject.
    #[arg(long)]
    pub sub: String,
    /// Channels the token may read; `prefix*` matches any longer name.
    #[arg(long, num_args = 1.., value_name = "PATTERN")]
    pub subscribe: Vec<String>,
    /// Channels the token may publish to.
    #[arg(long, num_args = 1.., value_name = "PATTERN")]
    pub publish: Vec<String>,
    /// Lifetime: `30m`, `1h`, `7d`.
    #[arg(long, default_value = "1h", value_parser = Dur::parse)]
    pub ttl: Dur,
}

/// Exit codes: 0 printed a token, 2 bad arguments or configuration.
pub fn run(args: TokenArgs) -> i32 {
    match mint(args, std::env::vars()) {
        Ok(token) => {
            println!("{token}");
            0
        }
        Err(message) => {
            eprintln!("pushgate token: {message}");
            2
        }
    }
}

/// The token, or why none can be minted.
pub fn mint(
    args: TokenArgs,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<String, String> {
    let secret = match args.secret {
        Some(s) => s,
        None => {
            let config = Config::load(args.config.as_deref(), env)
                .map_err(|e| format!("configuration error: {e}"))?;
            match (config.auth.jwt_secret, config.auth.jwt_public_key_file) {
                (Some(s), _) => s,
                (None, Some(path)) => {
                    return Err(format!(
                        "the configuration has only a public key (auth.jwt_public_key_file = {}): \
                         pushgate cannot mint RS256/ES256 tokens; sign them with the private key \
                         in your backend, or set auth.jwt_secret for HS256",
                        path.display()
                    ));
                }
                (None, None) => {
                    return Err(
                        "no secret: pass --secret, or --config with auth.jwt_secret \
                         (or set PUSHGATE_AUTH__JWT_SECRET)"
                            .into(),
                    );
                }
            }
        }
    };
    if secret.is_empty() {
        return Err("the secret is empty".into());
    }
    if args.subscribe.is_empty() && args.publish.is_empty() {
        return Err("grant something: --subscribe PATTERN… and/or --publish PATTERN…".into());
    }
    if let Some(bad) = args
        .subscribe
        .iter()
        .chain(&args.publish)
        .find(|p| !Pattern::is_valid(p))
    {
        return Err(format!(
            "`{bad}` is not a channel pattern: 1-200 bytes of [A-Za-z0-9_.:@=/-], optionally ending in `*`"
        ));
    }
    if args.ttl.0.as_secs() == 0 {
        return Err("--ttl must be at least 1s".into());
    }
    let now = unix_now();
    let claims = Claims {
        sub: Some(args.sub),
        iat: Some(now),
        exp: Some(now.saturating_add(args.ttl.0.as_secs())),
        nbf: None,
        pushgate: ChannelGrants {
            subscribe: args.subscribe,
            publish: args.publish,
        },
    };
    mint_hs256(&secret, &claims).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(config: Option<PathBuf>, secret: Option<&str>) -> TokenArgs {
        TokenArgs {
            config,
            secret: secret.map(str::to_string),
            sub: "42".into(),
            subscribe: vec!["user:42".into()],
            publish: vec![],
            ttl: Dur::secs(3600),
        }
    }

    #[test]
    fn a_public_key_alone_cannot_mint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.toml");
        std::fs::write(&p, "[auth]\njwt_public_key_file = \"/keys/pub.pem\"\n").unwrap();
        let e = mint(args(Some(p), None), Vec::new()).unwrap_err();
        assert!(e.contains("only a public key"), "{e}");
    }

    #[test]
    fn secret_from_environment_or_flag() {
        let env = vec![("PUSHGATE_AUTH__JWT_SECRET".to_string(), "s".repeat(32))];
        let token = mint(args(None, None), env).unwrap();
        assert_eq!(token.split('.').count(), 3);
        let e = mint(args(None, None), Vec::new()).unwrap_err();
        assert!(e.contains("no secret"), "{e}");
        let mut bad = args(None, Some("x"));
        bad.subscribe = vec!["a*b".into()];
        assert!(mint(bad, Vec::new()).unwrap_err().contains("a*b"));
    }
}
