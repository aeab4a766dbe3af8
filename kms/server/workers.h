/*
 * kms/server/workers.h - the bounded worker pool of kmsd.
 *
 * A fixed number of threads run jobs from one FIFO queue of bounded
 * length.  Submitting to a full queue fails at once with
 * P11KMS_ERR_OVERLOADED (the caller answers 503 with Retry-After): there
 * is never an unbounded backlog.  Jobs are what touches the token or the
 * store; each job hands its reply back to its event loop itself.
 */
#ifndef P11KMS_KMS_SERVER_WORKERS_H
#define P11KMS_KMS_SERVER_WORKERS_H

#include <stddef.h>

#include "p11kms/status.h"

typedef struct kms_workers kms_workers;
typedef void (*kms_work_fn)(void *arg);

/* Start `threads` workers with room for `queue_max` waiting jobs. */
p11kms_status kms_workers_new(size_t threads, size_t queue_max, kms_workers **out);

/* Queue fn(arg).  P11KMS_ERR_OVERLOADED when the queue is full or the pool
 * is stopping (fn is then not called and arg stays the caller's). */
p11kms_status kms_workers_submit(kms_workers *w, kms_work_fn fn, void *arg);

/* Jobs queued or running right now. */
size_t kms_workers_pending(kms_workers *w);

/* Run every queued job, then stop and join the threads.  NULL is a no-op. */
void kms_workers_free(kms_workers *w);

#endif
