/*
 * tests/test_store_groupcommit.c - the store's writer under load and under
 * failure: many threads sharing commits, a failing write in a group,
 * a locked database, and durability ordering across SIGKILL (a child
 * inserts DEKs and reports each acknowledged id; after the kill every
 * reported id must be in the reopened database, which must pass
 * PRAGMA integrity_check).
 */
#include <check.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <sqlite3.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "kms/store/store.h"
#include "kms/store/store_internal.h"
#include "support/testtoken.h"
#include "support/teststore.h"

#define N_THREADS    16
#define N_PER_THREAD 500

static char dir[256];
static ts_db db;

static void setup(void)
{
    ck_assert_int_eq(tt_tempdir(dir, sizeof(dir)), 0);
    ck_assert_int_eq(ts_db_new(dir, &db), 0);
}

static void teardown(void)
{
    ts_db_drop(&db);
    tt_rmtree(dir);
}

static void make_dek(kms_dek_rec *d, const char *key, unsigned thread, unsigned n)
{
    memset(d, 0, sizeof(*d));
    snprintf(d->id, sizeof(d->id), "%08x-%04x-4000-8000-%012x", n, thread, n ^ 0x5a5au);
    snprintf(d->key, sizeof(d->key), "%s", key);
    d->version = 1;
    d->state = KMS_DEK_ACTIVE;
    d->context = "{\"tenant\":\"t\"}";
    d->wrapped_len = 60;
    for (size_t i = 0; i < d->wrapped_len; i++)
        d->wrapped[i] = (unsigned char)(thread * 7u + n + i);
    d->created = 1700000000;
}

static kms_store *open_with_key(const char *key)
{
    kms_store *st = NULL;
    unsigned char tid[KMS_TOKEN_ID_LEN];

    memset(tid, 0xab, sizeof(tid));
    ck_assert_int_eq(ts_db_open(&db, &st), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_create(st, key, tid, 1), P11KMS_OK);
    return st;
}

typedef struct worker {
    kms_store *st;
    unsigned thread;
    unsigned count;
    unsigned failures;
    pthread_barrier_t *start;
} worker;

static void *insert_worker(void *arg)
{
    worker *w = arg;
    kms_dek_rec d;

    pthread_barrier_wait(w->start);
    for (unsigned i = 0; i < w->count; i++) {
        make_dek(&d, "load", w->thread, i);
        if (kms_store_dek_insert(w->st, &d) != P11KMS_OK)
            w->failures++;
    }
    return NULL;
}

START_TEST(sixteen_threads_share_commits)
{
    kms_store *st = open_with_key("load");
    pthread_t th[N_THREADS];
    worker w[N_THREADS];
    pthread_barrier_t start;
    uint64_t c0, w0, c1, w1;
    kms_key_rec *k = NULL;
    kms_dek_rec d, *got = NULL;
    struct timespec t0, t1;
    double secs;

    kms_store_stats(st, &c0, &w0);
    pthread_barrier_init(&start, NULL, N_THREADS + 1);
    for (unsigned i = 0; i < N_THREADS; i++) {
        w[i] = (worker){.st = st, .thread = i, .count = N_PER_THREAD, .start = &start};
        ck_assert_int_eq(pthread_create(&th[i], NULL, insert_worker, &w[i]), 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_barrier_wait(&start);
    for (unsigned i = 0; i < N_THREADS; i++) {
        pthread_join(th[i], NULL);
        ck_assert_uint_eq(w[i].failures, 0);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    pthread_barrier_destroy(&start);
    secs = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;

    kms_store_stats(st, &c1, &w1);
    fprintf(stderr,
            "group commit: %llu writes in %llu commits (%.1f writes/commit), %.0f inserts/s\n",
            (unsigned long long)(w1 - w0), (unsigned long long)(c1 - c0),
            (double)(w1 - w0) / (double)(c1 - c0), (double)(w1 - w0) / secs);
    ck_assert_uint_eq(w1 - w0, N_THREADS * N_PER_THREAD);
    ck_assert_uint_lt(c1 - c0, w1 - w0);

    ck_assert_int_eq(kms_store_key_get(st, "load", &k), P11KMS_OK);
    ck_assert_uint_eq(k->versions[0].wrap_count, N_THREADS * N_PER_THREAD);
    ck_assert_uint_eq(k->versions[0].dek_count, N_THREADS * N_PER_THREAD);
    kms_key_rec_free(k);
    kms_store_close(st);

    /* Every row readable after a reopen, bytes intact. */
    ck_assert_int_eq(ts_db_open(&db, &st), P11KMS_OK);
    for (unsigned t = 0; t < N_THREADS; t++)
        for (unsigned i = 0; i < N_PER_THREAD; i++) {
            make_dek(&d, "load", t, i);
            ck_assert_int_eq(kms_store_dek_get(st, d.id, &got), P11KMS_OK);
            ck_assert_mem_eq(got->wrapped, d.wrapped, d.wrapped_len);
            kms_dek_rec_free(got);
        }
    kms_store_close(st);
}
END_TEST

/* Hold the database write lock from another connection so the writer's
 * BEGIN IMMEDIATE waits; meanwhile queue writes (one a duplicate DEK id).
 * They all land in one group: the duplicate fails alone. */
typedef struct one_write {
    kms_store *st;
    kms_dek_rec dek;
    p11kms_status result;
} one_write;

static void *do_insert(void *arg)
{
    one_write *o = arg;

    o->result = kms_store_dek_insert(o->st, &o->dek);
    return NULL;
}

static void *lock_db(void)
{
    void *lock = ts_db_lock_writes(&db);

    ck_assert_ptr_nonnull(lock);
    return lock;
}

static void wait_queued(kms_store *st, uint64_t n)
{
    kms_store_stats_ex s;

    for (int i = 0; i < 4000; i++) {
        kms_store_stats_get(st, &s);
        if (s.queued >= n)
            return;
        usleep(1000);
    }
    ck_abort_msg("writes did not queue");
}

START_TEST(failing_write_does_not_fail_its_group)
{
    enum { N = 12 };
    kms_store *st = open_with_key("grp");
    pthread_t th[N];
    one_write ow[N];
    kms_store_stats_ex s0, s1;
    kms_dek_rec *got = NULL;
    kms_key_rec *k = NULL;
    void *lock;

    /* An existing DEK to collide with. */
    memset(&ow, 0, sizeof(ow));
    make_dek(&ow[0].dek, "grp", 99, 0);
    ck_assert_int_eq(kms_store_dek_insert(st, &ow[0].dek), P11KMS_OK);
    kms_store_stats_get(st, &s0);

    lock = lock_db();
    /* First write: the writer takes it alone and blocks in BEGIN. */
    ow[0].st = st;
    make_dek(&ow[0].dek, "grp", 1, 0);
    ck_assert_int_eq(pthread_create(&th[0], NULL, do_insert, &ow[0]), 0);
    usleep(100 * 1000);
    for (unsigned i = 1; i < N; i++) {
        ow[i].st = st;
        if (i == 5)
            make_dek(&ow[i].dek, "grp", 99, 0); /* duplicate id */
        else if (i == 8)
            make_dek(&ow[i].dek, "nokey", 1, i); /* unknown key */
        else
            make_dek(&ow[i].dek, "grp", 1, i);
        ck_assert_int_eq(pthread_create(&th[i], NULL, do_insert, &ow[i]), 0);
    }
    wait_queued(st, N - 1);
    ts_db_unlock_writes(&db, lock);
    for (unsigned i = 0; i < N; i++)
        pthread_join(th[i], NULL);

    kms_store_stats_get(st, &s1);
    ck_assert_uint_eq(s1.commits - s0.commits, 2); /* {0} then {1..N-1} */
    ck_assert_uint_eq(s1.writes - s0.writes, N);
    for (unsigned i = 0; i < N; i++) {
        if (i == 5) {
            ck_assert_int_eq(ow[i].result, P11KMS_ERR_INTERNAL);
        } else if (i == 8) {
            ck_assert_int_eq(ow[i].result, P11KMS_ERR_KEY_NOT_FOUND);
        } else {
            ck_assert_int_eq(ow[i].result, P11KMS_OK);
            ck_assert_int_eq(kms_store_dek_get(st, ow[i].dek.id, &got), P11KMS_OK);
            kms_dek_rec_free(got);
        }
    }
    /* The failed writes left no trace: wrap_count = 1 + (N - 2). */
    ck_assert_int_eq(kms_store_key_get(st, "grp", &k), P11KMS_OK);
    ck_assert_uint_eq(k->versions[0].wrap_count, N - 1);
    ck_assert_uint_eq(k->versions[0].dek_count, N - 1);
    kms_key_rec_free(k);
    kms_store_close(st);
}
END_TEST

/* A database locked longer than the busy timeout: the whole group is
 * STORE_UNAVAILABLE, reads still work, ping reports it until the writer
 * can write again, and nothing half-written remains. */
START_TEST(locked_database_fails_group_then_recovers)
{
    enum { N = 4 };
    kms_store *st = open_with_key("busy");
    pthread_t th[N];
    one_write ow[N];
    kms_key_rec *k = NULL;
    kms_dek_rec *got = NULL;
    kms_store_stats_ex s0, s1;
    void *lock;

    memset(&ow, 0, sizeof(ow));
    kms_store_stats_get(st, &s0);
    lock = lock_db();
    for (unsigned i = 0; i < N; i++) {
        ow[i].st = st;
        make_dek(&ow[i].dek, "busy", 2, i);
        ck_assert_int_eq(pthread_create(&th[i], NULL, do_insert, &ow[i]), 0);
    }
    /* Reads do not wait for the writer. */
    ck_assert_int_eq(kms_store_key_get(st, "busy", &k), P11KMS_OK);
    kms_key_rec_free(k);
    for (unsigned i = 0; i < N; i++) {
        pthread_join(th[i], NULL);
        ck_assert_int_eq(ow[i].result, P11KMS_ERR_STORE_UNAVAILABLE);
    }
    kms_store_stats_get(st, &s1);
    ck_assert_uint_ge(s1.failed_groups - s0.failed_groups, 1);
    ck_assert_uint_eq(s1.commits, s0.commits);
    ck_assert_int_eq(kms_store_dek_get(st, ow[0].dek.id, &got), P11KMS_ERR_DEK_NOT_FOUND);
    if (!db.pg) {
        /* SQLite: from now on writes are refused at once (not after another
         * busy timeout) and ping says unavailable, in bounded time, until a
         * probe write commits. */
        kms_dek_rec extra;
        struct timespec t0, t1;

        make_dek(&extra, "busy", 3, 0);
        clock_gettime(CLOCK_MONOTONIC, &t0);
        ck_assert_int_eq(kms_store_dek_insert(st, &extra), P11KMS_ERR_STORE_UNAVAILABLE);
        ck_assert_int_eq(kms_store_ping(st), P11KMS_ERR_STORE_UNAVAILABLE);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ck_assert_int_lt(t1.tv_sec - t0.tv_sec, 4); /* the busy timeout is 5 s */
        kms_store_stats_get(st, &s1);
        ck_assert_uint_eq(s1.failing, 1);
        ck_assert_uint_ge(s1.refused_writes, 1);
    }

    ts_db_unlock_writes(&db, lock);
    /* SQLite: healthy again once the writer's probe commits. */
    for (int i = 0; i < 100 && kms_store_ping(st) != P11KMS_OK; i++)
        usleep(100 * 1000);
    ck_assert_int_eq(kms_store_ping(st), P11KMS_OK);
    ck_assert_int_eq(kms_store_dek_insert(st, &ow[0].dek), P11KMS_OK);
    ck_assert_int_eq(kms_store_key_get(st, "busy", &k), P11KMS_OK);
    ck_assert_uint_eq(k->versions[0].wrap_count, 1);
    kms_key_rec_free(k);
    kms_store_close(st);
}
END_TEST

/* ---- durability ordering across SIGKILL --------------------------------- */

#define CHILD_THREADS 4
#define ID_LINE       (KMS_DEK_ID_LEN + 1)

typedef struct child_worker {
    kms_store *st;
    unsigned thread;
    unsigned round;
    int fd;
} child_worker;

static void *child_insert(void *arg)
{
    child_worker *w = arg;
    kms_dek_rec d;
    char line[ID_LINE];

    for (unsigned i = 0;; i++) {
        make_dek(&d, "dur", w->round * 100 + w->thread, i);
        if (kms_store_dek_insert(w->st, &d) != P11KMS_OK)
            _exit(3);
        memcpy(line, d.id, KMS_DEK_ID_LEN);
        line[KMS_DEK_ID_LEN] = '\n';
        /* Acknowledged: only now may the id be reported (one atomic
         * pipe write, below PIPE_BUF). */
        if (write(w->fd, line, ID_LINE) != ID_LINE)
            _exit(4);
    }
    return NULL;
}

static void run_child(unsigned round, int fd)
{
    kms_store *st = NULL;
    pthread_t th[CHILD_THREADS];
    child_worker w[CHILD_THREADS];

    if (ts_db_open(&db, &st) != P11KMS_OK)
        _exit(2);
    for (unsigned i = 0; i < CHILD_THREADS; i++) {
        w[i] = (child_worker){.st = st, .thread = i, .round = round, .fd = fd};
        if (pthread_create(&th[i], NULL, child_insert, &w[i]) != 0)
            _exit(5);
    }
    for (;;)
        pause();
}

static char *read_acks(int fd, unsigned kill_after_ms, pid_t pid, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    struct timespec t0, now;
    int killed = 0;

    ck_assert_ptr_nonnull(buf);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        ssize_t r;
        long elapsed;

        clock_gettime(CLOCK_MONOTONIC, &now);
        elapsed = (now.tv_sec - t0.tv_sec) * 1000 + (now.tv_nsec - t0.tv_nsec) / 1000000;
        if (!killed && elapsed >= (long)kill_after_ms) {
            kill(pid, SIGKILL);
            killed = 1;
        }
        if (poll(&p, 1, killed ? 1000 : 5) < 0 && errno != EINTR)
            break;
        if (!(p.revents & (POLLIN | POLLHUP)))
            continue;
        if (n == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            ck_assert_ptr_nonnull(buf);
        }
        r = read(fd, buf + n, cap - n);
        if (r == 0)
            break; /* EOF: the child is dead */
        if (r < 0 && errno == EINTR)
            continue;
        ck_assert_int_gt(r, 0);
        n += (size_t)r;
    }
    *len = n;
    return buf;
}

START_TEST(acknowledged_deks_survive_sigkill)
{
    kms_store *st = open_with_key("dur");
    unsigned seed = (unsigned)time(NULL) ^ (unsigned)getpid();
    size_t total = 0;

    kms_store_close(st);
    fprintf(stderr, "durability seed %u\n", seed);
    srand(seed);
    for (unsigned round = 0; round < 4; round++) {
        unsigned kill_after = 30 + (unsigned)(rand() % 400);
        int pfd[2], status = 0;
        size_t len = 0, lines;
        char *acks;
        pid_t pid;
        kms_dek_rec *got = NULL, want;

        ck_assert_int_eq(pipe(pfd), 0);
        pid = fork();
        ck_assert_int_ge(pid, 0);
        if (pid == 0) {
            close(pfd[0]);
            run_child(round, pfd[1]);
        }
        close(pfd[1]);
        acks = read_acks(pfd[0], kill_after, pid, &len);
        close(pfd[0]);
        ck_assert_int_eq(waitpid(pid, &status, 0), pid);
        ck_assert_msg(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL,
                      "child ended on its own (status %d)", status);

        lines = len / ID_LINE;
        fprintf(stderr, "round %u: killed after %u ms, %zu DEKs acknowledged\n", round, kill_after,
                lines);

        ck_assert(ts_db_integrity_ok(&db));

        ck_assert_int_eq(ts_db_open(&db, &st), P11KMS_OK);
        for (size_t i = 0; i < lines; i++) {
            char id[KMS_DEK_ID_LEN + 1];
            unsigned n, t;

            memcpy(id, acks + i * ID_LINE, KMS_DEK_ID_LEN);
            id[KMS_DEK_ID_LEN] = '\0';
            ck_assert_int_eq(acks[i * ID_LINE + KMS_DEK_ID_LEN], '\n');
            ck_assert_int_eq(sscanf(id, "%8x-%4x-", &n, &t), 2);
            ck_assert_msg(kms_store_dek_get(st, id, &got) == P11KMS_OK, "acknowledged DEK %s lost",
                          id);
            make_dek(&want, "dur", t, n);
            ck_assert_str_eq(want.id, id);
            ck_assert_mem_eq(got->wrapped, want.wrapped, want.wrapped_len);
            kms_dek_rec_free(got);
        }
        kms_store_close(st);
        total += lines;
        free(acks);
    }
    ck_assert_uint_gt(total, 0);
}
END_TEST

static Suite *gc_suite(void)
{
    Suite *s = suite_create("store_groupcommit");
    TCase *tc = tcase_create("groupcommit");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, sixteen_threads_share_commits);
    tcase_add_test(tc, failing_write_does_not_fail_its_group);
    tcase_add_test(tc, locked_database_fails_group_then_recovers);
    tcase_add_test(tc, acknowledged_deks_survive_sigkill);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(gc_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
