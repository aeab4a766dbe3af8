/*
 * kms/client/internal.h - internals of libp11kms shared by its files and by
 * kmsctl (which links the static build of the same objects, so the CLI and
 * the library use one request function and one transport).
 *
 * Nothing here is exported from libp11kms.so (-fvisibility=hidden).
 */
#ifndef P11KMS_CLIENT_INTERNAL_H
#define P11KMS_CLIENT_INTERNAL_H

#include <stddef.h>

#include <jansson.h>

#include "p11kms/client.h"

/* Longest response body accepted (a page of DEK listing, audit entries). */
#define KMS_CLIENT_MAX_RESPONSE (64u * 1024u * 1024u)

/* Limits of an encryption context (docs/api.md). */
#define KMS_CONTEXT_MAX_PAIRS 32
#define KMS_CONTEXT_NAME_MAX  128
#define KMS_CONTEXT_VALUE_MAX 1024

/* One HTTP request to kmsd on c's connection.  method "GET", "POST",
 * "DELETE"; path starts with '/' and is already escaped (kms_path_escape);
 * body (may be NULL: no body) is sent as compact JSON.  On a 2xx answer
 * returns P11KMS_OK and, when reply is not NULL, the parsed body (NULL if
 * the body was empty).  Otherwise returns the API error's status and
 * records its code and message (p11kms_client_error, kms_client_error_code).
 * The raw response buffer is wiped before it is reused or freed.
 * *http_status (may be NULL) receives the HTTP status, 0 when none came. */
p11kms_status kms_client_call(p11kms_client *c, const char *method, const char *path,
                              const json_t *body, long *http_status, json_t **reply);

/* The API error code of the last failed call as kmsd spelled it
 * ("not_found", "transport" when kmsd could not be reached); "" after a
 * success.  Unlike p11kms_status_code it keeps codes this build does not
 * know. */
const char *kms_client_error_code(const p11kms_client *c);

/* How many connections c has opened so far (connection reuse check). */
long kms_client_connections(const p11kms_client *c);

/* Record a local failure on c (code and printf-style message). */
void kms_client_set_error(p11kms_client *c, const char *code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* 1 if id is a UUID in canonical lowercase form. */
int kms_valid_dek_id(const char *id);

/* Percent-escape one path segment (malloc'ed, free()); NULL on no memory. */
char *kms_path_escape(const char *segment);

/* The context as a JSON object (borrowed; never NULL for a valid ctx). */
const json_t *kms_context_json(const p11kms_context *ctx);

/* Build a data key from its parts (copies bytes into locked memory). */
p11kms_status kms_data_key_new(const char *dek_id, const char *key, unsigned int version,
                               const unsigned char *bytes, size_t len, p11kms_data_key **out);

/* Wipe the characters of a JSON string in place (the plaintext field of a
 * reply) so jansson frees wiped memory. */
void kms_json_wipe_string(json_t *s);

/* 1 if libcurl allocates through the wiping allocator (kms/core/wipe.h):
 * the library initialised libcurl first in this process.  0 when the
 * application had initialised it before (then libcurl's freed receive
 * buffers are not wiped).  Initialises the library. */
int kms_client_wipes_libcurl(void);

/* Page-aligned memory locked in RAM where possible and excluded from core
 * dumps; kms_secure_free wipes it.  len must be the same in both. */
void *kms_secure_alloc(size_t len);
void kms_secure_free(void *p, size_t len);

#endif
