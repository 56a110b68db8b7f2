//! The pruning task: every `--prune-interval-ms`, removes the records
//! older than `--idempotency-retention` in bounded steps through the
//! writer (see [`crate::store::sqlite::prune`] for what goes and why
//! exactly-once holds).

use std::time::Duration;

use crate::metrics::AgentMetrics;
use crate::store::sqlite::prune::WATERMARK_MARGIN_MS;
use crate::store::sqlite::unix_ms;
use crate::store::{Store, WriteOp};

/// Rows of each kind removed per write.
pub const PRUNE_STEP: u32 = 1_000;

/// Runs until `stop` flips.
pub async fn run<S: Store>(
    store: S,
    retention: Duration,
    interval: Duration,
    metrics: AgentMetrics,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let retention_ms = retention.as_millis() as i64;
        let before_ms = unix_ms() - retention_ms;
        let margin_ms = retention_ms.min(WATERMARK_MARGIN_MS);
        loop {
            let r = store
                .write(WriteOp::Prune {
                    before_ms,
                    margin_ms,
                    limit: PRUNE_STEP,
                })
                .await;
            let counts = match r {
                Ok((_, v)) => v,
                Err(e) if e.code == "shard_moved" => {
                    // This copy is a replica now: its primary prunes.
                    tracing::debug!("not pruning a replica");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning failed; will retry");
                    break;
                }
            };
            let mut full = false;
            for kind in ["idempotency", "outbox", "inbox"] {
                let n = counts[kind].as_u64().unwrap_or(0);
                metrics.pruned.with_label_values(&[kind]).inc_by(n);
                full |= n >= PRUNE_STEP as u64;
            }
            if counts != serde_json::json!({"idempotency": 0, "outbox": 0, "inbox": 0}) {
                tracing::info!(%counts, "pruned records past the retention");
            }
            if !full || *stop.borrow() {
                break;
            }
        }
    }
}
