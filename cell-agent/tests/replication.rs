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
    agent_on(dir, cell, rules, listeners, |cfg| {
        cfg.journal = journal;
        cfg.sync_timeout_ms = 1_000;
    })
    .await
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

/// cell-a replicated to cell-b: the rules (written), both agents'
/// listeners, cell-a's journaling file and its replica seeded from it.
struct Pair {
    rules_path: std::path::PathBuf,
    text: String,
    la: (TcpListener, TcpListener),
    lb: (TcpListener, TcpListener),
    db_a: std::path::PathBuf,
    replica_a: std::path::PathBuf,
}

async fn replicated_pair(dir: &TempDir) -> Pair {
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
    Pair {
        rules_path,
        text,
        la,
        lb,
        db_a,
        replica_a,
    }
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
    let Pair {
        rules_path,
        text,
        la,
        lb,
        db_a,
        replica_a,
    } = replicated_pair(&dir).await;
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
        let r = post_raw(
            &client,
            b.internal_addr.unwrap(),
            "/v1/internal/journal",
            signer,
            body.as_bytes().to_vec(),
        )
        .await;
        assert_eq!(
            (r.0, r.1["error"].as_str().unwrap_or("")),
            (status, code),
            "{}",
            r.1
        );
    }
    let r = post_raw(
        &client,
        b.internal_addr.unwrap(),
        "/v1/internal/journal",
        Some("cell-c"),
        br#"{"cell": "cell-c", "batches": []}"#.to_vec(),
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
    // The shipper records the catch-up once the standby's answer is in.
    wait_until(
        "the shard to be in sync again",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            let addr = a.addr;
            async move {
                reqwest_metrics(&client, addr)
                    .await
                    .contains("cellgate_replication_degraded 0")
            }
        },
    )
    .await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_without_a_replica_is_sent_a_snapshot_over_the_network() {
    snapshot_over_the_network(false).await;
}

/// The standby cell's first internal address is down (one colour
/// stopped): the snapshot goes to the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_goes_to_the_standby_instance_that_is_up() {
    snapshot_over_the_network(true).await;
}

async fn snapshot_over_the_network(first_address_down: bool) {
    let dir = TempDir::new("syncsnap");
    let rules_path = dir.path("rules.toml");
    let (la, lb) = (bind().await, bind().await);
    let mut text = with_internal(
        &placeholder_rules().replacen(
            "[cells.cell-a]\n",
            "[cells.cell-a]\nstandby = \"cell-b\"\n",
            1,
        ),
        &[("cell-a", addr(&la.1)), ("cell-b", addr(&lb.1))],
    );
    if first_address_down {
        // A port that was free a moment ago: connections to it are refused.
        let down = addr(&TcpListener::bind("127.0.0.1:0").await.unwrap());
        let live = format!("internal = [\"{}\"]", addr(&lb.1));
        text = text.replacen(
            &live,
            &format!("internal = [\"{down}\", \"{}\"]", addr(&lb.1)),
            1,
        );
        assert!(text.contains(&down.to_string()));
    }
    std::fs::write(&rules_path, &text).unwrap();
    // The standby keeps its replicas elsewhere, and has none yet.
    let standby_dir = dir.path("standby");
    std::fs::create_dir_all(&standby_dir).unwrap();
    let mut cfg = config("cell-b", "blue", &dir.path("cell-b.db"), &rules_path);
    cfg.internal_secret_file = Some(secret_file(&dir));
    cfg.replica_dir = Some(standby_dir.clone());
    let b = cell_agent::start_bound(cfg, lb.0, Some(lb.1), prometheus::Registry::new())
        .await
        .unwrap();
    let a = agent(&dir, "cell-a", &rules_path, la, true).await;
    let client = client();
    let users = users_in(&text, "cell-a", 5);
    for (i, u) in users.iter().enumerate() {
        let r = deposit(&client, a.addr, u, 10, &format!("before-{i}")).await;
        assert_eq!(r.status, 200, "{}", r.json);
    }
    // The snapshot arrives, the shard is in sync again, and later writes
    // are acknowledged only once the standby has them.
    let replica_a = standby_dir.join("cell-a.replica.db");
    wait_until("the standby to be in sync", Duration::from_secs(10), || {
        let db = dir.path("cell-a.db");
        let (client, addr, u) = (client.clone(), a.addr, users[0].clone());
        async move {
            let _ = deposit(&client, addr, &u, 1, "poke").await;
            status(&db).1["state"] == "in-sync"
        }
    })
    .await;
    for (i, u) in users.iter().enumerate() {
        let key = format!("after-{i}");
        let r = deposit(&client, a.addr, u, 10, &key).await;
        assert_eq!(r.status, 200, "{}", r.json);
        assert!(replica_has(&replica_a, &key), "{key}");
        assert!(replica_has(&replica_a, &format!("before-{i}")));
    }
    a.shutdown().await;
    b.shutdown().await;
    assert!(cell_agent::check::check(&replica_a).unwrap().ok());
    let leftovers: Vec<_> = std::fs::read_dir(&standby_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("incoming"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_arrives_in_chunks_and_a_bad_one_is_refused() {
    use cell_agent::store::sqlite::SqliteStore;
    use cell_agent::store::{SlotStamp, Store, WriteOp};
    let dir = TempDir::new("snapchunks");
    let rules_path = dir.path("rules.toml");
    let lb = bind().await;
    let text = with_internal(
        &placeholder_rules().replacen(
            "[cells.cell-a]\n",
            "[cells.cell-a]\nstandby = \"cell-b\"\n",
            1,
        ),
        &[("cell-b", addr(&lb.1))],
    );
    std::fs::write(&rules_path, &text).unwrap();
    let b = agent(&dir, "cell-b", &rules_path, lb, false).await;
    let internal = b.internal_addr.unwrap();
    // A primary file with some data, and its snapshot.
    let src = dir.path("elsewhere-cell-a.db");
    let store = SqliteStore::open(&src, "cell-a").unwrap();
    store
        .write(WriteOp::ClaimSlots {
            ranges: vec![(0, 32)],
        })
        .await
        .unwrap();
    for i in 0..200u32 {
        store
            .write(WriteOp::Deposit {
                user: format!("u{i}"),
                amount: 5,
                key: format!("k{i}"),
                slot: i % 33,
                at: Some(SlotStamp {
                    slot: i % 33,
                    epoch: 1,
                }),
            })
            .await
            .unwrap();
    }
    let snap = dir.path("snap.db");
    let lsn = replica::snapshot_to(&src, &snap).unwrap();
    let bytes = std::fs::read(&snap).unwrap();
    let client = client();
    let chunk = |offset: usize, end: usize, last: bool| {
        let mut body = serde_json::json!({"cell": "cell-a", "id": "5eed", "offset": offset, "total": bytes.len(), "last": last})
            .to_string()
            .into_bytes();
        body.push(b'\n');
        body.extend_from_slice(&bytes[offset..end]);
        body
    };
    // A truncated snapshot (the middle chunk missing) is refused.
    let third = bytes.len() / 3;
    let r = post_raw(
        &client,
        internal,
        "/v1/internal/snapshot",
        Some("cell-a"),
        chunk(0, third, false),
    )
    .await;
    assert_eq!(r.0, 200, "{}", r.1);
    let r = post_raw(
        &client,
        internal,
        "/v1/internal/snapshot",
        Some("cell-a"),
        chunk(2 * third, bytes.len(), true),
    )
    .await;
    assert_eq!(
        (r.0, r.1["error"].as_str()),
        (422, Some("bad_snapshot")),
        "{}",
        r.1
    );
    assert!(!dir.path("cell-a.replica.db").exists());
    // In three chunks: installed, at the snapshot's LSN.
    for (from, to, last) in [
        (0, third, false),
        (third, 2 * third, false),
        (2 * third, bytes.len(), true),
    ] {
        let r = post_raw(
            &client,
            internal,
            "/v1/internal/snapshot",
            Some("cell-a"),
            chunk(from, to, last),
        )
        .await;
        assert_eq!(r.0, 200, "{}", r.1);
        if last {
            assert_eq!(r.1["applied"], lsn);
        }
    }
    let replica = dir.path("cell-a.replica.db");
    let report = cell_agent::check::check(&replica).unwrap();
    assert!(report.ok() && report.ledger_entries == 200, "{report:?}");
    // Only the cell whose standby this is may send one, signed.
    let r = post_raw(
        &client,
        internal,
        "/v1/internal/snapshot",
        Some("cell-c"),
        chunk(0, 10, false),
    )
    .await;
    assert_eq!(r.0, 403, "{}", r.1);
    let r = post_raw(
        &client,
        internal,
        "/v1/internal/snapshot",
        None,
        chunk(0, 10, false),
    )
    .await;
    assert_eq!(r.0, 401, "{}", r.1);
    b.shutdown().await;
}

/// POSTs raw bytes to an internal listener, signed as `signer`.
async fn post_raw(
    client: &HttpClient,
    internal: SocketAddr,
    path: &str,
    signer: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    use http_body_util::BodyExt;
    let mut b = http::Request::post(format!("http://{internal}{path}"))
        .header("content-type", "application/json");
    if let Some(signer) = signer {
        let key = cell_agent::auth::ClusterSecret::new(TEST_SECRET.as_bytes(), "test").unwrap();
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        for (n, v) in key.sign("POST", path, signer, ts, &body) {
            b = b.header(n, v);
        }
    }
    let resp = client
        .request(
            b.body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_default())
}
