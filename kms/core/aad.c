/*
 * kms/core/aad.c - the additional authenticated data of a wrapped DEK.
 *
 * The AAD binds a wrapped DEK to its record so that wrapped bytes cannot be
 * moved to another key, version, DEK id or context (docs/wrapping.md):
 *
 *   "p11kms-dek"          10 bytes, ASCII
 *   format version        1 byte  (KMS_WRAP_FORMAT_VERSION)
 *   key name length       2 bytes, big-endian, then the name
 *   key version           4 bytes, big-endian
 *   DEK id length         2 bytes, big-endian, then the textual UUID
 *   context length        4 bytes, big-endian, then the canonical context
 *
 * Length prefixes make the encoding injective: no two different records
 * produce the same AAD.
 */
#include <stdlib.h>
#include <string.h>

#include "kms/core/core.h"

#define AAD_MAGIC "p11kms-dek"
#define AAD_MAGIC_LEN 10

static unsigned char *put_u16(unsigned char *p, size_t v)
{
    p[0] = (unsigned char)(v >> 8);
    p[1] = (unsigned char)v;
    return p + 2;
}

static unsigned char *put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
    return p + 4;
}

p11kms_status kms_aad_build(const char *key, uint32_t version, const char *dek_id,
                            const char *canonical_context, unsigned char **out, size_t *out_len)
{
    size_t key_len = strlen(key);
    size_t id_len = strlen(dek_id);
    size_t ctx_len = strlen(canonical_context);
    size_t total;
    unsigned char *buf, *p;

    if (key_len > KMS_NAME_MAX || id_len > 0xffff || ctx_len > 0xffffffffu)
        return P11KMS_ERR_BAD_REQUEST;
    total = AAD_MAGIC_LEN + 1 + 2 + key_len + 4 + 2 + id_len + 4 + ctx_len;
    buf = malloc(total);
    if (buf == NULL)
        return P11KMS_ERR_NO_MEMORY;
    p = buf;
    memcpy(p, AAD_MAGIC, AAD_MAGIC_LEN);
    p += AAD_MAGIC_LEN;
    *p++ = KMS_WRAP_FORMAT_VERSION;
    p = put_u16(p, key_len);
    memcpy(p, key, key_len);
    p += key_len;
    p = put_u32(p, version);
    p = put_u16(p, id_len);
    memcpy(p, dek_id, id_len);
    p += id_len;
    p = put_u32(p, (uint32_t)ctx_len);
    memcpy(p, canonical_context, ctx_len);
    *out = buf;
    *out_len = total;
    return P11KMS_OK;
}
