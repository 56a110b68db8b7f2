//! One process of a drill topology: this binary (or etcd) started with
//! its arguments, its log and pid file, killed, frozen, continued, stopped
//! and started again on the same addresses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::START_WITHIN;

/// One process of the topology.
pub struct Proc {
    /// `cell-a/blue` or `gateway`.
    pub name: String,
    /// Its cell (`None`: the gateway).
    pub cell: Option<String>,
    /// The program (`None`: this binary).
    exe: Option<PathBuf>,
    args: Vec<String>,
    child: Option<Child>,
    /// How it says it is ready.
    ready: Ready,
    /// Where its pid is written (for anyone who wants to fault it by hand).
    pub pid_file: PathBuf,
    /// Its log (stderr).
    pub log: PathBuf,
    /// Its public address (proxy listener for the gateway).
    pub addr: SocketAddr,
    /// Frozen with SIGSTOP.
    pub frozen: bool,
    /// Someone else started it (`cellchaos drill --attach`): reached by its
    /// pid file, never stopped; started again (detached) only with the
    /// command the attach file gives.
    attached: Option<Vec<String>>,
    /// The network namespace it runs in (`ip netns exec NS ...`, which
    /// execs: the pid is the process's own).
    netns: Option<String>,
}

/// How a started process says it is ready.
#[derive(Debug, Clone)]
pub(crate) enum Ready {
    /// A line on its stdout starts with this.
    Line(&'static str),
    /// etcd: `GET /health` on this address says `"health":"true"`.
    EtcdHealth(SocketAddr),
}

impl Proc {
    /// A process of this binary run with `args` (its first one the hidden
    /// subcommand), ready once a stdout line starts with `ready_line`, its
    /// pid in `DIR/pids/STEM.pid` and its log in `DIR/logs/STEM.log`; not
    /// started yet ([`Proc::start`]).
    pub(crate) fn new(
        name: String,
        cell: Option<String>,
        args: Vec<String>,
        ready_line: &'static str,
        (dir, stem): (&std::path::Path, &str),
        addr: SocketAddr,
    ) -> Proc {
        let pid_file = dir.join("pids").join(format!("{stem}.pid"));
        let log = dir.join("logs").join(format!("{stem}.log"));
        Proc {
            name,
            cell,
            exe: None,
            args,
            child: None,
            ready: Ready::Line(ready_line),
            pid_file,
            log,
            addr,
            frozen: false,
            attached: None,
            netns: None,
        }
    }

    /// A process someone else started, faulted through its pid file;
    /// `command` (program and arguments) starts it again after a kill.
    pub(crate) fn attached(
        name: String,
        cell: Option<String>,
        (pid_file, log): (PathBuf, PathBuf),
        addr: SocketAddr,
        command: Vec<String>,
    ) -> Proc {
        Proc {
            name,
            cell,
            exe: None,
            args: Vec::new(),
            child: None,
            ready: Ready::Line(""),
            pid_file,
            log,
            addr,
            frozen: false,
            attached: Some(command),
            netns: None,
        }
    }

    /// The program and arguments that start it.
    pub(crate) fn argv(&self) -> Vec<String> {
        let exe = self
            .program()
            .map(|e| e.display().to_string())
            .unwrap_or_else(|_| "cellchaos".into());
        let netns = self
            .netns
            .iter()
            .flat_map(|ns| ["ip".to_string(), "netns".into(), "exec".into(), ns.clone()]);
        netns
            .chain(std::iter::once(exe))
            .chain(self.args.iter().cloned())
            .collect()
    }

    /// Runs it in network namespace `ns`.
    pub(crate) fn in_netns(mut self, ns: String) -> Proc {
        self.netns = Some(ns);
        self
    }

    /// Runs `exe` instead of this binary, ready when `ready` says so.
    pub(crate) fn with_program(mut self, exe: PathBuf, ready: Ready) -> Proc {
        self.exe = Some(exe);
        self.ready = ready;
        self
    }

    fn program(&self) -> Result<PathBuf> {
        match &self.exe {
            Some(e) => Ok(e.clone()),
            None => Ok(std::env::current_exe()?),
        }
    }

    /// The command line that starts it (the program and its arguments).
    pub fn command_line(&self) -> String {
        self.argv().join(" ")
    }

    /// Its pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        if self.attached.is_some() {
            return std::fs::read_to_string(&self.pid_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .filter(|pid: &u32| *pid > 0);
        }
        self.child.as_ref().and_then(|c| c.id())
    }

    /// True while started (not killed or stopped).
    pub fn running(&self) -> bool {
        if self.attached.is_some() {
            return self.pid().is_some_and(alive);
        }
        self.child.is_some()
    }

    async fn spawn(&mut self) -> Result<()> {
        let exe = self.program()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let mut child = command
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
        let ready = self.ready.clone();
        let started = async {
            match ready {
                Ready::Line(prefix) => {
                    while let Some(line) = lines.next_line().await? {
                        if line.starts_with(prefix) {
                            return Ok(());
                        }
                    }
                    bail!("it exited")
                }
                Ready::EtcdHealth(addr) => {
                    let client = crate::http::client();
                    let url = format!("http://{addr}/health");
                    loop {
                        let healthy = crate::http::get(&client, &url)
                            .await
                            .and_then(|(_, b)| serde_json::from_slice::<serde_json::Value>(&b).ok())
                            .is_some_and(|v| v["health"] == "true");
                        if healthy {
                            return Ok(());
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        };
        if !matches!(
            tokio::time::timeout(START_WITHIN, started).await,
            Ok(Ok(()))
        ) {
            let _ = child.kill().await;
            bail!(
                "{} did not start on {} within {} s (see {})",
                self.name,
                self.addr,
                START_WITHIN.as_secs(),
                self.log.display()
            );
        }
        // Keep reading stdout so the process never blocks on it.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
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
        if self.attached.is_some() {
            if let Some(pid) = self.pid().filter(|_| self.running()) {
                self.signal("-KILL").await;
                let until = tokio::time::Instant::now() + Duration::from_secs(5);
                while alive(pid) && tokio::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let _ = std::fs::remove_file(&self.pid_file);
            }
            self.frozen = false;
            return;
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
            let _ = std::fs::remove_file(&self.pid_file);
        }
        self.frozen = false;
    }

    /// SIGTERM to the process its pid file names, SIGKILL if it is still
    /// there 5 s later; waits until it is gone.
    pub(crate) async fn terminate(&mut self) {
        let Some(pid) = self.pid() else { return };
        self.thaw().await;
        self.signal("-TERM").await;
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        while alive(pid) && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if alive(pid) {
            self.signal("-KILL").await;
        }
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

    /// SIGTERM (a clean drain), SIGKILL after 5 s. An attached process is
    /// only thawed: it is someone else's to stop.
    pub async fn stop(&mut self) {
        self.thaw().await;
        if self.attached.is_some() {
            return;
        }
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
        match self.attached.clone() {
            Some(command) => self.spawn_detached(&command).await,
            None => self.spawn().await,
        }
    }

    /// Starts an attached process again with its command, detached (it
    /// outlives the drill, as the one it replaces would have), its output
    /// appended to its log; ready once its address takes connections.
    async fn spawn_detached(&mut self, command: &[String]) -> Result<()> {
        let Some((exe, args)) = command.split_first() else {
            bail!(
                "{} is not running and the attach file gives no command to start it again",
                self.name
            );
        };
        let log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .with_context(|| format!("cannot open {}", self.log.display()))
        };
        let child = std::process::Command::new(exe)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log()?)
            .stderr(log()?)
            .spawn()
            .with_context(|| format!("cannot start {exe}"))?;
        std::fs::write(&self.pid_file, format!("{}\n", child.id()))?;
        let until = tokio::time::Instant::now() + START_WITHIN;
        while tokio::net::TcpStream::connect(self.addr).await.is_err() {
            if tokio::time::Instant::now() >= until {
                bail!(
                    "{} did not listen on {} within {} s (see {})",
                    self.name,
                    self.addr,
                    START_WITHIN.as_secs(),
                    self.log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.frozen = false;
        Ok(())
    }
}

/// The process `pid` exists and is not a zombie (a process a drill started
/// detached and that died is one until the drill exits).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}
