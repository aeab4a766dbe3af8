/*
 * kms/core/context.c - validation and canonical form of encryption contexts.
 *
 * A context is a JSON object of string to string.  Its canonical form is
 * bound into every wrapped DEK's AAD, so it must stay byte-for-byte stable
 * forever: it is defined here (docs/wrapping.md) rather than left to a JSON
 * library's serialiser, whose escaping rules may change between releases.
 *
 * Canonical form: '{', then the pairs sorted by name in byte order, each
 * "name":"value" with ',' between pairs, then '}'; no whitespace.  In names
 * and values '"' and '\' are escaped as \" and \\, bytes below 0x20 as
 * \u00xx (lowercase hex), every other byte (UTF-8 already validated by the
 * JSON parser) is copied as is.  The empty context is "{}".
 */
#include <stdlib.h>
#include <string.h>

#include "kms/core/core.h"

struct pair {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
};

static int pair_cmp(const void *a, const void *b)
{
    const struct pair *pa = a;
    const struct pair *pb = b;
    size_t n = pa->name_len < pb->name_len ? pa->name_len : pb->name_len;
    int c = memcmp(pa->name, pb->name, n);
    if (c != 0)
        return c;
    return (pa->name_len > pb->name_len) - (pa->name_len < pb->name_len);
}

/* Bytes the escaped form of s takes. */
static size_t escaped_len(const char *s, size_t len)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            n += 2;
        else if (c < 0x20)
            n += 6;
        else
            n += 1;
    }
    return n;
}

static char *append_escaped(char *p, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    *p++ = '"';
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') {
            *p++ = '\\';
            *p++ = (char)c;
        } else if (c < 0x20) {
            memcpy(p, "\\u00", 4);
            p[4] = hex[c >> 4];
            p[5] = hex[c & 0xf];
            p += 6;
        } else {
            *p++ = (char)c;
        }
    }
    *p++ = '"';
    return p;
}

p11kms_status kms_context_canonical(const json_t *context, char **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    struct pair *pairs = NULL;
    size_t n = 0, total = 2, i = 0;
    const char *name;
    json_t *value;
    char *buf = NULL, *p;

    if (context == NULL || json_is_null(context)) {
        buf = strdup("{}");
        if (buf == NULL) {
            rv = P11KMS_ERR_NO_MEMORY;
            goto out;
        }
        rv = P11KMS_OK;
        goto out;
    }
    if (!json_is_object(context))
        goto out;
    n = json_object_size(context);
    if (n > KMS_CONTEXT_MAX_PAIRS)
        goto out;
    if (n > 0) {
        pairs = calloc(n, sizeof(*pairs));
        if (pairs == NULL) {
            rv = P11KMS_ERR_NO_MEMORY;
            goto out;
        }
    }
    json_object_foreach((json_t *)context, name, value) {
        size_t name_len = strlen(name);
        if (!json_is_string(value) || name_len == 0 || name_len > KMS_CONTEXT_MAX_NAME)
            goto out;
        pairs[i].name = name;
        pairs[i].name_len = name_len;
        pairs[i].value = json_string_value(value);
        pairs[i].value_len = json_string_length(value);
        if (pairs[i].value_len > KMS_CONTEXT_MAX_VALUE ||
            memchr(pairs[i].value, '\0', pairs[i].value_len) != NULL)
            goto out;
        total += escaped_len(name, name_len) + escaped_len(pairs[i].value, pairs[i].value_len) +
                 6; /* two pairs of quotes, ':' and ',' */
        i++;
    }
    if (total > KMS_CONTEXT_MAX_BYTES)
        goto out;
    if (n > 1)
        qsort(pairs, n, sizeof(*pairs), pair_cmp);
    buf = malloc(total + 1);
    if (buf == NULL) {
        rv = P11KMS_ERR_NO_MEMORY;
        goto out;
    }
    p = buf;
    *p++ = '{';
    for (i = 0; i < n; i++) {
        if (i > 0)
            *p++ = ',';
        p = append_escaped(p, pairs[i].name, pairs[i].name_len);
        *p++ = ':';
        p = append_escaped(p, pairs[i].value, pairs[i].value_len);
    }
    *p++ = '}';
    *p = '\0';
    rv = P11KMS_OK;
out:
    free(pairs);
    if (rv == P11KMS_OK)
        *out = buf;
    else
        free(buf);
    return rv;
}
