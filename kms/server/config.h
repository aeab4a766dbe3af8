/*
 * kms/server/config.h - kmsd.conf, the daemon's INI configuration.
 *
 * The parser is strict: an unknown section or key, a duplicate key, a
 * missing required key, a bad integer or mode, a malformed PKCS#11 URI or
 * a missing file stops it with "FILE:LINE: reason".  Relative paths are
 * resolved against the directory of the configuration file.  The loaded
 * configuration is immutable and may be read from any thread.
 */
#ifndef P11KMS_KMS_SERVER_CONFIG_H
#define P11KMS_KMS_SERVER_CONFIG_H

#include <stddef.h>
#include <sys/types.h>

#include "p11kms/status.h"

#define KMS_CONFIG_ERR_MAX 1024

typedef struct kms_config {
    char *file; /* the path as given */
    char *dir;  /* its directory (relative paths are resolved here) */

    /* [token] */
    char *token_module;   /* absolute path, or a p11-kit module name */
    char *token_uri;      /* RFC 7512, validated with p11_kit_uri_parse */
    char *token_pin_file; /* NULL: P11KMS_PIN must be set */
    int token_sessions;   /* default 32 */
    char *token_softhsm2_conf; /* SoftHSM2 only: exported as SOFTHSM2_CONF */

    /* [store] */
    char *store_backend; /* "sqlite" (default) or "postgres" */
    char *store_path;    /* sqlite */
    char *store_url;     /* postgres */

    /* [listen] */
    char *listen_unix; /* socket path */
    mode_t unix_mode;  /* default 0600 */
    char *listen_tls;  /* host:port or [v6]:port; with the three below */
    char *tls_cert, *tls_key, *tls_client_ca;

    /* [policy] */
    char *policy_file;

    /* [server] */
    int threads;         /* event loops, default 2 */
    int workers;         /* worker threads, default 32 */
    int queue;           /* max queued requests, default 1024 */
    int max_body;        /* bytes, default 65536 */
    int timeout;         /* seconds, default 30: idle connection, writing a reply */
    int request_timeout; /* seconds, default 10: one request to arrive whole */
    int max_connections; /* default 1024 */
    int rotation_check_interval; /* seconds between rotation-period checks, default 60 */
    int max_wraps_per_version;   /* wrap cap per key version, 1..2^30, default 2^30 */

    /* line numbers, for errors found after parsing (0: not set) */
    int line_backend, line_tls, line_pin_file, line_last;
} kms_config;

/* Parse `path`.  On success *out is a new configuration (free with
 * kms_config_free).  On failure err receives "FILE:LINE: reason" (or
 * "FILE: reason" when the file cannot be read) and the status is
 * P11KMS_ERR_BAD_REQUEST (P11KMS_ERR_NO_MEMORY when out of memory). */
p11kms_status kms_config_load(const char *path, kms_config **out, char *err, size_t errlen);

/* The same parse over text[0..len) (need not be NUL-terminated; a NUL
 * byte ends its line, as in a file): `name` stands for the file's path in
 * errors and relative paths.  Files named by the text (pin_file, policy
 * file, TLS files) are still checked on disk.  For tests and fuzzing. */
p11kms_status kms_config_parse_buffer(const char *text, size_t len, const char *name,
                                      kms_config **out, char *err, size_t errlen);

/* Split "host:port" or "[v6]:port" (port 1..65535).  0, or -1 when
 * malformed or too long for the buffers. */
int kms_config_split_hostport(const char *v, char *host, size_t hostlen, char *port,
                              size_t portlen);

/* Checks that need more than the parser: store.url (backend = postgres)
 * must be a libpq connection string.  P11KMS_ERR_BAD_REQUEST with
 * "FILE:LINE: reason" in err. */
p11kms_status kms_config_check_supported(const kms_config *cfg, char *err, size_t errlen);

void kms_config_free(kms_config *cfg);

#endif
