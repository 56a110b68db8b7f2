//! `cellgate serve` configuration: flags, their defaults and their checks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Flags of `cellgate serve`. Every duration is in milliseconds.
#[derive(Debug, Clone, Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["rules", "etcd"])))]
pub struct ServeConfig {
    /// Rules document (TOML). Watched: a valid change is applied atomically,
    /// an invalid one is logged, counted and ignored.
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,

    /// Follow the rules in etcd instead of a file (needs a build with the
    /// `etcd` feature). Env CELLGATE_ETCD.
    #[arg(long, value_name = "URL[,URL...]", env = "CELLGATE_ETCD")]
    pub etcd: Option<String>,

    /// Cluster name in etcd (keys under /cellgate/NAME/). Env CELLGATE_CLUSTER.
    #[arg(
        long,
        value_name = "NAME",
        env = "CELLGATE_CLUSTER",
        default_value = "default"
    )]
    pub cluster: String,

    /// With --etcd: where the last good rules are saved, to boot from when
    /// etcd is unreachable at start.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// With --etcd: this gateway's id in /cellgate/NAME/gateways/ (default: host-pid).
    #[arg(long, value_name = "ID")]
    pub gateway_id: Option<String>,

    /// Address of the proxy listener (HTTP/1.1, and HTTP/2 with prior knowledge).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080", value_parser = routing_rules::net::parse_listen)]
    pub listen: SocketAddr,

    /// Address of the admin listener (/metrics, /admin/*, /healthz, /readyz).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9090", value_parser = routing_rules::net::parse_listen)]
    pub admin: SocketAddr,

    /// Bearer token required on /metrics and /admin/* (env CELLGATE_ADMIN_TOKEN).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "CELLGATE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,

    /// Tokio worker threads (1 = a single-threaded runtime). Default: one per core.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Upstream TCP connect timeout.
    #[arg(long, value_name = "MS", default_value_t = 1_000)]
    pub connect_timeout_ms: u64,

    /// Time from sending a request upstream (its body included) to the
    /// response headers (504 after); also the longest wait for more of a
    /// response body (the response is cut off after).
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// Most connections (= requests in flight) per upstream instance.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_conns_per_instance: usize,

    /// Most requests in flight per serving cell; beyond it, a fast 503 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = 2_048)]
    pub cell_max_inflight: usize,

    /// Attempts per request (first try + retries on another instance or cell).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub max_attempts: usize,

    /// Path of the active health check (HTTP GET, 2xx = healthy). The cell
    /// agent's /readyz answers 2xx only while it can take writes.
    #[arg(long, value_name = "PATH", default_value = "/readyz")]
    pub health_path: String,

    /// Interval between active health checks of each instance.
    #[arg(long, value_name = "MS", default_value_t = 1_000)]
    pub health_interval_ms: u64,

    /// Timeout of one active health check.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub health_timeout_ms: u64,

    /// Consecutive successful checks that mark a down instance up.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub health_rise: u32,

    /// Consecutive failed checks that mark an up instance down.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub health_fall: u32,

    /// Consecutive 5xx responses that eject an instance (passive check).
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub eject_5xx_streak: u32,

    /// First ejection time; doubles with each consecutive ejection.
    #[arg(long, value_name = "MS", default_value_t = 1_000)]
    pub eject_base_ms: u64,

    /// Longest ejection time.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub eject_max_ms: u64,

    /// Most instances of a cell ejected at once, in percent (at least one
    /// may be; the last up instance of a colour never is).
    #[arg(long, value_name = "PERCENT", default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_ejection_percent: u32,

    /// Retries allowed as a share of requests over the last 10 s, in
    /// percent (on top of --retry-min-per-s).
    #[arg(long, value_name = "PERCENT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub retry_budget_percent: u32,

    /// Retries always allowed per second, whatever the budget.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub retry_min_per_s: u32,

    /// How long a request the cell answered `421 Misdirected` (its shard is
    /// moving in a switchover, or the gateway's rules are stale) is held
    /// for newer rules (or a health change) before it is routed again; 0 passes
    /// the 421 on. Only requests whose body was read in full (up to
    /// --client-body-buffer-bytes) are held. After the wait: 503
    /// `shard_moving` with Retry-After.
    #[arg(long, value_name = "MS", default_value_t = 2_000, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub hold_ms: u64,

    /// Fail a cell's replicated shard over to its standby (with its data,
    /// as `cellctl failover` does) when the health checks see every
    /// instance of the cell down for --auto-failover-after-ms more, the
    /// cell's policy is `auto`, its standby is up and recorded in sync.
    /// Needs the cells' secret (--internal-secret-file).
    #[arg(long)]
    pub auto_failover: bool,

    /// With --auto-failover: how long a cell must stay down after the
    /// health checks marked it so, ms.
    #[arg(long, value_name = "MS", default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub auto_failover_after_ms: u64,

    /// With --auto-failover: the cells' shared secret for their internal
    /// listeners (env CELLGATE_INTERNAL_SECRET_FILE).
    #[arg(long, value_name = "PATH", env = "CELLGATE_INTERNAL_SECRET_FILE")]
    pub internal_secret_file: Option<PathBuf>,

    /// Most requests held at once (see --hold-ms); one more gets 503
    /// `shard_moving` at once.
    #[arg(long, value_name = "N", default_value_t = 4_096, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub hold_queue: u32,
    /// Write an access log: one JSON line per request (time, request id,
    /// method, path, status, cell, colour, slot, upstream, attempts,
    /// duration, hashed user id) to PATH (appended) or `-` (stdout).
    /// Off by default.
    #[arg(long, value_name = "PATH|-")]
    pub access_log: Option<crate::access_log::Target>,
    /// Log the user id itself in the access log, not only its hash.
    #[arg(long, requires = "access_log")]
    pub access_log_user_ids: bool,

    /// Request bodies up to this size are read in full before an upstream
    /// connection is taken; larger ones are streamed once this much arrived.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1..=16 * 1024 * 1024))]
    pub client_body_buffer_bytes: u64,

    /// Longest wait for more of a request body (408 and close after); a
    /// client's slowness is never counted against the cell.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub client_body_timeout_ms: u64,

    /// Longest a client may leave response bytes unread (like nginx's
    /// send_timeout); the connection is closed after, freeing the cell.
    #[arg(long, value_name = "MS", default_value_t = 60_000)]
    pub send_timeout_ms: u64,

    /// A client connection with no request in progress is closed after
    /// this long (HTTP/1.1 keep-alive and HTTP/2 alike; also the time for
    /// the first request head).
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub idle_timeout_ms: u64,

    /// Largest request head (request line and headers); 431 beyond.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1024..=1024 * 1024))]
    pub max_head_bytes: u64,

    /// Most client connections open on the proxy listener; further clients
    /// wait in the kernel's accept queue. The admin listener has its own
    /// small reserve.
    #[arg(long, value_name = "N", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,

    /// Most concurrent streams per HTTP/2 connection.
    #[arg(long, value_name = "N", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub http2_max_streams: u32,

    /// Largest rules document accepted (a larger file is refused before it
    /// is read).
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_rules_bytes: u64,

    /// How often the rules file is checked for changes, besides the file
    /// system's change events (which wake the check at once).
    #[arg(long, value_name = "MS", default_value_t = 200)]
    pub reload_interval_ms: u64,

    /// On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub drain_timeout_ms: u64,

    /// Add the routing decision to responses (x-cellgate-* headers), for debugging.
    #[arg(long)]
    pub debug_headers: bool,
}

/// A flag value that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--{flag}: {message}")]
pub struct ConfigError {
    /// The flag.
    pub flag: &'static str,
    /// Why.
    pub message: String,
}

impl ServeConfig {
    /// A configuration with every default, for `rules`, listening on
    /// ephemeral loopback ports (tests and embedding).
    pub fn for_tests(rules: PathBuf) -> Self {
        ServeConfig {
            rules: Some(rules),
            etcd: None,
            cluster: "default".into(),
            state_dir: None,
            gateway_id: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_token: None,
            workers: None,
            connect_timeout_ms: 1_000,
            request_timeout_ms: 30_000,
            max_conns_per_instance: 256,
            cell_max_inflight: 2_048,
            max_attempts: 3,
            health_path: "/readyz".into(),
            health_interval_ms: 1_000,
            health_timeout_ms: 500,
            health_rise: 2,
            health_fall: 2,
            eject_5xx_streak: 5,
            eject_base_ms: 1_000,
            eject_max_ms: 30_000,
            max_ejection_percent: 50,
            retry_budget_percent: 20,
            retry_min_per_s: 10,
            client_body_buffer_bytes: 64 * 1024,
            hold_ms: 2_000,
            hold_queue: 4_096,
            access_log: None,
            access_log_user_ids: false,
            auto_failover: false,
            auto_failover_after_ms: 0,
            internal_secret_file: None,
            client_body_timeout_ms: 10_000,
            send_timeout_ms: 60_000,
            idle_timeout_ms: 30_000,
            max_head_bytes: 64 * 1024,
            max_connections: 10_000,
            http2_max_streams: 128,
            max_rules_bytes: 64 * 1024 * 1024,
            reload_interval_ms: 200,
            drain_timeout_ms: 10_000,
            debug_headers: false,
        }
    }

    /// Checks values that clap's types cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |flag, message: &str| {
            Err(ConfigError {
                flag,
                message: message.to_string(),
            })
        };
        if self.workers == Some(0) {
            return err("workers", "must be at least 1");
        }
        for (flag, v) in [
            ("connect-timeout-ms", self.connect_timeout_ms),
            ("request-timeout-ms", self.request_timeout_ms),
            ("health-interval-ms", self.health_interval_ms),
            ("health-timeout-ms", self.health_timeout_ms),
            ("eject-base-ms", self.eject_base_ms),
            ("reload-interval-ms", self.reload_interval_ms),
            ("client-body-timeout-ms", self.client_body_timeout_ms),
            ("send-timeout-ms", self.send_timeout_ms),
            ("idle-timeout-ms", self.idle_timeout_ms),
        ] {
            if v == 0 {
                return err(flag, "must be at least 1 ms");
            }
        }
        if self.eject_max_ms < self.eject_base_ms {
            return err("eject-max-ms", "must be at least --eject-base-ms");
        }
        for (flag, v) in [
            ("max-conns-per-instance", self.max_conns_per_instance),
            ("cell-max-inflight", self.cell_max_inflight),
            ("max-attempts", self.max_attempts),
            ("health-rise", self.health_rise as usize),
            ("health-fall", self.health_fall as usize),
            ("eject-5xx-streak", self.eject_5xx_streak as usize),
        ] {
            if v == 0 {
                return err(flag, "must be at least 1");
            }
        }
        if !self.health_path.starts_with('/') {
            return err("health-path", "must start with /");
        }
        if self.admin_token.as_deref() == Some("") {
            return err("admin-token", "must not be empty");
        }
        Ok(())
    }

    /// Connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }

    /// Request (response-headers) timeout.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}
