/*
 * tests/test_store_rotation.c - the store's key-rotation functions on a
 * real SQLite file (no token: token ids and wrapped bytes are made up):
 * the compare-and-set of kms_store_version_add (also under 8 racing
 * threads), enable/disable, min_decrypt_version bounds and
 * rotation_period, the rewrap read (active and revoked only, cursor
 * order) and the conditional rewrap commit (a row changed since the read
 * is not touched; wrap_count grows by the rows moved), retire (latest and
 * in-use refused, idempotent, destroyed ids listed), the wrap cap of
 * kms_store_dek_insert_capped, and the keys due for rotation.
 */
#include <check.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kms/store/store.h"
#include "testtoken.h"
#include "teststore.h"

static char dir[256];
static ts_db db;
static kms_store *st;

static void setup(void)
{
    ck_assert_int_eq(tt_tempdir(dir, sizeof(dir)), 0);
    ck_assert_int_eq(ts_db_new(dir, &db), 0);
    ck_assert_int_eq(ts_db_open(&db, &st), P11KMS_OK);
}

static void teardown(void)
{
    kms_store_close(st);
    st = NULL;
    ts_db_drop(&db);
    tt_rmtree(dir);
}

static void token_id(unsigned char id[KMS_TOKEN_ID_LEN], unsigned seed)
{
    memset(id, 0, KMS_TOKEN_ID_LEN);
    memcpy(id, &seed, sizeof(seed));
    id[15] = 0xa5;
}

static void make_key(const char *name)
{
    unsigned char id[KMS_TOKEN_ID_LEN];

    token_id(id, (unsigned)(name[0] * 1000 + strlen(name)));
    ck_assert_int_eq(kms_store_key_create(st, name, id, 1000), P11KMS_OK);
}

static void dek_id(char out[KMS_DEK_ID_LEN + 1], unsigned n)
{
    snprintf(out, KMS_DEK_ID_LEN + 1, "%08x-0000-4000-8000-000000000000", n);
}

static void insert_dek(const char *key, uint32_t version, unsigned n)
{
    kms_dek_rec d;

    memset(&d, 0, sizeof(d));
    dek_id(d.id, n);
    snprintf(d.key, sizeof(d.key), "%s", key);
    d.version = version;
    d.state = KMS_DEK_ACTIVE;
    d.context = (char *)"{}";
    memset(d.wrapped, (int)version, 60);
    d.wrapped_len = 60;
    d.created = 2000;
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_OK);
}

static kms_key_rec *get_key(const char *name)
{
    kms_key_rec *k = NULL;

    ck_assert_int_eq(kms_store_key_get(st, name, &k), P11KMS_OK);
    return k;
}

static uint32_t add_version(const char *name, uint32_t expected, unsigned seed)
{
    unsigned char id[KMS_TOKEN_ID_LEN];
    uint32_t added = 99;

    token_id(id, seed);
    ck_assert_int_eq(kms_store_version_add(st, name, expected, id, 3000, &added), P11KMS_OK);
    return added;
}

START_TEST(version_add_compare_and_set)
{
    kms_key_rec *k;
    unsigned char id[KMS_TOKEN_ID_LEN];
    uint32_t added = 0;

    make_key("k");
    ck_assert_uint_eq(add_version("k", 1, 11), 2);
    ck_assert_uint_eq(add_version("k", 1, 12), 0); /* latest moved: nothing written */
    ck_assert_uint_eq(add_version("k", 2, 13), 3);
    k = get_key("k");
    ck_assert_uint_eq(k->latest_version, 3);
    ck_assert_uint_eq(k->n_versions, 3);
    ck_assert_uint_eq(k->versions[1].version, 2);
    ck_assert_int_eq(k->versions[1].state, KMS_VERSION_ACTIVE);
    ck_assert_int_eq(k->versions[1].created, 3000);
    kms_key_rec_free(k);
    token_id(id, 14);
    ck_assert_int_eq(kms_store_version_add(st, "nope", 1, id, 1, &added), P11KMS_ERR_KEY_NOT_FOUND);
    /* the same token id twice is a bug, refused */
    token_id(id, 13);
    ck_assert_int_eq(kms_store_version_add(st, "k", 3, id, 1, &added), P11KMS_ERR_INTERNAL);
    k = get_key("k");
    ck_assert_uint_eq(k->latest_version, 3);
    kms_key_rec_free(k);
}
END_TEST

typedef struct racer {
    unsigned seed;
    uint32_t added;
    pthread_barrier_t *go;
} racer;

static void *race_main(void *arg)
{
    racer *r = arg;
    unsigned char id[KMS_TOKEN_ID_LEN];

    token_id(id, r->seed);
    pthread_barrier_wait(r->go);
    if (kms_store_version_add(st, "race", 1, id, 5, &r->added) != P11KMS_OK)
        r->added = 999;
    return NULL;
}

START_TEST(version_add_race_one_winner)
{
    pthread_t t[8];
    racer r[8];
    pthread_barrier_t go;
    int winners = 0;
    kms_key_rec *k;

    make_key("race");
    pthread_barrier_init(&go, NULL, 8);
    for (int i = 0; i < 8; i++) {
        r[i].seed = 100 + (unsigned)i;
        r[i].go = &go;
        pthread_create(&t[i], NULL, race_main, &r[i]);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(t[i], NULL);
        ck_assert_uint_ne(r[i].added, 999);
        if (r[i].added == 2)
            winners++;
        else
            ck_assert_uint_eq(r[i].added, 0);
    }
    pthread_barrier_destroy(&go);
    ck_assert_int_eq(winners, 1);
    k = get_key("race");
    ck_assert_uint_eq(k->n_versions, 2);
    kms_key_rec_free(k);
}
END_TEST

START_TEST(state_and_config)
{
    kms_key_rec *k;

    make_key("c");
    ck_assert_int_eq(kms_store_key_set_state(st, "c", KMS_KEY_DISABLED), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_set_state(st, "c", KMS_KEY_DISABLED), P11KMS_OK);
    k = get_key("c");
    ck_assert_int_eq(k->state, KMS_KEY_DISABLED);
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_store_key_set_state(st, "c", KMS_KEY_ENABLED), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_set_state(st, "zz", KMS_KEY_ENABLED), P11KMS_ERR_KEY_NOT_FOUND);

    ck_assert_int_eq(kms_store_key_config(st, "c", 2, -1), P11KMS_ERR_BAD_REQUEST); /* > latest */
    ck_assert_int_eq(kms_store_key_config(st, "c", 0, -1), P11KMS_ERR_BAD_REQUEST); /* nothing */
    ck_assert_int_eq(kms_store_key_config(st, "zz", 1, -1), P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_uint_eq(add_version("c", 1, 21), 2);
    ck_assert_int_eq(kms_store_key_config(st, "c", 2, 7776000), P11KMS_OK);
    k = get_key("c");
    ck_assert_int_eq(k->state, KMS_KEY_ENABLED);
    ck_assert_uint_eq(k->min_decrypt_version, 2);
    ck_assert_int_eq(k->rotation_period, 7776000);
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_store_key_config(st, "c", 0, 0), P11KMS_OK);  /* period off, min kept */
    ck_assert_int_eq(kms_store_key_config(st, "c", 1, -1), P11KMS_OK); /* lowering is allowed */
    k = get_key("c");
    ck_assert_uint_eq(k->min_decrypt_version, 1);
    ck_assert_int_eq(k->rotation_period, 0);
    kms_key_rec_free(k);
}
END_TEST

START_TEST(rewrap_read_in_cursor_order)
{
    kms_dek_rec **deks = NULL;
    size_t n = 0;
    uint64_t left = 0;
    char id[KMS_DEK_ID_LEN + 1], cursor[KMS_DEK_ID_LEN + 1];

    make_key("r");
    make_key("other");
    for (unsigned i = 0; i < 10; i++)
        insert_dek("r", 1, i);
    insert_dek("other", 1, 50);
    dek_id(id, 2);
    ck_assert_int_eq(kms_store_dek_revoke(st, id, KMS_REVOKE_COMPROMISED, 5), P11KMS_OK);
    dek_id(id, 4);
    ck_assert_int_eq(kms_store_dek_destroy(st, id, 5), P11KMS_OK);
    ck_assert_uint_eq(add_version("r", 1, 31), 2);
    insert_dek("r", 2, 20); /* already on the latest */

    ck_assert_int_eq(kms_store_rewrap_remaining(st, "r", 2, &left), P11KMS_OK);
    ck_assert_uint_eq(left, 9); /* 10 - 1 destroyed */
    ck_assert_int_eq(kms_store_rewrap_remaining(st, "r", 1, &left), P11KMS_OK);
    ck_assert_uint_eq(left, 0);
    ck_assert_int_eq(kms_store_rewrap_read(st, "r", 2, NULL, 4, &deks, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 4);
    dek_id(id, 0);
    ck_assert_str_eq(deks[0]->id, id);
    ck_assert_uint_eq(deks[0]->wrapped_len, 60);
    ck_assert_uint_eq(deks[0]->version, 1);
    ck_assert_str_eq(deks[0]->context, "{}");
    dek_id(id, 2);
    ck_assert_str_eq(deks[2]->id, id); /* revoked ones too */
    ck_assert_int_eq(deks[2]->state, KMS_DEK_REVOKED);
    memcpy(cursor, deks[3]->id, sizeof(cursor));
    kms_dek_list_free(deks, n);
    ck_assert_int_eq(kms_store_rewrap_read(st, "r", 2, cursor, 4, &deks, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 4);
    dek_id(id, 5); /* the destroyed DEK 4 is skipped */
    ck_assert_str_eq(deks[0]->id, id);
    memcpy(cursor, deks[3]->id, sizeof(cursor));
    kms_dek_list_free(deks, n);
    ck_assert_int_eq(kms_store_rewrap_read(st, "r", 2, cursor, 4, &deks, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 1); /* 9; not 20 (on v2), not 50 (other key) */
    dek_id(id, 9);
    ck_assert_str_eq(deks[0]->id, id);
    kms_dek_list_free(deks, n);
    ck_assert_int_eq(kms_store_rewrap_read(st, "zz", 2, NULL, 4, &deks, &n),
                     P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_store_rewrap_read(st, "r", 2, NULL, 0, &deks, &n), P11KMS_ERR_BAD_REQUEST);
}
END_TEST

START_TEST(rewrap_commit_conditional)
{
    kms_rewrap_item items[4];
    kms_dek_rec *d = NULL;
    kms_key_rec *k;
    uint64_t moved = 0, left = 0;
    char id[KMS_DEK_ID_LEN + 1];

    make_key("w");
    for (unsigned i = 0; i < 4; i++)
        insert_dek("w", 1, 100 + i);
    dek_id(id, 102);
    ck_assert_int_eq(kms_store_dek_revoke(st, id, KMS_REVOKE_CESSATION, 5), P11KMS_OK);
    ck_assert_uint_eq(add_version("w", 1, 41), 2);
    memset(items, 0, sizeof(items));
    for (unsigned i = 0; i < 4; i++) {
        dek_id(items[i].id, 100 + i);
        items[i].old_version = 1;
        memset(items[i].wrapped, 0x77, 61);
        items[i].wrapped_len = 61;
    }
    /* a target that does not exist moves nothing */
    ck_assert_int_eq(kms_store_rewrap_commit(st, "w", 5, items, 4, &moved), P11KMS_OK);
    ck_assert_uint_eq(moved, 0);
    /* DEK 100 destroyed after the read; DEK 101 moved by someone else */
    dek_id(id, 100);
    ck_assert_int_eq(kms_store_dek_destroy(st, id, 6), P11KMS_OK);
    ck_assert_int_eq(kms_store_rewrap_commit(st, "w", 2, &items[1], 1, &moved), P11KMS_OK);
    ck_assert_uint_eq(moved, 1);
    memset(items[1].wrapped, 0x55, 61);
    ck_assert_int_eq(kms_store_rewrap_commit(st, "w", 2, items, 4, &moved), P11KMS_OK);
    ck_assert_uint_eq(moved, 2); /* 102 (revoked) and 103 */
    ck_assert_int_eq(kms_store_rewrap_remaining(st, "w", 2, &left), P11KMS_OK);
    ck_assert_uint_eq(left, 0);

    dek_id(id, 101);
    ck_assert_int_eq(kms_store_dek_get(st, id, &d), P11KMS_OK);
    ck_assert_uint_eq(d->version, 2);
    ck_assert_uint_eq(d->wrapped[0], 0x77); /* the first commit's bytes, not overwritten */
    kms_dek_rec_free(d);
    dek_id(id, 102);
    ck_assert_int_eq(kms_store_dek_get(st, id, &d), P11KMS_OK);
    ck_assert_int_eq(d->state, KMS_DEK_REVOKED);
    ck_assert_int_eq(d->revoke_reason, KMS_REVOKE_CESSATION);
    ck_assert_uint_eq(d->version, 2);
    kms_dek_rec_free(d);
    dek_id(id, 100);
    ck_assert_int_eq(kms_store_dek_get(st, id, &d), P11KMS_OK);
    ck_assert_int_eq(d->state, KMS_DEK_DESTROYED);
    ck_assert_uint_eq(d->version, 1);
    ck_assert_uint_eq(d->wrapped_len, 0);
    kms_dek_rec_free(d);
    k = get_key("w");
    ck_assert_uint_eq(k->versions[1].wrap_count, 3);
    ck_assert_uint_eq(k->versions[1].dek_count, 3);
    ck_assert_uint_eq(k->versions[0].dek_count, 0);
    kms_key_rec_free(k);
}
END_TEST

START_TEST(retire_rules)
{
    unsigned char(*ids)[KMS_TOKEN_ID_LEN] = NULL;
    unsigned char want[KMS_TOKEN_ID_LEN];
    kms_rewrap_item item;
    uint64_t moved = 0;
    size_t n = 0;
    kms_key_rec *k;

    make_key("t");
    insert_dek("t", 1, 200);
    ck_assert_int_eq(kms_store_version_retire(st, "t", 1, 9), P11KMS_ERR_KEY_VERSION_IN_USE);
    ck_assert_uint_eq(add_version("t", 1, 51), 2);
    ck_assert_int_eq(kms_store_version_retire(st, "t", 2, 9), P11KMS_ERR_KEY_VERSION_IN_USE);
    ck_assert_int_eq(kms_store_version_retire(st, "t", 1, 9), P11KMS_ERR_KEY_VERSION_IN_USE);
    ck_assert_int_eq(kms_store_version_retire(st, "t", 7, 9), P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_store_version_retire(st, "none", 1, 9), P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_store_token_ids_destroyed(st, &ids, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 0);
    free(ids);
    ids = NULL;
    memset(&item, 0, sizeof(item));
    dek_id(item.id, 200);
    item.old_version = 1;
    item.wrapped_len = 60;
    ck_assert_int_eq(kms_store_rewrap_commit(st, "t", 2, &item, 1, &moved), P11KMS_OK);
    ck_assert_uint_eq(moved, 1);
    ck_assert_int_eq(kms_store_version_retire(st, "t", 1, 9), P11KMS_OK);
    ck_assert_int_eq(kms_store_version_retire(st, "t", 1, 10), P11KMS_OK); /* idempotent */
    k = get_key("t");
    ck_assert_int_eq(k->versions[0].state, KMS_VERSION_DESTROYED);
    ck_assert_int_eq(k->versions[1].state, KMS_VERSION_ACTIVE);
    memcpy(want, k->versions[0].token_id, sizeof(want));
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_store_token_ids_destroyed(st, &ids, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_mem_eq(ids[0], want, KMS_TOKEN_ID_LEN);
    free(ids);
    ids = NULL;
    ck_assert_int_eq(kms_store_token_ids(st, &ids, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 2); /* destroyed ones included */
    free(ids);
}
END_TEST

START_TEST(insert_capped)
{
    kms_dek_rec d;
    kms_key_rec *k;
    int refused = 7;

    make_key("cap");
    memset(&d, 0, sizeof(d));
    snprintf(d.key, sizeof(d.key), "cap");
    d.version = 1;
    d.context = (char *)"{}";
    d.wrapped_len = 60;
    d.created = 1;
    for (unsigned i = 0; i < 4; i++) {
        dek_id(d.id, 300 + i);
        ck_assert_int_eq(kms_store_dek_insert_capped(st, &d, 3, &refused), P11KMS_OK);
        ck_assert_int_eq(refused, i == 3);
    }
    k = get_key("cap");
    ck_assert_uint_eq(k->versions[0].wrap_count, 3);
    ck_assert_uint_eq(k->versions[0].dek_count, 3); /* the 4th was not written */
    kms_key_rec_free(k);
    d.version = 9;
    ck_assert_int_eq(kms_store_dek_insert_capped(st, &d, 3, &refused), P11KMS_ERR_KEY_NOT_FOUND);
    /* a destroyed version takes no DEK, capped or not */
    ck_assert_uint_eq(add_version("cap", 1, 61), 2);
    ck_assert_uint_eq(add_version("cap", 2, 62), 3);
    ck_assert_int_eq(kms_store_version_retire(st, "cap", 2, 5), P11KMS_OK);
    d.version = 2;
    dek_id(d.id, 310);
    ck_assert_int_eq(kms_store_dek_insert_capped(st, &d, 100, &refused), P11KMS_OK);
    ck_assert_int_eq(refused, 1);
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_ERR_KEY_NOT_FOUND);
}
END_TEST

START_TEST(rotation_due)
{
    kms_rotation_due *due = NULL;
    size_t n = 0;

    make_key("a"); /* created 1000 */
    make_key("b");
    make_key("off");
    ck_assert_int_eq(kms_store_key_config(st, "a", 0, 100), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_config(st, "b", 0, 100), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_set_state(st, "b", KMS_KEY_DISABLED), P11KMS_OK);
    ck_assert_int_eq(kms_store_rotation_due(st, 1099, &due, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 0);
    free(due);
    ck_assert_int_eq(kms_store_rotation_due(st, 1100, &due, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(due[0].name, "a");
    ck_assert_uint_eq(due[0].latest_version, 1);
    free(due);
    ck_assert_uint_eq(add_version("a", 1, 71), 2); /* created 3000 */
    ck_assert_int_eq(kms_store_rotation_due(st, 3050, &due, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 0);
    free(due);
    ck_assert_int_eq(kms_store_rotation_due(st, 3100, &due, &n), P11KMS_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_uint_eq(due[0].latest_version, 2);
    free(due);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("store_rotation");
    TCase *tc = tcase_create("rotation");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, version_add_compare_and_set);
    tcase_add_test(tc, version_add_race_one_winner);
    tcase_add_test(tc, state_and_config);
    tcase_add_test(tc, rewrap_read_in_cursor_order);
    tcase_add_test(tc, rewrap_commit_conditional);
    tcase_add_test(tc, retire_rules);
    tcase_add_test(tc, insert_capped);
    tcase_add_test(tc, rotation_due);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
