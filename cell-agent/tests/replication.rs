//! Synchronous replication of a shard to its standby cell: a write is
//! answered only once the standby's replica holds it (RPO 0); with the
//! standby down the primary waits `--sync-timeout-ms`, then goes on
//! degraded, and the standby catches up when it returns. Real agents,
//! real SQLite files, real sockets.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cell_agent::store::sqlite::{journal, replica};
use support::*;
use tokio::net::TcpListener;

/// An agent on pre-bound listeners (public, internal).
async fn agent(
    dir: &TempDir,
    cell: &str,
    rules: &Path,
    listeners: (TcpListener, TcpListener),
    journal: bool,
) -> cell_agent::RunningAgent {
    let mut cfg = config(cell, "blue", &dir.path(&format!("{cell}.db")), rules);
    cfg.internal_secret_file = Some(secret_file(dir));
    cfg.journal = journal;
    cfg.sync_timeout_ms = 1_000;
    cell_agent::start_bound(
        cfg,
        listeners.0,
        Some(listeners.1),
        prometheus::Registry::new(),
    )
    .await
    .unwrap()
}

async fn bind() -> (TcpListener, TcpListener) {
    (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
}

fn addr(l: &TcpListener) -> SocketAddr {
    l.local_addr().unwrap()
}

/// Whether the replica file holds the deposit with idempotency key `key`.
fn replica_has(replica: &Path, key: &str) -> bool {
    let c = rusqlite::Connection::open(replica).unwrap();
    c.busy_timeout(Duration::from_secs(5)).unwrap();
    c.query_row("SELECT COUNT(*) FROM ledger WHERE ref = ?1", [key], |r| {
        r.get::<_, i64>(0)
    })
    .unwrap()
        == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_is_acknowledged_only_once_the_standby_holds_it() {
    let dir = TempDir::new("sync");
    let rules_path = dir.path("rules.toml");
    let (la, lb) = (bind().await, bind().await);
    let text = with_internal(
        &placeholder_rules().replacen(
            "[cells.cell-a]\n",
            "[cells.cell-a]\nstandby = \"cell-b\"\n",
            1,
        ),
        &[("cell-a", addr(&la.1)), ("cell-b", addr(&lb.1))],
    );
    std::fs::write(&rules_path, &text).unwrap();
    // The primary's file journals from the start; the standby's replica is
    // seeded from a snapshot of it.
    let (db_a, replica_a) = (dir.path("cell-a.db"), dir.path("cell-a.replica.db"));
    journal::enable(&db_a).unwrap();
    drop(cell_agent::store::sqlite::SqliteStore::open(&db_a, "cell-a").unwrap());
    replica::sync(&db_a, &replica_a).unwrap();
    let lb_internal = addr(&lb.1);
    let b = agent(&dir, "cell-b", &rules_path, lb, false).await;
    let a = agent(&dir, "cell-a", &rules_path, la, true).await;
    let client = client();
    let users = users_in(&text, "cell-a", 50);

    // 50 users × 4 deposits, concurrently: each acknowledged deposit is
    // already in the standby's replica when its answer arrives.
    let mut tasks = Vec::new();
    for u in users.clone() {
        let (client, replica_a) = (client.clone(), replica_a.clone());
        let addr = a.addr;
        tasks.push(tokio::spawn(async move {
            for i in 0..4 {
                let key = format!("{u}-{i}");
                let r = deposit(&client, addr, &u, 10, &key).await;
                assert_eq!(r.status, 200, "{}", r.json);
                assert!(
                    replica_has(&replica_a, &key),
                    "{key} acknowledged before the standby had it"
                );
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let text = reqwest_metrics(&client, a.addr).await;
    assert!(text.contains("cellgate_replication_degraded 0"), "{text}");
    assert!(
        text.contains("cellgate_replication_ack_seconds_count"),
        "{text}"
    );
    let (code, out) = status(&db_a);
    assert_eq!(code, 0, "{out}");
    assert_eq!(out["state"], "in-sync", "{out}");
    assert_eq!(out["standby"], "cell-b", "{out}");

    // The standby goes away: the next write waits for the sync timeout,
    // then the shard goes on degraded (and says so).
    b.shutdown().await;
    let t = Instant::now();
    let r = deposit(&client, a.addr, &users[0], 1, "while-down-1").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "waited {:?}",
        t.elapsed()
    );
    // The degraded state was recorded before that write was answered.
    let (code, out) = status(&db_a);
    assert_eq!(code, 1, "{out}");
    assert_eq!(out["state"], "degraded", "{out}");
    assert!(out["lag_lsn"].as_i64().unwrap() >= 1, "{out}");
    let t = Instant::now();
    let r = deposit(&client, a.addr, &users[1], 1, "while-down-2").await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "degraded: no wait, took {:?}",
        t.elapsed()
    );
    assert!(!replica_has(&replica_a, "while-down-2"));
    let text = reqwest_metrics(&client, a.addr).await;
    assert!(text.contains("cellgate_replication_degraded 1"), "{text}");

    // The standby returns (same internal address): the next batch ships
    // everything it missed, and the shard is in sync again.
    let lb2 = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind(lb_internal).await.unwrap(),
    );
    let b = agent(&dir, "cell-b", &rules_path, lb2, false).await;
    // Only the cell whose standby this is may ship to it, signed.
    for (signer, status, code) in [
        (Some("cell-c"), 403, "cell_mismatch"),
        (None, 401, "unauthenticated"),
    ] {
        let body = r#"{"cell": "cell-a", "batches": []}"#;
        let r = ship(&client, b.internal_addr.unwrap(), signer, body).await;
        assert_eq!(
            (r.0, r.1["error"].as_str().unwrap_or("")),
            (status, code),
            "{}",
            r.1
        );
    }
    let r = ship(
        &client,
        b.internal_addr.unwrap(),
        Some("cell-c"),
        r#"{"cell": "cell-c", "batches": []}"#,
    )
    .await;
    assert_eq!(
        (r.0, r.1["error"].as_str().unwrap_or("")),
        (403, "not_standby"),
        "{}",
        r.1
    );
    wait_until("the standby to catch up", Duration::from_secs(10), || {
        let client = client.clone();
        let (addr, replica_a) = (a.addr, replica_a.clone());
        async move {
            let _ = deposit(&client, addr, "nobody-here", 1, "poke").await;
            replica_has(&replica_a, "while-down-2")
        }
    })
    .await;
    let text = reqwest_metrics(&client, a.addr).await;
    assert!(text.contains("cellgate_replication_degraded 0"), "{text}");
    let (code, out) = status(&db_a);
    assert_eq!((code, out["state"].as_str()), (0, Some("in-sync")), "{out}");
    let t = Instant::now();
    let r = deposit(&client, a.addr, &users[2], 1, "after").await;
    assert_eq!(r.status, 200);
    assert!(
        replica_has(&replica_a, "after"),
        "in sync again: acknowledged after the standby had it"
    );
    assert!(t.elapsed() < Duration::from_millis(900));
    a.shutdown().await;
    b.shutdown().await;
    // Every ledger row of the primary is in the replica, and it checks out.
    let rows = |p: &Path| -> Vec<(i64, String)> {
        let c = rusqlite::Connection::open(p).unwrap();
        let mut s = c
            .prepare("SELECT id, COALESCE(ref, '') FROM ledger ORDER BY id")
            .unwrap();
        s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(rows(&db_a), rows(&replica_a));
    assert!(cell_agent::check::check(&replica_a).unwrap().ok());
}

async fn reqwest_metrics(client: &HttpClient, addr: SocketAddr) -> String {
    use http_body_util::BodyExt;
    let resp = client
        .get(format!("http://{addr}/metrics").parse().unwrap())
        .await
        .unwrap();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// POSTs a journal shipment to a standby's internal listener, signed as
/// `signer` (unsigned when `None`).
async fn ship(
    client: &HttpClient,
    internal: SocketAddr,
    signer: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    let mut b = http::Request::post(format!("http://{internal}/v1/internal/journal"))
        .header("content-type", "application/json");
    if let Some(signer) = signer {
        let key = cell_agent::auth::ClusterSecret::new(TEST_SECRET.as_bytes(), "test").unwrap();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for (n, v) in key.sign("POST", "/v1/internal/journal", signer, ts, body.as_bytes()) {
            b = b.header(n, v);
        }
    }
    let resp = client
        .request(
            b.body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}

/// `cell-agent replica status --db DB --json`: exit code and record.
fn status(db: &Path) -> (i32, serde_json::Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cell-agent"))
        .args(["replica", "status", "--json", "--db", db.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| String::from_utf8_lossy(&out.stderr).into_owned().into()),
    )
}
