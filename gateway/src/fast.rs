//! The lean HTTP/1.1 front end: one task per client connection that reads
//! request heads with httparse, routes and forwards them (`proxy.rs`), and
//! writes the upstream's response head and body straight back, with no
//! header maps and no per-request task or channel.
//!
//! It serves plain HTTP/1.0 and HTTP/1.1 requests (origin-form target,
//! `content-length` or no body). The first request it does not serve —
//! HTTP/2 prior knowledge, chunked request bodies, `Expect`, `Upgrade`,
//! absolute-form targets, malformed or oversized heads — hands the rest of
//! the connection, bytes already read included, to hyper (which answers
//! malformed requests with the proper 4xx).

use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

mod respond;

use respond::{relay_response, write_refusal, Reply};

use crate::access_log::Entry;
use crate::conn_watch::{ConnWatch, Verdict};
use crate::h1::{self, BodyDecoder, Framing, MAX_HEADERS};
use crate::proxy::{
    forwarded_response_headers, stamps, with_deadline, BodyHead, Forwarded, HeadParts, Outgoing,
    ProxyService, Refusal, ReqBody, Shared,
};
use crate::upstream::closed_mid_body;

/// What every client connection task needs.
pub struct FrontEnd {
    /// Routing and forwarding.
    pub shared: Arc<Shared>,
    /// The hyper service, for connections handed over.
    pub service: ProxyService,
    /// The hyper connection builder (HTTP/1 and HTTP/2).
    pub builder: auto::Builder<TokioExecutor>,
}

/// Outcome of looking at the buffered bytes.
enum Next {
    /// Need more bytes.
    Partial,
    /// Not for the lean path: hand the connection to hyper.
    Hyper,
    /// The head is larger than `--max-head-bytes`: 431, then close.
    TooLarge,
    /// A request, prepared.
    Request(Prepared),
}

struct Prepared {
    head_len: usize,
    out: Result<Outgoing, Refusal>,
    body_len: u64,
    /// The client wants the connection kept open after this exchange.
    keep_alive: bool,
    http10: bool,
    /// A HEAD request: answers carry no body.
    head: bool,
    /// Its access-log entry, when the log is on.
    access: Option<Box<Entry>>,
}

fn prepare(
    shared: &Shared,
    gen: &crate::control::Generation,
    buf: &[u8],
    peer_ip: &[u8],
    spare: &mut Vec<u8>,
) -> Next {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < shared.settings.max_head => {
            return Next::Partial
        }
        Ok(httparse::Status::Partial) => return Next::TooLarge,
        _ => return Next::Hyper,
    };
    let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
        return Next::Hyper;
    };
    if !path.starts_with('/') || method == "CONNECT" {
        return Next::Hyper;
    }
    let http10 = version == 0;
    let mut body_len: Option<u64> = None;
    let mut close = false;
    let mut keep_alive = false;
    for h in req.headers.iter() {
        let n = h.name.as_bytes();
        match n.len() {
            6 if n.eq_ignore_ascii_case(b"expect") => return Next::Hyper,
            7 if n.eq_ignore_ascii_case(b"upgrade") => return Next::Hyper,
            17 if n.eq_ignore_ascii_case(b"transfer-encoding") => return Next::Hyper,
            14 if n.eq_ignore_ascii_case(b"content-length") => {
                match (h1::parse_length(h.value), body_len) {
                    (Some(v), None) => body_len = Some(v),
                    (Some(v), Some(prev)) if v == prev => {}
                    _ => return Next::Hyper,
                }
            }
            10 if n.eq_ignore_ascii_case(b"connection") => {
                close |= h1::has_token(h.value, b"close");
                keep_alive |= h1::has_token(h.value, b"keep-alive");
            }
            _ => {}
        }
    }
    let keep_alive = if http10 { keep_alive && !close } else { !close };
    let parts = HeadParts {
        method: method.as_bytes(),
        target: path,
        headers: req.headers.iter().map(|h| (h.name.as_bytes(), h.value)),
        wire: std::mem::take(spare),
        host: None,
        body: match body_len {
            Some(n) => BodyHead::Length(n),
            None => BodyHead::None,
        },
        http11: !http10,
    };
    let start = Instant::now();
    let out = Outgoing::build(shared, gen, parts, peer_ip, start);
    let access = shared.settings.access_log.as_ref().map(|_| {
        let mut e = Entry::new(method.as_bytes(), path, start);
        if let Ok(o) = &out {
            e.routed(gen, o);
        }
        Box::new(e)
    });
    Next::Request(Prepared {
        head_len,
        out,
        access,
        body_len: body_len.unwrap_or(0),
        keep_alive,
        http10,
        head: method == "HEAD",
    })
}

/// Serves one client connection until it closes, times out, or the
/// gateway stops (`stop` turns true: the request in progress finishes,
/// then the connection closes). `_drain` is dropped when the connection ends.
pub async fn serve_connection(
    front: Arc<FrontEnd>,
    mut stream: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
    _drain: mpsc::Sender<()>,
) {
    let peer_ip = peer.ip().to_string();
    let shared = &front.shared;
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut wbuf: Vec<u8> = Vec::with_capacity(8 * 1024);
    // The upstream head buffer, handed from request to request.
    let mut spare: Vec<u8> = Vec::with_capacity(1024);
    let mut stopping = *stop.borrow();
    // A second receiver: `stop` itself is borrowed by `stopped` below.
    let stop_seen = stop.clone();
    let mut last_activity = Instant::now();
    let idle_timeout = shared.settings.idle_timeout;
    let mut idle = pin!(tokio::time::sleep(idle_timeout));
    let mut stopped = pin!(stop.changed());
    loop {
        // 1. A complete request head, routed with the rules current when
        //    it arrived.
        let (prepared, gen) = loop {
            if !buf.is_empty() {
                let gen = shared.control.current();
                match prepare(shared, &gen, &buf, peer_ip.as_bytes(), &mut spare) {
                    Next::Partial => {}
                    Next::Hyper => {
                        return hand_to_hyper(&front, stream, buf, peer, stopping, stop_seen).await;
                    }
                    Next::TooLarge => {
                        shared.control.metrics().client_error("bad_request");
                        let r = Refusal::new(
                            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "head_too_large",
                            "the request head is larger than the gateway accepts",
                        );
                        let _ =
                            write_refusal(&mut stream, &mut wbuf, &r, false, false, false).await;
                        return;
                    }
                    Next::Request(p) => break (p, gen),
                }
            } else if stopping {
                return;
            }
            tokio::select! {
                biased;
                r = stream.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ = &mut stopped, if !stopping => {
                    stopping = true;
                }
                _ = &mut idle => {
                    let deadline = last_activity + idle_timeout;
                    if Instant::now() >= deadline {
                        tracing::debug!(peer = %peer, "no request head in time; closing");
                        shared.control.metrics().client_error("idle_timeout");
                        return;
                    }
                    idle.as_mut().reset(deadline.into());
                }
            }
        };
        let mut gen = gen;
        let mut access = prepared.access;
        let mut keep_alive = prepared.keep_alive && !stopping;
        let head_len = prepared.head_len;
        // A request whose body fits the buffer is kept (head and body) so
        // that a 421 from the cell can be held and sent again (--hold-ms).
        let replayable = !shared.settings.hold.is_zero()
            && prepared.out.is_ok()
            && prepared.body_len <= shared.settings.client_body_buffer;

        // 2. Forward, or answer ourselves.
        let outcome = match prepared.out {
            Ok(mut out) => {
                // The body (up to the buffer size) arrives before an
                // upstream connection is taken: a slow client holds nothing
                // of the cell.
                let want =
                    head_len + prepared.body_len.min(shared.settings.client_body_buffer) as usize;
                while buf.len() < want {
                    let read = tokio::time::timeout(
                        shared.settings.client_body_timeout,
                        stream.read_buf(&mut buf),
                    )
                    .await;
                    match read {
                        Ok(Ok(n)) if n > 0 => {}
                        Ok(_) => return,
                        Err(_) => {
                            shared.control.metrics().client_error("body_timeout");
                            let r = Refusal::new(
                                http::StatusCode::REQUEST_TIMEOUT,
                                "client_body_timeout",
                                "the request body did not arrive in time",
                            );
                            let (http10, head) = (prepared.http10, prepared.head);
                            let _ = write_refusal(&mut stream, &mut wbuf, &r, false, http10, head)
                                .await;
                            return;
                        }
                    }
                }
                let replay = replayable
                    .then(|| Bytes::copy_from_slice(&buf[..head_len + prepared.body_len as usize]));
                buf.advance(head_len);
                let body = if prepared.body_len > 0 {
                    ReqBody::Fixed {
                        stream: &mut stream,
                        buf: &mut buf,
                        remaining: prepared.body_len,
                    }
                } else {
                    ReqBody::Empty
                };
                let fwd = shared
                    .forward(&gen, &mut out, body, Some(idle.as_mut()))
                    .await;
                if let Some(e) = access.as_mut() {
                    e.attempted(&out);
                }
                match replay {
                    Some(replay) => {
                        let again = Replay {
                            bytes: replay,
                            head_len,
                            peer_ip: peer_ip.as_bytes(),
                        };
                        hold_misdirected(shared, &mut gen, fwd.map(|f| (f, out)), again, &mut spare)
                            .await
                    }
                    None => fwd.map(|f| (f, out)),
                }
            }
            Err(r) => {
                buf.advance(head_len);
                Err(r)
            }
        };
        let (fwd, out) = match outcome {
            Ok(x) => x,
            Err(r) => {
                if let (Some(log), Some(mut e)) = (&shared.settings.access_log, access) {
                    e.refused(&r);
                    log.write(&e);
                }
                // A body may be partly unread: then the connection cannot go on.
                keep_alive &= prepared.body_len == 0;
                if write_refusal(
                    &mut stream,
                    &mut wbuf,
                    &r,
                    keep_alive,
                    prepared.http10,
                    prepared.head,
                )
                .await
                .is_err()
                    || !keep_alive
                {
                    return;
                }
                last_activity = Instant::now();
                continue;
            }
        };

        if let (Some(log), Some(mut e)) = (&shared.settings.access_log, access) {
            e.attempted(&out);
            e.decided(&gen, &fwd.decision);
            e.answered(fwd.head.status);
            log.write(&e);
        }
        // 3. The response (the last on this connection when the gateway
        //    began to stop meanwhile).
        keep_alive &= !*stop_seen.borrow();
        let reply = Reply {
            shared,
            gen: &gen,
            keep_alive,
            http10: prepared.http10,
        };
        match relay_response(&mut stream, &mut wbuf, idle.as_mut(), fwd, &out, reply).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::debug!(peer = %peer, error = %e, "response relay ended early; closing");
                return;
            }
        }
        spare = out.into_wire();
        last_activity = Instant::now();
    }
}

/// A request kept to be sent again: its head and whole body as received.
struct Replay<'a> {
    bytes: Bytes,
    head_len: usize,
    peer_ip: &'a [u8],
}

/// While the cell answers `421 Misdirected` (nothing applied: the user's
/// shard is moving, or these rules are stale), holds the request for newer
/// rules or a health change and sends it again, routed anew, within
/// `--hold-ms` in all.
async fn hold_misdirected(
    shared: &Shared,
    gen: &mut Arc<crate::control::Generation>,
    mut outcome: Result<(Forwarded, Outgoing), Refusal>,
    replay: Replay<'_>,
    spare: &mut Vec<u8>,
) -> Result<(Forwarded, Outgoing), Refusal> {
    let until = tokio::time::Instant::now() + shared.settings.hold;
    while matches!(&outcome, Ok((f, _)) if f.head.status == 421) {
        // The 421's connection is dropped with its unread answer.
        drop(outcome);
        *gen = shared.hold(gen.table.revision(), until).await?;
        let Next::Request(p) = prepare(shared, gen, &replay.bytes, replay.peer_ip, spare) else {
            return Err(Refusal::new(
                http::StatusCode::BAD_GATEWAY,
                "replay_failed",
                "the held request could not be routed again",
            ));
        };
        let mut out = p.out?;
        // The whole body is in hand: sent as a body read in advance.
        let body = if p.body_len > 0 {
            ReqBody::Stream {
                prefix: replay.bytes.slice(replay.head_len..),
                rest: None,
                framing: BodyHead::Length(p.body_len),
            }
        } else {
            ReqBody::Empty
        };
        outcome = shared
            .forward(gen, &mut out, body, None)
            .await
            .map(|f| (f, out));
    }
    outcome
}

/// Serves the rest of a connection with hyper, replaying `read` first.
async fn hand_to_hyper(
    front: &FrontEnd,
    stream: TcpStream,
    read: BytesMut,
    peer: SocketAddr,
    stopping: bool,
    mut stop: watch::Receiver<bool>,
) {
    let io = TokioIo::new(Prefixed {
        prefix: read.freeze(),
        inner: stream,
    });
    let watch = Arc::new(ConnWatch::default());
    let svc = TowerToHyperService::new(front.service.for_peer(peer, watch.clone()));
    let conn = front.builder.serve_connection(io, svc);
    let mut conn = pin!(conn);
    let settings = &front.shared.settings;
    if !stopping {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(peer = %peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            v = watch.verdict(settings.idle_timeout, settings.send_timeout) => {
                front.shared.control.metrics().client_error(v.as_str());
                tracing::debug!(peer = %peer, reason = v.as_str(), "closing the client connection");
                if v == Verdict::SendTimeout {
                    // Dropping the connection drops its response bodies:
                    // the cell's slots and upstream connections come back.
                    return;
                }
                conn.as_mut().graceful_shutdown();
            }
            _ = stop.changed() => conn.as_mut().graceful_shutdown(),
        }
    } else {
        conn.as_mut().graceful_shutdown();
    }
    // A graceful close is bounded too: a client ignoring it is dropped.
    match tokio::time::timeout(settings.idle_timeout, conn).await {
        Ok(Err(e)) => {
            tracing::debug!(peer = %peer, error = %e, "client connection ended with an error")
        }
        Ok(Ok(())) => {}
        Err(_) => tracing::debug!(peer = %peer, "client ignored the graceful close; dropped"),
    }
}

/// A socket whose first reads return bytes already read from it.
struct Prefixed {
    prefix: Bytes,
    inner: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
