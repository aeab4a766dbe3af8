/*
 * tests/test_core_deks.c - the core against a real SoftHSM2 token and a
 * real SQLite file: key creation, DEK generate/decrypt, every error code
 * the core answers, durability across a reopen, orphan reconciliation,
 * concurrent issuance, and the argument checks of the DEK lifecycle
 * functions (the lifecycle itself is tested in test_store_deks and
 * test_kmsd_deks).
 */
#include <check.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms/core/core.h"
#include "testtoken.h"
#include "teststore.h"

static tt_token token;
static char dir[256];
static ts_db db;
static p11_ctx *p11;
static kms_store *store;
static kms_core *core;

static void open_all(void)
{
    p11_config cfg = {.module = token.module, .uri = token.uri, .pin = TT_PIN};
    ck_assert_int_eq(p11_open(&cfg, &p11), CKR_OK);
    ck_assert_int_eq(ts_db_open(&db, &store), P11KMS_OK);
    ck_assert_int_eq(kms_core_new(p11, store, &core), P11KMS_OK);
}

static void close_all(void)
{
    kms_core_free(core);
    kms_store_close(store);
    p11_close(p11);
    core = NULL;
    store = NULL;
    p11 = NULL;
}

static void setup(void)
{
    ck_assert_int_eq(tt_token_new("core-test", &token), 0);
    ck_assert_int_eq(tt_tempdir(dir, sizeof(dir)), 0);
    ck_assert_int_eq(ts_db_new(dir, &db), 0);
    open_all();
}

static void teardown(void)
{
    close_all();
    ts_db_drop(&db);
    tt_rmtree(dir);
    tt_token_remove(&token);
}

static json_t *ctx1(const char *customer)
{
    return json_pack("{s:s, s:s}", "customer", customer, "region", "eu");
}

START_TEST(test_key_create_show_list)
{
    kms_key_rec *k = NULL, **list = NULL;
    size_t n = 0;

    ck_assert_int_eq(kms_key_create(core, "customers", &k), P11KMS_OK);
    ck_assert_str_eq(k->name, "customers");
    ck_assert_int_eq(k->state, KMS_KEY_ENABLED);
    ck_assert_uint_eq(k->latest_version, 1);
    ck_assert_uint_eq(k->min_decrypt_version, 1);
    ck_assert_uint_eq(k->n_versions, 1);
    ck_assert_int_eq(k->versions[0].state, KMS_VERSION_ACTIVE);
    ck_assert_int_eq(p11_kek_exists(p11, k->versions[0].token_id), CKR_OK);
    kms_key_rec_free(k);
    k = NULL;

    ck_assert_int_eq(kms_key_create(core, "customers", &k), P11KMS_ERR_KEY_EXISTS);
    ck_assert_int_eq(kms_key_create(core, "Bad Name", &k), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_key_show(core, "missing", &k), P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_key_create(core, "orders", &k), P11KMS_OK);
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_key_list(core, &list, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 2);
    ck_assert_str_eq(list[0]->name, "customers");
    ck_assert_str_eq(list[1]->name, "orders");
    kms_key_list_free(list, n);
}
END_TEST

START_TEST(test_generate_decrypt_round_trip)
{
    kms_key_rec *k = NULL;
    kms_datakey a, b;
    json_t *c = ctx1("42");
    json_t *same = json_pack("{s:s, s:s}", "region", "eu", "customer", "42");

    ck_assert_int_eq(kms_key_create(core, "customers", &k), P11KMS_OK);
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_dek_generate(core, "customers", c, &a), P11KMS_OK);
    ck_assert(kms_dek_id_valid(a.id));
    ck_assert_str_eq(a.key, "customers");
    ck_assert_uint_eq(a.version, 1);
    ck_assert_int_eq(kms_dek_decrypt(core, a.id, same, &b), P11KMS_OK);
    ck_assert_str_eq(b.id, a.id);
    ck_assert_int_eq(memcmp(a.plaintext, b.plaintext, KMS_DEK_LEN), 0);
    kms_datakey_clear(&b);
    for (size_t i = 0; i < sizeof(b); i++)
        ck_assert_int_eq(((unsigned char *)&b)[i], 0);

    /* the store holds the wrapped DEK only: never the plaintext */
    kms_dek_rec *row = NULL;
    ck_assert_int_eq(kms_store_dek_get(store, a.id, &row), P11KMS_OK);
    ck_assert_uint_eq(row->wrapped_len, P11_WRAP_OVERHEAD + KMS_DEK_LEN);
    ck_assert_ptr_null(memmem(row->wrapped, row->wrapped_len, a.plaintext, 8));
    ck_assert_str_eq(row->context, "{\"customer\":\"42\",\"region\":\"eu\"}");
    kms_dek_rec_free(row);
    kms_datakey_clear(&a);
    json_decref(c);
    json_decref(same);
}
END_TEST

START_TEST(test_decrypt_errors)
{
    kms_key_rec *k = NULL;
    kms_datakey a, b;
    json_t *c = ctx1("42"), *other = ctx1("43");

    ck_assert_int_eq(kms_key_create(core, "customers", &k), P11KMS_OK);
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_dek_generate(core, "missing", c, &a), P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_dek_generate(core, "BAD", c, &a), P11KMS_ERR_BAD_REQUEST);
    json_t *bad = json_pack("{s:i}", "n", 1);
    ck_assert_int_eq(kms_dek_generate(core, "customers", bad, &a), P11KMS_ERR_BAD_REQUEST);
    json_decref(bad);
    ck_assert_int_eq(kms_dek_generate(core, "customers", c, &a), P11KMS_OK);
    ck_assert_int_eq(kms_dek_decrypt(core, a.id, other, &b), P11KMS_ERR_CONTEXT_MISMATCH);
    ck_assert_int_eq(kms_dek_decrypt(core, a.id, NULL, &b), P11KMS_ERR_CONTEXT_MISMATCH);
    ck_assert_int_eq(kms_dek_decrypt(core, "00000000-0000-4000-8000-000000000000", c, &b),
                     P11KMS_ERR_DEK_NOT_FOUND);
    ck_assert_int_eq(kms_dek_decrypt(core, "not-a-uuid", c, &b), P11KMS_ERR_DEK_NOT_FOUND);
    kms_datakey_clear(&a);
    json_decref(c);
    json_decref(other);
}
END_TEST

/* Flip one byte of the stored wrapped DEK in the database itself. */
START_TEST(test_integrity_failure)
{
    kms_key_rec *k = NULL;
    kms_datakey a, b;
    json_t *c = ctx1("42");

    ck_assert_int_eq(kms_key_create(core, "customers", &k), P11KMS_OK);
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_dek_generate(core, "customers", c, &a), P11KMS_OK);
    close_all();
    unsigned char blob[128];
    size_t len = 0;
    ck_assert_int_eq(ts_db_wrapped_get(&db, a.id, blob, sizeof(blob), &len), 0);
    ck_assert_int_gt(len, 20);
    blob[20] ^= 0x01;
    ck_assert_int_eq(ts_db_wrapped_set(&db, a.id, blob, len), 0);
    open_all();
    ck_assert_int_eq(kms_dek_decrypt(core, a.id, c, &b), P11KMS_ERR_INTEGRITY_FAILURE);
    kms_datakey_clear(&a);
    json_decref(c);
}
END_TEST

START_TEST(test_durable_across_reopen)
{
    kms_key_rec *k = NULL;
    kms_datakey a, b;
    json_t *c = ctx1("7");

    ck_assert_int_eq(kms_key_create(core, "customers", &k), P11KMS_OK);
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_dek_generate(core, "customers", c, &a), P11KMS_OK);
    close_all();
    open_all();
    ck_assert_int_eq(kms_dek_decrypt(core, a.id, c, &b), P11KMS_OK);
    ck_assert_int_eq(memcmp(a.plaintext, b.plaintext, KMS_DEK_LEN), 0);
    kms_datakey_clear(&a);
    kms_datakey_clear(&b);
    json_decref(c);
}
END_TEST

/* A KEK object left by a crash between C_GenerateKey and the store commit
 * is destroyed at the next start; objects the store knows are kept. */
START_TEST(test_orphan_reconciled_at_start)
{
    kms_key_rec *k = NULL;
    unsigned char orphan[P11_KEK_ID_LEN], unrelated[P11_KEK_ID_LEN];

    ck_assert_int_eq(kms_key_create(core, "customers", &k), P11KMS_OK);
    ck_assert_int_eq(p11_kek_create(p11, "p11kms:ghost:v1", orphan), CKR_OK);
    ck_assert_int_eq(p11_kek_create(p11, "someone-else:key", unrelated), CKR_OK);
    close_all();
    open_all();
    ck_assert_int_eq(p11_kek_exists(p11, orphan), CKR_KEY_HANDLE_INVALID);
    ck_assert_int_eq(p11_kek_exists(p11, unrelated), CKR_OK);
    ck_assert_int_eq(p11_kek_exists(p11, k->versions[0].token_id), CKR_OK);
    kms_key_rec_free(k);
}
END_TEST

#define THREADS 8
#define PER_THREAD 150

struct worker_arg {
    kms_datakey keys[PER_THREAD];
    int failures;
};

static void *issue_worker(void *p)
{
    struct worker_arg *w = p;
    json_t *c = ctx1("concurrent");
    for (int i = 0; i < PER_THREAD; i++)
        if (kms_dek_generate(core, "customers", c, &w->keys[i]) != P11KMS_OK)
            w->failures++;
    json_decref(c);
    return NULL;
}

START_TEST(test_concurrent_issuance)
{
    kms_key_rec *k = NULL;
    pthread_t th[THREADS];
    struct worker_arg *args = calloc(THREADS, sizeof(*args));
    json_t *c = ctx1("concurrent");

    ck_assert_int_eq(kms_key_create(core, "customers", &k), P11KMS_OK);
    kms_key_rec_free(k);
    for (int t = 0; t < THREADS; t++)
        pthread_create(&th[t], NULL, issue_worker, &args[t]);
    for (int t = 0; t < THREADS; t++)
        pthread_join(th[t], NULL);
    for (int t = 0; t < THREADS; t++) {
        ck_assert_int_eq(args[t].failures, 0);
        for (int i = 0; i < PER_THREAD; i += 15) {
            kms_datakey b;
            ck_assert_int_eq(kms_dek_decrypt(core, args[t].keys[i].id, c, &b), P11KMS_OK);
            ck_assert_int_eq(memcmp(b.plaintext, args[t].keys[i].plaintext, KMS_DEK_LEN), 0);
            kms_datakey_clear(&b);
        }
    }
    ck_assert_int_eq(kms_key_show(core, "customers", &k), P11KMS_OK);
    ck_assert_uint_eq(k->versions[0].dek_count, THREADS * PER_THREAD);
    ck_assert_uint_eq(k->versions[0].wrap_count, THREADS * PER_THREAD);
    kms_key_rec_free(k);
    for (int t = 0; t < THREADS; t++)
        for (int i = 0; i < PER_THREAD; i++)
            kms_datakey_clear(&args[t].keys[i]);
    free(args);
    json_decref(c);
}
END_TEST

/* The lifecycle functions' own checks (kmsd validates first, so these
 * are reachable only through the core API). */
START_TEST(test_lifecycle_argument_errors)
{
    kms_key_rec *k = NULL;
    kms_dek_rec *d = NULL, **deks = NULL;
    kms_datakey dk;
    json_t *ctx = ctx1("1"), *empty = json_object(), *bad = json_pack("{s:i}", "customer", 1);
    char next[KMS_DEK_ID_LEN + 1];
    size_t n = 0;
    uint64_t count = 5;

    ck_assert_int_eq(kms_key_create(core, "life", &k), P11KMS_OK);
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_dek_generate(core, "life", ctx, &dk), P11KMS_OK);

    ck_assert_int_eq(kms_dek_show(core, "not-a-uuid", &d), P11KMS_ERR_DEK_NOT_FOUND);
    ck_assert_int_eq(kms_dek_show(core, "0B5E2A5C-6A4E-4F51-9E0E-5F7A8C9D0E1F", &d),
                     P11KMS_ERR_DEK_NOT_FOUND);
    ck_assert_int_eq(kms_dek_revoke(core, dk.id, KMS_REVOKE_NONE, NULL), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_dek_revoke(core, "nope", KMS_REVOKE_CESSATION, NULL),
                     P11KMS_ERR_DEK_NOT_FOUND);
    ck_assert_int_eq(kms_dek_destroy(core, "nope", NULL), P11KMS_ERR_DEK_NOT_FOUND);
    ck_assert_int_eq(kms_dek_list(core, "Bad", -1, NULL, 0, &deks, &n, next),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_dek_list(core, "life", -1, "bad-cursor", 0, &deks, &n, next),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_dek_list(core, "life", 7, NULL, 0, &deks, &n, next),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_dek_list(core, "life", -1, NULL, KMS_DEK_LIST_MAX + 1, &deks, &n, next),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_dek_list(core, "nope", -1, NULL, 0, &deks, &n, next),
                     P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_dek_destroy_bulk(core, "life", empty, &count), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_dek_destroy_bulk(core, "life", NULL, &count), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_dek_destroy_bulk(core, "life", bad, &count), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_dek_destroy_bulk(core, "Bad", ctx, &count), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_dek_revoke_bulk(core, "life", ctx, KMS_REVOKE_NONE, &count),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_dek_revoke_bulk(core, "nope", ctx, KMS_REVOKE_CESSATION, &count),
                     P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_uint_eq(count, 5);

    /* the happy path: records never carry wrapped bytes; decrypt sees each change */
    ck_assert_int_eq(kms_dek_show(core, dk.id, &d), P11KMS_OK);
    ck_assert_uint_eq(d->wrapped_len, 0);
    kms_dek_rec_free(d);
    ck_assert_int_eq(kms_dek_list(core, "life", KMS_DEK_ACTIVE, "", 0, &deks, &n, next), P11KMS_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(next, "");
    kms_dek_list_free(deks, n);
    ck_assert_int_eq(kms_dek_revoke_bulk(core, "life", ctx, KMS_REVOKE_CESSATION, &count),
                     P11KMS_OK);
    ck_assert_uint_eq(count, 1);
    ck_assert_int_eq(kms_dek_decrypt(core, dk.id, ctx, &dk), P11KMS_ERR_DEK_REVOKED);
    ck_assert_int_eq(kms_dek_destroy(core, dk.id, &d), P11KMS_OK);
    ck_assert_int_eq(d->state, KMS_DEK_DESTROYED);
    ck_assert_uint_eq(d->wrapped_len, 0);
    kms_dek_rec_free(d);
    ck_assert_int_eq(kms_dek_decrypt(core, dk.id, ctx, &dk), P11KMS_ERR_DEK_DESTROYED);
    kms_datakey_clear(&dk);
    json_decref(ctx);
    json_decref(empty);
    json_decref(bad);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("core_deks");
    TCase *tc = tcase_create("token+store");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_key_create_show_list);
    tcase_add_test(tc, test_generate_decrypt_round_trip);
    tcase_add_test(tc, test_decrypt_errors);
    tcase_add_test(tc, test_integrity_failure);
    tcase_add_test(tc, test_durable_across_reopen);
    tcase_add_test(tc, test_orphan_reconciled_at_start);
    tcase_add_test(tc, test_concurrent_issuance);
    tcase_add_test(tc, test_lifecycle_argument_errors);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
