/*
 * kms/core/errors.c - names, messages and HTTP statuses of p11kms_status.
 *
 * One table, indexed by the enum, so the API error codes of docs/api.md,
 * the HTTP statuses and the client library's p11kms_strerror can never
 * disagree.  The client library compiles this file too.
 */
#include <string.h>

#include "p11kms/status.h"

struct status_entry {
    const char *code;
    int http;
    const char *message;
};

static const struct status_entry status_table[P11KMS_STATUS_COUNT] = {
    [P11KMS_OK] = {"ok", 200, "success"},
    [P11KMS_ERR_BAD_REQUEST] = {"bad_request", 400, "the request is malformed"},
    [P11KMS_ERR_CONTEXT_MISMATCH] = {"context_mismatch", 400,
                                     "the encryption context does not match the data key's"},
    [P11KMS_ERR_UNAUTHENTICATED] = {"unauthenticated", 401, "missing or invalid credentials"},
    [P11KMS_ERR_FORBIDDEN] = {"forbidden", 403, "the policy does not allow this operation"},
    [P11KMS_ERR_NOT_FOUND] = {"not_found", 404, "no such route"},
    [P11KMS_ERR_METHOD_NOT_ALLOWED] = {"method_not_allowed", 405,
                                       "the route does not accept this method"},
    [P11KMS_ERR_KEY_NOT_FOUND] = {"key_not_found", 404, "no such key"},
    [P11KMS_ERR_KEY_EXISTS] = {"key_exists", 409, "a key with this name exists"},
    [P11KMS_ERR_KEY_VERSION_IN_USE] = {"key_version_in_use", 409,
                                       "live data keys still use this key version"},
    [P11KMS_ERR_DEK_NOT_FOUND] = {"dek_not_found", 404, "no such data key"},
    [P11KMS_ERR_DEK_REVOKED] = {"dek_revoked", 403, "the data key is revoked"},
    [P11KMS_ERR_DEK_DESTROYED] = {"dek_destroyed", 410, "the data key is destroyed"},
    [P11KMS_ERR_VERSION_BELOW_MINIMUM] = {"version_below_minimum", 403,
                                          "the data key's key version is below the minimum"},
    [P11KMS_ERR_KEY_DISABLED] = {"key_disabled", 403, "the key is disabled"},
    [P11KMS_ERR_PAYLOAD_TOO_LARGE] = {"payload_too_large", 413, "the request body is too large"},
    [P11KMS_ERR_INTEGRITY_FAILURE] = {"integrity_failure", 500,
                                      "the stored wrapped key failed authentication"},
    [P11KMS_ERR_INTERNAL] = {"internal", 500, "internal error"},
    [P11KMS_ERR_TOKEN_UNAVAILABLE] = {"token_unavailable", 503, "the token is unavailable"},
    [P11KMS_ERR_STORE_UNAVAILABLE] = {"store_unavailable", 503, "the store is unavailable"},
    [P11KMS_ERR_OVERLOADED] = {"overloaded", 503, "the server is busy; retry later"},
    [P11KMS_ERR_NO_MEMORY] = {"internal", 500, "out of memory"},
    [P11KMS_ERR_TRANSPORT] = {"transport", 503, "cannot reach kmsd"},
};

static const struct status_entry *entry(p11kms_status s)
{
    if ((int)s < 0 || s >= P11KMS_STATUS_COUNT || status_table[s].code == NULL)
        return &status_table[P11KMS_ERR_INTERNAL];
    return &status_table[s];
}

const char *p11kms_strerror(p11kms_status s)
{
    return entry(s)->message;
}

const char *p11kms_status_code(p11kms_status s)
{
    return entry(s)->code;
}

int p11kms_status_http(p11kms_status s)
{
    return entry(s)->http;
}

p11kms_status p11kms_status_from_code(const char *code)
{
    if (code == NULL)
        return P11KMS_ERR_INTERNAL;
    for (int i = 0; i < P11KMS_STATUS_COUNT; i++)
        if (status_table[i].code != NULL && strcmp(status_table[i].code, code) == 0)
            return (p11kms_status)i;
    return P11KMS_ERR_INTERNAL;
}
