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
 *    to start and never calls C_Login;
 *  - no shim: the plain SoftHSM2 token's directory renamed away while kmsd
 *    serves (the whole tokendir, or the token's own folder in it) and
 *    renamed back.  SoftHSM2 2.6.1 then answers C_GetTokenInfo with
 *    CKR_GENERAL_ERROR and token-object handles with
 *    CKR_OBJECT_HANDLE_INVALID, finds no token object, and keeps doing so
 *    after the folder is back until it is finalised and initialised again
 *    (session objects, kmsd's KEK copies, keep working).  Every answer is
 *    right or 503 token_unavailable, /v1/health says the token is
 *    unavailable, a retire answers 503 (its object is not destroyed
 *    behind a 200), and once the folder is back kmsd recovers without a
 *    restart: every DEK acknowledged before, during and after decrypts.
 *
 * Each test starts its own kmsd (check forks; the shim's P11SHIM_*
 * variables are inherited by kmsd from the test's environment).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <dirent.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "module/p11.h"
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

/* ---- the plain SoftHSM2 token's directory moved away and back ------------------ */

/* _i & 1: what moves.  0: the whole tokendir (dir/tokens); 1: the token's
 * own folder in it (dir/tokens/<uuid>), moved out of the tokendir
 * (SoftHSM2 would load a folder renamed inside it as a token).
 * _i >> 1: what comes first after the move.  A few datakeys and decrypts
 * (served through the KEK copies until a token object is needed); a
 * retire (a token-object destroy that finds no object); the health probe;
 * or nothing: the folder comes straight back, unnoticed, and SoftHSM2 is
 * left answering as if it were gone until it is re-initialised. */
static const char *const AWAY_WHAT[] = {"tokendir", "token folder"};
static const char *const AWAY_FIRST[] = {"datakeys", "retire", "health", "nothing"};

static void token_folder(char *out, size_t len)
{
    char tokens[300];
    DIR *d;
    struct dirent *e;
    int found = 0;

    snprintf(tokens, sizeof(tokens), "%s/tokens", K.dir);
    d = opendir(tokens);
    ck_assert_ptr_nonnull(d);
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        ck_assert_int_eq(found, 0); /* one token */
        ck_assert_int_lt(snprintf(out, len, "%s/%.64s", tokens, e->d_name), (int)len);
        found = 1;
    }
    closedir(d);
    ck_assert_int_eq(found, 1);
}

/* DEK i must decrypt to its bytes: 200 only. */
static void decrypt_ok(int i)
{
    ck_assert_int_eq(decrypt(i), 200);
}

static long request_status(const char *method, const char *path, const char *body,
                           const char **code)
{
    static char code_buf[64];
    long status = 0;
    json_t *j = ku_call(&K, method, path, body, &status);

    snprintf(code_buf, sizeof(code_buf), "%s", error_code(j));
    if (code != NULL)
        *code = code_buf;
    json_decref(j);
    return status;
}

static void expect_unavailable(const char *method, const char *path, const char *body)
{
    const char *code = NULL;
    long st = request_status(method, path, body, &code);

    ck_assert_msg(st == 503 && strcmp(code, "token_unavailable") == 0,
                  "%s %s with the token gone: %ld %s", method, path, st, code);
}

START_TEST(test_token_dir_moved_away_and_back)
{
    char from[400], to[400], label[64];
    unsigned char v1[16];
    json_t *h = NULL, *j;
    long st;
    int before, during = 0, first = _i >> 1;
    p11_config cfg;
    p11_ctx *p = NULL;

    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-away", NULL, NULL), 0);
    n_deks = 0;
    ck_assert_int_eq(kh_start(&K), 0);
    create_key();
    /* A second key with a retirable version 1 (no DEK on it). */
    json_decref(ku_call(&K, "POST", "/v1/keys", "{\"name\":\"away2\"}", &st));
    ck_assert_int_eq(st, 201);
    json_decref(ku_call(&K, "POST", "/v1/keys/away2/rotate", NULL, &st));
    ck_assert_int_eq(st, 200);
    ck_assert_int_eq(ts_db_token_id(&K.store, "away2", 1, v1), 0);
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(datakey(), 201);
    before = n_deks;
    for (int i = 0; i < n_deks; i++)
        decrypt_ok(i); /* the KEK copies exist now */

    if ((_i & 1) == 0)
        snprintf(from, sizeof(from), "%s/tokens", K.dir);
    else
        token_folder(from, sizeof(from));
    snprintf(to, sizeof(to), "%s/token.away", K.dir);
    ck_assert_int_eq(rename(from, to), 0);

    if (first == 3) {
        /* Back before any request: the next ones recover at once. */
        ck_assert_int_eq(rename(to, from), 0);
        for (int i = 0; i < 4; i++) {
            ck_assert_int_eq(datakey(), 201);
            decrypt_ok(i % before);
        }
        ck_assert_int_eq(health(NULL), 200);
        goto back;
    }
    if (first == 1) /* the store step may pass; never a 200 over a surviving object */
        expect_unavailable("DELETE", "/v1/keys/away2/versions/1", NULL);
    if (first == 0) {
        /* Before anything noticed: right answers or 503, never another. */
        for (int i = 0; i < 4; i++) {
            during += datakey() == 201;
            (void)decrypt(i % before);
        }
    }
    ck_assert_int_eq(health(&h), 503);
    ck_assert_str_eq(json_string_value(json_object_get(h, "status")), "unavailable");
    ck_assert_str_eq(json_string_value(json_object_get(h, "token")), "unavailable");
    ck_assert_str_eq(json_string_value(json_object_get(h, "store")), "ok");
    ck_assert_str_eq(error_code(h), "token_unavailable");
    json_decref(h);
    /* From now on every token operation fails closed. */
    for (int i = 0; i < 3; i++) {
        int n = n_deks;

        ck_assert_int_eq(datakey(), 503);
        ck_assert_int_eq(n_deks, n);
        ck_assert_int_eq(decrypt(i), 503);
        ck_assert_int_eq(health(NULL), 503);
    }
    expect_unavailable("POST", "/v1/keys/faults/rotate", NULL);
    expect_unavailable("POST", "/v1/keys", "{\"name\":\"away3\"}");
    expect_unavailable("DELETE", "/v1/keys/away2/versions/1", NULL);
    ck_assert_int_eq(rename(to, from), 0);
    ck_assert_int_eq(health(NULL), 200); /* the probe re-initialises */

back:
    fprintf(stderr, "token %s away (%s first): %d of %d datakeys served before kmsd noticed\n",
            AWAY_WHAT[_i & 1], AWAY_FIRST[first], during, first == 0 ? 4 : 0);
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(datakey(), 201);
    all_decrypt();
    j = ku_call(&K, "POST", "/v1/keys/faults/rotate", NULL, &st);
    ck_assert_int_eq(st, 200);
    json_decref(j);
    ck_assert_int_eq(datakey(), 201);
    /* A retire that answered 503 finishes when called again. */
    st = request_status("DELETE", "/v1/keys/away2/versions/1", NULL, NULL);
    ck_assert_int_eq(st, 200);
    memset(&cfg, 0, sizeof(cfg));
    cfg.module = K.tt.module;
    cfg.uri = K.tt.uri;
    cfg.pin = TT_PIN;
    ck_assert_int_eq(p11_open(&cfg, &p), CKR_OK);
    ck_assert_int_eq(p11_kek_label(p, v1, label, sizeof(label)), CKR_KEY_HANDLE_INVALID);
    p11_close(p);
    all_decrypt();
    stop();
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
    tcase_add_loop_test(tc, test_token_dir_moved_away_and_back, 0, 8);
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
