/*
 * kms/server/wipealloc.h - heap memory that is wiped when it is released,
 * for the libraries that hold kmsd's request and reply bytes.
 *
 * libevent copies every byte kmsd reads or writes through its own buffers
 * (socket reads, the framing filter, evhttp's header lines and values),
 * and frees them without wiping: the Authorization header of a request
 * (a bearer token) would stay in freed heap blocks until they are reused.
 * kms_wipealloc_install makes libevent allocate through the functions
 * below, which wipe every block (OPENSSL_cleanse over its usable size)
 * before it goes back to malloc, and grow a block by copy-wipe-free
 * instead of realloc.  Reply bodies that carry a plaintext DEK are
 * wiped by their owner anyway (http.c); this covers the copies kmsd does
 * not own.
 */
#ifndef P11KMS_KMS_SERVER_WIPEALLOC_H
#define P11KMS_KMS_SERVER_WIPEALLOC_H

#include <stddef.h>

/* malloc, realloc and free that wipe what they release.  Blocks come
 * from (and may be freed by) the C library's allocator. */
void *kms_wipe_malloc(size_t n);
void *kms_wipe_realloc(void *p, size_t n);
void kms_wipe_free(void *p);

/* Route libevent's allocations through the functions above.  Call it
 * before any other libevent function (before evthread_use_pthreads);
 * process-wide. */
void kms_wipealloc_install(void);

#endif
