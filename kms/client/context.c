/*
 * kms/client/context.c - encryption contexts of libp11kms.
 *
 * A p11kms_context is a JSON object of string to string (jansson), checked
 * against the API's limits as pairs are set, so a request is refused here
 * rather than by kmsd.  Canonical ordering is kmsd's business: it compares
 * contexts in canonical form, so key order here does not matter.
 */
#include <stdlib.h>
#include <string.h>

#include "kms/client/internal.h"

struct p11kms_context {
    json_t *obj;
};

p11kms_context *p11kms_context_new(void)
{
    p11kms_context *ctx = calloc(1, sizeof(*ctx));

    if (ctx == NULL)
        return NULL;
    if ((ctx->obj = json_object()) == NULL) {
        free(ctx);
        return NULL;
    }
    return ctx;
}

p11kms_status p11kms_context_set(p11kms_context *ctx, const char *name, const char *value)
{
    json_t *v;
    size_t nlen, vlen;

    if (ctx == NULL || name == NULL || value == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    nlen = strlen(name);
    vlen = strlen(value);
    if (nlen == 0 || nlen > KMS_CONTEXT_NAME_MAX || vlen > KMS_CONTEXT_VALUE_MAX)
        return P11KMS_ERR_BAD_REQUEST;
    if (json_object_get(ctx->obj, name) == NULL &&
        json_object_size(ctx->obj) >= KMS_CONTEXT_MAX_PAIRS)
        return P11KMS_ERR_BAD_REQUEST;
    /* json_string refuses invalid UTF-8: probe the name, then the value. */
    if ((v = json_string(name)) == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    json_decref(v);
    if ((v = json_string(value)) == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (json_object_set_new(ctx->obj, name, v) != 0)
        return P11KMS_ERR_NO_MEMORY;
    return P11KMS_OK;
}

const char *p11kms_context_get(const p11kms_context *ctx, const char *name)
{
    if (ctx == NULL || name == NULL)
        return NULL;
    return json_string_value(json_object_get(ctx->obj, name));
}

void p11kms_context_free(p11kms_context *ctx)
{
    if (ctx == NULL)
        return;
    json_decref(ctx->obj);
    free(ctx);
}

const json_t *kms_context_json(const p11kms_context *ctx)
{
    return ctx != NULL ? ctx->obj : NULL;
}
