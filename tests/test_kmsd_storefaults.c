/*
 * tests/test_kmsd_storefaults.c - store faults under the real kmsd (SQLite
 * store), seen through HTTP on its Unix socket:
 *
 *  - disk full: the store lives on a small tmpfs mounted in a private
 *    mount namespace (the test calls unshare(CLONE_NEWNS) in its forked
 *    check child and kmsd inherits it; nothing is visible outside).  A
 *    filler file takes the free space; datakeys from 4 threads then
 *    answer 201 or 503 store_unavailable (some 503 at least), health
 *    says the store is unavailable, kmsd keeps serving; the filler is
 *    removed and writes succeed again without a restart;
 *  - a read-only database: kms.db and kms.db-wal made immutable
 *    (FS_IMMUTABLE_FL, `chattr +i`: root ignores file modes, but not
 *    this flag, which ext4, xfs and btrfs enforce on descriptors already
 *    open) while kmsd runs; then writable again.  Skipped, loudly, on a
 *    filesystem that does not support the flag.  And a store on a
 *    read-only bind mount at start: kmsd refuses to start and says why;
 *  - a locked database: another process (this test, through the SQLite
 *    library) holds BEGIN EXCLUSIVE: datakeys answer 503 store_unavailable
 *    within a bound (one busy timeout, then at once), health and metrics
 *    keep answering quickly, and the lock's release brings writes back.
 *
 * After every fault: each DEK ever acknowledged (201) decrypts to the same
 * bytes, before and after a restart of kmsd (it was durable); every DEK row
 * has its `datakey.generate` audit entry and every such entry its row; the
 * audit chain verifies; PRAGMA integrity_check is ok.  Note that decrypts
 * and other reads also answer 503 while the store cannot be written: their
 * audit entries must be durable first (fail closed).
 *
 * SQLite only (no _pg variant: tests/CMakeLists.txt).  Needs root for the
 * mount namespace (skipped with a message otherwise).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <linux/fs.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

#define KEY        "faulty"
#define CONTEXT    "{\"context\":{\"app\":\"storefaults\"}}"
#define MAX_ACKED  4096
#define THREADS    4
#define TMPFS_SIZE "8m"

static kh_kmsd K;
static char mnt[400];      /* a mount point of this test, or "" */
static char immut[2][600]; /* files made immutable, cleared in teardown */

typedef struct acked {
    char id[40];
    char plain[48];
} acked;

static acked acks[MAX_ACKED];
static int n_acks;
static pthread_mutex_t ack_mu = PTHREAD_MUTEX_INITIALIZER;

static double now_s(void)
{
    struct timespec t;

    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* One request (thread-safe, no assertions): the status (-1: no HTTP
 * answer), the parsed body in *out when asked (NULL if not JSON), the
 * time it took. */
static long call(const char *method, const char *path, const char *body, json_t **out,
                 double *seconds)
{
    kh_response r;
    double t0 = now_s();
    long status = -1;

    if (out != NULL)
        *out = NULL;
    if (kh_request(K.sock, method, path, body, body != NULL ? strlen(body) : 0, NULL, &r) == 0) {
        status = r.status;
        if (out != NULL)
            *out = json_loadb(r.body, r.len, 0, NULL);
        kh_response_free(&r);
    }
    if (seconds != NULL)
        *seconds = now_s() - t0;
    return status;
}

static const char *error_code(json_t *j)
{
    const char *c = json_string_value(json_object_get(json_object_get(j, "error"), "code"));

    return c != NULL ? c : "";
}

/* POST a datakey: 1 acknowledged (remembered), 0 503 store_unavailable,
 * -1 anything else (described in what). */
static int datakey(double *seconds, char *what, size_t whatlen)
{
    json_t *j = NULL;
    long status = call("POST", "/v1/keys/" KEY "/datakeys", CONTEXT, &j, seconds);
    int rv = -1;

    if (status == 201 && json_string_value(json_object_get(j, "dek_id")) != NULL) {
        pthread_mutex_lock(&ack_mu);
        if (n_acks < MAX_ACKED) {
            snprintf(acks[n_acks].id, sizeof(acks[n_acks].id), "%s",
                     json_string_value(json_object_get(j, "dek_id")));
            snprintf(acks[n_acks].plain, sizeof(acks[n_acks].plain), "%s",
                     json_string_value(json_object_get(j, "plaintext")));
            n_acks++;
            rv = 1;
        }
        pthread_mutex_unlock(&ack_mu);
    } else if (status == 503 && strcmp(error_code(j), "store_unavailable") == 0) {
        rv = 0;
    }
    if (rv < 0 && what != NULL)
        snprintf(what, whatlen, "datakey: status %ld, error %s", status, error_code(j));
    json_decref(j);
    return rv;
}

/* ---- concurrent clients during a fault ---------------------------------- */

typedef struct client {
    pthread_t th;
    int requests;
    int ok, unavailable, other;
    double max_unavailable_s; /* slowest 503 */
    char other_what[160];
} client;

static void *client_main(void *arg)
{
    client *c = arg;
    double s;

    for (int i = 0; i < c->requests; i++) {
        int r = datakey(&s, c->other_what, sizeof(c->other_what));
        if (r == 1) {
            c->ok++;
        } else if (r == 0) {
            c->unavailable++;
            if (s > c->max_unavailable_s)
                c->max_unavailable_s = s;
        } else {
            c->other++;
        }
    }
    return NULL;
}

/* THREADS clients x per datakeys; totals in *sum (asserts none failed in
 * another way than 503 store_unavailable). */
static void clients_run(int per, client *sum)
{
    client c[THREADS];

    memset(c, 0, sizeof(c));
    memset(sum, 0, sizeof(*sum));
    for (int i = 0; i < THREADS; i++) {
        c[i].requests = per;
        ck_assert_int_eq(pthread_create(&c[i].th, NULL, client_main, &c[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(c[i].th, NULL);
        ck_assert_msg(c[i].other == 0, "client %d: %d unexpected answers (last: %s)", i, c[i].other,
                      c[i].other_what);
        sum->ok += c[i].ok;
        sum->unavailable += c[i].unavailable;
        if (c[i].max_unavailable_s > sum->max_unavailable_s)
            sum->max_unavailable_s = c[i].max_unavailable_s;
    }
}

/* ---- what every fault must leave ---------------------------------------- */

static void start_kmsd(void)
{
    ck_assert_int_eq(kh_start(&K), 0);
}

static void create_key_and_deks(int n)
{
    long status = 0;
    char what[160] = "";

    json_decref(ku_call(&K, "POST", "/v1/keys", "{\"name\":\"" KEY "\"}", &status));
    ck_assert_int_eq(status, 201);
    for (int i = 0; i < n; i++)
        ck_assert_msg(datakey(NULL, what, sizeof(what)) == 1, "%s", what);
}

/* /v1/health: the status, and in *store its "store" field. */
static long health(char *store, size_t len, double *seconds)
{
    json_t *j = NULL;
    long status = call("GET", "/v1/health", NULL, &j, seconds);
    const char *s = json_string_value(json_object_get(j, "store"));

    snprintf(store, len, "%s", s != NULL ? s : "?");
    if (status == 503) {
        ck_assert_str_eq(error_code(j), "store_unavailable");
        ck_assert_str_eq(json_string_value(json_object_get(j, "token")), "ok");
    }
    json_decref(j);
    return status;
}

/* Health reports the store unavailable (within timeout_s). */
static void expect_health_unavailable(double timeout_s)
{
    char store[32];
    double t0 = now_s();
    long st;

    while ((st = health(store, sizeof(store), NULL)) == 200 && now_s() - t0 < timeout_s)
        usleep(100 * 1000);
    ck_assert_msg(st == 503, "health %ld while the store cannot be written", st);
    ck_assert_str_eq(store, "unavailable");
}

/* After the fault: writes come back by themselves, and health with them. */
static void expect_recovery(double timeout_s)
{
    char what[160] = "", store[32];
    double t0 = now_s();
    int r;

    while ((r = datakey(NULL, what, sizeof(what))) == 0 && now_s() - t0 < timeout_s)
        usleep(100 * 1000);
    ck_assert_msg(r == 1, "no datakey after the fault was cleared (%.1f s): %s", now_s() - t0,
                  r < 0 ? what : "503 store_unavailable");
    fprintf(stderr, "storefaults: writes back %.2f s after the fault was cleared\n", now_s() - t0);
    ck_assert_int_eq(health(store, sizeof(store), NULL), 200);
    for (int i = 0; i < 10; i++)
        ck_assert_msg(datakey(NULL, what, sizeof(what)) == 1, "%s", what);
}

/* While the store cannot be written, reads whose audit entry must be
 * durable first answer 503 store_unavailable too (fail closed). */
static void expect_reads_fail_closed(void)
{
    char path[160];

    long status = 0;
    json_t *j;

    ck_assert_int_gt(n_acks, 0);
    snprintf(path, sizeof(path), "/v1/datakeys/%.39s/decrypt", acks[0].id);
    j = ku_call(&K, "POST", path, CONTEXT, &status);
    ck_assert_msg(status == 503 && strcmp(error_code(j), "store_unavailable") == 0,
                  "decrypt while the store cannot be written: %ld %s", status, error_code(j));
    json_decref(j);
    j = ku_call(&K, "GET", "/v1/keys/" KEY, NULL, &status);
    ck_assert_msg(status == 503 && strcmp(error_code(j), "store_unavailable") == 0,
                  "key show while the store cannot be written: %ld %s", status, error_code(j));
    json_decref(j);
}

/* /metrics: the store's writable gauge (-1 when absent). */
static int metric_writable(void)
{
    kh_response r;
    const char *p;
    int v = -1;

    ck_assert_int_eq(kh_request(K.sock, "GET", "/metrics", NULL, 0, NULL, &r), 0);
    ck_assert_int_eq(r.status, 200);
    p = strstr(r.body, "\np11kms_store_writable ");
    if (p != NULL)
        v = atoi(p + strlen("\np11kms_store_writable "));
    kh_response_free(&r);
    return v;
}

static void verify_consistent(const char *when)
{
    char path[160];
    long status = 0;
    json_t *j;
    long long rows, entries, orphans, lonely;

    for (int i = 0; i < n_acks; i++) {
        snprintf(path, sizeof(path), "/v1/datakeys/%.39s/decrypt", acks[i].id);
        j = ku_call(&K, "POST", path, CONTEXT, &status);
        ck_assert_msg(status == 200, "%s: acknowledged DEK %s: decrypt %ld %s", when, acks[i].id,
                      status, error_code(j));
        ck_assert_str_eq(json_string_value(json_object_get(j, "plaintext")), acks[i].plain);
        json_decref(j);
    }
    j = ku_call(&K, "GET", "/v1/audit/verify", NULL, &status);
    ck_assert_int_eq(status, 200);
    ck_assert_msg(json_is_true(json_object_get(j, "ok")), "%s: audit verify: %s", when,
                  json_dumps(j, JSON_COMPACT));
    json_decref(j);
    rows = ts_db_int(&K.store, "SELECT count(*) FROM deks");
    entries = ts_db_int(&K.store, "SELECT count(*) FROM audit WHERE operation = "
                                  "'datakey.generate' AND result = 'ok'");
    orphans =
        ts_db_int(&K.store, "SELECT count(*) FROM deks d WHERE NOT EXISTS (SELECT 1 FROM audit a "
                            "WHERE a.dek_id = d.id AND a.operation = 'datakey.generate' "
                            "AND a.result = 'ok')");
    lonely =
        ts_db_int(&K.store, "SELECT count(*) FROM audit a WHERE a.operation = 'datakey.generate' "
                            "AND a.result = 'ok' AND NOT EXISTS (SELECT 1 FROM deks d "
                            "WHERE d.id = a.dek_id)");
    ck_assert_msg(rows >= n_acks && rows == entries && orphans == 0 && lonely == 0,
                  "%s: %lld DEK rows, %lld generate entries, %lld rows without an entry, "
                  "%lld entries without a row, %d acknowledged",
                  when, rows, entries, orphans, lonely, n_acks);
    ck_assert_msg(ts_db_integrity_ok(&K.store), "%s: PRAGMA integrity_check failed", when);
    fprintf(stderr, "storefaults: %s: %d acknowledged DEKs decrypt, %lld rows = %lld entries\n",
            when, n_acks, rows, entries);
}

/* A clean stop (exit 0: with sanitizers, no leak or error report). */
static void stop_kmsd(void)
{
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
}

/* Stop kmsd cleanly, start it again on the same store, verify again. */
static void restart_and_verify(void)
{
    stop_kmsd();
    start_kmsd();
    verify_consistent("after a restart");
}

/* ---- fixtures ----------------------------------------------------------- */

static void teardown(void);

/* A failed assertion exits the check child without its teardown: do it
 * anyway (kmsd killed, immutable flags cleared, mounts gone). */
static void teardown_at_exit(void)
{
    teardown();
}

static void setup(void)
{
    atexit(teardown_at_exit);
    n_acks = 0;
    mnt[0] = immut[0][0] = immut[1][0] = '\0';
    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-storefaults", NULL, NULL), 0);
}

static int set_immutable(const char *path, int on)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK), flags = 0, rv = -1;

    if (fd < 0)
        return -1;
    if (ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0) {
        flags = on ? flags | FS_IMMUTABLE_FL : flags & ~FS_IMMUTABLE_FL;
        rv = ioctl(fd, FS_IOC_SETFLAGS, &flags);
    }
    close(fd);
    return rv;
}

static int torn_down;

static void teardown(void)
{
    if (torn_down++)
        return;
    for (int i = 0; i < 2; i++)
        if (immut[i][0] != '\0')
            set_immutable(immut[i], 0);
    if (K.pid > 0)
        kh_stop(&K, SIGKILL);
    if (mnt[0] != '\0')
        umount2(mnt, MNT_DETACH);
    kh_teardown(&K);
}

/* This check child in a mount namespace of its own, with private
 * propagation: its mounts (and kmsd's view, inherited) stay here.
 * 0, or -1 when the test cannot do it (not root). */
static int private_mounts(void)
{
    if (geteuid() != 0) {
        fprintf(stderr, "storefaults: SKIPPED: needs root for a private mount namespace\n");
        return -1;
    }
    ck_assert_msg(unshare(CLONE_NEWNS) == 0, "unshare(CLONE_NEWNS): %s", strerror(errno));
    ck_assert_msg(mount("none", "/", NULL, MS_REC | MS_PRIVATE, NULL) == 0, "making / private: %s",
                  strerror(errno));
    return 0;
}

/* Move the store to dir/kms.db (conf rewritten; kmsd not started). */
static void store_in(const char *dir)
{
    snprintf(K.store.path, sizeof(K.store.path), "%s/kms.db", dir);
    ck_assert_int_eq(kh_write_conf(&K, NULL, NULL), 0);
}

/* ---- disk full ---------------------------------------------------------- */

/* Fill the filesystem of dir with dir/filler; returns its size. */
static long long fill(const char *path)
{
    static char block[65536];
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    long long total = 0;
    size_t chunk = sizeof(block);

    ck_assert_int_ge(fd, 0);
    while (chunk >= 512) {
        ssize_t n = write(fd, block, chunk);
        if (n > 0) {
            total += n;
            continue;
        }
        ck_assert_msg(n < 0 && errno == ENOSPC, "filling: %s", strerror(errno));
        chunk /= 2;
    }
    close(fd);
    return total;
}

START_TEST(disk_full)
{
    char filler[420];
    client sum;
    long long filled;
    double t0;

    if (private_mounts() != 0)
        return;
    snprintf(mnt, sizeof(mnt), "%s/small", K.dir);
    ck_assert_int_eq(mkdir(mnt, 0700), 0);
    ck_assert_msg(
        mount("tmpfs", mnt, "tmpfs", MS_NOSUID | MS_NODEV, "size=" TMPFS_SIZE ",mode=0700") == 0,
        "mount tmpfs: %s", strerror(errno));
    store_in(mnt);
    start_kmsd();
    create_key_and_deks(20);
    ck_assert_int_eq(metric_writable(), 1);

    snprintf(filler, sizeof(filler), "%s/filler", mnt);
    filled = fill(filler);
    fprintf(stderr, "storefaults: disk full: %lld bytes of filler on a %s tmpfs\n", filled,
            TMPFS_SIZE);
    t0 = now_s();
    clients_run(50, &sum);
    fprintf(stderr,
            "storefaults: disk full: %d datakeys acknowledged, %d answered 503 "
            "store_unavailable (slowest %.3f s) in %.2f s\n",
            sum.ok, sum.unavailable, sum.max_unavailable_s, now_s() - t0);
    ck_assert_int_gt(sum.unavailable, 0);
    expect_health_unavailable(10);
    ck_assert_int_eq(metric_writable(), 0);
    expect_reads_fail_closed();
    ck_assert_int_eq(kill(K.pid, 0), 0);

    ck_assert_int_eq(unlink(filler), 0);
    expect_recovery(30);
    ck_assert_int_eq(metric_writable(), 1);
    verify_consistent("disk full, then space freed");
    restart_and_verify();
    stop_kmsd();
}
END_TEST

/* ---- read-only ---------------------------------------------------------- */

/* Whether FS_IMMUTABLE_FL stops writes on an open descriptor in dir. */
static int immutable_works(const char *dir)
{
    char path[420];
    int fd, works = 0;

    snprintf(path, sizeof(path), "%s/immutable-probe", dir);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ck_assert_int_ge(fd, 0);
    if (set_immutable(path, 1) == 0) {
        works = write(fd, "x", 1) < 0 && errno == EPERM;
        set_immutable(path, 0);
    }
    close(fd);
    unlink(path);
    return works;
}

START_TEST(read_only_file)
{
    client sum;

    if (geteuid() != 0 || !immutable_works(K.dir)) {
        fprintf(stderr, "storefaults: SKIPPED read_only_file: FS_IMMUTABLE_FL (chattr +i) "
                        "needs root and a filesystem that enforces it (ext4, xfs, btrfs)\n");
        return;
    }
    start_kmsd();
    create_key_and_deks(10);
    snprintf(immut[0], sizeof(immut[0]), "%s", K.store.path);
    snprintf(immut[1], sizeof(immut[1]), "%s-wal", K.store.path);
    for (int i = 0; i < 2; i++)
        ck_assert_msg(set_immutable(immut[i], 1) == 0, "chattr +i %s: %s", immut[i],
                      strerror(errno));

    clients_run(20, &sum);
    fprintf(stderr,
            "storefaults: read-only: %d datakeys acknowledged, %d answered 503 "
            "store_unavailable (slowest %.3f s)\n",
            sum.ok, sum.unavailable, sum.max_unavailable_s);
    ck_assert_int_eq(sum.ok, 0);
    expect_health_unavailable(10);
    ck_assert_int_eq(metric_writable(), 0);
    expect_reads_fail_closed();

    for (int i = 0; i < 2; i++) {
        ck_assert_int_eq(set_immutable(immut[i], 0), 0);
        immut[i][0] = '\0';
    }
    expect_recovery(30);
    verify_consistent("read-only, then writable");
    restart_and_verify();
    stop_kmsd();
}
END_TEST

/* A store on a read-only filesystem at start: kmsd refuses to start and
 * says why (fail closed), and starts once it is writable again. */
START_TEST(read_only_at_start)
{
    char *log;

    if (private_mounts() != 0)
        return;
    snprintf(mnt, sizeof(mnt), "%s/ro", K.dir);
    ck_assert_int_eq(mkdir(mnt, 0700), 0);
    store_in(mnt);
    start_kmsd();
    create_key_and_deks(3);
    stop_kmsd();

    ck_assert_int_eq(mount(mnt, mnt, NULL, MS_BIND, NULL), 0);
    ck_assert_int_eq(mount(NULL, mnt, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL), 0);
    ck_assert_int_gt(kh_start_expect_exit(&K, 60), 0);
    log = kh_read_file(K.log, NULL);
    ck_assert_ptr_nonnull(log);
    ck_assert_msg(strstr(log, "Read-only file system") != NULL, "kmsd's log does not say why");
    free(log);

    ck_assert_int_eq(umount2(mnt, 0), 0);
    start_kmsd();
    verify_consistent("after a start on a read-only store was refused");
    stop_kmsd();
}
END_TEST

/* ---- locked ------------------------------------------------------------- */

START_TEST(locked)
{
    sqlite3 *locker = NULL;
    client c[THREADS], sum;
    char store[32];
    double t0, s, max_health = 0, max_metrics = 0;
    long st = 0;
    int polls = 0;

    start_kmsd();
    create_key_and_deks(10);
    ck_assert_int_eq(sqlite3_open_v2(K.store.path, &locker, SQLITE_OPEN_READWRITE, NULL),
                     SQLITE_OK);
    sqlite3_busy_timeout(locker, 10000);
    ck_assert_int_eq(sqlite3_exec(locker, "BEGIN EXCLUSIVE", NULL, NULL, NULL), SQLITE_OK);

    /* Writers in the background; health and metrics polled meanwhile. */
    memset(c, 0, sizeof(c));
    t0 = now_s();
    for (int i = 0; i < THREADS; i++) {
        c[i].requests = 10;
        ck_assert_int_eq(pthread_create(&c[i].th, NULL, client_main, &c[i]), 0);
    }
    while (now_s() - t0 < 8) {
        kh_response r;
        double m0;

        st = health(store, sizeof(store), &s);
        if (s > max_health)
            max_health = s;
        m0 = now_s();
        ck_assert_int_eq(kh_request(K.sock, "GET", "/metrics", NULL, 0, NULL, &r), 0);
        ck_assert_int_eq(r.status, 200);
        kh_response_free(&r);
        if (now_s() - m0 > max_metrics)
            max_metrics = now_s() - m0;
        polls++;
        usleep(200 * 1000);
    }
    memset(&sum, 0, sizeof(sum));
    for (int i = 0; i < THREADS; i++) {
        pthread_join(c[i].th, NULL);
        ck_assert_msg(c[i].other == 0, "client %d: %s", i, c[i].other_what);
        sum.ok += c[i].ok;
        sum.unavailable += c[i].unavailable;
        if (c[i].max_unavailable_s > sum.max_unavailable_s)
            sum.max_unavailable_s = c[i].max_unavailable_s;
    }
    fprintf(stderr,
            "storefaults: locked: %d datakeys answered 503 store_unavailable (slowest %.2f s, "
            "all within %.1f s); %d health polls (slowest %.3f s), metrics slowest %.3f s\n",
            sum.unavailable, sum.max_unavailable_s, now_s() - t0, polls, max_health, max_metrics);
    ck_assert_int_eq(sum.ok, 0);
    ck_assert_int_eq(sum.unavailable, THREADS * 10);
    /* Bounded by the busy timeout (5 s), then refused at once; generous
     * bounds for a slow shared machine. */
    ck_assert_msg(sum.max_unavailable_s < 15, "a write waited %.1f s", sum.max_unavailable_s);
    ck_assert_msg(max_health < 5 && max_metrics < 5, "health %.1f s, metrics %.1f s", max_health,
                  max_metrics);
    ck_assert_int_eq(st, 503); /* the last poll, well after the first failure */
    ck_assert_str_eq(store, "unavailable");
    ck_assert_int_eq(metric_writable(), 0);
    expect_reads_fail_closed();

    ck_assert_int_eq(sqlite3_exec(locker, "ROLLBACK", NULL, NULL, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_close(locker), SQLITE_OK);
    expect_recovery(30);
    verify_consistent("locked, then released");
    restart_and_verify();
    stop_kmsd();
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_storefaults");
    TCase *tc = tcase_create("storefaults");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, disk_full);
    tcase_add_test(tc, read_only_file);
    tcase_add_test(tc, read_only_at_start);
    tcase_add_test(tc, locked);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr;
    int failed;

    curl_global_init(CURL_GLOBAL_ALL);
    sr = srunner_create(suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    curl_global_cleanup();
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
