//! `cell-agent serve`: opens the store, loads the rules, serves the API
//! behind the guard, runs the outbox relay, and drains on shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use http::{HeaderValue, Request};
use routing_rules::Colour;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::{Layer, ServiceExt};

use crate::api::Api;
use crate::guard::GuardLayer;
use crate::metrics::AgentMetrics;
use crate::rules::RulesHolder;
use crate::store::sqlite::SqliteStore;

/// Flags of `cell-agent serve`.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["rules", "etcd"])))]
pub struct AgentConfig {
    /// This agent's cell (must be defined in the rules).
    #[arg(long, value_name = "NAME")]
    pub cell: String,
    /// This agent's colour.
    #[arg(long, value_name = "blue|green", value_parser = parse_colour)]
    pub colour: Colour,
    /// SQLite database of the cell (created if missing; both colours share it).
    #[arg(long, value_name = "PATH")]
    pub db: PathBuf,
    /// Rules document (TOML), watched for changes.
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// Follow the rules in etcd and register this instance under a lease
    /// (needs a build with the `etcd` feature). Env CELLGATE_ETCD.
    #[arg(long, value_name = "URL[,URL...]", env = "CELLGATE_ETCD")]
    pub etcd: Option<String>,
    /// Cluster name in etcd (env CELLGATE_CLUSTER).
    #[arg(
        long,
        value_name = "NAME",
        env = "CELLGATE_CLUSTER",
        default_value = "default"
    )]
    pub cluster: String,
    /// With --etcd: registration id under /cellgate/NAME/instances/CELL/COLOUR/ (default: host-pid).
    #[arg(long, value_name = "ID")]
    pub instance_id: Option<String>,
    /// With --etcd: the address gateways should use (default: the bound listen address).
    #[arg(long, value_name = "ADDR")]
    pub advertise: Option<String>,
    /// With --etcd: the internal address other cells should use (default:
    /// the bound --internal-listen address).
    #[arg(long, value_name = "ADDR")]
    pub internal_advertise: Option<String>,
    /// With --etcd: lease TTL in seconds. Without a live lease the agent refuses writes.
    #[arg(long, value_name = "S", default_value_t = 5, value_parser = clap::value_parser!(i64).range(1..=300))]
    pub lease_ttl_s: i64,
    /// Listen address (port 0 picks a free port; the address is logged and
    /// printed on stdout as `listening on ADDR`).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8181", value_parser = routing_rules::net::parse_listen)]
    pub listen: SocketAddr,
    /// Internal (cell-to-cell) listen address, for credits from other
    /// cells; never exposed through a gateway. List it under the cell's
    /// `internal` addresses in the rules (or let registrations carry it).
    /// Prints `internal listening on ADDR` on stdout.
    #[arg(long, value_name = "ADDR", value_parser = routing_rules::net::parse_listen)]
    pub internal_listen: Option<SocketAddr>,
    /// File holding the cluster's shared secret (at least 32 bytes) that
    /// signs cell-to-cell calls. Env CELLGATE_INTERNAL_SECRET may hold the
    /// secret itself instead. Without one, the internal listener does not
    /// start and cross-cell transfers are refused.
    #[arg(long, value_name = "PATH", env = "CELLGATE_INTERNAL_SECRET_FILE")]
    pub internal_secret_file: Option<PathBuf>,
    /// Most client connections open at once per listener; further clients
    /// wait in the kernel's accept queue.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// Writes that may wait for the database writer; beyond, a write is
    /// refused at once with 503 `overloaded` and `Retry-After` (load
    /// shedding, not an unbounded queue).
    #[arg(long, value_name = "N", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub write_queue: u32,
    /// A queued write not started within this many ms is dropped unapplied
    /// (503 `write_expired`). Keep it below the gateway's
    /// --request-timeout-ms, so no write commits after its client gave up.
    #[arg(long, value_name = "MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub write_deadline_ms: u64,
    /// How long idempotency records, closed outbox records and incoming
    /// credits are kept (e.g. `7d`, `36h`). A retry with a key older than
    /// this is a new request. Incoming credits are kept longer when their
    /// sender may still retry them (see docs/api.md, "Retention").
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = parse_retention)]
    pub idempotency_retention: Duration,
    /// How often records past the retention are pruned, ms.
    #[arg(long, value_name = "MS", default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(10..))]
    pub prune_interval_ms: u64,
    /// A cross-cell transfer unacknowledged for longer than this (ms) is
    /// overdue: counted in `cell_outbox_overdue`, flagged by `cell-agent outbox`.
    #[arg(long, value_name = "MS", default_value_t = 300_000)]
    pub outbox_alert_after_ms: u64,
    /// How often the rules file is checked, ms.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pub reload_interval_ms: u64,
    /// On SIGTERM, how long in-flight requests may take, ms.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Journal every row each write batch changes (in the batch's own
    /// transaction), for a replica of this shard (`cell-agent replica
    /// sync`). Once on, the file keeps journaling. Costs write throughput:
    /// see docs/benchmarks.md.
    #[arg(long)]
    pub journal: bool,
    /// As a standby, where the replicas of other cells' shards are kept
    /// (`CELL.replica.db`); default: the directory of --db.
    #[arg(long, value_name = "DIR")]
    pub replica_dir: Option<PathBuf>,
    /// As a primary with --journal and a standby cell in the rules, how
    /// long a write batch waits for the standby's acknowledgement before
    /// the shard goes on without a synchronous standby (degraded), ms.
    #[arg(long, value_name = "MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub sync_timeout_ms: u64,
}

impl AgentConfig {
    /// The configuration `cell-agent serve` would have with only the cell,
    /// colour, database and rules file given (every other flag at its
    /// default; listening on a free loopback port), for embedding an agent
    /// (the demo, tests).
    pub fn new(cell: &str, colour: Colour, db: PathBuf, rules: Option<PathBuf>) -> AgentConfig {
        AgentConfig {
            cell: cell.into(),
            colour,
            db,
            rules,
            etcd: None,
            cluster: "default".into(),
            instance_id: None,
            advertise: None,
            lease_ttl_s: 5,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            internal_listen: None,
            internal_advertise: None,
            internal_secret_file: None,
            max_connections: 4096,
            outbox_alert_after_ms: 300_000,
            write_queue: 1024,
            write_deadline_ms: 10_000,
            idempotency_retention: Duration::from_secs(7 * 86_400),
            prune_interval_ms: 60_000,
            reload_interval_ms: 200,
            drain_timeout_ms: 10_000,
            journal: false,
            replica_dir: None,
            sync_timeout_ms: 1_000,
        }
    }
}

fn parse_retention(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration such as 7d, 36h or 90m: {e}"))?;
    if d < Duration::from_secs(1) {
        return Err(format!("{s:?}: the retention must be at least 1s"));
    }
    Ok(d)
}

fn parse_colour(s: &str) -> Result<Colour, String> {
    Colour::parse(s).ok_or_else(|| format!("colour must be blue or green, not {s:?}"))
}

/// A running agent.
pub struct RunningAgent {
    /// Bound address.
    pub addr: SocketAddr,
    /// Bound internal (cell-to-cell) address, with `--internal-listen`.
    pub internal_addr: Option<SocketAddr>,
    /// The rules holder.
    pub rules: Arc<RulesHolder>,
    stop: watch::Sender<bool>,
    serve: tokio::task::JoinHandle<()>,
    others: Vec<tokio::task::JoinHandle<()>>,
    api: Arc<Api<SqliteStore>>,
    drain: Duration,
}

impl std::fmt::Debug for RunningAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningAgent")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Starts an agent. Must run inside a tokio runtime.
pub async fn start(
    cfg: AgentConfig,
    registry: prometheus::Registry,
) -> anyhow::Result<RunningAgent> {
    let listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", cfg.listen))?;
    start_on(cfg, listener, registry).await
}

/// Starts an agent on a listener the caller already bound (`cfg.listen`
/// is ignored), e.g. when the address must be known before the rules are
/// written.
pub async fn start_on(
    cfg: AgentConfig,
    listener: TcpListener,
    registry: prometheus::Registry,
) -> anyhow::Result<RunningAgent> {
    start_bound(cfg, listener, None, registry).await
}

/// Starts an agent on listeners the caller already bound: the public one
/// and, when given, the internal one (`cfg.listen` and `cfg.internal_listen`
/// are then ignored).
pub async fn start_bound(
    cfg: AgentConfig,
    listener: TcpListener,
    internal: Option<TcpListener>,
    registry: prometheus::Registry,
) -> anyhow::Result<RunningAgent> {
    let rules = match &cfg.rules {
        Some(path) => RulesHolder::load(path, &cfg.cell)?,
        None => etcd_rules(&cfg).await?,
    };
    let limits = crate::store::sqlite::WriterLimits {
        queue: cfg.write_queue as usize,
        deadline: Duration::from_millis(cfg.write_deadline_ms),
    };
    // With a control plane, writes wait for the instance's lease
    // (self-fencing); the store's writer checks it before every write.
    let writes_allowed = Arc::new(AtomicBool::new(cfg.rules.is_some()));
    if cfg.journal {
        crate::store::sqlite::journal::enable(&cfg.db).map_err(|e| {
            anyhow::anyhow!("cannot turn on the journal of {}: {e}", cfg.db.display())
        })?;
    }
    let store = SqliteStore::open_gated(&cfg.db, &cfg.cell, limits, writes_allowed.clone())
        .map_err(|e| anyhow::anyhow!("cannot open the database {}: {e}", cfg.db.display()))?;
    crate::handover::claim_first_slots(&store, &rules).await?;
    let secret = crate::auth::ClusterSecret::load(cfg.internal_secret_file.as_deref())?;
    if (cfg.internal_listen.is_some() || internal.is_some()) && secret.is_none() {
        anyhow::bail!("--internal-listen needs the cluster secret: --internal-secret-file PATH (or {} in the environment)", crate::auth::SECRET_ENV);
    }
    let internal = match (internal, cfg.internal_listen) {
        (Some(l), _) => Some(l),
        (None, Some(a)) => Some(
            TcpListener::bind(a)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {a} (--internal-listen): {e}"))?,
        ),
        (None, None) => None,
    };
    let internal_addr = internal.as_ref().and_then(|l| l.local_addr().ok());
    let metrics = AgentMetrics::new(registry)?;
    let addr = listener.local_addr()?;
    let (stop, stop_rx) = watch::channel(false);
    let wake = Arc::new(tokio::sync::Notify::new());
    let replicas = crate::store::sqlite::replica::Replicas::new(
        cfg.replica_dir.clone().unwrap_or_else(|| {
            cfg.db
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default()
        }),
        (cfg.cell.clone(), cfg.db.clone()),
    );
    let peers = crate::relay::Peers::default();
    let hosted = crate::shards::HostedOpener {
        cfg: cfg.clone(),
        limits,
        writes_allowed: writes_allowed.clone(),
        replicas: replicas.clone(),
        rules: rules.clone(),
        peers: peers.clone(),
        secret: secret.clone(),
        metrics: metrics.clone(),
    };
    // The own shard's shipper, prune and relay: the same as a hosted one's.
    let shard_tasks =
        hosted.shard_tasks((&cfg.cell, &cfg.db, &store), wake.clone(), stop_rx.clone());
    let api = Arc::new(Api {
        shards: crate::shards::Shards::new(
            &cfg.cell,
            store.clone(),
            Some(Box::new(move |shard: &str| hosted.open(shard))),
        ),
        rules: rules.clone(),
        metrics: metrics.clone(),
        relay_wake: wake.clone(),
        ready: AtomicBool::new(true),
        writes_allowed: writes_allowed.clone(),
        secret: secret.clone(),
        outbox_alert_after_ms: cfg.outbox_alert_after_ms as i64,
        replicas,
    });

    let mut others = crate::control_plane::tasks(
        &cfg,
        &rules,
        (addr, internal_addr),
        writes_allowed,
        &peers,
        &stop_rx,
    )?;
    others.extend(shard_tasks);
    others.push(tokio::spawn(rules.clone().watch(
        Duration::from_millis(cfg.reload_interval_ms),
        stop_rx.clone(),
    )));
    let identity = (
        HeaderValue::from_str(&cfg.cell)
            .map_err(|_| anyhow::anyhow!("--cell: not a valid header value"))?,
        HeaderValue::from_static(cfg.colour.as_str()),
    );
    if let (Some(l), Some(secret)) = (internal, secret) {
        let api = api.clone();
        others.push(tokio::spawn(crate::listener::serve(
            l,
            cfg.max_connections as usize,
            crate::listener::INTERNAL_MAX_BODY_BYTES,
            move |req| crate::internal::handle(api.clone(), secret.clone(), req),
            stop_rx.clone(),
        )));
    }
    let serve = tokio::spawn(serve(
        listener,
        cfg.max_connections as usize,
        api.clone(),
        rules.clone(),
        identity,
        stop_rx,
    ));
    tracing::info!(cell = %cfg.cell, colour = %cfg.colour, db = %cfg.db.display(), %addr,
        revision = rules.table().revision(), "cell agent serving");
    Ok(RunningAgent {
        addr,
        internal_addr,
        rules,
        stop,
        serve,
        others,
        api,
        drain: Duration::from_millis(cfg.drain_timeout_ms),
    })
}

#[cfg(feature = "etcd")]
pub(crate) fn etcd_endpoints(cfg: &AgentConfig) -> Vec<String> {
    routing_rules::etcd::parse_endpoints(cfg.etcd.as_deref().unwrap_or_default())
}

/// Boots the rules from etcd.
#[cfg(feature = "etcd")]
async fn etcd_rules(cfg: &AgentConfig) -> anyhow::Result<Arc<RulesHolder>> {
    let eps = etcd_endpoints(cfg);
    anyhow::ensure!(!eps.is_empty(), "--etcd: no endpoint given");
    let mut cp = routing_rules::etcd::ControlPlane::connect(&eps, &cfg.cluster).await?;
    let stored = cp.get().await?.ok_or_else(|| {
        anyhow::anyhow!(
            "no rules in etcd for cluster {:?} (cellctl rules apply FILE)",
            cfg.cluster
        )
    })?;
    Ok(RulesHolder::from_etcd(
        eps,
        &cfg.cluster,
        &cfg.cell,
        stored.document,
        stored.revision,
    )?)
}

#[cfg(not(feature = "etcd"))]
async fn etcd_rules(_cfg: &AgentConfig) -> anyhow::Result<Arc<RulesHolder>> {
    anyhow::bail!("--etcd: this cell-agent was built without etcd support; build it with `--features etcd` (needs protoc)")
}

async fn serve(
    listener: TcpListener,
    max_connections: usize,
    api: Arc<Api<SqliteStore>>,
    rules: Arc<RulesHolder>,
    identity: (HeaderValue, HeaderValue),
    stop: watch::Receiver<bool>,
) {
    let guard = GuardLayer::new(rules, "/v1/");
    let inner = tower::service_fn(move |req: Request<Bytes>| {
        let api = api.clone();
        async move { Ok::<_, std::convert::Infallible>(api.handle(req).await) }
    });
    let svc = guard.layer(inner);
    crate::listener::serve(
        listener,
        max_connections,
        crate::body::MAX_BODY_BYTES,
        move |req| {
            let svc = svc.clone();
            let identity = identity.clone();
            async move {
                let mut resp = match svc.oneshot(req).await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                // Every answer names who gave it.
                resp.headers_mut().insert("x-cell", identity.0);
                resp.headers_mut().insert("x-colour", identity.1);
                resp
            }
        },
        stop,
    )
    .await
}

impl RunningAgent {
    /// Stops at once, as if the process were killed: listeners and every
    /// open connection (no answer is sent for what is in flight) and every
    /// background task — for drills and the demo's failover.
    pub fn kill(self) {
        self.api.ready.store(false, Ordering::Relaxed);
        self.serve.abort();
        for t in self.others {
            t.abort();
        }
        for shard in self.api.shards.hosted() {
            self.api.shards.close(&shard);
        }
    }

    /// Stops accepting and drains in-flight requests (bounded by the drain
    /// timeout). Returns false when the deadline cut requests off.
    pub async fn shutdown(self) -> bool {
        self.api.ready.store(false, Ordering::Relaxed);
        let _ = self.stop.send(true);
        for shard in self.api.shards.hosted() {
            self.api.shards.close(&shard);
        }
        let clean = tokio::time::timeout(self.drain, self.serve).await.is_ok();
        for t in &self.others {
            t.abort();
        }
        // Returns once the background tasks are gone (an aborted task ends
        // at its next await), or after 2 s each at most.
        for t in self.others {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        clean
    }
}

pub use routing_rules::signal::wait_for_signal;

/// `cell-agent serve`: starts the agent on its own runtime, prints
/// `listening on ADDR` (and `internal listening on ADDR`) on stdout, and
/// serves until SIGTERM or SIGINT, then drains.
pub fn serve_until_signal(cfg: AgentConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let agent = start(cfg, prometheus::Registry::new()).await?;
        println!("listening on {}", agent.addr);
        if let Some(internal) = agent.internal_addr {
            println!("internal listening on {internal}");
        }
        wait_for_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        let clean = agent.shutdown().await;
        tracing::info!(clean, "stopped");
        Ok(())
    })
}
