/*
 * kms/server/http.h - the HTTP server of kmsd: event loops, the Unix
 * socket listener, request limits, the worker hand-off and the drain on
 * SIGTERM/SIGINT.
 *
 * Threads: `threads` libevent loops accept on one listening socket and
 * parse requests; work that touches the token or the store runs on the
 * worker pool and its reply is handed back to the request's loop, which
 * writes it.  The calling thread runs a small control loop that owns the
 * signals and the drain, and reloads the policy on SIGHUP.  With
 * listen.tls the loops also accept mutual-TLS connections (tls.h).
 */
#ifndef P11KMS_KMS_SERVER_HTTP_H
#define P11KMS_KMS_SERVER_HTTP_H

#include "kms/core/core.h"
#include "kms/server/config.h"
#include "p11kms/status.h"

#define KMS_HTTP_MAX_HEAD        16384 /* request line + headers */
#define KMS_HTTP_DRAIN_SECONDS   10    /* bound of the drain on SIGTERM */
#define KMS_HTTP_ACCEPT_PAUSE_MS 250   /* accept paused this long on EMFILE and the like */

typedef struct kms_server kms_server;

/* Load the policy (policy.file, else the built-in one), create the
 * listening sockets (removing a stale socket file nobody listens on; TLS
 * when configured), the loops and the worker pool.  cfg and core must outlive the
 * server.  Call evthread_use_pthreads() first. */
p11kms_status kms_server_new(const kms_config *cfg, kms_core *core, kms_server **out);

/* Serve until SIGTERM or SIGINT, then stop accepting, let in-flight
 * requests finish (at most KMS_HTTP_DRAIN_SECONDS) and return. */
p11kms_status kms_server_run(kms_server *srv);

/* Stop everything, free, remove the socket file.  NULL is a no-op. */
void kms_server_free(kms_server *srv);

#endif
