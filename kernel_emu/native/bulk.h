/*
 * Bulk memory fast path of the tracer's code hook (included by tracer.c).
 *
 * The guest's memset/memcpy move their bulk with `rep stosq` / `rep movsq`.
 * With a code hook installed Unicorn runs such an instruction one iteration
 * per translation block, hook call included: a 16 MiB memset is two million
 * iterations, ~100 ms.  When the code hook is about to let one of the owner's
 * bulk sites run, bulk_forward performs as many of the remaining iterations
 * as it can prove equivalent directly on guest RAM, and leaves the guest's
 * registers, the page tables' Accessed/Dirty bits, the instruction count, the
 * recent blocks, the edge coverage and the dirty-page set exactly as the
 * iterations would have.  The guest then runs the current iteration (or the
 * final check, with rcx = 0) itself, so anything the proof does not cover
 * (a fault, a budget stop, an unusual mapping) happens in the guest as
 * before, at the same iteration.
 *
 * An iteration is taken over only if all of these hold:
 *   - ring 0, DF clear, long mode with 4-level paging, no SMAP, PKE or LA57;
 *   - every page it touches has a present 4 KiB translation whose tables and
 *     frame lie in RAM (no reserved bits, no large pages), writable at every
 *     level and non-executable for stores, so no translated code can change;
 *   - the destination (and source) frames are contiguous in one RAM bank, and
 *     no stored-to frame is one of the page tables used by the translation;
 *   - for movsq, the source bytes are not written by an earlier iteration of
 *     the same range (a forward copy onto itself is left to the guest);
 *   - the budget leaves room for it (the count advances by one per iteration,
 *     as the guest's own code hook calls would have).
 * Memory hooks do not see these accesses: the owner must not install bulk
 * sites while a memory hook watches data the routines may touch.
 *
 * A zero fill in a bank whose absent pages read as zeros (a private anonymous
 * mapping, Bank.absent_zero) leaves alone the whole pages known to hold zeros
 * already, and names them (take_left_absent) so that the snapshot restore
 * gives them back to the host rather than clearing them.  A loader that zeroes
 * megabytes of fresh frames a run otherwise spent a quarter of a fuzzing job's
 * time clearing them twice: in the fill and in the restore.  A page is known
 * to hold zeros
 *   - on the guest's word (zeros_known): the snapshot has it as zeros, only
 *     the guest writes it, and its leaf in the identity tables has Dirty
 *     clear, so nothing stored to it since the restore; the owner checks after
 *     the run that the dirty-page log vouches for those bits (trust_zeros);
 *   - or on the host's, in a fill of at least ABSENT_MIN_PAGES pages: it holds
 *     no page there, or its zero page (/proc/self/pagemap).
 * A copy leaves alone, and names, the whole pages where it would write zeros
 * over zeros: it reads both sides, or asks the host about the destination as a
 * long fill does (copy_held).
 * Every other page is written, so the memory is the same either way.
 */

#include "pagemap.h"

#define PTE_P 0x1ULL
#define PTE_W 0x2ULL
#define PTE_U 0x4ULL
#define PTE_A 0x20ULL
#define PTE_D 0x40ULL
#define PTE_PS 0x80ULL
#define PTE_NX (1ULL << 63)
#define PTE_FRAME 0x000FFFFFFFFFF000ULL
/* Physical address bits the tables may not use (above any RAM we map). */
#define PTE_HIGH_FRAME 0x000FFF0000000000ULL
#define CR4_PAE (1ULL << 5)
#define CR4_LA57 (1ULL << 12)
#define CR4_SMAP (1ULL << 21)
#define CR4_PKE (1ULL << 22)
#define EFER_LMA (1ULL << 10)
#define EFER_NXE (1ULL << 11)
#define RFLAGS_DF (1ULL << 10)
#define MSR_EFER 0xC0000080u
#define BULK_TABLES_MAX 64
/* Iterations examined per call (2 MiB): the scan costs a page walk per page
 * whether or not it ends up used, so a huge rcx (a runaway copy) must not make
 * every call walk all of RAM; a longer move takes a call per window.  Two
 * windows' tables stay far below BULK_TABLES_MAX. */
#define BULK_WINDOW_UNITS (1ULL << 18)
/* After this many emulated block entries the ring holds only the site and
 * its self-edge counter has saturated: further entries change nothing else. */
#define BULK_BLOCKS_REPLAYED (RING_SIZE + 256)
/* Console bytes put per call: a log line is a few hundred at most */
#define CONSOLE_WINDOW 4096

typedef struct {
    uint64_t frames[BULK_TABLES_MAX];
    uint32_t n;
} TableSet;

typedef struct {
    uint32_t rid;
    uint64_t value;
} MsrValue;

/* The walks of a call's first pages, kept for the rest of the call: a page-sized move walks
 * its page once instead of three times (to prove the span, to ask whether a zero fill may
 * leave it alone, to set Accessed and Dirty).  Exact, because nothing the call does between
 * those walks changes what they read but Accessed and Dirty bits: it stores only outside
 * every table it walked (bulk_forward truncates the move before any), and a walk that marks
 * re-reads each entry before it sets a bit, as the walk it stands for would. */
#define BULK_MEMO_PAGES 4

typedef struct {
    uint64_t va;      /* the virtual page */
    uint64_t frame;   /* its frame */
    uint64_t leaf;    /* its leaf entry as the walk read it, before any marking */
    uint8_t *slot[4]; /* the entry read at each level, top level first */
} WalkedPage;

typedef struct {
    WalkedPage pages[BULK_MEMO_PAGES];
    uint32_t n;
} WalkMemo;

static const WalkedPage *memo_find(const WalkMemo *memo, uint64_t va)
{
    if (memo != NULL) {
        for (uint32_t i = 0; i < memo->n; i++) {
            if (memo->pages[i].va == va) {
                return &memo->pages[i];
            }
        }
    }
    return NULL;
}

/* Zero fills of fewer whole pages are written without asking (a read of the
 * pagemap costs a system call, several small memsets' worth). */
#define ABSENT_MIN_PAGES 16

/* Note the page at host address `page` of bank `b` as left to the host. */
static void note_absent(TracerState *s, uint32_t b, uintptr_t page)
{
    size_t index = (size_t)((page - (uintptr_t)s->banks[b].host) >> PAGE_SHIFT);
    size_t byte = index / 8;
    if (s->absent[b] == NULL || byte >= s->absent_len[b]) {
        return;
    }
    s->absent[b][byte] |= (uint8_t)(1u << (index % 8));
    if (s->absent_hi[b] <= s->absent_lo[b]) {
        s->absent_lo[b] = byte;
        s->absent_hi[b] = byte + 1;
    } else {
        s->absent_lo[b] = byte < s->absent_lo[b] ? byte : s->absent_lo[b];
        s->absent_hi[b] = byte + 1 > s->absent_hi[b] ? byte + 1 : s->absent_hi[b];
    }
}

/* Where [phys, phys + size) lies in bank `b` on the host, or NULL if not wholly inside it. */
static inline uint8_t *in_bank(const Bank *b, uint64_t phys, uint64_t size)
{
    if (phys >= b->base && phys - b->base <= b->size && size <= b->size - (phys - b->base)) {
        return b->host + (phys - b->base);
    }
    return NULL;
}

static uint8_t *bank_host(TracerState *s, uint64_t phys, uint64_t size, uint32_t *bank)
{
    for (uint32_t i = 0; i < s->nbanks; i++) {
        uint8_t *host = in_bank(&s->banks[i], phys, size);
        if (host != NULL) {
            if (bank != NULL) {
                *bank = i;
            }
            return host;
        }
    }
    return NULL;
}

/* bank_host for a page walk's reads, inline: nearly all of them lie in the first bank (RAM
 * from 0), which bank_host looks at first too */
static inline uint8_t *walk_host(TracerState *s, uint64_t phys, uint64_t size)
{
    uint8_t *host = s->nbanks > 0 ? in_bank(&s->banks[0], phys, size) : NULL;
    return host != NULL ? host : bank_host(s, phys, size, NULL);
}

static int tables_add(TableSet *t, uint64_t frame)
{
    for (uint32_t i = 0; i < t->n; i++) {
        if (t->frames[i] == frame) {
            return 1;
        }
    }
    if (t->n == BULK_TABLES_MAX) {
        return 0;
    }
    t->frames[t->n++] = frame;
    return 1;
}

/* The frame behind virtual page `va`, or UINT64_MAX when the fast path cannot
 * vouch for the access.  With `mark`, sets Accessed at every level and Dirty
 * in the leaf for a store, as QEMU's page walker does.  With `walked`, what a
 * later walk of the same page in the same call needs (WalkMemo): its entries'
 * places here, its va and frame once the walk succeeds (its leaf is `leaf`). */
static uint64_t walk_page(TracerState *s, uint64_t cr3, uint64_t va, int store, int nxe,
                          TableSet *tables, int mark, uint64_t *leaf, WalkedPage *walked)
{
    uint64_t table = cr3 & PTE_FRAME;
    uint64_t allowed = PTE_W, nx = 0;
    for (int level = 4; level >= 1; level--) {
        uint64_t index = (va >> (PAGE_SHIFT + 9 * (level - 1))) & 511;
        uint8_t *slot = walk_host(s, table + index * 8, 8);
        if (slot == NULL || (tables != NULL && !tables_add(tables, table))) {
            return UINT64_MAX;
        }
        if (walked != NULL) {
            walked->slot[4 - level] = slot;
        }
        uint64_t e;
        memcpy(&e, slot, 8);
        /* bit 7 is PS above the leaf level (large pages are left to the guest) and PAT,
         * harmless here, in a leaf */
        if (!(e & PTE_P) || ((e & PTE_PS) && level > 1) || (e & PTE_HIGH_FRAME) ||
            ((e & PTE_NX) && !nxe)) {
            return UINT64_MAX;
        }
        allowed &= e;
        nx |= e & PTE_NX;
        if (level == 1 && leaf != NULL) {
            *leaf = e; /* as it was before this walk marked it */
        }
        if (mark) {
            uint64_t bits = PTE_A | (level == 1 && store ? PTE_D : 0);
            if ((e & bits) != bits) {
                e |= bits;
                memcpy(slot, &e, 8);
            }
        }
        table = e & PTE_FRAME;
    }
    if (store && (!(allowed & PTE_W) || !nx)) {
        return UINT64_MAX;
    }
    if (walk_host(s, table, 1ULL << PAGE_SHIFT) == NULL) {
        return UINT64_MAX;
    }
    if (walked != NULL) {
        walked->va = va;
        walked->frame = table;
    }
    return table;
}

static uint64_t bulk_translate(TracerState *s, uint64_t cr3, uint64_t va, int store, int nxe,
                               TableSet *tables, int mark, uint64_t *leaf)
{
    return walk_page(s, cr3, va, store, nxe, tables, mark, leaf, NULL);
}

/* Set Accessed at every level of a page walked before in this call, and Dirty in its leaf
 * for a store: what a marking walk of it does (it can only succeed again). */
static void memo_mark(const WalkedPage *walked, int store)
{
    for (int k = 0; k < 4; k++) {
        uint64_t bits = PTE_A | (k == 3 && store ? PTE_D : 0);
        uint64_t e;
        memcpy(&e, walked->slot[k], 8);
        if ((e & bits) != bits) {
            e |= bits;
            memcpy(walked->slot[k], &e, 8);
        }
    }
}

/* Whether a zero fill may leave the whole page at guest-virtual `va` (frame
 * `frame` of bank `b`) alone on the guest's own word, without asking the host:
 * the snapshot has it as zeros and only the guest writes it (zero_bits), the
 * fill runs on the identity tables (which map each page at its own address
 * only), and the page's leaf there has Dirty clear, so nothing stored to it
 * since the restore.  That holds only if every store of the run so far went
 * through those tables, which the dirty-page log vouches for after the run
 * (kernel_emu.dirtylog): the owner runs the input again without trusting the
 * guest's word (trust_zeros(None)) where it cannot. */
static int zeros_known(TracerState *s, uint32_t b, uint64_t cr3, uint64_t va, uint64_t frame,
                       int nxe, const WalkMemo *memo)
{
    if (!s->zeros_trusted || b != 0 || va != frame || (cr3 & PTE_FRAME) != s->identity_cr3) {
        return 0;
    }
    uint64_t index = (frame - s->banks[0].base) >> PAGE_SHIFT;
    if (index / 8 >= s->zero_len || !(s->zero_bits[index / 8] >> (index % 8) & 1)) {
        return 0;
    }
    const WalkedPage *walked = memo_find(memo, va);
    if (walked != NULL) { /* a store's walk of this page, nothing marked since */
        return walked->frame == frame && !(walked->leaf & PTE_D);
    }
    uint64_t leaf = PTE_D;
    return bulk_translate(s, cr3, va, 1, nxe, NULL, 0, &leaf) == frame && !(leaf & PTE_D);
}

/* Zero `count` whole pages from host address `at` (bank `b`, whose absent
 * pages read as zeros): with enough of them to pay for the system call, only
 * the pages the host holds are written, the others noted. */
static uint64_t zero_held(TracerState *s, uint32_t b, uintptr_t at, size_t count)
{
    if (count < ABSENT_MIN_PAGES) {
        memset((void *)at, 0, count * HOST_PAGE);
        return 0;
    }
    uint64_t left_alone = 0;
    uint64_t entries[PAGEMAP_BATCH];
    for (uintptr_t page = at, last = at + count * HOST_PAGE; page < last;) {
        size_t n = (last - page) / HOST_PAGE;
        n = n < PAGEMAP_BATCH ? n : PAGEMAP_BATCH;
        if (pagemap_read(page, n, entries) != 0) {
            memset((void *)page, 0, last - page);
            break;
        }
        /* each page looked at once: the pages to write, in one memset, then the one that
         * ended them, left alone */
        for (size_t i = 0; i < n;) {
            size_t j = i;
            while (j < n &&
                   pagemap_zero(entries[j], (const uint8_t *)(page + j * HOST_PAGE)) == PAGE_DATA) {
                j++;
            }
            if (j > i) {
                memset((void *)(page + i * HOST_PAGE), 0, (j - i) * HOST_PAGE);
            }
            if (j < n) {
                note_absent(s, b, page + j * HOST_PAGE);
                left_alone++;
            }
            i = j + 1;
        }
        page += n * HOST_PAGE;
    }
    return left_alone;
}

/* Whether the `n` bytes at `p` (any alignment) are all zero: a word at a time, given up
 * at the first 512 bytes that are not. */
static int bytes_read_zero(const uint8_t *p, size_t n)
{
    uint64_t any = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t w;
        memcpy(&w, p + i, 8);
        any |= w;
        if (any && (i & 511) == 504) {
            return 0;
        }
    }
    for (; i < n; i++) {
        any |= p[i];
    }
    return any == 0;
}

/* Copy `bytes` from `from` to `to` (bank `b`, whose absent pages read as zeros; `to` no
 * higher than `from`, or apart: the forward copy).  A whole destination page that reads as
 * zeros, whose source bytes read as zeros too, is left alone and noted, as a zero fill leaves
 * it: the copy would write zeros over zeros, and writing them would make the host fault in a
 * page of its own there, which the restore would then give back (zeros read past a file's end
 * into fresh frames, say, that a fill has just left to the host).  In a copy of enough whole
 * pages to pay for the system call, the host says which destination pages it holds none of
 * (or only its zero page), which need not be read.  Returns the pages left alone. */
static uint64_t copy_held(TracerState *s, uint32_t b, uint8_t *to, const uint8_t *from,
                          uint64_t bytes)
{
    uintptr_t start = (uintptr_t)to, end = start + (uintptr_t)bytes;
    uintptr_t first = (start + HOST_PAGE - 1) & ~(uintptr_t)(HOST_PAGE - 1);
    uintptr_t last = end & ~(uintptr_t)(HOST_PAGE - 1);
    if (last <= first || s->absent[b] == NULL) {
        memmove(to, from, (size_t)bytes);
        return 0;
    }
    memmove(to, from, first - start);
    int ask = (last - first) / HOST_PAGE >= ABSENT_MIN_PAGES;
    uint64_t left_alone = 0;
    uint64_t entries[PAGEMAP_BATCH];
    for (uintptr_t page = first; page < last;) {
        size_t n = (last - page) / HOST_PAGE;
        n = n < PAGEMAP_BATCH ? n : PAGEMAP_BATCH;
        const uint8_t *src = from + (page - start);
        int asked = ask && pagemap_read(page, n, entries) == 0;
        /* each page looked at once (its source read once): the pages to write, in one
         * copy, then the one that ended them, left alone */
        for (size_t i = 0; i < n;) {
            size_t j = i;
            while (j < n) {
                const uint8_t *dst = (const uint8_t *)(page + j * HOST_PAGE);
                if (bytes_read_zero(src + j * HOST_PAGE, HOST_PAGE) &&
                    ((asked && pagemap_zero(entries[j], dst) != PAGE_DATA) ||
                     page_reads_zero(dst))) {
                    break;
                }
                j++;
            }
            if (j > i) {
                memmove((void *)(page + i * HOST_PAGE), src + i * HOST_PAGE,
                        (j - i) * HOST_PAGE);
            }
            if (j < n) {
                note_absent(s, b, page + j * HOST_PAGE);
                left_alone++;
            }
            i = j + 1;
        }
        page += n * HOST_PAGE;
    }
    memmove((void *)last, from + (last - start), end - last);
    return left_alone;
}

/* Zero `bytes` at `to`: guest-virtual `va`, guest-physical `phys` in bank `b`,
 * whose absent pages read as zeros.  Whole pages known to hold zeros already
 * (zeros_known, or the host holds none: zero_held) are left alone and noted
 * (take_left_absent), so the restore gives them back again rather than
 * clearing them.  Returns the pages left alone. */
static uint64_t zero_fill(TracerState *s, uint32_t b, uint8_t *to, uint64_t bytes, uint64_t cr3,
                          uint64_t va, uint64_t phys, int nxe, const WalkMemo *memo)
{
    uintptr_t start = (uintptr_t)to, end = start + (uintptr_t)bytes;
    uintptr_t first = (start + HOST_PAGE - 1) & ~(uintptr_t)(HOST_PAGE - 1);
    uintptr_t last = end & ~(uintptr_t)(HOST_PAGE - 1);
    if (last <= first) {
        memset(to, 0, (size_t)bytes);
        return 0;
    }
    memset(to, 0, first - start);
    uint64_t left_alone = 0, offset = first - start;
    uintptr_t unknown = first; /* the pages from here to `page` are not known */
    for (uintptr_t page = first; page < last; page += HOST_PAGE) {
        uint64_t at = offset + (page - first);
        if (zeros_known(s, b, cr3, va + at, phys + at, nxe, memo)) {
            left_alone += zero_held(s, b, unknown, (page - unknown) / HOST_PAGE);
            note_absent(s, b, page);
            s->zeros_taken++;
            left_alone++;
            unknown = page + HOST_PAGE;
        }
    }
    left_alone += zero_held(s, b, unknown, (last - unknown) / HOST_PAGE);
    memset((void *)last, 0, end - last);
    return left_alone;
}

/* How many of `want` 8-byte units from `va` lie on pages the fast path can
 * vouch for, physically contiguous in one bank; their first physical byte. */
static uint64_t bulk_span(TracerState *s, uint64_t cr3, uint64_t va, uint64_t want, int store,
                          int nxe, TableSet *tables, uint64_t *phys, WalkMemo *memo)
{
    memo->n = 0;
    /* stay inside the canonical half that holds va: beyond it is #GP */
    uint64_t limit;
    if (va < (1ULL << 47)) {
        limit = (1ULL << 47) - va;
    } else if (va >= 0xFFFF800000000000ULL) {
        limit = 0 - va; /* bytes to 2^64; 0 means all of them */
        if (limit == 0) {
            limit = UINT64_MAX;
        }
    } else {
        return 0;
    }
    if (want > limit / 8) {
        want = limit / 8;
    }
    if (want == 0) {
        return 0;
    }
    uint64_t first_page = va & ~((1ULL << PAGE_SHIFT) - 1);
    uint64_t last_page = (va + want * 8 - 1) & ~((1ULL << PAGE_SHIFT) - 1);
    uint64_t base = walk_page(s, cr3, first_page, store, nxe, tables, 0, &memo->pages[0].leaf,
                              &memo->pages[0]);
    uint32_t bank;
    if (base == UINT64_MAX || bank_host(s, base, 1, &bank) == NULL) {
        return 0;
    }
    memo->n = 1;
    uint64_t good_end = first_page + (1ULL << PAGE_SHIFT);
    for (uint64_t page = first_page + (1ULL << PAGE_SHIFT); page != last_page + (1ULL << PAGE_SHIFT);
         page += 1ULL << PAGE_SHIFT) {
        WalkedPage *walked = memo->n < BULK_MEMO_PAGES ? &memo->pages[memo->n] : NULL;
        uint64_t frame = walk_page(s, cr3, page, store, nxe, tables, 0,
                                   walked != NULL ? &walked->leaf : NULL, walked);
        if (walked != NULL && frame != UINT64_MAX) {
            memo->n++;
        }
        uint32_t other;
        if (frame != base + (page - first_page) || bank_host(s, frame, 1, &other) == NULL ||
            other != bank) {
            break;
        }
        good_end = page + (1ULL << PAGE_SHIFT);
    }
    *phys = base + (va - first_page);
    uint64_t units = (good_end - va) / 8;
    return units < want ? units : want;
}

static void bulk_mark(TracerState *s, uint64_t cr3, uint64_t va, uint64_t bytes, int store,
                      int nxe, const WalkMemo *memo)
{
    uint64_t page = va & ~((1ULL << PAGE_SHIFT) - 1);
    uint64_t last = (va + bytes - 1) & ~((1ULL << PAGE_SHIFT) - 1);
    for (;; page += 1ULL << PAGE_SHIFT) {
        const WalkedPage *walked = memo_find(memo, page);
        if (walked != NULL) {
            memo_mark(walked, store);
        } else {
            (void)bulk_translate(s, cr3, page, store, nxe, NULL, 1, NULL);
        }
        if (page == last) {
            break;
        }
    }
}

static void bulk_refuse(TracerState *s, uint64_t site, uint64_t rcx, uint64_t rdi, uint64_t rsi)
{
    s->memo_site = site;
    s->memo_rcx = rcx;
    s->memo_dst_page = rdi >> PAGE_SHIFT;
    s->memo_src_page = rsi >> PAGE_SHIFT;
}

/* Whether the guest runs in ring 0 of 4-level long mode with DF clear and none of
 * the paging features the walks here leave out (1, with its cr3 and NXE), or not (0);
 * -1 when a register cannot be read. */
static int plain_long_mode(TracerState *s, void *uc, uint64_t *cr3, int *nxe)
{
    uint64_t rflags = 0, cs = 0, cr0 = 0, cr4 = 0;
    MsrValue efer = {MSR_EFER, 0};
    if (s->reg_read(uc, UC_X86_REG_RFLAGS, &rflags) != 0 ||
        s->reg_read(uc, UC_X86_REG_CS, &cs) != 0 || s->reg_read(uc, UC_X86_REG_CR0, &cr0) != 0 ||
        s->reg_read(uc, UC_X86_REG_CR3, cr3) != 0 || s->reg_read(uc, UC_X86_REG_CR4, &cr4) != 0 ||
        s->reg_read(uc, UC_X86_REG_MSR, &efer) != 0) {
        return -1;
    }
    if ((cs & 3) != 0 || (rflags & RFLAGS_DF) || !(cr0 & CR0_PG) || !(cr4 & CR4_PAE) ||
        (cr4 & (CR4_LA57 | CR4_SMAP | CR4_PKE)) || !(efer.value & EFER_LMA)) {
        return 0;
    }
    *nxe = (efer.value & EFER_NXE) != 0;
    return 1;
}

/* The block entries of `units` iterations of the one-instruction block at `site`
 * that the hook performed itself: each iteration the guest would have run re-enters
 * the instruction as a block of its own.  The first entry comes from the block
 * before; every later one is the site's edge to itself: the ring's last entries
 * become the site and that counter goes up, saturating, as record_block would have
 * done one entry at a time. */
static void account_entries(TracerState *s, uint64_t site, uint64_t units)
{
    uint64_t replay = units < BULK_BLOCKS_REPLAYED ? units : BULK_BLOCKS_REPLAYED;
    record_block(s, site);
    uint64_t more = replay - 1;
    uint64_t fill = more < RING_SIZE ? more : RING_SIZE;
    for (uint64_t i = more - fill; i < more; i++) {
        s->ring[(s->ring_pos + i) & (RING_SIZE - 1)] = site;
    }
    s->ring_pos += more;
    if (s->coverage_on && more > 0) {
        uint32_t cur = (uint32_t)((site * COVERAGE_MULTIPLIER) >> 48);
        map_line_touched(s, cur ^ s->prev_loc); /* prev_loc is cur >> 1 by now */
        uint8_t *counter = &s->map[cur ^ s->prev_loc];
        uint64_t v = *counter + more;
        *counter = (uint8_t)(v > 0xff ? 0xff : v);
    }
    s->ring_pos += units - replay;
}

static NOINLINE void bulk_forward(TracerState *s, void *uc, uint64_t site, int kind)
{
    uint64_t rcx = 0, rdi = 0, rsi = 0, rax = 0, cr3 = 0;
    if (!s->bulk_on || s->reg_write == NULL || s->reg_read(uc, UC_X86_REG_RCX, &rcx) != 0 ||
        rcx == 0 || s->reg_read(uc, UC_X86_REG_RDI, &rdi) != 0 ||
        s->reg_read(uc, UC_X86_REG_RSI, &rsi) != 0) {
        return;
    }
    if (site == s->memo_site && rcx < s->memo_rcx && rdi >> PAGE_SHIFT == s->memo_dst_page &&
        (kind == BULK_STOSQ || rsi >> PAGE_SHIFT == s->memo_src_page)) {
        return;
    }
    int nxe = 0;
    if (s->reg_read(uc, UC_X86_REG_RAX, &rax) != 0) {
        return;
    }
    int mode = plain_long_mode(s, uc, &cr3, &nxe);
    if (mode <= 0) {
        if (mode == 0) {
            bulk_refuse(s, site, rcx, rdi, rsi);
        }
        return;
    }
    /* > 0: the code hook checked icount < budget <= bulk_limit */
    uint64_t room = s->bulk_limit - s->icount;
    uint64_t want = rcx < room ? rcx : room;
    want = want < BULK_WINDOW_UNITS ? want : BULK_WINDOW_UNITS;
    TableSet tables = {.n = 0};
    WalkMemo stores, loads; /* the pages walked for the destination, the source */
    uint64_t dst = 0, src = 0;
    uint64_t units = bulk_span(s, cr3, rdi, want, 1, nxe, &tables, &dst, &stores);
    if (kind == BULK_MOVSQ && units > 0) {
        uint64_t readable = bulk_span(s, cr3, rsi, units, 0, nxe, &tables, &src, &loads);
        units = readable < units ? readable : units;
        /* a forward copy onto a higher overlapping address reads bytes that
         * earlier iterations wrote: only the iterations before that point */
        if (units > 0 && dst > src && dst - src < units * 8) {
            units = (dst - src) / 8;
        }
    }
    for (uint32_t i = 0; i < tables.n && units > 0; i++) {
        uint64_t t = tables.frames[i];
        if (t + (1ULL << PAGE_SHIFT) > dst && t < dst + units * 8) {
            units = t > dst ? (t - dst) / 8 : 0;
        }
    }
    if (units == 0) {
        bulk_refuse(s, site, rcx, rdi, rsi);
        return;
    }
    uint64_t bytes = units * 8;
    uint32_t to_bank = 0;
    uint8_t *to = bank_host(s, dst, bytes, &to_bank);
    if (kind == BULK_MOVSQ) {
        /* dst <= src or disjoint: memmove equals the forward qword copy */
        const uint8_t *from = bank_host(s, src, bytes, NULL);
        if (s->banks[to_bank].absent_zero) {
            uint64_t left = copy_held(s, to_bank, to, from, bytes);
            s->pages_left_absent += left;
            s->copies_left_absent += left;
        } else {
            memmove(to, from, (size_t)bytes);
        }
        bulk_mark(s, cr3, rsi, bytes, 0, nxe, &loads);
    } else {
        uint8_t pattern[8];
        for (int i = 0; i < 8; i++) {
            pattern[i] = (uint8_t)(rax >> (8 * i));
        }
        if (rax == 0 && s->banks[to_bank].absent_zero) {
            s->pages_left_absent += zero_fill(s, to_bank, to, bytes, cr3, rdi, dst, nxe,
                                              &stores);
        } else if (rax == (rax & 0xff) * 0x0101010101010101ULL) {
            memset(to, pattern[0], (size_t)bytes);
        } else {
            for (uint64_t i = 0; i < bytes; i += 8) {
                memcpy(to + i, pattern, 8);
            }
        }
    }
    bulk_mark(s, cr3, rdi, bytes, 1, nxe, &stores);
    /* the write hook's view, for owners that track writes with it */
    if (s->nregions > 0) {
        for (uint64_t page = dst >> PAGE_SHIFT; page <= (dst + bytes - 1) >> PAGE_SHIFT; page++) {
            mark_page(s, page);
        }
        /* the write hook would have seen each page-crossing store once */
        if (rdi & 7) {
            uint64_t crossings = ((rdi + bytes - 1) >> PAGE_SHIFT) - (rdi >> PAGE_SHIFT);
            if (crossings > 0) {
                if (s->identity_cr3 != 0 && (cr3 & ~0xfffULL) == s->identity_cr3) {
                    s->identity_crossings += crossings;
                } else {
                    s->unknown = 1;
                }
            }
        }
    }
    uint64_t left = rcx - units, new_rdi = rdi + bytes, new_rsi = rsi + bytes;
    if (s->reg_write(uc, UC_X86_REG_RCX, &left) != 0 ||
        s->reg_write(uc, UC_X86_REG_RDI, &new_rdi) != 0 ||
        (kind == BULK_MOVSQ && s->reg_write(uc, UC_X86_REG_RSI, &new_rsi) != 0)) {
        /* cannot happen for these registers; poison the dirty set rather
         * than leave a run that no longer matches its count */
        s->unknown = 1;
        return;
    }
    s->icount += units;
    s->bulk_units += units;
    /* a floating stop is not counted in these iterations (an exact one has no room) */
    s->budget = s->bulk_limit - s->budget > units ? s->budget + units : s->bulk_limit;
    account_entries(s, site, units);
}

/* `rep outsb` to the console port at `site`: the bytes the guest would write one
 * iteration at a time, put on the console in one step, counted one instruction per
 * iteration.  Each OUT the guest runs itself makes Unicorn find the instruction's
 * pc in its translation before the OUT hook is called; a log line costs that once
 * per byte.  These are ordinary instructions, not a bulk move: the next stop, a
 * probe's or the budget's, stays where it is, and the iterations end one before it,
 * so that the guest arrives there itself (a probe is then made in the code hook, not
 * at a stop of the emulator).  The source is read page by page, as the guest's walks
 * would mark it; where a page cannot be vouched for, the guest goes on from there. */
static NOINLINE void console_forward(TracerState *s, void *uc, uint64_t site, int counted)
{
    uint64_t rcx = 0, rdx = 0, rsi = 0, cr3 = 0;
    if (!s->bulk_on || s->reg_write == NULL || s->reg_read(uc, UC_X86_REG_RCX, &rcx) != 0 ||
        rcx == 0 || s->reg_read(uc, UC_X86_REG_RDX, &rdx) != 0 ||
        (rdx & 0xffff) != s->console_port || s->reg_read(uc, UC_X86_REG_RSI, &rsi) != 0) {
        return;
    }
    /* The iterations before the next stop, the guest's own execution of the instruction
     * left out. Called by the code hook at the instruction (`counted` 0), which checked
     * icount < budget, or at the entry of a block that starts there (1), which counted the
     * instruction already: a block the guest runs after these iterations, as the one that
     * ends the string (rcx 0) or the next iteration. */
    if (counted && s->icount >= s->budget) {
        return;
    }
    uint64_t room = s->budget - s->icount - (counted ? 0 : 1);
    uint64_t want = rcx < room ? rcx : room;
    want = want < CONSOLE_WINDOW ? want : CONSOLE_WINDOW;
    int nxe = 0;
    if (want == 0 || plain_long_mode(s, uc, &cr3, &nxe) <= 0) {
        return;
    }
    uint64_t units = 0;
    while (units < want) {
        uint64_t va = rsi + units;
        /* a byte outside the canonical halves is #GP: the guest's to raise */
        if (va < rsi || (va >= (1ULL << 47) && va < 0xFFFF800000000000ULL)) {
            break;
        }
        uint64_t page = va & ~((1ULL << PAGE_SHIFT) - 1);
        uint64_t frame = bulk_translate(s, cr3, page, 0, nxe, NULL, 1, NULL);
        if (frame == UINT64_MAX) {
            break;
        }
        uint64_t in_page = page + (1ULL << PAGE_SHIFT) - va;
        uint64_t n = want - units < in_page ? want - units : in_page;
        const uint8_t *from = bank_host(s, frame + (va - page), n, NULL);
        for (uint64_t i = 0; i < n; i++) {
            console_put(s, from[i]);
        }
        units += n;
    }
    if (units == 0) {
        return;
    }
    uint64_t left = rcx - units, new_rsi = rsi + units;
    if (s->reg_write(uc, UC_X86_REG_RCX, &left) != 0 ||
        s->reg_write(uc, UC_X86_REG_RSI, &new_rsi) != 0) {
        s->unknown = 1;
        return;
    }
    s->icount += units;
    s->console_units += units;
    account_entries(s, site, units);
}
