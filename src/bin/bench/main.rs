//! pushgate-bench: load generator for pushgate and, in the same run, Nginx +
//! Nchan (../shared/bench). Every mode prints one JSON object per target.
//! Each benchmark mode lives in its own file beside this one.

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        _ => {
            eprintln!("usage: pushgate-bench <mode> [options]   (see docs/benchmarks.md)");
            std::process::exit(2);
        }
    }
}
