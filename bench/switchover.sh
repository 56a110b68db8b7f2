#!/usr/bin/env bash
# Switchover under load: a gateway in front of two replicated cells (cell-a
# journals and ships its shard to its standby cell-b), wrk depositing for
# random users through the gateway, and `cellctl switchover` moving
# cell-a's shard to cell-b and back in the middle. Reports wrk's latency
# (the stall shows in the maximum), non-2xx answers (must be 0), what each
# switchover took, the gateway's held requests, and checks that the
# ledgers hold exactly the deposits acknowledged (give or take the requests
# still in flight when wrk stopped).
#
#   bench/switchover.sh                    # 12 s of load, switchovers at 4 s and 8 s
#   DURATION=20 CONNS=64 bench/switchover.sh
#
# Loopback only; the load stops by itself after DURATION seconds. Needs
# Debian's wrk.
set -euo pipefail

DURATION="${DURATION:-12}"
CONNS="${CONNS:-32}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
WORK="$(mktemp -d /tmp/cellgate-switchover.XXXXXX)"
PIDS=()

cleanup() {
    for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need_tools wrk

replicated_pair
CELLGATE_LOG=warn "$BIN/cellgate" serve --rules "$WORK/rules.toml" --reload-interval-ms 50 \
    --listen "127.0.0.1:$GW" --admin "127.0.0.1:$ADMIN" &
PIDS+=($!)
wait_port "$GW"

# The standby gets its copy of cell-a's shard from cell-a's first
# shipment (a snapshot): wait until it is there.
curl -s -o /dev/null -X POST -H 'x-user-id: warmup' -H 'content-type: application/json' \
    -d '{"amount": 1, "idempotency_key": "warmup"}' "http://127.0.0.1:$GW/v1/accounts/warmup/deposit"
for _ in $(seq 1 100); do [[ -f "$WORK/b/cell-a.replica.db" ]] && break; sleep 0.1; done
[[ -f "$WORK/b/cell-a.replica.db" ]] || { echo "cell-b never got its copy of cell-a's shard" >&2; exit 1; }

cat > "$WORK/deposit.lua" <<'EOF'
-- Each wrk thread gets its own id (its keys and its random users differ).
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
local n = 0
function init(args)
  math.randomseed(os.time() * 1000 + id)
end
request = function()
  n = n + 1
  local user = "u" .. tostring(math.random(1, 100000))
  wrk.headers["x-user-id"] = user
  wrk.headers["content-type"] = "application/json"
  local body = '{"amount": 1, "idempotency_key": "t' .. id .. "-" .. n .. '"}'
  return wrk.format("POST", "/v1/accounts/" .. user .. "/deposit", nil, body)
end
EOF

switch() { # at_seconds to
    sleep "$1"
    "$BIN/cellctl" switchover cell-a --to "$2" --rules "$WORK/rules.toml" \
        --internal-secret-file "$WORK/secret" 2>/dev/null
}
(switch $((DURATION / 3)) cell-b; switch $((DURATION / 3)) cell-a) > "$WORK/switches.txt" &
SWITCHES=$!
out=$(wrk -t2 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/deposit.lua" "http://127.0.0.1:$GW/")
wait "$SWITCHES" || true
echo "$out"
echo "--- switchovers"
cat "$WORK/switches.txt"
echo "--- gateway"
curl -s "http://127.0.0.1:$ADMIN/metrics" | grep -E '^cellgate_(held_requests_total|hold_seconds_(sum|count))' || true
sleep 1
done=$(awk '/requests in/ {print $1}' <<<"$out")
non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
count() { python3 - "$1" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
print(c.execute("SELECT COUNT(*) FROM ledger WHERE kind = 'deposit' AND ref != 'warmup'").fetchone()[0])
PY
}
in_a=$(count "$WORK/a/cell-a.db"); in_b=$(count "$WORK/b/cell-b.db")
echo "--- ledgers"
echo "deposits acknowledged to wrk: $done (non-2xx: ${non2xx:-0}); in the ledgers: $((in_a + in_b)) (cell-a $in_a, cell-b $in_b); difference $((in_a + in_b - done)) (at most the $CONNS requests in flight when wrk stopped)"
for db in "$WORK/a/cell-a.db" "$WORK/b/cell-b.db" "$WORK/b/cell-a.replica.db"; do
    "$BIN/cell-agent" check --db "$db" | tail -1
done
