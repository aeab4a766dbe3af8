/*
 * kms/store/audit.c - the audit log's entry encoding and chain hash, and
 * the store functions of the audit log that do not depend on a backend
 * (store.h: kms_store_audit_*, the kms_store_*_audited writes).
 *
 * The canonical bytes of an entry (docs/audit.md) are what the chain
 * hashes: every field, fixed-size integers big-endian and every string
 * length-prefixed, so two different entries never encode alike.  The
 * writer (groupcommit.c) and the verifier (kms/core/audit.c) both use
 * kms_audit_hash, so they can never disagree on the encoding.
 *
 * Audited writes are built here as kms_write requests and queued on the
 * backend's group-commit writer directly: the backends only apply writes
 * and store rows.  No state, no locks.
 */
#include "kms/store/store_internal.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/sha.h>

#include "module/log.h"

#define AUDIT_FORMAT_VERSION 1
static const char audit_magic[] = "p11kms-audit"; /* 12 bytes, no NUL */

static const char *const result_names[] = {"ok", "refused", "error"};

const char *kms_audit_result_name(kms_audit_result r)
{
    return (size_t)r < sizeof(result_names) / sizeof(result_names[0]) ? result_names[r] : "error";
}

int kms_audit_result_parse(const char *s)
{
    for (size_t i = 0; s != NULL && i < sizeof(result_names) / sizeof(result_names[0]); i++)
        if (strcmp(result_names[i], s) == 0)
            return (int)i;
    return -1;
}

static size_t put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 7; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)(v & 0xff);
    return 8;
}

static size_t put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 3; i >= 0; i--, v >>= 8)
        p[i] = (unsigned char)(v & 0xff);
    return 4;
}

/* u16 length, then the bytes (at most max of them). */
static size_t put_str(unsigned char *p, const char *s, size_t max)
{
    size_t n = strnlen(s, max);

    p[0] = (unsigned char)(n >> 8);
    p[1] = (unsigned char)(n & 0xff);
    memcpy(p + 2, s, n);
    return 2 + n;
}

size_t kms_audit_canonical(const kms_audit_entry *e, unsigned char out[KMS_AUDIT_CANONICAL_MAX])
{
    size_t o = 0;

    memcpy(out, audit_magic, sizeof(audit_magic) - 1);
    o += sizeof(audit_magic) - 1;
    out[o++] = AUDIT_FORMAT_VERSION;
    o += put_u64(out + o, e->seq);
    o += put_u64(out + o, (uint64_t)e->time);
    o += put_str(out + o, e->principal, KMS_AUDIT_PRINCIPAL_MAX);
    o += put_str(out + o, e->operation, KMS_AUDIT_OPERATION_MAX);
    o += put_str(out + o, e->key, KMS_NAME_MAX);
    o += put_u32(out + o, e->version);
    o += put_str(out + o, e->dek_id, KMS_DEK_ID_LEN);
    o += put_str(out + o, kms_audit_result_name(e->result), 16);
    o += put_str(out + o, e->error_code, KMS_AUDIT_CODE_MAX);
    return o; /* at most 13 + 16 + 4 + 6*2 + 159+31+64+36+7+31 = 373 */
}

void kms_audit_hash(const unsigned char prev[KMS_AUDIT_HASH_LEN], const kms_audit_entry *e,
                    unsigned char out[KMS_AUDIT_HASH_LEN])
{
    unsigned char buf[KMS_AUDIT_HASH_LEN + KMS_AUDIT_CANONICAL_MAX];
    size_t n;

    memcpy(buf, prev, KMS_AUDIT_HASH_LEN);
    n = kms_audit_canonical(e, buf + KMS_AUDIT_HASH_LEN);
    SHA256(buf, KMS_AUDIT_HASH_LEN + n, out);
}

/* ---- the store functions of the audit log -------------------------------- */

void kms_store_audit_attach(kms_store *st, kms_audit_mac_fn fn, void *arg)
{
    if (st != NULL && st->ops->writer != NULL)
        kms_gc_audit_attach(st->ops->writer(st), fn, arg);
}

/* Queue w (with its entries) on the backend's writer. */
static p11kms_status submit(kms_store *st, kms_write *w, kms_audit_entry *audit, size_t n_audit)
{
    if (st->ops->writer == NULL) {
        LOG_ERROR("store", "the %s backend has no audit log", st->ops->backend);
        return P11KMS_ERR_INTERNAL;
    }
    w->audit = audit;
    w->n_audit = n_audit;
    return kms_gc_submit(st->ops->writer(st), w);
}

static int entries_ok(const kms_audit_entry *audit, size_t n)
{
    return (audit == NULL) == (n == 0);
}

p11kms_status kms_store_audit_append(kms_store *st, kms_audit_entry *entries, size_t n)
{
    kms_write w = {.type = KMS_WRITE_NOOP};

    if (st == NULL || entries == NULL || n == 0)
        return P11KMS_ERR_BAD_REQUEST;
    return submit(st, &w, entries, n);
}

p11kms_status kms_store_audit_list(kms_store *st, uint64_t after, size_t limit,
                                   kms_audit_entry **out, size_t *count)
{
    if (st == NULL || out == NULL || count == NULL || limit == 0 || limit > KMS_AUDIT_LIST_MAX ||
        after > (uint64_t)INT64_MAX)
        return P11KMS_ERR_BAD_REQUEST;
    if (st->ops->audit_list == NULL)
        return P11KMS_ERR_INTERNAL;
    return st->ops->audit_list(st, after, limit, out, count);
}

p11kms_status kms_store_audit_head(kms_store *st, kms_audit_head *out)
{
    if (st == NULL || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (st->ops->audit_head == NULL)
        return P11KMS_ERR_INTERNAL;
    memset(out, 0, sizeof(*out));
    return st->ops->audit_head(st, out);
}

p11kms_status kms_store_audit_key(kms_store *st, kms_audit_key_create_fn create, void *arg,
                                  unsigned char id[KMS_TOKEN_ID_LEN], int *created)
{
    kms_write w = {.type = KMS_WRITE_AUDIT_KEY};
    p11kms_status rv;

    if (st == NULL || create == NULL || id == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    w.u.audit_key.create = create;
    w.u.audit_key.arg = arg;
    w.u.audit_key.id = id;
    rv = submit(st, &w, NULL, 0);
    if (rv == P11KMS_OK && created != NULL)
        *created = w.u.audit_key.created;
    return rv;
}

/* ---- audited writes: the checks of the plain functions (store.c), then
 * the write built here.  Without entries they are the plain functions. */

p11kms_status kms_store_key_create_audited(kms_store *st, const char *name,
                                           const unsigned char token_id[KMS_TOKEN_ID_LEN],
                                           int64_t now, kms_audit_entry *audit, size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_KEY_CREATE};

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_key_create(st, name, token_id, now)
                            : P11KMS_ERR_BAD_REQUEST;
    if (st == NULL || !kms_store_name_ok(name) || token_id == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    w.u.key_create.name = name;
    w.u.key_create.token_id = token_id;
    w.u.key_create.now = now;
    return submit(st, &w, audit, n_audit);
}

/* The argument rules of a capped insert (audited or not). */
static int dek_insert_ok(const kms_store *st, const kms_dek_rec *dek, uint64_t max_wraps)
{
    return st != NULL && dek != NULL &&
           strnlen(dek->id, KMS_DEK_ID_LEN + 1) == KMS_DEK_ID_LEN &&
           kms_store_name_ok(dek->key) && dek->version != 0 && dek->context != NULL &&
           dek->wrapped_len != 0 && dek->wrapped_len <= KMS_WRAPPED_MAX &&
           dek->state == KMS_DEK_ACTIVE && max_wraps != 0;
}

p11kms_status kms_store_dek_insert_capped_audited(kms_store *st, const kms_dek_rec *dek,
                                                  uint64_t max_wraps, int *refused,
                                                  kms_audit_entry *audit, size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_DEK_INSERT};
    p11kms_status rv;

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_dek_insert_capped(st, dek, max_wraps, refused)
                            : P11KMS_ERR_BAD_REQUEST;
    if (!dek_insert_ok(st, dek, max_wraps) || refused == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    *refused = 0;
    w.u.dek_insert.dek = dek;
    w.u.dek_insert.max_wraps = max_wraps;
    rv = submit(st, &w, audit, n_audit);
    if (rv == P11KMS_OK)
        *refused = w.u.dek_insert.refused;
    return rv;
}

/* ---- asynchronous writes (kmsd's hot path) ------------------------------- */

struct kms_store_async {
    kms_write w;
};

kms_store_async *kms_store_async_new(void)
{
    return calloc(1, sizeof(kms_store_async));
}

void kms_store_async_free(kms_store_async *a)
{
    free(a);
}

static p11kms_status submit_async(kms_store *st, kms_store_async *a, kms_audit_entry *audit,
                                  size_t n_audit, kms_store_done_fn done, void *arg)
{
    if (st->ops->writer == NULL) {
        LOG_ERROR("store", "the %s backend has no audit log", st->ops->backend);
        return P11KMS_ERR_INTERNAL;
    }
    a->w.audit = audit;
    a->w.n_audit = n_audit;
    return kms_gc_submit_async(st->ops->writer(st), &a->w, done, arg);
}

p11kms_status kms_store_audit_append_async(kms_store *st, kms_audit_entry *entries, size_t n,
                                           kms_store_async *a, kms_store_done_fn done,
                                           void *arg)
{
    if (st == NULL || entries == NULL || n == 0 || a == NULL || done == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    memset(&a->w, 0, sizeof(a->w));
    a->w.type = KMS_WRITE_NOOP;
    return submit_async(st, a, entries, n, done, arg);
}

p11kms_status kms_store_dek_insert_async(kms_store *st, const kms_dek_rec *dek,
                                         uint64_t max_wraps, kms_audit_entry *audit,
                                         size_t n_audit, kms_store_async *a,
                                         kms_store_done_fn done, void *arg)
{
    if (!dek_insert_ok(st, dek, max_wraps) || n_audit == 0 || !entries_ok(audit, n_audit) ||
        a == NULL || done == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    memset(&a->w, 0, sizeof(a->w));
    a->w.type = KMS_WRITE_DEK_INSERT;
    a->w.u.dek_insert.dek = dek;
    a->w.u.dek_insert.max_wraps = max_wraps;
    return submit_async(st, a, audit, n_audit, done, arg);
}

p11kms_status kms_store_async_result(const kms_store_async *a, int *refused)
{
    if (refused != NULL)
        *refused = a->w.type == KMS_WRITE_DEK_INSERT && a->w.result == P11KMS_OK &&
                   a->w.u.dek_insert.refused;
    return a->w.result;
}

static p11kms_status dek_state_audited(kms_store *st, kms_write *w, uint64_t *count,
                                       kms_audit_entry *audit, size_t n_audit)
{
    p11kms_status rv = submit(st, w, audit, n_audit);

    if (rv == P11KMS_OK && count != NULL)
        *count = w->u.dek_state.count;
    return rv;
}

p11kms_status kms_store_dek_revoke_audited(kms_store *st, const char *id, kms_revoke_reason reason,
                                           int64_t now, kms_audit_entry *audit, size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_DEK_REVOKE};

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_dek_revoke(st, id, reason, now) : P11KMS_ERR_BAD_REQUEST;
    if (st == NULL || id == NULL || kms_revoke_reason_name(reason) == NULL || now <= 0)
        return P11KMS_ERR_BAD_REQUEST;
    if (strnlen(id, KMS_DEK_ID_LEN + 1) != KMS_DEK_ID_LEN)
        return P11KMS_ERR_DEK_NOT_FOUND;
    w.u.dek_state.id = id;
    w.u.dek_state.reason = reason;
    w.u.dek_state.now = now;
    return dek_state_audited(st, &w, NULL, audit, n_audit);
}

p11kms_status kms_store_dek_destroy_audited(kms_store *st, const char *id, int64_t now,
                                            kms_audit_entry *audit, size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_DEK_DESTROY};

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_dek_destroy(st, id, now) : P11KMS_ERR_BAD_REQUEST;
    if (st == NULL || id == NULL || now <= 0)
        return P11KMS_ERR_BAD_REQUEST;
    if (strnlen(id, KMS_DEK_ID_LEN + 1) != KMS_DEK_ID_LEN)
        return P11KMS_ERR_DEK_NOT_FOUND;
    w.u.dek_state.id = id;
    w.u.dek_state.now = now;
    return dek_state_audited(st, &w, NULL, audit, n_audit);
}

/* Bulk: the filter is checked with the plain functions' rule, so no
 * backend ever sees malformed JSON inside a shared group commit. */
p11kms_status kms_store_dek_revoke_bulk_audited(kms_store *st, const char *key, const char *filter,
                                                kms_revoke_reason reason, int64_t now,
                                                uint64_t *count, kms_audit_entry *audit,
                                                size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_DEK_REVOKE};

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_dek_revoke_bulk(st, key, filter, reason, now, count)
                            : P11KMS_ERR_BAD_REQUEST;
    if (st == NULL || !kms_store_name_ok(key) || !kms_store_filter_ok(filter) ||
        kms_revoke_reason_name(reason) == NULL || now <= 0 || count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    w.u.dek_state.key = key;
    w.u.dek_state.filter = filter;
    w.u.dek_state.reason = reason;
    w.u.dek_state.now = now;
    return dek_state_audited(st, &w, count, audit, n_audit);
}

p11kms_status kms_store_dek_destroy_bulk_audited(kms_store *st, const char *key, const char *filter,
                                                 int64_t now, uint64_t *count,
                                                 kms_audit_entry *audit, size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_DEK_DESTROY};

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_dek_destroy_bulk(st, key, filter, now, count)
                            : P11KMS_ERR_BAD_REQUEST;
    if (st == NULL || !kms_store_name_ok(key) || !kms_store_filter_ok(filter) || now <= 0 ||
        count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    w.u.dek_state.key = key;
    w.u.dek_state.filter = filter;
    w.u.dek_state.now = now;
    return dek_state_audited(st, &w, count, audit, n_audit);
}

p11kms_status kms_store_version_add_audited(kms_store *st, const char *name,
                                            uint32_t expected_latest,
                                            const unsigned char token_id[KMS_TOKEN_ID_LEN],
                                            int64_t now, uint32_t *added, kms_audit_entry *audit,
                                            size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_VERSION_ADD};
    p11kms_status rv;

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_version_add(st, name, expected_latest, token_id, now, added)
                            : P11KMS_ERR_BAD_REQUEST;
    if (st == NULL || !kms_store_name_ok(name) || token_id == NULL || added == NULL ||
        expected_latest == 0 || expected_latest == UINT32_MAX)
        return P11KMS_ERR_BAD_REQUEST;
    *added = 0;
    w.u.version_add.name = name;
    w.u.version_add.expected_latest = expected_latest;
    w.u.version_add.token_id = token_id;
    w.u.version_add.now = now;
    rv = submit(st, &w, audit, n_audit);
    if (rv == P11KMS_OK)
        *added = w.u.version_add.added;
    return rv;
}

p11kms_status kms_store_key_set_state_audited(kms_store *st, const char *name, kms_key_state state,
                                              kms_audit_entry *audit, size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_KEY_SET_STATE};

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_key_set_state(st, name, state) : P11KMS_ERR_BAD_REQUEST;
    if (st == NULL || !kms_store_name_ok(name) ||
        (state != KMS_KEY_ENABLED && state != KMS_KEY_DISABLED))
        return P11KMS_ERR_BAD_REQUEST;
    w.u.key_meta.name = name;
    w.u.key_meta.state = state;
    return submit(st, &w, audit, n_audit);
}

p11kms_status kms_store_key_config_audited(kms_store *st, const char *name,
                                           uint32_t min_decrypt_version, int64_t rotation_period,
                                           kms_audit_entry *audit, size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_KEY_CONFIG};

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_key_config(st, name, min_decrypt_version, rotation_period)
                            : P11KMS_ERR_BAD_REQUEST;
    if (st == NULL || !kms_store_name_ok(name) || rotation_period < -1 ||
        (min_decrypt_version == 0 && rotation_period == -1))
        return P11KMS_ERR_BAD_REQUEST;
    w.u.key_meta.name = name;
    w.u.key_meta.min_decrypt_version = min_decrypt_version;
    w.u.key_meta.rotation_period = rotation_period;
    return submit(st, &w, audit, n_audit);
}

p11kms_status kms_store_rewrap_commit_audited(kms_store *st, const char *name, uint32_t new_version,
                                              const kms_rewrap_item *items, size_t n,
                                              uint64_t *updated, kms_audit_entry *audit,
                                              size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_REWRAP};
    p11kms_status rv;

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_rewrap_commit(st, name, new_version, items, n, updated)
                            : P11KMS_ERR_BAD_REQUEST;
    if (st == NULL || !kms_store_name_ok(name) || updated == NULL || new_version == 0 ||
        (items == NULL && n > 0) || n > KMS_REWRAP_BATCH_MAX)
        return P11KMS_ERR_BAD_REQUEST;
    for (size_t i = 0; i < n; i++)
        if (strnlen(items[i].id, KMS_DEK_ID_LEN + 1) != KMS_DEK_ID_LEN ||
            items[i].old_version == 0 || items[i].old_version >= new_version ||
            items[i].wrapped_len == 0 || items[i].wrapped_len > KMS_WRAPPED_MAX)
            return P11KMS_ERR_BAD_REQUEST;
    *updated = 0;
    w.u.rewrap.name = name;
    w.u.rewrap.new_version = new_version;
    w.u.rewrap.items = items;
    w.u.rewrap.n = n;
    rv = submit(st, &w, audit, n_audit);
    if (rv == P11KMS_OK)
        *updated = w.u.rewrap.updated;
    return rv;
}

p11kms_status kms_store_version_retire_audited(kms_store *st, const char *name, uint32_t version,
                                               int64_t now, kms_audit_entry *audit, size_t n_audit)
{
    kms_write w = {.type = KMS_WRITE_VERSION_RETIRE};

    if (n_audit == 0 || !entries_ok(audit, n_audit))
        return n_audit == 0 ? kms_store_version_retire(st, name, version, now)
                            : P11KMS_ERR_BAD_REQUEST;
    if (st == NULL || !kms_store_name_ok(name) || now <= 0)
        return P11KMS_ERR_BAD_REQUEST;
    if (version == 0)
        return P11KMS_ERR_KEY_NOT_FOUND;
    w.u.retire.name = name;
    w.u.retire.version = version;
    w.u.retire.now = now;
    return submit(st, &w, audit, n_audit);
}
