//! `cell-agent check`: verifies a cell database's invariants offline.

use std::path::Path;

use rusqlite::Connection;
use serde::Serialize;

/// Result of a check.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    /// Accounts checked.
    pub accounts: i64,
    /// Ledger entries checked.
    pub ledger_entries: i64,
    /// Orders checked.
    pub orders: i64,
    /// Sum of balances (summed in 128 bits: many balances near `i64::MAX`
    /// add up past 64 bits).
    pub balance_total: i128,
    /// Money that entered the cell (deposits + cross-cell credits + refunds
    /// of failed cross-cell transfers).
    pub money_in: i128,
    /// Money that left the cell (order debits + cross-cell transfers out).
    pub money_out: i128,
    /// Every violation found (empty = the database is consistent).
    pub violations: Vec<String>,
}

impl CheckReport {
    /// True when no invariant is violated.
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }
}

fn q(conn: &Connection, sql: &str) -> rusqlite::Result<i64> {
    conn.query_row(sql, [], |r| r.get(0))
}

/// Sums a column of integers in 128 bits (SQLite's SUM stops at 64).
pub fn sum(conn: &Connection, sql: &str) -> rusqlite::Result<i128> {
    let mut s = conn.prepare(sql)?;
    let mut rows = s.query([])?;
    let mut total = 0i128;
    while let Some(r) = rows.next()? {
        total += r.get::<_, i64>(0)? as i128;
    }
    Ok(total)
}

fn list(conn: &Connection, sql: &str) -> rusqlite::Result<Vec<String>> {
    let mut s = conn.prepare(sql)?;
    let rows = s.query_map([], |r| r.get::<_, String>(0))?;
    rows.collect()
}

/// Checks the invariants of the database at `path` (opened read-only):
/// every balance and frozen amount equals the sum of its ledger; no negative
/// available balance; no order debited twice (paid orders exactly once,
/// others never); the cell's total equals money in minus money out; local
/// transfers conserve money; every cross-cell transfer has its outbox record
/// (unless it was closed before the pruning horizon); every ledger entry in a
/// fenced slot was written while the slot was open in this store.
pub fn check(path: &Path) -> rusqlite::Result<CheckReport> {
    if !path.exists() {
        return Err(rusqlite::Error::InvalidPath(path.to_path_buf()));
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // One read transaction: every query below sees the same snapshot, so a
    // file checked while its agents write (a drill's live watch) is judged
    // on one consistent state, not on totals read between two commits.
    conn.execute_batch("BEGIN")?;
    let mut r = CheckReport {
        accounts: q(&conn, "SELECT COUNT(*) FROM accounts")?,
        ledger_entries: q(&conn, "SELECT COUNT(*) FROM ledger")?,
        orders: q(&conn, "SELECT COUNT(*) FROM orders")?,
        balance_total: sum(&conn, "SELECT balance FROM accounts")?,
        ..Default::default()
    };
    r.violations.extend(list(
        &conn,
        "SELECT 'account ' || a.user || ': balance ' || a.balance || ' but ledger sums to ' || COALESCE(SUM(l.balance_delta), 0)
           || ', frozen ' || a.frozen || ' but ledger sums to ' || COALESCE(SUM(l.frozen_delta), 0)
         FROM accounts a LEFT JOIN ledger l ON l.user = a.user
         GROUP BY a.user
         HAVING a.balance != COALESCE(SUM(l.balance_delta), 0) OR a.frozen != COALESCE(SUM(l.frozen_delta), 0)",
    )?);
    r.violations.extend(list(
        &conn,
        "SELECT 'account ' || user || ': negative available balance ' || (balance - frozen) || ' (frozen ' || frozen || ')'
         FROM accounts WHERE frozen < 0 OR balance - frozen < 0",
    )?);
    r.violations.extend(list(
        &conn,
        "SELECT 'ledger entry ' || id || ' of ' || user || ' does not follow from the previous entry'
         FROM (SELECT id, user, balance_after, frozen_after, balance_delta, frozen_delta,
                      LAG(balance_after) OVER (PARTITION BY user ORDER BY id) AS pb,
                      LAG(frozen_after) OVER (PARTITION BY user ORDER BY id) AS pf
               FROM ledger)
         WHERE balance_after != COALESCE(pb, 0) + balance_delta OR frozen_after != COALESCE(pf, 0) + frozen_delta",
    )?);
    r.violations.extend(list(
        &conn,
        "SELECT 'order ' || o.id || ' (' || o.state || ') was debited ' || COUNT(l.id) || ' time(s)'
         FROM orders o LEFT JOIN ledger l ON l.ref = 'order:' || o.id AND l.kind = 'debit'
         GROUP BY o.id
         HAVING (o.state = 'paid' AND COUNT(l.id) != 1) OR (o.state != 'paid' AND COUNT(l.id) != 0)",
    )?);
    r.violations.extend(list(
        &conn,
        "SELECT 'order ' || o.id || ' (' || o.state || ') has ' || (COALESCE(SUM(l.frozen_delta), 0)) || ' frozen'
         FROM orders o LEFT JOIN ledger l ON l.ref = 'order:' || o.id
         GROUP BY o.id
         HAVING (o.state = 'tried' AND COALESCE(SUM(l.frozen_delta), 0) != o.amount)
             OR (o.state != 'tried' AND COALESCE(SUM(l.frozen_delta), 0) != 0)",
    )?);
    let kind = |k: &str| {
        sum(
            &conn,
            &format!("SELECT amount FROM ledger WHERE kind = '{k}'"),
        )
    };
    let deposits = kind("deposit")?;
    let credits = kind("credit")?;
    let debits = kind("debit")?;
    let refunds = kind("refund")?;
    let out_all = kind("transfer_out")?;
    let in_local = kind("transfer_in")?;
    let out_remote = sum(
        &conn,
        "SELECT amount FROM transfers WHERE to_cell IS NOT NULL",
    )?;
    r.money_in = deposits + credits + refunds;
    r.money_out = debits + out_remote;
    if r.balance_total != r.money_in - r.money_out {
        r.violations.push(format!(
            "cell total {} != deposits {deposits} + credits in {credits} + refunds {refunds} - debits {debits} - transfers out {out_remote}",
            r.balance_total
        ));
    }
    if in_local != out_all - out_remote {
        r.violations.push(format!(
            "local transfers do not conserve money: {} left payers, {in_local} reached payees",
            out_all - out_remote
        ));
    }
    r.violations.extend(list(
        &conn,
        "SELECT 'cross-cell transfer ' || t.id || ' has no outbox record'
         FROM transfers t LEFT JOIN outbox o ON o.transfer_id = t.id
         WHERE t.to_cell IS NOT NULL AND o.id IS NULL
           AND NOT (t.state IN ('delivered', 'failed')
                    AND t.updated_ms < COALESCE((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'outbox_pruned_before_ms'), 0))",
    )?);
    r.violations.extend(list(
        &conn,
        "SELECT 'transfer ' || t.id || ' (' || t.state || ') was refunded ' || COUNT(l.id) || ' time(s)'
         FROM transfers t LEFT JOIN ledger l ON l.ref = 'transfer:' || t.id AND l.kind = 'refund'
         GROUP BY t.id
         HAVING (t.state = 'failed' AND (COUNT(l.id) != 1 OR COALESCE(SUM(l.amount), 0) != t.amount))
             OR (t.state != 'failed' AND COUNT(l.id) != 0)",
    )?);
    // Slot ownership: every ledger row written since the store began to
    // fence (its first slot-log entry) in a slot the log covers was written
    // while that slot was open here.
    let fenced: i64 = q(
        &conn,
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = 'slot_log'",
    )?;
    if fenced > 0 {
        r.violations.extend(list(
            &conn,
            "SELECT 'ledger entry ' || id || ' of ' || user || ' (slot ' || slot || ') was written while the slot was '
                    || COALESCE(state, 'never open') || ' in this store'
             FROM (SELECT l.id AS id, l.user AS user, a.slot AS slot,
                     (SELECT s.state FROM slot_log s
                       WHERE s.from_slot <= a.slot AND a.slot <= s.to_slot AND s.ledger_high < l.id
                       ORDER BY s.id DESC LIMIT 1) AS state
                   FROM ledger l JOIN accounts a ON a.user = l.user
                   WHERE l.id > (SELECT MIN(ledger_high) FROM slot_log)
                     AND EXISTS (SELECT 1 FROM slot_log s WHERE s.from_slot <= a.slot AND a.slot <= s.to_slot))
             WHERE state IS NOT 'open'",
        )?);
    }
    conn.execute_batch("COMMIT")?;
    Ok(r)
}
