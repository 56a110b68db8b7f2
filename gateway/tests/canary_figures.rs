//! The canary figures of docs/benchmarks.md, measured through real
//! gateways (ignored: run by hand, in release).

mod support;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::canary::*;
use support::*;

/// The figure of docs/benchmarks.md ("Canary split accuracy"): 100 000
/// distinct users, one request each, through a real gateway at each step's
/// share; the share of requests green answered. `cargo test --release -p
/// gateway --test canary_figures split_accuracy -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand for docs/benchmarks.md"]
async fn split_accuracy_over_100k_users() {
    let s = setup("canary-accuracy").await;
    let users = Arc::new(users_of_a(
        &std::fs::read_to_string(&s.rules).unwrap(),
        100_000,
    ));
    for share in [100, 500, 2500, 5000] {
        let rev = routing_rules::switchover::edit_rules_file(&s.rules, |t| {
            Ok(routing_rules::edit::set_split(t, "cell-a", share)?)
        })
        .unwrap()
        .unwrap();
        let sources =
            routing_rules::canary::sources::Sources::new("cell-a", &s.metrics, None).unwrap();
        while sources.read().await.unwrap().revision < Some(rev) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let count = |colour: &str| -> usize {
            s.topo
                .of("cell-a")
                .filter(|b| b.colour == colour)
                .map(|b| b.requests.load(Ordering::SeqCst))
                .sum()
        };
        let (g0, b0) = (count("green"), count("blue"));
        let tasks: Vec<_> = (0..16)
            .map(|i| {
                let (users, proxy) = (users.clone(), s.proxies[0]);
                tokio::spawn(async move {
                    let client = client();
                    for u in users.iter().skip(i).step_by(16) {
                        let _ = get_user(&client, proxy, u).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let (g, b) = (count("green") - g0, count("blue") - b0);
        let got = g as f64 / (g + b) as f64 * 100.0;
        let want = share as f64 / 100.0;
        println!(
            "green {want:>4.1} %: {g} of {} requests green = {got:.2} % ({:+.2} points)",
            g + b,
            got - want
        );
        assert!((got - want).abs() <= 1.0);
    }
}

/// The figures of docs/benchmarks.md ("Canary abort propagation"): how
/// long after the rules file is written with green 0 % every one of two
/// gateways (the default `--reload-interval-ms 200`) runs it, over 50
/// aborts. `cargo test --release -p gateway --test canary_figures -- --ignored
/// --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run by hand for docs/benchmarks.md"]
async fn abort_propagation_figures() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("canary-propagation");
    let rules = dir.0.join("rules.toml");
    std::fs::write(&rules, topo.rules([0, 0, 0], "")).unwrap();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let mut cfg = fast_config(rules.clone());
        cfg.reload_interval_ms = 200;
        gateways.push(
            gateway::start(cfg, prometheus::Registry::new())
                .await
                .unwrap(),
        );
    }
    let metrics: Vec<String> = gateways
        .iter()
        .map(|g| format!("http://{}/metrics", g.admin_addr))
        .collect();
    let sources = routing_rules::canary::sources::Sources::new("cell-a", &metrics, None).unwrap();
    let mut ms = Vec::new();
    for i in 0..100 {
        let share = if i % 2 == 0 { 500 } else { 0 };
        let t0 = Instant::now();
        let rev = routing_rules::switchover::edit_rules_file(&rules, |t| {
            Ok(routing_rules::edit::set_split(t, "cell-a", share)?)
        })
        .unwrap()
        .unwrap();
        loop {
            if sources.read().await.unwrap().revision >= Some(rev) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if share == 0 {
            ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        // Not in step with the gateways' polling.
        tokio::time::sleep(Duration::from_millis(37 + (i * 13 % 97) as u64)).await;
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).min(ms.len()) - 1];
    println!(
        "abort → every gateway runs green 0 %: n={} p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        ms.len(),
        at(0.5),
        at(0.99),
        ms[ms.len() - 1]
    );
    assert!(at(0.99) < 1000.0);
}
