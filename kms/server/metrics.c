/*
 * kms/server/metrics.c - the counters behind GET /metrics and their
 * rendering in the Prometheus text exposition format (version 0.0.4).
 *
 * Requests: per route (a slot per route name, claimed on first use with a
 * compare-and-swap) a count per HTTP status and a latency histogram.
 * Every counter is a relaxed atomic: the request path takes no lock and
 * costs a few atomic additions.  Token calls come from the module's own
 * counters (p11_stats_get), group commit from the store
 * (kms_store_stats_get), gauges from the server, DEK counts by state
 * from one store query per scrape (kms_store_counts_get).  Scraping reads
 * counters that keep moving: a scrape is a consistent-enough snapshot,
 * never a blocking one.
 *
 * State: process-wide (one kmsd per process).  Locking: none.
 */
#include "kms/server/metrics.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kms/store/store_internal.h"
#include "module/p11.h"

#define MAX_ROUTES 40

static const int status_codes[] = {200, 201, 204, 400, 401, 403, 404,
                                   405, 409, 410, 413, 429, 500, 503};
#define N_STATUS     (sizeof(status_codes) / sizeof(status_codes[0]))
#define STATUS_OTHER N_STATUS /* any other status */

/* Upper bounds of the request latency buckets, in microseconds. */
static const uint64_t bounds_us[] = {250,   500,   1000,   2500,   5000,   10000,
                                     25000, 50000, 100000, 250000, 1000000};
#define N_BUCKETS (sizeof(bounds_us) / sizeof(bounds_us[0]))

typedef struct route_stats {
    _Atomic(const char *) name; /* NULL: free slot */
    _Atomic uint64_t by_status[N_STATUS + 1];
    _Atomic uint64_t bucket[N_BUCKETS]; /* not cumulative; the rest is +Inf */
    _Atomic uint64_t sum_us;
} route_stats;

static route_stats routes[MAX_ROUTES];
static _Atomic uint64_t dropped; /* requests of routes beyond MAX_ROUTES */

static route_stats *route_slot(const char *name)
{
    for (size_t i = 0; i < MAX_ROUTES; i++) {
        const char *have = atomic_load_explicit(&routes[i].name, memory_order_acquire);

        if (have == NULL) {
            const char *expected = NULL;
            if (atomic_compare_exchange_strong(&routes[i].name, &expected, name))
                return &routes[i];
            have = expected; /* another thread claimed it: for which name? */
        }
        if (have == name || strcmp(have, name) == 0)
            return &routes[i];
    }
    return NULL;
}

void kms_metrics_request(const char *route, int status, uint64_t us)
{
    route_stats *rs = route_slot(route != NULL ? route : "none");
    size_t si = STATUS_OTHER, b = 0;

    if (rs == NULL) {
        atomic_fetch_add_explicit(&dropped, 1, memory_order_relaxed);
        return;
    }
    for (size_t i = 0; i < N_STATUS; i++)
        if (status_codes[i] == status) {
            si = i;
            break;
        }
    while (b < N_BUCKETS && us > bounds_us[b])
        b++;
    atomic_fetch_add_explicit(&rs->by_status[si], 1, memory_order_relaxed);
    if (b < N_BUCKETS)
        atomic_fetch_add_explicit(&rs->bucket[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&rs->sum_us, us, memory_order_relaxed);
}

/* ---- rendering ---------------------------------------------------------- */

static void render_requests(FILE *f)
{
    fputs("# HELP p11kms_http_requests_total HTTP requests answered, by route and status.\n"
          "# TYPE p11kms_http_requests_total counter\n",
          f);
    for (size_t i = 0; i < MAX_ROUTES; i++) {
        const char *name = atomic_load_explicit(&routes[i].name, memory_order_acquire);

        if (name == NULL)
            break;
        for (size_t s = 0; s <= N_STATUS; s++) {
            uint64_t n = atomic_load_explicit(&routes[i].by_status[s], memory_order_relaxed);
            if (n == 0)
                continue;
            if (s == STATUS_OTHER)
                fprintf(f, "p11kms_http_requests_total{route=\"%s\",status=\"other\"} %llu\n", name,
                        (unsigned long long)n);
            else
                fprintf(f, "p11kms_http_requests_total{route=\"%s\",status=\"%d\"} %llu\n", name,
                        status_codes[s], (unsigned long long)n);
        }
    }
    fprintf(f,
            "# HELP p11kms_http_requests_uncounted_total Requests of routes beyond the table.\n"
            "# TYPE p11kms_http_requests_uncounted_total counter\n"
            "p11kms_http_requests_uncounted_total %llu\n",
            (unsigned long long)atomic_load_explicit(&dropped, memory_order_relaxed));

    fputs("# HELP p11kms_http_request_duration_seconds Time from request to reply, by route.\n"
          "# TYPE p11kms_http_request_duration_seconds histogram\n",
          f);
    for (size_t i = 0; i < MAX_ROUTES; i++) {
        const char *name = atomic_load_explicit(&routes[i].name, memory_order_acquire);
        uint64_t total = 0, acc = 0;

        if (name == NULL)
            break;
        for (size_t s = 0; s <= N_STATUS; s++)
            total += atomic_load_explicit(&routes[i].by_status[s], memory_order_relaxed);
        for (size_t b = 0; b < N_BUCKETS; b++) {
            acc += atomic_load_explicit(&routes[i].bucket[b], memory_order_relaxed);
            fprintf(f, "p11kms_http_request_duration_seconds_bucket{route=\"%s\",le=\"%g\"} %llu\n",
                    name, (double)bounds_us[b] / 1e6,
                    (unsigned long long)(acc < total ? acc : total));
        }
        fprintf(f, "p11kms_http_request_duration_seconds_bucket{route=\"%s\",le=\"+Inf\"} %llu\n",
                name, (unsigned long long)total);
        fprintf(f, "p11kms_http_request_duration_seconds_sum{route=\"%s\"} %.6f\n", name,
                (double)atomic_load_explicit(&routes[i].sum_us, memory_order_relaxed) / 1e6);
        fprintf(f, "p11kms_http_request_duration_seconds_count{route=\"%s\"} %llu\n", name,
                (unsigned long long)total);
    }
}

static void render_token(FILE *f, p11_ctx *token)
{
    p11_stats st;

    p11_stats_get(token, &st);
    fputs("# HELP p11kms_token_call_duration_seconds PKCS#11 calls and their latency, by "
          "function.\n"
          "# TYPE p11kms_token_call_duration_seconds histogram\n",
          f);
    for (size_t i = 0; i < st.n_fns; i++) {
        const p11_fn_stats *fs = &st.fns[i];
        for (size_t b = 0; b < P11_STATS_BUCKETS; b++)
            fprintf(f, "p11kms_token_call_duration_seconds_bucket{fn=\"%s\",le=\"%g\"} %llu\n",
                    fs->fn, (double)p11_stats_bounds_us[b] / 1e6,
                    (unsigned long long)fs->bucket[b]);
        fprintf(f, "p11kms_token_call_duration_seconds_bucket{fn=\"%s\",le=\"+Inf\"} %llu\n",
                fs->fn, (unsigned long long)fs->calls);
        fprintf(f, "p11kms_token_call_duration_seconds_sum{fn=\"%s\"} %.6f\n", fs->fn,
                (double)fs->sum_us / 1e6);
        fprintf(f, "p11kms_token_call_duration_seconds_count{fn=\"%s\"} %llu\n", fs->fn,
                (unsigned long long)fs->calls);
    }
    fputs("# HELP p11kms_token_errors_total Failed PKCS#11 calls, by CK_RV (expected ones "
          "included, e.g. a GCM tag that does not verify).\n"
          "# TYPE p11kms_token_errors_total counter\n",
          f);
    for (size_t i = 0; i < st.n_errors; i++)
        fprintf(f, "p11kms_token_errors_total{rv=\"%s\"} %llu\n", p11_rv_name(st.errors[i].rv),
                (unsigned long long)st.errors[i].count);
    if (st.errors_other > 0)
        fprintf(f, "p11kms_token_errors_total{rv=\"other\"} %llu\n",
                (unsigned long long)st.errors_other);
}

static void render_store(FILE *f, kms_store *store)
{
    kms_store_stats_ex st;

    memset(&st, 0, sizeof(st));
    kms_store_stats_get(store, &st);
    fprintf(f,
            "# HELP p11kms_store_commits_total Group commits (one transaction, one fsync).\n"
            "# TYPE p11kms_store_commits_total counter\n"
            "p11kms_store_commits_total %llu\n"
            "# HELP p11kms_store_commit_writes_total Writes carried by group commits (÷ commits = "
            "mean batch size).\n"
            "# TYPE p11kms_store_commit_writes_total counter\n"
            "p11kms_store_commit_writes_total %llu\n"
            "# HELP p11kms_store_failed_groups_total Groups rolled back.\n"
            "# TYPE p11kms_store_failed_groups_total counter\n"
            "p11kms_store_failed_groups_total %llu\n"
            "# HELP p11kms_store_queued_writes Writes waiting for the store writer.\n"
            "# TYPE p11kms_store_queued_writes gauge\n"
            "p11kms_store_queued_writes %llu\n"
            "# HELP p11kms_store_writable 0 while a store failure makes the writer refuse writes "
            "(SQLite), else 1.\n"
            "# TYPE p11kms_store_writable gauge\n"
            "p11kms_store_writable %d\n"
            "# HELP p11kms_store_refused_writes_total Writes refused at once while the store "
            "could not be written.\n"
            "# TYPE p11kms_store_refused_writes_total counter\n"
            "p11kms_store_refused_writes_total %llu\n",
            (unsigned long long)st.commits, (unsigned long long)st.writes,
            (unsigned long long)st.failed_groups, (unsigned long long)st.queued, st.failing ? 0 : 1,
            (unsigned long long)st.refused_writes);
}

/* DEKs by state (the counts of GET /v1/status, not audited: a scrape is
 * not an operation); left out when the store cannot count. */
static void render_datakeys(FILE *f, kms_store *store)
{
    kms_store_counts c;

    if (kms_store_counts_get(store, &c) != P11KMS_OK)
        return;
    fprintf(f,
            "# HELP p11kms_datakeys Data keys in the store, by state.\n"
            "# TYPE p11kms_datakeys gauge\n"
            "p11kms_datakeys{state=\"active\"} %llu\n"
            "p11kms_datakeys{state=\"revoked\"} %llu\n"
            "p11kms_datakeys{state=\"destroyed\"} %llu\n",
            (unsigned long long)c.deks_active, (unsigned long long)c.deks_revoked,
            (unsigned long long)c.deks_destroyed);
}

void kms_metrics_render(kms_core *core, const kms_metrics_gauges *g, kms_reply *r)
{
    char *buf = NULL;
    size_t len = 0;
    int ok = 0;
    FILE *f = open_memstream(&buf, &len);

    if (f == NULL)
        goto out;
    render_requests(f);
    render_token(f, kms_core_token(core));
    render_store(f, kms_core_store(core));
    render_datakeys(f, kms_core_store(core));
    fprintf(f,
            "# HELP p11kms_worker_queue_depth Worker jobs queued or running.\n"
            "# TYPE p11kms_worker_queue_depth gauge\n"
            "p11kms_worker_queue_depth %zu\n"
            "# HELP p11kms_http_inflight_requests Requests between arrival and reply.\n"
            "# TYPE p11kms_http_inflight_requests gauge\n"
            "p11kms_http_inflight_requests %ld\n"
            "# HELP p11kms_http_connections Open client connections.\n"
            "# TYPE p11kms_http_connections gauge\n"
            "p11kms_http_connections %ld\n"
            "# HELP p11kms_http_request_timeouts_total Connections closed because a request "
            "did not arrive whole within [server] request_timeout.\n"
            "# TYPE p11kms_http_request_timeouts_total counter\n"
            "p11kms_http_request_timeouts_total %ld\n"
            "# HELP p11kms_http_accept_pauses_total Times accepting paused for want of file "
            "descriptors or memory.\n"
            "# TYPE p11kms_http_accept_pauses_total counter\n"
            "p11kms_http_accept_pauses_total %ld\n",
            g->queue_depth, g->inflight, g->connections, g->request_timeouts, g->accept_pauses);
    ok = fclose(f) == 0;
    f = NULL;
out:
    if (f != NULL)
        fclose(f);
    if (ok) {
        kms_reply_clear(r);
        r->status = 200;
        r->body = buf;
        r->len = len;
        r->content_type = "text/plain; version=0.0.4; charset=utf-8";
    } else {
        free(buf);
        kms_reply_error(r, P11KMS_ERR_INTERNAL, "cannot render the metrics");
    }
}
