//! Several pushgate nodes sharing one PostgreSQL log, over real HTTP/SSE:
//! every subscriber on every node sees the same log, whichever node the
//! events were published on; a node killed mid-flood or a PostgreSQL restart
//! costs clients nothing they cannot resume.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::common::*;
use crate::pg::{PgTestDb, PrivateCluster, free_port};

const ALL: &str = "channel=a&channel=b&channel=c";

fn seq_of(cursor: &str) -> i64 {
    cursor
        .split_once('-')
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("cursor {cursor}"))
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn pg_node(url: &str) -> TestServer {
    let url = url.to_string();
    let s = TestServer::with(move |c| {
        c.store.url = url;
        c.store.pool_size = 4;
    })
    .await;
    wait_ready(&s.client, &s.base, true, Duration::from_secs(20)).await;
    s
}

/// Waits until `/readyz` answers 200 (`ready`) or 503 (`!ready`).
async fn wait_ready(client: &reqwest::Client, base: &str, ready: bool, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let status = client
            .get(format!("{base}/readyz"))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if (ready && status == 200) || (!ready && status == 503) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{base}/readyz: wanted {}, last status {status}",
            if ready { "200" } else { "503" }
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A node as a real process, so it can be killed hard.
struct ChildNode {
    child: Child,
    base: String,
}

impl ChildNode {
    async fn spawn(db_url: &str) -> ChildNode {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_pushgate"))
            .arg("serve")
            .env("PUSHGATE_STORE__URL", db_url)
            .env("PUSHGATE_STORE__POOL_SIZE", "4")
            .env("PUSHGATE_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("PUSHGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pushgate");
        let node = ChildNode {
            child,
            base: format!("http://127.0.0.1:{port}"),
        };
        wait_ready(&http(), &node.base, true, Duration::from_secs(30)).await;
        node
    }

    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An SSE client that behaves like a browser behind a load balancer: when
/// its stream ends or a connect fails, it reconnects (to the next node in
/// its list) with `Last-Event-ID`.
struct Follower {
    ids: Arc<Mutex<Vec<String>>>,
    reconnects: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Follower {
    fn start(bases: Vec<String>, query: &str) -> Follower {
        let ids = Arc::new(Mutex::new(Vec::<String>::new()));
        let reconnects = Arc::new(AtomicUsize::new(0));
        let task = {
            let ids = ids.clone();
            let reconnects = reconnects.clone();
            let query = query.to_string();
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut node = 0;
                loop {
                    let last = ids.lock().unwrap().last().cloned();
                    let url = format!("{}/v1/stream?{query}&since=earliest", bases[node]);
                    match SseClient::try_connect(&client, &url, last.as_deref()).await {
                        Ok(mut sse) => {
                            while let Some(ev) = sse.next().await {
                                assert_ne!(
                                    ev.event.as_deref(),
                                    Some("pushgate.reset"),
                                    "a valid cursor is never reset"
                                );
                                if let Some(id) = ev.id {
                                    ids.lock().unwrap().push(id);
                                }
                            }
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                    reconnects.fetch_add(1, Ordering::Relaxed);
                    node = (node + 1) % bases.len();
                }
            })
        };
        Follower {
            ids,
            reconnects,
            task,
        }
    }

    /// Waits until the follower has received `last`, then returns what it got.
    async fn until(&self, last: &str, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let ids = self.ids.lock().unwrap().clone();
            if ids.last().is_some_and(|l| seq_of(l) >= seq_of(last)) {
                return ids;
            }
            assert!(
                Instant::now() < deadline,
                "follower stopped at {:?}, log ends at {last}",
                ids.last()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The whole log (for `query`'s channels) from the start, by polling.
async fn read_log(client: &reqwest::Client, base: &str, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = "earliest".to_string();
    loop {
        let page: Value = client
            .get(format!("{base}/v1/events?{query}&after={after}&limit=1000"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(page["reset"], false);
        let events = page["events"].as_array().unwrap().clone();
        if events.is_empty() {
            return out;
        }
        out.extend(events);
        after = page["next"].as_str().unwrap().to_string();
    }
}

fn ids_of(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// What one publish attempt came to.
enum Outcome {
    Acked(Vec<String>),
    /// 503 `store_unavailable`: nothing was stored.
    Refused,
    /// The node did not answer (it was killed).
    NoAnswer,
}

async fn publish_batch(client: &reqwest::Client, base: &str, events: Value) -> Outcome {
    let resp = match client
        .post(format!("{base}/v1/publish"))
        .json(&json!({ "events": events }))
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => return Outcome::NoAnswer,
    };
    let status = resp.status().as_u16();
    let Ok(body) = resp.json::<Value>().await else {
        return Outcome::NoAnswer;
    };
    match status {
        200 => Outcome::Acked(
            body["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect(),
        ),
        503 => {
            assert_eq!(body["error"]["code"], "store_unavailable", "{body}");
            Outcome::Refused
        }
        other => panic!("publish answered {other}: {body}"),
    }
}

/// A flood of publishers; each publishes batches on its node, moving to the
/// next node when its node stops answering.
struct Flood {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<BTreeMap<String, Vec<String>>>>,
    refused: Arc<AtomicUsize>,
    tasks: Vec<JoinHandle<()>>,
}

impl Flood {
    fn start(bases: &[String], per_node: usize, batch: usize) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(BTreeMap::new()));
        let refused = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for (n, _) in bases.iter().enumerate() {
            for p in 0..per_node {
                let bases = bases.to_vec();
                let (stop, acked, refused) = (stop.clone(), acked.clone(), refused.clone());
                tasks.push(tokio::spawn(async move {
                    let client = http();
                    let mut node = n;
                    let mut i = 0;
                    while !stop.load(Ordering::Acquire) {
                        let key = format!("{n}-{p}-{i}");
                        let channel = ["a", "b", "c"][(n + p + i) % 3];
                        let events: Vec<Value> = (0..batch)
                            .map(|j| json!({"channel": channel, "type": "flood", "data": {"batch": key, "i": j}}))
                            .collect();
                        match publish_batch(&client, &bases[node], Value::Array(events)).await {
                            Outcome::Acked(ids) => {
                                acked.lock().unwrap().insert(key, ids);
                            }
                            Outcome::Refused => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Outcome::NoAnswer => node = (node + 1) % bases.len(),
                        }
                        i += 1;
                    }
                }));
            }
        }
        Flood {
            stop,
            acked,
            refused,
            tasks,
        }
    }

    fn acked(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    async fn until_acked(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acked() < n {
            assert!(
                Instant::now() < deadline,
                "only {} of {n} publishes acknowledged",
                self.acked()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> BTreeMap<String, Vec<String>> {
        self.stop.store(true, Ordering::Release);
        for t in self.tasks {
            t.await.expect("publisher");
        }
        Arc::try_unwrap(self.acked).unwrap().into_inner().unwrap()
    }
}

/// Every acknowledged batch is in the log with the cursors it was
/// acknowledged with; every batch in the log is whole and consecutive
/// (nothing half-written).
fn check_batches(log: &[Value], acked: &BTreeMap<String, Vec<String>>, batch: usize) {
    let mut by_batch: BTreeMap<String, Vec<(i64, i64, String)>> = BTreeMap::new();
    for e in log {
        let key = e["data"]["batch"].as_str().unwrap().to_string();
        let id = e["id"].as_str().unwrap().to_string();
        by_batch
            .entry(key)
            .or_default()
            .push((seq_of(&id), e["data"]["i"].as_i64().unwrap(), id));
    }
    for (key, events) in &by_batch {
        assert_eq!(
            events.len(),
            batch,
            "batch {key} is half-written: {events:?}"
        );
        for (k, (seq, i, _)) in events.iter().enumerate() {
            assert_eq!(*i, k as i64, "batch {key} in order");
            assert_eq!(*seq, events[0].0 + k as i64, "batch {key} consecutive");
        }
    }
    for (key, ids) in acked {
        let stored: Vec<String> = by_batch
            .get(key)
            .unwrap_or_else(|| panic!("acknowledged batch {key} is not in the log"))
            .iter()
            .map(|(_, _, id)| id.clone())
            .collect();
        assert_eq!(
            &stored, ids,
            "batch {key} stored under its acknowledged cursors"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_every_subscriber_sees_the_same_log() {
    let db = PgTestDb::create().await;
    let (a, b, c) = tokio::join!(pg_node(&db.url), pg_node(&db.url), pg_node(&db.url));
    let nodes = [a, b, c];
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
    let mut followers = Vec::new();
    for base in &bases {
        for _ in 0..2 {
            followers.push(Follower::start(vec![base.clone()], ALL));
        }
    }
    let only_a = Follower::start(vec![bases[1].clone()], "channel=a");
    // Let every stream open before the flood (they start from `earliest`
    // anyway, so this only makes the live path carry the load).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let flood = Flood::start(&bases, 3, 2);
    flood.until_acked(300, Duration::from_secs(60)).await;
    let acked = flood.finish().await;

    let log = read_log(&nodes[2].client, &bases[2], ALL).await;
    check_batches(&log, &acked, 2);
    assert_eq!(
        log.len(),
        acked.len() * 2,
        "nothing but what was acknowledged"
    );
    let expected = ids_of(&log);
    let last = expected.last().unwrap().clone();
    for (i, f) in followers.iter().enumerate() {
        let got = f.until(&last, Duration::from_secs(20)).await;
        assert_eq!(got, expected, "follower {i} on node {}", i / 2);
        assert_eq!(f.reconnects.load(Ordering::Relaxed), 0);
    }
    let log_a = ids_of(&read_log(&nodes[0].client, &bases[0], "channel=a").await);
    let got = only_a
        .until(log_a.last().unwrap(), Duration::from_secs(20))
        .await;
    assert_eq!(got, log_a, "a one-channel follower sees that channel's log");
    // Every node reads the same log.
    for base in &bases {
        assert_eq!(ids_of(&read_log(&http(), base, ALL).await), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_a_node_mid_flood_loses_nothing_for_clients_that_resume_elsewhere() {
    let db = PgTestDb::create().await;
    let mut doomed = ChildNode::spawn(&db.url).await;
    let (a, b) = tokio::join!(pg_node(&db.url), pg_node(&db.url));
    let bases = vec![doomed.base.clone(), a.base.clone(), b.base.clone()];
    let mut followers = Vec::new();
    for _ in 0..3 {
        // Subscribed to the node that dies; the load balancer sends the
        // reconnect to the next node.
        followers.push(Follower::start(bases.clone(), ALL));
    }
    followers.push(Follower::start(vec![a.base.clone(), b.base.clone()], ALL));
    followers.push(Follower::start(vec![b.base.clone(), a.base.clone()], ALL));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let flood = Flood::start(&bases, 3, 2);
    flood.until_acked(150, Duration::from_secs(60)).await;
    doomed.kill();
    let at_kill = flood.acked();
    flood
        .until_acked(at_kill + 150, Duration::from_secs(60))
        .await;
    let acked = flood.finish().await;

    let log = read_log(&a.client, &a.base, ALL).await;
    eprintln!(
        "kill: {} batches acknowledged ({at_kill} before the kill), {} events in the log",
        acked.len(),
        log.len()
    );
    check_batches(&log, &acked, 2);
    let expected = ids_of(&log);
    let last = expected.last().unwrap().clone();
    for (i, f) in followers.iter().enumerate() {
        let got = f.until(&last, Duration::from_secs(30)).await;
        assert_eq!(got, expected, "follower {i}");
        if i < 3 {
            assert!(
                f.reconnects.load(Ordering::Relaxed) >= 1,
                "follower {i} lost its node and resumed elsewhere"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_postgres_mid_flood_refuses_cleanly_then_recovers_losing_nothing() {
    let cluster = tokio::task::spawn_blocking(PrivateCluster::start)
        .await
        .unwrap();
    let url = cluster.url();
    let (a, b) = tokio::join!(pg_node(&url), pg_node(&url));
    let bases = vec![a.base.clone(), b.base.clone()];
    let followers = vec![
        Follower::start(bases.clone(), ALL),
        Follower::start(bases.clone(), ALL),
        Follower::start(vec![b.base.clone(), a.base.clone()], ALL),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;

    let flood = Flood::start(&bases, 2, 3);
    flood.until_acked(100, Duration::from_secs(60)).await;
    let cluster = Arc::new(cluster);
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.stop_server())
            .await
            .unwrap();
    }
    // While it is down: not ready, and publishes are refused with 503.
    wait_ready(&a.client, &a.base, false, Duration::from_secs(15)).await;
    wait_ready(&b.client, &b.base, false, Duration::from_secs(15)).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while flood.refused.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "no publish was refused while PostgreSQL was down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked_while_down = flood.acked();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        flood.acked() <= acked_while_down + 4,
        "nothing is acknowledged while the log is down (beyond commits in flight)"
    );
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.start_server())
            .await
            .unwrap();
    }
    // Back by itself: ready again, and publishes succeed.
    wait_ready(&a.client, &a.base, true, Duration::from_secs(30)).await;
    wait_ready(&b.client, &b.base, true, Duration::from_secs(30)).await;
    flood
        .until_acked(acked_while_down + 100, Duration::from_secs(60))
        .await;
    let flood_refused = flood.refused.clone();
    let acked = flood.finish().await;

    let log = read_log(&a.client, &a.base, ALL).await;
    eprintln!(
        "restart: {} batches acknowledged, {} refused while down, {} events in the log",
        acked.len(),
        flood_refused.load(Ordering::Relaxed),
        log.len()
    );
    check_batches(&log, &acked, 3);
    let expected = ids_of(&log);
    let last = expected.last().unwrap().clone();
    for (i, f) in followers.iter().enumerate() {
        let got = f.until(&last, Duration::from_secs(30)).await;
        assert_eq!(got, expected, "follower {i}");
    }
    drop(followers);
    drop((a, b));
}
