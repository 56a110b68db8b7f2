//! A cell under 4× its capacity: bounded memory, 503s with Retry-After,
//! every acknowledged write present exactly once, nothing applied for a
//! refused write, and nothing committed after its client timed out.
//!
//! The cell's capacity is cut by a real fault: another connection holds
//! the SQLite write lock most of the time (as a stalled disk or a long
//! maintenance transaction would). The load is open-loop at four times the
//! capacity measured under the same fault. `OVERLOAD_SECS` shortens the run
//! (default 30 s).

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::*;

const CLIENT_TIMEOUT_MS: i64 = 1_000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// (user, idempotency key, sent at unix ms, outcome).
type Sent = (String, String, i64, Outcome);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    Refused { status: u16, retry_after: bool },
    TimedOut,
    Failed(String),
}

/// One deposit with the client's timeout.
async fn deposit_once(
    client: &HttpClient,
    addr: std::net::SocketAddr,
    user: &str,
    key: &str,
) -> Outcome {
    let req = http::Request::post(format!("http://{addr}/v1/accounts/{user}/deposit"))
        .header("x-user-id", user)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!(
            r#"{{"amount": 1, "idempotency_key": "{key}"}}"#
        ))))
        .unwrap();
    let call = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let retry_after = resp.headers().contains_key("retry-after");
        resp.into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((status, retry_after))
    };
    match tokio::time::timeout(Duration::from_millis(CLIENT_TIMEOUT_MS as u64), call).await {
        Err(_) => Outcome::TimedOut,
        Ok(Err(e)) => Outcome::Failed(e),
        Ok(Ok((200, _))) => Outcome::Ok,
        Ok(Ok((status, retry_after))) => Outcome::Refused {
            status,
            retry_after,
        },
    }
}

/// Holds the database's write lock 300 ms of every 400 ms until stopped.
fn lock_holder(db: std::path::PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(db).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        while !stop.load(Ordering::Relaxed) {
            conn.execute_batch("BEGIN IMMEDIATE").unwrap();
            std::thread::sleep(Duration::from_millis(300));
            conn.execute_batch("COMMIT").unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_times_capacity_sheds_load_and_loses_nothing() {
    let secs: u64 = std::env::var("OVERLOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = TempDir::new("overload");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let db = dir.path("cell-a.db");
    let args: Vec<String> = [
        "--cell",
        "cell-a",
        "--colour",
        "blue",
        "--db",
        db.to_str().unwrap(),
        "--rules",
        rules.to_str().unwrap(),
        "--write-queue",
        "64",
        "--write-deadline-ms",
        "500",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let agent = AgentProcess::start(&args, "127.0.0.1:0");
    let addr = agent.addr;
    let users = users_in(&placeholder_rules(), "cell-a", 32);
    // Idle pooled connections are let go before the agent's own 10 s read
    // timeout closes them (else a reused connection can race its close).
    let client: HttpClient =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(5))
            .build_http();
    let stop = Arc::new(AtomicBool::new(false));
    let holder = lock_holder(db.clone(), stop.clone());

    // Capacity under the fault: a closed loop of 16 clients for 3 s.
    let calibrate_until = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let (client, user) = (client.clone(), users[t % users.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            let mut i = 0;
            while Instant::now() < calibrate_until {
                if deposit_once(&client, addr, &user, &format!("cal-{t}-{i}")).await == Outcome::Ok
                {
                    ok += 1;
                }
                i += 1;
            }
            ok
        }));
    }
    let mut calibrated = 0;
    for t in tasks {
        calibrated += t.await.unwrap();
    }
    let capacity = (calibrated as f64 / 3.0).max(10.0);
    let rate = 4.0 * capacity;

    // Open loop at 4x capacity.
    let log: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let start = Instant::now();
    let total = (rate * secs as f64) as u64;
    let mut handles = Vec::with_capacity(total as usize);
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (client, log) = (client.clone(), log.clone());
        let user = users[n as usize % users.len()].clone();
        handles.push(tokio::spawn(async move {
            let key = format!("load-{n}");
            // The load generator keeps at most this many requests (and so
            // connections) open; a request's clock starts when it is sent.
            static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1024);
            let _slot = SLOTS.acquire().await.unwrap();
            let t0 = now_ms();
            let outcome = deposit_once(&client, addr, &user, &key).await;
            log.lock().unwrap().push((user, key, t0, outcome));
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    holder.join().unwrap();
    let rss_mib = peak_rss_kib(agent.child.id()) / 1024;
    drop(agent);

    let log = log.lock().unwrap();
    let count = |f: &dyn Fn(&Outcome) -> bool| log.iter().filter(|e| f(&e.3)).count();
    let ok = count(&|o| *o == Outcome::Ok);
    let shed = count(&|o| matches!(o, Outcome::Refused { status: 503, .. }));
    let timed_out = count(&|o| *o == Outcome::TimedOut);
    let failed: Vec<&Outcome> = log
        .iter()
        .map(|e| &e.3)
        .filter(|o| {
            matches!(o, Outcome::Failed(_) | Outcome::Refused { .. })
                && !matches!(
                    o,
                    Outcome::Refused {
                        status: 503,
                        retry_after: true
                    }
                )
        })
        .collect();
    println!(
        "capacity {capacity:.0}/s, offered {rate:.0}/s for {secs} s: {} requests, {ok} ok, {shed} shed (503), {timed_out} timed out, peak RSS {rss_mib} MiB",
        log.len()
    );
    assert!(
        ok > 0 && shed > 0,
        "the cell was really overloaded and still served"
    );
    assert!(
        failed.is_empty(),
        "every refusal is a 503 with Retry-After: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(rss_mib < 256, "bounded memory: peak RSS {rss_mib} MiB");

    // The ledger: every acknowledged deposit exactly once, nothing for a
    // refused one, nothing committed after its client timed out.
    let conn = rusqlite::Connection::open(&db).unwrap();
    let mut s = conn
        .prepare("SELECT user, ref, COUNT(*), MAX(created_ms) FROM ledger WHERE kind = 'deposit' AND ref LIKE 'load-%' GROUP BY user, ref")
        .unwrap();
    let applied: HashMap<(String, String), (i64, i64)> = s
        .query_map([], |r| Ok(((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?))))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (user, key, t0, outcome) in log.iter() {
        let entry = applied.get(&(user.clone(), key.clone()));
        match outcome {
            Outcome::Ok => assert_eq!(
                entry.map(|e| e.0),
                Some(1),
                "acknowledged {key} present once"
            ),
            Outcome::Refused { .. } => assert!(entry.is_none(), "refused {key} was applied"),
            Outcome::TimedOut => {
                if let Some((_, at)) = entry {
                    assert!(
                        *at <= t0 + CLIENT_TIMEOUT_MS,
                        "{key} committed {} ms after its client gave up",
                        at - t0 - CLIENT_TIMEOUT_MS
                    );
                }
            }
            Outcome::Failed(_) => {}
        }
    }
    check(&db);
}
