/*
 * kms/server/tls.c - the mutual-TLS listener of kmsd (see tls.h).
 *
 * Owns the SSL_CTX (immutable once built, shared by the loop threads),
 * the TCP listening socket and the per-connection bufferevent_openssl.
 * OpenSSL errors are drained into the message of the failing step.
 */
#include "kms/server/tls.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/bufferevent_ssl.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include "module/log.h"

/* TLS 1.2: ECDHE with AEAD only.  TLS 1.3 keeps OpenSSL's default suites
 * (all AEAD, all forward-secret). */
#define KMS_TLS12_CIPHERS                                                                          \
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"                                   \
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"                                   \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"

struct kms_tls {
    SSL_CTX *ctx;
};

__attribute__((format(printf, 5, 6))) static p11kms_status
tls_fail(const kms_config *cfg, char *err, size_t errlen, int with_ssl_error, const char *fmt, ...)
{
    char msg[512], ssl[256] = "";
    unsigned long e;
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (with_ssl_error && (e = ERR_peek_last_error()) != 0)
        ERR_error_string_n(e, ssl, sizeof(ssl));
    ERR_clear_error();
    snprintf(err, errlen, "%s:%d: %s%s%s", cfg->file, cfg->line_tls, msg, ssl[0] ? ": " : "", ssl);
    return P11KMS_ERR_BAD_REQUEST;
}

p11kms_status kms_tls_new(const kms_config *cfg, kms_tls **out, char *err, size_t errlen)
{
    static const unsigned char sid_ctx[] = "p11kms";
    kms_tls *tls = NULL;
    STACK_OF(X509_NAME) *cas = NULL;
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;

    tls = calloc(1, sizeof(*tls));
    if (tls == NULL)
        goto out;
    tls->ctx = SSL_CTX_new(TLS_server_method());
    if (tls->ctx == NULL) {
        rv = tls_fail(cfg, err, errlen, 1, "listen.tls: cannot create the TLS context");
        goto out;
    }
    if (SSL_CTX_set_min_proto_version(tls->ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_set_cipher_list(tls->ctx, KMS_TLS12_CIPHERS) != 1) {
        rv = tls_fail(cfg, err, errlen, 1, "listen.tls: cannot set protocol versions or ciphers");
        goto out;
    }
    SSL_CTX_set_options(tls->ctx, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION |
                                      SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* A record is decrypted in place in the read buffer, which keeps the
     * plaintext (a request head with its bearer token) until the next
     * record overwrites it: wipe it once libevent has taken the bytes. */
    SSL_CTX_set_options(tls->ctx, SSL_OP_CLEANSE_PLAINTEXT);
    if (SSL_CTX_use_certificate_chain_file(tls->ctx, cfg->tls_cert) != 1) {
        rv = tls_fail(cfg, err, errlen, 1, "listen.tls_cert: cannot load '%s'", cfg->tls_cert);
        goto out;
    }
    if (SSL_CTX_use_PrivateKey_file(tls->ctx, cfg->tls_key, SSL_FILETYPE_PEM) != 1) {
        rv = tls_fail(cfg, err, errlen, 1, "listen.tls_key: cannot load '%s'", cfg->tls_key);
        goto out;
    }
    if (SSL_CTX_check_private_key(tls->ctx) != 1) {
        rv = tls_fail(cfg, err, errlen, 1, "listen.tls_key: '%s' does not match listen.tls_cert",
                      cfg->tls_key);
        goto out;
    }
    if (SSL_CTX_load_verify_locations(tls->ctx, cfg->tls_client_ca, NULL) != 1 ||
        (cas = SSL_load_client_CA_file(cfg->tls_client_ca)) == NULL) {
        rv = tls_fail(cfg, err, errlen, 1, "listen.tls_client_ca: cannot load '%s'",
                      cfg->tls_client_ca);
        goto out;
    }
    SSL_CTX_set_client_CA_list(tls->ctx, cas); /* takes cas */
    SSL_CTX_set_verify(tls->ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_CTX_set_verify_depth(tls->ctx, 8);
    SSL_CTX_set_session_id_context(tls->ctx, sid_ctx, sizeof(sid_ctx) - 1);
    *out = tls;
    tls = NULL;
    rv = P11KMS_OK;
out:
    if (rv == P11KMS_ERR_NO_MEMORY)
        snprintf(err, errlen, "%s: out of memory", cfg->file);
    kms_tls_free(tls);
    return rv;
}

p11kms_status kms_tls_listen(const kms_config *cfg, int *out, char *err, size_t errlen)
{
    char host[256], port[16];
    struct addrinfo hints, *ai = NULL;
    int fd = -1, one = 1, r;
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;

    if (kms_config_split_hostport(cfg->listen_tls, host, sizeof(host), port, sizeof(port)) != 0) {
        rv = tls_fail(cfg, err, errlen, 0, "listen.tls: expected host:port, not '%s'",
                      cfg->listen_tls);
        goto out;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    if ((r = getaddrinfo(host, port, &hints, &ai)) != 0) {
        rv = tls_fail(cfg, err, errlen, 0, "listen.tls: cannot resolve '%s': %s", host,
                      gai_strerror(r));
        goto out;
    }
    fd = socket(ai->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 || setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) != 0 ||
        bind(fd, ai->ai_addr, ai->ai_addrlen) != 0 || listen(fd, 1024) != 0) {
        rv = tls_fail(cfg, err, errlen, 0, "listen.tls: cannot listen on %s: %s", cfg->listen_tls,
                      strerror(errno));
        goto out;
    }
    *out = fd;
    fd = -1;
    rv = P11KMS_OK;
out:
    if (fd >= 0)
        close(fd);
    if (ai != NULL)
        freeaddrinfo(ai);
    return rv;
}

struct bufferevent *kms_tls_bev_new(kms_tls *tls, struct event_base *base)
{
    SSL *ssl = SSL_new(tls->ctx);
    struct bufferevent *bev;

    if (ssl == NULL)
        return NULL;
    /* Frees ssl on failure too. */
    bev = bufferevent_openssl_socket_new(base, -1, ssl, BUFFEREVENT_SSL_ACCEPTING,
                                         BEV_OPT_CLOSE_ON_FREE);
    if (bev != NULL)
        bufferevent_openssl_set_allow_dirty_shutdown(bev, 1);
    return bev;
}

int kms_tls_peer(struct bufferevent *bev, kms_principal *who)
{
    SSL *ssl = bev != NULL ? bufferevent_openssl_get_ssl(bev) : NULL;
    X509 *cert = NULL;
    X509_NAME *subject;
    X509_NAME_ENTRY *entry;
    unsigned char *cn = NULL;
    int idx, len, rv = -1;

    if (ssl == NULL)
        return 0;
    memset(who, 0, sizeof(*who));
    cert = SSL_get1_peer_certificate(ssl);
    if (cert == NULL || SSL_get_verify_result(ssl) != X509_V_OK)
        goto out;
    subject = X509_get_subject_name(cert);
    idx = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
    if (idx < 0 || X509_NAME_get_index_by_NID(subject, NID_commonName, idx) >= 0)
        goto out; /* none, or more than one */
    entry = X509_NAME_get_entry(subject, idx);
    len = ASN1_STRING_to_UTF8(&cn, X509_NAME_ENTRY_get_data(entry));
    if (len <= 0 || (size_t)len + 6 > sizeof(who->name))
        goto out;
    for (int i = 0; i < len; i++)
        if (cn[i] < 0x20 || cn[i] == 0x7f)
            goto out; /* NUL or control characters: never a name */
    snprintf(who->name, sizeof(who->name), "cert:%.*s", len, (const char *)cn);
    rv = 1;
out:
    OPENSSL_free(cn);
    X509_free(cert);
    return rv;
}

void kms_tls_free(kms_tls *tls)
{
    if (tls == NULL)
        return;
    SSL_CTX_free(tls->ctx);
    free(tls);
}
