/*
 * examples/customer-records.c - envelope encryption of customer records
 * with libp11kms, and erasure by crypto-shredding.
 *
 * Records live encrypted in a SQLite table.  Each customer has one data
 * key (DEK) from kmsd, bound to the context {"customer": ID}; the table
 * keeps only its dek_id.  Each record is one sealed value (p11kms_seal)
 * whose associated data binds it to its customer, so a record copied to
 * another customer's rows does not open.  Erasing a customer destroys
 * their DEK in kmsd: every record of theirs -- here, in backups, in
 * replicas -- becomes unrecoverable at once.
 *
 *   customer-records [--target T] [--db FILE] [--key NAME] put CUSTOMER TEXT
 *   customer-records ... get CUSTOMER
 *   customer-records ... erase CUSTOMER
 *   customer-records ... demo
 *
 * T is "unix:/path/kmsd.sock" or "https://host:port" (default
 * unix:$P11KMS_STATE_DIR/kmsd.sock, else unix:var/kmsd.sock).  The key
 * (default "customers") must exist: kmsctl key create customers.
 *
 * Build out of tree:
 *   cc customer-records.c $(pkg-config --cflags --libs p11kms sqlite3)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sqlite3.h>

#include <p11kms/client.h>

typedef struct app {
    p11kms_client *kms;
    sqlite3 *db;
    const char *key;
} app;

static int fail_kms(const app *a, const char *what, p11kms_status s)
{
    const char *detail = a->kms != NULL ? p11kms_client_error(a->kms) : "";

    fprintf(stderr, "customer-records: %s: %s: %s\n", what, p11kms_status_code(s),
            detail[0] ? detail : p11kms_strerror(s));
    return 1;
}

static int fail_db(const app *a, const char *what)
{
    fprintf(stderr, "customer-records: %s: %s\n", what, sqlite3_errmsg(a->db));
    return 1;
}

/* The AAD of a customer's records: binds each record to its owner. */
static void record_aad(const char *customer, char *out, size_t len)
{
    snprintf(out, len, "customer-records/v1 customer=%s", customer);
}

/* The customer's dek_id (malloc'ed) or NULL when they have none yet. */
static char *customer_dek(const app *a, const char *customer)
{
    sqlite3_stmt *st = NULL;
    char *id = NULL;

    if (sqlite3_prepare_v2(a->db, "SELECT dek_id FROM customer_keys WHERE customer = ?", -1, &st,
                           NULL) != SQLITE_OK)
        return NULL;
    sqlite3_bind_text(st, 1, customer, -1, SQLITE_STATIC);
    if (sqlite3_step(st) == SQLITE_ROW)
        id = strdup((const char *)sqlite3_column_text(st, 0));
    sqlite3_finalize(st);
    return id;
}

/* Get the customer's data key: decrypt the existing one, or generate one. */
static int customer_key(const app *a, const char *customer, p11kms_data_key **out)
{
    p11kms_context *ctx = p11kms_context_new();
    p11kms_status s;
    sqlite3_stmt *st = NULL;
    char *dek_id = NULL;
    int rv = 1;

    if (ctx == NULL || (s = p11kms_context_set(ctx, "customer", customer)) != P11KMS_OK) {
        fprintf(stderr, "customer-records: bad customer id\n");
        goto out;
    }
    if ((dek_id = customer_dek(a, customer)) != NULL) {
        if ((s = p11kms_decrypt_data_key(a->kms, dek_id, ctx, out)) != P11KMS_OK) {
            rv = fail_kms(a, "decrypt data key", s);
            goto out;
        }
    } else {
        if ((s = p11kms_generate_data_key(a->kms, a->key, ctx, out)) != P11KMS_OK) {
            rv = fail_kms(a, "generate data key", s);
            goto out;
        }
        if (sqlite3_prepare_v2(a->db, "INSERT INTO customer_keys (customer, dek_id) VALUES (?, ?)",
                               -1, &st, NULL) != SQLITE_OK) {
            rv = fail_db(a, "insert");
            goto out;
        }
        sqlite3_bind_text(st, 1, customer, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 2, p11kms_data_key_id(*out), -1, SQLITE_STATIC);
        if (sqlite3_step(st) != SQLITE_DONE) {
            rv = fail_db(a, "insert");
            p11kms_data_key_free(*out);
            *out = NULL;
            goto out;
        }
    }
    rv = 0;
out:
    sqlite3_finalize(st);
    free(dek_id);
    p11kms_context_free(ctx);
    return rv;
}

static int cmd_put(const app *a, const char *customer, const char *text)
{
    p11kms_data_key *k = NULL;
    unsigned char *sealed = NULL;
    size_t sealed_len = 0;
    sqlite3_stmt *st = NULL;
    char aad[256];
    p11kms_status s;
    int rv = 1;

    if (customer_key(a, customer, &k) != 0)
        goto out;
    record_aad(customer, aad, sizeof(aad));
    if ((s = p11kms_seal(k, (const unsigned char *)aad, strlen(aad), (const unsigned char *)text,
                         strlen(text), &sealed, &sealed_len)) != P11KMS_OK) {
        rv = fail_kms(a, "seal", s);
        goto out;
    }
    if (sqlite3_prepare_v2(a->db, "INSERT INTO records (customer, sealed) VALUES (?, ?)", -1, &st,
                           NULL) != SQLITE_OK) {
        rv = fail_db(a, "insert");
        goto out;
    }
    sqlite3_bind_text(st, 1, customer, -1, SQLITE_STATIC);
    sqlite3_bind_blob(st, 2, sealed, (int)sealed_len, SQLITE_STATIC);
    if (sqlite3_step(st) != SQLITE_DONE) {
        rv = fail_db(a, "insert");
        goto out;
    }
    printf("stored a record of customer %s (%zu bytes sealed under DEK %s)\n", customer, sealed_len,
           p11kms_data_key_id(k));
    rv = 0;
out:
    sqlite3_finalize(st);
    free(sealed);
    p11kms_data_key_free(k);
    return rv;
}

static int cmd_get(const app *a, const char *customer)
{
    p11kms_context *ctx = p11kms_context_new();
    p11kms_data_key *k = NULL;
    sqlite3_stmt *st = NULL;
    char aad[256], need[P11KMS_DEK_ID_LEN + 1];
    p11kms_status s;
    int rv = 1, n = 0;

    if (ctx == NULL || p11kms_context_set(ctx, "customer", customer) != P11KMS_OK)
        goto out;
    record_aad(customer, aad, sizeof(aad));
    if (sqlite3_prepare_v2(a->db, "SELECT sealed FROM records WHERE customer = ? ORDER BY id", -1,
                           &st, NULL) != SQLITE_OK) {
        rv = fail_db(a, "select");
        goto out;
    }
    sqlite3_bind_text(st, 1, customer, -1, SQLITE_STATIC);
    while (sqlite3_step(st) == SQLITE_ROW) {
        const unsigned char *sealed = sqlite3_column_blob(st, 0);
        size_t sealed_len = (size_t)sqlite3_column_bytes(st, 0);
        unsigned char *plain = NULL;
        size_t plain_len = 0;

        /* The record says which DEK it needs. */
        if ((s = p11kms_sealed_dek_id(sealed, sealed_len, need)) != P11KMS_OK) {
            rv = fail_kms(a, "not a sealed record", s);
            goto out;
        }
        if (k == NULL || strcmp(p11kms_data_key_id(k), need) != 0) {
            p11kms_data_key_free(k);
            k = NULL;
            if ((s = p11kms_decrypt_data_key(a->kms, need, ctx, &k)) != P11KMS_OK) {
                if (s == P11KMS_ERR_DEK_DESTROYED)
                    fprintf(stderr,
                            "customer-records: customer %s was erased: their records are "
                            "unrecoverable (dek_destroyed)\n",
                            customer);
                else
                    fail_kms(a, "decrypt data key", s);
                goto out;
            }
        }
        if ((s = p11kms_open(k, (const unsigned char *)aad, strlen(aad), sealed, sealed_len, &plain,
                             &plain_len)) != P11KMS_OK) {
            rv = fail_kms(a, "open record", s);
            goto out;
        }
        printf("customer %s: %s\n", customer, (const char *)plain);
        p11kms_buffer_free(plain, plain_len);
        n++;
    }
    if (n == 0)
        printf("customer %s: no records\n", customer);
    rv = 0;
out:
    sqlite3_finalize(st);
    p11kms_data_key_free(k);
    p11kms_context_free(ctx);
    return rv;
}

static int cmd_erase(const app *a, const char *customer)
{
    char *dek_id = customer_dek(a, customer);
    p11kms_status s;
    int rv = 1;

    if (dek_id == NULL) {
        fprintf(stderr, "customer-records: customer %s has no data key\n", customer);
        goto out;
    }
    if ((s = p11kms_destroy_data_key(a->kms, dek_id)) != P11KMS_OK) {
        rv = fail_kms(a, "destroy data key", s);
        goto out;
    }
    /* The sealed rows stay (as they would in backups): they no longer open. */
    printf("erased customer %s: DEK %s destroyed; their records are unrecoverable\n", customer,
           dek_id);
    rv = 0;
out:
    free(dek_id);
    return rv;
}

static int cmd_demo(const app *a)
{
    int rv = 0;

    printf("-- two customers, one data key each\n");
    rv |= cmd_put(a, "42", "Ada Lovelace <ada@example.com>, 12 Analytical Row");
    rv |= cmd_put(a, "42", "order 1843: one difference engine");
    rv |= cmd_put(a, "43", "Charles Babbage <charles@example.com>");
    if (rv != 0)
        return 1;
    printf("-- read them back\n");
    rv |= cmd_get(a, "42");
    rv |= cmd_get(a, "43");
    if (rv != 0)
        return 1;
    printf("-- erase customer 42 (right to erasure)\n");
    if (cmd_erase(a, "42") != 0)
        return 1;
    printf("-- customer 42's records no longer open; 43's still do\n");
    if (cmd_get(a, "42") == 0) {
        fprintf(stderr, "customer-records: customer 42's records still open after erasure\n");
        return 1;
    }
    return cmd_get(a, "43");
}

static int usage(void)
{
    fprintf(stderr, "usage: customer-records [--target T] [--db FILE] [--key NAME] "
                    "put CUSTOMER TEXT | get CUSTOMER | erase CUSTOMER | demo\n");
    return 2;
}

int main(int argc, char **argv)
{
    app a = {NULL, NULL, "customers"};
    const char *target = NULL, *db = "customer-records.db", *state = getenv("P11KMS_STATE_DIR");
    char target_buf[4096];
    p11kms_status s;
    int i, rv = 1;

    for (i = 1; i + 1 < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        if (strcmp(argv[i], "--target") == 0)
            target = argv[i + 1];
        else if (strcmp(argv[i], "--db") == 0)
            db = argv[i + 1];
        else if (strcmp(argv[i], "--key") == 0)
            a.key = argv[i + 1];
        else
            return usage();
    }
    if (i >= argc)
        return usage();
    if (target == NULL) {
        snprintf(target_buf, sizeof(target_buf), "unix:%s/kmsd.sock",
                 state != NULL && state[0] ? state : "var");
        target = target_buf;
    }
    if ((s = p11kms_client_open(target, &a.kms)) != P11KMS_OK) {
        fprintf(stderr, "customer-records: cannot use target '%s': %s\n", target,
                p11kms_strerror(s));
        return 1;
    }
    if (sqlite3_open(db, &a.db) != SQLITE_OK ||
        sqlite3_exec(a.db,
                     "CREATE TABLE IF NOT EXISTS customer_keys ("
                     "  customer TEXT PRIMARY KEY, dek_id TEXT NOT NULL);"
                     "CREATE TABLE IF NOT EXISTS records ("
                     "  id INTEGER PRIMARY KEY, customer TEXT NOT NULL, sealed BLOB NOT NULL);",
                     NULL, NULL, NULL) != SQLITE_OK) {
        rv = fail_db(&a, db);
        goto out;
    }
    if (strcmp(argv[i], "put") == 0 && argc - i == 3)
        rv = cmd_put(&a, argv[i + 1], argv[i + 2]);
    else if (strcmp(argv[i], "get") == 0 && argc - i == 2)
        rv = cmd_get(&a, argv[i + 1]);
    else if (strcmp(argv[i], "erase") == 0 && argc - i == 2)
        rv = cmd_erase(&a, argv[i + 1]);
    else if (strcmp(argv[i], "demo") == 0 && argc - i == 1)
        rv = cmd_demo(&a);
    else
        rv = usage();
out:
    sqlite3_close(a.db);
    p11kms_client_close(a.kms);
    return rv;
}
