#!/usr/bin/env bash
# scripts/bench.sh - build p11kms in Release and run the benchmark suite.
#
# Installs missing Debian packages (scripts/deps.sh, nothing else), builds
# the Release configuration in build-bench/ (kmsd, libp11shim.so and
# tests/bench/p11kms_bench), runs every benchmark against private SoftHSM2
# tokens in a temp dir, prints the table and writes the JSON to
# $P11KMS_BENCH_OUT (default bench-results.json).  Method and figures:
# docs/performance.md.  Takes about 2 minutes on 2 cores.
#
#   scripts/bench.sh                       # everything, 3 s per measured run
#   P11KMS_BENCH_SECONDS=5 scripts/bench.sh
#   scripts/bench.sh --only http,slow      # any p11kms_bench option
set -euo pipefail

case "${1:-}" in
  -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="$ROOT/build-bench"
OUT="${P11KMS_BENCH_OUT:-bench-results.json}"
SECONDS_PER_RUN="${P11KMS_BENCH_SECONDS:-3}"

"$ROOT/scripts/deps.sh" build

echo "== bench.sh: configure and build $BUILD (Release)" >&2
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target p11kms_bench >/dev/null

# Tokens, stores and sockets live here; removed at the end whatever happens.
BENCH_TMP="$(mktemp -d /tmp/p11kms-bench.XXXXXX)"
trap 'rm -rf "$BENCH_TMP"' EXIT

echo "== bench.sh: run ($SECONDS_PER_RUN s per measured run; progress on stderr)" >&2
TMPDIR="$BENCH_TMP" "$BUILD/tests/bench/p11kms_bench" \
  --seconds "$SECONDS_PER_RUN" --out "$OUT" "$@"
