//! The fault timeline: every step at its time, every fault with a `for`
//! undone when it ends, each recorded with when it really happened and
//! what came of it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Mutex;

use crate::fault_proxy::Fault;
use crate::scenario::{Action, LinkFault, Step};
use crate::topology::Topology;

/// What happened to one step.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// The step's index in the scenario's (sorted) steps.
    pub step: usize,
    /// What it did.
    pub action: String,
    /// When it began, ms since the workload started.
    pub at_ms: u64,
    /// When its action returned (an operator command may take a while).
    pub done_ms: u64,
    /// When it was undone (`for` ended), if it was.
    pub undone_ms: Option<u64>,
    /// `ok`, or what went wrong.
    pub result: String,
}

enum Due {
    Do(usize),
    Undo(usize),
}

/// Runs `steps` against `topo`, times from `start`; stops early when
/// `stop` is set (what is undone then is undone by the drill's heal).
pub async fn run(
    steps: Vec<Step>,
    topo: Arc<Mutex<Topology>>,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Event> {
    let mut due: Vec<(Duration, Due)> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        due.push((s.at, Due::Do(i)));
        if let Some(f) = s.for_ {
            due.push((s.at + f, Due::Undo(i)));
        }
    }
    // Undo before do at the same instant; stable otherwise.
    due.sort_by_key(|(t, d)| (*t, matches!(d, Due::Do(_))));
    let mut events: Vec<Event> = Vec::new();
    for (t, d) in due {
        let when = start + t;
        while Instant::now() < when {
            if stop.load(Ordering::Relaxed) {
                return events;
            }
            let left = when.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(50))).await;
        }
        let ms = || start.elapsed().as_millis() as u64;
        match d {
            Due::Do(i) => {
                let at_ms = ms();
                let action = steps[i].action.describe();
                tracing::info!(at_ms, %action, "step");
                let result = match apply(&steps[i].action, &topo).await {
                    Ok(r) => r,
                    Err(e) => format!("failed: {e:#}"),
                };
                events.push(Event {
                    step: i,
                    action,
                    at_ms,
                    done_ms: ms(),
                    undone_ms: None,
                    result,
                });
            }
            Due::Undo(i) => {
                let at = ms();
                let result = undo(&steps[i].action, &topo).await;
                if let Some(e) = events.iter_mut().rev().find(|e| e.step == i) {
                    e.undone_ms = Some(at);
                    if let Err(err) = result {
                        e.result = format!("{}; undo failed: {err:#}", e.result);
                    }
                }
                tracing::info!(at_ms = at, action = %steps[i].action.describe(), "undone");
            }
        }
    }
    events
}

/// Does a step; `ok` or a short result (e.g. a switchover's stall).
async fn apply(action: &Action, topo: &Mutex<Topology>) -> anyhow::Result<String> {
    let mut t = topo.lock().await;
    match action {
        Action::Kill { target } => {
            for p in t.procs_mut(target) {
                p.kill().await;
            }
        }
        Action::Freeze { target } => {
            for p in t.procs_mut(target) {
                p.freeze().await;
            }
        }
        Action::Restart { target } => {
            for p in t.procs_mut(target) {
                p.stop().await;
                p.start().await?;
            }
        }
        Action::Partition { cell } => t.partition(cell)?,
        Action::Link { link, fault } => t.set_link(
            link,
            match fault {
                LinkFault::Latency(d) => Fault::Latency(*d),
                LinkFault::Blackhole => Fault::Blackhole,
                LinkFault::Reset => Fault::Reset,
            },
        ),
        Action::Switchover { cell, to } => {
            let (req, secret) = switchover_request(&t, cell, to)?;
            drop(t);
            let out = routing_rules::switchover::run(&req, secret).await?;
            return Ok(format!(
                "{} (writes stalled {} ms)",
                out.result, out.stall_ms
            ));
        }
        Action::Failover { cell, to } => {
            let secret = routing_rules::auth::ClusterSecret::from_file(&t.secret)?;
            let req = routing_rules::switchover::FailoverRequest {
                rules: t.rules.clone(),
                cell: cell.clone(),
                to: to.clone(),
                force: false,
                etcd: t.etcd.clone(),
            };
            drop(t);
            let out = routing_rules::switchover::failover(&req, secret).await?;
            return Ok(out.result.to_string());
        }
        Action::Failback { cell } => return failback(cell, t).await,
        Action::RulesApply { merge } => return rules_apply(merge, t).await,
        Action::Split { cell, green_bp } => {
            let (rules, etcd) = (t.rules.clone(), t.etcd.clone());
            drop(t);
            let rev = crate::topology::control::edit_rules(&rules, etcd.as_ref(), |text| {
                routing_rules::edit::set_split(text, cell, *green_bp)
                    .map_err(|e| anyhow::anyhow!("{e}"))
            })
            .await?;
            return Ok(match rev {
                Some(r) => format!("revision {r}"),
                None => "no change".into(),
            });
        }
    }
    Ok("ok".into())
}

/// `cellctl switchover CELL --to TO` against the topology's control plane,
/// with the cells' secret.
fn switchover_request(
    t: &Topology,
    cell: &str,
    to: &str,
) -> anyhow::Result<(
    routing_rules::switchover::Request,
    routing_rules::auth::ClusterSecret,
)> {
    let secret = routing_rules::auth::ClusterSecret::from_file(&t.secret)?;
    let req = routing_rules::switchover::Request {
        rules: t.rules.clone(),
        cell: cell.to_string(),
        to: to.to_string(),
        catch_up_timeout: Duration::from_secs(5),
        etcd: t.etcd.clone(),
    };
    Ok((req, secret))
}

/// The failback (docs/operations.md): the cell's agents run (those that
/// do not are started: their stale copy is fenced and seeded again by the
/// shard's host), then `cellctl failback`, which waits until the copy is
/// the host's in-sync standby and switches the shard home.
async fn failback(
    cell: &str,
    mut t: tokio::sync::MutexGuard<'_, Topology>,
) -> anyhow::Result<String> {
    let target = crate::scenario::Target::Cell(cell.to_string());
    for p in t.procs_mut(&target) {
        if !p.running() {
            p.start().await?;
        }
    }
    let (req, secret) = switchover_request(&t, cell, cell)?;
    drop(t);
    let out = routing_rules::switchover::failback(&req, secret, FAILBACK_WAIT).await?;
    Ok(format!(
        "{} (writes stalled {} ms)",
        out.result, out.stall_ms
    ))
}

/// How long a failback waits for the cell's copy to be seeded again.
const FAILBACK_WAIT: Duration = Duration::from_secs(20);

/// Ends a step's fault (`for` is over).
async fn undo(action: &Action, topo: &Mutex<Topology>) -> anyhow::Result<()> {
    let mut t = topo.lock().await;
    match action {
        Action::Kill { target } => {
            for p in t.procs_mut(target) {
                p.start().await?;
            }
        }
        Action::Freeze { target } => {
            for p in t.procs_mut(target) {
                p.thaw().await;
            }
        }
        Action::Link { link, .. } => t.set_link(link, Fault::Pass),
        Action::Partition { cell } => t.join(cell)?,
        Action::Restart { .. }
        | Action::Switchover { .. }
        | Action::Failover { .. }
        | Action::Failback { .. }
        | Action::Split { .. }
        | Action::RulesApply { .. } => {}
    }
    Ok(())
}

/// `cellctl rules apply` of the live rules with `merge` merged in: the
/// new revision, and what `cellctl rules diff` warns of (e.g. slots that
/// change owner without their data).
async fn rules_apply(
    merge: &str,
    t: tokio::sync::MutexGuard<'_, Topology>,
) -> anyhow::Result<String> {
    let (rules, etcd) = (t.rules.clone(), t.etcd.clone());
    drop(t);
    let mut warnings = Vec::new();
    let rev = crate::topology::control::edit_rules(&rules, etcd.as_ref(), |text| {
        let edited = routing_rules::edit::merge(text, merge).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let (Ok(a), Ok(b)) = (
            routing_rules::parse_rules(text),
            routing_rules::parse_rules(&edited),
        ) {
            warnings = routing_rules::diff::diff(&a, &b).warnings;
        }
        Ok(edited)
    })
    .await?;
    let mut out = match rev {
        Some(r) => format!("revision {r}"),
        None => "no change".into(),
    };
    for w in warnings {
        tracing::warn!(warning = %w, "rules apply");
        out.push_str(&format!("; warning: {w}"));
    }
    Ok(out)
}
