/*
 * tests/test_core_rotation.c - key rotation in the core against a real
 * SoftHSM2 token and SQLite file: rotate (new DEKs on the new version, old
 * ones still decrypt, labels and objects in the token), concurrent
 * rotations (distinct versions, no object left over), the wrap cap
 * (max_wraps_per_version = 5: the 6th DEK lands on v2; racing issuers
 * never exceed it), a crash between the token object and the store row
 * (a forked child killed by the test hook; its creation intent makes the
 * orphan reconciled -- kept within the grace period, destroyed after -- at the
 * next start), an interrupted retire finished at start, rewrap (batched
 * and whole; revoked stay revoked, destroyed untouched; every DEK
 * decrypts to the same bytes) followed by retire with the object gone,
 * and the rotation-period check.  Prints the rewrap rate next to raw
 * C_Decrypt + C_Encrypt in the same run (information, never asserted).
 */
#include <check.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kms/core/core.h"
#include "testtoken.h"
#include "teststore.h"

static tt_token token;
static char dir[256];
static ts_db db;
static p11_ctx *p11;
static kms_store *store;
static kms_core *core;

static int64_t intent_grace; /* kms_core_options.intent_grace of open_with */

static void open_with(uint64_t max_wraps)
{
    p11_config cfg = {.module = token.module, .uri = token.uri, .pin = TT_PIN};
    kms_core_options o = {.max_wraps_per_version = max_wraps, .intent_grace = intent_grace};

    ck_assert_int_eq(p11_open(&cfg, &p11), CKR_OK);
    ck_assert_int_eq(ts_db_open(&db, &store), P11KMS_OK);
    ck_assert_int_eq(kms_core_new_ex(p11, store, &o, &core), P11KMS_OK);
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
    intent_grace = 0;
    ck_assert_int_eq(tt_token_new("core-rot", &token), 0);
    ck_assert_int_eq(tt_tempdir(dir, sizeof(dir)), 0);
    ck_assert_int_eq(ts_db_new(dir, &db), 0);
    open_with(0);
}

static void teardown(void)
{
    close_all();
    ts_db_drop(&db);
    tt_rmtree(dir);
    tt_token_remove(&token);
}

static size_t token_objects(void)
{
    unsigned char(*ids)[P11_KEK_ID_LEN] = NULL;
    size_t n = 0;

    ck_assert_int_eq(p11_kek_list(p11, KMS_KEK_LABEL_PREFIX, &ids, &n), CKR_OK);
    free(ids);
    return n;
}

static kms_key_rec *key(const char *name)
{
    kms_key_rec *k = NULL;

    ck_assert_int_eq(kms_key_show(core, name, &k), P11KMS_OK);
    return k;
}

static void create(const char *name)
{
    kms_key_rec *k = NULL;

    ck_assert_int_eq(kms_key_create(core, name, &k), P11KMS_OK);
    kms_key_rec_free(k);
}

static void rotate(const char *name, uint32_t want)
{
    kms_key_rec *k = NULL;

    ck_assert_int_eq(kms_key_rotate(core, name, &k), P11KMS_OK);
    ck_assert_uint_eq(k->latest_version, want);
    kms_key_rec_free(k);
}

static void decrypt_same(const kms_datakey *dk)
{
    kms_datakey back;

    ck_assert_int_eq(kms_dek_decrypt(core, dk->id, NULL, &back), P11KMS_OK);
    ck_assert_mem_eq(back.plaintext, dk->plaintext, KMS_DEK_LEN);
    kms_datakey_clear(&back);
}

START_TEST(rotate_then_generate)
{
    kms_datakey d1, d2;
    kms_key_rec *k;

    create("r");
    ck_assert_int_eq(kms_dek_generate(core, "r", NULL, &d1), P11KMS_OK);
    ck_assert_uint_eq(d1.version, 1);
    rotate("r", 2);
    ck_assert_int_eq(kms_dek_generate(core, "r", NULL, &d2), P11KMS_OK);
    ck_assert_uint_eq(d2.version, 2);
    decrypt_same(&d1);
    decrypt_same(&d2);
    k = key("r");
    ck_assert_uint_eq(k->n_versions, 2);
    ck_assert_uint_eq(k->versions[0].dek_count, 1);
    ck_assert_uint_eq(k->versions[1].dek_count, 1);
    ck_assert_uint_eq(k->versions[1].wrap_count, 1);
    ck_assert_int_eq(p11_kek_exists(p11, k->versions[1].token_id), CKR_OK);
    ck_assert_mem_ne(k->versions[0].token_id, k->versions[1].token_id, KMS_TOKEN_ID_LEN);
    kms_key_rec_free(k);
    ck_assert_uint_eq(token_objects(), 2);
    ck_assert_int_eq(kms_key_rotate(core, "missing", &k), P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_key_rotate(core, "Bad", &k), P11KMS_ERR_BAD_REQUEST);
    kms_datakey_clear(&d1);
    kms_datakey_clear(&d2);
}
END_TEST

static void *rotate_main(void *arg)
{
    kms_key_rec *k = NULL;

    *(p11kms_status *)arg = kms_key_rotate(core, "cc", &k);
    kms_key_rec_free(k);
    return NULL;
}

START_TEST(concurrent_rotations)
{
    pthread_t t[4];
    p11kms_status st[4];
    kms_key_rec *k;

    create("cc");
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, rotate_main, &st[i]);
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(st[i], P11KMS_OK);
    }
    k = key("cc");
    ck_assert_uint_eq(k->latest_version, 5);
    ck_assert_uint_eq(k->n_versions, 5);
    for (size_t i = 0; i < k->n_versions; i++)
        ck_assert_int_eq(p11_kek_exists(p11, k->versions[i].token_id), CKR_OK);
    kms_key_rec_free(k);
    ck_assert_uint_eq(token_objects(), 5); /* losers destroyed their objects */
}
END_TEST

START_TEST(wrap_cap_rotates)
{
    kms_datakey d;
    kms_key_rec *k;

    close_all();
    open_with(5);
    create("w");
    for (int i = 1; i <= 6; i++) {
        ck_assert_int_eq(kms_dek_generate(core, "w", NULL, &d), P11KMS_OK);
        ck_assert_uint_eq(d.version, i <= 5 ? 1 : 2);
        decrypt_same(&d);
        kms_datakey_clear(&d);
    }
    k = key("w");
    ck_assert_uint_eq(k->versions[0].wrap_count, 5);
    ck_assert_uint_eq(k->versions[1].wrap_count, 1);
    kms_key_rec_free(k);
}
END_TEST

static void *generate_main(void *arg)
{
    kms_datakey d;

    for (int i = 0; i < 10; i++) {
        if (kms_dek_generate(core, "race", NULL, &d) != P11KMS_OK)
            (*(int *)arg)++;
        kms_datakey_clear(&d);
    }
    return NULL;
}

START_TEST(wrap_cap_racing_issuers)
{
    pthread_t t[6];
    int errors[6] = {0};
    kms_key_rec *k;
    uint64_t total = 0;

    close_all();
    open_with(5);
    create("race");
    for (int i = 0; i < 6; i++)
        pthread_create(&t[i], NULL, generate_main, &errors[i]);
    for (int i = 0; i < 6; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(errors[i], 0);
    }
    k = key("race");
    for (size_t i = 0; i < k->n_versions; i++) {
        ck_assert_uint_le(k->versions[i].wrap_count, 5);
        ck_assert_uint_eq(k->versions[i].dek_count, k->versions[i].wrap_count);
        total += k->versions[i].wrap_count;
    }
    ck_assert_uint_eq(total, 60);
    ck_assert_uint_ge(k->n_versions, 12);
    kms_key_rec_free(k);
}
END_TEST

static void die_now(void *arg, const char *key_name, uint32_t version)
{
    (void)arg;
    (void)key_name;
    (void)version;
    kill(getpid(), SIGKILL);
}

START_TEST(crash_between_object_and_row)
{
    kms_core_test_hooks hooks = {.rotate_object_created = die_now};
    kms_key_rec *k;
    pid_t pid;
    int status = 0;

    create("crash");
    close_all();
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        kms_key_rec *kk = NULL;
        open_with(0);
        kms_core_set_test_hooks(core, &hooks);
        kms_key_rotate(core, "crash", &kk);
        _exit(3); /* not reached */
    }
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
    {
        /* The child's object is there, with no store row. */
        p11_config cfg = {.module = token.module, .uri = token.uri, .pin = TT_PIN};
        unsigned char(*ids)[P11_KEK_ID_LEN] = NULL;
        size_t n = 0;
        ck_assert_int_eq(p11_open(&cfg, &p11), CKR_OK);
        ck_assert_int_eq(p11_kek_list(p11, KMS_KEK_LABEL_PREFIX, &ids, &n), CKR_OK);
        ck_assert_uint_eq(n, 2);
        free(ids);
        p11_close(p11);
        p11 = NULL;
    }
    {
        /* ... and its creation intent. */
        kms_kek_intent *list = NULL;
        size_t n = 0;
        ck_assert_int_eq(ts_db_open(&db, &store), P11KMS_OK);
        ck_assert_int_eq(kms_store_kek_intents(store, INT64_MAX, &list, &n), P11KMS_OK);
        ck_assert_uint_eq(n, 1);
        ck_assert_str_eq(list[0].key_name, "crash");
        ck_assert_uint_eq(list[0].version, 2);
        free(list);
        kms_store_close(store);
        store = NULL;
    }
    open_with(0); /* the default grace: may be another node's creation, kept */
    ck_assert_uint_eq(token_objects(), 2);
    close_all();
    intent_grace = KMS_INTENT_GRACE_NONE;
    open_with(0); /* reconciles */
    intent_grace = 0;
    ck_assert_uint_eq(token_objects(), 1);
    {
        kms_kek_intent *list = NULL;
        size_t n = 9;
        ck_assert_int_eq(kms_store_kek_intents(store, INT64_MAX, &list, &n), P11KMS_OK);
        ck_assert_uint_eq(n, 0);
        free(list);
    }
    k = key("crash");
    ck_assert_uint_eq(k->latest_version, 1);
    kms_key_rec_free(k);
    rotate("crash", 2);
    ck_assert_uint_eq(token_objects(), 2);
}
END_TEST

START_TEST(interrupted_retire_finished_at_start)
{
    kms_key_rec *k;
    unsigned char v1[KMS_TOKEN_ID_LEN];

    create("ir");
    rotate("ir", 2);
    k = key("ir");
    memcpy(v1, k->versions[0].token_id, sizeof(v1));
    kms_key_rec_free(k);
    /* The store step of a retire without the token step (a crash). */
    ck_assert_int_eq(kms_store_version_retire(store, "ir", 1, (int64_t)time(NULL)), P11KMS_OK);
    ck_assert_int_eq(p11_kek_exists(p11, v1), CKR_OK);
    close_all();
    open_with(0);
    ck_assert_int_eq(p11_kek_exists(p11, v1), CKR_KEY_HANDLE_INVALID);
    ck_assert_uint_eq(token_objects(), 1);
    k = key("ir");
    ck_assert_int_eq(k->versions[0].state, KMS_VERSION_DESTROYED);
    kms_key_rec_free(k);
}
END_TEST

#define N_DEKS 600

START_TEST(rewrap_then_retire)
{
    static kms_datakey d[N_DEKS];
    json_t *ctx = json_pack("{s:s}", "tenant", "t1");
    uint64_t moved = 0, left = 0, failed = 0;
    kms_dek_rec *rec = NULL;
    kms_key_rec *k;
    unsigned char v1[KMS_TOKEN_ID_LEN];

    create("rw");
    for (int i = 0; i < N_DEKS; i++)
        ck_assert_int_eq(kms_dek_generate(core, "rw", i % 2 ? ctx : NULL, &d[i]), P11KMS_OK);
    ck_assert_int_eq(kms_dek_revoke(core, d[0].id, KMS_REVOKE_SUPERSEDED, NULL), P11KMS_OK);
    ck_assert_int_eq(kms_dek_destroy(core, d[1].id, NULL), P11KMS_OK);
    rotate("rw", 2);
    ck_assert_int_eq(kms_key_retire(core, "rw", 1, &k), P11KMS_ERR_KEY_VERSION_IN_USE);
    ck_assert_int_eq(kms_key_retire(core, "rw", 2, &k), P11KMS_ERR_KEY_VERSION_IN_USE);
    ck_assert_int_eq(kms_key_retire(core, "rw", 3, &k), P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_key_configure(core, "rw", 2, -1, NULL), P11KMS_OK);
    ck_assert_int_eq(kms_dek_decrypt(core, d[2].id, NULL, &d[1]), P11KMS_ERR_VERSION_BELOW_MINIMUM);

    ck_assert_int_eq(kms_key_rewrap(core, "rw", 100, &moved, &left, &failed), P11KMS_OK);
    ck_assert_uint_eq(moved, 100);
    ck_assert_uint_eq(left, N_DEKS - 1 - 100);
    ck_assert_uint_eq(failed, 0);
    ck_assert_int_eq(kms_key_rewrap(core, "rw", 0, &moved, &left, &failed), P11KMS_OK);
    ck_assert_uint_eq(moved, N_DEKS - 1 - 100);
    ck_assert_uint_eq(left, 0);
    ck_assert_int_eq(kms_key_rewrap(core, "rw", 0, &moved, &left, &failed), P11KMS_OK);
    ck_assert_uint_eq(moved, 0);

    for (int i = 2; i < N_DEKS; i++) {
        kms_datakey back;
        ck_assert_int_eq(kms_dek_decrypt(core, d[i].id, i % 2 ? ctx : NULL, &back), P11KMS_OK);
        ck_assert_uint_eq(back.version, 2);
        ck_assert_mem_eq(back.plaintext, d[i].plaintext, KMS_DEK_LEN);
        kms_datakey_clear(&back);
    }
    ck_assert_int_eq(kms_dek_show(core, d[0].id, &rec), P11KMS_OK);
    ck_assert_int_eq(rec->state, KMS_DEK_REVOKED);
    ck_assert_uint_eq(rec->version, 2);
    kms_dek_rec_free(rec);
    ck_assert_int_eq(kms_dek_show(core, d[1].id, &rec), P11KMS_OK);
    ck_assert_int_eq(rec->state, KMS_DEK_DESTROYED);
    ck_assert_uint_eq(rec->version, 1);
    kms_dek_rec_free(rec);

    k = key("rw");
    memcpy(v1, k->versions[0].token_id, sizeof(v1));
    ck_assert_uint_eq(k->versions[1].wrap_count, N_DEKS - 1);
    kms_key_rec_free(k);
    ck_assert_int_eq(kms_key_retire(core, "rw", 1, &k), P11KMS_OK);
    ck_assert_int_eq(k->versions[0].state, KMS_VERSION_DESTROYED);
    kms_key_rec_free(k);
    ck_assert_int_eq(p11_kek_exists(p11, v1), CKR_KEY_HANDLE_INVALID);
    ck_assert_int_eq(kms_key_retire(core, "rw", 1, NULL), P11KMS_OK); /* again: fine */
    for (int i = 0; i < N_DEKS; i++)
        kms_datakey_clear(&d[i]);
    json_decref(ctx);
}
END_TEST

START_TEST(rotation_period_check)
{
    size_t rotated = 9;
    kms_key_rec *k;

    ck_assert_int_eq(kms_rotation_period_parse("90d"), 90 * 86400);
    ck_assert_int_eq(kms_rotation_period_parse("12h"), 12 * 3600);
    ck_assert_int_eq(kms_rotation_period_parse("5m"), 300);
    ck_assert_int_eq(kms_rotation_period_parse("2s"), 2);
    ck_assert_int_eq(kms_rotation_period_parse("0"), 0);
    ck_assert_int_eq(kms_rotation_period_parse("3650d"), 3650 * 86400);
    ck_assert_int_eq(kms_rotation_period_parse("3651d"), -1);
    ck_assert_int_eq(kms_rotation_period_parse("0d"), -1);
    ck_assert_int_eq(kms_rotation_period_parse("07d"), -1);
    ck_assert_int_eq(kms_rotation_period_parse("-1d"), -1);
    ck_assert_int_eq(kms_rotation_period_parse("1y"), -1);
    ck_assert_int_eq(kms_rotation_period_parse("d"), -1);
    ck_assert_int_eq(kms_rotation_period_parse(""), -1);
    ck_assert_int_eq(kms_rotation_period_parse("1 d"), -1);

    create("p");
    create("q");
    ck_assert_int_eq(kms_key_configure(core, "p", 0, 3600, NULL), P11KMS_OK);
    ck_assert_int_eq(kms_keys_rotate_due(core, (int64_t)time(NULL), &rotated), P11KMS_OK);
    ck_assert_uint_eq(rotated, 0);
    ck_assert_int_eq(kms_keys_rotate_due(core, (int64_t)time(NULL) + 3601, &rotated), P11KMS_OK);
    ck_assert_uint_eq(rotated, 1);
    k = key("p");
    ck_assert_uint_eq(k->latest_version, 2);
    kms_key_rec_free(k);
    k = key("q");
    ck_assert_uint_eq(k->latest_version, 1);
    kms_key_rec_free(k);
}
END_TEST

/* ---- the figure: rewrap rate vs raw C_Decrypt + C_Encrypt ---- */

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

#define RATE_DEKS 2000

static void *gen_rate_main(void *arg)
{
    kms_datakey d;

    (void)arg;
    for (int i = 0; i < RATE_DEKS / 4; i++) {
        ck_assert_int_eq(kms_dek_generate(core, "rate", NULL, &d), P11KMS_OK);
        kms_datakey_clear(&d);
    }
    return NULL;
}

typedef struct raw_arg {
    const unsigned char *v1, *v2;
    int ops;
} raw_arg;

static void *raw_main(void *argp)
{
    raw_arg *a = argp;
    unsigned char aad[80], pt[32] = {1}, blob[32 + P11_WRAP_OVERHEAD], out[32 + P11_WRAP_OVERHEAD];
    size_t blen = sizeof(blob), olen, plen;

    memset(aad, 7, sizeof(aad));
    ck_assert_int_eq(p11_wrap(p11, a->v1, aad, sizeof(aad), pt, 32, blob, &blen), CKR_OK);
    for (int i = 0; i < a->ops; i++) {
        plen = sizeof(pt);
        olen = sizeof(out);
        ck_assert_int_eq(p11_unwrap(p11, a->v1, aad, sizeof(aad), blob, blen, pt, &plen), CKR_OK);
        ck_assert_int_eq(p11_wrap(p11, a->v2, aad, sizeof(aad), pt, 32, out, &olen), CKR_OK);
    }
    return NULL;
}

START_TEST(rewrap_rate_figure)
{
    pthread_t t[4];
    raw_arg ra[4];
    uint64_t moved = 0, left = 0, failed = 0;
    kms_key_rec *k;
    double t0, rewrap_s, raw_s;

    create("rate");
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, gen_rate_main, NULL);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    rotate("rate", 2);
    t0 = now_s();
    ck_assert_int_eq(kms_key_rewrap(core, "rate", 0, &moved, &left, &failed), P11KMS_OK);
    rewrap_s = now_s() - t0;
    ck_assert_uint_eq(moved, RATE_DEKS);
    k = key("rate");
    for (int i = 0; i < 4; i++) {
        ra[i].v1 = k->versions[0].token_id;
        ra[i].v2 = k->versions[1].token_id;
        ra[i].ops = RATE_DEKS / 4;
    }
    t0 = now_s();
    for (int i = 0; i < 4; i++)
        pthread_create(&t[i], NULL, raw_main, &ra[i]);
    for (int i = 0; i < 4; i++)
        pthread_join(t[i], NULL);
    raw_s = now_s() - t0;
    kms_key_rec_free(k);
    printf("rewrap figure (%d DEKs): stored rewrap %.0f DEKs/s; raw unwrap+wrap (4 threads) "
           "%.0f ops/s; ratio %.2f\n",
           RATE_DEKS, RATE_DEKS / rewrap_s, RATE_DEKS / raw_s, raw_s / rewrap_s);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("core_rotation");
    TCase *tc = tcase_create("rotation");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, rotate_then_generate);
    tcase_add_test(tc, concurrent_rotations);
    tcase_add_test(tc, wrap_cap_rotates);
    tcase_add_test(tc, wrap_cap_racing_issuers);
    tcase_add_test(tc, crash_between_object_and_row);
    tcase_add_test(tc, interrupted_retire_finished_at_start);
    tcase_add_test(tc, rewrap_then_retire);
    tcase_add_test(tc, rotation_period_check);
    tcase_add_test(tc, rewrap_rate_figure);
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
