/*
 * tests/test_store_sqlite.c - the SQLite store, one thread at a time:
 * schema migrations, PRAGMAs, file modes, keys, DEKs, wrap and DEK
 * counts, error codes, unusable database paths.  Each test uses a real
 * database file in its own temp dir.
 */
#include <check.h>
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kms/store/store.h"
#include "kms/store/sqlite_ckpt.h"
#include "kms/store/store_internal.h"
#include "support/testtoken.h"

static char dir[256];
static char dbpath[512];

static void setup(void)
{
    ck_assert_int_eq(tt_tempdir(dir, sizeof(dir)), 0);
    snprintf(dbpath, sizeof(dbpath), "%s/kms.db", dir);
}

static void teardown(void)
{
    tt_rmtree(dir);
}

static void token_id_for(unsigned char id[KMS_TOKEN_ID_LEN], unsigned seed)
{
    for (int i = 0; i < KMS_TOKEN_ID_LEN; i++)
        id[i] = (unsigned char)(seed * 31u + (unsigned)i * 7u + 1u);
}

static void dek_for(kms_dek_rec *d, const char *key, uint32_t version, unsigned n,
                    const char *context)
{
    memset(d, 0, sizeof(*d));
    snprintf(d->id, sizeof(d->id), "%08x-0000-4000-8000-%012x", n, n * 3u);
    snprintf(d->key, sizeof(d->key), "%s", key);
    d->version = version;
    d->state = KMS_DEK_ACTIVE;
    d->context = (char *)context;
    d->wrapped_len = 60;
    for (size_t i = 0; i < d->wrapped_len; i++)
        d->wrapped[i] = (unsigned char)(n + i * 13u);
    d->created = 1700000000 + (int64_t)n;
}

/* Run one SQL query on a separate connection and return column 0 of the
 * first row as text (in buf). */
static void raw_query(const char *path, const char *sql, char *buf, size_t len)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;

    ck_assert_int_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_prepare_v2(db, sql, -1, &st, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(st), SQLITE_ROW);
    snprintf(buf, len, "%s", (const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    sqlite3_close(db);
}

START_TEST(migrations_create_schema_and_reopen_is_noop)
{
    kms_store *st = NULL;
    char before[128], after[128], buf[256];

    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    ck_assert_str_eq(kms_store_backend(st), "sqlite");
    kms_store_close(st);

    raw_query(dbpath, "SELECT group_concat(version || ':' || applied) FROM schema_version", before,
              sizeof(before));
    raw_query(dbpath, "SELECT max(version) FROM schema_version", buf, sizeof(buf));
    ck_assert_int_eq(atoi(buf), kms_sqlite_schema_latest());
    raw_query(dbpath,
              "SELECT group_concat(name, ',') FROM (SELECT name FROM sqlite_master "
              "WHERE type IN ('table', 'index') AND name NOT LIKE 'sqlite_%' ORDER BY name)",
              buf, sizeof(buf));
    ck_assert_str_eq(buf, "audit,audit_head,audit_key,deks,deks_by_key,deks_by_state,"
                          "deks_by_version,kek_intents,key_versions,keys,schema_version,store_probe");

    sleep(1); /* a re-applied migration would record a later time */
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    kms_store_close(st);
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    kms_store_close(st);
    raw_query(dbpath, "SELECT group_concat(version || ':' || applied) FROM schema_version", after,
              sizeof(after));
    ck_assert_str_eq(before, after);
    raw_query(dbpath, "SELECT count(*) FROM schema_version", buf, sizeof(buf));
    ck_assert_int_eq(atoi(buf), kms_sqlite_schema_latest());
}
END_TEST

START_TEST(newer_schema_is_refused)
{
    kms_store *st = NULL;
    char buf[64];

    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    kms_store_close(st);
    raw_query(dbpath,
              "INSERT INTO schema_version VALUES (9999, 'from the future', 0) RETURNING version",
              buf, sizeof(buf));
    st = NULL;
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_ERR_STORE_UNAVAILABLE);
    ck_assert_ptr_null(st);
}
END_TEST

START_TEST(pragmas_and_file_modes)
{
    kms_store *st = NULL;
    kms_sqlite_pragmas p;
    struct stat sb;
    char buf[64], wal[600];
    unsigned char tid[KMS_TOKEN_ID_LEN];

    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    ck_assert_int_eq(kms_sqlite_pragmas_get(st, &p), P11KMS_OK);
    ck_assert_str_eq(p.journal_mode, "wal");
    ck_assert_int_eq(p.synchronous, 2);
    ck_assert_int_eq(p.secure_delete, 1);
    ck_assert_int_eq(p.foreign_keys, 1);
    ck_assert_int_gt(p.busy_timeout_ms, 0);

    token_id_for(tid, 1);
    ck_assert_int_eq(kms_store_key_create(st, "modes", tid, 1), P11KMS_OK);
    ck_assert_int_eq(stat(dbpath, &sb), 0);
    ck_assert_int_eq(sb.st_mode & 0777, 0600);
    snprintf(wal, sizeof(wal), "%s-wal", dbpath);
    ck_assert_int_eq(stat(wal, &sb), 0);
    ck_assert_int_eq(sb.st_mode & 077, 0);
    snprintf(wal, sizeof(wal), "%s-shm", dbpath);
    ck_assert_int_eq(stat(wal, &sb), 0);
    ck_assert_int_eq(sb.st_mode & 077, 0);

    /* WAL is persistent in the file: another connection sees it. */
    raw_query(dbpath, "PRAGMA journal_mode", buf, sizeof(buf));
    ck_assert_str_eq(buf, "wal");
    kms_store_close(st);
}
END_TEST

START_TEST(key_create_exists_get_list)
{
    kms_store *st = NULL;
    kms_key_rec *k = NULL, **keys = NULL;
    size_t n = 0;
    unsigned char tid[KMS_TOKEN_ID_LEN], tid2[KMS_TOKEN_ID_LEN], tid3[KMS_TOKEN_ID_LEN];
    unsigned char(*ids)[KMS_TOKEN_ID_LEN] = NULL;

    token_id_for(tid, 1);
    token_id_for(tid2, 2);
    token_id_for(tid3, 3);
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    ck_assert_int_eq(kms_store_ping(st), P11KMS_OK);

    ck_assert_int_eq(kms_store_key_list(st, &keys, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 0);
    kms_key_list_free(keys, n);

    ck_assert_int_eq(kms_store_key_create(st, "zeta", tid, 1000), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_create(st, "alpha", tid2, 2000), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_create(st, "zeta", tid3, 3000), P11KMS_ERR_KEY_EXISTS);
    /* The same CKA_ID twice is a bug of the caller, not "exists". */
    ck_assert_int_eq(kms_store_key_create(st, "other", tid, 3000), P11KMS_ERR_INTERNAL);
    ck_assert_int_eq(kms_store_key_get(st, "other", &k), P11KMS_ERR_KEY_NOT_FOUND);

    ck_assert_int_eq(kms_store_key_get(st, "zeta", &k), P11KMS_OK);
    ck_assert_str_eq(k->name, "zeta");
    ck_assert_int_eq(k->state, KMS_KEY_ENABLED);
    ck_assert_uint_eq(k->latest_version, 1);
    ck_assert_uint_eq(k->min_decrypt_version, 1);
    ck_assert_int_eq(k->rotation_period, 0);
    ck_assert_int_eq(k->created, 1000);
    ck_assert_uint_eq(k->n_versions, 1);
    ck_assert_uint_eq(k->versions[0].version, 1);
    ck_assert_int_eq(k->versions[0].state, KMS_VERSION_ACTIVE);
    ck_assert_mem_eq(k->versions[0].token_id, tid, KMS_TOKEN_ID_LEN);
    ck_assert_int_eq(k->versions[0].created, 1000);
    ck_assert_uint_eq(k->versions[0].wrap_count, 0);
    ck_assert_uint_eq(k->versions[0].dek_count, 0);
    kms_key_rec_free(k);

    ck_assert_int_eq(kms_store_key_list(st, &keys, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 2);
    ck_assert_str_eq(keys[0]->name, "alpha");
    ck_assert_str_eq(keys[1]->name, "zeta");
    ck_assert_uint_eq(keys[0]->n_versions, 1);
    ck_assert_mem_eq(keys[0]->versions[0].token_id, tid2, KMS_TOKEN_ID_LEN);
    kms_key_list_free(keys, n);

    ck_assert_int_eq(kms_store_token_ids(st, &ids, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 2);
    ck_assert_int_eq((memcmp(ids[0], tid, KMS_TOKEN_ID_LEN) == 0 &&
                      memcmp(ids[1], tid2, KMS_TOKEN_ID_LEN) == 0) ||
                         (memcmp(ids[0], tid2, KMS_TOKEN_ID_LEN) == 0 &&
                          memcmp(ids[1], tid, KMS_TOKEN_ID_LEN) == 0),
                     1);
    free(ids);

    /* Unknown or impossible names. */
    ck_assert_int_eq(kms_store_key_get(st, "nope", &k), P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_store_key_get(st, "", &k), P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_store_key_create(st, "", tid3, 1), P11KMS_ERR_BAD_REQUEST);
    kms_store_close(st);

    /* Everything survives a reopen. */
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_get(st, "alpha", &k), P11KMS_OK);
    ck_assert_int_eq(k->created, 2000);
    kms_key_rec_free(k);
    kms_store_close(st);
}
END_TEST

START_TEST(dek_insert_get_counts)
{
    kms_store *st = NULL;
    kms_dek_rec d, *got = NULL;
    kms_key_rec *k = NULL;
    unsigned char tid[KMS_TOKEN_ID_LEN], tid2[KMS_TOKEN_ID_LEN];
    uint64_t commits = 0, writes = 0;
    const char *ctx = "{\"customer\":\"42\",\"region\":\"eu\"}";

    token_id_for(tid, 1);
    token_id_for(tid2, 2);
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_create(st, "customers", tid, 1), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_create(st, "other", tid2, 1), P11KMS_OK);

    for (unsigned i = 0; i < 5; i++) {
        dek_for(&d, "customers", 1, i, ctx);
        ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_OK);
    }
    dek_for(&d, "other", 1, 100, "{}");
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_OK);

    dek_for(&d, "customers", 1, 3, ctx);
    ck_assert_int_eq(kms_store_dek_get(st, d.id, &got), P11KMS_OK);
    ck_assert_str_eq(got->id, d.id);
    ck_assert_str_eq(got->key, "customers");
    ck_assert_uint_eq(got->version, 1);
    ck_assert_int_eq(got->state, KMS_DEK_ACTIVE);
    ck_assert_str_eq(got->context, ctx);
    ck_assert_uint_eq(got->wrapped_len, d.wrapped_len);
    ck_assert_mem_eq(got->wrapped, d.wrapped, d.wrapped_len);
    ck_assert_int_eq(got->created, d.created);
    kms_dek_rec_free(got);

    ck_assert_int_eq(kms_store_key_get(st, "customers", &k), P11KMS_OK);
    ck_assert_uint_eq(k->versions[0].wrap_count, 5);
    ck_assert_uint_eq(k->versions[0].dek_count, 5);
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_store_key_get(st, "other", &k), P11KMS_OK);
    ck_assert_uint_eq(k->versions[0].wrap_count, 1);
    ck_assert_uint_eq(k->versions[0].dek_count, 1);
    kms_key_rec_free(k);

    /* Errors: unknown key, unknown version, duplicate id, bad records. */
    dek_for(&d, "missing", 1, 200, "{}");
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_ERR_KEY_NOT_FOUND);
    dek_for(&d, "customers", 2, 201, "{}");
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_ERR_KEY_NOT_FOUND);
    dek_for(&d, "customers", 1, 0, "{}");
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_ERR_INTERNAL);
    dek_for(&d, "customers", 1, 202, "{}");
    d.wrapped_len = 0;
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_ERR_BAD_REQUEST);
    dek_for(&d, "customers", 1, 203, NULL);
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_ERR_BAD_REQUEST);
    dek_for(&d, "customers", 1, 204, "{}");
    d.id[5] = '\0';
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_ERR_BAD_REQUEST);

    /* Failed writes changed nothing: counts as before. */
    ck_assert_int_eq(kms_store_key_get(st, "customers", &k), P11KMS_OK);
    ck_assert_uint_eq(k->versions[0].wrap_count, 5);
    ck_assert_uint_eq(k->versions[0].dek_count, 5);
    kms_key_rec_free(k);

    ck_assert_int_eq(kms_store_dek_get(st, "00000000-0000-4000-8000-ffffffffffff", &got),
                     P11KMS_ERR_DEK_NOT_FOUND);
    ck_assert_int_eq(kms_store_dek_get(st, "short", &got), P11KMS_ERR_DEK_NOT_FOUND);

    kms_store_stats(st, &commits, &writes);
    ck_assert_uint_ge(writes, 6);
    ck_assert_uint_ge(commits, 1);
    kms_store_close(st);

    /* Durable: a new open sees the same counts and bytes. */
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_get(st, "customers", &k), P11KMS_OK);
    ck_assert_uint_eq(k->versions[0].wrap_count, 5);
    kms_key_rec_free(k);
    dek_for(&d, "customers", 1, 4, ctx);
    ck_assert_int_eq(kms_store_dek_get(st, d.id, &got), P11KMS_OK);
    ck_assert_mem_eq(got->wrapped, d.wrapped, d.wrapped_len);
    kms_dek_rec_free(got);
    kms_store_close(st);
}
END_TEST

START_TEST(dek_count_excludes_destroyed)
{
    kms_store *st = NULL;
    kms_key_rec *k = NULL;
    kms_dek_rec d, *got = NULL;
    unsigned char tid[KMS_TOKEN_ID_LEN];
    char buf[64];

    token_id_for(tid, 1);
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_create(st, "k", tid, 1), P11KMS_OK);
    for (unsigned i = 0; i < 4; i++) {
        dek_for(&d, "k", 1, i, "{}");
        ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_OK);
    }
    /* Until the core grows revoke/destroy, move two DEKs behind the
     * store's back (another connection), as those functions will. */
    dek_for(&d, "k", 1, 0, "{}");
    snprintf(buf, sizeof(buf), "%s", d.id);
    {
        char sql[256], out[16];
        snprintf(sql, sizeof(sql),
                 "UPDATE deks SET state = 'revoked', revoked_at = 5, "
                 "revoke_reason = 'compromised' WHERE id = '%s' RETURNING 1",
                 buf);
        raw_query(dbpath, sql, out, sizeof(out));
        dek_for(&d, "k", 1, 1, "{}");
        snprintf(sql, sizeof(sql),
                 "UPDATE deks SET state = 'destroyed', wrapped = NULL, destroyed_at = 6 "
                 "WHERE id = '%s' RETURNING 1",
                 d.id);
        raw_query(dbpath, sql, out, sizeof(out));
    }
    ck_assert_int_eq(kms_store_key_get(st, "k", &k), P11KMS_OK);
    ck_assert_uint_eq(k->versions[0].wrap_count, 4);
    ck_assert_uint_eq(k->versions[0].dek_count, 3); /* 2 active + 1 revoked */
    kms_key_rec_free(k);

    ck_assert_int_eq(kms_store_dek_get(st, d.id, &got), P11KMS_OK);
    ck_assert_int_eq(got->state, KMS_DEK_DESTROYED);
    ck_assert_uint_eq(got->wrapped_len, 0);
    kms_dek_rec_free(got);
    ck_assert_int_eq(kms_store_dek_get(st, buf, &got), P11KMS_OK);
    ck_assert_int_eq(got->state, KMS_DEK_REVOKED);
    kms_dek_rec_free(got);
    kms_store_close(st);
}
END_TEST

START_TEST(schema_constraints_hold)
{
    kms_store *st = NULL;
    unsigned char tid[KMS_TOKEN_ID_LEN];
    kms_dek_rec d;
    sqlite3 *db = NULL;

    token_id_for(tid, 1);
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_create(st, "k", tid, 1), P11KMS_OK);
    dek_for(&d, "k", 1, 1, "{}");
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_OK);
    kms_store_close(st);

    ck_assert_int_eq(sqlite3_open_v2(dbpath, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    sqlite3_exec(db, "PRAGMA foreign_keys = ON", NULL, NULL, NULL);
    /* destroyed needs wrapped NULL and destroyed_at */
    ck_assert_int_ne(sqlite3_exec(db, "UPDATE deks SET state = 'destroyed'", NULL, NULL, NULL),
                     SQLITE_OK);
    /* unknown state */
    ck_assert_int_ne(sqlite3_exec(db, "UPDATE deks SET state = 'lost'", NULL, NULL, NULL),
                     SQLITE_OK);
    /* a DEK on a version that does not exist */
    ck_assert_int_ne(sqlite3_exec(db, "UPDATE deks SET version = 7", NULL, NULL, NULL), SQLITE_OK);
    /* min_decrypt_version above latest */
    ck_assert_int_ne(sqlite3_exec(db, "UPDATE keys SET min_decrypt_version = 2", NULL, NULL, NULL),
                     SQLITE_OK);
    sqlite3_close(db);
}
END_TEST

START_TEST(unusable_paths_are_store_unavailable)
{
    kms_store *st = NULL;
    char path[600];
    int fd;

    snprintf(path, sizeof(path), "%s/no/such/dir/kms.db", dir);
    ck_assert_int_eq(kms_store_open_sqlite(path, &st), P11KMS_ERR_STORE_UNAVAILABLE);
    ck_assert_ptr_null(st);

    /* a directory */
    ck_assert_int_eq(kms_store_open_sqlite(dir, &st), P11KMS_ERR_STORE_UNAVAILABLE);

    /* below a regular file */
    snprintf(path, sizeof(path), "%s/file", dir);
    fd = open(path, O_CREAT | O_WRONLY, 0600);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "this is not an SQLite database, not at all; just text\n", 55), 55);
    close(fd);
    ck_assert_int_eq(kms_store_open_sqlite(path, &st), P11KMS_ERR_STORE_UNAVAILABLE);
    snprintf(path, sizeof(path), "%s/file/kms.db", dir);
    ck_assert_int_eq(kms_store_open_sqlite(path, &st), P11KMS_ERR_STORE_UNAVAILABLE);

    ck_assert_int_eq(kms_store_open_sqlite("", &st), P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_null(st);
    kms_store_close(NULL);
}
END_TEST

/* Open as an unprivileged user in a child: a database we may not write
 * (existing, read-only to us) and a directory we may not enter. */
START_TEST(unwritable_database_is_store_unavailable)
{
    kms_store *st = NULL;
    char sub[600], path[700];
    pid_t pid;
    int status = 0;

    snprintf(sub, sizeof(sub), "%s/ro", dir);
    ck_assert_int_eq(mkdir(sub, 0700), 0);
    snprintf(path, sizeof(path), "%s/kms.db", sub);
    ck_assert_int_eq(kms_store_open_sqlite(path, &st), P11KMS_OK);
    kms_store_close(st);
    st = NULL;
    ck_assert_int_eq(chmod(dir, 0755), 0);
    ck_assert_int_eq(chmod(sub, 0555), 0);
    ck_assert_int_eq(chmod(path, 0444), 0);

    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int code = 0;
        if (geteuid() == 0 && (setgid(65534) != 0 || setuid(65534) != 0))
            _exit(10);
        if (kms_store_open_sqlite(path, &st) != P11KMS_ERR_STORE_UNAVAILABLE || st != NULL)
            code |= 1;
        snprintf(sub, sizeof(sub), "%s/ro/new.db", dir);
        if (kms_store_open_sqlite(sub, &st) != P11KMS_ERR_STORE_UNAVAILABLE || st != NULL)
            code |= 2;
        _exit(code);
    }
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status));
    ck_assert_int_eq(WEXITSTATUS(status), 0);
    chmod(sub, 0700);
}
END_TEST

/* Steady writes from several threads (the writer never idles, so a
 * background checkpoint never finds the WAL fully copied and SQLite never
 * restarts it on its own) with a reader on old snapshots: the WAL file
 * stays within SQ_WAL_MAX_PAGES pages plus one group, because the writer
 * restarts it, and every DEK is still there.  Before, the WAL only
 * restarted when a checkpoint happened to catch up (190 MB seen under
 * kmsd's benchmark load), and copying only every SQ_CKPT_PAGES pages
 * made it grow without end. */
#define WAL_THREADS 8
#define WAL_FRAME   (4096 + 24)

struct wal_load {
    kms_store *st;
    unsigned thread;
    volatile int *stop;
    unsigned inserted;
    int failures;
};

static void *wal_writer(void *arg)
{
    struct wal_load *w = arg;
    kms_dek_rec d;

    while (!*w->stop) {
        dek_for(&d, "customers", 1, w->thread * 1000000u + w->inserted, "{\"customer\":\"7\"}");
        if (kms_store_dek_insert(w->st, &d) == P11KMS_OK)
            w->inserted++;
        else
            w->failures++;
    }
    return NULL;
}

static void *wal_reader(void *arg)
{
    struct wal_load *w = arg;
    kms_dek_rec d, *got = NULL;

    while (!*w->stop) {
        dek_for(&d, "customers", 1, 0, "{}");
        if (kms_store_dek_get(w->st, d.id, &got) == P11KMS_OK)
            kms_dek_rec_free(got);
        got = NULL;
    }
    return NULL;
}

START_TEST(wal_stays_bounded_under_steady_writes)
{
    kms_store *st = NULL;
    unsigned char tid[KMS_TOKEN_ID_LEN];
    char walpath[600];
    struct wal_load w[WAL_THREADS + 1];
    pthread_t th[WAL_THREADS + 1];
    volatile int stop = 0;
    kms_store_stats_ex stats;
    struct stat sb;
    off_t biggest = 0, bound = (off_t)(SQ_WAL_MAX_PAGES + 2000) * WAL_FRAME + 32;
    unsigned total = 0;
    int seconds = 0;

    snprintf(walpath, sizeof(walpath), "%s-wal", dbpath);
    token_id_for(tid, 1);
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_create(st, "customers", tid, 1), P11KMS_OK);
    for (unsigned t = 0; t <= WAL_THREADS; t++) {
        w[t] = (struct wal_load){.st = st, .thread = t, .stop = &stop};
        ck_assert_int_eq(
            pthread_create(&th[t], NULL, t < WAL_THREADS ? wal_writer : wal_reader, &w[t]), 0);
    }
    /* Until the WAL has been restarted twice (about 3 x 64 MiB of pages
     * written) or has outgrown the bound; at most 120 s. */
    for (int i = 0; seconds < 120; i++) {
        if (stat(walpath, &sb) == 0 && sb.st_size > biggest)
            biggest = sb.st_size;
        kms_store_stats_get(st, &stats);
        if (stats.wal_restarts >= 2 || biggest > bound)
            break;
        usleep(10000);
        seconds = i / 100;
    }
    stop = 1;
    for (unsigned t = 0; t <= WAL_THREADS; t++)
        pthread_join(th[t], NULL);
    kms_store_stats_get(st, &stats);
    ck_assert_msg(biggest <= bound, "WAL grew to %lld bytes (bound %lld)", (long long)biggest,
                  (long long)bound);
    ck_assert_uint_ge(stats.wal_restarts, 2);
    for (unsigned t = 0; t < WAL_THREADS; t++) {
        ck_assert_int_eq(w[t].failures, 0);
        total += w[t].inserted;
    }
    kms_store_close(st);
    /* Everything is still there after a reopen. */
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    for (unsigned t = 0; t < WAL_THREADS; t++)
        for (unsigned i = 0; i < w[t].inserted; i += 97) {
            kms_dek_rec d, *got = NULL;
            dek_for(&d, "customers", 1, t * 1000000u + i, "{}");
            ck_assert_int_eq(kms_store_dek_get(st, d.id, &got), P11KMS_OK);
            kms_dek_rec_free(got);
        }
    kms_key_rec *k = NULL;
    ck_assert_int_eq(kms_store_key_get(st, "customers", &k), P11KMS_OK);
    ck_assert_uint_eq(k->versions[0].dek_count, total);
    kms_key_rec_free(k);
    kms_store_close(st);
}
END_TEST

/* A long reader (a backup, an sqlite3 shell) holds a snapshot that uses
 * the WAL, so the writer cannot restart it: the WAL grows past
 * SQ_WAL_MAX_PAGES, but the writer tries the restart (and waits up to
 * SQ_RESTART_WAIT_MS) only once per SQ_CKPT_PAGES of growth, not after
 * every commit, and writes keep flowing.  Once the reader ends, the next
 * attempt restarts the WAL. */
START_TEST(long_reader_does_not_stall_every_commit)
{
    kms_store *st = NULL;
    unsigned char tid[KMS_TOKEN_ID_LEN];
    char walpath[600];
    struct wal_load w[WAL_THREADS];
    pthread_t th[WAL_THREADS];
    volatile int stop = 0;
    kms_store_stats_ex before, during;
    struct stat sb;
    sqlite3 *reader = NULL;
    sqlite3_stmt *q = NULL;
    off_t target = (off_t)(SQ_WAL_MAX_PAGES + 4 * SQ_CKPT_PAGES) * WAL_FRAME;
    uint64_t grown_pages;
    int i;

    snprintf(walpath, sizeof(walpath), "%s-wal", dbpath);
    token_id_for(tid, 1);
    ck_assert_int_eq(kms_store_open_sqlite(dbpath, &st), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_create(st, "customers", tid, 1), P11KMS_OK);
    for (unsigned t = 0; t < WAL_THREADS; t++) {
        w[t] = (struct wal_load){.st = st, .thread = t, .stop = &stop};
        ck_assert_int_eq(pthread_create(&th[t], NULL, wal_writer, &w[t]), 0);
    }
    usleep(200000); /* some frames in the WAL: the reader's snapshot will use it */
    ck_assert_int_eq(sqlite3_open_v2(dbpath, &reader, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_exec(reader, "BEGIN", NULL, NULL, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_prepare_v2(reader, "SELECT count(*) FROM deks", -1, &q, NULL),
                     SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(q), SQLITE_ROW);
    sqlite3_finalize(q);
    kms_store_stats_get(st, &before);
    for (i = 0; i < 12000; i++) { /* until the WAL is well past the bound, at most 120 s */
        if (stat(walpath, &sb) == 0 && sb.st_size >= target)
            break;
        usleep(10000);
    }
    ck_assert_int_lt(i, 12000);
    kms_store_stats_get(st, &during);
    grown_pages = (uint64_t)(sb.st_size / WAL_FRAME) - SQ_WAL_MAX_PAGES;
    ck_assert_uint_eq(during.wal_restarts, before.wal_restarts);
    ck_assert_uint_ge(during.wal_restart_busy, 1);
    ck_assert_msg(during.wal_restart_busy - before.wal_restart_busy <=
                      grown_pages / SQ_CKPT_PAGES + 2,
                  "%llu blocked restarts for %llu pages of growth",
                  (unsigned long long)(during.wal_restart_busy - before.wal_restart_busy),
                  (unsigned long long)grown_pages);
    ck_assert_uint_gt(during.commits - before.commits, 100); /* writes kept flowing */

    sqlite3_exec(reader, "COMMIT", NULL, NULL, NULL);
    sqlite3_close(reader);
    for (i = 0; i < 12000; i++) {
        kms_store_stats_get(st, &during);
        if (during.wal_restarts > before.wal_restarts)
            break;
        usleep(10000);
    }
    stop = 1;
    for (unsigned t = 0; t < WAL_THREADS; t++) {
        pthread_join(th[t], NULL);
        ck_assert_int_eq(w[t].failures, 0);
    }
    ck_assert_uint_gt(during.wal_restarts, before.wal_restarts);
    kms_store_close(st);
}
END_TEST

static Suite *store_suite(void)
{
    Suite *s = suite_create("store_sqlite");
    TCase *tc = tcase_create("sqlite");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, migrations_create_schema_and_reopen_is_noop);
    tcase_add_test(tc, newer_schema_is_refused);
    tcase_add_test(tc, pragmas_and_file_modes);
    tcase_add_test(tc, key_create_exists_get_list);
    tcase_add_test(tc, dek_insert_get_counts);
    tcase_add_test(tc, dek_count_excludes_destroyed);
    tcase_add_test(tc, schema_constraints_hold);
    tcase_add_test(tc, unusable_paths_are_store_unavailable);
    tcase_add_test(tc, unwritable_database_is_store_unavailable);
    tcase_add_test(tc, wal_stays_bounded_under_steady_writes);
    tcase_add_test(tc, long_reader_does_not_stall_every_commit);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(store_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
