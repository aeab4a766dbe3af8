/*
 * tests/test_kmsctl_cli.c - kmsctl against a real kmsd (own SoftHSM2
 * token): every command, human output and --json (parsed with jansson),
 * --help at every level, usage errors (exit 2), API and connection errors
 * (exit 1, one line "kmsctl: <code>: <message>" on stderr), the default
 * socket, bulk-destroy confirmation on a terminal, key rotation and
 * batched rewrap (plain progress lines, and the progress bar on a
 * pseudo-terminal), status, backup answers and restore refuses while kmsd
 * runs (the restore drill: test_kmsctl_backup.c).
 *
 * kmsd serves every route kmsctl calls: each command must succeed here
 * (tests/test_kmsctl_fake.c keeps only answers a real kmsd never gives).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "support/kmsctl_run.h"
#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

static kh_kmsd K;

static void start(void)
{
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsctl-cli", NULL, NULL), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

/* kmsctl --socket SOCK args... ; env may be NULL. */
static int ctl_run(kr_result *r, const char *const *env, const char *const *args)
{
    const char *argv[64];
    int n = 0;

    argv[n++] = KMSCTL_PATH;
    argv[n++] = "--socket";
    argv[n++] = K.sock;
    for (int i = 0; args[i] != NULL && n < 63; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    return kr_run(argv, NULL, env, r);
}
#define CTL(r, ...) ctl_run((r), NULL, (const char *const[]){__VA_ARGS__, NULL})

/* Success with --json: stdout parsed, stderr empty. */
static json_t *ctl_json(const char *const *args)
{
    const char *argv[64];
    int n = 0;
    kr_result r;
    json_error_t jerr;
    json_t *j;

    argv[n++] = "--json";
    for (int i = 0; args[i] != NULL && n < 60; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    ctl_run(&r, NULL, argv);
    ck_assert_msg(r.status == 0, "kmsctl %s: exit %d: %s", args[0], r.status, r.err);
    ck_assert_str_eq(r.err, "");
    j = json_loads(r.out, 0, &jerr);
    ck_assert_msg(j != NULL, "not JSON: %s", r.out);
    kr_free(&r);
    return j;
}
#define CTL_JSON(...) ctl_json((const char *const[]){__VA_ARGS__, NULL})

/* An error: exit 1, nothing on stdout, exactly one stderr line
 * "kmsctl: <code>: ...".  Returns the message part (static). */
static const char *expect_error(kr_result *r, const char *code)
{
    static char msg[512];
    char prefix[128];

    snprintf(prefix, sizeof(prefix), "kmsctl: %s: ", code);
    ck_assert_msg(r->status == 1, "exit %d, want 1 (stderr: %s)", r->status, r->err);
    ck_assert_str_eq(r->out, "");
    ck_assert_int_eq(kr_lines(r->err), 1);
    ck_assert_msg(strncmp(r->err, prefix, strlen(prefix)) == 0, "stderr '%s', want '%s...'", r->err,
                  prefix);
    snprintf(msg, sizeof(msg), "%s", r->err + strlen(prefix));
    msg[strcspn(msg, "\n")] = '\0';
    kr_free(r);
    return msg;
}
static const char *ctl_error(const char *code, const char *const *args)
{
    kr_result r;

    ctl_run(&r, NULL, args);
    return expect_error(&r, code);
}
#define CTL_ERROR(code, ...) ctl_error((code), (const char *const[]){__VA_ARGS__, NULL})

static void expect_usage(kr_result *r)
{
    ck_assert_msg(r->status == 2, "exit %d, want 2 (stderr: %s)", r->status, r->err);
    ck_assert_str_eq(r->out, "");
    ck_assert_int_eq(kr_lines(r->err), 1);
    ck_assert_msg(strncmp(r->err, "kmsctl: usage: ", 15) == 0, "stderr: %s", r->err);
    kr_free(r);
}
static void ctl_usage(const char *const *args)
{
    kr_result r;

    ctl_run(&r, NULL, args);
    expect_usage(&r);
}
#define CTL_USAGE(...) ctl_usage((const char *const[]){__VA_ARGS__, NULL})

/* A command with --json that must succeed: returns 1 (*out set when out
 * is not NULL, from the --json output).  (It once also accepted the
 * "not implemented yet" error of routes kmsd did not serve; it no longer
 * does.) */
static int maybe(json_t **out, const char *const *args)
{
    const char *argv[64];
    int n = 0;
    kr_result r;

    argv[n++] = "--json";
    for (int i = 0; args[i] != NULL && n < 60; i++)
        argv[n++] = args[i];
    argv[n] = NULL;
    ctl_run(&r, NULL, argv);
    ck_assert_msg(r.status == 0, "kmsctl %s %s: exit %d: %s", args[0], args[1], r.status, r.err);
    if (out != NULL) {
        *out = json_loads(r.out, 0, NULL);
        ck_assert_msg(*out != NULL, "not JSON: %s", r.out);
    }
    kr_free(&r);
    return 1;
}
#define MAYBE(out, ...) maybe((out), (const char *const[]){__VA_ARGS__, NULL})

static json_t *generate(const char *key, const char *customer)
{
    char ctx[64];

    snprintf(ctx, sizeof(ctx), "customer=%s", customer);
    return CTL_JSON("dek", "generate", key, "--context", ctx);
}

START_TEST(help_everywhere)
{
    static const char *const nouns[][12] = {
        {"key", "create", "list", "show", "rotate", "disable", "enable", "config", "rewrap",
         "retire", NULL},
        {"dek", "generate", "decrypt", "show", "list", "revoke", "destroy", NULL},
        {"audit", "tail", "verify", NULL},
    };
    kr_result r;

    {
        const char *argv[] = {KMSCTL_PATH, "--help", NULL};
        ck_assert_int_eq(kr_run(argv, NULL, NULL, &r), 0);
        ck_assert_ptr_nonnull(strstr(r.out, "Usage: kmsctl [--socket PATH] [--json]"));
        for (size_t i = 0; i < 3; i++)
            for (int j = 1; nouns[i][j] != NULL; j++) {
                char line[64];
                snprintf(line, sizeof(line), "  %s %s", nouns[i][0], nouns[i][j]);
                ck_assert_msg(strstr(r.out, line) != NULL, "top help lacks '%s'", line);
            }
        ck_assert_ptr_nonnull(strstr(r.out, "  status "));
        ck_assert_ptr_nonnull(strstr(r.out, "--config FILE backup OUT"));
        ck_assert_ptr_nonnull(strstr(r.out, "--config FILE restore IN"));
        ck_assert_ptr_nonnull(strstr(r.out, "Exit status"));
        ck_assert_str_eq(r.err, "");
        kr_free(&r);
    }
    for (size_t i = 0; i < 3; i++) {
        const char *argv[] = {KMSCTL_PATH, nouns[i][0], "--help", NULL};
        ck_assert_int_eq(kr_run(argv, NULL, NULL, &r), 0);
        ck_assert_ptr_nonnull(strstr(r.out, "Verbs:"));
        kr_free(&r);
        for (int j = 1; nouns[i][j] != NULL; j++) {
            const char *argv2[] = {KMSCTL_PATH, nouns[i][0], nouns[i][j], "--help", NULL};
            char usage[64];
            ck_assert_int_eq(kr_run(argv2, NULL, NULL, &r), 0);
            snprintf(usage, sizeof(usage), "Usage: kmsctl [global options] %s %s", nouns[i][0],
                     nouns[i][j]);
            ck_assert_msg(strstr(r.out, usage) != NULL, "%s %s --help: %s", nouns[i][0],
                          nouns[i][j], r.out);
            ck_assert_ptr_nonnull(strstr(r.out, "Exit status"));
            ck_assert_str_eq(r.err, "");
            kr_free(&r);
        }
    }
    {
        const char *argv[] = {KMSCTL_PATH, "status", "--help", NULL};
        ck_assert_int_eq(kr_run(argv, NULL, NULL, &r), 0);
        ck_assert_ptr_nonnull(strstr(r.out, "Usage: kmsctl [global options] status"));
        kr_free(&r);
    }
    {
        /* --help wins over missing arguments */
        const char *argv[] = {KMSCTL_PATH, "key", "retire", "-h", NULL};
        ck_assert_int_eq(kr_run(argv, NULL, NULL, &r), 0);
        ck_assert_ptr_nonnull(strstr(r.out, "--version V"));
        kr_free(&r);
    }
}
END_TEST

START_TEST(usage_errors)
{
    kr_result r;
    const char *argv[] = {KMSCTL_PATH, NULL};

    ck_assert_int_eq(kr_run(argv, NULL, NULL, &r), 2);
    expect_usage(&r);
    CTL_USAGE("frobnicate");
    CTL_USAGE("key");
    CTL_USAGE("key", "explode");
    CTL_USAGE("key", "create");
    CTL_USAGE("key", "create", "a", "b");
    CTL_USAGE("key", "list", "--bogus");
    CTL_USAGE("key", "config", "k");
    CTL_USAGE("key", "config", "k", "--min-decrypt-version", "zero");
    CTL_USAGE("key", "config", "k", "--rotation-period", "90 days");
    CTL_USAGE("key", "rewrap", "k", "--batch", "0");
    CTL_USAGE("key", "retire", "k");
    CTL_USAGE("key", "retire", "k", "--version", "-1");
    CTL_USAGE("dek", "generate", "k", "--context", "novalue");
    CTL_USAGE("dek", "generate", "k", "--context", "=v");
    CTL_USAGE("dek", "generate", "k", "--context", "a=1", "--context", "a=2");
    CTL_USAGE("dek", "generate", "k", "--context");
    CTL_USAGE("dek", "list");
    CTL_USAGE("dek", "list", "--key", "k", "--state", "sleeping");
    CTL_USAGE("dek", "revoke", "0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f");
    CTL_USAGE("dek", "revoke", "0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f", "--reason", "bored");
    CTL_USAGE("dek", "revoke", "--key", "k");
    CTL_USAGE("dek", "destroy");
    CTL_USAGE("dek", "destroy", "id", "--key", "k", "--context", "a=b");
    CTL_USAGE("dek", "destroy", "id", "--reason", "compromised");
    CTL_USAGE("audit", "tail", "-n", "x");
    CTL_USAGE("status", "extra");
    CTL_USAGE("backup", "out.db");
    CTL_USAGE("restore", "in.db");
}
END_TEST

START_TEST(key_commands)
{
    json_t *k, *list, *v;
    kr_result r;
    int found = 0;
    size_t i;

    /* human output */
    ck_assert_int_eq(CTL(&r, "key", "create", "customers"), 0);
    ck_assert_str_eq(r.err, "");
    ck_assert_ptr_nonnull(strstr(r.out, "name                 customers\n"));
    ck_assert_ptr_nonnull(strstr(r.out, "state                enabled\n"));
    ck_assert_ptr_nonnull(strstr(r.out, "VERSION  STATE   CREATED"));
    kr_free(&r);

    /* --json: the API object, as it is */
    k = CTL_JSON("key", "create", "orders");
    ck_assert_str_eq(json_string_value(json_object_get(k, "name")), "orders");
    ck_assert_str_eq(json_string_value(json_object_get(k, "state")), "enabled");
    ck_assert_int_eq(json_integer_value(json_object_get(k, "latest_version")), 1);
    ck_assert_int_eq(json_array_size(json_object_get(k, "versions")), 1);
    json_decref(k);

    k = CTL_JSON("key", "show", "customers");
    ck_assert_str_eq(json_string_value(json_object_get(k, "name")), "customers");
    ck_assert_int_eq(json_integer_value(json_object_get(k, "min_decrypt_version")), 1);
    json_decref(k);
    /* --json after the command works too */
    {
        const char *argv[] = {KMSCTL_PATH, "--socket",  K.sock,   "key",
                              "show",      "customers", "--json", NULL};
        ck_assert_int_eq(kr_run(argv, NULL, NULL, &r), 0);
        k = json_loads(r.out, 0, NULL);
        ck_assert_ptr_nonnull(k);
        json_decref(k);
        kr_free(&r);
    }

    list = CTL_JSON("key", "list");
    json_array_foreach(json_object_get(list, "keys"), i,
                       v) if (strcmp(json_string_value(json_object_get(v, "name")), "orders") == 0)
        found = 1;
    ck_assert(found);
    json_decref(list);

    ck_assert_int_eq(CTL(&r, "key", "list"), 0);
    ck_assert(strncmp(r.out, "NAME ", 5) == 0);
    ck_assert_ptr_nonnull(strstr(r.out, "\ncustomers "));
    ck_assert_ptr_nonnull(strstr(r.out, "\norders "));
    /* aligned: STATE starts in the same column on every line */
    {
        char *line = r.out;
        long col = -1;
        while (*line != '\0') {
            char *eol = strchr(line, '\n');
            char *p = strstr(line, strncmp(line, "NAME", 4) == 0 ? "STATE" : "enabled");
            ck_assert_ptr_nonnull(p);
            ck_assert(p < eol);
            if (col < 0)
                col = p - line;
            ck_assert_int_eq(p - line, col);
            line = eol + 1;
        }
    }
    kr_free(&r);

    ck_assert_str_eq(CTL_ERROR("key_exists", "key", "create", "customers"),
                     "key 'customers' already exists");
    CTL_ERROR("key_not_found", "key", "show", "nope");
    CTL_ERROR("bad_request", "key", "create", "Bad Name");
    CTL_ERROR("bad_request", "key", "show", "UPPER");
    /* a slash in a name is escaped, never a path */
    CTL_ERROR("bad_request", "key", "show", "a/b");
}
END_TEST

/* Rotation, enable/disable, config and retire: --json objects and the
 * human lines. */
START_TEST(key_rotation_commands)
{
    json_t *k = NULL;
    kr_result r;

    json_decref(CTL_JSON("key", "create", "rot"));
    k = CTL_JSON("key", "rotate", "rot");
    ck_assert_int_eq(json_integer_value(json_object_get(k, "latest_version")), 2);
    ck_assert_int_eq(json_array_size(json_object_get(k, "versions")), 2);
    json_decref(k);
    ck_assert_int_eq(CTL(&r, "key", "rotate", "rot"), 0);
    ck_assert_ptr_nonnull(strstr(r.out, "latest_version       3\n"));
    ck_assert_str_eq(r.err, "");
    kr_free(&r);

    k = CTL_JSON("key", "disable", "rot");
    ck_assert_str_eq(json_string_value(json_object_get(k, "state")), "disabled");
    json_decref(k);
    CTL_ERROR("key_disabled", "dek", "generate", "rot");
    ck_assert_int_eq(CTL(&r, "key", "enable", "rot"), 0);
    ck_assert_ptr_nonnull(strstr(r.out, "state                enabled\n"));
    kr_free(&r);

    k = CTL_JSON("key", "config", "rot", "--rotation-period", "90d");
    ck_assert_str_eq(json_string_value(json_object_get(k, "rotation_period")), "90d");
    json_decref(k);
    ck_assert_int_eq(
        CTL(&r, "key", "config", "rot", "--min-decrypt-version", "2", "--rotation-period", "12h"),
        0);
    ck_assert_ptr_nonnull(strstr(r.out, "rotation_period      12h\n"));
    ck_assert_ptr_nonnull(strstr(r.out, "min_decrypt_version  2\n"));
    kr_free(&r);

    /* version 1: no DEKs, below min_decrypt_version: retirable */
    ck_assert_int_eq(CTL(&r, "key", "retire", "rot", "--version", "1"), 0);
    ck_assert_str_eq(r.out, "retired version 1 of key rot: its token object is destroyed\n");
    kr_free(&r);
    k = CTL_JSON("key", "show", "rot");
    ck_assert_str_eq(json_string_value(json_object_get(
                         json_array_get(json_object_get(k, "versions"), 0), "state")),
                     "destroyed");
    json_decref(k);
    CTL_ERROR("key_not_found", "key", "rotate", "nope");
}
END_TEST

/* n DEKs of key (no context) straight over HTTP: faster than kmsctl. */
static void generate_many(const char *key, int n)
{
    char path[128];

    snprintf(path, sizeof(path), "/v1/keys/%s/datakeys", key);
    for (int i = 0; i < n; i++) {
        long status = 0;
        json_t *j = ku_call(&K, "POST", path, "{}", &status);
        ck_assert_int_eq(status, 201);
        json_decref(j);
    }
}

/* key rewrap --batch N: plain progress lines on stderr when it is not a
 * terminal, --json the totals, a progress bar on a pseudo-terminal. */
START_TEST(key_rewrap_progress)
{
    json_t *j;
    kr_result r;

    json_decref(CTL_JSON("key", "create", "big"));
    generate_many("big", 25);
    json_decref(CTL_JSON("key", "rotate", "big"));
    ck_assert_int_eq(CTL(&r, "key", "rewrap", "big", "--batch", "10"), 0);
    ck_assert_str_eq(r.out, "rewrapped 25 data keys of big onto its latest version\n");
    ck_assert_str_eq(r.err, "rewrap big: 10 rewrapped, 15 remaining\n"
                            "rewrap big: 20 rewrapped, 5 remaining\n"
                            "rewrap big: 25 rewrapped, 0 remaining\n");
    kr_free(&r);
    /* nothing left: one call, 0 of 0 */
    ck_assert_int_eq(CTL(&r, "key", "rewrap", "big", "--batch", "10"), 0);
    ck_assert_str_eq(r.err, "rewrap big: 0 rewrapped, 0 remaining\n");
    kr_free(&r);

    json_decref(CTL_JSON("key", "rotate", "big"));
    ck_assert_int_eq(CTL(&r, "--json", "key", "rewrap", "big"), 0);     /* default batch 1000 */
    ck_assert_str_eq(r.err, "rewrap big: 25 rewrapped, 0 remaining\n"); /* one call */
    j = json_loads(r.out, 0, NULL);
    ck_assert_ptr_nonnull(j);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "rewrapped")), 25);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "remaining")), 0);
    json_decref(j);
    kr_free(&r);

    /* on a terminal: redrawn in place with \r: bar, percentage, counts,
     * rate, ETA; no plain lines */
    json_decref(CTL_JSON("key", "rotate", "big"));
    {
        const char *argv[] = {KMSCTL_PATH, "--socket", K.sock, "key", "rewrap",
                              "big",       "--batch",  "5",    NULL};
        ck_assert_int_eq(kr_run_pty(argv, NULL, NULL, &r), 0);
        ck_assert_ptr_nonnull(strstr(r.out, "\r[######"));
        ck_assert_ptr_nonnull(strstr(r.out, " 20%  5/25  "));
        ck_assert_ptr_nonnull(strstr(r.out, "100%  25/25  "));
        ck_assert_ptr_nonnull(strstr(r.out, "DEKs/s  ETA "));
        ck_assert_ptr_nonnull(strstr(r.out, "rewrapped 25 data keys of big"));
        ck_assert_ptr_null(strstr(r.out, "remaining\r\n"));
        kr_free(&r);
    }
    CTL_ERROR("key_not_found", "key", "rewrap", "nope");
}
END_TEST

/* dek list follows the API's cursors past the first page (100). */
START_TEST(dek_list_follows_cursors)
{
    json_t *j;
    kr_result r;

    json_decref(CTL_JSON("key", "create", "paged"));
    generate_many("paged", 105);
    j = CTL_JSON("dek", "list", "--key", "paged", "--state", "active");
    ck_assert_int_eq(json_array_size(json_object_get(j, "datakeys")), 105);
    ck_assert_ptr_null(json_object_get(j, "next"));
    json_decref(j);
    ck_assert_int_eq(CTL(&r, "dek", "list", "--key", "paged"), 0);
    ck_assert_msg(strncmp(r.out, "DEK_ID                                VERSION  STATE ", 53) == 0,
                  "%.200s", r.out);
    ck_assert_int_eq(kr_lines(r.out), 106);
    kr_free(&r);
}
END_TEST

START_TEST(dek_generate_decrypt)
{
    json_t *g, *d;
    char id[64], plain[64];
    kr_result r;

    json_decref(CTL_JSON("key", "create", "deks"));
    g = CTL_JSON("dek", "generate", "deks", "--context", "customer=42", "-c", "region=eu");
    snprintf(id, sizeof(id), "%s", json_string_value(json_object_get(g, "dek_id")));
    snprintf(plain, sizeof(plain), "%s", json_string_value(json_object_get(g, "plaintext")));
    ck_assert_uint_eq(strlen(id), 36);
    ck_assert_str_eq(json_string_value(json_object_get(g, "key")), "deks");
    ck_assert_int_eq(json_integer_value(json_object_get(g, "version")), 1);
    json_decref(g);

    d = CTL_JSON("dek", "decrypt", id, "--context=region=eu", "--context", "customer=42");
    ck_assert_str_eq(json_string_value(json_object_get(d, "plaintext")), plain);
    ck_assert_str_eq(json_string_value(json_object_get(d, "dek_id")), id);
    json_decref(d);

    /* human output: one field per line */
    ck_assert_int_eq(CTL(&r, "dek", "decrypt", id, "-c", "customer=42", "-c", "region=eu"), 0);
    ck_assert_ptr_nonnull(strstr(r.out, "dek_id     "));
    ck_assert_ptr_nonnull(strstr(r.out, plain));
    kr_free(&r);

    CTL_ERROR("context_mismatch", "dek", "decrypt", id, "--context", "customer=43", "--context",
              "region=eu");
    CTL_ERROR("context_mismatch", "dek", "decrypt", id);
    CTL_ERROR("dek_not_found", "dek", "decrypt", "0b5e2a5c-6a4e-4f51-9e0e-5f7a8c9d0e1f");
    ck_assert_str_eq(CTL_ERROR("bad_request", "dek", "decrypt", "not-a-uuid"),
                     "dek_id must be a UUID in canonical lowercase form");
    CTL_ERROR("key_not_found", "dek", "generate", "nope");

    /* no context at all */
    g = CTL_JSON("dek", "generate", "deks");
    d = CTL_JSON("dek", "decrypt", json_string_value(json_object_get(g, "dek_id")));
    ck_assert_str_eq(json_string_value(json_object_get(d, "plaintext")),
                     json_string_value(json_object_get(g, "plaintext")));
    json_decref(g);
    json_decref(d);
}
END_TEST

START_TEST(dek_lifecycle_commands)
{
    json_t *g, *j = NULL;
    char id[64];
    kr_result r;

    json_decref(CTL_JSON("key", "create", "life"));
    g = generate("life", "7");
    snprintf(id, sizeof(id), "%s", json_string_value(json_object_get(g, "dek_id")));
    json_decref(g);
    json_decref(generate("life", "8"));

    if (MAYBE(&j, "dek", "show", id)) {
        ck_assert_str_eq(json_string_value(json_object_get(j, "dek_id")), id);
        ck_assert_str_eq(json_string_value(json_object_get(j, "state")), "active");
        ck_assert_ptr_null(json_object_get(j, "plaintext"));
        json_decref(j);
    }
    if (MAYBE(&j, "dek", "list", "--key", "life")) {
        ck_assert_int_ge(json_array_size(json_object_get(j, "datakeys")), 2);
        json_decref(j);
    }
    if (MAYBE(&j, "dek", "list", "--key", "life", "--state", "revoked")) {
        ck_assert_int_eq(json_array_size(json_object_get(j, "datakeys")), 0);
        json_decref(j);
    }
    if (MAYBE(&j, "dek", "revoke", id, "--reason", "compromised")) {
        ck_assert_str_eq(json_string_value(json_object_get(j, "state")), "revoked");
        json_decref(j);
        CTL_ERROR("dek_revoked", "dek", "decrypt", id, "--context", "customer=7");
    }
    if (MAYBE(&j, "dek", "destroy", id)) {
        ck_assert_str_eq(json_string_value(json_object_get(j, "state")), "destroyed");
        json_decref(j);
        CTL_ERROR("dek_destroyed", "dek", "decrypt", id, "--context", "customer=7");
    }
    if (MAYBE(&j, "dek", "revoke", "--key", "life", "--context", "customer=8")) {
        ck_assert_int_eq(json_integer_value(json_object_get(j, "count")), 1);
        json_decref(j);
    }
    if (MAYBE(&j, "dek", "destroy", "--key", "life", "--context", "customer=8", "--yes")) {
        ck_assert_int_eq(json_integer_value(json_object_get(j, "count")), 1);
        json_decref(j);
    }
    /* bulk destroy without --yes, stdin not a terminal: refused before any request */
    CTL_USAGE("dek", "destroy", "--key", "life", "--context", "customer=8");
    /* on a terminal it asks; anything but "yes" aborts and nothing is sent */
    {
        const char *argv[] = {KMSCTL_PATH, "--socket", K.sock,      "dek",        "destroy",
                              "--key",     "life",     "--context", "customer=8", NULL};
        int st = kr_run_pty(argv, "Type 'yes'", "no\n", &r);
        ck_assert_ptr_nonnull(strstr(r.out, "Destroy every data key of key 'life'"));
        ck_assert_ptr_nonnull(strstr(r.out, "customer=8"));
        ck_assert_ptr_nonnull(strstr(r.out, "kmsctl: aborted: nothing destroyed"));
        ck_assert_int_eq(st, 1);
        kr_free(&r);
        st = kr_run_pty(argv, "Type 'yes'", "yes\n", &r);
        ck_assert_ptr_null(strstr(r.out, "aborted"));
        /* answered yes: the request went out and worked (nothing left to destroy) */
        ck_assert_msg(st == 0, "exit %d: %s", st, r.out);
        ck_assert_ptr_nonnull(strstr(r.out, "destroyed 0 data keys of key life"));
        kr_free(&r);
    }
}
END_TEST

/* status: the token, store and audit lines and the counts table, and
 * --json the API object; the counts follow a generate. */
START_TEST(status_command)
{
    json_t *j, *deks;
    json_int_t active;
    kr_result r;
    char want[128];

    j = CTL_JSON("status");
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "token"), "label")),
                     K.tt.label);
    ck_assert(json_is_true(json_object_get(json_object_get(j, "token"), "present")));
    ck_assert(json_is_integer(json_object_get(json_object_get(j, "token"), "slot")));
    ck_assert_str_eq(json_string_value(json_object_get(json_object_get(j, "store"), "backend")),
                     ts_backend_name());
    ck_assert(json_is_true(json_object_get(json_object_get(j, "store"), "ok")));
    ck_assert_str_eq(json_string_value(json_object_get(j, "audit")), "ok");
    ck_assert(json_is_integer(json_object_get(j, "keys")));
    deks = json_object_get(j, "datakeys");
    active = json_integer_value(json_object_get(deks, "active"));
    ck_assert(json_is_integer(json_object_get(deks, "revoked")));
    ck_assert(json_is_integer(json_object_get(deks, "destroyed")));
    json_decref(j);

    json_decref(CTL_JSON("key", "create", "stat"));
    generate_many("stat", 2);
    j = CTL_JSON("status");
    ck_assert_int_eq(json_integer_value(json_object_get(json_object_get(j, "datakeys"), "active")),
                     active + 2);
    ck_assert_int_eq(CTL(&r, "status"), 0);
    ck_assert_str_eq(r.err, "");
    ck_assert(strncmp(r.out, "COMPONENT  STATE    DETAIL\n", 27) == 0);
    snprintf(want, sizeof(want), "\ntoken      present  label \"%s\", slot ", K.tt.label);
    ck_assert_msg(strstr(r.out, want) != NULL, "status: %s", r.out);
    snprintf(want, sizeof(want), "\nstore      ok       %s\n", ts_backend_name());
    ck_assert_msg(strstr(r.out, want) != NULL, "status: %s", r.out);
    ck_assert_ptr_nonnull(strstr(r.out, "\naudit      ok       "));
    ck_assert_ptr_nonnull(strstr(r.out, "\n\nKEYS  DEKS ACTIVE  REVOKED  DESTROYED\n"));
    snprintf(
        want, sizeof(want), "%-4lld  %-11lld  %-7lld  %lld\n",
        (long long)json_integer_value(json_object_get(j, "keys")), (long long)(active + 2),
        (long long)json_integer_value(json_object_get(json_object_get(j, "datakeys"), "revoked")),
        (long long)json_integer_value(
            json_object_get(json_object_get(j, "datakeys"), "destroyed")));
    ck_assert_msg(strstr(r.out, want) != NULL, "status lacks '%s': %s", want, r.out);
    kr_free(&r);
    json_decref(j);
}
END_TEST

START_TEST(audit_backup)
{
    json_t *j = NULL;
    kr_result r;

    if (MAYBE(&j, "audit", "tail", "-n", "5")) {
        ck_assert_int_le(json_array_size(json_object_get(j, "entries")), 5);
        json_decref(j);
    }
    if (MAYBE(&j, "audit", "verify")) {
        ck_assert(json_is_true(json_object_get(j, "ok")));
        json_decref(j);
    }
    {
        /* The real work is tested in test_kmsctl_backup.c: here, that
         * backup answers and restore refuses while kmsd runs. */
        char out[400];
        snprintf(out, sizeof(out), "%s/cli-backup.db", K.dir);
        const char *argv[] = {KMSCTL_PATH, "--config", K.conf, "backup", out, NULL};
        kr_run(argv, NULL, NULL, &r);
        if (ts_backend_is_pg()) {
            ck_assert_ptr_nonnull(strstr(r.err, "docs/operations.md"));
            ck_assert_int_eq(r.status, 1);
        } else {
            ck_assert_msg(r.status == 0, "backup: %s", r.err);
        }
        kr_free(&r);
    }
    {
        char in[400];
        snprintf(in, sizeof(in), "%s/cli-backup.db", K.dir);
        const char *argv[] = {KMSCTL_PATH, "--config", K.conf, "restore", in, NULL};
        kr_run(argv, NULL, NULL, &r);
        ck_assert_int_eq(r.status, 1);
        ck_assert_msg(strstr(r.err, ts_backend_is_pg() ? "docs/operations.md" : "kmsd is running") != NULL,
                      "restore: %s", r.err);
        kr_free(&r);
    }
}
END_TEST

/* The audit log through kmsctl (kmsd's side: test_kmsd_audit.c): tail
 * pages through more than one page (1000 entries) and keeps the last N,
 * --after, the table and --json; verify says ok, then names the first bad
 * entry (exit 1) once a row is edited behind kmsd's back, and ok again
 * once it is put back. */
START_TEST(audit_tail_and_verify)
{
    CURL *c = curl_easy_init();
    kh_response resp;
    kr_result r;
    json_t *j, *e;
    json_int_t last, seq;
    char after[32], want[96];

    ck_assert_ptr_nonnull(c);
    for (int i = 0; i < 1005; i++) { /* one audit entry each */
        ck_assert_int_eq(kh_request_h(c, K.sock, "GET", "/v1/keys", NULL, 0, NULL, &resp), 0);
        ck_assert_int_eq(resp.status, 200);
        kh_response_free(&resp);
    }
    curl_easy_cleanup(c);

    j = CTL_JSON("audit", "tail", "-n", "3");
    e = json_object_get(j, "entries");
    ck_assert_int_eq(json_array_size(e), 3);
    last = json_integer_value(json_object_get(json_array_get(e, 2), "seq"));
    ck_assert_int_gt(last, 1005);
    for (int i = 0; i < 3; i++) {
        const json_t *x = json_array_get(e, (size_t)i);
        ck_assert_int_eq(json_integer_value(json_object_get(x, "seq")), last - 2 + i);
        ck_assert_ptr_nonnull(json_string_value(json_object_get(x, "principal")));
        ck_assert_ptr_nonnull(json_string_value(json_object_get(x, "operation")));
        ck_assert_ptr_nonnull(json_string_value(json_object_get(x, "time")));
        ck_assert_str_eq(json_string_value(json_object_get(x, "result")), "ok");
    }
    /* the newest of them is one of the pages kmsctl itself read */
    ck_assert_str_eq(json_string_value(json_object_get(json_array_get(e, 2), "operation")),
                     "audit.list");
    json_decref(j);

    snprintf(after, sizeof(after), "%lld", (long long)(last - 3));
    ck_assert_int_eq(CTL(&r, "audit", "tail", "--after", after), 0);
    ck_assert_int_ge(kr_lines(r.out), 5); /* header, last-2 .. last, and its own page */
    ck_assert_ptr_nonnull(strstr(r.out, "SEQ"));
    ck_assert_ptr_nonnull(strstr(r.out, "PRINCIPAL"));
    ck_assert_ptr_nonnull(strstr(r.out, "ERROR"));
    ck_assert_ptr_nonnull(strstr(r.out, "key.list"));
    ck_assert_ptr_nonnull(strstr(r.out, "uid:"));
    kr_free(&r);

    ck_assert_int_eq(CTL(&r, "audit", "verify"), 0);
    ck_assert_msg(strncmp(r.out, "audit chain ok: ", 16) == 0, "%s", r.out);
    ck_assert_ptr_nonnull(strstr(r.out, " entries verified\n"));
    ck_assert_str_eq(r.err, "");
    kr_free(&r);

    /* an entry edited behind kmsd's back */
    ck_assert_int_eq(ts_db_exec(&K.store, "CREATE TABLE audit_saved AS SELECT * FROM audit"), 0);
    ck_assert_int_eq(
        ts_db_exec(&K.store, "UPDATE audit SET operation = 'x.tampered' WHERE seq = 3"), 0);
    ck_assert_int_eq(CTL(&r, "audit", "verify"), 1);
    ck_assert_str_eq(r.out, "");
    snprintf(want, sizeof(want), "kmsctl: audit_broken: first bad entry 3: ");
    ck_assert_msg(strncmp(r.err, want, strlen(want)) == 0, "stderr: %s", r.err);
    ck_assert_int_eq(kr_lines(r.err), 1);
    kr_free(&r);
    ck_assert_int_eq(CTL(&r, "--json", "audit", "verify"), 1);
    j = json_loads(r.out, 0, NULL);
    ck_assert_ptr_nonnull(j);
    ck_assert(json_is_false(json_object_get(j, "ok")));
    seq = json_integer_value(json_object_get(j, "first_bad"));
    ck_assert_int_eq(seq, 3);
    json_decref(j);
    kr_free(&r);
    ck_assert_int_eq(ts_db_exec(&K.store, "UPDATE audit SET operation = (SELECT operation FROM "
                                          "audit_saved WHERE seq = 3) WHERE seq = 3"),
                     0);
    ck_assert_int_eq(ts_db_exec(&K.store, "DROP TABLE audit_saved"), 0);
    ck_assert_int_eq(CTL(&r, "audit", "verify"), 0);
    kr_free(&r);
}
END_TEST

START_TEST(default_socket_and_transport)
{
    kr_result r;
    char env_state[400];
    const char *const env_none[] = {"P11KMS_STATE_DIR=", NULL};

    /* $P11KMS_STATE_DIR/kmsd.sock when no --socket */
    snprintf(env_state, sizeof(env_state), "P11KMS_STATE_DIR=%s", K.dir);
    {
        const char *const env[] = {env_state, NULL};
        const char *argv[] = {KMSCTL_PATH, "--json", "key", "list", NULL};
        ck_assert_int_eq(kr_run(argv, NULL, env, &r), 0);
        ck_assert_ptr_nonnull(strstr(r.out, "\"keys\""));
        kr_free(&r);
    }
    /* [listen] unix of --config FILE (relative to the file's directory) */
    {
        const char *argv[] = {KMSCTL_PATH, "--config", K.conf, "--json", "key", "list", NULL};
        ck_assert_int_eq(kr_run(argv, NULL, env_none, &r), 0);
        ck_assert_ptr_nonnull(strstr(r.out, "\"keys\""));
        kr_free(&r);
    }
    {
        const char *argv[] = {KMSCTL_PATH, "--config", "/nonexistent.conf", "key", "list", NULL};
        kr_run(argv, NULL, env_none, &r);
        expect_error(&r, "config");
    }
    {
        const char *argv[] = {KMSCTL_PATH, "--socket", "/nonexistent/kmsd.sock",
                              "key",       "list",     NULL};
        kr_run(argv, NULL, env_none, &r);
        ck_assert_str_eq(expect_error(&r, "transport"),
                         "cannot connect to kmsd at /nonexistent/kmsd.sock: No such file or "
                         "directory");
    }
    {
        const char *argv[] = {KMSCTL_PATH, "--url", "http://plain:80", "key", "list", NULL};
        kr_run(argv, NULL, NULL, &r);
        expect_usage(&r);
    }
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsctl_cli");
    TCase *tc = tcase_create("kmsd");

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, help_everywhere);
    tcase_add_test(tc, usage_errors);
    tcase_add_test(tc, key_commands);
    tcase_add_test(tc, key_rotation_commands);
    tcase_add_test(tc, key_rewrap_progress);
    tcase_add_test(tc, dek_list_follows_cursors);
    tcase_add_test(tc, dek_generate_decrypt);
    tcase_add_test(tc, dek_lifecycle_commands);
    tcase_add_test(tc, status_command);
    tcase_add_test(tc, audit_backup);
    tcase_add_test(tc, audit_tail_and_verify);
    tcase_add_test(tc, default_socket_and_transport);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
