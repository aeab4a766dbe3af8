/*
 * kms/store/sqlite_ckpt.h - the SQLite backend's WAL checkpoint thread
 * (sqlite_ckpt.c); used by sqlite.c only.
 */
#ifndef P11KMS_KMS_STORE_SQLITE_CKPT_H
#define P11KMS_KMS_STORE_SQLITE_CKPT_H

#include <sqlite3.h>

#include "p11kms/status.h"

/* WAL size (pages) that asks for a checkpoint: SQLite's own default. */
#define SQ_CKPT_PAGES 1000

typedef struct sq_ckpt sq_ckpt;

/* Open a connection of its own to the database at path and start the
 * thread. */
p11kms_status sq_ckpt_start(const char *path, sq_ckpt **out);

/* The writer connection's sqlite3_wal_hook (arg: the sq_ckpt): asks for
 * a checkpoint once the WAL holds SQ_CKPT_PAGES pages; never blocks on
 * the checkpoint itself. */
int sq_ckpt_wal_hook(void *arg, sqlite3 *db, const char *name, int pages);

/* Stop the thread (a checkpoint in progress finishes) and close. */
void sq_ckpt_stop(sq_ckpt *c);

#endif
