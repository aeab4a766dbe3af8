/*
 * tests/test_policy.c - unit tests of the policy (kms/policy/policy.c):
 * the file format with its exact "SOURCE:LINE: reason" errors, rule
 * matching (principals, groups, operations, key globs, key-less routes),
 * bearer tokens, the built-in policy, file checks and the reference-
 * counted slot that SIGHUP swaps.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kms/policy/policy.h"
#include "support/kmsd_harness.h"
#include "support/testtoken.h"

static char err[KMS_POLICY_ERR_MAX];

/* sha256("s3cret-token") */
#define TOKEN_SECRET "s3cret-token"
#define TOKEN_HASH   "sha256:a81e611a041b13f078bf8ebe5dab4d4fd63fcc5594661c918bec093a2f416a7e"

static kms_policy *parse_ok(const char *text)
{
    kms_policy *p = NULL;

    ck_assert_msg(kms_policy_parse(text, strlen(text), "pol", &p, err, sizeof(err)) == P11KMS_OK,
                  "parse failed: %s", err);
    ck_assert_ptr_nonnull(p);
    return p;
}

static void parse_err(const char *text, const char *want)
{
    kms_policy *p = NULL;

    ck_assert_int_eq(kms_policy_parse(text, strlen(text), "pol", &p, err, sizeof(err)),
                     P11KMS_ERR_BAD_REQUEST);
    ck_assert_ptr_null(p);
    ck_assert_str_eq(err, want);
}

static kms_principal uid(unsigned u, unsigned gid)
{
    kms_principal w;

    memset(&w, 0, sizeof(w));
    snprintf(w.name, sizeof(w.name), "uid:%u", u);
    w.unix_peer = 1;
    w.uid = u;
    w.gids[0] = gid;
    w.n_gids = 1;
    return w;
}

static kms_principal named(const char *name)
{
    kms_principal w;

    memset(&w, 0, sizeof(w));
    snprintf(w.name, sizeof(w.name), "%s", name);
    return w;
}

START_TEST(format_and_counts)
{
    kms_policy *p = parse_ok("# p11kms policy\n"
                             "\n"
                             "allow uid:1000 generate,decrypt on app-* billing   # trailing\n"
                             "  allow\t\"cert:Payroll Batch\" decrypt on payroll\r\n"
                             "allow group:50 admin on *\n"
                             "allow token:ci-* all on ci-[0-9]*\n"
                             "token ci-deploy " TOKEN_HASH "\n");

    ck_assert_uint_eq(kms_policy_rule_count(p), 4);
    ck_assert_uint_eq(kms_policy_token_count(p), 1);
    kms_policy_unref(p);
    p = parse_ok(""); /* empty: nothing is allowed */
    ck_assert_uint_eq(kms_policy_rule_count(p), 0);
    kms_policy_unref(p);
    p = parse_ok("allow uid:1 admin on a"); /* no final newline */
    ck_assert_uint_eq(kms_policy_rule_count(p), 1);
    kms_policy_unref(p);
}
END_TEST

START_TEST(matching)
{
    kms_policy *p = parse_ok("allow uid:1000 generate,decrypt on app-* billing\n"
                             "allow \"cert:Payroll Batch\" decrypt on payroll\n"
                             "allow cert:ops-* admin on *\n"
                             "allow group:50 decrypt on shared\n"
                             "allow uid:* generate on scratch\n"
                             "allow uid:2000 admin on team-*\n");
    kms_principal u1000 = uid(1000, 1000), u2000 = uid(2000, 50), u3 = uid(3, 3);
    kms_principal payroll = named("cert:Payroll Batch"), ops = named("cert:ops-alice");
    kms_principal tok = named("token:x");

    /* operations are separate: admin does not imply generate or decrypt */
    ck_assert(kms_policy_allows(p, &u1000, KMS_OP_GENERATE, "app-a"));
    ck_assert(kms_policy_allows(p, &u1000, KMS_OP_DECRYPT, "billing"));
    ck_assert(!kms_policy_allows(p, &u1000, KMS_OP_ADMIN, "app-a"));
    ck_assert(!kms_policy_allows(p, &u1000, KMS_OP_GENERATE, "billing2"));
    ck_assert(!kms_policy_allows(p, &u1000, KMS_OP_GENERATE, "xapp-a"));
    ck_assert(kms_policy_allows(p, &ops, KMS_OP_ADMIN, "anything"));
    ck_assert(!kms_policy_allows(p, &ops, KMS_OP_DECRYPT, "anything"));
    ck_assert(!kms_policy_allows(p, &ops, KMS_OP_GENERATE, "anything"));
    /* quoted CN with a blank */
    ck_assert(kms_policy_allows(p, &payroll, KMS_OP_DECRYPT, "payroll"));
    ck_assert(!kms_policy_allows(p, &payroll, KMS_OP_GENERATE, "payroll"));
    /* groups: a Unix peer's gid; never a certificate or token */
    ck_assert(kms_policy_allows(p, &u2000, KMS_OP_DECRYPT, "shared"));
    ck_assert(!kms_policy_allows(p, &u3, KMS_OP_DECRYPT, "shared"));
    u3.gids[u3.n_gids++] = 50; /* a supplementary group */
    ck_assert(kms_policy_allows(p, &u3, KMS_OP_DECRYPT, "shared"));
    /* uid:* is any Unix peer, not a certificate */
    ck_assert(kms_policy_allows(p, &u3, KMS_OP_GENERATE, "scratch"));
    ck_assert(!kms_policy_allows(p, &ops, KMS_OP_GENERATE, "scratch"));
    ck_assert(!kms_policy_allows(p, &tok, KMS_OP_GENERATE, "scratch"));
    /* key-less routes need the pattern "*" exactly */
    ck_assert(kms_policy_allows(p, &ops, KMS_OP_ADMIN, NULL));
    ck_assert(!kms_policy_allows(p, &u2000, KMS_OP_ADMIN, NULL));
    ck_assert(kms_policy_allows(p, &u2000, KMS_OP_ADMIN, "team-a"));
    /* allows_any: some key pattern */
    ck_assert(kms_policy_allows_any(p, &u2000, KMS_OP_ADMIN));
    ck_assert(kms_policy_allows_any(p, &u1000, KMS_OP_DECRYPT));
    ck_assert(!kms_policy_allows_any(p, &u1000, KMS_OP_ADMIN));
    ck_assert(!kms_policy_allows_any(p, &tok, KMS_OP_GENERATE));
    /* an empty or unknown principal gets nothing */
    tok.name[0] = '\0';
    ck_assert(!kms_policy_allows_any(p, &tok, KMS_OP_GENERATE));
    ck_assert(!kms_policy_allows(NULL, &u1000, KMS_OP_GENERATE, "app-a"));
    kms_policy_unref(p);
}
END_TEST

START_TEST(errors)
{
    parse_err("allow uid:1 admin on a\nfrobnicate x\n",
              "pol:2: unknown directive 'frobnicate' (expected allow or token)");
    parse_err("allow uid:1 read on a\n",
              "pol:1: unknown operation 'read' (expected generate, decrypt, admin, all)");
    parse_err("allow uid:1 admin,admin on a\n", "pol:1: operation 'admin' given twice");
    parse_err("allow uid:1 admin,,decrypt on a\n",
              "pol:1: malformed operation list 'admin,,decrypt'");
    parse_err("allow uid:1 admin a\n",
              "pol:1: expected 'allow <principal> <operations> on <key-pattern>...'");
    parse_err("allow uid:1 admin on\n",
              "pol:1: expected 'allow <principal> <operations> on <key-pattern>...'");
    parse_err("allow uid:bob admin on a\n",
              "pol:1: principal 'uid:bob': uid: takes a decimal user id or '*'");
    parse_err("allow uid:0123 admin on a\n",
              "pol:1: principal 'uid:0123': uid: takes a decimal user id or '*'");
    parse_err("allow uid:4294967296 admin on a\n",
              "pol:1: principal 'uid:4294967296': uid: takes a decimal user id or '*'");
    parse_err("allow group:* admin on a\n",
              "pol:1: principal 'group:*': group: takes a decimal group id");
    parse_err("allow * admin on a\n",
              "pol:1: unknown principal '*' (expected uid:<n>, uid:*, group:<gid>, cert:<cn>, "
              "token:<name>)");
    parse_err("allow cert: admin on a\n",
              "pol:1: principal 'cert:': cert: takes a certificate CN or a glob");
    parse_err("allow token:a/b admin on a\n",
              "pol:1: principal 'token:a/b': token: takes a token name or a glob");
    parse_err("allow uid:1 admin on Payroll\n",
              "pol:1: key pattern 'Payroll': only key-name characters [a-z0-9._-] and the glob "
              "characters * ? [ ] are allowed");
    parse_err("allow uid:1 admin on app-[0-9\n", "pol:1: key pattern 'app-[0-9': unclosed '['");
    parse_err("allow \"cert:a b admin on a\n", "pol:1: unterminated quoted word");
    parse_err("allow \"cert:a\"b admin on a\n", "pol:1: a quoted word must be followed by a blank");
    parse_err("allow cert:a\"b admin on a\n", "pol:1: a double quote may only start a word");
    parse_err("token t sha256:abcd\n", "pol:1: token 't': the hash must be sha256:<64 hex digits>");
    parse_err("token t md5:"
              "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef\n",
              "pol:1: token 't': the hash must be sha256:<64 hex digits>");
    parse_err("token a " TOKEN_HASH "\ntoken a sha256:"
              "0000000000000000000000000000000000000000000000000000000000000000\n",
              "pol:2: duplicate token 'a' (first on line 1)");
    parse_err("token a " TOKEN_HASH "\n\ntoken b " TOKEN_HASH "\n",
              "pol:3: token 'b' has the same hash as token 'a' (line 1)");
    parse_err("token a/b " TOKEN_HASH "\n", "pol:1: token name 'a/b': only [A-Za-z0-9._-] allowed");
    parse_err("token a\n", "pol:1: expected 'token <name> sha256:<64 hex digits>'");
    parse_err("allow uid:1 admin on a\x01\n", "pol:1: control character in line");
    {
        kms_policy *p = NULL;
        static const char nul[] = "allow uid:1 admin on a\n\nallow\0 uid:2 admin on b\n";
        ck_assert_int_eq(kms_policy_parse(nul, sizeof(nul) - 1, "pol", &p, err, sizeof(err)),
                         P11KMS_ERR_BAD_REQUEST);
        ck_assert_str_eq(err, "pol:3: NUL byte in policy");
    }
    {
        char *big = malloc(KMS_POLICY_MAX_LINE + 64);
        snprintf(big, KMS_POLICY_MAX_LINE + 64, "allow uid:1 admin on a\n");
        memset(big + strlen(big), 'x', KMS_POLICY_MAX_LINE + 1);
        big[23 + KMS_POLICY_MAX_LINE + 1] = '\0';
        parse_err(big, "pol:2: line longer than 4096 bytes");
        free(big);
    }
}
END_TEST

START_TEST(bearer_tokens)
{
    kms_policy *p = parse_ok("token ci-deploy " TOKEN_HASH "\n"
                             "token other sha256:"
                             "0000000000000000000000000000000000000000000000000000000000000001\n"
                             "allow token:ci-* generate on ci\n");
    kms_principal w;

    ck_assert(kms_policy_token(p, TOKEN_SECRET, strlen(TOKEN_SECRET), &w));
    ck_assert_str_eq(w.name, "token:ci-deploy");
    ck_assert_int_eq(w.unix_peer, 0);
    ck_assert(kms_policy_allows(p, &w, KMS_OP_GENERATE, "ci"));
    ck_assert(!kms_policy_token(p, "s3cret-tokeN", 12, &w));
    ck_assert(!kms_policy_token(p, TOKEN_SECRET, strlen(TOKEN_SECRET) - 1, &w));
    ck_assert(!kms_policy_token(p, "", 0, &w));
    kms_policy_unref(p);
}
END_TEST

START_TEST(builtin_policy)
{
    kms_policy *p = NULL;
    kms_principal self = uid(1234, 1), root = uid(0, 0), other = uid(1235, 1);
    kms_principal cert = named("cert:uid:1234");

    ck_assert_int_eq(kms_policy_default(1234, &p), P11KMS_OK);
    for (int op = KMS_OP_GENERATE; op <= KMS_OP_ADMIN; op <<= 1) {
        ck_assert(kms_policy_allows(p, &self, (kms_policy_op)op, "k"));
        ck_assert(kms_policy_allows(p, &self, (kms_policy_op)op, NULL));
        ck_assert(kms_policy_allows(p, &root, (kms_policy_op)op, "k"));
        ck_assert(!kms_policy_allows(p, &other, (kms_policy_op)op, "k"));
        ck_assert(!kms_policy_allows(p, &cert, (kms_policy_op)op, "k"));
    }
    kms_policy_unref(p);
}
END_TEST

START_TEST(files)
{
    char dir[256], path[400], want[600];
    kms_policy *p = NULL;

    ck_assert_int_eq(tt_tempdir(dir, sizeof(dir)), 0);
    snprintf(path, sizeof(path), "%s/policy.conf", dir);
    ck_assert_int_eq(kh_write_file(path, "allow uid:1 admin on a\nallow uid:2 bogus on a\n", 0644),
                     0);
    ck_assert_int_eq(kms_policy_load(path, &p, err, sizeof(err)), P11KMS_ERR_BAD_REQUEST);
    snprintf(want, sizeof(want), "%s:2: unknown operation 'bogus'", path);
    ck_assert_msg(strncmp(err, want, strlen(want)) == 0, "%s", err);
    ck_assert_int_eq(kh_write_file(path, "allow uid:1 admin on a\n", 0664), 0);
    ck_assert_int_eq(kms_policy_load(path, &p, err, sizeof(err)), P11KMS_ERR_BAD_REQUEST);
    snprintf(want, sizeof(want),
             "%s: writable by group or others (mode 664); make it 0644 or stricter", path);
    ck_assert_str_eq(err, want);
    ck_assert_int_eq(chmod(path, 0600), 0);
    ck_assert_int_eq(kms_policy_load(path, &p, err, sizeof(err)), P11KMS_OK);
    ck_assert_uint_eq(kms_policy_rule_count(p), 1);
    kms_policy_unref(p);
    snprintf(path, sizeof(path), "%s/absent.conf", dir);
    ck_assert_int_eq(kms_policy_load(path, &p, err, sizeof(err)), P11KMS_ERR_BAD_REQUEST);
    snprintf(want, sizeof(want), "%s: cannot open: No such file or directory", path);
    ck_assert_str_eq(err, want);
    tt_rmtree(dir);
}
END_TEST

/* A request's reference outlives a swap (run under ASan this is a
 * use-after-free check). */
START_TEST(slot_swap)
{
    kms_policy_slot slot;
    kms_policy *a = parse_ok("allow uid:1 admin on a\n"), *b = parse_ok("allow uid:2 admin on b\n");
    kms_policy *held, *now;
    kms_principal u1 = uid(1, 1), u2 = uid(2, 2);

    kms_policy_slot_init(&slot);
    ck_assert_ptr_null(kms_policy_slot_get(&slot));
    kms_policy_slot_set(&slot, a);
    held = kms_policy_slot_get(&slot);
    kms_policy_slot_set(&slot, b); /* drops the slot's reference to a */
    ck_assert(kms_policy_allows(held, &u1, KMS_OP_ADMIN, "a"));
    now = kms_policy_slot_get(&slot);
    ck_assert(kms_policy_allows(now, &u2, KMS_OP_ADMIN, "b"));
    ck_assert(!kms_policy_allows(now, &u1, KMS_OP_ADMIN, "a"));
    kms_policy_unref(held); /* frees a */
    kms_policy_unref(now);
    kms_policy_slot_destroy(&slot);
    kms_policy_unref(NULL);
}
END_TEST

static Suite *suite(void)
{
    Suite *s = suite_create("policy");
    TCase *tc = tcase_create("policy");

    tcase_add_test(tc, format_and_counts);
    tcase_add_test(tc, matching);
    tcase_add_test(tc, errors);
    tcase_add_test(tc, bearer_tokens);
    tcase_add_test(tc, builtin_policy);
    tcase_add_test(tc, files);
    tcase_add_test(tc, slot_swap);
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
