/*
 * kms/store/store_internal.h - what the store backends share, not for
 * callers of the store (they use store.h).
 *
 * - struct kms_store and its ops table: store.c dispatches every public
 *   function through st->ops; each backend (sqlite.c now, postgres.c
 *   later) embeds `struct kms_store` as its first member and fills a
 *   static const kms_store_ops.
 * - The group-commit writer (groupcommit.c): a backend-neutral queue of
 *   kms_write requests drained by one thread that runs each group in one
 *   transaction, each write under its own savepoint, through kms_gc_ops
 *   callbacks the backend provides.
 * - Helpers for building records (store.c) and the SQLite migration entry
 *   point (migrations.c).
 */
#ifndef P11KMS_KMS_STORE_INTERNAL_H
#define P11KMS_KMS_STORE_INTERNAL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "kms/store/store.h"

/* ---- ops table ---------------------------------------------------------- */

typedef struct kms_store_stats_ex {
    uint64_t commits;           /* groups committed */
    uint64_t writes;            /* writes handled by committed groups */
    uint64_t failed_groups;     /* groups rolled back (begin/commit/fatal error) */
    uint64_t queued;            /* writes waiting for the writer right now */
    uint64_t wal_truncations;   /* truncating WAL checkpoints after destroys */
    uint64_t wal_truncate_busy; /* ... that a reader or writer blocked (retried later) */
    uint64_t wal_restarts;      /* WAL restarts at SQ_WAL_MAX_PAGES (sqlite.c) */
    uint64_t wal_restart_busy;  /* ... that a reader blocked (retried after more growth) */
    uint64_t failing;           /* 1 while writes are refused (groupcommit.c), else 0 */
    uint64_t refused_writes;    /* writes refused at once while failing */
} kms_store_stats_ex;

typedef struct kms_store_ops {
    const char *backend; /* "sqlite", "postgres" */
    void (*close)(kms_store *st);
    p11kms_status (*ping)(kms_store *st);
    p11kms_status (*counts)(kms_store *st, kms_store_counts *out);
    p11kms_status (*key_create)(kms_store *st, const char *name,
                                const unsigned char token_id[KMS_TOKEN_ID_LEN], int64_t now);
    p11kms_status (*key_get)(kms_store *st, const char *name, kms_key_rec **out);
    p11kms_status (*key_get_meta)(kms_store *st, const char *name, kms_key_rec **out);
    p11kms_status (*key_list)(kms_store *st, kms_key_rec ***out, size_t *count);
    /* max_wraps: UINT64_MAX for no cap; *refused as kms_store_dek_insert_capped. */
    p11kms_status (*dek_insert)(kms_store *st, const kms_dek_rec *dek, uint64_t max_wraps,
                                int *refused);
    p11kms_status (*dek_get)(kms_store *st, const char *id, kms_dek_rec **out);
    p11kms_status (*dek_revoke)(kms_store *st, const char *id, kms_revoke_reason reason,
                                int64_t now);
    p11kms_status (*dek_destroy)(kms_store *st, const char *id, int64_t now);
    p11kms_status (*dek_revoke_bulk)(kms_store *st, const char *key, const char *filter,
                                     kms_revoke_reason reason, int64_t now, uint64_t *count);
    p11kms_status (*dek_destroy_bulk)(kms_store *st, const char *key, const char *filter,
                                      int64_t now, uint64_t *count);
    p11kms_status (*dek_list)(kms_store *st, const char *key, int state, const char *cursor,
                              size_t limit, kms_dek_rec ***out, size_t *count, int *more);
    /* destroyed_only: the destroyed versions' ids (kms_store_token_ids_destroyed). */
    p11kms_status (*token_ids)(kms_store *st, int destroyed_only,
                               unsigned char (**ids)[KMS_TOKEN_ID_LEN], size_t *count);
    /* key rotation (issue 3): see the public functions in store.h */
    p11kms_status (*version_add)(kms_store *st, const char *name, uint32_t expected_latest,
                                 const unsigned char token_id[KMS_TOKEN_ID_LEN], int64_t now,
                                 uint32_t *added);
    p11kms_status (*key_set_state)(kms_store *st, const char *name, kms_key_state state);
    p11kms_status (*key_config)(kms_store *st, const char *name, uint32_t min_decrypt_version,
                                int64_t rotation_period);
    p11kms_status (*rewrap_read)(kms_store *st, const char *name, uint32_t below_version,
                                 const char *cursor, size_t limit, kms_dek_rec ***out,
                                 size_t *count);
    p11kms_status (*rewrap_remaining)(kms_store *st, const char *name, uint32_t below_version,
                                      uint64_t *count);
    p11kms_status (*rewrap_commit)(kms_store *st, const char *name, uint32_t new_version,
                                   const kms_rewrap_item *items, size_t n, uint64_t *updated);
    p11kms_status (*version_retire)(kms_store *st, const char *name, uint32_t version,
                                    int64_t now);
    p11kms_status (*rotation_due)(kms_store *st, int64_t now, kms_rotation_due **out,
                                  size_t *count);
    /* KEK creation intents: see kms_store_kek_intent_* in store.h */
    p11kms_status (*kek_intent_add)(kms_store *st, const unsigned char token_id[KMS_TOKEN_ID_LEN],
                                    const char *key_name, uint32_t version, int64_t now);
    p11kms_status (*kek_intents)(kms_store *st, int64_t older_than, kms_kek_intent **list,
                                 size_t *count);
    p11kms_status (*kek_intent_remove)(kms_store *st,
                                       const unsigned char token_id[KMS_TOKEN_ID_LEN]);
    void (*stats)(kms_store *st, kms_store_stats_ex *out);
    /* audit (issue 5): the backend's group-commit writer (audited writes
     * and audit-only appends are built in store.c and queued there), and
     * the reads of the audit table. */
    struct kms_gc *(*writer)(kms_store *st);
    p11kms_status (*audit_list)(kms_store *st, uint64_t after, size_t limit,
                                kms_audit_entry **out, size_t *count);
    p11kms_status (*audit_head)(kms_store *st, kms_audit_head *out);
} kms_store_ops;

struct kms_store {
    const kms_store_ops *ops;
};

/* Statistics including the internal ones (tests, metrics). */
void kms_store_stats_get(kms_store *st, kms_store_stats_ex *out);

/* ---- group commit (groupcommit.c) --------------------------------------- */

typedef enum kms_write_type {
    KMS_WRITE_NOOP = 0, /* an empty transaction: proves the writer can write */
    KMS_WRITE_KEY_CREATE,
    KMS_WRITE_DEK_INSERT,
    KMS_WRITE_DEK_REVOKE, /* one DEK, or (key, filter) in bulk */
    KMS_WRITE_DEK_DESTROY, /* one DEK, or (key, filter) in bulk */
    KMS_WRITE_VERSION_ADD,    /* rotation: compare-and-set on latest_version */
    KMS_WRITE_KEY_SET_STATE,  /* enable / disable */
    KMS_WRITE_KEY_CONFIG,     /* min_decrypt_version, rotation_period */
    KMS_WRITE_REWRAP,         /* a rewrap batch, each row only if unchanged */
    KMS_WRITE_VERSION_RETIRE, /* mark a version destroyed if no live DEK uses it */
    KMS_WRITE_AUDIT_KEY,      /* get or create the audit MAC key id (groupcommit.c) */
    KMS_WRITE_INTENT_ADD,     /* record a KEK creation intent */
    KMS_WRITE_INTENT_REMOVE   /* delete a KEK creation intent */
} kms_write_type;

/* One queued write.  Lives on the submitting thread's stack; every pointer
 * in it stays valid until kms_gc_submit returns. */
typedef struct kms_write {
    kms_write_type type;
    union {
        struct {
            const char *name;
            const unsigned char *token_id; /* KMS_TOKEN_ID_LEN bytes */
            int64_t now;
        } key_create;
        struct {
            const kms_dek_rec *dek;
            uint64_t max_wraps; /* UINT64_MAX: no cap */
            int refused;        /* out: version full or not active */
        } dek_insert;
        struct {
            const char *name;
            uint32_t expected_latest;
            const unsigned char *token_id; /* KMS_TOKEN_ID_LEN bytes */
            int64_t now;
            uint32_t added; /* out: the new version, 0 when latest moved */
        } version_add;
        struct {
            const char *name;
            kms_key_state state;            /* KEY_SET_STATE */
            uint32_t min_decrypt_version;   /* KEY_CONFIG: 0 = unchanged */
            int64_t rotation_period;        /* KEY_CONFIG: -1 = unchanged */
        } key_meta;
        struct {
            const char *name;
            uint32_t new_version;
            const kms_rewrap_item *items;
            size_t n;
            uint64_t updated; /* out */
        } rewrap;
        struct {
            const char *name;
            uint32_t version;
            int64_t now;
        } retire;
        struct {
            const char *id;           /* one DEK; NULL for bulk */
            const char *key;          /* bulk: the key's name */
            const char *filter;       /* bulk: canonical JSON object, >= 1 pair */
            kms_revoke_reason reason; /* revoke only */
            int64_t now;
            uint64_t count; /* out (bulk): DEKs changed */
        } dek_state;
        struct {
            const unsigned char *token_id; /* KMS_TOKEN_ID_LEN bytes */
            const char *key_name;          /* INTENT_ADD only */
            uint32_t version;              /* INTENT_ADD only */
            int64_t now;                   /* INTENT_ADD only */
        } intent;
        struct {
            kms_audit_key_create_fn create;
            void *arg;
            unsigned char *id; /* out: KMS_TOKEN_ID_LEN bytes */
            int created;       /* out */
        } audit_key;
    } u;
    /* Audit entries appended (after the write, outside its savepoint) in
     * the same transaction; see kms_store_*_audited in store.h. */
    kms_audit_entry *audit;
    size_t n_audit;
    p11kms_status result; /* written by the writer thread */
    int done;             /* set under the queue mutex */
    /* Who is told: a synchronous caller sleeps on `wake` (its own, so a
     * commit wakes exactly the callers it finished); an asynchronous one
     * (kms_gc_submit_async) gets on_done(on_done_arg) on the writer
     * thread, after which the writer never touches the write again. */
    pthread_cond_t *wake;
    void (*on_done)(void *arg);
    void *on_done_arg;
    struct kms_write *next;
} kms_write;

/* The backend's side of the writer; all called on the writer thread only.
 * apply() runs one write under its own savepoint and returns its status;
 * P11KMS_ERR_STORE_UNAVAILABLE from apply() means the transaction itself
 * is broken and the whole group is rolled back. */
typedef struct kms_gc_ops {
    p11kms_status (*begin)(void *ctx);
    p11kms_status (*apply)(void *ctx, kms_write *w);
    p11kms_status (*commit)(void *ctx);
    void (*rollback)(void *ctx);
    /* Audit (issue 5), inside the open transaction, after every apply:
     * audit_head takes the backend's audit lock (PostgreSQL: an advisory
     * transaction lock, so the nodes sharing a database append one chain)
     * and reads the sealed head (head->present 0 when there is none) and
     * the last row (*last_seq 0 when the table is empty, else its seq and
     * hash); audit_insert adds one row (mac NULL); audit_seal sets the mac
     * of row e->seq and records (e->seq, e->hash) as the sealed head.
     * audit_key_get (under the same lock) reads the recorded MAC key id
     * (*found 0 when none), audit_key_put records it.  Any failure is
     * P11KMS_ERR_STORE_UNAVAILABLE and rolls the group back. */
    p11kms_status (*audit_head)(void *ctx, kms_audit_head *head, uint64_t *last_seq,
                                unsigned char last_hash[KMS_AUDIT_HASH_LEN]);
    p11kms_status (*audit_insert)(void *ctx, const kms_audit_entry *e);
    p11kms_status (*audit_seal)(void *ctx, const kms_audit_entry *e);
    p11kms_status (*audit_key_get)(void *ctx, unsigned char id[KMS_TOKEN_ID_LEN], int *found);
    p11kms_status (*audit_key_put)(void *ctx, const unsigned char id[KMS_TOKEN_ID_LEN]);
    /* Optional.  One tiny durable write in its own transaction (it must
     * really reach the disk, so that a full disk or a read-only file
     * fails it) to learn whether the store can be written again; on
     * failure a one-line reason in why (no bound values).  With a probe,
     * a group that fails in the store makes the writer refuse writes at
     * once until a probe commits (groupcommit.c); without one every group
     * is tried. */
    p11kms_status (*probe)(void *ctx, char *why, size_t whylen);
} kms_gc_ops;

typedef struct kms_gc kms_gc;

/* Start the writer thread.  ops and ctx must outlive the writer. */
p11kms_status kms_gc_start(const kms_gc_ops *ops, void *ctx, kms_gc **out);

/* Queue w, wait until its group is committed (durable) or failed, and
 * return its result.  P11KMS_ERR_STORE_UNAVAILABLE once stopping, and at
 * once (w is not queued) while the writer is failing. */
p11kms_status kms_gc_submit(kms_gc *gc, kms_write *w);

/* Queue w and return at once: P11KMS_OK means on_done(arg) will be called
 * exactly once, on the writer thread, when w's group has committed or
 * failed (w->result, and w's out fields, are then final).  on_done must
 * not block and must not submit a synchronous write.  w must stay valid
 * until then.  P11KMS_ERR_STORE_UNAVAILABLE (nothing queued, on_done is
 * never called) once stopping, and while the writer is failing. */
p11kms_status kms_gc_submit_async(kms_gc *gc, kms_write *w, void (*on_done)(void *arg),
                                  void *arg);

/* Whether the writer can write: P11KMS_OK unless it is in the failing
 * state (a group failed in the store and no probe has committed since).
 * When failing, ask the writer for a probe at once and wait up to wait_ms
 * for it; P11KMS_ERR_STORE_UNAVAILABLE if still failing.  For health
 * checks: bounded however long the store blocks. */
p11kms_status kms_gc_writable(kms_gc *gc, int wait_ms);

/* Refuse new writes, let the writer drain what is queued, join it, free.
 * NULL is a no-op. */
void kms_gc_stop(kms_gc *gc);

void kms_gc_stats(kms_gc *gc, kms_store_stats_ex *out);

/* Install or remove the audit MAC callback (kms_store_audit_attach). */
void kms_gc_audit_attach(kms_gc *gc, kms_audit_mac_fn fn, void *arg);

/* ---- record helpers (store.c) ------------------------------------------- */

/* The argument rules of the public functions: a key name of 1 to
 * KMS_NAME_MAX bytes; a bulk filter that is a JSON object of string
 * values with at least one pair. */
int kms_store_name_ok(const char *name);
int kms_store_filter_ok(const char *filter);

/* Append a version to k->versions (kept in the order appended). */
p11kms_status kms_key_rec_add_version(kms_key_rec *k, const kms_version_rec *v);

/* Parse state names written by kms_*_state_name; -1 when unknown. */
int kms_key_state_parse(const char *s);
int kms_version_state_parse(const char *s);
/* kms_dek_state_parse and kms_revoke_reason_parse are in store.h. */

/* ---- SQLite backend (sqlite.c, migrations.c) ---------------------------- */

struct sqlite3;

/* The schema version this binary writes (the last migration). */
int kms_sqlite_schema_latest(void);

/* Apply every pending migration on db, each in its own transaction and
 * recorded in schema_version; a no-op when the schema is current.
 * P11KMS_ERR_STORE_UNAVAILABLE when a migration fails or the database is
 * newer than this binary. */
p11kms_status kms_sqlite_migrate(struct sqlite3 *db);

/* PRAGMAs read back from the writer connection when the store was opened
 * (the open fails unless they are what the store set). */
typedef struct kms_sqlite_pragmas {
    char journal_mode[16]; /* "wal" */
    int synchronous;       /* 2 = FULL */
    int secure_delete;     /* 1 */
    int foreign_keys;      /* 1 */
    int busy_timeout_ms;
} kms_sqlite_pragmas;

/* For tests: the writer's PRAGMAs.  P11KMS_ERR_BAD_REQUEST if st is not
 * an SQLite store. */
p11kms_status kms_sqlite_pragmas_get(kms_store *st, kms_sqlite_pragmas *out);

#endif
