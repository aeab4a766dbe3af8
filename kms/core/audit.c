/*
 * kms/core/audit.c - the core's side of the audit log (issue 5; format in
 * docs/audit.md): who is acting, the entry of each operation, the MAC key
 * in the token, reading the log and verifying it.
 *
 * Who: the principal of the core calls a thread makes is set by the
 * caller with kms_core_actor_set (kmsd's worker sets the request's
 * principal around each call; the rotation thread sets "kmsd:rotation").
 * It is thread-local, so no core function had to grow a parameter, and it
 * is copied, so the caller's buffer may go away.  Unset, it is "local".
 *
 * Every core operation writes exactly one entry (a rewrap one per
 * committed batch): state changes attach it to their store write, so it
 * commits in the same transaction; operations that change nothing
 * (decrypt, show, list) and operations that failed before writing append
 * it alone (kms_audit_settle) and, when they succeeded, return only once
 * it is durable: a decrypt whose entry cannot be written returns no
 * plaintext (fail closed).  Entries never carry plaintext, PINs, contexts
 * or wrapped bytes: only names, numbers, ids and status codes.
 *
 * The MAC key: one generic secret in the token (p11_hmac_key_create,
 * label "p11kms-audit:v1", outside the "p11kms:" prefix of KEK objects so
 * orphan reconciliation never sees it), its CKA_ID recorded in the store
 * by the first node that starts (kms_store_audit_key, under the store's
 * lock).  The writer calls audit_mac once per commit group.
 *
 * Locking: the audit state (ok/broken) is atomic; the verification thread
 * started by kms_audit_startup_check is joined by kms_core_free.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "kms/core/core.h"
#include "kms/core/internal.h"
#include "module/log.h"

#define AUDIT_VERIFY_PAGE 1000
#define AUDIT_LOCAL_ACTOR "local"

static _Thread_local char actor[KMS_AUDIT_PRINCIPAL_MAX + 1];

void kms_core_actor_set(const char *principal)
{
    snprintf(actor, sizeof(actor), "%s", principal != NULL ? principal : "");
}

const char *kms_core_actor(void)
{
    return actor[0] != '\0' ? actor : AUDIT_LOCAL_ACTOR;
}

void kms_audit_entry_init(kms_audit_entry *e, const char *operation, const char *key,
                          uint32_t version, const char *dek_id)
{
    memset(e, 0, sizeof(*e));
    snprintf(e->principal, sizeof(e->principal), "%s", kms_core_actor());
    snprintf(e->operation, sizeof(e->operation), "%s", operation);
    snprintf(e->key, sizeof(e->key), "%s", key != NULL ? key : "");
    e->version = version;
    snprintf(e->dek_id, sizeof(e->dek_id), "%s", dek_id != NULL ? dek_id : "");
    e->result_from_write = 1;
}

void kms_audit_settle_prepare(kms_audit_entry *e, p11kms_status rv)
{
    e->result_from_write = 0;
    e->result = rv == P11KMS_OK              ? KMS_AUDIT_OK
                : rv == P11KMS_ERR_FORBIDDEN ? KMS_AUDIT_REFUSED
                                             : KMS_AUDIT_ERROR;
    snprintf(e->error_code, sizeof(e->error_code), "%s",
             rv == P11KMS_OK ? "" : p11kms_status_code(rv));
    e->time = 0;
}

p11kms_status kms_audit_settle(kms_core *core, kms_audit_entry *e, p11kms_status rv)
{
    p11kms_status ars;

    if (e->committed)
        return rv;
    kms_audit_settle_prepare(e, rv);
    ars = kms_store_audit_append(kms_core_store(core), e, 1);
    if (ars == P11KMS_OK)
        return rv;
    LOG_ERROR("core", "the audit entry of %s by %s could not be written (%s)%s", e->operation,
              e->principal, p11kms_status_code(ars),
              rv == P11KMS_OK ? ": the operation fails closed" : "");
    if (rv != P11KMS_OK)
        return rv;
    return ars == P11KMS_ERR_TOKEN_UNAVAILABLE ? ars : P11KMS_ERR_STORE_UNAVAILABLE;
}

p11kms_status kms_audit_record(kms_core *core, const char *operation, const char *key,
                               const char *dek_id, p11kms_status result)
{
    kms_audit_entry e;

    if (core == NULL || operation == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    kms_audit_entry_init(&e, operation, key, 0, dek_id);
    return kms_audit_settle(core, &e, result);
}

/* ---- the MAC key ---------------------------------------------------------- */

static p11kms_status create_mac_key(void *arg, unsigned char id[KMS_TOKEN_ID_LEN])
{
    kms_core *core = arg;
    CK_RV crv = p11_hmac_key_create(kms_core_token(core), KMS_AUDIT_KEY_LABEL, id);

    if (crv != CKR_OK) {
        LOG_ERROR("core", "cannot create the audit MAC key in the token: %s", p11_rv_name(crv));
        return kms_status_from_rv(crv);
    }
    LOG_INFO("core", "created the audit MAC key (%s) in the token", KMS_AUDIT_KEY_LABEL);
    return P11KMS_OK;
}

/* On the writer thread, once per commit group. */
static p11kms_status audit_mac(void *arg, const unsigned char start[KMS_AUDIT_HASH_LEN],
                               const unsigned char end[KMS_AUDIT_HASH_LEN],
                               unsigned char mac[KMS_AUDIT_MAC_LEN])
{
    kms_core *core = arg;
    unsigned char data[2 * KMS_AUDIT_HASH_LEN];
    CK_RV crv;

    memcpy(data, start, KMS_AUDIT_HASH_LEN);
    memcpy(data + KMS_AUDIT_HASH_LEN, end, KMS_AUDIT_HASH_LEN);
    crv = p11_hmac_sign(kms_core_token(core), kms_core_audit_key_id(core), data, sizeof(data), mac);
    if (crv != CKR_OK) {
        LOG_ERROR("core", "audit MAC in the token failed: %s", p11_rv_name(crv));
        return kms_status_from_rv(crv);
    }
    return P11KMS_OK;
}

p11kms_status kms_audit_open(kms_core *core, unsigned char id[KMS_TOKEN_ID_LEN])
{
    p11kms_status rv;
    int created = 0;
    CK_RV crv;

    rv = kms_store_audit_key(kms_core_store(core), create_mac_key, core, id, &created);
    if (rv != P11KMS_OK) {
        LOG_ERROR("core", "cannot read or create the audit MAC key id: %s", p11kms_status_code(rv));
        goto out;
    }
    if (!created) {
        crv = p11_kek_exists(kms_core_token(core), id);
        if (crv != CKR_OK) {
            LOG_ERROR("core",
                      "the audit MAC key recorded in the store is not in the token (%s): this "
                      "store belongs to another token, or the key was deleted; no audit entry "
                      "can be sealed",
                      p11_rv_name(crv));
            rv = crv == CKR_KEY_HANDLE_INVALID ? P11KMS_ERR_INTERNAL : kms_status_from_rv(crv);
            goto out;
        }
    }
    kms_store_audit_attach(kms_core_store(core), audit_mac, core);
out:
    return rv;
}

/* ---- reading and verifying ------------------------------------------------ */

p11kms_status kms_audit_list(kms_core *core, uint64_t after, size_t limit, kms_audit_entry **out,
                             size_t *count)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_audit_entry e;

    kms_audit_entry_init(&e, "audit.list", NULL, 0, NULL);
    if (core == NULL || out == NULL || count == NULL || limit > KMS_AUDIT_LIST_MAX)
        goto out;
    if (limit == 0)
        limit = KMS_AUDIT_LIST_DEFAULT;
    /* The entry first: a reader of the log is on the log before it reads. */
    rv = kms_audit_settle(core, &e, P11KMS_OK);
    if (rv != P11KMS_OK)
        return rv;
    return kms_store_audit_list(kms_core_store(core), after, limit, out, count);
out:
    return kms_audit_settle(core, &e, rv);
}

static void bad(kms_audit_report *r, uint64_t seq, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void bad(kms_audit_report *r, uint64_t seq, const char *fmt, ...)
{
    va_list ap;

    if (!r->ok)
        return; /* the first one wins */
    r->ok = 0;
    r->first_bad = seq;
    va_start(ap, fmt);
    vsnprintf(r->reason, sizeof(r->reason), fmt, ap);
    va_end(ap);
}

/* Walk entries from after+1 on, continuing the state in w. */
typedef struct walk {
    uint64_t last_seq;
    unsigned char prev[KMS_AUDIT_HASH_LEN];
    unsigned char sealed[KMS_AUDIT_HASH_LEN]; /* hash of the last sealed entry */
    uint64_t seg_first;                       /* first entry after it */
} walk;

static p11kms_status check_entry(kms_core *core, walk *w, const kms_audit_entry *e,
                                 kms_audit_report *r)
{
    unsigned char h[KMS_AUDIT_HASH_LEN], data[2 * KMS_AUDIT_HASH_LEN];
    CK_RV crv;

    if (e->seq != w->last_seq + 1)
        bad(r, w->last_seq + 1, "entry %llu is missing (the next one is %llu): deleted",
            (unsigned long long)(w->last_seq + 1), (unsigned long long)e->seq);
    if (CRYPTO_memcmp(e->prev_hash, w->prev, sizeof(w->prev)) != 0)
        bad(r, e->seq,
            "entry %llu does not follow entry %llu (prev_hash differs): inserted, reordered or "
            "a predecessor deleted",
            (unsigned long long)e->seq, (unsigned long long)w->last_seq);
    kms_audit_hash(e->prev_hash, e, h);
    if (CRYPTO_memcmp(h, e->hash, sizeof(h)) != 0)
        bad(r, e->seq, "entry %llu was altered (its hash does not match its contents)",
            (unsigned long long)e->seq);
    if (e->has_mac) {
        memcpy(data, w->sealed, KMS_AUDIT_HASH_LEN);
        memcpy(data + KMS_AUDIT_HASH_LEN, e->hash, KMS_AUDIT_HASH_LEN);
        crv = p11_hmac_verify(kms_core_token(core), kms_core_audit_key_id(core), data, sizeof(data),
                              e->mac);
        if (crv == CKR_SIGNATURE_INVALID)
            bad(r, w->seg_first,
                "the HMAC sealing entries %llu to %llu does not verify: rewritten, or "
                "entries were added outside kmsd",
                (unsigned long long)w->seg_first, (unsigned long long)e->seq);
        else if (crv != CKR_OK)
            return kms_status_from_rv(crv);
        memcpy(w->sealed, e->hash, KMS_AUDIT_HASH_LEN);
        w->seg_first = e->seq + 1;
    }
    memcpy(w->prev, e->hash, KMS_AUDIT_HASH_LEN);
    w->last_seq = e->seq;
    return P11KMS_OK;
}

/* Walk every entry after w->last_seq; *n counts them. */
static p11kms_status walk_rows(kms_core *core, walk *w, kms_audit_report *r, uint64_t *n)
{
    p11kms_status rv = P11KMS_OK;
    kms_audit_entry *page = NULL;
    size_t count = 0;

    do {
        free(page);
        page = NULL;
        rv = kms_store_audit_list(kms_core_store(core), w->last_seq, AUDIT_VERIFY_PAGE, &page,
                                  &count);
        if (rv != P11KMS_OK)
            goto out;
        for (size_t i = 0; i < count; i++) {
            rv = check_entry(core, w, &page[i], r);
            if (rv != P11KMS_OK)
                goto out;
            (*n)++;
        }
    } while (count == AUDIT_VERIFY_PAGE);
out:
    free(page);
    return rv;
}

p11kms_status kms_audit_verify_chain(kms_core *core, kms_audit_report *out)
{
    p11kms_status rv = P11KMS_ERR_BAD_REQUEST;
    kms_audit_report r;
    kms_audit_head head;
    walk w;
    uint64_t n = 0;

    if (core == NULL || out == NULL)
        goto out;
    memset(&r, 0, sizeof(r));
    memset(&w, 0, sizeof(w));
    r.ok = 1;
    w.seg_first = 1;
    rv = walk_rows(core, &w, &r, &n);
    if (rv != P11KMS_OK)
        goto out;
    /* The head after the walk: entries committed meanwhile move it forward
     * (walk on); a head still ahead of the last row once no more rows come
     * is a deleted tail. */
    for (;;) {
        uint64_t before = w.last_seq;

        rv = kms_store_audit_head(kms_core_store(core), &head);
        if (rv != P11KMS_OK)
            goto out;
        if (!head.present || head.seq <= w.last_seq)
            break;
        rv = walk_rows(core, &w, &r, &n);
        if (rv != P11KMS_OK)
            goto out;
        if (w.last_seq == before)
            break;
    }
    if (!head.present && w.last_seq > 0)
        bad(&r, 1, "the sealed head record is missing (audit_head was deleted)");
    else if (head.present && head.seq > w.last_seq)
        bad(&r, w.last_seq + 1,
            "entries after %llu are missing: the sealed head is entry %llu (the tail was "
            "deleted)",
            (unsigned long long)w.last_seq, (unsigned long long)head.seq);
    else if (head.present && w.seg_first <= w.last_seq)
        bad(&r, w.seg_first, "entries %llu to %llu are not sealed by kmsd: added outside it",
            (unsigned long long)w.seg_first, (unsigned long long)w.last_seq);
    else if (head.present && CRYPTO_memcmp(head.hash, w.prev, sizeof(w.prev)) != 0)
        bad(&r, head.seq, "entry %llu does not match the sealed head",
            (unsigned long long)head.seq);
    r.entries = n;
    kms_core_audit_state_set(core, r.ok ? KMS_AUDIT_STATE_OK : KMS_AUDIT_STATE_BROKEN);
    if (!r.ok)
        LOG_ERROR("core", "AUDIT LOG BROKEN: first bad entry %llu: %s (kmsd keeps serving)",
                  (unsigned long long)r.first_bad, r.reason);
    *out = r;
    rv = P11KMS_OK;
out:
    return rv;
}

p11kms_status kms_audit_verify(kms_core *core, kms_audit_report *out)
{
    p11kms_status rv;
    kms_audit_entry e;

    if (core == NULL || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    kms_audit_entry_init(&e, "audit.verify", NULL, 0, NULL);
    rv = kms_audit_verify_chain(core, out);
    return kms_audit_settle(core, &e, rv);
}
