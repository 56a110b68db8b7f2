//! `cellctl`'s command line: its commands, their arguments and help.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use routing_rules::{CellState, Colour};

#[cfg(feature = "client")]
use crate::switch;

/// Where online commands go: the etcd control plane of one cluster.
#[derive(Debug, Clone, Args)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(crate) struct Target {
    /// etcd endpoints for online commands (env CELLGATE_ETCD).
    #[arg(
        long,
        global = true,
        env = "CELLGATE_ETCD",
        value_name = "URL[,URL...]"
    )]
    pub(crate) etcd: Option<String>,
    /// Cluster name: the keys live under /cellgate/NAME/ (env CELLGATE_CLUSTER).
    #[arg(
        long,
        global = true,
        env = "CELLGATE_CLUSTER",
        value_name = "NAME",
        default_value = "default"
    )]
    pub(crate) cluster: String,
}

/// Format of `rules get`.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(crate) enum GetFormat {
    /// The document, verbatim.
    Toml,
    /// `{revision, cluster, document}`.
    Json,
}

/// cellctl — inspect, route, diff and rebalance cellgate rules documents.
///
/// A rules document (TOML) says where the user key comes from, how keys
/// hash to slots, which cell owns each slot, each cell's blue/green split
/// and failover order, and per-user overrides. See docs/rules.md.
///
/// Exit status: 0 ok, 1 invalid input or failed check, 2 usage error.
#[derive(Debug, Parser)]
#[command(name = "cellctl", version, about, long_about)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) target: Target,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub(crate) enum Output {
    /// Human-readable text.
    #[default]
    Text,
    /// Machine-readable JSON.
    Json,
}

#[derive(Debug, Args)]
pub(crate) struct OutputArg {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub(crate) output: Output,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Work with rules documents (validate, diff, rebalance).
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Show where each KEY is routed: slot, home and serving cell, colour, and why.
    Route(RouteArgs),
    /// Set a cell's green share: the live rules in etcd (compare-and-swap),
    /// or a rules file with --rules (edited in place under its lock, the
    /// revision raised; nothing written when nothing changes).
    Split {
        /// The cell.
        cell: String,
        /// Green share: a percentage from 0 to 100, up to two decimals, the
        /// `%` optional (e.g. 0.5%, 5%, 25) — the same unit as the rules
        /// file's `split.green = "25%"`.
        #[arg(long, value_name = "PERCENT")]
        green: String,
        /// Edit this rules file instead of the rules in etcd.
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        #[command(flatten)]
        msg: MessageArg,
    },
    /// Set a cell's state (live rules, compare-and-swap).
    Cell {
        /// The cell.
        cell: String,
        /// New state.
        #[arg(long, value_parser = parse_state)]
        state: CellState,
        #[command(flatten)]
        msg: MessageArg,
    },
    /// Fail a cell over to another: state failed-over, OTHER first in its failover list.
    /// When the cell's shard is replicated (a record under replication/CELL),
    /// OTHER must be its standby and the shard recorded in sync; --force
    /// overrides that, accepting that writes the standby lacks are lost.
    ///
    /// With --rules FILE (the embedded mode) the failover carries the data:
    /// the standby's copy of the shard is promoted and the shard moves to it
    /// (`hosted_by`, epochs +1, next revision), after checking the shard's
    /// record (RULES.replication/CELL.json) says the standby is in sync.
    Failover {
        /// The cell.
        cell: String,
        /// The cell that takes its users.
        #[arg(long, value_name = "OTHER")]
        to: String,
        /// Fail over even to a standby that is not recorded in sync (may
        /// lose the writes it lacks) or to a cell that is not the standby.
        #[arg(long)]
        force: bool,
        /// The rules file the cells follow: fail the shard over with its
        /// data (promote the standby's copy).
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        /// With --rules: the cluster secret the agents' internal listeners
        /// check (env CELLGATE_INTERNAL_SECRET_FILE).
        #[arg(long, value_name = "PATH", env = "CELLGATE_INTERNAL_SECRET_FILE")]
        internal_secret_file: Option<PathBuf>,
        #[command(flatten)]
        msg: MessageArg,
    },
    /// Return a failed-over or draining cell to active.
    ///
    /// With --rules FILE (the embedded mode): bring a failed-over shard
    /// home with its data. The cell's agents, once running again, fence
    /// their stale copy and its host seeds it again from a snapshot (the
    /// unacknowledged tail kept aside as `DB.discarded-<ms>`); the command
    /// waits until that copy is recorded as the host's in-sync standby, then
    /// runs a planned switchover to the cell itself.
    Failback {
        /// The cell.
        cell: String,
        /// The rules file the cells follow: move the shard home with its data.
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        /// With --rules: the cluster secret (env CELLGATE_INTERNAL_SECRET_FILE).
        #[arg(long, value_name = "PATH", env = "CELLGATE_INTERNAL_SECRET_FILE")]
        internal_secret_file: Option<PathBuf>,
        /// With --rules: how long to wait for the cell's copy to be re-seeded
        /// and in sync before giving up (nothing changed then).
        #[arg(long, value_name = "MS", default_value_t = 60_000)]
        wait_ms: u64,
        #[command(flatten)]
        msg: MessageArg,
    },
    /// Pin or unpin users (live rules).
    #[command(subcommand)]
    Override(OverrideCommand),
    /// The live revision, each gateway's running revision and how long ago it
    /// applied it, each cell/colour's registered instances; exit 1 when some
    /// gateway does not run the latest revision yet.
    Status {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Shard replication (live, from the control plane).
    #[command(subcommand)]
    Replication(ReplicationCommand),
    /// Move a replicated cell's shard to its synchronous standby with no
    /// acknowledged write lost: ban its slots at the current host (whose
    /// copy becomes a replica), wait until the standby applied the ban,
    /// promote the standby's copy, then move the shard in the rules
    /// (`hosted_by`, epochs +1, next revision). Each phase is recorded
    /// first (RULES.switchover.json): run the same command again to finish
    /// one that was cut off. `--to CELL` (the cell itself) brings a moved
    /// shard home. If the standby does not catch up in time, the old host
    /// takes the slots back: rolled back, exit 1.
    #[cfg(feature = "client")]
    Switchover(switch::SwitchoverArgs),
    /// Canary pipelines: step a cell's green share, judge green against
    /// blue of the same cell, abort at once when green is worse (`cellctl
    /// canary run --help`).
    #[cfg(feature = "client")]
    #[command(subcommand)]
    Canary(crate::canary::CanaryCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum ReplicationCommand {
    /// Each replicated cell's standby, `in-sync` or `degraded` since when,
    /// and the last LSN its standby acknowledged, as its agents recorded
    /// them; exit 1 when a shard is degraded or none is recorded.
    Status {
        /// Read the records the agents keep next to this rules file (the
        /// embedded mode) instead of etcd.
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        #[command(flatten)]
        out: OutputArg,
    },
}

#[derive(Debug, Args)]
pub(crate) struct MessageArg {
    /// Message recorded in the history.
    #[arg(short = 'm', long = "message", default_value = "")]
    pub(crate) message: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    pub(crate) output: Output,
}

#[derive(Debug, Subcommand)]
pub(crate) enum OverrideCommand {
    /// Pin USER to a cell and/or a colour.
    Set {
        /// The user key.
        user: String,
        /// Cell to pin to.
        #[arg(long)]
        cell: Option<String>,
        /// Colour to pin to.
        #[arg(long, value_parser = parse_colour)]
        colour: Option<Colour>,
        #[command(flatten)]
        msg: MessageArg,
    },
    /// Remove USER's pin.
    Rm {
        /// The user key.
        user: String,
        #[command(flatten)]
        msg: MessageArg,
    },
}

pub(crate) fn parse_state(s: &str) -> Result<CellState, String> {
    match s {
        "active" => Ok(CellState::Active),
        "draining" => Ok(CellState::Draining),
        _ => Err(format!(
            "{s:?}: use active or draining (cellctl failover for failed-over)"
        )),
    }
}

pub(crate) fn parse_colour(s: &str) -> Result<Colour, String> {
    Colour::parse(s).ok_or_else(|| format!("{s:?}: use blue or green"))
}

#[derive(Debug, Subcommand)]
pub(crate) enum RulesCommand {
    /// Check a rules document; print a summary, or every problem found (exit 1).
    Validate {
        /// The rules document (TOML).
        file: PathBuf,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Raise the document's `revision` by one (file mode: every process
    /// reading the file runs the document's own revision, and a changed
    /// document whose revision did not move forward is refused).
    Bump {
        /// The rules document (TOML), rewritten atomically.
        file: PathBuf,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Show who moves where between two rules documents.
    Diff {
        /// The current document.
        old: PathBuf,
        /// The proposed document.
        new: PathBuf,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Print the live rules (etcd).
    Get {
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = GetFormat::Toml)]
        output: GetFormat,
    },
    /// Validate FILE, print its diff against the live rules, and write it as the next
    /// revision with compare-and-swap (a concurrent change is a conflict, not an overwrite).
    Apply {
        /// The new document.
        file: PathBuf,
        /// Only validate and print the diff.
        #[arg(long)]
        dry_run: bool,
        /// Fail unless the live rules are at this revision (default: the revision just read).
        #[arg(long, value_name = "R")]
        expect_revision: Option<u64>,
        #[command(flatten)]
        msg: MessageArg,
    },
    /// Every applied revision: who, when, message.
    History {
        #[command(flatten)]
        out: OutputArg,
    },
    /// Re-apply the document of revision REV as a new revision.
    Rollback {
        /// The revision to go back to.
        revision: u64,
        #[command(flatten)]
        msg: MessageArg,
    },
    /// Reassign slots with consistent hashing when cells are added or removed.
    ///
    /// Adding a cell moves to it only the slots the ring gives it (about
    /// slots/(N+1) for an (N+1)th equal cell); removing a cell moves only
    /// its slots. Pinned ranges never move. Cells must already be defined
    /// in the document. The new document keeps everything else, comments
    /// included; its diff against FILE is printed.
    Rebalance {
        /// The current document.
        file: PathBuf,
        /// Give slots to this cell; NAME or NAME=WEIGHT (weight 1..=1000, default: the cell's weight).
        #[arg(long = "add-cell", value_name = "NAME[=WEIGHT]", value_parser = parse_add_cell)]
        add: Vec<(String, Option<u32>)>,
        /// Take all slots away from this cell.
        #[arg(long = "remove-cell", value_name = "NAME")]
        remove: Vec<String>,
        /// Where to write the new document (written atomically).
        #[arg(long, value_name = "NEW")]
        out: PathBuf,
        /// List every moved range, epoch change and warning (by default the
        /// first few of each and a count; `-o json` has them all).
        #[arg(short = 'v', long)]
        verbose: bool,
        #[command(flatten)]
        output: OutputArg,
    },
}

#[derive(Debug, Args)]
pub(crate) struct RouteArgs {
    /// The rules document (TOML); without it, the live rules from etcd.
    #[arg(long, value_name = "FILE")]
    pub(crate) rules: Option<PathBuf>,
    /// Treat a cell (CELL) or one colour of it (CELL:COLOUR) as having no
    /// healthy instance. Repeatable. Without it, every colour with instances
    /// in the rules is healthy.
    #[arg(long, value_name = "CELL[:COLOUR]")]
    pub(crate) down: Vec<String>,
    /// Route as if the request carried this tester-header value (honoured
    /// only when the rules enable the tester header).
    #[arg(long, value_name = "COLOUR")]
    pub(crate) tester_colour: Option<String>,
    #[command(flatten)]
    pub(crate) out: OutputArg,
    /// User keys to route.
    #[arg(required = true, value_name = "KEY")]
    pub(crate) keys: Vec<String>,
}

pub(crate) fn parse_add_cell(s: &str) -> Result<(String, Option<u32>), String> {
    match s.split_once('=') {
        None if !s.is_empty() => Ok((s.to_string(), None)),
        None => Err("empty cell name".into()),
        Some((name, w)) => {
            let w: u32 = w
                .parse()
                .map_err(|_| format!("weight \"{w}\" is not a whole number"))?;
            if name.is_empty() {
                return Err("empty cell name".into());
            }
            Ok((name.to_string(), Some(w)))
        }
    }
}
