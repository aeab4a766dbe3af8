/*
 * module/internal.h - what the files of module/ share and nobody else sees.
 *
 * The context (struct p11_ctx), the one wrapper every C_* call goes
 * through (P11_CALL), the operation driver that runs an operation on a
 * pooled session and recovers once from a lost session or device
 * (p11_run), the KEK handle cache and the secret-memory helpers.
 *
 * Locking (the only three locks of the layer, always taken in this order):
 *   ctx->lock      pthread_rwlock.  Every operation holds it for reading
 *                  while it uses a session; re-initialisation and
 *                  p11_close hold it for writing, so they never run while
 *                  a session is in use.  Fields marked [W] change only
 *                  under the write lock.
 *   ctx->pool_mu   the idle-session stack and counters [P] (+ pool_cv).
 *   ctx->cache_mu  the KEK handle cache [C].
 * pool_mu and cache_mu are never held together, nor across a C_* call
 * (except by p11_pool_drain, which runs under the write lock, when no
 * other thread can be waiting for pool_mu).
 */
#ifndef P11KMS_MODULE_INTERNAL_H
#define P11KMS_MODULE_INTERNAL_H

#include <pthread.h>
#include <stdatomic.h>

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

/* One cached KEK handle: CKA_ID -> object handle (chained hash table). */
typedef struct p11_kek_entry {
    struct p11_kek_entry *next;
    unsigned char id[P11_KEK_ID_LEN];
    CK_OBJECT_HANDLE handle;
} p11_kek_entry;

struct p11_ctx {
    CK_FUNCTION_LIST *fl; /* managed by p11-kit; stable across re-init */
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

    pthread_mutex_t pool_mu;
    pthread_cond_t pool_cv;
    CK_SESSION_HANDLE *idle; /* [P] stack of idle sessions, max_sessions */
    size_t n_idle;           /* [P] */
    size_t n_open;           /* [P] idle + in use */
    unsigned long pool_gen;  /* [P] bumped when every session is suspect */

    pthread_mutex_t cache_mu;
    p11_kek_entry **buckets; /* [C] */
    size_t n_buckets;        /* [C] power of two */
    size_t n_entries;        /* [C] */
    unsigned long cache_gen; /* [C] bumped by every flush */
};

/* ---- the one wrapper every C_* call goes through ---------------------- */

/* Logs a failure (error level, or debug level when quiet) with the CKR_*
 * name, the C_* function, file, line and caller; returns rv. */
CK_RV p11_call_check(CK_RV rv, int quiet, const char *fn, const char *file, int line,
                     const char *func);

#define P11_CALL_(quiet, ctx, fn, ...)                                                             \
    p11_call_check((ctx)->fl->fn == NULL ? CKR_FUNCTION_NOT_SUPPORTED                              \
                                         : (ctx)->fl->fn(__VA_ARGS__),                             \
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
void p11_cache_flush(p11_ctx *ctx);
/* The KEK handle for id: from the cache, else C_FindObjects (then cached).
 * Sets P11_OP_CACHED in *flags when cached.  CKR_KEY_HANDLE_INVALID when there is none. */
CK_RV p11_kek_handle(p11_ctx *ctx, CK_SESSION_HANDLE s, const unsigned char *id,
                     CK_OBJECT_HANDLE *h, int *flags);

/* ---- pin.c: secret memory --------------------------------------------- */

/* A zeroed, mlocked, MADV_DONTDUMP buffer of at least len bytes. */
void *p11_secret_alloc(size_t len);
/* Wipe (OPENSSL_cleanse) and release.  NULL is a no-op. */
void p11_secret_free(void *p, size_t len);

#endif
