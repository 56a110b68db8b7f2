//! `cellchaos check --data-dir DIR`: the offline invariants of a stopped
//! topology (every `*.db` file under DIR, one level of subdirectories
//! included).
//!
//! - Each file, shard or replica, passes `cell-agent check` (balances
//!   follow from the ledger, no negative available balance, orders debited
//!   once, money in − money out = balances, ...).
//! - Each cell has exactly one primary copy; its other copies are replicas
//!   whose journal position (LSN) is not ahead of the primary's.
//! - Across the primary copies, every cross-cell credit has its debit and
//!   no transfer was credited twice (`cell-agent reconcile`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cell_agent::store::sqlite::shard::{self, Role};
use rusqlite::{Connection, OpenFlags};
use serde::Serialize;

/// One database file found.
#[derive(Debug, Clone, Serialize)]
pub struct Copy {
    /// The file.
    pub path: PathBuf,
    /// The cell whose shard it holds.
    pub cell: String,
    /// `primary`, `replica`, or `stale-primary`: a primary copy whose shard
    /// was failed over to another copy (a newer history) while it was cut
    /// off; its batches past the fork were never acknowledged.
    pub role: &'static str,
    /// Its journal position (last batch written or applied).
    pub lsn: i64,
    /// The history its journal is on (a promotion starts a new one) and
    /// the LSN that history began at.
    pub timeline: String,
    /// Where [`Copy::timeline`] began.
    pub timeline_since: i64,
    /// Sum of its balances, minor units.
    pub balance_total: i128,
    /// Ledger entries.
    pub ledger_entries: i64,
    /// What `cell-agent check` found wrong in it.
    pub violations: Vec<String>,
}

/// What the check found.
#[derive(Debug, Clone, Serialize, Default)]
pub struct OfflineReport {
    /// Every copy found, by path.
    pub copies: Vec<Copy>,
    /// Sum of the balances of the primary copies, minor units.
    pub primary_balance_total: i128,
    /// Cross-cell transfers matched (debit and credit present).
    pub transfers_matched: usize,
    /// Cross-cell transfers still in flight (debited, not yet credited).
    pub transfers_in_flight: usize,
    /// Every broken invariant, naming its file or cell.
    pub violations: Vec<String>,
    /// What is not wrong but worth knowing (stale copies awaiting failback).
    pub notes: Vec<String>,
}

impl OfflineReport {
    /// True when every invariant held.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

impl std::fmt::Display for OfflineReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in &self.copies {
            writeln!(
                f,
                "{:<8} {:<13} lsn {:>7}  balances {:>14}  {} ledger entries  {}",
                c.cell,
                c.role,
                c.lsn,
                c.balance_total,
                c.ledger_entries,
                c.path.display()
            )?;
        }
        writeln!(
            f,
            "primary copies: balances total {}; cross-cell transfers: {} matched, {} in flight",
            self.primary_balance_total, self.transfers_matched, self.transfers_in_flight
        )?;
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        if self.ok() {
            writeln!(f, "ok: every invariant held")
        } else {
            writeln!(f, "{} violation(s):", self.violations.len())?;
            for v in &self.violations {
                writeln!(f, "  - {v}")?;
            }
            Ok(())
        }
    }
}

/// Why the check could not run at all (exit 2).
#[derive(Debug)]
pub struct CannotCheck(pub String);

impl std::fmt::Display for CannotCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CannotCheck {}

/// The cell databases under `dir` (and its direct subdirectories), sorted.
fn database_files(dir: &Path) -> Result<Vec<PathBuf>, CannotCheck> {
    let read = |d: &Path| {
        std::fs::read_dir(d).map_err(|e| CannotCheck(format!("cannot read {}: {e}", d.display())))
    };
    let mut out = Vec::new();
    for entry in read(dir)?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            for inner in read(&p)?.flatten() {
                let q = inner.path();
                if q.is_file() && q.extension().is_some_and(|e| e == "db") {
                    out.push(q);
                }
            }
        } else if p.extension().is_some_and(|e| e == "db") {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Cross-cell transfers debited and not yet credited or failed, counted
/// over every database under `dir` (a relay still has work to do while
/// this is above 0).
pub fn pending_transfers(dir: &Path) -> Result<i64, CannotCheck> {
    let mut n = 0;
    for path in database_files(dir)? {
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| CannotCheck(format!("{}: {e}", path.display())))?;
        let _ = conn.busy_timeout(std::time::Duration::from_secs(2));
        n += conn
            .query_row(
                "SELECT COUNT(*) FROM outbox WHERE delivered_ms IS NULL AND failed_ms IS NULL",
                [],
                |r| r.get::<_, i64>(0),
            )
            .map_err(|e| CannotCheck(format!("{}: {e}", path.display())))?;
    }
    Ok(n)
}

/// What a copy is: its cell, role, LSN and history.
struct Identity {
    cell: String,
    role: Role,
    lsn: i64,
    timeline: cell_agent::store::sqlite::journal::Timeline,
}

/// Reads what a copy is.
fn identify(path: &Path) -> Result<Identity, String> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let err = |e: rusqlite::Error| format!("{}: {e}", path.display());
    conn.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(err)?;
    let cell = cell_agent::store::sqlite::recorded_cell(&conn)
        .map_err(err)?
        .ok_or_else(|| {
            format!(
                "{}: no cell recorded (not a cell database, or never opened by an agent)",
                path.display()
            )
        })?;
    let role = shard::role(&conn).map_err(err)?;
    let lsn = cell_agent::store::sqlite::meta_ms(&conn, "lsn").map_err(err)?;
    let timeline = cell_agent::store::sqlite::journal::timeline(&conn).map_err(err)?;
    Ok(Identity {
        cell,
        role,
        lsn,
        timeline,
    })
}

/// Checks every cell database under `dir`. `Err` only when nothing could
/// be checked (no directory, no database in it).
pub fn check_dir(dir: &Path) -> Result<OfflineReport, CannotCheck> {
    let files = database_files(dir)?;
    if files.is_empty() {
        return Err(CannotCheck(format!(
            "no cell database (*.db) in {} or its subdirectories",
            dir.display()
        )));
    }
    let mut report = OfflineReport::default();
    for path in files {
        let Identity {
            cell,
            role,
            lsn,
            timeline,
        } = match identify(&path) {
            Ok(x) => x,
            Err(e) => {
                report.violations.push(e);
                continue;
            }
        };
        let role = match role {
            Role::Primary => "primary",
            Role::Replica => "replica",
        };
        let (balance_total, ledger_entries, violations) = match cell_agent::check::check(&path) {
            Ok(c) => (c.balance_total, c.ledger_entries, c.violations),
            Err(e) => (0, 0, vec![format!("cannot check: {e}")]),
        };
        for v in &violations {
            report
                .violations
                .push(format!("{} ({cell} {role}): {v}", path.display()));
        }
        report.copies.push(Copy {
            path,
            cell,
            role,
            lsn,
            timeline: timeline.id,
            timeline_since: timeline.since,
            balance_total,
            ledger_entries,
            violations,
        });
    }
    mark_stale_primaries(&mut report);
    let mut by_cell: BTreeMap<&str, Vec<&Copy>> = BTreeMap::new();
    for c in &report.copies {
        by_cell.entry(c.cell.as_str()).or_default().push(c);
    }
    let mut primaries = Vec::new();
    let mut problems = Vec::new();
    for (cell, copies) in &by_cell {
        let prim: Vec<&&Copy> = copies.iter().filter(|c| c.role == "primary").collect();
        match prim.as_slice() {
            [p] => {
                primaries.push(p.path.clone());
                report.primary_balance_total += p.balance_total;
                for r in copies.iter().filter(|c| c.role == "replica") {
                    if r.timeline == p.timeline && r.lsn > p.lsn {
                        problems.push(format!(
                            "cell {cell}: replica {} is at LSN {}, ahead of its primary {} at {} on the same history",
                            r.path.display(),
                            r.lsn,
                            p.path.display(),
                            p.lsn
                        ));
                    }
                }
            }
            [] => problems.push(format!(
                "cell {cell}: no primary copy among {} (every copy is a replica: a switchover or failover stopped half way?)",
                copies.iter().map(|c| c.path.display().to_string()).collect::<Vec<_>>().join(", ")
            )),
            many => problems.push(format!(
                "cell {cell}: {} primary copies on one history ({}): two copies took writes (split brain)",
                many.len(),
                many.iter().map(|c| c.path.display().to_string()).collect::<Vec<_>>().join(", ")
            )),
        }
    }
    report.violations.extend(problems);
    if !primaries.is_empty() {
        match cell_agent::reconcile::reconcile(&primaries) {
            Ok(r) => {
                report.transfers_matched = r.matched;
                report.transfers_in_flight = r.in_flight;
                report
                    .violations
                    .extend(r.violations.into_iter().map(|v| format!("cross-cell: {v}")));
            }
            Err(e) => report
                .violations
                .push(format!("cross-cell: cannot reconcile: {e}")),
        }
    }
    Ok(report)
}

/// A cell with primary copies on different histories: the one whose
/// history began last is the current primary (a failover promoted it); the
/// others were cut off before it and are `stale-primary` — expected after
/// an unplanned failover until failback re-seeds them. Their batches past
/// the fork were never acknowledged (the standby refused them), so they
/// are left out of the money and the cross-cell reconciliation. Copies
/// sharing one history stay `primary` (split brain, reported by the
/// caller).
fn mark_stale_primaries(report: &mut OfflineReport) {
    let mut newest: BTreeMap<String, (i64, String)> = BTreeMap::new();
    for c in report.copies.iter().filter(|c| c.role == "primary") {
        let e = newest
            .entry(c.cell.clone())
            .or_insert((c.timeline_since, c.timeline.clone()));
        if c.timeline_since > e.0 {
            *e = (c.timeline_since, c.timeline.clone());
        }
    }
    let mut notes = Vec::new();
    for c in report.copies.iter_mut().filter(|c| c.role == "primary") {
        let (since, current) = &newest[&c.cell];
        if c.timeline != *current && c.timeline_since < *since {
            c.role = "stale-primary";
            let tail = (c.lsn - since).max(0);
            notes.push(format!(
                "cell {}: {} is a stale primary copy — the shard was failed over to a copy whose history began at LSN {since}; its {tail} batch(es) past that were never acknowledged and are discarded when it is seeded again (cellctl failback)",
                c.cell,
                c.path.display()
            ));
        }
    }
    report.notes.extend(notes);
}
