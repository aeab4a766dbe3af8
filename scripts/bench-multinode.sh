#!/usr/bin/env bash
# scripts/bench-multinode.sh - datakey throughput of kmsd on SQLite, and of
# one and two kmsd nodes sharing one PostgreSQL database (issue 9).
#
# Builds build-bench/ (Release: kmsd and tests/bench/p11kms_bench), makes a
# SoftHSM2 token and a private PostgreSQL server (scripts/pg-test-server.sh)
# in a temp dir, and runs the load generator (`p11kms_bench --socket`, 32
# keep-alive clients, spread over the nodes) against: one node on SQLite;
# one node on PostgreSQL; two nodes on PostgreSQL (same token, same
# database).  Everything runs on this machine, so the nodes, the database
# and the load generator share its cores: see docs/operations.md.
#
#   scripts/bench-multinode.sh                # 5 s per run
#   P11KMS_BENCH_SECONDS=10 scripts/bench-multinode.sh
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${P11KMS_BENCH_BUILD:-$ROOT/build-bench}"
SECS="${P11KMS_BENCH_SECONDS:-5}"
CLIENTS="${P11KMS_BENCH_CLIENTS:-32}"

"$ROOT/scripts/deps.sh" test
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target p11kms_bench kmsd >/dev/null

T="$(mktemp -d /tmp/p11kms-bench-mn.XXXXXX)"
chmod 0711 "$T"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$ROOT/scripts/pg-test-server.sh" stop "$T/pg" 2>/dev/null || true
  rm -rf "$T"
}
trap cleanup EXIT

module="$(ls /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so 2>/dev/null | head -1)"
mkdir -p "$T/tokens"
printf 'directories.tokendir = %s/tokens\nobjectstore.backend = file\nlog.level = ERROR\n' "$T" \
  >"$T/softhsm2.conf"
export SOFTHSM2_CONF="$T/softhsm2.conf"
softhsm2-util --init-token --free --label p11kms-bench --pin 1234 --so-pin 12345678 >/dev/null
url="$("$ROOT/scripts/pg-test-server.sh" start "$T/pg")"

# node DIR STORE-SECTION: write DIR/kmsd.conf and start kmsd in the background.
node() {
  local dir="$1" store="$2"
  mkdir -p "$dir"
  printf '1234\n' >"$dir/pin"
  chmod 0600 "$dir/pin"
  cat >"$dir/kmsd.conf" <<EOF
[token]
module   = $module
uri      = pkcs11:token=p11kms-bench
pin_file = pin
sessions = 32
$store
[listen]
unix = kmsd.sock
[server]
threads = 2
workers = 32
queue   = 1024
EOF
  "$BUILD/kmsd" --config "$dir/kmsd.conf" 2>"$dir/kmsd.log" &
  pids+=($!)
  for _ in $(seq 1 300); do
    [[ -S "$dir/kmsd.sock" ]] && curl -sf --unix-socket "$dir/kmsd.sock" http://kmsd/v1/health \
      >/dev/null && return 0
    sleep 0.1
  done
  cat "$dir/kmsd.log" >&2
  return 1
}

stop_nodes() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  pids=()
}

run() {
  local what="$1" socks="$2"
  echo "== $what" >&2
  "$BUILD/tests/bench/p11kms_bench" --seconds "$SECS" --clients "$CLIENTS" --socket "$socks" \
    --out "$T/$what.json" 2>&1 | grep -E 'bench: external|errors, first' >&2 || true
}

node "$T/sqlite" "[store]
backend = sqlite
path    = kms.db"
run sqlite "$T/sqlite/kmsd.sock"
stop_nodes

node "$T/pg1" "[store]
backend = postgres
url     = $url"
run postgres-1-node "$T/pg1/kmsd.sock"
stop_nodes

node "$T/pg2a" "[store]
backend = postgres
url     = $url"
node "$T/pg2b" "[store]
backend = postgres
url     = $url"
run postgres-2-nodes "$T/pg2a/kmsd.sock,$T/pg2b/kmsd.sock"
stop_nodes
