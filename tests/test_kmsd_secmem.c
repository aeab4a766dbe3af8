/*
 * tests/test_kmsd_secmem.c - released secrets do not stay in kmsd's
 * memory.
 *
 * One real kmsd (its token module the PKCS#11 shim in front of SoftHSM2,
 * a Unix socket and a mutual-TLS listener, a policy with a bearer token)
 * serves each scenario below; then the test waits until kmsd is idle (no
 * request in flight, no client connection but its own) and reads kmsd's
 * whole memory (tests/support/memscan.h: every readable mapping, through
 * /proc/PID/mem) for each data key the scenario released, raw and in
 * base64 (the JSON reply carries base64), and for the bearer token.  Any
 * copy fails the test and names the mapping that holds it (a library's
 * data, [heap], [anon] arenas and thread stacks) with the bytes around
 * it.  A control string that kmsd must hold (a principal of its policy)
 * has to be found in every scan: a scanner that reads nothing fails.
 *
 *  - unix_round_trips: data keys and decrypts on new connections, on one
 *    keep-alive connection and in HTTP/1.0;
 *  - abandoned_requests: a decrypt whose client goes away while the
 *    token works on it (the shim holds C_Decrypt until told to go on),
 *    so the reply is written to a dead connection, over the Unix socket
 *    and over TLS;
 *  - tls_round_trips: data keys and decrypts over TLS 1.2 and 1.3;
 *  - bearer_tokens: requests authenticated by Authorization: Bearer over
 *    the Unix socket and TLS (the token is a secret too);
 *  - error_paths: a decrypt with the wrong context, one the policy
 *    refuses, one whose audit entry cannot be sealed after the unwrap
 *    (the shim fails C_Sign: the plaintext must not be returned nor
 *    kept), then revoked and destroyed data keys;
 *  - rewrap: a rotation and a rewrap (plaintexts that pass through kmsd
 *    without being returned).
 *
 * Reading another process's memory needs ptrace rights, and kmsd makes
 * itself non-dumpable: only root (CAP_SYS_PTRACE) may.  Without them the
 * program says so and exits 77 (ctest: skipped).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <arpa/inet.h>
#include <check.h>
#include <curl/curl.h>
#include <inttypes.h>
#include <jansson.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"
#include "support/memscan.h"
#include "support/testpki.h"

#ifndef P11SHIM_PATH
#error "P11SHIM_PATH must name libp11shim.so (tests/CMakeLists.txt)"
#endif

#define MAX_DEKS 32
/* Half a secret is a leak: fragments of 16 raw bytes, 22 base64
 * characters or half the bearer token count. */
#define RAW_MIN       16
#define B64_MIN       22
#define CONTEXT       "{\"context\":{\"app\":\"secmem\"}}"
#define WRONG_CONTEXT "{\"context\":{\"app\":\"other\"}}"

static kh_kmsd K;
static int port;
static char fail_path[400], hang_path[400];
static char bearer[48];  /* the bearer token's secret */
static char control[64]; /* a principal of the policy: kmsd holds it */

typedef struct dek {
    char id[64];
    unsigned char raw[32];
    char b64[48];
} dek;

static dek deks[MAX_DEKS];
static int n_deks;

/* ---- kmsd ------------------------------------------------------------------ */

static void start(void)
{
    unsigned char rnd[20], hash[32];
    char policy_path[400], policy[1024], hex[65];
    unsigned int hlen = 0;

    /* The shim: C_Sign fails while fail.on exists, C_Decrypt waits while
     * hang.on exists (P11SHIM_FAIL_FILE, P11SHIM_HANG_FILE). */
    setenv("P11SHIM_MODULE", tt_softhsm_module(), 1);
    setenv("P11SHIM_FAIL_FUNCS", "C_Sign", 1);
    setenv("P11SHIM_FAIL_RATE", "1", 1);
    setenv("P11SHIM_HANG_FUNCS", "C_Decrypt", 1);
    setenv("P11SHIM_HANG_MS", "60000", 1);
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-secmem", NULL, "[policy]\nfile = policy.conf\n"),
                     0);
    snprintf(fail_path, sizeof(fail_path), "%s/fail.on", K.dir);
    snprintf(hang_path, sizeof(hang_path), "%s/hang.on", K.dir);
    setenv("P11SHIM_FAIL_FILE", fail_path, 1);
    setenv("P11SHIM_HANG_FILE", hang_path, 1);
    snprintf(K.tt.module, sizeof(K.tt.module), "%s", P11SHIM_PATH);
    ck_assert_int_eq(kh_write_conf(&K, NULL, "[policy]\nfile = policy.conf\n"), 0);

    ck_assert_int_eq(RAND_bytes(rnd, sizeof(rnd)), 1);
    for (size_t i = 0; i < sizeof(rnd); i++)
        sprintf(bearer + 2 * i, "%02x", rnd[i]);
    ck_assert_int_eq(EVP_Digest(bearer, strlen(bearer), hash, &hlen, EVP_sha256(), NULL), 1);
    for (size_t i = 0; i < sizeof(hash); i++)
        sprintf(hex + 2 * i, "%02x", hash[i]);
    snprintf(control, sizeof(control), "memscan-control-%d-%02x%02x", (int)getpid(), rnd[0],
             rnd[1]);
    snprintf(policy, sizeof(policy),
             "allow uid:0 all on *\n"
             "allow cert:app-* generate,decrypt on sm\n"
             "allow cert:ops-* admin on *\n"
             "token ci sha256:%s\n"
             "allow token:ci generate,decrypt on sm\n"
             "allow cert:%s admin on nothing\n",
             hex, control);
    snprintf(policy_path, sizeof(policy_path), "%s/policy.conf", K.dir);
    ck_assert_int_eq(kh_write_file(policy_path, policy, 0644), 0);
    ck_assert_int_eq(tp_make_pki(K.dir), 0);
    port = tp_free_port();
    ck_assert_int_gt(port, 0);
    ck_assert_int_eq(tp_add_tls_listener(&K, port), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    {
        long status = 0;
        json_decref(ku_call(&K, "POST", "/v1/keys", "{\"name\":\"sm\"}", &status));
        ck_assert_int_eq(status, 201);
    }
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);

    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

/* ---- data keys --------------------------------------------------------------- */

/* Remember the data key of a generate/decrypt reply body; returns its index
 * (a decrypt of a known DEK returns the known index after checking the
 * bytes). */
static int remember(const char *body)
{
    json_t *j = json_loads(body, 0, NULL);
    const char *id, *b64;
    unsigned char raw[48];
    int i;

    ck_assert_msg(j != NULL, "not JSON: %s", body);
    id = json_string_value(json_object_get(j, "dek_id"));
    b64 = json_string_value(json_object_get(j, "plaintext"));
    ck_assert_msg(id != NULL && b64 != NULL, "not a data key: %s", body);
    ck_assert_int_eq(ku_b64_key(b64, raw), 32);
    for (i = 0; i < n_deks; i++) {
        if (strcmp(deks[i].id, id) == 0) {
            ck_assert_str_eq(deks[i].b64, b64);
            json_decref(j);
            return i;
        }
    }
    ck_assert_int_lt(n_deks, MAX_DEKS);
    snprintf(deks[i].id, sizeof(deks[i].id), "%s", id);
    snprintf(deks[i].b64, sizeof(deks[i].b64), "%s", b64);
    memcpy(deks[i].raw, raw, 32);
    n_deks++;
    json_decref(j);
    return i;
}

/* Over the Unix socket, a new connection each (headers: NULL or a list). */
static int unix_generate(const char *const *headers)
{
    kh_response r;
    int i;

    ck_assert_int_eq(
        kh_request(K.sock, "POST", "/v1/keys/sm/datakeys", CONTEXT, strlen(CONTEXT), headers, &r),
        0);
    ck_assert_msg(r.status == 201, "datakey: %ld %s", r.status, r.body);
    i = remember(r.body);
    kh_response_free(&r);
    return i;
}

static void unix_decrypt(int i, const char *const *headers)
{
    kh_response r;
    char path[128];

    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", deks[i].id);
    ck_assert_int_eq(kh_request(K.sock, "POST", path, CONTEXT, strlen(CONTEXT), headers, &r), 0);
    ck_assert_msg(r.status == 200, "decrypt: %ld %s", r.status, r.body);
    ck_assert_int_eq(remember(r.body), i);
    kh_response_free(&r);
}

/* ---- TLS (libcurl) --------------------------------------------------------------- */

typedef struct tls_reply {
    long status;
    char body[4096];
    size_t len;
} tls_reply;

static size_t collect(char *ptr, size_t size, size_t n, void *arg)
{
    tls_reply *r = arg;
    size_t len = size * n, room = sizeof(r->body) - 1 - r->len;

    memcpy(r->body + r->len, ptr, len < room ? len : room);
    r->len += len < room ? len : room;
    r->body[r->len] = '\0';
    return len;
}

/* who: "app1" or "ops" (files made by tp_make_pki); handle NULL for a new
 * connection; bearer_header: add Authorization: Bearer. */
static tls_reply https(CURL *handle, const char *who, const char *path, const char *body,
                       long sslversion, int bearer_header)
{
    CURL *c = handle != NULL ? handle : curl_easy_init();
    char url[300], cert[400], key[400], ca[400], auth[128];
    struct curl_slist *hdrs = curl_slist_append(NULL, "Content-Type: application/json");
    tls_reply r;
    CURLcode rc;

    memset(&r, 0, sizeof(r));
    ck_assert_ptr_nonnull(c);
    if (bearer_header) {
        snprintf(auth, sizeof(auth), "Authorization: Bearer %s", bearer);
        hdrs = curl_slist_append(hdrs, auth);
    }
    snprintf(url, sizeof(url), "https://127.0.0.1:%d%s", port, path);
    snprintf(ca, sizeof(ca), "%s/ca.crt", K.dir);
    snprintf(cert, sizeof(cert), "%s/%s.crt", K.dir, who);
    snprintf(key, sizeof(key), "%s/%s.key", K.dir, who);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CAINFO, ca);
    curl_easy_setopt(c, CURLOPT_SSLCERT, cert);
    curl_easy_setopt(c, CURLOPT_SSLKEY, key);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 60L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &r);
    curl_easy_setopt(c, CURLOPT_SSLVERSION, sslversion);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    rc = curl_easy_perform(c);
    ck_assert_msg(rc == CURLE_OK, "POST %s over TLS: %s", path, curl_easy_strerror(rc));
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.status);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(hdrs);
    if (handle == NULL)
        curl_easy_cleanup(c);
    return r;
}

static int tls_generate(CURL *h, long sslversion, int bearer_header)
{
    tls_reply r = https(h, "app1", "/v1/keys/sm/datakeys", CONTEXT, sslversion, bearer_header);

    ck_assert_msg(r.status == 201, "datakey over TLS: %ld %s", r.status, r.body);
    return remember(r.body);
}

static void tls_decrypt(CURL *h, int i, long sslversion)
{
    char path[128];
    tls_reply r;

    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", deks[i].id);
    r = https(h, "app1", path, CONTEXT, sslversion, 0);
    ck_assert_msg(r.status == 200, "decrypt over TLS: %ld %s", r.status, r.body);
    ck_assert_int_eq(remember(r.body), i);
}

/* ---- waiting for kmsd ------------------------------------------------------------ */

/* Wait (up to 60 s) until kmsd has at least `inflight` requests in flight
 * besides the metrics request itself; `exact` waits for exactly that many
 * and no client connection but the metrics one. */
static void wait_kmsd(long inflight, int exact)
{
    for (int i = 0; i < 6000; i++) {
        kh_response r;
        long in, conns;

        ck_assert_int_eq(kh_request(K.sock, "GET", "/metrics", NULL, 0, NULL, &r), 0);
        ck_assert_int_eq(r.status, 200);
        in = kh_metric_value(r.body, "p11kms_http_inflight_requests") - 1;
        conns = kh_metric_value(r.body, "p11kms_http_connections") - 1;
        kh_response_free(&r);
        if (exact ? in == inflight && conns == 0 : in >= inflight)
            return;
        usleep(10000);
    }
    ck_abort_msg("kmsd did not reach %ld requests in flight", inflight);
}

/* ---- the scan ----------------------------------------------------------------------- */

/* Scan kmsd for every data key remembered (raw and base64) and, when
 * asked, the bearer token; the control string must be found. */
static void scan_kmsd(const char *title, int with_bearer)
{
    ms_needle needles[2 + 2 * MAX_DEKS];
    char labels[2 * MAX_DEKS][32];
    size_t n = 0;
    ms_result *res = calloc(1, sizeof(*res));

    ck_assert_ptr_nonnull(res);
    wait_kmsd(0, 1);
    needles[n++] = (ms_needle){.label = "control",
                               .bytes = (const unsigned char *)control,
                               .len = strlen(control),
                               .control = 1};
    if (with_bearer)
        needles[n++] = (ms_needle){"bearer token", (const unsigned char *)bearer, strlen(bearer),
                                   strlen(bearer) / 2, 0};
    for (int i = 0; i < n_deks; i++) {
        snprintf(labels[2 * i], sizeof(labels[0]), "dek %d raw", i);
        snprintf(labels[2 * i + 1], sizeof(labels[0]), "dek %d base64", i);
        needles[n++] = (ms_needle){labels[2 * i], deks[i].raw, 32, RAW_MIN, 0};
        needles[n++] = (ms_needle){labels[2 * i + 1], (const unsigned char *)deks[i].b64,
                                   strlen(deks[i].b64), B64_MIN, 0};
    }
    ck_assert_int_eq(ms_scan(K.pid, needles, n, res), 0);
    ms_report(stderr, title, needles, res);
    fprintf(
        stderr,
        "secmem %s: %d data keys (raw + base64)%s: %zu copies in kmsd, %" PRIu64 " bytes scanned\n",
        title, n_deks, with_bearer ? " and the bearer token" : "", res->n_hits, res->bytes_scanned);
    ck_assert_msg(res->control_hits > 0, "the control string was not found: the scan read nothing");
    ck_assert_msg(res->n_hits == 0, "%s: %zu copies of released secrets remain in kmsd", title,
                  res->n_hits);
    free(res);
}

/* ---- scenarios ------------------------------------------------------------------- */

START_TEST(unix_round_trips)
{
    CURL *h = curl_easy_init();
    kh_response r;
    char *reply = NULL, *body;
    char req[512];

    n_deks = 0;
    for (int i = 0; i < 4; i++)
        unix_decrypt(unix_generate(NULL), NULL);
    /* One keep-alive connection. */
    for (int i = 0; i < 4; i++) {
        char path[128];
        int k;

        ck_assert_int_eq(kh_request_h(h, K.sock, "POST", "/v1/keys/sm/datakeys", CONTEXT,
                                      strlen(CONTEXT), NULL, &r),
                         0);
        ck_assert_int_eq(r.status, 201);
        k = remember(r.body);
        kh_response_free(&r);
        snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", deks[k].id);
        ck_assert_int_eq(kh_request_h(h, K.sock, "POST", path, CONTEXT, strlen(CONTEXT), NULL, &r),
                         0);
        ck_assert_int_eq(r.status, 200);
        ck_assert_int_eq(remember(r.body), k);
        kh_response_free(&r);
    }
    curl_easy_cleanup(h);
    /* HTTP/1.0: kmsd closes the connection after the reply. */
    snprintf(req, sizeof(req),
             "POST /v1/keys/sm/datakeys HTTP/1.0\r\nContent-Length: %zu\r\n\r\n%s", strlen(CONTEXT),
             CONTEXT);
    ck_assert_int_eq(kh_raw(K.sock, req, strlen(req), 30000, &reply), 0);
    body = strstr(reply, "\r\n\r\n");
    ck_assert_msg(body != NULL && strstr(reply, " 201 ") != NULL, "HTTP/1.0: %s", reply);
    remember(body + 4);
    free(reply);
    scan_kmsd("unix_round_trips", 0);
}
END_TEST

/* A connected socket to kmsd's Unix socket. */
static int unix_connect(void)
{
    struct sockaddr_un sun;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

    ck_assert_int_ge(fd, 0);
    ck_assert_uint_lt(strlen(K.sock), sizeof(sun.sun_path));
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    memcpy(sun.sun_path, K.sock, strlen(K.sock));
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    return fd;
}

static void decrypt_request(int i, char *out, size_t len)
{
    snprintf(out, len,
             "POST /v1/datakeys/%s/decrypt HTTP/1.1\r\nHost: kms\r\nContent-Length: %zu\r\n\r\n%s",
             deks[i].id, strlen(CONTEXT), CONTEXT);
}

/* A TLS connection to kmsd as app1 (OpenSSL directly: the test decides
 * when it goes away). */
static SSL *tls_connect(SSL_CTX **ctx_out, int *fd_out)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    char path[400];
    struct sockaddr_in sin;
    SSL *ssl;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

    ck_assert_ptr_nonnull(ctx);
    ck_assert_int_ge(fd, 0);
    snprintf(path, sizeof(path), "%s/ca.crt", K.dir);
    ck_assert_int_eq(SSL_CTX_load_verify_locations(ctx, path, NULL), 1);
    snprintf(path, sizeof(path), "%s/app1.crt", K.dir);
    ck_assert_int_eq(SSL_CTX_use_certificate_file(ctx, path, SSL_FILETYPE_PEM), 1);
    snprintf(path, sizeof(path), "%s/app1.key", K.dir);
    ck_assert_int_eq(SSL_CTX_use_PrivateKey_file(ctx, path, SSL_FILETYPE_PEM), 1);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_port = htons((uint16_t)port);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    ssl = SSL_new(ctx);
    ck_assert_ptr_nonnull(ssl);
    SSL_set_fd(ssl, fd);
    ck_assert_int_eq(SSL_connect(ssl), 1);
    *ctx_out = ctx;
    *fd_out = fd;
    return ssl;
}

START_TEST(abandoned_requests)
{
    char req[512];
    int a, b, fd, tfd;
    SSL_CTX *ctx;
    SSL *ssl;

    n_deks = 0;
    a = unix_generate(NULL);
    b = tls_generate(NULL, CURL_SSLVERSION_DEFAULT, 0);
    /* C_Decrypt waits; both clients send a decrypt and go away while the
     * token works on it; then the token answers into dead connections. */
    ck_assert_int_eq(kh_write_file(hang_path, "hang\n", 0600), 0);
    fd = unix_connect();
    decrypt_request(a, req, sizeof(req));
    ck_assert_int_eq(write(fd, req, strlen(req)), (ssize_t)strlen(req));
    ssl = tls_connect(&ctx, &tfd);
    decrypt_request(b, req, sizeof(req));
    ck_assert_int_eq(SSL_write(ssl, req, (int)strlen(req)), (int)strlen(req));
    wait_kmsd(2, 0);
    close(fd);
    SSL_free(ssl); /* no close_notify: the client just goes away */
    close(tfd);
    SSL_CTX_free(ctx);
    ck_assert_int_eq(unlink(hang_path), 0);
    /* Two more that are answered to clients which read only the first
     * bytes of the reply and then go away. */
    for (int i = 0; i < 2; i++) {
        char head[16];
        fd = unix_connect();
        decrypt_request(i == 0 ? a : b, req, sizeof(req));
        ck_assert_int_eq(write(fd, req, strlen(req)), (ssize_t)strlen(req));
        ck_assert_int_eq(read(fd, head, sizeof(head)), (ssize_t)sizeof(head));
        close(fd);
    }
    scan_kmsd("abandoned_requests", 0);
}
END_TEST

START_TEST(tls_round_trips)
{
    CURL *h = curl_easy_init();

    n_deks = 0;
    for (int i = 0; i < 3; i++)
        tls_decrypt(NULL, tls_generate(NULL, CURL_SSLVERSION_TLSv1_3, 0), CURL_SSLVERSION_TLSv1_3);
    /* TLS 1.2, keep-alive. */
    for (int i = 0; i < 3; i++)
        tls_decrypt(h, tls_generate(h, CURL_SSLVERSION_TLSv1_2 | CURL_SSLVERSION_MAX_TLSv1_2, 0),
                    CURL_SSLVERSION_TLSv1_2 | CURL_SSLVERSION_MAX_TLSv1_2);
    curl_easy_cleanup(h);
    scan_kmsd("tls_round_trips", 0);
}
END_TEST

START_TEST(bearer_tokens)
{
    char auth[128];
    const char *hdrs[] = {auth, NULL};

    n_deks = 0;
    snprintf(auth, sizeof(auth), "Authorization: Bearer %s", bearer);
    for (int i = 0; i < 2; i++)
        unix_decrypt(unix_generate(hdrs), hdrs);
    for (int i = 0; i < 2; i++)
        tls_generate(NULL, CURL_SSLVERSION_DEFAULT, 1);
    scan_kmsd("bearer_tokens", 1);
}
END_TEST

START_TEST(error_paths)
{
    char path[128];
    tls_reply t;
    int a, b;

    n_deks = 0;
    a = unix_generate(NULL);
    b = unix_generate(NULL);
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", deks[a].id);
    ku_expect_error(&K, "POST", path, WRONG_CONTEXT, 400, "context_mismatch");
    /* ops-alice has admin only. */
    t = https(NULL, "ops", path, CONTEXT, CURL_SSLVERSION_DEFAULT, 0);
    ck_assert_msg(t.status == 403 && strstr(t.body, "\"forbidden\"") != NULL, "%ld %s", t.status,
                  t.body);
    /* The token unwraps, then the audit MAC fails: fail closed. */
    ck_assert_int_eq(kh_write_file(fail_path, "fail\n", 0600), 0);
    {
        long status = 0;
        json_t *j = ku_call(&K, "POST", path, CONTEXT, &status);
        const char *code = json_string_value(json_object_get(json_object_get(j, "error"), "code"));
        /* The token failed to seal the entry: 503 token_unavailable. */
        ck_assert_msg(status == 503 && code != NULL && strcmp(code, "token_unavailable") == 0,
                      "decrypt with a failing audit: %ld %s", status, code ? code : "-");
        ck_assert_ptr_null(json_object_get(j, "plaintext"));
        json_decref(j);
        j = ku_call(&K, "POST", "/v1/keys/sm/datakeys", CONTEXT, &status);
        ck_assert_msg(status >= 500 && json_object_get(j, "error") != NULL,
                      "datakey with a failing audit: %ld", status);
        json_decref(j);
    }
    ck_assert_int_eq(unlink(fail_path), 0);
    unix_decrypt(a, NULL);
    /* Revoked, then destroyed. */
    snprintf(path, sizeof(path), "/v1/datakeys/%s/revoke", deks[b].id);
    json_decref(ku_call(&K, "POST", path, "{\"reason\":\"compromised\"}", &(long){0}));
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", deks[b].id);
    ku_expect_error(&K, "POST", path, CONTEXT, 403, "dek_revoked");
    snprintf(path, sizeof(path), "/v1/datakeys/%s", deks[b].id);
    json_decref(ku_call(&K, "DELETE", path, NULL, &(long){0}));
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", deks[b].id);
    ku_expect_error(&K, "POST", path, CONTEXT, 410, "dek_destroyed");
    scan_kmsd("error_paths", 0);
}
END_TEST

START_TEST(rewrap)
{
    long status = 0;
    json_t *j;

    n_deks = 0;
    for (int i = 0; i < 4; i++)
        unix_generate(NULL);
    json_decref(ku_call(&K, "POST", "/v1/keys/sm/rotate", NULL, &status));
    ck_assert_int_eq(status, 200);
    j = ku_call(&K, "POST", "/v1/keys/sm/rewrap", NULL, &status);
    ck_assert_int_eq(status, 200);
    ck_assert_int_ge(json_integer_value(json_object_get(j, "rewrapped")), 4);
    json_decref(j);
    scan_kmsd("rewrap", 0);
}
END_TEST

/* May this process read a non-dumpable process's memory, as it must
 * read kmsd's? */
static int may_scan_nondumpable(void)
{
    int pipefd[2], ok;
    pid_t pid;
    char c;

    if (pipe(pipefd) != 0)
        return 0;
    pid = fork();
    if (pid == 0) {
        close(pipefd[1]);
        prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
        _exit(read(pipefd[0], &c, 1) < 0);
    }
    close(pipefd[0]);
    usleep(100000);
    ok = pid > 0 && ms_can_scan(pid);
    close(pipefd[1]);
    if (pid > 0)
        waitpid(pid, NULL, 0);
    return ok;
}

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_secmem");
    TCase *tc = tcase_create("secmem");

    tcase_set_timeout(tc, 300);
    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_add_test(tc, unix_round_trips);
    tcase_add_test(tc, abandoned_requests);
    tcase_add_test(tc, tls_round_trips);
    tcase_add_test(tc, bearer_tokens);
    tcase_add_test(tc, error_paths);
    tcase_add_test(tc, rewrap);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr;
    int failed;

    if (!may_scan_nondumpable()) {
        fprintf(stderr, "test_kmsd_secmem: SKIPPED: this process may not read a non-dumpable "
                        "process's memory (needs root or CAP_SYS_PTRACE)\n");
        return 77;
    }
    sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
