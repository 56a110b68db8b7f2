//! Payments benchmark: one cell agent (release build, its own process, a
//! real SQLite file with durable commits) and a load generator on the same
//! 2-core machine. Each payment is two HTTP calls, `POST /v1/orders` then
//! `POST /v1/orders/{id}/pay`; its latency is the time for both.
//!
//!   cargo bench -p cell-agent --bench payments
//!   PAYMENTS_SECONDS=10 PAYMENTS_WORKERS=24 cargo bench -p cell-agent --bench payments
//!   PAYMENTS_JOURNAL=1 cargo bench -p cell-agent --bench payments   # with --journal
//!
//! Loopback only; bounded by PAYMENTS_SECONDS. Figures: docs/benchmarks.md.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` does not: run briefly then.
    let quick = !std::env::args().any(|a| a == "--bench");
    let seconds = if quick {
        1
    } else {
        env_or("PAYMENTS_SECONDS", 10)
    };
    let workers = env_or("PAYMENTS_WORKERS", 24) as usize;
    // PAYMENTS_JOURNAL=1: the agent journals its batches (for a replica).
    let journal = env_or("PAYMENTS_JOURNAL", 0) == 1;
    let users = 1000usize;

    let dir = std::env::temp_dir().join(format!("cellgate-payments-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = dir.join("rules.toml");
    std::fs::write(
        &rules,
        "revision = 1\nslots = 100\n[cells.cell-a]\nblue = [\"127.0.0.1:9\"]\n[[ranges]]\nfrom = 0\nto = 99\ncell = \"cell-a\"\n",
    )
    .unwrap();
    let db = dir.join("cell-a.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cell-agent"))
        .args([
            "serve",
            "--cell",
            "cell-a",
            "--colour",
            "blue",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--db")
        .arg(&db)
        .arg("--rules")
        .arg(&rules)
        .args(journal.then_some("--journal"))
        .env("CELL_AGENT_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cell-agent");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line.trim().trim_start_matches("listening on ").to_string();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (elapsed, latencies) = rt.block_on(async move {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(workers)
            .build_http();
        let post = move |path: String, user: String, body: String| {
            let client = client.clone();
            let addr = addr.clone();
            async move {
                let req = http::Request::post(format!("http://{addr}{path}"))
                    .header("x-user-id", user)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body)))
                    .unwrap();
                let resp = client.request(req).await.expect("request");
                let status = resp.status();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                (status, body)
            }
        };
        // Fund the users.
        for u in 0..users {
            let (s, b) = post(
                format!("/v1/accounts/u{u}/deposit"),
                format!("u{u}"),
                format!(r#"{{"amount": 1000000000, "idempotency_key": "fund-{u}"}}"#),
            )
            .await;
            assert!(s.is_success(), "{s} {b:?}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..workers {
            let stop = stop.clone();
            let post = post.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let u = (w + i * workers) % users;
                    let t0 = Instant::now();
                    let (s, b) = post(
                        "/v1/orders".into(),
                        format!("u{u}"),
                        format!(
                            r#"{{"user": "u{u}", "amount": 1250, "merchant": "m-1", "idempotency_key": "w{w}-{i}"}}"#
                        ),
                    )
                    .await;
                    assert_eq!(s.as_u16(), 201, "{b:?}");
                    let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
                    let id = v["id"].as_str().unwrap().to_string();
                    let (s, b) = post(format!("/v1/orders/{id}/pay"), format!("u{u}"), String::new()).await;
                    assert_eq!(s.as_u16(), 200, "{b:?}");
                    lat.push(t0.elapsed());
                    i += 1;
                }
                lat
            }));
        }
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        (start.elapsed(), all)
    });
    let _ = child.kill();
    let _ = child.wait();
    let mut lat = latencies;
    lat.sort();
    let n = lat.len();
    let pct = |p: f64| lat[((n as f64 * p) as usize).min(n - 1)].as_secs_f64() * 1000.0;
    println!(
        "payments: {n} in {:.1} s = {:.0} payments/s ({:.0} HTTP requests/s); payment latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {workers} workers",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        2.0 * n as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    let report = cell_agent::check::check(&db).expect("check");
    println!(
        "check: {} (balance total {}, {} orders)",
        if report.ok() { "ok" } else { "VIOLATIONS" },
        report.balance_total,
        report.orders
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(report.ok(), "{:?}", report.violations);
}
