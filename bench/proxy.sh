#!/usr/bin/env bash
# Proxy benchmark: direct-to-backend, nginx, haproxy and cellgate doing the
# same consistent routing on a random x-user-id per request, in alternating
# order for ROUNDS rounds. Reports req/s, p50/p99 latency and the proxy's CPU
# time per request (from /proc/PID/stat), with ratios against nginx.
#
#   bench/proxy.sh                    # 3 rounds, 10 s each, 64 connections
#   ROUNDS=1 DURATION=5 bench/proxy.sh
#
# Loopback only; every run is bounded by DURATION. Needs Debian's wrk, nginx
# and haproxy (installed when missing and running as root).
set -euo pipefail

ROUNDS="${ROUNDS:-3}"
DURATION="${DURATION:-10}"
WARMUP="${WARMUP:-2}"
CONNS="${CONNS:-64}"
PROXY_CPU="${PROXY_CPU:-1}"   # core the proxy is pinned to
LOAD_CPU="${LOAD_CPU:-0}"     # core for wrk and the backends
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=bench/common.sh
source "$ROOT/bench/common.sh"
WORK="$(mktemp -d /tmp/cellgate-bench.XXXXXX)"
PIDS=()

cleanup() {
    for p in "${PIDS[@]:-}"; do [[ -n "$p" ]] && kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need_tools wrk nginx haproxy

# CPU ticks (utime+stime) of a process and all its descendants.
cpu_ticks() {
    local total=0 p
    for p in $1 $(pgrep -P "$1" 2>/dev/null || true); do
        [[ -r /proc/$p/stat ]] || continue
        total=$(( total + $(awk '{print $14 + $15}' "/proc/$p/stat") ))
    done
    echo "$total"
}
TICK=$(getconf CLK_TCK)

build_cellgate

# --- backends: one nginx (1 worker) serving 6 ports: 3 cells x 2 colours ---
start_backends 4096

# --- the proxies' configs ---
servers_nginx() { for p in "${BACKEND_PORTS[@]}"; do echo "    server 127.0.0.1:$p;"; done; }
mkdir -p "$WORK/nginx" "$WORK/haproxy" "$WORK/cellgate"
NGINX_PORT=$(free_port); HAPROXY_PORT=$(free_port); CELLGATE_PORT=$(free_port); ADMIN_PORT=$(free_port)
cat > "$WORK/nginx/nginx.conf" <<EOF
worker_processes 1; daemon off; pid $WORK/nginx/nginx.pid; error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx; fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  keepalive_requests 1000000;
  upstream cells {
    hash \$http_x_user_id consistent;
$(servers_nginx)
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / { proxy_pass http://cells; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
EOF
{
    echo "global"
    echo "  nbthread 1"
    echo "  cpu-map 1/1 $PROXY_CPU"
    echo "defaults"
    echo "  mode http"
    echo "  timeout connect 1s"
    echo "  timeout client 30s"
    echo "  timeout server 30s"
    echo "  http-reuse always"
    echo "frontend fe"
    echo "  bind 127.0.0.1:$HAPROXY_PORT"
    echo "  default_backend cells"
    echo "backend cells"
    echo "  balance hdr(x-user-id)"
    echo "  hash-type consistent"
    i=0; for p in "${BACKEND_PORTS[@]}"; do echo "  server s$i 127.0.0.1:$p"; i=$((i+1)); done
} > "$WORK/haproxy/haproxy.cfg"
write_rules "$WORK/cellgate/rules.toml" "${BACKEND_PORTS[@]}"
write_lua "$WORK/random-user.lua"

start_proxy() { # name -> sets PROXY_PID, PROXY_PORT
    case "$1" in
        direct) PROXY_PID=""; PROXY_PORT=${BACKEND_PORTS[0]} ;;
        nginx)
            taskset -c "$PROXY_CPU" nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx" &
            PROXY_PID=$!; PROXY_PORT=$NGINX_PORT ;;
        haproxy)
            taskset -c "$PROXY_CPU" haproxy -db -f "$WORK/haproxy/haproxy.cfg" &
            PROXY_PID=$!; PROXY_PORT=$HAPROXY_PORT ;;
        cellgate)
            CELLGATE_LOG=warn taskset -c "$PROXY_CPU" "$CELLGATE" serve --workers 1 \
                --rules "$WORK/cellgate/rules.toml" --listen "127.0.0.1:$CELLGATE_PORT" \
                --admin "127.0.0.1:$ADMIN_PORT" &
            PROXY_PID=$!; PROXY_PORT=$CELLGATE_PORT ;;
    esac
    [[ -n "$PROXY_PID" ]] && PIDS+=("$PROXY_PID")
    wait_port "$PROXY_PORT"
}

stop_proxy() {
    [[ -z "$PROXY_PID" ]] && return
    kill "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
}

to_ms() { # wrk latency like 1.23ms / 850.00us / 1.02s
    awk -v v="$1" 'BEGIN { n = v + 0; if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /s$/) n *= 1000; printf "%.3f", n }'
}

RESULTS="$WORK/results.tsv"
: > "$RESULTS"
ORDER=(direct nginx haproxy cellgate)
for round in $(seq 1 "$ROUNDS"); do
    # Rotate the order every round.
    shift_by=$(( (round - 1) % ${#ORDER[@]} ))
    run_order=("${ORDER[@]:$shift_by}" "${ORDER[@]:0:$shift_by}")
    for name in "${run_order[@]}"; do
        start_proxy "$name"
        taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${WARMUP}s" -s "$WORK/random-user.lua" "http://127.0.0.1:$PROXY_PORT/" >/dev/null
        c0=0; [[ -n "$PROXY_PID" ]] && c0=$(cpu_ticks "$PROXY_PID")
        out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -s "$WORK/random-user.lua" "http://127.0.0.1:$PROXY_PORT/")
        c1=0; [[ -n "$PROXY_PID" ]] && c1=$(cpu_ticks "$PROXY_PID")
        stop_proxy
        rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
        reqs=$(awk '/requests in/ {print $1}' <<<"$out")
        p50=$(to_ms "$(awk '$1=="50%" {print $2}' <<<"$out")")
        p99=$(to_ms "$(awk '$1=="99%" {print $2}' <<<"$out")")
        errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
        cpu_us=$(awk -v d=$((c1 - c0)) -v t="$TICK" -v n="$reqs" 'BEGIN { printf "%.1f", (d / t) * 1e6 / n }')
        [[ -z "$PROXY_PID" ]] && cpu_us="-"
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$rps" "$p50" "$p99" "$cpu_us" "$errs" >> "$RESULTS"
        printf 'round %s %-9s %10s req/s  p50 %7s ms  p99 %7s ms  cpu %6s us/req %s\n' "$round" "$name" "$rps" "$p50" "$p99" "$cpu_us" "$errs" >&2
    done
done

# Medians per proxy, ratios against nginx.
python3 - "$RESULTS" <<'EOF'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
by = {}
for r in rows:
    by.setdefault(r[1], []).append(r)
med = lambda xs: st.median(xs) if xs else float("nan")
def col(name, i):
    return med([float(r[i]) for r in by.get(name, []) if r[i] not in ("-", "")])
nginx = {k: col("nginx", i) for k, i in (("rps", 2), ("p50", 3), ("p99", 4), ("cpu", 5))}
print("| proxy | req/s | p50 ms | p99 ms | CPU µs/req | req/s vs nginx | p99 vs nginx | CPU vs nginx |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for name in ("direct", "nginx", "haproxy", "cellgate"):
    if name not in by: continue
    rps, p50, p99, cpu = col(name, 2), col(name, 3), col(name, 4), col(name, 5)
    cpu_s = "-" if cpu != cpu else f"{cpu:.1f}"
    ratio = lambda a, b: "-" if a != a or b != b or b == 0 else f"{a / b:.2f}"
    print(f"| {name} | {rps:.0f} | {p50:.3f} | {p99:.3f} | {cpu_s} | {ratio(rps, nginx['rps'])} | {ratio(p99, nginx['p99'])} | {ratio(cpu, nginx['cpu'])} |")
print(f"\n{len(rows)} runs; medians over rounds. Errors seen: " + (", ".join(f"{r[1]} r{r[0]}: {r[6]}" for r in rows if r[6].strip()) or "none"))
EOF
