/*
 * tests/test_kmsd_soak.c - the real kmsd over time and under slow clients.
 *
 * soak: for a bounded time (60 s; 30 s under sanitizers; 300 s with
 * P11KMS_TEST_LONG=1; P11KMS_SOAK_SECONDS overrides) keep-alive clients
 * and one-request-per-connection clients issue datakeys and decrypt them
 * again (the same bytes every time), while another sends the errors a real
 * fleet sends (unknown key and DEK, wrong context, bad JSON, an oversized
 * body, garbage, a request abandoned half-way or never read).  kmsd's RSS
 * (/proc/PID/status VmRSS) and open descriptors (/proc/PID/fd) are sampled
 * every second: after the clients leave, the descriptors are back to their
 * count before the load, and RSS grows by less than a few MiB from the
 * first half of the run to the second (after a warm-up quarter).  Every
 * answer must be the expected one.  One summary line gives the figures.
 *
 * slowloris: with request_timeout = 2 and max_connections = 400, an
 * attacker keeps 150 connections busy -- heads sent a byte at a time and
 * never finished, bodies trickled a byte at a time, connections that never
 * send anything -- and reopens each one kmsd closes.  Meanwhile legitimate
 * clients are served (every request succeeds), kmsd closes every attacking
 * connection within the request timeout (plus slack), and afterwards its
 * descriptors are back to the baseline.  (The cap is well above the
 * attack: the attacker reopens its connections in waves, faster than kmsd
 * tears the old ones down, so a cap just above 150 would be hit for a
 * moment and answer a legitimate client 503 overloaded.)  Then 460 silent
 * connections, over the cap: a legitimate request is answered 503
 * overloaded at once (not left hanging), the silent ones are closed within
 * the request timeout, and service is back.
 *
 * No timing assertion beyond generous liveness bounds (2 slow cores,
 * sanitizers).  SQLite only (no _pg variant: this is about kmsd itself).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

#define KEY           "soak"
#define KEEPALIVE     5 /* clients on one connection each */
#define SHORT         3 /* clients opening a connection per request */
#define RING          64
#define MAX_SAMPLES   4000
#define FD_SLACK      3   /* descriptors kmsd may hold beyond its baseline */
#define REQ_TIMEOUT_S 2   /* [server] request_timeout of the slowloris run */
#define CAP           400 /* [server] max_connections of the slowloris run */

#if defined(__SANITIZE_ADDRESS__)
#define SANITIZED 1
#else
#define SANITIZED 0
#endif

static kh_kmsd K;
static atomic_int stop_flag;

static double now_s(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static int soak_seconds(void)
{
    const char *e = getenv("P11KMS_SOAK_SECONDS"), *l = getenv("P11KMS_TEST_LONG");

    if (e != NULL && atoi(e) > 0)
        return atoi(e);
    if (l != NULL && strcmp(l, "1") == 0)
        return 300;
    return SANITIZED ? 30 : 60;
}

/* Open descriptors of kmsd. */
static int fd_count(pid_t pid)
{
    char path[64];
    DIR *d;
    struct dirent *e;
    int n = 0;

    snprintf(path, sizeof(path), "/proc/%d/fd", (int)pid);
    d = opendir(path);
    if (d == NULL)
        return -1;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* What kmsd's descriptors point to, for a failure message. */
static const char *fd_targets(void)
{
    static char out[4096];
    char dir[64], path[384], target[256];
    DIR *d;
    struct dirent *e;
    size_t used = 0;

    out[0] = '\0';
    snprintf(dir, sizeof(dir), "/proc/%d/fd", (int)K.pid);
    d = opendir(dir);
    if (d == NULL)
        return out;
    while ((e = readdir(d)) != NULL && used + 300 < sizeof(out)) {
        ssize_t n;
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
        n = readlink(path, target, sizeof(target) - 1);
        target[n > 0 ? n : 0] = '\0';
        used += (size_t)snprintf(out + used, sizeof(out) - used, " %s=%s", e->d_name, target);
    }
    closedir(d);
    return out;
}

/* Wait (up to timeout_s) for kmsd's descriptors to come down to at most
 * limit; returns the last count. */
static int fds_settle(int limit, double timeout_s)
{
    double t0 = now_s();
    int n;

    while ((n = fd_count(K.pid)) > limit && now_s() - t0 < timeout_s)
        usleep(100 * 1000);
    return n;
}

/* kmsd's descriptor count once it stops changing (up to 5 s). */
static int fds_stable(void)
{
    int a = fd_count(K.pid), b;

    for (int i = 0; i < 50; i++) {
        usleep(100 * 1000);
        b = fd_count(K.pid);
        if (a == b)
            return b;
        a = b;
    }
    return a;
}

static void start_kmsd(const char *server_extra)
{
#if SANITIZED
    /* ASan's quarantine (256 MB by default) would count as RSS growth. */
    const char *old = getenv("ASAN_OPTIONS");
    char opts[512];

    snprintf(opts, sizeof(opts), "%s%squarantine_size_mb=8", old != NULL ? old : "",
             old != NULL && *old != '\0' ? ":" : "");
    setenv("ASAN_OPTIONS", opts, 1);
#endif
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-soak", server_extra, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    {
        long status = 0;
        json_decref(ku_call(&K, "POST", "/v1/keys", "{\"name\":\"" KEY "\"}", &status));
        ck_assert_int_eq(status, 201);
    }
}

static void teardown(void)
{
    kh_teardown(&K);
}

/* ---- legitimate clients ------------------------------------------------- */

typedef struct dek {
    char id[40];
    char plain[48];
    char context[64];
} dek;

typedef struct client {
    pthread_t th;
    int index;
    int keepalive;
    long datakeys, decrypts, failures;
    double max_latency;
    char failure[200];
    dek ring[RING];
    int n_ring;
} client;

static void client_fail(client *c, const char *what, long status, const char *body)
{
    c->failures++;
    snprintf(c->failure, sizeof(c->failure), "%s: %ld %.120s", what, status,
             body != NULL ? body : "(no answer)");
}

static void *client_main(void *arg)
{
    client *c = arg;
    CURL *h = c->keepalive ? curl_easy_init() : NULL;
    char body[128], path[128];
    unsigned seed = (unsigned)c->index * 7919u + 1;

    for (long i = 0; !atomic_load(&stop_flag); i++) {
        kh_response r;
        double t0 = now_s(), dt;
        int decrypt = c->n_ring > 0 && rand_r(&seed) % 10 < 4;
        dek *d = decrypt ? &c->ring[rand_r(&seed) % (unsigned)c->n_ring] : NULL;
        int rc;

        if (decrypt) {
            snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", d->id);
            snprintf(body, sizeof(body), "{\"context\":%s}", d->context);
        } else {
            snprintf(path, sizeof(path), "/v1/keys/" KEY "/datakeys");
            snprintf(body, sizeof(body), "{\"context\":{\"client\":\"%d\",\"n\":\"%ld\"}}",
                     c->index, i);
        }
        rc = h != NULL ? kh_request_h(h, K.sock, "POST", path, body, strlen(body), NULL, &r)
                       : kh_request(K.sock, "POST", path, body, strlen(body), NULL, &r);
        dt = now_s() - t0;
        if (dt > c->max_latency)
            c->max_latency = dt;
        if (rc != 0) {
            client_fail(c, decrypt ? "decrypt" : "datakey", -1, NULL);
            continue;
        }
        json_t *j = json_loadb(r.body, r.len, 0, NULL);
        const char *plain = json_string_value(json_object_get(j, "plaintext"));
        const char *id = json_string_value(json_object_get(j, "dek_id"));
        if (decrypt) {
            if (r.status == 200 && plain != NULL && strcmp(plain, d->plain) == 0)
                c->decrypts++;
            else
                client_fail(c, "decrypt", r.status, r.body);
        } else if (r.status == 201 && plain != NULL && id != NULL) {
            dek *slot = &c->ring[c->n_ring < RING ? c->n_ring++ : rand_r(&seed) % RING];
            snprintf(slot->id, sizeof(slot->id), "%s", id);
            snprintf(slot->plain, sizeof(slot->plain), "%s", plain);
            snprintf(slot->context, sizeof(slot->context), "{\"client\":\"%d\",\"n\":\"%ld\"}",
                     c->index, i);
            c->datakeys++;
        } else {
            client_fail(c, "datakey", r.status, r.body);
        }
        json_decref(j);
        kh_response_free(&r);
    }
    if (h != NULL)
        curl_easy_cleanup(h);
    return NULL;
}

/* ---- a client that gets things wrong ------------------------------------ */

typedef struct misbehaver {
    pthread_t th;
    long answered, failures;
    char failure[200];
} misbehaver;

/* A raw exchange: the reply must start with want (NULL: any or none). */
static int raw_expect(const char *request, size_t len, const char *want)
{
    char *reply = NULL;
    int ok;

    if (kh_raw(K.sock, request, len, 10000, &reply) != 0)
        return 0;
    ok = want == NULL || strncmp(reply, want, strlen(want)) == 0;
    free(reply);
    return ok;
}

/* kmsd's socket address (the harness keeps the path short). */
static void sock_addr(struct sockaddr_un *sun)
{
    size_t n = strlen(K.sock);

    memset(sun, 0, sizeof(*sun));
    sun->sun_family = AF_UNIX;
    if (n < sizeof(sun->sun_path))
        memcpy(sun->sun_path, K.sock, n + 1);
}

/* Connect, send, and go away without reading (or half-way). */
static void hit_and_run(const char *data, size_t len)
{
    struct sockaddr_un sun;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return;
    sock_addr(&sun);
    if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == 0)
        (void)!send(fd, data, len, MSG_NOSIGNAL);
    close(fd);
}

static void *misbehaver_main(void *arg)
{
    misbehaver *m = arg;
    static char big[100 * 1024];
    const char *dek_id = "0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f";
    kh_response r;

    memset(big, 'a', sizeof(big));
    memcpy(big, "{\"context\":{\"a\":\"", 17);
    memcpy(big + sizeof(big) - 3, "\"}}", 3);
    for (int i = 0; !atomic_load(&stop_flag); i++) {
        static const struct {
            const char *method, *path, *body;
            long status;
            const char *code;
        } calls[] = {
            {"POST", "/v1/keys/nosuchkey/datakeys", "{}", 404, "\"key_not_found\""},
            {"GET", "/v1/datakeys/0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f", NULL, 404,
             "\"dek_not_found\""},
            {"POST", "/v1/keys/" KEY "/datakeys", "{\"context\":", 400, "\"bad_request\""},
            {"GET", "/v1/nowhere", NULL, 404, "\"not_found\""},
            {"DELETE", "/v1/keys", NULL, 405, "\"method_not_allowed\""},
        };
        int ok = 1;
        size_t k = (size_t)i % 9;

        (void)dek_id;
        if (k < sizeof(calls) / sizeof(calls[0])) {
            const char *b = calls[k].body;
            ok = kh_request(K.sock, calls[k].method, calls[k].path, b, b != NULL ? strlen(b) : 0,
                            NULL, &r) == 0;
            if (ok) {
                ok = r.status == calls[k].status && strstr(r.body, calls[k].code) != NULL;
                if (!ok)
                    snprintf(m->failure, sizeof(m->failure), "%s %s: %ld %.100s", calls[k].method,
                             calls[k].path, r.status, r.body);
                kh_response_free(&r);
            }
        } else if (k == 5) {
            ok = kh_request(K.sock, "POST", "/v1/keys/" KEY "/datakeys", big, sizeof(big), NULL,
                            &r) == 0;
            if (ok) {
                ok = r.status == 413 && strstr(r.body, "\"payload_too_large\"") != NULL;
                kh_response_free(&r);
            }
        } else if (k == 6) {
            ok = raw_expect("GARBAGE\r\n\r\n", 11, "HTTP/1.1 400");
        } else if (k == 7) {
            static const char half[] = "POST /v1/keys/" KEY "/datakeys HTTP/1.1\r\nHost: k\r\n"
                                       "Content-Le";
            hit_and_run(half, sizeof(half) - 1); /* abandoned half-way */
        } else {
            static const char req[] = "POST /v1/keys/" KEY "/datakeys HTTP/1.1\r\nHost: k\r\n"
                                      "Content-Length: 2\r\n\r\n{}";
            hit_and_run(req, sizeof(req) - 1); /* a DEK issued to nobody */
        }
        if (ok) {
            m->answered++;
        } else {
            m->failures++;
            if (m->failure[0] == '\0')
                snprintf(m->failure, sizeof(m->failure), "misbehaviour %zu", k);
        }
        usleep(5000);
    }
    return NULL;
}

/* ---- the soak ----------------------------------------------------------- */

typedef struct sample {
    double t;
    long rss_kb;
    int fds;
} sample;

static sample samples[MAX_SAMPLES];

/* Run the legitimate clients (and the misbehaver) until stop_flag. */
typedef struct fleet {
    client c[KEEPALIVE + SHORT];
    misbehaver m;
    int with_misbehaver;
} fleet;

static void fleet_start(fleet *f, int with_misbehaver)
{
    memset(f, 0, sizeof(*f));
    atomic_store(&stop_flag, 0);
    for (int i = 0; i < KEEPALIVE + SHORT; i++) {
        f->c[i].index = i;
        f->c[i].keepalive = i < KEEPALIVE;
        ck_assert_int_eq(pthread_create(&f->c[i].th, NULL, client_main, &f->c[i]), 0);
    }
    f->with_misbehaver = with_misbehaver;
    if (with_misbehaver)
        ck_assert_int_eq(pthread_create(&f->m.th, NULL, misbehaver_main, &f->m), 0);
}

/* Stop, join, assert every answer was the expected one; totals. */
static void fleet_stop(fleet *f, long *datakeys, long *decrypts, long *errors, double *max_latency)
{
    atomic_store(&stop_flag, 1);
    *datakeys = *decrypts = *errors = 0;
    *max_latency = 0;
    for (int i = 0; i < KEEPALIVE + SHORT; i++) {
        pthread_join(f->c[i].th, NULL);
        ck_assert_msg(f->c[i].failures == 0, "client %d (%s): %ld failures, last: %s", i,
                      f->c[i].keepalive ? "keep-alive" : "short", f->c[i].failures,
                      f->c[i].failure);
        ck_assert_msg(f->c[i].datakeys > 0 && f->c[i].decrypts > 0, "client %d made no progress",
                      i);
        *datakeys += f->c[i].datakeys;
        *decrypts += f->c[i].decrypts;
        if (f->c[i].max_latency > *max_latency)
            *max_latency = f->c[i].max_latency;
    }
    if (f->with_misbehaver) {
        pthread_join(f->m.th, NULL);
        ck_assert_msg(f->m.failures == 0, "misbehaving client: %ld unexpected answers, last: %s",
                      f->m.failures, f->m.failure);
        ck_assert_int_gt(f->m.answered, 0);
        *errors = f->m.answered;
    }
}

static long max_rss(int from, int to)
{
    long m = 0;

    for (int i = from; i < to; i++)
        if (samples[i].rss_kb > m)
            m = samples[i].rss_kb;
    return m;
}

START_TEST(soak)
{
    fleet f;
    int seconds = soak_seconds(), n = 0, base_fds, after_fds, peak_fds = 0, q1, half;
    long datakeys, decrypts, errors, first_half, second_half, peak_rss;
    long growth_limit_kb = (SANITIZED ? 48 : 24) * 1024;
    double t0, max_latency;

    start_kmsd("timeout = 10\nrequest_timeout = 5\nmax_connections = 256\n");
    /* A short warm-up so the baseline has its token sessions and
     * connections; then no client is left connected. */
    fleet_start(&f, 0);
    sleep(2);
    fleet_stop(&f, &datakeys, &decrypts, &errors, &max_latency);
    base_fds = fds_settle(0, 1.0); /* the keep-alive connections closing */
    base_fds = fds_stable();
    ck_assert_int_gt(base_fds, 0);

    fleet_start(&f, 1);
    t0 = now_s();
    while (now_s() - t0 < seconds && n < MAX_SAMPLES) {
        usleep(1000 * 1000);
        samples[n].t = now_s() - t0;
        samples[n].rss_kb = kh_proc_kb(K.pid, "VmRSS");
        samples[n].fds = fd_count(K.pid);
        ck_assert_msg(samples[n].rss_kb > 0 && samples[n].fds > 0, "kmsd is gone");
        if (samples[n].fds > peak_fds)
            peak_fds = samples[n].fds;
        n++;
    }
    fleet_stop(&f, &datakeys, &decrypts, &errors, &max_latency);
    after_fds = fds_settle(base_fds, 15.0);
    ku_assert_healthy(&K);

    /* Warm-up quarter ignored; the rest in two halves. */
    q1 = n / 4;
    half = q1 + (n - q1) / 2;
    first_half = max_rss(q1, half);
    second_half = max_rss(half, n);
    peak_rss = max_rss(0, n);
    fprintf(stderr,
            "soak: %d s, %d clients (%d keep-alive, %d short, 1 misbehaving), %ld requests "
            "(%ld datakeys, %ld decrypts, %ld expected errors), %.0f req/s, slowest %.2f s; "
            "kmsd RSS %ld kB after warm-up, peak %ld kB, second-half growth %ld kB; "
            "fds baseline %d, peak %d, after %d\n",
            seconds, KEEPALIVE + SHORT + 1, KEEPALIVE, SHORT, datakeys + decrypts + errors,
            datakeys, decrypts, errors, (double)(datakeys + decrypts + errors) / seconds,
            max_latency, samples[q1].rss_kb, peak_rss, second_half - first_half, base_fds, peak_fds,
            after_fds);
    ck_assert_msg(after_fds <= base_fds + FD_SLACK, "kmsd holds %d descriptors, %d before:%s",
                  after_fds, base_fds, fd_targets());
    ck_assert_msg(second_half - first_half < growth_limit_kb,
                  "kmsd's RSS grew by %ld kB from the first half of the run to the second",
                  second_half - first_half);
    ck_assert_msg(max_latency < 30, "a request took %.1f s", max_latency);
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
}
END_TEST

/* ---- slowloris ---------------------------------------------------------- */

enum attack_kind { A_HEAD, A_BODY, A_IDLE, A_KINDS };

typedef struct attacker {
    pthread_t th;
    int n[A_KINDS];       /* connections of each kind kept open */
    long closed[A_KINDS]; /* closed by kmsd */
    double max_life[A_KINDS];
    long opened;
    int open_failures;
} attacker;

typedef struct slow_conn {
    int fd;
    enum attack_kind kind;
    double opened, next;
    size_t sent;
} slow_conn;

static int connect_nb(void)
{
    struct sockaddr_un sun;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

    if (fd < 0)
        return -1;
    sock_addr(&sun);
    if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
        close(fd);
        return -1;
    }
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void slow_open(attacker *a, slow_conn *s)
{
    static const char body_head[] = "POST /v1/keys/" KEY "/datakeys HTTP/1.1\r\nHost: k\r\n"
                                    "Content-Length: 1000\r\n\r\n{";

    s->fd = connect_nb();
    s->opened = now_s();
    s->next = s->opened;
    s->sent = 0;
    if (s->fd < 0) {
        a->open_failures++;
        return;
    }
    a->opened++;
    if (s->kind == A_BODY)
        (void)!send(s->fd, body_head, sizeof(body_head) - 1, MSG_NOSIGNAL);
}

/* The next byte of a head that never ends, or of a body. */
static void slow_byte(slow_conn *s)
{
    static const char head[] = "GET /v1/health HTTP/1.1\r\nHost: k\r\nX-Slow: ";
    char b = s->kind == A_BODY ? ' ' : s->sent < sizeof(head) - 1 ? head[s->sent] : 'a';

    if (send(s->fd, &b, 1, MSG_NOSIGNAL) == 1)
        s->sent++;
}

static void *attacker_main(void *arg)
{
    attacker *a = arg;
    int total = a->n[A_HEAD] + a->n[A_BODY] + a->n[A_IDLE], k = 0;
    slow_conn *conns = calloc((size_t)total, sizeof(*conns));
    struct pollfd *pfd = calloc((size_t)total, sizeof(*pfd));
    char buf[4096];

    if (conns == NULL || pfd == NULL)
        goto out;
    for (int kind = 0; kind < A_KINDS; kind++)
        for (int i = 0; i < a->n[kind]; i++, k++) {
            conns[k].kind = (enum attack_kind)kind;
            slow_open(a, &conns[k]);
        }
    while (!atomic_load(&stop_flag)) {
        double now;

        for (int i = 0; i < total; i++) {
            pfd[i].fd = conns[i].fd;
            pfd[i].events = POLLIN;
            pfd[i].revents = 0;
        }
        poll(pfd, (nfds_t)total, 50);
        now = now_s();
        for (int i = 0; i < total; i++) {
            slow_conn *s = &conns[i];
            if (s->fd < 0) {
                slow_open(a, s);
                continue;
            }
            if (pfd[i].revents != 0) {
                ssize_t r = recv(s->fd, buf, sizeof(buf), 0);
                if (r == 0 || (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)) {
                    a->closed[s->kind]++;
                    if (now - s->opened > a->max_life[s->kind])
                        a->max_life[s->kind] = now - s->opened;
                    close(s->fd);
                    slow_open(a, s); /* a persistent attacker */
                    continue;
                }
            }
            if (s->kind != A_IDLE && now >= s->next) {
                slow_byte(s);
                s->next = now + 0.3;
            }
        }
    }
out:
    for (int i = 0; conns != NULL && i < total; i++)
        if (conns[i].fd >= 0)
            close(conns[i].fd);
    free(conns);
    free(pfd);
    return NULL;
}

/* A metric's value from /metrics (-1 when absent). */
static double metric(const char *name)
{
    kh_response r;
    char pat[128];
    const char *p;
    double v = -1;

    ck_assert_int_eq(kh_request(K.sock, "GET", "/metrics", NULL, 0, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    snprintf(pat, sizeof(pat), "\n%s ", name);
    p = strstr(r.body, pat);
    if (p != NULL)
        v = strtod(p + strlen(pat), NULL);
    kh_response_free(&r);
    return v;
}

START_TEST(slowloris)
{
    static const char *const kinds[] = {"head a byte at a time", "body a byte at a time", "silent"};
    static const char health_req[] = "GET /v1/health HTTP/1.1\r\nHost: k\r\n\r\n";
    attacker a;
    fleet f;
    int base_fds, after_fds, idle[CAP + 60], n_idle = CAP + 60, closed = 0;
    long datakeys, decrypts, errors;
    double t0, max_latency, timeouts;
    char *reply = NULL;

    start_kmsd("timeout = 5\nrequest_timeout = 2\nmax_connections = 400\n");
    base_fds = fds_stable();

    /* 150 attacking connections and the legitimate clients, for 15 s. */
    memset(&a, 0, sizeof(a));
    a.n[A_HEAD] = 100;
    a.n[A_BODY] = 20;
    a.n[A_IDLE] = 30;
    atomic_store(&stop_flag, 0);
    ck_assert_int_eq(pthread_create(&a.th, NULL, attacker_main, &a), 0);
    sleep(1);
    fleet_start(&f, 0);
    t0 = now_s();
    while (now_s() - t0 < (SANITIZED ? 12 : 15))
        usleep(200 * 1000);
    fleet_stop(&f, &datakeys, &decrypts, &errors, &max_latency);
    pthread_join(a.th, NULL);
    for (int k = 0; k < A_KINDS; k++) {
        fprintf(stderr,
                "slowloris: %ld connections (%s) closed by kmsd, the longest after %.2f s\n",
                a.closed[k], kinds[k], a.max_life[k]);
        ck_assert_msg(a.closed[k] > 0, "kmsd closed no connection sending its %s", kinds[k]);
        ck_assert_msg(a.max_life[k] < REQ_TIMEOUT_S + 4, "a connection (%s) lived %.1f s", kinds[k],
                      a.max_life[k]);
    }
    timeouts = metric("p11kms_http_request_timeouts_total");
    fprintf(stderr,
            "slowloris: %ld attacking connections opened; meanwhile %ld datakeys and %ld "
            "decrypts served, slowest %.2f s; p11kms_http_request_timeouts_total %.0f\n",
            a.opened, datakeys, decrypts, max_latency, timeouts);
    ck_assert_int_eq(a.open_failures, 0);
    ck_assert_msg(max_latency < 10, "a legitimate request took %.1f s", max_latency);
    ck_assert_double_gt(timeouts, 0);
    after_fds = fds_settle(base_fds, 15.0);
    ck_assert_msg(after_fds <= base_fds + FD_SLACK, "kmsd holds %d descriptors, %d before:%s",
                  after_fds, base_fds, fd_targets());

    /* Over the cap: silent connections fill it; a legitimate request is
     * refused at once, and the silent ones are closed in request_timeout. */
    for (int i = 0; i < n_idle; i++) {
        idle[i] = connect_nb();
        ck_assert_int_ge(idle[i], 0);
    }
    usleep(500 * 1000);
    ck_assert_int_eq(kh_raw(K.sock, health_req, strlen(health_req), 10000, &reply), 0);
    ck_assert_msg(strncmp(reply, "HTTP/1.1 503", 12) == 0 && strstr(reply, "\"overloaded\""),
                  "over the cap: %.200s", reply);
    free(reply);
    t0 = now_s();
    while (closed < n_idle && now_s() - t0 < REQ_TIMEOUT_S + 8) {
        for (int i = 0; i < n_idle; i++) {
            char b;
            if (idle[i] >= 0 && recv(idle[i], &b, 1, 0) == 0) {
                close(idle[i]);
                idle[i] = -1;
                closed++;
            }
        }
        usleep(50 * 1000);
    }
    fprintf(stderr,
            "slowloris: %d silent connections over the cap of %d: all closed by kmsd "
            "within %.1f s\n",
            n_idle, CAP, now_s() - t0);
    for (int i = 0; i < n_idle; i++)
        if (idle[i] >= 0)
            close(idle[i]);
    ck_assert_int_eq(closed, n_idle);
    ku_assert_healthy(&K);
    after_fds = fds_settle(base_fds, 15.0);
    ck_assert_msg(after_fds <= base_fds + FD_SLACK, "kmsd holds %d descriptors, %d before:%s",
                  after_fds, base_fds, fd_targets());
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_soak");
    TCase *tc = tcase_create("soak");

    tcase_add_checked_fixture(tc, NULL, teardown);
    tcase_set_timeout(tc, soak_seconds() + 300);
    tcase_add_test(tc, soak);
    tcase_add_test(tc, slowloris);
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
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
