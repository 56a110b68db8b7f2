//! The drill's report: per step the time to detect and the time to
//! recover (RTO) of every affected cell, the requests per second by
//! outcome, the checks (RPO, doubled and reordered writes, conservation,
//! the offline invariants, replication back in sync) and the bounds —
//! as report.md, report.json and timeline.svg.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use serde::Serialize;

use super::timeline::Event;
use super::{Drill, Probe};
use crate::offline::OfflineReport;
use crate::scenario::Expect;
use crate::workload::{OpKind, Outcome, Recording, RpoReport};

/// What [`Report::build`] reads.
pub(crate) struct Inputs<'a> {
    pub drill: &'a Drill,
    pub recording: &'a Recording,
    pub events: &'a [Event],
    pub probes: &'a [Probe],
    pub homes: &'a HashMap<String, String>,
    pub rpo: RpoReport,
    pub api: crate::workload::ApiCheck,
    pub offline: OfflineReport,
    pub in_sync: Result<(), String>,
    pub aborted: Option<String>,
    pub data_dir: &'a Path,
}

/// How one affected cell's users fared in one step.
#[derive(Debug, Clone, Serialize)]
pub struct CellImpact {
    /// The cell.
    pub cell: String,
    /// The longest time this cell's users went without an acknowledged
    /// write (any acknowledgement when the workload has no writes), from
    /// the fault to the end of the step's window (the fault's end + 3 s,
    /// or the next step) — a gap still open then runs to the next
    /// acknowledgement — ms: the recovery time (`None`: nothing was
    /// acknowledged after the fault).
    pub rto_ms: Option<u64>,
    /// Operations of its users due in the step's window.
    pub ops: usize,
    /// Of those, given up after their retries.
    pub failed: usize,
    /// Time from when they were due to their acknowledgement (retries
    /// included) of those operations: p50, p99, max, ms.
    pub stall_p50_ms: u64,
    /// See `stall_p50_ms`.
    pub stall_p99_ms: u64,
    /// See `stall_p50_ms`.
    pub stall_max_ms: u64,
    /// Users with an acknowledgement before and after the fault.
    pub users: usize,
    /// Per user, the gap between their last acknowledgement before the
    /// fault and their first after it: p50, p99, ms.
    pub user_gap_p50_ms: u64,
    /// See `user_gap_p50_ms`.
    pub user_gap_p99_ms: u64,
}

/// One step of the timeline in the report.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// What it did, when, and what came of it.
    #[serde(flatten)]
    pub event: Event,
    /// The first change in the gateway's health view (instances up,
    /// serving cell, failed over, rules revision) or in a shard's recorded
    /// replication state after the fault, within its window, ms after it
    /// (`None`: no change seen).
    pub detected_after_ms: Option<u64>,
    /// The affected cells.
    pub cells: Vec<CellImpact>,
}

/// Attempts in one second, by outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// Seconds since the workload started.
    pub second: u64,
    /// Attempts ended in that second, by outcome.
    pub counts: BTreeMap<&'static str, u64>,
}

/// A bound of the scenario and what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct BoundCheck {
    /// Which bound.
    pub name: String,
    /// Its limit.
    pub limit: String,
    /// What was measured.
    pub measured: String,
    /// Met.
    pub ok: bool,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// Its description.
    pub description: String,
    /// The seed.
    pub seed: u64,
    /// How long the workload ran, ms.
    pub duration_ms: u64,
    /// The command that replays this drill.
    pub replay: String,
    /// Expected to fail (and why).
    pub expected_to_fail: Option<String>,
    /// Operations started / acknowledged / given up.
    pub ops: u64,
    /// See `ops`.
    pub acked: u64,
    /// See `ops`.
    pub failed: u64,
    /// Refused for good (e.g. insufficient funds): not retried, not a
    /// failure of the system.
    pub refused: u64,
    /// Latency of acknowledged attempts, p50 / p99 ms.
    pub latency_p50_ms: u64,
    /// See `latency_p50_ms`.
    pub latency_p99_ms: u64,
    /// The steps.
    pub steps: Vec<StepReport>,
    /// Attempts per second by outcome.
    pub per_second: Vec<Second>,
    /// Lost, doubled, reordered writes; money applied.
    pub rpo: RpoReport,
    /// The acknowledged deposits looked up through the API (each user's
    /// ledger, before the topology stopped).
    pub api: crate::workload::ApiCheck,
    /// Sum of the balances of the primary copies.
    pub balances_total: i128,
    /// Deposits applied − payments paid − transfers in flight: what the
    /// balances must add up to.
    pub expected_balances: i128,
    /// `balances_total == expected_balances`.
    pub money_conserved: bool,
    /// The offline invariants of the stopped topology's files.
    pub offline_violations: Vec<String>,
    /// Why not every shard was back in sync with its standby after the
    /// faults were undone (`None`: every one was).
    pub not_in_sync_after: Option<String>,
    /// Why the drill stopped early.
    pub aborted: Option<String>,
    /// The bounds.
    pub bounds: Vec<BoundCheck>,
    /// Every invariant held and every bound was met.
    pub passed: bool,
    /// The topology's files.
    pub data_dir: String,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// How long after a step the window of its effects ends, ms.
const AFTER_MS: u64 = 3_000;

/// The window of a step's effects: from it until its fault ended + 3 s,
/// or the next step began, whichever is first.
fn window(events: &[Event], e: &Event) -> (u64, u64) {
    let end = e.undone_ms.unwrap_or(e.done_ms) + AFTER_MS;
    let next = events
        .iter()
        .map(|x| x.at_ms)
        .filter(|&t| t > e.at_ms)
        .min()
        .unwrap_or(u64::MAX);
    (e.at_ms, end.min(next))
}

fn impact(inp: &Inputs, (from, until): (u64, u64), cell: &str) -> CellImpact {
    let ops: Vec<_> = inp
        .recording
        .ops
        .iter()
        .filter(|o| inp.homes.get(&o.user).map(String::as_str) == Some(cell))
        .collect();
    // RTO: the longest time, from the fault to the end of its window,
    // that the cell's users went without an acknowledgement.
    // Writes, when there are any: reads may go on while writes stop.
    let writes = ops.iter().any(|o| o.kind == OpKind::Deposit);
    let mut acks: Vec<u64> = ops
        .iter()
        .filter(|o| !writes || o.kind == OpKind::Deposit)
        .filter_map(|o| o.acked_ms)
        .filter(|&a| a >= from)
        .collect();
    acks.sort_unstable();
    // Up to the first acknowledgement after the window: an outage that
    // runs past the window's end counts whole.
    let past = acks
        .iter()
        .position(|&a| a > until)
        .map_or(acks.len(), |p| p + 1);
    acks.truncate(past);
    let rto_ms = acks.first().map(|&first| {
        acks.windows(2)
            .map(|w| w[1] - w[0])
            .fold(first - from, u64::max)
    });
    let window: Vec<_> = ops
        .iter()
        .filter(|o| o.due_ms >= from && o.due_ms <= until)
        .collect();
    let failed = window
        .iter()
        .filter(|o| o.acked_ms.is_none() && !o.refused)
        .count();
    let mut stalls: Vec<u64> = window
        .iter()
        .filter_map(|o| o.acked_ms.map(|a| a.saturating_sub(o.due_ms)))
        .collect();
    stalls.sort_unstable();
    let mut last_before: HashMap<&str, u64> = HashMap::new();
    let mut first_after: HashMap<&str, u64> = HashMap::new();
    for o in &ops {
        let Some(a) = o.acked_ms else { continue };
        if a < from {
            let e = last_before.entry(&o.user).or_default();
            *e = (*e).max(a);
        } else {
            let e = first_after.entry(&o.user).or_insert(u64::MAX);
            *e = (*e).min(a);
        }
    }
    let mut gaps: Vec<u64> = last_before
        .iter()
        .filter_map(|(u, b)| first_after.get(u).map(|a| a - b))
        .collect();
    gaps.sort_unstable();
    CellImpact {
        cell: cell.to_string(),
        rto_ms,
        ops: window.len(),
        failed,
        stall_p50_ms: percentile(&stalls, 0.5),
        stall_p99_ms: percentile(&stalls, 0.99),
        stall_max_ms: stalls.last().copied().unwrap_or(0),
        users: gaps.len(),
        user_gap_p50_ms: percentile(&gaps, 0.5),
        user_gap_p99_ms: percentile(&gaps, 0.99),
    }
}

/// The first change in the probes within the window, ms after its start.
fn detected(probes: &[Probe], (at, until): (u64, u64)) -> Option<u64> {
    let before = probes.iter().rev().find(|p| p.at_ms <= at)?;
    probes
        .iter()
        .take_while(|p| p.at_ms <= until)
        .find(|p| p.at_ms > at && p.digest != before.digest)
        .map(|p| p.at_ms - at)
}

impl Report {
    pub(crate) fn build(inp: Inputs) -> Report {
        let s = &inp.drill.scenario;
        let cells = s.cells();
        let steps: Vec<StepReport> = inp
            .events
            .iter()
            .map(|e| StepReport {
                event: e.clone(),
                detected_after_ms: detected(inp.probes, window(inp.events, e)),
                cells: s.steps[e.step]
                    .action
                    .affected(&cells)
                    .iter()
                    .map(|c| impact(&inp, window(inp.events, e), c))
                    .collect(),
            })
            .collect();
        let mut per_second: BTreeMap<u64, BTreeMap<&'static str, u64>> = BTreeMap::new();
        let last = inp.recording.attempts.last().map_or(0, |a| a.at_ms / 1000);
        for sec in 0..=last {
            per_second.insert(sec, Outcome::ALL.iter().map(|o| (o.as_str(), 0)).collect());
        }
        for a in &inp.recording.attempts {
            *per_second
                .entry(a.at_ms / 1000)
                .or_default()
                .entry(a.outcome.as_str())
                .or_default() += 1;
        }
        let mut lat: Vec<u64> = inp
            .recording
            .attempts
            .iter()
            .filter(|a| a.outcome == Outcome::Ok)
            .map(|a| a.latency_ms)
            .collect();
        lat.sort_unstable();
        let ops = &inp.recording.ops;
        let acked = ops.iter().filter(|o| o.acked_ms.is_some()).count() as u64;
        let refused = ops.iter().filter(|o| o.refused).count() as u64;
        let failed = ops.len() as u64 - acked - refused;
        let mut bounds = Vec::new();
        let b = &s.bounds;
        bounds.push(BoundCheck {
            name: "rpo".into(),
            limit: format!("≤ {} lost acknowledged writes", b.rpo),
            measured: inp.rpo.lost.len().to_string(),
            ok: inp.rpo.lost.len() as u64 <= b.rpo,
        });
        if let Some(max) = b.max_failed {
            bounds.push(BoundCheck {
                name: "max_failed".into(),
                limit: format!("≤ {max} operations given up"),
                measured: failed.to_string(),
                ok: failed <= max,
            });
        }
        let impacts = steps
            .iter()
            .flat_map(|st| st.cells.iter().map(move |c| (st.event.action.as_str(), c)));
        if let Some(max) = b.max_rto {
            for (action, c) in impacts.clone() {
                bounds.push(BoundCheck {
                    name: format!("max_rto {} ({action})", c.cell),
                    limit: format!("≤ {} ms", max.as_millis()),
                    measured: c
                        .rto_ms
                        .map_or("never recovered".into(), |r| format!("{r} ms")),
                    ok: c.rto_ms.is_some_and(|r| r as u128 <= max.as_millis()),
                });
            }
        }
        if let Some(max) = b.max_stall {
            for (action, c) in impacts {
                bounds.push(BoundCheck {
                    name: format!("max_stall {} ({action})", c.cell),
                    limit: format!("p99 ≤ {} ms", max.as_millis()),
                    measured: format!("p99 {} ms", c.stall_p99_ms),
                    ok: c.stall_p99_ms as u128 <= max.as_millis(),
                });
            }
        }
        let balances_total = inp.offline.primary_balance_total;
        // Money in (deposits) − money out (payments) − money between
        // cells (transfers debited, not yet credited) = the balances.
        let expected_balances =
            inp.rpo.applied_total - inp.rpo.paid_total - inp.rpo.in_flight_total;
        let money_conserved = balances_total == expected_balances;
        let passed = inp.rpo.ok()
            && inp.api.ok()
            && money_conserved
            && inp.offline.ok()
            && inp.in_sync.is_ok()
            && inp.aborted.is_none()
            && inp.events.iter().all(|e| !e.result.contains("failed"))
            && bounds.iter().all(|b| b.ok);
        Report {
            scenario: s.name.clone(),
            description: s.description.clone(),
            seed: s.seed,
            duration_ms: s.duration.as_millis() as u64,
            replay: inp.drill.replay.clone(),
            expected_to_fail: (s.expect == Expect::Fail)
                .then(|| s.expect_reason.clone().unwrap_or_default()),
            ops: ops.len() as u64,
            acked,
            failed,
            refused,
            latency_p50_ms: percentile(&lat, 0.5),
            latency_p99_ms: percentile(&lat, 0.99),
            steps,
            per_second: per_second
                .into_iter()
                .map(|(second, counts)| Second { second, counts })
                .collect(),
            rpo: inp.rpo,
            api: inp.api,
            balances_total,
            expected_balances,
            money_conserved,
            offline_violations: inp.offline.violations,
            not_in_sync_after: inp.in_sync.err(),
            aborted: inp.aborted,
            bounds,
            passed,
            data_dir: inp.data_dir.display().to_string(),
        }
    }

    /// Writes report.md, report.json and timeline.svg into `dir`.
    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("report.json"), json + "\n")
            .with_context(|| format!("cannot write {}", dir.join("report.json").display()))?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        super::svg::draw(self, &dir.join("timeline.svg"))?;
        Ok(())
    }

    /// A few lines for the terminal: the verdict, each step's RTO, what
    /// failed.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "drill {}: {} — {} ops, {} acknowledged, {} given up; lost {}, doubled {}, misplaced {}, out of order {}\n",
            self.scenario,
            if self.passed { "PASSED" } else { "FAILED" },
            self.ops,
            self.acked,
            self.failed,
            self.rpo.lost.len(),
            self.rpo.doubled.len(),
            self.rpo.misplaced.len(),
            self.rpo.out_of_order.len()
        );
        for st in &self.steps {
            for c in &st.cells {
                out.push_str(&format!(
                    "  {:>6} ms  {:<40} {}: RTO {}, stall p99 {} ms\n",
                    st.event.at_ms,
                    st.event.action,
                    c.cell,
                    c.rto_ms.map_or("never".into(), |r| format!("{r} ms")),
                    c.stall_p99_ms
                ));
            }
            if st.event.result.contains("failed") {
                out.push_str(&format!("          {}\n", st.event.result));
            }
        }
        for b in self.bounds.iter().filter(|b| !b.ok) {
            out.push_str(&format!(
                "  bound not met: {} {} (measured {})\n",
                b.name, b.limit, b.measured
            ));
        }
        if let Some(e) = &self.not_in_sync_after {
            out.push_str(&format!("  not back in sync: {e}\n"));
        }
        if !self.money_conserved {
            out.push_str(&format!(
                "  money NOT conserved: balances {} against {} expected (deposits − paid − in flight)\n",
                self.balances_total, self.expected_balances
            ));
        }
        for v in &self.offline_violations {
            out.push_str(&format!("  offline: {v}\n"));
        }
        if let Some(a) = &self.aborted {
            out.push_str(&format!("  {a}\n"));
        }
        if let Some(why) = &self.expected_to_fail {
            out.push_str(&format!("  (expected to fail: {why})\n"));
        }
        out
    }

    /// The report for people.
    pub fn markdown(&self) -> String {
        let mut m = format!(
            "# Drill `{}`: {}\n\n{}\n\n",
            self.scenario,
            if self.passed { "PASSED" } else { "FAILED" },
            self.description
        );
        if let Some(why) = &self.expected_to_fail {
            m.push_str(&format!("Expected to fail: {why}\n\n"));
        }
        if let Some(a) = &self.aborted {
            m.push_str(&format!("**Aborted:** {a}\n\n"));
        }
        m.push_str(&format!(
            "Seed {}, {} s of workload. Replay: `{}`\n\n![timeline](timeline.svg)\n\n",
            self.seed,
            self.duration_ms as f64 / 1000.0,
            self.replay
        ));
        m.push_str(&format!(
            "## Workload\n\n{} operations, {} acknowledged, {} given up after retries; acknowledged attempts p50 {} ms, p99 {} ms.\n\n",
            self.ops, self.acked, self.failed, self.latency_p50_ms, self.latency_p99_ms
        ));
        m.push_str("## Faults\n\n| at (ms) | step | result | undone (ms) | detected after (ms) |\n|---:|---|---|---:|---:|\n");
        for st in &self.steps {
            let e = &st.event;
            m.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                e.at_ms,
                e.action,
                e.result,
                e.undone_ms.map_or("-".into(), |u| u.to_string()),
                st.detected_after_ms.map_or("-".into(), |d| d.to_string())
            ));
        }
        m.push_str("\n## Recovery per affected cell\n\n| step at (ms) | cell | RTO (ms) | ops in window | given up | stall p50 / p99 / max (ms) | users | user gap p50 / p99 (ms) |\n|---:|---|---:|---:|---:|---|---:|---|\n");
        for st in &self.steps {
            for c in &st.cells {
                m.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} / {} / {} | {} | {} / {} |\n",
                    st.event.at_ms,
                    c.cell,
                    c.rto_ms.map_or("never".into(), |r| r.to_string()),
                    c.ops,
                    c.failed,
                    c.stall_p50_ms,
                    c.stall_p99_ms,
                    c.stall_max_ms,
                    c.users,
                    c.user_gap_p50_ms,
                    c.user_gap_p99_ms
                ));
            }
        }
        let r = &self.rpo;
        let list = |v: &[String]| {
            if v.is_empty() {
                "none".to_string()
            } else {
                format!(
                    "{} ({})",
                    v.len(),
                    v.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
                )
            }
        };
        m.push_str(&format!(
            "\n## Checks\n\n- Lost acknowledged writes (RPO): {}\n- Doubled writes: {}\n- Misplaced (in a shard that does not own the user's slot): {}\n- Through the API (each user's ledger, before stopping): {} users, {} entries; lost {}, doubled {}, unreadable {}\n- Out of order (per user): {}\n- Writes applied but never acknowledged (allowed): {}\n- Money: deposits applied {} = written {}; − paid {} − in flight between cells {} = {}; balances of the primary copies {} ({})\n- Transfers acknowledged {}, payments acknowledged {}, TCC orders confirmed or cancelled {}; refused (e.g. insufficient funds) {}\n- Offline invariants: {}\n- Every shard back in sync with its standby: {}\n",
            list(&r.lost),
            list(&r.doubled),
            list(&r.misplaced),
            self.api.users,
            self.api.entries,
            list(&self.api.lost),
            list(&self.api.doubled),
            list(&self.api.unreadable),
            list(&r.out_of_order),
            r.applied_unacked,
            r.applied_total,
            r.expected_total,
            r.paid_total,
            r.in_flight_total,
            self.expected_balances,
            self.balances_total,
            if self.money_conserved { "conserved" } else { "NOT conserved" },
            r.transfers_acked,
            r.payments_acked,
            r.tcc_acked,
            self.refused,
            if self.offline_violations.is_empty() { "held".into() } else { list(&self.offline_violations) },
            match &self.not_in_sync_after { None => "yes".into(), Some(e) => format!("no: {e}") },
        ));
        m.push_str("\n## Bounds\n\n| bound | limit | measured | |\n|---|---|---|---|\n");
        for b in &self.bounds {
            m.push_str(&format!(
                "| {} | {} | {} | {} |\n",
                b.name,
                b.limit,
                b.measured,
                if b.ok { "met" } else { "**NOT MET**" }
            ));
        }
        m.push_str(&format!(
            "\nThe topology's files: `{}` (`cellchaos check --data-dir {}`).\n",
            self.data_dir, self.data_dir
        ));
        m
    }
}
