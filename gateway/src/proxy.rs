//! The data path: a tower `Service` that routes each request to its user's
//! cell and colour, stamps it, and proxies it over a pooled connection,
//! retrying elsewhere only when that cannot duplicate an effect.
//!
//! Phases of one request (see docs/gateway.md):
//! 1. load the current generation (lock-free);
//! 2. extract the key, route (override → slot → home → serving → colour);
//! 3. take an in-flight slot of the serving cell (503 + Retry-After if full);
//! 4. rewrite headers (hop-by-hop out; stamps, x-forwarded-for, request id in);
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

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;
use routing_rules::key::{extract_key, HeaderLookup, RequestParts};
use routing_rules::{CellReason, KeyProblem, RouteAttrs, STAMP_HEADERS};

use crate::control::{Control, Generation, InflightGuard};
use crate::metrics::UpstreamErrorKind;
use crate::upstream::{ms_at, now_ms, CheckoutError, Instance, ResponseBody, UpstreamBody};

/// Body of responses to clients.
pub type ProxyBody = Either<ResponseBody<InflightGuard>, Full<Bytes>>;

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

    fn next(&self) -> HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        for (i, v) in [self.prefix, n].iter().enumerate() {
            for j in 0..16 {
                buf[i * 16 + j] = HEX[((v >> (60 - 4 * j)) & 0xf) as usize];
            }
        }
        HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

struct Shared {
    control: Arc<Control>,
    settings: ProxySettings,
    ids: RequestIds,
}

/// The proxy service for one downstream connection.
#[derive(Clone)]
pub struct ProxyService {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    /// The peer's IP as a header value, formatted once per connection.
    peer_ip: Option<HeaderValue>,
}

impl std::fmt::Debug for ProxyService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyService")
            .field("peer", &self.peer)
            .finish()
    }
}

impl ProxyService {
    /// A service over `control`'s rules.
    pub fn new(control: Arc<Control>, settings: ProxySettings) -> Self {
        ProxyService {
            shared: Arc::new(Shared {
                control,
                settings,
                ids: RequestIds::new(),
            }),
            peer: None,
            peer_ip: None,
        }
    }

    /// The same service for a connection from `peer`.
    pub fn for_peer(&self, peer: SocketAddr) -> Self {
        ProxyService {
            shared: self.shared.clone(),
            peer: Some(peer),
            peer_ip: HeaderValue::from_str(&peer.ip().to_string()).ok(),
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
        Box::pin(async move { Ok(shared.handle(req, peer_ip.as_ref()).await) })
    }
}

struct Headers<'a>(&'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    #[inline]
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(HeaderValue::as_bytes)
    }
}

/// A JSON error response `{error, message}`.
pub fn json_error(status: StatusCode, error: &str, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": error, "message": message }).to_string();
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Stamp and bookkeeping header names, built once (no parsing per request).
const X_SLOT: HeaderName = HeaderName::from_static("x-cellgate-slot");
const X_CELL: HeaderName = HeaderName::from_static("x-cellgate-cell");
const X_HOME: HeaderName = HeaderName::from_static("x-cellgate-home");
const X_COLOUR: HeaderName = HeaderName::from_static("x-cellgate-colour");
const X_REV: HeaderName = HeaderName::from_static("x-cellgate-rev");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether a header must not be forwarded: hop-by-hop headers, and (in
/// requests) the stamps only the gateway may set.
#[inline]
fn is_hop_or_stamp(name: &HeaderName, stamps: bool) -> bool {
    matches!(
        *name,
        header::CONNECTION
            | header::PROXY_AUTHORIZATION
            | header::TE
            | header::TRAILER
            | header::UPGRADE
            | header::TRANSFER_ENCODING
    ) || {
        let n = name.as_str();
        n == "keep-alive"
            || n == "proxy-connection"
            || (stamps && n.starts_with("x-cellgate-") && STAMP_HEADERS.contains(&n))
    }
}

/// Removes hop-by-hop headers, including those named by `Connection`, and
/// with `stamps` the stamp headers. One pass over the names; nothing is
/// looked up when there is nothing to remove (the common case).
fn strip_hop_by_hop(headers: &mut HeaderMap, stamps: bool) {
    if !headers.keys().any(|n| is_hop_or_stamp(n, stamps)) {
        return;
    }
    if let Some(conn) = headers.get(header::CONNECTION).cloned() {
        if let Ok(list) = conn.to_str() {
            for name in list.split(',') {
                let name = name.trim();
                if !name.is_empty() {
                    headers.remove(name);
                }
            }
        }
    }
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_or_stamp(n, stamps))
        .cloned()
        .collect();
    for n in doomed {
        headers.remove(n);
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// What to replay when an idempotent, body-less request must be retried
/// after it reached an upstream.
struct Replay {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Replay {
    fn request(&self) -> Request<UpstreamBody> {
        let mut r = Request::new(Either::Right(Empty::new()));
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.headers_mut() = self.headers.clone();
        r
    }
}

impl Shared {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer_ip: Option<&HeaderValue>,
    ) -> Response<ProxyBody> {
        let start = Instant::now();
        let now = ms_at(start);
        let gen = self.control.current();
        let metrics = self.control.metrics();
        let table = &gen.table;

        // 1-2: key and route.
        let (mut parts, body) = req.into_parts();
        let decision = route_request(table, &parts.headers, &parts.uri, &gen.health(now));
        let decision = match decision {
            Ok(d) => d,
            Err(problem) => {
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
                metrics.rejected.with_label_values(&[error]).inc();
                return json_error(StatusCode::BAD_REQUEST, error, message);
            }
        };
        if decision.reason == CellReason::Failover {
            metrics
                .failovers
                .with_label_values(&[
                    table.cell_name(decision.home_cell),
                    table.cell_name(decision.serving_cell),
                ])
                .inc();
        }

        // 4: rewrite the request head.
        strip_hop_by_hop(&mut parts.headers, true);
        if parts.version == Version::HTTP_2 && !parts.headers.contains_key(header::HOST) {
            if let Some(auth) = parts.uri.authority() {
                if let Ok(v) = HeaderValue::from_str(auth.as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        parts.version = Version::HTTP_11;
        if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
            let pq = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            parts.uri = Uri::try_from(pq).unwrap_or_else(|_| Uri::from_static("/"));
        }
        if let Some(ip) = peer_ip {
            match parts.headers.entry(X_FORWARDED_FOR) {
                header::Entry::Vacant(e) => {
                    e.insert(ip.clone());
                }
                header::Entry::Occupied(mut e) => {
                    let mut v = e.get().as_bytes().to_vec();
                    v.extend_from_slice(b", ");
                    v.extend_from_slice(ip.as_bytes());
                    if let Ok(v) = HeaderValue::from_bytes(&v) {
                        e.insert(v);
                    }
                }
            }
        }
        let request_id = match parts.headers.entry(X_REQUEST_ID) {
            header::Entry::Occupied(e) if !e.get().is_empty() && e.get().len() <= 128 => {
                e.get().clone()
            }
            header::Entry::Occupied(mut e) => {
                let id = self.ids.next();
                e.insert(id.clone());
                id
            }
            header::Entry::Vacant(e) => {
                let id = self.ids.next();
                e.insert(id.clone());
                id
            }
        };
        let replay =
            (is_idempotent(&parts.method) && http_body::Body::is_end_stream(&body)).then(|| {
                Replay {
                    method: parts.method.clone(),
                    uri: parts.uri.clone(),
                    headers: parts.headers.clone(),
                }
            });
        let mut upstream_req = Some(Request::from_parts(parts, Either::Left(body)));

        // 5: attempts.
        let mut decision = decision;
        let mut tried: Vec<Arc<Instance>> = Vec::new();
        let mut guard: Option<(u16, InflightGuard)> = None;
        let mut last_error = (
            "no_upstream",
            "no instance of the serving cell could be reached",
        );
        for attempt in 0..self.settings.max_attempts {
            let cell = decision.serving_cell;
            let colour = decision.colour;
            let runtime = &gen.cells[cell as usize];
            // 3: the serving cell's in-flight slot.
            if guard.as_ref().map(|(c, _)| *c) != Some(cell) {
                match runtime.limiter.try_acquire() {
                    Some(g) => guard = Some((cell, g)),
                    None => {
                        metrics
                            .rejected
                            .with_label_values(&["cell_overloaded"])
                            .inc();
                        let mut r = json_error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "cell_overloaded",
                            "the serving cell has too many requests in flight; retry shortly",
                        );
                        r.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                        gen.group(cell, colour)
                            .metrics
                            .observe(503, start.elapsed().as_secs_f64());
                        return r;
                    }
                }
            }
            let group = gen.group(cell, colour);
            let Some(instance) = group.pick(if attempt == 0 { now } else { now_ms() }, &tried)
            else {
                break;
            };
            if attempt > 0 {
                metrics
                    .retries
                    .with_label_values(&[table.cell_name(cell), colour.as_str()])
                    .inc();
            }
            let mut req = match upstream_req.take() {
                Some(r) => r,
                None => match &replay {
                    Some(r) => r.request(),
                    None => break,
                },
            };
            stamp(&mut req, &gen, &decision, runtime);

            let mut conn = match instance.checkout().await {
                Ok(c) => c,
                Err(e) => {
                    self.upstream_error(&gen, cell, colour, e.kind());
                    if e == CheckoutError::Connect {
                        let ms = instance.record_connect_failure(now_ms());
                        tracing::warn!(cell = %instance.cell, colour = %colour, instance = %instance.address, eject_ms = ms, "upstream connect failed; instance ejected");
                    }
                    tried.push(instance);
                    decision = reroute(&gen, req.headers(), req.uri(), &decision, &tried);
                    upstream_req = Some(req);
                    continue;
                }
            };
            let sent = tokio::time::timeout(self.settings.request_timeout, conn.send(req)).await;
            match sent {
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    if let Some(ms) = instance.record_status(status) {
                        tracing::warn!(cell = %instance.cell, colour = %colour, instance = %instance.address, eject_ms = ms, "5xx streak; instance ejected");
                    }
                    if status >= 500 {
                        self.upstream_error(&gen, cell, colour, UpstreamErrorKind::Status5xx);
                    }
                    group.metrics.observe(status, start.elapsed().as_secs_f64());
                    let (mut rparts, rbody) = resp.into_parts();
                    strip_hop_by_hop(&mut rparts.headers, false);
                    rparts.headers.insert(X_REQUEST_ID, request_id);
                    if self.settings.debug_headers {
                        let mut tmp = Request::new(());
                        stamp(&mut tmp, &gen, &decision, runtime);
                        rparts.headers.extend(tmp.headers_mut().drain());
                    }
                    let Some((_, g)) = guard.take() else {
                        unreachable!("guard taken before the first attempt")
                    };
                    return Response::from_parts(
                        rparts,
                        Either::Left(ResponseBody::new(rbody, conn, g)),
                    );
                }
                Ok(Err(mut e)) => {
                    if let Some(req) = e.take_message() {
                        // Never written: a stale pooled connection. Safe to resend.
                        upstream_req = Some(req);
                        continue;
                    }
                    tried.push(instance.clone());
                    self.upstream_error(&gen, cell, colour, UpstreamErrorKind::Reset);
                    tracing::warn!(cell = %instance.cell, colour = %colour, instance = %instance.address, error = %e.error(), "upstream failed after the request was sent");
                    last_error = (
                        "upstream_failed",
                        "the upstream failed after the request was sent",
                    );
                    match &replay {
                        Some(r) => {
                            decision = reroute(&gen, &r.headers, &r.uri, &decision, &tried);
                        }
                        None => break,
                    }
                }
                Err(_) => {
                    self.upstream_error(&gen, cell, colour, UpstreamErrorKind::Timeout);
                    metrics
                        .rejected
                        .with_label_values(&["upstream_timeout"])
                        .inc();
                    group.metrics.observe(504, start.elapsed().as_secs_f64());
                    return json_error(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        "the upstream did not answer in time",
                    );
                }
            }
        }
        metrics.rejected.with_label_values(&[last_error.0]).inc();
        gen.group(decision.serving_cell, decision.colour)
            .metrics
            .observe(502, start.elapsed().as_secs_f64());
        json_error(StatusCode::BAD_GATEWAY, last_error.0, last_error.1)
    }

    fn upstream_error(
        &self,
        gen: &Generation,
        cell: u16,
        colour: routing_rules::Colour,
        kind: UpstreamErrorKind,
    ) {
        self.control
            .metrics()
            .upstream_errors
            .with_label_values(&[gen.table.cell_name(cell), colour.as_str(), kind.as_str()])
            .inc();
    }
}

/// Routes a request head: key from the rules' source, tester colour when
/// enabled, decision under `health`.
fn route_request(
    table: &routing_rules::RoutingTable,
    headers: &HeaderMap,
    uri: &Uri,
    health: &impl routing_rules::HealthView,
) -> Result<routing_rules::RouteDecision, KeyProblem> {
    let lookup = Headers(headers);
    let rp = RequestParts {
        headers: &lookup,
        path: uri.path(),
        query: uri.query(),
    };
    let key = extract_key(&table.rules().key, &rp);
    let tester = &table.rules().tester;
    let attrs = RouteAttrs {
        tester_colour: if tester.enabled {
            headers
                .get(tester.header.as_str())
                .map(HeaderValue::as_bytes)
        } else {
            None
        },
    };
    table.route(key.as_deref(), &attrs, health)
}

/// Routes again after an instance was ejected or failed: with every
/// instance already tried counted as down, the decision may fall back to
/// the other colour or fail over to a backup cell.
fn reroute(
    gen: &Generation,
    headers: &HeaderMap,
    uri: &Uri,
    previous: &routing_rules::RouteDecision,
    tried: &[Arc<Instance>],
) -> routing_rules::RouteDecision {
    route_request(
        &gen.table,
        headers,
        uri,
        &gen.health_excluding(now_ms(), tried),
    )
    .unwrap_or(*previous)
}

fn stamp<B>(
    req: &mut Request<B>,
    gen: &Generation,
    d: &routing_rules::RouteDecision,
    runtime: &crate::control::CellRuntime,
) {
    let h = req.headers_mut();
    if let Some(slot) = d.slot {
        h.insert(X_SLOT, HeaderValue::from(slot));
    } else {
        h.remove(X_SLOT);
    }
    h.insert(X_CELL, runtime.name_header.clone());
    h.insert(X_HOME, gen.cells[d.home_cell as usize].name_header.clone());
    h.insert(X_COLOUR, HeaderValue::from_static(d.colour.as_str()));
    h.insert(X_REV, gen.rev_header.clone());
}
