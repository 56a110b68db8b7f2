//! Serving a listener: a bounded number of connections, a back-off on
//! accept errors (EMFILE must not spin), and request bodies read in full
//! (bounded in size and time) before any handler runs — so an early answer
//! (a 421, a 400) never leaves unread body bytes that would force the
//! keep-alive connection closed under the client's next request.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// How long a client may take to send a request head, and then its body, ms.
pub const READ_TIMEOUT_MS: u64 = 10_000;
/// First pause after a failed accept, ms (doubles up to [`ACCEPT_BACKOFF_MAX_MS`]).
pub const ACCEPT_BACKOFF_MS: u64 = 10;
/// Longest pause after repeated accept failures, ms.
pub const ACCEPT_BACKOFF_MAX_MS: u64 = 1_000;

/// Largest body on the internal listener (journal shipments), bytes.
pub const INTERNAL_MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// Reads a request's body in full: at most `limit` bytes (413; the public
/// listener's is [`crate::body::MAX_BODY_BYTES`]) within [`READ_TIMEOUT_MS`] (408). A
/// refusal closes the connection, since the rest of the body was not read.
pub async fn buffered(
    req: Request<hyper::body::Incoming>,
    limit: usize,
) -> Result<Request<Bytes>, Response<Full<Bytes>>> {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(
        Duration::from_millis(READ_TIMEOUT_MS),
        Limited::new(body, limit).collect(),
    )
    .await;
    let refuse = |status: StatusCode, code: &str, message: String| {
        let mut r = crate::api::json_response(
            status.as_u16(),
            &serde_json::json!({"error": code, "message": message}),
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        r
    };
    match read {
        Ok(Ok(body)) => Ok(Request::from_parts(parts, body.to_bytes())),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                format!("the body exceeds {limit} bytes"),
            ))
        }
        Ok(Err(e)) => Err(refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("cannot read the body: {e}"),
        )),
        Err(_) => Err(refuse(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!("the body did not arrive within {READ_TIMEOUT_MS} ms"),
        )),
    }
}

/// Serves `listener` until `stop` flips, with at most `max_connections`
/// open at once (further clients wait in the kernel's backlog), each
/// request's body read in full and handed to `handle`. On stop, open
/// connections finish their requests (graceful shutdown).
pub async fn serve<H, F>(
    listener: TcpListener,
    max_connections: usize,
    body_limit: usize,
    handle: H,
    mut stop: watch::Receiver<bool>,
) where
    H: Fn(Request<Bytes>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(READ_TIMEOUT_MS));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20));
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let mut backoff = ACCEPT_BACKOFF_MS;
    let addr = listener.local_addr().ok();
    // The connections belong to this future: dropped (the agent killed,
    // see `RunningAgent::kill`), every one of them goes with it.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => { backoff = ACCEPT_BACKOFF_MS; s }
                Err(e) => {
                    tracing::warn!(listener = ?addr, error = %e, pause_ms = backoff, "accept failed; pausing");
                    tokio::time::sleep(Duration::from_millis(backoff)).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX_MS);
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        let svc = tower::service_fn(move |req: Request<hyper::body::Incoming>| {
            let handle = handle.clone();
            async move {
                Ok::<_, Infallible>(match buffered(req, body_limit).await {
                    Ok(req) => handle(req).await,
                    Err(refusal) => refusal,
                })
            }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
            .into_owned();
        let conn = graceful.watch(conn);
        connections.spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    graceful.shutdown().await;
    connections.detach_all();
}
