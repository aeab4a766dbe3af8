/*
 * kms/store/migrations.c - the versioned SQLite schema of the store.
 *
 * Each migration is a block of SQL with a number.  The numbers applied are
 * recorded in schema_version (version, name, applied); kms_sqlite_migrate
 * applies the missing ones in order, each in its own BEGIN IMMEDIATE
 * transaction together with its schema_version row, so a crash leaves the
 * schema at one version or the next, never between.  Reopening a current
 * database changes nothing.  A database newer than this binary is refused.
 * Never edit a released migration: add the next one.
 *
 * No state, no locks: called on the writer connection before the writer
 * thread starts.
 *
 * Schema (version 1), designed for the later issues:
 *   keys          one row per key: name, state, latest_version,
 *                 min_decrypt_version, rotation_period (seconds).
 *   key_versions  one row per KEK version: its token CKA_ID (unique, kept
 *                 after destroy so reconciliation knows it), state, the
 *                 durable wrap_count (GCM IV budget), destroyed_at.
 *   deks          one row per DEK (id = textual UUID): key/version, state
 *                 active|revoked|destroyed with its transition times and
 *                 revoke reason, the canonical JSON context, the wrapped
 *                 bytes (NULL exactly when destroyed).
 *                 deks_by_version (key_id, version, state) serves the live
 *                 DEK count of a version, rewrap and retire checks;
 *                 deks_by_state (key_id, state, id) serves cursor
 *                 pagination by key and state and bulk revoke/destroy.
 *
 * Version 2 (issue 4, revocation and destroy):
 *   deks_by_key (key_id, id) serves cursor pagination by key over every
 *                 state (ORDER BY id from the cursor, no sort step), so a
 *                 page costs O(limit) however many DEKs the key has.
 *
 * Version 3 (issue 5, the audit log; docs/audit.md):
 *   audit         one row per entry, seq = commit order: who, what, on
 *                 which key/version/DEK, the result and error code, the
 *                 chain (prev_hash, hash) and, on the last entry of each
 *                 commit group, the token's HMAC of the group.  No CHECK
 *                 constraints beyond NOT NULL: rows are verified, not
 *                 trusted, and an edited row must still be readable.
 *   audit_head    one row: (seq, hash) of the last sealed entry, written
 *                 in the same transaction (a deleted tail shows).
 *   audit_key     one row: the CKA_ID of the audit MAC key in the token.
 *
 * Version 4 (KEK creation intents):
 *   kek_intents   one row per KEK object being created: its CKA_ID, key
 *                 name, version and time, written durably before
 *                 C_GenerateKey and deleted by the store write that records
 *                 the version.  Start-up reconciliation destroys only the
 *                 objects of old intents (and of destroyed versions); an
 *                 unknown object without an intent is kept.
 *
 * Version 5 (store faults):
 *   store_probe   one row whose counter the writer increments, in a
 *                 transaction of its own, to learn whether the store can be
 *                 written again after a failure (disk full, read-only file,
 *                 lock held elsewhere).  No other meaning.
 */
#include "kms/store/store_internal.h"

#include <sqlite3.h>
#include <stddef.h>
#include <time.h>

#include "module/log.h"

typedef struct migration {
    int version;
    const char *name;
    const char *sql;
} migration;

static const migration migrations[] = {
    {1, "initial schema: keys, key_versions, deks",
     "CREATE TABLE keys (\n"
     "    id                  INTEGER PRIMARY KEY,\n"
     "    name                TEXT    NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 64),\n"
     "    state               TEXT    NOT NULL DEFAULT 'enabled'\n"
     "                                CHECK (state IN ('enabled', 'disabled')),\n"
     "    latest_version      INTEGER NOT NULL CHECK (latest_version >= 1),\n"
     "    min_decrypt_version INTEGER NOT NULL DEFAULT 1\n"
     "                                CHECK (min_decrypt_version BETWEEN 1 AND latest_version),\n"
     "    rotation_period     INTEGER NOT NULL DEFAULT 0 CHECK (rotation_period >= 0),\n"
     "    created             INTEGER NOT NULL\n"
     ");\n"
     "CREATE TABLE key_versions (\n"
     "    key_id       INTEGER NOT NULL REFERENCES keys (id),\n"
     "    version      INTEGER NOT NULL CHECK (version >= 1),\n"
     "    state        TEXT    NOT NULL DEFAULT 'active'\n"
     "                         CHECK (state IN ('active', 'destroyed')),\n"
     "    token_id     BLOB    NOT NULL UNIQUE CHECK (length(token_id) = 16),\n"
     "    created      INTEGER NOT NULL,\n"
     "    wrap_count   INTEGER NOT NULL DEFAULT 0 CHECK (wrap_count >= 0),\n"
     "    destroyed_at INTEGER,\n"
     "    PRIMARY KEY (key_id, version),\n"
     "    CHECK ((state = 'destroyed') = (destroyed_at IS NOT NULL))\n"
     ") WITHOUT ROWID;\n"
     "CREATE TABLE deks (\n"
     "    id            TEXT    NOT NULL PRIMARY KEY CHECK (length(id) = 36),\n"
     "    key_id        INTEGER NOT NULL,\n"
     "    version       INTEGER NOT NULL,\n"
     "    state         TEXT    NOT NULL DEFAULT 'active'\n"
     "                          CHECK (state IN ('active', 'revoked', 'destroyed')),\n"
     "    context       TEXT    NOT NULL,\n"
     "    wrapped       BLOB    CHECK (wrapped IS NULL OR length(wrapped) BETWEEN 1 AND 128),\n"
     "    created       INTEGER NOT NULL,\n"
     "    revoked_at    INTEGER,\n"
     "    revoke_reason TEXT    CHECK (revoke_reason IN\n"
     "                          ('compromised', 'superseded', 'cessation', 'unspecified')),\n"
     "    destroyed_at  INTEGER,\n"
     "    FOREIGN KEY (key_id, version) REFERENCES key_versions (key_id, version),\n"
     "    CHECK ((state = 'destroyed') = (wrapped IS NULL)),\n"
     "    CHECK ((state = 'destroyed') = (destroyed_at IS NOT NULL)),\n"
     "    CHECK ((revoked_at IS NULL) = (revoke_reason IS NULL))\n"
     ") WITHOUT ROWID;\n"
     "CREATE INDEX deks_by_version ON deks (key_id, version, state);\n"
     "CREATE INDEX deks_by_state ON deks (key_id, state, id);\n"},
    {2, "deks_by_key: DEK pagination by key over every state",
     "CREATE INDEX deks_by_key ON deks (key_id, id);\n"},
    {3, "audit log: audit, audit_head, audit_key",
     "CREATE TABLE audit (\n"
     "    seq        INTEGER PRIMARY KEY,\n"
     "    time       INTEGER NOT NULL,\n"
     "    principal  TEXT    NOT NULL,\n"
     "    operation  TEXT    NOT NULL,\n"
     "    key        TEXT,\n"
     "    version    INTEGER,\n"
     "    dek_id     TEXT,\n"
     "    result     TEXT    NOT NULL,\n"
     "    error_code TEXT,\n"
     "    prev_hash  BLOB    NOT NULL,\n"
     "    hash       BLOB    NOT NULL,\n"
     "    mac        BLOB\n"
     ");\n"
     "CREATE TABLE audit_head (\n"
     "    id   INTEGER PRIMARY KEY CHECK (id = 1),\n"
     "    seq  INTEGER NOT NULL,\n"
     "    hash BLOB    NOT NULL\n"
     ");\n"
     "CREATE TABLE audit_key (\n"
     "    id       INTEGER PRIMARY KEY CHECK (id = 1),\n"
     "    token_id BLOB    NOT NULL CHECK (length(token_id) = 16),\n"
     "    created  INTEGER NOT NULL\n"
     ");\n"},
    {4, "kek_intents: KEK objects being created",
     "CREATE TABLE kek_intents (\n"
     "    token_id BLOB    NOT NULL PRIMARY KEY CHECK (length(token_id) = 16),\n"
     "    key_name TEXT    NOT NULL,\n"
     "    version  INTEGER NOT NULL,\n"
     "    created  INTEGER NOT NULL\n"
     ") WITHOUT ROWID;\n"},
    {5, "store_probe: the writer's probe after a store failure",
     "CREATE TABLE store_probe (\n"
     "    id INTEGER PRIMARY KEY CHECK (id = 1),\n"
     "    n  INTEGER NOT NULL\n"
     ");\n"},
};

#define N_MIGRATIONS (sizeof(migrations) / sizeof(migrations[0]))

int kms_sqlite_schema_latest(void)
{
    return migrations[N_MIGRATIONS - 1].version;
}

/* Run SQL without results; log and return STORE_UNAVAILABLE on error. */
static p11kms_status exec_sql(sqlite3 *db, const char *sql, const char *what)
{
    p11kms_status rv = P11KMS_OK;
    char *err = NULL;
    int rc;

    rc = sqlite3_exec(db, sql, NULL, NULL, &err);
    if (rc != SQLITE_OK) {
        LOG_ERROR("store", "%s: %s (%s)", what, err != NULL ? err : sqlite3_errmsg(db),
                  sqlite3_errstr(rc));
        rv = P11KMS_ERR_STORE_UNAVAILABLE;
    }
    sqlite3_free(err);
    return rv;
}

static p11kms_status current_version(sqlite3 *db, int *out)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    sqlite3_stmt *st = NULL;
    int rc;

    rc = sqlite3_prepare_v2(db, "SELECT coalesce(max(version), 0) FROM schema_version", -1, &st,
                            NULL);
    if (rc != SQLITE_OK) {
        LOG_ERROR("store", "reading schema_version: %s", sqlite3_errmsg(db));
        goto out;
    }
    rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        LOG_ERROR("store", "reading schema_version: %s", sqlite3_errmsg(db));
        goto out;
    }
    *out = sqlite3_column_int(st, 0);
    rv = P11KMS_OK;
out:
    sqlite3_finalize(st);
    return rv;
}

static p11kms_status apply_one(sqlite3 *db, const migration *m)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    sqlite3_stmt *ins = NULL;
    int in_tx = 0, cur = 0, rc;

    if (exec_sql(db, "BEGIN IMMEDIATE", "migration: begin") != P11KMS_OK)
        goto out;
    in_tx = 1;
    /* Re-read inside the write lock: another process may have migrated. */
    if (current_version(db, &cur) != P11KMS_OK)
        goto out;
    if (cur >= m->version) {
        rv = P11KMS_OK;
        goto out;
    }
    if (cur != m->version - 1) {
        LOG_ERROR("store", "schema is at version %d, cannot apply migration %d", cur, m->version);
        goto out;
    }
    if (exec_sql(db, m->sql, m->name) != P11KMS_OK)
        goto out;
    rc = sqlite3_prepare_v2(db,
                            "INSERT INTO schema_version (version, name, applied) "
                            "VALUES (?1, ?2, ?3)",
                            -1, &ins, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_bind_int(ins, 1, m->version);
        sqlite3_bind_text(ins, 2, m->name, -1, SQLITE_STATIC);
        sqlite3_bind_int64(ins, 3, (sqlite3_int64)time(NULL));
        rc = sqlite3_step(ins);
    }
    if (rc != SQLITE_DONE) {
        LOG_ERROR("store", "recording migration %d: %s", m->version, sqlite3_errmsg(db));
        goto out;
    }
    if (exec_sql(db, "COMMIT", "migration: commit") != P11KMS_OK)
        goto out;
    in_tx = 0;
    LOG_INFO("store", "applied schema migration %d: %s", m->version, m->name);
    rv = P11KMS_OK;
out:
    sqlite3_finalize(ins);
    if (in_tx && !sqlite3_get_autocommit(db))
        sqlite3_exec(db, rv == P11KMS_OK ? "COMMIT" : "ROLLBACK", NULL, NULL, NULL);
    return rv;
}

p11kms_status kms_sqlite_migrate(sqlite3 *db)
{
    p11kms_status rv = P11KMS_ERR_STORE_UNAVAILABLE;
    int cur = 0, latest = kms_sqlite_schema_latest();

    if (exec_sql(db,
                 "CREATE TABLE IF NOT EXISTS schema_version (\n"
                 "    version INTEGER PRIMARY KEY,\n"
                 "    name    TEXT    NOT NULL,\n"
                 "    applied INTEGER NOT NULL\n"
                 ")",
                 "creating schema_version") != P11KMS_OK)
        goto out;
    if (current_version(db, &cur) != P11KMS_OK)
        goto out;
    if (cur > latest) {
        LOG_ERROR("store", "the database schema (version %d) is newer than this kmsd (%d)", cur,
                  latest);
        goto out;
    }
    for (size_t i = 0; i < N_MIGRATIONS; i++) {
        if (migrations[i].version <= cur)
            continue;
        if (apply_one(db, &migrations[i]) != P11KMS_OK)
            goto out;
    }
    rv = P11KMS_OK;
out:
    return rv;
}
