//! Slot ownership inside the data: every write checks its slot's row in
//! its own transaction, bans are ordered writes, and the writer itself
//! honours the self-fence. Real SQLite files.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cell_agent::store::sqlite::{SqliteStore, WriterLimits};
use cell_agent::store::{DomainError, SlotStamp, Store, WriteOp};
use support::TempDir;

fn deposit(user: &str, key: &str, slot: u32, epoch: u64) -> WriteOp {
    WriteOp::Deposit {
        user: user.into(),
        amount: 10,
        key: key.into(),
        slot,
        at: Some(SlotStamp { slot, epoch }),
    }
}

fn ledger_rows(db: &std::path::Path) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row("SELECT COUNT(*) FROM ledger", [], |r| r.get(0))
        .unwrap()
}

async fn err(store: &SqliteStore, op: WriteOp) -> DomainError {
    store.write(op).await.expect_err("refused")
}

#[tokio::test]
async fn writes_commit_only_in_slots_open_here_at_their_epoch() {
    let dir = TempDir::new("slots");
    let db = dir.path("a.db");
    let store = SqliteStore::open(&db, "cell-a").unwrap();
    let (_, r) = store
        .write(WriteOp::ClaimSlots {
            ranges: vec![(0, 9)],
        })
        .await
        .unwrap();
    assert_eq!(r["claimed"], true);
    assert_eq!(r["slots"], 10);
    // A second first start claims nothing.
    let (_, r) = store
        .write(WriteOp::ClaimSlots {
            ranges: vec![(10, 19)],
        })
        .await
        .unwrap();
    assert_eq!(r["claimed"], false);

    store.write(deposit("u3", "k1", 3, 1)).await.unwrap();
    // A slot never handed over: refused (retryable), nothing written.
    let e = err(&store, deposit("u12", "k1", 12, 1)).await;
    assert_eq!((e.status, e.code), (503, "slot_not_open"), "{e}");
    assert!(e.retryable());
    // A newer epoch from the rules raises an open row; the old epoch is
    // then stale.
    store.write(deposit("u3", "k2", 3, 2)).await.unwrap();
    let e = err(&store, deposit("u3", "k3", 3, 1)).await;
    assert_eq!((e.status, e.code), (421, "stale_epoch"), "{e}");
    assert_eq!(ledger_rows(&db), 2);

    // Ban 0-9 at epoch 3: no write of an older epoch commits any more, and
    // the new epoch is not open here either.
    let (_, r) = store
        .write(WriteOp::BanSlots {
            from: 0,
            to: 9,
            epoch: 3,
        })
        .await
        .unwrap();
    assert!(r["lsn"].as_i64().unwrap() > 0, "{r}");
    for epoch in [2, 3] {
        let e = err(&store, deposit("u3", "k4", 3, epoch)).await;
        assert_eq!((e.status, e.code), (421, "slot_moved"), "{e}");
    }
    let e = err(&store, deposit("u3", "k4", 3, 4)).await;
    assert_eq!(e.code, "slot_not_open", "{e}");
    assert_eq!(ledger_rows(&db), 2);

    // Epochs only rise: a ban or open at an older epoch changes nothing.
    for op in [
        WriteOp::BanSlots {
            from: 0,
            to: 9,
            epoch: 2,
        },
        WriteOp::OpenSlots {
            from: 0,
            to: 9,
            epoch: 3,
        },
        // One slot of the range is newer: the whole range is refused.
        WriteOp::OpenSlots {
            from: 0,
            to: 10,
            epoch: 1,
        },
    ] {
        let e = err(&store, op).await;
        assert_eq!((e.status, e.code), (409, "epoch_conflict"), "{e}");
    }
    let e = err(
        &store,
        WriteOp::OpenSlots {
            from: 9,
            to: 3,
            epoch: 5,
        },
    )
    .await;
    assert_eq!(e.status, 400, "{e}");
    let listed = cell_agent::handover::list(&db).unwrap();
    assert_eq!(
        listed,
        vec![serde_json::json!({"from": 0, "to": 9, "epoch": 3, "state": "banned"})]
    );

    // Hand back at epoch 4: writes of epoch 4 commit again.
    store
        .write(WriteOp::OpenSlots {
            from: 0,
            to: 9,
            epoch: 4,
        })
        .await
        .unwrap();
    store.write(deposit("u3", "k5", 3, 4)).await.unwrap();
    assert_eq!(ledger_rows(&db), 3);
    // `check` finds every ledger entry written under an open slot.
    let report = cell_agent::check::check(&db).unwrap();
    assert!(report.ok(), "{:?}", report.violations);
    // A write without a fence (a user placed by a per-user override) is
    // not checked against the slot table.
    store
        .write(WriteOp::Deposit {
            user: "vip".into(),
            amount: 1,
            key: "k".into(),
            slot: 50,
            at: None,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn a_ban_is_ordered_after_every_write_queued_before_it() {
    let dir = TempDir::new("slotsban");
    let db = dir.path("a.db");
    let store = SqliteStore::open(&db, "cell-a").unwrap();
    store
        .write(WriteOp::ClaimSlots {
            ranges: vec![(0, 0)],
        })
        .await
        .unwrap();
    // 200 writes queued, then the ban, then 50 more: `join_all` polls in
    // order, so each is queued before the next.
    let mut ops: Vec<WriteOp> = (0..200)
        .map(|i| deposit(&format!("u{i}"), "k", 0, 1))
        .collect();
    ops.push(WriteOp::BanSlots {
        from: 0,
        to: 0,
        epoch: 2,
    });
    ops.extend((200..250).map(|i| deposit(&format!("u{i}"), "k", 0, 1)));
    let results = futures_util::future::join_all(ops.into_iter().map(|op| store.write(op))).await;
    for (i, r) in results.iter().enumerate() {
        match i {
            0..200 => assert!(r.is_ok(), "write {i} was queued before the ban: {r:?}"),
            200 => assert!(r.is_ok(), "the ban: {r:?}"),
            _ => assert_eq!(
                r.as_ref().unwrap_err().code,
                "slot_moved",
                "write {i} was queued after the ban"
            ),
        }
    }
    assert_eq!(ledger_rows(&db), 200);
    // The log records the ban above every row written before it.
    let c = rusqlite::Connection::open(&db).unwrap();
    let high: i64 = c
        .query_row(
            "SELECT ledger_high FROM slot_log WHERE reason = 'ban'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let max: i64 = c
        .query_row("SELECT MAX(id) FROM ledger", [], |r| r.get(0))
        .unwrap();
    assert_eq!(high, max);
    assert!(cell_agent::check::check(&db).unwrap().ok());
    // A row slipped in behind the ban (as a store without the fence
    // could): `check` names it.
    c.execute_batch(
        "INSERT INTO ledger (user, kind, amount, balance_delta, frozen_delta, balance_after, frozen_after, ref, created_ms)
           VALUES ('u0', 'deposit', 10, 10, 0, 20, 0, 'late', 0);
         UPDATE accounts SET balance = 20 WHERE user = 'u0';",
    )
    .unwrap();
    let report = cell_agent::check::check(&db).unwrap();
    assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
    assert!(
        report.violations[0].contains("was written while the slot was banned"),
        "{:?}",
        report.violations
    );
}

#[tokio::test]
async fn the_writer_itself_refuses_writes_while_fenced() {
    let dir = TempDir::new("slotsfence");
    let db = dir.path("a.db");
    let allowed = Arc::new(AtomicBool::new(false));
    let store =
        SqliteStore::open_gated(&db, "cell-a", WriterLimits::default(), allowed.clone()).unwrap();
    // The first claim is allowed while fenced (it opens nothing another
    // cell holds: a new store only).
    store
        .write(WriteOp::ClaimSlots {
            ranges: vec![(0, 9)],
        })
        .await
        .unwrap();
    let e = err(&store, deposit("u1", "k", 1, 1)).await;
    assert_eq!((e.status, e.code), (503, "fenced"), "{e}");
    assert_eq!(ledger_rows(&db), 0);
    allowed.store(true, Ordering::Release);
    store.write(deposit("u1", "k", 1, 1)).await.unwrap();
    // Fenced again: a write already past the API is still refused.
    allowed.store(false, Ordering::Release);
    let e = err(&store, deposit("u1", "k2", 1, 1)).await;
    assert_eq!(e.code, "fenced");
    assert_eq!(ledger_rows(&db), 1);
}

/// A deposit through the agent's API with an `x-cellgate-epoch` stamp.
async fn stamped_deposit(
    client: &support::HttpClient,
    addr: std::net::SocketAddr,
    user: &str,
    key: &str,
    epoch: Option<&str>,
) -> support::Reply {
    use http_body_util::BodyExt;
    let mut b = http::Request::post(format!("http://{addr}/v1/accounts/{user}/deposit"))
        .header("x-user-id", user)
        .header("content-type", "application/json");
    if let Some(e) = epoch {
        b = b.header("x-cellgate-epoch", e);
    }
    let body = format!(r#"{{"amount": 5, "idempotency_key": "{key}"}}"#);
    let resp = client
        .request(
            b.body(http_body_util::Full::new(bytes::Bytes::from(body)))
                .unwrap(),
        )
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    support::Reply {
        status: parts.status,
        headers: parts.headers,
        json: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_checks_the_stamped_epoch_and_opens_only_first_epoch_slots() {
    let dir = TempDir::new("slotsapi");
    let rules = dir.path("rules.toml");
    let ranges = |epoch_a: u64| {
        format!("[[ranges]]\nfrom = 0\nto = 32\ncell = \"cell-a\"\nepoch = {epoch_a}\n[[ranges]]\nfrom = 33\nto = 65\ncell = \"cell-a\"\nepoch = 3\n[[ranges]]\nfrom = 66\nto = 99\ncell = \"cell-c\"\n")
    };
    let text = |epoch_a| {
        support::rules(
            &[
                ("cell-a", "127.0.0.1:9".into(), "127.0.0.1:10".into()),
                ("cell-b", "127.0.0.1:11".into(), "127.0.0.1:12".into()),
                ("cell-c", "127.0.0.1:13".into(), "127.0.0.1:14".into()),
            ],
            Some(&ranges(epoch_a)),
        )
    };
    let first = text(1);
    std::fs::write(&rules, &first).unwrap();
    let db = dir.path("cell-a.db");
    let a = cell_agent::start(
        support::config("cell-a", "blue", &db, &rules),
        prometheus::Registry::new(),
    )
    .await
    .unwrap();
    let client = support::client();
    let table =
        routing_rules::RoutingTable::compile(routing_rules::parse_rules(&first).unwrap(), 0)
            .unwrap();
    let in_range = |lo: u32, hi: u32| {
        (0..)
            .map(|i| format!("user-{i}"))
            .find(|u| {
                let s = table
                    .route(
                        Some(u.as_bytes()),
                        &routing_rules::RouteAttrs::default(),
                        &routing_rules::AllHealthy,
                    )
                    .unwrap()
                    .slot
                    .unwrap();
                (lo..=hi).contains(&s)
            })
            .unwrap()
    };
    let (u1, u3) = (in_range(0, 32), in_range(33, 65));

    for bad in ["abc", "0", "-1", "9007199254740992"] {
        let r = stamped_deposit(&client, a.addr, &u1, "k", Some(bad)).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.json);
        assert_eq!(r.json["error"], "malformed_epoch");
    }
    assert_eq!(
        stamped_deposit(&client, a.addr, &u1, "k1", Some("1"))
            .await
            .status,
        200
    );
    assert_eq!(
        stamped_deposit(&client, a.addr, &u1, "k2", None)
            .await
            .status,
        200
    );
    // A stamp newer than the agent's rules: retryable.
    let r = stamped_deposit(&client, a.addr, &u1, "k3", Some("2")).await;
    assert_eq!(r.status, 503, "{}", r.json);
    assert_eq!(r.json["error"], "rules_behind");
    // Slots given to this cell at a later epoch were not opened on the
    // store's first start: they arrive by hand-over only.
    let r = stamped_deposit(&client, a.addr, &u3, "k", Some("3")).await;
    assert_eq!(r.status, 503, "{}", r.json);
    assert_eq!(r.json["error"], "slot_not_open");

    // The rules raise the epoch of 0-32 (still cell-a's): the store
    // follows on the next write; the old stamp is then stale.
    let second = text(2);
    std::fs::write(&rules, &second).unwrap();
    let want = support::revision_of(&second);
    support::wait_until(
        "the agent to load the rules",
        std::time::Duration::from_secs(5),
        || {
            let client = client.clone();
            async move {
                support::call(&client, "GET", a.addr, "/healthz", "", None)
                    .await
                    .json["revision"]
                    .as_u64()
                    .unwrap_or(0)
                    >= want
            }
        },
    )
    .await;
    assert_eq!(
        stamped_deposit(&client, a.addr, &u1, "k4", Some("2"))
            .await
            .status,
        200
    );
    let r = stamped_deposit(&client, a.addr, &u1, "k5", Some("1")).await;
    assert_eq!(r.status, 421, "{}", r.json);
    assert_eq!(r.json["error"], "stale_epoch");
    assert_eq!(r.json["owner_cell"], "cell-a");
    a.shutdown().await;
    let listed = cell_agent::handover::list(&db).unwrap();
    // Raised lazily, slot by slot: the written slot is at epoch 2, the
    // others of the range still at 1 (they follow on their next write).
    let slot = table
        .route(
            Some(u1.as_bytes()),
            &routing_rules::RouteAttrs::default(),
            &routing_rules::AllHealthy,
        )
        .unwrap()
        .slot
        .unwrap();
    assert!(
        listed
            .contains(&serde_json::json!({"from": slot, "to": slot, "epoch": 2, "state": "open"})),
        "{listed:?}"
    );
    assert!(listed
        .iter()
        .all(|r| r["state"] == "open" && r["to"].as_u64() <= Some(32)));
}
