/*
 * kms/core/core.h - the p11kms service core: keys and data keys.
 *
 * The core ties the token layer (module/p11.h) to the store
 * (kms/store/store.h).  It validates names and encryption contexts,
 * generates and wraps DEKs inside the token, and converts CK_RV into
 * p11kms_status exactly once (keeping the CKR_* name for the log).
 *
 * Ordering rules that make crashes safe: a KEK object exists in the token
 * before the store refers to it (orphans are destroyed at start by
 * kms_core_new); a DEK is returned only after its store row is durable.
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

/* Create the core over an open token and store (both stay owned by the
 * caller and must outlive the core), and reconcile orphan KEK objects:
 * token objects labelled "p11kms:" that the store does not refer to are
 * destroyed (they are left over from a crash between C_GenerateKey and
 * the store commit; no DEK was ever wrapped by them). */
p11kms_status kms_core_new(p11_ctx *token, kms_store *store, kms_core **out);
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

/* Generate a DEK under key `key`'s latest version, bound to `context` (a
 * JSON object of string to string, or NULL for the empty context).  The
 * DEK is durable in the store before this returns. */
p11kms_status kms_dek_generate(kms_core *core, const char *key,
                               const json_t *context, kms_datakey *out);

/* Unwrap DEK `dek_id` for a caller presenting `context`.
 * P11KMS_ERR_DEK_NOT_FOUND, _CONTEXT_MISMATCH (context differs from the
 * stored one), _INTEGRITY_FAILURE (the stored wrapped bytes fail
 * authentication although the context matches), _DEK_REVOKED,
 * _DEK_DESTROYED, _KEY_DISABLED, _VERSION_BELOW_MINIMUM. */
p11kms_status kms_dek_decrypt(kms_core *core, const char *dek_id,
                              const json_t *context, kms_datakey *out);

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
