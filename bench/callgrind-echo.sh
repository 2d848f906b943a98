#!/usr/bin/env bash
# Counts the user-space instructions one preforkd worker spends on the echo hot path, under
# callgrind: load-independent, so it can compare two binaries on a busy machine (wall-clock
# figures cannot; see BENCHMARKS.md).
#
# Usage: bench/callgrind-echo.sh [PREFORKD] [BACKEND]
#   PREFORKD  the daemon binary to measure (default target/release/preforkd)
#   BACKEND   event_backend: select (default), poll or epoll
# Environment: SMALL, LARGE, SHORT override the work (default 20000, 2000, 2000); KEEP=1
# keeps the temporary directory (callgrind files, log) and prints its path.
#
# One worker (`workers = 1`) on 127.0.0.1 port 0 (the bound address is read from the
# daemon's log line "listening on"; readiness from `status --json`). The client,
# `preforkd-bench exchanges` (this tree's release build), does SMALL exchanges of 64 B and
# LARGE of 16 KiB on two connections, then SHORT connections of one 64 B exchange each, and
# verifies every byte. The daemon is stopped with SIGTERM; valgrind follows the fork, so the
# worker writes its own callgrind file, named by its pid.
#
# Prints the worker's total instructions (Ir), its readiness events, and instructions per
# event. Readiness events are counted from calls the loop makes whatever its code: every
# session callback (`on_readable`, `on_writable` of the echo session) plus every listener
# event (calls to accept4(2) less the connections accepted: each listener event ends with
# one accept4 that finds the queue empty). Bounded: every step has a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."

preforkd=$(realpath "${1:-target/release/preforkd}")
backend=${2:-select}
small=${SMALL:-20000}
large=${LARGE:-2000}
short=${SHORT:-2000}
bench=target/release/preforkd-bench

for tool in valgrind callgrind_annotate jq; do
    command -v "$tool" >/dev/null || { echo "$tool is not installed" >&2; exit 2; }
done
[ -x "$bench" ] || cargo build --release --locked -p preforkd-bench >&2

dir=$(mktemp -d)
daemon=
cleanup() {
    if [ -n "$daemon" ] && kill -0 "$daemon" 2>/dev/null; then
        kill -KILL "$daemon" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $dir" >&2; else rm -rf "$dir"; fi
}
trap cleanup EXIT

cat >"$dir/preforkd.toml" <<EOF
[daemon]
workers = 1
event_backend = "$backend"
allow_root_workers = true
pid_file = "$dir/preforkd.pid"
# Valgrind is slow: no heartbeat kill while it runs.
worker_timeout = "0s"
[log]
level = "info"
access_log = false
[[listener]]
name = "echo"
address = "127.0.0.1:0"
service = "echo"
EOF

valgrind --tool=callgrind --trace-children=yes --compress-strings=no --compress-pos=no \
    --callgrind-out-file="$dir/callgrind.%p" \
    "$preforkd" run -c "$dir/preforkd.toml" 2>"$dir/log" &
daemon=$!

# Bounded waits: 120 s for valgrind to start the master and its worker.
addr=
worker=
for _ in $(seq 1200); do
    if [ -z "$addr" ]; then
        addr=$(sed -n 's/.* listening on \([0-9.]*:[0-9]*\).*/\1/p' "$dir/log" | head -n 1)
    fi
    if [ -n "$addr" ]; then
        worker=$("$preforkd" status --json -c "$dir/preforkd.toml" 2>/dev/null \
            | jq -r '.workers[] | select(.state == "ready") | .pid' 2>/dev/null | head -n 1 || true)
        [ -n "$worker" ] && break
    fi
    kill -0 "$daemon" 2>/dev/null || { cat "$dir/log" >&2; exit 1; }
    sleep 0.1
done
if [ -z "$worker" ]; then
    echo "the daemon did not become ready" >&2
    cat "$dir/log" >&2
    exit 1
fi

"$bench" exchanges --addr "$addr" --small "$small" --large "$large" --short "$short" >&2

kill -TERM "$daemon"
for _ in $(seq 600); do
    kill -0 "$daemon" 2>/dev/null || break
    sleep 0.1
done
wait "$daemon" 2>/dev/null || true
daemon=
out="$dir/callgrind.$worker"
[ -s "$out" ] || { echo "no callgrind file for worker $worker" >&2; exit 1; }

# Calls to functions whose name matches the pattern, summed over every call site.
calls() {
    awk -v pattern="$1" '
        /^cfn=/ { hit = ($0 ~ pattern) }
        /^calls=/ { if (hit) { split(substr($0, 7), f, " "); total += f[1] } hit = 0 }
        END { print total + 0 }' "$out"
}

# Inclusive instructions per function name, from the raw file: every cost line in a
# function's blocks is either its own cost or, right after a `calls=` line, the inclusive cost
# of that call. (callgrind_annotate splits a function by source file, and the same file may
# be named two ways, so its per-file figures cannot simply be added.)
awk '
    /^fn=/ { fn = substr($0, 4); next }
    /^calls=/ { next }
    /^[0-9+-]/ { cost[fn] += $2; next }
    END { for (f in cost) printf "%s\t%s\n", cost[f], f }' "$out" >"$dir/inclusive"
# Summed inclusive cost of the functions whose name matches the pattern.
cost() {
    awk -F '\t' -v pattern="$1" '$2 ~ pattern { total += $1 } END { print total + 0 }' \
        "$dir/inclusive"
}

worker_ir=$(cost '^preforkd::worker::run$')
wait_ir=$(cost 'as preforkd::poller::Poller>::wait$')
callback_ir=$(cost 'EchoSession as preforkd::services::Session>::on_(readable|writable)$')
callbacks=$(calls 'EchoSession as preforkd::services::Session>::on_(readable|writable)$')
accepts=$(calls '^cfn=(accept4|__libc_accept4)$')
connections=$((short + 2))
events=$((callbacks + accepts - connections))
loop_ir=$((worker_ir - wait_ir - callback_ir))
echo "binary:              $preforkd ($backend)"
echo "worker::run Ir:      $worker_ir"
echo "  poller wait:       $wait_ir"
echo "  echo callbacks:    $callback_ir"
echo "  the loop around:   $loop_ir"
echo "session callbacks:   $callbacks"
echo "accept4 calls:       $accepts (connections: $connections)"
echo "readiness events:    $events"
awk -v w="$worker_ir" -v l="$loop_ir" -v e="$events" 'BEGIN {
    printf "Ir per event:        %.0f (the loop around: %.0f)\n", w / e, l / e }'
