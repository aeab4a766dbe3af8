/*
 * kms/client/seal.c - sealed records: AES-256-GCM of an application record
 * under a data key, in one self-describing value (docs/client.md).
 *
 * Format, version 1 (all offsets in bytes):
 *
 *    0  4  magic "P11S" (0x50 0x31 0x31 0x53)
 *    4  1  format version, 0x01
 *    5  1  length of the DEK id, 36
 *    6 36  DEK id, ASCII, canonical lowercase UUID
 *   42 12  nonce (OpenSSL RAND_bytes, fresh for every seal)
 *   54  n  ciphertext (n = plaintext length)
 * 54+n 16  GCM tag
 *
 * GCM's associated data is the 54-byte header (magic through nonce)
 * followed by the caller's AAD, so the DEK id, the version and the
 * caller's binding are all authenticated; the header has a fixed length,
 * so the concatenation is unambiguous.  Random 96-bit nonces keep a DEK
 * safe for 2^32 seals; one DEK per customer stays far below that.
 */
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "kms/client/internal.h"

#define MAGIC       "P11S"
#define VERSION_1   0x01
#define OFF_VERSION 4
#define OFF_IDLEN   5
#define OFF_ID      6
#define OFF_NONCE   (OFF_ID + P11KMS_DEK_ID_LEN)
#define NONCE_LEN   12
#define HEADER_LEN  (OFF_NONCE + NONCE_LEN) /* 54 */
#define TAG_LEN     16

_Static_assert(HEADER_LEN + TAG_LEN == P11KMS_SEAL_OVERHEAD, "seal overhead");

/* Feed len bytes through EVP update in int-sized chunks. */
static int update(EVP_CIPHER_CTX *ctx, int enc, unsigned char *out, const unsigned char *in,
                  size_t len)
{
    while (len > 0) {
        int chunk = len > (size_t)(INT_MAX / 2) ? INT_MAX / 2 : (int)len, n = 0;
        int ok = enc ? EVP_EncryptUpdate(ctx, out, &n, in, chunk)
                     : EVP_DecryptUpdate(ctx, out, &n, in, chunk);
        if (!ok)
            return 0;
        if (out != NULL)
            out += n;
        in += chunk;
        len -= (size_t)chunk;
    }
    return 1;
}

p11kms_status p11kms_sealed_dek_id(const unsigned char *sealed, size_t sealed_len,
                                   char id[P11KMS_DEK_ID_LEN + 1])
{
    char tmp[P11KMS_DEK_ID_LEN + 1];

    if (sealed == NULL || id == NULL || sealed_len < P11KMS_SEAL_OVERHEAD ||
        memcmp(sealed, MAGIC, 4) != 0 || sealed[OFF_VERSION] != VERSION_1 ||
        sealed[OFF_IDLEN] != P11KMS_DEK_ID_LEN)
        return P11KMS_ERR_BAD_REQUEST;
    memcpy(tmp, sealed + OFF_ID, P11KMS_DEK_ID_LEN);
    tmp[P11KMS_DEK_ID_LEN] = '\0';
    if (!kms_valid_dek_id(tmp))
        return P11KMS_ERR_BAD_REQUEST;
    memcpy(id, tmp, sizeof(tmp));
    return P11KMS_OK;
}

p11kms_status p11kms_seal(const p11kms_data_key *k, const unsigned char *aad, size_t aad_len,
                          const unsigned char *plaintext, size_t plaintext_len, unsigned char **out,
                          size_t *out_len)
{
    p11kms_status rv = P11KMS_ERR_INTERNAL;
    EVP_CIPHER_CTX *ctx = NULL;
    unsigned char *buf = NULL;
    const unsigned char *key;
    size_t key_len = 0, total;
    const char *id;
    int n = 0;

    if (k == NULL || out == NULL || out_len == NULL || (plaintext == NULL && plaintext_len > 0) ||
        (aad == NULL && aad_len > 0))
        return P11KMS_ERR_BAD_REQUEST;
    key = p11kms_data_key_bytes(k, &key_len);
    id = p11kms_data_key_id(k);
    if (key_len != P11KMS_DATA_KEY_LEN || !kms_valid_dek_id(id))
        return P11KMS_ERR_BAD_REQUEST;
    if (plaintext_len > SIZE_MAX - P11KMS_SEAL_OVERHEAD)
        return P11KMS_ERR_PAYLOAD_TOO_LARGE;
    total = plaintext_len + P11KMS_SEAL_OVERHEAD;
    if ((buf = malloc(total)) == NULL) {
        rv = P11KMS_ERR_NO_MEMORY;
        goto out;
    }
    memcpy(buf, MAGIC, 4);
    buf[OFF_VERSION] = VERSION_1;
    buf[OFF_IDLEN] = P11KMS_DEK_ID_LEN;
    memcpy(buf + OFF_ID, id, P11KMS_DEK_ID_LEN);
    if (RAND_bytes(buf + OFF_NONCE, NONCE_LEN) != 1)
        goto out;
    if ((ctx = EVP_CIPHER_CTX_new()) == NULL) {
        rv = P11KMS_ERR_NO_MEMORY;
        goto out;
    }
    if (EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) != 1 ||
        EVP_EncryptInit_ex(ctx, NULL, NULL, key, buf + OFF_NONCE) != 1 ||
        !update(ctx, 1, NULL, buf, HEADER_LEN) || !update(ctx, 1, NULL, aad, aad_len) ||
        !update(ctx, 1, buf + HEADER_LEN, plaintext, plaintext_len) ||
        EVP_EncryptFinal_ex(ctx, buf + HEADER_LEN + plaintext_len, &n) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, TAG_LEN, buf + HEADER_LEN + plaintext_len) !=
            1)
        goto out;
    *out = buf;
    *out_len = total;
    buf = NULL;
    rv = P11KMS_OK;
out:
    EVP_CIPHER_CTX_free(ctx); /* cleanses the key schedule */
    if (buf != NULL) {
        OPENSSL_cleanse(buf, total);
        free(buf);
    }
    return rv;
}

p11kms_status p11kms_open(const p11kms_data_key *k, const unsigned char *aad, size_t aad_len,
                          const unsigned char *sealed, size_t sealed_len, unsigned char **out,
                          size_t *out_len)
{
    p11kms_status rv;
    EVP_CIPHER_CTX *ctx = NULL;
    unsigned char *buf = NULL, tag[TAG_LEN];
    char id[P11KMS_DEK_ID_LEN + 1];
    const unsigned char *key;
    size_t key_len = 0, pt_len = 0;
    int n = 0;

    if (k == NULL || out == NULL || out_len == NULL || (aad == NULL && aad_len > 0))
        return P11KMS_ERR_BAD_REQUEST;
    if ((rv = p11kms_sealed_dek_id(sealed, sealed_len, id)) != P11KMS_OK)
        return rv;
    key = p11kms_data_key_bytes(k, &key_len);
    if (key_len != P11KMS_DATA_KEY_LEN || strcmp(id, p11kms_data_key_id(k)) != 0)
        return P11KMS_ERR_BAD_REQUEST;
    pt_len = sealed_len - P11KMS_SEAL_OVERHEAD;
    memcpy(tag, sealed + sealed_len - TAG_LEN, TAG_LEN);
    rv = P11KMS_ERR_NO_MEMORY;
    if ((buf = malloc(pt_len + 1)) == NULL)
        goto out;
    if ((ctx = EVP_CIPHER_CTX_new()) == NULL)
        goto out;
    rv = P11KMS_ERR_INTERNAL;
    if (EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) != 1 ||
        EVP_DecryptInit_ex(ctx, NULL, NULL, key, sealed + OFF_NONCE) != 1 ||
        !update(ctx, 0, NULL, sealed, HEADER_LEN) || !update(ctx, 0, NULL, aad, aad_len) ||
        !update(ctx, 0, buf, sealed + HEADER_LEN, pt_len) ||
        EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN, tag) != 1)
        goto out;
    if (EVP_DecryptFinal_ex(ctx, buf + pt_len, &n) != 1) {
        rv = P11KMS_ERR_INTEGRITY_FAILURE; /* altered record or other AAD */
        goto out;
    }
    buf[pt_len] = '\0';
    *out = buf;
    *out_len = pt_len;
    buf = NULL;
    rv = P11KMS_OK;
out:
    EVP_CIPHER_CTX_free(ctx);
    p11kms_buffer_free(buf, pt_len + 1);
    return rv;
}
