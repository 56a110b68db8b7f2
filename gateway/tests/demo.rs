//! `cellgate demo`: the whole system in one process, and its smoke checks.

use gateway::demo::{check_served_by, Demo, DemoConfig, SmokeReport};
use routing_rules::{parse_rules, RoutingTable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_smoke_workload_passes() {
    let cfg = DemoConfig {
        data_dir: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        smoke: true,
        smoke_users: 30,
    };
    let demo = Demo::start(&cfg).await.unwrap();
    demo.seed().await.unwrap();
    let banner = demo.banner();
    assert!(banner.contains(&format!("http://{}", demo.gateway.proxy_addr)));
    assert!(banner.contains("cellctl route --rules"));
    let report = demo.smoke(30).await.unwrap();
    assert!(report.ok(), "{report:#?}");
    assert_eq!(report.requests, 30 * 7);
    assert!(
        report.cross_cell_transfers > 0 && report.local_transfers > 0,
        "{report:#?}"
    );
    let dir = demo.data_dir.clone();
    demo.stop().await;
    assert!(!dir.exists(), "the temporary data dir is removed");
}

#[test]
fn the_smoke_checks_catch_a_wrong_cell_and_missing_money() {
    let t = RoutingTable::compile(parse_rules(gateway::demo::DEMO_RULES).unwrap(), 0).unwrap();
    // alice's home is cell-c (docs/hash.md: slot 89).
    assert!(check_served_by(&t, "alice", "cell-c").is_ok());
    let err = check_served_by(&t, "alice", "cell-a").unwrap_err();
    assert!(err.contains("home cell is cell-c"), "{err}");
    // vip-42 is pinned to cell-b by an override.
    assert!(check_served_by(&t, "vip-42", "cell-b").is_ok());
    let good = SmokeReport {
        deposited: 100,
        paid: 10,
        total: 90,
        ..Default::default()
    };
    assert!(good.ok());
    let missing = SmokeReport {
        deposited: 100,
        paid: 10,
        total: 89,
        ..Default::default()
    };
    assert!(!missing.ok());
    let misrouted = SmokeReport {
        wrong_cell: vec!["x".into()],
        ..good.clone()
    };
    assert!(!misrouted.ok());
}
