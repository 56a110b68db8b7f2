//! The processes a drill starts: `cells` cells × blue and green cell
//! agents and one gateway, each a real process (this binary's hidden
//! `cell-agent` and `gateway` subcommands) on free loopback ports, with
//! its own log and pid file under the drill's directory; every cell's
//! shard replicated to its standby (the next cell); the rules in a file.
//! Links a scenario faults get a [`FaultProxy`] in front of them, named in
//! the rules in place of the real address.
//!
//! Processes keep their addresses across a kill and restart, so the rules
//! never change because of a fault. Everything is stopped by [`Topology::stop`]
//! (SIGCONT, SIGTERM, SIGKILL after 5 s), and on drop (`kill_on_drop`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use routing_rules::Colour;

use crate::fault_proxy::{Fault, FaultProxy};
use crate::scenario::{ControlPlane, Link, Network, Scenario, Target};
use routing_rules::switchover::EtcdTarget;

pub mod attach;
pub mod control;
mod netns;
mod process;
mod setup;

pub use netns::{is_root, Namespaces};

pub use control::Records;
pub use process::Proc;
pub use setup::drill_rules;
pub(crate) use setup::{free_port, write_secret};

/// How long a process may take to say where it listens, and the whole
/// topology to be ready.
pub(crate) const START_WITHIN: Duration = Duration::from_secs(30);

/// A started topology.
pub struct Topology {
    /// The drill's directory (data, logs, pids, rules).
    pub dir: PathBuf,
    /// The rules file.
    pub rules: PathBuf,
    /// The cells' secret for internal calls.
    pub secret: PathBuf,
    /// Cell names.
    pub cells: Vec<String>,
    /// Agents, then the gateways last.
    pub procs: Vec<Proc>,
    /// The first gateway's admin listener.
    pub admin: SocketAddr,
    /// Every gateway's admin listener.
    pub admins: Vec<SocketAddr>,
    /// The gateways' proxy listeners.
    gateways: Vec<SocketAddr>,
    /// Fault proxies by link (as the scenario names it).
    pub proxies: BTreeMap<String, Vec<FaultProxy>>,
    /// The etcd every process follows (`None`: the rules file).
    pub etcd: Option<EtcdTarget>,
    /// Someone else started it (`--attach`): its processes are faulted
    /// through their pid files and never stopped.
    pub attached: bool,
    /// The cells' network namespaces (`topology.network = "namespaces"`).
    pub netns: Option<Namespaces>,
}

/// The links the scenario's steps fault.
fn faulted_links(s: &Scenario) -> Vec<Link> {
    let mut out: Vec<Link> = Vec::new();
    for step in &s.steps {
        if let crate::scenario::Action::Link { link, .. } = &step.action {
            if !out.contains(link) {
                out.push(link.clone());
            }
        }
    }
    out
}

impl Topology {
    /// Starts the scenario's topology in `dir` (created; must be empty or
    /// new) and waits until it can take writes. A failed start stops what
    /// it started.
    pub async fn start(s: &Scenario, dir: &Path) -> Result<Topology> {
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::create_dir_all(dir.join("pids"))?;
        let cells = s.cells();
        let secret = dir.join("internal-secret");
        write_secret(&secret)?;
        let rules = dir.join("rules.toml");
        let links = faulted_links(s);
        let netns = match s.topology.network {
            Network::Loopback => None,
            Network::Namespaces => Some(Namespaces::create(&cells)?),
        };
        // In a namespace, a cell's agents listen on its address (the port
        // is a free loopback one: unique, and free there too).
        let at = |c: &str| -> Result<SocketAddr> {
            let port = free_port()?.port();
            Ok(match &netns {
                Some(ns) => SocketAddr::new(ns.cell_ip(c), port),
                None => SocketAddr::from(([127, 0, 0, 1], port)),
            })
        };

        let mut public = BTreeMap::new();
        let mut internal_real: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
        let mut agents = Vec::new();
        for c in &cells {
            for colour in Colour::ALL {
                let (addr, int) = (at(c)?, at(c)?);
                public.insert((c.clone(), colour), addr);
                internal_real.entry(c.clone()).or_default().push(int);
                agents.push((c.clone(), colour, addr, int));
            }
        }
        // etcd's client address, known before the proxies that front it.
        let etcd_client = match s.topology.control_plane {
            ControlPlane::File => None,
            ControlPlane::Etcd => Some(free_port()?),
        };
        // A cell whose link to etcd is faulted reaches it through a proxy.
        let mut etcd_via: BTreeMap<String, String> = BTreeMap::new();
        // Proxies: the rules name them instead of the real addresses.
        let mut proxies: BTreeMap<String, Vec<FaultProxy>> = BTreeMap::new();
        let mut named_public = public.clone();
        let mut named_internal = internal_real.clone();
        for link in &links {
            match link {
                Link::GatewayToAgent(c, col) => {
                    let p = FaultProxy::start(public[&(c.clone(), *col)]).await?;
                    named_public.insert((c.clone(), *col), p.addr());
                    proxies.insert(link.to_string(), vec![p]);
                }
                Link::Internal { to, .. } => {
                    let mut ps = Vec::new();
                    for a in &internal_real[to] {
                        ps.push(FaultProxy::start(*a).await?);
                    }
                    named_internal.insert(to.clone(), ps.iter().map(|p| p.addr()).collect());
                    proxies.insert(link.to_string(), ps);
                }
                Link::ToEtcd(c) => {
                    let etcd =
                        etcd_client.context("a link to etcd needs control_plane = \"etcd\"")?;
                    let p = FaultProxy::start(etcd).await?;
                    etcd_via.insert(c.clone(), format!("http://{}", p.addr()));
                    proxies.insert(link.to_string(), vec![p]);
                }
            }
        }
        let text = drill_rules(&cells, s.topology.slots, &named_public, &named_internal);
        routing_rules::parse_rules(&text).map_err(|e| anyhow::anyhow!("drill rules: {e}"))?;
        std::fs::write(&rules, &text)?;

        let path = |p: PathBuf| p.display().to_string();
        let mut procs = Vec::new();
        // The control plane: the rules file, or an etcd started first.
        let etcd = match etcd_client {
            None => None,
            Some(client) => {
                let peer = free_port()?;
                let (url, peer_url) = (format!("http://{client}"), format!("http://{peer}"));
                // The agents in namespaces reach it on the drill's end.
                let urls = match &netns {
                    Some(ns) => format!("{url},http://{}:{}", ns.host(), client.port()),
                    None => url.clone(),
                };
                let args: Vec<String> = [
                    "--name",
                    "drill",
                    "--data-dir",
                    &path(dir.join("etcd")),
                    "--listen-client-urls",
                    &urls,
                    "--advertise-client-urls",
                    &urls,
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                    "--initial-cluster",
                    &format!("drill={peer_url}"),
                    "--log-level",
                    "warn",
                ]
                .iter()
                .map(|s| s.to_string())
                .collect();
                procs.push(
                    Proc::new("etcd".into(), None, args, "", (dir, "etcd"), client)
                        .with_program(PathBuf::from("etcd"), process::Ready::EtcdHealth(client)),
                );
                Some(EtcdTarget {
                    endpoints: vec![url],
                    cluster: control::CLUSTER.into(),
                })
            }
        };
        let follow: Vec<String> = match &etcd {
            None => vec!["--rules".into(), path(rules.clone())],
            Some(t) => vec![
                "--etcd".into(),
                t.endpoints.join(","),
                "--cluster".into(),
                t.cluster.clone(),
            ],
        };
        if let (Some(ns), Some(t)) = (&netns, &etcd) {
            // The agents reach etcd on the drill's end of their link.
            if let Some(port) = t.endpoints[0].rsplit(':').next() {
                etcd_via.extend(
                    cells
                        .iter()
                        .map(|c| (c.clone(), format!("http://{}:{port}", ns.host()))),
                );
            }
        }
        for (c, colour, addr, int) in agents {
            // Its own way to etcd when that link is faulted.
            let follow: Vec<String> = match (&etcd, etcd_via.get(&c)) {
                (Some(t), Some(via)) => vec![
                    "--etcd".into(),
                    via.clone(),
                    "--cluster".into(),
                    t.cluster.clone(),
                ],
                _ => follow.clone(),
            };
            let name = format!("{c}/{}", colour.as_str());
            let file = format!("{c}-{}", colour.as_str());
            let args: Vec<String> = [
                "cell-agent",
                "--cell",
                &c,
                "--colour",
                colour.as_str(),
                "--db",
                &path(dir.join(format!("{c}.db"))),
                "--listen",
                &addr.to_string(),
                "--internal-listen",
                &int.to_string(),
                "--internal-secret-file",
                &path(secret.clone()),
                "--journal",
                "--sync-timeout-ms",
                &s.topology.sync_timeout_ms.to_string(),
                "--drain-timeout-ms",
                "5000",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(follow)
            .collect();
            let agent = Proc::new(
                name,
                Some(c.clone()),
                args,
                "internal listening on ",
                (dir, &file),
                addr,
            );
            procs.push(match &netns {
                Some(ns) => agent.in_netns(ns.of(&c)),
                None => agent,
            });
        }
        let (mut gateways, mut admins) = (Vec::new(), Vec::new());
        for i in 1..=s.topology.gateways {
            // One gateway keeps the plain name (attach files name it so).
            let name = if s.topology.gateways == 1 {
                "gateway".to_string()
            } else {
                format!("gateway-{i}")
            };
            let (gw, admin) = (free_port()?, free_port()?);
            let mut gw_args: Vec<String> = [
                "gateway",
                "--listen",
                &gw.to_string(),
                "--admin",
                &admin.to_string(),
                "--health-interval-ms",
                &s.topology.health_interval_ms.to_string(),
                "--health-timeout-ms",
                &s.topology.health_interval_ms.min(500).to_string(),
                "--internal-secret-file",
                &path(secret.clone()),
                "--request-timeout-ms",
                "5000",
                "--drain-timeout-ms",
                "5000",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(follow.clone())
            .collect();
            if etcd.is_some() {
                let state = if i == 1 {
                    "gateway-state".to_string()
                } else {
                    format!("gateway-state-{i}")
                };
                gw_args.extend(["--state-dir".into(), path(dir.join(state))]);
            }
            if let Some(ms) = s.topology.auto_failover_after_ms {
                gw_args.extend([
                    "--auto-failover".into(),
                    "--auto-failover-after-ms".into(),
                    ms.to_string(),
                ]);
            }
            procs.push(Proc::new(
                name.clone(),
                None,
                gw_args,
                "admin listening on ",
                (dir, &name),
                gw,
            ));
            gateways.push(gw);
            admins.push(admin);
        }
        let mut t = Topology {
            dir: dir.to_path_buf(),
            rules,
            secret,
            cells,
            procs,
            admin: admins[0],
            admins,
            gateways,
            proxies,
            etcd,
            attached: false,
            netns,
        };
        if let Err(e) = t.start_all(&text).await {
            t.stop().await;
            return Err(e);
        }
        Ok(t)
    }

    async fn start_all(&mut self, rules: &str) -> Result<()> {
        for p in &mut self.procs {
            p.start().await?;
            if p.name == "etcd" {
                if let Some(t) = &self.etcd {
                    control::publish(t, rules).await?;
                }
            }
        }
        self.wait_ready().await
    }

    /// The first gateway's proxy address.
    pub fn gateway(&self) -> SocketAddr {
        self.gateways[0]
    }

    /// Every gateway's proxy address.
    pub fn gateways(&self) -> Vec<SocketAddr> {
        self.gateways.clone()
    }

    /// A reader of the shards' replication records.
    pub fn records(&self) -> Records {
        Records::new(&self.rules, self.etcd.clone())
    }

    /// The processes a target names.
    pub fn procs_mut(&mut self, target: &Target) -> impl Iterator<Item = &mut Proc> {
        let target = target.clone();
        self.procs.iter_mut().filter(move |p| match &target {
            Target::Gateway => p.cell.is_none() && p.name.starts_with("gateway"),
            Target::GatewayN(n) => {
                p.name == format!("gateway-{n}") || (*n == 1 && p.name == "gateway")
            }
            Target::Etcd => p.name == "etcd",
            Target::Cell(c) => p.cell.as_deref() == Some(c.as_str()),
            Target::Agent(c, col) => p.name == format!("{c}/{}", col.as_str()),
        })
    }

    /// Sets a fault on a link's proxies.
    pub fn set_link(&self, link: &Link, fault: Fault) {
        for p in self.proxies.get(&link.to_string()).into_iter().flatten() {
            p.set(fault);
        }
    }

    /// Cuts `cell`'s namespace off (a partition).
    pub fn partition(&mut self, cell: &str) -> Result<()> {
        match &mut self.netns {
            Some(ns) => ns.cut(cell),
            None => bail!("a partition needs topology.network = \"namespaces\""),
        }
    }

    /// Joins `cell`'s namespace again.
    pub fn join(&mut self, cell: &str) -> Result<()> {
        match &mut self.netns {
            Some(ns) => ns.join(cell),
            None => Ok(()),
        }
    }

    /// Waits until every agent answers `/readyz` 200, the gateway sees every
    /// instance up, and every shard is recorded in sync with its standby.
    pub async fn wait_ready(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_WITHIN;
        let client = crate::http::client();
        for p in self.procs.iter().filter(|p| p.cell.is_some()) {
            let url = format!("http://{}/readyz", p.addr);
            while crate::http::get(&client, &url).await.map(|r| r.0) != Some(200) {
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "{} was not ready within {} s (see {})",
                        p.name,
                        START_WITHIN.as_secs(),
                        p.log.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        for admin in &self.admins {
            let url = format!("http://{admin}/admin/health");
            loop {
                let all_up = crate::http::get(&client, &url)
                    .await
                    .and_then(|(_, body)| serde_json::from_slice::<serde_json::Value>(&body).ok())
                    .is_some_and(|v| {
                        v["cells"].as_object().is_some_and(|cells| {
                            cells
                                .values()
                                .all(|c| c["up"]["blue"] == true && c["up"]["green"] == true)
                        })
                    });
                if all_up {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "the gateway's health checks did not see every instance up within {} s",
                        START_WITHIN.as_secs()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.wait_in_sync(deadline).await
    }

    /// Waits until every cell's shard is recorded in sync with its standby
    /// (an error at `deadline`).
    pub async fn wait_in_sync(&self, deadline: tokio::time::Instant) -> Result<()> {
        let mut records = self.records();
        for c in &self.cells {
            if let Err(last) = records
                .wait_for(c, deadline, |r| r["state"] == "in-sync")
                .await
            {
                bail!(
                    "cell {c}'s shard is not recorded in sync with its standby (state {}; {})",
                    last.as_ref()
                        .and_then(|r| r["state"].as_str())
                        .unwrap_or("none"),
                    records.place(c)
                );
            }
        }
        Ok(())
    }

    /// Undoes every fault (proxies pass, frozen processes thawed, stopped
    /// processes started again).
    pub async fn heal(&mut self) -> Result<()> {
        for ps in self.proxies.values() {
            for p in ps {
                p.set(Fault::Pass);
            }
        }
        let mut first_err = None;
        if let Some(ns) = &mut self.netns {
            if let Err(e) = ns.join_all() {
                first_err.get_or_insert(e);
            }
        }
        for p in &mut self.procs {
            p.thaw().await;
        }
        for p in &mut self.procs {
            if let Err(e) = p.start().await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Stops every process (SIGCONT, SIGTERM, SIGKILL after 5 s); of an
    /// attached topology, only thaws them.
    pub async fn stop(&mut self) {
        for ps in self.proxies.values() {
            for p in ps {
                p.set(Fault::Pass);
            }
        }
        if let Some(ns) = &mut self.netns {
            // Stopping processes drain: they must reach each other.
            let _ = ns.join_all();
        }
        // The gateway first (no new requests), then the agents.
        for p in self.procs.iter_mut().rev() {
            p.stop().await;
        }
        if let Some(ns) = &mut self.netns {
            ns.remove();
        }
    }
}
