//! Test support: temp dirs, rules files, agents (in-process or as real
//! processes), and a small HTTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::Value;

// (Not every test uses every helper.)
#[allow(unused_imports)]
pub use test_util::{client, wait_until, HttpClient, Reply, TempDir};

/// Rules for cells a, b, c with the given instance addresses (blue, green)
/// and slot split [0-32] a, [33-65] b, [66-99] c unless `ranges` is given.
///
/// Each document carries the next `revision` of this test process, so a
/// rewritten file always moves forward.
pub fn rules(addrs: &[(&str, String, String)], ranges: Option<&str>) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let rev = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut s = format!("revision = {rev}\nslots = 100\n");
    for (cell, blue, green) in addrs {
        s.push_str(&format!(
            "[cells.{cell}]\nblue = [\"{blue}\"]\ngreen = [\"{green}\"]\nsplit = {{ green = 5000, seed = 1 }}\n"
        ));
    }
    s.push_str(ranges.unwrap_or(
        "[[ranges]]\nfrom = 0\nto = 32\ncell = \"cell-a\"\n[[ranges]]\nfrom = 33\nto = 65\ncell = \"cell-b\"\n[[ranges]]\nfrom = 66\nto = 99\ncell = \"cell-c\"\n",
    ));
    s
}

/// The `revision` a rules document carries (0 when none).
pub fn revision_of(text: &str) -> u64 {
    routing_rules::parse_versioned(text).unwrap().1.unwrap_or(0)
}

/// Placeholder addresses (nothing listens there) for cells a, b, c.
pub fn placeholder_rules() -> String {
    rules(
        &[
            ("cell-a", "127.0.0.1:9".into(), "127.0.0.1:10".into()),
            ("cell-b", "127.0.0.1:11".into(), "127.0.0.1:12".into()),
            ("cell-c", "127.0.0.1:13".into(), "127.0.0.1:14".into()),
        ],
        None,
    )
}

/// `n` user ids whose home cell is `cell` under `rules_text`.
pub fn users_in(rules_text: &str, cell: &str, n: usize) -> Vec<String> {
    test_util::users_named(rules_text, cell, n, "user-")
}

pub fn config(cell: &str, colour: &str, db: &Path, rules: &Path) -> cell_agent::AgentConfig {
    let mut cfg = cell_agent::AgentConfig::new(
        cell,
        routing_rules::Colour::parse(colour).unwrap(),
        db.into(),
        Some(rules.into()),
    );
    cfg.reload_interval_ms = 50;
    cfg.drain_timeout_ms = 5_000;
    cfg
}

/// Adds `internal = [ADDR]` to each named cell of a rules document.
pub fn with_internal(rules: &str, internal: &[(&str, SocketAddr)]) -> String {
    let mut s = rules.to_string();
    for (cell, addr) in internal {
        let header = format!("[cells.{cell}]\n");
        s = s.replacen(&header, &format!("{header}internal = [\"{addr}\"]\n"), 1);
    }
    s
}

/// The cluster secret the tests use.
pub const TEST_SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

/// Writes the cluster secret for cell-to-cell calls into `dir`; returns its path.
pub fn secret_file(dir: &TempDir) -> PathBuf {
    let p = dir.path("internal-secret");
    std::fs::write(&p, format!("{TEST_SECRET}\n")).unwrap();
    p
}

/// A cell agent running as a real process.
pub struct AgentProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// The internal listener, when started with `--internal-listen`.
    pub internal: Option<SocketAddr>,
    pub args: Vec<String>,
}

impl AgentProcess {
    /// Starts `cell-agent serve` with `args` (plus `--listen`), waiting for
    /// its "listening on ADDR" line.
    pub fn start(args: &[String], listen: &str) -> AgentProcess {
        let mut full: Vec<String> = vec!["serve".into()];
        full.extend(args.iter().cloned());
        full.extend([
            "--listen".into(),
            listen.into(),
            "--reload-interval-ms".into(),
            "50".into(),
        ]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_cell-agent"))
            .args(&full)
            .env(
                "CELL_AGENT_LOG",
                std::env::var("TEST_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cell-agent");
        let stdout = child.stdout.take().unwrap();
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        let internal = args.iter().any(|a| a == "--internal-listen").then(|| {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            line.trim()
                .strip_prefix("internal listening on ")
                .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                .parse()
                .unwrap()
        });
        AgentProcess {
            child,
            addr,
            internal,
            args: args.to_vec(),
        }
    }

    /// Kills the process at once (SIGKILL), like a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same agent again on the same addresses.
    pub fn restart(&self) -> AgentProcess {
        let mut args = self.args.clone();
        if let (Some(i), Some(internal)) = (
            args.iter().position(|a| a == "--internal-listen"),
            self.internal,
        ) {
            args[i + 1] = internal.to_string();
        }
        AgentProcess::start(&args, &self.addr.to_string())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn call(
    client: &HttpClient,
    method: &str,
    addr: SocketAddr,
    path: &str,
    user: &str,
    body: Option<Value>,
) -> Reply {
    let mut b = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    if !user.is_empty() {
        b = b.header("x-user-id", user);
    }
    if body.is_some() {
        b = b.header("content-type", "application/json");
    }
    let body = body.map(|v| Bytes::from(v.to_string())).unwrap_or_default();
    test_util::send(client, b.body(Full::new(body)).unwrap())
        .await
        .expect("request")
}

pub async fn raw(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    user: &str,
    body: &'static str,
) -> Reply {
    let req = Request::post(format!("http://{addr}{path}"))
        .header("x-user-id", user)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    test_util::send(client, req).await.expect("request")
}

pub async fn deposit(
    client: &HttpClient,
    addr: SocketAddr,
    user: &str,
    amount: i64,
    key: &str,
) -> Reply {
    call(
        client,
        "POST",
        addr,
        &format!("/v1/accounts/{user}/deposit"),
        user,
        Some(serde_json::json!({"amount": amount, "idempotency_key": key})),
    )
    .await
}

/// A deposit whose connection may fail (the agent was killed or frozen).
#[allow(dead_code)]
pub async fn try_deposit(
    client: &HttpClient,
    addr: SocketAddr,
    user: &str,
    amount: i64,
    key: &str,
) -> Result<Reply, String> {
    let body = serde_json::json!({"amount": amount, "idempotency_key": key}).to_string();
    let req = Request::post(format!("http://{addr}/v1/accounts/{user}/deposit"))
        .header("x-user-id", user)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    test_util::send(client, req).await
}

pub async fn balance(client: &HttpClient, addr: SocketAddr, user: &str) -> i64 {
    let r = call(
        client,
        "GET",
        addr,
        &format!("/v1/accounts/{user}"),
        user,
        None,
    )
    .await;
    r.json["balance"]
        .as_i64()
        .unwrap_or_else(|| panic!("no balance: {} {}", r.status, r.json))
}

/// Every row of every table, for "nothing changed" comparisons.
pub fn snapshot(db: &Path) -> String {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut out = String::new();
    for table in [
        "accounts",
        "ledger",
        "orders",
        "transfers",
        "outbox",
        "inbox",
        "idempotency",
    ] {
        let mut s = conn
            .prepare(&format!("SELECT * FROM {table} ORDER BY 1"))
            .unwrap();
        let n = s.column_count();
        let rows = s
            .query_map([], |r| {
                Ok((0..n)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .unwrap();
        for row in rows {
            out.push_str(table);
            out.push(':');
            out.push_str(&row.unwrap());
            out.push('\n');
        }
    }
    out
}

pub fn check(db: &Path) -> cell_agent::check::CheckReport {
    let r = cell_agent::check::check(db).unwrap();
    assert!(r.ok(), "invariants violated: {:#?}", r.violations);
    r
}

/// Deposit idempotency keys in a shard file, with how often each is there.
#[allow(dead_code)]
pub fn deposit_keys(db: &Path) -> std::collections::BTreeMap<String, i64> {
    let c = rusqlite::Connection::open(db).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    let mut s = c
        .prepare("SELECT ref, COUNT(*) FROM ledger WHERE kind = 'deposit' GROUP BY ref")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// An in-process agent of `cell` (blue, `DIR/CELL.db`) on pre-bound
/// listeners (public, internal), with the test secret.
#[allow(dead_code)]
pub async fn agent_on(
    dir: &TempDir,
    cell: &str,
    rules: &Path,
    listeners: (tokio::net::TcpListener, tokio::net::TcpListener),
    tune: impl FnOnce(&mut cell_agent::AgentConfig),
) -> cell_agent::RunningAgent {
    let mut cfg = config(cell, "blue", &dir.path(&format!("{cell}.db")), rules);
    cfg.internal_secret_file = Some(secret_file(dir));
    tune(&mut cfg);
    cell_agent::start_bound(
        cfg,
        listeners.0,
        Some(listeners.1),
        prometheus::Registry::new(),
    )
    .await
    .unwrap()
}
