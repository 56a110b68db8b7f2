//! Upstream instances: a keep-alive connection pool with a per-instance cap,
//! and the instance's health (active checks + passive ejection).
//!
//! The pool is ours rather than hyper-util's legacy client because the
//! proxy must know whether a request ever reached an upstream: a connection
//! is checked out (and connect errors surface) *before* the request is
//! handed over, so a failed connect leaves the request — body included —
//! free to go to another instance or cell. Connections are raw HTTP/1.1
//! sockets driven by the request's own task (see `h1.rs`): no connection
//! task, no dispatch channel.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use prometheus::IntGauge;
use routing_rules::Colour;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::h1::{parse_response, ProtocolError, ResponseHead};
use crate::metrics::{Metrics, UpstreamErrorKind};

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
    /// Consecutive failures (5xx, upstream timeouts, resets) that eject.
    pub eject_5xx_streak: u32,
    /// First ejection, ms.
    pub eject_base_ms: u64,
    /// Longest ejection, ms.
    pub eject_max_ms: u64,
    /// Most instances of a cell ejected at once, percent (at least one).
    pub max_ejection_percent: u32,
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
    idle: Mutex<Vec<UpConn>>,
    permits: Arc<Semaphore>,
    up_gauge: IntGauge,
    /// Woken when the active checks find the instance down: requests
    /// waiting on it for an answer stop waiting.
    lost: tokio::sync::Notify,
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
            lost: tokio::sync::Notify::new(),
        }
    }

    /// Usable for routing at `now` (ms from [`now_ms`]).
    #[inline]
    pub fn is_up(&self, now: u64) -> bool {
        self.active_up.load(Ordering::Relaxed)
            && self.ejected_until_ms.load(Ordering::Relaxed) <= now
    }

    /// Resolves when the active checks next find the instance down (a
    /// frozen or unreachable process): a request waiting for its answer
    /// stops waiting instead of holding the cell's in-flight slot until
    /// the request timeout.
    pub fn lost(&self) -> tokio::sync::futures::Notified<'_> {
        self.lost.notified()
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
        if !up && changed {
            self.lost.notify_waiters();
        }
        self.refresh_gauge(now_ms());
        changed
    }

    /// Re-computes `cellgate_instance_up` for `now`.
    pub fn refresh_gauge(&self, now: u64) {
        self.up_gauge.set(self.is_up(now) as i64);
    }

    /// Ejected (passively) at `now`.
    pub fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now
    }

    /// The settings shared by every instance.
    pub fn settings(&self) -> &UpstreamSettings {
        &self.settings
    }

    /// Ejects the instance from `now` with exponential backoff; returns
    /// the ejection in ms. The caller checks the ejection caps first.
    pub fn eject(&self, now: u64) -> u64 {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(20);
        let ms = self
            .settings
            .eject_base_ms
            .saturating_mul(1 << n)
            .min(self.settings.eject_max_ms);
        self.ejected_until_ms.store(now + ms, Ordering::Relaxed);
        self.streak_5xx.store(0, Ordering::Relaxed);
        self.up_gauge.set(0);
        ms
    }

    /// A failed exchange (5xx, upstream timeout, reset): true when the
    /// streak reached the ejection threshold.
    pub fn note_failure(&self) -> bool {
        let streak = self.streak_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        streak >= self.settings.eject_5xx_streak
    }

    /// A good exchange: resets the failure streak and the ejection backoff.
    #[inline]
    pub fn note_success(&self) {
        if self.streak_5xx.load(Ordering::Relaxed) != 0 {
            self.streak_5xx.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
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

    /// Gets a connection: an idle pooled one that is still open, or a new one.
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
            let Some(conn) = idle else { break };
            if conn.is_stale() {
                continue;
            }
            return Ok(PooledConn {
                conn,
                instance: self.clone(),
                _permit: permit,
                reused: true,
            });
        }
        let stream = match tokio::time::timeout(timeout, self.connect()).await {
            Ok(Ok(s)) => s,
            _ => return Err(CheckoutError::Connect),
        };
        let _ = stream.set_nodelay(true);
        Ok(PooledConn {
            conn: UpConn {
                stream,
                buf: BytesMut::with_capacity(READ_BUF),
            },
            instance: self.clone(),
            _permit: permit,
            reused: false,
        })
    }

    fn release(&self, conn: UpConn) {
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.settings.max_conns {
                idle.push(conn);
            }
        }
    }
}

/// Read buffer of an upstream connection.
const READ_BUF: usize = 8 * 1024;

/// An HTTP/1.1 connection to an upstream and its read buffer.
#[derive(Debug)]
pub struct UpConn {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes read and not yet consumed.
    pub buf: BytesMut,
}

impl UpConn {
    /// Whether an idle connection was closed by the upstream (or sent
    /// something unasked). No system call unless the socket turned readable
    /// while idle (tokio clears readiness after a read that drains it).
    fn is_stale(&self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Makes room in the buffer for the next read.
    fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf.reserve(READ_BUF);
        }
    }

    /// Reads more bytes into the buffer; 0 means the upstream closed.
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        self.make_room();
        self.stream.read_buf(&mut self.buf).await
    }

    /// [`UpConn::read_more`] for poll-based callers.
    pub fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.make_room();
        loop {
            std::task::ready!(self.stream.poll_read_ready(cx))?;
            match self.stream.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    /// Reads a response head (skipping interim 1xx responses). The head
    /// stays at the start of the buffer.
    pub async fn read_head(&mut self, head_request: bool) -> Result<ResponseHead, ReadHeadError> {
        loop {
            if !self.buf.is_empty() {
                match parse_response(&self.buf, head_request) {
                    // The gateway never asks for an upgrade: a 101 is as
                    // wrong as any other malformed answer.
                    Ok(Some(h)) if h.status == 101 => {
                        return Err(ReadHeadError::Protocol(ProtocolError::Head))
                    }
                    Ok(Some(h)) if (100..200).contains(&h.status) => {
                        self.buf.advance(h.len);
                        continue;
                    }
                    Ok(Some(h)) => return Ok(h),
                    Ok(None) => {}
                    Err(e) => return Err(ReadHeadError::Protocol(e)),
                }
            }
            match self.read_more().await {
                Ok(0) if self.buf.is_empty() => return Err(ReadHeadError::Closed),
                Ok(0) => return Err(ReadHeadError::Protocol(ProtocolError::Head)),
                Ok(_) => {}
                Err(e) => return Err(ReadHeadError::Io(e)),
            }
        }
    }
}

/// Why no response head could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadHeadError {
    /// Closed before sending anything.
    #[error("upstream closed the connection without a response")]
    Closed,
    /// A socket error.
    #[error("upstream connection failed: {0}")]
    Io(std::io::Error),
    /// Not a valid HTTP/1.1 response.
    #[error("invalid upstream response: {0}")]
    Protocol(ProtocolError),
}

/// The error for an upstream that closed its connection before the body
/// it announced ended.
pub fn closed_mid_body() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "upstream closed the connection mid-body",
    )
}

/// A checked-out connection, holding one of the instance's permits.
pub struct PooledConn {
    conn: UpConn,
    instance: Arc<Instance>,
    _permit: OwnedSemaphorePermit,
    reused: bool,
}

impl PooledConn {
    /// Whether the connection came from the idle pool (so the upstream may
    /// have closed it while the request was on its way: the keep-alive
    /// race).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// The connection.
    pub fn io(&mut self) -> &mut UpConn {
        &mut self.conn
    }

    /// The instance this connection goes to.
    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// The upstream went silent mid-body for the request timeout: logged,
    /// counted (`kind="timeout"`), and returned as the error that ends the
    /// response.
    pub fn stalled(&self, metrics: &Metrics) -> std::io::Error {
        let inst = &self.instance;
        tracing::warn!(cell = %inst.cell, colour = %inst.colour, instance = %inst.address, "upstream stalled mid-body; response cut off");
        metrics.upstream_error(&inst.cell, inst.colour.as_str(), UpstreamErrorKind::Timeout);
        std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream stalled mid-body")
    }

    /// Returns the connection to the pool: call only after a complete
    /// exchange on a keep-alive connection with nothing left unread.
    pub fn release(self) {
        if self.conn.buf.is_empty() {
            self.instance.release(self.conn);
        }
    }
}
