#!/usr/bin/env bash
# Failover time and RPO: a gateway in front of two replicated cells, clients
# depositing for cell-a's users through the gateway (each write with its own
# idempotency key, retried with the same key on errors, as real clients do),
# cell-a's agent killed with SIGKILL, and `cellctl failover` run at once (the
# operator's reaction time is not measured). Reports the time from the kill
# to the first write acknowledged again for cell-a's users, how long the
# failover command took, and checks that every acknowledged write is in the
# promoted copy exactly once.
#
#   bench/failover.sh                 # 8 s of load, the kill at 3 s
#   CLIENTS=16 bench/failover.sh
#   AUTO=1 bench/failover.sh          # no cellctl: the gateway fails over by itself
#                                     # (--auto-failover, default health settings)
#   AUTO=1 HEALTH_MS=400 bench/failover.sh   # with faster health checks
#
# Loopback only; the clients stop by themselves after DURATION seconds.
set -euo pipefail

DURATION="${DURATION:-8}"
AUTO="${AUTO:-0}"
CLIENTS="${CLIENTS:-8}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
WORK="$(mktemp -d /tmp/cellgate-failover.XXXXXX)"
PIDS=()

cleanup() {
    for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

replicated_pair
AUTO_FLAGS=()
[[ "$AUTO" == 1 ]] && AUTO_FLAGS=(--auto-failover --internal-secret-file "$WORK/secret" \
    --health-interval-ms "${HEALTH_MS:-1000}")
CELLGATE_LOG=error "$BIN/cellgate" serve --rules "$WORK/rules.toml" --reload-interval-ms 50 \
    --listen "127.0.0.1:$GW" --admin "127.0.0.1:$ADMIN" "${AUTO_FLAGS[@]}" &
PIDS+=($!)
wait_port "$GW"

# cell-a's users (routed by the rules).
mapfile -t USERS < <("$BIN/cellctl" route --rules "$WORK/rules.toml" -o json $(seq -f 'user-%g' 1 400) \
    | python3 -c 'import json,sys; [print(d["key"]) for d in json.load(sys.stdin) if d["home_cell"]=="cell-a"]')

# Wait until cell-a's shard is recorded in sync with cell-b (the standby's
# copy is seeded by cell-a's first shipment).
for _ in $(seq 1 200); do
    curl -s -o /dev/null -X POST -H "x-user-id: ${USERS[0]}" -H 'content-type: application/json' \
        -d "{\"amount\": 1, \"idempotency_key\": \"warm-$RANDOM$RANDOM\"}" \
        "http://127.0.0.1:$GW/v1/accounts/${USERS[0]}/deposit"
    grep -qs '"in-sync"' "$WORK/rules.toml.replication/cell-a.json" \
        && grep -qs '"acked_lsn": [1-9]' "$WORK/rules.toml.replication/cell-a.json" && break
    sleep 0.05
done

cat > "$WORK/client.py" <<'PY'
import http.client, json, sys, threading, time
gw, duration, clients, out = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
users = sys.argv[5:]
end = time.time() + duration
acks, lock = [], threading.Lock()
def client(i):
    conn = http.client.HTTPConnection("127.0.0.1", int(gw), timeout=5)
    n = 0
    while time.time() < end:
        user = users[(i + n * clients) % len(users)]
        key = f"c{i}-{n}"
        n += 1
        while time.time() < end + 10:  # retried with the same key until acknowledged
            try:
                conn.request("POST", f"/v1/accounts/{user}/deposit",
                             json.dumps({"amount": 1, "idempotency_key": key}),
                             {"x-user-id": user, "content-type": "application/json"})
                r = conn.getresponse(); r.read()
                if r.status == 200:
                    with lock: acks.append((time.time(), key))
                    break
            except Exception:
                conn.close(); conn = http.client.HTTPConnection("127.0.0.1", int(gw), timeout=5)
            time.sleep(0.01)
ts = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
[t.start() for t in ts]; [t.join() for t in ts]
acks.sort()
gap = max((b[0] - a[0] for a, b in zip(acks, acks[1:])), default=0)
open(out, "w").write("\n".join(k for _, k in acks) + "\n")
print(f"writes acknowledged: {len(acks)}; longest time without an acknowledged write of cell-a's users: {gap*1000:.0f} ms")
PY
python3 "$WORK/client.py" "$GW" "$DURATION" "$CLIENTS" "$WORK/acked.txt" "${USERS[@]:1}" > "$WORK/client.txt" &
CLIENT=$!
wait_for_client() { wait "$CLIENT"; }
sleep 3
KILL_AT=$(date +%s.%N)
kill -9 "$A_PID"
T0=$(date +%s%N)
if [[ "$AUTO" == 1 ]]; then
    wait_for_client
    echo "--- failover (by the gateway: --auto-failover, default health settings)"
    curl -s "http://127.0.0.1:$ADMIN/metrics" | grep '^cellgate_auto_failovers_total' || true
else
    "$BIN/cellctl" failover cell-a --to cell-b --rules "$WORK/rules.toml" --internal-secret-file "$WORK/secret"
    T1=$(date +%s%N)
    wait_for_client
    echo "--- failover"
    echo "kill at $KILL_AT; cellctl failover took $(( (T1 - T0) / 1000000 )) ms"
fi
cat "$WORK/client.txt"
python3 - "$WORK/acked.txt" "$WORK/b/cell-a.replica.db" <<'PY'
import sqlite3, sys
acked = [l.strip() for l in open(sys.argv[1]) if l.strip()]
c = sqlite3.connect(sys.argv[2])
rows = dict(c.execute("SELECT ref, COUNT(*) FROM ledger WHERE kind = 'deposit' GROUP BY ref"))
lost = [k for k in acked if rows.get(k, 0) == 0]
doubled = [k for k in acked if rows.get(k, 0) > 1]
print(f"acknowledged writes: {len(acked)}; lost: {len(lost)}; doubled: {len(doubled)}")
sys.exit(1 if lost or doubled else 0)
PY
"$BIN/cell-agent" check --db "$WORK/b/cell-a.replica.db" | tail -1
