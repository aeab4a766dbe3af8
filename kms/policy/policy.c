/*
 * kms/policy/policy.c - the policy file parser, rule matching, bearer
 * token lookup and the policy slot (see policy.h; the format is in
 * docs/operations.md).
 *
 *   # comment (at the start of a line or after a blank)
 *   allow <principal> <op>[,<op>...] on <key-pattern> [<key-pattern>...]
 *   token <name> sha256:<64 hex digits>
 *
 * Words are separated by blanks; a word may be written in double quotes
 * (no escapes) to hold blanks, e.g. "cert:Payroll Batch".  Principals:
 * uid:<n>, uid:*, group:<gid>, cert:<glob>, token:<glob>.  Operations:
 * generate, decrypt, admin, or all.  Key patterns are fnmatch(3) globs
 * over the key-name alphabet.
 *
 * A parsed policy never changes; only its reference count moves.  The
 * slot's lock is held just long enough to copy or swap one pointer.
 */
#include "kms/policy/policy.h"

#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#define KEY_PATTERN_MAX 128
#define MAX_WORDS       260 /* allow P OPS on + up to 256 key patterns */

enum principal_kind { PK_GLOB, PK_GROUP };

typedef struct rule {
    enum principal_kind kind;
    char *principal; /* PK_GLOB: glob over the principal name; else the text */
    gid_t gid;       /* PK_GROUP */
    unsigned ops;    /* kms_policy_op bits */
    char **keys;
    size_t n_keys;
    int line;
} rule;

typedef struct token {
    char name[KMS_TOKEN_NAME_MAX + 1];
    unsigned char hash[32];
    int line;
} token;

struct kms_policy {
    atomic_int refs;
    rule *rules;
    size_t n_rules, cap_rules;
    token *tokens;
    size_t n_tokens, cap_tokens;
};

typedef struct parser {
    const char *source;
    char *err;
    size_t errlen;
    int line;
} parser;

__attribute__((format(printf, 2, 3))) static p11kms_status fail(parser *ps, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (ps->errlen == 0)
        return P11KMS_ERR_BAD_REQUEST;
    if (ps->line > 0)
        n = snprintf(ps->err, ps->errlen, "%s:%d: ", ps->source, ps->line);
    else
        n = snprintf(ps->err, ps->errlen, "%s: ", ps->source);
    if (n < 0 || (size_t)n >= ps->errlen)
        return P11KMS_ERR_BAD_REQUEST;
    va_start(ap, fmt);
    vsnprintf(ps->err + n, ps->errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return P11KMS_ERR_BAD_REQUEST;
}

static void policy_free(kms_policy *p)
{
    if (p == NULL)
        return;
    for (size_t i = 0; i < p->n_rules; i++) {
        free(p->rules[i].principal);
        for (size_t k = 0; k < p->rules[i].n_keys; k++)
            free(p->rules[i].keys[k]);
        free(p->rules[i].keys);
    }
    free(p->rules);
    if (p->tokens != NULL)
        OPENSSL_cleanse(p->tokens, p->cap_tokens * sizeof(*p->tokens));
    free(p->tokens);
    free(p);
}

kms_policy *kms_policy_ref(kms_policy *p)
{
    if (p != NULL)
        atomic_fetch_add(&p->refs, 1);
    return p;
}

void kms_policy_unref(kms_policy *p)
{
    if (p != NULL && atomic_fetch_sub(&p->refs, 1) == 1)
        policy_free(p);
}

size_t kms_policy_rule_count(const kms_policy *p)
{
    return p != NULL ? p->n_rules : 0;
}

size_t kms_policy_token_count(const kms_policy *p)
{
    return p != NULL ? p->n_tokens : 0;
}

const char *kms_policy_op_name(kms_policy_op op)
{
    switch (op) {
    case KMS_OP_GENERATE: return "generate";
    case KMS_OP_DECRYPT: return "decrypt";
    case KMS_OP_ADMIN: return "admin";
    }
    return "?";
}

/* ---- parsing ---- */

/* Split line (NUL-terminated, modified in place) into words.  Returns the
 * count, or -1 after fail(). */
static int split_words(parser *ps, char *line, char *words[], int max, p11kms_status *rv)
{
    int n = 0;
    char *c = line;

    for (;;) {
        while (*c == ' ' || *c == '\t' || *c == '\r')
            c++;
        if (*c == '\0' || *c == '#')
            return n;
        if (n == max) {
            *rv = fail(ps, "too many words on one line (at most %d)", max);
            return -1;
        }
        if (*c == '"') {
            char *end = strchr(c + 1, '"');
            if (end == NULL) {
                *rv = fail(ps, "unterminated quoted word");
                return -1;
            }
            if (end[1] != '\0' && end[1] != ' ' && end[1] != '\t' && end[1] != '\r') {
                *rv = fail(ps, "a quoted word must be followed by a blank");
                return -1;
            }
            *end = '\0';
            words[n++] = c + 1;
            c = end + 1;
            if (*c != '\0')
                c++;
            continue;
        }
        words[n++] = c;
        while (*c != '\0' && *c != ' ' && *c != '\t' && *c != '\r') {
            if (*c == '"') {
                *rv = fail(ps, "a double quote may only start a word");
                return -1;
            }
            c++;
        }
        if (*c != '\0')
            *c++ = '\0';
    }
}

static int printable(const char *s)
{
    for (; *s != '\0'; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s == 0x7f)
            return 0;
    return 1;
}

/* Brackets of a glob are closed: "[a-z]" yes, "[a-z" no. */
static int brackets_closed(const char *s)
{
    for (const char *c = s; *c != '\0'; c++) {
        if (*c != '[')
            continue;
        c++;
        if (*c == '!' || *c == '^')
            c++;
        if (*c == ']')
            c++; /* a leading ']' is a member */
        while (*c != '\0' && *c != ']')
            c++;
        if (*c == '\0')
            return 0;
    }
    return 1;
}

static int parse_uint32(const char *s, uint32_t *out)
{
    uint64_t v = 0;

    if (*s == '\0' || (s[0] == '0' && s[1] != '\0'))
        return 0;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return 0;
        v = v * 10 + (uint64_t)(*s - '0');
        if (v > UINT32_MAX)
            return 0;
    }
    *out = (uint32_t)v;
    return 1;
}

static int token_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
           c == '_' || c == '-';
}

static p11kms_status parse_principal(parser *ps, const char *w, rule *r)
{
    uint32_t n;

    if (strlen(w) >= KMS_PRINCIPAL_MAX)
        return fail(ps, "principal longer than %d bytes", KMS_PRINCIPAL_MAX - 1);
    r->kind = PK_GLOB;
    if (strncmp(w, "uid:", 4) == 0) {
        if (strcmp(w + 4, "*") != 0 && !parse_uint32(w + 4, &n))
            return fail(ps, "principal '%s': uid: takes a decimal user id or '*'", w);
    } else if (strncmp(w, "group:", 6) == 0) {
        if (!parse_uint32(w + 6, &n))
            return fail(ps, "principal '%s': group: takes a decimal group id", w);
        r->kind = PK_GROUP;
        r->gid = (gid_t)n;
    } else if (strncmp(w, "cert:", 5) == 0) {
        if (w[5] == '\0' || !printable(w + 5) || !brackets_closed(w + 5))
            return fail(ps, "principal '%s': cert: takes a certificate CN or a glob", w);
    } else if (strncmp(w, "token:", 6) == 0) {
        const char *c = w + 6;
        if (*c == '\0')
            return fail(ps, "principal '%s': token: takes a token name or a glob", w);
        for (; *c != '\0'; c++)
            if (!token_name_char(*c) && strchr("*?[]!", *c) == NULL)
                return fail(ps, "principal '%s': token: takes a token name or a glob", w);
        if (!brackets_closed(w + 6))
            return fail(ps, "principal '%s': unclosed '['", w);
    } else {
        return fail(ps,
                    "unknown principal '%.64s' (expected uid:<n>, uid:*, group:<gid>, "
                    "cert:<cn>, token:<name>)",
                    w);
    }
    r->principal = strdup(w);
    return r->principal != NULL ? P11KMS_OK : P11KMS_ERR_NO_MEMORY;
}

static p11kms_status parse_ops(parser *ps, char *w, unsigned *ops)
{
    char *save = NULL, *op;
    size_t len = strlen(w);

    *ops = 0;
    if (len == 0 || w[0] == ',' || w[len - 1] == ',' || strstr(w, ",,") != NULL)
        return fail(ps, "malformed operation list '%.64s'", w);
    for (op = strtok_r(w, ",", &save); op != NULL; op = strtok_r(NULL, ",", &save)) {
        unsigned bit;
        if (strcmp(op, "generate") == 0)
            bit = KMS_OP_GENERATE;
        else if (strcmp(op, "decrypt") == 0)
            bit = KMS_OP_DECRYPT;
        else if (strcmp(op, "admin") == 0)
            bit = KMS_OP_ADMIN;
        else if (strcmp(op, "all") == 0)
            bit = KMS_OP_GENERATE | KMS_OP_DECRYPT | KMS_OP_ADMIN;
        else
            return fail(ps, "unknown operation '%.64s' (expected generate, decrypt, admin, all)",
                        op);
        if (*ops & bit)
            return fail(ps, "operation '%s' given twice", op);
        *ops |= bit;
    }
    return P11KMS_OK;
}

static p11kms_status check_key_pattern(parser *ps, const char *w)
{
    size_t len = strlen(w);

    if (len == 0 || len > KEY_PATTERN_MAX)
        return fail(ps, "key pattern must be 1 to %d characters", KEY_PATTERN_MAX);
    for (const char *c = w; *c != '\0'; c++) {
        if ((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || strchr("._-*?[]!^", *c))
            continue;
        return fail(ps,
                    "key pattern '%.64s': only key-name characters [a-z0-9._-] and the glob "
                    "characters * ? [ ] are allowed",
                    w);
    }
    if (!brackets_closed(w))
        return fail(ps, "key pattern '%.64s': unclosed '['", w);
    return P11KMS_OK;
}

static p11kms_status add_rule(parser *ps, kms_policy *p, char *words[], int n)
{
    rule r;
    p11kms_status rv;

    memset(&r, 0, sizeof(r));
    r.line = ps->line;
    if (n < 5 || strcmp(words[3], "on") != 0)
        return fail(ps, "expected 'allow <principal> <operations> on <key-pattern>...'");
    if (p->n_rules == KMS_POLICY_MAX_RULES)
        return fail(ps, "too many rules (at most %d)", KMS_POLICY_MAX_RULES);
    if ((rv = parse_ops(ps, words[2], &r.ops)) != P11KMS_OK)
        return rv;
    for (int i = 4; i < n; i++)
        if ((rv = check_key_pattern(ps, words[i])) != P11KMS_OK)
            return rv;
    if ((rv = parse_principal(ps, words[1], &r)) != P11KMS_OK)
        return rv;
    rv = P11KMS_ERR_NO_MEMORY;
    r.keys = calloc((size_t)(n - 4), sizeof(*r.keys));
    if (r.keys == NULL)
        goto out;
    for (int i = 4; i < n; i++) {
        if ((r.keys[r.n_keys] = strdup(words[i])) == NULL)
            goto out;
        r.n_keys++;
    }
    if (p->n_rules == p->cap_rules) {
        size_t cap = p->cap_rules ? p->cap_rules * 2 : 16;
        rule *nr = realloc(p->rules, cap * sizeof(*nr));
        if (nr == NULL)
            goto out;
        p->rules = nr;
        p->cap_rules = cap;
    }
    p->rules[p->n_rules++] = r;
    memset(&r, 0, sizeof(r));
    rv = P11KMS_OK;
out:
    free(r.principal);
    for (size_t k = 0; k < r.n_keys; k++)
        free(r.keys[k]);
    free(r.keys);
    return rv;
}

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static p11kms_status add_token(parser *ps, kms_policy *p, char *words[], int n)
{
    token t;
    const char *hex;
    size_t len;

    memset(&t, 0, sizeof(t));
    if (n != 3)
        return fail(ps, "expected 'token <name> sha256:<64 hex digits>'");
    len = strlen(words[1]);
    if (len == 0 || len > KMS_TOKEN_NAME_MAX)
        return fail(ps, "token name must be 1 to %d characters", KMS_TOKEN_NAME_MAX);
    for (const char *c = words[1]; *c != '\0'; c++)
        if (!token_name_char(*c))
            return fail(ps, "token name '%.64s': only [A-Za-z0-9._-] allowed", words[1]);
    if (strncmp(words[2], "sha256:", 7) != 0 || strlen(words[2]) != 7 + 64)
        return fail(ps, "token '%s': the hash must be sha256:<64 hex digits>", words[1]);
    hex = words[2] + 7;
    for (size_t i = 0; i < 32; i++) {
        int hi = hex_digit(hex[2 * i]), lo = hex_digit(hex[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return fail(ps, "token '%s': the hash must be sha256:<64 hex digits>", words[1]);
        t.hash[i] = (unsigned char)(hi * 16 + lo);
    }
    for (size_t i = 0; i < p->n_tokens; i++) {
        if (strcmp(p->tokens[i].name, words[1]) == 0)
            return fail(ps, "duplicate token '%s' (first on line %d)", words[1], p->tokens[i].line);
        if (CRYPTO_memcmp(p->tokens[i].hash, t.hash, sizeof(t.hash)) == 0)
            return fail(ps, "token '%s' has the same hash as token '%s' (line %d)", words[1],
                        p->tokens[i].name, p->tokens[i].line);
    }
    if (p->n_tokens == KMS_POLICY_MAX_TOKENS)
        return fail(ps, "too many tokens (at most %d)", KMS_POLICY_MAX_TOKENS);
    if (p->n_tokens == p->cap_tokens) {
        size_t cap = p->cap_tokens ? p->cap_tokens * 2 : 8;
        token *nt = calloc(cap, sizeof(*nt));
        if (nt == NULL)
            return P11KMS_ERR_NO_MEMORY;
        if (p->tokens != NULL) {
            memcpy(nt, p->tokens, p->n_tokens * sizeof(*nt));
            OPENSSL_cleanse(p->tokens, p->cap_tokens * sizeof(*p->tokens));
            free(p->tokens);
        }
        p->tokens = nt;
        p->cap_tokens = cap;
    }
    snprintf(t.name, sizeof(t.name), "%s", words[1]);
    t.line = ps->line;
    p->tokens[p->n_tokens++] = t;
    OPENSSL_cleanse(&t, sizeof(t));
    return P11KMS_OK;
}

static p11kms_status parse_line(parser *ps, kms_policy *p, char *line)
{
    char *words[MAX_WORDS];
    p11kms_status rv = P11KMS_OK;
    int n;

    for (const char *c = line; *c != '\0'; c++)
        if (((unsigned char)*c < 0x20 && *c != '\t' && *c != '\r') || (unsigned char)*c == 0x7f)
            return fail(ps, "control character in line");
    n = split_words(ps, line, words, MAX_WORDS, &rv);
    if (n < 0)
        return rv;
    if (n == 0)
        return P11KMS_OK;
    if (strcmp(words[0], "allow") == 0)
        return add_rule(ps, p, words, n);
    if (strcmp(words[0], "token") == 0)
        return add_token(ps, p, words, n);
    return fail(ps, "unknown directive '%.64s' (expected allow or token)", words[0]);
}

p11kms_status kms_policy_parse(const char *text, size_t len, const char *source, kms_policy **out,
                               char *err, size_t errlen)
{
    parser ps = {source != NULL ? source : "(policy)", err, errlen, 0};
    kms_policy *p = NULL;
    char line[KMS_POLICY_MAX_LINE + 1];
    size_t pos = 0;
    p11kms_status rv = P11KMS_ERR_NO_MEMORY;

    if (errlen > 0)
        err[0] = '\0';
    if (len > KMS_POLICY_MAX_BYTES) {
        rv = fail(&ps, "policy larger than %d bytes", KMS_POLICY_MAX_BYTES);
        goto out;
    }
    if (memchr(text, '\0', len) != NULL) {
        const char *nul = memchr(text, '\0', len);
        ps.line = 1;
        for (const char *c = text; c < nul; c++)
            ps.line += *c == '\n';
        rv = fail(&ps, "NUL byte in policy");
        goto out;
    }
    p = calloc(1, sizeof(*p));
    if (p == NULL)
        goto out;
    atomic_init(&p->refs, 1);
    while (pos < len) {
        const char *nl = memchr(text + pos, '\n', len - pos);
        size_t n = nl != NULL ? (size_t)(nl - (text + pos)) : len - pos;

        ps.line++;
        if (n > KMS_POLICY_MAX_LINE) {
            rv = fail(&ps, "line longer than %d bytes", KMS_POLICY_MAX_LINE);
            goto out;
        }
        memcpy(line, text + pos, n);
        line[n] = '\0';
        pos += n + (nl != NULL ? 1 : 0);
        if ((rv = parse_line(&ps, p, line)) != P11KMS_OK)
            goto out;
    }
    *out = p;
    p = NULL;
    rv = P11KMS_OK;
out:
    OPENSSL_cleanse(line, sizeof(line));
    if (rv == P11KMS_ERR_NO_MEMORY && errlen > 0 && err[0] == '\0')
        snprintf(err, errlen, "%s: out of memory", ps.source);
    policy_free(p);
    return rv;
}

p11kms_status kms_policy_load(const char *path, kms_policy **out, char *err, size_t errlen)
{
    parser ps = {path, err, errlen, 0};
    struct stat st;
    char *buf = NULL;
    size_t used = 0;
    int fd = -1;
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;

    if (errlen > 0)
        err[0] = '\0';
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        rv = fail(&ps, "cannot open: %s", strerror(errno));
        goto out;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        rv = fail(&ps, "not a regular file");
        goto out;
    }
    if ((st.st_mode & 022) != 0) {
        rv = fail(&ps, "writable by group or others (mode %03o); make it 0644 or stricter",
                  (unsigned)(st.st_mode & 0777));
        goto out;
    }
    if (st.st_size > KMS_POLICY_MAX_BYTES) {
        rv = fail(&ps, "policy larger than %d bytes", KMS_POLICY_MAX_BYTES);
        goto out;
    }
    buf = malloc((size_t)st.st_size + 1);
    if (buf == NULL) {
        rv = P11KMS_ERR_NO_MEMORY;
        goto out;
    }
    while (used < (size_t)st.st_size) {
        ssize_t n = read(fd, buf + used, (size_t)st.st_size - used);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            rv = fail(&ps, "read error: %s", strerror(errno));
            goto out;
        }
        if (n == 0)
            break;
        used += (size_t)n;
    }
    rv = kms_policy_parse(buf, used, path, out, err, errlen);
out:
    if (buf != NULL) {
        OPENSSL_cleanse(buf, used);
        free(buf);
    }
    if (fd >= 0)
        close(fd);
    return rv;
}

p11kms_status kms_policy_default(uid_t self, kms_policy **out)
{
    char text[160], err[KMS_POLICY_ERR_MAX];

    snprintf(text, sizeof(text), "allow uid:%u all on *\nallow uid:0 all on *\n", (unsigned)self);
    return kms_policy_parse(text, strlen(text), "(built-in policy)", out, err, sizeof(err));
}

/* ---- matching ---- */

static int principal_matches(const rule *r, const kms_principal *who)
{
    if (r->kind == PK_GROUP) {
        if (!who->unix_peer)
            return 0;
        for (size_t i = 0; i < who->n_gids && i < KMS_PRINCIPAL_GROUPS; i++)
            if (who->gids[i] == r->gid)
                return 1;
        return 0;
    }
    return fnmatch(r->principal, who->name, 0) == 0;
}

int kms_policy_allows(const kms_policy *p, const kms_principal *who, kms_policy_op op,
                      const char *key)
{
    if (p == NULL || who == NULL || who->name[0] == '\0')
        return 0;
    for (size_t i = 0; i < p->n_rules; i++) {
        const rule *r = &p->rules[i];
        if ((r->ops & (unsigned)op) == 0 || !principal_matches(r, who))
            continue;
        for (size_t k = 0; k < r->n_keys; k++) {
            if (key == NULL ? strcmp(r->keys[k], "*") == 0 : fnmatch(r->keys[k], key, 0) == 0)
                return 1;
        }
    }
    return 0;
}

int kms_policy_allows_any(const kms_policy *p, const kms_principal *who, kms_policy_op op)
{
    if (p == NULL || who == NULL || who->name[0] == '\0')
        return 0;
    for (size_t i = 0; i < p->n_rules; i++)
        if ((p->rules[i].ops & (unsigned)op) != 0 && principal_matches(&p->rules[i], who))
            return 1;
    return 0;
}

int kms_policy_token(const kms_policy *p, const char *secret, size_t len, kms_principal *who)
{
    unsigned char hash[32];
    unsigned int hlen = 0;
    const token *found = NULL;

    if (p == NULL || p->n_tokens == 0 || len == 0 || len > KMS_TOKEN_SECRET_MAX)
        return 0;
    if (EVP_Digest(secret, len, hash, &hlen, EVP_sha256(), NULL) != 1 || hlen != sizeof(hash))
        return 0;
    /* Every token is compared, whatever matched before. */
    for (size_t i = 0; i < p->n_tokens; i++)
        if (CRYPTO_memcmp(hash, p->tokens[i].hash, sizeof(hash)) == 0)
            found = &p->tokens[i];
    OPENSSL_cleanse(hash, sizeof(hash));
    if (found == NULL)
        return 0;
    memset(who, 0, sizeof(*who));
    snprintf(who->name, sizeof(who->name), "token:%s", found->name);
    return 1;
}

/* ---- the slot ---- */

void kms_policy_slot_init(kms_policy_slot *s)
{
    pthread_mutex_init(&s->lock, NULL);
    s->current = NULL;
}

kms_policy *kms_policy_slot_get(kms_policy_slot *s)
{
    kms_policy *p;

    pthread_mutex_lock(&s->lock);
    p = kms_policy_ref(s->current);
    pthread_mutex_unlock(&s->lock);
    return p;
}

void kms_policy_slot_set(kms_policy_slot *s, kms_policy *p)
{
    kms_policy *old;

    pthread_mutex_lock(&s->lock);
    old = s->current;
    s->current = p;
    pthread_mutex_unlock(&s->lock);
    kms_policy_unref(old);
}

void kms_policy_slot_destroy(kms_policy_slot *s)
{
    kms_policy_unref(s->current);
    s->current = NULL;
    pthread_mutex_destroy(&s->lock);
}
