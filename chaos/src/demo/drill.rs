//! The smoke run's high-availability part (rules-file mode): cell-a's
//! replicated shard switched over to its standby cell-b and back under
//! load, then both of cell-a's agents killed and the shard failed over to
//! cell-b. The load is `cellchaos`'s recording client (deposits, each with
//! its own key, retried with it) and the check is its RPO check over the
//! copies that are primary afterwards: nothing acknowledged lost, nothing
//! doubled, misplaced or reordered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use routing_rules::switchover::{self, FailoverRequest, Request};
use routing_rules::{AllHealthy, RouteAttrs, RoutingTable};
use serde_json::json;

use super::{client, post, Demo};
use crate::workload::{Outcome, Workload};

/// What the drill saw.
#[derive(Debug, Default, Clone)]
pub struct DrillReport {
    /// Writes acknowledged.
    pub acked: u64,
    /// Money the drill's deposits put in (applied, acknowledged or not).
    pub deposited: i128,
    /// Attempts by cell-a's users while the shard switched over (and back).
    pub switchover_requests: u64,
    /// Those that were not answered 200 (must be none: the gateway holds
    /// what the cells refuse while the shard moves).
    pub switchover_failed: Vec<String>,
    /// The slowest of cell-a's users' writes during the switchovers, ms.
    pub switchover_stall_ms: u64,
    /// From killing cell-a's agents to the next acknowledged write of one
    /// of its users, ms.
    pub failover_ms: u64,
    /// How long `cellctl failover` itself took, ms.
    pub failover_command_ms: u64,
    /// Acknowledged writes lost.
    pub lost: Vec<String>,
    /// Writes doubled, misplaced or reordered; money from nowhere.
    pub other_problems: Vec<String>,
    /// Money deposited besides the drill's writes (the cross-cell part).
    pub other_deposits: i64,
    /// Cross-cell transfers after the failover, to and from a user of the
    /// moved shard: problems (none when both were credited exactly once).
    pub cross_cell: Vec<String>,
}

/// Users of the drill's load, and the cell owning each one's slot.
const USERS: usize = 48;

fn homes(table: &RoutingTable) -> HashMap<String, String> {
    (0..USERS)
        .map(|i| format!("chaos-user-{i}"))
        .filter_map(|u| {
            let d = table
                .route(Some(u.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                .ok()?;
            let home = table.cell_name(d.home_cell).to_string();
            Some((u, home))
        })
        .collect()
}

impl Demo {
    /// Runs the drill. Must run after the smoke workload (cell-a's shard
    /// replicated and in sync); leaves cell-a's shard at cell-b.
    pub async fn drill(&mut self) -> anyhow::Result<DrillReport> {
        let gw = self.gateway.proxy_addr;
        let homes = homes(&self.gateway.control.current().table);
        let stop = Arc::new(AtomicBool::new(false));
        let mut w = Workload::deposits(gw, 8, Duration::from_secs(120), USERS, 7);
        w.stop = stop.clone();
        w.retry_for = Duration::from_secs(30);
        let live = w.live.clone();
        let start = Instant::now();
        let load = tokio::spawn(async move { crate::workload::run_from(&w, start).await });
        let acked = || live.ok.load(Ordering::Relaxed);
        let wait_for = |n: u64| {
            let live = live.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                while live.ok.load(Ordering::Relaxed) < n {
                    anyhow::ensure!(Instant::now() < deadline, "the drill's writes stalled");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(())
            }
        };
        let at = || start.elapsed().as_millis() as u64;
        let secret = routing_rules::auth::ClusterSecret::from_file(&self.secret_path)?;
        let switch = |to: &str| Request {
            rules: self.rules_path.clone(),
            cell: "cell-a".into(),
            to: to.into(),
            catch_up_timeout: Duration::from_secs(5),
            etcd: None,
        };
        wait_for(100).await?;
        let switching_from = at();
        for to in ["cell-b", "cell-a"] {
            let out = switchover::run(&switch(to), secret.clone()).await?;
            anyhow::ensure!(
                out.result == "switched",
                "switchover to {to}: {}",
                out.result
            );
            wait_for(acked() + 100).await?;
        }
        let switching_to = at();
        // Both of cell-a's agents die at once.
        let killed = at();
        let mut kept = Vec::new();
        for (cell, colour, agent) in self.agents.drain(..) {
            if cell == "cell-a" {
                agent.kill();
            } else {
                kept.push((cell, colour, agent));
            }
        }
        self.agents = kept;
        let req = FailoverRequest {
            rules: self.rules_path.clone(),
            cell: "cell-a".into(),
            to: "cell-b".into(),
            force: false,
            etcd: None,
        };
        let t = Instant::now();
        switchover::failover(&req, secret).await?;
        let failover_command_ms = t.elapsed().as_millis() as u64;
        wait_for(acked() + 100).await?;
        stop.store(true, Ordering::SeqCst);
        let rec = load.await?;

        let moved_user = homes
            .iter()
            .find(|(_, h)| h.as_str() == "cell-a")
            .map(|(u, _)| u.clone())
            .unwrap_or_default();
        let (other_deposits, cross_cell) = self.cross_cell_after_failover(&moved_user).await?;
        let in_a = |user: &str| homes.get(user).is_some_and(|h| h == "cell-a");
        // Every attempt while the shards switched over was answered 200
        // (only cell-a's users were affected; the others count too).
        let during: Vec<_> = rec
            .attempts
            .iter()
            .filter(|a| (switching_from..switching_to).contains(&a.at_ms))
            .collect();
        let switchover_requests = during.len() as u64;
        let switchover_failed = during
            .iter()
            .filter(|a| a.outcome != Outcome::Ok)
            .map(|a| format!("attempt ended at {} ms: {:?}", a.at_ms, a.outcome))
            .collect();
        let switchover_stall_ms = rec
            .ops
            .iter()
            .filter(|o| in_a(&o.user) && (switching_from..switching_to).contains(&o.sent_ms))
            .filter_map(|o| Some(o.acked_ms? - o.sent_ms))
            .max()
            .unwrap_or(0);
        // The first write of a cell-a user sent after the kill and
        // acknowledged.
        let first_after = rec
            .ops
            .iter()
            .filter(|o| in_a(&o.user) && o.sent_ms >= killed)
            .filter_map(|o| o.acked_ms)
            .min()
            .unwrap_or(killed);
        // The copies as they are now (cell-a's shard primary at cell-b).
        let offline =
            crate::offline::check_dir(&self.data_dir).map_err(|e| anyhow::anyhow!("{e}"))?;
        let rpo = crate::workload::verify_copies(&offline, &rec.ops, Some(&homes))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut other = Vec::new();
        other.extend(rpo.doubled.iter().map(|k| format!("doubled: {k}")));
        other.extend(rpo.misplaced.iter().map(|k| format!("misplaced: {k}")));
        other.extend(
            rpo.out_of_order
                .iter()
                .map(|k| format!("out of order: {k}")),
        );
        if rpo.applied_total != rpo.expected_total {
            other.push(format!(
                "deposits applied {} ≠ the client's applied deposits {}",
                rpo.applied_total, rpo.expected_total
            ));
        }
        Ok(DrillReport {
            acked: rpo.acked as u64,
            deposited: rpo.applied_total,
            switchover_requests,
            switchover_failed,
            switchover_stall_ms,
            failover_ms: first_after - killed,
            failover_command_ms,
            lost: rpo.lost,
            other_problems: other,
            other_deposits,
            cross_cell,
        })
    }

    /// A user of cell-c pays a user of the moved shard and is paid back:
    /// the credits go to the cell that holds the shard now (cell-b), each
    /// exactly once. Returns the money deposited for it and the problems.
    async fn cross_cell_after_failover(
        &self,
        moved_user: &str,
    ) -> anyhow::Result<(i64, Vec<String>)> {
        let gw = self.gateway.proxy_addr;
        let table = self.gateway.control.current().table.clone();
        let c_user = (0..)
            .map(|i| format!("drill-c-{i}"))
            .find(|u| {
                table
                    .route(Some(u.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                    .is_ok_and(|d| table.cell_name(d.home_cell) == "cell-c")
            })
            .unwrap_or_default();
        let client = client();
        let mut problems = Vec::new();
        let before = balance(&client, gw, moved_user).await?;
        let r = post(
            &client,
            gw,
            &format!("/v1/accounts/{c_user}/deposit"),
            &c_user,
            json!({"amount": 1_000, "idempotency_key": "drill-c-deposit"}),
        )
        .await?;
        anyhow::ensure!(r.0 == 200, "deposit for {c_user}: {} {}", r.0, r.2);
        for (from, to, amount, key) in [
            (c_user.as_str(), moved_user, 300, "drill-x-1"),
            (moved_user, c_user.as_str(), 5, "drill-x-2"),
        ] {
            let r = post(
                &client,
                gw,
                "/v1/transfers",
                from,
                json!({"from": from, "to": to, "amount": amount, "idempotency_key": key}),
            )
            .await?;
            if r.0 != 201 || r.2["to_cell"].is_null() {
                problems.push(format!("transfer {from} -> {to}: {} {}", r.0, r.2));
            }
        }
        // Delivered when both outboxes (the moved shard's copy at cell-b,
        // and cell-c's) are empty.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let backlog: i64 = ["cell-a.replica.db", "cell-c.db"]
                .iter()
                .map(|f| super::smoke::outbox_backlog(&self.data_dir.join(f)))
                .sum();
            if backlog == 0 {
                break;
            }
            if Instant::now() > deadline {
                problems.push(format!(
                    "{backlog} cross-cell credits undelivered after 20 s"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = balance(&client, gw, moved_user).await?;
        if after != before + 300 - 5 {
            problems.push(format!(
                "{moved_user}: balance {before} -> {after}, expected +295"
            ));
        }
        Ok((1_000, problems))
    }
}

async fn balance(
    client: &super::HttpClient,
    gw: std::net::SocketAddr,
    user: &str,
) -> anyhow::Result<i64> {
    let r = super::send(
        client,
        http::Method::GET,
        gw,
        &format!("/v1/accounts/{user}"),
        user,
        None,
    )
    .await?;
    r.2["balance"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("balance of {user}: {} {}", r.0, r.2))
}
