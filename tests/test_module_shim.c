/*
 * tests/test_module_shim.c - the PKCS#11 shim (tests/p11shim/shim.c) in
 * front of SoftHSM2: a complete 2.40 function list, only C_GetFunctionList
 * exported, p11_open and wraps through it, the delay applied, delayed calls
 * from 8 threads overlapping (the shim must not serialise), and injected
 * faults on the Nth call and at a rate, armed by a file, drawn from a list
 * of CK_RVs and counted in the statistics.
 *
 * Functional checks of the shim with generous bounds, not performance
 * assertions.  Each test runs in its own process (check forks), so each
 * sets its P11SHIM_* variables before the shim is loaded.
 */
#include "test_module_support.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <time.h>

#ifndef P11SHIM_PATH
#error "P11SHIM_PATH must name libp11shim.so (tests/CMakeLists.txt)"
#endif

static void setup_token(void)
{
    tm_token_setup_label("p11kms-shim-test");
}

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Point the shim at SoftHSM2 with this delay, no faults. */
static void shim_env(const char *delay_us, const char *delay_funcs)
{
    setenv("P11SHIM_MODULE", tt_softhsm_module(), 1);
    setenv("P11SHIM_DELAY_US", delay_us, 1);
    if (delay_funcs != NULL)
        setenv("P11SHIM_DELAY_FUNCS", delay_funcs, 1);
    else
        unsetenv("P11SHIM_DELAY_FUNCS");
}

static p11_ctx *shim_open(void)
{
    p11_config cfg = {P11SHIM_PATH, tm_token.uri, TT_PIN, 0};
    p11_ctx *ctx = NULL;
    CK_RV rv = p11_open(&cfg, &ctx);

    ck_assert_msg(rv == CKR_OK, "p11_open through the shim: %s", p11_rv_name(rv));
    return ctx;
}

/* ---- the module itself ----------------------------------------------------- */

START_TEST(test_shim_function_list)
{
    void *h;
    CK_C_GetFunctionList get = NULL;
    CK_FUNCTION_LIST *fl = NULL;
    size_t first = offsetof(CK_FUNCTION_LIST, C_Initialize);
    size_t last = offsetof(CK_FUNCTION_LIST, C_WaitForSlotEvent);
    int n = 0;

    shim_env("0", NULL);
    h = dlopen(P11SHIM_PATH, RTLD_NOW | RTLD_LOCAL);
    ck_assert_msg(h != NULL, "dlopen: %s", dlerror());
    *(void **)&get = dlsym(h, "C_GetFunctionList");
    ck_assert_ptr_nonnull(get);
    /* Nothing else is exported: not the forwarders, not the real module's
     * symbols (it is loaded RTLD_LOCAL). */
    ck_assert_ptr_null(dlsym(h, "C_Encrypt"));
    ck_assert_ptr_null(dlsym(h, "C_Initialize"));
    ck_assert_ptr_null(dlsym(h, "shim_C_Encrypt"));
    ck_assert_uint_eq(get(&fl), CKR_OK);
    ck_assert_ptr_nonnull(fl);
    ck_assert_uint_eq(fl->version.major, 2);
    ck_assert_uint_eq(fl->version.minor, 40);
    /* Every one of the 68 entries is set. */
    for (size_t off = first; off <= last; off += sizeof(void (*)(void))) {
        void (*fp)(void) = NULL;
        memcpy(&fp, (const char *)fl + off, sizeof(fp));
        ck_assert_msg(fp != NULL, "entry %zu of the function list is NULL",
                      (off - first) / sizeof(fp));
        n++;
    }
    ck_assert_int_eq(n, 68);
    {
        CK_FUNCTION_LIST *again = NULL;
        ck_assert_uint_eq(fl->C_GetFunctionList(&again), CKR_OK);
        ck_assert_ptr_eq(again, fl);
    }
    /* A plain forwarded call. */
    {
        CK_INFO info;
        ck_assert_uint_eq(fl->C_Initialize(NULL), CKR_OK);
        ck_assert_uint_eq(fl->C_GetInfo(&info), CKR_OK);
        ck_assert_int_eq(memcmp(info.manufacturerID, "SoftHSM", 7), 0);
        ck_assert_uint_eq(fl->C_Finalize(NULL), CKR_OK);
    }
    dlclose(h);
}
END_TEST

START_TEST(test_shim_without_module)
{
    void *h;
    CK_C_GetFunctionList get = NULL;
    CK_FUNCTION_LIST *fl = NULL;
    p11_config cfg = {P11SHIM_PATH, tm_token.uri, TT_PIN, 0};
    p11_ctx *ctx = NULL;

    unsetenv("P11SHIM_MODULE");
    h = dlopen(P11SHIM_PATH, RTLD_NOW | RTLD_LOCAL);
    ck_assert_msg(h != NULL, "dlopen: %s", dlerror());
    *(void **)&get = dlsym(h, "C_GetFunctionList");
    ck_assert_ptr_nonnull(get);
    ck_assert_uint_ne(get(&fl), CKR_OK);
    dlclose(h);
    ck_assert_uint_ne(p11_open(&cfg, &ctx), CKR_OK);
    ck_assert_ptr_null(ctx);
}
END_TEST

/* ---- the token layer through the shim ---------------------------------------- */

START_TEST(test_shim_open_wrap)
{
    p11_ctx *ctx;
    unsigned char id[P11_KEK_ID_LEN], dek[32], wrapped[32 + P11_WRAP_OVERHEAD], back[32];
    size_t wlen = sizeof(wrapped), blen = sizeof(back);
    static const unsigned char aad[] = "p11kms shim test aad";
    char label[33];

    shim_env("100", NULL);
    ctx = shim_open();
    ck_assert_uint_eq(p11_token_label(ctx, label), CKR_OK);
    ck_assert_str_eq(label, "p11kms-shim-test");
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:shim:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_kek_exists(ctx, id), CKR_OK);
    ck_assert_uint_eq(p11_random(ctx, dek, sizeof(dek)), CKR_OK);
    ck_assert_uint_eq(p11_wrap(ctx, id, aad, sizeof(aad), dek, sizeof(dek), wrapped, &wlen),
                      CKR_OK);
    ck_assert_uint_eq(wlen, sizeof(wrapped));
    ck_assert_uint_eq(p11_unwrap(ctx, id, aad, sizeof(aad), wrapped, wlen, back, &blen), CKR_OK);
    ck_assert_uint_eq(blen, sizeof(dek));
    ck_assert_mem_eq(back, dek, sizeof(dek));
    /* Authentication failures still come back as such. */
    wrapped[wlen - 1] ^= 1;
    blen = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, id, aad, sizeof(aad), wrapped, wlen, back, &blen),
                      CKR_ENCRYPTED_DATA_INVALID);
    ck_assert_uint_eq(p11_kek_destroy(ctx, id), CKR_OK);
    ck_assert_uint_eq(p11_kek_exists(ctx, id), CKR_KEY_HANDLE_INVALID);
    ck_assert_uint_eq(p11_probe(ctx), CKR_OK);
    p11_close(ctx);
}
END_TEST

/* ---- the delay ------------------------------------------------------------------ */

#define DELAY_US 10000 /* P11SHIM_DELAY_US below */
START_TEST(test_shim_delay_applied)
{
    p11_ctx *ctx;
    unsigned char buf[32];
    double t0, elapsed;

    shim_env("10000", "C_GenerateRandom"); /* only the RNG is slow */
    ctx = shim_open();
    ck_assert_uint_eq(p11_random(ctx, buf, sizeof(buf)), CKR_OK); /* a pooled session */
    t0 = now_s();
    for (int i = 0; i < 10; i++)
        ck_assert_uint_eq(p11_random(ctx, buf, sizeof(buf)), CKR_OK);
    elapsed = now_s() - t0;
    ck_assert_msg(elapsed >= 10 * DELAY_US / 1e6, "10 delayed calls took %.3f s", elapsed);
    p11_close(ctx);
}
END_TEST

#define SLOW_THREADS 8
#define SLOW_CALLS   5

typedef struct slow_arg {
    p11_ctx *ctx;
    CK_RV rv;
} slow_arg;

static void *slow_worker(void *argp)
{
    slow_arg *a = argp;
    unsigned char buf[32];

    a->rv = CKR_OK;
    for (int i = 0; i < SLOW_CALLS && a->rv == CKR_OK; i++)
        a->rv = p11_random(a->ctx, buf, sizeof(buf));
    return NULL;
}

static double run_slow(p11_ctx *ctx, int threads)
{
    pthread_t th[SLOW_THREADS];
    slow_arg args[SLOW_THREADS];
    double t0 = now_s();

    for (int i = 0; i < threads; i++) {
        args[i].ctx = ctx;
        ck_assert_int_eq(pthread_create(&th[i], NULL, slow_worker, &args[i]), 0);
    }
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(args[i].rv == CKR_OK, "thread %d: %s", i, p11_rv_name(args[i].rv));
    }
    return now_s() - t0;
}

START_TEST(test_shim_delay_concurrent)
{
    p11_ctx *ctx;
    double one, eight;

    shim_env("20000", NULL); /* every token call takes 20 ms */
    ctx = shim_open();
    (void)run_slow(ctx, SLOW_THREADS); /* open the 8 pooled sessions */
    one = run_slow(ctx, 1);
    eight = run_slow(ctx, SLOW_THREADS);
    fprintf(stderr, "shim 20 ms: 1 thread x %d calls %.3f s, %d threads %.3f s\n", SLOW_CALLS, one,
            SLOW_THREADS, eight);
    ck_assert_msg(one >= SLOW_CALLS * 0.020, "the delay was not applied (%.3f s)", one);
    /* Serialised, 8 threads would take 8x as long; overlapping, about 1x. */
    ck_assert_msg(eight < 4 * one, "8 threads took %.3f s, one %.3f s: calls are serialised", eight,
                  one);
    p11_close(ctx);
}
END_TEST

/* ---- injected faults --------------------------------------------------------- */

START_TEST(test_shim_fail_nth)
{
    p11_ctx *ctx;
    CK_FUNCTION_LIST *fl;
    CK_SESSION_HANDLE s;
    unsigned char buf[16];

    shim_env("0", NULL);
    setenv("P11SHIM_FAIL_FUNCS", "C_DigestInit", 1);
    setenv("P11SHIM_FAIL_NTH", "3", 1);
    setenv("P11SHIM_FAIL_COUNT", "2", 1);
    setenv("P11SHIM_FAIL_RV", "CKR_DEVICE_MEMORY", 1);
    ctx = shim_open();
    fl = p11_function_list(ctx);
    s = tm_raw_session(ctx);
    for (int i = 1; i <= 6; i++) {
        CK_MECHANISM mech = {CKM_SHA256, NULL, 0};
        CK_RV rv = fl->C_DigestInit(s, &mech);
        if (i == 3 || i == 4) {
            ck_assert_msg(rv == CKR_DEVICE_MEMORY, "call %d: %s", i, p11_rv_name(rv));
        } else {
            unsigned char digest[32];
            CK_ULONG len = sizeof(digest);
            ck_assert_msg(rv == CKR_OK, "call %d: %s", i, p11_rv_name(rv));
            ck_assert_uint_eq(fl->C_Digest(s, buf, sizeof(buf), digest, &len), CKR_OK);
        }
    }
    /* Other functions are untouched. */
    ck_assert_uint_eq(p11_random(ctx, buf, sizeof(buf)), CKR_OK);
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

START_TEST(test_shim_fail_rate)
{
    p11_ctx *ctx;
    CK_FUNCTION_LIST *fl;
    CK_SESSION_HANDLE s;
    unsigned char buf[16];
    int failed = 0;

    shim_env("0", NULL);
    setenv("P11SHIM_FAIL_FUNCS", "C_GenerateRandom", 1);
    setenv("P11SHIM_FAIL_RATE", "0.5", 1);
    setenv("P11SHIM_FAIL_RV", "0x30", 1); /* CKR_DEVICE_ERROR as a number */
    ctx = shim_open();
    fl = p11_function_list(ctx);
    s = tm_raw_session(ctx);
    for (int i = 0; i < 1000; i++) {
        CK_RV rv = fl->C_GenerateRandom(s, buf, sizeof(buf));
        ck_assert_msg(rv == CKR_OK || rv == CKR_DEVICE_ERROR, "%s", p11_rv_name(rv));
        failed += rv != CKR_OK;
    }
    ck_assert_msg(failed > 350 && failed < 650, "%d of 1000 failed at rate 0.5", failed);
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

/* A "name number" line of a P11SHIM_STATS file; -1 if absent. */
static long stats_value(const char *path, const char *name)
{
    FILE *f = fopen(path, "r");
    char key[64];
    unsigned long n;
    long v = -1;

    if (f == NULL)
        return -1;
    while (fscanf(f, "%63s %lu", key, &n) == 2)
        if (strcmp(key, name) == 0)
            v = (long)n;
    fclose(f);
    return v;
}

/* P11SHIM_FAIL_FILE arms the faults from outside; P11SHIM_FAIL_RV may
 * name several CK_RVs; the statistics count the faults per function and
 * per CK_RV. */
START_TEST(test_shim_fail_file_rv_list)
{
    static const char *const names[] = {"CKR_DEVICE_ERROR", "CKR_SESSION_HANDLE_INVALID",
                                        "CKR_GENERAL_ERROR"};
    static const CK_RV rvs[] = {CKR_DEVICE_ERROR, CKR_SESSION_HANDLE_INVALID, CKR_GENERAL_ERROR};
    char fail_file[400], stats[400], key[64];
    int seen[3] = {0, 0, 0};
    long total = 0;
    p11_ctx *ctx;
    CK_FUNCTION_LIST *fl;
    CK_SESSION_HANDLE s;
    unsigned char buf[16];

    snprintf(fail_file, sizeof(fail_file), "%s/fail.on", tm_token.dir);
    snprintf(stats, sizeof(stats), "%s/shim.stats", tm_token.dir);
    shim_env("0", NULL);
    setenv("P11SHIM_FAIL_FUNCS", "C_GenerateRandom", 1);
    setenv("P11SHIM_FAIL_RATE", "1", 1);
    setenv("P11SHIM_FAIL_RV", "CKR_DEVICE_ERROR,CKR_SESSION_HANDLE_INVALID, CKR_GENERAL_ERROR", 1);
    setenv("P11SHIM_FAIL_FILE", fail_file, 1);
    setenv("P11SHIM_STATS_SNAPSHOT", stats, 1);
    ctx = shim_open();
    fl = p11_function_list(ctx);
    s = tm_raw_session(ctx);
    for (int i = 0; i < 20; i++) /* not armed */
        ck_assert_uint_eq(fl->C_GenerateRandom(s, buf, sizeof(buf)), CKR_OK);
    {
        FILE *f = fopen(fail_file, "w");
        ck_assert_ptr_nonnull(f);
        fclose(f);
    }
    for (int i = 0; i < 300; i++) {
        CK_RV rv = fl->C_GenerateRandom(s, buf, sizeof(buf));
        int k;
        for (k = 0; k < 3 && rvs[k] != rv; k++)
            ;
        ck_assert_msg(k < 3, "armed call %d: %s", i, p11_rv_name(rv));
        seen[k]++;
    }
    ck_assert_int_eq(unlink(fail_file), 0);
    for (int i = 0; i < 20; i++) /* disarmed */
        ck_assert_uint_eq(fl->C_GenerateRandom(s, buf, sizeof(buf)), CKR_OK);
    for (int k = 0; k < 3; k++)
        ck_assert_msg(seen[k] > 0, "%s never injected in 300 faults", names[k]);
    fl->C_CloseSession(s);
    p11_close(ctx); /* C_Finalize writes the snapshot */
    ck_assert_int_eq(stats_value(stats, "faults:C_GenerateRandom"), 300);
    for (int k = 0; k < 3; k++) {
        snprintf(key, sizeof(key), "faults:%s", names[k]);
        ck_assert_int_eq(stats_value(stats, key), seen[k]);
        total += seen[k];
    }
    ck_assert_int_eq(total, 300);
    ck_assert_int_ge(stats_value(stats, "C_GenerateRandom"), 340);
}
END_TEST

static Suite *shim_suite(void)
{
    Suite *s = suite_create("p11shim");
    TCase *tc = tcase_create("shim");

    tcase_add_unchecked_fixture(tc, setup_token, tm_token_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_shim_function_list);
    tcase_add_test(tc, test_shim_without_module);
    tcase_add_test(tc, test_shim_open_wrap);
    tcase_add_test(tc, test_shim_delay_applied);
    tcase_add_test(tc, test_shim_delay_concurrent);
    tcase_add_test(tc, test_shim_fail_nth);
    tcase_add_test(tc, test_shim_fail_rate);
    tcase_add_test(tc, test_shim_fail_file_rv_list);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(shim_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
