//! Drives a planned switchover of a cell's shard to its standby, with the
//! rules in a file (the embedded mode): every phase is recorded in a state
//! file next to the rules (`RULES.switchover.json`) before it runs, so a
//! crashed run is finished (or rolled back) by running the same command
//! again.
//!
//! Phases: `demote` (the current host bans the shard's slots at epoch+1
//! and becomes a replica; its LSN L) → `catch-up` (wait until the target's
//! copy applied L; on timeout roll back: the old host is promoted again at
//! epoch+2) → `promote` (the target's copy becomes the primary at epoch+1)
//! → `route` (the rules move the shard: `hosted_by`, epochs +1, next
//! revision) → done (state file removed).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

use crate::auth::ClusterSecret;
use crate::edit;

/// The prefix of the agents' shard endpoints (internal listener):
/// `GET PREFIX/CELL`, `POST PREFIX/CELL/demote`, `POST PREFIX/CELL/promote`.
pub const SHARDS_PATH: &str = "/v1/internal/shards/";

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Who signs the steps.
const OPERATOR: &str = "operator";

/// A switchover in progress, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The cell whose shard moves.
    pub cell: String,
    /// Its host before.
    pub from: String,
    /// Its host after.
    pub to: String,
    /// Its ranges at their new epochs.
    pub ranges: Vec<(u32, u32, u64)>,
    /// The phase about to run (or running).
    pub phase: String,
    /// The LSN of the demotion, once known.
    pub lsn: Option<i64>,
    /// When it started (unix ms).
    pub started_ms: i64,
}

/// What a finished switchover did.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// The plan.
    pub plan: Plan,
    /// `switched` or `rolled-back`.
    pub result: &'static str,
    /// Time from the ban to the rules moving the shard (writes of the
    /// shard's users stall meanwhile), ms.
    pub stall_ms: u64,
    /// The rules revision written.
    pub revision: Option<u64>,
}

/// In the embedded mode (a rules file), where the replication record of
/// `cell`'s shard is kept for the operators' tools: next to the rules, as
/// etcd keeps it under `replication/CELL`.
pub fn record_path(rules: &Path, cell: &str) -> PathBuf {
    crate::files::record_path(rules, cell)
}

/// The lock (an advisory file lock next to the rules) that makes "go on
/// without the standby" (an agent) and "fail over to the standby"
/// (`cellctl failover`) exclude each other: the agent records degraded only
/// after checking, under the lock, that its shard has not moved; the
/// failover checks the record and moves the shard under the same lock.
pub fn lock_rules(rules: &Path) -> std::io::Result<std::fs::File> {
    let path = crate::files::lock_path(rules);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)?;
    // fs4 (an flock on Unix): std's File::lock needs Rust 1.89, above
    // the workspace's MSRV.
    fs4::FileExt::lock(&f)?;
    Ok(f)
}

/// Where the state of a switchover of the rules at `rules` is kept.
pub fn state_path(rules: &Path) -> PathBuf {
    crate::files::switchover_path(rules)
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn record(state: &Path, plan: &Plan) -> Result<()> {
    write_atomically(state, &serde_json::to_string_pretty(plan)?)
}

/// The switchover's parameters.
#[derive(Debug, Clone)]
pub struct Request {
    /// The rules file.
    pub rules: PathBuf,
    /// The cell whose shard moves.
    pub cell: String,
    /// Where to (its standby; or the cell itself to bring it home).
    pub to: String,
    /// How long the target may take to apply the demotion.
    pub catch_up_timeout: Duration,
}

/// Checks the request against the rules and makes the plan.
pub fn plan(text: &str, req: &Request) -> Result<Plan> {
    let rules = crate::parse_rules(text)
        .map_err(|e| anyhow::anyhow!("{}: invalid rules: {e}", req.rules.display()))?;
    let (cell, to) = (req.cell.as_str(), req.to.as_str());
    if !rules.cells.contains_key(cell) {
        bail!("cell {cell:?} is not defined in the rules");
    }
    if !rules.cells.contains_key(to) {
        bail!("--to {to:?}: no such cell in the rules");
    }
    let from = rules.host_of(cell).to_string();
    if from == to {
        bail!("cell {cell}'s shard is already held by {to}: nothing to do");
    }
    let standby = rules.standby_of(cell);
    if standby != Some(to) {
        bail!(
            "cell {to} is not the standby of cell {cell}'s shard (its standby: {}); a switchover moves a shard only to its synchronous standby",
            standby.unwrap_or("none")
        );
    }
    let ranges = edit::shard_ranges(text, cell)?
        .into_iter()
        .map(|(f, t, e)| (f, t, e + 1))
        .collect::<Vec<_>>();
    if ranges.is_empty() {
        bail!("cell {cell} owns no slots: nothing to move");
    }
    Ok(Plan {
        cell: cell.into(),
        from,
        to: to.into(),
        ranges,
        phase: "demote".into(),
        lsn: None,
        started_ms: unix_ms(),
    })
}

/// Signed calls to the agents' internal listeners.
struct Agents {
    client: Client<HttpConnector, Full<Bytes>>,
    secret: ClusterSecret,
    rules: crate::Rules,
}

impl Agents {
    /// `method path` on any agent of `cell` (its rules `internal`
    /// addresses, first that answers).
    async fn call(
        &self,
        cell: &str,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let addrs = self
            .rules
            .cells
            .get(cell)
            .map(|c| c.internal.clone())
            .unwrap_or_default();
        if addrs.is_empty() {
            bail!("cell {cell} lists no `internal` address in the rules");
        }
        let body = Bytes::from(body.map(|b| b.to_string()).unwrap_or_default());
        let mut last = String::new();
        for addr in &addrs {
            let mut req = http::Request::builder()
                .method(method)
                .uri(format!("http://{addr}{path}"))
                .header("content-type", "application/json");
            for (name, value) in self.secret.sign(method, path, OPERATOR, unix_ms(), &body) {
                req = req.header(name, value);
            }
            let req = req.body(Full::new(body.clone()))?;
            match tokio::time::timeout(Duration::from_secs(10), self.client.request(req)).await {
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    let bytes = resp.into_body().collect().await?.to_bytes();
                    let v = serde_json::from_slice(&bytes)
                        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned().into());
                    if status >= 500 {
                        last = format!("{addr}: {status} {v}");
                        continue;
                    }
                    return Ok((status, v));
                }
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: timed out"),
            }
        }
        bail!("no agent of cell {cell} answered {method} {path}: {last}")
    }

    async fn step(
        &self,
        cell: &str,
        shard: &str,
        action: &str,
        ranges: &[(u32, u32, u64)],
    ) -> Result<i64> {
        self.step_with(cell, shard, action, serde_json::json!({ "ranges": ranges }))
            .await
    }

    async fn step_with(
        &self,
        cell: &str,
        shard: &str,
        action: &str,
        body: serde_json::Value,
    ) -> Result<i64> {
        let path = format!("{}{shard}/{action}", SHARDS_PATH);
        let (status, v) = self.call(cell, "POST", &path, Some(body)).await?;
        if status != 200 {
            bail!("cell {cell} refused to {action} its copy of {shard}'s shard: {status} {v}");
        }
        v["lsn"]
            .as_i64()
            .with_context(|| format!("cell {cell} answered {action} without an LSN: {v}"))
    }

    async fn applied(&self, cell: &str, shard: &str) -> Result<i64> {
        let path = format!("{}{shard}", SHARDS_PATH);
        let (status, v) = self.call(cell, "GET", &path, None).await?;
        if status != 200 {
            bail!("cell {cell} has no copy of {shard}'s shard: {status} {v}");
        }
        Ok(v["lsn"].as_i64().unwrap_or(0))
    }
}

/// The last phase: the rules give the shard to `host` with every range's
/// epoch raised by `epochs` (1 after a promotion; 2 after a roll-back,
/// whose reopening skipped the epoch of the abandoned move), at the next
/// revision; the record is removed.
fn finish(
    req: &Request,
    state: &Path,
    plan: Plan,
    (host, epochs): (&str, u32),
    result: &'static str,
    t0: Instant,
) -> Result<Outcome> {
    let mut text = std::fs::read_to_string(&req.rules)?;
    for _ in 0..epochs {
        text = edit::move_shard(&text, &plan.cell, host)?;
    }
    let (next, revision) = edit::bump_revision(&text)?;
    write_atomically(&req.rules, &next)?;
    std::fs::remove_file(state).ok();
    Ok(Outcome {
        plan,
        result,
        stall_ms: t0.elapsed().as_millis() as u64,
        revision: Some(revision),
    })
}

/// Runs (or resumes) the switchover.
pub async fn run(req: &Request, secret: ClusterSecret) -> Result<Outcome> {
    let state = state_path(&req.rules);
    let text = std::fs::read_to_string(&req.rules)
        .with_context(|| format!("cannot read {}", req.rules.display()))?;
    let mut plan = match std::fs::read_to_string(&state) {
        Ok(recorded) => {
            let p: Plan = serde_json::from_str(&recorded)
                .with_context(|| format!("{} is not a switchover record", state.display()))?;
            if p.cell != req.cell || p.to != req.to {
                bail!(
                    "a switchover of cell {} to {} is in progress ({}); run `cellctl switchover {} --to {}` again to finish it first",
                    p.cell, p.to, state.display(), p.cell, p.to
                );
            }
            tracing::warn!(phase = %p.phase, "resuming a recorded switchover");
            p
        }
        Err(_) => {
            let p = plan(&text, req)?;
            record(&state, &p)?;
            p
        }
    };
    let agents = Agents {
        client: Client::builder(TokioExecutor::new()).build_http(),
        secret,
        rules: crate::parse_rules(&text)?,
    };
    let t0 = Instant::now();
    loop {
        match plan.phase.as_str() {
            "demote" => {
                let lsn = agents
                    .step(&plan.from, &plan.cell, "demote", &plan.ranges)
                    .await?;
                tracing::info!(cell = %plan.cell, host = %plan.from, lsn, "demoted: the slots are banned");
                plan.lsn = Some(lsn);
                plan.phase = "catch-up".into();
                record(&state, &plan)?;
            }
            "catch-up" => {
                let target = plan.lsn.context("the record has no demotion LSN")?;
                let deadline = Instant::now() + req.catch_up_timeout;
                let caught_up = loop {
                    match agents.applied(&plan.to, &plan.cell).await {
                        Ok(lsn) if lsn >= target => break true,
                        Ok(_) | Err(_) if Instant::now() >= deadline => break false,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the target's position yet")
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                };
                plan.phase = if caught_up { "promote" } else { "roll-back" }.into();
                record(&state, &plan)?;
            }
            "promote" => {
                let lsn = agents
                    .step(&plan.to, &plan.cell, "promote", &plan.ranges)
                    .await?;
                tracing::info!(cell = %plan.cell, host = %plan.to, lsn, "promoted");
                plan.phase = "route".into();
                record(&state, &plan)?;
            }
            "route" => {
                let (to, epochs) = (plan.to.clone(), 1);
                return finish(req, &state, plan, (&to, epochs), "switched", t0);
            }
            "roll-back" => {
                // The target never applied the ban: the old host takes the
                // slots back under a newer epoch still.
                let back: Vec<_> = plan.ranges.iter().map(|&(f, t, e)| (f, t, e + 1)).collect();
                agents
                    .step(&plan.from, &plan.cell, "promote", &back)
                    .await?;
                let from = plan.from.clone();
                return finish(req, &state, plan, (&from, 2), "rolled-back", t0);
            }
            other => bail!("{}: unknown phase {other:?}", state.display()),
        }
    }
}

/// An unplanned failover's parameters (the embedded mode).
#[derive(Debug, Clone)]
pub struct FailoverRequest {
    /// The rules file.
    pub rules: PathBuf,
    /// The cell whose shard's host is lost.
    pub cell: String,
    /// Its standby, whose copy is promoted.
    pub to: String,
    /// Promote even when the shard's record does not say the standby has
    /// every acknowledged write (degraded, missing, another standby): the
    /// writes it lacks are lost.
    pub force: bool,
}

/// Fails `cell`'s shard over to its standby: under the rules' lock, checks
/// that the shard's replication record says the standby is in sync (so it
/// holds every acknowledged write), promotes the standby's copy at epoch+1
/// and moves the shard in the rules. The lost host's copy, if it still runs,
/// can acknowledge nothing more: its standby refuses its journal, and it
/// may not go on without one while the rules give its shard to another
/// cell. Safe to run again if cut off.
pub async fn failover(req: &FailoverRequest, secret: ClusterSecret) -> Result<Outcome> {
    let rules_path = req.rules.clone();
    let _lock = tokio::task::spawn_blocking(move || lock_rules(&rules_path))
        .await?
        .with_context(|| format!("cannot lock {}", req.rules.display()))?;
    let state = state_path(&req.rules);
    if state.exists() {
        bail!(
            "a switchover is in progress ({}): finish it with `cellctl switchover` first",
            state.display()
        );
    }
    let text = std::fs::read_to_string(&req.rules)
        .with_context(|| format!("cannot read {}", req.rules.display()))?;
    let rules = crate::parse_rules(&text)
        .map_err(|e| anyhow::anyhow!("{}: invalid rules: {e}", req.rules.display()))?;
    let (cell, to) = (req.cell.as_str(), req.to.as_str());
    if !rules.cells.contains_key(cell) {
        bail!("cell {cell:?} is not defined in the rules");
    }
    if !rules.cells.contains_key(to) {
        bail!("--to {to:?}: no such cell in the rules");
    }
    let from = rules.host_of(cell).to_string();
    if from == to {
        bail!("cell {cell}'s shard is already held by {to}: nothing to do");
    }
    let standby = rules.standby_of(cell);
    if standby != Some(to) {
        bail!(
            "cell {to} is not the standby of cell {cell}'s shard (its standby: {}): only the standby has a copy of the data",
            standby.unwrap_or("none")
        );
    }
    let record_file = record_path(&req.rules, cell);
    let record: Option<serde_json::Value> = std::fs::read_to_string(&record_file)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let problem = match &record {
        None => Some(format!(
            "no replication record of cell {cell}'s shard ({}): nothing says {to} has every acknowledged write",
            record_file.display()
        )),
        Some(r) if r["state"] != "in-sync" => Some(format!(
            "cell {cell}'s shard runs without a synchronous standby since {} (its record: {}): {to} may lack acknowledged writes",
            r["since_ms"], record_file.display()
        )),
        Some(r) if r["standby"] != to => Some(format!(
            "cell {cell}'s shard was last replicated to {}, not {to}",
            r["standby"]
        )),
        Some(_) => None,
    };
    if let Some(p) = problem {
        if !req.force {
            bail!(
                "{p}; refusing to fail over (--force accepts losing the writes the standby lacks)"
            );
        }
        tracing::warn!(problem = %p, "failing over anyway (--force): writes the standby lacks are lost");
    }
    let ranges: Vec<(u32, u32, u64)> = edit::shard_ranges(&text, cell)?
        .into_iter()
        .map(|(f, t, e)| (f, t, e + 1))
        .collect();
    if ranges.is_empty() {
        bail!("cell {cell} owns no slots: nothing to fail over");
    }
    let agents = Agents {
        client: Client::builder(TokioExecutor::new()).build_http(),
        secret,
        rules,
    };
    let t0 = Instant::now();
    // The new host's standby is the lost cell: it runs degraded from the
    // start instead of holding its first writes for the sync timeout.
    let lsn = agents
        .step_with(
            to,
            cell,
            "promote",
            serde_json::json!({ "ranges": ranges, "standby_lost": true }),
        )
        .await?;
    tracing::warn!(%cell, host = %to, lsn, "failed over: the standby's copy is the primary");
    let moved = edit::move_shard(&text, cell, to)?;
    let (next, revision) = edit::bump_revision(&moved)?;
    write_atomically(&req.rules, &next)?;
    Ok(Outcome {
        plan: Plan {
            cell: cell.into(),
            from,
            to: to.into(),
            ranges,
            phase: "done".into(),
            lsn: Some(lsn),
            started_ms: unix_ms(),
        },
        result: "failed-over",
        stall_ms: t0.elapsed().as_millis() as u64,
        revision: Some(revision),
    })
}
