//! Slot ownership inside the data, end to end: real cell agents on real
//! SQLite files behind a real gateway, a hand-over of a slot range racing
//! concurrent writes, and the files checked afterwards.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use routing_rules::{parse_rules, AllHealthy, RouteAttrs, RoutingTable};
use support::*;

const SLOTS: u32 = 64;
/// The range that changes owner: cell-a's 0-31 keep 0-15, 16-31 go to b.
const MOVED: (u32, u32) = (16, 31);

fn rules(rev: u64, a: SocketAddr, b: SocketAddr, moved_to_b: bool) -> String {
    let ranges = if moved_to_b {
        "[[ranges]]\nfrom = 0\nto = 15\ncell = \"cell-a\"\n[[ranges]]\nfrom = 16\nto = 31\ncell = \"cell-b\"\nepoch = 2\n[[ranges]]\nfrom = 32\nto = 63\ncell = \"cell-b\"\n"
    } else {
        "[[ranges]]\nfrom = 0\nto = 31\ncell = \"cell-a\"\n[[ranges]]\nfrom = 32\nto = 63\ncell = \"cell-b\"\n"
    };
    format!(
        "revision = {rev}\nslots = {SLOTS}\n[cells.cell-a]\nblue = [\"{a}\"]\n[cells.cell-b]\nblue = [\"{b}\"]\n{ranges}"
    )
}

fn agent_config(cell: &str, db: &Path, rules: &Path) -> cell_agent::AgentConfig {
    let mut cfg = cell_agent::AgentConfig::new(
        cell,
        routing_rules::Colour::Blue,
        db.into(),
        Some(rules.into()),
    );
    cfg.reload_interval_ms = 20;
    cfg
}

/// One user's deposits until `stop`, each retried with the same key on
/// 421/5xx as a real client does; returns the keys acknowledged (200).
async fn depositor(
    client: HttpClient,
    gw: SocketAddr,
    user: String,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
) -> Vec<String> {
    let mut keys = Vec::new();
    for i in 0.. {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let key = format!("{user}-{i}");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let req = Request::post(format!("http://{gw}/v1/accounts/{user}/deposit"))
                .header("x-user-id", &user)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(format!(
                    r#"{{"amount": 7, "idempotency_key": "{key}"}}"#
                ))))
                .unwrap();
            match send(&client, req).await {
                Ok(r) if r.status == StatusCode::OK => {
                    acked.fetch_add(1, Ordering::SeqCst);
                    keys.push(key);
                    break;
                }
                Ok(r) => assert!(
                    r.status == StatusCode::MISDIRECTED_REQUEST || r.status.is_server_error(),
                    "{user}: unexpected {} {}",
                    r.status,
                    r.json
                ),
                Err(_) => {}
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{user}: {key} never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    keys
}

/// Ledger rows of `user` in a file: (ledger id, idempotency key).
fn rows(db: &Path) -> Vec<(i64, String, String)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut s = c
        .prepare("SELECT id, user, ref FROM ledger WHERE kind = 'deposit' ORDER BY id")
        .unwrap();
    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The `ledger_high` of the slot-log entry of `reason` covering `slot`.
fn log_high(db: &Path, reason: &str, slot: u32) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(
        "SELECT ledger_high FROM slot_log WHERE reason = ?1 AND from_slot <= ?2 AND ?2 <= to_slot",
        rusqlite::params![reason, slot],
        |r| r.get(0),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_over_racing_writes_commits_nothing_in_a_cell_that_did_not_own_the_slot() {
    let dir = TempDir::new("fencing");
    let rules_path = dir.0.join("rules.toml");
    let (db_a, db_b) = (dir.0.join("cell-a.db"), dir.0.join("cell-b.db"));
    // Agents first (their addresses go into the rules), on placeholder rules.
    let (pa, pb) = (
        "127.0.0.1:9".parse().unwrap(),
        "127.0.0.1:10".parse().unwrap(),
    );
    std::fs::write(&rules_path, rules(1, pa, pb, false)).unwrap();
    let a = cell_agent::start(
        agent_config("cell-a", &db_a, &rules_path),
        prometheus::Registry::new(),
    )
    .await
    .unwrap();
    let b = cell_agent::start(
        agent_config("cell-b", &db_b, &rules_path),
        prometheus::Registry::new(),
    )
    .await
    .unwrap();
    std::fs::write(&rules_path, rules(2, a.addr, b.addr, false)).unwrap();
    let gw = gateway::start(fast_config(rules_path.clone()), prometheus::Registry::new())
        .await
        .unwrap();

    // 200 users whose slots move, depositing all at once until stopped.
    let table =
        RoutingTable::compile(parse_rules(&rules(2, a.addr, b.addr, false)).unwrap(), 2).unwrap();
    let slot_of = |u: &str| {
        table
            .route(Some(u.as_bytes()), &RouteAttrs::default(), &AllHealthy)
            .unwrap()
            .slot
            .unwrap()
    };
    let users: Vec<String> = (0..)
        .map(|i| format!("fence-{i}"))
        .filter(|u| (MOVED.0..=MOVED.1).contains(&slot_of(u)))
        .take(200)
        .collect();
    let client = client();
    let acked = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = users
        .iter()
        .map(|u| {
            tokio::spawn(depositor(
                client.clone(),
                gw.proxy_addr,
                u.clone(),
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();

    // Mid-run: ban at cell-a (epoch 2), open at cell-b, move the range.
    wait_until("300 writes acknowledged", Duration::from_secs(20), || {
        let n = acked.load(Ordering::SeqCst);
        async move { n >= 300 }
    })
    .await;
    let ban = cell_agent::handover::step(&db_a, cell_agent::handover::Step::Ban, MOVED, 2)
        .await
        .unwrap();
    assert!(ban["lsn"].as_i64().unwrap() > 0, "{ban}");
    cell_agent::handover::step(&db_b, cell_agent::handover::Step::Open, MOVED, 2)
        .await
        .unwrap();
    std::fs::write(&rules_path, rules(3, a.addr, b.addr, true)).unwrap();
    // Writes go on until 400 more were acknowledged after the move.
    let at_move = acked.load(Ordering::SeqCst);
    wait_until("400 writes after the move", Duration::from_secs(20), || {
        let n = acked.load(Ordering::SeqCst);
        async move { n >= at_move + 400 }
    })
    .await;
    stop.store(true, Ordering::SeqCst);

    let mut acknowledged: Vec<(String, String)> = Vec::new();
    for (u, t) in users.iter().zip(tasks) {
        for k in t.await.unwrap() {
            acknowledged.push((u.clone(), k));
        }
    }
    assert_eq!(acknowledged.len(), acked.load(Ordering::SeqCst));
    gw.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;

    // The files: every acknowledged write exactly once, in cell-a only
    // before its ban, in cell-b only after its open.
    let (ra, rb) = (rows(&db_a), rows(&db_b));
    let ban_high = log_high(&db_a, "ban", MOVED.0);
    let open_high = log_high(&db_b, "open", MOVED.0);
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (id, user, key) in &ra {
        assert!(
            *id <= ban_high,
            "cell-a committed {key} (row {id}) after its ban (row {ban_high})"
        );
        *seen.entry((user.clone(), key.clone())).or_default() += 1;
    }
    for (id, user, key) in &rb {
        assert!(
            *id > open_high,
            "cell-b committed {key} (row {id}) before it opened the slots"
        );
        *seen.entry((user.clone(), key.clone())).or_default() += 1;
    }
    assert!(
        !ra.is_empty() && !rb.is_empty(),
        "the hand-over happened mid-run: {} in a, {} in b",
        ra.len(),
        rb.len()
    );
    for k in &acknowledged {
        assert_eq!(
            seen.get(k),
            Some(&1),
            "{k:?} acknowledged but present {:?} times",
            seen.get(k)
        );
    }
    assert_eq!(
        seen.len(),
        acknowledged.len(),
        "nothing unacknowledged was written"
    );
}
