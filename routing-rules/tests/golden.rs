//! Golden tests: the hash contract in docs/hash.md and a fixed rebalance.
//! A failure here means users would silently move between cells.

use routing_rules::hash::{colour_bucket, digits_slot, xxh64_slot, KeyProblem};
use routing_rules::rebalance::render_table_into;
use routing_rules::{parse_rules, rebalance, RebalancePlan};

fn manifest(path: &str) -> String {
    let p = format!("{}/{path}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// Rows of the test-vector table in docs/hash.md.
fn vectors() -> Vec<Vec<String>> {
    manifest("../docs/hash.md")
        .lines()
        .filter(|l| l.starts_with("| `"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().trim_matches('`').to_string())
                .collect()
        })
        .collect()
}

#[test]
fn slots_and_buckets_match_the_published_vectors() {
    let rows = vectors();
    assert!(rows.len() >= 10, "docs/hash.md lost its vectors");
    for r in rows {
        let key = r[0].as_bytes();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, r[1], "key bytes of {}", r[0]);
        let h = xxhash_rust::xxh64::xxh64(key, 0);
        assert_eq!(format!("0x{h:016x}"), r[2], "xxh64 of {}", r[0]);
        assert_eq!(
            xxh64_slot(key, 100).to_string(),
            r[3],
            "slot@100 of {}",
            r[0]
        );
        assert_eq!(
            xxh64_slot(key, 16384).to_string(),
            r[4],
            "slot@16384 of {}",
            r[0]
        );
        assert_eq!(
            colour_bucket(key, 0).to_string(),
            r[5],
            "bucket seed 0 of {}",
            r[0]
        );
        assert_eq!(
            colour_bucket(key, 42).to_string(),
            r[6],
            "bucket seed 42 of {}",
            r[0]
        );
    }
}

#[test]
fn digits_vectors() {
    assert_eq!(digits_slot(b"2088000012345678", 2, 0, 100), Ok(78));
    assert_eq!(digits_slot(b"2088000012345678", 2, 2, 100), Ok(56));
    assert_eq!(digits_slot(b"7", 2, 0, 100), Err(KeyProblem::NotDigits));
    assert_eq!(digits_slot(b"12a4", 2, 0, 100), Err(KeyProblem::NotDigits));
}

/// Adding cell-d to the 3-cell fixture must always produce exactly the
/// committed document. Regenerate (after an intended change) with
/// `UPDATE_GOLDEN=1 cargo test -p routing-rules --test golden`.
#[test]
fn rebalance_output_is_pinned() {
    let input = manifest("tests/fixtures/rebalance-in.toml");
    let rules = parse_rules(&input).unwrap();
    let plan = RebalancePlan {
        add: vec![("cell-d".into(), None)],
        remove: vec![],
    };
    let out = rebalance(&rules, &plan).unwrap();
    let text = render_table_into(&input, &out).unwrap();
    let golden_path = format!(
        "{}/tests/fixtures/rebalance-add-cell-d.toml",
        env!("CARGO_MANIFEST_DIR")
    );
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden_path, &text).unwrap();
    }
    let golden = std::fs::read_to_string(&golden_path).unwrap();
    assert_eq!(text, golden, "rebalance output changed");
    assert_eq!(parse_rules(&golden).unwrap(), out);
}
