/*
 * kms/server/http.c - event loops, listener, limits, worker hand-off and
 * drain of kmsd (see http.h).
 *
 * Each loop has its own event_base and evhttp and accepts on the shared
 * listening fd through its own evconnlistener.  A connection's bufferevent
 * is a framing filter (framing.c) that refuses oversized or malformed
 * requests before evhttp buffers them.  on_request runs on the loop:
 * kms_routes_prepare answers cheap requests at once; the others become a
 * `pending` that a worker executes and hands back with event_base_once
 * (libevent threading is enabled), and finish() writes the reply on the
 * loop.  The reply body goes to libevent by reference with a cleanup that
 * wipes it, so no unwiped copy of a plaintext DEK is left behind.
 *
 * Shared state between threads: `inflight` and `connections` (atomics),
 * `draining` (atomic).  Everything else belongs to one loop thread or to
 * the control thread.
 */
#include "kms/server/http.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/http_struct.h>
#include <event2/keyvalq_struct.h>
#include <event2/listener.h>
#include <openssl/crypto.h>

#include "kms/server/framing.h"
#include "kms/server/routes.h"
#include "kms/server/workers.h"
#include "module/log.h"

typedef struct loop {
    kms_server *srv;
    struct event_base *base;
    struct evhttp *http;
    struct evconnlistener *listener; /* owned by http once bound */
    pthread_t thread;
    int started;
} loop;

struct kms_server {
    const kms_config *cfg;
    kms_core *core;
    kms_workers *workers;
    int listen_fd;
    dev_t sock_dev;
    ino_t sock_ino;
    int sock_created;
    loop *loops;
    size_t n_loops;
    struct event_base *control;
    struct event *ev_term, *ev_int, *ev_drain;
    struct timespec drain_start;
    int idle_ticks;
    atomic_long inflight;
    atomic_long connections;
    atomic_int draining;
};

/* One request between on_request and finish. */
typedef struct pending {
    loop *loop;
    struct evhttp_request *req;
    kms_call *call;
    kms_reply reply;
    struct timespec start;
    char method[16];
    char path[200];
    char principal[32];
    int close;        /* the client asked for it */
    char refused[24]; /* framing refusal, for the log */
} pending;

static const struct {
    enum evhttp_cmd_type type;
    const char *name;
} methods[] = {
    {EVHTTP_REQ_GET, "GET"},     {EVHTTP_REQ_POST, "POST"},       {EVHTTP_REQ_HEAD, "HEAD"},
    {EVHTTP_REQ_PUT, "PUT"},     {EVHTTP_REQ_DELETE, "DELETE"},   {EVHTTP_REQ_OPTIONS, "OPTIONS"},
    {EVHTTP_REQ_TRACE, "TRACE"}, {EVHTTP_REQ_CONNECT, "CONNECT"}, {EVHTTP_REQ_PATCH, "PATCH"},
};

static const char *method_name(enum evhttp_cmd_type t)
{
    for (size_t i = 0; i < sizeof(methods) / sizeof(methods[0]); i++)
        if (methods[i].type == t)
            return methods[i].name;
    return "?";
}

static double elapsed_ms(const struct timespec *start)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - start->tv_sec) * 1e3 +
           (double)(now.tv_nsec - start->tv_nsec) / 1e6;
}

static void peer_principal(struct evhttp_request *req, char *out, size_t len)
{
    struct evhttp_connection *con = evhttp_request_get_connection(req);
    struct bufferevent *bev = con != NULL ? evhttp_connection_get_bufferevent(con) : NULL;
    evutil_socket_t fd = bev != NULL ? bufferevent_getfd(bev) : -1;
    struct ucred uc;
    socklen_t uclen = sizeof(uc);

    if (fd >= 0 && getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &uclen) == 0)
        snprintf(out, len, "uid:%u", (unsigned)uc.uid);
    else
        snprintf(out, len, "unknown");
}

static void wipe_body(const void *data, size_t len, void *extra)
{
    (void)extra;
    OPENSSL_cleanse((void *)(uintptr_t)data, len);
    free((void *)(uintptr_t)data);
}

static void close_when_drained(struct evbuffer *buf, const struct evbuffer_cb_info *info, void *arg)
{
    if (info->n_deleted > 0 && evbuffer_get_length(buf) == 0)
        shutdown((int)(intptr_t)arg, SHUT_RDWR);
}

/* Close the connection once the reply has reached the kernel.  evhttp's
 * own "Connection: close" handling frees a connection as soon as the
 * reply has left the framing filter, before the socket bufferevent under
 * it has written it, and shuts the socket down: the reply would be lost.
 * So kmsd never lets evhttp see "Connection: close" (on_request removes
 * it) and shuts the socket down itself when the lower output buffer is
 * empty; evhttp then sees end-of-file and frees the connection. */
static void close_after_reply(struct bufferevent *bev)
{
    struct bufferevent *under = bufferevent_get_underlying(bev);
    struct evbuffer *out = under != NULL ? bufferevent_get_output(under) : NULL;
    evutil_socket_t fd = under != NULL ? bufferevent_getfd(under) : -1;

    if (out == NULL || fd < 0)
        return;
    if (evbuffer_get_length(out) == 0)
        shutdown(fd, SHUT_RDWR);
    else
        evbuffer_add_cb(out, close_when_drained, (void *)(intptr_t)fd);
}

/* On the request's loop: write the reply, log, free. */
static void finish(pending *p)
{
    kms_server *srv = p->loop->srv;
    struct evkeyvalq *hdrs = evhttp_request_get_output_headers(p->req);
    struct evbuffer *buf = evbuffer_new();
    struct evhttp_connection *con = evhttp_request_get_connection(p->req);
    struct bufferevent *bev = con != NULL ? evhttp_connection_get_bufferevent(con) : NULL;
    char retry[16];

    evhttp_add_header(hdrs, "Content-Type", "application/json");
    if (p->reply.allow[0] != '\0')
        evhttp_add_header(hdrs, "Allow", p->reply.allow);
    if (p->reply.retry_after > 0) {
        snprintf(retry, sizeof(retry), "%d", p->reply.retry_after);
        evhttp_add_header(hdrs, "Retry-After", retry);
    }
    if (buf != NULL && p->reply.body != NULL &&
        evbuffer_add_reference(buf, p->reply.body, p->reply.len, wipe_body, NULL) == 0) {
        p->reply.body = NULL; /* libevent owns it now; wipe_body releases it */
        p->reply.len = 0;
    }
    if (p->reply.status == 0)
        p->reply.status = 500;
    evhttp_send_reply(p->req, p->reply.status, NULL, buf);
    /* libevent 2.1's filtering bufferevent does not pass on output queued
     * while writing was disabled (evhttp enables it only after queueing
     * the reply); push it through ourselves.  The connection is still
     * alive here: evhttp frees it only from its write callbacks. */
    if (bev != NULL) {
        bufferevent_flush(bev, EV_WRITE, BEV_NORMAL);
        if (p->close || p->reply.close)
            close_after_reply(bev);
    }
    LOG_INFO("http", "%s %s %d %.2fms %s %s%s", p->method, p->path, p->reply.status,
             elapsed_ms(&p->start), p->principal, p->refused[0] ? "refused:" : "",
             p->refused[0] ? p->refused : kms_call_name(p->call));
    if (buf != NULL)
        evbuffer_free(buf);
    kms_reply_clear(&p->reply);
    kms_call_free(p->call);
    free(p);
    atomic_fetch_sub(&srv->inflight, 1);
}

static void deliver(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    finish(arg);
}

/* On a worker thread. */
static void run_job(void *arg)
{
    pending *p = arg;

    kms_routes_execute(p->loop->srv->core, p->call, &p->reply);
    if (event_base_once(p->loop->base, -1, EV_TIMEOUT, deliver, p, NULL) != 0)
        LOG_ERROR("http", "cannot hand a reply back to its event loop");
}

static void on_request(struct evhttp_request *req, void *arg)
{
    loop *lp = arg;
    kms_server *srv = lp->srv;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri != NULL ? evhttp_uri_get_path(uri) : NULL;
    struct evbuffer *in = evhttp_request_get_input_buffer(req);
    struct evkeyvalq *in_hdrs = evhttp_request_get_input_headers(req);
    const char *conn = evhttp_find_header(in_hdrs, "Connection");
    kms_request_info info;
    pending *p = calloc(1, sizeof(*p));

    if (p == NULL) {
        evhttp_send_error(req, 500, NULL);
        return;
    }
    atomic_fetch_add(&srv->inflight, 1);
    p->loop = lp;
    p->req = req;
    clock_gettime(CLOCK_MONOTONIC, &p->start);
    snprintf(p->method, sizeof(p->method), "%s", method_name(evhttp_request_get_command(req)));
    if (path == NULL || *path == '\0')
        path = "/";
    snprintf(p->path, sizeof(p->path), "%s", path);
    peer_principal(req, p->principal, sizeof(p->principal));

    /* Closing is ours (see close_after_reply): take it away from evhttp. */
    if (req->major == 1 && req->minor == 0)
        p->close = conn == NULL || strcasestr(conn, "keep-alive") == NULL;
    else
        p->close = conn != NULL && strcasestr(conn, "close") != NULL;
    evhttp_remove_header(in_hdrs, "Connection");
    if (req->major == 1 && req->minor == 0)
        evhttp_add_header(in_hdrs, "Connection", "keep-alive");

    memset(&info, 0, sizeof(info));
    info.method = p->method;
    info.path = path;
    info.query = uri != NULL ? evhttp_uri_get_query(uri) : NULL;
    info.refused = evhttp_find_header(evhttp_request_get_input_headers(req), KMS_FRAMING_HEADER);
    if (info.refused != NULL)
        snprintf(p->refused, sizeof(p->refused), "%s", info.refused);
    info.body_len = evbuffer_get_length(in);
    info.body = info.body_len > 0 ? evbuffer_pullup(in, -1) : NULL;
    info.max_body = (size_t)srv->cfg->max_body;
    info.principal = p->principal;
    if (info.body_len > info.max_body) { /* never: the framing filter refuses these */
        info.refused = KMS_FRAMING_TOO_LARGE;
        info.body_len = 0;
    }
    kms_routes_prepare(&info, &p->call, &p->reply);
    if (p->call != NULL) {
        if (kms_workers_submit(srv->workers, run_job, p) == P11KMS_OK)
            return;
        kms_reply_error(&p->reply, P11KMS_ERR_OVERLOADED, "server busy; retry later");
    }
    finish(p);
}

static void on_connection_closed(void *arg)
{
    kms_server *srv = arg;

    atomic_fetch_sub(&srv->connections, 1);
}

/* evhttp_set_bevcb: every connection gets a framing filter. */
static struct bufferevent *make_bev(struct event_base *base, void *arg)
{
    loop *lp = arg;
    kms_server *srv = lp->srv;
    long n = atomic_fetch_add(&srv->connections, 1) + 1;
    const char *refuse = n > srv->cfg->max_connections ? KMS_FRAMING_BUSY : NULL;
    struct bufferevent *bev;

    bev = kms_framing_new(base, (size_t)srv->cfg->max_body, KMS_HTTP_MAX_HEAD, refuse,
                          on_connection_closed, srv);
    if (bev == NULL)
        atomic_fetch_sub(&srv->connections, 1);
    return bev;
}

static void *loop_main(void *arg)
{
    loop *lp = arg;

    event_base_loop(lp->base, EVLOOP_NO_EXIT_ON_EMPTY);
    return NULL;
}

static p11kms_status loop_init(kms_server *srv, loop *lp)
{
    const kms_config *cfg = srv->cfg;

    lp->srv = srv;
    lp->base = event_base_new();
    if (lp->base == NULL || (lp->http = evhttp_new(lp->base)) == NULL)
        return P11KMS_ERR_NO_MEMORY;
    evhttp_set_allowed_methods(lp->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                             EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                             EVHTTP_REQ_OPTIONS | EVHTTP_REQ_TRACE |
                                             EVHTTP_REQ_CONNECT | EVHTTP_REQ_PATCH);
    /* evhttp's own limits sit above the framing filter's, which answers
     * first and in JSON; they are a second line only. */
    evhttp_set_max_headers_size(lp->http, 2 * KMS_HTTP_MAX_HEAD);
    evhttp_set_max_body_size(lp->http, 2 * (ev_ssize_t)cfg->max_body);
    evhttp_set_timeout(lp->http, cfg->timeout);
    evhttp_set_bevcb(lp->http, make_bev, lp);
    evhttp_set_gencb(lp->http, on_request, lp);
    lp->listener = evconnlistener_new(
        lp->base, NULL, NULL, LEV_OPT_CLOSE_ON_EXEC | LEV_OPT_THREADSAFE, 0, srv->listen_fd);
    if (lp->listener == NULL)
        return P11KMS_ERR_NO_MEMORY;
    if (evhttp_bind_listener(lp->http, lp->listener) == NULL) {
        evconnlistener_free(lp->listener);
        lp->listener = NULL;
        return P11KMS_ERR_NO_MEMORY;
    }
    return P11KMS_OK;
}

/* Remove a stale socket file: only a socket nobody listens on. */
static p11kms_status clear_stale_socket(const char *path)
{
    struct sockaddr_un sun;
    struct stat st;
    int fd = -1;
    p11kms_status rv = P11KMS_ERR_INTERNAL;

    if (lstat(path, &st) != 0)
        return errno == ENOENT ? P11KMS_OK : P11KMS_ERR_INTERNAL;
    if (!S_ISSOCK(st.st_mode)) {
        LOG_ERROR("http", "listen.unix: %s exists and is not a socket", path);
        goto out;
    }
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto out;
    if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == 0) {
        LOG_ERROR("http", "listen.unix: another process is listening on %s", path);
        goto out;
    }
    if (errno != ECONNREFUSED) {
        LOG_ERROR("http", "listen.unix: cannot probe %s: %s", path, strerror(errno));
        goto out;
    }
    if (unlink(path) != 0) {
        LOG_ERROR("http", "listen.unix: cannot remove stale socket %s: %s", path, strerror(errno));
        goto out;
    }
    LOG_INFO("http", "removed stale socket %s", path);
    rv = P11KMS_OK;
out:
    if (fd >= 0)
        close(fd);
    return rv;
}

static p11kms_status listen_unix(kms_server *srv)
{
    const char *path = srv->cfg->listen_unix;
    struct sockaddr_un sun;
    struct stat st;
    p11kms_status rv = P11KMS_ERR_INTERNAL;

    if ((rv = clear_stale_socket(path)) != P11KMS_OK)
        return rv;
    rv = P11KMS_ERR_INTERNAL;
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", path);
    srv->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (srv->listen_fd < 0) {
        LOG_ERROR("http", "socket: %s", strerror(errno));
        goto out;
    }
    /* The process umask (077) makes the socket 0700 at bind; chmod then
     * sets listen.unix_mode before anyone can connect (listen comes last). */
    if (bind(srv->listen_fd, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
        LOG_ERROR("http", "listen.unix: bind %s: %s", path, strerror(errno));
        goto out;
    }
    srv->sock_created = 1;
    if (chmod(path, srv->cfg->unix_mode) != 0 || stat(path, &st) != 0) {
        LOG_ERROR("http", "listen.unix: chmod %s: %s", path, strerror(errno));
        goto out;
    }
    srv->sock_dev = st.st_dev;
    srv->sock_ino = st.st_ino;
    if (listen(srv->listen_fd, 1024) != 0) {
        LOG_ERROR("http", "listen.unix: listen %s: %s", path, strerror(errno));
        goto out;
    }
    rv = P11KMS_OK;
out:
    return rv;
}

/* Remove our socket file (not one another kmsd put there since). */
static void remove_socket(kms_server *srv)
{
    struct stat st;

    if (!srv->sock_created)
        return;
    srv->sock_created = 0;
    if (lstat(srv->cfg->listen_unix, &st) == 0 && st.st_dev == srv->sock_dev &&
        st.st_ino == srv->sock_ino)
        unlink(srv->cfg->listen_unix);
}

static void stop_loops(kms_server *srv)
{
    for (size_t i = 0; i < srv->n_loops; i++)
        if (srv->loops[i].base != NULL)
            event_base_loopbreak(srv->loops[i].base);
    event_base_loopbreak(srv->control);
}

static void on_drain_tick(evutil_socket_t fd, short what, void *arg)
{
    kms_server *srv = arg;
    long n = atomic_load(&srv->inflight);

    (void)fd;
    (void)what;
    if (n == 0) {
        /* One more tick lets the loops flush the last replies. */
        if (++srv->idle_ticks >= 2) {
            LOG_INFO("http", "drained; stopping");
            stop_loops(srv);
        }
        return;
    }
    srv->idle_ticks = 0;
    if (elapsed_ms(&srv->drain_start) > KMS_HTTP_DRAIN_SECONDS * 1000.0) {
        LOG_WARN("http", "drain timed out with %ld requests in flight; stopping", n);
        stop_loops(srv);
    }
}

static void on_signal(evutil_socket_t sig, short what, void *arg)
{
    kms_server *srv = arg;
    struct timeval tick = {0, 50000};

    (void)what;
    if (atomic_exchange(&srv->draining, 1)) {
        LOG_INFO("http", "signal %d: already draining", (int)sig);
        return;
    }
    LOG_INFO("http", "signal %d: no longer accepting; draining in-flight requests", (int)sig);
    for (size_t i = 0; i < srv->n_loops; i++)
        if (srv->loops[i].listener != NULL)
            evconnlistener_disable(srv->loops[i].listener);
    remove_socket(srv);
    clock_gettime(CLOCK_MONOTONIC, &srv->drain_start);
    srv->ev_drain = event_new(srv->control, -1, EV_PERSIST, on_drain_tick, srv);
    if (srv->ev_drain == NULL || event_add(srv->ev_drain, &tick) != 0)
        stop_loops(srv);
}

p11kms_status kms_server_new(const kms_config *cfg, kms_core *core, kms_server **out)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    kms_server *srv = calloc(1, sizeof(*srv));

    if (srv == NULL)
        goto out;
    srv->cfg = cfg;
    srv->core = core;
    srv->listen_fd = -1;
    atomic_init(&srv->inflight, 0);
    atomic_init(&srv->connections, 0);
    atomic_init(&srv->draining, 0);
    if ((rv = listen_unix(srv)) != P11KMS_OK)
        goto out;
    if ((rv = kms_workers_new((size_t)cfg->workers, (size_t)cfg->queue, &srv->workers)) !=
        P11KMS_OK)
        goto out;
    rv = P11KMS_ERR_NO_MEMORY;
    srv->control = event_base_new();
    srv->loops = calloc((size_t)cfg->threads, sizeof(*srv->loops));
    if (srv->control == NULL || srv->loops == NULL)
        goto out;
    for (; srv->n_loops < (size_t)cfg->threads; srv->n_loops++)
        if ((rv = loop_init(srv, &srv->loops[srv->n_loops])) != P11KMS_OK)
            goto out;
    srv->ev_term = evsignal_new(srv->control, SIGTERM, on_signal, srv);
    srv->ev_int = evsignal_new(srv->control, SIGINT, on_signal, srv);
    if (srv->ev_term == NULL || srv->ev_int == NULL || event_add(srv->ev_term, NULL) != 0 ||
        event_add(srv->ev_int, NULL) != 0)
        goto out;
    *out = srv;
    srv = NULL;
    rv = P11KMS_OK;
out:
    if (srv != NULL && srv->n_loops < (size_t)cfg->threads && srv->loops != NULL)
        srv->n_loops++; /* free the partly built loop too */
    kms_server_free(srv);
    return rv;
}

p11kms_status kms_server_run(kms_server *srv)
{
    sigset_t all, old;
    p11kms_status rv = P11KMS_OK;

    /* Loop threads block every signal; the control loop handles them. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    for (size_t i = 0; i < srv->n_loops; i++) {
        if (pthread_create(&srv->loops[i].thread, NULL, loop_main, &srv->loops[i]) != 0) {
            LOG_ERROR("http", "cannot start event loop thread");
            rv = P11KMS_ERR_INTERNAL;
            break;
        }
        srv->loops[i].started = 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rv != P11KMS_OK) {
        stop_loops(srv);
        return rv;
    }
    LOG_INFO("http", "listening on %s (%d loops, %d workers)", srv->cfg->listen_unix,
             srv->cfg->threads, srv->cfg->workers);
    event_base_loop(srv->control, EVLOOP_NO_EXIT_ON_EMPTY);
    return rv;
}

void kms_server_free(kms_server *srv)
{
    if (srv == NULL)
        return;
    for (size_t i = 0; i < srv->n_loops; i++)
        if (srv->loops[i].base != NULL)
            event_base_loopbreak(srv->loops[i].base);
    for (size_t i = 0; i < srv->n_loops; i++)
        if (srv->loops[i].started)
            pthread_join(srv->loops[i].thread, NULL);
    /* Workers finish what they hold; replies to stopped loops are dropped. */
    kms_workers_free(srv->workers);
    for (size_t i = 0; i < srv->n_loops; i++) {
        if (srv->loops[i].http != NULL)
            evhttp_free(srv->loops[i].http); /* frees its listener too */
        else if (srv->loops[i].listener != NULL)
            evconnlistener_free(srv->loops[i].listener);
        if (srv->loops[i].base != NULL)
            event_base_free(srv->loops[i].base);
    }
    free(srv->loops);
    if (srv->ev_drain != NULL)
        event_free(srv->ev_drain);
    if (srv->ev_term != NULL)
        event_free(srv->ev_term);
    if (srv->ev_int != NULL)
        event_free(srv->ev_int);
    if (srv->control != NULL)
        event_base_free(srv->control);
    remove_socket(srv);
    if (srv->listen_fd >= 0)
        close(srv->listen_fd);
    free(srv);
}
