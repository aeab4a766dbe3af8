/*
 * tests/support/teststore.c - the store backend a test runs against
 * (teststore.h): fresh SQLite paths or fresh PostgreSQL schemas, and
 * row-level helpers on either backend.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "teststore.h"

#include <libpq-fe.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int ts_backend_is_pg(void)
{
    const char *b = getenv("P11KMS_TEST_STORE");

    return b != NULL && strcmp(b, "postgres") == 0;
}

const char *ts_backend_name(void)
{
    return ts_backend_is_pg() ? "postgres" : "sqlite";
}

static PGconn *pg_connect(const char *url)
{
    PGconn *c = PQconnectdb(url);

    if (PQstatus(c) != CONNECTION_OK) {
        fprintf(stderr, "teststore: cannot connect to %s: %s", url, PQerrorMessage(c));
        PQfinish(c);
        return NULL;
    }
    PQclear(PQexec(c, "SET client_min_messages = warning"));
    return c;
}

static int pg_exec(const char *url, const char *sql)
{
    PGconn *c = pg_connect(url);
    PGresult *r;
    int rv = -1;

    if (c == NULL)
        return -1;
    r = PQexec(c, sql);
    if (PQresultStatus(r) == PGRES_COMMAND_OK || PQresultStatus(r) == PGRES_TUPLES_OK)
        rv = 0;
    else
        fprintf(stderr, "teststore: %s: %s", sql, PQresultErrorMessage(r));
    PQclear(r);
    PQfinish(c);
    return rv;
}

int ts_db_new(const char *dir, ts_db *db)
{
    static unsigned counter;
    const char *base = getenv("P11KMS_TEST_PG_URL");
    char sql[128];
    int uri;

    memset(db, 0, sizeof(*db));
    snprintf(db->path, sizeof(db->path), "%s/kms.db", dir);
    if (!ts_backend_is_pg())
        return 0;
    db->pg = 1;
    if (base == NULL || *base == '\0') {
        fprintf(stderr, "teststore: P11KMS_TEST_STORE=postgres but P11KMS_TEST_PG_URL is unset\n");
        return -1;
    }
    srand((unsigned)time(NULL) ^ (unsigned)getpid());
    snprintf(db->schema, sizeof(db->schema), "t_%d_%u_%u", (int)getpid(), ++counter,
             (unsigned)rand() % 100000u);
    uri = strncmp(base, "postgres://", 11) == 0 || strncmp(base, "postgresql://", 13) == 0;
    if (uri)
        snprintf(db->url, sizeof(db->url), "%s%soptions=-csearch_path%%3D%s", base,
                 strchr(base, '?') != NULL ? "&" : "?", db->schema);
    else
        snprintf(db->url, sizeof(db->url), "%s options=-csearch_path=%s", base, db->schema);
    snprintf(sql, sizeof(sql), "CREATE SCHEMA %s", db->schema);
    return pg_exec(base, sql);
}

void ts_db_drop(ts_db *db)
{
    char sql[128];

    if (db == NULL || !db->pg || db->shared || db->schema[0] == '\0' ||
        getenv("P11KMS_KEEP_TEST_DIRS") != NULL)
        return;
    snprintf(sql, sizeof(sql), "DROP SCHEMA IF EXISTS %s CASCADE", db->schema);
    pg_exec(getenv("P11KMS_TEST_PG_URL"), sql);
    db->schema[0] = '\0';
}

const char *ts_db_conf(const ts_db *db)
{
    static char conf[1200];

    if (db->pg)
        snprintf(conf, sizeof(conf), "[store]\nbackend = postgres\nurl     = %s\n", db->url);
    else
        snprintf(conf, sizeof(conf), "[store]\nbackend = sqlite\npath    = %s\n", db->path);
    return conf;
}

int ts_db_exec(const ts_db *db, const char *sql)
{
    sqlite3 *s = NULL;
    char *err = NULL;
    int rv = -1;

    if (db->pg)
        return pg_exec(db->url, sql);
    if (sqlite3_open_v2(db->path, &s, SQLITE_OPEN_READWRITE, NULL) == SQLITE_OK) {
        sqlite3_busy_timeout(s, 5000);
        if (sqlite3_exec(s, sql, NULL, NULL, &err) == SQLITE_OK)
            rv = 0;
        else
            fprintf(stderr, "teststore: %s: %s\n", sql, err != NULL ? err : "?");
    }
    sqlite3_free(err);
    sqlite3_close(s);
    return rv;
}

/* One bytea/blob from a query with one text parameter (and an optional
 * integer one). */
static int blob_query(const ts_db *db, const char *sql_pg, const char *sql_lite, const char *p1,
                      long p2, int np, unsigned char *out, size_t cap, size_t *len)
{
    int rv = -1;

    if (db->pg) {
        PGconn *c = pg_connect(db->url);
        char num[24];
        const char *vals[2] = {p1, num};
        PGresult *r;

        if (c == NULL)
            return -1;
        snprintf(num, sizeof(num), "%ld", p2);
        r = PQexecParams(c, sql_pg, np, NULL, vals, NULL, NULL, 1);
        if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1 &&
            (size_t)PQgetlength(r, 0, 0) <= cap) {
            *len = PQgetisnull(r, 0, 0) ? 0 : (size_t)PQgetlength(r, 0, 0);
            memcpy(out, PQgetvalue(r, 0, 0), *len);
            rv = 0;
        } else {
            fprintf(stderr, "teststore: %s: %s", sql_pg, PQresultErrorMessage(r));
        }
        PQclear(r);
        PQfinish(c);
        return rv;
    }
    sqlite3 *s = NULL;
    sqlite3_stmt *q = NULL;

    if (sqlite3_open_v2(db->path, &s, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
        sqlite3_busy_timeout(s, 5000) == SQLITE_OK &&
        sqlite3_prepare_v2(s, sql_lite, -1, &q, NULL) == SQLITE_OK) {
        sqlite3_bind_text(q, 1, p1, -1, SQLITE_STATIC);
        if (np > 1)
            sqlite3_bind_int64(q, 2, p2);
        if (sqlite3_step(q) == SQLITE_ROW && (size_t)sqlite3_column_bytes(q, 0) <= cap) {
            *len = (size_t)sqlite3_column_bytes(q, 0);
            if (*len > 0)
                memcpy(out, sqlite3_column_blob(q, 0), *len);
            rv = 0;
        }
    }
    if (rv != 0)
        fprintf(stderr, "teststore: %s: %s\n", sql_lite, s != NULL ? sqlite3_errmsg(s) : "?");
    sqlite3_finalize(q);
    sqlite3_close(s);
    return rv;
}

int ts_db_wrapped_get(const ts_db *db, const char *id, unsigned char *out, size_t cap,
                      size_t *len)
{
    return blob_query(db, "SELECT wrapped FROM deks WHERE id = $1",
                      "SELECT wrapped FROM deks WHERE id = ?1", id, 0, 1, out, cap, len);
}

int ts_db_token_id(const ts_db *db, const char *key, unsigned version, unsigned char out[16])
{
    size_t len = 0;

    if (blob_query(db,
                   "SELECT v.token_id FROM key_versions v JOIN keys k ON k.id = v.key_id "
                   "WHERE k.name = $1 AND v.version = $2::integer",
                   "SELECT v.token_id FROM key_versions v JOIN keys k ON k.id = v.key_id "
                   "WHERE k.name = ?1 AND v.version = ?2",
                   key, (long)version, 2, out, 16, &len) != 0 ||
        len != 16)
        return -1;
    return 0;
}

int ts_db_wrapped_set(const ts_db *db, const char *id, const unsigned char *w, size_t len)
{
    int rv = -1;

    if (db->pg) {
        PGconn *c = pg_connect(db->url);
        const char *vals[2] = {(const char *)w, id};
        int lens[2] = {(int)len, 0}, fmts[2] = {1, 0};
        PGresult *r;

        if (c == NULL)
            return -1;
        r = PQexecParams(c, "UPDATE deks SET wrapped = $1::bytea WHERE id = $2", 2, NULL, vals,
                         lens, fmts, 0);
        if (PQresultStatus(r) == PGRES_COMMAND_OK && strcmp(PQcmdTuples(r), "1") == 0)
            rv = 0;
        else
            fprintf(stderr, "teststore: updating wrapped: %s", PQresultErrorMessage(r));
        PQclear(r);
        PQfinish(c);
        return rv;
    }
    sqlite3 *s = NULL;
    sqlite3_stmt *q = NULL;

    if (sqlite3_open_v2(db->path, &s, SQLITE_OPEN_READWRITE, NULL) == SQLITE_OK &&
        sqlite3_busy_timeout(s, 5000) == SQLITE_OK &&
        sqlite3_prepare_v2(s, "UPDATE deks SET wrapped = ?1 WHERE id = ?2", -1, &q, NULL) ==
            SQLITE_OK) {
        sqlite3_bind_blob(q, 1, w, (int)len, SQLITE_STATIC);
        sqlite3_bind_text(q, 2, id, -1, SQLITE_STATIC);
        if (sqlite3_step(q) == SQLITE_DONE && sqlite3_changes(s) == 1)
            rv = 0;
    }
    sqlite3_finalize(q);
    if (sqlite3_close(s) != SQLITE_OK)
        rv = -1;
    return rv;
}

long long ts_db_int(const ts_db *db, const char *sql)
{
    long long v = -1;

    if (db->pg) {
        PGconn *c = pg_connect(db->url);
        PGresult *r;

        if (c == NULL)
            return -1;
        r = PQexec(c, sql);
        if (PQresultStatus(r) == PGRES_TUPLES_OK && PQntuples(r) == 1)
            v = strtoll(PQgetvalue(r, 0, 0), NULL, 10);
        else
            fprintf(stderr, "teststore: %s: %s", sql, PQresultErrorMessage(r));
        PQclear(r);
        PQfinish(c);
        return v;
    }
    sqlite3 *s = NULL;
    sqlite3_stmt *q = NULL;

    if (sqlite3_open_v2(db->path, &s, SQLITE_OPEN_READONLY, NULL) == SQLITE_OK &&
        sqlite3_busy_timeout(s, 5000) == SQLITE_OK &&
        sqlite3_prepare_v2(s, sql, -1, &q, NULL) == SQLITE_OK && sqlite3_step(q) == SQLITE_ROW)
        v = sqlite3_column_int64(q, 0);
    sqlite3_finalize(q);
    sqlite3_close(s);
    return v;
}

void *ts_db_lock_writes(const ts_db *db)
{
    if (db->pg) {
        PGconn *c = pg_connect(db->url);
        PGresult *r;

        if (c == NULL)
            return NULL;
        PQclear(PQexec(c, "BEGIN"));
        r = PQexec(c, "SELECT 1 FROM key_versions FOR UPDATE");
        if (PQresultStatus(r) != PGRES_TUPLES_OK) {
            fprintf(stderr, "teststore: locking key_versions: %s", PQresultErrorMessage(r));
            PQclear(r);
            PQfinish(c);
            return NULL;
        }
        PQclear(r);
        return c;
    }
    sqlite3 *s = NULL;

    if (sqlite3_open_v2(db->path, &s, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK ||
        sqlite3_exec(s, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        sqlite3_close(s);
        return NULL;
    }
    return s;
}

void ts_db_unlock_writes(const ts_db *db, void *lock)
{
    if (lock == NULL)
        return;
    if (db->pg) {
        PQclear(PQexec(lock, "ROLLBACK"));
        PQfinish(lock);
        return;
    }
    sqlite3_exec(lock, "ROLLBACK", NULL, NULL, NULL);
    sqlite3_close(lock);
}

int ts_db_integrity_ok(const ts_db *db)
{
    sqlite3 *s = NULL;
    sqlite3_stmt *q = NULL;
    int ok = 0;

    if (db->pg)
        return 1;
    if (sqlite3_open_v2(db->path, &s, SQLITE_OPEN_READWRITE, NULL) == SQLITE_OK &&
        sqlite3_prepare_v2(s, "PRAGMA integrity_check", -1, &q, NULL) == SQLITE_OK &&
        sqlite3_step(q) == SQLITE_ROW)
        ok = strcmp((const char *)sqlite3_column_text(q, 0), "ok") == 0;
    sqlite3_finalize(q);
    sqlite3_close(s);
    return ok;
}
