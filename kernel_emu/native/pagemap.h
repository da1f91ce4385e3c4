/*
 * Which pages of this process's memory the host holds, from /proc/self/pagemap
 * (included by tracer.c's bulk moves and walk.c's restore).
 *
 * Guest RAM is private anonymous memory (kernel_emu.machine.RamBank): a page
 * the host does not hold, neither present nor swapped out, reads as zeros.  A
 * page present but not mapped by this process alone is the host's shared zero
 * page (after a read) or a page shared with a forked parent or child; one mapped
 * by this process alone holds data written here.
 *
 * What a page is, for a zero fill or a restore to zeros (pagemap_zero):
 *   PAGE_ABSENT  the host holds none: zeros already, and leaving it so costs nothing;
 *   PAGE_ZEROS   present, not this process's alone, and reads as zeros: the
 *                host's zero page.  Until this process forks, that is all
 *                such a page can be, and it is not read (a run into ring 3
 *                whose oracles read a segment's fresh pages has hundreds);
 *                from the fork on, in the parent and the child, it is read;
 *   PAGE_DATA    anything else: write it (or give it back).
 * Each module that includes this calls pagemap_setup() when it loads.
 */

#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef PR_GET_MEMORY_MERGE
#define PR_GET_MEMORY_MERGE 68
#endif

#define PAGEMAP_PRESENT (1ULL << 63)
#define PAGEMAP_SWAPPED (1ULL << 62)
#define PAGEMAP_EXCLUSIVE (1ULL << 56)
#define PAGEMAP_HOLDS (PAGEMAP_PRESENT | PAGEMAP_SWAPPED)
#define PAGEMAP_BATCH 512
#define HOST_PAGE 4096ULL

static int pagemap_fd = -1;
static int pagemap_opened = 0;
/* Whether a page of ours that is present but not ours alone may hold data: once
 * this process forked (its pages are then shared with the child, in both), when
 * the host may merge its pages with others' (KSM), or when the host does not say
 * which pages are ours alone.  Until then such a page is the host's zero page. */
static int pagemap_shared = 1;

/* in the parent, before a fork: the child inherits the answer */
static void pagemap_before_fork(void)
{
    pagemap_shared = 1;
}

/* A forked child reads its own pagemap: the parent's descriptor would describe
 * the parent.  (Asking getpid() at every read instead cost a system call per
 * read, more than the read itself took.) */
static void pagemap_forked(void)
{
    if (pagemap_fd >= 0) {
        close(pagemap_fd);
    }
    pagemap_fd = -1;
    pagemap_opened = 0;
}

/* The entries of the `n` (at most PAGEMAP_BATCH) host pages from `page` (page
 * aligned); 0, or -1 when the pagemap cannot be read (not Linux, no /proc). */
static inline int pagemap_read(uintptr_t page, size_t n, uint64_t *entries)
{
    if (!pagemap_opened) {
        pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        pagemap_opened = 1;
    }
    if (pagemap_fd < 0) {
        return -1;
    }
    ssize_t want = (ssize_t)(n * sizeof entries[0]);
    ssize_t got = pread(pagemap_fd, entries, (size_t)want,
                        (off_t)(page / HOST_PAGE * sizeof entries[0]));
    return got == want ? 0 : -1;
}

enum { PAGE_ABSENT, PAGE_ZEROS, PAGE_DATA };

static inline int page_reads_zero(const uint8_t *page)
{
    const uint64_t *w = (const uint64_t *)page;
    for (size_t i = 0; i < HOST_PAGE / 8; i += 8) {
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) {
            return 0;
        }
    }
    return 1;
}

static inline int pagemap_zero(uint64_t entry, const uint8_t *page)
{
    if (!(entry & PAGEMAP_HOLDS)) {
        return PAGE_ABSENT;
    }
    if ((entry & PAGEMAP_PRESENT) && !(entry & PAGEMAP_EXCLUSIVE) &&
        (!pagemap_shared || page_reads_zero(page))) {
        return PAGE_ZEROS;
    }
    return PAGE_DATA;
}

/* When the module loads: learn of forks from now on, and whether the host says
 * which pages are this process's alone (a page just written here must be), and
 * keeps them from being merged. */
static void pagemap_setup(void)
{
    static uint64_t probe[HOST_PAGE / 8] __attribute__((aligned(4096)));
    if (pthread_atfork(pagemap_before_fork, NULL, pagemap_forked) != 0) {
        return; /* forks would go unnoticed: read every shared page */
    }
    int merging = prctl(PR_GET_MEMORY_MERGE, 0, 0, 0, 0);
    *(volatile uint64_t *)probe = 1;
    uint64_t entry = 0;
    if (merging <= 0 && pagemap_read((uintptr_t)probe, 1, &entry) == 0 &&
        (entry & PAGEMAP_PRESENT) && (entry & PAGEMAP_EXCLUSIVE)) {
        pagemap_shared = 0;
    }
}
