/*
 * kms/client/client.c - the client connection of libp11kms: target parsing,
 * the libcurl handle, and kms_client_call, the one request function the
 * library and kmsctl use.
 *
 * A p11kms_client owns one CURL easy handle, so its connection to kmsd (Unix
 * socket or TLS) is reused across calls; it is not thread-safe (one client
 * per thread).  curl_global_init runs once per process under pthread_once.
 *
 * Response bodies may carry plaintext DEKs, and every library that moves
 * one copies it: libcurl into its receive buffer, OpenSSL into its TLS
 * read buffer (records are decrypted in place), jansson into its lexer's
 * buffers, each released without wiping.  So the library initialises
 * libcurl with the wiping allocator of kms/core/wipe.h
 * (curl_global_init_mem), gives jansson the same (only over jansson's
 * default malloc/free, never over an application's own), and sets
 * SSL_OP_CLEANSE_PLAINTEXT on libcurl's TLS contexts.  Our own receive
 * buffer grows by copy-wipe-free, never realloc, and is wiped after every
 * call.  If the application initialised libcurl before the library did,
 * libcurl keeps its allocator and its freed buffers are not wiped
 * (kms_client_wipes_libcurl tells; docs/client.md).
 */
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <openssl/crypto.h>
#include <openssl/ssl.h>
#include <pthread.h>

#include "kms/client/internal.h"
#include "kms/core/wipe.h"

struct p11kms_client {
    CURL *curl;
    char *base_url;  /* "http://kmsd" (unix) or "https://host:port" */
    char *unix_path; /* NULL for https */
    struct curl_slist *headers;
    unsigned char *resp; /* receive buffer */
    size_t resp_len, resp_cap;
    int resp_overflow;
    char curl_err[CURL_ERROR_SIZE];
    char err_code[64];
    char err_message[512];
    long connections; /* opened so far (CURLINFO_NUM_CONNECTS summed) */
};

static pthread_once_t global_once = PTHREAD_ONCE_INIT;
static CURLcode global_rc = CURLE_FAILED_INIT;
static atomic_int curl_wiped; /* libcurl allocates through the functions below */

/* libcurl's allocation functions: the wiping ones, noting that libcurl
 * uses them. */
static void *curl_malloc(size_t n)
{
    atomic_store_explicit(&curl_wiped, 1, memory_order_relaxed);
    return kms_wipe_malloc(n);
}

static void *curl_realloc(void *p, size_t n)
{
    atomic_store_explicit(&curl_wiped, 1, memory_order_relaxed);
    return kms_wipe_realloc(p, n);
}

static char *curl_strdup(const char *str)
{
    atomic_store_explicit(&curl_wiped, 1, memory_order_relaxed);
    return kms_wipe_strdup(str);
}

static void *curl_calloc(size_t n, size_t size)
{
    atomic_store_explicit(&curl_wiped, 1, memory_order_relaxed);
    return kms_wipe_calloc(n, size);
}

static void global_init(void)
{
    json_malloc_t jm = NULL;
    json_free_t jf = NULL;

    json_get_alloc_funcs(&jm, &jf);
    if (jm == malloc && jf == free)
        json_set_alloc_funcs(kms_wipe_malloc, kms_wipe_free);
    /* Has no effect (and says CURLE_OK) when libcurl is initialised already. */
    global_rc = curl_global_init_mem(CURL_GLOBAL_DEFAULT, curl_malloc, kms_wipe_free, curl_realloc,
                                     curl_strdup, curl_calloc);
    if (global_rc == CURLE_OK) /* allocates: through ours if they are in */
        curl_free(curl_easy_escape(NULL, "p11kms", 6));
}

int kms_client_wipes_libcurl(void)
{
    pthread_once(&global_once, global_init);
    return atomic_load(&curl_wiped);
}

/* CURLOPT_SSL_CTX_FUNCTION: OpenSSL decrypts a record in place in its read
 * buffer and keeps it there; have it wipe the plaintext once read. */
static CURLcode cleanse_plaintext(CURL *curl, void *sslctx, void *arg)
{
    (void)curl;
    (void)arg;
    SSL_CTX_set_options((SSL_CTX *)sslctx, SSL_OP_CLEANSE_PLAINTEXT);
    return CURLE_OK;
}

void p11kms_client_options_init(p11kms_client_options *o)
{
    if (o == NULL)
        return;
    memset(o, 0, sizeof(*o));
    o->connect_timeout_ms = 10000;
    o->timeout_ms = 60000;
}

p11kms_status p11kms_client_open(const char *target, p11kms_client **out)
{
    return p11kms_client_open_options(target, NULL, out);
}

static void resp_wipe(p11kms_client *c)
{
    if (c->resp != NULL)
        OPENSSL_cleanse(c->resp, c->resp_cap);
    c->resp_len = 0;
    c->resp_overflow = 0;
}

void p11kms_client_close(p11kms_client *c)
{
    if (c == NULL)
        return;
    if (c->curl != NULL)
        curl_easy_cleanup(c->curl);
    curl_slist_free_all(c->headers);
    resp_wipe(c);
    free(c->resp);
    free(c->base_url);
    free(c->unix_path);
    free(c);
}

p11kms_status p11kms_client_open_options(const char *target, const p11kms_client_options *opts,
                                         p11kms_client **out)
{
    p11kms_client_options o;
    p11kms_client *c = NULL;
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    struct curl_slist *h;
    int https;

    if (target == NULL || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    p11kms_client_options_init(&o);
    if (opts != NULL) {
        o.ca_file = opts->ca_file;
        o.cert_file = opts->cert_file;
        o.key_file = opts->key_file;
        if (opts->connect_timeout_ms > 0)
            o.connect_timeout_ms = opts->connect_timeout_ms;
        if (opts->timeout_ms != 0)
            o.timeout_ms = opts->timeout_ms;
    }
    if (strncmp(target, "unix:", 5) == 0) {
        if (target[5] == '\0')
            return P11KMS_ERR_BAD_REQUEST;
        https = 0;
    } else if (strncmp(target, "https://", 8) == 0) {
        size_t n = strlen(target + 8);
        if (n == 0 || strchr(target + 8, '/') != NULL || strchr(target + 8, '?') != NULL)
            return P11KMS_ERR_BAD_REQUEST;
        https = 1;
    } else {
        return P11KMS_ERR_BAD_REQUEST;
    }

    pthread_once(&global_once, global_init);
    if (global_rc != CURLE_OK)
        return P11KMS_ERR_TRANSPORT;

    if ((c = calloc(1, sizeof(*c))) == NULL)
        goto out;
    if (https) {
        c->base_url = strdup(target);
    } else {
        c->base_url = strdup("http://kmsd");
        c->unix_path = strdup(target + 5);
        if (c->unix_path == NULL)
            goto out;
    }
    if (c->base_url == NULL)
        goto out;
    if ((c->curl = curl_easy_init()) == NULL) {
        rv = P11KMS_ERR_TRANSPORT;
        goto out;
    }
    /* No "Expect: 100-continue" round trip; bodies are JSON. */
    if ((h = curl_slist_append(NULL, "Expect:")) == NULL)
        goto out;
    c->headers = h;
    if ((h = curl_slist_append(c->headers, "Content-Type: application/json")) == NULL)
        goto out;
    c->headers = h;
    if ((h = curl_slist_append(c->headers, "Accept: application/json")) == NULL)
        goto out;
    c->headers = h;

    rv = P11KMS_ERR_TRANSPORT;
    if (curl_easy_setopt(c->curl, CURLOPT_NOSIGNAL, 1L) != CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_ERRORBUFFER, c->curl_err) != CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_HTTPHEADER, c->headers) != CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_CONNECTTIMEOUT_MS, o.connect_timeout_ms) != CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_TIMEOUT_MS, o.timeout_ms > 0 ? o.timeout_ms : 0L) !=
            CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_PROTOCOLS_STR, https ? "https" : "http") != CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_FOLLOWLOCATION, 0L) != CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_USERAGENT,
                         "libp11kms/"
                         "0.1") != CURLE_OK)
        goto out;
    if (!https) {
        if (curl_easy_setopt(c->curl, CURLOPT_UNIX_SOCKET_PATH, c->unix_path) != CURLE_OK)
            goto out;
    } else {
        if (curl_easy_setopt(c->curl, CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2) !=
                CURLE_OK ||
            curl_easy_setopt(c->curl, CURLOPT_SSL_VERIFYPEER, 1L) != CURLE_OK ||
            curl_easy_setopt(c->curl, CURLOPT_SSL_VERIFYHOST, 2L) != CURLE_OK ||
            curl_easy_setopt(c->curl, CURLOPT_TCP_KEEPALIVE, 1L) != CURLE_OK)
            goto out;
        /* OpenSSL builds of libcurl only; other TLS backends refuse it. */
        (void)curl_easy_setopt(c->curl, CURLOPT_SSL_CTX_FUNCTION, cleanse_plaintext);
        /* CURLOPT_* string options are copied by libcurl. */
        if (o.ca_file != NULL && curl_easy_setopt(c->curl, CURLOPT_CAINFO, o.ca_file) != CURLE_OK)
            goto out;
        if (o.cert_file != NULL &&
            curl_easy_setopt(c->curl, CURLOPT_SSLCERT, o.cert_file) != CURLE_OK)
            goto out;
        if (o.key_file != NULL && curl_easy_setopt(c->curl, CURLOPT_SSLKEY, o.key_file) != CURLE_OK)
            goto out;
    }
    *out = c;
    c = NULL;
    rv = P11KMS_OK;
out:
    p11kms_client_close(c);
    return rv;
}

const char *p11kms_client_error(const p11kms_client *c)
{
    return c != NULL ? c->err_message : "";
}

long kms_client_connections(const p11kms_client *c)
{
    return c->connections;
}

const char *kms_client_error_code(const p11kms_client *c)
{
    return c != NULL ? c->err_code : "";
}

void kms_client_set_error(p11kms_client *c, const char *code, const char *fmt, ...)
{
    va_list ap;

    snprintf(c->err_code, sizeof(c->err_code), "%s", code);
    va_start(ap, fmt);
    vsnprintf(c->err_message, sizeof(c->err_message), fmt, ap);
    va_end(ap);
}

char *kms_path_escape(const char *segment)
{
    char *e, *copy;

    /* curl_easy_escape needs no handle; its result must go to curl_free. */
    e = curl_easy_escape(NULL, segment, 0);
    if (e == NULL)
        return NULL;
    copy = strdup(e);
    curl_free(e);
    return copy;
}

/* Grow without realloc: the old buffer may hold plaintext. */
static size_t on_data(char *data, size_t size, size_t nmemb, void *arg)
{
    p11kms_client *c = arg;
    size_t n = size * nmemb;

    if (n > KMS_CLIENT_MAX_RESPONSE - c->resp_len) {
        c->resp_overflow = 1;
        return 0;
    }
    if (c->resp_len + n + 1 > c->resp_cap) {
        size_t cap = c->resp_cap ? c->resp_cap : 4096;
        unsigned char *nb;
        while (cap < c->resp_len + n + 1)
            cap *= 2;
        if ((nb = malloc(cap)) == NULL)
            return 0;
        if (c->resp != NULL) {
            memcpy(nb, c->resp, c->resp_len);
            OPENSSL_cleanse(c->resp, c->resp_cap);
            free(c->resp);
        }
        c->resp = nb;
        c->resp_cap = cap;
    }
    memcpy(c->resp + c->resp_len, data, n);
    c->resp_len += n;
    c->resp[c->resp_len] = '\0';
    return n;
}

/* Decode {"error":{"code","message"}} into c; the status it maps to. */
static p11kms_status take_error(p11kms_client *c, long http)
{
    json_t *j = NULL, *err;
    const char *code = NULL, *msg = NULL;
    p11kms_status s;

    if (c->resp_len > 0)
        j = json_loadb((const char *)c->resp, c->resp_len, 0, NULL);
    err = json_object_get(j, "error");
    code = json_string_value(json_object_get(err, "code"));
    msg = json_string_value(json_object_get(err, "message"));
    if (code != NULL) {
        s = p11kms_status_from_code(code);
        kms_client_set_error(c, code, "%s", msg != NULL ? msg : p11kms_strerror(s));
    } else {
        s = http >= 500 ? P11KMS_ERR_INTERNAL : P11KMS_ERR_BAD_REQUEST;
        kms_client_set_error(c, p11kms_status_code(s),
                             "kmsd answered HTTP %ld without an error body", http);
    }
    json_decref(j);
    return s;
}

p11kms_status kms_client_call(p11kms_client *c, const char *method, const char *path,
                              const json_t *body, long *http_status, json_t **reply)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    char *url = NULL, *text = NULL;
    size_t text_len = 0;
    long http = 0;
    CURLcode cc;
    json_t *j = NULL;
    json_error_t jerr;

    if (http_status != NULL)
        *http_status = 0;
    if (c == NULL || method == NULL || path == NULL || path[0] != '/')
        return P11KMS_ERR_BAD_REQUEST;
    c->err_code[0] = '\0';
    c->err_message[0] = '\0';
    c->curl_err[0] = '\0';
    resp_wipe(c);

    if (asprintf(&url, "%s%s", c->base_url, path) < 0) {
        url = NULL;
        kms_client_set_error(c, "internal", "out of memory");
        goto out;
    }
    if (body != NULL) {
        if ((text = json_dumps(body, JSON_COMPACT)) == NULL) {
            kms_client_set_error(c, "internal", "out of memory");
            goto out;
        }
        text_len = strlen(text);
    }

    rv = P11KMS_ERR_TRANSPORT;
    /* Reset the method-specific options of the previous call first. */
    if (curl_easy_setopt(c->curl, CURLOPT_URL, url) != CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_CUSTOMREQUEST, NULL) != CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_HTTPGET, 1L) != CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_WRITEFUNCTION, on_data) != CURLE_OK ||
        curl_easy_setopt(c->curl, CURLOPT_WRITEDATA, c) != CURLE_OK) {
        kms_client_set_error(c, "transport", "cannot set up the request");
        goto out;
    }
    if (strcmp(method, "POST") == 0) {
        if (curl_easy_setopt(c->curl, CURLOPT_POST, 1L) != CURLE_OK ||
            curl_easy_setopt(c->curl, CURLOPT_POSTFIELDSIZE, (long)text_len) != CURLE_OK ||
            curl_easy_setopt(c->curl, CURLOPT_POSTFIELDS, text != NULL ? text : "") != CURLE_OK) {
            kms_client_set_error(c, "transport", "cannot set up the request");
            goto out;
        }
    } else if (strcmp(method, "GET") != 0) {
        if (text != NULL) {
            rv = P11KMS_ERR_BAD_REQUEST;
            kms_client_set_error(c, "bad_request", "%s takes no body", method);
            goto out;
        }
        if (curl_easy_setopt(c->curl, CURLOPT_CUSTOMREQUEST, method) != CURLE_OK) {
            kms_client_set_error(c, "transport", "cannot set up the request");
            goto out;
        }
    }

    cc = curl_easy_perform(c->curl);
    {
        long n = 0;
        if (curl_easy_getinfo(c->curl, CURLINFO_NUM_CONNECTS, &n) == CURLE_OK)
            c->connections += n;
    }
    if (cc != CURLE_OK) {
        if (c->resp_overflow)
            kms_client_set_error(c, "transport", "response larger than %u bytes",
                                 KMS_CLIENT_MAX_RESPONSE);
        else if (c->unix_path != NULL && cc == CURLE_COULDNT_CONNECT) {
            long os_errno = 0;
            curl_easy_getinfo(c->curl, CURLINFO_OS_ERRNO, &os_errno);
            kms_client_set_error(c, "transport", "cannot connect to kmsd at %s: %s", c->unix_path,
                                 os_errno != 0 ? strerror((int)os_errno) : curl_easy_strerror(cc));
        } else
            kms_client_set_error(c, "transport", "%s (%s)",
                                 c->curl_err[0] ? c->curl_err : curl_easy_strerror(cc),
                                 c->unix_path != NULL ? c->unix_path : c->base_url);
        goto out;
    }
    curl_easy_getinfo(c->curl, CURLINFO_RESPONSE_CODE, &http);
    if (http_status != NULL)
        *http_status = http;
    if (http < 200 || http > 299) {
        rv = take_error(c, http);
        goto out;
    }
    if (reply != NULL && c->resp_len > 0) {
        j = json_loadb((const char *)c->resp, c->resp_len, 0, &jerr);
        if (j == NULL) {
            rv = P11KMS_ERR_INTERNAL;
            kms_client_set_error(c, "internal", "kmsd's reply is not JSON: %s", jerr.text);
            goto out;
        }
    }
    if (reply != NULL)
        *reply = j;
    j = NULL;
    rv = P11KMS_OK;
out:
    json_decref(j);
    resp_wipe(c);
    free(text);
    free(url);
    return rv;
}
