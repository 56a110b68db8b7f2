//! The agent's listeners under connection pressure: a cap on open
//! connections, and a pause (not a spin) when accepting fails because the
//! process ran out of file descriptors.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;

fn get(stream: &mut TcpStream) -> std::io::Result<String> {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")?;
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_cap_wait_until_one_closes() {
    let dir = TempDir::new("cap");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let mut cfg = config("cell-a", "blue", &dir.path("a.db"), &rules);
    cfg.max_connections = 2;
    let agent = cell_agent::start(cfg, prometheus::Registry::new())
        .await
        .unwrap();
    let addr = agent.addr;
    let result = tokio::task::spawn_blocking(move || {
        let mut held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for s in &mut held {
            assert!(get(s).unwrap().starts_with("HTTP/1.1 200"));
        }
        // A third client is not served while two connections are open...
        let mut third = TcpStream::connect(addr).unwrap();
        third
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(get(&mut third).is_err(), "served beyond the cap");
        // ...and is, once one of them closes.
        held.pop();
        third
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = [0u8; 1024];
        let n = third.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    })
    .await
    .unwrap();
    assert!(result.starts_with("HTTP/1.1 200"), "{result}");
    agent.shutdown().await;
}

#[test]
fn out_of_file_descriptors_pauses_accepting_and_recovers() {
    let dir = TempDir::new("emfile");
    let rules = dir.path("rules.toml");
    std::fs::write(&rules, placeholder_rules()).unwrap();
    let cmd = format!(
        "ulimit -n 64 && exec {} serve --cell cell-a --colour blue --db {} --rules {} --listen 127.0.0.1:0",
        env!("CARGO_BIN_EXE_cell-agent"),
        dir.path("a.db").display(),
        rules.display()
    );
    let mut child = Command::new("sh")
        .args(["-c", &cmd])
        .env("CELL_AGENT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr: std::net::SocketAddr = line
        .trim()
        .trim_start_matches("listening on ")
        .parse()
        .unwrap();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let stderr = child.stderr.take().unwrap();
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    // More connections than the agent has descriptors for.
    let flood: Vec<TcpStream> = (0..120)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("accept failed"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never ran out of descriptors"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Measure how often it retries while still out of descriptors.
    let before = log.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(1_500));
    let failures = log.lock().unwrap()[before..]
        .iter()
        .filter(|l| l.contains("accept failed"))
        .count();
    assert!(
        failures <= 12,
        "{failures} accept failures in 1.5 s: it spins instead of pausing"
    );
    drop(flood);
    // Descriptors are free again: the agent serves.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ok = TcpStream::connect(addr)
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                get(&mut s)
            })
            .is_ok_and(|r| r.starts_with("HTTP/1.1 200"));
        if ok {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not recover"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
