#!/usr/bin/env bash
# Abuse benchmark: normal clients beside 1000 abusive connections for 60 s
# (slowloris heads, idle HTTP/2 connections, clients that never read a big
# response, POSTs that announce a body and never send it). Reports the normal
# clients' p99 without and with the abuse, the gateway's peak RSS, what it
# counted as client faults, and whether anything failed over.
#
#   bench/abuse.sh                       # 1000 connections, 60 s of abuse
#   ABUSERS=400 ABUSE_SECONDS=30 bench/abuse.sh
#
# Loopback only; the abuse stops by itself after ABUSE_SECONDS and opens at
# most ABUSE_MAX_CONNECTS connections in all. Needs Debian's wrk and nginx.
set -euo pipefail

ABUSERS="${ABUSERS:-1000}"
ABUSE_SECONDS="${ABUSE_SECONDS:-60}"
ABUSE_MAX_CONNECTS="${ABUSE_MAX_CONNECTS:-20000}"
MEASURE="${MEASURE:-15}"
CONNS="${CONNS:-32}"
PROXY_CPU="${PROXY_CPU:-1}"
LOAD_CPU="${LOAD_CPU:-0}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
WORK="$(mktemp -d /tmp/cellgate-abuse.XXXXXX)"
PIDS=()

cleanup() {
    for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need_tools wrk nginx

build_cellgate

# --- backends: nginx on 6 ports; /big is a 16 MiB file ---
head -c $((16 << 20)) /dev/zero > "$WORK/big.bin"
start_backends 8192 "location = /big { alias $WORK/big.bin; } "

write_rules "$WORK/rules.toml" "${BACKEND_PORTS[@]}"
write_lua "$WORK/random-user.lua"

GW_PORT=$(free_port); ADMIN_PORT=$(free_port)
CELLGATE_LOG=warn taskset -c "$PROXY_CPU" "$CELLGATE" serve --workers 1 \
    --rules "$WORK/rules.toml" --listen "127.0.0.1:$GW_PORT" --admin "127.0.0.1:$ADMIN_PORT" \
    &
GW_PID=$!
PIDS+=("$GW_PID")
wait_port "$GW_PORT"

measure() { # label -> prints "p99_ms req_s"
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${MEASURE}s" --latency -s "$WORK/random-user.lua" "http://127.0.0.1:$GW_PORT/")
    p99=$(awk '/^ +99%/ {print $2}' <<<"$out")
    rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    echo "$1: p99 $p99, $rps req/s, non-2xx ${non2xx:-0}" >&2
    awk -v v="$p99" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f\n", n }'
}

taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s -s "$WORK/random-user.lua" "http://127.0.0.1:$GW_PORT/" >/dev/null
BASE=$(measure "unloaded")

# --- the abuse: ABUSERS connections, a quarter of each kind, reopened when
# the gateway closes them, for ABUSE_SECONDS ---
cat > "$WORK/abuse.py" <<'EOF'
import socket, sys, time, selectors
port, n, seconds, max_connects = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
end = time.time() + seconds
kinds = ["slowloris", "idle_h2", "no_read", "bodiless"]
sel = selectors.DefaultSelector()
held = []
stats = {"opened": 0, "closed": 0}
def first_bytes(kind, user):
    return {
        "slowloris": f"GET /v1/accounts HTTP/1.1\r\nHost: x\r\nx-user-id: {user}\r\n".encode(),
        "idle_h2": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00",
        "no_read": f"GET /big HTTP/1.1\r\nHost: x\r\nx-user-id: {user}\r\n\r\n".encode(),
        "bodiless": f"POST /v1/accounts HTTP/1.1\r\nHost: x\r\nx-user-id: {user}\r\ncontent-length: 100\r\n\r\n".encode(),
    }[kind]
def open_one(kind, i):
    if stats["opened"] >= max_connects or time.time() >= end:
        return
    stats["opened"] += 1
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        s.connect(("127.0.0.1", port))
        s.sendall(first_bytes(kind, f"abuser-{i}"))
    except OSError:
        s.close()
        return
    s.setblocking(False)
    if kind == "no_read":
        held.append(s)  # never read: the gateway's send timeout must act
    else:
        sel.register(s, selectors.EVENT_READ, {"kind": kind, "i": i, "next": time.time() + 5})
for i in range(n):
    open_one(kinds[i % 4], i)
while time.time() < end:
    for key, _ in sel.select(timeout=0.5):
        s, st = key.fileobj, key.data
        try:
            data = s.recv(65536)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:
            stats["closed"] += 1
            sel.unregister(s)
            s.close()
            open_one(st["kind"], st["i"])
    now = time.time()
    for key in list(sel.get_map().values()):
        st = key.data
        if st["kind"] == "slowloris" and now >= st["next"]:
            st["next"] = now + 5
            try:
                key.fileobj.send(b"x-slow: 1\r\n")
            except OSError:
                pass
print(f"abuse: {stats['opened']} connections opened, {stats['closed']} closed by the gateway", file=sys.stderr)
EOF
taskset -c "$LOAD_CPU" python3 "$WORK/abuse.py" "$GW_PORT" "$ABUSERS" "$ABUSE_SECONDS" "$ABUSE_MAX_CONNECTS" &
ABUSE_PID=$!
PIDS+=("$ABUSE_PID")
sleep 10
LOADED=$(measure "with ${ABUSERS} abusive connections")
wait "$ABUSE_PID" || true

RSS_KB=$(awk '/VmHWM/ {print $2}' "/proc/$GW_PID/status")
METRICS=$(curl -s "http://127.0.0.1:$ADMIN_PORT/metrics")
FAILOVERS=$(awk '/^cellgate_failovers_total/ {s += $2} END {print s + 0}' <<<"$METRICS")
CLIENT=$(awk '/^cellgate_client_errors_total/ {printf "%s ", $0}' <<<"$METRICS")
UPSTREAM=$(awk '/^cellgate_upstream_errors_total/ {s += $2} END {print s + 0}' <<<"$METRICS")
RATIO=$(awk -v a="$LOADED" -v b="$BASE" 'BEGIN { printf "%.2f", a / b }')
echo
echo "| normal p99 unloaded | normal p99 under abuse | ratio | gateway peak RSS | failovers | upstream errors |"
echo "| --- | --- | --- | --- | --- | --- |"
echo "| ${BASE} ms | ${LOADED} ms | ${RATIO} | $((RSS_KB / 1024)) MiB | ${FAILOVERS} | ${UPSTREAM} |"
echo "client faults counted: ${CLIENT}"
