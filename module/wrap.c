/*
 * module/wrap.c - AES-GCM wrap and unwrap inside the token, and the token
 * RNG.
 *
 * A wrapped blob is IV (12 bytes, from C_GenerateRandom) || ciphertext ||
 * tag (16 bytes); the AAD is the caller's.  The hot path makes no
 * allocation and no search: the KEK handle comes from the cache in kek.c
 * (the KEK's session-object copy when the token allows one), the session
 * from the pool, the GCM parameters live on the stack.
 * Any authentication failure reported by C_Decrypt becomes
 * CKR_ENCRYPTED_DATA_INVALID, and the plaintext buffer is wiped (but a
 * CKR_GENERAL_ERROR from a token that no longer answers C_GetTokenInfo is
 * CKR_TOKEN_NOT_PRESENT: the token is gone, the data is not at fault).  SoftHSM2
 * 2.6.1 says CKR_GENERAL_ERROR for a bad tag, wrong AAD or wrong key
 * (tests/test_module_token.c, test_softhsm_bad_tag_rv checks it); PKCS#11
 * 3.0 tokens say CKR_AEAD_DECRYPT_FAILED, others CKR_ENCRYPTED_DATA_INVALID.
 * CKR_GENERAL_ERROR and CKR_FUNCTION_FAILED may as well be a passing device
 * fault, so after one of those the unwrap runs once more (GCM verifies the
 * tag: a success is right) and only a second failure is reported as an
 * authentication failure -- which callers treat as corrupted data.
 * SoftHSM2 also wants output room for ciphertext || tag, so a caller's
 * buffer of exactly the plaintext size is served by a wiped scratch
 * buffer (on the stack for DEK-sized blobs).
 *
 * Locking: none of its own; the operations run under p11_run.
 */
#include <string.h>

#include <openssl/crypto.h>

#include "internal.h"

#define UNWRAP_STACK_MAX 512 /* scratch for plaintexts up to this, on the stack */

/* ---- random ------------------------------------------------------------- */

struct random_arg {
    unsigned char *buf;
    size_t len;
};

static CK_RV op_random(p11_ctx *ctx, CK_SESSION_HANDLE s, void *argp, int *flags)
{
    struct random_arg *arg = argp;

    (void)flags;
    return P11_CALL(ctx, C_GenerateRandom, s, arg->buf, arg->len);
}

CK_RV p11_random(p11_ctx *ctx, unsigned char *buf, size_t len)
{
    struct random_arg arg = {buf, len};

    if (ctx == NULL || (buf == NULL && len > 0))
        return CKR_ARGUMENTS_BAD;
    if (len == 0)
        return CKR_OK;
    return p11_run(ctx, op_random, &arg);
}

/* ---- wrap --------------------------------------------------------------- */

struct gcm_arg {
    const unsigned char *kek_id;
    const unsigned char *aad;
    size_t aad_len;
    const unsigned char *in;
    size_t in_len;
    unsigned char *out;
    size_t out_len;  /* capacity on entry, length written on success */
    CK_RV module_rv; /* unwrap: what C_Decrypt said */
};

static void gcm_params(CK_GCM_PARAMS *p, unsigned char *iv, const struct gcm_arg *arg)
{
    p->pIv = iv;
    p->ulIvLen = P11_GCM_IV_LEN;
    p->ulIvBits = P11_GCM_IV_LEN * 8;
    p->pAAD = (CK_BYTE_PTR)(arg->aad_len ? arg->aad : NULL);
    p->ulAADLen = arg->aad_len;
    p->ulTagBits = P11_GCM_TAG_LEN * 8;
}

static CK_RV op_wrap(p11_ctx *ctx, CK_SESSION_HANDLE s, void *argp, int *flags)
{
    struct gcm_arg *arg = argp;
    CK_RV rv;
    CK_OBJECT_HANDLE h;
    CK_GCM_PARAMS params;
    CK_MECHANISM mech = {CKM_AES_GCM, &params, sizeof(params)};
    CK_ULONG ct_len = arg->in_len + P11_GCM_TAG_LEN;

    rv = p11_kek_use_handle(ctx, s, arg->kek_id, &h, flags);
    if (rv != CKR_OK)
        goto out;
    rv = P11_CALL(ctx, C_GenerateRandom, s, arg->out, P11_GCM_IV_LEN);
    if (rv != CKR_OK)
        goto out;
    gcm_params(&params, arg->out, arg);
    rv = P11_CALL(ctx, C_EncryptInit, s, &mech, h);
    if (rv != CKR_OK)
        goto out;
    rv = P11_CALL(ctx, C_Encrypt, s, (CK_BYTE_PTR)arg->in, arg->in_len, arg->out + P11_GCM_IV_LEN,
                  &ct_len);
    if (rv == CKR_BUFFER_TOO_SMALL) /* the operation is still active */
        *flags |= P11_OP_DIRTY;
    if (rv != CKR_OK)
        goto out;
    arg->out_len = P11_GCM_IV_LEN + ct_len;
out:
    return rv;
}

CK_RV p11_wrap(p11_ctx *ctx, const unsigned char kek_id[P11_KEK_ID_LEN], const unsigned char *aad,
               size_t aad_len, const unsigned char *pt, size_t pt_len, unsigned char *out,
               size_t *out_len)
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    static const unsigned char empty[1];
    struct gcm_arg arg = {kek_id, aad, aad_len, pt ? pt : empty, pt_len, out, 0, CKR_OK};

    if (ctx == NULL || kek_id == NULL || (aad == NULL && aad_len > 0) ||
        (pt == NULL && pt_len > 0) || out == NULL || out_len == NULL ||
        pt_len > SIZE_MAX - P11_WRAP_OVERHEAD)
        goto out;
    if (*out_len < pt_len + P11_WRAP_OVERHEAD) {
        rv = CKR_BUFFER_TOO_SMALL;
        goto out;
    }
    arg.out_len = *out_len;
    rv = p11_run(ctx, op_wrap, &arg);
    if (rv != CKR_OK)
        goto out;
    *out_len = arg.out_len;
out:
    return rv;
}

/* ---- generate and wrap ----------------------------------------------------- */

#define GENERATE_MAX 64 /* longest DEK p11_generate_and_wrap draws */

struct genwrap_arg {
    struct gcm_arg gcm; /* in: the caller's DEK buffer (filled here) */
    unsigned char *dek;
    size_t dek_len;
};

/* One C_GenerateRandom for DEK and IV, then the wrap: three token calls
 * instead of four. */
static CK_RV op_generate_wrap(p11_ctx *ctx, CK_SESSION_HANDLE s, void *argp, int *flags)
{
    struct genwrap_arg *arg = argp;
    CK_RV rv;
    CK_OBJECT_HANDLE h;
    CK_GCM_PARAMS params;
    CK_MECHANISM mech = {CKM_AES_GCM, &params, sizeof(params)};
    CK_ULONG ct_len = arg->dek_len + P11_GCM_TAG_LEN;
    unsigned char rnd[GENERATE_MAX + P11_GCM_IV_LEN];

    rv = p11_kek_use_handle(ctx, s, arg->gcm.kek_id, &h, flags);
    if (rv != CKR_OK)
        goto out;
    rv = P11_CALL(ctx, C_GenerateRandom, s, rnd, arg->dek_len + P11_GCM_IV_LEN);
    if (rv != CKR_OK)
        goto out;
    memcpy(arg->dek, rnd, arg->dek_len);
    memcpy(arg->gcm.out, rnd + arg->dek_len, P11_GCM_IV_LEN);
    gcm_params(&params, arg->gcm.out, &arg->gcm);
    rv = P11_CALL(ctx, C_EncryptInit, s, &mech, h);
    if (rv != CKR_OK)
        goto out;
    rv =
        P11_CALL(ctx, C_Encrypt, s, arg->dek, arg->dek_len, arg->gcm.out + P11_GCM_IV_LEN, &ct_len);
    if (rv == CKR_BUFFER_TOO_SMALL) /* the operation is still active */
        *flags |= P11_OP_DIRTY;
    if (rv != CKR_OK)
        goto out;
    arg->gcm.out_len = P11_GCM_IV_LEN + ct_len;
out:
    OPENSSL_cleanse(rnd, sizeof(rnd));
    return rv;
}

CK_RV p11_generate_and_wrap(p11_ctx *ctx, const unsigned char kek_id[P11_KEK_ID_LEN],
                            const unsigned char *aad, size_t aad_len, size_t dek_len,
                            unsigned char *dek_out, unsigned char *blob_out, size_t *blob_len)
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    struct genwrap_arg arg;

    memset(&arg, 0, sizeof(arg));
    if (ctx == NULL || kek_id == NULL || (aad == NULL && aad_len > 0) || dek_len == 0 ||
        dek_len > GENERATE_MAX || dek_out == NULL || blob_out == NULL || blob_len == NULL)
        goto out;
    if (*blob_len < dek_len + P11_WRAP_OVERHEAD) {
        rv = CKR_BUFFER_TOO_SMALL;
        goto out;
    }
    arg.gcm.kek_id = kek_id;
    arg.gcm.aad = aad;
    arg.gcm.aad_len = aad_len;
    arg.gcm.out = blob_out;
    arg.gcm.out_len = *blob_len;
    arg.dek = dek_out;
    arg.dek_len = dek_len;
    rv = p11_run(ctx, op_generate_wrap, &arg);
    if (rv != CKR_OK)
        goto out;
    *blob_len = arg.gcm.out_len;
out:
    if (rv != CKR_OK && dek_out != NULL && dek_len <= GENERATE_MAX)
        OPENSSL_cleanse(dek_out, dek_len);
    return rv;
}

/* ---- unwrap ------------------------------------------------------------- */

/* What C_Decrypt may say when the tag does not verify. */
static int is_auth_failure(CK_RV rv)
{
    switch (rv) {
    case CKR_ENCRYPTED_DATA_INVALID:
    case CKR_ENCRYPTED_DATA_LEN_RANGE:
    case CKR_AEAD_DECRYPT_FAILED:
    case CKR_SIGNATURE_INVALID:
    case CKR_DATA_INVALID:
    case CKR_DATA_LEN_RANGE:
    case CKR_GENERAL_ERROR:
    case CKR_FUNCTION_FAILED: return 1;
    default: return 0;
    }
}

static CK_RV op_unwrap(p11_ctx *ctx, CK_SESSION_HANDLE s, void *argp, int *flags)
{
    struct gcm_arg *arg = argp;
    CK_RV rv;
    CK_OBJECT_HANDLE h;
    CK_GCM_PARAMS params;
    CK_MECHANISM mech = {CKM_AES_GCM, &params, sizeof(params)};
    CK_ULONG ct_len = arg->in_len - P11_GCM_IV_LEN; /* ciphertext || tag */
    CK_ULONG pt_len = ct_len;
    unsigned char small[UNWRAP_STACK_MAX];
    unsigned char *buf = arg->out;

    /* SoftHSM2 wants room for ciphertext || tag even though the tag is not
     * returned: decrypt into a wiped scratch buffer when the caller's is
     * exactly the plaintext size. */
    if (arg->out_len < ct_len) {
        buf = ct_len <= sizeof(small) ? small : p11_secret_alloc(ct_len);
        if (buf == NULL) {
            rv = CKR_HOST_MEMORY;
            goto out;
        }
    }
    rv = p11_kek_use_handle(ctx, s, arg->kek_id, &h, flags);
    if (rv != CKR_OK)
        goto out;
    gcm_params(&params, (unsigned char *)arg->in, arg);
    rv = P11_CALL(ctx, C_DecryptInit, s, &mech, h);
    if (rv != CKR_OK)
        goto out;
    /* Quiet: an authentication failure is not a token failure, and is
     * logged below as what it is. */
    rv = P11_CALL_QUIET(ctx, C_Decrypt, s, (CK_BYTE_PTR)arg->in + P11_GCM_IV_LEN, ct_len, buf,
                        &pt_len);
    arg->module_rv = rv;
    /* SoftHSM2's word for a bad tag is also its word for a token that
     * lost its storage: a token that no longer answers is not a verdict
     * on the data (p11_run re-initialises and retries). */
    if ((rv == CKR_GENERAL_ERROR || rv == CKR_FUNCTION_FAILED) &&
        p11_token_present(ctx) != CKR_OK) {
        LOG_WARN(P11_LOG_SUB, "C_Decrypt: %s, and the token does not answer", p11_rv_name(rv));
        rv = CKR_TOKEN_NOT_PRESENT;
    } else if (is_auth_failure(rv)) {
        LOG_WARN(P11_LOG_SUB, "C_Decrypt: AES-GCM authentication failed (module said %s)",
                 p11_rv_name(rv));
        rv = CKR_ENCRYPTED_DATA_INVALID;
    } else if (rv != CKR_OK) {
        LOG_ERROR(P11_LOG_SUB, "C_Decrypt: %s", p11_rv_name(rv));
        if (rv == CKR_BUFFER_TOO_SMALL)
            *flags |= P11_OP_DIRTY;
    }
    if (rv != CKR_OK)
        goto out;
    if (pt_len > arg->out_len) { /* cannot happen with GCM */
        rv = CKR_BUFFER_TOO_SMALL;
        goto out;
    }
    if (buf != arg->out)
        memcpy(arg->out, buf, pt_len);
    arg->out_len = pt_len;
out:
    if (buf == small)
        OPENSSL_cleanse(small, sizeof(small));
    else if (buf != arg->out)
        p11_secret_free(buf, ct_len);
    return rv;
}

CK_RV p11_unwrap(p11_ctx *ctx, const unsigned char kek_id[P11_KEK_ID_LEN], const unsigned char *aad,
                 size_t aad_len, const unsigned char *in, size_t in_len, unsigned char *pt,
                 size_t *pt_len)
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    unsigned char empty[1]; /* never pass NULL: that is a length query */
    struct gcm_arg arg = {kek_id, aad, aad_len, in, in_len, empty, sizeof(empty), CKR_OK};
    size_t cap = 0;

    if (ctx == NULL || kek_id == NULL || (aad == NULL && aad_len > 0) || in == NULL ||
        pt_len == NULL || (pt == NULL && *pt_len > 0))
        goto out;
    cap = *pt_len;
    if (in_len < P11_WRAP_OVERHEAD) {
        rv = CKR_ENCRYPTED_DATA_INVALID;
        goto out;
    }
    if (cap < in_len - P11_WRAP_OVERHEAD) {
        rv = CKR_BUFFER_TOO_SMALL;
        goto out;
    }
    if (cap > 0) {
        arg.out = pt;
        arg.out_len = cap;
    }
    rv = p11_run(ctx, op_unwrap, &arg);
    if (rv == CKR_ENCRYPTED_DATA_INVALID &&
        (arg.module_rv == CKR_GENERAL_ERROR || arg.module_rv == CKR_FUNCTION_FAILED)) {
        LOG_WARN(P11_LOG_SUB, "C_Decrypt said %s: maybe a device fault; unwrapping once more",
                 p11_rv_name(arg.module_rv));
        rv = p11_run(ctx, op_unwrap, &arg);
    }
    if (rv != CKR_OK)
        goto out;
    *pt_len = arg.out_len;
out:
    if (rv != CKR_OK && pt != NULL && cap > 0)
        OPENSSL_cleanse(pt, cap);
    OPENSSL_cleanse(empty, sizeof(empty));
    return rv;
}
