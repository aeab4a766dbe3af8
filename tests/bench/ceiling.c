/*
 * tests/bench/ceiling.c - the raw HTTP ceiling: what one HTTP/JSON
 * exchange costs on this machine, with no KMS behind it.
 *
 * An in-process libevent server shaped like kmsd's front end: as many
 * event loops as kmsd runs by default (BENCH_KMSD_LOOPS), each its own
 * event_base (epoll changelist, as kmsd) and evhttp accepting through its
 * own evconnlistener on one shared listening Unix socket (in the bench's
 * tmpdir).  It answers POST /v1/keys/<name>/datakeys: the body is parsed
 * with json_loadb and must be an object, the reply is built with jansson
 * and rendered with json_dumps, 201 application/json with kmsd's datakey
 * fields and byte size (dek_id, key, version, plaintext; the UUID and the
 * base64 of 32 random bytes are made once at start).  No token, no store,
 * no audit, no framing filter, no policy: the per-request work is the
 * HTTP and JSON framing alone.
 *
 * The load generator of load.c drives it (the same 32 keep-alive clients
 * and request bodies as kmsd's runs), 1 s warm-up then --seconds:
 * raw_http_ops_s, and raw_http_cpu_us = getrusage of the whole process
 * (server loops and clients together) over the measured window per reply.
 * bench.c derives cpu_bound_*_ops_s from it.
 *
 * Threads: the loops own their event_base, evhttp and listener; the
 * caller's thread only starts them and, at the end, activates each loop's
 * `stop` event (libevent's pthreads locking is enabled for that, as kmsd
 * does; an activated event is not lost if its loop has not started yet,
 * where an event_base_loopbreak would be) and joins them before freeing
 * anything.  The reply strings are written
 * before the loops start and only read afterwards.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/listener.h>
#include <event2/thread.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "bench.h"

#define CEILING_NAME_MAX 64 /* key names: [a-z0-9][a-z0-9._-]{0,63} */

typedef struct ceiling_server ceiling_server;

typedef struct ceiling_loop {
    const ceiling_server *srv;
    struct event_base *base;
    struct evhttp *http; /* owns the listener once bound */
    struct event *stop;  /* activated by server_free: the loop breaks */
    pthread_t thread;
    int started;
} ceiling_loop;

struct ceiling_server {
    int fd;
    char sock[320];
    char dek_id[37];    /* a UUIDv7-shaped id, as kmsd issues */
    char plaintext[45]; /* base64 of 32 bytes, as kmsd's datakey reply */
    ceiling_loop loops[BENCH_KMSD_LOOPS];
};

/* evbuffer_add_reference cleanup: the json_dumps text. */
static void free_text(const void *data, size_t len, void *arg)
{
    (void)len;
    (void)arg;
    free((void *)(uintptr_t)data);
}

/* name <- <name> of /v1/keys/<name>/datakeys; 0, or -1 if path is not one. */
static int datakey_path(const char *path, char name[CEILING_NAME_MAX + 1])
{
    static const char prefix[] = "/v1/keys/", suffix[] = "/datakeys";
    size_t len, n;

    if (path == NULL || strncmp(path, prefix, sizeof(prefix) - 1) != 0)
        return -1;
    path += sizeof(prefix) - 1;
    len = strlen(path);
    if (len <= sizeof(suffix) - 1 || strcmp(path + len - (sizeof(suffix) - 1), suffix) != 0)
        return -1;
    n = len - (sizeof(suffix) - 1);
    if (n > CEILING_NAME_MAX || memchr(path, '/', n) != NULL)
        return -1;
    memcpy(name, path, n);
    name[n] = '\0';
    return 0;
}

static void on_request(struct evhttp_request *req, void *arg)
{
    const ceiling_server *srv = arg;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    struct evbuffer *in = evhttp_request_get_input_buffer(req), *buf = NULL;
    size_t len = evbuffer_get_length(in);
    char name[CEILING_NAME_MAX + 1];
    json_t *body = NULL, *reply = NULL, *context;
    json_error_t jerr;
    char *text = NULL;
    int status = 404;

    if (evhttp_request_get_command(req) != EVHTTP_REQ_POST || uri == NULL ||
        datakey_path(evhttp_uri_get_path(uri), name) != 0)
        goto out;
    status = 400;
    if (len > 0)
        body =
            json_loadb((const char *)evbuffer_pullup(in, -1), len, JSON_REJECT_DUPLICATES, &jerr);
    context = json_object_get(body, "context");
    if (!json_is_object(body) || (context != NULL && !json_is_object(context)))
        goto out;
    status = 500;
    reply = json_pack("{s:s,s:s,s:I,s:s}", "dek_id", srv->dek_id, "key", name, "version",
                      (json_int_t)1, "plaintext", srv->plaintext);
    if (reply == NULL || (text = json_dumps(reply, JSON_COMPACT)) == NULL ||
        (buf = evbuffer_new()) == NULL ||
        evbuffer_add_reference(buf, text, strlen(text), free_text, NULL) != 0)
        goto out;
    text = NULL; /* buf owns it now */
    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type", "application/json");
    evhttp_send_reply(req, 201, NULL, buf);
    status = 0;
out:
    if (status != 0)
        evhttp_send_error(req, status, NULL);
    if (buf != NULL)
        evbuffer_free(buf);
    free(text);
    json_decref(reply);
    json_decref(body);
}

static void on_stop(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    event_base_loopbreak(arg);
}

static void *loop_main(void *arg)
{
    ceiling_loop *lp = arg;

    event_base_loop(lp->base, EVLOOP_NO_EXIT_ON_EMPTY);
    return NULL;
}

/* One loop on the shared listening socket (as kms/server/http.c). */
static int loop_init(ceiling_server *srv, ceiling_loop *lp)
{
    struct event_config *cfg = event_config_new();
    struct evconnlistener *listener = NULL;
    int rc = -1;

    lp->srv = srv;
    if (cfg == NULL)
        goto out;
    event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    if ((lp->base = event_base_new_with_config(cfg)) == NULL ||
        (lp->stop = event_new(lp->base, -1, 0, on_stop, lp->base)) == NULL ||
        (lp->http = evhttp_new(lp->base)) == NULL)
        goto out;
    evhttp_set_timeout(lp->http, 30);
    evhttp_set_gencb(lp->http, on_request, srv);
    listener = evconnlistener_new(lp->base, NULL, NULL, LEV_OPT_CLOSE_ON_EXEC | LEV_OPT_THREADSAFE,
                                  0, srv->fd);
    if (listener == NULL)
        goto out;
    if (evhttp_bind_listener(lp->http, listener) == NULL)
        goto out;
    listener = NULL; /* lp->http owns it */
    rc = 0;
out:
    if (listener != NULL)
        evconnlistener_free(listener);
    if (cfg != NULL)
        event_config_free(cfg);
    return rc;
}

/* Stop the loops and free everything (srv may be partly built; NULL is a
 * no-op). */
static void server_free(ceiling_server *srv)
{
    if (srv == NULL)
        return;
    for (size_t i = 0; i < BENCH_KMSD_LOOPS; i++)
        if (srv->loops[i].started)
            event_active(srv->loops[i].stop, EV_TIMEOUT, 0);
    for (size_t i = 0; i < BENCH_KMSD_LOOPS; i++) {
        ceiling_loop *lp = &srv->loops[i];
        if (lp->started)
            pthread_join(lp->thread, NULL);
        if (lp->http != NULL)
            evhttp_free(lp->http);
        if (lp->stop != NULL)
            event_free(lp->stop);
        if (lp->base != NULL)
            event_base_free(lp->base);
    }
    if (srv->fd >= 0) {
        close(srv->fd);
        unlink(srv->sock);
    }
    free(srv);
}

/* The fixed reply strings: kmsd's lengths, random content. */
static int server_strings(ceiling_server *srv)
{
    unsigned char r[32];
    static const char hex[] = "0123456789abcdef";
    int rc = -1;

    if (RAND_bytes(r, 16) != 1)
        goto out;
    r[6] = (unsigned char)(0x70 | (r[6] & 0x0f)); /* version 7 */
    r[8] = (unsigned char)(0x80 | (r[8] & 0x3f)); /* variant */
    for (int i = 0, o = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            srv->dek_id[o++] = '-';
        srv->dek_id[o++] = hex[r[i] >> 4];
        srv->dek_id[o++] = hex[r[i] & 15];
    }
    srv->dek_id[36] = '\0';
    if (RAND_bytes(r, sizeof(r)) != 1 ||
        EVP_EncodeBlock((unsigned char *)srv->plaintext, r, sizeof(r)) != 44)
        goto out;
    rc = 0;
out:
    return rc;
}

/* Listen on dir/ceiling.sock and start the loops; 0 or -1. */
static int server_start(const char *dir, ceiling_server **out)
{
    ceiling_server *srv = calloc(1, sizeof(*srv));
    struct sockaddr_un sun;
    int rc = -1;

    if (srv == NULL)
        goto out;
    srv->fd = -1;
    if (server_strings(srv) != 0 || evthread_use_pthreads() != 0)
        goto out;
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    if ((size_t)snprintf(srv->sock, sizeof(srv->sock), "%s/ceiling.sock", dir) >=
            sizeof(sun.sun_path) ||
        (srv->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)) < 0)
        goto out;
    memcpy(sun.sun_path, srv->sock, strlen(srv->sock) + 1);
    if (bind(srv->fd, (struct sockaddr *)&sun, sizeof(sun)) != 0 || listen(srv->fd, 1024) != 0)
        goto out;
    for (size_t i = 0; i < BENCH_KMSD_LOOPS; i++)
        if (loop_init(srv, &srv->loops[i]) != 0)
            goto out;
    for (size_t i = 0; i < BENCH_KMSD_LOOPS; i++) {
        if (pthread_create(&srv->loops[i].thread, NULL, loop_main, &srv->loops[i]) != 0)
            goto out;
        srv->loops[i].started = 1;
    }
    *out = srv;
    srv = NULL;
    rc = 0;
out:
    if (rc != 0)
        fprintf(stderr, "bench: ceiling: cannot start the server on %s/ceiling.sock\n", dir);
    server_free(srv);
    return rc;
}

int bench_ceiling(const bench_opts *o, json_t *out)
{
    ceiling_server *srv = NULL;
    bench_load *load = NULL;
    bench_load_result warm, run;
    json_t *details = json_object();
    const char *sock;
    double cpu_us;
    int rc = -1;

    if (o->tmpdir == NULL || server_start(o->tmpdir, &srv) != 0)
        goto out;
    sock = srv->sock;
    if (bench_load_new(&sock, 1, o->clients, &load) != 0)
        goto out;
    if (bench_load_run(load, o->clients, 0, 1.0, 0, &warm) != 0 ||
        bench_load_run(load, o->clients, 0, o->seconds, 0, &run) != 0)
        goto out;
    if (run.ok == 0 || warm.ok == 0) {
        fprintf(stderr, "bench: ceiling: no successful requests\n");
        goto out;
    }
    cpu_us = run.cpu_self_s * 1e6 / (double)run.ok;
    fprintf(stderr,
            "bench: ceiling (%d loops, %d clients): %.0f ops/s (p50 %.2f ms, p99 %.2f ms, %lu "
            "errors), %.1f us CPU per request (server and clients)\n",
            BENCH_KMSD_LOOPS, o->clients, run.ops_s, run.p50_ms, run.p99_ms, run.errors, cpu_us);
    bench_set(out, "raw_http_ops_s", run.ops_s);
    bench_set(out, "raw_http_cpu_us", cpu_us);
    json_object_set_new(details, "loops", json_integer(BENCH_KMSD_LOOPS));
    json_object_set_new(details, "clients", json_integer(o->clients));
    json_object_set_new(details, "datakey", bench_load_json(&run));
    json_object_set(out, "ceiling_details", details);
    rc = 0;
out:
    json_decref(details);
    bench_load_free(load);
    server_free(srv);
    return rc;
}
