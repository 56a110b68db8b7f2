//! `cellchaos`: failover drills for cellgate (see docs/drills.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use chaos::scenario::{Expect, Scenario, BUILT_IN};
use clap::{Parser, Subcommand, ValueEnum};

/// cellchaos — proves what a failover drill did to the money.
///
/// `drill` starts a topology of real processes (a gateway, cells x blue and
/// green cell agents, each shard replicated to its standby), runs a
/// recording client and a scenario's faults on a timeline, undoes every
/// fault, checks that no acknowledged write was lost, doubled or reordered
/// and that money was conserved, and writes report.md, report.json and
/// timeline.svg with the time to detect and to recover (RTO) of every
/// affected cell. `check` verifies the invariants of a stopped topology's
/// SQLite files. `list` shows the built-in scenarios.
///
/// Exit codes: 0 every invariant held and every bound was met; 1 an
/// invariant or a bound failed; 2 the drill or check could not run.
#[derive(Debug, Parser)]
#[command(name = "cellchaos", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a drill: SCENARIO is a scenario file (TOML, docs/drills.md) or
    /// the name of a built-in one (`cellchaos list`).
    Drill {
        /// A scenario file, or a built-in scenario's name.
        scenario: String,
        /// Another seed (same seed: same workload, same fault schedule).
        #[arg(long)]
        seed: Option<u64>,
        /// Where the report and the topology's files go (default
        /// `cellchaos-NAME-SEED` in the current directory); must not hold
        /// a previous drill's `data`.
        #[arg(long, value_name = "DIR")]
        report_dir: Option<PathBuf>,
        /// Another workload duration, e.g. `30s` (every step must still
        /// end within it).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Run against a topology someone else started, described by this
        /// attach file (TOML: gateway, admin, rules, data_dir, each
        /// process's pid file and how to start it again; `cellchaos up`
        /// writes one). Its processes are faulted through their pid files
        /// and left running; link faults are refused.
        #[arg(long, value_name = "FILE")]
        attach: Option<PathBuf>,
    },
    /// Start a scenario's topology and keep it running until Ctrl-C (or
    /// SIGTERM): real processes on free loopback ports, files in DIR, and
    /// DIR/attach.toml for `cellchaos drill SCENARIO --attach`.
    Up {
        /// A scenario file, or a built-in scenario's name (its topology).
        scenario: String,
        /// Where the topology's files go (must not exist yet).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
    },
    /// The built-in scenarios, one line each (expected-to-fail ones are
    /// marked with the reason).
    List,
    /// The offline invariants on a stopped topology's files: every `*.db`
    /// under DIR (and its direct subdirectories), e.g. a drill's
    /// `REPORT_DIR/data` or `cellgate demo --data-dir DIR` after Ctrl-C.
    Check {
        /// The topology's data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// `cell-agent serve`, built in: what a drill runs each agent as.
    #[command(name = "cell-agent", hide = true)]
    CellAgent(Box<cell_agent::AgentConfig>),
    /// `cellgate serve`, built in: what a drill runs the gateway as.
    #[command(name = "gateway", hide = true)]
    Gateway(Box<gateway::ServeConfig>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::CellAgent(_) | Command::Gateway(_) => "info",
        _ => "info,gateway=warn,cell_agent=warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELLGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Check { data_dir, output } => check(&data_dir, output),
        Command::List => {
            for (name, text) in BUILT_IN {
                match Scenario::parse(text) {
                    Ok(s) => {
                        let mark = match s.expect {
                            Expect::Pass => String::new(),
                            Expect::Fail => format!(
                                "  [expected to fail: {}]",
                                s.expect_reason.unwrap_or_default()
                            ),
                        };
                        println!("{name:<18} {}{mark}", s.description);
                    }
                    Err(e) => println!("{name:<18} (does not parse: {e})"),
                }
            }
            ExitCode::SUCCESS
        }
        Command::Drill {
            scenario,
            seed,
            report_dir,
            duration,
            attach,
        } => drill(&scenario, seed, report_dir, duration, attach),
        Command::Up { scenario, dir } => up(&scenario, &dir),
        Command::CellAgent(cfg) => served(cell_agent::server::serve_until_signal(*cfg)),
        Command::Gateway(cfg) => served(gateway::server::serve_until_signal(*cfg)),
    }
}

fn served(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cellchaos: {}", routing_rules::error::report(&e));
            ExitCode::from(1)
        }
    }
}

fn check(data_dir: &std::path::Path, output: Output) -> ExitCode {
    match chaos::offline::check_dir(data_dir) {
        Ok(report) => {
            match output {
                Output::Text => print!("{report}"),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                ),
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("cellchaos check: {e}");
            ExitCode::from(2)
        }
    }
}

/// Loads a scenario: a built-in name or a file.
fn load(scenario: &str) -> Result<(Scenario, String), String> {
    if let Some((_, text)) = BUILT_IN.iter().find(|(n, _)| *n == scenario) {
        return Scenario::parse(text)
            .map(|s| (s, scenario.to_string()))
            .map_err(|e| format!("built-in scenario {scenario}: {e}"));
    }
    let path = std::path::Path::new(scenario);
    let text = std::fs::read_to_string(path).map_err(|e| {
        let names: Vec<_> = BUILT_IN.iter().map(|(n, _)| *n).collect();
        format!(
            "{scenario}: not a built-in scenario ({}) and cannot read it as a file: {e}",
            names.join(", ")
        )
    })?;
    Scenario::parse(&text)
        .map(|s| (s, scenario.to_string()))
        .map_err(|e| format!("{scenario}: {e}"))
}

/// `cellchaos up`.
fn up(scenario: &str, dir: &std::path::Path) -> ExitCode {
    let fail = |e: String| {
        eprintln!("cellchaos up: {e}");
        ExitCode::from(2)
    };
    let (s, source) = match load(scenario) {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    if dir.exists() {
        return fail(format!(
            "{} exists: choose a new directory for the topology's files",
            dir.display()
        ));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e.to_string()),
    };
    let r: anyhow::Result<()> = rt.block_on(async {
        let mut topo = chaos::topology::Topology::start(&s, dir).await?;
        let spec = chaos::topology::attach::AttachSpec::of(&topo);
        let file = dir.join("attach.toml");
        std::fs::write(&file, toml::to_string(&spec)?)?;
        println!(
            "topology of {} up: gateway http://{}, admin http://{}, files in {}\nattach: cellchaos drill {source} --attach {}\nCtrl-C stops it.",
            s.name,
            spec.gateway,
            spec.admin,
            dir.display(),
            file.display()
        );
        routing_rules::signal::wait_for_signal().await;
        // By pid file first: a process a drill started again is not ours.
        chaos::topology::attach::stop_by_pid_files(&spec).await;
        topo.stop().await;
        Ok(())
    });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("{e:#}")),
    }
}

fn drill(
    scenario: &str,
    seed: Option<u64>,
    report_dir: Option<PathBuf>,
    duration: Option<Duration>,
    attach: Option<PathBuf>,
) -> ExitCode {
    let fail = |e: String| {
        eprintln!("cellchaos drill: {e}");
        ExitCode::from(2)
    };
    let (mut s, source) = match load(scenario) {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    if let Some(seed) = seed {
        s.seed = seed;
    }
    if let Some(d) = duration {
        s = match s.with_duration(d) {
            Ok(s) => s,
            Err(e) => return fail(e),
        };
    }
    let report_dir =
        report_dir.unwrap_or_else(|| PathBuf::from(format!("cellchaos-{}-{}", s.name, s.seed)));
    let mut replay = format!("cellchaos drill {source} --seed {}", s.seed);
    if duration.is_some() {
        replay.push_str(&format!(" --duration {}ms", s.duration.as_millis()));
    }
    replay.push_str(&format!(" --report-dir {}", report_dir.display()));
    let attach = match attach {
        Some(f) => {
            replay.push_str(&format!(" --attach {}", f.display()));
            match chaos::topology::attach::AttachSpec::load(&f) {
                Ok(spec) => Some(spec),
                Err(e) => return fail(format!("{e:#}")),
            }
        }
        None => None,
    };
    let d = chaos::drill::Drill {
        scenario: s,
        report_dir: report_dir.clone(),
        replay,
        attach,
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(e.to_string()),
    };
    match rt.block_on(d.run()) {
        Ok(report) => {
            print!("{}", report.summary());
            println!("report: {}", report_dir.join("report.md").display());
            if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(format!("{e:#}")),
    }
}
