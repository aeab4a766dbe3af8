/*
 * tests/fuzz/fuzz_http_request.c - libFuzzer target for kmsd's request
 * parsing and routing: the bytes of a connection go through the framing
 * filter (kms_framing_feed, in pieces whose size the first input byte
 * picks), and every request it hands on is taken apart the way evhttp and
 * on_request (kms/server/http.c) do -- request line, headers, target
 * parsed by evhttp_uri_parse_with_flags, body of Content-Length bytes --
 * and given to kms_routes_prepare.
 *
 * Invariants: the filter never holds more than max_head bytes of an
 * unfinished head; every request it passes has a sound request line whose
 * target evhttp can parse (else evhttp answers in HTML); every
 * refusal of kms_routes_prepare is a 4xx JSON error whose code matches its
 * status; no crash, leak or undefined behaviour (ASan/UBSan).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <event2/buffer.h>
#include <event2/http.h>

#include "fuzz_util.h"
#include "kms/server/framing.h"
#include "kms/server/routes.h"

#define MAX_BODY 4096
#define MAX_HEAD 4096

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* One request of the filter's output at out[0..len): returns the bytes
 * it takes (head and body), 0 when it is incomplete. */
static size_t one_request(const char *out, size_t len)
{
    const char *end = NULL;
    char *head, *save = NULL, *line, *sp1, *sp2;
    const char *refused = NULL, *path, *query;
    long long content_length = 0;
    size_t head_len, used;
    struct evhttp_uri *uri = NULL;
    kms_request_info info;
    kms_call *call = NULL;
    kms_reply reply;
    int first = 1;

    for (size_t i = 0; i + 1 < len; i++) { /* end of head: an empty line, CRLF or LF */
        if (out[i] == '\n' && out[i + 1] == '\n') {
            end = out + i + 2;
            break;
        }
        if (i + 3 < len && memcmp(out + i, "\r\n\r\n", 4) == 0) {
            end = out + i + 4;
            break;
        }
        if (out[i] == '\n' && i + 2 < len && out[i + 1] == '\r' && out[i + 2] == '\n') {
            end = out + i + 3;
            break;
        }
    }
    if (end == NULL)
        return 0;
    head_len = (size_t)(end - out);
    head = malloc(head_len + 1);
    FUZZ_ASSERT(head != NULL);
    memcpy(head, out, head_len);
    head[head_len] = '\0';
    memset(&info, 0, sizeof(info));
    memset(&reply, 0, sizeof(reply));
    for (line = strtok_r(head, "\n", &save); line != NULL; line = strtok_r(NULL, "\n", &save)) {
        size_t n = strlen(line);
        char *colon, *value;

        if (n > 0 && line[n - 1] == '\r')
            line[--n] = '\0';
        if (first) {
            /* The filter passes only "METHOD SP /target SP HTTP/1.x". */
            first = 0;
            sp1 = strchr(line, ' ');
            FUZZ_ASSERT(sp1 != NULL);
            sp2 = strchr(sp1 + 1, ' ');
            FUZZ_ASSERT(sp2 != NULL && strchr(sp2 + 1, ' ') == NULL);
            *sp1 = *sp2 = '\0';
            FUZZ_ASSERT(sp1[1] == '/');
            FUZZ_ASSERT(strcmp(sp2 + 1, "HTTP/1.1") == 0 || strcmp(sp2 + 1, "HTTP/1.0") == 0);
            info.method = line;
            uri = evhttp_uri_parse_with_flags(sp1 + 1, EVHTTP_URI_NONCONFORMANT);
            continue;
        }
        if (n == 0)
            break;
        colon = strchr(line, ':');
        if (colon == NULL)
            continue;
        *colon = '\0';
        value = colon + 1;
        while (*value == ' ' || *value == '\t')
            value++;
        if (strcasecmp(line, KMS_FRAMING_HEADER) == 0)
            refused = value;
        else if (strcasecmp(line, "Content-Length") == 0)
            content_length = strtoll(value, NULL, 10);
    }
    FUZZ_ASSERT(content_length >= 0 && content_length <= MAX_BODY);
    used = head_len + (size_t)content_length;
    if (used > len) {
        used = 0; /* body still on its way */
        goto out;
    }
    /* evhttp would answer a target it cannot parse with its own HTML 400:
     * the filter must not pass one. */
    FUZZ_ASSERT(uri != NULL);
    path = evhttp_uri_get_path(uri);
    query = evhttp_uri_get_query(uri);
    info.path = path != NULL && *path != '\0' ? path : "/";
    info.query = query;
    info.refused = refused;
    info.body = (const unsigned char *)end;
    info.body_len = (size_t)content_length;
    info.max_body = MAX_BODY;
    info.principal = "uid:1000";
    kms_routes_prepare(&info, &call, &reply);
    if (call != NULL) {
        kms_call_access access;

        FUZZ_ASSERT(refused == NULL);
        kms_call_access_get(call, &access);
        FUZZ_ASSERT(kms_call_name(call) != NULL);
        kms_call_free(call);
        FUZZ_ASSERT(reply.body == NULL);
    } else {
        fuzz_check_error(reply.status, reply.body, reply.len);
    }
    kms_reply_clear(&reply);
out:
    if (uri != NULL)
        evhttp_uri_free(uri);
    free(head);
    return used;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct evbuffer *out;
    size_t held, chunk, len, used;
    const char *busy = NULL;
    char *flat;

    if (size < 1)
        return 0;
    /* First byte: how the bytes arrive (0: at once, else pieces of 1..127)
     * and, with the top bit and nothing else, a connection over the cap. */
    chunk = data[0] & 0x7f;
    if (data[0] == 0x80)
        busy = KMS_FRAMING_BUSY;
    out = evbuffer_new();
    FUZZ_ASSERT(out != NULL);
    held = kms_framing_feed(data + 1, size - 1, chunk, MAX_BODY, MAX_HEAD, busy, out);
    FUZZ_ASSERT(held != (size_t)-1);
    FUZZ_ASSERT(held <= MAX_HEAD);
    len = evbuffer_get_length(out);
    flat = len > 0 ? (char *)evbuffer_pullup(out, -1) : NULL;
    for (size_t off = 0; off < len; off += used)
        if ((used = one_request(flat + off, len - off)) == 0)
            break;
    evbuffer_free(out);
    return 0;
}
