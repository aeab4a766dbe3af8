/*
 * tests/bench/http.c - kmsd over its Unix socket, and the load generator.
 *
 * The load generator is 32 (--clients) threads, each with its own HTTP/1.1
 * keep-alive connection on the Unix socket (plain sockets and a minimal
 * Content-Length response parser: cheaper than libcurl, so more of the two
 * cores is left to kmsd).  Every run is bounded in time, every request by
 * a 10 s socket timeout.  Each client keeps the DEK ids it was issued and
 * decrypts them (with its own context) in the decrypt run.
 *
 * bench_http: kmsd on SoftHSM2 (workers 32, sessions 32, as the shipped
 * kmsd.conf), datakeys then decrypts at 32 clients, latency quantiles of
 * the datakey run, kmsd's VmHWM afterwards.
 * bench_slow: kmsd whose module is libp11shim.so adding 2 ms to every token
 * call; datakey throughput at 32 clients / at 1 client.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "bench.h"
#include "kmsd_harness.h"

#define MAX_CLIENTS    256
#define CLIENT_IDS     50000 /* DEK ids kept per client */
#define CLIENT_SAMPLES 65536 /* latency samples kept per client */

typedef struct conn {
    int fd;
    char buf[8192];
    size_t have;
} conn;

typedef struct client {
    const char *sock;
    int index;
    int decrypt;
    double seconds;
    pthread_barrier_t *start;
    conn c;
    char (*ids)[40];
    size_t n_ids;
    float *lat_ms;
    size_t n_lat;
    unsigned long ok, errors;
    char first_error[160];
} client;

/* ---- a minimal HTTP/1.1 keep-alive client --------------------------------------- */

static int conn_open(conn *c, const char *sock)
{
    struct sockaddr_un sun;
    struct timeval tv = {10, 0};

    c->have = 0;
    c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0)
        return -1;
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", sock);
    setsockopt(c->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(c->fd, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
        close(c->fd);
        c->fd = -1;
        return -1;
    }
    return 0;
}

static void conn_close(conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    c->fd = -1;
    c->have = 0;
}

/* One request; *status and the body (NUL-terminated, truncated to cap) on
 * success.  Returns 0, or -1 (the connection is then closed). */
static int http_call(conn *c, const char *sock, const char *path, const char *body, int *status,
                     char *resp, size_t cap)
{
    char req[1024];
    int len, off = 0;
    char *end = NULL;
    size_t head_len = 0, clen = 0;
    int close_after = 0;

    if (c->fd < 0 && conn_open(c, sock) != 0)
        return -1;
    len = snprintf(req, sizeof(req),
                   "POST %s HTTP/1.1\r\nHost: kms\r\nContent-Type: application/json\r\n"
                   "Content-Length: %zu\r\n\r\n%s",
                   path, strlen(body), body);
    if (len < 0 || (size_t)len >= sizeof(req))
        return -1;
    while (off < len) {
        ssize_t n = send(c->fd, req + off, (size_t)(len - off), MSG_NOSIGNAL);
        if (n <= 0)
            goto fail;
        off += (int)n;
    }
    for (;;) { /* the head */
        c->buf[c->have] = '\0';
        end = strstr(c->buf, "\r\n\r\n");
        if (end != NULL)
            break;
        if (c->have + 1 >= sizeof(c->buf))
            goto fail;
        ssize_t n = recv(c->fd, c->buf + c->have, sizeof(c->buf) - 1 - c->have, 0);
        if (n <= 0)
            goto fail;
        c->have += (size_t)n;
    }
    head_len = (size_t)(end - c->buf) + 4;
    if (sscanf(c->buf, "HTTP/1.%*d %d", status) != 1)
        goto fail;
    for (char *p = c->buf; p < end; p++) {
        if ((p == c->buf || p[-1] == '\n') && strncasecmp(p, "Content-Length:", 15) == 0)
            clen = strtoul(p + 15, NULL, 10);
        else if ((p == c->buf || p[-1] == '\n') && strncasecmp(p, "Connection: close", 17) == 0)
            close_after = 1;
    }
    if (head_len + clen >= sizeof(c->buf))
        goto fail;
    while (c->have < head_len + clen) {
        ssize_t n = recv(c->fd, c->buf + c->have, sizeof(c->buf) - 1 - c->have, 0);
        if (n <= 0)
            goto fail;
        c->have += (size_t)n;
    }
    snprintf(resp, cap, "%.*s", (int)clen, c->buf + head_len);
    /* Keep what follows (nothing: one request in flight per connection). */
    memmove(c->buf, c->buf + head_len + clen, c->have - head_len - clen);
    c->have -= head_len + clen;
    if (close_after)
        conn_close(c);
    return 0;
fail:
    conn_close(c);
    return -1;
}

/* ---- the load ------------------------------------------------------------------ */

static void client_error(client *cl, const char *what)
{
    cl->errors++;
    if (cl->first_error[0] == '\0')
        snprintf(cl->first_error, sizeof(cl->first_error), "%s", what);
}

static void *client_main(void *arg)
{
    client *cl = arg;
    char body[96], path[128], resp[1024];
    double deadline, t0;
    unsigned long i;
    int status;

    snprintf(body, sizeof(body), "{\"context\":{\"tenant\":\"t%04d\"}}", cl->index);
    pthread_barrier_wait(cl->start);
    deadline = bench_now() + cl->seconds;
    for (i = 0;; i++) {
        t0 = bench_now();
        if (t0 >= deadline)
            break;
        if (cl->decrypt) {
            if (cl->n_ids == 0)
                break;
            snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", cl->ids[i % cl->n_ids]);
        } else {
            snprintf(path, sizeof(path), "/v1/keys/bench/datakeys");
        }
        if (http_call(&cl->c, cl->sock, path, body, &status, resp, sizeof(resp)) != 0) {
            client_error(cl, "no response (connection failed or timed out)");
            usleep(1000);
            continue;
        }
        if (status != (cl->decrypt ? 200 : 201)) {
            char what[160];
            snprintf(what, sizeof(what), "%d %.120s", status, resp);
            client_error(cl, what);
            continue;
        }
        if (cl->n_lat < CLIENT_SAMPLES)
            cl->lat_ms[cl->n_lat++] = (float)((bench_now() - t0) * 1e3);
        cl->ok++;
        if (!cl->decrypt && cl->n_ids < CLIENT_IDS) {
            const char *id = strstr(resp, "\"dek_id\":\"");
            if (id != NULL && strlen(id + 10) > 36 && id[10 + 36] == '"')
                memcpy(cl->ids[cl->n_ids++], id + 10, 36);
        }
    }
    return NULL;
}

typedef struct load_result {
    double ops_s;
    double p50_ms, p99_ms, max_ms;
    unsigned long ok, errors;
} load_result;

static int clients_new(client **out, int n, const char *sock)
{
    client *cl = calloc((size_t)n, sizeof(*cl));

    if (cl == NULL)
        return -1;
    for (int i = 0; i < n; i++) {
        cl[i].sock = sock;
        cl[i].index = i;
        cl[i].c.fd = -1;
        cl[i].ids = calloc(CLIENT_IDS, sizeof(*cl[i].ids));
        cl[i].lat_ms = calloc(CLIENT_SAMPLES, sizeof(float));
        if (cl[i].ids == NULL || cl[i].lat_ms == NULL) {
            *out = cl;
            return -1;
        }
    }
    *out = cl;
    return 0;
}

static void clients_free(client *cl, int n)
{
    for (int i = 0; cl != NULL && i < n; i++) {
        conn_close(&cl[i].c);
        free(cl[i].ids);
        free(cl[i].lat_ms);
    }
    free(cl);
}

/* Run the first n clients for `seconds`; 0 or -1. */
static int load_run(client *cl, int n, int decrypt, double seconds, load_result *r)
{
    pthread_t th[MAX_CLIENTS];
    pthread_barrier_t start;
    float *all = NULL;
    size_t n_all = 0;
    double t0;
    int rc = -1;

    memset(r, 0, sizeof(*r));
    pthread_barrier_init(&start, NULL, (unsigned)n + 1);
    for (int i = 0; i < n; i++) {
        cl[i].decrypt = decrypt;
        cl[i].seconds = seconds;
        cl[i].start = &start;
        cl[i].n_lat = 0;
        cl[i].ok = cl[i].errors = 0;
        cl[i].first_error[0] = '\0';
        pthread_create(&th[i], NULL, client_main, &cl[i]);
    }
    pthread_barrier_wait(&start);
    t0 = bench_now();
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    r->ops_s = 0;
    for (int i = 0; i < n; i++) {
        r->ok += cl[i].ok;
        r->errors += cl[i].errors;
        n_all += cl[i].n_lat;
        if (cl[i].first_error[0] != '\0')
            fprintf(stderr, "bench: client %d: %lu errors, first: %s\n", i, cl[i].errors,
                    cl[i].first_error);
    }
    r->ops_s = (double)r->ok / (bench_now() - t0);
    pthread_barrier_destroy(&start);
    all = malloc((n_all ? n_all : 1) * sizeof(float));
    if (all == NULL)
        goto out;
    n_all = 0;
    for (int i = 0; i < n; i++) {
        memcpy(all + n_all, cl[i].lat_ms, cl[i].n_lat * sizeof(float));
        n_all += cl[i].n_lat;
    }
    r->p50_ms = bench_quantile(all, n_all, 0.50);
    r->p99_ms = bench_quantile(all, n_all, 0.99);
    r->max_ms = bench_quantile(all, n_all, 1.0);
    rc = 0;
out:
    free(all);
    return rc;
}

static json_t *load_json(const load_result *r)
{
    json_t *j = json_object();

    bench_set(j, "ops_s", r->ops_s);
    bench_set(j, "p50_ms", r->p50_ms);
    bench_set(j, "p99_ms", r->p99_ms);
    bench_set(j, "max_ms", r->max_ms);
    json_object_set_new(j, "ok", json_integer((json_int_t)r->ok));
    json_object_set_new(j, "errors", json_integer((json_int_t)r->errors));
    return j;
}

/* ---- kmsd ---------------------------------------------------------------------- */

/* Set up and start kmsd on a new token with `module`; create key "bench". */
static int kmsd_start(kh_kmsd *k, const bench_opts *o, const char *label, const char *module)
{
    char conf[2048];
    kh_response r;
    int rc = -1;

    if (kh_setup(k, o->kmsd, label, NULL, NULL) != 0)
        goto out;
    /* The shipped kmsd.conf's [server] and [token] sizes. */
    snprintf(conf, sizeof(conf),
             "; kmsd.conf written by tests/bench/http.c\n"
             "[token]\nmodule = %s\nuri = %s\npin_file = pin\nsessions = 32\n"
             "[store]\nbackend = sqlite\npath = kms.db\n"
             "[listen]\nunix = kmsd.sock\n"
             "[server]\nthreads = 2\nworkers = 32\nqueue = 1024\n",
             module, k->tt.uri);
    if (kh_write_file(k->conf, conf, 0600) != 0 || kh_start(k) != 0)
        goto out;
    if (kh_request(k->sock, "POST", "/v1/keys", "{\"name\":\"bench\"}", 16, NULL, &r) != 0)
        goto out;
    if (r.status != 201)
        fprintf(stderr, "bench: POST /v1/keys: %ld %s\n", r.status, r.body);
    else
        rc = 0;
    kh_response_free(&r);
out:
    return rc;
}

int bench_http(const bench_opts *o, json_t *out)
{
    kh_kmsd k;
    client *cl = NULL;
    load_result warm, gen, dec;
    json_t *details = json_object();
    long hwm_kb;
    int rc = -1;

    memset(&k, 0, sizeof(k));
    if (kmsd_start(&k, o, "p11kms-bench-http", o->softhsm) != 0)
        goto out;
    if (clients_new(&cl, o->clients, k.sock) != 0)
        goto out;
    /* Warm up (connections, sessions, page cache), then measure. */
    if (load_run(cl, o->clients, 0, 1.0, &warm) != 0 ||
        load_run(cl, o->clients, 0, o->seconds, &gen) != 0 ||
        load_run(cl, o->clients, 1, o->seconds, &dec) != 0)
        goto out;
    fprintf(stderr,
            "bench: http %d clients: datakey %.0f ops/s (p50 %.2f ms, p99 %.2f ms, %lu errors), "
            "decrypt %.0f ops/s (p99 %.2f ms, %lu errors)\n",
            o->clients, gen.ops_s, gen.p50_ms, gen.p99_ms, gen.errors, dec.ops_s, dec.p99_ms,
            dec.errors);
    hwm_kb = kh_proc_kb(k.pid, "VmHWM");
    if (gen.ok == 0 || dec.ok == 0) {
        fprintf(stderr, "bench: http: no successful requests\n");
        goto out;
    }
    bench_set(out, "http_datakey_ops_s", gen.ops_s);
    bench_set(out, "http_decrypt_ops_s", dec.ops_s);
    bench_set(out, "http_datakey_p50_ms", gen.p50_ms);
    bench_set(out, "http_datakey_p99_ms", gen.p99_ms);
    if (hwm_kb > 0)
        bench_set(out, "kmsd_rss_mib_peak", (double)hwm_kb / 1024.0);
    json_object_set_new(details, "clients", json_integer(o->clients));
    json_object_set_new(details, "datakey", load_json(&gen));
    json_object_set_new(details, "decrypt", load_json(&dec));
    json_object_set_new(details, "errors", json_integer((json_int_t)(gen.errors + dec.errors)));
    json_object_set(out, "http_details", details);
    rc = 0;
out:
    json_decref(details);
    clients_free(cl, o->clients);
    if (k.pid > 0 && kh_stop(&k, SIGTERM) != 0)
        fprintf(stderr, "bench: kmsd did not stop cleanly\n");
    if (k.dir[0] != '\0')
        kh_teardown(&k);
    return rc;
}

int bench_slow(const bench_opts *o, json_t *out)
{
    kh_kmsd k;
    client *cl = NULL;
    load_result one, many;
    json_t *details = json_object();
    char delay[32];
    int rc = -1, started;

    memset(&k, 0, sizeof(k));
    /* kmsd inherits these: the shim forwards to SoftHSM2 after the delay. */
    snprintf(delay, sizeof(delay), "%d", o->slow_delay_us);
    setenv("P11SHIM_MODULE", o->softhsm, 1);
    setenv("P11SHIM_DELAY_US", delay, 1);
    started = kmsd_start(&k, o, "p11kms-bench-slow", o->shim);
    unsetenv("P11SHIM_MODULE");
    unsetenv("P11SHIM_DELAY_US");
    if (started != 0)
        goto out;
    if (clients_new(&cl, o->clients, k.sock) != 0)
        goto out;
    if (load_run(cl, 1, 0, 0.5, &one) != 0 || load_run(cl, 1, 0, o->seconds, &one) != 0 ||
        load_run(cl, o->clients, 0, o->seconds, &many) != 0)
        goto out;
    fprintf(stderr,
            "bench: slow token (%d us per call): 1 client %.0f ops/s, %d clients %.0f ops/s\n",
            o->slow_delay_us, one.ops_s, o->clients, many.ops_s);
    if (one.ok == 0 || many.ok == 0)
        goto out;
    bench_set(out, "slow_token_scaling", many.ops_s / one.ops_s);
    json_object_set_new(details, "delay_us", json_integer(o->slow_delay_us));
    json_object_set_new(details, "one_client", load_json(&one));
    json_object_set_new(details, "many_clients", load_json(&many));
    json_object_set(out, "slow_token_details", details);
    rc = 0;
out:
    json_decref(details);
    clients_free(cl, o->clients);
    if (k.pid > 0 && kh_stop(&k, SIGTERM) != 0)
        fprintf(stderr, "bench: kmsd (slow token) did not stop cleanly\n");
    if (k.dir[0] != '\0')
        kh_teardown(&k);
    return rc;
}

/* --socket A[,B...]: kmsd nodes someone else started (e.g. several nodes on
 * one PostgreSQL database); key "bench" is created if missing and the
 * clients are spread round-robin over the sockets. */
int bench_external(const bench_opts *o, json_t *out)
{
    char *list = strdup(o->sockets), *save = NULL, *tok;
    const char *socks[16];
    int n_socks = 0, rc = -1;
    client *cl = NULL;
    load_result warm, gen;
    kh_response r;

    for (tok = strtok_r(list, ",", &save); tok != NULL && n_socks < 16;
         tok = strtok_r(NULL, ",", &save))
        socks[n_socks++] = tok;
    if (n_socks == 0)
        goto out;
    if (kh_request(socks[0], "POST", "/v1/keys", "{\"name\":\"bench\"}", 16, NULL, &r) != 0)
        goto out;
    kh_response_free(&r);
    if (clients_new(&cl, o->clients, socks[0]) != 0)
        goto out;
    for (int i = 0; i < o->clients; i++)
        cl[i].sock = socks[i % n_socks];
    if (load_run(cl, o->clients, 0, 1.0, &warm) != 0 ||
        load_run(cl, o->clients, 0, o->seconds, &gen) != 0)
        goto out;
    fprintf(stderr, "bench: external, %d node(s), %d clients: datakey %.0f ops/s (p50 %.2f ms, "
                    "p99 %.2f ms, %lu errors)\n",
            n_socks, o->clients, gen.ops_s, gen.p50_ms, gen.p99_ms, gen.errors);
    bench_set(out, "external_datakey_ops_s", gen.ops_s);
    json_object_set_new(out, "external_details", load_json(&gen));
    json_object_set_new(out, "external_nodes", json_integer(n_socks));
    rc = gen.ok > 0 ? 0 : -1;
out:
    clients_free(cl, o->clients);
    free(list);
    return rc;
}
