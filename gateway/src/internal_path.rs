//! The cells' internal (cell-to-cell) API is never reachable through the
//! gateway: a request whose path, once percent-decoded and with dot
//! segments resolved, lies under `/v1/internal` is answered 404 by the
//! gateway itself (`cellgate_rejected_total{reason="internal_path"}`),
//! however it is spelled (`/v1//internal`, `/v1/%69nternal`,
//! `/x/../v1/INTERNAL`).

use routing_rules::key::percent_decode;

/// Whether `path` (the request target without its query) names the cells'
/// internal API.
pub fn is_internal_path(path: &str) -> bool {
    let mut segs: Vec<std::borrow::Cow<'_, [u8]>> = Vec::with_capacity(4);
    for raw in path.split('/') {
        let seg = percent_decode(raw.as_bytes());
        match &*seg {
            b"" | b"." => {}
            b".." => {
                segs.pop();
            }
            _ => segs.push(seg),
        }
    }
    segs.len() >= 2
        && segs[0].eq_ignore_ascii_case(b"v1")
        && segs[1].eq_ignore_ascii_case(b"internal")
}

#[cfg(test)]
mod tests {
    use super::is_internal_path;

    #[test]
    fn every_spelling_of_the_internal_prefix_is_caught() {
        for p in [
            "/v1/internal/credits",
            "/v1/internal",
            "/v1//internal/credits",
            "//v1/internal/x",
            "/v1/%69nternal/credits",
            "/%76%31/internal",
            "/V1/INTERNAL/credits",
            "/x/../v1/internal/credits",
            "/./v1/./internal/credits",
            "/a/b/../../v1/internal/credits",
        ] {
            assert!(is_internal_path(p), "{p}");
        }
        for p in [
            "/v1/accounts/internal",
            "/v1/internals",
            "/internal/v1",
            "/v1/transfers",
            "/v1/internal/../accounts/alice",
            "/",
            "",
        ] {
            assert!(!is_internal_path(p), "{p}");
        }
    }
}
