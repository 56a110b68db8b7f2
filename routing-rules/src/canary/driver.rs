//! The driver of a canary pipeline (`cellctl canary run` / `resume`), and
//! the operator's `abort` and `pause`, with the rules in a file (the
//! embedded mode) or in etcd ([`Place`]).
//!
//! Per step: write the green share into the rules (under the rules lock,
//! revision raised), wait until every gateway runs that revision, ask the
//! gate, then judge green against blue every `interval` over the window
//! since the step began; healthy for `hold` → next step; failed → green to
//! 0 % at once. Every tick (≤ 200 ms) renews the lease and reads the
//! recorded state, so an operator's `abort` or `pause` is seen at once.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::judge::{judge, judge_against, Verdict};
use super::scrape::{Colour, Reading};
use super::sources::Sources;
use super::store::{holder_name, now_ms, Place};
use super::{Event, Hooks, Pipeline, Plan, Status};
use crate::switchover::EtcdTarget;

/// How often the driver looks at the recorded state and its lease.
const TICK: Duration = Duration::from_millis(100);
/// How long every gateway has to run a step's revision.
pub const PROPAGATION_TIMEOUT: Duration = Duration::from_secs(30);

/// How a pipeline ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Every step passed.
    Promoted,
    /// Green was set to 0 % (why).
    Aborted(String),
}

/// Where the rules are: a file (the embedded mode), else etcd.
#[derive(Debug, Clone, Default)]
pub struct Where {
    /// The rules file the gateways follow.
    pub rules: Option<PathBuf>,
    /// Or the etcd cluster they follow.
    pub etcd: Option<EtcdTarget>,
}

impl Where {
    /// The rules file `rules`.
    pub fn file(rules: &std::path::Path) -> Where {
        Where {
            rules: Some(rules.to_path_buf()),
            etcd: None,
        }
    }

    async fn open(&self) -> Result<Place> {
        Place::open(self.rules.as_deref(), self.etcd.as_ref()).await
    }
}

/// What `cellctl canary run` asks.
#[derive(Debug, Clone)]
pub struct RunRequest {
    /// Where the rules are.
    pub place: Where,
    /// The cell.
    pub cell: String,
    /// The plan.
    pub plan: Plan,
    /// The gateways' metrics URLs.
    pub metrics: Vec<String>,
    /// Or a Prometheus server.
    pub prometheus: Option<String>,
    /// Webhooks.
    pub hooks: Hooks,
}

/// Where events go (printed as they happen).
pub type Emit<'a> = &'a mut (dyn FnMut(&Event) + Send + Sync);

/// Starts a pipeline and drives it to its end.
pub async fn run(req: RunRequest, emit: Emit<'_>) -> Result<Ending> {
    let mut place = req.place.open().await?;
    let (text, _) = place.rules().await?;
    let rules = crate::parse_rules(&text).map_err(|e| anyhow::anyhow!("invalid rules: {e}"))?;
    let Some(cell) = rules.cells.get(&req.cell) else {
        bail!("unknown cell {:?}", req.cell);
    };
    place.check_free(&req.cell).await?;
    let first = req.plan.steps[0];
    if cell.split.green > first {
        bail!(
            "cell {}'s green share is {} already, above the first step {}: a canary only raises it (abort or `cellctl split {} --green 0%` first)",
            req.cell,
            crate::model::format_percent(cell.split.green),
            crate::model::format_percent(first),
            req.cell
        );
    }
    // The sources must be readable before anything changes.
    let sources = sources_of(
        &mut place,
        &req.cell,
        &req.metrics,
        req.prometheus.as_deref(),
    )
    .await?;
    sources
        .read()
        .await
        .context("the gateways' metrics must be readable before the canary starts")?;
    let holder = holder_name();
    let p = place
        .begin(
            Pipeline {
                cell: req.cell.clone(),
                plan: req.plan,
                metrics: req.metrics,
                prometheus: req.prometheus,
                hooks: req.hooks,
                step: 0,
                status: Status::Running,
                reason: None,
                revision: None,
                started_ms: now_ms(),
                updated_ms: now_ms(),
                lease: None,
            },
            &holder,
        )
        .await?;
    Driver {
        place,
        holder,
        sources,
        emit,
    }
    .drive(p)
    .await
}

/// Where a pipeline reads its counters: its `--metrics` URLs, its
/// Prometheus server, or else the gateways registered in etcd.
async fn sources_of(
    place: &mut Place,
    cell: &str,
    metrics: &[String],
    prometheus: Option<&str>,
) -> Result<Sources> {
    if metrics.is_empty() && prometheus.is_none() {
        return Sources::new(cell, &place.gateways().await?, None);
    }
    Sources::new(cell, metrics, prometheus)
}

/// Resumes a pipeline: takes over one whose driver stopped and drives it
/// from its recorded step (`Some`), or sets a paused one with a live driver
/// running again (`None`).
pub async fn resume(place: &Where, cell: &str, emit: Emit<'_>) -> Result<Option<Ending>> {
    let mut place = place.open().await?;
    let holder = holder_name();
    let Some(p) = place.take_over(cell, &holder).await? else {
        return Ok(None);
    };
    let sources = sources_of(&mut place, cell, &p.metrics, p.prometheus.as_deref()).await?;
    Driver {
        place,
        holder,
        sources,
        emit,
    }
    .drive(p)
    .await
    .map(Some)
}

/// Pauses a running pipeline at its step (it is still judged, and aborted
/// on failure, but not advanced).
pub async fn pause(place: &Where, cell: &str) -> Result<Pipeline> {
    place
        .open()
        .await?
        .update(cell, |p| {
            match p.status {
                Status::Running => {
                    p.status = Status::Paused;
                    p.reason = Some("paused by an operator".into());
                }
                Status::Paused => {}
                s => bail!("the canary of cell {cell} is over ({})", s.as_str()),
            }
            Ok(p.clone())
        })
        .await
}

/// The rules document where `place` keeps it.
pub async fn rules_text(place: &Where) -> Result<String> {
    Ok(place.open().await?.rules().await?.0)
}

/// `cell`'s recorded pipeline.
pub async fn status(place: &Where, cell: &str) -> Result<Pipeline> {
    let mut place = place.open().await?;
    let found = place.load(cell).await?;
    found.with_context(|| {
        format!(
            "no canary of cell {cell} is recorded ({})",
            place.describe()
        )
    })
}

/// Aborts `cell`'s canary: green to 0 % in the rules at once, then the
/// pipeline recorded aborted (its driver, if any, stops at its next tick).
/// Without a recorded pipeline the share is still set to 0 %. Returns the
/// revision written (none when green was 0 % already) and, when the
/// pipeline's gateways could be read, how long until all of them ran it.
pub async fn abort(place: &Where, cell: &str, reason: &str) -> Result<(Option<u64>, Option<u64>)> {
    let t0 = Instant::now();
    let mut place = place.open().await?;
    let revision = place.set_share(cell, 0).await?;
    let recorded = place.load(cell).await?;
    if recorded.is_some() {
        place
            .update(cell, |p| {
                p.status = Status::Aborted;
                p.reason = Some(reason.to_string());
                p.lease = None;
                Ok(())
            })
            .await?;
    }
    let propagation = match (&recorded, revision) {
        (Some(p), Some(rev)) => {
            match sources_of(&mut place, cell, &p.metrics, p.prometheus.as_deref()).await {
                Ok(sources) => propagate(&sources, rev, t0, Duration::from_secs(10))
                    .await
                    .ok(),
                Err(_) => None,
            }
        }
        _ => None,
    };
    Ok((revision, propagation))
}

/// Waits until every source runs revision `rev` or later; the time since
/// `t0`, ms.
async fn propagate(sources: &Sources, rev: u64, t0: Instant, timeout: Duration) -> Result<u64> {
    let mut last = String::from("not read yet");
    while t0.elapsed() < timeout {
        match sources.read().await {
            Ok(r) if r.revision.is_some_and(|v| v >= rev) => {
                return Ok(t0.elapsed().as_millis() as u64)
            }
            Ok(r) => last = format!("the lowest revision served is {:?}", r.revision),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("not every gateway ran revision {rev} within {timeout:?} ({last})")
}

struct Driver<'a> {
    place: Place,
    holder: String,
    sources: Sources,
    emit: Emit<'a>,
}

/// What one tick found in the recorded state.
enum Seen {
    Running,
    Paused,
    Aborted(String),
}

impl Driver<'_> {
    /// Renews the lease and reads what operators changed.
    async fn tick(&mut self, cell: &str) -> Result<Seen> {
        let holder = self.holder.clone();
        self.place
            .renew(cell, &holder, |p| {
                Ok(match p.status {
                    Status::Running | Status::Promoted => Seen::Running,
                    Status::Paused => Seen::Paused,
                    Status::Aborted => Seen::Aborted(
                        p.reason
                            .clone()
                            .unwrap_or_else(|| "aborted by an operator".into()),
                    ),
                })
            })
            .await
    }

    async fn hook(&self, url: &Option<String>, event: &Event) {
        if let Some(url) = url {
            let body = serde_json::to_value(event).unwrap_or_default();
            match self.sources.post(url, &body).await {
                Ok(s) if (200..300).contains(&s) => {}
                Ok(s) => tracing::warn!(%url, status = s, "webhook answered non-2xx"),
                Err(e) => tracing::warn!(%url, error = %e, "webhook failed"),
            }
        }
    }

    /// Sets green to 0 % because `why`; the pipeline recorded aborted.
    async fn abort(&mut self, p: &Pipeline, why: String) -> Result<Ending> {
        let t0 = Instant::now();
        let revision = self.place.set_share(&p.cell, 0).await?;
        let holder = self.holder.clone();
        self.place
            .renew(&p.cell, &holder, |r| {
                r.status = Status::Aborted;
                r.reason = Some(why.clone());
                r.lease = None;
                Ok(())
            })
            .await?;
        let propagation_ms = match revision {
            Some(rev) => propagate(&self.sources, rev, t0, Duration::from_secs(10))
                .await
                .ok(),
            None => None,
        };
        let event = Event::Aborted {
            cell: p.cell.clone(),
            reason: why.clone(),
            revision,
            propagation_ms,
        };
        (self.emit)(&event);
        self.hook(&p.hooks.on_abort, &event).await;
        Ok(Ending::Aborted(why))
    }

    async fn drive(mut self, mut p: Pipeline) -> Result<Ending> {
        let cell = p.cell.clone();
        // Blue's last window: the baseline of a 100 % step (blue then
        // takes no traffic).
        let mut baseline: Option<Colour> = None;
        while p.step < p.plan.steps.len() {
            let (step, share) = (p.step, p.share());
            let green = crate::model::format_percent(share);
            let t0 = Instant::now();
            let revision = match self.place.set_share(&cell, share).await? {
                Some(r) => r,
                None => self.place.rules().await?.1,
            };
            let holder = self.holder.clone();
            self.place
                .renew(&cell, &holder, |r| {
                    r.revision = Some(revision);
                    Ok(())
                })
                .await?;
            // Registered gateways come and go: read the current ones.
            if p.metrics.is_empty() && p.prometheus.is_none() {
                if let Ok(s) = sources_of(&mut self.place, &cell, &[], None).await {
                    self.sources = s;
                }
            }
            let started = Event::StepStarted {
                cell: cell.clone(),
                step,
                green: green.clone(),
                revision,
            };
            (self.emit)(&started);
            self.hook(&p.hooks.on_step, &started).await;
            match propagate(&self.sources, revision, t0, PROPAGATION_TIMEOUT).await {
                Ok(ms) => (self.emit)(&Event::Propagated {
                    step,
                    revision,
                    ms,
                    gateways: self.sources.len(),
                }),
                Err(e) => return self.abort(&p, format!("step {green}: {e:#}")).await,
            }
            if let Some(end) = self.gate(&p).await? {
                return Ok(end);
            }
            match self.judge_step(&p, baseline.as_ref()).await? {
                Ok(blue) => baseline = Some(blue),
                Err(end) => return Ok(end),
            }
            let passed = Event::Passed {
                step,
                green: green.clone(),
            };
            (self.emit)(&passed);
            self.hook(&p.hooks.on_step, &passed).await;
            p = self
                .place
                .renew(&cell, &holder, |r| {
                    r.step += 1;
                    if r.step == r.plan.steps.len() {
                        r.status = Status::Promoted;
                        r.lease = None;
                        r.reason = None;
                    }
                    Ok(r.clone())
                })
                .await?;
        }
        (self.emit)(&Event::Finished {
            cell: cell.clone(),
            green: crate::model::format_percent(*p.plan.steps.last().unwrap_or(&0)),
        });
        Ok(Ending::Promoted)
    }

    /// Asks the gate until it answers 2xx (`None`), or the pipeline ends.
    async fn gate(&mut self, p: &Pipeline) -> Result<Option<Ending>> {
        let Some(url) = p.hooks.gate.clone() else {
            return Ok(None);
        };
        let t0 = Instant::now();
        let body = serde_json::json!({"event": "gate", "cell": p.cell, "step": p.step,
            "green": crate::model::format_percent(p.share())});
        loop {
            let answer = match self.sources.post(&url, &body).await {
                Ok(s) if (200..300).contains(&s) => return Ok(None),
                Ok(s) => format!("{url} answered {s}"),
                Err(e) => format!("{url}: {e:#}"),
            };
            (self.emit)(&Event::Gated {
                step: p.step,
                answer: answer.clone(),
            });
            if t0.elapsed() >= Duration::from_millis(p.plan.max_wait_ms) {
                return self
                    .abort(
                        p,
                        format!("the gate refused the step for {:?}: {answer}", t0.elapsed()),
                    )
                    .await
                    .map(Some);
            }
            let until = Instant::now() + Duration::from_millis(p.plan.interval_ms);
            while Instant::now() < until {
                if let Seen::Aborted(why) = self.tick(&p.cell).await? {
                    return Ok(Some(Ending::Aborted(why)));
                }
                tokio::time::sleep(TICK).await;
            }
        }
    }

    /// Judges the step until it held healthy for `hold` (blue's window,
    /// `Ok`) or the pipeline ended (`Err`).
    async fn judge_step(
        &mut self,
        p: &Pipeline,
        baseline: Option<&Colour>,
    ) -> Result<std::result::Result<Colour, Ending>> {
        let plan = &p.plan;
        let start = self.read_or_wait(p).await?;
        let t0 = Instant::now();
        let (mut held, mut last) = (Duration::ZERO, Instant::now());
        let mut next = Instant::now() + Duration::from_millis(plan.interval_ms);
        loop {
            tokio::time::sleep(TICK).await;
            let seen = self.tick(&p.cell).await?;
            let paused = match seen {
                Seen::Aborted(why) => return Ok(Err(Ending::Aborted(why))),
                Seen::Paused => true,
                Seen::Running => false,
            };
            if !paused {
                held += last.elapsed();
            }
            last = Instant::now();
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + Duration::from_millis(plan.interval_ms);
            let now = match self.sources.read().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot read the gateways; judging later");
                    continue;
                }
            };
            let window = now.since(&start);
            let j = match (p.share() == crate::model::BASIS_POINTS, baseline) {
                (true, Some(blue)) => {
                    judge_against(&window.green, blue, &window.bounds, &plan.thresholds, true)
                }
                _ => judge(&window, &plan.thresholds),
            };
            (self.emit)(&Event::Judged {
                step: p.step,
                window_ms: t0.elapsed().as_millis() as u64,
                judgement: j.clone(),
            });
            match j.verdict {
                Verdict::Failed => {
                    (self.emit)(&Event::Failed {
                        step: p.step,
                        reasons: j.reasons.clone(),
                    });
                    let why = format!(
                        "green {}: {}",
                        crate::model::format_percent(p.share()),
                        j.reasons.join("; ")
                    );
                    return self.abort(p, why).await.map(Err);
                }
                Verdict::Healthy if !paused && held >= Duration::from_millis(plan.hold_ms) => {
                    return Ok(Ok(window.blue));
                }
                Verdict::Wait if t0.elapsed() >= Duration::from_millis(plan.max_wait_ms) => {
                    let why = format!(
                        "green {}: still {} after {:?}; a canary never passes without enough traffic",
                        crate::model::format_percent(p.share()),
                        j.reasons.join("; "),
                        t0.elapsed()
                    );
                    return self.abort(p, why).await.map(Err);
                }
                _ => {}
            }
        }
    }

    /// The first reading of a step's window (retried until readable).
    async fn read_or_wait(&mut self, p: &Pipeline) -> Result<Reading> {
        let t0 = Instant::now();
        loop {
            match self.sources.read().await {
                Ok(r) => return Ok(r),
                Err(e) if t0.elapsed() > PROPAGATION_TIMEOUT => return Err(e),
                Err(_) => {}
            }
            self.tick(&p.cell).await?;
            tokio::time::sleep(TICK).await;
        }
    }
}
