/*
 * tests/support/kmsd_harness.c - start and stop the real kmsd for a test,
 * and make HTTP requests over its Unix socket (see kmsd_harness.h).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "kmsd_harness.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int kh_write_file(const char *path, const char *text, mode_t mode)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, mode);
    size_t len = strlen(text), off = 0;

    if (fd < 0)
        return -1;
    while (off < len) {
        ssize_t n = write(fd, text + off, len - off);
        if (n <= 0) {
            close(fd);
            return -1;
        }
        off += (size_t)n;
    }
    fchmod(fd, mode);
    return close(fd);
}

char *kh_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf = NULL;
    size_t cap = 0, used = 0, n;

    if (f == NULL)
        return NULL;
    for (;;) {
        if (cap - used < 4096) {
            char *nb = realloc(buf, cap = cap * 2 + 8192);
            if (nb == NULL) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
        }
        n = fread(buf + used, 1, cap - used - 1, f);
        if (n == 0)
            break;
        used += n;
    }
    fclose(f);
    buf[used] = '\0';
    if (len != NULL)
        *len = used;
    return buf;
}

int kh_write_conf(kh_kmsd *k, const char *server_extra, const char *extra)
{
    char *text = NULL;
    int rv;

    if (asprintf(&text,
                 "; kmsd.conf written by tests/support/kmsd_harness.c\n"
                 "[token]\n"
                 "module   = %s\n"
                 "uri      = %s   ; the test token\n"
                 "pin_file = pin\n"
                 "\n"
                 "%s"
                 "\n"
                 "[listen]\n"
                 "unix = kmsd.sock\n"
                 "\n"
                 "[server]\n"
                 "threads = 2\n"
                 "workers = 16\n"
                 "%s"
                 "%s",
                 k->tt.module, k->tt.uri, ts_db_conf(&k->store), server_extra != NULL ? server_extra : "",
                 extra != NULL ? extra : "") < 0)
        return -1;
    rv = kh_write_file(k->conf, text, 0600);
    free(text);
    return rv;
}

int kh_setup(kh_kmsd *k, const char *kmsd, const char *label, const char *server_extra,
             const char *extra)
{
    memset(k, 0, sizeof(*k));
    k->kmsd = kmsd;
    if (tt_token_new(label, &k->tt) != 0)
        return -1;
    snprintf(k->dir, sizeof(k->dir), "%s", k->tt.dir);
    snprintf(k->conf, sizeof(k->conf), "%s/kmsd.conf", k->dir);
    snprintf(k->pin, sizeof(k->pin), "%s/pin", k->dir);
    snprintf(k->sock, sizeof(k->sock), "%s/kmsd.sock", k->dir);
    snprintf(k->db, sizeof(k->db), "%s/kms.db", k->dir);
    snprintf(k->log, sizeof(k->log), "%s/kmsd.log", k->dir);
    if (kh_write_file(k->pin, TT_PIN "\n", 0600) != 0)
        return -1;
    if (ts_db_new(k->dir, &k->store) != 0)
        return -1;
    return kh_write_conf(k, server_extra, extra);
}

int kh_setup_peer(kh_kmsd *k, const kh_kmsd *first, const char *server_extra, const char *extra)
{
    memset(k, 0, sizeof(*k));
    k->kmsd = first->kmsd;
    k->tt = first->tt;
    k->peer = 1;
    k->store = first->store;
    k->store.shared = 1;
    if (tt_tempdir(k->dir, sizeof(k->dir)) != 0)
        return -1;
    snprintf(k->conf, sizeof(k->conf), "%s/kmsd.conf", k->dir);
    snprintf(k->pin, sizeof(k->pin), "%s/pin", k->dir);
    snprintf(k->sock, sizeof(k->sock), "%s/kmsd.sock", k->dir);
    snprintf(k->db, sizeof(k->db), "%s", first->db);
    snprintf(k->log, sizeof(k->log), "%s/kmsd.log", k->dir);
    if (kh_write_file(k->pin, TT_PIN "\n", 0600) != 0)
        return -1;
    return kh_write_conf(k, server_extra, extra);
}

static pid_t spawn(kh_kmsd *k)
{
    pid_t pid = fork();

    if (pid != 0)
        return pid;
    int fd = open(k->log, O_WRONLY | O_CREAT | O_APPEND, 0600);
    if (fd >= 0) {
        dup2(fd, STDERR_FILENO);
        dup2(fd, STDOUT_FILENO);
        close(fd);
    }
    if (k->nofile > 0) {
        struct rlimit rl = {(rlim_t)k->nofile, (rlim_t)k->nofile};

        if (setrlimit(RLIMIT_NOFILE, &rl) != 0) {
            perror("setrlimit(RLIMIT_NOFILE) for kmsd");
            _exit(127);
        }
    }
    execl(k->kmsd, k->kmsd, "--config", k->conf, (char *)NULL);
    perror("exec kmsd");
    _exit(127);
}

static int wait_exit(pid_t pid, int timeout_ms)
{
    int status = 0;

    for (int waited = 0; waited <= timeout_ms; waited += 10) {
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid) {
            if (WIFEXITED(status))
                return WEXITSTATUS(status);
            if (WIFSIGNALED(status))
                return 128 + WTERMSIG(status);
            return -1;
        }
        if (r < 0)
            return -1;
        usleep(10000);
    }
    return -2;
}

static void dump_log(const kh_kmsd *k)
{
    char *log = kh_read_file(k->log, NULL);

    fprintf(stderr, "---- %s ----\n%s\n----\n", k->log, log != NULL ? log : "(none)");
    free(log);
}

int kh_spawn(kh_kmsd *k)
{
    k->pid = spawn(k);
    if (k->pid < 0) {
        k->pid = 0;
        return -1;
    }
    return 0;
}

int kh_start(kh_kmsd *k)
{
    kh_response r;

    if (kh_spawn(k) != 0)
        return -1;
    for (int i = 0; i < 6000; i++) {
        if (waitpid(k->pid, NULL, WNOHANG) == k->pid) {
            fprintf(stderr, "kmsd exited during start\n");
            k->pid = 0;
            dump_log(k);
            return -1;
        }
        if (access(k->sock, F_OK) == 0 &&
            kh_request(k->sock, "GET", "/v1/health", NULL, 0, NULL, &r) == 0) {
            long status = r.status;
            kh_response_free(&r);
            if (status == 200)
                return 0;
        }
        usleep(10000);
    }
    fprintf(stderr, "kmsd did not become healthy\n");
    kh_stop(k, SIGKILL);
    dump_log(k);
    return -1;
}

int kh_start_expect_exit(kh_kmsd *k, int timeout_s)
{
    int st;

    k->pid = spawn(k);
    if (k->pid < 0)
        return -1;
    st = wait_exit(k->pid, timeout_s * 1000);
    if (st == -2) {
        kh_stop(k, SIGKILL);
        return -1;
    }
    k->pid = 0;
    return st;
}

int kh_stop(kh_kmsd *k, int sig)
{
    int st;

    if (k->pid <= 0)
        return -1;
    kill(k->pid, sig);
    st = wait_exit(k->pid, 30000);
    if (st == -2) {
        kill(k->pid, SIGKILL);
        waitpid(k->pid, NULL, 0);
        st = -1;
    }
    k->pid = 0;
    return st;
}

void kh_teardown(kh_kmsd *k)
{
    if (k->pid > 0)
        kh_stop(k, SIGKILL);
    ts_db_drop(&k->store);
    if (getenv("P11KMS_KEEP_TEST_DIRS") == NULL)
        tt_rmtree(k->peer ? k->dir : k->tt.dir);
}

typedef struct growbuf {
    char *p;
    size_t len, cap;
} growbuf;

static size_t grow(growbuf *b, const char *data, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = (b->len + n + 1) * 2;
        char *np = realloc(b->p, cap);
        if (np == NULL)
            return 0;
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
    return n;
}

static size_t on_data(char *data, size_t size, size_t n, void *arg)
{
    return grow(arg, data, size * n);
}

static atomic_int quiet;

void kh_set_quiet(int q)
{
    atomic_store(&quiet, q);
}

int kh_request_h(CURL *c, const char *sock, const char *method, const char *path, const char *body,
                 size_t body_len, const char *const *headers, kh_response *out)
{
    growbuf b = {0}, h = {0};
    struct curl_slist *list = NULL;
    char url[2048];
    CURLcode cc;

    memset(out, 0, sizeof(*out));
    snprintf(url, sizeof(url), "http://kms%s", path);
    curl_easy_setopt(c, CURLOPT_UNIX_SOCKET_PATH, sock);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT, 120L);
    if (body != NULL) {
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body_len);
    } else {
        curl_easy_setopt(c, CURLOPT_HTTPGET, 1L);
        curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
    }
    for (size_t i = 0; headers != NULL && headers[i] != NULL; i++)
        list = curl_slist_append(list, headers[i]);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, list);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_HEADERDATA, &h);
    cc = curl_easy_perform(c);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, NULL);
    curl_slist_free_all(list);
    if (cc != CURLE_OK) {
        if (!atomic_load(&quiet))
            fprintf(stderr, "curl %s %s: %s\n", method, path, curl_easy_strerror(cc));
        free(b.p);
        free(h.p);
        return -1;
    }
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &out->status);
    out->body = b.p != NULL ? b.p : strdup("");
    out->len = b.len;
    out->headers = h.p != NULL ? h.p : strdup("");
    return 0;
}

int kh_request(const char *sock, const char *method, const char *path, const char *body,
               size_t body_len, const char *const *headers, kh_response *out)
{
    CURL *c = curl_easy_init();
    int rv;

    if (c == NULL)
        return -1;
    rv = kh_request_h(c, sock, method, path, body, body_len, headers, out);
    curl_easy_cleanup(c);
    return rv;
}

void kh_response_free(kh_response *r)
{
    free(r->body);
    free(r->headers);
    memset(r, 0, sizeof(*r));
}

int kh_header(const kh_response *r, const char *name, char *out, size_t len)
{
    size_t nlen = strlen(name);

    for (const char *line = r->headers; line != NULL && *line != '\0';) {
        const char *end = strchr(line, '\n');
        size_t llen = end != NULL ? (size_t)(end - line) : strlen(line);
        if (llen > nlen && strncasecmp(line, name, nlen) == 0 && line[nlen] == ':') {
            const char *v = line + nlen + 1;
            while (*v == ' ')
                v++;
            size_t vlen = (size_t)(line + llen - v);
            while (vlen > 0 && (v[vlen - 1] == '\r' || v[vlen - 1] == ' '))
                vlen--;
            snprintf(out, len, "%.*s", (int)vlen, v);
            return 1;
        }
        line = end != NULL ? end + 1 : NULL;
    }
    return 0;
}

int kh_raw(const char *sock, const char *data, size_t len, int timeout_ms, char **reply)
{
    struct sockaddr_un sun;
    growbuf b = {0};
    size_t off = 0;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    char buf[65536];
    struct timespec start, now;

    *reply = NULL;
    if (fd < 0)
        return -1;
    memset(&sun, 0, sizeof(sun));
    sun.sun_family = AF_UNIX;
    snprintf(sun.sun_path, sizeof(sun.sun_path), "%s", sock);
    if (connect(fd, (struct sockaddr *)&sun, sizeof(sun)) != 0) {
        close(fd);
        return -1;
    }
    while (off < len) {
        ssize_t n = send(fd, data + off, len - off, MSG_NOSIGNAL);
        if (n <= 0)
            break; /* the server may close early; read what it said */
        off += (size_t)n;
    }
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        struct pollfd pfd = {fd, POLLIN, 0};
        clock_gettime(CLOCK_MONOTONIC, &now);
        long left = timeout_ms -
                    ((now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000);
        if (left <= 0 || poll(&pfd, 1, (int)left) <= 0)
            break;
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n <= 0)
            break;
        grow(&b, buf, (size_t)n);
    }
    close(fd);
    *reply = b.p != NULL ? b.p : strdup("");
    return 0;
}

int kh_run(const char *const argv[], char **output)
{
    int pipefd[2];
    growbuf b = {0};
    char buf[4096];
    ssize_t n;
    int status = 0;
    pid_t pid;

    *output = NULL;
    if (pipe(pipefd) != 0)
        return -1;
    pid = fork();
    if (pid < 0)
        return -1;
    if (pid == 0) {
        dup2(pipefd[1], STDOUT_FILENO);
        dup2(pipefd[1], STDERR_FILENO);
        close(pipefd[0]);
        close(pipefd[1]);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(pipefd[1]);
    while ((n = read(pipefd[0], buf, sizeof(buf))) > 0)
        grow(&b, buf, (size_t)n);
    close(pipefd[0]);
    waitpid(pid, &status, 0);
    *output = b.p != NULL ? b.p : strdup("");
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

long kh_proc_kb(pid_t pid, const char *field)
{
    char path[64], *text, *p;
    long v = -1;

    snprintf(path, sizeof(path), "/proc/%d/status", (int)pid);
    text = kh_read_file(path, NULL);
    if (text == NULL)
        return -1;
    p = strstr(text, field);
    if (p != NULL && (p = strchr(p, ':')) != NULL)
        v = strtol(p + 1, NULL, 10);
    free(text);
    return v;
}

double kh_proc_cpu(pid_t pid)
{
    char path[64], *text, *p;
    unsigned long long utime, stime;
    long tck = sysconf(_SC_CLK_TCK);
    double cpu = -1;

    snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
    text = kh_read_file(path, NULL);
    if (text == NULL)
        return -1;
    /* utime and stime: fields 14 and 15, the 12th and 13th after the
     * command name's closing ')'. */
    p = strrchr(text, ')');
    if (tck > 0 && p != NULL &&
        sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) ==
            2)
        cpu = (double)(utime + stime) / (double)tck;
    free(text);
    return cpu;
}

int kh_log_count(const kh_kmsd *k, const char *needle)
{
    char *log = kh_read_file(k->log, NULL);
    int n = 0;

    for (const char *p = log; p != NULL && (p = strstr(p, needle)) != NULL; p += strlen(needle))
        n++;
    free(log);
    return n;
}

long kh_metric_value(const char *text, const char *name)
{
    size_t n = strlen(name);

    for (const char *line = text; line != NULL && *line != '\0';) {
        if (strncmp(line, name, n) == 0 && line[n] == ' ')
            return strtol(line + n + 1, NULL, 10);
        line = strchr(line, '\n');
        if (line != NULL)
            line++;
    }
    return -1;
}
