//! Phases 2 and 4: extract the key, route, and write the upstream head
//! once (stamps appended per attempt).

use std::sync::Arc;
use std::time::Instant;

use http::StatusCode;
use routing_rules::key::{extract_key, HeaderLookup, RequestParts};
use routing_rules::{RouteAttrs, RouteDecision, STAMP_HEADERS};

use super::{Refusal, Shared};
use crate::control::Generation;
use crate::h1;
use crate::upstream::{now_ms, Instance};

/// Header lookup over raw (name, value) pairs.
struct RawHeaders<'a, I>(&'a I);

impl<'a, 'h: 'a, I> HeaderLookup for RawHeaders<'a, I>
where
    I: Iterator<Item = (&'h [u8], &'h [u8])> + Clone,
{
    #[inline]
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.0
            .clone()
            .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v)
    }
}

#[inline]
fn is_stamp(name: &[u8]) -> bool {
    name.len() > 11
        && name[..11].eq_ignore_ascii_case(b"x-cellgate-")
        && STAMP_HEADERS
            .iter()
            .any(|s| s.as_bytes().eq_ignore_ascii_case(name))
}

fn is_idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE"
    )
}

/// Whether `name` (lower-case, `-` separated) is a header the gateway or
/// the cell reads: framing, routing, stamps, forwarding.
fn is_protected(name: &[u8], rules: &routing_rules::Rules) -> bool {
    const FIXED: [&[u8]; 6] = [
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"x-forwarded-for",
        b"x-request-id",
    ];
    FIXED.iter().any(|f| name.eq_ignore_ascii_case(f))
        || (name.len() > 11 && name[..11].eq_ignore_ascii_case(b"x-cellgate-"))
        || matches!(&rules.key, routing_rules::KeySource::Header { name: k } if name.eq_ignore_ascii_case(k.as_bytes()))
        || (rules.tester.enabled && name.eq_ignore_ascii_case(rules.tester.header.as_bytes()))
}

/// Refuses (400, like nginx) request heads a proxy must not pass on: a
/// header name with `_` that would read as one of the protected headers
/// once a server maps `_` to `-` (`x_cellgate_cell`, `Content_Length`); a
/// `connection` header naming a protected header (the routing key would be
/// stripped after routing); a missing or repeated `host` on HTTP/1.1, or a
/// repeated one on any version.
fn check_head<'h, I>(
    shared: &Shared,
    rules: &routing_rules::Rules,
    headers: I,
    http11: bool,
) -> Result<(), Refusal>
where
    I: Iterator<Item = (&'h [u8], &'h [u8])>,
{
    let mut hosts = 0;
    let mut bad = None;
    for (n, v) in headers {
        if n.len() == 4 && n.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        } else if n.contains(&b'_') {
            let dashed: Vec<u8> = n
                .iter()
                .map(|b| if *b == b'_' { b'-' } else { *b })
                .collect();
            if is_protected(&dashed, rules) {
                bad = Some((
                    "bad_header_name",
                    "a header name with '_' stands for a header the gateway sets or reads",
                ));
            }
        } else if n.len() == 10
            && n.eq_ignore_ascii_case(b"connection")
            && v.split(|b| *b == b',').any(|t| {
                let t = t.trim_ascii();
                !t.eq_ignore_ascii_case(b"connection") && is_protected(t, rules)
            })
        {
            bad = Some((
                "bad_connection_header",
                "the connection header names a header the gateway routes or frames by",
            ));
        }
    }
    if bad.is_none() && (hosts > 1 || (http11 && hosts == 0)) {
        bad = Some((
            "bad_host",
            "an HTTP/1.1 request needs exactly one host header",
        ));
    }
    match bad {
        None => Ok(()),
        Some((error, message)) => {
            shared.control.metrics().client_error("bad_request");
            Err(Refusal::new(StatusCode::BAD_REQUEST, error, message))
        }
    }
}

/// A request in wire form, ready to be sent (and re-sent) upstream.
pub struct Outgoing {
    /// Request line and forwarded headers; the stamps and the final CRLF
    /// are appended per attempt after `base_len`.
    pub(super) wire: Vec<u8>,
    pub(super) base_len: usize,
    pub(super) key: Option<Vec<u8>>,
    pub(super) tester: Option<Vec<u8>>,
    /// Where the request id (the client's, or generated) is in `wire`.
    pub(super) request_id: std::ops::Range<usize>,
    pub(super) head_request: bool,
    pub(super) idempotent: bool,
    /// First routing decision.
    pub decision: RouteDecision,
    /// When the request arrived.
    pub start: Instant,
    /// Upstream attempts made (by [`Shared::forward`]).
    pub(super) attempts: u32,
    /// The instance of the last attempt.
    pub(super) upstream: Option<Arc<str>>,
}

/// How a request body is framed on the way upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyHead {
    /// No body and no `content-length`.
    None,
    /// `content-length: n`.
    Length(u64),
    /// `transfer-encoding: chunked` (length unknown).
    Chunked,
}

/// The parts of a request head that [`Outgoing::build`] needs.
pub struct HeadParts<'a, I> {
    /// Method.
    pub method: &'a [u8],
    /// Origin-form target (path and query).
    pub target: &'a str,
    /// Headers as (name, value).
    pub headers: I,
    /// A buffer to write the upstream head into (reused across requests).
    pub wire: Vec<u8>,
    /// `host` to add when the request has none (HTTP/2 authority).
    pub host: Option<&'a [u8]>,
    /// How the body is framed upstream (the client's own `content-length`
    /// and `transfer-encoding` headers are never copied).
    pub body: BodyHead,
    /// An HTTP/1.1 request (needs exactly one `host`).
    pub http11: bool,
}

impl Outgoing {
    /// Routes a request head and writes its upstream form. `Err`: the
    /// key is missing or malformed (400, or the default cell by policy).
    pub fn build<'h, I>(
        shared: &Shared,
        gen: &Generation,
        parts: HeadParts<'_, I>,
        peer_ip: &[u8],
        start: Instant,
    ) -> Result<Outgoing, Refusal>
    where
        I: Iterator<Item = (&'h [u8], &'h [u8])> + Clone,
    {
        let table = &gen.table;
        check_head(shared, table.rules(), parts.headers.clone(), parts.http11)?;
        let lookup = RawHeaders(&parts.headers);
        let (path, query) = match parts.target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (parts.target, None),
        };
        let rp = RequestParts {
            headers: &lookup,
            path,
            query,
        };
        if crate::internal_path::is_internal_path(path) {
            let r = Refusal::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "the cells' internal API is not served through the gateway",
            );
            shared
                .control
                .metrics()
                .rejected
                .with_label_values(&["internal_path"])
                .inc();
            return Err(r);
        }
        let key = extract_key(&table.rules().key, &rp);
        let tester = &table.rules().tester;
        let tester = if tester.enabled {
            lookup.header(tester.header.as_str())
        } else {
            None
        };
        let decision = table
            .route(
                key.as_deref(),
                &RouteAttrs {
                    tester_colour: tester,
                },
                &gen.health(),
            )
            .map_err(|p| {
                let r = Refusal::for_key(p);
                shared
                    .control
                    .metrics()
                    .rejected
                    .with_label_values(&[r.error])
                    .inc();
                r
            })?;

        let mut wire = parts.wire;
        wire.clear();
        wire.extend_from_slice(parts.method);
        wire.push(b' ');
        wire.extend_from_slice(parts.target.as_bytes());
        wire.extend_from_slice(b" HTTP/1.1\r\n");
        // Headers the client marked hop-by-hop in `connection`.
        let connection: Vec<&[u8]> = parts
            .headers
            .clone()
            .filter(|(n, v)| n.eq_ignore_ascii_case(b"connection") && h1::names_headers(v))
            .map(|(_, v)| v)
            .collect();
        let mut has_host = false;
        let mut has_xff = false;
        let mut request_id: Option<&[u8]> = None;
        for (n, v) in parts.headers.clone() {
            if h1::is_hop_by_hop(n)
                || (!connection.is_empty() && h1::named_by_connection(&connection, n))
                || is_stamp(n)
            {
                continue;
            }
            if n.eq_ignore_ascii_case(b"x-forwarded-for") {
                has_xff = true;
                continue;
            }
            if n.eq_ignore_ascii_case(b"content-length") {
                continue;
            }
            if n.eq_ignore_ascii_case(b"x-request-id") {
                if request_id.is_none() && !v.is_empty() && v.len() <= 128 {
                    request_id = Some(v);
                }
                continue;
            }
            has_host |= n.eq_ignore_ascii_case(b"host");
            h1::write_header(&mut wire, n, v);
        }
        if !has_host {
            if let Some(h) = parts.host {
                h1::write_header(&mut wire, b"host", h);
            }
        }
        match parts.body {
            BodyHead::None => {}
            BodyHead::Length(n) => {
                h1::write_header(&mut wire, b"content-length", h1::fmt_u64(n, &mut [0u8; 20]))
            }
            BodyHead::Chunked => h1::write_header(&mut wire, b"transfer-encoding", b"chunked"),
        }
        // Every x-forwarded-for value the client sent, then the client.
        wire.extend_from_slice(b"x-forwarded-for: ");
        if has_xff {
            for (n, v) in parts.headers.clone() {
                if n.eq_ignore_ascii_case(b"x-forwarded-for") {
                    wire.extend_from_slice(v);
                    wire.extend_from_slice(b", ");
                }
            }
        }
        wire.extend_from_slice(peer_ip);
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(b"x-request-id: ");
        let id_start = wire.len();
        match request_id {
            Some(v) => wire.extend_from_slice(v),
            None => wire.extend_from_slice(&shared.ids.next()),
        }
        let request_id = id_start..wire.len();
        wire.extend_from_slice(b"\r\n");
        let base_len = wire.len();
        Ok(Outgoing {
            wire,
            base_len,
            key: key.map(|k| k.into_owned()),
            tester: tester.map(<[u8]>::to_vec),
            request_id,
            head_request: parts.method == b"HEAD",
            idempotent: is_idempotent(parts.method),
            decision,
            start,
            attempts: 0,
            upstream: None,
        })
    }

    /// Upstream attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The instance (`host:port`) of the last attempt.
    pub fn upstream(&self) -> Option<&str> {
        self.upstream.as_deref()
    }

    /// The routing key (the user id), when the request had one.
    pub fn key(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The request id (the client's, or generated).
    pub fn request_id(&self) -> &[u8] {
        &self.wire[self.request_id.clone()]
    }

    /// Gives back the head buffer for the next request.
    pub fn into_wire(self) -> Vec<u8> {
        self.wire
    }

    /// Routes again after an attempt failed, with every instance already
    /// tried counted as down: the decision may fall back to the other
    /// colour of the same cell. `None` when it would leave the serving cell
    /// — a request never changes cell because of its own failures.
    pub(super) fn reroute(
        &self,
        gen: &Generation,
        previous: &RouteDecision,
        tried: &[Arc<Instance>],
    ) -> Option<RouteDecision> {
        let d = gen
            .table
            .route(
                self.key.as_deref(),
                &RouteAttrs {
                    tester_colour: self.tester.as_deref(),
                },
                &gen.health_excluding(now_ms(), tried),
            )
            .ok()?;
        (d.serving_cell == previous.serving_cell).then_some(d)
    }
}

/// Calls `f(name, value)` for each stamp header of a decision.
pub fn stamps(gen: &Generation, d: &RouteDecision, mut f: impl FnMut(&'static [u8], &[u8])) {
    if let Some(slot) = d.slot {
        f(b"x-cellgate-slot", h1::fmt_u64(slot as u64, &mut [0u8; 20]));
        let epoch = gen.table.slot_epoch(slot);
        f(b"x-cellgate-epoch", h1::fmt_u64(epoch, &mut [0u8; 20]));
    }
    f(
        b"x-cellgate-cell",
        gen.cells[d.serving_cell as usize].name_header.as_bytes(),
    );
    f(
        b"x-cellgate-home",
        gen.cells[d.home_cell as usize].name_header.as_bytes(),
    );
    f(b"x-cellgate-colour", d.colour.as_str().as_bytes());
    f(b"x-cellgate-rev", gen.rev_header.as_bytes());
}
