/*
 * tests/test_kmsd_malformed.c - hostile input against the real kmsd: a
 * table of malformed requests, each written byte for byte on a raw Unix
 * socket connection (bad request lines and methods, HTTP/0.9, invalid,
 * huge and duplicate headers, bad Content-Length, bodies that are not
 * JSON, JSON of the wrong type at every field of every route, invalid
 * names, ids, reasons, versions, limits and cursors, deep nesting, huge
 * strings, invalid UTF-8, NUL bytes, over-limit contexts, unknown fields,
 * path traversal, percent-encoding tricks, query-string abuse, pipelined
 * garbage, bad credentials).
 *
 * Every row must be answered with its 4xx status, Content-Type
 * application/json and the body {"error":{"code":C,"message":M}} with its
 * code, within a few seconds (no hang), and kmsd must answer GET
 * /v1/health 200 afterwards.  One kmsd (own SoftHSM2 token, key "k1")
 * serves the whole table; each row is one check loop iteration.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <errno.h>
#include <jansson.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

#define DEK      "0f0e0d0c-0b0a-4908-8706-050403020100"
#define MAX_BODY 65536
#define REPLY_MS 5000 /* a row answered later than this is a hang */

static kh_kmsd K;

/* ---- the table ---- */

typedef struct row {
    const char *name;
    /* Either raw bytes (raw_len of them: NULs allowed), or method, path and
     * body sent with Content-Length and Connection: close, or gen(). */
    const char *raw;
    size_t raw_len;
    const char *method, *path, *body;
    size_t body_len;
    char *(*gen)(size_t *len);
    int nth; /* which response of a pipelined row is checked (0: the first) */
    int status;
    const char *code;
} row;

/* The expected answer: a status and a code (BAD, NF, ... below). */
#define EXPECT(...)    EXPECT_(__VA_ARGS__)
#define EXPECT_(st, c) .status = (st), .code = (c)
/* Raw request bytes (string literal; may hold NULs). */
#define RAW(n, r, ...)                                                                             \
    {                                                                                              \
        .name = (n), .raw = (r), .raw_len = sizeof(r) - 1, EXPECT(__VA_ARGS__)                     \
    }
/* Pipelined: the k-th response (0-based) is checked. */
#define PIPE(n, r, k, ...)                                                                         \
    {                                                                                              \
        .name = (n), .raw = (r), .raw_len = sizeof(r) - 1, .nth = (k), EXPECT(__VA_ARGS__)         \
    }
/* A request with a body (string literal; may hold NULs). */
#define REQ(n, m, p, b, ...)                                                                       \
    {                                                                                              \
        .name = (n), .method = (m), .path = (p), .body = (b), .body_len = sizeof(b) - 1,           \
        EXPECT(__VA_ARGS__)                                                                        \
    }
/* A request without a body. */
#define NOBODY(n, m, p, ...)                                                                       \
    {                                                                                              \
        .name = (n), .method = (m), .path = (p), EXPECT(__VA_ARGS__)                               \
    }
/* A request made at run time (large ones). */
#define GEN(n, g, ...)                                                                             \
    {                                                                                              \
        .name = (n), .gen = (g), EXPECT(__VA_ARGS__)                                               \
    }

#define BAD  400, "bad_request"
#define NF   404, "not_found"
#define MNA  405, "method_not_allowed"
#define BIG  413, "payload_too_large"
#define AUTH 401, "unauthenticated"

static char *cat_request(const char *method, const char *path, const char *extra, const char *body,
                         size_t body_len, size_t *len)
{
    char *head = NULL, *out;
    int n;

    n = asprintf(
        &head, "%s %s HTTP/1.1\r\nHost: kmsd\r\nConnection: close\r\n%sContent-Length: %zu\r\n\r\n",
        method, path, extra, body_len);
    ck_assert_int_gt(n, 0);
    out = malloc((size_t)n + body_len + 1);
    ck_assert_ptr_nonnull(out);
    memcpy(out, head, (size_t)n);
    if (body_len > 0)
        memcpy(out + n, body, body_len);
    out[(size_t)n + body_len] = '\0';
    *len = (size_t)n + body_len;
    free(head);
    return out;
}

/* A string of n copies of c. */
static char *repeat(char c, size_t n)
{
    char *s = malloc(n + 1);

    ck_assert_ptr_nonnull(s);
    memset(s, c, n);
    s[n] = '\0';
    return s;
}

static char *gen_head_too_large(size_t *len)
{
    char *v = repeat('h', 20000), *out = NULL;

    ck_assert_int_gt(asprintf(&out, "GET /v1/health HTTP/1.1\r\nX-Big: %s\r\n\r\n", v), 0);
    free(v);
    *len = strlen(out);
    return out;
}

static char *gen_many_headers(size_t *len)
{
    size_t n = 3000, off;
    char *out = malloc(64 + n * 16);

    ck_assert_ptr_nonnull(out);
    off = (size_t)sprintf(out, "GET /v1/health HTTP/1.1\r\n");
    for (size_t i = 0; i < n; i++)
        off += (size_t)sprintf(out + off, "X-H%zu: v\r\n", i);
    off += (size_t)sprintf(out + off, "\r\n");
    *len = off;
    return out;
}

static char *gen_long_target(size_t *len)
{
    char *seg = repeat('a', 5000), *out = NULL;

    ck_assert_int_gt(asprintf(&out, "GET /v1/keys/%s HTTP/1.1\r\n\r\n", seg), 0);
    free(seg);
    *len = strlen(out);
    return out;
}

static char *gen_body_over_limit(size_t *len)
{
    char *body = repeat(' ', MAX_BODY + 1), *out;

    memcpy(body, "{\"name\":\"x\"}", 12);
    out = cat_request("POST", "/v1/keys", "", body, MAX_BODY + 1, len);
    free(body);
    return out;
}

static char *gen_huge_name(size_t *len)
{
    char *name = repeat('a', 60000), *body = NULL, *out;

    ck_assert_int_gt(asprintf(&body, "{\"name\":\"%s\"}", name), 0);
    out = cat_request("POST", "/v1/keys", "", body, strlen(body), len);
    free(name);
    free(body);
    return out;
}

static char *gen_name_65(size_t *len)
{
    char *name = repeat('a', 65), *body = NULL, *out;

    ck_assert_int_gt(asprintf(&body, "{\"name\":\"%s\"}", name), 0);
    out = cat_request("POST", "/v1/keys", "", body, strlen(body), len);
    free(name);
    free(body);
    return out;
}

/* {"context":{...}} for POST /v1/keys/k1/datakeys with n pairs, names of
 * name_len bytes and values of value_len bytes. */
static char *context_request(size_t n, size_t name_len, size_t value_len, size_t *len)
{
    size_t cap = 64 + n * (name_len + value_len + 16), off;
    char *body = malloc(cap), *name = repeat('n', name_len), *value = repeat('v', value_len), *out;

    ck_assert_ptr_nonnull(body);
    off = (size_t)sprintf(body, "{\"context\":{");
    for (size_t i = 0; i < n; i++) {
        /* distinct names: the index replaces the first characters */
        char num[16];
        int k = snprintf(num, sizeof(num), "%zu", i);
        if (name_len >= (size_t)k)
            memcpy(name, num, (size_t)k);
        off +=
            (size_t)snprintf(body + off, cap - off, "%s\"%s\":\"%s\"", i ? "," : "", name, value);
    }
    off += (size_t)snprintf(body + off, cap - off, "}}");
    out = cat_request("POST", "/v1/keys/k1/datakeys", "", body, off, len);
    free(body);
    free(name);
    free(value);
    return out;
}

static char *gen_ctx_33_pairs(size_t *len)
{
    return context_request(33, 4, 1, len);
}
static char *gen_ctx_long_name(size_t *len)
{
    return context_request(1, 129, 1, len);
}
static char *gen_ctx_long_value(size_t *len)
{
    return context_request(1, 4, 1025, len);
}
static char *gen_ctx_canonical_too_big(size_t *len)
{
    return context_request(9, 100, 1000, len);
}

static char *gen_deep_array(size_t *len)
{
    size_t n = 30000; /* within max_body: jansson's own depth limit refuses it */
    char *body = malloc(2 * n + 32), *out;
    size_t off;

    ck_assert_ptr_nonnull(body);
    off = (size_t)sprintf(body, "{\"context\":");
    memset(body + off, '[', n);
    off += n;
    memset(body + off, ']', n);
    off += n;
    body[off++] = '}';
    out = cat_request("POST", "/v1/keys/k1/datakeys", "", body, off, len);
    free(body);
    return out;
}

static char *gen_bad_utf8_context(size_t *len)
{
    static const char body[] = "{\"context\":{\"a\":\"\xc3\x28\"}}";
    return cat_request("POST", "/v1/keys/k1/datakeys", "", body, sizeof(body) - 1, len);
}

static const row rows[] = {
    /* request line */
    RAW("garbage line", "GARBAGE\r\n\r\n", BAD),
    RAW("empty request line", "\r\n\r\n", BAD),
    RAW("binary junk", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", BAD),
    RAW("TLS ClientHello, no line end", "\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", BAD),
    RAW("HTTP/9.9", "GET /v1/health HTTP/9.9\r\n\r\n", BAD),
    RAW("HTTP/2 preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", BAD),
    RAW("lowercase version", "GET /v1/health http/1.1\r\n\r\n", BAD),
    RAW("HTTP/0.9 with blank line", "GET /v1/health\r\n\r\n", BAD),
    RAW("HTTP/0.9 bare line", "GET /v1/health\r\n", BAD),
    RAW("extra token", "GET /v1/health HTTP/1.1 x\r\n\r\n", BAD),
    RAW("double space", "GET  /v1/health HTTP/1.1\r\n\r\n", BAD),
    RAW("tab separator", "GET\t/v1/health\tHTTP/1.1\r\n\r\n", BAD),
    RAW("origin-less target", "GET nohost HTTP/1.1\r\n\r\n", BAD),
    RAW("absolute-form target", "GET http://kmsd/v1/health HTTP/1.1\r\n\r\n", BAD),
    RAW("asterisk target", "OPTIONS * HTTP/1.1\r\n\r\n", BAD),
    RAW("network-path target", "GET //kmsd/v1/health HTTP/1.1\r\n\r\n", BAD),
    RAW("target evhttp cannot parse", "GEv //1Tk`ys/x HTTP/1.1\r\n\r\n", BAD),
    RAW("CONNECT authority", "CONNECT kmsd:443 HTTP/1.1\r\n\r\n", BAD),
    RAW("NUL in target", "GET /v1/he\0alth HTTP/1.1\r\n\r\n", BAD),
    RAW("control byte in target", "GET /v1/\x01health HTTP/1.1\r\n\r\n", BAD),
    RAW("UTF-8 in target", "GET /v1/keys/\xc3\xa9 HTTP/1.1\r\n\r\n", BAD),
    GEN("target over 4 KiB", gen_long_target, BAD),
    RAW("method too long", "GETGETGETGETGETGETGET /v1/health HTTP/1.1\r\n\r\n", BAD),
    /* methods */
    RAW("unknown method, known path", "BREW /v1/health HTTP/1.1\r\n\r\n", MNA),
    RAW("unknown method, unknown path", "BREW /coffee HTTP/1.1\r\n\r\n", NF),
    RAW("lowercase method", "get /v1/health HTTP/1.1\r\n\r\n", MNA),
    RAW("TRACE", "TRACE /v1/health HTTP/1.1\r\n\r\n", MNA),
    NOBODY("PUT on /v1/keys", "PUT", "/v1/keys", MNA),
    NOBODY("DELETE on /v1/health", "DELETE", "/v1/health", MNA),
    NOBODY("PATCH on a key", "PATCH", "/v1/keys/k1", MNA),
    NOBODY("POST on /v1/health", "POST", "/v1/health", MNA),
    NOBODY("GET on rotate", "GET", "/v1/keys/k1/rotate", MNA),
    NOBODY("OPTIONS on datakeys", "OPTIONS", "/v1/datakeys", MNA),
    /* headers */
    RAW("folded header", "GET /v1/health HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", BAD),
    RAW("header without colon", "GET /v1/health HTTP/1.1\r\nHost x\r\n\r\n", BAD),
    RAW("header with empty name", "GET /v1/health HTTP/1.1\r\n: x\r\n\r\n", BAD),
    RAW("space before colon", "GET /v1/health HTTP/1.1\r\nHost : x\r\n\r\n", BAD),
    RAW("space in header name", "GET /v1/health HTTP/1.1\r\nX Bad: x\r\n\r\n", BAD),
    RAW("control byte in header value", "GET /v1/health HTTP/1.1\r\nX-A: a\x01b\r\n\r\n", BAD),
    RAW("bare CR in header value", "GET /v1/health HTTP/1.1\r\nX-A: a\rb\r\n\r\n", BAD),
    RAW("NUL in header", "GET /v1/health HTTP/1.1\r\nX-A: a\0b\r\n\r\n", BAD),
    RAW("client sends the refusal header",
        "GET /v1/health HTTP/1.1\r\nX-P11kms-Refused: too-large\r\n\r\n", BAD),
    GEN("head over 16 KiB", gen_head_too_large, BAD),
    GEN("3000 headers", gen_many_headers, BAD),
    RAW("bearer token unknown", "GET /v1/keys HTTP/1.1\r\nAuthorization: Bearer nope\r\n\r\n",
        AUTH),
    RAW("basic credentials", "GET /v1/keys HTTP/1.1\r\nAuthorization: Basic dTpw\r\n\r\n", AUTH),
    RAW("two Authorization headers",
        "GET /v1/keys HTTP/1.1\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n",
        AUTH),
    /* Content-Length and Transfer-Encoding */
    RAW("duplicate Content-Length",
        "POST /v1/keys HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}", BAD),
    RAW("negative Content-Length", "POST /v1/keys HTTP/1.1\r\nContent-Length: -1\r\n\r\n", BAD),
    RAW("Content-Length with sign", "POST /v1/keys HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}", BAD),
    RAW("Content-Length not a number", "POST /v1/keys HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        BAD),
    RAW("Content-Length as a real", "POST /v1/keys HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n", BAD),
    RAW("empty Content-Length", "POST /v1/keys HTTP/1.1\r\nContent-Length:\r\n\r\n", BAD),
    RAW("Content-Length list", "POST /v1/keys HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\n{}", BAD),
    RAW("Content-Length overflow",
        "POST /v1/keys HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n", BAD),
    RAW("Content-Length over max_body with Expect",
        "POST /v1/keys HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 70000\r\n\r\n", BIG),
    GEN("body over max_body", gen_body_over_limit, BIG),
    RAW("chunked body",
        "POST /v1/keys HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", BAD),
    RAW("Transfer-Encoding identity",
        "POST /v1/keys HTTP/1.1\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\n{}",
        BAD),
    RAW("GET with a body", "GET /v1/keys HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", BAD),
    RAW("DELETE with a body", "DELETE /v1/datakeys/" DEK " HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        BAD),
    RAW("Content-Length shorter than the body",
        "POST /v1/keys HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"name\":\"short\"}", BAD),
    /* bodies that are not a JSON object */
    REQ("body not JSON", "POST", "/v1/keys", "name=k2", BAD),
    REQ("empty body where one is required", "POST", "/v1/keys", "", BAD),
    REQ("body is an array", "POST", "/v1/keys", "[{\"name\":\"k2\"}]", BAD),
    REQ("body is a string", "POST", "/v1/keys", "\"k2\"", BAD),
    REQ("body is null", "POST", "/v1/keys", "null", BAD),
    REQ("truncated JSON", "POST", "/v1/keys", "{\"name\":\"k2\"", BAD),
    REQ("trailing garbage", "POST", "/v1/keys", "{\"name\":\"k2\"} x", BAD),
    REQ("two JSON objects", "POST", "/v1/keys", "{}{}", BAD),
    REQ("duplicate field", "POST", "/v1/keys", "{\"name\":\"k2\",\"name\":\"k3\"}", BAD),
    REQ("unknown field", "POST", "/v1/keys", "{\"name\":\"k2\",\"admin\":true}", BAD),
    REQ("invalid UTF-8 in body", "POST", "/v1/keys", "{\"name\":\"\xff\xfe\"}", BAD),
    REQ("overlong UTF-8", "POST", "/v1/keys", "{\"name\":\"\xc0\xaf\"}", BAD),
    REQ("raw NUL in body", "POST", "/v1/keys", "{\"name\":\"a\0b\"}", BAD),
    REQ("escaped NUL in string", "POST", "/v1/keys", "{\"name\":\"a\\u0000b\"}", BAD),
    REQ("lone surrogate", "POST", "/v1/keys", "{\"name\":\"\\ud800\"}", BAD),
    REQ("number overflow", "POST", "/v1/keys/k1/config", "{\"min_decrypt_version\":1e999}", BAD),
    REQ("BOM before JSON", "POST", "/v1/keys", "\xef\xbb\xbf{\"name\":\"k2\"}", BAD),
    GEN("nesting 30000 deep", gen_deep_array, BAD),
    REQ("nesting 9 deep", "POST", "/v1/keys/k1/datakeys", "{\"context\":{\"a\":[[[[[[[[1]]]]]]]]}}",
        BAD),
    /* POST /v1/keys: name */
    REQ("name number", "POST", "/v1/keys", "{\"name\":42}", BAD),
    REQ("name null", "POST", "/v1/keys", "{\"name\":null}", BAD),
    REQ("name bool", "POST", "/v1/keys", "{\"name\":true}", BAD),
    REQ("name array", "POST", "/v1/keys", "{\"name\":[\"k2\"]}", BAD),
    REQ("name object", "POST", "/v1/keys", "{\"name\":{}}", BAD),
    REQ("name missing", "POST", "/v1/keys", "{}", BAD),
    REQ("name empty", "POST", "/v1/keys", "{\"name\":\"\"}", BAD),
    REQ("name uppercase", "POST", "/v1/keys", "{\"name\":\"Key\"}", BAD),
    REQ("name leading dash", "POST", "/v1/keys", "{\"name\":\"-k\"}", BAD),
    REQ("name with slash", "POST", "/v1/keys", "{\"name\":\"a/b\"}", BAD),
    REQ("name traversal", "POST", "/v1/keys", "{\"name\":\"../etc\"}", BAD),
    REQ("name with space", "POST", "/v1/keys", "{\"name\":\"a b\"}", BAD),
    REQ("name non-ASCII", "POST", "/v1/keys", "{\"name\":\"\xc3\xa9t\xc3\xa9\"}", BAD),
    GEN("name of 65 bytes", gen_name_65, BAD),
    GEN("name of 60000 bytes", gen_huge_name, BAD),
    /* POST /v1/keys/{name}/datakeys: name in the path, context */
    REQ("generate: bad key name in path", "POST", "/v1/keys/K1/datakeys", "{}", BAD),
    REQ("generate: context string", "POST", "/v1/keys/k1/datakeys", "{\"context\":\"a=b\"}", BAD),
    REQ("generate: context array", "POST", "/v1/keys/k1/datakeys", "{\"context\":[\"a\"]}", BAD),
    REQ("generate: context number", "POST", "/v1/keys/k1/datakeys", "{\"context\":1}", BAD),
    REQ("generate: context value number", "POST", "/v1/keys/k1/datakeys", "{\"context\":{\"a\":1}}",
        BAD),
    REQ("generate: context value null", "POST", "/v1/keys/k1/datakeys",
        "{\"context\":{\"a\":null}}", BAD),
    REQ("generate: context value object", "POST", "/v1/keys/k1/datakeys",
        "{\"context\":{\"a\":{\"b\":\"c\"}}}", BAD),
    REQ("generate: context empty name", "POST", "/v1/keys/k1/datakeys",
        "{\"context\":{\"\":\"x\"}}", BAD),
    REQ("generate: context escaped NUL", "POST", "/v1/keys/k1/datakeys",
        "{\"context\":{\"a\":\"\\u0000\"}}", BAD),
    GEN("generate: context invalid UTF-8", gen_bad_utf8_context, BAD),
    REQ("generate: unknown field", "POST", "/v1/keys/k1/datakeys", "{\"ctx\":{}}", BAD),
    GEN("generate: 33 context pairs", gen_ctx_33_pairs, BAD),
    GEN("generate: context name of 129 bytes", gen_ctx_long_name, BAD),
    GEN("generate: context value of 1025 bytes", gen_ctx_long_value, BAD),
    GEN("generate: canonical context over 8 KiB", gen_ctx_canonical_too_big, BAD),
    REQ("generate: unknown key", "POST", "/v1/keys/nokey/datakeys", "{}", 404, "key_not_found"),
    /* DEK ids */
    REQ("decrypt: id not a UUID", "POST", "/v1/datakeys/not-a-uuid/decrypt", "{}", BAD),
    REQ("decrypt: uppercase UUID", "POST",
        "/v1/datakeys/0F0E0D0C-0B0A-4908-8706-050403020100/decrypt", "{}", BAD),
    REQ("decrypt: UUID without dashes", "POST",
        "/v1/datakeys/0f0e0d0c0b0a490887060504030201000000/decrypt", "{}", BAD),
    REQ("decrypt: UUID with braces", "POST",
        "/v1/datakeys/{0f0e0d0c-0b0a-4908-8706-050403020100}/decrypt", "{}", BAD),
    REQ("decrypt: context array", "POST", "/v1/datakeys/" DEK "/decrypt", "{\"context\":[]}", BAD),
    REQ("decrypt: unknown field", "POST", "/v1/datakeys/" DEK "/decrypt", "{\"plaintext\":\"x\"}",
        BAD),
    REQ("decrypt: unknown DEK", "POST", "/v1/datakeys/" DEK "/decrypt", "{}", 404, "dek_not_found"),
    NOBODY("show: id percent-encoded", "GET", "/v1/datakeys/0f0e0d0c%2D0b0a-4908-8706-050403020100",
           BAD),
    NOBODY("destroy: id too long", "DELETE", "/v1/datakeys/" DEK "0", BAD),
    /* revoke */
    REQ("revoke: reason missing", "POST", "/v1/datakeys/" DEK "/revoke", "{}", BAD),
    REQ("revoke: empty body", "POST", "/v1/datakeys/" DEK "/revoke", "", BAD),
    REQ("revoke: reason number", "POST", "/v1/datakeys/" DEK "/revoke", "{\"reason\":1}", BAD),
    REQ("revoke: reason null", "POST", "/v1/datakeys/" DEK "/revoke", "{\"reason\":null}", BAD),
    REQ("revoke: reason unknown", "POST", "/v1/datakeys/" DEK "/revoke", "{\"reason\":\"bored\"}",
        BAD),
    REQ("revoke: reason uppercase", "POST", "/v1/datakeys/" DEK "/revoke",
        "{\"reason\":\"COMPROMISED\"}", BAD),
    REQ("revoke: bad id", "POST", "/v1/datakeys/xyz/revoke", "{\"reason\":\"compromised\"}", BAD),
    /* bulk */
    REQ("bulk revoke: key missing", "POST", "/v1/datakeys/revoke",
        "{\"context\":{\"c\":\"1\"},\"reason\":\"compromised\"}", BAD),
    REQ("bulk revoke: key number", "POST", "/v1/datakeys/revoke",
        "{\"key\":1,\"context\":{\"c\":\"1\"},\"reason\":\"compromised\"}", BAD),
    REQ("bulk revoke: empty context", "POST", "/v1/datakeys/revoke",
        "{\"key\":\"k1\",\"context\":{},\"reason\":\"compromised\"}", BAD),
    REQ("bulk revoke: reason missing", "POST", "/v1/datakeys/revoke",
        "{\"key\":\"k1\",\"context\":{\"c\":\"1\"}}", BAD),
    REQ("bulk revoke: context string", "POST", "/v1/datakeys/revoke",
        "{\"key\":\"k1\",\"context\":\"c=1\",\"reason\":\"compromised\"}", BAD),
    REQ("bulk destroy: context missing", "POST", "/v1/datakeys/destroy", "{\"key\":\"k1\"}", BAD),
    REQ("bulk destroy: context null", "POST", "/v1/datakeys/destroy",
        "{\"key\":\"k1\",\"context\":null}", BAD),
    REQ("bulk destroy: reason is unknown here", "POST", "/v1/datakeys/destroy",
        "{\"key\":\"k1\",\"context\":{\"c\":\"1\"},\"reason\":\"compromised\"}", BAD),
    REQ("bulk destroy: bad key name", "POST", "/v1/datakeys/destroy",
        "{\"key\":\"K*\",\"context\":{\"c\":\"1\"}}", BAD),
    /* key config, rewrap, rotate */
    REQ("config: empty object", "POST", "/v1/keys/k1/config", "{}", BAD),
    REQ("config: version string", "POST", "/v1/keys/k1/config", "{\"min_decrypt_version\":\"2\"}",
        BAD),
    REQ("config: version 0", "POST", "/v1/keys/k1/config", "{\"min_decrypt_version\":0}", BAD),
    REQ("config: version negative", "POST", "/v1/keys/k1/config", "{\"min_decrypt_version\":-1}",
        BAD),
    REQ("config: version 2^32", "POST", "/v1/keys/k1/config",
        "{\"min_decrypt_version\":4294967296}", BAD),
    REQ("config: version real", "POST", "/v1/keys/k1/config", "{\"min_decrypt_version\":1.5}", BAD),
    REQ("config: version above latest", "POST", "/v1/keys/k1/config", "{\"min_decrypt_version\":5}",
        BAD),
    REQ("config: period number", "POST", "/v1/keys/k1/config", "{\"rotation_period\":90}", BAD),
    REQ("config: period unit", "POST", "/v1/keys/k1/config", "{\"rotation_period\":\"90x\"}", BAD),
    REQ("config: period too long", "POST", "/v1/keys/k1/config", "{\"rotation_period\":\"99999d\"}",
        BAD),
    REQ("config: period negative", "POST", "/v1/keys/k1/config", "{\"rotation_period\":\"-1d\"}",
        BAD),
    REQ("rewrap: batch 0", "POST", "/v1/keys/k1/rewrap", "{\"batch\":0}", BAD),
    REQ("rewrap: batch string", "POST", "/v1/keys/k1/rewrap", "{\"batch\":\"10\"}", BAD),
    REQ("rewrap: batch huge", "POST", "/v1/keys/k1/rewrap", "{\"batch\":1000000000000}", BAD),
    REQ("rewrap: batch real", "POST", "/v1/keys/k1/rewrap", "{\"batch\":2.5}", BAD),
    REQ("rotate: unknown field", "POST", "/v1/keys/k1/rotate", "{\"version\":2}", BAD),
    REQ("disable: body array", "POST", "/v1/keys/k1/disable", "[]", BAD),
    REQ("enable: body not JSON", "POST", "/v1/keys/k1/enable", "yes", BAD),
    /* retire: version in the path */
    NOBODY("retire: version 0", "DELETE", "/v1/keys/k1/versions/0", BAD),
    NOBODY("retire: leading zero", "DELETE", "/v1/keys/k1/versions/01", BAD),
    NOBODY("retire: version negative", "DELETE", "/v1/keys/k1/versions/-1", BAD),
    NOBODY("retire: version 2^32", "DELETE", "/v1/keys/k1/versions/4294967296", BAD),
    NOBODY("retire: version word", "DELETE", "/v1/keys/k1/versions/latest", BAD),
    NOBODY("retire: version with plus", "DELETE", "/v1/keys/k1/versions/+1", BAD),
    /* listing: query-string abuse */
    NOBODY("list: key missing", "GET", "/v1/datakeys", BAD),
    NOBODY("list: key repeated", "GET", "/v1/datakeys?key=k1&key=k1", BAD),
    NOBODY("list: unknown parameter", "GET", "/v1/datakeys?key=k1&admin=1", BAD),
    NOBODY("list: bad state", "GET", "/v1/datakeys?key=k1&state=dead", BAD),
    NOBODY("list: limit 0", "GET", "/v1/datakeys?key=k1&limit=0", BAD),
    NOBODY("list: limit huge", "GET", "/v1/datakeys?key=k1&limit=99999999999999999999", BAD),
    NOBODY("list: limit negative", "GET", "/v1/datakeys?key=k1&limit=-5", BAD),
    NOBODY("list: limit word", "GET", "/v1/datakeys?key=k1&limit=ten", BAD),
    NOBODY("list: limit encoded sum", "GET", "/v1/datakeys?key=k1&limit=1%2B1", BAD),
    NOBODY("list: cursor not an id", "GET", "/v1/datakeys?key=k1&cursor=../../x", BAD),
    NOBODY("list: bad percent-encoding", "GET", "/v1/datakeys?key=%zz", BAD),
    NOBODY("list: truncated percent", "GET", "/v1/datakeys?key=k%3", BAD),
    NOBODY("list: encoded NUL", "GET", "/v1/datakeys?key=k1%00x", BAD),
    NOBODY("list: empty name", "GET", "/v1/datakeys?=k1", BAD),
    NOBODY("list: parameter without value", "GET", "/v1/datakeys?key", BAD),
    NOBODY("list: bad key name", "GET", "/v1/datakeys?key=..%2Fetc", BAD),
    /* paths */
    NOBODY("unknown route", "GET", "/v2/keys", NF),
    NOBODY("root", "GET", "/", NF),
    NOBODY("uppercase path", "GET", "/V1/HEALTH", NF),
    NOBODY("trailing slash", "GET", "/v1/health/", NF),
    NOBODY("empty segment", "GET", "/v1//keys", NF),
    NOBODY("dot-dot traversal", "GET", "/v1/keys/../../etc/passwd", NF),
    NOBODY("traversal to a route", "GET", "/v1/keys/k1/../../health", NF),
    NOBODY("encoded traversal", "GET", "/v1/keys/%2e%2e%2f%2e%2e%2fetc", BAD),
    NOBODY("encoded slash in name", "POST", "/v1/keys/k1%2Frotate", MNA),
    NOBODY("percent-encoded name", "GET", "/v1/keys/%6b%31", BAD),
    NOBODY("encoded NUL in path", "GET", "/v1/keys/k1%00", BAD),
    NOBODY("semicolon parameter", "GET", "/v1/health;x=1", NF),
    NOBODY("extra segment", "DELETE", "/v1/keys/k1/versions/1/x", NF),
    NOBODY("backslash path", "GET", "/v1\\keys", NF),
    /* pipelined */
    PIPE("garbage after a good request", "GET /v1/health HTTP/1.1\r\n\r\nGARBAGE\x01\x02\r\n\r\n",
         1, BAD),
    PIPE("bad Content-Length after a good request",
         "GET /v1/health HTTP/1.1\r\n\r\nPOST /v1/keys HTTP/1.1\r\nContent-Length: x\r\n\r\n", 1,
         BAD),
    PIPE("bad JSON after a good request",
         "GET /v1/keys/k1 HTTP/1.1\r\n\r\nPOST /v1/keys HTTP/1.1\r\nContent-Length: 3\r\n\r\n{{{",
         1, BAD),
    PIPE("binary after a good request", "GET /v1/health HTTP/1.1\r\n\r\n\0\0\0\0\xff\xff\r\n\r\n",
         1, BAD),
    RAW("HTTP/1.0 unknown route", "GET /nope HTTP/1.0\r\n\r\n", NF),
};
#define N_ROWS ((int)(sizeof(rows) / sizeof(rows[0])))

/* ---- the raw exchange ---- */

typedef struct answer {
    int status;
    char ctype[128];
    char *body;
    size_t body_len;
} answer;

static long ms_since(const struct timespec *start)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - start->tv_sec) * 1000 + (now.tv_nsec - start->tv_nsec) / 1000000;
}

/* Parse the response at buf[0..len): 1 and *used when complete, else 0. */
static int parse_response(const char *buf, size_t len, answer *a, size_t *used)
{
    const char *end = memmem(buf, len, "\r\n\r\n", 4), *line, *next;
    size_t head, clen = 0;
    int have_clen = 0;

    if (end == NULL)
        return 0;
    head = (size_t)(end - buf) + 4;
    if (sscanf(buf, "HTTP/1.%*1[01] %3d", &a->status) != 1)
        a->status = -1;
    a->ctype[0] = '\0';
    for (line = memchr(buf, '\n', head); line != NULL && line + 1 < end; line = next) {
        line++;
        next = memchr(line, '\n', (size_t)(end + 2 - line));
        if (strncasecmp(line, "Content-Length:", 15) == 0) {
            clen = strtoul(line + 15, NULL, 10);
            have_clen = 1;
        } else if (strncasecmp(line, "Content-Type:", 13) == 0) {
            const char *v = line + 13;
            size_t n;
            while (*v == ' ')
                v++;
            n = strcspn(v, "\r\n");
            snprintf(a->ctype, sizeof(a->ctype), "%.*s", (int)n, v);
        }
        if (next == NULL)
            break;
    }
    if (!have_clen || head + clen > len)
        return 0;
    free(a->body);
    a->body = malloc(clen + 1);
    ck_assert_ptr_nonnull(a->body);
    memcpy(a->body, buf + head, clen);
    a->body[clen] = '\0';
    a->body_len = clen;
    *used = head + clen;
    return 1;
}

/* Write data on a new connection and read responses until the nth
 * (0-based) is complete.  Returns 0, or -1 when it did not come within
 * REPLY_MS (the connection closed first, or a hang). */
static int exchange(const char *data, size_t len, int nth, answer *a, long *ms)
{
    struct sockaddr_un sun;
    struct timespec start;
    char *buf = NULL;
    size_t have = 0, cap = 0, off = 0, used;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0), seen = 0, rv = -1;

    memset(a, 0, sizeof(*a));
    ck_assert_int_ge(fd, 0);
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    ck_assert_int_lt(strlen(K.sock), sizeof(sun.sun_path));
    memcpy(sun.sun_path, K.sock, strlen(K.sock) + 1);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    clock_gettime(CLOCK_MONOTONIC, &start);
    while (off < len) {
        struct pollfd pfd = {fd, POLLOUT, 0};
        ssize_t n;
        if (poll(&pfd, 1, REPLY_MS) <= 0)
            break;
        n = send(fd, data + off, len - off, MSG_NOSIGNAL);
        if (n <= 0)
            break; /* refused early and closed: read what it said */
        off += (size_t)n;
    }
    for (;;) {
        struct pollfd pfd = {fd, POLLIN, 0};
        long left = REPLY_MS - ms_since(&start);
        ssize_t n;

        while (have > 0 && parse_response(buf, have, a, &used)) {
            if (seen++ == nth) {
                rv = 0;
                goto out;
            }
            memmove(buf, buf + used, have - used);
            have -= used;
        }
        if (left <= 0 || poll(&pfd, 1, (int)left) <= 0)
            break;
        if (have + 65536 > cap) {
            cap = have + 65536;
            buf = realloc(buf, cap);
            ck_assert_ptr_nonnull(buf);
        }
        n = recv(fd, buf + have, cap - have, 0);
        if (n <= 0)
            break;
        have += (size_t)n;
    }
out:
    *ms = ms_since(&start);
    free(buf);
    close(fd);
    return rv;
}

static char *row_request(const row *r, size_t *len)
{
    char *out;

    if (r->gen != NULL)
        return r->gen(len);
    if (r->raw != NULL) {
        out = malloc(r->raw_len + 1);
        ck_assert_ptr_nonnull(out);
        memcpy(out, r->raw, r->raw_len);
        *len = r->raw_len;
        return out;
    }
    return cat_request(r->method, r->path, "", r->body != NULL ? r->body : "",
                       r->body != NULL ? r->body_len : 0, len);
}

START_TEST(malformed_row)
{
    const row *r = &rows[_i];
    json_error_t jerr;
    json_t *j, *err, *code, *msg;
    answer a;
    size_t len = 0;
    long ms = 0;
    char *req = row_request(r, &len);

    ck_assert_msg(exchange(req, len, r->nth, &a, &ms) == 0, "row %d '%s': no answer in %d ms", _i,
                  r->name, REPLY_MS);
    ck_assert_msg(a.status == r->status, "row %d '%s': status %d, want %d; body: %.300s", _i,
                  r->name, a.status, r->status, a.body);
    ck_assert_msg(strcmp(a.ctype, "application/json") == 0,
                  "row %d '%s': Content-Type '%s'; body: %.300s", _i, r->name, a.ctype, a.body);
    j = json_loadb(a.body, a.body_len, JSON_REJECT_DUPLICATES, &jerr);
    ck_assert_msg(j != NULL, "row %d '%s': body is not JSON: %.300s", _i, r->name, a.body);
    err = json_object_get(j, "error");
    code = json_object_get(err, "code");
    msg = json_object_get(err, "message");
    ck_assert_msg(json_is_object(j) && json_object_size(j) == 1 && json_is_object(err) &&
                      json_is_string(code) && json_is_string(msg) && json_string_length(msg) > 0,
                  "row %d '%s': not {\"error\":{\"code\",\"message\"}}: %.300s", _i, r->name,
                  a.body);
    ck_assert_msg(strcmp(json_string_value(code), r->code) == 0,
                  "row %d '%s': code %s, want %s (%s)", _i, r->name, json_string_value(code),
                  r->code, json_string_value(msg));
    json_decref(j);
    free(a.body);
    free(req);
    ku_assert_healthy(&K);
}
END_TEST

/* Afterwards: still serving, and nothing was created by any row. */
START_TEST(still_serving)
{
    long status = 0;
    json_t *j = ku_call(&K, "GET", "/v1/keys", NULL, &status);

    ck_assert_int_eq(status, 200);
    ck_assert_int_eq(json_array_size(json_object_get(j, "keys")), 1);
    json_decref(j);
    ck_assert_int_eq(kill(K.pid, 0), 0);
    fprintf(stderr, "test_kmsd_malformed: %d malformed requests in the table\n", N_ROWS);
}
END_TEST

static void start(void)
{
    long status = 0;
    json_t *j;

    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-malformed", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    j = ku_call(&K, "POST", "/v1/keys", "{\"name\":\"k1\"}", &status);
    ck_assert_int_eq(status, 201);
    json_decref(j);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    char *log = st != 0 ? kh_read_file(K.log, NULL) : NULL;

    if (log != NULL) /* the fixture runs in the parent: say why before failing */
        fprintf(stderr, "kmsd exited with status %d; its log:\n%s\n", st, log);
    free(log);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_malformed");
    TCase *tc = tcase_create("malformed");

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, malformed_row, 0, N_ROWS);
    tcase_add_test(tc, still_serving);
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
