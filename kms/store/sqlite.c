/*
 * kms/store/sqlite.c - the SQLite backend of the store (store.h).
 *
 * Owns one SQLite database file and its connections:
 *  - the writer connection, used at open (PRAGMAs, migrations) and then
 *    only by the group-commit writer thread (groupcommit.c) through the
 *    sq_gc_* callbacks: BEGIN IMMEDIATE, one SAVEPOINT per write, COMMIT;
 *  - SQ_READERS read-only connections in a pool (free list under pool_mu,
 *    pool_cv signalled when one comes back).  A reader is used by one
 *    thread at a time; in WAL mode it never waits for the writer.
 * Every connection prepares its statements once, at open, and reuses
 * them (reset after each use).  Connections are opened with
 * SQLITE_OPEN_NOMUTEX: the pool and the writer thread guarantee that no
 * connection is used by two threads at once.
 *
 * The writer connection runs with journal_mode=WAL, synchronous=FULL (a
 * commit returns after the WAL is fsynced), no automatic checkpoint (a
 * thread of its own does them: sqlite_ckpt.c), secure_delete=ON,
 * foreign_keys=ON, trusted_schema=OFF and a busy timeout.  The database
 * file is created mode 0600 by open(2) before SQLite sees it (no umask
 * games in a threaded process); SQLite gives the -wal and -shm files the
 * same mode.
 *
 * Errors: constraint failures become the specific status of the write
 * (KEY_EXISTS, KEY_NOT_FOUND, ...); any other SQLite error is logged with
 * SQLite's message and becomes P11KMS_ERR_STORE_UNAVAILABLE.  Bound values
 * (wrapped bytes, contexts) never reach the log.
 *
 * Destroy (one DEK or in bulk) sets wrapped = NULL: with secure_delete the
 * old cell is overwritten with zeros in its page.  The page is first
 * written to the WAL, whose earlier frames still hold the wrapped bytes,
 * so right after a group that destroyed something commits, the writer runs
 * a truncating WAL checkpoint (every frame copied into the database file,
 * the WAL truncated to zero bytes) before it wakes the callers.  A reader
 * in the middle of a read blocks the checkpoint: the writer waits a little
 * (SQ_CKPT_TRIES x SQ_CKPT_WAIT_MS), then logs a warning and tries again,
 * once and without waiting, after each later commit until it succeeds
 * (wipe_pending stays set), so a long reader does not slow every commit.
 *
 * Key rotation (issue 3): a new version is inserted only if the key's
 * latest_version is still the one the caller read (compare-and-set in the
 * writer's transaction); a rewrap batch moves each DEK only if it is
 * still on the version it was read on with its wrapped bytes present; a
 * retire re-checks "no live DEK on the version, not the latest" in the
 * transaction that marks it destroyed; a DEK insert counts its wrap only
 * on an active version below the wrap cap.
 *
 * KEK creation intents (kek_intents): written and deleted through the
 * writer like every write; the key-create and version-add writes delete
 * the intent of their token_id in their own transaction.
 *
 * When a group fails in the store (SQLITE_FULL, SQLITE_BUSY past the busy
 * timeout, an I/O error such as a read-only file), the group-commit writer
 * refuses writes until sq_gc_probe commits: one counter in store_probe
 * (schema 5) incremented in its own transaction, so the probe writes a WAL
 * frame and fails as long as the disk is full or the file cannot be
 * written (an empty transaction would commit without touching the disk).
 * sq_ping (GET /v1/health) reports the store unavailable meanwhile.
 *
 * Locking: pool_mu guards the reader free list; the
 * checkpoint counters are atomic; wipe_pending and wipe_new are the
 * writer thread's own.  Nothing else is shared and mutable after open.
 */
#include "kms/store/store_internal.h"
#include "kms/store/sqlite_ckpt.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "module/log.h"

#define SQ_READERS         8
#define SQ_BUSY_TIMEOUT_MS 5000
#define SQ_CKPT_TRIES      5   /* truncating checkpoint attempts after a destroy */
#define SQ_CKPT_WAIT_MS    100 /* busy wait per attempt */
#define SQ_RESTART_WAIT_MS 5   /* wal_restart: wait this long for readers */
#define SQ_PING_WAIT_MS    500 /* health: wait this long for a probe while failing */

/* ---- statements --------------------------------------------------------- */

enum {
    W_BEGIN,
    W_COMMIT,
    W_ROLLBACK,
    W_SAVEPOINT,
    W_RELEASE,
    W_ROLLBACK_TO,
    W_KEY_INSERT,
    W_VERSION_INSERT,
    W_WRAP_COUNT,
    W_DEK_INSERT,
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
    W_AUDIT_HEAD_GET,
    W_AUDIT_LAST,
    W_AUDIT_INSERT,
    W_AUDIT_SEAL,
    W_AUDIT_HEAD_SET,
    W_AUDIT_KEY_GET,
    W_AUDIT_KEY_PUT,
    W_INTENT_ADD,
    W_INTENT_DEL,
    W_PROBE,
    W_COUNT
};

/* "the DEK's context holds every pair of the filter ?2" (JSON1). */
#define SQ_CONTEXT_HOLDS_FILTER                                                                    \
    "NOT EXISTS (SELECT 1 FROM json_each(?2) f WHERE NOT EXISTS ("                                 \
    "SELECT 1 FROM json_each(deks.context) c WHERE c.key = f.key AND c.value = f.value))"

static const char *const writer_sql[W_COUNT] = {
    [W_BEGIN] = "BEGIN IMMEDIATE",
    [W_COMMIT] = "COMMIT",
    [W_ROLLBACK] = "ROLLBACK",
    [W_SAVEPOINT] = "SAVEPOINT w",
    [W_RELEASE] = "RELEASE w",
    [W_ROLLBACK_TO] = "ROLLBACK TO w",
    [W_KEY_INSERT] = "INSERT INTO keys (name, state, latest_version, min_decrypt_version, "
                     "rotation_period, created) VALUES (?1, 'enabled', 1, 1, 0, ?2)",
    [W_VERSION_INSERT] = "INSERT INTO key_versions (key_id, version, state, token_id, created, "
                         "wrap_count) VALUES (?1, 1, 'active', ?2, ?3, 0)",
    /* Count a wrap only on an active version below its cap (?3): the
     * check and the count are one statement of the writer's transaction. */
    [W_WRAP_COUNT] = "UPDATE key_versions SET wrap_count = wrap_count + 1 "
                     "WHERE key_id = (SELECT id FROM keys WHERE name = ?1) AND version = ?2 "
                     "AND state = 'active' AND wrap_count < ?3",
    [W_DEK_INSERT] = "INSERT INTO deks (id, key_id, version, state, context, wrapped, created) "
                     "SELECT ?1, id, ?3, 'active', ?4, ?5, ?6 FROM keys WHERE name = ?2",
    [W_KEY_ID] = "SELECT id FROM keys WHERE name = ?1",
    [W_DEK_STATE] = "SELECT state FROM deks WHERE id = ?1",
    [W_DEK_REVOKE] = "UPDATE deks SET state = 'revoked', revoked_at = ?2, revoke_reason = ?3 "
                     "WHERE id = ?1 AND state = 'active'",
    [W_DEK_DESTROY] = "UPDATE deks SET state = 'destroyed', wrapped = NULL, destroyed_at = ?2 "
                      "WHERE id = ?1 AND state IN ('active', 'revoked')",
    [W_BULK_REVOKE] = "UPDATE deks SET state = 'revoked', revoked_at = ?3, revoke_reason = ?4 "
                      "WHERE key_id = ?1 AND state = 'active' AND " SQ_CONTEXT_HOLDS_FILTER,
    [W_BULK_DESTROY] =
        "UPDATE deks SET state = 'destroyed', wrapped = NULL, destroyed_at = ?3 "
        "WHERE key_id = ?1 AND state IN ('active', 'revoked') AND " SQ_CONTEXT_HOLDS_FILTER,
    /* Key rotation (issue 3). */
    [W_KEY_LATEST] = "SELECT id, latest_version FROM keys WHERE name = ?1",
    [W_VERSION_ADD] = "INSERT INTO key_versions (key_id, version, state, token_id, created, "
                      "wrap_count) VALUES (?1, ?2, 'active', ?3, ?4, 0)",
    [W_KEY_SET_LATEST] = "UPDATE keys SET latest_version = ?2 WHERE id = ?1 AND latest_version = ?3",
    [W_KEY_SET_STATE] = "UPDATE keys SET state = ?2 WHERE name = ?1",
    [W_KEY_SET_MIN] = "UPDATE keys SET min_decrypt_version = ?2 WHERE id = ?1",
    [W_KEY_SET_PERIOD] = "UPDATE keys SET rotation_period = ?2 WHERE id = ?1",
    [W_VERSION_STATE] = "SELECT state = 'active' FROM key_versions WHERE key_id = ?1 AND version = ?2",
    [W_VERSION_EXISTS] = "SELECT 1 FROM key_versions "
                         "WHERE key_id = (SELECT id FROM keys WHERE name = ?1) AND version = ?2",
    [W_VERSION_BUMP] = "UPDATE key_versions SET wrap_count = wrap_count + ?3 "
                       "WHERE key_id = ?1 AND version = ?2 AND state = 'active'",
    [W_VERSION_LIVE] = "SELECT EXISTS (SELECT 1 FROM deks WHERE key_id = ?1 AND version = ?2 "
                       "AND state IN ('active', 'revoked'))",
    [W_VERSION_DESTROY] = "UPDATE key_versions SET state = 'destroyed', destroyed_at = ?3 "
                          "WHERE key_id = ?1 AND version = ?2 AND state = 'active'",
    /* A rewrapped DEK moves only if unchanged since it was read. */
    [W_DEK_REWRAP] = "UPDATE deks SET version = ?2, wrapped = ?3 WHERE id = ?1 AND key_id = ?5 "
                     "AND version = ?4 AND wrapped IS NOT NULL",
    /* The audit log (issue 5): BEGIN IMMEDIATE is the audit lock. */
    [W_AUDIT_HEAD_GET] = "SELECT seq, hash FROM audit_head WHERE id = 1",
    [W_AUDIT_LAST] = "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
    [W_AUDIT_INSERT] = "INSERT INTO audit (seq, time, principal, operation, key, version, dek_id, "
                       "result, error_code, prev_hash, hash, mac) "
                       "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL)",
    [W_AUDIT_SEAL] = "UPDATE audit SET mac = ?2 WHERE seq = ?1",
    [W_AUDIT_HEAD_SET] = "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?1, ?2) "
                         "ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
    [W_AUDIT_KEY_GET] = "SELECT token_id FROM audit_key WHERE id = 1",
    [W_AUDIT_KEY_PUT] = "INSERT INTO audit_key (id, token_id, created) VALUES (1, ?1, ?2)",
    /* KEK creation intents. */
    [W_INTENT_ADD] = "INSERT OR REPLACE INTO kek_intents (token_id, key_name, version, created) "
                     "VALUES (?1, ?2, ?3, ?4)",
    [W_INTENT_DEL] = "DELETE FROM kek_intents WHERE token_id = ?1",
    [W_PROBE] = "INSERT INTO store_probe (id, n) VALUES (1, 1) "
                "ON CONFLICT (id) DO UPDATE SET n = n + 1",
};

/* Key rows joined with their versions and live DEK counts (one statement:
 * one consistent snapshot). */
#define SQ_KEY_COLUMNS                                                                             \
    "SELECT k.name, k.state, k.latest_version, k.min_decrypt_version, k.rotation_period, "         \
    "k.created, v.version, v.state, v.token_id, v.created, v.wrap_count, "                         \
    "(SELECT count(*) FROM deks d WHERE d.key_id = v.key_id AND d.version = v.version "            \
    "AND d.state IN ('active', 'revoked')) "                                                       \
    "FROM keys k JOIN key_versions v ON v.key_id = k.id "

/* The same columns without the DEK counts: the hot path of generate and
 * decrypt reads a key in a few primary-key lookups. */
#define SQ_KEY_META_COLUMNS                                                                        \
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

/* DEK columns read by dek_from_row; the last one is the wrapped bytes
 * (NULL in listings, which never read them). */
#define SQ_DEK_COLUMNS                                                                             \
    "SELECT d.id, k.name, d.version, d.state, d.context, d.created, d.revoked_at, "                \
    "d.revoke_reason, d.destroyed_at, "
#define SQ_DEK_COL_WRAPPED 9

static const char *const reader_sql[R_COUNT] = {
    [R_PING] = "SELECT coalesce(max(version), 0) FROM schema_version",
    [R_KEY_GET] = SQ_KEY_COLUMNS "WHERE k.name = ?1 ORDER BY v.version",
    [R_KEY_META] = SQ_KEY_META_COLUMNS "WHERE k.name = ?1 ORDER BY v.version",
    [R_KEY_LIST] = SQ_KEY_COLUMNS "ORDER BY k.name, v.version",
    [R_DEK_GET] = SQ_DEK_COLUMNS "d.wrapped FROM deks d JOIN keys k ON k.id = d.key_id "
                                 "WHERE d.id = ?1",
    [R_TOKEN_IDS] = "SELECT token_id FROM key_versions ORDER BY key_id, version",
    [R_KEY_ID] = "SELECT id FROM keys WHERE name = ?1",
    /* Cursor pagination: deks_by_key (key_id, id) and deks_by_state
     * (key_id, state, id) deliver the rows in id order from the cursor;
     * one row more than asked tells whether another page follows. */
    [R_DEK_LIST] = SQ_DEK_COLUMNS "NULL FROM deks d JOIN keys k ON k.id = d.key_id "
                                  "WHERE d.key_id = ?1 AND d.id > ?2 ORDER BY d.id LIMIT ?3",
    [R_DEK_LIST_STATE] = SQ_DEK_COLUMNS "NULL FROM deks d JOIN keys k ON k.id = d.key_id "
                                        "WHERE d.key_id = ?1 AND d.state = ?4 AND d.id > ?2 "
                                        "ORDER BY d.id LIMIT ?3",
    [R_TOKEN_IDS_DESTROYED] = "SELECT token_id FROM key_versions WHERE state = 'destroyed' "
                              "ORDER BY key_id, version",
    /* A rewrap batch: one pass over the key's DEKs in id order from the
     * cursor (deks_by_key), so a whole rewrap is one walk over the key. */
    [R_REWRAP_READ] = SQ_DEK_COLUMNS "d.wrapped FROM deks AS d INDEXED BY deks_by_key "
                                     "JOIN keys k ON k.id = d.key_id "
                                     "WHERE d.key_id = ?1 AND d.id > ?2 AND d.version < ?3 "
                                     "AND d.state IN ('active', 'revoked') "
                                     "ORDER BY d.id LIMIT ?4",
    [R_REWRAP_REMAINING] = "SELECT count(*) FROM deks WHERE key_id = ?1 AND version < ?2 "
                           "AND state IN ('active', 'revoked')",
    [R_ROTATION_DUE] = "SELECT k.name, k.latest_version FROM keys k JOIN key_versions v "
                       "ON v.key_id = k.id AND v.version = k.latest_version "
                       "WHERE k.state = 'enabled' AND k.rotation_period > 0 "
                       "AND v.created + k.rotation_period <= ?1 ORDER BY k.name",
    [R_AUDIT_LIST] = "SELECT seq, time, principal, operation, key, version, dek_id, result, "
                     "error_code, prev_hash, hash, mac FROM audit WHERE seq > ?1 "
                     "ORDER BY seq LIMIT ?2",
    [R_AUDIT_HEAD] = "SELECT seq, hash FROM audit_head WHERE id = 1",
    [R_COUNTS] = "SELECT (SELECT count(*) FROM keys), "
                 "coalesce(sum(state = 'active'), 0), coalesce(sum(state = 'revoked'), 0), "
                 "coalesce(sum(state = 'destroyed'), 0) FROM deks",
    [R_INTENTS] = "SELECT token_id, key_name, version, created FROM kek_intents "
                  "WHERE created <= ?1 ORDER BY created, token_id",
};

/* ---- types -------------------------------------------------------------- */

#define SQ_MAX_STMT ((int)W_COUNT > (int)R_COUNT ? (int)W_COUNT : (int)R_COUNT)

typedef struct sq_conn {
    sqlite3 *db;
    sqlite3_stmt *stmt[SQ_MAX_STMT];
    size_t n_stmt;
    struct sq_conn *next_free;
} sq_conn;

typedef struct sq_store {
    kms_store base; /* first: a kms_store * is an sq_store * */
    char *path;
    sq_conn writer;
    sq_conn readers[SQ_READERS];
    pthread_mutex_t pool_mu;
    pthread_cond_t pool_cv;
    sq_conn *free_readers;
    int pool_ok;
    kms_gc *gc;
    sq_ckpt *ckpt;    /* WAL checkpoints off the writer (sqlite_ckpt.c) */
    int wipe_pending; /* writer thread only: destroyed bytes may be in the WAL */
    int wipe_new;     /* writer thread only: this group destroyed something */
    atomic_uint_fast64_t wal_truncations;
    atomic_uint_fast64_t wal_truncate_busy;
    atomic_uint_fast64_t wal_restarts;
    atomic_uint_fast64_t wal_restart_busy;
    int restart_retry_at; /* writer thread only: WAL pages at which a blocked restart retries */
    kms_sqlite_pragmas pragmas;
} sq_store;

static const kms_store_ops sq_ops;

static sq_store *sq_of(kms_store *st)
{
    return (sq_store *)st;
}

/* ---- helpers ------------------------------------------------------------ */

/* Log an SQLite failure on db and return STORE_UNAVAILABLE. */
#define SQ_FAIL(db, rc, what) sq_fail((db), (rc), (what), __FILE__, __LINE__, __func__)

static p11kms_status sq_fail(sqlite3 *db, int rc, const char *what, const char *file, int line,
                             const char *func)
{
    p11_log_write(P11_LOG_ERROR, "store", file, line, func, "sqlite: %s: %s (%s, code %d)", what,
                  db != NULL ? sqlite3_errmsg(db) : "no connection", sqlite3_errstr(rc), rc);
    return P11KMS_ERR_STORE_UNAVAILABLE;
}

static int is_constraint(int rc)
{
    return (rc & 0xff) == SQLITE_CONSTRAINT;
}

/* Step a statement that returns no rows, then reset it. */
static int step_done(sqlite3_stmt *s)
{
    int rc = sqlite3_step(s);

    sqlite3_reset(s);
    sqlite3_clear_bindings(s);
    return rc == SQLITE_ROW ? SQLITE_MISUSE : rc;
}

static void text_copy(char *dst, size_t cap, const unsigned char *src)
{
    size_t n = 0;

    if (src != NULL) {
        n = strlen((const char *)src);
        if (n >= cap)
            n = cap - 1;
        memcpy(dst, src, n);
    }
    dst[n] = '\0';
}

static void conn_close(sq_conn *c)
{
    int rc;

    for (size_t i = 0; i < c->n_stmt; i++) {
        sqlite3_finalize(c->stmt[i]);
        c->stmt[i] = NULL;
    }
    c->n_stmt = 0;
    if (c->db != NULL) {
        rc = sqlite3_close(c->db);
        if (rc != SQLITE_OK)
            LOG_ERROR("store", "sqlite: closing a connection: %s", sqlite3_errstr(rc));
        c->db = NULL;
    }
}

static p11kms_status conn_prepare(sq_conn *c, const char *const *sql, size_t n)
{
    p11kms_status rv = P11KMS_OK;
    int rc;

    for (size_t i = 0; i < n; i++) {
        rc = sqlite3_prepare_v3(c->db, sql[i], -1, SQLITE_PREPARE_PERSISTENT, &c->stmt[i], NULL);
        if (rc != SQLITE_OK) {
            rv = SQ_FAIL(c->db, rc, sql[i]);
            break;
        }
        c->n_stmt = i + 1;
    }
    return rv;
}

static p11kms_status pragma_int(sqlite3 *db, const char *sql, int *out)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    sqlite3_stmt *s = NULL;
    int rc;

    rc = sqlite3_prepare_v2(db, sql, -1, &s, NULL);
    if (rc != SQLITE_OK) {
        SQ_FAIL(db, rc, sql);
        goto out;
    }
    rc = sqlite3_step(s);
    if (rc != SQLITE_ROW) {
        SQ_FAIL(db, rc, sql);
        goto out;
    }
    *out = sqlite3_column_int(s, 0);
    rv = P11KMS_OK;
out:
    sqlite3_finalize(s);
    return rv;
}

static p11kms_status pragma_text(sqlite3 *db, const char *sql, char *out, size_t cap)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    sqlite3_stmt *s = NULL;
    int rc;

    rc = sqlite3_prepare_v2(db, sql, -1, &s, NULL);
    if (rc != SQLITE_OK) {
        SQ_FAIL(db, rc, sql);
        goto out;
    }
    rc = sqlite3_step(s);
    if (rc != SQLITE_ROW) {
        SQ_FAIL(db, rc, sql);
        goto out;
    }
    text_copy(out, cap, sqlite3_column_text(s, 0));
    rv = P11KMS_OK;
out:
    sqlite3_finalize(s);
    return rv;
}

static p11kms_status exec_simple(sqlite3 *db, const char *sql)
{
    int rc = sqlite3_exec(db, sql, NULL, NULL, NULL);

    return rc == SQLITE_OK ? P11KMS_OK : SQ_FAIL(db, rc, sql);
}

/* Create the file 0600 if missing and check it is a regular file. */
static p11kms_status precreate(const char *path)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    struct stat sb;
    int fd;

    fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOCTTY, S_IRUSR | S_IWUSR);
    if (fd < 0) {
        LOG_ERROR("store", "cannot open %s for writing: %s", path, strerror(errno));
        goto out;
    }
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        LOG_ERROR("store", "%s is not a regular file", path);
        goto out;
    }
    if ((sb.st_mode & (S_IRWXG | S_IRWXO)) != 0)
        LOG_WARN("store", "%s is accessible by group or others (mode %03o)", path,
                 (unsigned)(sb.st_mode & 0777));
    rv = P11KMS_OK;
out:
    if (fd >= 0)
        close(fd);
    return rv;
}

static p11kms_status open_writer(sq_store *s)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    sqlite3 *db = NULL;
    kms_sqlite_pragmas *p = &s->pragmas;
    int rc;

    rc = sqlite3_open_v2(s->path, &s->writer.db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX, NULL);
    db = s->writer.db;
    if (rc != SQLITE_OK) {
        SQ_FAIL(db, rc, "opening the database");
        goto out;
    }
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_timeout(db, SQ_BUSY_TIMEOUT_MS);
    if (sqlite3_db_readonly(db, "main") != 0) {
        LOG_ERROR("store", "%s is read-only", s->path);
        goto out;
    }
    if (exec_simple(db, "PRAGMA journal_mode = WAL") != P11KMS_OK ||
        exec_simple(db, "PRAGMA synchronous = FULL") != P11KMS_OK ||
        exec_simple(db, "PRAGMA secure_delete = ON") != P11KMS_OK ||
        exec_simple(db, "PRAGMA foreign_keys = ON") != P11KMS_OK ||
        exec_simple(db, "PRAGMA trusted_schema = OFF") != P11KMS_OK)
        goto out;
    /* Read back: the store's promises depend on them. */
    if (pragma_text(db, "PRAGMA journal_mode", p->journal_mode, sizeof(p->journal_mode)) !=
            P11KMS_OK ||
        pragma_int(db, "PRAGMA synchronous", &p->synchronous) != P11KMS_OK ||
        pragma_int(db, "PRAGMA secure_delete", &p->secure_delete) != P11KMS_OK ||
        pragma_int(db, "PRAGMA foreign_keys", &p->foreign_keys) != P11KMS_OK ||
        pragma_int(db, "PRAGMA busy_timeout", &p->busy_timeout_ms) != P11KMS_OK)
        goto out;
    if (strcmp(p->journal_mode, "wal") != 0 || p->synchronous != 2 || p->secure_delete != 1 ||
        p->foreign_keys != 1) {
        LOG_ERROR("store",
                  "%s: PRAGMAs did not take effect (journal_mode=%s synchronous=%d "
                  "secure_delete=%d foreign_keys=%d)",
                  s->path, p->journal_mode, p->synchronous, p->secure_delete, p->foreign_keys);
        goto out;
    }
    if (kms_sqlite_migrate(db) != P11KMS_OK)
        goto out;
    if (conn_prepare(&s->writer, writer_sql, W_COUNT) != P11KMS_OK)
        goto out;
    rv = P11KMS_OK;
out:
    return rv;
}

static p11kms_status open_reader(sq_store *s, sq_conn *c)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    int rc;

    rc = sqlite3_open_v2(s->path, &c->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_NOMUTEX, NULL);
    if (rc != SQLITE_OK) {
        SQ_FAIL(c->db, rc, "opening a reader");
        goto out;
    }
    sqlite3_extended_result_codes(c->db, 1);
    sqlite3_busy_timeout(c->db, SQ_BUSY_TIMEOUT_MS);
    if (exec_simple(c->db, "PRAGMA query_only = ON") != P11KMS_OK ||
        exec_simple(c->db, "PRAGMA trusted_schema = OFF") != P11KMS_OK)
        goto out;
    if (conn_prepare(c, reader_sql, R_COUNT) != P11KMS_OK)
        goto out;
    rv = P11KMS_OK;
out:
    return rv;
}

static sq_conn *reader_get(sq_store *s)
{
    sq_conn *c;

    pthread_mutex_lock(&s->pool_mu);
    while (s->free_readers == NULL)
        pthread_cond_wait(&s->pool_cv, &s->pool_mu);
    c = s->free_readers;
    s->free_readers = c->next_free;
    pthread_mutex_unlock(&s->pool_mu);
    return c;
}

static void reader_put(sq_store *s, sq_conn *c)
{
    if (c == NULL)
        return;
    for (size_t i = 0; i < c->n_stmt; i++) {
        sqlite3_reset(c->stmt[i]);
        sqlite3_clear_bindings(c->stmt[i]);
    }
    pthread_mutex_lock(&s->pool_mu);
    c->next_free = s->free_readers;
    s->free_readers = c;
    pthread_cond_signal(&s->pool_cv);
    pthread_mutex_unlock(&s->pool_mu);
}

/* ---- the writer (called on the writer thread only) ---------------------- */

static p11kms_status sq_gc_begin(void *ctx)
{
    sq_store *s = ctx;
    int rc = step_done(s->writer.stmt[W_BEGIN]);

    s->wipe_new = 0;
    if (rc != SQLITE_DONE)
        return SQ_FAIL(s->writer.db, rc, "BEGIN IMMEDIATE");
    return P11KMS_OK;
}

/* After a commit that destroyed wrapped bytes: copy every WAL frame into
 * the database file and truncate the WAL to zero bytes, so no earlier
 * frame holding them is left in either file.  Best effort: a busy reader
 * or writer is waited for briefly (patient: a destroy in this group), or
 * not at all (a retry for an earlier group), then the wipe stays pending. */
static void wal_truncate(sq_store *s, int patient)
{
    sqlite3 *db = s->writer.db;
    int rc = SQLITE_OK, log_frames = -1, ckpt_frames = -1;

    sqlite3_busy_timeout(db, patient ? SQ_CKPT_WAIT_MS : 0);
    for (int i = 0; i < (patient ? SQ_CKPT_TRIES : 1); i++) {
        rc = sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_TRUNCATE, &log_frames,
                                       &ckpt_frames);
        if ((rc & 0xff) != SQLITE_BUSY && (rc & 0xff) != SQLITE_LOCKED)
            break;
    }
    sqlite3_busy_timeout(db, SQ_BUSY_TIMEOUT_MS);
    if (rc == SQLITE_OK) {
        s->wipe_pending = 0;
        atomic_fetch_add(&s->wal_truncations, 1);
        LOG_DEBUG("store", "WAL checkpointed and truncated after a destroy (%d frames)",
                  ckpt_frames);
        return;
    }
    atomic_fetch_add(&s->wal_truncate_busy, 1);
    if (((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED) && !patient)
        LOG_DEBUG("store", "WAL truncation retry still blocked by a reader");
    else if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED)
        LOG_WARN("store",
                 "truncating WAL checkpoint after a destroy is blocked by a reader "
                 "(%d of %d frames copied); destroyed wrapped bytes may remain in %s-wal "
                 "until the next commit retries it",
                 ckpt_frames, log_frames, s->path);
    else
        SQ_FAIL(db, rc, "truncating WAL checkpoint after a destroy");
}

/* Keep the WAL from growing without bound under steady load (see
 * sqlite_ckpt.c): once it holds SQ_WAL_MAX_PAGES pages, copy what the
 * checkpoint thread has not copied yet and restart the WAL from its
 * start.  The writer pauses for that copy (0.8-3 ms, about once per
 * 64 MiB of WAL).  RESTART also waits for readers still on old frames:
 * up to SQ_RESTART_WAIT_MS, then it gives up and the writer tries again
 * only once the WAL has grown by another SQ_CKPT_PAGES, so a long reader
 * (a backup, an sqlite3 shell) costs the writer a few ms per 4 MiB of
 * WAL, not a wait per commit; the WAL grows meanwhile (SQLite cannot
 * restart it under a reader). */
static void wal_restart(sq_store *s, int pages)
{
    sqlite3 *db = s->writer.db;
    int rc, log_frames = -1, ckpt_frames = -1;

    sqlite3_busy_timeout(db, SQ_RESTART_WAIT_MS);
    rc = sqlite3_wal_checkpoint_v2(db, NULL, SQLITE_CHECKPOINT_RESTART, &log_frames, &ckpt_frames);
    sqlite3_busy_timeout(db, SQ_BUSY_TIMEOUT_MS);
    if (rc == SQLITE_OK) {
        s->restart_retry_at = 0;
        atomic_fetch_add(&s->wal_restarts, 1);
        return;
    }
    s->restart_retry_at = pages + SQ_CKPT_PAGES;
    if ((rc & 0xff) == SQLITE_BUSY || (rc & 0xff) == SQLITE_LOCKED) {
        atomic_fetch_add(&s->wal_restart_busy, 1);
        LOG_DEBUG("store", "WAL restart blocked by a reader (%d of %d frames copied)", ckpt_frames,
                  log_frames);
    } else {
        SQ_FAIL(db, rc, "restarting WAL checkpoint");
    }
}

/* After a commit: restart the WAL when it is full and no blocked attempt
 * is waiting for more growth. */
static void wal_bound(sq_store *s)
{
    int pages = sq_ckpt_wal_pages(s->ckpt);

    if (pages < SQ_WAL_MAX_PAGES)
        s->restart_retry_at = 0;
    else if (pages >= s->restart_retry_at)
        wal_restart(s, pages);
}

static p11kms_status sq_gc_commit(void *ctx)
{
    sq_store *s = ctx;
    int rc = step_done(s->writer.stmt[W_COMMIT]);

    if (rc != SQLITE_DONE)
        return SQ_FAIL(s->writer.db, rc, "COMMIT");
    if (s->wipe_pending)
        wal_truncate(s, s->wipe_new); /* before the callers wake: a destroy returns wiped */
    else
        wal_bound(s);
    s->wipe_new = 0;
    return P11KMS_OK;
}

static void sq_gc_rollback(void *ctx)
{
    sq_store *s = ctx;
    int rc;

    if (sqlite3_get_autocommit(s->writer.db))
        return; /* SQLite already rolled the transaction back */
    rc = step_done(s->writer.stmt[W_ROLLBACK]);
    if (rc != SQLITE_DONE)
        SQ_FAIL(s->writer.db, rc, "ROLLBACK");
}

/* Delete the intent of token_id (inside the writer's transaction). */
static p11kms_status intent_delete(sq_store *s, const unsigned char *token_id)
{
    sqlite3_stmt *del = s->writer.stmt[W_INTENT_DEL];
    int rc;

    sqlite3_bind_blob(del, 1, token_id, KMS_TOKEN_ID_LEN, SQLITE_STATIC);
    rc = step_done(del);
    if (rc != SQLITE_DONE)
        return SQ_FAIL(s->writer.db, rc, "deleting a KEK intent");
    return P11KMS_OK;
}

static p11kms_status apply_intent(sq_store *s, const kms_write *w)
{
    sqlite3_stmt *ins = s->writer.stmt[W_INTENT_ADD];
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    int rc;

    if (w->type == KMS_WRITE_INTENT_REMOVE) {
        rv = intent_delete(s, w->u.intent.token_id);
        goto out;
    }
    sqlite3_bind_blob(ins, 1, w->u.intent.token_id, KMS_TOKEN_ID_LEN, SQLITE_STATIC);
    sqlite3_bind_text(ins, 2, w->u.intent.key_name, -1, SQLITE_STATIC);
    sqlite3_bind_int64(ins, 3, w->u.intent.version);
    sqlite3_bind_int64(ins, 4, w->u.intent.now);
    rc = step_done(ins);
    if (is_constraint(rc)) {
        LOG_ERROR("store", "KEK intent refused: %s", sqlite3_errmsg(s->writer.db));
        rv = P11KMS_ERR_BAD_REQUEST;
        goto out;
    }
    if (rc != SQLITE_DONE) {
        rv = SQ_FAIL(s->writer.db, rc, "recording a KEK intent");
        goto out;
    }
    rv = P11KMS_OK;
out:
    return rv;
}

static p11kms_status apply_key_create(sq_store *s, const kms_write *w)
{
    sqlite3 *db = s->writer.db;
    sqlite3_stmt *ins = s->writer.stmt[W_KEY_INSERT];
    sqlite3_stmt *ver = s->writer.stmt[W_VERSION_INSERT];
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    sqlite3_int64 key_id;
    int rc;

    sqlite3_bind_text(ins, 1, w->u.key_create.name, -1, SQLITE_STATIC);
    sqlite3_bind_int64(ins, 2, w->u.key_create.now);
    rc = step_done(ins);
    if (rc == SQLITE_CONSTRAINT_UNIQUE || rc == SQLITE_CONSTRAINT_PRIMARYKEY) {
        rv = P11KMS_ERR_KEY_EXISTS;
        goto out;
    }
    if (is_constraint(rc)) {
        LOG_ERROR("store", "key row refused: %s", sqlite3_errmsg(db));
        rv = P11KMS_ERR_BAD_REQUEST;
        goto out;
    }
    if (rc != SQLITE_DONE) {
        rv = SQ_FAIL(db, rc, "inserting a key");
        goto out;
    }
    key_id = sqlite3_last_insert_rowid(db);
    sqlite3_bind_int64(ver, 1, key_id);
    sqlite3_bind_blob(ver, 2, w->u.key_create.token_id, KMS_TOKEN_ID_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(ver, 3, w->u.key_create.now);
    rc = step_done(ver);
    if (is_constraint(rc)) {
        /* A CKA_ID collision: 128 random bits, so a bug, not bad luck. */
        LOG_ERROR("store", "key version refused: %s", sqlite3_errmsg(db));
        rv = P11KMS_ERR_INTERNAL;
        goto out;
    }
    if (rc != SQLITE_DONE) {
        rv = SQ_FAIL(db, rc, "inserting a key version");
        goto out;
    }
    rv = intent_delete(s, w->u.key_create.token_id);
out:
    return rv;
}

static int step_int64(sqlite3_stmt *q, int *found, sqlite3_int64 *value);

static p11kms_status apply_dek_insert(sq_store *s, kms_write *w)
{
    sqlite3 *db = s->writer.db;
    const kms_dek_rec *d = w->u.dek_insert.dek;
    sqlite3_stmt *upd = s->writer.stmt[W_WRAP_COUNT];
    sqlite3_stmt *ins = s->writer.stmt[W_DEK_INSERT];
    sqlite3_stmt *ex = s->writer.stmt[W_VERSION_EXISTS];
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    uint64_t cap = w->u.dek_insert.max_wraps;
    sqlite3_int64 one = 0;
    int rc, found = 0;

    sqlite3_bind_text(upd, 1, d->key, -1, SQLITE_STATIC);
    sqlite3_bind_int64(upd, 2, d->version);
    sqlite3_bind_int64(upd, 3, cap > (uint64_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)cap);
    rc = step_done(upd);
    if (rc != SQLITE_DONE) {
        rv = is_constraint(rc) ? P11KMS_ERR_INTERNAL : SQ_FAIL(db, rc, "counting a wrap");
        goto out;
    }
    if (sqlite3_changes(db) != 1) {
        /* The version is missing, destroyed, or full. */
        sqlite3_bind_text(ex, 1, d->key, -1, SQLITE_STATIC);
        sqlite3_bind_int64(ex, 2, d->version);
        rc = step_int64(ex, &found, &one);
        if (rc != SQLITE_DONE) {
            rv = SQ_FAIL(db, rc, "reading a key version");
            goto out;
        }
        rv = P11KMS_ERR_KEY_NOT_FOUND;
        if (found && w->u.dek_insert.max_wraps != UINT64_MAX) {
            w->u.dek_insert.refused = 1;
            rv = P11KMS_OK; /* nothing written: the caller rotates and retries */
        }
        goto out;
    }
    sqlite3_bind_text(ins, 1, d->id, -1, SQLITE_STATIC);
    sqlite3_bind_text(ins, 2, d->key, -1, SQLITE_STATIC);
    sqlite3_bind_int64(ins, 3, d->version);
    sqlite3_bind_text(ins, 4, d->context, -1, SQLITE_STATIC);
    sqlite3_bind_blob(ins, 5, d->wrapped, (int)d->wrapped_len, SQLITE_STATIC);
    sqlite3_bind_int64(ins, 6, d->created);
    rc = step_done(ins);
    if (rc == SQLITE_CONSTRAINT_PRIMARYKEY || rc == SQLITE_CONSTRAINT_UNIQUE) {
        LOG_ERROR("store", "DEK id %s is already taken", d->id);
        rv = P11KMS_ERR_INTERNAL;
        goto out;
    }
    if (rc == SQLITE_CONSTRAINT_FOREIGNKEY) {
        rv = P11KMS_ERR_KEY_NOT_FOUND;
        goto out;
    }
    if (is_constraint(rc)) {
        LOG_ERROR("store", "DEK row refused: %s", sqlite3_errmsg(db));
        rv = P11KMS_ERR_BAD_REQUEST;
        goto out;
    }
    if (rc != SQLITE_DONE) {
        rv = SQ_FAIL(db, rc, "inserting a DEK");
        goto out;
    }
    rv = sqlite3_changes(db) == 1 ? P11KMS_OK : P11KMS_ERR_KEY_NOT_FOUND;
out:
    return rv;
}

/* Step a one-row, one-integer query (bindings already set), reset it.
 * *found is 0 when it returned no row. */
static int step_int64(sqlite3_stmt *q, int *found, sqlite3_int64 *value)
{
    int rc = sqlite3_step(q);

    *found = rc == SQLITE_ROW;
    if (*found) {
        *value = sqlite3_column_int64(q, 0);
        rc = SQLITE_DONE;
    }
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    return rc;
}

/* Why a one-DEK transition changed nothing: the DEK is missing, or already
 * in the target state (revoke: fine, idempotent), or past it. */
static p11kms_status why_unchanged(sq_store *s, const kms_write *w)
{
    sqlite3_stmt *q = s->writer.stmt[W_DEK_STATE];
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    int rc, state;

    sqlite3_bind_text(q, 1, w->u.dek_state.id, -1, SQLITE_STATIC);
    rc = sqlite3_step(q);
    if (rc == SQLITE_DONE) {
        rv = P11KMS_ERR_DEK_NOT_FOUND;
        goto out;
    }
    if (rc != SQLITE_ROW) {
        rv = SQ_FAIL(s->writer.db, rc, "reading a DEK state");
        goto out;
    }
    state = kms_dek_state_parse((const char *)sqlite3_column_text(q, 0));
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
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    return rv;
}

/* KMS_WRITE_DEK_REVOKE / _DESTROY, one DEK (id set) or in bulk. */
static p11kms_status apply_dek_state(sq_store *s, kms_write *w)
{
    sqlite3 *db = s->writer.db;
    int revoke = w->type == KMS_WRITE_DEK_REVOKE, found = 0, rc;
    const char *reason = revoke ? kms_revoke_reason_name(w->u.dek_state.reason) : NULL;
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    sqlite3_int64 key_id = 0;
    sqlite3_stmt *q;

    if (revoke && reason == NULL) {
        rv = P11KMS_ERR_BAD_REQUEST;
        goto out;
    }
    if (w->u.dek_state.id != NULL) {
        q = s->writer.stmt[revoke ? W_DEK_REVOKE : W_DEK_DESTROY];
        sqlite3_bind_text(q, 1, w->u.dek_state.id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 2, w->u.dek_state.now);
        if (revoke)
            sqlite3_bind_text(q, 3, reason, -1, SQLITE_STATIC);
    } else {
        sqlite3_bind_text(s->writer.stmt[W_KEY_ID], 1, w->u.dek_state.key, -1, SQLITE_STATIC);
        rc = step_int64(s->writer.stmt[W_KEY_ID], &found, &key_id);
        if (rc != SQLITE_DONE) {
            rv = SQ_FAIL(db, rc, "looking up a key");
            goto out;
        }
        if (!found) {
            rv = P11KMS_ERR_KEY_NOT_FOUND;
            goto out;
        }
        q = s->writer.stmt[revoke ? W_BULK_REVOKE : W_BULK_DESTROY];
        sqlite3_bind_int64(q, 1, key_id);
        sqlite3_bind_text(q, 2, w->u.dek_state.filter, -1, SQLITE_STATIC);
        sqlite3_bind_int64(q, 3, w->u.dek_state.now);
        if (revoke)
            sqlite3_bind_text(q, 4, reason, -1, SQLITE_STATIC);
    }
    rc = step_done(q);
    if (is_constraint(rc)) {
        LOG_ERROR("store", "DEK state change refused: %s", sqlite3_errmsg(db));
        rv = P11KMS_ERR_INTERNAL;
        goto out;
    }
    if (rc != SQLITE_DONE) {
        rv = SQ_FAIL(db, rc, revoke ? "revoking data keys" : "destroying data keys");
        goto out;
    }
    w->u.dek_state.count = (uint64_t)sqlite3_changes64(db);
    if (!revoke && w->u.dek_state.count > 0)
        s->wipe_pending = s->wipe_new = 1;
    if (w->u.dek_state.id != NULL && w->u.dek_state.count == 0) {
        rv = why_unchanged(s, w);
        goto out;
    }
    rv = P11KMS_OK;
out:
    return rv;
}

/* ---- key rotation writes (issue 3) ---- */

/* The key's row id and latest_version, read inside the transaction. */
static p11kms_status key_latest(sq_store *s, const char *name, sqlite3_int64 *key_id,
                                uint32_t *latest)
{
    sqlite3_stmt *q = s->writer.stmt[W_KEY_LATEST];
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    int rc;

    sqlite3_bind_text(q, 1, name, -1, SQLITE_STATIC);
    rc = sqlite3_step(q);
    if (rc == SQLITE_DONE) {
        rv = P11KMS_ERR_KEY_NOT_FOUND;
        goto out;
    }
    if (rc != SQLITE_ROW) {
        rv = SQ_FAIL(s->writer.db, rc, "reading a key");
        goto out;
    }
    *key_id = sqlite3_column_int64(q, 0);
    *latest = (uint32_t)sqlite3_column_int64(q, 1);
    rv = P11KMS_OK;
out:
    sqlite3_reset(q);
    sqlite3_clear_bindings(q);
    return rv;
}

static p11kms_status apply_version_add(sq_store *s, kms_write *w)
{
    sqlite3 *db = s->writer.db;
    sqlite3_stmt *ins = s->writer.stmt[W_VERSION_ADD];
    sqlite3_stmt *upd = s->writer.stmt[W_KEY_SET_LATEST];
    p11kms_status rv;
    sqlite3_int64 key_id = 0;
    uint32_t latest = 0, next = w->u.version_add.expected_latest + 1;
    int rc;

    rv = key_latest(s, w->u.version_add.name, &key_id, &latest);
    if (rv != P11KMS_OK)
        goto out;
    if (latest != w->u.version_add.expected_latest) {
        w->u.version_add.added = 0; /* another rotation won */
        goto out;
    }
    sqlite3_bind_int64(ins, 1, key_id);
    sqlite3_bind_int64(ins, 2, next);
    sqlite3_bind_blob(ins, 3, w->u.version_add.token_id, KMS_TOKEN_ID_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(ins, 4, w->u.version_add.now);
    rc = step_done(ins);
    if (is_constraint(rc)) {
        LOG_ERROR("store", "key version refused: %s", sqlite3_errmsg(db));
        rv = P11KMS_ERR_INTERNAL;
        goto out;
    }
    if (rc != SQLITE_DONE) {
        rv = SQ_FAIL(db, rc, "inserting a key version");
        goto out;
    }
    sqlite3_bind_int64(upd, 1, key_id);
    sqlite3_bind_int64(upd, 2, next);
    sqlite3_bind_int64(upd, 3, latest);
    rc = step_done(upd);
    if (rc != SQLITE_DONE) {
        rv = is_constraint(rc) ? P11KMS_ERR_INTERNAL : SQ_FAIL(db, rc, "updating latest_version");
        goto out;
    }
    if (sqlite3_changes(db) != 1) {
        rv = P11KMS_ERR_INTERNAL; /* read just above in this transaction */
        goto out;
    }
    rv = intent_delete(s, w->u.version_add.token_id);
    if (rv != P11KMS_OK)
        goto out;
    w->u.version_add.added = next;
out:
    return rv;
}

static p11kms_status apply_key_meta(sq_store *s, kms_write *w)
{
    sqlite3 *db = s->writer.db;
    sqlite3_stmt *q;
    p11kms_status rv;
    sqlite3_int64 key_id = 0;
    uint32_t latest = 0, min = w->u.key_meta.min_decrypt_version;
    int rc;

    rv = key_latest(s, w->u.key_meta.name, &key_id, &latest);
    if (rv != P11KMS_OK)
        goto out;
    if (w->type == KMS_WRITE_KEY_SET_STATE) {
        q = s->writer.stmt[W_KEY_SET_STATE];
        sqlite3_bind_text(q, 1, w->u.key_meta.name, -1, SQLITE_STATIC);
        sqlite3_bind_text(q, 2, kms_key_state_name(w->u.key_meta.state), -1, SQLITE_STATIC);
        rc = step_done(q);
        if (rc != SQLITE_DONE)
            rv = is_constraint(rc) ? P11KMS_ERR_INTERNAL : SQ_FAIL(db, rc, "setting a key state");
        goto out;
    }
    if (min != 0 && min > latest) {
        rv = P11KMS_ERR_BAD_REQUEST;
        goto out;
    }
    if (min != 0) {
        q = s->writer.stmt[W_KEY_SET_MIN];
        sqlite3_bind_int64(q, 1, key_id);
        sqlite3_bind_int64(q, 2, min);
        rc = step_done(q);
        if (rc != SQLITE_DONE) {
            rv = is_constraint(rc) ? P11KMS_ERR_BAD_REQUEST
                                   : SQ_FAIL(db, rc, "setting min_decrypt_version");
            goto out;
        }
    }
    if (w->u.key_meta.rotation_period >= 0) {
        q = s->writer.stmt[W_KEY_SET_PERIOD];
        sqlite3_bind_int64(q, 1, key_id);
        sqlite3_bind_int64(q, 2, w->u.key_meta.rotation_period);
        rc = step_done(q);
        if (rc != SQLITE_DONE) {
            rv = is_constraint(rc) ? P11KMS_ERR_BAD_REQUEST
                                   : SQ_FAIL(db, rc, "setting rotation_period");
            goto out;
        }
    }
out:
    return rv;
}

/* *active: version `version` of key_id exists and is active. */
static p11kms_status version_active(sq_store *s, sqlite3_int64 key_id, uint32_t version,
                                    int *exists, int *active)
{
    sqlite3_stmt *q = s->writer.stmt[W_VERSION_STATE];
    sqlite3_int64 v = 0;
    int rc;

    sqlite3_bind_int64(q, 1, key_id);
    sqlite3_bind_int64(q, 2, version);
    rc = step_int64(q, exists, &v);
    if (rc != SQLITE_DONE)
        return SQ_FAIL(s->writer.db, rc, "reading a key version");
    *active = *exists && v != 0;
    return P11KMS_OK;
}

static p11kms_status apply_rewrap(sq_store *s, kms_write *w)
{
    sqlite3 *db = s->writer.db;
    sqlite3_stmt *upd = s->writer.stmt[W_DEK_REWRAP];
    sqlite3_stmt *bump = s->writer.stmt[W_VERSION_BUMP];
    p11kms_status rv;
    sqlite3_int64 key_id = 0;
    uint32_t latest = 0;
    uint64_t moved = 0;
    int exists = 0, active = 0, rc;

    w->u.rewrap.updated = 0;
    rv = key_latest(s, w->u.rewrap.name, &key_id, &latest);
    if (rv != P11KMS_OK)
        goto out;
    rv = version_active(s, key_id, w->u.rewrap.new_version, &exists, &active);
    if (rv != P11KMS_OK || !active)
        goto out; /* the target was retired meanwhile: nothing moves */
    for (size_t i = 0; i < w->u.rewrap.n; i++) {
        const kms_rewrap_item *it = &w->u.rewrap.items[i];

        sqlite3_bind_text(upd, 1, it->id, -1, SQLITE_STATIC);
        sqlite3_bind_int64(upd, 2, w->u.rewrap.new_version);
        sqlite3_bind_blob(upd, 3, it->wrapped, (int)it->wrapped_len, SQLITE_STATIC);
        sqlite3_bind_int64(upd, 4, it->old_version);
        sqlite3_bind_int64(upd, 5, key_id);
        rc = step_done(upd);
        if (is_constraint(rc)) {
            LOG_ERROR("store", "rewrapped DEK %s refused: %s", it->id, sqlite3_errmsg(db));
            rv = P11KMS_ERR_INTERNAL;
            goto out;
        }
        if (rc != SQLITE_DONE) {
            rv = SQ_FAIL(db, rc, "storing a rewrapped DEK");
            goto out;
        }
        moved += (uint64_t)sqlite3_changes(db);
    }
    if (moved > 0) {
        sqlite3_bind_int64(bump, 1, key_id);
        sqlite3_bind_int64(bump, 2, w->u.rewrap.new_version);
        sqlite3_bind_int64(bump, 3, (sqlite3_int64)moved);
        rc = step_done(bump);
        if (rc != SQLITE_DONE || sqlite3_changes(db) != 1) {
            rv = rc != SQLITE_DONE && !is_constraint(rc) ? SQ_FAIL(db, rc, "counting rewraps")
                                                         : P11KMS_ERR_INTERNAL;
            goto out;
        }
    }
    w->u.rewrap.updated = moved;
out:
    return rv;
}

static p11kms_status apply_version_retire(sq_store *s, kms_write *w)
{
    sqlite3 *db = s->writer.db;
    sqlite3_stmt *live = s->writer.stmt[W_VERSION_LIVE];
    sqlite3_stmt *del = s->writer.stmt[W_VERSION_DESTROY];
    p11kms_status rv;
    sqlite3_int64 key_id = 0, in_use = 0;
    uint32_t latest = 0;
    int exists = 0, active = 0, found = 0, rc;

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
    sqlite3_bind_int64(live, 1, key_id);
    sqlite3_bind_int64(live, 2, w->u.retire.version);
    rc = step_int64(live, &found, &in_use);
    if (rc != SQLITE_DONE) {
        rv = SQ_FAIL(db, rc, "counting live DEKs of a version");
        goto out;
    }
    if (in_use) {
        rv = P11KMS_ERR_KEY_VERSION_IN_USE;
        goto out;
    }
    sqlite3_bind_int64(del, 1, key_id);
    sqlite3_bind_int64(del, 2, w->u.retire.version);
    sqlite3_bind_int64(del, 3, w->u.retire.now);
    rc = step_done(del);
    if (rc != SQLITE_DONE) {
        rv = is_constraint(rc) ? P11KMS_ERR_INTERNAL : SQ_FAIL(db, rc, "retiring a key version");
        goto out;
    }
    rv = sqlite3_changes(db) == 1 ? P11KMS_OK : P11KMS_ERR_INTERNAL;
out:
    return rv;
}

static p11kms_status sq_gc_apply(void *ctx, kms_write *w)
{
    sq_store *s = ctx;
    sqlite3 *db = s->writer.db;
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    int rc;

    rc = step_done(s->writer.stmt[W_SAVEPOINT]);
    if (rc != SQLITE_DONE) {
        SQ_FAIL(db, rc, "SAVEPOINT");
        goto out;
    }
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
    default: rv = P11KMS_ERR_INTERNAL; break;
    }
    if (rv == P11KMS_ERR_STORE_UNAVAILABLE)
        goto out; /* the group is rolled back as a whole */
    if (rv != P11KMS_OK) {
        rc = step_done(s->writer.stmt[W_ROLLBACK_TO]);
        if (rc != SQLITE_DONE) {
            rv = SQ_FAIL(db, rc, "ROLLBACK TO");
            goto out;
        }
    }
    rc = step_done(s->writer.stmt[W_RELEASE]);
    if (rc != SQLITE_DONE)
        rv = SQ_FAIL(db, rc, "RELEASE");
out:
    return rv;
}

/* ---- the audit log (writer thread; inside the group's transaction) ---- */

/* Bind text, or NULL for "". */
static void bind_text_or_null(sqlite3_stmt *q, int i, const char *v)
{
    if (v[0] != '\0')
        sqlite3_bind_text(q, i, v, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(q, i);
}

/* A (seq, hash) row; *found 0 when there is none. */
static p11kms_status seq_hash_row(sqlite3 *db, sqlite3_stmt *q, int *found, uint64_t *seq,
                                  unsigned char hash[KMS_AUDIT_HASH_LEN])
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    int rc = sqlite3_step(q);

    *found = 0;
    if (rc == SQLITE_ROW) {
        *found = 1;
        *seq = (uint64_t)sqlite3_column_int64(q, 0);
        memset(hash, 0, KMS_AUDIT_HASH_LEN);
        if (sqlite3_column_bytes(q, 1) == KMS_AUDIT_HASH_LEN)
            memcpy(hash, sqlite3_column_blob(q, 1), KMS_AUDIT_HASH_LEN);
        rc = SQLITE_DONE;
    }
    if (rc != SQLITE_DONE)
        SQ_FAIL(db, rc, "reading the audit head");
    else
        rv = P11KMS_OK;
    sqlite3_reset(q);
    return rv;
}

static p11kms_status sq_gc_audit_head(void *ctx, kms_audit_head *head, uint64_t *last_seq,
                                      unsigned char last_hash[KMS_AUDIT_HASH_LEN])
{
    sq_store *s = ctx;
    p11kms_status rv;
    int found = 0;

    rv = seq_hash_row(s->writer.db, s->writer.stmt[W_AUDIT_HEAD_GET], &head->present, &head->seq,
                      head->hash);
    if (rv != P11KMS_OK)
        return rv;
    *last_seq = 0;
    rv = seq_hash_row(s->writer.db, s->writer.stmt[W_AUDIT_LAST], &found, last_seq, last_hash);
    if (rv == P11KMS_OK && !found)
        *last_seq = 0;
    return rv;
}

static p11kms_status sq_gc_audit_insert(void *ctx, const kms_audit_entry *e)
{
    sq_store *s = ctx;
    sqlite3_stmt *q = s->writer.stmt[W_AUDIT_INSERT];
    int rc;

    sqlite3_bind_int64(q, 1, (sqlite3_int64)e->seq);
    sqlite3_bind_int64(q, 2, e->time);
    sqlite3_bind_text(q, 3, e->principal, -1, SQLITE_STATIC);
    sqlite3_bind_text(q, 4, e->operation, -1, SQLITE_STATIC);
    bind_text_or_null(q, 5, e->key);
    if (e->version != 0)
        sqlite3_bind_int64(q, 6, e->version);
    else
        sqlite3_bind_null(q, 6);
    bind_text_or_null(q, 7, e->dek_id);
    sqlite3_bind_text(q, 8, kms_audit_result_name(e->result), -1, SQLITE_STATIC);
    bind_text_or_null(q, 9, e->error_code);
    sqlite3_bind_blob(q, 10, e->prev_hash, KMS_AUDIT_HASH_LEN, SQLITE_STATIC);
    sqlite3_bind_blob(q, 11, e->hash, KMS_AUDIT_HASH_LEN, SQLITE_STATIC);
    rc = step_done(q);
    return rc == SQLITE_DONE ? P11KMS_OK : SQ_FAIL(s->writer.db, rc, "appending an audit entry");
}

static p11kms_status sq_gc_audit_seal(void *ctx, const kms_audit_entry *e)
{
    sq_store *s = ctx;
    sqlite3_stmt *q = s->writer.stmt[W_AUDIT_SEAL];
    int rc;

    sqlite3_bind_int64(q, 1, (sqlite3_int64)e->seq);
    sqlite3_bind_blob(q, 2, e->mac, KMS_AUDIT_MAC_LEN, SQLITE_STATIC);
    rc = step_done(q);
    if (rc != SQLITE_DONE || sqlite3_changes(s->writer.db) != 1)
        return SQ_FAIL(s->writer.db, rc, "sealing the audit log");
    q = s->writer.stmt[W_AUDIT_HEAD_SET];
    sqlite3_bind_int64(q, 1, (sqlite3_int64)e->seq);
    sqlite3_bind_blob(q, 2, e->hash, KMS_AUDIT_HASH_LEN, SQLITE_STATIC);
    rc = step_done(q);
    return rc == SQLITE_DONE ? P11KMS_OK : SQ_FAIL(s->writer.db, rc, "recording the audit head");
}

static p11kms_status sq_gc_audit_key_get(void *ctx, unsigned char id[KMS_TOKEN_ID_LEN],
                                         int *found)
{
    sq_store *s = ctx;
    sqlite3_stmt *q = s->writer.stmt[W_AUDIT_KEY_GET];
    p11kms_status rv = P11KMS_OK;
    int rc = sqlite3_step(q);

    *found = 0;
    if (rc == SQLITE_ROW && sqlite3_column_bytes(q, 0) == KMS_TOKEN_ID_LEN) {
        memcpy(id, sqlite3_column_blob(q, 0), KMS_TOKEN_ID_LEN);
        *found = 1;
    } else if (rc != SQLITE_DONE) {
        rv = SQ_FAIL(s->writer.db, rc, "reading the audit key id");
    }
    sqlite3_reset(q);
    return rv;
}

static p11kms_status sq_gc_audit_key_put(void *ctx, const unsigned char id[KMS_TOKEN_ID_LEN])
{
    sq_store *s = ctx;
    sqlite3_stmt *q = s->writer.stmt[W_AUDIT_KEY_PUT];
    int rc;

    sqlite3_bind_blob(q, 1, id, KMS_TOKEN_ID_LEN, SQLITE_STATIC);
    sqlite3_bind_int64(q, 2, (sqlite3_int64)time(NULL));
    rc = step_done(q);
    return rc == SQLITE_DONE ? P11KMS_OK : SQ_FAIL(s->writer.db, rc, "recording the audit key id");
}

/* The probe of the failing writer (groupcommit.c): increment the counter
 * of store_probe in a transaction of its own.  Quiet: the writer logs the
 * reason it returns. */
static p11kms_status sq_gc_probe(void *ctx, char *why, size_t whylen)
{
    sq_store *s = ctx;
    sqlite3 *db = s->writer.db;
    static const int steps[] = {W_BEGIN, W_PROBE, W_COMMIT};
    static const char *const names[] = {"BEGIN IMMEDIATE", "probe write", "COMMIT"};
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    int rc;

    for (size_t i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
        rc = step_done(s->writer.stmt[steps[i]]);
        if (rc != SQLITE_DONE) {
            snprintf(why, whylen, "sqlite: %s: %s (%s, code %d)", names[i], sqlite3_errmsg(db),
                     sqlite3_errstr(rc), rc);
            goto out;
        }
    }
    if (s->wipe_pending)
        wal_truncate(s, 0); /* a destroy's WAL wipe that failed with the store */
    rv = P11KMS_OK;
out:
    if (rv != P11KMS_OK && !sqlite3_get_autocommit(db))
        step_done(s->writer.stmt[W_ROLLBACK]);
    return rv;
}

static const kms_gc_ops sq_gc_ops = {
    .begin = sq_gc_begin,
    .apply = sq_gc_apply,
    .commit = sq_gc_commit,
    .rollback = sq_gc_rollback,
    .audit_head = sq_gc_audit_head,
    .audit_insert = sq_gc_audit_insert,
    .audit_seal = sq_gc_audit_seal,
    .audit_key_get = sq_gc_audit_key_get,
    .audit_key_put = sq_gc_audit_key_put,
    .probe = sq_gc_probe,
};

/* ---- open / close ------------------------------------------------------- */

static void sq_free(sq_store *s)
{
    if (s == NULL)
        return;
    kms_gc_stop(s->gc);
    if (s->writer.db != NULL)
        sqlite3_wal_hook(s->writer.db, NULL, NULL);
    sq_ckpt_stop(s->ckpt);
    for (size_t i = 0; i < SQ_READERS; i++)
        conn_close(&s->readers[i]);
    conn_close(&s->writer);
    if (s->pool_ok) {
        pthread_cond_destroy(&s->pool_cv);
        pthread_mutex_destroy(&s->pool_mu);
    }
    free(s->path);
    free(s);
}

p11kms_status kms_store_open_sqlite(const char *path, kms_store **out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    sq_store *s = NULL;

    if (path == NULL || *path == '\0' || out == NULL)
        goto out;
    rv = P11KMS_ERR_STORE_UNAVAILABLE;
    if (sqlite3_threadsafe() == 0) {
        LOG_ERROR("store", "this SQLite library is built without thread support");
        goto out;
    }
    rv = P11KMS_ERR_NO_MEMORY;
    s = calloc(1, sizeof(*s));
    if (s == NULL)
        goto out;
    s->base.ops = &sq_ops;
    s->path = strdup(path);
    if (s->path == NULL)
        goto out;
    rv = P11KMS_ERR_INTERNAL;
    if (pthread_mutex_init(&s->pool_mu, NULL) != 0)
        goto out;
    if (pthread_cond_init(&s->pool_cv, NULL) != 0) {
        pthread_mutex_destroy(&s->pool_mu);
        goto out;
    }
    s->pool_ok = 1;
    rv = precreate(path);
    if (rv != P11KMS_OK)
        goto out;
    rv = open_writer(s);
    if (rv != P11KMS_OK)
        goto out;
    for (size_t i = 0; i < SQ_READERS; i++) {
        rv = open_reader(s, &s->readers[i]);
        if (rv != P11KMS_OK)
            goto out;
        s->readers[i].next_free = s->free_readers;
        s->free_readers = &s->readers[i];
    }
    /* Checkpoints run on their own thread, not inside a group's commit. */
    rv = sq_ckpt_start(path, &s->ckpt);
    if (rv != P11KMS_OK)
        goto out;
    rv = exec_simple(s->writer.db, "PRAGMA wal_autocheckpoint = 0");
    if (rv != P11KMS_OK)
        goto out;
    sqlite3_wal_hook(s->writer.db, sq_ckpt_wal_hook, s->ckpt);
    rv = kms_gc_start(&sq_gc_ops, s, &s->gc);
    if (rv != P11KMS_OK)
        goto out;
    LOG_DEBUG("store", "opened %s (schema %d, %d readers)", path, kms_sqlite_schema_latest(),
              SQ_READERS);
    *out = &s->base;
    s = NULL;
    rv = P11KMS_OK;
out:
    sq_free(s);
    return rv;
}

static void sq_close(kms_store *st)
{
    sq_free(sq_of(st));
}

/* ---- reads -------------------------------------------------------------- */

static p11kms_status sq_ping(kms_store *st)
{
    sq_store *s = sq_of(st);
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    sq_conn *c = reader_get(s);
    int rc;

    rc = sqlite3_step(c->stmt[R_PING]);
    if (rc != SQLITE_ROW) {
        SQ_FAIL(c->db, rc, "ping");
        goto out;
    }
    /* Readable is not enough: after a group failed in the store, healthy
     * only once a probe write commits (asked for now, waited for briefly,
     * so health answers in bounded time even while the lock is held). */
    if (kms_gc_writable(s->gc, SQ_PING_WAIT_MS) != P11KMS_OK)
        goto out;
    rv = P11KMS_OK;
out:
    reader_put(s, c);
    return rv;
}

static p11kms_status sq_counts(kms_store *st, kms_store_counts *out)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    sqlite3_stmt *q = c->stmt[R_COUNTS];
    p11kms_status rv = P11KMS_OK;
    int rc;

    rc = sqlite3_step(q);
    if (rc != SQLITE_ROW) {
        rv = SQ_FAIL(c->db, rc, "counting keys and DEKs");
        goto out;
    }
    out->keys = (uint64_t)sqlite3_column_int64(q, 0);
    out->deks_active = (uint64_t)sqlite3_column_int64(q, 1);
    out->deks_revoked = (uint64_t)sqlite3_column_int64(q, 2);
    out->deks_destroyed = (uint64_t)sqlite3_column_int64(q, 3);
out:
    reader_put(s, c);
    return rv;
}

static p11kms_status version_from_row(sqlite3_stmt *q, int col, kms_version_rec *v)
{
    int state = kms_version_state_parse((const char *)sqlite3_column_text(q, col + 1));

    memset(v, 0, sizeof(*v));
    if (state < 0 || sqlite3_column_bytes(q, col + 2) != KMS_TOKEN_ID_LEN) {
        LOG_ERROR("store", "a key_versions row is malformed");
        return P11KMS_ERR_INTERNAL;
    }
    v->version = (uint32_t)sqlite3_column_int64(q, col);
    v->state = (kms_version_state)state;
    memcpy(v->token_id, sqlite3_column_blob(q, col + 2), KMS_TOKEN_ID_LEN);
    v->created = sqlite3_column_int64(q, col + 3);
    v->wrap_count = (uint64_t)sqlite3_column_int64(q, col + 4);
    v->dek_count = (uint64_t)sqlite3_column_int64(q, col + 5);
    return P11KMS_OK;
}

static p11kms_status key_from_row(sqlite3_stmt *q, kms_key_rec **out)
{
    p11kms_status rv = P11KMS_ERR_INTERNAL;
    kms_key_rec *k = NULL;
    int state = kms_key_state_parse((const char *)sqlite3_column_text(q, 1));

    if (state < 0 || sqlite3_column_bytes(q, 0) > KMS_NAME_MAX) {
        LOG_ERROR("store", "a keys row is malformed");
        goto out;
    }
    rv = P11KMS_ERR_NO_MEMORY;
    k = calloc(1, sizeof(*k));
    if (k == NULL)
        goto out;
    text_copy(k->name, sizeof(k->name), sqlite3_column_text(q, 0));
    k->state = (kms_key_state)state;
    k->latest_version = (uint32_t)sqlite3_column_int64(q, 2);
    k->min_decrypt_version = (uint32_t)sqlite3_column_int64(q, 3);
    k->rotation_period = sqlite3_column_int64(q, 4);
    k->created = sqlite3_column_int64(q, 5);
    *out = k;
    k = NULL;
    rv = P11KMS_OK;
out:
    kms_key_rec_free(k);
    return rv;
}

/* Read rows of SQ_KEY_COLUMNS into keys (one record per key, versions
 * grouped).  The statement is reset by reader_put. */
static p11kms_status read_keys(sqlite3 *db, sqlite3_stmt *q, kms_key_rec ***out, size_t *count)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    kms_key_rec **keys = NULL, **grown, *k;
    kms_version_rec v;
    size_t n = 0, cap = 0;
    int rc;

    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        k = n > 0 ? keys[n - 1] : NULL;
        if (k == NULL || strcmp(k->name, (const char *)sqlite3_column_text(q, 0)) != 0) {
            if (n == cap) {
                cap = cap ? cap * 2 : 8;
                grown = realloc(keys, cap * sizeof(*keys));
                if (grown == NULL) {
                    rv = P11KMS_ERR_NO_MEMORY;
                    goto out;
                }
                keys = grown;
            }
            rv = key_from_row(q, &keys[n]);
            if (rv != P11KMS_OK)
                goto out;
            k = keys[n++];
        }
        rv = version_from_row(q, 6, &v);
        if (rv != P11KMS_OK)
            goto out;
        rv = kms_key_rec_add_version(k, &v);
        if (rv != P11KMS_OK)
            goto out;
    }
    if (rc != SQLITE_DONE) {
        rv = SQ_FAIL(db, rc, "reading keys");
        goto out;
    }
    *out = keys;
    *count = n;
    keys = NULL;
    rv = P11KMS_OK;
out:
    kms_key_list_free(keys, n);
    return rv;
}

static p11kms_status key_get_with(kms_store *st, int which, const char *name, kms_key_rec **out)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    sqlite3_stmt *q = c->stmt[which];
    kms_key_rec **keys = NULL;
    size_t n = 0;
    p11kms_status rv;

    sqlite3_bind_text(q, 1, name, -1, SQLITE_STATIC);
    rv = read_keys(c->db, q, &keys, &n);
    if (rv != P11KMS_OK)
        goto out;
    if (n == 0) {
        rv = P11KMS_ERR_KEY_NOT_FOUND;
        goto out;
    }
    *out = keys[0];
    keys[0] = NULL;
out:
    reader_put(s, c);
    kms_key_list_free(keys, n);
    return rv;
}

static p11kms_status sq_key_get(kms_store *st, const char *name, kms_key_rec **out)
{
    return key_get_with(st, R_KEY_GET, name, out);
}

static p11kms_status sq_key_get_meta(kms_store *st, const char *name, kms_key_rec **out)
{
    return key_get_with(st, R_KEY_META, name, out);
}

static p11kms_status sq_key_list(kms_store *st, kms_key_rec ***out, size_t *count)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    p11kms_status rv;

    rv = read_keys(c->db, c->stmt[R_KEY_LIST], out, count);
    reader_put(s, c);
    return rv;
}

/* A DEK record from a row of SQ_DEK_COLUMNS (+ wrapped or NULL). */
static p11kms_status dek_from_row(sqlite3_stmt *q, kms_dek_rec **out)
{
    p11kms_status rv = P11KMS_ERR_INTERNAL;
    kms_dek_rec *d = NULL;
    const unsigned char *ctx = sqlite3_column_text(q, 4);
    const char *reason_name = (const char *)sqlite3_column_text(q, 7);
    int state = kms_dek_state_parse((const char *)sqlite3_column_text(q, 3));
    int reason = reason_name != NULL ? kms_revoke_reason_parse(reason_name) : KMS_REVOKE_NONE;
    int wlen = sqlite3_column_bytes(q, SQ_DEK_COL_WRAPPED);

    if (state < 0 || reason < 0 || wlen > KMS_WRAPPED_MAX || ctx == NULL ||
        sqlite3_column_bytes(q, 0) != KMS_DEK_ID_LEN || sqlite3_column_bytes(q, 1) > KMS_NAME_MAX) {
        LOG_ERROR("store", "DEK row %.36s is malformed", (const char *)sqlite3_column_text(q, 0));
        goto out;
    }
    rv = P11KMS_ERR_NO_MEMORY;
    d = calloc(1, sizeof(*d));
    if (d == NULL)
        goto out;
    d->context = strdup((const char *)ctx);
    if (d->context == NULL)
        goto out;
    text_copy(d->id, sizeof(d->id), sqlite3_column_text(q, 0));
    text_copy(d->key, sizeof(d->key), sqlite3_column_text(q, 1));
    d->version = (uint32_t)sqlite3_column_int64(q, 2);
    d->state = (kms_dek_state)state;
    d->created = sqlite3_column_int64(q, 5);
    d->revoked_at = sqlite3_column_int64(q, 6); /* NULL reads as 0 */
    d->revoke_reason = (kms_revoke_reason)reason;
    d->destroyed_at = sqlite3_column_int64(q, 8);
    if (wlen > 0)
        memcpy(d->wrapped, sqlite3_column_blob(q, SQ_DEK_COL_WRAPPED), (size_t)wlen);
    d->wrapped_len = (size_t)wlen;
    *out = d;
    d = NULL;
    rv = P11KMS_OK;
out:
    kms_dek_rec_free(d);
    return rv;
}

static p11kms_status sq_dek_get(kms_store *st, const char *id, kms_dek_rec **out)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    sqlite3_stmt *q = c->stmt[R_DEK_GET];
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    int rc;

    sqlite3_bind_text(q, 1, id, -1, SQLITE_STATIC);
    rc = sqlite3_step(q);
    if (rc == SQLITE_DONE) {
        rv = P11KMS_ERR_DEK_NOT_FOUND;
        goto out;
    }
    if (rc != SQLITE_ROW) {
        SQ_FAIL(c->db, rc, "reading a DEK");
        goto out;
    }
    rv = dek_from_row(q, out);
out:
    reader_put(s, c);
    return rv;
}

static p11kms_status sq_dek_list(kms_store *st, const char *key, int state, const char *cursor,
                                 size_t limit, kms_dek_rec ***out, size_t *count, int *more)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    sqlite3_stmt *q = c->stmt[state >= 0 ? R_DEK_LIST_STATE : R_DEK_LIST];
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    kms_dek_rec **deks = NULL;
    sqlite3_int64 key_id = 0;
    size_t n = 0;
    int found = 0, rc;

    sqlite3_bind_text(c->stmt[R_KEY_ID], 1, key, -1, SQLITE_STATIC);
    rc = step_int64(c->stmt[R_KEY_ID], &found, &key_id);
    if (rc != SQLITE_DONE) {
        SQ_FAIL(c->db, rc, "looking up a key");
        goto out;
    }
    if (!found) {
        rv = P11KMS_ERR_KEY_NOT_FOUND;
        goto out;
    }
    rv = P11KMS_ERR_NO_MEMORY;
    deks = calloc(limit, sizeof(*deks));
    if (deks == NULL)
        goto out;
    sqlite3_bind_int64(q, 1, key_id);
    sqlite3_bind_text(q, 2, cursor, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 3, (sqlite3_int64)limit + 1); /* one more: is there a next page? */
    if (state >= 0)
        sqlite3_bind_text(q, 4, kms_dek_state_name((kms_dek_state)state), -1, SQLITE_STATIC);
    *more = 0;
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        if (n == limit) {
            *more = 1;
            break;
        }
        rv = dek_from_row(q, &deks[n]);
        if (rv != P11KMS_OK)
            goto out;
        n++;
    }
    if (rc != SQLITE_ROW && rc != SQLITE_DONE) {
        rv = SQ_FAIL(c->db, rc, "listing DEKs");
        goto out;
    }
    *out = deks;
    *count = n;
    deks = NULL;
    rv = P11KMS_OK;
out:
    reader_put(s, c);
    kms_dek_list_free(deks, n);
    return rv;
}

static p11kms_status sq_token_ids(kms_store *st, int destroyed_only,
                                  unsigned char (**ids)[KMS_TOKEN_ID_LEN], size_t *count)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    sqlite3_stmt *q = c->stmt[destroyed_only ? R_TOKEN_IDS_DESTROYED : R_TOKEN_IDS];
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    unsigned char(*arr)[KMS_TOKEN_ID_LEN] = NULL, (*grown)[KMS_TOKEN_ID_LEN];
    size_t n = 0, cap = 0;
    int rc;

    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        if (sqlite3_column_bytes(q, 0) != KMS_TOKEN_ID_LEN) {
            LOG_ERROR("store", "a key_versions row has a malformed token_id");
            rv = P11KMS_ERR_INTERNAL;
            goto out;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            grown = realloc(arr, cap * sizeof(*arr));
            if (grown == NULL) {
                rv = P11KMS_ERR_NO_MEMORY;
                goto out;
            }
            arr = grown;
        }
        memcpy(arr[n++], sqlite3_column_blob(q, 0), KMS_TOKEN_ID_LEN);
    }
    if (rc != SQLITE_DONE) {
        SQ_FAIL(c->db, rc, "reading token ids");
        goto out;
    }
    *ids = arr;
    *count = n;
    arr = NULL;
    rv = P11KMS_OK;
out:
    reader_put(s, c);
    free(arr);
    return rv;
}

/* The row id of key `name` on reader c.  KEY_NOT_FOUND. */
static p11kms_status reader_key_id(sq_conn *c, const char *name, sqlite3_int64 *key_id)
{
    int found = 0, rc;

    sqlite3_bind_text(c->stmt[R_KEY_ID], 1, name, -1, SQLITE_STATIC);
    rc = step_int64(c->stmt[R_KEY_ID], &found, key_id);
    if (rc != SQLITE_DONE)
        return SQ_FAIL(c->db, rc, "looking up a key");
    return found ? P11KMS_OK : P11KMS_ERR_KEY_NOT_FOUND;
}

static p11kms_status sq_rewrap_read(kms_store *st, const char *name, uint32_t below_version,
                                    const char *cursor, size_t limit, kms_dek_rec ***out,
                                    size_t *count)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    sqlite3_stmt *q = c->stmt[R_REWRAP_READ];
    p11kms_status rv;
    kms_dek_rec **deks = NULL;
    sqlite3_int64 key_id = 0;
    size_t n = 0;
    int rc;

    rv = reader_key_id(c, name, &key_id);
    if (rv != P11KMS_OK)
        goto out;
    rv = P11KMS_ERR_NO_MEMORY;
    deks = calloc(limit, sizeof(*deks));
    if (deks == NULL)
        goto out;
    sqlite3_bind_int64(q, 1, key_id);
    sqlite3_bind_text(q, 2, cursor, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 3, below_version);
    sqlite3_bind_int64(q, 4, (sqlite3_int64)limit);
    while (n < limit && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        rv = dek_from_row(q, &deks[n]);
        if (rv != P11KMS_OK)
            goto out;
        n++;
    }
    if (n < limit && rc != SQLITE_DONE) {
        rv = SQ_FAIL(c->db, rc, "reading a rewrap batch");
        goto out;
    }
    *out = deks;
    *count = n;
    deks = NULL;
    rv = P11KMS_OK;
out:
    reader_put(s, c);
    kms_dek_list_free(deks, n);
    return rv;
}

static p11kms_status sq_rewrap_remaining(kms_store *st, const char *name, uint32_t below_version,
                                         uint64_t *count)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    sqlite3_stmt *q = c->stmt[R_REWRAP_REMAINING];
    p11kms_status rv;
    sqlite3_int64 key_id = 0, n = 0;
    int found = 0, rc;

    rv = reader_key_id(c, name, &key_id);
    if (rv != P11KMS_OK)
        goto out;
    sqlite3_bind_int64(q, 1, key_id);
    sqlite3_bind_int64(q, 2, below_version);
    rc = step_int64(q, &found, &n);
    if (rc != SQLITE_DONE || !found) {
        rv = SQ_FAIL(c->db, rc, "counting DEKs to rewrap");
        goto out;
    }
    *count = (uint64_t)n;
out:
    reader_put(s, c);
    return rv;
}

static p11kms_status sq_rotation_due(kms_store *st, int64_t now, kms_rotation_due **out,
                                     size_t *count)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    sqlite3_stmt *q = c->stmt[R_ROTATION_DUE];
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    kms_rotation_due *arr = NULL, *grown;
    size_t n = 0, cap = 0;
    int rc;

    sqlite3_bind_int64(q, 1, now);
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        if (n == cap) {
            cap = cap ? cap * 2 : 8;
            grown = realloc(arr, cap * sizeof(*arr));
            if (grown == NULL) {
                rv = P11KMS_ERR_NO_MEMORY;
                goto out;
            }
            arr = grown;
        }
        text_copy(arr[n].name, sizeof(arr[n].name), sqlite3_column_text(q, 0));
        arr[n].latest_version = (uint32_t)sqlite3_column_int64(q, 1);
        n++;
    }
    if (rc != SQLITE_DONE) {
        SQ_FAIL(c->db, rc, "reading keys due for rotation");
        goto out;
    }
    *out = arr;
    *count = n;
    arr = NULL;
    rv = P11KMS_OK;
out:
    reader_put(s, c);
    free(arr);
    return rv;
}

static p11kms_status sq_kek_intents(kms_store *st, int64_t older_than, kms_kek_intent **list,
                                    size_t *count)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    sqlite3_stmt *q = c->stmt[R_INTENTS];
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    kms_kek_intent *arr = NULL, *grown;
    size_t n = 0, cap = 0;
    int rc;

    sqlite3_bind_int64(q, 1, older_than);
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        if (sqlite3_column_bytes(q, 0) != KMS_TOKEN_ID_LEN) {
            LOG_ERROR("store", "a kek_intents row has a malformed token_id");
            rv = P11KMS_ERR_INTERNAL;
            goto out;
        }
        if (n == cap) {
            cap = cap ? cap * 2 : 8;
            grown = realloc(arr, cap * sizeof(*arr));
            if (grown == NULL) {
                rv = P11KMS_ERR_NO_MEMORY;
                goto out;
            }
            arr = grown;
        }
        memset(&arr[n], 0, sizeof(arr[n]));
        memcpy(arr[n].token_id, sqlite3_column_blob(q, 0), KMS_TOKEN_ID_LEN);
        text_copy(arr[n].key_name, sizeof(arr[n].key_name), sqlite3_column_text(q, 1));
        arr[n].version = (uint32_t)sqlite3_column_int64(q, 2);
        arr[n].created = sqlite3_column_int64(q, 3);
        n++;
    }
    if (rc != SQLITE_DONE) {
        SQ_FAIL(c->db, rc, "reading KEK intents");
        goto out;
    }
    *list = arr;
    *count = n;
    arr = NULL;
    rv = P11KMS_OK;
out:
    reader_put(s, c);
    free(arr);
    return rv;
}

/* ---- writes ------------------------------------------------------------- */

static p11kms_status sq_kek_intent_add(kms_store *st,
                                       const unsigned char token_id[KMS_TOKEN_ID_LEN],
                                       const char *key_name, uint32_t version, int64_t now)
{
    kms_write w = {.type = KMS_WRITE_INTENT_ADD};

    w.u.intent.token_id = token_id;
    w.u.intent.key_name = key_name;
    w.u.intent.version = version;
    w.u.intent.now = now;
    return kms_gc_submit(sq_of(st)->gc, &w);
}

static p11kms_status sq_kek_intent_remove(kms_store *st,
                                          const unsigned char token_id[KMS_TOKEN_ID_LEN])
{
    kms_write w = {.type = KMS_WRITE_INTENT_REMOVE};

    w.u.intent.token_id = token_id;
    return kms_gc_submit(sq_of(st)->gc, &w);
}

static p11kms_status sq_key_create(kms_store *st, const char *name,
                                   const unsigned char token_id[KMS_TOKEN_ID_LEN], int64_t now)
{
    kms_write w = {.type = KMS_WRITE_KEY_CREATE};

    w.u.key_create.name = name;
    w.u.key_create.token_id = token_id;
    w.u.key_create.now = now;
    return kms_gc_submit(sq_of(st)->gc, &w);
}

static p11kms_status sq_dek_insert(kms_store *st, const kms_dek_rec *dek, uint64_t max_wraps,
                                   int *refused)
{
    kms_write w = {.type = KMS_WRITE_DEK_INSERT};
    p11kms_status rv;

    w.u.dek_insert.dek = dek;
    w.u.dek_insert.max_wraps = max_wraps;
    rv = kms_gc_submit(sq_of(st)->gc, &w);
    if (rv == P11KMS_OK && refused != NULL)
        *refused = w.u.dek_insert.refused;
    return rv;
}

static p11kms_status sq_version_add(kms_store *st, const char *name, uint32_t expected_latest,
                                    const unsigned char token_id[KMS_TOKEN_ID_LEN], int64_t now,
                                    uint32_t *added)
{
    kms_write w = {.type = KMS_WRITE_VERSION_ADD};
    p11kms_status rv;

    w.u.version_add.name = name;
    w.u.version_add.expected_latest = expected_latest;
    w.u.version_add.token_id = token_id;
    w.u.version_add.now = now;
    rv = kms_gc_submit(sq_of(st)->gc, &w);
    if (rv == P11KMS_OK)
        *added = w.u.version_add.added;
    return rv;
}

static p11kms_status sq_key_set_state(kms_store *st, const char *name, kms_key_state state)
{
    kms_write w = {.type = KMS_WRITE_KEY_SET_STATE};

    w.u.key_meta.name = name;
    w.u.key_meta.state = state;
    return kms_gc_submit(sq_of(st)->gc, &w);
}

static p11kms_status sq_key_config(kms_store *st, const char *name, uint32_t min_decrypt_version,
                                   int64_t rotation_period)
{
    kms_write w = {.type = KMS_WRITE_KEY_CONFIG};

    w.u.key_meta.name = name;
    w.u.key_meta.min_decrypt_version = min_decrypt_version;
    w.u.key_meta.rotation_period = rotation_period;
    return kms_gc_submit(sq_of(st)->gc, &w);
}

static p11kms_status sq_rewrap_commit(kms_store *st, const char *name, uint32_t new_version,
                                      const kms_rewrap_item *items, size_t n, uint64_t *updated)
{
    kms_write w = {.type = KMS_WRITE_REWRAP};
    p11kms_status rv;

    w.u.rewrap.name = name;
    w.u.rewrap.new_version = new_version;
    w.u.rewrap.items = items;
    w.u.rewrap.n = n;
    rv = kms_gc_submit(sq_of(st)->gc, &w);
    if (rv == P11KMS_OK)
        *updated = w.u.rewrap.updated;
    return rv;
}

static p11kms_status sq_version_retire(kms_store *st, const char *name, uint32_t version,
                                       int64_t now)
{
    kms_write w = {.type = KMS_WRITE_VERSION_RETIRE};

    w.u.retire.name = name;
    w.u.retire.version = version;
    w.u.retire.now = now;
    return kms_gc_submit(sq_of(st)->gc, &w);
}

static p11kms_status dek_state_submit(kms_store *st, kms_write *w, uint64_t *count)
{
    p11kms_status rv = kms_gc_submit(sq_of(st)->gc, w);

    if (rv == P11KMS_OK && count != NULL)
        *count = w->u.dek_state.count;
    return rv;
}

static p11kms_status sq_dek_revoke(kms_store *st, const char *id, kms_revoke_reason reason,
                                   int64_t now)
{
    kms_write w = {.type = KMS_WRITE_DEK_REVOKE};

    w.u.dek_state.id = id;
    w.u.dek_state.reason = reason;
    w.u.dek_state.now = now;
    return dek_state_submit(st, &w, NULL);
}

static p11kms_status sq_dek_destroy(kms_store *st, const char *id, int64_t now)
{
    kms_write w = {.type = KMS_WRITE_DEK_DESTROY};

    w.u.dek_state.id = id;
    w.u.dek_state.now = now;
    return dek_state_submit(st, &w, NULL);
}

static p11kms_status sq_dek_revoke_bulk(kms_store *st, const char *key, const char *filter,
                                        kms_revoke_reason reason, int64_t now, uint64_t *count)
{
    kms_write w = {.type = KMS_WRITE_DEK_REVOKE};

    w.u.dek_state.key = key;
    w.u.dek_state.filter = filter;
    w.u.dek_state.reason = reason;
    w.u.dek_state.now = now;
    return dek_state_submit(st, &w, count);
}

static p11kms_status sq_dek_destroy_bulk(kms_store *st, const char *key, const char *filter,
                                         int64_t now, uint64_t *count)
{
    kms_write w = {.type = KMS_WRITE_DEK_DESTROY};

    w.u.dek_state.key = key;
    w.u.dek_state.filter = filter;
    w.u.dek_state.now = now;
    return dek_state_submit(st, &w, count);
}

/* ---- audit reads ---- */

static kms_gc *sq_writer(kms_store *st)
{
    return sq_of(st)->gc;
}

static void column_text(sqlite3_stmt *q, int col, char *dst, size_t cap)
{
    text_copy(dst, cap, sqlite3_column_text(q, col));
}

static void column_hash(sqlite3_stmt *q, int col, unsigned char *dst, size_t len)
{
    memset(dst, 0, len);
    if ((size_t)sqlite3_column_bytes(q, col) == len)
        memcpy(dst, sqlite3_column_blob(q, col), len);
}

static p11kms_status sq_audit_list(kms_store *st, uint64_t after, size_t limit,
                                   kms_audit_entry **out, size_t *count)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    sqlite3_stmt *q = c->stmt[R_AUDIT_LIST];
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;
    kms_audit_entry *arr = calloc(limit, sizeof(*arr));
    size_t n = 0;
    int rc = SQLITE_DONE;

    if (arr == NULL)
        goto out;
    sqlite3_bind_int64(q, 1, (sqlite3_int64)after);
    sqlite3_bind_int64(q, 2, (sqlite3_int64)limit);
    while (n < limit && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        kms_audit_entry *e = &arr[n++];
        int result = kms_audit_result_parse((const char *)sqlite3_column_text(q, 7));

        /* An edited row is returned as read (verification judges it). */
        e->seq = (uint64_t)sqlite3_column_int64(q, 0);
        e->time = sqlite3_column_int64(q, 1);
        column_text(q, 2, e->principal, sizeof(e->principal));
        column_text(q, 3, e->operation, sizeof(e->operation));
        column_text(q, 4, e->key, sizeof(e->key));
        e->version = (uint32_t)sqlite3_column_int64(q, 5);
        column_text(q, 6, e->dek_id, sizeof(e->dek_id));
        e->result = result >= 0 ? (kms_audit_result)result : KMS_AUDIT_ERROR;
        column_text(q, 8, e->error_code, sizeof(e->error_code));
        column_hash(q, 9, e->prev_hash, sizeof(e->prev_hash));
        column_hash(q, 10, e->hash, sizeof(e->hash));
        e->has_mac = sqlite3_column_type(q, 11) != SQLITE_NULL;
        column_hash(q, 11, e->mac, sizeof(e->mac));
    }
    if (n < limit && rc != SQLITE_DONE) {
        rv = SQ_FAIL(c->db, rc, "reading the audit log");
        goto out;
    }
    *out = arr;
    *count = n;
    arr = NULL;
    rv = P11KMS_OK;
out:
    reader_put(s, c);
    free(arr);
    return rv;
}

static p11kms_status sq_audit_head(kms_store *st, kms_audit_head *out)
{
    sq_store *s = sq_of(st);
    sq_conn *c = reader_get(s);
    p11kms_status rv;

    rv = seq_hash_row(c->db, c->stmt[R_AUDIT_HEAD], &out->present, &out->seq, out->hash);
    reader_put(s, c);
    return rv;
}

static void sq_stats(kms_store *st, kms_store_stats_ex *out)
{
    sq_store *s = sq_of(st);

    kms_gc_stats(s->gc, out);
    out->wal_truncations = atomic_load(&s->wal_truncations);
    out->wal_truncate_busy = atomic_load(&s->wal_truncate_busy);
    out->wal_restarts = atomic_load(&s->wal_restarts);
    out->wal_restart_busy = atomic_load(&s->wal_restart_busy);
}

p11kms_status kms_sqlite_pragmas_get(kms_store *st, kms_sqlite_pragmas *out)
{
    if (st == NULL || st->ops != &sq_ops || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    *out = sq_of(st)->pragmas;
    return P11KMS_OK;
}

static const kms_store_ops sq_ops = {
    .backend = "sqlite",
    .close = sq_close,
    .ping = sq_ping,
    .counts = sq_counts,
    .key_create = sq_key_create,
    .key_get = sq_key_get,
    .key_get_meta = sq_key_get_meta,
    .key_list = sq_key_list,
    .dek_insert = sq_dek_insert,
    .dek_get = sq_dek_get,
    .dek_revoke = sq_dek_revoke,
    .dek_destroy = sq_dek_destroy,
    .dek_revoke_bulk = sq_dek_revoke_bulk,
    .dek_destroy_bulk = sq_dek_destroy_bulk,
    .dek_list = sq_dek_list,
    .token_ids = sq_token_ids,
    .version_add = sq_version_add,
    .key_set_state = sq_key_set_state,
    .key_config = sq_key_config,
    .rewrap_read = sq_rewrap_read,
    .rewrap_remaining = sq_rewrap_remaining,
    .rewrap_commit = sq_rewrap_commit,
    .version_retire = sq_version_retire,
    .rotation_due = sq_rotation_due,
    .kek_intent_add = sq_kek_intent_add,
    .kek_intents = sq_kek_intents,
    .kek_intent_remove = sq_kek_intent_remove,
    .stats = sq_stats,
    .writer = sq_writer,
    .audit_list = sq_audit_list,
    .audit_head = sq_audit_head,
};
