//! Operations (contract section 11): the real binary's logs, version and
//! completions; `pushgate backup`; `pushgate migrate`.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_pushgate");

/// Runs `pushgate serve` on an ephemeral port with `envs`, waits for the
/// banner, stops it with SIGTERM and returns its stderr.
fn serve_and_stop(envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .env_remove("PUSHGATE_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .env(
            "PUSHGATE_STORE__URL",
            format!("sqlite://{}/log.db", dir.path().display()),
        )
        .env("PUSHGATE_SERVER__LISTEN", "127.0.0.1:0")
        .env("PUSHGATE_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut guard = KillOnDrop(cmd.spawn().expect("spawn pushgate"));
    let child = &mut guard.0;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("pushgate listening on"),
        "banner: {line:?}"
    );
    // The signal handler is installed once serving: wait for /readyz.
    let addr = line
        .trim()
        .trim_start_matches("pushgate listening on http://")
        .to_string();
    wait_ready_blocking(&addr);
    let st = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}, stderr {err}");
    err
}

/// Kills and reaps the server if the test fails half-way, so no process
/// outlives the test.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `GET /readyz` over a plain TCP socket until it answers 200.
pub fn wait_ready_blocking(addr: &str) {
    use std::io::Write;
    for _ in 0..300 {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            let _ = write!(
                s,
                "GET /readyz HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
            );
            let mut resp = String::new();
            let _ = s.read_to_string(&mut resp);
            if resp.starts_with("HTTP/1.1 200") {
                return;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{addr} never became ready");
}

#[test]
fn logs_to_a_pipe_have_no_colour_codes() {
    let err = serve_and_stop(&[]);
    assert!(err.contains("shutdown signal received"), "{err}");
    assert!(err.contains("INFO"), "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "ANSI escape in piped logs: {err:?}"
    );
}

/// The control for the test above: on a terminal (a pty from `script`) the
/// same logs are coloured.
#[test]
fn logs_on_a_terminal_are_coloured() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("script")
        .args([
            "-qec",
            &format!("timeout -s TERM 2 {BIN} serve"),
            "/dev/null",
        ])
        .env_remove("PUSHGATE_LOG_FORMAT")
        .env_remove("NO_COLOR")
        .env(
            "PUSHGATE_STORE__URL",
            format!("sqlite://{}/log.db", dir.path().display()),
        )
        .env("PUSHGATE_SERVER__LISTEN", "127.0.0.1:0")
        .env("PUSHGATE_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("script(1) from util-linux");
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("DEVELOPMENT MODE"), "{s}");
    assert!(s.contains("\u{1b}["), "no colour on a terminal: {s:?}");
}

#[test]
fn json_logs_are_one_object_per_line() {
    let err = serve_and_stop(&[("PUSHGATE_LOG_FORMAT", "json")]);
    let mut messages = Vec::new();
    for line in err.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
        assert!(v.is_object(), "{line}");
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["level"].is_string(), "{line}");
        messages.push(v["message"].as_str().unwrap_or_default().to_string());
    }
    assert!(
        messages.iter().any(|m| m == "shutdown signal received"),
        "{messages:?}"
    );
    assert!(!err.contains('\u{1b}'), "{err:?}");
}

#[test]
fn version_shows_the_git_revision() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(
        s.starts_with(&format!("pushgate {} (git ", env!("CARGO_PKG_VERSION"))),
        "{s}"
    );
    // This test runs from a checkout, so the revision is the real one.
    let head = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let head = String::from_utf8(head.stdout).unwrap();
    let head = head.trim();
    assert_eq!(head.len(), 12, "git rev-parse: {head:?}");
    assert!(s.contains(&format!("(git {head}")), "{s} vs HEAD {head}");
}

#[test]
fn completions_for_each_shell() {
    for (shell, marker) in [
        ("bash", "complete -F _pushgate"),
        ("zsh", "#compdef pushgate"),
        ("fish", "complete -c pushgate"),
    ] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let s = String::from_utf8(out.stdout).unwrap();
        assert!(s.contains(marker), "{shell}: {s}");
        // Every subcommand is offered.
        for sub in ["serve", "listen", "send", "token", "completions"] {
            assert!(s.contains(sub), "{shell} lacks {sub}");
        }
    }
    // The control: an unknown shell is refused by the parser.
    let out = Command::new(BIN)
        .args(["completions", "cmd.exe"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
