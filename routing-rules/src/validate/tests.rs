//! Unit tests of parsing and validation.

use super::*;

const MIN: &str =
    "slots = 4\n[cells.a]\nblue = [\"127.0.0.1:1\"]\n[[ranges]]\nfrom = 0\nto = 3\ncell = \"a\"\n";

fn problems(text: &str) -> Vec<String> {
    match parse_rules(text) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.problems(),
    }
}

#[test]
fn minimal_document_is_accepted() {
    let r = parse_rules(MIN).unwrap();
    assert_eq!(r.table.len(), 1);
    assert_eq!(r.key, KeySource::default());
}

#[test]
fn parse_error_has_line_and_column() {
    let err = parse_rules("slots = 4\n[cells.a]\nblue = [\"x:1\"\n").unwrap_err();
    match err {
        RulesError::Parse { line, .. } => assert!(line >= 3, "{err}"),
        other => panic!("{other}"),
    }
}

#[test]
fn unknown_key_is_a_parse_error_at_its_line() {
    let err = parse_rules(&format!("{MIN}[cells.b]\nbleu = []\n")).unwrap_err();
    let RulesError::Parse { line, message, .. } = err else {
        panic!()
    };
    assert_eq!(line, 9);
    assert!(message.contains("bleu"), "{message}");
}

#[test]
fn unassigned_and_doubly_assigned_slots_are_named() {
    let p = problems(
        "slots = 10\n[cells.a]\nblue=[\"h:1\"]\n[cells.b]\nblue=[\"h:2\"]\n\
         [[ranges]]\nfrom=0\nto=4\ncell=\"a\"\n[[ranges]]\nfrom=3\nto=5\ncell=\"b\"\n",
    );
    assert!(
        p.iter().any(|m| m.contains("slots 6-9 not assigned")),
        "{p:?}"
    );
    assert!(
        p.iter().any(|m| m.contains("slots 3-4 assigned twice")
            && m.contains("ranges[0]")
            && m.contains("ranges[1]")),
        "{p:?}"
    );
}

#[test]
fn bad_references_are_named() {
    let p = problems(
        "slots = 2\n[key]\non_missing=\"default-cell\"\ndefault_cell=\"zz\"\n\
         [cells.a]\nblue=[\"h:1\"]\nfailover=[\"a\",\"b\"]\nsplit={green=10001}\n\
         [[ranges]]\nfrom=0\nto=1\ncell=\"c\"\n[overrides]\nu1={cell=\"d\"}\nu2={}\n",
    );
    let all = p.join("\n");
    for want in [
        "key.default_cell: unknown cell \"zz\"",
        "fails over to itself",
        "cells.a.failover[1]: unknown cell \"b\"",
        "10001 basis points is out of range",
        "ranges[0].cell: unknown cell \"c\"",
        "overrides.\"u1\".cell: unknown cell \"d\"",
        "overrides.\"u2\": an override needs",
    ] {
        assert!(all.contains(want), "missing {want:?} in\n{all}");
    }
}

#[test]
fn duplicate_instances_and_empty_colours_are_named() {
    let p = problems(
        "slots = 1\n[cells.a]\nblue=[\"h:1\"]\nsplit={green=100}\n\
         [cells.b]\nblue=[\"h:1\"]\n[[ranges]]\nfrom=0\nto=0\ncell=\"a\"\n",
    );
    let all = p.join("\n");
    assert!(
        all.contains("h:1 is used by both a/blue and b/blue"),
        "{all}"
    );
    assert!(
        all.contains("cells.a.green: the split gives green 100"),
        "{all}"
    );
}

#[test]
fn registered_cells_may_list_no_static_instances() {
    let doc = "slots = 1\n[cells.a]\nregistered = true\nsplit = { green = 5000 }\n[[ranges]]\nfrom = 0\nto = 0\ncell = \"a\"\n";
    let r = parse_rules(doc).unwrap();
    assert!(r.cells["a"].registered);
    assert!(problems(&doc.replace("registered = true\n", ""))
        .join("\n")
        .contains("has no instances"));
}

#[test]
fn slot_count_and_digits_are_checked() {
    assert!(problems("slots = 0\n[cells.a]\nblue=[\"h:1\"]\n")
        .join("\n")
        .contains("slots: 0 is out of range"));
    let all = problems(&MIN.replace(
        "slots = 4",
        "slots = 4\nhash = \"digits\"\ndigits = { count = 0 }",
    ))
    .join("\n");
    assert!(all.contains("digits.count: 0 is out of range"), "{all}");
    let all = problems(&MIN.replace(
        "slots = 4",
        "slots = 1000\nhash = \"digits\"\ndigits = { count = 2 }",
    ))
    .join("\n");
    assert!(all.contains("fewer than slots = 1000"), "{all}");
}

#[test]
fn stamp_headers_cannot_be_key_or_tester() {
    let all = problems(&format!(
        "{MIN}[tester]\nheader = \"X-Cellgate-Colour\"\n[key]\nname = \"x-cellgate-rev\"\n"
    ))
    .join("\n");
    assert!(
        all.contains("tester.header: \"X-Cellgate-Colour\" is a header the gateway stamps"),
        "{all}"
    );
    assert!(
        all.contains("key.name: \"x-cellgate-rev\" is a header"),
        "{all}"
    );
}

#[test]
fn addresses_are_checked() {
    assert!(check_address("127.0.0.1:80").is_ok());
    assert!(check_address("[::1]:80").is_ok());
    assert!(check_address("cell-a.internal:8080").is_ok());
    assert!(check_address("127.0.0.1").is_err());
    assert!(check_address("127.0.0.1:0").is_err());
    assert!(check_address("http://x:1").is_err());
    assert!(check_address("[zz]:1").is_err());
}

#[test]
fn line_col_counts_characters() {
    assert_eq!(line_col("ab\ncé d", 7), (2, 4));
    assert_eq!(line_col("", 5), (1, 1));
}

proptest::proptest! {
    #[test]
    fn the_lean_overrides_reader_reads_what_toml_reads(
        entries in proptest::collection::vec(
            ("[a-zA-Z0-9_ .#=-]{0,12}", proptest::option::of(0usize..3), proptest::option::of(proptest::bool::ANY)),
            0..40,
        ),
        bare in proptest::bool::ANY,
    ) {
        let mut doc = String::from("slots = 4\n[cells.a]\nblue = [\"h:1\"]\n[cells.b]\nblue = [\"h:2\"]\n[[ranges]]\nfrom = 0\nto = 3\ncell = \"a\"\n[overrides] # pins\n");
        for (key, cell, colour) in &entries {
            let simple = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            let k = if bare && simple { key.clone() } else { format!("\"{key}\"") };
            let mut fields = Vec::new();
            if let Some(c) = cell {
                fields.push(format!("cell = \"{}\"", ["a", "b", "zz"][*c]));
            }
            if let Some(g) = colour {
                fields.push(format!("colour = \"{}\"", if *g { "green" } else { "blue" }));
            }
            doc.push_str(&format!("{k} = {{ {} }} # note\n", fields.join(", ")));
        }
        let lean = parse_versioned(&doc).map_err(|e| e.problems());
        let toml_only = parse_toml_only(&doc).map_err(|e| e.problems());
        match (&lean, &toml_only) {
            (Ok(a), Ok(b)) => proptest::prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => proptest::prop_assert!(false, "lean {lean:?} vs toml {toml_only:?}\n{doc}"),
        }
    }
}

const TWO: &str = "slots = 4\n[cells.a]\nblue = [\"127.0.0.1:1\"]\n[cells.b]\nblue = [\"127.0.0.1:2\"]\n[[ranges]]\nfrom = 0\nto = 1\ncell = \"a\"\n[[ranges]]\nfrom = 2\nto = 3\ncell = \"b\"\n";

#[test]
fn a_hosted_shard_is_served_by_its_host_and_replicated_home() {
    let doc = TWO.replace("[cells.b]", "hosted_by = \"b\"\n[cells.b]");
    let r = parse_rules(&doc).unwrap();
    assert_eq!(r.host_of("a"), "b");
    assert_eq!(r.host_of("b"), "b");
    assert_eq!(r.standby_of("a"), Some("a"), "reverse replication to home");
    assert_eq!(r.shards_of("b"), vec!["a", "b"]);
    assert!(r.shards_of("a").is_empty());
    let t = crate::RoutingTable::compile(r, 1).unwrap();
    let a = t.cell_index("a").unwrap();
    // Whatever the health says, no other cell has the data.
    let mut h = crate::StaticHealth::from_table(&t);
    h.set(t.cell_index("b").unwrap(), None, false);
    assert_eq!(t.serving_cell(a, &h), (t.cell_index("b").unwrap(), true));
}

#[test]
fn bad_hosts_are_refused() {
    let own = TWO.replace("[cells.b]", "hosted_by = \"a\"\n[cells.b]");
    assert!(problems(&own)[0].contains("without `hosted_by`"), "{own}");
    let unknown = TWO.replace("[cells.b]", "hosted_by = \"z\"\n[cells.b]");
    assert!(problems(&unknown)[0].contains("\"z\""));
    let chain = TWO
        .replace("[cells.b]", "hosted_by = \"b\"\n[cells.b]")
        .replace(
            "\"127.0.0.1:2\"]\n",
            "\"127.0.0.1:2\"]\nhosted_by = \"a\"\n",
        );
    assert!(problems(&chain)
        .iter()
        .any(|p| p.contains("hosted elsewhere")));
    let draining = TWO
        .replace("[cells.b]", "hosted_by = \"b\"\n[cells.b]")
        .replace(
            "\"127.0.0.1:2\"]\n",
            "\"127.0.0.1:2\"]\nstate = \"draining\"\n",
        );
    assert!(problems(&draining).iter().any(|p| p.contains("draining")));
}
