//! The HTTP/1.1 pieces of the lean data path: message framing, an
//! incremental body decoder, hop-by-hop rules over raw header names, and
//! response-head parsing (httparse).
//!
//! The proxy speaks HTTP/1.1 to upstreams itself (and to plain HTTP/1.x
//! clients, see `fast.rs`) rather than through hyper's client and server
//! state machines: per request that saves the connection task's dispatch
//! channel, two header maps and most allocations (docs/benchmarks.md).

use std::ops::Range;

mod body;
pub use body::{BodyDecoder, Step};

/// Most headers a message may carry on the lean path (more: hyper serves it).
pub const MAX_HEADERS: usize = 96;
/// Largest request or response head, bytes.
pub const MAX_HEAD: usize = 64 * 1024;

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD responses, 1xx/204/304, `content-length: 0`).
    Empty,
    /// `content-length`.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
    /// Until the connection closes (responses only).
    Close,
}

/// A malformed or oversized message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The head could not be parsed.
    #[error("malformed message head")]
    Head,
    /// The head is larger than [`MAX_HEAD`] or has too many headers.
    #[error("message head too large")]
    HeadTooLarge,
    /// Conflicting or invalid `content-length` / `transfer-encoding`.
    #[error("invalid body framing")]
    Framing,
    /// Bad chunked encoding.
    #[error("invalid chunked encoding")]
    Chunk,
}

/// Hop-by-hop headers (never forwarded), by lower-case-insensitive name.
#[inline]
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    // Cheap length filter first: every hop-by-hop name is 2..=19 bytes.
    match name.len() {
        2 => name.eq_ignore_ascii_case(b"te"),
        7 => name.eq_ignore_ascii_case(b"trailer") || name.eq_ignore_ascii_case(b"upgrade"),
        10 => name.eq_ignore_ascii_case(b"connection") || name.eq_ignore_ascii_case(b"keep-alive"),
        16 => name.eq_ignore_ascii_case(b"proxy-connection"),
        17 => name.eq_ignore_ascii_case(b"transfer-encoding"),
        19 => name.eq_ignore_ascii_case(b"proxy-authorization"),
        _ => false,
    }
}

/// Whether the comma-separated header `value` lists `token`.
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether a `connection` header value names other headers (anything but
/// `keep-alive` and `close`), i.e. whether it must be kept for filtering.
pub fn names_headers(value: &[u8]) -> bool {
    value.split(|b| *b == b',').any(|t| {
        let t = t.trim_ascii();
        !t.is_empty() && !t.eq_ignore_ascii_case(b"keep-alive") && !t.eq_ignore_ascii_case(b"close")
    })
}

/// Whether `name` is one of the tokens of the `connection` header values
/// (headers the sender marked hop-by-hop).
pub fn named_by_connection(connection: &[&[u8]], name: &[u8]) -> bool {
    connection.iter().any(|v| has_token(v, name))
}

/// Parses a `content-length` value (digits only).
pub fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add((d - b'0') as u64)
    })
}

/// A parsed response head; names and values are ranges into the buffer it
/// was parsed from.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Reason phrase.
    pub reason: Range<usize>,
    /// Headers as (name, value) ranges.
    pub headers: Vec<(Range<usize>, Range<usize>)>,
    /// Length of the head in the buffer.
    pub len: usize,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the upstream keeps the connection open afterwards.
    pub keep_alive: bool,
}

/// Where `part` lies in `buf`; empty when it is not in `buf` (httparse
/// hands back a static `""` for a reason phrase that is not UTF-8).
fn range_in(buf: &[u8], part: &[u8]) -> Range<usize> {
    let (base, at) = (buf.as_ptr() as usize, part.as_ptr() as usize);
    if at >= base && at + part.len() <= base + buf.len() {
        at - base..at - base + part.len()
    } else {
        0..0
    }
}

/// Parses a response head at the start of `buf`. `Ok(None)`: incomplete.
/// `head_request`: the request was HEAD (no body whatever the headers say).
pub fn parse_response(
    buf: &[u8],
    head_request: bool,
) -> Result<Option<ResponseHead>, ProtocolError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => {
            return Err(ProtocolError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ProtocolError::HeadTooLarge),
        Err(_) => return Err(ProtocolError::Head),
    };
    let status = resp.code.unwrap_or(0);
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut close = resp.version != Some(1);
    let mut out = Vec::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(h.value).ok_or(ProtocolError::Framing)?;
            if length.is_some_and(|l| l != n) {
                return Err(ProtocolError::Framing);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            // Only `chunked` is relayed. Other transfer codings (gzip, ...)
            // would reach the client undecoded once the hop-by-hop header
            // is dropped: refused rather than corrupted.
            if chunked || !h.value.trim_ascii().eq_ignore_ascii_case(b"chunked") {
                return Err(ProtocolError::Framing);
            }
            chunked = true;
        } else if name.eq_ignore_ascii_case(b"connection") && has_token(h.value, b"close") {
            close = true;
        }
        out.push((range_in(buf, name), range_in(buf, h.value)));
    }
    let framing = if head_request || (100..200).contains(&status) || status == 204 || status == 304
    {
        Framing::Empty
    } else if chunked {
        Framing::Chunked
    } else {
        match length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => {
                close = true;
                Framing::Close
            }
        }
    };
    Ok(Some(ResponseHead {
        status,
        reason: range_in(buf, resp.reason.unwrap_or("").as_bytes()),
        headers: out,
        len,
        framing,
        keep_alive: !close,
    }))
}

/// Appends `HTTP/1.1 <status> <reason>\r\n`.
pub fn write_status_line(out: &mut Vec<u8>, status: u16, reason: &[u8]) {
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, status as u64);
    out.push(b' ');
    out.extend_from_slice(reason);
    out.extend_from_slice(b"\r\n");
}

/// Appends `name: value\r\n`.
#[inline]
pub fn write_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends the decimal digits of `n`.
pub fn push_u64(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(fmt_u64(n, &mut [0u8; 20]));
}

/// The decimal digits of `n`, written into `buf`.
pub fn fmt_u64(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

/// Appends a chunk-size line for `n` payload bytes.
pub fn push_chunk_size(out: &mut Vec<u8>, n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [0u8; 16];
    let mut i = buf.len();
    let mut n = n;
    loop {
        i -= 1;
        buf[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_give_framing_and_keep_alive() {
        let p = |s: &str, head| parse_response(s.as_bytes(), head).unwrap().unwrap();
        let r = p("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc", false);
        assert_eq!(
            (r.status, r.framing, r.keep_alive, r.len),
            (200, Framing::Length(3), true, 38)
        );
        let r = p(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        );
        assert_eq!(r.framing, Framing::Chunked);
        let r = p("HTTP/1.1 200 OK\r\n\r\n", false);
        assert_eq!((r.framing, r.keep_alive), (Framing::Close, false));
        let r = p(
            "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\n",
            false,
        );
        assert_eq!((r.framing, r.keep_alive), (Framing::Length(3), false));
        let r = p("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true);
        assert_eq!(r.framing, Framing::Empty);
        let r = p("HTTP/1.1 204 No Content\r\n\r\n", false);
        assert_eq!((r.framing, r.keep_alive), (Framing::Empty, true));
        let r = p("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false);
        assert!(!r.keep_alive);
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncont", false)
            .unwrap()
            .is_none());
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
                false
            )
            .unwrap_err(),
            ProtocolError::Framing
        );
        assert_eq!(
            parse_response(b"NOPE\r\n\r\n", false).unwrap_err(),
            ProtocolError::Head
        );
    }

    #[test]
    fn a_reason_phrase_that_is_not_utf8_is_dropped() {
        // Found by the h1_codec fuzz target.
        let h = parse_response(b"HTTP/1.0 160 l\x80>>\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!((h.status, h.reason.clone()), (160, 0..0));
        let h = parse_response(b"HTTP/1.1 200 Fine\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(&b"HTTP/1.1 200 Fine\r\n\r\n"[h.reason], b"Fine");
    }

    #[test]
    fn transfer_codings_other_than_chunked_are_refused() {
        for te in [
            "gzip, chunked",
            "gzip",
            "chunked\r\ntransfer-encoding: chunked",
        ] {
            let head = format!("HTTP/1.1 200 OK\r\ntransfer-encoding: {te}\r\n\r\n");
            assert_eq!(
                parse_response(head.as_bytes(), false).unwrap_err(),
                ProtocolError::Framing,
                "{te}"
            );
        }
    }

    #[test]
    fn hop_by_hop_and_tokens() {
        for n in [
            "Connection",
            "te",
            "Keep-Alive",
            "TRANSFER-ENCODING",
            "upgrade",
            "trailer",
            "proxy-connection",
            "Proxy-Authorization",
        ] {
            assert!(is_hop_by_hop(n.as_bytes()), "{n}");
        }
        for n in ["x-user-id", "content-length", "host", "tee"] {
            assert!(!is_hop_by_hop(n.as_bytes()), "{n}");
        }
        assert!(has_token(b"keep-alive, X-Custom", b"x-custom"));
        assert!(!has_token(b"keep-alive", b"close"));
        assert!(!names_headers(b"Keep-Alive, close"));
        assert!(names_headers(b"keep-alive, x-secret"));
        assert_eq!(parse_length(b" 42 "), Some(42));
        assert_eq!(parse_length(b"4 2"), None);
        assert_eq!(parse_length(b"99999999999999999999"), None);
        let mut v = Vec::new();
        push_chunk_size(&mut v, 255);
        push_u64(&mut v, 0);
        assert_eq!(v, b"ff\r\n0");
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn response_heads_with_random_headers_parse_back(
                status in 200u16..600,
                names in prop::collection::vec("[a-z][a-z0-9-]{0,15}", 0..12),
                len in 0u64..100_000,
            ) {
                let mut head = format!("HTTP/1.1 {status} Whatever\r\n");
                for (i, n) in names.iter().enumerate() {
                    if n == "content-length" || n == "transfer-encoding" || n == "connection" {
                        continue;
                    }
                    head.push_str(&format!("{n}: v{i}\r\n"));
                }
                head.push_str(&format!("content-length: {len}\r\n\r\n"));
                let h = parse_response(head.as_bytes(), false).unwrap().unwrap();
                prop_assert_eq!(h.status, status);
                prop_assert_eq!(h.len, head.len());
                let expect = if status == 204 || status == 304 || len == 0 {
                    Framing::Empty
                } else {
                    Framing::Length(len)
                };
                prop_assert_eq!(h.framing, expect);
                prop_assert!(h.keep_alive);
            }
        }
    }
}
