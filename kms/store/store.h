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

/* Open the PostgreSQL store named by url (any libpq connection string,
 * URI or key=value), apply pending schema migrations under an advisory
 * lock (safe when several nodes start at once), open the writer and the
 * read connections (synchronous_commit = on: durable on return means
 * committed and flushed), and start the group-commit writer.  Several
 * kmsd nodes may share one database (kms/store/postgres.c).
 * P11KMS_ERR_BAD_REQUEST for a malformed url; P11KMS_ERR_STORE_UNAVAILABLE
 * when the server cannot be reached or the schema cannot be migrated. */
p11kms_status kms_store_open_postgres(const char *url, kms_store **out);

/* Stop the writer (after draining its queue) and close.  NULL is a no-op. */
void kms_store_close(kms_store *st);

/* "sqlite" or "postgres". */
const char *kms_store_backend(const kms_store *st);

/* Cheap liveness check for /v1/health. */
p11kms_status kms_store_ping(kms_store *st);

/* What GET /v1/status and /metrics count: keys, and DEKs by state. */
typedef struct kms_store_counts {
    uint64_t keys;
    uint64_t deks_active;
    uint64_t deks_revoked;
    uint64_t deks_destroyed;
} kms_store_counts;

/* Read-only, one query (one snapshot): a full scan of deks, so for status
 * and metrics scrapes, not for the hot path. */
p11kms_status kms_store_counts_get(kms_store *st, kms_store_counts *out);

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

/* ---- key rotation (issue 3) ----------------------------------------------
 *
 * Every write below goes through the group-commit writer and re-checks
 * its preconditions inside the transaction, so concurrent callers (other
 * workers, other nodes sharing the database) can never collide: the
 * loser is told, never silently overwritten. */

/* The largest max_wraps_per_version (AES-GCM with random 96-bit IVs is
 * safe to about 2^32 uses per key; p11kms rotates at 2^30). */
#define KMS_MAX_WRAPS_DEFAULT (UINT64_C(1) << 30)

/* Add version expected_latest + 1 of key `name`, whose token object has
 * CKA_ID token_id, and make it the latest, in one transaction, only if
 * the key's latest_version is still expected_latest (compare-and-set).
 * *added receives the new version, or 0 when latest_version had moved
 * (another rotation won: nothing was written; the caller destroys its
 * token object and re-reads).  P11KMS_ERR_KEY_NOT_FOUND. */
p11kms_status kms_store_version_add(kms_store *st, const char *name, uint32_t expected_latest,
                                    const unsigned char token_id[KMS_TOKEN_ID_LEN], int64_t now,
                                    uint32_t *added);

/* Set key `name` enabled or disabled (idempotent).  P11KMS_ERR_KEY_NOT_FOUND. */
p11kms_status kms_store_key_set_state(kms_store *st, const char *name, kms_key_state state);

/* Change the key's min_decrypt_version (0: unchanged) and/or its
 * rotation_period in seconds (-1: unchanged; 0: off), in one transaction.
 * min_decrypt_version must be 1..latest_version as read inside that
 * transaction (P11KMS_ERR_BAD_REQUEST otherwise).
 * P11KMS_ERR_KEY_NOT_FOUND. */
p11kms_status kms_store_key_config(kms_store *st, const char *name, uint32_t min_decrypt_version,
                                   int64_t rotation_period);

/* Up to `limit` (1..KMS_REWRAP_BATCH_MAX) DEKs of key `name` that still
 * hold a wrapped copy (active or revoked) on a version below
 * `below_version`, with id greater than `cursor` ("" or NULL for the
 * start), ordered by id, with their wrapped bytes and context: one read
 * per rewrap batch.  Free *out with kms_dek_list_free.
 * P11KMS_ERR_KEY_NOT_FOUND. */
#define KMS_REWRAP_BATCH_MAX 4096
p11kms_status kms_store_rewrap_read(kms_store *st, const char *name, uint32_t below_version,
                                    const char *cursor, size_t limit, kms_dek_rec ***out,
                                    size_t *count);

/* How many DEKs of key `name` still hold a wrapped copy on a version
 * below `below_version`.  P11KMS_ERR_KEY_NOT_FOUND. */
p11kms_status kms_store_rewrap_remaining(kms_store *st, const char *name, uint32_t below_version,
                                         uint64_t *count);

/* One rewrapped DEK: its id, the version it was read on, and its new
 * wrapped bytes (under the target version). */
typedef struct kms_rewrap_item {
    char id[KMS_DEK_ID_LEN + 1];
    uint32_t old_version;
    unsigned char wrapped[KMS_WRAPPED_MAX];
    size_t wrapped_len;
} kms_rewrap_item;

/* Commit a rewrap batch in one transaction: each DEK moves to
 * new_version with its new wrapped bytes only if it is unchanged since it
 * was read (same id, still on old_version, wrapped bytes still present:
 * a concurrent destroy or another node's rewrap wins), and new_version's
 * wrap_count grows by the number of DEKs moved.  Nothing is written when
 * new_version is not an active version of the key (*updated = 0).
 * States (active, revoked) are kept.  *updated receives the DEKs moved.
 * P11KMS_ERR_KEY_NOT_FOUND. */
p11kms_status kms_store_rewrap_commit(kms_store *st, const char *name, uint32_t new_version,
                                      const kms_rewrap_item *items, size_t n, uint64_t *updated);

/* Retire version `version` of key `name`: in one transaction, re-check
 * that it exists (P11KMS_ERR_KEY_NOT_FOUND otherwise), is not the latest
 * and no active or revoked DEK refers to it (P11KMS_ERR_KEY_VERSION_IN_USE
 * otherwise), then mark it destroyed at `now`.  A version already
 * destroyed is left as it is and P11KMS_OK returned (so an interrupted
 * retire can be finished).  The caller destroys the token object only
 * after this returns P11KMS_OK. */
p11kms_status kms_store_version_retire(kms_store *st, const char *name, uint32_t version,
                                       int64_t now);

/* Names of the enabled keys whose rotation_period is set and whose latest
 * version was created at least rotation_period seconds before `now`, with
 * that latest version (for the compare-and-set of kms_store_version_add).
 * Free *out with free(). */
typedef struct kms_rotation_due {
    char name[KMS_NAME_MAX + 1];
    uint32_t latest_version;
} kms_rotation_due;
p11kms_status kms_store_rotation_due(kms_store *st, int64_t now, kms_rotation_due **out,
                                     size_t *count);

/* Insert a DEK like kms_store_dek_insert, but only while its version is
 * active and has wrapped fewer than max_wraps DEKs (the count and the
 * check are in the same transaction, so the bound is exact however many
 * callers race).  *refused is 1 (and nothing is written) when the version
 * is full or no longer active: the caller rotates (or re-reads) and wraps
 * again under the new latest version. */
p11kms_status kms_store_dek_insert_capped(kms_store *st, const kms_dek_rec *dek,
                                          uint64_t max_wraps, int *refused);

/* The CKA_IDs of the destroyed key versions: their token objects must be
 * gone (reconciliation at start finishes an interrupted retire).  *ids
 * freed with free(). */
p11kms_status kms_store_token_ids_destroyed(kms_store *st,
                                            unsigned char (**ids)[KMS_TOKEN_ID_LEN],
                                            size_t *count);

/* The CKA_IDs of every key version the store refers to (destroyed ones
 * included), for orphan reconciliation.  *ids freed with free(). */
p11kms_status kms_store_token_ids(kms_store *st,
                                  unsigned char (**ids)[KMS_TOKEN_ID_LEN],
                                  size_t *count);

/* ---- KEK creation intents ------------------------------------------------
 *
 * Before a KEK object is generated in the token, the core records an
 * intent (its CKA_ID, key name, version, time) durably; the store write
 * that records the version (kms_store_key_create*, kms_store_version_add*)
 * deletes the matching intent in the same transaction.  So a "p11kms:"
 * object whose CKA_ID has an intent and no version row was left by an
 * interrupted creation, and start-up reconciliation may destroy it once
 * the intent is old enough that no node can still be creating it; an
 * object with neither is not this store's (a restored older backup,
 * another deployment) and is kept. */

typedef struct kms_kek_intent {
    unsigned char token_id[KMS_TOKEN_ID_LEN];
    char key_name[KMS_NAME_MAX + 1];
    uint32_t version;
    int64_t created;
} kms_kek_intent;

/* Record an intent; durable before it returns (group-commit writer).
 * Adding the same token_id again replaces the row.
 * P11KMS_ERR_BAD_REQUEST (arguments), P11KMS_ERR_STORE_UNAVAILABLE. */
p11kms_status kms_store_kek_intent_add(kms_store *st, const unsigned char token_id[KMS_TOKEN_ID_LEN],
                                       const char *key_name, uint32_t version, int64_t now);

/* The intents created at or before older_than (INT64_MAX: all), oldest
 * first.  *list freed with free() (NULL when *count is 0). */
p11kms_status kms_store_kek_intents(kms_store *st, int64_t older_than, kms_kek_intent **list,
                                    size_t *count);

/* Delete the intent of token_id (durable; P11KMS_OK when there is none). */
p11kms_status kms_store_kek_intent_remove(kms_store *st,
                                          const unsigned char token_id[KMS_TOKEN_ID_LEN]);

/* ---- the audit log (issue 5) ---------------------------------------------
 *
 * One append-only table of entries, hash-chained in commit order:
 * entry.hash = SHA-256(prev_hash || canonical bytes of the entry)
 * (kms_audit_hash; encoding in docs/audit.md).  The group-commit writer
 * assigns seq and computes the hashes inside the transaction that carries
 * the entries, so an entry is durable exactly when the change it records
 * is.  Once per commit group the writer asks the MAC callback (installed
 * by the core with kms_store_audit_attach; the store never talks to the
 * token) for HMAC(start_hash || end_hash) and stores it in the mac column
 * of the group's last entry, and records that entry's (seq, hash) as the
 * sealed head (a one-row table written in the same transaction).  A write
 * carrying entries fails as a whole (P11KMS_ERR_STORE_UNAVAILABLE) when
 * the entries cannot be written or sealed: fail closed. */

#define KMS_AUDIT_HASH_LEN 32
#define KMS_AUDIT_MAC_LEN 32
#define KMS_AUDIT_PRINCIPAL_MAX 159 /* "uid:1000", "cert:<CN>", "token:<name>" */
#define KMS_AUDIT_OPERATION_MAX 31  /* "datakey.decrypt" */
#define KMS_AUDIT_CODE_MAX 31       /* "key_not_found" */
#define KMS_AUDIT_LIST_DEFAULT 100
#define KMS_AUDIT_LIST_MAX 1000
#define KMS_AUDIT_KEY_LABEL "p11kms-audit:v1" /* CKA_LABEL of the MAC key */

typedef enum kms_audit_result {
    KMS_AUDIT_OK = 0,
    KMS_AUDIT_REFUSED, /* the policy refused the request */
    KMS_AUDIT_ERROR    /* allowed, and failed with error_code */
} kms_audit_result;

typedef struct kms_audit_entry {
    uint64_t seq; /* 1, 2, 3 ...: assigned by the writer in commit order */
    int64_t time; /* unix seconds; 0 on submission: the writer stamps it */
    char principal[KMS_AUDIT_PRINCIPAL_MAX + 1];
    char operation[KMS_AUDIT_OPERATION_MAX + 1];
    char key[KMS_NAME_MAX + 1];      /* "" when none */
    uint32_t version;                /* 0 when none */
    char dek_id[KMS_DEK_ID_LEN + 1]; /* "" when none */
    kms_audit_result result;
    char error_code[KMS_AUDIT_CODE_MAX + 1]; /* "" when ok */
    unsigned char prev_hash[KMS_AUDIT_HASH_LEN];
    unsigned char hash[KMS_AUDIT_HASH_LEN];
    int has_mac; /* the last entry of its commit group */
    unsigned char mac[KMS_AUDIT_MAC_LEN];
    /* Submission only (not stored): take result and error_code from the
     * outcome of the write that carries the entry; and, written by the
     * writer, 1 once the entry is committed. */
    int result_from_write;
    int committed;
} kms_audit_entry;

/* The sealed head: the (seq, hash) of the last entry of the last commit
 * group, as recorded beside the table.  present is 0 before the first
 * entry (or when the row was deleted). */
typedef struct kms_audit_head {
    int present;
    uint64_t seq;
    unsigned char hash[KMS_AUDIT_HASH_LEN];
} kms_audit_head;

/* HMAC-SHA256 (inside the token) of start_hash || end_hash, where
 * start_hash is the prev_hash of a group's first entry and end_hash the
 * hash of its last.  Called on the writer thread once per group. */
typedef p11kms_status (*kms_audit_mac_fn)(void *arg,
                                          const unsigned char start_hash[KMS_AUDIT_HASH_LEN],
                                          const unsigned char end_hash[KMS_AUDIT_HASH_LEN],
                                          unsigned char mac[KMS_AUDIT_MAC_LEN]);

/* Install (fn non-NULL) or remove the MAC callback.  Until one is
 * installed, every write that carries audit entries fails. */
void kms_store_audit_attach(kms_store *st, kms_audit_mac_fn fn, void *arg);

/* The canonical bytes of an entry (docs/audit.md) and its chain hash
 * SHA-256(prev || canonical).  kms_audit_canonical returns the length,
 * which is at most KMS_AUDIT_CANONICAL_MAX. */
#define KMS_AUDIT_CANONICAL_MAX 512
size_t kms_audit_canonical(const kms_audit_entry *e, unsigned char out[KMS_AUDIT_CANONICAL_MAX]);
void kms_audit_hash(const unsigned char prev[KMS_AUDIT_HASH_LEN], const kms_audit_entry *e,
                    unsigned char out[KMS_AUDIT_HASH_LEN]);
const char *kms_audit_result_name(kms_audit_result r); /* "ok", "refused", "error" */
int kms_audit_result_parse(const char *s);            /* -1 when unknown */

/* Append entries that record no change (a decrypt, a listing, a refused
 * request) in one commit (shared with concurrent writers).  Durable on
 * return; entries[i].seq, hash, mac are filled in. */
p11kms_status kms_store_audit_append(kms_store *st, kms_audit_entry *entries, size_t n);

/* Up to limit (1..KMS_AUDIT_LIST_MAX) entries with seq > after, oldest
 * first.  *out freed with free(). */
p11kms_status kms_store_audit_list(kms_store *st, uint64_t after, size_t limit,
                                   kms_audit_entry **out, size_t *count);

/* The sealed head (see kms_audit_head). */
p11kms_status kms_store_audit_head(kms_store *st, kms_audit_head *out);

/* Get the CKA_ID of the audit MAC key, or create it: under the store's
 * writer lock (SQLite: the writer's transaction; PostgreSQL: a
 * transaction-scoped advisory lock, so several nodes starting together
 * create exactly one), read the recorded id; when there is none, call
 * create (which generates the key in the token) and record its id in the
 * same transaction.  id receives KMS_TOKEN_ID_LEN bytes.  *created is 1
 * when this call created it. */
typedef p11kms_status (*kms_audit_key_create_fn)(void *arg, unsigned char id[KMS_TOKEN_ID_LEN]);
p11kms_status kms_store_audit_key(kms_store *st, kms_audit_key_create_fn create, void *arg,
                                  unsigned char id[KMS_TOKEN_ID_LEN], int *created);

/* The writes above, carrying audit entries (audit may be NULL: the same
 * as the plain function; n_audit entries otherwise) appended in the same
 * transaction.  An entry with result_from_write set records the write's
 * outcome (ok, or error with the status code).  The entries of a capped
 * insert that was refused, or of a version_add that lost its
 * compare-and-set, are not written (nothing happened; the caller tries
 * again and attaches them to that write). */
p11kms_status kms_store_key_create_audited(kms_store *st, const char *name,
                                           const unsigned char token_id[KMS_TOKEN_ID_LEN],
                                           int64_t now, kms_audit_entry *audit, size_t n_audit);
p11kms_status kms_store_dek_insert_capped_audited(kms_store *st, const kms_dek_rec *dek,
                                                  uint64_t max_wraps, int *refused,
                                                  kms_audit_entry *audit, size_t n_audit);
/* Asynchronous forms of kms_store_audit_append and
 * kms_store_dek_insert_capped_audited, for kmsd's hot path: the write is
 * queued and the call returns at once, so the calling thread does not
 * sleep through the commit.  On P11KMS_OK, done(arg) is called exactly
 * once, on the store's writer thread, when the write's group has
 * committed or failed; it must not block or write synchronously, and
 * must only hand the result on.  kms_store_async_result then gives the
 * write's status (and *refused for an insert).  Any other return: nothing
 * was queued and done is never called.  dek, entries and a must stay valid
 * until done has run; a is reusable for another write after it. */
typedef struct kms_store_async kms_store_async;
typedef void (*kms_store_done_fn)(void *arg);

kms_store_async *kms_store_async_new(void);
void kms_store_async_free(kms_store_async *a);
p11kms_status kms_store_audit_append_async(kms_store *st, kms_audit_entry *entries, size_t n,
                                           kms_store_async *a, kms_store_done_fn done,
                                           void *arg);
p11kms_status kms_store_dek_insert_async(kms_store *st, const kms_dek_rec *dek,
                                         uint64_t max_wraps, kms_audit_entry *audit,
                                         size_t n_audit, kms_store_async *a,
                                         kms_store_done_fn done, void *arg);
p11kms_status kms_store_async_result(const kms_store_async *a, int *refused);
p11kms_status kms_store_dek_revoke_audited(kms_store *st, const char *id,
                                           kms_revoke_reason reason, int64_t now,
                                           kms_audit_entry *audit, size_t n_audit);
p11kms_status kms_store_dek_destroy_audited(kms_store *st, const char *id, int64_t now,
                                            kms_audit_entry *audit, size_t n_audit);
p11kms_status kms_store_dek_revoke_bulk_audited(kms_store *st, const char *key,
                                                const char *filter, kms_revoke_reason reason,
                                                int64_t now, uint64_t *count,
                                                kms_audit_entry *audit, size_t n_audit);
p11kms_status kms_store_dek_destroy_bulk_audited(kms_store *st, const char *key,
                                                 const char *filter, int64_t now, uint64_t *count,
                                                 kms_audit_entry *audit, size_t n_audit);
p11kms_status kms_store_version_add_audited(kms_store *st, const char *name,
                                            uint32_t expected_latest,
                                            const unsigned char token_id[KMS_TOKEN_ID_LEN],
                                            int64_t now, uint32_t *added, kms_audit_entry *audit,
                                            size_t n_audit);
p11kms_status kms_store_key_set_state_audited(kms_store *st, const char *name,
                                              kms_key_state state, kms_audit_entry *audit,
                                              size_t n_audit);
p11kms_status kms_store_key_config_audited(kms_store *st, const char *name,
                                           uint32_t min_decrypt_version, int64_t rotation_period,
                                           kms_audit_entry *audit, size_t n_audit);
p11kms_status kms_store_rewrap_commit_audited(kms_store *st, const char *name,
                                              uint32_t new_version, const kms_rewrap_item *items,
                                              size_t n, uint64_t *updated, kms_audit_entry *audit,
                                              size_t n_audit);
p11kms_status kms_store_version_retire_audited(kms_store *st, const char *name, uint32_t version,
                                               int64_t now, kms_audit_entry *audit,
                                               size_t n_audit);

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
