/*
 * Heap redzones kept by the tracer's watch events (included by tracer.c).
 *
 * The owner names the allocator's calls among the watched addresses (the
 * entries and `ret`s of allocate and deallocate, and of reallocate if the
 * allocator has one) and a width W.  While no allocator call is running, the
 * code that runs may write only the payloads the allocator handed out: the W
 * bytes before each live allocation (its block header, in the allocators
 * met so far) and the W bytes after its requested size (padding, then the
 * next block's header) must keep the values they had when the allocator last
 * returned.  On every call into the allocator from outside it, and when the
 * owner asks at the end of a run, those bytes are compared with the copy
 * taken at the last return; a difference is a hit: a write past the end (or
 * before the start) of an allocation, caught at the first allocator call
 * after it instead of wherever the damage shows later, after the allocator
 * may already have carried it on.  Bytes inside another live allocation's
 * payload are never guarded: they are its owner's to write.
 *
 * The bookkeeping follows the calls, not the recorded events, so a full
 * event buffer loses nothing here.  Calls are paired by the stack pointer, as
 * the allocator replay in Python pairs them; calls nested in another (a
 * reallocate that moves by allocate + deallocate) take effect but do not
 * check or copy: only the outermost call's entry and return do.
 */

#define GUARD_WIDTH_MAX 64
/* Live allocations guarded at once; past it the oldest is let go (a loader fills a block
 * right after it allocates it, so the newest are the ones worth watching). */
#define GUARD_LIVE_MAX 1024
#define GUARD_PENDING_MAX 16
#define GUARD_HITS_MAX 8
#define GUARD_SITES_MAX WATCH_MAX

enum { G_ALLOC_IN, G_ALLOC_OUT, G_FREE_IN, G_FREE_OUT, G_REALLOC_IN, G_REALLOC_OUT, G_ROLES };

typedef struct {
    uint64_t ptr, size;
    uint64_t age; /* when it was made: the oldest is let go first */
    uint64_t lo, hi; /* guarded: [lo, ptr) and [ptr + size, hi) */
    uint8_t before[GUARD_WIDTH_MAX];
    uint8_t after[GUARD_WIDTH_MAX];
} GuardBlock;

typedef struct {
    uint64_t instructions; /* the count when the check that found it ran */
    uint64_t ptr, size;
    uint64_t address; /* the first byte found changed */
    int after;        /* past the end (1) or before the start (0) */
    uint8_t was, now;
} GuardHit;

typedef struct {
    uint64_t rsp;
    int role;
    uint64_t a, b; /* size; ptr; ptr and new size */
} GuardCall;

typedef struct HeapGuard {
    uint32_t width;
    /* where the calls take their arguments, as W_ register indexes: allocate's
     * size, deallocate's pointer, reallocate's pointer and new size */
    int args[4];
    uint64_t sites[GUARD_SITES_MAX];
    uint8_t roles[GUARD_SITES_MAX];
    uint32_t nsites;
    void *uc; /* the engine of the last event, for the owner's final check */
    GuardBlock live[GUARD_LIVE_MAX]; /* sorted by ptr */
    uint32_t nlive;
    uint64_t made;      /* allocations kept since reset */
    uint64_t unguarded; /* allocations let go: the table was full */
    GuardCall pending[GUARD_PENDING_MAX];
    uint32_t npending;
    GuardHit hits[GUARD_HITS_MAX];
    uint32_t nhits;
    uint64_t hits_dropped;
} HeapGuard;

static void guard_clear(HeapGuard *g)
{
    g->nlive = 0;
    g->made = 0;
    g->unguarded = 0;
    g->npending = 0;
    g->nhits = 0;
    g->hits_dropped = 0;
}

/* Guest bytes at a kernel address: RAM is read directly where the owner gave
 * its banks (the heap is identity-mapped, as everywhere the frames are read),
 * through uc_mem_read otherwise. */
static int guard_read(TracerState *s, void *uc, uint64_t address, uint8_t *out, uint64_t size)
{
    return size == 0 || ram_read(s, uc, address, out, size, 1) == 0 ? 0 : -1;
}

/* The guarded ranges of block i, clipped to the payloads of its neighbours,
 * and a copy of what they hold now. */
static void guard_copy(TracerState *s, HeapGuard *g, void *uc, uint32_t i)
{
    GuardBlock *b = &g->live[i];
    uint64_t w = g->width;
    uint64_t lo = b->ptr >= w ? b->ptr - w : 0;
    uint64_t end = b->ptr + b->size;
    uint64_t hi = end <= UINT64_MAX - w ? end + w : UINT64_MAX;
    if (end < b->ptr) { /* a size that wraps: nothing after it is guarded */
        end = hi = UINT64_MAX;
    }
    if (i > 0) {
        const GuardBlock *p = &g->live[i - 1];
        uint64_t pend = p->ptr + p->size < p->ptr ? UINT64_MAX : p->ptr + p->size;
        if (pend > lo) {
            lo = pend < b->ptr ? pend : b->ptr;
        }
    }
    if (i + 1 < g->nlive) {
        const GuardBlock *n = &g->live[i + 1];
        if (n->ptr < hi) {
            hi = n->ptr > end ? n->ptr : end;
        }
    }
    b->lo = lo;
    b->hi = hi;
    if (guard_read(s, uc, lo, b->before, b->ptr - lo) < 0) {
        b->lo = b->ptr;
    }
    if (guard_read(s, uc, end, b->after, hi - end) < 0) {
        b->hi = end;
    }
}

static void guard_copy_all(TracerState *s, HeapGuard *g, void *uc)
{
    for (uint32_t i = 0; i < g->nlive; i++) {
        guard_copy(s, g, uc, i);
    }
}

static void guard_hit(HeapGuard *g, uint64_t instructions, const GuardBlock *b, uint64_t address,
                      int after, uint8_t was, uint8_t now)
{
    if (g->nhits == GUARD_HITS_MAX) {
        g->hits_dropped++;
        return;
    }
    g->hits[g->nhits++] = (GuardHit){instructions, b->ptr, b->size, address, after, was, now};
}

/* Compare every guarded range with its copy; a changed range is reported
 * once and then guarded with what it holds now. */
static void guard_check(TracerState *s, HeapGuard *g, void *uc)
{
    uint8_t now[GUARD_WIDTH_MAX];
    for (uint32_t i = 0; i < g->nlive; i++) {
        GuardBlock *b = &g->live[i];
        uint64_t end = b->ptr + b->size;
        uint64_t nb = b->ptr - b->lo, na = b->hi - end;
        int changed = 0;
        if (nb && guard_read(s, uc, b->lo, now, nb) == 0 && memcmp(now, b->before, nb) != 0) {
            /* the byte nearest the payload: an underflow runs downwards */
            uint64_t k = nb;
            while (k-- > 0 && now[k] == b->before[k]) {
            }
            guard_hit(g, s->icount, b, b->lo + k, 0, b->before[k], now[k]);
            changed = 1;
        }
        if (na && guard_read(s, uc, end, now, na) == 0 && memcmp(now, b->after, na) != 0) {
            uint64_t k = 0;
            while (now[k] == b->after[k]) {
                k++;
            }
            guard_hit(g, s->icount, b, end + k, 1, b->after[k], now[k]);
            changed = 1;
        }
        if (changed) {
            guard_copy(s, g, uc, i);
        }
    }
}

static uint32_t guard_find(const HeapGuard *g, uint64_t ptr)
{
    uint32_t lo = 0, hi = g->nlive;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (g->live[mid].ptr < ptr) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

static void guard_forget(HeapGuard *g, uint64_t ptr)
{
    uint32_t i = guard_find(g, ptr);
    if (i < g->nlive && g->live[i].ptr == ptr) {
        memmove(&g->live[i], &g->live[i + 1], sizeof(GuardBlock) * (g->nlive - i - 1));
        g->nlive--;
    }
}

/* Add or resize; the copies are taken when the outermost call returns. */
static void guard_keep(HeapGuard *g, uint64_t ptr, uint64_t size)
{
    uint32_t i = guard_find(g, ptr);
    if (i < g->nlive && g->live[i].ptr == ptr) {
        g->live[i].size = size;
        return;
    }
    if (g->nlive == GUARD_LIVE_MAX) {
        uint32_t oldest = 0;
        for (uint32_t k = 1; k < g->nlive; k++) {
            if (g->live[k].age < g->live[oldest].age) {
                oldest = k;
            }
        }
        memmove(&g->live[oldest], &g->live[oldest + 1],
                sizeof(GuardBlock) * (g->nlive - oldest - 1));
        g->nlive--;
        g->unguarded++;
        i = guard_find(g, ptr);
    }
    memmove(&g->live[i + 1], &g->live[i], sizeof(GuardBlock) * (g->nlive - i));
    g->live[i] = (GuardBlock){.ptr = ptr, .size = size, .age = g->made++, .lo = ptr,
                              .hi = ptr + size};
    g->nlive++;
}

/* A watched address was reached; `regs` as the event records them. */
static void guard_event(TracerState *s, HeapGuard *g, void *uc, uint64_t address,
                        const uint64_t *regs)
{
    int role = -1;
    for (uint32_t i = 0; i < g->nsites; i++) {
        if (g->sites[i] == address) {
            role = g->roles[i];
            break;
        }
    }
    if (role < 0) {
        return;
    }
    g->uc = uc;
    uint64_t first = 0, second = 0;
    if (role == G_ALLOC_IN) {
        first = regs[g->args[0]];
    } else if (role == G_FREE_IN) {
        first = regs[g->args[1]];
    } else if (role == G_REALLOC_IN) {
        first = regs[g->args[2]];
        second = regs[g->args[3]];
    }
    uint64_t rsp = regs[W_RSP];
    switch (role) {
    case G_ALLOC_IN:
    case G_FREE_IN:
    case G_REALLOC_IN:
        if (g->npending == 0) {
            guard_check(s, g, uc);
        }
        if (role == G_FREE_IN) {
            /* from here on the allocator owns the block */
            guard_forget(g, first);
        }
        if (g->npending < GUARD_PENDING_MAX) {
            g->pending[g->npending++] = (GuardCall){rsp, role, first, second};
        }
        return;
    default: {
        /* a `ret`: its call is the innermost pending one entered at this rsp */
        uint32_t k = g->npending;
        while (k > 0 && g->pending[k - 1].rsp != rsp) {
            k--;
        }
        if (k == 0) {
            return;
        }
        GuardCall call = g->pending[k - 1];
        g->npending = k - 1; /* calls entered after it never returned */
        uint64_t ret = regs[W_RAX];
        if (call.role == G_ALLOC_IN && ret != 0) {
            guard_keep(g, ret, call.a);
        } else if (call.role == G_REALLOC_IN && ret != 0) {
            if (ret != call.a) {
                guard_forget(g, call.a);
            }
            guard_keep(g, ret, call.b);
        }
        if (g->npending == 0) {
            guard_copy_all(s, g, uc);
        }
        return;
    }
    }
}
