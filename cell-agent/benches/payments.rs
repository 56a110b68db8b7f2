//! Payments benchmark: one cell agent (release build, its own process, a
//! real SQLite file with durable commits) and a load generator on the same
//! 2-core machine. Each payment is two HTTP calls, `POST /v1/orders` then
//! `POST /v1/orders/{id}/pay`; its latency is the time for both.
//!
//!   cargo bench -p cell-agent --bench payments
//!   PAYMENTS_SECONDS=10 PAYMENTS_WORKERS=24 cargo bench -p cell-agent --bench payments
//!   PAYMENTS_JOURNAL=1 cargo bench -p cell-agent --bench payments   # with --journal
//!   PAYMENTS_REPLICATE=1 cargo bench -p cell-agent --bench payments # and a synchronous standby
//!
//! After the figures it prints where a write's time went, from the agents'
//! own histograms over the run (means): the primary's handling of a
//! request, the store's part of it, the standby's acknowledgement after the
//! commit, and the standby's handling of a shipment.
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

/// Starts `cell-agent serve` for `cell` with an internal listener; its
/// process, public and internal addresses.
fn start_agent(
    cell: &str,
    db: &std::path::Path,
    rules: &std::path::Path,
    secret: &std::path::Path,
    extra: &[&str],
) -> (std::process::Child, String, Option<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cell-agent"))
        .args([
            "serve",
            "--cell",
            cell,
            "--colour",
            "blue",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--internal-listen", "127.0.0.1:0"])
        .arg("--internal-secret-file")
        .arg(secret)
        .arg("--db")
        .arg(db)
        .arg("--rules")
        .arg(rules)
        .args(extra)
        .env("CELL_AGENT_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start cell-agent");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let (mut addr, mut internal) = (String::new(), None);
    for _ in 0..2 {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        if let Some(a) = line.trim().strip_prefix("internal listening on ") {
            internal = Some(a.to_string());
        } else if let Some(a) = line.trim().strip_prefix("listening on ") {
            addr = a.to_string();
        }
    }
    (child, addr, internal)
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
    // PAYMENTS_JOURNAL=1: the agent journals its batches (for a replica);
    // PAYMENTS_REPLICATE=1: and ships them to a standby agent, answering
    // each payment only once the standby has it.
    let replicate = env_or("PAYMENTS_REPLICATE", 0) == 1;
    let journal = replicate || env_or("PAYMENTS_JOURNAL", 0) == 1;
    let users = 1000usize;

    let dir = std::env::temp_dir().join(format!("cellgate-payments-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = dir.join("rules.toml");
    let rules_text = |rev: u32, internal: Option<(&str, &str)>| {
        let (ia, ib) = internal.unwrap_or(("127.0.0.1:9", "127.0.0.1:10"));
        // Only a replicated run names a standby.
        let standby = if replicate {
            "standby = \"cell-b\"\n"
        } else {
            ""
        };
        format!(
            "revision = {rev}\nslots = 100\n[cells.cell-a]\nblue = [\"127.0.0.1:11\"]\n{standby}internal = [\"{ia}\"]\n[cells.cell-b]\nblue = [\"127.0.0.1:12\"]\ninternal = [\"{ib}\"]\n[[ranges]]\nfrom = 0\nto = 99\ncell = \"cell-a\"\n"
        )
    };
    std::fs::write(&rules, rules_text(1, None)).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, "payments-bench-secret-0123456789abcdef\n").unwrap();
    let db = dir.join("cell-a.db");
    let mut children = Vec::new();
    let mut standby_internal = None;
    let mut standby_metrics: Option<String> = None;
    if replicate {
        let (child, standby_addr, internal) =
            start_agent("cell-b", &dir.join("cell-b.db"), &rules, &secret, &[]);
        standby_metrics = Some(format!("http://{standby_addr}/metrics"));
        children.push(child);
        standby_internal = internal;
    }
    let extra: &[&str] = if journal { &["--journal"] } else { &[] };
    let (child, addr, internal) = start_agent("cell-a", &db, &rules, &secret, extra);
    children.push(child);
    if replicate {
        // Seed the standby's replica from a snapshot, then let both find
        // each other's internal listener.
        let out = Command::new(env!("CARGO_BIN_EXE_cell-agent"))
            .args(["replica", "sync", "--from"])
            .arg(&db)
            .arg("--to")
            .arg(dir.join("cell-a.replica.db"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (ia, ib) = (internal.unwrap(), standby_internal.unwrap());
        std::fs::write(&rules, rules_text(2, Some((&ia, &ib)))).unwrap();
        std::thread::sleep(Duration::from_millis(1_500));
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let (elapsed, latencies, stages) = rt.block_on(async move {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(workers)
            .build_http();
        let (metrics_client, metrics_url) = (client.clone(), format!("http://{addr}/metrics"));
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
        let before = scrape(&metrics_client, &metrics_url).await;
        let standby_before = match &standby_metrics {
            Some(url) => Some(scrape(&metrics_client, url).await),
            None => None,
        };
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
        let elapsed = start.elapsed();
        let after = scrape(&metrics_client, &metrics_url).await;
        let standby_after = match &standby_metrics {
            Some(url) => Some(scrape(&metrics_client, url).await),
            None => None,
        };
        let standby = standby_before.as_ref().zip(standby_after.as_ref());
        (elapsed, all, stages((&before, &after), standby))
    });
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
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
    // Where a write's time goes, from the agents' own histograms over the
    // measured run (means).
    println!("{stages}");
    let report = cell_agent::check::check(&db).expect("check");
    println!(
        "check: {} (balance total {}, {} orders)",
        if report.ok() { "ok" } else { "VIOLATIONS" },
        report.balance_total,
        report.orders
    );
    if replicate {
        let replica = cell_agent::check::check(&dir.join("cell-a.replica.db")).expect("check");
        println!(
            "standby replica: {} ({} orders, balance total {})",
            if replica.ok() { "ok" } else { "VIOLATIONS" },
            replica.orders,
            replica.balance_total
        );
        assert_eq!(
            replica.orders, report.orders,
            "every acknowledged payment is on the standby"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(report.ok(), "{:?}", report.violations);
}

/// An agent's `/metrics` as `series -> value`.
async fn scrape(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: &str,
) -> Metrics {
    let req = http::Request::get(url)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.expect("metrics");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&body)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Where a write's time goes, as means over the run from the difference
/// of two scrapes of each agent: the primary's handling of a request, the
/// store's part of it (queue, batch, commit and, replicated, the standby's
/// acknowledgement), the standby's acknowledgement after the commit (per
/// batch), and the standby's handling of a shipment.
fn stages((before, after): (&Metrics, &Metrics), standby: Option<(&Metrics, &Metrics)>) -> String {
    let mean = |(b, a): (&Metrics, &Metrics), name: &str, label: &str| {
        let total = |m: &Metrics, suffix: &str| -> f64 {
            m.iter()
                .filter(|(k, _)| {
                    let (n, labels) = k.split_once('{').unwrap_or((k.as_str(), ""));
                    n == format!("{name}{suffix}") && labels.contains(label)
                })
                .map(|(_, v)| v)
                .sum()
        };
        let (sum, count) = (
            total(a, "_sum") - total(b, "_sum"),
            total(a, "_count") - total(b, "_count"),
        );
        if count > 0.0 {
            format!("{:.2} ms (×{count:.0})", 1000.0 * sum / count)
        } else {
            "-".to_string()
        }
    };
    let mut out = format!(
        "primary: request {}, store write {}, standby ack after commit {}",
        mean((before, after), "cell_request_duration_seconds", ""),
        mean((before, after), "cell_db_write_seconds", ""),
        mean((before, after), "cellgate_replication_ack_seconds", ""),
    );
    if let Some(s) = standby {
        out.push_str(&format!(
            "; standby: shipment handled in {}",
            mean(s, "cell_request_duration_seconds", "route=\"journal\"")
        ));
    }
    out
}

type Metrics = std::collections::HashMap<String, f64>;
