/*
 * tests/test_kmsd_rotation.c - key rotation through the HTTP API of the
 * real kmsd on a private SoftHSM2 token: rotate (new DEKs on v2, old ones
 * still decrypt), disable/enable, config (min_decrypt_version refuses old
 * DEKs until they are rewrapped; rotation_period rendered back; every bad
 * body), rewrap with and without batch (remaining counts down; revoked
 * stay revoked, destroyed untouched), retire (refused while in use and
 * for the latest version, accepted after rewrap, the token object gone as
 * seen through PKCS#11), automatic rotation by period ("2s", check
 * interval 1 s), the wrap-count rule (max_wraps_per_version = 5: the 6th
 * DEK lands on v2), kill -9 of kmsd in the middle of a rewrap of 3 000
 * DEKs (slowed down by the p11shim; every DEK decrypts to the same bytes
 * after a restart and a second rewrap finishes), and datakey requests
 * racing a rewrap (none fails).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kms/core/core.h"
#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

#define SERVER_EXTRA "rotation_check_interval = 1\n"

static kh_kmsd K;

static void start(void)
{
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-rot", SERVER_EXTRA, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = K.pid != 0 ? kh_stop(&K, SIGTERM) : 0;
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

/* ---- helpers ------------------------------------------------------------ */

static json_t *call(const char *method, const char *path, const char *body, long want)
{
    long status = 0;
    json_t *j = ku_call(&K, method, path, body, &status);

    ck_assert_msg(status == want, "%s %s: %ld, want %ld: %s", method, path, status, want,
                  json_dumps(j, JSON_COMPACT));
    return j;
}

static json_t *keyop(const char *name, const char *op, const char *body, long want)
{
    char path[160];

    snprintf(path, sizeof(path), "/v1/keys/%s%s%s", name, op[0] ? "/" : "", op);
    return call(op[0] ? "POST" : "GET", path, body, want);
}

static void expect_keyop_error(const char *name, const char *op, const char *body, long status,
                               const char *code)
{
    char path[160];

    snprintf(path, sizeof(path), "/v1/keys/%s/%s", name, op);
    ku_expect_error(&K, "POST", path, body, status, code);
}

static void create_key(const char *name)
{
    char body[128];

    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", name);
    json_decref(call("POST", "/v1/keys", body, 201));
}

static json_int_t jint(json_t *j, const char *field)
{
    json_t *v = json_object_get(j, field);

    ck_assert_msg(json_is_integer(v), "no integer %s", field);
    return json_integer_value(v);
}

static const char *jstr(json_t *j, const char *field)
{
    json_t *v = json_object_get(j, field);

    ck_assert_msg(json_is_string(v), "no string %s", field);
    return json_string_value(v);
}

static json_t *version_of(json_t *key, json_int_t v)
{
    json_t *list = json_object_get(key, "versions"), *e;
    size_t i;

    json_array_foreach(list, i, e)
    {
        if (jint(e, "version") == v)
            return e;
    }
    ck_abort_msg("no version %lld", (long long)v);
    return NULL;
}

typedef struct dek {
    char id[KMS_DEK_ID_LEN + 1];
    unsigned char pt[48];
    json_int_t version;
} dek;

static void generate(const char *key, dek *out)
{
    char path[128];
    json_t *j;

    snprintf(path, sizeof(path), "/v1/keys/%s/datakeys", key);
    j = call("POST", path, "{}", 201);
    snprintf(out->id, sizeof(out->id), "%s", jstr(j, "dek_id"));
    ck_assert_int_eq(ku_b64_key(jstr(j, "plaintext"), out->pt), 32);
    out->version = jint(j, "version");
    json_decref(j);
}

/* Decrypt; returns the status and, on 200, checks the bytes. */
static long decrypt(const dek *d, const char **code)
{
    static char code_buf[64];
    char path[128];
    unsigned char pt[48];
    long status = 0;
    json_t *j;

    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", d->id);
    j = ku_call(&K, "POST", path, "{}", &status);
    code_buf[0] = '\0';
    if (status == 200) {
        ck_assert_int_eq(ku_b64_key(jstr(j, "plaintext"), pt), 32);
        ck_assert_mem_eq(pt, d->pt, 32);
    } else {
        snprintf(code_buf, sizeof(code_buf), "%s",
                 json_string_value(json_object_get(json_object_get(j, "error"), "code")));
    }
    if (code != NULL)
        *code = code_buf;
    json_decref(j);
    return status;
}

static void expect_decrypt(const dek *d, long status, const char *code)
{
    const char *got = NULL;

    ck_assert_int_eq(decrypt(d, &got), status);
    if (code != NULL)
        ck_assert_str_eq(got, code);
}

static void rewrap(const char *key, const char *body, json_int_t want_moved,
                   json_int_t want_remaining)
{
    json_t *j = keyop(key, "rewrap", body, 200);

    ck_assert_int_eq(jint(j, "rewrapped"), want_moved);
    ck_assert_int_eq(jint(j, "remaining"), want_remaining);
    json_decref(j);
}

static void retire(const char *key, int version, long want, const char *code)
{
    char path[160];

    snprintf(path, sizeof(path), "/v1/keys/%s/versions/%d", key, version);
    if (code != NULL)
        ku_expect_error(&K, "DELETE", path, NULL, want, code);
    else
        json_decref(call("DELETE", path, NULL, want));
}

/* The CKA_ID of key/version, read from the store's database. */
static void token_id_of(const char *key, int version, unsigned char out[KMS_TOKEN_ID_LEN])
{
    ck_assert_int_eq(ts_db_token_id(&K.store, key, (unsigned)version, out), 0);
}

/* Open the test's token through PKCS#11 (beside the running kmsd). */
static p11_ctx *token_open(void)
{
    p11_config cfg = {.module = K.tt.module, .uri = K.tt.uri, .pin = TT_PIN};
    p11_ctx *p = NULL;

    ck_assert_int_eq(p11_open(&cfg, &p), CKR_OK);
    return p;
}

/* ---- tests -------------------------------------------------------------- */

START_TEST(rotate_generate_decrypt)
{
    dek d1, d2;
    json_t *k, *v;

    create_key("rot");
    generate("rot", &d1);
    ck_assert_int_eq(d1.version, 1);
    k = keyop("rot", "rotate", NULL, 200);
    ck_assert_str_eq(jstr(k, "name"), "rot");
    ck_assert_int_eq(jint(k, "latest_version"), 2);
    ck_assert_int_eq(json_array_size(json_object_get(k, "versions")), 2);
    v = version_of(k, 2);
    ck_assert_str_eq(jstr(v, "state"), "active");
    ck_assert_int_eq(jint(v, "dek_count"), 0);
    ck_assert_ptr_nonnull(jstr(v, "created"));
    ck_assert_int_eq(jint(version_of(k, 1), "dek_count"), 1);
    json_decref(k);
    generate("rot", &d2);
    ck_assert_int_eq(d2.version, 2);
    expect_decrypt(&d1, 200, NULL);
    expect_decrypt(&d2, 200, NULL);
    json_decref(keyop("rot", "rotate", "{}", 200));
    expect_keyop_error("rot", "rotate", "{\"x\":1}", 400, "bad_request");
    expect_keyop_error("nokey", "rotate", NULL, 404, "key_not_found");
    expect_keyop_error("Bad!", "rotate", NULL, 400, "bad_request");
    ku_expect_error(&K, "GET", "/v1/keys/rot/rotate", NULL, 405, "method_not_allowed");
}
END_TEST

START_TEST(disable_enable)
{
    dek d;
    char path[128];
    json_t *k;

    create_key("dis");
    generate("dis", &d);
    k = keyop("dis", "disable", NULL, 200);
    ck_assert_str_eq(jstr(k, "state"), "disabled");
    json_decref(k);
    ku_expect_error(&K, "POST", "/v1/keys/dis/datakeys", "{}", 403, "key_disabled");
    expect_decrypt(&d, 403, "key_disabled");
    snprintf(path, sizeof(path), "/v1/datakeys/%s", d.id);
    k = call("GET", path, NULL, 200);
    ck_assert_str_eq(jstr(k, "state"), "active"); /* untouched */
    json_decref(k);
    json_decref(keyop("dis", "disable", NULL, 200)); /* idempotent */
    k = keyop("dis", "enable", NULL, 200);
    ck_assert_str_eq(jstr(k, "state"), "enabled");
    json_decref(k);
    expect_decrypt(&d, 200, NULL);
    generate("dis", &d);
    expect_keyop_error("nokey", "disable", NULL, 404, "key_not_found");
    expect_keyop_error("nokey", "enable", NULL, 404, "key_not_found");
}
END_TEST

START_TEST(config_min_version_and_period)
{
    dek old, fresh;
    json_t *k;

    create_key("cfg");
    generate("cfg", &old);
    expect_keyop_error("cfg", "config", "{\"min_decrypt_version\":2}", 400, "bad_request");
    json_decref(keyop("cfg", "rotate", NULL, 200));
    generate("cfg", &fresh);
    static const char *const bad[] = {
        "{}",
        "{\"min_decrypt_version\":0}",
        "{\"min_decrypt_version\":3}",
        "{\"min_decrypt_version\":-1}",
        "{\"min_decrypt_version\":1.5}",
        "{\"min_decrypt_version\":\"2\"}",
        "{\"rotation_period\":\"5x\"}",
        "{\"rotation_period\":\"\"}",
        "{\"rotation_period\":90}",
        "{\"rotation_period\":\"3651d\"}",
        "{\"rotation_period\":\"07d\"}",
        "{\"min_decrypt_version\":2,\"extra\":1}",
        "[1]",
        "{\"min_decrypt_version\":2,\"min_decrypt_version\":2}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        expect_keyop_error("cfg", "config", bad[i], 400, "bad_request");
    expect_keyop_error("cfg", "config", NULL, 400, "bad_request");
    expect_keyop_error("nokey", "config", "{\"min_decrypt_version\":1}", 404, "key_not_found");

    k = keyop("cfg", "config", "{\"min_decrypt_version\":2}", 200);
    ck_assert_int_eq(jint(k, "min_decrypt_version"), 2);
    ck_assert_str_eq(jstr(k, "rotation_period"), "0");
    json_decref(k);
    expect_decrypt(&old, 403, "version_below_minimum");
    expect_decrypt(&fresh, 200, NULL);
    rewrap("cfg", NULL, 1, 0);
    expect_decrypt(&old, 200, NULL); /* now on v2 */

    k = keyop("cfg", "config", "{\"rotation_period\":\"90d\"}", 200);
    ck_assert_str_eq(jstr(k, "rotation_period"), "90d");
    ck_assert_int_eq(jint(k, "min_decrypt_version"), 2);
    json_decref(k);
    k = keyop("cfg", "config", "{\"rotation_period\":\"36h\",\"min_decrypt_version\":1}", 200);
    ck_assert_str_eq(jstr(k, "rotation_period"), "36h");
    ck_assert_int_eq(jint(k, "min_decrypt_version"), 1);
    json_decref(k);
    k = keyop("cfg", "config", "{\"rotation_period\":\"0\"}", 200);
    ck_assert_str_eq(jstr(k, "rotation_period"), "0");
    json_decref(k);
}
END_TEST

#define N_BATCH 30

START_TEST(rewrap_batches_and_retire)
{
    dek d[N_BATCH];
    char path[128];
    unsigned char v1[KMS_TOKEN_ID_LEN], v2[KMS_TOKEN_ID_LEN];
    p11_ctx *p;
    json_t *k, *j;

    create_key("rw");
    for (int i = 0; i < N_BATCH; i++)
        generate("rw", &d[i]);
    snprintf(path, sizeof(path), "/v1/datakeys/%s/revoke", d[0].id);
    json_decref(call("POST", path, "{\"reason\":\"compromised\"}", 200));
    snprintf(path, sizeof(path), "/v1/datakeys/%s/revoke", d[1].id);
    json_decref(call("POST", path, "{\"reason\":\"superseded\"}", 200));
    snprintf(path, sizeof(path), "/v1/datakeys/%s", d[2].id);
    json_decref(call("DELETE", path, NULL, 200));
    snprintf(path, sizeof(path), "/v1/datakeys/%s", d[3].id);
    json_decref(call("DELETE", path, NULL, 200));

    rewrap("rw", NULL, 0, 0); /* nothing below the latest yet */
    json_decref(keyop("rw", "rotate", NULL, 200));
    retire("rw", 1, 409, "key_version_in_use");
    retire("rw", 2, 409, "key_version_in_use"); /* never the latest */
    retire("rw", 9, 404, "key_not_found");
    retire("nokey", 1, 404, "key_not_found");
    ku_expect_error(&K, "DELETE", "/v1/keys/rw/versions/0", NULL, 400, "bad_request");
    ku_expect_error(&K, "DELETE", "/v1/keys/rw/versions/x1", NULL, 400, "bad_request");
    ku_expect_error(&K, "DELETE", "/v1/keys/rw/versions/01", NULL, 400, "bad_request");
    ku_expect_error(&K, "DELETE", "/v1/keys/rw/versions/4294967296", NULL, 400, "bad_request");
    expect_keyop_error("rw", "rewrap", "{\"batch\":0}", 400, "bad_request");
    expect_keyop_error("rw", "rewrap", "{\"batch\":\"5\"}", 400, "bad_request");
    expect_keyop_error("rw", "rewrap", "{\"batch\":1000001}", 400, "bad_request");
    expect_keyop_error("rw", "rewrap", "{\"size\":5}", 400, "bad_request");
    expect_keyop_error("nokey", "rewrap", NULL, 404, "key_not_found");

    /* 30 - 2 destroyed = 28 live DEKs below v2 */
    rewrap("rw", "{\"batch\":10}", 10, 18);
    rewrap("rw", "{\"batch\":10}", 10, 8);
    k = keyop("rw", "", NULL, 200);
    ck_assert_int_eq(jint(version_of(k, 1), "dek_count"), 8);
    ck_assert_int_eq(jint(version_of(k, 2), "dek_count"), 20);
    json_decref(k);
    retire("rw", 1, 409, "key_version_in_use");
    rewrap("rw", "{\"batch\":10}", 8, 0);
    rewrap("rw", "{\"batch\":10}", 0, 0);

    for (int i = 4; i < N_BATCH; i++)
        expect_decrypt(&d[i], 200, NULL);
    expect_decrypt(&d[0], 403, "dek_revoked");
    expect_decrypt(&d[2], 410, "dek_destroyed");
    snprintf(path, sizeof(path), "/v1/datakeys/%s", d[1].id);
    j = call("GET", path, NULL, 200);
    ck_assert_str_eq(jstr(j, "state"), "revoked");
    ck_assert_str_eq(jstr(j, "revoke_reason"), "superseded");
    ck_assert_int_eq(jint(j, "version"), 2);
    json_decref(j);
    snprintf(path, sizeof(path), "/v1/datakeys/%s", d[3].id);
    j = call("GET", path, NULL, 200);
    ck_assert_str_eq(jstr(j, "state"), "destroyed");
    ck_assert_int_eq(jint(j, "version"), 1);
    json_decref(j);

    token_id_of("rw", 1, v1);
    token_id_of("rw", 2, v2);
    p = token_open();
    ck_assert_int_eq(p11_kek_exists(p, v1), CKR_OK);
    snprintf(path, sizeof(path), "/v1/keys/rw/versions/1");
    k = call("DELETE", path, NULL, 200);
    ck_assert_str_eq(jstr(version_of(k, 1), "state"), "destroyed");
    ck_assert_int_eq(jint(version_of(k, 1), "dek_count"), 0);
    ck_assert_str_eq(jstr(version_of(k, 2), "state"), "active");
    json_decref(k);
    ck_assert_int_eq(p11_kek_exists(p, v1), CKR_KEY_HANDLE_INVALID);
    ck_assert_int_eq(p11_kek_exists(p, v2), CKR_OK);
    p11_close(p);
    retire("rw", 1, 200, NULL); /* again: 200 */
    k = keyop("rw", "", NULL, 200);
    ck_assert_str_eq(jstr(version_of(k, 1), "state"), "destroyed");
    json_decref(k);
    for (int i = 4; i < N_BATCH; i++)
        expect_decrypt(&d[i], 200, NULL);
}
END_TEST

START_TEST(auto_rotation_by_period)
{
    json_t *k;
    json_int_t latest = 1;

    create_key("auto");
    k = keyop("auto", "config", "{\"rotation_period\":\"2s\"}", 200);
    ck_assert_str_eq(jstr(k, "rotation_period"), "2s");
    json_decref(k);
    for (int i = 0; i < 100 && latest < 2; i++) {
        usleep(100 * 1000);
        k = keyop("auto", "", NULL, 200);
        latest = jint(k, "latest_version");
        json_decref(k);
    }
    ck_assert_int_ge(latest, 2);
    json_decref(keyop("auto", "config", "{\"rotation_period\":\"0\"}", 200));
}
END_TEST

START_TEST(wrap_count_rule)
{
    dek d;
    json_t *k;

    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    ck_assert_int_eq(kh_write_conf(&K, SERVER_EXTRA "max_wraps_per_version = 5\n", NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    create_key("wc");
    for (int i = 1; i <= 6; i++) {
        generate("wc", &d);
        ck_assert_int_eq(d.version, i <= 5 ? 1 : 2);
    }
    k = keyop("wc", "", NULL, 200);
    ck_assert_int_eq(jint(k, "latest_version"), 2);
    json_decref(k);
    expect_decrypt(&d, 200, NULL);
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    ck_assert_int_eq(kh_write_conf(&K, SERVER_EXTRA, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}
END_TEST

/* Many issuers at the wrap limit at once: every request still gets a DEK,
 * no version wraps more than the limit, and only full versions are
 * rotated (kmsd's asynchronous path meets the cap both before it wraps,
 * and at commit when a concurrent issuer took the last wrap). */
#define CAP_THREADS 8
#define CAP_EACH 10
#define CAP_LIMIT 5

static dek cap_deks[CAP_THREADS * CAP_EACH];

static void *cap_main(void *arg)
{
    int t = (int)(intptr_t)arg;

    for (int i = 0; i < CAP_EACH; i++)
        generate("wcc", &cap_deks[t * CAP_EACH + i]);
    return NULL;
}

START_TEST(wrap_count_rule_concurrent)
{
    pthread_t t[CAP_THREADS];
    int per_version[CAP_THREADS * CAP_EACH + 2] = {0};
    json_int_t latest;
    json_t *k;

    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    ck_assert_int_eq(kh_write_conf(&K, SERVER_EXTRA "max_wraps_per_version = 5\n", NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    create_key("wcc");
    for (int i = 0; i < CAP_THREADS; i++)
        pthread_create(&t[i], NULL, cap_main, (void *)(intptr_t)i);
    for (int i = 0; i < CAP_THREADS; i++)
        pthread_join(t[i], NULL);
    k = keyop("wcc", "", NULL, 200);
    latest = jint(k, "latest_version");
    json_decref(k);
    ck_assert_int_eq(latest, CAP_THREADS * CAP_EACH / CAP_LIMIT);
    for (int i = 0; i < CAP_THREADS * CAP_EACH; i++) {
        ck_assert_int_ge(cap_deks[i].version, 1);
        ck_assert_int_le(cap_deks[i].version, latest);
        per_version[cap_deks[i].version]++;
    }
    for (json_int_t v = 1; v <= latest; v++)
        ck_assert_msg(per_version[v] == CAP_LIMIT, "version %lld wrapped %d DEKs, want %d",
                      (long long)v, per_version[v], CAP_LIMIT);
    for (int i = 0; i < CAP_THREADS * CAP_EACH; i++)
        expect_decrypt(&cap_deks[i], 200, NULL);
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    ck_assert_int_eq(kh_write_conf(&K, SERVER_EXTRA, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}
END_TEST

/* ---- kill -9 mid-rewrap, and datakeys racing a rewrap ---- */

#define N_CRASH 3000
#define N_RACE  1500

static dek crash_deks[N_CRASH];

typedef struct fill_arg {
    kms_core *core;
    const char *key;
    dek *out;
    int n;
} fill_arg;

static void *fill_main(void *argp)
{
    fill_arg *a = argp;
    kms_datakey dk;

    for (int i = 0; i < a->n; i++) {
        ck_assert_int_eq(kms_dek_generate(a->core, a->key, NULL, &dk), P11KMS_OK);
        memcpy(a->out[i].id, dk.id, sizeof(a->out[i].id));
        memcpy(a->out[i].pt, dk.plaintext, 32);
        a->out[i].version = dk.version;
        kms_datakey_clear(&dk);
    }
    return NULL;
}

/* With kmsd stopped: make key `name` with n DEKs (in-process, 4 threads),
 * rotated to v2. */
static void fill_offline(const char *name, dek *out, int n)
{
    p11_ctx *p = token_open();
    kms_store *st = NULL;
    kms_core *core = NULL;
    kms_key_rec *k = NULL;
    pthread_t t[4];
    fill_arg a[4];

    ck_assert_int_eq(ts_db_open(&K.store, &st), P11KMS_OK);
    ck_assert_int_eq(kms_core_new(p, st, &core), P11KMS_OK);
    ck_assert_int_eq(kms_key_create(core, name, &k), P11KMS_OK);
    kms_key_rec_free(k);
    for (int i = 0; i < 4; i++) {
        a[i].core = core;
        a[i].key = name;
        a[i].out = out + i * (n / 4);
        a[i].n = n / 4;
        pthread_create(&t[i], NULL, fill_main, &a[i]);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(kms_key_rotate(core, name, &k), P11KMS_OK);
    kms_key_rec_free(k);
    kms_core_free(core);
    kms_store_close(st);
    p11_close(p);
}

static int deks_on_version(const char *key, int version)
{
    char sql[256];

    /* key names are [a-z0-9._-]: safe inside the quotes */
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM deks d JOIN keys k ON k.id = d.key_id "
             "WHERE k.name = '%s' AND d.version = %d",
             key, version);
    return (int)ts_db_int(&K.store, sql);
}

static void *rewrap_request_main(void *arg)
{
    kh_response r;

    /* kmsd is killed under it: no answer is fine */
    if (kh_request(K.sock, "POST", (const char *)arg, NULL, 0, NULL, &r) == 0)
        kh_response_free(&r);
    return NULL;
}

typedef struct verify_arg {
    const dek *d;
    int from, to;
} verify_arg;

static void *verify_main(void *argp)
{
    verify_arg *a = argp;

    for (int i = a->from; i < a->to; i++)
        expect_decrypt(&a->d[i], 200, NULL);
    return NULL;
}

static void verify_all(const dek *d, int n)
{
    pthread_t t[4];
    verify_arg a[4];

    for (int i = 0; i < 4; i++) {
        a[i].d = d;
        a[i].from = i * n / 4;
        a[i].to = (i + 1) * n / 4;
        pthread_create(&t[i], NULL, verify_main, &a[i]);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
}

START_TEST(kill9_mid_rewrap)
{
    char module_saved[sizeof(K.tt.module)];
    pthread_t t;
    json_t *j;
    int moved = 0, st;

    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    fill_offline("crash", crash_deks, N_CRASH);
    /* Restart kmsd through the shim: C_Decrypt 1 ms slower, so the
     * rewrap takes long enough to be killed in the middle. */
    memcpy(module_saved, K.tt.module, sizeof(module_saved));
    setenv("P11SHIM_MODULE", module_saved, 1);
    setenv("P11SHIM_DELAY_US", "1000", 1);
    setenv("P11SHIM_DELAY_FUNCS", "C_Decrypt", 1);
    snprintf(K.tt.module, sizeof(K.tt.module), "%s", P11SHIM_PATH);
    ck_assert_int_eq(kh_write_conf(&K, SERVER_EXTRA, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    memcpy(K.tt.module, module_saved, sizeof(module_saved));
    pthread_create(&t, NULL, rewrap_request_main, (void *)"/v1/keys/crash/rewrap");
    for (int i = 0; i < 2000 && moved == 0; i++) {
        usleep(5000);
        moved = deks_on_version("crash", 2);
    }
    ck_assert_int_gt(moved, 0);
    st = kh_stop(&K, SIGKILL);
    ck_assert_int_eq(st, 128 + SIGKILL);
    pthread_join(t, NULL);
    moved = deks_on_version("crash", 2);
    printf("kill9_mid_rewrap: %d of %d DEKs were on v2 when kmsd was killed\n", moved, N_CRASH);
    ck_assert_int_lt(moved, N_CRASH);
    ck_assert_int_eq(moved + deks_on_version("crash", 1), N_CRASH);
    unsetenv("P11SHIM_MODULE");
    unsetenv("P11SHIM_DELAY_US");
    unsetenv("P11SHIM_DELAY_FUNCS");
    ck_assert_int_eq(kh_write_conf(&K, SERVER_EXTRA, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    verify_all(crash_deks, N_CRASH);
    j = keyop("crash", "rewrap", NULL, 200);
    ck_assert_int_eq(jint(j, "rewrapped"), N_CRASH - moved);
    ck_assert_int_eq(jint(j, "remaining"), 0);
    json_decref(j);
    verify_all(crash_deks, N_CRASH);
    retire("crash", 1, 200, NULL);
    verify_all(crash_deks, N_CRASH);
}
END_TEST

static dek race_deks[N_RACE];
static atomic_int race_done;
static atomic_int race_requests;

static void *racer_main(void *arg)
{
    dek d;

    (void)arg;
    while (!atomic_load(&race_done)) {
        generate("race", &d); /* asserts 201 */
        ck_assert_int_eq(d.version, 2);
        expect_decrypt(&d, 200, NULL);
        expect_decrypt(&race_deks[atomic_load(&race_requests) % N_RACE], 200, NULL);
        atomic_fetch_add(&race_requests, 1);
    }
    return NULL;
}

START_TEST(datakeys_during_rewrap)
{
    pthread_t t[3];
    json_t *j;

    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    fill_offline("race", race_deks, N_RACE);
    ck_assert_int_eq(kh_start(&K), 0);
    atomic_store(&race_done, 0);
    atomic_store(&race_requests, 0);
    for (int i = 0; i < 3; i++)
        pthread_create(&t[i], NULL, racer_main, NULL);
    j = keyop("race", "rewrap", NULL, 200);
    atomic_store(&race_done, 1);
    for (int i = 0; i < 3; i++)
        pthread_join(t[i], NULL);
    ck_assert_int_eq(jint(j, "rewrapped"), N_RACE);
    ck_assert_int_eq(jint(j, "remaining"), 0);
    json_decref(j);
    printf("datakeys_during_rewrap: %d generate+decrypt rounds ran during the rewrap\n",
           atomic_load(&race_requests));
    ck_assert_int_gt(atomic_load(&race_requests), 0);
    verify_all(race_deks, N_RACE);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_rotation");
    TCase *tc = tcase_create("rotation");

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, rotate_generate_decrypt);
    tcase_add_test(tc, disable_enable);
    tcase_add_test(tc, config_min_version_and_period);
    tcase_add_test(tc, rewrap_batches_and_retire);
    tcase_add_test(tc, auto_rotation_by_period);
    tcase_add_test(tc, wrap_count_rule);
    tcase_add_test(tc, wrap_count_rule_concurrent);
    tcase_add_test(tc, kill9_mid_rewrap);
    tcase_add_test(tc, datakeys_during_rewrap);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    int failed;

    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
