#!/usr/bin/env bash
# Compares examples/kv (a Redis-protocol store on the preforkd library, two workers) with a
# real redis-server (one thread) on loopback, with redis-benchmark, the servers taking turns
# round by round so drift hits both alike; prints a markdown table of each one's median
# requests per second and the ratio, and each one's CPU time per request (user + system,
# every process of the server, from /proc: less sensitive to a busy machine than the rates)
# (see BENCHMARKS.md).
#
# Usage: bench/redis.sh [ROUNDS]        (default 3)
# Environment: REQUESTS (default 200000), CLIENTS (50), TESTS (ping,set,get), WORKERS (2),
#   BACKEND (epoll); SYSCALLS=1 also counts each server's system calls per request with
#   strace -c over one more run of every test (load-independent, unlike the rates).
# Needs redis-server, redis-benchmark (Debian: redis-server, redis-tools) and jq; strace for
# SYSCALLS=1. Starts its own redis-server in a temporary directory (--save "" --appendonly
# no) on a free port, and kv on a port the kernel picks; stops both, by pid, at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=${1:-3}
requests=${REQUESTS:-200000}
clients=${CLIENTS:-50}
tests=${TESTS:-ping,set,get}
workers=${WORKERS:-2}
backend=${BACKEND:-epoll}

need=(redis-server redis-benchmark jq python3)
[ "${SYSCALLS:-0}" = 1 ] && need+=(strace)
for tool in "${need[@]}"; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 2; }
done
cargo build --release --locked --example kv >&2
kv=target/release/examples/kv

dir=$(mktemp -d)
kv_pid=
redis_pid=
cleanup() {
    for pid in $kv_pid $redis_pid; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in $kv_pid $redis_pid; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
}
trap cleanup EXIT

cat >"$dir/kv.toml" <<EOF
[daemon]
workers = $workers
event_backend = "$backend"
allow_root_workers = true
pid_file = "$dir/kv.pid"
[log]
level = "warn"
access_log = false
[[listener]]
name = "kv"
address = "127.0.0.1:0"
service = "kv"
max_connections_per_client = 0
max_long_connections_per_client = 0
[listener.options]
capacity = 262144
max_key = 64
max_value = 64
EOF
"$kv" run -c "$dir/kv.toml" 2>"$dir/kv.log" &
kv_pid=$!

redis_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no --dir "$dir" \
    --logfile "$dir/redis.log" &
redis_pid=$!

# Bounded waits: 20 s for both to listen.
kv_port=
for _ in $(seq 200); do
    kv_port=$("$kv" status --json -c "$dir/kv.toml" 2>/dev/null \
        | jq -r 'select(all(.workers[]; .state == "ready")) | .listeners[0].address // empty' \
        2>/dev/null | sed 's/.*://' || true)
    if [ -n "$kv_port" ] && redis-cli -p "$redis_port" PING >/dev/null 2>&1; then break; fi
    kv_port=
    kill -0 "$kv_pid" 2>/dev/null || { cat "$dir/kv.log" >&2; exit 1; }
    kill -0 "$redis_pid" 2>/dev/null || { cat "$dir/redis.log" >&2; exit 1; }
    sleep 0.1
done
[ -n "$kv_port" ] || { echo "the servers did not come up" >&2; exit 1; }

# One redis-benchmark run against PORT: "TEST RPS" lines.
run() {
    redis-benchmark -h 127.0.0.1 -p "$1" -t "$tests" -c "$clients" -n "$requests" --csv 2>/dev/null \
        | tr -d '"' | awk -F, 'NR > 1 { print $1, $2 }'
}

# CPU time (user + system, clock ticks) of the processes PIDS..., threads included.
ticks() {
    local total=0 pid fields
    for pid in "$@"; do
        fields=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null) || continue
        total=$((total + $(awk '{ print $12 + $13 }' <<<"$fields")))
    done
    echo "$total"
}
hz=$(getconf CLK_TCK)

echo "redis-benchmark -t $tests -c $clients -n $requests, $rounds rounds;" \
    "kv: $workers workers ($backend), redis-server $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'): one thread" >&2
for round in $(seq "$rounds"); do
    order="kv redis"
    [ $((round % 2)) = 0 ] && order="redis kv"
    for server in $order; do
        if [ "$server" = redis ]; then
            port=$redis_port
            pids=$redis_pid
        else
            port=$kv_port
            pids="$kv_pid $("$kv" status --json -c "$dir/kv.toml" | jq -r '.workers[].pid' | tr '\n' ' ')"
        fi
        # shellcheck disable=SC2086 # one pid per word
        before=$(ticks $pids)
        run "$port" | sed "s/^/$server /" >"$dir/run"
        # shellcheck disable=SC2086
        after=$(ticks $pids)
        cat "$dir/run" >>"$dir/results"
        # Microseconds of CPU per request, over every test of the run.
        awk -v s="$server" -v t=$((after - before)) -v hz="$hz" -v n="$requests" \
            'END { printf "%s cpu %.2f\n", s, t * 1e6 / hz / (n * NR) }' "$dir/run" >>"$dir/results"
        echo "round $round: $server done" >&2
    done
done

# Median of each (server, test) over the rounds, and kv / redis.
echo "| test | kv (req/s) | redis-server (req/s) | kv / redis |"
echo "|---|---:|---:|---:|"
# The median of SERVER's figures for $test over the rounds.
median() {
    awk -v s="$1" -v t="$test" '$1 == s && $2 == t { print $3 }' "$dir/results" | sort -g \
        | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
for test in $(awk '$2 != "cpu" { print $2 }' "$dir/results" | awk '!seen[$0]++'); do
    kv_rps=$(median kv)
    redis_rps=$(median redis)
    ratio=$(awk -v a="$kv_rps" -v b="$redis_rps" 'BEGIN { printf "%.2f", (b > 0 ? a / b : 0) }')
    printf '| %s | %.0f | %.0f | %sx |\n' "$test" "$kv_rps" "$redis_rps" "$ratio"
done
test=cpu
echo
echo "CPU per request (median of the rounds, every test together): kv $(median kv) µs" \
    "(master and $workers workers), redis-server $(median redis) µs"

if [ "${SYSCALLS:-0}" = 1 ]; then
    # System calls per request: every process of each server (kv's master and workers,
    # redis-server's threads) under strace -c for one run of every test.
    count() {
        local name=$1 port=$2
        shift 2
        local attach=()
        for pid in "$@"; do attach+=(-p "$pid"); done
        strace -c -f "${attach[@]}" -o "$dir/strace.$name" 2>/dev/null &
        local tracer=$!
        sleep 1 # strace attaches
        local runs
        runs=$(run "$port" | wc -l)
        kill -INT "$tracer"
        wait "$tracer" 2>/dev/null || true
        awk -v r="$((requests * runs))" -v n="$name" '$NF == "total" {
            printf "%s: %d system calls for %d requests, %.2f per request\n", n, $(NF - 2), r, $(NF - 2) / r
        }' "$dir/strace.$name"
    }
    # shellcheck disable=SC2046 # one pid per word
    count kv "$kv_port" "$kv_pid" $("$kv" status --json -c "$dir/kv.toml" | jq -r '.workers[].pid')
    count redis-server "$redis_port" "$redis_pid"
fi
