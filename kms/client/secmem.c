/*
 * kms/client/secmem.c - memory for plaintext key bytes.
 *
 * Each buffer gets pages of its own (so munlock of one never unlocks
 * another's), locked in RAM with mlock where RLIMIT_MEMLOCK allows (a
 * failure is not an error: "where possible"), and marked MADV_DONTDUMP so
 * it never reaches a core file.  Freeing wipes with OPENSSL_cleanse first.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "kms/client/internal.h"

static size_t rounded(size_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t p = page > 0 ? (size_t)page : 4096;

    if (len == 0)
        len = 1;
    return (len + p - 1) / p * p;
}

void *kms_secure_alloc(size_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t size = rounded(len);
    void *p = NULL;

    if (posix_memalign(&p, page > 0 ? (size_t)page : 4096, size) != 0)
        return NULL;
    memset(p, 0, size);
    (void)mlock(p, size);
#ifdef MADV_DONTDUMP
    (void)madvise(p, size, MADV_DONTDUMP);
#endif
    return p;
}

void kms_secure_free(void *p, size_t len)
{
    size_t size = rounded(len);

    if (p == NULL)
        return;
    OPENSSL_cleanse(p, size);
#ifdef MADV_DODUMP
    (void)madvise(p, size, MADV_DODUMP);
#endif
    (void)munlock(p, size);
    free(p);
}

void p11kms_buffer_free(void *p, size_t len)
{
    if (p == NULL)
        return;
    OPENSSL_cleanse(p, len);
    free(p);
}
