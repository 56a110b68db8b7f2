//! `cellgate serve` under a small file-descriptor limit (`ulimit -n 256`)
//! and a flood of idle HTTP/2 connections: the admin listener and normal
//! clients are still answered. The real binary, real backends, real
//! sockets.

use std::time::{Duration, Instant};

use test_util::*;

#[test]
fn a_flood_of_idle_connections_under_a_small_fd_limit_leaves_the_gateway_answering() {
    use std::io::{BufRead, BufReader, Read, Write};
    let rt = tokio::runtime::Runtime::new().unwrap();
    let topo = rt.block_on(Topology::start(1));
    let dir = TempDir::new("fdlimit");
    let path = dir.0.join("rules.toml");
    let rules = topo.rules([0, 0, 0], "");
    std::fs::write(&path, &rules).unwrap();
    let cmd = format!(
        "ulimit -n 256 && exec {} serve --rules {} --listen 127.0.0.1:0 --admin 127.0.0.1:0 --idle-timeout-ms 500 --health-interval-ms 200",
        env!("CARGO_BIN_EXE_cellgate"),
        path.display()
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &cmd])
        .env("CELLGATE_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let (mut proxy, mut admin) = (None, None);
    for line in lines.by_ref() {
        let line = line.unwrap();
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
                .map(|v| v.trim_matches('"').parse::<std::net::SocketAddr>().unwrap())
        };
        if line.contains("cellgate serving") {
            proxy = field("proxy");
            admin = field("admin");
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let (proxy, admin) = (proxy.unwrap(), admin.unwrap());
    // 300 idle HTTP/2 connections: more than the descriptors allow.
    let flood: Vec<std::net::TcpStream> = (0..300)
        .filter_map(|_| {
            let mut s = std::net::TcpStream::connect(proxy).ok()?;
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .ok()?;
            Some(s)
        })
        .collect();
    assert!(flood.len() > 200, "the flood connected");
    // The admin listener and a normal client are still answered.
    let ask = |addr: std::net::SocketAddr, path: &str, user: &str| -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: x\r\nx-user-id: {user}\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    let t = Instant::now();
    let health = ask(admin, "/healthz", "");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "admin answered in {:?}",
        t.elapsed()
    );
    let user = user_of(&rules, "cell-a", 0);
    let r = ask(proxy, &format!("/v1/accounts/{user}"), &user);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    drop(flood);
    let _ = child.kill();
    let _ = child.wait();
    drop(topo);
}
