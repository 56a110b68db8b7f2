//! Attaching a drill to a topology someone else started: where its
//! gateway, admin API, rules, shard files and processes are (an attach
//! file, TOML). `cellchaos up SCENARIO --dir DIR` starts a scenario's
//! topology, writes `DIR/attach.toml` and keeps it running;
//! `cellchaos drill SCENARIO --attach FILE` runs against it.
//!
//! ```toml
//! gateway = "127.0.0.1:8080"          # the gateway's proxy listener
//! more_gateways = ["127.0.0.1:8081"]  # optional: more gateways the clients are spread over
//! admin = "127.0.0.1:9090"            # its admin API (health, metrics)
//! rules = "/srv/cellgate/rules.toml"  # the rules file (with etcd: the document as published)
//! etcd = ["http://127.0.0.1:2379"]    # when the rules live in etcd
//! cluster = "prod"
//! secret = "/srv/cellgate/internal-secret"   # for operator steps (switchover, failover, split)
//! data_dir = "/srv/cellgate/data"     # the shards' SQLite files (the file checks read them)
//!
//! [[process]]                         # every process a step may fault
//! name = "cell-a/blue"                # `gateway`, `etcd`, or `CELL/COLOUR`
//! addr = "127.0.0.1:7001"             # where it listens (ready again once it does)
//! pid_file = "/run/cellgate/cell-a-blue.pid"
//! command = ["/usr/bin/cell-agent", "serve", "..."]  # optional: how to start it again
//! log = "/var/log/cellgate/cell-a-blue.log"          # optional: where a restart writes
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::{Proc, Topology};
use crate::scenario::Scenario;
use routing_rules::switchover::EtcdTarget;

/// A topology to attach to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachSpec {
    /// The gateway's proxy listener.
    pub gateway: SocketAddr,
    /// More gateways' proxy listeners (the drill's clients are spread
    /// over all of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_gateways: Vec<SocketAddr>,
    /// The gateway's admin listener.
    pub admin: SocketAddr,
    /// The rules file.
    pub rules: PathBuf,
    /// etcd endpoints, when the rules live there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd: Vec<String>,
    /// The etcd cluster name.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// The cluster secret (operator steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<PathBuf>,
    /// The shards' SQLite files.
    pub data_dir: PathBuf,
    /// The processes steps may fault.
    #[serde(default, rename = "process")]
    pub processes: Vec<ProcessSpec>,
}

fn default_cluster() -> String {
    super::control::CLUSTER.into()
}

/// One process of an attached topology.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// `gateway`, `etcd` or `CELL/COLOUR`.
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its pid file.
    pub pid_file: PathBuf,
    /// How to start it again (program and arguments).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Where a restart appends its output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
}

impl AttachSpec {
    /// Reads an attach file.
    pub fn load(path: &Path) -> Result<AttachSpec> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("{} is not an attach file", path.display()))
    }

    /// What a drill needs to attach to `t` (a topology `cellchaos up`
    /// started).
    pub fn of(t: &Topology) -> AttachSpec {
        AttachSpec {
            gateway: t.gateway(),
            more_gateways: t.gateways().split_off(1),
            admin: t.admin,
            rules: t.rules.clone(),
            etcd: t
                .etcd
                .as_ref()
                .map(|e| e.endpoints.clone())
                .unwrap_or_default(),
            cluster: t
                .etcd
                .as_ref()
                .map(|e| e.cluster.clone())
                .unwrap_or_else(default_cluster),
            secret: Some(t.secret.clone()),
            data_dir: t.dir.clone(),
            processes: t
                .procs
                .iter()
                .map(|p| ProcessSpec {
                    name: p.name.clone(),
                    addr: p.addr,
                    pid_file: p.pid_file.clone(),
                    command: p.argv(),
                    log: Some(p.log.clone()),
                })
                .collect(),
        }
    }
}

impl Topology {
    /// The topology `spec` describes, for `s`'s steps: every cell they name
    /// must be in its rules; link faults need proxies only a topology the
    /// drill starts has.
    pub fn attach(spec: &AttachSpec, s: &Scenario) -> Result<Topology> {
        if let Some(step) = s
            .steps
            .iter()
            .find(|st| matches!(st.action, crate::scenario::Action::Link { .. }))
        {
            bail!(
                "the step \"{}\" faults a link: an attached topology has no fault proxies on its links (run the drill on a topology it starts)",
                step.action.describe()
            );
        }
        if s.topology.network == crate::scenario::Network::Namespaces {
            bail!(
                "the scenario puts its cells in network namespaces (topology.network = \"namespaces\"): only a topology the drill starts has them (run it without --attach, or `cellchaos up` it)"
            );
        }
        let text = std::fs::read_to_string(&spec.rules)
            .with_context(|| format!("cannot read {}", spec.rules.display()))?;
        let rules = routing_rules::parse_rules(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", spec.rules.display()))?;
        let cells: Vec<String> = rules.cells.keys().cloned().collect();
        if let Some(c) = s.cells().iter().find(|c| !cells.contains(c)) {
            bail!(
                "the scenario names cell {c}, which the attached topology's rules ({}) do not have",
                spec.rules.display()
            );
        }
        let procs = spec
            .processes
            .iter()
            .map(|p| {
                let cell = p.name.split_once('/').map(|(c, _)| c.to_string());
                let log = p.log.clone().unwrap_or_else(|| {
                    spec.data_dir
                        .join(format!("{}.restart.log", p.name.replace('/', "-")))
                });
                Proc::attached(
                    p.name.clone(),
                    cell,
                    (p.pid_file.clone(), log),
                    p.addr,
                    p.command.clone(),
                )
            })
            .collect();
        Ok(Topology {
            dir: spec.data_dir.clone(),
            rules: spec.rules.clone(),
            secret: spec
                .secret
                .clone()
                .unwrap_or_else(|| spec.data_dir.join("internal-secret")),
            cells,
            procs,
            admin: spec.admin,
            admins: vec![spec.admin],
            gateways: std::iter::once(spec.gateway)
                .chain(spec.more_gateways.iter().copied())
                .collect(),
            proxies: Default::default(),
            etcd: (!spec.etcd.is_empty()).then(|| EtcdTarget {
                endpoints: spec.etcd.clone(),
                cluster: spec.cluster.clone(),
            }),
            attached: true,
            netns: None,
        })
    }
}

/// Stops every process `spec` lists by its pid file (SIGTERM, SIGKILL
/// after 5 s): what `cellchaos up` does at its end, so a process a drill
/// started again (detached, its pid in the same file) stops too.
pub async fn stop_by_pid_files(spec: &AttachSpec) {
    for p in spec.processes.iter().rev() {
        let mut proc = Proc::attached(
            p.name.clone(),
            None,
            (p.pid_file.clone(), PathBuf::new()),
            p.addr,
            Vec::new(),
        );
        if !proc.running() {
            continue;
        }
        proc.terminate().await;
    }
}
