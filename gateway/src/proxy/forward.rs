//! Phases 3, 5 and 6: the cell's in-flight slot, attempts on pooled
//! upstream connections, and the response head.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use hyper::body::Incoming;
use routing_rules::{CellReason, RouteDecision};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tower::retry::budget::Budget;

use super::{BodyHead, Outgoing, Refusal, Shared};
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
    /// A hyper body, sent as `framing` says (chunked, or its exact length):
    /// `prefix` (read before an upstream was chosen), then the rest.
    Stream {
        /// What was read of the body already.
        prefix: Bytes,
        /// The rest of the body; `None` when `prefix` is all of it.
        rest: Option<Incoming>,
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

pub(super) enum Failure {
    /// Failed before the upstream could have a complete request: safe to
    /// send again.
    Unsent,
    /// Failed after the request (or part of its body) went out.
    Failed(String),
    /// A connection from the idle pool was closed by the upstream without
    /// a byte of answer (it closed it while the request was on its way):
    /// an idempotent request is sent again on another connection.
    ClosedIdle,
    /// The client went away while its body was forwarded.
    ClientGone,
    /// The client stopped sending its body: its fault, not the cell's.
    ClientStalled,
    /// No response head within the request timeout.
    Timeout,
    /// The active checks found the instance down while the request waited
    /// for its answer (a frozen process): whether it was carried out is
    /// unknown.
    Lost,
}

/// Reads more of a client body within the body timeout.
pub(super) async fn read_client(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    timeout: std::time::Duration,
) -> Result<(), Failure> {
    match tokio::time::timeout(timeout, stream.read_buf(buf)).await {
        Err(_) => Err(Failure::ClientStalled),
        Ok(Ok(0)) | Ok(Err(_)) => Err(Failure::ClientGone),
        Ok(Ok(_)) => Ok(()),
    }
}

impl Shared {
    /// Sends `out` upstream with retries as the rules allow; returns the
    /// response head or what to answer instead.
    ///
    /// A request never leaves its serving cell because an attempt failed:
    /// retries go to another instance (or the other colour) of the same
    /// cell, within the retry budget and after a jittered pause; only the
    /// cell's health state (active probes) moves users between cells. A
    /// cell whose connections are all busy answers 503 + Retry-After (load
    /// shedding, never a failover).
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
        self.budget.deposit();
        let replayable = out.idempotent && body.is_empty();
        let mut tried: Vec<Arc<Instance>> = Vec::new();
        let mut sent_once = false;
        let mut retry = false;
        let mut last_error = Refusal::new(
            StatusCode::BAD_GATEWAY,
            "no_upstream",
            "no instance of the serving cell could be reached",
        );
        // 3: the serving cell's in-flight slot (the cell never changes below).
        let cell = decision.serving_cell;
        let Some(guard) = gen.cells[cell as usize].limiter.try_acquire() else {
            metrics
                .rejected
                .with_label_values(&["cell_overloaded"])
                .inc();
            gen.group(cell, decision.colour)
                .metrics
                .observe(503, out.start.elapsed().as_secs_f64());
            return Err(Refusal::busy(
                "cell_overloaded",
                "the serving cell has too many requests in flight; retry shortly",
            ));
        };
        let uploading = AtomicBool::new(false);
        for attempt in 0..self.settings.max_attempts {
            let colour = decision.colour;
            if sent_once && !replayable {
                break;
            }
            if retry {
                // A real retry (not a stale pooled connection): within the
                // budget, after a jittered pause.
                if !self.budget.withdraw() {
                    metrics.retries_denied.inc();
                    break;
                }
                tokio::time::sleep(self.retry_pause(attempt)).await;
                metrics
                    .retries
                    .with_label_values(&[table.cell_name(cell), colour.as_str()])
                    .inc();
            }
            retry = false;
            let group = gen.group(cell, colour);
            let now = if attempt == 0 {
                ms_at(out.start)
            } else {
                now_ms()
            };
            let Some(instance) = group.pick(now, &tried) else {
                break;
            };
            let mut conn = match instance.checkout().await {
                Ok(c) => c,
                Err(CheckoutError::Saturated) => {
                    // Busy, not broken: try another instance of the group,
                    // never another cell; nothing is counted against it.
                    tried.push(instance);
                    last_error = Refusal::busy(
                        "cell_saturated",
                        "every connection to the serving cell is busy; retry shortly",
                    );
                    continue;
                }
                Err(CheckoutError::Connect) => {
                    metrics.upstream_error(
                        &instance.cell,
                        colour.as_str(),
                        UpstreamErrorKind::Connect,
                    );
                    self.maybe_eject(gen, &instance, "connect failed");
                    tried.push(instance);
                    retry = true;
                    match out.reroute(gen, &decision, &tried) {
                        Some(d) => decision = d,
                        None => break,
                    }
                    continue;
                }
            };
            let from = if attempt == 0 {
                out.start
            } else {
                Instant::now()
            };
            out.attempts += 1;
            out.upstream = Some(instance.address.clone());
            let exchange = self.exchange(gen, out, &decision, &mut conn, &mut body, &uploading);
            // The instance found down meanwhile (health checks): stop
            // waiting for an answer that may never come. The wake-up is
            // armed before the verdict is read, so a verdict given while
            // the connection was being checked out is not missed (nothing
            // was sent yet then: another instance is tried).
            let exchange = async {
                let lost = instance.lost();
                tokio::pin!(lost);
                lost.as_mut().enable();
                if !instance.active_up() {
                    return Err(Failure::Unsent);
                }
                tokio::select! {
                    biased;
                    r = exchange => r,
                    _ = lost => Err(Failure::Lost),
                }
            };
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
            // A deadline that passed while the client was still sending its
            // body is the client's slowness, not the cell's.
            let result = match result {
                Err(Failure::Timeout) if uploading.load(Ordering::Relaxed) => {
                    Err(Failure::ClientStalled)
                }
                r => r,
            };
            match result {
                Ok(head) => {
                    let status = head.status;
                    if status >= 500 {
                        metrics.upstream_error(
                            &instance.cell,
                            colour.as_str(),
                            UpstreamErrorKind::Status5xx,
                        );
                        if instance.note_failure() {
                            self.maybe_eject(gen, &instance, "5xx streak");
                        }
                    } else {
                        instance.note_success();
                    }
                    group
                        .metrics
                        .observe(status, out.start.elapsed().as_secs_f64());
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
                Err(Failure::ClosedIdle) if replayable => {
                    // The keep-alive race: an idempotent request goes again
                    // on another connection, counted against nobody.
                    continue;
                }
                Err(Failure::ClosedIdle) => {
                    last_error = Refusal::new(
                        StatusCode::BAD_GATEWAY,
                        "upstream_failed",
                        "the upstream closed a kept-alive connection without answering",
                    );
                    break;
                }
                Err(Failure::ClientGone) => {
                    return Err(Refusal::new(
                        StatusCode::BAD_REQUEST,
                        "client_gone",
                        "the client closed the connection while sending its body",
                    ));
                }
                Err(Failure::ClientStalled) => {
                    metrics.client_error("body_timeout");
                    return Err(Refusal::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "client_body_timeout",
                        "the request body did not arrive in time",
                    ));
                }
                Err(Failure::Timeout) => {
                    metrics.upstream_error(
                        &instance.cell,
                        colour.as_str(),
                        UpstreamErrorKind::Timeout,
                    );
                    if instance.note_failure() {
                        self.maybe_eject(gen, &instance, "timeout streak");
                    }
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
                Err(failure @ (Failure::Lost | Failure::Failed(_))) => {
                    // Sent: another attempt only for a replayable request.
                    sent_once = true;
                    tried.push(instance.clone());
                    last_error = if let Failure::Failed(error) = failure {
                        metrics.upstream_error(
                            &instance.cell,
                            colour.as_str(),
                            UpstreamErrorKind::Reset,
                        );
                        if instance.note_failure() {
                            self.maybe_eject(gen, &instance, "failure streak");
                        }
                        tracing::warn!(cell = %instance.cell, colour = %colour, instance = %instance.address, error = %error, "upstream failed after the request was sent");
                        Refusal::new(
                            StatusCode::BAD_GATEWAY,
                            "upstream_failed",
                            "the upstream failed after the request was sent",
                        )
                    } else {
                        // Health already took the instance out of routing;
                        // not one more failure to count against it.
                        metrics.upstream_error(
                            &instance.cell,
                            colour.as_str(),
                            UpstreamErrorKind::Lost,
                        );
                        tracing::warn!(cell = %instance.cell, colour = %colour, instance = %instance.address, "instance found down by the health checks while a request waited for its answer");
                        Refusal::new(
                            StatusCode::BAD_GATEWAY,
                            "upstream_lost",
                            "the instance stopped answering health checks while this request waited for its answer; \
                             whether it was carried out is unknown: send it again with the same idempotency key",
                        )
                    };
                    if replayable {
                        retry = true;
                        match out.reroute(gen, &decision, &tried) {
                            Some(d) => decision = d,
                            None => break,
                        }
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

    /// Ejects `instance` unless that would eject the last up instance of
    /// its colour or more of its cell than `--max-ejection-percent`.
    fn maybe_eject(&self, gen: &Generation, instance: &Instance, why: &str) {
        let now = now_ms();
        let Some(cell) = gen.table.cell_index(&instance.cell) else {
            return;
        };
        if gen.cells[cell as usize].may_eject(instance, now) {
            let ms = instance.eject(now);
            self.control
                .metrics()
                .ejections
                .with_label_values(&[&instance.cell])
                .inc();
            tracing::warn!(cell = %instance.cell, colour = %instance.colour, instance = %instance.address, eject_ms = ms, why, "instance ejected");
        } else {
            tracing::warn!(cell = %instance.cell, colour = %instance.colour, instance = %instance.address, why, "instance not ejected: it is the last up instance of its colour, or the cell's ejection cap is reached");
        }
    }

    /// The pause before retry `attempt`: uniform in [0, 5 ms × 2^attempt],
    /// at most 100 ms, so that retries of many requests do not arrive in
    /// step.
    fn retry_pause(&self, attempt: usize) -> std::time::Duration {
        let cap = (5u64 << attempt.min(5)).min(100);
        std::time::Duration::from_millis(self.random() % (cap + 1))
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
    let chunked = head.framing == h1::Framing::Chunked;
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
            // A chunked response's framing is chunked only (RFC 9112 §6.3):
            // a content-length beside it is dropped.
            let dropped = h1::is_hop_by_hop(n)
                || n.eq_ignore_ascii_case(b"x-request-id")
                || (chunked && n.eq_ignore_ascii_case(b"content-length"))
                || (!connection.is_empty() && h1::named_by_connection(&connection, n));
            !dropped
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
