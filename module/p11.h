/*
 * module/p11.h - the PKCS#11 token layer of p11kms.
 *
 * Owns everything that talks to the token: loading the module through
 * p11-kit (a path or a p11-kit module name), selecting the token by an
 * RFC 7512 URI (parsed by p11-kit), C_Initialize with CKF_OS_LOCKING_OK, a
 * thread-safe session pool, logging in once, the KEK objects (one AES-256
 * secret key per key version), the token RNG, and AES-GCM wrap/unwrap.
 *
 * The error type of this layer is CK_RV.  The service converts it once at
 * its edge (kms/core).  Every C_* call goes through one wrapper that logs a
 * failure with its CKR_* name.  After CKR_SESSION_HANDLE_INVALID,
 * CKR_SESSION_CLOSED, CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED,
 * CKR_TOKEN_NOT_PRESENT or CKR_OBJECT_HANDLE_INVALID the failed session and
 * the handle cache are dropped, the module is re-initialised under a lock
 * when needed, and the operation is retried once.  CKR_GENERAL_ERROR,
 * CKR_FUNCTION_FAILED or a missing object from a token that then fails
 * C_GetTokenInfo counts as CKR_TOKEN_NOT_PRESENT.  A refused login
 * (CKR_PIN_INCORRECT, CKR_PIN_LOCKED, ...) is never retried.
 *
 * Knows nothing of HTTP or SQL.  All functions are thread-safe.
 */
#ifndef P11KMS_MODULE_P11_H
#define P11KMS_MODULE_P11_H

#include <stddef.h>
#include <stdint.h>

#include <p11-kit/pkcs11.h>

#define P11_KEK_ID_LEN 16  /* CKA_ID of a KEK object: 16 random bytes */
#define P11_GCM_IV_LEN 12  /* random 96-bit IV */
#define P11_GCM_TAG_LEN 16 /* 128-bit tag */
/* A wrapped blob is IV || ciphertext || tag. */
#define P11_WRAP_OVERHEAD (P11_GCM_IV_LEN + P11_GCM_TAG_LEN)

typedef struct p11_ctx p11_ctx;

typedef struct p11_config {
    const char *module;  /* a path to a .so, or a p11-kit module name */
    const char *uri;     /* RFC 7512 URI selecting the token, e.g.
                          * "pkcs11:token=p11kms-dev" */
    const char *pin;     /* user PIN, NUL-terminated.  p11_open copies what
                          * it needs; the caller wipes its own copy. */
    size_t max_sessions; /* upper bound of pooled sessions (0: 64) */
} p11_config;

/* Load the module, initialise it, find the token and log in.
 * Refuses (CKR_PIN_LOCKED) to log in when the token flags the user PIN as
 * locked or on its final try.  On success *out owns the loaded module. */
CK_RV p11_open(const p11_config *cfg, p11_ctx **out);

/* Log out, close every session, finalise and unload.  NULL is a no-op. */
void p11_close(p11_ctx *ctx);

/* Cheap presence probe for /v1/health: CKR_OK when a pooled session
 * answers and the token itself answers C_GetTokenInfo (a session may
 * outlive the token's storage), re-initialising the module when it was
 * lost. */
CK_RV p11_probe(p11_ctx *ctx);

/* The token label, blank-padding removed, NUL-terminated. */
CK_RV p11_token_label(p11_ctx *ctx, char label[33]);

/* The slot id of the selected token. */
CK_SLOT_ID p11_slot_id(const p11_ctx *ctx);

/* The module's function list (owned by ctx; valid until p11_close).  For
 * tests and diagnostics only: the service never calls C_* itself. */
CK_FUNCTION_LIST *p11_function_list(p11_ctx *ctx);

/* Fill buf with len bytes from the token RNG (C_GenerateRandom). */
CK_RV p11_random(p11_ctx *ctx, unsigned char *buf, size_t len);

/* Generate a KEK version inside the token with C_GenerateKey: AES-256,
 * CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE true, CKA_EXTRACTABLE false,
 * CKA_ENCRYPT and CKA_DECRYPT true, no sign/verify/wrap/unwrap/derive,
 * CKA_ALLOWED_MECHANISMS = { CKM_AES_GCM }, CKA_COPYABLE and
 * CKA_MODIFIABLE true (wraps and unwraps use a session-object copy made
 * with C_CopyObject, CKA_TOKEN false: see kek.c), CKA_LABEL = label, and a
 * fresh random CKA_ID written to id. */
CK_RV p11_kek_create(p11_ctx *ctx, const char *label,
                     unsigned char id[P11_KEK_ID_LEN]);

/* The same with the caller's CKA_ID (P11_KEK_ID_LEN random bytes the
 * caller drew, e.g. with p11_random): the service records a creation
 * intent for the id before the object exists. */
CK_RV p11_kek_create_with_id(p11_ctx *ctx, const char *label,
                             const unsigned char id[P11_KEK_ID_LEN]);

/* The CKA_LABEL of the KEK object with this CKA_ID, NUL-terminated and
 * truncated to len - 1 bytes (for logs).  CKR_KEY_HANDLE_INVALID when
 * there is no such object. */
CK_RV p11_kek_label(p11_ctx *ctx, const unsigned char id[P11_KEK_ID_LEN], char *out,
                    size_t len);

/* Destroy the KEK object with this CKA_ID.  CKR_OK when it is already gone
 * is not given: a missing object is CKR_KEY_HANDLE_INVALID. */
CK_RV p11_kek_destroy(p11_ctx *ctx, const unsigned char id[P11_KEK_ID_LEN]);

/* CKR_OK when a KEK object with this CKA_ID exists in the token,
 * CKR_KEY_HANDLE_INVALID when not. */
CK_RV p11_kek_exists(p11_ctx *ctx, const unsigned char id[P11_KEK_ID_LEN]);

/* Every secret-key object whose CKA_LABEL starts with label_prefix and
 * whose CKA_ID is P11_KEK_ID_LEN bytes long (used at start to reconcile
 * orphans).  *ids is an array of *count ids, freed with free(). */
CK_RV p11_kek_list(p11_ctx *ctx, const char *label_prefix,
                   unsigned char (**ids)[P11_KEK_ID_LEN], size_t *count);

/* AES-GCM encrypt pt inside the token under the KEK with this CKA_ID, with
 * a random 96-bit IV from the token RNG and the given AAD.
 * out receives IV || ciphertext || tag (pt_len + P11_WRAP_OVERHEAD bytes);
 * *out_len is the capacity of out on entry and the length written on
 * return.  KEK handles are cached (no C_FindObjects per call). */
CK_RV p11_wrap(p11_ctx *ctx, const unsigned char kek_id[P11_KEK_ID_LEN],
               const unsigned char *aad, size_t aad_len,
               const unsigned char *pt, size_t pt_len,
               unsigned char *out, size_t *out_len);

/* Draw a DEK of dek_len bytes (1 to 64) and its IV from the token RNG in
 * one C_GenerateRandom, and wrap the DEK as p11_wrap does (one token call
 * fewer than p11_random + p11_wrap).  dek_out receives the plaintext DEK
 * (wiped on failure); blob_out receives IV || ciphertext || tag, *blob_len
 * being its capacity on entry and the length written on return. */
CK_RV p11_generate_and_wrap(p11_ctx *ctx, const unsigned char kek_id[P11_KEK_ID_LEN],
                            const unsigned char *aad, size_t aad_len, size_t dek_len,
                            unsigned char *dek_out, unsigned char *blob_out, size_t *blob_len);

/* The inverse of p11_wrap.  A blob that fails authentication (wrong AAD,
 * altered bytes, wrong key) is CKR_ENCRYPTED_DATA_INVALID, whatever the
 * module says.  *pt_len is the capacity of pt on entry.  pt is wiped on
 * failure. */
CK_RV p11_unwrap(p11_ctx *ctx, const unsigned char kek_id[P11_KEK_ID_LEN],
                 const unsigned char *aad, size_t aad_len,
                 const unsigned char *in, size_t in_len,
                 unsigned char *pt, size_t *pt_len);

/* A key object the store says exists was not found (CKR_KEY_HANDLE_INVALID
 * from p11_unwrap or p11_generate_and_wrap) although the token answers:
 * re-initialise the module to refresh its view of the token, then the
 * caller tries once more.  SoftHSM2 shared by several processes (nodes on
 * one token directory) can miss an object another process created while
 * it created its own, until it is initialised again.  At most once per 10
 * s (an object that is really gone costs one re-initialisation per
 * period): CKR_FUNCTION_REJECTED when not now, else the re-initialisation's
 * result. */
CK_RV p11_refresh(p11_ctx *ctx);

/* ---- the audit MAC key (hmac.c) ---- */

#define P11_HMAC_LEN 32 /* HMAC-SHA256 */

/* Generate the audit MAC key inside the token with C_GenerateKey
 * (CKM_GENERIC_SECRET_KEY_GEN): CKK_GENERIC_SECRET, 32 bytes, CKA_TOKEN,
 * CKA_PRIVATE, CKA_SENSITIVE true, CKA_EXTRACTABLE false, CKA_SIGN and
 * CKA_VERIFY true and no other usage, CKA_ALLOWED_MECHANISMS =
 * { CKM_SHA256_HMAC }, CKA_LABEL = label, and a fresh random CKA_ID
 * (P11_KEK_ID_LEN bytes) written to id.  Its handle is cached with the
 * KEK handles. */
CK_RV p11_hmac_key_create(p11_ctx *ctx, const char *label, unsigned char id[P11_KEK_ID_LEN]);

/* HMAC-SHA256 of data inside the token under the key with this CKA_ID.
 * CKR_KEY_HANDLE_INVALID when there is no such key. */
CK_RV p11_hmac_sign(p11_ctx *ctx, const unsigned char id[P11_KEK_ID_LEN],
                    const unsigned char *data, size_t len, unsigned char mac[P11_HMAC_LEN]);

/* CKR_OK when mac is the HMAC-SHA256 of data under that key (checked by
 * the token), CKR_SIGNATURE_INVALID when it is not, another CK_RV when
 * the token could not say. */
CK_RV p11_hmac_verify(p11_ctx *ctx, const unsigned char id[P11_KEK_ID_LEN],
                      const unsigned char *data, size_t len, const unsigned char mac[P11_HMAC_LEN]);

/* Read the user PIN: from the environment variable P11KMS_PIN when set
 * and non-empty, else from pin_file, which must be a regular file owned
 * by the caller's uid (or root) with no group/other permission bits
 * (mode 0600 or stricter), else CKR_ARGUMENTS_BAD with a logged reason.
 * A trailing newline is stripped.  Empty PINs are refused.  *pin is
 * NUL-terminated, mlocked where possible, and must be released with
 * p11_pin_free, which wipes it.  P11KMS_PIN is unset after reading. */
CK_RV p11_pin_load(const char *pin_file, char **pin);
void p11_pin_free(char *pin);

/* ---- call statistics (stats.c), for /metrics ---- */

#define P11_STATS_BUCKETS    10 /* latency buckets, upper bounds in p11_stats_bounds_us */
#define P11_STATS_MAX_ERRORS 16 /* distinct CK_RVs counted by name */
#define P11_STATS_MAX_FNS    24 /* functions reported (those called, in list order) */

/* Upper bounds (microseconds) of the latency buckets; +Inf is implied. */
extern const uint64_t p11_stats_bounds_us[P11_STATS_BUCKETS];

typedef struct p11_fn_stats {
    const char *fn;                     /* "C_Encrypt" (static) */
    uint64_t calls;                     /* every call, failed or not */
    uint64_t sum_us;                    /* total latency */
    uint64_t bucket[P11_STATS_BUCKETS]; /* calls <= bound (cumulative) */
} p11_fn_stats;

typedef struct p11_stats {
    p11_fn_stats fns[P11_STATS_MAX_FNS];
    size_t n_fns;
    struct {
        CK_RV rv;
        uint64_t count;
    } errors[P11_STATS_MAX_ERRORS]; /* failed calls by CK_RV */
    size_t n_errors;
    uint64_t errors_other; /* failures of further CK_RVs */
} p11_stats;

/* A snapshot of the C_* calls made through ctx since p11_open: count and
 * latency histogram per function, failures by CK_RV.  The counters are
 * relaxed atomics (no lock on the call path); a snapshot taken during
 * calls may be off by the calls in flight. */
void p11_stats_get(p11_ctx *ctx, p11_stats *out);

/* "CKR_DEVICE_ERROR" for CKR_DEVICE_ERROR; "CKR_UNKNOWN" for a value it
 * does not know.  Never NULL. */
const char *p11_rv_name(CK_RV rv);

/* True for the CK_RVs that mean the token (not the request) failed:
 * the caller reports token_unavailable. */
int p11_rv_is_token_failure(CK_RV rv);

#endif
