//! Network namespaces for a drill topology (`topology.network =
//! "namespaces"`, root only): each cell's agents run in a namespace of
//! their own, joined by veth pairs to a bridge in a hub namespace, which a
//! last veth pair joins to the drill's own namespace (where the gateway,
//! etcd and the drill's clients run). A partition drops every packet on
//! both ends of a cell's veth pair with `tc` (a `pfifo` queue of length 0,
//! which every kernel has): established connections hang and new ones time
//! out, as in a real partition.
//!
//! Addresses come from 198.18.0.0/15 (RFC 2544, set aside for network
//! tests): subnet `198.18.K.0/24` with the drill's end at `.1` and cell
//! *i* at `.(10 + i)`. The drill's veth end, `cellchaosK`, exists once per
//! host, so creating it claims `K` (two drills never share a subnet).
//! Names carry the drill's pid: namespaces left by a drill that was killed
//! are removed by the next one.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The namespaces of one topology; removed on drop.
#[derive(Debug)]
pub struct Namespaces {
    /// The subnet's third octet.
    k: u8,
    /// Namespace names start with this (`cellchaos-PID-K-`).
    prefix: String,
    /// The cells, in order (cell *i* is `c{i}` on the bridge).
    cells: Vec<String>,
    /// Cells cut off now.
    cut: Vec<String>,
    removed: bool,
}

/// Whether this process runs as root (network namespaces need it).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Runs `ip`/`tc` with `args`; the error names the command and what it
/// printed.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("cannot run {program} (iproute2 is needed for network namespaces)")
    })?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Namespaces whose drill no longer runs (named `cellchaos-PID-...` with
/// no process PID) are deleted.
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix("cellchaos-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(
                namespace = name,
                "removing a namespace left by a drill that is gone"
            );
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

impl Namespaces {
    /// Creates the hub and one namespace per cell, linked and addressed.
    /// Needs root (`CAP_NET_ADMIN`) and iproute2.
    pub fn create(cells: &[String]) -> Result<Namespaces> {
        if !is_root() {
            bail!("cannot create the drill's network namespaces (topology.network = \"namespaces\" needs root and iproute2): this process does not run as root");
        }
        remove_stale();
        let pid = std::process::id();
        // Claim a subnet: the drill's veth end is named after it, and a
        // name exists once.
        let mut claimed = None;
        let mut last = String::new();
        for k in 1..=254u8 {
            let prefix = format!("cellchaos-{pid}-{k}-");
            let hub = format!("{prefix}hub");
            if let Err(e) = run("ip", &["netns", "add", &hub]) {
                last = e.to_string();
                if last.contains("Operation not permitted") || last.contains("cannot run") {
                    break;
                }
                continue;
            }
            let host_end = format!("cellchaos{k}");
            match run(
                "ip",
                &[
                    "link", "add", &host_end, "type", "veth", "peer", "name", "root0", "netns",
                    &hub,
                ],
            ) {
                Ok(()) => {
                    claimed = Some((k, prefix));
                    break;
                }
                Err(e) => {
                    last = e.to_string();
                    let _ = run("ip", &["netns", "del", &hub]);
                    if !last.contains("exists") {
                        break;
                    }
                }
            }
        }
        let Some((k, prefix)) = claimed else {
            bail!("cannot create the drill's network namespaces (topology.network = \"namespaces\" needs root and iproute2): {last}");
        };
        let mut ns = Namespaces {
            k,
            prefix,
            cells: cells.to_vec(),
            cut: Vec::new(),
            removed: false,
        };
        ns.wire().inspect_err(|_| ns.remove())?;
        tracing::info!(subnet = %format!("198.18.{k}.0/24"), cells = cells.len(), "network namespaces created");
        Ok(ns)
    }

    fn wire(&self) -> Result<()> {
        let hub = self.hub();
        let host_end = format!("cellchaos{}", self.k);
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &hub, "link", "set", "br0", "up"])?;
        run("ip", &["-n", &hub, "link", "set", "root0", "master", "br0"])?;
        run("ip", &["-n", &hub, "link", "set", "root0", "up"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.host()),
                "dev",
                &host_end,
            ],
        )?;
        run("ip", &["link", "set", &host_end, "up"])?;
        for (i, c) in self.cells.iter().enumerate() {
            let ns = self.of(c);
            let port = format!("c{i}");
            run("ip", &["netns", "add", &ns])?;
            run(
                "ip",
                &[
                    "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                    "netns", &hub,
                ],
            )?;
            run("ip", &["-n", &hub, "link", "set", &port, "master", "br0"])?;
            run("ip", &["-n", &hub, "link", "set", &port, "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{}/24", self.cell_ip(c)),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn hub(&self) -> String {
        format!("{}hub", self.prefix)
    }

    /// The namespace of `cell`'s agents.
    pub fn of(&self, cell: &str) -> String {
        format!("{}{cell}", self.prefix)
    }

    /// The drill's own end (the gateway and etcd listen here too, for the
    /// agents to reach them).
    pub fn host(&self) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, self.k, 1))
    }

    /// The address of `cell`'s agents.
    pub fn cell_ip(&self, cell: &str) -> IpAddr {
        let i = self.cells.iter().position(|c| c == cell).unwrap_or(0);
        IpAddr::V4(Ipv4Addr::new(198, 18, self.k, 10 + i as u8))
    }

    /// Whether `ip` is an address of these namespaces.
    pub fn owns(&self, ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V4(v) if v.octets()[..3] == [198, 18, self.k])
    }

    /// The two ends of `cell`'s link: (namespace, device).
    fn ends(&self, cell: &str) -> Result<[(String, String); 2]> {
        let i = self
            .cells
            .iter()
            .position(|c| c == cell)
            .with_context(|| format!("no namespace for cell {cell}"))?;
        Ok([
            (self.of(cell), "eth0".to_string()),
            (self.hub(), format!("c{i}")),
        ])
    }

    /// Cuts `cell` off: every packet to and from its namespace is dropped.
    pub fn cut(&mut self, cell: &str) -> Result<()> {
        for (ns, dev) in self.ends(cell)? {
            run(
                "ip",
                &[
                    "netns", "exec", &ns, "tc", "qdisc", "replace", "dev", &dev, "root", "pfifo",
                    "limit", "0",
                ],
            )?;
        }
        if !self.cut.iter().any(|c| c == cell) {
            self.cut.push(cell.to_string());
        }
        tracing::warn!(%cell, "partition: every packet to and from the cell's namespace is dropped");
        Ok(())
    }

    /// Joins `cell` again (a cell not cut off is left alone).
    pub fn join(&mut self, cell: &str) -> Result<()> {
        if !self.cut.iter().any(|c| c == cell) {
            return Ok(());
        }
        for (ns, dev) in self.ends(cell)? {
            run(
                "ip",
                &[
                    "netns", "exec", &ns, "tc", "qdisc", "del", "dev", &dev, "root",
                ],
            )?;
        }
        self.cut.retain(|c| c != cell);
        tracing::info!(%cell, "partition healed");
        Ok(())
    }

    /// Joins every cell cut off.
    pub fn join_all(&mut self) -> Result<()> {
        let mut first_err = None;
        for c in self.cut.clone() {
            if let Err(e) = self.join(&c) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Deletes the namespaces (their links go with them). Processes still
    /// inside keep theirs until they exit.
    pub fn remove(&mut self) {
        if std::mem::replace(&mut self.removed, true) {
            return;
        }
        // The drill's end first (its peer goes with it): once it is gone,
        // another drill may claim the subnet.
        let _ = run("ip", &["link", "del", &format!("cellchaos{}", self.k)]);
        for c in &self.cells {
            let _ = run("ip", &["netns", "del", &self.of(c)]);
        }
        let _ = run("ip", &["netns", "del", &self.hub()]);
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        self.remove();
    }
}
