/*
 * kms/server/authz.h - the authorization seam of kmsd: every decision
 * whether a principal may run a call, allowed or refused, goes through
 * kms_authz_decide (which is where the audit entry of the decision will
 * be appended; see issue 5).
 *
 * Runs on worker threads: a call addressed by DEK id needs a store lookup
 * to learn its key.  Stateless; the policy is the request's own reference
 * (a SIGHUP in between does not change it).
 */
#ifndef P11KMS_KMS_SERVER_AUTHZ_H
#define P11KMS_KMS_SERVER_AUTHZ_H

#include "kms/core/core.h"
#include "kms/policy/policy.h"
#include "kms/server/routes.h"
#include "p11kms/status.h"

/* One authorization question. */
typedef struct kms_authz_request {
    kms_core *core; /* where a refusal is audited; NULL: not audited */
    const kms_principal *who;
    const char *operation; /* the call's name, "datakey.decrypt" */
    int op;                /* kms_policy_op */
    const char *key;       /* the key the call touches; NULL: none (see below) */
    const char *dek_id;    /* DEK-addressed calls: the DEK id, else NULL */
    int dek_unknown;       /* the DEK does not exist: the question becomes
                              "does who hold op on any key pattern?" */
} kms_authz_request;

/* Decide and log.  key NULL (and not dek_unknown) is a route tied to no
 * key: it needs op on the key pattern "*" exactly.  P11KMS_OK or
 * P11KMS_ERR_FORBIDDEN.  A refusal appends its audit entry (result
 * "refused", error_code "forbidden") before this returns; an allowed
 * call's entry is written by the core operation it runs. */
p11kms_status kms_authz_decide(const kms_policy *pol, const kms_authz_request *req);

/* Authorize `call` for `who`: open routes pass; a DEK-addressed call has
 * its DEK looked up in the store and is decided on the DEK's key.
 * Returns 1 when the call may run, 0 when reply holds the answer
 * (403 forbidden, or the lookup's 5xx).  dek (may be NULL) receives the
 * record read for an allowed DEK-addressed call (NULL otherwise), so the
 * call need not read it again; free it with kms_dek_rec_free. */
int kms_authz_call(kms_core *core, const kms_policy *pol, const kms_principal *who,
                   const kms_call *call, kms_reply *reply, kms_dek_rec **dek_out);

#endif
