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
 *  - faults at a rate under concurrent load: 5% of C_Encrypt, C_Decrypt
 *    and C_GenerateRandom fail with CKR_DEVICE_ERROR,
 *    CKR_SESSION_HANDLE_INVALID or CKR_GENERAL_ERROR while 8 clients
 *    issue and decrypt data keys: every answer is right (a 200 decrypt
 *    gives the bytes issued) or a clean 5xx JSON error whose code matches
 *    its status; once the faults stop kmsd is healthy at once, every data
 *    key it acknowledged decrypts to the same bytes (and again after a
 *    restart), and it holds no more file descriptors than before and no
 *    more token sessions than its pool allows (the shim counts the
 *    sessions open in SoftHSM2 and the faults it injected).
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
#include <pthread.h>
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

/* ---- faults at a rate under concurrent load --------------------------------- */

#define LOAD_THREADS 8
#define LOAD_OPS     100 /* per thread */
#define LOAD_DEKS    (LOAD_OPS + 16)
#define RATE_CONTEXT "{\"context\":{\"t\":\"f\"}}" /* as datakey() */

typedef struct issued {
    char id[40];
    char plaintext[48];
} issued;

/* One client thread's work and findings. */
typedef struct load {
    int n;              /* thread number */
    const issued *warm; /* DEKs issued before the faults (read-only) */
    int n_warm;
    issued deks[LOAD_DEKS]; /* acknowledged by this thread */
    int n_deks;
    int generates, decrypts; /* requests made */
    int ok, failed;          /* answers: right ones, clean 5xx errors */
    int codes[4];            /* failed, by code (rate_codes) */
    char wrong[512];         /* the first wrong answer, "" if none */
} load;

static const struct {
    const char *code;
    long status;
} rate_codes[] = {{"token_unavailable", 503},
                  {"store_unavailable", 503},
                  {"internal", 500},
                  {"integrity_failure", 500}};

/* A failed answer must be a JSON error of the contract whose code says
 * the same as its 5xx status.  Returns the index in rate_codes, -1 with
 * why filled when it is not. */
static int clean_error(const kh_response *r, char *why, size_t len)
{
    json_t *j = json_loadb(r->body, r->len, 0, NULL);
    const char *code = json_string_value(json_object_get(json_object_get(j, "error"), "code"));
    const char *msg = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    char ctype[64] = "";
    int k = -1;

    kh_header(r, "Content-Type", ctype, sizeof(ctype));
    for (size_t i = 0; code != NULL && i < sizeof(rate_codes) / sizeof(rate_codes[0]); i++)
        if (strcmp(code, rate_codes[i].code) == 0 && rate_codes[i].status == r->status)
            k = (int)i;
    if (k < 0 || msg == NULL || strcmp(ctype, "application/json") != 0)
        snprintf(why, len, "status %ld, Content-Type '%s', body %.300s", r->status, ctype, r->body);
    json_decref(j);
    return k;
}

/* One request on the thread's keep-alive handle, or on a new connection
 * every tenth time. */
static int load_request(CURL *h, int i, const char *path, kh_response *r)
{
    if (i % 10 == 9)
        return kh_request(K.sock, "POST", path, RATE_CONTEXT, strlen(RATE_CONTEXT), NULL, r);
    return kh_request_h(h, K.sock, "POST", path, RATE_CONTEXT, strlen(RATE_CONTEXT), NULL, r);
}

static void load_answer(load *l, const kh_response *r, long want, const issued *known)
{
    json_t *j;
    const char *id, *pt;
    int k;

    if (r->status != want) {
        char why[400];
        if ((k = clean_error(r, why, sizeof(why))) < 0) {
            if (l->wrong[0] == '\0')
                snprintf(l->wrong, sizeof(l->wrong), "%s: %s", known ? "decrypt" : "datakey", why);
            return;
        }
        l->failed++;
        l->codes[k]++;
        return;
    }
    j = json_loadb(r->body, r->len, 0, NULL);
    id = json_string_value(json_object_get(j, "dek_id"));
    pt = json_string_value(json_object_get(j, "plaintext"));
    if (id == NULL || pt == NULL || strlen(id) >= sizeof(l->deks[0].id) ||
        strlen(pt) >= sizeof(l->deks[0].plaintext) ||
        (known != NULL && (strcmp(id, known->id) != 0 || strcmp(pt, known->plaintext) != 0))) {
        if (l->wrong[0] == '\0')
            snprintf(l->wrong, sizeof(l->wrong), "%s answered %ld with %.300s",
                     known ? "decrypt" : "datakey", r->status, r->body);
    } else {
        l->ok++;
        if (known == NULL && l->n_deks < LOAD_DEKS) {
            snprintf(l->deks[l->n_deks].id, sizeof(l->deks[0].id), "%s", id);
            snprintf(l->deks[l->n_deks].plaintext, sizeof(l->deks[0].plaintext), "%s", pt);
            l->n_deks++;
        }
    }
    json_decref(j);
}

static void *load_main(void *arg)
{
    load *l = arg;
    CURL *h = curl_easy_init();
    unsigned seed = (unsigned)l->n * 7919u + 1u;

    for (int i = 0; h != NULL && i < LOAD_OPS; i++) {
        kh_response r;
        char path[128];
        const issued *known = NULL;

        /* Two generates, then a decrypt of one of ours or a warm one. */
        if (i % 3 == 2) {
            int pick = (int)(rand_r(&seed) % (unsigned)(l->n_deks + l->n_warm));
            known = pick < l->n_deks ? &l->deks[pick] : &l->warm[pick - l->n_deks];
            snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", known->id);
            l->decrypts++;
        } else {
            snprintf(path, sizeof(path), "/v1/keys/faults/datakeys");
            l->generates++;
        }
        if (load_request(h, i, path, &r) != 0) {
            if (l->wrong[0] == '\0')
                snprintf(l->wrong, sizeof(l->wrong), "no HTTP answer to %s", path);
            continue;
        }
        load_answer(l, &r, known != NULL ? 200 : 201, known);
        kh_response_free(&r);
    }
    if (h != NULL)
        curl_easy_cleanup(h);
    return NULL;
}

/* Open file descriptors of kmsd; with list, what they are appended to
 * it ("fd -> target" lines). */
static int kmsd_fds(char *list, size_t len)
{
    char path[64], link[64 + sizeof(((struct dirent *)0)->d_name)], target[256];
    DIR *d;
    struct dirent *e;
    int n = 0;

    snprintf(path, sizeof(path), "/proc/%d/fd", (int)K.pid);
    d = opendir(path);
    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL) {
        ssize_t got;
        if (e->d_name[0] == '.')
            continue;
        n++;
        snprintf(link, sizeof(link), "%s/%s", path, e->d_name);
        got = readlink(link, target, sizeof(target) - 1);
        target[got > 0 ? got : 0] = '\0';
        if (list != NULL && strlen(list) + strlen(target) + 32 < len)
            snprintf(list + strlen(list), len - strlen(list), "  %s -> %s\n", e->d_name, target);
    }
    closedir(d);
    return n;
}

/* Wait (up to 60 s) until kmsd has no request in flight and no client
 * connection but the one asking. */
static void wait_idle(void)
{
    for (int i = 0; i < 6000; i++) {
        kh_response r;
        long in, conns;

        ck_assert_int_eq(kh_request(K.sock, "GET", "/metrics", NULL, 0, NULL, &r), 0);
        in = kh_metric_value(r.body, "p11kms_http_inflight_requests");
        conns = kh_metric_value(r.body, "p11kms_http_connections");
        kh_response_free(&r);
        if (in == 1 && conns == 1)
            return;
        usleep(10000);
    }
    ck_abort_msg("kmsd did not become idle");
}

/* A data key issued under load decrypts to the same bytes. */
static void decrypt_issued(const issued *d)
{
    char path[128];
    long status = 0;
    json_t *j;

    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", d->id);
    j = ku_call(&K, "POST", path, RATE_CONTEXT, &status);
    ck_assert_msg(status == 200, "acknowledged data key %s: %ld", d->id, status);
    ck_assert_str_eq(json_string_value(json_object_get(j, "plaintext")), d->plaintext);
    json_decref(j);
}

/* A "name number" line of a shim file; -1 if absent. */
static long shim_value(const char *path, const char *key)
{
    FILE *f = fopen(path, "r");
    char name[64];
    unsigned long n;
    long v = -1;

    if (f == NULL)
        return -1;
    while (fscanf(f, "%63s %lu", name, &n) == 2)
        if (strcmp(name, key) == 0)
            v = (long)n;
    fclose(f);
    return v;
}

START_TEST(test_fault_rate_under_load)
{
    static load loads[LOAD_THREADS];
    static issued warm[16];
    pthread_t threads[LOAD_THREADS];
    static char fd_list_before[8192], fd_list_after[8192];
    char faults_path[400], sessions_path[400], fault_rvs[256] = "";
    int fds_before, fds_after, acked = 0, requests = 0, failed = 0, codes[4] = {0, 0, 0, 0};
    long faults = 0, sessions_open, sessions_max;

    setup_shim();
    snprintf(faults_path, sizeof(faults_path), "%s/faults.on", K.dir);
    snprintf(sessions_path, sizeof(sessions_path), "%s/sessions", K.dir);
    setenv("P11SHIM_DEBUG", "0", 1);
    setenv("P11SHIM_FAIL_FUNCS", "C_Encrypt,C_Decrypt,C_GenerateRandom", 1);
    setenv("P11SHIM_FAIL_RV", "CKR_DEVICE_ERROR,CKR_SESSION_HANDLE_INVALID,CKR_GENERAL_ERROR", 1);
    setenv("P11SHIM_FAIL_RATE", "0.05", 1);
    setenv("P11SHIM_FAIL_FILE", faults_path, 1);
    setenv("P11SHIM_SESSIONS_FILE", sessions_path, 1);
    ck_assert_int_eq(kh_start(&K), 0);
    create_key();
    for (int i = 0; i < 16; i++) {
        ck_assert_int_eq(datakey(), 201);
        ck_assert_uint_lt(strlen(deks[i].id), sizeof(warm[i].id));
        ck_assert_uint_lt(strlen(deks[i].plaintext), sizeof(warm[i].plaintext));
        memcpy(warm[i].id, deks[i].id, strlen(deks[i].id) + 1);
        memcpy(warm[i].plaintext, deks[i].plaintext, strlen(deks[i].plaintext) + 1);
    }
    /* The baseline: the fewest over a moment (the connection that asked
     * whether kmsd is idle may still be open). */
    wait_idle();
    fds_before = kmsd_fds(NULL, 0);
    for (int i = 0; i < 10; i++) {
        int n = kmsd_fds(NULL, 0);
        if (n < fds_before)
            fds_before = n;
        usleep(20000);
    }
    kmsd_fds(fd_list_before, sizeof(fd_list_before));
    ck_assert_int_gt(fds_before, 0);

    ck_assert_int_eq(kh_write_file(faults_path, "on\n", 0600), 0);
    for (int t = 0; t < LOAD_THREADS; t++) {
        memset(&loads[t], 0, sizeof(loads[t]));
        loads[t].n = t;
        loads[t].warm = warm;
        loads[t].n_warm = 16;
        ck_assert_int_eq(pthread_create(&threads[t], NULL, load_main, &loads[t]), 0);
    }
    for (int t = 0; t < LOAD_THREADS; t++)
        pthread_join(threads[t], NULL);
    ck_assert_int_eq(unlink(faults_path), 0);

    for (int t = 0; t < LOAD_THREADS; t++) {
        ck_assert_msg(loads[t].wrong[0] == '\0', "client %d got a wrong answer: %s", t,
                      loads[t].wrong);
        requests += loads[t].generates + loads[t].decrypts;
        failed += loads[t].failed;
        for (int k = 0; k < 4; k++)
            codes[k] += loads[t].codes[k];
        ck_assert_int_eq(loads[t].ok + loads[t].failed, loads[t].generates + loads[t].decrypts);
    }
    /* Healthy at once, and nothing acknowledged is lost or changed. */
    ck_assert_int_eq(health(NULL), 200);
    for (int i = 0; i < 16; i++)
        decrypt_issued(&warm[i]);
    acked = 16;
    for (int t = 0; t < LOAD_THREADS; t++)
        for (int i = 0; i < loads[t].n_deks; i++, acked++)
            decrypt_issued(&loads[t].deks[i]);
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(datakey(), 201);
    /* A connection just closed may take a moment to be seen closed. */
    wait_idle();
    for (int i = 0; i < 200 && (fds_after = kmsd_fds(NULL, 0)) > fds_before; i++)
        usleep(50000);
    if (fds_after > fds_before)
        kmsd_fds(fd_list_after, sizeof(fd_list_after));
    sessions_open = shim_value(sessions_path, "sessions_open");
    sessions_max = shim_value(sessions_path, "sessions_max");
    stop();

    for (size_t k = 0; k < 3; k++) {
        static const char *const fns[] = {"faults:C_Encrypt", "faults:C_Decrypt",
                                          "faults:C_GenerateRandom"};
        long n = stats_calls(fns[k]);
        faults += n > 0 ? n : 0;
    }
    for (size_t k = 0; k < 3; k++) {
        static const char *const rvs[] = {"CKR_DEVICE_ERROR", "CKR_SESSION_HANDLE_INVALID",
                                          "CKR_GENERAL_ERROR"};
        char key[64];
        size_t used = strlen(fault_rvs);
        snprintf(key, sizeof(key), "faults:%s", rvs[k]);
        snprintf(fault_rvs + used, sizeof(fault_rvs) - used, "%s%s %ld", k ? ", " : "", rvs[k] + 4,
                 stats_calls(key) > 0 ? stats_calls(key) : 0);
    }
    fprintf(stderr,
            "fault rate: %d requests from %d clients, %ld faults injected (C_Encrypt %ld, "
            "C_Decrypt %ld, C_GenerateRandom %ld; %s); %d clean 5xx (token_unavailable %d, "
            "store_unavailable %d, internal %d, integrity_failure %d), 0 wrong; %d acknowledged "
            "DEKs all decrypt; fds %d -> %d; token sessions open %ld (most at once %ld)\n",
            requests, LOAD_THREADS, faults, stats_calls("faults:C_Encrypt"),
            stats_calls("faults:C_Decrypt"), stats_calls("faults:C_GenerateRandom"), fault_rvs,
            failed, codes[0], codes[1], codes[2], codes[3], acked, fds_before, fds_after,
            sessions_open, sessions_max);
    ck_assert_msg(faults >= 10, "only %ld faults injected: the test did not test much", faults);
    ck_assert_msg(fds_after <= fds_before,
                  "kmsd holds more file descriptors after the faults:\n"
                  "before:\n%safter:\n%s",
                  fd_list_before, fd_list_after);
    ck_assert_int_ge(sessions_open, 1);
    ck_assert_int_le(sessions_max, 32); /* token.sessions: the pool's bound */
    /* Durable too: after a restart, every acknowledged key decrypts. */
    ck_assert_int_eq(kh_start(&K), 0);
    for (int i = 0; i < 16; i++)
        decrypt_issued(&warm[i]);
    for (int t = 0; t < LOAD_THREADS; t++)
        for (int i = 0; i < loads[t].n_deks; i++)
            decrypt_issued(&loads[t].deks[i]);
    stop();
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
    tcase_add_test(tc, test_fault_rate_under_load);
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
