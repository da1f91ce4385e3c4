/*
 * Block counting: instructions counted per translated block instead of per
 * instruction, with every count, stop and event exactly as the code hook on
 * every instruction gives them.
 *
 * Unicorn calls a UC_HOOK_CODE callback through a helper call emitted before
 * each hooked instruction, with the flags computed before and after it: a few
 * nanoseconds an instruction, half of a short run's guest time.  In this mode
 * the block hook adds a block's instruction count at its entry, and the code
 * hook is called only where it acts:
 *
 * - Points: each watched address and bulk site has a hook of its own.  The
 *   code hook then sees the count the instruction would have had (the block's
 *   count at entry plus the point's place in the block), and what it adds
 *   besides (a bulk move's iterations) is added to the block's.  A point's
 *   place is known from the block Unicorn translates at the point itself
 *   (uc_ctl_request_cache, outside a run): it ends where every block holding
 *   the point ends, so the point is that many instructions before the end.
 *   A block that does not end there runs precise (below).
 * - The stop of stop_at: at a block's first instruction it is decided by the
 *   block hook, as the code hook would there; anywhere else the block runs
 *   precise.
 * - Precise ranges: the code hook over a whole block, counting each
 *   instruction as without this mode.  A block runs precise when it reaches
 *   the `until` address: with Unicorn's own until, Unicorn ends the block
 *   there with an exit that is no instruction; with the tracer's exit there
 *   (set_exit), the code hook stops the guest at it (at a block's first
 *   instruction, the block hook does).  It also runs precise when it lies
 *   outside the ranges the owner vouches hold fixed code,
 *   holds a point it cannot place, overlaps a precise range in part, or when
 *   the budget ends inside it.  The block hook runs before the block's first
 *   instruction, and Unicorn checks for a stop or a new pc right after it, so
 *   such a block is made precise on the spot: the code hook is added over its
 *   range, the blocks translated there are dropped, and rip is written back to
 *   the block's start, which makes Unicorn translate it again, hooked, and run
 *   it from its start.  Nothing of the block ran twice, and its entry is
 *   recorded once: the first, abandoned entry records nothing.
 * - A budget below its limit is a probe of the cycle search, which needs no
 *   exact place: it stops the guest at the first block entry at or past it.
 *
 * Unicorn calls every code hook whose range holds the instruction, so a point
 * inside a precise range is announced twice; the second call is dropped (no
 * instruction is announced twice without a block entry between).  Precise
 * ranges never overlap.  Those made for one stop (a budget, a stop_at, an
 * overlap, unknown code) are deleted when the guest resumes; the others last
 * until counting stops.  Each hook costs every hooked instruction a check of
 * every hook, so points and ranges stay few.
 *
 * A block's instruction count comes from Unicorn's own translation of the
 * block being run (once per block address and size).  The one case where a
 * count taken at a block's entry needs mending is a fault part-way through
 * it: settle() then counts the instructions from the faulting one to the
 * block's end through the blocks starting there.
 */

typedef int (*uc_hook_add_fn)(void *uc, size_t *hh, int type, void *callback,
                              void *user_data, uint64_t begin, uint64_t end, ...);
typedef int (*uc_hook_del_fn)(void *uc, size_t hh);
typedef int (*uc_ctl_fn)(void *uc, int control, ...);

/* unicorn.h: struct uc_tb, UC_HOOK_CODE, UC_CTL_* */
typedef struct {
    uint64_t pc;
    uint16_t icount;
    uint16_t size;
} UcTb;
#define UC_HOOK_CODE_TYPE 4
#define UC_CTL_CODE(type, nr, rw) ((int)((unsigned)(type) | ((unsigned)(nr) << 26) | \
                                         ((unsigned)(rw) << 30)))
#define CTL_TB_REQUEST_CACHE UC_CTL_CODE(8, 2, 3)
#define CTL_TB_REMOVE_CACHE UC_CTL_CODE(9, 2, 1)

#define BC_TEXT_MAX 16
#define BC_POINTS_MAX (WATCH_MAX + BULK_MAX + 1)

typedef struct {
    uint64_t pc;
    uint32_t size;   /* 0: empty slot */
    uint32_t n;      /* instructions; UINT32_MAX: unknown */
    uint32_t gen;    /* point generation the flags below were found for */
    uint32_t covered_gen; /* range generation `covered` was found for */
    uint8_t unplaced; /* holds a point it cannot place */
    uint8_t text;    /* inside the vouched code ranges */
    uint8_t covered; /* bc_covered of the block */
    uint8_t console; /* starts at a console string's site (found for `gen`) */
} BlockInfo;

typedef struct {
    uint64_t begin, end; /* [begin, end) */
    size_t hook;
    int per_run;
} PreciseRange;

typedef struct {
    uint64_t address;
    size_t hook;
    uint64_t end;    /* where the block translated at the point ends; 0: unknown */
    uint32_t count;  /* its instructions, the point's included */
} Point;

typedef struct BlockCount {
    void *uc;
    uc_hook_add_fn hook_add;
    uc_hook_del_fn hook_del;
    uc_ctl_fn ctl;
    uint64_t until;
    uint64_t text[BC_TEXT_MAX][2];
    uint32_t ntext;
    BlockInfo *table; /* open addressing, power-of-two capacity */
    uint32_t cap, used;
    PreciseRange *ranges; /* sorted, disjoint */
    uint32_t nranges, ranges_cap;
    uint32_t ranges_gen; /* moves on whenever a range comes or goes */
    PreciseRange *stale; /* ranges deleted since the last run ended (see bc_drop) */
    uint32_t nstale, stale_cap;
    Point points[BC_POINTS_MAX];
    uint32_t npoints;
    uint32_t gen;
    uint64_t entries; /* block entries, for the double announcements */
    uint64_t last_address, last_entry;
    /* the block entered last, if it was counted at its entry */
    int cur_counted;
    int cur_console; /* and it starts at a console string's site */
    uint64_t cur_start, cur_end, cur_base, cur_n;
    /* counts nobody can vouch for: a service OUT in a counted block (its stop
     * would come late), a point out of place, a fault settle() could not
     * count back from */
    int inexact;
    uint64_t restarts; /* blocks made precise on the spot since enabled */
    uint64_t counted;  /* block entries counted whole */
    uint64_t counted_insns; /* instructions they hold */
    uint64_t precise_calls; /* instructions announced in precise ranges */
    uint64_t point_calls;   /* points announced in blocks counted whole */
} BlockCount;

static void code_hook(void *uc, uint64_t address, uint32_t size, void *user_data);
static void watch_check(TracerState *s, void *uc, uint64_t address);
static void probe_natively(TracerState *s, void *uc, uint64_t block, int have_block);

static BlockInfo *bc_find(BlockCount *bc, uint64_t pc, uint32_t size)
{
    uint32_t mask = bc->cap - 1;
    uint32_t i = (uint32_t)(((pc ^ ((uint64_t)size << 48)) * COVERAGE_MULTIPLIER) >> 40) & mask;
    while (bc->table[i].size != 0) {
        if (bc->table[i].pc == pc && bc->table[i].size == size) {
            return &bc->table[i];
        }
        i = (i + 1) & mask;
    }
    return &bc->table[i];
}

/* Its memory (NULL: nothing); the hooks are the owner's to delete first. */
static void bc_free(BlockCount *bc)
{
    if (bc != NULL) {
        free(bc->stale);
        free(bc->table);
        free(bc->ranges);
        free(bc);
    }
}

static int bc_grow(BlockCount *bc)
{
    uint32_t old_cap = bc->cap;
    BlockInfo *old = bc->table;
    uint32_t cap = old_cap ? old_cap * 2 : 1024;
    BlockInfo *table = calloc(cap, sizeof(BlockInfo));
    if (table == NULL) {
        return -1;
    }
    bc->table = table;
    bc->cap = cap;
    for (uint32_t i = 0; i < old_cap; i++) {
        if (old[i].size != 0) {
            *bc_find(bc, old[i].pc, old[i].size) = old[i];
        }
    }
    free(old);
    return 0;
}

static const Point *bc_point(const BlockCount *bc, uint64_t address)
{
    for (uint32_t i = 0; i < bc->npoints; i++) {
        if (bc->points[i].address == address) {
            return &bc->points[i];
        }
    }
    return NULL;
}

/* The points of [b, e) that a count at its entry cannot place. */
static uint8_t bc_unplaced(const BlockCount *bc, uint64_t b, uint64_t e, uint32_t n)
{
    uint8_t out = 0;
    for (uint32_t i = 0; i < bc->npoints; i++) {
        const Point *p = &bc->points[i];
        if (p->address >= b && p->address < e && (p->end != e || p->count > n)) {
            out = 1;
        }
    }
    return out;
}

/* The block [pc, pc + size): its count and what it holds; NULL if out of memory. */
static BlockInfo *bc_info(TracerState *s, BlockCount *bc, void *uc, uint64_t pc,
                          uint32_t size)
{
    if ((bc->used + 1) * 2 > bc->cap && bc_grow(bc) < 0) {
        return NULL;
    }
    BlockInfo *info = bc_find(bc, pc, size);
    if (info->size == 0) {
        UcTb tb;
        memset(&tb, 0, sizeof(tb));
        info->pc = pc;
        info->size = size;
        info->n = UINT32_MAX;
        if (bc->ctl(uc, CTL_TB_REQUEST_CACHE, pc, &tb) == 0 && tb.pc == pc && tb.size == size) {
            info->n = tb.icount;
        }
        info->text = 0;
        for (uint32_t i = 0; i < bc->ntext; i++) {
            if (pc >= bc->text[i][0] && pc + size <= bc->text[i][1]) {
                info->text = 1;
            }
        }
        info->gen = bc->gen - 1;
        info->covered_gen = bc->ranges_gen - 1;
        bc->used++;
    }
    if (info->gen != bc->gen) {
        info->unplaced = bc_unplaced(bc, pc, pc + size, info->n);
        info->console = 0;
        for (uint32_t i = 0; i < s->nbulk; i++) {
            info->console |= s->bulk_sites[i] == pc && s->bulk_kinds[i] == BULK_OUTSB;
        }
        info->gen = bc->gen;
    }
    return info;
}

/* How much of [b, e) the precise ranges cover: 0 none, 1 part, 2 all. */
static int bc_covered(const BlockCount *bc, uint64_t b, uint64_t e)
{
    uint32_t lo = 0, hi = bc->nranges;
    while (lo < hi) { /* the first range ending after b */
        uint32_t mid = (lo + hi) / 2;
        if (bc->ranges[mid].end <= b) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    uint64_t inside = 0;
    for (uint32_t i = lo; i < bc->nranges && bc->ranges[i].begin < e; i++) {
        uint64_t from = bc->ranges[i].begin > b ? bc->ranges[i].begin : b;
        uint64_t to = bc->ranges[i].end < e ? bc->ranges[i].end : e;
        if (to > from) {
            inside += to - from;
        }
    }
    return inside == 0 ? 0 : inside == e - b ? 2 : 1;
}

static int bc_insert(BlockCount *bc, uint64_t begin, uint64_t end, size_t hook, int per_run)
{
    if (bc->nranges == bc->ranges_cap) {
        uint32_t cap = bc->ranges_cap ? bc->ranges_cap * 2 : 64;
        PreciseRange *r = realloc(bc->ranges, cap * sizeof(PreciseRange));
        if (r == NULL) {
            return -1;
        }
        bc->ranges = r;
        bc->ranges_cap = cap;
    }
    uint32_t i = bc->nranges;
    while (i > 0 && bc->ranges[i - 1].begin > begin) {
        bc->ranges[i] = bc->ranges[i - 1];
        i--;
    }
    bc->ranges[i].begin = begin;
    bc->ranges[i].end = end;
    bc->ranges[i].hook = hook;
    bc->ranges[i].per_run = per_run;
    bc->nranges++;
    bc->ranges_gen++;
    return 0;
}

static void bc_code_hook(void *uc, uint64_t address, uint32_t size, void *user_data);

static int bc_add_range(TracerState *s, BlockCount *bc, void *uc, uint64_t begin, uint64_t end,
                        int per_run)
{
    size_t hook = 0;
    if (bc->hook_add(uc, &hook, UC_HOOK_CODE_TYPE, (void *)bc_code_hook, s, begin, end - 1) != 0) {
        return -1;
    }
    if (bc_insert(bc, begin, end, hook, per_run) < 0) {
        bc->hook_del(uc, hook);
        return -1;
    }
    return 0;
}

/* Drop the blocks translated over [b, e), page by page: Unicorn drops a
 * physical range, and consecutive virtual pages need not be consecutive
 * physical ones. */
static void bc_remove_cache(BlockCount *bc, void *uc, uint64_t b, uint64_t e)
{
    for (uint64_t page = b & ~((1ULL << PAGE_SHIFT) - 1); page < e; page += 1ULL << PAGE_SHIFT) {
        uint64_t from = page > b ? page : b;
        uint64_t to = page + (1ULL << PAGE_SHIFT) < e ? page + (1ULL << PAGE_SHIFT) : e;
        (void)bc->ctl(uc, CTL_TB_REMOVE_CACHE, from, to);
    }
}

/* Cover the gaps of [b, e) with precise ranges and drop the blocks translated
 * there. */
static int bc_cover(TracerState *s, BlockCount *bc, void *uc, uint64_t b, uint64_t e, int per_run)
{
    uint64_t at = b;
    uint32_t i = 0;
    while (at < e) {
        while (i < bc->nranges && bc->ranges[i].end <= at) {
            i++;
        }
        if (i < bc->nranges && bc->ranges[i].begin <= at) {
            at = bc->ranges[i].end;
            continue;
        }
        uint64_t gap_end = i < bc->nranges && bc->ranges[i].begin < e ? bc->ranges[i].begin : e;
        if (bc_add_range(s, bc, uc, at, gap_end, per_run) < 0) {
            return -1;
        }
        at = gap_end;
    }
    bc_remove_cache(bc, uc, b, e);
    return 0;
}

/* Drop the precise ranges of this run, or all of them. Unicorn drops the
 * blocks that start in a deleted range at once, but keeps the hook in its
 * list, and translates its calls into new blocks (calls it then skips), until
 * its next uc_emu_start ends: a range of this run is kept stale, and the
 * blocks translated over it are dropped again when the next run ends. All of
 * them: the blocks are dropped now (the owner flushes). */
static void bc_drop(BlockCount *bc, int all)
{
    uint32_t kept = 0;
    for (uint32_t i = 0; i < bc->nranges; i++) {
        PreciseRange *r = &bc->ranges[i];
        if (!all && !r->per_run) {
            bc->ranges[kept++] = *r;
            continue;
        }
        (void)bc->hook_del(bc->uc, r->hook);
        if (all) {
            bc_remove_cache(bc, bc->uc, r->begin, r->end);
            continue;
        }
        if (bc->nstale == bc->stale_cap) {
            uint32_t cap = bc->stale_cap ? bc->stale_cap * 2 : 16;
            PreciseRange *grown = realloc(bc->stale, cap * sizeof(PreciseRange));
            if (grown == NULL) { /* drop its blocks now rather than lose it */
                bc_remove_cache(bc, bc->uc, r->begin, r->end);
                continue;
            }
            bc->stale = grown;
            bc->stale_cap = cap;
        }
        bc->stale[bc->nstale++] = *r;
    }
    if (kept != bc->nranges) {
        bc->ranges_gen++;
    }
    bc->nranges = kept;
}

/* When a run ends: the blocks translated over the stale ranges, whose hooks
 * are gone by now, are dropped, to be translated without their calls. */
static void bc_clean_stale(BlockCount *bc)
{
    for (uint32_t i = 0; i < bc->nstale; i++) {
        bc_remove_cache(bc, bc->uc, bc->stale[i].begin, bc->stale[i].end);
    }
    bc->nstale = 0;
}

/* Outside a run: give each watched address and bulk site a hook of its own,
 * and place it. A hook gone leaves its call in blocks
 * translated before, which Unicorn then skips. */
static int bc_sync_points(TracerState *s, BlockCount *bc)
{
    uint64_t want[BC_POINTS_MAX];
    uint32_t nwant = 0;
    for (uint32_t i = 0; i < s->nwatched; i++) {
        want[nwant++] = s->watched[i];
    }
    for (uint32_t i = 0; i < s->nbulk; i++) {
        /* a console string's site has none: after the first, each iteration of a `rep outsb`
         * is a block of its own that starts there, and the block hook serves it (a code hook
         * of its own would make Unicorn walk one more hook at every point of every run) */
        if (s->bulk_kinds[i] != BULK_OUTSB) {
            want[nwant++] = s->bulk_sites[i];
        }
    }
    uint32_t kept = 0;
    for (uint32_t i = 0; i < bc->npoints; i++) {
        int wanted = 0;
        for (uint32_t j = 0; j < nwant; j++) {
            wanted |= want[j] == bc->points[i].address;
        }
        if (wanted) {
            bc->points[kept++] = bc->points[i];
        } else {
            (void)bc->hook_del(bc->uc, bc->points[i].hook);
        }
    }
    bc->npoints = kept;
    int failed = 0;
    for (uint32_t j = 0; j < nwant; j++) {
        Point *have = (Point *)bc_point(bc, want[j]);
        if (have != NULL) {
            continue;
        }
        Point *p = &bc->points[bc->npoints];
        memset(p, 0, sizeof(*p));
        p->address = want[j];
        if (bc->hook_add(bc->uc, &p->hook, UC_HOOK_CODE_TYPE, (void *)bc_code_hook, s,
                         want[j], want[j]) != 0) {
            failed = 1;
            continue;
        }
        bc->npoints++;
        /* the blocks translated over it have no call there yet */
        bc_remove_cache(bc, bc->uc, want[j], want[j] + 1);
        UcTb tb;
        memset(&tb, 0, sizeof(tb));
        if (bc->ctl(bc->uc, CTL_TB_REQUEST_CACHE, want[j], &tb) == 0 && tb.pc == want[j] &&
            tb.size != 0) {
            p->end = want[j] + tb.size;
            p->count = tb.icount;
        }
    }
    bc->gen++;
    return failed ? -1 : 0;
}

enum { BLOCK_COUNTED, BLOCK_PRECISE, BLOCK_STOP, BLOCK_RESTARTED };

/* At the entry of the block [b, b + size), before any of it runs. */
static int bc_entry(TracerState *s, BlockCount *bc, void *uc, uint64_t b, uint32_t size)
{
    uint64_t e = b + size;
    bc->entries++;
    bc->cur_counted = 0;
    if (s->icount >= s->budget && s->probe_on && s->budget < s->bulk_limit) {
        /* a probe's count: made here, at this block, and the guest goes on */
        probe_natively(s, uc, b, 1);
    }
    if (s->icount >= s->budget) {
        /* where the code hook would stop at the block's first instruction */
        if (checkpoint_passes(s, b)) {
            /* the entry of the stop, as the block hook makes it after a stop; then the
             * blocks made precise for it count whole again, as `extend` makes them, and
             * the entry of the guest's resume here follows */
            record_entry(s, b);
            bc_drop(bc, 0);
            return bc_entry(s, bc, uc, b, size);
        }
        return BLOCK_STOP;
    }
    if (size == 0) {
        /* no instruction translated whole (one that cannot be decoded): the code hook
         * announces it, as without this mode */
        e = b + 1;
    }
    BlockInfo *info = size == 0 ? NULL : bc_info(s, bc, uc, b, size);
    int covered;
    if (info == NULL) {
        covered = bc_covered(bc, b, e);
    } else {
        /* the ranges change a few times a run; a block is entered thousands of times */
        if (info->covered_gen != bc->ranges_gen) {
            info->covered = (uint8_t)bc_covered(bc, b, e);
            info->covered_gen = bc->ranges_gen;
        }
        covered = info->covered;
    }
    if (covered == 2) {
        return BLOCK_PRECISE;
    }
    int per_run = 0;
    if (size == 0) {
        per_run = 1;
    } else if (info == NULL || info->n == UINT32_MAX || info->unplaced ||
        (bc->until >= b && bc->until <= e)) {
        per_run = 0;
    } else if (covered || !info->text || (s->stop_addr > b && s->stop_addr < e) ||
               s->icount + info->n > s->bulk_limit ||
               (s->icount + info->n > s->budget && s->budget == s->bulk_limit)) {
        /* A block partly covered overlaps a range of this run (of an
         * overlapping block's budget stop, say). A budget below the limit is
         * a probe of the cycle search, which needs no exact place: it stops
         * at the first block entry past it. */
        per_run = 1;
    } else {
        if (b == s->stop_addr) {
            /* the stop of stop_at at a block's first instruction: decided
             * here, as the code hook would there */
            watch_check(s, uc, b);
            if (s->icount >= s->budget) {
                return BLOCK_STOP;
            }
        }
        bc->cur_counted = 1;
        bc->cur_console = info->console;
        bc->cur_start = b;
        bc->cur_end = e;
        bc->cur_base = s->icount;
        bc->cur_n = info->n;
        s->icount += info->n;
        bc->counted++;
        bc->counted_insns += info->n;
        return BLOCK_COUNTED;
    }
    if (bc_cover(s, bc, uc, b, e, per_run) < 0) {
        /* no memory for the range: nothing can be vouched for from here */
        bc->inexact = 1;
        s->exhausted = 1;
        s->emu_stop(uc);
        return BLOCK_RESTARTED;
    }
    bc->restarts++;
    uint64_t pc = b;
    (void)s->reg_write(uc, UC_X86_REG_RIP, &pc);
    return BLOCK_RESTARTED;
}

/* The code hook of points and precise ranges. */
static void bc_code_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    TracerState *s = (TracerState *)user_data;
    BlockCount *bc = s->bc;
    if (bc == NULL || (address == bc->last_address && bc->last_entry == bc->entries)) {
        return; /* announced already, by the other hook over it */
    }
    bc->last_address = address;
    bc->last_entry = bc->entries;
    if (!bc->cur_counted) {
        bc->precise_calls++;
        code_hook(uc, address, size, s);
        return;
    }
    /* a point in a block counted at its entry */
    bc->point_calls++;
    const Point *p = bc_point(bc, address);
    if (p == NULL || p->count > bc->cur_n) {
        bc->inexact = 1;
        return;
    }
    uint64_t exact = bc->cur_base + (bc->cur_n - p->count);
    uint64_t whole = s->icount;
    s->icount = exact;
    code_hook(uc, address, size, s);
    if (s->exhausted || s->icount <= exact) {
        /* stopped before it: the rest of the block never runs */
        bc->cur_counted = 0;
        return;
    }
    /* what the code hook added besides the instruction (a bulk move's
     * iterations) adds to the block's count */
    uint64_t added = s->icount - exact - 1;
    s->icount = whole + added;
    bc->cur_base += added; /* the block's later instructions come after them */
    if (s->icount > s->bulk_limit) {
        /* the limit falls in what is left of the block */
        bc->inexact = 1;
    }
}

/* After a fault at `pc`: the instructions counted at the entry of the block
 * it interrupted that never ran are taken back (the faulting one stays
 * counted, as the code hook counts an instruction before it runs). */
static int bc_settle(BlockCount *bc, TracerState *s, uint64_t pc)
{
    if (!bc->cur_counted || pc < bc->cur_start || pc >= bc->cur_end) {
        return 0;
    }
    uint64_t at = pc, rest = 0;
    while (at < bc->cur_end) {
        UcTb tb;
        memset(&tb, 0, sizeof(tb));
        if (bc->ctl(bc->uc, CTL_TB_REQUEST_CACHE, at, &tb) != 0 || tb.pc != at ||
            tb.size == 0 || at + tb.size > bc->cur_end) {
            bc->inexact = 1;
            return -1;
        }
        rest += tb.icount;
        at += tb.size;
    }
    if (rest > bc->cur_n) {
        bc->inexact = 1;
        return -1;
    }
    s->icount = bc->cur_base + (bc->cur_n - rest) + 1;
    bc->cur_counted = 0;
    return 0;
}
