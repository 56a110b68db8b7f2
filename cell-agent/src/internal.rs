//! The internal (cell-to-cell) API, on its own listener
//! (`--internal-listen`) that no gateway routes to, every request signed
//! with the cluster secret ([`crate::auth`]).
//!
//! `POST /v1/internal/credits` is the only write: the credit of a
//! cross-cell transfer, accepted only when the signature holds, the signing
//! cell is the one named as payer cell, that cell could own the payer under
//! this cell's rules (the payer's home cell or one of its failover cells),
//! and the payee belongs to this cell (else 421 naming the owner, so the
//! relay can follow the payee).

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::Full;
use routing_rules::{AllHealthy, RouteAttrs};
use serde_json::json;

use crate::api::{json_body, json_response, Api};
use crate::auth::ClusterSecret;
use crate::guard::{caught_up, owned_here, stamped_revision};
use crate::store::sqlite::unix_ms;
use crate::store::{DomainError, Store, WriteOp};

/// The path of the credit endpoint.
pub const CREDITS_PATH: &str = "/v1/internal/credits";
/// The path a primary ships its journal batches to, on its standby.
pub const JOURNAL_PATH: &str = "/v1/internal/journal";
/// The path a primary sends a snapshot of its shard to, in chunks: each
/// body is one JSON header line (`cell`, `id`, `offset`, `total`, `last`)
/// and then the chunk's bytes, the whole body signed. `id` (1..=64 hex
/// digits) names one snapshot, so two sent at once never mix.
pub const SNAPSHOT_PATH: &str = "/v1/internal/snapshot";
/// Largest snapshot a standby takes, bytes.
pub const MAX_SNAPSHOT_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Answers one request on the internal listener.
pub async fn handle<S: Store>(
    api: Arc<Api<S>>,
    secret: ClusterSecret,
    req: Request<Bytes>,
) -> Response<Full<Bytes>> {
    let start = Instant::now();
    if let Some(step) = crate::switchover::step(req.method(), req.uri().path()) {
        let result = match authenticate(&secret, &req) {
            Ok(caller) => crate::switchover::handle(&api, &caller, step, req).await,
            Err(e) => Err(e),
        };
        let resp = match result {
            Ok((status, body)) => json_response(status, &body),
            Err(e) => crate::api::error_response(&e),
        };
        api.metrics.observe(
            "shard_step",
            resp.status().as_u16(),
            start.elapsed().as_secs_f64(),
        );
        return resp;
    }
    let route = match (req.method(), req.uri().path()) {
        (&Method::POST, CREDITS_PATH) => "credit",
        (&Method::POST, JOURNAL_PATH) => "journal",
        (&Method::POST, SNAPSHOT_PATH) => "snapshot",
        (&Method::GET, "/healthz") => "internal_healthz",
        _ => "other",
    };
    let result = match route {
        "credit" => credit(&api, &secret, req).await,
        "journal" => journal(&api, &secret, req).await,
        "snapshot" => snapshot(&api, &secret, req).await,
        "internal_healthz" => Ok((200, json!({"status": "ok", "cell": api.rules.cell()}))),
        _ => Err(DomainError::not_found(
            "not_found",
            format!(
                "no such internal endpoint: {} {}",
                req.method(),
                req.uri().path()
            ),
        )),
    };
    let resp = match result {
        Ok((status, body)) => json_response(status, &body),
        Err(e) => crate::api::error_response(&e),
    };
    api.metrics
        .observe(route, resp.status().as_u16(), start.elapsed().as_secs_f64());
    resp
}

/// A shipment of journal batches from a primary cell whose standby this
/// cell is: applied to the replica file in LSN order; answers the
/// replica's LSN (409 `journal_gap` with it when the batches do not
/// follow, 409 `need_snapshot` without a replica file).
async fn journal<S: Store>(
    api: &Api<S>,
    secret: &ClusterSecret,
    req: Request<Bytes>,
) -> Result<(u16, serde_json::Value), DomainError> {
    use crate::store::sqlite::journal::Batch;
    use crate::store::sqlite::replica::ReplicaError;
    let caller = authenticate(secret, &req)?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Shipment {
        cell: String,
        #[serde(default)]
        timeline: crate::store::sqlite::journal::Timeline,
        batches: Vec<Batch>,
    }
    crate::body::require_json(req.headers())?;
    let shipment: Shipment = serde_json::from_slice(req.body())
        .map_err(|e| DomainError::bad_request(format!("not a journal shipment: {e}")))?;
    speaks_for(api, &caller, &shipment.cell, "ships the journal of cell")?;
    require_standby_of(api, &shipment.cell)?;
    let replicas = api.replicas.clone();
    let cell = shipment.cell.clone();
    let applied = tokio::task::spawn_blocking(move || {
        replicas.apply(&shipment.cell, &shipment.timeline, &shipment.batches)
    })
    .await
    .map_err(|e| DomainError::unavailable(format!("replica task failed: {e}")))?;
    match applied {
        Ok(lsn) => Ok((200, json!({"applied": lsn}))),
        Err(ReplicaError::Gap { have, got }) => Err(DomainError::new(
            409,
            "journal_gap",
            format!(
                "the replica is at LSN {have}; batch {got} does not follow (send from {})",
                have + 1
            ),
        )
        .with_lsn(have)),
        Err(e @ (ReplicaError::NeedSnapshot { .. } | ReplicaError::Diverged { .. })) => {
            Err(DomainError::new(409, "need_snapshot", e.to_string()))
        }
        // The primary under this cell's rules: the sender is a copy that
        // was failed over (it must stop).
        Err(e @ ReplicaError::Primary { .. }) if api.rules.table().rules().host_of(&cell) == api.rules.cell() => {
            Err(DomainError::new(409, "is_primary", e.to_string()))
        }
        // A stale copy that still says primary although the rules give
        // the shard to the sender (this cell's agent restarted after the
        // shard was failed over away from it): it must be seeded again.
        Err(ReplicaError::Primary { .. }) => Err(DomainError::new(
            409,
            "needs_failback",
            format!("this cell's copy of cell {cell}'s shard still says primary although the shard was failed over away from it: it is fenced, then seeded again from a snapshot (cellctl failback waits for it)"),
        )),
        Err(e) => Err(DomainError::unavailable(format!(
            "cannot apply the journal: {e}"
        ))),
    }
}

/// Refuses a shard whose standby this cell is not (under the rules held).
fn require_standby_of<S: Store>(api: &Api<S>, shard: &str) -> Result<(), DomainError> {
    let table = api.rules.table();
    let standby = table.rules().standby_of(shard);
    if standby != Some(api.rules.cell()) {
        return Err(DomainError::new(
            403,
            "not_standby",
            format!(
                "cell {} is not the standby of cell {shard}'s shard under rules revision {} (its standby: {})",
                api.rules.cell(),
                table.revision(),
                standby.unwrap_or("none")
            ),
        ));
    }
    Ok(())
}

/// One chunk of a snapshot of the caller's shard: written at its offset
/// into the incoming file; the last one installs it as the replica
/// (checked: a sound SQLite file of that cell's shard) and answers its LSN.
async fn snapshot<S: Store>(
    api: &Api<S>,
    secret: &ClusterSecret,
    req: Request<Bytes>,
) -> Result<(u16, serde_json::Value), DomainError> {
    let caller = authenticate(secret, &req)?;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Header {
        cell: String,
        id: String,
        offset: u64,
        total: u64,
        last: bool,
    }
    let body = req.body();
    let split = body.iter().position(|b| *b == b'\n').ok_or_else(|| {
        DomainError::bad_request("a snapshot chunk starts with a JSON header line")
    })?;
    let h: Header = serde_json::from_slice(&body[..split])
        .map_err(|e| DomainError::bad_request(format!("bad snapshot chunk header: {e}")))?;
    let data = body.slice(split + 1..);
    speaks_for(api, &caller, &h.cell, "sends the snapshot of cell")?;
    if h.id.is_empty() || h.id.len() > 64 || !h.id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(DomainError::bad_request(
            "a snapshot id is 1..=64 hexadecimal digits",
        ));
    }
    require_standby_of(api, &h.cell)?;
    let end = h.offset.checked_add(data.len() as u64);
    if h.total > MAX_SNAPSHOT_BYTES
        || end.is_none_or(|e| e > h.total)
        || (h.last && end != Some(h.total))
    {
        return Err(DomainError::bad_request(format!(
            "chunk at {} of {} bytes does not fit a snapshot of {} bytes (at most {MAX_SNAPSHOT_BYTES})",
            h.offset,
            data.len(),
            h.total
        )));
    }
    let replicas = api.replicas.clone();
    let shard = h.cell.clone();
    let done = tokio::task::spawn_blocking(move || -> Result<Option<i64>, String> {
        use std::io::{Seek, SeekFrom, Write};
        let path = replicas.incoming(&shard, &h.id);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(h.offset == 0)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.seek(SeekFrom::Start(h.offset))
            .map_err(|e| e.to_string())?;
        f.write_all(&data).map_err(|e| e.to_string())?;
        if !h.last {
            return Ok(None);
        }
        f.sync_all().map_err(|e| e.to_string())?;
        let len = f.metadata().map_err(|e| e.to_string())?.len();
        if len != h.total {
            return Err(format!(
                "the snapshot has {len} bytes, {} announced (a chunk is missing)",
                h.total
            ));
        }
        drop(f);
        replicas
            .install_snapshot(&shard, &h.id)
            .map(Some)
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| DomainError::unavailable(format!("snapshot task failed: {e}")))?
    .map_err(|e| DomainError::new(422, "bad_snapshot", e))?;
    match done {
        None => Ok((
            200,
            json!({"received": h.offset + (body.len() - split - 1) as u64}),
        )),
        Some(lsn) => {
            tracing::info!(cell = %h.cell, lsn, "installed a snapshot of the shard as its replica");
            Ok((200, json!({"applied": lsn})))
        }
    }
}

/// Refuses a request signed by one cell that speaks for the shard of
/// another, unless the signer holds that shard under the rules held here.
fn speaks_for<S: Store>(
    api: &Api<S>,
    caller: &str,
    named: &str,
    what: &str,
) -> Result<(), DomainError> {
    if api.rules.table().rules().host_of(named) == caller {
        return Ok(());
    }
    Err(DomainError::new(
        403,
        "cell_mismatch",
        format!("the request is signed by cell {caller:?} but {what} {named:?}, whose shard it does not hold"),
    ))
}

/// The calling cell of a signed internal request (401 when unsigned or
/// signed wrongly).
pub(crate) fn authenticate(
    secret: &ClusterSecret,
    req: &Request<Bytes>,
) -> Result<String, DomainError> {
    secret
        .verify(
            req.method().as_str(),
            req.uri().path(),
            req.headers(),
            req.body(),
            unix_ms(),
        )
        .map_err(|e| {
            tracing::warn!(error = %e, "internal request refused: not authenticated");
            DomainError::new(401, "unauthenticated", e.to_string())
        })
}

async fn credit<S: Store>(
    api: &Api<S>,
    secret: &ClusterSecret,
    req: Request<Bytes>,
) -> Result<(u16, serde_json::Value), DomainError> {
    let caller = authenticate(secret, &req)?;
    api.check_writable()?;
    let v = json_body(&req)?;
    v.known_fields(&[
        "transfer_id",
        "from_cell",
        "from",
        "to",
        "amount",
        "transfer_created_ms",
        "settled_before_ms",
    ])?;
    let transfer_created_ms = v.opt_ms("transfer_created_ms")?;
    let settled_before_ms = v.opt_ms("settled_before_ms")?;
    let transfer_id = v.str("transfer_id")?;
    let from_cell = v.str("from_cell")?;
    let from = v.str("from")?;
    let to = v.str("to")?;
    let amount = v.amount()?;
    // Catch up when the payer's cell knows newer rules than ours.
    if let Ok(Some(rev)) = stamped_revision(&req) {
        api.rules.catch_up(rev).await;
        caught_up(&*api.rules, rev).map_err(|(_, body)| {
            DomainError::new(
                503,
                "rules_behind",
                body["message"].as_str().unwrap_or_default().to_string(),
            )
        })?;
    }
    // After the catch-up: a shard that moved is spoken for by its new host.
    speaks_for(api, &caller, &from_cell, "names as the payer's cell")?;
    let table = api.rules.table();
    let payee = owned_here(&*api.rules, &table, to).map_err(|(status, body)| {
        DomainError::new(
            status.as_u16(),
            if status.as_u16() == 421 {
                "misdirected"
            } else {
                "malformed_key"
            },
            body["message"].as_str().unwrap_or_default().to_string(),
        )
        .with_owner(body["owner_cell"].as_str())
    })?;
    let payer_home = table
        .route(Some(from.as_bytes()), &RouteAttrs::default(), &AllHealthy)
        .map_err(|_| DomainError::bad_request(format!("payer {from:?} is not a valid user key")))?
        .home_cell;
    let home = table.cell_name(payer_home);
    let could_own = home == from_cell
        || table
            .rules()
            .cells
            .get(home)
            .is_some_and(|c| c.failover.contains(&from_cell));
    if !could_own {
        tracing::warn!(%from_cell, payer = %from, %home, "credit refused: the sending cell cannot own the payer");
        return Err(DomainError::new(
            403,
            "payer_not_owned",
            format!("payer {from:?} belongs to cell {home}; cell {from_cell} (neither it nor one of its failover cells) cannot send its credits"),
        ));
    }
    let store = api.shards.get(&payee.shard)?;
    api.write(
        &store,
        WriteOp::Credit {
            transfer_id,
            from_cell,
            from,
            to: payee.key,
            amount,
            slot: payee.slot,
            at: payee.at,
            transfer_created_ms,
            settled_before_ms,
        },
    )
    .await
}
