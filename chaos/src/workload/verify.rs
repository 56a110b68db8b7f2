//! The RPO check of a drill: the recorded writes against the ledgers of
//! the current primary copies.

use std::collections::HashMap;
use std::path::Path;

use serde::Serialize;

use super::{OpKind, Write};

/// What the files say about the recorded writes.
#[derive(Debug, Clone, Serialize, Default)]
pub struct RpoReport {
    /// Writes made.
    pub writes: usize,
    /// Writes acknowledged.
    pub acked: usize,
    /// Acknowledged writes found in no primary copy (RPO broken).
    pub lost: Vec<String>,
    /// Writes applied more than once (counted over the primary copies).
    pub doubled: Vec<String>,
    /// Writes found in the shard of a cell that does not own their user's
    /// slot (`KEY in CELL's shard, not HOME's`).
    pub misplaced: Vec<String>,
    /// Writes never acknowledged but applied (allowed: the client gave up
    /// after the cell had applied it).
    pub applied_unacked: usize,
    /// Writes of one user applied before a write whose acknowledgement
    /// the client had seen before sending them (`KEY after KEY`).
    pub out_of_order: Vec<String>,
    /// Minor units of the applied deposits, and of the deposits the client
    /// knows of that were applied (equal when no money appeared from
    /// nowhere).
    pub applied_total: i128,
    /// See `applied_total`.
    pub expected_total: i128,
    /// Transfers and payments the client saw acknowledged.
    pub transfers_acked: usize,
    /// See `transfers_acked`.
    pub payments_acked: usize,
    /// TCC orders whose confirm (or cancel) was acknowledged.
    pub tcc_acked: usize,
    /// Minor units paid to the workload's merchant (orders `paid` in the
    /// primary copies): money that left the wallets.
    pub paid_total: i128,
    /// Minor units of cross-cell transfers debited and not yet credited
    /// (outbox rows neither delivered nor failed).
    pub in_flight_total: i128,
}

impl RpoReport {
    /// True when nothing acknowledged was lost, nothing was doubled or
    /// reordered, and the applied money is the money written.
    pub fn ok(&self) -> bool {
        self.lost.is_empty()
            && self.doubled.is_empty()
            && self.misplaced.is_empty()
            && self.out_of_order.is_empty()
            && self.applied_total == self.expected_total
    }
}

/// Sums one integer column over a query on `conn` (0 when empty).
fn sum(conn: &rusqlite::Connection, sql: &str) -> rusqlite::Result<i128> {
    conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
        .map(|v| v.unwrap_or(0) as i128)
}

/// Where a write was applied: its (first) ledger id, how many times.
#[derive(Default, Clone, Copy)]
struct Applied {
    id: i64,
    times: i64,
}

fn cannot(path: &Path, e: rusqlite::Error) -> crate::offline::CannotCheck {
    crate::offline::CannotCheck(format!("{}: {e}", path.display()))
}

/// Checks `writes` against the ledgers of the current primary copies under
/// `dir` (see [`crate::offline::check_dir`] for which copies those are):
/// every acknowledged write is there exactly once, none is there twice, a
/// user's writes are applied in the order the client saw them
/// acknowledged, and the money applied is the money written.
pub fn verify(dir: &Path, writes: &[Write]) -> Result<RpoReport, crate::offline::CannotCheck> {
    verify_copies(&crate::offline::check_dir(dir)?, writes, None)
}

/// [`verify`] over the copies an offline check already found.
pub fn verify_copies(
    offline: &crate::offline::OfflineReport,
    writes: &[Write],
    homes: Option<&HashMap<String, String>>,
) -> Result<RpoReport, crate::offline::CannotCheck> {
    // A row of `user` in `copy`'s shard: misplaced unless it is the
    // shard of the cell owning the user's slot.
    let mut misplaced = Vec::new();
    let mut check_place = |what: &str, user: &str, shard: &str| {
        if let Some(home) = homes.and_then(|h| h.get(user)) {
            if home != shard {
                misplaced.push(format!("{what} in {shard}'s shard, not {home}'s"));
            }
        }
    };
    let mut applied: HashMap<String, Applied> = HashMap::new();
    let mut applied_total: i128 = 0;
    // Transfers by id (copies holding it); orders by id (copies, paid).
    let mut transfers: HashMap<String, i64> = HashMap::new();
    let mut orders: HashMap<String, (i64, String)> = HashMap::new();
    let (mut paid_total, mut in_flight_total): (i128, i128) = (0, 0);
    for copy in offline.copies.iter().filter(|c| c.role == "primary") {
        let conn = rusqlite::Connection::open_with_flags(
            &copy.path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .map_err(|e| cannot(&copy.path, e))?;
        let mut s = conn
            .prepare("SELECT ref, MIN(id), COUNT(*), SUM(amount), MIN(user) FROM ledger WHERE ref LIKE 'chaos-%' AND kind = 'deposit' GROUP BY ref")
            .map_err(|e| cannot(&copy.path, e))?;
        let rows = s
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| cannot(&copy.path, e))?;
        for (key, id, n, total, user) in rows {
            check_place(&key, &user, &copy.cell);
            applied_total += total as i128;
            let a = applied.entry(key).or_default();
            a.id = id;
            a.times += n;
        }
        let ids = |sql: &str| -> rusqlite::Result<Vec<(String, String, String)>> {
            let mut s = conn.prepare(sql)?;
            let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.collect()
        };
        for (id, _, user) in
            ids("SELECT id, state, from_user FROM transfers").map_err(|e| cannot(&copy.path, e))?
        {
            check_place(&format!("transfer {id}"), &user, &copy.cell);
            *transfers.entry(id).or_default() += 1;
        }
        for (id, state, user) in ids(&format!(
            "SELECT id, state, user FROM orders WHERE merchant = '{}'",
            super::MERCHANT
        ))
        .map_err(|e| cannot(&copy.path, e))?
        {
            check_place(&format!("order {id}"), &user, &copy.cell);
            let o = orders.entry(id).or_default();
            o.0 += 1;
            o.1 = state;
        }
        paid_total += sum(
            &conn,
            &format!(
                "SELECT SUM(amount) FROM orders WHERE merchant = '{}' AND state = 'paid'",
                super::MERCHANT
            ),
        )
        .map_err(|e| cannot(&copy.path, e))?;
        in_flight_total += sum(
            &conn,
            "SELECT SUM(amount) FROM outbox WHERE delivered_ms IS NULL AND failed_ms IS NULL",
        )
        .map_err(|e| cannot(&copy.path, e))?;
    }
    misplaced.sort();
    let mut r = RpoReport {
        misplaced,
        writes: writes.iter().filter(|w| w.kind != OpKind::Read).count(),
        applied_total,
        paid_total,
        in_flight_total,
        ..Default::default()
    };
    // Acknowledged transfers and payments: present once (a payment paid).
    for w in writes.iter().filter(|w| w.acked_ms.is_some()) {
        let id = w.id.clone().unwrap_or_default();
        let (copies, ok) = match w.kind {
            OpKind::Transfer => {
                r.transfers_acked += 1;
                let n = transfers.get(&id).copied().unwrap_or(0);
                (n, n > 0)
            }
            OpKind::Payment | OpKind::Tcc => {
                let want = match (w.kind, w.cancel) {
                    (OpKind::Payment, _) => {
                        r.payments_acked += 1;
                        "paid"
                    }
                    (_, false) => {
                        r.tcc_acked += 1;
                        "paid"
                    }
                    (_, true) => {
                        r.tcc_acked += 1;
                        "cancelled"
                    }
                };
                let (n, state) = orders.get(&id).cloned().unwrap_or_default();
                (n, state == want)
            }
            _ => continue,
        };
        if !ok {
            r.lost.push(format!("{} ({:?} {id})", w.key, w.kind));
        }
        if copies > 1 {
            r.doubled.push(format!("{} ({:?} {id})", w.key, w.kind));
        }
    }
    let mut by_user: HashMap<&str, Vec<(&Write, i64)>> = HashMap::new();
    for w in writes.iter().filter(|w| w.kind == OpKind::Deposit) {
        let a = applied.get(&w.key).copied().unwrap_or_default();
        if a.times > 0 {
            r.expected_total += w.amount as i128;
        }
        if w.acked_ms.is_some() {
            r.acked += 1;
            if a.times == 0 {
                r.lost.push(w.key.clone());
            } else {
                by_user.entry(&w.user).or_default().push((w, a.id));
            }
        } else if a.times > 0 {
            r.applied_unacked += 1;
        }
        if a.times > 1 {
            r.doubled.push(w.key.clone());
        }
    }
    for list in by_user.values_mut() {
        r.out_of_order.extend(out_of_order(list));
    }
    r.out_of_order.sort();
    Ok(r)
}

/// The writes of one user (with their ledger ids) applied before a write
/// the client had seen acknowledged before it sent them.
fn out_of_order(list: &mut [(&Write, i64)]) -> Vec<String> {
    let mut by_ack: Vec<(u64, i64, &str)> = list
        .iter()
        .map(|(w, id)| (w.acked_ms.unwrap_or(u64::MAX), *id, w.key.as_str()))
        .collect();
    by_ack.sort();
    list.sort_by_key(|(w, _)| w.sent_ms);
    let mut out = Vec::new();
    let (mut next, mut max_before): (usize, Option<(i64, &str)>) = (0, None);
    for (w, id) in list.iter() {
        while next < by_ack.len() && by_ack[next].0 < w.sent_ms {
            if max_before.is_none_or(|(m, _)| by_ack[next].1 > m) {
                max_before = Some((by_ack[next].1, by_ack[next].2));
            }
            next += 1;
        }
        if let Some((m, k)) = max_before {
            if m > *id {
                out.push(format!("{} after {k}", w.key));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(key: &str, sent: u64, acked: u64) -> Write {
        Write {
            kind: OpKind::Deposit,
            client: 0,
            seq: sent,
            user: "u".into(),
            to: None,
            id: None,
            cancel: false,
            tried: false,
            refused: false,
            key: key.into(),
            amount: 1,
            due_ms: sent,
            sent_ms: sent,
            acked_ms: Some(acked),
            attempts: 1,
            last_status: Some(200),
            cell: None,
        }
    }

    #[test]
    fn a_write_applied_before_one_acknowledged_earlier_is_out_of_order() {
        let (a, b, c) = (w("a", 0, 10), w("b", 20, 30), w("c", 5, 40));
        // a acked before b was sent, yet b has the smaller id.
        let mut list = vec![(&a, 5), (&b, 3), (&c, 4)];
        assert_eq!(out_of_order(&mut list), vec!["b after a".to_string()]);
        // c overlapped a: any order is fine.
        let mut list = vec![(&a, 5), (&b, 6), (&c, 1)];
        assert!(out_of_order(&mut list).is_empty());
    }
}

#[cfg(test)]
mod placement {
    use super::*;
    use crate::offline::{Copy, OfflineReport};

    /// A primary copy of `cell`'s shard with just the tables the check
    /// reads, holding one deposit, one transfer and one order of `user`.
    fn copy(dir: &Path, cell: &str, user: &str) -> Copy {
        let path = dir.join(format!("{cell}.db"));
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "CREATE TABLE ledger (id INTEGER PRIMARY KEY, user TEXT, kind TEXT, amount INTEGER, ref TEXT);
             CREATE TABLE transfers (id TEXT, state TEXT, from_user TEXT);
             CREATE TABLE orders (id TEXT, state TEXT, user TEXT, merchant TEXT, amount INTEGER);
             CREATE TABLE outbox (amount INTEGER, delivered_ms INTEGER, failed_ms INTEGER);
             INSERT INTO ledger (user, kind, amount, ref) VALUES ('{user}', 'deposit', 5, 'chaos-1-0-{cell}');
             INSERT INTO transfers VALUES ('t-{cell}', 'settled', '{user}');
             INSERT INTO orders VALUES ('o-{cell}', 'paid', '{user}', '{}', 3);",
            super::super::MERCHANT
        ))
        .unwrap();
        Copy {
            path,
            cell: cell.into(),
            role: "primary",
            lsn: 0,
            timeline: String::new(),
            timeline_since: 0,
            balance_total: 0,
            ledger_entries: 1,
            violations: vec![],
        }
    }

    #[test]
    fn a_write_in_a_shard_that_does_not_own_its_user_is_misplaced() {
        let dir = tempfile::tempdir().unwrap();
        let offline = OfflineReport {
            copies: vec![
                copy(dir.path(), "cell-a", "alice"),
                copy(dir.path(), "cell-b", "alice"),
            ],
            ..Default::default()
        };
        let homes: HashMap<String, String> = [("alice".to_string(), "cell-a".to_string())].into();
        let r = verify_copies(&offline, &[], Some(&homes)).unwrap();
        assert_eq!(
            r.misplaced,
            vec![
                "chaos-1-0-cell-b in cell-b's shard, not cell-a's",
                "order o-cell-b in cell-b's shard, not cell-a's",
                "transfer t-cell-b in cell-b's shard, not cell-a's",
            ]
        );
        assert!(!r.ok());
        // Without the owners (the offline `check`), nothing is judged.
        assert!(verify_copies(&offline, &[], None)
            .unwrap()
            .misplaced
            .is_empty());
    }
}
