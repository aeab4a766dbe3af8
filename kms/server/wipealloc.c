/*
 * kms/server/wipealloc.c - heap memory wiped when released (see
 * wipealloc.h).
 *
 * The size of a block is the C library's (malloc_usable_size, which is
 * at least what was asked for; the sanitizers and valgrind answer the
 * size asked for), so no header is added and a block allocated here may
 * be freed by plain free() (libevent hands some to its caller: the line
 * of evbuffer_readln) and the reverse: such a block is just not wiped.
 * No state, no lock: safe from any thread.
 */
#include "kms/server/wipealloc.h"

#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include <event2/event.h>
#include <openssl/crypto.h>

void *kms_wipe_malloc(size_t n)
{
    return malloc(n);
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

void kms_wipealloc_install(void)
{
    event_set_mem_functions(kms_wipe_malloc, kms_wipe_realloc, kms_wipe_free);
}
