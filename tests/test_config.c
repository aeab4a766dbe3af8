/*
 * tests/test_config.c - unit tests of the kmsd.conf parser
 * (kms/server/config.c): every error path with its exact
 * "FILE:LINE: reason", comments, defaults and relative paths.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kms/server/config.h"
#include "support/kmsd_harness.h"
#include "support/testtoken.h"

static char dir[256];
static char conf[320];
static char err[KMS_CONFIG_ERR_MAX];

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

/* A valid base config; `extra` is inserted before [listen]. */
#define BASE_HEAD                                                                                  \
    "[token]\n"                                                                                    \
    "module = softhsm2\n"                                                                          \
    "uri = pkcs11:token=test\n"                                                                    \
    "pin_file = pin\n"                                                                             \
    "[store]\n"                                                                                    \
    "path = kms.db\n"
#define BASE_LISTEN                                                                                \
    "[listen]\n"                                                                                   \
    "unix = kmsd.sock\n"

static p11kms_status load_text(const char *text, kms_config **cfg)
{
    ck_assert_int_eq(kh_write_file(conf, text, 0600), 0);
    *cfg = NULL;
    return kms_config_load(conf, cfg, err, sizeof(err));
}

/* Expect a failure whose message is "<conf>:<tail>". */
static void expect_error(const char *text, const char *tail)
{
    kms_config *cfg = NULL;
    char want[1400];

    ck_assert_int_eq(load_text(text, &cfg), P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_null(cfg);
    snprintf(want, sizeof(want), "%s:%s", conf, tail);
    ck_assert_str_eq(err, want);
}

START_TEST(valid_defaults_and_relative_paths)
{
    kms_config *cfg = NULL;
    char real[PATH_MAX], want[PATH_MAX + 32];

    ck_assert_int_eq(load_text(BASE_HEAD BASE_LISTEN, &cfg), P11KMS_OK);
    ck_assert_ptr_nonnull(realpath(dir, real));
    ck_assert_str_eq(cfg->token_module, "softhsm2"); /* a p11-kit module name */
    ck_assert_str_eq(cfg->token_uri, "pkcs11:token=test");
    snprintf(want, sizeof(want), "%s/pin", real);
    ck_assert_str_eq(cfg->token_pin_file, want);
    snprintf(want, sizeof(want), "%s/kms.db", real);
    ck_assert_str_eq(cfg->store_path, want);
    snprintf(want, sizeof(want), "%s/kmsd.sock", real);
    ck_assert_str_eq(cfg->listen_unix, want);
    ck_assert_str_eq(cfg->store_backend, "sqlite");
    ck_assert_int_eq(cfg->token_sessions, 32);
    ck_assert_int_eq(cfg->unix_mode, 0600);
    ck_assert_int_eq(cfg->threads, 2);
    ck_assert_int_eq(cfg->workers, 32);
    ck_assert_int_eq(cfg->queue, 1024);
    ck_assert_int_eq(cfg->max_body, 65536);
    ck_assert_int_eq(cfg->timeout, 30);
    ck_assert_int_eq(cfg->request_timeout, 10);
    ck_assert_int_eq(cfg->max_connections, 1024);
    ck_assert_ptr_null(cfg->listen_tls);
    ck_assert_int_eq(kms_config_check_supported(cfg, err, sizeof(err)), P11KMS_OK);
    kms_config_free(cfg);
}
END_TEST

START_TEST(comments_and_whitespace)
{
    kms_config *cfg = NULL;

    ck_assert_int_eq(load_text("; leading comment\n"
                               "# another\n"
                               "   \n"
                               "[token]   ; section comment\n"
                               "  module=/opt/lib/x.so   # path module\n"
                               "uri = pkcs11:token=a;manufacturer=b#c ; ';' inside a URI stays\n"
                               "pin_file = pin\n"
                               "sessions = 8\t\n"
                               "[store]\n"
                               "backend = sqlite\n"
                               "path = /var/lib/kms.db\n"
                               "[listen]\n"
                               "unix = /run/k.sock\n"
                               "unix_mode = 0660\n"
                               "[server]\n"
                               "threads = 4\n"
                               "workers = 64\n"
                               "queue = 10\n"
                               "max_body = 4096\n"
                               "timeout = 5\n"
                               "request_timeout = 3\n"
                               "max_connections = 9\n",
                               &cfg),
                     P11KMS_OK);
    ck_assert_str_eq(cfg->token_module, "/opt/lib/x.so");
    ck_assert_str_eq(cfg->token_uri, "pkcs11:token=a;manufacturer=b#c");
    ck_assert_int_eq(cfg->token_sessions, 8);
    ck_assert_str_eq(cfg->store_path, "/var/lib/kms.db");
    ck_assert_str_eq(cfg->listen_unix, "/run/k.sock");
    ck_assert_int_eq(cfg->unix_mode, 0660);
    ck_assert_int_eq(cfg->threads, 4);
    ck_assert_int_eq(cfg->workers, 64);
    ck_assert_int_eq(cfg->queue, 10);
    ck_assert_int_eq(cfg->max_body, 4096);
    ck_assert_int_eq(cfg->timeout, 5);
    ck_assert_int_eq(cfg->request_timeout, 3);
    ck_assert_int_eq(cfg->max_connections, 9);
    kms_config_free(cfg);
}
END_TEST

START_TEST(relative_module_path)
{
    kms_config *cfg = NULL;
    char real[PATH_MAX], want[PATH_MAX + 32];

    ck_assert_int_eq(load_text("[token]\nmodule = lib/m.so\nuri = pkcs11:\npin_file = pin\n"
                               "[store]\npath = kms.db\n" BASE_LISTEN,
                               &cfg),
                     P11KMS_OK);
    ck_assert_ptr_nonnull(realpath(dir, real));
    snprintf(want, sizeof(want), "%s/lib/m.so", real);
    ck_assert_str_eq(cfg->token_module, want);
    kms_config_free(cfg);
}
END_TEST

START_TEST(unknown_section)
{
    expect_error(BASE_HEAD BASE_LISTEN "[bogus]\n", "9: unknown section [bogus]");
}
END_TEST

START_TEST(unknown_key)
{
    expect_error(BASE_HEAD "colour = blue\n" BASE_LISTEN,
                 "7: unknown key 'colour' in section [store]");
}
END_TEST

START_TEST(duplicate_key)
{
    expect_error(BASE_HEAD "path = other.db\n" BASE_LISTEN,
                 "7: duplicate key store.path (first set on line 6)");
}
END_TEST

START_TEST(duplicate_section)
{
    expect_error(BASE_HEAD BASE_LISTEN "[store]\n",
                 "9: duplicate section [store] (first on line 5)");
}
END_TEST

START_TEST(bad_integer)
{
    expect_error(BASE_HEAD BASE_LISTEN "[server]\nthreads = two\n",
                 "10: server.threads: bad integer 'two'");
    expect_error(BASE_HEAD BASE_LISTEN "[server]\nworkers = 12x\n",
                 "10: server.workers: bad integer '12x'");
    expect_error(BASE_HEAD BASE_LISTEN "[server]\nthreads = 0\n",
                 "10: server.threads: 0 out of range 1..64");
    expect_error(BASE_HEAD BASE_LISTEN "[server]\ntimeout = 99999999999999999999\n",
                 "10: server.timeout: bad integer '99999999999999999999'");
}
END_TEST

START_TEST(bad_mode)
{
    expect_error(BASE_HEAD BASE_LISTEN "unix_mode = 0999\n",
                 "9: listen.unix_mode: bad octal mode '0999'");
}
END_TEST

START_TEST(empty_value)
{
    expect_error(BASE_HEAD BASE_LISTEN "[server]\nthreads =\n", "10: server.threads: empty value");
}
END_TEST

START_TEST(missing_required)
{
    expect_error("[token]\nmodule = m\npin_file = pin\n[store]\npath = kms.db\n" BASE_LISTEN,
                 "1: missing required key token.uri");
    expect_error(BASE_HEAD, "6: missing required key listen.unix");
    expect_error("[token]\nmodule = m\nuri = pkcs11:\n[store]\nbackend = sqlite\n" BASE_LISTEN,
                 "4: missing required key store.path");
    expect_error("[token]\nuri = pkcs11:\n[store]\npath = p\n" BASE_LISTEN,
                 "1: missing required key token.module");
    expect_error("[token]\nmodule = m\nuri = pkcs11:\n[store]\nbackend = postgres\n" BASE_LISTEN,
                 "4: missing required key store.url");
}
END_TEST

START_TEST(missing_pin_file)
{
    /* realpath of dir may differ from dir (symlinked /tmp): compare parts */
    kms_config *cfg = NULL;
    ck_assert_int_eq(load_text("[token]\nmodule = m\nuri = pkcs11:\npin_file = nope\n"
                               "[store]\npath = kms.db\n" BASE_LISTEN,
                               &cfg),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_nonnull(strstr(err, ":4: token.pin_file: cannot access '"));
    ck_assert_ptr_nonnull(strstr(err, "/nope': No such file or directory"));
    ck_assert_int_eq(strncmp(err, conf, strlen(conf)), 0);
}
END_TEST

START_TEST(world_readable_pin_file)
{
    char path[400];

    snprintf(path, sizeof(path), "%s/pin", dir);
    ck_assert_int_eq(chmod(path, 0644), 0);
    kms_config *cfg = NULL;
    ck_assert_int_eq(load_text(BASE_HEAD BASE_LISTEN, &cfg), P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_nonnull(strstr(err, ":4: token.pin_file: '"));
    ck_assert_ptr_nonnull(
        strstr(err, "/pin' is accessible by group or others (mode 644; need 0600 or stricter)"));
}
END_TEST

START_TEST(no_pin_file_is_allowed)
{
    kms_config *cfg = NULL;

    ck_assert_int_eq(
        load_text("[token]\nmodule = m\nuri = pkcs11:\n[store]\npath = p\n" BASE_LISTEN, &cfg),
        P11KMS_OK);
    ck_assert_ptr_null(cfg->token_pin_file); /* P11KMS_PIN then */
    kms_config_free(cfg);
}
END_TEST

START_TEST(softhsm2_conf_key)
{
    kms_config *cfg = NULL;
    char path[400], real[PATH_MAX], want[PATH_MAX + 32];

    snprintf(path, sizeof(path), "%s/softhsm2.conf", dir);
    ck_assert_int_eq(kh_write_file(path, "directories.tokendir = /tmp\n", 0600), 0);
    ck_assert_int_eq(load_text(BASE_HEAD "[token]\n" BASE_LISTEN, &cfg), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(load_text("[token]\nsofthsm2_conf = softhsm2.conf\nmodule = softhsm2\n"
                               "uri = pkcs11:token=test\npin_file = pin\n[store]\npath = kms.db\n"
                               BASE_LISTEN,
                               &cfg),
                     P11KMS_OK);
    ck_assert_ptr_nonnull(realpath(dir, real));
    snprintf(want, sizeof(want), "%s/softhsm2.conf", real);
    ck_assert_str_eq(cfg->token_softhsm2_conf, want);
    kms_config_free(cfg);
    ck_assert_int_eq(load_text("[token]\nsofthsm2_conf = nowhere.conf\nmodule = softhsm2\n"
                               "uri = pkcs11:token=test\npin_file = pin\n[store]\npath = kms.db\n"
                               BASE_LISTEN,
                               &cfg),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_msg(strstr(err, ":2: token.softhsm2_conf: cannot access '") != NULL, "%s", err);
}
END_TEST

START_TEST(missing_policy_file)
{
    kms_config *cfg = NULL;

    ck_assert_int_eq(load_text(BASE_HEAD BASE_LISTEN "[policy]\nfile = policy.conf\n", &cfg),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_nonnull(strstr(err, ":10: policy.file: cannot access '"));
}
END_TEST

START_TEST(bad_uri)
{
    kms_config *cfg = NULL;

    ck_assert_int_eq(load_text("[token]\nmodule = m\nuri = http://not-pkcs11\n", &cfg),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_nonnull(strstr(err, ":3: token.uri: not a valid PKCS#11 URI: "));
}
END_TEST

START_TEST(bad_backend)
{
    expect_error("[store]\nbackend = mysql\n",
                 "2: store.backend: must be sqlite or postgres, not 'mysql'");
}
END_TEST

START_TEST(syntax_errors)
{
    expect_error("module = m\n", "1: key 'module' outside of any section");
    expect_error("[token]\njust words\n", "2: expected 'key = value' or '[section]'");
    expect_error("[token\n", "1: malformed section header '[token'");
    expect_error("[token]\n = x\n", "2: expected 'key = value' or '[section]'");
}
END_TEST

START_TEST(socket_path_too_long)
{
    char text[1024], longname[200];

    memset(longname, 'a', sizeof(longname) - 1);
    longname[sizeof(longname) - 1] = '\0';
    snprintf(text, sizeof(text), BASE_HEAD "[listen]\nunix = /%s\n", longname);
    expect_error(text, "8: listen.unix: socket path too long (max 107 bytes)");
}
END_TEST

START_TEST(unsupported_features)
{
    kms_config *cfg = NULL;
    char want[800];

    ck_assert_int_eq(load_text("[token]\nmodule = m\nuri = pkcs11:\n[store]\nbackend = postgres\n"
                               "url = postgresql://kms@/kms\n" BASE_LISTEN,
                               &cfg),
                     P11KMS_OK);
    /* PostgreSQL is supported (issue 9); its url must parse. */
    ck_assert_int_eq(kms_config_check_supported(cfg, err, sizeof(err)), P11KMS_OK);
    kms_config_free(cfg);
    cfg = NULL;
    ck_assert_int_eq(load_text("[token]\nmodule = m\nuri = pkcs11:\n[store]\nbackend = postgres\n"
                               "url = host=/tmp dbname='unterminated\n" BASE_LISTEN,
                               &cfg),
                     P11KMS_OK);
    ck_assert_int_eq(kms_config_check_supported(cfg, err, sizeof(err)), P11KMS_ERR_BAD_REQUEST);
    snprintf(want, sizeof(want), "%s:5: store.url: not a libpq connection string", conf);
    ck_assert_msg(strncmp(err, want, strlen(want)) == 0, "%s", err);
    kms_config_free(cfg);
}
END_TEST

/* listen.tls with tls_cert, tls_key (0600) and tls_client_ca, all or none. */
START_TEST(tls_keys)
{
    kms_config *cfg = NULL;
    char path[400];
    char real[PATH_MAX], want[PATH_MAX + 32];

    expect_error(BASE_HEAD BASE_LISTEN "tls = 127.0.0.1:8443\n",
                 "7: missing required key listen.tls_cert (listen.tls, tls_cert, tls_key and "
                 "tls_client_ca go together)");
    expect_error(BASE_HEAD BASE_LISTEN "tls_key = k.pem\n",
                 "7: missing required key listen.tls (listen.tls, tls_cert, tls_key and "
                 "tls_client_ca go together)");
    expect_error(BASE_HEAD BASE_LISTEN "tls = 8443\ntls_cert = c.pem\ntls_key = k.pem\n"
                                       "tls_client_ca = ca.pem\n",
                 "9: listen.tls: expected host:port or [v6]:port, not '8443'");
    expect_error(BASE_HEAD BASE_LISTEN "tls = 127.0.0.1:70000\ntls_cert = c.pem\n"
                                       "tls_key = k.pem\ntls_client_ca = ca.pem\n",
                 "9: listen.tls: expected host:port or [v6]:port, not '127.0.0.1:70000'");
    snprintf(path, sizeof(path), "%s/c.pem", dir);
    ck_assert_int_eq(kh_write_file(path, "x\n", 0644), 0);
    snprintf(path, sizeof(path), "%s/ca.pem", dir);
    ck_assert_int_eq(kh_write_file(path, "x\n", 0644), 0);
    snprintf(path, sizeof(path), "%s/k.pem", dir);
    ck_assert_int_eq(kh_write_file(path, "x\n", 0640), 0);
    ck_assert_int_eq(load_text(BASE_HEAD BASE_LISTEN "tls = [::1]:8443\ntls_cert = c.pem\n"
                                                     "tls_key = k.pem\ntls_client_ca = ca.pem\n",
                               &cfg),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_nonnull(strstr(err, ":11: listen.tls_key: '"));
    ck_assert_ptr_nonnull(strstr(err, "need 0600 or stricter"));
    ck_assert_int_eq(chmod(path, 0600), 0);
    ck_assert_int_eq(load_text(BASE_HEAD BASE_LISTEN "tls = [::1]:8443\ntls_cert = c.pem\n"
                                                     "tls_key = k.pem\ntls_client_ca = ca.pem\n",
                               &cfg),
                     P11KMS_OK);
    ck_assert_str_eq(cfg->listen_tls, "[::1]:8443");
    ck_assert_ptr_nonnull(realpath(dir, real));
    snprintf(want, sizeof(want), "%s/ca.pem", real);
    ck_assert_str_eq(cfg->tls_client_ca, want);
    ck_assert_int_eq(kms_config_check_supported(cfg, err, sizeof(err)), P11KMS_OK);
    kms_config_free(cfg);
}
END_TEST

START_TEST(unreadable_file)
{
    kms_config *cfg = NULL;
    char path[400], want[500];

    snprintf(path, sizeof(path), "%s/absent.conf", dir);
    ck_assert_int_eq(kms_config_load(path, &cfg, err, sizeof(err)), P11KMS_ERR_BAD_REQUEST);
    snprintf(want, sizeof(want), "%s: cannot open: No such file or directory", path);
    ck_assert_str_eq(err, want);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("parser");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, valid_defaults_and_relative_paths);
    tcase_add_test(tc, comments_and_whitespace);
    tcase_add_test(tc, relative_module_path);
    tcase_add_test(tc, unknown_section);
    tcase_add_test(tc, unknown_key);
    tcase_add_test(tc, duplicate_key);
    tcase_add_test(tc, duplicate_section);
    tcase_add_test(tc, bad_integer);
    tcase_add_test(tc, bad_mode);
    tcase_add_test(tc, empty_value);
    tcase_add_test(tc, missing_required);
    tcase_add_test(tc, missing_pin_file);
    tcase_add_test(tc, world_readable_pin_file);
    tcase_add_test(tc, no_pin_file_is_allowed);
    tcase_add_test(tc, softhsm2_conf_key);
    tcase_add_test(tc, missing_policy_file);
    tcase_add_test(tc, bad_uri);
    tcase_add_test(tc, bad_backend);
    tcase_add_test(tc, syntax_errors);
    tcase_add_test(tc, socket_path_too_long);
    tcase_add_test(tc, unsupported_features);
    tcase_add_test(tc, tls_keys);
    tcase_add_test(tc, unreadable_file);
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
