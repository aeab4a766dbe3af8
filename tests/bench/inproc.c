/*
 * tests/bench/inproc.c - the core library with the durable SQLite store,
 * no HTTP: N threads calling kms_dek_generate (every DEK durable before it
 * returns, group commit), then kms_dek_decrypt of the DEKs each thread
 * issued, with its own encryption context.  N = 1, 8, 32; the figure is
 * the best, and inproc_{datakey,decrypt}_cpu_us is the process CPU
 * (getrusage: callers, the store's writer and the module together) of that
 * best run per operation.  Also reports the group-commit batch size
 * (kms_store_stats: DEK rows per SQLite commit, i.e. per fsync) of each run.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "kms/core/core.h"
#include "testtoken.h"

#define INPROC_MAX_THREADS 32
#define INPROC_IDS         20000 /* DEK ids kept per thread for the decrypt run */

typedef struct inproc_thread {
    kms_core *core;
    int index;
    int decrypt;
    double seconds;
    pthread_barrier_t *start;
    char (*ids)[KMS_DEK_ID_LEN + 1];
    size_t n_ids;
    unsigned long ops;
    p11kms_status st;
} inproc_thread;

static void *inproc_worker(void *argp)
{
    inproc_thread *t = argp;
    kms_datakey dk;
    char tenant[32];
    json_t *context;
    double deadline;
    unsigned long i = 0;

    snprintf(tenant, sizeof(tenant), "t%04d", t->index);
    context = json_pack("{s:s}", "tenant", tenant);
    t->st = P11KMS_OK;
    pthread_barrier_wait(t->start);
    deadline = bench_now() + t->seconds;
    for (i = 0; t->st == P11KMS_OK; i++) {
        if ((i & 7) == 0 && bench_now() >= deadline)
            break;
        if (t->decrypt) {
            if (t->n_ids == 0)
                break;
            t->st = kms_dek_decrypt(t->core, t->ids[i % t->n_ids], context, &dk);
        } else {
            t->st = kms_dek_generate(t->core, "bench", context, &dk);
            if (t->st == P11KMS_OK && t->n_ids < INPROC_IDS)
                memcpy(t->ids[t->n_ids++], dk.id, sizeof(dk.id));
        }
        kms_datakey_clear(&dk);
    }
    t->ops = i;
    json_decref(context);
    return NULL;
}

/* One run; ops/s or -1; *cpu_us: process CPU microseconds per operation. */
static double inproc_run(kms_core *core, inproc_thread *t, int threads, int decrypt, double seconds,
                         double *cpu_us)
{
    pthread_t th[INPROC_MAX_THREADS];
    pthread_barrier_t start;
    unsigned long ops = 0;
    double t0, cpu0, elapsed, cpu;
    p11kms_status st = P11KMS_OK;

    pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
    for (int i = 0; i < threads; i++) {
        t[i].core = core;
        t[i].index = i;
        t[i].decrypt = decrypt;
        t[i].seconds = seconds;
        t[i].start = &start;
        pthread_create(&th[i], NULL, inproc_worker, &t[i]);
    }
    pthread_barrier_wait(&start);
    t0 = bench_now();
    cpu0 = bench_cpu_self();
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        ops += t[i].ops;
        if (t[i].st != P11KMS_OK)
            st = t[i].st;
    }
    elapsed = bench_now() - t0;
    cpu = bench_cpu_self() - cpu0;
    pthread_barrier_destroy(&start);
    if (st != P11KMS_OK) {
        fprintf(stderr, "bench: inproc %s: %s\n", decrypt ? "decrypt" : "datakey",
                p11kms_strerror(st));
        return -1;
    }
    *cpu_us = ops > 0 ? cpu * 1e6 / (double)ops : 0;
    return (double)ops / elapsed;
}

int bench_inproc(const bench_opts *o, json_t *out)
{
    static const int counts[] = {1, 8, 32};
    p11_ctx *ctx = NULL;
    kms_store *store = NULL;
    kms_core *core = NULL;
    kms_key_rec *key = NULL;
    inproc_thread *t = NULL;
    char db[512];
    json_t *details = json_object();
    double best_gen = -1, best_dec = -1, best_gen_cpu = 0, best_dec_cpu = 0;
    p11kms_status st;
    CK_RV rv;
    int rc = -1;

    snprintf(db, sizeof(db), "%s/inproc.db", o->tmpdir);
    {
        p11_config cfg = {o->softhsm, o->uri, TT_PIN, INPROC_MAX_THREADS};
        if ((rv = p11_open(&cfg, &ctx)) != CKR_OK) {
            fprintf(stderr, "bench: p11_open: %s\n", p11_rv_name(rv));
            goto out;
        }
    }
    if ((st = kms_store_open_sqlite(db, &store)) != P11KMS_OK ||
        (st = kms_core_new(ctx, store, &core)) != P11KMS_OK ||
        (st = kms_key_create(core, "bench", &key)) != P11KMS_OK) {
        fprintf(stderr, "bench: inproc setup: %s\n", p11kms_strerror(st));
        goto out;
    }
    t = calloc(INPROC_MAX_THREADS, sizeof(*t));
    if (t == NULL)
        goto out;
    for (int i = 0; i < INPROC_MAX_THREADS; i++) {
        t[i].ids = calloc(INPROC_IDS, sizeof(*t[i].ids));
        if (t[i].ids == NULL)
            goto out;
    }
    for (size_t c = 0; c < sizeof(counts) / sizeof(counts[0]); c++) {
        uint64_t commits0, writes0, commits1, writes1;
        double gen, dec, gen_cpu = 0, dec_cpu = 0;
        json_t *run = json_object();
        char key_name[16];

        for (int i = 0; i < INPROC_MAX_THREADS; i++)
            t[i].n_ids = 0;
        kms_store_stats(store, &commits0, &writes0);
        gen = inproc_run(core, t, counts[c], 0, o->seconds, &gen_cpu);
        kms_store_stats(store, &commits1, &writes1);
        dec = gen < 0 ? -1 : inproc_run(core, t, counts[c], 1, o->seconds, &dec_cpu);
        if (gen < 0 || dec < 0) {
            json_decref(run);
            goto out;
        }
        bench_set(run, "datakey_ops_s", gen);
        bench_set(run, "decrypt_ops_s", dec);
        bench_set(run, "datakey_cpu_us", gen_cpu);
        bench_set(run, "decrypt_cpu_us", dec_cpu);
        json_object_set_new(run, "commits", json_integer((json_int_t)(commits1 - commits0)));
        json_object_set_new(run, "writes", json_integer((json_int_t)(writes1 - writes0)));
        if (commits1 > commits0)
            bench_set(run, "deks_per_commit",
                      (double)(writes1 - writes0) / (double)(commits1 - commits0));
        snprintf(key_name, sizeof(key_name), "%d", counts[c]);
        json_object_set_new(details, key_name, run);
        fprintf(stderr,
                "bench: inproc %d thread(s): datakey %.0f ops/s (%.1f us CPU/op), decrypt %.0f "
                "ops/s (%.1f us CPU/op), %.1f DEKs per commit\n",
                counts[c], gen, gen_cpu, dec, dec_cpu,
                commits1 > commits0 ? (double)(writes1 - writes0) / (double)(commits1 - commits0)
                                    : 0.0);
        if (gen > best_gen) {
            best_gen = gen;
            best_gen_cpu = gen_cpu;
        }
        if (dec > best_dec) {
            best_dec = dec;
            best_dec_cpu = dec_cpu;
        }
    }
    bench_set(out, "inproc_datakey_ops_s", best_gen);
    bench_set(out, "inproc_decrypt_ops_s", best_dec);
    bench_set(out, "inproc_datakey_cpu_us", best_gen_cpu);
    bench_set(out, "inproc_decrypt_cpu_us", best_dec_cpu);
    json_object_set(out, "inproc_details", details);
    rc = 0;
out:
    json_decref(details);
    if (t != NULL)
        for (int i = 0; i < INPROC_MAX_THREADS; i++)
            free(t[i].ids);
    free(t);
    kms_key_rec_free(key);
    kms_core_free(core);
    kms_store_close(store);
    p11_close(ctx);
    return rc;
}
