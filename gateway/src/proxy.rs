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

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use routing_rules::key::{extract_key, HeaderLookup, RequestParts};
use routing_rules::{CellReason, KeyProblem, RouteAttrs, RouteDecision, STAMP_HEADERS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::control::{Control, Generation, InflightGuard};
use crate::h1::{self, BodyDecoder, Framing, ResponseHead};
use crate::metrics::UpstreamErrorKind;
use crate::upstream::{closed_mid_body, ms_at, now_ms, CheckoutError, Instance, PooledConn};

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
}

impl Shared {
    /// Shared state over `control`'s rules.
    pub fn new(control: Arc<Control>, settings: ProxySettings) -> Arc<Self> {
        Arc::new(Shared {
            control,
            settings,
            ids: RequestIds::new(),
        })
    }
}

/// A request the gateway answers itself (bad key, overload, upstream
/// failure), with a JSON body `{error, message}`.
#[derive(Debug, Clone, Copy)]
pub struct Refusal {
    /// Status.
    pub status: StatusCode,
    /// Short machine-readable code.
    pub error: &'static str,
    /// Human-readable message.
    pub message: &'static str,
    /// Add `retry-after: 1`.
    pub retry_after: bool,
}

impl Refusal {
    fn new(status: StatusCode, error: &'static str, message: &'static str) -> Self {
        Refusal {
            status,
            error,
            message,
            retry_after: false,
        }
    }

    fn for_key(problem: KeyProblem) -> Self {
        let (error, message) = match problem {
            KeyProblem::Missing => ("missing_key", "the request carries no routing key"),
            KeyProblem::Malformed => (
                "malformed_key",
                "the routing key is empty, longer than 256 bytes, or has control characters",
            ),
            KeyProblem::NotDigits => (
                "malformed_key",
                "the routing key is not a long enough string of decimal digits",
            ),
        };
        Refusal::new(StatusCode::BAD_REQUEST, error, message)
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        serde_json::json!({ "error": self.error, "message": self.message }).to_string()
    }
}

/// A gateway-made answer as a hyper response.
fn refusal_response(r: &Refusal) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(r.body()))));
    *resp.status_mut() = r.status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if r.retry_after {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

/// Header lookup over raw (name, value) pairs.
struct RawHeaders<'a, I>(&'a I);

impl<'a, 'h: 'a, I> HeaderLookup for RawHeaders<'a, I>
where
    I: Iterator<Item = (&'h [u8], &'h [u8])> + Clone,
{
    #[inline]
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0
            .clone()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }
}

#[inline]
fn is_stamp(name: &[u8]) -> bool {
    name.len() > 11
        && name[..11].eq_ignore_ascii_case(b"x-cellgate-")
        && STAMP_HEADERS
            .iter()
            .any(|s| s.as_bytes().eq_ignore_ascii_case(name))
}

fn is_idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    )
}

/// A request in wire form, ready to be sent (and re-sent) upstream.
pub struct Outgoing {
    /// Request line and forwarded headers; the stamps and the final CRLF
    /// are appended per attempt after `base_len`.
    wire: Vec<u8>,
    base_len: usize,
    key: Option<Vec<u8>>,
    tester: Option<Vec<u8>>,
    /// Where the request id (the client's, or generated) is in `wire`.
    request_id: std::ops::Range<usize>,
    head_request: bool,
    idempotent: bool,
    /// First routing decision.
    pub decision: RouteDecision,
    /// When the request arrived.
    pub start: Instant,
}

/// How a request body is framed on the way upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyHead {
    /// No body and no `content-length`.
    None,
    /// `content-length: n`.
    Length(u64),
    /// `transfer-encoding: chunked` (length unknown).
    Chunked,
}

/// The parts of a request head that [`Outgoing::build`] needs.
pub struct HeadParts<'a, I> {
    /// Method.
    pub method: &'a [u8],
    /// Origin-form target (path and query).
    pub target: &'a str,
    /// Headers as (name, value).
    pub headers: I,
    /// A buffer to write the upstream head into (reused across requests).
    pub wire: Vec<u8>,
    /// `host` to add when the request has none (HTTP/2 authority).
    pub host: Option<&'a [u8]>,
    /// How the body is framed upstream (the client's own `content-length`
    /// and `transfer-encoding` headers are never copied).
    pub body: BodyHead,
}

impl Outgoing {
    /// Routes a request head and writes its upstream form. `Err`: the
    /// key is missing or malformed (400, or the default cell by policy).
    pub fn build<'h, I>(
        shared: &Shared,
        gen: &Generation,
        parts: HeadParts<'_, I>,
        peer_ip: &[u8],
        start: Instant,
    ) -> Result<Outgoing, Refusal>
    where
        I: Iterator<Item = (&'h [u8], &'h [u8])> + Clone,
    {
        let table = &gen.table;
        let lookup = RawHeaders(&parts.headers);
        let (path, query) = match parts.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (parts.target, None),
        };
        let rp = RequestParts {
            headers: &lookup,
            path,
            query,
        };
        if crate::internal_path::is_internal_path(path) {
            let r = Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "the cells' internal API is not served through the gateway",
            );
            shared
                .control
                .metrics()
                .rejected
                .with_label_values(&["internal_path"])
                .inc();
            return Err(r);
        }
        let key = extract_key(&table.rules().key, &rp);
        let tester = &table.rules().tester;
        let tester = if tester.enabled {
            lookup.header(tester.header.as_str())
        } else {
            None
        };
        let decision = table
            .route(
                key.as_deref(),
                &RouteAttrs {
                    tester_colour: tester,
                },
                &gen.health(ms_at(start)),
            )
            .map_err(|p| {
                let r = Refusal::for_key(p);
                shared
                    .control
                    .metrics()
                    .rejected
                    .with_label_values(&[r.error])
                    .inc();
                r
            })?;

        let mut wire = parts.wire;
        wire.clear();
        wire.extend_from_slice(parts.method);
        wire.push(b' ');
        wire.extend_from_slice(parts.target.as_bytes());
        wire.extend_from_slice(b" HTTP/1.1\r\n");
        // Headers the client marked hop-by-hop in `connection`.
        let connection: Vec<&[u8]> = parts
            .headers
            .clone()
            .filter(|(n, v)| n.eq_ignore_ascii_case(b"connection") && h1::names_headers(v))
            .map(|(_, v)| v)
            .collect();
        let mut has_host = false;
        let mut has_xff = false;
        let mut request_id: Option<&[u8]> = None;
        for (n, v) in parts.headers.clone() {
            if h1::is_hop_by_hop(n)
                || (!connection.is_empty() && h1::named_by_connection(&connection, n))
                || is_stamp(n)
            {
                continue;
            }
            if n.eq_ignore_ascii_case(b"x-forwarded-for") {
                has_xff = true;
                continue;
            }
            if n.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
            if n.eq_ignore_ascii_case(b"x-request-id") {
                if request_id.is_none() && !v.is_empty() && v.len() <= 128 {
                    request_id = Some(v);
                }
                continue;
            }
            has_host |= n.eq_ignore_ascii_case(b"host");
            h1::write_header(&mut wire, n, v);
        }
        if !has_host {
            if let Some(h) = parts.host {
                h1::write_header(&mut wire, b"host", h);
            }
        }
        match parts.body {
            BodyHead::None => {}
            BodyHead::Length(n) => {
                h1::write_header(&mut wire, b"content-length", h1::fmt_u64(n, &mut [0u8; 20]))
            }
            BodyHead::Chunked => h1::write_header(&mut wire, b"transfer-encoding", b"chunked"),
        }
        // Every x-forwarded-for value the client sent, then the client.
        wire.extend_from_slice(b"x-forwarded-for: ");
        if has_xff {
            for (n, v) in parts.headers.clone() {
                if n.eq_ignore_ascii_case(b"x-forwarded-for") {
                    wire.extend_from_slice(v);
                    wire.extend_from_slice(b", ");
                }
            }
        }
        wire.extend_from_slice(peer_ip);
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(b"x-request-id: ");
        let id_start = wire.len();
        match request_id {
            Some(v) => wire.extend_from_slice(v),
            None => wire.extend_from_slice(&shared.ids.next()),
        }
        let request_id = id_start..wire.len();
        wire.extend_from_slice(b"\r\n");
        let base_len = wire.len();
        Ok(Outgoing {
            wire,
            base_len,
            key: key.map(|k| k.into_owned()),
            tester: tester.map(<[u8]>::to_vec),
            request_id,
            head_request: parts.method == b"HEAD",
            idempotent: is_idempotent(parts.method),
            decision,
            start,
        })
    }

    /// The request id (the client's, or generated).
    pub fn request_id(&self) -> &[u8] {
        &self.wire[self.request_id.clone()]
    }

    /// Gives back the head buffer for the next request.
    pub fn into_wire(self) -> Vec<u8> {
        self.wire
    }

    /// Routes again after an instance was ejected or failed: with every
    /// instance already tried counted as down, the decision may fall back
    /// to the other colour or fail over to a backup cell.
    fn reroute(
        &self,
        gen: &Generation,
        previous: &RouteDecision,
        tried: &[Arc<Instance>],
    ) -> RouteDecision {
        gen.table
            .route(
                self.key.as_deref(),
                &RouteAttrs {
                    tester_colour: self.tester.as_deref(),
                },
                &gen.health_excluding(now_ms(), tried),
            )
            .unwrap_or(*previous)
    }
}

/// Calls `f(name, value)` for each stamp header of a decision.
pub fn stamps(gen: &Generation, d: &RouteDecision, mut f: impl FnMut(&'static [u8], &[u8])) {
    if let Some(slot) = d.slot {
        f(b"x-cellgate-slot", h1::fmt_u64(slot as u64, &mut [0u8; 20]));
    }
    f(
        b"x-cellgate-cell",
        gen.cells[d.serving_cell as usize].name_header.as_bytes(),
    );
    f(
        b"x-cellgate-home",
        gen.cells[d.home_cell as usize].name_header.as_bytes(),
    );
    f(b"x-cellgate-colour", d.colour.as_str().as_bytes());
    f(b"x-cellgate-rev", gen.rev_header.as_bytes());
}

/// A request body to forward.
pub enum ReqBody<'a> {
    /// None.
    Empty,
    /// `content-length` bytes from a client connection of the lean front
    /// end: first what is already buffered, then from the socket.
    Fixed {
        /// The client socket.
        stream: &'a mut TcpStream,
        /// Bytes read from the client, body first.
        buf: &'a mut BytesMut,
        /// Body bytes not yet forwarded.
        remaining: u64,
    },
    /// A hyper body, sent as `framing` says (chunked, or its exact length).
    Stream {
        /// The body.
        body: Incoming,
        /// How it is framed upstream.
        framing: BodyHead,
    },
}

impl ReqBody<'_> {
    fn is_empty(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Fixed { remaining, .. } => *remaining == 0,
            ReqBody::Stream { .. } => false,
        }
    }
}

/// A response head received from an upstream, with everything needed to
/// stream its body back.
pub struct Forwarded {
    /// The connection, its read buffer starting with the head.
    pub conn: PooledConn,
    /// The parsed head.
    pub head: ResponseHead,
    /// The serving cell's in-flight slot, held until the body is done.
    pub guard: InflightGuard,
    /// The final decision.
    pub decision: RouteDecision,
}

enum Failure {
    /// Failed before the upstream could have a complete request: safe to
    /// send again.
    Unsent,
    /// Failed after the request (or part of its body) went out.
    Failed(String),
    /// The client went away while its body was forwarded.
    ClientGone,
    /// No response head within the request timeout (body upload included).
    Timeout,
}

impl Shared {
    /// Sends `out` upstream with retries as the rules allow; returns the
    /// response head or what to answer instead.
    ///
    /// `timer`: a sleep the caller owns and re-arms lazily (the lean front
    /// end's per-connection timer) to enforce the request timeout with; it
    /// is pulled in when it would fire after this request's deadline.
    /// Without one, a timer per request.
    pub async fn forward(
        &self,
        gen: &Generation,
        out: &mut Outgoing,
        mut body: ReqBody<'_>,
        mut timer: Option<Pin<&mut tokio::time::Sleep>>,
    ) -> Result<Forwarded, Refusal> {
        let metrics = self.control.metrics();
        let table = &gen.table;
        let mut decision = out.decision;
        if decision.reason == CellReason::Failover {
            metrics
                .failovers
                .with_label_values(&[
                    table.cell_name(decision.home_cell),
                    table.cell_name(decision.serving_cell),
                ])
                .inc();
        }
        let replayable = out.idempotent && body.is_empty();
        let mut tried: Vec<Arc<Instance>> = Vec::new();
        let mut guard: Option<(u16, InflightGuard)> = None;
        let mut sent_once = false;
        let mut last_error = Refusal::new(
            StatusCode::BAD_GATEWAY,
            "no_upstream",
            "no instance of the serving cell could be reached",
        );
        for attempt in 0..self.settings.max_attempts {
            let cell = decision.serving_cell;
            let colour = decision.colour;
            // 3: the serving cell's in-flight slot.
            if guard.as_ref().map(|(c, _)| *c) != Some(cell) {
                match gen.cells[cell as usize].limiter.try_acquire() {
                    Some(g) => guard = Some((cell, g)),
                    None => {
                        metrics
                            .rejected
                            .with_label_values(&["cell_overloaded"])
                            .inc();
                        gen.group(cell, colour)
                            .metrics
                            .observe(503, out.start.elapsed().as_secs_f64());
                        let mut r = Refusal::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "cell_overloaded",
                            "the serving cell has too many requests in flight; retry shortly",
                        );
                        r.retry_after = true;
                        return Err(r);
                    }
                }
            }
            if sent_once && !replayable {
                break;
            }
            let group = gen.group(cell, colour);
            let now = if attempt == 0 {
                ms_at(out.start)
            } else {
                now_ms()
            };
            let Some(instance) = group.pick(now, &tried) else {
                break;
            };
            if attempt > 0 {
                metrics
                    .retries
                    .with_label_values(&[table.cell_name(cell), colour.as_str()])
                    .inc();
            }
            let mut conn = match instance.checkout().await {
                Ok(c) => c,
                Err(e) => {
                    metrics.upstream_error(&instance.cell, colour.as_str(), e.kind());
                    if e == CheckoutError::Connect {
                        let ms = instance.record_connect_failure(now_ms());
                        tracing::warn!(cell = %instance.cell, colour = %colour, instance = %instance.address, eject_ms = ms, "upstream connect failed; instance ejected");
                    }
                    tried.push(instance);
                    decision = out.reroute(gen, &decision, &tried);
                    continue;
                }
            };
            let from = if attempt == 0 {
                out.start
            } else {
                Instant::now()
            };
            let exchange = self.exchange(gen, out, &decision, &mut conn, &mut body);
            let result = match timer.as_mut() {
                Some(t) => {
                    let deadline =
                        tokio::time::Instant::from_std(from) + self.settings.request_timeout;
                    with_deadline(t.as_mut(), deadline, exchange)
                        .await
                        .unwrap_or(Err(Failure::Timeout))
                }
                None => tokio::time::timeout(self.settings.request_timeout, exchange)
                    .await
                    .unwrap_or(Err(Failure::Timeout)),
            };
            match result {
                Ok(head) => {
                    let status = head.status;
                    if let Some(ms) = instance.record_status(status) {
                        tracing::warn!(cell = %instance.cell, colour = %colour, instance = %instance.address, eject_ms = ms, "5xx streak; instance ejected");
                    }
                    if status >= 500 {
                        metrics.upstream_error(
                            &instance.cell,
                            colour.as_str(),
                            UpstreamErrorKind::Status5xx,
                        );
                    }
                    group
                        .metrics
                        .observe(status, out.start.elapsed().as_secs_f64());
                    let Some((_, guard)) = guard.take() else {
                        unreachable!("guard taken before the first attempt")
                    };
                    return Ok(Forwarded {
                        conn,
                        head,
                        guard,
                        decision,
                    });
                }
                Err(Failure::Unsent) => {
                    // A stale pooled connection: the request never left.
                    continue;
                }
                Err(Failure::ClientGone) => {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "client_gone",
                        "the client closed the connection while sending its body",
                    ));
                }
                Err(Failure::Timeout) => {
                    metrics.upstream_error(
                        &instance.cell,
                        colour.as_str(),
                        UpstreamErrorKind::Timeout,
                    );
                    metrics
                        .rejected
                        .with_label_values(&["upstream_timeout"])
                        .inc();
                    group
                        .metrics
                        .observe(504, out.start.elapsed().as_secs_f64());
                    return Err(Refusal::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        "the upstream did not answer in time",
                    ));
                }
                Err(Failure::Failed(error)) => {
                    sent_once = true;
                    tried.push(instance.clone());
                    metrics.upstream_error(
                        &instance.cell,
                        colour.as_str(),
                        UpstreamErrorKind::Reset,
                    );
                    tracing::warn!(cell = %instance.cell, colour = %colour, instance = %instance.address, error = %error, "upstream failed after the request was sent");
                    last_error = Refusal::new(
                        StatusCode::BAD_GATEWAY,
                        "upstream_failed",
                        "the upstream failed after the request was sent",
                    );
                    if replayable {
                        decision = out.reroute(gen, &decision, &tried);
                    }
                }
            }
        }
        metrics
            .rejected
            .with_label_values(&[last_error.error])
            .inc();
        gen.group(decision.serving_cell, decision.colour)
            .metrics
            .observe(
                last_error.status.as_u16(),
                out.start.elapsed().as_secs_f64(),
            );
        Err(last_error)
    }

    /// One attempt on one connection: head (with stamps), body, response head.
    async fn exchange(
        &self,
        gen: &Generation,
        out: &mut Outgoing,
        decision: &RouteDecision,
        conn: &mut PooledConn,
        body: &mut ReqBody<'_>,
    ) -> Result<ResponseHead, Failure> {
        let io = conn.io();
        out.wire.truncate(out.base_len);
        stamps(gen, decision, |n, v| h1::write_header(&mut out.wire, n, v));
        out.wire.extend_from_slice(b"\r\n");
        // The head and what is already buffered of the body go in one write.
        let mut first_body = 0;
        if let ReqBody::Fixed { buf, remaining, .. } = body {
            first_body = (*remaining).min(buf.len() as u64) as usize;
            out.wire.extend_from_slice(&buf[..first_body]);
        }
        if io.stream.write_all(&out.wire).await.is_err() {
            return Err(Failure::Unsent);
        }
        match body {
            ReqBody::Empty => {}
            ReqBody::Fixed {
                stream,
                buf,
                remaining,
            } => {
                buf.advance(first_body);
                *remaining -= first_body as u64;
                while *remaining > 0 {
                    if buf.is_empty() {
                        match stream.read_buf(*buf).await {
                            Ok(0) | Err(_) => return Err(Failure::ClientGone),
                            Ok(_) => {}
                        }
                    }
                    let n = (*remaining).min(buf.len() as u64) as usize;
                    if let Err(e) = io.stream.write_all(&buf[..n]).await {
                        return Err(Failure::Failed(e.to_string()));
                    }
                    buf.advance(n);
                    *remaining -= n as u64;
                }
            }
            ReqBody::Stream { body, framing } => {
                let chunked = *framing == BodyHead::Chunked;
                let length = match *framing {
                    BodyHead::Length(n) => n,
                    _ => 0,
                };
                let mut sent = 0u64;
                let mut frame_buf = Vec::new();
                loop {
                    let frame = match body.frame().await {
                        None => break,
                        Some(Ok(f)) => f,
                        Some(Err(_)) => return Err(Failure::ClientGone),
                    };
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    sent += data.len() as u64;
                    if !chunked && sent > length {
                        return Err(Failure::Failed(
                            "request body longer than its content-length".into(),
                        ));
                    }
                    let r = if chunked {
                        frame_buf.clear();
                        h1::push_chunk_size(&mut frame_buf, data.len());
                        frame_buf.extend_from_slice(&data);
                        frame_buf.extend_from_slice(b"\r\n");
                        io.stream.write_all(&frame_buf).await
                    } else {
                        io.stream.write_all(&data).await
                    };
                    if let Err(e) = r {
                        return Err(Failure::Failed(e.to_string()));
                    }
                }
                if chunked {
                    if let Err(e) = io.stream.write_all(b"0\r\n\r\n").await {
                        return Err(Failure::Failed(e.to_string()));
                    }
                } else if sent != length {
                    return Err(Failure::Failed(
                        "request body shorter than its content-length".into(),
                    ));
                }
            }
        }
        io.read_head(out.head_request)
            .await
            .map_err(|e| Failure::Failed(e.to_string()))
    }
}

/// Runs `fut` until `deadline` on a shared sleep (`None`: the deadline
/// passed first). No timer is touched unless the sleep would fire after
/// the deadline, or fires before it.
pub async fn with_deadline<T>(
    mut sleep: Pin<&mut tokio::time::Sleep>,
    deadline: tokio::time::Instant,
    fut: impl Future<Output = T>,
) -> Option<T> {
    if sleep.deadline() > deadline {
        sleep.as_mut().reset(deadline);
    }
    let mut fut = std::pin::pin!(fut);
    loop {
        tokio::select! {
            biased;
            r = &mut fut => return Some(r),
            _ = sleep.as_mut() => {
                if tokio::time::Instant::now() >= deadline {
                    return None;
                }
                sleep.as_mut().reset(deadline);
            }
        }
    }
}

/// Response headers to pass on: all but hop-by-hop ones, those the
/// upstream named in `connection`, and `x-request-id` (the gateway's).
pub fn forwarded_response_headers<'a>(
    buf: &'a [u8],
    head: &'a ResponseHead,
) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
    let connection: Vec<&[u8]> = head
        .headers
        .iter()
        .filter(|(n, v)| {
            buf[n.clone()].eq_ignore_ascii_case(b"connection") && h1::names_headers(&buf[v.clone()])
        })
        .map(|(_, v)| &buf[v.clone()])
        .collect();
    head.headers
        .iter()
        .map(move |(n, v)| (&buf[n.clone()], &buf[v.clone()]))
        .filter(move |(n, _)| {
            !h1::is_hop_by_hop(n)
                && !n.eq_ignore_ascii_case(b"x-request-id")
                && (connection.is_empty() || !h1::named_by_connection(&connection, n))
        })
}

// ---------------------------------------------------------------------------
// The hyper front end.

/// The proxy service for one downstream connection (hyper front end).
#[derive(Clone)]
pub struct ProxyService {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    /// The peer's IP, formatted once per connection.
    peer_ip: Arc<[u8]>,
}

impl std::fmt::Debug for ProxyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyService")
            .field("peer", &self.peer)
            .finish()
    }
}

impl ProxyService {
    /// A service over the shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        ProxyService {
            shared,
            peer: None,
            peer_ip: Arc::from(&b""[..]),
        }
    }

    /// The same service for a connection from `peer`.
    pub fn for_peer(&self, peer: SocketAddr) -> Self {
        ProxyService {
            shared: self.shared.clone(),
            peer: Some(peer),
            peer_ip: Arc::from(peer.ip().to_string().as_bytes()),
        }
    }
}

impl tower::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let shared = self.shared.clone();
        let peer_ip = self.peer_ip.clone();
        Box::pin(async move { Ok(handle_hyper(&shared, req, &peer_ip).await) })
    }
}

async fn handle_hyper(
    shared: &Shared,
    req: Request<Incoming>,
    peer_ip: &[u8],
) -> Response<ProxyBody> {
    let start = Instant::now();
    let gen = shared.control.current();
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let authority = parts.uri.authority().map(|a| a.as_str().as_bytes());
    let empty = body.is_end_stream();
    // hyper has decoded the client's framing; the body's exact size (from a
    // validated content-length) or chunked encoding frames it upstream.
    let framing = match body.size_hint().exact() {
        Some(0) if !parts.headers.contains_key(header::CONTENT_LENGTH) => BodyHead::None,
        Some(n) => BodyHead::Length(n),
        None => BodyHead::Chunked,
    };
    let headers: Vec<(&[u8], &[u8])> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
        .collect();
    let head = HeadParts {
        method: parts.method.as_str().as_bytes(),
        target,
        headers: headers.iter().copied(),
        wire: Vec::with_capacity(512),
        host: if parts.version == Version::HTTP_2 {
            authority
        } else {
            None
        },
        body: framing,
    };
    let mut out = match Outgoing::build(shared, &gen, head, peer_ip, start) {
        Ok(o) => o,
        Err(r) => return refusal_response(&r),
    };
    let body = if empty {
        ReqBody::Empty
    } else {
        ReqBody::Stream { body, framing }
    };
    let fwd = match shared.forward(&gen, &mut out, body, None).await {
        Ok(f) => f,
        Err(r) => return refusal_response(&r),
    };
    let Forwarded {
        mut conn,
        head,
        guard,
        decision,
    } = fwd;
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    {
        let buf = &conn.io().buf[..];
        let h = resp.headers_mut();
        for (n, v) in forwarded_response_headers(buf, &head) {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
                h.append(n, v);
            }
        }
        if let Ok(v) = HeaderValue::from_bytes(out.request_id()) {
            h.insert(HeaderName::from_static("x-request-id"), v);
        }
        if shared.settings.debug_headers {
            stamps(&gen, &decision, |n, v| {
                if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
                    h.insert(n, v);
                }
            });
        }
        if let Framing::Length(n) = head.framing {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
    }
    conn.io().buf.advance(head.len);
    let body = ResponseBody {
        decoder: BodyDecoder::new(head.framing),
        keep_alive: head.keep_alive,
        conn: Some(conn),
        timeout: shared.settings.request_timeout,
        stall: None,
        control: shared.control.clone(),
        _guard: guard,
    };
    let (parts, ()) = resp.into_parts();
    Response::from_parts(parts, Either::Left(body))
}

/// An upstream response body streamed to a hyper client. Returns the
/// connection to the pool when the body ends, and holds the cell's
/// in-flight slot until then.
pub struct ResponseBody {
    conn: Option<PooledConn>,
    decoder: BodyDecoder,
    keep_alive: bool,
    timeout: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    control: Arc<Control>,
    _guard: InflightGuard,
}

impl ResponseBody {
    fn finish(&mut self) {
        if let Some(c) = self.conn.take() {
            if self.keep_alive && self.decoder.is_done() {
                c.release();
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = self.get_mut();
        loop {
            if this.decoder.is_done() {
                this.finish();
                return Poll::Ready(None);
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let io = conn.io();
            if !io.buf.is_empty() {
                let step = match this.decoder.feed(&io.buf) {
                    Ok(s) => s,
                    Err(e) => {
                        this.conn = None;
                        return Poll::Ready(Some(Err(std::io::Error::other(e))));
                    }
                };
                if let Some(r) = step.data {
                    debug_assert_eq!(r, 0..step.consumed);
                    let data = io.buf.split_to(step.consumed).freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                io.buf.advance(step.consumed);
                if step.consumed > 0 {
                    continue;
                }
            }
            let read = match io.poll_read_more(cx) {
                Poll::Ready(r) => r,
                Poll::Pending => {
                    // Each wait for more of the body is bounded by the
                    // request timeout.
                    let timeout = this.timeout;
                    let stall = this
                        .stall
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if stall.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    let e = conn.stalled(this.control.metrics());
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            };
            this.stall = None;
            match read {
                Ok(0) if this.decoder.until_close() => {
                    this.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(closed_mid_body())));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Bodies that are empty by definition (HEAD, 204, 304) are never
        // polled; their connection is still clean and reusable.
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_shared_sleep_enforces_each_deadline() {
        let mut sleep = std::pin::pin!(tokio::time::sleep(Duration::from_secs(1)));
        // The sleep fires early (1 s): re-armed, the timeout comes at the deadline.
        let t = Instant::now();
        let r = with_deadline::<()>(
            sleep.as_mut(),
            t + Duration::from_secs(3),
            std::future::pending(),
        )
        .await;
        assert!(r.is_none());
        assert_eq!(t.elapsed(), Duration::from_secs(3));
        // A sleep set to fire later than the deadline is pulled in.
        sleep
            .as_mut()
            .reset(Instant::now() + Duration::from_secs(100));
        let t = Instant::now();
        let r = with_deadline::<()>(
            sleep.as_mut(),
            t + Duration::from_secs(2),
            std::future::pending(),
        )
        .await;
        assert!(r.is_none());
        assert_eq!(t.elapsed(), Duration::from_secs(2));
        // Work that finishes in time wins.
        let t = Instant::now();
        let r = with_deadline(sleep.as_mut(), t + Duration::from_secs(5), async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            7
        })
        .await;
        assert_eq!(r, Some(7));
        assert_eq!(t.elapsed(), Duration::from_secs(1));
    }
}
