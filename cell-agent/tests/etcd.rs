//! A cell agent on the control plane: rules from etcd, registration under a
//! lease, self-fencing when the lease cannot be renewed.
#![cfg(feature = "etcd")]

mod support;

use std::time::Duration;

use http::StatusCode;
use routing_rules::etcd::testing::EtcdServer;
use routing_rules::etcd::ControlPlane;
use support::*;

async fn registrations(url: &str) -> Vec<serde_json::Value> {
    let mut cp = ControlPlane::connect(&[url.to_string()], "cells")
        .await
        .unwrap();
    let prefix = cp.keys().instances_prefix();
    let r = cp
        .client()
        .get(prefix, Some(etcd_client_get_prefix()))
        .await
        .unwrap();
    r.kvs()
        .iter()
        .map(|kv| serde_json::from_slice(kv.value()).unwrap())
        .collect()
}

/// `serve` arguments of a blue agent of `cell` in cluster `cells`, with an
/// internal listener and the test secret.
fn peer_args(dir: &TempDir, etcd: &str, secret: &std::path::Path, cell: &str) -> Vec<String> {
    [
        "--cell",
        cell,
        "--colour",
        "blue",
        "--db",
        dir.path(&format!("{cell}.db")).to_str().unwrap(),
        "--etcd",
        etcd,
        "--cluster",
        "cells",
        "--internal-listen",
        "127.0.0.1:0",
        "--internal-secret-file",
        secret.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn etcd_client_get_prefix() -> routing_rules::etcd::GetOptions {
    routing_rules::etcd::GetOptions::new().with_prefix()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_from_etcd_registration_and_self_fencing() {
    let mut etcd = EtcdServer::start();
    let mut cp = ControlPlane::connect(std::slice::from_ref(&etcd.url), "cells")
        .await
        .unwrap();
    let v1 = placeholder_rules();
    assert_eq!(cp.apply(&v1, 0, "test", "v1").await.unwrap(), 1);
    let dir = TempDir::new("etcd-agent");
    let args: Vec<String> = [
        "--cell",
        "cell-a",
        "--colour",
        "blue",
        "--db",
        dir.path("a.db").to_str().unwrap(),
        "--etcd",
        &etcd.url,
        "--cluster",
        "cells",
        "--instance-id",
        "a-blue-1",
        "--lease-ttl-s",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut agent = AgentProcess::start(&args, "127.0.0.1:0");
    let client = client();
    let users = users_in(&v1, "cell-a", 200);
    // A user that stays in cell-a after v2 moves slots 0-15 away.
    let user = users
        .iter()
        .find(|u| routing_rules::hash::xxh64_slot(u.as_bytes(), 100) > 15)
        .unwrap()
        .clone();
    // Writes open once the lease is held.
    wait_until("the agent to hold its lease", Duration::from_secs(10), || {
        let (client, user) = (client.clone(), user.clone());
        async move { deposit(&client, agent.addr, &user, 5, "d1").await.status == StatusCode::OK }
    })
    .await;
    let regs = registrations(&etcd.url).await;
    assert_eq!(regs.len(), 1);
    assert_eq!(regs[0]["address"], agent.addr.to_string());
    assert_eq!(
        (regs[0]["cell"].as_str(), regs[0]["colour"].as_str()),
        (Some("cell-a"), Some("blue"))
    );

    // A new revision moving slots 0-15 to cell-b reaches the agent's guard.
    let v2 = v1.replace(
        "[[ranges]]\nfrom = 0\nto = 32\ncell = \"cell-a\"\n",
        "[[ranges]]\nfrom = 0\nto = 15\ncell = \"cell-b\"\n[[ranges]]\nfrom = 16\nto = 32\ncell = \"cell-a\"\n",
    );
    assert_eq!(cp.apply(&v2, 1, "test", "move 0-15").await.unwrap(), 2);
    let moved = users
        .iter()
        .find(|u| routing_rules::hash::xxh64_slot(u.as_bytes(), 100) <= 15)
        .unwrap()
        .clone();
    wait_until(
        "the agent to follow revision 2",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            async move {
                call(&client, "GET", agent.addr, "/healthz", "", None)
                    .await
                    .json["revision"]
                    == 2
            }
        },
    )
    .await;
    assert_eq!(
        deposit(&client, agent.addr, &moved, 5, "m").await.status,
        StatusCode::MISDIRECTED_REQUEST
    );

    // etcd goes away: writes stay open while the lease could still be
    // valid at etcd (2/3 of the TTL after the last renewal: ≥ 1 s here),
    // then, within the lease TTL, the agent fences itself — writes are
    // refused, reads go on.
    etcd.kill();
    let lost = std::time::Instant::now();
    let r = deposit(&client, agent.addr, &user, 5, "just-after-etcd-died").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    wait_until("the agent to fence itself", Duration::from_secs(10), || {
        let (client, user) = (client.clone(), user.clone());
        async move {
            deposit(&client, agent.addr, &user, 5, "while-fenced")
                .await
                .status
                == StatusCode::SERVICE_UNAVAILABLE
        }
    })
    .await;
    let fenced_after = lost.elapsed();
    assert!(
        fenced_after >= Duration::from_millis(800) && fenced_after <= Duration::from_secs(3),
        "fenced {fenced_after:?} after etcd died (the lease could lapse 1.33 s after its last renewal)"
    );
    // (Writes made before the fence, while the lease was still valid, count.)
    let fenced_balance = balance(&client, agent.addr, &user).await;
    let r = deposit(&client, agent.addr, &user, 5, "refused").await;
    assert_eq!(r.json["error"], "fenced");
    assert_eq!(balance(&client, agent.addr, &user).await, fenced_balance);
    // etcd is back: the lease is renewed and writes resume.
    etcd.restart();
    wait_until("writes to resume", Duration::from_secs(15), || {
        let (client, user) = (client.clone(), user.clone());
        async move { deposit(&client, agent.addr, &user, 5, "after").await.status == StatusCode::OK }
    })
    .await;
    assert_eq!(
        balance(&client, agent.addr, &user).await,
        fenced_balance + 5
    );

    // A crashed agent's lease lapses and its registration disappears within the TTL.
    agent.kill();
    wait_until("the registration to lapse", Duration::from_secs(10), || {
        let url = etcd.url.clone();
        async move { registrations(&url).await.is_empty() }
    })
    .await;
    check(&dir.path("a.db"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_reach_a_cell_known_only_from_its_registrations() {
    let etcd = EtcdServer::start();
    let mut cp = ControlPlane::connect(std::slice::from_ref(&etcd.url), "cells")
        .await
        .unwrap();
    // No static addresses for cell-c at all: registrations only.
    let doc = placeholder_rules().replace(
        "[cells.cell-c]\nblue = [\"127.0.0.1:13\"]\ngreen = [\"127.0.0.1:14\"]\n",
        "[cells.cell-c]\nregistered = true\n",
    );
    assert!(doc.contains("registered = true"), "{doc}");
    cp.apply(&doc, 0, "test", "v1").await.unwrap();
    let dir = TempDir::new("etcd-peers");
    let secret = secret_file(&dir);
    let args = |cell: &str| peer_args(&dir, &etcd.url, &secret, cell);
    let a = AgentProcess::start(&args("cell-a"), "127.0.0.1:0");
    let c = AgentProcess::start(&args("cell-c"), "127.0.0.1:0");
    let client = client();
    let payer = users_in(&doc, "cell-a", 1).remove(0);
    let payee = users_in(&doc, "cell-c", 1).remove(0);
    wait_until("cell-a to hold its lease", Duration::from_secs(10), || {
        let (client, payer) = (client.clone(), payer.clone());
        async move { deposit(&client, a.addr, &payer, 100, "seed").await.status == StatusCode::OK }
    })
    .await;
    let want = c.internal.unwrap().to_string();
    wait_until("cell-c's registration", Duration::from_secs(10), || {
        let (url, want) = (etcd.url.clone(), want.clone());
        async move {
            registrations(&url)
                .await
                .iter()
                .any(|r| r["cell"] == "cell-c" && r["internal_address"] == want.as_str())
        }
    })
    .await;
    let t = call(
        &client,
        "POST",
        a.addr,
        "/v1/transfers",
        &payer,
        Some(serde_json::json!({"from": payer, "to": payee, "amount": 40, "idempotency_key": "t"})),
    )
    .await;
    assert_eq!(t.status, StatusCode::CREATED, "{}", t.json);
    wait_until("the credit in cell-c", Duration::from_secs(15), || {
        let (client, payee) = (client.clone(), payee.clone());
        async move {
            call(
                &client,
                "GET",
                c.addr,
                &format!("/v1/accounts/{payee}"),
                &payee,
                None,
            )
            .await
            .json["balance"]
                == 40
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replication_state_is_recorded_in_etcd_before_the_shard_goes_on_degraded() {
    use cell_agent::store::sqlite::{journal, replica, SqliteStore};
    let etcd = EtcdServer::start();
    let mut cp = ControlPlane::connect(std::slice::from_ref(&etcd.url), "cells")
        .await
        .unwrap();
    let doc = placeholder_rules().replacen(
        "[cells.cell-a]\n",
        "[cells.cell-a]\nstandby = \"cell-b\"\n",
        1,
    );
    cp.apply(&doc, 0, "test", "v1").await.unwrap();
    let dir = TempDir::new("etcd-repl");
    let secret = secret_file(&dir);
    // The primary's file journals from the start; the standby's replica is
    // seeded from it.
    let db_a = dir.path("cell-a.db");
    journal::enable(&db_a).unwrap();
    drop(SqliteStore::open(&db_a, "cell-a").unwrap());
    replica::sync(&db_a, &dir.path("cell-a.replica.db")).unwrap();
    let args = |cell: &str| peer_args(&dir, &etcd.url, &secret, cell);
    let mut b = AgentProcess::start(&args("cell-b"), "127.0.0.1:0");
    let mut a_args = args("cell-a");
    a_args.push("--journal".into());
    let mut a = AgentProcess::start(&a_args, "127.0.0.1:0");
    let client = client();
    let user = users_in(&doc, "cell-a", 1).remove(0);
    let mut n = 0;
    wait_until(
        "cell-a to take writes, in sync",
        Duration::from_secs(15),
        || {
            n += 1;
            let (client, user, key) = (client.clone(), user.clone(), format!("k{n}"));
            let url = etcd.url.clone();
            async move {
                let ok = deposit(&client, a.addr, &user, 1, &key).await.status == StatusCode::OK;
                let mut cp = ControlPlane::connect(&[url], "cells").await.unwrap();
                let r = cp.replication().await.unwrap();
                ok && r
                    .get("cell-a")
                    .is_some_and(|r| r["state"] == "in-sync" && r["standby"] == "cell-b")
            }
        },
    )
    .await;
    // The standby dies: the next write is answered after the sync timeout,
    // and by then etcd says the shard runs degraded.
    b.kill();
    let r = deposit(&client, a.addr, &user, 1, "while-down").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.json);
    let r = cp.replication().await.unwrap();
    assert_eq!(r["cell-a"]["state"], "degraded", "{r:?}");
    a.kill();
}
