/*
 * kms/server/authz.c - the authorization seam of kmsd (see authz.h).
 *
 * Existence of DEKs: a DEK-addressed request for an id that does not
 * exist is answered 404 dek_not_found only to a principal holding the
 * request's operation on at least one key pattern; anybody else gets the
 * same 403 forbidden as for an existing DEK of a key they may not touch.
 * So a principal with no right at all learns nothing, and one with some
 * right can tell "exists under another key" from "does not exist" only
 * for ids it already knows (DEK ids are random 122-bit UUIDs: they cannot
 * be enumerated).  The 403 never names the DEK's key.
 */
#include "kms/server/authz.h"

#include <stdio.h>

#include "module/log.h"

p11kms_status kms_authz_decide(const kms_policy *pol, const kms_authz_request *req)
{
    int ok;

    if (req->dek_unknown)
        ok = kms_policy_allows_any(pol, req->who, (kms_policy_op)req->op);
    else
        ok = kms_policy_allows(pol, req->who, (kms_policy_op)req->op, req->key);
    /* An allowed call's entry is written by the core with its change; a
     * refusal's here (refused either way, even if the entry fails). */
    if (!ok) {
        LOG_INFO("authz", "refused: %s may not %s: %s key=%s dek=%s", req->who->name,
                 kms_policy_op_name((kms_policy_op)req->op), req->operation,
                 req->key != NULL ? req->key : (req->dek_id != NULL ? "?" : "(none)"),
                 req->dek_id != NULL ? req->dek_id : "-");
        if (req->core != NULL) {
            kms_core_actor_set(req->who->name);
            (void)kms_audit_record(req->core, req->operation, req->key, req->dek_id,
                                   P11KMS_ERR_FORBIDDEN);
        }
    }
    return ok ? P11KMS_OK : P11KMS_ERR_FORBIDDEN;
}

int kms_authz_call(kms_core *core, const kms_policy *pol, const kms_principal *who,
                   const kms_call *call, kms_reply *reply, kms_dek_rec **dek_out)
{
    kms_call_access acc;
    kms_authz_request req;
    kms_dek_rec *dek = NULL;
    p11kms_status s;
    const char *op_name;
    int allowed = 0;

    if (dek_out != NULL)
        *dek_out = NULL;
    kms_call_access_get(call, &acc);
    if (acc.op == 0)
        return 1;
    op_name = kms_policy_op_name((kms_policy_op)acc.op);
    req.core = core;
    req.who = who;
    req.operation = kms_call_name(call);
    req.op = acc.op;
    req.key = acc.key;
    req.dek_id = acc.dek_id;
    req.dek_unknown = 0;
    if (acc.dek_id != NULL) {
        /* The store, not kms_dek_show: this lookup is not an operation of
         * the caller's (and must not be audited as one). */
        s = kms_store_dek_get(kms_core_store(core), acc.dek_id, &dek);
        if (s == P11KMS_ERR_DEK_NOT_FOUND) {
            req.dek_unknown = 1; /* allowed: the call itself answers 404 */
        } else if (s != P11KMS_OK) {
            kms_reply_error(reply, s, "%s", p11kms_strerror(s));
            goto out;
        } else {
            req.key = dek->key;
        }
    }
    if (kms_authz_decide(pol, &req) == P11KMS_OK) {
        allowed = 1;
        if (dek_out != NULL) {
            *dek_out = dek;
            dek = NULL;
        }
    } else if (acc.dek_id != NULL) {
        kms_reply_error(reply, P11KMS_ERR_FORBIDDEN, "%s may not %s this data key", who->name,
                        op_name);
    } else if (acc.key != NULL) {
        kms_reply_error(reply, P11KMS_ERR_FORBIDDEN, "%s may not %s on key '%s'", who->name,
                        op_name, acc.key);
    } else {
        kms_reply_error(reply, P11KMS_ERR_FORBIDDEN,
                        "%s may not %s: this route needs %s on the key pattern \"*\"", who->name,
                        op_name, op_name);
    }
out:
    kms_dek_rec_free(dek);
    return allowed;
}
