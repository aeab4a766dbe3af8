/*
 * kms/store/pg_internal.h - what the PostgreSQL backend's files share
 * (postgres.c, pg_migrations.c); not for callers of the store.
 */
#ifndef P11KMS_KMS_STORE_PG_INTERNAL_H
#define P11KMS_KMS_STORE_PG_INTERNAL_H

#include <libpq-fe.h>

#include "kms/store/store_internal.h"

/* The schema version this binary writes (the last PostgreSQL migration;
 * the same numbers and the same tables as the SQLite migrations). */
int kms_pg_schema_latest(void);

/* Apply every pending migration on conn (a connection outside any
 * transaction), each in its own transaction holding the schema advisory
 * lock (pg_advisory_xact_lock), re-reading schema_version under it, so
 * nodes starting at the same moment on an empty database apply each
 * migration exactly once.  P11KMS_ERR_STORE_UNAVAILABLE when a migration
 * fails or the database is newer than this binary. */
p11kms_status kms_pg_migrate(PGconn *conn);

/* Log a failed libpq result (or connection) with its SQLSTATE. */
void kms_pg_log_error(PGconn *conn, const PGresult *res, const char *what, const char *file,
                      int line, const char *func);
#define KMS_PG_LOG(conn, res, what) kms_pg_log_error((conn), (res), (what), __FILE__, __LINE__, __func__)

#endif
