//! The canary's judge: green against blue **of the same cell over the same
//! window** — a same-time baseline, so a slow database or a traffic spike
//! that hurts both colours fails neither.
//!
//! - Errors (5xx, timeouts included): green fails when its error ratio is
//!   above `max_error_ratio` × blue's *and* a one-sided test says so with
//!   99 % confidence (Wald test of H0: p_green ≤ ratio × p_blue) — one
//!   error among a thousand requests fails nothing by chance.
//! - Latency, from the histogram buckets: green fails when its p99
//!   (interpolated as Prometheus' `histogram_quantile` does) is above
//!   `max_p99_ratio` × blue's *and* the difference is significant: a
//!   Mann-Whitney rank test on the bucketed latencies (tie-corrected; a
//!   whole-distribution shift; 99.9 %, as it is asked at every interval),
//!   or a test that more of green's requests than blue's are slower than
//!   `max_p99_ratio` × blue's p99 (a tail that only the p99 sees; 99 %).
//!   Against an earlier baseline (a 100 % step) only the tail test counts.
//! - Fewer than `min_requests` on either colour: no verdict, wait. A canary
//!   never passes for lack of traffic.

use super::scrape::{Colour, Reading};

/// One-sided z for 99 % confidence.
pub const Z_99: f64 = 2.326;

/// One-sided z for 99.9 %: the rank test's bar. It is asked every
/// interval of every step, and over thousands of requests it notices a
/// shift far smaller than any the p99 ratio cares about.
pub const Z_999: f64 = 3.09;

/// What a canary tolerates.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Thresholds {
    /// Green's error ratio may be at most this multiple of blue's.
    pub max_error_ratio: f64,
    /// Green's p99 may be at most this multiple of blue's.
    pub max_p99_ratio: f64,
    /// Requests each colour needs in the window before any verdict.
    pub min_requests: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            max_error_ratio: 2.0,
            max_p99_ratio: 1.5,
            min_requests: 200,
        }
    }
}

/// The verdict on one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Not enough requests yet.
    Wait,
    /// Green is no worse than blue.
    Healthy,
    /// Green is worse than blue: abort.
    Failed,
}

/// One colour's figures in a judgement.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Figures {
    /// Requests in the window.
    pub requests: u64,
    /// 5xx answers (timeouts included).
    pub errors: u64,
    /// errors / requests.
    pub error_ratio: f64,
    /// p99 latency, ms (`None` without requests).
    pub p99_ms: Option<f64>,
}

/// A judgement of green against blue over one window.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Judgement {
    /// The verdict.
    pub verdict: Verdict,
    /// Green's figures.
    pub green: Figures,
    /// Blue's figures (the baseline).
    pub blue: Figures,
    /// z of the error test (positive: green worse).
    pub error_z: f64,
    /// z of the Mann-Whitney rank test (positive: green slower).
    pub rank_z: f64,
    /// z of the tail test (positive: more of green is slow).
    pub tail_z: f64,
    /// green p99 / blue p99.
    pub p99_ratio: Option<f64>,
    /// Why it failed or waits, for people.
    pub reasons: Vec<String>,
}

/// Judges green against blue over `window`.
pub fn judge(window: &Reading, t: &Thresholds) -> Judgement {
    judge_against(&window.green, &window.blue, &window.bounds, t, false)
}

/// Judges `green` against a `blue` baseline: the same cell's blue over the
/// same window, or (`earlier`, at a 100 % step) blue's last window before
/// it. An earlier baseline is not a same-time one — the machine's load may
/// have moved since — so on latency only the tail test may fail it, never
/// the rank test alone.
pub fn judge_against(
    green: &Colour,
    blue: &Colour,
    bounds: &[f64],
    t: &Thresholds,
    earlier: bool,
) -> Judgement {
    let figures = |c: &Colour| Figures {
        requests: c.requests,
        errors: c.errors,
        error_ratio: c.error_ratio(),
        p99_ms: quantile(0.99, bounds, &c.buckets).map(|s| s * 1000.0),
    };
    let (g, b) = (figures(green), figures(blue));
    let error_z = ratio_z(
        (green.errors, green.requests),
        (blue.errors, blue.requests),
        t.max_error_ratio,
    );
    let rank_z = mann_whitney_z(&green.per_bucket(), &blue.per_bucket());
    let p99_ratio = match (g.p99_ms, b.p99_ms) {
        (Some(x), Some(y)) if y > 0.0 => Some(x / y),
        _ => None,
    };
    let tail_z = b
        .p99_ms
        .map(|p99| {
            let limit = p99 / 1000.0 * t.max_p99_ratio;
            ratio_z(
                (slower_than(limit, bounds, green), green.requests),
                (slower_than(limit, bounds, blue), blue.requests),
                1.0,
            )
        })
        .unwrap_or(0.0);
    let mut reasons = Vec::new();
    let mut verdict = Verdict::Healthy;
    if green.requests < t.min_requests || blue.requests < t.min_requests {
        reasons.push(format!(
            "not enough requests to judge: green {}, blue {} (each needs {})",
            green.requests, blue.requests, t.min_requests
        ));
        verdict = Verdict::Wait;
    } else {
        if g.error_ratio > t.max_error_ratio * b.error_ratio && error_z > Z_99 {
            reasons.push(format!(
                "green's error ratio {:.2} % ({} of {}) is above {} × blue's {:.2} % ({} of {}); z = {:.1}",
                g.error_ratio * 100.0,
                g.errors,
                g.requests,
                t.max_error_ratio,
                b.error_ratio * 100.0,
                b.errors,
                b.requests,
                error_z
            ));
            verdict = Verdict::Failed;
        }
        let significant = tail_z > Z_99 || (!earlier && rank_z > Z_999);
        if p99_ratio.is_some_and(|r| r > t.max_p99_ratio) && significant {
            reasons.push(format!(
                "green's p99 {:.1} ms is above {} × blue's {:.1} ms (rank test z = {:.1}, tail test z = {:.1})",
                g.p99_ms.unwrap_or(0.0),
                t.max_p99_ratio,
                b.p99_ms.unwrap_or(0.0),
                rank_z,
                tail_z
            ));
            verdict = Verdict::Failed;
        }
    }
    Judgement {
        verdict,
        green: g,
        blue: b,
        error_z,
        rank_z,
        tail_z,
        p99_ratio,
        reasons,
    }
}

/// The `q` quantile (seconds) of a histogram with cumulative `buckets` at
/// `bounds`, interpolated linearly inside its bucket (Prometheus'
/// `histogram_quantile`); in the `+Inf` bucket, the highest finite bound.
pub fn quantile(q: f64, bounds: &[f64], buckets: &[u64]) -> Option<f64> {
    let total = *buckets.last()?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let i = buckets.iter().position(|&c| c as f64 >= rank)?;
    let upper = *bounds.get(i)?;
    let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
    if upper.is_infinite() {
        return Some(lower);
    }
    let below = if i == 0 { 0 } else { buckets[i - 1] };
    let inside = buckets[i].saturating_sub(below);
    if inside == 0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below as f64) / inside as f64)
}

/// Requests certainly slower than `limit` seconds: those in buckets whose
/// lower bound is at or above it.
fn slower_than(limit: f64, bounds: &[f64], c: &Colour) -> u64 {
    let per = c.per_bucket();
    (0..per.len())
        .filter(|&i| i > 0 && bounds.get(i - 1).is_some_and(|&lo| lo >= limit))
        .map(|i| per[i])
        .sum()
}

/// One-sided Wald test of H0: p_a ≤ ratio × p_b; its z (positive: `a`
/// above).
pub fn ratio_z(a: (u64, u64), b: (u64, u64), ratio: f64) -> f64 {
    if a.1 == 0 || b.1 == 0 {
        return 0.0;
    }
    let pa = a.0 as f64 / a.1 as f64;
    let pb = b.0 as f64 / b.1 as f64;
    let diff = pa - ratio * pb;
    let var = pa * (1.0 - pa) / a.1 as f64 + ratio * ratio * pb * (1.0 - pb) / b.1 as f64;
    if var <= 0.0 {
        // Both certain (all or none): any difference is the whole story.
        return if diff > 0.0 { f64::INFINITY } else { 0.0 };
    }
    diff / var.sqrt()
}

/// Mann-Whitney U test of `a` against `b` on the same buckets (counts per
/// bucket, ascending), tie-corrected; its z (positive: `a` larger).
pub fn mann_whitney_z(a: &[u64], b: &[u64]) -> f64 {
    let (na, nb) = (a.iter().sum::<u64>() as f64, b.iter().sum::<u64>() as f64);
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    let n = na + nb;
    let (mut u, mut below, mut ties) = (0.0, 0.0, 0.0);
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0) as f64,
            b.get(i).copied().unwrap_or(0) as f64,
        );
        u += x * (below + 0.5 * y);
        below += y;
        let t = x + y;
        ties += t * t * t - t;
    }
    let var = na * nb / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var <= 0.0 {
        return 0.0;
    }
    (u - na * nb / 2.0) / var.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUNDS: [f64; 6] = [0.001, 0.0025, 0.01, 0.025, 0.05, f64::INFINITY];

    fn colour(requests: u64, errors: u64, per: [u64; 6]) -> Colour {
        let mut sum = 0;
        Colour {
            requests,
            errors,
            buckets: per
                .iter()
                .map(|c| {
                    sum += c;
                    sum
                })
                .collect(),
        }
    }

    fn judge6(g: &Colour, b: &Colour) -> Judgement {
        judge_against(g, b, &BOUNDS, &Thresholds::default(), false)
    }

    #[test]
    fn quantiles_interpolate_inside_a_bucket() {
        let c = colour(100, 0, [50, 50, 0, 0, 0, 0]);
        assert_eq!(quantile(0.5, &BOUNDS, &c.buckets), Some(0.001));
        let p99 = quantile(0.99, &BOUNDS, &c.buckets).unwrap();
        assert!(
            (p99 - (0.001 + 0.0015 * 49.0 / 50.0)).abs() < 1e-12,
            "{p99}"
        );
        let inf = colour(10, 0, [0, 0, 0, 0, 0, 10]);
        assert_eq!(quantile(0.99, &BOUNDS, &inf.buckets), Some(0.05));
        assert_eq!(quantile(0.99, &BOUNDS, &colour(0, 0, [0; 6]).buckets), None);
    }

    #[test]
    fn five_percent_errors_against_none_fail_one_in_a_thousand_does_not() {
        let blue = colour(4000, 0, [4000, 0, 0, 0, 0, 0]);
        let bad = colour(200, 10, [200, 0, 0, 0, 0, 0]);
        let j = judge6(&bad, &blue);
        assert_eq!(j.verdict, Verdict::Failed, "{j:?}");
        assert!(
            j.reasons[0].contains("5.00 % (10 of 200)"),
            "{:?}",
            j.reasons
        );
        let rare = colour(1000, 1, [1000, 0, 0, 0, 0, 0]);
        assert_eq!(judge6(&rare, &blue).verdict, Verdict::Healthy);
        // Both colours equally bad (a shared dependency): green is fine.
        let blue_bad = colour(4000, 200, [4000, 0, 0, 0, 0, 0]);
        assert_eq!(judge6(&bad, &blue_bad).verdict, Verdict::Healthy);
    }

    #[test]
    fn a_slower_green_fails_on_latency_a_similar_one_does_not() {
        let blue = colour(4000, 0, [3000, 990, 10, 0, 0, 0]);
        // Every green request 30 ms slower.
        let slow = colour(300, 0, [0, 0, 0, 0, 297, 3]);
        let j = judge6(&slow, &blue);
        assert_eq!(j.verdict, Verdict::Failed, "{j:?}");
        assert!(j.reasons[0].contains("p99"), "{:?}", j.reasons);
        // Only its tail slower: 3 % of green requests took 30 ms more.
        let tail = colour(1000, 0, [750, 220, 0, 0, 30, 0]);
        assert_eq!(judge6(&tail, &blue).verdict, Verdict::Failed);
        let same = colour(400, 0, [300, 99, 1, 0, 0, 0]);
        let j = judge6(&same, &blue);
        assert_eq!(j.verdict, Verdict::Healthy, "{j:?}");
        assert!(j.rank_z.abs() < Z_99);
    }

    #[test]
    fn an_earlier_baseline_is_not_failed_on_a_small_shift_alone() {
        // Green's whole distribution a little slower than blue's earlier
        // window (the machine got busier): the rank test sees it, the tail
        // test does not — no abort at a 100 % step.
        let blue = colour(1700, 0, [0, 1200, 480, 20, 0, 0]);
        let green = colour(1450, 0, [0, 900, 500, 50, 0, 0]);
        let same = judge_against(&green, &blue, &BOUNDS, &Thresholds::default(), false);
        let earlier = judge_against(&green, &blue, &BOUNDS, &Thresholds::default(), true);
        assert!(same.rank_z > Z_999, "{same:?}");
        assert!(same.tail_z < Z_99, "{same:?}");
        assert_eq!(earlier.verdict, Verdict::Healthy, "{earlier:?}");
        // Every green request 30 ms slower fails either way.
        let slow = colour(300, 0, [0, 0, 0, 0, 297, 3]);
        let j = judge_against(&slow, &blue, &BOUNDS, &Thresholds::default(), true);
        assert_eq!(j.verdict, Verdict::Failed, "{j:?}");
    }

    #[test]
    fn too_few_requests_wait_even_when_green_looks_bad() {
        let blue = colour(4000, 0, [4000, 0, 0, 0, 0, 0]);
        let few = colour(50, 50, [50, 0, 0, 0, 0, 0]);
        let j = judge6(&few, &blue);
        assert_eq!(j.verdict, Verdict::Wait);
        assert!(j.reasons[0].contains("green 50"), "{:?}", j.reasons);
    }

    #[test]
    fn rank_test_matches_a_hand_computed_u() {
        // a = {1, 2}, b = {2, 3} on buckets 1, 2, 3: U_a = 0 + 0.5 = 0.5.
        let z = mann_whitney_z(&[1, 1, 0], &[0, 1, 1]);
        // mean 2, ties: bucket 2 holds 2 → (8 - 2) = 6; var = 4/12 * (5 - 6/12) = 1.5
        assert!((z - (0.5 - 2.0) / 1.5f64.sqrt()).abs() < 1e-12, "{z}");
    }
}
