/*
 * tests/test_client_tls.c - libp11kms and kmsctl over HTTPS with a client
 * certificate against kmsd's real mutual-TLS listener on TCP loopback
 * (the PKI: tests/support/testpki.h).  Checked: generate + decrypt round
 * trip and a refused context mismatch through the library; without a
 * client certificate the client opens but its first call fails with a
 * transport error; kmsctl --url/--cacert/--cert/--key-file key create,
 * dek generate and dek decrypt (--json); a certificate of another CA makes
 * kmsctl exit non-zero with one line on stderr.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <p11kms/client.h>

#include "support/kmsctl_run.h"
#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"
#include "support/testpki.h"

static kh_kmsd K;
static char url[64], ca[400];

static void start(void)
{
    char policy[400], rules[256];

    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "client-tls", NULL, "[policy]\nfile = policy.conf\n"),
                     0);
    ck_assert_int_eq(tp_make_pki(K.dir), 0);
    snprintf(policy, sizeof(policy), "%s/policy.conf", K.dir);
    snprintf(rules, sizeof(rules),
             "allow uid:%u all on *\n"
             "allow cert:app-1 all on app-*\n",
             (unsigned)getuid());
    ck_assert_int_eq(kh_write_file(policy, rules, 0644), 0);
    {
        int port = tp_free_port();
        ck_assert_int_gt(port, 0);
        snprintf(url, sizeof(url), "https://127.0.0.1:%d", port);
        ck_assert_int_eq(tp_add_tls_listener(&K, port), 0);
    }
    snprintf(ca, sizeof(ca), "%s/ca.crt", K.dir);
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

/* A client for url; who: "app1", "rogue", ... (files in K.dir) or NULL
 * for no client certificate. */
static p11kms_client *client_as(const char *who)
{
    p11kms_client_options o;
    p11kms_client *c = NULL;
    char cert[400], key[400];

    p11kms_client_options_init(&o);
    o.ca_file = ca;
    o.connect_timeout_ms = 10000;
    o.timeout_ms = 30000;
    if (who != NULL) {
        snprintf(cert, sizeof(cert), "%s/%s.crt", K.dir, who);
        snprintf(key, sizeof(key), "%s/%s.key", K.dir, who);
        o.cert_file = cert;
        o.key_file = key;
    }
    ck_assert_int_eq(p11kms_client_open_options(url, &o, &c), P11KMS_OK);
    ck_assert_ptr_nonnull(c);
    return c;
}

static p11kms_context *ctx_of(const char *customer)
{
    p11kms_context *ctx = p11kms_context_new();

    ck_assert_ptr_nonnull(ctx);
    ck_assert_int_eq(p11kms_context_set(ctx, "customer", customer), P11KMS_OK);
    return ctx;
}

static void make_key(const char *name)
{
    long status = 0;
    char body[128];
    json_t *j;

    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", name);
    j = ku_call(&K, "POST", "/v1/keys", body, &status);
    ck_assert_int_eq(status, 201);
    json_decref(j);
}

START_TEST(library_round_trip)
{
    p11kms_client *c;
    p11kms_context *ctx = ctx_of("42"), *other = ctx_of("43");
    p11kms_data_key *g = NULL, *d = NULL, *x = NULL;
    size_t glen = 0, dlen = 0;
    const unsigned char *gb, *db;

    make_key("app-lib");
    c = client_as("app1");
    ck_assert_int_eq(p11kms_generate_data_key(c, "app-lib", ctx, &g), P11KMS_OK);
    ck_assert_uint_eq(strlen(p11kms_data_key_id(g)), P11KMS_DEK_ID_LEN);
    ck_assert_str_eq(p11kms_data_key_key_name(g), "app-lib");
    gb = p11kms_data_key_bytes(g, &glen);
    ck_assert_uint_eq(glen, P11KMS_DATA_KEY_LEN);
    ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(g), ctx, &d), P11KMS_OK);
    db = p11kms_data_key_bytes(d, &dlen);
    ck_assert_uint_eq(dlen, P11KMS_DATA_KEY_LEN);
    ck_assert_int_eq(memcmp(gb, db, P11KMS_DATA_KEY_LEN), 0);
    ck_assert_str_eq(p11kms_client_error(c), "");

    /* the wrong context is refused by kmsd, not by the transport */
    ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(g), other, &x),
                     P11KMS_ERR_CONTEXT_MISMATCH);
    ck_assert_ptr_null(x);
    ck_assert_int_ne(strlen(p11kms_client_error(c)), 0);
    ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(g), NULL, &x),
                     P11KMS_ERR_CONTEXT_MISMATCH);
    ck_assert_ptr_null(x);
    /* and the connection still serves the right one */
    ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(g), ctx, &x), P11KMS_OK);
    p11kms_data_key_free(x);

    p11kms_data_key_free(g);
    p11kms_data_key_free(d);
    p11kms_context_free(ctx);
    p11kms_context_free(other);
    p11kms_client_close(c);
}
END_TEST

/* No client certificate, or one of another CA: the client opens (no
 * connection yet) and the first call fails in the handshake. */
START_TEST(library_refused_handshake)
{
    static const char *const whos[] = {NULL, "rogue"};

    make_key("app-refused");
    for (size_t i = 0; i < sizeof(whos) / sizeof(whos[0]); i++) {
        p11kms_client *c = client_as(whos[i]);
        p11kms_data_key *k = NULL;

        ck_assert_int_eq(p11kms_generate_data_key(c, "app-refused", NULL, &k),
                         P11KMS_ERR_TRANSPORT);
        ck_assert_ptr_null(k);
        ck_assert_msg(strlen(p11kms_client_error(c)) > 0, "%s: no error detail",
                      whos[i] ? whos[i] : "(none)");
        ck_assert_ptr_nonnull(strstr(p11kms_client_error(c), url));
        /* and again: still a transport error, still no crash */
        ck_assert_int_eq(p11kms_generate_data_key(c, "app-refused", NULL, &k),
                         P11KMS_ERR_TRANSPORT);
        p11kms_client_close(c);
    }
    ku_assert_healthy(&K);
}
END_TEST

/* kmsctl --url URL --cacert CA --cert C --key-file K [--json] args... */
static int ctl_as(kr_result *r, const char *who, const char *const *args)
{
    const char *argv[64];
    char cert[400], key[400];
    int n = 0;

    snprintf(cert, sizeof(cert), "%s/%s.crt", K.dir, who);
    snprintf(key, sizeof(key), "%s/%s.key", K.dir, who);
    argv[n++] = KMSCTL_PATH;
    argv[n++] = "--url";
    argv[n++] = url;
    argv[n++] = "--cacert";
    argv[n++] = ca;
    argv[n++] = "--cert";
    argv[n++] = cert;
    argv[n++] = "--key-file";
    argv[n++] = key;
    for (int i = 0; args[i] != NULL && n < 63; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    return kr_run(argv, NULL, NULL, r);
}

static json_t *ctl_json(const char *const *args)
{
    kr_result r;
    json_error_t jerr;
    json_t *j;

    ctl_as(&r, "app1", args);
    ck_assert_msg(r.status == 0, "kmsctl %s %s: exit %d: %s", args[1], args[2], r.status, r.err);
    ck_assert_str_eq(r.err, "");
    j = json_loads(r.out, 0, &jerr);
    ck_assert_msg(j != NULL, "not JSON: %s", r.out);
    kr_free(&r);
    return j;
}
#define CTL_JSON(...) ctl_json((const char *const[]){"--json", __VA_ARGS__, NULL})

START_TEST(kmsctl_over_tls)
{
    json_t *k, *g, *d;
    char id[64], plain[128];
    kr_result r;

    k = CTL_JSON("key", "create", "app-cli");
    json_decref(k);
    g = CTL_JSON("dek", "generate", "app-cli", "--context", "customer=42");
    snprintf(id, sizeof(id), "%s", json_string_value(json_object_get(g, "dek_id")));
    snprintf(plain, sizeof(plain), "%s", json_string_value(json_object_get(g, "plaintext")));
    ck_assert_uint_eq(strlen(id), P11KMS_DEK_ID_LEN);
    ck_assert_uint_gt(strlen(plain), 0);
    json_decref(g);
    d = CTL_JSON("dek", "decrypt", id, "--context", "customer=42");
    ck_assert_str_eq(json_string_value(json_object_get(d, "dek_id")), id);
    ck_assert_str_eq(json_string_value(json_object_get(d, "plaintext")), plain);
    json_decref(d);
    /* the audit trail names the certificate's principal */
    {
        char *log = kh_read_file(K.log, NULL);
        ck_assert_ptr_nonnull(log);
        ck_assert_ptr_nonnull(strstr(log, " cert:app-1 datakey.generate"));
        free(log);
    }

    /* a certificate of another CA (same CN): refused in the handshake */
    ctl_as(&r, "rogue",
           (const char *const[]){"--json", "dek", "decrypt", id, "--context", "customer=42", NULL});
    ck_assert_msg(r.status != 0 && r.status < 128, "rogue: exit %d", r.status);
    ck_assert_str_eq(r.out, "");
    ck_assert_msg(kr_lines(r.err) == 1, "stderr: %s", r.err);
    ck_assert_msg(strncmp(r.err, "kmsctl: ", 8) == 0, "stderr: %s", r.err);
    ck_assert_ptr_null(strstr(r.err, plain));
    kr_free(&r);
    ku_assert_healthy(&K);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("client-tls");
    TCase *tc = tcase_create("tls");

    tcase_set_timeout(tc, 300);
    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_add_test(tc, library_round_trip);
    tcase_add_test(tc, library_refused_handshake);
    tcase_add_test(tc, kmsctl_over_tls);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr;
    int failed;

    sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
