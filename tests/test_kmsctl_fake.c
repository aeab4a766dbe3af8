/*
 * tests/test_kmsctl_fake.c - kmsctl's client-side logic against a scripted
 * HTTP server on a Unix socket, for the routes kmsd does not serve yet:
 * batched rewrap with plain progress lines and a progress bar on a
 * terminal, cursor following in `dek list`, status, retire, config and
 * bulk bodies, and odd server answers (no error body, multi-line
 * messages).  (The audit commands run against a real kmsd in
 * test_kmsctl_cli.c.)
 *
 * The fake answers from canned data and records each request line and body
 * so the test can check what kmsctl sent.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <jansson.h>
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
static int rewrap_remaining;

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
    if (strcmp(method, "POST") == 0 && strcmp(target, "/v1/keys/big/rewrap") == 0) {
        json_t *b = json_loads(body, 0, NULL);
        int batch = (int)json_integer_value(json_object_get(b, "batch")), n;
        json_decref(b);
        n = batch < rewrap_remaining ? batch : rewrap_remaining;
        rewrap_remaining -= n;
        usleep(20000);
        return (void)!asprintf(reply, "{\"rewrapped\":%d,\"remaining\":%d}", n, rewrap_remaining), 200;
    }
    if (strcmp(target, "/v1/keys/stuck/rewrap") == 0)
        return (void)!asprintf(reply, "{\"rewrapped\":0,\"remaining\":5}"), 200;
    if (strncmp(target, "/v1/datakeys?key=paged", 22) == 0) {
        if (strstr(target, "cursor=c%2F2") != NULL)
            return (void)!asprintf(reply, "{\"datakeys\":[{\"dek_id\":\"33333333-3333-4333-8333-"
                                   "333333333333\",\"key\":\"paged\",\"version\":2,\"state\":"
                                   "\"revoked\",\"context\":{\"customer\":\"9\"},\"created\":"
                                   "\"2026-11-29T16:00:00Z\"}],\"next\":null}"),
                   200;
        return (void)!asprintf(reply,
                        "{\"datakeys\":[{\"dek_id\":\"11111111-1111-4111-8111-111111111111\","
                        "\"key\":\"paged\",\"version\":1,\"state\":\"active\",\"context\":{"
                        "\"customer\":\"7\",\"region\":\"eu\"},\"created\":\"2026-11-29T16:00:"
                        "00Z\"},{\"dek_id\":\"22222222-2222-4222-8222-222222222222\",\"key\":"
                        "\"paged\",\"version\":1,\"state\":\"active\",\"context\":{},\"created\":"
                        "\"2026-11-29T16:00:01Z\"}],\"next\":\"c/2\"}"),
               200;
    }
    if (strcmp(target, "/v1/status") == 0)
        return (void)!asprintf(reply, "{\"token\":{\"label\":\"p11kms-dev\",\"present\":true,\"slot\":3},"
                               "\"store\":{\"backend\":\"sqlite\"},\"keys\":2,\"datakeys\":{"
                               "\"active\":5,\"revoked\":1,\"destroyed\":0}}"),
               200;
    if (strcmp(method, "DELETE") == 0 && strcmp(target, "/v1/keys/k/versions/1") == 0)
        return (void)!asprintf(reply, "{\"name\":\"k\",\"version\":1,\"state\":\"destroyed\"}"), 200;
    if (strcmp(target, "/v1/keys/k/config") == 0)
        return (void)!asprintf(reply, "{\"name\":\"k\",\"state\":\"enabled\",\"latest_version\":2,"
                               "\"min_decrypt_version\":2,\"rotation_period\":\"90d\","
                               "\"versions\":[]}"),
               200;
    if (strcmp(target, "/v1/datakeys/destroy") == 0 || strcmp(target, "/v1/datakeys/revoke") == 0)
        return (void)!asprintf(reply, "{\"count\":3}"), 200;
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

START_TEST(rewrap_plain_progress)
{
    kr_result r;
    json_t *j;

    rewrap_remaining = 25;
    ck_assert_int_eq(CTL(&r, "key", "rewrap", "big", "--batch", "10"), 0);
    ck_assert_str_eq(r.out, "rewrapped 25 data keys of big onto its latest version\n");
    ck_assert_str_eq(r.err, "rewrap big: 10 rewrapped, 15 remaining\n"
                            "rewrap big: 20 rewrapped, 5 remaining\n"
                            "rewrap big: 25 rewrapped, 0 remaining\n");
    ck_assert(logged("POST /v1/keys/big/rewrap {\"batch\":10}"));
    kr_free(&r);

    rewrap_remaining = 1500;
    ck_assert_int_eq(CTL(&r, "--json", "key", "rewrap", "big"), 0); /* default batch 1000 */
    j = json_loads(r.out, 0, NULL);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "rewrapped")), 1500);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "remaining")), 0);
    ck_assert(logged("{\"batch\":1000}"));
    json_decref(j);
    kr_free(&r);

    CTL(&r, "key", "rewrap", "stuck");
    ck_assert_int_eq(r.status, 1);
    ck_assert_ptr_nonnull(strstr(r.err, "kmsctl: internal: rewrap of 'stuck' made no progress"));
    kr_free(&r);
}
END_TEST

START_TEST(rewrap_progress_bar_on_tty)
{
    kr_result r;
    const char *argv[] = {KMSCTL_PATH, "--socket", sock, "key", "rewrap",
                          "big",       "--batch",  "5",  NULL};

    rewrap_remaining = 20;
    ck_assert_int_eq(kr_run_pty(argv, NULL, NULL, &r), 0);
    /* redrawn in place with \r: bar, percentage, counts, rate, ETA */
    ck_assert_ptr_nonnull(strstr(r.out, "\r[#######"));
    ck_assert_ptr_nonnull(strstr(r.out, " 25%  5/20  "));
    ck_assert_ptr_nonnull(strstr(r.out, "100%  20/20  "));
    ck_assert_ptr_nonnull(strstr(r.out, "DEKs/s  ETA 0:00:0"));
    ck_assert_ptr_nonnull(strstr(r.out, "rewrapped 20 data keys of big"));
    ck_assert_ptr_null(strstr(r.out, "remaining\r\n"));
    kr_free(&r);
}
END_TEST

START_TEST(dek_list_follows_cursors)
{
    kr_result r;
    json_t *j;

    ck_assert_int_eq(CTL(&r, "--json", "dek", "list", "--key", "paged", "--state", "active"), 0);
    j = json_loads(r.out, 0, NULL);
    ck_assert_int_eq(json_array_size(json_object_get(j, "datakeys")), 3);
    ck_assert_ptr_null(json_object_get(j, "next"));
    json_decref(j);
    ck_assert(logged("GET /v1/datakeys?key=paged&state=active "));
    ck_assert(logged("GET /v1/datakeys?key=paged&state=active&cursor=c%2F2 "));
    kr_free(&r);

    ck_assert_int_eq(CTL(&r, "dek", "list", "--key", "paged"), 0);
    ck_assert(
        strncmp(r.out, "DEK_ID                                VERSION  STATE    CREATED", 60) == 0);
    ck_assert_ptr_nonnull(strstr(r.out, "customer=7,region=eu"));
    ck_assert_ptr_nonnull(strstr(r.out, "revoked"));
    ck_assert_int_eq(kr_lines(r.out), 4);
    kr_free(&r);
}
END_TEST

START_TEST(status_retire_config_bulk)
{
    kr_result r;

    ck_assert_int_eq(CTL(&r, "status"), 0);
    {
        /* one aligned "name  value" line per field; the longest name is
         * datakeys.destroyed (18 characters) */
        static const char *const want[][2] = {{"token.label", "p11kms-dev"},
                                              {"token.present", "true"},
                                              {"token.slot", "3"},
                                              {"store.backend", "sqlite"},
                                              {"keys", "2"},
                                              {"datakeys.revoked", "1"},
                                              {"datakeys.destroyed", "0"}};
        for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
            char line[64];
            snprintf(line, sizeof(line), "%-18s  %s\n", want[i][0], want[i][1]);
            ck_assert_msg(strstr(r.out, line) != NULL, "status lacks '%s': %s", line, r.out);
        }
    }
    kr_free(&r);

    ck_assert_int_eq(CTL(&r, "key", "retire", "k", "--version", "1"), 0);
    ck_assert_str_eq(r.out, "retired version 1 of key k: its token object is destroyed\n");
    kr_free(&r);

    ck_assert_int_eq(
        CTL(&r, "key", "config", "k", "--min-decrypt-version", "2", "--rotation-period", "90d"), 0);
    ck_assert(
        logged("POST /v1/keys/k/config {\"min_decrypt_version\":2,\"rotation_period\":\"90d\"}"));
    ck_assert_ptr_nonnull(strstr(r.out, "rotation_period      90d"));
    kr_free(&r);

    ck_assert_int_eq(CTL(&r, "dek", "destroy", "--key", "k", "-c", "customer=42", "--yes"), 0);
    ck_assert_str_eq(r.out, "destroyed 3 data keys of key k\n");
    ck_assert(
        logged("POST /v1/datakeys/destroy {\"key\":\"k\",\"context\":{\"customer\":\"42\"}}"));
    kr_free(&r);
    ck_assert_int_eq(CTL(&r, "dek", "revoke", "--key", "k", "-c", "customer=42"), 0);
    ck_assert(logged("POST /v1/datakeys/revoke {\"key\":\"k\",\"context\":{\"customer\":\"42\"},"
                     "\"reason\":\"unspecified\"}"));
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
    tcase_add_test(tc, rewrap_plain_progress);
    tcase_add_test(tc, rewrap_progress_bar_on_tty);
    tcase_add_test(tc, dek_list_follows_cursors);
    tcase_add_test(tc, status_retire_config_bulk);
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
