/*
 * module/log.c - writes log lines to stderr (see log.h).
 *
 * The only state is the set of debug subsystems, read from P11KMS_DEBUG
 * once (pthread_once) and never changed afterwards.  Each line is built in
 * one buffer and written with one write(2), so lines of concurrent threads
 * do not interleave.
 */
#include "log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LOG_LINE_MAX 2048

static pthread_once_t debug_once = PTHREAD_ONCE_INIT;
static char debug_subsystems[256];

static void read_debug_env(void)
{
    const char *env = getenv("P11KMS_DEBUG");
    if (env != NULL)
        snprintf(debug_subsystems, sizeof(debug_subsystems), ",%s,", env);
}

int p11_log_debug_enabled(const char *subsystem)
{
    char needle[64];

    pthread_once(&debug_once, read_debug_env);
    if (debug_subsystems[0] == '\0')
        return 0;
    if (strstr(debug_subsystems, ",all,") != NULL)
        return 1;
    snprintf(needle, sizeof(needle), ",%s,", subsystem);
    return strstr(debug_subsystems, needle) != NULL;
}

static const char *level_name(p11_log_level level)
{
    switch (level) {
    case P11_LOG_ERROR: return "error";
    case P11_LOG_WARN: return "warn";
    case P11_LOG_INFO: return "info";
    default: return "debug";
    }
}

void p11_log_write(p11_log_level level, const char *subsystem, const char *file, int line,
                   const char *func, const char *fmt, ...)
{
    char buf[LOG_LINE_MAX];
    struct tm tm;
    time_t now = time(NULL);
    size_t n = 0;
    int w;
    va_list ap;

    gmtime_r(&now, &tm);
    n = strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", &tm);
    if (level <= P11_LOG_WARN || level == P11_LOG_DEBUG)
        w = snprintf(buf + n, sizeof(buf) - n, " [%d] %s %s: %s:%d %s: ", (int)getpid(),
                     level_name(level), subsystem, file, line, func);
    else
        w = snprintf(buf + n, sizeof(buf) - n, " [%d] %s %s: ", (int)getpid(),
                     level_name(level), subsystem);
    if (w > 0)
        n += (size_t)w < sizeof(buf) - n ? (size_t)w : sizeof(buf) - n - 1;
    va_start(ap, fmt);
    w = vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
    va_end(ap);
    if (w > 0)
        n += (size_t)w < sizeof(buf) - n ? (size_t)w : sizeof(buf) - n - 1;
    if (n >= sizeof(buf) - 1)
        n = sizeof(buf) - 2;
    buf[n++] = '\n';
    (void)!write(STDERR_FILENO, buf, n);
}
