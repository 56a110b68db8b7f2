//! A planned switchover of a cell's shard to its synchronous standby and
//! back, under concurrent writes: real agents, real SQLite files, the
//! switchover driver (`cellctl switchover --rules`) calling the agents'
//! internal listeners, and the rules file the agents follow.

mod support;

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
    agent_on(dir, cell, rules, listeners, |cfg| {
        cfg.journal = true;
        cfg.reload_interval_ms = 20;
    })
    .await
}

/// Runs the switchover driver (what `cellctl switchover --rules` runs):
/// exit code as the CLI gives it, the outcome as JSON, the error.
async fn switchover(rules: &Path, secret: &Path, cell: &str, to: &str) -> (i32, String, String) {
    let req = routing_rules::switchover::Request {
        rules: rules.to_path_buf(),
        cell: cell.into(),
        to: to.into(),
        catch_up_timeout: Duration::from_secs(5),
        etcd: None,
    };
    let secret = routing_rules::auth::ClusterSecret::from_file(secret).unwrap();
    match routing_rules::switchover::run(&req, secret).await {
        Ok(out) => (
            i32::from(out.result != "switched"),
            serde_json::to_string(&out).unwrap(),
            String::new(),
        ),
        Err(e) => (1, String::new(), format!("{e:#}")),
    }
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

/// Cells a, b, c; cell-a's shard journaled and replicated to cell-b
/// (seeded from a snapshot), agents of cell-a and cell-b running.
struct Pair {
    dir: TempDir,
    rules: std::path::PathBuf,
    secret: std::path::PathBuf,
    text: String,
    db_a: std::path::PathBuf,
    copy_at_b: std::path::PathBuf,
    a: cell_agent::RunningAgent,
    b: cell_agent::RunningAgent,
}

async fn pair(tag: &str) -> Pair {
    let dir = TempDir::new(tag);
    let rules = dir.path("rules.toml");
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
    std::fs::write(&rules, &text).unwrap();
    let (db_a, copy_at_b) = (dir.path("cell-a.db"), dir.path("cell-a.replica.db"));
    journal::enable(&db_a).unwrap();
    drop(cell_agent::store::sqlite::SqliteStore::open(&db_a, "cell-a").unwrap());
    replica::sync(&db_a, &copy_at_b).unwrap();
    let b = agent(&dir, "cell-b", &rules, lb).await;
    let a = agent(&dir, "cell-a", &rules, la).await;
    Pair {
        dir,
        rules,
        secret,
        text,
        db_a,
        copy_at_b,
        a,
        b,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_switches_over_and_back_under_writes_without_losing_one() {
    let Pair {
        dir,
        rules: rules_path,
        secret,
        text,
        db_a,
        copy_at_b,
        a,
        b,
    } = pair("switchover").await;
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
    let (code, out, err) = switchover(&rules_path, &secret, "cell-a", "cell-b").await;
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
    let (code, out, err) = switchover(&rules_path, &secret, "cell-a", "cell-c").await;
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("not the standby"), "{err}");
    let (code, _, err) = switchover(&rules_path, &secret, "cell-a", "cell-b").await;
    assert_eq!(code, 1);
    assert!(err.contains("nothing to do"), "{err}");

    // B → A: home again (A's file applied B's journal meanwhile).
    let (code, out, err) = switchover(&rules_path, &secret, "cell-a", "cell-a").await;
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
    let at_a = deposit_keys(&db_a);
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
        async move { deposit_keys(&copy) == deposit_keys(&db_a) }
    })
    .await;
    assert!(check(&db_a).ok(), "{:?}", check(&db_a).violations);
    a.shutdown().await;
    b.shutdown().await;
}

/// The roles and LSNs of the copies, read from the files.
fn role(db: &Path) -> String {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(
        "SELECT COALESCE((SELECT value FROM local WHERE key = 'role'), 'primary')",
        [],
        |r| r.get(0),
    )
    .unwrap()
}

fn slot_epoch(db: &Path, slot: u32) -> (i64, String) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(
        "SELECT epoch, state FROM slot_owner WHERE slot = ?1",
        [slot],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_that_does_not_catch_up_rolls_the_switchover_back() {
    let p = pair("rollback").await;
    let client = client();
    let user = users_in(&p.text, "cell-a", 1).remove(0);
    assert_eq!(
        deposit(&client, p.a.addr, &user, 5, "before").await.status,
        200
    );
    // The standby goes away: the demotion is acknowledged by cell-a alone
    // (degraded), and cell-b never applies it.
    p.b.shutdown().await;
    let req = routing_rules::switchover::Request {
        rules: p.rules.clone(),
        cell: "cell-a".into(),
        to: "cell-b".into(),
        catch_up_timeout: Duration::from_millis(300),
        etcd: None,
    };
    let secret = routing_rules::auth::ClusterSecret::from_file(&p.secret).unwrap();
    let out = routing_rules::switchover::run(&req, secret).await.unwrap();
    assert_eq!(out.result, "rolled-back");
    // cell-a holds its shard again, at epoch 1 + 2; the rules say so.
    assert_eq!(role(&p.db_a), "primary");
    assert_eq!(slot_epoch(&p.db_a, 0), (3, "open".to_string()));
    let text = std::fs::read_to_string(&p.rules).unwrap();
    let rules = routing_rules::parse_rules(&text).unwrap();
    assert_eq!(rules.host_of("cell-a"), "cell-a");
    assert!(
        rules
            .table
            .iter()
            .filter(|r| r.cell == "cell-a")
            .all(|r| r.epoch == 3),
        "{text}"
    );
    assert!(!p.dir.path("rules.toml.switchover.json").exists());
    // Writes go on at cell-a once it runs the new rules; the first one
    // that was acknowledged is still there.
    wait_until("cell-a takes writes again", Duration::from_secs(10), || {
        let (client, addr, user) = (client.clone(), p.a.addr, user.clone());
        async move { deposit(&client, addr, &user, 1, "after").await.status == 200 }
    })
    .await;
    assert_eq!(balance(&client, p.a.addr, &user).await, 6);
    assert_eq!(role(&p.copy_at_b), "replica");
    p.a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_cut_off_after_the_ban_is_finished_by_running_it_again() {
    let p = pair("resume").await;
    let client = client();
    let user = users_in(&p.text, "cell-a", 1).remove(0);
    assert_eq!(
        deposit(&client, p.a.addr, &user, 7, "before").await.status,
        200
    );
    // What a run killed right after the demotion leaves: cell-a's copy a
    // replica, the phase recorded as catch-up with its LSN.
    let internal = p.a.internal_addr.unwrap();
    let secret = routing_rules::auth::ClusterSecret::from_file(&p.secret).unwrap();
    let body = br#"{"ranges": [[0, 32, 2]]}"#;
    let path = "/v1/internal/shards/cell-a/demote";
    let mut req = http::Request::post(format!("http://{internal}{path}"))
        .header("content-type", "application/json");
    for (n, v) in secret.sign("POST", path, "operator", now_ms(), body) {
        req = req.header(n, v);
    }
    let resp = client
        .request(
            req.body(http_body_util::Full::new(bytes::Bytes::from_static(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let lsn = {
        use http_body_util::BodyExt;
        let v: serde_json::Value =
            serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
        v["lsn"].as_i64().unwrap()
    };
    assert_eq!(role(&p.db_a), "replica");
    assert_eq!(
        deposit(&client, p.a.addr, &user, 1, "during").await.status,
        421
    );
    let record = serde_json::json!({
        "cell": "cell-a", "from": "cell-a", "to": "cell-b", "ranges": [[0, 32, 2]],
        "phase": "catch-up", "lsn": lsn, "started_ms": now_ms(),
    });
    std::fs::write(p.dir.path("rules.toml.switchover.json"), record.to_string()).unwrap();
    let req = routing_rules::switchover::Request {
        rules: p.rules.clone(),
        cell: "cell-a".into(),
        to: "cell-b".into(),
        catch_up_timeout: Duration::from_secs(5),
        etcd: None,
    };
    let out = routing_rules::switchover::run(&req, secret).await.unwrap();
    assert_eq!(out.result, "switched");
    assert_eq!(role(&p.copy_at_b), "primary");
    assert_eq!(slot_epoch(&p.copy_at_b, 0), (2, "open".to_string()));
    wait_until(
        "cell-b serves cell-a's users",
        Duration::from_secs(10),
        || {
            let (client, addr, user) = (client.clone(), p.b.addr, user.clone());
            async move { deposit(&client, addr, &user, 1, "after").await.status == 200 }
        },
    )
    .await;
    assert_eq!(balance(&client, p.b.addr, &user).await, 8);
    p.a.shutdown().await;
    p.b.shutdown().await;
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}
