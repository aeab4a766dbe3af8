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
    return st->ops->dek_insert(st, dek);
}

p11kms_status kms_store_dek_get(kms_store *st, const char *id, kms_dek_rec **out)
{
    if (st == NULL || id == NULL || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    if (!dek_id_ok(id))
        return P11KMS_ERR_DEK_NOT_FOUND;
    return st->ops->dek_get(st, id, out);
}

p11kms_status kms_store_token_ids(kms_store *st, unsigned char (**ids)[KMS_TOKEN_ID_LEN],
                                  size_t *count)
{
    if (st == NULL || ids == NULL || count == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    return st->ops->token_ids(st, ids, count);
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

#define N_OF(a) (sizeof(a) / sizeof((a)[0]))

static int parse_name(const char *const *names, size_t n, const char *s)
{
    if (s == NULL)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (strcmp(names[i], s) == 0)
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
