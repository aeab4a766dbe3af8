/*
 * tests/test_kmsd_lifecycle.c - starting and stopping the real kmsd:
 * --check-config, --help/--version, refused starts (missing or
 * world-readable PIN file, wrong PIN, TLS or postgres configured, a live
 * or foreign file at the socket path), the socket mode, stale socket
 * removal, P11KMS_PIN, and SIGTERM/SIGINT draining to exit 0 with the
 * socket removed.  Each test makes its own token and kmsd.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

static kh_kmsd K;

static void setup(void)
{
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-life", NULL, NULL), 0);
}

static void teardown(void)
{
    kh_teardown(&K);
}

static int log_has(const char *needle)
{
    char *log = kh_read_file(K.log, NULL);
    int found = log != NULL && strstr(log, needle) != NULL;

    if (!found)
        fprintf(stderr, "log lacks '%s':\n%s\n", needle, log != NULL ? log : "(none)");
    free(log);
    return found;
}

START_TEST(sigterm_exits_zero_and_removes_socket)
{
    struct stat st;

    ck_assert_int_eq(kh_start(&K), 0);
    ck_assert_int_eq(stat(K.sock, &st), 0);
    ck_assert(S_ISSOCK(st.st_mode));
    ck_assert_int_eq(st.st_mode & 0777, 0600);
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    ck_assert_int_ne(access(K.sock, F_OK), 0);
    ck_assert(log_has("kmsd stopped"));
}
END_TEST

START_TEST(sigint_exits_zero)
{
    ck_assert_int_eq(kh_start(&K), 0);
    ck_assert_int_eq(kh_stop(&K, SIGINT), 0);
    ck_assert_int_ne(access(K.sock, F_OK), 0);
}
END_TEST

typedef struct load_arg {
    const char *sock;
    int ok, failed, bad;
} load_arg;

static void *load(void *arg)
{
    load_arg *a = arg;
    CURL *c = curl_easy_init();
    kh_response r;

    for (int i = 0; i < 200; i++) {
        if (kh_request_h(c, a->sock, "POST", "/v1/keys/drain/datakeys", "{}", 2, NULL, &r) != 0) {
            a->failed++; /* refused connection once kmsd stopped accepting */
            continue;
        }
        if (r.status == 201 && strstr(r.body, "\"plaintext\"") != NULL)
            a->ok++;
        else
            a->bad++;
        kh_response_free(&r);
    }
    curl_easy_cleanup(c);
    return NULL;
}

START_TEST(sigterm_drains_under_load)
{
    pthread_t th[4];
    load_arg args[4];
    long status = 0;
    json_t *j;
    int ok = 0;

    ck_assert_int_eq(kh_start(&K), 0);
    j = ku_call(&K, "POST", "/v1/keys", "{\"name\":\"drain\"}", &status);
    ck_assert_int_eq(status, 201);
    json_decref(j);
    for (int i = 0; i < 4; i++) {
        args[i] = (load_arg){K.sock, 0, 0, 0};
        pthread_create(&th[i], NULL, load, &args[i]);
    }
    usleep(100000);
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        ck_assert_int_eq(args[i].bad, 0); /* never a wrong or partial answer */
        ok += args[i].ok;
    }
    ck_assert_int_gt(ok, 0);
    ck_assert_int_ne(access(K.sock, F_OK), 0);
}
END_TEST

START_TEST(check_config_ok)
{
    const char *argv[] = {KMSD_PATH, "--check-config", "--config", K.conf, NULL};
    char *out = NULL, want[400];

    ck_assert_int_eq(kh_run(argv, &out), 0);
    snprintf(want, sizeof(want), "%s: ok\n", K.conf);
    ck_assert_str_eq(out, want);
    free(out);
}
END_TEST

START_TEST(check_config_broken)
{
    const char *argv[] = {KMSD_PATH, "--check-config", "--config", K.conf, NULL};
    char *out = NULL, want[600];

    ck_assert_int_eq(kh_write_conf(&K, "queue = lots\n", NULL), 0);
    ck_assert_int_eq(kh_run(argv, &out), 1);
    snprintf(want, sizeof(want), "kmsd: %s:17: server.queue: bad integer 'lots'\n", K.conf);
    ck_assert_str_eq(out, want);
    free(out);
    ck_assert_int_eq(kh_write_conf(&K, NULL, "[nonsense]\n"), 0);
    ck_assert_int_eq(kh_run(argv, &out), 1);
    snprintf(want, sizeof(want), "kmsd: %s:17: unknown section [nonsense]\n", K.conf);
    ck_assert_str_eq(out, want);
    free(out);
    /* and kmsd itself refuses it the same way */
    ck_assert_int_eq(kh_start_expect_exit(&K, 30), 1);
    ck_assert(log_has(":17: unknown section [nonsense]"));
}
END_TEST

START_TEST(usage)
{
    const char *help[] = {KMSD_PATH, "--help", NULL};
    const char *version[] = {KMSD_PATH, "--version", NULL};
    const char *none[] = {KMSD_PATH, NULL};
    const char *pin[] = {KMSD_PATH, "--pin", "1234", "--config", K.conf, NULL};
    char *out = NULL;

    ck_assert_int_eq(kh_run(help, &out), 0);
    ck_assert_ptr_nonnull(strstr(out, "--check-config"));
    free(out);
    ck_assert_int_eq(kh_run(version, &out), 0);
    ck_assert_ptr_nonnull(strstr(out, "kmsd (p11kms) "));
    free(out);
    ck_assert_int_eq(kh_run(none, &out), 2);
    free(out);
    ck_assert_int_eq(kh_run(pin, &out), 2); /* there is no PIN option */
    free(out);
}
END_TEST

START_TEST(missing_pin_file_refused)
{
    unlink(K.pin);
    ck_assert_int_eq(kh_start_expect_exit(&K, 30), 1);
    ck_assert(log_has(":5: token.pin_file: cannot access '"));
    ck_assert_int_ne(access(K.sock, F_OK), 0);
}
END_TEST

START_TEST(world_readable_pin_refused)
{
    ck_assert_int_eq(chmod(K.pin, 0644), 0);
    ck_assert_int_eq(kh_start_expect_exit(&K, 30), 1);
    ck_assert(log_has("is accessible by group or others"));
}
END_TEST

START_TEST(wrong_pin_refused)
{
    ck_assert_int_eq(kh_write_file(K.pin, "9999\n", 0600), 0);
    ck_assert_int_eq(kh_start_expect_exit(&K, 30), 1);
    ck_assert(log_has("cannot open token"));
    ck_assert_int_ne(access(K.sock, F_OK), 0);
}
END_TEST

START_TEST(pin_from_environment)
{
    char *text = kh_read_file(K.conf, NULL), *line;

    /* drop the pin_file line */
    line = strstr(text, "pin_file = pin\n");
    ck_assert_ptr_nonnull(line);
    memmove(line, line + 15, strlen(line + 15) + 1);
    ck_assert_int_eq(kh_write_file(K.conf, text, 0600), 0);
    free(text);
    ck_assert_int_eq(kh_start_expect_exit(&K, 30), 1); /* neither file nor variable */
    ck_assert(log_has("P11KMS_PIN is not set"));
    setenv("P11KMS_PIN", TT_PIN, 1);
    ck_assert_int_eq(kh_start(&K), 0);
    unsetenv("P11KMS_PIN");
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
}
END_TEST

START_TEST(tls_and_postgres_refused)
{
    ck_assert_int_eq(kh_write_conf(&K, NULL, "[listen]\n"), 0); /* duplicate section */
    ck_assert_int_eq(kh_start_expect_exit(&K, 30), 1);
    ck_assert_int_eq(kh_write_conf(&K, NULL, "[policy]\n"), 0);
    {
        /* tls goes into [listen]: rewrite the whole file */
        char *text = kh_read_file(K.conf, NULL), *fixed = NULL;
        char *at = strstr(text, "unix = kmsd.sock\n");
        ck_assert_ptr_nonnull(at);
        at += strlen("unix = kmsd.sock\n");
        ck_assert_int_gt(
            asprintf(&fixed, "%.*stls = 127.0.0.1:8443\n%s", (int)(at - text), text, at), 0);
        ck_assert_int_eq(kh_write_file(K.conf, fixed, 0600), 0);
        free(text);
        free(fixed);
    }
    ck_assert_int_eq(kh_start_expect_exit(&K, 30), 1);
    /* TLS is implemented; its four keys go together (test_kmsd_tls.c). */
    ck_assert(log_has("missing required key listen.tls_cert"));
    {
        /* a PostgreSQL store nobody answers for (either test backend) */
        char *text = kh_read_file(K.conf, NULL), *fixed = NULL;
        char *at = strstr(text, "[store]\n"), *end = strstr(text, "[listen]\n");
        ck_assert_ptr_nonnull(at);
        ck_assert_ptr_nonnull(end);
        ck_assert_int_gt(asprintf(&fixed,
                                  "%.*s[store]\nbackend = postgres\n"
                                  "url = host=/nonexistent dbname=kms connect_timeout=2\n\n%s",
                                  (int)(at - text), text, end),
                         0);
        /* and drop tls again */
        char *tls = strstr(fixed, "tls = 127.0.0.1:8443\n");
        memmove(tls, tls + 21, strlen(tls + 21) + 1);
        ck_assert_int_eq(kh_write_file(K.conf, fixed, 0600), 0);
        free(text);
        free(fixed);
    }
    ck_assert_int_eq(kh_start_expect_exit(&K, 30), 1);
    ck_assert(log_has("cannot open store (postgres, store.url)"));
}
END_TEST

START_TEST(stale_socket_removed)
{
    struct sockaddr_un sun;
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);

    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    ck_assert_int_lt(strlen(K.sock), sizeof(sun.sun_path));
    memcpy(sun.sun_path, K.sock, strlen(K.sock) + 1);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&sun, sizeof(sun)), 0);
    close(fd); /* a socket file nobody listens on */
    ck_assert_int_eq(kh_start(&K), 0);
    ck_assert(log_has("removed stale socket"));
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
}
END_TEST

START_TEST(live_socket_or_file_refused)
{
    kh_kmsd second;
    pid_t first;

    ck_assert_int_eq(kh_start(&K), 0);
    first = K.pid;
    second = K;
    snprintf(second.log, sizeof(second.log), "%s/second.log", K.dir);
    ck_assert_int_eq(kh_start_expect_exit(&second, 30), 1);
    {
        char *log = kh_read_file(second.log, NULL);
        ck_assert_ptr_nonnull(strstr(log, "another process is listening on"));
        free(log);
    }
    ck_assert_int_eq(K.pid, first);
    ku_assert_healthy(&K); /* the first one is untouched */
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);

    ck_assert_int_eq(kh_write_file(K.sock, "not a socket", 0600), 0);
    ck_assert_int_eq(kh_start_expect_exit(&K, 30), 1);
    ck_assert(log_has("exists and is not a socket"));
    ck_assert_int_eq(access(K.sock, F_OK), 0); /* left alone */
}
END_TEST

START_TEST(socket_mode_from_config)
{
    struct stat st;
    char *text = kh_read_file(K.conf, NULL), *fixed = NULL;
    char *at = strstr(text, "unix = kmsd.sock\n") + strlen("unix = kmsd.sock\n");

    ck_assert_int_gt(asprintf(&fixed, "%.*sunix_mode = 0660\n%s", (int)(at - text), text, at), 0);
    ck_assert_int_eq(kh_write_file(K.conf, fixed, 0600), 0);
    free(text);
    free(fixed);
    ck_assert_int_eq(kh_start(&K), 0);
    ck_assert_int_eq(stat(K.sock, &st), 0);
    ck_assert_int_eq(st.st_mode & 0777, 0660);
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
}
END_TEST

START_TEST(max_connections)
{
    struct sockaddr_un sun;
    int idle;
    kh_response r;

    ck_assert_int_eq(kh_write_conf(&K, "max_connections = 1\n", NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    usleep(200000); /* the health probe's connection is gone */
    idle = socket(AF_UNIX, SOCK_STREAM, 0);
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    memcpy(sun.sun_path, K.sock, strlen(K.sock) + 1);
    ck_assert_int_eq(connect(idle, (struct sockaddr *)&sun, sizeof(sun)), 0);
    usleep(200000);
    ck_assert_int_eq(kh_request(K.sock, "GET", "/v1/health", NULL, 0, NULL, &r), 0);
    ck_assert_int_eq(r.status, 503);
    ck_assert_ptr_nonnull(strstr(r.body, "\"overloaded\""));
    kh_response_free(&r);
    close(idle);
    usleep(200000);
    ku_assert_healthy(&K);
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_lifecycle");
    TCase *tc = tcase_create("lifecycle");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, sigterm_exits_zero_and_removes_socket);
    tcase_add_test(tc, sigint_exits_zero);
    tcase_add_test(tc, sigterm_drains_under_load);
    tcase_add_test(tc, check_config_ok);
    tcase_add_test(tc, check_config_broken);
    tcase_add_test(tc, usage);
    tcase_add_test(tc, missing_pin_file_refused);
    tcase_add_test(tc, world_readable_pin_refused);
    tcase_add_test(tc, wrong_pin_refused);
    tcase_add_test(tc, pin_from_environment);
    tcase_add_test(tc, tls_and_postgres_refused);
    tcase_add_test(tc, stale_socket_removed);
    tcase_add_test(tc, live_socket_or_file_refused);
    tcase_add_test(tc, socket_mode_from_config);
    tcase_add_test(tc, max_connections);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr;
    int failed;

    curl_global_init(CURL_GLOBAL_ALL);
    sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    curl_global_cleanup();
    return failed == 0 ? 0 : 1;
}
