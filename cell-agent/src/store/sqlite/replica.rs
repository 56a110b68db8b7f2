//! A replica of a cell's shard: a separate SQLite file that applies the
//! primary's journal batch by batch, idempotently by LSN (a batch at or
//! below the replica's `meta.lsn` is skipped; a gap is refused). A replica
//! that is missing, or behind the oldest batch the primary still keeps,
//! starts from a snapshot (`VACUUM INTO`, a consistent copy).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use rusqlite::types::Value as Sql;
use rusqlite::{params_from_iter, Connection, OpenFlags, TransactionBehavior};
use serde_json::Value;

use super::journal::{self, Batch, RowChange};

/// Why a batch cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// The batch does not follow the replica's last one.
    #[error("journal gap: the replica is at LSN {have}, the next batch offered is {got}")]
    Gap {
        /// The replica's LSN.
        have: i64,
        /// The batch offered.
        got: i64,
    },
    /// A row cannot be applied (unknown table or column, bad value).
    #[error("batch {lsn}: {message}")]
    Row {
        /// The batch.
        lsn: i64,
        /// What is wrong.
        message: String,
    },
    /// There is no replica file to apply to: it must be seeded from a
    /// snapshot first.
    #[error("no replica of cell {cell} here yet ({path}): seed it with `cell-agent replica sync` from a snapshot of the primary")]
    NeedSnapshot {
        /// The primary cell.
        cell: String,
        /// The replica file expected.
        path: String,
    },
    /// The replica went on past the point where the primary's history
    /// began on another copy (it was the primary, failed over with an
    /// unacknowledged tail): only a snapshot brings it back.
    #[error("this copy of cell {cell}'s shard is at LSN {lsn} on another history than its primary's, which began at LSN {since}: it must be seeded again from a snapshot")]
    Diverged {
        /// The shard's cell.
        cell: String,
        /// The replica's LSN.
        lsn: i64,
        /// Where the primary's history began.
        since: i64,
    },
    /// This copy of the shard is its primary (promoted by a switchover):
    /// it refuses the journal of the copy it replaced.
    #[error("this copy of cell {cell}'s shard ({path}) is its primary now; it applies no other copy's journal")]
    Primary {
        /// The shard's cell.
        cell: String,
        /// The file.
        path: String,
    },
    /// The replica file holds another cell's shard.
    #[error("the replica file {path} holds cell {recorded:?}'s shard, not {cell:?}'s")]
    WrongCell {
        /// The cell asked for.
        cell: String,
        /// The cell recorded in the file.
        recorded: String,
        /// The file.
        path: String,
    },
    /// SQLite.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// The replica file of `cell`'s shard in `dir`.
pub fn replica_path(dir: &Path, cell: &str) -> std::path::PathBuf {
    dir.join(format!("{cell}.replica.db"))
}

/// A standby's replica files in one directory, with their connections
/// kept open between shipments (so statements stay prepared). The copy of
/// the agent's own cell's shard is its `--db` file (a replica after a
/// switchover moved the shard away).
#[derive(Debug, Clone)]
pub struct Replicas {
    dir: std::path::PathBuf,
    home: (String, std::path::PathBuf),
    open: Arc<Mutex<HashMap<String, Connection>>>,
    /// Shipments apply under the shared side; a snapshot is moved into
    /// place under the exclusive side (no shipment applies to a file being
    /// replaced).
    gate: Arc<RwLock<()>>,
}

impl Replicas {
    /// The replicas in `dir`; `home` is the agent's own cell and its
    /// database file.
    pub fn new(dir: std::path::PathBuf, home: (String, std::path::PathBuf)) -> Self {
        Replicas {
            dir,
            home,
            open: Arc::default(),
            gate: Arc::default(),
        }
    }

    /// Where snapshot `id` of `cell`'s shard is received before it is
    /// installed (one file per snapshot: both colours of a primary may send
    /// one at the same time, and their chunks must never mix).
    pub fn incoming(&self, cell: &str, id: &str) -> std::path::PathBuf {
        self.dir.join(format!("{cell}.replica.db.incoming.{id}"))
    }

    /// The file of this agent's copy of `cell`'s shard.
    pub fn path(&self, cell: &str) -> std::path::PathBuf {
        if cell == self.home.0 {
            self.home.1.clone()
        } else {
            replica_path(&self.dir, cell)
        }
    }

    /// Closes the kept connection to `cell`'s copy (it was promoted).
    pub fn forget(&self, cell: &str) {
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if let Ok(mut m) = self.open.lock() {
            m.remove(cell);
        }
    }

    /// Installs the received snapshot of `cell`'s shard as its replica (it
    /// must be a sound SQLite file holding that cell's shard); returns its
    /// LSN.
    pub fn install_snapshot(&self, cell: &str, id: &str) -> Result<i64, ReplicaError> {
        let incoming = self.incoming(cell, id);
        let bad = |message: String| ReplicaError::Row { lsn: 0, message };
        let lsn = {
            let c = Connection::open(&incoming)?;
            let check: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
            if check != "ok" {
                return Err(bad(format!("the received snapshot is damaged: {check}")));
            }
            let recorded = super::recorded_cell(&c)?.unwrap_or_default();
            if recorded != cell {
                return Err(bad(format!(
                    "the received snapshot holds cell {recorded:?}'s shard, not {cell:?}'s"
                )));
            }
            as_replica(&c)?
        };
        let _exclusive = self.gate.write().unwrap_or_else(|e| e.into_inner());
        if let Ok(mut m) = self.open.lock() {
            m.remove(cell);
        }
        if cell == self.home.0 {
            // The home file is open by this agent's stores (and the other
            // colour's): its content is replaced in place, never the file.
            super::reseed::install_home(&self.home.1, &incoming)?;
            let _ = std::fs::remove_file(&incoming);
            return Ok(lsn);
        }
        let target = replica_path(&self.dir, cell);
        if target.is_file() {
            // A primary copy is never overwritten; a replica's write-ahead
            // log is folded in and removed first, so the new file is never
            // paired with the old file's log.
            let old = super::open(&target, false)?;
            if super::shard::role(&old).unwrap_or(super::shard::Role::Replica)
                == super::shard::Role::Primary
            {
                return Err(bad(format!(
                    "{} is the primary copy of cell {cell}'s shard here; a snapshot never replaces it",
                    target.display()
                )));
            }
            old.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
        }
        move_into_place(&incoming, &target)?;
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", target.display()));
        }
        Ok(lsn)
    }

    /// Applies shipped batches of `cell`'s shard, on the primary's
    /// `timeline`, to its replica file (on a blocking thread); returns the
    /// replica's LSN afterwards.
    pub fn apply(
        &self,
        cell: &str,
        timeline: &journal::Timeline,
        batches: &[Batch],
    ) -> Result<i64, ReplicaError> {
        let _shared = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let taken = self.open.lock().ok().and_then(|mut m| m.remove(cell));
        let mut conn = match taken {
            Some(c) => c,
            None => open_replica(&self.path(cell), cell)?,
        };
        let r = apply_shipped(&mut conn, cell, timeline, batches);
        // A connection that failed is not kept.
        if r.is_ok() || matches!(r, Err(ReplicaError::Gap { .. })) {
            if let Ok(mut m) = self.open.lock() {
                m.insert(cell.to_string(), conn);
            }
        }
        r
    }
}

/// Opens the replica file of `cell` at `path`: it must exist (seeded from a
/// snapshot), hold that cell's shard, and be a replica (a copy promoted to
/// primary refuses the journal of the copy it replaced). Drops the journal
/// triggers a demoted primary still has.
fn open_replica(path: &Path, cell: &str) -> Result<Connection, ReplicaError> {
    let path = path.to_path_buf();
    if !path.is_file() {
        return Err(ReplicaError::NeedSnapshot {
            cell: cell.to_string(),
            path: path.display().to_string(),
        });
    }
    let mut conn = super::open(&path, false)?;
    super::migrate(&mut conn)?;
    let recorded = super::recorded_cell(&conn)?.unwrap_or_default();
    if recorded != cell {
        return Err(ReplicaError::WrongCell {
            cell: cell.to_string(),
            recorded,
            path: path.display().to_string(),
        });
    }
    if super::shard::role(&conn)? == super::shard::Role::Primary {
        return Err(ReplicaError::Primary {
            cell: cell.to_string(),
            path: path.display().to_string(),
        });
    }
    journal::drop_triggers(&conn)?;
    Ok(conn)
}

/// Applies shipped batches in one transaction; the replica's LSN after.
fn apply_shipped(
    conn: &mut Connection,
    cell: &str,
    timeline: &journal::Timeline,
    batches: &[Batch],
) -> Result<i64, ReplicaError> {
    // One transaction (one fsync) for the whole shipment; a gap keeps
    // what came before it.
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mine = journal::timeline(&tx)?;
    let lsn = applied_lsn(&tx)?;
    // On another history than the primary's, a copy may follow only from
    // at or before the point where the primary's history began.
    if mine.id != timeline.id && lsn >= timeline.since && timeline.since > 0 {
        return Err(ReplicaError::Diverged {
            cell: cell.to_string(),
            lsn,
            since: timeline.since,
        });
    }
    let mut gap = None;
    for b in batches {
        match apply_in(&tx, b) {
            Ok(_) => {}
            Err(e @ ReplicaError::Gap { .. }) => {
                gap = Some(e);
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let lsn = applied_lsn(&tx)?;
    tx.commit()?;
    match gap {
        Some(ReplicaError::Gap { got, .. }) => Err(ReplicaError::Gap { have: lsn, got }),
        _ => Ok(lsn),
    }
}

/// The last batch applied to a shard file (its `meta.lsn`; 0 before any).
pub fn applied_lsn(conn: &Connection) -> rusqlite::Result<i64> {
    super::meta_ms(conn, "lsn")
}

fn name(s: &str, lsn: i64) -> Result<String, ReplicaError> {
    if s.is_empty() || s.contains('"') || s.contains('\0') {
        return Err(ReplicaError::Row {
            lsn,
            message: format!("bad name {s:?}"),
        });
    }
    Ok(format!("\"{s}\""))
}

fn value(v: &Value, lsn: i64) -> Result<Sql, ReplicaError> {
    Ok(match v {
        Value::Null => Sql::Null,
        Value::String(s) => Sql::Text(s.clone()),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Sql::Integer(i),
            (None, Some(f)) => Sql::Real(f),
            _ => {
                return Err(ReplicaError::Row {
                    lsn,
                    message: format!("number {n} out of range"),
                })
            }
        },
        other => {
            return Err(ReplicaError::Row {
                lsn,
                message: format!("unexpected value {other}"),
            })
        }
    })
}

fn apply_row(conn: &Connection, lsn: i64, change: &RowChange) -> Result<(), ReplicaError> {
    let table = name(&change.table, lsn)?;
    let row: serde_json::Map<String, Value> =
        serde_json::from_str(change.row.get()).map_err(|e| ReplicaError::Row {
            lsn,
            message: format!("{}: not a row object: {e}", change.table),
        })?;
    let cols: Vec<String> = row.keys().map(|c| name(c, lsn)).collect::<Result<_, _>>()?;
    let values: Vec<Sql> = row
        .values()
        .map(|v| value(v, lsn))
        .collect::<Result<_, _>>()?;
    let sql = if change.upsert {
        format!(
            "INSERT OR REPLACE INTO {table} ({}) VALUES ({})",
            cols.join(", "),
            vec!["?"; cols.len()].join(", ")
        )
    } else {
        let cond: Vec<String> = cols.iter().map(|c| format!("{c} = ?")).collect();
        format!("DELETE FROM {table} WHERE {}", cond.join(" AND "))
    };
    conn.prepare_cached(&sql)?
        .execute(params_from_iter(values))
        .map_err(|e| ReplicaError::Row {
            lsn,
            message: format!("{}: {e}", change.table),
        })?;
    Ok(())
}

/// Applies one batch in one transaction: `Ok(false)` when the replica
/// already has it, [`ReplicaError::Gap`] when it does not follow.
pub fn apply_batch(conn: &mut Connection, batch: &Batch) -> Result<bool, ReplicaError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied = apply_in(&tx, batch)?;
    tx.commit()?;
    Ok(applied)
}

/// Applies one batch inside the caller's transaction.
fn apply_in(conn: &Connection, batch: &Batch) -> Result<bool, ReplicaError> {
    let have = applied_lsn(conn)?;
    if batch.lsn <= have {
        return Ok(false);
    }
    if batch.lsn != have + 1 {
        return Err(ReplicaError::Gap {
            have,
            got: batch.lsn,
        });
    }
    for change in &batch.rows {
        apply_row(conn, batch.lsn, change)?;
    }
    if applied_lsn(conn)? != batch.lsn {
        return Err(ReplicaError::Row {
            lsn: batch.lsn,
            message: "the batch does not carry its own LSN".into(),
        });
    }
    Ok(true)
}

/// What a sync did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    /// The replica was (re)started from a snapshot.
    pub snapshot: bool,
    /// Batches applied.
    pub batches: u64,
    /// The replica's LSN afterwards.
    pub lsn: i64,
}

/// Turns a snapshot of a primary's shard into a replica: no journal
/// triggers (a replica applies rows, it does not journal them) and no
/// journal rows; its LSN.
fn as_replica(c: &Connection) -> Result<i64, ReplicaError> {
    journal::drop_triggers(c)?;
    super::shard::set_role(c, super::shard::Role::Replica)?;
    // The primary's own facts (its flags) are not the replica's.
    c.execute_batch(
        "DELETE FROM journal_rows; DELETE FROM journal; DELETE FROM local WHERE key <> 'role';",
    )?;
    Ok(applied_lsn(c)?)
}

fn move_into_place(from: &Path, to: &Path) -> Result<(), ReplicaError> {
    std::fs::rename(from, to).map_err(|e| ReplicaError::Row {
        lsn: 0,
        message: format!("cannot move the snapshot into place: {e}"),
    })
}

/// A consistent copy (`VACUUM INTO`) of the shard open on `src`, as a new
/// file `dest`.
pub(super) fn copy_into(src: &Connection, dest: &Path) -> Result<(), ReplicaError> {
    let _ = std::fs::remove_file(dest);
    src.execute("VACUUM INTO ?1", [dest.to_string_lossy()])?;
    Ok(())
}

/// Copies `primary` into a new replica file at `replica` (atomically
/// replacing it): a consistent snapshot, without journal or triggers.
fn snapshot(primary: &Connection, replica: &Path) -> Result<(), ReplicaError> {
    let tmp = replica.with_extension("snapshot-tmp");
    copy_into(primary, &tmp)?;
    as_replica(&Connection::open(&tmp)?)?;
    move_into_place(&tmp, replica)
}

/// Takes a consistent snapshot of the shard at `primary` into `dest` (a new
/// file); returns its LSN.
pub fn snapshot_to(primary: &Path, dest: &Path) -> Result<i64, ReplicaError> {
    let src = Connection::open_with_flags(primary, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(std::time::Duration::from_secs(10))?;
    copy_into(&src, dest)?;
    let c = Connection::open_with_flags(dest, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(applied_lsn(&c)?)
}

/// Why a copy must be seeded again from a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stale {
    /// Missing, or behind the primary's oldest kept batch.
    Behind,
    /// It has writes the primary never had (it was the primary, or went
    /// on past the start of the primary's history).
    Tail,
}

/// Brings the replica file at `replica` up to the primary file at
/// `primary`: a snapshot when it is missing or behind the primary's
/// oldest kept batch, then every later batch in order.
pub fn sync(primary: &Path, replica: &Path) -> Result<SyncReport, ReplicaError> {
    let src = Connection::open_with_flags(primary, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    src.busy_timeout(std::time::Duration::from_secs(10))?;
    if !journal::enabled(&src)? {
        return Err(ReplicaError::Row {
            lsn: 0,
            message: format!(
                "{} does not journal its writes (serve it with --journal)",
                primary.display()
            ),
        });
    }
    let mut snapshotted = false;
    // Why the copy at `replica` cannot just follow the journal: `None` when
    // it can.
    let stale = |c: &Connection| -> Result<Option<Stale>, ReplicaError> {
        let have = applied_lsn(c)?;
        let theirs = journal::timeline(&src)?;
        if super::shard::role(c)? == super::shard::Role::Primary {
            return Ok(Some(Stale::Tail));
        }
        if theirs.id != journal::timeline(c)?.id && theirs.since > 0 && have >= theirs.since {
            return Ok(Some(Stale::Tail));
        }
        Ok(journal::oldest(&src)?
            .is_some_and(|oldest| oldest > have + 1)
            .then_some(Stale::Behind))
    };
    let why = if replica.exists() {
        let mut c = super::open(replica, false)?;
        super::migrate(&mut c)?;
        stale(&c)?
    } else {
        Some(Stale::Behind)
    };
    if let Some(why) = why {
        if why == Stale::Tail {
            // A copy with writes the primary never had (a failed-over
            // primary's tail): kept aside for inspection, never merged.
            let aside = format!("{}.discarded-{}", replica.display(), super::unix_ms());
            for ext in ["", "-wal", "-shm"] {
                let from = format!("{}{ext}", replica.display());
                if Path::new(&from).exists() {
                    std::fs::rename(&from, format!("{aside}{ext}")).map_err(|e| {
                        ReplicaError::Row {
                            lsn: 0,
                            message: format!("cannot move {from} aside: {e}"),
                        }
                    })?;
                }
            }
            tracing::warn!(replica = %replica.display(), %aside, "the copy held writes its primary never had; moved aside, seeding it again");
        }
        snapshot(&src, replica)?;
        for ext in ["-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", replica.display()));
        }
        snapshotted = true;
    }
    let mut dst = super::open(replica, false)?;
    let mut batches = 0u64;
    loop {
        let next = journal::batches_after(&src, applied_lsn(&dst)?, 256)?;
        if next.is_empty() {
            break;
        }
        for b in &next {
            batches += u64::from(apply_batch(&mut dst, b)?);
        }
    }
    Ok(SyncReport {
        snapshot: snapshotted,
        batches,
        lsn: applied_lsn(&dst)?,
    })
}
