/*
 * kms/server/routes.h - the HTTP API of kmsd: route table, request
 * validation, handlers and JSON rendering (docs/api.md).
 *
 * A request is handled in two steps.  kms_routes_prepare runs on the
 * request's event loop: it matches the route and method, reads and
 * validates the body (JSON depth, unknown fields, names, contexts, DEK
 * ids) and either answers at once (404, 405, 400, 413) or returns a call.
 * kms_routes_execute runs the call on a worker thread against the core
 * (token and store) and renders the reply.  Neither keeps state between
 * requests.
 */
#ifndef P11KMS_KMS_SERVER_ROUTES_H
#define P11KMS_KMS_SERVER_ROUTES_H

#include <stddef.h>

#include "kms/core/core.h"
#include "p11kms/status.h"

#define KMS_JSON_MAX_DEPTH 8

/* A reply: status and a JSON body.  The body may hold a plaintext DEK: it
 * is wiped when released (kms_reply_clear or the HTTP writer). */
typedef struct kms_reply {
    int status;
    char *body; /* malloc'd JSON text (not NUL-terminated), or NULL */
    size_t len;
    char allow[96];           /* Allow header value for 405, "" otherwise */
    int retry_after;          /* seconds; 0: no Retry-After */
    int close;                /* answer with Connection: close */
    const char *content_type; /* static string; NULL: application/json */
} kms_reply;

typedef struct kms_request_info {
    const char *method;  /* "GET", ... */
    const char *path;    /* without the query */
    const char *query;   /* the raw query string (after '?'), or NULL */
    const char *refused; /* KMS_FRAMING_* reason, or NULL */
    const unsigned char *body;
    size_t body_len;
    size_t max_body;
    const char *principal; /* "uid:1000" */
} kms_request_info;

typedef struct kms_call kms_call;

/* On the loop thread.  Either *call is set (run it with
 * kms_routes_execute) or *call is NULL and reply holds the answer. */
void kms_routes_prepare(const kms_request_info *in, kms_call **call, kms_reply *reply);

/* On a worker thread: run the call, fill reply.  Does not free call. */
void kms_routes_execute(kms_core *core, kms_call *call, kms_reply *reply);

/* The hot routes (datakey generate and decrypt) without holding the
 * worker through the commit (kms_dek_op in core.h).  1: the call went
 * asynchronous; done(arg) follows exactly once (possibly on the store's
 * writer thread, possibly before this returns: it must only hand the
 * request on), then kms_routes_complete writes the reply.  0: not
 * started (another route, or out of memory); run kms_routes_execute.
 * known: the DEK's record if authorization read it (or NULL). */
int kms_routes_start(kms_core *core, kms_call *call, const kms_dek_rec *known,
                     kms_dek_op_done_fn done, void *arg);

/* After done(): the reply (never blocks).  0 when the call must be run
 * again with kms_routes_execute, on a worker. */
int kms_routes_complete(kms_call *call, kms_reply *reply);

/* A short name of the call's operation for the log ("datakey.generate"). */
const char *kms_call_name(const kms_call *call);

/* What a call needs from the policy (kms/server/authz.c decides).  op is
 * 0 for an open route (GET /v1/health), else one kms_policy_op: generate
 * and decrypt for their two routes, admin for every other route (so a
 * route added later is admin until said otherwise).  The call addresses a
 * DEK (dek_id set: its key is known after a lookup), a key (key set), or
 * no key (both NULL).  The pointers live as long as the call. */
typedef struct kms_call_access {
    int op;
    const char *key;
    const char *dek_id;
} kms_call_access;

void kms_call_access_get(const kms_call *call, kms_call_access *out);

void kms_call_free(kms_call *call);

/* Fill reply with the JSON error of status s and a formatted message. */
void kms_reply_error(kms_reply *r, p11kms_status s, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Wipe and free the body. */
void kms_reply_clear(kms_reply *r);

#endif
