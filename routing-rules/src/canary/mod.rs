//! Canary pipelines (`cellctl canary`): step a cell's green share, judge
//! green against blue of the same cell over the same window, abort at once
//! when green is worse.
//!
//! The core here is free of I/O: the plan ([`Plan`]), the pipeline's
//! recorded state ([`Pipeline`]), reading the gateways' exposition
//! ([`scrape`]), the judge ([`judge`]) and which users a step moves
//! ([`exposure`]). The driver that edits the rules, scrapes the gateways,
//! holds the lease and calls the webhooks is [`driver`] (feature `client`).

#[cfg(feature = "client")]
pub mod driver;
pub mod exposure;
pub mod judge;
pub mod scrape;
#[cfg(feature = "client")]
pub mod sources;
#[cfg(feature = "client")]
pub mod store;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use judge::{judge, Judgement, Thresholds, Verdict};
pub use scrape::Reading;

/// Basis points of a share (1 % = 100).
pub type Bp = u32;

/// What a pipeline does: its steps and how each is judged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Green shares, ascending, in basis points.
    pub steps: Vec<Bp>,
    /// How long each step is judged healthy before the next, ms.
    pub hold_ms: u64,
    /// How often it is judged, ms.
    pub interval_ms: u64,
    /// What green may be worse than blue by.
    pub thresholds: Thresholds,
    /// How long a step may wait for enough requests (or for its gate)
    /// before the pipeline gives up and aborts, ms.
    pub max_wait_ms: u64,
}

impl Plan {
    /// Parses `--steps 1,5,25,50,100` (percentages, up to two decimals).
    pub fn parse_steps(s: &str) -> Result<Vec<Bp>, String> {
        let steps: Vec<Bp> = s
            .split(',')
            .map(|p| {
                crate::model::parse_percent(p.trim()).ok_or_else(|| {
                    format!(
                        "step {:?} is not a percentage from 0 to 100 (up to two decimals)",
                        p.trim()
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        if steps.is_empty() {
            return Err("no steps".into());
        }
        if steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "steps must rise: {s} (a green share never goes down during a canary; abort rolls back)"
            ));
        }
        if steps[0] == 0 {
            return Err("a step of 0 % exposes nothing; start above 0".into());
        }
        if steps[0] == 10_000 {
            return Err(
                "the first step is 100 %: blue takes no traffic then, and there is no baseline to judge green against".into(),
            );
        }
        Ok(steps)
    }

    /// The plan's duration if every step passes at its first chance.
    pub fn least_duration(&self) -> Duration {
        Duration::from_millis(self.hold_ms * self.steps.len() as u64)
    }
}

/// Where a pipeline is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// A driver steps it.
    Running,
    /// Held at its step (judged still, and aborted on failure, but not
    /// advanced) until resumed.
    Paused,
    /// Every step passed: green is at the last step's share.
    Promoted,
    /// Green was set to 0 % (failed, or aborted by an operator).
    Aborted,
}

impl Status {
    /// Its name as recorded.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Promoted => "promoted",
            Status::Aborted => "aborted",
        }
    }

    /// Over (no driver may take it again).
    pub fn is_final(self) -> bool {
        matches!(self, Status::Promoted | Status::Aborted)
    }
}

/// The lease of the driver that steps a pipeline: no other may while it
/// is live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Who holds it (`host:pid:random`).
    pub holder: String,
    /// Until when (unix ms), unless renewed.
    pub expires_ms: i64,
}

/// Webhooks of a pipeline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    /// POSTed every event of a step (started, passed) as JSON.
    pub on_step: Option<String>,
    /// POSTed the abort as JSON.
    pub on_abort: Option<String>,
    /// POSTed before each step is judged; a non-2xx answer pauses the step
    /// until it answers 2xx.
    pub gate: Option<String>,
}

/// A pipeline as recorded in the control plane (the state file next to the
/// rules, or etcd): enough for anyone to see it, resume it or abort it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    /// The cell.
    pub cell: String,
    /// The plan.
    pub plan: Plan,
    /// The gateways' metrics URLs it judges with (empty: the registered
    /// gateways).
    pub metrics: Vec<String>,
    /// A Prometheus server to read the gateways' series from instead.
    pub prometheus: Option<String>,
    /// Webhooks.
    pub hooks: Hooks,
    /// The step being run (index into the plan's steps).
    pub step: usize,
    /// Where it is.
    pub status: Status,
    /// Why it ended or paused, for people.
    pub reason: Option<String>,
    /// The rules revision of the step's share, once written.
    pub revision: Option<u64>,
    /// When it started (unix ms).
    pub started_ms: i64,
    /// Last change (unix ms).
    pub updated_ms: i64,
    /// The driver's lease (none after it ended).
    pub lease: Option<Lease>,
}

impl Pipeline {
    /// The share of the step being run.
    pub fn share(&self) -> Bp {
        self.plan.steps.get(self.step).copied().unwrap_or(0)
    }

    /// The lease is held and not expired at `now_ms`.
    pub fn leased(&self, now_ms: i64) -> bool {
        self.lease.as_ref().is_some_and(|l| l.expires_ms > now_ms)
    }

    /// One line for people.
    pub fn summary(&self, now_ms: i64) -> String {
        let steps: Vec<String> = self
            .plan
            .steps
            .iter()
            .map(|&b| crate::model::format_percent(b))
            .collect();
        let driver = match &self.lease {
            Some(l) if l.expires_ms > now_ms => format!("driven by {}", l.holder),
            Some(l) => format!(
                "its driver ({}) stopped {:.1} s ago: `cellctl canary resume {}` finishes it, `abort` rolls it back",
                l.holder,
                (now_ms - l.expires_ms) as f64 / 1000.0,
                self.cell
            ),
            None => "no driver".into(),
        };
        format!(
            "canary of cell {}: {}, step {} of {} (green {}), steps {}; {}{}",
            self.cell,
            self.status.as_str(),
            (self.step + 1).min(self.plan.steps.len()),
            self.plan.steps.len(),
            crate::model::format_percent(self.share()),
            steps.join(", "),
            driver,
            self.reason
                .as_ref()
                .map(|r| format!("; {r}"))
                .unwrap_or_default()
        )
    }
}

/// One event of a pipeline (a JSON line each with `-o json`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A step's share was written to the rules.
    StepStarted {
        /// The cell.
        cell: String,
        /// Step index (0-based).
        step: usize,
        /// Its green share, %.
        green: String,
        /// The rules revision written.
        revision: u64,
    },
    /// Every gateway runs the step's revision.
    Propagated {
        /// Step index.
        step: usize,
        /// The revision.
        revision: u64,
        /// From the write until the last gateway ran it, ms.
        ms: u64,
        /// Gateways read.
        gateways: usize,
    },
    /// The gate refused the step: paused until it answers 2xx.
    Gated {
        /// Step index.
        step: usize,
        /// What it answered.
        answer: String,
    },
    /// One judgement.
    Judged {
        /// Step index.
        step: usize,
        /// Since the step's window began, ms.
        window_ms: u64,
        /// The judgement.
        #[serde(flatten)]
        judgement: Judgement,
    },
    /// The step held healthy for its hold time.
    Passed {
        /// Step index.
        step: usize,
        /// Its green share, %.
        green: String,
    },
    /// Green failed the judge.
    Failed {
        /// Step index.
        step: usize,
        /// Why.
        reasons: Vec<String>,
    },
    /// Green was set to 0 %.
    Aborted {
        /// The cell.
        cell: String,
        /// Why.
        reason: String,
        /// The rules revision written (none when someone else aborted).
        revision: Option<u64>,
        /// From the decision until every gateway ran green 0 %, ms.
        propagation_ms: Option<u64>,
    },
    /// Every step passed.
    Finished {
        /// The cell.
        cell: String,
        /// Green's final share, %.
        green: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_parse_and_bad_ones_say_why() {
        assert_eq!(
            Plan::parse_steps("1,5,25,50,100").unwrap(),
            vec![100, 500, 2500, 5000, 10_000]
        );
        assert_eq!(Plan::parse_steps("0.5%, 2%").unwrap(), vec![50, 200]);
        for (bad, why) in [
            ("5,1", "must rise"),
            ("5,5", "must rise"),
            ("0,5", "exposes nothing"),
            ("100", "no baseline"),
            ("1,x", "step \"x\""),
            ("1,101", "step \"101\""),
        ] {
            let e = Plan::parse_steps(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
