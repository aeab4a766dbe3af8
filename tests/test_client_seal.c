/*
 * tests/test_client_seal.c - libp11kms without kmsd: sealed records
 * (round trip, the documented byte layout checked with plain OpenSSL,
 * every kind of tampering, wrong AAD, wrong key), contexts (set, replace,
 * limits), data key objects, target parsing and status strings.
 */
#include <check.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>

#include "kms/client/internal.h"

static const char ID_A[] = "0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f";
static const char ID_B[] = "11111111-2222-4333-8444-555555555555";

static p11kms_data_key *make_key(const char *id, unsigned char fill)
{
    unsigned char bytes[32];
    p11kms_data_key *k = NULL;

    memset(bytes, fill, sizeof(bytes));
    ck_assert_int_eq(kms_data_key_new(id, "customers", 1, bytes, sizeof(bytes), &k), P11KMS_OK);
    return k;
}

static void seal(const p11kms_data_key *k, const char *aad, const char *text, unsigned char **out,
                 size_t *len)
{
    ck_assert_int_eq(p11kms_seal(k, (const unsigned char *)aad, aad ? strlen(aad) : 0,
                                 (const unsigned char *)text, strlen(text), out, len),
                     P11KMS_OK);
}

static p11kms_status open_(const p11kms_data_key *k, const char *aad, const unsigned char *sealed,
                           size_t len, char **text)
{
    unsigned char *out = (unsigned char *)"untouched";
    size_t out_len = 12345;
    p11kms_status s = p11kms_open(k, (const unsigned char *)aad, aad ? strlen(aad) : 0, sealed, len,
                                  &out, &out_len);
    if (s == P11KMS_OK) {
        ck_assert_uint_eq(strlen((char *)out), out_len);
        *text = strdup((char *)out);
        p11kms_buffer_free(out, out_len);
    } else {
        /* out-parameters untouched on failure */
        ck_assert_str_eq((char *)out, "untouched");
        ck_assert_uint_eq(out_len, 12345);
    }
    return s;
}

START_TEST(seal_round_trip)
{
    p11kms_data_key *k = make_key(ID_A, 7);
    unsigned char *a = NULL, *b = NULL;
    size_t alen = 0, blen = 0;
    char *text = NULL, id[P11KMS_DEK_ID_LEN + 1];

    seal(k, "customer=42", "Ada Lovelace", &a, &alen);
    ck_assert_uint_eq(alen, strlen("Ada Lovelace") + P11KMS_SEAL_OVERHEAD);
    ck_assert_int_eq(open_(k, "customer=42", a, alen, &text), P11KMS_OK);
    ck_assert_str_eq(text, "Ada Lovelace");
    free(text);
    ck_assert_int_eq(p11kms_sealed_dek_id(a, alen, id), P11KMS_OK);
    ck_assert_str_eq(id, ID_A);

    /* a fresh nonce every time: same input, different output */
    seal(k, "customer=42", "Ada Lovelace", &b, &blen);
    ck_assert_uint_eq(alen, blen);
    ck_assert(memcmp(a, b, alen) != 0);
    ck_assert(memcmp(a + 42, b + 42, 12) != 0);
    free(a);
    free(b);

    /* empty record, no AAD */
    seal(k, NULL, "", &a, &alen);
    ck_assert_uint_eq(alen, P11KMS_SEAL_OVERHEAD);
    ck_assert_int_eq(open_(k, NULL, a, alen, &text), P11KMS_OK);
    ck_assert_str_eq(text, "");
    free(text);
    ck_assert_int_eq(open_(k, "x", a, alen, &text), P11KMS_ERR_INTEGRITY_FAILURE);
    free(a);
    p11kms_data_key_free(k);
}
END_TEST

/* docs/client.md's layout, decrypted here with nothing but OpenSSL. */
START_TEST(seal_documented_format)
{
    p11kms_data_key *k = make_key(ID_A, 0x42);
    const char *aad = "table=records;row=7", *msg = "the quick brown fox";
    unsigned char *s = NULL, plain[64], gcm_aad[256];
    size_t len = 0, n = strlen(msg);
    int outl = 0, fin = 0;
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    const unsigned char *key = p11kms_data_key_bytes(k, NULL);

    seal(k, aad, msg, &s, &len);
    ck_assert_int_eq(memcmp(s, "P11S", 4), 0);
    ck_assert_int_eq(s[4], 1);
    ck_assert_int_eq(s[5], 36);
    ck_assert_int_eq(memcmp(s + 6, ID_A, 36), 0);
    ck_assert_uint_eq(len, 54 + n + 16);
    memcpy(gcm_aad, s, 54);
    memcpy(gcm_aad + 54, aad, strlen(aad));
    ck_assert_int_eq(EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), NULL, NULL, NULL), 1);
    ck_assert_int_eq(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_IVLEN, 12, NULL), 1);
    ck_assert_int_eq(EVP_DecryptInit_ex(ctx, NULL, NULL, key, s + 42), 1);
    ck_assert_int_eq(EVP_DecryptUpdate(ctx, NULL, &outl, gcm_aad, (int)(54 + strlen(aad))), 1);
    ck_assert_int_eq(EVP_DecryptUpdate(ctx, plain, &outl, s + 54, (int)n), 1);
    ck_assert_int_eq(EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, 16, s + 54 + n), 1);
    ck_assert_int_eq(EVP_DecryptFinal_ex(ctx, plain + outl, &fin), 1);
    ck_assert_int_eq(memcmp(plain, msg, n), 0);
    EVP_CIPHER_CTX_free(ctx);
    free(s);
    p11kms_data_key_free(k);
}
END_TEST

START_TEST(seal_tamper_every_byte)
{
    p11kms_data_key *k = make_key(ID_A, 9);
    unsigned char *s = NULL;
    size_t len = 0;
    char *text = NULL;

    seal(k, "customer=42", "a record worth protecting", &s, &len);
    for (size_t i = 0; i < len; i++) {
        for (int bit = 0; bit < 8; bit += 7) {
            p11kms_status st;
            s[i] ^= (unsigned char)(1u << bit);
            st = open_(k, "customer=42", s, len, &text);
            /* header damage is "not a record of this DEK" (bad_request);
             * everything else fails authentication */
            ck_assert_msg(st == P11KMS_ERR_INTEGRITY_FAILURE ||
                              (i < 42 && st == P11KMS_ERR_BAD_REQUEST),
                          "byte %zu bit %d: status %d", i, bit, st);
            s[i] ^= (unsigned char)(1u << bit);
        }
    }
    ck_assert_int_eq(open_(k, "customer=42", s, len, &text), P11KMS_OK);
    free(text);
    /* truncated and extended */
    ck_assert_int_eq(open_(k, "customer=42", s, P11KMS_SEAL_OVERHEAD - 1, &text),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(open_(k, "customer=42", s, len - 1, &text), P11KMS_ERR_INTEGRITY_FAILURE);
    ck_assert_int_eq(open_(k, "customer=42", s, 0, &text), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(open_(k, "customer=42", NULL, len, &text), P11KMS_ERR_BAD_REQUEST);
    free(s);
    p11kms_data_key_free(k);
}
END_TEST

START_TEST(seal_wrong_aad_and_key)
{
    p11kms_data_key *k = make_key(ID_A, 1), *same_id_other_bytes = make_key(ID_A, 2),
                    *other = make_key(ID_B, 1);
    unsigned char *s = NULL;
    size_t len = 0;
    char *text = NULL, id[P11KMS_DEK_ID_LEN + 1];

    seal(k, "customer=42", "record", &s, &len);
    ck_assert_int_eq(open_(k, "customer=43", s, len, &text), P11KMS_ERR_INTEGRITY_FAILURE);
    ck_assert_int_eq(open_(k, "customer=4", s, len, &text), P11KMS_ERR_INTEGRITY_FAILURE);
    ck_assert_int_eq(open_(k, "", s, len, &text), P11KMS_ERR_INTEGRITY_FAILURE);
    ck_assert_int_eq(open_(k, NULL, s, len, &text), P11KMS_ERR_INTEGRITY_FAILURE);
    ck_assert_int_eq(open_(other, "customer=42", s, len, &text), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(open_(same_id_other_bytes, "customer=42", s, len, &text),
                     P11KMS_ERR_INTEGRITY_FAILURE);
    /* a record re-labelled with another DEK id does not open under it */
    memcpy(s + 6, ID_B, 36);
    ck_assert_int_eq(p11kms_sealed_dek_id(s, len, id), P11KMS_OK);
    ck_assert_str_eq(id, ID_B);
    ck_assert_int_eq(open_(other, "customer=42", s, len, &text), P11KMS_ERR_INTEGRITY_FAILURE);
    /* unknown version, bad magic, bad id */
    s[4] = 2;
    ck_assert_int_eq(p11kms_sealed_dek_id(s, len, id), P11KMS_ERR_BAD_REQUEST);
    s[4] = 1;
    s[0] = 'X';
    ck_assert_int_eq(p11kms_sealed_dek_id(s, len, id), P11KMS_ERR_BAD_REQUEST);
    s[0] = 'P';
    s[6] = 'G';
    ck_assert_int_eq(p11kms_sealed_dek_id(s, len, id), P11KMS_ERR_BAD_REQUEST);
    free(s);
    p11kms_data_key_free(k);
    p11kms_data_key_free(same_id_other_bytes);
    p11kms_data_key_free(other);
}
END_TEST

START_TEST(seal_bad_arguments)
{
    p11kms_data_key *k = make_key(ID_A, 3);
    unsigned char *out = NULL;
    size_t len = 0;

    ck_assert_int_eq(p11kms_seal(NULL, NULL, 0, (const unsigned char *)"x", 1, &out, &len),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_seal(k, NULL, 3, (const unsigned char *)"x", 1, &out, &len),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_seal(k, NULL, 0, NULL, 1, &out, &len), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_seal(k, NULL, 0, NULL, 0, NULL, &len), P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_null(out);
    p11kms_data_key_free(k);
}
END_TEST

START_TEST(seal_large_record)
{
    p11kms_data_key *k = make_key(ID_A, 5);
    size_t n = 3 * 1024 * 1024 + 17;
    unsigned char *big = malloc(n), *s = NULL, *back = NULL;
    size_t slen = 0, blen = 0;

    for (size_t i = 0; i < n; i++)
        big[i] = (unsigned char)(i * 31);
    ck_assert_int_eq(p11kms_seal(k, big, 100, big, n, &s, &slen), P11KMS_OK);
    ck_assert_int_eq(p11kms_open(k, big, 100, s, slen, &back, &blen), P11KMS_OK);
    ck_assert_uint_eq(blen, n);
    ck_assert_int_eq(memcmp(back, big, n), 0);
    p11kms_buffer_free(back, blen);
    free(s);
    free(big);
    p11kms_data_key_free(k);
}
END_TEST

START_TEST(data_key_object)
{
    unsigned char bytes[32];
    p11kms_data_key *k = NULL;
    size_t len = 0;

    memset(bytes, 0xab, sizeof(bytes));
    ck_assert_int_eq(kms_data_key_new(ID_A, "orders", 3, bytes, 32, &k), P11KMS_OK);
    ck_assert_str_eq(p11kms_data_key_id(k), ID_A);
    ck_assert_str_eq(p11kms_data_key_key_name(k), "orders");
    ck_assert_uint_eq(p11kms_data_key_version(k), 3);
    ck_assert_int_eq(memcmp(p11kms_data_key_bytes(k, &len), bytes, 32), 0);
    ck_assert_uint_eq(len, 32);
    p11kms_data_key_free(k);
    p11kms_data_key_free(NULL);
    ck_assert_int_eq(
        kms_data_key_new("0B5E2A5C-6A4E-4F51-9E0E-5F7A8C9D0E1F", "o", 1, bytes, 32, &k),
        P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_data_key_new(ID_A, "o", 1, bytes, 16, &k), P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_null(p11kms_data_key_id(NULL));
}
END_TEST

START_TEST(context_set_replace_limits)
{
    p11kms_context *ctx = p11kms_context_new();
    char name[200], value[1100];

    ck_assert_ptr_nonnull(ctx);
    ck_assert_int_eq(p11kms_context_set(ctx, "customer", "42"), P11KMS_OK);
    ck_assert_str_eq(p11kms_context_get(ctx, "customer"), "42");
    ck_assert_int_eq(p11kms_context_set(ctx, "customer", "43"), P11KMS_OK); /* replaces */
    ck_assert_str_eq(p11kms_context_get(ctx, "customer"), "43");
    ck_assert_uint_eq(json_object_size(kms_context_json(ctx)), 1);
    ck_assert_int_eq(p11kms_context_set(ctx, "region", ""), P11KMS_OK); /* empty value is fine */
    ck_assert_ptr_null(p11kms_context_get(ctx, "nope"));
    ck_assert_int_eq(p11kms_context_set(ctx, "", "v"), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_context_set(ctx, NULL, "v"), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_context_set(ctx, "n", NULL), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_context_set(ctx, "bad\xff", "v"), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_context_set(ctx, "n", "bad\xc3"), P11KMS_ERR_BAD_REQUEST);
    memset(name, 'n', 129);
    name[129] = '\0';
    ck_assert_int_eq(p11kms_context_set(ctx, name, "v"), P11KMS_ERR_BAD_REQUEST);
    name[128] = '\0';
    ck_assert_int_eq(p11kms_context_set(ctx, name, "v"), P11KMS_OK);
    memset(value, 'v', 1025);
    value[1025] = '\0';
    ck_assert_int_eq(p11kms_context_set(ctx, "big", value), P11KMS_ERR_BAD_REQUEST);
    value[1024] = '\0';
    ck_assert_int_eq(p11kms_context_set(ctx, "big", value), P11KMS_OK);
    /* 32 pairs at most; replacing one at the limit still works */
    for (int i = 0; json_object_size(kms_context_json(ctx)) < 32; i++) {
        char n[16];
        snprintf(n, sizeof(n), "k%d", i);
        ck_assert_int_eq(p11kms_context_set(ctx, n, "v"), P11KMS_OK);
    }
    ck_assert_int_eq(p11kms_context_set(ctx, "one-too-many", "v"), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_context_set(ctx, "customer", "44"), P11KMS_OK);
    p11kms_context_free(ctx);
    p11kms_context_free(NULL);
}
END_TEST

START_TEST(client_targets)
{
    p11kms_client *c = NULL;
    p11kms_client_options o;

    ck_assert_int_eq(p11kms_client_open("unix:/tmp/nothing-here.sock", &c), P11KMS_OK);
    ck_assert_str_eq(p11kms_client_error(c), "");
    {
        p11kms_data_key *k = NULL;
        ck_assert_int_eq(p11kms_generate_data_key(c, "customers", NULL, &k), P11KMS_ERR_TRANSPORT);
        ck_assert_ptr_null(k);
        ck_assert_ptr_nonnull(strstr(p11kms_client_error(c), "/tmp/nothing-here.sock"));
        ck_assert_str_eq(kms_client_error_code(c), "transport");
        ck_assert_int_eq(p11kms_decrypt_data_key(c, "not-an-id", NULL, &k), P11KMS_ERR_BAD_REQUEST);
    }
    p11kms_client_close(c);
    c = NULL;
    p11kms_client_options_init(&o);
    o.cert_file = "/nonexistent/cert.pem";
    o.key_file = "/nonexistent/key.pem";
    ck_assert_int_eq(p11kms_client_open_options("https://kms.example:8443", &o, &c), P11KMS_OK);
    p11kms_client_close(c);
    c = NULL;
    ck_assert_int_eq(p11kms_client_open("unix:", &c), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_client_open("/run/kmsd.sock", &c), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_client_open("http://kms:80", &c), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_client_open("https://", &c), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_client_open("https://kms/v1", &c), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_client_open(NULL, &c), P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_null(c);
    p11kms_client_close(NULL);
}
END_TEST

START_TEST(status_strings)
{
    ck_assert_int_eq(P11KMS_OK, 0);
    ck_assert_str_eq(p11kms_strerror(P11KMS_OK), "success");
    ck_assert_str_eq(p11kms_status_code(P11KMS_ERR_CONTEXT_MISMATCH), "context_mismatch");
    ck_assert_str_eq(p11kms_status_code(P11KMS_ERR_TRANSPORT), "transport");
    ck_assert_ptr_nonnull(p11kms_strerror((p11kms_status)999));
}
END_TEST

int main(void)
{
    Suite *s = suite_create("client_seal");
    TCase *tc = tcase_create("unit");
    SRunner *sr;
    int failed;

    tcase_add_test(tc, seal_round_trip);
    tcase_add_test(tc, seal_documented_format);
    tcase_add_test(tc, seal_tamper_every_byte);
    tcase_add_test(tc, seal_wrong_aad_and_key);
    tcase_add_test(tc, seal_bad_arguments);
    tcase_add_test(tc, seal_large_record);
    tcase_add_test(tc, data_key_object);
    tcase_add_test(tc, context_set_replace_limits);
    tcase_add_test(tc, client_targets);
    tcase_add_test(tc, status_strings);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
