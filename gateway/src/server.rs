//! Listeners and lifecycle: binds the proxy and admin listeners, runs the
//! rules watcher, and drains gracefully on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::config::ServeConfig;
use crate::control::Control;
use crate::fast::FrontEnd;
use crate::health::HealthSettings;
use crate::metrics::Metrics;
use crate::proxy::{ProxyService, ProxySettings, Shared};
use crate::upstream::UpstreamSettings;

/// A running gateway.
#[derive(Debug)]
pub struct RunningGateway {
    /// Where the proxy listens.
    pub proxy_addr: SocketAddr,
    /// Where the admin API listens.
    pub admin_addr: SocketAddr,
    /// The control side (current rules).
    pub control: Arc<Control>,
    admin: Arc<Admin>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
}

/// Starts a gateway: loads the rules (an invalid file is an error), binds
/// both listeners and starts serving. Must run inside a tokio runtime.
pub async fn start(cfg: ServeConfig, registry: Registry) -> anyhow::Result<RunningGateway> {
    cfg.validate()?;
    let metrics = Metrics::new(registry)?;
    let upstream = UpstreamSettings {
        connect_timeout: cfg.connect_timeout(),
        max_conns: cfg.max_conns_per_instance,
        eject_5xx_streak: cfg.eject_5xx_streak,
        eject_base_ms: cfg.eject_base_ms,
        eject_max_ms: cfg.eject_max_ms,
        max_ejection_percent: cfg.max_ejection_percent,
    };
    let health = HealthSettings {
        path: cfg.health_path.clone(),
        interval: Duration::from_millis(cfg.health_interval_ms),
        timeout: Duration::from_millis(cfg.health_timeout_ms),
        rise: cfg.health_rise,
        fall: cfg.health_fall,
        changed: Arc::new(tokio::sync::watch::Sender::new(0)),
    };
    let (control, source) = load_rules(&cfg, metrics, upstream, health).await?;
    let proxy_listener = TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (--listen): {e}", cfg.listen))?;
    let admin_listener = TcpListener::bind(cfg.admin)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {} (--admin): {e}", cfg.admin))?;
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let gen = control.current();
    tracing::info!(
        proxy = %proxy_addr,
        admin = %admin_addr,
        rules = %source,
        revision = gen.table.revision(),
        cells = gen.table.cells().len(),
        "cellgate serving"
    );

    let access_log = match &cfg.access_log {
        Some(target) => Some(Arc::new(crate::access_log::AccessLog::open(
            target,
            cfg.access_log_user_ids,
            control.metrics().access_log_dropped.clone(),
        )?)),
        None => None,
    };
    let (stop, stop_rx) = watch::channel(false);
    let stop_rx_auto = stop_rx.clone();
    let shared = Shared::new(
        control.clone(),
        ProxySettings {
            request_timeout: cfg.request_timeout(),
            max_attempts: cfg.max_attempts,
            debug_headers: cfg.debug_headers,
            client_body_timeout: Duration::from_millis(cfg.client_body_timeout_ms),
            client_body_buffer: cfg.client_body_buffer_bytes,
            send_timeout: Duration::from_millis(cfg.send_timeout_ms),
            idle_timeout: Duration::from_millis(cfg.idle_timeout_ms),
            max_head: cfg.max_head_bytes as usize,
            retry_budget_ratio: cfg.retry_budget_percent as f32 / 100.0,
            retry_min_per_s: cfg.retry_min_per_s,
            hold: Duration::from_millis(cfg.hold_ms),
            hold_queue: cfg.hold_queue as usize,
            access_log,
        },
    );
    let front = Arc::new(FrontEnd {
        service: ProxyService::new(shared.clone()),
        builder: builder(&shared.settings, cfg.http2_max_streams),
        shared,
    });
    let max_connections = connection_cap(cfg.max_connections);
    let admin_builder = builder(&front.shared.settings, 16);
    let admin = Admin::new(control.clone(), cfg.admin_token.clone(), source.clone());
    let follower = match &cfg.rules {
        Some(path) => tokio::spawn(control.clone().watch(
            path.clone(),
            Duration::from_millis(cfg.reload_interval_ms),
            stop_rx.clone(),
        )),
        None => follow_etcd(
            &cfg,
            control.clone(),
            proxy_addr,
            admin_addr,
            stop_rx.clone(),
        )?,
    };
    let mut tasks = vec![
        follower,
        tokio::spawn(serve_proxy(
            proxy_listener,
            front,
            max_connections,
            stop_rx.clone(),
        )),
        tokio::spawn(serve_admin(
            admin_listener,
            admin.clone(),
            admin_builder,
            stop_rx,
        )),
    ];
    if cfg.auto_failover {
        tasks.push(tokio::spawn(crate::auto_failover::run(
            control.clone(),
            auto_failover(&cfg)?,
            stop_rx_auto,
        )));
    }
    Ok(RunningGateway {
        proxy_addr,
        admin_addr,
        control,
        admin,
        stop,
        tasks,
        drain_timeout: Duration::from_millis(cfg.drain_timeout_ms),
    })
}

/// The `--auto-failover` watcher's settings (its secret is required).
fn auto_failover(cfg: &ServeConfig) -> anyhow::Result<crate::auto_failover::AutoFailover> {
    let secret = routing_rules::auth::ClusterSecret::load(cfg.internal_secret_file.as_deref())?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--auto-failover needs the cells' secret: --internal-secret-file PATH (or {} in the environment)",
                routing_rules::auth::SECRET_ENV
            )
        })?;
    let etcd = match (&cfg.rules, &cfg.etcd) {
        (Some(_), _) => None,
        (None, Some(list)) => Some(routing_rules::switchover::EtcdTarget {
            endpoints: list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            cluster: cfg.cluster.clone(),
        }),
        (None, None) => None,
    };
    Ok(crate::auto_failover::AutoFailover {
        rules: cfg.rules.clone(),
        etcd,
        secret,
        after: Duration::from_millis(cfg.auto_failover_after_ms),
        every: Duration::from_millis(cfg.health_interval_ms.clamp(10, 100) / 2),
    })
}

/// Loads the first rules from the file or from etcd. Returns the control
/// side and a label of the source.
async fn load_rules(
    cfg: &ServeConfig,
    metrics: Metrics,
    upstream: UpstreamSettings,
    health: HealthSettings,
) -> anyhow::Result<(Arc<Control>, String)> {
    if let Some(path) = &cfg.rules {
        let control = Control::load(
            path,
            metrics,
            upstream,
            health,
            cfg.cell_max_inflight,
            cfg.max_rules_bytes,
        )?;
        return Ok((control, path.display().to_string()));
    }
    #[cfg(feature = "etcd")]
    {
        let src = etcd_source(cfg)?;
        let (text, revision, from_state) = crate::etcd::boot(&src).await?;
        let label = crate::etcd::source_label(&cfg.cluster);
        let control = Control::from_text(
            &label,
            text,
            revision,
            metrics,
            upstream,
            health,
            cfg.cell_max_inflight,
        )?;
        control
            .metrics()
            .rules_from_saved_state
            .set(from_state as i64);
        Ok((control, label.display().to_string()))
    }
    #[cfg(not(feature = "etcd"))]
    {
        let _ = (metrics, upstream, health);
        anyhow::bail!("--etcd: this cellgate was built without etcd support; build it with the default features (etcd is on unless `--no-default-features`)")
    }
}

#[cfg(feature = "etcd")]
fn etcd_source(cfg: &ServeConfig) -> anyhow::Result<crate::etcd::EtcdSource> {
    let endpoints = routing_rules::etcd::parse_endpoints(cfg.etcd.as_deref().unwrap_or_default());
    anyhow::ensure!(!endpoints.is_empty(), "--etcd: no endpoint given");
    let host = routing_rules::etcd::host_name().unwrap_or_else(|| "gateway".into());
    Ok(crate::etcd::EtcdSource {
        endpoints,
        cluster: cfg.cluster.clone(),
        state_dir: cfg.state_dir.clone(),
        gateway_id: cfg
            .gateway_id
            .clone()
            .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
    })
}

#[cfg(feature = "etcd")]
fn follow_etcd(
    cfg: &ServeConfig,
    control: Arc<Control>,
    proxy: SocketAddr,
    admin: SocketAddr,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let src = etcd_source(cfg)?;
    let registration = serde_json::json!({
        "id": src.gateway_id, "listen": proxy.to_string(), "admin": admin.to_string(),
        "started_at_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
    });
    Ok(tokio::spawn(crate::etcd::follow(
        control,
        src,
        registration,
        stop,
    )))
}

#[cfg(not(feature = "etcd"))]
fn follow_etcd(
    _cfg: &ServeConfig,
    _control: Arc<Control>,
    _proxy: SocketAddr,
    _admin: SocketAddr,
    _stop: watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    anyhow::bail!("--etcd: this cellgate was built without etcd support")
}

/// File descriptors kept free for the admin listener, health checks, the
/// control plane and files, whatever the client load.
pub const FD_RESERVE: u64 = 128;
/// Connections the admin listener holds at most.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;
/// First pause after a failed accept (doubles up to 1 s).
const ACCEPT_BACKOFF_MS: u64 = 10;

/// The proxy listener's connection cap: `--max-connections`, lowered when
/// the process's file-descriptor limit could not hold that many client
/// connections (and one upstream connection each) plus the reserve.
pub fn connection_cap(configured: u64) -> usize {
    // As Go's runtime and nginx's worker_rlimit_nofile do: use what the
    // hard limit allows.
    let soft = rlimit::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::Resource::NOFILE.get().map(|(soft, _)| soft))
        .unwrap_or(u64::MAX);
    let fits = soft.saturating_sub(FD_RESERVE) / 2;
    if fits < configured {
        tracing::warn!(
            max_connections = configured,
            nofile = soft,
            cap = fits.max(1),
            "--max-connections lowered to fit the file-descriptor limit (raise `ulimit -n` for more)"
        );
    }
    configured.min(fits).max(1) as usize
}

fn builder(settings: &ProxySettings, http2_max_streams: u32) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.idle_timeout)
        .max_buf_size(settings.max_head.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(http2_max_streams)
        .keep_alive_interval(Some(Duration::from_secs(20)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Accepts the next connection once a permit is free; pauses (10 ms
/// doubling to 1 s) instead of spinning when accepting fails, e.g. when the
/// process is out of file descriptors.
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
    backoff: &mut u64,
    what: &str,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    let permit = permits.clone().acquire_owned().await.ok()?;
    loop {
        match listener.accept().await {
            Ok((s, peer)) => {
                *backoff = ACCEPT_BACKOFF_MS;
                return Some((s, peer, permit));
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, pause_ms = *backoff, "accept failed; pausing");
                tokio::time::sleep(Duration::from_millis(*backoff)).await;
                *backoff = (*backoff * 2).min(1_000);
            }
        }
    }
}

async fn serve_proxy(
    listener: TcpListener,
    front: Arc<FrontEnd>,
    max_connections: usize,
    mut stop: watch::Receiver<bool>,
) {
    // Every connection task holds a clone of `drain`; when all are gone,
    // `drained` yields None.
    let (drain, mut drained) = mpsc::channel::<()>(1);
    let permits = Arc::new(Semaphore::new(max_connections));
    let mut backoff = ACCEPT_BACKOFF_MS;
    loop {
        let (stream, peer, permit) = tokio::select! {
            r = accept(&listener, &permits, &mut backoff, "proxy") => match r {
                Some(x) => x,
                None => break,
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let conn =
            crate::fast::serve_connection(front.clone(), stream, peer, stop.clone(), drain.clone());
        tokio::spawn(async move {
            conn.await;
            drop(permit);
        });
    }
    drop(listener);
    drop(drain);
    tracing::info!("draining client connections");
    let _ = drained.recv().await;
}

async fn serve_admin(
    listener: TcpListener,
    admin: Arc<Admin>,
    builder: auto::Builder<TokioExecutor>,
    mut stop: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
    let mut backoff = ACCEPT_BACKOFF_MS;
    loop {
        let (stream, _, permit) = tokio::select! {
            r = accept(&listener, &permits, &mut backoff, "admin") => match r {
                Some(x) => x,
                None => break,
            },
            _ = stop.changed() => break,
        };
        let admin = admin.clone();
        let svc = service_fn(move |req| {
            let admin = admin.clone();
            async move { Ok::<_, Infallible>(admin.handle(&req)) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(async move {
            // Admin requests are short: a connection that idles is closed.
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            drop(permit);
        });
    }
}

impl RunningGateway {
    /// Stops accepting, lets in-flight requests finish within the drain
    /// deadline, then stops. Returns false when the deadline cut requests off.
    pub async fn shutdown(self) -> bool {
        self.admin.set_draining();
        let _ = self.stop.send(true);
        let mut tasks = self.tasks;
        let proxy = tasks.remove(1);
        let drained = tokio::time::timeout(self.drain_timeout, proxy)
            .await
            .is_ok();
        if !drained {
            tracing::warn!(
                timeout_ms = self.drain_timeout.as_millis() as u64,
                "drain deadline reached; closing remaining connections"
            );
        }
        for t in tasks {
            t.abort();
        }
        drained
    }
}

pub use routing_rules::signal::wait_for_signal;

/// `cellgate serve`: runs the gateway on its own runtime (`--workers`
/// threads) until SIGTERM or Ctrl-C, then drains. Says where it listens on
/// stdout (`listening on ADDR`, `admin listening on ADDR`) once both
/// listeners are bound, so a launcher can pass port 0.
pub fn serve_until_signal(cfg: ServeConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    let mut builder = match cfg.workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = builder.enable_all().build()?;
    runtime.block_on(async move {
        let gw = start(cfg, Registry::new()).await?;
        println!("listening on {}", gw.proxy_addr);
        println!("admin listening on {}", gw.admin_addr);
        wait_for_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        let clean = gw.shutdown().await;
        tracing::info!(clean, "stopped");
        Ok(())
    })
}
