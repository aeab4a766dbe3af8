/*
 * tests/test_client_secmem.c - libp11kms does not keep the data keys it
 * receives: once p11kms_data_key_free has wiped a key, no copy of its
 * bytes (raw, or the base64 of kmsd's JSON reply) is left anywhere in the
 * application's memory -- not in the library's response buffer, jansson's
 * strings, libcurl's receive buffer or OpenSSL's TLS read buffer -- while
 * the client stays open, and after it is closed.
 *
 * The test scans its own process (tests/support/memscan.h) after data
 * keys were generated and decrypted over the Unix socket and over mutual
 * TLS; fragments of 16 raw bytes or 22 base64 characters count.  As in an
 * application whose first libcurl user is libp11kms, the library
 * initialises libcurl before the test harness does (otherwise libcurl
 * keeps its own allocator and its freed receive buffers are not wiped:
 * docs/client.md).  The expected bytes are kept in a page of their own, excluded from
 * the scan, and computed there (EVP_EncodeBlock writes in place); the
 * test never copies a key anywhere else.  A control string the process
 * holds must be found in every scan.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include <p11kms/client.h>

#include "kms/client/internal.h"
#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"
#include "support/memscan.h"
#include "support/testpki.h"

#define N_KEYS 6
/* Half a key is a leak: fragments of 16 raw bytes or 22 base64 characters
 * count. */
#define RAW_MIN 16
#define B64_MIN 22

static kh_kmsd K;
static char unix_target[400], https_target[64];

/* The expected keys, in a page excluded from the scans. */
typedef struct vault {
    unsigned char raw[N_KEYS][32];
    unsigned char b64[N_KEYS][48];
    char control[64];
} vault;

static vault *V;

static void start(void)
{
    char policy[400], rules[256];
    int port;

    ck_assert_int_eq(
        kh_setup(&K, KMSD_PATH, "client-secmem", NULL, "[policy]\nfile = policy.conf\n"), 0);
    ck_assert_int_eq(tp_make_pki(K.dir), 0);
    snprintf(policy, sizeof(policy), "%s/policy.conf", K.dir);
    snprintf(rules, sizeof(rules),
             "allow uid:%u all on *\n"
             "allow cert:app-1 generate,decrypt on app-*\n",
             (unsigned)getuid());
    ck_assert_int_eq(kh_write_file(policy, rules, 0644), 0);
    port = tp_free_port();
    ck_assert_int_gt(port, 0);
    snprintf(https_target, sizeof(https_target), "https://127.0.0.1:%d", port);
    ck_assert_int_eq(tp_add_tls_listener(&K, port), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    snprintf(unix_target, sizeof(unix_target), "unix:%s", K.sock);
    {
        long status = 0;
        json_decref(ku_call(&K, "POST", "/v1/keys", "{\"name\":\"app-secmem\"}", &status));
        ck_assert_int_eq(status, 201);
    }
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);

    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

static void vault_open(void)
{
    unsigned char rnd[4];

    V = mmap(NULL, sizeof(*V), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ck_assert_ptr_ne(V, MAP_FAILED);
    ms_exclude_clear();
    ck_assert_int_eq(ms_exclude(V, sizeof(*V)), 0);
    /* The control lives outside the vault too: a heap copy the scan must
     * find (strdup'd below, kept until the end of the test). */
    ck_assert_int_eq(RAND_bytes(rnd, sizeof(rnd)), 1);
    snprintf(V->control, sizeof(V->control), "client-control-%02x%02x%02x%02x", rnd[0], rnd[1],
             rnd[2], rnd[3]);
}

static p11kms_client *open_client(int tls)
{
    p11kms_client_options o;
    p11kms_client *c = NULL;
    char cert[400], key[400], ca[400];

    if (!tls) {
        ck_assert_int_eq(p11kms_client_open(unix_target, &c), P11KMS_OK);
        return c;
    }
    p11kms_client_options_init(&o);
    snprintf(ca, sizeof(ca), "%s/ca.crt", K.dir);
    snprintf(cert, sizeof(cert), "%s/app1.crt", K.dir);
    snprintf(key, sizeof(key), "%s/app1.key", K.dir);
    o.ca_file = ca;
    o.cert_file = cert;
    o.key_file = key;
    ck_assert_int_eq(p11kms_client_open_options(https_target, &o, &c), P11KMS_OK);
    return c;
}

/* Generate key i, decrypt it again, keep its bytes in the vault only. */
static void round_trip(p11kms_client *c, p11kms_context *ctx, int i)
{
    p11kms_data_key *g = NULL, *d = NULL;
    const unsigned char *b;
    size_t len = 0;

    ck_assert_msg(p11kms_generate_data_key(c, "app-secmem", ctx, &g) == P11KMS_OK, "generate: %s",
                  p11kms_client_error(c));
    b = p11kms_data_key_bytes(g, &len);
    ck_assert_uint_eq(len, 32);
    memcpy(V->raw[i], b, 32);
    EVP_EncodeBlock(V->b64[i], V->raw[i], 32);
    ck_assert_msg(p11kms_decrypt_data_key(c, p11kms_data_key_id(g), ctx, &d) == P11KMS_OK,
                  "decrypt: %s", p11kms_client_error(c));
    b = p11kms_data_key_bytes(d, &len);
    ck_assert_uint_eq(len, 32);
    ck_assert_int_eq(memcmp(b, V->raw[i], 32), 0);
    p11kms_data_key_free(g);
    p11kms_data_key_free(d);
}

/* Scan this process for keys [0, n); the control must be found. */
static void scan_self(const char *title, int n)
{
    ms_needle needles[1 + 2 * N_KEYS];
    char labels[2 * N_KEYS][24];
    size_t k = 0;
    ms_result *res = calloc(1, sizeof(*res));

    ck_assert_ptr_nonnull(res);
    needles[k++] = (ms_needle){.label = "control",
                               .bytes = (const unsigned char *)V->control,
                               .len = strlen(V->control),
                               .control = 1};
    for (int i = 0; i < n; i++) {
        snprintf(labels[2 * i], sizeof(labels[0]), "key %d raw", i);
        snprintf(labels[2 * i + 1], sizeof(labels[0]), "key %d base64", i);
        needles[k++] = (ms_needle){labels[2 * i], V->raw[i], 32, RAW_MIN, 0};
        needles[k++] = (ms_needle){labels[2 * i + 1], V->b64[i], 44, B64_MIN, 0};
    }
    ck_assert_int_eq(ms_scan(getpid(), needles, k, res), 0);
    ms_report(stderr, title, needles, res);
    fprintf(stderr,
            "client secmem %s: %d data keys: %zu copies in the application, %" PRIu64
            " bytes scanned\n",
            title, n, res->n_hits, res->bytes_scanned);
    ck_assert_msg(res->control_hits > 0, "the control string was not found: the scan read nothing");
    ck_assert_msg(res->n_hits == 0, "%s: %zu copies of data keys remain", title, res->n_hits);
    free(res);
}

static void run(int tls)
{
    const char *name = tls ? "tls" : "unix";
    char title[64];
    char *control_copy;
    p11kms_context *ctx = p11kms_context_new();
    p11kms_client *c;

    vault_open();
    control_copy = strdup(V->control);
    ck_assert_ptr_nonnull(control_copy);
    ck_assert_int_eq(p11kms_context_set(ctx, "customer", "42"), P11KMS_OK);
    c = open_client(tls);
    for (int i = 0; i < N_KEYS; i++)
        round_trip(c, ctx, i);
    snprintf(title, sizeof(title), "%s, client open", name);
    scan_self(title, N_KEYS);
    p11kms_client_close(c);
    snprintf(title, sizeof(title), "%s, client closed", name);
    scan_self(title, N_KEYS);
    p11kms_context_free(ctx);
    free(control_copy);
}

START_TEST(unix_keys_not_kept)
{
    run(0);
}
END_TEST

START_TEST(tls_keys_not_kept)
{
    run(1);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("client_secmem");
    TCase *tc = tcase_create("secmem");

    tcase_set_timeout(tc, 300);
    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_add_test(tc, unix_keys_not_kept);
    tcase_add_test(tc, tls_keys_not_kept);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr;
    int failed;

    /* The library initialises libcurl before the test harness does, as
     * in an application whose first libcurl user is libp11kms: libcurl
     * then allocates through the wiping allocator (docs/client.md). */
    if (!kms_client_wipes_libcurl()) {
        fprintf(stderr, "test_client_secmem: libcurl was initialised before libp11kms\n");
        return EXIT_FAILURE;
    }
    sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
