/*
 * tests/support/kmsctl_run.h - run a program (kmsctl, the example, a
 * compiler) for a test with its stdout and stderr captured separately,
 * optional stdin text and extra environment, or on a pseudo-terminal
 * (forkpty) to see what a person at a terminal sees.  Header-only.
 */
#ifndef P11KMS_TESTS_KMSCTL_RUN_H
#define P11KMS_TESTS_KMSCTL_RUN_H

#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

typedef struct kr_result {
    int status; /* exit status; 128+n if killed by signal n; -1 on error */
    char *out;  /* stdout (or the terminal's output with kr_run_pty) */
    size_t out_len;
    char *err; /* stderr ("" with kr_run_pty) */
    size_t err_len;
} kr_result;

static inline void kr_free(kr_result *r)
{
    free(r->out);
    free(r->err);
    memset(r, 0, sizeof(*r));
}

static inline void kr_append(char **buf, size_t *len, const char *data, size_t n)
{
    char *nb = realloc(*buf, *len + n + 1);

    if (nb == NULL)
        abort();
    memcpy(nb + *len, data, n);
    *len += n;
    nb[*len] = '\0';
    *buf = nb;
}

static inline int kr_wait(pid_t pid)
{
    int st = 0;

    if (waitpid(pid, &st, 0) != pid)
        return -1;
    if (WIFEXITED(st))
        return WEXITSTATUS(st);
    if (WIFSIGNALED(st))
        return 128 + WTERMSIG(st);
    return -1;
}

/* Run argv (argv[0] a path).  in: stdin text (NULL: /dev/null).  env:
 * NULL-terminated "NAME=value" settings added to the environment (a
 * "NAME=" entry with nothing after '=' unsets NAME); may be NULL. */
static inline int kr_run(const char *const argv[], const char *in, const char *const env[],
                         kr_result *r)
{
    int po[2], pe[2], pi[2];
    pid_t pid;

    memset(r, 0, sizeof(*r));
    r->out = strdup("");
    r->err = strdup("");
    if (pipe(po) != 0 || pipe(pe) != 0 || pipe(pi) != 0)
        return r->status = -1;
    pid = fork();
    if (pid < 0)
        return r->status = -1;
    if (pid == 0) {
        dup2(pi[0], STDIN_FILENO);
        dup2(po[1], STDOUT_FILENO);
        dup2(pe[1], STDERR_FILENO);
        close(pi[0]), close(pi[1]), close(po[0]), close(po[1]), close(pe[0]), close(pe[1]);
        for (int i = 0; env != NULL && env[i] != NULL; i++) {
            const char *eq = strchr(env[i], '=');
            char name[256];
            snprintf(name, sizeof(name), "%.*s", (int)(eq - env[i]), env[i]);
            if (eq[1] == '\0')
                unsetenv(name);
            else
                setenv(name, eq + 1, 1);
        }
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(pi[0]);
    close(po[1]);
    close(pe[1]);
    if (in != NULL) {
        signal(SIGPIPE, SIG_IGN);
        if (write(pi[1], in, strlen(in)) < 0) {
            /* the program did not read it; fine */
        }
    }
    close(pi[1]);
    {
        struct pollfd fds[2] = {{po[0], POLLIN, 0}, {pe[0], POLLIN, 0}};
        int open_fds = 2;
        char buf[4096];
        while (open_fds > 0) {
            if (poll(fds, 2, -1) < 0)
                break;
            for (int i = 0; i < 2; i++) {
                if (fds[i].fd < 0 || fds[i].revents == 0)
                    continue;
                ssize_t n = read(fds[i].fd, buf, sizeof(buf));
                if (n <= 0) {
                    close(fds[i].fd);
                    fds[i].fd = -1;
                    open_fds--;
                } else if (i == 0) {
                    kr_append(&r->out, &r->out_len, buf, (size_t)n);
                } else {
                    kr_append(&r->err, &r->err_len, buf, (size_t)n);
                }
            }
        }
    }
    return r->status = kr_wait(pid);
}

/* Run argv on a pseudo-terminal (stdin, stdout and stderr all a TTY);
 * `in` is typed after the program printed `prompt` (NULL: at once; in may
 * be NULL).  Everything the terminal showed goes to r->out. */
static inline int kr_run_pty(const char *const argv[], const char *prompt, const char *in,
                             kr_result *r)
{
    int master = -1, typed = (in == NULL);
    pid_t pid;
    char buf[4096];

    memset(r, 0, sizeof(*r));
    r->out = strdup("");
    r->err = strdup("");
    pid = forkpty(&master, NULL, NULL, NULL);
    if (pid < 0)
        return r->status = -1;
    if (pid == 0) {
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    for (;;) {
        struct pollfd p = {master, POLLIN, 0};
        if (!typed && (prompt == NULL || strstr(r->out, prompt) != NULL)) {
            if (write(master, in, strlen(in)) < 0)
                break;
            typed = 1;
        }
        if (poll(&p, 1, 30000) <= 0)
            break;
        ssize_t n = read(master, buf, sizeof(buf));
        if (n <= 0) /* EIO once the child has exited */
            break;
        kr_append(&r->out, &r->out_len, buf, (size_t)n);
    }
    close(master);
    return r->status = kr_wait(pid);
}

/* Number of '\n'-terminated lines in s. */
static inline int kr_lines(const char *s)
{
    int n = 0;

    for (; *s != '\0'; s++)
        if (*s == '\n')
            n++;
    return n;
}

#endif
