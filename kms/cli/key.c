/*
 * kms/cli/key.c - `kmsctl key ...`: create, list, show, rotate, disable,
 * enable, config, rewrap and retire key-encryption keys.
 *
 * rewrap works in batches (POST .../rewrap {"batch":N} until "remaining" is
 * 0) so it can show progress: a bar with rate and ETA when stderr is a
 * terminal, one plain line per batch otherwise.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kms/cli/kmsctl.h"

static void print_key(const kms_cli *cli, const json_t *k)
{
    static const char *const head[] = {"VERSION", "STATE", "CREATED", "DEKS"};
    const json_t *versions = json_object_get(k, "versions"), *v;
    kms_table *t;
    size_t i;

    if (cli->json) {
        kms_print_json(k);
        return;
    }
    kms_print_fields(k);
    if (!json_is_array(versions) || (t = kms_table_new(4, head)) == NULL)
        return;
    json_array_foreach(versions, i, v)
    {
        char ver[32], deks[32];
        const char *row[4];
        snprintf(ver, sizeof(ver), "%s", kms_scalar(json_object_get(v, "version")));
        snprintf(deks, sizeof(deks), "%s", kms_scalar(json_object_get(v, "dek_count")));
        row[0] = ver;
        row[1] = kms_scalar(json_object_get(v, "state"));
        row[2] = kms_scalar(json_object_get(v, "created"));
        row[3] = deks;
        kms_table_add(t, row);
    }
    putchar('\n');
    kms_table_print(t, stdout);
    kms_table_free(t);
}

/* One key request answered with a key object. */
static int key_request(kms_cli *cli, const char *method, char *path, const json_t *body)
{
    json_t *reply = NULL;
    int rv = kms_call(cli, method, path, body, &reply);

    if (rv == KMS_EXIT_OK)
        print_key(cli, reply);
    json_decref(reply);
    free(path);
    return rv;
}

static int key_create(kms_cli *cli, int argc, char **argv)
{
    const char *pos[1];
    json_t *body;
    int rv;

    if ((rv = kms_parse(cli, argc, argv, NULL, pos, 1, 1, NULL)) != KMS_EXIT_OK)
        return rv;
    if ((body = json_pack("{s:s}", "name", pos[0])) == NULL)
        return kms_usage(cli, "NAME is not valid UTF-8");
    rv = key_request(cli, "POST", strdup("/v1/keys"), body);
    json_decref(body);
    return rv;
}

static int key_list(kms_cli *cli, int argc, char **argv)
{
    static const char *const head[] = {"NAME",     "STATE", "LATEST", "MIN_DECRYPT",
                                       "ROTATION", "DEKS",  "CREATED"};
    json_t *reply = NULL, *keys, *k;
    kms_table *t = NULL;
    size_t i;
    int rv;

    if ((rv = kms_parse(cli, argc, argv, NULL, NULL, 0, 0, NULL)) != KMS_EXIT_OK)
        return rv;
    if ((rv = kms_call(cli, "GET", "/v1/keys", NULL, &reply)) != KMS_EXIT_OK)
        goto out;
    if (cli->json) {
        kms_print_json(reply);
        goto out;
    }
    keys = json_object_get(reply, "keys");
    if ((t = kms_table_new(7, head)) == NULL) {
        rv = kms_fail("internal", "out of memory");
        goto out;
    }
    json_array_foreach(keys, i, k)
    {
        char latest[32], min[32], deks[32];
        json_int_t total = 0;
        size_t j;
        json_t *v;
        const char *row[7];
        json_array_foreach(json_object_get(k, "versions"), j, v) total +=
            json_integer_value(json_object_get(v, "dek_count"));
        snprintf(latest, sizeof(latest), "%s", kms_scalar(json_object_get(k, "latest_version")));
        snprintf(min, sizeof(min), "%s", kms_scalar(json_object_get(k, "min_decrypt_version")));
        snprintf(deks, sizeof(deks), "%" JSON_INTEGER_FORMAT, total);
        row[0] = kms_scalar(json_object_get(k, "name"));
        row[1] = kms_scalar(json_object_get(k, "state"));
        row[2] = latest;
        row[3] = min;
        row[4] = kms_scalar(json_object_get(k, "rotation_period"));
        row[5] = deks;
        row[6] = kms_scalar(json_object_get(k, "created"));
        kms_table_add(t, row);
    }
    kms_table_print(t, stdout);
out:
    kms_table_free(t);
    json_decref(reply);
    return rv;
}

static int key_show(kms_cli *cli, int argc, char **argv)
{
    const char *pos[1];
    int rv;

    if ((rv = kms_parse(cli, argc, argv, NULL, pos, 1, 1, NULL)) != KMS_EXIT_OK)
        return rv;
    return key_request(cli, "GET", kms_path("/v1/keys/%s", pos[0]), NULL);
}

/* rotate, disable, enable: POST /v1/keys/NAME/<verb> without a body. */
static int key_action(kms_cli *cli, int argc, char **argv, const char *verb)
{
    const char *pos[1];
    char fmt[64];
    int rv;

    if ((rv = kms_parse(cli, argc, argv, NULL, pos, 1, 1, NULL)) != KMS_EXIT_OK)
        return rv;
    snprintf(fmt, sizeof(fmt), "/v1/keys/%%s/%s", verb);
    return key_request(cli, "POST", kms_path(fmt, pos[0]), NULL);
}

static int key_rotate(kms_cli *cli, int argc, char **argv)
{
    return key_action(cli, argc, argv, "rotate");
}

static int key_disable(kms_cli *cli, int argc, char **argv)
{
    return key_action(cli, argc, argv, "disable");
}

static int key_enable(kms_cli *cli, int argc, char **argv)
{
    return key_action(cli, argc, argv, "enable");
}

/* "90d", "12h", "30m", "45s" or "0". */
static int valid_period(const char *p)
{
    size_t len = strlen(p);
    long n;
    char digits[32];

    if (strcmp(p, "0") == 0)
        return 1;
    if (len < 2 || len > sizeof(digits) || strchr("dhms", p[len - 1]) == NULL)
        return 0;
    memcpy(digits, p, len - 1);
    digits[len - 1] = '\0';
    return kms_parse_long(digits, 1, 1000000000L, &n) == 0;
}

static int key_config(kms_cli *cli, int argc, char **argv)
{
    const char *pos[1], *min = NULL, *period = NULL;
    const kms_opt opts[] = {
        {"--min-decrypt-version", NULL, KMS_OPT_STRING, &min},
        {"--rotation-period", NULL, KMS_OPT_STRING, &period},
        {NULL, NULL, 0, NULL},
    };
    json_t *body = NULL;
    long v = 0;
    int rv;

    if ((rv = kms_parse(cli, argc, argv, opts, pos, 1, 1, NULL)) != KMS_EXIT_OK)
        return rv;
    if (min == NULL && period == NULL)
        return kms_usage(cli, "give --min-decrypt-version, --rotation-period or both");
    if (min != NULL && kms_parse_long(min, 1, 0xffffffffL, &v) != 0)
        return kms_usage(cli, "--min-decrypt-version wants a version number, not '%s'", min);
    if (period != NULL && !valid_period(period))
        return kms_usage(cli, "--rotation-period wants 0 or a number and d, h, m or s, not '%s'",
                         period);
    if ((body = json_object()) == NULL)
        return kms_fail("internal", "out of memory");
    if (min != NULL)
        json_object_set_new(body, "min_decrypt_version", json_integer(v));
    if (period != NULL)
        json_object_set_new(body, "rotation_period", json_string(period));
    rv = key_request(cli, "POST", kms_path("/v1/keys/%s/config", pos[0]), body);
    json_decref(body);
    return rv;
}

static double now_s(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void progress(const char *key, int tty, long long done, long long remaining, double elapsed)
{
    long long total = done + remaining;
    double rate = elapsed > 0 ? (double)done / elapsed : 0;

    if (!tty) {
        fprintf(stderr, "rewrap %s: %lld rewrapped, %lld remaining\n", key, done, remaining);
        return;
    }
    {
        const int width = 30;
        int filled = total > 0 ? (int)(width * done / total) : width;
        char bar[64];
        long eta = rate > 0 ? (long)((double)remaining / rate + 0.5) : -1;
        memset(bar, '#', (size_t)filled);
        memset(bar + filled, '-', (size_t)(width - filled));
        bar[width] = '\0';
        fprintf(stderr, "\r[%s] %3d%%  %lld/%lld  %.0f DEKs/s  ETA ", bar,
                total > 0 ? (int)(100 * done / total) : 100, done, total, rate);
        if (eta >= 0)
            fprintf(stderr, "%ld:%02ld:%02ld ", eta / 3600, eta / 60 % 60, eta % 60);
        else
            fputs("--:--:-- ", stderr);
        fflush(stderr);
    }
}

static int key_rewrap(kms_cli *cli, int argc, char **argv)
{
    const char *pos[1], *batch_s = NULL;
    const kms_opt opts[] = {
        {"--batch", NULL, KMS_OPT_STRING, &batch_s},
        {NULL, NULL, 0, NULL},
    };
    json_t *body = NULL, *reply = NULL;
    char *path = NULL;
    long batch = 1000;
    long long done = 0, remaining = 0;
    int rv, tty = kms_isatty(2), bar_shown = 0;
    double start = now_s();

    if ((rv = kms_parse(cli, argc, argv, opts, pos, 1, 1, NULL)) != KMS_EXIT_OK)
        return rv;
    if (batch_s != NULL && kms_parse_long(batch_s, 1, 1000000, &batch) != 0)
        return kms_usage(cli, "--batch wants a number from 1 to 1000000, not '%s'", batch_s);
    if ((path = kms_path("/v1/keys/%s/rewrap", pos[0])) == NULL ||
        (body = json_pack("{s:I}", "batch", (json_int_t)batch)) == NULL) {
        rv = kms_fail("internal", "out of memory");
        goto out;
    }
    for (;;) {
        json_int_t n, left;
        json_decref(reply);
        reply = NULL;
        if ((rv = kms_call(cli, "POST", path, body, &reply)) != KMS_EXIT_OK)
            goto out;
        n = json_integer_value(json_object_get(reply, "rewrapped"));
        left = json_integer_value(json_object_get(reply, "remaining"));
        if (!json_is_integer(json_object_get(reply, "rewrapped")) ||
            !json_is_integer(json_object_get(reply, "remaining")) || n < 0 || left < 0) {
            rv = kms_fail("internal", "kmsd's rewrap reply is malformed");
            goto out;
        }
        done += n;
        remaining = left;
        progress(pos[0], tty, done, remaining, now_s() - start);
        bar_shown = tty;
        if (remaining == 0)
            break;
        if (n == 0) {
            if (bar_shown)
                fputc('\n', stderr);
            bar_shown = 0;
            rv = kms_fail("internal", "rewrap of '%s' made no progress; %lld DEKs remain", pos[0],
                          remaining);
            goto out;
        }
    }
    if (bar_shown)
        fputc('\n', stderr);
    bar_shown = 0;
    if (cli->json) {
        json_t *sum = json_pack("{s:I,s:I}", "rewrapped", (json_int_t)done, "remaining",
                                (json_int_t)remaining);
        kms_print_json(sum);
        json_decref(sum);
    } else {
        printf("rewrapped %lld data keys of %s onto its latest version\n", done, pos[0]);
    }
out:
    if (bar_shown)
        fputc('\n', stderr);
    json_decref(reply);
    json_decref(body);
    free(path);
    return rv;
}

static int key_retire(kms_cli *cli, int argc, char **argv)
{
    const char *pos[1], *version = NULL;
    const kms_opt opts[] = {
        {"--version", NULL, KMS_OPT_STRING, &version},
        {NULL, NULL, 0, NULL},
    };
    json_t *reply = NULL;
    char *path;
    long v;
    int rv;

    if ((rv = kms_parse(cli, argc, argv, opts, pos, 1, 1, NULL)) != KMS_EXIT_OK)
        return rv;
    if (version == NULL)
        return kms_usage(cli, "--version V is required");
    if (kms_parse_long(version, 1, 0xffffffffL, &v) != 0)
        return kms_usage(cli, "--version wants a version number, not '%s'", version);
    path = kms_path("/v1/keys/%s/versions/%s", pos[0], version);
    rv = kms_call(cli, "DELETE", path, NULL, &reply);
    free(path);
    if (rv == KMS_EXIT_OK) {
        if (cli->json)
            kms_print_json(reply);
        else
            printf("retired version %ld of key %s: its token object is destroyed\n", v, pos[0]);
    }
    json_decref(reply);
    return rv;
}

static const kms_command commands[] = {
    {"create", "create NAME", "create a key (version 1, generated inside the token)",
     "NAME is 1 to 64 characters of [a-z0-9._-], starting with a letter or digit.\n"
     "Prints the new key (--json: the API's key object).\n",
     key_create},
    {"list", "list", "list every key",
     "Prints one line per key: name, state, latest version, minimum decrypt version,\n"
     "rotation period, live DEKs over all versions, creation time.\n"
     "--json prints the API's {\"keys\":[...]}.\n",
     key_list},
    {"show", "show NAME", "show a key and its versions",
     "Prints the key's fields, then one line per version: number, state (active or\n"
     "destroyed), creation time and how many live DEKs it wraps.\n",
     key_show},
    {"rotate", "rotate NAME", "add a version; new DEKs are wrapped by it",
     "Older versions still decrypt until min_decrypt_version passes them; 'key rewrap'\n"
     "moves existing DEKs onto the new version.  Prints the key.\n",
     key_rotate},
    {"disable", "disable NAME", "refuse generate and decrypt under the key",
     "Takes effect at once; 'key enable' undoes it.  Prints the key.\n", key_disable},
    {"enable", "enable NAME", "allow a disabled key again", "Prints the key.\n", key_enable},
    {"config", "config NAME [--min-decrypt-version V] [--rotation-period P]",
     "set the minimum decrypt version or the rotation period",
     "Options (at least one):\n"
     "  --min-decrypt-version V  DEKs wrapped by versions below V are refused\n"
     "                           (version_below_minimum)\n"
     "  --rotation-period P      rotate automatically every P: a number and d, h, m or s\n"
     "                           (90d, 12h); 0 turns automatic rotation off\n"
     "Prints the key.\n",
     key_config},
    {"rewrap", "rewrap NAME [--batch N]", "re-encrypt the key's DEKs onto its latest version",
     "Rewraps inside the token; no plaintext leaves kmsd.  Works in batches of N DEKs\n"
     "(default 1000), one request each, showing a progress bar with rate and ETA on a\n"
     "terminal (plain progress lines on stderr otherwise), until none remain.\n"
     "Prints the total (--json: {\"rewrapped\":N,\"remaining\":0}).\n"
     "Options:\n"
     "  --batch N   DEKs per request (1 to 1000000)\n",
     key_rewrap},
    {"retire", "retire NAME --version V", "destroy an old version's token object",
     "Refused (key_version_in_use) while live DEKs are wrapped by version V: rewrap\n"
     "first.  The version's KEK is destroyed inside the token; this cannot be undone.\n"
     "Options:\n"
     "  --version V   the version to retire (required)\n",
     key_retire},
};

const kms_noun kms_noun_key = {
    "key",
    "Manage key-encryption keys (KEKs), which live inside the token",
    "A key has a name, a state (enabled, disabled) and numbered versions; each\n"
    "version is one AES-256 key inside the PKCS#11 token, never extractable.\n",
    commands,
    sizeof(commands) / sizeof(commands[0]),
};
