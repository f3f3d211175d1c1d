//! Build script: records the git revision for `pushgate --version`.
//!
//! Invariant: the build never fails because git is missing or this is not a
//! checkout (a crate tarball, a Docker context without `.git`): the revision
//! is then "unknown". `PUSHGATE_GIT_REV` in the environment overrides it, so
//! builds from an exported tree can still say where they came from.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=PUSHGATE_GIT_REV");
    let rev = std::env::var("PUSHGATE_GIT_REV")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            let rev = git(&["rev-parse", "--short=12", "HEAD"])?;
            // Rebuild when HEAD moves: HEAD itself, the branch it points to,
            // and packed refs (paths resolved by git, so worktrees work).
            for p in ["HEAD", "packed-refs"] {
                if let Some(path) = git(&["rev-parse", "--git-path", p]) {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"])
                && let Some(path) = git(&["rev-parse", "--git-path", &r])
            {
                println!("cargo:rerun-if-changed={path}");
            }
            Some(rev)
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=PUSHGATE_GIT_REV={rev}");
}
