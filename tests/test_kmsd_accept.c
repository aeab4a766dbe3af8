/*
 * tests/test_kmsd_accept.c - the real kmsd out of file descriptors.
 *
 * kmsd starts with RLIMIT_NOFILE at NOFILE (soft and hard, so it cannot
 * raise it) and idle clients on its Unix socket take every descriptor it
 * has left; more wait in the listen backlog.  accept(2) then fails with
 * EMFILE at every try, and what an operator would notice is checked:
 * kmsd pauses accepting instead of spinning on the listening socket (its
 * CPU time over a second stays small) and says so once, not once a try
 * (the warning is rate-limited to one per 10 s); once the idle clients
 * leave it serves again without a restart (a datakey, /v1/health), and
 * GET /metrics counts the pauses (p11kms_http_accept_pauses_total).
 *
 * The figures measured are printed on one line.  SQLite only (no _pg
 * variant: this is about kmsd's own descriptors, and a PostgreSQL pool
 * would hold a varying share of them).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

#define NOFILE       128        /* kmsd's descriptor limit */
#define EXTRA        64         /* clients beyond it: they wait in the listen backlog */
#define CPU_MAX      0.3        /* s of kmsd CPU allowed over the second measured */
#define WARNING      "accept: " /* http.c's warning, "accept: Too many open files (...)" */
#define WARN_SECONDS 10         /* the warning's rate limit */

static kh_kmsd K;

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};

    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* A connection to kmsd that sends nothing; -1 once the backlog is full. */
static int idle_client(void)
{
    struct sockaddr_un sun;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);

    ck_assert_int_ge(fd, 0);
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    ck_assert_uint_lt(strlen(K.sock), sizeof(sun.sun_path));
    memcpy(sun.sun_path, K.sock, strlen(K.sock) + 1);
    if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
        ck_assert_msg(errno == EAGAIN, "connect %s: %s", K.sock, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

static void start(void)
{
    struct rlimit rl;

    /* Our side holds NOFILE + EXTRA sockets at once. */
    ck_assert_int_eq(getrlimit(RLIMIT_NOFILE, &rl), 0);
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < NOFILE + EXTRA + 64) {
        ck_assert_msg(rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= NOFILE + EXTRA + 64,
                      "the test needs %d descriptors", NOFILE + EXTRA + 64);
        rl.rlim_cur = NOFILE + EXTRA + 64;
        ck_assert_int_eq(setrlimit(RLIMIT_NOFILE, &rl), 0);
    }
    /* Idle clients are not closed by kmsd's timeouts while the test lasts. */
    ck_assert_int_eq(
        kh_setup(&K, KMSD_PATH, "kmsd-accept", "request_timeout = 300\ntimeout = 300\n", NULL), 0);
    K.nofile = NOFILE;
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);

    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

START_TEST(exhausted_descriptors)
{
    int fds[NOFILE + EXTRA], n = 0, warnings;
    double t_warn = 0, t0, t1, cpu0, cpu1, cpu, until;
    long status = 0, pauses;
    json_t *j;
    kh_response r;

    j = ku_call(&K, "POST", "/v1/keys", "{\"name\":\"accept\"}", &status);
    ck_assert_int_eq(status, 201);
    json_decref(j);
    ck_assert_int_eq(kh_log_count(&K, WARNING), 0);

    /* More idle clients than kmsd has descriptors: it accepts until
     * accept(2) fails with EMFILE; the rest stay in the backlog. */
    while (n < NOFILE + EXTRA && (fds[n] = idle_client()) >= 0)
        n++;
    ck_assert_msg(n > NOFILE, "only %d connections before the backlog was full", n);

    /* Wait for kmsd to run out (its warning; 15 s at most: without one,
     * the CPU check below says why). */
    for (until = now_s() + 15; now_s() < until; sleep_s(0.02))
        if (kh_log_count(&K, WARNING) > 0) {
            t_warn = now_s();
            break;
        }
    sleep_s(0.3); /* both loops past their accepting */

    /* Out of descriptors, with clients waiting: kmsd does not spin. */
    t0 = now_s();
    cpu0 = kh_proc_cpu(K.pid);
    sleep_s(1.0);
    t1 = now_s();
    cpu1 = kh_proc_cpu(K.pid);
    ck_assert(cpu0 >= 0 && cpu1 >= 0);
    cpu = cpu1 - cpu0;
    ck_assert_msg(cpu < CPU_MAX,
                  "kmsd used %.2f s of CPU in %.2f s while out of descriptors (spinning on "
                  "accept?)",
                  cpu, t1 - t0);

    /* It said so, once per WARN_SECONDS at most. */
    warnings = kh_log_count(&K, WARNING);
    ck_assert_msg(t_warn > 0, "no \"%s\" warning in kmsd's log", WARNING);
    ck_assert_msg(warnings >= 1 && warnings <= 1 + (int)((now_s() - t_warn) / WARN_SECONDS),
                  "%d accept warnings in %.1f s", warnings, now_s() - t_warn);

    /* The idle clients leave: kmsd serves again, without a restart. */
    for (int i = 0; i < n; i++)
        close(fds[i]);
    for (until = now_s() + 30; now_s() < until; sleep_s(0.05)) {
        if (kh_request(K.sock, "GET", "/v1/health", NULL, 0, NULL, &r) == 0) {
            status = r.status;
            kh_response_free(&r);
            if (status == 200)
                break;
        }
    }
    ku_assert_healthy(&K);
    j = ku_call(&K, "POST", "/v1/keys/accept/datakeys", "{\"context\":{\"test\":\"accept\"}}",
                &status);
    ck_assert_int_eq(status, 201);
    ck_assert_ptr_nonnull(json_string_value(json_object_get(j, "dek_id")));
    ck_assert_ptr_nonnull(json_string_value(json_object_get(j, "plaintext")));
    json_decref(j);

    /* ... and counted its pauses. */
    ck_assert_int_eq(kh_request(K.sock, "GET", "/metrics", NULL, 0, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    pauses = kh_metric_value(r.body, "p11kms_http_accept_pauses_total");
    kh_response_free(&r);
    ck_assert_msg(pauses > 0, "p11kms_http_accept_pauses_total is %ld", pauses);
    ku_assert_healthy(&K);
    fprintf(stderr,
            "test_kmsd_accept: %d idle clients, kmsd limit %d: %.2f s of kmsd CPU in %.2f s "
            "while out of descriptors, %d warning(s), %ld accept pauses\n",
            n, NOFILE, cpu, t1 - t0, warnings, pauses);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_accept");
    TCase *tc = tcase_create("accept");

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, exhausted_descriptors);
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
