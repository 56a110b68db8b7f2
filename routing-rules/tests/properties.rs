//! Property tests for the rule engine: diff/apply, rebalance movement,
//! determinism, sticky splits, and "no input panics".

use std::collections::BTreeMap;

use proptest::prelude::*;
use routing_rules::hash::colour_bucket;
use routing_rules::*;

const POOL: [&str; 6] = ["a", "b", "c", "d", "e", "f"];

fn cell_strategy(names: Vec<String>, me: String) -> impl Strategy<Value = Cell> {
    let others: Vec<String> = names.into_iter().filter(|n| *n != me).collect();
    (
        prop_oneof![
            Just(CellState::Active),
            Just(CellState::Draining),
            Just(CellState::FailedOver)
        ],
        prop_oneof![Just(FailoverPolicy::Auto), Just(FailoverPolicy::Manual)],
        proptest::sample::subsequence(others.clone(), 0..=others.len()).prop_shuffle(),
        1u32..4,
        0u32..=10_000,
        0u64..4,
        1usize..3,
    )
        .prop_map(
            move |(state, policy, failover, weight, green, seed, n)| Cell {
                state,
                failover_policy: policy,
                failover,
                weight,
                blue: (0..n).map(|i| format!("{me}-blue-{i}:80")).collect(),
                green: (0..n).map(|i| format!("{me}-green-{i}:80")).collect(),
                split: Split { green, seed },
                registered: false,
                standby: None,
                hosted_by: None,
                internal: Vec::new(),
            },
        )
}

/// Random rules over a random subset of the cell pool (not necessarily
/// passing every validation rule; diff/apply is structural).
fn rules_strategy() -> impl Strategy<Value = Rules> {
    (
        proptest::sample::subsequence(POOL.to_vec(), 1..=POOL.len()),
        1u32..120,
        prop_oneof![
            Just(HashAlgorithm::Xxh64),
            Just(HashAlgorithm::Digits { count: 3, skip: 0 })
        ],
        any::<bool>(),
    )
        .prop_flat_map(|(names, slots, hash, tester)| {
            let names: Vec<String> = names.into_iter().map(String::from).collect();
            let cells: Vec<_> = names
                .iter()
                .map(|n| {
                    cell_strategy(names.clone(), n.clone()).prop_map({
                        let n = n.clone();
                        move |c| (n.clone(), c)
                    })
                })
                .collect();
            (
                cells,
                proptest::collection::vec(proptest::sample::select(names.clone()), slots as usize),
                proptest::collection::vec(any::<bool>(), slots as usize),
                proptest::collection::btree_map(
                    "[a-z]{1,6}",
                    (
                        proptest::option::of(proptest::sample::select(names.clone())),
                        proptest::option::of(prop_oneof![Just(Colour::Blue), Just(Colour::Green)]),
                    ),
                    0..8,
                ),
                Just((slots, hash, tester)),
            )
        })
        .prop_map(
            |(cells, owners, pins, overrides, (slots, hash, tester))| Rules {
                key: KeySource::default(),
                on_missing: MissingKeyPolicy::Reject,
                hash,
                slots,
                tester: Tester {
                    header: "x-t".into(),
                    enabled: tester,
                },
                cells: cells.into_iter().collect(),
                table: Rules::table_from_slots(&owners, &pins),
                overrides: overrides
                    .into_iter()
                    .map(|(u, (cell, colour))| {
                        let colour = if cell.is_none() && colour.is_none() {
                            Some(Colour::Blue)
                        } else {
                            colour
                        };
                        (u, Override { cell, colour })
                    })
                    .collect(),
            },
        )
}

fn equal_table(cells: usize, slots: u32) -> Rules {
    let names: Vec<String> = (0..cells).map(|i| format!("c{i:02}")).collect();
    let owners: Vec<&str> = (0..slots)
        .map(|s| names[(s as usize * cells) / slots as usize].as_str())
        .collect();
    let mut cell_defs = BTreeMap::new();
    for n in names.iter().chain(["new".to_string()].iter()) {
        cell_defs.insert(
            n.clone(),
            Cell {
                state: CellState::Active,
                failover_policy: FailoverPolicy::Auto,
                failover: vec![],
                weight: 1,
                blue: vec![format!("{n}:1")],
                green: vec![],
                split: Split::default(),
                registered: false,
                standby: None,
                hosted_by: None,
                internal: Vec::new(),
            },
        );
    }
    Rules {
        key: KeySource::default(),
        on_missing: MissingKeyPolicy::Reject,
        hash: HashAlgorithm::Xxh64,
        slots,
        tester: Tester::default(),
        cells: cell_defs,
        table: Rules::table_from_slots(&owners, &vec![false; slots as usize]),
        overrides: BTreeMap::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn applying_diff_a_b_to_a_gives_b(a in rules_strategy(), b in rules_strategy()) {
        let d = diff(&a, &b);
        prop_assert_eq!(d.apply(&a), b.clone());
        prop_assert!(diff(&a, &a).is_empty());
        prop_assert_eq!(diff(&b, &b).apply(&b), b);
    }

    #[test]
    fn moved_fraction_is_moved_slots_over_slots(a in rules_strategy()) {
        // Same slot count and hash: the fraction is exact.
        let mut b = a.clone();
        let owners = a.slot_owners();
        let first = owners[0];
        let new_owners: Vec<&str> = owners.iter().map(|_| first).collect();
        b.table = Rules::table_from_slots(&new_owners, &a.slot_pins());
        let d = diff(&a, &b);
        let moved = owners.iter().filter(|o| **o != first).count() as u32;
        prop_assert_eq!(d.slots_moved, moved);
        prop_assert!((d.users_moved_fraction - moved as f64 / a.slots as f64).abs() < 1e-12);
        let lost: u32 = d.cells.values().map(|c| c.lost).sum();
        let gained: u32 = d.cells.values().map(|c| c.gained).sum();
        prop_assert_eq!(lost, moved);
        prop_assert_eq!(gained, moved);
    }

    #[test]
    fn raising_green_only_moves_blue_users_to_green(
        key in proptest::collection::vec(any::<u8>(), 1..40),
        seed in any::<u64>(),
        g1 in 0u32..=10_000,
        g2 in 0u32..=10_000,
    ) {
        let (lo, hi) = (g1.min(g2), g1.max(g2));
        let b = colour_bucket(&key, seed);
        // green at the lower share implies green at the higher share
        prop_assert!(b >= lo || b < hi);
        // the bucket never changes for an unchanged seed
        prop_assert_eq!(b, colour_bucket(&key, seed));
    }

    #[test]
    fn routing_is_deterministic_and_slot_owned(rules in rules_strategy(), keys in proptest::collection::vec("[0-9a-z]{1,12}", 1..30)) {
        let t1 = RoutingTable::compile(rules.clone(), 1).unwrap();
        let t2 = RoutingTable::compile(rules.clone(), 1).unwrap();
        let owners = rules.slot_owners();
        for k in &keys {
            let d1 = t1.route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy);
            let d2 = t2.route(Some(k.as_bytes()), &RouteAttrs::default(), &AllHealthy);
            prop_assert_eq!(d1, d2);
            if let Ok(d) = d1 {
                if !rules.overrides.contains_key(k.as_str()) {
                    let slot = d.slot.unwrap();
                    prop_assert_eq!(t1.cell_name(d.home_cell), owners[slot as usize]);
                }
            }
        }
    }

    #[test]
    fn parser_never_panics(text in "\\PC{0,300}") {
        let _ = parse_rules(&text);
    }

    #[test]
    fn parser_never_panics_on_mutated_documents(cut in 0usize..2000, insert in "[\\[\\]=\"{}a-z0-9 \n.,-]{0,12}") {
        let base = include_str!("../../examples/cells.toml");
        let mut cut = cut.min(base.len());
        while !base.is_char_boundary(cut) { cut -= 1; }
        let text = format!("{}{}{}", &base[..cut], insert, &base[cut..]);
        let _ = parse_rules(&text);
    }
}

#[test]
fn adding_an_equal_cell_moves_about_one_over_n_plus_one() {
    for (n, slots) in [
        (2usize, 1000u32),
        (3, 100),
        (4, 16384),
        (7, 4096),
        (10, 16384),
    ] {
        let rules = equal_table(n, slots);
        let plan = RebalancePlan {
            add: vec![("new".into(), None)],
            remove: vec![],
        };
        let out = rebalance(&rules, &plan).unwrap();
        let d = diff(&rules, &out);
        let expected = slots as f64 / (n + 1) as f64;
        let moved = d.slots_moved as f64;
        assert!(
            (0.6 * expected..=1.4 * expected).contains(&moved),
            "n={n} slots={slots}: moved {moved}, expected about {expected}"
        );
        // Every moved slot went to the new cell.
        assert!(d.moves.iter().all(|m| m.to_cell == "new"), "{:?}", d.moves);
    }
}

#[test]
fn removing_a_cell_moves_only_its_slots() {
    for (n, slots) in [(3usize, 100u32), (5, 16384)] {
        let rules = equal_table(n, slots);
        let plan = RebalancePlan {
            add: vec![],
            remove: vec!["c01".into()],
        };
        let out = rebalance(&rules, &plan).unwrap();
        let d = diff(&rules, &out);
        assert_eq!(d.slots_moved, rules.slots_per_cell()["c01"]);
        assert!(d
            .moves
            .iter()
            .all(|m| m.from_cell.as_deref() == Some("c01")));
        assert_eq!(out.slots_per_cell()["c01"], 0);
        // The remaining cells share the slots roughly evenly.
        for (c, got) in out.slots_per_cell() {
            if c != "c01" && c != "new" {
                let fair = slots as f64 / (n - 1) as f64;
                assert!(
                    (0.7 * fair..=1.3 * fair).contains(&(got as f64)),
                    "{c}: {got}"
                );
            }
        }
    }
}

#[test]
fn pinned_slots_never_move() {
    let mut rules = equal_table(3, 300);
    let owners: Vec<String> = rules.slot_owners().iter().map(|s| s.to_string()).collect();
    let pins: Vec<bool> = (0..300).map(|s| s % 2 == 0).collect();
    rules.table = Rules::table_from_slots(&owners, &pins);
    let out = rebalance(
        &rules,
        &RebalancePlan {
            add: vec![("new".into(), Some(3))],
            remove: vec![],
        },
    )
    .unwrap();
    let after = out.slot_owners();
    for s in (0..300).step_by(2) {
        assert_eq!(after[s], owners[s], "pinned slot {s} moved");
    }
    assert!(out.slots_per_cell()["new"] > 0);
    assert_eq!(out.cells["new"].weight, 3);
    // Removing a cell that owns pinned slots is refused.
    let err = rebalance(
        &rules,
        &RebalancePlan {
            add: vec![],
            remove: vec!["c00".into()],
        },
    )
    .unwrap_err();
    assert!(matches!(err, RebalanceError::PinnedSlots { .. }), "{err}");
}

#[test]
fn rebalance_rejects_unknown_and_contradictory_plans() {
    let rules = equal_table(2, 10);
    let e = |add: &[&str], remove: &[&str]| {
        rebalance(
            &rules,
            &RebalancePlan {
                add: add.iter().map(|c| (c.to_string(), None)).collect(),
                remove: remove.iter().map(|c| c.to_string()).collect(),
            },
        )
        .unwrap_err()
    };
    assert_eq!(e(&["zz"], &[]), RebalanceError::UnknownCell("zz".into()));
    assert_eq!(
        e(&["new"], &["new"]),
        RebalanceError::AddAndRemove("new".into())
    );
    assert_eq!(e(&[], &[]), RebalanceError::Empty);
    assert!(matches!(
        e(&[], &["c00", "c01"]),
        RebalanceError::NoneLeft(_)
    ));
}
