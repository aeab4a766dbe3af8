/*
 * tests/test_kmsd_concurrency.c - the real kmsd under concurrent clients:
 * 16 threads x 200 datakey requests (each thread its own keep-alive curl
 * handle): all 201, all dek ids distinct, every one decrypts to the same
 * plaintext; a full work queue answers 503 overloaded with Retry-After;
 * and a quick load figure (datakeys/s with 8 clients) printed for the log.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <jansson.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

#define THREADS    16
#define PER_THREAD 200

static kh_kmsd K;

typedef struct issued {
    char id[40];
    char plain[48];
    char context[96];
} issued;

typedef struct worker {
    const char *sock;
    int index;
    int n;
    issued *out; /* PER_THREAD */
    int ok, errors, overloaded, retry_after;
    const char *path;
    double seconds; /* run this long instead of n requests (load figure) */
} worker;

static void *generate(void *arg)
{
    worker *w = arg;
    CURL *c = curl_easy_init();
    struct timespec start, now;
    char body[96];
    kh_response r;

    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 0; w->seconds > 0 || i < w->n; i++) {
        if (w->seconds > 0) {
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((double)(now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 >
                w->seconds)
                break;
        }
        snprintf(body, sizeof(body), "{\"context\":{\"thread\":\"%d\",\"n\":\"%d\"}}", w->index, i);
        if (kh_request_h(c, w->sock, "POST", w->path, body, strlen(body), NULL, &r) != 0) {
            w->errors++;
            continue;
        }
        if (r.status == 201) {
            json_t *j = json_loads(r.body, 0, NULL);
            if (w->out != NULL && i < w->n && j != NULL) {
                snprintf(w->out[i].id, sizeof(w->out[i].id), "%s",
                         json_string_value(json_object_get(j, "dek_id")));
                snprintf(w->out[i].plain, sizeof(w->out[i].plain), "%s",
                         json_string_value(json_object_get(j, "plaintext")));
                snprintf(w->out[i].context, sizeof(w->out[i].context), "%s", body + 11);
            }
            json_decref(j);
            w->ok++;
        } else if (r.status == 503 && strstr(r.body, "\"overloaded\"") != NULL) {
            char ra[16] = "";
            w->overloaded++;
            if (kh_header(&r, "Retry-After", ra, sizeof(ra)) && strcmp(ra, "1") == 0)
                w->retry_after++;
        } else {
            fprintf(stderr, "unexpected %ld: %s\n", r.status, r.body);
            w->errors++;
        }
        kh_response_free(&r);
    }
    curl_easy_cleanup(c);
    return NULL;
}

static void *decrypt_all(void *arg)
{
    worker *w = arg;
    CURL *c = curl_easy_init();
    char path[128], body[96];
    kh_response r;

    for (int i = 0; i < w->n; i++) {
        issued *d = &w->out[i];
        snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", d->id);
        snprintf(body, sizeof(body), "{\"context\":{\"thread\":\"%d\",\"n\":\"%d\"}}", w->index, i);
        if (kh_request_h(c, w->sock, "POST", path, body, strlen(body), NULL, &r) != 0) {
            w->errors++;
            continue;
        }
        json_t *j = json_loads(r.body, 0, NULL);
        if (r.status == 200 && j != NULL &&
            strcmp(json_string_value(json_object_get(j, "plaintext")), d->plain) == 0)
            w->ok++;
        else
            w->errors++;
        json_decref(j);
        kh_response_free(&r);
    }
    curl_easy_cleanup(c);
    return NULL;
}

static int by_id(const void *a, const void *b)
{
    return strcmp(((const issued *)a)->id, ((const issued *)b)->id);
}

static void start(void)
{
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-conc", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

START_TEST(sixteen_threads_generate_and_decrypt)
{
    pthread_t th[THREADS];
    worker w[THREADS];
    issued *all = calloc(THREADS * PER_THREAD, sizeof(*all));
    long status = 0;
    json_t *j = ku_call(&K, "POST", "/v1/keys", "{\"name\":\"concurrent\"}", &status);

    ck_assert_int_eq(status, 201);
    json_decref(j);
    for (int t = 0; t < THREADS; t++) {
        w[t] = (worker){.sock = K.sock,
                        .index = t,
                        .n = PER_THREAD,
                        .out = all + t * PER_THREAD,
                        .path = "/v1/keys/concurrent/datakeys"};
        pthread_create(&th[t], NULL, generate, &w[t]);
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        ck_assert_int_eq(w[t].errors, 0);
        ck_assert_int_eq(w[t].overloaded, 0);
        ck_assert_int_eq(w[t].ok, PER_THREAD);
    }
    for (int t = 0; t < THREADS; t++) {
        w[t].ok = 0;
        pthread_create(&th[t], NULL, decrypt_all, &w[t]);
    }
    for (int t = 0; t < THREADS; t++) {
        pthread_join(th[t], NULL);
        ck_assert_int_eq(w[t].errors, 0);
        ck_assert_int_eq(w[t].ok, PER_THREAD);
    }
    qsort(all, THREADS * PER_THREAD, sizeof(*all), by_id);
    for (int i = 1; i < THREADS * PER_THREAD; i++)
        ck_assert_str_ne(all[i - 1].id, all[i].id);
    j = ku_call(&K, "GET", "/v1/keys/concurrent", NULL, &status);
    ck_assert_int_eq(json_integer_value(json_object_get(
                         json_array_get(json_object_get(j, "versions"), 0), "dek_count")),
                     THREADS * PER_THREAD);
    json_decref(j);
    free(all);
}
END_TEST

START_TEST(load_figure)
{
    pthread_t th[8];
    worker w[8];
    long status = 0, total = 0;
    json_t *j = ku_call(&K, "POST", "/v1/keys", "{\"name\":\"load\"}", &status);
    double seconds = 3.0;

    json_decref(j);
    for (int t = 0; t < 8; t++) {
        w[t] = (worker){
            .sock = K.sock, .index = t, .path = "/v1/keys/load/datakeys", .seconds = seconds};
        pthread_create(&th[t], NULL, generate, &w[t]);
    }
    for (int t = 0; t < 8; t++) {
        pthread_join(th[t], NULL);
        ck_assert_int_eq(w[t].errors, 0);
        total += w[t].ok;
    }
    printf("load: %ld datakeys in %.1f s with 8 clients: %.0f datakeys/s\n", total, seconds,
           (double)total / seconds);
    fflush(stdout);
    ck_assert_int_gt(total, 0);
}
END_TEST

START_TEST(overloaded)
{
    kh_kmsd small;
    pthread_t th[24];
    worker w[24];
    long status = 0;
    int ok = 0, over = 0, retry = 0;
    json_t *j;

    ck_assert_int_eq(kh_setup(&small, KMSD_PATH, "kmsd-overload", "queue = 1\n", NULL), 0);
    /* workers = 16 comes from the harness; make it one */
    {
        char *text = kh_read_file(small.conf, NULL);
        char *at = strstr(text, "workers = 16");
        ck_assert_ptr_nonnull(at);
        memcpy(at, "workers =  1", 12);
        ck_assert_int_eq(kh_write_file(small.conf, text, 0600), 0);
        free(text);
    }
    ck_assert_int_eq(kh_start(&small), 0);
    j = ku_call(&small, "POST", "/v1/keys", "{\"name\":\"busy\"}", &status);
    ck_assert_int_eq(status, 201);
    json_decref(j);
    for (int t = 0; t < 24; t++) {
        w[t] = (worker){.sock = small.sock, .index = t, .n = 40, .path = "/v1/keys/busy/datakeys"};
        pthread_create(&th[t], NULL, generate, &w[t]);
    }
    for (int t = 0; t < 24; t++) {
        pthread_join(th[t], NULL);
        ck_assert_int_eq(w[t].errors, 0);
        ok += w[t].ok;
        over += w[t].overloaded;
        retry += w[t].retry_after;
    }
    printf("overload: %d ok, %d overloaded\n", ok, over);
    ck_assert_int_gt(ok, 0);
    ck_assert_int_gt(over, 0);
    ck_assert_int_eq(retry, over);
    ku_assert_healthy(&small);
    ck_assert_int_eq(kh_stop(&small, SIGTERM), 0);
    kh_teardown(&small);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_concurrency");
    TCase *tc = tcase_create("concurrency");

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, sixteen_threads_generate_and_decrypt);
    tcase_add_test(tc, load_figure);
    tcase_add_test(tc, overloaded);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr;
    int failed;

    curl_global_init(CURL_GLOBAL_ALL);
    sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    curl_global_cleanup();
    return failed == 0 ? 0 : 1;
}
