#!/usr/bin/env bash
# Makes docs/img/dashboard.png: runs the demo (release build) under a bounded
# load with two switchovers, scrapes it with a local Prometheus (Debian
# package `prometheus`), renders deploy/grafana/cellgate.json's panels from
# it (scripts/dashboard-preview.py) and screenshots the page with headless
# Chromium (Debian package `chromium`). Loopback only; everything it starts
# is stopped by PID at the end.
#
#   scripts/dashboard-screenshot.sh            # ~2.5 minutes
#   LOAD_SECONDS=60 scripts/dashboard-screenshot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/cellgate-target}"
LOAD_SECONDS="${LOAD_SECONDS:-120}"
OUT="${OUT:-docs/img/dashboard.png}"
for tool in prometheus chromium; do
    command -v "$tool" >/dev/null || { echo "dashboard-screenshot: needs $tool (apt-get install -y $tool)" >&2; exit 2; }
done
cargo build -q --release --locked -p cellgate --bin cellgate -p routing-rules --bin cellctl
BIN="$CARGO_TARGET_DIR/release"
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

"$BIN/cellgate" demo --data-dir "$work/demo" > "$work/banner.txt" 2> "$work/demo.log" &
pids+=($!)
for _ in $(seq 1 300); do grep -q "Press Ctrl-C" "$work/banner.txt" 2>/dev/null && break; sleep 0.1; done
grep -q "Press Ctrl-C" "$work/banner.txt" || { cat "$work/demo.log" >&2; echo "the demo did not start" >&2; exit 2; }
gw=$(awk '$1=="gateway"{print $2}' "$work/banner.txt" | sed 's|http://||')
admin=$(awk '$1=="admin"{print $2}' "$work/banner.txt" | sed 's|http://||; s|/admin/rules||')
agents=$(awk '$1 ~ /^cell-/ && $3 ~ /^http/ {print $3}' "$work/banner.txt" | sed 's|http://||')
switch_a_b=$(grep -o 'cellctl switchover cell-a --to cell-b .*' "$work/banner.txt" | head -1)
switch_b_a=$(grep -o 'cellctl switchover cell-a --to cell-a .*' "$work/banner.txt" | head -1)

prom_port=$(free_port)
{
    echo "global: {scrape_interval: 1s, evaluation_interval: 1s}"
    echo "scrape_configs:"
    echo "  - job_name: gateway"
    echo "    static_configs: [{targets: ['$admin']}]"
    echo "  - job_name: cells"
    echo "    static_configs:"
    echo "      - targets: [$(echo "$agents" | sed "s/.*/'&'/" | paste -sd, -)]"
} > "$work/prometheus.yml"
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
    --web.listen-address="127.0.0.1:$prom_port" > "$work/prometheus.log" 2>&1 &
pids+=($!)

# A bounded load: deposits, orders and payments, transfers, reads, for
# LOAD_SECONDS; cell-a's shard switched over to cell-b and back on the way.
python3 - "$gw" "$LOAD_SECONDS" > "$work/load.log" 2>&1 <<'PYEOF' &
import http.client, json, random, sys, threading, time
gw, seconds = sys.argv[1], float(sys.argv[2])
host, port = gw.split(":")
end = time.time() + seconds
users = [f"user-{i}" for i in range(300)]
def worker(n):
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    i = 0
    while time.time() < end and i < 200_000:
        i += 1
        u = random.choice(users)
        op = random.random()
        try:
            if op < 0.35:
                path, body = f"/v1/accounts/{u}/deposit", {"amount": 500, "idempotency_key": f"d-{n}-{i}"}
            elif op < 0.55:
                path, body = "/v1/orders", {"user": u, "amount": 120, "merchant": "m-1", "idempotency_key": f"o-{n}-{i}"}
            elif op < 0.65:
                path, body = "/v1/transfers", {"from": u, "to": random.choice(users), "amount": 5, "idempotency_key": f"t-{n}-{i}"}
            else:
                path, body = f"/v1/accounts/{u}", None
            headers = {"x-user-id": u, "content-type": "application/json"}
            c.request("POST" if body else "GET", path, json.dumps(body) if body else None, headers)
            c.getresponse().read()
        except Exception:
            c.close()
            c = http.client.HTTPConnection(host, int(port), timeout=5)
        time.sleep(0.004)
threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
for t in threads: t.start()
for t in threads: t.join()
PYEOF
load=$!
pids+=($load)
sleep $((LOAD_SECONDS / 3))
(cd "$work" && PATH="$BIN:$PATH" eval "$switch_a_b") >> "$work/switch.log" 2>&1 || true
sleep $((LOAD_SECONDS / 3))
(cd "$work" && PATH="$BIN:$PATH" eval "$switch_b_a") >> "$work/switch.log" 2>&1 || true
wait "$load" || true
sleep 3
python3 scripts/dashboard-preview.py --prometheus "http://127.0.0.1:$prom_port" \
    --minutes "$(python3 -c "print(round(($LOAD_SECONDS + 10) / 60, 2))")" --out "$work/preview.html"
mkdir -p "$(dirname "$OUT")"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1544,1430 \
    --screenshot="$PWD/$OUT" "file://$work/preview.html" > "$work/chromium.log" 2>&1
echo "wrote $OUT"
cat "$work/switch.log"
