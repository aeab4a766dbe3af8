/*
 * kms/server/config.c - the kmsd.conf parser (see config.h).
 *
 * One pass over the file, line by line, driven by a static table of the
 * known keys; then the cross-key checks (required keys, files that must
 * exist).  Comments start with ';' or '#' at the start of a line or after
 * whitespace, so values such as PKCS#11 URIs may contain ';' and '#'.
 * No global state; the result is immutable once returned.
 */
#include "kms/server/config.h"

#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <libpq-fe.h>
#include <p11-kit/uri.h>

enum kind { K_STR, K_PATH, K_MODULE, K_INT, K_MODE, K_URI, K_BACKEND };

typedef struct key_def {
    const char *section;
    const char *key;
    enum kind kind;
    size_t offset; /* of the field in kms_config */
    long min, max; /* K_INT */
} key_def;

#define STR_FIELD(f) offsetof(kms_config, f)

static const key_def keys[] = {
    {"token", "module", K_MODULE, STR_FIELD(token_module), 0, 0},
    {"token", "uri", K_URI, STR_FIELD(token_uri), 0, 0},
    {"token", "pin_file", K_PATH, STR_FIELD(token_pin_file), 0, 0},
    {"token", "sessions", K_INT, STR_FIELD(token_sessions), 1, 1024},
    {"token", "softhsm2_conf", K_PATH, STR_FIELD(token_softhsm2_conf), 0, 0},
    {"store", "backend", K_BACKEND, STR_FIELD(store_backend), 0, 0},
    {"store", "path", K_PATH, STR_FIELD(store_path), 0, 0},
    {"store", "url", K_STR, STR_FIELD(store_url), 0, 0},
    {"listen", "unix", K_PATH, STR_FIELD(listen_unix), 0, 0},
    {"listen", "unix_mode", K_MODE, STR_FIELD(unix_mode), 0, 0},
    {"listen", "tls", K_STR, STR_FIELD(listen_tls), 0, 0},
    {"listen", "tls_cert", K_PATH, STR_FIELD(tls_cert), 0, 0},
    {"listen", "tls_key", K_PATH, STR_FIELD(tls_key), 0, 0},
    {"listen", "tls_client_ca", K_PATH, STR_FIELD(tls_client_ca), 0, 0},
    {"policy", "file", K_PATH, STR_FIELD(policy_file), 0, 0},
    {"server", "threads", K_INT, STR_FIELD(threads), 1, 64},
    {"server", "workers", K_INT, STR_FIELD(workers), 1, 1024},
    {"server", "queue", K_INT, STR_FIELD(queue), 1, 1000000},
    {"server", "max_body", K_INT, STR_FIELD(max_body), 64, 64 * 1024 * 1024},
    {"server", "timeout", K_INT, STR_FIELD(timeout), 1, 3600},
    {"server", "request_timeout", K_INT, STR_FIELD(request_timeout), 1, 3600},
    {"server", "max_connections", K_INT, STR_FIELD(max_connections), 1, 1000000},
    {"server", "rotation_check_interval", K_INT, STR_FIELD(rotation_check_interval), 1, 86400},
    {"server", "max_wraps_per_version", K_INT, STR_FIELD(max_wraps_per_version), 1, 1L << 30},
};
#define N_KEYS (sizeof(keys) / sizeof(keys[0]))

static const char *const sections[] = {"token", "store", "listen", "policy", "server"};
#define N_SECTIONS (sizeof(sections) / sizeof(sections[0]))

typedef struct parser {
    const char *file;
    char *err;
    size_t errlen;
    int key_line[N_KEYS];
    int section_line[N_SECTIONS];
} parser;

__attribute__((format(printf, 3, 4))) static p11kms_status fail(parser *p, int line,
                                                                const char *fmt, ...)
{
    va_list ap;
    int n;

    if (line > 0)
        n = snprintf(p->err, p->errlen, "%s:%d: ", p->file, line);
    else
        n = snprintf(p->err, p->errlen, "%s: ", p->file);
    if (n < 0 || (size_t)n >= p->errlen)
        return P11KMS_ERR_BAD_REQUEST;
    va_start(ap, fmt);
    vsnprintf(p->err + n, p->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return P11KMS_ERR_BAD_REQUEST;
}

static char *trim(char *s)
{
    char *end;

    while (*s == ' ' || *s == '\t')
        s++;
    end = s + strlen(s);
    while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\r' || end[-1] == '\n'))
        *--end = '\0';
    return s;
}

/* Cut a comment: ';' or '#' at the start or after a blank. */
static void strip_comment(char *s)
{
    for (char *c = s; *c != '\0'; c++) {
        if ((*c == ';' || *c == '#') && (c == s || c[-1] == ' ' || c[-1] == '\t')) {
            *c = '\0';
            return;
        }
    }
}

static char *resolve_path(const char *dir, const char *value)
{
    char *out = NULL;

    if (value[0] == '/' || dir == NULL)
        return strdup(value);
    if (asprintf(&out, "%s/%s", dir, value) < 0)
        return NULL;
    return out;
}

static p11kms_status parse_int(parser *p, int line, const key_def *k, const char *v, int *out)
{
    char *end = NULL;
    long n;

    errno = 0;
    n = strtol(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0')
        return fail(p, line, "%s.%s: bad integer '%s'", k->section, k->key, v);
    if (n < k->min || n > k->max)
        return fail(p, line, "%s.%s: %ld out of range %ld..%ld", k->section, k->key, n, k->min,
                    k->max);
    *out = (int)n;
    return P11KMS_OK;
}

static p11kms_status parse_mode(parser *p, int line, const key_def *k, const char *v, mode_t *out)
{
    char *end = NULL;
    long n;

    errno = 0;
    n = strtol(v, &end, 8);
    if (errno != 0 || end == v || *end != '\0' || n < 0 || n > 0777)
        return fail(p, line, "%s.%s: bad octal mode '%s'", k->section, k->key, v);
    *out = (mode_t)n;
    return P11KMS_OK;
}

static p11kms_status check_uri(parser *p, int line, const char *v)
{
    P11KitUri *uri = p11_kit_uri_new();
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    int r;

    if (uri == NULL)
        goto out;
    r = p11_kit_uri_parse(v, P11_KIT_URI_FOR_ANY, uri);
    if (r != P11_KIT_URI_OK) {
        rv = fail(p, line, "token.uri: not a valid PKCS#11 URI: %s", p11_kit_uri_message(r));
        goto out;
    }
    rv = P11KMS_OK;
out:
    if (uri != NULL)
        p11_kit_uri_free(uri);
    return rv;
}

static p11kms_status set_value(parser *p, kms_config *cfg, int line, const key_def *k,
                               const char *v)
{
    char **str = (char **)(void *)((char *)cfg + k->offset);
    p11kms_status rv;

    switch (k->kind) {
    case K_INT: return parse_int(p, line, k, v, (int *)(void *)((char *)cfg + k->offset));
    case K_MODE: return parse_mode(p, line, k, v, (mode_t *)(void *)((char *)cfg + k->offset));
    case K_URI:
        if ((rv = check_uri(p, line, v)) != P11KMS_OK)
            return rv;
        *str = strdup(v);
        break;
    case K_BACKEND:
        if (strcmp(v, "sqlite") != 0 && strcmp(v, "postgres") != 0)
            return fail(p, line, "store.backend: must be sqlite or postgres, not '%s'", v);
        *str = strdup(v);
        cfg->line_backend = line;
        break;
    case K_PATH: *str = resolve_path(cfg->dir, v); break;
    case K_MODULE:
        /* A bare name is a p11-kit module name; anything with a '/' is a path. */
        *str = strchr(v, '/') != NULL ? resolve_path(cfg->dir, v) : strdup(v);
        break;
    case K_STR: *str = strdup(v); break;
    }
    if (*str == NULL)
        return P11KMS_ERR_NO_MEMORY;
    return P11KMS_OK;
}

static p11kms_status parse_line(parser *p, kms_config *cfg, int line, char *raw, int *section)
{
    char *s, *eq, *key, *value;
    size_t i;

    strip_comment(raw);
    s = trim(raw);
    if (*s == '\0')
        return P11KMS_OK;
    if (*s == '[') {
        size_t len = strlen(s);
        if (len < 3 || s[len - 1] != ']')
            return fail(p, line, "malformed section header '%s'", s);
        s[len - 1] = '\0';
        s = trim(s + 1);
        for (i = 0; i < N_SECTIONS; i++)
            if (strcmp(s, sections[i]) == 0)
                break;
        if (i == N_SECTIONS)
            return fail(p, line, "unknown section [%s]", s);
        if (p->section_line[i] != 0)
            return fail(p, line, "duplicate section [%s] (first on line %d)", s,
                        p->section_line[i]);
        p->section_line[i] = line;
        *section = (int)i;
        return P11KMS_OK;
    }
    eq = strchr(s, '=');
    if (eq == NULL)
        return fail(p, line, "expected 'key = value' or '[section]'");
    *eq = '\0';
    key = trim(s);
    value = trim(eq + 1);
    if (*key == '\0')
        return fail(p, line, "expected 'key = value' or '[section]'");
    if (*section < 0)
        return fail(p, line, "key '%s' outside of any section", key);
    for (i = 0; i < N_KEYS; i++)
        if (strcmp(keys[i].section, sections[*section]) == 0 && strcmp(keys[i].key, key) == 0)
            break;
    if (i == N_KEYS)
        return fail(p, line, "unknown key '%s' in section [%s]", key, sections[*section]);
    if (p->key_line[i] != 0)
        return fail(p, line, "duplicate key %s.%s (first set on line %d)", keys[i].section, key,
                    p->key_line[i]);
    p->key_line[i] = line;
    if (*value == '\0')
        return fail(p, line, "%s.%s: empty value", keys[i].section, key);
    return set_value(p, cfg, line, &keys[i], value);
}

static int key_index(const char *section, const char *key)
{
    for (size_t i = 0; i < N_KEYS; i++)
        if (strcmp(keys[i].section, section) == 0 && strcmp(keys[i].key, key) == 0)
            return (int)i;
    return 0;
}

/* The line to blame for a missing key: its section header, else the end. */
static int blame_line(const parser *p, const kms_config *cfg, const char *section)
{
    for (size_t i = 0; i < N_SECTIONS; i++)
        if (strcmp(sections[i], section) == 0 && p->section_line[i] != 0)
            return p->section_line[i];
    return cfg->line_last > 0 ? cfg->line_last : 1;
}

static p11kms_status require(parser *p, const kms_config *cfg, const char *section, const char *key,
                             const void *value)
{
    if (value != NULL)
        return P11KMS_OK;
    return fail(p, blame_line(p, cfg, section), "missing required key %s.%s", section, key);
}

static p11kms_status check_file(parser *p, int line, const char *what, const char *path, int secret)
{
    struct stat st;

    if (stat(path, &st) != 0)
        return fail(p, line, "%s: cannot access '%s': %s", what, path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        return fail(p, line, "%s: '%s' is not a regular file", what, path);
    if (secret && (st.st_mode & 077) != 0)
        return fail(p, line,
                    "%s: '%s' is accessible by group or others (mode %03o; need 0600 or "
                    "stricter)",
                    what, path, (unsigned)(st.st_mode & 0777));
    return P11KMS_OK;
}

int kms_config_split_hostport(const char *v, char *host, size_t hostlen, char *port, size_t portlen)
{
    const char *colon, *h = v;
    size_t hlen;
    long n = 0;

    if (v[0] == '[') { /* [v6]:port */
        const char *close = strchr(v, ']');
        if (close == NULL || close[1] != ':')
            return -1;
        h = v + 1;
        hlen = (size_t)(close - h);
        colon = close + 1;
    } else {
        colon = strrchr(v, ':');
        if (colon == NULL || memchr(v, ':', (size_t)(colon - v)) != NULL)
            return -1;
        hlen = (size_t)(colon - v);
    }
    if (hlen == 0 || hlen >= hostlen || colon[1] == '\0' || strlen(colon + 1) >= portlen)
        return -1;
    for (const char *c = colon + 1; *c != '\0'; c++) {
        if (*c < '0' || *c > '9' || (n = n * 10 + (*c - '0')) > 65535)
            return -1;
    }
    if (n < 1)
        return -1;
    memcpy(host, h, hlen);
    host[hlen] = '\0';
    snprintf(port, portlen, "%s", colon + 1);
    return 0;
}

/* listen.tls, tls_cert, tls_key and tls_client_ca come together. */
static p11kms_status check_tls(parser *p, kms_config *cfg)
{
    static const char *const names[] = {"tls", "tls_cert", "tls_key", "tls_client_ca"};
    const char *values[] = {cfg->listen_tls, cfg->tls_cert, cfg->tls_key, cfg->tls_client_ca};
    char host[256], port[16];
    int set = 0;
    p11kms_status rv;

    for (size_t i = 0; i < 4; i++)
        set += values[i] != NULL;
    if (set == 0)
        return P11KMS_OK;
    for (size_t i = 0; i < 4; i++)
        if (values[i] == NULL)
            return fail(p, blame_line(p, cfg, "listen"),
                        "missing required key listen.%s (listen.tls, tls_cert, tls_key and "
                        "tls_client_ca go together)",
                        names[i]);
    if (kms_config_split_hostport(cfg->listen_tls, host, sizeof(host), port, sizeof(port)) != 0)
        return fail(p, cfg->line_tls, "listen.tls: expected host:port or [v6]:port, not '%s'",
                    cfg->listen_tls);
    if ((rv = check_file(p, p->key_line[key_index("listen", "tls_cert")], "listen.tls_cert",
                         cfg->tls_cert, 0)) != P11KMS_OK ||
        (rv = check_file(p, p->key_line[key_index("listen", "tls_key")], "listen.tls_key",
                         cfg->tls_key, 1)) != P11KMS_OK ||
        (rv = check_file(p, p->key_line[key_index("listen", "tls_client_ca")],
                         "listen.tls_client_ca", cfg->tls_client_ca, 0)) != P11KMS_OK)
        return rv;
    return P11KMS_OK;
}

static p11kms_status check_all(parser *p, kms_config *cfg)
{
    p11kms_status rv;
    struct sockaddr_un sun;

    if ((rv = require(p, cfg, "token", "module", cfg->token_module)) != P11KMS_OK ||
        (rv = require(p, cfg, "token", "uri", cfg->token_uri)) != P11KMS_OK)
        return rv;
    if (cfg->store_backend == NULL && (cfg->store_backend = strdup("sqlite")) == NULL)
        return P11KMS_ERR_NO_MEMORY;
    if (strcmp(cfg->store_backend, "sqlite") == 0)
        rv = require(p, cfg, "store", "path", cfg->store_path);
    else
        rv = require(p, cfg, "store", "url", cfg->store_url);
    if (rv != P11KMS_OK)
        return rv;
    if ((rv = require(p, cfg, "listen", "unix", cfg->listen_unix)) != P11KMS_OK)
        return rv;
    if (strlen(cfg->listen_unix) >= sizeof(sun.sun_path))
        return fail(p, p->key_line[key_index("listen", "unix")],
                    "listen.unix: socket path too long (max %zu bytes)", sizeof(sun.sun_path) - 1);
    cfg->line_tls = p->key_line[key_index("listen", "tls")];
    cfg->line_pin_file = p->key_line[key_index("token", "pin_file")];
    if (cfg->token_pin_file != NULL && (rv = check_file(p, cfg->line_pin_file, "token.pin_file",
                                                        cfg->token_pin_file, 1)) != P11KMS_OK)
        return rv;
    if (cfg->token_softhsm2_conf != NULL &&
        (rv = check_file(p, p->key_line[key_index("token", "softhsm2_conf")],
                         "token.softhsm2_conf", cfg->token_softhsm2_conf, 0)) != P11KMS_OK)
        return rv;
    if (cfg->policy_file != NULL &&
        (rv = check_file(p, p->key_line[key_index("policy", "file")], "policy.file",
                         cfg->policy_file, 0)) != P11KMS_OK)
        return rv;
    return check_tls(p, cfg);
}

static void set_defaults(kms_config *cfg)
{
    cfg->token_sessions = 32;
    cfg->unix_mode = 0600;
    cfg->threads = 2;
    cfg->workers = 32;
    cfg->queue = 1024;
    cfg->max_body = 65536;
    cfg->timeout = 30;
    cfg->request_timeout = 10;
    cfg->max_connections = 1024;
    cfg->rotation_check_interval = 60;
    cfg->max_wraps_per_version = 1 << 30;
}

/* The parse shared by kms_config_load and kms_config_parse_buffer: `path`
 * names the text in errors and anchors relative paths; f (closed here) is
 * read to its end, or is NULL when it could not be opened (open_errno). */
static p11kms_status config_read(const char *path, FILE *f, int open_errno, kms_config **out,
                                 char *err, size_t errlen)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    kms_config *cfg = NULL;
    parser p;
    char *line = NULL, *slash, *abs_dir;
    size_t cap = 0;
    int lineno = 0, section = -1;

    memset(&p, 0, sizeof(p));
    p.file = path;
    p.err = err;
    p.errlen = errlen;
    if (errlen > 0)
        err[0] = '\0';
    cfg = calloc(1, sizeof(*cfg));
    if (cfg == NULL || (cfg->file = strdup(path)) == NULL || (cfg->dir = strdup(path)) == NULL)
        goto out;
    slash = strrchr(cfg->dir, '/');
    if (slash == NULL)
        strcpy(cfg->dir, ".");
    else if (slash == cfg->dir)
        slash[1] = '\0';
    else
        *slash = '\0';
    /* Absolute, so that paths stay right whatever the working directory. */
    if ((abs_dir = realpath(cfg->dir, NULL)) != NULL) {
        free(cfg->dir);
        cfg->dir = abs_dir;
    }
    set_defaults(cfg);
    if (f == NULL) {
        rv = fail(&p, 0, "cannot open: %s", strerror(open_errno));
        goto out;
    }
    while (getline(&line, &cap, f) >= 0) {
        lineno++;
        if ((rv = parse_line(&p, cfg, lineno, line, &section)) != P11KMS_OK)
            goto out;
    }
    if (ferror(f)) {
        rv = fail(&p, 0, "read error: %s", strerror(errno));
        goto out;
    }
    cfg->line_last = lineno;
    if ((rv = check_all(&p, cfg)) != P11KMS_OK)
        goto out;
    *out = cfg;
    cfg = NULL;
    rv = P11KMS_OK;
out:
    if (rv == P11KMS_ERR_NO_MEMORY && errlen > 0 && err[0] == '\0')
        snprintf(err, errlen, "%s: out of memory", path);
    free(line);
    if (f != NULL)
        fclose(f);
    kms_config_free(cfg);
    return rv;
}

p11kms_status kms_config_load(const char *path, kms_config **out, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");

    return config_read(path, f, f == NULL ? errno : 0, out, err, errlen);
}

p11kms_status kms_config_parse_buffer(const char *text, size_t len, const char *name,
                                      kms_config **out, char *err, size_t errlen)
{
    static char empty[1];
    /* fmemopen reads the buffer as a file: the very same line loop as
     * kms_config_load (an empty text is an empty stream). */
    FILE *f = fmemopen(len > 0 ? (void *)(uintptr_t)text : empty, len, "r");

    if (f == NULL && errno != ENOMEM)
        return config_read(name, NULL, errno, out, err, errlen);
    if (f == NULL) {
        if (errlen > 0)
            snprintf(err, errlen, "%s: out of memory", name);
        return P11KMS_ERR_NO_MEMORY;
    }
    return config_read(name, f, 0, out, err, errlen);
}

p11kms_status kms_config_check_supported(const kms_config *cfg, char *err, size_t errlen)
{
    PQconninfoOption *opts = NULL;
    char *why = NULL;

    /* store.backend = postgres: the url must parse as a libpq connection
     * string (whether the server answers is the store's business). */
    if (strcmp(cfg->store_backend, "postgres") == 0 && cfg->store_url != NULL) {
        opts = PQconninfoParse(cfg->store_url, &why);
        if (opts == NULL) {
            snprintf(err, errlen, "%s:%d: store.url: not a libpq connection string: %s",
                     cfg->file, cfg->line_backend, why != NULL ? why : "out of memory");
            PQfreemem(why);
            return P11KMS_ERR_BAD_REQUEST;
        }
        PQconninfoFree(opts);
    }
    return P11KMS_OK;
}

void kms_config_free(kms_config *cfg)
{
    if (cfg == NULL)
        return;
    for (size_t i = 0; i < N_KEYS; i++) {
        if (keys[i].kind != K_INT && keys[i].kind != K_MODE)
            free(*(char **)(void *)((char *)cfg + keys[i].offset));
    }
    free(cfg->file);
    free(cfg->dir);
    free(cfg);
}
