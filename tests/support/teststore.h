/*
 * tests/support/teststore.h - the store backend a test runs against.
 *
 * The store, core and kmsd suites are one parameterised suite: the
 * environment variable P11KMS_TEST_STORE selects the backend, `sqlite`
 * (default) or `postgres`.  With postgres, P11KMS_TEST_PG_URL is the
 * libpq connection string of a server the tests may create schemas in
 * (scripts/test.sh starts a private one); every ts_db_new makes a fresh,
 * empty schema there and a connection string whose search_path is that
 * schema, so each test starts on an empty database of its own.
 *
 * ctest registers each such test twice: test_x (sqlite) and test_x_pg
 * (P11KMS_TEST_STORE=postgres), the latter skipped (exit 77) when
 * P11KMS_TEST_PG_URL is not set (tests/support/pg_variant.sh).
 *
 * The ts_db_* data helpers read and write rows behind the store's back
 * (corruption tests) on either backend.
 */
#ifndef P11KMS_TESTS_TESTSTORE_H
#define P11KMS_TESTS_TESTSTORE_H

#include <stddef.h>

typedef struct ts_db {
    int pg;             /* 1: postgres */
    char path[512];     /* sqlite: dir/kms.db */
    char schema[64];    /* postgres: the test's schema */
    char url[1024];     /* postgres: connection string with that search_path */
    int shared;         /* a copy (another node's view): ts_db_drop leaves it */
} ts_db;

/* 1 when P11KMS_TEST_STORE=postgres. */
int ts_backend_is_pg(void);

/* "sqlite" or "postgres" (as kms_store_backend names them). */
const char *ts_backend_name(void);

/* A fresh database for one test: sqlite dir/kms.db (not created yet), or
 * a new empty schema on P11KMS_TEST_PG_URL.  0, or -1 with a message. */
int ts_db_new(const char *dir, ts_db *db);

/* Drop the schema (postgres; not for shared copies).  NULL-safe. */
void ts_db_drop(ts_db *db);

/* The [store] section of a kmsd.conf for db (static buffer); SQLite:
 * path = db->path (a test may point it elsewhere, e.g. a small filesystem). */
const char *ts_db_conf(const ts_db *db);

/* Run one SQL statement without results (postgres: in db's schema).
 * 0 or -1 with a message. */
int ts_db_exec(const ts_db *db, const char *sql);

/* The wrapped bytes of DEK id (NULL column: *len = 0).  0 or -1. */
int ts_db_wrapped_get(const ts_db *db, const char *id, unsigned char *out, size_t cap,
                      size_t *len);

/* Overwrite the wrapped bytes of DEK id (exactly one row).  0 or -1. */
int ts_db_wrapped_set(const ts_db *db, const char *id, const unsigned char *w, size_t len);

/* The CKA_ID of key/version from key_versions.  0 or -1. */
int ts_db_token_id(const ts_db *db, const char *key, unsigned version, unsigned char out[16]);

/* Block the store's writer from another connection: SQLite BEGIN
 * IMMEDIATE (the write lock); PostgreSQL a transaction holding every
 * key_versions row FOR UPDATE (every DEK insert waits on it, up to the
 * writer's lock_timeout).  NULL on error.  ts_db_unlock_writes rolls it
 * back and closes. */
void *ts_db_lock_writes(const ts_db *db);
void ts_db_unlock_writes(const ts_db *db, void *lock);

/* SQLite: PRAGMA integrity_check is "ok"; PostgreSQL: always 1 (the
 * server guarantees it).  1 or 0. */
int ts_db_integrity_ok(const ts_db *db);

/* One integer from a one-row, one-column query (postgres: in db's
 * schema); -1 on error. */
long long ts_db_int(const ts_db *db, const char *sql);

#ifdef P11KMS_KMS_STORE_H
/* Open the store of db with the selected backend. */
static inline p11kms_status ts_db_open(const ts_db *db, kms_store **out)
{
    return db->pg ? kms_store_open_postgres(db->url, out) : kms_store_open_sqlite(db->path, out);
}
#endif

#endif
