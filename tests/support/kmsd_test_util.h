/*
 * tests/support/kmsd_test_util.h - small helpers shared by the test_kmsd_* programs
 * (header-only; each program has one kmsd, `K`, started by its fixture).
 */
#ifndef P11KMS_TESTS_KMSD_TEST_UTIL_H
#define P11KMS_TESTS_KMSD_TEST_UTIL_H

#include <check.h>
#include <jansson.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <string.h>

#include "kmsd_harness.h"

/* Request; checks that the reply is JSON; returns the parsed body. */
static inline json_t *ku_call(const kh_kmsd *k, const char *method, const char *path,
                              const char *body, long *status)
{
    kh_response r;
    json_error_t jerr;
    char ctype[128] = "";
    json_t *j;

    ck_assert_msg(
        kh_request(k->sock, method, path, body, body != NULL ? strlen(body) : 0, NULL, &r) == 0,
        "%s %s: no HTTP response", method, path);
    ck_assert_msg(kh_header(&r, "Content-Type", ctype, sizeof(ctype)), "%s %s: no Content-Type",
                  method, path);
    ck_assert_str_eq(ctype, "application/json");
    j = json_loadb(r.body, r.len, 0, &jerr);
    ck_assert_msg(j != NULL, "%s %s: body is not JSON: %s", method, path, r.body);
    *status = r.status;
    kh_response_free(&r);
    return j;
}

static inline void ku_assert_healthy(const kh_kmsd *k)
{
    long status = 0;
    json_t *j = ku_call(k, "GET", "/v1/health", NULL, &status);

    ck_assert_int_eq(status, 200);
    ck_assert_str_eq(json_string_value(json_object_get(j, "status")), "ok");
    json_decref(j);
}

/* Assert an error reply {"error":{"code":code,"message":...}} with this
 * status, then that kmsd still answers /v1/health.  Returns the message
 * (static buffer). */
static inline const char *ku_expect_error(const kh_kmsd *k, const char *method, const char *path,
                                          const char *body, long want_status, const char *code)
{
    static char message[512];
    long status = 0;
    json_t *j = ku_call(k, method, path, body, &status), *err;

    ck_assert_msg(status == want_status, "%s %s: status %ld, want %ld", method, path, status,
                  want_status);
    err = json_object_get(j, "error");
    ck_assert_ptr_nonnull(err);
    ck_assert_str_eq(json_string_value(json_object_get(err, "code")), code);
    ck_assert_ptr_nonnull(json_string_value(json_object_get(err, "message")));
    snprintf(message, sizeof(message), "%s", json_string_value(json_object_get(err, "message")));
    json_decref(j);
    ku_assert_healthy(k);
    return message;
}

/* Decode standard base64 of a 32-byte key; returns the length. */
static inline int ku_b64_key(const char *b64, unsigned char out[48])
{
    int n = EVP_DecodeBlock(out, (const unsigned char *)b64, (int)strlen(b64));
    size_t len = strlen(b64);

    if (n < 0)
        return -1;
    if (len >= 1 && b64[len - 1] == '=')
        n--;
    if (len >= 2 && b64[len - 2] == '=')
        n--;
    return n;
}

#endif
