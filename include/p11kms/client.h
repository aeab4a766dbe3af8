/*
 * p11kms/client.h - libp11kms, the client library of p11kms.
 *
 * An application asks kmsd for a data key (DEK) bound to an encryption
 * context, seals its records locally with p11kms_seal, and stores the one
 * sealed value (it names the DEK it was sealed with).  To read a record
 * back it asks p11kms_sealed_dek_id which DEK is needed, gets it again with
 * p11kms_decrypt_data_key and the same context, and calls p11kms_open.
 * Destroying the DEK (p11kms_destroy_data_key) makes every record sealed
 * with it unrecoverable.  docs/client.md has a walk-through and the sealed
 * record format byte by byte.
 *
 * Conventions:
 *   - Every function that can fail returns a p11kms_status (P11KMS_OK == 0,
 *     p11kms_strerror() describes it).  Out-parameters come last and are
 *     written only on success.
 *   - Each _new/_open has a _free/_close; passing NULL to those is a no-op.
 *   - Threads: a p11kms_client is NOT thread-safe; use one client per
 *     thread (clients are cheap: one libcurl handle each, which keeps its
 *     connection to kmsd open between calls).  Contexts and data keys may be
 *     shared between threads for reading once built.  The library's global
 *     initialisation (libcurl) is done once, thread-safely, by the first
 *     p11kms_client_open.
 *   - Secrets: the plaintext bytes of a data key live in a buffer locked in
 *     memory (mlock, where RLIMIT_MEMLOCK allows) and excluded from core
 *     dumps, and are wiped by p11kms_data_key_free.  Response buffers that
 *     held plaintext are wiped before they are released, libcurl's and
 *     jansson's included: the first p11kms_client_open gives them wiping
 *     allocation functions.  libcurl takes those only from whoever
 *     initialises it first: open the first client before the application
 *     calls curl_global_init itself (docs/client.md).
 */
#ifndef P11KMS_CLIENT_H
#define P11KMS_CLIENT_H

#include <stddef.h>

#include <p11kms/status.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define P11KMS_WUR __attribute__((warn_unused_result))
#else
#define P11KMS_WUR
#endif

/* A DEK id is a UUID in canonical lowercase form: 36 characters. */
#define P11KMS_DEK_ID_LEN 36
/* A data key is 32 bytes (AES-256). */
#define P11KMS_DATA_KEY_LEN 32

typedef struct p11kms_client p11kms_client;
typedef struct p11kms_context p11kms_context;
typedef struct p11kms_data_key p11kms_data_key;

/* ---- connecting ---- */

/* Options of p11kms_client_open_options.  Initialise with
 * p11kms_client_options_init, then set what you need; unset (NULL / 0)
 * fields keep their defaults. */
typedef struct p11kms_client_options {
    const char *ca_file;     /* https: PEM CA bundle that signed kmsd's certificate
                                (default: the system's trust store) */
    const char *cert_file;   /* https: PEM client certificate (mutual TLS) */
    const char *key_file;    /* https: PEM private key of cert_file */
    long connect_timeout_ms; /* default 10000 */
    long timeout_ms;         /* whole request; default 60000; negative: none */
    void *reserved[8];       /* for later options without an ABI break; zeroed by _init */
} p11kms_client_options;

P11KMS_EXPORT void p11kms_client_options_init(p11kms_client_options *o);

/* Open a client for target: "unix:/path/to/kmsd.sock" or
 * "https://host:port".  No connection is made yet: the first call
 * connects, and the connection is kept for the following calls.
 * Returns P11KMS_ERR_BAD_REQUEST for a malformed target, and
 * P11KMS_ERR_NO_MEMORY / P11KMS_ERR_TRANSPORT if libcurl cannot start.
 * Free with p11kms_client_close. */
P11KMS_EXPORT P11KMS_WUR p11kms_status p11kms_client_open(const char *target, p11kms_client **out);

/* The same with options (opts may be NULL: the defaults).  The strings of
 * opts are copied. */
P11KMS_EXPORT P11KMS_WUR p11kms_status p11kms_client_open_options(const char *target,
                                                                  const p11kms_client_options *opts,
                                                                  p11kms_client **out);

P11KMS_EXPORT void p11kms_client_close(p11kms_client *c);

/* The detail of the last failed call on c: kmsd's error message
 * ("key 'customers' not found"), or the transport's ("Could not connect to
 * server").  "" after a successful call.  Valid until the next call on c. */
P11KMS_EXPORT const char *p11kms_client_error(const p11kms_client *c);

/* ---- encryption contexts ---- */

/* A set of name=value string pairs bound into a data key; the same
 * context is needed to get the key back.  Names are 1..128 bytes, values
 * 0..1024 bytes, both valid UTF-8 without NUL; at most 32 pairs. */
P11KMS_EXPORT P11KMS_WUR p11kms_context *p11kms_context_new(void); /* NULL: no memory */

/* Add name=value, replacing the value if name is already set.
 * P11KMS_ERR_BAD_REQUEST for names or values outside the limits. */
P11KMS_EXPORT P11KMS_WUR p11kms_status p11kms_context_set(p11kms_context *ctx, const char *name,
                                                          const char *value);

/* The value of name, or NULL.  Valid until ctx changes. */
P11KMS_EXPORT const char *p11kms_context_get(const p11kms_context *ctx, const char *name);

P11KMS_EXPORT void p11kms_context_free(p11kms_context *ctx);

/* ---- data keys ---- */

/* Ask kmsd for a new data key under the key-encryption key `key`, bound to
 * ctx (NULL: the empty context).  Free the result with p11kms_data_key_free.
 * Errors: the API's (key_not_found, key_disabled, forbidden, ...) and
 * P11KMS_ERR_TRANSPORT when kmsd cannot be reached. */
P11KMS_EXPORT P11KMS_WUR p11kms_status p11kms_generate_data_key(p11kms_client *c, const char *key,
                                                                const p11kms_context *ctx,
                                                                p11kms_data_key **out);

/* Get data key dek_id back; ctx must equal the context it was generated
 * with (P11KMS_ERR_CONTEXT_MISMATCH otherwise).  Other errors:
 * dek_not_found, dek_revoked, dek_destroyed, version_below_minimum, ... */
P11KMS_EXPORT P11KMS_WUR p11kms_status p11kms_decrypt_data_key(p11kms_client *c, const char *dek_id,
                                                               const p11kms_context *ctx,
                                                               p11kms_data_key **out);

/* Revoke a data key (decrypt is refused from then on).  reason is one of
 * "compromised", "superseded", "cessation", "unspecified" (NULL means
 * "unspecified").  Needs the admin permission on the key. */
P11KMS_EXPORT P11KMS_WUR p11kms_status p11kms_revoke_data_key(p11kms_client *c, const char *dek_id,
                                                              const char *reason);

/* Destroy a data key: kmsd erases its only wrapped copy, so every record
 * sealed with it becomes unrecoverable (crypto-shredding).  Needs the
 * admin permission on the key. */
P11KMS_EXPORT P11KMS_WUR p11kms_status p11kms_destroy_data_key(p11kms_client *c,
                                                               const char *dek_id);

/* The DEK id (36 characters, NUL-terminated); store it next to your data. */
P11KMS_EXPORT const char *p11kms_data_key_id(const p11kms_data_key *k);

/* The name of the key-encryption key and its version that wrap this DEK. */
P11KMS_EXPORT const char *p11kms_data_key_key_name(const p11kms_data_key *k);
P11KMS_EXPORT unsigned int p11kms_data_key_version(const p11kms_data_key *k);

/* The plaintext key bytes (P11KMS_DATA_KEY_LEN of them; *len receives the
 * length if len is not NULL).  Owned by k: valid until p11kms_data_key_free.
 * Prefer p11kms_seal / p11kms_open to using them directly. */
P11KMS_EXPORT const unsigned char *p11kms_data_key_bytes(const p11kms_data_key *k, size_t *len);

/* Wipe the key bytes and free k. */
P11KMS_EXPORT void p11kms_data_key_free(p11kms_data_key *k);

/* ---- sealed records (AES-256-GCM under a data key) ---- */

/* Bytes a sealed record adds to its plaintext: a 54-byte header
 * (magic "P11S", version 1, id length, DEK id, 12-byte nonce) and a 16-byte
 * GCM tag.  See docs/client.md for the format. */
#define P11KMS_SEAL_OVERHEAD 70

/* Seal plaintext (plaintext_len bytes, may be 0) under k with associated
 * data aad (aad_len bytes, may be NULL/0): the AAD is authenticated but not
 * stored, so the same aad must be given to p11kms_open -- use it to bind a
 * record to where it is stored (table, row, customer id).  The nonce is
 * random (OpenSSL RAND_bytes).  *out (free with free(); it holds no
 * plaintext) receives plaintext_len + P11KMS_SEAL_OVERHEAD bytes. */
P11KMS_EXPORT P11KMS_WUR p11kms_status p11kms_seal(const p11kms_data_key *k,
                                                   const unsigned char *aad, size_t aad_len,
                                                   const unsigned char *plaintext,
                                                   size_t plaintext_len, unsigned char **out,
                                                   size_t *out_len);

/* The DEK id a sealed record needs, copied into id (NUL-terminated).
 * P11KMS_ERR_BAD_REQUEST if sealed is not a sealed record of a known
 * version. */
P11KMS_EXPORT P11KMS_WUR p11kms_status p11kms_sealed_dek_id(const unsigned char *sealed,
                                                            size_t sealed_len,
                                                            char id[P11KMS_DEK_ID_LEN + 1]);

/* Open a sealed record with k (which must be the DEK named in the record)
 * and the aad it was sealed with.  *out receives the plaintext: free it
 * with p11kms_buffer_free(*out, *out_len), which wipes it first.  The
 * buffer is NUL-terminated one byte past *out_len for convenience.
 * Errors: P11KMS_ERR_BAD_REQUEST (not a sealed record, unknown version, or
 * k is not the DEK it names); P11KMS_ERR_INTEGRITY_FAILURE (the record was
 * altered, or the aad differs).  No plaintext is released on failure. */
P11KMS_EXPORT P11KMS_WUR p11kms_status p11kms_open(const p11kms_data_key *k,
                                                   const unsigned char *aad, size_t aad_len,
                                                   const unsigned char *sealed, size_t sealed_len,
                                                   unsigned char **out, size_t *out_len);

/* Wipe len bytes of p and free it.  NULL is a no-op. */
P11KMS_EXPORT void p11kms_buffer_free(void *p, size_t len);

#ifdef __cplusplus
}
#endif
#endif
