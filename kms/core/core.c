/*
 * kms/core/core.c - the core context: token + store, start-up
 * reconciliation, and the one CK_RV -> p11kms_status conversion.
 *
 * The context holds no mutable state of its own: the token layer and the
 * store are thread-safe, so one kms_core is shared by all workers without
 * a lock.
 */
#include <stdlib.h>
#include <string.h>

#include "kms/core/core.h"
#include "kms/core/internal.h"
#include "module/log.h"

struct kms_core {
    p11_ctx *token;
    kms_store *store;
};

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

/* Destroy KEK objects that the store does not refer to.  They can only be
 * left by a crash (or a failed commit) between C_GenerateKey and the store
 * commit, so nothing was ever wrapped by them.  Single-node only: with
 * several nodes another node may be between those two steps (see
 * docs/operations.md). */
static p11kms_status reconcile_orphans(kms_core *core)
{
    p11kms_status rv;
    unsigned char (*token_ids)[P11_KEK_ID_LEN] = NULL;
    unsigned char (*store_ids)[KMS_TOKEN_ID_LEN] = NULL;
    size_t n_token = 0, n_store = 0;
    CK_RV crv;

    crv = p11_kek_list(core->token, KMS_KEK_LABEL_PREFIX, &token_ids, &n_token);
    if (crv != CKR_OK) {
        rv = kms_status_from_rv(crv);
        goto out;
    }
    rv = kms_store_token_ids(core->store, &store_ids, &n_store);
    if (rv != P11KMS_OK)
        goto out;
    for (size_t i = 0; i < n_token; i++) {
        if (id_in_list(token_ids[i], store_ids, n_store))
            continue;
        crv = p11_kek_destroy(core->token, token_ids[i]);
        if (crv == CKR_OK)
            LOG_WARN("core", "destroyed an orphan KEK object left by an interrupted key "
                             "creation or rotation");
        else
            LOG_ERROR("core", "cannot destroy an orphan KEK object: %s", p11_rv_name(crv));
    }
    rv = P11KMS_OK;
out:
    free(token_ids);
    free(store_ids);
    return rv;
}

p11kms_status kms_core_new(p11_ctx *token, kms_store *store, kms_core **out)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    kms_core *core = calloc(1, sizeof(*core));

    if (core == NULL)
        goto out;
    core->token = token;
    core->store = store;
    rv = reconcile_orphans(core);
    if (rv != P11KMS_OK)
        goto out;
    *out = core;
    core = NULL;
out:
    free(core);
    return rv;
}

void kms_core_free(kms_core *core)
{
    free(core);
}

const kms_version_rec *kms_key_find_version(const kms_key_rec *key, uint32_t version)
{
    for (size_t i = 0; i < key->n_versions; i++)
        if (key->versions[i].version == version)
            return &key->versions[i];
    return NULL;
}
