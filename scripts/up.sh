#!/usr/bin/env bash
# scripts/up.sh - bring a development p11kms up on this machine.
#
# Installs missing Debian packages, builds into build/, creates (once) a
# SoftHSM2 development token, a PIN file and a SQLite store under
# $P11KMS_STATE_DIR (default ./var), writes a complete kmsd.conf there and
# runs kmsd on $P11KMS_STATE_DIR/kmsd.sock.  Run again on an existing state
# dir, it reuses the token and the store: nothing is lost.
#
#   scripts/up.sh                # kmsd in the foreground (Ctrl-C stops it)
#   scripts/up.sh --background   # returns once kmsd answers /v1/health
#   scripts/up.sh --stop         # stops a background kmsd
set -euo pipefail

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
}

MODE=foreground
for arg in "$@"; do
  case "$arg" in
    --background) MODE=background ;;
    --stop) MODE=stop ;;
    -h|--help) usage; exit 0 ;;
    *) echo "up.sh: unknown argument: $arg (try --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="${P11KMS_STATE_DIR:-$ROOT/var}"
mkdir -p "$STATE"
STATE="$(cd "$STATE" && pwd)"
PIDFILE="$STATE/kmsd.pid"
SOCK="$STATE/kmsd.sock"

stop_running() {
  if [[ -f "$PIDFILE" ]]; then
    local pid
    pid="$(cat "$PIDFILE")"
    if kill -0 "$pid" 2>/dev/null; then
      echo "up.sh: stopping kmsd (pid $pid)" >&2
      kill -TERM "$pid"
      for _ in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
      done
    fi
    rm -f "$PIDFILE"
  fi
}

if [[ "$MODE" == stop ]]; then
  stop_running
  exit 0
fi

"$ROOT/scripts/deps.sh" build

# Build (always into build/ at the repository root).
cmake -S "$ROOT" -B "$ROOT/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$ROOT/build" --target kmsd -j"$(nproc)" >/dev/null
KMSD="$ROOT/build/kmsd"

find_softhsm() {
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so; do
    [[ -r "$m" ]] && { echo "$m"; return 0; }
  done
  echo "up.sh: libsofthsm2.so not found" >&2
  return 1
}
MODULE="$(find_softhsm)"

umask 077
# The development token: created once, reused afterwards.
export SOFTHSM2_CONF="$STATE/softhsm2.conf"
mkdir -p "$STATE/tokens"
if [[ ! -f "$SOFTHSM2_CONF" ]]; then
  sed "s#@TOKENDIR@#$STATE/tokens#" "$ROOT/conf/softhsm2.conf" >"$SOFTHSM2_CONF"
fi
if [[ ! -s "$STATE/pin" ]]; then
  openssl rand -hex 16 >"$STATE/pin"
  openssl rand -hex 16 >"$STATE/so-pin"
  chmod 600 "$STATE/pin" "$STATE/so-pin"
fi
if ! softhsm2-util --show-slots 2>/dev/null | grep -q "Label:.*p11kms-dev"; then
  echo "up.sh: creating the SoftHSM2 development token p11kms-dev" >&2
  # softhsm2-util takes PINs only as arguments or from a terminal; this is
  # the development token, created once on this machine.
  softhsm2-util --init-token --free --label p11kms-dev \
    --pin "$(cat "$STATE/pin")" --so-pin "$(cat "$STATE/so-pin")" >/dev/null
fi

# The policy grants the invoking user (and the sudo caller) everything;
# rewritten on every run (edit it, then `kill -HUP $(cat kmsd.pid)`, or
# keep your own by pointing [policy] file elsewhere).
{
  echo "# Written by scripts/up.sh: the invoking user may do everything (docs/operations.md)."
  echo "allow uid:$(id -u) generate,decrypt,admin on *"
  if [[ -n "${SUDO_UID:-}" && "${SUDO_UID}" != "$(id -u)" ]]; then
    echo "allow uid:$SUDO_UID generate,decrypt,admin on *"
  fi
} >"$STATE/policy.conf"
chmod 644 "$STATE/policy.conf"

# kmsd.conf is derived from the state dir: rewritten on every run.
cat >"$STATE/kmsd.conf" <<CONF
; Written by scripts/up.sh for the development service in $STATE.
; Start it by hand with: SOFTHSM2_CONF=$SOFTHSM2_CONF $KMSD --config $STATE/kmsd.conf
[token]
module   = $MODULE
uri      = pkcs11:token=p11kms-dev
pin_file = $STATE/pin
softhsm2_conf = $SOFTHSM2_CONF

[store]
backend  = sqlite
path     = $STATE/kms.db

[listen]
unix     = $SOCK

[policy]
file     = $STATE/policy.conf
CONF

stop_running

if [[ "$MODE" == foreground ]]; then
  echo "up.sh: kmsd on $SOCK (Ctrl-C stops it)" >&2
  exec "$KMSD" --config "$STATE/kmsd.conf"
fi

nohup "$KMSD" --config "$STATE/kmsd.conf" >>"$STATE/kmsd.log" 2>&1 </dev/null &
echo $! >"$PIDFILE"
for _ in $(seq 1 300); do
  if curl -fsS --unix-socket "$SOCK" http://kms/v1/health >/dev/null 2>&1; then
    echo "up.sh: kmsd is up (pid $(cat "$PIDFILE")) on $SOCK; log in $STATE/kmsd.log" >&2
    exit 0
  fi
  if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "up.sh: kmsd exited; last log lines:" >&2
    tail -n 20 "$STATE/kmsd.log" >&2
    exit 1
  fi
  sleep 0.1
done
echo "up.sh: kmsd did not answer /v1/health within 30 s; see $STATE/kmsd.log" >&2
exit 1
