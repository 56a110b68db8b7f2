#!/usr/bin/env bash
# Installs what cellgate's build and tests need on a fresh Debian machine.
# Idempotent: does nothing when everything is present.
set -euo pipefail

need=()
command -v cargo >/dev/null || { echo "install-deps: cargo (rustup) is required" >&2; exit 1; }
command -v make >/dev/null || need+=(make)
command -v cc >/dev/null || need+=(gcc)
# The etcd control plane's tests start a real etcd (the build needs no protoc:
# scripts/protoc runs the one vendored in the crate protoc-bin-vendored).
command -v etcd >/dev/null || need+=(etcd-server)
# Drills in network namespaces (`ip netns`, `tc`; run as root).
command -v ip >/dev/null && command -v tc >/dev/null || need+=(iproute2)
# promtool checks and unit-tests deploy/prometheus/alerts.yml.
command -v promtool >/dev/null || need+=(prometheus)

if ((${#need[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "install-deps: missing ${need[*]}; run as root or install them: apt-get install -y ${need[*]}" >&2
        exit 1
    fi
    echo "install-deps: installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true
