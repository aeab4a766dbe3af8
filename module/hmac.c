/*
 * module/hmac.c - the audit MAC key: one HMAC-SHA256 generic secret
 * generated inside the token, and sign/verify with it.
 *
 * The key is CKO_SECRET_KEY / CKK_GENERIC_SECRET, 32 bytes from
 * CKM_GENERIC_SECRET_KEY_GEN, CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE true,
 * CKA_EXTRACTABLE false, CKA_SIGN and CKA_VERIFY true and nothing else,
 * CKA_ALLOWED_MECHANISMS = { CKM_SHA256_HMAC }, found by a random 16-byte
 * CKA_ID like a KEK.  Its handle lives in the same cache as the KEK
 * handles (kek.c: keyed by CKA_ID, refreshed on a stale handle), and every
 * operation runs through p11_run (pooled session, recovery, one retry).
 * The key never leaves the token: the service only ever holds MACs.
 *
 * Locking: none of its own; see internal.h.
 */
#include <string.h>

#include <openssl/crypto.h>

#include "internal.h"

#define HMAC_KEY_BYTES 32

/* ---- create ----------------------------------------------------------- */

struct hmac_create_arg {
    const char *label;
    unsigned char id[P11_KEK_ID_LEN];
};

static CK_RV op_hmac_create(p11_ctx *ctx, CK_SESSION_HANDLE s, void *argp, int *flags)
{
    struct hmac_create_arg *arg = argp;
    CK_RV rv;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    CK_ULONG value_len = HMAC_KEY_BYTES;
    CK_MECHANISM_TYPE allowed[] = {CKM_SHA256_HMAC};
    CK_MECHANISM gen = {CKM_GENERIC_SECRET_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_VALUE_LEN, &value_len, sizeof(value_len)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_SIGN, &yes, sizeof(yes)},
        {CKA_VERIFY, &yes, sizeof(yes)},
        {CKA_ENCRYPT, &no, sizeof(no)},
        {CKA_DECRYPT, &no, sizeof(no)},
        {CKA_WRAP, &no, sizeof(no)},
        {CKA_UNWRAP, &no, sizeof(no)},
        {CKA_DERIVE, &no, sizeof(no)},
        {CKA_MODIFIABLE, &yes, sizeof(yes)}, /* SoftHSM2 copies only a modifiable object */
        {CKA_COPYABLE, &yes, sizeof(yes)},
        {CKA_ALLOWED_MECHANISMS, allowed, sizeof(allowed)},
        {CKA_ID, arg->id, P11_KEK_ID_LEN},
        {CKA_LABEL, (void *)arg->label, strlen(arg->label)},
    };

    (void)flags;
    rv = P11_CALL(ctx, C_GenerateRandom, s, arg->id, P11_KEK_ID_LEN);
    if (rv != CKR_OK)
        goto out;
    p11_objects_lock(ctx, 1);
    rv = P11_CALL(ctx, C_GenerateKey, s, &gen, tmpl, sizeof(tmpl) / sizeof(tmpl[0]), &h);
    p11_objects_unlock(ctx);
out:
    return rv;
}

CK_RV p11_hmac_key_create(p11_ctx *ctx, const char *label, unsigned char id[P11_KEK_ID_LEN])
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    struct hmac_create_arg arg;

    if (ctx == NULL || label == NULL || id == NULL)
        goto out;
    arg.label = label;
    rv = p11_run(ctx, op_hmac_create, &arg);
    if (rv == CKR_OK)
        memcpy(id, arg.id, P11_KEK_ID_LEN);
out:
    return rv;
}

/* ---- sign / verify ------------------------------------------------------ */

struct hmac_arg {
    const unsigned char *id;
    const unsigned char *data;
    size_t len;
    unsigned char *mac; /* sign: out; verify: in */
    int verify;
};

static CK_RV op_hmac(p11_ctx *ctx, CK_SESSION_HANDLE s, void *argp, int *flags)
{
    struct hmac_arg *arg = argp;
    CK_RV rv;
    CK_OBJECT_HANDLE h;
    CK_MECHANISM mech = {CKM_SHA256_HMAC, NULL, 0};
    CK_ULONG mac_len = P11_HMAC_LEN;

    /* Its session-object copy, like a KEK's (kek.c): SoftHSM2 re-reads a
     * token object's file on every use, once per commit group here. */
    rv = p11_kek_use_handle(ctx, s, arg->id, &h, flags);
    if (rv != CKR_OK)
        goto out;
    if (arg->verify) {
        rv = P11_CALL(ctx, C_VerifyInit, s, &mech, h);
        if (rv != CKR_OK)
            goto out;
        /* Quiet: a MAC that does not verify is an answer, not a failure. */
        rv = P11_CALL_QUIET(ctx, C_Verify, s, (CK_BYTE_PTR)arg->data, arg->len, arg->mac,
                            P11_HMAC_LEN);
        if (rv != CKR_OK && rv != CKR_SIGNATURE_INVALID && rv != CKR_SIGNATURE_LEN_RANGE)
            LOG_ERROR(P11_LOG_SUB, "C_Verify: %s", p11_rv_name(rv));
        if (rv == CKR_SIGNATURE_LEN_RANGE)
            rv = CKR_SIGNATURE_INVALID;
        goto out;
    }
    rv = P11_CALL(ctx, C_SignInit, s, &mech, h);
    if (rv != CKR_OK)
        goto out;
    rv = P11_CALL(ctx, C_Sign, s, (CK_BYTE_PTR)arg->data, arg->len, arg->mac, &mac_len);
    if (rv == CKR_BUFFER_TOO_SMALL) /* the operation is still active */
        *flags |= P11_OP_DIRTY;
    if (rv == CKR_OK && mac_len != P11_HMAC_LEN)
        rv = CKR_GENERAL_ERROR;
out:
    return rv;
}

CK_RV p11_hmac_sign(p11_ctx *ctx, const unsigned char id[P11_KEK_ID_LEN], const unsigned char *data,
                    size_t len, unsigned char mac[P11_HMAC_LEN])
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    unsigned char out[P11_HMAC_LEN];
    struct hmac_arg arg = {id, data, len, out, 0};

    if (ctx == NULL || id == NULL || (data == NULL && len > 0) || mac == NULL)
        goto done;
    rv = p11_run(ctx, op_hmac, &arg);
    if (rv == CKR_OK)
        memcpy(mac, out, P11_HMAC_LEN);
done:
    OPENSSL_cleanse(out, sizeof(out));
    return rv;
}

CK_RV p11_hmac_verify(p11_ctx *ctx, const unsigned char id[P11_KEK_ID_LEN],
                      const unsigned char *data, size_t len, const unsigned char mac[P11_HMAC_LEN])
{
    unsigned char copy[P11_HMAC_LEN];
    struct hmac_arg arg = {id, data, len, copy, 1};

    if (ctx == NULL || id == NULL || (data == NULL && len > 0) || mac == NULL)
        return CKR_ARGUMENTS_BAD;
    memcpy(copy, mac, P11_HMAC_LEN);
    return p11_run(ctx, op_hmac, &arg);
}
