//! An unplanned failover: the shard's host is lost, its standby's copy is
//! promoted.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::{unix_ms, Agents, EtcdTarget, Outcome, Plan, Plane};
use crate::auth::ClusterSecret;
use crate::edit;

/// An unplanned failover's parameters.
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
    /// Drive this etcd control plane instead of the rules file.
    pub etcd: Option<EtcdTarget>,
}

/// Fails `cell`'s shard over to its standby: under the rules' lock, checks
/// that the shard's replication record says the standby is in sync (so it
/// holds every acknowledged write), promotes the standby's copy at epoch+1
/// and moves the shard in the rules. The lost host's copy, if it still runs,
/// can acknowledge nothing more: its standby refuses its journal, and it
/// may not go on without one while the rules give its shard to another
/// cell. Safe to run again if cut off.
pub async fn failover(req: &FailoverRequest, secret: ClusterSecret) -> Result<Outcome> {
    let mut plane = Plane::open(&req.rules, req.etcd.as_ref()).await?;
    // The file: the lock agents take to go degraded; etcd: transactions.
    let _lock = plane.lock().await?;
    if plane.phase().await?.is_some() {
        bail!("a switchover is in progress: finish it with `cellctl switchover` first");
    }
    let (text, revision) = plane.rules().await?;
    let rules = crate::parse_rules(&text).map_err(|e| anyhow::anyhow!("invalid rules: {e}"))?;
    let (cell, to) = (req.cell.as_str(), req.to.as_str());
    if !rules.cells.contains_key(cell) {
        bail!("cell {cell:?} is not defined in the rules");
    }
    if !rules.cells.contains_key(to) {
        bail!("--to {to:?}: no such cell in the rules");
    }
    let agents = Agents {
        client: Client::builder(TokioExecutor::new()).build_http(),
        secret,
        rules: rules.clone(),
        registered: plane.registered().await,
    };
    let t0 = Instant::now();
    let from = rules.host_of(cell).to_string();
    let promote = serde_json::json!({ "standby_lost": true });
    if from == to {
        // The rules moved already: a failover cut off before the promotion
        // (or one that is done) — promote if that has not happened.
        let ranges: Vec<(u32, u32, u64)> = edit::shard_ranges(&text, cell)?;
        if agents.copy(to, cell).await?.0 == "primary" {
            bail!("cell {cell}'s shard is already held by {to}: nothing to do");
        }
        let lsn = promote_at(&agents, to, cell, &ranges, promote).await?;
        return Ok(outcome(cell, &from, to, ranges, lsn, Some(revision), t0));
    }
    let standby = rules.standby_of(cell);
    if standby != Some(to) {
        bail!(
            "cell {to} is not the standby of cell {cell}'s shard (its standby: {}): only the standby has a copy of the data",
            standby.unwrap_or("none")
        );
    }
    let seen = plane.record(cell).await?;
    let problem = match &seen.record {
        None => Some(format!(
            "no replication record of cell {cell}'s shard ({}): nothing says {to} has every acknowledged write",
            seen.place
        )),
        Some(r) if r["state"] != "in-sync" => Some(format!(
            "cell {cell}'s shard runs without a synchronous standby since {} (its record: {}): {to} may lack acknowledged writes",
            r["since_ms"], seen.place
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
    // First the rules (the point after which the lost host may not go on
    // without its standby: it checks them, under the same lock or in the
    // same transaction), then the promotion; until it is done the new
    // host refuses the shard's writes and the gateways hold them.
    let moved = edit::move_shard(&text, cell, to)?;
    let message = format!("failover: cell {cell}'s shard held by {to}");
    let revision = plane
        .move_if_record(&moved, revision, cell, &seen, &message)
        .await?;
    let lsn = promote_at(&agents, to, cell, &ranges, promote)
        .await
        .with_context(|| format!("the rules give cell {cell}'s shard to {to} now (revision {revision}), but promoting its copy failed: run the same command again once {to}'s agents answer"))?;
    tracing::warn!(%cell, host = %to, lsn, "failed over: the standby's copy is the primary");
    Ok(outcome(cell, &from, to, ranges, lsn, Some(revision), t0))
}

async fn promote_at(
    agents: &Agents,
    to: &str,
    cell: &str,
    ranges: &[(u32, u32, u64)],
    mut body: serde_json::Value,
) -> Result<i64> {
    body["ranges"] = serde_json::json!(ranges);
    agents.step_with(to, cell, "promote", body).await
}

fn outcome(
    cell: &str,
    from: &str,
    to: &str,
    ranges: Vec<(u32, u32, u64)>,
    lsn: i64,
    revision: Option<u64>,
    t0: Instant,
) -> Outcome {
    Outcome {
        plan: Plan {
            cell: cell.into(),
            from: from.into(),
            to: to.into(),
            ranges,
            phase: "done".into(),
            lsn: Some(lsn),
            started_ms: unix_ms(),
        },
        result: "failed-over",
        stall_ms: t0.elapsed().as_millis() as u64,
        revision,
    }
}
