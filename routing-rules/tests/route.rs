//! Routing decisions: overrides, failover, colour fallback, tester header,
//! missing keys, and the sticky split's share.

use routing_rules::*;

const DOC: &str = r#"
slots = 100
[tester]
enabled = true
[cells.a]
failover = ["b", "c"]
blue = ["h:1"]
green = ["h:2"]
split = { green = 2500, seed = 7 }
[cells.b]
failover = ["c"]
failover_policy = "manual"
blue = ["h:3"]
green = ["h:4"]
[cells.c]
state = "draining"
failover = ["a"]
blue = ["h:5"]
[[ranges]]
from = 0
to = 49
cell = "a"
[[ranges]]
from = 50
to = 79
cell = "b"
[[ranges]]
from = 80
to = 99
cell = "c"
[overrides]
"pin-b" = { cell = "b" }
"pin-green" = { colour = "green" }
"pin-both" = { cell = "a", colour = "green" }
"#;

fn table(doc: &str) -> RoutingTable {
    RoutingTable::compile(parse_rules(doc).unwrap(), 9).unwrap()
}

/// A key whose home is `cell` (searching user-0, user-1, ...).
fn key_in(t: &RoutingTable, cell: &str) -> String {
    let owners = t.rules().slot_owners();
    (0..)
        .map(|i| format!("user-{i}"))
        .find(|k| owners[hash::xxh64_slot(k.as_bytes(), t.slots()) as usize] == cell)
        .unwrap()
}

fn route(
    t: &RoutingTable,
    key: &str,
    h: &impl HealthView,
) -> (String, String, Colour, CellReason, ColourReason) {
    let d = t
        .route(Some(key.as_bytes()), &RouteAttrs::default(), h)
        .unwrap();
    (
        t.cell_name(d.home_cell).into(),
        t.cell_name(d.serving_cell).into(),
        d.colour,
        d.reason,
        d.colour_reason,
    )
}

#[test]
fn home_override_and_draining() {
    let t = table(DOC);
    let h = StaticHealth::from_table(&t);
    let ka = key_in(&t, "a");
    assert_eq!(route(&t, &ka, &h).1, "a");
    assert_eq!(route(&t, &ka, &h).3, CellReason::Home);
    let r = route(&t, "pin-b", &h);
    assert_eq!(
        (r.0.as_str(), r.1.as_str(), r.3),
        ("b", "b", CellReason::Override)
    );
    let r = route(&t, "pin-both", &h);
    assert_eq!(
        (r.1.as_str(), r.2, r.4),
        ("a", Colour::Green, ColourReason::Override)
    );
    // c is draining: its users are served by a.
    let kc = key_in(&t, "c");
    let r = route(&t, &kc, &h);
    assert_eq!(
        (r.0.as_str(), r.1.as_str(), r.3),
        ("c", "a", CellReason::Failover)
    );
}

#[test]
fn auto_failover_goes_to_first_healthy_active_backup() {
    let t = table(DOC);
    let mut h = StaticHealth::from_table(&t);
    let ka = key_in(&t, "a");
    h.set(t.cell_index("a").unwrap(), None, false);
    let r = route(&t, &ka, &h);
    assert_eq!((r.1.as_str(), r.3), ("b", CellReason::Failover));
    // b down too: c is next but draining, so nobody can take a's users.
    h.set(t.cell_index("b").unwrap(), None, false);
    assert_eq!(route(&t, &ka, &h).1, "a");
    // the override pinned to b follows b's own (manual) policy: it stays.
    assert_eq!(route(&t, "pin-b", &h).1, "b");
}

#[test]
fn manual_policy_does_not_fail_over_on_health() {
    let t = table(DOC);
    let mut h = StaticHealth::from_table(&t);
    h.set(t.cell_index("b").unwrap(), None, false);
    let kb = key_in(&t, "b");
    let r = route(&t, &kb, &h);
    assert_eq!((r.1.as_str(), r.3), ("b", CellReason::Home));
    // ... but an operator's failed-over state does (c is draining, so a).
    let t2 = table(&DOC.replace(
        "failover = [\"c\"]\nfailover_policy = \"manual\"",
        "failover = [\"c\", \"a\"]\nfailover_policy = \"manual\"\nstate = \"failed-over\"",
    ));
    let h2 = StaticHealth::from_table(&t2);
    let r = route(&t2, &kb, &h2);
    assert_eq!((r.1.as_str(), r.3), ("a", CellReason::Failover));
}

#[test]
fn a_shard_moved_with_its_data_is_served_by_its_host_as_hosted_not_failover() {
    let t = table(&DOC.replace(
        "[cells.b]\nfailover = [\"c\"]",
        "[cells.b]\nhosted_by = \"a\"\nfailover = [\"c\"]",
    ));
    let h = StaticHealth::from_table(&t);
    let kb = key_in(&t, "b");
    let r = route(&t, &kb, &h);
    assert_eq!(
        (r.0.as_str(), r.1.as_str(), r.3),
        ("b", "a", CellReason::Hosted)
    );
    assert_eq!(r.3.as_str(), "hosted");
}

#[test]
fn colour_with_no_healthy_instance_gives_users_to_the_other() {
    let t = table(DOC);
    let mut h = StaticHealth::from_table(&t);
    let a = t.cell_index("a").unwrap();
    h.set(a, Some(Colour::Green), false);
    let greens: Vec<String> = (0..2000)
        .map(|i| format!("g{i}"))
        .filter(|k| {
            let d = t
                .route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy)
                .unwrap();
            t.cell_name(d.serving_cell) == "a" && d.colour == Colour::Green
        })
        .collect();
    assert!(!greens.is_empty());
    for k in &greens {
        let r = route(&t, k, &h);
        assert_eq!((r.2, r.4), (Colour::Blue, ColourReason::ColourFallback));
    }
}

#[test]
fn tester_header_picks_colour_only_when_enabled() {
    let t = table(DOC);
    let h = StaticHealth::from_table(&t);
    let ka = key_in(&t, "a");
    for want in [Colour::Blue, Colour::Green] {
        let attrs = RouteAttrs {
            tester_colour: Some(want.as_str().as_bytes()),
        };
        let d = t.route(Some(ka.as_bytes()), &attrs, &h).unwrap();
        assert_eq!(
            (d.colour, d.colour_reason),
            (want, ColourReason::TesterHeader)
        );
    }
    let off = table(&DOC.replace("enabled = true", "enabled = false"));
    let attrs = RouteAttrs {
        tester_colour: Some(b"green"),
    };
    let d = off.route(Some(ka.as_bytes()), &attrs, &h).unwrap();
    assert_eq!(d.colour_reason, ColourReason::Split);
    // c has no green instances: a tester asking for green there falls back.
    let t3 = table(&DOC.replace("state = \"draining\"", "state = \"active\""));
    let kc = key_in(&t3, "c");
    let d = t3
        .route(Some(kc.as_bytes()), &attrs, &StaticHealth::from_table(&t3))
        .unwrap();
    assert_eq!(
        (d.colour, d.colour_reason),
        (Colour::Blue, ColourReason::ColourFallback)
    );
}

#[test]
fn missing_and_malformed_keys_follow_the_policy() {
    let t = table(DOC);
    assert_eq!(
        t.route(None, &RouteAttrs::default(), &AllHealthy),
        Err(KeyProblem::Missing)
    );
    assert_eq!(
        t.route(Some(b""), &RouteAttrs::default(), &AllHealthy),
        Err(KeyProblem::Malformed)
    );
    let t2 = table(&DOC.replace(
        "slots = 100",
        "slots = 100\n[key]\non_missing = \"default-cell\"\ndefault_cell = \"b\"",
    ));
    let d = t2.route(None, &RouteAttrs::default(), &AllHealthy).unwrap();
    assert_eq!(
        (t2.cell_name(d.serving_cell), d.reason, d.slot),
        ("b", CellReason::DefaultCell, None)
    );
}

#[test]
fn sticky_split_holds_its_share_and_never_moves_users() {
    let t = table(DOC);
    let n = 100_000;
    let mut green = 0;
    let mut in_a = 0;
    for i in 0..n {
        let k = format!("u{i}");
        let d = t
            .route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy)
            .unwrap();
        if t.cell_name(d.serving_cell) == "a" && d.colour_reason == ColourReason::Split {
            in_a += 1;
            if d.colour == Colour::Green {
                green += 1;
            }
        }
    }
    let share = green as f64 / in_a as f64;
    assert!(
        (share - 0.25).abs() < 0.01,
        "green share {share} over {in_a} users"
    );

    // Raising a's green share to 40%: nobody green goes blue.
    let t2 = table(&DOC.replace("green = 2500", "green = 4000"));
    for i in 0..20_000 {
        let k = format!("u{i}");
        let d1 = t
            .route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy)
            .unwrap();
        let d2 = t2
            .route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy)
            .unwrap();
        if d1.colour == Colour::Green {
            assert_eq!(d2.colour, Colour::Green, "{k} moved green → blue");
        }
    }
}
