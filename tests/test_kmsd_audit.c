/*
 * tests/test_kmsd_audit.c - the audit log of the real kmsd on a real
 * SoftHSM2 token, on SQLite (and on PostgreSQL as test_kmsd_audit_pg):
 * every operation class appends an entry with the right fields, allowed
 * and refused (a second uid: a child that drops to 65534); the plaintext
 * of a data key never reaches the log (the database file is scanned); an
 * edited, deleted, inserted or reordered row and a deleted tail are
 * reported by GET /v1/audit/verify at that entry, /v1/health says
 * "audit":"broken" and kmsd keeps serving and appending; a failing audit
 * write makes the operation not happen (fail closed); the audit MAC key
 * kmsd created in the token is sensitive, non-extractable, sign/verify
 * only, and survives restarts (orphan reconciliation leaves it alone).
 * kmsctl's audit commands are tested in test_kmsctl_cli.c.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <grp.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "module/p11.h"
#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

#define NOBODY 65534
#define CTX    "{\"context\":{\"customer\":\"42\"}}"

static kh_kmsd K;

/* kmsd.conf: socket mode 0666 and a policy granting uid 0 everything. */
static void write_conf(void)
{
    char *text, *fixed = NULL, *at;

    ck_assert_int_eq(kh_write_conf(&K, NULL, "[policy]\nfile = policy.conf\n"), 0);
    text = kh_read_file(K.conf, NULL);
    ck_assert_ptr_nonnull(text);
    at = strstr(text, "unix = kmsd.sock\n");
    ck_assert_ptr_nonnull(at);
    at += strlen("unix = kmsd.sock\n");
    ck_assert_int_gt(asprintf(&fixed, "%.*sunix_mode = 0666\n%s", (int)(at - text), text, at), 0);
    ck_assert_int_eq(kh_write_file(K.conf, fixed, 0600), 0);
    free(text);
    free(fixed);
}

static void start(void)
{
    char path[400];

    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-audit", NULL, NULL), 0);
    ck_assert_int_eq(chmod(K.dir, 0711), 0); /* uid 65534 reaches the socket */
    snprintf(path, sizeof(path), "%s/policy.conf", K.dir);
    ck_assert_int_eq(kh_write_file(path, "allow uid:0 all on *\n", 0644), 0);
    write_conf();
    ck_assert_int_eq(kh_start(&K), 0);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);

    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

/* ---- requests ---- */

typedef struct result {
    long status;
    char body[4096];
} result;

/* One request as uid (0: this process; else a child dropped to uid). */
static result call_as(uid_t uid, const char *method, const char *path, const char *body)
{
    result res;
    kh_response r;
    int fds[2], st = 0;
    pid_t pid;

    memset(&res, 0, sizeof(res));
    if (uid == 0) {
        ck_assert_msg(kh_request(K.sock, method, path, body, body ? strlen(body) : 0, NULL, &r) ==
                          0,
                      "%s %s: no response", method, path);
        res.status = r.status;
        snprintf(res.body, sizeof(res.body), "%s", r.body);
        kh_response_free(&r);
        return res;
    }
    ck_assert_int_eq(pipe(fds), 0);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(fds[0]);
        res.status = -1;
        if (setgroups(0, NULL) == 0 && setgid(NOBODY) == 0 && setuid(uid) == 0 &&
            kh_request(K.sock, method, path, body, body ? strlen(body) : 0, NULL, &r) == 0) {
            res.status = r.status;
            snprintf(res.body, sizeof(res.body), "%s", r.body);
            kh_response_free(&r);
        }
        if (write(fds[1], &res, sizeof(res)) != (ssize_t)sizeof(res))
            _exit(2);
        _exit(0);
    }
    close(fds[1]);
    ck_assert_int_eq(read(fds[0], &res, sizeof(res)), (ssize_t)sizeof(res));
    close(fds[0]);
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    return res;
}

/* As uid 0; the whole body parsed (listings exceed result.body). */
static json_t *call_json(const char *method, const char *path, const char *body, long want)
{
    kh_response r;
    json_t *j;

    ck_assert_msg(kh_request(K.sock, method, path, body, body ? strlen(body) : 0, NULL, &r) == 0,
                  "%s %s: no response", method, path);
    ck_assert_msg(r.status == want, "%s %s: %ld, want %ld: %.300s", method, path, r.status, want,
                  r.body);
    j = json_loadb(r.body, r.len, 0, NULL);
    ck_assert_msg(j != NULL, "%s %s: not JSON: %.300s", method, path, r.body);
    kh_response_free(&r);
    return j;
}

static void expect(uid_t uid, const char *method, const char *path, const char *body, long want)
{
    result r = call_as(uid, method, path, body);

    ck_assert_msg(r.status == want, "%s %s as %u: %ld, want %ld: %s", method, path, (unsigned)uid,
                  r.status, want, r.body);
}

/* Every entry after seq `after` (oldest first), paging by 1000. */
static json_t *entries_after(json_int_t after)
{
    json_t *all = json_array();

    for (;;) {
        char path[96];
        json_t *j, *page;
        size_t n;

        snprintf(path, sizeof(path), "/v1/audit?after=%lld&limit=1000", (long long)after);
        j = call_json("GET", path, NULL, 200);
        page = json_object_get(j, "entries");
        ck_assert(json_is_array(page));
        n = json_array_size(page);
        json_array_extend(all, page);
        if (n > 0)
            after = json_integer_value(json_object_get(json_array_get(page, n - 1), "seq"));
        json_decref(j);
        if (n < 1000)
            break;
    }
    return all;
}

/* The seq of the last entry (an audit.list entry is appended by asking). */
static json_int_t last_seq(void)
{
    json_t *all = entries_after(0);
    size_t n = json_array_size(all);
    json_int_t seq = n ? json_integer_value(json_object_get(json_array_get(all, n - 1), "seq")) : 0;

    json_decref(all);
    return seq;
}

static const char *str(const json_t *e, const char *field)
{
    const json_t *v = json_object_get(e, field);

    return json_is_string(v) ? json_string_value(v) : "";
}

/* The first entry of `entries` with this operation and principal, after
 * index *from (advanced past it); fails the test when there is none. */
static const json_t *find(const json_t *entries, size_t *from, const char *operation,
                          const char *principal)
{
    for (size_t i = *from; i < json_array_size(entries); i++) {
        const json_t *e = json_array_get(entries, i);
        if (strcmp(str(e, "operation"), operation) == 0 &&
            strcmp(str(e, "principal"), principal) == 0) {
            *from = i + 1;
            return e;
        }
    }
    ck_abort_msg("no audit entry %s by %s", operation, principal);
    return NULL;
}

static void check_entry(const json_t *e, const char *key, json_int_t version, const char *dek_id,
                        const char *res, const char *error_code)
{
    const json_t *v = json_object_get(e, "version"), *t = json_object_get(e, "time");
    char *dump = json_dumps(e, JSON_COMPACT);

    ck_assert_msg(key == NULL ? json_is_null(json_object_get(e, "key"))
                              : strcmp(str(e, "key"), key) == 0,
                  "key in %s", dump);
    if (version >= 0)
        ck_assert_msg(version == 0 ? json_is_null(v) : json_integer_value(v) == version,
                      "version in %s", dump);
    if (dek_id != NULL)
        ck_assert_msg(strcmp(str(e, "dek_id"), dek_id) == 0, "dek_id in %s", dump);
    ck_assert_msg(strcmp(str(e, "result"), res) == 0, "result in %s", dump);
    ck_assert_msg(error_code == NULL ? json_is_null(json_object_get(e, "error_code"))
                                     : strcmp(str(e, "error_code"), error_code) == 0,
                  "error_code in %s", dump);
    ck_assert_msg(json_is_string(t) && strlen(json_string_value(t)) == 20, "time in %s", dump);
    ck_assert_int_gt(json_integer_value(json_object_get(e, "seq")), 0);
    free(dump);
}

static void generate(const char *key, char id[64], char b64[64])
{
    char path[128];
    json_t *j;

    snprintf(path, sizeof(path), "/v1/keys/%s/datakeys", key);
    j = call_json("POST", path, CTX, 201);
    snprintf(id, 64, "%s", str(j, "dek_id"));
    if (b64 != NULL)
        snprintf(b64, 64, "%s", str(j, "plaintext"));
    json_decref(j);
}

/* ---- every operation class ---- */

START_TEST(every_operation_is_audited)
{
    char id[64], id2[64], p[160];
    json_t *all, *j;
    json_int_t before = last_seq();
    size_t at = 0;
    const json_t *e;

    j = call_json("POST", "/v1/keys", "{\"name\":\"aud\"}", 201);
    json_decref(j);
    expect(0, "POST", "/v1/keys", "{\"name\":\"aud\"}", 409);
    expect(0, "GET", "/v1/keys/aud", NULL, 200);
    expect(0, "GET", "/v1/keys", NULL, 200);
    generate("aud", id, NULL);
    snprintf(p, sizeof(p), "/v1/datakeys/%s/decrypt", id);
    expect(0, "POST", p, CTX, 200);
    expect(0, "POST", p, "{\"context\":{\"customer\":\"43\"}}", 400);
    snprintf(p, sizeof(p), "/v1/datakeys/%s", id);
    expect(0, "GET", p, NULL, 200);
    expect(0, "GET", "/v1/datakeys?key=aud", NULL, 200);
    expect(0, "POST", "/v1/keys/aud/rotate", NULL, 200);
    expect(0, "POST", "/v1/keys/aud/rewrap", NULL, 200);
    expect(0, "POST", "/v1/keys/aud/disable", NULL, 200);
    expect(0, "POST", "/v1/keys/aud/enable", NULL, 200);
    expect(0, "POST", "/v1/keys/aud/config", "{\"rotation_period\":\"90d\"}", 200);
    expect(0, "DELETE", "/v1/keys/aud/versions/1", NULL, 200);
    snprintf(p, sizeof(p), "/v1/datakeys/%s/revoke", id);
    expect(0, "POST", p, "{\"reason\":\"compromised\"}", 200);
    snprintf(p, sizeof(p), "/v1/datakeys/%s", id);
    expect(0, "DELETE", p, NULL, 200);
    generate("aud", id2, NULL);
    expect(0, "POST", "/v1/datakeys/revoke",
           "{\"key\":\"aud\",\"context\":{\"customer\":\"42\"},\"reason\":\"superseded\"}", 200);
    expect(0, "POST", "/v1/datakeys/destroy", "{\"key\":\"aud\",\"context\":{\"customer\":\"42\"}}",
           200);
    expect(0, "POST", "/v1/keys/nope/rotate", NULL, 404);
    expect(0, "GET", "/v1/audit/verify", NULL, 200);
    /* refused, as uid 65534 (nothing granted) */
    expect(NOBODY, "POST", "/v1/keys/aud/datakeys", "{}", 403);
    snprintf(p, sizeof(p), "/v1/datakeys/%s/decrypt", id2);
    expect(NOBODY, "POST", p, CTX, 403);
    expect(NOBODY, "GET", "/v1/keys/aud", NULL, 403);
    expect(NOBODY, "GET", "/v1/audit", NULL, 403);
    expect(NOBODY, "GET", "/v1/health", NULL, 200); /* open: not audited */

    all = entries_after(before);
    e = find(all, &at, "key.create", "uid:0");
    check_entry(e, "aud", 1, NULL, "ok", NULL);
    e = find(all, &at, "key.create", "uid:0");
    check_entry(e, "aud", 0, NULL, "error", "key_exists");
    check_entry(find(all, &at, "key.show", "uid:0"), "aud", 0, NULL, "ok", NULL);
    check_entry(find(all, &at, "key.list", "uid:0"), NULL, 0, NULL, "ok", NULL);
    check_entry(find(all, &at, "datakey.generate", "uid:0"), "aud", 1, id, "ok", NULL);
    check_entry(find(all, &at, "datakey.decrypt", "uid:0"), "aud", 1, id, "ok", NULL);
    check_entry(find(all, &at, "datakey.decrypt", "uid:0"), "aud", 1, id, "error",
                "context_mismatch");
    check_entry(find(all, &at, "datakey.show", "uid:0"), "aud", 1, id, "ok", NULL);
    check_entry(find(all, &at, "datakey.list", "uid:0"), "aud", 0, NULL, "ok", NULL);
    check_entry(find(all, &at, "key.rotate", "uid:0"), "aud", 2, NULL, "ok", NULL);
    check_entry(find(all, &at, "key.rewrap", "uid:0"), "aud", 2, NULL, "ok", NULL);
    check_entry(find(all, &at, "key.disable", "uid:0"), "aud", 0, NULL, "ok", NULL);
    check_entry(find(all, &at, "key.enable", "uid:0"), "aud", 0, NULL, "ok", NULL);
    check_entry(find(all, &at, "key.config", "uid:0"), "aud", -1, NULL, "ok", NULL);
    check_entry(find(all, &at, "key.retire", "uid:0"), "aud", 1, NULL, "ok", NULL);
    check_entry(find(all, &at, "datakey.revoke", "uid:0"), "aud", 2, id, "ok", NULL);
    check_entry(find(all, &at, "datakey.destroy", "uid:0"), "aud", 2, id, "ok", NULL);
    check_entry(find(all, &at, "datakey.generate", "uid:0"), "aud", 2, id2, "ok", NULL);
    check_entry(find(all, &at, "datakey.bulk_revoke", "uid:0"), "aud", 0, "", "ok", NULL);
    check_entry(find(all, &at, "datakey.bulk_destroy", "uid:0"), "aud", 0, "", "ok", NULL);
    check_entry(find(all, &at, "key.rotate", "uid:0"), "nope", 0, NULL, "error", "key_not_found");
    check_entry(find(all, &at, "audit.verify", "uid:0"), NULL, 0, NULL, "ok", NULL);
    check_entry(find(all, &at, "datakey.generate", "uid:65534"), "aud", 0, NULL, "refused",
                "forbidden");
    check_entry(find(all, &at, "datakey.decrypt", "uid:65534"), "aud", 0, id2, "refused",
                "forbidden");
    check_entry(find(all, &at, "key.show", "uid:65534"), "aud", 0, NULL, "refused", "forbidden");
    check_entry(find(all, &at, "audit.list", "uid:65534"), NULL, 0, NULL, "refused", "forbidden");
    /* Oldest first, without gaps. */
    for (size_t i = 1; i < json_array_size(all); i++)
        ck_assert_int_eq(json_integer_value(json_object_get(json_array_get(all, i), "seq")),
                         json_integer_value(json_object_get(json_array_get(all, i - 1), "seq")) +
                             1);
    json_decref(all);
    j = call_json("GET", "/v1/audit/verify", NULL, 200);
    ck_assert_msg(json_is_true(json_object_get(j, "ok")), "verify: %s", json_dumps(j, 0));
    json_decref(j);
}
END_TEST

START_TEST(list_parameters)
{
    json_t *j;
    json_int_t a, b;

    expect(0, "GET", "/v1/keys", NULL, 200);
    expect(0, "GET", "/v1/keys", NULL, 200);
    j = call_json("GET", "/v1/audit?limit=2", NULL, 200);
    ck_assert_int_eq(json_array_size(json_object_get(j, "entries")), 2);
    a = json_integer_value(
        json_object_get(json_array_get(json_object_get(j, "entries"), 0), "seq"));
    b = json_integer_value(
        json_object_get(json_array_get(json_object_get(j, "entries"), 1), "seq"));
    ck_assert_int_eq(a, 1);
    ck_assert_int_eq(b, 2);
    json_decref(j);
    j = call_json("GET", "/v1/audit?after=1&limit=1", NULL, 200);
    ck_assert_int_eq(json_integer_value(
                         json_object_get(json_array_get(json_object_get(j, "entries"), 0), "seq")),
                     2);
    json_decref(j);
    j = call_json("GET", "/v1/audit?after=999999999", NULL, 200);
    ck_assert_int_eq(json_array_size(json_object_get(j, "entries")), 0);
    json_decref(j);
    expect(0, "GET", "/v1/audit?limit=0", NULL, 400);
    expect(0, "GET", "/v1/audit?limit=1001", NULL, 400);
    expect(0, "GET", "/v1/audit?after=-1", NULL, 400);
    expect(0, "GET", "/v1/audit?after=x", NULL, 400);
    expect(0, "GET", "/v1/audit?cursor=1", NULL, 400);
    expect(0, "GET", "/v1/audit?limit=1&limit=2", NULL, 400);
    expect(0, "POST", "/v1/audit", NULL, 405);
}
END_TEST

/* ---- no secret in the log ---- */

static int contains(const unsigned char *hay, size_t n, const void *needle, size_t len)
{
    return n >= len && memmem(hay, n, needle, len) != NULL;
}

START_TEST(plaintext_never_logged)
{
    char id[64], b64[64], p[160], sql[512];
    unsigned char key[48];
    int klen;

    expect(0, "POST", "/v1/keys", "{\"name\":\"secret\"}", 201);
    generate("secret", id, b64);
    klen = ku_b64_key(b64, key);
    ck_assert_int_eq(klen, 32);
    snprintf(p, sizeof(p), "/v1/datakeys/%s/decrypt", id);
    expect(0, "POST", p, CTX, 200);
    /* No audit column holds it (either backend). */
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM audit WHERE operation LIKE '%%%s%%' OR key LIKE '%%%s%%' OR "
             "dek_id LIKE '%%%s%%' OR error_code LIKE '%%%s%%' OR result LIKE '%%%s%%'",
             b64, b64, b64, b64, b64);
    ck_assert_int_eq(ts_db_int(&K.store, sql), 0);
    ck_assert_int_gt(ts_db_int(&K.store, "SELECT count(*) FROM audit"), 0);
    if (!K.store.pg) {
        /* SQLite: the raw bytes and their base64 are nowhere in the files. */
        const char *suffix[] = {"", "-wal"};
        for (int i = 0; i < 2; i++) {
            char path[600];
            size_t n = 0;
            unsigned char *data;

            snprintf(path, sizeof(path), "%s%s", K.db, suffix[i]);
            data = (unsigned char *)kh_read_file(path, &n);
            if (data == NULL)
                continue;
            ck_assert_msg(!contains(data, n, key, 32), "plaintext DEK in %s", path);
            ck_assert_msg(!contains(data, n, b64, strlen(b64)), "base64 DEK in %s", path);
            free(data);
        }
    }
}
END_TEST

/* ---- fail closed ---- */

START_TEST(failing_audit_write_fails_closed)
{
    char id[64], p[160];
    json_t *j;
    long long deks, active;
    result r;

    expect(0, "POST", "/v1/keys", "{\"name\":\"closed\"}", 201);
    generate("closed", id, NULL);
    deks = ts_db_int(&K.store, "SELECT count(*) FROM deks");
    /* Every audit row insert now fails inside the store. */
    if (K.store.pg) {
        ck_assert_int_eq(ts_db_exec(&K.store,
                                    "CREATE FUNCTION audit_fail() RETURNS trigger LANGUAGE plpgsql "
                                    "AS $$BEGIN RAISE EXCEPTION 'audit write refused (test)'; "
                                    "END$$"),
                         0);
        ck_assert_int_eq(ts_db_exec(&K.store, "CREATE TRIGGER audit_fail BEFORE INSERT ON audit "
                                              "FOR EACH ROW EXECUTE PROCEDURE audit_fail()"),
                         0);
    } else {
        ck_assert_int_eq(ts_db_exec(&K.store, "CREATE TRIGGER audit_fail BEFORE INSERT ON audit "
                                              "BEGIN SELECT RAISE(ABORT, 'audit write refused "
                                              "(test)'); END"),
                         0);
    }
    /* decrypt: no plaintext without its entry */
    snprintf(p, sizeof(p), "/v1/datakeys/%s/decrypt", id);
    r = call_as(0, "POST", p, CTX);
    ck_assert_msg(r.status == 503, "decrypt: %ld %s", r.status, r.body);
    ck_assert_ptr_null(strstr(r.body, "plaintext"));
    ck_assert_ptr_nonnull(strstr(r.body, "store_unavailable"));
    /* generate: no DEK row either (one transaction) */
    r = call_as(0, "POST", "/v1/keys/closed/datakeys", CTX);
    ck_assert_msg(r.status == 503, "generate: %ld %s", r.status, r.body);
    ck_assert_ptr_null(strstr(r.body, "plaintext"));
    ck_assert_int_eq(ts_db_int(&K.store, "SELECT count(*) FROM deks"), deks);
    /* revoke: the state does not change */
    snprintf(p, sizeof(p), "/v1/datakeys/%s/revoke", id);
    expect(0, "POST", p, "{\"reason\":\"compromised\"}", 503);
    snprintf(p, sizeof(p), "SELECT count(*) FROM deks WHERE id = '%s' AND state = 'active'", id);
    active = ts_db_int(&K.store, p);
    ck_assert_int_eq(active, 1);
    /* rotate: no new version */
    expect(0, "POST", "/v1/keys/closed/rotate", NULL, 503);
    /* a refusal is still a refusal */
    expect(NOBODY, "POST", "/v1/keys/closed/datakeys", "{}", 403);
    /* health: the token and the store answer (reads work) */
    j = call_json("GET", "/v1/health", NULL, 200);
    json_decref(j);

    if (K.store.pg) {
        ck_assert_int_eq(ts_db_exec(&K.store, "DROP TRIGGER audit_fail ON audit"), 0);
        ck_assert_int_eq(ts_db_exec(&K.store, "DROP FUNCTION audit_fail()"), 0);
    } else {
        ck_assert_int_eq(ts_db_exec(&K.store, "DROP TRIGGER audit_fail"), 0);
    }
    snprintf(p, sizeof(p), "/v1/datakeys/%s/decrypt", id);
    expect(0, "POST", p, CTX, 200);
    j = call_json("GET", "/v1/keys/closed", NULL, 200);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "latest_version")), 1);
    json_decref(j);
    j = call_json("GET", "/v1/audit/verify", NULL, 200);
    ck_assert_msg(json_is_true(json_object_get(j, "ok")), "verify after the failures");
    json_decref(j);
}
END_TEST

/* ---- tampering ---- */

static void exec_sql(const char *q)
{
    ck_assert_msg(ts_db_exec(&K.store, q) == 0, "%s", q);
}

static void restart(void)
{
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    ck_assert_int_eq(kh_start(&K), 0);
}

static long long max_seq(void)
{
    return ts_db_int(&K.store, "SELECT max(seq) FROM audit");
}

/* A way to tamper with the log (kmsd stopped); returns the entry that
 * verification must name. */
typedef long long (*tamper_fn)(void);

/* Stop kmsd, save the log, tamper with it, start kmsd again and check
 * that verification, health and the start-up log report the entry, that
 * kmsd keeps serving and appends after the sealed head; then put the log
 * back as it was and check that it verifies again. */
static void tamper_case(const char *what, tamper_fn fn)
{
    json_t *j;
    long long head_before, want;
    char id[64];

    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    exec_sql("CREATE TABLE audit_saved AS SELECT * FROM audit");
    exec_sql("CREATE TABLE audit_head_saved AS SELECT * FROM audit_head");
    head_before = ts_db_int(&K.store, "SELECT seq FROM audit_head");
    ck_assert_int_gt(head_before, 10);
    want = fn();
    ck_assert_int_eq(kh_start(&K), 0);

    j = call_json("GET", "/v1/health", NULL, 200);
    ck_assert_msg(strcmp(str(j, "audit"), "broken") == 0, "%s: health says audit %s", what,
                  str(j, "audit"));
    ck_assert_str_eq(str(j, "status"), "ok");
    json_decref(j);
    {
        char *log = kh_read_file(K.log, NULL);
        ck_assert_ptr_nonnull(log);
        ck_assert_msg(strstr(log, "AUDIT LOG BROKEN") != NULL, "%s: not in the log", what);
        free(log);
    }
    j = call_json("GET", "/v1/audit/verify", NULL, 200);
    ck_assert_msg(json_is_false(json_object_get(j, "ok")), "%s: verify says ok", what);
    ck_assert_msg(json_integer_value(json_object_get(j, "first_bad")) == want,
                  "%s: first_bad %lld, want %lld: %s", what,
                  (long long)json_integer_value(json_object_get(j, "first_bad")), want,
                  str(j, "reason"));
    ck_assert(strlen(str(j, "reason")) > 0);
    json_decref(j);
    /* kmsd keeps serving, and new entries follow the sealed head */
    generate("tamper", id, NULL);
    ck_assert_int_gt(max_seq(), head_before);
    j = call_json("GET", "/v1/audit/verify", NULL, 200);
    ck_assert_int_eq(json_integer_value(json_object_get(j, "first_bad")), want);
    json_decref(j);

    /* Put it back: the chain is whole again. */
    ck_assert_int_eq(kh_stop(&K, SIGTERM), 0);
    exec_sql("DELETE FROM audit");
    exec_sql("INSERT INTO audit SELECT * FROM audit_saved");
    exec_sql("DELETE FROM audit_head");
    exec_sql("INSERT INTO audit_head SELECT * FROM audit_head_saved");
    exec_sql("DROP TABLE audit_saved");
    exec_sql("DROP TABLE audit_head_saved");
    ck_assert_int_eq(kh_start(&K), 0);
    j = call_json("GET", "/v1/health", NULL, 200);
    ck_assert_str_eq(str(j, "audit"), "ok");
    json_decref(j);
    j = call_json("GET", "/v1/audit/verify", NULL, 200);
    ck_assert_msg(json_is_true(json_object_get(j, "ok")), "%s: restored log: %s", what,
                  str(j, "reason"));
    json_decref(j);
}

static long long t_edit(void)
{
    exec_sql("UPDATE audit SET principal = 'uid:4242' WHERE seq = 5");
    return 5;
}

/* An error entry made to look like a success. */
static long long t_edit_result(void)
{
    long long k = ts_db_int(&K.store, "SELECT min(seq) FROM audit WHERE result = 'error'");
    char q[128];

    ck_assert_int_gt(k, 0);
    snprintf(q, sizeof(q), "UPDATE audit SET result = 'ok', error_code = NULL WHERE seq = %lld", k);
    exec_sql(q);
    return k;
}

static long long t_delete(void)
{
    exec_sql("DELETE FROM audit WHERE seq = 6");
    return 6;
}

/* A copy of entry 6 inserted as entry 7 (the later ones renumbered). */
static long long t_insert(void)
{
    exec_sql("UPDATE audit SET seq = -seq WHERE seq >= 7");
    exec_sql("UPDATE audit SET seq = -seq + 1 WHERE seq < 0");
    exec_sql("INSERT INTO audit SELECT 7, time, principal, operation, key, version, dek_id, "
             "result, error_code, prev_hash, hash, mac FROM audit WHERE seq = 6");
    return 7;
}

/* Entries 4 and 5 swap places. */
static long long t_reorder(void)
{
    exec_sql("UPDATE audit SET seq = -1 WHERE seq = 4");
    exec_sql("UPDATE audit SET seq = 4 WHERE seq = 5");
    exec_sql("UPDATE audit SET seq = 5 WHERE seq = -1");
    return 4;
}

/* The last two entries deleted (audit_head still names the last). */
static long long t_truncate(void)
{
    long long last = max_seq();

    exec_sql("DELETE FROM audit WHERE seq >= (SELECT max(seq) - 1 FROM audit)");
    return last - 1;
}

/* An entry appended behind kmsd's back, properly chained but unsealed
 * (anyone can compute SHA-256; nobody without the token can seal). */
static long long t_append(void)
{
    long long last = max_seq();

    exec_sql("INSERT INTO audit SELECT seq + 1, time, principal, operation, key, version, "
             "dek_id, result, error_code, hash, hash, NULL FROM audit "
             "WHERE seq = (SELECT max(seq) FROM audit)");
    return last + 1;
}

START_TEST(tampering_is_detected_at_that_entry)
{
    expect(0, "POST", "/v1/keys", "{\"name\":\"tamper\"}", 201);
    for (int i = 0; i < 6; i++) {
        char id[64];
        generate("tamper", id, NULL);
    }
    expect(0, "POST", "/v1/keys/nope/rotate", NULL, 404);
    ck_assert_int_gt(last_seq(), 10);
    tamper_case("edit", t_edit);
    tamper_case("edit result", t_edit_result);
    tamper_case("delete", t_delete);
    tamper_case("insert", t_insert);
    tamper_case("reorder", t_reorder);
    tamper_case("truncate the tail", t_truncate);
    tamper_case("append unsealed", t_append);
}
END_TEST

/* ---- the MAC key ---- */

START_TEST(audit_key_in_token)
{
    p11_config cfg = {K.tt.module, K.tt.uri, TT_PIN, 0};
    p11_ctx *ctx = NULL;
    CK_FUNCTION_LIST *fl;
    CK_SESSION_HANDLE s;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    static const char label[] = "p11kms-audit:v1";
    CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof(cls)}, {CKA_LABEL, (void *)label, 15}};
    CK_OBJECT_HANDLE h[4];
    CK_ULONG n = 0;
    CK_BBOOL sens = 0, extr = 1, sign = 0, verify = 0, enc = 1, dec = 1, wrap = 1, unwrap = 1;
    CK_KEY_TYPE kt = 0;
    unsigned char id[32];
    CK_ATTRIBUTE a[] = {
        {CKA_SENSITIVE, &sens, 1}, {CKA_EXTRACTABLE, &extr, 1}, {CKA_SIGN, &sign, 1},
        {CKA_VERIFY, &verify, 1},  {CKA_ENCRYPT, &enc, 1},      {CKA_DECRYPT, &dec, 1},
        {CKA_WRAP, &wrap, 1},      {CKA_UNWRAP, &unwrap, 1},    {CKA_KEY_TYPE, &kt, sizeof(kt)},
        {CKA_ID, id, sizeof(id)},
    };
    unsigned char stored[16];
    json_t *j;

    restart(); /* reconciliation at start must leave the key alone */
    j = call_json("GET", "/v1/audit/verify", NULL, 200);
    ck_assert(json_is_true(json_object_get(j, "ok")));
    json_decref(j);
    ck_assert_uint_eq(p11_open(&cfg, &ctx), CKR_OK);
    fl = p11_function_list(ctx);
    ck_assert_uint_eq(fl->C_OpenSession(p11_slot_id(ctx), CKF_SERIAL_SESSION, NULL, NULL, &s),
                      CKR_OK);
    ck_assert_uint_eq(fl->C_FindObjectsInit(s, t, 2), CKR_OK);
    ck_assert_uint_eq(fl->C_FindObjects(s, h, 4, &n), CKR_OK);
    ck_assert_uint_eq(fl->C_FindObjectsFinal(s), CKR_OK);
    ck_assert_uint_eq(n, 1); /* exactly one, however many restarts */
    ck_assert_uint_eq(fl->C_GetAttributeValue(s, h[0], a, sizeof(a) / sizeof(a[0])), CKR_OK);
    ck_assert(sens && !extr && sign && verify && !enc && !dec && !wrap && !unwrap);
    ck_assert_uint_eq(kt, CKK_GENERIC_SECRET);
    ck_assert_uint_eq(a[9].ulValueLen, 16);
    /* the store records that key */
    if (!K.store.pg) {
        char q[128];
        (void)stored;
        snprintf(q, sizeof(q), "SELECT count(*) FROM audit_key WHERE hex(token_id) = '");
        for (int i = 0; i < 16; i++)
            snprintf(q + strlen(q), sizeof(q) - strlen(q), "%02X", id[i]);
        snprintf(q + strlen(q), sizeof(q) - strlen(q), "'");
        ck_assert_int_eq(ts_db_int(&K.store, q), 1);
    }
    fl->C_CloseSession(s);
    p11_close(ctx);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd_audit");
    TCase *tc = tcase_create("audit");

    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, list_parameters);
    tcase_add_test(tc, every_operation_is_audited);
    tcase_add_test(tc, plaintext_never_logged);
    tcase_add_test(tc, failing_audit_write_fails_closed);
    tcase_add_test(tc, tampering_is_detected_at_that_entry);
    tcase_add_test(tc, audit_key_in_token);
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    SRunner *sr = srunner_create(suite());
    int failed;

    srunner_set_fork_status(sr, CK_NOFORK); /* tests restart the fixture's kmsd */
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? 0 : 1;
}
