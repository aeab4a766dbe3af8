/*
 * kms/cli/kmsctl.h - internals of kmsctl, the admin CLI of p11kms.
 *
 * kmsctl.c parses the global options and dispatches `<noun> <verb>` through
 * the command tables each noun file exports (key.c, dek.c, audit.c,
 * status.c, backup.c).  common.c holds what every command uses: option
 * parsing, the request wrapper around libp11kms's kms_client_call (one
 * transport for the library and the CLI), error and usage reporting, and
 * the table and field printers.
 *
 * Exit status: 0 success, 1 an API, connection or verification failure
 * (one line "kmsctl: <code>: <message>" on stderr), 2 a usage error.
 */
#ifndef P11KMS_CLI_KMSCTL_H
#define P11KMS_CLI_KMSCTL_H

#include <stdio.h>

#include <jansson.h>

#include "kms/client/internal.h"

#define KMS_EXIT_OK    0
#define KMS_EXIT_FAIL  1
#define KMS_EXIT_USAGE 2

/* Most repeated option values (--context) one command takes. */
#define KMS_LIST_MAX 64

typedef struct kms_cli {
    const char *socket; /* --socket, or the default */
    const char *url;    /* --url https://host:port (instead of the socket) */
    const char *cert;   /* --cert, --key, --cacert: mutual TLS with --url */
    const char *keyfile;
    const char *cacert;
    const char *config;  /* --config FILE (backup, restore) */
    int json;            /* --json */
    const char *command; /* "key create", for usage hints */
    p11kms_client *client;
} kms_cli;

typedef struct kms_command {
    const char *verb;     /* NULL: the noun is the whole command (status) */
    const char *synopsis; /* "create NAME" */
    const char *summary;  /* one line */
    const char *help;     /* description and options, man style */
    int (*run)(kms_cli *cli, int argc, char **argv);
} kms_command;

typedef struct kms_noun {
    const char *name;
    const char *summary;
    const char *help; /* extra text for `kmsctl NOUN --help`, may be NULL */
    const kms_command *commands;
    size_t n_commands;
} kms_noun;

extern const kms_noun kms_noun_key, kms_noun_dek, kms_noun_audit, kms_noun_status, kms_noun_backup,
    kms_noun_restore;

/* ---- option parsing (common.c) ---- */

typedef enum kms_opt_kind {
    KMS_OPT_FLAG,   /* int *: set to 1 */
    KMS_OPT_STRING, /* const char **: the value */
    KMS_OPT_LIST,   /* kms_list *: values appended */
} kms_opt_kind;

typedef struct kms_list {
    const char *items[KMS_LIST_MAX];
    int n;
} kms_list;

typedef struct kms_opt {
    const char *name;  /* "--batch" */
    const char *alias; /* "-n" or NULL */
    kms_opt_kind kind;
    void *dst;
} kms_opt;

/* Parse argv (after the verb): the options of opts (NULL-name
 * terminated), the global ones (--json, --socket ...), "--name value" or
 * "--name=value", "--" ending options; positionals go to pos.  Exactly
 * min_pos..max_pos positionals are accepted.  Returns KMS_EXIT_OK, or
 * KMS_EXIT_USAGE after printing the usage error. */
int kms_parse(kms_cli *cli, int argc, char **argv, const kms_opt *opts, const char **pos,
              int min_pos, int max_pos, int *n_pos);

/* Print "kmsctl: usage: <message> (see 'kmsctl <command> --help')" and
 * return KMS_EXIT_USAGE. */
int kms_usage(const kms_cli *cli, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Print "kmsctl: <code>: <message>" and return KMS_EXIT_FAIL. */
int kms_fail(const char *code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Parse a decimal number in [min, max]; 0 or -1. */
int kms_parse_long(const char *s, long min, long max, long *out);

/* Build {"k":"v",...} from --context values (usage error on "k" without
 * '=', an empty name or a repeated name).  *out is a new object. */
int kms_context_arg(const kms_cli *cli, const kms_list *pairs, json_t **out);

/* "customer=42, region=eu" (malloc'ed) from a context object. */
char *kms_context_text(const json_t *ctx);

/* ---- requests ---- */

/* One request (path already escaped).  On failure prints the one-line
 * error and returns KMS_EXIT_FAIL; *reply (may be NULL) is the parsed
 * body on success (may be NULL for an empty body). */
int kms_call(kms_cli *cli, const char *method, const char *path, const json_t *body,
             json_t **reply);

/* printf into a path, escaping each %s argument as a path segment.
 * Returns a malloc'ed string or NULL (out of memory). */
char *kms_path(const char *fmt, ...);

/* ---- output ---- */

/* The API object as it came, indented, on stdout. */
void kms_print_json(const json_t *j);

/* A JSON scalar as text (static buffer for numbers; "-" for null/missing). */
const char *kms_scalar(const json_t *v);

/* "name  value" lines for the scalar fields of obj (nested objects as
 * name.sub; "context" as k=v pairs); arrays of objects are skipped. */
void kms_print_fields(const json_t *obj);

typedef struct kms_table kms_table;
kms_table *kms_table_new(int ncols, const char *const *headers);
/* Append a row of ncols strings (copied; NULL prints "-"). */
int kms_table_add(kms_table *t, const char *const *cells);
void kms_table_print(const kms_table *t, FILE *f);
void kms_table_free(kms_table *t);

/* 1 if fd is a terminal. */
int kms_isatty(int fd);

#endif
