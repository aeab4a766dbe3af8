/*
 * tests/test_kmsd_deks.c - revocation and crypto-shredding of data keys
 * through the HTTP API of the real kmsd on a private SoftHSM2 token:
 * show, revoke then decrypt (403 at once), destroy then decrypt (410),
 * no transition backwards, bulk revoke/destroy by one and by two context
 * pairs (only matching DEKs touched, the others still decrypt), cursor
 * pagination over 1 000 DEKs issued over HTTP, the wipe of a destroyed
 * DEK's wrapped bytes from kms.db and kms.db-wal, a flipped byte in a
 * stored wrapped DEK answering 500 integrity_failure, what a database
 * writer can do (wrapped bytes moved to another DEK's row fail the same
 * way; a revoked DEK set active again in the database decrypts: the
 * store is trusted for DEK state), and every error path of the new
 * routes.  One kmsd serves the suite (the integrity tests restart it).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <jansson.h>
#include <pthread.h>
#include <regex.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kms/store/store.h" /* KMS_DEK_ID_LEN */
#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

static kh_kmsd K;

static void start(void)
{
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-deks", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

/* ---- helpers ------------------------------------------------------------ */

static json_t *call(const char *method, const char *path, const char *body, long want)
{
    long status = 0;
    json_t *j = ku_call(&K, method, path, body, &status);

    ck_assert_msg(status == want, "%s %s: %ld, want %ld: %s", method, path, status, want,
                  json_dumps(j, JSON_COMPACT));
    return j;
}

static void create_key(const char *name)
{
    char body[128];

    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", name);
    json_decref(call("POST", "/v1/keys", body, 201));
}

/* Generate a DEK under key with context (JSON text or NULL); id out. */
static void generate(const char *key, const char *context, char id[KMS_DEK_ID_LEN + 1])
{
    char path[128], body[512];
    json_t *j;

    snprintf(path, sizeof(path), "/v1/keys/%s/datakeys", key);
    snprintf(body, sizeof(body), "{\"context\":%s}", context != NULL ? context : "{}");
    j = call("POST", path, body, 201);
    snprintf(id, KMS_DEK_ID_LEN + 1, "%s", json_string_value(json_object_get(j, "dek_id")));
    json_decref(j);
}

static long decrypt_status(const char *id, const char *context, const char **code)
{
    static char code_buf[64];
    char path[128], body[512];
    long status = 0;
    json_t *j;

    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", id);
    snprintf(body, sizeof(body), "{\"context\":%s}", context != NULL ? context : "{}");
    j = ku_call(&K, "POST", path, body, &status);
    code_buf[0] = '\0';
    if (status != 200)
        snprintf(code_buf, sizeof(code_buf), "%s",
                 json_string_value(json_object_get(json_object_get(j, "error"), "code")));
    else
        ck_assert_ptr_nonnull(json_string_value(json_object_get(j, "plaintext")));
    if (code != NULL)
        *code = code_buf;
    json_decref(j);
    return status;
}

static void expect_decrypt(const char *id, const char *context, long status, const char *code)
{
    const char *got = NULL;

    ck_assert_int_eq(decrypt_status(id, context, &got), status);
    if (code != NULL)
        ck_assert_str_eq(got, code);
}

static json_t *show(const char *id)
{
    char path[128];

    snprintf(path, sizeof(path), "/v1/datakeys/%s", id);
    return call("GET", path, NULL, 200);
}

static json_t *revoke_one(const char *id, const char *reason, long want)
{
    char path[128], body[128];

    snprintf(path, sizeof(path), "/v1/datakeys/%s/revoke", id);
    snprintf(body, sizeof(body), "{\"reason\":\"%s\"}", reason);
    return call("POST", path, body, want);
}

static json_t *destroy(const char *id, long want)
{
    char path[128];

    snprintf(path, sizeof(path), "/v1/datakeys/%s", id);
    return call("DELETE", path, NULL, want);
}

static long long bulk(const char *what, const char *body)
{
    char path[64];
    json_t *j;
    long long n;

    snprintf(path, sizeof(path), "/v1/datakeys/%s", what);
    j = call("POST", path, body, 200);
    ck_assert(json_is_integer(json_object_get(j, "count")));
    ck_assert_uint_eq(json_object_size(j), 1);
    n = json_integer_value(json_object_get(j, "count"));
    json_decref(j);
    return n;
}

static const char *str(json_t *j, const char *field)
{
    return json_string_value(json_object_get(j, field));
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

/* The DEK object's fields, never key material. */
static void assert_dek_object(json_t *j, const char *id, const char *key, const char *state)
{
    static const char *const fields[] = {"dek_id",     "key",           "version",
                                         "state",      "context",       "created",
                                         "revoked_at", "revoke_reason", "destroyed_at"};

    ck_assert_uint_eq(json_object_size(j), sizeof(fields) / sizeof(fields[0]));
    for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); i++)
        ck_assert_msg(json_object_get(j, fields[i]) != NULL, "missing %s", fields[i]);
    ck_assert_str_eq(str(j, "dek_id"), id);
    ck_assert_str_eq(str(j, "key"), key);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "version")), 1);
    ck_assert_str_eq(str(j, "state"), state);
    ck_assert(json_is_object(json_object_get(j, "context")));
    assert_rfc3339(str(j, "created"));
    ck_assert_ptr_null(json_object_get(j, "plaintext"));
    ck_assert_ptr_null(json_object_get(j, "wrapped"));
}

/* ---- show, revoke, destroy ---------------------------------------------- */

START_TEST(show_active)
{
    char id[KMS_DEK_ID_LEN + 1];
    json_t *j;

    create_key("show");
    generate("show", "{\"region\":\"eu\",\"customer\":\"42\"}", id);
    j = show(id);
    assert_dek_object(j, id, "show", "active");
    ck_assert_str_eq(str(json_object_get(j, "context"), "customer"), "42");
    ck_assert_str_eq(str(json_object_get(j, "context"), "region"), "eu");
    ck_assert_uint_eq(json_object_size(json_object_get(j, "context")), 2);
    ck_assert(json_is_null(json_object_get(j, "revoked_at")));
    ck_assert(json_is_null(json_object_get(j, "revoke_reason")));
    ck_assert(json_is_null(json_object_get(j, "destroyed_at")));
    json_decref(j);
}
END_TEST

START_TEST(revoke_then_decrypt)
{
    char id[KMS_DEK_ID_LEN + 1], other[KMS_DEK_ID_LEN + 1];
    const char *ctx = "{\"customer\":\"7\"}";
    char revoked_at[32];
    json_t *j;

    create_key("rev");
    generate("rev", ctx, id);
    generate("rev", ctx, other);
    expect_decrypt(id, ctx, 200, NULL);

    j = revoke_one(id, "compromised", 200);
    assert_dek_object(j, id, "rev", "revoked");
    ck_assert_str_eq(str(j, "revoke_reason"), "compromised");
    assert_rfc3339(str(j, "revoked_at"));
    snprintf(revoked_at, sizeof(revoked_at), "%s", str(j, "revoked_at"));
    ck_assert(json_is_null(json_object_get(j, "destroyed_at")));
    json_decref(j);

    /* refused at once, with or without the right context */
    expect_decrypt(id, ctx, 403, "dek_revoked");
    expect_decrypt(id, "{}", 403, "dek_revoked");
    /* its neighbour is untouched */
    expect_decrypt(other, ctx, 200, NULL);

    /* revoking again: 200, unchanged (first reason and time kept) */
    sleep(1);
    j = revoke_one(id, "superseded", 200);
    ck_assert_str_eq(str(j, "state"), "revoked");
    ck_assert_str_eq(str(j, "revoke_reason"), "compromised");
    ck_assert_str_eq(str(j, "revoked_at"), revoked_at);
    json_decref(j);
    j = show(id);
    assert_dek_object(j, id, "rev", "revoked");
    ck_assert_str_eq(str(j, "revoke_reason"), "compromised");
    json_decref(j);

    /* every reason name is accepted */
    {
        static const char *const reasons[] = {"superseded", "cessation", "unspecified"};
        for (size_t i = 0; i < 3; i++) {
            char x[KMS_DEK_ID_LEN + 1];
            generate("rev", NULL, x);
            j = revoke_one(x, reasons[i], 200);
            ck_assert_str_eq(str(j, "revoke_reason"), reasons[i]);
            json_decref(j);
            expect_decrypt(x, NULL, 403, "dek_revoked");
        }
    }
}
END_TEST

START_TEST(destroy_then_decrypt)
{
    char id[KMS_DEK_ID_LEN + 1], rid[KMS_DEK_ID_LEN + 1], path[128];
    const char *msg;
    json_t *j;

    create_key("shred");
    generate("shred", "{\"customer\":\"1\"}", id);
    j = destroy(id, 200);
    assert_dek_object(j, id, "shred", "destroyed");
    assert_rfc3339(str(j, "destroyed_at"));
    ck_assert(json_is_null(json_object_get(j, "revoked_at")));
    ck_assert(json_is_null(json_object_get(j, "revoke_reason")));
    json_decref(j);
    expect_decrypt(id, "{\"customer\":\"1\"}", 410, "dek_destroyed");

    /* nothing moves backwards: destroyed stays destroyed */
    snprintf(path, sizeof(path), "/v1/datakeys/%s", id);
    msg = ku_expect_error(&K, "DELETE", path, NULL, 410, "dek_destroyed");
    ck_assert_ptr_nonnull(strstr(msg, id));
    snprintf(path, sizeof(path), "/v1/datakeys/%s/revoke", id);
    ku_expect_error(&K, "POST", path, "{\"reason\":\"compromised\"}", 410, "dek_destroyed");
    j = show(id);
    assert_dek_object(j, id, "shred", "destroyed");
    json_decref(j);

    /* revoked -> destroyed keeps the revocation's history */
    generate("shred", NULL, rid);
    json_decref(revoke_one(rid, "cessation", 200));
    j = destroy(rid, 200);
    assert_dek_object(j, rid, "shred", "destroyed");
    ck_assert_str_eq(str(j, "revoke_reason"), "cessation");
    assert_rfc3339(str(j, "revoked_at"));
    assert_rfc3339(str(j, "destroyed_at"));
    json_decref(j);
    expect_decrypt(rid, NULL, 410, "dek_destroyed");
}
END_TEST

/* ---- bulk --------------------------------------------------------------- */

START_TEST(bulk_by_one_and_two_pairs)
{
    char eu42[KMS_DEK_ID_LEN + 1], us42[KMS_DEK_ID_LEN + 1], eu42b[KMS_DEK_ID_LEN + 1];
    char eu43[KMS_DEK_ID_LEN + 1], c420[KMS_DEK_ID_LEN + 1], none[KMS_DEK_ID_LEN + 1];
    char other42[KMS_DEK_ID_LEN + 1];
    const char *E42 = "{\"customer\":\"42\",\"region\":\"eu\"}";
    const char *U42 = "{\"customer\":\"42\",\"region\":\"us\"}";
    const char *E43 = "{\"customer\":\"43\",\"region\":\"eu\"}";
    const char *C420 = "{\"customer\":\"420\"}";
    json_t *j;

    create_key("bulk");
    create_key("bulk-other");
    generate("bulk", E42, eu42);
    generate("bulk", E42, eu42b);
    generate("bulk", U42, us42);
    generate("bulk", E43, eu43);
    generate("bulk", C420, c420);
    generate("bulk", NULL, none);
    generate("bulk-other", E42, other42);

    /* two pairs (in either order): customer 42 in eu only */
    ck_assert_int_eq(bulk("revoke", "{\"key\":\"bulk\",\"context\":{\"region\":\"eu\","
                                    "\"customer\":\"42\"},\"reason\":\"compromised\"}"),
                     2);
    expect_decrypt(eu42, E42, 403, "dek_revoked");
    expect_decrypt(eu42b, E42, 403, "dek_revoked");
    expect_decrypt(us42, U42, 200, NULL);
    expect_decrypt(eu43, E43, 200, NULL);
    expect_decrypt(c420, C420, 200, NULL);
    expect_decrypt(none, NULL, 200, NULL);
    expect_decrypt(other42, E42, 200, NULL); /* another key: untouched */
    j = show(eu42);
    ck_assert_str_eq(str(j, "revoke_reason"), "compromised");
    json_decref(j);

    /* one pair: erase customer 42 (the revoked ones too) */
    ck_assert_int_eq(bulk("destroy", "{\"key\":\"bulk\",\"context\":{\"customer\":\"42\"}}"), 3);
    expect_decrypt(eu42, E42, 410, "dek_destroyed");
    expect_decrypt(eu42b, E42, 410, "dek_destroyed");
    expect_decrypt(us42, U42, 410, "dek_destroyed");
    expect_decrypt(eu43, E43, 200, NULL);
    expect_decrypt(c420, C420, 200, NULL); /* "420" is not "42" */
    expect_decrypt(none, NULL, 200, NULL);
    expect_decrypt(other42, E42, 200, NULL);
    j = show(eu42);
    ck_assert_str_eq(str(j, "state"), "destroyed");
    ck_assert_str_eq(str(j, "revoke_reason"), "compromised"); /* history kept */
    json_decref(j);

    /* again: nothing left; bulk revoke skips destroyed DEKs */
    ck_assert_int_eq(bulk("destroy", "{\"key\":\"bulk\",\"context\":{\"customer\":\"42\"}}"), 0);
    ck_assert_int_eq(bulk("revoke", "{\"key\":\"bulk\",\"context\":{\"customer\":\"42\"},"
                                    "\"reason\":\"unspecified\"}"),
                     0);
    ck_assert_int_eq(bulk("revoke", "{\"key\":\"bulk\",\"context\":{\"customer\":\"nobody\"},"
                                    "\"reason\":\"unspecified\"}"),
                     0);
    /* one pair on another key */
    ck_assert_int_eq(bulk("revoke", "{\"key\":\"bulk-other\",\"context\":{\"region\":\"eu\"},"
                                    "\"reason\":\"superseded\"}"),
                     1);
    expect_decrypt(other42, E42, 403, "dek_revoked");
    expect_decrypt(eu43, E43, 200, NULL);
}
END_TEST

/* ---- pagination --------------------------------------------------------- */

#define HTTP_DEKS    1000
#define HTTP_THREADS 8

typedef struct gen_worker {
    int first, count;
    char (*ids)[KMS_DEK_ID_LEN + 1];
    int errors;
} gen_worker;

static void *gen_many(void *arg)
{
    gen_worker *w = arg;
    CURL *c = curl_easy_init();
    char body[96];
    kh_response r;

    for (int i = w->first; i < w->first + w->count; i++) {
        snprintf(body, sizeof(body), "{\"context\":{\"n\":\"%d\",\"odd\":\"%d\"}}", i, i % 2);
        if (kh_request_h(c, K.sock, "POST", "/v1/keys/pages/datakeys", body, strlen(body), NULL,
                         &r) != 0) {
            w->errors++;
            continue;
        }
        if (r.status == 201) {
            json_t *j = json_loads(r.body, 0, NULL);
            snprintf(w->ids[i], KMS_DEK_ID_LEN + 1, "%s",
                     j != NULL ? json_string_value(json_object_get(j, "dek_id")) : "");
            json_decref(j);
        } else {
            w->errors++;
        }
        kh_response_free(&r);
    }
    curl_easy_cleanup(c);
    return NULL;
}

static int cmp_id(const void *a, const void *b)
{
    return strcmp((const char *)a, (const char *)b);
}

/* Walk GET /v1/datakeys pages; returns the number of DEKs, ids into out. */
static size_t walk(const char *query, size_t page, char (*out)[KMS_DEK_ID_LEN + 1], size_t cap,
                   size_t *pages)
{
    char path[256], cursor[KMS_DEK_ID_LEN + 1] = "";
    size_t n = 0;

    *pages = 0;
    for (;;) {
        json_t *j, *list, *next;
        if (page > 0)
            snprintf(path, sizeof(path), "/v1/datakeys?%s&limit=%zu%s%s", query, page,
                     cursor[0] ? "&cursor=" : "", cursor);
        else
            snprintf(path, sizeof(path), "/v1/datakeys?%s%s%s", query, cursor[0] ? "&cursor=" : "",
                     cursor);
        j = call("GET", path, NULL, 200);
        list = json_object_get(j, "datakeys");
        next = json_object_get(j, "next");
        ck_assert(json_is_array(list));
        ck_assert_ptr_nonnull(next);
        ck_assert_uint_le(json_array_size(list), page > 0 ? page : 100);
        for (size_t i = 0; i < json_array_size(list); i++) {
            json_t *d = json_array_get(list, i);
            ck_assert_uint_lt(n, cap);
            ck_assert_ptr_null(json_object_get(d, "plaintext"));
            ck_assert_ptr_null(json_object_get(d, "wrapped"));
            snprintf(out[n], KMS_DEK_ID_LEN + 1, "%s", str(d, "dek_id"));
            if (n > 0)
                ck_assert_int_lt(strcmp(out[n - 1], out[n]), 0); /* ascending, no repeat */
            n++;
        }
        (*pages)++;
        if (json_is_null(next)) {
            json_decref(j);
            break;
        }
        ck_assert(json_is_string(next));
        ck_assert_str_eq(json_string_value(next), out[n - 1]);
        snprintf(cursor, sizeof(cursor), "%s", json_string_value(next));
        json_decref(j);
    }
    return n;
}

START_TEST(pagination_1000_over_http)
{
    static char ids[HTTP_DEKS][KMS_DEK_ID_LEN + 1], got[HTTP_DEKS + 8][KMS_DEK_ID_LEN + 1];
    pthread_t t[HTTP_THREADS];
    gen_worker w[HTTP_THREADS];
    size_t n, pages;

    create_key("pages");
    for (int i = 0; i < HTTP_THREADS; i++) {
        w[i].first = i * (HTTP_DEKS / HTTP_THREADS);
        w[i].count = HTTP_DEKS / HTTP_THREADS;
        w[i].ids = ids;
        w[i].errors = 0;
        ck_assert_int_eq(pthread_create(&t[i], NULL, gen_many, &w[i]), 0);
    }
    for (int i = 0; i < HTTP_THREADS; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(w[i].errors, 0);
    }
    qsort(ids, HTTP_DEKS, sizeof(ids[0]), cmp_id);

    /* default page size (100): 10 pages, exactly the issued set */
    n = walk("key=pages", 0, got, HTTP_DEKS + 8, &pages);
    ck_assert_uint_eq(n, HTTP_DEKS);
    ck_assert_uint_eq(pages, 10);
    for (size_t i = 0; i < n; i++)
        ck_assert_str_eq(got[i], ids[i]);

    /* an odd page size */
    n = walk("key=pages", 73, got, HTTP_DEKS + 8, &pages);
    ck_assert_uint_eq(n, HTTP_DEKS);
    ck_assert_uint_eq(pages, (HTTP_DEKS + 72) / 73);
    for (size_t i = 0; i < n; i++)
        ck_assert_str_eq(got[i], ids[i]);

    /* one page of everything */
    n = walk("key=pages", 1000, got, HTTP_DEKS + 8, &pages);
    ck_assert_uint_eq(n, HTTP_DEKS);
    ck_assert_uint_eq(pages, 1);

    /* by state, after a bulk revoke of the odd ones */
    ck_assert_int_eq(bulk("revoke", "{\"key\":\"pages\",\"context\":{\"odd\":\"1\"},"
                                    "\"reason\":\"superseded\"}"),
                     HTTP_DEKS / 2);
    n = walk("key=pages&state=revoked", 333, got, HTTP_DEKS + 8, &pages);
    ck_assert_uint_eq(n, HTTP_DEKS / 2);
    n = walk("state=active&key=pages", 0, got, HTTP_DEKS + 8, &pages);
    ck_assert_uint_eq(n, HTTP_DEKS / 2);
    n = walk("key=pages&state=destroyed", 0, got, HTTP_DEKS + 8, &pages);
    ck_assert_uint_eq(n, 0);
    ck_assert_uint_eq(pages, 1);
    /* the listed objects are DEK objects */
    {
        json_t *j = call("GET", "/v1/datakeys?key=pages&state=revoked&limit=1", NULL, 200);
        json_t *d = json_array_get(json_object_get(j, "datakeys"), 0);
        assert_dek_object(d, str(d, "dek_id"), "pages", "revoked");
        ck_assert_str_eq(str(d, "revoke_reason"), "superseded");
        ck_assert_str_eq(str(json_object_get(d, "context"), "odd"), "1");
        json_decref(j);
    }
    /* percent-encoding is decoded; an empty cursor is the first page */
    {
        json_t *j = call("GET", "/v1/datakeys?k%65y=pages&limit=%31&cursor=", NULL, 200);
        ck_assert_uint_eq(json_array_size(json_object_get(j, "datakeys")), 1);
        ck_assert_str_eq(str(json_array_get(json_object_get(j, "datakeys"), 0), "dek_id"), ids[0]);
        json_decref(j);
    }
}
END_TEST

/* ---- the wipe of destroyed wrapped bytes -------------------------------- */

/* The wrapped bytes of DEK id, read from the store's database on a
 * separate connection (closed again before returning, so it blocks no
 * checkpoint). */
static size_t read_wrapped(const char *id, unsigned char out[128])
{
    size_t n = 0;

    ck_assert_int_eq(ts_db_wrapped_get(&K.store, id, out, 128, &n), 0);
    ck_assert_uint_ge(n, 16);
    ck_assert_uint_le(n, 128);
    return n;
}

/* 1 if any 16-byte window of wrapped is in kms.db or kms.db-wal. */
static int trace_in_files(const unsigned char *wrapped, size_t wlen)
{
    static const char *const suffix[] = {"", "-wal"};
    int found = 0;

    for (size_t s = 0; s < 2 && !found; s++) {
        char path[400];
        size_t len = 0;
        char *buf;

        snprintf(path, sizeof(path), "%s%s", K.db, suffix[s]);
        buf = kh_read_file(path, &len);
        for (size_t off = 0; buf != NULL && off + 16 <= wlen && !found; off++)
            found = memmem(buf, len, wrapped + off, 16) != NULL;
        free(buf);
    }
    return found;
}

START_TEST(destroyed_bytes_gone_from_files)
{
    char a[KMS_DEK_ID_LEN + 1], b[KMS_DEK_ID_LEN + 1], c[KMS_DEK_ID_LEN + 1];
    char keep[KMS_DEK_ID_LEN + 1];
    unsigned char wa[128], wb[128], wc[128], wk[128];
    size_t la, lb, lc, lk;

    create_key("wipe");
    generate("wipe", "{\"customer\":\"1\"}", a);
    generate("wipe", "{\"customer\":\"2\"}", b);
    generate("wipe", "{\"customer\":\"2\",\"doc\":\"x\"}", c);
    generate("wipe", "{\"customer\":\"3\"}", keep);
    la = read_wrapped(a, wa);
    lb = read_wrapped(b, wb);
    lc = read_wrapped(c, wc);
    lk = read_wrapped(keep, wk);
    /* the scan does find live wrapped bytes */
    ck_assert(trace_in_files(wa, la));
    ck_assert(trace_in_files(wb, lb));
    ck_assert(trace_in_files(wc, lc));

    json_decref(destroy(a, 200));
    ck_assert(!trace_in_files(wa, la));

    ck_assert_int_eq(bulk("destroy", "{\"key\":\"wipe\",\"context\":{\"customer\":\"2\"}}"), 2);
    ck_assert(!trace_in_files(wb, lb));
    ck_assert(!trace_in_files(wc, lc));
    ck_assert(trace_in_files(wk, lk)); /* the others stay */
    expect_decrypt(keep, "{\"customer\":\"3\"}", 200, NULL);
}
END_TEST

/* ---- integrity ---------------------------------------------------------- */

START_TEST(flipped_byte_is_integrity_failure)
{
    char id[KMS_DEK_ID_LEN + 1], good[KMS_DEK_ID_LEN + 1], path[128];
    unsigned char w[128];
    size_t len;
    char *log;

    create_key("integrity");
    generate("integrity", "{\"customer\":\"5\"}", id);
    generate("integrity", "{\"customer\":\"5\"}", good);
    expect_decrypt(id, "{\"customer\":\"5\"}", 200, NULL);

    /* stop kmsd, flip one byte of the stored wrapped DEK, start again */
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    len = read_wrapped(id, w);
    w[len / 2] ^= 0x01;
    ck_assert_int_eq(ts_db_wrapped_set(&K.store, id, w, len), 0);
    ck_assert_int_eq(kh_start(&K), 0);

    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", id);
    ku_expect_error(&K, "POST", path, "{\"context\":{\"customer\":\"5\"}}", 500,
                    "integrity_failure");
    /* a wrong context is still a mismatch, not corruption */
    ku_expect_error(&K, "POST", path, "{\"context\":{\"customer\":\"6\"}}", 400,
                    "context_mismatch");
    expect_decrypt(good, "{\"customer\":\"5\"}", 200, NULL);
    log = kh_read_file(K.log, NULL);
    ck_assert_ptr_nonnull(log);
    ck_assert_ptr_nonnull(strstr(log, "INTEGRITY FAILURE"));
    free(log);
    /* the corrupt DEK can still be destroyed */
    json_decref(destroy(id, 200));
    expect_decrypt(id, "{\"customer\":\"5\"}", 410, "dek_destroyed");
}
END_TEST

/* What someone who can write the database can and cannot do
 * (docs/security.md): wrapped bytes moved to another DEK's row never
 * unwrap (the AAD binds the DEK id, key, version and context), but the
 * DEK's state is the store's word: setting a revoked DEK back to active
 * makes it decrypt again.  The audit log keeps the revocation. */
START_TEST(store_writer_moves_and_unrevokes)
{
    char a[KMS_DEK_ID_LEN + 1], b[KMS_DEK_ID_LEN + 1], sql[256];
    unsigned char w[128];
    size_t len;

    create_key("writer");
    generate("writer", "{\"customer\":\"7\"}", a);
    generate("writer", "{\"customer\":\"7\"}", b);
    json_decref(revoke_one(a, "compromised", 200));
    expect_decrypt(a, "{\"customer\":\"7\"}", 403, "dek_revoked");

    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    len = read_wrapped(a, w);
    ck_assert_int_eq(ts_db_wrapped_set(&K.store, b, w, len), 0);
    snprintf(sql, sizeof(sql),
             "UPDATE deks SET state = 'active', revoked_at = NULL, revoke_reason = NULL "
             "WHERE id = '%s'",
             a);
    ck_assert_int_eq(ts_db_exec(&K.store, sql), 0);
    ck_assert_int_eq(kh_start(&K), 0);

    /* A's wrapped bytes in B's row: an authentication failure, not A's key. */
    expect_decrypt(b, "{\"customer\":\"7\"}", 500, "integrity_failure");
    /* A, revoked through the API and set active in the database, decrypts. */
    expect_decrypt(a, "{\"customer\":\"7\"}", 200, NULL);
    ck_assert_int_ge(ts_db_int(&K.store, "SELECT count(*) FROM audit WHERE operation = "
                                         "'datakey.revoke' AND result = 'ok'"),
                     1);
}
END_TEST

/* ---- errors ------------------------------------------------------------- */

#define MISSING "0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f"

START_TEST(errors_single)
{
    char id[KMS_DEK_ID_LEN + 1], rpath[128];
    const char *msg;

    create_key("errs");
    generate("errs", NULL, id);
    snprintf(rpath, sizeof(rpath), "/v1/datakeys/%s/revoke", id);

    /* unknown and malformed ids */
    msg = ku_expect_error(&K, "GET", "/v1/datakeys/" MISSING, NULL, 404, "dek_not_found");
    ck_assert_str_eq(msg, "data key " MISSING " not found");
    ku_expect_error(&K, "DELETE", "/v1/datakeys/" MISSING, NULL, 404, "dek_not_found");
    ku_expect_error(&K, "POST", "/v1/datakeys/" MISSING "/revoke", "{\"reason\":\"compromised\"}",
                    404, "dek_not_found");
    msg = ku_expect_error(&K, "GET", "/v1/datakeys/not-a-uuid", NULL, 400, "bad_request");
    ck_assert_str_eq(msg, "dek_id must be a UUID in canonical lowercase form");
    ku_expect_error(&K, "DELETE", "/v1/datakeys/0B5E2A5C-6A4E-4F51-9E0E-5F7A8C9D0E1F", NULL, 400,
                    "bad_request");
    ku_expect_error(&K, "POST", "/v1/datakeys/xyz/revoke", "{\"reason\":\"compromised\"}", 400,
                    "bad_request");

    /* revoke bodies */
    msg = ku_expect_error(&K, "POST", rpath, NULL, 400, "bad_request");
    ck_assert_str_eq(msg, "request body must be a JSON object");
    msg = ku_expect_error(&K, "POST", rpath, "{}", 400, "bad_request");
    ck_assert_str_eq(msg, "missing field 'reason'");
    msg = ku_expect_error(&K, "POST", rpath, "{\"reason\":null}", 400, "bad_request");
    ck_assert_str_eq(msg, "missing field 'reason'");
    msg = ku_expect_error(&K, "POST", rpath, "{\"reason\":1}", 400, "bad_request");
    ck_assert_str_eq(msg, "field 'reason' must be a string");
    msg = ku_expect_error(&K, "POST", rpath, "{\"reason\":\"lost\"}", 400, "bad_request");
    ck_assert_str_eq(msg, "reason must be one of compromised, superseded, cessation, unspecified");
    ku_expect_error(&K, "POST", rpath, "{\"reason\":\"Compromised\"}", 400, "bad_request");
    msg = ku_expect_error(&K, "POST", rpath, "{\"reason\":\"compromised\",\"force\":true}", 400,
                          "bad_request");
    ck_assert_str_eq(msg, "unknown field 'force'");
    ku_expect_error(&K, "POST", rpath, "{\"reason\":\"compromised\"", 400, "bad_request");
    ku_expect_error(&K, "POST", rpath, "[\"compromised\"]", 400, "bad_request");
    /* none of that touched the DEK */
    expect_decrypt(id, NULL, 200, NULL);

    /* a body on DELETE */
    {
        kh_response r;
        char path[128];
        snprintf(path, sizeof(path), "/v1/datakeys/%s", id);
        ck_assert_int_eq(kh_request(K.sock, "DELETE", path, "{}", 2, NULL, &r), 0);
        ck_assert_int_eq(r.status, 400);
        ck_assert_ptr_nonnull(strstr(r.body, "\"bad_request\""));
        kh_response_free(&r);
        ku_assert_healthy(&K);
    }
    expect_decrypt(id, NULL, 200, NULL);
}
END_TEST

START_TEST(errors_list)
{
    const char *msg;

    create_key("errs-list");
    msg = ku_expect_error(&K, "GET", "/v1/datakeys", NULL, 400, "bad_request");
    ck_assert_str_eq(msg, "missing query parameter 'key'");
    msg = ku_expect_error(&K, "GET", "/v1/datakeys?state=active", NULL, 400, "bad_request");
    ck_assert_str_eq(msg, "missing query parameter 'key'");
    msg = ku_expect_error(&K, "GET", "/v1/datakeys?key=nope", NULL, 404, "key_not_found");
    ck_assert_str_eq(msg, "key 'nope' not found");
    msg = ku_expect_error(&K, "GET", "/v1/datakeys?key=Bad", NULL, 400, "bad_request");
    ck_assert_str_eq(msg, "invalid key name: must match [a-z0-9][a-z0-9._-]{0,63}");
    ku_expect_error(&K, "GET", "/v1/datakeys?key=", NULL, 400, "bad_request");
    msg = ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&state=gone", NULL, 400,
                          "bad_request");
    ck_assert_str_eq(msg, "state must be one of active, revoked, destroyed");
    ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&state=", NULL, 400, "bad_request");
    msg = ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&cursor=abc", NULL, 400,
                          "bad_request");
    ck_assert_str_eq(msg, "cursor must be the 'next' value of a previous page (a dek_id)");
    ku_expect_error(&K, "GET",
                    "/v1/datakeys?key=errs-list&cursor=0B5E2A5C-6A4E-4F51-9E0E-5F7A8C9D0E1F", NULL,
                    400, "bad_request");
    msg =
        ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&limit=0", NULL, 400, "bad_request");
    ck_assert_str_eq(msg, "limit must be an integer from 1 to 1000");
    ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&limit=1001", NULL, 400, "bad_request");
    ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&limit=-1", NULL, 400, "bad_request");
    ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&limit=10x", NULL, 400, "bad_request");
    ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&limit=", NULL, 400, "bad_request");
    ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&limit=99999999999999999999999", NULL,
                    400, "bad_request");
    msg =
        ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&sort=id", NULL, 400, "bad_request");
    ck_assert_str_eq(msg, "unknown query parameter 'sort'; allowed: key, state, cursor, limit");
    msg = ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&key=other", NULL, 400,
                          "bad_request");
    ck_assert_str_eq(msg, "query parameter 'key' given twice");
    msg = ku_expect_error(&K, "GET", "/v1/datakeys?key", NULL, 400, "bad_request");
    ck_assert_str_eq(msg, "malformed query string: expected name=value pairs");
    ku_expect_error(&K, "GET", "/v1/datakeys?=x", NULL, 400, "bad_request");
    msg = ku_expect_error(&K, "GET", "/v1/datakeys?key=errs%2", NULL, 400, "bad_request");
    ck_assert_str_eq(msg, "query parameter 'key': malformed percent-encoding or too long");
    ku_expect_error(&K, "GET", "/v1/datakeys?key=errs%00list", NULL, 400, "bad_request");
    /* echoed request text never breaks the JSON of the error */
    msg = ku_expect_error(&K, "GET", "/v1/datakeys?key=errs-list&%C3%A9t%C3%A9=1", NULL, 400,
                          "bad_request");
    ck_assert_str_eq(msg, "unknown query parameter '%C3%A9t%C3%A9'; allowed: key, state, "
                          "cursor, limit");
    {
        /* a field name cut at 64 bytes in the middle of a UTF-8 character */
        char body[256], name[200] = "";
        for (int i = 0; i < 63; i++)
            strcat(name, "a");
        strcat(name, "\xc3\xa9\xc3\xa9");
        snprintf(body, sizeof(body), "{\"reason\":\"compromised\",\"%s\":1}", name);
        msg = ku_expect_error(&K, "POST", "/v1/datakeys/" MISSING "/revoke", body, 400,
                              "bad_request");
        ck_assert_ptr_nonnull(strstr(msg, "unknown field 'aaaa"));
    }

    /* an empty key lists nothing; stray '&' are tolerated */
    {
        json_t *j = call("GET", "/v1/datakeys?&key=errs-list&", NULL, 200);
        ck_assert_uint_eq(json_array_size(json_object_get(j, "datakeys")), 0);
        ck_assert(json_is_null(json_object_get(j, "next")));
        json_decref(j);
    }
}
END_TEST

START_TEST(errors_bulk)
{
    static const char *const paths[] = {"/v1/datakeys/revoke", "/v1/datakeys/destroy"};
    char id[KMS_DEK_ID_LEN + 1];
    const char *msg;

    create_key("errs-bulk");
    generate("errs-bulk", "{\"customer\":\"1\"}", id);
    for (size_t i = 0; i < 2; i++) {
        const char *p = paths[i];
        const char *reason = i == 0 ? ",\"reason\":\"compromised\"" : "";
        char body[256];

        msg = ku_expect_error(&K, "POST", p, NULL, 400, "bad_request");
        ck_assert_str_eq(msg, "request body must be a JSON object");
        msg = ku_expect_error(&K, "POST", p, "{}", 400, "bad_request");
        ck_assert_str_eq(msg, "missing field 'key'");
        snprintf(body, sizeof(body), "{\"key\":7,\"context\":{\"customer\":\"1\"}%s}", reason);
        msg = ku_expect_error(&K, "POST", p, body, 400, "bad_request");
        ck_assert_str_eq(msg, "field 'key' must be a string");
        snprintf(body, sizeof(body), "{\"key\":\"Bad!\",\"context\":{\"customer\":\"1\"}%s}",
                 reason);
        ku_expect_error(&K, "POST", p, body, 400, "bad_request");
        snprintf(body, sizeof(body), "{\"key\":\"errs-bulk\"%s}", reason);
        msg = ku_expect_error(&K, "POST", p, body, 400, "bad_request");
        ck_assert_str_eq(msg, "missing field 'context'");
        snprintf(body, sizeof(body), "{\"key\":\"errs-bulk\",\"context\":null%s}", reason);
        msg = ku_expect_error(&K, "POST", p, body, 400, "bad_request");
        ck_assert_str_eq(msg, "missing field 'context'");
        snprintf(body, sizeof(body), "{\"key\":\"errs-bulk\",\"context\":{}%s}", reason);
        msg = ku_expect_error(&K, "POST", p, body, 400, "bad_request");
        ck_assert_str_eq(msg, "context must hold at least one pair (an empty context would "
                              "match every data key of the key)");
        snprintf(body, sizeof(body), "{\"key\":\"errs-bulk\",\"context\":\"customer=1\"%s}",
                 reason);
        ku_expect_error(&K, "POST", p, body, 400, "bad_request");
        snprintf(body, sizeof(body), "{\"key\":\"errs-bulk\",\"context\":{\"customer\":1}%s}",
                 reason);
        msg = ku_expect_error(&K, "POST", p, body, 400, "bad_request");
        ck_assert_str_eq(msg, "context value of 'customer' must be a string");
        snprintf(body, sizeof(body),
                 "{\"key\":\"errs-bulk\",\"context\":{\"customer\":\"1\"},\"all\":true%s}", reason);
        msg = ku_expect_error(&K, "POST", p, body, 400, "bad_request");
        ck_assert_str_eq(msg, "unknown field 'all'");
        snprintf(body, sizeof(body), "{\"key\":\"nope\",\"context\":{\"customer\":\"1\"}%s}",
                 reason);
        msg = ku_expect_error(&K, "POST", p, body, 404, "key_not_found");
        ck_assert_str_eq(msg, "key 'nope' not found");
    }
    /* revoke needs a valid reason; destroy takes none */
    msg = ku_expect_error(&K, "POST", "/v1/datakeys/revoke",
                          "{\"key\":\"errs-bulk\",\"context\":{\"customer\":\"1\"}}", 400,
                          "bad_request");
    ck_assert_str_eq(msg, "missing field 'reason'");
    ku_expect_error(&K, "POST", "/v1/datakeys/revoke",
                    "{\"key\":\"errs-bulk\",\"context\":{\"customer\":\"1\"},\"reason\":\"x\"}",
                    400, "bad_request");
    msg = ku_expect_error(
        &K, "POST", "/v1/datakeys/destroy",
        "{\"key\":\"errs-bulk\",\"context\":{\"customer\":\"1\"},\"reason\":\"compromised\"}", 400,
        "bad_request");
    ck_assert_str_eq(msg, "unknown field 'reason'");
    /* none of that touched the DEK */
    expect_decrypt(id, "{\"customer\":\"1\"}", 200, NULL);
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
    kh_response_free(&r);
}

/* Literal segments win over DEK ids: /v1/datakeys/revoke is the bulk route. */
START_TEST(route_matching)
{
    expect_405("GET", "/v1/datakeys/revoke", "POST");
    expect_405("DELETE", "/v1/datakeys/revoke", "POST");
    expect_405("GET", "/v1/datakeys/destroy", "POST");
    expect_405("DELETE", "/v1/datakeys/destroy", "POST");
    expect_405("POST", "/v1/datakeys", "GET");
    expect_405("PUT", "/v1/datakeys/" MISSING, "GET, DELETE");
    expect_405("GET", "/v1/datakeys/" MISSING "/revoke", "POST");
    ku_expect_error(&K, "GET", "/v1/datakeys/" MISSING "/destroy", NULL, 404, "not_found");
    ku_expect_error(&K, "GET", "/v1/datakeys/", NULL, 404, "not_found");
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_deks");
    TCase *tc = tcase_create("deks");

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 240);
    tcase_add_test(tc, show_active);
    tcase_add_test(tc, revoke_then_decrypt);
    tcase_add_test(tc, destroy_then_decrypt);
    tcase_add_test(tc, bulk_by_one_and_two_pairs);
    tcase_add_test(tc, pagination_1000_over_http);
    if (!ts_backend_is_pg())
        tcase_add_test(tc, destroyed_bytes_gone_from_files); /* SQLite's files */
    tcase_add_test(tc, errors_single);
    tcase_add_test(tc, errors_list);
    tcase_add_test(tc, errors_bulk);
    tcase_add_test(tc, route_matching);
    suite_add_tcase(s, tc);

    /* This test stops and restarts kmsd: its own kmsd, started and stopped
     * in the test's own process (a checked fixture). */
    tc = tcase_create("integrity");
    tcase_add_checked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, flipped_byte_is_integrity_failure);
    tcase_add_test(tc, store_writer_moves_and_unrevokes);
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
