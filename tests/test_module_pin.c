/*
 * tests/test_module_pin.c - p11_pin_load: the pin file must be 0600 (or
 * stricter) and ours, P11KMS_PIN wins over the file and is unset after
 * reading, trailing newlines are stripped, empty PINs are refused.
 */
#include <stddef.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <check.h>

#include "module/p11.h"
#include "support/testtoken.h"

static char dir[256];

static void setup(void)
{
    ck_assert_int_eq(tt_tempdir(dir, sizeof(dir)), 0);
    unsetenv("P11KMS_PIN");
}

static void teardown(void)
{
    tt_rmtree(dir);
}

static const char *write_pin(const char *name, const char *content, mode_t mode)
{
    static char path[512];
    int fd;

    snprintf(path, sizeof(path), "%s/%s", dir, name);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, content, strlen(content)), (int)strlen(content));
    close(fd);
    ck_assert_int_eq(chmod(path, mode), 0);
    return path;
}

START_TEST(test_pin_file_0600)
{
    char *pin = NULL;

    ck_assert_uint_eq(p11_pin_load(write_pin("pin", "1234\n", 0600), &pin), CKR_OK);
    ck_assert_str_eq(pin, "1234");
    p11_pin_free(pin);
    ck_assert_uint_eq(p11_pin_load(write_pin("pin2", "s3cr3t\r\n", 0400), &pin), CKR_OK);
    ck_assert_str_eq(pin, "s3cr3t");
    p11_pin_free(pin);
    ck_assert_uint_eq(p11_pin_load(write_pin("pin3", "no newline", 0600), &pin), CKR_OK);
    ck_assert_str_eq(pin, "no newline");
    p11_pin_free(pin);
    p11_pin_free(NULL);
}
END_TEST

START_TEST(test_pin_file_refused)
{
    char *pin = NULL;
    char path[600];

    ck_assert_uint_eq(p11_pin_load(write_pin("pin", "1234\n", 0644), &pin), CKR_ARGUMENTS_BAD);
    ck_assert_uint_eq(p11_pin_load(write_pin("pin", "1234\n", 0640), &pin), CKR_ARGUMENTS_BAD);
    ck_assert_uint_eq(p11_pin_load(write_pin("pin", "1234\n", 0604), &pin), CKR_ARGUMENTS_BAD);
    ck_assert_uint_eq(p11_pin_load(write_pin("empty", "\n", 0600), &pin), CKR_ARGUMENTS_BAD);
    ck_assert_uint_eq(p11_pin_load(write_pin("empty2", "", 0600), &pin), CKR_ARGUMENTS_BAD);
    snprintf(path, sizeof(path), "%s/missing", dir);
    ck_assert_uint_eq(p11_pin_load(path, &pin), CKR_ARGUMENTS_BAD);
    ck_assert_uint_eq(p11_pin_load(dir, &pin), CKR_ARGUMENTS_BAD); /* a directory */
    /* A symlink is not followed. */
    snprintf(path, sizeof(path), "%s/link", dir);
    ck_assert_int_eq(symlink(write_pin("target", "1234", 0600), path), 0);
    ck_assert_uint_eq(p11_pin_load(path, &pin), CKR_ARGUMENTS_BAD);
    /* Too long. */
    {
        char big[400];
        memset(big, 'x', sizeof(big) - 1);
        big[sizeof(big) - 1] = '\0';
        ck_assert_uint_eq(p11_pin_load(write_pin("big", big, 0600), &pin), CKR_ARGUMENTS_BAD);
    }
    ck_assert_uint_eq(p11_pin_load(NULL, &pin), CKR_ARGUMENTS_BAD);
    ck_assert_ptr_null(pin);
}
END_TEST

START_TEST(test_pin_env_preferred)
{
    char *pin = NULL;
    const char *file = write_pin("pin", "from-file\n", 0600);

    setenv("P11KMS_PIN", "from-env", 1);
    ck_assert_uint_eq(p11_pin_load(file, &pin), CKR_OK);
    ck_assert_str_eq(pin, "from-env");
    ck_assert_ptr_null(getenv("P11KMS_PIN")); /* unset after reading */
    p11_pin_free(pin);
    /* Gone, so the file is used now. */
    ck_assert_uint_eq(p11_pin_load(file, &pin), CKR_OK);
    ck_assert_str_eq(pin, "from-file");
    p11_pin_free(pin);
    /* An empty P11KMS_PIN is as good as none. */
    setenv("P11KMS_PIN", "", 1);
    ck_assert_uint_eq(p11_pin_load(file, &pin), CKR_OK);
    ck_assert_str_eq(pin, "from-file");
    p11_pin_free(pin);
    /* The environment alone is enough, even with a bad file. */
    setenv("P11KMS_PIN", "only-env", 1);
    ck_assert_uint_eq(p11_pin_load(write_pin("bad", "x", 0666), &pin), CKR_OK);
    ck_assert_str_eq(pin, "only-env");
    p11_pin_free(pin);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("module_pin");
    TCase *tc = tcase_create("pin");
    SRunner *sr;
    int failed;

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, test_pin_file_0600);
    tcase_add_test(tc, test_pin_file_refused);
    tcase_add_test(tc, test_pin_env_preferred);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
