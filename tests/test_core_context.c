/*
 * tests/test_core_context.c - unit tests of the pure parts of the core:
 * context canonicalisation, key-name syntax, the AAD layout and the test
 * vector published in docs/wrapping.md, and the error-code table.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "kms/core/core.h"

static char *canon(const char *json_text, p11kms_status *st)
{
    json_error_t err;
    json_t *j = json_text ? json_loads(json_text, JSON_DECODE_ANY, &err) : NULL;
    char *out = NULL;
    *st = kms_context_canonical(j, &out);
    json_decref(j);
    return out;
}

START_TEST(test_canonical_sorts_and_compacts)
{
    p11kms_status st;
    char *c = canon("{ \"region\" : \"eu\", \"customer\": \"42\" }", &st);
    ck_assert_int_eq(st, P11KMS_OK);
    ck_assert_str_eq(c, "{\"customer\":\"42\",\"region\":\"eu\"}");
    free(c);
    c = canon("{\"b\":\"1\",\"a\":\"2\",\"ab\":\"3\",\"B\":\"4\"}", &st);
    ck_assert_int_eq(st, P11KMS_OK);
    ck_assert_str_eq(c, "{\"B\":\"4\",\"a\":\"2\",\"ab\":\"3\",\"b\":\"1\"}");
    free(c);
}
END_TEST

START_TEST(test_canonical_empty)
{
    p11kms_status st;
    char *c = canon(NULL, &st);
    ck_assert_int_eq(st, P11KMS_OK);
    ck_assert_str_eq(c, "{}");
    free(c);
    c = canon("{}", &st);
    ck_assert_int_eq(st, P11KMS_OK);
    ck_assert_str_eq(c, "{}");
    free(c);
}
END_TEST

START_TEST(test_canonical_escapes)
{
    p11kms_status st;
    char *c = canon("{\"q\\\"\":\"a\\\\b\\n\\u0001/\\u00e9\"}", &st);
    ck_assert_int_eq(st, P11KMS_OK);
    ck_assert_str_eq(c, "{\"q\\\"\":\"a\\\\b\\u000a\\u0001/\xc3\xa9\"}");
    free(c);
}
END_TEST

START_TEST(test_canonical_same_for_equal_contexts)
{
    p11kms_status st1, st2;
    char *a = canon("{\"x\":\"1\",\"y\":\"2\"}", &st1);
    char *b = canon("{\"y\":\"2\",   \"x\":\"1\"}", &st2);
    ck_assert_int_eq(st1, P11KMS_OK);
    ck_assert_int_eq(st2, P11KMS_OK);
    ck_assert_str_eq(a, b);
    free(a);
    free(b);
}
END_TEST

START_TEST(test_canonical_rejects)
{
    static const char *const bad[] = {
        "[]", "\"text\"", "42", "{\"a\":1}", "{\"a\":null}", "{\"a\":{\"b\":\"c\"}}",
        "{\"a\":[\"b\"]}", "{\"\":\"empty name\"}", "{\"a\":true}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        p11kms_status st;
        char *c = canon(bad[i], &st);
        ck_assert_msg(st == P11KMS_ERR_BAD_REQUEST, "accepted %s", bad[i]);
        ck_assert_ptr_null(c);
    }
}
END_TEST

START_TEST(test_canonical_limits)
{
    json_t *j = json_object();
    char name[KMS_CONTEXT_MAX_NAME + 2];
    char *value = malloc(KMS_CONTEXT_MAX_VALUE + 2);
    char *out = NULL;

    for (int i = 0; i < KMS_CONTEXT_MAX_PAIRS; i++) {
        char n[16];
        snprintf(n, sizeof(n), "k%d", i);
        json_object_set_new(j, n, json_string("v"));
    }
    ck_assert_int_eq(kms_context_canonical(j, &out), P11KMS_OK);
    free(out);
    out = NULL;
    json_object_set_new(j, "one-too-many", json_string("v"));
    ck_assert_int_eq(kms_context_canonical(j, &out), P11KMS_ERR_BAD_REQUEST);
    json_decref(j);

    j = json_object();
    memset(name, 'n', sizeof(name) - 1);
    name[sizeof(name) - 1] = '\0';
    json_object_set_new(j, name, json_string("v"));
    ck_assert_int_eq(kms_context_canonical(j, &out), P11KMS_ERR_BAD_REQUEST);
    json_decref(j);

    j = json_object();
    memset(value, 'v', KMS_CONTEXT_MAX_VALUE + 1);
    value[KMS_CONTEXT_MAX_VALUE + 1] = '\0';
    json_object_set_new(j, "n", json_string(value));
    ck_assert_int_eq(kms_context_canonical(j, &out), P11KMS_ERR_BAD_REQUEST);
    value[KMS_CONTEXT_MAX_VALUE] = '\0';
    json_object_set_new(j, "n", json_string(value));
    ck_assert_int_eq(kms_context_canonical(j, &out), P11KMS_OK);
    free(out);
    json_decref(j);
    free(value);
}
END_TEST

START_TEST(test_key_names)
{
    char longest[KMS_NAME_MAX + 2];
    ck_assert(kms_key_name_valid("customers"));
    ck_assert(kms_key_name_valid("a"));
    ck_assert(kms_key_name_valid("0abc.def_ghi-j"));
    ck_assert(!kms_key_name_valid(""));
    ck_assert(!kms_key_name_valid(NULL));
    ck_assert(!kms_key_name_valid("Customers"));
    ck_assert(!kms_key_name_valid("-abc"));
    ck_assert(!kms_key_name_valid(".abc"));
    ck_assert(!kms_key_name_valid("a b"));
    ck_assert(!kms_key_name_valid("a/b"));
    ck_assert(!kms_key_name_valid("caf\xc3\xa9"));
    memset(longest, 'a', KMS_NAME_MAX);
    longest[KMS_NAME_MAX] = '\0';
    ck_assert(kms_key_name_valid(longest));
    longest[KMS_NAME_MAX] = 'a';
    longest[KMS_NAME_MAX + 1] = '\0';
    ck_assert(!kms_key_name_valid(longest));
}
END_TEST

/* The test vector of docs/wrapping.md. */
#define VEC_KEY "customers"
#define VEC_ID "6f1c2b0e-8d4a-4c51-9e3b-2a7d5f0c9e14"
#define VEC_CTX "{\"customer\":\"42\",\"region\":\"eu\"}"
static const char vec_aad_hex[] =
    "7031316b6d732d64656b010009637573746f6d65727300000001002436663163326230652d3864"
    "34612d346335312d396533622d3261376435663063396531340000001f7b22637573746f6d6572"
    "223a223432222c22726567696f6e223a226575227d";
static const char vec_wrapped_hex[] =
    "a0a1a2a3a4a5a6a7a8a9aaabc6395e0e61ee24984a4cadf82b57eef1409d6b23a682745ba4371cbd"
    "43964b3e51dd60a576bfd6f8d4dac60054ee310b";

static size_t unhex(const char *hex, unsigned char *out)
{
    size_t n = strlen(hex) / 2;
    for (size_t i = 0; i < n; i++) {
        unsigned int b;
        sscanf(hex + 2 * i, "%2x", &b);
        out[i] = (unsigned char)b;
    }
    return n;
}

START_TEST(test_aad_vector)
{
    unsigned char *aad = NULL, expect[256];
    size_t aad_len = 0, n = unhex(vec_aad_hex, expect);
    ck_assert_int_eq(kms_aad_build(VEC_KEY, 1, VEC_ID, VEC_CTX, &aad, &aad_len), P11KMS_OK);
    ck_assert_uint_eq(aad_len, n);
    ck_assert_int_eq(memcmp(aad, expect, n), 0);
    free(aad);
}
END_TEST

/* The wrapped blob of the vector is IV || ciphertext || tag under the
 * KEK 00..1f: decrypting it with OpenSSL and the AAD above gives 20..3f. */
START_TEST(test_wrapped_vector_opens_with_openssl)
{
    unsigned char kek[32], blob[128], aad[256], pt[64];
    size_t blob_len = unhex(vec_wrapped_hex, blob), aad_len = unhex(vec_aad_hex, aad);
    int len = 0, fin = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();

    for (int i = 0; i < 32; i++)
        kek[i] = (unsigned char)i;
    ck_assert_uint_eq(blob_len, 12 + 32 + 16);
    ck_assert(EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1);
    ck_assert(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, 12, NULL) == 1);
    ck_assert(EVP_DecryptInit_ex(c, NULL, NULL, kek, blob) == 1);
    ck_assert(EVP_DecryptUpdate(c, NULL, &len, aad, (int)aad_len) == 1);
    ck_assert(EVP_DecryptUpdate(c, pt, &len, blob + 12, 32) == 1);
    ck_assert(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, blob + 44) == 1);
    ck_assert(EVP_DecryptFinal_ex(c, pt + len, &fin) == 1);
    ck_assert_int_eq(len + fin, 32);
    for (int i = 0; i < 32; i++)
        ck_assert_int_eq(pt[i], 0x20 + i);
    EVP_CIPHER_CTX_free(c);
}
END_TEST

START_TEST(test_aad_binds_every_field)
{
    unsigned char *a = NULL, *b = NULL;
    size_t al, bl;
    ck_assert_int_eq(kms_aad_build("k", 1, VEC_ID, "{}", &a, &al), P11KMS_OK);
    ck_assert_int_eq(kms_aad_build("k", 2, VEC_ID, "{}", &b, &bl), P11KMS_OK);
    ck_assert(al != bl || memcmp(a, b, al) != 0);
    free(b);
    /* length prefixes keep name/context boundaries unambiguous */
    ck_assert_int_eq(kms_aad_build("ka", 1, VEC_ID, "{}", &b, &bl), P11KMS_OK);
    ck_assert(al != bl || memcmp(a, b, al) != 0);
    free(b);
    free(a);
}
END_TEST

START_TEST(test_status_table)
{
    ck_assert_str_eq(p11kms_status_code(P11KMS_ERR_DEK_REVOKED), "dek_revoked");
    ck_assert_int_eq(p11kms_status_http(P11KMS_ERR_DEK_REVOKED), 403);
    ck_assert_int_eq(p11kms_status_http(P11KMS_ERR_DEK_DESTROYED), 410);
    ck_assert_int_eq(p11kms_status_http(P11KMS_ERR_PAYLOAD_TOO_LARGE), 413);
    ck_assert_int_eq(p11kms_status_http(P11KMS_ERR_TOKEN_UNAVAILABLE), 503);
    ck_assert_int_eq(p11kms_status_from_code("key_exists"), P11KMS_ERR_KEY_EXISTS);
    for (int i = 1; i < P11KMS_STATUS_COUNT; i++) {
        ck_assert_ptr_nonnull(p11kms_strerror((p11kms_status)i));
        ck_assert_int_ge(p11kms_status_http((p11kms_status)i), 400);
    }
    ck_assert_str_eq(p11kms_status_code((p11kms_status)9999), "internal");
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("core_context");
    TCase *tc = tcase_create("units");
    tcase_add_test(tc, test_canonical_sorts_and_compacts);
    tcase_add_test(tc, test_canonical_empty);
    tcase_add_test(tc, test_canonical_escapes);
    tcase_add_test(tc, test_canonical_same_for_equal_contexts);
    tcase_add_test(tc, test_canonical_rejects);
    tcase_add_test(tc, test_canonical_limits);
    tcase_add_test(tc, test_key_names);
    tcase_add_test(tc, test_aad_vector);
    tcase_add_test(tc, test_wrapped_vector_opens_with_openssl);
    tcase_add_test(tc, test_aad_binds_every_field);
    tcase_add_test(tc, test_status_table);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
