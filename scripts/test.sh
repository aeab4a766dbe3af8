#!/usr/bin/env bash
# scripts/test.sh - build p11kms and run every test through ctest.
#
# Installs missing Debian packages, builds a release configuration in
# build/ and an AddressSanitizer + UndefinedBehaviorSanitizer configuration
# in build-asan/, and runs the whole ctest suite in both, then fuzzes each
# libFuzzer target for a bounded time (scripts/fuzz.sh).  Each test starts
# its own SoftHSM2 token in a temp dir.  Fails on the first failing suite.
#
#   scripts/test.sh           # what CI runs (.ci/run)
#   scripts/test.sh --long    # also the long runs (extended fuzzing, soak)
#   scripts/test.sh --quick   # the release build only, no sanitizers
set -euo pipefail

LONG=0
QUICK=0
for arg in "$@"; do
  case "$arg" in
    --long) LONG=1 ;;
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "test.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
JOBS="$(nproc)"
start=$(date +%s)

"$ROOT/scripts/deps.sh" test

export P11KMS_TEST_LONG="$LONG"
# Tests make temp dirs here; removed at the end whatever happens.
TEST_TMP="$(mktemp -d /tmp/p11kms-tests.XXXXXX)"
export TMPDIR="$TEST_TMP"
# A private PostgreSQL server for the *_pg tests (Unix socket only, in
# TEST_TMP; scripts/pg-test-server.sh), stopped at the end.  As root it
# runs as the `postgres` user, which must be able to reach TEST_TMP.
chmod 0711 "$TEST_TMP"
PG_DIR="$TEST_TMP/pg"
cleanup() {
  "$ROOT/scripts/pg-test-server.sh" stop "$PG_DIR" 2>/dev/null || true
  rm -rf "$TEST_TMP"
}
trap cleanup EXIT
echo "== test.sh: start a private PostgreSQL in $PG_DIR"
P11KMS_TEST_PG_URL="$("$ROOT/scripts/pg-test-server.sh" start "$PG_DIR")"
export P11KMS_TEST_PG_URL

run_suite() {
  local dir="$1"; shift
  echo "== test.sh: configure $dir ($*)"
  cmake -S "$ROOT" -B "$ROOT/$dir" "$@" >/dev/null
  echo "== test.sh: build $dir"
  cmake --build "$ROOT/$dir" -j"$JOBS" 2>&1 | grep -Ev '^\[ *[0-9]+%\]|^-- ' || true
  cmake --build "$ROOT/$dir" -j"$JOBS" >/dev/null
  echo "== test.sh: ctest $dir"
  (cd "$ROOT/$dir" && ctest --output-on-failure -j"$JOBS" --timeout 900) | tee "$TEST_TMP/ctest.log"
  local n
  n="$(sed -n 's/.*tests passed, 0 tests failed out of \([0-9]*\).*/\1/p' "$TEST_TMP/ctest.log")"
  PASSED=$((PASSED + ${n:-0}))
}
PASSED=0

run_suite build -DCMAKE_BUILD_TYPE=RelWithDebInfo
if [[ "$QUICK" == 0 ]]; then
  # detect_leaks stays on; SoftHSM2's own leaks are suppressed in
  # tests/lsan.supp, each with its reason.
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:strict_string_checks=1"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
  run_suite build-asan -DCMAKE_BUILD_TYPE=Debug -DP11KMS_SANITIZE=ON
  # libFuzzer targets (tests/fuzz, clang): about 30 s each in CI, 10
  # minutes each with --long; any crash, leak or UB fails the run.
  FUZZ_SECONDS=30
  if [[ "$LONG" == 1 ]]; then FUZZ_SECONDS=600; fi
  echo "== test.sh: fuzz ($FUZZ_SECONDS s per target)"
  "$ROOT/scripts/fuzz.sh" "$FUZZ_SECONDS"
fi

echo "== test.sh: all suites passed in $(( $(date +%s) - start )) s"
# The one closing line CI reads: ctest runs in every build, fuzzing above.
echo "tests: $PASSED passed, 0 failed"
