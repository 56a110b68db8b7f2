//! Synchronous replication of a cell's shard to its standby cell (the
//! shipping side): the store's writer hands every committed batch to the
//! shipper and answers its writes only once the standby acknowledged it
//! ([`crate::store::sqlite::SyncLink`]); the shipper reads the batches from
//! the journal (so batches of the other colour, which shares the file, go
//! along in order) and posts them, signed, to the standby's internal
//! listener (`POST /v1/internal/journal`), which applies them to its
//! replica file and answers its LSN.
//!
//! One acknowledgement per batch, not per write: every pending batch up to
//! the newest goes in one shipment.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::auth::ClusterSecret;
use crate::internal::JOURNAL_PATH;
use crate::metrics::AgentMetrics;
use crate::relay::{addresses, post_signed, Peers};
use crate::rules::RulesHolder;
use crate::store::sqlite::{send_replies, Ship, SqliteStore};

/// Most batches in one shipment.
const SHIPMENT: u32 = 64;
/// Pause between attempts on a failing standby, ms.
const RETRY_MS: u64 = 50;

/// What the shipper needs.
pub struct Shipper {
    /// The primary's store (its journal is read).
    pub store: SqliteStore,
    /// The rules (this cell's standby; its internal addresses).
    pub rules: Arc<RulesHolder>,
    /// Registered internal addresses.
    pub peers: Peers,
    /// Signs shipments.
    pub secret: ClusterSecret,
    /// Metrics.
    pub metrics: AgentMetrics,
    /// Shared with the writer: true while running without a synchronous
    /// standby.
    pub degraded: Arc<AtomicBool>,
    /// Per-shipment timeout.
    pub timeout: Duration,
}

/// Why a shipment did not reach the standby.
#[derive(Debug)]
enum Failure {
    /// Nothing to ship to.
    NoStandby(String),
    /// The standby needs a snapshot first.
    NeedSnapshot(String),
    /// Unreachable or refusing; retry.
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoStandby(m) => write!(f, "no standby to ship to: {m}"),
            Failure::NeedSnapshot(m) => write!(f, "the standby needs a snapshot: {m}"),
            Failure::Other(m) => write!(f, "{m}"),
        }
    }
}

impl Shipper {
    /// Ships batches until the standby has applied `target`; returns the
    /// standby's LSN.
    async fn ship_until(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
        acked: &mut i64,
        target: i64,
    ) -> Result<(), Failure> {
        while *acked < target {
            let table = self.rules.table();
            let me = self.rules.cell();
            let Some(standby) = table
                .rules()
                .cells
                .get(me)
                .and_then(|c| c.standby())
                .map(str::to_string)
            else {
                return Err(Failure::NoStandby(format!(
                    "cell {me} has no standby in the rules"
                )));
            };
            let addrs = addresses(&self.rules, &self.peers, &standby);
            if addrs.is_empty() {
                return Err(Failure::NoStandby(format!(
                    "standby cell {standby} lists no internal address (rules `internal` or registrations)"
                )));
            }
            let batches = self
                .store
                .journal_after(*acked, SHIPMENT)
                .await
                .map_err(|e| Failure::Other(format!("cannot read the journal: {e}")))?;
            match batches.first() {
                None => return Err(Failure::Other(format!("batch {target} is not in the journal"))),
                Some(b) if *acked > 0 && b.lsn != *acked + 1 => {
                    return Err(Failure::NeedSnapshot(format!(
                        "the standby is at LSN {acked} but the journal starts at {}: seed its replica again from a snapshot",
                        b.lsn
                    )))
                }
                Some(_) => {}
            }
            let body = Bytes::from(serde_json::json!({"cell": me, "batches": batches}).to_string());
            let mut last = String::new();
            let mut moved = false;
            for addr in &addrs {
                match post_signed(
                    client,
                    &self.rules,
                    &self.secret,
                    addr,
                    JOURNAL_PATH,
                    &body,
                    self.timeout,
                )
                .await
                {
                    Ok((200, v)) => {
                        *acked = v["applied"].as_i64().unwrap_or(*acked);
                        moved = true;
                        break;
                    }
                    Ok((409, v)) if v["error"] == "journal_gap" => {
                        *acked = v["lsn"].as_i64().unwrap_or(0);
                        moved = true;
                        break;
                    }
                    Ok((409, v)) if v["error"] == "need_snapshot" => {
                        return Err(Failure::NeedSnapshot(
                            v["message"].as_str().unwrap_or_default().to_string(),
                        ))
                    }
                    Ok((status, v)) => last = format!("{addr}: {status} {v}"),
                    Err(e) => last = format!("{addr}: {e}"),
                }
            }
            if !moved {
                return Err(Failure::Other(last));
            }
        }
        Ok(())
    }

    /// Runs until `stop`: takes committed batches, ships them, and sends
    /// their writes' answers once the standby has applied them. A standby
    /// that fails is tried again until the oldest waiting batch has waited
    /// the sync timeout (it may be restarting); then the shard goes on
    /// degraded and every held answer is sent.
    pub async fn run(
        self,
        mut rx: UnboundedReceiver<Ship>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let mut acked = 0i64;
        let mut last_failure = String::new();
        let mut pending: VecDeque<Ship> = VecDeque::new();
        loop {
            if pending.is_empty() {
                tokio::select! {
                    s = rx.recv() => match s { Some(s) => pending.push_back(s), None => return },
                    _ = stop.changed() => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                pending.push_back(s);
            }
            let target = pending.back().map_or(acked, |s| s.lsn);
            let result = self.ship_until(&client, &mut acked, target).await;
            // Answer what the standby has.
            while pending.front().is_some_and(|s| s.lsn <= acked) {
                if let Some(s) = pending.pop_front() {
                    self.metrics
                        .replication_ack_seconds
                        .observe(s.committed.elapsed().as_secs_f64());
                    send_replies(s.replies);
                }
            }
            self.metrics
                .replication_lag_lsn
                .set((target - acked).max(0));
            match result {
                Ok(()) => {
                    last_failure.clear();
                    if self.degraded.swap(false, Ordering::AcqRel) {
                        tracing::info!(
                            lsn = acked,
                            "the standby caught up: this shard is synchronously replicated again"
                        );
                    }
                }
                Err(f) => {
                    let text = f.to_string();
                    if text != last_failure {
                        tracing::warn!(failure = %text, acked, target, "journal shipment to the standby failed");
                        last_failure = text;
                    }
                    let overdue = pending
                        .front()
                        .is_some_and(|s| s.committed.elapsed() >= self.timeout);
                    if overdue || self.degraded.load(Ordering::Acquire) {
                        if !self.degraded.swap(true, Ordering::AcqRel) {
                            tracing::warn!(acked, timeout_ms = self.timeout.as_millis() as u64, "the standby did not acknowledge in time: this shard now runs WITHOUT a synchronous standby (degraded) until it catches up");
                        }
                        for s in pending.drain(..) {
                            send_replies(s.replies);
                        }
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(RETRY_MS)) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
            self.metrics
                .replication_degraded
                .set(i64::from(self.degraded.load(Ordering::Acquire)));
        }
    }
}
