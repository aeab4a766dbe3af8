/*
 * kms/cli/kmsctl.c - main of kmsctl, the admin CLI of p11kms: global
 * options, the default socket, `--help` at the top and noun levels, and
 * dispatch of `<noun> <verb>` to the command tables of the noun files.
 *
 *   kmsctl [--socket PATH] [--json] <noun> <verb> [args]
 *   kmsctl --config FILE backup OUT | restore IN
 *
 * The socket: --socket, else [listen] unix of --config FILE (kmsd.conf),
 * else $P11KMS_STATE_DIR/kmsd.sock when that variable is set, else ./var/kmsd.sock when it exists
 * (scripts/up.sh's default), else /run/p11kms/kmsd.sock (the packaged service's).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kms/cli/kmsctl.h"

static const kms_noun *const nouns[] = {
    &kms_noun_key,    &kms_noun_dek,    &kms_noun_audit,
    &kms_noun_status, &kms_noun_backup, &kms_noun_restore,
};
#define N_NOUNS (sizeof(nouns) / sizeof(nouns[0]))

static const char global_options[] =
    "Global options (before or after the command):\n"
    "  --socket PATH   kmsd's Unix socket.  Default: [listen] unix of --config FILE,\n"
    "                  else $P11KMS_STATE_DIR/kmsd.sock if P11KMS_STATE_DIR is set,\n"
    "                  else ./var/kmsd.sock if it exists, else /run/p11kms/kmsd.sock\n"
    "  --url URL       talk to kmsd at https://host:port instead (mutual TLS):\n"
    "  --cert FILE     client certificate (PEM)\n"
    "  --key-file FILE its private key (PEM)\n"
    "  --cacert FILE   CA bundle that signed kmsd's certificate\n"
    "  --json          print the API's JSON objects as they are, for scripts\n"
    "  --config FILE   kmsd.conf: its [listen] unix is the default socket; backup\n"
    "                  and restore open its store directly\n"
    "  -h, --help      help on kmsctl, a noun (kmsctl key --help) or a command\n"
    "                  (kmsctl key create --help)\n";

static const char exit_status[] =
    "Exit status: 0 on success; 1 when kmsd refuses or cannot be reached (one line\n"
    "on stderr: \"kmsctl: <code>: <message>\", code being the API error code);\n"
    "2 on a usage error.\n";

/* "  synopsis  summary", the summary on its own line when the synopsis is long. */
static void print_entry(FILE *f, const char *synopsis, const char *summary, int width)
{
    if ((int)strlen(synopsis) > width)
        fprintf(f, "  %s\n  %-*s %s\n", synopsis, width, "", summary);
    else
        fprintf(f, "  %-*s %s\n", width, synopsis, summary);
}

/* The summary as a sentence: capital first letter, full stop. */
static void print_sentence(FILE *f, const char *summary)
{
    if (summary[0] >= 'a' && summary[0] <= 'z')
        fprintf(f, "%c%s.\n", summary[0] - 'a' + 'A', summary + 1);
    else
        fprintf(f, "%s.\n", summary);
}

static void top_help(FILE *f)
{
    fprintf(f, "Usage: kmsctl [--socket PATH] [--json] <noun> <verb> [args]\n"
               "       kmsctl --config FILE backup OUT | restore IN\n\n"
               "Administer a p11kms key-management service (kmsd).\n\n"
               "Commands:\n");
    for (size_t i = 0; i < N_NOUNS; i++) {
        const kms_noun *n = nouns[i];
        for (size_t j = 0; j < n->n_commands; j++) {
            char syn[128];
            if (n->commands[j].verb == NULL)
                snprintf(syn, sizeof(syn), "%s", n->commands[j].synopsis);
            else
                snprintf(syn, sizeof(syn), "%s %s", n->name, n->commands[j].synopsis);
            print_entry(f, syn, n->commands[j].summary, 44);
        }
    }
    fprintf(f, "\n%s\n%s", global_options, exit_status);
}

static void noun_help(const kms_noun *n, FILE *f)
{
    fprintf(f, "Usage: kmsctl [global options] %s <verb> [args]\n\n", n->name);
    print_sentence(f, n->summary);
    fputs("\nVerbs:\n", f);
    for (size_t j = 0; j < n->n_commands; j++)
        print_entry(f, n->commands[j].synopsis, n->commands[j].summary, 40);
    if (n->help != NULL)
        fprintf(f, "\n%s", n->help);
    fprintf(f,
            "\n'kmsctl %s <verb> --help' describes a verb; 'kmsctl --help' lists the global "
            "options.\n",
            n->name);
}

static void command_help(const kms_noun *n, const kms_command *c, FILE *f)
{
    if (c->verb == NULL)
        fprintf(f, "Usage: kmsctl [global options] %s\n\n", c->synopsis);
    else
        fprintf(f, "Usage: kmsctl [global options] %s %s\n\n", n->name, c->synopsis);
    print_sentence(f, c->summary);
    fprintf(f, "\n%s\n%s", c->help, exit_status);
}

static int wants_help(int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0)
            return 0;
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return 1;
    }
    return 0;
}

/* [listen] unix of kmsd.conf `conf`, resolved against the file's directory
 * as kmsd does.  1 found, 0 not in the file, -1 unreadable. */
static int socket_from_config(const char *conf, char *buf, size_t len)
{
    FILE *f = fopen(conf, "r");
    char line[4096], section[64] = "";
    int found = 0;

    if (f == NULL)
        return -1;
    while (!found && fgets(line, sizeof(line), f) != NULL) {
        char *s = line, *eq, *v, *end;
        for (char *c = s; *c != '\0'; c++) /* comments: ';' or '#' at start or after a blank */
            if ((*c == ';' || *c == '#') && (c == s || c[-1] == ' ' || c[-1] == '\t')) {
                *c = '\0';
                break;
            }
        while (*s == ' ' || *s == '\t')
            s++;
        end = s + strlen(s);
        while (end > s && (end[-1] == ' ' || end[-1] == '\t' || end[-1] == '\n' || end[-1] == '\r'))
            *--end = '\0';
        if (*s == '[' && end > s && end[-1] == ']') {
            snprintf(section, sizeof(section), "%.*s", (int)(end - s - 2), s + 1);
            continue;
        }
        if (strcmp(section, "listen") != 0 || (eq = strchr(s, '=')) == NULL)
            continue;
        for (end = eq; end > s && (end[-1] == ' ' || end[-1] == '\t');)
            end--;
        if ((size_t)(end - s) != 4 || strncmp(s, "unix", 4) != 0)
            continue;
        for (v = eq + 1; *v == ' ' || *v == '\t';)
            v++;
        if (v[0] == '/') {
            snprintf(buf, len, "%s", v);
        } else {
            const char *slash = strrchr(conf, '/');
            if (slash == NULL)
                snprintf(buf, len, "%s", v);
            else
                snprintf(buf, len, "%.*s/%s", (int)(slash - conf), conf, v);
        }
        found = 1;
    }
    fclose(f);
    return found;
}

static const char *default_socket(char *buf, size_t len)
{
    const char *state = getenv("P11KMS_STATE_DIR");
    struct stat st;

    if (state != NULL && state[0] != '\0') {
        snprintf(buf, len, "%s/kmsd.sock", state);
        return buf;
    }
    if (stat("var/kmsd.sock", &st) == 0)
        return "./var/kmsd.sock";
    return "/run/p11kms/kmsd.sock";
}

int main(int argc, char **argv)
{
    kms_cli cli;
    char sockbuf[4096], command[128];
    const kms_noun *noun = NULL;
    const kms_command *cmd = NULL;
    int i, rv;

    memset(&cli, 0, sizeof(cli));
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* Global options before the noun. */
    for (i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char **dst = NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            top_help(stdout);
            return KMS_EXIT_OK;
        }
        if (strcmp(a, "--json") == 0) {
            cli.json = 1;
            continue;
        }
        if (a[0] != '-')
            break;
        if (strcmp(a, "--socket") == 0)
            dst = &cli.socket;
        else if (strcmp(a, "--url") == 0)
            dst = &cli.url;
        else if (strcmp(a, "--cert") == 0)
            dst = &cli.cert;
        else if (strcmp(a, "--key-file") == 0)
            dst = &cli.keyfile;
        else if (strcmp(a, "--cacert") == 0)
            dst = &cli.cacert;
        else if (strcmp(a, "--config") == 0)
            dst = &cli.config;
        else if (strncmp(a, "--", 2) == 0 && strchr(a, '=') != NULL) {
            /* --socket=PATH and friends */
            const char *eq = strchr(a, '=');
            static const char *const names[] = {"--socket",   "--url",    "--cert",
                                                "--key-file", "--cacert", "--config"};
            const char **dsts[] = {&cli.socket,  &cli.url,    &cli.cert,
                                   &cli.keyfile, &cli.cacert, &cli.config};
            size_t len = (size_t)(eq - a);
            size_t k;
            for (k = 0; k < 6; k++)
                if (strlen(names[k]) == len && strncmp(a, names[k], len) == 0)
                    break;
            if (k == 6)
                return kms_usage(NULL, "unknown option '%.*s'", (int)len, a);
            *dsts[k] = eq + 1;
            goto next;
        } else
            return kms_usage(NULL, "unknown option '%s'", a);
        if (i + 1 >= argc)
            return kms_usage(NULL, "option '%s' needs a value", a);
        *dst = argv[++i];
    next:;
    }
    if (i >= argc)
        return kms_usage(NULL, "missing command");
    if (strcmp(argv[i], "help") == 0) {
        top_help(stdout);
        return KMS_EXIT_OK;
    }
    for (size_t k = 0; k < N_NOUNS; k++)
        if (strcmp(nouns[k]->name, argv[i]) == 0)
            noun = nouns[k];
    if (noun == NULL)
        return kms_usage(NULL, "unknown command '%s'", argv[i]);
    i++;

    if (noun->commands[0].verb == NULL) {
        /* status, backup, restore: the noun is the command */
        cmd = &noun->commands[0];
        snprintf(command, sizeof(command), "%s", noun->name);
    } else {
        if (i >= argc) {
            cli.command = noun->name;
            return kms_usage(&cli, "%s needs a verb", noun->name);
        }
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0 ||
            strcmp(argv[i], "help") == 0) {
            noun_help(noun, stdout);
            return KMS_EXIT_OK;
        }
        for (size_t k = 0; k < noun->n_commands; k++)
            if (strcmp(noun->commands[k].verb, argv[i]) == 0)
                cmd = &noun->commands[k];
        if (cmd == NULL) {
            cli.command = noun->name;
            return kms_usage(&cli, "unknown verb '%s %s'", noun->name, argv[i]);
        }
        snprintf(command, sizeof(command), "%s %s", noun->name, cmd->verb);
        i++;
    }
    cli.command = command;
    if (wants_help(argc - i, argv + i)) {
        command_help(noun, cmd, stdout);
        return KMS_EXIT_OK;
    }
    if (cli.socket == NULL && cli.config != NULL && noun != &kms_noun_backup &&
        noun != &kms_noun_restore) {
        int found = socket_from_config(cli.config, sockbuf, sizeof(sockbuf));
        if (found < 0)
            return kms_fail("config", "cannot read %s: %s", cli.config, strerror(errno));
        if (found)
            cli.socket = sockbuf;
    }
    if (cli.socket == NULL)
        cli.socket = default_socket(sockbuf, sizeof(sockbuf));
    rv = cmd->run(&cli, argc - i, argv + i);
    p11kms_client_close(cli.client);
    if (fflush(stdout) != 0 && rv == KMS_EXIT_OK)
        rv = kms_fail("io", "cannot write the output");
    return rv;
}
