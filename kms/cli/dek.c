/*
 * kms/cli/dek.c - `kmsctl dek ...`: generate, decrypt, show, list, revoke
 * and destroy data keys, one at a time or in bulk by key and context.
 *
 * generate and decrypt print a plaintext DEK (that is what an operator asks
 * for); jansson's copy of it is wiped before the reply is freed.  Bulk
 * destroy asks for confirmation on a terminal unless --yes, and refuses
 * without --yes when stdin is not a terminal.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "kms/cli/kmsctl.h"

static const char *const reasons[] = {"compromised", "superseded", "cessation", "unspecified"};

static int valid_reason(const char *r)
{
    for (size_t i = 0; i < sizeof(reasons) / sizeof(reasons[0]); i++)
        if (strcmp(r, reasons[i]) == 0)
            return 1;
    return 0;
}

static void print_object(const kms_cli *cli, const json_t *j)
{
    if (cli->json)
        kms_print_json(j);
    else
        kms_print_fields(j);
}

/* generate and decrypt: POST path {"context":{...}}, print, wipe. */
static int with_context(kms_cli *cli, int argc, char **argv, const char *fmt)
{
    const char *pos[1];
    kms_list ctx_args = {{NULL}, 0};
    const kms_opt opts[] = {
        {"--context", "-c", KMS_OPT_LIST, &ctx_args},
        {NULL, NULL, 0, NULL},
    };
    json_t *ctx = NULL, *body = NULL, *reply = NULL;
    char *path = NULL;
    int rv;

    if ((rv = kms_parse(cli, argc, argv, opts, pos, 1, 1, NULL)) != KMS_EXIT_OK)
        return rv;
    if ((rv = kms_context_arg(cli, &ctx_args, &ctx)) != KMS_EXIT_OK)
        goto out;
    if ((body = json_pack("{s:O}", "context", ctx)) == NULL ||
        (path = kms_path(fmt, pos[0])) == NULL) {
        rv = kms_fail("internal", "out of memory");
        goto out;
    }
    if ((rv = kms_call(cli, "POST", path, body, &reply)) != KMS_EXIT_OK)
        goto out;
    print_object(cli, reply);
out:
    kms_json_wipe_string(json_object_get(reply, "plaintext"));
    json_decref(reply);
    json_decref(body);
    json_decref(ctx);
    free(path);
    return rv;
}

static int dek_generate(kms_cli *cli, int argc, char **argv)
{
    return with_context(cli, argc, argv, "/v1/keys/%s/datakeys");
}

static int dek_decrypt(kms_cli *cli, int argc, char **argv)
{
    return with_context(cli, argc, argv, "/v1/datakeys/%s/decrypt");
}

static int dek_show(kms_cli *cli, int argc, char **argv)
{
    const char *pos[1];
    json_t *reply = NULL;
    char *path;
    int rv;

    if ((rv = kms_parse(cli, argc, argv, NULL, pos, 1, 1, NULL)) != KMS_EXIT_OK)
        return rv;
    path = kms_path("/v1/datakeys/%s", pos[0]);
    if ((rv = kms_call(cli, "GET", path, NULL, &reply)) == KMS_EXIT_OK)
        print_object(cli, reply);
    json_decref(reply);
    free(path);
    return rv;
}

static int dek_list(kms_cli *cli, int argc, char **argv)
{
    static const char *const head[] = {"DEK_ID", "VERSION", "STATE", "CREATED", "CONTEXT"};
    const char *key = NULL, *state = NULL;
    const kms_opt opts[] = {
        {"--key", "-k", KMS_OPT_STRING, &key},
        {"--state", NULL, KMS_OPT_STRING, &state},
        {NULL, NULL, 0, NULL},
    };
    json_t *all = NULL, *reply = NULL, *e;
    char *cursor = NULL, *path = NULL, *ek = NULL, *es = NULL, *ec = NULL;
    kms_table *t = NULL;
    size_t i;
    int rv, pages = 0;

    if ((rv = kms_parse(cli, argc, argv, opts, NULL, 0, 0, NULL)) != KMS_EXIT_OK)
        return rv;
    if (key == NULL)
        return kms_usage(cli, "--key KEY is required");
    if (state != NULL && strcmp(state, "active") != 0 && strcmp(state, "revoked") != 0 &&
        strcmp(state, "destroyed") != 0)
        return kms_usage(cli, "--state wants active, revoked or destroyed, not '%s'", state);
    if ((all = json_array()) == NULL || (ek = kms_path_escape(key)) == NULL ||
        (state != NULL && (es = kms_path_escape(state)) == NULL)) {
        rv = kms_fail("internal", "out of memory");
        goto out;
    }
    /* Follow "next" cursors until the last page. */
    for (;;) {
        const char *next;
        free(path);
        path = NULL;
        free(ec);
        ec = NULL;
        if (cursor != NULL && (ec = kms_path_escape(cursor)) == NULL) {
            rv = kms_fail("internal", "out of memory");
            goto out;
        }
        if (asprintf(&path, "/v1/datakeys?key=%s%s%s%s%s", ek, es ? "&state=" : "", es ? es : "",
                     ec ? "&cursor=" : "", ec ? ec : "") < 0) {
            path = NULL;
            rv = kms_fail("internal", "out of memory");
            goto out;
        }
        json_decref(reply);
        reply = NULL;
        if ((rv = kms_call(cli, "GET", path, NULL, &reply)) != KMS_EXIT_OK)
            goto out;
        json_array_extend(all, json_object_get(reply, "datakeys"));
        next = json_string_value(json_object_get(reply, "next"));
        free(cursor);
        cursor = NULL;
        if (next == NULL || next[0] == '\0')
            break;
        if (++pages > 1000000) {
            rv = kms_fail("internal", "kmsd's listing does not end");
            goto out;
        }
        if ((cursor = strdup(next)) == NULL) {
            rv = kms_fail("internal", "out of memory");
            goto out;
        }
    }
    if (cli->json) {
        json_t *out = json_pack("{s:O}", "datakeys", all);
        kms_print_json(out);
        json_decref(out);
        goto out;
    }
    if ((t = kms_table_new(5, head)) == NULL) {
        rv = kms_fail("internal", "out of memory");
        goto out;
    }
    json_array_foreach(all, i, e)
    {
        char version[32], *ctx = kms_context_text(json_object_get(e, "context"));
        const char *row[5];
        snprintf(version, sizeof(version), "%s", kms_scalar(json_object_get(e, "version")));
        row[0] = kms_scalar(json_object_get(e, "dek_id"));
        row[1] = version;
        row[2] = kms_scalar(json_object_get(e, "state"));
        row[3] = kms_scalar(json_object_get(e, "created"));
        row[4] = ctx;
        kms_table_add(t, row);
        free(ctx);
    }
    kms_table_print(t, stdout);
out:
    kms_table_free(t);
    json_decref(reply);
    json_decref(all);
    free(cursor);
    free(path);
    free(ek);
    free(es);
    free(ec);
    return rv;
}

/* Ask on the terminal; 1 when the answer is "yes". */
static int confirm(const char *key, const json_t *ctx)
{
    char line[64], *text = kms_context_text(ctx);

    fprintf(stderr,
            "Destroy every data key of key '%s' whose context holds %s?\n"
            "The records sealed with them become unrecoverable.  Type 'yes' to continue: ",
            key, text != NULL ? text : "?");
    fflush(stderr);
    free(text);
    if (fgets(line, sizeof(line), stdin) == NULL)
        return 0;
    line[strcspn(line, "\r\n")] = '\0';
    return strcmp(line, "yes") == 0;
}

/* revoke and destroy, single (ID) or bulk (--key K --context ...). */
static int revoke_or_destroy(kms_cli *cli, int argc, char **argv, int destroy)
{
    const char *pos[1], *key = NULL, *reason = NULL;
    kms_list ctx_args = {{NULL}, 0};
    int yes = 0, n_pos = 0, rv;
    const kms_opt opts[] = {
        {"--key", "-k", KMS_OPT_STRING, &key},
        {"--context", "-c", KMS_OPT_LIST, &ctx_args},
        {"--reason", NULL, KMS_OPT_STRING, &reason},
        {"--yes", "-y", KMS_OPT_FLAG, &yes},
        {NULL, NULL, 0, NULL},
    };
    json_t *ctx = NULL, *body = NULL, *reply = NULL;
    char *path = NULL;

    if ((rv = kms_parse(cli, argc, argv, opts, pos, 0, 1, &n_pos)) != KMS_EXIT_OK)
        return rv;
    if (destroy && reason != NULL)
        return kms_usage(cli, "destroy takes no --reason");
    if (reason != NULL && !valid_reason(reason))
        return kms_usage(cli,
                         "--reason wants compromised, superseded, cessation or unspecified, "
                         "not '%s'",
                         reason);
    if (key == NULL) {
        /* single */
        if (n_pos != 1)
            return kms_usage(cli, "give a DEK id, or --key KEY --context name=value for bulk");
        if (ctx_args.n > 0 || yes)
            return kms_usage(cli, "--context and --yes go with --key (bulk)");
        if (!destroy && reason == NULL)
            return kms_usage(cli, "--reason R is required");
        if (destroy) {
            path = kms_path("/v1/datakeys/%s", pos[0]);
            rv = kms_call(cli, "DELETE", path, NULL, &reply);
        } else {
            path = kms_path("/v1/datakeys/%s/revoke", pos[0]);
            body = json_pack("{s:s}", "reason", reason);
            rv = kms_call(cli, "POST", path, body, &reply);
        }
        if (rv == KMS_EXIT_OK)
            print_object(cli, reply);
        goto out;
    }
    /* bulk */
    if (n_pos != 0)
        return kms_usage(cli, "give either a DEK id or --key (bulk), not both");
    if (ctx_args.n == 0)
        return kms_usage(cli, "bulk %s needs at least one --context name=value",
                         destroy ? "destroy" : "revoke");
    if ((rv = kms_context_arg(cli, &ctx_args, &ctx)) != KMS_EXIT_OK)
        goto out;
    if (destroy && !yes) {
        if (!kms_isatty(0)) {
            rv = kms_usage(cli, "bulk destroy needs --yes when stdin is not a terminal");
            goto out;
        }
        if (!confirm(key, ctx)) {
            rv = kms_fail("aborted", "nothing destroyed");
            goto out;
        }
    }
    body = destroy ? json_pack("{s:s,s:O}", "key", key, "context", ctx)
                   : json_pack("{s:s,s:O,s:s}", "key", key, "context", ctx, "reason",
                               reason != NULL ? reason : "unspecified");
    if (body == NULL) {
        rv = kms_usage(cli, "KEY is not valid UTF-8");
        goto out;
    }
    if ((rv = kms_call(cli, "POST", destroy ? "/v1/datakeys/destroy" : "/v1/datakeys/revoke", body,
                       &reply)) != KMS_EXIT_OK)
        goto out;
    if (cli->json)
        kms_print_json(reply);
    else
        printf("%s %s data keys of key %s\n", destroy ? "destroyed" : "revoked",
               kms_scalar(json_object_get(reply, "count")), key);
out:
    json_decref(reply);
    json_decref(body);
    json_decref(ctx);
    free(path);
    return rv;
}

static int dek_revoke(kms_cli *cli, int argc, char **argv)
{
    return revoke_or_destroy(cli, argc, argv, 0);
}

static int dek_destroy(kms_cli *cli, int argc, char **argv)
{
    return revoke_or_destroy(cli, argc, argv, 1);
}

static const kms_command commands[] = {
    {"generate", "generate KEY [--context name=value]...", "issue a data key under KEY",
     "Prints dek_id, key, version and the plaintext DEK (32 bytes, base64).  The\n"
     "context is bound into the wrapped DEK: the same pairs are needed to decrypt it.\n"
     "Options:\n"
     "  -c, --context name=value   a context pair; repeat for more\n",
     dek_generate},
    {"decrypt", "decrypt ID [--context name=value]...", "get a data key's plaintext again",
     "The context must be the one the DEK was generated with (else context_mismatch).\n"
     "Refused for revoked (dek_revoked) and destroyed (dek_destroyed) DEKs.\n"
     "Options:\n"
     "  -c, --context name=value   a context pair; repeat for more\n",
     dek_decrypt},
    {"show", "show ID", "show a data key's metadata (never its plaintext)",
     "Prints dek_id, key, version, state, context, creation time and, for revoked\n"
     "DEKs, the reason.\n",
     dek_show},
    {"list", "list --key KEY [--state S]", "list the data keys of a key",
     "Follows the API's cursors to the end.  --json prints {\"datakeys\":[...]} with\n"
     "every page joined.\n"
     "Options:\n"
     "  -k, --key KEY   the key (required)\n"
     "  --state S       only DEKs in state S: active, revoked or destroyed\n",
     dek_list},
    {"revoke", "revoke ID --reason R | --key KEY --context name=value... [--reason R]",
     "revoke one data key, or in bulk by key and context",
     "A revoked DEK is refused at once on decrypt; it can still be destroyed.\n"
     "Options:\n"
     "  --reason R                 compromised, superseded, cessation or unspecified\n"
     "                             (required for one DEK; bulk default unspecified)\n"
     "  -k, --key KEY              bulk: every DEK of KEY whose context holds all the\n"
     "  -c, --context name=value   given pairs (at least one)\n"
     "Bulk prints how many were revoked (--json: {\"count\":N}).\n",
     dek_revoke},
    {"destroy", "destroy ID | --key KEY --context name=value... [--yes]",
     "destroy one data key, or in bulk (crypto-shredding)",
     "Erases the only wrapped copy: every record sealed with the DEK becomes\n"
     "unrecoverable.  This cannot be undone.\n"
     "Options:\n"
     "  -k, --key KEY              bulk: every DEK of KEY whose context holds all the\n"
     "  -c, --context name=value   given pairs (at least one)\n"
     "  -y, --yes                  bulk: do not ask.  Without it bulk destroy asks on a\n"
     "                             terminal and refuses when stdin is not a terminal.\n",
     dek_destroy},
};

const kms_noun kms_noun_dek = {
    "dek",
    "Manage data-encryption keys (DEKs)",
    "A DEK is 256 random bits wrapped inside the token under a key's latest version\n"
    "and bound to an encryption context.  States: active -> revoked -> destroyed.\n",
    commands,
    sizeof(commands) / sizeof(commands[0]),
};
