/*
 * module/internal.h - what the files of module/ share and nobody else sees.
 *
 * The context (struct p11_ctx), the one wrapper every C_* call goes
 * through (P11_CALL), the operation driver that runs an operation on a
 * pooled session and recovers once from a lost session or device
 * (p11_run), the KEK handle cache and the secret-memory helpers.
 *
 * Locking (the only locks of the layer, always taken in this order):
 *   ctx->lock      pthread_rwlock.  Every operation holds it for reading
 *                  while it uses a session; re-initialisation and
 *                  p11_close hold it for writing, so they never run while
 *                  a session is in use.  Fields marked [W] change only
 *                  under the write lock.
 *   ctx->pool_mu   the idle-session stack and counters [P] (+ pool_cv).
 *   ctx->copy_mu   the session owning the KEK copies [K]; held across
 *                  C_OpenSession/C_CopyObject/C_CloseSession of that
 *                  session only, and taken before cache_mu when both are.
 *   ctx->cache_mu  the KEK handle cache [C].
 *   ctx->objects_rw  token-object creation against searches: held for
 *                  writing across every C_GenerateKey of a token object,
 *                  for reading from C_FindObjectsInit to
 *                  C_FindObjectsFinal (p11_objects_lock).  SoftHSM2 2.6.1
 *                  fails a C_GenerateKey that overlaps another session's
 *                  C_FindObjects (CKR_GENERAL_ERROR or
 *                  CKR_TEMPLATE_INCONSISTENT) and leaves a half-made
 *                  object behind (no CKA_LABEL, no CKA_ID).  Creations are
 *                  rare (key create, rotate) and searches are cache misses.
 *                  Taken last (under copy_mu by destroy and exists), and
 *                  nothing is taken under it.
 * pool_mu and cache_mu are never held together, nor across a C_* call
 * (except by p11_pool_drain, which runs under the write lock, when no
 * other thread can be waiting for pool_mu).  pool_mu is never taken
 * under copy_mu.
 */
#ifndef P11KMS_MODULE_INTERNAL_H
#define P11KMS_MODULE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <time.h>

#include <p11-kit/uri.h>

#include "log.h"
#include "p11.h"

#define P11_LOG_SUB          "token"
#define P11_PIN_MAX          256 /* longest accepted PIN, bytes */
#define P11_DEFAULT_SESSIONS 64

/* PKCS#11 3.0 return values that the 2.40 header of p11-kit lacks. */
#ifndef CKR_AEAD_DECRYPT_FAILED
#define CKR_AEAD_DECRYPT_FAILED (0x35UL)
#endif
#ifndef CKR_TOKEN_RESOURCE_EXCEEDED
#define CKR_TOKEN_RESOURCE_EXCEEDED     (0x201UL)
#define CKR_OPERATION_CANCEL_FAILED     (0x202UL)
#define CKR_KEY_EXHAUSTED               (0x203UL)
#define CKR_PENDING                     (0x204UL)
#define CKR_SESSION_ASYNC_NOT_SUPPORTED (0x205UL)
#define CKR_SEED_RANDOM_REQUIRED        (0x206UL)
#define CKR_OPERATION_NOT_VALIDATED     (0x207UL)
#define CKR_TOKEN_NOT_INITIALIZED       (0x208UL)
#define CKR_PARAMETER_SET_NOT_SUPPORTED (0x209UL)
#endif

/* The session-object copy of a KEK (kek.c): not tried yet, made, or
 * refused by the token (the KEK is not CKA_COPYABLE: use the token object). */
enum p11_copy_state { P11_COPY_NONE, P11_COPY_HAVE, P11_COPY_REFUSED };

/* How long a copy is used before the token object behind it is checked
 * again (a KEK destroyed by another node stops wrapping here within it). */
#define P11_COPY_RECHECK_MS 1000

/* One cached KEK handle: CKA_ID -> object handle (chained hash table),
 * plus the handle of its session-object copy when there is one. */
typedef struct p11_kek_entry {
    struct p11_kek_entry *next;
    unsigned char id[P11_KEK_ID_LEN];
    CK_OBJECT_HANDLE handle;
    CK_OBJECT_HANDLE copy;    /* valid when copy_state == P11_COPY_HAVE */
    int copy_state;           /* enum p11_copy_state */
    uint64_t copy_checked_ms; /* CLOCK_MONOTONIC ms of the last token check */
} p11_kek_entry;

/* ---- call statistics (stats.c) ---------------------------------------- */

/* A C_* function's slot: its position in CK_FUNCTION_LIST. */
#define P11_FN_INDEX(fn)                                                                           \
    ((offsetof(CK_FUNCTION_LIST, fn) - offsetof(CK_FUNCTION_LIST, C_Initialize)) / sizeof(void *))
#define P11_FN_SLOTS 72 /* > the 68 functions of PKCS#11 2.40 */

/* Relaxed atomic counters, written by every call, read by p11_stats_get. */
typedef struct p11_call_stats {
    _Atomic uint64_t calls[P11_FN_SLOTS];
    _Atomic uint64_t sum_ns[P11_FN_SLOTS];
    _Atomic uint64_t bucket[P11_FN_SLOTS][P11_STATS_BUCKETS]; /* not cumulative */
    _Atomic CK_RV err_rv[P11_STATS_MAX_ERRORS];               /* CKR_OK: free slot */
    _Atomic uint64_t err_count[P11_STATS_MAX_ERRORS];
    _Atomic uint64_t err_other; /* errors of a CK_RV that found no slot */
} p11_call_stats;

/* Count one call of the function in slot fn_index, begun at p11_call_t0. */
void p11_stats_count(p11_ctx *ctx, size_t fn_index, CK_RV rv);

/* When the current thread's C_* call began (set by P11_CALL). */
extern _Thread_local uint64_t p11_call_t0;

static inline uint64_t p11_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

struct p11_ctx {
    CK_FUNCTION_LIST *fl; /* managed by p11-kit; stable across re-init */
    p11_call_stats stats; /* lock-free; see stats.c */
    char *module;         /* as configured (path or p11-kit name) */
    P11KitUri *uri;       /* parsed token URI */
    char *pin;            /* mlocked copy (p11_secret_alloc) */
    size_t pin_len;
    size_t max_sessions;

    pthread_rwlock_t lock;
    _Atomic CK_SLOT_ID slot;     /* [W] the selected token's slot */
    _Atomic unsigned long gen;   /* [W] bumped by every re-initialisation */
    int initialized;             /* [W] C_Initialize done, not finalised */
    _Atomic CK_RV login_refused; /* sticky: CKR_OK, or why C_Login refused */
    /* CLOCK_MONOTONIC ms of the last re-initialisation for a key object
     * the token did not find (session.c: at most one per
     * P11_MISSING_REINIT_MS). */
    _Atomic uint64_t missing_reinit_ms;

    pthread_mutex_t pool_mu;
    pthread_cond_t pool_cv;
    CK_SESSION_HANDLE *idle; /* [P] stack of idle sessions, max_sessions */
    size_t n_idle;           /* [P] */
    size_t n_open;           /* [P] idle + in use */
    unsigned long pool_gen;  /* [P] bumped when every session is suspect */

    pthread_mutex_t cache_mu;
    p11_kek_entry **buckets;         /* [C] */
    size_t n_buckets;                /* [C] power of two */
    size_t n_entries;                /* [C] */
    unsigned long cache_gen;         /* [C] bumped by every flush */
    _Atomic unsigned long flush_gen; /* bumped by every whole flush only */

    /* The session that owns the KEK copies (kek.c): never pooled, opened
     * on the first copy, closed (destroying every copy) by a flush. */
    pthread_mutex_t copy_mu;
    CK_SESSION_HANDLE copy_session; /* [K] CK_INVALID_HANDLE when closed */

    pthread_rwlock_t objects_rw; /* creation vs search (see above) */
};

/* ---- the one wrapper every C_* call goes through ---------------------- */

/* Counts the call (latency since p11_call_t0, CK_RV) in ctx->stats, logs
 * a failure (error level, or debug level when quiet) with the CKR_* name,
 * the C_* function, file, line and caller; returns rv. */
CK_RV p11_call_check(p11_ctx *ctx, size_t fn_index, CK_RV rv, int quiet, const char *fn,
                     const char *file, int line, const char *func);

/* The comma operator sequences the start time before the call. */
#define P11_CALL_(quiet, ctx, fn, ...)                                                             \
    p11_call_check((ctx), P11_FN_INDEX(fn),                                                        \
                   (p11_call_t0 = p11_now_ns(), (ctx)->fl->fn == NULL                              \
                                                    ? CKR_FUNCTION_NOT_SUPPORTED                   \
                                                    : (ctx)->fl->fn(__VA_ARGS__)),                 \
                   (quiet), #fn, __FILE__, __LINE__, __func__)
/* P11_CALL(ctx, C_Encrypt, session, ...) */
#define P11_CALL(ctx, fn, ...) P11_CALL_(0, ctx, fn, __VA_ARGS__)
/* For failures the caller expects and handles (logged at debug level). */
#define P11_CALL_QUIET(ctx, fn, ...) P11_CALL_(1, ctx, fn, __VA_ARGS__)

/* ---- load.c ----------------------------------------------------------- */

/* C_Initialize and find the token by URI.  Caller holds the write lock (or
 * owns ctx exclusively). */
CK_RV p11_module_init(p11_ctx *ctx);
/* C_Finalize (errors ignored).  Same locking. */
void p11_module_fini(p11_ctx *ctx);

/* ---- session.c -------------------------------------------------------- */

/* An operation run by p11_run on a logged-in session.  It may set bits in
 * *flags: P11_OP_CACHED when it used a cached KEK handle (so that
 * CKR_KEY_HANDLE_INVALID means "stale cache", worth one retry), and
 * P11_OP_DIRTY when it failed with an operation still active in the
 * session (the session is then closed rather than pooled). */
#define P11_OP_CACHED 1
#define P11_OP_DIRTY  2
typedef CK_RV (*p11_op_fn)(p11_ctx *ctx, CK_SESSION_HANDLE s, void *arg, int *flags);

/* Run op on a pooled session under the read lock.  On a lost session,
 * object handle or device: drop the session and the handle cache,
 * re-initialise when needed (once), retry once. */
CK_RV p11_run(p11_ctx *ctx, p11_op_fn op, void *arg);

/* C_GetTokenInfo on the selected slot: CKR_OK while the token answers
 * (quiet: the caller logs).  Caller holds the read lock. */
CK_RV p11_token_present(p11_ctx *ctx);

/* Open the first session and log in (p11_open and re-init).  Caller holds
 * the write lock or owns ctx. */
CK_RV p11_pool_prime(p11_ctx *ctx);
/* Close every idle session (errors ignored), logging out first when
 * logout is set.  Same locking. */
void p11_pool_drain(p11_ctx *ctx, int logout);
CK_RV p11_pool_setup(p11_ctx *ctx);
void p11_pool_teardown(p11_ctx *ctx);

/* ---- kek.c: the handle cache ------------------------------------------ */

CK_RV p11_cache_setup(p11_ctx *ctx);
void p11_cache_teardown(p11_ctx *ctx);
/* Drop every cached handle and close the copy session (destroying every
 * KEK copy). */
void p11_cache_flush(p11_ctx *ctx);
/* The same, unless a whole flush already happened since flush_gen was
 * seen (the stale handle that asked for it is gone then). */
void p11_cache_flush_since(p11_ctx *ctx, unsigned long seen);
/* Take objects_rw: for writing around a token-object creation (create
 * set), for reading around a search. */
void p11_objects_lock(p11_ctx *ctx, int create);
void p11_objects_unlock(p11_ctx *ctx);
/* The token object's handle for id: from the cache, else C_FindObjects
 * (then cached).  Sets P11_OP_CACHED in *flags when cached.
 * CKR_KEY_HANDLE_INVALID when there is none. */
CK_RV p11_kek_handle(p11_ctx *ctx, CK_SESSION_HANDLE s, const unsigned char *id,
                     CK_OBJECT_HANDLE *h, int *flags);
/* The handle to encrypt/decrypt with under KEK id: its session-object copy
 * (made on first use with C_CopyObject, CKA_TOKEN false), or the token
 * object when the token refuses the copy.  Sets P11_OP_CACHED whenever a
 * copy is returned (a copy is a cached derivative: a failure with it is a
 * stale cache, worth one retry). */
CK_RV p11_kek_use_handle(p11_ctx *ctx, CK_SESSION_HANDLE s, const unsigned char *id,
                         CK_OBJECT_HANDLE *h, int *flags);

/* ---- pin.c: secret memory --------------------------------------------- */

/* A zeroed, mlocked, MADV_DONTDUMP buffer of at least len bytes. */
void *p11_secret_alloc(size_t len);
/* Wipe (OPENSSL_cleanse) and release.  NULL is a no-op. */
void p11_secret_free(void *p, size_t len);

#endif
