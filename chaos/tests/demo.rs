//! `cellgate demo`: the whole system in one process, and its smoke checks.

use chaos::demo::{check_served_by, Demo, DemoConfig, SmokeReport};
use routing_rules::{parse_rules, RoutingTable};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_smoke_workload_passes() {
    let cfg = DemoConfig {
        data_dir: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        smoke: true,
        smoke_users: 30,
        etcd: None,
        processes: false,
    };
    let demo = Demo::start(&cfg).await.unwrap();
    demo.seed().await.unwrap();
    let banner = demo.banner();
    assert!(banner.contains(&format!("http://{}", demo.gateway.proxy_addr)));
    assert!(banner.contains("cellctl route --rules"));
    // Writes need a JSON body type: every write the banner suggests says so.
    for line in banner.lines().filter(|l| l.contains("-XPOST")) {
        assert!(line.contains("content-type: application/json"), "{line}");
    }
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
    let t = RoutingTable::compile(parse_rules(chaos::demo::DEMO_RULES).unwrap(), 0).unwrap();
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

#[cfg(feature = "etcd")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_smoke_workload_passes_through_etcd() {
    let etcd = routing_rules::etcd::testing::EtcdServer::start();
    let cfg = DemoConfig {
        data_dir: None,
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        smoke: true,
        smoke_users: 20,
        etcd: Some(etcd.url.clone()),
        processes: false,
    };
    // The start returns once every agent holds its lease and takes
    // writes: the first deposit must not be refused as `fenced`.
    let demo = Demo::start(&cfg).await.unwrap();
    demo.seed().await.unwrap();
    let report = demo.smoke(20).await.unwrap();
    assert!(report.ok(), "{report:#?}");
    // The banner points at the control plane, not at the file.
    let banner = demo.banner();
    assert!(
        banner.contains(&format!(
            "cellctl --etcd {} --cluster demo status",
            etcd.url
        )),
        "{banner}"
    );
    assert!(!banner.contains("Edit "), "{banner}");
    let mut cp =
        routing_rules::etcd::ControlPlane::connect(std::slice::from_ref(&etcd.url), "demo")
            .await
            .unwrap();
    let status = cp.status().await.unwrap();
    assert_eq!(status.revision, 1);
    assert_eq!(status.gateways.len(), 1);
    assert_eq!(
        status
            .cells
            .values()
            .map(|c| c.registered.len())
            .sum::<usize>(),
        6
    );
    demo.stop().await;
}

/// A start that fails (here: the gateway's address is taken, after the
/// agents have started) stops what it started and removes the data
/// directory it created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_nothing_behind() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = std::env::temp_dir().join(format!("cellgate-demo-fail-{}", std::process::id()));
    let data_dir = base.join("data");
    let cfg = DemoConfig {
        data_dir: Some(data_dir.clone()),
        listen: taken.local_addr().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        smoke: false,
        smoke_users: 2,
        etcd: None,
        processes: false,
    };
    let err = Demo::start(&cfg).await.unwrap_err();
    assert!(
        format!("{err:#}").contains(&taken.local_addr().unwrap().to_string()),
        "{err:#}"
    );
    assert!(!data_dir.exists(), "the data dir it created is removed");
    let _ = std::fs::remove_dir_all(&base);
}
