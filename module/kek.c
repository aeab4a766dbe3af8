/*
 * module/kek.c - the KEK objects: create, destroy, exists, list, the
 * handle cache that maps a CKA_ID to its object handle so that a wrap
 * never searches the token after the first use of a KEK, and the
 * session-object copies of the KEKs that wrap and unwrap use.
 *
 * Copies: on the first wrap or unwrap under a KEK, C_CopyObject makes a
 * session object of it (CKA_TOKEN false; sensitive, non-extractable and
 * limited to AES-GCM like the original, which PKCS#11 does not let a copy
 * relax) in one dedicated session that is never pooled, so the copy lives
 * until we drop it.  SoftHSM2 re-reads a token object's file on every use
 * and not a session object's, which makes a wrap about twice as fast.  A
 * KEK created with CKA_COPYABLE false (before copies existed) is used
 * through its token object.  Copies are dropped by closing their session:
 * on every flush of the cache (recovery, stale handle, re-login), when the
 * KEK is destroyed (p11_kek_destroy destroys the copy first), and when a
 * check of the token object, at most P11_COPY_RECHECK_MS after the last
 * one, finds it gone (destroyed by another node).
 *
 * The cache is a chained hash table keyed by the 16-byte CKA_ID (random,
 * so a few of its bytes mixed make a good hash).  It is dropped whole on
 * any sign of a stale handle and on re-initialisation (handles belong to
 * one module instance).  A lookup that missed records cache_gen first and
 * inserts only if no flush happened meanwhile.
 *
 * Locking: ctx->cache_mu guards the table and is never held across a C_*
 * call.  ctx->copy_mu guards the copy session and is held across the calls
 * on it (open, copy, close), taken before cache_mu.  The operations run
 * under p11_run (read lock, pooled session).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "internal.h"

#define CACHE_INITIAL_BUCKETS 64
#define LIST_BATCH            64
#define KEK_BITS_BYTES        32 /* AES-256 */

/* ---- the handle cache -------------------------------------------------- */

static size_t bucket_of(const unsigned char *id, size_t n_buckets)
{
    uint64_t a, b;

    memcpy(&a, id, 8);
    memcpy(&b, id + 8, 8);
    a ^= b * 0x9e3779b97f4a7c15ULL;
    a ^= a >> 29;
    return (size_t)(a & (n_buckets - 1));
}

CK_RV p11_cache_setup(p11_ctx *ctx)
{
    CK_RV rv = CKR_HOST_MEMORY;

    ctx->buckets = calloc(CACHE_INITIAL_BUCKETS, sizeof(*ctx->buckets));
    if (ctx->buckets == NULL)
        goto out;
    ctx->n_buckets = CACHE_INITIAL_BUCKETS;
    ctx->copy_session = CK_INVALID_HANDLE;
    atomic_init(&ctx->flush_gen, 0);
    if (pthread_mutex_init(&ctx->cache_mu, NULL) != 0) {
        free(ctx->buckets);
        ctx->buckets = NULL;
        goto out;
    }
    if (pthread_mutex_init(&ctx->copy_mu, NULL) != 0) {
        pthread_mutex_destroy(&ctx->cache_mu);
        free(ctx->buckets);
        ctx->buckets = NULL;
        goto out;
    }
    if (pthread_rwlock_init(&ctx->objects_rw, NULL) != 0) {
        pthread_mutex_destroy(&ctx->copy_mu);
        pthread_mutex_destroy(&ctx->cache_mu);
        free(ctx->buckets);
        ctx->buckets = NULL;
        goto out;
    }
    rv = CKR_OK;
out:
    return rv;
}

static void free_entries(p11_ctx *ctx)
{
    for (size_t i = 0; i < ctx->n_buckets; i++) {
        p11_kek_entry *e = ctx->buckets[i];
        while (e != NULL) {
            p11_kek_entry *next = e->next;
            free(e);
            e = next;
        }
        ctx->buckets[i] = NULL;
    }
    ctx->n_entries = 0;
}

void p11_cache_teardown(p11_ctx *ctx)
{
    free_entries(ctx);
    free(ctx->buckets);
    ctx->buckets = NULL;
    pthread_mutex_destroy(&ctx->cache_mu);
    pthread_mutex_destroy(&ctx->copy_mu);
    pthread_rwlock_destroy(&ctx->objects_rw);
}

void p11_objects_lock(p11_ctx *ctx, int create)
{
    if (create)
        pthread_rwlock_wrlock(&ctx->objects_rw);
    else
        pthread_rwlock_rdlock(&ctx->objects_rw);
}

void p11_objects_unlock(p11_ctx *ctx)
{
    pthread_rwlock_unlock(&ctx->objects_rw);
}

/* Caller holds copy_mu.  Closing the session destroys every copy in it. */
static void close_copy_session(p11_ctx *ctx)
{
    if (ctx->copy_session == CK_INVALID_HANDLE)
        return;
    (void)P11_CALL_QUIET(ctx, C_CloseSession, ctx->copy_session);
    ctx->copy_session = CK_INVALID_HANDLE;
}

void p11_cache_flush(p11_ctx *ctx)
{
    pthread_mutex_lock(&ctx->copy_mu);
    close_copy_session(ctx);
    pthread_mutex_lock(&ctx->cache_mu);
    free_entries(ctx);
    ctx->cache_gen++;
    atomic_fetch_add(&ctx->flush_gen, 1);
    pthread_mutex_unlock(&ctx->cache_mu);
    pthread_mutex_unlock(&ctx->copy_mu);
}

void p11_cache_flush_since(p11_ctx *ctx, unsigned long seen)
{
    if (atomic_load(&ctx->flush_gen) == seen)
        p11_cache_flush(ctx);
}

/* Caller holds cache_mu. */
static p11_kek_entry **cache_slot(p11_ctx *ctx, const unsigned char *id)
{
    p11_kek_entry **pp = &ctx->buckets[bucket_of(id, ctx->n_buckets)];

    while (*pp != NULL && memcmp((*pp)->id, id, P11_KEK_ID_LEN) != 0)
        pp = &(*pp)->next;
    return pp;
}

/* Caller holds cache_mu.  Doubles the table; on no memory keeps it. */
static void cache_grow(p11_ctx *ctx)
{
    size_t n = ctx->n_buckets * 2;
    p11_kek_entry **nb = calloc(n, sizeof(*nb));

    if (nb == NULL)
        return;
    for (size_t i = 0; i < ctx->n_buckets; i++) {
        p11_kek_entry *e = ctx->buckets[i];
        while (e != NULL) {
            p11_kek_entry *next = e->next;
            size_t b = bucket_of(e->id, n);
            e->next = nb[b];
            nb[b] = e;
            e = next;
        }
    }
    free(ctx->buckets);
    ctx->buckets = nb;
    ctx->n_buckets = n;
}

static int cache_get(p11_ctx *ctx, const unsigned char *id, CK_OBJECT_HANDLE *h, unsigned long *gen)
{
    int found = 0;
    p11_kek_entry *e;

    pthread_mutex_lock(&ctx->cache_mu);
    e = *cache_slot(ctx, id);
    if (e != NULL) {
        *h = e->handle;
        found = 1;
    }
    *gen = ctx->cache_gen;
    pthread_mutex_unlock(&ctx->cache_mu);
    return found;
}

/* Insert or update, unless the cache was flushed since gen was read. */
static void cache_put(p11_ctx *ctx, const unsigned char *id, CK_OBJECT_HANDLE h, unsigned long gen)
{
    p11_kek_entry **pp, *e;

    pthread_mutex_lock(&ctx->cache_mu);
    if (gen != ctx->cache_gen)
        goto out;
    pp = cache_slot(ctx, id);
    if (*pp != NULL) {
        (*pp)->handle = h;
        goto out;
    }
    e = malloc(sizeof(*e));
    if (e == NULL) /* only a cache: carry on without it */
        goto out;
    memcpy(e->id, id, P11_KEK_ID_LEN);
    e->handle = h;
    e->copy = CK_INVALID_HANDLE;
    e->copy_state = P11_COPY_NONE;
    e->copy_checked_ms = 0;
    e->next = NULL;
    *pp = e;
    if (++ctx->n_entries > ctx->n_buckets)
        cache_grow(ctx);
out:
    pthread_mutex_unlock(&ctx->cache_mu);
}

/* Record the copy of id (or that the token refused one) unless the cache
 * was flushed since gen was read or the entry is gone. */
static int cache_set_copy(p11_ctx *ctx, const unsigned char *id, int state, CK_OBJECT_HANDLE copy,
                          uint64_t now, unsigned long gen)
{
    p11_kek_entry *e;
    int done = 0;

    pthread_mutex_lock(&ctx->cache_mu);
    if (gen != ctx->cache_gen)
        goto out;
    e = *cache_slot(ctx, id);
    if (e == NULL)
        goto out;
    e->copy_state = state;
    e->copy = copy;
    e->copy_checked_ms = now;
    done = 1;
out:
    pthread_mutex_unlock(&ctx->cache_mu);
    return done;
}

static void cache_del(p11_ctx *ctx, const unsigned char *id)
{
    p11_kek_entry **pp, *e;

    pthread_mutex_lock(&ctx->cache_mu);
    pp = cache_slot(ctx, id);
    e = *pp;
    if (e != NULL) {
        *pp = e->next;
        free(e);
        ctx->n_entries--;
    }
    ctx->cache_gen++; /* a lookup in flight must not re-insert it */
    pthread_mutex_unlock(&ctx->cache_mu);
}

/* ---- finding ------------------------------------------------------------ */

/* Search the token for the secret key with this CKA_ID. */
static CK_RV find_kek(p11_ctx *ctx, CK_SESSION_HANDLE s, const unsigned char *id,
                      CK_OBJECT_HANDLE *h, int *flags)
{
    CK_RV rv, rv2;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_BBOOL yes = CK_TRUE; /* the token object, never a copy */
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_ID, (void *)id, P11_KEK_ID_LEN},
        {CKA_TOKEN, &yes, sizeof(yes)},
    };
    CK_OBJECT_HANDLE found[2];
    CK_ULONG n = 0;

    p11_objects_lock(ctx, 0);
    rv = P11_CALL(ctx, C_FindObjectsInit, s, tmpl, 3);
    if (rv != CKR_OK) {
        p11_objects_unlock(ctx);
        goto out;
    }
    rv = P11_CALL(ctx, C_FindObjects, s, found, 2, &n);
    rv2 = P11_CALL(ctx, C_FindObjectsFinal, s);
    p11_objects_unlock(ctx);
    if (rv == CKR_OK)
        rv = rv2;
    if (rv2 != CKR_OK)
        *flags |= P11_OP_DIRTY;
    if (rv != CKR_OK)
        goto out;
    if (n == 0) {
        rv = CKR_KEY_HANDLE_INVALID;
        goto out;
    }
    if (n > 1)
        LOG_WARN(P11_LOG_SUB, "several secret keys share one CKA_ID; using the first");
    *h = found[0];
out:
    return rv;
}

CK_RV p11_kek_handle(p11_ctx *ctx, CK_SESSION_HANDLE s, const unsigned char *id,
                     CK_OBJECT_HANDLE *h, int *flags)
{
    CK_RV rv = CKR_OK;
    unsigned long gen;

    if (cache_get(ctx, id, h, &gen)) {
        *flags |= P11_OP_CACHED;
        goto out;
    }
    rv = find_kek(ctx, s, id, h, flags);
    if (rv == CKR_OK)
        cache_put(ctx, id, *h, gen);
out:
    return rv;
}

/* ---- the session-object copies ------------------------------------------ */

static uint64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* A snapshot of one cache entry. */
struct kek_view {
    int found;
    CK_OBJECT_HANDLE handle, copy;
    int copy_state;
    uint64_t checked_ms;
    unsigned long gen;
};

static void cache_view(p11_ctx *ctx, const unsigned char *id, struct kek_view *v)
{
    p11_kek_entry *e;

    pthread_mutex_lock(&ctx->cache_mu);
    e = *cache_slot(ctx, id);
    v->found = e != NULL;
    if (e != NULL) {
        v->handle = e->handle;
        v->copy = e->copy;
        v->copy_state = e->copy_state;
        v->checked_ms = e->copy_checked_ms;
    }
    v->gen = ctx->cache_gen;
    pthread_mutex_unlock(&ctx->cache_mu);
}

/* Copy the token object h of KEK id into the copy session.  CKR_OK with
 * *copy set, else the reason (the caller then uses the token object).
 * Takes copy_mu. */
static CK_RV make_copy(p11_ctx *ctx, const unsigned char *id, CK_OBJECT_HANDLE h,
                       CK_OBJECT_HANDLE *copy)
{
    CK_RV rv;
    CK_BBOOL no = CK_FALSE;
    /* CKA_MODIFIABLE last: the attributes after it would be refused.
     * (SoftHSM2 refuses CKA_COPYABLE false here; a copy of the copy would
     * be as locked down anyway.) */
    CK_ATTRIBUTE tmpl[] = {
        {CKA_TOKEN, &no, sizeof(no)},
        {CKA_MODIFIABLE, &no, sizeof(no)},
    };
    CK_OBJECT_HANDLE c = CK_INVALID_HANDLE;
    struct kek_view v;

    pthread_mutex_lock(&ctx->copy_mu);
    cache_view(ctx, id, &v); /* another thread may have made it meanwhile */
    if (v.found && v.copy_state == P11_COPY_HAVE) {
        *copy = v.copy;
        rv = CKR_OK;
        goto out;
    }
    if (!v.found || v.copy_state == P11_COPY_REFUSED) {
        rv = CKR_ACTION_PROHIBITED;
        goto out;
    }
    if (ctx->copy_session == CK_INVALID_HANDLE) {
        /* Logged in already: login state is per application. */
        rv = P11_CALL(ctx, C_OpenSession, atomic_load(&ctx->slot),
                      CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &ctx->copy_session);
        if (rv != CKR_OK) {
            ctx->copy_session = CK_INVALID_HANDLE;
            goto out;
        }
    }
    rv = P11_CALL_QUIET(ctx, C_CopyObject, ctx->copy_session, h, tmpl,
                        sizeof(tmpl) / sizeof(tmpl[0]), &c);
    switch (rv) {
    case CKR_OK:
        if (!cache_set_copy(ctx, id, P11_COPY_HAVE, c, now_ms(), v.gen)) {
            /* The entry went away (destroyed, flushed): so does the copy. */
            (void)P11_CALL_QUIET(ctx, C_DestroyObject, ctx->copy_session, c);
            rv = CKR_OBJECT_HANDLE_INVALID;
            goto out;
        }
        *copy = c;
        break;
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED: /* closed behind our back: a new one next time */
        ctx->copy_session = CK_INVALID_HANDLE;
        break;
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID: /* a stale handle: the caller's use says so */
    case CKR_HOST_MEMORY:
    case CKR_DEVICE_MEMORY:
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT: break;
    default:
        /* CKR_ACTION_PROHIBITED: created before KEKs were CKA_COPYABLE. */
        LOG_INFO(P11_LOG_SUB,
                 "KEK not copied to a session object (C_CopyObject: %s); "
                 "using the token object",
                 p11_rv_name(rv));
        (void)cache_set_copy(ctx, id, P11_COPY_REFUSED, CK_INVALID_HANDLE, 0, v.gen);
        break;
    }
out:
    pthread_mutex_unlock(&ctx->copy_mu);
    return rv;
}

CK_RV p11_kek_use_handle(p11_ctx *ctx, CK_SESSION_HANDLE s, const unsigned char *id,
                         CK_OBJECT_HANDLE *h, int *flags)
{
    CK_RV rv = CKR_OK;
    CK_OBJECT_HANDLE token, copy;
    CK_OBJECT_CLASS cls;
    CK_ATTRIBUTE a = {CKA_CLASS, &cls, sizeof(cls)};
    struct kek_view v;
    uint64_t now;

    cache_view(ctx, id, &v);
    if (v.found && v.copy_state == P11_COPY_HAVE) {
        *flags |= P11_OP_CACHED;
        now = now_ms();
        if (now - v.checked_ms >= P11_COPY_RECHECK_MS) {
            /* Is the token object still there (another node may have
             * retired it)?  If not, the stale handle flushes the cache,
             * every copy with it, and the retry finds no KEK. */
            rv = P11_CALL_QUIET(ctx, C_GetAttributeValue, s, v.handle, &a, 1);
            if (rv != CKR_OK) {
                LOG_DEBUG(P11_LOG_SUB, "KEK token object check: %s", p11_rv_name(rv));
                goto out;
            }
            (void)cache_set_copy(ctx, id, P11_COPY_HAVE, v.copy, now, v.gen);
        }
        *h = v.copy;
        goto out;
    }
    if (v.found) {
        *flags |= P11_OP_CACHED;
        token = v.handle;
    } else {
        rv = find_kek(ctx, s, id, &token, flags);
        if (rv != CKR_OK)
            goto out;
        cache_put(ctx, id, token, v.gen);
    }
    *h = token;
    if (v.found && v.copy_state == P11_COPY_REFUSED)
        goto out;
    if (make_copy(ctx, id, token, &copy) == CKR_OK) {
        *flags |= P11_OP_CACHED;
        *h = copy;
    }
out:
    return rv;
}

/* Destroy every session-object copy of KEK id (ours, in the copy session;
 * the search also finds any another session of this process made). */
static CK_RV destroy_copies(p11_ctx *ctx, CK_SESSION_HANDLE s, const unsigned char *id, int *flags)
{
    CK_RV rv, rv2;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_BBOOL no = CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_ID, (void *)id, P11_KEK_ID_LEN},
        {CKA_TOKEN, &no, sizeof(no)},
    };
    CK_OBJECT_HANDLE found[16];
    CK_ULONG n = 0, i;

    p11_objects_lock(ctx, 0);
    rv = P11_CALL(ctx, C_FindObjectsInit, s, tmpl, 3);
    if (rv != CKR_OK) {
        p11_objects_unlock(ctx);
        goto out;
    }
    rv = P11_CALL(ctx, C_FindObjects, s, found, 16, &n);
    rv2 = P11_CALL(ctx, C_FindObjectsFinal, s);
    p11_objects_unlock(ctx);
    if (rv == CKR_OK)
        rv = rv2;
    if (rv2 != CKR_OK)
        *flags |= P11_OP_DIRTY;
    if (rv != CKR_OK)
        goto out;
    for (i = 0; i < n; i++) {
        rv2 = P11_CALL(ctx, C_DestroyObject, s, found[i]);
        if (rv2 != CKR_OK && rv2 != CKR_OBJECT_HANDLE_INVALID)
            rv = rv2;
    }
out:
    if (rv != CKR_OK) {
        /* Could not find them all: closing their session destroys them. */
        LOG_WARN(P11_LOG_SUB, "dropping every KEK copy (%s)", p11_rv_name(rv));
        close_copy_session(ctx);
    }
    return rv;
}

/* ---- create ------------------------------------------------------------- */

struct create_arg {
    const char *label;
    int given_id; /* 1: id is the caller's (p11_kek_create_with_id) */
    unsigned char id[P11_KEK_ID_LEN];
};

static CK_RV op_create(p11_ctx *ctx, CK_SESSION_HANDLE s, void *argp, int *flags)
{
    struct create_arg *arg = argp;
    CK_RV rv;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG value_len = KEK_BITS_BYTES;
    CK_MECHANISM_TYPE allowed[] = {CKM_AES_GCM};
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE, unused;
    unsigned long cache_gen;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_VALUE_LEN, &value_len, sizeof(value_len)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_ENCRYPT, &yes, sizeof(yes)},
        {CKA_DECRYPT, &yes, sizeof(yes)},
        {CKA_SIGN, &no, sizeof(no)},
        {CKA_VERIFY, &no, sizeof(no)},
        {CKA_WRAP, &no, sizeof(no)},
        {CKA_UNWRAP, &no, sizeof(no)},
        {CKA_DERIVE, &no, sizeof(no)},
        /* Copyable, for the session-object copy (CKA_TOKEN false), which
         * keeps the sensitivity, non-extractability and mechanism list.
         * Modifiable too, because SoftHSM2 (like PKCS#11 3.0 tokens that
         * follow footnote 17 strictly) refuses any template attribute,
         * CKA_TOKEN included, when copying a non-modifiable object.  What
         * that leaves changeable is harmless: CKA_SENSITIVE only to true,
         * CKA_EXTRACTABLE only to false, CKA_ALLOWED_MECHANISMS never
         * (docs/wrapping.md).  The copy itself is made non-modifiable and
         * non-copyable. */
        {CKA_MODIFIABLE, &yes, sizeof(yes)},
        {CKA_COPYABLE, &yes, sizeof(yes)},
        {CKA_ALLOWED_MECHANISMS, allowed, sizeof(allowed)},
        {CKA_ID, arg->id, P11_KEK_ID_LEN},
        {CKA_LABEL, (void *)arg->label, strlen(arg->label)},
    };

    (void)flags;
    if (!arg->given_id) {
        rv = P11_CALL(ctx, C_GenerateRandom, s, arg->id, P11_KEK_ID_LEN);
        if (rv != CKR_OK)
            goto out;
    }
    (void)cache_get(ctx, arg->id, &unused, &cache_gen);
    p11_objects_lock(ctx, 1);
    rv = P11_CALL(ctx, C_GenerateKey, s, &gen, tmpl, sizeof(tmpl) / sizeof(tmpl[0]), &h);
    p11_objects_unlock(ctx);
    if (rv != CKR_OK)
        goto out;
    cache_put(ctx, arg->id, h, cache_gen);
out:
    return rv;
}

CK_RV p11_kek_create(p11_ctx *ctx, const char *label, unsigned char id[P11_KEK_ID_LEN])
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    struct create_arg arg;

    if (ctx == NULL || label == NULL || id == NULL)
        goto out;
    arg.label = label;
    arg.given_id = 0;
    rv = p11_run(ctx, op_create, &arg);
    if (rv == CKR_OK)
        memcpy(id, arg.id, P11_KEK_ID_LEN);
out:
    return rv;
}

CK_RV p11_kek_create_with_id(p11_ctx *ctx, const char *label,
                             const unsigned char id[P11_KEK_ID_LEN])
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    struct create_arg arg;

    if (ctx == NULL || label == NULL || id == NULL)
        goto out;
    arg.label = label;
    arg.given_id = 1;
    memcpy(arg.id, id, P11_KEK_ID_LEN);
    rv = p11_run(ctx, op_create, &arg);
out:
    return rv;
}

/* ---- destroy, exists ------------------------------------------------------ */

static CK_RV op_destroy(p11_ctx *ctx, CK_SESSION_HANDLE s, void *arg, int *flags)
{
    const unsigned char *id = arg;
    CK_RV rv;
    CK_OBJECT_HANDLE h;

    /* No copy is made while the KEK and its copies go. */
    pthread_mutex_lock(&ctx->copy_mu);
    rv = p11_kek_handle(ctx, s, id, &h, flags);
    if (rv == CKR_KEY_HANDLE_INVALID)
        (void)destroy_copies(ctx, s, id, flags);
    if (rv != CKR_OK)
        goto out;
    rv = P11_CALL(ctx, C_DestroyObject, s, h);
    if (rv != CKR_OK)
        goto out;
    (void)destroy_copies(ctx, s, id, flags);
    cache_del(ctx, id);
out:
    pthread_mutex_unlock(&ctx->copy_mu);
    return rv;
}

CK_RV p11_kek_destroy(p11_ctx *ctx, const unsigned char id[P11_KEK_ID_LEN])
{
    if (ctx == NULL || id == NULL)
        return CKR_ARGUMENTS_BAD;
    return p11_run(ctx, op_destroy, (void *)id);
}

/* Always asks the token (another node may have destroyed it), and
 * refreshes the cache with the answer. */
static CK_RV op_exists(p11_ctx *ctx, CK_SESSION_HANDLE s, void *arg, int *flags)
{
    const unsigned char *id = arg;
    CK_RV rv;
    CK_OBJECT_HANDLE h;
    CK_OBJECT_HANDLE unused;
    unsigned long gen;

    (void)cache_get(ctx, id, &unused, &gen);
    rv = find_kek(ctx, s, id, &h, flags);
    if (rv == CKR_OK) {
        cache_put(ctx, id, h, gen);
    } else if (rv == CKR_KEY_HANDLE_INVALID) {
        pthread_mutex_lock(&ctx->copy_mu);
        (void)destroy_copies(ctx, s, id, flags);
        cache_del(ctx, id);
        pthread_mutex_unlock(&ctx->copy_mu);
    }
    return rv;
}

CK_RV p11_kek_exists(p11_ctx *ctx, const unsigned char id[P11_KEK_ID_LEN])
{
    if (ctx == NULL || id == NULL)
        return CKR_ARGUMENTS_BAD;
    return p11_run(ctx, op_exists, (void *)id);
}

struct label_arg {
    const unsigned char *id;
    char *out;
    size_t len;
};

static CK_RV op_label(p11_ctx *ctx, CK_SESSION_HANDLE s, void *argp, int *flags)
{
    struct label_arg *arg = argp;
    CK_OBJECT_HANDLE h;
    CK_ATTRIBUTE a = {CKA_LABEL, NULL, 0};
    char buf[256];
    CK_RV rv;

    rv = find_kek(ctx, s, arg->id, &h, flags);
    if (rv != CKR_OK)
        goto out;
    a.pValue = buf;
    a.ulValueLen = sizeof(buf) - 1;
    rv = P11_CALL(ctx, C_GetAttributeValue, s, h, &a, 1);
    if (rv != CKR_OK)
        goto out;
    if (a.ulValueLen >= sizeof(buf)) {
        rv = CKR_BUFFER_TOO_SMALL;
        goto out;
    }
    buf[a.ulValueLen] = '\0';
    snprintf(arg->out, arg->len, "%s", buf);
out:
    return rv;
}

CK_RV p11_kek_label(p11_ctx *ctx, const unsigned char id[P11_KEK_ID_LEN], char *out, size_t len)
{
    struct label_arg arg = {id, out, len};

    if (ctx == NULL || id == NULL || out == NULL || len == 0)
        return CKR_ARGUMENTS_BAD;
    out[0] = '\0';
    return p11_run(ctx, op_label, &arg);
}

/* ---- list --------------------------------------------------------------- */

struct list_arg {
    const char *prefix;
    size_t prefix_len;
    unsigned char (*ids)[P11_KEK_ID_LEN];
    size_t count, cap;
};

static CK_RV list_add(struct list_arg *arg, const unsigned char *id)
{
    if (arg->count == arg->cap) {
        size_t cap = arg->cap ? arg->cap * 2 : 16;
        void *p = realloc(arg->ids, cap * sizeof(*arg->ids));
        if (p == NULL)
            return CKR_HOST_MEMORY;
        arg->ids = p;
        arg->cap = cap;
    }
    memcpy(arg->ids[arg->count++], id, P11_KEK_ID_LEN);
    return CKR_OK;
}

/* Collect every secret-key handle, then read CKA_ID and CKA_LABEL of each
 * (the search is finished first, so no other call overlaps it). */
static CK_RV op_list(p11_ctx *ctx, CK_SESSION_HANDLE s, void *argp, int *flags)
{
    struct list_arg *arg = argp;
    CK_RV rv, rv2;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_BBOOL yes = CK_TRUE; /* token objects: not the session copies */
    CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof(cls)}, {CKA_TOKEN, &yes, sizeof(yes)}};
    CK_OBJECT_HANDLE *hs = NULL;
    size_t n_hs = 0, cap_hs = 0, i;
    CK_ULONG got;
    char *label = NULL;
    int searching = 0;

    arg->count = 0; /* a retry starts over */
    p11_objects_lock(ctx, 0);
    rv = P11_CALL(ctx, C_FindObjectsInit, s, tmpl, 2);
    if (rv != CKR_OK) {
        p11_objects_unlock(ctx);
        goto out;
    }
    searching = 1;
    do {
        if (cap_hs - n_hs < LIST_BATCH) {
            void *p = realloc(hs, (cap_hs + LIST_BATCH * 4) * sizeof(*hs));
            if (p == NULL) {
                rv = CKR_HOST_MEMORY;
                goto out;
            }
            hs = p;
            cap_hs += LIST_BATCH * 4;
        }
        got = 0;
        rv = P11_CALL(ctx, C_FindObjects, s, hs + n_hs, LIST_BATCH, &got);
        if (rv != CKR_OK)
            goto out;
        n_hs += got;
    } while (got == LIST_BATCH);
    searching = 0;
    rv = P11_CALL(ctx, C_FindObjectsFinal, s);
    p11_objects_unlock(ctx);
    if (rv != CKR_OK) {
        *flags |= P11_OP_DIRTY;
        goto out;
    }

    for (i = 0; i < n_hs; i++) {
        unsigned char id[P11_KEK_ID_LEN];
        CK_ATTRIBUTE a[] = {{CKA_ID, NULL, 0}, {CKA_LABEL, NULL, 0}};

        rv = P11_CALL(ctx, C_GetAttributeValue, s, hs[i], a, 2);
        if (rv != CKR_OK)
            goto out;
        if (a[0].ulValueLen != P11_KEK_ID_LEN || a[1].ulValueLen == (CK_ULONG)-1 ||
            a[1].ulValueLen < arg->prefix_len)
            continue;
        label = malloc(a[1].ulValueLen + 1);
        if (label == NULL) {
            rv = CKR_HOST_MEMORY;
            goto out;
        }
        a[0].pValue = id;
        a[1].pValue = label;
        rv = P11_CALL(ctx, C_GetAttributeValue, s, hs[i], a, 2);
        if (rv != CKR_OK)
            goto out;
        if (memcmp(label, arg->prefix, arg->prefix_len) == 0) {
            rv = list_add(arg, id);
            if (rv != CKR_OK)
                goto out;
        }
        free(label);
        label = NULL;
    }
    rv = CKR_OK;
out:
    if (searching) {
        rv2 = P11_CALL(ctx, C_FindObjectsFinal, s);
        p11_objects_unlock(ctx);
        if (rv2 != CKR_OK)
            *flags |= P11_OP_DIRTY;
    }
    free(label);
    free(hs);
    return rv;
}

CK_RV p11_kek_list(p11_ctx *ctx, const char *label_prefix, unsigned char (**ids)[P11_KEK_ID_LEN],
                   size_t *count)
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    struct list_arg arg;

    memset(&arg, 0, sizeof(arg));
    if (ctx == NULL || ids == NULL || count == NULL)
        goto out;
    arg.prefix = label_prefix ? label_prefix : "";
    arg.prefix_len = strlen(arg.prefix);
    rv = p11_run(ctx, op_list, &arg);
    if (rv != CKR_OK)
        goto out;
    *ids = arg.ids;
    *count = arg.count;
    arg.ids = NULL;
out:
    free(arg.ids);
    return rv;
}
