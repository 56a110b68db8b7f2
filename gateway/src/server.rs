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
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
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
    };
    let health = HealthSettings {
        path: cfg.health_path.clone(),
        interval: Duration::from_millis(cfg.health_interval_ms),
        timeout: Duration::from_millis(cfg.health_timeout_ms),
        rise: cfg.health_rise,
        fall: cfg.health_fall,
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

    let (stop, stop_rx) = watch::channel(false);
    let shared = Shared::new(
        control.clone(),
        ProxySettings {
            request_timeout: cfg.request_timeout(),
            max_attempts: cfg.max_attempts,
            debug_headers: cfg.debug_headers,
        },
    );
    let front = Arc::new(FrontEnd {
        service: ProxyService::new(shared.clone()),
        shared,
        builder: builder(),
    });
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
    let tasks = vec![
        follower,
        tokio::spawn(serve_proxy(proxy_listener, front, stop_rx.clone())),
        tokio::spawn(serve_admin(admin_listener, admin.clone(), stop_rx)),
    ];
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

/// Loads the first rules from the file or from etcd. Returns the control
/// side and a label of the source.
async fn load_rules(
    cfg: &ServeConfig,
    metrics: Metrics,
    upstream: UpstreamSettings,
    health: HealthSettings,
) -> anyhow::Result<(Arc<Control>, String)> {
    if let Some(path) = &cfg.rules {
        let control = Control::load(path, metrics, upstream, health, cfg.cell_max_inflight)?;
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
        anyhow::bail!("--etcd: this cellgate was built without etcd support; build it with `--features etcd` (needs protoc)")
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

fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .keep_alive(true);
    b
}

async fn serve_proxy(listener: TcpListener, front: Arc<FrontEnd>, mut stop: watch::Receiver<bool>) {
    // Every connection task holds a clone of `drain`; when all are gone,
    // `drained` yields None.
    let (drain, mut drained) = mpsc::channel::<()>(1);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(crate::fast::serve_connection(
            front.clone(),
            stream,
            peer,
            stop.clone(),
            drain.clone(),
        ));
    }
    drop(listener);
    drop(drain);
    tracing::info!("draining client connections");
    let _ = drained.recv().await;
}

async fn serve_admin(listener: TcpListener, admin: Arc<Admin>, mut stop: watch::Receiver<bool>) {
    let builder = builder();
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
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
            let _ = conn.await;
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

pub use cell_agent::server::wait_for_signal;
