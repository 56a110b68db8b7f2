//! The shards an agent serves: its own cell's (`--db`), and any other
//! cell's whose shard a switchover moved to this cell (`hosted_by` in the
//! rules), kept as `CELL.replica.db` in the replica directory and opened —
//! with its own writer, relay, prune and shipper — the first time it is
//! needed.

use std::collections::HashMap;
use std::sync::Mutex;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::metrics::AgentMetrics;
use crate::rules::RulesHolder;
use crate::store::sqlite::SqliteStore;

use crate::store::DomainError;

/// Opens the copy of a hosted shard as a store, with its background tasks
/// (stopped through the returned sender).
pub type Opener<S> = Box<dyn Fn(&str) -> Result<(S, watch::Sender<bool>), String> + Send + Sync>;

/// The stores of the shards this agent serves.
pub struct Shards<S> {
    home: String,
    own: S,
    hosted: Mutex<HashMap<String, (S, watch::Sender<bool>)>>,
    opener: Option<Opener<S>>,
}

impl<S: Clone> Shards<S> {
    /// The agent of cell `home` with its own store; `opener` opens hosted
    /// shards (without one, only the own shard is served).
    pub fn new(home: &str, own: S, opener: Option<Opener<S>>) -> Self {
        Shards {
            home: home.to_string(),
            own,
            hosted: Mutex::default(),
            opener,
        }
    }

    /// The store of the agent's own cell.
    pub fn own(&self) -> &S {
        &self.own
    }

    /// The store of `shard` (the guard decided this cell serves it),
    /// opening a hosted shard on first use.
    pub fn get(&self, shard: &str) -> Result<S, DomainError> {
        if shard == self.home {
            return Ok(self.own.clone());
        }
        let mut hosted = self.hosted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((s, _)) = hosted.get(shard) {
            return Ok(s.clone());
        }
        let Some(open) = &self.opener else {
            return Err(not_here(shard, "this agent serves only its own shard"));
        };
        let (store, stop) = open(shard).map_err(|e| not_here(shard, &e))?;
        tracing::info!(%shard, "serving a shard moved to this cell");
        hosted.insert(shard.to_string(), (store.clone(), stop));
        Ok(store)
    }

    /// Stops serving a hosted shard (it moved on): its tasks stop.
    pub fn close(&self, shard: &str) {
        let mut hosted = self.hosted.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, stop)) = hosted.remove(shard) {
            let _ = stop.send(true);
            tracing::info!(%shard, "no longer serving a shard that moved away");
        }
    }

    /// Names of the hosted shards open now.
    pub fn hosted(&self) -> Vec<String> {
        let hosted = self.hosted.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<String> = hosted.keys().cloned().collect();
        v.sort();
        v
    }
}

fn not_here(shard: &str, why: &str) -> DomainError {
    DomainError::new(
        503,
        "shard_not_here",
        format!("cell {shard}'s shard is routed to this cell, but it cannot serve it: {why}"),
    )
}

/// Opens a shard a switchover moved to this cell (its copy in the replica
/// directory) with its own writer, relay, prune and shipper.
pub(crate) struct HostedOpener {
    pub(crate) cfg: crate::AgentConfig,
    pub(crate) limits: crate::store::sqlite::WriterLimits,
    pub(crate) writes_allowed: Arc<AtomicBool>,
    pub(crate) replicas: crate::store::sqlite::replica::Replicas,
    pub(crate) rules: Arc<RulesHolder>,
    pub(crate) peers: crate::relay::Peers,
    pub(crate) secret: Option<crate::auth::ClusterSecret>,
    pub(crate) metrics: AgentMetrics,
}

impl HostedOpener {
    pub(crate) fn open(&self, shard: &str) -> Result<(SqliteStore, watch::Sender<bool>), String> {
        let path = self.replicas.path(shard);
        if !path.is_file() {
            return Err(format!(
                "it has no copy of it ({} is missing)",
                path.display()
            ));
        }
        let store = SqliteStore::open_gated(&path, shard, self.limits, self.writes_allowed.clone())
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let (stop, stop_rx) = watch::channel(false);
        // Its tasks end with the stop channel (the handles are not kept).
        let _ = self.shard_tasks(
            (shard, &path, &store),
            Arc::new(tokio::sync::Notify::new()),
            stop_rx,
        );
        Ok((store, stop))
    }

    /// The background tasks of a shard this agent holds (its own, or one
    /// moved here): its shipper to its standby (when replicated), the prune
    /// of its old records, and its outbox relay (woken by `wake`).
    pub(crate) fn shard_tasks(
        &self,
        (shard, path, store): (&str, &std::path::Path, &SqliteStore),
        wake: Arc<tokio::sync::Notify>,
        stop: watch::Receiver<bool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let cfg = &self.cfg;
        let mut tasks: Vec<_> = crate::replication::start(
            cfg,
            (shard, path, store),
            (&self.rules, &self.peers),
            self.secret.as_ref(),
            &self.metrics,
            stop.clone(),
        )
        .into_iter()
        .collect();
        tasks.push(tokio::spawn(crate::prune::run(
            store.clone(),
            cfg.idempotency_retention,
            Duration::from_millis(cfg.prune_interval_ms),
            self.metrics.clone(),
            stop.clone(),
        )));
        tasks.push(tokio::spawn(crate::relay::run(
            store.clone(),
            crate::relay::Relay {
                shard: shard.to_string(),
                rules: self.rules.clone(),
                metrics: self.metrics.clone(),
                wake,
                writes_allowed: self.writes_allowed.clone(),
                secret: self.secret.clone(),
                peers: self.peers.clone(),
            },
            stop,
        )));
        tasks
    }
}
