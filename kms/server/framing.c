/*
 * kms/server/framing.c - the request framing guard (see framing.h).
 *
 * One small state machine per connection, run by libevent's filtering
 * bufferevent on every read: HEAD (waiting for a complete head), BODY
 * (passing n body bytes through), DRAIN (discarding n body bytes of a
 * refused request, then emitting its synthetic head) and DISCARD
 * (dropping everything until evhttp closes the connection).
 *
 * The request timer (request_timeout_ms) runs from the filter's creation
 * until the first request has passed whole, and then from the first byte
 * of each later request until it has; a refused request keeps it running
 * (its body is drained, then the connection closes anyway).  When it
 * fires, the socket is shut down: the lower bufferevent reads end-of-file
 * and evhttp frees the connection (and this filter).
 */
#include "kms/server/framing.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <openssl/crypto.h>

#include "module/log.h"

#define TARGET_MAX 4096

enum state { ST_HEAD, ST_BODY, ST_DRAIN, ST_DISCARD };

typedef struct framing {
    size_t max_body, max_head;
    enum state state;
    uint64_t remaining; /* ST_BODY, ST_DRAIN */
    char *pending;      /* synthetic head emitted after ST_DRAIN */
    const char *refuse_all;
    void (*on_close)(void *);
    void (*on_timeout)(void *);
    void *arg;
    struct bufferevent *under; /* the socket (or TLS) bufferevent: its fd */
    struct event *timer;       /* the request timer; NULL without a bound */
    struct timeval timeout;
    int timing; /* the timer is armed */
} framing;

/* A request has started: arm the timer if it is not running. */
static void request_started(framing *f)
{
    if (f->timer != NULL && !f->timing && evtimer_add(f->timer, &f->timeout) == 0)
        f->timing = 1;
}

/* A request has passed whole. */
static void request_done(framing *f)
{
    if (f->timer != NULL && f->timing) {
        evtimer_del(f->timer);
        f->timing = 0;
    }
}

static void on_request_timeout(evutil_socket_t fd, short what, void *arg)
{
    framing *f = arg;
    evutil_socket_t sock = bufferevent_getfd(f->under);

    (void)fd;
    (void)what;
    f->timing = 0;
    f->state = ST_DISCARD;
    LOG_DEBUG("http", "closing a connection: its request did not arrive whole within %ld ms",
              (long)f->timeout.tv_sec * 1000 + (long)f->timeout.tv_usec / 1000);
    if (f->on_timeout != NULL)
        f->on_timeout(f->arg);
    if (sock >= 0)
        shutdown(sock, SHUT_RDWR);
}

static const char *const known_methods[] = {"GET",     "POST",  "HEAD",    "PUT",   "DELETE",
                                            "OPTIONS", "TRACE", "CONNECT", "PATCH", NULL};

static int method_known(const char *m)
{
    for (size_t i = 0; known_methods[i] != NULL; i++)
        if (strcmp(m, known_methods[i]) == 0)
            return 1;
    return 0;
}

static int method_takes_body(const char *m)
{
    return strcmp(m, "POST") == 0 || strcmp(m, "PUT") == 0 || strcmp(m, "PATCH") == 0;
}

/* An origin-form target ("/path?query") that evhttp parses too: a target
 * evhttp cannot parse would get its HTML 400, and "//host/path" would be
 * read by evhttp as an authority plus another path (found by
 * tests/fuzz/fuzz_http_request.c). */
static int target_ok(const char *t)
{
    size_t n = strlen(t);
    struct evhttp_uri *uri;

    if (n == 0 || n > TARGET_MAX || t[0] != '/' || t[1] == '/')
        return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)t[i] <= 0x20 || (unsigned char)t[i] >= 0x7f)
            return 0;
    uri = evhttp_uri_parse_with_flags(t, EVHTTP_URI_NONCONFORMANT);
    if (uri == NULL)
        return 0;
    evhttp_uri_free(uri);
    return 1;
}

/* Length of the complete head at the start of src (through its empty
 * line), 0 when incomplete. */
static size_t head_length(struct evbuffer *src, size_t limit)
{
    struct evbuffer_ptr pos, eol;
    size_t eol_len = 0, line_start = 0;

    evbuffer_ptr_set(src, &pos, 0, EVBUFFER_PTR_SET);
    for (;;) {
        eol = evbuffer_search_eol(src, &pos, &eol_len, EVBUFFER_EOL_CRLF);
        if (eol.pos < 0)
            return 0;
        if ((size_t)eol.pos == line_start && line_start > 0)
            return (size_t)eol.pos + eol_len;
        line_start = (size_t)eol.pos + eol_len;
        if (line_start > limit)
            return 0;
        if (evbuffer_ptr_set(src, &pos, line_start, EVBUFFER_PTR_SET) != 0)
            return 0;
    }
}

typedef struct head_info {
    char method[16];
    char target[TARGET_MAX + 1];
    int have_line;          /* method and target are valid */
    int64_t content_length; /* -1: none */
    int expect_continue;
    const char *refuse; /* reason, NULL when fine */
} head_info;

/* "METHOD SP /target SP HTTP/1.x" (line without its CR LF): fills h, or
 * sets h->refuse.  Also used on a first line whose head is not complete. */
static void parse_request_line(char *line, head_info *h)
{
    char *sp1 = strchr(line, ' ');
    char *sp2 = sp1 != NULL ? strchr(sp1 + 1, ' ') : NULL;

    if (sp1 == NULL || sp2 == NULL || strchr(sp2 + 1, ' ') != NULL ||
        (size_t)(sp1 - line) >= sizeof(h->method)) {
        h->refuse = KMS_FRAMING_MALFORMED;
        return;
    }
    *sp1 = *sp2 = '\0';
    if (!target_ok(sp1 + 1) ||
        (strcmp(sp2 + 1, "HTTP/1.1") != 0 && strcmp(sp2 + 1, "HTTP/1.0") != 0)) {
        h->refuse = KMS_FRAMING_MALFORMED;
        return;
    }
    snprintf(h->method, sizeof(h->method), "%s", line);
    snprintf(h->target, sizeof(h->target), "%s", sp1 + 1);
    h->have_line = 1;
    if (!method_known(h->method))
        h->refuse = KMS_FRAMING_METHOD;
}

/* RFC 9110 field names are tokens; values hold no control byte but HTAB.
 * A name with a blank before the colon, a bare CR or a NUL would be read
 * one way here and another way by evhttp (request smuggling), so they are
 * refused (found by tests/test_kmsd_malformed.c). */
static int header_ok(const char *name, const char *value)
{
    for (const char *c = name; *c != '\0'; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              strchr("!#$%&'*+-.^_`|~", *c) != NULL))
            return 0;
    for (const unsigned char *c = (const unsigned char *)value; *c != '\0'; c++)
        if ((*c < 0x20 && *c != '\t') || *c == 0x7f)
            return 0;
    return 1;
}

static void parse_head(char *head, size_t max_body, head_info *h)
{
    char *save = NULL, *line;
    int first = 1;

    h->content_length = -1;
    for (line = strtok_r(head, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        size_t n = strlen(line);
        char *colon, *value, *end;

        if (n > 0 && line[n - 1] == '\r')
            line[--n] = '\0';
        if (first) {
            first = 0;
            parse_request_line(line, h);
            if (!h->have_line)
                return;
            continue;
        }
        if (n == 0)
            break;
        colon = strchr(line, ':');
        if (line[0] == ' ' || line[0] == '\t' || colon == NULL || colon == line) {
            h->refuse = KMS_FRAMING_MALFORMED; /* obsolete folding or no name */
            return;
        }
        *colon = '\0';
        value = colon + 1;
        while (*value == ' ' || *value == '\t')
            value++;
        end = value + strlen(value);
        while (end > value && (end[-1] == ' ' || end[-1] == '\t'))
            *--end = '\0';
        if (!header_ok(line, value)) {
            h->refuse = KMS_FRAMING_MALFORMED;
            return;
        }
        if (strcasecmp(line, KMS_FRAMING_HEADER) == 0) {
            h->refuse = KMS_FRAMING_MALFORMED;
            return;
        }
        if (strcasecmp(line, "Transfer-Encoding") == 0) {
            if (h->refuse == NULL)
                h->refuse = KMS_FRAMING_CHUNKED;
        } else if (strcasecmp(line, "Content-Length") == 0) {
            uint64_t v = 0;
            if (h->content_length >= 0 || *value == '\0') {
                h->refuse = KMS_FRAMING_MALFORMED;
                return;
            }
            for (const char *c = value; *c != '\0'; c++) {
                if (*c < '0' || *c > '9' || v > (UINT64_C(1) << 52)) {
                    h->refuse = KMS_FRAMING_MALFORMED;
                    return;
                }
                v = v * 10 + (uint64_t)(*c - '0');
            }
            h->content_length = (int64_t)v;
        } else if (strcasecmp(line, "Expect") == 0) {
            h->expect_continue = strcasecmp(value, "100-continue") == 0;
        }
    }
    if (!h->have_line && h->refuse == NULL)
        h->refuse = KMS_FRAMING_MALFORMED; /* no request line at all */
    if (h->refuse != NULL)
        return;
    if (h->content_length > 0 && !method_takes_body(h->method))
        h->refuse = KMS_FRAMING_UNEXPECTED_BODY;
    else if (h->content_length > (int64_t)max_body)
        h->refuse = KMS_FRAMING_TOO_LARGE;
}

static char *synthetic_head(const head_info *h, const char *reason)
{
    char *out = NULL;
    const char *method = "GET", *target = "/";

    if (h->have_line) {
        target = h->target;
        if (method_known(h->method))
            method = h->method;
    }
    if (asprintf(&out, "%s %s HTTP/1.1\r\n" KMS_FRAMING_HEADER ": %s\r\nContent-Length: 0\r\n\r\n",
                 method, target, reason) < 0)
        return NULL;
    return out;
}

/* Handle one complete or over-long head.  Returns 1 if bytes went to dst. */
static int on_head(framing *f, struct evbuffer *src, struct evbuffer *dst, size_t len,
                   const char *forced)
{
    head_info h;
    char *head = NULL, *syn = NULL;
    int emitted = 0;

    memset(&h, 0, sizeof(h));
    if (forced != NULL) {
        h.refuse = forced;
        h.content_length = -1;
    } else {
        head = malloc(len + 1);
        if (head == NULL) {
            h.refuse = KMS_FRAMING_MALFORMED;
        } else {
            evbuffer_copyout(src, head, len);
            head[len] = '\0';
            /* A NUL would end the text parse_head reads but not evhttp's
             * lines: refuse it rather than disagree about the framing. */
            if (memchr(head, '\0', len) != NULL)
                h.refuse = KMS_FRAMING_MALFORMED;
            else
                parse_head(head, f->max_body, &h);
            if (f->refuse_all != NULL && h.refuse == NULL)
                h.refuse = f->refuse_all;
        }
    }
    if (h.refuse == NULL) {
        evbuffer_remove_buffer(src, dst, len);
        emitted = 1;
        if (h.content_length > 0) {
            f->state = ST_BODY;
            f->remaining = (uint64_t)h.content_length;
        }
        goto out;
    }
    syn = synthetic_head(&h, h.refuse);
    if (forced != NULL)
        evbuffer_drain(src, evbuffer_get_length(src));
    else
        evbuffer_drain(src, len);
    if (syn == NULL) {
        f->state = ST_DISCARD; /* out of memory: the timeout closes it */
        goto out;
    }
    /* Only a refusal whose framing is sound can wait for its body. */
    if (h.content_length > 0 && !h.expect_continue &&
        (strcmp(h.refuse, KMS_FRAMING_TOO_LARGE) == 0 ||
         strcmp(h.refuse, KMS_FRAMING_UNEXPECTED_BODY) == 0 ||
         strcmp(h.refuse, KMS_FRAMING_METHOD) == 0 || strcmp(h.refuse, KMS_FRAMING_BUSY) == 0)) {
        /* Read the refused body first, then answer. */
        f->state = ST_DRAIN;
        f->remaining = (uint64_t)h.content_length;
        f->pending = syn;
        syn = NULL;
        goto out;
    }
    evbuffer_add(dst, syn, strlen(syn));
    emitted = 1;
    f->state = ST_DISCARD;
out:
    if (head != NULL) { /* it may hold an Authorization header */
        OPENSSL_cleanse(head, len + 1);
        free(head);
    }
    free(syn);
    return emitted;
}

/* While a head is incomplete: 0 when what came of its first line can
 * never be a request line (binary such as a TLS hello, a control byte, an
 * over-long method, an HTTP/0.9 "GET /path" line), so that it is refused
 * at once instead of waiting for an empty line that may never come. */
static int first_line_may_be_valid(struct evbuffer *src)
{
    char line[sizeof(((head_info *)0)->method) + TARGET_MAX + 16];
    size_t n = 0, i;
    ev_ssize_t got = evbuffer_copyout(src, line, sizeof(line) - 1);
    head_info h;
    int ok = 1;

    if (got <= 0)
        goto out;
    n = (size_t)got;
    for (i = 0; i < n && line[i] != '\n'; i++) {
        unsigned char c = (unsigned char)line[i];
        if (c == '\r' && (i + 1 == n || line[i + 1] == '\n'))
            continue; /* CR LF, or a CR whose LF is on its way */
        if (c < 0x20 || c >= 0x7f || (c == ' ' && i == 0)) {
            ok = 0;
            goto out;
        }
    }
    if (i == n) { /* no line end yet: the method must end within 16 bytes */
        ok = n < sizeof(line) - 1 &&
             (n < sizeof(h.method) || memchr(line, ' ', sizeof(h.method)) != NULL);
        goto out;
    }
    if (i > 0 && line[i - 1] == '\r')
        i--;
    if (i == 0) {
        ok = 0; /* an empty first line (parse_head refuses it too) */
        goto out;
    }
    line[i] = '\0';
    memset(&h, 0, sizeof(h));
    parse_request_line(line, &h);
    ok = h.have_line;
out:
    /* The copy may reach into the headers (an Authorization header). */
    OPENSSL_cleanse(line, n);
    return ok;
}

static enum bufferevent_filter_result framing_in(struct evbuffer *src, struct evbuffer *dst,
                                                 ev_ssize_t lim, enum bufferevent_flush_mode mode,
                                                 void *arg)
{
    framing *f = arg;
    int emitted = 0;
    size_t avail, n;

    (void)lim;
    (void)mode;
    for (;;) {
        avail = evbuffer_get_length(src);
        if (f->state == ST_DISCARD) {
            evbuffer_drain(src, avail);
            break;
        }
        if (avail == 0 && !(f->state == ST_DRAIN && f->remaining == 0))
            break;
        if (f->state == ST_BODY || f->state == ST_DRAIN) {
            n = avail < f->remaining ? avail : (size_t)f->remaining;
            if (f->state == ST_BODY) {
                evbuffer_remove_buffer(src, dst, n);
                emitted = emitted || n > 0;
            } else {
                evbuffer_drain(src, n);
            }
            f->remaining -= n;
            if (f->remaining > 0)
                break;
            if (f->state == ST_DRAIN) {
                evbuffer_add(dst, f->pending, strlen(f->pending));
                free(f->pending);
                f->pending = NULL;
                emitted = 1;
                f->state = ST_DISCARD;
            } else {
                f->state = ST_HEAD;
                request_done(f);
            }
            continue;
        }
        /* ST_HEAD, with bytes of a request */
        request_started(f);
        n = head_length(src, f->max_head);
        if (n == 0) {
            if (avail > f->max_head)
                emitted |= on_head(f, src, dst, avail, KMS_FRAMING_HEAD_TOO_LARGE);
            else if (!first_line_may_be_valid(src))
                emitted |= on_head(f, src, dst, avail, KMS_FRAMING_MALFORMED);
            break;
        }
        if (n > f->max_head) {
            emitted |= on_head(f, src, dst, n, KMS_FRAMING_HEAD_TOO_LARGE);
            break;
        }
        emitted |= on_head(f, src, dst, n, NULL);
        if (f->state == ST_HEAD)
            request_done(f); /* a request without a body */
    }
    return emitted ? BEV_OK : BEV_NEED_MORE;
}

static void framing_free(void *arg)
{
    framing *f = arg;

    if (f == NULL)
        return;
    if (f->on_close != NULL)
        f->on_close(f->arg);
    if (f->timer != NULL)
        event_free(f->timer);
    free(f->pending);
    free(f);
}

struct bufferevent *kms_framing_new(struct event_base *base, const kms_framing_opts *o)
{
    struct bufferevent *under = bufferevent_socket_new(base, -1, BEV_OPT_CLOSE_ON_FREE);

    if (under == NULL)
        return NULL;
    return kms_framing_wrap(under, o);
}

struct bufferevent *kms_framing_wrap(struct bufferevent *under, const kms_framing_opts *o)
{
    struct bufferevent *filter = NULL;
    framing *f = calloc(1, sizeof(*f));

    if (f == NULL)
        goto out;
    f->max_body = o->max_body;
    f->max_head = o->max_head;
    f->refuse_all = o->refuse_all;
    f->under = under;
    if (o->request_timeout_ms > 0) {
        f->timeout.tv_sec = o->request_timeout_ms / 1000;
        f->timeout.tv_usec = (o->request_timeout_ms % 1000) * 1000;
        f->timer = evtimer_new(bufferevent_get_base(under), on_request_timeout, f);
        if (f->timer == NULL)
            goto out;
    }
    filter =
        bufferevent_filter_new(under, framing_in, NULL, BEV_OPT_CLOSE_ON_FREE, framing_free, f);
    if (filter == NULL)
        goto out;
    f->on_close = o->on_close; /* from now on the filter owns f */
    f->on_timeout = o->on_timeout;
    f->arg = o->arg;
    under = NULL;
    request_started(f); /* the first request: from now */
    f = NULL;
out:
    if (under != NULL)
        bufferevent_free(under);
    framing_free(f);
    return filter;
}

size_t kms_framing_feed(const void *data, size_t len, size_t chunk, size_t max_body,
                        size_t max_head, const char *refuse_all, struct evbuffer *out)
{
    framing f;
    struct evbuffer *src = evbuffer_new();
    size_t off = 0, n, held = (size_t)-1;

    memset(&f, 0, sizeof(f));
    f.max_body = max_body;
    f.max_head = max_head;
    f.refuse_all = refuse_all;
    if (src == NULL)
        return held;
    do {
        n = chunk == 0 || len - off < chunk ? len - off : chunk;
        if (evbuffer_add(src, (const char *)data + off, n) != 0)
            goto out;
        off += n;
        framing_in(src, out, -1, BEV_NORMAL, &f);
    } while (off < len);
    held = evbuffer_get_length(src);
out:
    free(f.pending);
    evbuffer_free(src);
    return held;
}
