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
use tokio::sync::mpsc::UnboundedReceiver;

use crate::auth::ClusterSecret;
use crate::metrics::AgentMetrics;
use crate::relay::{addresses, Peers};
use crate::rules::RulesHolder;
use crate::store::sqlite::{send_replies, unix_ms, Ship, SqliteStore};

mod outgoing;
mod record;
mod ship;
mod snapshot;

use outgoing::{in_memory, Outgoing};
use record::State;
pub use record::{read_record, record_path, write_record, Record};
use snapshot::SNAPSHOT_RETRY;

/// Most batches in one shipment.
const SHIPMENT: u32 = 64;
/// Pause between attempts on a failing standby, ms.
const RETRY_MS: u64 = 50;
/// How often an idle shipper checks that the standby holds every
/// committed batch (and ships what it lacks).
const IDLE_RECHECK: Duration = Duration::from_millis(500);
/// The least time a shipment is given, even when the oldest waiting write
/// is already past its sync timeout (so a standby that answers can still
/// take it before the shard goes on degraded).
const MIN_TRY: Duration = Duration::from_millis(50);

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
    /// In the embedded mode, the rules file: the record is also kept next
    /// to it, and going on degraded takes its lock
    /// ([`routing_rules::switchover::lock_rules`]).
    pub rules_file: Option<PathBuf>,
    /// The rules revision [`Shipper::may_go_degraded`] last checked (a
    /// degraded record in etcd is written only while the rules are still
    /// at it).
    pub checked_revision: std::sync::atomic::AtomicU64,
    /// The standby the last record named, and the journal's history then
    /// (a promotion starts a new one: the shard's record, maybe written by
    /// another copy meanwhile, is rewritten at once).
    pub recorded_standby: tokio::sync::Mutex<(Option<String>, String)>,
    /// The journal's history of the last shipment.
    pub shipped_timeline: tokio::sync::Mutex<String>,
    /// The standby address that last acknowledged a shipment (tried first).
    pub last_good: std::sync::Mutex<Option<String>>,
    /// The control-plane connection, kept between records (dropped after
    /// a failure, so the next record reconnects).
    #[cfg(feature = "etcd")]
    pub etcd: tokio::sync::Mutex<Option<routing_rules::etcd::ControlPlane>>,
}

/// Why a shipment did not reach the standby.
#[derive(Debug)]
enum Failure {
    /// Nothing to ship to.
    NoStandby(String),
    /// The standby needs a snapshot first.
    NeedSnapshot(String),
    /// The shard was failed over: another copy is its primary.
    Fenced(String),
    /// Unreachable or refusing; retry.
    Other(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::NoStandby(m) => write!(f, "no standby to ship to: {m}"),
            Failure::NeedSnapshot(m) => write!(f, "the standby needs a snapshot: {m}"),
            Failure::Fenced(m) => write!(f, "the shard was failed over: {m}"),
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

    /// [`Self::standby`] with the address that answered last first (a
    /// standby instance that is down or hangs costs one try, not every
    /// one).
    fn standby_in_order(&self) -> Result<(String, Vec<String>), Failure> {
        let (standby, mut addrs) = self.standby()?;
        if let Some(good) = self.last_good.lock().ok().and_then(|g| g.clone()) {
            if let Some(i) = addrs.iter().position(|a| *a == good) {
                addrs[..=i].rotate_right(1);
            }
        }
        Ok((standby, addrs))
    }

    /// Remembers `addr` as the standby address that answered last.
    fn answered(&self, addr: &str) {
        if let Ok(mut g) = self.last_good.lock() {
            *g = Some(addr.to_string());
        }
    }

    /// The shard was failed over while this copy was cut off: it becomes a
    /// replica (its writer refuses every write) and the writes held for the
    /// standby are answered as not acknowledged — their rows are this
    /// copy's unacknowledged tail, discarded when it is seeded again.
    async fn fence(&self, pending: &mut VecDeque<Ship>, why: &str) {
        let db = self.db.clone();
        let fenced =
            tokio::task::spawn_blocking(move || crate::store::sqlite::shard::fence(&db)).await;
        if !matches!(fenced, Ok(Ok(()))) {
            tracing::error!(?fenced, "cannot mark this copy a replica");
        }
        let n = pending.len();
        for s in pending.drain(..) {
            for (tx, _) in s.replies {
                let _ = tx.send(Err(crate::store::DomainError::new(
                    503,
                    "shard_failed_over",
                    "this cell's shard was failed over to its standby while the write waited for it: the write was NOT acknowledged and is not kept; retry (the shard is served by its new cell)",
                )));
            }
        }
        tracing::error!(shard = %self.shard, %why, unacknowledged_batches = n, "the shard was failed over: this copy refuses every write from now on; its unacknowledged tail is discarded when it is seeded again (failback)");
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
        let mut next_snapshot = std::time::Instant::now();
        let (mut recorded_acked, mut recorded_at) = (-1i64, std::time::Instant::now());
        // In sync only once the standby has confirmed what this copy
        // holds (a copy promoted by a failover holds writes its new standby
        // lacks); until then the record says so.
        // Promoted by a failover: the standby is the lost cell; go on
        // degraded at once (recorded first) rather than hold the first
        // writes for the sync timeout.
        if matches!(
            self.store
                .flag(crate::store::sqlite::shard::STANDBY_LOST)
                .await,
            Ok(true)
        ) {
            match self.may_go_degraded().await {
                Ok(_held) => {
                    if self
                        .write_state(State::Degraded, since_ms, acked)
                        .await
                        .is_ok()
                    {
                        self.degraded.store(true, Ordering::Release);
                        self.metrics.replication_degraded.set(1);
                        tracing::warn!(shard = %self.shard, "promoted by a failover: this shard runs WITHOUT a synchronous standby (degraded, recorded) until its old host is seeded again");
                    }
                }
                Err(why) => {
                    tracing::warn!(%why, "promoted by a failover, but the shard is not held here")
                }
            }
        }
        let replica = matches!(
            self.store.role().await,
            Ok(crate::store::sqlite::shard::Role::Replica)
        );
        let probe = async {
            if replica || self.degraded.load(Ordering::Acquire) {
                return Ok(());
            }
            let target = self
                .store
                .last_lsn()
                .await
                .map_err(|e| Failure::Other(e.to_string()))?;
            match self
                .ship_until(&client, &mut acked, target, &VecDeque::new())
                .await
            {
                // A standby without a copy is seeded at once, not at the
                // first write (which would then run degraded meanwhile).
                Err(Failure::NeedSnapshot(_)) => {
                    acked = self.send_snapshot(&client).await.map_err(Failure::Other)?;
                    tracing::info!(
                        lsn = acked,
                        "seeded the standby with a snapshot of the shard"
                    );
                    self.ship_until(&client, &mut acked, target, &VecDeque::new())
                        .await
                }
                r => r,
            }
        };
        let state = match probe.await {
            Ok(()) => State::InSync,
            Err(e) => {
                tracing::warn!(failure = %e, "the standby does not hold this shard's last batch yet");
                State::CatchingUp
            }
        };
        // A replica's record is its primary's to write; a degraded start
        // has written its own.
        if !replica && !self.degraded.load(Ordering::Acquire) {
            if let Err(e) = self.write_state(state, since_ms, acked).await {
                tracing::error!(record = %self.record.display(), error = %e, "cannot write the replication record");
            }
        }

        // Set once a snapshot is installed: the next round ships up to the
        // last committed batch without waiting for a new write, so a
        // standby seeded while no writes come is recorded in sync at once.
        let mut recheck = false;
        loop {
            if pending.is_empty() && !recheck {
                tokio::select! {
                    s = rx.recv() => match s { Some(s) => pending.push_back(s), None => return },
                    _ = stop.changed() => return,
                    // Idle: a standby that was unreachable (or came up after
                    // this primary) is caught up without waiting for a write.
                    _ = tokio::time::sleep(IDLE_RECHECK) => {
                        let last = self.store.last_lsn().await.unwrap_or(acked);
                        if last > acked {
                            recheck = true;
                        } else {
                            continue;
                        }
                    }
                }
            }
            while let Ok(s) = rx.try_recv() {
                pending.push_back(s);
            }
            let mut target = pending.back().map_or(acked, |s| s.lsn);
            if std::mem::take(&mut recheck) {
                target = target.max(self.store.last_lsn().await.unwrap_or(acked));
            }
            let result = self.ship_until(&client, &mut acked, target, &pending).await;
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
                        let _ = self
                            .store
                            .clear_flag(crate::store::sqlite::shard::STANDBY_LOST)
                            .await;
                        since_ms = unix_ms();
                        recorded_acked = -1;
                        tracing::info!(
                            lsn = acked,
                            "the standby caught up: this shard is synchronously replicated again"
                        );
                    }
                    // The acknowledged position, at most once a second —
                    // at once when the record names another standby (the
                    // shard moved: the last record may be its old host's).
                    let standby_now = self
                        .rules
                        .table()
                        .rules()
                        .standby_of(&self.shard)
                        .map(str::to_string);
                    let timeline = self.shipped_timeline.lock().await.clone();
                    let moved = *self.recorded_standby.lock().await != (standby_now, timeline);
                    if (moved || acked != recorded_acked)
                        && (moved
                            || recorded_acked < 0
                            || recorded_at.elapsed() >= Duration::from_secs(1))
                        && self
                            .write_state(State::InSync, since_ms, acked)
                            .await
                            .is_ok()
                    {
                        (recorded_acked, recorded_at) = (acked, std::time::Instant::now());
                    }
                }
                Err(Failure::Fenced(why)) => {
                    self.fence(&mut pending, &why).await;
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
                    // Promoted by a failover (either colour may have done
                    // it): the standby is the lost cell, no point waiting.
                    let standby_lost = !self.degraded.load(Ordering::Acquire)
                        && matches!(
                            self.store
                                .flag(crate::store::sqlite::shard::STANDBY_LOST)
                                .await,
                            Ok(true)
                        );
                    let overdue = need_snapshot
                        || standby_lost
                        || pending
                            .front()
                            .is_some_and(|s| s.committed.elapsed() >= self.timeout);
                    let mut lock = None;
                    if overdue && !self.degraded.load(Ordering::Acquire) {
                        match self.may_go_degraded().await {
                            Ok(l) => lock = Some(l),
                            Err(why) => {
                                self.fence(&mut pending, &why).await;
                                continue;
                            }
                        }
                    }
                    if let Some(_held) = lock {
                        // Record first: no write is answered without the
                        // standby before the record says so.
                        let now = unix_ms();
                        match self.write_state(State::Degraded, now, acked).await {
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
                        if need_snapshot && std::time::Instant::now() >= next_snapshot {
                            match self.send_snapshot(&client).await {
                                Ok(lsn) => {
                                    acked = lsn;
                                    recheck = true;
                                    tracing::info!(lsn, "the standby installed the snapshot; catching up from there");
                                }
                                Err(e) => {
                                    // A snapshot is big: the next try waits.
                                    next_snapshot = std::time::Instant::now() + SNAPSHOT_RETRY;
                                    tracing::warn!(error = %e, retry_s = SNAPSHOT_RETRY.as_secs(), "cannot send a snapshot to the standby")
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
        rules_file: cfg.rules.clone(),
        checked_revision: std::sync::atomic::AtomicU64::new(0),
        recorded_standby: tokio::sync::Mutex::new((None, String::new())),
        shipped_timeline: tokio::sync::Mutex::new(String::new()),
        last_good: std::sync::Mutex::new(None),
        #[cfg(feature = "etcd")]
        etcd: tokio::sync::Mutex::new(None),
    };
    Some(tokio::spawn(shipper.run(rx, stop)))
}
