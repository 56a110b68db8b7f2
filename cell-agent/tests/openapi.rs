//! docs/openapi.yaml and the server agree: every operation in the spec is a
//! route the server serves, and every route the server serves is in the spec.

use std::collections::BTreeSet;

use cell_agent::api::route_name;
use http::Method;

fn spec_operations() -> Vec<(Method, String)> {
    let text = std::fs::read_to_string(format!(
        "{}/../docs/openapi.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut ops = Vec::new();
    let mut in_paths = false;
    let mut path = String::new();
    for line in text.lines() {
        if line == "paths:" {
            in_paths = true;
            continue;
        }
        if in_paths && !line.starts_with(' ') && !line.is_empty() {
            break;
        }
        if let Some(p) = line.strip_prefix("  /") {
            path = format!("/{}", p.trim_end_matches(':'));
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if let Ok(method) = m.to_ascii_uppercase().parse::<Method>() {
                if ["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&method.as_str()) {
                    ops.push((method, path.clone()));
                }
            }
        }
    }
    ops
}

#[test]
fn every_spec_operation_is_served_and_every_route_is_specified() {
    let ops = spec_operations();
    assert!(ops.len() >= 12, "parsed {} operations", ops.len());
    let mut served = BTreeSet::new();
    for (method, path) in &ops {
        let concrete = path
            .replace("{user}", "alice")
            .replace("{id}", "o-cell-a-1")
            .replace("{action}", "pay");
        let segs: Vec<&str> = concrete.trim_matches('/').split('/').collect();
        let route = route_name(method, &segs);
        assert_ne!(
            route, "other",
            "{method} {path} is in the spec but not served"
        );
        served.insert(route);
    }
    for action in ["try", "confirm", "cancel", "pay"] {
        assert_eq!(
            route_name(&Method::POST, &["v1", "orders", "x", action]),
            "order_action"
        );
    }
    let all = [
        "deposit",
        "account",
        "ledger",
        "user_orders",
        "create_order",
        "order",
        "order_action",
        "transfer",
        "get_transfer",
        "healthz",
        "readyz",
        "metrics",
    ];
    // The cell-to-cell credit is not a route of the public listener.
    assert_eq!(
        route_name(&Method::POST, &["v1", "internal", "credits"]),
        "other"
    );
    for r in all {
        assert!(
            served.contains(r),
            "route {r} is served but missing from docs/openapi.yaml"
        );
    }
}
