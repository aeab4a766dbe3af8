/*
 * tests/support/testpki.c - see testpki.h.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "testpki.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509v3.h>

static long serial = 1;

enum kind { CA, SERVER, CLIENT };

static int add_ext(X509 *x, X509V3_CTX *ctx, int nid, const char *value)
{
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, ctx, nid, value);
    int ok;

    if (ext == NULL)
        return -1;
    ok = X509_add_ext(x, ext, -1) == 1;
    X509_EXTENSION_free(ext);
    return ok ? 0 : -1;
}

/* A certificate for key with CN cn (NULL: no CN, an O only), issued by
 * issuer/issuer_key (NULL: self-signed).  NULL on error. */
static X509 *make_cert(EVP_PKEY *key, const char *cn, X509 *issuer, EVP_PKEY *issuer_key,
                       enum kind kind)
{
    X509 *x = X509_new();
    X509_NAME *name;
    X509V3_CTX ctx;
    int bad = 0;

    if (x == NULL)
        return NULL;
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), serial++);
    X509_gmtime_adj(X509_getm_notBefore(x), -3600);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, key);
    name = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8, (const unsigned char *)"p11kms tests", -1,
                               -1, 0);
    if (cn != NULL)
        X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const unsigned char *)cn, -1, -1, 0);
    X509_set_issuer_name(x, issuer != NULL ? X509_get_subject_name(issuer) : name);
    X509V3_set_ctx_nodb(&ctx);
    X509V3_set_ctx(&ctx, issuer != NULL ? issuer : x, x, NULL, NULL, 0);
    bad |= add_ext(x, &ctx, NID_subject_key_identifier, "hash");
    if (kind == CA) {
        bad |= add_ext(x, &ctx, NID_basic_constraints, "critical,CA:TRUE");
        bad |= add_ext(x, &ctx, NID_key_usage, "critical,keyCertSign,cRLSign");
    } else {
        bad |= add_ext(x, &ctx, NID_basic_constraints, "critical,CA:FALSE");
        bad |= add_ext(x, &ctx, NID_key_usage, "critical,digitalSignature");
        bad |= add_ext(x, &ctx, NID_ext_key_usage, kind == SERVER ? "serverAuth" : "clientAuth");
        bad |= add_ext(x, &ctx, NID_authority_key_identifier, "keyid:always");
        if (kind == SERVER)
            bad |= add_ext(x, &ctx, NID_subject_alt_name, "IP:127.0.0.1,DNS:localhost");
    }
    if (bad || X509_sign(x, issuer_key != NULL ? issuer_key : key, EVP_sha256()) <= 0) {
        X509_free(x);
        return NULL;
    }
    return x;
}

static int write_pem(const char *dir, const char *name, X509 *x, EVP_PKEY *key)
{
    char path[400];
    FILE *f;
    int ok;

    snprintf(path, sizeof(path), "%s/%s.crt", dir, name);
    if ((f = fopen(path, "w")) == NULL)
        return -1;
    ok = PEM_write_X509(f, x) == 1;
    if (fclose(f) != 0 || !ok)
        return -1;
    if (key == NULL)
        return 0;
    snprintf(path, sizeof(path), "%s/%s.key", dir, name);
    if ((f = fopen(path, "w")) == NULL)
        return -1;
    ok = PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL) == 1;
    if (fclose(f) != 0 || !ok)
        return -1;
    return chmod(path, 0600);
}

int tp_make_pki(const char *dir)
{
    EVP_PKEY *ca_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    EVP_PKEY *other_ca_key = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    EVP_PKEY *k;
    X509 *ca = NULL, *other_ca = NULL, *x;
    int rv = -1;
    static const struct {
        const char *file, *cn;
        int other;
        enum kind kind;
    } leaves[] = {
        {"server", "localhost", 0, SERVER}, {"app1", "app-1", 0, CLIENT},
        {"ops", "ops-alice", 0, CLIENT},    {"nocn", NULL, 0, CLIENT},
        {"rogue", "app-1", 1, CLIENT}, /* same CN, unrelated CA */
    };

    if (ca_key == NULL || other_ca_key == NULL)
        goto out;
    ca = make_cert(ca_key, "p11kms test CA", NULL, NULL, CA);
    other_ca = make_cert(other_ca_key, "unrelated CA", NULL, NULL, CA);
    if (ca == NULL || other_ca == NULL || write_pem(dir, "ca", ca, NULL) != 0 ||
        write_pem(dir, "other-ca", other_ca, NULL) != 0)
        goto out;
    for (size_t i = 0; i < sizeof(leaves) / sizeof(leaves[0]); i++) {
        int bad;
        if ((k = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256")) == NULL)
            goto out;
        x = make_cert(k, leaves[i].cn, leaves[i].other ? other_ca : ca,
                      leaves[i].other ? other_ca_key : ca_key, leaves[i].kind);
        bad = x == NULL || write_pem(dir, leaves[i].file, x, k) != 0;
        X509_free(x);
        EVP_PKEY_free(k);
        if (bad)
            goto out;
    }
    rv = 0;
out:
    if (rv != 0)
        ERR_print_errors_fp(stderr);
    X509_free(ca);
    X509_free(other_ca);
    EVP_PKEY_free(ca_key);
    EVP_PKEY_free(other_ca_key);
    return rv;
}

int tp_free_port(void)
{
    struct sockaddr_in sin;
    socklen_t len = sizeof(sin);
    int fd = socket(AF_INET, SOCK_STREAM, 0), p = -1;

    if (fd < 0)
        return -1;
    memset(&sin, 0, sizeof(sin));
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) == 0 &&
        getsockname(fd, (struct sockaddr *)&sin, &len) == 0)
        p = ntohs(sin.sin_port);
    close(fd);
    return p;
}

int tp_add_tls_listener(kh_kmsd *k, int port)
{
    static const char anchor[] = "unix = kmsd.sock\n";
    char *text = kh_read_file(k->conf, NULL), *fixed = NULL, *at;
    int rv = -1;

    if (text == NULL)
        return -1;
    if ((at = strstr(text, anchor)) != NULL) {
        at += strlen(anchor);
        if (asprintf(&fixed,
                     "%.*stls = 127.0.0.1:%d\ntls_cert = server.crt\n"
                     "tls_key = server.key\ntls_client_ca = ca.crt\n%s",
                     (int)(at - text), text, port, at) < 0)
            fixed = NULL;
        else
            rv = kh_write_file(k->conf, fixed, 0600);
    }
    free(text);
    free(fixed);
    return rv;
}
