/*
 * p11kms/status.h - the one error type of p11kms.
 *
 * Every public function and every function of the service core returns a
 * p11kms_status.  Each value corresponds to one error code of the HTTP API
 * (docs/api.md); p11kms_status_code() gives that code ("dek_revoked") and
 * p11kms_status_http() the HTTP status it is answered with.  P11KMS_OK is 0.
 */
#ifndef P11KMS_STATUS_H
#define P11KMS_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

#if defined(P11KMS_BUILDING_LIBRARY)
#define P11KMS_EXPORT __attribute__((visibility("default")))
#else
#define P11KMS_EXPORT
#endif

typedef enum p11kms_status {
    P11KMS_OK = 0,
    P11KMS_ERR_BAD_REQUEST,           /* bad_request 400 */
    P11KMS_ERR_CONTEXT_MISMATCH,      /* context_mismatch 400 */
    P11KMS_ERR_UNAUTHENTICATED,       /* unauthenticated 401 */
    P11KMS_ERR_FORBIDDEN,             /* forbidden 403 */
    P11KMS_ERR_NOT_FOUND,             /* not_found 404 */
    P11KMS_ERR_METHOD_NOT_ALLOWED,    /* method_not_allowed 405 */
    P11KMS_ERR_KEY_NOT_FOUND,         /* key_not_found 404 */
    P11KMS_ERR_KEY_EXISTS,            /* key_exists 409 */
    P11KMS_ERR_KEY_VERSION_IN_USE,    /* key_version_in_use 409 */
    P11KMS_ERR_DEK_NOT_FOUND,         /* dek_not_found 404 */
    P11KMS_ERR_DEK_REVOKED,           /* dek_revoked 403 */
    P11KMS_ERR_DEK_DESTROYED,         /* dek_destroyed 410 */
    P11KMS_ERR_VERSION_BELOW_MINIMUM, /* version_below_minimum 403 */
    P11KMS_ERR_KEY_DISABLED,          /* key_disabled 403 */
    P11KMS_ERR_PAYLOAD_TOO_LARGE,     /* payload_too_large 413 */
    P11KMS_ERR_INTEGRITY_FAILURE,     /* integrity_failure 500 */
    P11KMS_ERR_INTERNAL,              /* internal 500 */
    P11KMS_ERR_TOKEN_UNAVAILABLE,     /* token_unavailable 503 */
    P11KMS_ERR_STORE_UNAVAILABLE,     /* store_unavailable 503 */
    P11KMS_ERR_OVERLOADED,            /* overloaded 503 (work queue full) */
    P11KMS_ERR_NO_MEMORY,             /* internal 500, out of memory */
    P11KMS_ERR_TRANSPORT,             /* client library: cannot reach kmsd */
    P11KMS_STATUS_COUNT
} p11kms_status;

/* Human-readable one-line description; never NULL. */
P11KMS_EXPORT const char *p11kms_strerror(p11kms_status s);

/* The API error code ("dek_revoked"); never NULL. */
P11KMS_EXPORT const char *p11kms_status_code(p11kms_status s);

/* The HTTP status the API answers this error with (200 for P11KMS_OK). */
P11KMS_EXPORT int p11kms_status_http(p11kms_status s);

/* Parse an API error code back into a status; P11KMS_ERR_INTERNAL when
 * the code is unknown. */
P11KMS_EXPORT p11kms_status p11kms_status_from_code(const char *code);

#ifdef __cplusplus
}
#endif
#endif
