//! Key extraction from arbitrary headers, paths and query strings never
//! panics, and whatever it extracts routes without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use routing_rules::key::{extract_key, HeaderLookup, RequestParts};
use routing_rules::{parse_rules, AllHealthy, KeySource, RouteAttrs, RoutingTable};

struct Headers<'a>(&'a [u8]);

impl HeaderLookup for Headers<'_> {
    fn header(&self, _name: &str) -> Option<&[u8]> {
        Some(self.0)
    }
}

fuzz_target!(|data: &[u8]| {
    // Split the input into header value, path and query.
    let mut parts = data.splitn(3, |&b| b == 0);
    let header = parts.next().unwrap_or_default();
    let path = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let query = parts.next().map(|q| String::from_utf8_lossy(q).into_owned());
    let headers = Headers(header);
    let req = RequestParts { headers: &headers, path: &path, query: query.as_deref() };
    let rules = parse_rules(
        "slots = 7\nhash = \"digits\"\ndigits = { count = 1 }\n[cells.a]\nblue = [\"h:1\"]\n[[ranges]]\nfrom = 0\nto = 6\ncell = \"a\"\n",
    )
    .expect("fixed rules");
    let table = RoutingTable::compile(rules, 1).expect("compile");
    for source in [
        KeySource::Header { name: "x-user-id".into() },
        KeySource::Cookie { name: "uid".into() },
        KeySource::Query { name: "u".into() },
        KeySource::Path { segment: 1 },
    ] {
        let key = extract_key(&source, &req);
        let _ = table.route(key.as_deref(), &RouteAttrs { tester_colour: Some(header) }, &AllHealthy);
    }
});
