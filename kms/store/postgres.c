/*
 * kms/store/postgres.c - the PostgreSQL backend of the store (store.h),
 * for several kmsd nodes sharing one database.
 *
 * Owns the connections to one database named by a libpq connection string
 * (URI or key=value):
 *  - the writer connection, used only by the group-commit writer thread
 *    (groupcommit.c) through the pg_gc_* callbacks: BEGIN, one SAVEPOINT
 *    per write, COMMIT (one commit, one WAL flush, for the whole group);
 *  - PG_READERS read connections in a pool (free list under pool_mu,
 *    pool_cv signalled when one comes back), each used by one thread at a
 *    time, running single statements (one snapshot per read).
 * Every connection runs the same session setup (synchronous_commit = on,
 * so a COMMIT returns only once its WAL is flushed -- and replicated, when
 * the operator configured synchronous standbys; UTF8 client encoding; hex
 * bytea output; UTC) and prepares its statements once (PQprepare) after
 * each (re)connection.  Schema migrations run once at open, on their own
 * connection, under an advisory lock (pg_migrations.c).
 *
 * Several nodes: nothing is cached here; every read goes to the database,
 * so a change committed by any node is seen by the next read of every
 * node.  Writers of different nodes are serialised by row locks taken in
 * the writer's READ COMMITTED transaction where SQLite relies on its one
 * writer: the key row (SELECT ... FOR NO KEY UPDATE) before a rotation
 * compare-and-set, a state or config change, a rewrap batch or a retire;
 * the target version row before a rewrap or retire re-checks it.  UPDATEs
 * that carry their own precondition (the wrap cap, "still active", "still
 * on the version it was read on") are re-evaluated by PostgreSQL on the
 * newest row version after a concurrent commit, so two nodes never both
 * win.  Two nodes' groups can still lock rows in opposite orders: a
 * deadlock (or serialization failure) aborts the transaction of one; that
 * writer rolls the whole transaction back and replays the writes of its
 * group so far (their results recomputed), up to PG_REPLAY_MAX times.
 *
 * The audit log (issue 5): the shared writer (groupcommit.c) appends each
 * group's entries after its writes; here they are appended under a
 * transaction-scoped advisory lock (pg_advisory_xact_lock(1882286957, 2))
 * taken by every node's writer, so the nodes sharing a database extend
 * one hash chain, in commit order, and the audit MAC key is created by
 * one node only.  The entries of a group are written by the seal in
 * multi-row INSERTs (one round trip per group, not per entry).
 *
 * Reconnection: a connection found broken (PQstatus not OK after a
 * failure) is reset (PQreset, session setup, statements prepared again) on
 * its next use; a read that failed because its connection broke is retried
 * once on the reset connection.  While the server is unreachable every
 * call returns P11KMS_ERR_STORE_UNAVAILABLE (503 store_unavailable), never
 * an answer from anywhere but the database.  A group whose COMMIT outcome
 * is unknown (the connection broke during it) is reported unavailable.
 *
 * Context matching: deks.context holds the canonical JSON text, returned
 * byte for byte; bulk revoke/destroy match with jsonb containment on a
 * cast of it (context::jsonb @> $filter::jsonb), the semantics of the
 * SQLite JSON1 query ("holds every pair of the filter").
 *
 * Destroy sets wrapped = NULL in a committed transaction.  Unlike SQLite
 * (secure_delete, truncated WAL) PostgreSQL keeps the old row version until
 * VACUUM and its WAL until recycled: see docs/operations.md.
 *
 * Locking: pool_mu guards the reader free list; writer_failed is atomic;
 * the writer connection and the replay list are the writer thread's own.
 */
#include "kms/store/pg_internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "module/log.h"

#define PG_READERS    8
#define PG_REPLAY_MAX 10 /* deadlock replays of one group */
#define PG_MAX_PARAMS 8
#define PG_LOCK_TIMEOUT "'5s'" /* the writer's wait for a row lock */

/* ---- statements --------------------------------------------------------- */

enum {
    W_KEY_INSERT,
    W_VERSION_INSERT,
    W_DEK_INSERT_COUNTED,
    W_KEY_ID,
    W_DEK_STATE,
    W_DEK_REVOKE,
    W_DEK_DESTROY,
    W_BULK_REVOKE,
    W_BULK_DESTROY,
    W_KEY_LATEST,
    W_VERSION_ADD,
    W_KEY_SET_LATEST,
    W_KEY_SET_STATE,
    W_KEY_SET_MIN,
    W_KEY_SET_PERIOD,
    W_VERSION_STATE,
    W_VERSION_EXISTS,
    W_VERSION_BUMP,
    W_VERSION_LIVE,
    W_VERSION_DESTROY,
    W_DEK_REWRAP,
    W_AUDIT_LOCK,
    W_AUDIT_HEAD_GET,
    W_AUDIT_LAST,
    W_AUDIT_HEAD_SET,
    W_AUDIT_KEY_GET,
    W_AUDIT_KEY_PUT,
    W_INTENT_ADD,
    W_INTENT_DEL,
    W_COUNT
};

static const char *const writer_sql[W_COUNT] = {
    [W_KEY_INSERT] = "INSERT INTO keys (name, state, latest_version, min_decrypt_version, "
                     "rotation_period, created) VALUES ($1::text, 'enabled', 1, 1, 0, $2::bigint) "
                     "RETURNING id",
    [W_VERSION_INSERT] = "INSERT INTO key_versions (key_id, version, state, token_id, created, "
                         "wrap_count) VALUES ($1::bigint, 1, 'active', $2::bytea, $3::bigint, 0)",
    /* Count a wrap only on an active version below its cap ($7) and
     * insert the DEK row only when it was counted: one statement, one
     * round trip.  After a concurrent commit (another node) PostgreSQL
     * re-checks the UPDATE's WHERE on the newest row, so the cap is exact. */
    [W_DEK_INSERT_COUNTED] =
        "WITH v AS (UPDATE key_versions SET wrap_count = wrap_count + 1 "
        "WHERE key_id = (SELECT id FROM keys WHERE name = $2::text) AND version = $3::integer "
        "AND state = 'active' AND wrap_count < $7::bigint RETURNING key_id, version) "
        "INSERT INTO deks (id, key_id, version, state, context, wrapped, created) "
        "SELECT $1::text, v.key_id, v.version, 'active', $4::text, $5::bytea, $6::bigint FROM v",
    [W_KEY_ID] = "SELECT id FROM keys WHERE name = $1::text",
    [W_DEK_STATE] = "SELECT state FROM deks WHERE id = $1::text",
    [W_DEK_REVOKE] = "UPDATE deks SET state = 'revoked', revoked_at = $2::bigint, "
                     "revoke_reason = $3::text WHERE id = $1::text AND state = 'active'",
    [W_DEK_DESTROY] = "UPDATE deks SET state = 'destroyed', wrapped = NULL, "
                      "destroyed_at = $2::bigint "
                      "WHERE id = $1::text AND state IN ('active', 'revoked')",
    [W_BULK_REVOKE] = "UPDATE deks SET state = 'revoked', revoked_at = $3::bigint, "
                      "revoke_reason = $4::text WHERE key_id = $1::bigint AND state = 'active' "
                      "AND context::jsonb @> $2::jsonb",
    [W_BULK_DESTROY] = "UPDATE deks SET state = 'destroyed', wrapped = NULL, "
                       "destroyed_at = $3::bigint WHERE key_id = $1::bigint "
                       "AND state IN ('active', 'revoked') AND context::jsonb @> $2::jsonb",
    /* Key rotation (issue 3): the key row is locked for the transaction,
     * so compare-and-set and re-checks are exact across nodes. */
    [W_KEY_LATEST] = "SELECT id, latest_version FROM keys WHERE name = $1::text "
                     "FOR NO KEY UPDATE",
    [W_VERSION_ADD] = "INSERT INTO key_versions (key_id, version, state, token_id, created, "
                      "wrap_count) VALUES ($1::bigint, $2::integer, 'active', $3::bytea, "
                      "$4::bigint, 0)",
    [W_KEY_SET_LATEST] = "UPDATE keys SET latest_version = $2::integer "
                         "WHERE id = $1::bigint AND latest_version = $3::integer",
    [W_KEY_SET_STATE] = "UPDATE keys SET state = $2::text WHERE name = $1::text",
    [W_KEY_SET_MIN] = "UPDATE keys SET min_decrypt_version = $2::integer WHERE id = $1::bigint",
    [W_KEY_SET_PERIOD] = "UPDATE keys SET rotation_period = $2::bigint WHERE id = $1::bigint",
    [W_VERSION_STATE] = "SELECT (state = 'active')::integer FROM key_versions "
                        "WHERE key_id = $1::bigint AND version = $2::integer FOR NO KEY UPDATE",
    [W_VERSION_EXISTS] = "SELECT 1 FROM key_versions WHERE key_id = "
                         "(SELECT id FROM keys WHERE name = $1::text) AND version = $2::integer",
    [W_VERSION_BUMP] = "UPDATE key_versions SET wrap_count = wrap_count + $3::bigint "
                       "WHERE key_id = $1::bigint AND version = $2::integer AND state = 'active'",
    [W_VERSION_LIVE] = "SELECT EXISTS (SELECT 1 FROM deks WHERE key_id = $1::bigint "
                       "AND version = $2::integer AND state IN ('active', 'revoked'))::integer",
    [W_VERSION_DESTROY] = "UPDATE key_versions SET state = 'destroyed', "
                          "destroyed_at = $3::bigint WHERE key_id = $1::bigint "
                          "AND version = $2::integer AND state = 'active'",
    /* A rewrapped DEK moves only if unchanged since it was read. */
    [W_DEK_REWRAP] = "UPDATE deks SET version = $2::integer, wrapped = $3::bytea "
                     "WHERE id = $1::text AND key_id = $5::bigint AND version = $4::integer "
                     "AND wrapped IS NOT NULL",
    /* The audit log (issue 5): one chain for every node sharing the
     * database, so the writer appends under a transaction-scoped advisory
     * lock (held until its COMMIT) that every node's writer takes. */
    [W_AUDIT_LOCK] = "SELECT pg_advisory_xact_lock(1882286957, 2)",
    [W_AUDIT_HEAD_GET] = "SELECT seq, hash FROM audit_head WHERE id = 1",
    [W_AUDIT_LAST] = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
    [W_AUDIT_HEAD_SET] = "INSERT INTO audit_head (id, seq, hash) VALUES (1, $1::bigint, $2::bytea) "
                         "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    [W_AUDIT_KEY_GET] = "SELECT token_id FROM audit_key WHERE id = 1",
    [W_AUDIT_KEY_PUT] = "INSERT INTO audit_key (id, token_id, created) "
                        "VALUES (1, $1::bytea, $2::bigint)",
    /* KEK creation intents. */
    [W_INTENT_ADD] = "INSERT INTO kek_intents (token_id, key_name, version, created) "
                     "VALUES ($1::bytea, $2::text, $3::bigint, $4::bigint) "
                     "ON CONFLICT (token_id) DO UPDATE SET key_name = excluded.key_name, "
                     "version = excluded.version, created = excluded.created",
    [W_INTENT_DEL] = "DELETE FROM kek_intents WHERE token_id = $1::bytea",
};

#define PG_KEY_COLUMNS                                                                             \
    "SELECT k.name, k.state, k.latest_version, k.min_decrypt_version, k.rotation_period, "         \
    "k.created, v.version, v.state, v.token_id, v.created, v.wrap_count, "                         \
    "(SELECT count(*) FROM deks d WHERE d.key_id = v.key_id AND d.version = v.version "            \
    "AND d.state IN ('active', 'revoked')) "                                                       \
    "FROM keys k JOIN key_versions v ON v.key_id = k.id "

#define PG_KEY_META_COLUMNS                                                                        \
    "SELECT k.name, k.state, k.latest_version, k.min_decrypt_version, k.rotation_period, "         \
    "k.created, v.version, v.state, v.token_id, v.created, v.wrap_count, 0 "                       \
    "FROM keys k JOIN key_versions v ON v.key_id = k.id "

enum {
    R_PING,
    R_KEY_GET,
    R_KEY_META,
    R_KEY_LIST,
    R_DEK_GET,
    R_TOKEN_IDS,
    R_KEY_ID,
    R_DEK_LIST,
    R_DEK_LIST_STATE,
    R_TOKEN_IDS_DESTROYED,
    R_REWRAP_READ,
    R_REWRAP_REMAINING,
    R_ROTATION_DUE,
    R_AUDIT_LIST,
    R_AUDIT_HEAD,
    R_COUNTS,
    R_INTENTS,
    R_COUNT
};

#define PG_DEK_COLUMNS                                                                             \
    "SELECT d.id, k.name, d.version, d.state, d.context, d.created, d.revoked_at, "                \
    "d.revoke_reason, d.destroyed_at, "
#define PG_DEK_COL_WRAPPED 9

static const char *const reader_sql[R_COUNT] = {
    [R_PING] = "SELECT coalesce(max(version), 0) FROM schema_version",
    [R_KEY_GET] = PG_KEY_COLUMNS "WHERE k.name = $1::text ORDER BY v.version",
    [R_KEY_META] = PG_KEY_META_COLUMNS "WHERE k.name = $1::text ORDER BY v.version",
    [R_KEY_LIST] = PG_KEY_COLUMNS "ORDER BY k.name, v.version",
    [R_DEK_GET] = PG_DEK_COLUMNS "d.wrapped FROM deks d JOIN keys k ON k.id = d.key_id "
                                 "WHERE d.id = $1::text",
    [R_TOKEN_IDS] = "SELECT token_id FROM key_versions ORDER BY key_id, version",
    [R_KEY_ID] = "SELECT id FROM keys WHERE name = $1::text",
    /* Cursor pagination exactly as SQLite's: ids are COLLATE "C" (byte
     * order), one row more than asked tells whether a next page follows. */
    [R_DEK_LIST] = PG_DEK_COLUMNS "NULL::bytea FROM deks d JOIN keys k ON k.id = d.key_id "
                                  "WHERE d.key_id = $1::bigint AND d.id > $2::text "
                                  "ORDER BY d.id LIMIT $3::bigint",
    [R_DEK_LIST_STATE] = PG_DEK_COLUMNS "NULL::bytea FROM deks d JOIN keys k ON k.id = d.key_id "
                                        "WHERE d.key_id = $1::bigint AND d.state = $4::text "
                                        "AND d.id > $2::text ORDER BY d.id LIMIT $3::bigint",
    [R_TOKEN_IDS_DESTROYED] = "SELECT token_id FROM key_versions WHERE state = 'destroyed' "
                              "ORDER BY key_id, version",
    [R_REWRAP_READ] = PG_DEK_COLUMNS "d.wrapped FROM deks d JOIN keys k ON k.id = d.key_id "
                                     "WHERE d.key_id = $1::bigint AND d.id > $2::text "
                                     "AND d.version < $3::integer "
                                     "AND d.state IN ('active', 'revoked') "
                                     "ORDER BY d.id LIMIT $4::bigint",
    [R_REWRAP_REMAINING] = "SELECT count(*) FROM deks WHERE key_id = $1::bigint "
                           "AND version < $2::integer AND state IN ('active', 'revoked')",
    [R_ROTATION_DUE] = "SELECT k.name, k.latest_version FROM keys k JOIN key_versions v "
                       "ON v.key_id = k.id AND v.version = k.latest_version "
                       "WHERE k.state = 'enabled' AND k.rotation_period > 0 "
                       "AND v.created + k.rotation_period <= $1::bigint ORDER BY k.name",
    [R_AUDIT_LIST] = "SELECT seq, time, principal, operation, key, version, dek_id, result, "
                     "error_code, prev_hash, hash, mac FROM audit WHERE seq > $1::bigint "
                     "ORDER BY seq LIMIT $2::bigint",
    [R_AUDIT_HEAD] = "SELECT seq, hash FROM audit_head WHERE id = 1",
    [R_COUNTS] = "SELECT (SELECT count(*) FROM keys), "
                 "count(*) FILTER (WHERE state = 'active'), "
                 "count(*) FILTER (WHERE state = 'revoked'), "
                 "count(*) FILTER (WHERE state = 'destroyed') FROM deks",
    [R_INTENTS] = "SELECT token_id, key_name, version, created FROM kek_intents "
                  "WHERE created <= $1::bigint ORDER BY created, token_id",
};

/* Session settings every connection runs after (re)connecting. */
static const char pg_session_setup[] = "SET synchronous_commit = on; "
                                       "SET client_min_messages = warning; "
                                       "SET client_encoding = 'UTF8'; "
                                       "SET bytea_output = 'hex'; "
                                       "SET standard_conforming_strings = on; "
                                       "SET TimeZone = 'UTC'; "
                                       "SET default_transaction_isolation = 'read committed'";

/* ---- types -------------------------------------------------------------- */

typedef struct pg_conn {
    PGconn *conn;
    int ready;       /* session set up and statements prepared */
    int down_logged; /* a failed reconnect was logged (once per outage) */
    const char *const *sql;
    size_t n_sql;
    struct pg_conn *next_free;
} pg_conn;

typedef struct pg_store {
    kms_store base; /* first: a kms_store * is a pg_store * */
    char *url;
    pg_conn writer;
    pg_conn readers[PG_READERS];
    pthread_mutex_t pool_mu;
    pthread_cond_t pool_cv;
    pg_conn *free_readers;
    int pool_ok;
    kms_gc *gc;
    atomic_int writer_failed; /* last group failed outside a constraint */
    /* writer thread only: */
    int retryable;       /* the last failed statement was a deadlock/serialization failure */
    int sp_open;         /* savepoint w is open (released by the next write or COMMIT) */
    kms_write **applied; /* writes applied in the open transaction (for a replay) */
    size_t n_applied, cap_applied;
    const kms_audit_entry **audit_rows; /* entries to append at the seal, in order */
    size_t n_audit_rows, cap_audit_rows;
    int audit_locked;                   /* the audit lock is held by this transaction */
    atomic_uint_fast64_t replays;
} pg_store;

typedef struct pg_params {
    const char *values[PG_MAX_PARAMS];
    int lengths[PG_MAX_PARAMS];
    int formats[PG_MAX_PARAMS];
    char num[PG_MAX_PARAMS][24];
    int n;
} pg_params;

static const kms_store_ops pg_ops;

static pg_store *pg_of(kms_store *st)
{
    return (pg_store *)st;
}

/* ---- parameters and values ---------------------------------------------- */

static void p_text(pg_params *p, const char *s)
{
    p->values[p->n] = s;
    p->lengths[p->n] = 0;
    p->formats[p->n] = 0;
    p->n++;
}

static void p_int(pg_params *p, int64_t v)
{
    snprintf(p->num[p->n], sizeof(p->num[p->n]), "%lld", (long long)v);
    p_text(p, p->num[p->n]);
}

static void p_bytes(pg_params *p, const unsigned char *b, size_t len)
{
    p->values[p->n] = (const char *)b;
    p->lengths[p->n] = (int)len;
    p->formats[p->n] = 1; /* binary: bytea as is */
    p->n++;
}

static int64_t v_int(const PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? 0 : strtoll(PQgetvalue(r, row, col), NULL, 10);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decode a bytea value in hex output ("\x0a1b..."); -1 if NULL,
 * malformed or longer than cap, else its length. */
static long v_bytes(const PGresult *r, int row, int col, unsigned char *out, size_t cap)
{
    const char *s;
    size_t len, n;

    if (PQgetisnull(r, row, col))
        return -1;
    s = PQgetvalue(r, row, col);
    len = strlen(s);
    if (len < 2 || s[0] != '\\' || s[1] != 'x' || (len - 2) % 2 != 0 || (len - 2) / 2 > cap)
        return -1;
    n = (len - 2) / 2;
    for (size_t i = 0; i < n; i++) {
        int hi = hexval(s[2 + 2 * i]), lo = hexval(s[3 + 2 * i]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i] = (unsigned char)(hi << 4 | lo);
    }
    return (long)n;
}

static void text_copy(char *dst, size_t cap, const char *src)
{
    size_t n = src != NULL ? strlen(src) : 0;

    if (n >= cap)
        n = cap - 1;
    if (n > 0)
        memcpy(dst, src, n);
    dst[n] = '\0';
}

static int sqlstate_is(const PGresult *r, const char *state)
{
    const char *s = r != NULL ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;

    return s != NULL && strcmp(s, state) == 0;
}

/* The primary error message only: PostgreSQL's DETAIL of a constraint
 * violation ("Failing row contains (...)") would carry bound values
 * (wrapped bytes, contexts) into the log. */
static const char *pg_primary(const PGresult *r)
{
    const char *m = r != NULL ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;

    return m != NULL ? m : "(no message)";
}

/* An integrity constraint violation (class 23). */
static int is_constraint(const PGresult *r)
{
    const char *s = r != NULL ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;

    return s != NULL && strncmp(s, "23", 2) == 0;
}

/* ---- connections -------------------------------------------------------- */

static void conn_close(pg_conn *c)
{
    if (c->conn != NULL)
        PQfinish(c->conn);
    c->conn = NULL;
    c->ready = 0;
}

static p11kms_status exec_simple(PGconn *conn, const char *sql, const char *what)
{
    PGresult *r = PQexec(conn, sql);
    ExecStatusType es = PQresultStatus(r);
    p11kms_status rv = P11KMS_OK;

    if (es != PGRES_COMMAND_OK && es != PGRES_TUPLES_OK) {
        KMS_PG_LOG(conn, r, what);
        rv = P11KMS_ERR_STORE_UNAVAILABLE;
    }
    PQclear(r);
    return rv;
}

/* Session settings, their read-back, and the statements. */
static p11kms_status conn_setup(pg_conn *c)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    PGresult *r = NULL;
    const char *enc;
    char name[32];

    if (exec_simple(c->conn, pg_session_setup, "session setup") != P11KMS_OK)
        goto out;
    /* The writer waits for another node's row locks at most this long
     * (as SQLite's busy timeout): then its group fails, unavailable. */
    if (c->sql == writer_sql &&
        exec_simple(c->conn, "SET lock_timeout = " PG_LOCK_TIMEOUT, "session setup") != P11KMS_OK)
        goto out;
    enc = PQparameterStatus(c->conn, "server_encoding");
    if (enc == NULL || strcmp(enc, "UTF8") != 0) {
        LOG_ERROR("store", "postgres: the database encoding is %s; the store needs UTF8",
                  enc != NULL ? enc : "unknown");
        goto out;
    }
    r = PQexec(c->conn, "SHOW synchronous_commit");
    if (PQresultStatus(r) != PGRES_TUPLES_OK || PQntuples(r) != 1 ||
        strcmp(PQgetvalue(r, 0, 0), "on") != 0) {
        LOG_ERROR("store", "postgres: synchronous_commit did not take effect");
        goto out;
    }
    for (size_t i = 0; i < c->n_sql; i++) {
        PQclear(r);
        snprintf(name, sizeof(name), "s%zu", i);
        r = PQprepare(c->conn, name, c->sql[i], 0, NULL);
        if (PQresultStatus(r) != PGRES_COMMAND_OK) {
            KMS_PG_LOG(c->conn, r, c->sql[i]);
            goto out;
        }
    }
    rv = P11KMS_OK;
out:
    PQclear(r);
    return rv;
}

/* Make c usable: connect (first use) or reset (broken), then set it up.
 * STORE_UNAVAILABLE while the server cannot be reached (logged once per
 * outage and connection). */
static p11kms_status conn_ensure(pg_store *s, pg_conn *c)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;

    if (c->conn != NULL && c->ready && PQstatus(c->conn) == CONNECTION_OK)
        return P11KMS_OK;
    c->ready = 0;
    if (c->conn == NULL)
        c->conn = PQconnectdb(s->url);
    else
        PQreset(c->conn);
    if (c->conn == NULL) {
        LOG_ERROR("store", "postgres: out of memory for a connection");
        goto out;
    }
    if (PQstatus(c->conn) != CONNECTION_OK) {
        if (!c->down_logged)
            KMS_PG_LOG(c->conn, NULL, "connecting");
        c->down_logged = 1;
        goto out;
    }
    if (conn_setup(c) != P11KMS_OK)
        goto out;
    if (c->down_logged)
        LOG_INFO("store", "postgres: reconnected");
    c->down_logged = 0;
    c->ready = 1;
    rv = P11KMS_OK;
out:
    return rv;
}

/* Run prepared statement `stmt` of c.  Returns the result (PQclear it;
 * NULL when the connection cannot be made). */
static PGresult *conn_run(pg_conn *c, int stmt, const pg_params *p)
{
    char name[32];

    snprintf(name, sizeof(name), "s%d", stmt);
    return PQexecPrepared(c->conn, name, p != NULL ? p->n : 0, p != NULL ? p->values : NULL,
                          p != NULL ? p->lengths : NULL, p != NULL ? p->formats : NULL, 0);
}

static pg_conn *reader_get(pg_store *s)
{
    pg_conn *c;

    pthread_mutex_lock(&s->pool_mu);
    while (s->free_readers == NULL)
        pthread_cond_wait(&s->pool_cv, &s->pool_mu);
    c = s->free_readers;
    s->free_readers = c->next_free;
    pthread_mutex_unlock(&s->pool_mu);
    return c;
}

static void reader_put(pg_store *s, pg_conn *c)
{
    if (c == NULL)
        return;
    pthread_mutex_lock(&s->pool_mu);
    c->next_free = s->free_readers;
    s->free_readers = c;
    pthread_cond_signal(&s->pool_cv);
    pthread_mutex_unlock(&s->pool_mu);
}

/* One read on reader c: a statement that returns rows.  A connection that
 * broke (server restarted) is reset and the read tried once more.  NULL
 * (logged) when it fails: the caller answers STORE_UNAVAILABLE. */
static PGresult *read_rows(pg_store *s, pg_conn *c, int stmt, const pg_params *p)
{
    PGresult *r = NULL;

    for (int attempt = 0; attempt < 2; attempt++) {
        PQclear(r);
        r = NULL;
        if (conn_ensure(s, c) != P11KMS_OK)
            break;
        r = conn_run(c, stmt, p);
        if (PQresultStatus(r) == PGRES_TUPLES_OK)
            return r;
        if (PQstatus(c->conn) == CONNECTION_OK || attempt == 1) {
            KMS_PG_LOG(c->conn, r, reader_sql[stmt]);
            break;
        }
        LOG_WARN("store", "postgres: a read connection broke; reconnecting");
        c->ready = 0;
    }
    PQclear(r);
    return NULL;
}

/* ---- the writer (called on the writer thread only) ---------------------- */

/* Run writer statement stmt; *res receives the result (PQclear it).
 * Returns P11KMS_OK when it succeeded; a constraint violation returns
 * P11KMS_ERR_BAD_REQUEST (the caller maps it to the write's own status);
 * anything else is logged and returns STORE_UNAVAILABLE (and marks a
 * deadlock or serialization failure retryable). */
static p11kms_status w_run(pg_store *s, int stmt, const pg_params *p, PGresult **res,
                           const char *what)
{
    PGresult *r = conn_run(&s->writer, stmt, p);
    ExecStatusType es = PQresultStatus(r);

    *res = r;
    if (es == PGRES_COMMAND_OK || es == PGRES_TUPLES_OK)
        return P11KMS_OK;
    if (is_constraint(r)) {
        LOG_DEBUG("store", "postgres: %s refused: %s", what, pg_primary(r));
        return P11KMS_ERR_BAD_REQUEST;
    }
    if (sqlstate_is(r, "40P01") || sqlstate_is(r, "40001")) {
        s->retryable = 1;
        LOG_WARN("store", "postgres: %s: %s", what, PQresultErrorField(r, PG_DIAG_SQLSTATE));
    } else {
        KMS_PG_LOG(s->writer.conn, r, what);
    }
    return P11KMS_ERR_STORE_UNAVAILABLE;
}

/* Rows changed by an UPDATE/INSERT result. */
static uint64_t changes(const PGresult *r)
{
    const char *n = PQcmdTuples((PGresult *)r);

    return n != NULL && *n != '\0' ? strtoull(n, NULL, 10) : 0;
}

static p11kms_status w_exec(pg_store *s, const char *sql)
{
    return exec_simple(s->writer.conn, sql, sql);
}

static p11kms_status pg_gc_begin(void *ctx)
{
    pg_store *s = ctx;
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;

    s->n_applied = 0;
    s->sp_open = 0;
    s->n_audit_rows = 0;
    s->audit_locked = 0;
    for (int attempt = 0; attempt < 2; attempt++) {
        if (conn_ensure(s, &s->writer) != P11KMS_OK)
            break;
        rv = w_exec(s, "BEGIN");
        if (rv == P11KMS_OK || PQstatus(s->writer.conn) == CONNECTION_OK)
            break;
        LOG_WARN("store", "postgres: the writer connection broke; reconnecting");
        s->writer.ready = 0;
    }
    if (rv != P11KMS_OK)
        atomic_store(&s->writer_failed, 1);
    return rv;
}

static p11kms_status pg_gc_commit(void *ctx)
{
    pg_store *s = ctx;
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    PGresult *r = PQexec(s->writer.conn, "COMMIT");

    /* COMMIT of an aborted transaction "succeeds" as ROLLBACK. */
    if (PQresultStatus(r) != PGRES_COMMAND_OK || strcmp(PQcmdStatus(r), "COMMIT") != 0) {
        KMS_PG_LOG(s->writer.conn, r, "COMMIT");
        atomic_store(&s->writer_failed, 1);
        goto out;
    }
    atomic_store(&s->writer_failed, 0);
    rv = P11KMS_OK;
out:
    PQclear(r);
    s->n_applied = 0;
    s->n_audit_rows = 0;
    s->audit_locked = 0;
    return rv;
}

static void pg_gc_rollback(void *ctx)
{
    pg_store *s = ctx;

    atomic_store(&s->writer_failed, 1);
    s->n_applied = 0;
    s->n_audit_rows = 0;
    s->audit_locked = 0;
    if (s->writer.conn == NULL || PQstatus(s->writer.conn) != CONNECTION_OK ||
        PQtransactionStatus(s->writer.conn) == PQTRANS_IDLE)
        return;
    w_exec(s, "ROLLBACK");
}

/* Delete the intent of token_id (inside the writer's transaction). */
static p11kms_status intent_delete(pg_store *s, const unsigned char *token_id)
{
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;

    p_bytes(&p, token_id, KMS_TOKEN_ID_LEN);
    rv = w_run(s, W_INTENT_DEL, &p, &r, "deleting a KEK intent");
    if (rv == P11KMS_ERR_BAD_REQUEST)
        rv = P11KMS_ERR_INTERNAL;
    PQclear(r);
    return rv;
}

static p11kms_status apply_intent(pg_store *s, const kms_write *w)
{
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;

    if (w->type == KMS_WRITE_INTENT_REMOVE) {
        rv = intent_delete(s, w->u.intent.token_id);
        goto out;
    }
    p_bytes(&p, w->u.intent.token_id, KMS_TOKEN_ID_LEN);
    p_text(&p, w->u.intent.key_name);
    p_int(&p, w->u.intent.version);
    p_int(&p, w->u.intent.now);
    rv = w_run(s, W_INTENT_ADD, &p, &r, "recording a KEK intent");
    if (rv == P11KMS_ERR_BAD_REQUEST)
        LOG_ERROR("store", "KEK intent refused: %s", pg_primary(r));
out:
    PQclear(r);
    return rv;
}

static p11kms_status apply_key_create(pg_store *s, const kms_write *w)
{
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;
    int64_t key_id;

    p_text(&p, w->u.key_create.name);
    p_int(&p, w->u.key_create.now);
    rv = w_run(s, W_KEY_INSERT, &p, &r, "inserting a key");
    if (rv == P11KMS_ERR_BAD_REQUEST && sqlstate_is(r, "23505")) {
        rv = P11KMS_ERR_KEY_EXISTS;
        goto out;
    }
    if (rv == P11KMS_ERR_BAD_REQUEST)
        LOG_ERROR("store", "key row refused: %s", pg_primary(r));
    if (rv != P11KMS_OK)
        goto out;
    key_id = v_int(r, 0, 0);
    PQclear(r);
    r = NULL;
    memset(&p, 0, sizeof(p));
    p_int(&p, key_id);
    p_bytes(&p, w->u.key_create.token_id, KMS_TOKEN_ID_LEN);
    p_int(&p, w->u.key_create.now);
    rv = w_run(s, W_VERSION_INSERT, &p, &r, "inserting a key version");
    if (rv == P11KMS_ERR_BAD_REQUEST) {
        /* A CKA_ID collision: 128 random bits, so a bug, not bad luck. */
        LOG_ERROR("store", "key version refused: %s", pg_primary(r));
        rv = P11KMS_ERR_INTERNAL;
    }
    if (rv == P11KMS_OK)
        rv = intent_delete(s, w->u.key_create.token_id);
out:
    PQclear(r);
    return rv;
}

static p11kms_status apply_dek_insert(pg_store *s, kms_write *w)
{
    const kms_dek_rec *d = w->u.dek_insert.dek;
    uint64_t cap = w->u.dek_insert.max_wraps;
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;

    p_text(&p, d->id);
    p_text(&p, d->key);
    p_int(&p, d->version);
    p_text(&p, d->context);
    p_bytes(&p, d->wrapped, d->wrapped_len);
    p_int(&p, d->created);
    p_int(&p, cap > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)cap);
    rv = w_run(s, W_DEK_INSERT_COUNTED, &p, &r, "inserting a DEK");
    if (rv == P11KMS_ERR_BAD_REQUEST) {
        if (sqlstate_is(r, "23505")) {
            LOG_ERROR("store", "DEK id %s is already taken", d->id);
            rv = P11KMS_ERR_INTERNAL;
        } else if (sqlstate_is(r, "23503")) {
            rv = P11KMS_ERR_KEY_NOT_FOUND;
        } else {
            LOG_ERROR("store", "DEK row refused: %s", pg_primary(r));
        }
        goto out;
    }
    if (rv != P11KMS_OK || changes(r) == 1)
        goto out;
    /* Nothing written: the version is missing, destroyed, or full. */
    PQclear(r);
    r = NULL;
    memset(&p, 0, sizeof(p));
    p_text(&p, d->key);
    p_int(&p, d->version);
    rv = w_run(s, W_VERSION_EXISTS, &p, &r, "reading a key version");
    if (rv != P11KMS_OK) {
        rv = rv == P11KMS_ERR_BAD_REQUEST ? P11KMS_ERR_INTERNAL : rv;
        goto out;
    }
    rv = P11KMS_ERR_KEY_NOT_FOUND;
    if (PQntuples(r) > 0 && w->u.dek_insert.max_wraps != UINT64_MAX) {
        w->u.dek_insert.refused = 1;
        rv = P11KMS_OK; /* nothing written: the caller rotates and retries */
    }
out:
    PQclear(r);
    return rv;
}

/* Why a one-DEK transition changed nothing (see sqlite.c). */
static p11kms_status why_unchanged(pg_store *s, const kms_write *w)
{
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;
    int state;

    p_text(&p, w->u.dek_state.id);
    rv = w_run(s, W_DEK_STATE, &p, &r, "reading a DEK state");
    if (rv != P11KMS_OK) {
        rv = rv == P11KMS_ERR_BAD_REQUEST ? P11KMS_ERR_INTERNAL : rv;
        goto out;
    }
    if (PQntuples(r) == 0) {
        rv = P11KMS_ERR_DEK_NOT_FOUND;
        goto out;
    }
    state = kms_dek_state_parse(PQgetvalue(r, 0, 0));
    if (state == KMS_DEK_DESTROYED)
        rv = P11KMS_ERR_DEK_DESTROYED;
    else if (state == KMS_DEK_REVOKED && w->type == KMS_WRITE_DEK_REVOKE)
        rv = P11KMS_OK; /* already revoked: first reason and time kept */
    else {
        LOG_ERROR("store", "DEK %s in state %s refused a state change", w->u.dek_state.id,
                  state >= 0 ? kms_dek_state_name((kms_dek_state)state) : "(malformed)");
        rv = P11KMS_ERR_INTERNAL;
    }
out:
    PQclear(r);
    return rv;
}

/* KMS_WRITE_DEK_REVOKE / _DESTROY, one DEK (id set) or in bulk. */
static p11kms_status apply_dek_state(pg_store *s, kms_write *w)
{
    int revoke = w->type == KMS_WRITE_DEK_REVOKE, stmt;
    const char *reason = revoke ? kms_revoke_reason_name(w->u.dek_state.reason) : NULL;
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    pg_params p = {0};
    PGresult *r = NULL;
    int64_t key_id;

    if (revoke && reason == NULL)
        goto out;
    if (w->u.dek_state.id != NULL) {
        stmt = revoke ? W_DEK_REVOKE : W_DEK_DESTROY;
        p_text(&p, w->u.dek_state.id);
        p_int(&p, w->u.dek_state.now);
        if (revoke)
            p_text(&p, reason);
    } else {
        p_text(&p, w->u.dek_state.key);
        rv = w_run(s, W_KEY_ID, &p, &r, "looking up a key");
        if (rv != P11KMS_OK) {
            rv = rv == P11KMS_ERR_BAD_REQUEST ? P11KMS_ERR_INTERNAL : rv;
            goto out;
        }
        if (PQntuples(r) == 0) {
            rv = P11KMS_ERR_KEY_NOT_FOUND;
            goto out;
        }
        key_id = v_int(r, 0, 0);
        PQclear(r);
        r = NULL;
        memset(&p, 0, sizeof(p));
        stmt = revoke ? W_BULK_REVOKE : W_BULK_DESTROY;
        p_int(&p, key_id);
        p_text(&p, w->u.dek_state.filter);
        p_int(&p, w->u.dek_state.now);
        if (revoke)
            p_text(&p, reason);
    }
    rv = w_run(s, stmt, &p, &r, revoke ? "revoking data keys" : "destroying data keys");
    if (rv == P11KMS_ERR_BAD_REQUEST) {
        LOG_ERROR("store", "DEK state change refused: %s", pg_primary(r));
        rv = P11KMS_ERR_INTERNAL;
    }
    if (rv != P11KMS_OK)
        goto out;
    w->u.dek_state.count = changes(r);
    if (w->u.dek_state.id != NULL && w->u.dek_state.count == 0)
        rv = why_unchanged(s, w);
out:
    PQclear(r);
    return rv;
}

/* The key's row id and latest_version, read and row-locked inside the
 * transaction (every other node's writer waits for our commit). */
static p11kms_status key_latest(pg_store *s, const char *name, int64_t *key_id, uint32_t *latest)
{
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;

    p_text(&p, name);
    rv = w_run(s, W_KEY_LATEST, &p, &r, "reading a key");
    if (rv != P11KMS_OK) {
        rv = rv == P11KMS_ERR_BAD_REQUEST ? P11KMS_ERR_INTERNAL : rv;
        goto out;
    }
    if (PQntuples(r) == 0) {
        rv = P11KMS_ERR_KEY_NOT_FOUND;
        goto out;
    }
    *key_id = v_int(r, 0, 0);
    *latest = (uint32_t)v_int(r, 0, 1);
out:
    PQclear(r);
    return rv;
}

static p11kms_status apply_version_add(pg_store *s, kms_write *w)
{
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;
    int64_t key_id = 0;
    uint32_t latest = 0, next = w->u.version_add.expected_latest + 1;

    rv = key_latest(s, w->u.version_add.name, &key_id, &latest);
    if (rv != P11KMS_OK)
        goto out;
    if (latest != w->u.version_add.expected_latest) {
        w->u.version_add.added = 0; /* another rotation won */
        goto out;
    }
    p_int(&p, key_id);
    p_int(&p, next);
    p_bytes(&p, w->u.version_add.token_id, KMS_TOKEN_ID_LEN);
    p_int(&p, w->u.version_add.now);
    rv = w_run(s, W_VERSION_ADD, &p, &r, "inserting a key version");
    if (rv == P11KMS_ERR_BAD_REQUEST) {
        LOG_ERROR("store", "key version refused: %s", pg_primary(r));
        rv = P11KMS_ERR_INTERNAL;
    }
    if (rv != P11KMS_OK)
        goto out;
    PQclear(r);
    r = NULL;
    memset(&p, 0, sizeof(p));
    p_int(&p, key_id);
    p_int(&p, next);
    p_int(&p, latest);
    rv = w_run(s, W_KEY_SET_LATEST, &p, &r, "updating latest_version");
    if (rv == P11KMS_ERR_BAD_REQUEST)
        rv = P11KMS_ERR_INTERNAL;
    if (rv != P11KMS_OK)
        goto out;
    if (changes(r) != 1) {
        rv = P11KMS_ERR_INTERNAL; /* read and locked just above */
        goto out;
    }
    rv = intent_delete(s, w->u.version_add.token_id);
    if (rv != P11KMS_OK)
        goto out;
    w->u.version_add.added = next;
out:
    PQclear(r);
    return rv;
}

static p11kms_status apply_key_meta(pg_store *s, kms_write *w)
{
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;
    int64_t key_id = 0;
    uint32_t latest = 0, min = w->u.key_meta.min_decrypt_version;

    rv = key_latest(s, w->u.key_meta.name, &key_id, &latest);
    if (rv != P11KMS_OK)
        goto out;
    if (w->type == KMS_WRITE_KEY_SET_STATE) {
        p_text(&p, w->u.key_meta.name);
        p_text(&p, kms_key_state_name(w->u.key_meta.state));
        rv = w_run(s, W_KEY_SET_STATE, &p, &r, "setting a key state");
        if (rv == P11KMS_ERR_BAD_REQUEST)
            rv = P11KMS_ERR_INTERNAL;
        goto out;
    }
    if (min != 0 && min > latest) {
        rv = P11KMS_ERR_BAD_REQUEST;
        goto out;
    }
    if (min != 0) {
        p_int(&p, key_id);
        p_int(&p, min);
        rv = w_run(s, W_KEY_SET_MIN, &p, &r, "setting min_decrypt_version");
        if (rv != P11KMS_OK)
            goto out;
        PQclear(r);
        r = NULL;
        memset(&p, 0, sizeof(p));
    }
    if (w->u.key_meta.rotation_period >= 0) {
        p_int(&p, key_id);
        p_int(&p, w->u.key_meta.rotation_period);
        rv = w_run(s, W_KEY_SET_PERIOD, &p, &r, "setting rotation_period");
    }
out:
    PQclear(r);
    return rv;
}

/* Version `version` of key_id: exists, active; its row is locked. */
static p11kms_status version_active(pg_store *s, int64_t key_id, uint32_t version, int *exists,
                                    int *active)
{
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;

    p_int(&p, key_id);
    p_int(&p, version);
    rv = w_run(s, W_VERSION_STATE, &p, &r, "reading a key version");
    if (rv == P11KMS_ERR_BAD_REQUEST)
        rv = P11KMS_ERR_INTERNAL;
    if (rv != P11KMS_OK)
        goto out;
    *exists = PQntuples(r) > 0;
    *active = *exists && v_int(r, 0, 0) != 0;
out:
    PQclear(r);
    return rv;
}

static p11kms_status apply_rewrap(pg_store *s, kms_write *w)
{
    p11kms_status rv;
    pg_params p;
    PGresult *r = NULL;
    int64_t key_id = 0;
    uint32_t latest = 0;
    uint64_t moved = 0;
    int exists = 0, active = 0;

    w->u.rewrap.updated = 0;
    rv = key_latest(s, w->u.rewrap.name, &key_id, &latest);
    if (rv != P11KMS_OK)
        goto out;
    rv = version_active(s, key_id, w->u.rewrap.new_version, &exists, &active);
    if (rv != P11KMS_OK || !active)
        goto out; /* the target was retired meanwhile: nothing moves */
    for (size_t i = 0; i < w->u.rewrap.n; i++) {
        const kms_rewrap_item *it = &w->u.rewrap.items[i];

        memset(&p, 0, sizeof(p));
        p_text(&p, it->id);
        p_int(&p, w->u.rewrap.new_version);
        p_bytes(&p, it->wrapped, it->wrapped_len);
        p_int(&p, it->old_version);
        p_int(&p, key_id);
        PQclear(r);
        rv = w_run(s, W_DEK_REWRAP, &p, &r, "storing a rewrapped DEK");
        if (rv == P11KMS_ERR_BAD_REQUEST) {
            LOG_ERROR("store", "rewrapped DEK %s refused: %s", it->id, pg_primary(r));
            rv = P11KMS_ERR_INTERNAL;
        }
        if (rv != P11KMS_OK)
            goto out;
        moved += changes(r);
    }
    if (moved > 0) {
        memset(&p, 0, sizeof(p));
        p_int(&p, key_id);
        p_int(&p, w->u.rewrap.new_version);
        p_int(&p, (int64_t)moved);
        PQclear(r);
        rv = w_run(s, W_VERSION_BUMP, &p, &r, "counting rewraps");
        if (rv == P11KMS_ERR_BAD_REQUEST || (rv == P11KMS_OK && changes(r) != 1))
            rv = P11KMS_ERR_INTERNAL;
        if (rv != P11KMS_OK)
            goto out;
    }
    w->u.rewrap.updated = moved;
out:
    PQclear(r);
    return rv;
}

static p11kms_status apply_version_retire(pg_store *s, kms_write *w)
{
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;
    int64_t key_id = 0;
    uint32_t latest = 0;
    int exists = 0, active = 0;

    rv = key_latest(s, w->u.retire.name, &key_id, &latest);
    if (rv != P11KMS_OK)
        goto out;
    rv = version_active(s, key_id, w->u.retire.version, &exists, &active);
    if (rv != P11KMS_OK)
        goto out;
    if (!exists) {
        rv = P11KMS_ERR_KEY_NOT_FOUND;
        goto out;
    }
    if (!active)
        goto out; /* already destroyed: idempotent */
    if (w->u.retire.version == latest) {
        rv = P11KMS_ERR_KEY_VERSION_IN_USE;
        goto out;
    }
    /* The version row is locked: a DEK insert on it (another node) either
     * committed before (seen here) or waits and then finds it destroyed. */
    p_int(&p, key_id);
    p_int(&p, w->u.retire.version);
    rv = w_run(s, W_VERSION_LIVE, &p, &r, "counting live DEKs of a version");
    if (rv == P11KMS_ERR_BAD_REQUEST)
        rv = P11KMS_ERR_INTERNAL;
    if (rv != P11KMS_OK)
        goto out;
    if (v_int(r, 0, 0) != 0) {
        rv = P11KMS_ERR_KEY_VERSION_IN_USE;
        goto out;
    }
    PQclear(r);
    r = NULL;
    memset(&p, 0, sizeof(p));
    p_int(&p, key_id);
    p_int(&p, w->u.retire.version);
    p_int(&p, w->u.retire.now);
    rv = w_run(s, W_VERSION_DESTROY, &p, &r, "retiring a key version");
    if (rv == P11KMS_ERR_BAD_REQUEST)
        rv = P11KMS_ERR_INTERNAL;
    if (rv != P11KMS_OK)
        goto out;
    rv = changes(r) == 1 ? P11KMS_OK : P11KMS_ERR_INTERNAL;
out:
    PQclear(r);
    return rv;
}

/* One write under its own savepoint.  The previous write's savepoint is
 * released in the same round trip that opens this one; the last one is
 * released by COMMIT. */
static p11kms_status apply_one(pg_store *s, kms_write *w)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;

    if (w_exec(s, s->sp_open ? "RELEASE SAVEPOINT w; SAVEPOINT w" : "SAVEPOINT w") != P11KMS_OK)
        goto out;
    s->sp_open = 1;
    switch (w->type) {
    case KMS_WRITE_NOOP: rv = P11KMS_OK; break;
    case KMS_WRITE_KEY_CREATE: rv = apply_key_create(s, w); break;
    case KMS_WRITE_DEK_INSERT: rv = apply_dek_insert(s, w); break;
    case KMS_WRITE_DEK_REVOKE:
    case KMS_WRITE_DEK_DESTROY: rv = apply_dek_state(s, w); break;
    case KMS_WRITE_VERSION_ADD: rv = apply_version_add(s, w); break;
    case KMS_WRITE_KEY_SET_STATE:
    case KMS_WRITE_KEY_CONFIG: rv = apply_key_meta(s, w); break;
    case KMS_WRITE_REWRAP: rv = apply_rewrap(s, w); break;
    case KMS_WRITE_VERSION_RETIRE: rv = apply_version_retire(s, w); break;
    case KMS_WRITE_INTENT_ADD:
    case KMS_WRITE_INTENT_REMOVE: rv = apply_intent(s, w); break;
    default:
        LOG_ERROR("store", "postgres: write type %d is not implemented", (int)w->type);
        rv = P11KMS_ERR_INTERNAL;
        break;
    }
    if (rv == P11KMS_ERR_STORE_UNAVAILABLE)
        goto out; /* the group is rolled back (or replayed) as a whole */
    /* A refused write leaves nothing (the savepoint itself stays open). */
    if (rv != P11KMS_OK && w_exec(s, "ROLLBACK TO SAVEPOINT w") != P11KMS_OK)
        rv = P11KMS_ERR_STORE_UNAVAILABLE;
out:
    return rv;
}

/* After a deadlock: roll the transaction back (releasing every lock, so
 * the other node proceeds) and apply the group's earlier writes again. */
static p11kms_status replay(pg_store *s)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;

    atomic_fetch_add(&s->replays, 1);
    s->sp_open = 0;
    if (w_exec(s, "ROLLBACK") != P11KMS_OK || w_exec(s, "BEGIN") != P11KMS_OK)
        goto out;
    for (size_t i = 0; i < s->n_applied; i++) {
        s->retryable = 0;
        s->applied[i]->result = apply_one(s, s->applied[i]);
        if (s->applied[i]->result == P11KMS_ERR_STORE_UNAVAILABLE)
            goto out;
    }
    rv = P11KMS_OK;
out:
    return rv;
}

static p11kms_status pg_gc_apply(void *ctx, kms_write *w)
{
    pg_store *s = ctx;
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    kms_write **grown;

    if (s->n_applied == s->cap_applied) {
        size_t cap = s->cap_applied ? s->cap_applied * 2 : 64;

        grown = realloc(s->applied, cap * sizeof(*grown));
        if (grown == NULL)
            goto out;
        s->applied = grown;
        s->cap_applied = cap;
    }
    for (int tries = 0;; tries++) {
        s->retryable = 0;
        rv = apply_one(s, w);
        if (rv != P11KMS_ERR_STORE_UNAVAILABLE || !s->retryable || tries >= PG_REPLAY_MAX)
            break;
        LOG_WARN("store", "postgres: lock conflict with another node; replaying %zu writes",
                 s->n_applied + 1);
        if (replay(s) != P11KMS_OK)
            break;
    }
    if (rv != P11KMS_ERR_STORE_UNAVAILABLE)
        s->applied[s->n_applied++] = w;
out:
    return rv;
}

/* ---- the audit log (writer thread; inside the group's transaction) ---- */

/* Take the cross-node audit lock once per transaction. */
static p11kms_status audit_lock(pg_store *s)
{
    p11kms_status rv = P11KMS_OK;
    PGresult *r = NULL;

    if (!s->audit_locked) {
        rv = w_run(s, W_AUDIT_LOCK, NULL, &r, "taking the audit lock");
        if (rv != P11KMS_OK)
            rv = P11KMS_ERR_STORE_UNAVAILABLE;
        else
            s->audit_locked = 1;
    }
    PQclear(r);
    return rv;
}

/* A (seq, hash) row of statement stmt; *found 0 when there is none. */
static p11kms_status seq_hash_row(pg_store *s, int stmt, int *found, uint64_t *seq,
                                  unsigned char hash[KMS_AUDIT_HASH_LEN])
{
    p11kms_status rv;
    PGresult *r = NULL;

    *found = 0;
    rv = w_run(s, stmt, NULL, &r, "reading the audit head");
    if (rv != P11KMS_OK) {
        rv = P11KMS_ERR_STORE_UNAVAILABLE;
        goto out;
    }
    if (PQntuples(r) > 0) {
        *found = 1;
        *seq = (uint64_t)v_int(r, 0, 0);
        memset(hash, 0, KMS_AUDIT_HASH_LEN);
        if (v_bytes(r, 0, 1, hash, KMS_AUDIT_HASH_LEN) != KMS_AUDIT_HASH_LEN)
            memset(hash, 0, KMS_AUDIT_HASH_LEN);
    }
out:
    PQclear(r);
    return rv;
}

static p11kms_status pg_gc_audit_head(void *ctx, kms_audit_head *head, uint64_t *last_seq,
                                      unsigned char last_hash[KMS_AUDIT_HASH_LEN])
{
    pg_store *s = ctx;
    p11kms_status rv;
    int found = 0;

    s->n_audit_rows = 0;
    rv = audit_lock(s);
    if (rv == P11KMS_OK)
        rv = seq_hash_row(s, W_AUDIT_HEAD_GET, &head->present, &head->seq, head->hash);
    *last_seq = 0;
    if (rv == P11KMS_OK)
        rv = seq_hash_row(s, W_AUDIT_LAST, &found, last_seq, last_hash);
    if (rv == P11KMS_OK && !found)
        *last_seq = 0;
    return rv;
}

/* Entries are kept (the writer's structs live until the group is done)
 * and written by the seal in multi-row INSERTs: a round trip per group,
 * not per entry. */
static p11kms_status pg_gc_audit_insert(void *ctx, const kms_audit_entry *e)
{
    pg_store *s = ctx;
    const kms_audit_entry **grown;

    if (s->n_audit_rows == s->cap_audit_rows) {
        size_t cap = s->cap_audit_rows ? s->cap_audit_rows * 2 : 256;

        grown = realloc(s->audit_rows, cap * sizeof(*grown));
        if (grown == NULL)
            return P11KMS_ERR_STORE_UNAVAILABLE;
        s->audit_rows = grown;
        s->cap_audit_rows = cap;
    }
    s->audit_rows[s->n_audit_rows++] = e;
    return P11KMS_OK;
}

#define PG_AUDIT_COLS 12
#define PG_AUDIT_ROWS_PER_INSERT 400 /* 4800 parameters per statement */

/* INSERT rows [from, to) of the buffered entries; `sealed` is the entry
 * whose mac is written with it (the group's last). */
static p11kms_status audit_flush(pg_store *s, size_t from, size_t to, const kms_audit_entry *sealed)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    size_t n = to - from, np = n * PG_AUDIT_COLS, used = 0;
    const char **vals = calloc(np, sizeof(*vals));
    int *lens = calloc(np, sizeof(*lens)), *fmts = calloc(np, sizeof(*fmts));
    char (*num)[24] = calloc(n * 3, sizeof(*num));
    char *sql = malloc(128 + n * 120);
    PGresult *r = NULL;

    if (vals == NULL || lens == NULL || fmts == NULL || num == NULL || sql == NULL)
        goto out;
    used = (size_t)sprintf(sql, "INSERT INTO audit (seq, time, principal, operation, key, version, "
                                "dek_id, result, error_code, prev_hash, hash, mac) VALUES ");
    for (size_t i = 0; i < n; i++) {
        const kms_audit_entry *e = s->audit_rows[from + i];
        size_t b = i * PG_AUDIT_COLS;

        snprintf(num[i * 3], 24, "%llu", (unsigned long long)e->seq);
        snprintf(num[i * 3 + 1], 24, "%lld", (long long)e->time);
        snprintf(num[i * 3 + 2], 24, "%u", e->version);
        vals[b + 0] = num[i * 3];
        vals[b + 1] = num[i * 3 + 1];
        vals[b + 2] = e->principal;
        lens[b + 2] = (int)strlen(e->principal);
        fmts[b + 2] = 1;
        vals[b + 3] = e->operation;
        vals[b + 4] = e->key[0] != '\0' ? e->key : NULL;
        vals[b + 5] = e->version != 0 ? num[i * 3 + 2] : NULL;
        vals[b + 6] = e->dek_id[0] != '\0' ? e->dek_id : NULL;
        vals[b + 7] = kms_audit_result_name(e->result);
        vals[b + 8] = e->error_code[0] != '\0' ? e->error_code : NULL;
        vals[b + 9] = (const char *)e->prev_hash;
        lens[b + 9] = KMS_AUDIT_HASH_LEN;
        fmts[b + 9] = 1;
        vals[b + 10] = (const char *)e->hash;
        lens[b + 10] = KMS_AUDIT_HASH_LEN;
        fmts[b + 10] = 1;
        vals[b + 11] = e == sealed ? (const char *)e->mac : NULL;
        lens[b + 11] = KMS_AUDIT_MAC_LEN;
        fmts[b + 11] = 1;
        used += (size_t)sprintf(sql + used,
                                "%s($%zu::bigint,$%zu::bigint,$%zu::bytea,$%zu,$%zu,$%zu::bigint,"
                                "$%zu,$%zu,$%zu,$%zu::bytea,$%zu::bytea,$%zu::bytea)",
                                i > 0 ? "," : "", b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7,
                                b + 8, b + 9, b + 10, b + 11, b + 12);
    }
    r = PQexecParams(s->writer.conn, sql, (int)np, NULL, vals, lens, fmts, 0);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        KMS_PG_LOG(s->writer.conn, r, "appending audit entries");
        goto out;
    }
    rv = P11KMS_OK;
out:
    PQclear(r);
    free(sql);
    free(num);
    free(fmts);
    free(lens);
    free(vals);
    return rv;
}

static p11kms_status pg_gc_audit_seal(void *ctx, const kms_audit_entry *e)
{
    pg_store *s = ctx;
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    pg_params p = {0};
    PGresult *r = NULL;

    if (s->n_audit_rows == 0 || s->audit_rows[s->n_audit_rows - 1] != e) {
        LOG_ERROR("store", "postgres: the sealed audit entry is not the group's last");
        goto out;
    }
    for (size_t from = 0; from < s->n_audit_rows; from += PG_AUDIT_ROWS_PER_INSERT) {
        size_t to = from + PG_AUDIT_ROWS_PER_INSERT;

        if (to > s->n_audit_rows)
            to = s->n_audit_rows;
        if (audit_flush(s, from, to, e) != P11KMS_OK)
            goto out;
    }
    p_int(&p, (int64_t)e->seq);
    p_bytes(&p, e->hash, KMS_AUDIT_HASH_LEN);
    if (w_run(s, W_AUDIT_HEAD_SET, &p, &r, "recording the audit head") != P11KMS_OK)
        goto out;
    rv = P11KMS_OK;
out:
    s->n_audit_rows = 0;
    PQclear(r);
    return rv;
}

static p11kms_status pg_gc_audit_key_get(void *ctx, unsigned char id[KMS_TOKEN_ID_LEN],
                                         int *found)
{
    pg_store *s = ctx;
    p11kms_status rv;
    PGresult *r = NULL;

    *found = 0;
    rv = audit_lock(s); /* one node creates the key; the others find it */
    if (rv != P11KMS_OK)
        goto out;
    rv = w_run(s, W_AUDIT_KEY_GET, NULL, &r, "reading the audit key id");
    if (rv != P11KMS_OK) {
        rv = P11KMS_ERR_STORE_UNAVAILABLE;
        goto out;
    }
    if (PQntuples(r) > 0 && v_bytes(r, 0, 0, id, KMS_TOKEN_ID_LEN) == KMS_TOKEN_ID_LEN)
        *found = 1;
out:
    PQclear(r);
    return rv;
}

static p11kms_status pg_gc_audit_key_put(void *ctx, const unsigned char id[KMS_TOKEN_ID_LEN])
{
    pg_store *s = ctx;
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;

    p_bytes(&p, id, KMS_TOKEN_ID_LEN);
    p_int(&p, (int64_t)time(NULL));
    rv = w_run(s, W_AUDIT_KEY_PUT, &p, &r, "recording the audit key id");
    PQclear(r);
    return rv == P11KMS_OK ? P11KMS_OK : P11KMS_ERR_STORE_UNAVAILABLE;
}

static const kms_gc_ops pg_gc_ops = {
    .begin = pg_gc_begin,
    .apply = pg_gc_apply,
    .commit = pg_gc_commit,
    .rollback = pg_gc_rollback,
    .audit_head = pg_gc_audit_head,
    .audit_insert = pg_gc_audit_insert,
    .audit_seal = pg_gc_audit_seal,
    .audit_key_get = pg_gc_audit_key_get,
    .audit_key_put = pg_gc_audit_key_put,
};

/* ---- open / close ------------------------------------------------------- */

static void pg_free(pg_store *s)
{
    if (s == NULL)
        return;
    kms_gc_stop(s->gc);
    for (size_t i = 0; i < PG_READERS; i++)
        conn_close(&s->readers[i]);
    conn_close(&s->writer);
    if (s->pool_ok) {
        pthread_cond_destroy(&s->pool_cv);
        pthread_mutex_destroy(&s->pool_mu);
    }
    free(s->applied);
    free(s->audit_rows);
    free(s->url);
    free(s);
}

/* Migrate on a connection of its own, closed afterwards. */
static p11kms_status migrate(pg_store *s)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    pg_conn c = {0};

    c.sql = NULL;
    c.n_sql = 0;
    if (conn_ensure(s, &c) != P11KMS_OK)
        goto out;
    rv = kms_pg_migrate(c.conn);
out:
    conn_close(&c);
    return rv;
}

p11kms_status kms_store_open_postgres(const char *url, kms_store **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    pg_store *s = NULL;
    PQconninfoOption *opts = NULL;
    char *err = NULL;

    if (url == NULL || *url == '\0' || out == NULL)
        goto out;
    opts = PQconninfoParse(url, &err);
    if (opts == NULL) {
        LOG_ERROR("store", "postgres: the connection string is malformed: %s",
                  err != NULL ? err : "out of memory");
        goto out;
    }
    rv = P11KMS_ERR_STORE_UNAVAILABLE;
    if (PQisthreadsafe() == 0) {
        LOG_ERROR("store", "this libpq is built without thread support");
        goto out;
    }
    rv = P11KMS_ERR_NO_MEMORY;
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        goto out;
    s->base.ops = &pg_ops;
    s->url = strdup(url);
    if (s->url == NULL)
        goto out;
    s->writer.sql = writer_sql;
    s->writer.n_sql = W_COUNT;
    rv = P11KMS_ERR_INTERNAL;
    if (pthread_mutex_init(&s->pool_mu, NULL) != 0)
        goto out;
    if (pthread_cond_init(&s->pool_cv, NULL) != 0) {
        pthread_mutex_destroy(&s->pool_mu);
        goto out;
    }
    s->pool_ok = 1;
    rv = migrate(s);
    if (rv != P11KMS_OK)
        goto out;
    rv = conn_ensure(s, &s->writer);
    if (rv != P11KMS_OK)
        goto out;
    for (size_t i = 0; i < PG_READERS; i++) {
        s->readers[i].sql = reader_sql;
        s->readers[i].n_sql = R_COUNT;
        rv = conn_ensure(s, &s->readers[i]);
        if (rv != P11KMS_OK)
            goto out;
        s->readers[i].next_free = s->free_readers;
        s->free_readers = &s->readers[i];
    }
    rv = kms_gc_start(&pg_gc_ops, s, &s->gc);
    if (rv != P11KMS_OK)
        goto out;
    LOG_DEBUG("store", "opened postgres (schema %d, %d readers)", kms_pg_schema_latest(),
              PG_READERS);
    *out = &s->base;
    s = NULL;
    rv = P11KMS_OK;
out:
    PQconninfoFree(opts);
    PQfreemem(err);
    pg_free(s);
    return rv;
}

static void pg_close(kms_store *st)
{
    pg_free(pg_of(st));
}

/* ---- reads -------------------------------------------------------------- */

static p11kms_status pg_counts(kms_store *st, kms_store_counts *out)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    PGresult *r = read_rows(s, c, R_COUNTS, NULL);

    if (r == NULL || PQntuples(r) != 1 || PQnfields(r) != 4)
        goto out;
    out->keys = (uint64_t)v_int(r, 0, 0);
    out->deks_active = (uint64_t)v_int(r, 0, 1);
    out->deks_revoked = (uint64_t)v_int(r, 0, 2);
    out->deks_destroyed = (uint64_t)v_int(r, 0, 3);
    rv = P11KMS_OK;
out:
    PQclear(r);
    reader_put(s, c);
    return rv;
}

static p11kms_status pg_ping(kms_store *st)
{
    pg_store *s = pg_of(st);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    pg_conn *c = reader_get(s);
    kms_write w = {.type = KMS_WRITE_NOOP};
    PGresult *r = read_rows(s, c, R_PING, NULL);

    if (r == NULL)
        goto out;
    /* After a failed group, prove the writer can write again (an empty
     * transaction) before saying it is healthy. */
    if (atomic_load(&s->writer_failed) && kms_gc_submit(s->gc, &w) != P11KMS_OK)
        goto out;
    rv = P11KMS_OK;
out:
    PQclear(r);
    reader_put(s, c);
    return rv;
}

static p11kms_status version_from_row(const PGresult *r, int row, int col, kms_version_rec *v)
{
    int state = kms_version_state_parse(PQgetvalue(r, row, col + 1));

    memset(v, 0, sizeof(*v));
    if (state < 0 || v_bytes(r, row, col + 2, v->token_id, KMS_TOKEN_ID_LEN) != KMS_TOKEN_ID_LEN) {
        LOG_ERROR("store", "a key_versions row is malformed");
        return P11KMS_ERR_INTERNAL;
    }
    v->version = (uint32_t)v_int(r, row, col);
    v->state = (kms_version_state)state;
    v->created = v_int(r, row, col + 3);
    v->wrap_count = (uint64_t)v_int(r, row, col + 4);
    v->dek_count = (uint64_t)v_int(r, row, col + 5);
    return P11KMS_OK;
}

static p11kms_status key_from_row(const PGresult *r, int row, kms_key_rec **out)
{
    p11kms_status rv = P11KMS_ERR_INTERNAL;
    kms_key_rec *k = NULL;
    int state = kms_key_state_parse(PQgetvalue(r, row, 1));

    if (state < 0 || PQgetlength(r, row, 0) > KMS_NAME_MAX) {
        LOG_ERROR("store", "a keys row is malformed");
        goto out;
    }
    rv = P11KMS_ERR_NO_MEMORY;
    k = calloc(1, sizeof(*k));
    if (k == NULL)
        goto out;
    text_copy(k->name, sizeof(k->name), PQgetvalue(r, row, 0));
    k->state = (kms_key_state)state;
    k->latest_version = (uint32_t)v_int(r, row, 2);
    k->min_decrypt_version = (uint32_t)v_int(r, row, 3);
    k->rotation_period = v_int(r, row, 4);
    k->created = v_int(r, row, 5);
    *out = k;
    k = NULL;
    rv = P11KMS_OK;
out:
    kms_key_rec_free(k);
    return rv;
}

/* Rows of PG_KEY_COLUMNS into key records (versions grouped). */
static p11kms_status read_keys(const PGresult *r, kms_key_rec ***out, size_t *count)
{
    p11kms_status rv = P11KMS_OK;
    int rows = PQntuples(r);
    kms_key_rec **keys = NULL, *k;
    kms_version_rec v;
    size_t n = 0;

    if (rows > 0) {
        keys = calloc((size_t)rows, sizeof(*keys));
        if (keys == NULL) {
            rv = P11KMS_ERR_NO_MEMORY;
            goto out;
        }
    }
    for (int i = 0; i < rows; i++) {
        k = n > 0 ? keys[n - 1] : NULL;
        if (k == NULL || strcmp(k->name, PQgetvalue(r, i, 0)) != 0) {
            rv = key_from_row(r, i, &keys[n]);
            if (rv != P11KMS_OK)
                goto out;
            k = keys[n++];
        }
        rv = version_from_row(r, i, 6, &v);
        if (rv != P11KMS_OK)
            goto out;
        rv = kms_key_rec_add_version(k, &v);
        if (rv != P11KMS_OK)
            goto out;
    }
    *out = keys;
    *count = n;
    keys = NULL;
out:
    kms_key_list_free(keys, n);
    return rv;
}

static p11kms_status key_get_with(kms_store *st, int which, const char *name, kms_key_rec **out)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    kms_key_rec **keys = NULL;
    size_t n = 0;
    pg_params p = {0};
    PGresult *r;

    p_text(&p, name);
    r = read_rows(s, c, which, &p);
    if (r == NULL)
        goto out;
    rv = read_keys(r, &keys, &n);
    if (rv != P11KMS_OK)
        goto out;
    if (n == 0) {
        rv = P11KMS_ERR_KEY_NOT_FOUND;
        goto out;
    }
    *out = keys[0];
    keys[0] = NULL;
out:
    PQclear(r);
    reader_put(s, c);
    kms_key_list_free(keys, n);
    return rv;
}

static p11kms_status pg_key_get(kms_store *st, const char *name, kms_key_rec **out)
{
    return key_get_with(st, R_KEY_GET, name, out);
}

static p11kms_status pg_key_get_meta(kms_store *st, const char *name, kms_key_rec **out)
{
    return key_get_with(st, R_KEY_META, name, out);
}

static p11kms_status pg_key_list(kms_store *st, kms_key_rec ***out, size_t *count)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    PGresult *r = read_rows(s, c, R_KEY_LIST, NULL);

    if (r != NULL)
        rv = read_keys(r, out, count);
    PQclear(r);
    reader_put(s, c);
    return rv;
}

/* A DEK record from a row of PG_DEK_COLUMNS (+ wrapped or NULL). */
static p11kms_status dek_from_row(const PGresult *r, int row, kms_dek_rec **out)
{
    p11kms_status rv = P11KMS_ERR_INTERNAL;
    kms_dek_rec *d = NULL;
    int state = kms_dek_state_parse(PQgetvalue(r, row, 3));
    int reason = PQgetisnull(r, row, 7) ? KMS_REVOKE_NONE
                                        : kms_revoke_reason_parse(PQgetvalue(r, row, 7));
    long wlen = 0;

    if (state < 0 || reason < 0 || PQgetisnull(r, row, 4) ||
        PQgetlength(r, row, 0) != KMS_DEK_ID_LEN || PQgetlength(r, row, 1) > KMS_NAME_MAX) {
        LOG_ERROR("store", "DEK row %.36s is malformed", PQgetvalue(r, row, 0));
        goto out;
    }
    rv = P11KMS_ERR_NO_MEMORY;
    d = calloc(1, sizeof(*d));
    if (d == NULL)
        goto out;
    d->context = strdup(PQgetvalue(r, row, 4));
    if (d->context == NULL)
        goto out;
    if (!PQgetisnull(r, row, PG_DEK_COL_WRAPPED)) {
        wlen = v_bytes(r, row, PG_DEK_COL_WRAPPED, d->wrapped, KMS_WRAPPED_MAX);
        if (wlen < 0) {
            LOG_ERROR("store", "DEK row %.36s has malformed wrapped bytes", PQgetvalue(r, row, 0));
            rv = P11KMS_ERR_INTERNAL;
            goto out;
        }
    }
    text_copy(d->id, sizeof(d->id), PQgetvalue(r, row, 0));
    text_copy(d->key, sizeof(d->key), PQgetvalue(r, row, 1));
    d->version = (uint32_t)v_int(r, row, 2);
    d->state = (kms_dek_state)state;
    d->created = v_int(r, row, 5);
    d->revoked_at = v_int(r, row, 6); /* NULL reads as 0 */
    d->revoke_reason = (kms_revoke_reason)reason;
    d->destroyed_at = v_int(r, row, 8);
    d->wrapped_len = (size_t)wlen;
    *out = d;
    d = NULL;
    rv = P11KMS_OK;
out:
    kms_dek_rec_free(d);
    return rv;
}

static p11kms_status pg_dek_get(kms_store *st, const char *id, kms_dek_rec **out)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    pg_params p = {0};
    PGresult *r;

    p_text(&p, id);
    r = read_rows(s, c, R_DEK_GET, &p);
    if (r == NULL)
        goto out;
    if (PQntuples(r) == 0) {
        rv = P11KMS_ERR_DEK_NOT_FOUND;
        goto out;
    }
    rv = dek_from_row(r, 0, out);
out:
    PQclear(r);
    reader_put(s, c);
    return rv;
}

/* The row id of key `name` on reader c.  KEY_NOT_FOUND. */
static p11kms_status reader_key_id(pg_store *s, pg_conn *c, const char *name, int64_t *key_id)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    pg_params p = {0};
    PGresult *r;

    p_text(&p, name);
    r = read_rows(s, c, R_KEY_ID, &p);
    if (r == NULL)
        goto out;
    rv = P11KMS_ERR_KEY_NOT_FOUND;
    if (PQntuples(r) == 0)
        goto out;
    *key_id = v_int(r, 0, 0);
    rv = P11KMS_OK;
out:
    PQclear(r);
    return rv;
}

/* Rows of PG_DEK_COLUMNS into an array of at most `limit` records. */
static p11kms_status read_deks(const PGresult *r, size_t limit, kms_dek_rec ***out, size_t *count)
{
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    size_t rows = (size_t)PQntuples(r), n = 0;
    kms_dek_rec **deks;

    if (rows > limit)
        rows = limit;
    deks = calloc(limit, sizeof(*deks));
    if (deks == NULL)
        goto out;
    for (n = 0; n < rows; n++) {
        rv = dek_from_row(r, (int)n, &deks[n]);
        if (rv != P11KMS_OK)
            goto out;
    }
    *out = deks;
    *count = n;
    deks = NULL;
    rv = P11KMS_OK;
out:
    kms_dek_list_free(deks, n);
    return rv;
}

static p11kms_status pg_dek_list(kms_store *st, const char *key, int state, const char *cursor,
                                 size_t limit, kms_dek_rec ***out, size_t *count, int *more)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;
    int64_t key_id = 0;

    rv = reader_key_id(s, c, key, &key_id);
    if (rv != P11KMS_OK)
        goto out;
    p_int(&p, key_id);
    p_text(&p, cursor);
    p_int(&p, (int64_t)limit + 1); /* one more: is there a next page? */
    if (state >= 0)
        p_text(&p, kms_dek_state_name((kms_dek_state)state));
    r = read_rows(s, c, state >= 0 ? R_DEK_LIST_STATE : R_DEK_LIST, &p);
    rv = P11KMS_ERR_STORE_UNAVAILABLE;
    if (r == NULL)
        goto out;
    rv = read_deks(r, limit, out, count);
    if (rv == P11KMS_OK)
        *more = (size_t)PQntuples(r) > limit;
out:
    PQclear(r);
    reader_put(s, c);
    return rv;
}

static p11kms_status pg_token_ids(kms_store *st, int destroyed_only,
                                  unsigned char (**ids)[KMS_TOKEN_ID_LEN], size_t *count)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    unsigned char(*arr)[KMS_TOKEN_ID_LEN] = NULL;
    PGresult *r = read_rows(s, c, destroyed_only ? R_TOKEN_IDS_DESTROYED : R_TOKEN_IDS, NULL);
    int rows;

    if (r == NULL)
        goto out;
    rows = PQntuples(r);
    rv = P11KMS_ERR_NO_MEMORY;
    arr = calloc(rows > 0 ? (size_t)rows : 1, sizeof(*arr));
    if (arr == NULL)
        goto out;
    for (int i = 0; i < rows; i++) {
        if (v_bytes(r, i, 0, arr[i], KMS_TOKEN_ID_LEN) != KMS_TOKEN_ID_LEN) {
            LOG_ERROR("store", "a key_versions row has a malformed token_id");
            rv = P11KMS_ERR_INTERNAL;
            goto out;
        }
    }
    *ids = arr;
    *count = (size_t)rows;
    arr = NULL;
    rv = P11KMS_OK;
out:
    PQclear(r);
    reader_put(s, c);
    free(arr);
    return rv;
}

static p11kms_status pg_rewrap_read(kms_store *st, const char *name, uint32_t below_version,
                                    const char *cursor, size_t limit, kms_dek_rec ***out,
                                    size_t *count)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;
    int64_t key_id = 0;

    rv = reader_key_id(s, c, name, &key_id);
    if (rv != P11KMS_OK)
        goto out;
    p_int(&p, key_id);
    p_text(&p, cursor);
    p_int(&p, below_version);
    p_int(&p, (int64_t)limit);
    r = read_rows(s, c, R_REWRAP_READ, &p);
    rv = P11KMS_ERR_STORE_UNAVAILABLE;
    if (r == NULL)
        goto out;
    rv = read_deks(r, limit, out, count);
out:
    PQclear(r);
    reader_put(s, c);
    return rv;
}

static p11kms_status pg_rewrap_remaining(kms_store *st, const char *name, uint32_t below_version,
                                         uint64_t *count)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv;
    pg_params p = {0};
    PGresult *r = NULL;
    int64_t key_id = 0;

    rv = reader_key_id(s, c, name, &key_id);
    if (rv != P11KMS_OK)
        goto out;
    p_int(&p, key_id);
    p_int(&p, below_version);
    r = read_rows(s, c, R_REWRAP_REMAINING, &p);
    rv = P11KMS_ERR_STORE_UNAVAILABLE;
    if (r == NULL || PQntuples(r) != 1)
        goto out;
    *count = (uint64_t)v_int(r, 0, 0);
    rv = P11KMS_OK;
out:
    PQclear(r);
    reader_put(s, c);
    return rv;
}

static p11kms_status pg_rotation_due(kms_store *st, int64_t now, kms_rotation_due **out,
                                     size_t *count)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    kms_rotation_due *arr = NULL;
    pg_params p = {0};
    PGresult *r;
    int rows;

    p_int(&p, now);
    r = read_rows(s, c, R_ROTATION_DUE, &p);
    if (r == NULL)
        goto out;
    rows = PQntuples(r);
    rv = P11KMS_ERR_NO_MEMORY;
    arr = calloc(rows > 0 ? (size_t)rows : 1, sizeof(*arr));
    if (arr == NULL)
        goto out;
    for (int i = 0; i < rows; i++) {
        text_copy(arr[i].name, sizeof(arr[i].name), PQgetvalue(r, i, 0));
        arr[i].latest_version = (uint32_t)v_int(r, i, 1);
    }
    *out = arr;
    *count = (size_t)rows;
    arr = NULL;
    rv = P11KMS_OK;
out:
    PQclear(r);
    reader_put(s, c);
    free(arr);
    return rv;
}

static p11kms_status pg_kek_intents(kms_store *st, int64_t older_than, kms_kek_intent **list,
                                    size_t *count)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    kms_kek_intent *arr = NULL;
    pg_params p = {0};
    PGresult *r;
    int rows;

    p_int(&p, older_than);
    r = read_rows(s, c, R_INTENTS, &p);
    if (r == NULL)
        goto out;
    rows = PQntuples(r);
    rv = P11KMS_ERR_NO_MEMORY;
    arr = calloc(rows > 0 ? (size_t)rows : 1, sizeof(*arr));
    if (arr == NULL)
        goto out;
    for (int i = 0; i < rows; i++) {
        if (v_bytes(r, i, 0, arr[i].token_id, KMS_TOKEN_ID_LEN) != KMS_TOKEN_ID_LEN) {
            LOG_ERROR("store", "a kek_intents row has a malformed token_id");
            rv = P11KMS_ERR_INTERNAL;
            goto out;
        }
        text_copy(arr[i].key_name, sizeof(arr[i].key_name), PQgetvalue(r, i, 1));
        arr[i].version = (uint32_t)v_int(r, i, 2);
        arr[i].created = v_int(r, i, 3);
    }
    *list = rows > 0 ? arr : NULL;
    *count = (size_t)rows;
    if (rows > 0)
        arr = NULL;
    rv = P11KMS_OK;
out:
    PQclear(r);
    reader_put(s, c);
    free(arr);
    return rv;
}

/* ---- writes ------------------------------------------------------------- */

static p11kms_status pg_kek_intent_add(kms_store *st,
                                       const unsigned char token_id[KMS_TOKEN_ID_LEN],
                                       const char *key_name, uint32_t version, int64_t now)
{
    kms_write w = {.type = KMS_WRITE_INTENT_ADD};

    w.u.intent.token_id = token_id;
    w.u.intent.key_name = key_name;
    w.u.intent.version = version;
    w.u.intent.now = now;
    return kms_gc_submit(pg_of(st)->gc, &w);
}

static p11kms_status pg_kek_intent_remove(kms_store *st,
                                          const unsigned char token_id[KMS_TOKEN_ID_LEN])
{
    kms_write w = {.type = KMS_WRITE_INTENT_REMOVE};

    w.u.intent.token_id = token_id;
    return kms_gc_submit(pg_of(st)->gc, &w);
}

static p11kms_status pg_key_create(kms_store *st, const char *name,
                                   const unsigned char token_id[KMS_TOKEN_ID_LEN], int64_t now)
{
    kms_write w = {.type = KMS_WRITE_KEY_CREATE};

    w.u.key_create.name = name;
    w.u.key_create.token_id = token_id;
    w.u.key_create.now = now;
    return kms_gc_submit(pg_of(st)->gc, &w);
}

static p11kms_status pg_dek_insert(kms_store *st, const kms_dek_rec *dek, uint64_t max_wraps,
                                   int *refused)
{
    kms_write w = {.type = KMS_WRITE_DEK_INSERT};
    p11kms_status rv;

    w.u.dek_insert.dek = dek;
    w.u.dek_insert.max_wraps = max_wraps;
    rv = kms_gc_submit(pg_of(st)->gc, &w);
    if (rv == P11KMS_OK && refused != NULL)
        *refused = w.u.dek_insert.refused;
    return rv;
}

static p11kms_status pg_version_add(kms_store *st, const char *name, uint32_t expected_latest,
                                    const unsigned char token_id[KMS_TOKEN_ID_LEN], int64_t now,
                                    uint32_t *added)
{
    kms_write w = {.type = KMS_WRITE_VERSION_ADD};
    p11kms_status rv;

    w.u.version_add.name = name;
    w.u.version_add.expected_latest = expected_latest;
    w.u.version_add.token_id = token_id;
    w.u.version_add.now = now;
    rv = kms_gc_submit(pg_of(st)->gc, &w);
    if (rv == P11KMS_OK)
        *added = w.u.version_add.added;
    return rv;
}

static p11kms_status pg_key_set_state(kms_store *st, const char *name, kms_key_state state)
{
    kms_write w = {.type = KMS_WRITE_KEY_SET_STATE};

    w.u.key_meta.name = name;
    w.u.key_meta.state = state;
    return kms_gc_submit(pg_of(st)->gc, &w);
}

static p11kms_status pg_key_config(kms_store *st, const char *name, uint32_t min_decrypt_version,
                                   int64_t rotation_period)
{
    kms_write w = {.type = KMS_WRITE_KEY_CONFIG};

    w.u.key_meta.name = name;
    w.u.key_meta.min_decrypt_version = min_decrypt_version;
    w.u.key_meta.rotation_period = rotation_period;
    return kms_gc_submit(pg_of(st)->gc, &w);
}

static p11kms_status pg_rewrap_commit(kms_store *st, const char *name, uint32_t new_version,
                                      const kms_rewrap_item *items, size_t n, uint64_t *updated)
{
    kms_write w = {.type = KMS_WRITE_REWRAP};
    p11kms_status rv;

    w.u.rewrap.name = name;
    w.u.rewrap.new_version = new_version;
    w.u.rewrap.items = items;
    w.u.rewrap.n = n;
    rv = kms_gc_submit(pg_of(st)->gc, &w);
    if (rv == P11KMS_OK)
        *updated = w.u.rewrap.updated;
    return rv;
}

static p11kms_status pg_version_retire(kms_store *st, const char *name, uint32_t version,
                                       int64_t now)
{
    kms_write w = {.type = KMS_WRITE_VERSION_RETIRE};

    w.u.retire.name = name;
    w.u.retire.version = version;
    w.u.retire.now = now;
    return kms_gc_submit(pg_of(st)->gc, &w);
}

static p11kms_status dek_state_submit(kms_store *st, kms_write *w, uint64_t *count)
{
    p11kms_status rv = kms_gc_submit(pg_of(st)->gc, w);

    if (rv == P11KMS_OK && count != NULL)
        *count = w->u.dek_state.count;
    return rv;
}

static p11kms_status pg_dek_revoke(kms_store *st, const char *id, kms_revoke_reason reason,
                                   int64_t now)
{
    kms_write w = {.type = KMS_WRITE_DEK_REVOKE};

    w.u.dek_state.id = id;
    w.u.dek_state.reason = reason;
    w.u.dek_state.now = now;
    return dek_state_submit(st, &w, NULL);
}

static p11kms_status pg_dek_destroy(kms_store *st, const char *id, int64_t now)
{
    kms_write w = {.type = KMS_WRITE_DEK_DESTROY};

    w.u.dek_state.id = id;
    w.u.dek_state.now = now;
    return dek_state_submit(st, &w, NULL);
}

static p11kms_status pg_dek_revoke_bulk(kms_store *st, const char *key, const char *filter,
                                        kms_revoke_reason reason, int64_t now, uint64_t *count)
{
    kms_write w = {.type = KMS_WRITE_DEK_REVOKE};

    w.u.dek_state.key = key;
    w.u.dek_state.filter = filter;
    w.u.dek_state.reason = reason;
    w.u.dek_state.now = now;
    return dek_state_submit(st, &w, count);
}

static p11kms_status pg_dek_destroy_bulk(kms_store *st, const char *key, const char *filter,
                                         int64_t now, uint64_t *count)
{
    kms_write w = {.type = KMS_WRITE_DEK_DESTROY};

    w.u.dek_state.key = key;
    w.u.dek_state.filter = filter;
    w.u.dek_state.now = now;
    return dek_state_submit(st, &w, count);
}

/* ---- audit reads ---- */

static kms_gc *pg_writer(kms_store *st)
{
    return pg_of(st)->gc;
}

static void text_col(const PGresult *r, int row, int col, char *dst, size_t cap)
{
    text_copy(dst, cap, PQgetisnull(r, row, col) ? "" : PQgetvalue(r, row, col));
}

static void hash_col(const PGresult *r, int row, int col, unsigned char *dst, size_t len)
{
    memset(dst, 0, len);
    if (v_bytes(r, row, col, dst, len) != (long)len)
        memset(dst, 0, len);
}

static p11kms_status pg_audit_list(kms_store *st, uint64_t after, size_t limit,
                                   kms_audit_entry **out, size_t *count)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    kms_audit_entry *arr = NULL;
    pg_params p = {0};
    PGresult *r;
    size_t n;

    p_int(&p, (int64_t)after);
    p_int(&p, (int64_t)limit);
    r = read_rows(s, c, R_AUDIT_LIST, &p);
    if (r == NULL)
        goto out;
    n = (size_t)PQntuples(r);
    if (n > limit)
        n = limit;
    rv = P11KMS_ERR_NO_MEMORY;
    arr = calloc(limit, sizeof(*arr));
    if (arr == NULL)
        goto out;
    for (size_t i = 0; i < n; i++) {
        kms_audit_entry *e = &arr[i];
        int row = (int)i, result = kms_audit_result_parse(PQgetvalue(r, row, 7));
        unsigned char principal[KMS_AUDIT_PRINCIPAL_MAX];
        long plen = v_bytes(r, row, 2, principal, sizeof(principal));

        /* An edited row is returned as read (verification judges it). */
        e->seq = (uint64_t)v_int(r, row, 0);
        e->time = v_int(r, row, 1);
        if (plen > 0)
            memcpy(e->principal, principal, (size_t)plen);
        text_col(r, row, 3, e->operation, sizeof(e->operation));
        text_col(r, row, 4, e->key, sizeof(e->key));
        e->version = (uint32_t)v_int(r, row, 5);
        text_col(r, row, 6, e->dek_id, sizeof(e->dek_id));
        e->result = result >= 0 ? (kms_audit_result)result : KMS_AUDIT_ERROR;
        text_col(r, row, 8, e->error_code, sizeof(e->error_code));
        hash_col(r, row, 9, e->prev_hash, sizeof(e->prev_hash));
        hash_col(r, row, 10, e->hash, sizeof(e->hash));
        e->has_mac = !PQgetisnull(r, row, 11);
        hash_col(r, row, 11, e->mac, sizeof(e->mac));
    }
    *out = arr;
    *count = n;
    arr = NULL;
    rv = P11KMS_OK;
out:
    PQclear(r);
    reader_put(s, c);
    free(arr);
    return rv;
}

static p11kms_status pg_audit_head(kms_store *st, kms_audit_head *out)
{
    pg_store *s = pg_of(st);
    pg_conn *c = reader_get(s);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    PGresult *r = read_rows(s, c, R_AUDIT_HEAD, NULL);

    memset(out, 0, sizeof(*out));
    if (r != NULL) {
        if (PQntuples(r) > 0) {
            out->present = 1;
            out->seq = (uint64_t)v_int(r, 0, 0);
            hash_col(r, 0, 1, out->hash, sizeof(out->hash));
        }
        rv = P11KMS_OK;
    }
    PQclear(r);
    reader_put(s, c);
    return rv;
}

static void pg_stats(kms_store *st, kms_store_stats_ex *out)
{
    kms_gc_stats(pg_of(st)->gc, out);
}

static const kms_store_ops pg_ops = {
    .backend = "postgres",
    .close = pg_close,
    .ping = pg_ping,
    .counts = pg_counts,
    .key_create = pg_key_create,
    .key_get = pg_key_get,
    .key_get_meta = pg_key_get_meta,
    .key_list = pg_key_list,
    .dek_insert = pg_dek_insert,
    .dek_get = pg_dek_get,
    .dek_revoke = pg_dek_revoke,
    .dek_destroy = pg_dek_destroy,
    .dek_revoke_bulk = pg_dek_revoke_bulk,
    .dek_destroy_bulk = pg_dek_destroy_bulk,
    .dek_list = pg_dek_list,
    .token_ids = pg_token_ids,
    .version_add = pg_version_add,
    .key_set_state = pg_key_set_state,
    .key_config = pg_key_config,
    .rewrap_read = pg_rewrap_read,
    .rewrap_remaining = pg_rewrap_remaining,
    .rewrap_commit = pg_rewrap_commit,
    .version_retire = pg_version_retire,
    .rotation_due = pg_rotation_due,
    .kek_intent_add = pg_kek_intent_add,
    .kek_intents = pg_kek_intents,
    .kek_intent_remove = pg_kek_intent_remove,
    .writer = pg_writer,
    .audit_list = pg_audit_list,
    .audit_head = pg_audit_head,
    .stats = pg_stats,
};
