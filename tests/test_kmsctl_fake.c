/*
 * tests/test_kmsctl_fake.c - kmsctl's handling of answers a real kmsd
 * never gives, from a scripted HTTP server on a Unix socket: a rewrap that
 * makes no progress, an error without a body, a multi-line message, an
 * error code this build does not know.  Every command against the real
 * kmsd (rewrap progress, dek list cursors, status, retire, config, bulk
 * revoke/destroy, audit) is tested in test_kmsctl_cli.c.
 *
 * The fake answers from canned data and records each request line and body
 * so the test can check what kmsctl sent.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "support/kmsctl_run.h"

static char dir[256], sock[300];
static int listen_fd = -1;
static pthread_t server;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static char *log_text; /* "METHOD TARGET BODY\n" per request */
static size_t log_len;

static void logf_(const char *method, const char *target, const char *body)
{
    char *line = NULL;

    if (asprintf(&line, "%s %s %s\n", method, target, body) < 0)
        return;
    pthread_mutex_lock(&mu);
    kr_append(&log_text, &log_len, line, strlen(line));
    pthread_mutex_unlock(&mu);
    free(line);
}

static int logged(const char *needle)
{
    int found;

    pthread_mutex_lock(&mu);
    found = log_text != NULL && strstr(log_text, needle) != NULL;
    pthread_mutex_unlock(&mu);
    return found;
}

/* The canned answer to one request; *reply malloc'ed. */
static int answer(const char *method, const char *target, const char *body, char **reply)
{
    (void)method;
    (void)body;
    if (strcmp(target, "/v1/keys/stuck/rewrap") == 0)
        return (void)!asprintf(reply, "{\"rewrapped\":0,\"remaining\":5}"), 200;
    if (strcmp(target, "/v1/keys/noerror") == 0)
        return (void)!asprintf(reply, "<html>oops</html>"), 500;
    if (strcmp(target, "/v1/keys/multiline") == 0)
        return (void)!asprintf(reply, "{\"error\":{\"code\":\"internal\",\"message\":\"line one\\nline "
                               "two\"}}"),
               500;
    if (strcmp(target, "/v1/keys/future") == 0)
        return (void)!asprintf(reply, "{\"error\":{\"code\":\"brand_new_code\",\"message\":\"m\"}}"), 409;
    return (void)!asprintf(reply, "{\"error\":{\"code\":\"not_found\",\"message\":\"no such route\"}}"),
           404;
}

/* Serve one connection: requests until the client closes it. */
static void serve(int fd)
{
    char buf[65536];
    size_t have = 0;

    for (;;) {
        char *end, method[16], target[4096], *reply = NULL, *head = NULL, *body;
        long clen = 0;
        ssize_t n;
        size_t head_len, need;
        int status;

        while ((end = memmem(buf, have, "\r\n\r\n", 4)) == NULL) {
            if (have == sizeof(buf) || (n = read(fd, buf + have, sizeof(buf) - have)) <= 0)
                return;
            have += (size_t)n;
        }
        head_len = (size_t)(end - buf) + 4;
        *end = '\0';
        if (sscanf(buf, "%15s %4095s", method, target) != 2)
            return;
        {
            char *cl = strcasestr(buf, "\r\nContent-Length:");
            if (cl != NULL)
                clen = strtol(cl + 17, NULL, 10);
        }
        need = head_len + (size_t)clen;
        while (have < need) {
            if ((n = read(fd, buf + have, sizeof(buf) - have)) <= 0)
                return;
            have += (size_t)n;
        }
        body = strndup(buf + head_len, (size_t)clen);
        logf_(method, target, body);
        status = answer(method, target, body, &reply);
        free(body);
        if (asprintf(&head,
                     "HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: "
                     "%zu\r\n\r\n",
                     status, strlen(reply)) < 0)
            return;
        if (write(fd, head, strlen(head)) < 0 || write(fd, reply, strlen(reply)) < 0) {
            free(head);
            free(reply);
            return;
        }
        free(head);
        free(reply);
        memmove(buf, buf + need, have - need);
        have -= need;
    }
}

static void *server_main(void *arg)
{
    (void)arg;
    for (;;) {
        int fd = accept(listen_fd, NULL, NULL);
        if (fd < 0)
            return NULL;
        serve(fd);
        close(fd);
    }
}

static void start(void)
{
    struct sockaddr_un sa;
    const char *tmp = getenv("TMPDIR");

    snprintf(dir, sizeof(dir), "%s/kmsctl-fake.XXXXXX", tmp ? tmp : "/tmp");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(sock, sizeof(sock), "%s/fake.sock", dir);
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    ck_assert_uint_lt(strlen(sock), sizeof(sa.sun_path));
    memcpy(sa.sun_path, sock, strlen(sock) + 1);
    listen_fd = socket(AF_UNIX, SOCK_STREAM, 0);
    ck_assert_int_ge(listen_fd, 0);
    ck_assert_int_eq(bind(listen_fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
    ck_assert_int_eq(listen(listen_fd, 8), 0);
    ck_assert_int_eq(pthread_create(&server, NULL, server_main, NULL), 0);
}

static void stop(void)
{
    shutdown(listen_fd, SHUT_RDWR);
    close(listen_fd);
    pthread_join(server, NULL);
    unlink(sock);
    rmdir(dir);
    free(log_text);
}

static int ctl(kr_result *r, const char *const *args)
{
    const char *argv[64];
    int n = 0;

    argv[n++] = KMSCTL_PATH;
    argv[n++] = "--socket";
    argv[n++] = sock;
    for (int i = 0; args[i] != NULL && n < 63; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    return kr_run(argv, NULL, NULL, r);
}
#define CTL(r, ...) ctl((r), (const char *const[]){__VA_ARGS__, NULL})

/* A rewrap reply with nothing rewrapped and DEKs remaining stops the loop
 * (a real kmsd reports such DEKs as failed and makes progress otherwise). */
START_TEST(rewrap_no_progress)
{
    kr_result r;

    CTL(&r, "key", "rewrap", "stuck", "--batch", "10");
    ck_assert_int_eq(r.status, 1);
    ck_assert_ptr_nonnull(strstr(r.err, "kmsctl: internal: rewrap of 'stuck' made no progress"));
    ck_assert(logged("POST /v1/keys/stuck/rewrap {\"batch\":10}"));
    kr_free(&r);
}
END_TEST

START_TEST(odd_answers)
{
    kr_result r;

    ck_assert_int_eq(CTL(&r, "key", "show", "noerror"), 1);
    ck_assert_str_eq(r.err, "kmsctl: internal: kmsd answered HTTP 500 without an error body\n");
    kr_free(&r);
    ck_assert_int_eq(CTL(&r, "key", "show", "multiline"), 1);
    ck_assert_str_eq(r.err, "kmsctl: internal: line one line two\n");
    kr_free(&r);
    /* an error code this build does not know is shown as kmsd spelled it */
    ck_assert_int_eq(CTL(&r, "key", "show", "future"), 1);
    ck_assert_str_eq(r.err, "kmsctl: brand_new_code: m\n");
    kr_free(&r);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("kmsctl_fake");
    TCase *tc = tcase_create("fake");
    SRunner *sr;
    int failed;

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, rewrap_no_progress);
    tcase_add_test(tc, odd_answers);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    /* the fake server is a thread of this process: no fork */
    srunner_set_fork_status(sr, CK_NOFORK);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
