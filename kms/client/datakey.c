/*
 * kms/client/datakey.c - data keys of libp11kms: generate, decrypt, revoke
 * and destroy through kmsd, and the p11kms_data_key object.
 *
 * The plaintext arrives base64 in a JSON reply.  It is decoded straight
 * into the key's locked buffer (secmem.c); jansson's copy of the string is
 * wiped in place before the reply is freed, and the raw response buffer is
 * wiped by kms_client_call.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "kms/client/internal.h"

/* Base64 of 32 bytes decodes into at most 33 bytes before padding is
 * taken off; the locked buffer is a page anyway. */
#define KEY_BUF_LEN 64

struct p11kms_data_key {
    char id[P11KMS_DEK_ID_LEN + 1];
    char key[65];
    unsigned int version;
    unsigned char *bytes; /* kms_secure_alloc(KEY_BUF_LEN) */
    size_t len;
};

int kms_valid_dek_id(const char *id)
{
    if (id == NULL || strlen(id) != P11KMS_DEK_ID_LEN)
        return 0;
    for (int i = 0; i < P11KMS_DEK_ID_LEN; i++) {
        char ch = id[i];
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            if (ch != '-')
                return 0;
        } else if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))) {
            return 0;
        }
    }
    return 1;
}

/* A DEK id refused before any request (kmsd would say the same). */
static p11kms_status bad_id(p11kms_client *c)
{
    kms_client_set_error(c, "bad_request", "dek_id must be a UUID in canonical lowercase form");
    return P11KMS_ERR_BAD_REQUEST;
}

void kms_json_wipe_string(json_t *s)
{
    const char *v = json_string_value(s);

    if (v != NULL)
        OPENSSL_cleanse((void *)v, json_string_length(s));
}

void p11kms_data_key_free(p11kms_data_key *k)
{
    if (k == NULL)
        return;
    kms_secure_free(k->bytes, KEY_BUF_LEN);
    OPENSSL_cleanse(k, sizeof(*k));
    free(k);
}

static p11kms_data_key *data_key_alloc(void)
{
    p11kms_data_key *k = calloc(1, sizeof(*k));

    if (k == NULL)
        return NULL;
    if ((k->bytes = kms_secure_alloc(KEY_BUF_LEN)) == NULL) {
        free(k);
        return NULL;
    }
    return k;
}

p11kms_status kms_data_key_new(const char *dek_id, const char *key, unsigned int version,
                               const unsigned char *bytes, size_t len, p11kms_data_key **out)
{
    p11kms_data_key *k;

    if (!kms_valid_dek_id(dek_id) || key == NULL || strlen(key) > 64 || bytes == NULL ||
        len != P11KMS_DATA_KEY_LEN || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if ((k = data_key_alloc()) == NULL)
        return P11KMS_ERR_NO_MEMORY;
    snprintf(k->id, sizeof(k->id), "%s", dek_id);
    snprintf(k->key, sizeof(k->key), "%s", key);
    k->version = version;
    memcpy(k->bytes, bytes, len);
    k->len = len;
    *out = k;
    return P11KMS_OK;
}

/* Build a data key from a generate/decrypt reply; wipes its plaintext. */
static p11kms_status from_reply(p11kms_client *c, json_t *reply, p11kms_data_key **out)
{
    p11kms_status rv = P11KMS_ERR_INTERNAL;
    p11kms_data_key *k = NULL;
    json_t *plain = json_object_get(reply, "plaintext");
    const char *id = json_string_value(json_object_get(reply, "dek_id"));
    const char *key = json_string_value(json_object_get(reply, "key"));
    json_int_t version = json_integer_value(json_object_get(reply, "version"));
    const char *b64 = json_string_value(plain);
    size_t b64_len = json_string_length(plain);
    int n;

    if (!kms_valid_dek_id(id) || key == NULL || strlen(key) > 64 || b64 == NULL || b64_len != 44 ||
        version < 1 || version > 0xffffffffLL) {
        kms_client_set_error(c, "internal", "kmsd's data key reply is malformed");
        goto out;
    }
    if ((k = data_key_alloc()) == NULL) {
        rv = P11KMS_ERR_NO_MEMORY;
        kms_client_set_error(c, "internal", "out of memory");
        goto out;
    }
    /* 44 characters ending in one '=' are exactly 32 bytes. */
    n = EVP_DecodeBlock(k->bytes, (const unsigned char *)b64, (int)b64_len);
    if (n != 33 || b64[43] != '=' || b64[42] == '=') {
        kms_client_set_error(c, "internal", "kmsd's data key is not 32 bytes of base64");
        goto out;
    }
    k->bytes[32] = 0;
    k->len = P11KMS_DATA_KEY_LEN;
    snprintf(k->id, sizeof(k->id), "%s", id);
    snprintf(k->key, sizeof(k->key), "%s", key);
    k->version = (unsigned int)version;
    *out = k;
    k = NULL;
    rv = P11KMS_OK;
out:
    kms_json_wipe_string(plain);
    p11kms_data_key_free(k);
    return rv;
}

/* Body {"context":{...}} (or {} without a context). */
static json_t *context_body(const p11kms_context *ctx)
{
    json_t *body = json_object();

    if (body == NULL)
        return NULL;
    if (ctx != NULL && json_object_set(body, "context", (json_t *)kms_context_json(ctx)) != 0) {
        json_decref(body);
        return NULL;
    }
    return body;
}

static p11kms_status datakey_call(p11kms_client *c, const char *path, const p11kms_context *ctx,
                                  p11kms_data_key **out)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    json_t *body = NULL, *reply = NULL;

    if ((body = context_body(ctx)) == NULL) {
        kms_client_set_error(c, "internal", "out of memory");
        goto out;
    }
    if ((rv = kms_client_call(c, "POST", path, body, NULL, &reply)) != P11KMS_OK)
        goto out;
    rv = from_reply(c, reply, out);
out:
    json_decref(reply);
    json_decref(body);
    return rv;
}

p11kms_status p11kms_generate_data_key(p11kms_client *c, const char *key, const p11kms_context *ctx,
                                       p11kms_data_key **out)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    char *name = NULL, *path = NULL;

    if (c == NULL || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (key == NULL || key[0] == '\0') {
        kms_client_set_error(c, "bad_request", "no key name");
        return P11KMS_ERR_BAD_REQUEST;
    }
    if ((name = kms_path_escape(key)) == NULL ||
        asprintf(&path, "/v1/keys/%s/datakeys", name) < 0) {
        path = NULL;
        goto out;
    }
    rv = datakey_call(c, path, ctx, out);
out:
    free(path);
    free(name);
    return rv;
}

p11kms_status p11kms_decrypt_data_key(p11kms_client *c, const char *dek_id,
                                      const p11kms_context *ctx, p11kms_data_key **out)
{
    char path[96];

    if (c == NULL || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (!kms_valid_dek_id(dek_id))
        return bad_id(c);
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", dek_id);
    return datakey_call(c, path, ctx, out);
}

p11kms_status p11kms_revoke_data_key(p11kms_client *c, const char *dek_id, const char *reason)
{
    p11kms_status rv;
    char path[96];
    json_t *body;

    if (c == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (!kms_valid_dek_id(dek_id))
        return bad_id(c);
    snprintf(path, sizeof(path), "/v1/datakeys/%s/revoke", dek_id);
    if ((body = json_pack("{s:s}", "reason", reason != NULL ? reason : "unspecified")) == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    rv = kms_client_call(c, "POST", path, body, NULL, NULL);
    json_decref(body);
    return rv;
}

p11kms_status p11kms_destroy_data_key(p11kms_client *c, const char *dek_id)
{
    char path[96];

    if (c == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (!kms_valid_dek_id(dek_id))
        return bad_id(c);
    snprintf(path, sizeof(path), "/v1/datakeys/%s", dek_id);
    return kms_client_call(c, "DELETE", path, NULL, NULL, NULL);
}

const char *p11kms_data_key_id(const p11kms_data_key *k)
{
    return k != NULL ? k->id : NULL;
}

const char *p11kms_data_key_key_name(const p11kms_data_key *k)
{
    return k != NULL ? k->key : NULL;
}

unsigned int p11kms_data_key_version(const p11kms_data_key *k)
{
    return k != NULL ? k->version : 0;
}

const unsigned char *p11kms_data_key_bytes(const p11kms_data_key *k, size_t *len)
{
    if (k == NULL)
        return NULL;
    if (len != NULL)
        *len = k->len;
    return k->bytes;
}
