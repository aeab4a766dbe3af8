/*
 * kms/server/main.c - kmsd, the p11kms daemon: arguments, hardening, the
 * PIN, and the wiring of token, store, core and HTTP server.
 *
 *   kmsd --config FILE                 serve in the foreground (logs to stderr)
 *   kmsd --check-config --config FILE  validate FILE and exit
 *
 * The PIN comes from token.pin_file or P11KMS_PIN, never from the command
 * line, and is wiped right after login.  The process is made non-dumpable
 * with no core files and a 077 umask before anything secret is read, and
 * libevent's buffers are wiped when freed (kms/core/wipe.h).
 * Exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 on any error,
 * 2 on bad usage.
 */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include <event2/event.h>
#include <event2/thread.h>

#include "kms/core/core.h"
#include "kms/core/wipe.h"
#include "kms/server/config.h"
#include "kms/server/http.h"
#include "kms/server/tls.h"
#include "kms/server/rotator.h"
#include "kms/store/store.h"
#include "module/log.h"
#include "module/p11.h"

#ifndef P11KMS_VERSION
#define P11KMS_VERSION "0.1.0"
#endif

static void usage(FILE *f)
{
    fprintf(f, "usage: kmsd --config FILE [--check-config]\n"
               "       kmsd --help | --version\n"
               "\n"
               "  -c, --config FILE    kmsd.conf to use (INI; see conf/kmsd.conf)\n"
               "  -t, --check-config   validate the configuration, print \"FILE: ok\", exit\n"
               "  -h, --help           this text\n"
               "  -V, --version        print the version\n"
               "\n"
               "The token PIN is read from token.pin_file (mode 0600 or stricter) or the\n"
               "P11KMS_PIN environment variable; never from the command line.\n");
}

static int harden(void)
{
    struct rlimit no_core = {0, 0};

    umask(077);
    signal(SIGPIPE, SIG_IGN);
    if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0) {
        perror("kmsd: prctl(PR_SET_DUMPABLE)");
        return -1;
    }
    if (setrlimit(RLIMIT_CORE, &no_core) != 0) {
        perror("kmsd: setrlimit(RLIMIT_CORE)");
        return -1;
    }
    return 0;
}

/* File descriptors for max_connections clients and kmsd's own (store
 * connections, token, listeners, worker and loop internals): raise the
 * soft limit up to the hard one when needed (systemd's default soft limit
 * is 1024), and say so when even that is short.  Beyond the limit kmsd
 * pauses accepting (http.c) rather than failing. */
static void fd_limit(const kms_config *cfg)
{
    struct rlimit rl;
    rlim_t want =
        (rlim_t)cfg->max_connections + (rlim_t)cfg->workers + (rlim_t)cfg->token_sessions + 256;

    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur >= want)
        return;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want)
        rl.rlim_cur = rl.rlim_max;
    else
        rl.rlim_cur = want;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0 && getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    if (rl.rlim_cur < want)
        LOG_WARN("http",
                 "the file descriptor limit (%llu) is below the %llu that [server] "
                 "max_connections = %d needs: raise it (LimitNOFILE=) or lower max_connections",
                 (unsigned long long)rl.rlim_cur, (unsigned long long)want, cfg->max_connections);
}

/* Parse the policy file and load the TLS material once, so that a bad
 * one stops kmsd (and --check-config) with its FILE:LINE. */
static p11kms_status check_policy_and_tls(const kms_config *cfg, char *err, size_t errlen)
{
    kms_policy *pol = NULL;
    kms_tls *tls = NULL;
    p11kms_status rv = P11KMS_OK;

    if (cfg->policy_file != NULL) {
        rv = kms_policy_load(cfg->policy_file, &pol, err, errlen);
        kms_policy_unref(pol);
        if (rv != P11KMS_OK)
            return rv;
    }
    if (cfg->listen_tls != NULL) {
        rv = kms_tls_new(cfg, &tls, err, errlen);
        kms_tls_free(tls);
    }
    return rv;
}

static int serve(const kms_config *cfg)
{
    p11_config pcfg;
    p11_ctx *token = NULL;
    kms_store *store = NULL;
    kms_core *core = NULL;
    kms_server *srv = NULL;
    kms_rotator *rotator = NULL;
    kms_core_options copts;
    char *pin = NULL;
    const char *env_pin = getenv("P11KMS_PIN");
    p11kms_status st;
    CK_RV rv;
    int status = 1;

    if (cfg->token_pin_file == NULL && (env_pin == NULL || *env_pin == '\0')) {
        fprintf(stderr, "kmsd: %s: token.pin_file is not set and P11KMS_PIN is not set\n",
                cfg->file);
        goto out;
    }
    rv = p11_pin_load(cfg->token_pin_file, &pin);
    if (rv != CKR_OK) {
        fprintf(stderr, "kmsd: cannot read the token PIN from %s (%s)\n",
                env_pin != NULL && *env_pin != '\0' ? "P11KMS_PIN" : cfg->token_pin_file,
                p11_rv_name(rv));
        goto out;
    }
    /* SoftHSM2 reads its token directory from SOFTHSM2_CONF when it is
     * loaded; the config names it so kmsd.conf alone is complete. */
    if (cfg->token_softhsm2_conf != NULL)
        setenv("SOFTHSM2_CONF", cfg->token_softhsm2_conf, 1);
    memset(&pcfg, 0, sizeof(pcfg));
    pcfg.module = cfg->token_module;
    pcfg.uri = cfg->token_uri;
    pcfg.pin = pin;
    pcfg.max_sessions = (size_t)cfg->token_sessions;
    rv = p11_open(&pcfg, &token);
    p11_pin_free(pin); /* wipes it */
    pin = NULL;
    if (rv != CKR_OK) {
        fprintf(stderr, "kmsd: cannot open token %s with module %s: %s\n", cfg->token_uri,
                cfg->token_module, p11_rv_name(rv));
        goto out;
    }
    /* The url may hold a password: it is never printed. */
    if (strcmp(cfg->store_backend, "postgres") == 0)
        st = kms_store_open_postgres(cfg->store_url, &store);
    else
        st = kms_store_open_sqlite(cfg->store_path, &store);
    if (st != P11KMS_OK) {
        fprintf(stderr, "kmsd: cannot open store %s: %s\n",
                strcmp(cfg->store_backend, "postgres") == 0 ? "(postgres, store.url)"
                                                             : cfg->store_path,
                p11kms_strerror(st));
        goto out;
    }
    memset(&copts, 0, sizeof(copts));
    copts.max_wraps_per_version = (uint64_t)cfg->max_wraps_per_version;
    st = kms_core_new_ex(token, store, &copts, &core);
    if (st != P11KMS_OK) {
        fprintf(stderr, "kmsd: cannot start the core: %s\n", p11kms_strerror(st));
        goto out;
    }
    kms_audit_startup_check(core); /* logs loudly if broken; kmsd serves anyway */
    fd_limit(cfg);
    st = kms_server_new(cfg, core, &srv);
    if (st != P11KMS_OK) {
        fprintf(stderr, "kmsd: cannot start the HTTP server on %s: %s\n", cfg->listen_unix,
                p11kms_strerror(st));
        goto out;
    }
    st = kms_rotator_start(core, cfg->rotation_check_interval, &rotator);
    if (st != P11KMS_OK) {
        fprintf(stderr, "kmsd: cannot start the rotation thread: %s\n", p11kms_strerror(st));
        goto out;
    }
    if (kms_server_run(srv) != P11KMS_OK)
        goto out;
    status = 0;
out:
    kms_rotator_stop(rotator);
    kms_server_free(srv);
    kms_core_free(core);
    kms_store_close(store);
    p11_close(token);
    if (status == 0)
        LOG_INFO("http", "kmsd stopped");
    return status;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"check-config", no_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *path = NULL;
    int check = 0, c, status = 1;
    kms_config *cfg = NULL;
    char err[KMS_CONFIG_ERR_MAX];

    while ((c = getopt_long(argc, argv, "c:thV", opts, NULL)) != -1) {
        switch (c) {
        case 'c': path = optarg; break;
        case 't': check = 1; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("kmsd (p11kms) %s\n", P11KMS_VERSION); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc || path == NULL) {
        usage(stderr);
        return 2;
    }
    if (harden() != 0)
        return 1;
    if (kms_config_load(path, &cfg, err, sizeof(err)) != P11KMS_OK ||
        kms_config_check_supported(cfg, err, sizeof(err)) != P11KMS_OK ||
        check_policy_and_tls(cfg, err, sizeof(err)) != P11KMS_OK) {
        fprintf(stderr, "kmsd: %s\n", err);
        goto out;
    }
    if (check) {
        printf("%s: ok\n", path);
        status = 0;
        goto out;
    }
    /* libevent's buffers hold request heads (bearer tokens) and replies
     * (plaintext DEKs): wiped when freed (kms/core/wipe.h).  Before any
     * other libevent call. */
    event_set_mem_functions(kms_wipe_malloc, kms_wipe_realloc, kms_wipe_free);
    if (evthread_use_pthreads() != 0) {
        fprintf(stderr, "kmsd: cannot enable libevent threading\n");
        goto out;
    }
    status = serve(cfg);
out:
    kms_config_free(cfg);
    return status;
}
