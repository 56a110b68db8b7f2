//! `cellgate demo --smoke`: a workload through the gateway, then the
//! checks (every answer from the user's cell, money adds up, every cell's
//! invariants hold).

use std::path::Path;
use std::time::Duration;

use routing_rules::{AllHealthy, RouteAttrs, RoutingTable};
use serde_json::{json, Value};

use super::{client, post, Demo, DEMO_CELLS, SEEDED_USERS, SEED_AMOUNT};

/// Outcome of the smoke workload.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SmokeReport {
    /// Requests sent through the gateway.
    pub requests: u64,
    /// Responses from a cell other than the user's home cell.
    pub wrong_cell: Vec<String>,
    /// Unexpected statuses or bodies.
    pub failures: Vec<String>,
    /// Money deposited.
    pub deposited: i64,
    /// Money paid to merchants (left the cells).
    pub paid: i64,
    /// Sum of balances over all cells at the end.
    pub total: i128,
    /// Cross-cell transfers made.
    pub cross_cell_transfers: u64,
    /// Same-cell transfers made.
    pub local_transfers: u64,
    /// Invariant violations reported by `cell-agent check`, per cell.
    pub violations: Vec<String>,
}

impl SmokeReport {
    /// True when every check passed.
    pub fn ok(&self) -> bool {
        self.wrong_cell.is_empty()
            && self.failures.is_empty()
            && self.violations.is_empty()
            && self.total == (self.deposited - self.paid) as i128
    }
}

/// The check applied to every response: it must come from the home cell.
pub fn check_served_by(table: &RoutingTable, user: &str, x_cell: &str) -> Result<(), String> {
    let d = table
        .route(Some(user.as_bytes()), &RouteAttrs::default(), &AllHealthy)
        .map_err(|p| format!("{user}: key {}", p.as_str()))?;
    let home = table.cell_name(d.home_cell);
    if x_cell != home {
        return Err(format!("{user}: served by {x_cell:?}, home cell is {home}"));
    }
    Ok(())
}

impl Demo {
    /// Runs the smoke workload: per user, a deposit (and its retry), an
    /// order paid (and the pay retried), a transfer to the next user (and its
    /// retry) — same-cell or cross-cell; then waits for cross-cell credits,
    /// checks every cell and that total = deposits − payments.
    pub async fn smoke(&self, users: u32) -> anyhow::Result<SmokeReport> {
        let client = client();
        let gw = self.gateway.proxy_addr;
        let table = self.gateway.control.current().table.clone();
        let mut r = SmokeReport {
            deposited: SEED_AMOUNT * SEEDED_USERS.len() as i64,
            ..Default::default()
        };
        let names: Vec<String> = (0..users).map(|i| format!("smoke-{i}")).collect();
        let expect = |r: &mut SmokeReport,
                      what: &str,
                      user: &str,
                      got: (u16, String, Value),
                      want: u16|
         -> Value {
            r.requests += 1;
            if let Err(e) = check_served_by(&table, user, &got.1) {
                r.wrong_cell.push(format!("{what}: {e}"));
            }
            if got.0 != want {
                r.failures
                    .push(format!("{what} for {user}: {} {}", got.0, got.2));
            }
            got.2
        };
        for (i, user) in names.iter().enumerate() {
            let dep = json!({"amount": 10_000, "idempotency_key": format!("dep-{user}")});
            let path = format!("/v1/accounts/{user}/deposit");
            let first = expect(
                &mut r,
                "deposit",
                user,
                post(&client, gw, &path, user, dep.clone()).await?,
                200,
            );
            let retry = expect(
                &mut r,
                "deposit retry",
                user,
                post(&client, gw, &path, user, dep).await?,
                200,
            );
            if first != retry {
                r.failures
                    .push(format!("deposit retry for {user} answered differently"));
            }
            r.deposited += 10_000;
            let amount = 100 + i as i64;
            let order = expect(
                &mut r,
                "order",
                user,
                post(&client, gw, "/v1/orders", user, json!({"user": user, "amount": amount, "merchant": "m-1", "idempotency_key": format!("ord-{user}")})).await?,
                201,
            );
            let id = order["id"].as_str().unwrap_or("").to_string();
            for attempt in ["pay", "pay retry"] {
                expect(
                    &mut r,
                    attempt,
                    user,
                    post(
                        &client,
                        gw,
                        &format!("/v1/orders/{id}/pay"),
                        user,
                        json!({}),
                    )
                    .await?,
                    200,
                );
            }
            r.paid += amount;
            let to = &names[(i + 1) % names.len()];
            let tr = json!({"from": user, "to": to, "amount": 1_000 + i as i64, "idempotency_key": format!("tr-{user}")});
            let t1 = expect(
                &mut r,
                "transfer",
                user,
                post(&client, gw, "/v1/transfers", user, tr.clone()).await?,
                201,
            );
            let t2 = expect(
                &mut r,
                "transfer retry",
                user,
                post(&client, gw, "/v1/transfers", user, tr).await?,
                201,
            );
            if t1["id"] != t2["id"] {
                r.failures.push(format!(
                    "transfer retry for {user} created a second transfer"
                ));
            }
            if t1["to_cell"].is_null() {
                r.local_transfers += 1;
            } else {
                r.cross_cell_transfers += 1;
            }
        }
        // The money only adds up once every cross-cell credit has landed.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let backlog: i64 = DEMO_CELLS
                .iter()
                .map(|c| outbox_backlog(&self.data_dir.join(format!("{c}.db"))))
                .sum();
            if backlog == 0 {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                r.failures.push(format!(
                    "{backlog} cross-cell transfers still undelivered after 30 s"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for cell in DEMO_CELLS {
            let db = self.data_dir.join(format!("{cell}.db"));
            match cell_agent::check::check(&db) {
                Ok(c) => {
                    r.total += c.balance_total;
                    r.violations
                        .extend(c.violations.into_iter().map(|v| format!("{cell}: {v}")));
                }
                Err(e) => r
                    .violations
                    .push(format!("{cell}: cannot check {}: {e}", db.display())),
            }
        }
        Ok(r)
    }
}

pub(super) fn outbox_backlog(db: &Path) -> i64 {
    rusqlite_backlog(db).unwrap_or(i64::MAX / 8)
}

fn rusqlite_backlog(db: &Path) -> Option<i64> {
    let conn = cell_agent::store::sqlite::open(db, true).ok()?;
    conn.query_row(
        "SELECT COUNT(*) FROM outbox WHERE delivered_ms IS NULL",
        [],
        |r| r.get(0),
    )
    .ok()
}
