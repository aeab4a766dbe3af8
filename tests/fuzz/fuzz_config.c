/*
 * tests/fuzz/fuzz_config.c - libFuzzer target for the kmsd.conf parser
 * (kms_config_parse_buffer, the same line loop as kms_config_load) and
 * the listen.tls host:port splitter.
 *
 * The text is named "/nonexistent-p11kms-fuzz/kmsd.conf", so relative
 * paths resolve into a directory that does not exist and files it names
 * are only stat()ed.  Invariants: a refusal has a message starting with
 * that name; an accepted configuration has every required key and
 * defaults in range; no crash, leak or undefined behaviour.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "kms/server/config.h"

#define NAME "/nonexistent-p11kms-fuzz/kmsd.conf"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[KMS_CONFIG_ERR_MAX], host[256], port[16], *line;
    kms_config *cfg = NULL;
    p11kms_status s;
    size_t n;

    err[0] = '\0';
    s = kms_config_parse_buffer((const char *)data, size, NAME, &cfg, err, sizeof(err));
    if (s != P11KMS_OK) {
        FUZZ_ASSERT(cfg == NULL);
        FUZZ_ASSERT(s == P11KMS_ERR_BAD_REQUEST || s == P11KMS_ERR_NO_MEMORY);
        FUZZ_ASSERT(strncmp(err, NAME ":", strlen(NAME) + 1) == 0);
    } else {
        FUZZ_ASSERT(cfg != NULL);
        FUZZ_ASSERT(cfg->token_module != NULL && cfg->token_uri != NULL);
        FUZZ_ASSERT(cfg->store_backend != NULL && cfg->listen_unix != NULL);
        FUZZ_ASSERT(cfg->threads >= 1 && cfg->workers >= 1 && cfg->max_body >= 64);
        (void)kms_config_check_supported(cfg, err, sizeof(err));
        kms_config_free(cfg);
    }

    /* The first line, as a listen.tls value. */
    n = 0;
    while (n < size && n < 300 && data[n] != '\n')
        n++;
    line = malloc(n + 1);
    FUZZ_ASSERT(line != NULL);
    memcpy(line, data, n);
    line[n] = '\0';
    if (kms_config_split_hostport(line, host, sizeof(host), port, sizeof(port)) == 0) {
        long p = strtol(port, NULL, 10);
        FUZZ_ASSERT(host[0] != '\0' && p >= 1 && p <= 65535);
    }
    free(line);
    return 0;
}
