//! `cellctl switchover`: moves a replicated cell's shard to its standby
//! (see `routing_rules::switchover`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use routing_rules::auth::{ClusterSecret, SECRET_ENV};
use routing_rules::switchover::{run, EtcdTarget, Outcome, Request};

use crate::{Output, OutputArg, Reported, Target};

/// Flags of `cellctl switchover`.
#[derive(Debug, Args)]
pub(crate) struct SwitchoverArgs {
    /// The cell whose shard moves.
    cell: String,
    /// Where to: the shard's synchronous standby (or the cell itself, to
    /// bring a moved shard home).
    #[arg(long, value_name = "OTHER")]
    to: String,
    /// The rules file the cells follow (the embedded mode); without it,
    /// the etcd control plane of --etcd/--cluster.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
    /// How long the standby may take to apply the ban before the
    /// switchover is rolled back, ms.
    #[arg(long, value_name = "MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    catch_up_timeout_ms: u64,
    /// The cluster secret the agents' internal listeners check (env
    /// CELLGATE_INTERNAL_SECRET_FILE; or the secret itself in
    /// CELLGATE_INTERNAL_SECRET).
    #[arg(long, value_name = "PATH", env = "CELLGATE_INTERNAL_SECRET_FILE")]
    internal_secret_file: Option<PathBuf>,
    #[command(flatten)]
    out: OutputArg,
}

fn secret(file: Option<&std::path::Path>) -> Result<ClusterSecret> {
    ClusterSecret::load(file)?.with_context(|| {
        format!("the agents' cluster secret is needed: --internal-secret-file PATH (or {SECRET_ENV} in the environment)")
    })
}

/// The runtime a `cellctl` command that talks to the cells or gateways
/// runs on (one thread: a CLI).
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn print(out: &Outcome, output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string(out)?),
        Output::Text => {
            let moved = out.result != "rolled-back";
            println!(
                "{}: cell {}'s shard {} {} (slots refused for {} ms; rules revision {})",
                out.result,
                out.plan.cell,
                if moved { "moved to" } else { "stays at" },
                if moved { &out.plan.to } else { &out.plan.from },
                out.stall_ms,
                out.revision.map(|r| r.to_string()).unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Where the command goes: the rules file, else etcd (`--etcd`).
pub(crate) fn place(
    rules: Option<PathBuf>,
    target: &Target,
) -> Result<(PathBuf, Option<EtcdTarget>)> {
    match (rules, &target.etcd) {
        (Some(r), _) => Ok((r, None)),
        (None, Some(list)) => Ok((
            PathBuf::new(),
            Some(EtcdTarget {
                endpoints: list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                cluster: target.cluster.clone(),
            }),
        )),
        (None, None) => anyhow::bail!("give --rules FILE (the embedded mode) or --etcd URL"),
    }
}

/// `cellctl failover CELL --to OTHER` with the data (the standby's copy
/// promoted).
pub(crate) fn failover(
    (cell, to, force): (String, String, bool),
    rules: Option<PathBuf>,
    target: &Target,
    secret_file: Option<PathBuf>,
    output: Output,
) -> Result<()> {
    let secret = secret(secret_file.as_deref())?;
    let (rules, etcd) = place(rules, target)?;
    let req = routing_rules::switchover::FailoverRequest {
        rules,
        cell,
        to,
        force,
        etcd,
    };
    let out = runtime()?.block_on(routing_rules::switchover::failover(&req, secret))?;
    print(&out, output)?;
    if output == Output::Text {
        println!(
            "the old host's copy of the shard keeps its unacknowledged writes, if any; it serves again only after `cellctl failback`"
        );
    }
    Ok(())
}

/// `cellctl failback CELL` with the data: the shard comes home when the
/// cell's own copy is its host's in-sync standby again.
pub(crate) fn failback(
    cell: String,
    rules: Option<PathBuf>,
    target: &Target,
    (secret_file, wait_ms): (Option<PathBuf>, u64),
    output: Output,
) -> Result<()> {
    let secret = secret(secret_file.as_deref())?;
    let (rules, etcd) = place(rules, target)?;
    let req = Request {
        rules,
        cell: cell.clone(),
        to: cell,
        catch_up_timeout: std::time::Duration::from_secs(5),
        etcd,
    };
    let out: Outcome = runtime()?.block_on(routing_rules::switchover::failback(
        &req,
        secret,
        std::time::Duration::from_millis(wait_ms),
    ))?;
    print(&out, output)?;
    if out.result == "switched" {
        Ok(())
    } else {
        Err(Reported.into())
    }
}

pub(crate) fn switchover(args: SwitchoverArgs, target: &Target) -> Result<()> {
    let secret = secret(args.internal_secret_file.as_deref())?;
    let (rules, etcd) = place(args.rules, target)?;
    let req = Request {
        rules,
        cell: args.cell,
        to: args.to,
        catch_up_timeout: std::time::Duration::from_millis(args.catch_up_timeout_ms),
        etcd,
    };
    let out: Outcome = runtime()?.block_on(run(&req, secret))?;
    print(&out, args.out.output)?;
    if out.result == "switched" {
        Ok(())
    } else {
        Err(Reported.into())
    }
}
