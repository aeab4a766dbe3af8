/*
 * kms/core/wipe.h - heap memory that is wiped when it is released, for the
 * libraries that copy request and reply bytes p11kms does not own.
 *
 * libevent (in kmsd) and libcurl and jansson (in libp11kms) copy every
 * byte they move through buffers of their own and free them without
 * wiping: a request's bearer token, or a reply's plaintext data key,
 * would stay in freed heap blocks until they are reused.  These functions
 * are drop-in allocation functions for those libraries' hooks
 * (event_set_mem_functions, curl_global_init_mem, json_set_alloc_funcs):
 * every block is wiped (OPENSSL_cleanse over its usable size) before it
 * goes back to malloc, and a block grows by copy-wipe-free, never by
 * realloc.  Buffers that p11kms owns are wiped by their owners anyway.
 *
 * The blocks are the C library's: a block from kms_wipe_malloc may be
 * released by free() and a malloc'd one by kms_wipe_free (then it just
 * is, or is not, wiped).  No state, no lock: safe from any thread.
 */
#ifndef P11KMS_KMS_CORE_WIPE_H
#define P11KMS_KMS_CORE_WIPE_H

#include <stddef.h>

void *kms_wipe_malloc(size_t n);
void *kms_wipe_calloc(size_t n, size_t size);
void *kms_wipe_realloc(void *p, size_t n);
char *kms_wipe_strdup(const char *s);
void kms_wipe_free(void *p);

#endif
