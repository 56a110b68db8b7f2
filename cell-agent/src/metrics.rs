//! Prometheus metrics of a cell agent (registry passed in; bounded labels:
//! route template, status class, order state — never a user id).

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::store::Stats;

/// The agent's metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    registry: Registry,
    requests: IntCounterVec,
    duration: HistogramVec,
    /// Time for a write to be committed (fsynced) and answered.
    pub db_latency: Histogram,
    balance_total: Gauge,
    orders: IntGaugeVec,
    outbox_backlog: IntGauge,
    outbox_oldest_ms: IntGauge,
    outbox_overdue: IntGauge,
    transfers_failed: IntGauge,
    /// Cross-cell deliveries by result (`ok`, `error`, `refused`).
    pub deliveries: IntCounterVec,
    /// Failures to read the data figures for `/metrics`.
    pub stats_errors: IntCounter,
    /// Writes refused to keep the cell responsive, by reason
    /// (`overloaded`: queue full; `write_expired`: not started in time).
    pub writes_shed: IntCounterVec,
    /// Records pruned past the retention, by kind (`idempotency`,
    /// `outbox`, `inbox`).
    pub pruned: IntCounterVec,
    /// Journal batches committed here but not acknowledged by the standby.
    pub replication_lag_lsn: IntGauge,
    /// Time from a batch's commit to the standby's acknowledgement.
    pub replication_ack_seconds: Histogram,
    /// 1 while the shard runs without a synchronous standby.
    pub replication_degraded: IntGauge,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

const CLASSES: [&str; 6] = ["0xx", "1xx", "2xx", "3xx", "4xx", "5xx"];

impl AgentMetrics {
    /// Creates and registers the metrics.
    pub fn new(registry: Registry) -> prometheus::Result<Self> {
        let buckets = vec![
            0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
        ];
        let m = AgentMetrics {
            requests: IntCounterVec::new(
                Opts::new("cell_requests_total", "Requests by route and status class."),
                &["route", "code_class"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new("cell_request_duration_seconds", "Request latency by route.")
                    .buckets(buckets.clone()),
                &["route"],
            )?,
            db_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "cell_db_write_seconds",
                    "Time from a write being queued to its durable commit.",
                )
                .buckets(buckets),
            )?,
            balance_total: Gauge::new(
                "cell_balance_total_minor_units",
                "Sum of all balances in the cell (minor units; summed in 128 bits, exposed as a float).",
            )?,
            orders: IntGaugeVec::new(Opts::new("cell_orders", "Orders by state."), &["state"])?,
            outbox_backlog: IntGauge::new(
                "cell_outbox_backlog",
                "Cross-cell transfers not yet acknowledged by the payee's cell.",
            )?,
            outbox_oldest_ms: IntGauge::new(
                "cell_outbox_oldest_age_milliseconds",
                "Age of the oldest unacknowledged cross-cell transfer.",
            )?,
            outbox_overdue: IntGauge::new(
                "cell_outbox_overdue",
                "Cross-cell transfers still unacknowledged after --outbox-alert-after.",
            )?,
            transfers_failed: IntGauge::new(
                "cell_transfers_failed",
                "Cross-cell transfers the payee's cell refused (payer refunded).",
            )?,
            stats_errors: IntCounter::new(
                "cell_stats_errors_total",
                "Times the data figures of /metrics could not be read from the store.",
            )?,
            pruned: IntCounterVec::new(
                Opts::new(
                    "cell_pruned_total",
                    "Records removed past --idempotency-retention, by kind (idempotency, outbox, inbox).",
                ),
                &["kind"],
            )?,
            writes_shed: IntCounterVec::new(
                Opts::new(
                    "cell_writes_shed_total",
                    "Writes refused unapplied to keep the cell responsive (overloaded = queue full, write_expired = not started before its deadline).",
                ),
                &["reason"],
            )?,
            replication_lag_lsn: IntGauge::new(
                "cellgate_replication_lag_lsn",
                "Journal batches of this shard committed but not yet acknowledged by its standby.",
            )?,
            replication_ack_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "cellgate_replication_ack_seconds",
                    "Time from a batch's commit to its standby's acknowledgement.",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
                ]),
            )?,
            replication_degraded: IntGauge::new(
                "cellgate_replication_degraded",
                "1 while this shard runs without a synchronous standby (writes acknowledged without the standby's ack).",
            )?,
            deliveries: IntCounterVec::new(
                Opts::new(
                    "cell_outbox_deliveries_total",
                    "Cross-cell credit delivery attempts by result (ok, error = retried, refused = refunded).",
                ),
                &["result"],
            )?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.requests.clone()))?;
        r.register(Box::new(m.duration.clone()))?;
        r.register(Box::new(m.db_latency.clone()))?;
        r.register(Box::new(m.balance_total.clone()))?;
        r.register(Box::new(m.orders.clone()))?;
        r.register(Box::new(m.outbox_backlog.clone()))?;
        r.register(Box::new(m.outbox_oldest_ms.clone()))?;
        r.register(Box::new(m.deliveries.clone()))?;
        r.register(Box::new(m.outbox_overdue.clone()))?;
        r.register(Box::new(m.transfers_failed.clone()))?;
        r.register(Box::new(m.stats_errors.clone()))?;
        r.register(Box::new(m.writes_shed.clone()))?;
        r.register(Box::new(m.pruned.clone()))?;
        r.register(Box::new(m.replication_lag_lsn.clone()))?;
        r.register(Box::new(m.replication_ack_seconds.clone()))?;
        r.register(Box::new(m.replication_degraded.clone()))?;
        Ok(m)
    }

    /// Records one request.
    pub fn observe(&self, route: &str, status: u16, seconds: f64) {
        let class = CLASSES[(status / 100).min(5) as usize];
        self.requests.with_label_values(&[route, class]).inc();
        self.duration.with_label_values(&[route]).observe(seconds);
    }

    /// Sets the data gauges from `stats`.
    pub fn set_stats(&self, stats: &Stats) {
        self.balance_total.set(stats.balance_total as f64);
        for state in ["created", "tried", "paid", "cancelled"] {
            let n = stats
                .orders_by_state
                .iter()
                .find(|(s, _)| s == state)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            self.orders.with_label_values(&[state]).set(n);
        }
        self.outbox_backlog.set(stats.outbox_backlog);
        self.outbox_oldest_ms.set(stats.outbox_oldest_age_ms);
        self.outbox_overdue.set(stats.outbox_overdue);
        self.transfers_failed.set(stats.transfers_failed);
    }

    /// Text exposition.
    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}
