/*
 * tests/test_module_uri.c - token selection by RFC 7512 URI among two
 * tokens in one SoftHSM2 token directory, and after re-initialisation
 * (slot ids change; the token is found again by its label).
 */
#include "test_module_support.h"

#include <sys/wait.h>

#define LABEL_A "p11kms-uri-a"
#define LABEL_B "p11kms-uri-b"

/* Token A via testtoken, token B added to the same tokendir. */
static void setup_two_tokens(void)
{
    pid_t pid;
    int status = 0;

    tm_token_setup_label(LABEL_A);
    pid = fork();
    if (pid == 0) {
        execlp("softhsm2-util", "softhsm2-util", "--init-token", "--free", "--label", LABEL_B,
               "--pin", "5678", "--so-pin", TT_SO_PIN, (char *)NULL);
        _exit(127);
    }
    if (pid < 0 || waitpid(pid, &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "softhsm2-util --init-token %s failed\n", LABEL_B);
        exit(1);
    }
}

static p11_ctx *open_uri(const char *uri, const char *pin)
{
    p11_config cfg = {tm_token.module, uri, pin, 0};
    p11_ctx *ctx = NULL;
    CK_RV rv = p11_open(&cfg, &ctx);

    ck_assert_msg(rv == CKR_OK, "p11_open %s: %s", uri, p11_rv_name(rv));
    return ctx;
}

START_TEST(test_select_each_token)
{
    p11_ctx *a = open_uri("pkcs11:token=" LABEL_A, TT_PIN);
    p11_ctx *b = open_uri("pkcs11:model=SoftHSM%20v2;token=" LABEL_B, "5678");
    char label[33];
    unsigned char id[P11_KEK_ID_LEN];
    unsigned char(*ids)[P11_KEK_ID_LEN] = NULL;
    size_t count = 99;

    ck_assert_uint_eq(p11_token_label(a, label), CKR_OK);
    ck_assert_str_eq(label, LABEL_A);
    ck_assert_uint_eq(p11_token_label(b, label), CKR_OK);
    ck_assert_str_eq(label, LABEL_B);
    ck_assert_uint_ne(p11_slot_id(a), p11_slot_id(b));
    /* A KEK made in B is not in A. */
    ck_assert_uint_eq(p11_kek_create(b, "p11kms:uri:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_kek_exists(b, id), CKR_OK);
    ck_assert_uint_eq(p11_kek_exists(a, id), CKR_KEY_HANDLE_INVALID);
    ck_assert_uint_eq(p11_kek_list(a, "p11kms:uri:", &ids, &count), CKR_OK);
    ck_assert_uint_eq(count, 0);
    free(ids);
    p11_close(a);
    p11_close(b);
}
END_TEST

START_TEST(test_pin_of_other_token_refused)
{
    p11_config cfg = {tm_token.module, "pkcs11:token=" LABEL_B, TT_PIN, 0};
    p11_ctx *ctx = NULL;

    ck_assert_uint_eq(p11_open(&cfg, &ctx), CKR_PIN_INCORRECT);
    ck_assert_ptr_null(ctx);
}
END_TEST

START_TEST(test_reinit_finds_token_again)
{
    p11_ctx *b = open_uri("pkcs11:token=" LABEL_B, "5678");
    CK_FUNCTION_LIST *fl = p11_function_list(b);
    unsigned char id[P11_KEK_ID_LEN], dek[32] = {9}, blob[64], back[32];
    size_t blob_len = sizeof(blob), back_len = sizeof(back);
    char label[33];

    ck_assert_uint_eq(p11_kek_create(b, "p11kms:reinit:v1", id), CKR_OK);
    ck_assert_uint_eq(p11_wrap(b, id, NULL, 0, dek, sizeof(dek), blob, &blob_len), CKR_OK);
    ck_assert_uint_eq(fl->C_Finalize(NULL), CKR_OK);
    ck_assert_uint_eq(p11_unwrap(b, id, NULL, 0, blob, blob_len, back, &back_len), CKR_OK);
    ck_assert_mem_eq(back, dek, sizeof(dek));
    ck_assert_uint_eq(p11_token_label(b, label), CKR_OK);
    ck_assert_str_eq(label, LABEL_B);
    p11_close(b);
}
END_TEST

START_TEST(test_no_match)
{
    p11_config cfg = {tm_token.module, "pkcs11:token=p11kms-uri-c", TT_PIN, 0};
    p11_ctx *ctx = NULL;

    ck_assert_uint_eq(p11_open(&cfg, &ctx), CKR_TOKEN_NOT_PRESENT);
    cfg.uri = "pkcs11:manufacturer=Nobody;token=" LABEL_A;
    ck_assert_uint_eq(p11_open(&cfg, &ctx), CKR_TOKEN_NOT_PRESENT);
    cfg.uri = "pkcs11:library-manufacturer=Nobody";
    ck_assert_uint_eq(p11_open(&cfg, &ctx), CKR_TOKEN_NOT_PRESENT);
    ck_assert_ptr_null(ctx);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("module_uri");
    TCase *tc = tcase_create("uri");
    SRunner *sr;
    int failed;

    tcase_add_unchecked_fixture(tc, setup_two_tokens, tm_token_teardown);
    tcase_add_test(tc, test_select_each_token);
    tcase_add_test(tc, test_pin_of_other_token_refused);
    tcase_add_test(tc, test_reinit_finds_token_again);
    tcase_add_test(tc, test_no_match);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
