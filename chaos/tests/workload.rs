//! The recording client against a real topology (the demo), with a
//! switchover of cell-a's shard to cell-b and back in the middle: every
//! acknowledged write is in the ledgers exactly once afterwards — and a
//! write removed from a ledger is named as lost. Same seed, same writes.

use std::time::Duration;

use chaos::demo::{Demo, DemoConfig};
use chaos::workload::{run, verify, Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_switchover_and_a_missing_one_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("demo");
    let cfg = DemoConfig {
        data_dir: Some(data.clone()),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        smoke: false,
        smoke_users: 2,
        etcd: None,
        processes: false,
    };
    let demo = Demo::start(&cfg).await.unwrap();
    let w = Workload {
        max_writes: 2_000,
        retry_for: Duration::from_secs(5),
        ..Workload::deposits(
            demo.gateway.proxy_addr,
            4,
            Duration::from_millis(1500),
            40,
            7,
        )
    };
    // Move cell-a's shard to cell-b and back while the clients write (a
    // fault timeline: at 400 ms).
    let secret = routing_rules::auth::ClusterSecret::from_file(&demo.secret_path).unwrap();
    let rules = demo.rules_path.clone();
    let moves = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        for to in ["cell-b", "cell-a"] {
            let req = routing_rules::switchover::Request {
                rules: rules.clone(),
                cell: "cell-a".into(),
                to: to.into(),
                catch_up_timeout: Duration::from_secs(5),
                etcd: None,
            };
            let out = routing_rules::switchover::run(&req, secret.clone())
                .await
                .unwrap();
            assert_eq!(out.result, "switched", "to {to}");
        }
    });
    let writes = run(&w).await.ops;
    moves.await.unwrap();
    demo.stop().await;

    let acked = writes.iter().filter(|x| x.acked_ms.is_some()).count();
    assert!(acked > 50, "{acked} of {}", writes.len());
    let report = verify(&data, &writes).unwrap();
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.acked, acked);
    // Replayable: the same seed gives the same first writes.
    assert!(writes.iter().any(|x| x.key == "chaos-7-0-0"));

    // An acknowledged write taken out of its ledger is named as lost.
    let victim = writes.iter().find(|x| x.acked_ms.is_some()).unwrap();
    for file in ["cell-a.db", "cell-b.db", "cell-c.db"] {
        let c = rusqlite::Connection::open(data.join(file)).unwrap();
        c.execute("DELETE FROM ledger WHERE ref = ?1", [&victim.key])
            .unwrap();
    }
    let report = verify(&data, &writes).unwrap();
    assert_eq!(report.lost, vec![victim.key.clone()], "{report:?}");
}
