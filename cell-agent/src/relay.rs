//! The outbox relay: delivers cross-cell credits to the payee's cell,
//! retrying with exponential backoff until the payee's cell acknowledges.
//! The payee's cell applies credits idempotently (by transfer id), so a
//! delivery repeated after a crash or a lost acknowledgement is harmless;
//! the outbox record is only marked delivered after a 2xx.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use routing_rules::Colour;

use crate::metrics::AgentMetrics;
use crate::rules::RulesHolder;
use crate::store::sqlite::unix_ms;
use crate::store::{OutboxItem, Store, WriteOp};

/// First retry delay.
pub const RETRY_BASE_MS: i64 = 100;
/// Longest retry delay.
pub const RETRY_MAX_MS: i64 = 10_000;
/// Per-delivery timeout.
pub const DELIVERY_TIMEOUT_MS: u64 = 2_000;

/// Runs the relay until `stop` flips.
pub async fn run<S: Store>(
    store: S,
    rules: Arc<RulesHolder>,
    metrics: AgentMetrics,
    wake: Arc<tokio::sync::Notify>,
    writes_allowed: Arc<std::sync::atomic::AtomicBool>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        // A fenced instance changes nothing, its outbox included.
        let fenced = !writes_allowed.load(std::sync::atomic::Ordering::Relaxed);
        let due = match if fenced {
            Ok(Vec::new())
        } else {
            store.due_outbox(unix_ms(), 64).await
        } {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox");
                Vec::new()
            }
        };
        for item in &due {
            let result = deliver(&client, &rules, item).await;
            let op = match result {
                Ok(()) => {
                    metrics.deliveries.with_label_values(&["ok"]).inc();
                    tracing::info!(transfer = %item.transfer_id, to_cell = %item.to_cell, "cross-cell credit delivered");
                    WriteOp::Delivered { outbox_id: item.id }
                }
                Err(error) => {
                    metrics.deliveries.with_label_values(&["error"]).inc();
                    let backoff = (RETRY_BASE_MS << item.attempts.clamp(0, 20)).min(RETRY_MAX_MS);
                    tracing::warn!(transfer = %item.transfer_id, to_cell = %item.to_cell, attempts = item.attempts + 1, retry_ms = backoff, %error, "cross-cell credit not delivered; will retry");
                    WriteOp::DeliveryFailed {
                        outbox_id: item.id,
                        next_attempt_ms: unix_ms() + backoff,
                        error,
                    }
                }
            };
            if let Err(e) = store.write(op).await {
                tracing::warn!(error = %e, "cannot record the delivery outcome");
            }
        }
        if due.len() == 64 {
            continue;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(RETRY_BASE_MS as u64)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn deliver(
    client: &Client<HttpConnector, Full<Bytes>>,
    rules: &RulesHolder,
    item: &OutboxItem,
) -> Result<(), String> {
    let table = rules.table();
    let cell = table
        .cell_index(&item.to_cell)
        .ok_or_else(|| format!("cell {} is not in the rules", item.to_cell))?;
    let mut addrs: Vec<&String> = Colour::ALL
        .iter()
        .flat_map(|c| table.instances(cell, *c))
        .collect();
    if addrs.is_empty() {
        return Err(format!("cell {} has no instances", item.to_cell));
    }
    // Spread attempts over the payee cell's instances.
    let n = addrs.len();
    addrs.rotate_left(item.attempts as usize % n);
    let body = serde_json::json!({
        "transfer_id": item.transfer_id, "from_cell": rules.cell(), "to": item.to, "amount": item.amount,
    })
    .to_string();
    let mut last = String::new();
    for addr in addrs {
        let req = http::Request::post(format!("http://{addr}/v1/internal/credits"))
            .header("x-user-id", &item.to)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.clone())))
            .map_err(|e| e.to_string())?;
        let sent = tokio::time::timeout(
            Duration::from_millis(DELIVERY_TIMEOUT_MS),
            client.request(req),
        )
        .await;
        match sent {
            Ok(Ok(resp)) if resp.status().is_success() => return Ok(()),
            Ok(Ok(resp)) => {
                let status = resp.status();
                let text = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                last = format!("{addr}: {status} {}", String::from_utf8_lossy(&text));
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: timed out"),
        }
    }
    Err(last)
}
