//! Switchover and failover with the etcd control plane: the rules, the
//! phase, the replication records and the agents' internal addresses all
//! live in a real etcd; agents run as processes following it.
#![cfg(feature = "etcd")]

mod support;

use std::time::Duration;

use http::StatusCode;
use routing_rules::etcd::testing::EtcdServer;
use routing_rules::etcd::ControlPlane;
use routing_rules::switchover::{EtcdTarget, FailoverRequest, Request};
use support::*;

fn args(
    dir: &TempDir,
    etcd: &str,
    secret: &std::path::Path,
    cell: &str,
    journal: bool,
) -> Vec<String> {
    let mut v: Vec<String> = [
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

async fn record(cp: &mut ControlPlane) -> serde_json::Value {
    cp.replication()
        .await
        .unwrap()
        .remove("cell-a")
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_and_failover_through_etcd() {
    let etcd = EtcdServer::start();
    let mut cp = ControlPlane::connect(std::slice::from_ref(&etcd.url), "cells")
        .await
        .unwrap();
    let rules = placeholder_rules().replacen(
        "[cells.cell-a]\n",
        "[cells.cell-a]\nstandby = \"cell-b\"\n",
        1,
    );
    cp.apply(&rules, 0, "test", "v1").await.unwrap();
    let dir = TempDir::new("etcd-switchover");
    let secret = secret_file(&dir);
    let b = AgentProcess::start(
        &args(&dir, &etcd.url, &secret, "cell-b", false),
        "127.0.0.1:0",
    );
    let mut a = AgentProcess::start(
        &args(&dir, &etcd.url, &secret, "cell-a", true),
        "127.0.0.1:0",
    );
    let client = client();
    let users = users_in(&rules, "cell-a", 3);
    let (user, seed) = (users[1].clone(), users[0].clone());
    // cell-a's shard in sync with cell-b (addresses from registrations).
    wait_until("cell-a's shard in sync", Duration::from_secs(20), || {
        let (client, addr, seed) = (client.clone(), a.addr, seed.clone());
        let url = etcd.url.clone();
        async move {
            let _ = try_deposit(&client, addr, &seed, 1, &format!("seed-{}", rand_key())).await;
            let mut cp = ControlPlane::connect(&[url], "cells").await.unwrap();
            let r = record(&mut cp).await;
            r["state"] == "in-sync" && r["acked_lsn"].as_i64() > Some(0)
        }
    })
    .await;
    let mut acked = Vec::new();
    for i in 0..5 {
        let key = format!("before-{i}");
        assert_eq!(
            deposit(&client, a.addr, &user, 1, &key).await.status,
            StatusCode::OK
        );
        acked.push(key);
    }
    let target = Some(EtcdTarget {
        endpoints: vec![etcd.url.clone()],
        cluster: "cells".into(),
    });
    let key = || routing_rules::auth::ClusterSecret::from_file(&secret).unwrap();
    let switch = |to: &str| Request {
        rules: Default::default(),
        cell: "cell-a".into(),
        to: to.into(),
        catch_up_timeout: Duration::from_secs(5),
        etcd: target.clone(),
    };

    // A → B: the rules in etcd move the shard; cell-b serves it.
    let out = routing_rules::switchover::run(&switch("cell-b"), key())
        .await
        .unwrap();
    assert_eq!(out.result, "switched");
    let stored = cp.get().await.unwrap().unwrap();
    assert!(
        stored.document.contains("hosted_by = \"cell-b\""),
        "{}",
        stored.document
    );
    assert!(
        cp.get_raw(&cp.keys().switchover()).await.unwrap().is_none(),
        "phase cleared"
    );
    wait_until(
        "cell-b serves cell-a's users",
        Duration::from_secs(10),
        || {
            let (client, addr, user) = (client.clone(), b.addr, user.clone());
            async move { deposit(&client, addr, &user, 1, "at-b").await.status == StatusCode::OK }
        },
    )
    .await;
    acked.push("at-b".into());
    // And back.
    let out = routing_rules::switchover::run(&switch("cell-a"), key())
        .await
        .unwrap();
    assert_eq!(out.result, "switched");
    wait_until(
        "cell-a serves its users again",
        Duration::from_secs(10),
        || {
            let (client, addr, user) = (client.clone(), a.addr, user.clone());
            async move { deposit(&client, addr, &user, 1, "home").await.status == StatusCode::OK }
        },
    )
    .await;
    acked.push("home".into());
    wait_until("cell-a in sync again", Duration::from_secs(10), || {
        let url = etcd.url.clone();
        async move {
            let mut cp = ControlPlane::connect(&[url], "cells").await.unwrap();
            let r = record(&mut cp).await;
            r["state"] == "in-sync" && r["standby"] == "cell-b"
        }
    })
    .await;

    // cell-a is lost: failover through etcd, every acknowledged write kept.
    a.kill();
    let fail = FailoverRequest {
        rules: Default::default(),
        cell: "cell-a".into(),
        to: "cell-b".into(),
        force: false,
        etcd: target.clone(),
    };
    let out = routing_rules::switchover::failover(&fail, key())
        .await
        .unwrap();
    assert_eq!(out.result, "failed-over");
    wait_until(
        "cell-b serves cell-a's users after the failover",
        Duration::from_secs(10),
        || {
            let (client, addr, user) = (client.clone(), b.addr, user.clone());
            async move {
                deposit(&client, addr, &user, 1, "after-failover")
                    .await
                    .status
                    == StatusCode::OK
            }
        },
    )
    .await;
    let c = rusqlite::Connection::open(dir.path("cell-a.replica.db")).unwrap();
    for key in &acked {
        let n: i64 = c
            .query_row("SELECT COUNT(*) FROM ledger WHERE ref = ?1", [key], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 1, "{key}");
    }
    // The new host runs degraded (its standby is the lost cell), recorded.
    let r = record(&mut cp).await;
    assert_eq!(r["state"], "degraded", "{r}");
    // A second failover has nothing to do.
    let e = routing_rules::switchover::failover(&fail, key())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nothing to do"), "{e}");
}

fn rand_key() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}
