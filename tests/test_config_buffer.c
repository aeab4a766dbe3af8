/*
 * tests/test_config_buffer.c - kms_config_parse_buffer (the fuzz-friendly
 * entry of kms/server/config.c) parses exactly as kms_config_load: the
 * same configuration and the same "FILE:LINE: reason" for a set of texts
 * written to a file and given as a buffer (including an empty text, no
 * final newline, CRLF and a NUL byte), and it reads no further than len.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms/server/config.h"
#include "support/kmsd_harness.h"
#include "support/testtoken.h"

static char dir[256];
static char conf[320];

static void setup(void)
{
    char path[400];

    ck_assert_int_eq(tt_tempdir(dir, sizeof(dir)), 0);
    snprintf(conf, sizeof(conf), "%s/kmsd.conf", dir);
    snprintf(path, sizeof(path), "%s/pin", dir);
    ck_assert_int_eq(kh_write_file(path, "1234\n", 0600), 0);
}

static void teardown(void)
{
    tt_rmtree(dir);
}

#define GOOD                                                                                       \
    "[token]\nmodule = softhsm2\nuri = pkcs11:token=test\npin_file = pin\n"                        \
    "[store]\npath = kms.db\n[listen]\nunix = kmsd.sock\n[server]\nthreads = 3\n"

#define NUL_TEXT "[token]\nmodule = a\0junk\nuri = pkcs11:\n[store]\npath=x\n[listen]\nunix=s\n"

static const struct {
    const char *text;
    size_t len; /* 0: strlen */
} texts[] = {
    {GOOD, 0},
    {"[token]\r\nmodule = softhsm2\r\nuri = pkcs11:token=test\r\n[store]\r\npath = a.db\r\n"
     "[listen]\r\nunix = s.sock",
     0}, /* CRLF, no final newline */
    {"", 0},
    {"[token]\nmodule = softhsm2\n", 0},
    {"[server]\nthreads = 2\nthreads = 3\n", 0},
    {"[nope]\n", 0},
    {"module = x\n", 0},
    {"[token]\nuri = http://x\n", 0},
    {NUL_TEXT, sizeof(NUL_TEXT) - 1}, /* a NUL ends its line, as in a file */
    {GOOD "[policy]\nfile = missing.policy\n", 0},
};

static void compare(const kms_config *a, const kms_config *b)
{
    ck_assert_str_eq(a->token_module, b->token_module);
    ck_assert_str_eq(a->token_uri, b->token_uri);
    ck_assert_str_eq(a->store_backend, b->store_backend);
    ck_assert_str_eq(a->listen_unix, b->listen_unix);
    ck_assert_str_eq(a->dir, b->dir);
    ck_assert_int_eq(a->threads, b->threads);
    ck_assert_int_eq(a->line_last, b->line_last);
    ck_assert_int_eq(a->token_pin_file == NULL, b->token_pin_file == NULL);
    if (a->token_pin_file != NULL)
        ck_assert_str_eq(a->token_pin_file, b->token_pin_file);
}

START_TEST(buffer_parses_like_file)
{
    const char *text = texts[_i].text;
    size_t len = texts[_i].len != 0 ? texts[_i].len : strlen(text);
    char err_file[KMS_CONFIG_ERR_MAX], err_buf[KMS_CONFIG_ERR_MAX];
    kms_config *from_file = NULL, *from_buf = NULL;
    p11kms_status s_file, s_buf;
    FILE *f = fopen(conf, "w");

    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(text, 1, len, f), len);
    ck_assert_int_eq(fclose(f), 0);
    s_file = kms_config_load(conf, &from_file, err_file, sizeof(err_file));
    s_buf = kms_config_parse_buffer(text, len, conf, &from_buf, err_buf, sizeof(err_buf));
    ck_assert_int_eq(s_file, s_buf);
    if (s_file == P11KMS_OK) {
        compare(from_file, from_buf);
    } else {
        ck_assert_ptr_null(from_buf);
        ck_assert_str_eq(err_file, err_buf);
    }
    kms_config_free(from_file);
    kms_config_free(from_buf);
}
END_TEST

/* len bounds the text: what follows is never read. */
START_TEST(buffer_stops_at_len)
{
    static const char text[] = GOOD "[server]\nbogus = 1\n";
    char err[KMS_CONFIG_ERR_MAX];
    kms_config *cfg = NULL;

    ck_assert_int_eq(kms_config_parse_buffer(text, strlen(GOOD), conf, &cfg, err, sizeof(err)),
                     P11KMS_OK);
    ck_assert_int_eq(cfg->threads, 3);
    kms_config_free(cfg);
    ck_assert_int_eq(kms_config_parse_buffer(text, strlen(text), conf, &cfg, err, sizeof(err)),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_nonnull(strstr(err, "duplicate section [server]"));
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("config_buffer");
    TCase *tc = tcase_create("buffer");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_loop_test(tc, buffer_parses_like_file, 0, (int)(sizeof(texts) / sizeof(texts[0])));
    tcase_add_test(tc, buffer_stops_at_len);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
