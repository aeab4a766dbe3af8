/*
 * tests/support/testpki.h - a small PKI for the mutual-TLS tests, made
 * with the OpenSSL C API, and a kmsd.conf with a TLS listener.
 *
 * tp_make_pki writes into dir: ca.crt (CN "p11kms test CA"), other-ca.crt
 * (an unrelated CA) and, each as NAME.crt + NAME.key (0600):
 *   server  CN localhost, SAN IP:127.0.0.1 + DNS:localhost (serverAuth)
 *   app1    CN app-1       (clientAuth, issued by ca)
 *   ops     CN ops-alice   (clientAuth, issued by ca)
 *   nocn    no CN, O only  (clientAuth, issued by ca)
 *   rogue   CN app-1       (clientAuth, issued by other-ca)
 */
#ifndef P11KMS_TESTS_TESTPKI_H
#define P11KMS_TESTS_TESTPKI_H

#include "kmsd_harness.h"

/* Make the PKI above in dir.  0 or -1 (the OpenSSL error is printed). */
int tp_make_pki(const char *dir);

/* A TCP port on 127.0.0.1 free at the time of the call; -1. */
int tp_free_port(void);

/* Add "tls = 127.0.0.1:port" with tls_cert = server.crt, tls_key =
 * server.key, tls_client_ca = ca.crt to k's kmsd.conf (after the
 * "unix = kmsd.sock" line kh_setup writes).  0 or -1. */
int tp_add_tls_listener(kh_kmsd *k, int port);

#endif
