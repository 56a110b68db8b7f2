//! The gateway following its rules in a real etcd.
#![cfg(feature = "etcd")]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use routing_rules::etcd::testing::EtcdServer;
use routing_rules::etcd::ControlPlane;
use support::*;

async fn wait_revision(gw: &gateway::RunningGateway, rev: u64) {
    let control = gw.control.clone();
    wait_until(
        &format!("revision {rev}"),
        Duration::from_secs(10),
        move || {
            let c = control.clone();
            async move { c.current().table.revision() == rev }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_follow_applies_survive_etcd_outages_and_boot_from_saved_rules() {
    let topo = Topology::start(1).await;
    let mut etcd = EtcdServer::start();
    let mut cp = ControlPlane::connect(std::slice::from_ref(&etcd.url), "gw-test")
        .await
        .unwrap();
    assert_eq!(
        cp.apply(&topo.rules([0, 0, 0], ""), 0, "test", "v1")
            .await
            .unwrap(),
        1
    );
    let dirs = [TempDir::new("gw1"), TempDir::new("gw2")];
    let g1 = gateway::start(
        etcd_config(&etcd, &dirs[0].0, "g1"),
        prometheus::Registry::new(),
    )
    .await
    .unwrap();
    let g2 = gateway::start(
        etcd_config(&etcd, &dirs[1].0, "g2"),
        prometheus::Registry::new(),
    )
    .await
    .unwrap();
    assert_eq!(g1.control.current().table.revision(), 1);
    let client = client();

    // Apply: every gateway routes by the new revision.
    assert_eq!(
        cp.apply(&topo.rules([10_000, 0, 0], ""), 1, "test", "all green in a")
            .await
            .unwrap(),
        2
    );
    wait_revision(&g1, 2).await;
    wait_revision(&g2, 2).await;
    let a_user = (0..1000)
        .map(|i| format!("u{i}"))
        .find(|u| routing_rules::hash::xxh64_slot(u.as_bytes(), 100) <= 32)
        .unwrap();
    for gw in [&g1, &g2] {
        let r = get_user(&client, gw.proxy_addr, &a_user).await.unwrap();
        assert_eq!(
            (r.json["cell"].as_str(), r.json["colour"].as_str()),
            (Some("cell-a"), Some("green"))
        );
        assert_eq!(r.json["stamp_rev"], "2");
    }
    // Each gateway registered the revision it runs.
    let check = ControlPlane::connect(std::slice::from_ref(&etcd.url), "gw-test")
        .await
        .unwrap();
    let key = check.keys().gateway("g1");
    wait_until(
        "g1's registration to show revision 2",
        Duration::from_secs(5),
        || {
            let url = etcd.url.clone();
            let key = key.clone();
            async move {
                let mut c = ControlPlane::connect(&[url], "gw-test").await.unwrap();
                let r = c.client().get(key, None).await.unwrap();
                r.kvs()
                    .first()
                    .and_then(|kv| serde_json::from_slice::<serde_json::Value>(kv.value()).ok())
                    .map(|v| v["revision"] == 2)
                    .unwrap_or(false)
            }
        },
    )
    .await;

    // etcd dies while the gateways serve: no request fails.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (client, stop, addr) = (client.clone(), stop.clone(), g1.proxy_addr);
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, Vec::new());
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && i < 50_000 {
                match get_user(&client, addr, &format!("load-{i}")).await {
                    Ok(r) if r.status == StatusCode::OK => ok += 1,
                    Ok(r) => failed.push(format!("{} {}", r.status, r.json)),
                    Err(e) => failed.push(e),
                }
                i += 1;
            }
            (ok, failed)
        })
    };
    etcd.kill();
    let admin = format!("http://{}/metrics", g1.admin_addr);
    wait_until(
        "the gateway to notice etcd is gone",
        Duration::from_secs(15),
        || {
            let (client, admin) = (client.clone(), admin.clone());
            async move {
                let r = client
                    .request(http::Request::get(admin).body(Default::default()).unwrap())
                    .await
                    .unwrap();
                let text = String::from_utf8(
                    http_body_util::BodyExt::collect(r.into_body())
                        .await
                        .unwrap()
                        .to_bytes()
                        .to_vec(),
                )
                .unwrap();
                text.contains("cellgate_control_plane_up 0")
            }
        },
    )
    .await;
    // A gateway restarted while etcd is down boots from its saved rules.
    g2.shutdown().await;
    let g2 = gateway::start(
        etcd_config(&etcd, &dirs[1].0, "g2"),
        prometheus::Registry::new(),
    )
    .await
    .unwrap();
    assert_eq!(g2.control.current().table.revision(), 2);
    let r = get_user(&client, g2.proxy_addr, &a_user).await.unwrap();
    assert_eq!(
        (r.status, r.json["colour"].as_str()),
        (StatusCode::OK, Some("green"))
    );
    // etcd comes back: watches resume and the next change is applied.
    etcd.restart();
    let mut cp = ControlPlane::connect(std::slice::from_ref(&etcd.url), "gw-test")
        .await
        .unwrap();
    assert_eq!(
        cp.apply(&topo.rules([0, 0, 0], ""), 2, "test", "back to blue")
            .await
            .unwrap(),
        3
    );
    wait_revision(&g1, 3).await;
    wait_revision(&g2, 3).await;
    let status = cp.status().await.unwrap();
    assert_eq!(status.revision, 3);
    wait_until(
        "both gateways to register revision 3",
        Duration::from_secs(10),
        || {
            let url = etcd.url.clone();
            async move {
                let mut c = ControlPlane::connect(&[url], "gw-test").await.unwrap();
                let s = c.status().await.unwrap();
                s.gateways.len() == 2 && s.all_current()
            }
        },
    )
    .await;
    // cellctl status' health view: every static instance up in both gateways.
    let mut status = cp.status().await.unwrap();
    status.add_health(None).await;
    assert!(
        status.unreachable_gateways.is_empty(),
        "{:?}",
        status.unreachable_gateways
    );
    let a_blue = topo
        .of("cell-a")
        .find(|b| b.colour == "blue")
        .unwrap()
        .addr
        .to_string();
    let h = &status.health["cell-a/blue"][&a_blue];
    assert_eq!((h.up_in, h.seen_by), (2, 2));
    assert!(status.summary().contains("up in 2/2 gateways"));

    // cellctl failover / failback (the same edit + CAS apply) move cell-c's users.
    let c_user = (0..1000)
        .map(|i| format!("c{i}"))
        .find(|u| routing_rules::hash::xxh64_slot(u.as_bytes(), 100) >= 66)
        .unwrap();
    let current = cp.get().await.unwrap().unwrap();
    let failed = routing_rules::edit::failover(&current.document, "cell-c", "cell-b").unwrap();
    assert_eq!(cp.apply(&failed, 3, "sre", "drill").await.unwrap(), 4);
    wait_revision(&g1, 4).await;
    let r = get_user(&client, g1.proxy_addr, &c_user).await.unwrap();
    assert_eq!(
        (r.json["cell"].as_str(), r.json["stamp_home"].as_str()),
        (Some("cell-b"), Some("cell-c"))
    );
    let back = routing_rules::edit::failback(&failed, "cell-c").unwrap();
    assert_eq!(cp.apply(&back, 4, "sre", "drill over").await.unwrap(), 5);
    wait_revision(&g1, 5).await;
    let r = get_user(&client, g1.proxy_addr, &c_user).await.unwrap();
    assert_eq!(r.json["cell"], "cell-c");
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "requests failed during the etcd outage: {failed:?}"
    );
    assert!(ok > 50, "the load ran ({ok})");

    // A registered instance joins routing; when its lease lapses it leaves.
    let extra = Backend::start("cell-a", "blue").await;
    let key = cp.keys().instance("cell-a", "blue", "extra-1");
    let value = serde_json::json!({"id": "extra-1", "cell": "cell-a", "colour": "blue", "address": extra.addr.to_string()}).to_string();
    let (_value_tx, value_rx) = tokio::sync::watch::channel(value);
    let (_never, never_rx) = tokio::sync::watch::channel(false);
    let registration = tokio::spawn(routing_rules::etcd::keep_registered(
        vec![etcd.url.clone()],
        "gw-test".into(),
        key,
        value_rx,
        1,
        |_| {},
        never_rx,
    ));
    let blue_a: Vec<String> = (0..5000)
        .map(|i| format!("ba{i}"))
        .filter(|u| routing_rules::hash::xxh64_slot(u.as_bytes(), 100) <= 32)
        .take(40)
        .collect();
    wait_until(
        "the registered instance to receive traffic",
        Duration::from_secs(10),
        || {
            let (client, users, addr) = (client.clone(), blue_a.clone(), g1.proxy_addr);
            let seen = extra.requests.clone();
            async move {
                for u in &users {
                    let _ = get_user(&client, addr, u).await;
                }
                seen.load(Ordering::SeqCst) > 0
            }
        },
    )
    .await;
    // The agent dies without revoking: the lease (1 s) lapses.
    registration.abort();
    let n = extra.requests.clone();
    wait_until(
        "the lapsed instance to leave routing",
        Duration::from_secs(10),
        || {
            let (client, users, addr, n) =
                (client.clone(), blue_a.clone(), g1.proxy_addr, n.clone());
            async move {
                let before = n.load(Ordering::SeqCst);
                for u in &users {
                    let _ = get_user(&client, addr, u).await;
                }
                n.load(Ordering::SeqCst) == before
            }
        },
    )
    .await;
    assert!(
        failed.is_empty(),
        "requests failed during the etcd outage: {failed:?}"
    );
    assert!(ok > 50, "the load ran ({ok})");
    drop(check);
    g1.shutdown().await;
    g2.shutdown().await;
}
