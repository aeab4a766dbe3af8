#!/usr/bin/env bash
# scripts/fuzz.sh - build the libFuzzer targets of tests/fuzz and fuzz each
# for a bounded time.
#
# Configures a clang build with -DP11KMS_FUZZ=ON (ASan + UBSan + libFuzzer)
# in build-fuzz/ (or $P11KMS_FUZZ_BUILD), then runs every target for the
# given seconds (default 30) on a COPY of its seed corpus
# (tests/fuzz/corpus/<target>/, never grown by a run) with its dictionary.
# Fails if any target finds a crash, a leak, undefined behaviour, a timeout
# or runs out of memory; the input is kept in build-fuzz/artifacts/ and
# the log tail printed.  Prints executions per target.
#
#   scripts/fuzz.sh                  # 30 s per target
#   scripts/fuzz.sh 600              # 10 minutes per target
#   scripts/fuzz.sh 60 fuzz_sealed   # some targets only
# Reproduce a finding: build-fuzz/tests/fuzz/<target> build-fuzz/artifacts/<file>
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_TARGET="${1:-30}"
if [[ $# -gt 0 ]]; then shift; fi
if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || [[ "$SECONDS_PER_TARGET" -lt 1 ]]; then
  echo "fuzz.sh: seconds per target must be a positive integer, not '$SECONDS_PER_TARGET'" >&2
  exit 2
fi
ALL_TARGETS=(fuzz_http_request fuzz_json_body fuzz_context fuzz_config fuzz_policy fuzz_sealed)
TARGETS=("${ALL_TARGETS[@]}")
if [[ $# -gt 0 ]]; then TARGETS=("$@"); fi
BUILD="${P11KMS_FUZZ_BUILD:-$ROOT/build-fuzz}"
ARTIFACTS="$BUILD/artifacts"

# Longest input per target: enough to pass the parsers' own limits
# (16 KiB heads are refused at 4 KiB in the harness; contexts at 8 KiB).
max_len() {
  case "$1" in
    fuzz_http_request) echo 9000 ;;
    fuzz_context) echo 12000 ;;
    fuzz_config | fuzz_policy) echo 8192 ;;
    *) echo 4096 ;;
  esac
}

command -v clang >/dev/null || { echo "fuzz.sh: clang not found (scripts/deps.sh test)" >&2; exit 1; }
echo "== fuzz.sh: configure and build $BUILD"
cmake -S "$ROOT" -B "$BUILD" -DCMAKE_C_COMPILER=clang -DP11KMS_FUZZ=ON -DBUILD_TESTING=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
if ! cmake --build "$BUILD" --target fuzz -j"$(nproc)" >"$BUILD/fuzz-build.log" 2>&1; then
  tail -40 "$BUILD/fuzz-build.log" >&2
  echo "fuzz.sh: build failed" >&2
  exit 1
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/p11kms-fuzz.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$ARTIFACTS"
# abort_on_error: a finding ends the run with a non-zero status; leaks are
# findings too (libFuzzer's -detect_leaks defaults to on under ASan).
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export P11KMS_DEBUG=""

failed=0
total=0
summary=()
for t in "${TARGETS[@]}"; do
  bin="$BUILD/tests/fuzz/$t"
  [[ -x "$bin" ]] || { echo "fuzz.sh: no target $t" >&2; exit 2; }
  mkdir -p "$WORK/corpus/$t"
  cp -r "$ROOT/tests/fuzz/corpus/$t/." "$WORK/corpus/$t/"
  args=(-max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=10
        -max_len="$(max_len "$t")" -print_final_stats=1 -artifact_prefix="$ARTIFACTS/$t-")
  if [[ -f "$ROOT/tests/fuzz/dict/$t.dict" ]]; then
    args+=(-dict="$ROOT/tests/fuzz/dict/$t.dict")
  fi
  log="$WORK/$t.log"
  echo "== fuzz.sh: $t for ${SECONDS_PER_TARGET} s"
  rc=0
  "$bin" "${args[@]}" "$WORK/corpus/$t" >"$log" 2>&1 || rc=$?
  execs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -1)"
  execs="${execs:-0}"
  if [[ "$rc" != 0 ]] || grep -qE 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer)|runtime error:|SUMMARY: UndefinedBehaviorSanitizer|invariant broken' "$log"; then
    echo "fuzz.sh: $t FAILED (exit $rc); log tail:" >&2
    tail -60 "$log" >&2
    ls -l "$ARTIFACTS" | grep -F "$t-" >&2 || true
    failed=1
    summary+=("$(printf '%-20s %12s executions  FAILED' "$t" "$execs")")
  else
    summary+=("$(printf '%-20s %12s executions  ok' "$t" "$execs")")
  fi
  total=$((total + execs))
done

echo "== fuzz.sh: ${SECONDS_PER_TARGET} s per target"
printf '%s\n' "${summary[@]}"
printf '%-20s %12s executions\n' "total" "$total"
if [[ "$failed" != 0 ]]; then
  echo "fuzz.sh: findings above; inputs in $ARTIFACTS" >&2
  exit 1
fi
