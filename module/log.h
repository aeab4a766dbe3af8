/*
 * module/log.h - the one logger of p11kms (every layer uses it).
 *
 * Lines go to stderr (journald or the test log) as
 *   "2026-11-29T16:00:00Z kmsd[123] error token: module/session.c:88 p11_login: C_Login: CKR_PIN_INCORRECT"
 * Errors and warnings always carry file, line and function.  Debug lines
 * are off unless their subsystem is named in P11KMS_DEBUG
 * ("token,store,http" or "all"), read once.  Never pass a secret (PIN,
 * plaintext or wrapped key bytes) to a log call.
 */
#ifndef P11KMS_MODULE_LOG_H
#define P11KMS_MODULE_LOG_H

typedef enum p11_log_level {
    P11_LOG_ERROR = 0,
    P11_LOG_WARN,
    P11_LOG_INFO,
    P11_LOG_DEBUG
} p11_log_level;

void p11_log_write(p11_log_level level, const char *subsystem, const char *file, int line,
                   const char *func, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));

/* 1 if debug lines of this subsystem are enabled. */
int p11_log_debug_enabled(const char *subsystem);

#define P11_LOG(level, sub, ...) p11_log_write((level), (sub), __FILE__, __LINE__, __func__, __VA_ARGS__)
#define LOG_ERROR(sub, ...) P11_LOG(P11_LOG_ERROR, sub, __VA_ARGS__)
#define LOG_WARN(sub, ...) P11_LOG(P11_LOG_WARN, sub, __VA_ARGS__)
#define LOG_INFO(sub, ...) P11_LOG(P11_LOG_INFO, sub, __VA_ARGS__)
#define LOG_DEBUG(sub, ...)                                                  \
    do {                                                                     \
        if (p11_log_debug_enabled(sub))                                      \
            P11_LOG(P11_LOG_DEBUG, sub, __VA_ARGS__);                        \
    } while (0)

#endif
