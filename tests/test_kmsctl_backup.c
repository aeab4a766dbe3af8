/*
 * tests/test_kmsctl_backup.c - `kmsctl --config FILE backup OUT | restore IN`
 * against a real kmsd and its own SoftHSM2 token.
 *
 *  - the restore drill: DEKs issued through kmsd, a backup taken while kmsd
 *    runs (mode 0600, manifest inside), restore refused while kmsd runs,
 *    kmsd stopped, the store files wiped (the token kept), restore, kmsd
 *    started again: every DEK decrypts to the same bytes (also one
 *    destroyed after the backup: it comes back, as docs/operations.md
 *    says) and the audit chain verifies; a key created after the backup
 *    is reported, and kmsd keeps its KEK object (logged, not destroyed);
 *  - restore refused when a KEK version of the manifest is gone from the
 *    token (destroyed here with p11_kek_destroy), the store untouched;
 *  - a postgres configuration refused by both commands, pointing to
 *    docs/operations.md.
 *
 * SQLite only: the _pg variant skips (exit 77).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <jansson.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "module/p11.h"
#include "support/kmsctl_run.h"
#include "support/kmsd_harness.h"

static kh_kmsd K;

/* kmsctl --socket SOCK [--json] args...; returns the exit status. */
static int ctl(kr_result *r, const char *const *args)
{
    const char *argv[64];
    int n = 0;

    argv[n++] = KMSCTL_PATH;
    argv[n++] = "--socket";
    argv[n++] = K.sock;
    for (int i = 0; args[i] != NULL && n < 63; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    return kr_run(argv, NULL, NULL, r);
}
#define CTL(r, ...) ctl((r), (const char *const[]){__VA_ARGS__, NULL})

static json_t *ctl_json(const char *const *args)
{
    const char *argv[64];
    int n = 0;
    kr_result r;
    json_t *j;

    argv[n++] = "--json";
    for (int i = 0; args[i] != NULL && n < 60; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    ctl(&r, argv);
    ck_assert_msg(r.status == 0, "kmsctl %s: exit %d: %s", args[0], r.status, r.err);
    j = json_loads(r.out, 0, NULL);
    ck_assert_msg(j != NULL, "not JSON: %s", r.out);
    kr_free(&r);
    return j;
}
#define CTL_JSON(...) ctl_json((const char *const[]){__VA_ARGS__, NULL})

/* kmsctl --config CONF backup|restore PATH */
static int ctl_conf(kr_result *r, const char *conf, const char *verb, const char *path)
{
    const char *argv[] = {KMSCTL_PATH, "--config", conf, verb, path, NULL};
    return kr_run(argv, NULL, NULL, r);
}

typedef struct dek {
    char id[64];
    char plain[128];
} dek;

static void gen(const char *key, dek *d)
{
    json_t *g = CTL_JSON("dek", "generate", key, "--context", "app=backup");

    snprintf(d->id, sizeof(d->id), "%s", json_string_value(json_object_get(g, "dek_id")));
    snprintf(d->plain, sizeof(d->plain), "%s", json_string_value(json_object_get(g, "plaintext")));
    ck_assert_uint_eq(strlen(d->id), 36);
    json_decref(g);
}

static void wipe_store(void)
{
    char p[400];

    unlink(K.db);
    snprintf(p, sizeof(p), "%s-wal", K.db);
    unlink(p);
    snprintf(p, sizeof(p), "%s-shm", K.db);
    unlink(p);
    ck_assert_int_ne(access(K.db, F_OK), 0);
}

/* SELECT count(*) of the manifest rows of one kind in a backup file. */
static int manifest_count(const char *path, const char *kind)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *q = NULL;
    int n = -1;

    ck_assert_int_eq(sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_prepare_v2(db,
                                        "SELECT count(*) FROM p11kms_backup_manifest WHERE kind = ?1",
                                        -1, &q, NULL),
                     SQLITE_OK);
    sqlite3_bind_text(q, 1, kind, -1, SQLITE_STATIC);
    if (sqlite3_step(q) == SQLITE_ROW)
        n = sqlite3_column_int(q, 0);
    sqlite3_finalize(q);
    sqlite3_close(db);
    return n;
}

START_TEST(restore_drill)
{
    dek d[10];
    int n = 0;
    char out[400];
    kr_result r;
    struct stat sb;
    json_t *j;

    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsctl-bk", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    json_decref(CTL_JSON("key", "create", "bk-a"));
    json_decref(CTL_JSON("key", "create", "bk-b"));
    for (int i = 0; i < 4; i++)
        gen("bk-a", &d[n++]);
    json_decref(CTL_JSON("key", "rotate", "bk-a"));
    for (int i = 0; i < 3; i++)
        gen("bk-a", &d[n++]);
    for (int i = 0; i < 2; i++)
        gen("bk-b", &d[n++]);

    /* Online backup. */
    snprintf(out, sizeof(out), "%s/backup.db", K.dir);
    ctl_conf(&r, K.conf, "backup", out);
    ck_assert_msg(r.status == 0, "backup: %d %s", r.status, r.err);
    ck_assert_ptr_nonnull(strstr(r.out, "3 active key version(s)"));
    kr_free(&r);
    ck_assert_int_eq(stat(out, &sb), 0);
    ck_assert_int_eq(sb.st_mode & 0777, 0600);
    ck_assert_int_eq(manifest_count(out, "kek"), 3);
    ck_assert_int_eq(manifest_count(out, "audit_key"), 1);

    /* Refused while kmsd runs. */
    ctl_conf(&r, K.conf, "restore", out);
    ck_assert_int_eq(r.status, 1);
    ck_assert_msg(strstr(r.err, "kmsd is running") != NULL, "%s", r.err);
    kr_free(&r);

    /* Destroyed after the backup: comes back with it. */
    CTL(&r, "dek", "destroy", d[0].id);
    ck_assert_msg(r.status == 0, "destroy: %s", r.err);
    kr_free(&r);
    /* A key created after the backup: restore reports it, and kmsd keeps
     * its KEK object (no creation intent refers to it). */
    json_decref(CTL_JSON("key", "create", "bk-late"));

    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    wipe_store();
    ctl_conf(&r, K.conf, "restore", out);
    ck_assert_msg(r.status == 0, "restore: %d %s", r.status, r.err);
    ck_assert_ptr_nonnull(strstr(r.out, "restored"));
    ck_assert_msg(strstr(r.err, "1 KEK object(s) newer than the backup") != NULL, "%s", r.err);
    kr_free(&r);
    ck_assert_int_eq(stat(K.db, &sb), 0);
    ck_assert_int_eq(sb.st_mode & 0777, 0600);

    ck_assert_int_eq(kh_start(&K), 0);
    {
        /* The newer key's KEK object is kept, and said so. */
        char *log = kh_read_file(K.log, NULL);
        ck_assert_ptr_nonnull(log);
        ck_assert_msg(strstr(log, "unknown KEK object p11kms:bk-late:v1 kept") != NULL, "%s", log);
        free(log);
    }
    for (int i = 0; i < n; i++) {
        j = CTL_JSON("dek", "decrypt", d[i].id, "--context", "app=backup");
        ck_assert_str_eq(json_string_value(json_object_get(j, "plaintext")), d[i].plain);
        json_decref(j);
    }
    j = CTL_JSON("audit", "verify");
    ck_assert(json_is_true(json_object_get(j, "ok")));
    json_decref(j);
    /* The restored store keeps working. */
    gen("bk-b", &d[n++]);
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    kh_teardown(&K);
}
END_TEST

START_TEST(restore_refused_missing_kek)
{
    dek d[2];
    char out[400];
    unsigned char id[16];
    char *before, *after;
    size_t before_len, after_len;
    p11_config pc;
    p11_ctx *tok = NULL;
    kr_result r;

    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsctl-bk2", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    json_decref(CTL_JSON("key", "create", "k"));
    gen("k", &d[0]);
    json_decref(CTL_JSON("key", "rotate", "k"));
    gen("k", &d[1]);
    snprintf(out, sizeof(out), "%s/backup.db", K.dir);
    ctl_conf(&r, K.conf, "backup", out);
    ck_assert_msg(r.status == 0, "backup: %s", r.err);
    kr_free(&r);
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);

    /* Destroy KEK version 2 behind the store's back. */
    ck_assert_int_eq(ts_db_token_id(&K.store, "k", 2, id), 0);
    memset(&pc, 0, sizeof(pc));
    pc.module = K.tt.module;
    pc.uri = K.tt.uri;
    pc.pin = TT_PIN;
    ck_assert_int_eq(p11_open(&pc, &tok), CKR_OK);
    ck_assert_int_eq(p11_kek_destroy(tok, id), CKR_OK);
    p11_close(tok);

    before = kh_read_file(K.db, &before_len);
    ck_assert_ptr_nonnull(before);
    ctl_conf(&r, K.conf, "restore", out);
    ck_assert_int_eq(r.status, 1);
    ck_assert_msg(strstr(r.err, "missing from the token: key k version 2") != NULL, "%s", r.err);
    ck_assert_msg(strstr(r.err, "nothing was changed") != NULL, "%s", r.err);
    ck_assert_str_eq(r.out, "");
    kr_free(&r);
    after = kh_read_file(K.db, &after_len);
    ck_assert_ptr_nonnull(after);
    ck_assert_uint_eq(before_len, after_len);
    ck_assert(memcmp(before, after, before_len) == 0);
    free(before);
    free(after);
    kh_teardown(&K);
}
END_TEST

START_TEST(postgres_refused)
{
    char *text, *at, *conf = NULL, path[400], out[400], sq[1200];
    kr_result r;

    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsctl-bk3", NULL, NULL), 0);
    snprintf(sq, sizeof(sq), "%s", ts_db_conf(&K.store)); /* the [store] kh_setup wrote */
    text = kh_read_file(K.conf, NULL);
    ck_assert_ptr_nonnull(text);
    at = strstr(text, sq);
    ck_assert_ptr_nonnull(at);
    *at = '\0';
    ck_assert_int_gt(asprintf(&conf, "%s[store]\nbackend = postgres\nurl = postgresql:///p11kms\n%s",
                              text, at + strlen(sq)),
                     0);
    snprintf(path, sizeof(path), "%s/pg.conf", K.dir);
    ck_assert_int_eq(kh_write_file(path, conf, 0600), 0);
    snprintf(out, sizeof(out), "%s/pg-backup.db", K.dir);
    for (int i = 0; i < 2; i++) {
        ctl_conf(&r, path, i == 0 ? "backup" : "restore", out);
        ck_assert_int_eq(r.status, 1);
        ck_assert_msg(strstr(r.err, "pg_dump") != NULL && strstr(r.err, "docs/operations.md") != NULL,
                      "%s", r.err);
        ck_assert_str_eq(r.out, "");
        kr_free(&r);
    }
    ck_assert_int_ne(access(out, F_OK), 0);
    free(text);
    free(conf);
    kh_teardown(&K);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsctl_backup");
    TCase *tc = tcase_create("backup");

    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, restore_drill);
    tcase_add_test(tc, restore_refused_missing_kek);
    tcase_add_test(tc, postgres_refused);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr;
    int failed;

    if (ts_backend_is_pg()) {
        printf("skipped: backup/restore handle the SQLite store only (PostgreSQL: pg_dump)\n");
        return 77;
    }
    sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
