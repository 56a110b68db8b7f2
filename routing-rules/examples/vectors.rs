//! Prints the hash test vectors of docs/hash.md (markdown table rows).
use routing_rules::hash::{colour_bucket, xxh64_slot};
use xxhash_rust::xxh64::xxh64;

fn main() {
    let keys = [
        "alice",
        "bob",
        "carol",
        "user-1",
        "user-2",
        "user-3",
        "42",
        "2088000012345678",
        "用户-7",
        "x",
    ];
    println!("| key | key bytes (hex) | xxh64(key, 0) | slot @100 | slot @16384 | bucket seed 0 | bucket seed 42 |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for k in keys {
        let b = k.as_bytes();
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        println!(
            "| `{k}` | `{hex}` | `0x{:016x}` | {} | {} | {} | {} |",
            xxh64(b, 0),
            xxh64_slot(b, 100),
            xxh64_slot(b, 16384),
            colour_bucket(b, 0),
            colour_bucket(b, 42)
        );
    }
}
