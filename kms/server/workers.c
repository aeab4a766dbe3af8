/*
 * kms/server/workers.c - the bounded worker pool (see workers.h).
 *
 * Locking: one mutex guards the ring buffer, the counters and the stop
 * flag; `ready` wakes workers when a job is queued or the pool stops.
 * Worker threads block every signal (signals belong to the main loop).
 */
#include "kms/server/workers.h"

#include <pthread.h>
#include <signal.h>
#include <stdlib.h>

#include "module/log.h"

typedef struct job {
    kms_work_fn fn;
    void *arg;
} job;

struct kms_workers {
    pthread_mutex_t lock;
    pthread_cond_t ready;
    job *ring;
    size_t cap, head, len, running;
    int stopping;
    pthread_t *threads;
    size_t n_threads;
};

static void *worker_main(void *arg)
{
    kms_workers *w = arg;
    job j;

    pthread_setname_np(pthread_self(), "kmsd-worker"); /* top -H, perf */
    pthread_mutex_lock(&w->lock);
    for (;;) {
        while (w->len == 0 && !w->stopping)
            pthread_cond_wait(&w->ready, &w->lock);
        if (w->len == 0)
            break; /* stopping and drained */
        j = w->ring[w->head];
        w->head = (w->head + 1) % w->cap;
        w->len--;
        w->running++;
        pthread_mutex_unlock(&w->lock);
        j.fn(j.arg);
        pthread_mutex_lock(&w->lock);
        w->running--;
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

p11kms_status kms_workers_new(size_t threads, size_t queue_max, kms_workers **out)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    kms_workers *w = NULL;
    sigset_t all, old;
    int masked = 0;

    if (threads == 0 || queue_max == 0)
        return P11KMS_ERR_BAD_REQUEST;
    w = calloc(1, sizeof(*w));
    if (w == NULL)
        goto out;
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->ready, NULL);
    w->cap = queue_max;
    w->ring = calloc(queue_max, sizeof(*w->ring));
    w->threads = calloc(threads, sizeof(*w->threads));
    if (w->ring == NULL || w->threads == NULL)
        goto out;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    masked = 1;
    for (; w->n_threads < threads; w->n_threads++) {
        if (pthread_create(&w->threads[w->n_threads], NULL, worker_main, w) != 0) {
            LOG_ERROR("http", "cannot start worker thread %zu", w->n_threads);
            rv = P11KMS_ERR_INTERNAL;
            goto out;
        }
    }
    *out = w;
    w = NULL;
    rv = P11KMS_OK;
out:
    if (masked)
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    kms_workers_free(w);
    return rv;
}

p11kms_status kms_workers_submit(kms_workers *w, kms_work_fn fn, void *arg)
{
    p11kms_status rv = P11KMS_ERR_OVERLOADED;

    pthread_mutex_lock(&w->lock);
    if (w->stopping || w->len == w->cap)
        goto out;
    w->ring[(w->head + w->len) % w->cap] = (job){fn, arg};
    w->len++;
    pthread_cond_signal(&w->ready);
    rv = P11KMS_OK;
out:
    pthread_mutex_unlock(&w->lock);
    return rv;
}

size_t kms_workers_pending(kms_workers *w)
{
    size_t n;

    pthread_mutex_lock(&w->lock);
    n = w->len + w->running;
    pthread_mutex_unlock(&w->lock);
    return n;
}

void kms_workers_free(kms_workers *w)
{
    if (w == NULL)
        return;
    pthread_mutex_lock(&w->lock);
    w->stopping = 1;
    pthread_cond_broadcast(&w->ready);
    pthread_mutex_unlock(&w->lock);
    for (size_t i = 0; i < w->n_threads; i++)
        pthread_join(w->threads[i], NULL);
    pthread_cond_destroy(&w->ready);
    pthread_mutex_destroy(&w->lock);
    free(w->threads);
    free(w->ring);
    free(w);
}
