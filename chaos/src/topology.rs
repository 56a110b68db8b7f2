//! The processes a drill starts: `cells` cells × blue and green cell
//! agents and one gateway, each a real process (this binary's hidden
//! `cell-agent` and `gateway` subcommands) on free loopback ports, with
//! its own log and pid file under the drill's directory; every cell's
//! shard replicated to its standby (the next cell); the rules in a file.
//! Links a scenario faults get a [`FaultProxy`] in front of them, named in
//! the rules in place of the real address.
//!
//! Processes keep their addresses across a kill and restart, so the rules
//! never change because of a fault. Everything is stopped by [`Topology::stop`]
//! (SIGCONT, SIGTERM, SIGKILL after 5 s), and on drop (`kill_on_drop`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use routing_rules::Colour;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::fault_proxy::{Fault, FaultProxy};
use crate::scenario::{Link, Scenario, Target};

/// How long a process may take to say where it listens, and the whole
/// topology to be ready.
const START_WITHIN: Duration = Duration::from_secs(30);

/// One process of the topology.
pub struct Proc {
    /// `cell-a/blue` or `gateway`.
    pub name: String,
    /// Its cell (`None`: the gateway).
    pub cell: Option<String>,
    args: Vec<String>,
    child: Option<Child>,
    /// The line on stdout that says it is listening.
    ready_line: &'static str,
    /// Where its pid is written (for anyone who wants to fault it by hand).
    pub pid_file: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
    /// Its public address (proxy listener for the gateway).
    pub addr: SocketAddr,
    /// Frozen with SIGSTOP.
    pub frozen: bool,
}

impl Proc {
    /// A process of this binary run with `args` (its first one the hidden
    /// subcommand), ready once a stdout line starts with `ready_line`; not
    /// started yet ([`Proc::start`]).
    pub(crate) fn new(
        name: String,
        cell: Option<String>,
        args: Vec<String>,
        ready_line: &'static str,
        (pid_file, log): (PathBuf, PathBuf),
        addr: SocketAddr,
    ) -> Proc {
        Proc {
            name,
            cell,
            args,
            child: None,
            ready_line,
            pid_file,
            log,
            addr,
            frozen: false,
        }
    }

    /// The command line that starts it (this binary and its arguments).
    pub fn command_line(&self) -> String {
        let exe = std::env::current_exe()
            .map(|e| e.display().to_string())
            .unwrap_or_else(|_| "cellchaos".into());
        std::iter::once(exe)
            .chain(self.args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// True while started (not killed or stopped).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    async fn spawn(&mut self) -> Result<()> {
        let exe = std::env::current_exe()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut child = Command::new(&exe)
            .args(&self.args)
            .env(
                "CELLGATE_LOG",
                std::env::var("CELLGATE_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", exe.display()))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready_line = self.ready_line;
        let listening = async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with(ready_line) {
                    return Ok(lines);
                }
            }
            bail!("it exited")
        };
        match tokio::time::timeout(START_WITHIN, listening).await {
            Ok(Ok(mut rest)) => {
                // Keep reading stdout so the process never blocks on it.
                tokio::spawn(async move { while let Ok(Some(_)) = rest.next_line().await {} });
            }
            _ => {
                let _ = child.kill().await;
                bail!(
                    "{} did not start on {} within {} s (see {})",
                    self.name,
                    self.addr,
                    START_WITHIN.as_secs(),
                    self.log.display()
                );
            }
        }
        std::fs::write(&self.pid_file, format!("{}\n", child.id().unwrap_or(0)))?;
        self.child = Some(child);
        self.frozen = false;
        Ok(())
    }

    async fn signal(&self, sig: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([sig, &pid.to_string()])
                .status()
                .await;
        }
    }

    /// SIGKILL; waits until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = std::fs::remove_file(&self.pid_file);
        }
        self.frozen = false;
    }

    /// SIGSTOP.
    pub async fn freeze(&mut self) {
        if self.running() && !self.frozen {
            self.signal("-STOP").await;
            self.frozen = true;
        }
    }

    /// SIGCONT.
    pub async fn thaw(&mut self) {
        if self.frozen {
            self.signal("-CONT").await;
            self.frozen = false;
        }
    }

    /// SIGTERM (a clean drain), SIGKILL after 5 s.
    pub async fn stop(&mut self) {
        self.thaw().await;
        self.signal("-TERM").await;
        if let Some(mut c) = self.child.take() {
            if tokio::time::timeout(Duration::from_secs(5), c.wait())
                .await
                .is_err()
            {
                let _ = c.kill().await;
            }
            let _ = std::fs::remove_file(&self.pid_file);
        }
    }

    /// Starts it again on the same addresses (after a kill or stop).
    pub async fn start(&mut self) -> Result<()> {
        if self.running() {
            return Ok(());
        }
        self.spawn().await
    }
}

/// A started topology.
pub struct Topology {
    /// The drill's directory (data, logs, pids, rules).
    pub dir: PathBuf,
    /// The rules file.
    pub rules: PathBuf,
    /// The cells' secret for internal calls.
    pub secret: PathBuf,
    /// Cell names.
    pub cells: Vec<String>,
    /// Agents, then the gateway last.
    pub procs: Vec<Proc>,
    /// The gateway's admin listener.
    pub admin: SocketAddr,
    /// Fault proxies by link (as the scenario names it).
    pub proxies: BTreeMap<String, Vec<FaultProxy>>,
}

/// A free loopback port below the kernel's ephemeral range: a process
/// that is killed and started again must find its port still free, and
/// the drill's own outgoing connections (thousands of them) take their
/// local ports from the ephemeral range only.
fn free_port() -> Result<SocketAddr> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            t.split_whitespace()
                .next()
                .and_then(|p| p.parse::<u16>().ok())
        })
        .unwrap_or(32_768);
    let (from, to) = (10_000u16, low.max(10_001));
    for _ in 0..200 {
        let mut b = [0u8; 2];
        getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let port = from + u16::from_le_bytes(b) % (to - from);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return Ok(l.local_addr()?);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// The rules of a drill topology: even slot ranges, each cell failing over
/// to the next ones in a ring (the next is its standby), green at 50 %.
pub fn drill_rules(
    cells: &[String],
    slots: u32,
    public: &BTreeMap<(String, Colour), SocketAddr>,
    internal: &BTreeMap<String, Vec<SocketAddr>>,
) -> String {
    let mut s = format!(
        "# written by cellchaos drill\nrevision = 1\nhash = \"xxh64\"\nslots = {slots}\n\n[key]\nsource = \"header\"\nname = \"x-user-id\"\non_missing = \"reject\"\n"
    );
    let n = cells.len();
    let list = |v: &[SocketAddr]| {
        v.iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, c) in cells.iter().enumerate() {
        let failover: Vec<String> = (1..n)
            .map(|k| format!("\"{}\"", cells[(i + k) % n]))
            .collect();
        s.push_str(&format!(
            "\n[cells.{c}]\nfailover_policy = \"auto\"\nfailover = [{}]\nblue = [{}]\ngreen = [{}]\ninternal = [{}]\nsplit = {{ green = \"50%\", seed = {} }}\n",
            failover.join(", "),
            list(&[public[&(c.clone(), Colour::Blue)]]),
            list(&[public[&(c.clone(), Colour::Green)]]),
            list(&internal[c]),
            i + 1
        ));
    }
    let per = slots / n as u32;
    for (i, c) in cells.iter().enumerate() {
        let from = per * i as u32;
        let to = if i + 1 == n {
            slots - 1
        } else {
            per * (i as u32 + 1) - 1
        };
        s.push_str(&format!(
            "\n[[ranges]]\nfrom = {from}\nto = {to}\ncell = \"{c}\"\n"
        ));
    }
    s
}

/// The links the scenario's steps fault.
fn faulted_links(s: &Scenario) -> Vec<Link> {
    let mut out: Vec<Link> = Vec::new();
    for step in &s.steps {
        if let crate::scenario::Action::Link { link, .. } = &step.action {
            if !out.contains(link) {
                out.push(link.clone());
            }
        }
    }
    out
}

impl Topology {
    /// Starts the scenario's topology in `dir` (created; must be empty or
    /// new) and waits until it can take writes. A failed start stops what
    /// it started.
    pub async fn start(s: &Scenario, dir: &Path) -> Result<Topology> {
        std::fs::create_dir_all(dir.join("logs"))
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::create_dir_all(dir.join("pids"))?;
        let cells = s.cells();
        let secret = dir.join("internal-secret");
        write_secret(&secret)?;
        let rules = dir.join("rules.toml");
        let links = faulted_links(s);

        let mut public = BTreeMap::new();
        let mut internal_real: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
        let mut agents = Vec::new();
        for c in &cells {
            for colour in Colour::ALL {
                let (addr, int) = (free_port()?, free_port()?);
                public.insert((c.clone(), colour), addr);
                internal_real.entry(c.clone()).or_default().push(int);
                agents.push((c.clone(), colour, addr, int));
            }
        }
        // Proxies: the rules name them instead of the real addresses.
        let mut proxies: BTreeMap<String, Vec<FaultProxy>> = BTreeMap::new();
        let mut named_public = public.clone();
        let mut named_internal = internal_real.clone();
        for link in &links {
            match link {
                Link::GatewayToAgent(c, col) => {
                    let p = FaultProxy::start(public[&(c.clone(), *col)]).await?;
                    named_public.insert((c.clone(), *col), p.addr());
                    proxies.insert(link.to_string(), vec![p]);
                }
                Link::Internal { to, .. } => {
                    let mut ps = Vec::new();
                    for a in &internal_real[to] {
                        ps.push(FaultProxy::start(*a).await?);
                    }
                    named_internal.insert(to.clone(), ps.iter().map(|p| p.addr()).collect());
                    proxies.insert(link.to_string(), ps);
                }
            }
        }
        let text = drill_rules(&cells, s.topology.slots, &named_public, &named_internal);
        routing_rules::parse_rules(&text).map_err(|e| anyhow::anyhow!("drill rules: {e}"))?;
        std::fs::write(&rules, &text)?;

        let path = |p: PathBuf| p.display().to_string();
        let mut procs = Vec::new();
        for (c, colour, addr, int) in agents {
            let name = format!("{c}/{}", colour.as_str());
            let file = format!("{c}-{}", colour.as_str());
            let args: Vec<String> = [
                "cell-agent",
                "--cell",
                &c,
                "--colour",
                colour.as_str(),
                "--db",
                &path(dir.join(format!("{c}.db"))),
                "--rules",
                &path(rules.clone()),
                "--listen",
                &addr.to_string(),
                "--internal-listen",
                &int.to_string(),
                "--internal-secret-file",
                &path(secret.clone()),
                "--journal",
                "--sync-timeout-ms",
                &s.topology.sync_timeout_ms.to_string(),
                "--drain-timeout-ms",
                "5000",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            procs.push(Proc::new(
                name,
                Some(c.clone()),
                args,
                "internal listening on ",
                (
                    dir.join("pids").join(format!("{file}.pid")),
                    dir.join("logs").join(format!("{file}.log")),
                ),
                addr,
            ));
        }
        let (gw, admin) = (free_port()?, free_port()?);
        let mut gw_args: Vec<String> = [
            "gateway",
            "--rules",
            &path(rules.clone()),
            "--listen",
            &gw.to_string(),
            "--admin",
            &admin.to_string(),
            "--health-interval-ms",
            &s.topology.health_interval_ms.to_string(),
            "--health-timeout-ms",
            &s.topology.health_interval_ms.min(500).to_string(),
            "--internal-secret-file",
            &path(secret.clone()),
            "--request-timeout-ms",
            "5000",
            "--drain-timeout-ms",
            "5000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(ms) = s.topology.auto_failover_after_ms {
            gw_args.extend([
                "--auto-failover".into(),
                "--auto-failover-after-ms".into(),
                ms.to_string(),
            ]);
        }
        procs.push(Proc::new(
            "gateway".into(),
            None,
            gw_args,
            "admin listening on ",
            (
                dir.join("pids").join("gateway.pid"),
                dir.join("logs").join("gateway.log"),
            ),
            gw,
        ));
        let mut t = Topology {
            dir: dir.to_path_buf(),
            rules,
            secret,
            cells,
            procs,
            admin,
            proxies,
        };
        if let Err(e) = t.start_all().await {
            t.stop().await;
            return Err(e);
        }
        Ok(t)
    }

    async fn start_all(&mut self) -> Result<()> {
        for p in &mut self.procs {
            p.start().await?;
        }
        self.wait_ready().await
    }

    /// The gateway's proxy address.
    pub fn gateway(&self) -> SocketAddr {
        self.procs.last().expect("a gateway").addr
    }

    /// The processes a target names.
    pub fn procs_mut(&mut self, target: &Target) -> impl Iterator<Item = &mut Proc> {
        let target = target.clone();
        self.procs.iter_mut().filter(move |p| match &target {
            Target::Gateway => p.cell.is_none(),
            Target::Cell(c) => p.cell.as_deref() == Some(c.as_str()),
            Target::Agent(c, col) => p.name == format!("{c}/{}", col.as_str()),
        })
    }

    /// Sets a fault on a link's proxies.
    pub fn set_link(&self, link: &Link, fault: Fault) {
        for p in self.proxies.get(&link.to_string()).into_iter().flatten() {
            p.set(fault);
        }
    }

    /// Waits until every agent answers `/readyz` 200, the gateway sees every
    /// instance up, and every shard is recorded in sync with its standby.
    pub async fn wait_ready(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + START_WITHIN;
        let client = crate::http::client();
        for p in self.procs.iter().filter(|p| p.cell.is_some()) {
            let url = format!("http://{}/readyz", p.addr);
            while crate::http::get(&client, &url).await.map(|r| r.0) != Some(200) {
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "{} was not ready within {} s (see {})",
                        p.name,
                        START_WITHIN.as_secs(),
                        p.log.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let url = format!("http://{}/admin/health", self.admin);
        loop {
            let all_up = crate::http::get(&client, &url)
                .await
                .and_then(|(_, body)| serde_json::from_slice::<serde_json::Value>(&body).ok())
                .is_some_and(|v| {
                    v["cells"].as_object().is_some_and(|cells| {
                        cells
                            .values()
                            .all(|c| c["up"]["blue"] == true && c["up"]["green"] == true)
                    })
                });
            if all_up {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the gateway's health checks did not see every instance up within {} s",
                    START_WITHIN.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.wait_in_sync(deadline).await
    }

    /// Waits until every cell's shard is recorded in sync with its standby
    /// (false at `deadline`).
    pub async fn wait_in_sync(&self, deadline: tokio::time::Instant) -> Result<()> {
        for c in &self.cells {
            let record = routing_rules::switchover::record_path(&self.rules, c);
            loop {
                let state = std::fs::read_to_string(&record)
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .map(|r| r["state"].as_str().unwrap_or("").to_string());
                if state.as_deref() == Some("in-sync") {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    bail!(
                        "cell {c}'s shard is not recorded in sync with its standby (state {}; {})",
                        state.unwrap_or_else(|| "none".into()),
                        record.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// Undoes every fault (proxies pass, frozen processes thawed, stopped
    /// processes started again).
    pub async fn heal(&mut self) -> Result<()> {
        for ps in self.proxies.values() {
            for p in ps {
                p.set(Fault::Pass);
            }
        }
        for p in &mut self.procs {
            p.thaw().await;
        }
        let mut first_err = None;
        for p in &mut self.procs {
            if let Err(e) = p.start().await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Stops every process (SIGCONT, SIGTERM, SIGKILL after 5 s).
    pub async fn stop(&mut self) {
        for ps in self.proxies.values() {
            for p in ps {
                p.set(Fault::Pass);
            }
        }
        // The gateway first (no new requests), then the agents.
        for p in self.procs.iter_mut().rev() {
            p.stop().await;
        }
    }
}

/// Writes a fresh random cluster secret for cell-to-cell calls (mode
/// 0600).
pub(crate) fn write_secret(path: &Path) -> Result<()> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no randomness for the secret: {e}"))?;
    let text: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}
