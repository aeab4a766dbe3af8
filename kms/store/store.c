/*
 * kms/store/store.c - the public store functions (store.h): argument
 * checks, then dispatch through the backend's ops table; plus the record
 * free functions, state names and record helpers shared by backends.
 *
 * Owns no state and takes no locks: thread safety is the backends' (each
 * backend function is thread-safe).
 */
#include "kms/store/store_internal.h"

#include <stdlib.h>
#include <string.h>

#include <jansson.h>

static int name_ok(const char *name)
{
    size_t n;

    if (name == NULL)
        return 0;
    n = strnlen(name, KMS_NAME_MAX + 1);
    return n >= 1 && n <= KMS_NAME_MAX;
}

static int dek_id_ok(const char *id)
{
    return id != NULL && strnlen(id, KMS_DEK_ID_LEN + 1) == KMS_DEK_ID_LEN;
}

void kms_store_close(kms_store *st)
{
    if (st == NULL)
        return;
    st->ops->close(st);
}

const char *kms_store_backend(const kms_store *st)
{
    return st != NULL ? st->ops->backend : "none";
}

p11kms_status kms_store_ping(kms_store *st)
{
    if (st == NULL)
        return P11KMS_ERR_STORE_UNAVAILABLE;
    return st->ops->ping(st);
}

p11kms_status kms_store_counts_get(kms_store *st, kms_store_counts *out)
{
    if (st == NULL)
        return P11KMS_ERR_STORE_UNAVAILABLE;
    if (out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    memset(out, 0, sizeof(*out));
    return st->ops->counts(st, out);
}

p11kms_status kms_store_key_create(kms_store *st, const char *name,
                                   const unsigned char token_id[KMS_TOKEN_ID_LEN], int64_t now)
{
    if (st == NULL || !name_ok(name) || token_id == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    return st->ops->key_create(st, name, token_id, now);
}

p11kms_status kms_store_key_get(kms_store *st, const char *name, kms_key_rec **out)
{
    if (st == NULL || name == NULL || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(name))
        return P11KMS_ERR_KEY_NOT_FOUND;
    return st->ops->key_get(st, name, out);
}

p11kms_status kms_store_key_get_meta(kms_store *st, const char *name, kms_key_rec **out)
{
    if (st == NULL || name == NULL || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(name))
        return P11KMS_ERR_KEY_NOT_FOUND;
    return st->ops->key_get_meta(st, name, out);
}

p11kms_status kms_store_key_list(kms_store *st, kms_key_rec ***out, size_t *count)
{
    if (st == NULL || out == NULL || count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    return st->ops->key_list(st, out, count);
}

p11kms_status kms_store_dek_insert(kms_store *st, const kms_dek_rec *dek)
{
    if (st == NULL || dek == NULL || !dek_id_ok(dek->id) || !name_ok(dek->key) ||
        dek->version == 0 || dek->context == NULL || dek->wrapped_len == 0 ||
        dek->wrapped_len > KMS_WRAPPED_MAX || dek->state != KMS_DEK_ACTIVE)
        return P11KMS_ERR_BAD_REQUEST;
    return st->ops->dek_insert(st, dek, UINT64_MAX, NULL);
}

p11kms_status kms_store_dek_insert_capped(kms_store *st, const kms_dek_rec *dek,
                                          uint64_t max_wraps, int *refused)
{
    if (st == NULL || dek == NULL || !dek_id_ok(dek->id) || !name_ok(dek->key) ||
        dek->version == 0 || dek->context == NULL || dek->wrapped_len == 0 ||
        dek->wrapped_len > KMS_WRAPPED_MAX || dek->state != KMS_DEK_ACTIVE || max_wraps == 0 ||
        refused == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    *refused = 0;
    return st->ops->dek_insert(st, dek, max_wraps, refused);
}

p11kms_status kms_store_dek_get(kms_store *st, const char *id, kms_dek_rec **out)
{
    if (st == NULL || id == NULL || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (!dek_id_ok(id))
        return P11KMS_ERR_DEK_NOT_FOUND;
    return st->ops->dek_get(st, id, out);
}

static int reason_ok(kms_revoke_reason r)
{
    return r == KMS_REVOKE_COMPROMISED || r == KMS_REVOKE_SUPERSEDED || r == KMS_REVOKE_CESSATION ||
           r == KMS_REVOKE_UNSPECIFIED;
}

/* A bulk filter is a JSON object of string values naming at least one
 * pair ("{}" would match every DEK of the key).  Checked here so that no
 * backend ever sees malformed JSON inside a shared group commit. */
static int filter_ok(const char *filter)
{
    json_t *j = NULL, *v;
    const char *name;
    int ok = 0;

    if (filter == NULL)
        goto out;
    j = json_loads(filter, JSON_REJECT_DUPLICATES, NULL);
    if (j == NULL || !json_is_object(j) || json_object_size(j) == 0)
        goto out;
    ok = 1;
    json_object_foreach(j, name, v)
    {
        if (!json_is_string(v))
            ok = 0;
    }
out:
    json_decref(j);
    return ok;
}

int kms_store_name_ok(const char *name)
{
    return name_ok(name);
}

int kms_store_filter_ok(const char *filter)
{
    return filter_ok(filter);
}

p11kms_status kms_store_dek_revoke(kms_store *st, const char *id, kms_revoke_reason reason,
                                   int64_t now)
{
    if (st == NULL || id == NULL || !reason_ok(reason) || now <= 0)
        return P11KMS_ERR_BAD_REQUEST;
    if (!dek_id_ok(id))
        return P11KMS_ERR_DEK_NOT_FOUND;
    return st->ops->dek_revoke(st, id, reason, now);
}

p11kms_status kms_store_dek_destroy(kms_store *st, const char *id, int64_t now)
{
    if (st == NULL || id == NULL || now <= 0)
        return P11KMS_ERR_BAD_REQUEST;
    if (!dek_id_ok(id))
        return P11KMS_ERR_DEK_NOT_FOUND;
    return st->ops->dek_destroy(st, id, now);
}

p11kms_status kms_store_dek_revoke_bulk(kms_store *st, const char *key, const char *filter,
                                        kms_revoke_reason reason, int64_t now, uint64_t *count)
{
    if (st == NULL || key == NULL || !filter_ok(filter) || !reason_ok(reason) || now <= 0 ||
        count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(key))
        return P11KMS_ERR_KEY_NOT_FOUND;
    return st->ops->dek_revoke_bulk(st, key, filter, reason, now, count);
}

p11kms_status kms_store_dek_destroy_bulk(kms_store *st, const char *key, const char *filter,
                                         int64_t now, uint64_t *count)
{
    if (st == NULL || key == NULL || !filter_ok(filter) || now <= 0 || count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(key))
        return P11KMS_ERR_KEY_NOT_FOUND;
    return st->ops->dek_destroy_bulk(st, key, filter, now, count);
}

p11kms_status kms_store_dek_list(kms_store *st, const char *key, int state, const char *cursor,
                                 size_t limit, kms_dek_rec ***out, size_t *count, int *more)
{
    if (st == NULL || key == NULL || out == NULL || count == NULL || more == NULL || limit == 0 ||
        limit > KMS_DEK_LIST_MAX || state < -1 || state > KMS_DEK_DESTROYED ||
        (cursor != NULL && strnlen(cursor, KMS_DEK_ID_LEN + 1) > KMS_DEK_ID_LEN))
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(key))
        return P11KMS_ERR_KEY_NOT_FOUND;
    return st->ops->dek_list(st, key, state, cursor != NULL ? cursor : "", limit, out, count, more);
}

p11kms_status kms_store_token_ids(kms_store *st, unsigned char (**ids)[KMS_TOKEN_ID_LEN],
                                  size_t *count)
{
    if (st == NULL || ids == NULL || count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    return st->ops->token_ids(st, 0, ids, count);
}

p11kms_status kms_store_token_ids_destroyed(kms_store *st,
                                            unsigned char (**ids)[KMS_TOKEN_ID_LEN],
                                            size_t *count)
{
    if (st == NULL || ids == NULL || count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    return st->ops->token_ids(st, 1, ids, count);
}

/* ---- KEK creation intents ---- */

p11kms_status kms_store_kek_intent_add(kms_store *st, const unsigned char token_id[KMS_TOKEN_ID_LEN],
                                       const char *key_name, uint32_t version, int64_t now)
{
    if (st == NULL || token_id == NULL || !name_ok(key_name) || version == 0)
        return P11KMS_ERR_BAD_REQUEST;
    return st->ops->kek_intent_add(st, token_id, key_name, version, now);
}

p11kms_status kms_store_kek_intents(kms_store *st, int64_t older_than, kms_kek_intent **list,
                                    size_t *count)
{
    if (st == NULL || list == NULL || count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    *list = NULL;
    *count = 0;
    return st->ops->kek_intents(st, older_than, list, count);
}

p11kms_status kms_store_kek_intent_remove(kms_store *st,
                                          const unsigned char token_id[KMS_TOKEN_ID_LEN])
{
    if (st == NULL || token_id == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    return st->ops->kek_intent_remove(st, token_id);
}

/* ---- key rotation ---- */

p11kms_status kms_store_version_add(kms_store *st, const char *name, uint32_t expected_latest,
                                    const unsigned char token_id[KMS_TOKEN_ID_LEN], int64_t now,
                                    uint32_t *added)
{
    if (st == NULL || name == NULL || token_id == NULL || added == NULL || expected_latest == 0 ||
        expected_latest == UINT32_MAX)
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(name))
        return P11KMS_ERR_KEY_NOT_FOUND;
    *added = 0;
    return st->ops->version_add(st, name, expected_latest, token_id, now, added);
}

p11kms_status kms_store_key_set_state(kms_store *st, const char *name, kms_key_state state)
{
    if (st == NULL || name == NULL || (state != KMS_KEY_ENABLED && state != KMS_KEY_DISABLED))
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(name))
        return P11KMS_ERR_KEY_NOT_FOUND;
    return st->ops->key_set_state(st, name, state);
}

p11kms_status kms_store_key_config(kms_store *st, const char *name, uint32_t min_decrypt_version,
                                   int64_t rotation_period)
{
    if (st == NULL || name == NULL || rotation_period < -1 ||
        (min_decrypt_version == 0 && rotation_period == -1))
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(name))
        return P11KMS_ERR_KEY_NOT_FOUND;
    return st->ops->key_config(st, name, min_decrypt_version, rotation_period);
}

p11kms_status kms_store_rewrap_read(kms_store *st, const char *name, uint32_t below_version,
                                    const char *cursor, size_t limit, kms_dek_rec ***out,
                                    size_t *count)
{
    if (st == NULL || name == NULL || out == NULL || count == NULL || limit == 0 ||
        limit > KMS_REWRAP_BATCH_MAX ||
        (cursor != NULL && strnlen(cursor, KMS_DEK_ID_LEN + 1) > KMS_DEK_ID_LEN))
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(name))
        return P11KMS_ERR_KEY_NOT_FOUND;
    return st->ops->rewrap_read(st, name, below_version, cursor != NULL ? cursor : "", limit, out,
                                count);
}

p11kms_status kms_store_rewrap_remaining(kms_store *st, const char *name, uint32_t below_version,
                                         uint64_t *count)
{
    if (st == NULL || name == NULL || count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(name))
        return P11KMS_ERR_KEY_NOT_FOUND;
    return st->ops->rewrap_remaining(st, name, below_version, count);
}

p11kms_status kms_store_rewrap_commit(kms_store *st, const char *name, uint32_t new_version,
                                      const kms_rewrap_item *items, size_t n, uint64_t *updated)
{
    if (st == NULL || name == NULL || updated == NULL || new_version == 0 ||
        (items == NULL && n > 0) || n > KMS_REWRAP_BATCH_MAX)
        return P11KMS_ERR_BAD_REQUEST;
    for (size_t i = 0; i < n; i++)
        if (!dek_id_ok(items[i].id) || items[i].old_version == 0 ||
            items[i].old_version >= new_version || items[i].wrapped_len == 0 ||
            items[i].wrapped_len > KMS_WRAPPED_MAX)
            return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(name))
        return P11KMS_ERR_KEY_NOT_FOUND;
    *updated = 0;
    if (n == 0)
        return P11KMS_OK;
    return st->ops->rewrap_commit(st, name, new_version, items, n, updated);
}

p11kms_status kms_store_version_retire(kms_store *st, const char *name, uint32_t version,
                                       int64_t now)
{
    if (st == NULL || name == NULL || now <= 0)
        return P11KMS_ERR_BAD_REQUEST;
    if (!name_ok(name) || version == 0)
        return P11KMS_ERR_KEY_NOT_FOUND;
    return st->ops->version_retire(st, name, version, now);
}

p11kms_status kms_store_rotation_due(kms_store *st, int64_t now, kms_rotation_due **out,
                                     size_t *count)
{
    if (st == NULL || out == NULL || count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    return st->ops->rotation_due(st, now, out, count);
}

void kms_store_stats_get(kms_store *st, kms_store_stats_ex *out)
{
    memset(out, 0, sizeof(*out));
    if (st != NULL)
        st->ops->stats(st, out);
}

void kms_store_stats(kms_store *st, uint64_t *commits, uint64_t *writes)
{
    kms_store_stats_ex s;

    kms_store_stats_get(st, &s);
    if (commits != NULL)
        *commits = s.commits;
    if (writes != NULL)
        *writes = s.writes;
}

void kms_key_rec_free(kms_key_rec *k)
{
    if (k == NULL)
        return;
    free(k->versions);
    free(k);
}

void kms_key_list_free(kms_key_rec **keys, size_t count)
{
    if (keys == NULL)
        return;
    for (size_t i = 0; i < count; i++)
        kms_key_rec_free(keys[i]);
    free(keys);
}

void kms_dek_rec_free(kms_dek_rec *d)
{
    if (d == NULL)
        return;
    free(d->context);
    free(d);
}

void kms_dek_list_free(kms_dek_rec **deks, size_t count)
{
    if (deks == NULL)
        return;
    for (size_t i = 0; i < count; i++)
        kms_dek_rec_free(deks[i]);
    free(deks);
}

p11kms_status kms_key_rec_add_version(kms_key_rec *k, const kms_version_rec *v)
{
    kms_version_rec *grown;

    grown = realloc(k->versions, (k->n_versions + 1) * sizeof(*grown));
    if (grown == NULL)
        return P11KMS_ERR_NO_MEMORY;
    k->versions = grown;
    k->versions[k->n_versions++] = *v;
    return P11KMS_OK;
}

static const char *const key_state_names[] = {"enabled", "disabled"};
static const char *const version_state_names[] = {"active", "destroyed"};
static const char *const dek_state_names[] = {"active", "revoked", "destroyed"};
/* Indexed by kms_revoke_reason; [KMS_REVOKE_NONE] is not a name. */
static const char *const revoke_reason_names[] = {NULL, "compromised", "superseded", "cessation",
                                                  "unspecified"};

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

static int parse_name(const char *const *names, size_t n, const char *s)
{
    if (s == NULL)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (names[i] != NULL && strcmp(names[i], s) == 0)
            return (int)i;
    return -1;
}

const char *kms_key_state_name(kms_key_state s)
{
    return (size_t)s < N_OF(key_state_names) ? key_state_names[s] : "unknown";
}

const char *kms_version_state_name(kms_version_state s)
{
    return (size_t)s < N_OF(version_state_names) ? version_state_names[s] : "unknown";
}

const char *kms_dek_state_name(kms_dek_state s)
{
    return (size_t)s < N_OF(dek_state_names) ? dek_state_names[s] : "unknown";
}

int kms_key_state_parse(const char *s)
{
    return parse_name(key_state_names, N_OF(key_state_names), s);
}

int kms_version_state_parse(const char *s)
{
    return parse_name(version_state_names, N_OF(version_state_names), s);
}

int kms_dek_state_parse(const char *s)
{
    return parse_name(dek_state_names, N_OF(dek_state_names), s);
}

const char *kms_revoke_reason_name(kms_revoke_reason r)
{
    return (size_t)r < N_OF(revoke_reason_names) ? revoke_reason_names[r] : NULL;
}

int kms_revoke_reason_parse(const char *s)
{
    return parse_name(revoke_reason_names, N_OF(revoke_reason_names), s);
}
