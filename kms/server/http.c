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
 * Principals and policy: on_request computes the principal (uid:<n> with
 * its groups from SO_PEERCRED/SO_PEERGROUPS, cert:<CN> from tls.c, or
 * token:<name> from an Authorization: Bearer header, which is wiped and
 * removed; a bad one is answered 401 at once) and takes a reference to
 * the policy in force, which the request keeps until finish() even if
 * SIGHUP installs another meanwhile.  The worker asks authz.c before it
 * runs the call (a DEK-addressed call needs a store lookup first).
 *
 * With listen.tls each loop has a second evhttp on the TLS socket whose
 * connections are framing filters over a bufferevent_openssl (tls.c).
 *
 * Bounds on clients: the framing filter closes a connection whose request
 * does not arrive whole within request_timeout (slowloris); evhttp's
 * timeout closes idle ones; over max_connections a connection's request
 * is answered 503 overloaded.  When accept(2) fails for want of file
 * descriptors (EMFILE, ENFILE) or memory, the loop stops accepting for
 * KMS_HTTP_ACCEPT_PAUSE_MS instead of spinning on the listening socket
 * (libevent retries such a failure at once, for ever): pending
 * connections wait in the listen backlog meanwhile.
 *
 * Shared state between threads: `inflight`, `connections`, the counters
 * for /metrics and `draining` (atomics), `policy` (its own lock; policies
 * are immutable).
 * Everything else belongs to one loop thread or to the control thread
 * (signals: SIGTERM/SIGINT drain, SIGHUP reloads the policy).
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
#include <sys/queue.h>
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

#include "kms/policy/policy.h"
#include "kms/server/authz.h"
#include "kms/server/framing.h"
#include "kms/server/metrics.h"
#include "kms/server/routes.h"
#include "kms/server/tls.h"
#include "kms/server/workers.h"
#include "module/log.h"

#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59
#endif

typedef struct loop {
    kms_server *srv;
    struct event_base *base;
    struct evhttp *http;
    struct evconnlistener *listener; /* owned by http once bound */
    struct evhttp *http_tls;         /* listen.tls, or NULL */
    struct evconnlistener *listener_tls;
    struct event *accept_resume; /* re-enables the listeners after a pause */
    struct event *marker;        /* finds this loop from its event_base (listener_loop) */
    pthread_t thread;
    int started;
    /* Requests whose asynchronous core call finished (on_async_done, any
     * thread), waiting for this loop to write their replies. */
    pthread_mutex_t done_mu;
    int done_mu_ok;
    struct pending *done_head, *done_tail; /* [done_mu] */
    struct event *ev_done;
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
    kms_policy_slot policy; /* the policy in force; SIGHUP replaces it */
    kms_tls *tls;           /* listen.tls, or NULL */
    int tls_fd;
    struct event_base *control;
    struct event *ev_term, *ev_int, *ev_drain, *ev_hup;
    struct timespec drain_start;
    int idle_ticks;
    atomic_long inflight;
    atomic_long connections;
    atomic_long async_pending; /* core calls between kms_routes_start and on_async_done */
    atomic_long request_timeouts; /* connections closed: a request too slow */
    atomic_long accept_pauses;    /* accept(2) paused: no descriptors or memory */
    atomic_int draining;
    atomic_llong last_accept_warn; /* CLOCK_MONOTONIC seconds, rate-limits the log */
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
    kms_principal who;  /* "unknown" when none */
    kms_policy *policy; /* a reference to the policy this request is decided by */
    int close;          /* the client asked for it */
    int sync;           /* run the call synchronously (an asynchronous one asked to rerun) */
    char refused[24];   /* framing refusal, for the log */
    struct pending *next; /* in its loop's done list */
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

/* The transport principal: cert:<CN> on TLS, uid:<n> (with its groups)
 * on the Unix socket.  0, or -1 with who->name "unknown" when the
 * connection gives no usable identity. */
static int peer_principal(struct evhttp_request *req, kms_principal *who)
{
    struct evhttp_connection *con = evhttp_request_get_connection(req);
    struct bufferevent *bev = con != NULL ? evhttp_connection_get_bufferevent(con) : NULL;
    struct bufferevent *under = bev != NULL ? bufferevent_get_underlying(bev) : NULL;
    evutil_socket_t fd = bev != NULL ? bufferevent_getfd(bev) : -1;
    gid_t groups[KMS_PRINCIPAL_GROUPS];
    socklen_t glen = sizeof(groups);
    struct ucred uc;
    socklen_t uclen = sizeof(uc);
    int tls;

    memset(who, 0, sizeof(*who));
    tls = kms_tls_peer(under, who);
    if (tls > 0)
        return 0;
    if (tls == 0 && fd >= 0 && getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &uc, &uclen) == 0) {
        snprintf(who->name, sizeof(who->name), "uid:%u", (unsigned)uc.uid);
        who->unix_peer = 1;
        who->uid = uc.uid;
        who->gids[who->n_gids++] = uc.gid;
        /* Supplementary groups; too many of them: the primary one only. */
        if (getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups, &glen) == 0)
            for (size_t i = 0; i < glen / sizeof(gid_t) && who->n_gids < KMS_PRINCIPAL_GROUPS; i++)
                if (groups[i] != uc.gid)
                    who->gids[who->n_gids++] = groups[i];
        return 0;
    }
    memset(who, 0, sizeof(*who));
    snprintf(who->name, sizeof(who->name), "unknown");
    return -1;
}

/* An Authorization header replaces the transport principal with the
 * bearer token's (token:<name>).  Every Authorization value is wiped in
 * evhttp's copy and removed.  0 (no header, or a known token), -1 for a
 * bad credential (more than one header, another scheme, unknown token). */
static int bearer_principal(struct evkeyvalq *hdrs, const kms_policy *pol, kms_principal *who)
{
    struct evkeyval *h;
    const char *value = NULL, *secret;
    int count = 0, rv = 0;

    TAILQ_FOREACH(h, hdrs, next)
    {
        if (strcasecmp(h->key, "Authorization") == 0) {
            count++;
            value = h->value;
        }
    }
    if (count == 0)
        return 0;
    rv = -1;
    if (count == 1 && strncasecmp(value, "Bearer ", 7) == 0) {
        secret = value + 7;
        while (*secret == ' ')
            secret++;
        if (strspn(secret,
                   "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=") ==
                strlen(secret) &&
            kms_policy_token(pol, secret, strlen(secret), who))
            rv = 0;
    }
    TAILQ_FOREACH(h, hdrs, next)
    {
        if (strcasecmp(h->key, "Authorization") == 0)
            OPENSSL_cleanse(h->value, strlen(h->value));
    }
    while (evhttp_find_header(hdrs, "Authorization") != NULL)
        evhttp_remove_header(hdrs, "Authorization");
    return rv;
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
    double ms;

    evhttp_add_header(hdrs, "Content-Type",
                      p->reply.content_type != NULL ? p->reply.content_type : "application/json");
    if (p->reply.allow[0] != '\0')
        evhttp_add_header(hdrs, "Allow", p->reply.allow);
    if (p->reply.retry_after > 0) {
        snprintf(retry, sizeof(retry), "%d", p->reply.retry_after);
        evhttp_add_header(hdrs, "Retry-After", retry);
    }
    if (p->reply.status == 401)
        evhttp_add_header(hdrs, "WWW-Authenticate", "Bearer realm=\"p11kms\"");
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
    ms = elapsed_ms(&p->start);
    kms_metrics_request(p->call != NULL ? kms_call_name(p->call) : NULL, p->reply.status,
                        ms > 0 ? (uint64_t)(ms * 1000.0) : 0);
    LOG_INFO("http", "%s %s %d %.2fms %s %s%s", p->method, p->path, p->reply.status, ms,
             p->who.name, p->refused[0] ? "refused:" : "",
             p->refused[0] ? p->refused : kms_call_name(p->call));
    if (buf != NULL)
        evbuffer_free(buf);
    kms_reply_clear(&p->reply);
    kms_call_free(p->call);
    kms_policy_unref(p->policy);
    free(p);
    atomic_fetch_sub(&srv->inflight, 1);
}

static void deliver(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    finish(arg);
}

static void run_job(void *arg);

/* The asynchronous core call of p finished (on the store's writer thread,
 * or on the worker before kms_routes_start returned): queue p for its
 * loop and wake the loop once per batch. */
static void on_async_done(void *arg)
{
    pending *p = arg;
    loop *lp = p->loop;
    kms_server *srv = lp->srv;
    int wake;

    pthread_mutex_lock(&lp->done_mu);
    p->next = NULL;
    wake = lp->done_head == NULL;
    if (lp->done_tail != NULL)
        lp->done_tail->next = p;
    else
        lp->done_head = p;
    lp->done_tail = p;
    pthread_mutex_unlock(&lp->done_mu);
    if (wake)
        event_active(lp->ev_done, EV_READ, 0);
    atomic_fetch_sub(&srv->async_pending, 1); /* last: kms_server_free waits for it */
}

/* On the loop: reply to every request its done list holds. */
static void on_done_ready(evutil_socket_t fd, short what, void *arg)
{
    loop *lp = arg;
    pending *p, *next;

    (void)fd;
    (void)what;
    pthread_mutex_lock(&lp->done_mu);
    p = lp->done_head;
    lp->done_head = lp->done_tail = NULL;
    pthread_mutex_unlock(&lp->done_mu);
    for (; p != NULL; p = next) {
        next = p->next;
        if (kms_routes_complete(p->call, &p->reply)) {
            finish(p);
            continue;
        }
        p->sync = 1; /* rare: the key version filled up meanwhile */
        LOG_DEBUG("http", "%s %s: the key version filled up at commit; running it again", p->method,
                  p->path);
        if (kms_workers_submit(lp->srv->workers, run_job, p) != P11KMS_OK) {
            kms_reply_error(&p->reply, P11KMS_ERR_OVERLOADED, "server busy; retry later");
            finish(p);
        }
    }
}

/* On a worker thread.  The hot routes go asynchronous (the reply is then
 * written by on_done_ready); the others run here and are handed back. */
static void run_job(void *arg)
{
    pending *p = arg;
    kms_server *srv = p->loop->srv;
    kms_dek_rec *dek = NULL;
    int started = 0;

    kms_core_actor_set(p->who.name); /* the principal of the request's audit entry */
    if (kms_authz_call(srv->core, p->policy, &p->who, p->call, &p->reply, &dek)) {
        if (strcmp(kms_call_name(p->call), "metrics") == 0) { /* GET /metrics: admin */
            kms_metrics_gauges g = {kms_workers_pending(srv->workers), atomic_load(&srv->inflight),
                                    atomic_load(&srv->connections),
                                    atomic_load(&srv->request_timeouts),
                                    atomic_load(&srv->accept_pauses)};
            kms_metrics_render(srv->core, &g, &p->reply);
        } else {
            if (!p->sync) {
                atomic_fetch_add(&srv->async_pending, 1);
                started = kms_routes_start(srv->core, p->call, dek, on_async_done, p);
                if (!started)
                    atomic_fetch_sub(&srv->async_pending, 1);
            }
            if (!started)
                kms_routes_execute(srv->core, p->call, &p->reply);
        }
    }
    kms_core_actor_set(NULL);
    kms_dek_rec_free(dek);
    if (started)
        return; /* p belongs to on_async_done now (it may be answered already) */
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
    int authenticated;
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
    p->policy = kms_policy_slot_get(&srv->policy);
    authenticated = peer_principal(req, &p->who) == 0;
    if (bearer_principal(in_hdrs, p->policy, &p->who) != 0)
        authenticated = 0;

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
    info.principal = p->who.name;
    if (info.body_len > info.max_body) { /* never: the framing filter refuses these */
        info.refused = KMS_FRAMING_TOO_LARGE;
        info.body_len = 0;
    }
    if (!authenticated && info.refused == NULL) {
        snprintf(p->refused, sizeof(p->refused), "unauthenticated");
        kms_reply_error(&p->reply, P11KMS_ERR_UNAUTHENTICATED,
                        "missing or invalid credentials (bearer token or client certificate)");
        finish(p);
        return;
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

static void on_request_timeout(void *arg)
{
    kms_server *srv = arg;

    atomic_fetch_add(&srv->request_timeouts, 1);
}

/* Count a new connection and describe its filter. */
static void framing_opts(kms_server *srv, kms_framing_opts *o)
{
    long n = atomic_fetch_add(&srv->connections, 1) + 1;

    memset(o, 0, sizeof(*o));
    o->max_body = (size_t)srv->cfg->max_body;
    o->max_head = KMS_HTTP_MAX_HEAD;
    o->request_timeout_ms = srv->cfg->request_timeout * 1000;
    o->refuse_all = n > srv->cfg->max_connections ? KMS_FRAMING_BUSY : NULL;
    o->on_close = on_connection_closed;
    o->on_timeout = on_request_timeout;
    o->arg = srv;
}

/* evhttp_set_bevcb: every connection gets a framing filter. */
static struct bufferevent *make_bev(struct event_base *base, void *arg)
{
    loop *lp = arg;
    kms_framing_opts o;
    struct bufferevent *bev;

    framing_opts(lp->srv, &o);
    bev = kms_framing_new(base, &o);
    if (bev == NULL)
        atomic_fetch_sub(&lp->srv->connections, 1);
    return bev;
}

/* evhttp_set_bevcb of the TLS listener: the framing filter over TLS. */
static struct bufferevent *make_bev_tls(struct event_base *base, void *arg)
{
    loop *lp = arg;
    kms_framing_opts o;
    struct bufferevent *under, *bev = NULL;

    framing_opts(lp->srv, &o);
    under = kms_tls_bev_new(lp->srv->tls, base);
    if (under != NULL)
        bev = kms_framing_wrap(under, &o);
    if (bev == NULL)
        atomic_fetch_sub(&lp->srv->connections, 1);
    return bev;
}

/* Listeners of this loop on again after a pause (not while draining). */
static void resume_accept(evutil_socket_t fd, short what, void *arg)
{
    loop *lp = arg;

    (void)fd;
    (void)what;
    if (atomic_load(&lp->srv->draining))
        return;
    if (lp->listener != NULL)
        evconnlistener_enable(lp->listener);
    if (lp->listener_tls != NULL)
        evconnlistener_enable(lp->listener_tls);
}

/* A listener's loop, for on_accept_error: libevent hands that callback
 * the listener's user data, which evhttp_bind_listener made its struct
 * evhttp, and neither a listener nor an event_base carries a pointer of
 * ours.  So each loop adds one event of its own to its base, `marker`,
 * whose argument is the loop, and the listener's base is searched for it
 * with event_base_foreach_event (no state outside the server).  That
 * only sees events that are added or active, and an event with neither
 * fd nor timeout is never really added: the marker is a persistent timer
 * of a day whose callback does nothing.  The search walks the base's
 * events (one or two a connection) once a pause, so a few times a second
 * while accept(2) fails. */
#define LOOP_MARKER_SECONDS 86400

static void on_loop_marker(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
}

static int is_loop_marker(const struct event_base *base, const struct event *ev, void *arg)
{
    loop **found = arg;

    (void)base;
    if (event_get_callback(ev) != on_loop_marker)
        return 0;
    *found = event_get_callback_arg(ev);
    return 1;
}

/* The loop that owns listener lev, or NULL. */
static loop *listener_loop(struct evconnlistener *lev)
{
    loop *lp = NULL;

    event_base_foreach_event(evconnlistener_get_base(lev), is_loop_marker, &lp);
    if (lp == NULL || (lp->listener != lev && lp->listener_tls != lev))
        return NULL;
    return lp;
}

/* evconnlistener error callback: accept(2) failed with an error libevent
 * does not retry later by itself (EMFILE, ENFILE, ENOBUFS, ENOMEM...).
 * Left alone, the listener would be called again at once, for ever, at
 * full CPU and one log line each time: pause this loop's accepting. */
static void on_accept_error(struct evconnlistener *lev, void *arg)
{
    int err = EVUTIL_SOCKET_ERROR();
    loop *lp = listener_loop(lev);
    kms_server *srv;
    struct timeval pause = {0, KMS_HTTP_ACCEPT_PAUSE_MS * 1000};
    struct timespec now;
    long long last;

    (void)arg; /* evhttp's, not ours */
    if (lp == NULL) {
        evconnlistener_disable(lev); /* no loop: nothing will accept again */
        return;
    }
    srv = lp->srv;
    atomic_fetch_add(&srv->accept_pauses, 1);
    clock_gettime(CLOCK_MONOTONIC, &now);
    last = atomic_load(&srv->last_accept_warn);
    if ((long long)now.tv_sec - last >= 10 &&
        atomic_compare_exchange_strong(&srv->last_accept_warn, &last, (long long)now.tv_sec))
        LOG_WARN("http",
                 "accept: %s (%ld connections open): not accepting for %d ms; raise the "
                 "file descriptor limit or lower [server] max_connections",
                 strerror(err), atomic_load(&srv->connections), KMS_HTTP_ACCEPT_PAUSE_MS);
    if (lp->listener != NULL)
        evconnlistener_disable(lp->listener);
    if (lp->listener_tls != NULL)
        evconnlistener_disable(lp->listener_tls);
    if (lp->accept_resume == NULL || evtimer_add(lp->accept_resume, &pause) != 0)
        resume_accept(-1, 0, lp); /* cannot pause: better spinning than deaf */
}

static void *loop_main(void *arg)
{
    loop *lp = arg;

    pthread_setname_np(pthread_self(), "kmsd-loop"); /* top -H, perf */
    event_base_loop(lp->base, EVLOOP_NO_EXIT_ON_EMPTY);
    return NULL;
}

/* One evhttp (Unix socket or TLS) of a loop, bound to listening fd. */
static p11kms_status http_init(kms_server *srv, loop *lp, struct evhttp *http,
                               struct bufferevent *(*bevcb)(struct event_base *, void *), int fd,
                               struct evconnlistener **listener)
{
    const kms_config *cfg = srv->cfg;

    evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                         EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE | EVHTTP_REQ_OPTIONS |
                                         EVHTTP_REQ_TRACE | EVHTTP_REQ_CONNECT | EVHTTP_REQ_PATCH);
    /* evhttp's own limits sit above the framing filter's, which answers
     * first and in JSON; they are a second line only. */
    evhttp_set_max_headers_size(http, 2 * KMS_HTTP_MAX_HEAD);
    evhttp_set_max_body_size(http, 2 * (ev_ssize_t)cfg->max_body);
    evhttp_set_timeout(http, cfg->timeout);
    evhttp_set_bevcb(http, bevcb, lp);
    evhttp_set_gencb(http, on_request, lp);
    *listener =
        evconnlistener_new(lp->base, NULL, NULL, LEV_OPT_CLOSE_ON_EXEC | LEV_OPT_THREADSAFE, 0, fd);
    if (*listener == NULL)
        return P11KMS_ERR_NO_MEMORY;
    if (evhttp_bind_listener(http, *listener) == NULL) {
        evconnlistener_free(*listener);
        *listener = NULL;
        return P11KMS_ERR_NO_MEMORY;
    }
    evconnlistener_set_error_cb(*listener, on_accept_error);
    return P11KMS_OK;
}

/* An event base whose epoll backend batches the interest changes of one
 * loop iteration into one epoll_ctl per fd (evhttp enables and disables
 * reading and writing several times per request). */
static struct event_base *loop_base_new(void)
{
    struct event_config *cfg = event_config_new();
    struct event_base *base;

    if (cfg == NULL)
        return NULL;
    event_config_set_flag(cfg, EVENT_BASE_FLAG_EPOLL_USE_CHANGELIST);
    base = event_base_new_with_config(cfg);
    event_config_free(cfg);
    return base;
}

static p11kms_status loop_init(kms_server *srv, loop *lp)
{
    const struct timeval day = {LOOP_MARKER_SECONDS, 0};
    p11kms_status rv;

    lp->srv = srv;
    if (pthread_mutex_init(&lp->done_mu, NULL) != 0)
        return P11KMS_ERR_INTERNAL;
    lp->done_mu_ok = 1;
    lp->base = loop_base_new();
    if (lp->base == NULL || (lp->http = evhttp_new(lp->base)) == NULL ||
        (lp->ev_done = event_new(lp->base, -1, 0, on_done_ready, lp)) == NULL ||
        (lp->accept_resume = evtimer_new(lp->base, resume_accept, lp)) == NULL ||
        (lp->marker = event_new(lp->base, -1, EV_PERSIST, on_loop_marker, lp)) == NULL ||
        event_add(lp->marker, &day) != 0)
        return P11KMS_ERR_NO_MEMORY;
    if ((rv = http_init(srv, lp, lp->http, make_bev, srv->listen_fd, &lp->listener)) != P11KMS_OK)
        return rv;
    if (srv->tls == NULL)
        return P11KMS_OK;
    if ((lp->http_tls = evhttp_new(lp->base)) == NULL)
        return P11KMS_ERR_NO_MEMORY;
    return http_init(srv, lp, lp->http_tls, make_bev_tls, srv->tls_fd, &lp->listener_tls);
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
    for (size_t i = 0; i < srv->n_loops; i++) {
        if (srv->loops[i].listener != NULL)
            evconnlistener_disable(srv->loops[i].listener);
        if (srv->loops[i].listener_tls != NULL)
            evconnlistener_disable(srv->loops[i].listener_tls);
    }
    remove_socket(srv);
    clock_gettime(CLOCK_MONOTONIC, &srv->drain_start);
    srv->ev_drain = event_new(srv->control, -1, EV_PERSIST, on_drain_tick, srv);
    if (srv->ev_drain == NULL || event_add(srv->ev_drain, &tick) != 0)
        stop_loops(srv);
}

/* Install the policy of cfg: policy.file, else the built-in one.  At
 * start a bad file is an error; on SIGHUP it keeps the policy in force. */
static p11kms_status load_policy(kms_server *srv, int reload)
{
    const kms_config *cfg = srv->cfg;
    kms_policy *pol = NULL;
    char err[KMS_POLICY_ERR_MAX];
    p11kms_status rv;

    if (cfg->policy_file == NULL) {
        if (reload) {
            LOG_INFO("policy", "SIGHUP: no policy.file configured; the built-in policy stays");
            return P11KMS_OK;
        }
        if ((rv = kms_policy_default(geteuid(), &pol)) != P11KMS_OK)
            return rv;
        LOG_WARN("policy",
                 "no [policy] file configured: built-in policy, only uid:%u (the kmsd user) and "
                 "uid:0 may generate, decrypt and admin; everyone else is refused "
                 "(docs/operations.md)",
                 (unsigned)geteuid());
        kms_policy_slot_set(&srv->policy, pol);
        return P11KMS_OK;
    }
    rv = kms_policy_load(cfg->policy_file, &pol, err, sizeof(err));
    if (rv != P11KMS_OK) {
        if (reload)
            LOG_ERROR("policy", "SIGHUP: policy not reloaded, the previous one stays in force: %s",
                      err);
        else
            LOG_ERROR("policy", "%s", err);
        return rv;
    }
    LOG_INFO("policy", "%s policy %s: %zu rules, %zu bearer tokens", reload ? "reloaded" : "loaded",
             cfg->policy_file, kms_policy_rule_count(pol), kms_policy_token_count(pol));
    kms_policy_slot_set(&srv->policy, pol);
    return P11KMS_OK;
}

static void on_hup(evutil_socket_t sig, short what, void *arg)
{
    (void)sig;
    (void)what;
    load_policy(arg, 1);
}

p11kms_status kms_server_new(const kms_config *cfg, kms_core *core, kms_server **out)
{
    char err[KMS_CONFIG_ERR_MAX];
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    kms_server *srv = calloc(1, sizeof(*srv));

    if (srv == NULL)
        goto out;
    srv->cfg = cfg;
    srv->core = core;
    srv->listen_fd = -1;
    srv->tls_fd = -1;
    kms_policy_slot_init(&srv->policy);
    atomic_init(&srv->inflight, 0);
    atomic_init(&srv->connections, 0);
    atomic_init(&srv->async_pending, 0);
    atomic_init(&srv->request_timeouts, 0);
    atomic_init(&srv->accept_pauses, 0);
    atomic_init(&srv->draining, 0);
    atomic_init(&srv->last_accept_warn, -3600);
    if ((rv = load_policy(srv, 0)) != P11KMS_OK)
        goto out;
    if (cfg->listen_tls != NULL &&
        ((rv = kms_tls_new(cfg, &srv->tls, err, sizeof(err))) != P11KMS_OK ||
         (rv = kms_tls_listen(cfg, &srv->tls_fd, err, sizeof(err))) != P11KMS_OK)) {
        LOG_ERROR("http", "%s", err);
        goto out;
    }
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
    srv->ev_hup = evsignal_new(srv->control, SIGHUP, on_hup, srv);
    if (srv->ev_term == NULL || srv->ev_int == NULL || srv->ev_hup == NULL ||
        event_add(srv->ev_term, NULL) != 0 || event_add(srv->ev_int, NULL) != 0 ||
        event_add(srv->ev_hup, NULL) != 0)
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
    if (srv->tls != NULL)
        LOG_INFO("http", "listening on %s (TLS 1.2+, client certificates from %s)",
                 srv->cfg->listen_tls, srv->cfg->tls_client_ca);
    event_base_loop(srv->control, EVLOOP_NO_EXIT_ON_EMPTY);
    return rv;
}

/* At exit, after the loops and workers stopped: wait for the store to
 * finish the asynchronous calls still in flight (it always does, with a
 * commit or an error), then drop their unanswered requests. */
static void drop_async(kms_server *srv)
{
    const struct timespec tick = {0, 1000000};
    pending *p, *next;

    while (atomic_load(&srv->async_pending) > 0)
        nanosleep(&tick, NULL);
    for (size_t i = 0; i < srv->n_loops; i++) {
        if (!srv->loops[i].done_mu_ok)
            continue;
        pthread_mutex_lock(&srv->loops[i].done_mu);
        p = srv->loops[i].done_head;
        srv->loops[i].done_head = srv->loops[i].done_tail = NULL;
        pthread_mutex_unlock(&srv->loops[i].done_mu);
        for (; p != NULL; p = next) {
            next = p->next;
            kms_reply_clear(&p->reply);
            kms_call_free(p->call);
            kms_policy_unref(p->policy);
            free(p);
        }
    }
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
    drop_async(srv);
    for (size_t i = 0; i < srv->n_loops; i++) {
        if (srv->loops[i].http != NULL)
            evhttp_free(srv->loops[i].http); /* frees its listener too */
        else if (srv->loops[i].listener != NULL)
            evconnlistener_free(srv->loops[i].listener);
        if (srv->loops[i].http_tls != NULL)
            evhttp_free(srv->loops[i].http_tls);
        else if (srv->loops[i].listener_tls != NULL)
            evconnlistener_free(srv->loops[i].listener_tls);
        if (srv->loops[i].ev_done != NULL)
            event_free(srv->loops[i].ev_done);
        if (srv->loops[i].accept_resume != NULL)
            event_free(srv->loops[i].accept_resume);
        if (srv->loops[i].marker != NULL)
            event_free(srv->loops[i].marker);
        if (srv->loops[i].base != NULL)
            event_base_free(srv->loops[i].base);
        if (srv->loops[i].done_mu_ok)
            pthread_mutex_destroy(&srv->loops[i].done_mu);
    }
    free(srv->loops);
    if (srv->ev_drain != NULL)
        event_free(srv->ev_drain);
    if (srv->ev_term != NULL)
        event_free(srv->ev_term);
    if (srv->ev_int != NULL)
        event_free(srv->ev_int);
    if (srv->ev_hup != NULL)
        event_free(srv->ev_hup);
    if (srv->control != NULL)
        event_base_free(srv->control);
    remove_socket(srv);
    if (srv->listen_fd >= 0)
        close(srv->listen_fd);
    if (srv->tls_fd >= 0)
        close(srv->tls_fd);
    kms_tls_free(srv->tls);
    kms_policy_slot_destroy(&srv->policy);
    free(srv);
}
