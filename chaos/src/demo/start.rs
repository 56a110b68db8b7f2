//! Starting the demo: listeners bound first (the rules name their
//! addresses), the rules written (and applied in etcd with `--etcd`), the
//! agents and the gateway started, then a wait until the whole thing can
//! take writes. A start that fails undoes itself.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use routing_rules::{parse_rules, Colour};
use tokio::net::TcpListener;

use super::{client, Demo, DemoConfig, DEMO_CELLS, DEMO_CLUSTER, DEMO_RULES};
use gateway::ServeConfig;

/// How long a start waits for everything to be ready.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// The demo's data directory: `--data-dir`, or a fresh temporary one
/// (true: remove it at the end).
pub(super) fn data_dir_for(cfg: &DemoConfig) -> (PathBuf, bool) {
    match &cfg.data_dir {
        Some(d) => (d.clone(), false),
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            (
                std::env::temp_dir().join(format!("cellgate-demo-{}-{nanos}", std::process::id())),
                true,
            )
        }
    }
}

/// What a start has created so far, undone when it fails.
#[derive(Default)]
pub(super) struct Started {
    agents: Vec<(String, Colour, cell_agent::RunningAgent)>,
    gateway: Option<gateway::RunningGateway>,
    /// The data directory, when this start created it.
    created_dir: Option<PathBuf>,
}

impl Started {
    async fn undo(self) {
        if let Some(g) = self.gateway {
            g.shutdown().await;
        }
        for (_, _, agent) in self.agents {
            agent.shutdown().await;
        }
        if let Some(dir) = self.created_dir {
            remove_dir(&dir).await;
        }
    }
}

/// Removes `dir`, trying again for up to 2 s while files still appear in
/// it (an agent's blocking work — closing its database, a last record —
/// may finish just after its shutdown returned).
pub(super) async fn remove_dir(dir: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while std::fs::remove_dir_all(dir).is_err()
        && dir.exists()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(super) use crate::topology::write_secret;

/// The example rules with the instance (and internal) addresses replaced.
pub fn demo_rules(
    addrs: &BTreeMap<(String, Colour), SocketAddr>,
    internal: &BTreeMap<String, Vec<SocketAddr>>,
) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = DEMO_RULES.parse()?;
    for ((cell, colour), addr) in addrs {
        let mut arr = toml_edit::Array::new();
        arr.push(addr.to_string());
        doc["cells"][cell.as_str()][colour.as_str()] = toml_edit::value(arr);
    }
    for (cell, list) in internal {
        let arr: toml_edit::Array = list.iter().map(|a| a.to_string()).collect();
        doc["cells"][cell.as_str()]["internal"] = toml_edit::value(arr);
    }
    let text = doc.to_string();
    parse_rules(&text).map_err(|e| anyhow::anyhow!("demo rules: {e}"))?;
    Ok(text)
}

impl Demo {
    /// Starts everything and waits until it can take writes (every agent
    /// ready, the gateway seeing every instance up, every shard replicated
    /// in the file mode). Must run inside a tokio runtime. A start that
    /// fails stops what it started and removes the data directory it
    /// created.
    pub async fn start(cfg: &DemoConfig) -> anyhow::Result<Demo> {
        let mut started = Started::default();
        match Demo::start_into(cfg, &mut started).await {
            Ok(demo) => Ok(demo),
            Err(e) => {
                started.undo().await;
                Err(e)
            }
        }
    }

    async fn start_into(cfg: &DemoConfig, started: &mut Started) -> anyhow::Result<Demo> {
        let (data_dir, temporary) = data_dir_for(cfg);
        if !data_dir.exists() {
            std::fs::create_dir_all(&data_dir)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", data_dir.display()))?;
            started.created_dir = Some(data_dir.clone());
        }
        // Bind every agent first, so the rules can name the real addresses.
        let mut listeners = Vec::new();
        let mut addrs = BTreeMap::new();
        let mut internal_addrs: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
        for cell in DEMO_CELLS {
            for colour in Colour::ALL {
                let l = TcpListener::bind("127.0.0.1:0").await?;
                let internal = TcpListener::bind("127.0.0.1:0").await?;
                addrs.insert((cell.to_string(), colour), l.local_addr()?);
                internal_addrs
                    .entry(cell.to_string())
                    .or_default()
                    .push(internal.local_addr()?);
                listeners.push((cell, colour, l, internal));
            }
        }
        let secret_path = data_dir.join("internal-secret");
        write_secret(&secret_path)?;
        let rules_path = data_dir.join("rules.toml");
        let text = demo_rules(&addrs, &internal_addrs)?;
        std::fs::write(&rules_path, &text)?;
        if let Some(url) = &cfg.etcd {
            publish_to_etcd(url, &text).await?;
        }
        let file = cfg.etcd.is_none().then(|| rules_path.clone());
        for (cell, colour, listener, internal) in listeners {
            let mut agent_cfg = cell_agent::AgentConfig::new(
                cell,
                colour,
                data_dir.join(format!("{cell}.db")),
                file.clone(),
            );
            agent_cfg.etcd = cfg.etcd.clone();
            agent_cfg.cluster = DEMO_CLUSTER.into();
            agent_cfg.listen = listener.local_addr()?;
            agent_cfg.internal_secret_file = Some(secret_path.clone());
            agent_cfg.drain_timeout_ms = 5_000;
            // Every cell's shard is replicated to its standby (the first
            // cell of its failover list).
            agent_cfg.journal = true;
            let agent = cell_agent::start_bound(
                agent_cfg,
                listener,
                Some(internal),
                prometheus::Registry::new(),
            )
            .await?;
            started.agents.push((cell.to_string(), colour, agent));
        }
        let mut gw_cfg = gateway_config(cfg, rules_path.clone());
        if let Some(url) = &cfg.etcd {
            gw_cfg.rules = None;
            gw_cfg.etcd = Some(url.clone());
            gw_cfg.cluster = DEMO_CLUSTER.into();
            gw_cfg.state_dir = Some(data_dir.join("gateway-state"));
        }
        let agents: Vec<(String, Colour, SocketAddr)> = started
            .agents
            .iter()
            .map(|(cell, colour, a)| (cell.clone(), *colour, a.addr))
            .collect();
        start_gateway(&mut started.gateway, gw_cfg, &agents).await?;
        if file.is_some() {
            wait_replicated(&rules_path).await?;
        }
        Ok(Demo {
            gateway: started.gateway.take().expect("started above"),
            agents: std::mem::take(&mut started.agents),
            data_dir,
            rules_path,
            temporary,
            secret_path,
            file_mode: file.is_some(),
            etcd: cfg.etcd.clone(),
        })
    }
}

/// The demo gateway's settings: `cfg`'s addresses, the rules in `rules`,
/// health checked every 500 ms.
pub(super) fn gateway_config(cfg: &DemoConfig, rules: PathBuf) -> ServeConfig {
    let mut gw_cfg = ServeConfig::for_tests(rules);
    gw_cfg.listen = cfg.listen;
    gw_cfg.admin = cfg.admin;
    gw_cfg.health_interval_ms = 500;
    gw_cfg
}

/// Starts the gateway into `slot` (so a failed start can stop it) and waits
/// until it and `agents` can take writes ([`wait_ready`]).
pub(super) async fn start_gateway<'a>(
    slot: &'a mut Option<gateway::RunningGateway>,
    gw_cfg: ServeConfig,
    agents: &[(String, Colour, SocketAddr)],
) -> anyhow::Result<&'a gateway::RunningGateway> {
    let gateway = slot.insert(gateway::start(gw_cfg, prometheus::Registry::new()).await?);
    wait_ready(agents, gateway).await?;
    Ok(gateway)
}

/// Waits until every agent answers `/readyz` 200 (it can take writes: under
/// etcd it holds its lease and has the rules) and the gateway's health
/// checks see every instance up — so the first write through the gateway
/// is not refused as `fenced` or routed around a cell that is starting.
async fn wait_ready(
    agents: &[(String, Colour, SocketAddr)],
    gateway: &gateway::RunningGateway,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_WITHIN;
    let client = client();
    for (cell, colour, addr) in agents {
        loop {
            let req = http::Request::get(format!("http://{addr}/readyz"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))?;
            let last = match tokio::time::timeout(Duration::from_secs(2), client.request(req)).await
            {
                Ok(Ok(r)) if r.status() == 200 => break,
                Ok(Ok(r)) => {
                    use http_body_util::BodyExt;
                    let status = r.status();
                    let body = r.into_body().collect().await?.to_bytes();
                    format!("{status} {}", String::from_utf8_lossy(&body).trim())
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "no answer within 2 s".into(),
            };
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "the {cell} {} agent at {} was not ready to take writes within {} s (last /readyz: {last})",
                colour.as_str(),
                addr,
                READY_WITHIN.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    loop {
        let gen = gateway.control.current();
        let now = gateway::upstream::now_ms();
        let down: Vec<String> = (0..gen.table.cells().len())
            .flat_map(|idx| Colour::ALL.into_iter().map(move |c| (idx, c)))
            .filter(|&(idx, c)| !gen.group(idx as routing_rules::CellIdx, c).any_up(now))
            .map(|(idx, c)| {
                format!(
                    "{} {}",
                    gen.table.cell_name(idx as routing_rules::CellIdx),
                    c.as_str()
                )
            })
            .collect();
        if down.is_empty() {
            return Ok(());
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the gateway's health checks still see {} down after {} s",
            down.join(", "),
            READY_WITHIN.as_secs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every demo cell's shard is recorded in sync with its
/// standby (each primary seeds its standby with a snapshot at start).
pub(super) async fn wait_replicated(rules: &Path) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut records = crate::topology::Records::new(rules, None);
    for cell in DEMO_CELLS {
        if records
            .wait_for(cell, deadline, |r| r["state"] == "in-sync")
            .await
            .is_err()
        {
            anyhow::bail!(
                "cell {cell}'s shard was not replicated to its standby within 30 s ({})",
                records.place(cell)
            );
        }
    }
    Ok(())
}

/// Applies the demo's rules in etcd (as the next revision of cluster `demo`).
#[cfg(feature = "etcd")]
async fn publish_to_etcd(url: &str, text: &str) -> anyhow::Result<()> {
    let endpoints = routing_rules::etcd::parse_endpoints(url);
    let mut cp = routing_rules::etcd::ControlPlane::connect(&endpoints, DEMO_CLUSTER).await?;
    let current = cp.get().await?.map(|s| s.revision).unwrap_or(0);
    cp.apply(text, current, "cellgate-demo", "demo start")
        .await?;
    Ok(())
}

#[cfg(not(feature = "etcd"))]
async fn publish_to_etcd(_url: &str, _text: &str) -> anyhow::Result<()> {
    anyhow::bail!("--etcd: this cellgate was built without etcd support; build it with the default features (etcd is on unless `--no-default-features`)")
}
