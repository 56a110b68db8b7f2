//! Slot ownership inside the data: the `slot_owner` row of every slot this
//! store holds (`open` or `banned`, with its epoch), checked inside every
//! write's own transaction, and the append-only `slot_log` of every change
//! to it.
//!
//! A write commits here only when its slot is open at the epoch it was
//! routed with: a stale gateway or agent can then never get a write
//! committed in a cell that does not own the slot at that epoch — the
//! check and the effect are one atomic step.

use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{json, Value};

use super::{storage, unix_ms};
use crate::store::{DomainError, Reply, SlotStamp};

/// State of a slot in this store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRow {
    /// Epoch of the last open or ban.
    pub epoch: u64,
    /// Whether writes are accepted.
    pub open: bool,
}

pub(super) fn row(conn: &Connection, slot: u32) -> Result<Option<SlotRow>, DomainError> {
    conn.prepare_cached("SELECT epoch, state FROM slot_owner WHERE slot = ?1")
        .and_then(|mut s| {
            s.query_row([slot], |r| {
                Ok(SlotRow {
                    epoch: r.get::<_, i64>(0)? as u64,
                    open: r.get::<_, String>(1)? == "open",
                })
            })
            .optional()
        })
        .map_err(storage)
}

pub(super) fn set(conn: &Connection, slot: u32, epoch: u64, open: bool) -> Result<(), DomainError> {
    conn.prepare_cached(
        "INSERT INTO slot_owner (slot, epoch, state, updated_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (slot) DO UPDATE SET epoch = excluded.epoch, state = excluded.state, updated_ms = excluded.updated_ms",
    )
    .and_then(|mut s| {
        s.execute(params![
            slot,
            epoch as i64,
            if open { "open" } else { "banned" },
            unix_ms()
        ])
    })
    .map_err(storage)?;
    Ok(())
}

/// Appends to the slot log: every ledger row above `ledger_high` was
/// written under this entry (until the next one for the slot).
pub(super) fn log(
    conn: &Connection,
    lsn: i64,
    (from, to): (u32, u32),
    epoch: u64,
    open: bool,
    reason: &str,
) -> Result<(), DomainError> {
    conn.prepare_cached(
        "INSERT INTO slot_log (lsn, from_slot, to_slot, epoch, state, reason, ledger_high, at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, (SELECT COALESCE(MAX(id), 0) FROM ledger), ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            lsn,
            from,
            to,
            epoch as i64,
            if open { "open" } else { "banned" },
            reason,
            unix_ms()
        ])
    })
    .map_err(storage)?;
    Ok(())
}

/// The fence of one write: the slot must be open here at `at.epoch`. An
/// open row at an older epoch is raised (and logged): the stamp comes from
/// rules that give the slot to this cell at the newer epoch, and the slot
/// was never banned here since.
pub(super) fn check(conn: &Connection, at: &SlotStamp, lsn: i64) -> Result<(), DomainError> {
    let SlotStamp { slot, epoch } = *at;
    match row(conn, slot)? {
        Some(r) if r.open && r.epoch == epoch => Ok(()),
        Some(r) if r.open && r.epoch < epoch => {
            set(conn, slot, epoch, true)?;
            log(conn, lsn, (slot, slot), epoch, true, "advance")?;
            Ok(())
        }
        Some(r) if r.open => Err(DomainError::new(
            421,
            "stale_epoch",
            format!(
                "slot {slot} is at epoch {} in this cell's store, but the request was routed with epoch {epoch}: the router's rules are stale",
                r.epoch
            ),
        )),
        Some(r) if epoch <= r.epoch => Err(DomainError::new(
            421,
            "slot_moved",
            format!(
                "slot {slot} was handed over from this cell at epoch {}; its writes go to its new owner",
                r.epoch
            ),
        )),
        _ => Err(DomainError::new(
            503,
            "slot_not_open",
            format!(
                "slot {slot} (epoch {epoch}) is not open in this cell's store: it has not been handed over to this cell yet; nothing was written, retry later"
            ),
        )),
    }
}

/// Whether the store has claimed its first slots.
fn claimed(conn: &Connection) -> Result<bool, DomainError> {
    conn.query_row(
        "SELECT COUNT(*) FROM meta WHERE key = 'slots_claimed'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n > 0)
    .map_err(storage)
}

/// First start: opens `ranges` at the first epoch, once per store.
pub(super) fn claim(
    conn: &Connection,
    ranges: &[(u32, u32)],
    lsn: i64,
) -> Result<Reply, DomainError> {
    if claimed(conn)? {
        return Ok((200, json!({"claimed": false, "slots": 0})));
    }
    let epoch = routing_rules::FIRST_EPOCH;
    let mut n = 0u32;
    for &(from, to) in ranges {
        for slot in from..=to {
            set(conn, slot, epoch, true)?;
            n += 1;
        }
        log(conn, lsn, (from, to), epoch, true, "claim")?;
    }
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('slots_claimed', ?1)",
        [unix_ms().to_string()],
    )
    .map_err(storage)?;
    Ok((200, json!({"claimed": true, "slots": n, "lsn": lsn})))
}

pub(super) fn check_range(from: u32, to: u32, epoch: u64) -> Result<(), DomainError> {
    if from > to || to >= routing_rules::MAX_SLOTS {
        return Err(DomainError::bad_request(format!(
            "slots {from}-{to} are not a range of slots (0 <= from <= to < {})",
            routing_rules::MAX_SLOTS
        )));
    }
    if !(routing_rules::FIRST_EPOCH..=routing_rules::MAX_EPOCH).contains(&epoch) {
        return Err(DomainError::bad_request(format!(
            "epoch {epoch} is out of range ({}..={})",
            routing_rules::FIRST_EPOCH,
            routing_rules::MAX_EPOCH
        )));
    }
    Ok(())
}

/// Bans `from..=to` at `epoch`: each slot must be open at an older epoch,
/// unknown here, or already banned at no newer epoch. All or nothing.
pub(super) fn ban(
    conn: &Connection,
    from: u32,
    to: u32,
    epoch: u64,
    lsn: i64,
) -> Result<Reply, DomainError> {
    hand_over(conn, (from, to), epoch, false, lsn)
}

/// Opens `from..=to` at `epoch` (a hand-over): each slot must be unknown
/// here, banned at an older epoch, or already open at no newer epoch.
pub(super) fn open(
    conn: &Connection,
    from: u32,
    to: u32,
    epoch: u64,
    lsn: i64,
) -> Result<Reply, DomainError> {
    hand_over(conn, (from, to), epoch, true, lsn)
}

/// Sets `from..=to` open or banned at `epoch`. A slot already in that state
/// may stay at or rise to `epoch`; a slot in the other state must be at an
/// older epoch (epochs only rise). All or nothing.
fn hand_over(
    conn: &Connection,
    (from, to): (u32, u32),
    epoch: u64,
    open: bool,
    lsn: i64,
) -> Result<Reply, DomainError> {
    check_range(from, to, epoch)?;
    let what = if open { "open" } else { "ban" };
    for slot in from..=to {
        match row(conn, slot)? {
            Some(r) if r.open != open && r.epoch >= epoch => {
                return Err(conflict(slot, r, what, epoch));
            }
            Some(r) if r.open == open && r.epoch > epoch => {
                return Err(conflict(slot, r, what, epoch));
            }
            _ => set(conn, slot, epoch, open)?,
        }
    }
    log(conn, lsn, (from, to), epoch, open, what)?;
    let done = if open { "opened" } else { "banned" };
    Ok((200, json!({done: [from, to], "epoch": epoch, "lsn": lsn})))
}

pub(super) fn conflict(slot: u32, r: SlotRow, what: &str, epoch: u64) -> DomainError {
    DomainError::conflict(
        "epoch_conflict",
        format!(
            "cannot {what} slot {slot} at epoch {epoch}: it is {} at epoch {} here (epochs only rise); nothing was changed",
            if r.open { "open" } else { "banned" },
            r.epoch
        ),
    )
}

/// The slot table of a store as ranges of equal state:
/// `[{"from", "to", "epoch", "state"}]`.
pub fn list(conn: &Connection) -> rusqlite::Result<Vec<Value>> {
    let mut s = conn.prepare("SELECT slot, epoch, state FROM slot_owner ORDER BY slot")?;
    let rows = s.query_map([], |r| {
        Ok((
            r.get::<_, u32>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    let mut out: Vec<(u32, u32, i64, String)> = Vec::new();
    for row in rows {
        let (slot, epoch, state) = row?;
        match out.last_mut() {
            Some(last) if last.1 + 1 == slot && last.2 == epoch && last.3 == state => last.1 = slot,
            _ => out.push((slot, slot, epoch, state)),
        }
    }
    Ok(out
        .into_iter()
        .map(|(from, to, epoch, state)| json!({"from": from, "to": to, "epoch": epoch, "state": state}))
        .collect())
}

/// Raises the store's journal position for a new batch and returns it.
pub(super) fn next_lsn(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('lsn', '1')
         ON CONFLICT (key) DO UPDATE SET value = CAST(value AS INTEGER) + 1
         RETURNING CAST(value AS INTEGER)",
    )?
    .query_row([], |r| r.get(0))
}
