/*
 * kms/cli/status.c - `kmsctl status`: the token (label, present, slot), the
 * store, the number of keys and DEK counts by state, from GET /v1/status.
 */
#include "kms/cli/kmsctl.h"

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
            kms_print_fields(reply);
    }
    json_decref(reply);
    return rv;
}

static const kms_command commands[] = {
    {NULL, "status", "show the token, the store, keys and DEK counts",
     "Prints one line per field of GET /v1/status: token.label, token.present,\n"
     "token.slot, the store backend, the number of keys and the DEKs in each state.\n",
     status_run},
};

const kms_noun kms_noun_status = {
    "status", "Show the service's status", NULL, commands, 1,
};
