//! `cellgate`: the edge gateway of a unitized (multi-cell) deployment, and
//! (feature `demo`, on by default) the whole system on one machine. The
//! gateway itself is the `gateway` library; the demo lives in `chaos`
//! (see docs/architecture.md, "Crates").

use std::process::ExitCode;

// The proxy allocates a few small buffers per request; mimalloc's
// thread-local free lists cost a fraction of glibc malloc's (measured with
// bench/proxy.sh, see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use gateway::ServeConfig;

/// cellgate — routes every request to its user's home cell and colour.
///
/// Each request's user key (by default the x-user-id header) is hashed to a
/// slot; the rules' slot table names the home cell; failover, blue/green
/// splits and per-user overrides decide the rest (see docs/gateway.md and
/// docs/rules.md).
#[derive(Debug, Parser)]
#[command(name = "cellgate", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway: proxy listener + admin listener, rules file watched.
    Serve(Box<ServeConfig>),
    /// Run everything on this machine: a gateway and 3 cells x 2 colours of
    /// cell agents with their own SQLite files, each cell's shard
    /// replicated to its standby, until Ctrl-C; the rules in a file, or in
    /// etcd with --etcd. With --smoke, run a bounded workload and a
    /// switchover/failover drill, check them, and exit 0 or 1.
    #[cfg(feature = "demo")]
    Demo(chaos::demo::DemoConfig),
    /// `cell-agent serve`, built into this binary: what `cellgate demo
    /// --processes` runs each agent as.
    #[cfg(feature = "demo")]
    #[command(name = "cell-agent", hide = true)]
    CellAgent(Box<cell_agent::AgentConfig>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own guide; keep its logs to warnings by default,
    // but say what each rules change changed (the gateway's reload line).
    let default_level = match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo(_) => "warn,gateway::control=info",
        _ => "info",
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
        #[cfg(feature = "demo")]
        Command::Demo(cfg) => {
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(chaos::demo::run(cfg)));
            match result {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("cellgate demo: {}", routing_rules::error::report(&e));
                    ExitCode::from(1)
                }
            }
        }
        #[cfg(feature = "demo")]
        Command::CellAgent(cfg) => match cell_agent::server::serve_until_signal(*cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cellgate cell-agent: {}", routing_rules::error::report(&e));
                ExitCode::from(1)
            }
        },
        Command::Serve(cfg) => match gateway::server::serve_until_signal(*cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cellgate: {}", routing_rules::error::report(&e));
                ExitCode::from(1)
            }
        },
    }
}
