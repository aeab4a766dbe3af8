/*
 * kms/server/tls.h - the mutual-TLS listener of kmsd: the OpenSSL server
 * context, the TCP listening socket, one bufferevent_openssl per
 * connection, and the principal cert:<subject CN> of a verified client.
 *
 * TLS 1.2 and 1.3 only, forward-secret AEAD cipher suites, no
 * compression or renegotiation; a client certificate is required and
 * verified against listen.tls_client_ca (a connection without one, or
 * with one the CA did not issue, fails in the handshake and never reaches
 * evhttp).  The SSL_CTX is shared by every loop thread (OpenSSL makes it
 * thread-safe); each SSL belongs to its connection's loop.
 */
#ifndef P11KMS_KMS_SERVER_TLS_H
#define P11KMS_KMS_SERVER_TLS_H

#include <stddef.h>

#include <event2/bufferevent.h>
#include <event2/event.h>

#include "kms/policy/policy.h"
#include "kms/server/config.h"
#include "p11kms/status.h"

typedef struct kms_tls kms_tls;

/* Load certificate, key and client CA of cfg into a new server context.
 * On failure err holds "FILE:LINE: reason" (the config line of the key
 * at fault) and the status is P11KMS_ERR_BAD_REQUEST. */
p11kms_status kms_tls_new(const kms_config *cfg, kms_tls **out, char *err, size_t errlen);

/* Bind and listen on cfg->listen_tls (host:port, [v6]:port).  *fd is
 * non-blocking and close-on-exec. */
p11kms_status kms_tls_listen(const kms_config *cfg, int *fd, char *err, size_t errlen);

/* A server-side bufferevent_openssl in the accepting state, without an fd
 * yet (evhttp sets it), closing fd and SSL when freed.  NULL on error. */
struct bufferevent *kms_tls_bev_new(kms_tls *tls, struct event_base *base);

/* The principal of a TLS connection.  bev is the bufferevent under the
 * framing filter.  Returns 0 when bev is not a TLS bufferevent, 1 with
 * who->name = "cert:<CN>" for a verified client certificate with exactly
 * one printable subject CN, -1 when the certificate gives no usable
 * name (who->name is then empty). */
int kms_tls_peer(struct bufferevent *bev, kms_principal *who);

void kms_tls_free(kms_tls *tls);

#endif
