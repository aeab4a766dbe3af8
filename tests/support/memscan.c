/*
 * tests/support/memscan.c - search a whole process's memory for secrets
 * (see memscan.h).
 *
 * Each readable mapping is searched in owned regions of 1 MiB, each read
 * through /proc/PID/mem with MS_NEEDLE_MAX bytes more on both sides, so a
 * copy that starts in the region is seen whole and its real start is
 * known; a copy is reported by the region it starts in, once.
 *
 * The search: a fragment of at least min_match >= 8 bytes contains a whole
 * aligned 4-byte word of memory within its first 7 bytes, equal to the
 * needle's word at some offset q <= len - min_match + 3.  Those (word,
 * needle, q) entries are sorted by word, with a bitmap of their hashes
 * in front; each aligned word of memory is looked up in the bitmap, and
 * only the rare words that pass are looked up in the entries.  A
 * candidate is extended byte by byte to its maximal match on both sides
 * and reported if long enough, from the first aligned word inside it
 * only (no duplicates).  One pass over memory, whatever the number of
 * needles.  The read buffer is an mmap of its own, skipped when the
 * process scans itself, and wiped after each region.
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

#define OWN         (1u << 20)
#define BITMAP_BITS 20

typedef struct range {
    uint64_t lo, hi;
} range;

typedef struct entry {
    uint32_t word;
    uint32_t needle;
    uint32_t q; /* offset of the word in the needle */
} entry;

typedef struct scanner {
    const ms_needle *needles;
    size_t n;
    entry *entries;
    size_t n_entries;
    uint8_t *bitmap; /* 2^BITMAP_BITS bits */
    unsigned char *buf;
    size_t buf_len;
    range skip[MS_MAX_EXCLUDE + 2];
    size_t n_skip;
    ms_result *out;
    /* the mapping being scanned */
    const char *perms, *where;
    uint64_t map_lo, map_hi;
} scanner;

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

static uint32_t load_word(const unsigned char *p)
{
    uint32_t w;

    memcpy(&w, p, sizeof(w));
    return w;
}

static uint32_t word_hash(uint32_t w)
{
    return (w * 2654435761u) >> (32 - BITMAP_BITS);
}

static int entry_cmp(const void *a, const void *b)
{
    uint32_t x = ((const entry *)a)->word, y = ((const entry *)b)->word;

    return x < y ? -1 : x > y;
}

static size_t min_match(const ms_needle *nd)
{
    return nd->min_match == 0 || nd->min_match > nd->len ? nd->len : nd->min_match;
}

/* A match of needle k: buf[a, a+len) == needle[q, q+len), the buffer
 * holding got bytes of the target from address base. */
static void record_hit(scanner *s, size_t k, uint64_t base, size_t a, size_t q, size_t len,
                       size_t got)
{
    ms_result *r = s->out;
    ms_hit *h;

    if (s->needles[k].control) {
        r->control_hits++;
        return;
    }
    r->n_hits++;
    if (r->n_hits > MS_MAX_HITS)
        return;
    h = &r->hits[r->n_hits - 1];
    h->needle = k;
    h->offset = q;
    h->len = len;
    h->addr = base + a;
    h->map_lo = s->map_lo;
    h->map_hi = s->map_hi;
    snprintf(h->perms, sizeof(h->perms), "%s", s->perms);
    snprintf(h->where, sizeof(h->where), "%s", s->where);
    h->n_before = a < MS_CONTEXT ? a : MS_CONTEXT;
    memcpy(h->before, s->buf + a - h->n_before, h->n_before);
    h->n_after = got - a - len < MS_CONTEXT ? got - a - len : MS_CONTEXT;
    memcpy(h->after, s->buf + a + len, h->n_after);
}

/* Search buf[0, got) (target address base) for copies that start in
 * [own_lo, own_hi). */
static void search(scanner *s, uint64_t base, size_t got, size_t own_lo, size_t own_hi)
{
    const unsigned char *b = s->buf;

    for (size_t j = own_lo & ~(size_t)3; j < own_hi + 3 && j + 4 <= got; j += 4) {
        uint32_t w = load_word(b + j), h = word_hash(w);
        size_t lo = 0, hi = s->n_entries;

        if (!(s->bitmap[h >> 3] & (1u << (h & 7))))
            continue;
        while (lo < hi) { /* the first entry of this word */
            size_t mid = lo + (hi - lo) / 2;
            if (s->entries[mid].word < w)
                lo = mid + 1;
            else
                hi = mid;
        }
        for (size_t e = lo; e < s->n_entries && s->entries[e].word == w; e++) {
            const entry *en = &s->entries[e];
            const ms_needle *nd = &s->needles[en->needle];
            size_t left = 0, right = 0, a, q, len;

            while (left < j && left < en->q && b[j - left - 1] == nd->bytes[en->q - left - 1])
                left++;
            while (j + 4 + right < got && en->q + 4 + right < nd->len &&
                   b[j + 4 + right] == nd->bytes[en->q + 4 + right])
                right++;
            a = j - left;
            q = en->q - left;
            len = left + 4 + right;
            /* Long enough, starting in the owned region, and reported from
             * the first aligned word inside it only. */
            if (len < min_match(nd) || a < own_lo || a >= own_hi || j != ((a + 3) & ~(size_t)3))
                continue;
            record_hit(s, en->needle, base, a, q, len, got);
        }
    }
}

/* Scan [lo, hi) of the target, which is not excluded. */
static void scan_range(scanner *s, int fd, uint64_t lo, uint64_t hi)
{
    for (uint64_t own = lo; own < hi;) {
        uint64_t own_end = hi - own < OWN ? hi : own + OWN;
        uint64_t rd_lo = own - lo < MS_NEEDLE_MAX ? lo : own - MS_NEEDLE_MAX;
        uint64_t rd_hi = hi - own_end < MS_NEEDLE_MAX ? hi : own_end + MS_NEEDLE_MAX;
        ssize_t got = pread(fd, s->buf, (size_t)(rd_hi - rd_lo), (off_t)rd_lo);
        size_t own_lo = (size_t)(own - rd_lo), own_hi = (size_t)(own_end - rd_lo);

        if (got > 0 && (size_t)got < own_hi)
            own_hi = (size_t)got; /* a short read: the rest is unreadable */
        if (got <= 0 || (size_t)got <= own_lo) {
            s->out->bytes_unreadable += own_end - own;
        } else {
            search(s, rd_lo, (size_t)got, own_lo, own_hi);
            s->out->bytes_scanned += own_hi - own_lo;
            s->out->bytes_unreadable += (own_end - own) - (own_hi - own_lo);
            explicit_bzero(s->buf, (size_t)got);
        }
        own = own_end;
    }
}

/* Scan a mapping minus the skip ranges. */
static void scan_mapping(scanner *s, int fd, uint64_t lo, uint64_t hi)
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
        scan_range(s, fd, pos, end);
        pos = end;
    }
}

/* The entries and the bitmap of the needles' words.  0 or -1. */
static int index_needles(scanner *s)
{
    size_t cap = 0;

    for (size_t k = 0; k < s->n; k++) {
        const ms_needle *nd = &s->needles[k];
        if (nd->len < MS_NEEDLE_MIN || nd->len > MS_NEEDLE_MAX || min_match(nd) < MS_NEEDLE_MIN) {
            fprintf(stderr, "memscan: needle %s: length or min_match out of [%d, %d]\n", nd->label,
                    MS_NEEDLE_MIN, MS_NEEDLE_MAX);
            return -1;
        }
        cap += nd->len;
    }
    s->entries = calloc(cap, sizeof(entry));
    s->bitmap = calloc(1, (size_t)1 << (BITMAP_BITS - 3));
    if (s->entries == NULL || s->bitmap == NULL) {
        fprintf(stderr, "memscan: out of memory\n");
        return -1;
    }
    for (size_t k = 0; k < s->n; k++) {
        const ms_needle *nd = &s->needles[k];
        size_t last = nd->len - min_match(nd) + 3;

        for (size_t q = 0; q <= last && q + 4 <= nd->len; q++) {
            entry *en = &s->entries[s->n_entries++];
            uint32_t h;

            en->word = load_word(nd->bytes + q);
            en->needle = (uint32_t)k;
            en->q = (uint32_t)q;
            h = word_hash(en->word);
            s->bitmap[h >> 3] |= (uint8_t)(1u << (h & 7));
        }
    }
    qsort(s->entries, s->n_entries, sizeof(entry), entry_cmp);
    return 0;
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
    s.buf = MAP_FAILED;
    if (n > MS_MAX_NEEDLES) {
        fprintf(stderr, "memscan: more than %d needles\n", MS_MAX_NEEDLES);
        goto out;
    }
    if (index_needles(&s) != 0)
        goto out;
    s.buf_len = OWN + 2 * MS_NEEDLE_MAX;
    s.buf = mmap(NULL, s.buf_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s.buf == MAP_FAILED) {
        fprintf(stderr, "memscan: out of memory\n");
        goto out;
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
        s.perms = perms;
        s.where = where;
        s.map_lo = lo;
        s.map_hi = hi;
        scan_mapping(&s, fd, lo, hi);
    }
    rv = 0;
out:
    if (stopped)
        kill(pid, SIGCONT);
    if (fd >= 0)
        close(fd);
    if (maps != NULL)
        fclose(maps);
    if (s.buf != MAP_FAILED)
        munmap(s.buf, s.buf_len);
    free(s.entries);
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
        const ms_needle *nd = &needles[h->needle];

        fprintf(f, "  %s", nd->label);
        if (h->len < nd->len)
            fprintf(f, " (bytes %zu-%zu of %zu)", h->offset, h->offset + h->len, nd->len);
        fprintf(f, " at 0x%" PRIx64 " in %s (%s %" PRIx64 "-%" PRIx64 ", +0x%" PRIx64 ")\n    [",
                h->addr, h->where, h->perms, h->map_lo, h->map_hi, h->addr - h->map_lo);
        print_bytes(f, h->before, h->n_before);
        fprintf(f, "<%s>", nd->label);
        print_bytes(f, h->after, h->n_after);
        fprintf(f, "]\n");
    }
    if (r->n_hits > shown)
        fprintf(f, "  ... and %zu more\n", r->n_hits - shown);
}
