/*
 * tests/test_kmsd_api.c - the HTTP API of the real kmsd over its Unix
 * socket: every route of this release, every error code reachable now,
 * the generate -> decrypt round trip, and kmsd still healthy after each
 * bad request.  One kmsd (own SoftHSM2 token) serves the whole suite.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <jansson.h>
#include <regex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

static kh_kmsd K;

static void start(void)
{
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-api", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

static void assert_rfc3339(const char *s)
{
    regex_t re;

    ck_assert_ptr_nonnull(s);
    ck_assert_int_eq(regcomp(&re, "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$",
                             REG_EXTENDED | REG_NOSUB),
                     0);
    ck_assert_msg(regexec(&re, s, 0, NULL, 0) == 0, "not RFC 3339 UTC: %s", s);
    regfree(&re);
}

static void assert_key_object(json_t *k, const char *name)
{
    json_t *versions, *v;

    ck_assert_str_eq(json_string_value(json_object_get(k, "name")), name);
    ck_assert_str_eq(json_string_value(json_object_get(k, "state")), "enabled");
    ck_assert_int_eq(json_integer_value(json_object_get(k, "latest_version")), 1);
    ck_assert_int_eq(json_integer_value(json_object_get(k, "min_decrypt_version")), 1);
    ck_assert_str_eq(json_string_value(json_object_get(k, "rotation_period")), "0");
    assert_rfc3339(json_string_value(json_object_get(k, "created")));
    versions = json_object_get(k, "versions");
    ck_assert_int_eq(json_array_size(versions), 1);
    v = json_array_get(versions, 0);
    ck_assert_int_eq(json_integer_value(json_object_get(v, "version")), 1);
    ck_assert_str_eq(json_string_value(json_object_get(v, "state")), "active");
    assert_rfc3339(json_string_value(json_object_get(v, "created")));
    ck_assert(json_is_integer(json_object_get(v, "dek_count")));
}

static json_t *create_key(const char *name)
{
    char body[128];
    long status = 0;
    json_t *j;

    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", name);
    j = ku_call(&K, "POST", "/v1/keys", body, &status);
    ck_assert_int_eq(status, 201);
    return j;
}

/* POST .../datakeys or .../decrypt; returns the reply object (status checked). */
static json_t *datakey(const char *path, const char *body, long want)
{
    long status = 0;
    json_t *j = ku_call(&K, "POST", path, body, &status);

    ck_assert_msg(status == want, "POST %s: %ld, want %ld", path, status, want);
    return j;
}

START_TEST(health_ok)
{
    long status = 0;
    json_t *j = ku_call(&K, "GET", "/v1/health", NULL, &status);

    ck_assert_int_eq(status, 200);
    ck_assert_str_eq(json_string_value(json_object_get(j, "status")), "ok");
    ck_assert_str_eq(json_string_value(json_object_get(j, "token")), "ok");
    ck_assert_str_eq(json_string_value(json_object_get(j, "store")), "ok");
    json_decref(j);
}
END_TEST

START_TEST(keys_create_show_list)
{
    long status = 0;
    json_t *j = create_key("customers"), *list;
    int found = 0;

    assert_key_object(j, "customers");
    json_decref(j);
    j = ku_call(&K, "GET", "/v1/keys/customers", NULL, &status);
    ck_assert_int_eq(status, 200);
    assert_key_object(j, "customers");
    json_decref(j);
    j = ku_call(&K, "GET", "/v1/keys", NULL, &status);
    ck_assert_int_eq(status, 200);
    list = json_object_get(j, "keys");
    ck_assert(json_is_array(list));
    for (size_t i = 0; i < json_array_size(list); i++)
        if (strcmp(json_string_value(json_object_get(json_array_get(list, i), "name")),
                   "customers") == 0) {
            assert_key_object(json_array_get(list, i), "customers");
            found = 1;
        }
    ck_assert(found);
    json_decref(j);
}
END_TEST

START_TEST(key_exists)
{
    json_decref(create_key("dup.key-1_a"));
    ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":\"dup.key-1_a\"}", 409, "key_exists");
}
END_TEST

START_TEST(key_not_found)
{
    ku_expect_error(&K, "GET", "/v1/keys/nope", NULL, 404, "key_not_found");
    ku_expect_error(&K, "POST", "/v1/keys/nope/datakeys", "{}", 404, "key_not_found");
}
END_TEST

START_TEST(bad_names)
{
    char body[256], name[80];

    ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":\"Customers\"}", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":\"\"}", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":\"-lead\"}", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":\"a b\"}", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":\"a/b\"}", 400, "bad_request");
    memset(name, 'a', 65);
    name[65] = '\0';
    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", name);
    ku_expect_error(&K, "POST", "/v1/keys", body, 400, "bad_request");
    name[64] = '\0'; /* 64 characters is the longest valid name */
    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", name);
    json_decref(create_key(name));
    ku_expect_error(&K, "GET", "/v1/keys/UPPER", NULL, 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys/%2e%2e/datakeys", "{}", 400, "bad_request");
}
END_TEST

START_TEST(bad_bodies)
{
    const char *msg;

    msg = ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":", 400, "bad_request");
    ck_assert_ptr_nonnull(strstr(msg, "malformed JSON"));
    ku_expect_error(&K, "POST", "/v1/keys", "[\"name\"]", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "\"name\"", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "42", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "{}", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":5}", 400, "bad_request");
    msg = ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":\"a\",\"colour\":1}", 400,
                          "bad_request");
    ck_assert_str_eq(msg, "unknown field 'colour'");
    ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":\"a\",\"name\":\"b\"}", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":\"a\"} trailing", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":\"a\\u0000b\"}", 400, "bad_request");
    /* depth 10: the object and nine arrays */
    msg = ku_expect_error(&K, "POST", "/v1/keys", "{\"name\":[[[[[[[[[]]]]]]]]]}", 400,
                          "bad_request");
    ck_assert_str_eq(msg, "JSON nested deeper than 8 levels");
    /* jansson's own depth limit (2048) is a bad_request too */
    {
        char *deep = malloc(60001);
        memset(deep, '[', 30000);
        memset(deep + 30000, ']', 30000);
        deep[60000] = '\0';
        ku_expect_error(&K, "POST", "/v1/keys", deep, 400, "bad_request");
        free(deep);
    }
    ku_expect_error(&K, "GET", "/v1/keys", "{\"x\":1}", 400, "bad_request");
}
END_TEST

START_TEST(bad_contexts)
{
    char *body;
    size_t off;
    const char *msg;

    json_decref(create_key("ctx"));
    ku_expect_error(&K, "POST", "/v1/keys/ctx/datakeys", "{\"context\":\"x\"}", 400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys/ctx/datakeys", "{\"context\":[]}", 400, "bad_request");
    msg = ku_expect_error(&K, "POST", "/v1/keys/ctx/datakeys", "{\"context\":{\"a\":1}}", 400,
                          "bad_request");
    ck_assert_str_eq(msg, "context value of 'a' must be a string");
    ku_expect_error(&K, "POST", "/v1/keys/ctx/datakeys", "{\"context\":{\"a\":null}}", 400,
                    "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys/ctx/datakeys", "{\"context\":{\"a\":{\"b\":\"c\"}}}", 400,
                    "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys/ctx/datakeys", "{\"context\":{\"\":\"v\"}}", 400,
                    "bad_request");
    ku_expect_error(&K, "POST", "/v1/keys/ctx/datakeys", "{\"ctx\":{}}", 400, "bad_request");

    body = malloc(8192);
    /* 33 pairs: one too many */
    off = (size_t)sprintf(body, "{\"context\":{");
    for (int i = 0; i < 33; i++)
        off += (size_t)sprintf(body + off, "%s\"k%d\":\"v\"", i ? "," : "", i);
    sprintf(body + off, "}}");
    msg = ku_expect_error(&K, "POST", "/v1/keys/ctx/datakeys", body, 400, "bad_request");
    ck_assert_str_eq(msg, "context has 33 pairs; at most 32 allowed");
    /* a 129-byte name */
    off = (size_t)sprintf(body, "{\"context\":{\"");
    memset(body + off, 'n', 129);
    off += 129;
    sprintf(body + off, "\":\"v\"}}");
    ku_expect_error(&K, "POST", "/v1/keys/ctx/datakeys", body, 400, "bad_request");
    /* a 1025-byte value */
    off = (size_t)sprintf(body, "{\"context\":{\"n\":\"");
    memset(body + off, 'v', 1025);
    off += 1025;
    sprintf(body + off, "\"}}");
    msg = ku_expect_error(&K, "POST", "/v1/keys/ctx/datakeys", body, 400, "bad_request");
    ck_assert_str_eq(msg, "context value of 'n' is longer than 1024 bytes");
    free(body);
}
END_TEST

START_TEST(datakey_round_trip)
{
    json_t *g, *d;
    char path[160], plain[64], *log;
    unsigned char raw[48];
    const char *id;

    json_decref(create_key("orders"));
    g = datakey("/v1/keys/orders/datakeys", "{\"context\":{\"customer\":\"42\",\"region\":\"eu\"}}",
                201);
    id = json_string_value(json_object_get(g, "dek_id"));
    ck_assert_ptr_nonnull(id);
    ck_assert_int_eq(strlen(id), 36);
    ck_assert_str_eq(json_string_value(json_object_get(g, "key")), "orders");
    ck_assert_int_eq(json_integer_value(json_object_get(g, "version")), 1);
    snprintf(plain, sizeof(plain), "%s", json_string_value(json_object_get(g, "plaintext")));
    ck_assert_int_eq(ku_b64_key(plain, raw), 32);

    /* same context, other key order: same DEK */
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", id);
    d = datakey(path, "{\"context\":{\"region\":\"eu\",\"customer\":\"42\"}}", 200);
    ck_assert_str_eq(json_string_value(json_object_get(d, "dek_id")), id);
    ck_assert_str_eq(json_string_value(json_object_get(d, "key")), "orders");
    ck_assert_int_eq(json_integer_value(json_object_get(d, "version")), 1);
    ck_assert_str_eq(json_string_value(json_object_get(d, "plaintext")), plain);
    json_decref(d);

    ku_expect_error(&K, "POST", path, "{\"context\":{\"customer\":\"43\",\"region\":\"eu\"}}", 400,
                    "context_mismatch");
    ku_expect_error(&K, "POST", path, "{\"context\":{\"customer\":\"42\"}}", 400,
                    "context_mismatch");
    ku_expect_error(&K, "POST", path, "{}", 400, "context_mismatch");
    ku_expect_error(&K, "POST", path, "", 400, "context_mismatch");

    /* dek_count went up */
    {
        long status = 0;
        json_t *k = ku_call(&K, "GET", "/v1/keys/orders", NULL, &status);
        json_t *v = json_array_get(json_object_get(k, "versions"), 0);
        ck_assert_int_eq(json_integer_value(json_object_get(v, "dek_count")), 1);
        json_decref(k);
    }

    /* the plaintext never reaches the log */
    log = kh_read_file(K.log, NULL);
    ck_assert_ptr_nonnull(log);
    ck_assert_ptr_null(strstr(log, plain));
    ck_assert_ptr_nonnull(strstr(log, "POST /v1/keys/orders/datakeys 201"));
    free(log);
    json_decref(g);
}
END_TEST

START_TEST(datakey_without_context)
{
    json_t *g, *d;
    char path[160];

    json_decref(create_key("nocontext"));
    g = datakey("/v1/keys/nocontext/datakeys", NULL, 201); /* no body at all */
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt",
             json_string_value(json_object_get(g, "dek_id")));
    d = datakey(path, "", 200);
    ck_assert_str_eq(json_string_value(json_object_get(d, "plaintext")),
                     json_string_value(json_object_get(g, "plaintext")));
    json_decref(d);
    d = datakey(path, "{\"context\":{}}", 200);
    json_decref(d);
    d = datakey(path, "{\"context\":null}", 200);
    json_decref(d);
    ku_expect_error(&K, "POST", path, "{\"context\":{\"a\":\"b\"}}", 400, "context_mismatch");
    json_decref(g);
}
END_TEST

START_TEST(distinct_datakeys)
{
    json_t *a, *b;

    json_decref(create_key("distinct"));
    a = datakey("/v1/keys/distinct/datakeys", "{}", 201);
    b = datakey("/v1/keys/distinct/datakeys", "{}", 201);
    ck_assert_str_ne(json_string_value(json_object_get(a, "dek_id")),
                     json_string_value(json_object_get(b, "dek_id")));
    ck_assert_str_ne(json_string_value(json_object_get(a, "plaintext")),
                     json_string_value(json_object_get(b, "plaintext")));
    json_decref(a);
    json_decref(b);
}
END_TEST

START_TEST(dek_ids)
{
    const char *msg;

    ku_expect_error(&K, "POST", "/v1/datakeys/0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f/decrypt", "{}",
                    404, "dek_not_found");
    msg = ku_expect_error(&K, "POST", "/v1/datakeys/not-a-uuid/decrypt", "{}", 400, "bad_request");
    ck_assert_str_eq(msg, "dek_id must be a UUID in canonical lowercase form");
    ku_expect_error(&K, "POST", "/v1/datakeys/0B5E2A5C-6A4E-4F51-9E0E-5F7A8C9D0E1F/decrypt", "{}",
                    400, "bad_request");
    ku_expect_error(&K, "POST", "/v1/datakeys/0b5e2a5c6a4e4f519e0e5f7a8c9d0e1f/decrypt", "{}", 400,
                    "bad_request");
}
END_TEST

START_TEST(not_found)
{
    const char *msg;

    ku_expect_error(&K, "GET", "/", NULL, 404, "not_found");
    ku_expect_error(&K, "GET", "/v1", NULL, 404, "not_found");
    ku_expect_error(&K, "GET", "/v1/keys/", NULL, 404, "not_found");
    ku_expect_error(&K, "GET", "/v1/health/x", NULL, 404, "not_found");
    ku_expect_error(&K, "GET", "/v2/keys", NULL, 404, "not_found");
    ku_expect_error(&K, "POST", "/v1/keys/a/b/c/d", "{}", 404, "not_found");
    /* GET /v1/status is served (status below): a wrong method is 405 */
    msg = ku_expect_error(&K, "POST", "/v1/status", NULL, 405, "method_not_allowed");
    ck_assert_ptr_nonnull(msg);
    /* GET /metrics is served: tests/test_kmsd_metrics.c */
    ku_expect_error(&K, "POST", "/metrics", NULL, 405, "method_not_allowed");
    ku_expect_error(&K, "POST", "/v1/audit/verify", NULL, 405, "method_not_allowed");
    /* key rotation routes (issue 3, tests/test_kmsd_rotation.c): an
     * unknown key is key_not_found, not a missing route */
    ku_expect_error(&K, "POST", "/v1/keys/a/rotate", NULL, 404, "key_not_found");
    ku_expect_error(&K, "DELETE", "/v1/keys/a/versions/1", NULL, 404, "key_not_found");
    /* the bulk route, not a DEK id (tests/test_kmsd_deks.c covers it) */
    ku_expect_error(&K, "POST", "/v1/datakeys/revoke", "{}", 400, "bad_request");
    /* the query string is not part of the route */
    {
        long status = 0;
        json_t *j = ku_call(&K, "GET", "/v1/health?x=1", NULL, &status);
        ck_assert_int_eq(status, 200);
        json_decref(j);
    }
}
END_TEST

static void expect_405(const char *method, const char *path, const char *allow)
{
    kh_response r;
    char got[128] = "";

    ck_assert_int_eq(kh_request(K.sock, method, path, NULL, 0, NULL, &r), 0);
    ck_assert_int_eq(r.status, 405);
    ck_assert(kh_header(&r, "Allow", got, sizeof(got)));
    ck_assert_str_eq(got, allow);
    if (strcmp(method, "HEAD") != 0)
        ck_assert_ptr_nonnull(strstr(r.body, "\"method_not_allowed\""));
    kh_response_free(&r);
    ku_assert_healthy(&K);
}

START_TEST(method_not_allowed)
{
    ku_expect_error(&K, "DELETE", "/v1/health", NULL, 405, "method_not_allowed");
    expect_405("DELETE", "/v1/health", "GET");
    expect_405("PUT", "/v1/keys", "POST, GET");
    expect_405("PATCH", "/v1/keys/abc", "GET");
    expect_405("GET", "/v1/keys/abc/datakeys", "POST");
    expect_405("GET", "/v1/datakeys/0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f/decrypt", "POST");
    expect_405("POST", "/v1/datakeys/0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f", "GET, DELETE");
    expect_405("GET", "/v1/datakeys/revoke", "POST");
    expect_405("OPTIONS", "/v1/keys", "POST, GET");
    expect_405("BREW", "/v1/keys", "POST, GET"); /* a method libevent does not know */
    ku_expect_error(&K, "BREW", "/coffee", NULL, 404, "not_found");
}
END_TEST

START_TEST(principal_logged)
{
    char *log, want[64];

    ku_assert_healthy(&K);
    log = kh_read_file(K.log, NULL);
    snprintf(want, sizeof(want), "GET /v1/health 200 ");
    ck_assert_ptr_nonnull(strstr(log, want));
    snprintf(want, sizeof(want), " uid:%u health", (unsigned)getuid());
    ck_assert_ptr_nonnull(strstr(log, want));
    free(log);
}
END_TEST

/* GET /v1/status as an object of counts: keys, active, revoked, destroyed. */
static void status_counts(long out[4])
{
    long status = 0;
    json_t *j = ku_call(&K, "GET", "/v1/status", NULL, &status), *token, *store, *deks;

    ck_assert_int_eq(status, 200);
    token = json_object_get(j, "token");
    ck_assert_str_eq(json_string_value(json_object_get(token, "label")), K.tt.label);
    ck_assert(json_is_true(json_object_get(token, "present")));
    ck_assert(json_is_integer(json_object_get(token, "slot")));
    store = json_object_get(j, "store");
    ck_assert_str_eq(json_string_value(json_object_get(store, "backend")), ts_backend_name());
    ck_assert(json_is_true(json_object_get(store, "ok")));
    ck_assert_str_eq(json_string_value(json_object_get(j, "audit")), "ok");
    deks = json_object_get(j, "datakeys");
    ck_assert_int_eq(json_object_size(deks), 3);
    ck_assert_int_eq(json_object_size(j), 5);
    out[0] = (long)json_integer_value(json_object_get(j, "keys"));
    out[1] = (long)json_integer_value(json_object_get(deks, "active"));
    out[2] = (long)json_integer_value(json_object_get(deks, "revoked"));
    out[3] = (long)json_integer_value(json_object_get(deks, "destroyed"));
    ck_assert(json_is_integer(json_object_get(j, "keys")));
    ck_assert(json_is_integer(json_object_get(deks, "active")));
    json_decref(j);
}

/* The status counts follow generate, revoke and destroy; /metrics exports
 * the same DEK counts; the call is audited like the other reads. */
START_TEST(status_route)
{
    long before[4], after[4], status = 0;
    char ids[3][40], path[128], line[96];
    kh_response r;
    json_t *j, *entries;
    int seen = 0;

    status_counts(before);
    json_decref(create_key("status-key"));
    for (int i = 0; i < 3; i++) {
        json_t *g = datakey("/v1/keys/status-key/datakeys", "{}", 201);
        snprintf(ids[i], sizeof(ids[i]), "%s", json_string_value(json_object_get(g, "dek_id")));
        json_decref(g);
    }
    snprintf(path, sizeof(path), "/v1/datakeys/%s/revoke", ids[0]);
    j = ku_call(&K, "POST", path, "{\"reason\":\"compromised\"}", &status);
    ck_assert_int_eq(status, 200);
    json_decref(j);
    snprintf(path, sizeof(path), "/v1/datakeys/%s", ids[1]);
    j = ku_call(&K, "DELETE", path, NULL, &status);
    ck_assert_int_eq(status, 200);
    json_decref(j);
    status_counts(after);
    ck_assert_int_eq(after[0], before[0] + 1);
    ck_assert_int_eq(after[1], before[1] + 1);
    ck_assert_int_eq(after[2], before[2] + 1);
    ck_assert_int_eq(after[3], before[3] + 1);

    /* the same counts on /metrics (nothing changed in between) */
    ck_assert_int_eq(kh_request(K.sock, "GET", "/metrics", NULL, 0, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    snprintf(line, sizeof(line), "\np11kms_datakeys{state=\"active\"} %ld\n", after[1]);
    ck_assert_msg(strstr(r.body, line) != NULL, "missing %s", line);
    snprintf(line, sizeof(line), "\np11kms_datakeys{state=\"revoked\"} %ld\n", after[2]);
    ck_assert_msg(strstr(r.body, line) != NULL, "missing %s", line);
    snprintf(line, sizeof(line), "\np11kms_datakeys{state=\"destroyed\"} %ld\n", after[3]);
    ck_assert_msg(strstr(r.body, line) != NULL, "missing %s", line);
    kh_response_free(&r);

    /* audited as the read "status" (every page of the log) */
    for (long long last = 0, n = 1000; n == 1000;) {
        snprintf(path, sizeof(path), "/v1/audit?after=%lld&limit=1000", last);
        j = ku_call(&K, "GET", path, NULL, &status);
        ck_assert_int_eq(status, 200);
        entries = json_object_get(j, "entries");
        n = (long long)json_array_size(entries);
        for (size_t i = 0; i < json_array_size(entries); i++) {
            json_t *e = json_array_get(entries, i);
            last = (long long)json_integer_value(json_object_get(e, "seq"));
            if (strcmp(json_string_value(json_object_get(e, "operation")), "status") == 0 &&
                strcmp(json_string_value(json_object_get(e, "result")), "ok") == 0)
                seen++;
        }
        json_decref(j);
    }
    ck_assert_int_ge(seen, 2);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_api");
    TCase *tc = tcase_create("api");

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, health_ok);
    tcase_add_test(tc, keys_create_show_list);
    tcase_add_test(tc, key_exists);
    tcase_add_test(tc, key_not_found);
    tcase_add_test(tc, bad_names);
    tcase_add_test(tc, bad_bodies);
    tcase_add_test(tc, bad_contexts);
    tcase_add_test(tc, datakey_round_trip);
    tcase_add_test(tc, datakey_without_context);
    tcase_add_test(tc, distinct_datakeys);
    tcase_add_test(tc, dek_ids);
    tcase_add_test(tc, not_found);
    tcase_add_test(tc, method_not_allowed);
    tcase_add_test(tc, principal_logged);
    tcase_add_test(tc, status_route);
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
