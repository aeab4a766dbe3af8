/*
 * tests/fuzz/fuzz_util.h - small checks shared by the libFuzzer targets
 * (header-only).  A broken invariant calls FUZZ_ASSERT, which prints the
 * condition and aborts, so libFuzzer records the input as a crash.
 */
#ifndef P11KMS_TESTS_FUZZ_UTIL_H
#define P11KMS_TESTS_FUZZ_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "p11kms/status.h"

#define FUZZ_ASSERT(cond)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: invariant broken: %s\n", __FILE__, __LINE__, #cond);           \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

/* A refusal (kms_routes_prepare's reply): a 4xx (or 503 busy, or 500 out
 * of memory) whose body is {"error":{"code":C,"message":M}} with C the
 * code of that status. */
static inline void fuzz_check_error(int status, const char *body, size_t len)
{
    json_error_t jerr;
    json_t *j, *err, *code, *msg;

    FUZZ_ASSERT(body != NULL && len > 0);
    FUZZ_ASSERT((status >= 400 && status <= 499) || status == 503 || status == 500);
    j = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    FUZZ_ASSERT(j != NULL && json_is_object(j));
    err = json_object_get(j, "error");
    FUZZ_ASSERT(json_is_object(err));
    code = json_object_get(err, "code");
    msg = json_object_get(err, "message");
    FUZZ_ASSERT(json_is_string(code) && json_is_string(msg));
    FUZZ_ASSERT(p11kms_status_http(p11kms_status_from_code(json_string_value(code))) == status);
    json_decref(j);
}

#endif
