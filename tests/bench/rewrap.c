/*
 * tests/bench/rewrap.c - stored rewrap (issue 3): 100 000 DEKs issued
 * in-process (16 threads, durable, group commit) under a key, the key
 * rotated, then one kms_key_rewrap of the whole key timed: rewrap_deks_s.
 * Compared with raw_rewrap_ops_s (raw.c: C_Decrypt + C_GenerateRandom +
 * C_Encrypt straight on the module) measured in the same run.  Its own
 * store file beside inproc.db; the same in-process token.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "kms/core/core.h"
#include "testtoken.h"

#define REWRAP_DEKS    100000
#define REWRAP_FILLERS 16

typedef struct fill {
    kms_core *core;
    int n;
    p11kms_status st;
} fill;

static void *fill_main(void *argp)
{
    fill *f = argp;
    kms_datakey dk;

    f->st = P11KMS_OK;
    for (int i = 0; i < f->n && f->st == P11KMS_OK; i++) {
        f->st = kms_dek_generate(f->core, "rewrap", NULL, &dk);
        kms_datakey_clear(&dk);
    }
    return NULL;
}

int bench_rewrap(const bench_opts *o, json_t *out)
{
    p11_ctx *ctx = NULL;
    kms_store *store = NULL;
    kms_core *core = NULL;
    kms_key_rec *key = NULL;
    pthread_t t[REWRAP_FILLERS];
    fill f[REWRAP_FILLERS];
    uint64_t moved = 0, left = 0, failed = 0;
    double t0, fill_s, rewrap_s;
    char db[512];
    p11kms_status st;
    CK_RV rv;
    int rc = -1;

    snprintf(db, sizeof(db), "%s/rewrap.db", o->tmpdir);
    {
        p11_config cfg = {o->softhsm, o->uri, TT_PIN, 64};
        if ((rv = p11_open(&cfg, &ctx)) != CKR_OK) {
            fprintf(stderr, "bench: p11_open: %s\n", p11_rv_name(rv));
            goto out;
        }
    }
    if ((st = kms_store_open_sqlite(db, &store)) != P11KMS_OK ||
        (st = kms_core_new(ctx, store, &core)) != P11KMS_OK ||
        (st = kms_key_create(core, "rewrap", &key)) != P11KMS_OK) {
        fprintf(stderr, "bench: rewrap setup: %s\n", p11kms_strerror(st));
        goto out;
    }
    t0 = bench_now();
    for (int i = 0; i < REWRAP_FILLERS; i++) {
        f[i].core = core;
        f[i].n = REWRAP_DEKS / REWRAP_FILLERS;
        pthread_create(&t[i], NULL, fill_main, &f[i]);
    }
    for (int i = 0; i < REWRAP_FILLERS; i++) {
        pthread_join(t[i], NULL);
        if (f[i].st != P11KMS_OK) {
            fprintf(stderr, "bench: rewrap fill: %s\n", p11kms_strerror(f[i].st));
            goto out;
        }
    }
    fill_s = bench_now() - t0;
    kms_key_rec_free(key);
    key = NULL;
    if ((st = kms_key_rotate(core, "rewrap", &key)) != P11KMS_OK) {
        fprintf(stderr, "bench: rotate: %s\n", p11kms_strerror(st));
        goto out;
    }
    t0 = bench_now();
    st = kms_key_rewrap(core, "rewrap", 0, &moved, &left, &failed);
    rewrap_s = bench_now() - t0;
    if (st != P11KMS_OK || moved != REWRAP_DEKS || left != 0) {
        fprintf(stderr, "bench: rewrap: %s (%llu moved, %llu left)\n", p11kms_strerror(st),
                (unsigned long long)moved, (unsigned long long)left);
        goto out;
    }
    bench_set(out, "rewrap_deks_s", (double)moved / rewrap_s);
    printf("rewrap: %d DEKs issued in %.1f s, rewrapped in %.2f s (%.0f DEKs/s)\n", REWRAP_DEKS,
           fill_s, rewrap_s, (double)moved / rewrap_s);
    rc = 0;
out:
    kms_key_rec_free(key);
    kms_core_free(core);
    kms_store_close(store);
    p11_close(ctx);
    return rc;
}
