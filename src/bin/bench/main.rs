//! pushgate-bench: load generator for pushgate and, in the same run, Nginx +
//! Nchan (../shared/bench). Every mode prints one JSON object per target.
//! Each benchmark mode lives in its own file beside this one.

mod webhooks;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let rest = args.get(2..).unwrap_or_default();
    match mode.as_str() {
        "webhooks" => std::process::exit(webhooks::main(rest)),
        _ => {
            eprintln!("usage: pushgate-bench <mode> [options]   (see docs/benchmarks.md)");
            std::process::exit(2);
        }
    }
}
