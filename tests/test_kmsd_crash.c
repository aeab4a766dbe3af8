/*
 * tests/test_kmsd_crash.c - SIGKILL crash cycles under mixed load against
 * the real kmsd, on one token and one store kept across the cycles.
 *
 * A cycle starts kmsd (sometimes killing it first in the middle of its
 * start-up, reconciliation included), checks everything earlier cycles
 * had acknowledged, runs N_CLIENTS client threads of mixed load over the
 * Unix socket (datakeys, decrypts, single and bulk revokes and destroys,
 * rotations, rewrap batches, retires) and kills kmsd with SIGKILL at a
 * random moment: after a random number of requests, plus a few random
 * microseconds, so that requests are in flight.  Everything random comes
 * from one seed (P11KMS_TEST_SEED repeats a run; every failure names it).
 *
 * Only acknowledged facts are recorded: a DEK whose 201 arrived (id,
 * plaintext, key, context), a revoke or destroy answered 200, a bulk
 * revoke or destroy answered 200 (it covers every DEK of its key and
 * context acknowledged before it was sent; one acknowledged while it ran
 * may or may not be covered), a rotation's version, a retire answered 200.
 * A request left without an answer by the kill may or may not have
 * happened ("maybe" states).  After each restart:
 *
 *  - every acknowledged DEK decrypts to exactly the same bytes, or answers
 *    403 dek_revoked / 410 dek_destroyed when that was acknowledged (or may
 *    have happened); a DEK the store lost is 404 and fails the test.  The
 *    DEKs touched in the last cycle and a random sample of the others are
 *    checked each cycle, all of them at the end;
 *  - each key's latest version is at least the last acknowledged rotation,
 *    and acknowledged retires are destroyed versions;
 *  - the KEK objects of the token (found with C_FindObjects, labels
 *    p11kms:<key>:v<n>) match the store after the start-up reconciliation:
 *    every active version has its object (same CKA_ID), no destroyed
 *    version kept its object, and an object without a version row is an
 *    orphan of an interrupted rotation with a creation intent that is
 *    younger than the 60 s grace (kms/core/core.c reconcile_orphans keeps
 *    those until a later start); no intent older than the grace survives;
 *  - /v1/health is 200 and says "audit":"ok" (kmsd verifies the chain at
 *    every start); every 4th cycle and at the end /v1/audit/verify is ok
 *    too and its entry count never goes down.
 *
 * What SoftHSM2 2.6.1 does with a kill -9 (not kmsd's doing):
 *  - it writes a new object's attributes one at a time, so a kill inside
 *    C_GenerateKey (most of a rotation's time) leaves a secret key without
 *    CKA_LABEL and CKA_ID, or one it cannot read back.  Nothing can find
 *    or use it; the test counts them;
 *  - every C_Login rewrites its token.object in place (truncate, write):
 *    a kill at that moment leaves it empty and the token is gone for good
 *    ("no token matches the URI").  kmsd logs in once, at start, so the
 *    start-up kills here wait until kmsd logged "token ready".
 *
 * Cycles: CRASH_CYCLES (fewer in the sanitizer build, half on PostgreSQL,
 * more with P11KMS_TEST_LONG=1; P11KMS_TEST_CRASH_CYCLES overrides), about
 * a minute each way on two cores.  The summary
 * lines give cycles, kills, acknowledged requests and the run time.
 * Client threads never call ck_assert: they record the first violation,
 * and the main thread fails with it once they are joined.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <inttypes.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kms/core/core.h"
#include "module/p11.h"
#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define SANITIZED 1
#endif
#endif
#ifndef SANITIZED
#define SANITIZED 0
#endif

#if SANITIZED
#define CRASH_CYCLES 35
#else
#define CRASH_CYCLES 50
#endif
#define CRASH_CYCLES_LONG 120

#define N_CLIENTS   4
#define N_KEYS      3
#define N_CUSTOMERS 24
#define MAX_VERSION 4096
#define SAMPLE_OLD  64                       /* untouched DEKs decrypted per cycle */
#define KILL_MIN    10                       /* requests sent before the kill: uniform in */
#define KILL_MAX    400                      /* [KILL_MIN, KILL_MAX] */
#define GRACE       KMS_INTENT_GRACE_DEFAULT /* of reconcile_orphans (kmsd's) */

static const char *const KEYS[N_KEYS] = {"crash-a", "crash-b", "crash-c"};

enum { S_ACTIVE, S_REVOKED, S_DESTROYED };
#define MAYBE_REVOKED   1
#define MAYBE_DESTROYED 2

/* One acknowledged DEK. */
typedef struct rec {
    char id[40];
    unsigned char pt[32];
    int key, customer;
    int state;           /* the strongest acknowledged state */
    int maybe;           /* MAYBE_*: may have happened without an answer */
    int pending_revoke;  /* single revokes in flight */
    int pending_destroy; /* single destroys in flight */
    uint64_t ack_ev;     /* event number of its 201 */
    int touched;         /* since the last verification */
} rec;

/* One bulk revoke/destroy that was answered, or got no answer. */
typedef struct bulk_op {
    int destroy;
    int key, customer;
    uint64_t send_ev, ack_ev; /* ack_ev UINT64_MAX: no answer */
} bulk_op;

typedef struct stats {
    uint64_t acked, generated, decrypted, revoked, destroyed, bulk, rotated, rewrapped, retired,
        refused_in_use;
} stats;

/* Shared by the client threads; mu guards everything but the atomics. */
static struct {
    pthread_mutex_t mu;
    rec *recs;
    size_t n, cap;
    bulk_op *bulks;
    size_t n_bulks, cap_bulks;
    int bulk_inflight[N_KEYS][N_CUSTOMERS][2];
    uint64_t ev;
    uint32_t latest[N_KEYS];                        /* highest version seen in an answer */
    uint32_t ack_rotated[N_KEYS];                   /* highest version a rotate answered */
    unsigned char retired[N_KEYS][MAX_VERSION + 1]; /* retire answered 200 */
    stats st;
    char failure[2048];
    atomic_int failed;
    atomic_int killing; /* from now on, no answer is fine */
    atomic_int stop;
    atomic_ullong sent;
    atomic_ullong answered; /* requests that got an HTTP answer */
} W;

static kh_kmsd K;
static unsigned seed;
static int cycle;

/* ---- randomness (splitmix64: one seed, one stream per thread) ---------- */

static uint64_t rnd_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static unsigned rnd_below(uint64_t *s, unsigned n)
{
    return n == 0 ? 0 : (unsigned)(rnd_next(s) % n);
}

/* ---- failures ------------------------------------------------------------ */

static void violation(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Record the first violation (any thread); the main thread fails with it. */
static void violation(const char *fmt, ...)
{
    va_list ap;
    int expected = 0;

    if (!atomic_compare_exchange_strong(&W.failed, &expected, 1))
        return;
    va_start(ap, fmt);
    vsnprintf(W.failure, sizeof(W.failure), fmt, ap);
    va_end(ap);
    fprintf(stderr, "test_kmsd_crash: seed %u, cycle %d: %s\n", seed, cycle, W.failure);
}

static void assert_no_failure(void)
{
    ck_assert_msg(!atomic_load(&W.failed), "seed %u (P11KMS_TEST_SEED), cycle %d: %s", seed, cycle,
                  W.failure);
}

/* ---- requests -------------------------------------------------------------- */

typedef struct answer {
    long status; /* 0: no HTTP answer */
    json_t *body;
    char code[64]; /* error.code, or "" */
} answer;

static void request(CURL *c, const char *method, const char *path, const char *body, answer *a)
{
    kh_response r;
    json_error_t jerr;
    const char *code;

    memset(a, 0, sizeof(*a));
    atomic_fetch_add(&W.sent, 1);
    if (kh_request_h(c, K.sock, method, path, body, body != NULL ? strlen(body) : 0, NULL, &r) !=
        0) {
        if (!atomic_load(&W.killing))
            violation("%s %s: no answer while kmsd should be running", method, path);
        return;
    }
    atomic_fetch_add(&W.answered, 1);
    a->status = r.status;
    a->body = json_loadb(r.body, r.len, 0, &jerr);
    if (a->body == NULL)
        violation("%s %s: %ld, body is not JSON: %.200s", method, path, r.status, r.body);
    code = json_string_value(json_object_get(json_object_get(a->body, "error"), "code"));
    snprintf(a->code, sizeof(a->code), "%s", code != NULL ? code : "");
    kh_response_free(&r);
}

static void answer_free(answer *a)
{
    json_decref(a->body);
    a->body = NULL;
}

static void unexpected(const char *what, const answer *a)
{
    char *text = a->body != NULL ? json_dumps(a->body, JSON_COMPACT) : NULL;

    violation("%s: unexpected answer %ld %s", what, a->status, text != NULL ? text : "");
    free(text);
}

/* ---- the records ------------------------------------------------------------ */

/* Caller holds mu.  A bulk op covers rec r for sure, maybe, or not. */
static void bulk_apply(const bulk_op *b, rec *r, int sure)
{
    if (r->key != b->key || r->customer != b->customer)
        return;
    r->touched = 1;
    if (!sure) {
        r->maybe |= b->destroy ? MAYBE_DESTROYED : MAYBE_REVOKED;
        return;
    }
    if (b->destroy)
        r->state = S_DESTROYED;
    else if (r->state == S_ACTIVE)
        r->state = S_REVOKED;
}

/* A 201: record the DEK; bulk ops answered while it was in flight may
 * cover it. */
static void rec_add(const char *id, const unsigned char pt[32], int key, int customer,
                    uint64_t send_ev)
{
    rec *r;

    pthread_mutex_lock(&W.mu);
    if (W.n == W.cap) {
        size_t cap = W.cap ? W.cap * 2 : 1024;
        rec *p = realloc(W.recs, cap * sizeof(*p));

        if (p == NULL) {
            pthread_mutex_unlock(&W.mu);
            violation("out of memory");
            return;
        }
        W.recs = p;
        W.cap = cap;
    }
    r = &W.recs[W.n];
    memset(r, 0, sizeof(*r));
    snprintf(r->id, sizeof(r->id), "%s", id);
    memcpy(r->pt, pt, 32);
    r->key = key;
    r->customer = customer;
    r->state = S_ACTIVE;
    r->ack_ev = ++W.ev;
    r->touched = 1;
    for (size_t i = 0; i < W.n_bulks; i++)
        if (W.bulks[i].ack_ev > send_ev)
            bulk_apply(&W.bulks[i], r, 0);
    W.n++;
    W.st.generated++;
    W.st.acked++;
    pthread_mutex_unlock(&W.mu);
}

/* Copy of a random record's identity, or -1 when there is none. */
static long rec_pick(uint64_t *rs, rec *out)
{
    long i = -1;

    pthread_mutex_lock(&W.mu);
    if (W.n > 0) {
        i = (long)rnd_below(rs, (unsigned)W.n);
        *out = W.recs[i];
    }
    pthread_mutex_unlock(&W.mu);
    return i;
}

/* ---- the load ---------------------------------------------------------------- */

static void do_generate(CURL *c, uint64_t *rs)
{
    int key = (int)rnd_below(rs, N_KEYS), customer = (int)rnd_below(rs, N_CUSTOMERS);
    char path[128], body[128];
    unsigned char pt[48];
    uint64_t send_ev;
    answer a;
    json_t *v;

    snprintf(path, sizeof(path), "/v1/keys/%s/datakeys", KEYS[key]);
    snprintf(body, sizeof(body), "{\"context\":{\"customer\":\"%d\",\"app\":\"crash\"}}", customer);
    pthread_mutex_lock(&W.mu);
    send_ev = ++W.ev;
    pthread_mutex_unlock(&W.mu);
    request(c, "POST", path, body, &a);
    if (a.status == 0)
        goto out;
    if (a.status != 201) {
        unexpected("datakey", &a);
        goto out;
    }
    v = json_object_get(a.body, "version");
    if (!json_is_string(json_object_get(a.body, "dek_id")) || !json_is_integer(v) ||
        ku_b64_key(json_string_value(json_object_get(a.body, "plaintext")), pt) != 32) {
        unexpected("datakey (malformed)", &a);
        goto out;
    }
    rec_add(json_string_value(json_object_get(a.body, "dek_id")), pt, key, customer, send_ev);
    pthread_mutex_lock(&W.mu);
    if ((uint32_t)json_integer_value(v) > W.latest[key])
        W.latest[key] = (uint32_t)json_integer_value(v);
    pthread_mutex_unlock(&W.mu);
out:
    OPENSSL_cleanse(pt, sizeof(pt));
    answer_free(&a);
}

static void do_decrypt(CURL *c, uint64_t *rs)
{
    rec r;
    long i = rec_pick(rs, &r);
    char path[128], body[128];
    unsigned char pt[48];
    answer a;

    if (i < 0)
        return;
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", r.id);
    snprintf(body, sizeof(body), "{\"context\":{\"app\":\"crash\",\"customer\":\"%d\"}}",
             r.customer);
    request(c, "POST", path, body, &a);
    if (a.status == 0)
        goto out;
    pthread_mutex_lock(&W.mu);
    {
        const rec *now = &W.recs[i];

        if (a.status == 200) {
            if (ku_b64_key(json_string_value(json_object_get(a.body, "plaintext")), pt) != 32 ||
                memcmp(pt, r.pt, 32) != 0)
                violation("decrypt %s: 200 with other bytes than the datakey's", r.id);
            else if (r.state != S_ACTIVE)
                violation("decrypt %s: 200 although its %s was acknowledged before", r.id,
                          r.state == S_REVOKED ? "revocation" : "destruction");
            W.st.decrypted++;
            W.st.acked++;
        } else if (a.status == 403 && strcmp(a.code, "dek_revoked") == 0) {
            if (now->state == S_ACTIVE && !(now->maybe & MAYBE_REVOKED) &&
                now->pending_revoke == 0 && W.bulk_inflight[r.key][r.customer][0] == 0)
                violation("decrypt %s: dek_revoked, but no revocation was made", r.id);
        } else if (a.status == 410 && strcmp(a.code, "dek_destroyed") == 0) {
            if (now->state != S_DESTROYED && !(now->maybe & MAYBE_DESTROYED) &&
                now->pending_destroy == 0 && W.bulk_inflight[r.key][r.customer][1] == 0)
                violation("decrypt %s: dek_destroyed, but no destroy was made", r.id);
        } else {
            pthread_mutex_unlock(&W.mu);
            unexpected("decrypt", &a);
            goto out;
        }
    }
    pthread_mutex_unlock(&W.mu);
out:
    OPENSSL_cleanse(pt, sizeof(pt));
    answer_free(&a);
}

static void do_single(CURL *c, uint64_t *rs, int destroy)
{
    static const char *const reasons[] = {"compromised", "superseded", "cessation", "unspecified"};
    rec r;
    long i = rec_pick(rs, &r);
    char path[128], body[64];
    answer a;
    rec *now;

    if (i < 0)
        return;
    snprintf(path, sizeof(path), destroy ? "/v1/datakeys/%s" : "/v1/datakeys/%s/revoke", r.id);
    snprintf(body, sizeof(body), "{\"reason\":\"%s\"}", reasons[rnd_below(rs, 4)]);
    pthread_mutex_lock(&W.mu);
    if (destroy)
        W.recs[i].pending_destroy++;
    else
        W.recs[i].pending_revoke++;
    pthread_mutex_unlock(&W.mu);
    request(c, destroy ? "DELETE" : "POST", path, destroy ? NULL : body, &a);
    pthread_mutex_lock(&W.mu);
    now = &W.recs[i];
    if (destroy)
        now->pending_destroy--;
    else
        now->pending_revoke--;
    now->touched = 1;
    if (a.status == 0) {
        now->maybe |= destroy ? MAYBE_DESTROYED : MAYBE_REVOKED;
    } else if (a.status == 200) {
        if (r.state == S_DESTROYED) /* acknowledged before this was sent */
            violation("%s %s: 200 although its destruction was acknowledged before",
                      destroy ? "destroy" : "revoke", r.id);
        if (destroy)
            now->state = S_DESTROYED;
        else if (now->state == S_ACTIVE)
            now->state = S_REVOKED;
        if (destroy)
            W.st.destroyed++;
        else
            W.st.revoked++;
        W.st.acked++;
    } else if (a.status == 410 && strcmp(a.code, "dek_destroyed") == 0) {
        if (now->state != S_DESTROYED && !(now->maybe & MAYBE_DESTROYED) &&
            now->pending_destroy == 0 && W.bulk_inflight[r.key][r.customer][1] == 0)
            violation("%s %s: dek_destroyed, but no destroy was made",
                      destroy ? "destroy" : "revoke", r.id);
    } else {
        pthread_mutex_unlock(&W.mu);
        unexpected(destroy ? "destroy" : "revoke", &a);
        goto out;
    }
    pthread_mutex_unlock(&W.mu);
out:
    answer_free(&a);
}

static void do_bulk(CURL *c, uint64_t *rs, int destroy)
{
    bulk_op b;
    char body[160];
    answer a;

    memset(&b, 0, sizeof(b));
    b.destroy = destroy;
    b.key = (int)rnd_below(rs, N_KEYS);
    b.customer = (int)rnd_below(rs, N_CUSTOMERS);
    snprintf(body, sizeof(body), "{\"key\":\"%s\",\"context\":{\"customer\":\"%d\"}%s}",
             KEYS[b.key], b.customer, destroy ? "" : ",\"reason\":\"cessation\"");
    pthread_mutex_lock(&W.mu);
    b.send_ev = ++W.ev;
    W.bulk_inflight[b.key][b.customer][destroy]++;
    pthread_mutex_unlock(&W.mu);
    request(c, "POST", destroy ? "/v1/datakeys/destroy" : "/v1/datakeys/revoke", body, &a);
    pthread_mutex_lock(&W.mu);
    W.bulk_inflight[b.key][b.customer][destroy]--;
    if (a.status != 0 && (a.status != 200 || !json_is_integer(json_object_get(a.body, "count")))) {
        pthread_mutex_unlock(&W.mu);
        unexpected(destroy ? "bulk destroy" : "bulk revoke", &a);
        goto out;
    }
    b.ack_ev = a.status == 200 ? ++W.ev : UINT64_MAX;
    for (size_t i = 0; i < W.n; i++)
        bulk_apply(&b, &W.recs[i], a.status == 200 && W.recs[i].ack_ev < b.send_ev);
    if (W.n_bulks == W.cap_bulks) {
        size_t cap = W.cap_bulks ? W.cap_bulks * 2 : 64;
        bulk_op *p = realloc(W.bulks, cap * sizeof(*p));

        if (p == NULL) {
            pthread_mutex_unlock(&W.mu);
            violation("out of memory");
            goto out;
        }
        W.bulks = p;
        W.cap_bulks = cap;
    }
    W.bulks[W.n_bulks++] = b;
    if (a.status == 200) {
        W.st.bulk++;
        W.st.acked++;
    }
    pthread_mutex_unlock(&W.mu);
out:
    answer_free(&a);
}

static void do_rotate(CURL *c, uint64_t *rs)
{
    int key = (int)rnd_below(rs, N_KEYS);
    char path[128];
    answer a;
    json_int_t v;

    snprintf(path, sizeof(path), "/v1/keys/%s/rotate", KEYS[key]);
    request(c, "POST", path, NULL, &a);
    if (a.status == 0)
        goto out;
    v = json_integer_value(json_object_get(a.body, "latest_version"));
    if (a.status != 200 || v < 2 || v > MAX_VERSION) {
        unexpected("rotate", &a);
        goto out;
    }
    pthread_mutex_lock(&W.mu);
    if ((uint32_t)v > W.ack_rotated[key])
        W.ack_rotated[key] = (uint32_t)v;
    if ((uint32_t)v > W.latest[key])
        W.latest[key] = (uint32_t)v;
    W.st.rotated++;
    W.st.acked++;
    pthread_mutex_unlock(&W.mu);
out:
    answer_free(&a);
}

static void do_rewrap(CURL *c, uint64_t *rs)
{
    int key = (int)rnd_below(rs, N_KEYS);
    char path[128];
    answer a;

    snprintf(path, sizeof(path), "/v1/keys/%s/rewrap", KEYS[key]);
    request(c, "POST", path, "{\"batch\":25}", &a);
    if (a.status == 0)
        goto out;
    if (a.status != 200 || !json_is_integer(json_object_get(a.body, "rewrapped"))) {
        unexpected("rewrap", &a);
        goto out;
    }
    pthread_mutex_lock(&W.mu);
    W.st.rewrapped++;
    W.st.acked++;
    pthread_mutex_unlock(&W.mu);
out:
    answer_free(&a);
}

static void do_retire(CURL *c, uint64_t *rs)
{
    int key = (int)rnd_below(rs, N_KEYS);
    uint32_t latest, v;
    char path[128];
    answer a;

    pthread_mutex_lock(&W.mu);
    latest = W.latest[key];
    pthread_mutex_unlock(&W.mu);
    if (latest < 2)
        return;
    v = 1 + rnd_below(rs, latest - 1); /* never the latest one */
    snprintf(path, sizeof(path), "/v1/keys/%s/versions/%u", KEYS[key], v);
    request(c, "DELETE", path, NULL, &a);
    if (a.status == 0)
        goto out;
    pthread_mutex_lock(&W.mu);
    if (a.status == 200) {
        W.retired[key][v] = 1;
        W.st.retired++;
        W.st.acked++;
    } else if (a.status == 409 && strcmp(a.code, "key_version_in_use") == 0) {
        W.st.refused_in_use++;
        W.st.acked++;
    } else {
        pthread_mutex_unlock(&W.mu);
        unexpected("retire", &a);
        goto out;
    }
    pthread_mutex_unlock(&W.mu);
out:
    answer_free(&a);
}

typedef struct client {
    pthread_t thread;
    uint64_t rs;
} client;

/* One rotation, for a kill while it runs (an orphan KEK object). */
static void *rotator_main(void *arg)
{
    client *cl = arg;
    CURL *c = curl_easy_init();

    if (c == NULL) {
        violation("curl_easy_init");
        return NULL;
    }
    do_rotate(c, &cl->rs);
    curl_easy_cleanup(c);
    return NULL;
}

static void *client_main(void *arg)
{
    client *cl = arg;
    CURL *c = curl_easy_init();

    if (c == NULL) {
        violation("curl_easy_init");
        return NULL;
    }
    while (!atomic_load(&W.stop) && !atomic_load(&W.failed)) {
        unsigned op = rnd_below(&cl->rs, 1000);

        if (op < 300)
            do_generate(c, &cl->rs);
        else if (op < 660)
            do_decrypt(c, &cl->rs);
        else if (op < 720)
            do_single(c, &cl->rs, 0);
        else if (op < 760)
            do_single(c, &cl->rs, 1);
        else if (op < 775)
            do_bulk(c, &cl->rs, 0);
        else if (op < 785)
            do_bulk(c, &cl->rs, 1);
        else if (op < 815)
            do_rotate(c, &cl->rs);
        else if (op < 935)
            do_rewrap(c, &cl->rs);
        else
            do_retire(c, &cl->rs);
    }
    curl_easy_cleanup(c);
    return NULL;
}

/* ---- checks after a restart ------------------------------------------------- */

static json_t *get_ok(const char *path)
{
    long status = 0;
    json_t *j = ku_call(&K, "GET", path, NULL, &status);

    ck_assert_msg(status == 200, "seed %u, cycle %d: GET %s: %ld", seed, cycle, path, status);
    return j;
}

/* /v1/health: 200, "status":"ok", and the start-up verification of the
 * audit chain found it intact. */
static void verify_health(void)
{
    json_t *j = get_ok("/v1/health");
    const char *audit = json_string_value(json_object_get(j, "audit"));

    ck_assert_str_eq(json_string_value(json_object_get(j, "status")), "ok");
    ck_assert_msg(audit != NULL && strcmp(audit, "ok") == 0,
                  "seed %u, cycle %d: health after a restart: %s", seed, cycle,
                  json_dumps(j, JSON_COMPACT));
    json_decref(j);
}

/* Decrypt record i (no load runs): the answer must be one its
 * acknowledged and possible states allow; the record then holds the
 * state the store has. */
static void verify_rec(CURL *c, size_t i)
{
    rec *r = &W.recs[i];
    char path[128], body[128];
    unsigned char pt[48];
    answer a;

    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", r->id);
    snprintf(body, sizeof(body), "{\"context\":{\"customer\":\"%d\",\"app\":\"crash\"}}",
             r->customer);
    request(c, "POST", path, body, &a);
    if (a.status == 200) {
        if (ku_b64_key(json_string_value(json_object_get(a.body, "plaintext")), pt) != 32 ||
            memcmp(pt, r->pt, 32) != 0)
            violation("DEK %s decrypts to other bytes after a restart", r->id);
        else if (r->state != S_ACTIVE)
            violation("DEK %s decrypts after a restart although its %s was acknowledged", r->id,
                      r->state == S_REVOKED ? "revocation" : "destruction");
    } else if (a.status == 403 && strcmp(a.code, "dek_revoked") == 0) {
        if (r->state == S_DESTROYED || (r->state == S_ACTIVE && !(r->maybe & MAYBE_REVOKED)))
            violation("DEK %s is revoked after a restart; acknowledged: %s", r->id,
                      r->state == S_DESTROYED ? "destroyed" : "active");
        r->state = S_REVOKED;
    } else if (a.status == 410 && strcmp(a.code, "dek_destroyed") == 0) {
        if (r->state != S_DESTROYED && !(r->maybe & MAYBE_DESTROYED))
            violation("DEK %s is destroyed after a restart; acknowledged: %s", r->id,
                      r->state == S_REVOKED ? "revoked" : "active");
        r->state = S_DESTROYED;
    } else if (a.status == 404) {
        violation("acknowledged DEK %s is lost after a restart: %s", r->id, a.code);
    } else {
        unexpected("decrypt after a restart", &a);
    }
    r->maybe = 0; /* nothing is in flight: this is its state */
    r->touched = 0;
    OPENSSL_cleanse(pt, sizeof(pt));
    answer_free(&a);
}

typedef struct verifier {
    pthread_t thread;
    const size_t *idx;
    size_t from, to;
} verifier;

static void *verifier_main(void *arg)
{
    verifier *v = arg;
    CURL *c = curl_easy_init();

    if (c == NULL) {
        violation("curl_easy_init");
        return NULL;
    }
    for (size_t i = v->from; i < v->to && !atomic_load(&W.failed); i++)
        verify_rec(c, v->idx[i]);
    curl_easy_cleanup(c);
    return NULL;
}

/* Decrypt the touched DEKs and up to SAMPLE_OLD others (all: every DEK). */
static size_t verify_deks(uint64_t *rs, int all)
{
    size_t *idx = calloc(W.n + SAMPLE_OLD + 1, sizeof(*idx)), n = 0;
    verifier v[N_CLIENTS];

    ck_assert_ptr_nonnull(idx);
    for (size_t i = 0; i < W.n; i++)
        if (all || W.recs[i].touched)
            idx[n++] = i;
    for (size_t k = 0; !all && W.n > 0 && k < SAMPLE_OLD; k++) {
        size_t i = rnd_below(rs, (unsigned)W.n);

        if (!W.recs[i].touched) {
            W.recs[i].touched = 1; /* once */
            idx[n++] = i;
        }
    }
    for (int t = 0; t < N_CLIENTS; t++) {
        v[t].idx = idx;
        v[t].from = n * (size_t)t / N_CLIENTS;
        v[t].to = n * (size_t)(t + 1) / N_CLIENTS;
        ck_assert_int_eq(pthread_create(&v[t].thread, NULL, verifier_main, &v[t]), 0);
    }
    for (int t = 0; t < N_CLIENTS; t++)
        pthread_join(v[t].thread, NULL);
    free(idx);
    assert_no_failure();
    return n;
}

/* Each key's latest version and its acknowledged retires. */
static void verify_keys(void)
{
    char path[128];

    for (int k = 0; k < N_KEYS; k++) {
        json_t *j, *e;
        size_t i;
        json_int_t latest;

        snprintf(path, sizeof(path), "/v1/keys/%s", KEYS[k]);
        j = get_ok(path);
        latest = json_integer_value(json_object_get(j, "latest_version"));
        ck_assert_msg(latest >= (json_int_t)W.ack_rotated[k] && latest >= (json_int_t)W.latest[k],
                      "seed %u, cycle %d: key %s: latest version %lld after a restart, but "
                      "version %u was acknowledged",
                      seed, cycle, KEYS[k], (long long)latest,
                      W.ack_rotated[k] > W.latest[k] ? W.ack_rotated[k] : W.latest[k]);
        ck_assert_int_lt(latest, MAX_VERSION);
        W.latest[k] = (uint32_t)latest;
        json_array_foreach(json_object_get(j, "versions"), i, e)
        {
            json_int_t v = json_integer_value(json_object_get(e, "version"));
            const char *state = json_string_value(json_object_get(e, "state"));

            ck_assert(v >= 1 && v <= latest && state != NULL);
            ck_assert_msg(!W.retired[k][v] || strcmp(state, "destroyed") == 0,
                          "seed %u, cycle %d: key %s version %lld: retire acknowledged, state %s",
                          seed, cycle, KEYS[k], (long long)v, state);
        }
        json_decref(j);
    }
}

static const char *hex_expr(void)
{
    return K.store.pg ? "upper(encode(token_id, 'hex'))" : "hex(token_id)";
}

typedef struct token_report {
    size_t keks, audit_keys, young_orphans, settling_orphans;
    size_t partial; /* objects SoftHSM2 left half-written (no label, no id) */
} token_report;

/* The KEK objects of the token against the store, after the start-up
 * reconciliation of a kmsd started at t0 (no load runs). */
static void verify_token(time_t t0, token_report *rep)
{
    p11_config cfg = {.module = K.tt.module, .uri = K.tt.uri, .pin = TT_PIN};
    p11_ctx *p = NULL;
    CK_FUNCTION_LIST *fl;
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE *hs = NULL;
    CK_ULONG n = 0, got;
    unsigned char(*ids)[16];
    size_t n_ids = 0, n_matched = 0;
    time_t t_check = time(NULL);
    char sql[512];
    long long n_active;

    memset(rep, 0, sizeof(*rep));
    ck_assert_int_eq(p11_open(&cfg, &p), CKR_OK);
    fl = p11_function_list(p);
    ck_assert_int_eq(fl->C_OpenSession(p11_slot_id(p), CKF_SERIAL_SESSION, NULL, NULL, &s), CKR_OK);
    ck_assert_int_eq(fl->C_FindObjectsInit(s, NULL, 0), CKR_OK); /* every object */
    do {
        hs = realloc(hs, (n + 256) * sizeof(*hs));
        ck_assert_ptr_nonnull(hs);
        ck_assert_int_eq(fl->C_FindObjects(s, hs + n, 256, &got), CKR_OK);
        n += got;
    } while (got == 256);
    ck_assert_int_eq(fl->C_FindObjectsFinal(s), CKR_OK);
    ids = calloc(n + 1, sizeof(*ids));
    ck_assert_ptr_nonnull(ids);
    for (CK_ULONG i = 0; i < n; i++) {
        char label[128] = "", key[80], hex[33];
        unsigned char id[16], db_id[16];
        unsigned version;
        CK_ATTRIBUTE a[] = {{CKA_LABEL, label, sizeof(label) - 1}, {CKA_ID, id, sizeof(id)}};
        long long created;
        CK_RV rv;
        int k;

        /* One of them may be missing (CKR_ATTRIBUTE_TYPE_INVALID, its
         * length set to -1). */
        rv = fl->C_GetAttributeValue(s, hs[i], a, 2);
        if (rv != CKR_OK && rv != CKR_ATTRIBUTE_TYPE_INVALID) {
            /* Unreadable: half-written (see below).  Had it been a
             * version's KEK, that version now misses its object, which
             * the count of active versions below finds. */
            rep->partial++;
            continue;
        }
        label[a[0].ulValueLen != (CK_ULONG)-1 ? a[0].ulValueLen : 0] = '\0';
        if (strcmp(label, "p11kms-audit:v1") == 0) {
            rep->audit_keys++;
            continue;
        }
        if (label[0] == '\0' && (a[1].ulValueLen == 0 || a[1].ulValueLen == (CK_ULONG)-1)) {
            /* SoftHSM2 writes a new object's attributes one at a time:
             * a kill inside C_GenerateKey leaves one without label or
             * CKA_ID, which nothing can use or find by its id. */
            rep->partial++;
            continue;
        }
        ck_assert_msg(a[1].ulValueLen == 16 &&
                          sscanf(label, "p11kms:%79[^:]:v%u", key, &version) == 2,
                      "seed %u, cycle %d: unexpected token object \"%s\"", seed, cycle, label);
        for (k = 0; k < N_KEYS && strcmp(KEYS[k], key) != 0; k++)
            ;
        ck_assert_msg(k < N_KEYS, "seed %u: object of an unknown key: %s", seed, label);
        for (size_t j = 0; j < n_ids; j++)
            ck_assert_msg(memcmp(ids[j], id, 16) != 0, "seed %u: two objects with one CKA_ID (%s)",
                          seed, label);
        memcpy(ids[n_ids++], id, 16);
        for (int b = 0; b < 16; b++)
            snprintf(hex + 2 * b, 3, "%02X", id[b]);
        rep->keks++;
        snprintf(sql, sizeof(sql),
                 "SELECT count(*) FROM key_versions v JOIN keys k ON k.id = v.key_id "
                 "WHERE k.name = '%s' AND v.version = %u",
                 key, version);
        if (ts_db_int(&K.store, sql) == 1 && ts_db_token_id(&K.store, key, version, db_id) == 0 &&
            memcmp(db_id, id, 16) == 0) {
            snprintf(sql, sizeof(sql),
                     "SELECT count(*) FROM key_versions v JOIN keys k ON k.id = v.key_id "
                     "WHERE k.name = '%s' AND v.version = %u AND v.state = 'active'",
                     key, version);
            ck_assert_msg(ts_db_int(&K.store, sql) == 1,
                          "seed %u, cycle %d: %s: the object of a retired version survived "
                          "the restart",
                          seed, cycle, label);
            n_matched++;
            continue;
        }
        /* Not a version's object: an orphan, which only an interrupted
         * rotation leaves, with its creation intent. */
        snprintf(sql, sizeof(sql),
                 "SELECT coalesce(max(created), -1) FROM kek_intents WHERE %s = '%s'", hex_expr(),
                 hex);
        created = ts_db_int(&K.store, sql);
        ck_assert_msg(created >= 0,
                      "seed %u, cycle %d: %s (CKA_ID %s): no version row and no creation intent",
                      seed, cycle, label, hex);
        ck_assert_msg(created > (long long)t0 - GRACE,
                      "seed %u, cycle %d: orphan %s: its intent is %lld s older than the start, "
                      "past the %d s grace, but the reconciliation kept it",
                      seed, cycle, label, (long long)t0 - created, GRACE);
        if (created > (long long)t_check - GRACE)
            rep->young_orphans++;
        else
            rep->settling_orphans++; /* crossed the grace during this start */
    }
    fl->C_CloseSession(s);
    p11_close(p);
    free(ids);
    free(hs);
    ck_assert_msg(rep->audit_keys == 1, "seed %u: %zu audit MAC keys", seed, rep->audit_keys);
    n_active = ts_db_int(&K.store, "SELECT count(*) FROM key_versions WHERE state = 'active'");
    ck_assert_msg(n_active == (long long)n_matched,
                  "seed %u, cycle %d: %lld active versions in the store, %zu of them with their "
                  "object in the token",
                  seed, cycle, n_active, n_matched);
    snprintf(sql, sizeof(sql), "SELECT count(*) FROM kek_intents WHERE created <= %lld",
             (long long)t0 - GRACE);
    ck_assert_msg(ts_db_int(&K.store, sql) == 0,
                  "seed %u, cycle %d: creation intents older than the grace survived the start",
                  seed, cycle);
}

static long long verify_audit(long long last_entries)
{
    json_t *j = get_ok("/v1/audit/verify");
    long long entries;

    ck_assert_msg(json_is_true(json_object_get(j, "ok")), "seed %u, cycle %d: audit verify: %s",
                  seed, cycle, json_dumps(j, JSON_COMPACT));
    entries = (long long)json_integer_value(json_object_get(j, "entries"));
    ck_assert_msg(entries >= last_entries,
                  "seed %u, cycle %d: the audit log went from %lld to %lld entries", seed, cycle,
                  last_entries, entries);
    json_decref(j);
    return entries;
}

/* ---- the test ------------------------------------------------------------------- */

static int cycles_wanted(void)
{
    const char *env = getenv("P11KMS_TEST_CRASH_CYCLES");
    const char *lng = getenv("P11KMS_TEST_LONG");

    int n = CRASH_CYCLES;

    if (env != NULL && atoi(env) > 0)
        return atoi(env);
    if (lng != NULL && strcmp(lng, "1") == 0)
        n = CRASH_CYCLES_LONG;
    /* A cycle costs about twice as much on PostgreSQL (connections at
     * every start, the audit log read over the socket): the same time. */
    return ts_backend_is_pg() ? (n + 1) / 2 : n;
}

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static long file_size(const char *path)
{
    FILE *f = fopen(path, "rb");
    long n = -1;

    if (f != NULL && fseek(f, 0, SEEK_END) == 0)
        n = ftell(f);
    if (f != NULL)
        fclose(f);
    return n < 0 ? 0 : n;
}

/* Wait until the log grows a line with needle after offset from (the
 * kmsd just spawned wrote it); 0 if it exits or 120 s pass first. */
static int wait_log(const char *path, long from, const char *needle)
{
    char buf[65536];
    double t0 = now_s();

    while (now_s() - t0 < 120) {
        FILE *f = fopen(path, "rb");
        size_t n = 0;

        if (f != NULL && fseek(f, from, SEEK_SET) == 0)
            n = fread(buf, 1, sizeof(buf) - 1, f);
        if (f != NULL)
            fclose(f);
        buf[n] = '\0';
        if (strstr(buf, needle) != NULL)
            return 1;
        if (kill(K.pid, 0) != 0)
            return 0;
        usleep(1000);
    }
    return 0;
}

static int count_lines(const char *path, const char *needle)
{
    char *text = kh_read_file(path, NULL), *p;
    int n = 0;

    for (p = text; p != NULL && (p = strstr(p, needle)) != NULL; p++)
        n++;
    free(text);
    return n;
}

START_TEST(crash_cycles)
{
    int cycles = cycles_wanted(), kills = 0, startup_kills = 0, rotation_kills = 0;
    size_t final[3] = {0, 0, 0};
    uint64_t rs = seed;
    size_t checked = 0, last_checked = 0, orphans_seen = 0;
    long long entries = 0;
    double t_start = now_s();
    token_report rep;
    client cl[N_CLIENTS];

    fprintf(stderr, "test_kmsd_crash: seed %u (P11KMS_TEST_SEED=%u repeats it), %d cycles, %s\n",
            seed, seed, cycles, ts_backend_name());
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-crash", NULL, NULL), 0);
    ck_assert_int_eq(pthread_mutex_init(&W.mu, NULL), 0);
    kh_set_quiet(1);
    ck_assert_int_eq(kh_start(&K), 0);
    for (int k = 0; k < N_KEYS; k++) {
        char body[96];
        long status = 0;

        snprintf(body, sizeof(body), "{\"name\":\"%s\"}", KEYS[k]);
        json_decref(ku_call(&K, "POST", "/v1/keys", body, &status));
        ck_assert_int_eq(status, 201);
        W.latest[k] = 1;
    }

    for (cycle = 1; cycle <= cycles; cycle++) {
        unsigned long long kill_after = KILL_MIN + rnd_below(&rs, KILL_MAX - KILL_MIN + 1);
        time_t t0;
        double t_load = now_s();
        int st, rotating;
        client rot;

        /* The load, then the kill. */
        atomic_store(&W.killing, 0);
        atomic_store(&W.stop, 0);
        atomic_store(&W.sent, 0);
        pthread_mutex_lock(&W.mu);
        W.n_bulks = 0; /* no request of an earlier kmsd is still in flight */
        pthread_mutex_unlock(&W.mu);
        for (int t = 0; t < N_CLIENTS; t++) {
            cl[t].rs = rnd_next(&rs);
            ck_assert_int_eq(pthread_create(&cl[t].thread, NULL, client_main, &cl[t]), 0);
        }
        while (atomic_load(&W.sent) < kill_after && !atomic_load(&W.failed)) {
            if (now_s() - t_load > 300) /* not a timing check: a hang */
                violation("kmsd answered %llu requests in 300 s", atomic_load(&W.sent));
            usleep(500);
        }
        /* Half of the kills come while a rotation may be in flight: its
         * creation intent, maybe its object (SoftHSM2 takes most of a
         * rotation's time writing it), maybe its version. */
        rotating = rnd_below(&rs, 2) == 0;
        if (rotating) {
            rot.rs = rnd_next(&rs);
            ck_assert_int_eq(pthread_create(&rot.thread, NULL, rotator_main, &rot), 0);
            usleep(rnd_below(&rs, 30000));
        } else {
            usleep(rnd_below(&rs, 3000));
        }
        atomic_store(&W.killing, 1);
        st = kh_stop(&K, SIGKILL);
        atomic_store(&W.stop, 1);
        for (int t = 0; t < N_CLIENTS; t++)
            pthread_join(cl[t].thread, NULL);
        if (rotating) {
            pthread_join(rot.thread, NULL);
            rotation_kills++;
        }
        assert_no_failure();
        ck_assert_msg(st == 128 + SIGKILL, "seed %u, cycle %d: kmsd ended with %d before the kill",
                      seed, cycle, st);
        kills++;

        /* Sometimes a kill in the middle of the start-up too: once it
         * logged in (see the top of the file), during the reconciliation,
         * the audit check or the first requests. */
        if (rnd_below(&rs, 5) == 0) {
            long from = file_size(K.log);

            ck_assert_int_eq(kh_spawn(&K), 0);
            ck_assert_msg(wait_log(K.log, from, "token ready"),
                          "seed %u, cycle %d: kmsd did not log in", seed, cycle);
            usleep(rnd_below(&rs, SANITIZED ? 300000 : 100000));
            st = kh_stop(&K, SIGKILL);
            ck_assert_msg(st == 128 + SIGKILL,
                          "seed %u, cycle %d: kmsd ended with %d during its start-up", seed, cycle,
                          st);
            kills++;
            startup_kills++;
        }

        /* Restart; check what was acknowledged. */
        t0 = time(NULL);
        ck_assert_msg(kh_start(&K) == 0, "seed %u, cycle %d: kmsd does not start again", seed,
                      cycle);
        atomic_store(&W.killing, 0);
        verify_health();
        verify_token(t0, &rep);
        orphans_seen += rep.young_orphans + rep.settling_orphans;
        verify_keys();
        last_checked = verify_deks(&rs, cycle == cycles);
        checked += last_checked;
        if (cycle % 4 == 0 || cycle == cycles) /* it reads the whole log */
            entries = verify_audit(entries);
        ku_assert_healthy(&K);
    }

    /* A clean stop after all that. */
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    for (size_t i = 0; i < W.n; i++)
        final[W.recs[i].state]++;
    printf("test_kmsd_crash (%s%s): %d cycles, %d SIGKILLs (%d during start-up, %d with a "
           "rotation in flight), %" PRIu64 " requests acknowledged of %llu answered under load "
           "(%" PRIu64 " datakeys, %" PRIu64 " decrypts, %" PRIu64 " revokes, %" PRIu64
           " destroys, %" PRIu64 " bulk, %" PRIu64 " rotations, %" PRIu64
           " rewrap batches, %" PRIu64 " retires, %" PRIu64 " retires refused in use)\n",
           ts_backend_name(), SANITIZED ? ", sanitizers" : "", cycles, kills, startup_kills,
           rotation_kills, W.st.acked, (unsigned long long)atomic_load(&W.answered) - checked,
           W.st.generated, W.st.decrypted, W.st.revoked, W.st.destroyed, W.st.bulk, W.st.rotated,
           W.st.rewrapped, W.st.retired, W.st.refused_in_use);
    printf("test_kmsd_crash: %zu DEKs (%zu active, %zu revoked, %zu destroyed), %zu decrypts "
           "checked after restarts (%zu at the end); orphan KEK objects seen after restarts: "
           "%zu (kept young %d times, destroyed past the grace %d times); %zu half-written "
           "objects SoftHSM2 left (no label, no id); %zu KEK objects in the token; %lld audit "
           "entries verified; seed %u; %.1f s\n",
           W.n, final[S_ACTIVE], final[S_REVOKED], final[S_DESTROYED], checked, last_checked,
           orphans_seen, count_lines(K.log, "its creation is in progress"),
           count_lines(K.log, "destroyed an orphan KEK object"), rep.partial, rep.keks, entries,
           seed, now_s() - t_start);
    fflush(stdout);
    free(W.recs);
    free(W.bulks);
    pthread_mutex_destroy(&W.mu);
}
END_TEST

static void teardown(void)
{
    kh_teardown(&K);
}

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_crash");
    TCase *tc = tcase_create("crash");

    tcase_add_unchecked_fixture(tc, NULL, teardown);
    tcase_set_timeout(tc, 1800);
    tcase_add_test(tc, crash_cycles);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    const char *env = getenv("P11KMS_TEST_SEED");
    int failed;

    seed = env != NULL && *env != '\0' ? (unsigned)strtoul(env, NULL, 10)
                                       : (unsigned)time(NULL) ^ ((unsigned)getpid() << 16);
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    if (failed != 0)
        fprintf(stderr, "test_kmsd_crash failed with seed %u: P11KMS_TEST_SEED=%u repeats it\n",
                seed, seed);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
