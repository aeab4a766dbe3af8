/*
 * kms/store/store.h - the metadata store interface.
 *
 * The store is the single home of keys, key versions and wrapped DEKs.  It
 * never holds a plaintext DEK.  Every write function returns only once its
 * change is durable (committed and fsynced: SQLite WAL with
 * synchronous=FULL).  Concurrent writers share commits: one writer thread
 * commits everything queued in one transaction and one fsync, then wakes
 * the callers (group commit).  Each queued write runs under its own
 * SAVEPOINT so one failing write does not fail its neighbours.  Reads use
 * their own connections (WAL allows it) and never wait for the writer.
 *
 * Backends sit behind an ops table (store_internal.h): SQLite now,
 * PostgreSQL later, with the same functions and the same promises.
 * All functions are thread-safe.  Errors: P11KMS_ERR_STORE_UNAVAILABLE when
 * the database cannot be read or written; the specific codes below
 * otherwise.
 */
#ifndef P11KMS_KMS_STORE_H
#define P11KMS_KMS_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "p11kms/status.h"

#define KMS_NAME_MAX 64          /* key name: [a-z0-9][a-z0-9._-]{0,63} */
#define KMS_TOKEN_ID_LEN 16      /* CKA_ID of a KEK version */
#define KMS_DEK_ID_LEN 36        /* textual UUID */
#define KMS_WRAPPED_MAX 128      /* IV || wrapped DEK || tag fits here */

typedef enum kms_key_state { KMS_KEY_ENABLED = 0, KMS_KEY_DISABLED } kms_key_state;
typedef enum kms_version_state { KMS_VERSION_ACTIVE = 0, KMS_VERSION_DESTROYED } kms_version_state;
typedef enum kms_dek_state { KMS_DEK_ACTIVE = 0, KMS_DEK_REVOKED, KMS_DEK_DESTROYED } kms_dek_state;

/* Why a DEK was revoked (the reason codes of RFC 5280 that apply to a
 * data key).  KMS_REVOKE_NONE: never revoked. */
typedef enum kms_revoke_reason {
    KMS_REVOKE_NONE = 0,
    KMS_REVOKE_COMPROMISED,
    KMS_REVOKE_SUPERSEDED,
    KMS_REVOKE_CESSATION,
    KMS_REVOKE_UNSPECIFIED
} kms_revoke_reason;

#define KMS_DEK_LIST_DEFAULT 100 /* page size of kms_store_dek_list */
#define KMS_DEK_LIST_MAX 1000

typedef struct kms_version_rec {
    uint32_t version;
    kms_version_state state;
    unsigned char token_id[KMS_TOKEN_ID_LEN];
    int64_t created;     /* unix seconds */
    uint64_t wrap_count; /* DEKs ever wrapped by this version (durable) */
    uint64_t dek_count;  /* live (active or revoked) DEKs on this version */
} kms_version_rec;

typedef struct kms_key_rec {
    char name[KMS_NAME_MAX + 1];
    kms_key_state state;
    uint32_t latest_version;
    uint32_t min_decrypt_version;
    int64_t rotation_period; /* seconds; 0 = no automatic rotation */
    int64_t created;         /* unix seconds */
    kms_version_rec *versions; /* ascending by version */
    size_t n_versions;
} kms_key_rec;

typedef struct kms_dek_rec {
    char id[KMS_DEK_ID_LEN + 1];
    char key[KMS_NAME_MAX + 1];
    uint32_t version;
    kms_dek_state state;
    char *context;           /* canonical JSON text, owned by the record */
    unsigned char wrapped[KMS_WRAPPED_MAX];
    size_t wrapped_len;      /* 0 once destroyed (and in listed records) */
    int64_t created;         /* unix seconds */
    int64_t revoked_at;      /* unix seconds; 0 = never revoked */
    kms_revoke_reason revoke_reason; /* KMS_REVOKE_NONE = never revoked */
    int64_t destroyed_at;    /* unix seconds; 0 = not destroyed */
} kms_dek_rec;

typedef struct kms_store kms_store;

/* Open (creating if needed) the SQLite store at path, apply pending schema
 * migrations, set WAL, synchronous=FULL, secure_delete, and start the
 * group-commit writer. */
p11kms_status kms_store_open_sqlite(const char *path, kms_store **out);

/* Stop the writer (after draining its queue) and close.  NULL is a no-op. */
void kms_store_close(kms_store *st);

/* "sqlite" or "postgres". */
const char *kms_store_backend(const kms_store *st);

/* Cheap liveness check for /v1/health. */
p11kms_status kms_store_ping(kms_store *st);

/* Create key `name` (enabled, min_decrypt_version 1) with version 1 whose
 * token object has CKA_ID token_id.  P11KMS_ERR_KEY_EXISTS if the name is
 * taken.  Durable on return. */
p11kms_status kms_store_key_create(kms_store *st, const char *name,
                                   const unsigned char token_id[KMS_TOKEN_ID_LEN],
                                   int64_t now);

/* Key with all its versions (and their live DEK counts).
 * P11KMS_ERR_KEY_NOT_FOUND.  Free with kms_key_rec_free. */
p11kms_status kms_store_key_get(kms_store *st, const char *name, kms_key_rec **out);

/* The same as kms_store_key_get but without counting DEKs (every
 * dek_count is 0): the hot path of generate and decrypt, a few indexed
 * row reads. */
p11kms_status kms_store_key_get_meta(kms_store *st, const char *name, kms_key_rec **out);

/* Every key, ordered by name.  Free with kms_key_list_free. */
p11kms_status kms_store_key_list(kms_store *st, kms_key_rec ***out, size_t *count);

/* Insert a DEK row (state active) and add one to its version's wrap_count,
 * in one transaction shared with concurrent callers (group commit).
 * Durable on return.  P11KMS_ERR_KEY_NOT_FOUND if the key/version row does
 * not exist; P11KMS_ERR_INTERNAL if the DEK id is already taken. */
p11kms_status kms_store_dek_insert(kms_store *st, const kms_dek_rec *dek);

/* A DEK row.  P11KMS_ERR_DEK_NOT_FOUND.  Free with kms_dek_rec_free. */
p11kms_status kms_store_dek_get(kms_store *st, const char *id, kms_dek_rec **out);

/* Revoke DEK `id` (active -> revoked) with `reason` (not
 * KMS_REVOKE_NONE) at time `now`, through the group-commit writer.
 * Durable on return.  A DEK already revoked is left exactly as it is (its
 * first reason and time are kept) and P11KMS_OK is returned: revocation is
 * idempotent.  P11KMS_ERR_DEK_NOT_FOUND, P11KMS_ERR_DEK_DESTROYED (states
 * never move backwards). */
p11kms_status kms_store_dek_revoke(kms_store *st, const char *id, kms_revoke_reason reason,
                                   int64_t now);

/* Destroy DEK `id` (active or revoked -> destroyed) at time `now`: its
 * wrapped bytes are set to NULL (the metadata stays for audit).  Durable on
 * return, and on SQLite the wrapped bytes are gone from the database file
 * and the WAL by then too (secure_delete, then a truncating WAL checkpoint
 * on the writer right after the commit; if the checkpoint is blocked by a
 * long reader it is logged and retried after the next commit).
 * P11KMS_ERR_DEK_NOT_FOUND, P11KMS_ERR_DEK_DESTROYED (already destroyed). */
p11kms_status kms_store_dek_destroy(kms_store *st, const char *id, int64_t now);

/* Bulk revoke: every active DEK of key `key` whose context holds every
 * pair of `filter` (a canonical JSON object of string values with at least
 * one pair) becomes revoked with `reason` at `now`, in one transaction.
 * DEKs already revoked or destroyed are not touched.  *count receives the
 * number of DEKs revoked.  P11KMS_ERR_KEY_NOT_FOUND; P11KMS_ERR_BAD_REQUEST
 * for an empty filter (it would match every DEK of the key). */
p11kms_status kms_store_dek_revoke_bulk(kms_store *st, const char *key, const char *filter,
                                        kms_revoke_reason reason, int64_t now, uint64_t *count);

/* Bulk destroy: as kms_store_dek_revoke_bulk, for every active or revoked
 * DEK of `key` matching `filter`; one transaction, then one truncating
 * WAL checkpoint (as kms_store_dek_destroy).  *count receives the number
 * of DEKs destroyed. */
p11kms_status kms_store_dek_destroy_bulk(kms_store *st, const char *key, const char *filter,
                                         int64_t now, uint64_t *count);

/* One page of the DEKs of key `key`, ordered by id: those with id greater
 * than `cursor` (NULL or "" for the first page), in state `state` (a
 * kms_dek_state, or -1 for every state), at most `limit` (1 to
 * KMS_DEK_LIST_MAX) of them.  Records carry no wrapped bytes
 * (wrapped_len 0).  *more is set to 1 when DEKs follow the last one
 * returned (pass its id as the next cursor), 0 otherwise.  The order is
 * stable: paging through never repeats a DEK and never skips one that
 * existed (in that state) for the whole walk.  P11KMS_ERR_KEY_NOT_FOUND.
 * Free *out with kms_dek_list_free. */
p11kms_status kms_store_dek_list(kms_store *st, const char *key, int state, const char *cursor,
                                 size_t limit, kms_dek_rec ***out, size_t *count, int *more);

/* The CKA_IDs of every key version the store refers to (destroyed ones
 * included), for orphan reconciliation.  *ids freed with free(). */
p11kms_status kms_store_token_ids(kms_store *st,
                                  unsigned char (**ids)[KMS_TOKEN_ID_LEN],
                                  size_t *count);

/* Group-commit statistics since open: transactions committed and writes
 * those transactions carried (commits < writes once commits are shared). */
void kms_store_stats(kms_store *st, uint64_t *commits, uint64_t *writes);

void kms_key_rec_free(kms_key_rec *k);
void kms_key_list_free(kms_key_rec **keys, size_t count);
void kms_dek_rec_free(kms_dek_rec *d);
void kms_dek_list_free(kms_dek_rec **deks, size_t count);

const char *kms_key_state_name(kms_key_state s);         /* "enabled" */
const char *kms_version_state_name(kms_version_state s); /* "active" */
const char *kms_dek_state_name(kms_dek_state s);         /* "revoked" */
const char *kms_revoke_reason_name(kms_revoke_reason r); /* "compromised"; NULL for NONE */

/* Parse a DEK state name ("active", "revoked", "destroyed"); -1 when
 * unknown. */
int kms_dek_state_parse(const char *s);

/* Parse a revoke reason name; -1 when unknown ("none" is not a name). */
int kms_revoke_reason_parse(const char *s);

#endif
