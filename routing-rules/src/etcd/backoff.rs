//! How a long-running follower paces its reconnects to an unreachable etcd
//! and what it logs meanwhile: exponential backoff with jitter (from
//! [`RETRY_MS`](super::RETRY_MS) up to [`MAX_RETRY`]), reset by a session
//! that worked; the first failure is logged once (the state change), then
//! only a summary every [`SUMMARY_EVERY`] while it lasts, and the recovery
//! once.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// Longest pause between two reconnect attempts.
pub const MAX_RETRY: Duration = Duration::from_secs(5);
/// How often a lasting outage is summarised in the log.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// What to log about a failure or a recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The first failure after a working session (WARN).
    Lost(String),
    /// Still failing (WARN, at most every [`SUMMARY_EVERY`]).
    Still(String),
    /// Working again after failures (INFO).
    Back(String),
}

/// Reconnect state of one follower (`what`: "rules", "registration of
/// KEY", ...).
#[derive(Debug)]
pub struct Backoff {
    what: String,
    /// The longest pause.
    max: Duration,
    failures: u32,
    since: Option<Instant>,
    last_summary: Option<Instant>,
    last_error: String,
}

impl Backoff {
    /// A backoff whose pauses never exceed `max` (a fenced instance
    /// retries its lease often: every second it waits is a second without
    /// writes).
    pub fn up_to(what: impl Into<String>, max: Duration) -> Self {
        Backoff {
            max: max.min(MAX_RETRY),
            ..Backoff::new(what)
        }
    }

    /// A follower that has not failed yet.
    pub fn new(what: impl Into<String>) -> Self {
        Backoff {
            what: what.into(),
            max: MAX_RETRY,
            failures: 0,
            since: None,
            last_summary: None,
            last_error: String::new(),
        }
    }

    /// The pause before attempt `failures + 1`: `RETRY_MS × 2^(failures−1)`
    /// capped at [`MAX_RETRY`], times a random factor in [0.5, 1.0) so
    /// followers that lost etcd together do not come back in step.
    pub fn delay(failures: u32, random: u64) -> Duration {
        Self::delay_up_to(failures, random, MAX_RETRY)
    }

    /// [`Backoff::delay`] with another cap.
    fn delay_up_to(failures: u32, random: u64, max: Duration) -> Duration {
        let base = Duration::from_millis(super::RETRY_MS);
        let exp = base
            .saturating_mul(1u32 << failures.saturating_sub(1).min(16))
            .min(max);
        let factor = 0.5 + (random % 1000) as f64 / 2000.0;
        exp.mul_f64(factor)
    }

    /// A session failed with `error` at `now`: the pause before the next
    /// attempt, and what to log (if anything).
    pub fn failed(&mut self, error: &str, now: Instant) -> (Duration, Option<Note>) {
        self.failures += 1;
        self.last_error = error.to_string();
        let note = match self.since {
            None => {
                self.since = Some(now);
                self.last_summary = Some(now);
                Some(Note::Lost(format!(
                    "etcd {} session lost ({error}); retrying with backoff up to {:?}, logging a summary every {} s",
                    self.what,
                    self.max,
                    SUMMARY_EVERY.as_secs()
                )))
            }
            Some(since)
                if self
                    .last_summary
                    .is_none_or(|t| now.duration_since(t) >= SUMMARY_EVERY) =>
            {
                self.last_summary = Some(now);
                Some(Note::Still(format!(
                    "etcd {} still unreachable after {} s ({} attempts); last error: {error}",
                    self.what,
                    now.duration_since(since).as_secs(),
                    self.failures
                )))
            }
            Some(_) => None,
        };
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        (Self::delay_up_to(self.failures, random, self.max), note)
    }

    /// A session works (again) at `now`: resets the backoff; what to log
    /// when it follows failures.
    pub fn connected(&mut self, now: Instant) -> Option<Note> {
        let since = self.since.take()?;
        let note = Note::Back(format!(
            "etcd {} session back after {:.1} s ({} failed attempts)",
            self.what,
            now.duration_since(since).as_secs_f64(),
            self.failures
        ));
        self.failures = 0;
        self.last_summary = None;
        Some(note)
    }

    /// Logs a note at its level.
    pub fn log(note: Option<Note>) {
        match note {
            Some(Note::Lost(m) | Note::Still(m)) => tracing::warn!("{m}"),
            Some(Note::Back(m)) => tracing::info!("{m}"),
            None => {}
        }
    }

    /// Records a failure, logs it as due and sleeps the pause (or returns
    /// false at once when `stop` flips).
    pub async fn pause(
        &mut self,
        error: &str,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> bool {
        let (wait, note) = self.failed(error, Instant::now());
        Self::log(note);
        tokio::select! {
            _ = stop.changed() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }

    /// Records that a session works, logging a recovery.
    pub fn ok(&mut self) {
        Self::log(self.connected(Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_doubles_with_jitter_up_to_the_cap() {
        for random in [0, 499, 999, 123_456_789] {
            let d1 = Backoff::delay(1, random);
            assert!(
                d1 >= Duration::from_millis(100) && d1 < Duration::from_millis(200),
                "{d1:?}"
            );
            let d3 = Backoff::delay(3, random);
            assert!(
                d3 >= Duration::from_millis(400) && d3 < Duration::from_millis(800),
                "{d3:?}"
            );
            for n in [6, 10, 40, u32::MAX] {
                let d = Backoff::delay(n, random);
                assert!(d >= MAX_RETRY / 2 && d < MAX_RETRY, "{n}: {d:?}");
            }
        }
    }

    #[test]
    fn a_capped_backoff_never_waits_longer_than_its_cap() {
        let mut b = Backoff::up_to("registration", Duration::from_secs(1));
        let t0 = Instant::now();
        for _ in 0..40 {
            let (d, _) = b.failed("down", t0);
            assert!(d < Duration::from_secs(1), "{d:?}");
        }
    }

    #[test]
    fn an_outage_is_logged_once_then_summarised_then_its_end() {
        let mut b = Backoff::new("rules");
        let t0 = Instant::now();
        let mut notes = Vec::new();
        // 10 minutes of failures, one attempt every 200 ms (the old pace):
        // one "lost", then one summary per 30 s, not 3000 lines.
        for i in 0..3000u32 {
            let (_, note) = b.failed("connection refused", t0 + Duration::from_millis(200) * i);
            notes.extend(note);
        }
        assert!(
            matches!(&notes[0], Note::Lost(m) if m.contains("connection refused")),
            "{notes:?}"
        );
        let summaries = notes.iter().filter(|n| matches!(n, Note::Still(_))).count();
        assert_eq!(summaries, 19, "{notes:?}");
        assert_eq!(notes.len(), 20);
        let back = b.connected(t0 + Duration::from_secs(600)).unwrap();
        assert!(
            matches!(&back, Note::Back(m) if m.contains("3000 failed attempts")),
            "{back:?}"
        );
        // Working again: nothing more to say, and the next outage starts over.
        assert_eq!(b.connected(t0 + Duration::from_secs(601)), None);
        let (wait, note) = b.failed("timeout", t0 + Duration::from_secs(602));
        assert!(matches!(note, Some(Note::Lost(_))));
        assert!(wait < Duration::from_millis(200));
    }
}
