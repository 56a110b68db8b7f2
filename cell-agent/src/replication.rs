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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::auth::ClusterSecret;
use crate::internal::JOURNAL_PATH;
use crate::metrics::AgentMetrics;
use crate::relay::{addresses, post_signed, Peers};
use crate::rules::RulesHolder;
use crate::store::sqlite::{send_replies, unix_ms, Ship, SqliteStore};

/// Most batches in one shipment.
const SHIPMENT: u32 = 64;
/// Pause between attempts on a failing standby, ms.
const RETRY_MS: u64 = 50;

/// What the shipper needs.
pub struct Shipper {
    /// The primary's store (its journal is read).
    pub store: SqliteStore,
    /// The cell whose shard it holds (this agent's own cell, or a cell whose
    /// shard a switchover moved here).
    pub shard: String,
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
    /// The replication record of this shard ([`record_path`]).
    pub record: PathBuf,
    /// The control plane the record also goes to (etcd endpoints and
    /// cluster), when the agent follows one.
    pub control_plane: Option<(Vec<String>, String)>,
    /// The shard's database file (snapshots are taken from it).
    pub db: PathBuf,
    /// The control-plane connection, kept between records (dropped after
    /// a failure, so the next record reconnects).
    #[cfg(feature = "etcd")]
    pub etcd: tokio::sync::Mutex<Option<routing_rules::etcd::ControlPlane>>,
}

/// Bytes of a snapshot per request.
const SNAPSHOT_CHUNK: usize = 4 * 1024 * 1024;

/// The replication state of a primary's shard, recorded (fsynced) next to
/// its database before the shard goes on without a synchronous standby.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The primary cell.
    pub cell: String,
    /// Its standby cell.
    pub standby: Option<String>,
    /// `in-sync` or `degraded`.
    pub state: String,
    /// Since when (unix ms).
    pub since_ms: i64,
    /// The last batch the standby acknowledged.
    pub acked_lsn: i64,
    /// When this record was written (unix ms).
    pub updated_ms: i64,
}

/// Where the replication record of the shard at `db` lives.
pub fn record_path(db: &Path) -> PathBuf {
    PathBuf::from(format!("{}.replication.json", db.display()))
}

/// Reads a replication record.
pub fn read_record(path: &Path) -> std::io::Result<Record> {
    let text = std::fs::read_to_string(path)?;
    serde_json::from_str(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Writes a replication record durably (temporary file, fsync, rename).
pub fn write_record(path: &Path, record: &Record) -> std::io::Result<()> {
    // Both colours of the cell write it: each through its own temporary.
    let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, serde_json::to_string_pretty(record)?.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
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
    /// This cell's standby under the rules held now, and its internal
    /// addresses (at least one).
    fn standby(&self) -> Result<(String, Vec<String>), Failure> {
        let table = self.rules.table();
        let me = self.shard.as_str();
        let Some(standby) = table.rules().standby_of(me).map(str::to_string) else {
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
        Ok((standby, addrs))
    }

    /// Sends a consistent snapshot of the shard to the standby, in chunks;
    /// returns the LSN its replica is at afterwards.
    async fn send_snapshot(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
    ) -> Result<i64, String> {
        use crate::internal::SNAPSHOT_PATH;
        let me = self.shard.clone();
        let (standby, addrs) = self.standby().map_err(|f| f.to_string())?;
        let addr = addrs[0].clone();
        // One name per snapshot: both colours of the cell share the file
        // and may send one at the same time.
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).map_err(|e| e.to_string())?;
        let id = hex::encode(raw);
        let (db, tmp) = (
            self.db.clone(),
            PathBuf::from(format!("{}.snapshot-outgoing.{id}", self.db.display())),
        );
        let t = tmp.clone();
        let lsn = tokio::task::spawn_blocking(move || {
            crate::store::sqlite::replica::snapshot_to(&db, &t).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        let bytes = tokio::fs::read(&tmp).await.map_err(|e| e.to_string());
        let _ = tokio::fs::remove_file(&tmp).await;
        let bytes = bytes?;
        tracing::info!(%standby, lsn, bytes = bytes.len(), "sending a snapshot of the shard to the standby");
        let total = bytes.len();
        let mut offset = 0usize;
        let timeout = self.timeout.max(Duration::from_secs(30));
        loop {
            let end = (offset + SNAPSHOT_CHUNK).min(total);
            let last = end == total;
            let mut body =
                serde_json::json!({"cell": me, "id": id, "offset": offset, "total": total, "last": last})
                    .to_string()
                    .into_bytes();
            body.push(b'\n');
            body.extend_from_slice(&bytes[offset..end]);
            match post_signed(
                client,
                &self.rules,
                &self.secret,
                &addr,
                SNAPSHOT_PATH,
                &Bytes::from(body),
                timeout,
            )
            .await
            {
                Ok((200, v)) if last => {
                    return v["applied"]
                        .as_i64()
                        .ok_or_else(|| format!("no LSN in {v}"))
                }
                Ok((200, _)) => offset = end,
                Ok((status, v)) => return Err(format!("{addr}: {status} {v}")),
                Err(e) => return Err(format!("{addr}: {e}")),
            }
        }
    }

    /// Records the shard's state durably (on a blocking thread).
    async fn write_state(&self, degraded: bool, since_ms: i64, acked: i64) -> std::io::Result<()> {
        let table = self.rules.table();
        let record = Record {
            cell: self.shard.clone(),
            standby: table.rules().standby_of(&self.shard).map(str::to_string),
            state: if degraded { "degraded" } else { "in-sync" }.to_string(),
            since_ms,
            acked_lsn: acked,
            updated_ms: unix_ms(),
        };
        let path = self.record.clone();
        let file = record.clone();
        tokio::task::spawn_blocking(move || write_record(&path, &file))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))?;
        self.record_in_control_plane(&record).await
    }

    /// Puts the record in etcd too (`replication/<cell>`), when the agent
    /// follows a control plane.
    #[cfg(feature = "etcd")]
    async fn record_in_control_plane(&self, record: &Record) -> std::io::Result<()> {
        let Some((endpoints, cluster)) = &self.control_plane else {
            return Ok(());
        };
        let mut held = self.etcd.lock().await;
        let put = async {
            if held.is_none() {
                *held = Some(routing_rules::etcd::ControlPlane::connect(endpoints, cluster).await?);
            }
            let value = serde_json::to_value(record).unwrap_or_default();
            match held.as_mut() {
                Some(cp) => cp.put_replication(&record.cell, &value).await,
                None => Ok(()),
            }
        };
        let result = match tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), put).await
        {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => std::io::Error::other(e.to_string()),
            Err(_) => std::io::Error::other("etcd did not answer in time"),
        };
        *held = None;
        Err(result)
    }

    #[cfg(not(feature = "etcd"))]
    async fn record_in_control_plane(&self, _record: &Record) -> std::io::Result<()> {
        Ok(())
    }

    /// Ships batches until the standby has applied `target`; returns the
    /// standby's LSN.
    async fn ship_until(
        &self,
        client: &Client<HttpConnector, Full<Bytes>>,
        acked: &mut i64,
        target: i64,
    ) -> Result<(), Failure> {
        // Whether the standby has told its position since the journal was
        // found not to follow `acked` (after a switchover the journal
        // restarts past what this shipper last saw acknowledged).
        let mut asked = false;
        while *acked < target {
            let me = self.shard.as_str();
            let (_, addrs) = self.standby()?;
            let batches = self
                .store
                .journal_after(*acked, SHIPMENT)
                .await
                .map_err(|e| Failure::Other(format!("cannot read the journal: {e}")))?;
            match batches.first() {
                None => return Err(Failure::Other(format!("batch {target} is not in the journal"))),
                Some(b) if *acked > 0 && b.lsn != *acked + 1 && asked => {
                    return Err(Failure::NeedSnapshot(format!(
                        "the standby is at LSN {acked} but the journal starts at {}: seed its replica again from a snapshot",
                        b.lsn
                    )))
                }
                Some(b) if b.lsn != *acked + 1 => asked = true,
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
        let mut since_ms = unix_ms();
        let (mut recorded_acked, mut recorded_at) = (-1i64, std::time::Instant::now());
        if let Err(e) = self.write_state(false, since_ms, acked).await {
            tracing::error!(record = %self.record.display(), error = %e, "cannot write the replication record");
        }
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
                        since_ms = unix_ms();
                        recorded_acked = -1;
                        tracing::info!(
                            lsn = acked,
                            "the standby caught up: this shard is synchronously replicated again"
                        );
                    }
                    // The acknowledged position, at most once a second.
                    if acked != recorded_acked
                        && (recorded_acked < 0 || recorded_at.elapsed() >= Duration::from_secs(1))
                        && self.write_state(false, since_ms, acked).await.is_ok()
                    {
                        (recorded_acked, recorded_at) = (acked, std::time::Instant::now());
                    }
                }
                Err(f) => {
                    let text = f.to_string();
                    if text != last_failure {
                        tracing::warn!(failure = %text, acked, target, "journal shipment to the standby failed");
                        last_failure = text;
                    }
                    // A standby that needs a snapshot will not catch up by
                    // the timeout: go on degraded at once, then send it one.
                    let need_snapshot = matches!(f, Failure::NeedSnapshot(_));
                    let overdue = need_snapshot
                        || pending
                            .front()
                            .is_some_and(|s| s.committed.elapsed() >= self.timeout);
                    if overdue && !self.degraded.load(Ordering::Acquire) {
                        // Record first: no write is answered without the
                        // standby before the record says so.
                        let now = unix_ms();
                        match self.write_state(true, now, acked).await {
                            Ok(()) => {
                                since_ms = now;
                                self.degraded.store(true, Ordering::Release);
                                tracing::warn!(acked, timeout_ms = self.timeout.as_millis() as u64, record = %self.record.display(), "the standby did not acknowledge in time: this shard now runs WITHOUT a synchronous standby (degraded, recorded) until it catches up");
                            }
                            Err(e) => {
                                tracing::error!(record = %self.record.display(), error = %e, "cannot record the degraded state: writes stay held")
                            }
                        }
                    }
                    if self.degraded.load(Ordering::Acquire) {
                        for s in pending.drain(..) {
                            send_replies(s.replies);
                        }
                        if need_snapshot {
                            match self.send_snapshot(&client).await {
                                Ok(lsn) => {
                                    acked = lsn;
                                    tracing::info!(lsn, "the standby installed the snapshot; catching up from there");
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "cannot send a snapshot to the standby")
                                }
                            }
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

/// With `--journal`, a cluster secret and a standby cell in the rules:
/// every write batch waits for the standby's acknowledgement (up to
/// `--sync-timeout-ms`). Returns the shipper's task.
pub(crate) fn start(
    cfg: &crate::AgentConfig,
    (shard, db, store): (&str, &Path, &SqliteStore),
    (rules, peers): (&Arc<RulesHolder>, &crate::relay::Peers),
    secret: Option<&crate::auth::ClusterSecret>,
    metrics: &AgentMetrics,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let standby = rules.table().rules().standby_of(shard).map(str::to_string);
    let journaled = cfg.journal || shard != rules.cell();
    let (Some(standby), Some(secret), true) = (standby, secret, journaled) else {
        if journaled {
            tracing::warn!(%shard, "--journal without a standby cell in the rules or without the cluster secret: the shard is journaled but not replicated");
        }
        return None;
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let degraded = Arc::new(AtomicBool::new(false));
    let timeout = Duration::from_millis(cfg.sync_timeout_ms);
    store.replicate(crate::store::sqlite::SyncLink {
        ship: tx,
        degraded: degraded.clone(),
    });
    tracing::info!(%shard, %standby, sync_timeout_ms = cfg.sync_timeout_ms, "replicating this shard synchronously to its standby");
    #[cfg(feature = "etcd")]
    let control_plane = cfg
        .etcd
        .as_ref()
        .map(|_| (crate::server::etcd_endpoints(cfg), cfg.cluster.clone()));
    #[cfg(not(feature = "etcd"))]
    let control_plane = None;
    let shipper = Shipper {
        store: store.clone(),
        shard: shard.to_string(),
        rules: rules.clone(),
        peers: peers.clone(),
        secret: secret.clone(),
        metrics: metrics.clone(),
        degraded,
        timeout,
        record: record_path(db),
        control_plane,
        db: db.to_path_buf(),
        #[cfg(feature = "etcd")]
        etcd: tokio::sync::Mutex::new(None),
    };
    Some(tokio::spawn(shipper.run(rx, stop)))
}
