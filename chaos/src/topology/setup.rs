//! What a topology is set up with: free ports, the rules, the secret.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use routing_rules::Colour;

/// A free loopback port below the kernel's ephemeral range: a process
/// that is killed and started again must find its port still free, and
/// the drill's own outgoing connections (thousands of them) take their
/// local ports from the ephemeral range only. Never the same port twice
/// in one process (the ports are released until their process binds them,
/// so a second pick could otherwise land on a port already handed out).
pub(crate) fn free_port() -> Result<SocketAddr> {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let fresh = |a: SocketAddr, given: &mut Vec<u16>| {
        (!given.contains(&a.port())).then(|| {
            given.push(a.port());
            a
        })
    };
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
            if let Some(a) = fresh(l.local_addr()?, &mut given) {
                return Ok(a);
            }
        }
    }
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        if let Some(a) = fresh(a, &mut given) {
            return Ok(a);
        }
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..500 {
            let a = super::free_port().unwrap();
            assert!(a.ip().is_loopback());
            assert!(seen.insert(a.port()), "port {} handed out twice", a.port());
        }
    }
}
