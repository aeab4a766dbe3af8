/*
 * module/pin.c - reading the user PIN (P11KMS_PIN or a 0600 pin file) and
 * the secret-memory helpers: page-backed buffers that are mlocked, kept
 * out of core dumps (MADV_DONTDUMP) and wiped with OPENSSL_cleanse before
 * they are unmapped.
 *
 * No state, no locks.  p11_pin_load reads and unsets the environment: call
 * it before starting threads.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "internal.h"

#define PIN_BUF_LEN (P11_PIN_MAX + 1)

static size_t page_round(size_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t p = page > 0 ? (size_t)page : 4096;

    return (len + p - 1) / p * p;
}

void *p11_secret_alloc(size_t len)
{
    size_t n = page_round(len ? len : 1);
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (p == MAP_FAILED)
        return NULL;
    if (mlock(p, n) != 0)
        LOG_DEBUG(P11_LOG_SUB, "mlock: %s (continuing unlocked)", strerror(errno));
#ifdef MADV_DONTDUMP
    (void)madvise(p, n, MADV_DONTDUMP);
#endif
    return p; /* anonymous mappings start zeroed */
}

void p11_secret_free(void *p, size_t len)
{
    size_t n;

    if (p == NULL)
        return;
    n = page_round(len ? len : 1);
    OPENSSL_cleanse(p, n);
    (void)munlock(p, n);
    (void)munmap(p, n);
}

void p11_pin_free(char *pin)
{
    p11_secret_free(pin, PIN_BUF_LEN);
}

/* Strip one trailing "\n" or "\r\n". */
static size_t strip_newline(char *s, size_t n)
{
    if (n > 0 && s[n - 1] == '\n')
        s[--n] = '\0';
    if (n > 0 && s[n - 1] == '\r')
        s[--n] = '\0';
    return n;
}

static CK_RV pin_from_env(char *buf, size_t *len)
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    char *env = getenv("P11KMS_PIN");
    size_t n = strlen(env);

    if (n > P11_PIN_MAX) {
        LOG_ERROR(P11_LOG_SUB, "P11KMS_PIN is longer than %d bytes", P11_PIN_MAX);
        goto out;
    }
    memcpy(buf, env, n);
    *len = n;
    rv = CKR_OK;
out:
    OPENSSL_cleanse(env, n); /* wipe the value in the environment block */
    unsetenv("P11KMS_PIN");
    return rv;
}

static CK_RV pin_from_file(const char *path, char *buf, size_t *len)
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    int fd = -1;
    struct stat st;
    size_t n = 0;
    ssize_t r;

    fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY);
    if (fd < 0) {
        LOG_ERROR(P11_LOG_SUB, "cannot open the PIN file %s: %s", path, strerror(errno));
        goto out;
    }
    if (fstat(fd, &st) != 0) {
        LOG_ERROR(P11_LOG_SUB, "cannot stat the PIN file %s: %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        LOG_ERROR(P11_LOG_SUB, "the PIN file %s is not a regular file", path);
        goto out;
    }
    if (st.st_uid != geteuid() && st.st_uid != 0) {
        LOG_ERROR(P11_LOG_SUB, "the PIN file %s is owned by uid %lu, not by us or root", path,
                  (unsigned long)st.st_uid);
        goto out;
    }
    if (st.st_mode & (S_IRWXG | S_IRWXO)) {
        LOG_ERROR(P11_LOG_SUB,
                  "the PIN file %s has mode %04o: group and others must have no access "
                  "(chmod 600)",
                  path, (unsigned)(st.st_mode & 07777));
        goto out;
    }
    for (;;) {
        r = read(fd, buf + n, PIN_BUF_LEN - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            LOG_ERROR(P11_LOG_SUB, "cannot read the PIN file %s: %s", path, strerror(errno));
            goto out;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n == PIN_BUF_LEN) {
            LOG_ERROR(P11_LOG_SUB, "the PIN file %s is longer than %d bytes", path, P11_PIN_MAX);
            goto out;
        }
    }
    *len = n;
    rv = CKR_OK;
out:
    if (fd >= 0)
        close(fd);
    return rv;
}

CK_RV p11_pin_load(const char *pin_file, char **pin)
{
    CK_RV rv = CKR_ARGUMENTS_BAD;
    char *buf = NULL;
    const char *env = getenv("P11KMS_PIN");
    size_t n = 0;

    if (pin == NULL)
        goto out;
    buf = p11_secret_alloc(PIN_BUF_LEN);
    if (buf == NULL) {
        rv = CKR_HOST_MEMORY;
        goto out;
    }
    if (env != NULL && *env != '\0') {
        rv = pin_from_env(buf, &n);
    } else if (pin_file != NULL && *pin_file != '\0') {
        rv = pin_from_file(pin_file, buf, &n);
    } else {
        LOG_ERROR(P11_LOG_SUB, "no PIN: set pin_file or P11KMS_PIN");
        goto out;
    }
    if (rv != CKR_OK)
        goto out;
    n = strip_newline(buf, n);
    if (n == 0) {
        LOG_ERROR(P11_LOG_SUB, "the PIN is empty");
        rv = CKR_ARGUMENTS_BAD;
        goto out;
    }
    if (memchr(buf, '\0', n) != NULL) {
        LOG_ERROR(P11_LOG_SUB, "the PIN contains a NUL byte");
        rv = CKR_ARGUMENTS_BAD;
        goto out;
    }
    buf[n] = '\0';
    *pin = buf;
    buf = NULL;
out:
    p11_secret_free(buf, PIN_BUF_LEN);
    return rv;
}
