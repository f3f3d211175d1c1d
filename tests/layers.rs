//! The import direction rule, enforced on the source tree.
//!
//! Domain modules (the log and its backends, the hub, the feed and its
//! encoded events, inbound verifiers, outbound delivery, auth, limits,
//! config, channel names, messages, the clock) never reach up into the
//! HTTP layer: not `crate::api`, `crate::server`, `crate::transport`, not
//! `AppState` (`crate::state`), and not `crate::error` — they define their
//! own `thiserror` enums, and `src/error.rs` maps those to `ApiError`.
//!
//! This test reads `src/**.rs` (comments and string literals stripped) and
//! fails naming the file and the path when such a reference comes back. It
//! runs with `cargo test --all-targets`, which is what CI runs.

use std::path::{Path, PathBuf};

/// Top-level modules that are domain code: a file belongs to the domain if
/// its first path component under `src/` (file stem or folder) is one of these.
const DOMAIN: &[&str] = &[
    "store", "hub", "feed", "envelope", "ingest", "deliver", "auth", "limits", "config", "channel",
    "message", "clock",
];

/// What a domain module may not name, as the first segment after `crate::`.
const FORBIDDEN: &[&str] = &["api", "server", "transport", "error", "state", "AppState"];

/// Shared modules that sit between the domain and the HTTP layer: the one
/// `ApiError` mapping, `AppState`, metrics and the start-up warnings. They
/// may name domain modules (that is their job) but never the HTTP layer
/// above them, or the arrows would form a cycle through them.
const BELOW_HTTP: &[&str] = &["error", "state", "metrics", "hardening"];

/// What a module below the HTTP layer may not name.
const HTTP_LAYER: &[&str] = &["api", "server", "transport"];

/// The names a file's top-level module may not reach for, if any rule covers it.
fn forbidden_for(top: &str) -> Option<&'static [&'static str]> {
    if DOMAIN.contains(&top) {
        Some(FORBIDDEN)
    } else if BELOW_HTTP.contains(&top) {
        Some(HTTP_LAYER)
    } else {
        None
    }
}

/// Replaces comments, string literals and char literals with spaces, so a
/// doc comment or a message that mentions `crate::api` is not an import.
fn strip(src: &str) -> String {
    let b: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < b.len() && b[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < b.len() {
                if b[i] == '/' && b.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == '*' && b.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if b[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
            out.push(' ');
            continue;
        }
        // Raw strings: r"…", r#"…"#, br"…" (an identifier ending in r is not one).
        if c == 'r' && matches!(next, Some('"') | Some('#')) {
            let prev_ident = i > 0 && (b[i - 1].is_alphanumeric() || b[i - 1] == '_');
            let prev_b = i > 0 && b[i - 1] == 'b' && !(i > 1 && b[i - 2].is_alphanumeric());
            if !prev_ident || prev_b {
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&'#') {
                    hashes += 1;
                    j += 1;
                }
                if b.get(j) == Some(&'"') {
                    j += 1;
                    'raw: while j < b.len() {
                        if b[j] == '"' {
                            let mut k = 0;
                            while k < hashes && b.get(j + 1 + k) == Some(&'#') {
                                k += 1;
                            }
                            if k == hashes {
                                j += 1 + hashes;
                                break 'raw;
                            }
                        }
                        if b[j] == '\n' {
                            out.push('\n');
                        }
                        j += 1;
                    }
                    out.push_str(" \"\" ");
                    i = j;
                    continue;
                }
            }
        }
        if c == '"' {
            i += 1;
            while i < b.len() && b[i] != '"' {
                if b[i] == '\\' {
                    i += 1;
                }
                if i < b.len() && b[i] == '\n' {
                    out.push('\n');
                }
                i += 1;
            }
            i += 1;
            out.push_str(" \"\" ");
            continue;
        }
        // A char literal ('x', '\n', '\''); otherwise a lifetime.
        if c == '\'' {
            if next == Some('\\') {
                let mut j = i + 2;
                while j < b.len() && b[j] != '\'' {
                    j += 1;
                }
                i = j + 1;
                out.push_str(" ' ' ");
                continue;
            }
            if b.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str(" ' ' ");
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Splits cleaned source into identifiers and `::`/`{`/`}`/`,` tokens.
fn tokens(src: &str) -> Vec<String> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if is_ident(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push("::".into());
            i += 2;
        } else {
            if "{},;".contains(c) {
                out.push(c.to_string());
            }
            i += 1;
        }
    }
    out
}

/// The module path of a file under `src/` (`ingest/stripe.rs` → `ingest::stripe`).
fn module_path(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs").to_string();
    if stem != "mod" && stem != "lib" && stem != "main" {
        parts.push(stem);
    }
    parts
}

/// Every path in `src` that starts at the crate root and names a forbidden
/// module: `crate::api::…`, `crate::{store, api::x}`, and `super::` chains
/// that climb to the root (from `module`).
fn upward_references(src: &str, module: &[String], forbidden: &[&str]) -> Vec<String> {
    let t = tokens(&strip(src));
    let mut found = Vec::new();
    let mut i = 0;
    while i < t.len() {
        // Where this path starts: `crate`, or a chain of `super` that climbs
        // out of every module the file is in.
        let at_root = if t[i] == "crate" && t.get(i + 1).map(String::as_str) == Some("::") {
            Some(i + 2)
        } else if t[i] == "super" && (i == 0 || t[i - 1] != "::") {
            let mut j = i;
            let mut ups = 0;
            while t.get(j).map(String::as_str) == Some("super")
                && t.get(j + 1).map(String::as_str) == Some("::")
            {
                ups += 1;
                j += 2;
            }
            (ups >= module.len() && ups > 0).then_some(j)
        } else {
            None
        };
        let Some(start) = at_root else {
            i += 1;
            continue;
        };
        let mut names = Vec::new();
        match t.get(start).map(String::as_str) {
            Some("{") => {
                // A group: the first segment of each top-level item.
                let mut depth = 0;
                let mut expect_name = true;
                let mut j = start;
                while j < t.len() {
                    match t[j].as_str() {
                        "{" => {
                            depth += 1;
                            if depth == 1 {
                                expect_name = true;
                            }
                        }
                        "}" => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        "," if depth == 1 => expect_name = true,
                        "::" => {}
                        name if depth == 1 && expect_name => {
                            names.push(name.to_string());
                            expect_name = false;
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            Some(name) => names.push(name.to_string()),
            None => {}
        }
        for name in names {
            if forbidden.contains(&name.as_str()) {
                found.push(format!("crate::{name}"));
            }
        }
        i = start;
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn domain_modules_never_import_the_http_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut checked = Vec::new();
    let mut violations = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&src).expect("under src");
        let module = module_path(rel);
        let Some(forbidden) = module.first().and_then(|top| forbidden_for(top)) else {
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        for hit in upward_references(&text, &module, forbidden) {
            violations.push(format!("src/{}: {hit}", rel.display()));
        }
        checked.push(module.join("::"));
    }
    // The rule covers the modules it names: they exist and were read.
    for top in [
        "store",
        "ingest",
        "deliver",
        "auth",
        "limits",
        "config",
        "channel",
        "message",
        "clock",
        "hub",
        "error",
        "state",
        "metrics",
        "hardening",
    ] {
        assert!(
            checked
                .iter()
                .any(|m| m == top || m.starts_with(&format!("{top}::"))),
            "domain module `{top}` was not found under src/ (checked: {checked:?})"
        );
    }
    assert!(
        violations.is_empty(),
        "domain modules must not import api, server, transport, AppState or crate::error \
         (define a thiserror enum and map it in src/error.rs), and error, state, metrics \
         and hardening must not import api, server or transport:\n{}",
        violations.join("\n")
    );
}

/// The scanner itself: it catches each shape of upward import (refusals)
/// and lets through what is allowed (positive controls beside them).
#[test]
fn the_scanner_catches_upward_imports_and_only_those() {
    let at = |m: &str| -> Vec<String> { m.split("::").map(String::from).collect() };
    let hits = |src: &str, m: &str| {
        let forbidden =
            forbidden_for(m.split("::").next().unwrap_or("")).expect("a covered module");
        upward_references(src, &at(m), forbidden)
    };
    // Refused.
    assert_eq!(
        hits("use crate::api::error::ApiError;", "limits"),
        ["crate::api"]
    );
    assert_eq!(hits("use crate::AppState;", "ingest"), ["crate::AppState"]);
    assert_eq!(
        hits("let x = crate::transport::cursor(app, 1);", "hub"),
        ["crate::transport"]
    );
    assert_eq!(
        hits("use crate::{store::Seq, server::run};", "deliver"),
        ["crate::server"]
    );
    assert_eq!(
        hits("use crate::error::ApiError;", "auth"),
        ["crate::error"]
    );
    assert_eq!(
        hits("use super::super::api::RawBody;", "ingest::stripe"),
        ["crate::api"]
    );
    assert_eq!(
        hits("use crate :: state :: AppState;", "store"),
        ["crate::state"]
    );
    // Below the HTTP layer: the error mapping may not name `api`, but it may
    // name the domain errors it maps (the control beside it).
    assert_eq!(hits("use crate::api::BodyError;", "error"), ["crate::api"]);
    assert_eq!(
        hits("use crate::{auth::AuthError, transport::sse};", "state"),
        ["crate::transport"]
    );
    assert!(hits("use crate::{auth::AuthError, store::StoreError};", "error").is_empty());
    assert!(
        forbidden_for("api").is_none(),
        "the HTTP layer may name anything"
    );
    // Allowed.
    assert!(hits("use crate::store::{Seq, Store};", "hub").is_empty());
    assert!(hits("use crate::{channel::Pattern, config::Config};", "deliver").is_empty());
    assert!(
        hits("use super::api_key;", "auth").is_empty(),
        "a name, not `api`"
    );
    assert!(hits("use super::Rejection;", "ingest::stripe").is_empty());
    assert!(
        hits(
            "// see crate::api::webhooks\n/// crate::server\nfn f() {}",
            "ingest"
        )
        .is_empty()
    );
    assert!(
        hits(
            r#"let s = "crate::api"; let r = r"crate::server";"#,
            "config"
        )
        .is_empty()
    );
    assert!(
        hits(
            "fn f<'a>(x: &'a str) -> char { '\"' } use crate::store::Seq;",
            "hub"
        )
        .is_empty()
    );
    assert!(hits("mod tests { use super::*; }", "limits").is_empty());
}
