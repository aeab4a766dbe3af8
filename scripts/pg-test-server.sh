#!/usr/bin/env bash
# scripts/pg-test-server.sh - a private PostgreSQL server for the tests.
#
#   scripts/pg-test-server.sh start DIR   # initdb DIR/data, start, print the URL
#   scripts/pg-test-server.sh stop DIR    # stop it (fast shutdown), keep DIR
#   scripts/pg-test-server.sh resume DIR  # start a stopped one again (same data)
#
# The server listens on a Unix socket in DIR only (listen_addresses = ''),
# with fsync on and synchronous_commit on (the store's durability promise
# is tested against a real one), trust authentication for its one role
# (the socket is in a private directory), and a UTF-8 database `p11kms`.
# PostgreSQL refuses to run as root: as root, DIR is handed to the
# `postgres` system user (created by the Debian package) and the server
# runs as that user through runuser.  `start` prints the libpq connection
# string for P11KMS_TEST_PG_URL on stdout; everything else goes to stderr.
set -euo pipefail

cmd="${1:-}"
dir="${2:-}"
if [[ -z "$cmd" || -z "$dir" ]]; then
  echo "usage: $0 start|stop|resume DIR" >&2
  exit 2
fi

bindir=""
for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
  if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then
    bindir="$d"
    break
  fi
done
if [[ -z "$bindir" ]]; then
  echo "pg-test-server: no PostgreSQL server binaries in /usr/lib/postgresql/*/bin" >&2
  exit 1
fi

as_owner=()
role="$(id -un)"
if [[ "$(id -u)" == "0" ]]; then
  as_owner=(runuser -u postgres --)
  role="postgres"
fi
data="$dir/data"

case "$cmd" in
  start)
    mkdir -p "$dir"
    if [[ "$(id -u)" == "0" ]]; then
      chown postgres: "$dir"
      chmod 0711 "$(dirname "$dir")" 2>/dev/null || true
    fi
    chmod 0700 "$dir"
    "${as_owner[@]}" "$bindir/initdb" -D "$data" -U "$role" --auth=trust -E UTF8 \
      --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 ||
      { cat "$dir/initdb.log" >&2; exit 1; }
    cat >>"$data/postgresql.conf" <<EOF
# scripts/pg-test-server.sh: private test server
listen_addresses = ''
unix_socket_directories = '$dir'
unix_socket_permissions = 0777
fsync = on
synchronous_commit = on
full_page_writes = on
max_connections = 300
shared_buffers = 64MB
EOF
    "${as_owner[@]}" "$bindir/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 start >&2 ||
      { cat "$dir/server.log" >&2; exit 1; }
    "${as_owner[@]}" "$bindir/psql" -h "$dir" -U "$role" -d postgres -qAt \
      -c "CREATE DATABASE p11kms" >&2
    # Everyone may reach the socket (the tests run as root or as the user).
    chmod 0755 "$dir"
    echo "host=$dir dbname=p11kms user=$role"
    ;;
  stop)
    if [[ -f "$data/postmaster.pid" ]]; then
      "${as_owner[@]}" "$bindir/pg_ctl" -D "$data" -m fast -w -t 60 stop >&2 || true
    fi
    ;;
  resume)
    "${as_owner[@]}" "$bindir/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 start >&2
    ;;
  *)
    echo "usage: $0 start|stop|resume DIR" >&2
    exit 2
    ;;
esac
