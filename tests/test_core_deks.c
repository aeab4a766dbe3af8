/*
 * tests/test_core_deks.c - the core against a real SoftHSM2 token and a
 * real SQLite file: key creation, DEK generate/decrypt, every error code
 * the core answers, durability across a reopen, orphan reconciliation
 * (creation intents: only objects of old intents are destroyed, unknown
 * objects are kept),
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
#include <time.h>

#include "kms/core/core.h"
#include "testtoken.h"
#include "teststore.h"

static tt_token token;
static char dir[256];
static ts_db db;
static p11_ctx *p11;
static kms_store *store;
static kms_core *core;

static void open_grace(int64_t grace)
{
    p11_config cfg = {.module = token.module, .uri = token.uri, .pin = TT_PIN};
    kms_core_options o = {.intent_grace = grace};
    ck_assert_int_eq(p11_open(&cfg, &p11), CKR_OK);
    ck_assert_int_eq(ts_db_open(&db, &store), P11KMS_OK);
    ck_assert_int_eq(kms_core_new_ex(p11, store, &o, &core), P11KMS_OK);
}

static void open_all(void)
{
    open_grace(0); /* the default grace */
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

static size_t intents_count(void)
{
    kms_kek_intent *list = NULL;
    size_t n = 99;
    ck_assert_int_eq(kms_store_kek_intents(store, INT64_MAX, &list, &n), P11KMS_OK);
    free(list);
    return n;
}

/* A crash between C_GenerateKey and the store commit: an intent (created
 * `age` seconds ago) and the object, no version row. */
static void fake_crashed_creation(const char *key, int64_t age, unsigned char id[P11_KEK_ID_LEN])
{
    char label[128];

    snprintf(label, sizeof(label), "p11kms:%s:v1", key);
    ck_assert_int_eq(p11_random(p11, id, P11_KEK_ID_LEN), CKR_OK);
    ck_assert_int_eq(kms_store_kek_intent_add(store, id, key, 1, (int64_t)time(NULL) - age),
                     P11KMS_OK);
    ck_assert_int_eq(p11_kek_create_with_id(p11, label, id), CKR_OK);
}

/* An unknown "p11kms:" object without an intent (a key created after the
 * backup this store was restored from, or another deployment's) is KEPT
 * at start; so are objects the store knows and unrelated objects.  Key
 * creation and rotation leave no intent behind. */
START_TEST(test_unknown_object_kept_at_start)
{
    kms_key_rec *k = NULL, *r = NULL;
    unsigned char unknown[P11_KEK_ID_LEN], unrelated[P11_KEK_ID_LEN];

    ck_assert_int_eq(kms_key_create(core, "customers", &k), P11KMS_OK);
    ck_assert_int_eq(kms_key_rotate(core, "customers", &r), P11KMS_OK);
    ck_assert_uint_eq(intents_count(), 0);
    ck_assert_int_eq(p11_kek_create(p11, "p11kms:ghost:v1", unknown), CKR_OK);
    ck_assert_int_eq(p11_kek_create(p11, "someone-else:key", unrelated), CKR_OK);
    close_all();
    open_grace(KMS_INTENT_GRACE_NONE);
    ck_assert_int_eq(p11_kek_exists(p11, unknown), CKR_OK);
    ck_assert_int_eq(p11_kek_exists(p11, unrelated), CKR_OK);
    ck_assert_int_eq(p11_kek_exists(p11, k->versions[0].token_id), CKR_OK);
    ck_assert_int_eq(p11_kek_exists(p11, r->versions[1].token_id), CKR_OK);
    /* and again: kept for good, not destroyed at a later start */
    close_all();
    open_all();
    ck_assert_int_eq(p11_kek_exists(p11, unknown), CKR_OK);
    kms_key_rec_free(k);
    kms_key_rec_free(r);
}
END_TEST

/* An object whose intent is older than the grace period and which has no
 * version row is an orphan: destroyed at start, its intent deleted.  An
 * old intent without an object is deleted too. */
START_TEST(test_old_intent_orphan_destroyed)
{
    unsigned char orphan[P11_KEK_ID_LEN], gone[P11_KEK_ID_LEN];

    fake_crashed_creation("ghost", 3600, orphan);
    ck_assert_int_eq(p11_random(p11, gone, P11_KEK_ID_LEN), CKR_OK);
    ck_assert_int_eq(kms_store_kek_intent_add(store, gone, "never", 1, (int64_t)time(NULL) - 3600),
                     P11KMS_OK);
    ck_assert_uint_eq(intents_count(), 2);
    close_all();
    open_all(); /* default grace: 60 s < 3600 s */
    ck_assert_int_eq(p11_kek_exists(p11, orphan), CKR_KEY_HANDLE_INVALID);
    ck_assert_uint_eq(intents_count(), 0);
}
END_TEST

/* An intent younger than the grace period may be another node's creation
 * in flight: its object and the intent are kept; with no grace (tests)
 * the same object is destroyed. */
START_TEST(test_young_intent_kept)
{
    unsigned char busy[P11_KEK_ID_LEN];
    kms_kek_intent *list = NULL;
    size_t n = 0;

    fake_crashed_creation("inflight", 0, busy);
    close_all();
    open_all();
    ck_assert_int_eq(p11_kek_exists(p11, busy), CKR_OK);
    ck_assert_int_eq(kms_store_kek_intents(store, INT64_MAX, &list, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_mem_eq(list[0].token_id, busy, P11_KEK_ID_LEN);
    ck_assert_str_eq(list[0].key_name, "inflight");
    ck_assert_uint_eq(list[0].version, 1);
    free(list);
    /* older_than filters */
    ck_assert_int_eq(kms_store_kek_intents(store, (int64_t)time(NULL) - 3600, &list, &n),
                     P11KMS_OK);
    ck_assert_uint_eq(n, 0);
    free(list);
    close_all();
    open_grace(KMS_INTENT_GRACE_NONE);
    ck_assert_int_eq(p11_kek_exists(p11, busy), CKR_KEY_HANDLE_INVALID);
    ck_assert_uint_eq(intents_count(), 0);
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
    tcase_add_test(tc, test_unknown_object_kept_at_start);
    tcase_add_test(tc, test_old_intent_orphan_destroyed);
    tcase_add_test(tc, test_young_intent_kept);
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
