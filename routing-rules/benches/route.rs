//! Criterion benches for the rule engine: route decisions with 4/100/1000
//! cells and 16384 slots, with a 1,000,000-entry override map, and compiling
//! a document with 1,000,000 overrides. Figures: docs/benchmarks.md.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use routing_rules::*;

const SLOTS: u32 = 16_384;
/// Distinct keys cycled through: enough that the override map does not sit in cache.
const KEYS: usize = 1 << 16;

fn rules(cells: usize, overrides: usize) -> Rules {
    let names: Vec<String> = (0..cells).map(|i| format!("cell-{i:04}")).collect();
    let mut defs = BTreeMap::new();
    for (i, n) in names.iter().enumerate() {
        defs.insert(
            n.clone(),
            Cell {
                state: CellState::Active,
                failover_policy: FailoverPolicy::Auto,
                failover: vec![names[(i + 1) % cells].clone()],
                weight: 1,
                blue: vec![format!("10.0.{}.{}:8080", i / 250, i % 250)],
                green: vec![format!("10.1.{}.{}:8080", i / 250, i % 250)],
                split: Split {
                    green: 2_500,
                    seed: i as u64,
                },
                registered: false,
                standby: None,
                hosted_by: None,
                internal: Vec::new(),
            },
        );
    }
    let owners: Vec<&str> = (0..SLOTS)
        .map(|s| names[s as usize * cells / SLOTS as usize].as_str())
        .collect();
    let overrides = (0..overrides)
        .map(|i| {
            (
                format!("pinned-user-{i}"),
                Override {
                    cell: Some(names[i % cells].clone()),
                    colour: None,
                },
            )
        })
        .collect();
    Rules {
        key: KeySource::default(),
        on_missing: MissingKeyPolicy::Reject,
        hash: HashAlgorithm::Xxh64,
        slots: SLOTS,
        tester: Tester::default(),
        cells: defs,
        table: Rules::table_from_slots(&owners, &vec![false; SLOTS as usize]),
        overrides,
    }
}

/// `KEYS` realistic user ids, cycled through by the benches.
fn keys() -> Vec<String> {
    (0..KEYS as u64)
        .map(|i| {
            format!(
                "2088{:012}",
                i.wrapping_mul(2_654_435_761) % 1_000_000_000_000
            )
        })
        .collect()
}

fn bench_route(c: &mut Criterion) {
    let keys = keys();
    let mut g = c.benchmark_group("route");
    for (cells, overrides) in [(4, 0), (100, 0), (1000, 0), (100, 1_000_000)] {
        let table = RoutingTable::compile(rules(cells, overrides), 1).unwrap();
        let health = StaticHealth::from_table(&table);
        let name = format!("cells={cells}/slots={SLOTS}/overrides={overrides}");
        let mut i = 0usize;
        g.bench_function(&name, |b| {
            b.iter(|| {
                i = (i + 1) & (KEYS - 1);
                black_box(table.route(
                    Some(black_box(keys[i].as_bytes())),
                    &RouteAttrs::default(),
                    &health,
                ))
            })
        });
    }
    // Hits in the override map: 65536 distinct pinned users, so most
    // lookups miss the CPU caches (worst case).
    let table = RoutingTable::compile(rules(100, 1_000_000), 1).unwrap();
    let pinned: Vec<String> = (0..KEYS)
        .map(|i| format!("pinned-user-{}", (i * 241) % 1_000_000))
        .collect();
    let mut i = 0usize;
    g.bench_function("cells=100/slots=16384/overrides=1000000/hit-cold", |b| {
        b.iter(|| {
            i = (i + 1) & (KEYS - 1);
            black_box(table.route(
                Some(black_box(pinned[i].as_bytes())),
                &RouteAttrs::default(),
                &AllHealthy,
            ))
        })
    });
    // The same with a hot set of 4096 pinned users (testers, VIPs that call
    // often): the entries stay in cache.
    let mut i = 0usize;
    g.bench_function("cells=100/slots=16384/overrides=1000000/hit-hot4096", |b| {
        b.iter(|| {
            i = (i + 1) & 4095;
            black_box(table.route(
                Some(black_box(pinned[i].as_bytes())),
                &RouteAttrs::default(),
                &AllHealthy,
            ))
        })
    });
    g.finish();
}

fn bench_hash(c: &mut Criterion) {
    let keys = keys();
    let mut i = 0usize;
    c.bench_function("hash/xxh64_slot", |b| {
        b.iter(|| {
            i = (i + 1) & (KEYS - 1);
            black_box(hash::xxh64_slot(black_box(keys[i].as_bytes()), SLOTS))
        })
    });
}

fn bench_compile(c: &mut Criterion) {
    let mut g = c.benchmark_group("compile");
    g.sample_size(10);
    let big = rules(100, 1_000_000);
    g.bench_function("overrides=1000000", |b| {
        b.iter_batched(
            || big.clone(),
            |r| black_box(RoutingTable::compile(r, 1).unwrap()),
            BatchSize::LargeInput,
        )
    });
    // Parse + validate + compile from TOML text, as a gateway reload does.
    let mut text = String::from("slots = 16384\n");
    for i in 0..100 {
        text.push_str(&format!("[cells.cell-{i:04}]\nblue = [\"10.0.0.{i}:1\"]\n"));
    }
    text.push_str("[[ranges]]\nfrom = 0\nto = 16383\ncell = \"cell-0000\"\n[overrides]\n");
    for i in 0..1_000_000 {
        text.push_str(&format!(
            "\"pinned-user-{i}\" = {{ cell = \"cell-{:04}\" }}\n",
            i % 100
        ));
    }
    g.bench_function("parse+validate+compile/overrides=1000000", |b| {
        b.iter(|| {
            let r = parse_rules(black_box(&text)).unwrap();
            black_box(RoutingTable::compile(r, 1).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches, bench_route, bench_hash, bench_compile);
criterion_main!(benches);
