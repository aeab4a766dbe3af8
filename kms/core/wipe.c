/*
 * kms/core/wipe.c - heap memory wiped when released (see wipe.h).
 *
 * The size of a block is the C library's (malloc_usable_size: at least
 * what was asked for; the sanitizers and valgrind answer exactly that),
 * so no header is added and blocks mix freely with malloc/free.
 */
#include "kms/core/wipe.h"

#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

void *kms_wipe_malloc(size_t n)
{
    return malloc(n);
}

void *kms_wipe_calloc(size_t n, size_t size)
{
    return calloc(n, size);
}

char *kms_wipe_strdup(const char *s)
{
    return strdup(s);
}

void kms_wipe_free(void *p)
{
    if (p == NULL)
        return;
    OPENSSL_cleanse(p, malloc_usable_size(p));
    free(p);
}

void *kms_wipe_realloc(void *p, size_t n)
{
    size_t have;
    void *q;

    if (p == NULL)
        return malloc(n);
    if (n == 0) {
        kms_wipe_free(p);
        return NULL;
    }
    have = malloc_usable_size(p);
    if (n <= have)
        return p; /* the tail stays in the block, wiped when it is freed */
    q = malloc(n);
    if (q == NULL)
        return NULL; /* p is untouched, as with realloc */
    memcpy(q, p, have);
    kms_wipe_free(p);
    return q;
}
