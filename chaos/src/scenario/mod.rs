//! A drill's scenario: the topology, the workload, the steps on a timeline
//! (faults and operator actions) and the bounds it must meet — a TOML file
//! documented key by key in docs/drills.md. Parsing checks everything a
//! drill needs before anything starts: a bad scenario is one precise error.

use std::time::Duration;

use serde::{Deserialize, Serialize};

mod action;
mod step;
pub use action::{Action, Link, LinkFault, Step, Target};
use step::{step, StepFile};

/// Scenario files built into `cellchaos` (`cellchaos list`).
pub const BUILT_IN: [(&str, &str); 12] = [
    (
        "switchover",
        include_str!("../../scenarios/switchover.toml"),
    ),
    ("cell-loss", include_str!("../../scenarios/cell-loss.toml")),
    (
        "colour-kill",
        include_str!("../../scenarios/colour-kill.toml"),
    ),
    (
        "agent-freeze",
        include_str!("../../scenarios/agent-freeze.toml"),
    ),
    (
        "gateway-restart",
        include_str!("../../scenarios/gateway-restart.toml"),
    ),
    (
        "standby-lost",
        include_str!("../../scenarios/standby-lost.toml"),
    ),
    (
        "replication-link",
        include_str!("../../scenarios/replication-link.toml"),
    ),
    (
        "rules-flapping",
        include_str!("../../scenarios/rules-flapping.toml"),
    ),
    ("etcd-loss", include_str!("../../scenarios/etcd-loss.toml")),
    ("etcd-link", include_str!("../../scenarios/etcd-link.toml")),
    ("partition", include_str!("../../scenarios/partition.toml")),
    (
        "gateway-loss",
        include_str!("../../scenarios/gateway-loss.toml"),
    ),
];

/// A scenario as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    name: String,
    #[serde(default)]
    description: String,
    duration: String,
    #[serde(default = "default_seed")]
    seed: u64,
    #[serde(default)]
    expect: Expect,
    #[serde(default)]
    expect_reason: Option<String>,
    #[serde(default)]
    topology: Topology,
    #[serde(default)]
    workload: WorkloadFile,
    #[serde(default, rename = "step")]
    steps: Vec<StepFile>,
    #[serde(default)]
    bounds: BoundsFile,
    #[serde(default)]
    stop: StopFile,
}

fn default_seed() -> u64 {
    1
}

/// What the scenario is expected to show.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    /// Every invariant and bound holds.
    #[default]
    Pass,
    /// A known gap: the drill runs and reports what it measured, and is
    /// listed as expected to fail (with `expect_reason`).
    Fail,
}

/// Where the rules (and the shards' replication records) live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlPlane {
    /// A rules file every process follows.
    #[default]
    File,
    /// An etcd the drill starts (Debian's `etcd`), a target of steps.
    Etcd,
}

/// How the topology's processes reach each other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Network {
    /// Every process on the loopback interface (links are faulted through
    /// fault proxies; no root needed).
    #[default]
    Loopback,
    /// Each cell's agents in a network namespace of their own, joined to
    /// the gateway and etcd by a bridge in another namespace the drill
    /// creates (root only): a `partition` step cuts a cell's namespace off
    /// with `tc`.
    Namespaces,
}

/// The topology a drill starts: one gateway and `cells` cells × blue and
/// green agents, each cell's shard replicated to its standby (the next
/// cell), the rules in a file or in etcd.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The control plane.
    #[serde(default)]
    pub control_plane: ControlPlane,
    /// Cells (2..=6), named `cell-a`, `cell-b`, ...
    #[serde(default = "default_cells")]
    pub cells: usize,
    /// Slots of the slot table.
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// The gateway's health-check interval, ms.
    #[serde(default = "default_health_ms")]
    pub health_interval_ms: u64,
    /// The gateway fails a cell over by itself when every instance is down
    /// (`--auto-failover`), after this long down, ms (`None`: off).
    #[serde(default)]
    pub auto_failover_after_ms: Option<u64>,
    /// The agents' `--sync-timeout-ms` (how long a write waits for its
    /// standby before the shard goes on degraded).
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout_ms: u64,
    /// How the processes reach each other.
    #[serde(default)]
    pub network: Network,
    /// Gateways (1..=4), each following the same rules; the drill's
    /// clients are spread over them and move to the next one when theirs
    /// does not answer, as clients behind a load balancer do.
    #[serde(default = "default_gateways")]
    pub gateways: usize,
}

fn default_gateways() -> usize {
    1
}

fn default_cells() -> usize {
    3
}
fn default_slots() -> u32 {
    90
}
fn default_health_ms() -> u64 {
    250
}
fn default_sync_timeout() -> u64 {
    1_000
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            control_plane: ControlPlane::File,
            cells: default_cells(),
            slots: default_slots(),
            health_interval_ms: default_health_ms(),
            auto_failover_after_ms: None,
            sync_timeout_ms: default_sync_timeout(),
            network: Network::Loopback,
            gateways: default_gateways(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    clients: Option<usize>,
    rate: Option<u32>,
    users: Option<usize>,
    max_ops: Option<u64>,
    retry_for: Option<String>,
    mix: Option<Mix>,
}

/// The share of each operation (weights, any scale).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Mix {
    /// Deposits (a write with its own idempotency key).
    #[serde(default)]
    pub deposit: u32,
    /// Balance reads.
    #[serde(default)]
    pub read: u32,
    /// Transfers to another user (same cell or another).
    #[serde(default)]
    pub transfer: u32,
    /// Payments (an order created, then paid).
    #[serde(default)]
    pub payment: u32,
    /// TCC orders (created, tried, then confirmed or — one in four —
    /// cancelled).
    #[serde(default)]
    pub tcc: u32,
}

/// The drill's clients.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadSpec {
    /// Concurrent clients.
    pub clients: usize,
    /// Operations per second over all clients (0: as fast as they go).
    pub rate: u32,
    /// Distinct users.
    pub users: usize,
    /// Most operations in all.
    pub max_ops: u64,
    /// How long one operation is retried with the same key.
    #[serde(with = "ms")]
    pub retry_for: Duration,
    /// The op mix.
    pub mix: Mix,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BoundsFile {
    max_rto: Option<String>,
    max_stall: Option<String>,
    max_failed: Option<u64>,
    rpo: Option<u64>,
}

/// What the drill must show.
#[derive(Debug, Clone, Serialize)]
pub struct Bounds {
    /// Longest time any affected cell's users may go without an
    /// acknowledgement during a step.
    #[serde(with = "opt_ms")]
    pub max_rto: Option<Duration>,
    /// Longest p99 stall (send to acknowledgement, retries included) of
    /// an affected cell's operations in a step's window.
    #[serde(with = "opt_ms")]
    pub max_stall: Option<Duration>,
    /// Operations given up after their retries.
    pub max_failed: Option<u64>,
    /// Acknowledged writes that may be lost (default 0).
    pub rpo: u64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StopFile {
    max_error_ratio: Option<f64>,
    on_invariant: Option<bool>,
}

/// A parsed, checked scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Scenario {
    /// Its name.
    pub name: String,
    /// One line.
    pub description: String,
    /// How long the clients start new operations.
    #[serde(with = "ms")]
    pub duration: Duration,
    /// The seed of the workload (same seed, same operations).
    pub seed: u64,
    /// Expected outcome.
    pub expect: Expect,
    /// Why it is expected to fail.
    pub expect_reason: Option<String>,
    /// The processes.
    pub topology: Topology,
    /// The clients.
    pub workload: WorkloadSpec,
    /// The timeline, in order of `at`.
    pub steps: Vec<Step>,
    /// The bounds.
    pub bounds: Bounds,
    /// Abort when more than this share of one second's attempts fail.
    pub max_error_ratio: Option<f64>,
    /// Abort as soon as a shard file breaks an invariant (checked every
    /// second while the workload runs; default true).
    pub stop_on_invariant: bool,
}

/// Cell names of a topology: `cell-a`, `cell-b`, ...
pub fn cell_names(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("cell-{}", (b'a' + i as u8) as char))
        .collect()
}

fn duration(what: &str, s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{what} = {s:?}: not a duration ({e}); write e.g. \"5s\" or \"250ms\"")
    })
}

/// Partitions need the cells in namespaces; link faults need the
/// loopback topology's fault proxies.
fn check_network(network: Network, steps: &[Step]) -> Result<(), String> {
    for s in steps {
        match (&s.action, network) {
            (Action::Partition { .. }, Network::Loopback) => {
                return Err(format!(
                    "the step \"{}\" needs the cells in network namespaces: set topology.network = \"namespaces\" (root only)",
                    s.action.describe()
                ))
            }
            (Action::Link { .. }, Network::Namespaces) => {
                return Err(format!(
                    "the step \"{}\" faults a link through a fault proxy, which a topology in network namespaces does not have: use topology.network = \"loopback\", or a partition step",
                    s.action.describe()
                ))
            }
            _ => {}
        }
    }
    Ok(())
}

impl Scenario {
    /// Parses and checks a scenario file's text.
    pub fn parse(text: &str) -> Result<Scenario, String> {
        let f: File = toml::from_str(text).map_err(|e| e.to_string())?;
        if f.name.trim().is_empty() {
            return Err("name: must not be empty".into());
        }
        let duration_ = duration("duration", &f.duration)?;
        if duration_.is_zero() || duration_ > Duration::from_secs(3600) {
            return Err(format!(
                "duration = {:?}: must be more than 0 and at most 1h",
                f.duration
            ));
        }
        if !(2..=6).contains(&f.topology.cells) {
            return Err(format!(
                "topology.cells = {}: must be 2..=6",
                f.topology.cells
            ));
        }
        if f.topology.slots < f.topology.cells as u32 || f.topology.slots > 100_000 {
            return Err(format!(
                "topology.slots = {}: must be at least the number of cells and at most 100000",
                f.topology.slots
            ));
        }
        if !(1..=4).contains(&f.topology.gateways) {
            return Err(format!(
                "topology.gateways = {}: must be 1..=4",
                f.topology.gateways
            ));
        }
        if !(20..=10_000).contains(&f.topology.health_interval_ms) {
            return Err(format!(
                "topology.health_interval_ms = {}: must be 20..=10000",
                f.topology.health_interval_ms
            ));
        }
        let cells = cell_names(f.topology.cells);
        let w = &f.workload;
        let mix = w.mix.unwrap_or(Mix {
            deposit: 9,
            read: 1,
            transfer: 0,
            payment: 0,
            tcc: 0,
        });
        if mix.deposit + mix.read + mix.transfer + mix.payment + mix.tcc == 0 {
            return Err("workload.mix: every weight is 0".into());
        }
        let workload = WorkloadSpec {
            clients: w.clients.unwrap_or(8),
            rate: w.rate.unwrap_or(300),
            users: w.users.unwrap_or(200),
            max_ops: w.max_ops.unwrap_or(100_000),
            retry_for: match &w.retry_for {
                Some(s) => duration("workload.retry_for", s)?,
                None => Duration::from_secs(10),
            },
            mix,
        };
        if !(1..=256).contains(&workload.clients) {
            return Err(format!(
                "workload.clients = {}: must be 1..=256",
                workload.clients
            ));
        }
        if workload.users == 0 || workload.max_ops == 0 {
            return Err("workload.users and workload.max_ops must be at least 1".into());
        }
        let mut steps = Vec::new();
        for (i, s) in f.steps.iter().enumerate() {
            let expanded = step(s, &cells, f.topology.gateways)
                .map_err(|e| format!("step {} ({}): {e}", i + 1, s.action))?;
            for st in &expanded {
                if st.at + st.for_.unwrap_or_default() > duration_ {
                    return Err(format!(
                        "step {} ({}): at {} ms{} ends after the drill's duration ({} ms)",
                        i + 1,
                        s.action,
                        st.at.as_millis(),
                        st.for_
                            .map(|d| format!(" for {} ms", d.as_millis()))
                            .unwrap_or_default(),
                        duration_.as_millis()
                    ));
                }
            }
            steps.extend(expanded);
        }
        steps.sort_by_key(|s| s.at);
        if f.topology.control_plane != ControlPlane::Etcd {
            if let Some(s) = steps.iter().find(|s| {
                matches!(
                    &s.action,
                    Action::Kill {
                        target: Target::Etcd
                    } | Action::Freeze {
                        target: Target::Etcd
                    } | Action::Restart {
                        target: Target::Etcd
                    } | Action::Link {
                        link: Link::ToEtcd(_),
                        ..
                    }
                )
            }) {
                return Err(format!(
                    "the step \"{}\" targets etcd, but the topology's control plane is the rules file: set topology.control_plane = \"etcd\"",
                    s.action.describe()
                ));
            }
        }
        check_network(f.topology.network, &steps)?;
        let bounds = Bounds {
            max_rto: match &f.bounds.max_rto {
                Some(s) => Some(duration("bounds.max_rto", s)?),
                None => None,
            },
            max_stall: match &f.bounds.max_stall {
                Some(s) => Some(duration("bounds.max_stall", s)?),
                None => None,
            },
            max_failed: f.bounds.max_failed,
            rpo: f.bounds.rpo.unwrap_or(0),
        };
        if let Some(r) = f.stop.max_error_ratio {
            if !(0.0..=1.0).contains(&r) || r.is_nan() {
                return Err(format!("stop.max_error_ratio = {r}: must be 0..=1"));
            }
        }
        if f.expect == Expect::Fail && f.expect_reason.is_none() {
            return Err("expect = \"fail\" needs expect_reason (what is known to fail)".into());
        }
        Ok(Scenario {
            name: f.name,
            description: f.description,
            duration: duration_,
            seed: f.seed,
            expect: f.expect,
            expect_reason: f.expect_reason,
            topology: f.topology,
            workload,
            steps,
            bounds,
            max_error_ratio: f.stop.max_error_ratio,
            stop_on_invariant: f.stop.on_invariant.unwrap_or(true),
        })
    }

    /// The cells' names.
    pub fn cells(&self) -> Vec<String> {
        cell_names(self.topology.cells)
    }

    /// Sets another duration (`--duration`): steps that would end after it
    /// are an error.
    pub fn with_duration(mut self, d: Duration) -> Result<Scenario, String> {
        if let Some(s) = self
            .steps
            .iter()
            .find(|s| s.at + s.for_.unwrap_or_default() > d)
        {
            return Err(format!(
                "--duration {} ms: the step \"{}\" at {} ms ends after it",
                d.as_millis(),
                s.action.describe(),
                s.at.as_millis()
            ));
        }
        self.duration = d;
        Ok(self)
    }
}

pub(crate) mod ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

pub(crate) mod opt_ms {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }
}

#[cfg(test)]
mod tests;
