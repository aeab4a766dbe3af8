/*
 * kms/store/groupcommit.c - the group-commit writer shared by the store
 * backends (interface in store_internal.h).
 *
 * Callers queue a kms_write (on their own stack) and sleep, or queue it
 * with a completion callback and go on (kms_gc_submit_async: kmsd's hot
 * path, so a worker thread does not sleep through every commit); one
 * writer thread takes everything queued (up to GC_MAX_GROUP), runs it
 * through the backend as one transaction (begin, apply each write under
 * its own savepoint, commit: one fsync for the group), then marks each
 * write done, wakes exactly the sleeping callers of that group (each
 * sleeps on its own condition variable: no thundering herd) and, with mu
 * released, runs the callbacks.  While a group commits, the next one
 * queues up, so the number of fsyncs per second, not per write, bounds
 * throughput.
 *
 * The audit log (issue 5): after every write of a group is applied, the
 * entries the writes carry are appended in the same transaction: the
 * backend takes its audit lock and reads the sealed head; each entry gets
 * the next seq, the time, prev_hash and hash = SHA-256(prev_hash ||
 * canonical entry); the last one gets the MAC of the group (one token
 * call, through the callback the core installed) and becomes the sealed
 * head.  If any of it fails the whole group is rolled back: no change
 * without its entry, no entry without its seal.  Its writes then fail
 * with P11KMS_ERR_STORE_UNAVAILABLE, or P11KMS_ERR_TOKEN_UNAVAILABLE when
 * the MAC could not be made (a token fault: the store is fine, and the
 * client, the log and the failing state below should say what is not).
 * An entry follows the sealed head even when rows were edited behind kmsd's back (the chain
 * continues; verification reports where it broke).  KMS_WRITE_AUDIT_KEY
 * (get or create the MAC key id) is run here too, under the same lock.
 *
 * When the backend cannot write (disk full, a read-only file, another
 * process holding the database lock past the busy timeout), a group fails
 * with a store error.  A backend that provides a probe (SQLite) then puts
 * the writer in the `failing` state: every write, queued or new, is
 * refused at once with P11KMS_ERR_STORE_UNAVAILABLE instead of waiting for
 * its own failure (so a stuck lock does not pin every worker thread for a
 * busy timeout per request), and the writer runs the backend's probe -- a
 * tiny durable write in its own transaction -- every GC_PROBE_INTERVAL_MS,
 * sooner when writes keep coming (GC_PROBE_NUDGE_MS after the last probe)
 * or at once when kms_gc_writable asks, until one commits.  Nothing is
 * written while failing except the probe, so recovery needs no restart and
 * leaves nothing half-done.  Backends without a probe (PostgreSQL) keep
 * trying every group.
 *
 * Locking: gc->mu guards the queue, `stopping`, `done` flags, the MAC
 * callback, the failing state and the statistics.  The writer never holds
 * mu while it talks to the database or runs a callback.  A synchronous write is not touched
 * by the writer after its `done` flag is set (the caller may return and
 * reuse its stack at once); an asynchronous one after its callback.
 */
#include "kms/store/store_internal.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "module/log.h"

#define GC_MAX_GROUP         1024
#define GC_PROBE_INTERVAL_MS 250 /* between probes while writes fail */
#define GC_PROBE_NUDGE_MS    50  /* a refused write asks for a probe after this */
#define GC_REMINDER_S        60  /* "still failing" log line */

struct kms_gc {
    const kms_gc_ops *ops;
    void *ctx;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work_cv;  /* the writer waits here for work */
    pthread_cond_t probe_cv; /* kms_gc_writable waits here for a probe */
    kms_write *head;
    kms_write *tail;
    size_t queued;
    int stopping;
    uint64_t commits;
    uint64_t writes;
    uint64_t failed_groups;
    kms_audit_mac_fn mac_fn; /* [mu] */
    void *mac_arg;           /* [mu] */
    /* The failing state (backends with ops->probe), all [mu]. */
    int failing;
    int probe_now;          /* kms_gc_writable asked for a probe */
    uint64_t probe_gen;     /* probes finished */
    uint64_t probes_failed; /* in this failing episode */
    uint64_t refused;       /* writes refused while failing (total) */
    struct timespec failing_since, next_probe, last_reminder, last_probe;
};

static void now_plus(struct timespec *t, long ms)
{
    clock_gettime(CLOCK_MONOTONIC, t);
    t->tv_sec += ms / 1000;
    t->tv_nsec += (ms % 1000) * 1000000L;
    if (t->tv_nsec >= 1000000000L) {
        t->tv_sec++;
        t->tv_nsec -= 1000000000L;
    }
}

static int reached(const struct timespec *t)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec > t->tv_sec || (now.tv_sec == t->tv_sec && now.tv_nsec >= t->tv_nsec);
}

static double seconds_since(const struct timespec *t)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (double)(now.tv_sec - t->tv_sec) + (double)(now.tv_nsec - t->tv_nsec) / 1e9;
}

/* Every write of a rolled-back group fails with why: the store, or the
 * token when the group's audit MAC could not be made. */
static void fail_all(kms_write *batch, size_t n, p11kms_status why)
{
    kms_write *w = batch;

    for (size_t i = 0; i < n; i++, w = w->next)
        w->result = why;
}

/* Nothing happened, so there is nothing to record: a capped insert that
 * the cap refused, a rotation that lost its compare-and-set (the caller
 * tries again and attaches its entries to that write). */
static int entries_skipped(const kms_write *w)
{
    if (w->result != P11KMS_OK)
        return 0;
    return (w->type == KMS_WRITE_DEK_INSERT && w->u.dek_insert.refused) ||
           (w->type == KMS_WRITE_VERSION_ADD && w->u.version_add.added == 0);
}

static void entry_result_from(kms_audit_entry *e, p11kms_status result)
{
    if (!e->result_from_write)
        return;
    e->result = result == P11KMS_OK ? KMS_AUDIT_OK : KMS_AUDIT_ERROR;
    snprintf(e->error_code, sizeof(e->error_code), "%s",
             result == P11KMS_OK ? "" : p11kms_status_code(result));
}

/* Append and seal the group's entries (inside its transaction).
 * P11KMS_ERR_TOKEN_UNAVAILABLE when the MAC could not be computed (not a
 * store fault), P11KMS_ERR_STORE_UNAVAILABLE when the store failed. */
static p11kms_status append_audit(kms_gc *gc, kms_write *batch, kms_audit_mac_fn mac_fn,
                                  void *mac_arg)
{
    p11kms_status rv = P11KMS_OK, mrv;
    kms_audit_head head;
    kms_audit_entry *last = NULL;
    unsigned char start[KMS_AUDIT_HASH_LEN], prev[KMS_AUDIT_HASH_LEN];
    unsigned char last_hash[KMS_AUDIT_HASH_LEN];
    uint64_t seq, last_seq = 0;
    int64_t now = (int64_t)time(NULL);
    int any = 0;

    for (kms_write *w = batch; w != NULL && !any; w = w->next)
        any = w->n_audit > 0 && !entries_skipped(w);
    if (!any)
        goto out;
    rv = P11KMS_ERR_TOKEN_UNAVAILABLE;
    if (mac_fn == NULL || gc->ops->audit_head == NULL) {
        LOG_ERROR("store", "audit entries cannot be sealed: no audit MAC key is attached");
        goto out;
    }
    rv = P11KMS_ERR_STORE_UNAVAILABLE;
    memset(&head, 0, sizeof(head));
    memset(last_hash, 0, sizeof(last_hash));
    if (gc->ops->audit_head(gc->ctx, &head, &last_seq, last_hash) != P11KMS_OK)
        goto out;
    /* The sealed head is authoritative; the last row only when there is no
     * head (a fresh log, or the head row was deleted). */
    if (head.present && last_seq != head.seq)
        LOG_ERROR("store",
                  "AUDIT LOG TAMPERED: the last entry is %llu but the sealed head is %llu; "
                  "new entries continue from the sealed head (kmsctl audit verify)",
                  (unsigned long long)last_seq, (unsigned long long)head.seq);
    else if (!head.present && last_seq > 0)
        LOG_ERROR("store", "AUDIT LOG TAMPERED: entries exist but the sealed head is missing");
    memcpy(prev, head.present ? head.hash : last_hash, sizeof(prev));
    seq = head.present && head.seq > last_seq ? head.seq : last_seq;
    memcpy(start, prev, sizeof(start));
    for (kms_write *w = batch; w != NULL; w = w->next) {
        if (entries_skipped(w))
            continue;
        for (size_t i = 0; i < w->n_audit; i++) {
            kms_audit_entry *e = &w->audit[i];

            entry_result_from(e, w->result);
            e->seq = ++seq;
            if (e->time == 0)
                e->time = now;
            e->has_mac = 0;
            memcpy(e->prev_hash, prev, sizeof(prev));
            kms_audit_hash(prev, e, e->hash);
            memcpy(prev, e->hash, sizeof(prev));
            if (gc->ops->audit_insert(gc->ctx, e) != P11KMS_OK)
                goto out;
            last = e;
        }
    }
    mrv = mac_fn(mac_arg, start, last->hash, last->mac);
    if (mrv != P11KMS_OK) {
        LOG_ERROR("store", "the audit MAC of a commit group failed: the group is rolled back");
        rv = P11KMS_ERR_TOKEN_UNAVAILABLE;
        goto out;
    }
    last->has_mac = 1;
    if (gc->ops->audit_seal(gc->ctx, last) != P11KMS_OK)
        goto out;
    rv = P11KMS_OK;
out:
    return rv;
}

/* KMS_WRITE_AUDIT_KEY: read the recorded MAC key id under the audit lock,
 * or create the key and record it. */
static p11kms_status run_audit_key(kms_gc *gc, kms_write *w)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    int found = 0;

    if (gc->ops->audit_key_get == NULL || gc->ops->audit_key_put == NULL)
        goto out;
    if (gc->ops->audit_key_get(gc->ctx, w->u.audit_key.id, &found) != P11KMS_OK)
        goto out;
    rv = P11KMS_OK;
    if (found)
        goto out;
    rv = w->u.audit_key.create(w->u.audit_key.arg, w->u.audit_key.id);
    if (rv != P11KMS_OK)
        goto out;
    rv = gc->ops->audit_key_put(gc->ctx, w->u.audit_key.id);
    if (rv == P11KMS_OK)
        w->u.audit_key.created = 1;
    else
        rv = P11KMS_ERR_STORE_UNAVAILABLE;
out:
    return rv;
}

/* How a group ended. */
enum group_end { GROUP_COMMITTED, GROUP_FAILED, GROUP_STORE_FAILED };

/* Run one group.  GROUP_STORE_FAILED when the store itself failed (begin,
 * a write's transaction, the audit rows, commit), GROUP_FAILED when the
 * audit MAC did.  Called without gc->mu. */
static enum group_end run_group(kms_gc *gc, kms_write *batch, size_t n, kms_audit_mac_fn mac_fn,
                                void *mac_arg)
{
    kms_write *w = batch;
    enum group_end end = GROUP_STORE_FAILED;
    p11kms_status rv;

    if (gc->ops->begin(gc->ctx) != P11KMS_OK) {
        fail_all(batch, n, P11KMS_ERR_STORE_UNAVAILABLE);
        goto out;
    }
    for (size_t i = 0; i < n; i++, w = w->next) {
        if (w->type == KMS_WRITE_AUDIT_KEY)
            w->result = run_audit_key(gc, w);
        else
            w->result = gc->ops->apply(gc->ctx, w);
        if (w->result == P11KMS_ERR_STORE_UNAVAILABLE) {
            LOG_ERROR("store", "write %zu of a group of %zu failed: rolling the group back", i + 1,
                      n);
            gc->ops->rollback(gc->ctx);
            fail_all(batch, n, P11KMS_ERR_STORE_UNAVAILABLE);
            goto out;
        }
    }
    rv = append_audit(gc, batch, mac_fn, mac_arg);
    if (rv != P11KMS_OK) {
        gc->ops->rollback(gc->ctx);
        fail_all(batch, n, rv);
        if (rv != P11KMS_ERR_STORE_UNAVAILABLE)
            end = GROUP_FAILED;
        goto out;
    }
    if (gc->ops->commit(gc->ctx) != P11KMS_OK) {
        gc->ops->rollback(gc->ctx);
        fail_all(batch, n, P11KMS_ERR_STORE_UNAVAILABLE);
        goto out;
    }
    end = GROUP_COMMITTED;
out:
    return end;
}

/* Tell the writes of batch (a group, or writes refused while failing)
 * that they are done: wake the synchronous callers, then run the
 * asynchronous ones' callbacks in order, without mu.  Called and returns
 * with mu held; committed: batch's audit entries are in the log. */
static void tell(kms_gc *gc, kms_write *batch, int committed)
{
    kms_write *w, *next, *async = NULL, *async_tail = NULL;

    for (w = batch; w != NULL; w = next) {
        next = w->next;
        for (size_t i = 0; committed && i < w->n_audit; i++)
            w->audit[i].committed = !entries_skipped(w);
        if (w->on_done != NULL) { /* told below, in order, without mu */
            w->next = NULL;
            if (async_tail != NULL)
                async_tail->next = w;
            else
                async = w;
            async_tail = w;
            continue;
        }
        w->done = 1; /* w may be gone once mu is released */
        pthread_cond_signal(w->wake);
    }
    if (async != NULL) {
        pthread_mutex_unlock(&gc->mu);
        for (w = async; w != NULL; w = next) {
            next = w->next; /* w may be gone once told */
            w->on_done(w->on_done_arg);
        }
        pthread_mutex_lock(&gc->mu);
    }
}

/* Refuse every queued write (the store is failing).  Under mu. */
static void refuse_queued(kms_gc *gc)
{
    kms_write *batch = gc->head;

    for (kms_write *w = batch; w != NULL; w = w->next) {
        w->result = P11KMS_ERR_STORE_UNAVAILABLE;
        gc->refused++;
    }
    gc->head = gc->tail = NULL;
    gc->queued = 0;
    tell(gc, batch, 0);
}

/* Enter the failing state after a group failed in the store.  Under mu. */
static void start_failing(kms_gc *gc)
{
    if (gc->ops->probe == NULL || gc->failing)
        return;
    gc->failing = 1;
    gc->probes_failed = 0;
    clock_gettime(CLOCK_MONOTONIC, &gc->failing_since);
    gc->last_reminder = gc->last_probe = gc->failing_since;
    now_plus(&gc->next_probe, GC_PROBE_INTERVAL_MS);
    LOG_ERROR("store",
              "the store cannot be written (see above): writes are refused with "
              "store_unavailable until a probe write commits (every %d ms)",
              GC_PROBE_INTERVAL_MS);
}

/* Run one probe while failing.  Called and returns with mu held. */
static void run_probe(kms_gc *gc)
{
    char why[256] = "";
    p11kms_status rv;

    gc->probe_now = 0;
    pthread_mutex_unlock(&gc->mu);
    rv = gc->ops->probe(gc->ctx, why, sizeof(why));
    pthread_mutex_lock(&gc->mu);
    gc->probe_gen++;
    clock_gettime(CLOCK_MONOTONIC, &gc->last_probe);
    if (rv == P11KMS_OK) {
        gc->failing = 0;
        LOG_INFO("store", "the store can be written again after %.1f s (%llu failed probes)",
                 seconds_since(&gc->failing_since), (unsigned long long)gc->probes_failed);
    } else {
        gc->probes_failed++;
        now_plus(&gc->next_probe, GC_PROBE_INTERVAL_MS);
        if (gc->probes_failed == 1 || seconds_since(&gc->last_reminder) >= GC_REMINDER_S) {
            clock_gettime(CLOCK_MONOTONIC, &gc->last_reminder);
            LOG_ERROR("store", "the store still cannot be written after %.0f s (%llu probes): %s",
                      seconds_since(&gc->failing_since), (unsigned long long)gc->probes_failed,
                      why);
        } else {
            LOG_DEBUG("store", "probe failed: %s", why);
        }
    }
    pthread_cond_broadcast(&gc->probe_cv); /* kms_gc_writable waits there */
}

/* Wait for something to do.  Under mu. */
static void wait_for_work(kms_gc *gc)
{
    while (gc->head == NULL && !gc->stopping &&
           !(gc->failing && (gc->probe_now || reached(&gc->next_probe)))) {
        if (gc->failing)
            pthread_cond_timedwait(&gc->work_cv, &gc->mu, &gc->next_probe);
        else
            pthread_cond_wait(&gc->work_cv, &gc->mu);
    }
}

static void *writer_main(void *arg)
{
    kms_gc *gc = arg;

    pthread_setname_np(pthread_self(), "kms-writer"); /* top -H, perf */
    pthread_mutex_lock(&gc->mu);
    for (;;) {
        kms_write *batch, *last;
        kms_audit_mac_fn mac_fn;
        void *mac_arg;
        size_t n = 1;
        enum group_end end;

        wait_for_work(gc);
        if (gc->head == NULL && gc->stopping)
            break; /* the queue is drained */
        if (gc->failing) {
            if (gc->head != NULL)
                refuse_queued(gc); /* queued before the group that failed ended */
            else
                run_probe(gc);
            continue;
        }

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
        mac_fn = gc->mac_fn;
        mac_arg = gc->mac_arg;
        pthread_mutex_unlock(&gc->mu);

        end = run_group(gc, batch, n, mac_fn, mac_arg);

        pthread_mutex_lock(&gc->mu);
        if (end == GROUP_COMMITTED) {
            gc->commits++;
            gc->writes += n;
        } else {
            gc->failed_groups++;
            if (end == GROUP_STORE_FAILED)
                start_failing(gc);
        }
        tell(gc, batch, end == GROUP_COMMITTED);
    }
    pthread_mutex_unlock(&gc->mu);
    return NULL;
}

/* A condition variable on CLOCK_MONOTONIC (timed waits). */
static int cond_init_monotonic(pthread_cond_t *cv)
{
    pthread_condattr_t attr;
    int rc;

    if (pthread_condattr_init(&attr) != 0)
        return -1;
    rc = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC) == 0 && pthread_cond_init(cv, &attr) == 0
             ? 0
             : -1;
    pthread_condattr_destroy(&attr);
    return rc;
}

p11kms_status kms_gc_start(const kms_gc_ops *ops, void *ctx, kms_gc **out)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    kms_gc *gc = NULL;
    int mu_ok = 0, work_ok = 0, probe_ok = 0, err;

    gc = calloc(1, sizeof(*gc));
    if (gc == NULL)
        goto out;
    gc->ops = ops;
    gc->ctx = ctx;
    rv = P11KMS_ERR_INTERNAL;
    if (pthread_mutex_init(&gc->mu, NULL) != 0)
        goto out;
    mu_ok = 1;
    if (cond_init_monotonic(&gc->work_cv) != 0)
        goto out;
    work_ok = 1;
    if (cond_init_monotonic(&gc->probe_cv) != 0)
        goto out;
    probe_ok = 1;
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
        if (probe_ok)
            pthread_cond_destroy(&gc->probe_cv);
        if (work_ok)
            pthread_cond_destroy(&gc->work_cv);
        if (mu_ok)
            pthread_mutex_destroy(&gc->mu);
        free(gc);
    }
    return rv;
}

/* Append w to the queue (mu held); 0 when the writer is stopping or
 * failing (w is refused). */
static int enqueue(kms_gc *gc, kms_write *w)
{
    if (gc->stopping) {
        LOG_ERROR("store", "write refused: the store is closing");
        return 0;
    }
    if (gc->failing) { /* refused at once: see the top of this file */
        gc->refused++;
        /* Traffic shortens the wait for the next probe (not below
         * GC_PROBE_NUDGE_MS: each probe is a commit). */
        if (!gc->probe_now && seconds_since(&gc->last_probe) * 1000.0 >= GC_PROBE_NUDGE_MS) {
            gc->probe_now = 1;
            pthread_cond_signal(&gc->work_cv);
        }
        return 0;
    }
    w->done = 0;
    w->next = NULL;
    w->result = P11KMS_ERR_STORE_UNAVAILABLE;
    if (gc->tail != NULL)
        gc->tail->next = w;
    else
        gc->head = w;
    gc->tail = w;
    gc->queued++;
    pthread_cond_signal(&gc->work_cv);
    return 1;
}

p11kms_status kms_gc_submit(kms_gc *gc, kms_write *w)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    pthread_cond_t wake;

    if (pthread_cond_init(&wake, NULL) != 0)
        return rv;
    w->wake = &wake;
    w->on_done = NULL;
    pthread_mutex_lock(&gc->mu);
    if (!enqueue(gc, w))
        goto out;
    while (!w->done)
        pthread_cond_wait(&wake, &gc->mu);
    rv = w->result;
out:
    pthread_mutex_unlock(&gc->mu);
    pthread_cond_destroy(&wake);
    return rv;
}

p11kms_status kms_gc_submit_async(kms_gc *gc, kms_write *w, void (*on_done)(void *arg),
                                  void *arg)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;

    if (on_done == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    w->wake = NULL;
    w->on_done = on_done;
    w->on_done_arg = arg;
    pthread_mutex_lock(&gc->mu);
    if (enqueue(gc, w))
        rv = P11KMS_OK;
    pthread_mutex_unlock(&gc->mu);
    return rv;
}

p11kms_status kms_gc_writable(kms_gc *gc, int wait_ms)
{
    struct timespec deadline;
    uint64_t gen;
    int rc = 0;

    pthread_mutex_lock(&gc->mu);
    if (gc->failing) {
        gen = gc->probe_gen;
        gc->probe_now = 1;
        pthread_cond_signal(&gc->work_cv);
        now_plus(&deadline, wait_ms);
        while (gc->failing && gc->probe_gen == gen && rc != ETIMEDOUT)
            rc = pthread_cond_timedwait(&gc->probe_cv, &gc->mu, &deadline);
    }
    rc = gc->failing;
    pthread_mutex_unlock(&gc->mu);
    return rc ? P11KMS_ERR_STORE_UNAVAILABLE : P11KMS_OK;
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
    pthread_cond_destroy(&gc->probe_cv);
    pthread_cond_destroy(&gc->work_cv);
    pthread_mutex_destroy(&gc->mu);
    free(gc);
}

void kms_gc_audit_attach(kms_gc *gc, kms_audit_mac_fn fn, void *arg)
{
    if (gc == NULL)
        return;
    pthread_mutex_lock(&gc->mu);
    gc->mac_fn = fn;
    gc->mac_arg = arg;
    pthread_mutex_unlock(&gc->mu);
}

void kms_gc_stats(kms_gc *gc, kms_store_stats_ex *out)
{
    pthread_mutex_lock(&gc->mu);
    out->commits = gc->commits;
    out->writes = gc->writes;
    out->failed_groups = gc->failed_groups;
    out->queued = gc->queued;
    out->failing = (uint64_t)gc->failing;
    out->refused_writes = gc->refused;
    pthread_mutex_unlock(&gc->mu);
}
