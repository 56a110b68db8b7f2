//! `cell-agent`: one cell's wallet and order service.

use std::path::PathBuf;
use std::process::ExitCode;

use cell_agent::AgentConfig;
use clap::{Parser, Subcommand};

/// cell-agent — serves one cell's shard of wallets and orders.
///
/// Every request's user must belong to this cell under the rules it holds
/// (else 421 naming the owning cell). Money is integer minor units; every
/// write is durable before it is acknowledged. See docs/api.md.
#[derive(Debug, Parser)]
#[command(name = "cell-agent", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the cell's API.
    Serve(Box<AgentConfig>),
    /// Verify a cell database's invariants offline (exit 1 on any violation).
    Check {
        /// The database file.
        #[arg(long, value_name = "PATH")]
        db: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the cell's cross-cell transfers that are not delivered: pending
    /// ones (with their last error; `OVERDUE` past --alert-after-ms) and
    /// failed ones (refunded, with the payee cell's refusal).
    Outbox {
        /// The database file.
        #[arg(long, value_name = "PATH")]
        db: PathBuf,
        /// Flag pending records older than this, ms.
        #[arg(long, value_name = "MS", default_value_t = 300_000)]
        alert_after_ms: i64,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// A store's slot table (`list`), and hand-over by hand: `ban` slots in
    /// the old owner's store at the new epoch, then `open` them in the new
    /// owner's (only once their data is there, or for slots that hold none).
    Slots {
        #[command(subcommand)]
        command: SlotsCommand,
    },
    /// A replica of a cell's shard: `sync` brings a replica file up to its
    /// primary's journal (a snapshot first when it is missing or too far
    /// behind), batch by batch, idempotently by LSN.
    Replica {
        #[command(subcommand)]
        command: ReplicaCommand,
    },
    /// Match every incoming credit of every cell to its sender's outbox
    /// record and every delivered record to its credit, across the shard
    /// files of the whole cluster (exit 1 on an orphan on either side).
    Reconcile {
        /// Each cell's database file (repeat: --db a.db --db b.db ...).
        #[arg(long, value_name = "PATH", required = true)]
        db: Vec<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SlotsCommand {
    /// Print the slot table: ranges with their epoch and state.
    List {
        /// The database file.
        #[arg(long, value_name = "PATH")]
        db: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ban slots at EPOCH (their next owner's epoch): once this returns, no
    /// write of an older epoch commits in this store. Prints the ban's
    /// journal position (LSN).
    Ban(SlotsStep),
    /// Open slots at EPOCH in this store (after the old owner banned them
    /// at EPOCH and their data is here).
    Open(SlotsStep),
}

#[derive(Debug, Subcommand)]
enum ReplicaCommand {
    /// Apply the primary's journal to the replica file; prints the LSN.
    Sync {
        /// The primary's database file.
        #[arg(long, value_name = "PATH")]
        from: PathBuf,
        /// The replica file (created from a snapshot when missing).
        #[arg(long, value_name = "PATH")]
        to: PathBuf,
    },
    /// A primary's replication state: its standby, in-sync or degraded
    /// since when, LSN committed and acknowledged. Exit 0 in sync, 1
    /// degraded, 2 not replicated (no record).
    Status {
        /// The primary's database file (its record is FILE.replication.json).
        #[arg(long, value_name = "PATH")]
        db: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn replica_status(db: &std::path::Path, json: bool) -> ExitCode {
    use cell_agent::replication::{read_record, record_path};
    let path = record_path(db);
    let record = match read_record(&path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "cell-agent: {}: not replicated (no readable record {}: {e})",
                db.display(),
                path.display()
            );
            return ExitCode::from(2);
        }
    };
    let committed = cell_agent::store::sqlite::open(db, true)
        .and_then(|c| cell_agent::store::sqlite::meta_ms(&c, "lsn"))
        .unwrap_or(0);
    let lag = (committed - record.acked_lsn).max(0);
    if json {
        let mut v = serde_json::to_value(&record).unwrap_or_default();
        v["committed_lsn"] = committed.into();
        v["lag_lsn"] = lag.into();
        println!("{v}");
    } else {
        println!(
            "cell {} → standby {}: {} since {} ms; committed LSN {committed}, acknowledged {} (lag {lag}); record {} ms old",
            record.cell,
            record.standby.as_deref().unwrap_or("(none)"),
            record.state,
            record.since_ms,
            record.acked_lsn,
            cell_agent::store::sqlite::unix_ms() - record.updated_ms
        );
    }
    if record.state == "in-sync" {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn replica(command: ReplicaCommand) -> ExitCode {
    let (from, to) = match command {
        ReplicaCommand::Sync { from, to } => (from, to),
        ReplicaCommand::Status { db, json } => return replica_status(&db, json),
    };
    if !from.is_file() {
        eprintln!("cell-agent: {}: no such database file", from.display());
        return ExitCode::from(1);
    }
    match cell_agent::store::sqlite::replica::sync(&from, &to) {
        Ok(report) => {
            println!("{}", serde_json::to_string(&report).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "cell-agent: cannot sync {} from {}: {e}",
                to.display(),
                from.display()
            );
            ExitCode::from(1)
        }
    }
}

#[derive(Debug, clap::Args)]
struct SlotsStep {
    /// The database file (the cell is the one recorded in it).
    #[arg(long, value_name = "PATH")]
    db: PathBuf,
    /// Slots, inclusive: FROM-TO or one SLOT.
    #[arg(long, value_name = "FROM-TO", value_parser = cell_agent::handover::parse_range)]
    slots: (u32, u32),
    /// The epoch (1..=2^53-1), above the slots' current one.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=(1u64 << 53) - 1))]
    epoch: u64,
}

fn slots(command: SlotsCommand) -> ExitCode {
    use cell_agent::handover::{self, Step};
    let (step, args) = match command {
        SlotsCommand::List { db, json } => {
            return match handover::list(&db) {
                Ok(ranges) => {
                    for r in &ranges {
                        if json {
                            println!("{r}");
                        } else {
                            println!(
                                "slots {}-{}: {} at epoch {}",
                                r["from"],
                                r["to"],
                                r["state"].as_str().unwrap_or("?"),
                                r["epoch"]
                            );
                        }
                    }
                    if !json && ranges.is_empty() {
                        println!("no slots: this store holds none");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("cell-agent: {}", routing_rules::error::report(&e));
                    ExitCode::from(1)
                }
            };
        }
        SlotsCommand::Ban(a) => (Step::Ban, a),
        SlotsCommand::Open(a) => (Step::Open, a),
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cell-agent: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(handover::step(&args.db, step, args.slots, args.epoch)) {
        Ok(reply) => {
            println!("{reply}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("cell-agent: {}", routing_rules::error::report(&e));
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CELL_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Serve(cfg) => match serve(*cfg) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("cell-agent: {}", routing_rules::error::report(&e));
                ExitCode::from(1)
            }
        },
        Command::Outbox {
            db,
            alert_after_ms,
            json,
        } => outbox(&db, alert_after_ms, json),
        Command::Reconcile { db, json } => reconcile(&db, json),
        Command::Slots { command } => slots(command),
        Command::Replica { command } => replica(command),
        Command::Check { db, json } => {
            match cell_agent::check::check(&db) {
                Ok(report) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&report).unwrap_or_default()
                        );
                    } else {
                        println!(
                        "{}: {} accounts, {} ledger entries, {} orders; total {} = in {} - out {}",
                        db.display(), report.accounts, report.ledger_entries, report.orders,
                        report.balance_total, report.money_in, report.money_out
                    );
                        for v in &report.violations {
                            println!("VIOLATION: {v}");
                        }
                        println!("{}", if report.ok() { "ok" } else { "FAILED" });
                    }
                    if report.ok() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    let why = match &e {
                        rusqlite::Error::InvalidPath(_) => "no such file".to_string(),
                        rusqlite::Error::SqliteFailure(f, _)
                            if f.code == rusqlite::ErrorCode::NotADatabase =>
                        {
                            "not a SQLite database".to_string()
                        }
                        rusqlite::Error::SqliteFailure(_, Some(m))
                            if m.starts_with("no such table") =>
                        {
                            format!("not a cell database ({m})")
                        }
                        other => other.to_string(),
                    };
                    eprintln!(
                        "cell-agent: cannot check {}: {why} (give the cell's database, the --db of `cell-agent serve`)",
                        db.display()
                    );
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn outbox(db: &std::path::Path, alert_after_ms: i64, json: bool) -> ExitCode {
    let rows = match cell_agent::reconcile::outbox(db) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cell-agent: cannot read the outbox: {e}");
            return ExitCode::from(1);
        }
    };
    for r in &rows {
        let overdue = r.state == "pending" && r.age_ms > alert_after_ms;
        if json {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["overdue"] = overdue.into();
            println!("{v}");
        } else {
            println!(
                "{} {}{} {} -> {} (cell {}) {} minor units, {} attempts, {} s old: {}",
                r.transfer_id,
                r.state,
                if overdue { " OVERDUE" } else { "" },
                r.from,
                r.to,
                r.to_cell,
                r.amount,
                r.attempts,
                r.age_ms / 1000,
                r.last_error.as_deref().unwrap_or("-")
            );
        }
    }
    if !json {
        println!("{} record(s) not delivered", rows.len());
    }
    ExitCode::SUCCESS
}

fn reconcile(dbs: &[PathBuf], json: bool) -> ExitCode {
    match cell_agent::reconcile::reconcile(dbs) {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                println!("{report}");
            }
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("cell-agent: cannot reconcile: {e}");
            ExitCode::from(2)
        }
    }
}

fn serve(cfg: AgentConfig) -> anyhow::Result<()> {
    cell_agent::server::serve_until_signal(cfg)
}
