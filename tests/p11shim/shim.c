/*
 * tests/p11shim/shim.c - libp11shim.so, a PKCS#11 2.40 module that forwards
 * every call to a real module and adds latency (and, on request, faults).
 *
 * The real module is named by P11SHIM_MODULE (a path, dlopen'ed with
 * RTLD_LOCAL).  C_GetFunctionList returns the shim's own CK_FUNCTION_LIST:
 * one forwarder per PKCS#11 2.40 function, generated from the table
 * SHIM_FUNCTIONS below, each of the form
 *
 *     shim_enter(fn)   -> count the call, sleep, maybe inject a fault
 *     real->C_xxx(...) -> the real module
 *
 * so a new kind of fault is one more branch in shim_enter (or a field in
 * shim_fn), never 68 edits.  The reliability work (issue 8) extends it with
 * hangs and a token that disappears; see README.md next to this file.
 *
 * Configuration (environment, read once when the module is loaded, i.e. at
 * the first C_GetFunctionList):
 *
 *   P11SHIM_MODULE      path of the real module (required)
 *   P11SHIM_DELAY_US    microseconds slept before every delayed call (0)
 *   P11SHIM_DELAY_FUNCS which calls are delayed: "token" (default: every
 *                       call that reaches a slot, token or session, i.e.
 *                       all but C_Initialize, C_Finalize, C_GetInfo,
 *                       C_GetFunctionList, C_GetSlotList, C_GetSlotInfo,
 *                       C_GetMechanismList, C_GetMechanismInfo,
 *                       C_WaitForSlotEvent, C_GetFunctionStatus and
 *                       C_CancelFunction), "all", or a comma-separated
 *                       list of names ("C_Encrypt,C_Decrypt")
 *   P11SHIM_FAIL_RV     the CK_RV injected: a CKR_* name or a number
 *                       (default CKR_DEVICE_ERROR), or a comma-separated
 *                       list of them, one picked at random per fault
 *   P11SHIM_FAIL_FUNCS  which calls may fail: "token" (default), "all", or
 *                       a list of names, as for P11SHIM_DELAY_FUNCS
 *   P11SHIM_FAIL_NTH    fail the Nth call (1-based, counted over the
 *                       selected functions together) ...
 *   P11SHIM_FAIL_COUNT  ... and the COUNT-1 selected calls after it
 *                       (default 1; 0 = every call from the Nth on)
 *   P11SHIM_FAIL_RATE   fail each selected call with this probability
 *                       (0.0 .. 1.0), independently of NTH
 *   P11SHIM_FAIL_FILE   when set, faults (NTH and RATE) are injected only
 *                       while this file exists, and NTH counts only the
 *                       calls made meanwhile: a running process is broken
 *                       and mended from outside
 *
 *   P11SHIM_TOKEN_FLAGS_SET   flags OR'ed into every C_GetTokenInfo reply:
 *                       "final_try", "locked", "count_low",
 *                       "to_be_changed" or a number, joined by '|' or ','
 *   P11SHIM_TOKEN_FLAGS_CLEAR the same, cleared from the reply
 *   P11SHIM_GONE_FILE   while this file exists the token is gone: every
 *                       token-class call fails with P11SHIM_GONE_RV
 *                       (default CKR_DEVICE_REMOVED) without being
 *                       forwarded, C_GetSlotList(CK_TRUE) lists no slot
 *                       and C_GetSlotInfo clears CKF_TOKEN_PRESENT;
 *                       removing the file brings the token back
 *   P11SHIM_HANG_MS     the selected calls hang this long before running
 *   P11SHIM_HANG_FUNCS  which calls hang: a list, "token" or "all"
 *                       (default: none; HANG_MS alone does nothing)
 *   P11SHIM_STATS_SNAPSHOT  a file rewritten with the counts so far (the
 *                       P11SHIM_STATS lines) after every C_Finalize
 *   P11SHIM_SESSIONS_FILE   a file rewritten with "sessions_open <n>" and
 *                       "sessions_max <n>" (sessions open in the real
 *                       module now, and the most at once) after every
 *                       C_OpenSession, C_CloseSession, C_CloseAllSessions
 *                       and C_Finalize that succeeds
 *   P11SHIM_HANG_FILE   when set, a call hangs only while this file
 *                       exists, and stops hanging as soon as it is removed
 *
 * A failed call is not forwarded (the real module never sees it), after
 * its delay has been slept.  P11SHIM_DEBUG=1 logs each injected fault on
 * stderr.  P11SHIM_STATS=FILE appends, when the shim is unloaded (or the
 * process exits), one line "C_xxx <calls>" per function called, for
 * counting token round-trips per request, then one line
 * "faults:C_xxx <n>" per function and "faults:CKR_xxx <n>" per CK_RV for
 * the faults injected (P11SHIM_FAIL_*; a gone token's refusals are not
 * counted).
 *
 * Thread safety: the configuration is immutable after load (pthread_once),
 * counters are atomics, and the delay is a nanosleep in the calling
 * thread, so delayed calls overlap exactly as far as the real module lets
 * them: the shim adds no lock of its own.
 *
 * Only C_GetFunctionList is exported (-fvisibility=hidden).
 */
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <p11-kit/pkcs11.h>

#define SHIM_EXPORT __attribute__((visibility("default")))

/* Delay/fault class of a function: M = module bookkeeping (no slot, token
 * or session round-trip), T = a token operation. */
#define SHIM_M 0
#define SHIM_T 1

/* clang-format off */
/* Every PKCS#11 2.40 function but C_GetFunctionList (answered by the shim
 * itself), in CK_FUNCTION_LIST order: name, class, parameters, arguments. */
#define SHIM_FUNCTIONS(X)                                                                      \
    X(C_Initialize, SHIM_M, (CK_VOID_PTR a), (a))                                              \
    X(C_Finalize, SHIM_M, (CK_VOID_PTR a), (a))                                                \
    X(C_GetInfo, SHIM_M, (CK_INFO_PTR a), (a))                                                 \
    X(C_GetSlotList, SHIM_M, (CK_BBOOL a, CK_SLOT_ID_PTR b, CK_ULONG_PTR c), (a, b, c))        \
    X(C_GetSlotInfo, SHIM_M, (CK_SLOT_ID a, CK_SLOT_INFO_PTR b), (a, b))                       \
    X(C_GetTokenInfo, SHIM_T, (CK_SLOT_ID a, CK_TOKEN_INFO_PTR b), (a, b))                     \
    X(C_GetMechanismList, SHIM_M, (CK_SLOT_ID a, CK_MECHANISM_TYPE_PTR b, CK_ULONG_PTR c),     \
      (a, b, c))                                                                               \
    X(C_GetMechanismInfo, SHIM_M, (CK_SLOT_ID a, CK_MECHANISM_TYPE b, CK_MECHANISM_INFO_PTR c), \
      (a, b, c))                                                                               \
    X(C_InitToken, SHIM_T, (CK_SLOT_ID a, CK_UTF8CHAR_PTR b, CK_ULONG c, CK_UTF8CHAR_PTR d),   \
      (a, b, c, d))                                                                            \
    X(C_InitPIN, SHIM_T, (CK_SESSION_HANDLE a, CK_UTF8CHAR_PTR b, CK_ULONG c), (a, b, c))      \
    X(C_SetPIN, SHIM_T,                                                                        \
      (CK_SESSION_HANDLE a, CK_UTF8CHAR_PTR b, CK_ULONG c, CK_UTF8CHAR_PTR d, CK_ULONG e),     \
      (a, b, c, d, e))                                                                         \
    X(C_OpenSession, SHIM_T,                                                                   \
      (CK_SLOT_ID a, CK_FLAGS b, CK_VOID_PTR c, CK_NOTIFY d, CK_SESSION_HANDLE_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_CloseSession, SHIM_T, (CK_SESSION_HANDLE a), (a))                                      \
    X(C_CloseAllSessions, SHIM_T, (CK_SLOT_ID a), (a))                                         \
    X(C_GetSessionInfo, SHIM_T, (CK_SESSION_HANDLE a, CK_SESSION_INFO_PTR b), (a, b))          \
    X(C_GetOperationState, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c),       \
      (a, b, c))                                                                               \
    X(C_SetOperationState, SHIM_T,                                                             \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_OBJECT_HANDLE d, CK_OBJECT_HANDLE e), \
      (a, b, c, d, e))                                                                         \
    X(C_Login, SHIM_T, (CK_SESSION_HANDLE a, CK_USER_TYPE b, CK_UTF8CHAR_PTR c, CK_ULONG d),   \
      (a, b, c, d))                                                                            \
    X(C_Logout, SHIM_T, (CK_SESSION_HANDLE a), (a))                                            \
    X(C_CreateObject, SHIM_T,                                                                  \
      (CK_SESSION_HANDLE a, CK_ATTRIBUTE_PTR b, CK_ULONG c, CK_OBJECT_HANDLE_PTR d),           \
      (a, b, c, d))                                                                            \
    X(C_CopyObject, SHIM_T,                                                                    \
      (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c, CK_ULONG d,                \
       CK_OBJECT_HANDLE_PTR e),                                                                \
      (a, b, c, d, e))                                                                         \
    X(C_DestroyObject, SHIM_T, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b), (a, b))              \
    X(C_GetObjectSize, SHIM_T, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ULONG_PTR c),      \
      (a, b, c))                                                                               \
    X(C_GetAttributeValue, SHIM_T,                                                             \
      (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c, CK_ULONG d), (a, b, c, d)) \
    X(C_SetAttributeValue, SHIM_T,                                                             \
      (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b, CK_ATTRIBUTE_PTR c, CK_ULONG d), (a, b, c, d)) \
    X(C_FindObjectsInit, SHIM_T, (CK_SESSION_HANDLE a, CK_ATTRIBUTE_PTR b, CK_ULONG c),        \
      (a, b, c))                                                                               \
    X(C_FindObjects, SHIM_T,                                                                   \
      (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE_PTR b, CK_ULONG c, CK_ULONG_PTR d), (a, b, c, d)) \
    X(C_FindObjectsFinal, SHIM_T, (CK_SESSION_HANDLE a), (a))                                  \
    X(C_EncryptInit, SHIM_T, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c),    \
      (a, b, c))                                                                               \
    X(C_Encrypt, SHIM_T,                                                                       \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_EncryptUpdate, SHIM_T,                                                                 \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_EncryptFinal, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c), (a, b, c)) \
    X(C_DecryptInit, SHIM_T, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c),    \
      (a, b, c))                                                                               \
    X(C_Decrypt, SHIM_T,                                                                       \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_DecryptUpdate, SHIM_T,                                                                 \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_DecryptFinal, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c), (a, b, c)) \
    X(C_DigestInit, SHIM_T, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b), (a, b))                 \
    X(C_Digest, SHIM_T,                                                                        \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_DigestUpdate, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))     \
    X(C_DigestKey, SHIM_T, (CK_SESSION_HANDLE a, CK_OBJECT_HANDLE b), (a, b))                  \
    X(C_DigestFinal, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c), (a, b, c))  \
    X(C_SignInit, SHIM_T, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c),       \
      (a, b, c))                                                                               \
    X(C_Sign, SHIM_T,                                                                          \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_SignUpdate, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))       \
    X(C_SignFinal, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG_PTR c), (a, b, c))    \
    X(C_SignRecoverInit, SHIM_T, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), \
      (a, b, c))                                                                               \
    X(C_SignRecover, SHIM_T,                                                                   \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_VerifyInit, SHIM_T, (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c),     \
      (a, b, c))                                                                               \
    X(C_Verify, SHIM_T,                                                                        \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG e),             \
      (a, b, c, d, e))                                                                         \
    X(C_VerifyUpdate, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))     \
    X(C_VerifyFinal, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))      \
    X(C_VerifyRecoverInit, SHIM_T,                                                             \
      (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c), (a, b, c))                \
    X(C_VerifyRecover, SHIM_T,                                                                 \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_DigestEncryptUpdate, SHIM_T,                                                           \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_DecryptDigestUpdate, SHIM_T,                                                           \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_SignEncryptUpdate, SHIM_T,                                                             \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_DecryptVerifyUpdate, SHIM_T,                                                           \
      (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c, CK_BYTE_PTR d, CK_ULONG_PTR e),         \
      (a, b, c, d, e))                                                                         \
    X(C_GenerateKey, SHIM_T,                                                                   \
      (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d,                \
       CK_OBJECT_HANDLE_PTR e),                                                                \
      (a, b, c, d, e))                                                                         \
    X(C_GenerateKeyPair, SHIM_T,                                                               \
      (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_ATTRIBUTE_PTR c, CK_ULONG d,                \
       CK_ATTRIBUTE_PTR e, CK_ULONG f, CK_OBJECT_HANDLE_PTR g, CK_OBJECT_HANDLE_PTR h),        \
      (a, b, c, d, e, f, g, h))                                                                \
    X(C_WrapKey, SHIM_T,                                                                       \
      (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_OBJECT_HANDLE d,        \
       CK_BYTE_PTR e, CK_ULONG_PTR f),                                                         \
      (a, b, c, d, e, f))                                                                      \
    X(C_UnwrapKey, SHIM_T,                                                                     \
      (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_BYTE_PTR d, CK_ULONG e, \
       CK_ATTRIBUTE_PTR f, CK_ULONG g, CK_OBJECT_HANDLE_PTR h),                                \
      (a, b, c, d, e, f, g, h))                                                                \
    X(C_DeriveKey, SHIM_T,                                                                     \
      (CK_SESSION_HANDLE a, CK_MECHANISM_PTR b, CK_OBJECT_HANDLE c, CK_ATTRIBUTE_PTR d,        \
       CK_ULONG e, CK_OBJECT_HANDLE_PTR f),                                                    \
      (a, b, c, d, e, f))                                                                      \
    X(C_SeedRandom, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))       \
    X(C_GenerateRandom, SHIM_T, (CK_SESSION_HANDLE a, CK_BYTE_PTR b, CK_ULONG c), (a, b, c))   \
    X(C_GetFunctionStatus, SHIM_M, (CK_SESSION_HANDLE a), (a))                                 \
    X(C_CancelFunction, SHIM_M, (CK_SESSION_HANDLE a), (a))                                    \
    X(C_WaitForSlotEvent, SHIM_M, (CK_FLAGS a, CK_SLOT_ID_PTR b, CK_VOID_PTR c), (a, b, c))
/* clang-format on */

/* SHIM_IDX_C_Encrypt ... and SHIM_N. */
enum {
#define SHIM_ENUM(name, cls, params, args) SHIM_IDX_##name,
    SHIM_FUNCTIONS(SHIM_ENUM)
#undef SHIM_ENUM
        SHIM_N
};

/* The per-function hook table: what shim_enter does for each function.
 * Filled from the configuration once; only the counter changes later. */
typedef struct shim_fn {
    const char *name;
    int cls;             /* SHIM_M or SHIM_T */
    unsigned delay_us;   /* slept before the call */
    unsigned hang_ms;    /* P11SHIM_HANG_MS for the selected functions */
    int may_fail;        /* selected by P11SHIM_FAIL_FUNCS */
    atomic_ulong calls;  /* calls seen (diagnostics) */
    atomic_ulong faults; /* P11SHIM_FAIL_* faults injected */
} shim_fn;

#define SHIM_MAX_RVS 8

typedef struct shim_state {
    void *handle;                /* dlopen of the real module */
    CK_FUNCTION_LIST *real;      /* its function list */
    CK_RV load_rv;               /* CKR_OK once loaded */
    CK_RV fail_rv[SHIM_MAX_RVS]; /* P11SHIM_FAIL_RV: one or a list */
    size_t n_fail_rv;
    atomic_ulong rv_faults[SHIM_MAX_RVS]; /* faults injected, per fail_rv */
    const char *fail_file;                /* P11SHIM_FAIL_FILE (NULL: always armed) */
    unsigned long fail_nth;               /* 0: off */
    unsigned long fail_count;             /* 0: forever */
    double fail_rate;                     /* 0: off */
    int debug;
    CK_FLAGS flags_set;     /* P11SHIM_TOKEN_FLAGS_SET */
    CK_FLAGS flags_clear;   /* P11SHIM_TOKEN_FLAGS_CLEAR */
    const char *gone_file;  /* P11SHIM_GONE_FILE (NULL: never gone) */
    CK_RV gone_rv;          /* P11SHIM_GONE_RV */
    const char *hang_file;  /* P11SHIM_HANG_FILE (NULL: hang always) */
    atomic_ulong fail_seen; /* selected calls so far (for NTH) */
    shim_fn fn[SHIM_N];
} shim_state;

static shim_state S = {
    .fn =
        {
#define SHIM_INFO(fn_, cls_, params, args) [SHIM_IDX_##fn_] = {.name = #fn_, .cls = cls_},
            SHIM_FUNCTIONS(SHIM_INFO)
#undef SHIM_INFO
        },
};
static pthread_once_t S_once = PTHREAD_ONCE_INIT;

/* ---- configuration -------------------------------------------------------- */

static const struct {
    const char *name;
    CK_RV rv;
} rv_names[] = {
    {"CKR_OK", CKR_OK},
    {"CKR_HOST_MEMORY", CKR_HOST_MEMORY},
    {"CKR_GENERAL_ERROR", CKR_GENERAL_ERROR},
    {"CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED},
    {"CKR_DEVICE_ERROR", CKR_DEVICE_ERROR},
    {"CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY},
    {"CKR_DEVICE_REMOVED", CKR_DEVICE_REMOVED},
    {"CKR_SESSION_CLOSED", CKR_SESSION_CLOSED},
    {"CKR_SESSION_HANDLE_INVALID", CKR_SESSION_HANDLE_INVALID},
    {"CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID},
    {"CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID},
    {"CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT},
    {"CKR_PIN_INCORRECT", CKR_PIN_INCORRECT},
    {"CKR_PIN_LOCKED", CKR_PIN_LOCKED},
    {"CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN},
    {"CKR_CRYPTOKI_NOT_INITIALIZED", CKR_CRYPTOKI_NOT_INITIALIZED},
};

static int parse_rv(const char *s, CK_RV *out)
{
    char *end = NULL;
    unsigned long v;

    for (size_t i = 0; i < sizeof(rv_names) / sizeof(rv_names[0]); i++) {
        if (strcmp(s, rv_names[i].name) == 0) {
            *out = rv_names[i].rv;
            return 0;
        }
    }
    errno = 0;
    v = strtoul(s, &end, 0);
    if (errno != 0 || end == s || *end != '\0')
        return -1;
    *out = (CK_RV)v;
    return 0;
}

static unsigned long env_ulong(const char *name, unsigned long dflt)
{
    const char *v = getenv(name);
    char *end = NULL;
    unsigned long r;

    if (v == NULL || *v == '\0')
        return dflt;
    errno = 0;
    r = strtoul(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0') {
        fprintf(stderr, "p11shim: ignoring bad %s=%s\n", name, v);
        return dflt;
    }
    return r;
}

/* Does `name` belong to the selection `sel` ("token", "all" or a list)? */
static int selected(const char *sel, const shim_fn *fn)
{
    size_t len = strlen(fn->name);
    const char *p;

    if (sel == NULL || *sel == '\0' || strcmp(sel, "token") == 0)
        return fn->cls == SHIM_T;
    if (strcmp(sel, "all") == 0)
        return 1;
    for (p = sel; (p = strstr(p, fn->name)) != NULL; p += len) {
        if ((p == sel || p[-1] == ',' || p[-1] == ' ') &&
            (p[len] == '\0' || p[len] == ',' || p[len] == ' '))
            return 1;
    }
    return 0;
}

/* "final_try|locked" -> CKF_USER_PIN_FINAL_TRY | CKF_USER_PIN_LOCKED. */
static CK_FLAGS parse_flags(const char *var)
{
    static const struct {
        const char *name;
        CK_FLAGS flag;
    } names[] = {
        {"final_try", CKF_USER_PIN_FINAL_TRY},
        {"locked", CKF_USER_PIN_LOCKED},
        {"count_low", CKF_USER_PIN_COUNT_LOW},
        {"to_be_changed", CKF_USER_PIN_TO_BE_CHANGED},
    };
    const char *v = getenv(var), *p;
    CK_FLAGS out = 0;

    if (v == NULL)
        return 0;
    for (p = v; *p != '\0';) {
        size_t len = strcspn(p, "|, ");
        int known = 0;

        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
            if (len == strlen(names[i].name) && strncmp(p, names[i].name, len) == 0) {
                out |= names[i].flag;
                known = 1;
            }
        }
        if (!known && len > 0) {
            char buf[32], *end = NULL;
            unsigned long n;

            snprintf(buf, sizeof(buf), "%.*s", (int)len, p);
            n = strtoul(buf, &end, 0);
            if (end == buf || *end != '\0')
                fprintf(stderr, "p11shim: ignoring bad flag '%s' in %s\n", buf, var);
            else
                out |= (CK_FLAGS)n;
        }
        p += len;
        if (*p != '\0')
            p++;
    }
    return out;
}

static const char *env_str(const char *name)
{
    const char *v = getenv(name);

    return v != NULL && *v != '\0' ? v : NULL;
}

/* P11SHIM_FAIL_RV: "CKR_DEVICE_ERROR" or "CKR_DEVICE_ERROR,CKR_GENERAL_ERROR". */
static void parse_rv_list(const char *v)
{
    const char *p = v;

    S.n_fail_rv = 0;
    while (p != NULL && *p != '\0' && S.n_fail_rv < SHIM_MAX_RVS) {
        size_t len = strcspn(p, ", ");
        char one[64];
        CK_RV rv;

        if (len > 0 && len < sizeof(one)) {
            snprintf(one, sizeof(one), "%.*s", (int)len, p);
            if (parse_rv(one, &rv) == 0)
                S.fail_rv[S.n_fail_rv++] = rv;
            else
                fprintf(stderr, "p11shim: ignoring bad '%s' in P11SHIM_FAIL_RV\n", one);
        }
        p += len;
        p += strspn(p, ", ");
    }
    if (S.n_fail_rv == 0) {
        S.fail_rv[0] = CKR_DEVICE_ERROR;
        S.n_fail_rv = 1;
    }
    for (size_t i = 0; i < SHIM_MAX_RVS; i++)
        atomic_init(&S.rv_faults[i], 0);
}

static CK_RV load_real(void)
{
    const char *path = getenv("P11SHIM_MODULE");
    CK_C_GetFunctionList get = NULL;
    CK_RV rv = CKR_GENERAL_ERROR;

    if (path == NULL || *path == '\0') {
        fprintf(stderr, "p11shim: P11SHIM_MODULE is not set\n");
        goto out;
    }
    S.handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (S.handle == NULL) {
        fprintf(stderr, "p11shim: cannot load %s: %s\n", path, dlerror());
        goto out;
    }
    *(void **)&get = dlsym(S.handle, "C_GetFunctionList");
    if (get == NULL) {
        fprintf(stderr, "p11shim: %s has no C_GetFunctionList\n", path);
        goto out;
    }
    rv = get(&S.real);
    if (rv == CKR_OK && S.real == NULL)
        rv = CKR_GENERAL_ERROR;
    if (rv != CKR_OK)
        fprintf(stderr, "p11shim: C_GetFunctionList of %s: 0x%lx\n", path, (unsigned long)rv);
out:
    if (rv != CKR_OK && S.handle != NULL) {
        dlclose(S.handle);
        S.handle = NULL;
        S.real = NULL;
    }
    return rv;
}

static void shim_install_hooks(void);

static void shim_load(void)
{
    const char *delay_sel = getenv("P11SHIM_DELAY_FUNCS");
    const char *fail_sel = getenv("P11SHIM_FAIL_FUNCS");
    const char *fail_rv = getenv("P11SHIM_FAIL_RV");
    const char *rate = getenv("P11SHIM_FAIL_RATE");
    unsigned long delay = env_ulong("P11SHIM_DELAY_US", 0);

    S.debug = env_ulong("P11SHIM_DEBUG", 0) != 0;
    parse_rv_list(fail_rv);
    S.fail_file = env_str("P11SHIM_FAIL_FILE");
    S.fail_nth = env_ulong("P11SHIM_FAIL_NTH", 0);
    S.fail_count = env_ulong("P11SHIM_FAIL_COUNT", 1);
    if (rate != NULL && *rate != '\0') {
        char *end = NULL;
        S.fail_rate = strtod(rate, &end);
        if (end == rate || *end != '\0' || S.fail_rate < 0.0 || S.fail_rate > 1.0) {
            fprintf(stderr, "p11shim: ignoring bad P11SHIM_FAIL_RATE=%s\n", rate);
            S.fail_rate = 0.0;
        }
    }
    S.flags_set = parse_flags("P11SHIM_TOKEN_FLAGS_SET");
    S.flags_clear = parse_flags("P11SHIM_TOKEN_FLAGS_CLEAR");
    S.gone_file = env_str("P11SHIM_GONE_FILE");
    S.gone_rv = CKR_DEVICE_REMOVED;
    if (env_str("P11SHIM_GONE_RV") != NULL && parse_rv(getenv("P11SHIM_GONE_RV"), &S.gone_rv) != 0)
        fprintf(stderr, "p11shim: ignoring bad P11SHIM_GONE_RV=%s\n", getenv("P11SHIM_GONE_RV"));
    S.hang_file = env_str("P11SHIM_HANG_FILE");
    atomic_init(&S.fail_seen, 0);
    for (int i = 0; i < SHIM_N; i++) {
        atomic_init(&S.fn[i].calls, 0);
        atomic_init(&S.fn[i].faults, 0);
        S.fn[i].delay_us = selected(delay_sel, &S.fn[i]) ? (unsigned)delay : 0;
        /* No default selection for hangs: HANG_FUNCS must name them. */
        S.fn[i].hang_ms = env_str("P11SHIM_HANG_FUNCS") != NULL &&
                                  selected(getenv("P11SHIM_HANG_FUNCS"), &S.fn[i])
                              ? (unsigned)env_ulong("P11SHIM_HANG_MS", 0)
                              : 0;
        S.fn[i].may_fail = (S.fail_nth != 0 || S.fail_rate > 0.0) && selected(fail_sel, &S.fn[i]);
    }
    S.load_rv = load_real();
    shim_install_hooks();
}

/* ---- the hook run before every forwarded call ----------------------------- */

static void sleep_us(unsigned us)
{
    struct timespec ts = {(time_t)(us / 1000000u), (long)(us % 1000000u) * 1000L};

    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* A per-thread xorshift generator for P11SHIM_FAIL_RATE (no shared state). */
static double thread_uniform(void)
{
    static _Thread_local uint64_t x;

    if (x == 0) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        x = ((uint64_t)ts.tv_nsec << 20) ^ (uint64_t)(uintptr_t)&x ^ 0x9e3779b97f4a7c15ull;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return (double)(x >> 11) / (double)(1ull << 53);
}

static int file_exists(const char *path)
{
    return path != NULL && access(path, F_OK) == 0;
}

/* Is the token "gone" right now (P11SHIM_GONE_FILE exists)?  A stat per
 * call, only when the switch is configured. */
static int token_gone(void)
{
    return file_exists(S.gone_file);
}

/* P11SHIM_HANG_MS: sleep in 10 ms steps, stopping early once
 * P11SHIM_HANG_FILE (when set) is removed. */
static void hang(const shim_fn *fn)
{
    unsigned left = fn->hang_ms;

    if (S.hang_file != NULL && !file_exists(S.hang_file))
        return;
    if (S.debug)
        fprintf(stderr, "p11shim: %s hangs for up to %u ms\n", fn->name, left);
    while (left > 0) {
        unsigned step = left < 10 ? left : 10;

        sleep_us(step * 1000u);
        left -= step;
        if (S.hang_file != NULL && !file_exists(S.hang_file))
            break;
    }
}

/* Returns 1 with *rv set when the call must fail without being forwarded. */
static int shim_enter(int idx, CK_RV *rv)
{
    shim_fn *fn = &S.fn[idx];
    int fail = 0;

    atomic_fetch_add_explicit(&fn->calls, 1, memory_order_relaxed);
    if (S.real == NULL) {
        *rv = CKR_GENERAL_ERROR;
        return 1;
    }
    if (fn->delay_us != 0)
        sleep_us(fn->delay_us);
    if (fn->hang_ms != 0)
        hang(fn);
    if (fn->cls == SHIM_T && token_gone()) {
        *rv = S.gone_rv;
        if (S.debug)
            fprintf(stderr, "p11shim: %s -> token gone 0x%lx\n", fn->name, (unsigned long)*rv);
        return 1;
    }
    if (!fn->may_fail || (S.fail_file != NULL && !file_exists(S.fail_file)))
        return 0;
    if (S.fail_nth != 0) {
        unsigned long n = atomic_fetch_add(&S.fail_seen, 1) + 1;
        fail = n >= S.fail_nth && (S.fail_count == 0 || n < S.fail_nth + S.fail_count);
    }
    if (!fail && S.fail_rate > 0.0)
        fail = thread_uniform() < S.fail_rate;
    if (fail) {
        size_t k = S.n_fail_rv > 1 ? (size_t)(thread_uniform() * (double)S.n_fail_rv) : 0;

        if (k >= S.n_fail_rv)
            k = S.n_fail_rv - 1;
        *rv = S.fail_rv[k];
        atomic_fetch_add_explicit(&fn->faults, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&S.rv_faults[k], 1, memory_order_relaxed);
        if (S.debug)
            fprintf(stderr, "p11shim: %s -> injected 0x%lx\n", fn->name, (unsigned long)*rv);
    }
    return fail;
}

/* ---- the forwarders and the function list --------------------------------- */

#define SHIM_FORWARD(name, cls, params, args)                                                      \
    static CK_RV shim_##name params                                                                \
    {                                                                                              \
        CK_RV rv;                                                                                  \
        if (shim_enter(SHIM_IDX_##name, &rv))                                                      \
            return rv;                                                                             \
        return S.real->name args;                                                                  \
    }
SHIM_FUNCTIONS(SHIM_FORWARD)
#undef SHIM_FORWARD

static CK_RV shim_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

static CK_FUNCTION_LIST shim_list = {.version = {2, 40},
                                     .C_GetFunctionList = shim_C_GetFunctionList,
#define SHIM_ENTRY(name, cls, params, args) .name = shim_##name,
                                     SHIM_FUNCTIONS(SHIM_ENTRY)
#undef SHIM_ENTRY
};

/* ---- post-call hooks (installed over the generated forwarders) ------------ */

/* The name of an injected CK_RV, for the statistics. */
static void rv_name(CK_RV rv, char *out, size_t len)
{
    for (size_t i = 0; i < sizeof(rv_names) / sizeof(rv_names[0]); i++) {
        if (rv_names[i].rv == rv) {
            snprintf(out, len, "%s", rv_names[i].name);
            return;
        }
    }
    snprintf(out, len, "0x%lx", (unsigned long)rv);
}

/* One line "C_xxx <calls>" per function called, then "faults:C_xxx <n>"
 * and "faults:CKR_xxx <n>" for the faults injected, to path opened in
 * mode.  Every line is a name and a number: readers that look for one
 * name skip the others. */
static void write_stats(const char *path, const char *mode)
{
    FILE *f = fopen(path, mode);
    char name[64];

    if (f == NULL)
        return;
    for (int i = 0; i < SHIM_N; i++) {
        unsigned long n = atomic_load(&S.fn[i].calls);
        if (n != 0)
            fprintf(f, "%s %lu\n", S.fn[i].name, n);
    }
    for (int i = 0; i < SHIM_N; i++) {
        unsigned long n = atomic_load(&S.fn[i].faults);
        if (n != 0)
            fprintf(f, "faults:%s %lu\n", S.fn[i].name, n);
    }
    for (size_t i = 0; i < S.n_fail_rv; i++) {
        unsigned long n = atomic_load(&S.rv_faults[i]);
        rv_name(S.fail_rv[i], name, sizeof(name));
        if (n != 0)
            fprintf(f, "faults:%s %lu\n", name, n);
    }
    fclose(f);
}

/* P11SHIM_SESSIONS_FILE: the sessions open in the real module now and the
 * most ever open at once, rewritten (temp file and rename) after every
 * change.  Session calls are rare (a pool keeps them), so a lock here
 * costs nothing on the hot path. */
static pthread_mutex_t sessions_mu = PTHREAD_MUTEX_INITIALIZER;
static long sessions_open, sessions_max;

static void sessions_changed(long delta, int none_left)
{
    const char *path = env_str("P11SHIM_SESSIONS_FILE");
    char tmp[4096];
    FILE *f;

    pthread_mutex_lock(&sessions_mu);
    sessions_open = none_left ? 0 : sessions_open + delta;
    if (sessions_open > sessions_max)
        sessions_max = sessions_open;
    if (path != NULL && snprintf(tmp, sizeof(tmp), "%s.tmp", path) < (int)sizeof(tmp) &&
        (f = fopen(tmp, "w")) != NULL) {
        fprintf(f, "sessions_open %ld\nsessions_max %ld\n", sessions_open, sessions_max);
        fclose(f);
        if (rename(tmp, path) != 0)
            fprintf(stderr, "p11shim: cannot write %s\n", path);
    }
    pthread_mutex_unlock(&sessions_mu);
}

static CK_RV hook_C_OpenSession(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR app, CK_NOTIFY notify,
                                CK_SESSION_HANDLE_PTR session)
{
    CK_RV rv = shim_C_OpenSession(slot, flags, app, notify, session);

    if (rv == CKR_OK)
        sessions_changed(1, 0);
    return rv;
}

static CK_RV hook_C_CloseSession(CK_SESSION_HANDLE session)
{
    CK_RV rv = shim_C_CloseSession(session);

    if (rv == CKR_OK)
        sessions_changed(-1, 0);
    return rv;
}

static CK_RV hook_C_CloseAllSessions(CK_SLOT_ID slot)
{
    CK_RV rv = shim_C_CloseAllSessions(slot);

    if (rv == CKR_OK) /* one token behind the shim */
        sessions_changed(0, 1);
    return rv;
}

/* C_Finalize closes every session (P11SHIM_SESSIONS_FILE), and
 * P11SHIM_STATS_SNAPSHOT rewrites the counts so far (temp file and
 * rename), for a process that keeps the shim loaded (p11-kit does not
 * always unload it). */
static CK_RV hook_C_Finalize(CK_VOID_PTR reserved)
{
    CK_RV rv = shim_C_Finalize(reserved);
    const char *snap = env_str("P11SHIM_STATS_SNAPSHOT");
    char tmp[4096];

    if (rv == CKR_OK && env_str("P11SHIM_SESSIONS_FILE") != NULL)
        sessions_changed(0, 1);
    if (snap != NULL && snprintf(tmp, sizeof(tmp), "%s.tmp", snap) < (int)sizeof(tmp)) {
        write_stats(tmp, "w");
        if (rename(tmp, snap) != 0)
            fprintf(stderr, "p11shim: cannot write %s\n", snap);
    }
    return rv;
}

/* The PIN flags rewritten (P11SHIM_TOKEN_FLAGS_SET / _CLEAR). */
static CK_RV hook_C_GetTokenInfo(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info)
{
    CK_RV rv = shim_C_GetTokenInfo(slot, info);

    if (rv == CKR_OK && info != NULL)
        info->flags = (info->flags & ~S.flags_clear) | S.flags_set;
    return rv;
}

/* A gone token is not listed among the slots with a token. */
static CK_RV hook_C_GetSlotList(CK_BBOOL present, CK_SLOT_ID_PTR list, CK_ULONG_PTR count)
{
    CK_RV rv;

    if (present && count != NULL && token_gone()) {
        (void)shim_enter(SHIM_IDX_C_GetSlotList, &rv); /* counted and delayed only */
        *count = 0;
        return CKR_OK;
    }
    return shim_C_GetSlotList(present, list, count);
}

static CK_RV hook_C_GetSlotInfo(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info)
{
    CK_RV rv = shim_C_GetSlotInfo(slot, info);

    if (rv == CKR_OK && info != NULL && token_gone())
        info->flags &= ~(CK_FLAGS)CKF_TOKEN_PRESENT;
    return rv;
}

static void shim_install_hooks(void)
{
    if (env_str("P11SHIM_STATS_SNAPSHOT") != NULL || env_str("P11SHIM_SESSIONS_FILE") != NULL)
        shim_list.C_Finalize = hook_C_Finalize;
    if (env_str("P11SHIM_SESSIONS_FILE") != NULL) {
        shim_list.C_OpenSession = hook_C_OpenSession;
        shim_list.C_CloseSession = hook_C_CloseSession;
        shim_list.C_CloseAllSessions = hook_C_CloseAllSessions;
    }
    if (S.flags_set != 0 || S.flags_clear != 0)
        shim_list.C_GetTokenInfo = hook_C_GetTokenInfo;
    if (S.gone_file != NULL) {
        shim_list.C_GetSlotList = hook_C_GetSlotList;
        shim_list.C_GetSlotInfo = hook_C_GetSlotInfo;
    }
}

static CK_RV shim_C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    CK_RV rv = CKR_ARGUMENTS_BAD;

    if (list == NULL)
        goto out;
    pthread_once(&S_once, shim_load);
    rv = S.load_rv;
    if (rv != CKR_OK)
        goto out;
    *list = &shim_list;
out:
    return rv;
}

SHIM_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list);

CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    return shim_C_GetFunctionList(list);
}

/* Unload the real module with the shim (p11-kit dlcloses the shim after
 * its last C_Finalize). */
__attribute__((destructor)) static void shim_unload(void)
{
    const char *stats = getenv("P11SHIM_STATS");

    if (stats != NULL && *stats != '\0')
        write_stats(stats, "a");
    if (S.handle != NULL)
        dlclose(S.handle);
    S.handle = NULL;
    S.real = NULL;
}
