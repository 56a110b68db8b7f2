//! Unplanned failover of a replicated shard (RPO 0): the primary cell's
//! agent is killed (SIGKILL) or frozen (SIGSTOP) under writes, the shard
//! is failed over to its standby (`cellctl failover --rules`), and every
//! write any cell acknowledged is found exactly once in the promoted copy;
//! a frozen primary that wakes acknowledges nothing more. Real agent
//! processes, real SQLite files, the rules file they follow.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

struct Cells {
    dir: TempDir,
    rules: PathBuf,
    secret: PathBuf,
    text: String,
    a: AgentProcess,
    b: AgentProcess,
}

fn args(dir: &TempDir, cell: &str, rules: &Path, secret: &Path, journal: bool) -> Vec<String> {
    let mut v: Vec<String> = [
        "--cell",
        cell,
        "--colour",
        "blue",
        "--db",
        dir.path(&format!("{cell}.db")).to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
        "--internal-listen",
        "127.0.0.1:0",
        "--internal-secret-file",
        secret.to_str().unwrap(),
        "--sync-timeout-ms",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if journal {
        v.push("--journal".into());
    }
    v
}

/// cell-a (journaled) and its standby cell-b as processes; cell-b's copy
/// seeded by cell-a's first shipment (a snapshot), the shard recorded in
/// sync next to the rules.
async fn cells(tag: &str) -> Cells {
    let dir = TempDir::new(tag);
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let secret = secret_file(&dir);
    // cell-b first: cell-a starts with rules naming its standby's
    // internal address (its shipper starts with the agent).
    let b = AgentProcess::start(&args(&dir, "cell-b", &rules, &secret, false), "127.0.0.1:0");
    // (support::rules gives each document the next revision.)
    let publish = |internal: &[(&str, std::net::SocketAddr)]| {
        let text = with_internal(
            &support::rules(
                &[
                    ("cell-a", "127.0.0.1:9".into(), "127.0.0.1:10".into()),
                    ("cell-b", b.addr.to_string(), "127.0.0.1:12".into()),
                    ("cell-c", "127.0.0.1:13".into(), "127.0.0.1:14".into()),
                ],
                None,
            )
            .replacen(
                "[cells.cell-a]\n",
                "[cells.cell-a]\nstandby = \"cell-b\"\n",
                1,
            ),
            internal,
        );
        std::fs::write(&rules, &text).unwrap();
        text
    };
    publish(&[("cell-b", b.internal.unwrap())]);
    let a = AgentProcess::start(&args(&dir, "cell-a", &rules, &secret, true), "127.0.0.1:0");
    // Then cell-a's internal address too (cell-b ships to it once it holds
    // cell-a's shard).
    let text = publish(&[
        ("cell-a", a.internal.unwrap()),
        ("cell-b", b.internal.unwrap()),
    ]);
    let client = client();
    let seed_user = users_in(&text, "cell-a", 1).remove(0);
    let record = routing_rules::switchover::record_path(&rules, "cell-a");
    wait_until(
        "cell-a's shard in sync with cell-b",
        Duration::from_secs(20),
        || {
            let (client, addr, record, user) =
                (client.clone(), a.addr, record.clone(), seed_user.clone());
            async move {
                // Writes move the shipper: the first one seeds the standby.
                let _ = deposit(&client, addr, &user, 1, &format!("seed-{}", now_ms())).await;
                // In sync after the standby acknowledged something (the record
                // says in-sync, acknowledged 0, before the first shipment).
                std::fs::read_to_string(&record)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .is_some_and(|r| r["state"] == "in-sync" && r["acked_lsn"].as_i64() > Some(0))
            }
        },
    )
    .await;
    Cells {
        dir,
        rules,
        secret,
        text,
        a,
        b,
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

/// Users writing to `addr` without pause until `stop`; every 200 is
/// recorded (key), so is every other answer's status.
fn writers(
    users: &[String],
    addr: std::net::SocketAddr,
    stop: &Arc<AtomicBool>,
    acked: &Arc<Mutex<Vec<String>>>,
    tag: &'static str,
) -> Vec<tokio::task::JoinHandle<Vec<u16>>> {
    users
        .iter()
        .map(|u| {
            let (client, u, stop, acked) = (client(), u.clone(), stop.clone(), acked.clone());
            tokio::spawn(async move {
                let mut other = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("{u}-{tag}-{i}");
                    let r = tokio::time::timeout(
                        Duration::from_secs(10),
                        support::try_deposit(&client, addr, &u, 1, &key),
                    )
                    .await;
                    match r {
                        Ok(Ok(r)) if r.status == StatusCode::OK => acked.lock().unwrap().push(key),
                        Ok(Ok(r)) => {
                            other.push(r.status.as_u16());
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        _ => {
                            other.push(0);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                    i += 1;
                }
                other
            })
        })
        .collect()
}

async fn fail_over(c: &Cells, force: bool) -> anyhow::Result<routing_rules::switchover::Outcome> {
    let req = routing_rules::switchover::FailoverRequest {
        rules: c.rules.clone(),
        cell: "cell-a".into(),
        to: "cell-b".into(),
        force,
        etcd: None,
    };
    let secret = routing_rules::auth::ClusterSecret::from_file(&c.secret).unwrap();
    routing_rules::switchover::failover(&req, secret).await
}

fn assert_all_at_b(c: &Cells, acked: &[String]) {
    let at_b = deposit_keys(&c.dir.path("cell-a.replica.db"));
    for key in acked {
        assert_eq!(
            at_b.get(key),
            Some(&1),
            "{key} was acknowledged but is not (once) at cell-b"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_primary_loses_no_acknowledged_write() {
    let mut c = cells("failover-kill").await;
    let client = client();
    // (the first user of cell-a made the seeding deposits)
    let users = users_in(&c.text, "cell-a", 21).split_off(1);
    let (stop, acked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let tasks = writers(&users, c.a.addr, &stop, &acked, "k");
    wait_until("writes at cell-a", Duration::from_secs(20), || {
        let n = acked.lock().unwrap().len();
        async move { n >= 300 }
    })
    .await;
    // kill -9 mid-stream: batches in flight die with the process.
    let killed = Instant::now();
    c.a.kill();
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();

    // A bad failover changes nothing: to a cell that is not the standby.
    let req = routing_rules::switchover::FailoverRequest {
        rules: c.rules.clone(),
        cell: "cell-a".into(),
        to: "cell-c".into(),
        force: false,
        etcd: None,
    };
    let secret = routing_rules::auth::ClusterSecret::from_file(&c.secret).unwrap();
    let e = routing_rules::switchover::failover(&req, secret)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not the standby"), "{e}");
    assert_eq!(std::fs::read_to_string(&c.rules).unwrap(), c.text);

    let out = fail_over(&c, false).await.unwrap();
    assert_eq!(out.result, "failed-over");
    assert_all_at_b(&c, &acked);
    // cell-a's users are served by cell-b, balances intact.
    let user = &users[0];
    let expected = acked
        .iter()
        .filter(|k| k.starts_with(&format!("{user}-")))
        .count() as i64;
    wait_until(
        "cell-b serves cell-a's users",
        Duration::from_secs(10),
        || {
            let (client, addr, user) = (client.clone(), c.b.addr, user.clone());
            async move {
                deposit(&client, addr, &user, 1, "after-failover")
                    .await
                    .status
                    == StatusCode::OK
            }
        },
    )
    .await;
    eprintln!(
        "kill -9 → first write served by cell-b: {:?} (failover itself {} ms)",
        killed.elapsed(),
        out.stall_ms
    );
    // Every acknowledged deposit, the one after the failover, and at most
    // the one that was in flight when cell-a died (committed and
    // replicated, its answer lost with the process: a retry with its key
    // gets the same answer).
    let b = balance(&client, c.b.addr, user).await;
    assert!(
        (expected + 1..=expected + 2).contains(&b),
        "balance {b}, {expected} acknowledged"
    );

    // cell-a comes back with its old file: it must not disturb cell-b (its
    // copy answers needs_failback; cell-b goes on, degraded).
    let a = c.a.restart();
    for i in 0..5 {
        let r = deposit(&client, c.b.addr, user, 1, &format!("while-stale-{i}")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    }
    // ...nor the shard's record, which is its host's (cell-b's) to write:
    // the stale primary's shipper once rewrote it as `catching-up` before
    // it found the shard failed over and fenced its copy.
    let db = c.dir.path("cell-a.db");
    wait_until(
        "the stale cell-a copy fenced",
        Duration::from_secs(20),
        || {
            let db = db.clone();
            async move {
                rusqlite::Connection::open_with_flags(
                    &db,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
                )
                .ok()
                .and_then(|conn| cell_agent::store::sqlite::shard::role(&conn).ok())
                    == Some(cell_agent::store::sqlite::shard::Role::Replica)
            }
        },
    )
    .await;
    let record = routing_rules::switchover::record_path(&c.rules, "cell-a");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&record).unwrap()).unwrap();
    assert_eq!(r["state"], "degraded", "{r}");
    // Failback by one command while cell-a runs: cell-b seeds cell-a's
    // fenced copy again from a snapshot (the tail kept aside), the copy
    // catches up as cell-b's standby, and the shard comes home. Writes go
    // on at cell-b meanwhile.
    let req = routing_rules::switchover::Request {
        rules: c.rules.clone(),
        cell: "cell-a".into(),
        to: "cell-a".into(),
        catch_up_timeout: Duration::from_secs(5),
        etcd: None,
    };
    let secret = routing_rules::auth::ClusterSecret::from_file(&c.secret).unwrap();
    let writing = Arc::new(AtomicBool::new(false));
    let during = {
        let (client, addr, user, writing) =
            (client.clone(), c.b.addr, user.clone(), writing.clone());
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut i = 0;
            while !writing.load(Ordering::SeqCst) {
                let key = format!("{user}-during-{i}");
                if let Ok(r) = support::try_deposit(&client, addr, &user, 1, &key).await {
                    if r.status == StatusCode::OK {
                        acked.push(key);
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        })
    };
    let out = routing_rules::switchover::failback(&req, secret, Duration::from_secs(30))
        .await
        .unwrap();
    writing.store(true, Ordering::SeqCst);
    let during = during.await.unwrap();
    assert_eq!(out.result, "switched");
    assert!(!during.is_empty(), "cell-b took writes during the re-seed");
    let aside = std::fs::read_dir(&c.dir.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("cell-a.db.discarded-")
        });
    assert!(aside, "the old content is kept aside");
    // The file was re-seeded in place: still in WAL mode, still one file.
    let mode: String = rusqlite::Connection::open(c.dir.path("cell-a.db"))
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    // A failback of a cell that holds its own shard changes nothing.
    let secret = routing_rules::auth::ClusterSecret::from_file(&c.secret).unwrap();
    let e = routing_rules::switchover::failback(&req, secret, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("already holds its own shard"), "{e}");
    let acked: Vec<String> = acked.into_iter().chain(during).collect();
    let at_b_copy = deposit_keys(&c.dir.path("cell-a.replica.db"));
    wait_until(
        "cell-a serves its users again",
        Duration::from_secs(10),
        || {
            let (client, addr, user) = (client.clone(), a.addr, user.clone());
            async move { deposit(&client, addr, &user, 1, "home").await.status == StatusCode::OK }
        },
    )
    .await;
    let at_a = deposit_keys(&c.dir.path("cell-a.db"));
    for (key, n) in &at_b_copy {
        assert_eq!((key, at_a.get(key)), (key, Some(n)));
    }
    for key in &acked {
        assert_eq!(
            at_a.get(key),
            Some(&1),
            "{key} acknowledged but not once at home"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_primary_that_wakes_after_the_failover_acknowledges_nothing() {
    let c = cells("failover-freeze").await;
    let users = users_in(&c.text, "cell-a", 11).split_off(1);
    let (stop, acked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let tasks = writers(&users, c.a.addr, &stop, &acked, "f");
    wait_until("writes at cell-a", Duration::from_secs(20), || {
        let n = acked.lock().unwrap().len();
        async move { n >= 100 }
    })
    .await;
    let pid = c.a.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    let before_freeze = acked.lock().unwrap().len();
    let out = fail_over(&c, false).await.unwrap();
    assert_eq!(out.result, "failed-over");
    // The writers keep sending to the frozen cell-a; it wakes.
    assert!(std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut refused = Vec::new();
    for t in tasks {
        refused.extend(t.await.unwrap());
    }
    let acked = acked.lock().unwrap().clone();
    // Whatever cell-a answered after it woke, nothing it acknowledged is
    // missing from the promoted copy.
    assert_all_at_b(&c, &acked);
    assert!(
        !refused.is_empty(),
        "cell-a should have refused the writes sent after the failover"
    );
    assert!(
        refused.iter().all(|s| [421, 503].contains(s)),
        "unexpected answers: {refused:?}"
    );
    // cell-a's copy refuses every write from now on.
    let r = deposit(&client(), c.a.addr, &users[0], 1, "late").await;
    assert!(
        [
            StatusCode::MISDIRECTED_REQUEST,
            StatusCode::SERVICE_UNAVAILABLE
        ]
        .contains(&r.status),
        "{} {}",
        r.status,
        r.json
    );
    let role: String = rusqlite::Connection::open(c.dir.path("cell-a.db"))
        .unwrap()
        .query_row(
            "SELECT COALESCE((SELECT value FROM local WHERE key = 'role'), 'primary')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    eprintln!(
        "frozen primary: {} acknowledged before the freeze, {} in all; {} refused after waking ({:?}); its copy: {role}",
        before_freeze,
        acked.len(),
        refused.len(),
        {
            let mut counts = BTreeMap::new();
            for s in &refused {
                *counts.entry(*s).or_insert(0) += 1;
            }
            counts
        }
    );
}
