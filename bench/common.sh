# Shared by bench/proxy.sh and bench/abuse.sh: the cellgate rules over the
# six backend ports, and wrk's random-user script.

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
