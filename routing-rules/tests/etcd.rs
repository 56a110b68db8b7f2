//! The control plane against a real etcd (Debian's etcd-server), started on
//! free loopback ports with a temporary data dir. Needs the `etcd` feature.
#![cfg(feature = "etcd")]

use std::process::{Command, Output};
use std::time::Duration;

use routing_rules::etcd::{ControlError, ControlPlane};
use routing_rules::parse_rules;

use routing_rules::etcd::testing::EtcdServer as Etcd;

const DOC: &str = include_str!("../../examples/cells.toml");

async fn cp(e: &Etcd, cluster: &str) -> ControlPlane {
    ControlPlane::connect(std::slice::from_ref(&e.url), cluster)
        .await
        .unwrap()
}

#[tokio::test]
async fn apply_get_conflict_history_rollback() {
    let e = Etcd::start();
    let mut c = cp(&e, "test").await;
    assert!(c.get().await.unwrap().is_none());
    assert_eq!(c.apply(DOC, 0, "ann@host", "first").await.unwrap(), 1);
    let stored = c.get().await.unwrap().unwrap();
    assert_eq!(stored.document, DOC, "stored verbatim");
    assert_eq!(stored.revision, 1);
    let v2 = DOC.replace("green = \"10%\"", "green = \"20%\"");
    assert_eq!(c.apply(&v2, 1, "bob@host", "more green").await.unwrap(), 2);
    // A second engineer still at revision 1: conflict, nothing written.
    let v3 = DOC.replace("green = \"10%\"", "green = \"30%\"");
    match c.apply(&v3, 1, "carl@host", "stale").await {
        Err(ControlError::Conflict {
            expected: 1,
            current: 2,
        }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(c.get().await.unwrap().unwrap().document, v2);
    // Invalid documents are refused before anything is written.
    assert!(matches!(
        c.apply("slots = 0", 2, "x", "bad").await,
        Err(ControlError::Invalid(_))
    ));
    let h = c.history().await.unwrap();
    assert_eq!(h.iter().map(|e| e.revision).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(
        (h[1].applied_by.as_str(), h[1].message.as_str()),
        ("bob@host", "more green")
    );
    // Rollback = re-apply an old document as a new revision.
    let old = c.history_entry(1).await.unwrap();
    assert_eq!(
        c.apply(&old.document, 2, "ann@host", "rollback")
            .await
            .unwrap(),
        3
    );
    assert_eq!(c.get().await.unwrap().unwrap().document, DOC);
    // Clusters are separate.
    assert!(cp(&e, "other").await.get().await.unwrap().is_none());
}

fn cellctl(e: &Etcd, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellctl"))
        .args(args)
        .env("CELLGATE_ETCD", &e.url)
        .env("CELLGATE_CLUSTER", "ops")
        .output()
        .unwrap()
}

#[tokio::test]
async fn cellctl_online_commands() {
    let e = Etcd::start();
    let dir = std::env::temp_dir().join(format!("cellctl-online-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("rules.toml");
    std::fs::write(&file, DOC).unwrap();
    let f = file.to_str().unwrap();

    let o = cellctl(&e, &["rules", "apply", f, "-m", "initial"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("applied revision 1"));
    let o = cellctl(&e, &["rules", "get"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), DOC);

    // A stale --expect-revision is a conflict (exit 1) and changes nothing.
    let o = cellctl(&e, &["rules", "apply", f, "--expect-revision", "7"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("conflict"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Shortcuts go through the same validated CAS path.
    assert!(
        cellctl(&e, &["split", "cell-c", "--green", "5", "-m", "canary 5%"])
            .status
            .success()
    );
    assert!(cellctl(&e, &["failover", "cell-c", "--to", "cell-b"])
        .status
        .success());
    let o = cellctl(&e, &["route", "-o", "json", "alice"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v[0]["home_cell"].as_str(), v[0]["serving_cell"].as_str()),
        (Some("cell-c"), Some("cell-b"))
    );
    assert_eq!(v[0]["revision"], 3);
    assert!(cellctl(&e, &["failback", "cell-c"]).status.success());
    // A no-op makes no revision: failback of an active cell, "no changes".
    let before = cellctl(&e, &["rules", "history", "-o", "json"]).stdout;
    let o = cellctl(&e, &["failback", "cell-c"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("no changes"));
    assert_eq!(
        cellctl(&e, &["rules", "history", "-o", "json"]).stdout,
        before
    );
    assert!(
        cellctl(&e, &["override", "set", "alice", "--cell", "cell-a"])
            .status
            .success()
    );
    let o = cellctl(&e, &["route", "-o", "json", "alice"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (v[0]["serving_cell"].as_str(), v[0]["reason"].as_str()),
        (Some("cell-a"), Some("override"))
    );
    assert!(cellctl(&e, &["override", "rm", "alice"]).status.success());

    // Bad edits: precise error, exit 1, nothing written.
    let before = cellctl(&e, &["rules", "get", "-o", "json"]).stdout;
    for bad in [
        &["split", "cell-z", "--green", "5"][..],
        &["split", "cell-a", "--green", "150"],
        &["failover", "cell-a", "--to", "cell-a"],
        &["override", "rm", "nobody"],
    ] {
        let o = cellctl(&e, bad);
        assert_eq!(o.status.code(), Some(1), "{bad:?}");
        assert!(!o.stderr.is_empty());
    }
    assert_eq!(cellctl(&e, &["rules", "get", "-o", "json"]).stdout, before);

    let o = cellctl(&e, &["rules", "history", "-o", "json"]);
    let h: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(h.as_array().unwrap().len(), 6);
    assert_eq!(h[1]["message"], "canary 5%");
    assert_eq!(
        parse_rules(h[1]["document"].as_str().unwrap())
            .unwrap()
            .cells["cell-c"]
            .split
            .green,
        500
    );
    assert!(cellctl(&e, &["rules", "rollback", "1"]).status.success());
    assert_eq!(
        String::from_utf8_lossy(&cellctl(&e, &["rules", "get"]).stdout),
        DOC
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A TCP forwarder to etcd that the test can cut and restore, to make a
/// follower lose its connection while etcd itself stays up.
struct Cut {
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    epoch: tokio::sync::watch::Sender<u64>,
    url: String,
}

impl Cut {
    async fn start(target: &str) -> Cut {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let target = target.trim_start_matches("http://").to_string();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (epoch, epoch_rx) = tokio::sync::watch::channel(0u64);
        let o = open.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                if !o.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // dropped: connection refused-ish
                }
                let target = target.clone();
                let mut cut = epoch_rx.clone();
                let started = *cut.borrow();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = async { while *cut.borrow() == started { if cut.changed().await.is_err() { break } } } => {}
                    }
                });
            }
        });
        Cut { open, epoch, url }
    }
    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }
    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_resumes_after_a_disconnect_and_rereads_after_a_compaction() {
    let e = Etcd::start();
    let proxy = Cut::start(&e.url).await;
    let mut c = cp(&e, "f").await;
    c.apply(DOC, 0, "t", "1").await.unwrap();
    let (seen_tx, mut seen_rx) = tokio::sync::watch::channel(0u64);
    let (_stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let follower = tokio::spawn(routing_rules::etcd::follow_rules(
        vec![proxy.url.clone()],
        "f".into(),
        move |s| {
            let _ = seen_tx.send(s.revision);
        },
        |_| {},
        stop_rx,
    ));
    let wait_for = |rx: &mut tokio::sync::watch::Receiver<u64>, rev: u64| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|r| *r == rev))
                .await
                .unwrap_or_else(|_| panic!("the follower never saw revision {rev}"))
                .unwrap();
        }
    };
    wait_for(&mut seen_rx, 1).await;
    c.apply(
        &DOC.replace("green = \"10%\"", "green = \"11%\""),
        1,
        "t",
        "2",
    )
    .await
    .unwrap();
    wait_for(&mut seen_rx, 2).await;
    // Cut the follower off; meanwhile two changes land and etcd compacts
    // its history past the revision the follower would resume from.
    proxy.cut();
    c.apply(
        &DOC.replace("green = \"10%\"", "green = \"12%\""),
        2,
        "t",
        "3",
    )
    .await
    .unwrap();
    c.apply(
        &DOC.replace("green = \"10%\"", "green = \"13%\""),
        3,
        "t",
        "4",
    )
    .await
    .unwrap();
    let head = c
        .client()
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    c.client().compact(head, None).await.unwrap();
    proxy.restore();
    wait_for(&mut seen_rx, 4).await;
    // And it keeps following.
    c.apply(DOC, 4, "t", "5").await.unwrap();
    wait_for(&mut seen_rx, 5).await;
    follower.abort();
}

#[tokio::test]
async fn replication_status_reads_the_recorded_states() {
    let e = Etcd::start();
    // A cluster without rules (e.g. a mistyped --cluster): said, named, exit 1.
    let o = cellctl_in(&e, "nosuch", &["status"]);
    assert_eq!(o.status.code(), Some(1));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("cluster nosuch: no rules in etcd"), "{out}");
    assert!(!out.contains("every gateway runs"), "{out}");
    let mut c = cp(&e, "repl").await;
    // Nothing recorded: said, exit 1.
    let o = cellctl_in(&e, "repl", &["replication", "status"]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout)
        .contains("no shard replication is recorded in cluster repl"));
    let record = |state: &str| {
        serde_json::json!({"cell": "cell-a", "standby": "cell-b", "state": state,
            "since_ms": 1, "acked_lsn": 42, "updated_ms": 2})
    };
    c.put_replication("cell-a", &record("in-sync"))
        .await
        .unwrap();
    let o = cellctl_in(&e, "repl", &["replication", "status"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("cell-a → standby cell-b: in-sync"), "{text}");
    assert!(text.contains("acknowledged LSN 42"), "{text}");
    c.put_replication("cell-a", &record("degraded"))
        .await
        .unwrap();
    let o = cellctl_in(&e, "repl", &["replication", "status", "-o", "json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["cell-a"]["state"], "degraded");
}

fn cellctl_in(e: &Etcd, cluster: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellctl"))
        .args(["--etcd", &e.url, "--cluster", cluster])
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn a_replicated_cell_fails_over_only_to_its_in_sync_standby() {
    let e = Etcd::start();
    let mut c = cp(&e, "fo").await;
    c.apply(DOC, 0, "t", "v1").await.unwrap();
    let record = |state: &str| {
        serde_json::json!({"cell": "cell-a", "standby": "cell-b", "state": state,
            "since_ms": 1, "acked_lsn": 7, "updated_ms": 2})
    };
    c.put_replication("cell-a", &record("degraded"))
        .await
        .unwrap();
    for (to, why) in [
        ("cell-b", "is recorded degraded"),
        ("cell-c", "is replicated to cell-b, not cell-c"),
    ] {
        let o = cellctl_in(&e, "fo", &["failover", "cell-a", "--to", to]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("refused") && err.contains(why), "{err}");
        assert_eq!(revision_of(&mut c).await, 1, "nothing changed");
    }
    // In sync: the standby takes the cell.
    c.put_replication("cell-a", &record("in-sync"))
        .await
        .unwrap();
    let o = cellctl_in(&e, "fo", &["failover", "cell-a", "--to", "cell-b"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(revision_of(&mut c).await, 2);
    // --force overrides, saying what it risks.
    let o = cellctl_in(&e, "fo", &["failback", "cell-a"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    c.put_replication("cell-a", &record("degraded"))
        .await
        .unwrap();
    let o = cellctl_in(
        &e,
        "fo",
        &["failover", "cell-a", "--to", "cell-b", "--force"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("warning"));
    assert_eq!(revision_of(&mut c).await, 4);
}

async fn revision_of(c: &mut ControlPlane) -> u64 {
    c.get().await.unwrap().unwrap().revision
}

#[test]
fn an_unreachable_etcd_is_one_line_that_says_what_to_do() {
    let o = Command::new(env!("CARGO_BIN_EXE_cellctl"))
        .args(["--etcd", "http://127.0.0.1:1", "status"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.len() < 300, "{err}");
    assert!(
        err.contains("cannot reach etcd at http://127.0.0.1:1 (connection refused)"),
        "{err}"
    );
    assert!(err.contains("--etcd"), "{err}");
}
