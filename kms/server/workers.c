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
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "module/log.h"

/* A job shorter than this (on average) is a fast token's. */
#define WORKERS_SHORT_JOB_NS 200000u

typedef struct job {
    kms_work_fn fn;
    void *arg;
} job;

struct kms_workers {
    pthread_mutex_t lock;
    pthread_cond_t ready;
    job *ring;
    size_t cap, head, len, running;
    size_t idle;       /* threads waiting on `ready` */
    size_t signalled;  /* wake-ups sent and not yet taken */
    uint64_t job_ns;   /* moving average of a job's duration */
    uint64_t *started; /* per thread: when its job started, 0 when none */
    size_t n_started;  /* threads that took their slot */
    int stopping;
    pthread_t *threads;
    size_t n_threads;
};

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void *worker_main(void *arg)
{
    kms_workers *w = arg;
    job j;
    uint64_t start, took;
    size_t me;

    pthread_setname_np(pthread_self(), "kmsd-worker"); /* top -H, perf */
    pthread_mutex_lock(&w->lock);
    me = w->n_started++;
    for (;;) {
        while (w->len == 0 && !w->stopping) {
            w->idle++;
            pthread_cond_wait(&w->ready, &w->lock);
            w->idle--;
            if (w->signalled > 0)
                w->signalled--;
        }
        if (w->len == 0)
            break; /* stopping and drained */
        j = w->ring[w->head];
        w->head = (w->head + 1) % w->cap;
        w->len--;
        w->running++;
        start = now_ns();
        w->started[me] = start;
        pthread_mutex_unlock(&w->lock);
        j.fn(j.arg);
        took = now_ns() - start;
        pthread_mutex_lock(&w->lock);
        w->running--;
        w->started[me] = 0;
        w->job_ns = w->job_ns - w->job_ns / 16 + took / 16;
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

/* Whether a newly queued job should wake an idle thread (w->lock held).
 * Not when the wake-ups already sent cover the queue.  Not either while
 * jobs are short (a fast token) and enough threads are in the middle of a
 * job that started less than a short job's time ago: one of them takes
 * the new job within that time, and a thread that never sleeps costs no
 * wake-up and no context switch (most of kmsd's CPU at high request rates
 * went there).  Long jobs (a network HSM's milliseconds, a rewrap) wake a
 * thread for every job, so slow token calls still run side by side and a
 * long job never holds up the short ones behind it. */
static int should_wake(const kms_workers *w)
{
    size_t fresh = 0;
    uint64_t now;

    if (w->idle <= w->signalled || w->len <= w->signalled)
        return 0;
    if (w->job_ns >= WORKERS_SHORT_JOB_NS || w->running == 0)
        return 1;
    now = now_ns();
    for (size_t i = 0; i < w->n_started && fresh < w->len; i++)
        if (w->started[i] != 0 && now - w->started[i] < WORKERS_SHORT_JOB_NS)
            fresh++;
    return w->len > fresh;
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
    w->started = calloc(threads, sizeof(*w->started));
    if (w->ring == NULL || w->threads == NULL || w->started == NULL)
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
    int wake = 0;

    pthread_mutex_lock(&w->lock);
    if (w->stopping || w->len == w->cap)
        goto out;
    w->ring[(w->head + w->len) % w->cap] = (job){fn, arg};
    w->len++;
    wake = should_wake(w);
    if (wake)
        w->signalled++;
    rv = P11KMS_OK;
out:
    pthread_mutex_unlock(&w->lock);
    /* After unlocking: a woken thread does not run into the held lock. */
    if (wake)
        pthread_cond_signal(&w->ready);
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
    free(w->started);
    free(w->ring);
    free(w);
}
