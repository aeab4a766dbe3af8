/*
 * kms/server/framing.h - request framing guard in front of evhttp.
 *
 * libevent 2.1's evhttp answers its own errors (body too large, chunked
 * body over its cap, malformed heads, unknown methods) with an HTML page,
 * and buffers a whole request body before the request callback runs.  The
 * contract wants every error as JSON and a body over the limit refused
 * before it is buffered.  So every connection's bufferevent is an input
 * filter that reads each request head before evhttp does:
 *
 *   - a head that is fine is passed on unchanged, and so is its body
 *     (Content-Length bytes); pipelining and keep-alive keep working;
 *   - a head that must be refused (Content-Length over max_body, any
 *     Transfer-Encoding, a body on a method that takes none, a head over
 *     max_head bytes, folded or malformed headers -- a field name that is
 *     not a token, a control byte or NUL anywhere --, a target evhttp
 *     could not parse, an unknown method) is
 *     replaced by a synthetic bodiless request with the same method and
 *     target (where they were valid) and the header KMS_FRAMING_HEADER
 *     naming the reason.  The request callback answers it with a JSON
 *     error and closes the connection once the reply is written.  A refused body of known length is
 * read and discarded first (so the client is not cut off mid-upload and never sees a reset);
 * anything else after a refusal is discarded until the connection closes.
 *
 * A first line that can never be a request line (binary, a control byte,
 * HTTP/0.9) is refused as soon as it is seen, not after a timeout.
 *
 * Slow clients: each request must arrive whole (head and body) within
 * request_timeout_ms, counted from the connection's creation for the first
 * request and from its first byte for a later one on a kept-alive
 * connection.  A request that is slower (a head or a body sent a byte at
 * a time, a head never finished) is not answered: the socket is shut down
 * so evhttp sees end-of-file and frees the connection.  evhttp's own
 * timeout (the filter's read timeout) bounds idle connections between
 * requests; it alone would not bound a body trickled a byte at a time,
 * since every byte passed through resets it.
 * A client may not send KMS_FRAMING_HEADER itself (refused as malformed).
 * Memory per connection is bounded by max_head + max_body.  Each filter
 * belongs to one event loop thread; no locking.
 */
#ifndef P11KMS_KMS_SERVER_FRAMING_H
#define P11KMS_KMS_SERVER_FRAMING_H

#include <stddef.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#define KMS_FRAMING_HEADER "X-P11kms-Refused"

/* Reasons (values of KMS_FRAMING_HEADER). */
#define KMS_FRAMING_TOO_LARGE       "too-large" /* Content-Length > max_body */
#define KMS_FRAMING_CHUNKED         "chunked"   /* Transfer-Encoding */
#define KMS_FRAMING_UNEXPECTED_BODY "body"      /* body on GET/HEAD/DELETE/... */
#define KMS_FRAMING_HEAD_TOO_LARGE  "head-too-large"
#define KMS_FRAMING_MALFORMED       "malformed" /* bad request line or header */
#define KMS_FRAMING_METHOD          "method"    /* method evhttp does not know */
#define KMS_FRAMING_BUSY            "busy"      /* over max_connections */

/* What a connection's filter enforces, and whom it tells. */
typedef struct kms_framing_opts {
    size_t max_body;
    size_t max_head;
    int request_timeout_ms; /* a request must arrive whole within this; 0: no bound */
    /* When not NULL, the first request is refused with this reason
     * whatever it is (used for KMS_FRAMING_BUSY). */
    const char *refuse_all;
    void (*on_close)(void *arg);   /* the connection's bufferevent is freed */
    void (*on_timeout)(void *arg); /* may be NULL: a request was too slow (closing) */
    void *arg;
} kms_framing_opts;

/* A new connection bufferevent (no fd yet: evhttp sets it) for
 * evhttp_set_bevcb; o is copied.  NULL when out of memory (on_close is
 * then not called). */
struct bufferevent *kms_framing_new(struct event_base *base, const kms_framing_opts *o);

/* The same filter over an existing bufferevent (a TLS one: tls.h), which
 * it owns from now on, even when it fails (it is then freed). */
struct bufferevent *kms_framing_wrap(struct bufferevent *under, const kms_framing_opts *o);

/* The filter without a connection (tests and tests/fuzz/): run a fresh
 * filter over data[0..len) delivered in pieces of `chunk` bytes (0: all
 * at once), appending what evhttp would read to out (no timer: the
 * timeout needs a connection).  Returns how many
 * input bytes are still held (an incomplete head), or (size_t)-1 when out
 * of memory. */
size_t kms_framing_feed(const void *data, size_t len, size_t chunk, size_t max_body,
                        size_t max_head, const char *refuse_all, struct evbuffer *out);

#endif
