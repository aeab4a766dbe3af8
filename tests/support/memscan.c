/*
 * tests/support/memscan.c - search a whole process's memory for secrets
 * (see memscan.h).
 *
 * Each readable mapping is read through /proc/PID/mem in 1 MiB chunks that
 * overlap by the longest needle, so a copy across a chunk boundary is
 * found too.  A needle of 8 bytes or more that starts at position i holds
 * the aligned 4-byte word at the one multiple of 4 in [i, i+3], at offset
 * 0..3 of the needle.  So a bitmap holds the hashes (20 bits) of the words
 * at offsets 0..3 of every needle, each aligned word of memory is looked
 * up once, and only the rare words that pass are compared with the
 * needles at the four starts they imply: one pass over memory, whatever
 * the number of needles.  The read buffer is an mmap of its own, skipped
 * when the process scans itself, and wiped after each chunk.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "memscan.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define CHUNK       (1u << 20)
#define BITMAP_BITS 20

typedef struct range {
    uint64_t lo, hi;
} range;

static range excluded[MS_MAX_EXCLUDE];
static size_t n_excluded;

int ms_exclude(const void *addr, size_t len)
{
    if (n_excluded == MS_MAX_EXCLUDE)
        return -1;
    excluded[n_excluded].lo = (uint64_t)(uintptr_t)addr;
    excluded[n_excluded].hi = (uint64_t)(uintptr_t)addr + len;
    n_excluded++;
    return 0;
}

void ms_exclude_clear(void)
{
    n_excluded = 0;
}

int ms_can_scan(pid_t pid)
{
    char path[64], line[512], perms[5] = "", b;
    uint64_t lo = 0, hi = 0;
    FILE *maps;
    int fd = -1, ok = 0;

    snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
    maps = fopen(path, "re");
    snprintf(path, sizeof(path), "/proc/%d/mem", (int)pid);
    if (maps == NULL || (fd = open(path, O_RDONLY | O_CLOEXEC)) < 0)
        goto out;
    /* Opening checks ptrace access; reading a byte of the first readable
     * mapping proves it. */
    while (!ok && fgets(line, sizeof(line), maps) != NULL)
        if (sscanf(line, "%" SCNx64 "-%" SCNx64 " %4s", &lo, &hi, perms) == 3 && perms[0] == 'r')
            ok = pread(fd, &b, 1, (off_t)lo) == 1;
out:
    if (fd >= 0)
        close(fd);
    if (maps != NULL)
        fclose(maps);
    return ok;
}

static uint32_t word_hash(const unsigned char *p)
{
    uint32_t k;

    memcpy(&k, p, sizeof(k));
    return (k * 2654435761u) >> (32 - BITMAP_BITS);
}

typedef struct scanner {
    const ms_needle *needles;
    size_t n;
    size_t longest;
    uint8_t *bitmap; /* 2^BITMAP_BITS bits */
    unsigned char *buf;
    size_t buf_len;
    range skip[MS_MAX_EXCLUDE + 2];
    size_t n_skip;
    ms_result *out;
} scanner;

static void record_hit(scanner *s, size_t needle, uint64_t addr, const unsigned char *chunk,
                       size_t chunk_len, size_t off, const char *line_perms, const char *where,
                       uint64_t map_lo, uint64_t map_hi)
{
    ms_result *r = s->out;
    ms_hit *h;
    size_t len = s->needles[needle].len;

    if (s->needles[needle].control) {
        r->control_hits++;
        return;
    }
    r->n_hits++;
    if (r->n_hits > MS_MAX_HITS)
        return;
    h = &r->hits[r->n_hits - 1];
    h->needle = needle;
    h->addr = addr;
    h->map_lo = map_lo;
    h->map_hi = map_hi;
    snprintf(h->perms, sizeof(h->perms), "%s", line_perms);
    snprintf(h->where, sizeof(h->where), "%s", where);
    h->n_before = off < MS_CONTEXT ? off : MS_CONTEXT;
    memcpy(h->before, chunk + off - h->n_before, h->n_before);
    h->n_after = chunk_len - off - len < MS_CONTEXT ? chunk_len - off - len : MS_CONTEXT;
    memcpy(h->after, chunk + off + len, h->n_after);
}

/* Search buf[0, len) (target address base) for needles starting before
 * `limit` (later ones are searched with the next chunk). */
static void search(scanner *s, uint64_t base, size_t len, size_t limit, const char *perms,
                   const char *where, uint64_t map_lo, uint64_t map_hi)
{
    const unsigned char *b = s->buf;

    for (size_t j = 0; j + 4 <= len && j < limit + 3; j += 4) {
        uint32_t h = word_hash(b + j);

        if (!(s->bitmap[h >> 3] & (1u << (h & 7))))
            continue;
        for (size_t o = 0; o < 4 && o <= j; o++) {
            size_t i = j - o;
            if (i >= limit)
                continue;
            for (size_t k = 0; k < s->n; k++) {
                const ms_needle *nd = &s->needles[k];
                if (i + nd->len <= len && memcmp(b + i, nd->bytes, nd->len) == 0)
                    record_hit(s, k, base + i, b, len, i, perms, where, map_lo, map_hi);
            }
        }
    }
}

/* Scan [lo, hi) of the target, which is not excluded. */
static void scan_range(scanner *s, int fd, uint64_t lo, uint64_t hi, const char *perms,
                       const char *where, uint64_t map_lo, uint64_t map_hi)
{
    uint64_t pos = lo;
    size_t overlap = s->longest - 1;

    while (pos < hi) {
        size_t want = hi - pos < s->buf_len ? (size_t)(hi - pos) : s->buf_len;
        ssize_t got = pread(fd, s->buf, want, (off_t)pos);
        size_t limit;

        if (got <= 0) {
            /* Unreadable from here (a guard page, [vvar]): skip a page. */
            uint64_t next = (pos & ~(uint64_t)4095) + 4096;
            if (next > hi)
                next = hi;
            s->out->bytes_unreadable += next - pos;
            pos = next;
            continue;
        }
        /* Positions in the overlap are searched with the next chunk,
         * unless this chunk ends the range. */
        limit = pos + (uint64_t)got >= hi || (size_t)got <= overlap ? (size_t)got
                                                                    : (size_t)got - overlap;
        search(s, pos, (size_t)got, limit, perms, where, map_lo, map_hi);
        s->out->bytes_scanned += limit;
        explicit_bzero(s->buf, (size_t)got);
        pos += limit;
    }
}

/* Scan a mapping minus the skip ranges (sorted: few, so a simple walk). */
static void scan_mapping(scanner *s, int fd, uint64_t lo, uint64_t hi, const char *perms,
                         const char *where)
{
    uint64_t pos = lo;

    while (pos < hi) {
        uint64_t end = hi, next = hi;
        int skipping = 0;

        for (size_t i = 0; i < s->n_skip; i++) {
            const range *x = &s->skip[i];
            if (x->lo <= pos && pos < x->hi) {
                skipping = 1;
                next = x->hi < hi ? x->hi : hi;
                break;
            }
            if (x->lo > pos && x->lo < end)
                end = x->lo;
        }
        if (skipping) {
            s->out->bytes_skipped += next - pos;
            pos = next;
            continue;
        }
        scan_range(s, fd, pos, end, perms, where, lo, hi);
        pos = end;
    }
}

int ms_scan(pid_t pid, const ms_needle *needles, size_t n, ms_result *out)
{
    scanner s;
    char path[64], line[4096];
    FILE *maps = NULL;
    int fd = -1, rv = -1, stopped = 0;

    memset(&s, 0, sizeof(s));
    memset(out, 0, sizeof(*out));
    s.needles = needles;
    s.n = n;
    s.out = out;
    for (size_t k = 0; k < n; k++) {
        if (needles[k].len < MS_NEEDLE_MIN) {
            fprintf(stderr, "memscan: needle %s is shorter than %d bytes\n", needles[k].label,
                    MS_NEEDLE_MIN);
            goto out;
        }
        if (needles[k].len > s.longest)
            s.longest = needles[k].len;
    }
    s.bitmap = calloc(1, (size_t)1 << (BITMAP_BITS - 3));
    s.buf_len = CHUNK;
    s.buf = mmap(NULL, s.buf_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s.bitmap == NULL || s.buf == MAP_FAILED) {
        fprintf(stderr, "memscan: out of memory\n");
        s.buf = MAP_FAILED;
        goto out;
    }
    if (s.longest > s.buf_len / 2) {
        fprintf(stderr, "memscan: needle too long\n");
        goto out;
    }
    for (size_t k = 0; k < n; k++) {
        for (size_t o = 0; o < 4; o++) {
            uint32_t h = word_hash(needles[k].bytes + o);
            s.bitmap[h >> 3] |= (uint8_t)(1u << (h & 7));
        }
    }
    if (pid == getpid()) {
        memcpy(s.skip, excluded, n_excluded * sizeof(range));
        s.n_skip = n_excluded;
        s.skip[s.n_skip].lo = (uint64_t)(uintptr_t)s.buf;
        s.skip[s.n_skip++].hi = (uint64_t)(uintptr_t)s.buf + s.buf_len;
        s.skip[s.n_skip].lo = (uint64_t)(uintptr_t)out;
        s.skip[s.n_skip++].hi = (uint64_t)(uintptr_t)out + sizeof(*out);
    }

    snprintf(path, sizeof(path), "/proc/%d/maps", (int)pid);
    maps = fopen(path, "re");
    snprintf(path, sizeof(path), "/proc/%d/mem", (int)pid);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (maps == NULL || fd < 0) {
        fprintf(stderr, "memscan: cannot open /proc/%d/maps or mem: %s\n", (int)pid,
                strerror(errno));
        goto out;
    }
    if (pid != getpid() && kill(pid, SIGSTOP) == 0)
        stopped = 1;
    while (fgets(line, sizeof(line), maps) != NULL) {
        uint64_t lo, hi;
        char perms[5] = "", where[200] = "";
        int consumed = 0;
        const char *name;

        if (sscanf(line, "%" SCNx64 "-%" SCNx64 " %4s %*s %*s %*s%n", &lo, &hi, perms, &consumed) <
            3)
            continue;
        name = line + consumed;
        while (*name == ' ')
            name++;
        snprintf(where, sizeof(where), "%.*s", (int)strcspn(name, "\n"), name);
        if (where[0] == '\0')
            snprintf(where, sizeof(where), "[anon]");
        if (perms[0] != 'r' || strcmp(where, "[vsyscall]") == 0 || strcmp(where, "[vvar]") == 0)
            continue;
        out->mappings++;
        if (hi - lo > MS_MAP_MAX) {
            out->bytes_skipped += hi - lo;
            continue;
        }
        scan_mapping(&s, fd, lo, hi, perms, where);
    }
    rv = 0;
out:
    if (stopped)
        kill(pid, SIGCONT);
    if (fd >= 0)
        close(fd);
    if (maps != NULL)
        fclose(maps);
    if (s.buf != NULL && s.buf != MAP_FAILED)
        munmap(s.buf, s.buf_len);
    free(s.bitmap);
    return rv;
}

static void print_bytes(FILE *f, const unsigned char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        fputc(p[i] >= 0x20 && p[i] < 0x7f && p[i] != '\\' ? p[i] : '.', f);
}

void ms_report(FILE *f, const char *title, const ms_needle *needles, const ms_result *r)
{
    size_t shown = r->n_hits < MS_MAX_HITS ? r->n_hits : MS_MAX_HITS;

    fprintf(f,
            "memscan %s: %zu copies found (and %zu of the controls); %" PRIu64
            " bytes scanned in %zu mappings, %" PRIu64 " skipped, %" PRIu64 " unreadable\n",
            title, r->n_hits, r->control_hits, r->bytes_scanned, r->mappings, r->bytes_skipped,
            r->bytes_unreadable);
    for (size_t i = 0; i < shown; i++) {
        const ms_hit *h = &r->hits[i];
        fprintf(f,
                "  %s at 0x%" PRIx64 " in %s (%s %" PRIx64 "-%" PRIx64 ", +0x%" PRIx64 ")\n    [",
                needles[h->needle].label, h->addr, h->where, h->perms, h->map_lo, h->map_hi,
                h->addr - h->map_lo);
        print_bytes(f, h->before, h->n_before);
        fprintf(f, "<%s>", needles[h->needle].label);
        print_bytes(f, h->after, h->n_after);
        fprintf(f, "]\n");
    }
    if (r->n_hits > shown)
        fprintf(f, "  ... and %zu more\n", r->n_hits - shown);
}
