#!/usr/bin/env bash
# scripts/deps.sh - install the Debian packages p11kms needs, if missing.
#
# Sourced or run by scripts/up.sh and scripts/test.sh.  Installs only what
# is not installed yet (apt-get as root, or through sudo), so a second run
# costs a dpkg query.  Usage: scripts/deps.sh [build|test]
set -euo pipefail

# What building and running kmsd needs.
BUILD_PACKAGES=(
  gcc make cmake pkg-config ca-certificates
  libp11-kit-dev p11-kit libssl-dev openssl libsqlite3-dev sqlite3 libpq-dev
  libjansson-dev libevent-dev libcurl4-openssl-dev check
  softhsm2 curl procps
)
# What the test suite needs on top: third-party PKCS#11 clients (OpenSC's
# pkcs11-tool, python3-pykcs11), clang for the sanitizer/fuzz builds, and a
# PostgreSQL server for the multi-node tests.
TEST_PACKAGES=(
  opensc python3 python3-pykcs11 clang libclang-rt-dev util-linux
  postgresql
)

want=("${BUILD_PACKAGES[@]}")
if [[ "${1:-build}" == "test" ]]; then
  want+=("${TEST_PACKAGES[@]}")
fi

missing=()
for pkg in "${want[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} == 0)); then
  exit 0
fi

echo "deps: installing ${missing[*]}" >&2
SUDO=""
if [[ "$(id -u)" != "0" ]]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  else
    echo "deps: missing packages (${missing[*]}) and not root; install them and rerun" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
