//! PostgreSQL for tests: a fresh database per test on the shared server
//! (127.0.0.1:5432, or `PUSHGATE_TEST_PG`), and private clusters that a test
//! may stop and start without disturbing anyone else.
//!
//! A missing PostgreSQL fails the test that needs it; nothing here skips.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sqlx::{ConnectOptions, Connection, Executor};

/// The maintenance database tests create their databases from.
pub fn maintenance_url() -> String {
    std::env::var("PUSHGATE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

fn random_suffix() -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..12)
        .map(|_| (b'a' + rng.random_range(0..26u8)) as char)
        .collect()
}

fn with_database(url: &str, db: &str) -> String {
    let mut u = url::Url::parse(url).expect("PostgreSQL url");
    u.set_path(&format!("/{db}"));
    u.to_string()
}

async fn maintenance_conn(url: &str) -> sqlx::PgConnection {
    let options: sqlx::postgres::PgConnectOptions = url.parse().expect("PostgreSQL url");
    match tokio::time::timeout(Duration::from_secs(10), options.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "PostgreSQL is required for this test and is not reachable at {url}: {e} \
             (scripts/test.sh starts it)"
        ),
        Err(_) => panic!("PostgreSQL at {url} did not answer within 10 s"),
    }
}

/// A database of its own for one test, dropped (with its connections) at the end.
pub struct PgTestDb {
    pub name: String,
    pub url: String,
    maintenance: String,
}

impl PgTestDb {
    pub async fn create() -> PgTestDb {
        PgTestDb::create_on(&maintenance_url()).await
    }

    pub async fn create_on(maintenance: &str) -> PgTestDb {
        let name = format!("pushgate_t_{}", random_suffix());
        let mut conn = maintenance_conn(maintenance).await;
        conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .expect("CREATE DATABASE");
        let _ = conn.close().await;
        PgTestDb {
            url: with_database(maintenance, &name),
            name,
            maintenance: maintenance.to_string(),
        }
    }

    pub async fn connect(&self) -> sqlx::PgConnection {
        maintenance_conn(&self.url).await
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let maintenance = self.maintenance.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let options: sqlx::postgres::PgConnectOptions = maintenance.parse().ok()?;
                let mut conn = tokio::time::timeout(Duration::from_secs(5), options.connect())
                    .await
                    .ok()?
                    .ok()?;
                let _ = conn
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await;
                let _ = conn.close().await;
                Some(())
            })
        })
        .join();
    }
}

/// PostgreSQL's server tools: `PUSHGATE_TEST_PG_BIN`, or the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout).
fn pg_bin(name: &str) -> PathBuf {
    if let Ok(dir) = std::env::var("PUSHGATE_TEST_PG_BIN") {
        return Path::new(&dir).join(name);
    }
    let newest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .expect("PostgreSQL server tools not found in /usr/lib/postgresql (scripts/test.sh installs them)");
    PathBuf::from(format!("/usr/lib/postgresql/{newest}/bin")).join(name)
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// PostgreSQL refuses to run as root; run its tools as `postgres` then.
fn pg_command(tool: &str) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
        c
    } else {
        Command::new(pg_bin(tool))
    }
}

fn run(mut c: Command, what: &str) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run ({e}); is PostgreSQL 15 installed?"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL cluster of its own (initdb + pg_ctl on a spare port, in a
/// temporary directory), so a test can stop and restart it.
pub struct PrivateCluster {
    pub port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrivateCluster {
    pub fn start() -> PrivateCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        if running_as_root() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
            run(
                {
                    let mut c = Command::new("chown");
                    c.arg("postgres:").arg(&data);
                    c
                },
                "chown",
            );
        }
        let mut initdb = pg_command("initdb");
        initdb
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data);
        run(initdb, "initdb");
        let port = free_port();
        let cluster = PrivateCluster {
            port,
            data,
            _dir: dir,
        };
        cluster.start_server();
        cluster
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn start_server(&self) {
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-l"])
            .arg(self.data.join("server.log"))
            .arg("-o")
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200",
                self.port
            ))
            .arg("start");
        run(c, "pg_ctl start");
    }

    /// Fast shutdown: open sessions are ended, as in a real restart.
    pub fn stop_server(&self) {
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-m", "fast", "stop"]);
        run(c, "pg_ctl stop");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let mut c = pg_command("pg_ctl");
        c.arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "30", "-m", "immediate", "stop"]);
        let _ = c.output();
    }
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().unwrap().port()
}
