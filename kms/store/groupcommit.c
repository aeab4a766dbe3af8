/*
 * kms/store/groupcommit.c - the group-commit writer shared by the store
 * backends (interface in store_internal.h).
 *
 * Callers queue a kms_write (on their own stack) and sleep; one writer
 * thread takes everything queued (up to GC_MAX_GROUP), runs it through the
 * backend as one transaction (begin, apply each write under its own
 * savepoint, commit: one fsync for the group), then marks each write done
 * and wakes the callers.  While a group commits, the next one queues up,
 * so the number of fsyncs per second, not per write, bounds throughput.
 *
 * Locking: gc->mu guards the queue, `stopping`, `done` flags and the
 * statistics.  The writer never holds mu while it talks to the database.
 * A write struct is not touched by the writer after its `done` flag is
 * set (the caller may return and reuse its stack at once).
 */
#include "kms/store/store_internal.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "module/log.h"

#define GC_MAX_GROUP 1024

struct kms_gc {
    const kms_gc_ops *ops;
    void *ctx;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work_cv; /* the writer waits here for work */
    pthread_cond_t done_cv; /* callers wait here for their results */
    kms_write *head;
    kms_write *tail;
    size_t queued;
    int stopping;
    uint64_t commits;
    uint64_t writes;
    uint64_t failed_groups;
};

static void fail_all(kms_write *batch, size_t n)
{
    kms_write *w = batch;

    for (size_t i = 0; i < n; i++, w = w->next)
        w->result = P11KMS_ERR_STORE_UNAVAILABLE;
}

/* Run one group; returns 1 if it committed.  Called without gc->mu. */
static int run_group(kms_gc *gc, kms_write *batch, size_t n)
{
    kms_write *w = batch;
    int committed = 0;

    if (gc->ops->begin(gc->ctx) != P11KMS_OK) {
        fail_all(batch, n);
        goto out;
    }
    for (size_t i = 0; i < n; i++, w = w->next) {
        w->result = gc->ops->apply(gc->ctx, w);
        if (w->result == P11KMS_ERR_STORE_UNAVAILABLE) {
            LOG_ERROR("store", "write %zu of a group of %zu failed: rolling the group back", i + 1,
                      n);
            gc->ops->rollback(gc->ctx);
            fail_all(batch, n);
            goto out;
        }
    }
    if (gc->ops->commit(gc->ctx) != P11KMS_OK) {
        gc->ops->rollback(gc->ctx);
        fail_all(batch, n);
        goto out;
    }
    committed = 1;
out:
    return committed;
}

static void *writer_main(void *arg)
{
    kms_gc *gc = arg;

    pthread_mutex_lock(&gc->mu);
    for (;;) {
        kms_write *batch, *last, *w, *next;
        size_t n = 1;
        int committed;

        while (gc->head == NULL && !gc->stopping)
            pthread_cond_wait(&gc->work_cv, &gc->mu);
        if (gc->head == NULL)
            break; /* stopping, and the queue is drained */

        batch = last = gc->head;
        while (last->next != NULL && n < GC_MAX_GROUP) {
            last = last->next;
            n++;
        }
        gc->head = last->next;
        if (gc->head == NULL)
            gc->tail = NULL;
        last->next = NULL;
        gc->queued -= n;
        pthread_mutex_unlock(&gc->mu);

        committed = run_group(gc, batch, n);

        pthread_mutex_lock(&gc->mu);
        if (committed) {
            gc->commits++;
            gc->writes += n;
        } else {
            gc->failed_groups++;
        }
        for (w = batch; w != NULL; w = next) {
            next = w->next;
            w->done = 1; /* w may be gone once mu is released */
        }
        pthread_cond_broadcast(&gc->done_cv);
    }
    pthread_mutex_unlock(&gc->mu);
    return NULL;
}

p11kms_status kms_gc_start(const kms_gc_ops *ops, void *ctx, kms_gc **out)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    kms_gc *gc = NULL;
    int mu_ok = 0, work_ok = 0, done_ok = 0, err;

    gc = calloc(1, sizeof(*gc));
    if (gc == NULL)
        goto out;
    gc->ops = ops;
    gc->ctx = ctx;
    rv = P11KMS_ERR_INTERNAL;
    if (pthread_mutex_init(&gc->mu, NULL) != 0)
        goto out;
    mu_ok = 1;
    if (pthread_cond_init(&gc->work_cv, NULL) != 0)
        goto out;
    work_ok = 1;
    if (pthread_cond_init(&gc->done_cv, NULL) != 0)
        goto out;
    done_ok = 1;
    err = pthread_create(&gc->thread, NULL, writer_main, gc);
    if (err != 0) {
        LOG_ERROR("store", "cannot start the writer thread: %s", strerror(err));
        goto out;
    }
    *out = gc;
    gc = NULL;
    rv = P11KMS_OK;
out:
    if (gc != NULL) {
        if (done_ok)
            pthread_cond_destroy(&gc->done_cv);
        if (work_ok)
            pthread_cond_destroy(&gc->work_cv);
        if (mu_ok)
            pthread_mutex_destroy(&gc->mu);
        free(gc);
    }
    return rv;
}

p11kms_status kms_gc_submit(kms_gc *gc, kms_write *w)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;

    w->done = 0;
    w->next = NULL;
    w->result = P11KMS_ERR_STORE_UNAVAILABLE;
    pthread_mutex_lock(&gc->mu);
    if (gc->stopping) {
        LOG_ERROR("store", "write refused: the store is closing");
        goto out;
    }
    if (gc->tail != NULL)
        gc->tail->next = w;
    else
        gc->head = w;
    gc->tail = w;
    gc->queued++;
    pthread_cond_signal(&gc->work_cv);
    while (!w->done)
        pthread_cond_wait(&gc->done_cv, &gc->mu);
    rv = w->result;
out:
    pthread_mutex_unlock(&gc->mu);
    return rv;
}

void kms_gc_stop(kms_gc *gc)
{
    if (gc == NULL)
        return;
    pthread_mutex_lock(&gc->mu);
    gc->stopping = 1;
    pthread_cond_signal(&gc->work_cv);
    pthread_mutex_unlock(&gc->mu);
    pthread_join(gc->thread, NULL);
    pthread_cond_destroy(&gc->done_cv);
    pthread_cond_destroy(&gc->work_cv);
    pthread_mutex_destroy(&gc->mu);
    free(gc);
}

void kms_gc_stats(kms_gc *gc, kms_store_stats_ex *out)
{
    pthread_mutex_lock(&gc->mu);
    out->commits = gc->commits;
    out->writes = gc->writes;
    out->failed_groups = gc->failed_groups;
    out->queued = gc->queued;
    pthread_mutex_unlock(&gc->mu);
}
