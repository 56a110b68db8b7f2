//! What a scenario's steps do: the processes, links and cells they act
//! on, and the actions themselves.

use std::time::Duration;

use serde::Serialize;

use super::{ms, opt_ms};

/// A process a step acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// One agent: cell and colour (`cell-a/blue`).
    Agent(String, routing_rules::Colour),
    /// Both agents of a cell (`cell-a`).
    Cell(String),
    /// Every gateway.
    Gateway,
    /// One gateway (`gateway-N`, from 1).
    GatewayN(usize),
    /// The etcd of the control plane.
    Etcd,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Agent(c, col) => write!(f, "{c}/{}", col.as_str()),
            Target::Cell(c) => f.write_str(c),
            Target::Gateway => f.write_str("gateway"),
            Target::GatewayN(n) => write!(f, "gateway-{n}"),
            Target::Etcd => f.write_str("etcd"),
        }
    }
}

/// A link a fault proxy is put on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Link {
    /// Gateway → one agent's public listener (`gateway->cell-a/blue`).
    GatewayToAgent(String, routing_rules::Colour),
    /// Every internal call into a cell's internal listeners — from its
    /// primary's shipper and from other cells' transfer relays
    /// (`cell-a->cell-b`: cell-a's journal to its standby cell-b).
    Internal {
        /// The cell whose shard ships (named for the report).
        from: String,
        /// The cell whose internal listeners the proxy fronts.
        to: String,
    },
    /// A cell's agents → etcd (`cell-a->etcd`): their lease renewals,
    /// registrations, rules watch and replication records.
    ToEtcd(String),
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Link::GatewayToAgent(c, col) => write!(f, "gateway->{c}/{}", col.as_str()),
            Link::Internal { from, to } => write!(f, "{from}->{to}"),
            Link::ToEtcd(c) => write!(f, "{c}->etcd"),
        }
    }
}

/// A fault on a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkFault {
    /// Every chunk delayed this long each way.
    Latency(#[serde(with = "ms")] Duration),
    /// Held open, nothing forwarded.
    Blackhole,
    /// Connections reset.
    Reset,
}

/// What a step does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "action")]
pub enum Action {
    /// SIGKILL; with `for`, started again (same addresses) when it ends.
    Kill {
        /// The processes.
        target: Target,
    },
    /// SIGSTOP, SIGCONT when `for` ends (or at the drill's end).
    Freeze {
        /// The processes.
        target: Target,
    },
    /// SIGTERM (a clean drain), then started again at once.
    Restart {
        /// The processes.
        target: Target,
    },
    /// A fault on a link; back to passing when `for` ends.
    Link {
        /// The link.
        link: Link,
        /// The fault.
        fault: LinkFault,
    },
    /// The cell's network namespace cut off from every other process
    /// (`tc` drops every packet on both ends of its link); healed when
    /// `for` ends.
    Partition {
        /// The cell cut off.
        cell: String,
    },
    /// `cellctl switchover CELL --to TO`.
    Switchover {
        /// The cell whose shard moves.
        cell: String,
        /// Where to.
        to: String,
    },
    /// `cellctl failover CELL --to TO` (the primary is lost).
    Failover {
        /// The lost cell.
        cell: String,
        /// Its standby.
        to: String,
    },
    /// The failback after a failover: the cell's agents that do not run
    /// are started (their stale copy is fenced and seeded again by the
    /// shard's host), then `cellctl failback CELL`, which waits until the
    /// copy is the host's in-sync standby and switches the shard home.
    Failback {
        /// The cell whose shard comes home.
        cell: String,
    },
    /// `cellctl rules apply` of the live rules with a TOML fragment merged
    /// in (tables key by key; see `routing_rules::edit::merge`).
    RulesApply {
        /// The fragment.
        merge: String,
    },
    /// `cellctl split CELL --green SHARE`.
    Split {
        /// The cell.
        cell: String,
        /// Green's share, basis points.
        green_bp: u32,
    },
}

impl Action {
    /// The cells whose users this step may hurt (RTO is measured for
    /// them): a process's own cell and the cell it is the standby of (the
    /// previous one in the ring), every cell for the gateway; a link's
    /// shipping cell; an operator action's cell.
    pub fn affected(&self, cells: &[String]) -> Vec<String> {
        let with_primary = |c: &String| {
            let i = cells.iter().position(|x| x == c).unwrap_or(0);
            let prev = &cells[(i + cells.len() - 1) % cells.len()];
            if prev == c {
                vec![c.clone()]
            } else {
                vec![c.clone(), prev.clone()]
            }
        };
        match self {
            Action::Partition { cell } => with_primary(cell),
            Action::Kill { target } | Action::Freeze { target } | Action::Restart { target } => {
                match target {
                    Target::Agent(c, _) | Target::Cell(c) => with_primary(c),
                    Target::Gateway | Target::GatewayN(_) | Target::Etcd => cells.to_vec(),
                }
            }
            Action::RulesApply { .. } => cells.to_vec(),
            Action::Link {
                link: Link::GatewayToAgent(c, _),
                ..
            } => vec![c.clone()],
            Action::Link {
                link: Link::Internal { from, .. } | Link::ToEtcd(from),
                ..
            } => vec![from.clone()],
            Action::Switchover { cell, .. }
            | Action::Failover { cell, .. }
            | Action::Failback { cell }
            | Action::Split { cell, .. } => vec![cell.clone()],
        }
    }

    /// One line for logs and the report.
    pub fn describe(&self) -> String {
        match self {
            Action::Kill { target } => format!("kill -9 {target}"),
            Action::Freeze { target } => format!("freeze (SIGSTOP) {target}"),
            Action::Restart { target } => format!("restart {target}"),
            Action::Link { link, fault } => match fault {
                LinkFault::Latency(d) => format!("link {link}: +{} ms each way", d.as_millis()),
                LinkFault::Blackhole => format!("link {link}: blackhole"),
                LinkFault::Reset => format!("link {link}: reset"),
            },
            Action::Partition { cell } => {
                format!("partition {cell} (tc drops every packet to and from it)")
            }
            Action::Switchover { cell, to } => format!("cellctl switchover {cell} --to {to}"),
            Action::Failover { cell, to } => format!("cellctl failover {cell} --to {to}"),
            Action::Failback { cell } => format!("failback {cell} (re-seed, cellctl failback)"),
            Action::RulesApply { merge } => {
                let set: Vec<&str> = merge
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .collect();
                format!("cellctl rules apply (merged: {})", set.join(" "))
            }
            Action::Split { cell, green_bp } => format!(
                "cellctl split {cell} --green {}",
                routing_rules::model::format_percent(*green_bp)
            ),
        }
    }
}

/// One step on the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// When, from the workload's start.
    #[serde(with = "ms")]
    pub at: Duration,
    /// How long the fault lasts (`None`: it stays until the drill ends, or
    /// the step is an instant action).
    #[serde(with = "opt_ms")]
    pub for_: Option<Duration>,
    /// What it does.
    pub action: Action,
}
