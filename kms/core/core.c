/*
 * kms/core/core.c - the core context: token + store, start-up
 * reconciliation, and the one CK_RV -> p11kms_status conversion.
 *
 * Start-up reconciliation (reconcile_orphans) destroys only KEK objects
 * this store proves to be dead: those of destroyed versions and those of
 * creation intents older than the grace period with no version row.
 * Unknown "p11kms:" objects are kept and logged (a restored older backup
 * must not cost the KEKs of newer data).
 *
 * The context holds no mutable state of its own after kms_core_new_ex
 * (options and test hooks are set before it is shared) except the audit
 * state (atomic; see audit.c): the token layer and the store are
 * thread-safe, so one kms_core is shared by all workers without a lock.
 * The one exception is rotate_mu, which serialises the rotations of this
 * process (kms_core_rotate_lock): racing requests that all find a version
 * full wait for the first one's new version instead of each creating a
 * token object only to destroy it.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kms/core/core.h"
#include "kms/core/internal.h"
#include "module/log.h"

#define KMS_REWRAP_THREADS_DEFAULT 4
#define KMS_REWRAP_THREADS_MAX 32

struct kms_core {
    p11_ctx *token;
    kms_store *store;
    uint64_t max_wraps;
    unsigned rewrap_threads;
    int64_t intent_grace; /* seconds, >= 0 */
    kms_core_test_hooks hooks;
    pthread_mutex_t rotate_mu;
    int rotate_mu_ok;
    unsigned char audit_key_id[KMS_TOKEN_ID_LEN]; /* the audit MAC key's CKA_ID */
    int audit_attached;
    atomic_int audit_state; /* KMS_AUDIT_STATE_* */
    pthread_t audit_thread; /* the start-up verification, when big */
    int audit_thread_started;
};

const unsigned char *kms_core_audit_key_id(const kms_core *core)
{
    return core->audit_key_id;
}

int kms_core_audit_state(kms_core *core)
{
    return core != NULL ? atomic_load(&core->audit_state) : KMS_AUDIT_STATE_OK;
}

void kms_core_audit_state_set(kms_core *core, int state)
{
    atomic_store(&core->audit_state, state);
}

static void *audit_check_main(void *arg)
{
    kms_audit_report r;
    kms_core *core = arg;
    p11kms_status rv = kms_audit_verify_chain(core, &r);

    if (rv != P11KMS_OK)
        LOG_ERROR("core", "start-up audit verification could not run: %s", p11kms_status_code(rv));
    else if (r.ok)
        LOG_INFO("core", "audit log verified: %llu entries", (unsigned long long)r.entries);
    return NULL;
}

void kms_audit_startup_check(kms_core *core)
{
    kms_audit_head head;

    if (core == NULL || core->audit_thread_started)
        return;
    if (kms_store_audit_head(core->store, &head) == P11KMS_OK &&
        head.seq > KMS_AUDIT_START_SYNC_MAX &&
        pthread_create(&core->audit_thread, NULL, audit_check_main, core) == 0) {
        core->audit_thread_started = 1;
        LOG_INFO("core", "verifying %llu audit entries in the background",
                 (unsigned long long)head.seq);
        return;
    }
    (void)audit_check_main(core);
}

void kms_core_rotate_lock(kms_core *core)
{
    pthread_mutex_lock(&core->rotate_mu);
}

void kms_core_rotate_unlock(kms_core *core)
{
    pthread_mutex_unlock(&core->rotate_mu);
}

uint64_t kms_core_max_wraps(const kms_core *core)
{
    return core->max_wraps;
}

int64_t kms_core_intent_grace(const kms_core *core)
{
    return core->intent_grace;
}

unsigned kms_core_rewrap_threads(const kms_core *core)
{
    return core->rewrap_threads;
}

const kms_core_test_hooks *kms_core_hooks(const kms_core *core)
{
    return &core->hooks;
}

void kms_core_set_test_hooks(kms_core *core, const kms_core_test_hooks *hooks)
{
    if (hooks != NULL)
        core->hooks = *hooks;
    else
        memset(&core->hooks, 0, sizeof(core->hooks));
}

p11_ctx *kms_core_token(kms_core *core)
{
    return core->token;
}

kms_store *kms_core_store(kms_core *core)
{
    return core->store;
}

p11kms_status kms_status_from_rv(CK_RV rv)
{
    switch (rv) {
    case CKR_OK:
        return P11KMS_OK;
    case CKR_HOST_MEMORY:
        return P11KMS_ERR_NO_MEMORY;
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
        return P11KMS_ERR_INTEGRITY_FAILURE;
    case CKR_PIN_INCORRECT:
    case CKR_PIN_LOCKED:
    case CKR_PIN_EXPIRED:
    case CKR_PIN_INVALID:
    case CKR_PIN_LEN_RANGE:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_CRYPTOKI_NOT_INITIALIZED:
        return P11KMS_ERR_TOKEN_UNAVAILABLE;
    default:
        if (p11_rv_is_token_failure(rv))
            return P11KMS_ERR_TOKEN_UNAVAILABLE;
        return P11KMS_ERR_INTERNAL;
    }
}

static int id_in_list(const unsigned char *id, unsigned char (*ids)[KMS_TOKEN_ID_LEN], size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(ids[i], id, KMS_TOKEN_ID_LEN) == 0)
            return 1;
    return 0;
}

static void id_hex(const unsigned char *id, char out[2 * KMS_TOKEN_ID_LEN + 1])
{
    static const char digits[] = "0123456789abcdef";

    for (size_t i = 0; i < KMS_TOKEN_ID_LEN; i++) {
        out[2 * i] = digits[id[i] >> 4];
        out[2 * i + 1] = digits[id[i] & 0xf];
    }
    out[2 * KMS_TOKEN_ID_LEN] = '\0';
}

static const kms_kek_intent *intent_find(const unsigned char *id, const kms_kek_intent *list,
                                         size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (memcmp(list[i].token_id, id, KMS_TOKEN_ID_LEN) == 0)
            return &list[i];
    return NULL;
}

/* Reconcile the "p11kms:" KEK objects of the token with the store.
 * Destroyed:
 *  - the objects of versions the store marks destroyed: a retire commits
 *    "destroyed" first and destroys the object second, so a crash in
 *    between leaves an object no DEK refers to;
 *  - the objects whose CKA_ID has a creation intent older than the grace
 *    period and no version row: a crash (or a failed commit) between
 *    C_GenerateKey and the store commit, so nothing was ever wrapped by
 *    them.  The grace keeps another node's creation in flight safe.
 * Such intents, and stale intents whose object is gone (or whose version
 * was recorded), are deleted.  Any other object the store does not know
 * is kept and logged: after a restore of an older backup it may hold the
 * KEK of newer data, and another deployment may share the token. */
static p11kms_status reconcile_orphans(kms_core *core)
{
    p11kms_status rv;
    unsigned char (*token_ids)[P11_KEK_ID_LEN] = NULL;
    unsigned char (*store_ids)[KMS_TOKEN_ID_LEN] = NULL;
    unsigned char (*dead_ids)[KMS_TOKEN_ID_LEN] = NULL;
    kms_kek_intent *intents = NULL;
    size_t n_token = 0, n_store = 0, n_dead = 0, n_intents = 0;
    int64_t cutoff = (int64_t)time(NULL) - core->intent_grace;
    char label[256], hex[2 * KMS_TOKEN_ID_LEN + 1];
    CK_RV crv;

    crv = p11_kek_list(core->token, KMS_KEK_LABEL_PREFIX, &token_ids, &n_token);
    if (crv != CKR_OK) {
        rv = kms_status_from_rv(crv);
        goto out;
    }
    rv = kms_store_token_ids(core->store, &store_ids, &n_store);
    if (rv != P11KMS_OK)
        goto out;
    rv = kms_store_token_ids_destroyed(core->store, &dead_ids, &n_dead);
    if (rv != P11KMS_OK)
        goto out;
    rv = kms_store_kek_intents(core->store, INT64_MAX, &intents, &n_intents);
    if (rv != P11KMS_OK)
        goto out;
    for (size_t i = 0; i < n_token; i++) {
        int retired = id_in_list(token_ids[i], dead_ids, n_dead);
        const kms_kek_intent *in = intent_find(token_ids[i], intents, n_intents);

        if (!retired && id_in_list(token_ids[i], store_ids, n_store))
            continue;
        if (!retired && in != NULL && in->created > cutoff) {
            LOG_INFO("core", "KEK object of key %s version %u kept: its creation is in progress "
                             "(intent %lld s old)",
                     in->key_name, in->version, (long long)(time(NULL) - in->created));
            continue;
        }
        if (!retired && in == NULL) {
            id_hex(token_ids[i], hex);
            if (p11_kek_label(core->token, token_ids[i], label, sizeof(label)) != CKR_OK)
                snprintf(label, sizeof(label), "(label unreadable)");
            LOG_WARN("core", "unknown KEK object %s kept: not referenced by this store (restored "
                             "backup? another deployment?) (CKA_ID %s)",
                     label, hex);
            continue;
        }
        crv = p11_kek_destroy(core->token, token_ids[i]);
        if (crv == CKR_OK && retired)
            LOG_WARN("core", "destroyed the KEK object of a retired key version (an interrupted "
                             "retire is now finished)");
        else if (crv == CKR_OK)
            LOG_WARN("core", "destroyed an orphan KEK object of key %s version %u left by an "
                             "interrupted key creation or rotation",
                     in->key_name, in->version);
        else
            LOG_ERROR("core", "cannot destroy an orphan KEK object: %s", p11_rv_name(crv));
        if (crv != CKR_OK || retired)
            continue;
        rv = kms_store_kek_intent_remove(core->store, token_ids[i]);
        if (rv != P11KMS_OK)
            LOG_WARN("core", "cannot delete the creation intent of key %s version %u: %s",
                     in->key_name, in->version, p11kms_status_code(rv));
    }
    /* Old intents whose object does not exist (the creation failed, or
     * its clean-up destroyed the object but not the intent), or whose
     * version the store already records. */
    for (size_t i = 0; i < n_intents; i++) {
        int present = 0;

        if (intents[i].created > cutoff)
            continue;
        for (size_t k = 0; k < n_token && !present; k++)
            present = memcmp(token_ids[k], intents[i].token_id, KMS_TOKEN_ID_LEN) == 0;
        if (present && !id_in_list(intents[i].token_id, store_ids, n_store))
            continue; /* handled above (destroyed, or its destroy failed: kept for next time) */
        rv = kms_store_kek_intent_remove(core->store, intents[i].token_id);
        if (rv != P11KMS_OK)
            LOG_WARN("core", "cannot delete a stale creation intent of key %s version %u: %s",
                     intents[i].key_name, intents[i].version, p11kms_status_code(rv));
    }
    rv = P11KMS_OK;
out:
    free(token_ids);
    free(store_ids);
    free(dead_ids);
    free(intents);
    return rv;
}

p11kms_status kms_core_new(p11_ctx *token, kms_store *store, kms_core **out)
{
    return kms_core_new_ex(token, store, NULL, out);
}

p11kms_status kms_core_new_ex(p11_ctx *token, kms_store *store, const kms_core_options *opts,
                              kms_core **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_core *core = NULL;
    kms_core_options o;

    memset(&o, 0, sizeof(o));
    if (opts != NULL)
        o = *opts;
    if (o.max_wraps_per_version == 0)
        o.max_wraps_per_version = KMS_MAX_WRAPS_DEFAULT;
    if (o.rewrap_threads == 0)
        o.rewrap_threads = KMS_REWRAP_THREADS_DEFAULT;
    if (o.intent_grace == 0)
        o.intent_grace = KMS_INTENT_GRACE_DEFAULT;
    else if (o.intent_grace == KMS_INTENT_GRACE_NONE)
        o.intent_grace = 0;
    if (token == NULL || store == NULL || out == NULL || o.intent_grace < 0 ||
        o.max_wraps_per_version > KMS_MAX_WRAPS_DEFAULT ||
        o.rewrap_threads > KMS_REWRAP_THREADS_MAX)
        goto out;
    rv = P11KMS_ERR_NO_MEMORY;
    core = calloc(1, sizeof(*core));
    if (core == NULL)
        goto out;
    core->token = token;
    core->store = store;
    core->max_wraps = o.max_wraps_per_version;
    core->rewrap_threads = o.rewrap_threads;
    core->intent_grace = o.intent_grace;
    rv = P11KMS_ERR_INTERNAL;
    if (pthread_mutex_init(&core->rotate_mu, NULL) != 0)
        goto out;
    core->rotate_mu_ok = 1;
    rv = reconcile_orphans(core);
    if (rv != P11KMS_OK)
        goto out;
    rv = kms_audit_open(core, core->audit_key_id);
    if (rv != P11KMS_OK)
        goto out;
    core->audit_attached = 1;
    *out = core;
    core = NULL;
out:
    kms_core_free(core);
    return rv;
}

void kms_core_free(kms_core *core)
{
    if (core == NULL)
        return;
    if (core->audit_thread_started)
        pthread_join(core->audit_thread, NULL);
    if (core->audit_attached)
        kms_store_audit_attach(core->store, NULL, NULL);
    if (core->rotate_mu_ok)
        pthread_mutex_destroy(&core->rotate_mu);
    free(core);
}

const kms_version_rec *kms_key_find_version(const kms_key_rec *key, uint32_t version)
{
    for (size_t i = 0; i < key->n_versions; i++)
        if (key->versions[i].version == version)
            return &key->versions[i];
    return NULL;
}
