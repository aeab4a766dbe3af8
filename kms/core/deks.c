/*
 * kms/core/deks.c - data keys: generate and decrypt.
 *
 * Generate: 32 bytes from the token RNG, wrapped inside the token by the
 * key's latest version with AES-GCM, the AAD binding key, version, DEK id
 * and canonical context (aad.c); the row is durable (group commit) before
 * the plaintext is handed back.  Decrypt: state, key and context checks
 * from the store first (revocation takes effect at once), then the unwrap;
 * a blob that fails authentication although the context matches is
 * corruption (integrity_failure), logged loudly, never returned.
 *
 * Every plaintext buffer is wiped with OPENSSL_cleanse on every path.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "kms/core/core.h"
#include "kms/core/internal.h"
#include "module/log.h"

void kms_datakey_clear(kms_datakey *k)
{
    if (k != NULL)
        OPENSSL_cleanse(k, sizeof(*k));
}

/* A UUIDv7 (RFC 9562): 48-bit Unix time in ms, then 74 random bits.
 * Time-ordered, so a new DEK's row and index entries land at the right
 * edge of the store's B-trees instead of on random pages (a group commit
 * of 20 DEKs dirties a few pages, not ~80 leaves).  The random part
 * keeps ids unguessable; the time part only says when the DEK was made,
 * which its metadata says anyway. */
p11kms_status kms_uuid_new(char out[KMS_DEK_ID_LEN + 1])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char b[16];
    size_t o = 0;
    struct timespec ts;
    uint64_t ms;

    if (RAND_bytes(b, sizeof(b)) != 1 || clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return P11KMS_ERR_INTERNAL;
    ms = (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
    for (int i = 0; i < 6; i++)
        b[i] = (unsigned char)(ms >> (40 - 8 * i));
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x70); /* version 7 */
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80); /* RFC 9562 variant */
    for (size_t i = 0; i < sizeof(b); i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        out[o++] = hex[b[i] >> 4];
        out[o++] = hex[b[i] & 0xf];
    }
    out[o] = '\0';
    return P11KMS_OK;
}

#define GENERATE_ATTEMPTS 32 /* re-reads after a full or rotated latest version (racing
                              * issuers only contend here with tiny test caps) */

p11kms_status kms_dek_wrap_attempt(kms_core *core, const char *key, char *canonical,
                                   kms_dek_rec *dek, unsigned char plaintext[KMS_DEK_LEN],
                                   uint32_t *full)
{
    p11kms_status rv;
    kms_key_rec *k = NULL;
    const kms_version_rec *ver;
    unsigned char *aad = NULL;
    size_t aad_len = 0;
    CK_RV crv;

    *full = 0;
    OPENSSL_cleanse(dek->wrapped, sizeof(dek->wrapped));
    rv = kms_store_key_get_meta(kms_core_store(core), key, &k);
    if (rv != P11KMS_OK)
        goto out;
    if (k->state != KMS_KEY_ENABLED) {
        rv = P11KMS_ERR_KEY_DISABLED;
        goto out;
    }
    ver = kms_key_find_version(k, k->latest_version);
    if (ver == NULL || ver->state != KMS_VERSION_ACTIVE) {
        LOG_ERROR("core", "key %s has no active latest version %u", key, k->latest_version);
        rv = P11KMS_ERR_INTERNAL;
        goto out;
    }
    if (ver->wrap_count >= kms_core_max_wraps(core)) {
        LOG_INFO("core", "key %s version %u has wrapped %llu data keys: rotating", key,
                 ver->version, (unsigned long long)ver->wrap_count);
        *full = ver->version;
        goto out;
    }
    rv = kms_aad_build(key, ver->version, dek->id, canonical, &aad, &aad_len);
    if (rv != P11KMS_OK)
        goto out;
    dek->wrapped_len = sizeof(dek->wrapped);
    /* DEK and IV from one C_GenerateRandom (a fresh DEK per attempt). */
    crv = p11_generate_and_wrap(kms_core_token(core), ver->token_id, aad, aad_len, KMS_DEK_LEN,
                                plaintext, dek->wrapped, &dek->wrapped_len);
    if (crv == CKR_KEY_HANDLE_INVALID && p11_refresh(kms_core_token(core)) == CKR_OK) {
        dek->wrapped_len = sizeof(dek->wrapped);
        crv = p11_generate_and_wrap(kms_core_token(core), ver->token_id, aad, aad_len,
                                    KMS_DEK_LEN, plaintext, dek->wrapped, &dek->wrapped_len);
    }
    if (crv != CKR_OK) {
        rv = kms_status_from_rv(crv);
        if (rv == P11KMS_ERR_INTEGRITY_FAILURE)
            rv = P11KMS_ERR_INTERNAL;
        goto out;
    }
    snprintf(dek->key, sizeof(dek->key), "%s", key);
    dek->version = ver->version;
    dek->state = KMS_DEK_ACTIVE;
    dek->context = canonical;
    dek->created = (int64_t)time(NULL);
out:
    if (rv != P11KMS_OK)
        OPENSSL_cleanse(plaintext, KMS_DEK_LEN);
    free(aad);
    kms_key_rec_free(k);
    return rv;
}

p11kms_status kms_dek_generate(kms_core *core, const char *key, const json_t *context,
                               kms_datakey *out)
{
    p11kms_status rv;
    char *canonical = NULL;
    kms_dek_rec dek;
    kms_datakey result;
    kms_audit_entry ae;
    uint32_t rotated = 0, full = 0;
    int refused = 1, attempt;

    memset(&dek, 0, sizeof(dek));
    memset(&result, 0, sizeof(result));
    kms_audit_entry_init(&ae, "datakey.generate", kms_key_name_valid(key) ? key : NULL, 0, NULL);
    if (!kms_key_name_valid(key)) {
        rv = P11KMS_ERR_BAD_REQUEST;
        goto out;
    }
    rv = kms_context_canonical(context, &canonical);
    if (rv != P11KMS_OK)
        goto out;
    rv = kms_uuid_new(dek.id);
    if (rv != P11KMS_OK)
        goto out;
    for (attempt = 0; attempt < GENERATE_ATTEMPTS && refused; attempt++) {
        rv = kms_dek_wrap_attempt(core, key, canonical, &dek, result.plaintext, &full);
        if (rv != P11KMS_OK)
            goto out;
        if (full != 0) {
            /* The hard rule: a full version wraps no more.  Rotate (the
             * store's compare-and-set lets one racing caller win; the
             * others re-read) and wrap under the new latest version. */
            rv = kms_key_rotate_from(core, key, full, &rotated, NULL);
            if (rv != P11KMS_OK)
                goto out;
            continue;
        }
        ae.version = dek.version;
        memcpy(ae.dek_id, dek.id, sizeof(ae.dek_id));
        /* The entry commits with the row (not when the cap refused it). */
        rv = kms_store_dek_insert_capped_audited(kms_core_store(core), &dek,
                                                 kms_core_max_wraps(core), &refused, &ae, 1);
        if (rv != P11KMS_OK)
            goto out;
    }
    if (refused) {
        LOG_ERROR("core", "key %s: no version with wrap budget after %d attempts", key,
                  GENERATE_ATTEMPTS);
        rv = P11KMS_ERR_OVERLOADED;
        goto out;
    }
    memcpy(result.id, dek.id, sizeof(result.id));
    snprintf(result.key, sizeof(result.key), "%s", key);
    result.version = dek.version;
out:
    rv = kms_audit_settle(core, &ae, rv);
    if (rv == P11KMS_OK)
        *out = result;
    OPENSSL_cleanse(&result, sizeof(result));
    OPENSSL_cleanse(dek.wrapped, sizeof(dek.wrapped));
    free(canonical);
    return rv;
}

/* State, key and context checks, in the order a caller can act on. */
static p11kms_status check_decryptable(const kms_dek_rec *dek, const kms_key_rec *k,
                                       const char *canonical)
{
    if (dek->state == KMS_DEK_DESTROYED)
        return P11KMS_ERR_DEK_DESTROYED;
    if (dek->state == KMS_DEK_REVOKED)
        return P11KMS_ERR_DEK_REVOKED;
    if (k->state != KMS_KEY_ENABLED)
        return P11KMS_ERR_KEY_DISABLED;
    if (dek->version < k->min_decrypt_version)
        return P11KMS_ERR_VERSION_BELOW_MINIMUM;
    if (dek->context == NULL || strcmp(dek->context, canonical) != 0)
        return P11KMS_ERR_CONTEXT_MISMATCH;
    return P11KMS_OK;
}

p11kms_status kms_dek_unwrap_checked(kms_core *core, const char *dek_id,
                                     const kms_dek_rec *known, const char *canonical,
                                     kms_audit_entry *ae, kms_datakey *result)
{
    p11kms_status rv;
    kms_dek_rec *read = NULL;
    const kms_dek_rec *dek = known;
    kms_key_rec *k = NULL;
    const kms_version_rec *ver;
    unsigned char *aad = NULL;
    size_t aad_len = 0, pt_len = KMS_DEK_LEN;
    CK_RV crv;

    if (dek == NULL) {
        rv = kms_store_dek_get(kms_core_store(core), dek_id, &read);
        if (rv != P11KMS_OK)
            goto out;
        dek = read;
    }
    snprintf(ae->key, sizeof(ae->key), "%s", dek->key);
    ae->version = dek->version;
    rv = kms_store_key_get_meta(kms_core_store(core), dek->key, &k);
    if (rv != P11KMS_OK) {
        if (rv == P11KMS_ERR_KEY_NOT_FOUND)
            rv = P11KMS_ERR_INTERNAL;
        goto out;
    }
    rv = check_decryptable(dek, k, canonical);
    if (rv != P11KMS_OK)
        goto out;
    ver = kms_key_find_version(k, dek->version);
    if (ver == NULL || ver->state != KMS_VERSION_ACTIVE || dek->wrapped_len == 0) {
        LOG_ERROR("core", "data key %s refers to key %s version %u, which cannot unwrap it",
                  dek_id, dek->key, dek->version);
        rv = P11KMS_ERR_INTEGRITY_FAILURE;
        goto out;
    }
    rv = kms_aad_build(dek->key, dek->version, dek->id, canonical, &aad, &aad_len);
    if (rv != P11KMS_OK)
        goto out;
    crv = p11_unwrap(kms_core_token(core), ver->token_id, aad, aad_len, dek->wrapped,
                     dek->wrapped_len, result->plaintext, &pt_len);
    if (crv == CKR_KEY_HANDLE_INVALID && p11_refresh(kms_core_token(core)) == CKR_OK) {
        pt_len = KMS_DEK_LEN;
        crv = p11_unwrap(kms_core_token(core), ver->token_id, aad, aad_len, dek->wrapped,
                         dek->wrapped_len, result->plaintext, &pt_len);
    }
    if (crv == CKR_OK && pt_len != KMS_DEK_LEN)
        crv = CKR_ENCRYPTED_DATA_INVALID;
    if (crv != CKR_OK) {
        rv = kms_status_from_rv(crv);
        if (rv == P11KMS_ERR_INTEGRITY_FAILURE)
            LOG_ERROR("core", "INTEGRITY FAILURE: the stored wrapped bytes of data key %s "
                              "(key %s version %u) fail authentication although the context "
                              "matches: the store was altered or corrupted",
                      dek_id, dek->key, dek->version);
        goto out;
    }
    memcpy(result->id, dek->id, sizeof(result->id));
    snprintf(result->key, sizeof(result->key), "%s", dek->key);
    result->version = dek->version;
out:
    if (rv != P11KMS_OK)
        OPENSSL_cleanse(result, sizeof(*result));
    free(aad);
    kms_dek_rec_free(read);
    kms_key_rec_free(k);
    return rv;
}

p11kms_status kms_dek_decrypt(kms_core *core, const char *dek_id, const json_t *context,
                              kms_datakey *out)
{
    p11kms_status rv;
    char *canonical = NULL;
    kms_datakey result;
    kms_audit_entry ae;

    memset(&result, 0, sizeof(result));
    kms_audit_entry_init(&ae, "datakey.decrypt", NULL, 0, kms_dek_id_valid(dek_id) ? dek_id : NULL);
    if (!kms_dek_id_valid(dek_id)) {
        rv = P11KMS_ERR_DEK_NOT_FOUND;
        goto out;
    }
    rv = kms_context_canonical(context, &canonical);
    if (rv != P11KMS_OK)
        goto out;
    rv = kms_dek_unwrap_checked(core, dek_id, NULL, canonical, &ae, &result);
out:
    /* Fail closed: the plaintext is handed out only once its entry is
     * durable (one group-commit write, shared with concurrent requests). */
    rv = kms_audit_settle(core, &ae, rv);
    if (rv == P11KMS_OK)
        *out = result;
    OPENSSL_cleanse(&result, sizeof(result));
    free(canonical);
    return rv;
}
