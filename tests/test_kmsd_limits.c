/*
 * tests/test_kmsd_limits.c - bounded input in the real kmsd: bodies over
 * max_body answered 413 payload_too_large in JSON without buffering them
 * (1 MiB and 50 MiB, with and without Expect: 100-continue; kmsd's peak
 * RSS is checked), chunked bodies, oversized heads, malformed requests,
 * unknown methods, pipelining and keep-alive after refusals.
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

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

static kh_kmsd K;

static void start(void)
{
#if defined(__SANITIZE_ADDRESS__)
    /* ASan keeps freed memory in a 256 MB quarantine, which would count as
     * growth of the peak RSS below; a small one keeps the check honest. */
    {
        const char *old = getenv("ASAN_OPTIONS");
        char opts[512];
        snprintf(opts, sizeof(opts), "%s%squarantine_size_mb=4", old != NULL ? old : "",
                 old != NULL && *old != '\0' ? ":" : "");
        setenv("ASAN_OPTIONS", opts, 1);
    }
#endif
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-limits", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

/* {"name":"aaaa..."} of exactly `len` bytes. */
static char *big_body(size_t len)
{
    char *b = malloc(len + 1);

    ck_assert_ptr_nonnull(b);
    memset(b, 'a', len);
    memcpy(b, "{\"name\":\"", 9);
    memcpy(b + len - 2, "\"}", 2);
    b[len] = '\0';
    return b;
}

static void expect_413(size_t len, int expect_header)
{
    static const char *const no_expect[] = {"Expect:", NULL};
    static const char *const with_expect[] = {"Expect: 100-continue", NULL};
    char *body = big_body(len);
    kh_response r;
    json_t *j;

    ck_assert_int_eq(kh_request(K.sock, "POST", "/v1/keys", body, len, NULL, &r), 0);
    ck_assert_int_eq(r.status, 413);
    j = json_loads(r.body, 0, NULL);
    ck_assert_ptr_nonnull(j);
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                     "payload_too_large");
    json_decref(j);
    kh_response_free(&r);
    ck_assert_int_eq(kh_request(K.sock, "POST", "/v1/keys", body, len,
                                expect_header ? with_expect : no_expect, &r),
                     0);
    ck_assert_int_eq(r.status, 413);
    ck_assert_ptr_nonnull(strstr(r.body, "\"payload_too_large\""));
    kh_response_free(&r);
    free(body);
    ku_assert_healthy(&K);
}

START_TEST(payload_1mib)
{
    expect_413(1024 * 1024, 1);
    expect_413(1024 * 1024, 0);
}
END_TEST

START_TEST(payload_50mib_not_buffered)
{
    long before = kh_proc_kb(K.pid, "VmHWM"), after;

    ck_assert_int_gt(before, 0);
    expect_413(50 * 1024 * 1024, 0);
    expect_413(50 * 1024 * 1024, 1);
    after = kh_proc_kb(K.pid, "VmHWM");
    ck_assert_msg(after - before < 16 * 1024, "kmsd peak RSS grew from %ld kB to %ld kB", before,
                  after);
}
END_TEST

START_TEST(payload_at_the_limit)
{
    char *body = big_body(65536);
    kh_response r;

    /* exactly max_body: accepted (and refused for its name, not its size) */
    ck_assert_int_eq(kh_request(K.sock, "POST", "/v1/keys", body, 65536, NULL, &r), 0);
    ck_assert_int_eq(r.status, 400);
    ck_assert_ptr_nonnull(strstr(r.body, "invalid key name"));
    kh_response_free(&r);
    free(body);
    body = big_body(65537);
    ck_assert_int_eq(kh_request(K.sock, "POST", "/v1/keys", body, 65537, NULL, &r), 0);
    ck_assert_int_eq(r.status, 413);
    kh_response_free(&r);
    free(body);
    ku_assert_healthy(&K);
}
END_TEST

START_TEST(chunked_refused)
{
    static const char *const chunked[] = {"Transfer-Encoding: chunked", NULL};
    kh_response r;

    ck_assert_int_eq(
        kh_request(K.sock, "POST", "/v1/keys", "{\"name\":\"chunky\"}", 17, chunked, &r), 0);
    ck_assert_int_eq(r.status, 400);
    ck_assert_ptr_nonnull(strstr(r.body, "\"bad_request\""));
    ck_assert_ptr_nonnull(strstr(r.body, "Transfer-Encoding"));
    kh_response_free(&r);
    ku_assert_healthy(&K);
}
END_TEST

static void raw_expect(const char *request, const char *status_line, const char *code)
{
    char *reply = NULL;

    ck_assert_int_eq(kh_raw(K.sock, request, strlen(request), 5000, &reply), 0);
    ck_assert_msg(strncmp(reply, status_line, strlen(status_line)) == 0, "reply: %.200s", reply);
    ck_assert_ptr_nonnull(strstr(reply, "Content-Type: application/json"));
    ck_assert_msg(strstr(reply, code) != NULL, "reply: %.300s", reply);
    free(reply);
    ku_assert_healthy(&K);
}

START_TEST(raw_malformed)
{
    char *req;
    size_t n = 20000;

    raw_expect("GARBAGE\r\n\r\n", "HTTP/1.1 400", "\"bad_request\"");
    raw_expect("GET /v1/health HTTP/9.9\r\n\r\n", "HTTP/1.1 400", "\"bad_request\"");
    raw_expect("GET nohost HTTP/1.1\r\n\r\n", "HTTP/1.1 400", "\"bad_request\"");
    raw_expect("GET /v1/health HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", "HTTP/1.1 400",
               "\"bad_request\"");
    raw_expect("GET /v1/health HTTP/1.1\r\nX-P11kms-Refused: too-large\r\n\r\n", "HTTP/1.1 400",
               "\"bad_request\"");
    raw_expect("POST /v1/keys HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
               "HTTP/1.1 400", "\"bad_request\"");
    raw_expect("POST /v1/keys HTTP/1.1\r\nContent-Length: -1\r\n\r\n", "HTTP/1.1 400",
               "\"bad_request\"");
    raw_expect("BREW /v1/health HTTP/1.1\r\n\r\n", "HTTP/1.1 405", "\"method_not_allowed\"");
    raw_expect("HEAD /v1/health HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", "HTTP/1.1 400", "");
    /* a head over 16 KiB */
    req = malloc(n + 64);
    strcpy(req, "GET /v1/health HTTP/1.1\r\nX-Big: ");
    memset(req + strlen(req), 'b', n);
    req[33 + n] = '\0';
    strcat(req, "\r\n\r\n");
    raw_expect(req, "HTTP/1.1 400", "request head too large");
    free(req);
}
END_TEST

START_TEST(pipelined_and_keepalive)
{
    const char *two = "GET /v1/health HTTP/1.1\r\nHost: k\r\n\r\n"
                      "POST /v1/keys HTTP/1.1\r\nHost: k\r\nContent-Length: 19\r\n\r\n"
                      "{\"name\":\"pipeline\"}"
                      "GET /v1/keys/pipeline HTTP/1.1\r\nHost: k\r\nConnection: close\r\n\r\n";
    char *reply = NULL, *p;
    CURL *c = curl_easy_init();
    kh_response r;
    char *big = big_body(100000);

    ck_assert_int_eq(kh_raw(K.sock, two, strlen(two), 5000, &reply), 0);
    p = strstr(reply, "HTTP/1.1 200");
    ck_assert_ptr_nonnull(p);
    p = strstr(p + 1, "HTTP/1.1 201");
    ck_assert_ptr_nonnull(p);
    p = strstr(p + 1, "HTTP/1.1 200");
    ck_assert_ptr_nonnull(p);
    ck_assert_ptr_nonnull(strstr(p, "\"name\":\"pipeline\""));
    free(reply);

    /* one handle: ok, refused, ok again (curl reconnects when needed) */
    ck_assert_int_eq(kh_request_h(c, K.sock, "GET", "/v1/health", NULL, 0, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    kh_response_free(&r);
    ck_assert_int_eq(kh_request_h(c, K.sock, "POST", "/v1/keys", big, 100000, NULL, &r), 0);
    ck_assert_int_eq(r.status, 413);
    kh_response_free(&r);
    ck_assert_int_eq(kh_request_h(c, K.sock, "GET", "/v1/health", NULL, 0, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    kh_response_free(&r);
    curl_easy_cleanup(c);
    free(big);
}
END_TEST

START_TEST(http10)
{
    char *reply = NULL;

    ck_assert_int_eq(kh_raw(K.sock, "GET /v1/health HTTP/1.0\r\n\r\n", 27, 5000, &reply), 0);
    ck_assert_int_eq(strncmp(reply, "HTTP/1.0 200", 12), 0);
    ck_assert_ptr_nonnull(strstr(reply, "{\"status\":\"ok\""));
    free(reply);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_limits");
    TCase *tc = tcase_create("limits");

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, payload_1mib);
    tcase_add_test(tc, payload_50mib_not_buffered);
    tcase_add_test(tc, payload_at_the_limit);
    tcase_add_test(tc, chunked_refused);
    tcase_add_test(tc, raw_malformed);
    tcase_add_test(tc, pipelined_and_keepalive);
    tcase_add_test(tc, http10);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr;
    int failed;

    curl_global_init(CURL_GLOBAL_ALL);
    sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    curl_global_cleanup();
    return failed == 0 ? 0 : 1;
}
