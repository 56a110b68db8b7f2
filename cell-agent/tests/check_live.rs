//! `check` on a file its writer is committing to (a drill's live watch):
//! every query of one check sees the same snapshot. Real SQLite file.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cell_agent::store::sqlite::SqliteStore;
use cell_agent::store::{Store, WriteOp};
use support::TempDir;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_checked_while_it_is_written_shows_no_violation() {
    let dir = TempDir::new("check-live");
    let db = dir.path("a.db");
    let store = Arc::new(SqliteStore::open(&db, "cell-a").unwrap());
    store
        .write(WriteOp::ClaimSlots {
            ranges: vec![(0, 9)],
        })
        .await
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, done) = (store.clone(), done.clone());
        tokio::spawn(async move {
            for round in 0..100 {
                let writes = (0..8).map(|i| {
                    store.write(WriteOp::Deposit {
                        user: format!("u{i}"),
                        amount: 10 + i,
                        key: format!("k{round}-{i}"),
                        slot: i as u32,
                        at: None,
                    })
                });
                for r in futures_util::future::join_all(writes).await {
                    r.unwrap();
                }
            }
            done.store(true, Ordering::SeqCst);
        })
    };
    let checker = {
        let (db, done) = (db.clone(), done.clone());
        tokio::task::spawn_blocking(move || {
            let mut checks = 0;
            while !done.load(Ordering::SeqCst) {
                let report = cell_agent::check::check(&db).unwrap();
                assert!(report.ok(), "check {checks}: {:?}", report.violations);
                checks += 1;
            }
            checks
        })
    };
    writer.await.unwrap();
    let checks = checker.await.unwrap();
    assert!(checks > 0, "no check ran while the writes went on");
    let report = cell_agent::check::check(&db).unwrap();
    assert!(report.ok(), "{:?}", report.violations);
    assert_eq!(report.ledger_entries, 800);
}
