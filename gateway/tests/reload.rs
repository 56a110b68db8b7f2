//! The rules file is watched through the file system's change events:
//! with the poll set to a minute, an edit (an atomic replace, as `cellctl`
//! and `mv` do) still reaches the gateway at once.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_is_served_at_once_without_waiting_for_the_poll() {
    let topo = Topology::start(1).await;
    let dir = TempDir::new("reload-events");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, topo.rules([0, 0, 0], "")).unwrap();
    let mut cfg = fast_config(rules.clone());
    cfg.reload_interval_ms = 60_000;
    let gw = gateway::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    // (An edit made before the watcher's first look is caught by that look:
    // it compares the text.)
    for share in [500, 2500] {
        let t0 = Instant::now();
        let rev = routing_rules::switchover::edit_rules_file(&rules, |t| {
            Ok(routing_rules::edit::set_split(t, "cell-a", share)?)
        })
        .unwrap()
        .unwrap();
        let control = gw.control.clone();
        wait_until("the edit served", Duration::from_secs(5), || {
            let c = control.clone();
            async move { c.current().table.revision() == rev }
        })
        .await;
        eprintln!("revision {rev} served after {:?}", t0.elapsed());
    }
}
