//! pushgate-bench: load generator for pushgate and, in the same run, Nginx +
//! Nchan (../shared/bench). Every mode prints one JSON object per target.
//! Each benchmark mode lives in its own file beside this one; what they share
//! (starting a fresh server, reading its CPU and RSS, raw SSE clients) is here.
//!
//! Usage (release build; see docs/benchmarks.md for the full commands):
//!   pushgate-bench idle    --target pushgate|nchan --conns 10000
//!   pushgate-bench fanout  --target pushgate|nchan --subs 1000 --events 200 [--rate 2]
//!   pushgate-bench publish --concurrency 64 --seconds 5
//!   pushgate-bench sqlite-baseline --batch 64 --seconds 5
//!   pushgate-bench deliver --endpoints 100 --events 1000 --rate 20 --seconds 5
//!   pushgate-bench webhooks --url http://127.0.0.1:8080/webhooks/demo --secret whsec_… [--concurrency 64]
//!   pushgate-bench pg      --url postgres://postgres@127.0.0.1:5432/postgres --nodes 1,3 --publishers 64
//!   pushgate-bench ws-idle   --target pushgate|nchan --conns 10000
//!   pushgate-bench ws-fanout --target pushgate|nchan --subs 10000 --events 50
//!   pushgate-bench attack slowbody|slowloris|heads|nonreader|badsig [--conns N] [--seconds 20] (see docs/security.md)

mod attack;
mod deliver;
mod fanout;
mod pg;
mod publish;
mod target;
mod webhooks;
mod ws;

use std::collections::HashMap;

fn main() {
    let mut args = std::env::args().skip(1);
    let mode = args.next().unwrap_or_default();
    let opts = Opts::parse(args.collect());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.get("client-threads", 1usize))
        .enable_all()
        .build()
        .expect("runtime");
    let result = rt.block_on(async {
        match mode.as_str() {
            "idle" => fanout::idle(&opts).await,
            "fanout" => fanout::fanout(&opts).await,
            "publish" => publish::publish(&opts).await,
            "sqlite-baseline" => publish::sqlite_baseline(&opts),
            "deliver" => deliver::deliver(&opts).await,
            m @ ("ws-idle" | "ws-fanout") => ws::run(m, &opts).await,
            "webhooks" => webhooks::webhooks(&opts).await,
            "pg" => pg::pg(&opts).await,
            "attack" => attack::attack(&opts).await,
            _ => {
                eprintln!(
                    "usage: pushgate-bench idle|fanout|publish|sqlite-baseline|pg|webhooks|deliver|ws-idle|ws-fanout|attack [--key value]…  (see docs/benchmarks.md)"
                );
                std::process::exit(2);
            }
        }
    });
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("pushgate-bench: {e}");
            std::process::exit(1);
        }
    }
}

/// `--key value` options.
pub struct Opts(HashMap<String, String>);

impl Opts {
    fn parse(args: Vec<String>) -> Opts {
        let mut map = HashMap::new();
        let mut it = args.into_iter().peekable();
        while let Some(a) = it.next() {
            if let Some(k) = a.strip_prefix("--") {
                let v = match it.peek() {
                    Some(v) if !v.starts_with("--") => it.next().unwrap(),
                    _ => "true".to_string(),
                };
                map.insert(k.to_string(), v);
            } else {
                // A bare word names the variant (`attack slowbody`).
                map.entry("kind".to_string()).or_insert(a);
            }
        }
        Opts(map)
    }

    pub fn get<T: std::str::FromStr>(&self, key: &str, default: T) -> T {
        self.0
            .get(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    pub fn str(&self, key: &str, default: &str) -> String {
        self.0
            .get(key)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
}

/// Percentile of sorted samples.
pub fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}
