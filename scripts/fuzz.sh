#!/usr/bin/env bash
# Runs each cargo-fuzz target of routing-rules for N seconds (default 60).
# cargo-fuzz needs nightly features; on the stable toolchain they are
# unlocked with RUSTC_BOOTSTRAP=1.
set -euo pipefail
secs="${1:-60}"
cd "$(dirname "$0")/../routing-rules"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
for target in rules_parser key_extraction; do
    mkdir -p "fuzz/corpus/$target"
    [[ $target == rules_parser ]] && cp ../examples/*.toml "fuzz/corpus/$target/" 2>/dev/null || true
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048
done
