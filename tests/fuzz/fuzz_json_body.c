/*
 * tests/fuzz/fuzz_json_body.c - libFuzzer target for the request body
 * validation of every kmsd route that reads a body (and the query string
 * of GET /v1/datakeys): kms_routes_prepare with a valid method and path
 * chosen by the first input byte and the rest of the input as the body
 * (or as the query).
 *
 * Invariants: a refusal is a 4xx JSON error whose code matches its status;
 * an accepted body is a JSON object (jansson, duplicates refused) no
 * deeper than KMS_JSON_MAX_DEPTH; an accepted query is printable ASCII;
 * no crash, leak or undefined behaviour.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "fuzz_util.h"
#include "kms/server/routes.h"

#define MAX_BODY 65536
#define DEK      "0f0e0d0c-0b0a-4908-8706-050403020100"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const struct {
    const char *method, *path;
    int query; /* the input is the query string */
} targets[] = {
    {"POST", "/v1/keys", 0},
    {"POST", "/v1/keys/k1/datakeys", 0},
    {"POST", "/v1/datakeys/" DEK "/decrypt", 0},
    {"POST", "/v1/datakeys/" DEK "/revoke", 0},
    {"POST", "/v1/datakeys/revoke", 0},
    {"POST", "/v1/datakeys/destroy", 0},
    {"POST", "/v1/keys/k1/config", 0},
    {"POST", "/v1/keys/k1/rewrap", 0},
    {"POST", "/v1/keys/k1/rotate", 0},
    {"POST", "/v1/keys/k1/disable", 0},
    {"POST", "/v1/keys/k1/enable", 0},
    {"GET", "/v1/datakeys", 1},
    {"GET", "/v1/keys/k1", 1}, /* routes that ignore the query */
};
#define N_TARGETS (sizeof(targets) / sizeof(targets[0]))

static size_t depth(const json_t *j)
{
    size_t max = 0, d, i;
    const char *k;
    json_t *v;

    if (json_is_object(j)) {
        json_object_foreach((json_t *)j, k, v) if ((d = depth(v)) > max) max = d;
        return max + 1;
    }
    if (json_is_array(j)) {
        json_array_foreach(j, i, v) if ((d = depth(v)) > max) max = d;
        return max + 1;
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kms_request_info info;
    kms_call *call = NULL;
    kms_reply reply;
    char *query = NULL;
    size_t t;

    if (size < 1 || size - 1 > MAX_BODY)
        return 0;
    t = data[0] % N_TARGETS;
    memset(&info, 0, sizeof(info));
    memset(&reply, 0, sizeof(reply));
    info.method = targets[t].method;
    info.path = targets[t].path;
    info.max_body = MAX_BODY;
    info.principal = "uid:1000";
    if (targets[t].query) {
        query = malloc(size); /* a query is a C string: cut at a NUL */
        FUZZ_ASSERT(query != NULL);
        memcpy(query, data + 1, size - 1);
        query[size - 1] = '\0';
        info.query = query;
    } else {
        info.body = data + 1;
        info.body_len = size - 1;
    }
    kms_routes_prepare(&info, &call, &reply);
    if (call == NULL) {
        fuzz_check_error(reply.status, reply.body, reply.len);
    } else {
        kms_call_access access;

        FUZZ_ASSERT(reply.body == NULL);
        kms_call_access_get(call, &access);
        if (!targets[t].query && info.body_len > 0) {
            json_t *j =
                json_loadb((const char *)info.body, info.body_len, JSON_REJECT_DUPLICATES, NULL);
            FUZZ_ASSERT(j != NULL && json_is_object(j));
            FUZZ_ASSERT(depth(j) <= KMS_JSON_MAX_DEPTH);
            json_decref(j);
        }
        kms_call_free(call);
    }
    kms_reply_clear(&reply);
    free(query);
    return 0;
}
