/*
 * kms/core/internal.h - helpers shared by the files of kms/core only.
 */
#ifndef P11KMS_KMS_CORE_INTERNAL_H
#define P11KMS_KMS_CORE_INTERNAL_H

#include "kms/core/core.h"

/* The version record `version` of key, or NULL. */
const kms_version_rec *kms_key_find_version(const kms_key_rec *key, uint32_t version);

/* Write the CKA_LABEL of a key version: "p11kms:<name>:v<version>". */
void kms_kek_label(const char *name, uint32_t version, char *out, size_t len);

/* Create the token object of version `version` of key `name` behind a
 * creation intent: draw a random CKA_ID into id, record the intent
 * (durable), then generate the object with that id.  On failure nothing
 * is left behind (or, if even the clean-up fails, an intent that the next
 * start reconciles).  The caller's store write that records the version
 * deletes the intent; if that write fails or does not happen, the caller
 * calls kms_kek_abandon. */
p11kms_status kms_kek_begin(kms_core *core, const char *name, uint32_t version,
                            unsigned char id[KMS_TOKEN_ID_LEN]);

/* Best effort: destroy the object of a creation that will not be
 * recorded, then delete its intent.  When the object cannot be destroyed
 * the intent stays, so the next start destroys the object. */
void kms_kek_abandon(kms_core *core, const unsigned char id[KMS_TOKEN_ID_LEN], const char *name,
                     uint32_t version);

/* Grace period of creation intents at start (kms_core_options). */
int64_t kms_core_intent_grace(const kms_core *core);

/* A time-ordered (version 7: ms timestamp + 74 random bits) UUID in
 * canonical lowercase text form. */
p11kms_status kms_uuid_new(char out[KMS_DEK_ID_LEN + 1]);

/* The core's options (after defaults) and test hooks. */
uint64_t kms_core_max_wraps(const kms_core *core);
unsigned kms_core_rewrap_threads(const kms_core *core);
const kms_core_test_hooks *kms_core_hooks(const kms_core *core);

/* Serialise the rotations of this process (held across C_GenerateKey and
 * the store write; never while holding anything else). */
void kms_core_rotate_lock(kms_core *core);
void kms_core_rotate_unlock(kms_core *core);

/* Rotate key `name` only if its latest version is still expected_latest:
 * under kms_core_rotate_lock, re-read the key (another thread of this
 * process may have rotated it meanwhile: then nothing is created), create
 * the object, record it with the store's compare-and-set (which settles
 * races with other processes and nodes).  expected_latest 0: from the
 * latest version read under the lock (an explicit rotate).
 * *rotated: the new version, or 0 when latest had moved (the fresh
 * object is then destroyed).  The "key.rotate" audit entry commits with
 * the new version: audit is the caller's entry (an explicit rotate, which
 * settles it), or NULL for an automatic rotation (its own entry, written
 * only with the version). */
p11kms_status kms_key_rotate_from(kms_core *core, const char *name, uint32_t expected_latest,
                                  uint32_t *rotated, kms_audit_entry *audit);

/* ---- data keys (deks.c), shared by the synchronous and the
 * asynchronous (dekop.c) forms ---- */

/* One attempt of generate up to the store write: read key `key`, check
 * it, generate a fresh DEK and wrap it under the latest version into dek
 * (dek->id set by the caller; dek->context points at canonical) and
 * plaintext (wiped on error).  *full is the latest version's number when
 * it has wrapped its budget (nothing generated: rotate and try again). */
p11kms_status kms_dek_wrap_attempt(kms_core *core, const char *key, char *canonical,
                                   kms_dek_rec *dek, unsigned char plaintext[KMS_DEK_LEN],
                                   uint32_t *full);

/* Decrypt up to its audit entry: the state, key and context checks, then
 * the unwrap into result (wiped on error); ae gets the DEK's key and
 * version.  known: the DEK's record when the caller has already read it
 * (kmsd's authorization did), or NULL to read it here. */
p11kms_status kms_dek_unwrap_checked(kms_core *core, const char *dek_id,
                                     const kms_dek_rec *known, const char *canonical,
                                     kms_audit_entry *ae, kms_datakey *result);

/* ---- audit (audit.c) ---- */

/* An entry of `operation` by the thread's actor, its result to be taken
 * from the store write it is attached to (result_from_write). */
void kms_audit_entry_init(kms_audit_entry *e, const char *operation, const char *key,
                          uint32_t version, const char *dek_id);

/* The end of every operation: unless e was committed with a write, append
 * it alone with outcome rv.  Returns rv, or STORE_UNAVAILABLE when rv was
 * P11KMS_OK and the entry could not be written (fail closed). */
p11kms_status kms_audit_settle(kms_core *core, kms_audit_entry *e, p11kms_status rv);

/* The entry of kms_audit_settle, made ready to append (its result from rv). */
void kms_audit_settle_prepare(kms_audit_entry *e, p11kms_status rv);

/* Get or create the MAC key (id receives its CKA_ID) and attach the MAC
 * callback to the store. */
p11kms_status kms_audit_open(kms_core *core, unsigned char id[KMS_TOKEN_ID_LEN]);

/* kms_audit_verify without its own entry (start-up check). */
p11kms_status kms_audit_verify_chain(kms_core *core, kms_audit_report *out);

const unsigned char *kms_core_audit_key_id(const kms_core *core);
void kms_core_audit_state_set(kms_core *core, int state);

#endif
