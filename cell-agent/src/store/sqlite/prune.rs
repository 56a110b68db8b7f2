//! Pruning after a retention (`--idempotency-retention`), in bounded steps
//! through the writer so it never holds the write lock for long:
//!
//! - idempotency records older than the retention (a retry older than
//!   that is a new request — documented);
//! - outbox records closed (delivered or failed) before the retention;
//! - inbox records older than the retention **and** made by their sender
//!   before the sender's watermark (every transfer it made before is
//!   settled and will never be sent again), less a safety margin. A
//!   credit whose sender might still retry it is never forgotten, so it
//!   can never be applied twice.
//!
//! - journal batches older than the margin below (at most 1 h): a shard
//!   replica that far behind starts again from a snapshot.
//!
//! The horizons are kept in `meta` so `check` and `reconcile` can tell a
//! pruned record from a missing one.

use rusqlite::{params, Connection};
use serde_json::json;

use super::schema::raise_meta_ms;
use super::storage;
use crate::store::{DomainError, Reply};

/// Largest margin below a sender's watermark, ms: covers transfers stamped
/// just before the watermark was read but committed after it, and clock
/// steps. (The margin is the retention when that is shorter.)
pub const WATERMARK_MARGIN_MS: i64 = 3_600_000;

/// Meta key: closed outbox records before this (unix ms) were pruned.
pub const OUTBOX_PRUNED: &str = "outbox_pruned_before_ms";

/// Meta key prefix (`inbox_pruned_before_ms:CELL`): credits of transfers
/// CELL made before this (unix ms) may have been pruned.
pub const INBOX_PRUNED: &str = "inbox_pruned_before_ms:";

pub(super) fn prune(
    conn: &Connection,
    before_ms: i64,
    margin_ms: i64,
    limit: u32,
) -> Result<Reply, DomainError> {
    let idempotency = conn
        .prepare_cached(
            "DELETE FROM idempotency WHERE rowid IN
               (SELECT rowid FROM idempotency WHERE created_ms < ?1 LIMIT ?2)",
        )
        .and_then(|mut s| s.execute(params![before_ms, limit]))
        .map_err(storage)?;
    let outbox = conn
        .prepare_cached(
            "DELETE FROM outbox WHERE id IN
               (SELECT id FROM outbox WHERE delivered_ms < ?1 OR failed_ms < ?1 LIMIT ?2)",
        )
        .and_then(|mut s| s.execute(params![before_ms, limit]))
        .map_err(storage)?;
    if outbox > 0 {
        raise_meta_ms(conn, OUTBOX_PRUNED, before_ms).map_err(storage)?;
    }
    let candidates = "SELECT i.rowid AS rid, i.from_cell AS cell, i.transfer_created_ms AS made
        FROM inbox i JOIN peer_watermarks w ON w.cell = i.from_cell
        WHERE i.created_ms < ?1 AND i.transfer_created_ms IS NOT NULL
          AND i.transfer_created_ms < w.settled_before_ms - ?2
        LIMIT ?3";
    let horizons: Vec<(String, i64)> = conn
        .prepare_cached(&format!(
            "SELECT cell, MAX(made) + 1 FROM ({candidates}) GROUP BY cell"
        ))
        .and_then(|mut s| {
            s.query_map(params![before_ms, margin_ms, limit], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect()
        })
        .map_err(storage)?;
    for (cell, horizon) in &horizons {
        raise_meta_ms(conn, &format!("{INBOX_PRUNED}{cell}"), *horizon).map_err(storage)?;
    }
    let inbox = conn
        .prepare_cached(&format!(
            "DELETE FROM inbox WHERE rowid IN (SELECT rid FROM ({candidates}))"
        ))
        .and_then(|mut s| s.execute(params![before_ms, margin_ms, limit]))
        .map_err(storage)?;
    // The journal keeps the last `margin_ms` of batches (a replica further
    // behind starts again from a snapshot).
    let journal_before = super::unix_ms() - margin_ms;
    let last: Option<i64> = conn
        .prepare_cached(
            "SELECT MAX(lsn) FROM (SELECT lsn FROM journal WHERE created_ms < ?1 ORDER BY lsn LIMIT ?2)",
        )
        .and_then(|mut s| s.query_row(params![journal_before, limit], |r| r.get(0)))
        .map_err(storage)?;
    let mut journal = 0;
    if let Some(last) = last {
        conn.prepare_cached(
            "DELETE FROM journal_rows WHERE id <= (SELECT last_id FROM journal WHERE lsn = ?1)",
        )
        .and_then(|mut s| s.execute([last]))
        .map_err(storage)?;
        journal = conn
            .prepare_cached("DELETE FROM journal WHERE lsn <= ?1")
            .and_then(|mut s| s.execute([last]))
            .map_err(storage)?;
    }
    Ok((
        200,
        json!({ "idempotency": idempotency, "outbox": outbox, "inbox": inbox, "journal": journal }),
    ))
}
