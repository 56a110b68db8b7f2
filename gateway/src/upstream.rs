//! Upstream instances: a keep-alive connection pool with a per-instance cap,
//! and the instance's health (active checks + passive ejection).
//!
//! The pool is ours rather than hyper-util's legacy client because the
//! proxy must know whether a request ever reached an upstream: a connection
//! is checked out (and connect errors surface) *before* the request is
//! handed over, so a failed connect leaves the request — body included —
//! free to go to another instance or cell.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use prometheus::IntGauge;
use routing_rules::Colour;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::UpstreamErrorKind;

/// Body of a request sent upstream: the client's body, or empty (replayed
/// idempotent requests).
pub type UpstreamBody = Either<Incoming, Empty<Bytes>>;

/// Milliseconds since the process's first call (a monotonic clock that fits
/// in an atomic).
pub fn now_ms() -> u64 {
    ms_at(Instant::now())
}

/// [`now_ms`] for an instant already read (saves a clock read on the hot path).
#[inline]
pub fn ms_at(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    t.saturating_duration_since(*EPOCH.get_or_init(Instant::now))
        .as_millis() as u64
        + 1
}

/// Settings shared by every instance.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    /// TCP connect (and handshake) timeout.
    pub connect_timeout: Duration,
    /// Connections (busy + idle) per instance.
    pub max_conns: usize,
    /// Consecutive 5xx that eject.
    pub eject_5xx_streak: u32,
    /// First ejection, ms.
    pub eject_base_ms: u64,
    /// Longest ejection, ms.
    pub eject_max_ms: u64,
}

/// Why no connection could be had. The request never left the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutError {
    /// Connect failed or timed out.
    Connect,
    /// The instance's connection cap was reached and nothing freed in time.
    Saturated,
}

impl CheckoutError {
    /// Metric kind.
    pub fn kind(self) -> UpstreamErrorKind {
        match self {
            CheckoutError::Connect => UpstreamErrorKind::Connect,
            CheckoutError::Saturated => UpstreamErrorKind::Saturated,
        }
    }
}

/// One upstream instance of a (cell, colour).
pub struct Instance {
    /// Owning cell.
    pub cell: Arc<str>,
    /// Colour.
    pub colour: Colour,
    /// `host:port` as written in the rules.
    pub address: Arc<str>,
    socket: Option<SocketAddr>,
    settings: Arc<UpstreamSettings>,
    active_up: AtomicBool,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
    streak_5xx: AtomicU32,
    idle: Mutex<Vec<SendRequest<UpstreamBody>>>,
    permits: Arc<Semaphore>,
    up_gauge: IntGauge,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("cell", &self.cell)
            .field("colour", &self.colour)
            .field("address", &self.address)
            .finish()
    }
}

/// A point-in-time view of an instance's health (admin API).
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceStatus {
    /// Cell.
    pub cell: String,
    /// Colour.
    pub colour: Colour,
    /// Address.
    pub address: String,
    /// Usable for routing now.
    pub up: bool,
    /// Result of the active checks.
    pub active_up: bool,
    /// Milliseconds of ejection left (0 when not ejected).
    pub ejected_for_ms: u64,
    /// Consecutive ejections (drives the backoff).
    pub ejections: u32,
    /// Requests in flight.
    pub inflight: usize,
    /// Idle pooled connections.
    pub idle_connections: usize,
}

impl Instance {
    /// Creates an instance; `up_gauge` is its `cellgate_instance_up` series.
    pub fn new(
        cell: Arc<str>,
        colour: Colour,
        address: &str,
        settings: Arc<UpstreamSettings>,
        up_gauge: IntGauge,
    ) -> Self {
        up_gauge.set(1);
        Instance {
            cell,
            colour,
            address: Arc::from(address),
            socket: address.parse().ok(),
            permits: Arc::new(Semaphore::new(settings.max_conns)),
            settings,
            active_up: AtomicBool::new(true),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            streak_5xx: AtomicU32::new(0),
            idle: Mutex::new(Vec::new()),
            up_gauge,
        }
    }

    /// Usable for routing at `now` (ms from [`now_ms`]).
    #[inline]
    pub fn is_up(&self, now: u64) -> bool {
        self.active_up.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now
    }

    /// Whether active checks currently pass.
    pub fn active_up(&self) -> bool {
        self.active_up.load(Ordering::Relaxed)
    }

    /// Sets the active-check verdict; returns true when it changed.
    pub fn set_active_up(&self, up: bool) -> bool {
        let changed = self.active_up.swap(up, Ordering::Relaxed) != up;
        if up && changed {
            self.ejections.store(0, Ordering::Relaxed);
            self.ejected_until_ms.store(0, Ordering::Relaxed);
        }
        self.refresh_gauge(now_ms());
        changed
    }

    /// Re-computes `cellgate_instance_up` for `now`.
    pub fn refresh_gauge(&self, now: u64) {
        self.up_gauge.set(self.is_up(now) as i64);
    }

    fn eject(&self, now: u64) -> u64 {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(20);
        let ms = self
            .settings
            .eject_base_ms
            .saturating_mul(1 << n)
            .min(self.settings.eject_max_ms);
        self.ejected_until_ms.store(now + ms, Ordering::Relaxed);
        self.up_gauge.set(0);
        ms
    }

    /// A connect failure: ejects at once (with backoff). Returns the ejection in ms.
    pub fn record_connect_failure(&self, now: u64) -> u64 {
        self.eject(now)
    }

    /// An upstream response: a streak of 5xx ejects; anything else resets.
    /// Returns the ejection in ms when this response caused one.
    pub fn record_status(&self, status: u16) -> Option<u64> {
        if status >= 500 {
            let streak = self.streak_5xx.fetch_add(1, Ordering::Relaxed) + 1;
            if streak >= self.settings.eject_5xx_streak {
                self.streak_5xx.store(0, Ordering::Relaxed);
                return Some(self.eject(now_ms()));
            }
        } else {
            if self.streak_5xx.load(Ordering::Relaxed) != 0 {
                self.streak_5xx.store(0, Ordering::Relaxed);
            }
            if self.ejections.load(Ordering::Relaxed) != 0 {
                self.ejections.store(0, Ordering::Relaxed);
            }
        }
        None
    }

    /// Status for the admin API.
    pub fn status(&self, now: u64) -> InstanceStatus {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        InstanceStatus {
            cell: self.cell.to_string(),
            colour: self.colour,
            address: self.address.to_string(),
            up: self.is_up(now),
            active_up: self.active_up(),
            ejected_for_ms: until.saturating_sub(now),
            ejections: self.ejections.load(Ordering::Relaxed),
            inflight: self.settings.max_conns - self.permits.available_permits(),
            idle_connections: self.idle.lock().map(|v| v.len()).unwrap_or(0),
        }
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        match self.socket {
            Some(sa) => TcpStream::connect(sa).await,
            None => TcpStream::connect(&*self.address).await,
        }
    }

    /// Gets a ready connection: an idle pooled one, or a new one.
    pub async fn checkout(self: &Arc<Self>) -> Result<PooledConn, CheckoutError> {
        let timeout = self.settings.connect_timeout;
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                match tokio::time::timeout(timeout, self.permits.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => return Err(CheckoutError::Saturated),
                }
            }
        };
        loop {
            let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
            let Some(mut sender) = idle else { break };
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready()
                || matches!(
                    tokio::time::timeout(timeout, sender.ready()).await,
                    Ok(Ok(()))
                )
            {
                return Ok(PooledConn {
                    sender: Some(sender),
                    instance: self.clone(),
                    _permit: permit,
                });
            }
        }
        let connect = async {
            let stream = self.connect().await.ok()?;
            let _ = stream.set_nodelay(true);
            hyper::client::conn::http1::Builder::new()
                .handshake::<_, UpstreamBody>(TokioIo::new(stream))
                .await
                .ok()
        };
        let (sender, conn) = match tokio::time::timeout(timeout, connect).await {
            Ok(Some(pair)) => pair,
            _ => return Err(CheckoutError::Connect),
        };
        let address = self.address.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %address, error = %e, "upstream connection ended");
            }
        });
        Ok(PooledConn {
            sender: Some(sender),
            instance: self.clone(),
            _permit: permit,
        })
    }

    fn release(&self, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.settings.max_conns {
                idle.push(sender);
            }
        }
    }
}

/// A checked-out connection, holding one of the instance's permits.
pub struct PooledConn {
    sender: Option<SendRequest<UpstreamBody>>,
    instance: Arc<Instance>,
    _permit: OwnedSemaphorePermit,
}

impl PooledConn {
    /// Sends a request; on failure, returns the request if it was never
    /// written to the connection.
    pub fn send(
        &mut self,
        req: http::Request<UpstreamBody>,
    ) -> impl Future<
        Output = Result<
            http::Response<Incoming>,
            hyper::client::conn::TrySendError<http::Request<UpstreamBody>>,
        >,
    > + use<> {
        // `sender` is always Some until the connection is released or dropped.
        let fut = self.sender.as_mut().map(|s| s.try_send_request(req));
        async move {
            match fut {
                Some(f) => f.await,
                None => unreachable!("send on a released connection"),
            }
        }
    }

    /// The instance this connection goes to.
    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// Returns the connection to the pool (after a complete exchange).
    pub fn release(mut self) {
        if let Some(s) = self.sender.take() {
            self.instance.release(s);
        }
    }
}

/// Something to keep alive until the response body is done (cell in-flight
/// guards, metrics timers).
pub trait OnBodyDone: Send + Sync + 'static {}
impl<T: Send + Sync + 'static> OnBodyDone for T {}

/// The upstream response body, streamed to the client. Returns the
/// connection to the pool when the body ends, and holds `guard` (the cell's
/// in-flight slot) until then.
pub struct ResponseBody<G: OnBodyDone> {
    inner: Incoming,
    conn: Option<PooledConn>,
    _guard: G,
}

impl<G: OnBodyDone> ResponseBody<G> {
    /// Wraps an upstream body.
    pub fn new(inner: Incoming, conn: PooledConn, guard: G) -> Self {
        ResponseBody {
            inner,
            conn: Some(conn),
            _guard: guard,
        }
    }
}

impl<G: OnBodyDone + Unpin> Body for ResponseBody<G> {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => {
                if let Some(c) = this.conn.take() {
                    c.release();
                }
            }
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                if let Some(c) = this.conn.take() {
                    c.release();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.conn = None;
            }
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<G: OnBodyDone> Drop for ResponseBody<G> {
    fn drop(&mut self) {
        // Bodies that are empty by definition (HEAD, 204, 304) are never
        // polled; their connection is still clean and reusable.
        if let Some(c) = self.conn.take() {
            if self.inner.is_end_stream() {
                c.release();
            }
        }
    }
}
