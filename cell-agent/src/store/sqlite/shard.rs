//! The role of one copy of a cell's shard, and the two steps of a
//! switchover that change it.
//!
//! Every copy of a shard (the home cell's `--db`, a standby's
//! `CELL.replica.db`) is either the **primary** — it takes writes, journals
//! them and ships them to its standby — or a **replica**, which applies its
//! primary's journal and refuses every write. The role lives in the
//! copy's own `local` table, which is never journaled: applying a batch
//! never changes the role of the copy that applies it.
//!
//! A switchover of a shard from copy A to copy B:
//! 1. [`demote`] (a write through A's writer, so it is ordered after every
//!    write queued before it) bans all of the shard's slots at their new
//!    epochs and makes A a replica, in one batch whose LSN it returns;
//! 2. once B has applied that batch, [`promote`] makes B the primary: it
//!    opens the slots at the same epochs and starts B's journal at the next
//!    LSN, so A (now B's standby) continues from where both copies are.
//!
//! A rollback (B never caught up) is [`promote`] of A itself at newer
//! epochs.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use serde_json::json;

use super::{journal, meta_ms, slots, storage};
use crate::store::{DomainError, Reply};

/// The role of a copy of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Takes writes (the default of a file that never recorded a role).
    Primary,
    /// Applies its primary's journal; refuses every write.
    Replica,
}

impl Role {
    /// Name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// The role of the copy open on `conn`.
pub fn role(conn: &Connection) -> rusqlite::Result<Role> {
    let v: Option<String> = conn
        .prepare_cached("SELECT value FROM local WHERE key = 'role'")?
        .query_row([], |r| r.get(0))
        .optional()?;
    Ok(match v.as_deref() {
        Some("replica") => Role::Replica,
        _ => Role::Primary,
    })
}

/// Records the role of the copy open on `conn`.
pub fn set_role(conn: &Connection, role: Role) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO local (key, value) VALUES ('role', ?1) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [role.as_str()],
    )?;
    Ok(())
}

/// The refusal of a write on a replica.
pub fn refused(cell: &str) -> DomainError {
    DomainError::new(
        421,
        "shard_moved",
        format!("this copy of cell {cell}'s shard is a replica (its primary moved in a switchover); nothing was written"),
    )
}

/// A slot range of a switchover: `from..=to` at its new epoch.
pub type EpochRange = (u32, u32, u64);

/// Bans every range at its epoch and makes this copy a replica (inside the
/// writer's batch at `lsn`). Refused, with nothing changed, when a slot of
/// the shard would stay open here.
pub(super) fn demote(
    conn: &Connection,
    ranges: &[EpochRange],
    lsn: i64,
) -> Result<Reply, DomainError> {
    for &(from, to, epoch) in ranges {
        slots::ban(conn, from, to, epoch, lsn)?;
    }
    let open: Option<(u32, i64)> = conn
        .query_row(
            "SELECT slot, epoch FROM slot_owner WHERE state = 'open' ORDER BY slot LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()
        .map_err(storage)?;
    if let Some((slot, epoch)) = open {
        return Err(DomainError::conflict(
            "slot_left_open",
            format!("slot {slot} is open here at epoch {epoch} but not among the ranges to move; nothing was changed"),
        ));
    }
    set_role(conn, Role::Replica).map_err(storage)?;
    Ok((200, json!({"role": "replica", "lsn": lsn})))
}

/// A repeated [`demote`] on a copy that is already a replica: fine (its
/// LSN) when every range is banned at its epoch or a newer one.
pub(super) fn demoted(conn: &Connection, ranges: &[EpochRange]) -> Result<Reply, DomainError> {
    for &(from, to, epoch) in ranges {
        for slot in from..=to {
            match slots::row(conn, slot)? {
                Some(r) if !r.open && r.epoch >= epoch => {}
                other => {
                    return Err(DomainError::conflict(
                        "epoch_conflict",
                        format!("this copy is already a replica, but slot {slot} is {} here, not banned at epoch {epoch} or later", describe(other)),
                    ))
                }
            }
        }
    }
    let lsn = meta_ms(conn, "lsn").map_err(storage)?;
    Ok((200, json!({"role": "replica", "lsn": lsn})))
}

fn describe(r: Option<slots::SlotRow>) -> String {
    match r {
        None => "unknown".into(),
        Some(r) => format!(
            "{} at epoch {}",
            if r.open { "open" } else { "banned" },
            r.epoch
        ),
    }
}

/// Makes the copy at `path` (holding `cell`'s shard) the primary: opens
/// every range at its epoch (no slot may be at a newer one), journals from
/// now on starting with this step's own batch, and records the role.
/// Returns the LSN of that batch. Repeating it on a primary whose ranges
/// are already open at those epochs returns its LSN and changes nothing.
pub fn promote(
    path: &std::path::Path,
    cell: &str,
    ranges: &[EpochRange],
) -> Result<i64, DomainError> {
    let mut conn = super::open(path, false).map_err(storage)?;
    super::migrate(&mut conn).map_err(storage)?;
    let recorded = super::recorded_cell(&conn).map_err(storage)?;
    if recorded.as_deref() != Some(cell) {
        return Err(DomainError::conflict(
            "wrong_shard",
            format!(
                "{} holds cell {recorded:?}'s shard, not {cell}'s",
                path.display()
            ),
        ));
    }
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(storage)?;
    if role(&tx).map_err(storage)? == Role::Primary {
        for &(from, to, epoch) in ranges {
            for slot in from..=to {
                match slots::row(&tx, slot)? {
                    Some(r) if r.open && r.epoch == epoch => {}
                    other => {
                        return Err(DomainError::conflict(
                            "already_primary",
                            format!("this copy of cell {cell}'s shard is already the primary, and slot {slot} is {} here, not open at epoch {epoch}", describe(other)),
                        ))
                    }
                }
            }
        }
        return meta_ms(&tx, "lsn").map_err(storage);
    }
    journal::restart(&tx).map_err(storage)?;
    let first = journal::start_batch(&tx).map_err(storage)?;
    let lsn = slots::next_lsn(&tx).map_err(storage)?;
    journal::new_timeline(&tx, lsn).map_err(storage)?;
    for &(from, to, epoch) in ranges {
        slots::check_range(from, to, epoch)?;
        for slot in from..=to {
            if let Some(r) = slots::row(&tx, slot)? {
                if r.epoch > epoch {
                    return Err(slots::conflict(slot, r, "open", epoch));
                }
            }
            slots::set(&tx, slot, epoch, true)?;
        }
        slots::log(&tx, lsn, (from, to), epoch, true, "promote")?;
    }
    set_role(&tx, Role::Primary).map_err(storage)?;
    journal::finish_batch(&tx, lsn, first).map_err(storage)?;
    tx.commit().map_err(storage)?;
    Ok(lsn)
}

/// Makes the copy at `path` a replica at once, outside the writer and
/// without a journal entry (its shard was failed over to another copy: it
/// must not take one more write).
pub fn fence(path: &std::path::Path) -> Result<(), DomainError> {
    let mut conn = super::open(path, false).map_err(storage)?;
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(storage)?;
    set_role(&tx, Role::Replica).map_err(storage)?;
    tx.commit().map_err(storage)
}

/// A flag in `local`: set by a failover's promotion, the copy's shipper
/// starts degraded (its standby is the lost cell).
pub const STANDBY_LOST: &str = "standby_lost";

/// Sets or clears a flag of this copy (never journaled).
pub fn set_flag(path: &std::path::Path, key: &str, on: bool) -> Result<(), DomainError> {
    let conn = super::open(path, false).map_err(storage)?;
    if on {
        conn.execute(
            "INSERT INTO local (key, value) VALUES (?1, '1') ON CONFLICT (key) DO UPDATE SET value = '1'",
            [key],
        )
    } else {
        conn.execute("DELETE FROM local WHERE key = ?1", [key])
    }
    .map_err(storage)?;
    Ok(())
}

/// Whether a flag of this copy is set.
pub fn flag(conn: &Connection, key: &str) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM local WHERE key = ?1")?
        .query_row([key], |_| Ok(()))
        .optional()?
        .is_some())
}

/// This copy's role and LSN (for the switchover's progress checks).
pub fn state(path: &std::path::Path) -> Result<(Role, i64), DomainError> {
    let conn = super::open(path, true).map_err(storage)?;
    let r = role(&conn).map_err(storage)?;
    let lsn = meta_ms(&conn, "lsn").map_err(storage)?;
    Ok((r, lsn))
}
