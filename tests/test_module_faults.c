/*
 * tests/test_module_faults.c - token faults at the token layer, injected by
 * the PKCS#11 shim (tests/p11shim) in front of SoftHSM2:
 *
 *  - p11_open refuses to log in, and never calls C_Login (counted by the
 *    shim's P11SHIM_STATS_SNAPSHOT), when the token flags the user PIN as on its
 *    final try or locked (P11SHIM_TOKEN_FLAGS_SET);
 *  - CKR_DEVICE_ERROR / CKR_SESSION_HANDLE_INVALID / CKR_GENERAL_ERROR on
 *    the Nth C_Encrypt: each wrap either fails cleanly or succeeds with a
 *    blob that unwraps to the same DEK, and the context keeps working;
 *  - a token that disappears (P11SHIM_GONE_FILE) and comes back: probes
 *    and wraps fail with a token failure meanwhile, then work again
 *    without reopening, and a blob wrapped before still unwraps;
 *  - a login refused after a re-initialisation (wrong PIN) is never tried
 *    again (C_Login called twice in all, however many operations follow);
 *  - P11SHIM_HANG_MS / P11SHIM_HANG_FILE: a call hangs only while the file
 *    exists;
 *  - CKR_GENERAL_ERROR from C_Decrypt (what SoftHSM2 says for a bad tag,
 *    but maybe a passing fault) is unwrapped once more: one such fault
 *    still unwraps, two are an authentication failure;
 *  - a session whose C_Encrypt failed (the token did not see the failure,
 *    so its operation is still active) is closed, not pooled: the next
 *    wraps never meet CKR_OPERATION_ACTIVE.
 *
 * Each test runs in its own process (check forks), so each sets its
 * P11SHIM_* variables before the shim is loaded.
 */
#include "test_module_support.h"

#include <stdint.h>
#include <time.h>

#ifndef P11SHIM_PATH
#error "P11SHIM_PATH must name libp11shim.so (tests/CMakeLists.txt)"
#endif

static const unsigned char AAD[] = "p11kms fault test aad";
static char stats_path[512], gone_path[512];

static void setup_token(void)
{
    tm_token_setup_label("p11kms-faults");
    snprintf(stats_path, sizeof(stats_path), "%s/shim.stats", tm_token.dir);
    snprintf(gone_path, sizeof(gone_path), "%s/token.gone", tm_token.dir);
}

static void shim_env(void)
{
    setenv("P11SHIM_MODULE", tt_softhsm_module(), 1);
    setenv("P11SHIM_STATS_SNAPSHOT", stats_path, 1);
    setenv("P11SHIM_GONE_FILE", gone_path, 1);
    setenv("P11SHIM_DEBUG", "1", 1);
    unlink(stats_path);
    unlink(gone_path);
}

/* Calls of fn in the shim's statistics file (0 when absent); -1 when the
 * file does not exist (the shim was not unloaded). */
static long stats_calls(const char *fn)
{
    FILE *f = fopen(stats_path, "r");
    char name[64];
    unsigned long n;
    long total = 0;

    if (f == NULL)
        return -1;
    while (fscanf(f, "%63s %lu", name, &n) == 2) {
        if (strcmp(name, fn) == 0)
            total += (long)n;
    }
    fclose(f);
    return total;
}

static void set_gone(int gone)
{
    if (gone) {
        FILE *f = fopen(gone_path, "w");
        ck_assert_ptr_nonnull(f);
        fclose(f);
    } else
        ck_assert_int_eq(unlink(gone_path), 0);
}

static CK_RV try_open(const char *pin, p11_ctx **ctx)
{
    p11_config cfg = {P11SHIM_PATH, tm_token.uri, pin, 0};

    *ctx = NULL;
    return p11_open(&cfg, ctx);
}

static uint64_t module_calls(p11_ctx *ctx, const char *fn)
{
    p11_stats st;

    p11_stats_get(ctx, &st);
    for (size_t i = 0; i < st.n_fns; i++)
        if (strcmp(st.fns[i].fn, fn) == 0)
            return st.fns[i].calls;
    return 0;
}

/* ---- PIN flags --------------------------------------------------------------- */

static const char *const PIN_FLAGS[] = {"final_try", "locked"};

START_TEST(test_refuse_login_pin_flags)
{
    p11_ctx *ctx = NULL;
    CK_RV rv;

    shim_env();
    setenv("P11SHIM_TOKEN_FLAGS_SET", PIN_FLAGS[_i], 1);
    rv = try_open(TT_PIN, &ctx);
    ck_assert_msg(rv == CKR_PIN_LOCKED, "p11_open with %s: %s", PIN_FLAGS[_i], p11_rv_name(rv));
    ck_assert_ptr_null(ctx);
    /* The module was released: the shim wrote its statistics. */
    ck_assert_msg(stats_calls("C_GetTokenInfo") > 0, "no shim statistics in %s", stats_path);
    ck_assert_int_eq(stats_calls("C_Login"), 0);
}
END_TEST

START_TEST(test_wrong_pin_login_once)
{
    p11_ctx *ctx = NULL;
    CK_RV rv;

    shim_env();
    rv = try_open("not-the-pin", &ctx);
    ck_assert_msg(rv == CKR_PIN_INCORRECT, "p11_open with a wrong PIN: %s", p11_rv_name(rv));
    ck_assert_int_eq(stats_calls("C_Login"), 1);
}
END_TEST

/* ---- injected errors on C_Encrypt ------------------------------------------ */

static const char *const ENCRYPT_FAULTS[] = {"CKR_DEVICE_ERROR", "CKR_SESSION_HANDLE_INVALID",
                                             "CKR_GENERAL_ERROR"};

START_TEST(test_encrypt_faults)
{
    p11_ctx *ctx = NULL;
    unsigned char id[P11_KEK_ID_LEN];
    int ok = 0, failed = 0;

    shim_env();
    setenv("P11SHIM_FAIL_FUNCS", "C_Encrypt", 1);
    setenv("P11SHIM_FAIL_RV", ENCRYPT_FAULTS[_i], 1);
    setenv("P11SHIM_FAIL_NTH", "3", 1);
    setenv("P11SHIM_FAIL_COUNT", "1", 1);
    ck_assert_uint_eq(try_open(TT_PIN, &ctx), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms-faults", id), CKR_OK);
    for (int i = 0; i < 12; i++) {
        unsigned char dek[32], blob[32 + P11_WRAP_OVERHEAD], back[32];
        size_t blen = sizeof(blob), plen = sizeof(back);
        CK_RV rv = p11_generate_and_wrap(ctx, id, AAD, sizeof(AAD), sizeof(dek), dek, blob, &blen);

        if (rv != CKR_OK) {
            /* A clean failure: a token failure the service maps to 503. */
            ck_assert_msg(p11_rv_is_token_failure(rv), "wrap %d: %s", i, p11_rv_name(rv));
            failed++;
            continue;
        }
        ok++;
        ck_assert_uint_eq(blen, sizeof(blob));
        ck_assert_uint_eq(p11_unwrap(ctx, id, AAD, sizeof(AAD), blob, blen, back, &plen), CKR_OK);
        ck_assert_uint_eq(plen, sizeof(dek));
        ck_assert_int_eq(memcmp(dek, back, sizeof(dek)), 0);
    }
    fprintf(stderr, "%s on the 3rd C_Encrypt: %d wraps ok, %d failed\n", ENCRYPT_FAULTS[_i], ok,
            failed);
    /* One fault: at most one wrap lost, and only when it is not recoverable. */
    ck_assert_int_le(failed, 1);
    if (_i < 2) /* device error: re-initialised; lost session: new one */
        ck_assert_int_eq(failed, 0);
    ck_assert_uint_eq(p11_probe(ctx), CKR_OK);
    p11_close(ctx);
    /* Every wrap reached C_Encrypt once, the retried one twice. */
    ck_assert_int_eq(stats_calls("C_Encrypt"), 12 + (failed == 0));
}
END_TEST

/* ---- a token that disappears and comes back ------------------------------- */

static const char *const GONE_RVS[] = {"CKR_DEVICE_REMOVED", "CKR_TOKEN_NOT_PRESENT"};

START_TEST(test_token_gone_and_back)
{
    p11_ctx *ctx = NULL;
    unsigned char id[P11_KEK_ID_LEN], dek[32], blob[32 + P11_WRAP_OVERHEAD], back[32];
    unsigned char dek2[32], blob2[32 + P11_WRAP_OVERHEAD];
    size_t blen = sizeof(blob), plen = sizeof(back), blen2 = sizeof(blob2);
    CK_RV rv;

    shim_env();
    setenv("P11SHIM_GONE_RV", GONE_RVS[_i], 1);
    ck_assert_uint_eq(try_open(TT_PIN, &ctx), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms-faults", id), CKR_OK);
    ck_assert_uint_eq(p11_generate_and_wrap(ctx, id, AAD, sizeof(AAD), 32, dek, blob, &blen),
                      CKR_OK);

    set_gone(1);
    for (int i = 0; i < 5; i++) {
        rv = p11_probe(ctx);
        ck_assert_msg(rv != CKR_OK && p11_rv_is_token_failure(rv), "probe while gone: %s",
                      p11_rv_name(rv));
        rv = p11_generate_and_wrap(ctx, id, AAD, sizeof(AAD), 32, dek2, blob2, &blen2);
        ck_assert_msg(rv != CKR_OK && p11_rv_is_token_failure(rv), "wrap while gone: %s",
                      p11_rv_name(rv));
        plen = sizeof(back);
        rv = p11_unwrap(ctx, id, AAD, sizeof(AAD), blob, blen, back, &plen);
        ck_assert_msg(rv != CKR_OK && p11_rv_is_token_failure(rv), "unwrap while gone: %s",
                      p11_rv_name(rv));
    }

    set_gone(0);
    ck_assert_uint_eq(p11_probe(ctx), CKR_OK);
    blen2 = sizeof(blob2);
    ck_assert_uint_eq(p11_generate_and_wrap(ctx, id, AAD, sizeof(AAD), 32, dek2, blob2, &blen2),
                      CKR_OK);
    plen = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, id, AAD, sizeof(AAD), blob, blen, back, &plen), CKR_OK);
    ck_assert_int_eq(memcmp(dek, back, 32), 0);
    plen = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, id, AAD, sizeof(AAD), blob2, blen2, back, &plen), CKR_OK);
    ck_assert_int_eq(memcmp(dek2, back, 32), 0);
    /* Logged in once at open and once after the token came back. */
    ck_assert_uint_le(module_calls(ctx, "C_Login"), 2);
    p11_close(ctx);
}
END_TEST

/* The PIN is refused when the token comes back (the shim answers the 2nd
 * C_Login with CKR_PIN_INCORRECT): the refusal is sticky, C_Login is never
 * called again whatever follows. */
START_TEST(test_refused_relogin_never_retried)
{
    p11_ctx *ctx = NULL;
    CK_RV rv;

    shim_env();
    setenv("P11SHIM_FAIL_FUNCS", "C_Login", 1);
    setenv("P11SHIM_FAIL_RV", "CKR_PIN_INCORRECT", 1);
    setenv("P11SHIM_FAIL_NTH", "2", 1);
    setenv("P11SHIM_FAIL_COUNT", "0", 1);
    ck_assert_uint_eq(try_open(TT_PIN, &ctx), CKR_OK);
    ck_assert_uint_eq(module_calls(ctx, "C_Login"), 1);
    set_gone(1);
    ck_assert_uint_ne(p11_probe(ctx), CKR_OK);
    set_gone(0);
    for (int i = 0; i < 20; i++) {
        unsigned char buf[16];

        rv = p11_probe(ctx);
        ck_assert_msg(rv == CKR_PIN_INCORRECT, "probe %d: %s", i, p11_rv_name(rv));
        ck_assert_uint_eq(p11_random(ctx, buf, sizeof(buf)), CKR_PIN_INCORRECT);
    }
    ck_assert_uint_eq(module_calls(ctx, "C_Login"), 2);
    p11_close(ctx);
    ck_assert_int_eq(stats_calls("C_Login"), 2);
}
END_TEST

/* P11SHIM_HANG_MS on C_GenerateRandom: slow only while the hang file exists. */
static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

START_TEST(test_hang)
{
    p11_ctx *ctx = NULL;
    unsigned char buf[16];
    double t;

    shim_env();
    setenv("P11SHIM_HANG_FUNCS", "C_GenerateRandom", 1);
    setenv("P11SHIM_HANG_MS", "300", 1);
    setenv("P11SHIM_HANG_FILE", gone_path, 1); /* reused as the hang switch */
    unsetenv("P11SHIM_GONE_FILE");
    ck_assert_uint_eq(try_open(TT_PIN, &ctx), CKR_OK);
    t = now_s();
    ck_assert_uint_eq(p11_random(ctx, buf, sizeof(buf)), CKR_OK);
    ck_assert_msg(now_s() - t < 0.25, "no hang file, yet %.3f s", now_s() - t);
    set_gone(1);
    t = now_s();
    ck_assert_uint_eq(p11_random(ctx, buf, sizeof(buf)), CKR_OK);
    ck_assert_msg(now_s() - t >= 0.29, "hang file, only %.3f s", now_s() - t);
    set_gone(0);
    p11_close(ctx);
}
END_TEST

/* ---- unwrap after an ambiguous failure ---------------------------------------- */

static uint64_t module_errors(p11_ctx *ctx, CK_RV rv)
{
    p11_stats st;

    p11_stats_get(ctx, &st);
    for (size_t i = 0; i < st.n_errors; i++)
        if (st.errors[i].rv == rv)
            return st.errors[i].count;
    return 0;
}

START_TEST(test_decrypt_general_error_retried)
{
    p11_ctx *ctx = NULL;
    unsigned char id[P11_KEK_ID_LEN], dek[32], blob[32 + P11_WRAP_OVERHEAD], back[32];
    unsigned char zero[32];
    size_t blen = sizeof(blob), plen = sizeof(back);
    int faults = _i + 1; /* 1: retried and unwrapped; 2: an authentication failure */
    CK_RV rv;

    shim_env();
    setenv("P11SHIM_FAIL_FUNCS", "C_Decrypt", 1);
    setenv("P11SHIM_FAIL_RV", "CKR_GENERAL_ERROR", 1);
    setenv("P11SHIM_FAIL_NTH", "1", 1);
    setenv("P11SHIM_FAIL_COUNT", faults == 1 ? "1" : "2", 1);
    ck_assert_uint_eq(try_open(TT_PIN, &ctx), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms-faults", id), CKR_OK);
    ck_assert_uint_eq(p11_generate_and_wrap(ctx, id, AAD, sizeof(AAD), 32, dek, blob, &blen),
                      CKR_OK);
    rv = p11_unwrap(ctx, id, AAD, sizeof(AAD), blob, blen, back, &plen);
    if (faults == 1) {
        ck_assert_msg(rv == CKR_OK, "one CKR_GENERAL_ERROR: %s", p11_rv_name(rv));
        ck_assert_int_eq(memcmp(dek, back, sizeof(dek)), 0);
    } else {
        ck_assert_msg(rv == CKR_ENCRYPTED_DATA_INVALID, "two CKR_GENERAL_ERROR: %s",
                      p11_rv_name(rv));
        memset(zero, 0, sizeof(zero));
        ck_assert_int_eq(memcmp(back, zero, sizeof(back)), 0); /* wiped */
    }
    /* The failed sessions were not reused with their operation active. */
    plen = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, id, AAD, sizeof(AAD), blob, blen, back, &plen), CKR_OK);
    ck_assert_int_eq(memcmp(dek, back, sizeof(dek)), 0);
    ck_assert_uint_eq(module_errors(ctx, CKR_OPERATION_ACTIVE), 0);
    p11_close(ctx);
    ck_assert_int_eq(stats_calls("C_Decrypt"), 3);
    ck_assert_int_eq(stats_calls("faults:C_Decrypt"), faults);
}
END_TEST

START_TEST(test_failed_session_not_reused)
{
    p11_ctx *ctx = NULL;
    unsigned char id[P11_KEK_ID_LEN];
    int failed = 0;

    shim_env();
    setenv("P11SHIM_FAIL_FUNCS", "C_Encrypt", 1);
    setenv("P11SHIM_FAIL_RV", "CKR_GENERAL_ERROR", 1); /* not retried */
    setenv("P11SHIM_FAIL_NTH", "2", 1);
    setenv("P11SHIM_FAIL_COUNT", "1", 1);
    ck_assert_uint_eq(try_open(TT_PIN, &ctx), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms-faults", id), CKR_OK);
    for (int i = 0; i < 6; i++) {
        unsigned char dek[32], blob[32 + P11_WRAP_OVERHEAD];
        size_t blen = sizeof(blob);
        CK_RV rv = p11_generate_and_wrap(ctx, id, AAD, sizeof(AAD), 32, dek, blob, &blen);

        ck_assert_msg(rv == CKR_OK || (i == 1 && rv == CKR_GENERAL_ERROR), "wrap %d: %s", i,
                      p11_rv_name(rv));
        failed += rv != CKR_OK;
    }
    ck_assert_int_eq(failed, 1);
    ck_assert_uint_eq(module_errors(ctx, CKR_OPERATION_ACTIVE), 0);
    p11_close(ctx);
    ck_assert_int_eq(stats_calls("C_EncryptInit"), 6);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("module_faults");
    TCase *tc = tcase_create("faults");

    tcase_add_unchecked_fixture(tc, setup_token, tm_token_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_loop_test(tc, test_refuse_login_pin_flags, 0, 2);
    tcase_add_test(tc, test_wrong_pin_login_once);
    tcase_add_loop_test(tc, test_encrypt_faults, 0, 3);
    tcase_add_loop_test(tc, test_token_gone_and_back, 0, 2);
    tcase_add_test(tc, test_refused_relogin_never_retried);
    tcase_add_test(tc, test_hang);
    tcase_add_loop_test(tc, test_decrypt_general_error_retried, 0, 2);
    tcase_add_test(tc, test_failed_session_not_reused);
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
