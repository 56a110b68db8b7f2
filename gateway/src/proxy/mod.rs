//! The data path: routes each request to its user's cell and colour,
//! stamps it, and proxies it over a pooled HTTP/1.1 connection, retrying
//! elsewhere only when that cannot duplicate an effect.
//!
//! Two front ends share it: the lean HTTP/1.1 connection loop (`fast.rs`,
//! plain HTTP/1.x requests) and a hyper + tower service (HTTP/2, and
//! HTTP/1 requests the lean loop leaves to hyper: chunked request bodies,
//! `Expect`, upgrades, absolute-form targets, malformed heads).
//!
//! Phases of one request (see docs/gateway.md):
//! 1. load the current generation (lock-free);
//! 2. extract the key, route (override → slot → home → serving → colour);
//! 3. take an in-flight slot of the serving cell (503 + Retry-After if full);
//! 4. write the upstream head once (hop-by-hop out; x-forwarded-for and
//!    request id in); the stamps are appended per attempt;
//! 5. attempt: pick an instance, check out a connection, send; on a connect
//!    failure re-route with the instance ejected and try again; after the
//!    request reached an upstream, retry only idempotent body-less requests;
//! 6. stream the response back; the connection returns to the pool when the
//!    body ends.

mod exchange;
mod forward;
mod hyper_front;
mod outgoing;
mod refusal;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{Either, Full};

use crate::control::Control;

pub use forward::{forwarded_response_headers, with_deadline, Forwarded, ReqBody};
pub use hyper_front::{ProxyService, ResponseBody};
pub use outgoing::{stamps, BodyHead, HeadParts, Outgoing};
pub use refusal::Refusal;

/// Body of responses to clients on the hyper front end.
pub type ProxyBody = Either<ResponseBody, Full<Bytes>>;

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Time for response headers.
    pub request_timeout: Duration,
    /// Attempts per request.
    pub max_attempts: usize,
    /// Add decision headers to responses.
    pub debug_headers: bool,
    /// Longest wait for more of a request body.
    pub client_body_timeout: Duration,
    /// Bodies up to this size are read before an upstream is chosen.
    pub client_body_buffer: u64,
    /// Longest a client may leave response bytes unread.
    pub send_timeout: Duration,
    /// A client connection with nothing in progress is closed after this.
    pub idle_timeout: Duration,
    /// Largest request head, bytes.
    pub max_head: usize,
    /// Retries as a share of requests (0.2 = 20 %) over 10 s.
    pub retry_budget_ratio: f32,
    /// Retries always allowed per second.
    pub retry_min_per_s: u32,
    /// Longest hold of a request answered 421 (0: none).
    pub hold: Duration,
    /// Most requests held at once.
    pub hold_queue: usize,
    /// The access log, when on.
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
}

/// Generates request ids: a per-process random prefix and a counter.
#[derive(Debug)]
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let prefix = xorshift(nanos ^ (std::process::id() as u64) << 32);
        RequestIds {
            prefix,
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> [u8; 32] {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        for (i, v) in [self.prefix, n].iter().enumerate() {
            for j in 0..16 {
                buf[i * 16 + j] = HEX[((v >> (60 - 4 * j)) & 0xf) as usize];
            }
        }
        buf
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// What both front ends share: the rules, settings and request ids.
#[derive(Debug)]
pub struct Shared {
    pub(crate) control: Arc<Control>,
    pub(crate) settings: ProxySettings,
    ids: RequestIds,
    /// Retries allowed (linkerd/tower's budget: a share of requests).
    budget: tower::retry::budget::TpsBudget,
    /// xorshift state for jitter.
    rng: AtomicU64,
    /// Requests held now (see [`Shared::hold`]).
    held: std::sync::atomic::AtomicUsize,
}

impl Shared {
    /// Shared state over `control`'s rules.
    pub fn new(control: Arc<Control>, settings: ProxySettings) -> Arc<Self> {
        let budget = tower::retry::budget::TpsBudget::new(
            Duration::from_secs(10),
            settings.retry_min_per_s,
            settings.retry_budget_ratio,
        );
        let ids = RequestIds::new();
        let seed = ids.prefix | 1;
        Arc::new(Shared {
            control,
            settings,
            ids,
            budget,
            rng: AtomicU64::new(seed),
            held: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Holds a request its cell answered `421 Misdirected` (not applied:
    /// the user's shard is moving, or these rules are stale) until rules
    /// newer than `revision` are installed or an instance's health
    /// changes, at most `until`; then the caller routes it again. Bounded
    /// by `--hold-queue`.
    pub(crate) async fn hold(
        &self,
        revision: u64,
        until: tokio::time::Instant,
    ) -> Result<Arc<crate::control::Generation>, Refusal> {
        let metrics = self.control.metrics();
        let moving = || {
            Refusal::busy(
                "shard_moving",
                "the user's cell refused the request while its data moves between cells (switchover) or the routing rules change; nothing was applied, retry shortly",
            )
        };
        if self.held.fetch_add(1, Ordering::AcqRel) >= self.settings.hold_queue {
            self.held.fetch_sub(1, Ordering::AcqRel);
            metrics.held.with_label_values(&["overflow"]).inc();
            return Err(moving());
        }
        let start = std::time::Instant::now();
        let newer = self.control.newer_than(revision, until).await;
        self.held.fetch_sub(1, Ordering::AcqRel);
        metrics.hold_seconds.observe(start.elapsed().as_secs_f64());
        match newer {
            Some(gen) => {
                metrics.held.with_label_values(&["released"]).inc();
                Ok(gen)
            }
            None => {
                metrics.held.with_label_values(&["timeout"]).inc();
                Err(moving())
            }
        }
    }

    /// A pseudo-random number (jitter; not for secrets).
    pub(crate) fn random(&self) -> u64 {
        let mut x = self.rng.load(Ordering::Relaxed);
        x = xorshift(x);
        self.rng.store(x, Ordering::Relaxed);
        x
    }
}
