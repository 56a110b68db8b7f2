//! `cellchaos check --data-dir DIR` on the files of a real topology (the
//! demo: 3 cells x 2 colours, every shard replicated to its standby, a
//! workload with cross-cell transfers, then its drill: a switchover of
//! cell-a and back, and a kill-based failover of cell-a to cell-b), then on
//! copies of them broken in the ways a bad failover would break them. Runs
//! the real binary.

use std::path::Path;
use std::process::Command;

use chaos::demo::{Demo, DemoConfig};

fn cellchaos(dir: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cellchaos"))
        .args(["check", "-o", "json", "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn sql(db: &Path, statement: &str) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch(statement).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_topology_checks_out_and_broken_copies_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("demo");
    let cfg = DemoConfig {
        data_dir: Some(data.clone()),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin: "127.0.0.1:0".parse().unwrap(),
        smoke: true,
        smoke_users: 20,
        etcd: None,
        processes: false,
    };
    let demo = Demo::start(&cfg).await.unwrap();
    demo.seed().await.unwrap();
    let smoke = demo.smoke(20).await.unwrap();
    assert!(smoke.ok(), "{smoke:#?}");
    let mut demo = demo;
    let drill = demo.drill().await.unwrap();
    assert!(drill.lost.is_empty(), "{:?}", drill.lost);
    demo.stop().await;

    let (code, out, err) = cellchaos(&data);
    assert_eq!(code, 0, "{out}{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let copies = v["copies"].as_array().unwrap();
    let role_of = |file: &str| {
        copies
            .iter()
            .find(|c| c["path"].as_str().unwrap().ends_with(file))
            .map(|c| c["role"].as_str().unwrap().to_string())
    };
    // After the failover cell-a's shard is served from cell-b's copy; the
    // killed primary's own file is a stale copy, left out of the money.
    assert_eq!(
        role_of("/cell-a.replica.db").as_deref(),
        Some("primary"),
        "{out}"
    );
    assert_eq!(
        role_of("/cell-a.db").as_deref(),
        Some("stale-primary"),
        "{out}"
    );
    assert_eq!(
        role_of("/cell-b.replica.db").as_deref(),
        Some("replica"),
        "{out}"
    );
    assert!(
        v["notes"][0].as_str().unwrap().contains("stale primary"),
        "{out}"
    );
    assert!(v["transfers_matched"].as_u64().unwrap() > 0, "{out}");
    assert_eq!(
        v["primary_balance_total"].as_i64().unwrap() as i128,
        smoke.total + drill.deposited + drill.other_deposits as i128,
        "{out}"
    );

    // Two copies of cell-b taking writes on one history (split brain).
    let split = tmp.path().join("split-brain");
    copy_dir(&data, &split);
    sql(
        &split.join("cell-b.replica.db"),
        "DELETE FROM local WHERE key = 'role'",
    );
    let (code, out, _) = cellchaos(&split);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cell cell-b: 2 primary copies on one history"),
        "{out}"
    );

    // A balance that does not follow from the ledger.
    let minted = tmp.path().join("minted");
    copy_dir(&data, &minted);
    sql(
        &minted.join("cell-c.db"),
        "UPDATE accounts SET balance = balance + 1 WHERE user = (SELECT user FROM accounts LIMIT 1)",
    );
    let (code, out, _) = cellchaos(&minted);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("cell-c.db (cell-c primary): account "),
        "{out}"
    );

    // Nothing to check: exit 2 with the reason.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (code, _, err) = cellchaos(&empty);
    assert_eq!(code, 2);
    assert!(err.contains("no cell database"), "{err}");
}
