/*
 * tests/bench/bench.c - p11kms_bench: run the benchmark sections, print
 * the table, write the JSON (issue 7).
 *
 *   p11kms_bench [--seconds S] [--clients N] [--out FILE] [--only LIST]
 *                [--kmsd PATH] [--shim PATH] [--softhsm PATH]
 *                [--slow-delay-us US]
 *   p11kms_bench --socket SOCK[,SOCK...]   (datakeys against running kmsd nodes)
 *
 * LIST is a comma-separated subset of raw,inproc,http,slow,rewrap,ceiling
 * (default all).  FILE defaults to $P11KMS_BENCH_OUT, else
 * bench-results.json.  Progress goes to stderr, the table to stdout.  Every
 * service figure is also given as a ratio to the raw token primitive
 * measured in the same run, because absolute numbers drift between
 * machines; the targets are shown beside them.
 *
 * CPU per operation: raw, inproc and ceiling figures come with the process
 * CPU (getrusage) of their measured run per operation; the HTTP ones with
 * kmsd's CPU plus the load generator's (*_kmsd_cpu_us + *_client_cpu_us).
 * From the ceiling (ceiling.c: one HTTP/JSON exchange with no KMS behind
 * it) and the raw token figures this file derives cpu_bound_datakey_ops_s
 * and cpu_bound_decrypt_ops_s = CPUs x 1e6 / (raw_http_cpu_us +
 * raw_<op>_cpu_us): the most any server could answer on this machine, its
 * load generator included, if a request cost one exchange and one token
 * operation.  Nothing here asserts: the exit status is non-zero only when
 * a section could not run.
 */
#include <dirent.h>
#include <getopt.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#include "bench.h"
#include "testtoken.h"

#ifndef KMSD_PATH
#define KMSD_PATH "kmsd"
#endif
#ifndef P11SHIM_PATH
#define P11SHIM_PATH "libp11shim.so"
#endif

double bench_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

double bench_cpu_self(void)
{
    struct rusage ru;

    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return -1;
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

double bench_cpu_pid(pid_t pid)
{
    /* Not /proc/<pid>/schedstat: that is the main thread's alone. */
    clockid_t clock;
    struct timespec ts;
    char path[64], buf[1024];
    const char *p;
    unsigned long long utime, stime;
    long tck = sysconf(_SC_CLK_TCK);
    size_t n;
    int fields;
    FILE *f = NULL;
    double cpu = -1;

    if (clock_getcpuclockid(pid, &clock) == 0 && clock_gettime(clock, &ts) == 0) {
        cpu = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
        goto out;
    }
    snprintf(path, sizeof(path), "/proc/%ld/stat", (long)pid);
    if (tck <= 0 || (f = fopen(path, "r")) == NULL)
        goto out;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    /* utime and stime: fields 14 and 15, the 12th and 13th after the
     * command name's closing ')'. */
    if ((p = strrchr(buf, ')')) == NULL)
        goto out;
    fields =
        sscanf(p + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime);
    if (fields != 2)
        goto out;
    cpu = (double)(utime + stime) / (double)tck;
out:
    if (f != NULL)
        fclose(f);
    return cpu;
}

/* Add one thread's utime/stime (ticks) to its name's group. */
static void threads_add(bench_threads *t, const char *name, double user_s, double sys_s)
{
    int i;

    for (i = 0; i < t->n && strcmp(t->g[i].name, name) != 0; i++)
        ;
    if (i == t->n) {
        if (t->n == BENCH_THREAD_GROUPS)
            return;
        snprintf(t->g[i].name, sizeof(t->g[i].name), "%s", name);
        t->g[i].user_s = t->g[i].sys_s = 0;
        t->n++;
    }
    t->g[i].user_s += user_s;
    t->g[i].sys_s += sys_s;
}

/* One thread's name and utime/stime from /proc/<pid>/task/<tid>/stat. */
static int thread_read(pid_t pid, const char *tid, char name[16], double *user_s, double *sys_s)
{
    char path[96], buf[1024];
    const char *open_paren, *close_paren;
    unsigned long long utime, stime;
    long tck = sysconf(_SC_CLK_TCK);
    size_t n, len;
    FILE *f;
    int rc = -1;

    snprintf(path, sizeof(path), "/proc/%ld/task/%s/stat", (long)pid, tid);
    if (tck <= 0 || (f = fopen(path, "r")) == NULL)
        return -1;
    n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    fclose(f);
    open_paren = strchr(buf, '(');
    close_paren = strrchr(buf, ')');
    if (open_paren == NULL || close_paren == NULL || close_paren < open_paren)
        goto out;
    len = (size_t)(close_paren - open_paren - 1);
    if (len > 15)
        len = 15;
    memcpy(name, open_paren + 1, len);
    name[len] = '\0';
    if (sscanf(close_paren + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime,
               &stime) != 2)
        goto out;
    *user_s = (double)utime / (double)tck;
    *sys_s = (double)stime / (double)tck;
    rc = 0;
out:
    return rc;
}

int bench_threads_read(pid_t pid, bench_threads *t)
{
    char path[64], name[16];
    struct dirent *de;
    double user_s, sys_s;
    DIR *d;

    memset(t, 0, sizeof(*t));
    snprintf(path, sizeof(path), "/proc/%ld/task", (long)pid);
    if ((d = opendir(path)) == NULL)
        return -1;
    while ((de = readdir(d)) != NULL)
        if (de->d_name[0] != '.' && thread_read(pid, de->d_name, name, &user_s, &sys_s) == 0)
            threads_add(t, name, user_s, sys_s);
    closedir(d);
    return 0;
}

void bench_threads_diff(const bench_threads *before, const bench_threads *after, bench_threads *out)
{
    memset(out, 0, sizeof(*out));
    for (int i = 0; i < after->n; i++) {
        double user_s = after->g[i].user_s, sys_s = after->g[i].sys_s;

        for (int j = 0; j < before->n; j++)
            if (strcmp(before->g[j].name, after->g[i].name) == 0) {
                user_s -= before->g[j].user_s;
                sys_s -= before->g[j].sys_s;
            }
        threads_add(out, after->g[i].name, user_s, sys_s);
    }
}

void bench_set(json_t *out, const char *name, double v)
{
    json_object_set_new(out, name, json_real(round(v * 100.0) / 100.0));
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

double bench_quantile(float *v, size_t n, double q)
{
    size_t i;

    if (n == 0)
        return 0.0;
    qsort(v, n, sizeof(*v), cmp_float);
    i = (size_t)ceil(q * (double)n);
    if (i > 0)
        i--;
    if (i >= n)
        i = n - 1;
    return v[i];
}

/* ---- the table -------------------------------------------------------------------- */

typedef struct row {
    const char *field; /* NULL: a blank line */
    const char *unit;
    const char *raw;    /* the raw primitive it is compared to, or NULL */
    const char *ratio;  /* name of the ratio field */
    const char *target; /* text */
    int cmp;            /* +1: value (or ratio) >= limit, -1: <=, 0: none */
    double limit;
    int on_ratio; /* the target applies to the ratio */
} row;

static const row rows[] = {
    {"raw_generate_ops_s", "ops/s", NULL, NULL, "", 0, 0, 0},
    {"raw_decrypt_ops_s", "ops/s", NULL, NULL, "", 0, 0, 0},
    {"raw_rewrap_ops_s", "ops/s", NULL, NULL, "", 0, 0, 0},
    {"inproc_datakey_ops_s", "ops/s", "raw_generate_ops_s", "inproc_datakey_vs_raw_generate", "", 0,
     0, 1},
    {"inproc_decrypt_ops_s", "ops/s", "raw_decrypt_ops_s", "inproc_decrypt_vs_raw_decrypt", "", 0,
     0, 1},
    {"http_datakey_ops_s", "ops/s", "raw_generate_ops_s", "http_datakey_vs_raw_generate",
     ">= 0.5 x raw", 1, 0.5, 1},
    {"http_decrypt_ops_s", "ops/s", "raw_decrypt_ops_s", "http_decrypt_vs_raw_decrypt",
     ">= 0.5 x raw", 1, 0.5, 1},
    {"http_datakey_p50_ms", "ms", NULL, NULL, "", 0, 0, 0},
    {"http_datakey_p99_ms", "ms", NULL, NULL, "<= 5 ms", -1, 5, 0},
    {"kmsd_rss_mib_peak", "MiB", NULL, NULL, "<= 64 MiB", -1, 64, 0},
    {"slow_token_scaling", "x", NULL, NULL, ">= 10", 1, 10, 0},
    {"rewrap_deks_s", "DEKs/s", "raw_rewrap_ops_s", "rewrap_vs_raw_rewrap", ">= 0.5 x raw", 1, 0.5,
     1},
    {NULL, NULL, NULL, NULL, NULL, 0, 0, 0},
    {"raw_generate_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"raw_decrypt_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"inproc_datakey_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"inproc_decrypt_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"http_datakey_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"http_datakey_kmsd_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"http_datakey_client_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"http_decrypt_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"http_decrypt_kmsd_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"http_decrypt_client_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"raw_http_ops_s", "ops/s", NULL, NULL, "", 0, 0, 0},
    {"raw_http_cpu_us", "us/op", NULL, NULL, "", 0, 0, 0},
    {"cpu_bound_datakey_ops_s", "ops/s", "raw_generate_ops_s", "cpu_bound_datakey_vs_raw_generate",
     "", 0, 0, 1},
    {"cpu_bound_decrypt_ops_s", "ops/s", "raw_decrypt_ops_s", "cpu_bound_decrypt_vs_raw_decrypt",
     "", 0, 0, 1},
};

#define CPU_BOUND_NOTE                                                                             \
    "CPUs x 1e6 / (raw_http_cpu_us + raw_<op>_cpu_us): the most any server could answer on this "  \
    "machine (load generator included) if a request cost one HTTP/JSON exchange and one raw "      \
    "token operation; no store, no durability, no audit"

static int num(json_t *root, const char *field, double *v)
{
    json_t *j = json_object_get(root, field);

    if (!json_is_number(j))
        return 0;
    *v = json_number_value(j);
    return 1;
}

/* cpu_bound_<op>_ops_s = cpus x 1e6 / (raw_http_cpu_us + raw_<cpu>_cpu_us),
 * when both were measured. */
static void cpu_bound(json_t *root, long cpus, const char *op, const char *raw)
{
    char field[64];
    double http_us, raw_us;

    snprintf(field, sizeof(field), "raw_%s_cpu_us", raw);
    if (cpus < 1 || !num(root, "raw_http_cpu_us", &http_us) || !num(root, field, &raw_us) ||
        http_us + raw_us <= 0)
        return;
    snprintf(field, sizeof(field), "cpu_bound_%s_ops_s", op);
    bench_set(root, field, (double)cpus * 1e6 / (http_us + raw_us));
}

/* Derive the CPU-bound ceilings, compute the ratios and targets into root,
 * and print the table. */

/* One line: kmsd's CPU per request of http_details.<op> by thread name
 * (from /proc: clock ticks, so a few us either way). */
static void print_threads(json_t *details, const char *op)
{
    json_t *threads = json_object_get(json_object_get(details, op), "server_threads");
    const char *name;
    json_t *g;

    if (!json_is_object(threads))
        return;
    printf("kmsd CPU per %s by thread (us, user + system):", op);
    json_object_foreach(threads, name, g)
    {
        double u = json_real_value(json_object_get(g, "user_us"));
        double sy = json_real_value(json_object_get(g, "sys_us"));

        if (u + sy >= 0.5)
            printf(" %s %.0f + %.0f;", name, u, sy);
    }
    printf("\n");
}

static void finish(json_t *root, long cpus)
{
    json_t *ratios = json_object(), *targets = json_object();

    cpu_bound(root, cpus, "datakey", "generate");
    cpu_bound(root, cpus, "decrypt", "decrypt");
    printf("\n%-26s %12s %-7s %-20s %7s  %-14s %s\n", "figure", "value", "unit", "relative to",
           "ratio", "target", "met");
    printf("%.*s\n", 104,
           "-------------------------------------------------------------------------------------"
           "-------------------");
    for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
        const row *r = &rows[i];
        double v = 0, raw = 0, ratio = 0, subject;
        int have, have_ratio;
        char value[32], ratio_s[16];
        const char *met = "";

        if (r->field == NULL) {
            printf("\n");
            continue;
        }
        have = num(root, r->field, &v);
        have_ratio = have && r->raw != NULL && num(root, r->raw, &raw) && raw > 0;

        if (have_ratio) {
            ratio = v / raw;
            json_object_set_new(ratios, r->ratio, json_real(round(ratio * 1000.0) / 1000.0));
        } else if (r->ratio != NULL) {
            json_object_set_new(ratios, r->ratio, json_null());
        }
        if (r->cmp != 0) {
            json_t *t = json_object();
            int ok = 0, known = r->on_ratio ? have_ratio : have;
            subject = r->on_ratio ? ratio : v;
            if (known)
                ok = r->cmp > 0 ? subject >= r->limit : subject <= r->limit;
            json_object_set_new(t, "target", json_string(r->target));
            json_object_set_new(t, "met", known ? json_boolean(ok) : json_null());
            json_object_set_new(targets, r->field, t);
            met = known ? (ok ? "yes" : "NO") : "n/a";
        }
        if (have)
            snprintf(value, sizeof(value), v >= 100 ? "%.0f" : "%.2f", v);
        else
            snprintf(value, sizeof(value), "null");
        if (have_ratio)
            snprintf(ratio_s, sizeof(ratio_s), "%.3f", ratio);
        else
            snprintf(ratio_s, sizeof(ratio_s), "%s", r->raw != NULL ? "-" : "");
        printf("%-26s %12s %-7s %-20s %7s  %-14s %s\n", r->field, value, r->unit,
               r->raw != NULL ? r->raw : "", ratio_s, r->target, met);
    }
    {
        json_t *note = json_object_get(json_object_get(root, "notes"), "rewrap_deks_s");
        if (json_is_string(note))
            printf("\nrewrap_deks_s: %s\n", json_string_value(note));
        if (json_object_get(root, "cpu_bound_datakey_ops_s") != NULL ||
            json_object_get(root, "cpu_bound_decrypt_ops_s") != NULL)
            printf("cpu_bound_*: %ld %s\n", cpus, CPU_BOUND_NOTE);
        print_threads(json_object_get(root, "http_details"), "datakey");
        print_threads(json_object_get(root, "http_details"), "decrypt");
    }
    json_object_set_new(root, "ratios", ratios);
    json_object_set_new(root, "targets", targets);
}

/* ---- main ------------------------------------------------------------------------ */

/* Before a section: write back what the previous one left dirty (the
 * in-process and rewrap runs leave hundreds of MB), so its writeback
 * does not land in the next section's measured window. */
static void settle(void)
{
    sync();
    sleep(1);
}

static int wanted(const char *only, const char *section)
{
    size_t len = strlen(section);

    if (only == NULL)
        return 1;
    for (const char *p = only; (p = strstr(p, section)) != NULL; p += len)
        if ((p == only || p[-1] == ',') && (p[len] == '\0' || p[len] == ','))
            return 1;
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: p11kms_bench [--seconds S] [--clients N] [--out FILE] [--only "
               "raw,inproc,http,slow,rewrap,ceiling]\n"
               "                    [--kmsd PATH] [--shim PATH] [--softhsm PATH] "
               "[--slow-delay-us US]\n"
               "       p11kms_bench --socket SOCK[,SOCK...] [--seconds S] [--clients N]\n"
               "                    (datakeys against running kmsd nodes only)\n"
               "\n"
               "Figures: ops/s of the raw token primitives (raw), the core library in-process\n"
               "(inproc), kmsd on its Unix socket (http), kmsd on a slow token (slow), stored\n"
               "rewrap (rewrap), and a bare libevent+jansson HTTP server answering datakeys\n"
               "with a fixed reply (ceiling: raw_http_ops_s), each with CPU microseconds per\n"
               "operation (*_cpu_us; for http, kmsd's and the clients'), and the CPU-bound\n"
               "ceiling cpu_bound_{datakey,decrypt}_ops_s = CPUs x 1e6 / (raw_http_cpu_us +\n"
               "raw_{generate,decrypt}_cpu_us).  See docs/performance.md.\n");
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"seconds", required_argument, NULL, 's'}, {"clients", required_argument, NULL, 'c'},
        {"out", required_argument, NULL, 'o'},     {"only", required_argument, NULL, 'O'},
        {"kmsd", required_argument, NULL, 'k'},    {"shim", required_argument, NULL, 'S'},
        {"softhsm", required_argument, NULL, 'm'}, {"slow-delay-us", required_argument, NULL, 'd'},
        {"socket", required_argument, NULL, 'u'},
        {"help", no_argument, NULL, 'h'},          {NULL, 0, NULL, 0},
    };
    bench_opts o = {3.0, 32, KMSD_PATH, P11SHIM_PATH, NULL, NULL, NULL, 2000, NULL, NULL};
    const char *out_path = getenv("P11KMS_BENCH_OUT");
    const char *only = NULL;
    json_t *root = json_object(), *notes = json_object(), *machine = json_object();
    tt_token tt;
    char tmpdir[256] = "";
    int have_token = 0, failed = 0, opt;
    struct utsname un;
    time_t now = time(NULL);
    char date[32];
    double t_start = bench_now();

    if (out_path == NULL || *out_path == '\0')
        out_path = "bench-results.json";
    o.softhsm = tt_softhsm_module();
    while ((opt = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (opt) {
        case 's': o.seconds = atof(optarg); break;
        case 'c': o.clients = atoi(optarg); break;
        case 'o': out_path = optarg; break;
        case 'O': only = optarg; break;
        case 'k': o.kmsd = optarg; break;
        case 'S': o.shim = optarg; break;
        case 'm': o.softhsm = optarg; break;
        case 'd': o.slow_delay_us = atoi(optarg); break;
        case 'u': o.sockets = optarg; only = "external"; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (o.seconds <= 0 || o.seconds > 120 || o.clients < 1 || o.clients > 256) {
        fprintf(stderr, "p11kms_bench: --seconds must be in (0, 120], --clients in [1, 256]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);

    if (wanted(only, "raw") || wanted(only, "inproc") || wanted(only, "rewrap") ||
        wanted(only, "ceiling")) {
        if (tt_tempdir(tmpdir, sizeof(tmpdir)) != 0) {
            fprintf(stderr, "p11kms_bench: cannot make a temp dir\n");
            return 1;
        }
        o.tmpdir = tmpdir;
    }
    if (wanted(only, "raw") || wanted(only, "inproc") || wanted(only, "rewrap")) {
        if (tt_token_new("p11kms-bench", &tt) != 0) {
            fprintf(stderr, "p11kms_bench: cannot make a token\n");
            tt_rmtree(tmpdir);
            return 1;
        }
        have_token = 1;
        o.uri = tt.uri;
    }
    if (wanted(only, "raw") && bench_raw(&o, root) != 0)
        failed++;
    if (wanted(only, "inproc") && (settle(), bench_inproc(&o, root) != 0))
        failed++;
    /* Stored rewrap (issue 3): 100 000 DEKs, one kms_key_rewrap (rewrap.c).
     * Before the HTTP stages: they make tokens of their own and point
     * SOFTHSM2_CONF at them, so this token would no longer be found. */
    if (wanted(only, "rewrap") && (settle(), bench_rewrap(&o, root) != 0))
        failed++;
    /* The raw HTTP ceiling (ceiling.c): no token, a socket in tmpdir. */
    if (wanted(only, "ceiling") && (settle(), bench_ceiling(&o, root) != 0))
        failed++;
    if (wanted(only, "http") && (settle(), bench_http(&o, root) != 0))
        failed++;
    if (wanted(only, "slow") && (settle(), bench_slow(&o, root) != 0))
        failed++;
    if (o.sockets != NULL && bench_external(&o, root) != 0)
        failed++;
    if (have_token)
        tt_token_remove(&tt);
    if (tmpdir[0] != '\0')
        tt_rmtree(tmpdir);

    json_object_set_new(notes, "rewrap_deks_s",
                        json_string("100 000 DEKs issued in-process, key rotated, one "
                                    "kms_key_rewrap of the whole key (256 per commit)"));
    json_object_set_new(notes, "cpu_bound", json_string(CPU_BOUND_NOTE));
    json_object_set_new(root, "notes", notes);

    strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    json_object_set_new(machine, "date", json_string(date));
    json_object_set_new(machine, "cpus", json_integer(sysconf(_SC_NPROCESSORS_ONLN)));
    if (uname(&un) == 0)
        json_object_set_new(machine, "kernel", json_string(un.release));
    json_object_set_new(machine, "module", json_string(o.softhsm));
    json_object_set_new(machine, "seconds_per_run", json_real(o.seconds));
    json_object_set_new(machine, "clients", json_integer(o.clients));
    json_object_set_new(machine, "slow_delay_us", json_integer(o.slow_delay_us));
    json_object_set_new(root, "machine", machine);

    finish(root, sysconf(_SC_NPROCESSORS_ONLN));
    json_object_set_new(root, "duration_s", json_real(round(bench_now() - t_start)));
    if (json_dump_file(root, out_path, JSON_INDENT(2) | JSON_SORT_KEYS) != 0) {
        fprintf(stderr, "p11kms_bench: cannot write %s\n", out_path);
        failed++;
    } else {
        printf("\nwrote %s (%.0f s)\n", out_path, bench_now() - t_start);
    }
    json_decref(root);
    return failed ? 1 : 0;
}
