/*
 * module/stats.c - counters of the C_* calls for /metrics: per function a
 * call count, a latency sum and a latency histogram; failures by CK_RV.
 *
 * Every C_* call goes through P11_CALL, which notes the start time in a
 * thread-local variable and then calls p11_call_check (rv.c), which calls
 * p11_stats_count.  The counters live in ctx->stats and are relaxed
 * atomics: the call path takes no lock and costs two clock reads and
 * three or four atomic additions.  Failures are counted in a small table
 * of CK_RVs filled lock-free (compare-and-swap on a free slot); CK_RVs
 * beyond its size are counted together.
 *
 * Locking: none (atomics only).
 */
#include <string.h>

#include "internal.h"

_Thread_local uint64_t p11_call_t0;

const uint64_t p11_stats_bounds_us[P11_STATS_BUCKETS] = {10,  25,   50,   100,  250,
                                                         500, 1000, 2500, 5000, 10000};

#define FN(name) [P11_FN_INDEX(name)] = #name
static const char *const fn_names[P11_FN_SLOTS] = {
    FN(C_Initialize),
    FN(C_Finalize),
    FN(C_GetInfo),
    FN(C_GetFunctionList),
    FN(C_GetSlotList),
    FN(C_GetSlotInfo),
    FN(C_GetTokenInfo),
    FN(C_GetMechanismList),
    FN(C_GetMechanismInfo),
    FN(C_InitToken),
    FN(C_InitPIN),
    FN(C_SetPIN),
    FN(C_OpenSession),
    FN(C_CloseSession),
    FN(C_CloseAllSessions),
    FN(C_GetSessionInfo),
    FN(C_GetOperationState),
    FN(C_SetOperationState),
    FN(C_Login),
    FN(C_Logout),
    FN(C_CreateObject),
    FN(C_CopyObject),
    FN(C_DestroyObject),
    FN(C_GetObjectSize),
    FN(C_GetAttributeValue),
    FN(C_SetAttributeValue),
    FN(C_FindObjectsInit),
    FN(C_FindObjects),
    FN(C_FindObjectsFinal),
    FN(C_EncryptInit),
    FN(C_Encrypt),
    FN(C_EncryptUpdate),
    FN(C_EncryptFinal),
    FN(C_DecryptInit),
    FN(C_Decrypt),
    FN(C_DecryptUpdate),
    FN(C_DecryptFinal),
    FN(C_DigestInit),
    FN(C_Digest),
    FN(C_DigestUpdate),
    FN(C_DigestKey),
    FN(C_DigestFinal),
    FN(C_SignInit),
    FN(C_Sign),
    FN(C_SignUpdate),
    FN(C_SignFinal),
    FN(C_SignRecoverInit),
    FN(C_SignRecover),
    FN(C_VerifyInit),
    FN(C_Verify),
    FN(C_VerifyUpdate),
    FN(C_VerifyFinal),
    FN(C_VerifyRecoverInit),
    FN(C_VerifyRecover),
    FN(C_DigestEncryptUpdate),
    FN(C_DecryptDigestUpdate),
    FN(C_SignEncryptUpdate),
    FN(C_DecryptVerifyUpdate),
    FN(C_GenerateKey),
    FN(C_GenerateKeyPair),
    FN(C_WrapKey),
    FN(C_UnwrapKey),
    FN(C_DeriveKey),
    FN(C_SeedRandom),
    FN(C_GenerateRandom),
    FN(C_GetFunctionStatus),
    FN(C_CancelFunction),
    FN(C_WaitForSlotEvent),
};
#undef FN

static void count_error(p11_call_stats *st, CK_RV rv)
{
    for (size_t i = 0; i < P11_STATS_MAX_ERRORS; i++) {
        CK_RV have = atomic_load_explicit(&st->err_rv[i], memory_order_acquire);

        if (have == CKR_OK) {
            CK_RV expected = CKR_OK;
            if (atomic_compare_exchange_strong(&st->err_rv[i], &expected, rv) || expected == rv) {
                atomic_fetch_add_explicit(&st->err_count[i], 1, memory_order_relaxed);
                return;
            }
            continue; /* another CK_RV took the slot */
        }
        if (have == rv) {
            atomic_fetch_add_explicit(&st->err_count[i], 1, memory_order_relaxed);
            return;
        }
    }
    atomic_fetch_add_explicit(&st->err_other, 1, memory_order_relaxed);
}

void p11_stats_count(p11_ctx *ctx, size_t fn_index, CK_RV rv)
{
    p11_call_stats *st = &ctx->stats;
    uint64_t now = p11_now_ns();
    uint64_t us, ns = now > p11_call_t0 ? now - p11_call_t0 : 0;
    size_t b = 0;

    if (fn_index >= P11_FN_SLOTS)
        return;
    us = ns / 1000u;
    while (b < P11_STATS_BUCKETS && us > p11_stats_bounds_us[b])
        b++;
    atomic_fetch_add_explicit(&st->calls[fn_index], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&st->sum_ns[fn_index], ns, memory_order_relaxed);
    if (b < P11_STATS_BUCKETS)
        atomic_fetch_add_explicit(&st->bucket[fn_index][b], 1, memory_order_relaxed);
    if (rv != CKR_OK)
        count_error(st, rv);
}

void p11_stats_get(p11_ctx *ctx, p11_stats *out)
{
    p11_call_stats *st;

    memset(out, 0, sizeof(*out));
    if (ctx == NULL)
        return;
    st = &ctx->stats;
    for (size_t i = 0; i < P11_FN_SLOTS && out->n_fns < P11_STATS_MAX_FNS; i++) {
        uint64_t calls = atomic_load_explicit(&st->calls[i], memory_order_relaxed);
        p11_fn_stats *f;
        uint64_t acc = 0;

        if (calls == 0 || fn_names[i] == NULL)
            continue;
        f = &out->fns[out->n_fns++];
        f->fn = fn_names[i];
        f->calls = calls;
        f->sum_us = atomic_load_explicit(&st->sum_ns[i], memory_order_relaxed) / 1000u;
        for (size_t b = 0; b < P11_STATS_BUCKETS; b++) {
            acc += atomic_load_explicit(&st->bucket[i][b], memory_order_relaxed);
            f->bucket[b] = acc < calls ? acc : calls;
        }
    }
    for (size_t i = 0; i < P11_STATS_MAX_ERRORS; i++) {
        CK_RV rv = atomic_load_explicit(&st->err_rv[i], memory_order_acquire);

        if (rv == CKR_OK)
            continue;
        out->errors[out->n_errors].rv = rv;
        out->errors[out->n_errors].count =
            atomic_load_explicit(&st->err_count[i], memory_order_relaxed);
        out->n_errors++;
    }
    out->errors_other = atomic_load_explicit(&st->err_other, memory_order_relaxed);
}
