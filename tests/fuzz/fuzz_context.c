/*
 * tests/fuzz/fuzz_context.c - libFuzzer target for the canonical form of
 * encryption contexts (kms_context_canonical, kms/core/context.c), which
 * is bound into every wrapped DEK's AAD and so must be exact.
 *
 * The input is parsed as JSON (as kmsd parses a request body) and
 * canonicalised.  Invariants when it is accepted: the canonical text is
 * JSON, parses back to an object equal to the input (same pairs), has no
 * whitespace outside strings, fits KMS_CONTEXT_MAX_BYTES, and
 * canonicalising it again gives the same bytes (idempotence); a context
 * with its pairs inserted in reverse order gives the same bytes too.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "fuzz_util.h"
#include "kms/core/core.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The same pairs, inserted in the opposite order of iteration. */
static json_t *reversed(const json_t *obj)
{
    size_t n = json_object_size(obj), i = 0;
    const char **keys = calloc(n + 1, sizeof(*keys));
    json_t *out = json_object(), *v;
    const char *k;

    FUZZ_ASSERT(keys != NULL && out != NULL);
    json_object_foreach((json_t *)obj, k, v) keys[i++] = k;
    while (i > 0) {
        i--;
        json_object_set(out, keys[i], json_object_get(obj, keys[i]));
    }
    free(keys);
    return out;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_t *in, *back = NULL, *rev = NULL;
    char *canon = NULL, *again = NULL, *canon_rev = NULL;
    p11kms_status s;
    int in_string = 0;

    in = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY, NULL);
    if (in == NULL)
        return 0;
    s = kms_context_canonical(in, &canon);
    if (s != P11KMS_OK) {
        FUZZ_ASSERT(s == P11KMS_ERR_BAD_REQUEST);
        FUZZ_ASSERT(!json_is_null(in)); /* null is the empty context */
        goto out;
    }
    FUZZ_ASSERT(canon != NULL && strlen(canon) <= KMS_CONTEXT_MAX_BYTES);
    for (const char *c = canon; *c != '\0'; c++) {
        if (in_string && *c == '\\') {
            c++;
            continue;
        }
        if (*c == '"')
            in_string = !in_string;
        FUZZ_ASSERT(in_string || !(*c == ' ' || *c == '\n' || *c == '\t' || *c == '\r'));
    }
    back = json_loads(canon, JSON_REJECT_DUPLICATES, NULL);
    FUZZ_ASSERT(back != NULL && json_is_object(back));
    if (json_is_null(in))
        FUZZ_ASSERT(json_object_size(back) == 0);
    else
        FUZZ_ASSERT(json_equal(in, back));
    FUZZ_ASSERT(kms_context_canonical(back, &again) == P11KMS_OK);
    FUZZ_ASSERT(strcmp(canon, again) == 0);
    if (json_is_object(in)) {
        rev = reversed(in);
        FUZZ_ASSERT(kms_context_canonical(rev, &canon_rev) == P11KMS_OK);
        FUZZ_ASSERT(strcmp(canon, canon_rev) == 0);
    }
out:
    free(canon);
    free(again);
    free(canon_rev);
    json_decref(in);
    json_decref(back);
    json_decref(rev);
    return 0;
}
