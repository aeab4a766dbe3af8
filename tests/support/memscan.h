/*
 * tests/support/memscan.h - search a whole process's memory for secrets.
 *
 * ms_scan reads every readable mapping of a process (/proc/PID/maps, then
 * /proc/PID/mem) and reports each place where one of a set of needles
 * (raw key bytes, their base64, a bearer token...) occurs, whole or as a
 * fragment of at least the needle's min_match bytes (a freed buffer whose
 * first bytes were reused, a token buffer one byte of which was
 * overwritten: half a key is a leak too), with the mapping that holds it
 * (a library's file, [heap], [stack] or an anonymous mapping: malloc
 * arenas of other threads, thread stacks) and the bytes around it, the
 * match itself masked, so that a failure says who owns the copy.
 *
 * Reading another process's memory needs ptrace access: the same uid and
 * a dumpable process, or CAP_SYS_PTRACE (root).  kmsd makes itself
 * non-dumpable (PR_SET_DUMPABLE 0), so only root can scan it: ms_can_scan
 * says whether this process may.
 *
 * Scanning this process itself works too (ms_scan(getpid(), ...)): the
 * scanner's read buffer lives in its own mapping and is skipped, and the
 * caller names the other ranges it must skip (where it keeps the needles)
 * with ms_exclude.
 *
 * A scan that reads nothing finds nothing: give it a control needle, a
 * string the process must hold, and check that it was found.
 *
 * Under AddressSanitizer the shadow memory (terabytes of metadata, no
 * program data) is skipped: any mapping over MS_MAP_MAX is, and counted
 * in bytes_skipped.  A copy that straddles two mappings is found only
 * in the parts (of min_match bytes or more) inside each.
 */
#ifndef P11KMS_TESTS_MEMSCAN_H
#define P11KMS_TESTS_MEMSCAN_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#define MS_NEEDLE_MIN  8   /* shortest needle and shortest min_match */
#define MS_NEEDLE_MAX  256 /* longest needle */
#define MS_MAX_NEEDLES 512
#define MS_MAX_HITS    32
#define MS_MAX_EXCLUDE 8
#define MS_CONTEXT     48                   /* bytes shown on each side of a hit */
#define MS_MAP_MAX     ((uint64_t)64 << 30) /* larger mappings are ASan shadow: skipped */

typedef struct ms_needle {
    const char *label;          /* e.g. "dek 3 base64" */
    const unsigned char *bytes; /* kept by the caller for the scan's duration */
    size_t len;
    size_t min_match; /* shortest fragment that counts; 0: the whole needle */
    int control;      /* expected in memory: counted in control_hits, never a hit */
} ms_needle;

typedef struct ms_hit {
    size_t needle;           /* index into the needles */
    size_t offset, len;      /* the part of the needle found: [offset, offset+len) */
    uint64_t addr;           /* where it is in the target */
    uint64_t map_lo, map_hi; /* the mapping holding it */
    char perms[5];           /* "rw-p" */
    char where[200];         /* mapping path, "[heap]", "[stack]" or "[anon]" */
    unsigned char before[MS_CONTEXT], after[MS_CONTEXT];
    size_t n_before, n_after;
} ms_hit;

typedef struct ms_result {
    uint64_t bytes_scanned;
    uint64_t bytes_skipped;    /* excluded ranges and shadow-sized mappings */
    uint64_t bytes_unreadable; /* mappings the kernel refused to read ([vvar]...) */
    size_t mappings;
    size_t control_hits; /* copies of the control needles */
    size_t n_hits;       /* copies of the others; the first MS_MAX_HITS in hits[] */
    ms_hit hits[MS_MAX_HITS];
} ms_result;

/* 1 if this process may read pid's memory (opens /proc/PID/mem and reads
 * a byte). */
int ms_can_scan(pid_t pid);

/* Skip [addr, addr+len) in the next scans of this process (where the
 * caller keeps its needles).  0, or -1 when the table is full. */
int ms_exclude(const void *addr, size_t len);

/* Forget every ms_exclude range. */
void ms_exclude_clear(void);

/* Scan pid's memory for the needles.  A process other than this one is
 * stopped (SIGSTOP) for the scan and continued after it.  *out itself is
 * skipped (it holds the bytes around each hit).  0, or -1 with a message
 * on stderr (cannot read maps or mem, a needle or min_match out of
 * [MS_NEEDLE_MIN, MS_NEEDLE_MAX], too many needles, out of memory). */
int ms_scan(pid_t pid, const ms_needle *needles, size_t n, ms_result *out);

/* One line per hit kept (needle, part, address, mapping, the bytes around
 * it with the match masked) and a line of totals, on f. */
void ms_report(FILE *f, const char *title, const ms_needle *needles, const ms_result *r);

#endif
