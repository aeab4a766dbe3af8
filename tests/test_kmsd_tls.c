/*
 * tests/test_kmsd_tls.c - the mutual-TLS listener of the real kmsd on
 * TCP loopback.  The test makes its PKI with the OpenSSL C API: a CA, a
 * server certificate (SAN 127.0.0.1), client certificates with CNs (and
 * one without), and an unrelated CA with its own client.  Checked: a
 * valid client is accepted with principal cert:<CN> and the policy grants
 * by CN; no client certificate, a certificate of another CA and TLS 1.1
 * fail in the handshake; TLS 1.2 and 1.3 work; the framing limits apply
 * over TLS; keep-alive works.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <curl/curl.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"
#include "support/testpki.h"

static kh_kmsd K;
static int port;
static char url_base[64];

static void start(void)
{
    char policy[400];

    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-tls", NULL, "[policy]\nfile = policy.conf\n"),
                     0);
    ck_assert_int_eq(tp_make_pki(K.dir), 0);
    snprintf(policy, sizeof(policy), "%s/policy.conf", K.dir);
    ck_assert_int_eq(kh_write_file(policy,
                                   "allow uid:0 all on *\n"
                                   "allow cert:app-* generate,decrypt on app-*\n"
                                   "allow cert:ops-* admin on *\n",
                                   0644),
                     0);
    port = tp_free_port();
    ck_assert_int_gt(port, 0);
    snprintf(url_base, sizeof(url_base), "https://127.0.0.1:%d", port);
    ck_assert_int_eq(tp_add_tls_listener(&K, port), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

/* ---- an HTTPS client (libcurl) ---- */

typedef struct tls_result {
    CURLcode rc;
    long status;
    char body[4096];
    size_t len;
} tls_result;

static size_t collect(char *ptr, size_t size, size_t n, void *arg)
{
    tls_result *r = arg;
    size_t len = size * n, room = sizeof(r->body) - 1 - r->len;

    memcpy(r->body + r->len, ptr, len < room ? len : room);
    r->len += len < room ? len : room;
    r->body[r->len] = '\0';
    return len;
}

/* who: "app1", "rogue", ... (files in K.dir) or NULL for no certificate.
 * handle: NULL for a new one, else reused (keep-alive). */
static tls_result https(CURL *handle, const char *who, const char *method, const char *path,
                        const char *body, long sslversion)
{
    CURL *c = handle != NULL ? handle : curl_easy_init();
    char url[300], cert[400], key[400], ca[400];
    struct curl_slist *hdrs = curl_slist_append(NULL, "Content-Type: application/json");
    tls_result r;

    memset(&r, 0, sizeof(r));
    ck_assert_ptr_nonnull(c);
    snprintf(url, sizeof(url), "%s%s", url_base, path);
    snprintf(ca, sizeof(ca), "%s/ca.crt", K.dir);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_CAINFO, ca);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 20L);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, collect);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &r);
    curl_easy_setopt(c, CURLOPT_SSLVERSION, sslversion);
    if (body != NULL) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    }
    if (who != NULL) {
        snprintf(cert, sizeof(cert), "%s/%s.crt", K.dir, who);
        snprintf(key, sizeof(key), "%s/%s.key", K.dir, who);
        curl_easy_setopt(c, CURLOPT_SSLCERT, cert);
        curl_easy_setopt(c, CURLOPT_SSLKEY, key);
    }
    r.rc = curl_easy_perform(c);
    if (r.rc == CURLE_OK)
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &r.status);
    if (body != NULL) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, NULL);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, -1L);
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(hdrs);
    if (handle == NULL)
        curl_easy_cleanup(c);
    return r;
}

static void expect_status(const char *who, const char *method, const char *path, const char *body,
                          long status)
{
    tls_result r = https(NULL, who, method, path, body, CURL_SSLVERSION_DEFAULT);

    ck_assert_msg(r.rc == CURLE_OK, "%s %s as %s: %s", method, path, who ? who : "(none)",
                  curl_easy_strerror(r.rc));
    ck_assert_msg(r.status == status, "%s %s as %s: %ld, want %ld: %s", method, path,
                  who ? who : "(none)", r.status, status, r.body);
}

static int log_count(const char *needle)
{
    char *log = kh_read_file(K.log, NULL), *at = log;
    int n = 0;

    while (at != NULL && (at = strstr(at, needle)) != NULL) {
        n++;
        at += strlen(needle);
    }
    free(log);
    return n;
}

/* ---- tests ---- */

START_TEST(valid_client_gets_its_cn)
{
    tls_result r;
    json_t *j;
    char path[128];

    expect_status("ops", "POST", "/v1/keys", "{\"name\":\"app-web\"}", 201);
    expect_status("ops", "GET", "/v1/keys", NULL, 200);
    r = https(NULL, "app1", "POST", "/v1/keys/app-web/datakeys", "{\"context\":{\"a\":\"b\"}}",
              CURL_SSLVERSION_DEFAULT);
    ck_assert_msg(r.rc == CURLE_OK && r.status == 201, "%s %ld %s", curl_easy_strerror(r.rc),
                  r.status, r.body);
    j = json_loads(r.body, 0, NULL);
    ck_assert_ptr_nonnull(j);
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt",
             json_string_value(json_object_get(j, "dek_id")));
    json_decref(j);
    expect_status("app1", "POST", path, "{\"context\":{\"a\":\"b\"}}", 200);
    /* CN-based grants: app-1 may not admin, ops-alice may not decrypt */
    r = https(NULL, "app1", "GET", "/v1/keys", NULL, CURL_SSLVERSION_DEFAULT);
    ck_assert_int_eq(r.status, 403);
    ck_assert_ptr_nonnull(strstr(r.body, "cert:app-1 may not admin"));
    expect_status("ops", "POST", path, "{\"context\":{\"a\":\"b\"}}", 403);
    /* the access log names the principal */
    ck_assert_int_ge(log_count("POST /v1/keys/app-web/datakeys 201"), 1);
    ck_assert_int_ge(log_count(" cert:app-1 datakey.generate"), 1);
    ck_assert_int_ge(log_count(" cert:ops-alice key.create"), 1);
    /* a verified certificate without a CN names nobody: 401 */
    expect_status("nocn", "GET", "/v1/health", NULL, 401);
    /* health is open to any authenticated client */
    expect_status("app1", "GET", "/v1/health", NULL, 200);
}
END_TEST

START_TEST(handshake_refusals)
{
    tls_result r;
    int health_lines = log_count("/v1/health");

    r = https(NULL, NULL, "GET", "/v1/health", NULL, CURL_SSLVERSION_DEFAULT);
    ck_assert_msg(r.rc != CURLE_OK && r.status == 0, "no client cert: %s %ld",
                  curl_easy_strerror(r.rc), r.status);
    r = https(NULL, "rogue", "GET", "/v1/health", NULL, CURL_SSLVERSION_DEFAULT);
    ck_assert_msg(r.rc != CURLE_OK && r.status == 0, "other CA: %s %ld", curl_easy_strerror(r.rc),
                  r.status);
    r = https(NULL, NULL, "GET", "/v1/health", NULL,
              CURL_SSLVERSION_TLSv1_2 | CURL_SSLVERSION_MAX_TLSv1_2);
    ck_assert_msg(r.rc != CURLE_OK && r.status == 0, "no client cert, TLS 1.2: %s",
                  curl_easy_strerror(r.rc));
    r = https(NULL, "rogue", "GET", "/v1/health", NULL,
              CURL_SSLVERSION_TLSv1_2 | CURL_SSLVERSION_MAX_TLSv1_2);
    ck_assert_msg(r.rc != CURLE_OK && r.status == 0, "other CA, TLS 1.2: %s",
                  curl_easy_strerror(r.rc));
    /* none of them got as far as a request (the access log has no new line) */
    ck_assert_int_eq(log_count("/v1/health"), health_lines);
    ku_assert_healthy(&K);
}
END_TEST

START_TEST(protocol_versions)
{
    tls_result r;
    SSL_CTX *ctx;
    SSL *ssl;
    BIO *bio;
    char target[64];
    unsigned long e;

    r = https(NULL, "app1", "GET", "/v1/health", NULL,
              CURL_SSLVERSION_TLSv1_2 | CURL_SSLVERSION_MAX_TLSv1_2);
    ck_assert_msg(r.rc == CURLE_OK && r.status == 200, "TLS 1.2: %s", curl_easy_strerror(r.rc));
    r = https(NULL, "app1", "GET", "/v1/health", NULL,
              CURL_SSLVERSION_TLSv1_3 | CURL_SSLVERSION_MAX_TLSv1_3);
    ck_assert_msg(r.rc == CURLE_OK && r.status == 200, "TLS 1.3: %s", curl_easy_strerror(r.rc));

    /* TLS 1.1 from a client willing to speak it (security level 0): the
     * server answers with a protocol_version alert. */
    ctx = SSL_CTX_new(TLS_client_method());
    ck_assert_ptr_nonnull(ctx);
    SSL_CTX_set_security_level(ctx, 0);
    ck_assert_int_eq(SSL_CTX_set_min_proto_version(ctx, TLS1_1_VERSION), 1);
    ck_assert_int_eq(SSL_CTX_set_max_proto_version(ctx, TLS1_1_VERSION), 1);
    ck_assert_int_eq(SSL_CTX_set_cipher_list(ctx, "DEFAULT@SECLEVEL=0"), 1);
    snprintf(target, sizeof(target), "127.0.0.1:%d", port);
    bio = BIO_new_ssl_connect(ctx);
    ck_assert_ptr_nonnull(bio);
    BIO_get_ssl(bio, &ssl);
    BIO_set_conn_hostname(bio, target);
    ERR_clear_error();
    ck_assert_int_le(BIO_do_handshake(bio), 0);
    e = ERR_peek_last_error();
    ck_assert_msg(ERR_GET_REASON(e) == SSL_R_TLSV1_ALERT_PROTOCOL_VERSION,
                  "TLS 1.1: expected a protocol_version alert, got %s", ERR_error_string(e, NULL));
    BIO_free_all(bio);
    SSL_CTX_free(ctx);
    ERR_clear_error();
}
END_TEST

/* The framing filter sits above TLS: limits and keep-alive hold. */
START_TEST(framing_over_tls)
{
    CURL *c = curl_easy_init();
    char *big = malloc(70001);
    tls_result r;

    for (int i = 0; i < 3; i++) {
        r = https(c, "app1", "GET", "/v1/health", NULL, CURL_SSLVERSION_DEFAULT);
        ck_assert_msg(r.rc == CURLE_OK && r.status == 200, "%s", curl_easy_strerror(r.rc));
    }
    memset(big, 'x', 70000);
    big[70000] = '\0';
    r = https(NULL, "app1", "POST", "/v1/keys/app-web/datakeys", big, CURL_SSLVERSION_DEFAULT);
    ck_assert_msg(r.rc == CURLE_OK && r.status == 413, "%s %ld", curl_easy_strerror(r.rc),
                  r.status);
    ck_assert_ptr_nonnull(strstr(r.body, "payload_too_large"));
    r = https(NULL, "app1", "GET", "/nope", NULL, CURL_SSLVERSION_DEFAULT);
    ck_assert_int_eq(r.status, 404);
    free(big);
    curl_easy_cleanup(c);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd-tls");
    TCase *tc = tcase_create("tls");

    tcase_set_timeout(tc, 300);
    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_add_test(tc, valid_client_gets_its_cn);
    tcase_add_test(tc, handshake_refusals);
    tcase_add_test(tc, protocol_versions);
    tcase_add_test(tc, framing_over_tls);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr;
    int failed;

    curl_global_init(CURL_GLOBAL_DEFAULT);
    sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    curl_global_cleanup();
    return failed == 0 ? 0 : 1;
}
