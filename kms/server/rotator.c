/*
 * kms/server/rotator.c - the automatic rotation thread of kmsd (see
 * rotator.h).
 *
 * One thread sleeps on a condition variable (CLOCK_MONOTONIC, so a clock
 * step does not stall or rush it) for the check interval, then asks the
 * core to rotate every key whose rotation period has passed.  The work is
 * a few store reads and, rarely, one C_GenerateKey plus one store write
 * per due key; it runs on this thread, beside the worker pool, and its
 * writes go through the group-commit writer like every other.  Several
 * nodes may run it at once: the store's compare-and-set on latest_version
 * lets exactly one of them rotate a key.
 *
 * Locking: mu guards `stopping`; cv wakes the thread early to stop.
 */
#include "kms/server/rotator.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "module/log.h"

struct kms_rotator {
    kms_core *core;
    int interval_s;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stopping;
};

static void *rotator_main(void *arg)
{
    kms_rotator *r = arg;
    struct timespec until;
    size_t rotated;
    p11kms_status st;

    pthread_mutex_lock(&r->mu);
    while (!r->stopping) {
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_sec += r->interval_s;
        while (!r->stopping && pthread_cond_timedwait(&r->cv, &r->mu, &until) != ETIMEDOUT)
            ;
        if (r->stopping)
            break;
        pthread_mutex_unlock(&r->mu);
        rotated = 0;
        kms_core_actor_set("kmsd:rotation"); /* the principal of its audit entries */
        st = kms_keys_rotate_due(r->core, (int64_t)time(NULL), &rotated);
        if (st != P11KMS_OK)
            LOG_WARN("rotation", "scheduled rotation check: %s (retried in %d s)",
                     p11kms_status_code(st), r->interval_s);
        else if (rotated > 0)
            LOG_INFO("rotation", "scheduled rotation check: %zu key(s) rotated", rotated);
        pthread_mutex_lock(&r->mu);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

p11kms_status kms_rotator_start(kms_core *core, int interval_s, kms_rotator **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_rotator *r = NULL;
    pthread_condattr_t ca;
    int mu_ok = 0, cv_ok = 0, err;

    if (core == NULL || interval_s < 1 || out == NULL)
        goto out;
    rv = P11KMS_ERR_NO_MEMORY;
    r = calloc(1, sizeof(*r));
    if (r == NULL)
        goto out;
    r->core = core;
    r->interval_s = interval_s;
    rv = P11KMS_ERR_INTERNAL;
    if (pthread_mutex_init(&r->mu, NULL) != 0)
        goto out;
    mu_ok = 1;
    if (pthread_condattr_init(&ca) != 0)
        goto out;
    if (pthread_condattr_setclock(&ca, CLOCK_MONOTONIC) != 0 ||
        pthread_cond_init(&r->cv, &ca) != 0) {
        pthread_condattr_destroy(&ca);
        goto out;
    }
    pthread_condattr_destroy(&ca);
    cv_ok = 1;
    err = pthread_create(&r->thread, NULL, rotator_main, r);
    if (err != 0) {
        LOG_ERROR("rotation", "cannot start the rotation thread: %s", strerror(err));
        goto out;
    }
    LOG_DEBUG("rotation", "rotation periods checked every %d s", interval_s);
    *out = r;
    r = NULL;
    rv = P11KMS_OK;
out:
    if (r != NULL) {
        if (cv_ok)
            pthread_cond_destroy(&r->cv);
        if (mu_ok)
            pthread_mutex_destroy(&r->mu);
        free(r);
    }
    return rv;
}

void kms_rotator_stop(kms_rotator *r)
{
    if (r == NULL)
        return;
    pthread_mutex_lock(&r->mu);
    r->stopping = 1;
    pthread_cond_signal(&r->cv);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->thread, NULL);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
    free(r);
}
