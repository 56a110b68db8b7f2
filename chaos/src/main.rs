//! `cellchaos`: failover drills for cellgate (see docs/drills.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// cellchaos — proves what a failover drill did to the money.
///
/// `check` verifies the invariants of a stopped topology's SQLite files
/// (every shard and replica sound, one primary copy per cell, replicas not
/// ahead of it, every cross-cell credit matched with its debit).
///
/// Exit codes: 0 every invariant held; 1 an invariant failed; 2 the check
/// could not run.
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
    /// The offline invariants on a stopped topology's files: every `*.db`
    /// under DIR (and its direct subdirectories), e.g. `cellgate demo
    /// --data-dir DIR` after Ctrl-C.
    Check {
        /// The topology's data directory.
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { data_dir, output } => match chaos::offline::check_dir(&data_dir) {
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
        },
    }
}
