//! The smoke run's high-availability part (rules-file mode): cell-a's
//! replicated shard switched over to its standby cell-b and back under
//! load, then both of cell-a's agents killed and the shard failed over to
//! cell-b — with every acknowledged write checked in the promoted copy.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use routing_rules::switchover::{self, FailoverRequest, Request};
use routing_rules::{AllHealthy, RouteAttrs};
use serde_json::json;

use super::{client, post, Demo};

/// What the drill saw.
#[derive(Debug, Default, Clone)]
pub struct DrillReport {
    /// Writes acknowledged (each a deposit of 1 with its own key).
    pub acked: u64,
    /// Requests sent while the shard switched over (and back).
    pub switchover_requests: u64,
    /// Answers other than 200 while it switched over (must be none: the
    /// gateway holds what the cells refuse while the shard moves).
    pub switchover_failed: Vec<String>,
    /// The slowest write during the switchovers, ms.
    pub switchover_stall_ms: u64,
    /// From killing cell-a's agents to the next acknowledged write, ms.
    pub failover_ms: u64,
    /// How long `cellctl failover` itself took, ms.
    pub failover_command_ms: u64,
    /// Acknowledged writes missing from (or doubled in) the promoted copy.
    pub lost: Vec<String>,
    /// Money deposited besides the drill's writes (the cross-cell part).
    pub other_deposits: i64,
    /// Cross-cell transfers after the failover, to and from a user of the
    /// moved shard: problems (none when both were credited exactly once).
    pub cross_cell: Vec<String>,
}

/// Which phase the writers are in.
const SWITCHING: u8 = 0;
const FAILING_OVER: u8 = 1;

struct Shared {
    phase: AtomicU8,
    stop: AtomicBool,
    /// (sent, acknowledged, key) of every acknowledged write.
    acked: Mutex<Vec<(Instant, Instant, String)>>,
    failed: Mutex<Vec<String>>,
    slowest_switching: Mutex<Duration>,
    requests_switching: Mutex<u64>,
}

impl Demo {
    /// Runs the drill. Must run after the smoke workload (cell-a's shard
    /// replicated and in sync); leaves cell-a's shard at cell-b.
    pub async fn drill(&mut self) -> anyhow::Result<DrillReport> {
        let gw = self.gateway.proxy_addr;
        let table = self.gateway.control.current().table.clone();
        let users: Vec<String> = (0..)
            .map(|i| format!("drill-{i}"))
            .filter(|u| {
                table
                    .route(Some(u.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                    .is_ok_and(|d| table.cell_name(d.home_cell) == "cell-a")
            })
            .take(8)
            .collect();
        let shared = Arc::new(Shared {
            phase: AtomicU8::new(SWITCHING),
            stop: AtomicBool::new(false),
            acked: Mutex::default(),
            failed: Mutex::default(),
            slowest_switching: Mutex::default(),
            requests_switching: Mutex::default(),
        });
        let writers: Vec<_> = users
            .iter()
            .cloned()
            .map(|user| tokio::spawn(writer(gw, user, shared.clone())))
            .collect();
        let acked = |s: &Shared| s.acked.lock().map(|a| a.len()).unwrap_or(0);
        let wait_for = |n: usize| {
            let shared = shared.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(30);
                while acked(&shared) < n {
                    anyhow::ensure!(Instant::now() < deadline, "the drill's writes stalled");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok(())
            }
        };
        let secret = routing_rules::auth::ClusterSecret::from_file(&self.secret_path)?;
        let switch = |to: &str| Request {
            rules: self.rules_path.clone(),
            cell: "cell-a".into(),
            to: to.into(),
            catch_up_timeout: Duration::from_secs(5),
            etcd: None,
        };
        wait_for(100).await?;
        for to in ["cell-b", "cell-a"] {
            let out = switchover::run(&switch(to), secret.clone()).await?;
            anyhow::ensure!(
                out.result == "switched",
                "switchover to {to}: {}",
                out.result
            );
            wait_for(acked(&shared) + 100).await?;
        }
        // Both of cell-a's agents die at once.
        shared.phase.store(FAILING_OVER, Ordering::SeqCst);
        let killed = Instant::now();
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
        wait_for(acked(&shared) + 100).await?;
        shared.stop.store(true, Ordering::SeqCst);
        for w in writers {
            let _ = w.await;
        }

        let (other_deposits, cross_cell) = self.cross_cell_after_failover(&users[0]).await?;
        let acked: Vec<(Instant, Instant, String)> =
            shared.acked.lock().map(|a| a.clone()).unwrap_or_default();
        // The first write sent after the kill that was acknowledged.
        let first_after = acked
            .iter()
            .filter(|(sent, _, _)| *sent > killed)
            .map(|(_, at, _)| *at)
            .min()
            .unwrap_or(killed);
        let copy = self.data_dir.join("cell-a.replica.db");
        let rows = deposits(&copy)?;
        let lost = acked
            .iter()
            .filter(|(_, _, k)| rows.get(k) != Some(&1))
            .map(|(_, _, k)| k.clone())
            .collect();
        let switchover_requests = *shared
            .requests_switching
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        Ok(DrillReport {
            acked: acked.len() as u64,
            switchover_requests,
            switchover_failed: shared.failed.lock().map(|f| f.clone()).unwrap_or_default(),
            switchover_stall_ms: shared
                .slowest_switching
                .lock()
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            failover_ms: (first_after - killed).as_millis() as u64,
            failover_command_ms,
            lost,
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

/// One user's deposits, each retried with its key until acknowledged.
async fn writer(gw: std::net::SocketAddr, user: String, s: Arc<Shared>) {
    let client = client();
    let mut n = 0u64;
    while !s.stop.load(Ordering::SeqCst) {
        let key = format!("{user}-{n}");
        n += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let switching = s.phase.load(Ordering::SeqCst) == SWITCHING;
            let t = Instant::now();
            let r = post(
                &client,
                gw,
                &format!("/v1/accounts/{user}/deposit"),
                &user,
                json!({"amount": 1, "idempotency_key": key}),
            )
            .await;
            // A request the kill overtook belongs to the failover.
            let switching = switching && s.phase.load(Ordering::SeqCst) == SWITCHING;
            if switching {
                *s.requests_switching
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) += 1;
                let mut slowest = s
                    .slowest_switching
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                *slowest = (*slowest).max(t.elapsed());
            }
            match r {
                Ok((200, _, _)) => {
                    if let Ok(mut a) = s.acked.lock() {
                        a.push((t, Instant::now(), key));
                    }
                    break;
                }
                other => {
                    if switching {
                        if let Ok(mut f) = s.failed.lock() {
                            f.push(format!("{key}: {other:?}"));
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// Deposit keys in a shard file with their count.
fn deposits(db: &std::path::Path) -> anyhow::Result<std::collections::HashMap<String, i64>> {
    let c = cell_agent::store::sqlite::open(db, true)?;
    let mut s =
        c.prepare("SELECT ref, COUNT(*) FROM ledger WHERE kind = 'deposit' GROUP BY ref")?;
    let rows = s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
