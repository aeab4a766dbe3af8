/*
 * kms/cli/backup.c - `kmsctl --config FILE backup OUT | restore IN`.
 *
 * These open the store named by kmsd.conf directly (backup works while kmsd
 * runs; restore needs it stopped).  They belong to a later issue: the
 * arguments are parsed and checked now, and the command says plainly that
 * it is not implemented yet (exit 1) rather than pretending.
 */
#include "kms/cli/kmsctl.h"

static int run(kms_cli *cli, int argc, char **argv, const char *what)
{
    const char *pos[1];
    int rv;

    if ((rv = kms_parse(cli, argc, argv, NULL, pos, 1, 1, NULL)) != KMS_EXIT_OK)
        return rv;
    if (cli->config == NULL)
        return kms_usage(cli, "%s needs --config FILE (kmsd.conf) before it", what);
    return kms_fail(what, "not implemented yet");
}

static int backup_run(kms_cli *cli, int argc, char **argv)
{
    return run(cli, argc, argv, "backup");
}

static int restore_run(kms_cli *cli, int argc, char **argv)
{
    return run(cli, argc, argv, "restore");
}

static const kms_command backup_commands[] = {
    {NULL, "--config FILE backup OUT", "copy the store to OUT (not implemented yet)",
     "Opens the store of kmsd.conf FILE directly and writes a consistent copy to OUT;\n"
     "works while kmsd runs.  Not implemented yet: exits 1.\n",
     backup_run},
};

static const kms_command restore_commands[] = {
    {NULL, "--config FILE restore IN", "replace the store by IN (not implemented yet)",
     "Replaces the store of kmsd.conf FILE by the backup IN; kmsd must be stopped.\n"
     "Not implemented yet: exits 1.\n",
     restore_run},
};

const kms_noun kms_noun_backup = {
    "backup", "Back up the store", NULL, backup_commands, 1,
};

const kms_noun kms_noun_restore = {
    "restore", "Restore the store", NULL, restore_commands, 1,
};
