/*
 * kms/core/keys.c - key lifecycle: create, show, list.
 *
 * Creating a key records a creation intent for the CKA_ID of its version-1
 * KEK (durable), generates the KEK in the token with that id, and only
 * then commits the store row (which deletes the intent in the same
 * transaction), so the store never refers to a missing object and an
 * object left by a crash in between is recognisable as ours; if the
 * commit fails the fresh object is destroyed and the intent deleted (and,
 * if even that fails, the intent makes the next start destroy it).
 * kms_kek_begin / kms_kek_abandon are shared with rotation.c.
 */
#include <stdio.h>
#include <time.h>

#include "kms/core/core.h"
#include "kms/core/internal.h"
#include "module/log.h"

void kms_kek_label(const char *name, uint32_t version, char *out, size_t len)
{
    snprintf(out, len, "%s%s:v%u", KMS_KEK_LABEL_PREFIX, name, version);
}

p11kms_status kms_kek_begin(kms_core *core, const char *name, uint32_t version,
                            unsigned char id[KMS_TOKEN_ID_LEN])
{
    p11kms_status rv;
    char label[KMS_NAME_MAX + 32];
    CK_RV crv;

    crv = p11_random(kms_core_token(core), id, KMS_TOKEN_ID_LEN);
    if (crv != CKR_OK) {
        rv = kms_status_from_rv(crv);
        goto out;
    }
    /* Durable before the object exists: a crash after C_GenerateKey
     * leaves an object that reconciliation knows to be ours. */
    rv = kms_store_kek_intent_add(kms_core_store(core), id, name, version, (int64_t)time(NULL));
    if (rv != P11KMS_OK)
        goto out;
    kms_kek_label(name, version, label, sizeof(label));
    crv = p11_kek_create_with_id(kms_core_token(core), label, id);
    if (crv != CKR_OK) {
        rv = kms_status_from_rv(crv);
        /* The object may exist even so (the token failed after creating
         * it): abandon destroys it if it is there. */
        kms_kek_abandon(core, id, name, version);
        goto out;
    }
    rv = P11KMS_OK;
out:
    return rv;
}

void kms_kek_abandon(kms_core *core, const unsigned char id[KMS_TOKEN_ID_LEN], const char *name,
                     uint32_t version)
{
    p11kms_status rv;
    CK_RV crv;

    crv = p11_kek_destroy(kms_core_token(core), id);
    if (crv == CKR_KEY_HANDLE_INVALID || crv == CKR_OBJECT_HANDLE_INVALID)
        crv = CKR_OK; /* never created */
    if (crv != CKR_OK) {
        LOG_ERROR("core",
                  "cannot destroy the unused KEK object of key %s version %u: %s "
                  "(its creation intent stays: it is destroyed at the next start)",
                  name, version, p11_rv_name(crv));
        return;
    }
    rv = kms_store_kek_intent_remove(kms_core_store(core), id);
    if (rv != P11KMS_OK)
        LOG_WARN("core", "cannot delete the creation intent of key %s version %u: %s "
                         "(it is removed at the next start)",
                 name, version, p11kms_status_code(rv));
}

p11kms_status kms_key_create(kms_core *core, const char *name, kms_key_rec **out)
{
    p11kms_status rv;
    kms_key_rec *existing = NULL;
    unsigned char id[P11_KEK_ID_LEN];
    int created_object = 0;
    kms_audit_entry ae;

    kms_audit_entry_init(&ae, "key.create", kms_key_name_valid(name) ? name : NULL, 1, NULL);
    if (!kms_key_name_valid(name)) {
        rv = P11KMS_ERR_BAD_REQUEST;
        goto out;
    }
    rv = kms_store_key_get_meta(kms_core_store(core), name, &existing);
    if (rv == P11KMS_OK) {
        rv = P11KMS_ERR_KEY_EXISTS;
        goto out;
    }
    if (rv != P11KMS_ERR_KEY_NOT_FOUND)
        goto out;
    rv = kms_kek_begin(core, name, 1, id);
    if (rv != P11KMS_OK)
        goto out;
    created_object = 1;
    rv = kms_store_key_create_audited(kms_core_store(core), name, id, (int64_t)time(NULL), &ae, 1);
    if (rv != P11KMS_OK)
        goto out;
    created_object = 0;
    LOG_INFO("core", "created key %s version 1", name);
    rv = kms_store_key_get(kms_core_store(core), name, out);
out:
    if (rv != P11KMS_OK && !ae.committed)
        ae.version = 0;
    rv = kms_audit_settle(core, &ae, rv);
    if (created_object)
        kms_kek_abandon(core, id, name, 1);
    kms_key_rec_free(existing);
    return rv;
}

p11kms_status kms_key_show(kms_core *core, const char *name, kms_key_rec **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_key_rec *k = NULL;
    kms_audit_entry ae;

    kms_audit_entry_init(&ae, "key.show", kms_key_name_valid(name) ? name : NULL, 0, NULL);
    if (kms_key_name_valid(name))
        rv = kms_store_key_get(kms_core_store(core), name, &k);
    rv = kms_audit_settle(core, &ae, rv);
    if (rv == P11KMS_OK) {
        *out = k;
        k = NULL;
    }
    kms_key_rec_free(k);
    return rv;
}

p11kms_status kms_status_counts(kms_core *core, kms_store_counts *out)
{
    kms_audit_entry ae;
    kms_store_counts c;
    p11kms_status rv;

    kms_audit_entry_init(&ae, "status", NULL, 0, NULL);
    rv = kms_store_counts_get(kms_core_store(core), &c);
    rv = kms_audit_settle(core, &ae, rv);
    if (rv == P11KMS_OK)
        *out = c;
    return rv;
}

p11kms_status kms_key_list(kms_core *core, kms_key_rec ***out, size_t *count)
{
    p11kms_status rv;
    kms_key_rec **keys = NULL;
    size_t n = 0;
    kms_audit_entry ae;

    kms_audit_entry_init(&ae, "key.list", NULL, 0, NULL);
    rv = kms_store_key_list(kms_core_store(core), &keys, &n);
    rv = kms_audit_settle(core, &ae, rv);
    if (rv == P11KMS_OK) {
        *out = keys;
        *count = n;
        keys = NULL;
    }
    kms_key_list_free(keys, n);
    return rv;
}
