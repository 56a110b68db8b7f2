//! Upstream bytes into the gateway's HTTP/1.1 codec: response heads and
//! bodies in every framing, fed in arbitrary pieces. Nothing may panic or
//! loop; payload ranges stay inside what was consumed; a chunked body that
//! decodes re-encodes to the same payload.
#![no_main]

use gateway::h1::{parse_response, push_chunk_size, BodyDecoder, Framing};
use libfuzzer_sys::fuzz_target;

/// Decodes `wire` fed `piece` bytes at a time: (payload, bytes used, done).
fn decode(framing: Framing, wire: &[u8], piece: usize) -> Option<(Vec<u8>, usize, bool)> {
    let mut d = BodyDecoder::new(framing);
    let (mut pos, mut avail, mut out) = (0usize, 0usize, Vec::new());
    // Each call consumes something, or asks for more input: bounded.
    for _ in 0..=2 * wire.len() + 2 {
        if d.is_done() {
            break;
        }
        let step = d.feed(&wire[pos..avail]).ok()?;
        assert!(step.consumed <= avail - pos);
        if let Some(r) = step.data {
            assert!(r.end <= step.consumed, "payload outside what was consumed");
            out.extend_from_slice(&wire[pos + r.start..pos + r.end]);
        }
        pos += step.consumed;
        if step.consumed == 0 {
            if avail == wire.len() {
                break;
            }
            avail = (avail + piece).min(wire.len());
        }
    }
    Some((out, pos, d.is_done()))
}

fuzz_target!(|input: &[u8]| {
    let Some((&sel, wire)) = input.split_first() else {
        return;
    };
    let piece = (sel as usize % 31) + 1;
    let _ = parse_response(wire, sel & 0x80 != 0);
    if let Ok(Some(head)) = parse_response(wire, false) {
        assert!(head.len <= wire.len());
        for (n, v) in &head.headers {
            assert!(n.end <= head.len && v.end <= head.len);
        }
        let _ = decode(head.framing, &wire[head.len..], piece);
    }
    let len = u64::from(sel) * 7;
    for framing in [Framing::Length(len), Framing::Close, Framing::Empty] {
        let (data, used, _) = decode(framing, wire, piece).expect("never an error");
        assert_eq!(data.len(), used);
    }
    if let Some((data, _, true)) = decode(Framing::Chunked, wire, piece) {
        let mut again = Vec::new();
        for c in data.chunks(100) {
            push_chunk_size(&mut again, c.len());
            again.extend_from_slice(c);
            again.extend_from_slice(b"\r\n");
        }
        again.extend_from_slice(b"0\r\n\r\n");
        let (round, used, done) = decode(Framing::Chunked, &again, piece).expect("re-encoded");
        assert!(done && used == again.len());
        assert_eq!(round, data);
    }
});
