//! The outbox relay: delivers cross-cell credits to the payee's owner cell
//! over its internal listener, signed with the cluster secret.
//!
//! Every attempt re-resolves the payee's owner from the rules held now (a
//! 421 naming another owner is followed at once), so a credit follows its
//! payee when slots move. A 2xx marks the record delivered. A definitive
//! refusal by the owner (400, 403, 409, 422: the payee's balance would
//! overflow, ...) ends the transfer
//! `failed` and refunds the payer in the same transaction. Anything else
//! (unreachable, 5xx, timeouts, 401 while secrets rotate, 403
//! `cell_mismatch` while the payer's shard moves) is retried with
//! exponential backoff and full jitter. The payee's cell applies credits
//! idempotently by transfer id, so a delivery repeated after a crash or a
//! lost acknowledgement is harmless.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use routing_rules::{AllHealthy, RouteAttrs, STAMP_REV};

use crate::auth::ClusterSecret;
use crate::internal::CREDITS_PATH;
use crate::metrics::AgentMetrics;
use crate::rules::RulesHolder;
use crate::store::sqlite::unix_ms;
use crate::store::{OutboxItem, Store, WriteOp};

/// First retry delay, ms.
pub const RETRY_BASE_MS: i64 = 100;
/// Longest retry delay, ms.
pub const RETRY_MAX_MS: i64 = 10_000;
/// Per-delivery timeout, ms.
pub const DELIVERY_TIMEOUT_MS: u64 = 2_000;
/// Records read per pass.
const BATCH: u32 = 64;

/// Internal addresses of other cells learnt from control-plane
/// registrations (cell → addresses); empty without a control plane.
pub type Peers = Arc<ArcSwap<BTreeMap<String, Vec<String>>>>;

/// What the relay needs besides the store.
pub struct Relay {
    /// The cell whose shard the store holds (the payer's cell on credits).
    pub shard: String,
    /// The rules.
    pub rules: Arc<RulesHolder>,
    /// Metrics.
    pub metrics: AgentMetrics,
    /// Wakes the relay after a cross-cell transfer.
    pub wake: Arc<tokio::sync::Notify>,
    /// False while fenced: the relay changes nothing.
    pub writes_allowed: Arc<std::sync::atomic::AtomicBool>,
    /// Signs credits; without it nothing is sent.
    pub secret: Option<ClusterSecret>,
    /// Registered internal addresses.
    pub peers: Peers,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The payee's owner credited it (or had already).
    Delivered,
    /// The payee's owner refused it for good: refund.
    Refused(String),
    /// Try again later.
    Retry(String),
}

/// The delay before retry number `attempts + 1`: exponential, capped, with
/// full jitter (uniform in [delay/2, delay]) so that many records failing
/// together do not retry together.
pub fn backoff_ms(attempts: i64) -> i64 {
    let cap = (RETRY_BASE_MS << attempts.clamp(0, 20)).min(RETRY_MAX_MS);
    let mut r = [0u8; 8];
    let _ = getrandom::fill(&mut r);
    let half = cap / 2;
    half + (u64::from_le_bytes(r) % (half as u64 + 1)) as i64
}

/// Runs the relay until `stop` flips.
pub async fn run<S: Store>(store: S, relay: Relay, mut stop: tokio::sync::watch::Receiver<bool>) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        // A fenced instance changes nothing, its outbox included.
        let fenced = !relay
            .writes_allowed
            .load(std::sync::atomic::Ordering::Relaxed);
        let due = if fenced || relay.secret.is_none() {
            Ok(Vec::new())
        } else {
            store.due_outbox(unix_ms(), BATCH).await
        };
        let due = due.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the outbox");
            Vec::new()
        });
        // Our watermark for the payees: every transfer made before it is
        // settled (they may prune its credit after their retention).
        let settled_before = if due.is_empty() {
            0
        } else {
            store.oldest_unsettled_ms(unix_ms()).await.unwrap_or(0)
        };
        for item in &due {
            let op = match deliver(&client, &relay, item, settled_before).await {
                Outcome::Delivered => {
                    relay.metrics.deliveries.with_label_values(&["ok"]).inc();
                    tracing::info!(transfer = %item.transfer_id, "cross-cell credit delivered");
                    WriteOp::Delivered { outbox_id: item.id }
                }
                Outcome::Refused(reason) => {
                    relay
                        .metrics
                        .deliveries
                        .with_label_values(&["refused"])
                        .inc();
                    tracing::warn!(transfer = %item.transfer_id, %reason, "cross-cell credit refused by the payee's cell; refunding the payer");
                    WriteOp::TransferRefused {
                        outbox_id: item.id,
                        reason,
                        at: crate::guard::fence_for(&relay.rules.table(), &item.from),
                    }
                }
                Outcome::Retry(error) => {
                    relay.metrics.deliveries.with_label_values(&["error"]).inc();
                    let delay = backoff_ms(item.attempts);
                    tracing::warn!(transfer = %item.transfer_id, attempts = item.attempts + 1, retry_ms = delay, %error, "cross-cell credit not delivered; will retry");
                    WriteOp::DeliveryFailed {
                        outbox_id: item.id,
                        next_attempt_ms: unix_ms() + delay,
                        error,
                    }
                }
            };
            if let Err(e) = store.write(op).await {
                tracing::warn!(error = %e, "cannot record the delivery outcome");
            }
        }
        if due.len() == BATCH as usize {
            continue;
        }
        tokio::select! {
            _ = relay.wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(RETRY_BASE_MS as u64)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The internal addresses of `cell`: from the rules, else registrations.
pub(crate) fn addresses(rules: &RulesHolder, peers: &Peers, cell: &str) -> Vec<String> {
    let table = rules.table();
    let listed = table
        .rules()
        .cells
        .get(cell)
        .map(|c| c.internal.clone())
        .unwrap_or_default();
    if !listed.is_empty() {
        return listed;
    }
    peers.load().get(cell).cloned().unwrap_or_default()
}

/// The cell holding the payee's shard under the rules held now.
fn owner_of(relay: &Relay, user: &str) -> Option<String> {
    let table = relay.rules.table();
    let d = table
        .route(Some(user.as_bytes()), &RouteAttrs::default(), &AllHealthy)
        .ok()?;
    Some(
        table
            .rules()
            .host_of(table.cell_name(d.home_cell))
            .to_string(),
    )
}

async fn deliver(
    client: &Client<HttpConnector, Full<Bytes>>,
    relay: &Relay,
    item: &OutboxItem,
    settled_before_ms: i64,
) -> Outcome {
    let Some(secret) = &relay.secret else {
        return Outcome::Retry("no internal secret".into());
    };
    let mut cell = owner_of(relay, &item.to).unwrap_or_else(|| item.to_cell.clone());
    let body = Bytes::from(
        serde_json::json!({
            "transfer_id": item.transfer_id, "from_cell": relay.shard,
            "from": item.from, "to": item.to, "amount": item.amount,
            "transfer_created_ms": item.created_ms, "settled_before_ms": settled_before_ms,
        })
        .to_string(),
    );
    // At most one hop: a 421 names the owner, which is tried at once.
    for _hop in 0..2 {
        let mut addrs = addresses(&relay.rules, &relay.peers, &cell);
        if addrs.is_empty() {
            return Outcome::Retry(format!(
                "cell {cell} lists no internal address (rules `internal` or registrations)"
            ));
        }
        // Spread attempts over the payee cell's instances.
        let n = addrs.len();
        addrs.rotate_left(item.attempts as usize % n);
        let mut last = String::new();
        let mut moved = None;
        for addr in addrs {
            let timeout = Duration::from_millis(DELIVERY_TIMEOUT_MS);
            match post_signed(
                client,
                &relay.rules,
                secret,
                &addr,
                CREDITS_PATH,
                &body,
                timeout,
            )
            .await
            {
                Ok((status, _)) if (200..300).contains(&status) => return Outcome::Delivered,
                Ok((421, v)) => {
                    last = format!("{addr}: 421 {v}");
                    moved = v["owner_cell"].as_str().map(str::to_string);
                    break;
                }
                // The payee's cell does not (yet) see this cell as the
                // payer's shard's host: its rules are behind or ahead of
                // ours while the shard moves. Not a refusal of the credit:
                // refunding here could pay the money twice if an earlier
                // attempt was applied. Retried until both agree.
                Ok((403, v)) if v["error"] == "cell_mismatch" => {
                    last = format!("{addr}: 403 {v}");
                }
                Ok((status @ (400 | 403 | 409 | 422), v)) => {
                    return Outcome::Refused(format!(
                        "cell {cell} answered {status} {}: {}",
                        v["error"].as_str().unwrap_or("?"),
                        v["message"].as_str().unwrap_or("")
                    ))
                }
                Ok((status, v)) => last = format!("{addr}: {status} {v}"),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        match moved {
            Some(owner) if owner != cell => cell = owner,
            _ => return Outcome::Retry(last),
        }
    }
    Outcome::Retry(format!("payee {} keeps moving", item.to))
}

/// POSTs a JSON `body` to `path` on another cell's internal listener at
/// `addr`, signed as this cell and stamped with the rules revision; the
/// status and the JSON answer.
pub(crate) async fn post_signed(
    client: &Client<HttpConnector, Full<Bytes>>,
    rules: &RulesHolder,
    secret: &ClusterSecret,
    addr: &str,
    path: &str,
    body: &Bytes,
    timeout: Duration,
) -> Result<(u16, serde_json::Value), String> {
    let mut req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .header(STAMP_REV, rules.table().revision().to_string());
    for (name, value) in secret.sign("POST", path, rules.cell(), unix_ms(), body) {
        req = req.header(name, value);
    }
    let req = req
        .body(Full::new(body.clone()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| "timed out".to_string())?
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let text = tokio::time::timeout(timeout, resp.into_body().collect())
        .await
        .map_err(|_| "timed out reading the answer".to_string())?
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Ok((
        status,
        serde_json::from_slice(&text)
            .unwrap_or_else(|_| String::from_utf8_lossy(&text).into_owned().into()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        for attempts in 0..30 {
            let cap = (RETRY_BASE_MS << attempts.clamp(0, 20)).min(RETRY_MAX_MS);
            let d = backoff_ms(attempts);
            assert!(d >= cap / 2 && d <= cap, "{attempts}: {d} vs {cap}");
        }
        let spread: std::collections::BTreeSet<i64> = (0..50).map(|_| backoff_ms(10)).collect();
        assert!(spread.len() > 10, "jitter spreads retries: {spread:?}");
    }
}
