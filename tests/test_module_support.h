/*
 * tests/test_module_support.h - helpers shared by the test_module_* tests
 * (header only: every test program is one .c file).
 *
 * A token per test case, made in an unchecked fixture (in the parent, before
 * check forks the tests), and a context opened on it inside each test.
 */
#ifndef P11KMS_TEST_MODULE_SUPPORT_H
#define P11KMS_TEST_MODULE_SUPPORT_H

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <check.h>

#include "module/p11.h"
#include "support/testtoken.h"

static tt_token tm_token;

static inline void tm_token_setup_label(const char *label)
{
    if (tt_token_new(label, &tm_token) != 0) {
        fprintf(stderr, "cannot make a SoftHSM2 token\n");
        exit(1);
    }
}

static inline void tm_token_teardown(void)
{
    tt_token_remove(&tm_token);
}

static inline p11_ctx *tm_open_sessions(size_t max_sessions)
{
    p11_config cfg = {tm_token.module, tm_token.uri, TT_PIN, max_sessions};
    p11_ctx *ctx = NULL;
    CK_RV rv = p11_open(&cfg, &ctx);

    ck_assert_msg(rv == CKR_OK, "p11_open: %s", p11_rv_name(rv));
    ck_assert_ptr_nonnull(ctx);
    return ctx;
}

static inline p11_ctx *tm_open(void)
{
    return tm_open_sessions(0);
}

/* A session of our own on the context's token (logged in, since PKCS#11
 * login state is per application). */
static inline CK_SESSION_HANDLE tm_raw_session(p11_ctx *ctx)
{
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    CK_RV rv =
        fl->C_OpenSession(p11_slot_id(ctx), CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s);

    ck_assert_msg(rv == CKR_OK, "C_OpenSession: %s", p11_rv_name(rv));
    return s;
}

/* The object handle of the secret key with this CKA_ID and CKA_TOKEN,
 * looked up raw (a KEK's session-object copy shares its CKA_ID). */
static inline CK_OBJECT_HANDLE tm_raw_find_kind(p11_ctx *ctx, CK_SESSION_HANDLE s,
                                                const unsigned char id[P11_KEK_ID_LEN],
                                                CK_BBOOL on_token)
{
    CK_FUNCTION_LIST *fl = p11_function_list(ctx);
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof(cls)},
                        {CKA_ID, (void *)id, P11_KEK_ID_LEN},
                        {CKA_TOKEN, &on_token, sizeof(on_token)}};
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_ULONG n = 0;

    ck_assert_uint_eq(fl->C_FindObjectsInit(s, t, 3), CKR_OK);
    ck_assert_uint_eq(fl->C_FindObjects(s, &h, 1, &n), CKR_OK);
    ck_assert_uint_eq(fl->C_FindObjectsFinal(s), CKR_OK);
    ck_assert_uint_eq(n, 1);
    return h;
}

/* The token object of the KEK (or key) with this CKA_ID. */
static inline CK_OBJECT_HANDLE tm_raw_find(p11_ctx *ctx, CK_SESSION_HANDLE s,
                                           const unsigned char id[P11_KEK_ID_LEN])
{
    return tm_raw_find_kind(ctx, s, id, CK_TRUE);
}

/* Send stderr (the log) to a temp file; returns the saved fd. */
static inline int tm_capture_stderr(char *path, size_t len)
{
    int fd, saved;

    snprintf(path, len, "%s/stderr-XXXXXX", tm_token.dir);
    fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    saved = dup(2);
    dup2(fd, 2);
    close(fd);
    return saved;
}

/* Restore stderr and count the lines of the captured log containing needle. */
static inline int tm_release_stderr(int saved, const char *path, const char *needle)
{
    char line[4096];
    int count = 0;
    FILE *f;

    dup2(saved, 2);
    close(saved);
    f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof(line), f) != NULL) {
        fputs(line, stderr);
        if (strstr(line, needle) != NULL)
            count++;
    }
    fclose(f);
    unlink(path);
    return count;
}

#endif
