//! Propagation benchmark: time from a rules apply returning (compare-and-
//! swap in etcd, as `cellctl rules apply` does) to every one of 3 gateways
//! serving the new revision. Real etcd on loopback, gateways in this process.
//!
//!   cargo bench -p gateway --bench propagation
//!
//! Needs Debian's etcd-server. Figures: docs/benchmarks.md.

use std::time::{Duration, Instant};

use routing_rules::etcd::testing::EtcdServer;
use routing_rules::etcd::ControlPlane;

fn rules(green: u32) -> String {
    let mut s = String::from("slots = 100\n");
    for (i, c) in ["cell-a", "cell-b", "cell-c"].iter().enumerate() {
        s.push_str(&format!(
            "[cells.{c}]\nblue = [\"127.0.0.1:{}\"]\ngreen = [\"127.0.0.1:{}\"]\nsplit = {{ green = {green}, seed = 1 }}\n",
            20 + 2 * i,
            21 + 2 * i
        ));
    }
    s.push_str("[[ranges]]\nfrom = 0\nto = 32\ncell = \"cell-a\"\n[[ranges]]\nfrom = 33\nto = 65\ncell = \"cell-b\"\n[[ranges]]\nfrom = 66\nto = 99\ncell = \"cell-c\"\n");
    s
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let applies: u64 = if quick { 5 } else { 100 };
    let etcd = EtcdServer::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut samples = rt.block_on(async {
        let mut cp = ControlPlane::connect(std::slice::from_ref(&etcd.url), "bench")
            .await
            .unwrap();
        cp.apply(&rules(0), 0, "bench", "initial").await.unwrap();
        let mut gateways = Vec::new();
        for i in 0..3 {
            let mut cfg = gateway::ServeConfig::for_tests("unused".into());
            cfg.rules = None;
            cfg.etcd = Some(etcd.url.clone());
            cfg.cluster = "bench".into();
            cfg.gateway_id = Some(format!("g{i}"));
            cfg.health_interval_ms = 60_000;
            gateways.push(
                gateway::start(cfg, prometheus::Registry::new())
                    .await
                    .unwrap(),
            );
        }
        // Warm-up: every gateway has its watch established once it shows
        // up in the registrations at revision 1.
        loop {
            let s = cp.status().await.unwrap();
            if s.gateways.len() == 3 && s.all_current() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut samples = Vec::new();
        for rev in 1..=applies {
            let text = rules(((rev * 37) % 10_000) as u32);
            let r = cp.apply(&text, rev, "bench", "step").await.unwrap();
            let applied = Instant::now();
            loop {
                if gateways
                    .iter()
                    .all(|g| g.control.current().table.revision() == r)
                {
                    break;
                }
                assert!(
                    applied.elapsed() < Duration::from_secs(10),
                    "revision {r} never arrived"
                );
                tokio::time::sleep(Duration::from_micros(100)).await;
            }
            samples.push(applied.elapsed());
            if std::env::var_os("PROPAGATION_TRACE").is_some() {
                eprintln!("apply {rev}: {:?}", applied.elapsed());
            }
        }
        for g in gateways {
            g.shutdown().await;
        }
        samples
    });
    samples.sort();
    let pct = |p: f64| {
        samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)].as_secs_f64() * 1000.0
    };
    println!(
        "propagation to 3 gateways over {} applies: median {:.2} ms, p99 {:.2} ms, max {:.2} ms (polled every 0.1 ms)",
        samples.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}
