/*
 * tests/bench/bench.h - the p11kms benchmark suite (p11kms_bench), shared
 * declarations.
 *
 * One program measures, in one run on one machine: the raw token
 * primitives (raw.c), the core library with the durable SQLite store
 * (inproc.c), kmsd over its Unix socket, on SoftHSM2 directly and through
 * the delay shim (http.c), and a bare HTTP/JSON server with no KMS behind
 * it (ceiling.c); http.c and ceiling.c share the load generator (load.c).
 * Each figure comes with the CPU it cost per operation (*_cpu_us).  bench.c
 * runs the sections, derives the CPU-bound ceilings, prints the table and
 * writes the JSON.  Each section writes its figures into a jansson object;
 * a figure it could not measure is absent (or null).  Every run is bounded
 * in time (--seconds per figure) and request count.
 */
#ifndef P11KMS_TESTS_BENCH_H
#define P11KMS_TESTS_BENCH_H

#include <sys/types.h>

#include <jansson.h>

/* Event loops of kmsd by default ([server] threads, kms/server/config.c):
 * the kmsd of http.c runs with as many, and so does the ceiling server. */
#define BENCH_KMSD_LOOPS 2

typedef struct bench_opts {
    double seconds;      /* length of one measured run */
    int clients;         /* concurrent HTTP clients (32) */
    const char *kmsd;    /* path of the kmsd binary */
    const char *shim;    /* path of libp11shim.so */
    const char *softhsm; /* path of libsofthsm2.so */
    const char *uri;     /* the in-process token (raw and inproc share it) */
    const char *tmpdir;  /* scratch directory for the in-process store */
    int slow_delay_us;   /* shim delay for slow_token_scaling (2000) */
    const char *profile; /* NULL, or a directory for per-call statistics */
    const char *sockets; /* --socket: running kmsd sockets, comma-separated */
} bench_opts;

/* Monotonic seconds. */
double bench_now(void);

/* CPU seconds (user + system) this process has used so far, all its
 * threads, exited ones included (getrusage RUSAGE_SELF). */
double bench_cpu_self(void);

/* CPU seconds process pid has used so far, all its threads, exited ones
 * included (its process CPU clock, clock_getcpuclockid: nanoseconds; else
 * utime + stime of /proc/<pid>/stat, in clock ticks).  -1 if unknown. */
double bench_cpu_pid(pid_t pid);

/* The CPU of a process's threads grouped by thread name (kmsd names its
 * threads: kmsd-loop, kmsd-worker, kms-writer, kms-checkpoint), user and
 * system apart, from /proc/<pid>/task/<tid>/stat (clock ticks). */
#define BENCH_THREAD_GROUPS 12
typedef struct bench_threads {
    int n;
    struct {
        char name[16];
        double user_s, sys_s;
    } g[BENCH_THREAD_GROUPS];
} bench_threads;

/* Snapshot pid's threads into t: 0, or -1 (no /proc). */
int bench_threads_read(pid_t pid, bench_threads *t);

/* after - before, per group (threads that exited in between are lost). */
void bench_threads_diff(const bench_threads *before, const bench_threads *after,
                        bench_threads *out);

/* Sections: 0 on success (figures set in out), -1 with a message. */
int bench_raw(const bench_opts *o, json_t *out);
int bench_inproc(const bench_opts *o, json_t *out);
int bench_http(const bench_opts *o, json_t *out);
int bench_slow(const bench_opts *o, json_t *out);
int bench_rewrap(const bench_opts *o, json_t *out); /* rewrap_deks_s (rewrap.c) */
/* --socket: datakeys against already running kmsd nodes (several nodes on
 * one database: the clients are spread over the sockets). */
int bench_external(const bench_opts *o, json_t *out);
/* The raw HTTP ceiling (ceiling.c): raw_http_ops_s, raw_http_cpu_us. */
int bench_ceiling(const bench_opts *o, json_t *out);

/* The HTTP load generator (load.c): `clients` keep-alive clients spread
 * round-robin over the Unix sockets socks[0..n_socks-1]. */
typedef struct bench_load bench_load;

typedef struct bench_load_result {
    double ops_s; /* successful replies per second */
    double p50_ms, p99_ms, max_ms;
    unsigned long ok, errors;
    double cpu_self_s;            /* CPU of this process over the run (the clients, and
                                   * anything else running in it) */
    double cpu_server_s;          /* CPU of the server process over the run, or -1 */
    bench_threads server_threads; /* cpu_server_s by thread name (n = 0: unknown) */
} bench_load_result;

/* 0, or -1 (*out untouched).  Free with bench_load_free (NULL is a no-op). */
int bench_load_new(const char *const *socks, int n_socks, int clients, bench_load **out);
void bench_load_free(bench_load *l);

/* Run the first n clients for `seconds`: datakeys (expecting 201), or with
 * decrypt the DEK ids each client was issued so far (200).  server: the
 * pid whose CPU is measured as cpu_server_s, or 0.  0, or -1. */
int bench_load_run(bench_load *l, int n, int decrypt, double seconds, pid_t server,
                   bench_load_result *r);

/* The run as a JSON object (ops_s, p50_ms, p99_ms, max_ms, ok, errors,
 * and per reply self_cpu_us: this process, server_cpu_us: the server
 * process, server_threads: {name: {user_us, sys_us}}); new reference. */
json_t *bench_load_json(const bench_load_result *r);

/* out[name] = v rounded to 2 decimals. */
void bench_set(json_t *out, const char *name, double v);

/* The value at quantile q (0..1) of n samples (sorted in place). */
double bench_quantile(float *v, size_t n, double q);

#endif
