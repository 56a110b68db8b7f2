//! `cell-agent slots`: a store's slot table, and hand-over by hand: ban
//! slots in the old owner's store, open them in the new owner's.
//!
//! Both go through the store's writer like any write (a ban is ordered
//! after every write queued before it in this process; SQLite's write lock
//! orders it against the other processes on the file, and every write
//! checks its slot inside its own transaction), so they are safe while the
//! cell's agents run.

use std::path::Path;

use serde_json::Value;

use crate::rules::RulesHolder;
use crate::store::sqlite::{open, recorded_cell, slots, SqliteStore};
use crate::store::{Store, WriteOp};

/// A hand-over step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Ban the slots (the old owner).
    Ban,
    /// Open the slots (the new owner).
    Open,
}

/// Parses `FROM-TO` or `SLOT`.
pub fn parse_range(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{s:?} is not a slot range (FROM-TO or SLOT, e.g. 0-99)");
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let from: u32 = a.trim().parse().map_err(|_| bad())?;
    let to: u32 = b.trim().parse().map_err(|_| bad())?;
    if from > to || to >= routing_rules::MAX_SLOTS {
        return Err(bad());
    }
    Ok((from, to))
}

fn existing(db: &Path) -> anyhow::Result<()> {
    if !db.is_file() {
        anyhow::bail!("{}: no such database file", db.display());
    }
    Ok(())
}

/// The slot table of the store at `db`, as ranges of equal state.
pub fn list(db: &Path) -> anyhow::Result<Vec<Value>> {
    existing(db)?;
    let conn = open(db, true).map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?;
    slots::list(&conn).map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))
}

/// Bans or opens `range` at `epoch` in the store at `db` (the cell the file
/// belongs to); the store's reply (with the step's journal position).
pub async fn step(db: &Path, step: Step, range: (u32, u32), epoch: u64) -> anyhow::Result<Value> {
    existing(db)?;
    let cell = {
        let conn = open(db, true).map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?;
        recorded_cell(&conn)
            .map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?
            .ok_or_else(|| {
                anyhow::anyhow!("{}: not a cell database (no cell recorded)", db.display())
            })?
    };
    let store =
        SqliteStore::open(db, &cell).map_err(|e| anyhow::anyhow!("{}: {e}", db.display()))?;
    let (from, to) = range;
    let op = match step {
        Step::Ban => WriteOp::BanSlots { from, to, epoch },
        Step::Open => WriteOp::OpenSlots { from, to, epoch },
    };
    let (_, mut reply) = store
        .write(op)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {}", db.display(), e.message))?;
    reply["cell"] = cell.into();
    Ok(reply)
}

/// On a store's first start, opens the slots the rules give this cell at
/// the first epoch (a slot at a later epoch has changed owner: it arrives
/// only by hand-over). Later starts change nothing.
pub(crate) async fn claim_first_slots(
    store: &SqliteStore,
    rules: &RulesHolder,
) -> anyhow::Result<()> {
    use crate::store::Store;
    let table = rules.table();
    let ranges: Vec<(u32, u32)> = table
        .rules()
        .table
        .iter()
        .filter(|r| r.cell == rules.cell() && r.epoch == routing_rules::FIRST_EPOCH)
        .map(|r| (r.from, r.to))
        .collect();
    let (_, reply) = match store
        .write(crate::store::WriteOp::ClaimSlots { ranges })
        .await
    {
        Ok(r) => r,
        // A replica (the shard was moved to another cell): its slots
        // come with its primary's journal, never by a claim.
        Err(e) if e.code == "shard_moved" => {
            tracing::info!(cell = rules.cell(), "this cell's copy of its shard is a replica: it follows the cell that holds the shard");
            return Ok(());
        }
        Err(e) => anyhow::bail!("cannot claim this cell's first slots: {e}"),
    };
    if reply["claimed"] == true {
        tracing::info!(cell = rules.cell(), slots = %reply["slots"], revision = table.revision(), "new store: opened the slots the rules give this cell at epoch 1");
    }
    Ok(())
}
