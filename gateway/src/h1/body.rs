//! The incremental body decoder: where a message body's payload is and
//! exactly where it ends (a length, chunked with extensions and trailers,
//! or until the connection closes), so a connection can be reused right
//! after it.

use std::ops::Range;

use super::{Framing, ProtocolError};

/// Largest chunk-size line or trailer section, bytes.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 16 * 1024;

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

    mod props {
        use super::super::*;
        use super::decode_all;
        use crate::h1::{parse_response, push_chunk_size};
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
        }
    }
}
