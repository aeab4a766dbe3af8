/*
 * tests/bench/raw.c - the raw token primitives: what SoftHSM2 itself can
 * do, measured through the module's CK_FUNCTION_LIST (p11_function_list:
 * the same p11-kit-loaded module kmsd uses) with one session per thread.
 *
 *   generate: C_GenerateRandom(32 DEK + 12 IV) + C_EncryptInit/C_Encrypt
 *             (AES-GCM, 80-byte AAD) of the 32-byte DEK under a token KEK
 *   decrypt:  C_DecryptInit/C_Decrypt of such a blob
 *   rewrap:   decrypt + C_GenerateRandom(12) + encrypt
 *
 * Each at 1, 2 and 4 threads; the figure is the best, and
 * raw_<mode>_cpu_us is the process CPU (getrusage) of that best run per
 * operation (the in-process module's own threads included).  The same three are
 * also measured (for information) under a session-object AES key
 * (CKA_TOKEN false; the KEKs themselves are not copyable, so
 * C_CopyObject is refused), which SoftHSM2 does not re-read from its
 * object file on every use.  The KEK is labelled "bench-raw:", outside
 * the "p11kms:" namespace the core reconciles.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench.h"
#include "module/p11.h"
#include "testtoken.h"

#define RAW_BLOBS    256
#define RAW_AAD_LEN  80
#define RAW_BLOB_LEN (12 + 32 + 16)

enum raw_mode { RAW_GENERATE, RAW_DECRYPT, RAW_REWRAP };

typedef struct raw_shared {
    CK_FUNCTION_LIST *fl;
    CK_SLOT_ID slot;
    CK_OBJECT_HANDLE key;
    unsigned char aad[RAW_AAD_LEN];
    unsigned char blobs[RAW_BLOBS][RAW_BLOB_LEN];
} raw_shared;

typedef struct raw_thread {
    const raw_shared *sh;
    enum raw_mode mode;
    double seconds;
    pthread_barrier_t *start;
    unsigned long ops;
    CK_RV rv;
} raw_thread;

static void gcm(CK_GCM_PARAMS *p, CK_MECHANISM *m, unsigned char *iv, const unsigned char *aad)
{
    memset(p, 0, sizeof(*p));
    p->pIv = iv;
    p->ulIvLen = 12;
    p->ulIvBits = 96;
    p->pAAD = (CK_BYTE_PTR)aad;
    p->ulAADLen = RAW_AAD_LEN;
    p->ulTagBits = 128;
    m->mechanism = CKM_AES_GCM;
    m->pParameter = p;
    m->ulParameterLen = sizeof(*p);
}

/* blob = IV || ct || tag of the 32 bytes at dek (IV from the token RNG
 * unless iv_ready). */
static CK_RV raw_encrypt(const raw_shared *sh, CK_SESSION_HANDLE s, const unsigned char *dek,
                         unsigned char *blob, int iv_ready)
{
    CK_FUNCTION_LIST *fl = sh->fl;
    CK_GCM_PARAMS p;
    CK_MECHANISM m;
    CK_ULONG len = 32 + 16;
    CK_RV rv = CKR_OK;

    if (!iv_ready && (rv = fl->C_GenerateRandom(s, blob, 12)) != CKR_OK)
        goto out;
    gcm(&p, &m, blob, sh->aad);
    if ((rv = fl->C_EncryptInit(s, &m, sh->key)) != CKR_OK)
        goto out;
    rv = fl->C_Encrypt(s, (CK_BYTE_PTR)dek, 32, blob + 12, &len);
out:
    return rv;
}

static CK_RV raw_decrypt(const raw_shared *sh, CK_SESSION_HANDLE s, const unsigned char *blob,
                         unsigned char *dek)
{
    CK_FUNCTION_LIST *fl = sh->fl;
    CK_GCM_PARAMS p;
    CK_MECHANISM m;
    unsigned char out[48];
    CK_ULONG len = sizeof(out);
    CK_RV rv;

    gcm(&p, &m, (unsigned char *)blob, sh->aad);
    if ((rv = fl->C_DecryptInit(s, &m, sh->key)) != CKR_OK)
        goto out;
    if ((rv = fl->C_Decrypt(s, (CK_BYTE_PTR)blob + 12, 48, out, &len)) != CKR_OK)
        goto out;
    memcpy(dek, out, 32);
out:
    return rv;
}

/* Wrap RAW_BLOBS random DEKs under sh->key for the decrypt runs. */
static CK_RV fill_blobs(raw_shared *sh, CK_SESSION_HANDLE s)
{
    unsigned char dek[32];
    CK_RV rv = CKR_OK;

    for (int i = 0; i < RAW_BLOBS && rv == CKR_OK; i++) {
        rv = sh->fl->C_GenerateRandom(s, dek, sizeof(dek));
        if (rv == CKR_OK)
            rv = raw_encrypt(sh, s, dek, sh->blobs[i], 0);
    }
    return rv;
}

static void *raw_worker(void *argp)
{
    raw_thread *t = argp;
    const raw_shared *sh = t->sh;
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    unsigned char rnd[44], blob[RAW_BLOB_LEN], dek[32];
    double deadline;
    unsigned long i = 0;

    t->rv = sh->fl->C_OpenSession(sh->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s);
    pthread_barrier_wait(t->start);
    if (t->rv != CKR_OK)
        goto out;
    deadline = bench_now() + t->seconds;
    for (i = 0; t->rv == CKR_OK; i++) {
        if ((i & 15) == 0 && bench_now() >= deadline)
            break;
        switch (t->mode) {
        case RAW_GENERATE:
            /* DEK and IV in one call: the cheapest honest generate. */
            t->rv = sh->fl->C_GenerateRandom(s, rnd, sizeof(rnd));
            if (t->rv == CKR_OK) {
                memcpy(blob, rnd + 32, 12);
                t->rv = raw_encrypt(sh, s, rnd, blob, 1);
            }
            break;
        case RAW_DECRYPT: t->rv = raw_decrypt(sh, s, sh->blobs[i % RAW_BLOBS], dek); break;
        case RAW_REWRAP:
            t->rv = raw_decrypt(sh, s, sh->blobs[i % RAW_BLOBS], dek);
            if (t->rv == CKR_OK)
                t->rv = raw_encrypt(sh, s, dek, blob, 0);
            break;
        }
    }
out:
    t->ops = i;
    if (s != CK_INVALID_HANDLE)
        sh->fl->C_CloseSession(s);
    return NULL;
}

/* ops/s of mode at `threads` threads, or -1; *cpu_us: process CPU
 * microseconds per operation over the run. */
static double raw_run(const raw_shared *sh, enum raw_mode mode, int threads, double seconds,
                      double *cpu_us)
{
    pthread_t th[8];
    raw_thread t[8];
    pthread_barrier_t start;
    unsigned long ops = 0;
    double t0, cpu0, elapsed, cpu, result = -1;
    CK_RV rv = CKR_OK;

    pthread_barrier_init(&start, NULL, (unsigned)threads + 1);
    for (int i = 0; i < threads; i++) {
        t[i] = (raw_thread){sh, mode, seconds, &start, 0, CKR_OK};
        pthread_create(&th[i], NULL, raw_worker, &t[i]);
    }
    pthread_barrier_wait(&start);
    t0 = bench_now();
    cpu0 = bench_cpu_self();
    for (int i = 0; i < threads; i++) {
        pthread_join(th[i], NULL);
        ops += t[i].ops;
        if (t[i].rv != CKR_OK)
            rv = t[i].rv;
    }
    elapsed = bench_now() - t0;
    cpu = bench_cpu_self() - cpu0;
    pthread_barrier_destroy(&start);
    if (rv != CKR_OK) {
        fprintf(stderr, "bench: raw mode %d: %s\n", (int)mode, p11_rv_name(rv));
        goto out;
    }
    result = (double)ops / elapsed;
    *cpu_us = ops > 0 ? cpu * 1e6 / (double)ops : 0;
out:
    return result;
}

/* Run generate, decrypt and rewrap at 1, 2, 4 threads; set
 * <prefix>_{generate,decrypt,rewrap}_ops_s (best) and _cpu_us (of the
 * best run), and the details (both per thread count). */
static int raw_series(const raw_shared *sh, double seconds, const char *prefix, json_t *out,
                      json_t *details)
{
    static const char *const names[] = {"generate", "decrypt", "rewrap"};
    static const int counts[] = {1, 2, 4};
    char field[96];
    int rc = -1;

    for (int m = 0; m < 3; m++) {
        double best = -1, best_cpu = 0;
        json_t *by = json_object(), *by_cpu = json_object();
        for (size_t c = 0; c < sizeof(counts) / sizeof(counts[0]); c++) {
            double cpu_us = 0, v = raw_run(sh, (enum raw_mode)m, counts[c], seconds, &cpu_us);
            char key[16];
            if (v < 0) {
                json_decref(by);
                json_decref(by_cpu);
                goto out;
            }
            snprintf(key, sizeof(key), "%d", counts[c]);
            bench_set(by, key, v);
            bench_set(by_cpu, key, cpu_us);
            if (v > best) {
                best = v;
                best_cpu = cpu_us;
            }
            fprintf(stderr, "bench: %s %s, %d thread(s): %.0f ops/s, %.1f us CPU/op\n", prefix,
                    names[m], counts[c], v, cpu_us);
        }
        snprintf(field, sizeof(field), "%s_%s_ops_s", prefix, names[m]);
        bench_set(out, field, best);
        json_object_set_new(details, field, by);
        snprintf(field, sizeof(field), "%s_%s_cpu_us", prefix, names[m]);
        bench_set(out, field, best_cpu);
        json_object_set_new(details, field, by_cpu);
    }
    rc = 0;
out:
    return rc;
}

int bench_raw(const bench_opts *o, json_t *out)
{
    int rc = -1;
    p11_ctx *ctx = NULL;
    raw_shared *sh = NULL;
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    unsigned char id[P11_KEK_ID_LEN];
    CK_OBJECT_HANDLE token_key = CK_INVALID_HANDLE, session_key = CK_INVALID_HANDLE;
    json_t *details = json_object();
    CK_RV rv;

    {
        p11_config cfg = {o->softhsm, o->uri, TT_PIN, 16};
        if ((rv = p11_open(&cfg, &ctx)) != CKR_OK) {
            fprintf(stderr, "bench: p11_open: %s\n", p11_rv_name(rv));
            goto out;
        }
    }
    if ((rv = p11_kek_create(ctx, "bench-raw:v1", id)) != CKR_OK) {
        fprintf(stderr, "bench: p11_kek_create: %s\n", p11_rv_name(rv));
        goto out;
    }
    sh = calloc(1, sizeof(*sh));
    if (sh == NULL)
        goto out;
    sh->fl = p11_function_list(ctx);
    sh->slot = p11_slot_id(ctx);
    memset(sh->aad, 'a', sizeof(sh->aad));
    rv = sh->fl->C_OpenSession(sh->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s);
    if (rv != CKR_OK)
        goto fail;
    {
        CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
        CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof(cls)}, {CKA_ID, id, sizeof(id)}};
        CK_ULONG n = 0;
        if ((rv = sh->fl->C_FindObjectsInit(s, t, 2)) != CKR_OK ||
            (rv = sh->fl->C_FindObjects(s, &token_key, 1, &n)) != CKR_OK ||
            (rv = sh->fl->C_FindObjectsFinal(s)) != CKR_OK)
            goto fail;
        if (n != 1) {
            rv = CKR_KEY_HANDLE_INVALID;
            goto fail;
        }
    }
    {
        /* A session-object KEK (C_CopyObject is refused: the KEK is not
         * copyable): AES-256, sensitive, non-extractable, CKA_TOKEN false;
         * it lives as long as session s. */
        CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
        CK_ULONG klen = 32;
        CK_MECHANISM m = {CKM_AES_KEY_GEN, NULL, 0};
        CK_ATTRIBUTE t[] = {
            {CKA_TOKEN, &no, sizeof(no)},       {CKA_SENSITIVE, &yes, sizeof(yes)},
            {CKA_EXTRACTABLE, &no, sizeof(no)}, {CKA_ENCRYPT, &yes, sizeof(yes)},
            {CKA_DECRYPT, &yes, sizeof(yes)},   {CKA_VALUE_LEN, &klen, sizeof(klen)},
        };
        if ((rv = sh->fl->C_GenerateKey(s, &m, t, sizeof(t) / sizeof(t[0]), &session_key)) !=
            CKR_OK)
            goto fail;
    }
    sh->key = token_key;
    if ((rv = fill_blobs(sh, s)) != CKR_OK)
        goto fail;
    if (raw_series(sh, o->seconds, "raw", out, details) != 0)
        goto out;
    sh->key = session_key;
    if ((rv = fill_blobs(sh, s)) != CKR_OK)
        goto fail;
    if (raw_series(sh, o->seconds, "raw_session_kek", details, details) != 0)
        goto out;
    json_object_set(out, "raw_details", details);
    rc = 0;
    goto out;
fail:
    fprintf(stderr, "bench: raw setup: %s\n", p11_rv_name(rv));
out:
    json_decref(details);
    if (s != CK_INVALID_HANDLE)
        sh->fl->C_CloseSession(s);
    free(sh);
    p11_close(ctx);
    return rc;
}
