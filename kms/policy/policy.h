/*
 * kms/policy/policy.h - who may do what: principals, the deny-by-default
 * policy file, bearer tokens, and an atomically replaceable slot holding
 * the policy in force (docs/operations.md, "Policy").
 *
 * A policy is a list of rules, each granting a principal pattern some of
 * the operations generate, decrypt and admin on key-name patterns, plus
 * optional bearer tokens stored as SHA-256 hashes.  Anything not granted
 * is refused.  A parsed policy is immutable and reference counted, so a
 * request keeps the policy it started with while SIGHUP installs a new
 * one (kms_policy_slot).
 *
 * The parser works on a buffer (kms_policy_parse: fuzz-friendly, no I/O)
 * and is strict: any unknown directive, operation, malformed principal or
 * pattern, duplicate token, NUL byte or over-long line fails with
 * "SOURCE:LINE: reason".
 *
 * Thread-safety: policies are read-only after parsing; references are
 * atomic; the slot has its own lock.
 */
#ifndef P11KMS_KMS_POLICY_H
#define P11KMS_KMS_POLICY_H

#include <pthread.h>
#include <stddef.h>
#include <sys/types.h>

#include "p11kms/status.h"

#define KMS_POLICY_ERR_MAX    1024
#define KMS_POLICY_MAX_BYTES  (1024 * 1024) /* whole file */
#define KMS_POLICY_MAX_LINE   4096
#define KMS_POLICY_MAX_RULES  10000
#define KMS_POLICY_MAX_TOKENS 1000
#define KMS_PRINCIPAL_MAX     160 /* "cert:" + a 64-character CN in UTF-8, with room */
#define KMS_PRINCIPAL_GROUPS  64  /* gids of a Unix peer considered by group: rules */
#define KMS_TOKEN_NAME_MAX    64
#define KMS_TOKEN_SECRET_MAX  512

/* Operation classes (bit flags). */
typedef enum kms_policy_op {
    KMS_OP_GENERATE = 1, /* POST /v1/keys/{name}/datakeys */
    KMS_OP_DECRYPT = 2,  /* POST /v1/datakeys/{id}/decrypt */
    KMS_OP_ADMIN = 4,    /* every other route except GET /v1/health */
} kms_policy_op;

/* The identity of a request. */
typedef struct kms_principal {
    char name[KMS_PRINCIPAL_MAX]; /* "uid:1000", "cert:app-1", "token:ci" */
    int unix_peer;                /* name is "uid:<n>"; gids below are valid */
    uid_t uid;
    size_t n_gids;
    gid_t gids[KMS_PRINCIPAL_GROUPS]; /* primary gid first, then supplementary */
} kms_principal;

typedef struct kms_policy kms_policy;

/* Parse policy text text[0..len) (need not be NUL-terminated).  `source`
 * names it in errors ("FILE:LINE: reason").  On success *out holds one
 * reference.  P11KMS_ERR_BAD_REQUEST with err filled, or
 * P11KMS_ERR_NO_MEMORY. */
p11kms_status kms_policy_parse(const char *text, size_t len, const char *source, kms_policy **out,
                               char *err, size_t errlen);

/* Read and parse a policy file.  The file must be a regular file that
 * group and others cannot write. */
p11kms_status kms_policy_load(const char *path, kms_policy **out, char *err, size_t errlen);

/* The built-in policy used without a [policy] file: uid:<self> and uid:0
 * may generate, decrypt and admin on every key; nobody else anything. */
p11kms_status kms_policy_default(uid_t self, kms_policy **out);

/* Reference counting; kms_policy_unref(NULL) is a no-op. */
kms_policy *kms_policy_ref(kms_policy *p);
void kms_policy_unref(kms_policy *p);

size_t kms_policy_rule_count(const kms_policy *p);
size_t kms_policy_token_count(const kms_policy *p);

/* 1 if some rule grants `who` operation `op` on key `key`.  key NULL
 * means a route tied to no key (GET /v1/keys, audit, status, metrics):
 * only a rule whose key pattern is exactly "*" grants it. */
int kms_policy_allows(const kms_policy *p, const kms_principal *who, kms_policy_op op,
                      const char *key);

/* 1 if some rule grants `who` operation `op` on at least one key pattern. */
int kms_policy_allows_any(const kms_policy *p, const kms_principal *who, kms_policy_op op);

/* Look a bearer secret up among the policy's tokens (SHA-256, compared
 * with CRYPTO_memcmp against every token, without early exit).  On a
 * match writes "token:<name>" into who (unix_peer 0) and returns 1. */
int kms_policy_token(const kms_policy *p, const char *secret, size_t len, kms_principal *who);

/* "generate", "decrypt", "admin". */
const char *kms_policy_op_name(kms_policy_op op);

/* The policy in force: a lock-protected pointer.  get returns a new
 * reference (unref it when the request is done); set installs p (taking
 * over the caller's reference) and drops the slot's reference to the old
 * one, which is freed when its last request finishes. */
typedef struct kms_policy_slot {
    pthread_mutex_t lock;
    kms_policy *current;
} kms_policy_slot;

void kms_policy_slot_init(kms_policy_slot *s);
kms_policy *kms_policy_slot_get(kms_policy_slot *s);
void kms_policy_slot_set(kms_policy_slot *s, kms_policy *p);
void kms_policy_slot_destroy(kms_policy_slot *s);

#endif
