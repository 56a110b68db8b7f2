//! `cellgate demo --processes`: the same demo with every cell agent in its
//! own process (this binary's hidden `cell-agent` subcommand, which is
//! `cell-agent serve`), each with a pid file, so an SRE can stop both of a
//! cell's agents, watch the gateway fail the cell over by its health
//! checks, and start them again — as the README's SRE tour describes. The
//! gateway runs in this process. Ctrl-C stops everything.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use routing_rules::Colour;

use super::start::{
    data_dir_for, demo_rules, gateway_config, start_gateway, wait_replicated, write_secret,
};
use super::{seed_through, DemoConfig, DEMO_CELLS};

/// One agent process.
struct AgentProcess {
    cell: &'static str,
    colour: Colour,
    proc: crate::topology::Proc,
}

/// What the demo started (stopped again on failure and at the end).
#[derive(Default)]
struct Processes {
    agents: Vec<AgentProcess>,
    gateway: Option<gateway::RunningGateway>,
    created_dir: Option<PathBuf>,
    temporary: Option<PathBuf>,
}

impl Processes {
    async fn stop(self) {
        if let Some(g) = self.gateway {
            g.shutdown().await;
        }
        for mut a in self.agents {
            a.proc.stop().await;
        }
        if let Some(dir) = self.created_dir.or(self.temporary) {
            super::start::remove_dir(&dir).await;
        }
    }
}

/// The arguments of `cell-agent serve` for one agent of the demo.
fn agent_args(dir: &Path, cell: &str, colour: Colour, listen: &str, internal: &str) -> Vec<String> {
    let path = |p: PathBuf| p.display().to_string();
    [
        "cell-agent",
        "--cell",
        cell,
        "--colour",
        colour.as_str(),
        "--db",
        &path(dir.join(format!("{cell}.db"))),
        "--rules",
        &path(dir.join("rules.toml")),
        "--listen",
        listen,
        "--internal-listen",
        internal,
        "--internal-secret-file",
        &path(dir.join("internal-secret")),
        "--journal",
        "--drain-timeout-ms",
        "5000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Starts one agent process on `addr` and `internal` (this binary's
/// hidden `cell-agent` subcommand, with a log and a pid file) and waits
/// until it says it listens.
async fn spawn_agent(
    dir: &Path,
    (cell, colour): (&'static str, Colour),
    addr: SocketAddr,
    internal: SocketAddr,
) -> anyhow::Result<AgentProcess> {
    std::fs::create_dir_all(dir.join("logs"))?;
    std::fs::create_dir_all(dir.join("pids"))?;
    let file = format!("{cell}-{}", colour.as_str());
    let mut proc = crate::topology::Proc::new(
        format!("the {cell} {} agent", colour.as_str()),
        Some(cell.to_string()),
        agent_args(dir, cell, colour, &addr.to_string(), &internal.to_string()),
        "internal listening on ",
        (dir, &file),
        addr,
    );
    proc.start().await?;
    Ok(AgentProcess { cell, colour, proc })
}

/// Runs `cellgate demo --processes` until Ctrl-C.
pub async fn run(cfg: &DemoConfig) -> anyhow::Result<u8> {
    anyhow::ensure!(
        cfg.etcd.is_none() && !cfg.smoke,
        "--processes runs the demo (rules in a file) until Ctrl-C; it does not combine with --etcd or --smoke"
    );
    let mut started = Processes::default();
    let dir = match start(cfg, &mut started).await {
        Ok(dir) => dir,
        Err(e) => {
            started.stop().await;
            return Err(e);
        }
    };
    println!("{}", banner(&dir, &started));
    // It started: an explicit --data-dir is kept at the end (a temporary
    // one is removed).
    started.created_dir = None;
    routing_rules::signal::wait_for_signal().await;
    println!("stopping...");
    started.stop().await;
    Ok(0)
}

async fn start(cfg: &DemoConfig, started: &mut Processes) -> anyhow::Result<PathBuf> {
    let (dir, temporary) = data_dir_for(cfg);
    if !dir.exists() {
        std::fs::create_dir_all(&dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        started.created_dir = Some(dir.clone());
    }
    if temporary {
        started.temporary = Some(dir.clone());
    }
    write_secret(&dir.join("internal-secret"))?;
    // Free loopback ports for every agent, so the rules name the real
    // addresses before any agent starts (each is released just before its
    // agent binds it).
    let mut ports = Vec::new();
    let mut addrs: BTreeMap<(String, Colour), SocketAddr> = BTreeMap::new();
    let mut internal: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    for cell in DEMO_CELLS {
        for colour in Colour::ALL {
            let (a, i) = (
                std::net::TcpListener::bind("127.0.0.1:0")?,
                std::net::TcpListener::bind("127.0.0.1:0")?,
            );
            addrs.insert((cell.to_string(), colour), a.local_addr()?);
            internal
                .entry(cell.to_string())
                .or_default()
                .push(i.local_addr()?);
            ports.push(((cell, colour), a, i));
        }
    }
    let rules_path = dir.join("rules.toml");
    std::fs::write(&rules_path, demo_rules(&addrs, &internal)?)?;
    for (who, a, i) in ports {
        let (addr, int) = (a.local_addr()?, i.local_addr()?);
        drop((a, i));
        let agent = spawn_agent(&dir, who, addr, int).await?;
        started.agents.push(agent);
    }
    let agents: Vec<(String, Colour, SocketAddr)> = started
        .agents
        .iter()
        .map(|a| (a.cell.to_string(), a.colour, a.proc.addr))
        .collect();
    let gw_cfg = gateway_config(cfg, rules_path.clone());
    let gateway = start_gateway(&mut started.gateway, gw_cfg, &agents).await?;
    wait_replicated(&rules_path).await?;
    seed_through(gateway.proxy_addr).await?;
    Ok(dir)
}

fn banner(dir: &Path, p: &Processes) -> String {
    let Some(gw) = &p.gateway else {
        return String::new();
    };
    let (proxy, admin) = (gw.proxy_addr, gw.admin_addr);
    let mut s = format!(
        "cellgate demo --processes: 1 gateway (this process), 3 cells x 2 colours of cell agents as processes, data in {}\n\n  gateway  http://{proxy}\n  admin    http://{admin}/admin/health\n\n",
        dir.display()
    );
    for a in &p.agents {
        s.push_str(&format!(
            "  {:<7} {:<5}  http://{}  pid {}  ({})\n",
            a.cell,
            a.colour.as_str(),
            a.proc.addr,
            a.proc.pid().unwrap_or(0),
            a.proc.pid_file.display()
        ));
    }
    let pids = |cell: &str| {
        p.agents
            .iter()
            .filter(|a| a.cell == cell)
            .map(|a| a.proc.pid_file.display().to_string())
            .collect::<Vec<_>>()
            .join(" ")
    };
    s.push_str(&format!(
        "\nStop both of cell-a's agents; the gateway's health checks fail cell-a's users over to cell-b (failover_policy = \"auto\"), which refuses them 421 (their wallets are in cell-a's database): the gateway holds each request for newer rules (--hold-ms), then answers 503 shard_moving. To serve them from cell-b's copy, fail the shard over: cellctl failover cell-a --to cell-b --rules {rules} --internal-secret-file {secret}\n\n  kill $(cat {})\n  curl -s http://{admin}/admin/health\n  curl -s -H 'x-user-id: bob' http://{proxy}/v1/accounts/bob\n  curl -s http://{admin}/metrics | grep cellgate_failovers_total\n\nStart them again (same addresses); cell-a's users come home:\n\n",
        pids("cell-a"),
        rules = dir.join("rules.toml").display(),
        secret = dir.join("internal-secret").display(),
    ));
    for a in p.agents.iter().filter(|a| a.cell == "cell-a") {
        s.push_str(&format!("  {} &\n", a.proc.command_line()));
    }
    s.push_str(&format!(
        "\nAgent logs: {}\nPress Ctrl-C to stop everything.\n",
        dir.join("logs").display()
    ));
    s
}
