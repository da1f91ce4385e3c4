/*
 * The number of leaf pages with Present and Dirty under a set of x86-64 page tables that
 * live in one RAM bank: what the watchdog compares at each checkpoint (a page written for
 * the first time since the last one is progress). One walk for both modules: the page
 * walker's count (walk.c, `dirty_leaves` asked for a count) and the tracer's checkpoints,
 * which it decides itself when the run made progress (tracer.c, `checkpoints`).
 *
 * A table outside the bank, more than `max_tables` tables or more than `max_pages` pages
 * make the walk give up (the guest may have written anything into its tables: the caps
 * bound the work). Entries of level `accessed_level` without Accessed are not followed:
 * tables not used since their Accessed bits were cleared hold no Dirty leaf.
 */
#ifndef KERNEL_EMU_DIRTYCOUNT_H
#define KERNEL_EMU_DIRTYCOUNT_H

#include <stdint.h>
#include <string.h>

#define DC_P 1ULL
#define DC_A 0x20ULL
#define DC_D 0x40ULL
#define DC_PS 0x80ULL
#define DC_ADDR_MASK 0x000FFFFFFFFFF000ULL
#define DC_PAGE 4096ULL

typedef struct {
    const uint8_t *ram; /* the bank's bytes, `size` of them, guest-physical `base` on */
    uint64_t base;
    uint64_t size;
    int accessed_level;
    int64_t max_pages;
    int64_t max_tables;
    int64_t npages;
    int64_t ntables;
    int give_up;
} DirtyCount;

static void dirty_count_walk(DirtyCount *d, uint64_t table, int level)
{
    table &= DC_ADDR_MASK;
    if (d->size < DC_PAGE || table < d->base || table - d->base > d->size - DC_PAGE ||
        d->ntables >= d->max_tables) {
        d->give_up = 1;
        return;
    }
    d->ntables++;
    const uint8_t *entries = d->ram + (table - d->base);
    if (level == 1) {
        /* the leaves with Present and Dirty, without a branch per entry */
        int64_t n = 0;
        for (unsigned i = 0; i < 512; i++) {
            uint64_t e;
            memcpy(&e, entries + 8 * i, sizeof e);
            n += (e & (DC_P | DC_D)) == (DC_P | DC_D);
        }
        if (d->max_pages - d->npages < n) {
            d->give_up = 1;
        } else {
            d->npages += n;
        }
        return;
    }
    unsigned shift = 12 + 9 * (unsigned)(level - 1);
    for (unsigned i = 0; i < 512; i++) {
        uint64_t e;
        memcpy(&e, entries + 8 * i, sizeof e);
        if (!(e & DC_P)) {
            continue;
        }
        if ((level == 2 || level == 3) && (e & DC_PS)) {
            if (!(e & DC_D)) {
                continue;
            }
            int64_t pages = (int64_t)((1ULL << shift) / DC_PAGE);
            if (d->max_pages - d->npages < pages) {
                d->give_up = 1;
                return;
            }
            d->npages += pages;
        } else if (level != d->accessed_level || (e & DC_A)) {
            dirty_count_walk(d, e, level - 1);
            if (d->give_up) {
                return;
            }
        }
    }
}

/* The count under the four-level tables at `root`, or -1 when the walk gives up. */
static int64_t dirty_count(const uint8_t *ram, uint64_t base, uint64_t size, uint64_t root,
                           int accessed_level, int64_t max_pages, int64_t max_tables)
{
    if (max_pages < 0) {
        return -1;
    }
    DirtyCount d = {ram, base, size, accessed_level, max_pages, max_tables, 0, 0, 0};
    dirty_count_walk(&d, root, 4);
    return d.give_up ? -1 : d.npages;
}

#endif
