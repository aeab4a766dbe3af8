/*
 * kms/server/routes.c - the route table, request validation, handlers and
 * JSON rendering of kmsd (see routes.h and docs/api.md).
 *
 * The route table lists every route of the contract, so a wrong method on
 * a known path is 405 and not 404; routes of later releases answer
 * 404 not_found "not implemented yet".  Literal path segments win over
 * parameters (POST /v1/datakeys/revoke is not a DEK id).
 *
 * Secrets: a plaintext DEK exists here only inside a kms_datakey on the
 * worker's stack, a base64 buffer on the stack, jansson's copy of that
 * string and the rendered reply body.  All are wiped (OPENSSL_cleanse)
 * before they are released; the body is wiped by whoever frees it.
 * Query strings are read by GET /v1/datakeys only (key, state, cursor,
 * limit: strict, percent-decoded, no unknown or repeated parameters); the
 * other routes ignore them.
 *
 * No state: every function works on its arguments only.
 */
#include "kms/server/routes.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "kms/policy/policy.h"
#include "kms/server/framing.h"
#include "module/log.h"

typedef enum route_id {
    R_HEALTH,
    R_KEY_CREATE,
    R_KEY_LIST,
    R_KEY_SHOW,
    R_DATAKEY_GENERATE,
    R_DATAKEY_DECRYPT,
    R_DATAKEY_SHOW,
    R_DATAKEY_LIST,
    R_DATAKEY_REVOKE,
    R_DATAKEY_DESTROY,
    R_DATAKEY_BULK_REVOKE,
    R_DATAKEY_BULK_DESTROY,
    R_KEY_ROTATE,
    R_KEY_DISABLE,
    R_KEY_ENABLE,
    R_KEY_CONFIG,
    R_KEY_REWRAP,
    R_KEY_RETIRE,
    R_AUDIT_LIST,
    R_AUDIT_VERIFY,
    R_STATUS,
    R_METRICS, /* rendered by kms/server/metrics.c (http.c run_job) */
    R_LATER,   /* a contract route of a later release */
} route_id;

typedef struct route {
    const char *method;
    const char *pattern; /* '*' is one path segment */
    route_id id;
    const char *name; /* for the log */
} route;

static const route routes[] = {
    {"GET", "/v1/health", R_HEALTH, "health"},
    {"POST", "/v1/keys", R_KEY_CREATE, "key.create"},
    {"GET", "/v1/keys", R_KEY_LIST, "key.list"},
    {"GET", "/v1/keys/*", R_KEY_SHOW, "key.show"},
    {"POST", "/v1/keys/*/rotate", R_KEY_ROTATE, "key.rotate"},
    {"POST", "/v1/keys/*/disable", R_KEY_DISABLE, "key.disable"},
    {"POST", "/v1/keys/*/enable", R_KEY_ENABLE, "key.enable"},
    {"POST", "/v1/keys/*/config", R_KEY_CONFIG, "key.config"},
    {"POST", "/v1/keys/*/rewrap", R_KEY_REWRAP, "key.rewrap"},
    {"DELETE", "/v1/keys/*/versions/*", R_KEY_RETIRE, "key.retire"},
    {"POST", "/v1/keys/*/datakeys", R_DATAKEY_GENERATE, "datakey.generate"},
    {"POST", "/v1/datakeys/*/decrypt", R_DATAKEY_DECRYPT, "datakey.decrypt"},
    {"GET", "/v1/datakeys/*", R_DATAKEY_SHOW, "datakey.show"},
    {"DELETE", "/v1/datakeys/*", R_DATAKEY_DESTROY, "datakey.destroy"},
    {"GET", "/v1/datakeys", R_DATAKEY_LIST, "datakey.list"},
    {"POST", "/v1/datakeys/*/revoke", R_DATAKEY_REVOKE, "datakey.revoke"},
    {"POST", "/v1/datakeys/revoke", R_DATAKEY_BULK_REVOKE, "datakey.bulk_revoke"},
    {"POST", "/v1/datakeys/destroy", R_DATAKEY_BULK_DESTROY, "datakey.bulk_destroy"},
    {"GET", "/v1/audit", R_AUDIT_LIST, "audit.list"},
    {"GET", "/v1/audit/verify", R_AUDIT_VERIFY, "audit.verify"},
    {"GET", "/v1/status", R_STATUS, "status"},
    {"GET", "/metrics", R_METRICS, "metrics"},
};
#define N_ROUTES   (sizeof(routes) / sizeof(routes[0]))
#define MAX_PARAMS 2
#define PARAM_MAX  128

struct kms_call {
    const route *route;
    char name[KMS_NAME_MAX + 1];
    char dek_id[KMS_DEK_ID_LEN + 1];
    json_t *context;                 /* validated; NULL for none */
    kms_revoke_reason reason;        /* revoke routes */
    int state;                       /* list: kms_dek_state or -1 */
    char cursor[KMS_DEK_ID_LEN + 1]; /* list: "" for the first page */
    size_t limit;                    /* list */
    uint32_t min_decrypt_version;    /* config: 0 = unchanged */
    int64_t rotation_period;         /* config: -1 = unchanged */
    uint64_t batch;                  /* rewrap: 0 = everything */
    uint32_t version;                /* retire */
    uint64_t after;                  /* audit list */
    kms_dek_op *op;                  /* kms_routes_start's, until kms_call_free */
};

/* ---- replies ---- */

void kms_reply_clear(kms_reply *r)
{
    if (r->body != NULL) {
        OPENSSL_cleanse(r->body, r->len);
        free(r->body);
    }
    r->body = NULL;
    r->len = 0;
}

/* Render obj (reference stolen) as the reply body. */
static void reply_json(kms_reply *r, int status, json_t *obj)
{
    size_t need;

    kms_reply_clear(r);
    r->status = status;
    if (obj == NULL)
        goto oom;
    need = json_dumpb(obj, NULL, 0, JSON_COMPACT);
    if (need == 0 || (r->body = malloc(need)) == NULL)
        goto oom;
    r->len = json_dumpb(obj, r->body, need, JSON_COMPACT);
    if (r->len != need) {
        kms_reply_clear(r);
        goto oom;
    }
    json_decref(obj);
    return;
oom:
    json_decref(obj);
    r->status = 500;
    r->body = strdup("{\"error\":{\"code\":\"internal\",\"message\":\"out of memory\"}}");
    r->len = r->body != NULL ? strlen(r->body) : 0;
}

static json_t *error_object(p11kms_status s, const char *message)
{
    return json_pack("{s:{s:s,s:s}}", "error", "code", p11kms_status_code(s), "message", message);
}

void kms_reply_error(kms_reply *r, p11kms_status s, const char *fmt, ...)
{
    char msg[512];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    /* Messages may echo request text (a field or parameter name, possibly
     * cut mid-character): keep them printable ASCII, hence valid UTF-8. */
    for (char *c = msg; *c != '\0'; c++)
        if ((unsigned char)*c < 0x20 || (unsigned char)*c > 0x7e)
            *c = '?';
    reply_json(r, p11kms_status_http(s), error_object(s, msg));
    if (s == P11KMS_ERR_OVERLOADED)
        r->retry_after = 1;
}

/* ---- route matching ---- */

/* Match path against pattern; params receive the '*' segments. */
static int match(const char *pattern, const char *path, char params[MAX_PARAMS][PARAM_MAX],
                 int *n_params, int *wildcards)
{
    const char *p = pattern, *s = path;

    *n_params = 0;
    *wildcards = 0;
    while (*p != '\0' && *s != '\0') {
        if (*p == '*') {
            size_t len = strcspn(s, "/");
            if (len == 0 || *n_params == MAX_PARAMS)
                return 0;
            snprintf(params[*n_params], PARAM_MAX, "%.*s", (int)len, s);
            if (len >= PARAM_MAX)
                params[*n_params][PARAM_MAX - 2] = '~'; /* too long: never valid */
            (*n_params)++;
            (*wildcards)++;
            p++;
            s += len;
            continue;
        }
        if (*p != *s)
            return 0;
        p++;
        s++;
    }
    return *p == '\0' && *s == '\0';
}

typedef struct route_match {
    const route *route; /* the route of the method, or NULL */
    int path_known;     /* some route has this path */
    char allow[96];     /* methods of this path */
    char params[MAX_PARAMS][PARAM_MAX];
} route_match;

static void find_route(const char *method, const char *path, route_match *m)
{
    char params[MAX_PARAMS][PARAM_MAX];
    int n, wild, best = 99;

    memset(m, 0, sizeof(*m));
    /* The most literal pattern that matches wins. */
    for (size_t i = 0; i < N_ROUTES; i++)
        if (match(routes[i].pattern, path, params, &n, &wild) && wild < best)
            best = wild;
    if (best == 99)
        return;
    m->path_known = 1;
    for (size_t i = 0; i < N_ROUTES; i++) {
        if (!match(routes[i].pattern, path, params, &n, &wild) || wild != best)
            continue;
        if (strstr(m->allow, routes[i].method) == NULL) {
            size_t used = strlen(m->allow);
            snprintf(m->allow + used, sizeof(m->allow) - used, "%s%s", used ? ", " : "",
                     routes[i].method);
        }
        if (method != NULL && strcmp(routes[i].method, method) == 0) {
            m->route = &routes[i];
            memcpy(m->params, params, sizeof(params));
        }
    }
}

/* ---- body validation ---- */

static size_t json_depth(const json_t *j)
{
    size_t max = 0, d;
    const char *key;
    json_t *v;
    size_t i;

    if (json_is_object(j)) {
        json_object_foreach((json_t *)j, key, v)
        {
            if ((d = json_depth(v)) > max)
                max = d;
        }
        return max + 1;
    }
    if (json_is_array(j)) {
        json_array_foreach(j, i, v)
        {
            if ((d = json_depth(v)) > max)
                max = d;
        }
        return max + 1;
    }
    return 0;
}

/* Parse the body as a JSON object with only the allowed fields.  An empty
 * body is {} when empty_ok.  *out is NULL after a reply was written. */
static void parse_body(const kms_request_info *in, const char *const allowed[], int empty_ok,
                       json_t **out, kms_reply *r)
{
    json_error_t jerr;
    json_t *j = NULL;
    const char *key;
    json_t *v;

    *out = NULL;
    if (in->body_len == 0) {
        if (empty_ok)
            *out = json_object();
        else
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "request body must be a JSON object");
        return;
    }
    j = json_loadb((const char *)in->body, in->body_len, JSON_REJECT_DUPLICATES, &jerr);
    if (j == NULL) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "malformed JSON at line %d column %d: %.200s",
                        jerr.line, jerr.column, jerr.text);
        return;
    }
    if (!json_is_object(j)) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "request body must be a JSON object");
        goto fail;
    }
    if (json_depth(j) > KMS_JSON_MAX_DEPTH) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "JSON nested deeper than %d levels",
                        KMS_JSON_MAX_DEPTH);
        goto fail;
    }
    json_object_foreach(j, key, v)
    {
        int ok = 0;
        for (size_t i = 0; allowed[i] != NULL; i++)
            ok |= strcmp(allowed[i], key) == 0;
        if (!ok) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "unknown field '%.64s'", key);
            goto fail;
        }
    }
    *out = j;
    return;
fail:
    json_decref(j);
}

/* Validate the optional "context" member; on success *ctx is a new
 * reference or NULL.  Returns 0 after writing an error reply. */
static int take_context(json_t *body, json_t **ctx, kms_reply *r)
{
    json_t *c = json_object_get(body, "context"), *v;
    const char *name;
    char *canonical = NULL;

    *ctx = NULL;
    if (c == NULL || json_is_null(c))
        return 1;
    if (!json_is_object(c)) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                        "context must be a JSON object of string values");
        return 0;
    }
    if (json_object_size(c) > KMS_CONTEXT_MAX_PAIRS) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "context has %zu pairs; at most %d allowed",
                        json_object_size(c), KMS_CONTEXT_MAX_PAIRS);
        return 0;
    }
    json_object_foreach(c, name, v)
    {
        size_t nlen = strlen(name);
        if (nlen == 0 || nlen > KMS_CONTEXT_MAX_NAME) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "context names must be 1 to %d bytes",
                            KMS_CONTEXT_MAX_NAME);
            return 0;
        }
        if (!json_is_string(v)) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "context value of '%.64s' must be a string",
                            name);
            return 0;
        }
        if (json_string_length(v) > KMS_CONTEXT_MAX_VALUE) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                            "context value of '%.64s' is longer than %d bytes", name,
                            KMS_CONTEXT_MAX_VALUE);
            return 0;
        }
    }
    if (kms_context_canonical(c, &canonical) != P11KMS_OK) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                        "invalid context (at most %d bytes in canonical form, UTF-8 strings)",
                        KMS_CONTEXT_MAX_BYTES);
        return 0;
    }
    free(canonical);
    *ctx = json_incref(c);
    return 1;
}

static int uuid_valid(const char *s)
{
    static const char shape[] = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";

    if (strlen(s) != KMS_DEK_ID_LEN)
        return 0;
    for (size_t i = 0; i < KMS_DEK_ID_LEN; i++) {
        char c = s[i];
        if (shape[i] == '-' ? c != '-' : !((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return 0;
    }
    return 1;
}

static int take_name(const char *name, kms_call *call, kms_reply *r)
{
    if (!kms_key_name_valid(name)) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                        "invalid key name: must match [a-z0-9][a-z0-9._-]{0,63}");
        return 0;
    }
    snprintf(call->name, sizeof(call->name), "%.64s", name);
    return 1;
}

static int take_dek_id(const char *id, kms_call *call, kms_reply *r)
{
    if (!uuid_valid(id)) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                        "dek_id must be a UUID in canonical lowercase form");
        return 0;
    }
    memcpy(call->dek_id, id, KMS_DEK_ID_LEN + 1);
    return 1;
}

/* A required string member of body; 0 after writing an error reply. */
static int take_string(json_t *body, const char *field, const char **out, kms_reply *r)
{
    json_t *v = json_object_get(body, field);

    if (v == NULL || json_is_null(v)) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "missing field '%s'", field);
        return 0;
    }
    if (!json_is_string(v)) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "field '%s' must be a string", field);
        return 0;
    }
    *out = json_string_value(v);
    return 1;
}

static int take_reason(json_t *body, kms_call *call, kms_reply *r)
{
    const char *s = NULL;
    int reason;

    if (!take_string(body, "reason", &s, r))
        return 0;
    reason = kms_revoke_reason_parse(s);
    if (reason < 0) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                        "reason must be one of compromised, superseded, cessation, unspecified");
        return 0;
    }
    call->reason = (kms_revoke_reason)reason;
    return 1;
}

/* Bulk body: "key" and a non-empty "context" (plus "reason" for revoke). */
static int take_bulk(json_t *body, kms_call *call, kms_reply *r)
{
    const char *key = NULL;

    if (!take_string(body, "key", &key, r) || !take_name(key, call, r))
        return 0;
    if (json_object_get(body, "context") == NULL ||
        json_is_null(json_object_get(body, "context"))) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "missing field 'context'");
        return 0;
    }
    if (!take_context(body, &call->context, r))
        return 0;
    if (json_object_size(call->context) == 0) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                        "context must hold at least one pair (an empty context would match "
                        "every data key of the key)");
        return 0;
    }
    if (call->route->id == R_DATAKEY_BULK_REVOKE && !take_reason(body, call, r))
        return 0;
    return 1;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decode src[0..len) into dst (cap bytes with the NUL); '+' is a
 * space.  0 when malformed, too long or decoding to a NUL byte. */
static int query_decode(const char *src, size_t len, char *dst, size_t cap)
{
    size_t o = 0;

    for (size_t i = 0; i < len; i++) {
        int c = (unsigned char)src[i];
        if (c == '%') {
            int hi = i + 2 < len ? hex_value(src[i + 1]) : -1;
            int lo = hi >= 0 ? hex_value(src[i + 2]) : -1;
            if (hi < 0 || lo < 0)
                return 0;
            c = hi * 16 + lo;
            i += 2;
        } else if (c == '+') {
            c = ' ';
        }
        if (c == 0 || o + 1 >= cap)
            return 0;
        dst[o++] = (char)c;
    }
    dst[o] = '\0';
    return 1;
}

/* GET /v1/datakeys?key=K&state=S&cursor=C&limit=N: key required, the rest
 * optional, nothing else allowed.  0 after writing an error reply. */
static int take_list_query(const char *query, kms_call *call, kms_reply *r)
{
    static const char *const names[] = {"key", "state", "cursor", "limit"};
    char seen[4] = {0}, name[16], value[PARAM_MAX];
    const char *p = query != NULL ? query : "";
    char *end = NULL;
    unsigned long long limit;

    call->state = -1;
    call->limit = KMS_DEK_LIST_DEFAULT;
    while (*p != '\0') {
        size_t seg = strcspn(p, "&"), nlen = strcspn(p, "=");
        size_t which = sizeof(names) / sizeof(names[0]);

        if (seg == 0) { /* "a=1&&b=2", a trailing '&' */
            p++;
            continue;
        }
        if (nlen >= seg || nlen == 0) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                            "malformed query string: expected name=value pairs");
            return 0;
        }
        if (!query_decode(p, nlen, name, sizeof(name)))
            snprintf(name, sizeof(name), "?");
        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++)
            if (strcmp(names[i], name) == 0)
                which = i;
        if (which == sizeof(names) / sizeof(names[0])) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                            "unknown query parameter '%.*s'; allowed: key, state, cursor, limit",
                            (int)(nlen > 64 ? 64 : nlen), p);
            return 0;
        }
        if (seen[which]++) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "query parameter '%s' given twice",
                            names[which]);
            return 0;
        }
        if (!query_decode(p + nlen + 1, seg - nlen - 1, value, sizeof(value))) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                            "query parameter '%s': malformed percent-encoding or too long",
                            names[which]);
            return 0;
        }
        switch (which) {
        case 0:
            if (!take_name(value, call, r))
                return 0;
            break;
        case 1:
            call->state = kms_dek_state_parse(value);
            if (call->state < 0) {
                kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                                "state must be one of active, revoked, destroyed");
                return 0;
            }
            break;
        case 2:
            if (value[0] != '\0' && !uuid_valid(value)) {
                kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                                "cursor must be the 'next' value of a previous page (a dek_id)");
                return 0;
            }
            snprintf(call->cursor, sizeof(call->cursor), "%.36s", value);
            break;
        default:
            errno = 0;
            limit = value[0] >= '0' && value[0] <= '9' ? strtoull(value, &end, 10) : 0;
            if (end == NULL || *end != '\0' || errno != 0 || limit < 1 ||
                limit > KMS_DEK_LIST_MAX) {
                kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "limit must be an integer from 1 to %d",
                                KMS_DEK_LIST_MAX);
                return 0;
            }
            call->limit = (size_t)limit;
            break;
        }
        p += seg;
        if (*p == '&')
            p++;
    }
    if (!seen[0]) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "missing query parameter 'key'");
        return 0;
    }
    return 1;
}

/* GET /v1/audit?after=SEQ&limit=N: both optional, nothing else allowed.
 * 0 after writing an error reply. */
static int take_audit_query(const char *query, kms_call *call, kms_reply *r)
{
    static const char *const names[] = {"after", "limit"};
    char seen[2] = {0}, name[16], value[32];
    const char *p = query != NULL ? query : "";
    unsigned long long v;
    char *end;

    call->after = 0;
    call->limit = KMS_AUDIT_LIST_DEFAULT;
    while (*p != '\0') {
        size_t seg = strcspn(p, "&"), nlen = strcspn(p, "="), which = 2;

        if (seg == 0) {
            p++;
            continue;
        }
        if (nlen >= seg || nlen == 0 || !query_decode(p, nlen, name, sizeof(name))) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                            "malformed query string: expected after=SEQ and/or limit=N");
            return 0;
        }
        for (size_t i = 0; i < 2; i++)
            if (strcmp(names[i], name) == 0)
                which = i;
        if (which == 2) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                            "unknown query parameter '%.*s'; allowed: after, limit",
                            (int)(nlen > 64 ? 64 : nlen), p);
            return 0;
        }
        if (seen[which]++) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "query parameter '%s' given twice",
                            names[which]);
            return 0;
        }
        end = NULL;
        errno = 0;
        v = 0;
        if (query_decode(p + nlen + 1, seg - nlen - 1, value, sizeof(value)) &&
            value[0] >= '0' && value[0] <= '9')
            v = strtoull(value, &end, 10);
        if (end == NULL || *end != '\0' || errno != 0 || v > (unsigned long long)INT64_MAX ||
            (which == 1 && (v < 1 || v > KMS_AUDIT_LIST_MAX))) {
            if (which == 0)
                kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                                "after must be a sequence number (a decimal integer >= 0)");
            else
                kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                                "limit must be an integer from 1 to %d", KMS_AUDIT_LIST_MAX);
            return 0;
        }
        if (which == 0)
            call->after = (uint64_t)v;
        else
            call->limit = (size_t)v;
        p += seg;
        if (*p == '&')
            p++;
    }
    return 1;
}

/* ---- key rotation bodies (issue 3) ---- */

#define REWRAP_BATCH_LIMIT 1000000 /* largest "batch" of one rewrap call */

/* POST /v1/keys/{name}/config: min_decrypt_version and/or rotation_period. */
static int take_config(json_t *body, kms_call *call, kms_reply *r)
{
    json_t *min = json_object_get(body, "min_decrypt_version");
    json_t *period = json_object_get(body, "rotation_period");

    call->min_decrypt_version = 0;
    call->rotation_period = -1;
    if (min == NULL && period == NULL) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                        "give min_decrypt_version, rotation_period or both");
        return 0;
    }
    if (min != NULL) {
        if (!json_is_integer(min) || json_integer_value(min) < 1 ||
            json_integer_value(min) > (json_int_t)UINT32_MAX) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                            "min_decrypt_version must be an integer from 1 to the key's "
                            "latest_version");
            return 0;
        }
        call->min_decrypt_version = (uint32_t)json_integer_value(min);
    }
    if (period != NULL) {
        if (json_is_string(period))
            call->rotation_period = kms_rotation_period_parse(json_string_value(period));
        if (!json_is_string(period) || call->rotation_period < 0) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                            "rotation_period must be \"0\" (off) or \"<n>d\", \"<n>h\", "
                            "\"<n>m\" or \"<n>s\", at most 3650 days");
            return 0;
        }
    }
    return 1;
}

/* POST /v1/keys/{name}/rewrap: optional "batch". */
static int take_batch(json_t *body, kms_call *call, kms_reply *r)
{
    json_t *b = json_object_get(body, "batch");

    call->batch = 0;
    if (b == NULL)
        return 1;
    if (!json_is_integer(b) || json_integer_value(b) < 1 ||
        json_integer_value(b) > REWRAP_BATCH_LIMIT) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "batch must be an integer from 1 to %d",
                        REWRAP_BATCH_LIMIT);
        return 0;
    }
    call->batch = (uint64_t)json_integer_value(b);
    return 1;
}

/* The {v} of DELETE /v1/keys/{name}/versions/{v}: 1..2^32-1, decimal,
 * no sign, no leading zero. */
static int take_version(const char *s, kms_call *call, kms_reply *r)
{
    unsigned long long v = 0;
    size_t len = strlen(s);

    if (len == 0 || len > 10 || s[0] < '1' || s[0] > '9' || strspn(s, "0123456789") != len ||
        (v = strtoull(s, NULL, 10)) > UINT32_MAX) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                        "version must be a decimal integer from 1 to 4294967295");
        return 0;
    }
    call->version = (uint32_t)v;
    return 1;
}

static void refused(const kms_request_info *in, kms_reply *r)
{
    const char *why = in->refused;
    route_match m;

    r->close = 1;
    if (strcmp(why, KMS_FRAMING_TOO_LARGE) == 0) {
        kms_reply_error(r, P11KMS_ERR_PAYLOAD_TOO_LARGE, "request body exceeds %zu bytes",
                        in->max_body);
    } else if (strcmp(why, KMS_FRAMING_CHUNKED) == 0) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST,
                        "Transfer-Encoding is not accepted; send the body with Content-Length");
    } else if (strcmp(why, KMS_FRAMING_UNEXPECTED_BODY) == 0) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "method %s takes no request body", in->method);
    } else if (strcmp(why, KMS_FRAMING_BUSY) == 0) {
        kms_reply_error(r, P11KMS_ERR_OVERLOADED, "too many connections; retry later");
    } else if (strcmp(why, KMS_FRAMING_HEAD_TOO_LARGE) == 0) {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "request head too large");
    } else if (strcmp(why, KMS_FRAMING_METHOD) == 0) {
        find_route(NULL, in->path, &m);
        if (m.path_known) {
            kms_reply_error(r, P11KMS_ERR_METHOD_NOT_ALLOWED, "method not allowed; use %s",
                            m.allow);
            snprintf(r->allow, sizeof(r->allow), "%s", m.allow);
        } else {
            kms_reply_error(r, P11KMS_ERR_NOT_FOUND, "no such route");
        }
    } else {
        kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "malformed HTTP request");
    }
}

void kms_routes_prepare(const kms_request_info *in, kms_call **out, kms_reply *r)
{
    static const char *const f_name[] = {"name", NULL};
    static const char *const f_context[] = {"context", NULL};
    static const char *const f_reason[] = {"reason", NULL};
    static const char *const f_bulk_revoke[] = {"key", "context", "reason", NULL};
    static const char *const f_bulk_destroy[] = {"key", "context", NULL};
    static const char *const f_none[] = {NULL};
    static const char *const f_config[] = {"min_decrypt_version", "rotation_period", NULL};
    static const char *const f_rewrap[] = {"batch", NULL};
    route_match m;
    kms_call *call = NULL;
    json_t *body = NULL, *name;

    *out = NULL;
    if (in->refused != NULL) {
        refused(in, r);
        goto out;
    }
    find_route(in->method, in->path, &m);
    if (!m.path_known) {
        kms_reply_error(r, P11KMS_ERR_NOT_FOUND, "no such route");
        goto out;
    }
    if (m.route == NULL) {
        kms_reply_error(r, P11KMS_ERR_METHOD_NOT_ALLOWED, "method %s not allowed; use %s",
                        in->method, m.allow);
        snprintf(r->allow, sizeof(r->allow), "%s", m.allow);
        goto out;
    }
    if (m.route->id == R_LATER) {
        kms_reply_error(r, P11KMS_ERR_NOT_FOUND, "not implemented yet");
        goto out;
    }
    call = calloc(1, sizeof(*call));
    if (call == NULL) {
        kms_reply_error(r, P11KMS_ERR_NO_MEMORY, "out of memory");
        goto out;
    }
    call->route = m.route;
    switch (m.route->id) {
    case R_KEY_CREATE:
        parse_body(in, f_name, 0, &body, r);
        if (body == NULL)
            goto fail;
        name = json_object_get(body, "name");
        if (name == NULL) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "missing field 'name'");
            goto fail;
        }
        if (!json_is_string(name)) {
            kms_reply_error(r, P11KMS_ERR_BAD_REQUEST, "field 'name' must be a string");
            goto fail;
        }
        if (!take_name(json_string_value(name), call, r))
            goto fail;
        break;
    case R_KEY_SHOW:
        if (!take_name(m.params[0], call, r))
            goto fail;
        break;
    case R_DATAKEY_GENERATE:
    case R_DATAKEY_DECRYPT:
        if (m.route->id == R_DATAKEY_GENERATE) {
            if (!take_name(m.params[0], call, r))
                goto fail;
        } else if (!take_dek_id(m.params[0], call, r)) {
            goto fail;
        }
        parse_body(in, f_context, 1, &body, r);
        if (body == NULL || !take_context(body, &call->context, r))
            goto fail;
        break;
    case R_DATAKEY_SHOW:
    case R_DATAKEY_DESTROY:
        if (!take_dek_id(m.params[0], call, r))
            goto fail;
        break;
    case R_DATAKEY_REVOKE:
        if (!take_dek_id(m.params[0], call, r))
            goto fail;
        parse_body(in, f_reason, 0, &body, r);
        if (body == NULL || !take_reason(body, call, r))
            goto fail;
        break;
    case R_DATAKEY_LIST:
        if (!take_list_query(in->query, call, r))
            goto fail;
        break;
    case R_DATAKEY_BULK_REVOKE:
    case R_DATAKEY_BULK_DESTROY:
        parse_body(in, m.route->id == R_DATAKEY_BULK_REVOKE ? f_bulk_revoke : f_bulk_destroy, 0,
                   &body, r);
        if (body == NULL || !take_bulk(body, call, r))
            goto fail;
        break;
    case R_KEY_ROTATE:
    case R_KEY_DISABLE:
    case R_KEY_ENABLE:
        if (!take_name(m.params[0], call, r))
            goto fail;
        parse_body(in, f_none, 1, &body, r); /* no body, or {} */
        if (body == NULL)
            goto fail;
        break;
    case R_KEY_CONFIG:
        if (!take_name(m.params[0], call, r))
            goto fail;
        parse_body(in, f_config, 0, &body, r);
        if (body == NULL || !take_config(body, call, r))
            goto fail;
        break;
    case R_KEY_REWRAP:
        if (!take_name(m.params[0], call, r))
            goto fail;
        parse_body(in, f_rewrap, 1, &body, r);
        if (body == NULL || !take_batch(body, call, r))
            goto fail;
        break;
    case R_KEY_RETIRE:
        if (!take_name(m.params[0], call, r) || !take_version(m.params[1], call, r))
            goto fail;
        break;
    case R_AUDIT_LIST:
        if (!take_audit_query(in->query, call, r))
            goto fail;
        break;
    default: break;
    }
    *out = call;
    call = NULL;
    goto out;
fail:
    kms_call_free(call);
    call = NULL;
out:
    json_decref(body);
}

const char *kms_call_name(const kms_call *call)
{
    return call != NULL ? call->route->name : "-";
}

void kms_call_access_get(const kms_call *call, kms_call_access *out)
{
    memset(out, 0, sizeof(*out));
    switch (call->route->id) {
    case R_HEALTH: return; /* open to every connected principal */
    case R_DATAKEY_GENERATE: out->op = KMS_OP_GENERATE; break;
    case R_DATAKEY_DECRYPT: out->op = KMS_OP_DECRYPT; break;
    default: out->op = KMS_OP_ADMIN; break;
    }
    if (call->dek_id[0] != '\0')
        out->dek_id = call->dek_id;
    else if (call->name[0] != '\0')
        out->key = call->name;
}

void kms_call_free(kms_call *call)
{
    if (call == NULL)
        return;
    kms_dek_op_free(call->op);
    json_decref(call->context);
    free(call);
}

/* ---- rendering ---- */

static json_t *time_string(int64_t t)
{
    char buf[32];
    struct tm tm;
    time_t tt = (time_t)t;

    if (gmtime_r(&tt, &tm) == NULL || strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
        return json_string("1970-01-01T00:00:00Z");
    return json_string(buf);
}

static json_t *period_string(int64_t seconds)
{
    char buf[32];

    if (seconds <= 0)
        return json_string("0");
    if (seconds % 86400 == 0)
        snprintf(buf, sizeof(buf), "%lldd", (long long)(seconds / 86400));
    else if (seconds % 3600 == 0)
        snprintf(buf, sizeof(buf), "%lldh", (long long)(seconds / 3600));
    else if (seconds % 60 == 0)
        snprintf(buf, sizeof(buf), "%lldm", (long long)(seconds / 60));
    else
        snprintf(buf, sizeof(buf), "%llds", (long long)seconds);
    return json_string(buf);
}

static json_t *key_object(const kms_key_rec *k)
{
    json_t *versions = json_array(), *obj;

    for (size_t i = 0; versions != NULL && i < k->n_versions; i++) {
        const kms_version_rec *v = &k->versions[i];
        json_array_append_new(
            versions, json_pack("{s:I,s:s,s:o,s:I}", "version", (json_int_t)v->version, "state",
                                kms_version_state_name(v->state), "created",
                                time_string(v->created), "dek_count", (json_int_t)v->dek_count));
    }
    obj = json_pack("{s:s,s:s,s:I,s:I,s:o,s:o,s:o}", "name", k->name, "state",
                    kms_key_state_name(k->state), "latest_version", (json_int_t)k->latest_version,
                    "min_decrypt_version", (json_int_t)k->min_decrypt_version, "rotation_period",
                    period_string(k->rotation_period), "created", time_string(k->created),
                    "versions", versions);
    return obj;
}

/* A time, or null when unset (0). */
static json_t *time_or_null(int64_t t)
{
    return t > 0 ? time_string(t) : json_null();
}

/* The DEK object: metadata only, never plaintext nor wrapped bytes. */
static json_t *dek_object(const kms_dek_rec *d)
{
    const char *reason = kms_revoke_reason_name(d->revoke_reason);
    json_t *ctx = json_loads(d->context != NULL ? d->context : "{}", 0, NULL);

    if (ctx == NULL || !json_is_object(ctx)) {
        LOG_ERROR("http", "data key %s: stored context is not a JSON object", d->id);
        json_decref(ctx);
        ctx = json_object();
    }
    return json_pack("{s:s,s:s,s:I,s:s,s:o,s:o,s:o,s:o,s:o}", "dek_id", d->id, "key", d->key,
                     "version", (json_int_t)d->version, "state", kms_dek_state_name(d->state),
                     "context", ctx, "created", time_string(d->created), "revoked_at",
                     time_or_null(d->revoked_at), "revoke_reason",
                     reason != NULL ? json_string(reason) : json_null(), "destroyed_at",
                     time_or_null(d->destroyed_at));
}

static json_t *dek_page(kms_dek_rec **deks, size_t n, const char *next)
{
    json_t *list = json_array();

    for (size_t i = 0; list != NULL && i < n; i++)
        json_array_append_new(list, dek_object(deks[i]));
    if (list == NULL)
        return NULL;
    return json_pack("{s:o,s:o}", "datakeys", list, "next",
                     next[0] != '\0' ? json_string(next) : json_null());
}

/* Render a data key with its plaintext and wipe every copy but the body. */
static void reply_datakey(kms_reply *r, int status, const kms_datakey *dk)
{
    unsigned char b64[((KMS_DEK_LEN + 2) / 3) * 4 + 1];
    int b64_len;
    json_t *obj = NULL, *pt = NULL;

    b64_len = EVP_EncodeBlock(b64, dk->plaintext, KMS_DEK_LEN);
    pt = json_stringn_nocheck((const char *)b64, (size_t)b64_len);
    OPENSSL_cleanse(b64, sizeof(b64));
    if (pt == NULL)
        goto out;
    obj = json_pack("{s:s,s:s,s:I,s:O}", "dek_id", dk->id, "key", dk->key, "version",
                    (json_int_t)dk->version, "plaintext", pt);
    if (obj == NULL)
        goto out;
    json_incref(obj);
    reply_json(r, status, obj); /* steals one reference */
out:
    if (pt != NULL) {
        /* jansson's own copy of the string; wiping it is why we cast. */
        OPENSSL_cleanse((void *)(uintptr_t)json_string_value(pt), json_string_length(pt));
        json_decref(pt);
    }
    if (obj != NULL)
        json_decref(obj);
    else
        kms_reply_error(r, P11KMS_ERR_NO_MEMORY, "out of memory");
}

static void core_error(kms_reply *r, const kms_call *call, p11kms_status s)
{
    switch (s) {
    case P11KMS_ERR_KEY_EXISTS: kms_reply_error(r, s, "key '%s' already exists", call->name); break;
    case P11KMS_ERR_KEY_NOT_FOUND:
        if (call->route->id == R_KEY_RETIRE)
            kms_reply_error(r, s, "key '%s' has no version %u", call->name, call->version);
        else
            kms_reply_error(r, s, "key '%s' not found", call->name);
        break;
    case P11KMS_ERR_KEY_VERSION_IN_USE:
        kms_reply_error(r, s,
                        "version %u of key '%s' is the latest version or live data keys still "
                        "use it (rewrap them first)",
                        call->version, call->name);
        break;
    case P11KMS_ERR_DEK_NOT_FOUND:
        kms_reply_error(r, s, "data key %s not found", call->dek_id);
        break;
    case P11KMS_ERR_CONTEXT_MISMATCH:
        kms_reply_error(r, s, "context does not match the data key's context");
        break;
    case P11KMS_ERR_DEK_REVOKED:
        kms_reply_error(r, s, "data key %s is revoked", call->dek_id);
        break;
    case P11KMS_ERR_DEK_DESTROYED:
        kms_reply_error(r, s, "data key %s is destroyed", call->dek_id);
        break;
    case P11KMS_ERR_KEY_DISABLED: kms_reply_error(r, s, "key is disabled"); break;
    case P11KMS_ERR_VERSION_BELOW_MINIMUM:
        kms_reply_error(r, s, "key version is below the key's min_decrypt_version");
        break;
    case P11KMS_ERR_INTEGRITY_FAILURE:
        kms_reply_error(r, s, "stored data key failed authentication");
        break;
    case P11KMS_ERR_BAD_REQUEST:
        if (call->route->id == R_KEY_CONFIG)
            kms_reply_error(r, s, "min_decrypt_version must be from 1 to the key's "
                                  "latest_version");
        else
            kms_reply_error(r, s, "bad request");
        break;
    default: kms_reply_error(r, s, "%s", p11kms_strerror(s)); break;
    }
    if (r->status >= 500)
        LOG_ERROR("http", "%s: %s", call->route->name, p11kms_status_code(s));
}

/* An audit entry: what was done, never a secret (docs/audit.md). */
static json_t *audit_object(const kms_audit_entry *e)
{
    return json_pack("{s:I,s:o,s:s,s:s,s:o,s:o,s:o,s:s,s:o}", "seq", (json_int_t)e->seq, "time",
                     time_string(e->time), "principal", e->principal, "operation", e->operation,
                     "key", e->key[0] != '\0' ? json_string(e->key) : json_null(), "version",
                     e->version != 0 ? json_integer(e->version) : json_null(), "dek_id",
                     e->dek_id[0] != '\0' ? json_string(e->dek_id) : json_null(), "result",
                     kms_audit_result_name(e->result), "error_code",
                     e->error_code[0] != '\0' ? json_string(e->error_code) : json_null());
}

static p11kms_status audit_list(kms_core *core, const kms_call *call, kms_reply *r)
{
    kms_audit_entry *entries = NULL;
    size_t n = 0;
    json_t *list;
    p11kms_status s = kms_audit_list(core, call->after, call->limit, &entries, &n);

    if (s != P11KMS_OK)
        return s;
    list = json_array();
    for (size_t i = 0; list != NULL && i < n; i++)
        json_array_append_new(list, audit_object(&entries[i]));
    reply_json(r, 200, list != NULL ? json_pack("{s:o}", "entries", list) : NULL);
    free(entries);
    return P11KMS_OK;
}

static p11kms_status audit_verify(kms_core *core, kms_reply *r)
{
    kms_audit_report rep;
    p11kms_status s = kms_audit_verify(core, &rep);

    if (s != P11KMS_OK)
        return s;
    if (rep.ok)
        reply_json(r, 200, json_pack("{s:b,s:I}", "ok", 1, "entries", (json_int_t)rep.entries));
    else
        reply_json(r, 200,
                   json_pack("{s:b,s:I,s:s,s:I}", "ok", 0, "first_bad", (json_int_t)rep.first_bad,
                             "reason", rep.reason, "entries", (json_int_t)rep.entries));
    return P11KMS_OK;
}

static void health(kms_core *core, kms_reply *r)
{
    CK_RV rv = p11_probe(kms_core_token(core));
    p11kms_status st = kms_store_ping(kms_core_store(core));
    int token_ok = rv == CKR_OK, store_ok = st == P11KMS_OK;
    json_t *obj;

    /* A broken audit chain does not make kmsd unhealthy: it keeps serving
     * (and appending) and says so here; /v1/audit/verify says where. */
    obj = json_pack("{s:s,s:s,s:s,s:s}", "status", token_ok && store_ok ? "ok" : "unavailable",
                    "token", token_ok ? "ok" : "unavailable", "store",
                    store_ok ? "ok" : "unavailable", "audit",
                    kms_core_audit_state(core) == KMS_AUDIT_STATE_BROKEN ? "broken" : "ok");
    if (obj != NULL && !(token_ok && store_ok)) {
        p11kms_status s = token_ok ? P11KMS_ERR_STORE_UNAVAILABLE : P11KMS_ERR_TOKEN_UNAVAILABLE;
        json_t *err = error_object(s, token_ok ? "store unavailable" : "token unavailable");
        json_object_update(obj, err);
        json_decref(err);
        LOG_WARN("http", "health: token %s (%s), store %s", token_ok ? "ok" : "unavailable",
                 p11_rv_name(rv), store_ok ? "ok" : "unavailable");
    }
    reply_json(r, token_ok && store_ok ? 200 : 503, obj);
}

/* GET /v1/status: the token, the store, the counts and the audit state
 * (the same one /v1/health reports).  A store that is down still gets a
 * 200 saying so, with null counts; any other failure is an error. */
static p11kms_status status(kms_core *core, kms_reply *r)
{
    p11_ctx *tok = kms_core_token(core);
    kms_store *st = kms_core_store(core);
    char label[33] = "";
    int present = p11_probe(tok) == CKR_OK;
    int have_label = p11_token_label(tok, label) == CKR_OK;
    int store_ok = kms_store_ping(st) == P11KMS_OK;
    kms_store_counts c;
    json_t *keys, *deks;
    p11kms_status s = kms_status_counts(core, &c);

    if (s == P11KMS_OK) {
        keys = json_integer((json_int_t)c.keys);
        deks = json_pack("{s:I,s:I,s:I}", "active", (json_int_t)c.deks_active, "revoked",
                         (json_int_t)c.deks_revoked, "destroyed", (json_int_t)c.deks_destroyed);
    } else if (!store_ok) {
        keys = json_null();
        deks = json_null();
    } else {
        return s;
    }
    reply_json(r, 200,
               json_pack("{s:{s:o,s:b,s:I},s:{s:s,s:b},s:o,s:o,s:s}", "token", "label",
                         have_label ? json_string(label) : json_null(), "present", present, "slot",
                         (json_int_t)p11_slot_id(tok), "store", "backend", kms_store_backend(st),
                         "ok", store_ok, "keys", keys, "datakeys", deks, "audit",
                         kms_core_audit_state(core) == KMS_AUDIT_STATE_BROKEN ? "broken" : "ok"));
    return P11KMS_OK;
}

void kms_routes_execute(kms_core *core, kms_call *call, kms_reply *r)
{
    kms_key_rec *key = NULL, **keys = NULL;
    kms_dek_rec *dek = NULL, **deks = NULL;
    size_t n_keys = 0, n_deks = 0;
    uint64_t count = 0;
    char next[KMS_DEK_ID_LEN + 1] = "";
    kms_datakey dk;
    json_t *list;
    uint64_t rewrapped = 0, remaining = 0, failed = 0;
    p11kms_status s = P11KMS_OK;

    memset(&dk, 0, sizeof(dk));
    switch (call->route->id) {
    case R_HEALTH: health(core, r); break;
    case R_KEY_CREATE:
    case R_KEY_SHOW:
        if (call->route->id == R_KEY_CREATE)
            s = kms_key_create(core, call->name, &key);
        else
            s = kms_key_show(core, call->name, &key);
        if (s != P11KMS_OK)
            break;
        reply_json(r, call->route->id == R_KEY_CREATE ? 201 : 200, key_object(key));
        break;
    case R_KEY_LIST:
        s = kms_key_list(core, &keys, &n_keys);
        if (s != P11KMS_OK)
            break;
        list = json_array();
        for (size_t i = 0; list != NULL && i < n_keys; i++)
            json_array_append_new(list, key_object(keys[i]));
        reply_json(r, 200, list != NULL ? json_pack("{s:o}", "keys", list) : NULL);
        break;
    case R_DATAKEY_GENERATE:
        s = kms_dek_generate(core, call->name, call->context, &dk);
        if (s == P11KMS_OK)
            reply_datakey(r, 201, &dk);
        break;
    case R_DATAKEY_DECRYPT:
        s = kms_dek_decrypt(core, call->dek_id, call->context, &dk);
        if (s == P11KMS_OK)
            reply_datakey(r, 200, &dk);
        break;
    case R_DATAKEY_SHOW:
        s = kms_dek_show(core, call->dek_id, &dek);
        if (s == P11KMS_OK)
            reply_json(r, 200, dek_object(dek));
        break;
    case R_DATAKEY_REVOKE:
        s = kms_dek_revoke(core, call->dek_id, call->reason, &dek);
        if (s == P11KMS_OK)
            reply_json(r, 200, dek_object(dek));
        break;
    case R_DATAKEY_DESTROY:
        s = kms_dek_destroy(core, call->dek_id, &dek);
        if (s == P11KMS_OK)
            reply_json(r, 200, dek_object(dek));
        break;
    case R_DATAKEY_LIST:
        s = kms_dek_list(core, call->name, call->state, call->cursor, call->limit, &deks, &n_deks,
                         next);
        if (s == P11KMS_OK)
            reply_json(r, 200, dek_page(deks, n_deks, next));
        break;
    case R_DATAKEY_BULK_REVOKE:
    case R_DATAKEY_BULK_DESTROY:
        if (call->route->id == R_DATAKEY_BULK_REVOKE)
            s = kms_dek_revoke_bulk(core, call->name, call->context, call->reason, &count);
        else
            s = kms_dek_destroy_bulk(core, call->name, call->context, &count);
        if (s == P11KMS_OK)
            reply_json(r, 200, json_pack("{s:I}", "count", (json_int_t)count));
        break;
    case R_KEY_ROTATE:
    case R_KEY_DISABLE:
    case R_KEY_ENABLE:
    case R_KEY_CONFIG:
    case R_KEY_RETIRE:
        if (call->route->id == R_KEY_ROTATE)
            s = kms_key_rotate(core, call->name, &key);
        else if (call->route->id == R_KEY_CONFIG)
            s = kms_key_configure(core, call->name, call->min_decrypt_version,
                                  call->rotation_period, &key);
        else if (call->route->id == R_KEY_RETIRE)
            s = kms_key_retire(core, call->name, call->version, &key);
        else
            s = kms_key_set_enabled(core, call->name, call->route->id == R_KEY_ENABLE, &key);
        if (s == P11KMS_OK)
            reply_json(r, 200, key_object(key));
        break;
    case R_KEY_REWRAP:
        s = kms_key_rewrap(core, call->name, call->batch, &rewrapped, &remaining, &failed);
        if (s == P11KMS_OK)
            reply_json(r, 200,
                       json_pack("{s:I,s:I,s:I}", "rewrapped", (json_int_t)rewrapped, "remaining",
                                 (json_int_t)remaining, "failed", (json_int_t)failed));
        break;
    case R_AUDIT_LIST: s = audit_list(core, call, r); break;
    case R_AUDIT_VERIFY: s = audit_verify(core, r); break;
    case R_STATUS: s = status(core, r); break;
    default: kms_reply_error(r, P11KMS_ERR_NOT_FOUND, "not implemented yet"); break;
    }
    if (s != P11KMS_OK)
        core_error(r, call, s);
    kms_datakey_clear(&dk);
    kms_dek_rec_free(dek);
    kms_dek_list_free(deks, n_deks);
    kms_key_rec_free(key);
    if (keys != NULL)
        kms_key_list_free(keys, n_keys);
}

int kms_routes_start(kms_core *core, kms_call *call, const kms_dek_rec *known,
                     kms_dek_op_done_fn done, void *arg)
{
    p11kms_status s;

    if (call->op != NULL)
        return 0;
    if (call->route->id == R_DATAKEY_GENERATE)
        s = kms_dek_generate_start(core, call->name, call->context, done, arg, &call->op);
    else if (call->route->id == R_DATAKEY_DECRYPT)
        s = kms_dek_decrypt_start(core, call->dek_id,
                                  known != NULL && strcmp(known->id, call->dek_id) == 0 ? known
                                                                                        : NULL,
                                  call->context, done, arg, &call->op);
    else
        return 0;
    if (s != P11KMS_OK) {
        kms_dek_op_free(call->op);
        call->op = NULL;
        return 0; /* out of memory: the synchronous call answers */
    }
    return 1;
}

int kms_routes_complete(kms_call *call, kms_reply *r)
{
    kms_datakey dk;
    int rerun = 0;
    p11kms_status s;

    memset(&dk, 0, sizeof(dk));
    s = kms_dek_op_result(call->op, &dk, &rerun);
    kms_dek_op_free(call->op);
    call->op = NULL;
    if (rerun)
        return 0;
    if (s == P11KMS_OK)
        reply_datakey(r, call->route->id == R_DATAKEY_GENERATE ? 201 : 200, &dk);
    else
        core_error(r, call, s);
    kms_datakey_clear(&dk);
    return 1;
}
