/*
 * kms/core/lifecycle.c - the life of a data key after it is issued: show,
 * list, revoke and destroy, one DEK at a time or in bulk by key and
 * context (core.h).
 *
 * The rules live here and in the store: states move active -> revoked ->
 * destroyed (or active -> destroyed) and never back; a revoke carries one
 * of the reason codes; destroy erases the only wrapped copy of the DEK
 * (the store overwrites it and, on SQLite, truncates the WAL before
 * answering), which makes the DEK and every record sealed with it
 * unrecoverable.  Bulk operations refuse an empty context: it would match
 * every DEK of the key.  Nothing is cached: deks.c reads the state from
 * the store on every decrypt, so each change here takes effect at once.
 *
 * No state, no locks; no key material passes through this file (records
 * handed out have their wrapped bytes wiped).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "kms/core/core.h"
#include "kms/core/internal.h"
#include "module/log.h"

/* Callers of this file get metadata only. */
static void strip_wrapped(kms_dek_rec *d)
{
    OPENSSL_cleanse(d->wrapped, sizeof(d->wrapped));
    d->wrapped_len = 0;
}

static p11kms_status dek_get_meta(kms_core *core, const char *dek_id, kms_dek_rec **out)
{
    p11kms_status rv;
    kms_dek_rec *d = NULL;

    rv = kms_store_dek_get(kms_core_store(core), dek_id, &d);
    if (rv != P11KMS_OK)
        goto out;
    strip_wrapped(d);
    *out = d;
    d = NULL;
out:
    kms_dek_rec_free(d);
    return rv;
}

/* The key and version of DEK dek_id into the entry (when it exists). */
static void entry_of_dek(kms_core *core, kms_audit_entry *ae, const char *dek_id)
{
    kms_dek_rec *d = NULL;

    if (kms_dek_id_valid(dek_id) && dek_get_meta(core, dek_id, &d) == P11KMS_OK) {
        snprintf(ae->key, sizeof(ae->key), "%s", d->key);
        ae->version = d->version;
    }
    kms_dek_rec_free(d);
}

p11kms_status kms_dek_show(kms_core *core, const char *dek_id, kms_dek_rec **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_dek_rec *d = NULL;
    kms_audit_entry ae;

    if (core == NULL || out == NULL)
        return rv;
    kms_audit_entry_init(&ae, "datakey.show", NULL, 0, kms_dek_id_valid(dek_id) ? dek_id : NULL);
    rv = P11KMS_ERR_DEK_NOT_FOUND;
    if (kms_dek_id_valid(dek_id))
        rv = dek_get_meta(core, dek_id, &d);
    if (d != NULL) {
        snprintf(ae.key, sizeof(ae.key), "%s", d->key);
        ae.version = d->version;
    }
    rv = kms_audit_settle(core, &ae, rv);
    if (rv == P11KMS_OK) {
        *out = d;
        d = NULL;
    }
    kms_dek_rec_free(d);
    return rv;
}

p11kms_status kms_dek_list(kms_core *core, const char *key, int state, const char *cursor,
                           size_t limit, kms_dek_rec ***out, size_t *count,
                           char next[KMS_DEK_ID_LEN + 1])
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_dek_rec **deks = NULL;
    size_t n = 0;
    int more = 0;
    kms_audit_entry ae;

    if (core == NULL || out == NULL || count == NULL || next == NULL)
        return rv;
    kms_audit_entry_init(&ae, "datakey.list", kms_key_name_valid(key) ? key : NULL, 0, NULL);
    if (!kms_key_name_valid(key) || state < -1 || state > KMS_DEK_DESTROYED ||
        limit > KMS_DEK_LIST_MAX)
        goto out;
    if (cursor != NULL && *cursor != '\0' && !kms_dek_id_valid(cursor))
        goto out;
    if (limit == 0)
        limit = KMS_DEK_LIST_DEFAULT;
    rv = kms_store_dek_list(kms_core_store(core), key, state, cursor, limit, &deks, &n, &more);
    if (rv != P11KMS_OK)
        goto out;
out:
    rv = kms_audit_settle(core, &ae, rv);
    if (rv == P11KMS_OK) {
        next[0] = '\0';
        if (more && n > 0)
            memcpy(next, deks[n - 1]->id, KMS_DEK_ID_LEN + 1);
        *out = deks;
        *count = n;
        deks = NULL;
    }
    kms_dek_list_free(deks, n);
    return rv;
}

p11kms_status kms_dek_revoke(kms_core *core, const char *dek_id, kms_revoke_reason reason,
                             kms_dek_rec **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_audit_entry ae;

    if (core == NULL)
        return rv;
    kms_audit_entry_init(&ae, "datakey.revoke", NULL, 0, kms_dek_id_valid(dek_id) ? dek_id : NULL);
    if (kms_revoke_reason_name(reason) == NULL)
        goto out;
    rv = P11KMS_ERR_DEK_NOT_FOUND;
    if (!kms_dek_id_valid(dek_id))
        goto out;
    entry_of_dek(core, &ae, dek_id);
    rv = kms_store_dek_revoke_audited(kms_core_store(core), dek_id, reason, (int64_t)time(NULL),
                                      &ae, 1);
    if (rv != P11KMS_OK)
        goto out;
    LOG_INFO("core", "data key %s revoked (%s)", dek_id, kms_revoke_reason_name(reason));
    if (out != NULL)
        rv = dek_get_meta(core, dek_id, out);
out:
    return kms_audit_settle(core, &ae, rv);
}

p11kms_status kms_dek_destroy(kms_core *core, const char *dek_id, kms_dek_rec **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_audit_entry ae;

    if (core == NULL)
        return rv;
    kms_audit_entry_init(&ae, "datakey.destroy", NULL, 0, kms_dek_id_valid(dek_id) ? dek_id : NULL);
    rv = P11KMS_ERR_DEK_NOT_FOUND;
    if (!kms_dek_id_valid(dek_id))
        goto out;
    entry_of_dek(core, &ae, dek_id);
    rv = kms_store_dek_destroy_audited(kms_core_store(core), dek_id, (int64_t)time(NULL), &ae, 1);
    if (rv != P11KMS_OK)
        goto out;
    LOG_INFO("core", "data key %s destroyed: its wrapped copy is erased", dek_id);
    if (out != NULL)
        rv = dek_get_meta(core, dek_id, out);
out:
    return kms_audit_settle(core, &ae, rv);
}

/* The canonical form of a bulk filter; refuses the empty context. */
static p11kms_status bulk_filter(const char *key, const json_t *context, char **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    char *canonical = NULL;

    if (!kms_key_name_valid(key) || context == NULL || !json_is_object(context) ||
        json_object_size(context) == 0)
        goto out;
    rv = kms_context_canonical(context, &canonical);
    if (rv != P11KMS_OK)
        goto out;
    *out = canonical;
    canonical = NULL;
out:
    free(canonical);
    return rv;
}

p11kms_status kms_dek_revoke_bulk(kms_core *core, const char *key, const json_t *context,
                                  kms_revoke_reason reason, uint64_t *count)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    char *filter = NULL;
    uint64_t n = 0;
    kms_audit_entry ae;

    if (core == NULL || count == NULL)
        return rv;
    kms_audit_entry_init(&ae, "datakey.bulk_revoke", kms_key_name_valid(key) ? key : NULL, 0, NULL);
    if (kms_revoke_reason_name(reason) == NULL)
        goto out;
    rv = bulk_filter(key, context, &filter);
    if (rv != P11KMS_OK)
        goto out;
    rv = kms_store_dek_revoke_bulk_audited(kms_core_store(core), key, filter, reason,
                                           (int64_t)time(NULL), &n, &ae, 1);
    if (rv != P11KMS_OK)
        goto out;
    LOG_INFO("core", "bulk revoke (%s) on key %s: %llu data keys revoked",
             kms_revoke_reason_name(reason), key, (unsigned long long)n);
    *count = n;
out:
    free(filter);
    return kms_audit_settle(core, &ae, rv);
}

p11kms_status kms_dek_destroy_bulk(kms_core *core, const char *key, const json_t *context,
                                   uint64_t *count)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    char *filter = NULL;
    uint64_t n = 0;
    kms_audit_entry ae;

    if (core == NULL || count == NULL)
        return rv;
    kms_audit_entry_init(&ae, "datakey.bulk_destroy", kms_key_name_valid(key) ? key : NULL, 0,
                         NULL);
    rv = bulk_filter(key, context, &filter);
    if (rv != P11KMS_OK)
        goto out;
    rv = kms_store_dek_destroy_bulk_audited(kms_core_store(core), key, filter, (int64_t)time(NULL),
                                            &n, &ae, 1);
    if (rv != P11KMS_OK)
        goto out;
    LOG_INFO("core", "bulk destroy on key %s: %llu data keys destroyed", key,
             (unsigned long long)n);
    *count = n;
out:
    free(filter);
    return kms_audit_settle(core, &ae, rv);
}
