//! An instance that freezes (a SIGSTOPped process: it neither answers
//! nor closes) while requests wait for its answer: once the gateway's
//! health checks find it down, those requests stop waiting — an
//! idempotent one is sent to the other colour of the same cell, a write
//! is answered 502 `upstream_lost` (its outcome unknown: the client sends
//! it again with its idempotency key) — instead of holding the client and
//! the cell's in-flight slot until the request timeout. Real backends, a
//! real gateway, real sockets.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_waiting_on_a_frozen_instance_stop_waiting_when_health_finds_it_down() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("frozen");
    let rules = dir.0.join("rules.toml");
    let text = topo.rules([0, 0, 0], "");
    std::fs::write(&rules, &text).unwrap();
    let mut cfg = fast_config(rules.clone());
    cfg.request_timeout_ms = 20_000;
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    let client = client();
    let proxy = gw.proxy_addr;
    let user = user_of(&text, "cell-a", 0);
    // Served by cell-a's blue instance while it runs.
    let r = get_user(&client, proxy, &user).await.unwrap();
    assert_eq!(
        (r.status.as_u16(), r.json["colour"].as_str()),
        (200, Some("blue"))
    );

    let blue = topo.of("cell-a").find(|b| b.colour == "blue").unwrap();
    blue.mode.store(FROZEN, Ordering::Relaxed);
    let started = Instant::now();
    let read = tokio::spawn({
        let (client, user) = (client.clone(), user.clone());
        async move { (get_user(&client, proxy, &user).await, started.elapsed()) }
    });
    let write = tokio::spawn({
        let (client, user) = (client.clone(), user.clone());
        async move {
            let req = http::Request::post(format!("http://{proxy}/v1/accounts/{user}/deposits"))
                .header("x-user-id", &user)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(
                    r#"{"amount": 5, "idempotency_key": "frozen-1"}"#,
                )))
                .unwrap();
            (send(&client, req).await, started.elapsed())
        }
    });

    let (read, read_took) = read.await.unwrap();
    let read = read.unwrap();
    assert_eq!(read.status, 200, "{}", read.json);
    assert_eq!(read.json["cell"], "cell-a", "{}", read.json);
    assert_eq!(
        read.json["colour"], "green",
        "sent again to the other colour"
    );
    let (write, write_took) = write.await.unwrap();
    let write = write.unwrap();
    assert_eq!(write.status, 502, "{}", write.json);
    assert_eq!(write.json["error"], "upstream_lost", "{}", write.json);
    // Health (every 50 ms, 200 ms timeout, down after 2 failures) finds it
    // down well within a second or two; the request timeout is 20 s.
    for took in [read_took, write_took] {
        assert!(
            took < Duration::from_secs(5),
            "waited {took:?}: not released when health found the instance down"
        );
    }
    let metrics = parse_metrics(&gw.control.metrics().encode());
    let lost = metrics
        .iter()
        .filter(|(k, _)| {
            k.starts_with("cellgate_upstream_errors_total") && k.contains("kind=\"lost\"")
        })
        .map(|(_, v)| *v)
        .sum::<f64>();
    assert_eq!(lost, 2.0, "{metrics:?}");

    // Woken, it serves again once health sees it up.
    blue.mode.store(NORMAL, Ordering::Relaxed);
    wait_until(
        "cell-a blue is served again",
        Duration::from_secs(10),
        || {
            let (client, user) = (client.clone(), user.clone());
            async move {
                get_user(&client, proxy, &user)
                    .await
                    .is_ok_and(|r| r.json["colour"] == "blue")
            }
        },
    )
    .await;
    gw.shutdown().await;
}
