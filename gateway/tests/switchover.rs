//! A planned switchover under load through a real gateway: cell-a's shard
//! moves to its synchronous standby cell-b and back while clients keep
//! depositing; the gateway holds the requests the cell refuses with 421
//! while the shard moves and sends them to the new owner, so no client
//! request fails. Real agents on real SQLite files, the rules file all
//! of them follow, real sockets.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use cell_agent::store::sqlite::{journal, replica, SqliteStore};
use http::{Request, StatusCode};
use http_body_util::Full;
use routing_rules::{parse_rules, AllHealthy, RouteAttrs, RoutingTable};
use support::*;
use tokio::net::TcpListener;

const SECRET: &str = "0123456789abcdef0123456789abcdef-gateway-switchover";

fn rules(rev: u64, a: [SocketAddr; 2], b: [SocketAddr; 2]) -> String {
    format!(
        "revision = {rev}\nslots = 64\n\
         [cells.cell-a]\nblue = [\"{}\"]\ninternal = [\"{}\"]\nstandby = \"cell-b\"\n\
         [cells.cell-b]\nblue = [\"{}\"]\ninternal = [\"{}\"]\n\
         [[ranges]]\nfrom = 0\nto = 31\ncell = \"cell-a\"\n\
         [[ranges]]\nfrom = 32\nto = 63\ncell = \"cell-b\"\n",
        a[0], a[1], b[0], b[1]
    )
}

async fn agent(
    cell: &str,
    db: &Path,
    rules: &Path,
    secret: &Path,
    listeners: (TcpListener, TcpListener),
) -> cell_agent::RunningAgent {
    let mut cfg = cell_agent::AgentConfig::new(
        cell,
        routing_rules::Colour::Blue,
        db.into(),
        Some(rules.into()),
    );
    cfg.reload_interval_ms = 20;
    cfg.journal = true;
    cfg.internal_secret_file = Some(secret.into());
    cell_agent::start_bound(
        cfg,
        listeners.0,
        Some(listeners.1),
        prometheus::Registry::new(),
    )
    .await
    .unwrap()
}

/// What the clients saw: every acknowledged key, every failure, and each
/// request's latency with its start time.
#[derive(Default)]
struct Seen {
    acked: Vec<String>,
    failed: Vec<String>,
    latencies: Vec<(Instant, Duration)>,
}

async fn depositor(
    client: HttpClient,
    gw: SocketAddr,
    user: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) {
    for i in 0.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let key = format!("{user}-{i}");
        let req = Request::post(format!("http://{gw}/v1/accounts/{user}/deposit"))
            .header("x-user-id", &user)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(format!(
                r#"{{"amount": 3, "idempotency_key": "{key}"}}"#
            ))))
            .unwrap();
        let t = Instant::now();
        let r = send(&client, req).await;
        let mut seen = seen.lock().unwrap();
        seen.latencies.push((t, t.elapsed()));
        match r {
            Ok(r) if r.status == StatusCode::OK => seen.acked.push(key),
            Ok(r) => seen.failed.push(format!("{key}: {} {}", r.status, r.json)),
            Err(e) => seen.failed.push(format!("{key}: {e}")),
        }
    }
}

fn deposits(db: &Path) -> BTreeMap<String, i64> {
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

async fn switchover(rules: &Path, secret: &Path, to: &str) -> (Instant, Instant) {
    let req = routing_rules::switchover::Request {
        rules: rules.into(),
        cell: "cell-a".into(),
        to: to.into(),
        catch_up_timeout: Duration::from_secs(5),
        etcd: None,
    };
    let secret = routing_rules::auth::ClusterSecret::from_file(secret).unwrap();
    let t = Instant::now();
    let out = routing_rules::switchover::run(&req, secret).await.unwrap();
    assert_eq!(out.result, "switched");
    (t, Instant::now())
}

/// cell-a (journaled; its standby cell-b holds a copy seeded from a
/// snapshot) and cell-b as agents on real listeners, and 40 users of cell-a.
struct Pair {
    dir: TempDir,
    rules_path: std::path::PathBuf,
    secret: std::path::PathBuf,
    db_a: std::path::PathBuf,
    copy_at_b: std::path::PathBuf,
    a: cell_agent::RunningAgent,
    b: cell_agent::RunningAgent,
    users: Vec<String>,
}

async fn pair(tag: &str) -> Pair {
    let dir = TempDir::new(tag);
    let rules_path = dir.0.join("rules.toml");
    let secret = dir.0.join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let (db_a, copy_at_b) = (dir.0.join("cell-a.db"), dir.0.join("cell-a.replica.db"));
    let bind = || async {
        (
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        )
    };
    let (la, lb) = (bind().await, bind().await);
    let addrs =
        |l: &(TcpListener, TcpListener)| [l.0.local_addr().unwrap(), l.1.local_addr().unwrap()];
    let (aa, ab) = (addrs(&la), addrs(&lb));
    std::fs::write(&rules_path, rules(next_revision(), aa, ab)).unwrap();
    journal::enable(&db_a).unwrap();
    drop(SqliteStore::open(&db_a, "cell-a").unwrap());
    replica::sync(&db_a, &copy_at_b).unwrap();
    let b = agent("cell-b", &dir.0.join("cell-b.db"), &rules_path, &secret, lb).await;
    let a = agent("cell-a", &db_a, &rules_path, &secret, la).await;
    let table = RoutingTable::compile(parse_rules(&rules(1, aa, ab)).unwrap(), 1).unwrap();
    let users = (0..)
        .map(|i| format!("{tag}-{i}"))
        .filter(|u| {
            let d = table
                .route(Some(u.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                .unwrap();
            table.cell_name(d.home_cell) == "cell-a"
        })
        .take(40)
        .collect();
    Pair {
        dir,
        rules_path,
        secret,
        db_a,
        copy_at_b,
        a,
        b,
        users,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_under_load_fails_no_client_request_and_loses_no_write() {
    let Pair {
        dir: _dir,
        rules_path,
        secret,
        db_a,
        a,
        b,
        users,
        ..
    } = pair("switchover").await;
    let gw = gateway::start(fast_config(rules_path.clone()), prometheus::Registry::new())
        .await
        .unwrap();

    let client = client();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = users
        .iter()
        .map(|u| {
            tokio::spawn(depositor(
                client.clone(),
                gw.proxy_addr,
                u.clone(),
                stop.clone(),
                seen.clone(),
            ))
        })
        .collect();
    let acked = || seen.lock().unwrap().acked.len();
    wait_until("writes before", Duration::from_secs(20), || {
        let n = acked();
        async move { n >= 300 }
    })
    .await;
    let there = switchover(&rules_path, &secret, "cell-b").await;
    let n = acked();
    wait_until("writes at cell-b", Duration::from_secs(20), || {
        let m = acked();
        async move { m >= n + 300 }
    })
    .await;
    let back = switchover(&rules_path, &secret, "cell-a").await;
    let n = acked();
    wait_until("writes at home again", Duration::from_secs(20), || {
        let m = acked();
        async move { m >= n + 300 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(
        seen.failed.is_empty(),
        "failed client requests: {:?}",
        seen.failed
    );
    // Every acknowledged deposit is in the shard exactly once, nothing else.
    let at_a = deposits(&db_a);
    for key in &seen.acked {
        assert_eq!(at_a.get(key), Some(&1), "{key}");
    }
    assert_eq!(at_a.len(), seen.acked.len());
    // The write stall: latencies of the requests started while a shard was
    // moving (the switchover running, and until the gateway ran the rules).
    let mut stalled: Vec<Duration> = seen
        .latencies
        .iter()
        .filter(|(t, _)| [there, back].iter().any(|(s, e)| *t >= *s && *t <= *e))
        .map(|(_, d)| *d)
        .collect();
    stalled.sort();
    assert!(!stalled.is_empty());
    let p99 = stalled[(stalled.len() * 99 / 100).min(stalled.len() - 1)];
    let max = *stalled.last().unwrap();
    eprintln!(
        "switchover stall: {} requests during the two switchovers, p99 {:?}, max {:?}; switchovers took {:?} and {:?}",
        stalled.len(),
        p99,
        max,
        there.1 - there.0,
        back.1 - back.0
    );
    assert!(max < Duration::from_secs(2), "held past --hold-ms: {max:?}");
    let metrics = reqwest_text(&client, gw.admin_addr).await;
    assert!(
        metrics.contains("cellgate_held_requests_total{outcome=\"released\"}"),
        "{metrics}"
    );
    // Every status class counted is a real one (no "0xx" series).
    assert!(metrics.contains("code_class=\"2xx\""), "{metrics}");
    assert!(!metrics.contains("code_class=\"0xx\""), "{metrics}");
    a.shutdown().await;
    b.shutdown().await;
}

async fn reqwest_text(client: &HttpClient, addr: SocketAddr) -> String {
    let r = client
        .request(
            Request::get(format!("http://{addr}/metrics"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    use http_body_util::BodyExt;
    String::from_utf8_lossy(&r.into_body().collect().await.unwrap().to_bytes()).into_owned()
}

/// `--auto-failover`: both of cell-a's agents die; the gateway's health
/// checks see the cell down, and the gateway fails its shard over to the
/// standby itself; clients that retry with their keys go on, and every
/// acknowledged write is in the promoted copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_gateway_fails_a_dead_cells_shard_over_on_its_own() {
    let Pair {
        dir: _dir,
        rules_path,
        secret,
        copy_at_b,
        a,
        b,
        users,
        ..
    } = pair("auto-failover").await;
    let mut cfg = fast_config(rules_path.clone());
    cfg.auto_failover = true;
    cfg.internal_secret_file = Some(secret.clone());
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    let record = routing_rules::files::record_path(&rules_path, "cell-a");
    wait_until("cell-a's shard in sync", Duration::from_secs(10), || {
        let in_sync = std::fs::read_to_string(&record).is_ok_and(|t| t.contains("\"in-sync\""));
        async move { in_sync }
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(Instant, Instant, String)>>> = Arc::default();
    let tasks: Vec<_> = users[..8]
        .iter()
        .cloned()
        .map(|user| {
            let (stop, acked, gw) = (stop.clone(), acked.clone(), gw.proxy_addr);
            tokio::spawn(async move {
                let client = client();
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let key = format!("{user}-{n}");
                    n += 1;
                    // Retried with the same key until acknowledged.
                    loop {
                        let sent = Instant::now();
                        let req = Request::post(format!("http://{gw}/v1/accounts/{user}/deposit"))
                            .header("x-user-id", &user)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(format!(
                                r#"{{"amount": 1, "idempotency_key": "{key}"}}"#
                            ))))
                            .unwrap();
                        if matches!(send(&client, req).await, Ok(r) if r.status == StatusCode::OK) {
                            acked.lock().unwrap().push((sent, Instant::now(), key));
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            })
        })
        .collect();
    let count = || acked.lock().unwrap().len();
    wait_until("writes at cell-a", Duration::from_secs(20), || {
        let n = count();
        async move { n >= 100 }
    })
    .await;
    let killed = Instant::now();
    a.kill();
    let n = count();
    wait_until("writes again, at cell-b", Duration::from_secs(30), || {
        let m = count();
        async move { m >= n + 100 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let acked = std::mem::take(&mut *acked.lock().unwrap());
    let back = acked
        .iter()
        .filter(|(sent, _, _)| *sent > killed)
        .map(|(_, at, _)| *at)
        .min()
        .unwrap();
    eprintln!(
        "auto-failover: both cell-a agents killed -> first write acknowledged {:?} later",
        back - killed
    );
    let rules_now = std::fs::read_to_string(&rules_path).unwrap();
    assert!(rules_now.contains("hosted_by = \"cell-b\""), "{rules_now}");
    let at_b = deposits(&copy_at_b);
    for (_, _, key) in &acked {
        assert_eq!(
            at_b.get(key),
            Some(&1),
            "{key} acknowledged but not once at cell-b"
        );
    }
    let metrics = reqwest_text(&client(), gw.admin_addr).await;
    assert!(
        metrics.contains("cellgate_auto_failovers_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );
    b.shutdown().await;
}
