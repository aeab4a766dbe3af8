/*
 * tests/test_kmsd_faults.c - token faults against the real kmsd, whose
 * [token] module is the PKCS#11 shim (tests/p11shim) in front of SoftHSM2:
 *
 *  - CKR_DEVICE_ERROR / CKR_SESSION_HANDLE_INVALID / CKR_GENERAL_ERROR on
 *    the 3rd C_Encrypt: every datakey answer is 201 (and decrypts to the
 *    same bytes) or a clean 503 token_unavailable, and kmsd keeps serving;
 *  - the token gone while kmsd runs (P11SHIM_GONE_FILE): datakey and
 *    decrypt answer 503 token_unavailable, /v1/health 503 naming the token;
 *    back: kmsd recovers by itself (health 200, new DEKs, and every DEK
 *    acknowledged before or after the outage decrypts to the same bytes);
 *  - a login refused when the token comes back is never retried (C_Login
 *    called twice in all after many requests, counted by the shim);
 *  - the token flags the PIN as on its final try or locked: kmsd refuses
 *    to start and never calls C_Login.
 *
 * Each test starts its own kmsd (check forks; the shim's P11SHIM_*
 * variables are inherited by kmsd from the test's environment).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

#ifndef P11SHIM_PATH
#error "P11SHIM_PATH must name libp11shim.so (tests/CMakeLists.txt)"
#endif

#define MAX_DEKS 64

static kh_kmsd K;
static char gone_path[400], stats_path[400];
static struct {
    char id[64];
    char plaintext[128];
} deks[MAX_DEKS];
static int n_deks;

/* Token and config with the shim as [token] module; kmsd not started. */
static void setup_shim(void)
{
    setenv("P11SHIM_MODULE", tt_softhsm_module(), 1);
    setenv("P11SHIM_DEBUG", "1", 1);
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-faults", NULL, NULL), 0);
    snprintf(gone_path, sizeof(gone_path), "%s/token.gone", K.dir);
    snprintf(stats_path, sizeof(stats_path), "%s/shim.stats", K.dir);
    setenv("P11SHIM_GONE_FILE", gone_path, 1);
    setenv("P11SHIM_STATS", stats_path, 1);
    snprintf(K.tt.module, sizeof(K.tt.module), "%s", P11SHIM_PATH);
    ck_assert_int_eq(kh_write_conf(&K, NULL, NULL), 0);
    n_deks = 0;
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);

    ck_assert_int_eq(st, 0);
}

static long stats_calls(const char *fn)
{
    FILE *f = fopen(stats_path, "r");
    char name[64];
    unsigned long n;
    long total = 0;

    if (f == NULL)
        return -1;
    while (fscanf(f, "%63s %lu", name, &n) == 2)
        if (strcmp(name, fn) == 0)
            total += (long)n;
    fclose(f);
    return total;
}

static void set_gone(int gone)
{
    if (gone)
        ck_assert_int_eq(kh_write_file(gone_path, "gone\n", 0600), 0);
    else
        ck_assert_int_eq(unlink(gone_path), 0);
}

static const char *error_code(json_t *j)
{
    const char *c = json_string_value(json_object_get(json_object_get(j, "error"), "code"));

    return c != NULL ? c : "";
}

/* POST a datakey; on 201 remember it.  Returns the status. */
static long datakey(void)
{
    long status = 0;
    json_t *j = ku_call(&K, "POST", "/v1/keys/faults/datakeys", "{\"context\":{\"t\":\"f\"}}",
                        &status);

    if (status == 201) {
        ck_assert_int_lt(n_deks, MAX_DEKS);
        snprintf(deks[n_deks].id, sizeof(deks[n_deks].id), "%s",
                 json_string_value(json_object_get(j, "dek_id")));
        snprintf(deks[n_deks].plaintext, sizeof(deks[n_deks].plaintext), "%s",
                 json_string_value(json_object_get(j, "plaintext")));
        n_deks++;
    } else {
        ck_assert_msg(status == 503 && strcmp(error_code(j), "token_unavailable") == 0,
                      "datakey: %ld %s", status, json_dumps(j, JSON_COMPACT));
    }
    json_decref(j);
    return status;
}

/* Decrypt DEK i: 200 with the same bytes, or 503 token_unavailable. */
static long decrypt(int i)
{
    char path[160];
    long status = 0;
    json_t *j;

    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", deks[i].id);
    j = ku_call(&K, "POST", path, "{\"context\":{\"t\":\"f\"}}", &status);
    if (status == 200)
        ck_assert_str_eq(json_string_value(json_object_get(j, "plaintext")), deks[i].plaintext);
    else
        ck_assert_msg(status == 503 && strcmp(error_code(j), "token_unavailable") == 0,
                      "decrypt: %ld %s", status, json_dumps(j, JSON_COMPACT));
    json_decref(j);
    return status;
}

static void all_decrypt(void)
{
    for (int i = 0; i < n_deks; i++)
        ck_assert_int_eq(decrypt(i), 200);
}

static long health(json_t **out)
{
    long status = 0;
    json_t *j = ku_call(&K, "GET", "/v1/health", NULL, &status);

    if (out != NULL)
        *out = j;
    else
        json_decref(j);
    return status;
}

static void create_key(void)
{
    long status = 0;

    json_decref(ku_call(&K, "POST", "/v1/keys", "{\"name\":\"faults\"}", &status));
    ck_assert_int_eq(status, 201);
}

/* ---- injected errors on C_Encrypt ------------------------------------------ */

static const char *const ENCRYPT_FAULTS[] = {"CKR_DEVICE_ERROR", "CKR_SESSION_HANDLE_INVALID",
                                             "CKR_GENERAL_ERROR"};

START_TEST(test_encrypt_faults)
{
    int failed = 0;

    setenv("P11SHIM_FAIL_FUNCS", "C_Encrypt", 1);
    setenv("P11SHIM_FAIL_RV", ENCRYPT_FAULTS[_i], 1);
    setenv("P11SHIM_FAIL_NTH", "3", 1);
    setenv("P11SHIM_FAIL_COUNT", "1", 1);
    setup_shim();
    ck_assert_int_eq(kh_start(&K), 0);
    create_key();
    for (int i = 0; i < 10; i++)
        failed += datakey() != 201;
    fprintf(stderr, "kmsd, %s on the 3rd C_Encrypt: %d of 10 datakeys failed\n",
            ENCRYPT_FAULTS[_i], failed);
    ck_assert_int_le(failed, 1);
    if (_i < 2) /* recovered and retried once */
        ck_assert_int_eq(failed, 0);
    ck_assert_int_eq(health(NULL), 200);
    all_decrypt();
    stop();
    ck_assert_int_eq(stats_calls("C_Encrypt"), 10 + (failed == 0));
    kh_teardown(&K);
}
END_TEST

/* ---- the token disappears and comes back ------------------------------------- */

static const char *const GONE_RVS[] = {"CKR_DEVICE_REMOVED", "CKR_TOKEN_NOT_PRESENT"};

START_TEST(test_token_gone_and_back)
{
    json_t *h = NULL;
    int before;

    setenv("P11SHIM_GONE_RV", GONE_RVS[_i], 1);
    setup_shim();
    ck_assert_int_eq(kh_start(&K), 0);
    create_key();
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(datakey(), 201);
    before = n_deks;

    set_gone(1);
    for (int i = 0; i < 3; i++) {
        ck_assert_int_eq(datakey(), 503);
        ck_assert_int_eq(decrypt(i), 503);
    }
    ck_assert_int_eq(n_deks, before);
    ck_assert_int_eq(health(&h), 503);
    ck_assert_str_eq(json_string_value(json_object_get(h, "status")), "unavailable");
    ck_assert_str_eq(json_string_value(json_object_get(h, "token")), "unavailable");
    ck_assert_str_eq(json_string_value(json_object_get(h, "store")), "ok");
    ck_assert_str_eq(error_code(h), "token_unavailable");
    json_decref(h);

    set_gone(0);
    ck_assert_int_eq(health(NULL), 200); /* the probe re-initialises */
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(datakey(), 201);
    all_decrypt();
    stop();
    /* Logged in at start and once after the token came back. */
    ck_assert_int_le(stats_calls("C_Login"), 2);
    kh_teardown(&K);
}
END_TEST

/* The 2nd C_Login (when the token comes back) is refused with
 * CKR_PIN_INCORRECT: kmsd answers 503 from then on and never logs in
 * again (a wrong PIN retried would lock the token). */
START_TEST(test_refused_login_never_retried)
{
    setenv("P11SHIM_FAIL_FUNCS", "C_Login", 1);
    setenv("P11SHIM_FAIL_RV", "CKR_PIN_INCORRECT", 1);
    setenv("P11SHIM_FAIL_NTH", "2", 1);
    setenv("P11SHIM_FAIL_COUNT", "0", 1);
    setup_shim();
    ck_assert_int_eq(kh_start(&K), 0);
    create_key();
    ck_assert_int_eq(datakey(), 201);
    set_gone(1);
    ck_assert_int_eq(health(NULL), 503);
    set_gone(0);
    for (int i = 0; i < 20; i++) {
        ck_assert_int_eq(health(NULL), 503);
        ck_assert_int_eq(datakey(), 503);
        ck_assert_int_eq(decrypt(0), 503);
    }
    stop();
    ck_assert_int_eq(stats_calls("C_Login"), 2);
    kh_teardown(&K);
}
END_TEST

/* ---- PIN flags: no login at all ------------------------------------------------ */

static const char *const PIN_FLAGS[] = {"final_try", "locked"};

START_TEST(test_pin_flags_refuse_start)
{
    int st;

    setenv("P11SHIM_TOKEN_FLAGS_SET", PIN_FLAGS[_i], 1);
    setup_shim();
    st = kh_start_expect_exit(&K, 60);
    ck_assert_msg(st > 0, "kmsd with the PIN %s: exit status %d", PIN_FLAGS[_i], st);
    ck_assert_msg(stats_calls("C_GetTokenInfo") > 0, "no shim statistics");
    ck_assert_int_eq(stats_calls("C_Login"), 0);
    kh_teardown(&K);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_faults");
    TCase *tc = tcase_create("faults");

    tcase_set_timeout(tc, 300);
    tcase_add_loop_test(tc, test_encrypt_faults, 0, 3);
    tcase_add_loop_test(tc, test_token_gone_and_back, 0, 2);
    tcase_add_test(tc, test_refused_login_never_retried);
    tcase_add_loop_test(tc, test_pin_flags_refuse_start, 0, 2);
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
