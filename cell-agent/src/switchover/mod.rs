//! The agent's side of a switchover, on the internal listener (signed with
//! the cluster secret; `cellctl switchover` drives the steps):
//!
//! - `GET  /v1/internal/shards/CELL` — this agent's copy of CELL's shard:
//!   its role and LSN (404 when it has none);
//! - `POST /v1/internal/shards/CELL/demote` `{"ranges": [[from, to, epoch], ...]}`
//!   — on the shard's primary: bans every range at its new epoch and makes
//!   the copy a replica, in one batch ordered after every queued write;
//!   answers its LSN;
//! - `POST /v1/internal/shards/CELL/promote` `{"ranges": [...]}` — on a
//!   copy that applied that LSN: opens the ranges at their epochs and makes
//!   it the primary; answers the LSN its journal goes on from. With
//!   `"standby_lost": true` (a failover) the copy's shipper starts degraded
//!   (recorded first) instead of waiting for the lost cell.
//!
//! See [`crate::store::sqlite::shard`] for what each step does to the data.

use bytes::Bytes;
use http::Request;
use serde_json::json;

use crate::api::Api;
use crate::store::sqlite::shard::{self, EpochRange};
use crate::store::{DomainError, Store, WriteOp};

pub use routing_rules::switchover::SHARDS_PATH;

/// What a request under [`SHARDS_PATH`] asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// `GET .../CELL`.
    State(String),
    /// `POST .../CELL/demote`.
    Demote(String),
    /// `POST .../CELL/promote`.
    Promote(String),
}

/// Parses a request path under [`SHARDS_PATH`] (`None`: not one).
pub fn step(method: &http::Method, path: &str) -> Option<Step> {
    let rest = path.strip_prefix(SHARDS_PATH)?;
    let (cell, action) = match rest.split_once('/') {
        Some((c, a)) => (c, Some(a)),
        None => (rest, None),
    };
    if !routing_rules::valid_cell_name(cell) {
        return None;
    }
    let cell = cell.to_string();
    match (method, action) {
        (&http::Method::GET, None) => Some(Step::State(cell)),
        (&http::Method::POST, Some("demote")) => Some(Step::Demote(cell)),
        (&http::Method::POST, Some("promote")) => Some(Step::Promote(cell)),
        _ => None,
    }
}

/// A step's body: the ranges at their new epochs, and (a failover's
/// promotion) whether the shard's standby is known lost.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    ranges: Vec<EpochRange>,
    #[serde(default)]
    standby_lost: bool,
}

fn body(req: &Request<Bytes>) -> Result<Body, DomainError> {
    crate::body::require_json(req.headers())?;
    let b: Body = serde_json::from_slice(req.body()).map_err(|e| {
        DomainError::bad_request(format!(
            "expected {{\"ranges\": [[from, to, epoch], ...]}}: {e}"
        ))
    })?;
    if b.ranges.is_empty() {
        return Err(DomainError::bad_request("no ranges given"));
    }
    Ok(b)
}

/// Runs one step (the caller is authenticated).
pub async fn handle<S: Store>(
    api: &Api<S>,
    caller: &str,
    step: Step,
    req: Request<Bytes>,
) -> Result<(u16, serde_json::Value), DomainError> {
    match step {
        Step::State(cell) => {
            let path = api.replicas.path(&cell);
            if !path.is_file() {
                return Err(DomainError::not_found(
                    "no_copy",
                    format!(
                        "cell {} keeps no copy of cell {cell}'s shard",
                        api.rules.cell()
                    ),
                ));
            }
            let (role, lsn) = tokio::task::spawn_blocking(move || shard::state(&path))
                .await
                .map_err(|e| DomainError::unavailable(format!("task failed: {e}")))??;
            Ok((
                200,
                json!({"cell": api.rules.cell(), "shard": cell, "role": role, "lsn": lsn}),
            ))
        }
        Step::Demote(cell) => {
            let ranges = body(&req)?.ranges;
            api.check_writable()?;
            let store = api.shards.get(&cell)?;
            tracing::warn!(shard = %cell, %caller, ?ranges, "switchover: demoting this copy of the shard (banning its slots)");
            let r = api.write(&store, WriteOp::Demote { ranges }).await?;
            if cell != api.rules.cell() {
                api.shards.close(&cell);
            }
            tracing::warn!(shard = %cell, lsn = %r.1["lsn"], "switchover: this copy is a replica now");
            Ok(r)
        }
        Step::Promote(cell) => {
            let Body {
                ranges,
                standby_lost,
            } = body(&req)?;
            api.check_writable()?;
            let path = api.replicas.path(&cell);
            if !path.is_file() {
                return Err(DomainError::conflict(
                    "no_copy",
                    format!(
                        "cell {} keeps no copy of cell {cell}'s shard to promote",
                        api.rules.cell()
                    ),
                ));
            }
            api.replicas.forget(&cell);
            let c = cell.clone();
            let lsn = tokio::task::spawn_blocking(move || {
                let lsn = shard::promote(&path, &c, &ranges)?;
                if standby_lost {
                    shard::set_flag(&path, shard::STANDBY_LOST, true)?;
                }
                Ok::<_, DomainError>(lsn)
            })
            .await
            .map_err(|e| DomainError::unavailable(format!("task failed: {e}")))??;
            tracing::warn!(shard = %cell, %caller, lsn, "switchover: this copy of the shard is its primary now");
            Ok((200, json!({"role": "primary", "lsn": lsn})))
        }
    }
}
