/*
 * kms/cli/status.c - `kmsctl status`: the token (label, present, slot), the
 * store, the audit chain, the number of keys and DEK counts by state, from
 * GET /v1/status.  Human output is two aligned tables (components, then
 * counts); --json prints the API object as it came.
 */
#include "kms/cli/kmsctl.h"

#include <stdio.h>
#include <string.h>

/* A count as text ("-" when the server could not count: store down). */
static void count_text(const json_t *v, char *buf, size_t len)
{
    if (json_is_integer(v))
        snprintf(buf, len, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
    else
        snprintf(buf, len, "-");
}

static int print_status(const json_t *st)
{
    static const char *const comp_hdr[] = {"COMPONENT", "STATE", "DETAIL"};
    static const char *const count_hdr[] = {"KEYS", "DEKS ACTIVE", "REVOKED", "DESTROYED"};
    const json_t *token = json_object_get(st, "token"), *store = json_object_get(st, "store");
    const json_t *deks = json_object_get(st, "datakeys");
    const json_t *label = json_object_get(token, "label");
    char detail[128], keys[32], active[32], revoked[32], destroyed[32];
    kms_table *comp = kms_table_new(3, comp_hdr), *counts = kms_table_new(4, count_hdr);
    int rv = KMS_EXIT_OK;

    if (comp == NULL || counts == NULL) {
        rv = kms_fail("internal", "out of memory");
        goto out;
    }
    snprintf(detail, sizeof(detail), "label \"%s\", slot %s",
             json_is_string(label) ? json_string_value(label) : "?",
             kms_scalar(json_object_get(token, "slot")));
    {
        const char *row[3] = {
            "token", json_is_true(json_object_get(token, "present")) ? "present" : "absent",
            detail};
        kms_table_add(comp, row);
    }
    {
        const char *row[3] = {"store",
                              json_is_true(json_object_get(store, "ok")) ? "ok" : "unavailable",
                              kms_scalar(json_object_get(store, "backend"))};
        kms_table_add(comp, row);
    }
    {
        const char *row[3] = {"audit", kms_scalar(json_object_get(st, "audit")),
                              "chain of entries (kmsctl audit verify)"};
        kms_table_add(comp, row);
    }
    count_text(json_object_get(st, "keys"), keys, sizeof(keys));
    count_text(json_object_get(deks, "active"), active, sizeof(active));
    count_text(json_object_get(deks, "revoked"), revoked, sizeof(revoked));
    count_text(json_object_get(deks, "destroyed"), destroyed, sizeof(destroyed));
    {
        const char *row[4] = {keys, active, revoked, destroyed};
        kms_table_add(counts, row);
    }
    kms_table_print(comp, stdout);
    fputc('\n', stdout);
    kms_table_print(counts, stdout);
out:
    kms_table_free(comp);
    kms_table_free(counts);
    return rv;
}

static int status_run(kms_cli *cli, int argc, char **argv)
{
    json_t *reply = NULL;
    int rv;

    if ((rv = kms_parse(cli, argc, argv, NULL, NULL, 0, 0, NULL)) != KMS_EXIT_OK)
        return rv;
    if ((rv = kms_call(cli, "GET", "/v1/status", NULL, &reply)) == KMS_EXIT_OK) {
        if (cli->json)
            kms_print_json(reply);
        else
            rv = print_status(reply);
    }
    json_decref(reply);
    return rv;
}

static const kms_command commands[] = {
    {NULL, "status", "show the token, the store, keys and DEK counts",
     "Prints GET /v1/status as two tables: the components (token: present or\n"
     "absent, its label and slot; store: ok or unavailable, its backend; audit:\n"
     "ok or broken) and the counts (keys, DEKs active, revoked, destroyed; \"-\"\n"
     "when the store cannot count).  --json prints the API object.\n",
     status_run},
};

const kms_noun kms_noun_status = {
    "status", "Show the service's status", NULL, commands, 1,
};
