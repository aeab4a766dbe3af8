/*
 * tests/support/testtoken.c - make and remove private SoftHSM2 tokens for
 * tests (see testtoken.h).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "testtoken.h"

#include <fcntl.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static const char *const module_candidates[] = {
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    NULL,
};

const char *tt_softhsm_module(void)
{
    const char *env = getenv("P11KMS_TEST_MODULE");
    if (env != NULL && *env != '\0')
        return env;
    for (size_t i = 0; module_candidates[i] != NULL; i++)
        if (access(module_candidates[i], R_OK) == 0)
            return module_candidates[i];
    return module_candidates[0];
}

int tt_tempdir(char *out, size_t len)
{
    const char *base = getenv("TMPDIR");
    if (base == NULL || *base == '\0')
        base = "/tmp";
    if ((size_t)snprintf(out, len, "%s/p11kms-test-XXXXXX", base) >= len)
        return -1;
    if (mkdtemp(out) == NULL) {
        perror("mkdtemp");
        return -1;
    }
    return 0;
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void tt_rmtree(const char *path)
{
    if (path != NULL && *path != '\0')
        nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

static int run_softhsm_util(const tt_token *tt)
{
    pid_t pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0) {
            dup2(devnull, 1);
            close(devnull);
        }
        execlp("softhsm2-util", "softhsm2-util", "--init-token", "--free", "--label",
               tt->label, "--pin", TT_PIN, "--so-pin", TT_SO_PIN, (char *)NULL);
        perror("exec softhsm2-util");
        _exit(127);
    }
    int status = 0;
    if (waitpid(pid, &status, 0) < 0)
        return -1;
    return (WIFEXITED(status) && WEXITSTATUS(status) == 0) ? 0 : -1;
}

int tt_token_new(const char *label, tt_token *tt)
{
    char tokens[400];
    FILE *f = NULL;

    memset(tt, 0, sizeof(*tt));
    if (tt_tempdir(tt->dir, sizeof(tt->dir)) != 0)
        return -1;
    snprintf(tt->label, sizeof(tt->label), "%s", label);
    snprintf(tt->uri, sizeof(tt->uri), "pkcs11:token=%s", tt->label);
    snprintf(tt->conf, sizeof(tt->conf), "%s/softhsm2.conf", tt->dir);
    snprintf(tt->module, sizeof(tt->module), "%s", tt_softhsm_module());
    snprintf(tokens, sizeof(tokens), "%s/tokens", tt->dir);
    if (mkdir(tokens, 0700) != 0) {
        perror("mkdir tokens");
        return -1;
    }
    f = fopen(tt->conf, "w");
    if (f == NULL) {
        perror("fopen softhsm2.conf");
        return -1;
    }
    fprintf(f, "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
               "slots.removable = false\n",
            tokens);
    fclose(f);
    setenv("SOFTHSM2_CONF", tt->conf, 1);
    if (run_softhsm_util(tt) != 0) {
        fprintf(stderr, "softhsm2-util --init-token failed for %s\n", tt->label);
        return -1;
    }
    return 0;
}

void tt_token_remove(tt_token *tt)
{
    tt_rmtree(tt->dir);
}
