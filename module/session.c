/*
 * module/session.c - the session pool, login, and the operation driver that
 * recovers from lost sessions and devices (p11_run).
 *
 * The pool is a stack of idle read/write sessions bounded by max_sessions;
 * a caller takes one (opening a new one when the bound allows, waiting on
 * pool_cv otherwise) and gives it back.  Logging in happens on the first
 * session, and again only when a fresh session finds the token logged out
 * (PKCS#11 logs out when the last session closes).  A refused login is
 * sticky: ctx->login_refused remembers it and C_Login is never called again
 * on this context.
 *
 * Recovery: a failed operation is classified; a lost session drops it (and
 * every idle session, by bumping pool_gen), a stale object handle drops the
 * session and the KEK handle cache, a lost device re-initialises the
 * module under the write lock.  Then the operation runs once more.  A
 * session whose operation failed in any way is closed, never pooled: it
 * may still have an operation active (a token should end it on error, but
 * a network HSM whose request was lost on the way has not seen the
 * error), which would fail the next C_*Init of whoever takes it.
 * A failure that a token which lost its storage answers as well as a
 * healthy one may (CKR_GENERAL_ERROR, CKR_FUNCTION_FAILED, a stale or
 * missing object) is followed by a presence check (p11_token_present): if
 * the token no longer answers C_GetTokenInfo it is treated as a lost
 * device.  SoftHSM2 2.6.1 whose token folder is moved away answers so,
 * and keeps answering so after the folder is back, until the module is
 * finalised and initialised again: only the re-initialisation recovers.
 *
 * Locking: see internal.h.  Operations hold ctx->lock for reading;
 * pool_mu only guards the stack and counters and is never held across a
 * C_* call; p11_pool_prime/p11_pool_drain run under the write lock.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

enum action {
    ACT_DONE,    /* return rv */
    ACT_SESSION, /* session lost: drop it and the idle ones, retry */
    ACT_OBJECT,  /* stale handle: drop session and cache, retry */
    ACT_STALE,   /* the same, and the handle came from the cache */
    ACT_DIRTY,   /* session left mid-operation: drop it, return rv */
    ACT_REINIT,  /* device lost: drop, re-initialise, retry */
    ACT_LEFTOVER, /* the pooled session still had an operation active: drop, retry */
};

CK_RV p11_pool_setup(p11_ctx *ctx)
{
    CK_RV rv = CKR_HOST_MEMORY;

    ctx->idle = calloc(ctx->max_sessions, sizeof(*ctx->idle));
    if (ctx->idle == NULL)
        goto out;
    if (pthread_mutex_init(&ctx->pool_mu, NULL) != 0)
        goto out;
    if (pthread_cond_init(&ctx->pool_cv, NULL) != 0) {
        pthread_mutex_destroy(&ctx->pool_mu);
        goto out;
    }
    rv = CKR_OK;
out:
    if (rv != CKR_OK) {
        free(ctx->idle);
        ctx->idle = NULL;
    }
    return rv;
}

void p11_pool_teardown(p11_ctx *ctx)
{
    pthread_cond_destroy(&ctx->pool_cv);
    pthread_mutex_destroy(&ctx->pool_mu);
    free(ctx->idle);
    ctx->idle = NULL;
}

static int is_login_refusal(CK_RV rv)
{
    switch (rv) {
    case CKR_OK:
    case CKR_USER_ALREADY_LOGGED_IN:
    case CKR_USER_ANOTHER_ALREADY_LOGGED_IN:
    case CKR_HOST_MEMORY:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_MEMORY:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_CRYPTOKI_NOT_INITIALIZED: return 0;
    default: /* PIN_INCORRECT, PIN_LOCKED, PIN_EXPIRED, ... : never again */ return 1;
    }
}

static void refuse_login(p11_ctx *ctx, CK_RV rv)
{
    CK_RV expected = CKR_OK;

    if (atomic_compare_exchange_strong(&ctx->login_refused, &expected, rv))
        LOG_ERROR(P11_LOG_SUB, "login refused (%s): no further login will be attempted",
                  p11_rv_name(rv));
}

/* Log the user in on session s, once. */
static CK_RV login(p11_ctx *ctx, CK_SESSION_HANDLE s)
{
    CK_RV rv;
    CK_TOKEN_INFO info;

    rv = atomic_load(&ctx->login_refused);
    if (rv != CKR_OK)
        goto out;
    rv = P11_CALL(ctx, C_GetTokenInfo, atomic_load(&ctx->slot), &info);
    if (rv != CKR_OK)
        goto out;
    if (info.flags & (CKF_USER_PIN_LOCKED | CKF_USER_PIN_FINAL_TRY)) {
        LOG_ERROR(P11_LOG_SUB, "the token flags the user PIN as %s; not logging in",
                  (info.flags & CKF_USER_PIN_LOCKED) ? "locked" : "on its final try");
        rv = CKR_PIN_LOCKED;
        refuse_login(ctx, rv);
        goto out;
    }
    rv = P11_CALL(ctx, C_Login, s, CKU_USER, (CK_UTF8CHAR_PTR)ctx->pin, ctx->pin_len);
    if (rv == CKR_USER_ALREADY_LOGGED_IN)
        rv = CKR_OK;
    if (is_login_refusal(rv))
        refuse_login(ctx, rv);
    /* The token was logged out (its last session closed): handles of
     * private objects found before are void (SoftHSM2 renumbers them). */
    if (rv == CKR_OK)
        p11_cache_flush(ctx);
out:
    return rv;
}

/* Open a read/write session, logged in as the user. */
static CK_RV open_session(p11_ctx *ctx, CK_SESSION_HANDLE *out)
{
    CK_RV rv;
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    CK_SESSION_INFO info;
    int opened = 0;

    rv = atomic_load(&ctx->login_refused);
    if (rv != CKR_OK)
        goto out;
    rv = P11_CALL(ctx, C_OpenSession, atomic_load(&ctx->slot), CKF_SERIAL_SESSION | CKF_RW_SESSION,
                  NULL, NULL, &s);
    if (rv != CKR_OK)
        goto out;
    opened = 1;
    rv = P11_CALL(ctx, C_GetSessionInfo, s, &info);
    if (rv != CKR_OK)
        goto out;
    if (info.state != CKS_RW_USER_FUNCTIONS) {
        rv = login(ctx, s);
        if (rv != CKR_OK)
            goto out;
    }
    *out = s;
    opened = 0;
out:
    if (opened)
        (void)P11_CALL_QUIET(ctx, C_CloseSession, s);
    return rv;
}

/* Take a session from the pool (or open one); *gen receives the pool
 * generation it belongs to. */
static CK_RV acquire(p11_ctx *ctx, CK_SESSION_HANDLE *s, unsigned long *gen)
{
    CK_RV rv = CKR_OK;

    pthread_mutex_lock(&ctx->pool_mu);
    for (;;) {
        if (ctx->n_idle > 0) {
            *s = ctx->idle[--ctx->n_idle];
            *gen = ctx->pool_gen;
            pthread_mutex_unlock(&ctx->pool_mu);
            goto out;
        }
        if (ctx->n_open < ctx->max_sessions)
            break;
        pthread_cond_wait(&ctx->pool_cv, &ctx->pool_mu);
    }
    ctx->n_open++;
    *gen = ctx->pool_gen;
    pthread_mutex_unlock(&ctx->pool_mu);

    rv = open_session(ctx, s);
    if (rv != CKR_OK) {
        pthread_mutex_lock(&ctx->pool_mu);
        ctx->n_open--;
        pthread_cond_signal(&ctx->pool_cv);
        pthread_mutex_unlock(&ctx->pool_mu);
    }
out:
    return rv;
}

/* Give a session back, or drop it (closing it unless it is already dead). */
static void release(p11_ctx *ctx, CK_SESSION_HANDLE s, unsigned long gen, int drop, int dead)
{
    pthread_mutex_lock(&ctx->pool_mu);
    if (!drop && gen == ctx->pool_gen && ctx->n_idle < ctx->max_sessions) {
        ctx->idle[ctx->n_idle++] = s;
        pthread_cond_signal(&ctx->pool_cv);
        pthread_mutex_unlock(&ctx->pool_mu);
        return;
    }
    ctx->n_open--;
    pthread_cond_signal(&ctx->pool_cv);
    pthread_mutex_unlock(&ctx->pool_mu);
    if (!dead)
        (void)P11_CALL_QUIET(ctx, C_CloseSession, s);
}

/* Every idle session is suspect (one was found closed behind our back):
 * drop them all; sessions in use are dropped when given back. */
static void flush_idle(p11_ctx *ctx)
{
    CK_SESSION_HANDLE s;

    pthread_mutex_lock(&ctx->pool_mu);
    ctx->pool_gen++;
    pthread_mutex_unlock(&ctx->pool_mu);
    for (;;) {
        pthread_mutex_lock(&ctx->pool_mu);
        if (ctx->n_idle == 0) {
            pthread_mutex_unlock(&ctx->pool_mu);
            break;
        }
        s = ctx->idle[--ctx->n_idle];
        ctx->n_open--;
        pthread_cond_broadcast(&ctx->pool_cv);
        pthread_mutex_unlock(&ctx->pool_mu);
        (void)P11_CALL_QUIET(ctx, C_CloseSession, s);
    }
}

CK_RV p11_pool_prime(p11_ctx *ctx)
{
    CK_RV rv;
    CK_SESSION_HANDLE s;

    rv = open_session(ctx, &s);
    if (rv != CKR_OK)
        goto out;
    pthread_mutex_lock(&ctx->pool_mu);
    ctx->idle[ctx->n_idle++] = s;
    ctx->n_open++;
    pthread_mutex_unlock(&ctx->pool_mu);
out:
    return rv;
}

void p11_pool_drain(p11_ctx *ctx, int logout)
{
    pthread_mutex_lock(&ctx->pool_mu);
    if (logout && ctx->n_idle > 0)
        (void)P11_CALL_QUIET(ctx, C_Logout, ctx->idle[0]);
    while (ctx->n_idle > 0)
        (void)P11_CALL_QUIET(ctx, C_CloseSession, ctx->idle[--ctx->n_idle]);
    ctx->n_open = 0;
    ctx->pool_gen++;
    pthread_mutex_unlock(&ctx->pool_mu);
}

CK_RV p11_token_present(p11_ctx *ctx)
{
    CK_TOKEN_INFO info;

    return P11_CALL_QUIET(ctx, C_GetTokenInfo, atomic_load(&ctx->slot), &info);
}

/* p11_refresh: at most one re-initialisation per this period. */
#define P11_MISSING_REINIT_MS 10000u

static int missing_reinit_due(p11_ctx *ctx)
{
    struct timespec ts;
    uint64_t now, last;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    /* Shifted by a period, so that the first one (last == 0) is due. */
    now = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u + P11_MISSING_REINIT_MS;
    last = atomic_load(&ctx->missing_reinit_ms);
    return now - last >= P11_MISSING_REINIT_MS &&
           atomic_compare_exchange_strong(&ctx->missing_reinit_ms, &last, now);
}

/* What a token that lost its objects or its storage says (as well as a
 * healthy token for other reasons): worth a presence check. */
static int is_suspect(CK_RV rv, enum action act)
{
    if (act != ACT_DONE && act != ACT_OBJECT && act != ACT_STALE && act != ACT_DIRTY)
        return 0;
    switch (rv) {
    case CKR_GENERAL_ERROR:
    case CKR_FUNCTION_FAILED:
    case CKR_OBJECT_HANDLE_INVALID:
    case CKR_KEY_HANDLE_INVALID: return 1;
    default: return 0;
    }
}

static enum action classify(CK_RV rv, int flags)
{
    if (flags & P11_OP_DIRTY)
        return ACT_DIRTY;
    switch (rv) {
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED: return ACT_SESSION;
    case CKR_OBJECT_HANDLE_INVALID: return (flags & P11_OP_CACHED) ? ACT_STALE : ACT_OBJECT;
    case CKR_KEY_HANDLE_INVALID: return (flags & P11_OP_CACHED) ? ACT_STALE : ACT_DONE;
    /* Not flagged dirty by op: the operation was already active when op
     * started (an earlier call failed, e.g. C_Encrypt with
     * CKR_GENERAL_ERROR, without the token terminating it).  Nothing ran:
     * close that session and run op once more on another. */
    case CKR_OPERATION_ACTIVE: return ACT_LEFTOVER;
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_REMOVED:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_CRYPTOKI_NOT_INITIALIZED: return ACT_REINIT;
    default: return ACT_DONE;
    }
}

/* One try under the read lock.  *ran says whether op ran at all. */
static CK_RV attempt(p11_ctx *ctx, p11_op_fn op, void *arg, enum action *act, int *ran,
                     unsigned long *gen_seen)
{
    CK_RV rv;
    CK_SESSION_HANDLE s;
    unsigned long pool_gen = 0, flush_gen;
    int flags = 0;

    *ran = 0;
    pthread_rwlock_rdlock(&ctx->lock);
    *gen_seen = atomic_load(&ctx->gen);
    flush_gen = atomic_load(&ctx->flush_gen);
    rv = acquire(ctx, &s, &pool_gen);
    if (rv != CKR_OK) {
        /* A sticky login refusal or no memory: give up.  Anything else
         * means no fresh session could be opened: re-initialise. */
        if (atomic_load(&ctx->login_refused) != CKR_OK || rv == CKR_HOST_MEMORY)
            *act = ACT_DONE;
        else
            *act = ACT_REINIT;
        goto out;
    }
    *ran = 1;
    rv = op(ctx, s, arg, &flags);
    *act = classify(rv, flags);
    if (is_suspect(rv, *act)) {
        CK_RV present = p11_token_present(ctx);

        if (present != CKR_OK) {
            LOG_WARN(P11_LOG_SUB,
                     "%s, and the token does not answer C_GetTokenInfo (%s): "
                     "treating it as removed",
                     p11_rv_name(rv), p11_rv_name(present));
            rv = CKR_TOKEN_NOT_PRESENT;
            *act = ACT_REINIT;
        }
    }
    switch (*act) {
    case ACT_DONE: release(ctx, s, pool_gen, rv != CKR_OK, 0); break;
    case ACT_SESSION:
        release(ctx, s, pool_gen, 1, 1);
        flush_idle(ctx);
        break;
    case ACT_OBJECT:
    case ACT_STALE:
        release(ctx, s, pool_gen, 1, 0);
        /* Not again when another thread flushed meanwhile: its flush
         * dropped our stale handle too (and a second one would drop the
         * KEK copies just made again). */
        p11_cache_flush_since(ctx, flush_gen);
        break;
    case ACT_DIRTY:
        release(ctx, s, pool_gen, 1, 0);
        *act = ACT_DONE;
        break;
    case ACT_LEFTOVER: release(ctx, s, pool_gen, 1, 0); break;
    case ACT_REINIT: release(ctx, s, pool_gen, 1, 1); break;
    }
out:
    pthread_rwlock_unlock(&ctx->lock);
    return rv;
}

/* Finalise, initialise, find the token again (slot ids change) and log in
 * again, unless another thread already did since gen_seen. */
static CK_RV reinit(p11_ctx *ctx, unsigned long gen_seen)
{
    CK_RV rv = CKR_OK;

    pthread_rwlock_wrlock(&ctx->lock);
    if (atomic_load(&ctx->gen) != gen_seen && ctx->initialized)
        goto out;
    LOG_WARN(P11_LOG_SUB, "re-initialising the PKCS#11 module %s", ctx->module);
    p11_pool_drain(ctx, 0);
    p11_cache_flush(ctx);
    p11_module_fini(ctx);
    rv = p11_module_init(ctx);
    if (rv == CKR_OK)
        rv = p11_pool_prime(ctx);
    atomic_fetch_add(&ctx->gen, 1);
    if (rv == CKR_OK)
        LOG_INFO(P11_LOG_SUB, "token found again in slot %lu",
                 (unsigned long)atomic_load(&ctx->slot));
    else
        LOG_ERROR(P11_LOG_SUB, "re-initialisation failed: %s", p11_rv_name(rv));
out:
    pthread_rwlock_unlock(&ctx->lock);
    return rv;
}

CK_RV p11_refresh(p11_ctx *ctx)
{
    unsigned long gen;

    if (!missing_reinit_due(ctx))
        return CKR_FUNCTION_REJECTED;
    LOG_WARN(P11_LOG_SUB, "a key object the store knows was not found although the token "
                          "answers: re-initialising the module to refresh its view of the token");
    gen = atomic_load(&ctx->gen);
    return reinit(ctx, gen);
}

CK_RV p11_run(p11_ctx *ctx, p11_op_fn op, void *arg)
{
    CK_RV rv;
    enum action act;
    unsigned long gen_seen;
    int ran, runs = 0, reinits = 0, stale_retries = 0;

    for (;;) {
        rv = attempt(ctx, op, arg, &act, &ran, &gen_seen);
        runs += ran;
        if (act == ACT_DONE)
            break;
        /* A stale cached handle is a cache miss, not a failed operation:
         * it earns one extra run (a lost session may void every handle
         * while another thread is between cache lookup and use). */
        if (act == ACT_STALE && runs >= 2 && stale_retries++ == 0)
            runs--;
        if (runs >= 2) /* retried once already */
            break;
        if (act == ACT_REINIT) {
            CK_RV rv2;

            if (reinits++ > 0)
                break;
            rv2 = reinit(ctx, gen_seen);
            if (rv2 != CKR_OK) {
                rv = rv2;
                break;
            }
        }
        LOG_DEBUG(P11_LOG_SUB, "retrying after %s", p11_rv_name(rv));
    }
    return rv;
}
