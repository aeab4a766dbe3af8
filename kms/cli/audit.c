/*
 * kms/cli/audit.c - `kmsctl audit tail|verify`: read the hash-chained audit
 * log and check it (docs/api.md: GET /v1/audit, GET /v1/audit/verify;
 * entry fields seq, time, principal, operation, key, version, dek_id,
 * result, error_code).
 *
 * tail pages through GET /v1/audit (oldest first) and prints the last N
 * entries, or every entry after --after SEQ.  verify exits 1 naming the
 * first bad entry when the chain is broken.  Reading the log is itself
 * audited by kmsd (an "audit.list" entry per page, "audit.verify").
 */
#include <stdlib.h>
#include <string.h>

#include "kms/cli/kmsctl.h"

#define PAGE 1000

static json_int_t entry_seq(const json_t *e)
{
    return json_integer_value(json_object_get(e, "seq"));
}

/* A field as text; "-" for null (no key, version or DEK). */
static const char *field(const json_t *e, const char *name)
{
    const json_t *v = json_object_get(e, name);

    return v == NULL || json_is_null(v) ? "-" : kms_scalar(v);
}

static int audit_tail(kms_cli *cli, int argc, char **argv)
{
    static const char *const head[] = {"SEQ",     "TIME",   "PRINCIPAL", "OPERATION", "KEY",
                                       "VERSION", "DEK_ID", "RESULT",    "ERROR"};
    const char *lines_s = NULL, *after_s = NULL;
    const kms_opt opts[] = {
        {"--lines", "-n", KMS_OPT_STRING, &lines_s},
        {"--after", NULL, KMS_OPT_STRING, &after_s},
        {NULL, NULL, 0, NULL},
    };
    long lines = 20, after = 0;
    json_t *kept = NULL, *reply = NULL, *e;
    kms_table *t = NULL;
    size_t i;
    int rv;

    if ((rv = kms_parse(cli, argc, argv, opts, NULL, 0, 0, NULL)) != KMS_EXIT_OK)
        return rv;
    if (lines_s != NULL && kms_parse_long(lines_s, 1, 1000000, &lines) != 0)
        return kms_usage(cli, "--lines wants a number from 1 to 1000000, not '%s'", lines_s);
    if (after_s != NULL && kms_parse_long(after_s, 0, 0x7fffffffffffffffL, &after) != 0)
        return kms_usage(cli, "--after wants a sequence number, not '%s'", after_s);
    if ((kept = json_array()) == NULL) {
        rv = kms_fail("internal", "out of memory");
        goto out;
    }
    for (;;) {
        char path[96];
        json_t *entries;
        size_t n;
        snprintf(path, sizeof(path), "/v1/audit?after=%ld&limit=%d", after, PAGE);
        json_decref(reply);
        reply = NULL;
        if ((rv = kms_call(cli, "GET", path, NULL, &reply)) != KMS_EXIT_OK)
            goto out;
        entries = json_object_get(reply, "entries");
        n = json_array_size(entries);
        json_array_extend(kept, entries);
        /* Without --after only the last `lines` entries are kept. */
        while (after_s == NULL && json_array_size(kept) > (size_t)lines)
            json_array_remove(kept, 0);
        if (n < PAGE || entry_seq(json_array_get(entries, n - 1)) <= after)
            break;
        after = (long)entry_seq(json_array_get(entries, n - 1));
    }
    if (cli->json) {
        json_t *o = json_pack("{s:O}", "entries", kept);
        kms_print_json(o);
        json_decref(o);
        goto out;
    }
    if ((t = kms_table_new(9, head)) == NULL) {
        rv = kms_fail("internal", "out of memory");
        goto out;
    }
    json_array_foreach(kept, i, e)
    {
        static const char *const names[9] = {"seq",     "time",   "principal", "operation", "key",
                                             "version", "dek_id", "result",    "error_code"};
        char cells[9][168];
        const char *row[9];
        for (int c = 0; c < 9; c++)
            snprintf(cells[c], sizeof(cells[c]), "%s", field(e, names[c]));
        for (int c = 0; c < 9; c++)
            row[c] = cells[c];
        kms_table_add(t, row);
    }
    kms_table_print(t, stdout);
out:
    kms_table_free(t);
    json_decref(reply);
    json_decref(kept);
    return rv;
}

static int audit_verify(kms_cli *cli, int argc, char **argv)
{
    json_t *reply = NULL;
    int rv;

    if ((rv = kms_parse(cli, argc, argv, NULL, NULL, 0, 0, NULL)) != KMS_EXIT_OK)
        return rv;
    if ((rv = kms_call(cli, "GET", "/v1/audit/verify", NULL, &reply)) != KMS_EXIT_OK)
        goto out;
    if (cli->json)
        kms_print_json(reply);
    if (json_is_true(json_object_get(reply, "ok"))) {
        if (!cli->json)
            printf("audit chain ok: %s entries verified\n",
                   kms_scalar(json_object_get(reply, "entries")));
    } else {
        rv = kms_fail("audit_broken", "first bad entry %s: %s",
                      kms_scalar(json_object_get(reply, "first_bad")),
                      json_string_value(json_object_get(reply, "reason")) != NULL
                          ? json_string_value(json_object_get(reply, "reason"))
                          : "no reason given");
    }
out:
    json_decref(reply);
    return rv;
}

static const kms_command commands[] = {
    {"tail", "tail [-n N] [--after SEQ]", "print the latest audit entries",
     "Prints sequence, time, principal, operation, key, version, DEK id, result and\n"
     "error code of each entry, oldest first.\n"
     "Options:\n"
     "  -n, --lines N   the last N entries (default 20)\n"
     "  --after SEQ     every entry after sequence number SEQ instead\n",
     audit_tail},
    {"verify", "verify", "check the audit log's hash chain and HMACs",
     "Exits 0 printing the number of entries when the chain is intact; exits 1 with\n"
     "\"kmsctl: audit_broken: first bad entry SEQ: REASON\" on stderr when an entry\n"
     "was edited, deleted, inserted or reordered.\n",
     audit_verify},
};

const kms_noun kms_noun_audit = {
    "audit",
    "Read and verify the audit log",
    "Every operation, allowed or refused, appends a hash-chained entry.\n",
    commands,
    sizeof(commands) / sizeof(commands[0]),
};
