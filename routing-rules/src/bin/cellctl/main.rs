//! `cellctl`: the traffic engineers' CLI for cellgate rules.
//!
//! Exit codes: 0 = ok, 1 = invalid input or failed check, 2 = usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use routing_rules::{parse_rules, CellState, Colour, Rules};

#[cfg(feature = "client")]
mod canary;
mod cli;
mod offline;
mod online;
#[cfg(feature = "client")]
mod switch;

pub(crate) use cli::*;

thread_local! {
    /// The live rules fetched for `cellctl route` without `--rules`.
    static LIVE: std::cell::RefCell<Option<(String, u64)>> = const { std::cell::RefCell::new(None) };
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
            #[cfg(feature = "client")]
            if let Some(canary::Exit(code)) = e.downcast_ref::<canary::Exit>() {
                return ExitCode::from(*code);
            }
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
            wait_ms,
            msg,
        } if rules.is_some()
            || internal_secret_file.is_some()
            || std::env::var_os(routing_rules::auth::SECRET_ENV).is_some() =>
        {
            switch::failback(
                cell,
                rules,
                &target,
                (internal_secret_file, wait_ms),
                msg.output,
            )
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
        #[cfg(feature = "client")]
        Command::Canary(cmd) => canary::command(cmd, &target),
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
