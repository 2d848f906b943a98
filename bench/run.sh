#!/usr/bin/env bash
# Benchmarks preforkd against xinetd, tcpserver + cat, socat fork and a tokio echo server,
# all on loopback, and prints a markdown report (see BENCHMARKS.md).
# Usage: bench/run.sh [--seconds 5] [--short-clients 32] [--idle 10000] [--only preforkd,tokio]
# Needs the peers installed (Debian: apt-get install xinetd ucspi-tcp socat); missing ones
# are skipped. Takes about 6 minutes with the defaults.
# TFTP against tftpd-hpa: target/release/preforkd-bench tftp (see BENCHMARKS.md).
# Hand-off of relayed connections on a reload: target/release/preforkd-bench handoff [--splice].
# TLS against HAProxy, nginx stream and stunnel4: target/release/preforkd-bench tls.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p preforkd -p preforkd-bench >&2
exec target/release/preforkd-bench run "$@"
