/*
 * tests/test_module_token.c - the token layer against a real SoftHSM2
 * token: KEK attributes, wrap/unwrap, authentication failures, the handle
 * cache, concurrency and recovery from sessions and a module lost behind
 * the pool's back.
 */
#include "test_module_support.h"

#include <pthread.h>
#include <sys/wait.h>

#include <p11-kit/p11-kit.h>

static void setup_token(void)
{
    tm_token_setup_label("p11kms-module-test");
}

/* ---- KEK objects --------------------------------------------------------- */

START_TEST(test_kek_attributes)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], id_back[P11_KEK_ID_LEN], value[64];
    CK_SESSION_HANDLE s;
    CK_OBJECT_HANDLE h;
    CK_BBOOL token, priv, sens, asens, extr, nextr, enc, dec, sign, verify, wrap, unwrap, derive,
        modifiable;
    CK_ULONG value_len = 0;
    CK_KEY_TYPE kt = 0;
    CK_OBJECT_CLASS cls = 0;
    CK_MECHANISM_TYPE allowed[4];
    char label[64] = {0};
    CK_RV rv;

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:attrs:v1", id), CKR_OK);
    s = tm_raw_session(ctx);
    h = tm_raw_find(ctx, s, id);
    {
        CK_ATTRIBUTE a[] = {
            {CKA_TOKEN, &token, sizeof(token)},
            {CKA_PRIVATE, &priv, sizeof(priv)},
            {CKA_SENSITIVE, &sens, sizeof(sens)},
            {CKA_ALWAYS_SENSITIVE, &asens, sizeof(asens)},
            {CKA_EXTRACTABLE, &extr, sizeof(extr)},
            {CKA_NEVER_EXTRACTABLE, &nextr, sizeof(nextr)},
            {CKA_ENCRYPT, &enc, sizeof(enc)},
            {CKA_DECRYPT, &dec, sizeof(dec)},
            {CKA_SIGN, &sign, sizeof(sign)},
            {CKA_VERIFY, &verify, sizeof(verify)},
            {CKA_WRAP, &wrap, sizeof(wrap)},
            {CKA_UNWRAP, &unwrap, sizeof(unwrap)},
            {CKA_DERIVE, &derive, sizeof(derive)},
            {CKA_MODIFIABLE, &modifiable, sizeof(modifiable)},
            {CKA_VALUE_LEN, &value_len, sizeof(value_len)},
            {CKA_KEY_TYPE, &kt, sizeof(kt)},
            {CKA_CLASS, &cls, sizeof(cls)},
            {CKA_ID, id_back, sizeof(id_back)},
            {CKA_LABEL, label, sizeof(label) - 1},
            {CKA_ALLOWED_MECHANISMS, allowed, sizeof(allowed)},
        };
        rv = fl->C_GetAttributeValue(s, h, a, sizeof(a) / sizeof(a[0]));
        ck_assert_msg(rv == CKR_OK, "C_GetAttributeValue: %s", p11_rv_name(rv));
        ck_assert(token && priv && sens && asens && !extr && nextr);
        ck_assert(enc && dec && !sign && !verify && !wrap && !unwrap && !derive);
        ck_assert(modifiable); /* for C_CopyObject (kek.c); see test_module_session_copy */
        ck_assert_uint_eq(value_len, 32);
        ck_assert_uint_eq(kt, CKK_AES);
        ck_assert_uint_eq(cls, CKO_SECRET_KEY);
        ck_assert_mem_eq(id_back, id, P11_KEK_ID_LEN);
        ck_assert_str_eq(label, "p11kms:attrs:v1");
        ck_assert_uint_eq(a[19].ulValueLen, sizeof(CK_MECHANISM_TYPE));
        ck_assert_uint_eq(allowed[0], CKM_AES_GCM);
    }
    /* The key value never leaves the token. */
    {
        CK_ATTRIBUTE a = {CKA_VALUE, value, sizeof(value)};
        rv = fl->C_GetAttributeValue(s, h, &a, 1);
        ck_assert_msg(rv == CKR_ATTRIBUTE_SENSITIVE, "CKA_VALUE: %s", p11_rv_name(rv));
    }
    /* Nor can it be made extractable. */
    {
        CK_BBOOL yes = CK_TRUE;
        CK_ATTRIBUTE a = {CKA_EXTRACTABLE, &yes, sizeof(yes)};
        rv = fl->C_SetAttributeValue(s, h, &a, 1);
        ck_assert_msg(rv != CKR_OK, "CKA_EXTRACTABLE could be set");
    }
    /* Only AES-GCM: ECB and CTR are refused. */
    {
        CK_MECHANISM ecb = {CKM_AES_ECB, NULL, 0};
        rv = fl->C_EncryptInit(s, &ecb, h);
        ck_assert_msg(rv != CKR_OK, "AES-ECB accepted");
        fprintf(stderr, "AES-ECB on the KEK: %s\n", p11_rv_name(rv));
    }
    {
        CK_AES_CTR_PARAMS ctr;
        CK_MECHANISM m = {CKM_AES_CTR, &ctr, sizeof(ctr)};
        memset(&ctr, 0, sizeof(ctr));
        ctr.ulCounterBits = 32;
        rv = fl->C_EncryptInit(s, &m, h);
        ck_assert_msg(rv != CKR_OK, "AES-CTR accepted");
        fprintf(stderr, "AES-CTR on the KEK: %s\n", p11_rv_name(rv));
    }
    {
        CK_MECHANISM m = {CKM_AES_CBC_PAD, value, 16};
        rv = fl->C_EncryptInit(s, &m, h);
        ck_assert_msg(rv != CKR_OK, "AES-CBC-PAD accepted");
    }
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

START_TEST(test_kek_exists_destroy)
{
    p11_ctx *ctx = tm_open();
    unsigned char id[P11_KEK_ID_LEN], other[P11_KEK_ID_LEN];
    unsigned char blob[64];
    size_t blob_len = sizeof(blob);
    const unsigned char pt[32] = {1};

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:destroy:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:destroy:v2", other), CKR_OK);
    ck_assert_mem_ne(id, other, P11_KEK_ID_LEN);
    ck_assert_uint_eq(p11_kek_exists(ctx, id), CKR_OK);
    /* Fill the cache, then destroy: the cached handle must go too. */
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, pt, sizeof(pt), blob, &blob_len), CKR_OK);
    ck_assert_uint_eq(p11_kek_destroy(ctx, id), CKR_OK);
    ck_assert_uint_eq(p11_kek_exists(ctx, id), CKR_KEY_HANDLE_INVALID);
    ck_assert_uint_eq(p11_kek_destroy(ctx, id), CKR_KEY_HANDLE_INVALID);
    blob_len = sizeof(blob);
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, pt, sizeof(pt), blob, &blob_len),
                      CKR_KEY_HANDLE_INVALID);
    ck_assert_uint_eq(p11_kek_exists(ctx, other), CKR_OK);
    p11_close(ctx);
}
END_TEST

/* A KEK destroyed behind our back (another node): the wraps use its
 * session-object copy, whose token object is checked again at most 1 s
 * (P11_COPY_RECHECK_MS) after the last check; then the cached handle is
 * stale, the wrap notices, drops the cache (and the copies) and reports
 * the key gone. */
START_TEST(test_kek_destroyed_behind_back)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], id2[P11_KEK_ID_LEN], blob[64];
    size_t blob_len = sizeof(blob);
    const unsigned char pt[32] = {2};
    CK_SESSION_HANDLE s;

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:behind:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:behind:v2", id2), CKR_OK);
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, pt, sizeof(pt), blob, &blob_len), CKR_OK);
    s = tm_raw_session(ctx);
    ck_assert_uint_eq(fl->C_DestroyObject(s, tm_raw_find(ctx, s, id)), CKR_OK);
    fl->C_CloseSession(s);
    usleep(1200 * 1000); /* past P11_COPY_RECHECK_MS */
    blob_len = sizeof(blob);
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, pt, sizeof(pt), blob, &blob_len),
                      CKR_KEY_HANDLE_INVALID);
    /* The other KEK still works after the cache was dropped. */
    blob_len = sizeof(blob);
    ck_assert_uint_eq(p11_wrap(ctx, id2, NULL, 0, pt, sizeof(pt), blob, &blob_len), CKR_OK);
    p11_close(ctx);
}
END_TEST

START_TEST(test_kek_list)
{
    p11_ctx *ctx = tm_open();
    unsigned char a[P11_KEK_ID_LEN], b[P11_KEK_ID_LEN], c[P11_KEK_ID_LEN];
    unsigned char(*ids)[P11_KEK_ID_LEN] = NULL;
    size_t count = 0;
    int seen_a = 0, seen_b = 0;

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:list:alpha:v1", a), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:list:beta:v1", b), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "other:list:v1", c), CKR_OK);
    ck_assert_uint_eq(p11_kek_list(ctx, "p11kms:list:", &ids, &count), CKR_OK);
    ck_assert_uint_eq(count, 2);
    for (size_t i = 0; i < count; i++) {
        seen_a |= memcmp(ids[i], a, P11_KEK_ID_LEN) == 0;
        seen_b |= memcmp(ids[i], b, P11_KEK_ID_LEN) == 0;
        ck_assert_mem_ne(ids[i], c, P11_KEK_ID_LEN);
    }
    ck_assert(seen_a && seen_b);
    free(ids);
    ids = NULL;
    ck_assert_uint_eq(p11_kek_list(ctx, "nothing-has-this-prefix", &ids, &count), CKR_OK);
    ck_assert_uint_eq(count, 0);
    free(ids);
    ck_assert_uint_eq(p11_kek_list(ctx, "", &ids, &count), CKR_OK);
    ck_assert_uint_ge(count, 3);
    free(ids);
    p11_close(ctx);
}
END_TEST

/* Third-party view: OpenSC's pkcs11-tool sees the KEK, sensitive and never
 * extractable. */
START_TEST(test_kek_pkcs11_tool)
{
    p11_ctx *ctx;
    unsigned char id[P11_KEK_ID_LEN];
    char cmd[1024], line[512], block[8192] = {0};
    FILE *p;
    const char *found;

    if (system("command -v pkcs11-tool >/dev/null 2>&1") != 0) {
        fprintf(stderr, "pkcs11-tool not installed: test skipped\n");
        return;
    }
    ctx = tm_open();
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:tool-check:v1", id), CKR_OK);
    p11_close(ctx);

    snprintf(cmd, sizeof(cmd),
             "pkcs11-tool --module '%s' --token-label '%s' --login --pin %s "
             "--list-objects --type secrkey 2>&1",
             tm_token.module, tm_token.label, TT_PIN);
    p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    while (fgets(line, sizeof(line), p) != NULL)
        if (strlen(block) + strlen(line) < sizeof(block))
            strcat(block, line);
    ck_assert_int_eq(pclose(p), 0);
    fprintf(stderr, "pkcs11-tool says:\n%s", block);
    found = strstr(block, "p11kms:tool-check:v1");
    ck_assert_msg(found != NULL, "label not listed");
    /* The object's own block: from its label to the next object. */
    {
        char *end = strstr(found, "Secret Key Object");
        if (end != NULL)
            *end = '\0';
    }
    ck_assert_ptr_nonnull(strstr(found, "sensitive"));
    ck_assert_ptr_nonnull(strstr(found, "never extractable"));
    {
        char *usage = strstr(found, "Usage:");
        ck_assert_ptr_nonnull(usage);
        *strchr(usage, '\n') = '\0';
        ck_assert_ptr_nonnull(strstr(usage, "encrypt, decrypt"));
        ck_assert_ptr_null(strstr(usage, "sign"));
        ck_assert_ptr_null(strstr(usage, "wrap"));
        ck_assert_ptr_null(strstr(usage, "derive"));
    }
}
END_TEST

/* ---- wrap / unwrap ------------------------------------------------------- */

START_TEST(test_wrap_roundtrip)
{
    p11_ctx *ctx = tm_open();
    unsigned char id[P11_KEK_ID_LEN], dek[32], blob[32 + P11_WRAP_OVERHEAD], back[32];
    unsigned char blob2[sizeof(blob)];
    const unsigned char aad[] = "v1|customers|1|dek-id|{\"customer\":\"42\"}";
    size_t blob_len = sizeof(blob), blob2_len = sizeof(blob2), back_len = sizeof(back);

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:rt:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_random(ctx, dek, sizeof(dek)), CKR_OK);
    ck_assert_uint_eq(p11_wrap(ctx, id, aad, sizeof(aad) - 1, dek, sizeof(dek), blob, &blob_len),
                      CKR_OK);
    ck_assert_uint_eq(blob_len, sizeof(dek) + P11_WRAP_OVERHEAD);
    ck_assert_mem_ne(blob + P11_GCM_IV_LEN, dek, sizeof(dek));
    ck_assert_uint_eq(p11_unwrap(ctx, id, aad, sizeof(aad) - 1, blob, blob_len, back, &back_len),
                      CKR_OK);
    ck_assert_uint_eq(back_len, sizeof(dek));
    ck_assert_mem_eq(back, dek, sizeof(dek));
    /* A second wrap of the same DEK uses a fresh IV. */
    ck_assert_uint_eq(p11_wrap(ctx, id, aad, sizeof(aad) - 1, dek, sizeof(dek), blob2, &blob2_len),
                      CKR_OK);
    ck_assert_mem_ne(blob, blob2, P11_GCM_IV_LEN);
    /* No AAD at all works too. */
    blob_len = sizeof(blob);
    back_len = sizeof(back);
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, dek, sizeof(dek), blob, &blob_len), CKR_OK);
    ck_assert_uint_eq(p11_unwrap(ctx, id, NULL, 0, blob, blob_len, back, &back_len), CKR_OK);
    ck_assert_mem_eq(back, dek, sizeof(dek));
    /* Buffers too small are refused before the token is asked. */
    blob_len = sizeof(blob) - 1;
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, dek, sizeof(dek), blob, &blob_len),
                      CKR_BUFFER_TOO_SMALL);
    back_len = sizeof(back) - 1;
    ck_assert_uint_eq(p11_unwrap(ctx, id, NULL, 0, blob, sizeof(blob), back, &back_len),
                      CKR_BUFFER_TOO_SMALL);
    p11_close(ctx);
}
END_TEST

START_TEST(test_unwrap_auth_failures)
{
    p11_ctx *ctx = tm_open();
    unsigned char id[P11_KEK_ID_LEN], other[P11_KEK_ID_LEN];
    unsigned char dek[32], blob[32 + P11_WRAP_OVERHEAD], bad[sizeof(blob)], back[32];
    const unsigned char aad[] = "context-a", aad2[] = "context-b";
    size_t blob_len = sizeof(blob), back_len;
    unsigned char zero[32] = {0};

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:auth:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:auth:v2", other), CKR_OK);
    ck_assert_uint_eq(p11_random(ctx, dek, sizeof(dek)), CKR_OK);
    ck_assert_uint_eq(p11_wrap(ctx, id, aad, 9, dek, sizeof(dek), blob, &blob_len), CKR_OK);

    /* Wrong AAD. */
    memset(back, 0xAA, sizeof(back));
    back_len = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, id, aad2, 9, blob, blob_len, back, &back_len),
                      CKR_ENCRYPTED_DATA_INVALID);
    ck_assert_mem_eq(back, zero, sizeof(back)); /* wiped */
    /* Missing AAD. */
    back_len = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, id, NULL, 0, blob, blob_len, back, &back_len),
                      CKR_ENCRYPTED_DATA_INVALID);
    /* Every byte flipped in turn: IV, ciphertext, tag. */
    for (size_t i = 0; i < blob_len; i++) {
        memcpy(bad, blob, blob_len);
        bad[i] ^= 0x01;
        back_len = sizeof(back);
        ck_assert_msg(p11_unwrap(ctx, id, aad, 9, bad, blob_len, back, &back_len) ==
                          CKR_ENCRYPTED_DATA_INVALID,
                      "flipped byte %zu not detected", i);
    }
    /* Truncated blobs. */
    back_len = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, id, aad, 9, blob, blob_len - 1, back, &back_len),
                      CKR_ENCRYPTED_DATA_INVALID);
    back_len = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, id, aad, 9, blob, P11_WRAP_OVERHEAD - 1, back, &back_len),
                      CKR_ENCRYPTED_DATA_INVALID);
    /* Wrong KEK. */
    back_len = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, other, aad, 9, blob, blob_len, back, &back_len),
                      CKR_ENCRYPTED_DATA_INVALID);
    /* And the session pool is still healthy afterwards. */
    back_len = sizeof(back);
    ck_assert_uint_eq(p11_unwrap(ctx, id, aad, 9, blob, blob_len, back, &back_len), CKR_OK);
    ck_assert_mem_eq(back, dek, sizeof(dek));
    p11_close(ctx);
}
END_TEST

/* What SoftHSM2 itself says for a bad GCM tag (documented in wrap.c). */
START_TEST(test_softhsm_bad_tag_rv)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], dek[32] = {3}, blob[32 + P11_WRAP_OVERHEAD], out[64];
    size_t blob_len = sizeof(blob);
    CK_ULONG out_len = sizeof(out);
    CK_SESSION_HANDLE s;
    CK_GCM_PARAMS gp;
    CK_MECHANISM m = {CKM_AES_GCM, &gp, sizeof(gp)};
    CK_RV rv;

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:badtag:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, dek, sizeof(dek), blob, &blob_len), CKR_OK);
    blob[blob_len - 1] ^= 0x80;
    s = tm_raw_session(ctx);
    memset(&gp, 0, sizeof(gp));
    gp.pIv = blob;
    gp.ulIvLen = P11_GCM_IV_LEN;
    gp.ulIvBits = 96;
    gp.ulTagBits = 128;
    ck_assert_uint_eq(fl->C_DecryptInit(s, &m, tm_raw_find(ctx, s, id)), CKR_OK);
    rv = fl->C_Decrypt(s, blob + P11_GCM_IV_LEN, blob_len - P11_GCM_IV_LEN, out, &out_len);
    fprintf(stderr, "SoftHSM2 C_Decrypt with a bad GCM tag: %s (0x%lx)\n", p11_rv_name(rv),
            (unsigned long)rv);
    ck_assert_uint_eq(rv, CKR_GENERAL_ERROR); /* as of SoftHSM2 2.6.1 */
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

/* ---- concurrency ------------------------------------------------------------ */

struct worker {
    p11_ctx *ctx;
    const unsigned char *id;
    int n;
    int errors;
};

static void *wrap_worker(void *argp)
{
    struct worker *w = argp;
    unsigned char dek[32], blob[32 + P11_WRAP_OVERHEAD], back[32];
    unsigned char aad[16];

    for (int i = 0; i < w->n; i++) {
        size_t blob_len = sizeof(blob), back_len = sizeof(back);

        memset(dek, i & 0xff, sizeof(dek));
        memcpy(aad, &i, sizeof(i));
        memcpy(aad + sizeof(i), &w, sizeof(w));
        if (p11_wrap(w->ctx, w->id, aad, sizeof(aad), dek, sizeof(dek), blob, &blob_len) !=
            CKR_OK) {
            w->errors++;
            continue;
        }
        if (i % 10 == 0 && (p11_unwrap(w->ctx, w->id, aad, sizeof(aad), blob, blob_len, back,
                                       &back_len) != CKR_OK ||
                            memcmp(back, dek, sizeof(dek)) != 0))
            w->errors++;
    }
    return NULL;
}

static void run_threads_on(p11_ctx *ctx, int per_thread)
{
    unsigned char id[P11_KEK_ID_LEN];
    pthread_t th[8];
    struct worker w[8];

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:threads:v1", id), CKR_OK);
    for (int i = 0; i < 8; i++) {
        w[i] = (struct worker){ctx, id, per_thread, 0};
        ck_assert_int_eq(pthread_create(&th[i], NULL, wrap_worker, &w[i]), 0);
    }
    for (int i = 0; i < 8; i++) {
        pthread_join(th[i], NULL);
        ck_assert_int_eq(w[i].errors, 0);
    }
}

static void run_threads(size_t max_sessions, int per_thread)
{
    p11_ctx *ctx = tm_open_sessions(max_sessions);

    run_threads_on(ctx, per_thread);
    p11_close(ctx);
}

START_TEST(test_threads_8x1000)
{
    run_threads(0, 1000);
}
END_TEST

/* More threads than sessions: callers wait for a free session. */
START_TEST(test_threads_small_pool)
{
    run_threads(2, 200);
}
END_TEST

/* ---- recovery ----------------------------------------------------------------- */

START_TEST(test_recover_sessions_closed)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], dek[32] = {4}, blob[32 + P11_WRAP_OVERHEAD], back[32];
    size_t blob_len = sizeof(blob), back_len = sizeof(back);

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:recover:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, dek, sizeof(dek), blob, &blob_len), CKR_OK);
    /* Behind the pool's back: every session gone, and with the last one
     * the login state. */
    ck_assert_uint_eq(fl->C_CloseAllSessions(p11_slot_id(ctx)), CKR_OK);
    blob_len = sizeof(blob);
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, dek, sizeof(dek), blob, &blob_len), CKR_OK);
    ck_assert_uint_eq(p11_unwrap(ctx, id, NULL, 0, blob, blob_len, back, &back_len), CKR_OK);
    ck_assert_mem_eq(back, dek, sizeof(dek));
    /* Again, with several sessions pooled, and threads hitting it. */
    run_threads_on(ctx, 20);
    ck_assert_uint_eq(fl->C_CloseAllSessions(p11_slot_id(ctx)), CKR_OK);
    run_threads_on(ctx, 20);
    ck_assert_uint_eq(fl->C_CloseAllSessions(p11_slot_id(ctx)), CKR_OK);
    ck_assert_uint_eq(p11_probe(ctx), CKR_OK);
    ck_assert_uint_eq(p11_kek_exists(ctx, id), CKR_OK);
    p11_close(ctx);
}
END_TEST

START_TEST(test_recover_module_finalized)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], dek[32] = {5}, blob[32 + P11_WRAP_OVERHEAD], back[32];
    size_t blob_len = sizeof(blob), back_len = sizeof(back);
    char label[33];

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:finalized:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, dek, sizeof(dek), blob, &blob_len), CKR_OK);
    /* Someone finalises the module under us: every call now says
     * CKR_CRYPTOKI_NOT_INITIALIZED until the layer re-initialises. */
    ck_assert_uint_eq(fl->C_Finalize(NULL), CKR_OK);
    ck_assert_uint_eq(p11_unwrap(ctx, id, NULL, 0, blob, blob_len, back, &back_len), CKR_OK);
    ck_assert_mem_eq(back, dek, sizeof(dek));
    ck_assert_uint_eq(fl->C_Finalize(NULL), CKR_OK);
    ck_assert_uint_eq(p11_probe(ctx), CKR_OK);
    ck_assert_uint_eq(p11_token_label(ctx, label), CKR_OK);
    ck_assert_str_eq(label, tm_token.label);
    p11_close(ctx);
}
END_TEST

/* p11_refresh (a key the store knows was not found): it re-initialises the
 * module, which then works as before, and at most once per period. */
START_TEST(test_refresh_rate_limited)
{
    p11_ctx *ctx = tm_open();
    unsigned char id[P11_KEK_ID_LEN], dek[32] = {7}, blob[32 + P11_WRAP_OVERHEAD], back[32];
    size_t blob_len = sizeof(blob), back_len = sizeof(back);

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:refresh:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, dek, sizeof(dek), blob, &blob_len), CKR_OK);
    ck_assert_uint_eq(p11_refresh(ctx), CKR_OK);
    ck_assert_uint_eq(p11_refresh(ctx), CKR_FUNCTION_REJECTED); /* not twice in 10 s */
    ck_assert_uint_eq(p11_unwrap(ctx, id, NULL, 0, blob, blob_len, back, &back_len), CKR_OK);
    ck_assert_mem_eq(back, dek, sizeof(dek));
    p11_close(ctx);
}
END_TEST

/* ---- login ---------------------------------------------------------------------- */

START_TEST(test_wrong_pin)
{
    p11_config cfg = {tm_token.module, tm_token.uri, "0000", 0};
    p11_ctx *ctx = NULL;
    char path[512];
    int saved = tm_capture_stderr(path, sizeof(path));
    CK_RV rv = p11_open(&cfg, &ctx);
    int logins = tm_release_stderr(saved, path, "C_Login: CKR_PIN_INCORRECT");

    ck_assert_msg(rv == CKR_PIN_INCORRECT, "p11_open: %s", p11_rv_name(rv));
    ck_assert_ptr_null(ctx);
    ck_assert_int_eq(logins, 1); /* one attempt, never retried */
    ck_assert(p11_rv_is_token_failure(rv));
    /* The right PIN still works (the token was not locked). */
    ctx = tm_open();
    p11_close(ctx);
}
END_TEST

/* The PIN changes under a running service: the fresh login after the
 * sessions were lost is refused, and that refusal is sticky. */
START_TEST(test_login_refusal_sticky)
{
    p11_ctx *ctx = tm_open();
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    unsigned char id[P11_KEK_ID_LEN], dek[32] = {6}, blob[32 + P11_WRAP_OVERHEAD];
    size_t blob_len = sizeof(blob);
    CK_SESSION_HANDLE s;
    char path[512];
    int saved, logins;

    ck_assert_uint_eq(p11_kek_create(ctx, "p11kms:sticky:v1", id), CKR_OK);
    s = tm_raw_session(ctx);
    ck_assert_uint_eq(
        fl->C_SetPIN(s, (CK_UTF8CHAR_PTR)TT_PIN, strlen(TT_PIN), (CK_UTF8CHAR_PTR) "4321", 4),
        CKR_OK);
    ck_assert_uint_eq(fl->C_CloseAllSessions(p11_slot_id(ctx)), CKR_OK);

    saved = tm_capture_stderr(path, sizeof(path));
    for (int i = 0; i < 3; i++) {
        blob_len = sizeof(blob);
        ck_assert_uint_eq(p11_wrap(ctx, id, NULL, 0, dek, sizeof(dek), blob, &blob_len),
                          CKR_PIN_INCORRECT);
    }
    ck_assert_uint_eq(p11_probe(ctx), CKR_PIN_INCORRECT);
    logins = tm_release_stderr(saved, path, "C_Login:");
    ck_assert_int_eq(logins, 1);
    p11_close(ctx);
}
END_TEST

/* ---- the rest ----------------------------------------------------------------- */

START_TEST(test_label_probe_random)
{
    p11_ctx *ctx = tm_open();
    char label[33];
    unsigned char a[32] = {0}, b[32] = {0};

    ck_assert_uint_eq(p11_token_label(ctx, label), CKR_OK);
    ck_assert_str_eq(label, tm_token.label);
    ck_assert_uint_eq(p11_probe(ctx), CKR_OK);
    ck_assert_uint_eq(p11_random(ctx, a, sizeof(a)), CKR_OK);
    ck_assert_uint_eq(p11_random(ctx, b, sizeof(b)), CKR_OK);
    ck_assert_mem_ne(a, b, sizeof(a));
    ck_assert_uint_eq(p11_random(ctx, NULL, 0), CKR_OK);
    p11_close(ctx);
    p11_close(NULL);
}
END_TEST

START_TEST(test_module_by_p11kit_name)
{
    p11_config cfg = {"softhsm2", tm_token.uri, TT_PIN, 0};
    p11_ctx *ctx = NULL;
    char label[33];

    if (access("/usr/share/p11-kit/modules/softhsm2.module", R_OK) != 0) {
        fprintf(stderr, "no registered softhsm2 p11-kit module: test skipped\n");
        return;
    }
    ck_assert_uint_eq(p11_open(&cfg, &ctx), CKR_OK);
    ck_assert_uint_eq(p11_token_label(ctx, label), CKR_OK);
    ck_assert_str_eq(label, tm_token.label);
    p11_close(ctx);
}
END_TEST

START_TEST(test_open_errors)
{
    p11_config cfg = {tm_token.module, "pkcs11:token=no-such-token", TT_PIN, 0};
    p11_ctx *ctx = NULL;

    ck_assert_uint_eq(p11_open(&cfg, &ctx), CKR_TOKEN_NOT_PRESENT);
    cfg.uri = "https://example.com/";
    ck_assert_uint_eq(p11_open(&cfg, &ctx), CKR_ARGUMENTS_BAD);
    cfg.uri = tm_token.uri;
    cfg.module = "/nonexistent/libnothing.so";
    ck_assert_uint_eq(p11_open(&cfg, &ctx), CKR_LIBRARY_LOAD_FAILED);
    cfg.module = tm_token.module;
    cfg.pin = "";
    ck_assert_uint_ne(p11_open(&cfg, &ctx), CKR_OK);
    ck_assert_uint_eq(p11_open(NULL, &ctx), CKR_ARGUMENTS_BAD);
    ck_assert_ptr_null(ctx);
}
END_TEST

START_TEST(test_rv_names)
{
    ck_assert_str_eq(p11_rv_name(CKR_OK), "CKR_OK");
    ck_assert_str_eq(p11_rv_name(CKR_DEVICE_ERROR), "CKR_DEVICE_ERROR");
    ck_assert_str_eq(p11_rv_name(CKR_PIN_INCORRECT), "CKR_PIN_INCORRECT");
    ck_assert_str_eq(p11_rv_name(CKR_ENCRYPTED_DATA_INVALID), "CKR_ENCRYPTED_DATA_INVALID");
    ck_assert_str_eq(p11_rv_name(CKR_FUNCTION_REJECTED), "CKR_FUNCTION_REJECTED");
    ck_assert_str_eq(p11_rv_name(0x35), "CKR_AEAD_DECRYPT_FAILED");
    ck_assert_str_eq(p11_rv_name(0x4242), "CKR_UNKNOWN");
    ck_assert_str_eq(p11_rv_name(CKR_VENDOR_DEFINED | 7), "CKR_VENDOR_DEFINED");
    ck_assert(p11_rv_is_token_failure(CKR_DEVICE_REMOVED));
    ck_assert(p11_rv_is_token_failure(CKR_TOKEN_NOT_PRESENT));
    ck_assert(p11_rv_is_token_failure(CKR_SESSION_HANDLE_INVALID));
    ck_assert(!p11_rv_is_token_failure(CKR_OK));
    ck_assert(!p11_rv_is_token_failure(CKR_ENCRYPTED_DATA_INVALID));
    ck_assert(!p11_rv_is_token_failure(CKR_KEY_HANDLE_INVALID));
    ck_assert(!p11_rv_is_token_failure(CKR_ARGUMENTS_BAD));
}
END_TEST

static Suite *module_suite(void)
{
    Suite *s = suite_create("module");
    TCase *tc = tcase_create("token");
    TCase *tl = tcase_create("login");
    TCase *tu = tcase_create("pure");

    tcase_add_unchecked_fixture(tc, setup_token, tm_token_teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_kek_attributes);
    tcase_add_test(tc, test_kek_exists_destroy);
    tcase_add_test(tc, test_kek_destroyed_behind_back);
    tcase_add_test(tc, test_kek_list);
    tcase_add_test(tc, test_kek_pkcs11_tool);
    tcase_add_test(tc, test_wrap_roundtrip);
    tcase_add_test(tc, test_unwrap_auth_failures);
    tcase_add_test(tc, test_softhsm_bad_tag_rv);
    tcase_add_test(tc, test_threads_8x1000);
    tcase_add_test(tc, test_threads_small_pool);
    tcase_add_test(tc, test_recover_sessions_closed);
    tcase_add_test(tc, test_recover_module_finalized);
    tcase_add_test(tc, test_refresh_rate_limited);
    tcase_add_test(tc, test_wrong_pin);
    tcase_add_test(tc, test_label_probe_random);
    tcase_add_test(tc, test_module_by_p11kit_name);
    tcase_add_test(tc, test_open_errors);
    suite_add_tcase(s, tc);

    /* Changes the token's PIN: a token of its own. */
    tcase_add_unchecked_fixture(tl, setup_token, tm_token_teardown);
    tcase_set_timeout(tl, 120);
    tcase_add_test(tl, test_login_refusal_sticky);
    suite_add_tcase(s, tl);

    tcase_add_test(tu, test_rv_names);
    suite_add_tcase(s, tu);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(module_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
