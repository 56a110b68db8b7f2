//! Offline views across cells: `cell-agent outbox` lists a cell's
//! unfinished and failed cross-cell transfers; `cell-agent reconcile`
//! matches every incoming credit of every cell to the outbox record of the
//! cell that sent it, and every delivered outbox record to its credit.
//!
//! A credit without its debit is money created from nothing (a forged or
//! misrouted credit); a delivered debit without its credit is money lost; a
//! refunded transfer that was also credited is money doubled. Each is a
//! violation, and `reconcile` exits 1 on any.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

/// One outbox record, as `cell-agent outbox` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct OutboxRow {
    /// Transfer id.
    pub transfer_id: String,
    /// Payer.
    pub from: String,
    /// Payee.
    pub to: String,
    /// Payee's cell when the transfer was made.
    pub to_cell: String,
    /// Minor units.
    pub amount: i64,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    /// Delivery attempts.
    pub attempts: i64,
    /// Last error, or the refusal that failed it.
    pub last_error: Option<String>,
    /// Age, ms.
    pub age_ms: i64,
}

fn open_ro(path: &Path) -> Result<Connection, String> {
    if !path.exists() {
        return Err(format!("{}: no such file", path.display()));
    }
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = conn.busy_timeout(std::time::Duration::from_secs(10));
    Ok(conn)
}

fn outbox_rows(conn: &Connection, where_clause: &str) -> rusqlite::Result<Vec<OutboxRow>> {
    let now = crate::store::sqlite::unix_ms();
    let mut s = conn.prepare(&format!(
        "SELECT o.transfer_id, COALESCE(t.from_user, ''), o.to_user, o.to_cell, o.amount,
                CASE WHEN o.delivered_ms IS NOT NULL THEN 'delivered'
                     WHEN o.failed_ms IS NOT NULL THEN 'failed' ELSE 'pending' END,
                o.attempts, o.last_error, o.created_ms
         FROM outbox o LEFT JOIN transfers t ON t.id = o.transfer_id {where_clause} ORDER BY o.id"
    ))?;
    let rows = s.query_map([], |r| {
        Ok(OutboxRow {
            transfer_id: r.get(0)?,
            from: r.get(1)?,
            to: r.get(2)?,
            to_cell: r.get(3)?,
            amount: r.get(4)?,
            state: r.get(5)?,
            attempts: r.get(6)?,
            last_error: r.get(7)?,
            age_ms: (now - r.get::<_, i64>(8)?).max(0),
        })
    })?;
    rows.collect()
}

/// The cell's outbox records that are not delivered (pending or failed),
/// oldest first.
pub fn outbox(path: &Path) -> Result<Vec<OutboxRow>, String> {
    let conn = open_ro(path)?;
    outbox_rows(&conn, "WHERE o.delivered_ms IS NULL")
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// What `reconcile` found.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Cells reconciled, by name, with their file.
    pub cells: BTreeMap<String, PathBuf>,
    /// Credits matched to their sender's outbox record.
    pub matched: usize,
    /// Delivered transfers whose credit was found (or pruned after the
    /// retention by the payee).
    pub matched_sent: usize,
    /// Transfers debited but not yet credited (still in flight).
    pub in_flight: usize,
    /// Transfers that ended failed and were refunded.
    pub refunded: usize,
    /// Every orphan or mismatch (empty = reconciled).
    pub violations: Vec<String>,
}

impl ReconcileReport {
    /// True when every credit has its debit and every delivery its credit.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

struct Credit {
    cell: String,
    from_cell: String,
    to: String,
    amount: i64,
}

/// Reconciles the shards at `paths` (every cell of the cluster, opened
/// read-only; safe while agents run).
pub fn reconcile(paths: &[PathBuf]) -> Result<ReconcileReport, String> {
    let mut report = ReconcileReport::default();
    let mut sent: HashMap<String, (String, OutboxRow)> = HashMap::new();
    let mut credits: HashMap<String, Vec<Credit>> = HashMap::new();
    // (payee cell, sender cell) → credits of transfers the sender made
    // before this (unix ms) may have been pruned by the payee.
    let mut pruned_before: HashMap<(String, String), i64> = HashMap::new();
    for path in paths {
        let conn = open_ro(path)?;
        let err = |e: rusqlite::Error| format!("{}: {e}", path.display());
        let cell = crate::store::sqlite::recorded_cell(&conn)
            .map_err(err)?
            .ok_or_else(|| format!("{}: no cell recorded in the file (not a cell database, or one never opened by a cell agent)", path.display()))?;
        if let Some(other) = report.cells.insert(cell.clone(), path.clone()) {
            return Err(format!(
                "cell {cell} given twice: {} and {}",
                other.display(),
                path.display()
            ));
        }
        let mut s = conn
            .prepare(
                "SELECT id, from_user, to_user, COALESCE(to_cell, ''), amount, state, created_ms
                 FROM transfers WHERE to_cell IS NOT NULL",
            )
            .map_err(err)?;
        let rows = s
            .query_map([], |r| {
                Ok(OutboxRow {
                    transfer_id: r.get(0)?,
                    from: r.get(1)?,
                    to: r.get(2)?,
                    to_cell: r.get(3)?,
                    amount: r.get(4)?,
                    state: r.get(5)?,
                    attempts: 0,
                    last_error: None,
                    age_ms: r.get(6)?,
                })
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(err)?;
        for row in rows {
            sent.insert(row.transfer_id.clone(), (cell.clone(), row));
        }
        let mut s = conn
            .prepare("SELECT key, value FROM meta WHERE key LIKE 'inbox_pruned_before_ms:%'")
            .map_err(err)?;
        let horizons = s
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(err)?;
        for (key, value) in horizons {
            if let (Some(sender), Ok(ms)) = (key.split_once(':').map(|k| k.1), value.parse::<i64>())
            {
                pruned_before.insert((cell.clone(), sender.to_string()), ms);
            }
        }
        let mut s = conn
            .prepare("SELECT transfer_id, from_cell, to_user, amount FROM inbox")
            .map_err(err)?;
        let rows = s
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    Credit {
                        cell: cell.clone(),
                        from_cell: r.get(1)?,
                        to: r.get(2)?,
                        amount: r.get(3)?,
                    },
                ))
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(err)?;
        for (tid, c) in rows {
            credits.entry(tid).or_default().push(c);
        }
    }
    let mut tids: Vec<&String> = credits.keys().collect();
    tids.sort();
    for tid in tids {
        let list = &credits[tid];
        if list.len() > 1 {
            let cells: Vec<&str> = list.iter().map(|c| c.cell.as_str()).collect();
            report.violations.push(format!(
                "transfer {tid} was credited {} times (cells {})",
                list.len(),
                cells.join(", ")
            ));
        }
        for c in list {
            match sent.get(tid.as_str()) {
                None => report.violations.push(format!(
                    "orphan credit {tid} in cell {}: {} to {:?} claims cell {} sent it, but no cell given has that outbox record",
                    c.cell, c.amount, c.to, c.from_cell
                )),
                Some((sender, row)) if *sender != c.from_cell || row.to != c.to || row.amount != c.amount => {
                    report.violations.push(format!(
                        "credit {tid} in cell {} ({} to {:?} from {}) does not match the outbox record in cell {sender} ({} to {:?})",
                        c.cell, c.amount, c.to, c.from_cell, row.amount, row.to
                    ))
                }
                Some((sender, row)) if row.state == "failed" => report.violations.push(format!(
                    "transfer {tid} of cell {sender} was refunded to its payer and also credited in cell {}",
                    c.cell
                )),
                Some(_) => report.matched += 1,
            }
        }
    }
    let mut outgoing: Vec<&(String, OutboxRow)> = sent.values().collect();
    outgoing.sort_by(|a, b| a.1.transfer_id.cmp(&b.1.transfer_id));
    for (sender, row) in outgoing {
        let credited = credits.contains_key(&row.transfer_id);
        // `age_ms` holds the transfer's creation time here.
        let pruned = report.cells.keys().any(|payee| {
            pruned_before
                .get(&(payee.clone(), sender.clone()))
                .is_some_and(|h| row.age_ms < *h)
        });
        match row.state.as_str() {
            "delivered" if credited || pruned => report.matched_sent += 1,
            "delivered" => report.violations.push(format!(
                "transfer {} of cell {sender} is marked delivered but no cell given holds its credit ({} to {:?}, cell {})",
                row.transfer_id, row.amount, row.to, row.to_cell
            )),
            "pending" if !credited => report.in_flight += 1,
            "failed" => report.refunded += 1,
            _ => {}
        }
    }
    Ok(report)
}

impl std::fmt::Display for ReconcileReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cells: Vec<&str> = self.cells.keys().map(String::as_str).collect();
        writeln!(
            f,
            "cells {}: {} credits matched to their debits, {} in flight, {} refunded",
            cells.join(", "),
            self.matched,
            self.in_flight,
            self.refunded
        )?;
        for v in &self.violations {
            writeln!(f, "VIOLATION: {v}")?;
        }
        write!(f, "{}", if self.ok() { "ok" } else { "FAILED" })
    }
}
