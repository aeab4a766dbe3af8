/*
 * tests/support/testtoken.h - a private SoftHSM2 token for one test.
 *
 * Each test program (or each test that needs a fresh one) makes its own
 * token in a new temp dir: a softhsm2.conf pointing at a tokens/ folder
 * there, `softhsm2-util --init-token --free`, and SOFTHSM2_CONF exported so
 * the module loaded afterwards sees only this token.  The slot is found by
 * label through the URI (SoftHSM2 renumbers slots).
 */
#ifndef P11KMS_TESTS_TESTTOKEN_H
#define P11KMS_TESTS_TESTTOKEN_H

#include <stddef.h>

#define TT_PIN "1234"
#define TT_SO_PIN "12345678"

typedef struct tt_token {
    char dir[256];      /* temp dir, removed by tt_token_remove */
    char conf[320];     /* dir/softhsm2.conf */
    char label[33];
    char uri[64];       /* "pkcs11:token=<label>" */
    char module[256];   /* path of libsofthsm2.so */
} tt_token;

/* Make a new temp dir with an initialised token labelled `label` (user PIN
 * TT_PIN) and export SOFTHSM2_CONF.  Returns 0, or -1 with a message on
 * stderr. */
int tt_token_new(const char *label, tt_token *tt);

/* rm -rf the temp dir. */
void tt_token_remove(tt_token *tt);

/* Path of the SoftHSM2 module on this machine (P11KMS_TEST_MODULE
 * overrides). */
const char *tt_softhsm_module(void);

/* Make a fresh temp dir (for stores, sockets); returns 0 or -1. */
int tt_tempdir(char *out, size_t len);

/* rm -rf path. */
void tt_rmtree(const char *path);

#endif
