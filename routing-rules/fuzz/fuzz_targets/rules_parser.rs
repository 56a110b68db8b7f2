//! Any text given to the rules parser yields a document or an error, never a
//! panic; an accepted document compiles and routes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use routing_rules::{parse_rules, AllHealthy, RouteAttrs, RoutingTable};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(rules) = parse_rules(text) {
        let table = RoutingTable::compile(rules, 1).expect("valid rules compile");
        for key in [&b"alice"[..], b"2088000012345678", b"", data] {
            let _ = table.route(Some(key), &RouteAttrs::default(), &AllHealthy);
        }
    }
});
