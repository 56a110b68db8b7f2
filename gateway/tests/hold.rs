//! A request held after a 421 is routed again when the gateway's health
//! checks see an instance come back, not only when newer rules arrive: a
//! cell whose instances were down (its users served by its backup, which
//! answers 421: their data is not there) comes back up — as after a
//! failback, when the rules already name the cell — and the held request
//! goes home at once instead of waiting out --hold-ms. Real backends,
//! a real gateway, real sockets.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_goes_home_when_its_cell_comes_back_up() {
    let topo = Topology::start(1).await;
    for b in topo.of("cell-b") {
        b.mode.store(MISDIRECTED, Ordering::Relaxed);
    }
    let dir = TempDir::new("hold-health");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, topo.rules([0, 0, 0], "")).unwrap();
    let mut cfg = fast_config(rules.clone());
    cfg.hold_ms = 10_000;
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    // cell-a goes down: its users are sent to cell-b, which refuses them.
    for b in topo.of("cell-a") {
        b.kill();
    }
    let client = client();
    let admin = gw.admin_addr;
    wait_until(
        "the gateway sees cell-a down",
        Duration::from_secs(10),
        || {
            let client = client.clone();
            async move {
                get(&client, format!("http://{admin}/admin/health"), &[])
                    .await
                    .is_ok_and(|r| r.json["cells"]["cell-a"]["serving_cell"] == "cell-b")
            }
        },
    )
    .await;
    // A user of cell-a (slot 0..=32).
    let rules_now = routing_rules::parse_rules(&std::fs::read_to_string(&rules).unwrap()).unwrap();
    let user = (0..)
        .map(|i| format!("user-{i}"))
        .find(|u| {
            routing_rules::hash::slot_of(rules_now.hash, u.as_bytes(), rules_now.slots)
                .is_ok_and(|s| s <= 32)
        })
        .unwrap();
    let before: usize = topo
        .of("cell-b")
        .map(|b| b.requests.load(Ordering::SeqCst))
        .sum();
    let proxy = gw.proxy_addr;
    let held = tokio::spawn({
        let (client, user) = (client.clone(), user.clone());
        async move {
            let t = Instant::now();
            (get_user(&client, proxy, &user).await, t.elapsed())
        }
    });
    // It reached cell-b, got 421 and is held now; cell-a comes back.
    wait_until(
        "cell-b refused the request",
        Duration::from_secs(10),
        || {
            let n: usize = topo
                .of("cell-b")
                .map(|b| b.requests.load(Ordering::SeqCst))
                .sum();
            async move { n > before }
        },
    )
    .await;
    let back: Vec<_> = {
        let mut v = Vec::new();
        for b in topo.of("cell-a") {
            v.push(b.restart().await);
        }
        v
    };
    let (reply, took) = held.await.unwrap();
    let reply = reply.unwrap();
    assert_eq!(reply.status, 200, "{}", reply.json);
    assert_eq!(reply.json["cell"], "cell-a", "{}", reply.json);
    assert!(
        took < Duration::from_secs(5),
        "held {took:?}: released by the health change, not by --hold-ms (10 s)"
    );
    let metrics = gw.control.metrics().encode();
    assert_eq!(
        parse_metrics(&metrics).get("cellgate_held_requests_total{outcome=\"released\"}"),
        Some(&1.0),
        "{metrics}"
    );
    drop(back);
    gw.shutdown().await;
}
