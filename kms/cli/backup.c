/*
 * kms/cli/backup.c - `kmsctl --config FILE backup OUT | restore IN`.
 *
 * These open the store named by kmsd.conf FILE directly, not through kmsd.
 *
 * backup (SQLite): a consistent online snapshot taken with SQLite's backup
 * API from a read-only connection (kmsd may keep running: the store is in
 * WAL mode, the copy is one read transaction).  The copy goes to a temp
 * file beside OUT (mode 0600), gets the manifest, is fsync'ed and renamed
 * to OUT.  The manifest is stored INSIDE the backup, in the table
 * p11kms_backup_manifest: one row per key version in state active (kind
 * 'kek': key name, version, CKA_ID hex, CKA_LABEL) and one for the audit
 * MAC key (kind 'audit_key'), each with the snapshot time and the last
 * audit sequence number it holds.
 *
 * restore (SQLite): refuses unless kmsd is stopped -- the configured
 * socket must not answer, and an exclusive SQLite lock on the existing
 * store must be obtainable (held until just before the swap).  It opens
 * the token with the configuration's module, URI and PIN and checks that
 * every object of the manifest exists BEFORE anything is replaced.  Then
 * it copies IN to a temp file beside the store (manifest table dropped,
 * KEK creation intents deleted, fsync), removes the old store's -wal and -shm (a stale WAL must never be
 * replayed onto the restored file) and renames the temp over the store.
 * KEK objects in the token that the backup does not know (created after
 * it) are reported; kmsd keeps them (and logs each at start), it never
 * destroys a KEK object it has no creation intent for.  The backup's own
 * intents are deleted for that reason: a creation in flight when the
 * backup was taken may have been committed afterwards, and its object may
 * wrap DEKs the backup does not hold.
 *
 * PostgreSQL: both refuse with a pointer to docs/operations.md (pg_dump,
 * replication).  See docs/operations.md "Backup and restore".
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <sqlite3.h>

#include "kms/cli/kmsctl.h"
#include "kms/core/core.h"
#include "kms/server/config.h"
#include "kms/store/store.h"
#include "module/p11.h"

#define MANIFEST_TABLE "p11kms_backup_manifest"
#define BUSY_MS        10000

typedef struct manifest_row {
    int audit_key; /* 0: a KEK version */
    char key[KMS_NAME_MAX + 1];
    long version;
    unsigned char id[P11_KEK_ID_LEN];
    char hex[2 * P11_KEK_ID_LEN + 1];
    char label[KMS_NAME_MAX + 32];
} manifest_row;

typedef struct manifest {
    manifest_row *rows;
    size_t n, n_kek;
    int64_t taken, audit_seq;
} manifest;

static const char *postgres_msg =
    "store.backend = postgres: kmsctl backup/restore handle the SQLite store only; back up "
    "PostgreSQL with pg_dump or replication (docs/operations.md, \"Backup and restore\")";

/* fsync the directory holding path (so a rename in it is durable). */
static int fsync_dir_of(const char *path)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    int fd, rv;

    if (slash == NULL)
        snprintf(dir, sizeof(dir), ".");
    else if (slash == path)
        snprintf(dir, sizeof(dir), "/");
    else
        snprintf(dir, sizeof(dir), "%.*s", (int)(slash - path), path);
    fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    rv = fsync(fd);
    close(fd);
    return rv;
}

static int sq_exec(sqlite3 *db, const char *sql, const char *what, const char *cmd)
{
    char *err = NULL;

    if (sqlite3_exec(db, sql, NULL, NULL, &err) == SQLITE_OK)
        return 0;
    kms_fail(cmd, "%s: %s", what, err != NULL ? err : sqlite3_errmsg(db));
    sqlite3_free(err);
    return -1;
}

/* Copy the whole database src_path into the (empty) file dst_path with
 * the backup API, in one step (one read transaction: a consistent
 * snapshot even while kmsd writes).  Then switch the copy to a rollback
 * journal so that it is one self-contained file.  *dst stays open. */
static int sq_copy(const char *src_path, const char *dst_path, sqlite3 **dst, const char *cmd)
{
    sqlite3 *src = NULL;
    sqlite3_backup *b = NULL;
    int rc, tries = 0, rv = -1;

    *dst = NULL;
    if (sqlite3_open_v2(src_path, &src, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        kms_fail(cmd, "cannot open %s: %s", src_path, src ? sqlite3_errmsg(src) : "no memory");
        goto out;
    }
    sqlite3_busy_timeout(src, BUSY_MS);
    if (sqlite3_open_v2(dst_path, dst, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK) {
        kms_fail(cmd, "cannot open %s: %s", dst_path, *dst ? sqlite3_errmsg(*dst) : "no memory");
        goto out;
    }
    sqlite3_busy_timeout(*dst, BUSY_MS);
    b = sqlite3_backup_init(*dst, "main", src, "main");
    if (b == NULL) {
        kms_fail(cmd, "cannot start the copy of %s: %s", src_path, sqlite3_errmsg(*dst));
        goto out;
    }
    for (;;) {
        rc = sqlite3_backup_step(b, -1);
        if (rc == SQLITE_DONE)
            break;
        if ((rc == SQLITE_BUSY || rc == SQLITE_LOCKED) && ++tries < 200) {
            sqlite3_sleep(50);
            continue;
        }
        kms_fail(cmd, "copying %s: %s", src_path, sqlite3_errstr(rc));
        goto out;
    }
    rc = sqlite3_backup_finish(b);
    b = NULL;
    if (rc != SQLITE_OK) {
        kms_fail(cmd, "copying %s: %s", src_path, sqlite3_errstr(rc));
        goto out;
    }
    if (sq_exec(*dst, "PRAGMA journal_mode = DELETE", "setting the copy's journal mode", cmd) != 0)
        goto out;
    rv = 0;
out:
    if (b != NULL)
        sqlite3_backup_finish(b);
    sqlite3_close(src);
    if (rv != 0) {
        sqlite3_close(*dst);
        *dst = NULL;
    }
    return rv;
}

/* "ok" from PRAGMA quick_check, else a failure message. */
static int sq_quick_check(sqlite3 *db, const char *path, const char *cmd)
{
    sqlite3_stmt *q = NULL;
    int rv = -1;

    if (sqlite3_prepare_v2(db, "PRAGMA quick_check", -1, &q, NULL) != SQLITE_OK ||
        sqlite3_step(q) != SQLITE_ROW) {
        kms_fail(cmd, "%s: not a readable SQLite database: %s", path, sqlite3_errmsg(db));
        goto out;
    }
    if (strcmp((const char *)sqlite3_column_text(q, 0), "ok") != 0) {
        kms_fail(cmd, "%s: integrity check failed: %s", path, sqlite3_column_text(q, 0));
        goto out;
    }
    rv = 0;
out:
    sqlite3_finalize(q);
    return rv;
}

static int load_config(const kms_cli *cli, const char *cmd, kms_config **cfg)
{
    char err[KMS_CONFIG_ERR_MAX];

    *cfg = NULL;
    if (kms_config_load(cli->config, cfg, err, sizeof(err)) != P11KMS_OK)
        return kms_fail(cmd, "%s", err);
    if (strcmp((*cfg)->store_backend, "postgres") == 0)
        return kms_fail(cmd, "%s", postgres_msg);
    return KMS_EXIT_OK;
}

/* ---- backup ------------------------------------------------------------- */

static const char *manifest_sql =
    "CREATE TABLE " MANIFEST_TABLE " (\n"
    "    kind      TEXT    NOT NULL CHECK (kind IN ('kek', 'audit_key')),\n"
    "    key       TEXT,\n"
    "    version   INTEGER,\n"
    "    token_id  TEXT    NOT NULL CHECK (length(token_id) = 32),\n"
    "    label     TEXT    NOT NULL,\n"
    "    taken     INTEGER NOT NULL,\n"
    "    audit_seq INTEGER NOT NULL\n"
    ")";

static int write_manifest(sqlite3 *db, int64_t now, const char *cmd, long *n_kek,
                          char audit_hex[2 * P11_KEK_ID_LEN + 1], int64_t *audit_seq)
{
    static const char *ins_kek =
        "INSERT INTO " MANIFEST_TABLE " SELECT 'kek', k.name, v.version, lower(hex(v.token_id)),"
        " ?1 || k.name || ':v' || v.version, ?2, (SELECT coalesce(max(seq), 0) FROM audit)"
        " FROM key_versions v JOIN keys k ON k.id = v.key_id WHERE v.state = 'active'";
    static const char *ins_audit =
        "INSERT INTO " MANIFEST_TABLE " SELECT 'audit_key', NULL, NULL, lower(hex(token_id)),"
        " ?1, ?2, (SELECT coalesce(max(seq), 0) FROM audit) FROM audit_key WHERE id = 1";
    sqlite3_stmt *q = NULL;
    int rv = -1;

    audit_hex[0] = '\0';
    if (sq_exec(db, "BEGIN IMMEDIATE", "writing the manifest", cmd) != 0 ||
        sq_exec(db, manifest_sql, "writing the manifest", cmd) != 0)
        goto out;
    for (int i = 0; i < 2; i++) {
        if (sqlite3_prepare_v2(db, i == 0 ? ins_kek : ins_audit, -1, &q, NULL) != SQLITE_OK)
            goto sqlerr;
        sqlite3_bind_text(q, 1, i == 0 ? KMS_KEK_LABEL_PREFIX : KMS_AUDIT_KEY_LABEL, -1,
                          SQLITE_STATIC);
        sqlite3_bind_int64(q, 2, now);
        if (sqlite3_step(q) != SQLITE_DONE)
            goto sqlerr;
        if (i == 0)
            *n_kek = sqlite3_changes(db);
        sqlite3_finalize(q);
        q = NULL;
    }
    if (sqlite3_prepare_v2(db,
                           "SELECT token_id, (SELECT coalesce(max(seq), 0) FROM audit) FROM " MANIFEST_TABLE
                           " WHERE kind = 'audit_key'",
                           -1, &q, NULL) != SQLITE_OK)
        goto sqlerr;
    if (sqlite3_step(q) == SQLITE_ROW) {
        snprintf(audit_hex, 2 * P11_KEK_ID_LEN + 1, "%s", sqlite3_column_text(q, 0));
        *audit_seq = sqlite3_column_int64(q, 1);
    }
    sqlite3_finalize(q);
    q = NULL;
    if (sq_exec(db, "COMMIT", "writing the manifest", cmd) != 0)
        goto out;
    rv = 0;
    goto out;
sqlerr:
    kms_fail(cmd, "writing the manifest: %s", sqlite3_errmsg(db));
out:
    sqlite3_finalize(q);
    return rv;
}

static int do_backup(kms_cli *cli, const kms_config *cfg, const char *out_path)
{
    char *tmp = NULL;
    sqlite3 *db = NULL;
    int fd = -1, rv = KMS_EXIT_FAIL, renamed = 0;
    long n_kek = 0;
    int64_t now = (int64_t)time(NULL), audit_seq = 0;
    char audit_hex[2 * P11_KEK_ID_LEN + 1] = "";
    struct stat sb;

    if (stat(cfg->store_path, &sb) != 0) {
        kms_fail("backup", "store %s: %s", cfg->store_path, strerror(errno));
        goto out;
    }
    if (asprintf(&tmp, "%s.tmp.XXXXXX", out_path) < 0) {
        tmp = NULL;
        kms_fail("internal", "out of memory");
        goto out;
    }
    fd = mkstemp(tmp); /* mode 0600 */
    if (fd < 0) {
        kms_fail("backup", "cannot create %s: %s", tmp, strerror(errno));
        free(tmp);
        tmp = NULL;
        goto out;
    }
    if (fchmod(fd, 0600) != 0) {
        kms_fail("backup", "chmod %s: %s", tmp, strerror(errno));
        goto out;
    }
    if (sq_copy(cfg->store_path, tmp, &db, "backup") != 0)
        goto out;
    if (sq_quick_check(db, tmp, "backup") != 0 ||
        write_manifest(db, now, "backup", &n_kek, audit_hex, &audit_seq) != 0)
        goto out;
    if (sqlite3_close(db) != SQLITE_OK) {
        kms_fail("backup", "closing %s: %s", tmp, sqlite3_errmsg(db));
        db = NULL;
        goto out;
    }
    db = NULL;
    if (fsync(fd) != 0 || close(fd) != 0) {
        fd = -1;
        kms_fail("backup", "writing %s: %s", tmp, strerror(errno));
        goto out;
    }
    fd = -1;
    if (rename(tmp, out_path) != 0) {
        kms_fail("backup", "renaming %s to %s: %s", tmp, out_path, strerror(errno));
        goto out;
    }
    renamed = 1;
    if (fsync_dir_of(out_path) != 0) {
        kms_fail("backup", "fsync of the directory of %s: %s", out_path, strerror(errno));
        goto out;
    }
    if (cli->json) {
        json_t *j = json_pack("{s:s, s:s, s:I, s:I, s:s, s:I, s:s}", "backup", out_path, "store",
                              cfg->store_path, "taken", (json_int_t)now, "key_versions",
                              (json_int_t)n_kek, "audit_key", audit_hex, "audit_seq",
                              (json_int_t)audit_seq, "manifest", MANIFEST_TABLE);
        kms_print_json(j);
        json_decref(j);
    } else {
        printf("backup of %s written to %s\n", cfg->store_path, out_path);
        printf("manifest (table %s in the backup): %ld active key version(s), audit key %s, "
               "audit log up to seq %lld\n",
               MANIFEST_TABLE, n_kek, audit_hex[0] != '\0' ? audit_hex : "(none yet)",
               (long long)audit_seq);
    }
    rv = KMS_EXIT_OK;
out:
    sqlite3_close(db);
    if (fd >= 0)
        close(fd);
    if (tmp != NULL && !renamed)
        unlink(tmp);
    free(tmp);
    return rv;
}

/* Both verbs take one path and need --config: parse, load, run `fn`. */
static int run_with_config(kms_cli *cli, int argc, char **argv, const char *verb,
                           int (*fn)(kms_cli *, const kms_config *, const char *))
{
    const char *pos[1];
    kms_config *cfg = NULL;
    int rv;

    if ((rv = kms_parse(cli, argc, argv, NULL, pos, 1, 1, NULL)) != KMS_EXIT_OK)
        return rv;
    if (cli->config == NULL)
        return kms_usage(cli, "%s needs --config FILE (kmsd.conf) before it", verb);
    if ((rv = load_config(cli, verb, &cfg)) == KMS_EXIT_OK)
        rv = fn(cli, cfg, pos[0]);
    kms_config_free(cfg);
    return rv;
}

static int backup_run(kms_cli *cli, int argc, char **argv)
{
    return run_with_config(cli, argc, argv, "backup", do_backup);
}

/* ---- restore ------------------------------------------------------------ */

static int hex_decode(const char *hex, unsigned char *out, size_t len)
{
    if (hex == NULL || strlen(hex) != 2 * len)
        return -1;
    for (size_t i = 0; i < len; i++) {
        unsigned v = 0;
        for (int k = 0; k < 2; k++) {
            char c = hex[2 * i + k];
            v <<= 4;
            if (c >= '0' && c <= '9')
                v |= (unsigned)(c - '0');
            else if (c >= 'a' && c <= 'f')
                v |= (unsigned)(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F')
                v |= (unsigned)(c - 'A' + 10);
            else
                return -1;
        }
        out[i] = (unsigned char)v;
    }
    return 0;
}

static int manifest_read(const char *in, manifest *m)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *q = NULL;
    int rc, rv = -1;

    memset(m, 0, sizeof(*m));
    if (access(in, R_OK) != 0) {
        kms_fail("restore", "%s: %s", in, strerror(errno));
        goto out;
    }
    if (sqlite3_open_v2(in, &db, SQLITE_OPEN_READONLY, NULL) != SQLITE_OK) {
        kms_fail("restore", "cannot open %s: %s", in, db ? sqlite3_errmsg(db) : "no memory");
        goto out;
    }
    if (sq_quick_check(db, in, "restore") != 0)
        goto out;
    if (sqlite3_prepare_v2(db,
                           "SELECT kind, key, version, token_id, label, taken, audit_seq FROM " MANIFEST_TABLE
                           " ORDER BY kind DESC, key, version",
                           -1, &q, NULL) != SQLITE_OK) {
        kms_fail("restore", "%s is not a kmsctl backup (no " MANIFEST_TABLE " table: %s)", in,
                 sqlite3_errmsg(db));
        goto out;
    }
    while ((rc = sqlite3_step(q)) == SQLITE_ROW) {
        manifest_row *r;
        void *p = realloc(m->rows, (m->n + 1) * sizeof(*m->rows));

        if (p == NULL) {
            kms_fail("internal", "out of memory");
            goto out;
        }
        m->rows = p;
        r = &m->rows[m->n++];
        memset(r, 0, sizeof(*r));
        r->audit_key = strcmp((const char *)sqlite3_column_text(q, 0), "audit_key") == 0;
        if (!r->audit_key)
            m->n_kek++;
        snprintf(r->key, sizeof(r->key), "%s",
                 sqlite3_column_type(q, 1) == SQLITE_NULL ? "" : (const char *)sqlite3_column_text(q, 1));
        r->version = (long)sqlite3_column_int64(q, 2);
        snprintf(r->hex, sizeof(r->hex), "%s", (const char *)sqlite3_column_text(q, 3));
        snprintf(r->label, sizeof(r->label), "%s", (const char *)sqlite3_column_text(q, 4));
        m->taken = sqlite3_column_int64(q, 5);
        m->audit_seq = sqlite3_column_int64(q, 6);
        if (hex_decode(r->hex, r->id, sizeof(r->id)) != 0) {
            kms_fail("restore", "%s: bad CKA_ID '%s' in the manifest", in, r->hex);
            goto out;
        }
    }
    if (rc != SQLITE_DONE) {
        kms_fail("restore", "reading the manifest of %s: %s", in, sqlite3_errmsg(db));
        goto out;
    }
    rv = 0;
out:
    sqlite3_finalize(q);
    sqlite3_close(db);
    return rv;
}

/* 0 when nothing answers on the configured socket. */
static int check_socket_quiet(const kms_config *cfg)
{
    struct sockaddr_un sa;
    int fd, rc, e;

    if (cfg->listen_unix == NULL)
        return 0;
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    if (strlen(cfg->listen_unix) >= sizeof(sa.sun_path))
        return kms_fail("restore", "socket path too long: %s", cfg->listen_unix);
    memcpy(sa.sun_path, cfg->listen_unix, strlen(cfg->listen_unix));
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return kms_fail("restore", "socket: %s", strerror(errno));
    rc = connect(fd, (const struct sockaddr *)&sa, sizeof(sa));
    e = errno;
    close(fd);
    if (rc == 0)
        return kms_fail("restore", "kmsd is running (%s answers): stop it first; nothing was changed",
                        cfg->listen_unix);
    if (e == ENOENT || e == ECONNREFUSED)
        return 0;
    return kms_fail("restore", "cannot tell whether kmsd is running (%s: %s); nothing was changed",
                    cfg->listen_unix, strerror(e));
}

/* Take an exclusive lock on the existing store (if any); *lock stays open
 * and holds it.  Fails when another process (kmsd) has the store open. */
static int lock_store(const char *path, sqlite3 **lock)
{
    int rc;

    *lock = NULL;
    if (access(path, F_OK) != 0)
        return 0; /* nothing to lock: the store was wiped */
    if (sqlite3_open_v2(path, lock, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK)
        goto unreadable;
    sqlite3_busy_timeout(*lock, 0);
    rc = sqlite3_exec(*lock, "PRAGMA locking_mode = EXCLUSIVE; BEGIN EXCLUSIVE; COMMIT", NULL,
                      NULL, NULL);
    if (rc == SQLITE_BUSY || rc == SQLITE_LOCKED) {
        sqlite3_close(*lock);
        *lock = NULL;
        return kms_fail("restore", "the store %s is in use by another process (kmsd?): stop it "
                        "first; nothing was changed", path);
    }
    if (rc == SQLITE_OK)
        return 0;
unreadable:
    /* A damaged store (the likely reason to restore): nothing to lock. */
    fprintf(stderr, "kmsctl: restore: warning: cannot lock the current store %s (%s); replacing "
            "it anyway\n", path, *lock ? sqlite3_errmsg(*lock) : "no memory");
    sqlite3_close(*lock);
    *lock = NULL;
    return 0;
}

/* Every object of the manifest must be in the token.  0, or the exit
 * status after printing what is missing. */
static int check_token(const kms_config *cfg, const manifest *m, const char *in)
{
    p11_config pcfg;
    p11_ctx *token = NULL;
    char *pin = NULL;
    const char *env_pin = getenv("P11KMS_PIN");
    size_t missing = 0, extra = 0, n_ids = 0;
    unsigned char (*ids)[P11_KEK_ID_LEN] = NULL;
    CK_RV crv;
    int rv = KMS_EXIT_FAIL;

    if (cfg->token_pin_file == NULL && (env_pin == NULL || *env_pin == '\0')) {
        kms_fail("restore", "%s: token.pin_file is not set and P11KMS_PIN is not set", cfg->file);
        goto out;
    }
    crv = p11_pin_load(cfg->token_pin_file, &pin);
    if (crv != CKR_OK) {
        kms_fail("restore", "cannot read the token PIN from %s (%s)",
                 env_pin != NULL && *env_pin != '\0' ? "P11KMS_PIN" : cfg->token_pin_file,
                 p11_rv_name(crv));
        goto out;
    }
    if (cfg->token_softhsm2_conf != NULL)
        setenv("SOFTHSM2_CONF", cfg->token_softhsm2_conf, 1);
    memset(&pcfg, 0, sizeof(pcfg));
    pcfg.module = cfg->token_module;
    pcfg.uri = cfg->token_uri;
    pcfg.pin = pin;
    pcfg.max_sessions = 2;
    crv = p11_open(&pcfg, &token);
    p11_pin_free(pin); /* wipes it */
    pin = NULL;
    if (crv != CKR_OK) {
        kms_fail("restore", "cannot open token %s with module %s: %s", cfg->token_uri,
                 cfg->token_module, p11_rv_name(crv));
        goto out;
    }
    for (size_t i = 0; i < m->n; i++) {
        const manifest_row *r = &m->rows[i];

        crv = p11_kek_exists(token, r->id);
        if (crv == CKR_KEY_HANDLE_INVALID) {
            missing++;
            if (r->audit_key)
                fprintf(stderr, "kmsctl: restore: missing from the token: the audit MAC key "
                        "(CKA_ID %s, label %s)\n", r->hex, r->label);
            else
                fprintf(stderr, "kmsctl: restore: missing from the token: key %s version %ld "
                        "(CKA_ID %s, label %s)\n", r->key, r->version, r->hex, r->label);
        } else if (crv != CKR_OK) {
            kms_fail("restore", "token error checking CKA_ID %s: %s; nothing was changed", r->hex,
                     p11_rv_name(crv));
            goto out;
        }
    }
    /* KEK objects the backup does not know (created after it): kmsd
     * keeps them (no creation intent refers to them) and logs each one at
     * start.  Say so here too. */
    crv = p11_kek_list(token, KMS_KEK_LABEL_PREFIX, &ids, &n_ids);
    if (crv == CKR_OK) {
        for (size_t i = 0; i < n_ids; i++) {
            size_t k;

            for (k = 0; k < m->n; k++)
                if (memcmp(ids[i], m->rows[k].id, P11_KEK_ID_LEN) == 0)
                    break;
            if (k < m->n)
                continue;
            extra++;
            fprintf(stderr, "kmsctl: restore: warning: KEK object CKA_ID ");
            for (size_t b = 0; b < P11_KEK_ID_LEN; b++)
                fprintf(stderr, "%02x", ids[i][b]);
            fprintf(stderr, " is in the token but not in the backup\n");
        }
        if (extra > 0 && missing == 0)
            fprintf(stderr, "kmsctl: restore: warning: %zu KEK object(s) newer than the backup: "
                    "kmsd keeps them and logs each one when it starts on the restored store "
                    "(the DEKs they wrapped are not in this backup; a newer backup still needs "
                    "them)\n", extra);
    }
    if (missing > 0) {
        kms_fail("restore", "%zu of the %zu token object(s) the backup %s needs are missing from "
                 "token %s; nothing was changed", missing, m->n, in, cfg->token_uri);
        goto out;
    }
    rv = KMS_EXIT_OK;
out:
    free(ids);
    p11_pin_free(pin);
    p11_close(token);
    return rv;
}

static int unlink_if_there(const char *path, const char *suffix)
{
    char p[PATH_MAX];

    snprintf(p, sizeof(p), "%s%s", path, suffix);
    if (unlink(p) != 0 && errno != ENOENT)
        return kms_fail("restore", "cannot remove %s: %s", p, strerror(errno));
    return 0;
}

static int table_exists(sqlite3 *db, const char *name)
{
    sqlite3_stmt *q = NULL;
    int found = 0;

    if (sqlite3_prepare_v2(db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1",
                           -1, &q, NULL) != SQLITE_OK)
        goto out;
    sqlite3_bind_text(q, 1, name, -1, SQLITE_STATIC);
    found = sqlite3_step(q) == SQLITE_ROW;
out:
    sqlite3_finalize(q);
    return found;
}

static int do_restore(kms_cli *cli, const kms_config *cfg, const char *in)
{
    manifest m;
    sqlite3 *lock = NULL, *db = NULL;
    char *tmp = NULL;
    int fd = -1, rv = KMS_EXIT_FAIL, renamed = 0;

    if (manifest_read(in, &m) != 0)
        goto out;
    if (check_socket_quiet(cfg) != 0 || lock_store(cfg->store_path, &lock) != 0)
        goto out;
    if (check_token(cfg, &m, in) != KMS_EXIT_OK)
        goto out;
    /* The token has everything: build the new store beside the old one. */
    if (asprintf(&tmp, "%s.restore.XXXXXX", cfg->store_path) < 0) {
        tmp = NULL;
        kms_fail("internal", "out of memory");
        goto out;
    }
    fd = mkstemp(tmp); /* mode 0600 */
    if (fd < 0) {
        kms_fail("restore", "cannot create %s: %s", tmp, strerror(errno));
        free(tmp);
        tmp = NULL;
        goto out;
    }
    if (sq_copy(in, tmp, &db, "restore") != 0 ||
        sq_exec(db, "DROP TABLE " MANIFEST_TABLE, "dropping the manifest", "restore") != 0)
        goto out;
    /* The backup's creation intents (a store of schema 4 or later) may
     * name objects committed after the backup: never let kmsd treat them
     * as orphans of the restored store. */
    if (table_exists(db, "kek_intents") &&
        sq_exec(db, "DELETE FROM kek_intents", "deleting KEK creation intents", "restore") != 0)
        goto out;
    if (sqlite3_close(db) != SQLITE_OK) {
        kms_fail("restore", "closing %s: %s", tmp, sqlite3_errmsg(db));
        db = NULL;
        goto out;
    }
    db = NULL;
    if (fsync(fd) != 0 || close(fd) != 0) {
        fd = -1;
        kms_fail("restore", "writing %s: %s", tmp, strerror(errno));
        goto out;
    }
    fd = -1;
    /* Swap.  Release the lock (closing checkpoints the old WAL), then drop
     * the old -wal/-shm BEFORE the rename: a stale WAL left beside the
     * restored file would be replayed onto it.  A crash in between leaves
     * the old store without its WAL (it is being replaced anyway) and the
     * complete new copy in the temp file. */
    sqlite3_close(lock);
    lock = NULL;
    if (unlink_if_there(cfg->store_path, "-wal") != 0 ||
        unlink_if_there(cfg->store_path, "-shm") != 0 ||
        unlink_if_there(cfg->store_path, "-journal") != 0)
        goto out;
    if (rename(tmp, cfg->store_path) != 0) {
        kms_fail("restore", "renaming %s to %s: %s", tmp, cfg->store_path, strerror(errno));
        goto out;
    }
    renamed = 1;
    if (fsync_dir_of(cfg->store_path) != 0) {
        kms_fail("restore", "fsync of the directory of %s: %s", cfg->store_path, strerror(errno));
        goto out;
    }
    if (cli->json) {
        json_t *j = json_pack("{s:s, s:s, s:I, s:I, s:I, s:b}", "restored", in, "store",
                              cfg->store_path, "taken", (json_int_t)m.taken, "key_versions",
                              (json_int_t)m.n_kek, "audit_seq", (json_int_t)m.audit_seq,
                              "token_checked", 1);
        kms_print_json(j);
        json_decref(j);
    } else {
        char when[64] = "?";
        time_t t = (time_t)m.taken;
        struct tm tm;

        if (gmtime_r(&t, &tm) != NULL)
            strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
        printf("restored %s from %s (backup taken %s, audit log up to seq %lld)\n",
               cfg->store_path, in, when, (long long)m.audit_seq);
        printf("token %s holds all %zu key version(s) and the audit key of the manifest\n",
               cfg->token_uri, m.n_kek);
        for (size_t i = 0; i < m.n; i++)
            if (!m.rows[i].audit_key)
                printf("  %s v%ld  %s\n", m.rows[i].key, m.rows[i].version, m.rows[i].hex);
        printf("DEKs destroyed after the backup are back: re-apply those destroys "
               "(docs/operations.md, \"Backup and restore\")\n");
    }
    rv = KMS_EXIT_OK;
out:
    sqlite3_close(db);
    sqlite3_close(lock);
    if (fd >= 0)
        close(fd);
    if (tmp != NULL && !renamed)
        unlink(tmp);
    free(tmp);
    free(m.rows);
    return rv;
}

static int restore_run(kms_cli *cli, int argc, char **argv)
{
    return run_with_config(cli, argc, argv, "restore", do_restore);
}

static const kms_command backup_commands[] = {
    {NULL, "--config FILE backup OUT", "write a consistent copy of the store to OUT",
     "Opens the SQLite store of kmsd.conf FILE directly (read-only) and writes a\n"
     "consistent snapshot to OUT (mode 0600, atomically); works while kmsd runs.\n"
     "The backup holds a manifest (table p11kms_backup_manifest) of the token\n"
     "objects it needs: every active key version (name, version, CKA_ID, label)\n"
     "and the audit MAC key.  The token itself is not copied: back it up with the\n"
     "HSM's own tools.  PostgreSQL: use pg_dump or replication (exit 1).\n",
     backup_run},
};

static const kms_command restore_commands[] = {
    {NULL, "--config FILE restore IN", "replace the store by the backup IN (kmsd stopped)",
     "Replaces the SQLite store of kmsd.conf FILE by the backup IN.  kmsd must be\n"
     "stopped (its socket must not answer; the store must not be open).  Every\n"
     "token object of IN's manifest is checked in the token first; if one is\n"
     "missing nothing is changed.  DEKs destroyed after the backup come back:\n"
     "see docs/operations.md.  PostgreSQL: use pg_dump or replication (exit 1).\n",
     restore_run},
};

const kms_noun kms_noun_backup = {
    "backup", "Back up the store", NULL, backup_commands, 1,
};

const kms_noun kms_noun_restore = {
    "restore", "Restore the store", NULL, restore_commands, 1,
};
