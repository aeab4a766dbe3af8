/*
 * kms/core/rewrap.c - stored rewrap: move a key's DEKs from older versions
 * onto its latest version without any plaintext leaving the process
 * (core.h, kms_key_rewrap).
 *
 * One batch = one store read (kms_store_rewrap_read: the next DEKs in id
 * order after a cursor, with their wrapped bytes and contexts), the token
 * work (per DEK: C_Decrypt under its own version with its own AAD, then
 * C_GenerateRandom for the IV and C_Encrypt under the target version with
 * the new AAD; the plaintext lives in a 32-byte buffer on the worker's
 * stack and is wiped right after the wrap), spread over a few threads
 * because a token answers many sessions at once, and one store write
 * (kms_store_rewrap_commit) that moves each DEK only if it is unchanged
 * since the read.  That commit runs on its own thread while the next
 * batch's token work goes on (one commit in flight at a time), so the
 * fsync overlaps the token.  Batches commit through the group-commit
 * writer like every other write, so a long rewrap never blocks datakey
 * requests.
 *
 * Crash safety: a DEK row is either still on its old version with its old
 * bytes or on the new version with the new bytes (one row update inside
 * one transaction); both decrypt while the old version is active (retire
 * refuses a version any live DEK refers to).  kill -9 at any moment loses
 * nothing and a second call finishes the job.
 *
 * Termination: the cursor only moves forward, so one call is one walk
 * over the key's DEKs however many are issued or rotated meanwhile; a DEK
 * that fails to unwrap is logged, counted and skipped by that walk.
 *
 * The wrap budget: before a batch, when the target version has no room
 * left under max_wraps_per_version, the key is rotated first (compare-and-
 * set) and the batch goes to the new latest version.
 *
 * No state and no locks of its own: threads of one batch share read-only
 * inputs and write disjoint slots of the output arrays; the committer
 * owns the other of two item buffers until it is joined.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "kms/core/core.h"
#include "kms/core/internal.h"
#include "module/log.h"

#define REWRAP_MIN_PER_THREAD 16 /* fewer DEKs than this per thread: fewer threads */

/* What happened to one DEK of a batch. */
enum { ITEM_OK = 0, ITEM_SKIPPED, ITEM_FATAL };

typedef struct batch {
    kms_core *core;
    const char *key;
    const kms_key_rec *k;
    const kms_version_rec *target;
    kms_dek_rec **deks;
    kms_rewrap_item *items; /* n slots */
    int *result;            /* n slots: ITEM_* */
    p11kms_status *status;  /* n slots: why, for ITEM_FATAL */
    size_t n;
} batch;

typedef struct slice {
    batch *b;
    size_t from, to;
} slice;

/* Unwrap one DEK under its version and wrap it under the target. */
static int rewrap_one(const batch *b, size_t i, p11kms_status *why)
{
    const kms_dek_rec *d = b->deks[i];
    kms_rewrap_item *it = &b->items[i];
    const kms_version_rec *old = kms_key_find_version(b->k, d->version);
    unsigned char *aad_old = NULL, *aad_new = NULL;
    unsigned char pt[KMS_DEK_LEN];
    size_t aad_old_len = 0, aad_new_len = 0, pt_len = sizeof(pt);
    int result = ITEM_SKIPPED;
    p11kms_status rv;
    CK_RV crv;

    *why = P11KMS_OK;
    if (old == NULL || old->state != KMS_VERSION_ACTIVE || d->wrapped_len == 0 ||
        d->context == NULL) {
        LOG_ERROR("core",
                  "rewrap: data key %s refers to key %s version %u, which cannot "
                  "unwrap it: skipped",
                  d->id, b->key, d->version);
        goto out;
    }
    rv = kms_aad_build(b->key, d->version, d->id, d->context, &aad_old, &aad_old_len);
    if (rv == P11KMS_OK)
        rv = kms_aad_build(b->key, b->target->version, d->id, d->context, &aad_new, &aad_new_len);
    if (rv != P11KMS_OK) {
        *why = rv;
        result = ITEM_FATAL;
        goto out;
    }
    crv = p11_unwrap(kms_core_token(b->core), old->token_id, aad_old, aad_old_len, d->wrapped,
                     d->wrapped_len, pt, &pt_len);
    if (crv == CKR_OK && pt_len != KMS_DEK_LEN)
        crv = CKR_ENCRYPTED_DATA_INVALID;
    if (crv != CKR_OK) {
        rv = kms_status_from_rv(crv);
        if (rv == P11KMS_ERR_INTEGRITY_FAILURE) {
            LOG_ERROR("core",
                      "INTEGRITY FAILURE: rewrap: the stored wrapped bytes of data key "
                      "%s (key %s version %u) fail authentication: skipped, left as "
                      "they are",
                      d->id, b->key, d->version);
            goto out;
        }
        *why = rv;
        result = ITEM_FATAL;
        goto out;
    }
    it->wrapped_len = sizeof(it->wrapped);
    crv = p11_wrap(kms_core_token(b->core), b->target->token_id, aad_new, aad_new_len, pt,
                   KMS_DEK_LEN, it->wrapped, &it->wrapped_len);
    OPENSSL_cleanse(pt, sizeof(pt)); /* the plaintext is gone from here on */
    if (crv != CKR_OK) {
        rv = kms_status_from_rv(crv);
        *why = rv == P11KMS_ERR_INTEGRITY_FAILURE ? P11KMS_ERR_INTERNAL : rv;
        result = ITEM_FATAL;
        goto out;
    }
    memcpy(it->id, d->id, sizeof(it->id));
    it->old_version = d->version;
    result = ITEM_OK;
out:
    OPENSSL_cleanse(pt, sizeof(pt));
    free(aad_old);
    free(aad_new);
    return result;
}

static void *slice_main(void *arg)
{
    slice *s = arg;

    for (size_t i = s->from; i < s->to; i++) {
        s->b->result[i] = rewrap_one(s->b, i, &s->b->status[i]);
        if (s->b->result[i] == ITEM_FATAL)
            break; /* the token is gone: no point going on */
    }
    return NULL;
}

/* Run the token work of a batch on up to `threads` threads (this one
 * included). */
static void run_batch(batch *b, unsigned threads)
{
    pthread_t tids[32];
    slice slices[32];
    size_t per, t, started = 0;

    if (threads > 32)
        threads = 32;
    t = b->n / REWRAP_MIN_PER_THREAD;
    if (t < 1)
        t = 1;
    if (t > threads)
        t = threads;
    per = (b->n + t - 1) / t;
    for (size_t i = 0; i < t; i++) {
        slices[i].b = b;
        slices[i].from = i * per;
        slices[i].to = (i + 1) * per < b->n ? (i + 1) * per : b->n;
    }
    for (size_t i = 1; i < t; i++) {
        if (pthread_create(&tids[i], NULL, slice_main, &slices[i]) != 0)
            break;
        started = i;
    }
    slice_main(&slices[0]);
    /* Slices whose thread could not start run here. */
    for (size_t i = started + 1; i < t; i++)
        slice_main(&slices[i]);
    for (size_t i = 1; i <= started; i++)
        pthread_join(tids[i], NULL);
}

/* Compact the successful items to the front; count skips; find a fatal
 * status. */
static size_t collect(batch *b, uint64_t *skipped, p11kms_status *fatal)
{
    size_t kept = 0;

    *fatal = P11KMS_OK;
    for (size_t i = 0; i < b->n; i++) {
        if (b->result[i] == ITEM_OK) {
            if (kept != i)
                b->items[kept] = b->items[i];
            kept++;
        } else if (b->result[i] == ITEM_SKIPPED) {
            (*skipped)++;
        } else if (*fatal == P11KMS_OK) {
            *fatal = b->status[i];
        }
    }
    return kept;
}

/* The commit of one batch, run on its own thread while the next batch's
 * token work goes on (the store write and its fsync overlap the token). */
typedef struct committer {
    kms_core *core;
    const char *key;
    uint32_t version;
    kms_rewrap_item *items;
    size_t n;
    uint64_t moved;
    p11kms_status rv;
    pthread_t thread;
    int running;
    kms_audit_entry entry;    /* this batch's "key.rewrap" entry (from tmpl) */
    const kms_audit_entry *tmpl; /* built on the request's thread (its actor) */
    uint64_t audited;         /* batches whose entry committed */
} committer;

static void *commit_main(void *arg)
{
    committer *c = arg;

    c->rv = kms_store_rewrap_commit_audited(kms_core_store(c->core), c->key, c->version, c->items,
                                            c->n, &c->moved, &c->entry, 1);
    return NULL;
}

/* Start committing items[0..n) onto version (on a thread, or here when no
 * thread can be started). */
static void commit_start(committer *c, uint32_t version, kms_rewrap_item *items, size_t n)
{
    c->version = version;
    c->items = items;
    c->n = n;
    c->moved = 0;
    c->rv = P11KMS_OK;
    c->entry = *c->tmpl;
    c->entry.version = version;
    c->running = pthread_create(&c->thread, NULL, commit_main, c) == 0;
    if (!c->running) {
        commit_main(c);
        c->running = -1; /* done, not joinable */
    }
}

/* Wait for the commit in flight (if any), wipe its items, add its count. */
static p11kms_status commit_finish(committer *c, uint64_t *total)
{
    const kms_core_test_hooks *hooks = kms_core_hooks(c->core);

    if (c->running == 0)
        return P11KMS_OK;
    if (c->running > 0)
        pthread_join(c->thread, NULL);
    c->running = 0;
    OPENSSL_cleanse(c->items, KMS_REWRAP_BATCH * sizeof(*c->items));
    if (c->entry.committed)
        c->audited++;
    if (c->rv != P11KMS_OK)
        return c->rv;
    *total += c->moved;
    if (hooks->rewrap_batch_committed != NULL)
        hooks->rewrap_batch_committed(hooks->arg, c->key, *total);
    return P11KMS_OK;
}

p11kms_status kms_key_rewrap(kms_core *core, const char *name, uint64_t max, uint64_t *rewrapped,
                             uint64_t *remaining, uint64_t *failed)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST, fatal, done;
    kms_key_rec *k = NULL;
    kms_dek_rec **deks = NULL;
    kms_rewrap_item *items[2] = {NULL, NULL};
    int *result = NULL, cur = 0;
    p11kms_status *status = NULL;
    char cursor[KMS_DEK_ID_LEN + 1] = "";
    uint64_t total = 0, read_total = 0, skipped = 0, left = 0;
    size_t n = 0, kept;
    uint32_t rotated;
    committer c;
    batch b;
    kms_audit_entry ae;

    memset(&c, 0, sizeof(c));
    if (core == NULL)
        return rv;
    kms_audit_entry_init(&ae, "key.rewrap", kms_key_name_valid(name) ? name : NULL, 0, NULL);
    c.tmpl = &ae;
    if (!kms_key_name_valid(name) || rewrapped == NULL || remaining == NULL)
        goto out;
    c.core = core;
    c.key = name;
    rv = P11KMS_ERR_NO_MEMORY;
    items[0] = calloc(KMS_REWRAP_BATCH, sizeof(*items[0]));
    items[1] = calloc(KMS_REWRAP_BATCH, sizeof(*items[1]));
    result = calloc(KMS_REWRAP_BATCH, sizeof(*result));
    status = calloc(KMS_REWRAP_BATCH, sizeof(*status));
    if (items[0] == NULL || items[1] == NULL || result == NULL || status == NULL)
        goto out;
    for (;;) {
        const kms_version_rec *target;
        uint64_t want = KMS_REWRAP_BATCH, room;

        /* DEKs read so far (committed or in flight) count against max. */
        if (max != 0 && max - read_total < want)
            want = max - read_total;
        if (want == 0)
            break;
        kms_key_rec_free(k);
        k = NULL;
        rv = kms_store_key_get_meta(kms_core_store(core), name, &k);
        if (rv != P11KMS_OK)
            goto out;
        target = kms_key_find_version(k, k->latest_version);
        if (target == NULL || target->state != KMS_VERSION_ACTIVE) {
            LOG_ERROR("core", "key %s has no active latest version %u", name, k->latest_version);
            rv = P11KMS_ERR_INTERNAL;
            goto out;
        }
        /* The wrap budget (the commit in flight is not counted yet). */
        room = target->wrap_count + (c.running ? c.n : 0) < kms_core_max_wraps(core)
                   ? kms_core_max_wraps(core) - target->wrap_count - (c.running ? c.n : 0)
                   : 0;
        if (room == 0) {
            rv = commit_finish(&c, &total);
            if (rv != P11KMS_OK)
                goto out;
            /* The target's wrap budget is spent: rotate, then go on. */
            rv = kms_key_rotate_from(core, name, target->version, &rotated, NULL);
            if (rv != P11KMS_OK)
                goto out;
            continue;
        }
        if (room < want)
            want = room;
        rv = kms_store_rewrap_read(kms_core_store(core), name, target->version, cursor,
                                   (size_t)want, &deks, &n);
        if (rv != P11KMS_OK)
            goto out;
        if (n == 0)
            break;
        read_total += n;
        memcpy(cursor, deks[n - 1]->id, sizeof(cursor));
        memset(&b, 0, sizeof(b));
        b.core = core;
        b.key = name;
        b.k = k;
        b.target = target;
        b.deks = deks;
        b.items = items[cur];
        b.result = result;
        b.status = status;
        b.n = n;
        for (size_t i = 0; i < n; i++)
            result[i] = ITEM_SKIPPED; /* a slice stopped by a fatal error leaves these */
        run_batch(&b, kms_core_rewrap_threads(core));
        kept = collect(&b, &skipped, &fatal);
        kms_dek_list_free(deks, n);
        deks = NULL;
        n = 0;
        /* One commit in flight at a time; even after a token failure the
         * DEKs done so far are committed. */
        rv = commit_finish(&c, &total);
        if (rv != P11KMS_OK)
            goto out;
        commit_start(&c, target->version, items[cur], kept);
        cur ^= 1;
        if (fatal != P11KMS_OK) {
            rv = commit_finish(&c, &total);
            if (rv == P11KMS_OK)
                rv = fatal;
            goto out;
        }
    }
    rv = commit_finish(&c, &total);
    if (rv != P11KMS_OK)
        goto out;
    kms_key_rec_free(k);
    k = NULL;
    rv = kms_store_key_get_meta(kms_core_store(core), name, &k);
    if (rv != P11KMS_OK)
        goto out;
    rv = kms_store_rewrap_remaining(kms_core_store(core), name, k->latest_version, &left);
    if (rv != P11KMS_OK)
        goto out;
    LOG_INFO("core", "rewrap of key %s: %llu data keys moved to version %u, %llu remaining%s", name,
             (unsigned long long)total, k->latest_version, (unsigned long long)left,
             skipped ? " (some failed to unwrap: see above)" : "");
    *rewrapped = total;
    *remaining = left;
    if (failed != NULL)
        *failed = skipped;
out:
    done = commit_finish(&c, &total); /* never leave a commit thread behind */
    (void)done;
    /* One entry per committed batch; one more when nothing was committed
     * (nothing to rewrap) or the rewrap failed. */
    if (c.audited > 0 && rv == P11KMS_OK)
        ae.committed = 1;
    else if (k != NULL)
        ae.version = k->latest_version;
    rv = kms_audit_settle(core, &ae, rv);
    for (int i = 0; i < 2; i++) {
        if (items[i] != NULL)
            OPENSSL_cleanse(items[i], KMS_REWRAP_BATCH * sizeof(*items[i]));
        free(items[i]);
    }
    free(result);
    free(status);
    kms_dek_list_free(deks, n);
    kms_key_rec_free(k);
    return rv;
}
