/*
 * tests/test_module_session_copy.c - the session-object copies of the KEKs
 * (module/kek.c) against a real SoftHSM2 token: the copy is as locked
 * down as the token object (sensitive, non-extractable, AES-GCM only,
 * CKA_TOKEN false), blobs cross between copy and token object both ways,
 * the copy survives recovery from lost sessions (made again), a retired
 * KEK takes its copy with it, and a KEK created before KEKs were
 * CKA_COPYABLE still works through its token object.  Also
 * p11_generate_and_wrap (DEK and IV from one C_GenerateRandom).
 */
#include "test_module_support.h"

#include <pthread.h>

static void setup_token(void)
{
    tm_token_setup_label("p11kms-copy-test");
}

/* How many session-object (CKA_TOKEN false) secret keys have this CKA_ID. */
static CK_ULONG count_copies(p11_ctx *ctx, CK_SESSION_HANDLE s,
                             const unsigned char id[P11_KEK_ID_LEN])
{
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_BBOOL no = CK_FALSE;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof(cls)},
                        {CKA_ID, (void *)id, P11_KEK_ID_LEN},
                        {CKA_TOKEN, &no, sizeof(no)}};
    CK_OBJECT_HANDLE h[8];
    CK_ULONG n = 0;

    ck_assert_uint_eq(fl->C_FindObjectsInit(s, t, 3), CKR_OK);
    ck_assert_uint_eq(fl->C_FindObjects(s, h, 8, &n), CKR_OK);
    ck_assert_uint_eq(fl->C_FindObjectsFinal(s), CKR_OK);
    return n;
}

static void wrap_ok(p11_ctx *ctx, const unsigned char *id, const unsigned char dek[32],
                    unsigned char blob[32 + P11_WRAP_OVERHEAD])
{
    size_t blob_len = 32 + P11_WRAP_OVERHEAD;
    CK_RV rv = p11_wrap(ctx, id, (const unsigned char *)"aad", 3, dek, 32, blob, &blob_len);

    ck_assert_msg(rv == CKR_OK, "p11_wrap: %s", p11_rv_name(rv));
    ck_assert_uint_eq(blob_len, 32 + P11_WRAP_OVERHEAD);
}

static void unwrap_ok(p11_ctx *ctx, const unsigned char *id,
                      const unsigned char blob[32 + P11_WRAP_OVERHEAD], const unsigned char dek[32])
{
    unsigned char back[32];
    size_t back_len = sizeof(back);
    CK_RV rv = p11_unwrap(ctx, id, (const unsigned char *)"aad", 3, blob, 32 + P11_WRAP_OVERHEAD,
                          back, &back_len);

    ck_assert_msg(rv == CKR_OK, "p11_unwrap: %s", p11_rv_name(rv));
    ck_assert_uint_eq(back_len, 32);
    ck_assert_mem_eq(back, dek, 32);
}

static void gcm_params(CK_GCM_PARAMS *gp, unsigned char *iv)
{
    memset(gp, 0, sizeof(*gp));
    gp->pIv = iv;
    gp->ulIvLen = P11_GCM_IV_LEN;
    gp->ulIvBits = P11_GCM_IV_LEN * 8;
    gp->pAAD = (CK_BYTE_PTR) "aad";
    gp->ulAADLen = 3;
    gp->ulTagBits = P11_GCM_TAG_LEN * 8;
}

/* The copy: CKA_TOKEN false and otherwise as locked down as the KEK. */
START_TEST(test_copy_attributes)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], dek[32] = {1}, blob[32 + P11_WRAP_OVERHEAD], value[64];
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE tok, copy;
    CK_BBOOL token = CK_TRUE, priv, sens, asens, extr, nextr, copyable = CK_FALSE, modifiable,
             ccopyable;
    CK_MECHANISM_TYPE allowed[4];
    CK_RV rv;

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:copyattrs:v1", id), CKR_OK);
    s = tm_raw_session(ctx);
    ck_assert_uint_eq(count_copies(ctx, s, id), 0); /* made lazily */
    tok = tm_raw_find(ctx, s, id);
    {
        CK_ATTRIBUTE a = {CKA_COPYABLE, &copyable, sizeof(copyable)};
        ck_assert_uint_eq(fl->C_GetAttributeValue(s, tok, &a, 1), CKR_OK);
        ck_assert(copyable);
    }
    wrap_ok(ctx, id, dek, blob);
    ck_assert_uint_eq(count_copies(ctx, s, id), 1);
    wrap_ok(ctx, id, dek, blob); /* reused, not made again */
    unwrap_ok(ctx, id, blob, dek);
    ck_assert_uint_eq(count_copies(ctx, s, id), 1);
    copy = tm_raw_find_kind(ctx, s, id, CK_FALSE);
    ck_assert_uint_ne(copy, tok);
    {
        CK_ATTRIBUTE a[] = {
            {CKA_TOKEN, &token, sizeof(token)},
            {CKA_PRIVATE, &priv, sizeof(priv)},
            {CKA_SENSITIVE, &sens, sizeof(sens)},
            {CKA_ALWAYS_SENSITIVE, &asens, sizeof(asens)},
            {CKA_EXTRACTABLE, &extr, sizeof(extr)},
            {CKA_NEVER_EXTRACTABLE, &nextr, sizeof(nextr)},
            {CKA_MODIFIABLE, &modifiable, sizeof(modifiable)},
            {CKA_COPYABLE, &ccopyable, sizeof(ccopyable)},
            {CKA_ALLOWED_MECHANISMS, allowed, sizeof(allowed)},
        };
        rv = fl->C_GetAttributeValue(s, copy, a, sizeof(a) / sizeof(a[0]));
        ck_assert_msg(rv == CKR_OK, "C_GetAttributeValue: %s", p11_rv_name(rv));
        ck_assert(!token);
        ck_assert(priv && sens && asens && !extr && nextr && !modifiable);
        /* SoftHSM2 refuses CKA_COPYABLE false in a copy template; a copy of
         * the copy is as locked down as the copy (checked below). */
        fprintf(stderr, "KEK copy CKA_COPYABLE: %d\n", (int)ccopyable);
        ck_assert_uint_eq(a[8].ulValueLen, sizeof(CK_MECHANISM_TYPE));
        ck_assert_uint_eq(allowed[0], CKM_AES_GCM);
    }
    /* Its value never leaves the token either. */
    {
        CK_ATTRIBUTE a = {CKA_VALUE, value, sizeof(value)};
        rv = fl->C_GetAttributeValue(s, copy, &a, 1);
        ck_assert_msg(rv == CKR_ATTRIBUTE_SENSITIVE, "CKA_VALUE of the copy: %s", p11_rv_name(rv));
    }
    /* It cannot be made extractable or non-sensitive, neither in place nor
     * by copying it again. */
    {
        CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
        CK_ATTRIBUTE ext = {CKA_EXTRACTABLE, &yes, sizeof(yes)};
        CK_ATTRIBUTE nsens = {CKA_SENSITIVE, &no, sizeof(no)};
        CK_OBJECT_HANDLE again = CK_INVALID_HANDLE;

        ck_assert_uint_ne(fl->C_SetAttributeValue(s, copy, &ext, 1), CKR_OK);
        ck_assert_uint_ne(fl->C_SetAttributeValue(s, copy, &nsens, 1), CKR_OK);
        rv = fl->C_CopyObject(s, copy, &ext, 1, &again);
        ck_assert_msg(rv != CKR_OK, "a copy made extractable");
        rv = fl->C_CopyObject(s, copy, &nsens, 1, &again);
        ck_assert_msg(rv != CKR_OK, "a copy made non-sensitive");
        rv = fl->C_CopyObject(s, tok, &ext, 1, &again);
        ck_assert_msg(rv != CKR_OK, "the KEK copied extractable");
        rv = fl->C_CopyObject(s, tok, &nsens, 1, &again);
        ck_assert_msg(rv != CKR_OK, "the KEK copied non-sensitive");
    }
    /* The token object is modifiable (for the copy), but not where it
     * matters: its mechanism list, sensitivity and extractability hold. */
    {
        CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
        CK_MECHANISM_TYPE ecb_only[] = {CKM_AES_ECB};
        CK_ATTRIBUTE mech = {CKA_ALLOWED_MECHANISMS, ecb_only, sizeof(ecb_only)};
        CK_ATTRIBUTE ext = {CKA_EXTRACTABLE, &yes, sizeof(yes)};
        CK_ATTRIBUTE nsens = {CKA_SENSITIVE, &no, sizeof(no)};

        ck_assert_uint_ne(fl->C_SetAttributeValue(s, tok, &mech, 1), CKR_OK);
        ck_assert_uint_ne(fl->C_SetAttributeValue(s, tok, &ext, 1), CKR_OK);
        ck_assert_uint_ne(fl->C_SetAttributeValue(s, tok, &nsens, 1), CKR_OK);
        ck_assert_uint_ne(fl->C_SetAttributeValue(s, copy, &mech, 1), CKR_OK);
    }
    /* Only AES-GCM: ECB is refused. */
    {
        CK_MECHANISM ecb = {CKM_AES_ECB, NULL, 0};
        rv = fl->C_EncryptInit(s, &ecb, copy);
        ck_assert_msg(rv != CKR_OK, "AES-ECB accepted on the copy");
        fprintf(stderr, "AES-ECB on the KEK copy: %s\n", p11_rv_name(rv));
    }
    /* A p11_kek_list sees the KEK once, not its copy. */
    {
        unsigned char(*ids)[P11_KEK_ID_LEN] = NULL;
        size_t count = 0;
        ck_assert_uint_eq(p11_kek_list(ctx, "p11kms:copyattrs:", &ids, &count), CKR_OK);
        ck_assert_uint_eq(count, 1);
        free(ids);
    }
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

/* Blobs made under the copy open under the token object and the other
 * way round: one key, two handles. */
START_TEST(test_copy_and_token_object_interoperate)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], dek[32], blob[32 + P11_WRAP_OVERHEAD], out[64];
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE tok;
    CK_GCM_PARAMS gp;
    CK_MECHANISM m = {CKM_AES_GCM, &gp, sizeof(gp)};
    CK_ULONG out_len;

    for (size_t i = 0; i < sizeof(dek); i++)
        dek[i] = (unsigned char)(i * 7 + 1);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:interop:v1", id), CKR_OK);
    s = tm_raw_session(ctx);
    tok = tm_raw_find(ctx, s, id);

    /* Copy -> token object. */
    wrap_ok(ctx, id, dek, blob);
    ck_assert_uint_eq(count_copies(ctx, s, id), 1);
    gcm_params(&gp, blob);
    ck_assert_uint_eq(fl->C_DecryptInit(s, &m, tok), CKR_OK);
    out_len = sizeof(out);
    ck_assert_uint_eq(
        fl->C_Decrypt(s, blob + P11_GCM_IV_LEN, sizeof(blob) - P11_GCM_IV_LEN, out, &out_len),
        CKR_OK);
    ck_assert_uint_eq(out_len, 32);
    ck_assert_mem_eq(out, dek, 32);

    /* Token object -> copy. */
    memset(blob, 0, sizeof(blob));
    ck_assert_uint_eq(fl->C_GenerateRandom(s, blob, P11_GCM_IV_LEN), CKR_OK);
    gcm_params(&gp, blob);
    ck_assert_uint_eq(fl->C_EncryptInit(s, &m, tok), CKR_OK);
    out_len = sizeof(blob) - P11_GCM_IV_LEN;
    ck_assert_uint_eq(fl->C_Encrypt(s, dek, 32, blob + P11_GCM_IV_LEN, &out_len), CKR_OK);
    ck_assert_uint_eq(out_len, 32 + P11_GCM_TAG_LEN);
    unwrap_ok(ctx, id, blob, dek);

    /* And the layer really uses the copy: with the token object gone
     * behind its back, it keeps wrapping until the next check. */
    ck_assert_uint_eq(fl->C_DestroyObject(s, tok), CKR_OK);
    wrap_ok(ctx, id, dek, blob);
    usleep(1200 * 1000); /* past P11_COPY_RECHECK_MS */
    {
        size_t blob_len = sizeof(blob);
        ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, dek, 32, blob, &blob_len),
                          CKR_KEY_HANDLE_INVALID);
    }
    ck_assert_uint_eq(count_copies(ctx, s, id), 0);
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

/* Every session closed behind the layer's back (the copies with them):
 * recovery drops the cache and makes the copy again. */
START_TEST(test_copy_recovery_close_all)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], id2[P11_KEK_ID_LEN], dek[32] = {9};
    unsigned char blob[32 + P11_WRAP_OVERHEAD], blob2[32 + P11_WRAP_OVERHEAD];
    CK_SESSION_HANDLE s;

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:recover-copy:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:recover-copy:v2", id2), CKR_OK);
    wrap_ok(ctx, id, dek, blob);
    wrap_ok(ctx, id2, dek, blob2);
    for (int round = 0; round < 3; round++) {
        ck_assert_uint_eq(fl->C_CloseAllSessions(p11_slot_id(ctx)), CKR_OK);
        unwrap_ok(ctx, id, blob, dek);
        unwrap_ok(ctx, id2, blob2, dek);
        wrap_ok(ctx, id, dek, blob);
        wrap_ok(ctx, id2, dek, blob2);
    }
    s = tm_raw_session(ctx);
    ck_assert_uint_eq(count_copies(ctx, s, id), 1);
    ck_assert_uint_eq(count_copies(ctx, s, id2), 1);
    fl->C_CloseSession(s);
    /* The module finalised under us: re-initialisation, copies again. */
    ck_assert_uint_eq(fl->C_Finalize(NULL), CKR_OK);
    unwrap_ok(ctx, id, blob, dek);
    s = tm_raw_session(ctx);
    ck_assert_uint_eq(count_copies(ctx, s, id), 1);
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

/* Retiring a KEK destroys its copy too: nothing can wrap or unwrap with
 * it any more, not even through the copy's old handle. */
START_TEST(test_copy_destroyed_with_kek)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], other[P11_KEK_ID_LEN], dek[32] = {3};
    unsigned char blob[32 + P11_WRAP_OVERHEAD], oblob[32 + P11_WRAP_OVERHEAD];
    unsigned char iv[P11_GCM_IV_LEN] = {0};
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE copy;
    CK_GCM_PARAMS gp;
    CK_MECHANISM m = {CKM_AES_GCM, &gp, sizeof(gp)};
    size_t blob_len = sizeof(blob), back_len;
    unsigned char back[32];

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:retire-copy:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:retire-copy:v2", other), CKR_OK);
    wrap_ok(ctx, id, dek, blob);
    wrap_ok(ctx, other, dek, oblob);
    s = tm_raw_session(ctx);
    copy = tm_raw_find_kind(ctx, s, id, CK_FALSE);

    ck_assert_uint_eq(p11_kek_destroy(ctx, id), CKR_OK);
    ck_assert_uint_eq(count_copies(ctx, s, id), 0);
    gcm_params(&gp, iv);
    ck_assert_uint_ne(fl->C_EncryptInit(s, &m, copy), CKR_OK);
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, dek, 32, blob, &blob_len), CKR_KEY_HANDLE_INVALID);
    back_len = sizeof(back);
    ck_assert_uint_eq(
        p11_unwrap(ctx, id, (const unsigned char *)"aad", 3, blob, sizeof(blob), back, &back_len),
        CKR_KEY_HANDLE_INVALID);
    ck_assert_uint_eq(p11_kek_exists(ctx, id), CKR_KEY_HANDLE_INVALID);
    /* The other KEK and its copy are untouched. */
    ck_assert_uint_eq(count_copies(ctx, s, other), 1);
    unwrap_ok(ctx, other, oblob, dek);
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

/* A KEK made before KEKs were CKA_COPYABLE: C_CopyObject is refused and
 * the layer keeps using the token object. */
START_TEST(test_not_copyable_falls_back)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], dek[32] = {5}, blob[32 + P11_WRAP_OVERHEAD];
    CK_SESSION_HANDLE s;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG value_len = 32;
    CK_MECHANISM_TYPE allowed[] = {CKM_AES_GCM};
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_HANDLE h;
    CK_ATTRIBUTE t[] = {
        {CKA_CLASS, &cls, sizeof(cls)},
        {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_VALUE_LEN, &value_len, sizeof(value_len)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_ENCRYPT, &yes, sizeof(yes)},
        {CKA_DECRYPT, &yes, sizeof(yes)},
        {CKA_MODIFIABLE, &no, sizeof(no)},
        {CKA_COPYABLE, &no, sizeof(no)},
        {CKA_ALLOWED_MECHANISMS, allowed, sizeof(allowed)},
        {CKA_ID, id, sizeof(id)},
        {CKA_LABEL, "p11kms:legacy:v1", 16},
    };

    s = tm_raw_session(ctx);
    ck_assert_uint_eq(fl->C_GenerateRandom(s, id, sizeof(id)), CKR_OK);
    ck_assert_uint_eq(fl->C_GenerateKey(s, &gen, t, sizeof(t) / sizeof(t[0]), &h), CKR_OK);
    for (int i = 0; i < 3; i++) {
        wrap_ok(ctx, id, dek, blob);
        unwrap_ok(ctx, id, blob, dek);
    }
    ck_assert_uint_eq(count_copies(ctx, s, id), 0);
    ck_assert_uint_eq(p11_kek_destroy(ctx, id), CKR_OK);
    ck_assert_uint_eq(p11_kek_exists(ctx, id), CKR_KEY_HANDLE_INVALID);
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

/* Threads racing to make the first copy of the same KEKs: one copy each. */
struct racer {
    p11_ctx *ctx;
    unsigned char (*ids)[P11_KEK_ID_LEN];
    int errors;
};

static void *race(void *argp)
{
    struct racer *r = argp;
    unsigned char dek[32] = {7}, blob[32 + P11_WRAP_OVERHEAD], back[32];

    for (int i = 0; i < 200; i++) {
        const unsigned char *id = r->ids[i % 4];
        size_t blob_len = sizeof(blob), back_len = sizeof(back);

        if (p11_wrap(r->ctx, id, NULL, 0, dek, 32, blob, &blob_len) != CKR_OK ||
            p11_unwrap(r->ctx, id, NULL, 0, blob, blob_len, back, &back_len) != CKR_OK ||
            memcmp(back, dek, 32) != 0)
            r->errors++;
    }
    return NULL;
}

START_TEST(test_copy_threads)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char ids[4][P11_KEK_ID_LEN];
    pthread_t th[8];
    struct racer r[8];
    CK_SESSION_HANDLE s;
    char label[32];

    for (int i = 0; i < 4; i++) {
        snprintf(label, sizeof(label), "p11kms:race:v%d", i + 1);
        ck_assert_uint_eq(p11_kek_create(ctx, label, ids[i]), CKR_OK);
    }
    for (int i = 0; i < 8; i++) {
        r[i] = (struct racer){ctx, ids, 0};
        ck_assert_int_eq(pthread_create(&th[i], NULL, race, &r[i]), 0);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(th[i], NULL);
        ck_assert_int_eq(r[i].errors, 0);
    }
    s = tm_raw_session(ctx);
    for (int i = 0; i < 4; i++)
        ck_assert_uint_eq(count_copies(ctx, s, ids[i]), 1);
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

/* p11_generate_and_wrap: DEK and IV from one draw, the blob opens to the
 * DEK returned, two draws differ, bad arguments are refused. */
START_TEST(test_generate_and_wrap)
{
    p11_ctx *ctx = tm_open();
    unsigned char id[P11_KEK_ID_LEN], dek[32], dek2[32], back[32];
    unsigned char blob[32 + P11_WRAP_OVERHEAD], blob2[32 + P11_WRAP_OVERHEAD];
    size_t blob_len = sizeof(blob), blob2_len = sizeof(blob2), back_len = sizeof(back);
    const unsigned char aad[] = "aad";

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:genwrap:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_generate_and_wrap(ctx, id, aad, 3, 32, dek, blob, &blob_len), CKR_OK);
    ck_assert_uint_eq(blob_len, sizeof(blob));
    ck_assert_uint_eq(p11_generate_and_wrap(ctx, id, aad, 3, 32, dek2, blob2, &blob2_len), CKR_OK);
    ck_assert_mem_ne(dek, dek2, 32);
    ck_assert_mem_ne(blob, blob2, P11_GCM_IV_LEN);
    ck_assert_uint_eq(p11_unwrap(ctx, id, aad, 3, blob, blob_len, back, &back_len), CKR_OK);
    ck_assert_uint_eq(back_len, 32);
    ck_assert_mem_eq(back, dek, 32);
    back_len = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, id, NULL, 0, blob, blob_len, back, &back_len),
                      CKR_ENCRYPTED_DATA_INVALID);
    blob_len = sizeof(blob) - 1;
    ck_assert_uint_eq(p11_generate_and_wrap(ctx, id, aad, 3, 32, dek, blob, &blob_len),
                      CKR_BUFFER_TOO_SMALL);
    blob_len = sizeof(blob);
    ck_assert_uint_eq(p11_generate_and_wrap(ctx, id, aad, 3, 0, dek, blob, &blob_len),
                      CKR_ARGUMENTS_BAD);
    ck_assert_uint_eq(p11_generate_and_wrap(ctx, id, aad, 3, 65, dek, blob, &blob_len),
                      CKR_ARGUMENTS_BAD);
    ck_assert_uint_eq(p11_generate_and_wrap(ctx, id, NULL, 3, 32, dek, blob, &blob_len),
                      CKR_ARGUMENTS_BAD);
    ck_assert_uint_eq(p11_kek_destroy(ctx, id), CKR_OK);
    memset(dek, 0xaa, sizeof(dek));
    ck_assert_uint_eq(p11_generate_and_wrap(ctx, id, aad, 3, 32, dek, blob, &blob_len),
                      CKR_KEY_HANDLE_INVALID);
    for (size_t i = 0; i < sizeof(dek); i++) /* wiped on failure */
        ck_assert_uint_eq(dek[i], 0);
    p11_close(ctx);
}
END_TEST

static Suite *copy_suite(void)
{
    Suite *s = suite_create("module_session_copy");
    TCase *tc = tcase_create("copy");

    tcase_add_unchecked_fixture(tc, setup_token, tm_token_teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_copy_attributes);
    tcase_add_test(tc, test_copy_and_token_object_interoperate);
    tcase_add_test(tc, test_copy_recovery_close_all);
    tcase_add_test(tc, test_copy_destroyed_with_kek);
    tcase_add_test(tc, test_not_copyable_falls_back);
    tcase_add_test(tc, test_copy_threads);
    tcase_add_test(tc, test_generate_and_wrap);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(copy_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
