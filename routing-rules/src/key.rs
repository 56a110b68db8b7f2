//! Routing-key extraction from the parts of an HTTP request, without
//! depending on any HTTP library: the caller passes a header lookup, the
//! path and the query string.

use std::borrow::Cow;

use crate::model::KeySource;

/// Looks up a request header by lower-case name (first value).
pub trait HeaderLookup {
    /// Raw bytes of the first value of header `name` (lower-case).
    fn header(&self, name: &str) -> Option<&[u8]>;
}

impl<F> HeaderLookup for F
where
    F: Fn(&str) -> Option<&'static [u8]>,
{
    fn header(&self, name: &str) -> Option<&[u8]> {
        self(name)
    }
}

/// The parts of a request a key can come from.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a, H: ?Sized> {
    /// Header lookup.
    pub headers: &'a H,
    /// Path, without the query string (e.g. `/v1/accounts/42`).
    pub path: &'a str,
    /// Query string without `?`, if any.
    pub query: Option<&'a str>,
}

/// Extracts the routing key. `None` when the source holds no key; the
/// caller then applies the missing-key policy (and malformed keys are
/// caught by [`crate::hash::check_key`] when routing).
///
/// ```
/// use routing_rules::key::{extract_key, RequestParts};
/// use routing_rules::KeySource;
/// let headers = |n: &str| if n == "cookie" { Some(&b"a=1; uid=42"[..]) } else { None };
/// let parts = RequestParts { headers: &headers, path: "/v1/users/7", query: Some("u=%41b") };
/// let k = |s| extract_key(&s, &parts).map(|c| c.into_owned());
/// assert_eq!(k(KeySource::Cookie { name: "uid".into() }), Some(b"42".to_vec()));
/// assert_eq!(k(KeySource::Path { segment: 2 }), Some(b"7".to_vec()));
/// assert_eq!(k(KeySource::Query { name: "u".into() }), Some(b"Ab".to_vec()));
/// ```
pub fn extract_key<'a, H: HeaderLookup + ?Sized>(
    source: &KeySource,
    parts: &RequestParts<'a, H>,
) -> Option<Cow<'a, [u8]>> {
    match source {
        // Header values may carry optional whitespace around them.
        KeySource::Header { name } => parts.headers.header(name).map(|v| Cow::Borrowed(trim(v))),
        KeySource::Cookie { name } => {
            let raw = parts.headers.header("cookie")?;
            cookie_value(raw, name.as_bytes()).map(Cow::Borrowed)
        }
        KeySource::Query { name } => {
            let q = parts.query?;
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (percent_decode(k.as_bytes()).as_ref() == name.as_bytes())
                    .then(|| percent_decode(v.as_bytes()))
            })
        }
        KeySource::Path { segment } => {
            let seg = parts
                .path
                .strip_prefix('/')
                .unwrap_or(parts.path)
                .split('/')
                .nth(*segment)?;
            Some(percent_decode(seg.as_bytes()))
        }
    }
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// Value of cookie `name` in a `cookie` header (`a=1; b="2"`), unquoted.
pub fn cookie_value<'v>(header: &'v [u8], name: &[u8]) -> Option<&'v [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let pair = trim(pair);
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (k, v) = (trim(&pair[..eq]), trim(&pair[eq + 1..]));
        if k != name {
            return None;
        }
        Some(
            v.strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v),
        )
    })
}

/// Percent-decodes (and maps `+` to space, as forms do). Invalid escapes are
/// kept literally.
pub fn percent_decode(s: &[u8]) -> Cow<'_, [u8]> {
    if !s.iter().any(|&b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s);
    }
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'%' if i + 2 < s.len() => match (hex(s[i + 1]), hex(s[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies() {
        assert_eq!(
            cookie_value(b"a=1; uid=\"42\" ;b=2", b"uid"),
            Some(&b"42"[..])
        );
        assert_eq!(cookie_value(b"uidx=1", b"uid"), None);
        assert_eq!(cookie_value(b"uid", b"uid"), None);
        assert_eq!(cookie_value(b"", b"uid"), None);
    }

    #[test]
    fn percent() {
        assert_eq!(percent_decode(b"a%20b+c").as_ref(), b"a b c");
        assert_eq!(percent_decode(b"%zz%4").as_ref(), b"%zz%4");
        assert_eq!(percent_decode(b"%41").as_ref(), b"A");
        assert_eq!(percent_decode(b"%").as_ref(), b"%");
    }

    #[test]
    fn header_is_trimmed_and_path_segments_count_from_zero() {
        let h = |n: &str| (n == "x-user-id").then_some(&b"  42 "[..]);
        let p = RequestParts {
            headers: &h,
            path: "/a/b",
            query: None,
        };
        let src = KeySource::default();
        assert_eq!(extract_key(&src, &p).as_deref(), Some(&b"42"[..]));
        assert_eq!(
            extract_key(&KeySource::Path { segment: 1 }, &p).as_deref(),
            Some(&b"b"[..])
        );
        assert_eq!(extract_key(&KeySource::Path { segment: 2 }, &p), None);
    }
}
