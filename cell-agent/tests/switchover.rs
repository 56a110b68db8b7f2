//! A planned switchover of a cell's shard to its synchronous standby and
//! back, under concurrent writes: real agents, real SQLite files, the
//! `cell-agent switchover` binary driving the phases against the agents'
//! internal listeners, and the rules file the agents follow.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cell_agent::store::sqlite::{journal, replica};
use support::*;
use tokio::net::TcpListener;

async fn bind() -> (TcpListener, TcpListener) {
    (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
}

async fn agent(
    dir: &TempDir,
    cell: &str,
    rules: &Path,
    listeners: (TcpListener, TcpListener),
) -> cell_agent::RunningAgent {
    let mut cfg = config(cell, "blue", &dir.path(&format!("{cell}.db")), rules);
    cfg.internal_secret_file = Some(secret_file(dir));
    cfg.journal = true;
    cfg.reload_interval_ms = 20;
    cell_agent::start_bound(
        cfg,
        listeners.0,
        Some(listeners.1),
        prometheus::Registry::new(),
    )
    .await
    .unwrap()
}

/// Ledger references (idempotency keys of deposits) in a shard file.
fn refs(db: &Path) -> BTreeMap<String, i64> {
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

/// Runs `cell-agent switchover`: exit code, stdout, stderr.
fn switchover(rules: &Path, secret: &Path, cell: &str, to: &str) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cell-agent"))
        .args([
            "switchover",
            "--json",
            "--cell",
            cell,
            "--to",
            to,
            "--rules",
        ])
        .arg(rules)
        .arg("--internal-secret-file")
        .arg(secret)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A client that follows the shard: a deposit refused by one cell
/// (421/503) is retried at the other with the same key, as a router
/// would; returns once acknowledged.
async fn deposit_anywhere(client: &HttpClient, cells: [SocketAddr; 2], user: &str, key: &str) {
    let start = Instant::now();
    let mut i = 0;
    loop {
        let r = deposit(client, cells[i % 2], user, 1, key).await;
        if r.status == 200 {
            return;
        }
        assert!(
            r.status == 421 || r.status == 503,
            "{key}: {} {}",
            r.status,
            r.json
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{key} never acknowledged: {}",
            r.json
        );
        i += 1;
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_switches_over_and_back_under_writes_without_losing_one() {
    let dir = TempDir::new("switchover");
    let rules_path = dir.path("rules.toml");
    let secret = secret_file(&dir);
    let (la, lb) = (bind().await, bind().await);
    let text = with_internal(
        &placeholder_rules().replacen(
            "[cells.cell-a]\n",
            "[cells.cell-a]\nstandby = \"cell-b\"\n",
            1,
        ),
        &[
            ("cell-a", la.1.local_addr().unwrap()),
            ("cell-b", lb.1.local_addr().unwrap()),
        ],
    );
    std::fs::write(&rules_path, &text).unwrap();
    let (db_a, copy_at_b) = (dir.path("cell-a.db"), dir.path("cell-a.replica.db"));
    journal::enable(&db_a).unwrap();
    drop(cell_agent::store::sqlite::SqliteStore::open(&db_a, "cell-a").unwrap());
    replica::sync(&db_a, &copy_at_b).unwrap();
    let b = agent(&dir, "cell-b", &rules_path, lb).await;
    let a = agent(&dir, "cell-a", &rules_path, la).await;
    let cells = [a.addr, b.addr];
    let client = client();
    let users = users_in(&text, "cell-a", 40);

    // 40 users write without pause through both switchovers.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for u in users.clone() {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("{u}-{i}");
                deposit_anywhere(&client, cells, &u, &key).await;
                acked.lock().unwrap().push(key);
                i += 1;
            }
        }));
    }
    let count = || acked.lock().unwrap().len();
    wait_until(
        "writes before the switchover",
        Duration::from_secs(10),
        || async { count() >= 200 },
    )
    .await;

    // A → B: the standby's copy becomes the primary; A's own file a replica.
    let (code, out, err) = switchover(&rules_path, &secret, "cell-a", "cell-b");
    assert_eq!(code, 0, "{out}{err}");
    let outcome: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(outcome["result"], "switched", "{out}");
    let moved = std::fs::read_to_string(&rules_path).unwrap();
    assert!(moved.contains("hosted_by = \"cell-b\""), "{moved}");
    assert!(!dir.path("rules.toml.switchover.json").exists());
    let before = count();
    wait_until(
        "writes served by cell-b",
        Duration::from_secs(10),
        || async { count() >= before + 200 },
    )
    .await;
    // The user's balance is read where the shard is now.
    let r = call(
        &client,
        "GET",
        a.addr,
        &format!("/v1/accounts/{}", users[0]),
        &users[0],
        None,
    )
    .await;
    assert_eq!(r.status, 421, "{}", r.json);
    assert_eq!(r.json["owner_cell"], "cell-b", "{}", r.json);
    assert!(balance(&client, b.addr, &users[0]).await > 0);

    // Bad requests change nothing: a switchover to a cell that is not the
    // standby, and one to where the shard already is.
    let (code, out, err) = switchover(&rules_path, &secret, "cell-a", "cell-c");
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("not the standby"), "{err}");
    let (code, _, err) = switchover(&rules_path, &secret, "cell-a", "cell-b");
    assert_eq!(code, 1);
    assert!(err.contains("nothing to do"), "{err}");

    // B → A: home again (A's file applied B's journal meanwhile).
    let (code, out, err) = switchover(&rules_path, &secret, "cell-a", "cell-a");
    assert_eq!(code, 0, "{out}{err}");
    let before = count();
    wait_until(
        "writes served by cell-a again",
        Duration::from_secs(10),
        || async { count() >= before + 200 },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let home = std::fs::read_to_string(&rules_path).unwrap();
    assert!(!home.contains("hosted_by"), "{home}");

    // Every acknowledged deposit is in the shard's primary (A's file)
    // exactly once, and in B's copy once it applied A's last batches.
    let acked = acked.lock().unwrap().clone();
    let at_a = refs(&db_a);
    for key in &acked {
        assert_eq!(
            at_a.get(key),
            Some(&1),
            "{key} acknowledged but not once in cell-a's file"
        );
    }
    assert_eq!(
        at_a.len(),
        acked.len(),
        "only acknowledged deposits (none doubled)"
    );
    wait_until("cell-b's copy caught up", Duration::from_secs(10), || {
        let (copy, db_a) = (copy_at_b.clone(), db_a.clone());
        async move { refs(&copy) == refs(&db_a) }
    })
    .await;
    assert!(check(&db_a).ok(), "{:?}", check(&db_a).violations);
    a.shutdown().await;
    b.shutdown().await;
}
