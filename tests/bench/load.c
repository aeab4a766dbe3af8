/*
 * tests/bench/load.c - the HTTP load generator of p11kms_bench, shared by
 * kmsd's runs (http.c) and the raw HTTP ceiling (ceiling.c).
 *
 * 32 (--clients) threads, each with its own HTTP/1.1 keep-alive connection
 * on a Unix socket (plain sockets and a minimal Content-Length response
 * parser: cheaper than libcurl, so more of the two cores is left to the
 * server).  Datakey runs POST /v1/keys/bench/datakeys and expect 201; each
 * client keeps the DEK ids it was issued and decrypts them (with its own
 * context, POST /v1/datakeys/{id}/decrypt, 200) in a decrypt run.  Every
 * run is bounded in time, every request by a 10 s socket timeout.
 *
 * A run also measures CPU over its window (from the clients' start to the
 * last one's end): this process's (getrusage: the clients, plus whatever
 * else runs in the process, e.g. an in-process server) and, given its pid,
 * the server process's (bench_cpu_pid).  Each client thread belongs to
 * one run; the bench_load (connections, ids, samples) lives across runs.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include "bench.h"

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

struct bench_load {
    client *cl;
    int n;
};

void bench_load_free(bench_load *l)
{
    for (int i = 0; l != NULL && l->cl != NULL && i < l->n; i++) {
        conn_close(&l->cl[i].c);
        free(l->cl[i].ids);
        free(l->cl[i].lat_ms);
    }
    if (l != NULL)
        free(l->cl);
    free(l);
}

int bench_load_new(const char *const *socks, int n_socks, int clients, bench_load **out)
{
    bench_load *l = NULL;
    int rc = -1;

    if (n_socks < 1 || clients < 1 || clients > MAX_CLIENTS)
        goto out;
    if ((l = calloc(1, sizeof(*l))) == NULL ||
        (l->cl = calloc((size_t)clients, sizeof(*l->cl))) == NULL)
        goto out;
    l->n = clients;
    for (int i = 0; i < clients; i++) {
        client *cl = &l->cl[i];
        cl->sock = socks[i % n_socks];
        cl->index = i;
        cl->c.fd = -1;
        cl->ids = calloc(CLIENT_IDS, sizeof(*cl->ids));
        cl->lat_ms = calloc(CLIENT_SAMPLES, sizeof(float));
        if (cl->ids == NULL || cl->lat_ms == NULL)
            goto out;
    }
    *out = l;
    l = NULL;
    rc = 0;
out:
    bench_load_free(l);
    return rc;
}

int bench_load_run(bench_load *l, int n, int decrypt, double seconds, pid_t server,
                   bench_load_result *r)
{
    pthread_t th[MAX_CLIENTS];
    pthread_barrier_t start;
    client *cl = l->cl;
    float *all = NULL;
    size_t n_all = 0;
    double t0, self0, server0 = -1, server1 = -1, elapsed;
    bench_threads threads0, threads1;
    int have_threads = 0;
    int rc = -1;

    memset(r, 0, sizeof(*r));
    if (n < 1 || n > l->n)
        goto out;
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
    self0 = bench_cpu_self();
    if (server > 0) {
        server0 = bench_cpu_pid(server);
        have_threads = bench_threads_read(server, &threads0) == 0;
    }
    for (int i = 0; i < n; i++)
        pthread_join(th[i], NULL);
    elapsed = bench_now() - t0;
    r->cpu_self_s = bench_cpu_self() - self0;
    if (server0 >= 0)
        server1 = bench_cpu_pid(server);
    if (have_threads && bench_threads_read(server, &threads1) == 0)
        bench_threads_diff(&threads0, &threads1, &r->server_threads);
    r->cpu_server_s = server0 >= 0 && server1 >= 0 ? server1 - server0 : -1;
    for (int i = 0; i < n; i++) {
        r->ok += cl[i].ok;
        r->errors += cl[i].errors;
        n_all += cl[i].n_lat;
        if (cl[i].first_error[0] != '\0')
            fprintf(stderr, "bench: client %d: %lu errors, first: %s\n", i, cl[i].errors,
                    cl[i].first_error);
    }
    r->ops_s = (double)r->ok / elapsed;
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

json_t *bench_load_json(const bench_load_result *r)
{
    json_t *j = json_object();

    bench_set(j, "ops_s", r->ops_s);
    bench_set(j, "p50_ms", r->p50_ms);
    bench_set(j, "p99_ms", r->p99_ms);
    bench_set(j, "max_ms", r->max_ms);
    json_object_set_new(j, "ok", json_integer((json_int_t)r->ok));
    json_object_set_new(j, "errors", json_integer((json_int_t)r->errors));
    if (r->ok > 0) {
        bench_set(j, "self_cpu_us", r->cpu_self_s * 1e6 / (double)r->ok);
        if (r->cpu_server_s >= 0)
            bench_set(j, "server_cpu_us", r->cpu_server_s * 1e6 / (double)r->ok);
        if (r->server_threads.n > 0) {
            json_t *threads = json_object();

            for (int i = 0; i < r->server_threads.n; i++) {
                json_t *g = json_object();

                bench_set(g, "user_us", r->server_threads.g[i].user_s * 1e6 / (double)r->ok);
                bench_set(g, "sys_us", r->server_threads.g[i].sys_s * 1e6 / (double)r->ok);
                json_object_set_new(threads, r->server_threads.g[i].name, g);
            }
            json_object_set_new(j, "server_threads", threads);
        }
    }
    return j;
}
