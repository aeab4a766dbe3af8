/*
 * kms/store/sqlite_ckpt.c - the SQLite backend's WAL checkpointer: one
 * thread with its own connection that copies the WAL back into the
 * database file, so that the group-commit writer never does.
 *
 * SQLite's automatic checkpoint runs inside the commit that crosses the
 * threshold, on the committing connection: that group's callers waited
 * for a 4 MB copy and an fsync of the database file on top of their own
 * commit (the tail of kmsd's latency).  The writer connection runs with
 * wal_autocheckpoint = 0 and a WAL hook that pokes this thread each time
 * the WAL has grown by SQ_CKPT_PAGES pages; the thread runs a PASSIVE
 * checkpoint (never waits for the writer or a reader; what it cannot copy
 * now is copied next time).
 *
 * Why "grown by" and not "holds": under steady load a PASSIVE checkpoint
 * never finds the WAL fully copied at the writer's next transaction, so
 * the WAL is not restarted and keeps its size; poking at every commit past
 * the threshold then copied every page of every commit (the pages a group
 * touches -- page 1, key_versions, audit_head, the right edges of the DEK
 * B-trees -- are mostly the ones the previous group touched): 17 us of CPU
 * per datakey, 13 % of kmsd's.  Copying once per SQ_CKPT_PAGES frames
 * copies each hot page once per batch: about 1 us.  The WAL is kept from
 * growing without bound by the writer itself (sqlite.c, wal_restart): at
 * SQ_WAL_MAX_PAGES it finishes the copy and restarts the WAL.
 *
 * Durability is unchanged: a commit is
 * durable once its WAL frames are fsynced (synchronous = FULL), whoever
 * checkpoints.  The truncating checkpoint after a destroy (sqlite.c) still
 * runs on the writer; it retries if it meets this one.
 *
 * Locking: mu guards `pending` and `stopping`; the connection belongs to
 * the thread.
 */
#include "kms/store/sqlite_ckpt.h"

#include <pthread.h>
#include <sqlite3.h>
#include <stdlib.h>

#include "module/log.h"

struct sq_ckpt {
    sqlite3 *db;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int pending;   /* [mu] a checkpoint was asked for */
    int poked_at;  /* [mu] WAL size (pages) when it was last asked for */
    int wal_pages; /* the WAL's size after the last commit (writer thread) */
    int stopping;  /* [mu] */
};

static void *ckpt_main(void *arg)
{
    sq_ckpt *c = arg;
    int rc, log_frames = 0, done_frames = 0;

    pthread_setname_np(pthread_self(), "kms-checkpoint"); /* top -H, perf */
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->pending && !c->stopping)
            pthread_cond_wait(&c->cv, &c->mu);
        if (c->stopping)
            break;
        c->pending = 0;
        pthread_mutex_unlock(&c->mu);
        rc = sqlite3_wal_checkpoint_v2(c->db, NULL, SQLITE_CHECKPOINT_PASSIVE, &log_frames,
                                       &done_frames);
        if (rc != SQLITE_OK && rc != SQLITE_BUSY)
            LOG_ERROR("store", "sqlite: WAL checkpoint: %s (code %d)", sqlite3_errmsg(c->db), rc);
        else
            LOG_DEBUG("store", "WAL checkpoint: %d of %d frames copied", done_frames, log_frames);
        pthread_mutex_lock(&c->mu);
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

p11kms_status sq_ckpt_start(const char *path, sq_ckpt **out)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    sq_ckpt *c = calloc(1, sizeof(*c));
    int rc, sync_ok = 0;

    if (c == NULL)
        goto out;
    rv = P11KMS_ERR_STORE_UNAVAILABLE;
    rc = sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        LOG_ERROR("store", "sqlite: opening the checkpoint connection: %s",
                  c->db != NULL ? sqlite3_errmsg(c->db) : sqlite3_errstr(rc));
        goto out;
    }
    /* FULL: the database file is fsynced before the WAL may be reused. */
    if (sqlite3_exec(c->db, "PRAGMA synchronous = FULL", NULL, NULL, NULL) != SQLITE_OK) {
        LOG_ERROR("store", "sqlite: checkpoint connection: PRAGMA synchronous: %s",
                  sqlite3_errmsg(c->db));
        goto out;
    }
    rv = P11KMS_ERR_INTERNAL;
    if (pthread_mutex_init(&c->mu, NULL) != 0)
        goto out;
    if (pthread_cond_init(&c->cv, NULL) != 0) {
        pthread_mutex_destroy(&c->mu);
        goto out;
    }
    sync_ok = 1;
    if (pthread_create(&c->thread, NULL, ckpt_main, c) != 0) {
        LOG_ERROR("store", "cannot start the WAL checkpoint thread");
        goto out;
    }
    *out = c;
    c = NULL;
    rv = P11KMS_OK;
out:
    if (c != NULL) {
        if (sync_ok) {
            pthread_cond_destroy(&c->cv);
            pthread_mutex_destroy(&c->mu);
        }
        sqlite3_close(c->db);
        free(c);
    }
    return rv;
}

int sq_ckpt_wal_hook(void *arg, sqlite3 *db, const char *name, int pages)
{
    sq_ckpt *c = arg;

    (void)db;
    (void)name;
    c->wal_pages = pages;
    if (pages < SQ_CKPT_PAGES)
        return SQLITE_OK;
    pthread_mutex_lock(&c->mu);
    if (pages < c->poked_at || pages - c->poked_at >= SQ_CKPT_PAGES) { /* restarted, or grown */
        c->poked_at = pages;
        c->pending = 1;
        pthread_cond_signal(&c->cv);
    }
    pthread_mutex_unlock(&c->mu);
    return SQLITE_OK;
}

int sq_ckpt_wal_pages(const sq_ckpt *c)
{
    return c->wal_pages;
}

void sq_ckpt_stop(sq_ckpt *c)
{
    if (c == NULL)
        return;
    pthread_mutex_lock(&c->mu);
    c->stopping = 1;
    pthread_cond_signal(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->thread, NULL);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    sqlite3_close(c->db);
    free(c);
}
