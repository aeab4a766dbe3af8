#!/bin/sh
# tests/support/pg_variant.sh - run a test program against the PostgreSQL
# store (the *_pg variants in ctest): P11KMS_TEST_STORE=postgres, and a
# skip (exit 77, ctest SKIP_RETURN_CODE) when no server is configured, so
# a developer without PostgreSQL still gets a green run.  scripts/test.sh
# always starts one and sets P11KMS_TEST_PG_URL.
if [ -z "${P11KMS_TEST_PG_URL:-}" ]; then
  echo "skipped: P11KMS_TEST_PG_URL is not set (scripts/test.sh starts a private PostgreSQL)"
  exit 77
fi
P11KMS_TEST_STORE=postgres
export P11KMS_TEST_STORE
exec "$@"
