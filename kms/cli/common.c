/*
 * kms/cli/common.c - what every kmsctl command uses: option parsing, the
 * request wrapper (libp11kms's kms_client_call, opened lazily on the
 * first request), one-line error and usage reports, and the printers for
 * fields and aligned tables.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kms/cli/kmsctl.h"

int kms_usage(const kms_cli *cli, const char *fmt, ...)
{
    va_list ap;

    fputs("kmsctl: usage: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (see 'kmsctl%s%s --help')\n", cli != NULL && cli->command ? " " : "",
            cli != NULL && cli->command ? cli->command : "");
    return KMS_EXIT_USAGE;
}

int kms_fail(const char *code, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    /* One line, whatever the message holds. */
    for (char *p = msg; *p != '\0'; p++)
        if (*p == '\n' || *p == '\r')
            *p = ' ';
    fprintf(stderr, "kmsctl: %s: %s\n", code, msg);
    return KMS_EXIT_FAIL;
}

int kms_parse_long(const char *s, long min, long max, long *out)
{
    char *end = NULL;
    long v;

    if (s == NULL || *s == '\0' || *s == '+' || *s == ' ')
        return -1;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || end == NULL || *end != '\0' || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

static const kms_opt *find_opt(const kms_opt *opts, const char *name, size_t len)
{
    for (const kms_opt *o = opts; o != NULL && o->name != NULL; o++) {
        if (strlen(o->name) == len && strncmp(o->name, name, len) == 0)
            return o;
        if (o->alias != NULL && strlen(o->alias) == len && strncmp(o->alias, name, len) == 0)
            return o;
    }
    return NULL;
}

int kms_parse(kms_cli *cli, int argc, char **argv, const kms_opt *opts, const char **pos,
              int min_pos, int max_pos, int *n_pos)
{
    const kms_opt globals[] = {
        {"--json", NULL, KMS_OPT_FLAG, &cli->json},
        {"--socket", NULL, KMS_OPT_STRING, &cli->socket},
        {"--url", NULL, KMS_OPT_STRING, &cli->url},
        {"--cert", NULL, KMS_OPT_STRING, &cli->cert},
        {"--key-file", NULL, KMS_OPT_STRING, &cli->keyfile},
        {"--cacert", NULL, KMS_OPT_STRING, &cli->cacert},
        {NULL, NULL, 0, NULL},
    };
    int n = 0, options_done = 0;

    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *value = NULL, *eq;
        const kms_opt *o;
        size_t len;

        if (options_done || a[0] != '-' || a[1] == '\0') {
            if (n >= max_pos)
                return kms_usage(cli, "unexpected argument '%s'", a);
            pos[n++] = a;
            continue;
        }
        if (strcmp(a, "--") == 0) {
            options_done = 1;
            continue;
        }
        eq = strchr(a, '=');
        len = eq != NULL ? (size_t)(eq - a) : strlen(a);
        if ((o = find_opt(opts, a, len)) == NULL && (o = find_opt(globals, a, len)) == NULL)
            return kms_usage(cli, "unknown option '%.*s'", (int)len, a);
        if (o->kind == KMS_OPT_FLAG) {
            if (eq != NULL)
                return kms_usage(cli, "option '%s' takes no value", o->name);
            *(int *)o->dst = 1;
            continue;
        }
        if (eq != NULL) {
            value = eq + 1;
        } else {
            if (i + 1 >= argc)
                return kms_usage(cli, "option '%s' needs a value", o->name);
            value = argv[++i];
        }
        if (o->kind == KMS_OPT_STRING) {
            *(const char **)o->dst = value;
        } else {
            kms_list *l = o->dst;
            if (l->n >= KMS_LIST_MAX)
                return kms_usage(cli, "option '%s' given more than %d times", o->name,
                                 KMS_LIST_MAX);
            l->items[l->n++] = value;
        }
    }
    if (n < min_pos)
        return kms_usage(cli, "missing argument");
    if (n_pos != NULL)
        *n_pos = n;
    return KMS_EXIT_OK;
}

int kms_context_arg(const kms_cli *cli, const kms_list *pairs, json_t **out)
{
    json_t *ctx = json_object(), *v;
    int rv = KMS_EXIT_FAIL;
    char name[KMS_CONTEXT_NAME_MAX + 1];

    if (ctx == NULL) {
        kms_fail("internal", "out of memory");
        goto out;
    }
    for (int i = 0; i < pairs->n; i++) {
        const char *p = pairs->items[i], *eq = strchr(p, '=');
        size_t len;

        if (eq == NULL || eq == p) {
            rv = kms_usage(cli, "--context wants name=value, not '%s'", p);
            goto out;
        }
        len = (size_t)(eq - p);
        if (len > KMS_CONTEXT_NAME_MAX) {
            rv = kms_usage(cli, "context name longer than %d bytes", KMS_CONTEXT_NAME_MAX);
            goto out;
        }
        memcpy(name, p, len);
        name[len] = '\0';
        if (json_object_get(ctx, name) != NULL) {
            rv = kms_usage(cli, "context name '%s' given twice", name);
            goto out;
        }
        if ((v = json_string(eq + 1)) == NULL || json_object_set_new(ctx, name, v) != 0) {
            rv = kms_usage(cli, "context pair '%s' is not valid UTF-8", p);
            goto out;
        }
    }
    *out = ctx;
    ctx = NULL;
    rv = KMS_EXIT_OK;
out:
    json_decref(ctx);
    return rv;
}

char *kms_context_text(const json_t *ctx)
{
    const char *k;
    json_t *v;
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);

    if (f == NULL)
        return NULL;
    if (json_object_size(ctx) == 0)
        fputs("{}", f);
    else {
        int first = 1;
        json_object_foreach((json_t *)ctx, k, v)
        {
            fprintf(f, "%s%s=%s", first ? "" : ",", k, kms_scalar(v));
            first = 0;
        }
    }
    fclose(f);
    return text;
}

static int open_client(kms_cli *cli)
{
    p11kms_client_options o;
    p11kms_status s;
    char *target = NULL;

    p11kms_client_options_init(&o);
    o.timeout_ms = 600000; /* an unbatched rewrap may take a while */
    if (cli->url != NULL) {
        target = strdup(cli->url);
        o.cert_file = cli->cert;
        o.key_file = cli->keyfile;
        o.ca_file = cli->cacert;
    } else if (asprintf(&target, "unix:%s", cli->socket) < 0) {
        target = NULL;
    }
    if (target == NULL)
        return kms_fail("internal", "out of memory");
    s = p11kms_client_open_options(target, &o, &cli->client);
    if (s == P11KMS_ERR_BAD_REQUEST) {
        kms_usage(cli, "bad server address '%s' (want a socket path or https://host:port)",
                  cli->url != NULL ? cli->url : cli->socket);
        free(target);
        return KMS_EXIT_USAGE;
    }
    free(target);
    if (s != P11KMS_OK)
        return kms_fail(p11kms_status_code(s), "%s", p11kms_strerror(s));
    return KMS_EXIT_OK;
}

int kms_call(kms_cli *cli, const char *method, const char *path, const json_t *body, json_t **reply)
{
    p11kms_status s;
    int rv;

    if (path == NULL)
        return kms_fail("internal", "out of memory");
    if (cli->client == NULL && (rv = open_client(cli)) != KMS_EXIT_OK)
        return rv;
    s = kms_client_call(cli->client, method, path, body, NULL, reply);
    if (s != P11KMS_OK) {
        const char *code = kms_client_error_code(cli->client);
        return kms_fail(code[0] ? code : p11kms_status_code(s), "%s",
                        p11kms_client_error(cli->client));
    }
    return KMS_EXIT_OK;
}

char *kms_path(const char *fmt, ...)
{
    va_list ap;
    char *out = NULL, *segs[4] = {NULL, NULL, NULL, NULL};
    int n = 0, ok = 1;

    /* Escape up to four %s arguments, then format with them. */
    va_start(ap, fmt);
    for (const char *p = fmt; *p != '\0'; p++)
        if (p[0] == '%' && p[1] == 's' && n < 4) {
            const char *seg = va_arg(ap, const char *);
            if ((segs[n++] = kms_path_escape(seg != NULL ? seg : "")) == NULL)
                ok = 0;
        }
    va_end(ap);
    if (ok) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
        if (asprintf(&out, fmt, segs[0], segs[1], segs[2], segs[3]) < 0)
            out = NULL;
#pragma GCC diagnostic pop
    }
    for (int i = 0; i < 4; i++)
        free(segs[i]);
    return out;
}

void kms_print_json(const json_t *j)
{
    if (j == NULL) {
        puts("{}");
        return;
    }
    json_dumpf(j, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    putchar('\n');
}

const char *kms_scalar(const json_t *v)
{
    static char buf[64];

    switch (json_typeof(v)) {
    case JSON_STRING: return json_string_value(v);
    case JSON_INTEGER:
        snprintf(buf, sizeof(buf), "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return buf;
    case JSON_REAL: snprintf(buf, sizeof(buf), "%g", json_real_value(v)); return buf;
    case JSON_TRUE: return "true";
    case JSON_FALSE: return "false";
    default: return "-";
    }
}

/* Collect name/value rows of obj into t, nested objects flattened. */
static void collect_fields(kms_table *t, const json_t *obj, const char *prefix)
{
    const char *k;
    json_t *v;

    json_object_foreach((json_t *)obj, k, v)
    {
        char name[256];
        snprintf(name, sizeof(name), "%s%s%s", prefix, prefix[0] ? "." : "", k);
        if (json_is_object(v) && strcmp(k, "context") != 0) {
            collect_fields(t, v, name);
        } else if (json_is_object(v)) {
            char *text = kms_context_text(v);
            const char *row[2] = {name, text};
            kms_table_add(t, row);
            free(text);
        } else if (json_is_array(v)) {
            size_t i;
            json_t *e;
            char *text = NULL;
            size_t len = 0;
            FILE *f;
            int scalars = 1;
            json_array_foreach(v, i, e) if (json_is_object(e) || json_is_array(e)) scalars = 0;
            if (!scalars || (f = open_memstream(&text, &len)) == NULL)
                continue;
            json_array_foreach(v, i, e) fprintf(f, "%s%s", i ? "," : "", kms_scalar(e));
            fclose(f);
            {
                const char *row[2] = {name, text};
                kms_table_add(t, row);
            }
            free(text);
        } else {
            const char *row[2] = {name, kms_scalar(v)};
            kms_table_add(t, row);
        }
    }
}

void kms_print_fields(const json_t *obj)
{
    kms_table *t = kms_table_new(2, NULL);

    if (t == NULL)
        return;
    collect_fields(t, obj, "");
    kms_table_print(t, stdout);
    kms_table_free(t);
}

struct kms_table {
    int ncols;
    char **headers; /* NULL: no header line */
    char ***rows;
    size_t nrows, cap;
};

kms_table *kms_table_new(int ncols, const char *const *headers)
{
    kms_table *t = calloc(1, sizeof(*t));

    if (t == NULL)
        return NULL;
    t->ncols = ncols;
    if (headers != NULL) {
        if ((t->headers = calloc((size_t)ncols, sizeof(char *))) == NULL) {
            free(t);
            return NULL;
        }
        for (int i = 0; i < ncols; i++)
            t->headers[i] = strdup(headers[i]);
    }
    return t;
}

int kms_table_add(kms_table *t, const char *const *cells)
{
    char **row;

    if (t->nrows == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 16;
        char ***nr = realloc(t->rows, cap * sizeof(*nr));
        if (nr == NULL)
            return -1;
        t->rows = nr;
        t->cap = cap;
    }
    if ((row = calloc((size_t)t->ncols, sizeof(char *))) == NULL)
        return -1;
    for (int i = 0; i < t->ncols; i++)
        row[i] = strdup(cells[i] != NULL ? cells[i] : "-");
    t->rows[t->nrows++] = row;
    return 0;
}

static void print_row(char **cells, const size_t *w, int ncols, FILE *f)
{
    for (int i = 0; i < ncols; i++) {
        const char *c = cells[i] != NULL ? cells[i] : "";
        if (i == ncols - 1)
            fprintf(f, "%s\n", c);
        else
            fprintf(f, "%-*s  ", (int)w[i], c);
    }
}

void kms_table_print(const kms_table *t, FILE *f)
{
    size_t w[16] = {0};
    int ncols = t->ncols < 16 ? t->ncols : 16;

    for (int i = 0; i < ncols; i++) {
        if (t->headers != NULL && t->headers[i] != NULL)
            w[i] = strlen(t->headers[i]);
        for (size_t r = 0; r < t->nrows; r++)
            if (t->rows[r][i] != NULL && strlen(t->rows[r][i]) > w[i])
                w[i] = strlen(t->rows[r][i]);
    }
    if (t->headers != NULL)
        print_row(t->headers, w, ncols, f);
    for (size_t r = 0; r < t->nrows; r++)
        print_row(t->rows[r], w, ncols, f);
}

void kms_table_free(kms_table *t)
{
    if (t == NULL)
        return;
    for (size_t r = 0; r < t->nrows; r++) {
        for (int i = 0; i < t->ncols; i++)
            free(t->rows[r][i]);
        free(t->rows[r]);
    }
    free(t->rows);
    if (t->headers != NULL)
        for (int i = 0; i < t->ncols; i++)
            free(t->headers[i]);
    free(t->headers);
    free(t);
}

int kms_isatty(int fd)
{
    return isatty(fd) == 1;
}
