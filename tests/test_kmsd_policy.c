/*
 * tests/test_kmsd_policy.c - the policy enforced by the real kmsd over
 * its Unix socket (mode 0666 here): requests made as a second uid (a
 * child that drops to 65534:65534) are refused with 403 for every
 * operation class while uid 0 succeeds; partial grants by uid and group;
 * the 404/403 rule for unknown DEK ids; bearer tokens (401 for a bad
 * one); SIGHUP with a broken policy keeps the old one (and logs
 * FILE:LINE), with a valid one applies it; the built-in policy without a
 * [policy] file; a broken policy file stops kmsd at start.
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

#include "support/kmsd_harness.h"
#include "support/kmsd_test_util.h"

#define NOBODY 65534

#define CI_SECRET "ci-secret-0123456789"

static kh_kmsd K;
static char policy_path[400];
static char ci_hash[65];

/* kmsd.conf of the harness plus listen.unix_mode and a [policy] file. */
static void write_conf(kh_kmsd *k, const char *mode, const char *policy)
{
    char *text, *fixed = NULL, *at, extra[200] = "";

    if (policy != NULL)
        snprintf(extra, sizeof(extra), "[policy]\nfile = %s\n", policy);
    ck_assert_int_eq(kh_write_conf(k, NULL, extra), 0);
    text = kh_read_file(k->conf, NULL);
    ck_assert_ptr_nonnull(text);
    at = strstr(text, "unix = kmsd.sock\n");
    ck_assert_ptr_nonnull(at);
    at += strlen("unix = kmsd.sock\n");
    ck_assert_int_gt(asprintf(&fixed, "%.*sunix_mode = %s\n%s", (int)(at - text), text, mode, at),
                     0);
    ck_assert_int_eq(kh_write_file(k->conf, fixed, 0600), 0);
    free(text);
    free(fixed);
}

/* Write the policy file and SIGHUP kmsd; wait until it logs `expect`
 * once more than before. */
static void reload(const char *policy, const char *expect)
{
    int before = kh_log_count(&K, expect);

    ck_assert_int_eq(kh_write_file(policy_path, policy, 0644), 0);
    ck_assert_int_eq(kill(K.pid, SIGHUP), 0);
    for (int i = 0; i < 500 && kh_log_count(&K, expect) == before; i++)
        usleep(10000);
    ck_assert_msg(kh_log_count(&K, expect) > before, "kmsd did not log '%s' after SIGHUP", expect);
}

static void start(void)
{
    char sha[200];
    FILE *f;

    ck_assert_int_eq(kh_setup(&K, KMSD_PATH, "kmsd-policy", NULL, NULL), 0);
    /* uid 65534 must reach the socket inside the test's private dir */
    ck_assert_int_eq(chmod(K.dir, 0711), 0);
    snprintf(policy_path, sizeof(policy_path), "%s/policy.conf", K.dir);
    ck_assert_int_eq(kh_write_file(policy_path, "allow uid:0 all on *\n", 0644), 0);
    write_conf(&K, "0666", "policy.conf");
    ck_assert_int_eq(kh_start(&K), 0);
    f = popen("printf %s '" CI_SECRET "' | sha256sum", "r");
    ck_assert_ptr_nonnull(f);
    ck_assert_ptr_nonnull(fgets(sha, sizeof(sha), f));
    pclose(f);
    snprintf(ci_hash, sizeof(ci_hash), "%.64s", sha);
}

static void stop(void)
{
    int st = kh_stop(&K, SIGTERM);
    kh_teardown(&K);
    ck_assert_int_eq(st, 0);
}

typedef struct result {
    long status;
    char code[64];
    char message[512];
    char body[2048];
} result;

static void parse_result(const kh_response *r, result *out)
{
    json_t *j = json_loadb(r->body, r->len, 0, NULL), *err;

    memset(out, 0, sizeof(*out));
    out->status = r->status;
    snprintf(out->body, sizeof(out->body), "%s", r->body);
    err = j != NULL ? json_object_get(j, "error") : NULL;
    if (err != NULL) {
        snprintf(out->code, sizeof(out->code), "%s",
                 json_string_value(json_object_get(err, "code")));
        snprintf(out->message, sizeof(out->message), "%s",
                 json_string_value(json_object_get(err, "message")));
    }
    json_decref(j);
}

/* One request as uid (0: this process; else a child that drops to
 * uid:gid NOBODY:NOBODY), with optional extra header lines. */
static result call_as(uid_t uid, const char *method, const char *path, const char *body,
                      const char *const *headers)
{
    result res;
    kh_response r;
    int fds[2];
    pid_t pid;
    int st = 0;

    if (uid == 0) {
        ck_assert_msg(
            kh_request(K.sock, method, path, body, body ? strlen(body) : 0, headers, &r) == 0,
            "%s %s: no response", method, path);
        parse_result(&r, &res);
        kh_response_free(&r);
        return res;
    }
    ck_assert_int_eq(pipe(fds), 0);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        close(fds[0]);
        memset(&res, 0, sizeof(res));
        res.status = -1;
        if (setgroups(0, NULL) == 0 && setgid(NOBODY) == 0 && setuid(uid) == 0 &&
            kh_request(K.sock, method, path, body, body ? strlen(body) : 0, headers, &r) == 0) {
            parse_result(&r, &res);
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
    ck_assert_msg(res.status > 0, "%s %s as uid %u: no HTTP response", method, path, (unsigned)uid);
    return res;
}

static void expect(uid_t uid, const char *method, const char *path, const char *body, long status,
                   const char *code)
{
    result r = call_as(uid, method, path, body, NULL);

    ck_assert_msg(r.status == status, "%s %s as uid %u: %ld, want %ld: %s", method, path,
                  (unsigned)uid, r.status, status, r.body);
    if (code != NULL)
        ck_assert_msg(strcmp(r.code, code) == 0, "%s %s as uid %u: code %s, want %s", method, path,
                      (unsigned)uid, r.code, code);
}

/* Create key `name` as root (201, or 409 if it exists). */
static void ensure_key(const char *name)
{
    char body[128];
    result r;

    snprintf(body, sizeof(body), "{\"name\":\"%s\"}", name);
    r = call_as(0, "POST", "/v1/keys", body, NULL);
    ck_assert_msg(r.status == 201 || r.status == 409, "create %s: %s", name, r.body);
}

/* A DEK of key `key` issued to root; its id into id. */
static void root_dek(const char *key, char id[64])
{
    char path[128];
    result r;
    json_t *j;

    snprintf(path, sizeof(path), "/v1/keys/%s/datakeys", key);
    r = call_as(0, "POST", path, "{\"context\":{\"customer\":\"42\"}}", NULL);
    ck_assert_msg(r.status == 201, "generate: %s", r.body);
    j = json_loads(r.body, 0, NULL);
    snprintf(id, 64, "%s", json_string_value(json_object_get(j, "dek_id")));
    json_decref(j);
}

#define UNKNOWN_DEK "00000000-0000-4000-8000-000000000000"

/* With nothing granted to uid 65534, each operation class is 403 for it
 * and works for uid 0; health stays open. */
START_TEST(second_uid_refused_every_class)
{
    char id[64], p_dec[128], p_dek[128], p_rev[128];

    reload("allow uid:0 all on *\n", "reloaded policy");
    ensure_key("app-a");
    root_dek("app-a", id);
    snprintf(p_dec, sizeof(p_dec), "/v1/datakeys/%s/decrypt", id);
    snprintf(p_dek, sizeof(p_dek), "/v1/datakeys/%s", id);
    snprintf(p_rev, sizeof(p_rev), "/v1/datakeys/%s/revoke", id);

    expect(NOBODY, "GET", "/v1/health", NULL, 200, NULL);
    /* generate */
    expect(NOBODY, "POST", "/v1/keys/app-a/datakeys", "{}", 403, "forbidden");
    /* decrypt (existing and unknown DEK: no decrypt right anywhere -> 403) */
    expect(NOBODY, "POST", p_dec, "{\"context\":{\"customer\":\"42\"}}", 403, "forbidden");
    expect(NOBODY, "POST", "/v1/datakeys/" UNKNOWN_DEK "/decrypt", "{}", 403, "forbidden");
    /* admin, key-addressed, DEK-addressed and key-less */
    expect(NOBODY, "POST", "/v1/keys", "{\"name\":\"nobodys\"}", 403, "forbidden");
    expect(NOBODY, "GET", "/v1/keys", NULL, 403, "forbidden");
    expect(NOBODY, "GET", "/v1/keys/app-a", NULL, 403, "forbidden");
    expect(NOBODY, "POST", "/v1/keys/app-a/rotate", NULL, 403, "forbidden");
    expect(NOBODY, "GET", "/v1/datakeys?key=app-a", NULL, 403, "forbidden");
    expect(NOBODY, "GET", p_dek, NULL, 403, "forbidden");
    expect(NOBODY, "GET", "/v1/datakeys/" UNKNOWN_DEK, NULL, 403, "forbidden");
    expect(NOBODY, "POST", p_rev, "{\"reason\":\"compromised\"}", 403, "forbidden");
    expect(NOBODY, "DELETE", p_dek, NULL, 403, "forbidden");
    expect(NOBODY, "POST", "/v1/datakeys/revoke",
           "{\"key\":\"app-a\",\"context\":{\"customer\":\"42\"},\"reason\":\"compromised\"}", 403,
           "forbidden");
    expect(NOBODY, "POST", "/v1/datakeys/destroy",
           "{\"key\":\"app-a\",\"context\":{\"customer\":\"42\"}}", 403, "forbidden");
    /* the 403 names the principal and, for a DEK, not its key */
    {
        result r = call_as(NOBODY, "GET", p_dek, NULL, NULL);
        ck_assert_str_eq(r.message, "uid:65534 may not admin this data key");
        r = call_as(NOBODY, "POST", "/v1/keys/app-a/datakeys", "{}", NULL);
        ck_assert_str_eq(r.message, "uid:65534 may not generate on key 'app-a'");
    }
    /* nothing changed: uid 0 still does all of it */
    expect(0, "POST", p_dec, "{\"context\":{\"customer\":\"42\"}}", 200, NULL);
    expect(0, "GET", p_dek, NULL, 200, NULL);
    expect(0, "GET", "/v1/keys", NULL, 200, NULL);
    expect(0, "GET", "/v1/keys/app-a", NULL, 200, NULL);
    expect(0, "GET", "/v1/datakeys?key=app-a", NULL, 200, NULL);
    expect(0, "POST", "/v1/keys/app-a/datakeys", "{}", 201, NULL);
    expect(0, "GET", "/v1/datakeys/" UNKNOWN_DEK, NULL, 404, "dek_not_found");
    expect(0, "POST", p_rev, "{\"reason\":\"compromised\"}", 200, NULL);
    expect(0, "DELETE", p_dek, NULL, 200, NULL);
    ck_assert_int_ge(kh_log_count(&K, "refused: uid:65534 may not"), 14);
}
END_TEST

/* Grants by uid and by group, per operation and key pattern. */
START_TEST(partial_grants)
{
    char id_a[64], id_z[64], path[128];

    reload("allow uid:0 all on *\n"
           "allow uid:65534 generate on app-*\n"
           "allow group:65534 decrypt on app-a\n"
           "allow uid:65534 admin on team-*\n",
           "reloaded policy");
    ensure_key("app-a");
    ensure_key("zz");
    ensure_key("team-x");
    root_dek("app-a", id_a);
    root_dek("zz", id_z);

    expect(NOBODY, "POST", "/v1/keys/app-a/datakeys", "{}", 201, NULL);
    expect(NOBODY, "POST", "/v1/keys/zz/datakeys", "{}", 403, "forbidden");
    /* decrypt through the group rule, only on app-a */
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", id_a);
    expect(NOBODY, "POST", path, "{\"context\":{\"customer\":\"42\"}}", 200, NULL);
    snprintf(path, sizeof(path), "/v1/datakeys/%s/decrypt", id_z);
    expect(NOBODY, "POST", path, "{\"context\":{\"customer\":\"42\"}}", 403, "forbidden");
    /* unknown DEK: 404 to a principal that may decrypt somewhere */
    expect(NOBODY, "POST", "/v1/datakeys/" UNKNOWN_DEK "/decrypt", "{}", 404, "dek_not_found");
    /* admin on team-* only: not on app-a, not key-less routes */
    expect(NOBODY, "GET", "/v1/keys/team-x", NULL, 200, NULL);
    expect(NOBODY, "POST", "/v1/keys", "{\"name\":\"team-new\"}", 201, NULL);
    expect(NOBODY, "POST", "/v1/keys", "{\"name\":\"app-new\"}", 403, "forbidden");
    expect(NOBODY, "GET", "/v1/keys/app-a", NULL, 403, "forbidden");
    expect(NOBODY, "GET", "/v1/keys", NULL, 403, "forbidden");
    expect(NOBODY, "GET", "/v1/status", NULL, 403, "forbidden");
    snprintf(path, sizeof(path), "/v1/datakeys/%s", id_a);
    expect(NOBODY, "GET", path, NULL, 403, "forbidden");
    expect(NOBODY, "GET", "/v1/datakeys/" UNKNOWN_DEK, NULL, 404, "dek_not_found");
    expect(NOBODY, "GET", "/v1/datakeys?key=team-x", NULL, 200, NULL);
    expect(NOBODY, "GET", "/v1/datakeys?key=app-a", NULL, 403, "forbidden");
    {
        result r = call_as(NOBODY, "GET", "/v1/keys", NULL, NULL);
        ck_assert_str_eq(
            r.message, "uid:65534 may not admin: this route needs admin on the key pattern \"*\"");
    }
}
END_TEST

/* A broken policy on SIGHUP keeps the old one; a valid one replaces it. */
START_TEST(sighup_reload)
{
    char want[600];

    ensure_key("app-a");
    reload("allow uid:0 all on *\nallow uid:65534 generate on app-*\n", "reloaded policy");
    expect(NOBODY, "POST", "/v1/keys/app-a/datakeys", "{}", 201, NULL);

    reload("allow uid:0 all on *\n# a typo on line 3\nallow uid:65534 generat on app-*\n",
           "policy not reloaded");
    snprintf(want, sizeof(want), "%s:3: unknown operation 'generat'", policy_path);
    ck_assert_int_ge(kh_log_count(&K, want), 1);
    expect(NOBODY, "POST", "/v1/keys/app-a/datakeys", "{}", 201, NULL); /* old policy */
    expect(0, "GET", "/v1/keys", NULL, 200, NULL);

    /* group- or world-writable: refused too */
    ck_assert_int_eq(kh_write_file(policy_path, "allow uid:65534 all on *\n", 0666), 0);
    {
        int before = kh_log_count(&K, "policy not reloaded");
        ck_assert_int_eq(kill(K.pid, SIGHUP), 0);
        for (int i = 0; i < 500 && kh_log_count(&K, "policy not reloaded") == before; i++)
            usleep(10000);
        ck_assert_int_gt(kh_log_count(&K, "policy not reloaded"), before);
    }
    expect(NOBODY, "GET", "/v1/keys", NULL, 403, "forbidden");

    reload("allow uid:0 all on *\n", "reloaded policy");
    expect(NOBODY, "POST", "/v1/keys/app-a/datakeys", "{}", 403, "forbidden");
    ku_assert_healthy(&K);
}
END_TEST

/* Authorization: Bearer <secret> -> token:<name>; a bad one is 401. */
START_TEST(bearer_tokens)
{
    char policy[400];
    const char *const good[] = {"Authorization: Bearer " CI_SECRET, NULL};
    const char *const bad[] = {"Authorization: Bearer ci-secret-wrong", NULL};
    const char *const basic[] = {"Authorization: Basic Y2k6c2VjcmV0", NULL};
    const char *const twice[] = {"Authorization: Bearer " CI_SECRET,
                                 "Authorization: Bearer " CI_SECRET, NULL};
    kh_response raw;
    char www[128] = "";
    result r;

    ensure_key("app-a");
    snprintf(policy, sizeof(policy),
             "allow uid:0 all on *\n"
             "token ci sha256:%s\n"
             "allow token:ci generate on app-*\n",
             ci_hash);
    reload(policy, "reloaded policy");
    r = call_as(0, "POST", "/v1/keys/app-a/datakeys", "{}", good);
    ck_assert_msg(r.status == 201, "%s", r.body);
    /* the token replaces the transport principal: uid 0's rights do not apply */
    r = call_as(0, "GET", "/v1/keys", NULL, good);
    ck_assert_int_eq(r.status, 403);
    ck_assert_str_eq(r.message, "token:ci may not admin: this route needs admin on the key "
                                "pattern \"*\"");
    r = call_as(NOBODY, "POST", "/v1/keys/app-a/datakeys", "{}", good);
    ck_assert_msg(r.status == 201, "%s", r.body);
    ck_assert_int_ge(kh_log_count(&K, "POST /v1/keys/app-a/datakeys 201"), 1);
    ck_assert_int_ge(kh_log_count(&K, " token:ci datakey.generate"), 2);
    /* bad credentials, on every route including health */
    r = call_as(0, "POST", "/v1/keys/app-a/datakeys", "{}", bad);
    ck_assert_int_eq(r.status, 401);
    ck_assert_str_eq(r.code, "unauthenticated");
    r = call_as(NOBODY, "GET", "/v1/health", NULL, bad);
    ck_assert_int_eq(r.status, 401);
    r = call_as(0, "GET", "/v1/keys", NULL, basic);
    ck_assert_int_eq(r.status, 401);
    r = call_as(0, "GET", "/v1/keys", NULL, twice);
    ck_assert_int_eq(r.status, 401);
    ck_assert_int_eq(kh_request(K.sock, "GET", "/v1/keys", NULL, 0, bad, &raw), 0);
    ck_assert(kh_header(&raw, "WWW-Authenticate", www, sizeof(www)));
    ck_assert_str_eq(www, "Bearer realm=\"p11kms\"");
    kh_response_free(&raw);
    /* the secret never reaches the log */
    ck_assert_int_eq(kh_log_count(&K, CI_SECRET), 0);
    ck_assert_int_eq(kh_log_count(&K, "ci-secret-wrong"), 0);
    reload("allow uid:0 all on *\n", "reloaded policy");
    r = call_as(0, "GET", "/v1/keys", NULL, good); /* the token is gone with the policy */
    ck_assert_int_eq(r.status, 401);
}
END_TEST

/* Without [policy]: only the kmsd user and root; a broken policy file
 * stops kmsd at start with FILE:LINE. */
START_TEST(builtin_policy_and_bad_file)
{
    kh_kmsd k2;
    char bad[400], want[600];
    kh_kmsd saved = K;

    ck_assert_int_eq(kh_setup(&k2, KMSD_PATH, "kmsd-policy2", NULL, NULL), 0);
    ck_assert_int_eq(chmod(k2.dir, 0711), 0);
    write_conf(&k2, "0666", NULL);
    ck_assert_int_eq(kh_start(&k2), 0);
    ck_assert_int_ge(kh_log_count(&k2, "no [policy] file configured"), 1);
    K = k2; /* call_as talks to K */
    expect(0, "POST", "/v1/keys", "{\"name\":\"k\"}", 201, NULL);
    expect(NOBODY, "GET", "/v1/health", NULL, 200, NULL);
    expect(NOBODY, "POST", "/v1/keys/k/datakeys", "{}", 403, "forbidden");
    expect(NOBODY, "GET", "/v1/keys", NULL, 403, "forbidden");
    K = saved;
    ck_assert_int_eq(kh_stop(&k2, SIGTERM), 0);

    snprintf(bad, sizeof(bad), "%s/bad.conf", k2.dir);
    ck_assert_int_eq(kh_write_file(bad, "allow uid:0 all on *\nallow uid:1 all on App\n", 0644), 0);
    write_conf(&k2, "0600", "bad.conf");
    ck_assert_int_eq(kh_start_expect_exit(&k2, 30), 1);
    snprintf(want, sizeof(want), "%s:2: key pattern 'App'", bad);
    ck_assert_int_ge(kh_log_count(&k2, want), 1);
    kh_teardown(&k2);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("kmsd-policy");
    TCase *tc = tcase_create("policy");

    tcase_set_timeout(tc, 300);
    tcase_add_unchecked_fixture(tc, start, stop);
    tcase_add_test(tc, second_uid_refused_every_class);
    tcase_add_test(tc, partial_grants);
    tcase_add_test(tc, sighup_reload);
    tcase_add_test(tc, bearer_tokens);
    tcase_add_test(tc, builtin_policy_and_bad_file);
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
