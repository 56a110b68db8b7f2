# Shared by the bench scripts (proxy, abuse, switchover, failover): the tools they need, free
# ports, the release build, the six nginx backends, the cellgate rules over
# them, and wrk's random-user script. The caller sets ROOT, WORK, LOAD_CPU
# and the PIDS array (its cleanup stops them).

# need_tools TOOL...: installs Debian's packages for missing tools (as root).
need_tools() {
    local need=() t
    for t in "$@"; do command -v "$t" >/dev/null || need+=("$t"); done
    if ((${#need[@]})); then
        [[ $(id -u) -eq 0 ]] || { echo "missing: ${need[*]} (apt-get install -y ${need[*]})" >&2; exit 1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}

# A free loopback port.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

wait_port() { # port
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "port $1 never opened" >&2; return 1
}

# build_cellgate: the release build; sets CELLGATE.
build_cellgate() {
    echo "building cellgate (release)..." >&2
    (cd "$ROOT" && cargo build --release -q -p cellgate)
    CELLGATE="${CARGO_TARGET_DIR:-$ROOT/target}/release/cellgate"
}

# start_backends WORKER_CONNECTIONS [EXTRA_LOCATIONS]: one nginx (1 worker,
# on LOAD_CPU) serving `ok` on 6 ports (3 cells x 2 colours); sets
# BACKEND_PORTS and waits until every port answers.
start_backends() {
    local conns=$1 extra=${2:-} p
    BACKEND_PORTS=()
    for _ in 1 2 3 4 5 6; do BACKEND_PORTS+=("$(free_port)"); done
    mkdir -p "$WORK/backend"
    {
        echo "worker_processes 1; daemon off; pid $WORK/backend/nginx.pid; error_log $WORK/backend/error.log warn;"
        echo "events { worker_connections $conns; }"
        echo "http { access_log off; client_body_temp_path $WORK/backend; proxy_temp_path $WORK/backend; fastcgi_temp_path $WORK/backend; uwsgi_temp_path $WORK/backend; scgi_temp_path $WORK/backend; keepalive_requests 1000000;"
        for p in "${BACKEND_PORTS[@]}"; do
            echo "  server { listen 127.0.0.1:$p; ${extra}location / { return 200 'ok\n'; } }"
        done
        echo "}"
    } > "$WORK/backend/nginx.conf"
    taskset -c "$LOAD_CPU" nginx -c "$WORK/backend/nginx.conf" -p "$WORK/backend" &
    PIDS+=($!)
    for p in "${BACKEND_PORTS[@]}"; do wait_port "$p"; done
}

# write_rules FILE PORT1..PORT6: 3 cells x 2 colours, 16384 slots, 50/50 splits.
write_rules() {
    local file=$1; shift
    local P=("$@")
    cat > "$file" <<EOF
revision = 1
slots = 16384
[cells.cell-a]
failover = ["cell-b"]
blue = ["127.0.0.1:${P[0]}"]
green = ["127.0.0.1:${P[1]}"]
split = { green = 5000, seed = 1 }
[cells.cell-b]
failover = ["cell-c"]
blue = ["127.0.0.1:${P[2]}"]
green = ["127.0.0.1:${P[3]}"]
split = { green = 5000, seed = 2 }
[cells.cell-c]
failover = ["cell-a"]
blue = ["127.0.0.1:${P[4]}"]
green = ["127.0.0.1:${P[5]}"]
split = { green = 5000, seed = 3 }
[[ranges]]
from = 0
to = 5460
cell = "cell-a"
[[ranges]]
from = 5461
to = 10921
cell = "cell-b"
[[ranges]]
from = 10922
to = 16383
cell = "cell-c"
EOF
}

# write_lua FILE: a GET with a random x-user-id per request.
write_lua() {
    cat > "$1" <<'EOF'
math.randomseed(os.time())
request = function()
  wrk.headers["x-user-id"] = tostring(math.random(1, 1000000000))
  return wrk.format("GET", "/v1/accounts")
end
EOF
}

# replicated_pair: builds cellgate, cell-agent and cellctl (release) into
# BIN, writes a secret and the rules of two cells (cell-a journaled, its
# standby cell-b) to $WORK, and starts both agents (cell-b first); sets
# A_PID, and GW and ADMIN (free ports for the gateway).
replicated_pair() {
    echo "building cellgate, cell-agent and cellctl (release)..." >&2
    (cd "$ROOT" && cargo build --release -q -p cellgate -p cell-agent -p routing-rules)
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
    head -c 48 /dev/urandom | base64 > "$WORK/secret"
    local A B AI BI
    A=$(free_port); AI=$(free_port); B=$(free_port); BI=$(free_port)
    GW=$(free_port); ADMIN=$(free_port)
    mkdir -p "$WORK/a" "$WORK/b"
    cat > "$WORK/rules.toml" <<RULES
revision = 1
slots = 16384
[cells.cell-a]
blue = ["127.0.0.1:$A"]
internal = ["127.0.0.1:$AI"]
standby = "cell-b"
[cells.cell-b]
blue = ["127.0.0.1:$B"]
internal = ["127.0.0.1:$BI"]
[[ranges]]
from = 0
to = 8191
cell = "cell-a"
[[ranges]]
from = 8192
to = 16383
cell = "cell-b"
RULES
    start_agent cell-b "$WORK/b" "$B" "$BI"
    start_agent cell-a "$WORK/a" "$A" "$AI"
    A_PID=${PIDS[-1]}
}

# start_agent CELL DIR PORT INTERNAL_PORT: a journaled agent on the rules.
start_agent() {
    CELL_AGENT_LOG=warn "$BIN/cell-agent" serve --cell "$1" --colour blue --db "$2/$1.db" \
        --replica-dir "$2" --journal --rules "$WORK/rules.toml" --reload-interval-ms 50 \
        --listen "127.0.0.1:$3" --internal-listen "127.0.0.1:$4" \
        --internal-secret-file "$WORK/secret" >/dev/null 2>"$2/agent.log" &
    PIDS+=($!)
    wait_port "$3"
}
