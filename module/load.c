/*
 * module/load.c - loading the PKCS#11 module through p11-kit, selecting the
 * token by RFC 7512 URI, C_Initialize / C_Finalize, and the life of the
 * context (p11_open, p11_close) plus the cheap queries on it.
 *
 * Locking: p11_open owns the context alone until it returns.
 * p11_module_init/fini run either there or under the write lock of
 * ctx->lock (re-initialisation in session.c, p11_close).  The queries
 * (p11_token_label, p11_probe) go through p11_run like every operation.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <p11-kit/p11-kit.h>

#include "internal.h"

/* Load a module: a path ("/usr/lib/.../libsofthsm2.so", or any name with a
 * '/' or ending in ".so"), else a p11-kit registered module name
 * ("softhsm2"), else a file name relative to p11-kit's module directory. */
static CK_FUNCTION_LIST *load_module(const char *name)
{
    CK_FUNCTION_LIST **all = NULL;
    CK_FUNCTION_LIST *fl = NULL;
    size_t n = 0, i;
    size_t len = strlen(name);

    if (strchr(name, '/') != NULL || (len > 3 && strcmp(name + len - 3, ".so") == 0))
        goto direct;

    all = p11_kit_modules_load(NULL, 0);
    if (all != NULL) {
        fl = p11_kit_module_for_name(all, name);
        for (n = 0; all[n] != NULL; n++)
            ;
        /* Keep ours: move the last module into its place, release the rest. */
        for (i = 0; fl != NULL && i < n; i++) {
            if (all[i] == fl) {
                all[i] = all[n - 1];
                all[n - 1] = NULL;
                break;
            }
        }
        p11_kit_modules_release(all);
        all = NULL;
    }
    if (fl != NULL) {
        LOG_DEBUG(P11_LOG_SUB, "loaded registered p11-kit module %s", name);
        goto out;
    }

direct:
    fl = p11_kit_module_load(name, 0);
    if (fl == NULL)
        LOG_ERROR(P11_LOG_SUB, "cannot load PKCS#11 module %s: %s", name, p11_kit_message());
out:
    return fl;
}

/* Find the slot whose token matches ctx->uri (first match wins). */
static CK_RV find_slot(p11_ctx *ctx)
{
    CK_RV rv;
    CK_SLOT_ID *slots = NULL;
    CK_ULONG n = 0, i;
    CK_INFO minfo;
    int found = 0;

    rv = P11_CALL(ctx, C_GetInfo, &minfo);
    if (rv != CKR_OK)
        goto out;
    if (!p11_kit_uri_match_module_info(ctx->uri, &minfo)) {
        LOG_ERROR(P11_LOG_SUB, "the module does not match the token URI");
        rv = CKR_TOKEN_NOT_PRESENT;
        goto out;
    }
    rv = P11_CALL(ctx, C_GetSlotList, CK_TRUE, NULL, &n);
    if (rv != CKR_OK)
        goto out;
    slots = calloc(n ? n : 1, sizeof(*slots));
    if (slots == NULL) {
        rv = CKR_HOST_MEMORY;
        goto out;
    }
    rv = P11_CALL(ctx, C_GetSlotList, CK_TRUE, slots, &n);
    if (rv != CKR_OK)
        goto out;
    for (i = 0; i < n; i++) {
        CK_SLOT_INFO sinfo;
        CK_TOKEN_INFO tinfo;

        if (P11_CALL(ctx, C_GetSlotInfo, slots[i], &sinfo) != CKR_OK ||
            !p11_kit_uri_match_slot_info(ctx->uri, &sinfo))
            continue;
        if (P11_CALL(ctx, C_GetTokenInfo, slots[i], &tinfo) != CKR_OK ||
            !p11_kit_uri_match_token_info(ctx->uri, &tinfo))
            continue;
        if (!found) {
            atomic_store(&ctx->slot, slots[i]);
            found = 1;
        } else {
            LOG_WARN(P11_LOG_SUB, "several tokens match the URI; using slot %lu",
                     (unsigned long)atomic_load(&ctx->slot));
            break;
        }
    }
    if (!found) {
        LOG_ERROR(P11_LOG_SUB, "no token matches the URI (%lu slots with a token)",
                  (unsigned long)n);
        rv = CKR_TOKEN_NOT_PRESENT;
        goto out;
    }
    rv = CKR_OK;
out:
    free(slots);
    return rv;
}

CK_RV p11_module_init(p11_ctx *ctx)
{
    CK_RV rv;
    CK_C_INITIALIZE_ARGS args;

    memset(&args, 0, sizeof(args));
    args.flags = CKF_OS_LOCKING_OK; /* SoftHSM2 crashes under threads without */
    rv = P11_CALL(ctx, C_Initialize, &args);
    if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED)
        rv = CKR_OK;
    if (rv != CKR_OK)
        goto out;
    ctx->initialized = 1;
    rv = find_slot(ctx);
out:
    return rv;
}

void p11_module_fini(p11_ctx *ctx)
{
    if (ctx->initialized)
        (void)P11_CALL_QUIET(ctx, C_Finalize, NULL);
    ctx->initialized = 0;
}

CK_RV p11_open(const p11_config *cfg, p11_ctx **out)
{
    CK_RV rv = CKR_HOST_MEMORY;
    p11_ctx *ctx = NULL;
    int locks = 0;
    int r;
    pthread_rwlockattr_t rwattr;

    if (cfg == NULL || out == NULL || cfg->module == NULL || cfg->uri == NULL || cfg->pin == NULL) {
        rv = CKR_ARGUMENTS_BAD;
        goto out;
    }
    ctx = calloc(1, sizeof(*ctx));
    if (ctx == NULL)
        goto out;
    atomic_init(&ctx->slot, 0);
    atomic_init(&ctx->gen, 0);
    atomic_init(&ctx->login_refused, CKR_OK);
    ctx->max_sessions = cfg->max_sessions ? cfg->max_sessions : P11_DEFAULT_SESSIONS;

    ctx->pin_len = strlen(cfg->pin);
    if (ctx->pin_len == 0 || ctx->pin_len > P11_PIN_MAX) {
        LOG_ERROR(P11_LOG_SUB, "the PIN must be 1 to %d bytes long", P11_PIN_MAX);
        rv = CKR_PIN_LEN_RANGE;
        goto out;
    }
    ctx->pin = p11_secret_alloc(P11_PIN_MAX + 1);
    ctx->module = strdup(cfg->module);
    ctx->uri = p11_kit_uri_new();
    if (ctx->pin == NULL || ctx->module == NULL || ctx->uri == NULL)
        goto out;
    memcpy(ctx->pin, cfg->pin, ctx->pin_len);

    r = p11_kit_uri_parse(cfg->uri, P11_KIT_URI_FOR_ANY, ctx->uri);
    if (r != P11_KIT_URI_OK) {
        LOG_ERROR(P11_LOG_SUB, "bad token URI \"%s\": %s", cfg->uri, p11_kit_uri_message(r));
        rv = CKR_ARGUMENTS_BAD;
        goto out;
    }

    /* Writer preference: a re-initialisation is not starved by a steady
     * stream of operations (no reader ever takes the lock twice). */
    pthread_rwlockattr_init(&rwattr);
    pthread_rwlockattr_setkind_np(&rwattr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    r = pthread_rwlock_init(&ctx->lock, &rwattr);
    pthread_rwlockattr_destroy(&rwattr);
    if (r != 0)
        goto out;
    locks = 1;
    rv = p11_pool_setup(ctx);
    if (rv != CKR_OK)
        goto out;
    locks = 2;
    rv = p11_cache_setup(ctx);
    if (rv != CKR_OK)
        goto out;
    locks = 3;

    ctx->fl = load_module(ctx->module);
    if (ctx->fl == NULL) {
        rv = CKR_LIBRARY_LOAD_FAILED;
        goto out;
    }
    rv = p11_module_init(ctx);
    if (rv != CKR_OK)
        goto out;
    rv = p11_pool_prime(ctx); /* first session, C_Login */
    if (rv != CKR_OK)
        goto out;
    LOG_INFO(P11_LOG_SUB, "token ready in slot %lu (module %s)",
             (unsigned long)atomic_load(&ctx->slot), ctx->module);
    *out = ctx;
    ctx = NULL;
out:
    if (ctx != NULL) {
        if (ctx->fl != NULL) {
            p11_pool_drain(ctx, 0);
            p11_module_fini(ctx);
            p11_kit_module_release(ctx->fl);
        }
        if (locks >= 3)
            p11_cache_teardown(ctx);
        if (locks >= 2)
            p11_pool_teardown(ctx);
        if (locks >= 1)
            pthread_rwlock_destroy(&ctx->lock);
        if (ctx->uri != NULL)
            p11_kit_uri_free(ctx->uri);
        free(ctx->module);
        p11_secret_free(ctx->pin, P11_PIN_MAX + 1);
        free(ctx);
    }
    return rv;
}

void p11_close(p11_ctx *ctx)
{
    if (ctx == NULL)
        return;
    pthread_rwlock_wrlock(&ctx->lock);
    p11_cache_flush(ctx); /* closes the session holding the KEK copies */
    p11_pool_drain(ctx, 1);
    p11_module_fini(ctx);
    p11_kit_module_release(ctx->fl);
    ctx->fl = NULL;
    pthread_rwlock_unlock(&ctx->lock);

    p11_cache_teardown(ctx);
    p11_pool_teardown(ctx);
    pthread_rwlock_destroy(&ctx->lock);
    p11_kit_uri_free(ctx->uri);
    free(ctx->module);
    p11_secret_free(ctx->pin, P11_PIN_MAX + 1);
    free(ctx);
}

CK_SLOT_ID p11_slot_id(const p11_ctx *ctx)
{
    return atomic_load(&((p11_ctx *)ctx)->slot);
}

CK_FUNCTION_LIST *p11_function_list(p11_ctx *ctx)
{
    return ctx->fl;
}

/* A session can outlive the token's storage (SoftHSM2 keeps the sessions,
 * and their session objects, of a token whose folder is gone): the token
 * itself is asked too.  A token that does not answer is a lost device, so
 * p11_run re-initialises the module (which finds it again once it is
 * back). */
static CK_RV op_probe(p11_ctx *ctx, CK_SESSION_HANDLE s, void *arg, int *flags)
{
    CK_SESSION_INFO info;
    CK_RV rv;

    (void)arg;
    (void)flags;
    rv = P11_CALL(ctx, C_GetSessionInfo, s, &info);
    if (rv != CKR_OK)
        goto out;
    rv = p11_token_present(ctx);
    if (rv != CKR_OK) {
        LOG_WARN(P11_LOG_SUB, "presence probe: C_GetTokenInfo: %s", p11_rv_name(rv));
        rv = CKR_TOKEN_NOT_PRESENT;
    }
out:
    return rv;
}

CK_RV p11_probe(p11_ctx *ctx)
{
    return p11_run(ctx, op_probe, NULL);
}

static CK_RV op_label(p11_ctx *ctx, CK_SESSION_HANDLE s, void *arg, int *flags)
{
    CK_RV rv;
    CK_TOKEN_INFO info;
    char *label = arg;
    size_t n = sizeof(info.label);

    (void)s;
    (void)flags;
    rv = P11_CALL(ctx, C_GetTokenInfo, atomic_load(&ctx->slot), &info);
    if (rv != CKR_OK)
        goto out;
    while (n > 0 && (info.label[n - 1] == ' ' || info.label[n - 1] == '\0'))
        n--;
    memcpy(label, info.label, n);
    label[n] = '\0';
out:
    return rv;
}

CK_RV p11_token_label(p11_ctx *ctx, char label[33])
{
    return p11_run(ctx, op_label, label);
}
