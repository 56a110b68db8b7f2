//! The HTTP/1.1 pieces of the lean data path: message framing, an
//! incremental body decoder, hop-by-hop rules over raw header names, and
//! response-head parsing (httparse).
//!
//! The proxy speaks HTTP/1.1 to upstreams itself (and to plain HTTP/1.x
//! clients, see `fast.rs`) rather than through hyper's client and server
//! state machines: per request that saves the connection task's dispatch
//! channel, two header maps and most allocations (docs/benchmarks.md).

use std::ops::Range;

/// Most headers a message may carry on the lean path (more: hyper serves it).
pub const MAX_HEADERS: usize = 96;
/// Largest request or response head, bytes.
pub const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size line or trailer section, bytes.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

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

/// One step of [`BodyDecoder::feed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// Bytes of the input used (wire bytes, framing included).
    pub consumed: usize,
    /// Payload bytes within the input, if this step carried any.
    pub data: Option<Range<usize>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading the hex size; `digits` seen so far.
    Size { size: u64, digits: u8 },
    /// After the size: extensions up to the line feed.
    SizeLine { size: u64, len: usize },
    /// Payload left in this chunk.
    Data(u64),
    /// The CRLF after a chunk's payload; `cr` when the CR was seen.
    DataEnd { cr: bool },
    /// At the start of a trailer line (an empty one ends the body).
    TrailerStart { total: usize },
    /// Inside a trailer line.
    Trailer { total: usize },
    /// Saw CR on an empty trailer line.
    LastCr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Chunked(Chunk),
    Close,
    Done,
}

/// Incremental body decoder: tells where a body's payload is and where it
/// ends, so a connection can be reused exactly after it.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    state: State,
}

impl BodyDecoder {
    /// A decoder for `framing`.
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Chunked(Chunk::Size { size: 0, digits: 0 }),
            Framing::Close => State::Close,
        };
        BodyDecoder { state }
    }

    /// Whether the whole body has been seen.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Payload bytes still to come, when known (`Some(0)` once done).
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            State::Chunked(_) | State::Close => None,
        }
    }

    /// Whether the body ends only when the connection closes.
    pub fn until_close(&self) -> bool {
        self.state == State::Close
    }

    /// Consumes the next piece of `input`. Call again with the rest until
    /// `consumed` is 0 (needs more input) or the body is done.
    pub fn feed(&mut self, input: &[u8]) -> Result<Step, ProtocolError> {
        match &mut self.state {
            State::Done => Ok(Step {
                consumed: 0,
                data: None,
            }),
            State::Close => Ok(Step {
                consumed: input.len(),
                data: (!input.is_empty()).then_some(0..input.len()),
            }),
            State::Length(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    self.state = State::Done;
                }
                Ok(Step {
                    consumed: n,
                    data: (n > 0).then_some(0..n),
                })
            }
            State::Chunked(c) => {
                let (consumed, data, done) = feed_chunked(c, input)?;
                if done {
                    self.state = State::Done;
                }
                Ok(Step { consumed, data })
            }
        }
    }
}

/// Returns (consumed, payload range, body done).
fn feed_chunked(
    c: &mut Chunk,
    input: &[u8],
) -> Result<(usize, Option<Range<usize>>, bool), ProtocolError> {
    let mut i = 0;
    while i < input.len() {
        let b = input[i];
        match *c {
            Chunk::Size { size, digits } => {
                let v = match b {
                    b'0'..=b'9' => Some(b - b'0'),
                    b'a'..=b'f' => Some(b - b'a' + 10),
                    b'A'..=b'F' => Some(b - b'A' + 10),
                    _ => None,
                };
                match v {
                    Some(v) if digits < 15 => {
                        *c = Chunk::Size {
                            size: size << 4 | v as u64,
                            digits: digits + 1,
                        }
                    }
                    Some(_) => return Err(ProtocolError::Chunk),
                    None if digits == 0 => return Err(ProtocolError::Chunk),
                    None if b == b'\n' => {
                        *c = after_size_line(size);
                    }
                    None if matches!(b, b';' | b'\r' | b' ' | b'\t') => {
                        *c = Chunk::SizeLine { size, len: 0 }
                    }
                    None => return Err(ProtocolError::Chunk),
                }
                i += 1;
            }
            Chunk::SizeLine { size, len } => {
                if b == b'\n' {
                    *c = after_size_line(size);
                } else if len >= MAX_CHUNK_LINE {
                    return Err(ProtocolError::Chunk);
                } else {
                    *c = Chunk::SizeLine { size, len: len + 1 };
                }
                i += 1;
            }
            Chunk::Data(left) => {
                if i > 0 {
                    // Hand back the framing consumed so far; the payload
                    // comes on the next call, as its own range.
                    return Ok((i, None, false));
                }
                let n = left.min(input.len() as u64) as usize;
                *c = if left == n as u64 {
                    Chunk::DataEnd { cr: false }
                } else {
                    Chunk::Data(left - n as u64)
                };
                return Ok((n, Some(0..n), false));
            }
            Chunk::DataEnd { cr } => {
                match (cr, b) {
                    (false, b'\r') => *c = Chunk::DataEnd { cr: true },
                    (_, b'\n') => *c = Chunk::Size { size: 0, digits: 0 },
                    _ => return Err(ProtocolError::Chunk),
                }
                i += 1;
            }
            Chunk::TrailerStart { total } => {
                match b {
                    b'\r' => *c = Chunk::LastCr,
                    b'\n' => return Ok((i + 1, None, true)),
                    _ => *c = Chunk::Trailer { total: total + 1 },
                }
                i += 1;
            }
            Chunk::Trailer { total } => {
                if total >= MAX_TRAILERS {
                    return Err(ProtocolError::Chunk);
                }
                *c = if b == b'\n' {
                    Chunk::TrailerStart { total: total + 1 }
                } else {
                    Chunk::Trailer { total: total + 1 }
                };
                i += 1;
            }
            Chunk::LastCr => {
                if b == b'\n' {
                    return Ok((i + 1, None, true));
                }
                return Err(ProtocolError::Chunk);
            }
        }
    }
    Ok((i, None, false))
}

fn after_size_line(size: u64) -> Chunk {
    if size == 0 {
        Chunk::TrailerStart { total: 0 }
    } else {
        Chunk::Data(size)
    }
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

    fn decode_all(
        framing: Framing,
        wire: &[u8],
        piece: usize,
    ) -> Result<(Vec<u8>, usize), ProtocolError> {
        let mut d = BodyDecoder::new(framing);
        let mut out = Vec::new();
        let (mut pos, mut avail) = (0, 0);
        while !d.is_done() {
            let s = d.feed(&wire[pos..avail])?;
            if let Some(r) = s.data {
                out.extend_from_slice(&wire[pos + r.start..pos + r.end]);
            }
            pos += s.consumed;
            if s.consumed == 0 {
                if avail == wire.len() {
                    break;
                }
                avail = (avail + piece).min(wire.len());
            }
        }
        Ok((out, pos))
    }

    #[test]
    fn chunked_bodies_decode_in_any_split() {
        let wire = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for piece in 1..wire.len() {
            let (data, used) = decode_all(Framing::Chunked, wire, piece).unwrap();
            assert_eq!(data, b"hello, world", "piece {piece}");
            assert_eq!(&wire[used..], b"NEXT", "piece {piece}");
        }
        let (data, used) = decode_all(Framing::Chunked, b"A\nabcdefghij\n0\n\n", 3).unwrap();
        assert_eq!(data, b"abcdefghij");
        assert_eq!(used, 16);
    }

    #[test]
    fn bad_chunks_are_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"ffffffffffffffffff\r\n",
            b"\r\n",
        ] {
            assert_eq!(
                decode_all(Framing::Chunked, wire, 4).unwrap_err(),
                ProtocolError::Chunk,
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let (data, used) = decode_all(Framing::Length(3), b"abcdef", 2).unwrap();
        assert_eq!((data.as_slice(), used), (&b"abc"[..], 3));
        let mut d = BodyDecoder::new(Framing::Length(5));
        assert_eq!(d.remaining(), Some(5));
        d.feed(b"ab").unwrap();
        assert_eq!(d.remaining(), Some(3));
        assert_eq!(BodyDecoder::new(Framing::Chunked).remaining(), None);
        assert!(BodyDecoder::new(Framing::Empty).is_done());
    }

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
        use super::decode_all;
        use proptest::prelude::*;

        /// Chunked wire form of `chunks`, with optional extensions and trailers.
        fn encode(chunks: &[Vec<u8>], ext: bool, trailers: bool) -> Vec<u8> {
            let mut w = Vec::new();
            for c in chunks.iter().filter(|c| !c.is_empty()) {
                push_chunk_size(&mut w, c.len());
                if ext {
                    w.truncate(w.len() - 2);
                    w.extend_from_slice(b";name=value\r\n");
                }
                w.extend_from_slice(c);
                w.extend_from_slice(b"\r\n");
            }
            w.extend_from_slice(b"0\r\n");
            if trailers {
                w.extend_from_slice(b"x-sum: 1\r\nx-other: 2\r\n");
            }
            w.extend_from_slice(b"\r\n");
            w
        }

        proptest! {
            #[test]
            fn chunked_round_trips_in_any_split(
                chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
                ext in any::<bool>(),
                trailers in any::<bool>(),
                piece in 1usize..64,
                tail in prop::collection::vec(any::<u8>(), 0..16),
            ) {
                let mut wire = encode(&chunks, ext, trailers);
                let body_end = wire.len();
                wire.extend_from_slice(&tail);
                let (data, used) = decode_all(Framing::Chunked, &wire, piece).unwrap();
                prop_assert_eq!(data, chunks.concat());
                prop_assert_eq!(used, body_end, "stopped exactly at the end of the body");
            }

            #[test]
            fn arbitrary_bytes_never_panic(
                wire in prop::collection::vec(any::<u8>(), 0..512),
                piece in 1usize..32,
                len in 0u64..600,
            ) {
                for framing in [Framing::Chunked, Framing::Length(len), Framing::Close, Framing::Empty] {
                    if let Ok((data, used)) = decode_all(framing, &wire, piece) {
                        prop_assert!(used <= wire.len());
                        prop_assert!(data.len() <= used);
                    }
                }
                let _ = parse_response(&wire, false);
                let _ = parse_response(&wire, true);
            }

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
