/*
 * tests/test_client_installed.c - libp11kms as an application sees it:
 * `cmake --install` this build into a temp prefix, check what was
 * installed (headers, versioned shared library exporting only p11kms_*
 * symbols, p11kms.pc, kmsctl and its bash completion), compile
 * tests/client_installed/roundtrip.c out of tree with
 * `cc $(pkg-config --cflags --libs p11kms)`, and run it against a real kmsd.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "support/kmsctl_run.h"
#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

static char prefix[256];

static int sh(const char *script, kr_result *r)
{
    const char *argv[] = {"/bin/sh", "-c", script, NULL};
    return kr_run(argv, NULL, NULL, r);
}

static void exists(const char *rel)
{
    char path[512];
    struct stat st;

    snprintf(path, sizeof(path), "%s/%s", prefix, rel);
    ck_assert_msg(stat(path, &st) == 0, "not installed: %s", rel);
}

START_TEST(install_build_and_run)
{
    kh_kmsd k;
    kr_result r;
    char *cmd = NULL, target[400];
    long status = 0;
    const char *tmp = getenv("TMPDIR");
    json_t *j;

    snprintf(prefix, sizeof(prefix), "%s/p11kms-install.XXXXXX", tmp ? tmp : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(prefix));

    /* install */
    ck_assert(asprintf(&cmd, "'%s' --install '%s' --prefix '%s'", P11KMS_CMAKE, P11KMS_BINARY_DIR,
                       prefix) > 0);
    ck_assert_msg(sh(cmd, &r) == 0, "install failed: %s %s", r.out, r.err);
    kr_free(&r);
    free(cmd);
    exists("include/p11kms/client.h");
    exists("include/p11kms/status.h");
    exists(P11KMS_INSTALL_LIBDIR "/libp11kms.so");
    exists(P11KMS_INSTALL_LIBDIR "/libp11kms.so.0");
    exists(P11KMS_INSTALL_LIBDIR "/pkgconfig/p11kms.pc");
    exists("bin/kmsctl");
    exists("share/bash-completion/completions/kmsctl");

    /* the .pc names this prefix; the library exports p11kms_* only */
    ck_assert(asprintf(&cmd,
                       "export PKG_CONFIG_PATH='%s/" P11KMS_INSTALL_LIBDIR "/pkgconfig'; "
                       "pkg-config --modversion p11kms && pkg-config --variable=libdir p11kms && "
                       "objdump -p '%s/" P11KMS_INSTALL_LIBDIR "/libp11kms.so' | grep SONAME && "
                       "nm -D --defined-only '%s/" P11KMS_INSTALL_LIBDIR "/libp11kms.so' | "
                       "awk '{print $3}' | grep -v '^p11kms_' | grep -v '^$' | "
                       "sed 's/^/EXTRA:/'; true",
                       prefix, prefix, prefix) > 0);
    ck_assert_int_eq(sh(cmd, &r), 0);
    free(cmd);
    ck_assert_ptr_nonnull(strstr(r.out, "0.1.0\n"));
    ck_assert_ptr_nonnull(strstr(r.out, prefix));
    ck_assert_ptr_nonnull(strstr(r.out, "libp11kms.so.0"));
    ck_assert_msg(strstr(r.out, "EXTRA:") == NULL, "non-public symbols exported: %s", r.out);
    kr_free(&r);

    /* compile out of tree against the installed library only */
    ck_assert(asprintf(&cmd,
                       "export PKG_CONFIG_PATH='%s/" P11KMS_INSTALL_LIBDIR "/pkgconfig'; "
                       "'%s' -std=c11 -Wall -Wextra -Werror %s "
                       "'%s/tests/client_installed/roundtrip.c' -o '%s/roundtrip' "
                       "$(pkg-config --cflags --libs p11kms) "
                       "-Wl,-rpath,\"$(pkg-config --variable=libdir p11kms)\" && "
                       "ldd '%s/roundtrip' | grep libp11kms",
                       prefix, P11KMS_CC, P11KMS_SANITIZE_FLAGS, P11KMS_SOURCE_DIR, prefix,
                       prefix) > 0);
    ck_assert_msg(sh(cmd, &r) == 0, "compile failed: %s %s", r.out, r.err);
    free(cmd);
    ck_assert_msg(strstr(r.out, prefix) != NULL, "not linked to the installed library: %s", r.out);
    kr_free(&r);

    /* run it against kmsd */
    ck_assert_int_eq(kh_setup(&k, KMSD_PATH, "client-installed", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&k), 0);
    j = ku_call(&k, "POST", "/v1/keys", "{\"name\":\"customers\"}", &status);
    ck_assert_int_eq(status, 201);
    json_decref(j);
    snprintf(target, sizeof(target), "unix:%s", k.sock);
    {
        char prog[320];
        snprintf(prog, sizeof(prog), "%s/roundtrip", prefix);
        const char *argv[] = {prog, target, "customers", NULL};
        int st = kr_run(argv, NULL, NULL, &r);
        ck_assert_msg(st == 0, "roundtrip exit %d: %s %s", st, r.out, r.err);
        ck_assert_ptr_nonnull(strstr(r.out, "roundtrip: ok\n"));
        kr_free(&r);
        /* and a refusal: unknown key */
        const char *argv2[] = {prog, target, "nope", NULL};
        ck_assert_int_eq(kr_run(argv2, NULL, NULL, &r), 1);
        ck_assert_ptr_nonnull(strstr(r.err, "FAILED: generate"));
        kr_free(&r);
    }
    ck_assert_int_eq(kh_stop(&k, SIGTERM), 0);
    kh_teardown(&k);

    ck_assert(asprintf(&cmd, "rm -rf '%s'", prefix) > 0);
    sh(cmd, &r);
    kr_free(&r);
    free(cmd);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("client_installed");
    TCase *tc = tcase_create("installed");
    SRunner *sr;
    int failed;

    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, install_build_and_run);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
