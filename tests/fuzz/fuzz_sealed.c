/*
 * tests/fuzz/fuzz_sealed.c - libFuzzer target for the sealed-record format
 * of libp11kms (p11kms_open, p11kms_sealed_dek_id; kms/client/seal.c)
 * with a fixed data key.
 *
 * The first input byte picks a mode:
 *   even: the rest is a sealed value, opened with the fixed key and the
 *         AAD "fuzz-aad".  Whatever is accepted is checked against an
 *         independent AES-256-GCM decryption written here, and every
 *         single-bit change of it (one position, picked by the input) must
 *         be refused: the parser never accepts a forged value.
 *   odd:  the rest is split into AAD and plaintext, sealed, and must open
 *         to the same bytes; a changed byte, a truncation, another AAD,
 *         another key with the same id (integrity_failure) and another id
 *         (bad_request) must all be refused.
 * No crash, leak or undefined behaviour.  The committed seeds of the even
 * mode are real sealed values under the fixed key (make_corpus.py).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "fuzz_util.h"
#include "kms/client/internal.h"
#include "p11kms/client.h"

#define AAD     "fuzz-aad"
#define ID      "0f0e0d0c-0b0a-4908-8706-050403020100"
#define ID_B    "1f0e0d0c-0b0a-4908-8706-050403020100"
#define HDR_LEN 54
#define TAG_LEN 16

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static p11kms_data_key *key_a, *key_a2, *key_b;
static unsigned char bytes_a[P11KMS_DATA_KEY_LEN];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    unsigned char other[P11KMS_DATA_KEY_LEN];

    (void)argc;
    (void)argv;
    for (size_t i = 0; i < sizeof(bytes_a); i++) {
        bytes_a[i] = (unsigned char)i; /* 00 01 02 ... 1f, as in make_corpus.py */
        other[i] = (unsigned char)(0xa5 ^ i);
    }
    FUZZ_ASSERT(kms_data_key_new(ID, "k1", 1, bytes_a, sizeof(bytes_a), &key_a) == P11KMS_OK);
    FUZZ_ASSERT(kms_data_key_new(ID, "k1", 1, other, sizeof(other), &key_a2) == P11KMS_OK);
    FUZZ_ASSERT(kms_data_key_new(ID_B, "k1", 1, bytes_a, sizeof(bytes_a), &key_b) == P11KMS_OK);
    return 0;
}

/* The format as docs/client.md states it, decrypted with OpenSSL alone. */
static int reference_open(const unsigned char *s, size_t len, const unsigned char *aad,
                          size_t aad_len, unsigned char *out)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    int n = 0, ok;
    size_t pt = len - HDR_LEN - TAG_LEN;

    FUZZ_ASSERT(ctx != NULL);
    ok = len >= HDR_LEN + TAG_LEN && memcmp(s, "P11S\x01\x24", 6) == 0 &&
         memcmp(s + 6, ID, 36) == 0 &&
         EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
         EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) == 1 &&
         EVP_DecryptInit_ex(ctx, NULL, NULL, bytes_a, s + 42) == 1 &&
         EVP_DecryptUpdate(ctx, NULL, &n, s, HDR_LEN) == 1 &&
         (aad_len == 0 || EVP_DecryptUpdate(ctx, NULL, &n, aad, (int)aad_len) == 1) &&
         EVP_DecryptUpdate(ctx, out, &n, s + HDR_LEN, (int)pt) == 1 &&
         EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, TAG_LEN,
                             (void *)(uintptr_t)(s + len - TAG_LEN)) == 1 &&
         EVP_DecryptFinal_ex(ctx, out + n, &n) == 1;
    EVP_CIPHER_CTX_free(ctx);
    return ok;
}

static int opens(const p11kms_data_key *k, const unsigned char *aad, size_t aad_len,
                 const unsigned char *s, size_t len, p11kms_status *st)
{
    unsigned char *pt = NULL;
    size_t pt_len = 0;

    *st = p11kms_open(k, aad, aad_len, s, len, &pt, &pt_len);
    if (*st == P11KMS_OK)
        p11kms_buffer_free(pt, pt_len + 1);
    else
        FUZZ_ASSERT(pt == NULL);
    return *st == P11KMS_OK;
}

static void mode_open(const uint8_t *s, size_t len, uint8_t pick)
{
    unsigned char *pt = NULL, *ref = NULL, *forged = NULL;
    size_t pt_len = 0, pos;
    char id[P11KMS_DEK_ID_LEN + 1];
    p11kms_status st;

    if (p11kms_sealed_dek_id(s, len, id) == P11KMS_OK)
        FUZZ_ASSERT(strlen(id) == P11KMS_DEK_ID_LEN && len >= P11KMS_SEAL_OVERHEAD);
    st = p11kms_open(key_a, (const unsigned char *)AAD, strlen(AAD), s, len, &pt, &pt_len);
    if (st != P11KMS_OK) {
        FUZZ_ASSERT(pt == NULL);
        FUZZ_ASSERT(st == P11KMS_ERR_BAD_REQUEST || st == P11KMS_ERR_INTEGRITY_FAILURE);
        return;
    }
    /* Accepted: it must be genuine. */
    FUZZ_ASSERT(pt_len == len - P11KMS_SEAL_OVERHEAD && pt[pt_len] == '\0');
    ref = malloc(pt_len + 16);
    FUZZ_ASSERT(ref != NULL);
    FUZZ_ASSERT(reference_open(s, len, (const unsigned char *)AAD, strlen(AAD), ref));
    FUZZ_ASSERT(memcmp(ref, pt, pt_len) == 0);
    /* One flipped bit anywhere is a forgery. */
    forged = malloc(len);
    FUZZ_ASSERT(forged != NULL);
    memcpy(forged, s, len);
    pos = ((size_t)pick * 2654435761u) % (len * 8);
    forged[pos / 8] ^= (unsigned char)(1u << (pos % 8));
    FUZZ_ASSERT(!opens(key_a, (const unsigned char *)AAD, strlen(AAD), forged, len, &st));
    /* Another AAD, and the right one with a wrong key. */
    FUZZ_ASSERT(!opens(key_a, (const unsigned char *)"fuzz-aaD", 8, s, len, &st));
    FUZZ_ASSERT(st == P11KMS_ERR_INTEGRITY_FAILURE);
    FUZZ_ASSERT(!opens(key_a2, (const unsigned char *)AAD, strlen(AAD), s, len, &st));
    FUZZ_ASSERT(st == P11KMS_ERR_INTEGRITY_FAILURE);
    p11kms_buffer_free(pt, pt_len + 1);
    free(ref);
    free(forged);
}

static void mode_roundtrip(const uint8_t *d, size_t len)
{
    size_t aad_len = len > 0 ? d[0] % (len) : 0;
    const unsigned char *aad = d + (len > 0 ? 1 : 0), *pt;
    unsigned char *sealed = NULL, *out = NULL;
    size_t pt_len, sealed_len = 0, out_len = 0, pos;
    char id[P11KMS_DEK_ID_LEN + 1];
    p11kms_status st;

    if (len > 0)
        len--;
    if (aad_len > len)
        aad_len = len;
    pt = aad + aad_len;
    pt_len = len - aad_len;
    FUZZ_ASSERT(p11kms_seal(key_a, aad_len ? aad : NULL, aad_len, pt_len ? pt : NULL, pt_len,
                            &sealed, &sealed_len) == P11KMS_OK);
    FUZZ_ASSERT(sealed_len == pt_len + P11KMS_SEAL_OVERHEAD);
    FUZZ_ASSERT(p11kms_sealed_dek_id(sealed, sealed_len, id) == P11KMS_OK);
    FUZZ_ASSERT(strcmp(id, ID) == 0);
    FUZZ_ASSERT(p11kms_open(key_a, aad_len ? aad : NULL, aad_len, sealed, sealed_len, &out,
                            &out_len) == P11KMS_OK);
    FUZZ_ASSERT(out_len == pt_len && (pt_len == 0 || memcmp(out, pt, pt_len) == 0));
    p11kms_buffer_free(out, out_len + 1);
    /* Refusals. */
    FUZZ_ASSERT(!opens(key_b, aad, aad_len, sealed, sealed_len, &st));
    FUZZ_ASSERT(st == P11KMS_ERR_BAD_REQUEST);
    FUZZ_ASSERT(!opens(key_a2, aad, aad_len, sealed, sealed_len, &st));
    FUZZ_ASSERT(st == P11KMS_ERR_INTEGRITY_FAILURE);
    FUZZ_ASSERT(!opens(key_a, (const unsigned char *)"x", 1, sealed, sealed_len, &st) ||
                (aad_len == 1 && aad[0] == 'x'));
    FUZZ_ASSERT(!opens(key_a, aad, aad_len, sealed, sealed_len - 1, &st));
    pos = (pt_len * 7 + aad_len) % sealed_len;
    sealed[pos] ^= 0x01;
    FUZZ_ASSERT(!opens(key_a, aad, aad_len, sealed, sealed_len, &st));
    free(sealed);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if ((data[0] & 1) == 0)
        mode_open(data + 1, size - 1, data[0]);
    else
        mode_roundtrip(data + 1, size - 1);
    return 0;
}
