/*
 * kms/store/sqlite_ckpt.h - the SQLite backend's WAL checkpoint thread
 * (sqlite_ckpt.c); used by sqlite.c only.
 */
#ifndef P11KMS_KMS_STORE_SQLITE_CKPT_H
#define P11KMS_KMS_STORE_SQLITE_CKPT_H

#include <sqlite3.h>

#include "p11kms/status.h"

/* WAL growth (pages) that asks for a checkpoint: SQLite's own default
 * threshold, counted from the last request. */
#define SQ_CKPT_PAGES 1000

/* WAL size (pages, 4 KiB each) at which the writer restarts the WAL
 * itself (sqlite.c): 64 MiB. */
#define SQ_WAL_MAX_PAGES 16384

typedef struct sq_ckpt sq_ckpt;

/* Open a connection of its own to the database at path and start the
 * thread. */
p11kms_status sq_ckpt_start(const char *path, sq_ckpt **out);

/* The writer connection's sqlite3_wal_hook (arg: the sq_ckpt): asks for
 * a checkpoint each time the WAL has grown by SQ_CKPT_PAGES pages; never
 * blocks on the checkpoint itself. */
int sq_ckpt_wal_hook(void *arg, sqlite3 *db, const char *name, int pages);

/* The WAL's size in pages after the writer's last commit (writer thread
 * only: the hook runs there). */
int sq_ckpt_wal_pages(const sq_ckpt *c);

/* Stop the thread (a checkpoint in progress finishes) and close. */
void sq_ckpt_stop(sq_ckpt *c);

#endif
