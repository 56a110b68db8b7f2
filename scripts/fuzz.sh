#!/usr/bin/env bash
# Runs each cargo-fuzz target (routing-rules: rules parser, key extraction;
# gateway: HTTP/1.1 codec) for N seconds each (default 60).
# cargo-fuzz needs nightly features; on the stable toolchain they are
# unlocked with RUSTC_BOOTSTRAP=1.
set -euo pipefail
secs="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
for spec in routing-rules:rules_parser routing-rules:key_extraction gateway:h1_codec; do
    crate="${spec%%:*}" target="${spec#*:}"
    cd "$root/$crate"
    mkdir -p "fuzz/corpus/$target"
    [[ $target == rules_parser ]] && cp "$root"/examples/*.toml "fuzz/corpus/$target/" 2>/dev/null || true
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="$secs" -rss_limit_mb=2048
done
