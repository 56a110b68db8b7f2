//! Prometheus metrics of the gateway. The registry is passed in (never a
//! global), so tests and several gateways in one process do not collide.
//! Label sets are bounded: cell, colour, status class, error kind, instance
//! address — never a user id.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets (seconds) for request durations: 250 µs to 10 s.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Status classes used as `code_class` label values, indexed by
/// status/100 − 1 (HTTP statuses start at 100: there is no "0xx").
pub const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Kinds of upstream error (`kind` label of `cellgate_upstream_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// TCP connect failed or timed out.
    Connect,
    /// No response headers within the request timeout.
    Timeout,
    /// The connection failed after the request was sent.
    Reset,
    /// The instance's connection cap was reached and no connection freed in time.
    Saturated,
    /// The upstream answered 5xx.
    Status5xx,
    /// The active checks found the instance down while a request waited
    /// for its answer.
    Lost,
}

impl UpstreamErrorKind {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Saturated => "saturated",
            UpstreamErrorKind::Status5xx => "5xx",
            UpstreamErrorKind::Lost => "lost",
        }
    }
}

/// All gateway metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `cellgate_requests_total{cell,colour,code_class}`.
    pub requests: IntCounterVec,
    /// `cellgate_request_duration_seconds{cell,colour}`: until response headers.
    pub duration: HistogramVec,
    /// `cellgate_upstream_errors_total{cell,colour,kind}`.
    pub upstream_errors: IntCounterVec,
    /// `cellgate_failovers_total{from,to}`: requests served by a backup cell.
    pub failovers: IntCounterVec,
    /// `cellgate_retries_total{cell,colour}`: attempts after the first.
    pub retries: IntCounterVec,
    /// `cellgate_rejected_total{reason}`: requests answered by the gateway itself.
    pub rejected: IntCounterVec,
    /// `cellgate_retries_denied_total`: retries the budget refused.
    pub retries_denied: IntCounter,
    /// `cellgate_held_requests_total{outcome}`: requests answered 421 and
    /// held for newer rules (released, timeout, overflow).
    pub held: IntCounterVec,
    /// `cellgate_hold_seconds`: how long held requests waited.
    pub hold_seconds: Histogram,
    /// `cellgate_auto_failovers_total{outcome}`: shards this gateway failed
    /// over (`ok`), found failed over by another (`done_elsewhere`), or
    /// could not (`refused`).
    pub auto_failovers: IntCounterVec,
    /// `cellgate_client_errors_total{kind}`: clients that were too slow or
    /// broke the protocol (never counted against a cell).
    pub client_errors: IntCounterVec,
    /// `cellgate_ejections_total{cell}`: instances passively ejected.
    pub ejections: IntCounterVec,
    /// `cellgate_access_log_dropped_total`: access-log lines dropped
    /// because the writer fell behind.
    pub access_log_dropped: IntCounter,
    /// `cellgate_rules_revision`.
    pub rules_revision: IntGauge,
    /// `cellgate_rules_reloads_total{result}` (`ok` / `error`).
    pub reloads: IntCounterVec,
    /// `cellgate_instance_up{cell,colour,instance}`.
    pub instance_up: IntGaugeVec,
    /// `cellgate_cell_inflight{cell}`.
    pub cell_inflight: IntGaugeVec,
    /// `cellgate_control_plane_up`: 1 while the etcd session is healthy.
    pub control_plane_up: IntGauge,
    /// `cellgate_rules_from_saved_state`: 1 while serving rules booted from
    /// the state dir without confirmation from etcd.
    pub rules_from_saved_state: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(
    r: &Registry,
    c: T,
) -> prometheus::Result<T> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: Registry) -> prometheus::Result<Self> {
        let r = &registry;
        Ok(Metrics {
            requests: reg(
                r,
                IntCounterVec::new(
                    Opts::new("cellgate_requests_total", "Requests by serving cell, colour and status class."),
                    &["cell", "colour", "code_class"],
                )?,
            )?,
            duration: reg(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "cellgate_request_duration_seconds",
                        "Time from request received to response headers sent, by serving cell and colour.",
                    )
                    .buckets(DURATION_BUCKETS.to_vec()),
                    &["cell", "colour"],
                )?,
            )?,
            upstream_errors: reg(
                r,
                IntCounterVec::new(
                    Opts::new("cellgate_upstream_errors_total", "Upstream failures by cell, colour and kind (connect, timeout, reset, saturated, 5xx)."),
                    &["cell", "colour", "kind"],
                )?,
            )?,
            failovers: reg(
                r,
                IntCounterVec::new(
                    Opts::new("cellgate_failovers_total", "Requests served by a backup cell instead of their home cell."),
                    &["from", "to"],
                )?,
            )?,
            retries: reg(
                r,
                IntCounterVec::new(
                    Opts::new("cellgate_retries_total", "Upstream attempts after the first, by the cell and colour retried on."),
                    &["cell", "colour"],
                )?,
            )?,
            rejected: reg(
                r,
                IntCounterVec::new(
                    Opts::new("cellgate_rejected_total", "Requests the gateway answered itself (missing_key, malformed_key, internal_path, cell_overloaded, no_upstream, upstream_timeout)."),
                    &["reason"],
                )?,
            )?,
            retries_denied: reg(
                r,
                IntCounter::new("cellgate_retries_denied_total", "Retries refused by the retry budget (the request failed instead).")?,
            )?,
            held: reg(
                r,
                IntCounterVec::new(
                    Opts::new("cellgate_held_requests_total", "Requests a cell answered 421 Misdirected (shard moving, or stale rules) that the gateway held for newer rules: released (sent again to the new owner), timeout or overflow (answered 503 shard_moving)."),
                    &["outcome"],
                )?,
            )?,
            hold_seconds: reg(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "cellgate_hold_seconds",
                        "Time requests were held for newer rules (see cellgate_held_requests_total).",
                    )
                    .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0]),
                )?,
            )?,
            auto_failovers: reg(
                r,
                IntCounterVec::new(
                    Opts::new("cellgate_auto_failovers_total", "Shards this gateway tried to fail over because every instance of their cell was down (--auto-failover): ok, done_elsewhere (another gateway did), refused (e.g. the standby not recorded in sync)."),
                    &["outcome"],
                )?,
            )?,
            client_errors: reg(
                r,
                IntCounterVec::new(
                    Opts::new("cellgate_client_errors_total", "Client connections ended for the client's own fault: body_timeout, send_timeout, idle_timeout, header_timeout, bad_request."),
                    &["kind"],
                )?,
            )?,
            access_log_dropped: reg(
                r,
                IntCounter::new(
                    "cellgate_access_log_dropped_total",
                    "Access-log lines dropped because the log writer fell behind (the queue of 16384 lines was full).",
                )?,
            )?,
            ejections: reg(
                r,
                IntCounterVec::new(
                    Opts::new("cellgate_ejections_total", "Instances passively ejected (connect failures, 5xx or timeout streaks), by cell."),
                    &["cell"],
                )?,
            )?,
            rules_revision: reg(
                r,
                IntGauge::new("cellgate_rules_revision", "Revision of the rules being served.")?,
            )?,
            reloads: reg(
                r,
                IntCounterVec::new(
                    Opts::new("cellgate_rules_reloads_total", "Rules reload attempts by result (ok, error)."),
                    &["result"],
                )?,
            )?,
            instance_up: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("cellgate_instance_up", "1 when the instance passes health checks and is not ejected."),
                    &["cell", "colour", "instance"],
                )?,
            )?,
            cell_inflight: reg(
                r,
                IntGaugeVec::new(
                    Opts::new("cellgate_cell_inflight", "Requests in flight per serving cell."),
                    &["cell"],
                )?,
            )?,
            control_plane_up: reg(
                r,
                IntGauge::new("cellgate_control_plane_up", "1 while the gateway's etcd session is healthy (always 0 with --rules FILE).")?,
            )?,
            rules_from_saved_state: reg(
                r,
                IntGauge::new("cellgate_rules_from_saved_state", "1 while serving rules booted from --state-dir because etcd was unreachable.")?,
            )?,
            registry,
        })
    }

    /// Counts a client connection ended for the client's own fault.
    pub fn client_error(&self, kind: &str) {
        self.client_errors.with_label_values(&[kind]).inc();
    }

    /// The registry holding these metrics.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Text exposition of every metric in the registry.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let enc = TextEncoder::new();
        if enc.encode(&self.registry.gather(), &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Counts one upstream failure of `kind` at a (cell, colour).
    pub fn upstream_error(&self, cell: &str, colour: &str, kind: UpstreamErrorKind) {
        self.upstream_errors
            .with_label_values(&[cell, colour, kind.as_str()])
            .inc();
    }

    /// Pre-bound per-(cell, colour) handles, so the hot path does no label
    /// lookups.
    pub fn bind(&self, cell: &str, colour: &str) -> BoundMetrics {
        BoundMetrics {
            requests: std::array::from_fn(|i| {
                self.requests
                    .with_label_values(&[cell, colour, CODE_CLASSES[i]])
            }),
            duration: self.duration.with_label_values(&[cell, colour]),
        }
    }
}

/// Metric handles bound to one (cell, colour).
#[derive(Clone, Debug)]
pub struct BoundMetrics {
    requests: [IntCounter; 5],
    duration: Histogram,
}

impl BoundMetrics {
    /// Records one finished request.
    #[inline]
    pub fn observe(&self, status: u16, seconds: f64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.requests[class].inc();
        self.duration.observe(seconds);
    }
}
