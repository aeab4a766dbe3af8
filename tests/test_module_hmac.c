/*
 * tests/test_module_hmac.c - the audit MAC key of the token layer
 * (module/hmac.c) on a real SoftHSM2 token: its attributes read back
 * (sensitive, non-extractable, sign/verify only, HMAC-SHA256 only), its
 * value unreadable, sign/verify, a wrong MAC refused by the token, an
 * unknown key id, its session-object copy (as locked down as the key),
 * and that the "p11kms:" KEK listing (orphan reconciliation) never
 * includes it.
 */
#include "test_module_support.h"

#define AUDIT_LABEL "p11kms-audit:v1"

static void setup(void)
{
    tm_token_setup_label("hmac");
}

START_TEST(audit_key_attributes)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    CK_SESSION_HANDLE s = tm_raw_session(ctx);
    unsigned char id[P11_KEK_ID_LEN];
    CK_OBJECT_HANDLE h;
    CK_OBJECT_CLASS cls = 0;
    CK_KEY_TYPE kt = 0;
    CK_ULONG len = 0;
    CK_BBOOL token = 0, priv = 0, sens = 0, extr = 1, sign = 0, verify = 0, enc = 1, dec = 1,
             wrap = 1, unwrap = 1, derive = 1, never_extr = 0;
    CK_MECHANISM_TYPE mechs[8];
    char label[64] = "";
    unsigned char value[64];
    CK_ATTRIBUTE a[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_VALUE_LEN, &len, sizeof(len)},
        {CKA_TOKEN, &token, sizeof(token)},
        {CKA_PRIVATE, &priv, sizeof(priv)},
        {CKA_SENSITIVE, &sens, sizeof(sens)},
        {CKA_EXTRACTABLE, &extr, sizeof(extr)},
        {CKA_NEVER_EXTRACTABLE, &never_extr, sizeof(never_extr)},
        {CKA_SIGN, &sign, sizeof(sign)},
        {CKA_VERIFY, &verify, sizeof(verify)},
        {CKA_ENCRYPT, &enc, sizeof(enc)},
        {CKA_DECRYPT, &dec, sizeof(dec)},
        {CKA_WRAP, &wrap, sizeof(wrap)},
        {CKA_UNWRAP, &unwrap, sizeof(unwrap)},
        {CKA_DERIVE, &derive, sizeof(derive)},
        {CKA_ALLOWED_MECHANISMS, mechs, sizeof(mechs)},
        {CKA_LABEL, label, sizeof(label) - 1},
    };
    CK_ATTRIBUTE v = {CKA_VALUE, value, sizeof(value)};
    CK_RV rv;

    ck_assert_uint_eq(p11_hmac_key_create(ctx, AUDIT_LABEL, id), CKR_OK);
    h = tm_raw_find(ctx, s, id);
    rv = fl->C_GetAttributeValue(s, h, a, sizeof(a) / sizeof(a[0]));
    ck_assert_msg(rv == CKR_OK, "C_GetAttributeValue: %s", p11_rv_name(rv));
    ck_assert_uint_eq(cls, CKO_SECRET_KEY);
    ck_assert_uint_eq(kt, CKK_GENERIC_SECRET);
    ck_assert_uint_eq(len, 32);
    ck_assert(token && priv && sens && never_extr);
    ck_assert(!extr);
    ck_assert(sign && verify);
    ck_assert(!enc && !dec && !wrap && !unwrap && !derive);
    ck_assert_uint_eq(a[15].ulValueLen, sizeof(CK_MECHANISM_TYPE));
    ck_assert_uint_eq(mechs[0], CKM_SHA256_HMAC);
    label[a[16].ulValueLen] = '\0';
    ck_assert_str_eq(label, AUDIT_LABEL);
    /* The value never leaves the token. */
    rv = fl->C_GetAttributeValue(s, h, &v, 1);
    ck_assert_msg(rv == CKR_ATTRIBUTE_SENSITIVE, "CKA_VALUE: %s", p11_rv_name(rv));
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

START_TEST(sign_and_verify)
{
    p11_ctx *ctx = tm_open();
    unsigned char id[P11_KEK_ID_LEN], other[P11_KEK_ID_LEN], mac[P11_HMAC_LEN], mac2[P11_HMAC_LEN];
    static const unsigned char data[64] = "start hash || end hash";
    unsigned char changed[64];

    ck_assert_uint_eq(p11_hmac_key_create(ctx, AUDIT_LABEL, id), CKR_OK);
    ck_assert_uint_eq(p11_hmac_sign(ctx, id, data, sizeof(data), mac), CKR_OK);
    ck_assert_uint_eq(p11_hmac_sign(ctx, id, data, sizeof(data), mac2), CKR_OK);
    ck_assert_mem_eq(mac, mac2, P11_HMAC_LEN); /* deterministic */
    ck_assert_uint_eq(p11_hmac_verify(ctx, id, data, sizeof(data), mac), CKR_OK);
    memcpy(changed, data, sizeof(changed));
    changed[63] ^= 1;
    ck_assert_uint_eq(p11_hmac_verify(ctx, id, changed, sizeof(changed), mac),
                      CKR_SIGNATURE_INVALID);
    mac2[0] ^= 0x80;
    ck_assert_uint_eq(p11_hmac_verify(ctx, id, data, sizeof(data), mac2), CKR_SIGNATURE_INVALID);
    /* The session still works after a refused MAC (no operation left). */
    ck_assert_uint_eq(p11_hmac_verify(ctx, id, data, sizeof(data), mac), CKR_OK);
    /* Another key gives another MAC. */
    ck_assert_uint_eq(p11_hmac_key_create(ctx, AUDIT_LABEL, other), CKR_OK);
    ck_assert_uint_eq(p11_hmac_verify(ctx, other, data, sizeof(data), mac), CKR_SIGNATURE_INVALID);
    /* An unknown id. */
    memset(other, 0x5a, sizeof(other));
    ck_assert_uint_eq(p11_hmac_sign(ctx, other, data, sizeof(data), mac2), CKR_KEY_HANDLE_INVALID);
    p11_close(ctx);
}
END_TEST

/* Signing goes through a session-object copy inside the token (SoftHSM2
 * re-reads a token object's file on every use); the copy is exactly as
 * locked down: sensitive, never extractable, HMAC-SHA256 only, and neither
 * it nor the token object can be made otherwise. */
START_TEST(audit_key_session_copy)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    CK_SESSION_HANDLE s = tm_raw_session(ctx);
    unsigned char id[P11_KEK_ID_LEN], mac[P11_HMAC_LEN], value[64];
    static const unsigned char data[32] = "sealed head";
    CK_OBJECT_HANDLE tok, copy, again = CK_INVALID_HANDLE;
    CK_BBOOL token = 1, sens = 0, asens = 0, extr = 1, nextr = 0, sign = 0, enc = 1, yes = CK_TRUE,
             no = CK_FALSE;
    CK_MECHANISM_TYPE mechs[4], ecb_only[] = {CKM_AES_ECB};
    CK_ATTRIBUTE a[] = {
        {CKA_TOKEN, &token, sizeof(token)},         {CKA_SENSITIVE, &sens, sizeof(sens)},
        {CKA_ALWAYS_SENSITIVE, &asens, sizeof(asens)}, {CKA_EXTRACTABLE, &extr, sizeof(extr)},
        {CKA_NEVER_EXTRACTABLE, &nextr, sizeof(nextr)}, {CKA_SIGN, &sign, sizeof(sign)},
        {CKA_ENCRYPT, &enc, sizeof(enc)},           {CKA_ALLOWED_MECHANISMS, mechs, sizeof(mechs)},
    };
    CK_ATTRIBUTE v = {CKA_VALUE, value, sizeof(value)};
    CK_ATTRIBUTE ext = {CKA_EXTRACTABLE, &yes, sizeof(yes)};
    CK_ATTRIBUTE nsens = {CKA_SENSITIVE, &no, sizeof(no)};
    CK_ATTRIBUTE mech = {CKA_ALLOWED_MECHANISMS, ecb_only, sizeof(ecb_only)};
    CK_RV rv;

    ck_assert_uint_eq(p11_hmac_key_create(ctx, AUDIT_LABEL, id), CKR_OK);
    tok = tm_raw_find(ctx, s, id);
    ck_assert_uint_eq(p11_hmac_sign(ctx, id, data, sizeof(data), mac), CKR_OK);
    copy = tm_raw_find_kind(ctx, s, id, CK_FALSE);
    ck_assert_uint_ne(copy, CK_INVALID_HANDLE);
    ck_assert_uint_ne(copy, tok);
    rv = fl->C_GetAttributeValue(s, copy, a, sizeof(a) / sizeof(a[0]));
    ck_assert_msg(rv == CKR_OK, "C_GetAttributeValue: %s", p11_rv_name(rv));
    ck_assert(!token && sens && asens && !extr && nextr && sign && !enc);
    ck_assert_uint_eq(a[7].ulValueLen, sizeof(CK_MECHANISM_TYPE));
    ck_assert_uint_eq(mechs[0], CKM_SHA256_HMAC);
    rv = fl->C_GetAttributeValue(s, copy, &v, 1);
    ck_assert_msg(rv == CKR_ATTRIBUTE_SENSITIVE, "CKA_VALUE of the copy: %s", p11_rv_name(rv));
    ck_assert_uint_ne(fl->C_SetAttributeValue(s, copy, &ext, 1), CKR_OK);
    ck_assert_uint_ne(fl->C_SetAttributeValue(s, copy, &nsens, 1), CKR_OK);
    ck_assert_uint_ne(fl->C_SetAttributeValue(s, copy, &mech, 1), CKR_OK);
    ck_assert_uint_ne(fl->C_SetAttributeValue(s, tok, &ext, 1), CKR_OK);
    ck_assert_uint_ne(fl->C_SetAttributeValue(s, tok, &nsens, 1), CKR_OK);
    ck_assert_uint_ne(fl->C_SetAttributeValue(s, tok, &mech, 1), CKR_OK);
    ck_assert_msg(fl->C_CopyObject(s, copy, &ext, 1, &again) != CKR_OK, "copied extractable");
    ck_assert_msg(fl->C_CopyObject(s, tok, &nsens, 1, &again) != CKR_OK, "copied non-sensitive");
    /* The copy and the token object are one key. */
    ck_assert_uint_eq(p11_hmac_verify(ctx, id, data, sizeof(data), mac), CKR_OK);
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

START_TEST(not_a_kek_for_reconciliation)
{
    p11_ctx *ctx = tm_open();
    unsigned char id[P11_KEK_ID_LEN], kek[P11_KEK_ID_LEN];
    unsigned char(*ids)[P11_KEK_ID_LEN] = NULL;
    size_t n = 0;

    ck_assert_uint_eq(p11_hmac_key_create(ctx, AUDIT_LABEL, id), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:k:v1", kek), CKR_OK);
    /* The prefix orphan reconciliation uses (KMS_KEK_LABEL_PREFIX). */
    ck_assert_uint_eq(p11_kek_list(ctx, "p11kms:", &ids, &n), CKR_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_mem_eq(ids[0], kek, P11_KEK_ID_LEN);
    free(ids);
    ck_assert_uint_eq(p11_hmac_verify(ctx, id, (const unsigned char *)"x", 1,
                                      (const unsigned char *)"0123456789abcdef0123456789abcdef"),
                      CKR_SIGNATURE_INVALID);
    p11_close(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("module_hmac");
    TCase *tc = tcase_create("hmac");
    SRunner *sr;
    int failed;

    tcase_add_unchecked_fixture(tc, setup, tm_token_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, audit_key_attributes);
    tcase_add_test(tc, sign_and_verify);
    tcase_add_test(tc, audit_key_session_copy);
    tcase_add_test(tc, not_a_kek_for_reconciliation);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
