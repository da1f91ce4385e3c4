/*
 * Which pages of this process's memory the host holds, from /proc/self/pagemap
 * (included by tracer.c's bulk moves and walk.c's restore).
 *
 * Guest RAM is private anonymous memory (kernel_emu.machine.RamBank): a page
 * the host does not hold, neither present nor swapped out, reads as zeros.  A
 * page present but not mapped by this process alone is the host's shared zero
 * page (after a read) or a page shared with a forked parent; one mapped by this
 * process alone holds data written here.
 *
 * What a page is, for a zero fill or a restore to zeros (pagemap_zero):
 *   PAGE_ABSENT  the host holds none: zeros already, and leaving it so costs nothing;
 *   PAGE_ZEROS   present, not this process's alone, and reads as zeros (the
 *                host's zero page, hot in the cache: the check is cheap);
 *   PAGE_DATA    anything else: write it (or give it back).
 */

#include <fcntl.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <unistd.h>

#define PAGEMAP_PRESENT (1ULL << 63)
#define PAGEMAP_SWAPPED (1ULL << 62)
#define PAGEMAP_EXCLUSIVE (1ULL << 56)
#define PAGEMAP_HOLDS (PAGEMAP_PRESENT | PAGEMAP_SWAPPED)
#define PAGEMAP_BATCH 512
#define HOST_PAGE 4096ULL

static int pagemap_fd = -1;
static int pagemap_opened = 0;

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
        static int registered = 0;
        if (!registered) {
            registered = pthread_atfork(NULL, NULL, pagemap_forked) == 0;
        }
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
    if ((entry & PAGEMAP_PRESENT) && !(entry & PAGEMAP_EXCLUSIVE) && page_reads_zero(page)) {
        return PAGE_ZEROS;
    }
    return PAGE_DATA;
}
