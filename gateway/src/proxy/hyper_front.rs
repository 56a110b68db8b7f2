//! The hyper front end: HTTP/2, and HTTP/1 requests the lean loop leaves
//! to hyper. Shares routing and forwarding with the lean path.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either};
use hyper::body::Incoming;

use super::refusal::refusal_response;
use super::{
    forwarded_response_headers, stamps, BodyHead, Forwarded, HeadParts, Outgoing, ProxyBody,
    Refusal, ReqBody, Shared,
};
use crate::access_log::Entry;
use crate::conn_watch::ConnWatch;
use crate::control::{Control, InflightGuard};
use crate::h1::{BodyDecoder, Framing};
use crate::upstream::{closed_mid_body, PooledConn};

/// The proxy service for one downstream connection (hyper front end).
#[derive(Clone)]
pub struct ProxyService {
    shared: Arc<Shared>,
    peer: Option<SocketAddr>,
    /// The connection's watchdog state.
    watch: Option<Arc<ConnWatch>>,
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
            watch: None,
            peer_ip: Arc::from(&b""[..]),
        }
    }

    /// The same service for a connection from `peer`, reporting what is
    /// in progress to the connection's `watch`.
    pub fn for_peer(&self, peer: SocketAddr, watch: Arc<ConnWatch>) -> Self {
        ProxyService {
            shared: self.shared.clone(),
            peer: Some(peer),
            watch: Some(watch),
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
        let watch = self.watch.clone();
        if let Some(w) = &watch {
            w.request_started();
        }
        Box::pin(async move {
            let mut access = shared.settings.access_log.as_ref().map(|_| {
                Entry::new(
                    req.method().as_str().as_bytes(),
                    req.uri().path(),
                    Instant::now(),
                )
            });
            let mut resp = handle_hyper(&shared, req, &peer_ip, &mut access).await;
            if let (Some(log), Some(mut e)) = (&shared.settings.access_log, access) {
                if e.status() == 0 {
                    e.answered(resp.status().as_u16());
                }
                log.write(&e);
            }
            if let Some(w) = watch {
                match resp.body_mut() {
                    Either::Left(body) => {
                        w.request_answered(true);
                        body.watch = Some(w);
                    }
                    Either::Right(_) => w.request_answered(false),
                }
            }
            Ok(resp)
        })
    }
}

/// Notes a refusal in the access-log entry, and answers it.
fn refuse(access: &mut Option<Entry>, r: &Refusal) -> Response<ProxyBody> {
    if let Some(e) = access.as_mut() {
        e.refused(r);
    }
    refusal_response(r)
}

async fn handle_hyper(
    shared: &Shared,
    req: Request<Incoming>,
    peer_ip: &[u8],
    access: &mut Option<Entry>,
) -> Response<ProxyBody> {
    let start = Instant::now();
    let gen = shared.control.current();
    if let Some(r) = unforwardable(&req) {
        shared.control.metrics().client_error("bad_request");
        if let Some(e) = access.as_mut() {
            e.refused(&r);
        }
        return closing(&r);
    }
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
    let build = |gen: &crate::control::Generation| {
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
            http11: parts.version == Version::HTTP_11,
        };
        Outgoing::build(shared, gen, head, peer_ip, start)
    };
    let mut gen = gen;
    let mut out = match build(&gen) {
        Ok(o) => o,
        Err(r) => return refuse(access, &r),
    };
    if let Some(e) = access.as_mut() {
        e.routed(&gen, &out);
    }
    let body = if empty {
        ReqBody::Empty
    } else {
        // Read the body (up to the buffer size) before any upstream
        // connection is taken: a slow client holds nothing of the cell.
        match read_prefix(
            body,
            shared.settings.client_body_buffer,
            shared.settings.client_body_timeout,
        )
        .await
        {
            Ok((prefix, rest)) => ReqBody::Stream {
                prefix,
                rest,
                framing,
            },
            Err(r) => {
                if r.status == StatusCode::REQUEST_TIMEOUT {
                    shared.control.metrics().client_error("body_timeout");
                }
                if let Some(e) = access.as_mut() {
                    e.refused(&r);
                }
                return closing(&r);
            }
        }
    };
    // A request read in full is kept, so that a 421 from the cell can be
    // held for newer rules and sent again (--hold-ms).
    let replay = match &body {
        _ if shared.settings.hold.is_zero() => None,
        ReqBody::Empty => Some(None),
        ReqBody::Stream {
            prefix, rest: None, ..
        } => Some(Some(prefix.clone())),
        _ => None,
    };
    let mut fwd = shared.forward(&gen, &mut out, body, None).await;
    if let Some(replay) = replay {
        let until = tokio::time::Instant::now() + shared.settings.hold;
        while matches!(&fwd, Ok(f) if f.head.status == 421) {
            // The 421's connection is dropped with its unread answer.
            drop(fwd);
            gen = match shared.hold(gen.table.revision(), until).await {
                Ok(g) => g,
                Err(r) => return refuse(access, &r),
            };
            out = match build(&gen) {
                Ok(o) => o,
                Err(r) => return refuse(access, &r),
            };
            let body = match &replay {
                None => ReqBody::Empty,
                Some(prefix) => ReqBody::Stream {
                    prefix: prefix.clone(),
                    rest: None,
                    framing,
                },
            };
            fwd = shared.forward(&gen, &mut out, body, None).await;
        }
    }
    if let Some(e) = access.as_mut() {
        e.attempted(&out);
    }
    let fwd = match fwd {
        Ok(f) => f,
        Err(r) => return refuse(access, &r),
    };
    if let Some(e) = access.as_mut() {
        e.decided(&gen, &fwd.decision);
    }
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
        watch: None,
        _guard: guard,
    };
    let (parts, ()) = resp.into_parts();
    Response::from_parts(parts, Either::Left(body))
}

/// A refusal after which the connection closes (the request's body, or
/// the request itself, is not something to read on from).
fn closing(r: &Refusal) -> Response<ProxyBody> {
    let mut resp = refusal_response(r);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Requests the gateway never forwards: `CONNECT` (405: it is not a
/// tunnel), and a body in a transfer coding other than `chunked` (501:
/// forwarding the decoded chunks would hand the cell gzip bytes as a plain
/// body).
fn unforwardable(req: &Request<Incoming>) -> Option<Refusal> {
    if req.method() == http::Method::CONNECT {
        return Some(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "CONNECT is not supported: the gateway is not a tunnel",
        ));
    }
    let other_coding = req
        .headers()
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| {
            let t = t.trim_ascii();
            !t.is_empty() && !t.eq_ignore_ascii_case(b"chunked")
        });
    other_coding.then(|| {
        Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            "unsupported_transfer_coding",
            "request bodies may only use the chunked transfer coding",
        )
    })
}

/// Reads a request body until `limit` bytes or its end, each wait bounded
/// by `timeout`: the bytes read, and the rest of the body when it did not
/// end.
async fn read_prefix(
    mut body: Incoming,
    limit: u64,
    timeout: Duration,
) -> Result<(Bytes, Option<Incoming>), Refusal> {
    let mut prefix = bytes::BytesMut::new();
    while (prefix.len() as u64) < limit {
        match tokio::time::timeout(timeout, body.frame()).await {
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "client_body_timeout",
                    "the request body did not arrive in time",
                ))
            }
            Ok(None) => return Ok((prefix.freeze(), None)),
            Ok(Some(Err(_))) => {
                return Err(Refusal::new(
                    StatusCode::BAD_REQUEST,
                    "client_gone",
                    "the request body could not be read",
                ))
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    prefix.extend_from_slice(&data);
                }
            }
        }
    }
    let rest = (!body.is_end_stream()).then_some(body);
    Ok((prefix.freeze(), rest))
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
    /// The client connection's watchdog, told of every step.
    watch: Option<Arc<ConnWatch>>,
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
        if let Some(w) = &this.watch {
            // hyper asks for more only when the client has room for it.
            w.body_progress();
        }
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
        if let Some(w) = self.watch.take() {
            w.body_done();
        }
    }
}
