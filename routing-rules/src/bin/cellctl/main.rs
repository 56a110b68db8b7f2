//! `cellctl`: the traffic engineers' CLI for cellgate rules.
//!
//! Exit codes: 0 = ok, 1 = invalid input or failed check, 2 = usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use routing_rules::{parse_rules, CellState, Colour, Rules};

mod offline;
mod online;
#[cfg(feature = "client")]
mod switch;

thread_local! {
    /// The live rules fetched for `cellctl route` without `--rules`.
    static LIVE: std::cell::RefCell<Option<(String, u64)>> = const { std::cell::RefCell::new(None) };
}

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
    etcd: Option<String>,
    /// Cluster name: the keys live under /cellgate/NAME/ (env CELLGATE_CLUSTER).
    #[arg(
        long,
        global = true,
        env = "CELLGATE_CLUSTER",
        value_name = "NAME",
        default_value = "default"
    )]
    cluster: String,
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

/// An edit of the live rules.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(crate) enum EditOp {
    /// Set a cell's green share.
    Split { cell: String, green: String },
    /// Set a cell's state.
    State { cell: String, state: CellState },
    /// Fail a cell over.
    Failover {
        cell: String,
        to: String,
        force: bool,
    },
    /// Fail a cell back.
    Failback { cell: String },
    /// Pin a user.
    OverrideSet {
        user: String,
        cell: Option<String>,
        colour: Option<Colour>,
    },
    /// Unpin a user.
    OverrideRm { user: String },
}

/// A command against the control plane.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(crate) enum OnlineCommand {
    /// `rules get`.
    Get { output: GetFormat },
    /// `rules apply`.
    Apply {
        file: PathBuf,
        dry_run: bool,
        expect_revision: Option<u64>,
        message: String,
        output: Output,
    },
    /// `rules history`.
    History { output: Output },
    /// `rules rollback`.
    Rollback {
        revision: u64,
        message: String,
        output: Output,
    },
    /// Shortcuts.
    Edit {
        edit: EditOp,
        message: String,
        output: Output,
    },
    /// Fetch the live document (for `route`).
    Document,
    /// `status`.
    Status { output: Output },
    /// `replication status`.
    Replication { output: Output },
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
struct Cli {
    #[command(flatten)]
    target: Target,
    #[command(subcommand)]
    command: Command,
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
    output: Output,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// home once the cell's own copy is its host's in-sync standby again
    /// (after `cell-agent replica sync` re-seeded it): a planned switchover
    /// to the cell itself.
    Failback {
        /// The cell.
        cell: String,
        /// The rules file the cells follow: move the shard home with its data.
        #[arg(long, value_name = "FILE")]
        rules: Option<PathBuf>,
        /// With --rules: the cluster secret (env CELLGATE_INTERNAL_SECRET_FILE).
        #[arg(long, value_name = "PATH", env = "CELLGATE_INTERNAL_SECRET_FILE")]
        internal_secret_file: Option<PathBuf>,
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
}

#[derive(Debug, Subcommand)]
enum ReplicationCommand {
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
struct MessageArg {
    /// Message recorded in the history.
    #[arg(short = 'm', long = "message", default_value = "")]
    message: String,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum OverrideCommand {
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

fn parse_state(s: &str) -> Result<CellState, String> {
    match s {
        "active" => Ok(CellState::Active),
        "draining" => Ok(CellState::Draining),
        _ => Err(format!(
            "{s:?}: use active or draining (cellctl failover for failed-over)"
        )),
    }
}

fn parse_colour(s: &str) -> Result<Colour, String> {
    Colour::parse(s).ok_or_else(|| format!("{s:?}: use blue or green"))
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
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
    rules: Option<PathBuf>,
    /// Treat a cell (CELL) or one colour of it (CELL:COLOUR) as having no
    /// healthy instance. Repeatable. Without it, every colour with instances
    /// in the rules is healthy.
    #[arg(long, value_name = "CELL[:COLOUR]")]
    down: Vec<String>,
    /// Route as if the request carried this tester-header value (honoured
    /// only when the rules enable the tester header).
    #[arg(long, value_name = "COLOUR")]
    tester_colour: Option<String>,
    #[command(flatten)]
    out: OutputArg,
    /// User keys to route.
    #[arg(required = true, value_name = "KEY")]
    keys: Vec<String>,
}

fn parse_add_cell(s: &str) -> Result<(String, Option<u32>), String> {
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

/// A failure already reported to the user: exit 1 without more output.
#[derive(Debug)]
pub(crate) struct Reported;

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reported")
    }
}
impl std::error::Error for Reported {}

fn main() -> ExitCode {
    // `cellctl route ... | head`: a closed pipe ends the program quietly, as
    // with any Unix tool (Rust ignores SIGPIPE, so the next print fails).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let closed_pipe = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m.contains("failed printing to stdout") && m.contains("Broken pipe"));
        if closed_pipe {
            std::process::exit(0);
        }
        default_hook(info);
    }));
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if e.downcast_ref::<Reported>().is_none() {
                eprintln!("cellctl: {}", routing_rules::error::report(&e));
            }
            ExitCode::from(1)
        }
    }
}

pub(crate) fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Loads and validates a document; on failure prints every problem.
pub(crate) fn load(path: &Path, out: Output) -> Result<(String, Rules)> {
    let text = read(path)?;
    match parse_rules(&text) {
        Ok(r) => Ok((text, r)),
        Err(e) => {
            match out {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "valid": false,
                        "file": path.display().to_string(),
                        "errors": e.problems(),
                    })
                ),
                Output::Text => eprintln!("{}: invalid rules: {e}", path.display()),
            }
            Err(Reported.into())
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let target = cli.target;
    let edit = |edit: EditOp, msg: MessageArg| OnlineCommand::Edit {
        edit,
        message: msg.message,
        output: msg.output,
    };
    match cli.command {
        Command::Rules(RulesCommand::Get { output }) => {
            online::run(&target, OnlineCommand::Get { output })
        }
        Command::Rules(RulesCommand::Apply {
            file,
            dry_run,
            expect_revision,
            msg,
        }) => online::run(
            &target,
            OnlineCommand::Apply {
                file,
                dry_run,
                expect_revision,
                message: msg.message,
                output: msg.output,
            },
        ),
        Command::Rules(RulesCommand::History { out }) => {
            online::run(&target, OnlineCommand::History { output: out.output })
        }
        Command::Rules(RulesCommand::Rollback { revision, msg }) => online::run(
            &target,
            OnlineCommand::Rollback {
                revision,
                message: msg.message,
                output: msg.output,
            },
        ),
        #[cfg(feature = "client")]
        Command::Split {
            cell,
            green,
            rules: Some(file),
            msg,
        } => edit_file(&file, msg.output, |text| {
            Ok(routing_rules::edit::set_split(
                text,
                &cell,
                routing_rules::edit::percent_to_bp(&green)?,
            )?)
        }),
        Command::Split {
            cell, green, msg, ..
        } => online::run(&target, edit(EditOp::Split { cell, green }, msg)),
        Command::Cell { cell, state, msg } => {
            online::run(&target, edit(EditOp::State { cell, state }, msg))
        }
        // With the data: a rules file, or etcd with the cluster secret.
        #[cfg(feature = "client")]
        Command::Failover {
            cell,
            to,
            force,
            rules,
            internal_secret_file,
            msg,
        } if rules.is_some()
            || internal_secret_file.is_some()
            || std::env::var_os(routing_rules::auth::SECRET_ENV).is_some() =>
        {
            switch::failover(
                (cell, to, force),
                rules,
                &target,
                internal_secret_file,
                msg.output,
            )
        }
        Command::Failover {
            cell,
            to,
            force,
            msg,
            ..
        } => online::run(&target, edit(EditOp::Failover { cell, to, force }, msg)),
        #[cfg(feature = "client")]
        Command::Failback {
            cell,
            rules,
            internal_secret_file,
            msg,
        } if rules.is_some()
            || internal_secret_file.is_some()
            || std::env::var_os(routing_rules::auth::SECRET_ENV).is_some() =>
        {
            switch::failback(cell, rules, &target, internal_secret_file, msg.output)
        }
        Command::Failback { cell, msg, .. } => {
            online::run(&target, edit(EditOp::Failback { cell }, msg))
        }
        Command::Override(OverrideCommand::Set {
            user,
            cell,
            colour,
            msg,
        }) => online::run(
            &target,
            edit(EditOp::OverrideSet { user, cell, colour }, msg),
        ),
        Command::Status { out } => {
            online::run(&target, OnlineCommand::Status { output: out.output })
        }
        Command::Replication(ReplicationCommand::Status {
            rules: Some(rules),
            out,
        }) => offline::replication_file(&rules, out.output),
        Command::Replication(ReplicationCommand::Status { rules: None, out }) => {
            online::run(&target, OnlineCommand::Replication { output: out.output })
        }
        Command::Override(OverrideCommand::Rm { user, msg }) => {
            online::run(&target, edit(EditOp::OverrideRm { user }, msg))
        }
        Command::Route(args) if args.rules.is_none() => {
            online::run(&target, OnlineCommand::Document)?;
            let (text, rev) = LIVE
                .with(|l| l.borrow_mut().take())
                .context("no live rules")?;
            offline::route(args, Some((text, rev)))
        }
        Command::Rules(RulesCommand::Validate { file, out }) => offline::validate(&file, out),
        Command::Rules(RulesCommand::Diff { old, new, out }) => {
            offline::diff_files(&old, &new, out)
        }
        Command::Rules(RulesCommand::Rebalance {
            file,
            add,
            remove,
            out,
            output,
            verbose,
        }) => offline::rebalance_file(&file, add, remove, &out, output, verbose),
        Command::Rules(RulesCommand::Bump { file, out }) => offline::bump(&file, out),
        Command::Route(args) => offline::route(args, None),
        #[cfg(feature = "client")]
        Command::Switchover(args) => switch::switchover(args, &target),
    }
}

/// Edits a rules file in place under its lock (`cellctl split --rules`):
/// the revision raised, or "no changes" and nothing written.
#[cfg(feature = "client")]
fn edit_file(file: &Path, output: Output, edit: impl FnOnce(&str) -> Result<String>) -> Result<()> {
    let revision = routing_rules::switchover::edit_rules_file(file, edit)?;
    match (output, revision) {
        (Output::Json, r) => println!(
            "{}",
            serde_json::json!({"applied": r.is_some(), "no_changes": r.is_none(), "revision": r})
        ),
        (Output::Text, Some(r)) => println!("{}: revision {r} written", file.display()),
        (Output::Text, None) => println!("no changes ({} is left as it is)", file.display()),
    }
    Ok(())
}
