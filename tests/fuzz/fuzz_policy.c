/*
 * tests/fuzz/fuzz_policy.c - libFuzzer target for the policy parser
 * (kms_policy_parse: a buffer, no I/O) and the decisions of a parsed
 * policy.
 *
 * Invariants: a refusal leaves *out untouched and has a message starting
 * with the source name; an accepted policy answers kms_policy_allows and
 * kms_policy_token for a few principals without crashing, and anything
 * it grants on a key is also granted by kms_policy_allows_any; no crash,
 * leak or undefined behaviour.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fuzz_util.h"
#include "kms/policy/policy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void principal(kms_principal *p, const char *name, int unix_peer, uid_t uid, gid_t gid)
{
    memset(p, 0, sizeof(*p));
    snprintf(p->name, sizeof(p->name), "%s", name);
    p->unix_peer = unix_peer;
    p->uid = uid;
    if (unix_peer) {
        p->gids[p->n_gids++] = gid;
        p->gids[p->n_gids++] = 27;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const keys[] = {"k1", "app-1.data", "a", "payments-eu", NULL};
    static const kms_policy_op ops[] = {KMS_OP_GENERATE, KMS_OP_DECRYPT, KMS_OP_ADMIN};
    char err[KMS_POLICY_ERR_MAX];
    kms_policy *pol = (kms_policy *)(uintptr_t)1; /* must stay untouched on failure */
    kms_principal who[4], tok;
    p11kms_status s;

    err[0] = '\0';
    s = kms_policy_parse((const char *)data, size, "fuzz.policy", &pol, err, sizeof(err));
    if (s != P11KMS_OK) {
        FUZZ_ASSERT(pol == (kms_policy *)(uintptr_t)1);
        FUZZ_ASSERT(s == P11KMS_ERR_BAD_REQUEST || s == P11KMS_ERR_NO_MEMORY);
        FUZZ_ASSERT(strncmp(err, "fuzz.policy", 11) == 0);
        return 0;
    }
    FUZZ_ASSERT(pol != NULL);
    principal(&who[0], "uid:1000", 1, 1000, 1000);
    principal(&who[1], "uid:0", 1, 0, 0);
    principal(&who[2], "cert:app-1", 0, 0, 0);
    principal(&who[3], "token:ci", 0, 0, 0);
    for (size_t w = 0; w < 4; w++)
        for (size_t o = 0; o < 3; o++) {
            int any = kms_policy_allows_any(pol, &who[w], ops[o]);
            for (size_t k = 0; k < 5; k++)
                if (kms_policy_allows(pol, &who[w], ops[o], keys[k]))
                    FUZZ_ASSERT(any);
            (void)kms_policy_op_name(ops[o]);
        }
    memset(&tok, 0, sizeof(tok));
    if (kms_policy_token(pol, (const char *)data, size < 64 ? size : 64, &tok))
        FUZZ_ASSERT(strncmp(tok.name, "token:", 6) == 0 && !tok.unix_peer);
    (void)kms_policy_rule_count(pol);
    (void)kms_policy_token_count(pol);
    FUZZ_ASSERT(kms_policy_ref(pol) == pol);
    kms_policy_unref(pol);
    kms_policy_unref(pol);
    return 0;
}
