//! Answering on the lean path: the upstream's response head and body
//! relayed to the client, or the gateway's own refusal.

use super::*;

/// How to answer: the rules the request was routed with, and what the
/// client connection allows.
pub(super) struct Reply<'a> {
    pub(super) shared: &'a Shared,
    pub(super) gen: &'a crate::control::Generation,
    pub(super) keep_alive: bool,
    pub(super) http10: bool,
}

/// Writes the response head and streams the body; returns whether the
/// client connection stays open. Each wait for more of the body is bounded
/// by the request timeout (on the connection's `timer`).
pub(super) async fn relay_response(
    client: &mut TcpStream,
    wbuf: &mut Vec<u8>,
    mut timer: Pin<&mut tokio::time::Sleep>,
    fwd: Forwarded,
    out: &Outgoing,
    reply: Reply<'_>,
) -> std::io::Result<bool> {
    let Reply {
        shared,
        gen,
        mut keep_alive,
        http10,
    } = reply;
    let debug = shared.settings.debug_headers.then_some(gen);
    let Forwarded {
        mut conn,
        head,
        guard,
        decision,
    } = fwd;
    // A chunked body goes through as it is to HTTP/1.1 clients; HTTP/1.0
    // clients get it decoded, delimited by closing the connection.
    let decode = head.framing == Framing::Chunked && http10;
    if head.framing == Framing::Close || decode {
        keep_alive = false;
    }
    wbuf.clear();
    {
        let io = conn.io();
        let b = &io.buf[..];
        h1::write_status_line(wbuf, head.status, &b[head.reason.clone()]);
        for (n, v) in forwarded_response_headers(b, &head) {
            h1::write_header(wbuf, n, v);
        }
        h1::write_header(wbuf, b"x-request-id", out.request_id());
        if let Some(gen) = debug {
            stamps(gen, &decision, |n, v| h1::write_header(wbuf, n, v));
        }
        if head.framing == Framing::Chunked && !decode {
            h1::write_header(wbuf, b"transfer-encoding", b"chunked");
        }
        end_head(wbuf, keep_alive, http10);
        io.buf.advance(head.len);
    }
    let mut decoder = BodyDecoder::new(head.framing);
    let mut upstream_ok = true;
    loop {
        let io = conn.io();
        while !io.buf.is_empty() && !decoder.is_done() {
            let step = decoder.feed(&io.buf).map_err(std::io::Error::other)?;
            if decode {
                if let Some(r) = step.data {
                    wbuf.extend_from_slice(&io.buf[r]);
                }
            } else {
                wbuf.extend_from_slice(&io.buf[..step.consumed]);
            }
            io.buf.advance(step.consumed);
            if step.consumed == 0 {
                break;
            }
        }
        if decoder.is_done() {
            break;
        }
        // Flush what we have, then wait for more of the body.
        if !wbuf.is_empty() {
            send(client, wbuf, timer.as_mut(), shared).await?;
            wbuf.clear();
        }
        let deadline = tokio::time::Instant::now() + shared.settings.request_timeout;
        let Some(more) = with_deadline(timer.as_mut(), deadline, io.read_more()).await else {
            // The client sees a body cut short (its framing tells it so).
            return Err(conn.stalled(shared.control.metrics()));
        };
        match more {
            Ok(0) if decoder.until_close() => {
                upstream_ok = false;
                break;
            }
            Ok(0) => return Err(closed_mid_body()),
            Ok(_) => {}
            Err(e) => return Err(e),
        }
    }
    if !wbuf.is_empty() {
        send(client, wbuf, timer.as_mut(), shared).await?;
    }
    if upstream_ok && head.keep_alive {
        conn.release();
    }
    drop(guard);
    if !keep_alive {
        let _ = client.shutdown().await;
    }
    Ok(keep_alive)
}

/// Writes `bytes` to the client within the send timeout (on the
/// connection's own timer): a client that leaves response bytes unread for
/// that long is cut off, and the cell's slot and upstream connection come
/// back (nginx's `send_timeout`).
async fn send(
    client: &mut TcpStream,
    bytes: &[u8],
    timer: Pin<&mut tokio::time::Sleep>,
    shared: &Shared,
) -> std::io::Result<()> {
    let deadline = tokio::time::Instant::now() + shared.settings.send_timeout;
    match with_deadline(timer, deadline, client.write_all(bytes)).await {
        Some(r) => r,
        None => {
            shared.control.metrics().client_error("send_timeout");
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client took no response bytes within the send timeout",
            ))
        }
    }
}

/// Ends a response head: `connection: close` when the connection ends after
/// it, `connection: keep-alive` when an HTTP/1.0 client keeps it.
fn end_head(wbuf: &mut Vec<u8>, keep_alive: bool, http10: bool) {
    if !keep_alive {
        h1::write_header(wbuf, b"connection", b"close");
    } else if http10 {
        h1::write_header(wbuf, b"connection", b"keep-alive");
    }
    wbuf.extend_from_slice(b"\r\n");
}

/// Writes a gateway-made JSON answer (its length but no body to a HEAD).
pub(super) async fn write_refusal(
    client: &mut TcpStream,
    wbuf: &mut Vec<u8>,
    r: &Refusal,
    keep_alive: bool,
    http10: bool,
    head: bool,
) -> std::io::Result<()> {
    let body = r.body();
    wbuf.clear();
    h1::write_status_line(
        wbuf,
        r.status.as_u16(),
        r.status.canonical_reason().unwrap_or("").as_bytes(),
    );
    h1::write_header(wbuf, b"content-type", b"application/json");
    let length = body.len() as u64;
    h1::write_header(wbuf, b"content-length", h1::fmt_u64(length, &mut [0u8; 20]));
    if r.retry_after {
        h1::write_header(wbuf, b"retry-after", b"1");
    }
    end_head(wbuf, keep_alive, http10);
    if !head {
        wbuf.extend_from_slice(body.as_bytes());
    }
    client.write_all(wbuf).await?;
    if !keep_alive {
        let _ = client.shutdown().await;
    }
    Ok(())
}
