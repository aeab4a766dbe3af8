/*
 * tests/test_kmsd_metrics.c - GET /metrics of the real kmsd: the
 * Prometheus text format parses line by line, request counters by route
 * and status count exactly what this test sent, latency histograms have
 * monotonic buckets ending in +Inf == _count, token calls and group
 * commits move, the gauges are there.  One kmsd serves the suite.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <jansson.h>
#include <regex.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

static kh_kmsd K;

static void start(void)
{
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-metrics", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

/* A parsed exposition: every sample line as "name{labels}" -> value. */
typedef struct sample {
    char *key;
    double value;
} sample;

typedef struct scrape {
    sample *s;
    size_t n;
    char *text;
} scrape;

static void scrape_free(scrape *sc)
{
    for (size_t i = 0; i < sc->n; i++)
        free(sc->s[i].key);
    free(sc->s);
    free(sc->text);
    memset(sc, 0, sizeof(*sc));
}

/* GET /metrics and check the text format: HELP/TYPE comments, and every
 * other line `name{label="v",...} value` for a name announced by TYPE. */
static void do_scrape(scrape *sc)
{
    kh_response r;
    char ctype[128];
    regex_t line_re;
    char *save = NULL, *line, *types = NULL;
    size_t types_len = 0;

    memset(sc, 0, sizeof(*sc));
    ck_assert_int_eq(kh_request(K.sock, "GET", "/metrics", NULL, 0, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    ck_assert_int_eq(kh_header(&r, "Content-Type", ctype, sizeof(ctype)), 1);
    ck_assert_msg(strncmp(ctype, "text/plain", 10) == 0, "Content-Type %s", ctype);
    ck_assert_int_eq(regcomp(&line_re,
                             "^([a-zA-Z_:][a-zA-Z0-9_:]*)(\\{([a-zA-Z_][a-zA-Z0-9_]*=\"[^\"]*\""
                             "(,[a-zA-Z_][a-zA-Z0-9_]*=\"[^\"]*\")*)?\\})? "
                             "(-?[0-9.]+(e[-+]?[0-9]+)?|\\+Inf)$",
                             REG_EXTENDED),
                     0);
    sc->text = strdup(r.body);
    kh_response_free(&r);
    types = calloc(1, 1);
    for (line = strtok_r(sc->text, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        regmatch_t m[2];
        char name[128], *brace, *sp;

        if (strncmp(line, "# HELP ", 7) == 0)
            continue;
        if (strncmp(line, "# TYPE ", 7) == 0) {
            size_t l = strlen(line + 7);
            types = realloc(types, types_len + l + 2);
            memcpy(types + types_len, line + 7, l);
            types_len += l;
            types[types_len++] = '\n';
            types[types_len] = '\0';
            continue;
        }
        ck_assert_msg(line[0] != '#', "unknown comment: %s", line);
        ck_assert_msg(regexec(&line_re, line, 2, m, 0) == 0, "bad sample line: %s", line);
        snprintf(name, sizeof(name), "%.*s", (int)(m[1].rm_eo - m[1].rm_so), line);
        /* histogram samples belong to the family without the suffix */
        {
            char fam[128], want[160];
            snprintf(fam, sizeof(fam), "%s", name);
            for (const char *suf = "_bucket\0_sum\0_count\0"; *suf; suf += strlen(suf) + 1) {
                size_t fl = strlen(fam), sl = strlen(suf);
                if (fl > sl && strcmp(fam + fl - sl, suf) == 0) {
                    snprintf(want, sizeof(want), "%.*s histogram\n", (int)(fl - sl), fam);
                    if (strstr(types, want) != NULL)
                        fam[fl - sl] = '\0';
                }
            }
            snprintf(want, sizeof(want), "\n%s ", fam);
            ck_assert_msg(strstr(types, want + 1) == types || strstr(types, want) != NULL,
                          "no TYPE for %s", name);
        }
        sp = strrchr(line, ' ');
        brace = line;
        sc->s = realloc(sc->s, (sc->n + 1) * sizeof(*sc->s));
        sc->s[sc->n].key = strndup(brace, (size_t)(sp - brace));
        sc->s[sc->n].value = strcmp(sp + 1, "+Inf") == 0 ? 1e308 : strtod(sp + 1, NULL);
        sc->n++;
    }
    free(types);
    regfree(&line_re);
}

/* The value of a sample, or -1 when absent. */
static double get(const scrape *sc, const char *key)
{
    for (size_t i = 0; i < sc->n; i++)
        if (strcmp(sc->s[i].key, key) == 0)
            return sc->s[i].value;
    return -1;
}

static double get0(const scrape *sc, const char *key)
{
    double v = get(sc, key);
    return v < 0 ? 0 : v;
}

/* Every histogram series: buckets non-decreasing in le order of
 * appearance, last bucket +Inf equal to _count. */
static void assert_histograms(const scrape *sc, const char *family)
{
    char prefix[128], series[256], cnt_key[300];
    size_t plen;
    int seen = 0;

    snprintf(prefix, sizeof(prefix), "%s_bucket{", family);
    plen = strlen(prefix);
    for (size_t i = 0; i < sc->n;) {
        double last = -1;
        const char *le;
        size_t j;

        if (strncmp(sc->s[i].key, prefix, plen) != 0) {
            i++;
            continue;
        }
        le = strstr(sc->s[i].key, ",le=\"");
        ck_assert_ptr_nonnull(le);
        snprintf(series, sizeof(series), "%.*s", (int)(le - sc->s[i].key), sc->s[i].key);
        for (j = i; j < sc->n && strncmp(sc->s[j].key, series, strlen(series)) == 0 &&
                    strstr(sc->s[j].key, ",le=\"") != NULL;
             j++) {
            ck_assert_msg(sc->s[j].value >= last, "%s: buckets not monotonic", sc->s[j].key);
            last = sc->s[j].value;
        }
        ck_assert_msg(strstr(sc->s[j - 1].key, "le=\"+Inf\"") != NULL, "%s: no +Inf bucket",
                      series);
        snprintf(cnt_key, sizeof(cnt_key), "%s_count{%s}", family, series + plen);
        ck_assert_msg(get(sc, cnt_key) == last, "%s != +Inf bucket (%g)", cnt_key, last);
        seen++;
        i = j;
    }
    ck_assert_int_gt(seen, 0);
}

START_TEST(metrics_count_requests)
{
    scrape a, b;
    long status = 0;
    json_t *j;
    char path[128];
    const char *id;

    j = ku_call(&K, "POST", "/v1/keys", "{\"name\":\"metered\"}", &status);
    ck_assert_int_eq(status, 201);
    json_decref(j);
    do_scrape(&a);
    for (int i = 0; i < 5; i++) {
        j = ku_call(&K, "POST", "/v1/keys/metered/datakeys", "{\"context\":{\"t\":\"m\"}}",
                    &status);
        ck_assert_int_eq(status, 201);
        json_decref(j);
    }
    j = ku_call(&K, "POST", "/v1/keys/metered/datakeys", "{\"context\":{\"t\":\"m\"}}", &status);
    ck_assert_int_eq(status, 201);
    id = json_string_value(json_object_get(j, "dek_id"));
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", id);
    json_decref(j);
    for (int i = 0; i < 3; i++) {
        j = ku_call(&K, "POST", path, "{\"context\":{\"t\":\"m\"}}", &status);
        ck_assert_int_eq(status, 200);
        json_decref(j);
    }
    j = ku_call(&K, "POST", path, "{\"context\":{\"t\":\"x\"}}", &status);
    ck_assert_int_eq(status, 400);
    json_decref(j);
    j = ku_call(&K, "GET", "/v1/no-such-route", NULL, &status);
    ck_assert_int_eq(status, 404);
    json_decref(j);
    do_scrape(&b);

    ck_assert_double_eq(
        get0(&b, "p11kms_http_requests_total{route=\"datakey.generate\",status=\"201\"}") -
            get0(&a, "p11kms_http_requests_total{route=\"datakey.generate\",status=\"201\"}"),
        6);
    ck_assert_double_eq(
        get0(&b, "p11kms_http_requests_total{route=\"datakey.decrypt\",status=\"200\"}") -
            get0(&a, "p11kms_http_requests_total{route=\"datakey.decrypt\",status=\"200\"}"),
        3);
    ck_assert_double_eq(
        get0(&b, "p11kms_http_requests_total{route=\"datakey.decrypt\",status=\"400\"}") -
            get0(&a, "p11kms_http_requests_total{route=\"datakey.decrypt\",status=\"400\"}"),
        1);
    ck_assert_double_ge(get0(&b, "p11kms_http_requests_total{route=\"none\",status=\"404\"}"), 1);
    /* the first scrape is counted by the second */
    ck_assert_double_ge(get0(&b, "p11kms_http_requests_total{route=\"metrics\",status=\"200\"}"),
                        1);
    assert_histograms(&b, "p11kms_http_request_duration_seconds");
    assert_histograms(&b, "p11kms_token_call_duration_seconds");
    ck_assert_double_gt(
        get0(&b, "p11kms_http_request_duration_seconds_count{route=\"datakey.generate\"}"), 5);
    /* Token calls: one C_Encrypt per datakey, one C_Decrypt per decrypt. */
    ck_assert_double_ge(get0(&b, "p11kms_token_call_duration_seconds_count{fn=\"C_Encrypt\"}") -
                            get0(&a, "p11kms_token_call_duration_seconds_count{fn=\"C_Encrypt\"}"),
                        6);
    ck_assert_double_ge(get0(&b, "p11kms_token_call_duration_seconds_count{fn=\"C_Decrypt\"}") -
                            get0(&a, "p11kms_token_call_duration_seconds_count{fn=\"C_Decrypt\"}"),
                        3);
    ck_assert_double_ge(
        get0(&b, "p11kms_store_commits_total") - get0(&a, "p11kms_store_commits_total"), 1);
    ck_assert_double_ge(get0(&b, "p11kms_store_commit_writes_total"),
                        get0(&b, "p11kms_store_commits_total"));
    ck_assert_double_ge(get(&b, "p11kms_worker_queue_depth"), 0);
    ck_assert_double_ge(get(&b, "p11kms_http_inflight_requests"), 1); /* the scrape itself */
    ck_assert_double_ge(get(&b, "p11kms_http_connections"), 1);
    ck_assert_double_ge(get(&b, "p11kms_store_queued_writes"), 0);
    scrape_free(&a);
    scrape_free(&b);
    ku_assert_healthy(&K);
}
END_TEST

/* Counters never go backwards between scrapes. */
START_TEST(metrics_monotonic)
{
    scrape a, b;

    do_scrape(&a);
    do_scrape(&b);
    for (size_t i = 0; i < a.n; i++) {
        double v;
        if (strstr(a.s[i].key, "_total") == NULL && strstr(a.s[i].key, "_bucket") == NULL &&
            strstr(a.s[i].key, "_count") == NULL)
            continue;
        v = get(&b, a.s[i].key);
        ck_assert_msg(v >= a.s[i].value, "%s went from %g to %g", a.s[i].key, a.s[i].value, v);
    }
    scrape_free(&a);
    scrape_free(&b);
}
END_TEST

/* A wrong method is 405, like every known route. */
START_TEST(metrics_method)
{
    long status = 0;
    json_t *j = ku_call(&K, "POST", "/metrics", NULL, &status);

    ck_assert_int_eq(status, 405);
    json_decref(j);
}
END_TEST

static Suite *metrics_suite(void)
{
    Suite *s = suite_create("kmsd_metrics");
    TCase *tc = tcase_create("metrics");

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, metrics_count_requests);
    tcase_add_test(tc, metrics_monotonic);
    tcase_add_test(tc, metrics_method);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(metrics_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
