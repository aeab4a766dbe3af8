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
 * The audit log (issue 5): after every write of a group is applied, the
 * entries the writes carry are appended in the same transaction: the
 * backend takes its audit lock and reads the sealed head; each entry gets
 * the next seq, the time, prev_hash and hash = SHA-256(prev_hash ||
 * canonical entry); the last one gets the MAC of the group (one token
 * call, through the callback the core installed) and becomes the sealed
 * head.  If any of it fails the whole group is rolled back: no change
 * without its entry, no entry without its seal.  Its writes then fail
 * with P11KMS_ERR_STORE_UNAVAILABLE, or P11KMS_ERR_TOKEN_UNAVAILABLE when
 * the MAC could not be made because the token is unavailable (the store
 * is fine; the client and the log should say what is not).  An entry follows the
 * sealed head even when rows were edited behind kmsd's back (the chain
 * continues; verification reports where it broke).  KMS_WRITE_AUDIT_KEY
 * (get or create the MAC key id) is run here too, under the same lock.
 *
 * Locking: gc->mu guards the queue, `stopping`, `done` flags, the MAC
 * callback and the statistics.  The writer never holds mu while it talks to the database.
 * A write struct is not touched by the writer after its `done` flag is
 * set (the caller may return and reuse its stack at once).
 */
#include "kms/store/store_internal.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
    kms_audit_mac_fn mac_fn; /* [mu] */
    void *mac_arg;           /* [mu] */
};

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

/* Append and seal the group's entries (inside its transaction).  Fails
 * with P11KMS_ERR_TOKEN_UNAVAILABLE when the MAC callback says the token
 * is unavailable, else with P11KMS_ERR_STORE_UNAVAILABLE. */
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
    rv = P11KMS_ERR_STORE_UNAVAILABLE;
    if (mac_fn == NULL || gc->ops->audit_head == NULL) {
        LOG_ERROR("store", "audit entries cannot be sealed: no audit MAC key is attached");
        goto out;
    }
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
        if (mrv == P11KMS_ERR_TOKEN_UNAVAILABLE)
            rv = mrv;
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

/* Run one group; returns 1 if it committed.  Called without gc->mu. */
static int run_group(kms_gc *gc, kms_write *batch, size_t n, kms_audit_mac_fn mac_fn,
                     void *mac_arg)
{
    kms_write *w = batch;
    int committed = 0;
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
        goto out;
    }
    if (gc->ops->commit(gc->ctx) != P11KMS_OK) {
        gc->ops->rollback(gc->ctx);
        fail_all(batch, n, P11KMS_ERR_STORE_UNAVAILABLE);
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
        kms_audit_mac_fn mac_fn;
        void *mac_arg;
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
        mac_fn = gc->mac_fn;
        mac_arg = gc->mac_arg;
        pthread_mutex_unlock(&gc->mu);

        committed = run_group(gc, batch, n, mac_fn, mac_arg);

        pthread_mutex_lock(&gc->mu);
        if (committed) {
            gc->commits++;
            gc->writes += n;
        } else {
            gc->failed_groups++;
        }
        for (w = batch; w != NULL; w = next) {
            next = w->next;
            for (size_t i = 0; committed && i < w->n_audit; i++)
                w->audit[i].committed = !entries_skipped(w);
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
    pthread_mutex_unlock(&gc->mu);
}
