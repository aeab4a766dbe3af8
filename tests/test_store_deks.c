/*
 * tests/test_store_deks.c - the DEK lifecycle in the SQLite store:
 * revoke and destroy of one DEK (times, reasons, idempotent revoke, no
 * transition backwards), bulk revoke/destroy by key and context subset
 * (only matching DEKs touched, one transaction), cursor pagination over
 * 10 000 DEKs (no duplicates, no gaps, stable while DEKs are added, by
 * state), the query plan of a page, and the wipe of destroyed wrapped
 * bytes from the database file and the WAL (including a checkpoint that a
 * reader blocks, retried after the next commit).  Each test uses a real
 * database file in its own temp dir.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kms/store/store.h"
#include "kms/store/store_internal.h"
#include "support/testtoken.h"
#include "support/teststore.h"

#define NOW 1800000000

static char dir[256];
static char dbpath[512];
static ts_db tdb;
static kms_store *st;

static void token_id_for(unsigned char id[KMS_TOKEN_ID_LEN], unsigned seed)
{
    for (int i = 0; i < KMS_TOKEN_ID_LEN; i++)
        id[i] = (unsigned char)(seed * 31u + (unsigned)i * 7u + 1u);
}

static void setup(void)
{
    unsigned char tid[KMS_TOKEN_ID_LEN];

    ck_assert_int_eq(tt_tempdir(dir, sizeof(dir)), 0);
    ck_assert_int_eq(ts_db_new(dir, &tdb), 0);
    snprintf(dbpath, sizeof(dbpath), "%s", tdb.path);
    ck_assert_int_eq(ts_db_open(&tdb, &st), P11KMS_OK);
    token_id_for(tid, 1);
    ck_assert_int_eq(kms_store_key_create(st, "k", tid, NOW), P11KMS_OK);
    token_id_for(tid, 2);
    ck_assert_int_eq(kms_store_key_create(st, "other", tid, NOW), P11KMS_OK);
}

static void teardown(void)
{
    kms_store_close(st);
    st = NULL;
    ts_db_drop(&tdb);
    tt_rmtree(dir);
}

/* DEK number n: a lowercase UUID-shaped id and wrapped bytes that are
 * unique to n (a recognisable pattern for the file scans). */
static void dek_for(kms_dek_rec *d, const char *key, unsigned n, const char *context)
{
    uint32_t x;

    memset(d, 0, sizeof(*d));
    snprintf(d->id, sizeof(d->id), "%08x-0000-4000-8000-%012x", n * 2654435761u, n);
    snprintf(d->key, sizeof(d->key), "%s", key);
    d->version = 1;
    d->state = KMS_DEK_ACTIVE;
    d->context = (char *)context;
    d->wrapped_len = 60;
    x = n * 2654435761u + 0x9e3779b9u; /* xorshift32: no window shared between DEKs */
    for (size_t i = 0; i < d->wrapped_len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        d->wrapped[i] = (unsigned char)(x >> 24);
    }
    d->created = NOW + (int64_t)n;
}

static void insert(const char *key, unsigned n, const char *context, kms_dek_rec *out)
{
    kms_dek_rec d;

    dek_for(&d, key, n, context);
    ck_assert_int_eq(kms_store_dek_insert(st, &d), P11KMS_OK);
    if (out != NULL)
        *out = d;
}

static kms_dek_rec *get(const char *id)
{
    kms_dek_rec *d = NULL;

    ck_assert_int_eq(kms_store_dek_get(st, id, &d), P11KMS_OK);
    return d;
}

static kms_dek_state state_of(const char *id)
{
    kms_dek_rec *d = get(id);
    kms_dek_state s = d->state;

    kms_dek_rec_free(d);
    return s;
}

START_TEST(revoke_and_destroy_one)
{
    kms_dek_rec a, b;
    kms_dek_rec *d;

    insert("k", 1, "{\"customer\":\"42\"}", &a);
    insert("k", 2, "{}", &b);

    d = get(a.id);
    ck_assert_int_eq(d->state, KMS_DEK_ACTIVE);
    ck_assert_int_eq(d->revoked_at, 0);
    ck_assert_int_eq(d->revoke_reason, KMS_REVOKE_NONE);
    ck_assert_int_eq(d->destroyed_at, 0);
    ck_assert_uint_eq(d->wrapped_len, 60);
    kms_dek_rec_free(d);

    /* active -> revoked, with reason and time */
    ck_assert_int_eq(kms_store_dek_revoke(st, a.id, KMS_REVOKE_COMPROMISED, NOW + 10), P11KMS_OK);
    d = get(a.id);
    ck_assert_int_eq(d->state, KMS_DEK_REVOKED);
    ck_assert_int_eq(d->revoked_at, NOW + 10);
    ck_assert_int_eq(d->revoke_reason, KMS_REVOKE_COMPROMISED);
    ck_assert_int_eq(d->destroyed_at, 0);
    ck_assert_uint_eq(d->wrapped_len, 60); /* revoked keeps its wrapped copy */
    kms_dek_rec_free(d);

    /* revoking again changes nothing: first reason and time kept */
    ck_assert_int_eq(kms_store_dek_revoke(st, a.id, KMS_REVOKE_SUPERSEDED, NOW + 20), P11KMS_OK);
    d = get(a.id);
    ck_assert_int_eq(d->revoked_at, NOW + 10);
    ck_assert_int_eq(d->revoke_reason, KMS_REVOKE_COMPROMISED);
    kms_dek_rec_free(d);

    /* revoked -> destroyed: wrapped erased, revoke history kept */
    ck_assert_int_eq(kms_store_dek_destroy(st, a.id, NOW + 30), P11KMS_OK);
    d = get(a.id);
    ck_assert_int_eq(d->state, KMS_DEK_DESTROYED);
    ck_assert_uint_eq(d->wrapped_len, 0);
    ck_assert_int_eq(d->destroyed_at, NOW + 30);
    ck_assert_int_eq(d->revoked_at, NOW + 10);
    ck_assert_int_eq(d->revoke_reason, KMS_REVOKE_COMPROMISED);
    ck_assert_str_eq(d->context, "{\"customer\":\"42\"}");
    kms_dek_rec_free(d);

    /* nothing moves backwards */
    ck_assert_int_eq(kms_store_dek_revoke(st, a.id, KMS_REVOKE_UNSPECIFIED, NOW + 40),
                     P11KMS_ERR_DEK_DESTROYED);
    ck_assert_int_eq(kms_store_dek_destroy(st, a.id, NOW + 40), P11KMS_ERR_DEK_DESTROYED);
    d = get(a.id);
    ck_assert_int_eq(d->state, KMS_DEK_DESTROYED);
    ck_assert_int_eq(d->destroyed_at, NOW + 30);
    kms_dek_rec_free(d);

    /* active -> destroyed directly */
    ck_assert_int_eq(kms_store_dek_destroy(st, b.id, NOW + 50), P11KMS_OK);
    d = get(b.id);
    ck_assert_int_eq(d->state, KMS_DEK_DESTROYED);
    ck_assert_int_eq(d->revoked_at, 0);
    ck_assert_int_eq(d->revoke_reason, KMS_REVOKE_NONE);
    kms_dek_rec_free(d);

    /* errors */
    ck_assert_int_eq(
        kms_store_dek_revoke(st, "00000000-0000-4000-8000-000000000000", KMS_REVOKE_CESSATION, NOW),
        P11KMS_ERR_DEK_NOT_FOUND);
    ck_assert_int_eq(kms_store_dek_destroy(st, "00000000-0000-4000-8000-000000000000", NOW),
                     P11KMS_ERR_DEK_NOT_FOUND);
    ck_assert_int_eq(kms_store_dek_destroy(st, "short", NOW), P11KMS_ERR_DEK_NOT_FOUND);
    ck_assert_int_eq(kms_store_dek_revoke(st, b.id, KMS_REVOKE_NONE, NOW), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_store_dek_revoke(st, b.id, (kms_revoke_reason)99, NOW),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_store_dek_destroy(NULL, b.id, NOW), P11KMS_ERR_BAD_REQUEST);

    /* the live DEK count of the version drops with destroy only */
    {
        kms_key_rec *k = NULL;
        insert("k", 3, "{}", NULL);
        ck_assert_int_eq(kms_store_key_get(st, "k", &k), P11KMS_OK);
        ck_assert_uint_eq(k->versions[0].dek_count, 1);
        kms_key_rec_free(k);
    }
}
END_TEST

START_TEST(reason_and_state_names)
{
    ck_assert_str_eq(kms_revoke_reason_name(KMS_REVOKE_COMPROMISED), "compromised");
    ck_assert_str_eq(kms_revoke_reason_name(KMS_REVOKE_SUPERSEDED), "superseded");
    ck_assert_str_eq(kms_revoke_reason_name(KMS_REVOKE_CESSATION), "cessation");
    ck_assert_str_eq(kms_revoke_reason_name(KMS_REVOKE_UNSPECIFIED), "unspecified");
    ck_assert_ptr_null(kms_revoke_reason_name(KMS_REVOKE_NONE));
    ck_assert_int_eq(kms_revoke_reason_parse("cessation"), KMS_REVOKE_CESSATION);
    ck_assert_int_eq(kms_revoke_reason_parse("none"), -1);
    ck_assert_int_eq(kms_revoke_reason_parse("Compromised"), -1);
    ck_assert_int_eq(kms_revoke_reason_parse(NULL), -1);
    ck_assert_int_eq(kms_dek_state_parse("destroyed"), KMS_DEK_DESTROYED);
    ck_assert_int_eq(kms_dek_state_parse("gone"), -1);
}
END_TEST

START_TEST(bulk_by_context_subset)
{
    kms_dek_rec c42eu, c42us, c43eu, c420, quote, o42;
    uint64_t n = 99;

    insert("k", 1, "{\"customer\":\"42\",\"region\":\"eu\"}", &c42eu);
    insert("k", 2, "{\"customer\":\"42\",\"region\":\"us\"}", &c42us);
    insert("k", 3, "{\"customer\":\"43\",\"region\":\"eu\"}", &c43eu);
    insert("k", 4, "{\"customer\":\"420\"}", &c420);
    insert("k", 5, "{\"customer\":\"a\\\"b\"}", &quote);
    insert("other", 6, "{\"customer\":\"42\",\"region\":\"eu\"}", &o42);

    /* two pairs: only (42, eu) of key k */
    ck_assert_int_eq(kms_store_dek_revoke_bulk(st, "k", "{\"customer\":\"42\",\"region\":\"eu\"}",
                                               KMS_REVOKE_CESSATION, NOW + 1, &n),
                     P11KMS_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(state_of(c42eu.id), KMS_DEK_REVOKED);
    ck_assert_int_eq(state_of(c42us.id), KMS_DEK_ACTIVE);
    ck_assert_int_eq(state_of(o42.id), KMS_DEK_ACTIVE);

    /* bulk revoke touches active DEKs only: the revoked one keeps its reason */
    ck_assert_int_eq(kms_store_dek_revoke_bulk(st, "k", "{\"customer\":\"42\"}",
                                               KMS_REVOKE_SUPERSEDED, NOW + 2, &n),
                     P11KMS_OK);
    ck_assert_uint_eq(n, 1);
    {
        kms_dek_rec *d = get(c42eu.id);
        ck_assert_int_eq(d->revoke_reason, KMS_REVOKE_CESSATION);
        ck_assert_int_eq(d->revoked_at, NOW + 1);
        kms_dek_rec_free(d);
        d = get(c42us.id);
        ck_assert_int_eq(d->revoke_reason, KMS_REVOKE_SUPERSEDED);
        kms_dek_rec_free(d);
    }

    /* one pair: all of customer 42 (revoked ones included), not 420, not key other */
    ck_assert_int_eq(kms_store_dek_destroy_bulk(st, "k", "{\"customer\":\"42\"}", NOW + 3, &n),
                     P11KMS_OK);
    ck_assert_uint_eq(n, 2);
    ck_assert_int_eq(state_of(c42eu.id), KMS_DEK_DESTROYED);
    ck_assert_int_eq(state_of(c42us.id), KMS_DEK_DESTROYED);
    ck_assert_int_eq(state_of(c43eu.id), KMS_DEK_ACTIVE);
    ck_assert_int_eq(state_of(c420.id), KMS_DEK_ACTIVE);
    ck_assert_int_eq(state_of(o42.id), KMS_DEK_ACTIVE);
    /* again: nothing left to destroy */
    ck_assert_int_eq(kms_store_dek_destroy_bulk(st, "k", "{\"customer\":\"42\"}", NOW + 4, &n),
                     P11KMS_OK);
    ck_assert_uint_eq(n, 0);

    /* escaped values compare unescaped; a pair absent from a context never matches */
    ck_assert_int_eq(kms_store_dek_destroy_bulk(st, "k", "{\"customer\":\"a\\\"b\"}", NOW, &n),
                     P11KMS_OK);
    ck_assert_uint_eq(n, 1);
    ck_assert_int_eq(state_of(quote.id), KMS_DEK_DESTROYED);
    ck_assert_int_eq(
        kms_store_dek_revoke_bulk(st, "k", "{\"tenant\":\"43\"}", KMS_REVOKE_UNSPECIFIED, NOW, &n),
        P11KMS_OK);
    ck_assert_uint_eq(n, 0);
    /* a filter with more pairs than the context does not match */
    ck_assert_int_eq(kms_store_dek_revoke_bulk(st, "k", "{\"customer\":\"420\",\"region\":\"eu\"}",
                                               KMS_REVOKE_UNSPECIFIED, NOW, &n),
                     P11KMS_OK);
    ck_assert_uint_eq(n, 0);

    /* refused filters and keys */
    n = 7;
    ck_assert_int_eq(kms_store_dek_destroy_bulk(st, "k", "{}", NOW, &n), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_store_dek_destroy_bulk(st, "k", "[]", NOW, &n), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_store_dek_destroy_bulk(st, "k", "{\"a\":1}", NOW, &n),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_store_dek_destroy_bulk(st, "k", "{\"a\":", NOW, &n),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_store_dek_destroy_bulk(st, "k", NULL, NOW, &n), P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_store_dek_revoke_bulk(st, "k", "{\"a\":\"b\"}", KMS_REVOKE_NONE, NOW, &n),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_store_dek_destroy_bulk(st, "nope", "{\"a\":\"b\"}", NOW, &n),
                     P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(
        kms_store_dek_revoke_bulk(st, "nope", "{\"a\":\"b\"}", KMS_REVOKE_CESSATION, NOW, &n),
        P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_uint_eq(n, 7); /* untouched on error */
    ck_assert_int_eq(state_of(c43eu.id), KMS_DEK_ACTIVE);
}
END_TEST

/* ---- pagination --------------------------------------------------------- */

#define PAGE_DEKS    10000
#define PAGE_THREADS 16

typedef struct filler {
    unsigned first, count;
    int failures;
} filler;

static void *fill(void *arg)
{
    filler *f = arg;
    char ctx[64];
    kms_dek_rec d;

    for (unsigned n = f->first; n < f->first + f->count; n++) {
        snprintf(ctx, sizeof(ctx), "{\"mod\":\"%u\"}", n % 3);
        dek_for(&d, "k", n, ctx);
        if (kms_store_dek_insert(st, &d) != P11KMS_OK)
            f->failures++;
    }
    return NULL;
}

/* Insert DEKs [first, first + count) from PAGE_THREADS threads (their
 * inserts share group commits, so 10 000 rows take a few hundred fsyncs). */
static void fill_parallel(unsigned first, unsigned count)
{
    pthread_t t[PAGE_THREADS];
    filler f[PAGE_THREADS];
    unsigned per = count / PAGE_THREADS;

    for (int i = 0; i < PAGE_THREADS; i++) {
        f[i].first = first + (unsigned)i * per;
        f[i].count = i == PAGE_THREADS - 1 ? count - per * (PAGE_THREADS - 1) : per;
        f[i].failures = 0;
        ck_assert_int_eq(pthread_create(&t[i], NULL, fill, &f[i]), 0);
    }
    for (int i = 0; i < PAGE_THREADS; i++) {
        pthread_join(t[i], NULL);
        ck_assert_int_eq(f[i].failures, 0);
    }
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Walk every page; returns the ids seen (strdup'ed, in order). */
static char **walk(int state, size_t limit, size_t *total, size_t *pages, unsigned add_between)
{
    char **ids = NULL, cursor[KMS_DEK_ID_LEN + 1] = "";
    size_t n = 0, cap = 0;
    int more = 1;
    unsigned added = 0;

    *pages = 0;
    while (more) {
        kms_dek_rec **deks = NULL;
        size_t count = 0;

        ck_assert_int_eq(kms_store_dek_list(st, "k", state, cursor, limit, &deks, &count, &more),
                         P11KMS_OK);
        ck_assert_uint_le(count, limit);
        if (more)
            ck_assert_uint_eq(count, limit);
        for (size_t i = 0; i < count; i++) {
            if (n == cap) {
                cap = cap ? cap * 2 : 1024;
                ids = realloc(ids, cap * sizeof(*ids));
                ck_assert_ptr_nonnull(ids);
            }
            ck_assert_uint_eq(deks[i]->wrapped_len, 0); /* listings never carry wrapped bytes */
            ck_assert_str_eq(deks[i]->key, "k");
            if (state >= 0)
                ck_assert_int_eq(deks[i]->state, state);
            /* strictly ascending: no duplicate, stable order */
            if (n > 0)
                ck_assert_int_lt(strcmp(ids[n - 1], deks[i]->id), 0);
            ids[n++] = strdup(deks[i]->id);
        }
        if (count > 0)
            snprintf(cursor, sizeof(cursor), "%s", deks[count - 1]->id);
        kms_dek_list_free(deks, count);
        (*pages)++;
        /* DEKs issued during the walk must not disturb it */
        if (add_between > 0 && more) {
            insert("k", 900000 + added, "{\"mod\":\"new\"}", NULL);
            added++;
            add_between--;
        }
    }
    *total = n;
    return ids;
}

static void free_ids(char **ids, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(ids[i]);
    free(ids);
}

START_TEST(pagination_over_10000)
{
    char **want, **got;
    size_t total = 0, pages = 0, n_revoked = 0, n_active = 0;
    uint64_t revoked = 0;
    kms_dek_rec d;

    fill_parallel(0, PAGE_DEKS);
    insert("other", 999999, "{}", NULL); /* another key's DEK never shows up */

    want = calloc(PAGE_DEKS, sizeof(*want));
    ck_assert_ptr_nonnull(want);
    for (unsigned n = 0; n < PAGE_DEKS; n++) {
        dek_for(&d, "k", n, "{}");
        want[n] = strdup(d.id);
    }
    qsort(want, PAGE_DEKS, sizeof(*want), cmp_str);

    /* the maximum page size: 10 pages, exactly the inserted set */
    got = walk(-1, KMS_DEK_LIST_MAX, &total, &pages, 0);
    ck_assert_uint_eq(total, PAGE_DEKS);
    ck_assert_uint_eq(pages, PAGE_DEKS / KMS_DEK_LIST_MAX);
    for (size_t i = 0; i < total; i++)
        ck_assert_str_eq(got[i], want[i]);
    free_ids(got, total);

    /* an odd page size while DEKs are being added: every original DEK
     * exactly once (new ones may or may not appear, never twice) */
    got = walk(-1, 997, &total, &pages, 5);
    ck_assert_uint_ge(total, PAGE_DEKS);
    ck_assert_uint_le(total, PAGE_DEKS + 5);
    {
        size_t j = 0;
        for (size_t i = 0; i < total && j < PAGE_DEKS; i++)
            if (strcmp(got[i], want[j]) == 0)
                j++;
        ck_assert_uint_eq(j, PAGE_DEKS); /* no gap */
    }
    free_ids(got, total);

    /* by state */
    ck_assert_int_eq(
        kms_store_dek_revoke_bulk(st, "k", "{\"mod\":\"1\"}", KMS_REVOKE_CESSATION, NOW, &revoked),
        P11KMS_OK);
    ck_assert_uint_eq(revoked, PAGE_DEKS / 3);
    got = walk(KMS_DEK_REVOKED, 250, &n_revoked, &pages, 0);
    ck_assert_uint_eq(n_revoked, revoked);
    free_ids(got, n_revoked);
    got = walk(KMS_DEK_ACTIVE, 1000, &n_active, &pages, 0);
    ck_assert_uint_eq(n_active, PAGE_DEKS + 5 - revoked);
    free_ids(got, n_active);
    got = walk(KMS_DEK_DESTROYED, 100, &total, &pages, 0);
    ck_assert_uint_eq(total, 0);
    ck_assert_uint_eq(pages, 1);
    free_ids(got, total);

    free_ids(want, PAGE_DEKS);
}
END_TEST

START_TEST(list_edges)
{
    kms_dek_rec **deks = NULL, a;
    size_t count = 9;
    int more = 9;

    /* a key without DEKs */
    ck_assert_int_eq(kms_store_dek_list(st, "other", -1, NULL, 10, &deks, &count, &more),
                     P11KMS_OK);
    ck_assert_uint_eq(count, 0);
    ck_assert_int_eq(more, 0);
    kms_dek_list_free(deks, count);

    /* exactly `limit` DEKs: no further page */
    insert("other", 1, "{\"x\":\"y\"}", &a);
    insert("other", 2, "{}", NULL);
    ck_assert_int_eq(kms_store_dek_list(st, "other", -1, "", 2, &deks, &count, &more), P11KMS_OK);
    ck_assert_uint_eq(count, 2);
    ck_assert_int_eq(more, 0);
    kms_dek_list_free(deks, count);
    ck_assert_int_eq(kms_store_dek_list(st, "other", -1, "", 1, &deks, &count, &more), P11KMS_OK);
    ck_assert_uint_eq(count, 1);
    ck_assert_int_eq(more, 1);
    kms_dek_list_free(deks, count);

    /* the fields of a listed record */
    ck_assert_int_eq(kms_store_dek_revoke(st, a.id, KMS_REVOKE_SUPERSEDED, NOW + 5), P11KMS_OK);
    ck_assert_int_eq(
        kms_store_dek_list(st, "other", KMS_DEK_REVOKED, NULL, 10, &deks, &count, &more),
        P11KMS_OK);
    ck_assert_uint_eq(count, 1);
    ck_assert_str_eq(deks[0]->id, a.id);
    ck_assert_str_eq(deks[0]->context, "{\"x\":\"y\"}");
    ck_assert_int_eq(deks[0]->revoked_at, NOW + 5);
    ck_assert_int_eq(deks[0]->revoke_reason, KMS_REVOKE_SUPERSEDED);
    ck_assert_int_eq(deks[0]->created, a.created);
    kms_dek_list_free(deks, count);

    /* errors */
    ck_assert_int_eq(kms_store_dek_list(st, "nope", -1, NULL, 10, &deks, &count, &more),
                     P11KMS_ERR_KEY_NOT_FOUND);
    ck_assert_int_eq(kms_store_dek_list(st, "k", -1, NULL, 0, &deks, &count, &more),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(
        kms_store_dek_list(st, "k", -1, NULL, KMS_DEK_LIST_MAX + 1, &deks, &count, &more),
        P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_store_dek_list(st, "k", 3, NULL, 10, &deks, &count, &more),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_int_eq(kms_store_dek_list(st, "k", -1, "0123456789012345678901234567890123456789", 10,
                                        &deks, &count, &more),
                     P11KMS_ERR_BAD_REQUEST);
}
END_TEST

/* A page is read through an index in id order: no sort of the whole key. */
START_TEST(list_query_plan)
{
    static const char *const sql[] = {
        "EXPLAIN QUERY PLAN SELECT d.id FROM deks d JOIN keys k ON k.id = d.key_id "
        "WHERE d.key_id = 1 AND d.id > '' ORDER BY d.id LIMIT 101",
        "EXPLAIN QUERY PLAN SELECT d.id FROM deks d JOIN keys k ON k.id = d.key_id "
        "WHERE d.key_id = 1 AND d.state = 'active' AND d.id > '' ORDER BY d.id LIMIT 101",
    };
    sqlite3 *db = NULL;

    ck_assert_int_eq(sqlite3_open_v2(dbpath, &db, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    for (size_t i = 0; i < 2; i++) {
        sqlite3_stmt *q = NULL;
        char plan[1024] = "";
        ck_assert_int_eq(sqlite3_prepare_v2(db, sql[i], -1, &q, NULL), SQLITE_OK);
        while (sqlite3_step(q) == SQLITE_ROW) {
            size_t used = strlen(plan);
            snprintf(plan + used, sizeof(plan) - used, "%s; ", sqlite3_column_text(q, 3));
        }
        sqlite3_finalize(q);
        ck_assert_msg(strstr(plan, i == 0 ? "deks_by_key" : "deks_by_state") != NULL, "plan: %s",
                      plan);
        ck_assert_msg(strstr(plan, "TEMP B-TREE") == NULL, "plan sorts: %s", plan);
    }
    sqlite3_close(db);
}
END_TEST

/* ---- the wipe of destroyed wrapped bytes -------------------------------- */

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *buf = NULL;
    long n;

    *len = 0;
    if (f == NULL)
        return NULL; /* a missing -wal holds nothing */
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    n = ftell(f);
    ck_assert_int_ge(n, 0);
    rewind(f);
    buf = malloc((size_t)n + 1);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(fread(buf, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* 1 if any 16-byte window of wrapped occurs in the database or its WAL. */
static int trace_in_files(const unsigned char *wrapped, size_t wlen)
{
    static const char *const suffix[] = {"", "-wal"};
    int found = 0;

    for (size_t s = 0; s < 2; s++) {
        char path[600];
        size_t len = 0;
        unsigned char *buf;

        snprintf(path, sizeof(path), "%s%s", dbpath, suffix[s]);
        buf = slurp(path, &len);
        for (size_t off = 0; buf != NULL && off + 16 <= wlen && !found; off++)
            found = memmem(buf, len, wrapped + off, 16) != NULL;
        free(buf);
    }
    return found;
}

START_TEST(destroy_wipes_files)
{
    kms_dek_rec a, b, c, keep;
    kms_store_stats_ex stats;
    uint64_t n = 0;

    insert("k", 11, "{\"customer\":\"7\"}", &a);
    insert("k", 12, "{\"customer\":\"8\"}", &b);
    insert("k", 13, "{\"customer\":\"8\"}", &c);
    insert("k", 14, "{\"customer\":\"9\"}", &keep);
    ck_assert(trace_in_files(a.wrapped, a.wrapped_len)); /* the scan finds live bytes */
    ck_assert(trace_in_files(b.wrapped, b.wrapped_len));

    ck_assert_int_eq(kms_store_dek_destroy(st, a.id, NOW), P11KMS_OK);
    ck_assert(!trace_in_files(a.wrapped, a.wrapped_len));
    kms_store_stats_get(st, &stats);
    ck_assert_uint_eq(stats.wal_truncations, 1);

    ck_assert_int_eq(kms_store_dek_destroy_bulk(st, "k", "{\"customer\":\"8\"}", NOW, &n),
                     P11KMS_OK);
    ck_assert_uint_eq(n, 2);
    ck_assert(!trace_in_files(b.wrapped, b.wrapped_len));
    ck_assert(!trace_in_files(c.wrapped, c.wrapped_len));
    ck_assert(trace_in_files(keep.wrapped, keep.wrapped_len)); /* others untouched */

    /* revoke keeps the wrapped copy (no wipe, no checkpoint) */
    ck_assert_int_eq(kms_store_dek_revoke(st, keep.id, KMS_REVOKE_COMPROMISED, NOW), P11KMS_OK);
    ck_assert(trace_in_files(keep.wrapped, keep.wrapped_len));
    kms_store_stats_get(st, &stats);
    ck_assert_uint_eq(stats.wal_truncations, 2);
    ck_assert_uint_eq(stats.wal_truncate_busy, 0);
}
END_TEST

START_TEST(blocked_checkpoint_is_retried)
{
    kms_dek_rec a;
    kms_store_stats_ex stats;
    sqlite3 *reader = NULL;
    sqlite3_stmt *q = NULL;

    insert("k", 21, "{}", &a);
    /* A reader holding a snapshot from before the destroy blocks the
     * truncating checkpoint. */
    ck_assert_int_eq(sqlite3_open_v2(dbpath, &reader, SQLITE_OPEN_READONLY, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_exec(reader, "BEGIN", NULL, NULL, NULL), SQLITE_OK);
    ck_assert_int_eq(sqlite3_prepare_v2(reader, "SELECT count(*) FROM deks", -1, &q, NULL),
                     SQLITE_OK);
    ck_assert_int_eq(sqlite3_step(q), SQLITE_ROW);

    ck_assert_int_eq(kms_store_dek_destroy(st, a.id, NOW), P11KMS_OK); /* still succeeds */
    kms_store_stats_get(st, &stats);
    ck_assert_uint_eq(stats.wal_truncations, 0);
    ck_assert_uint_ge(stats.wal_truncate_busy, 1);
    ck_assert_int_eq(state_of(a.id), KMS_DEK_DESTROYED);

    /* while the reader stays, later commits retry once without waiting */
    {
        struct timespec t0, t1;
        uint64_t busy = stats.wal_truncate_busy;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        insert("k", 23, "{}", NULL);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        kms_store_stats_get(st, &stats);
        ck_assert_uint_eq(stats.wal_truncate_busy, busy + 1);
        ck_assert_uint_eq(stats.wal_truncations, 0);
        ck_assert_msg((t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000 < 400,
                      "a retry of a blocked truncation waited");
    }

    sqlite3_finalize(q);
    sqlite3_exec(reader, "COMMIT", NULL, NULL, NULL);
    sqlite3_close(reader);

    /* the next commit, of any write, retries the wipe */
    insert("k", 22, "{}", NULL);
    kms_store_stats_get(st, &stats);
    ck_assert_uint_eq(stats.wal_truncations, 1);
    ck_assert(!trace_in_files(a.wrapped, a.wrapped_len));
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("store_deks");
    TCase *tc = tcase_create("deks");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, revoke_and_destroy_one);
    tcase_add_test(tc, reason_and_state_names);
    tcase_add_test(tc, bulk_by_context_subset);
    tcase_add_test(tc, pagination_over_10000);
    tcase_add_test(tc, list_edges);
    if (!ts_backend_is_pg()) {
        /* SQLite's query plan and its database and WAL files: not the
         * PostgreSQL store's (P11KMS_TEST_STORE=postgres skips them). */
        tcase_add_test(tc, list_query_plan);
        tcase_add_test(tc, destroy_wipes_files);
        tcase_add_test(tc, blocked_checkpoint_is_retried);
    }
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
