/*
 * tests/test_client_api.c - libp11kms against a real kmsd (own SoftHSM2
 * token): generate/decrypt round trip, contexts, API errors mapped to
 * statuses with kmsd's message, one connection reused across calls,
 * one client per thread, destroy (once the route exists), and the example
 * program examples/customer-records.c end to end.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms/client/internal.h"
#include "support/kmsctl_run.h"
#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

static kh_kmsd K;
static char target[400];

static void start(void)
{
    long status = 0;
    json_t *j;

    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "client-api", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
    snprintf(target, sizeof(target), "unix:%s", K.sock);
    j = ku_call(&K, "POST", "/v1/keys", "{\"name\":\"customers\"}", &status);
    ck_assert_int_eq(status, 201);
    json_decref(j);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

static p11kms_client *client(void)
{
    p11kms_client *c = NULL;

    ck_assert_int_eq(p11kms_client_open(target, &c), P11KMS_OK);
    return c;
}

static p11kms_context *ctx_of(const char *customer)
{
    p11kms_context *ctx = p11kms_context_new();

    ck_assert_int_eq(p11kms_context_set(ctx, "customer", customer), P11KMS_OK);
    return ctx;
}

START_TEST(round_trip)
{
    p11kms_client *c = client();
    p11kms_context *ctx = ctx_of("42"), *other = ctx_of("43");
    p11kms_data_key *g = NULL, *d = NULL, *x = NULL;
    size_t glen = 0, dlen = 0;
    const unsigned char *gb, *db;

    ck_assert_int_eq(p11kms_context_set(ctx, "region", "eu"), P11KMS_OK);
    ck_assert_int_eq(p11kms_generate_data_key(c, "customers", ctx, &g), P11KMS_OK);
    ck_assert_uint_eq(strlen(p11kms_data_key_id(g)), 36);
    ck_assert_str_eq(p11kms_data_key_key_name(g), "customers");
    ck_assert_uint_eq(p11kms_data_key_version(g), 1);
    gb = p11kms_data_key_bytes(g, &glen);
    ck_assert_uint_eq(glen, 32);
    ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(g), ctx, &d), P11KMS_OK);
    db = p11kms_data_key_bytes(d, &dlen);
    ck_assert_uint_eq(dlen, 32);
    ck_assert_int_eq(memcmp(gb, db, 32), 0);
    ck_assert_str_eq(p11kms_client_error(c), "");

    /* context mismatch, and the same context in another order is no mismatch */
    ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(g), other, &x),
                     P11KMS_ERR_CONTEXT_MISMATCH);
    ck_assert_ptr_null(x);
    ck_assert_ptr_nonnull(p11kms_client_error(c));
    ck_assert_int_ne(strlen(p11kms_client_error(c)), 0);
    ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(g), NULL, &x),
                     P11KMS_ERR_CONTEXT_MISMATCH);
    {
        p11kms_context *swapped = p11kms_context_new();
        ck_assert_int_eq(p11kms_context_set(swapped, "region", "eu"), P11KMS_OK);
        ck_assert_int_eq(p11kms_context_set(swapped, "customer", "42"), P11KMS_OK);
        ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(g), swapped, &x), P11KMS_OK);
        p11kms_data_key_free(x);
        x = NULL;
        p11kms_context_free(swapped);
    }

    /* a record sealed under the generated key opens with the decrypted one */
    {
        unsigned char *s = NULL, *p = NULL;
        size_t slen = 0, plen = 0;
        ck_assert_int_eq(p11kms_seal(g, (const unsigned char *)"row=1", 5,
                                     (const unsigned char *)"hello", 5, &s, &slen),
                         P11KMS_OK);
        ck_assert_int_eq(p11kms_open(d, (const unsigned char *)"row=1", 5, s, slen, &p, &plen),
                         P11KMS_OK);
        ck_assert_str_eq((char *)p, "hello");
        p11kms_buffer_free(p, plen);
        ck_assert_int_eq(p11kms_open(d, (const unsigned char *)"row=2", 5, s, slen, &p, &plen),
                         P11KMS_ERR_INTEGRITY_FAILURE);
        free(s);
    }
    p11kms_data_key_free(g);
    p11kms_data_key_free(d);
    p11kms_context_free(ctx);
    p11kms_context_free(other);
    p11kms_client_close(c);
}
END_TEST

START_TEST(api_errors)
{
    p11kms_client *c = client();
    p11kms_data_key *k = NULL;

    ck_assert_int_eq(p11kms_generate_data_key(c, "nope", NULL, &k), P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_str_eq(kms_client_error_code(c), "key_not_found");
    ck_assert_ptr_nonnull(strstr(p11kms_client_error(c), "nope"));
    ck_assert_int_eq(p11kms_generate_data_key(c, "Bad Name", NULL, &k), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_generate_data_key(c, "../keys", NULL, &k), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(p11kms_decrypt_data_key(c, "0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f", NULL, &k),
                     P11KMS_ERR_DEK_NOT_FOUND);
    ck_assert_ptr_null(k);
    /* without a context the DEK comes back with none */
    ck_assert_int_eq(p11kms_generate_data_key(c, "customers", NULL, &k), P11KMS_OK);
    {
        p11kms_data_key *d = NULL;
        p11kms_context *empty = p11kms_context_new();
        ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(k), empty, &d), P11KMS_OK);
        p11kms_data_key_free(d);
        p11kms_context_free(empty);
    }
    p11kms_data_key_free(k);
    p11kms_client_close(c);
}
END_TEST

START_TEST(connection_reused)
{
    p11kms_client *c = client();
    p11kms_context *ctx = ctx_of("reuse");
    json_t *reply = NULL;
    long http = 0;

    for (int i = 0; i < 50; i++) {
        p11kms_data_key *k = NULL;
        ck_assert_int_eq(p11kms_generate_data_key(c, "customers", ctx, &k), P11KMS_OK);
        p11kms_data_key_free(k);
    }
    /* the internal request function, as kmsctl uses it */
    ck_assert_int_eq(kms_client_call(c, "GET", "/v1/health", NULL, &http, &reply), P11KMS_OK);
    ck_assert_int_eq(http, 200);
    ck_assert_str_eq(json_string_value(json_object_get(reply, "status")), "ok");
    json_decref(reply);
    reply = NULL;
    ck_assert_int_eq(kms_client_call(c, "DELETE", "/v1/health", NULL, &http, &reply),
                     P11KMS_ERR_METHOD_NOT_ALLOWED);
    ck_assert_int_eq(http, 405);
    ck_assert_int_eq(kms_client_call(c, "GET", "/v1/keys/customers", NULL, &http, &reply),
                     P11KMS_OK);
    ck_assert_str_eq(json_string_value(json_object_get(reply, "name")), "customers");
    json_decref(reply);
    /* all of these went over the first connection */
    ck_assert_int_eq(kms_client_connections(c), 1);
    p11kms_context_free(ctx);
    p11kms_client_close(c);
}
END_TEST

static void *thread_main(void *arg)
{
    long id = (long)arg;
    char customer[32];
    p11kms_client *c = NULL;
    p11kms_context *ctx = p11kms_context_new();
    long failures = 0;

    snprintf(customer, sizeof(customer), "t%ld", id);
    if (p11kms_client_open(target, &c) != P11KMS_OK ||
        p11kms_context_set(ctx, "customer", customer) != P11KMS_OK)
        failures++;
    for (int i = 0; i < 20 && failures == 0; i++) {
        p11kms_data_key *g = NULL, *d = NULL;
        if (p11kms_generate_data_key(c, "customers", ctx, &g) != P11KMS_OK ||
            p11kms_decrypt_data_key(c, p11kms_data_key_id(g), ctx, &d) != P11KMS_OK ||
            memcmp(p11kms_data_key_bytes(g, NULL), p11kms_data_key_bytes(d, NULL), 32) != 0)
            failures++;
        p11kms_data_key_free(g);
        p11kms_data_key_free(d);
    }
    p11kms_context_free(ctx);
    p11kms_client_close(c);
    return (void *)failures;
}

START_TEST(one_client_per_thread)
{
    pthread_t t[6];

    for (long i = 0; i < 6; i++)
        ck_assert_int_eq(pthread_create(&t[i], NULL, thread_main, (void *)i), 0);
    for (int i = 0; i < 6; i++) {
        void *failures = NULL;
        pthread_join(t[i], &failures);
        ck_assert_int_eq((long)failures, 0);
    }
}
END_TEST

/* Destroy: DELETE /v1/datakeys/{id}.  Until that route lands kmsd answers
 * not_found "not implemented yet", and the library says so. */
START_TEST(destroy_data_key)
{
    p11kms_client *c = client();
    p11kms_context *ctx = ctx_of("shred");
    p11kms_data_key *k = NULL, *d = NULL;
    p11kms_status s;

    ck_assert_int_eq(p11kms_generate_data_key(c, "customers", ctx, &k), P11KMS_OK);
    s = p11kms_destroy_data_key(c, p11kms_data_key_id(k));
    if (s == P11KMS_ERR_NOT_FOUND) {
        ck_assert_str_eq(p11kms_client_error(c), "not implemented yet");
    } else {
        ck_assert_int_eq(s, P11KMS_OK);
        ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(k), ctx, &d),
                         P11KMS_ERR_DEK_DESTROYED);
        ck_assert_ptr_null(d);
    }
    ck_assert_int_eq(p11kms_destroy_data_key(c, "nope"), P11KMS_ERR_BAD_REQUEST);
    ck_assert_str_eq(p11kms_client_error(c), "dek_id must be a UUID in canonical lowercase form");
    p11kms_data_key_free(k);
    p11kms_context_free(ctx);
    p11kms_client_close(c);
}
END_TEST

START_TEST(revoke_data_key)
{
    p11kms_client *c = client();
    p11kms_context *ctx = ctx_of("revoked");
    p11kms_data_key *k = NULL, *d = NULL;
    p11kms_status s;

    ck_assert_int_eq(p11kms_generate_data_key(c, "customers", ctx, &k), P11KMS_OK);
    s = p11kms_revoke_data_key(c, p11kms_data_key_id(k), "compromised");
    if (s == P11KMS_ERR_NOT_FOUND) {
        ck_assert_str_eq(p11kms_client_error(c), "not implemented yet");
    } else {
        ck_assert_int_eq(s, P11KMS_OK);
        ck_assert_int_eq(p11kms_decrypt_data_key(c, p11kms_data_key_id(k), ctx, &d),
                         P11KMS_ERR_DEK_REVOKED);
        ck_assert_ptr_null(d);
        ck_assert_int_eq(p11kms_revoke_data_key(c, p11kms_data_key_id(k), "bored"),
                         P11KMS_ERR_BAD_REQUEST);
    }
    p11kms_data_key_free(k);
    p11kms_context_free(ctx);
    p11kms_client_close(c);
}
END_TEST

START_TEST(example_customer_records)
{
    char db[400], tgt[420];
    kr_result r;

    snprintf(db, sizeof(db), "%s/customers.db", K.dir);
    snprintf(tgt, sizeof(tgt), "%s", target);
    {
        const char *argv[] = {CUSTOMER_RECORDS_PATH,
                              "--target",
                              tgt,
                              "--db",
                              db,
                              "put",
                              "7",
                              "Grace Hopper <grace@example.com>",
                              NULL};
        ck_assert_int_eq(kr_run(argv, NULL, NULL, &r), 0);
        ck_assert_ptr_nonnull(strstr(r.out, "stored a record of customer 7"));
        kr_free(&r);
    }
    {
        const char *argv[] = {CUSTOMER_RECORDS_PATH, "--target", tgt, "--db", db, "put", "7",
                              "order 1: compiler",   NULL};
        ck_assert_int_eq(kr_run(argv, NULL, NULL, &r), 0);
        kr_free(&r);
    }
    {
        const char *argv[] = {CUSTOMER_RECORDS_PATH, "--target", tgt, "--db", db, "get", "7", NULL};
        ck_assert_int_eq(kr_run(argv, NULL, NULL, &r), 0);
        ck_assert_str_eq(r.out, "customer 7: Grace Hopper <grace@example.com>\n"
                                "customer 7: order 1: compiler\n");
        kr_free(&r);
    }
    {
        /* the table holds no plaintext */
        size_t len = 0;
        char *raw = kh_read_file(db, &len);
        ck_assert_ptr_nonnull(raw);
        ck_assert_ptr_null(memmem(raw, len, "Grace", 5));
        free(raw);
    }
    {
        const char *argv[] = {CUSTOMER_RECORDS_PATH, "--target", tgt, "--db", db, "demo", NULL};
        int st = kr_run(argv, NULL, NULL, &r);
        ck_assert_ptr_nonnull(strstr(r.out, "customer 42: Ada Lovelace"));
        ck_assert_ptr_nonnull(strstr(r.out, "customer 43: Charles Babbage"));
        if (strstr(r.err, "not implemented yet") != NULL) {
            /* erasure needs DELETE /v1/datakeys/{id}: reported honestly */
            ck_assert_int_eq(st, 1);
            ck_assert_ptr_nonnull(
                strstr(r.err, "destroy data key: not_found: not implemented yet"));
        } else {
            ck_assert_msg(st == 0, "demo failed: %s", r.err);
            ck_assert_ptr_nonnull(strstr(r.out, "erased customer 42"));
            ck_assert_ptr_nonnull(strstr(r.err, "customer 42 was erased"));
        }
        kr_free(&r);
    }
    {
        const char *argv[] = {CUSTOMER_RECORDS_PATH,
                              "--target",
                              "unix:/nonexistent.sock",
                              "--db",
                              db,
                              "get",
                              "7",
                              NULL};
        ck_assert_int_eq(kr_run(argv, NULL, NULL, &r), 1);
        ck_assert_ptr_nonnull(strstr(r.err, "transport"));
        kr_free(&r);
    }
}
END_TEST

int main(void)
{
    Suite *s = suite_create("client_api");
    TCase *tc = tcase_create("kmsd");
    SRunner *sr;
    int failed;

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, round_trip);
    tcase_add_test(tc, api_errors);
    tcase_add_test(tc, connection_reused);
    tcase_add_test(tc, one_client_per_thread);
    tcase_add_test(tc, destroy_data_key);
    tcase_add_test(tc, revoke_data_key);
    tcase_add_test(tc, example_customer_records);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
