/*
 * tests/support/kmsd_harness.h - run the real kmsd binary for a test and
 * talk HTTP to it over its Unix socket (libcurl).
 *
 * kh_setup makes a private SoftHSM2 token (testtoken.h), a temp dir with a
 * PIN file (0600), a kmsd.conf using relative paths (kmsd.sock, pin; the
 * SQLite store at k->store.path, dir/kms.db unless a test moves it) and
 * room for extra configuration lines.  kh_start forks and execs
 * kmsd with its stderr in dir/kmsd.log and waits until GET /v1/health
 * answers 200.
 */
#ifndef P11KMS_TESTS_KMSD_HARNESS_H
#define P11KMS_TESTS_KMSD_HARNESS_H

#include <stddef.h>
#include <sys/types.h>

#include <curl/curl.h>

#include "testtoken.h"
#include "teststore.h"

typedef struct kh_kmsd {
    const char *kmsd; /* path of the kmsd binary */
    tt_token tt;
    char dir[256]; /* = tt.dir */
    char conf[320];
    char pin[320];
    char sock[320];
    char db[320];
    char log[320];
    pid_t pid; /* 0 when not running */
    ts_db store; /* the [store] of kmsd.conf: P11KMS_TEST_STORE selects it */
    int peer;    /* made by kh_setup_peer: token and store are another's */
    /* > 0: kmsd starts with RLIMIT_NOFILE at this, soft and hard (kmsd
     * raises its soft limit by itself, up to the hard one); 0 (kh_setup's
     * default): the test's own limit. */
    long nofile;
} kh_kmsd;

typedef struct kh_response {
    long status;
    char *body; /* NUL-terminated */
    size_t len;
    char *headers; /* raw response headers, NUL-terminated */
} kh_response;

/* Token, temp dir, PIN file and a kmsd.conf with `extra` appended (may be
 * NULL; full INI lines, e.g. "[server]\nmax_body = 1024\n" -- note that a
 * [server] section is already written, so extra server keys go in
 * server_extra).  Returns 0 or -1. */
int kh_setup(kh_kmsd *k, const char *kmsd, const char *label, const char *server_extra,
             const char *extra);

/* Another node of the same service: its own temp dir, socket, PIN file
 * and kmsd.conf, but the token and the store (database) of `first`
 * (which must outlive it).  Returns 0 or -1. */
int kh_setup_peer(kh_kmsd *k, const kh_kmsd *first, const char *server_extra, const char *extra);

/* Rewrite kmsd.conf (same rules as kh_setup). */
int kh_write_conf(kh_kmsd *k, const char *server_extra, const char *extra);

/* Start kmsd without waiting for it (k->pid is set): for a kill during
 * its start-up.  0 or -1. */
int kh_spawn(kh_kmsd *k);

/* Start kmsd and wait up to 60 s for /v1/health 200.  0 or -1 (then the
 * process is reaped and its log printed to stderr). */
int kh_start(kh_kmsd *k);

/* Start kmsd and wait for it to exit by itself (a refused start).  Returns
 * its exit status, -1 if it did not exit within timeout_s (it is killed). */
int kh_start_expect_exit(kh_kmsd *k, int timeout_s);

/* Send sig and wait up to 30 s.  Returns the exit status (0..255), 128+n
 * if killed by signal n, -1 on timeout. */
int kh_stop(kh_kmsd *k, int sig);

/* Stop if running, remove the token and the temp dir. */
void kh_teardown(kh_kmsd *k);

/* One request on a new connection.  body may be NULL.  headers: NULL or a
 * NULL-terminated list of extra header lines ("Expect:").  Returns 0 when
 * an HTTP response arrived. */
int kh_request(const char *sock, const char *method, const char *path, const char *body,
               size_t body_len, const char *const *headers, kh_response *out);

/* A request that got no HTTP response is reported on stderr unless quiet
 * is set (a test that kills kmsd under load expects many). */
void kh_set_quiet(int quiet);

/* Same with a caller-owned handle (keep-alive across calls). */
int kh_request_h(CURL *c, const char *sock, const char *method, const char *path, const char *body,
                 size_t body_len, const char *const *headers, kh_response *out);

void kh_response_free(kh_response *r);

/* Case-insensitive lookup of a header in r->headers; the value is copied
 * into out.  Returns 1 if found. */
int kh_header(const kh_response *r, const char *name, char *out, size_t len);

/* Write raw bytes on a new connection and read until the server closes
 * it or timeout_ms passes.  *reply is NUL-terminated (free()).  0 or -1. */
int kh_raw(const char *sock, const char *data, size_t len, int timeout_ms, char **reply);

/* Read a whole file (NUL-terminated, free()).  NULL on error. */
char *kh_read_file(const char *path, size_t *len);

/* Write a file with mode.  0 or -1. */
int kh_write_file(const char *path, const char *text, mode_t mode);

/* Run argv (argv[0] a path) with stdout+stderr captured into *output
 * (free()).  Returns the exit status, or -1. */
int kh_run(const char *const argv[], char **output);

/* A kmsd process value from /proc/PID/status in kB ("VmHWM"); -1. */
long kh_proc_kb(pid_t pid, const char *field);

/* Occurrences of needle in kmsd k's log so far. */
int kh_log_count(const kh_kmsd *k, const char *needle);

/* The value of the unlabelled counter or gauge `name` in a GET /metrics
 * body (Prometheus text), -1 if absent. */
long kh_metric_value(const char *text, const char *name);

/* CPU time (user + system, all threads) of process pid in seconds, from
 * /proc/PID/stat (clock-tick resolution); -1 if unknown. */
double kh_proc_cpu(pid_t pid);

#endif
