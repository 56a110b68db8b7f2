//! The shard journal and its replica: every batch's rows are journaled in
//! the batch's own transaction, and a replica file that applies them batch
//! by batch holds exactly the primary's data. Real SQLite files.

mod support;

use std::path::Path;

use cell_agent::store::sqlite::journal::batches_after;
use cell_agent::store::sqlite::replica::{apply_batch, sync, ReplicaError};
use cell_agent::store::sqlite::SqliteStore;
use cell_agent::store::{OrderAction, SlotStamp, Store, WriteOp};
use rusqlite::types::Value as Sql;
use support::TempDir;

/// Every replicated table's rows, ordered by primary key.
fn dump(db: &Path) -> Vec<(String, Vec<Vec<Sql>>)> {
    let c = rusqlite::Connection::open(db).unwrap();
    let tables: Vec<String> = c
        .prepare(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'
             AND name NOT IN ('journal', 'journal_rows', 'schema_version', 'local') ORDER BY name",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    tables
        .into_iter()
        .map(|t| {
            let mut s = c
                .prepare(&format!("SELECT * FROM \"{t}\" ORDER BY 1, 2"))
                .unwrap();
            let n = s.column_count();
            let rows = s
                .query_map([], |r| (0..n).map(|i| r.get::<_, Sql>(i)).collect())
                .unwrap()
                .collect::<Result<Vec<Vec<Sql>>, _>>()
                .unwrap();
            (t, rows)
        })
        .collect()
}

fn at(slot: u32) -> Option<SlotStamp> {
    Some(SlotStamp { slot, epoch: 1 })
}

/// A mix of writes: deposits, orders tried/confirmed/cancelled, local
/// transfers, refused writes, a ban — `round` keeps keys apart.
async fn workload(store: &SqliteStore, round: u32) {
    let mut futs = Vec::new();
    for i in 0..40u32 {
        let user = format!("u{i}");
        futs.push(store.write(WriteOp::Deposit {
            user: user.clone(),
            amount: 100 + i64::from(i),
            key: format!("d{round}-{i}"),
            slot: i % 8,
            at: at(i % 8),
        }));
    }
    for r in futures_util::future::join_all(futs).await {
        r.unwrap();
    }
    for i in 0..20u32 {
        let user = format!("u{i}");
        let (_, order) = store
            .write(WriteOp::CreateOrder {
                user: user.clone(),
                amount: 5,
                merchant: "m".into(),
                key: format!("o{round}-{i}"),
                at: at(i % 8),
            })
            .await
            .unwrap();
        let id = order["id"].as_str().unwrap().to_string();
        for action in [
            OrderAction::Try,
            if i % 2 == 0 {
                OrderAction::Confirm
            } else {
                OrderAction::Cancel
            },
        ] {
            store
                .write(WriteOp::Order {
                    id: id.clone(),
                    user: user.clone(),
                    action,
                    at: at(i % 8),
                })
                .await
                .unwrap();
        }
        store
            .write(WriteOp::Transfer {
                from: user,
                to: format!("u{}", 39 - i),
                amount: 3,
                key: format!("t{round}-{i}"),
                to_cell: None,
                to_slot: (39 - i) % 8,
                at: at(i % 8),
                to_at: at((39 - i) % 8),
            })
            .await
            .unwrap();
    }
    // A refused write (not open) leaves nothing behind, on either side.
    assert!(store
        .write(WriteOp::Deposit {
            user: "x".into(),
            amount: 1,
            key: format!("x{round}"),
            slot: 60,
            at: at(60),
        })
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_applying_the_journal_holds_exactly_the_primary_data() {
    let dir = TempDir::new("replica");
    let (primary, replica) = (dir.path("cell-a.db"), dir.path("cell-a.replica.db"));
    cell_agent::store::sqlite::journal::enable(&primary).unwrap();
    let store = SqliteStore::open(&primary, "cell-a").unwrap();
    store
        .write(WriteOp::ClaimSlots {
            ranges: vec![(0, 15)],
        })
        .await
        .unwrap();
    workload(&store, 1).await;
    // First sync: a snapshot (the replica does not exist), then batches.
    let r = sync(&primary, &replica).unwrap();
    assert!(r.snapshot, "{r:?}");
    assert_eq!(dump(&primary), dump(&replica));
    workload(&store, 2).await;
    store
        .write(WriteOp::BanSlots {
            from: 8,
            to: 15,
            epoch: 2,
        })
        .await
        .unwrap();
    // Then only the new batches, in order.
    let r = sync(&primary, &replica).unwrap();
    assert!(!r.snapshot && r.batches > 10, "{r:?}");
    assert_eq!(dump(&primary), dump(&replica));
    let c = rusqlite::Connection::open(&primary).unwrap();
    let lsn: i64 = c
        .query_row(
            "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'lsn'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(r.lsn, lsn);
    // Nothing new: nothing applied.
    assert_eq!(sync(&primary, &replica).unwrap().batches, 0);
    // The replica is a consistent cell database.
    let report = cell_agent::check::check(&replica).unwrap();
    assert!(report.ok(), "{:?}", report.violations);
    assert!(report.ledger_entries > 100);

    // Batches apply once, in order: a repeat is skipped, a gap refused.
    let batches = batches_after(&c, lsn - 2, 10).unwrap();
    assert_eq!(batches.len(), 2);
    let mut dst = rusqlite::Connection::open(&replica).unwrap();
    assert!(!apply_batch(&mut dst, &batches[1]).unwrap());
    let mut ahead = batches[1].clone();
    ahead.lsn = lsn + 2;
    assert!(matches!(
        apply_batch(&mut dst, &ahead),
        Err(ReplicaError::Gap { have, got }) if have == lsn && got == lsn + 2
    ));
    assert_eq!(dump(&primary), dump(&replica));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_kept_journal_starts_again_from_a_snapshot() {
    let dir = TempDir::new("replicasnap");
    let (primary, replica) = (dir.path("cell-a.db"), dir.path("cell-a.replica.db"));
    cell_agent::store::sqlite::journal::enable(&primary).unwrap();
    let store = SqliteStore::open(&primary, "cell-a").unwrap();
    store
        .write(WriteOp::ClaimSlots {
            ranges: vec![(0, 15)],
        })
        .await
        .unwrap();
    workload(&store, 1).await;
    sync(&primary, &replica).unwrap();
    workload(&store, 2).await;
    // The primary forgets its oldest batches (as pruning does).
    {
        let c = rusqlite::Connection::open(&primary).unwrap();
        let max: i64 = c
            .query_row("SELECT MAX(lsn) FROM journal", [], |r| r.get(0))
            .unwrap();
        c.execute(
            "DELETE FROM journal_rows WHERE id < (SELECT first_id FROM journal WHERE lsn = ?1)",
            [max - 5],
        )
        .unwrap();
        c.execute("DELETE FROM journal WHERE lsn < ?1", [max - 5])
            .unwrap();
    }
    let r = sync(&primary, &replica).unwrap();
    assert!(r.snapshot, "{r:?}");
    assert_eq!(dump(&primary), dump(&replica));
    // The command line does the same.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cell-agent"))
        .args([
            "replica",
            "sync",
            "--from",
            primary.to_str().unwrap(),
            "--to",
            replica.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["batches"], 0);
    assert_eq!(v["snapshot"], false);
}

/// After a failover, the old primary's copy went on past the point where
/// the promoted copy's history began (its unacknowledged tail): it must
/// refuse the new primary's journal (a snapshot brings it back), while a
/// copy that is merely behind follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_with_a_diverged_tail_refuses_the_new_primary_journal() {
    use cell_agent::store::sqlite::journal::timeline;
    use cell_agent::store::sqlite::replica::Replicas;
    use cell_agent::store::sqlite::shard;
    let dir = TempDir::new("diverged");
    let (old, behind, promoted) = (
        dir.path("cell-a.db"),
        dir.path("behind/cell-a.replica.db"),
        dir.path("b/cell-a.replica.db"),
    );
    std::fs::create_dir_all(dir.path("behind")).unwrap();
    std::fs::create_dir_all(dir.path("b")).unwrap();
    cell_agent::store::sqlite::journal::enable(&old).unwrap();
    let store = SqliteStore::open(&old, "cell-a").unwrap();
    store
        .write(WriteOp::ClaimSlots {
            ranges: vec![(0, 15)],
        })
        .await
        .unwrap();
    workload(&store, 1).await;
    sync(&old, &promoted).unwrap();
    sync(&old, &behind).unwrap();
    // The old primary goes on (its tail never reaches the standby) ...
    workload(&store, 2).await;
    drop(store);
    // ... and the standby's copy is promoted (a failover) and takes writes.
    let since = shard::promote(&promoted, "cell-a", &[(0, 15, 2)]).unwrap();
    let new = SqliteStore::open(&promoted, "cell-a").unwrap();
    new.write(WriteOp::Deposit {
        user: "u1".into(),
        amount: 5,
        key: "after-failover".into(),
        slot: 1,
        at: Some(SlotStamp { slot: 1, epoch: 2 }),
    })
    .await
    .unwrap();
    let (tl, batches) = new.journal_after(since - 1, 100).await.unwrap();
    assert_eq!(tl.since, since);
    assert!(!tl.id.is_empty());
    // The old primary, now a replica of the promoted copy: refused.
    {
        let c = rusqlite::Connection::open(&old).unwrap();
        shard::set_role(&c, shard::Role::Replica).unwrap();
    }
    let at_old = Replicas::new(dir.0.clone(), ("cell-a".into(), old.clone()));
    let e = at_old.apply("cell-a", &tl, &batches).unwrap_err();
    assert!(matches!(e, ReplicaError::Diverged { .. }), "{e}");
    // A copy that stopped before the branch point follows the new history.
    let at_behind = Replicas::new(dir.path("behind"), ("cell-z".into(), dir.path("z.db")));
    let lsn = at_behind.apply("cell-a", &tl, &batches).unwrap();
    assert_eq!(lsn, batches.last().unwrap().lsn);
    let c = rusqlite::Connection::open(&behind).unwrap();
    assert_eq!(timeline(&c).unwrap(), tl);
}
