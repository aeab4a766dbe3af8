/*
 * kms/core/rotation.c - key versions: rotate, enable/disable, configure
 * (min_decrypt_version, rotation_period), retire, and the periodic check
 * of rotation periods (core.h).
 *
 * Crash-safe orders:
 *  - rotate: a creation intent for the new CKA_ID first (durable), the
 *    token object second, the store row third (one write that inserts the
 *    version, moves latest_version by compare-and-set and deletes the
 *    intent), so the store never refers to a missing object; a crash
 *    after the object leaves an orphan with an intent, which kms_core_new
 *    destroys at a start once the intent is older than the grace period.
 *    When the compare-and-set loses (another worker or node rotated
 *    first) the fresh object is destroyed and its intent deleted at once.
 *  - retire: the store first (the version is marked destroyed in a
 *    transaction that re-checks "not the latest, no live DEK"), the token
 *    object second, so no DEK can ever refer to a destroyed object; a
 *    crash in between leaves an object of a destroyed version, which
 *    kms_core_new destroys at the next start (or a second retire does).
 *
 * No state, no locks: everything that must be atomic is one store write.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kms/core/core.h"
#include "kms/core/internal.h"
#include "module/log.h"

#define ROTATE_ATTEMPTS 5 /* an explicit rotate retries a lost compare-and-set */

p11kms_status kms_key_rotate_from(kms_core *core, const char *name, uint32_t expected_latest,
                                  uint32_t *rotated, kms_audit_entry *audit)
{
    p11kms_status rv;
    const kms_core_test_hooks *hooks = kms_core_hooks(core);
    kms_audit_entry own;
    kms_key_rec *k = NULL;
    unsigned char id[P11_KEK_ID_LEN];
    uint32_t next = 0, added = 0;
    int created_object = 0;

    *rotated = 0;
    if (audit == NULL) {
        kms_audit_entry_init(&own, "key.rotate", name, 0, NULL);
        audit = &own;
    }
    kms_core_rotate_lock(core);
    rv = kms_store_key_get_meta(kms_core_store(core), name, &k);
    if (rv != P11KMS_OK)
        goto out;
    if (expected_latest == 0)
        expected_latest = k->latest_version; /* an explicit rotate: from whatever is latest */
    if (k->latest_version != expected_latest)
        goto out; /* rotated meanwhile (by this process): nothing to do */
    if (expected_latest == UINT32_MAX) {
        rv = P11KMS_ERR_BAD_REQUEST;
        goto out;
    }
    next = expected_latest + 1;
    rv = kms_kek_begin(core, name, next, id);
    if (rv != P11KMS_OK)
        goto out;
    created_object = 1;
    if (hooks->rotate_object_created != NULL)
        hooks->rotate_object_created(hooks->arg, name, next);
    audit->version = next;
    rv = kms_store_version_add_audited(kms_core_store(core), name, expected_latest, id,
                                       (int64_t)time(NULL), &added, audit, 1);
    if (rv != P11KMS_OK || added == 0)
        goto out;
    created_object = 0;
    *rotated = added;
    LOG_INFO("core", "rotated key %s to version %u", name, added);
out:
    if (created_object)
        kms_kek_abandon(core, id, name, next);
    kms_core_rotate_unlock(core);
    kms_key_rec_free(k);
    return rv;
}

p11kms_status kms_key_rotate(kms_core *core, const char *name, kms_key_rec **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_key_rec *k = NULL;
    uint32_t rotated = 0;
    kms_audit_entry ae;

    if (core == NULL)
        return rv;
    kms_audit_entry_init(&ae, "key.rotate", kms_key_name_valid(name) ? name : NULL, 0, NULL);
    if (!kms_key_name_valid(name))
        goto out;
    /* Only another process or node can win the compare-and-set now. */
    for (int attempt = 0; attempt < ROTATE_ATTEMPTS && rotated == 0; attempt++) {
        rv = kms_key_rotate_from(core, name, 0, &rotated, &ae);
        if (rv != P11KMS_OK)
            goto out;
    }
    if (rotated == 0) {
        LOG_ERROR("core", "rotation of key %s lost %d compare-and-sets in a row", name,
                  ROTATE_ATTEMPTS);
        rv = P11KMS_ERR_OVERLOADED;
        goto out;
    }
    if (out != NULL)
        rv = kms_store_key_get(kms_core_store(core), name, out);
out:
    if (!ae.committed)
        ae.version = 0;
    kms_key_rec_free(k);
    return kms_audit_settle(core, &ae, rv);
}

p11kms_status kms_key_set_enabled(kms_core *core, const char *name, int enabled, kms_key_rec **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_audit_entry ae;

    if (core == NULL)
        return rv;
    kms_audit_entry_init(&ae, enabled ? "key.enable" : "key.disable",
                         kms_key_name_valid(name) ? name : NULL, 0, NULL);
    if (!kms_key_name_valid(name))
        goto out;
    rv = kms_store_key_set_state_audited(kms_core_store(core), name,
                                         enabled ? KMS_KEY_ENABLED : KMS_KEY_DISABLED, &ae, 1);
    if (rv != P11KMS_OK)
        goto out;
    LOG_INFO("core", "key %s %s", name, enabled ? "enabled" : "disabled");
    if (out != NULL)
        rv = kms_store_key_get(kms_core_store(core), name, out);
out:
    return kms_audit_settle(core, &ae, rv);
}

p11kms_status kms_key_configure(kms_core *core, const char *name, uint32_t min_decrypt_version,
                                int64_t rotation_period, kms_key_rec **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_audit_entry ae;

    if (core == NULL)
        return rv;
    kms_audit_entry_init(&ae, "key.config", kms_key_name_valid(name) ? name : NULL,
                         min_decrypt_version, NULL);
    if (!kms_key_name_valid(name) || rotation_period < -1 ||
        rotation_period > KMS_ROTATION_PERIOD_MAX ||
        (min_decrypt_version == 0 && rotation_period == -1))
        goto out;
    rv = kms_store_key_config_audited(kms_core_store(core), name, min_decrypt_version,
                                      rotation_period, &ae, 1);
    if (rv != P11KMS_OK)
        goto out;
    if (min_decrypt_version != 0)
        LOG_INFO("core", "key %s: min_decrypt_version set to %u", name, min_decrypt_version);
    if (rotation_period >= 0)
        LOG_INFO("core", "key %s: rotation_period set to %lld s", name, (long long)rotation_period);
    if (out != NULL)
        rv = kms_store_key_get(kms_core_store(core), name, out);
out:
    return kms_audit_settle(core, &ae, rv);
}

int64_t kms_rotation_period_parse(const char *s)
{
    unsigned long long n;
    int64_t unit;
    size_t len;
    char *end = NULL;

    if (s == NULL)
        return -1;
    if (strcmp(s, "0") == 0)
        return 0;
    len = strlen(s);
    if (len < 2 || len > 12 || s[0] < '1' || s[0] > '9')
        return -1;
    switch (s[len - 1]) {
    case 'd': unit = 86400; break;
    case 'h': unit = 3600; break;
    case 'm': unit = 60; break;
    case 's': unit = 1; break;
    default: return -1;
    }
    errno = 0;
    n = strtoull(s, &end, 10);
    if (errno != 0 || end != s + len - 1 || n == 0 ||
        n > (unsigned long long)(KMS_ROTATION_PERIOD_MAX / unit))
        return -1;
    return (int64_t)n * unit;
}

p11kms_status kms_key_retire(kms_core *core, const char *name, uint32_t version, kms_key_rec **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_key_rec *k = NULL;
    const kms_version_rec *v;
    unsigned char token_id[KMS_TOKEN_ID_LEN];
    kms_audit_entry ae;
    CK_RV crv;

    if (core == NULL)
        return rv;
    kms_audit_entry_init(&ae, "key.retire", kms_key_name_valid(name) ? name : NULL, version, NULL);
    if (!kms_key_name_valid(name))
        goto out;
    rv = kms_store_key_get_meta(kms_core_store(core), name, &k);
    if (rv != P11KMS_OK)
        goto out;
    v = kms_key_find_version(k, version);
    if (v == NULL) {
        rv = P11KMS_ERR_KEY_NOT_FOUND;
        goto out;
    }
    memcpy(token_id, v->token_id, sizeof(token_id));
    /* The store first: from here on no DEK can refer to this version. */
    rv = kms_store_version_retire_audited(kms_core_store(core), name, version,
                                          (int64_t)time(NULL), &ae, 1);
    if (rv != P11KMS_OK)
        goto out;
    crv = p11_kek_destroy(kms_core_token(core), token_id);
    if (crv == CKR_KEY_HANDLE_INVALID || crv == CKR_OBJECT_HANDLE_INVALID) {
        crv = CKR_OK; /* already gone: an earlier retire got this far */
    }
    if (crv != CKR_OK) {
        LOG_ERROR("core",
                  "key %s version %u is retired in the store but its token object "
                  "could not be destroyed (%s): retry the retire, or restart kmsd",
                  name, version, p11_rv_name(crv));
        rv = kms_status_from_rv(crv);
        if (rv == P11KMS_ERR_INTEGRITY_FAILURE)
            rv = P11KMS_ERR_INTERNAL;
        goto out;
    }
    LOG_INFO("core", "retired key %s version %u: its token object is destroyed", name, version);
    if (out != NULL)
        rv = kms_store_key_get(kms_core_store(core), name, out);
out:
    kms_key_rec_free(k);
    return kms_audit_settle(core, &ae, rv);
}

p11kms_status kms_keys_rotate_due(kms_core *core, int64_t now, size_t *rotated)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST, one;
    kms_rotation_due *due = NULL;
    size_t n = 0, done = 0;
    uint32_t added = 0;

    if (core == NULL)
        goto out;
    rv = kms_store_rotation_due(kms_core_store(core), now, &due, &n);
    if (rv != P11KMS_OK)
        goto out;
    for (size_t i = 0; i < n; i++) {
        /* Only from the version found due: if someone rotated meanwhile,
         * the period starts again from that version. */
        one = kms_key_rotate_from(core, due[i].name, due[i].latest_version, &added, NULL);
        if (one != P11KMS_OK) {
            LOG_ERROR("core", "scheduled rotation of key %s failed: %s", due[i].name,
                      p11kms_status_code(one));
            rv = one;
            continue;
        }
        if (added != 0) {
            LOG_INFO("core", "key %s: rotation period passed, rotated to version %u", due[i].name,
                     added);
            done++;
        }
    }
    if (rotated != NULL)
        *rotated = done;
out:
    free(due);
    return rv;
}
