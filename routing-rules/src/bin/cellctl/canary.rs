//! `cellctl canary`: run, watch, pause, resume and abort a cell's canary
//! pipeline; its dry run and its exposure.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use routing_rules::canary::driver::{self, Ending, RunRequest, Where};
use routing_rules::canary::exposure::exposure;
use routing_rules::canary::store::now_ms;
use routing_rules::canary::{Event, Hooks, Plan, Thresholds};
use routing_rules::model::format_percent;

use crate::switch::runtime;
use crate::{Output, OutputArg, Target};

/// Exit with this code, the reason already printed.
#[derive(Debug)]
pub(crate) struct Exit(pub(crate) u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}
impl std::error::Error for Exit {}

#[derive(Debug, Subcommand)]
pub(crate) enum CanaryCommand {
    /// Step CELL's green share through --steps, judging green against blue
    /// of the same cell over the same window at each step; abort (green to
    /// 0 %) at the first failed judgement.
    ///
    /// Each step writes the share into the rules (under their lock, the
    /// revision raised), waits until every gateway runs that revision, asks
    /// the --gate (if any), then judges every --interval for --hold from
    /// the gateways' own /metrics: green's error ratio (5xx, timeouts
    /// included) against --max-error-ratio × blue's with a one-sided test,
    /// green's p99 against --max-p99-ratio × blue's with a rank test on the
    /// latency buckets. Fewer than --min-requests on a colour: no verdict,
    /// wait (up to --max-wait, then abort): a canary never passes for lack
    /// of traffic. The pipeline's state is kept next to the rules
    /// (RULES.canary/CELL.json) under a lease: a second run on the cell is
    /// refused; if this process dies, `resume` finishes it, `abort` rolls it
    /// back.
    ///
    /// Exit status: 0 promoted (green at the last step's share), 1 aborted,
    /// 2 error (nothing judged; the share as it was).
    Run(RunArgs),
    /// The recorded pipeline of CELL: status, step, driver, last reason.
    Status {
        /// The cell.
        cell: String,
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Set CELL's green share to 0 % at once and record the pipeline
    /// aborted (its driver stops); prints how long until every gateway ran
    /// it.
    Abort {
        /// The cell.
        cell: String,
        #[command(flatten)]
        place: Place,
        /// Why (recorded).
        #[arg(long, default_value = "aborted by an operator")]
        reason: String,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Hold CELL's pipeline at its step: still judged (and aborted on
    /// failure), not advanced, until `resume`.
    Pause {
        /// The cell.
        cell: String,
        #[command(flatten)]
        place: Place,
    },
    /// Resume CELL's pipeline: a paused one goes on; one whose driver
    /// stopped is driven from its recorded step by this process.
    Resume {
        /// The cell.
        cell: String,
        #[command(flatten)]
        place: Place,
        #[command(flatten)]
        out: OutputArg,
    },
    /// Which of the users in --users (one key per line) each step puts on
    /// green. The split is sticky and one-directional: a user on green at
    /// 5 % stays on green at 25 %.
    Exposure {
        /// The cell.
        cell: String,
        #[command(flatten)]
        place: Place,
        /// Users, one routing key per line.
        #[arg(long, value_name = "FILE")]
        users: PathBuf,
        /// Green shares, ascending (percent).
        #[arg(long, default_value = "1,5,25,50,100")]
        steps: String,
        #[command(flatten)]
        out: OutputArg,
    },
}

/// Where the rules are.
#[derive(Debug, Args)]
pub(crate) struct Place {
    /// The rules file the gateways follow (the embedded mode; the
    /// pipeline's state is kept next to it). Without it: the rules in etcd
    /// (--etcd/--cluster), the state under /cellgate/CLUSTER/canary/CELL.
    #[arg(long, value_name = "FILE")]
    rules: Option<PathBuf>,
}

impl Place {
    fn resolve(&self, target: &Target) -> Result<Where> {
        let (rules, etcd) = crate::switch::place(self.rules.clone(), target)?;
        Ok(match etcd {
            Some(t) => Where {
                rules: None,
                etcd: Some(t),
            },
            None => Where::file(&rules),
        })
    }
}

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The cell.
    cell: String,
    #[command(flatten)]
    place: Place,
    /// Green shares, ascending (percent, up to two decimals).
    #[arg(long, default_value = "1,5,25,50,100")]
    steps: String,
    /// How long each step must be judged healthy (e.g. 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = duration)]
    hold: Duration,
    /// How often each step is judged.
    #[arg(long, default_value = "5s", value_parser = duration)]
    interval: Duration,
    /// How long a step may wait for enough requests (or for its gate)
    /// before the pipeline aborts.
    #[arg(long, default_value = "10m", value_parser = duration)]
    max_wait: Duration,
    /// Green's error ratio may be at most this multiple of blue's.
    #[arg(long, default_value_t = 2.0)]
    max_error_ratio: f64,
    /// Green's p99 latency may be at most this multiple of blue's.
    #[arg(long, default_value_t = 1.5)]
    max_p99_ratio: f64,
    /// Requests each colour needs in a window before any verdict.
    #[arg(long, default_value_t = 200)]
    min_requests: u64,
    /// The gateways' metrics URLs, comma-separated
    /// (http://ADMIN_ADDR/metrics each); their sum is judged. With etcd
    /// and neither this nor --prometheus: every registered gateway (from its
    /// registration's admin address). Env CELLGATE_ADMIN_TOKEN: sent as
    /// the admin API's bearer token.
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    metrics: Vec<String>,
    /// Read the gateways' series from this Prometheus server instead
    /// (its /federate endpoint).
    #[arg(long, value_name = "URL", conflicts_with = "metrics")]
    prometheus: Option<String>,
    /// POST each step's events (started, passed) here as JSON.
    #[arg(long, value_name = "URL")]
    on_step: Option<String>,
    /// POST the abort here as JSON.
    #[arg(long, value_name = "URL")]
    on_abort: Option<String>,
    /// POST here before each step is judged; a non-2xx answer pauses the
    /// step until it answers 2xx (up to --max-wait).
    #[arg(long, value_name = "URL")]
    gate: Option<String>,
    /// Print the plan (per step: the share of the cell's users that move,
    /// counted exactly with --users) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: users, one routing key per line.
    #[arg(long, value_name = "FILE")]
    users: Option<PathBuf>,
    #[command(flatten)]
    out: OutputArg,
}

fn duration(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (e.g. 30s, 500ms, 2m)"))?;
    if d.is_zero() {
        return Err(format!("{s:?}: must be above 0"));
    }
    Ok(d)
}

/// Runs one `cellctl canary` command. Exit status: 0 done (a pipeline
/// promoted), 1 a pipeline aborted, 2 an error (nothing changed).
pub(crate) fn command(cmd: CanaryCommand, target: &Target) -> Result<()> {
    match one(cmd, target) {
        Err(e) if e.downcast_ref::<Exit>().is_none() => failed(e),
        r => r,
    }
}

fn one(cmd: CanaryCommand, target: &Target) -> Result<()> {
    match cmd {
        CanaryCommand::Run(args) => run(args, target),
        CanaryCommand::Status { cell, place, out } => {
            let p = runtime()?.block_on(driver::status(&place.resolve(target)?, &cell))?;
            match out.output {
                Output::Json => println!("{}", serde_json::to_string(&p)?),
                Output::Text => println!("{}", p.summary(now_ms())),
            }
            Ok(())
        }
        CanaryCommand::Abort {
            cell,
            place,
            reason,
            out,
        } => {
            let place = place.resolve(target)?;
            let (revision, ms) = runtime()?.block_on(driver::abort(&place, &cell, &reason))?;
            match out.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"cell": cell, "aborted": true, "revision": revision, "propagation_ms": ms})
                ),
                Output::Text => println!(
                    "aborted: cell {cell}'s green share is 0 %{}{}",
                    revision
                        .map(|r| format!(" (rules revision {r})"))
                        .unwrap_or_else(|| " (it was already)".into()),
                    ms.map(|m| format!("; every gateway ran it {m} ms later"))
                        .unwrap_or_default()
                ),
            }
            Ok(())
        }
        CanaryCommand::Pause { cell, place } => {
            let p = runtime()?.block_on(driver::pause(&place.resolve(target)?, &cell))?;
            println!("{}", p.summary(now_ms()));
            Ok(())
        }
        CanaryCommand::Resume { cell, place, out } => {
            let mut emit = printer(out.output);
            let place = place.resolve(target)?;
            let ended = runtime()?.block_on(driver::resume(&place, &cell, &mut emit));
            match ended {
                Ok(None) => {
                    println!("resumed: the pipeline's running driver goes on");
                    Ok(())
                }
                Ok(Some(e)) => ending(e),
                Err(e) => failed(e),
            }
        }
        CanaryCommand::Exposure {
            cell,
            place,
            users,
            steps,
            out,
        } => {
            let steps = Plan::parse_steps(&steps).map_err(anyhow::Error::msg)?;
            let e = exposure_of(&place.resolve(target)?, &cell, &users, &steps)?;
            match out.output {
                Output::Json => println!("{}", serde_json::to_string(&e)?),
                Output::Text => {
                    println!(
                        "cell {}: {} of the listed users ({} pinned by overrides)",
                        e.cell,
                        e.users_in_cell,
                        e.pinned.len()
                    );
                    for s in &e.steps {
                        println!(
                            "{:>7}: {} on green, {} moved here: {}",
                            s.green,
                            s.on_green,
                            s.newly.len(),
                            s.newly.join(" ")
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

fn exposure_of(
    place: &Where,
    cell: &str,
    users: &Path,
    steps: &[u32],
) -> Result<routing_rules::canary::exposure::Exposure> {
    let text = runtime()?.block_on(driver::rules_text(place))?;
    let table = routing_rules::RoutingTable::compile(
        routing_rules::parse_rules(&text).map_err(|e| anyhow::anyhow!("invalid rules: {e}"))?,
        0,
    )
    .map_err(|e| anyhow::anyhow!("invalid rules: {e}"))?;
    if !table.rules().cells.contains_key(cell) {
        bail!("unknown cell {cell:?}");
    }
    let list = std::fs::read_to_string(users)
        .with_context(|| format!("cannot read {}", users.display()))?;
    let users: Vec<String> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    exposure(&table, cell, &users, steps).map_err(anyhow::Error::msg)
}

fn run(a: RunArgs, target: &Target) -> Result<()> {
    let steps = Plan::parse_steps(&a.steps).map_err(anyhow::Error::msg)?;
    for (name, v) in [
        ("--max-error-ratio", a.max_error_ratio),
        ("--max-p99-ratio", a.max_p99_ratio),
    ] {
        if !(v.is_finite() && v >= 1.0) {
            bail!("{name} {v}: must be a number of at least 1 (green may be that many times worse than blue)");
        }
    }
    if a.min_requests == 0 {
        bail!("--min-requests must be above 0: a canary never passes without traffic");
    }
    let plan = Plan {
        steps,
        hold_ms: a.hold.as_millis() as u64,
        interval_ms: a.interval.as_millis() as u64,
        thresholds: Thresholds {
            max_error_ratio: a.max_error_ratio,
            max_p99_ratio: a.max_p99_ratio,
            min_requests: a.min_requests,
        },
        max_wait_ms: a.max_wait.as_millis() as u64,
    };
    let place = a.place.resolve(target)?;
    if a.dry_run {
        return dry_run(&a, &place, &plan);
    }
    if a.users.is_some() {
        bail!("--users is for --dry-run (and `cellctl canary exposure`)");
    }
    let req = RunRequest {
        place,
        cell: a.cell,
        plan,
        metrics: a.metrics,
        prometheus: a.prometheus,
        hooks: Hooks {
            on_step: a.on_step,
            on_abort: a.on_abort,
            gate: a.gate,
        },
    };
    let mut emit = printer(a.out.output);
    match runtime()?.block_on(driver::run(req, &mut emit)) {
        Ok(e) => ending(e),
        Err(e) => failed(e),
    }
}

fn dry_run(a: &RunArgs, place: &Where, plan: &Plan) -> Result<()> {
    let exposed = match &a.users {
        Some(users) => Some(exposure_of(place, &a.cell, users, &plan.steps)?),
        None => None,
    };
    let mut prev = 0;
    let mut rows = Vec::new();
    for (i, &s) in plan.steps.iter().enumerate() {
        rows.push(serde_json::json!({
            "step": i,
            "green": format_percent(s),
            "moves_share": format_percent(s - prev),
            "moves_users": exposed.as_ref().map(|e| e.steps[i].newly.len()),
            "on_green_users": exposed.as_ref().map(|e| e.steps[i].on_green),
            "hold_ms": plan.hold_ms,
        }));
        prev = s;
    }
    let least = plan.least_duration();
    match a.out.output {
        Output::Json => println!(
            "{}",
            serde_json::json!({"cell": a.cell, "dry_run": true, "steps": rows,
                "users_in_cell": exposed.as_ref().map(|e| e.users_in_cell),
                "least_duration_ms": least.as_millis() as u64, "thresholds": plan.thresholds})
        ),
        Output::Text => {
            println!("canary of cell {} (dry run, nothing changed):", a.cell);
            for r in &rows {
                let users = match (&r["moves_users"], &exposed) {
                    (serde_json::Value::Number(n), Some(e)) => {
                        format!(" — {n} of the {} listed users", e.users_in_cell)
                    }
                    _ => String::new(),
                };
                println!(
                    "  step {}: green {}, moves {} of the cell's users from blue to green{users}; held {}",
                    r["step"],
                    r["green"].as_str().unwrap_or_default(),
                    r["moves_share"].as_str().unwrap_or_default(),
                    humantime::format_duration(Duration::from_millis(plan.hold_ms))
                );
            }
            println!(
                "at least {} (each step's hold, plus propagation and waiting for {} requests per colour); aborts when green's error ratio is above {} × blue's or its p99 above {} × blue's",
                humantime::format_duration(least),
                plan.thresholds.min_requests,
                plan.thresholds.max_error_ratio,
                plan.thresholds.max_p99_ratio
            );
        }
    }
    Ok(())
}

/// Prints events as they happen: one JSON line each, or a line for people.
fn printer(output: Output) -> impl FnMut(&Event) + Send + Sync {
    move |e: &Event| match output {
        Output::Json => {
            if let Ok(line) = serde_json::to_string(e) {
                println!("{line}");
            }
        }
        Output::Text => println!("{}", describe(e)),
    }
}

fn describe(e: &Event) -> String {
    match e {
        Event::StepStarted {
            cell,
            step,
            green,
            revision,
        } => format!("step {step}: cell {cell} green {green} (rules revision {revision})"),
        Event::Propagated { ms, gateways, .. } => {
            format!("  every gateway ({gateways}) runs it after {ms} ms")
        }
        Event::Gated { answer, .. } => format!("  gate: {answer}; the step waits"),
        Event::Judged {
            window_ms,
            judgement: j,
            ..
        } => format!(
            "  {:.1} s: {:?} — green {} req, {:.2} % errors, p99 {}; blue {} req, {:.2} % errors, p99 {}{}",
            *window_ms as f64 / 1000.0,
            j.verdict,
            j.green.requests,
            j.green.error_ratio * 100.0,
            ms(j.green.p99_ms),
            j.blue.requests,
            j.blue.error_ratio * 100.0,
            ms(j.blue.p99_ms),
            if j.reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", j.reasons.join("; "))
            }
        ),
        Event::Passed { step, green } => format!("step {step}: green {green} passed"),
        Event::Failed { step, reasons } => format!("step {step} FAILED: {}", reasons.join("; ")),
        Event::Aborted {
            cell,
            reason,
            propagation_ms,
            ..
        } => format!(
            "aborted: cell {cell}'s green share is 0 %{} — {reason}",
            propagation_ms
                .map(|m| format!(" (every gateway ran it {m} ms later)"))
                .unwrap_or_default()
        ),
        Event::Finished { cell, green } => format!("promoted: cell {cell} green {green}"),
    }
}

fn ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1} ms"))
        .unwrap_or_else(|| "-".into())
}

fn ending(e: Ending) -> Result<()> {
    match e {
        Ending::Promoted => Ok(()),
        Ending::Aborted(_) => Err(Exit(1).into()),
    }
}

fn failed(e: anyhow::Error) -> Result<()> {
    eprintln!("cellctl: {}", routing_rules::error::report(&e));
    Err(Exit(2).into())
}
