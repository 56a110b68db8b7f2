//! What a canary judges with: one cell's requests by colour, read from the
//! gateways' own Prometheus exposition (`cellgate_requests_total`,
//! `cellgate_request_duration_seconds`, `cellgate_rules_revision`).
//!
//! A reading is a set of counters; a window is the difference of two
//! readings of the same gateways (a counter that went down — the gateway
//! restarted — counts from zero).

use std::collections::BTreeMap;

/// The upper bounds (seconds) of a latency histogram's buckets, ascending,
/// the last one `+Inf`.
pub type Bounds = Vec<f64>;

/// One colour's requests over a window (or since a gateway started).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Colour {
    /// Requests answered.
    pub requests: u64,
    /// Of them, answered 5xx (the gateway's own 502/503/504 for the
    /// colour's instances included: timeouts count as errors).
    pub errors: u64,
    /// Cumulative bucket counts, one per bound of [`Reading::bounds`].
    #[serde(skip)]
    pub buckets: Vec<u64>,
}

impl Colour {
    /// Error ratio (0 without requests).
    pub fn error_ratio(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// Per-bucket (not cumulative) counts.
    pub fn per_bucket(&self) -> Vec<u64> {
        let mut prev = 0;
        self.buckets
            .iter()
            .map(|&c| {
                let d = c.saturating_sub(prev);
                prev = c.max(prev);
                d
            })
            .collect()
    }

    fn add(&mut self, other: &Colour) {
        self.requests += other.requests;
        self.errors += other.errors;
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
    }

    fn since(&self, before: &Colour) -> Colour {
        // A counter that went down restarted from zero.
        let reset = self.requests < before.requests;
        let d = |now: u64, then: u64| if reset { now } else { now.saturating_sub(then) };
        Colour {
            requests: d(self.requests, before.requests),
            errors: d(self.errors, before.errors),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .map(|(i, &c)| d(c, before.buckets.get(i).copied().unwrap_or(0)))
                .collect(),
        }
    }
}

/// One cell's counters as one or more gateways expose them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// Blue's counters.
    pub blue: Colour,
    /// Green's counters.
    pub green: Colour,
    /// The histogram's bucket bounds.
    pub bounds: Bounds,
    /// The lowest rules revision among the gateways read (`None`: none
    /// exposes one).
    pub revision: Option<u64>,
}

impl Reading {
    /// Reads `cell`'s counters from one gateway's exposition text.
    pub fn parse(text: &str, cell: &str) -> Reading {
        let mut r = Reading::default();
        let mut buckets: BTreeMap<(&str, u64), u64> = BTreeMap::new();
        for line in text.lines() {
            let Some(s) = sample(line) else { continue };
            match s.name {
                // Several series (a Prometheus federation of several
                // gateways): the lowest revision, the sum of counters.
                "cellgate_rules_revision" => {
                    let v = s.value as u64;
                    r.revision = Some(r.revision.map_or(v, |x| x.min(v)));
                }
                "cellgate_requests_total" if s.label("cell") == Some(cell) => {
                    let Some(c) = colour_of(&mut r, s.label("colour")) else {
                        continue;
                    };
                    c.requests += s.value as u64;
                    if s.label("code_class") == Some("5xx") {
                        c.errors += s.value as u64;
                    }
                }
                "cellgate_request_duration_seconds_bucket" if s.label("cell") == Some(cell) => {
                    let (Some(colour), Some(le)) = (s.label("colour"), s.label("le")) else {
                        continue;
                    };
                    let le: f64 = if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        match le.parse() {
                            Ok(v) => v,
                            Err(_) => continue,
                        }
                    };
                    let colour = if colour == "green" { "green" } else { "blue" };
                    *buckets.entry((colour, le.to_bits())).or_default() += s.value as u64;
                }
                _ => {}
            }
        }
        let mut bounds: Vec<f64> = buckets.keys().map(|(_, b)| f64::from_bits(*b)).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        for (colour, c) in [("blue", &mut r.blue), ("green", &mut r.green)] {
            c.buckets = bounds
                .iter()
                .map(|b| buckets.get(&(colour, b.to_bits())).copied().unwrap_or(0))
                .collect();
        }
        r.bounds = bounds;
        r
    }

    /// The sum of several gateways' readings (the lowest revision).
    pub fn sum<'a>(readings: impl IntoIterator<Item = &'a Reading>) -> Reading {
        let mut total = Reading::default();
        let mut first = true;
        for r in readings {
            if total.bounds.len() < r.bounds.len() {
                total.bounds = r.bounds.clone();
            }
            total.blue.add(&r.blue);
            total.green.add(&r.green);
            total.revision = match (first, total.revision, r.revision) {
                (true, _, rev) => rev,
                (false, Some(a), Some(b)) => Some(a.min(b)),
                _ => None,
            };
            first = false;
        }
        total
    }

    /// The window from `before` to this reading.
    pub fn since(&self, before: &Reading) -> Reading {
        Reading {
            blue: self.blue.since(&before.blue),
            green: self.green.since(&before.green),
            bounds: self.bounds.clone(),
            revision: self.revision,
        }
    }
}

fn colour_of<'r>(r: &'r mut Reading, colour: Option<&str>) -> Option<&'r mut Colour> {
    match colour? {
        "blue" => Some(&mut r.blue),
        "green" => Some(&mut r.green),
        _ => None,
    }
}

/// One sample line of the text exposition.
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, &'a str)>,
    value: f64,
}

impl<'a> Sample<'a> {
    fn label(&self, name: &str) -> Option<&'a str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| *v)
    }
}

/// Parses `name{k="v",...} value [timestamp]` (label values as the
/// gateway writes them: no escaped quotes); `None` for comments and
/// anything else.
fn sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (head, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].find('}')?;
            (&line[..close + 1], &line[close + 1..])
        }
        None => line.split_at(line.find(' ')?),
    };
    let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((n, l)) => (n, l.strip_suffix('}')?),
        None => (head, ""),
    };
    let labels = labels
        .split(',')
        .filter(|p| !p.is_empty())
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            Some((k.trim(), v.trim().strip_prefix('"')?.strip_suffix('"')?))
        })
        .collect();
    Some(Sample {
        name,
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP cellgate_requests_total Requests.
# TYPE cellgate_requests_total counter
cellgate_requests_total{cell="cell-a",code_class="2xx",colour="blue"} 90
cellgate_requests_total{cell="cell-a",code_class="5xx",colour="blue"} 10
cellgate_requests_total{cell="cell-a",code_class="2xx",colour="green"} 20
cellgate_requests_total{cell="cell-b",code_class="5xx",colour="green"} 7
cellgate_request_duration_seconds_bucket{cell="cell-a",colour="blue",le="0.001"} 50
cellgate_request_duration_seconds_bucket{cell="cell-a",colour="blue",le="0.01"} 100
cellgate_request_duration_seconds_bucket{cell="cell-a",colour="blue",le="+Inf"} 100
cellgate_request_duration_seconds_bucket{cell="cell-a",colour="green",le="0.001"} 0
cellgate_request_duration_seconds_bucket{cell="cell-a",colour="green",le="0.01"} 20
cellgate_request_duration_seconds_bucket{cell="cell-a",colour="green",le="+Inf"} 20
cellgate_rules_revision 12
"#;

    #[test]
    fn reads_one_cells_counters_by_colour() {
        let r = Reading::parse(TEXT, "cell-a");
        assert_eq!((r.blue.requests, r.blue.errors), (100, 10));
        assert_eq!((r.green.requests, r.green.errors), (20, 0));
        assert_eq!(r.bounds, vec![0.001, 0.01, f64::INFINITY]);
        assert_eq!(r.blue.buckets, vec![50, 100, 100]);
        assert_eq!(r.green.per_bucket(), vec![0, 20, 0]);
        assert_eq!(r.revision, Some(12));
        let b = Reading::parse(TEXT, "cell-b");
        assert_eq!((b.green.requests, b.green.errors), (7, 7));
    }

    #[test]
    fn a_federation_of_two_gateways_is_summed() {
        // Prometheus' /federate: one series per gateway, with its labels
        // and a timestamp.
        let fed = r#"# TYPE cellgate_requests_total untyped
cellgate_requests_total{cell="cell-a",code_class="2xx",colour="green",instance="127.0.0.1:1",job="gw"} 30 1733100000000
cellgate_requests_total{cell="cell-a",code_class="2xx",colour="green",instance="127.0.0.1:2",job="gw"} 12 1733100000000
cellgate_request_duration_seconds_bucket{cell="cell-a",colour="green",instance="127.0.0.1:1",job="gw",le="+Inf"} 30 1733100000000
cellgate_request_duration_seconds_bucket{cell="cell-a",colour="green",instance="127.0.0.1:2",job="gw",le="+Inf"} 12 1733100000000
cellgate_rules_revision{instance="127.0.0.1:1",job="gw"} 7 1733100000000
cellgate_rules_revision{instance="127.0.0.1:2",job="gw"} 6 1733100000000
"#;
        let r = Reading::parse(fed, "cell-a");
        assert_eq!(r.green.requests, 42);
        assert_eq!(r.green.buckets, vec![42]);
        assert_eq!(r.revision, Some(6), "the lowest revision served");
    }

    #[test]
    fn a_window_is_the_difference_and_survives_a_restart() {
        let before = Reading::parse(TEXT, "cell-a");
        let later = TEXT.replace("} 90", "} 190").replace("} 100\n", "} 200\n");
        let w = Reading::parse(&later, "cell-a").since(&before);
        assert_eq!(w.blue.requests, 100);
        assert_eq!(w.blue.errors, 0);
        // The gateway restarted: its counters start again from zero.
        let restarted = TEXT.replace("} 90", "} 3").replace("} 10\n", "} 0\n");
        let w = Reading::parse(&restarted, "cell-a").since(&before);
        assert_eq!(w.blue.requests, 3);
        let two = Reading::sum([&before, &Reading::parse(&restarted, "cell-a")]);
        assert_eq!(two.blue.requests, 103);
        assert_eq!(two.revision, Some(12));
    }
}
