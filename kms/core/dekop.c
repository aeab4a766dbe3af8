/*
 * kms/core/dekop.c - generate and decrypt without sleeping through the
 * commit (kmsd's hot path; see kms_dek_op in core.h).
 *
 * The synchronous kms_dek_generate and kms_dek_decrypt hold their thread
 * until the group commit that makes the DEK row (or the decrypt's audit
 * entry) durable; at tens of thousands of requests a second that sleep
 * and wake-up per request was most of kmsd's CPU.  An op does the same
 * steps (deks.c's kms_dek_wrap_attempt / kms_dek_unwrap_checked), queues
 * the write with kms_store_*_async and returns; the store's writer thread
 * runs on_write() after the commit, which either finishes the op or queues
 * the next write (the audit entry of a failure, as kms_audit_settle does)
 * and then calls the caller's done().  The durability rule is unchanged:
 * kms_dek_op_result gives a plaintext only after its write committed.
 *
 * An op whose latest version is full before anything is wrapped runs the
 * synchronous kms_dek_generate on the calling thread (it may rotate); one
 * refused by the store's cap at commit (a concurrent issuer took the last
 * wrap) asks its caller to run it again synchronously (`rerun`): on_write
 * runs on the writer thread, which must not rotate.
 *
 * Every plaintext is wiped by kms_dek_op_free (and on error at once).
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "kms/core/core.h"
#include "kms/core/internal.h"
#include "module/log.h"

typedef enum { OP_WRITE, OP_SETTLE } op_phase;

struct kms_dek_op {
    kms_core *core;
    int generate;
    op_phase phase;
    char *canonical;
    kms_dek_rec dek; /* generate: the row being inserted */
    kms_audit_entry ae;
    kms_datakey result;
    p11kms_status rv;
    int rerun;
    kms_store_async *write;
    kms_dek_op_done_fn done;
    void *arg;
};

static void op_fail(kms_dek_op *op, p11kms_status rv);

/* op's audit entry could not be written (ws): logged, and an operation
 * that had succeeded fails closed, as kms_audit_settle does
 * (token_unavailable when the token could not seal the entry). */
static void entry_unwritten(kms_dek_op *op, p11kms_status ws)
{
    LOG_ERROR("core", "the audit entry of %s by %s could not be written (%s)%s",
              op->ae.operation, op->ae.principal, p11kms_status_code(ws),
              op->rv == P11KMS_OK ? ": the operation fails closed" : "");
    if (op->rv != P11KMS_OK)
        return;
    op->rv = ws == P11KMS_ERR_TOKEN_UNAVAILABLE ? ws : P11KMS_ERR_STORE_UNAVAILABLE;
    OPENSSL_cleanse(&op->result, sizeof(op->result));
}

static void on_write(void *arg)
{
    kms_dek_op *op = arg;
    int refused = 0;
    p11kms_status ws = kms_store_async_result(op->write, &refused);

    if (op->phase == OP_SETTLE) {
        if (ws != P11KMS_OK)
            entry_unwritten(op, ws);
    } else if (op->generate && ws == P11KMS_OK && refused) {
        op->rerun = 1; /* the cap filled meanwhile: nothing was written */
        OPENSSL_cleanse(&op->result, sizeof(op->result));
    } else if (op->generate && ws != P11KMS_OK) {
        op_fail(op, ws); /* the row and its entry were rolled back */
        return;
    } else if (ws != P11KMS_OK) {
        entry_unwritten(op, ws); /* a decrypt's entry did not commit */
    }
    op->done(op->arg);
}

/* The op failed with rv: record the failure (kms_audit_settle's entry,
 * queued) and finish once it is written, or at once if it cannot be. */
static void op_fail(kms_dek_op *op, p11kms_status rv)
{
    p11kms_status ws;

    op->rv = rv;
    OPENSSL_cleanse(&op->result, sizeof(op->result));
    op->phase = OP_SETTLE;
    kms_audit_settle_prepare(&op->ae, rv);
    ws = kms_store_audit_append_async(kms_core_store(op->core), &op->ae, 1, op->write, on_write,
                                      op);
    if (ws != P11KMS_OK) {
        entry_unwritten(op, ws);
        op->done(op->arg);
    }
}

static p11kms_status op_new(kms_core *core, int generate, kms_dek_op_done_fn done, void *arg,
                            kms_dek_op **out)
{
    kms_dek_op *op;

    if (core == NULL || done == NULL || out == NULL)
        return P11KMS_ERR_BAD_REQUEST;
    op = calloc(1, sizeof(*op));
    if (op == NULL)
        return P11KMS_ERR_NO_MEMORY;
    op->write = kms_store_async_new();
    if (op->write == NULL) {
        free(op);
        return P11KMS_ERR_NO_MEMORY;
    }
    op->core = core;
    op->generate = generate;
    op->done = done;
    op->arg = arg;
    *out = op;
    return P11KMS_OK;
}

/* Everything of generate that may block runs here, on the caller's
 * thread; only the commit is waited for elsewhere. */
static void generate_begin(kms_dek_op *op, const char *key, const json_t *context)
{
    p11kms_status rv;
    uint32_t full = 0;

    if (!kms_key_name_valid(key)) {
        op_fail(op, P11KMS_ERR_BAD_REQUEST);
        return;
    }
    if ((rv = kms_context_canonical(context, &op->canonical)) != P11KMS_OK ||
        (rv = kms_uuid_new(op->dek.id)) != P11KMS_OK ||
        (rv = kms_dek_wrap_attempt(op->core, key, op->canonical, &op->dek, op->result.plaintext,
                                   &full)) != P11KMS_OK) {
        op_fail(op, rv);
        return;
    }
    if (full != 0) {
        /* Rotation ahead: the synchronous path, here (it audits itself). */
        op->rv = kms_dek_generate(op->core, key, context, &op->result);
        op->done(op->arg);
        return;
    }
    op->ae.version = op->dek.version;
    memcpy(op->ae.dek_id, op->dek.id, sizeof(op->ae.dek_id));
    memcpy(op->result.id, op->dek.id, sizeof(op->result.id));
    snprintf(op->result.key, sizeof(op->result.key), "%s", key);
    op->result.version = op->dek.version;
    op->rv = P11KMS_OK;
    op->phase = OP_WRITE;
    /* The entry commits with the row (not when the cap refuses it). */
    rv = kms_store_dek_insert_async(kms_core_store(op->core), &op->dek, kms_core_max_wraps(op->core),
                                    &op->ae, 1, op->write, on_write, op);
    if (rv != P11KMS_OK)
        op_fail(op, rv);
}

p11kms_status kms_dek_generate_start(kms_core *core, const char *key, const json_t *context,
                                     kms_dek_op_done_fn done, void *arg, kms_dek_op **out)
{
    kms_dek_op *op = NULL;
    p11kms_status rv = op_new(core, 1, done, arg, &op);

    if (rv != P11KMS_OK)
        return rv;
    kms_audit_entry_init(&op->ae, "datakey.generate", kms_key_name_valid(key) ? key : NULL, 0,
                         NULL);
    *out = op; /* before done() can run */
    generate_begin(op, key, context);
    return P11KMS_OK;
}

static void decrypt_begin(kms_dek_op *op, const char *dek_id, const kms_dek_rec *known,
                          const json_t *context)
{
    p11kms_status rv;

    if (!kms_dek_id_valid(dek_id)) {
        op_fail(op, P11KMS_ERR_DEK_NOT_FOUND);
        return;
    }
    if ((rv = kms_context_canonical(context, &op->canonical)) != P11KMS_OK ||
        (rv = kms_dek_unwrap_checked(op->core, dek_id, known, op->canonical, &op->ae,
                                     &op->result)) != P11KMS_OK) {
        op_fail(op, rv);
        return;
    }
    /* Fail closed: the plaintext is handed out only once this entry is
     * durable. */
    op->rv = P11KMS_OK;
    op->phase = OP_WRITE;
    kms_audit_settle_prepare(&op->ae, P11KMS_OK);
    rv = kms_store_audit_append_async(kms_core_store(op->core), &op->ae, 1, op->write, on_write,
                                      op);
    if (rv != P11KMS_OK) {
        entry_unwritten(op, rv);
        op->done(op->arg);
    }
}

p11kms_status kms_dek_decrypt_start(kms_core *core, const char *dek_id, const kms_dek_rec *known,
                                    const json_t *context, kms_dek_op_done_fn done, void *arg,
                                    kms_dek_op **out)
{
    kms_dek_op *op = NULL;
    p11kms_status rv = op_new(core, 0, done, arg, &op);

    if (rv != P11KMS_OK)
        return rv;
    kms_audit_entry_init(&op->ae, "datakey.decrypt", NULL, 0,
                         kms_dek_id_valid(dek_id) ? dek_id : NULL);
    *out = op; /* before done() can run */
    decrypt_begin(op, dek_id, known, context);
    return P11KMS_OK;
}

p11kms_status kms_dek_op_result(const kms_dek_op *op, kms_datakey *out, int *rerun)
{
    *rerun = op->rerun;
    if (op->rerun)
        return P11KMS_OK;
    if (op->rv == P11KMS_OK)
        *out = op->result;
    return op->rv;
}

void kms_dek_op_free(kms_dek_op *op)
{
    if (op == NULL)
        return;
    OPENSSL_cleanse(&op->result, sizeof(op->result));
    OPENSSL_cleanse(op->dek.wrapped, sizeof(op->dek.wrapped));
    free(op->canonical);
    kms_store_async_free(op->write);
    free(op);
}
