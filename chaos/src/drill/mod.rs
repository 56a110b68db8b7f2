//! `cellchaos drill`: starts a scenario's topology, runs the recording
//! workload and the fault timeline at once, undoes every fault, stops
//! everything, checks the files and writes the report (report.md,
//! report.json, timeline.svg).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::Mutex;

use crate::scenario::Scenario;
use crate::topology::Topology;
use crate::workload::{Live, Workload};

pub mod report;
mod svg;
mod timeline;

pub use report::Report;

/// How to run a drill.
#[derive(Debug, Clone)]
pub struct Drill {
    /// The scenario (with `--seed`/`--duration` applied).
    pub scenario: Scenario,
    /// Where the report and the topology's files go.
    pub report_dir: PathBuf,
    /// The command that replays this drill (printed in the report).
    pub replay: String,
    /// Run against a topology someone else started (`--attach FILE`)
    /// instead of starting one.
    pub attach: Option<crate::topology::attach::AttachSpec>,
}

/// One health probe of the gateway: when, and what it said (revision and
/// per cell: instances up, serving cell, failed over).
#[derive(Debug, Clone)]
pub(crate) struct Probe {
    pub at_ms: u64,
    pub digest: String,
}

/// The gateway's `/admin/health` without the parts that change by
/// themselves (in-flight counts).
fn digest(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut s = format!("r{}", v["revision"]);
    for (name, c) in v["cells"].as_object()? {
        s.push_str(&format!(
            " {name}:{}{}>{}{}",
            u8::from(c["up"]["blue"] == true),
            u8::from(c["up"]["green"] == true),
            c["serving_cell"].as_str().unwrap_or("?"),
            if c["failed_over"] == true { "!" } else { "" }
        ));
    }
    Some(s)
}

/// Probes every gateway's health and the shards' replication records
/// every 100 ms until `stop` (a change in any gateway's view counts).
async fn probe(
    admins: Vec<std::net::SocketAddr>,
    (cells, mut records): (Vec<String>, crate::topology::Records),
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<Probe> {
    let client = crate::http::client();
    let urls: Vec<String> = admins
        .iter()
        .map(|a| format!("http://{a}/admin/health"))
        .collect();
    let mut out = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut known = vec![String::from("unknown"); cells.len()];
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let mut views = Vec::with_capacity(urls.len());
        for url in &urls {
            views.push(match crate::http::get(&client, url).await {
                Some((200, body)) => digest(&body).unwrap_or_else(|| "unreadable".into()),
                _ => "gateway-down".into(),
            });
        }
        let mut digest = views.join(" | ");
        for (c, last) in cells.iter().zip(known.iter_mut()) {
            // A record that cannot be read now (etcd down) is not a
            // change: the last one read stands.
            if let Some(state) = records
                .get(c)
                .await
                .and_then(|r| r["state"].as_str().map(str::to_string))
            {
                *last = state;
            }
            digest.push_str(&format!(" {c}={last}"));
        }
        out.push(Probe {
            at_ms: start.elapsed().as_millis() as u64,
            digest,
        });
    }
    out
}

/// Aborts the workload when more than `max` of one second's attempts
/// failed (at least 20 attempts); the reason is returned.
async fn watch_errors(live: Arc<Live>, max: f64, stop: Arc<AtomicBool>) -> Option<String> {
    let (mut ok0, mut bad0) = (0, 0);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let mut second = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        second += 1;
        let (ok, bad) = (
            live.ok.load(Ordering::Relaxed),
            live.failed.load(Ordering::Relaxed),
        );
        let (d_ok, d_bad) = (ok - ok0, bad - bad0);
        (ok0, bad0) = (ok, bad);
        let n = d_ok + d_bad;
        if n >= 20 && d_bad as f64 / n as f64 > max {
            stop.store(true, Ordering::Relaxed);
            return Some(format!(
                "stopped early in second {second}: {d_bad} of {n} attempts failed ({:.1} % > stop.max_error_ratio {:.1} %)",
                100.0 * d_bad as f64 / n as f64,
                100.0 * max
            ));
        }
    }
    None
}

/// Checks every shard file's own invariants (`cell-agent check`: balances
/// follow from the ledger, none negative, every order debited at most
/// once, ...) every second while the workload runs; the first violation
/// stops the workload, and its reason is returned. A check reads one
/// snapshot of a file being written (one read transaction).
async fn watch_invariants(
    data: std::path::PathBuf,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> Option<String> {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let dir = data.clone();
        let found = tokio::task::spawn_blocking(move || {
            let files = std::fs::read_dir(&dir).ok()?;
            for f in files.flatten() {
                let path = f.path();
                if path.extension().is_none_or(|e| e != "db") {
                    continue;
                }
                // A file being replaced (a snapshot installed) is skipped.
                let Ok(report) = cell_agent::check::check(&path) else {
                    continue;
                };
                if !report.ok() {
                    let name = path.file_name().unwrap_or_default().to_string_lossy();
                    let shown: Vec<&str> = report
                        .violations
                        .iter()
                        .take(3)
                        .map(String::as_str)
                        .collect();
                    return Some(format!("{name}: {}", shown.join("; ")));
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        if let Some(why) = found {
            stop.store(true, Ordering::Relaxed);
            tracing::error!(%why, "an invariant broke: stopping the workload");
            return Some(format!(
                "stopped early at {} ms: an invariant broke in {why}",
                start.elapsed().as_millis()
            ));
        }
    }
    None
}

/// Each user's home cell under the rules the drill started with.
fn home_cells(rules: &Path, users: usize) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(rules)?;
    let r = routing_rules::parse_rules(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let owners = r.slot_owners();
    let mut out = HashMap::new();
    for u in 0..users {
        let user = format!("chaos-user-{u}");
        let slot = routing_rules::hash::slot_of(r.hash, user.as_bytes(), r.slots)
            .map_err(|e| anyhow::anyhow!("{user}: {e:?}"))?;
        out.insert(user, owners[slot as usize].to_string());
    }
    Ok(out)
}

impl Drill {
    /// Runs the drill. `Err`: it could not run (exit 2); otherwise the
    /// report (already written to the report directory).
    pub async fn run(&self) -> Result<Report> {
        let s = &self.scenario;
        std::fs::create_dir_all(&self.report_dir)
            .with_context(|| format!("cannot create {}", self.report_dir.display()))?;
        let (topo, data) = match &self.attach {
            Some(spec) => {
                tracing::info!(scenario = %s.name, gateway = %spec.gateway, "attaching to a running topology");
                let topo = Topology::attach(spec, s)?;
                topo.wait_ready().await?;
                (topo, spec.data_dir.clone())
            }
            None => {
                let data = self.report_dir.join("data");
                anyhow::ensure!(
                    !data.exists(),
                    "{} exists (a drill's files): remove it or choose another --report-dir",
                    data.display()
                );
                tracing::info!(scenario = %s.name, dir = %data.display(), "starting the topology");
                (Topology::start(s, &data).await?, data)
            }
        };
        let homes = home_cells(&topo.rules, s.workload.users)?;
        let (gateways, admins) = (topo.gateways(), topo.admins.clone());
        let records = (topo.cells.clone(), topo.records());
        let topo = Arc::new(Mutex::new(topo));

        let stop = Arc::new(AtomicBool::new(false));
        let live = Arc::new(Live::default());
        let w = Workload {
            gateways,
            clients: s.workload.clients,
            duration: s.duration,
            users: s.workload.users,
            seed: s.seed,
            max_writes: s.workload.max_ops,
            retry_for: s.workload.retry_for,
            rate: s.workload.rate,
            mix: [
                s.workload.mix.deposit,
                s.workload.mix.read,
                s.workload.mix.transfer,
                s.workload.mix.payment,
                s.workload.mix.tcc,
            ],
            stop: stop.clone(),
            live: live.clone(),
        };
        tracing::info!(
            duration_ms = s.duration.as_millis() as u64,
            steps = s.steps.len(),
            "running the workload and the timeline"
        );
        let start = Instant::now();
        let probe_stop = Arc::new(AtomicBool::new(false));
        let probes = tokio::spawn(probe(admins, records, start, probe_stop.clone()));
        let watcher = s
            .max_error_ratio
            .map(|max| tokio::spawn(watch_errors(live.clone(), max, stop.clone())));
        let invariants = s
            .stop_on_invariant
            .then(|| tokio::spawn(watch_invariants(data.clone(), start, stop.clone())));
        let timeline = tokio::spawn(timeline::run(
            s.steps.clone(),
            topo.clone(),
            start,
            stop.clone(),
        ));
        let recording = crate::workload::run_from(&w, start).await;
        stop.store(true, Ordering::Relaxed);
        let events = timeline.await.context("the timeline task failed")?;
        let aborted = match watcher {
            Some(t) => t.await.ok().flatten(),
            None => None,
        };
        let aborted = match invariants {
            Some(t) => t.await.ok().flatten().or(aborted),
            None => aborted,
        };
        // Every fault undone, whatever happened; then the shards must be
        // back in sync with their standbys.
        let mut topo = Arc::try_unwrap(topo)
            .map_err(|_| anyhow::anyhow!("the timeline still holds the topology"))?
            .into_inner();
        let healed = topo.heal().await.map_err(|e| format!("{e:#}"));
        let in_sync = match healed {
            Ok(()) => topo
                .wait_in_sync(tokio::time::Instant::now() + Duration::from_secs(20))
                .await
                .map_err(|e| format!("{e:#}")),
            Err(e) => Err(format!("a process did not start again: {e}")),
        };
        // Relays drain: every cross-cell transfer credited (or failed),
        // waited for up to 20 s (what is still in flight is accounted).
        let drain_until = Instant::now() + Duration::from_secs(20);
        while crate::offline::pending_transfers(&data).unwrap_or(0) > 0
            && Instant::now() < drain_until
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Every acknowledged deposit, looked up as a user would (through
        // the gateway), before the files are.
        let api = crate::workload::check_through_api(w.gateways[0], &recording.ops).await;
        probe_stop.store(true, Ordering::Relaxed);
        let probes = probes.await.unwrap_or_default();
        if topo.attached {
            tracing::info!("leaving the attached topology running (frozen processes thawed)");
        } else {
            tracing::info!("stopping the topology");
        }
        topo.stop().await;
        // One offline check of the files: its invariants, and which copies
        // are the primaries the writes are looked up in.
        let offline = crate::offline::check_dir(&data).map_err(|e| anyhow::anyhow!("{e}"))?;
        let rpo = crate::workload::verify_copies(&offline, &recording.ops, Some(&homes))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let report = Report::build(report::Inputs {
            drill: self,
            recording: &recording,
            events: &events,
            probes: &probes,
            homes: &homes,
            rpo,
            api,
            offline,
            in_sync,
            aborted,
            data_dir: &data,
        });
        report.write(&self.report_dir)?;
        recording.write_jsonl(&self.report_dir).with_context(|| {
            format!(
                "cannot write the recording into {}",
                self.report_dir.display()
            )
        })?;
        Ok(report)
    }
}
