//! One attempt of a forwarded request on one upstream connection: the
//! head with the stamps, the body, and the response head.

use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Buf;
use http_body_util::BodyExt;
use routing_rules::RouteDecision;
use tokio::io::AsyncWriteExt;

use super::forward::{read_client, Failure, ReqBody};
use super::{stamps, BodyHead, Outgoing, Shared};
use crate::control::Generation;
use crate::h1::{self, ResponseHead};
use crate::upstream::PooledConn;

impl Shared {
    /// One attempt on one connection: head (with stamps), body, response head.
    pub(super) async fn exchange(
        &self,
        gen: &Generation,
        out: &mut Outgoing,
        decision: &RouteDecision,
        conn: &mut PooledConn,
        body: &mut ReqBody<'_>,
        uploading: &AtomicBool,
    ) -> Result<ResponseHead, Failure> {
        let io = conn.io();
        out.wire.truncate(out.base_len);
        stamps(gen, decision, |n, v| h1::write_header(&mut out.wire, n, v));
        out.wire.extend_from_slice(b"\r\n");
        // The head and what is already buffered of the body go in one write.
        let mut first_body = 0;
        match body {
            ReqBody::Fixed { buf, remaining, .. } => {
                first_body = (*remaining).min(buf.len() as u64) as usize;
                out.wire.extend_from_slice(&buf[..first_body]);
            }
            ReqBody::Stream {
                prefix,
                rest: None,
                framing: BodyHead::Length(_),
            } => out.wire.extend_from_slice(prefix),
            _ => {}
        }
        if io.stream.write_all(&out.wire).await.is_err() {
            return Err(Failure::Unsent);
        }
        let body_timeout = self.settings.client_body_timeout;
        match body {
            ReqBody::Empty => {}
            ReqBody::Fixed {
                stream,
                buf,
                remaining,
            } => {
                buf.advance(first_body);
                *remaining -= first_body as u64;
                uploading.store(*remaining > 0, Ordering::Relaxed);
                while *remaining > 0 {
                    if buf.is_empty() {
                        read_client(stream, buf, body_timeout).await?;
                    }
                    let n = (*remaining).min(buf.len() as u64) as usize;
                    if let Err(e) = io.stream.write_all(&buf[..n]).await {
                        return Err(Failure::Failed(e.to_string()));
                    }
                    buf.advance(n);
                    *remaining -= n as u64;
                }
                uploading.store(false, Ordering::Relaxed);
            }
            ReqBody::Stream {
                rest: None,
                framing: BodyHead::Length(_),
                ..
            } => {}
            ReqBody::Stream {
                prefix,
                rest,
                framing,
            } => {
                let chunked = *framing == BodyHead::Chunked;
                let length = match *framing {
                    BodyHead::Length(n) => n,
                    _ => 0,
                };
                let mut sent = 0u64;
                let mut frame_buf = Vec::new();
                let mut next = (!prefix.is_empty()).then(|| prefix.clone());
                uploading.store(true, Ordering::Relaxed);
                loop {
                    let data = match next.take() {
                        Some(d) => d,
                        None => {
                            let Some(rest) = rest.as_mut() else { break };
                            let frame = match tokio::time::timeout(body_timeout, rest.frame()).await
                            {
                                Err(_) => return Err(Failure::ClientStalled),
                                Ok(None) => break,
                                Ok(Some(Ok(f))) => f,
                                Ok(Some(Err(_))) => return Err(Failure::ClientGone),
                            };
                            let Ok(data) = frame.into_data() else {
                                continue;
                            };
                            data
                        }
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
                uploading.store(false, Ordering::Relaxed);
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
        let reused = conn.reused();
        conn.io()
            .read_head(out.head_request)
            .await
            .map_err(|e| match e {
                crate::upstream::ReadHeadError::Closed if reused => Failure::ClosedIdle,
                e => Failure::Failed(e.to_string()),
            })
    }
}
