//! Phases 3, 5 and 6: the cell's in-flight slot, attempts on pooled
//! upstream connections, and the response head.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use routing_rules::{CellReason, RouteDecision};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{stamps, BodyHead, Outgoing, Refusal, Shared};
use crate::control::{Generation, InflightGuard};
use crate::h1::{self, ResponseHead};
use crate::metrics::UpstreamErrorKind;
use crate::upstream::{ms_at, now_ms, CheckoutError, Instance, PooledConn};

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
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
