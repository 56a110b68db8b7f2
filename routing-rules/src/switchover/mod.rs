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

mod failover;
pub(crate) mod plane;

pub use failover::{failover, FailoverRequest};
pub use plane::EtcdTarget;
use plane::Plane;

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

/// Who applies rules changes (etcd history).
#[cfg(feature = "etcd")]
pub(crate) fn applied_by() -> String {
    format!(
        "cellctl@{}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into())
    )
}

/// Edits the rules file under [`lock_rules`] (so the edit never races a
/// switchover or failover): `edit` gets the current text, the revision is
/// raised, the file replaced atomically. Returns the new revision, or
/// `None` when the edit changed nothing (nothing written).
pub fn edit_rules_file(
    rules: &Path,
    edit: impl FnOnce(&str) -> Result<String>,
) -> Result<Option<u64>> {
    let _lock = lock_rules(rules).with_context(|| format!("cannot lock {}", rules.display()))?;
    let text = std::fs::read_to_string(rules)
        .with_context(|| format!("cannot read {}", rules.display()))?;
    let edited = edit(&text)?;
    if edited == text {
        return Ok(None);
    }
    let (bumped, revision) = edit::bump_revision(&edited)?;
    crate::parse_rules(&bumped)
        .map_err(|e| anyhow::anyhow!("the edit gives invalid rules: {e}"))?;
    write_atomically(rules, &bumped)?;
    Ok(Some(revision))
}

pub(crate) fn write_atomically(path: &Path, text: &str) -> Result<()> {
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
    /// Drive this etcd control plane instead of the rules file.
    pub etcd: Option<EtcdTarget>,
}

/// Checks the request against the rules and makes the plan.
pub fn plan(text: &str, req: &Request) -> Result<Plan> {
    let rules = crate::parse_rules(text).map_err(|e| anyhow::anyhow!("invalid rules: {e}"))?;
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
    /// Internal addresses from the control plane's registrations.
    registered: std::collections::BTreeMap<String, Vec<String>>,
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
        let mut addrs = self
            .rules
            .cells
            .get(cell)
            .map(|c| c.internal.clone())
            .unwrap_or_default();
        if addrs.is_empty() {
            addrs = self.registered.get(cell).cloned().unwrap_or_default();
        }
        if addrs.is_empty() {
            bail!("cell {cell} lists no `internal` address in the rules and none is registered");
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

    /// `cell`'s copy of `shard`'s shard: its role and LSN.
    async fn copy(&self, cell: &str, shard: &str) -> Result<(String, i64)> {
        let path = format!("{}{shard}", SHARDS_PATH);
        let (status, v) = self.call(cell, "GET", &path, None).await?;
        if status != 200 {
            bail!("cell {cell} has no copy of {shard}'s shard: {status} {v}");
        }
        Ok((
            v["role"].as_str().unwrap_or("").to_string(),
            v["lsn"].as_i64().unwrap_or(0),
        ))
    }
}

/// The last phase: the rules give the shard to `host` with every range's
/// epoch raised by `epochs` (1 after a promotion; 2 after a roll-back,
/// whose reopening skipped the epoch of the abandoned move), at the next
/// revision; the phase record is removed.
async fn finish(
    plane: &mut Plane,
    plan: Plan,
    (host, epochs): (&str, u32),
    result: &'static str,
    t0: Instant,
) -> Result<Outcome> {
    let (mut text, revision) = plane.rules().await?;
    for _ in 0..epochs {
        text = edit::move_shard(&text, &plan.cell, host)?;
    }
    let message = format!("{result}: cell {}'s shard held by {host}", plan.cell);
    let revision = plane.write_rules(&text, revision, &message).await?;
    plane.clear_phase().await?;
    Ok(Outcome {
        plan,
        result,
        stall_ms: t0.elapsed().as_millis() as u64,
        revision: Some(revision),
    })
}

/// Runs (or resumes) the switchover.
pub async fn run(req: &Request, secret: ClusterSecret) -> Result<Outcome> {
    let mut plane = Plane::open(&req.rules, req.etcd.as_ref()).await?;
    let (text, _) = plane.rules().await?;
    let mut plan = match plane.phase().await? {
        Some(p) => {
            if p.cell != req.cell || p.to != req.to {
                bail!(
                    "a switchover of cell {} to {} is in progress; run `cellctl switchover {} --to {}` again to finish it first",
                    p.cell, p.to, p.cell, p.to
                );
            }
            tracing::warn!(phase = %p.phase, "resuming a recorded switchover");
            p
        }
        None => {
            let p = plan(&text, req)?;
            plane.record_phase(&p).await?;
            p
        }
    };
    let agents = Agents {
        client: Client::builder(TokioExecutor::new()).build_http(),
        secret,
        rules: crate::parse_rules(&text)?,
        registered: plane.registered().await,
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
                plane.record_phase(&plan).await?;
            }
            "catch-up" => {
                let target = plan.lsn.context("the record has no demotion LSN")?;
                let deadline = Instant::now() + req.catch_up_timeout;
                let caught_up = loop {
                    match agents.copy(&plan.to, &plan.cell).await.map(|(_, lsn)| lsn) {
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
                plane.record_phase(&plan).await?;
            }
            "promote" => {
                let lsn = agents
                    .step(&plan.to, &plan.cell, "promote", &plan.ranges)
                    .await?;
                tracing::info!(cell = %plan.cell, host = %plan.to, lsn, "promoted");
                plan.phase = "route".into();
                plane.record_phase(&plan).await?;
            }
            "route" => {
                let to = plan.to.clone();
                return finish(&mut plane, plan, (&to, 1), "switched", t0).await;
            }
            "roll-back" => {
                // The target never applied the ban: the old host takes the
                // slots back under a newer epoch still.
                let back: Vec<_> = plan.ranges.iter().map(|&(f, t, e)| (f, t, e + 1)).collect();
                agents
                    .step(&plan.from, &plan.cell, "promote", &back)
                    .await?;
                let from = plan.from.clone();
                return finish(&mut plane, plan, (&from, 2), "rolled-back", t0).await;
            }
            other => bail!("unknown switchover phase {other:?}"),
        }
    }
}

/// Brings a failed-over shard home (`cellctl failback`): waits up to
/// `wait` until the shard's record says its home cell's copy is its host's
/// in-sync standby — the home cell's agents, once running, fence their
/// stale copy and their host seeds it again from a snapshot (the old
/// content kept aside) — then a switchover to the home cell.
pub async fn failback(req: &Request, secret: ClusterSecret, wait: Duration) -> Result<Outcome> {
    let cell = req.cell.as_str();
    if req.to != req.cell {
        bail!("a failback brings cell {cell}'s shard to cell {cell} itself");
    }
    let mut plane = Plane::open(&req.rules, req.etcd.as_ref()).await?;
    let (text, _) = plane.rules().await?;
    let rules = crate::parse_rules(&text).map_err(|e| anyhow::anyhow!("invalid rules: {e}"))?;
    if !rules.cells.contains_key(cell) {
        bail!("unknown cell {cell:?}");
    }
    let host = rules.host_of(cell).to_string();
    // A switchover of this shard left half done is finished by `run`.
    if host == cell && plane.phase().await?.is_none() {
        bail!("cell {cell} already holds its own shard; nothing to fail back");
    }
    let deadline = Instant::now() + wait;
    let mut last = String::new();
    loop {
        let seen = plane.record(cell).await?;
        let now = seen
            .record
            .as_ref()
            .map(|r| r.to_string())
            .unwrap_or_else(|| "no record".into());
        match &seen.record {
            Some(r) if r["state"] == "in-sync" && r["standby"] == cell => break,
            _ if host == cell => break,
            _ if Instant::now() >= deadline => bail!(
                "cell {cell}'s own copy did not become its shard's in-sync standby within {wait:?} ({}: {now}): are cell {cell}'s agents running? Once they run, cell {host} seeds their copy again by itself (see `cellctl replication status`)",
                seen.place,
            ),
            _ => {}
        }
        if now != last {
            tracing::info!(%cell, %host, record = %now, "waiting for cell's own copy to be re-seeded and in sync");
            last = now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(plane);
    run(req, secret).await
}
