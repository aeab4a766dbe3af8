/*
 * kms/core/core.h - the p11kms service core: keys and data keys.
 *
 * The core ties the token layer (module/p11.h) to the store
 * (kms/store/store.h).  It validates names and encryption contexts,
 * generates and wraps DEKs inside the token, and converts CK_RV into
 * p11kms_status exactly once (keeping the CKR_* name for the log).
 *
 * Ordering rules that make crashes safe: a durable creation intent names
 * a KEK object's CKA_ID before the object is generated, and the object
 * exists in the token before the store refers to it (the store write that
 * records it deletes the intent; objects of stale intents are destroyed
 * at start by kms_core_new, unknown objects are kept); a DEK is returned
 * only after its store row is durable.
 *
 * Thread-safe: one kms_core is shared by every worker thread.
 */
#ifndef P11KMS_KMS_CORE_H
#define P11KMS_KMS_CORE_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "module/p11.h"
#include "kms/store/store.h"
#include "p11kms/status.h"

#define KMS_DEK_LEN 32               /* AES-256 DEK */
#define KMS_KEK_LABEL_PREFIX "p11kms:" /* CKA_LABEL "p11kms:<name>:v<n>" */

/* Bounds on the encryption context (see docs/api.md). */
#define KMS_CONTEXT_MAX_PAIRS 32
#define KMS_CONTEXT_MAX_NAME 128
#define KMS_CONTEXT_MAX_VALUE 1024
#define KMS_CONTEXT_MAX_BYTES 8192   /* canonical form */

typedef struct kms_core kms_core;

/* A plaintext data key handed to a caller.  Wipe it with
 * kms_datakey_clear as soon as the reply has been written. */
typedef struct kms_datakey {
    char id[KMS_DEK_ID_LEN + 1];
    char key[KMS_NAME_MAX + 1];
    uint32_t version;
    unsigned char plaintext[KMS_DEK_LEN];
} kms_datakey;

/* Options of the core (kms_core_new_ex).  Zeroed fields take defaults. */
typedef struct kms_core_options {
    /* Rotate a key version before it has wrapped more than this many DEKs
     * (1..KMS_MAX_WRAPS_DEFAULT; 0 = KMS_MAX_WRAPS_DEFAULT = 2^30).  Only
     * lowered, for tests: AES-GCM with random IVs is safe to ~2^32 uses. */
    uint64_t max_wraps_per_version;
    /* Threads that share the token work of one rewrap batch (0 = 4). */
    unsigned rewrap_threads;
    /* Seconds a KEK creation intent must have existed before start-up
     * reconciliation destroys its object (another node may still be
     * between C_GenerateKey and its store commit).  0 =
     * KMS_INTENT_GRACE_DEFAULT; KMS_INTENT_GRACE_NONE = no grace at all
     * (tests only). */
    int64_t intent_grace;
} kms_core_options;

#define KMS_INTENT_GRACE_DEFAULT 60
#define KMS_INTENT_GRACE_NONE (-1)

/* Test hooks: set only by tests (kms_core_set_test_hooks); NULL members
 * are not called. */
typedef struct kms_core_test_hooks {
    /* Rotation: after the new version's token object exists and before
     * the store records it (a test may kill the process here). */
    void (*rotate_object_created)(void *arg, const char *key, uint32_t version);
    /* Rewrap: after each committed batch, with the DEKs moved so far. */
    void (*rewrap_batch_committed)(void *arg, const char *key, uint64_t moved);
    void *arg;
} kms_core_test_hooks;

/* Create the core over an open token and store (both stay owned by the
 * caller and must outlive the core), and reconcile KEK objects labelled
 * "p11kms:".  Destroyed: the objects of versions the store has marked
 * destroyed (a retire interrupted between its store commit and
 * C_DestroyObject), and the objects whose CKA_ID has a creation intent
 * older than the grace period and no version row (a crash between
 * C_GenerateKey and the store commit; no DEK was ever wrapped by them);
 * those intents, and intents whose object does not exist, are deleted.
 * Every other object the store does not know is KEPT and logged once
 * (warn): it may belong to newer data than this store holds (a restored
 * older backup) or to another deployment sharing the token. */
p11kms_status kms_core_new(p11_ctx *token, kms_store *store, kms_core **out);

/* The same with options (NULL: defaults).  P11KMS_ERR_BAD_REQUEST when an
 * option is out of range. */
p11kms_status kms_core_new_ex(p11_ctx *token, kms_store *store, const kms_core_options *opts,
                              kms_core **out);

/* For tests only: install hooks (copied; NULL removes them).  Not
 * thread-safe: call before the core is shared. */
void kms_core_set_test_hooks(kms_core *core, const kms_core_test_hooks *hooks);
void kms_core_free(kms_core *core);

p11_ctx *kms_core_token(kms_core *core);
kms_store *kms_core_store(kms_core *core);

/* 1 if name matches [a-z0-9][a-z0-9._-]{0,63}. */
int kms_key_name_valid(const char *name);

/* 1 if id is a canonical lowercase textual UUID (36 characters). */
int kms_dek_id_valid(const char *id);

/* Create key `name` with version 1.  P11KMS_ERR_BAD_REQUEST (bad name),
 * P11KMS_ERR_KEY_EXISTS. */
p11kms_status kms_key_create(kms_core *core, const char *name, kms_key_rec **out);
p11kms_status kms_key_show(kms_core *core, const char *name, kms_key_rec **out);
p11kms_status kms_key_list(kms_core *core, kms_key_rec ***out, size_t *count);

/* GET /v1/status: the key count and DEK counts by state, audited as the
 * read "status" like key.list. */
p11kms_status kms_status_counts(kms_core *core, kms_store_counts *out);

/* ---- key rotation (rotation.c, rewrap.c) ----
 *
 * Versions are numbered 1, 2, 3 ...; the latest wraps new DEKs, the others
 * still unwrap until min_decrypt_version passes them or they are retired.
 * Every change goes through the store's compare-and-set writes, so
 * concurrent callers (workers, nodes) never collide. */

/* Rotate: create the next KEK version in the token (same attributes,
 * label "p11kms:<name>:v<n>"), then record it as the latest version in one
 * store write.  A concurrent rotation that wins the store's
 * compare-and-set makes this one destroy its fresh object and try again
 * (a few times).  A crash between the two steps leaves an orphan object
 * with a creation intent, destroyed at a later start.  Allowed on a disabled key.
 * P11KMS_ERR_KEY_NOT_FOUND, P11KMS_ERR_BAD_REQUEST (name). */
p11kms_status kms_key_rotate(kms_core *core, const char *name, kms_key_rec **out);

/* Enable or disable key `name`; *out (may be NULL) receives the key.  A
 * disabled key issues and decrypts nothing (P11KMS_ERR_KEY_DISABLED); its
 * DEKs are untouched. */
p11kms_status kms_key_set_enabled(kms_core *core, const char *name, int enabled,
                                  kms_key_rec **out);

/* Set min_decrypt_version (0: unchanged; else 1..latest_version, else
 * P11KMS_ERR_BAD_REQUEST) and/or rotation_period in seconds (-1:
 * unchanged; 0: off; at most KMS_ROTATION_PERIOD_MAX). */
#define KMS_ROTATION_PERIOD_MAX (INT64_C(3650) * 86400) /* ten years */
p11kms_status kms_key_configure(kms_core *core, const char *name, uint32_t min_decrypt_version,
                                int64_t rotation_period, kms_key_rec **out);

/* Parse a rotation period: "<n>d", "<n>h", "<n>m", "<n>s" (n a positive
 * decimal without sign or leading zero) or "0" (off), at most
 * KMS_ROTATION_PERIOD_MAX seconds.  -1 when malformed. */
int64_t kms_rotation_period_parse(const char *s);

/* Rewrap the DEKs of key `name` that still hold a wrapped copy (active
 * and revoked ones) on a version below the latest: each is unwrapped
 * under its version (AAD with that version) and wrapped under the latest
 * (AAD with the new version) inside the token; the plaintext never leaves
 * this function and is wiped at once.  Works in batches of at most
 * KMS_REWRAP_BATCH DEKs: one store read, the token work (spread over a few
 * threads), one store write that moves each DEK only if it is unchanged.
 * max = 0 rewraps everything (one pass in id order, committing batch by
 * batch); else at most max DEKs.  Crash-safe at any point: a DEK is either
 * on its old or its new version, both decryptable.  A DEK that fails to
 * unwrap is skipped and logged (*failed).  *rewrapped: DEKs moved;
 * *remaining: DEKs still below the latest version afterwards.
 * P11KMS_ERR_KEY_NOT_FOUND, P11KMS_ERR_TOKEN_UNAVAILABLE. */
#define KMS_REWRAP_BATCH 256
p11kms_status kms_key_rewrap(kms_core *core, const char *name, uint64_t max, uint64_t *rewrapped,
                             uint64_t *remaining, uint64_t *failed);

/* Retire version `version`: first mark it destroyed in the store, in a
 * transaction that re-checks that it is not the latest and that no active
 * or revoked DEK refers to it (P11KMS_ERR_KEY_VERSION_IN_USE otherwise),
 * then destroy its token object (an interruption between the two is
 * finished at the next start).  Retiring a destroyed version again
 * succeeds (and destroys the object if it is still there).
 * P11KMS_ERR_KEY_NOT_FOUND (key or version unknown). */
p11kms_status kms_key_retire(kms_core *core, const char *name, uint32_t version,
                             kms_key_rec **out);

/* Rotate every enabled key whose rotation_period has passed since its
 * latest version was created (kmsd calls this periodically).  A key that
 * another caller rotated first is left alone.  *rotated (may be NULL)
 * receives the number of keys rotated. */
p11kms_status kms_keys_rotate_due(kms_core *core, int64_t now, size_t *rotated);

/* Generate a DEK under key `key`'s latest version, bound to `context` (a
 * JSON object of string to string, or NULL for the empty context).  The
 * DEK is durable in the store before this returns.  A latest version that
 * has wrapped max_wraps_per_version DEKs is rotated first (the store
 * refuses to count a wrap past the cap, so racing callers never exceed
 * it: the loser rotates or re-reads and wraps again). */
p11kms_status kms_dek_generate(kms_core *core, const char *key,
                               const json_t *context, kms_datakey *out);

/* Unwrap DEK `dek_id` for a caller presenting `context`.
 * P11KMS_ERR_DEK_NOT_FOUND, _CONTEXT_MISMATCH (context differs from the
 * stored one), _INTEGRITY_FAILURE (the stored wrapped bytes fail
 * authentication although the context matches), _DEK_REVOKED,
 * _DEK_DESTROYED, _KEY_DISABLED, _VERSION_BELOW_MINIMUM. */
p11kms_status kms_dek_decrypt(kms_core *core, const char *dek_id,
                              const json_t *context, kms_datakey *out);

/* The same two calls without holding the thread through the commit
 * (dekop.c; kmsd's hot path).  *out receives the op before anything can
 * complete; P11KMS_OK: done(arg) is then called exactly once, on this
 * thread before the call returns or later on the store's writer thread
 * (it must not block: hand the op on), and kms_dek_op_result gives what
 * kms_dek_generate / kms_dek_decrypt would have returned, with the same
 * audit entries and the same rule that a plaintext comes only after its
 * write is durable.  *rerun set: nothing happened (a concurrent issuer
 * filled the key version's wrap budget); run the synchronous call.  Any
 * other return: no op, done is never called.  decrypt: known is the DEK's
 * record if the caller has read it already, or NULL.  Free every op with
 * kms_dek_op_free (it wipes the plaintext). */
typedef struct kms_dek_op kms_dek_op;
typedef void (*kms_dek_op_done_fn)(void *arg);

p11kms_status kms_dek_generate_start(kms_core *core, const char *key, const json_t *context,
                                     kms_dek_op_done_fn done, void *arg, kms_dek_op **out);
p11kms_status kms_dek_decrypt_start(kms_core *core, const char *dek_id, const kms_dek_rec *known,
                                    const json_t *context, kms_dek_op_done_fn done, void *arg,
                                    kms_dek_op **out);
p11kms_status kms_dek_op_result(const kms_dek_op *op, kms_datakey *out, int *rerun);
void kms_dek_op_free(kms_dek_op *op);

/* ---- DEK lifecycle: show, list, revoke, destroy (lifecycle.c) ----
 *
 * States move active -> revoked -> destroyed, or active -> destroyed,
 * never backwards; each transition records its time (and a revoke its
 * reason).  Records returned by these functions never carry wrapped bytes
 * (wrapped_len is 0): they are metadata for people and audit.  Decrypt
 * reads the state from the store on every call, so a revocation or a
 * destroy takes effect for the very next decrypt. */

/* The DEK `dek_id`.  P11KMS_ERR_DEK_NOT_FOUND (also for a malformed id).
 * Free with kms_dek_rec_free. */
p11kms_status kms_dek_show(kms_core *core, const char *dek_id, kms_dek_rec **out);

/* A page of key `key`'s DEKs ordered by id, after `cursor` (NULL or "" for
 * the first page; else a DEK id), in `state` (kms_dek_state or -1 for
 * all), `limit` of them (0 = KMS_DEK_LIST_DEFAULT; at most
 * KMS_DEK_LIST_MAX).  next receives the cursor of the next page, or ""
 * when this is the last.  P11KMS_ERR_BAD_REQUEST (name, cursor, state,
 * limit), P11KMS_ERR_KEY_NOT_FOUND.  Free *out with kms_dek_list_free. */
p11kms_status kms_dek_list(kms_core *core, const char *key, int state, const char *cursor,
                           size_t limit, kms_dek_rec ***out, size_t *count,
                           char next[KMS_DEK_ID_LEN + 1]);

/* Revoke `dek_id` with `reason`; *out (may be NULL) receives the DEK
 * after the change.  Revoking a revoked DEK changes nothing and succeeds
 * (it keeps its first reason and time).  P11KMS_ERR_BAD_REQUEST (reason),
 * P11KMS_ERR_DEK_NOT_FOUND, P11KMS_ERR_DEK_DESTROYED. */
p11kms_status kms_dek_revoke(kms_core *core, const char *dek_id, kms_revoke_reason reason,
                             kms_dek_rec **out);

/* Destroy `dek_id` (from active or revoked): the only wrapped copy is
 * erased (kms_store_dek_destroy), the metadata kept.  *out (may be NULL)
 * receives the DEK after the change.  P11KMS_ERR_DEK_NOT_FOUND,
 * P11KMS_ERR_DEK_DESTROYED (already destroyed). */
p11kms_status kms_dek_destroy(kms_core *core, const char *dek_id, kms_dek_rec **out);

/* Revoke, in one transaction, every active DEK of `key` whose context
 * holds all the pairs of `context` (a JSON object of string values with
 * at least one pair: an empty one would match every DEK of the key and is
 * refused with P11KMS_ERR_BAD_REQUEST).  *count: DEKs revoked.
 * P11KMS_ERR_BAD_REQUEST (name, context, reason), P11KMS_ERR_KEY_NOT_FOUND. */
p11kms_status kms_dek_revoke_bulk(kms_core *core, const char *key, const json_t *context,
                                  kms_revoke_reason reason, uint64_t *count);

/* Destroy, in one transaction, every active or revoked DEK of `key`
 * matching `context` (as kms_dek_revoke_bulk).  *count: DEKs destroyed. */
p11kms_status kms_dek_destroy_bulk(kms_core *core, const char *key, const json_t *context,
                                   uint64_t *count);

/* Wipe a data key (OPENSSL_cleanse). */
void kms_datakey_clear(kms_datakey *k);

/* ---- the audit log (audit.c; docs/audit.md) ----
 *
 * Every operation above appends one audit entry (a rewrap one per
 * committed batch), allowed or failed: state changes in the same
 * transaction as the change, the others (decrypt, show, list, and
 * failures before any write) in an entry of their own that is durable
 * before the call returns: a successful operation whose entry cannot be
 * written returns P11KMS_ERR_STORE_UNAVAILABLE (P11KMS_ERR_TOKEN_UNAVAILABLE
 * when the token could not seal it) and hands out nothing.
 * kms_core_new creates the audit MAC key in the token on first start. */

/* The principal recorded for the core calls of the calling thread (copied;
 * NULL or "" = "local").  kmsd's workers set the request's principal. */
void kms_core_actor_set(const char *principal);
const char *kms_core_actor(void);

/* Append the entry of a request that never reached an operation: a
 * refusal (result P11KMS_ERR_FORBIDDEN -> "refused"), by the thread's
 * actor.  key, dek_id may be NULL.  Returns result, or
 * P11KMS_ERR_STORE_UNAVAILABLE (P11KMS_ERR_TOKEN_UNAVAILABLE: the token
 * could not seal it) when result was P11KMS_OK and the entry could not be
 * written. */
p11kms_status kms_audit_record(kms_core *core, const char *operation, const char *key,
                               const char *dek_id, p11kms_status result);

/* Up to limit (0 = KMS_AUDIT_LIST_DEFAULT, at most KMS_AUDIT_LIST_MAX)
 * entries after seq `after`, oldest first (an "audit.list" entry is
 * appended first).  *out freed with free(). */
p11kms_status kms_audit_list(kms_core *core, uint64_t after, size_t limit, kms_audit_entry **out,
                             size_t *count);

typedef struct kms_audit_report {
    int ok;             /* 1: every entry verified */
    uint64_t entries;   /* entries walked */
    uint64_t first_bad; /* ok == 0: the first entry that fails */
    char reason[200];
} kms_audit_report;

/* Walk the whole chain from entry 1 (in pages): sequence without gaps,
 * each prev_hash the previous hash, each hash recomputed, each group's
 * HMAC checked by the token, the last entry sealed and equal to the sealed
 * head.  The report says where it first breaks (docs/audit.md says what
 * can and cannot be detected).  Updates kms_core_audit_state and appends
 * an "audit.verify" entry.  P11KMS_ERR_TOKEN_UNAVAILABLE,
 * P11KMS_ERR_STORE_UNAVAILABLE when it could not look. */
p11kms_status kms_audit_verify(kms_core *core, kms_audit_report *out);

/* Verify at start: synchronously when the log has at most
 * KMS_AUDIT_START_SYNC_MAX entries, else on a thread of its own (joined
 * by kms_core_free).  A broken chain is logged loudly; kmsd keeps
 * serving. */
#define KMS_AUDIT_START_SYNC_MAX 200000
void kms_audit_startup_check(kms_core *core);

/* What the last verification found: "ok" (also before any), "broken". */
#define KMS_AUDIT_STATE_OK     0
#define KMS_AUDIT_STATE_BROKEN 1
int kms_core_audit_state(kms_core *core);

/* ---- encryption context and wrapping format (context.c, aad.c) ---- */

/* Validate `context` (NULL or a JSON object of at most
 * KMS_CONTEXT_MAX_PAIRS string values, names 1..KMS_CONTEXT_MAX_NAME and
 * values 0..KMS_CONTEXT_MAX_VALUE bytes of UTF-8) and write its canonical
 * form: compact JSON, keys sorted by byte value, no whitespace, "{}" for
 * none.  *out is freed with free().  P11KMS_ERR_BAD_REQUEST when invalid. */
p11kms_status kms_context_canonical(const json_t *context, char **out);

/* The AAD of a wrapped DEK (docs/wrapping.md): binds format version, key
 * name, key version, DEK id and canonical context.  *out freed with free().
 */
#define KMS_WRAP_FORMAT_VERSION 1
p11kms_status kms_aad_build(const char *key, uint32_t version,
                            const char *dek_id, const char *canonical_context,
                            unsigned char **out, size_t *out_len);

/* Map a CK_RV from the token layer to the service status (once, here). */
p11kms_status kms_status_from_rv(CK_RV rv);

#endif
