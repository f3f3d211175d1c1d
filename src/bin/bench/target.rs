//! The server under test: a fresh pushgate (release binary, SQLite in a temp
//! dir) or a fresh Nginx + Nchan from ../shared/bench/nchan, and how to read
//! its CPU time and RSS (the whole process tree) from /proc.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub enum Kind {
    Pushgate,
    Nchan,
}

pub struct Target {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// Processes whose CPU and memory count (Nchan: master and workers).
    pub pids: Vec<u32>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
    nchan_dir: Option<PathBuf>,
}

impl Target {
    pub async fn start(name: &str, extra_env: &[(&str, &str)]) -> Result<Target, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        match name {
            "pushgate" => {
                let bin = std::env::var("PUSHGATE_BIN").unwrap_or_else(|_| {
                    let me = std::env::current_exe().unwrap();
                    me.with_file_name("pushgate").display().to_string()
                });
                let port = free_port()?;
                let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
                let mut cmd = Command::new(&bin);
                cmd.arg("serve")
                    .env("PUSHGATE_SERVER__LISTEN", addr.to_string())
                    .env(
                        "PUSHGATE_STORE__URL",
                        format!("sqlite://{}/bench.db", dir.path().display()),
                    )
                    .env("PUSHGATE_LOG", "warn")
                    // Every connection comes from this one load generator.
                    .env("PUSHGATE_LIMITS__CONNECTIONS_PER_CLIENT", "0")
                    .env("PUSHGATE_LIMITS__STREAMS_PER_CLIENT", "0")
                    .stdout(Stdio::null())
                    .stderr(Stdio::inherit());
                for (k, v) in extra_env {
                    // An empty value removes the variable (the server's default).
                    if v.is_empty() {
                        cmd.env_remove(k);
                    } else {
                        cmd.env(k, v);
                    }
                }
                let child = cmd.spawn().map_err(|e| format!("{bin}: {e}"))?;
                let pids = vec![child.id()];
                wait_listening(addr).await?;
                Ok(Target {
                    kind: Kind::Pushgate,
                    addr,
                    pids,
                    child: Some(child),
                    _dir: dir,
                    nchan_dir: None,
                })
            }
            "nchan" => {
                let script = nchan_script("start.sh")?;
                let run_dir = dir.path().join("nchan");
                let out = Command::new(&script)
                    .env("NCHAN_RUNDIR", &run_dir)
                    .output()
                    .map_err(|e| format!("{}: {e}", script.display()))?;
                if !out.status.success() {
                    return Err(format!(
                        "nchan start failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                let master: u32 = String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .lines()
                    .last()
                    .and_then(|l| l.trim().parse().ok())
                    .ok_or("nchan start.sh printed no pid")?;
                let addr: SocketAddr = "127.0.0.1:8081".parse().unwrap();
                wait_listening(addr).await?;
                let mut pids = vec![master];
                pids.extend(children(master));
                Ok(Target {
                    kind: Kind::Nchan,
                    addr,
                    pids,
                    child: None,
                    _dir: dir,
                    nchan_dir: Some(run_dir),
                })
            }
            other => Err(format!("unknown target `{other}` (pushgate or nchan)")),
        }
    }

    /// Total CPU time (user + system) of the server's processes, in µs.
    pub fn cpu_us(&self) -> u64 {
        let tick = 1_000_000 / clock_ticks();
        self.pids
            .iter()
            .map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                // Fields after the command name, which is in parentheses.
                let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
                let f: Vec<&str> = rest.split_whitespace().collect();
                let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
                let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
                (utime + stime) * tick
            })
            .sum()
    }

    /// RSS of the server's processes, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids
            .iter()
            .map(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .unwrap_or_default()
                    .lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            Kind::Pushgate => "pushgate",
            Kind::Nchan => "nchan",
        }
    }

    /// The SSE request path for a channel.
    pub fn sse_path(&self, channel: &str) -> String {
        match self.kind {
            Kind::Pushgate => format!("/v1/stream?channel={channel}"),
            Kind::Nchan => format!("/sub?id={channel}"),
        }
    }

    /// Publish request (URL, body) for an event carrying timestamp `t`.
    pub fn publish_request(&self, channel: &str, t: u64, pad: &str) -> (String, String) {
        match self.kind {
            Kind::Pushgate => (
                format!("http://{}/v1/publish", self.addr),
                format!(
                    "{{\"channel\":\"{channel}\",\"type\":\"bench\",\"data\":{{\"t\":{t},\"pad\":\"{pad}\"}}}}"
                ),
            ),
            Kind::Nchan => (
                format!("http://{}/pub?id={channel}", self.addr),
                format!("{{\"t\":{t},\"pad\":\"{pad}\"}}"),
            ),
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(dir) = &self.nchan_dir
            && let Ok(script) = nchan_script("stop.sh")
        {
            let _ = Command::new(script).env("NCHAN_RUNDIR", dir).output();
        }
    }
}

fn nchan_script(name: &str) -> Result<PathBuf, String> {
    let base = std::env::var("NCHAN_DIR").unwrap_or_else(|_| "../shared/bench/nchan".into());
    let p = PathBuf::from(base).join(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(format!("{} not found (set NCHAN_DIR)", p.display()))
    }
}

fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn clock_ticks() -> u64 {
    100
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().unwrap().port())
}

async fn wait_listening(addr: SocketAddr) -> Result<(), String> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{addr} never started listening"))
}
