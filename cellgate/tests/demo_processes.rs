//! `cellgate demo --processes`: every agent its own process with a pid
//! file; stopping both of a cell's agents fails the cell over through the
//! gateway's health checks (the SRE tour), and Ctrl-C (SIGTERM) stops every
//! process it started. Runs the real binary.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn alive(pid: u32) -> bool {
    // A zombie (exited, not yet reaped by its parent) is not running.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.split(") ")
                .nth(1)
                .is_some_and(|rest| rest.starts_with('Z'))
        })
        .unwrap_or(false)
}

fn pid_of(dir: &Path, name: &str) -> u32 {
    std::fs::read_to_string(dir.join("pids").join(format!("{name}.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn get(url: &str, user: Option<&str>) -> (u16, serde_json::Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use http_body_util::BodyExt;
        let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let mut req = http::Request::get(url);
        if let Some(u) = user {
            req = req.header("x-user-id", u);
        }
        let resp = client
            .request(req.body(http_body_util::Full::default()).unwrap())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    })
}

/// Stops the demo (SIGINT, as Ctrl-C) if the test ends early, so its agent
/// processes do not outlive it.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-INT", &self.0.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
        }
    }
}

#[test]
fn stopping_both_agents_of_a_cell_fails_it_over_and_ctrl_c_stops_every_process() {
    let dir = std::env::temp_dir().join(format!("cellgate-demo-procs-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut demo = Command::new(env!("CARGO_BIN_EXE_cellgate"))
        .args(["demo", "--processes", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(demo.stdout.take().unwrap());
    // Its log, line by line, to a channel.
    let (log_tx, log_rx) = std::sync::mpsc::channel::<String>();
    let err = demo.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("demo: {line}");
            if log_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut demo = Running(demo);
    let mut banner = String::new();
    while !banner.contains("Press Ctrl-C") {
        let mut line = String::new();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the demo ended: {banner}"
        );
        banner.push_str(&line);
    }
    let field = |name: &str| {
        banner
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .map(|rest| rest.trim().trim_start_matches("http://").to_string())
            .unwrap_or_else(|| panic!("{name} in {banner}"))
    };
    let proxy = field("gateway");
    let admin = field("admin").replace("/admin/health", "");
    let names: Vec<String> = ["cell-a", "cell-b", "cell-c"]
        .iter()
        .flat_map(|c| ["blue", "green"].map(|col| format!("{c}-{col}")))
        .collect();
    let pids: Vec<u32> = names.iter().map(|n| pid_of(&dir, n)).collect();
    assert!(pids.iter().all(|p| alive(*p)), "{pids:?}");
    assert_ne!(pids[0], std::process::id());
    // bob's home is cell-a (docs/hash.md); served there while it is up.
    let (status, body) = get(&format!("http://{proxy}/v1/accounts/bob"), Some("bob"));
    assert_eq!(
        (status, body["balance"].as_i64()),
        (200, Some(100_000)),
        "{body}"
    );
    assert!(banner.contains("kill $(cat "), "{banner}");

    // A rules change is logged with what it changed.
    let rules = dir.join("rules.toml");
    let text = std::fs::read_to_string(&rules).unwrap();
    let (text, _) =
        routing_rules::edit::bump_revision(&text.replace(r#"green = "50%""#, r#"green = "25%""#))
            .unwrap();
    std::fs::write(&rules, text).unwrap();
    let line = loop {
        let line = log_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("a 'rules installed' log line");
        if line.contains("rules installed") {
            break line;
        }
    };
    assert!(line.contains("cell-b: green 50% → 25%"), "{line}");

    // The tour: stop both of cell-a's agents.
    for pid in &pids[..2] {
        assert!(Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap()
            .success());
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, health) = get(&format!("http://{admin}/admin/health"), None);
        if health["cells"]["cell-a"]["serving_cell"] == "cell-b" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cell-a never failed over: {health}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // cell-b holds only a replica of bob's wallet: it refuses him (421),
    // the gateway holds the request for newer rules (--hold-ms), then
    // answers 503 shard_moving — never another cell's copy of his money.
    let (status, body) = get(&format!("http://{proxy}/v1/accounts/bob"), Some("bob"));
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("shard_moving")),
        "{body}"
    );

    // Ctrl-C: every process it started stops, the demo exits 0.
    assert!(Command::new("kill")
        .args(["-INT", &demo.0.id().to_string()])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = demo.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the demo did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    for (name, pid) in names.iter().zip(&pids) {
        assert!(!alive(*pid), "{name} ({pid}) still runs");
    }
    // An explicit --data-dir is kept (its databases stay to inspect).
    assert!(dir.join("cell-a.db").exists());
    let _ = std::fs::remove_dir_all(&dir);
}
