/*
 * Native Unicorn hook callbacks for kernel_emu.tracing.
 *
 * A Python hook costs a few hundred nanoseconds per event, which turns a
 * fuzzing run that should take microseconds into milliseconds.  These
 * callbacks are plain C functions that Unicorn calls directly; the Python
 * side only registers them (through the ctypes handle of the Unicorn library
 * that the unicorn package already loaded) and reads the results between runs.
 *
 * The module deliberately does not link against libunicorn nor include its
 * headers: it builds with nothing but the Python headers and a C compiler,
 * and the Unicorn entry points it calls (uc_emu_stop, uc_reg_read,
 * uc_mem_read) are handed in as addresses by the Python wrapper.
 *
 * Port I/O: when the owner asks for it, OUT and IN are hooked here too, so the
 * guest's byte-at-a-time debug console costs a few nanoseconds per byte
 * instead of a Python callback.
 *
 * Watches: the code hook also records registers and a frame-pointer backtrace
 * when the guest reaches one of a few watched addresses (allocator entries and
 * returns), so observing them needs neither a Python callback nor another
 * UC_HOOK_CODE hook, each of which would slow down every instruction.
 *
 * Threading: Unicorn runs the callbacks while ctypes has released the GIL, so
 * they must never touch a Python object.  Everything they use lives in the
 * plain C part of TracerState.  The Python-facing methods must not be called
 * while the engine is running in another thread.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PAGE_SHIFT 12
#define RING_SIZE 64 /* must stay a power of two: the index is masked */
#define MAP_SIZE 65536
#define COVERAGE_MULTIPLIER 0x9E3779B97F4A7C15ULL
#define CONSOLE_CAP (1u << 20)
#define CONSOLE_INITIAL 4096
#define PORT_LOG_SIZE 64
#define WATCH_MAX 32
#define EVENT_CAP 4096
#define MAX_FRAMES 16
#define WATCH_FILTER_BITS 4096 /* power of two: indexed by the low address bits */
#define CK_RANGES_MAX 16 /* bulk routines whose code is progress at a checkpoint */

/* Values from unicorn/x86.h; copied so the build needs no Unicorn headers. */
#define UC_X86_REG_RAX 35
#define UC_X86_REG_RBP 36
#define UC_X86_REG_RCX 38
#define UC_X86_REG_RDI 39
#define UC_X86_REG_RDX 40
#define UC_X86_REG_RIP 41
#define UC_X86_REG_RSI 43
#define UC_X86_REG_RSP 44
#define UC_X86_REG_R8 106
#define UC_X86_REG_CR0 50
#define UC_X86_REG_CR3 53
#define UC_X86_REG_CS 11
#define UC_X86_REG_RFLAGS 253
#define UC_X86_REG_CR4 54
#define UC_X86_REG_MSR 248
#define CR0_PG (1ULL << 31)

#if defined(__GNUC__)
#define NOINLINE __attribute__((noinline))
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define NOINLINE
#define UNLIKELY(x) (x)
#endif

/* Prototypes as in unicorn/unicorn.h (uc_err is an enum, i.e. an int). */
typedef int (*uc_emu_stop_fn)(void *uc);
typedef int (*uc_reg_read_fn)(void *uc, int regid, void *value);
typedef int (*uc_mem_read_fn)(void *uc, uint64_t address, void *bytes, uint64_t size);
typedef int (*uc_reg_write_fn)(void *uc, int regid, const void *value);

#define BULK_MAX 64
#define BANK_MAX 8
#define SAME_MAX 32 /* registers a stop_when_same arrival compares */
#define PROBE_LOG_MAX 64 /* probes listed (a run makes one per doubling of its count) */
#define CR3_ADDR_MASK 0x000FFFFFFFFFF000ULL
enum { BULK_STOSQ, BULK_MOVSQ, BULK_OUTSB };

/* Guest RAM as the owner mapped it: guest-physical base and size, host address;
 * `absent_zero`: the host memory is a private anonymous mapping, so a page the host
 * kernel does not hold (never written, or given back) reads as zeros (bulk.h). */
typedef struct {
    uint64_t base;
    uint64_t size;
    uint8_t *host;
    int absent_zero;
} Bank;

/* Registers a watch event records, in WatchEvent field order. */
enum { W_RIP, W_RSP, W_RBP, W_RAX, W_RDI, W_RSI, W_RDX, W_RCX, W_R8, W_NREGS };
static const int watch_regs[W_NREGS] = {
    UC_X86_REG_RIP, UC_X86_REG_RSP, UC_X86_REG_RBP, UC_X86_REG_RAX,
    UC_X86_REG_RDI, UC_X86_REG_RSI, UC_X86_REG_RDX, UC_X86_REG_RCX, UC_X86_REG_R8,
};

typedef struct {
    uint64_t start, end;
    int64_t saved_rbp, ret; /* offsets from the function's rbp */
} UnwindEntry;

typedef struct {
    uint64_t address;
    uint64_t instructions;
    uint64_t regs[W_NREGS];
    uint64_t frames[MAX_FRAMES];
    uint32_t nframes;
} WatchEvent;

typedef struct {
    uint64_t first_page; /* base >> PAGE_SHIFT */
    uint64_t npages;
    uint64_t *bitmap;    /* one bit per page: already in `dirty` this epoch */
    uint32_t *dirty;     /* page indices in first-write order; capacity npages */
    uint64_t ndirty;     /* can never exceed npages: a page enters once */
} Region;

typedef struct {
    uint32_t port;
    uint32_t value;
    uint8_t size;
    uint8_t is_in;
} PortEvent;

typedef struct {
    PyObject_HEAD
    /* Hot fields first: the code hook touches only these. */
    uint64_t icount;
    uint64_t budget;
    /* Every watched address is in [watch_min, watch_min + watch_span]; with
     * no watches the range is {UINT64_MAX}, which the filter below rejects. */
    uint64_t watch_min;
    uint64_t watch_span;
    uc_emu_stop_fn emu_stop;
    int exhausted;
    int coverage_on;
    uint32_t prev_loc;
    /* A service OUT stops the guest, but Unicorn may still announce the next
     * instruction to the code hook before honouring the stop.  To keep that
     * check off the hot path, the OUT hook parks the real budget here and
     * lowers `budget` to the current count, so an announcement takes the
     * code hook's slow path, which undoes the swap without counting.  When
     * no announcement comes, the next block hook undoes it. */
    int stop_pending; /* read by every block hook */
    uint64_t saved_budget;
    /* Never below `budget` (outside a parked service stop). Above it, the stop
     * floats: every iteration a bulk move performs natively moves `budget` on
     * by one, up to `bulk_limit`, which the moves never pass; equal to it, the
     * stop is exact. */
    uint64_t bulk_limit;
    uint64_t ring_pos;
    uint64_t ring[RING_SIZE];

    Region *regions;
    Py_ssize_t nregions;
    Py_ssize_t last_region; /* writes cluster, so try the last hit first */
    uc_reg_read_fn reg_read;

    /* Pages written outside every region: open-addressing set of page + 1
     * (0 marks an empty slot), grown at half load. */
    uint64_t *other;
    size_t other_cap;
    size_t other_len;
    /* Set when a guest write could not be pinned to named pages, so the
     * caller must not trust the dirty set (see take_dirty). */
    int unknown;
    /* CR3 of page tables the owner vouches map virtual = physical: a crossing
     * store made under them has its tail on the next physical page. */
    uint64_t identity_cr3;
    uint64_t identity_crossings;

    uint32_t console_port;
    uint32_t service_port;
    uint32_t console_read_value;
    uint8_t *console; /* malloc'd, grown by doubling up to CONSOLE_CAP */
    size_t console_len;
    size_t console_cap;
    uint64_t console_dropped;
    int service_pending;
    uint32_t service_value;
    uint32_t port_log_len;
    PortEvent port_log[PORT_LOG_SIZE];

    /* Watched code addresses come from anywhere in a kernel, so their range
     * may span most of its code: a bit per value of the low 12 address bits
     * lets at most 32 in 4096 in-range instructions on to the exact
     * comparison. */
    uint64_t watch_filter[WATCH_FILTER_BITS / 64];
    uint64_t watched[WATCH_MAX]; /* sorted, distinct */
    uint32_t nwatched;
    uc_mem_read_fn mem_read;
    /* Bulk sites (see bulk.h): `rep stosq` / `rep movsq` of the guest's memory
     * routines, fast-forwarded natively; they share the watch filter. */
    uint64_t bulk_sites[BULK_MAX];
    uint8_t bulk_kinds[BULK_MAX];
    uint32_t nbulk;
    int bulk_on;
    Bank banks[BANK_MAX];
    uint32_t nbanks;
    /* per bank with absent_zero: the pages zero fills left to the host in this run, a
     * bitmap (bit i of byte i / 8: page i), nonzero only in bytes [absent_lo, absent_hi) */
    uint8_t *absent[BANK_MAX];
    size_t absent_len[BANK_MAX], absent_lo[BANK_MAX], absent_hi[BANK_MAX];
    /* trust_zeros: the first bank's pages the snapshot has as zeros and only the guest
     * writes (bulk.h's zeros_known), a bitmap; NULL: none. `zeros_trusted`: whether this
     * run may still take the guest's word for them (a boot service, whose writes the
     * identity tables do not see, ends it); `zeros_taken`: pages taken on it this run. */
    uint8_t *zero_bits;
    size_t zero_len;
    int zeros_trusted;
    uint64_t zeros_taken;
    int direct_reads; /* frames read from the banks rather than through Unicorn */
    uc_reg_write_fn reg_write;
    uint64_t bulk_units; /* iterations fast-forwarded since reset */
    uint64_t console_units; /* console bytes of `rep outsb` put in one step since reset */
    uint64_t copies_left_absent; /* pages of copies left to the host since reset */
    uint64_t pages_left_absent; /* pages of zero fills left to the host since reset */
    /* The last refusal, so the iterations of one refused instance that stay
     * on the same pages are not re-examined one by one. */
    uint64_t memo_site;
    uint64_t memo_rcx;
    uint64_t memo_dst_page;
    uint64_t memo_src_page;
    /* A one-shot stop before the nth next arrival at stop_addr (see
     * stop_at), and whether the next block entry is a resume to be left out
     * of the recent blocks and the coverage (see quiet_resume). */
    uint64_t stop_addr;
    uint64_t stop_left;
    uint64_t stop_armed_at; /* count when armed: the stopped instruction is no arrival */
    int stop_hit;
    int quiet_block;
    /* set_exit: the guest stops before the instruction at exit_addr, as
     * Unicorn's `until` would stop it, with nothing of it run or counted
     * (UINT64_MAX: no exit); exit_hit: it did since the last reset. */
    uint64_t exit_addr;
    int exit_hit;
    /* start_probes: the cycle search's probes made here, without a stop (see
     * probe_natively): its next probe at probe_at instructions outside bulk moves, where
     * a search for a same-register arrival is armed at the block the guest is in, if it
     * may stop there (not in probe_no_stop, under the tables at probe_pml4) and
     * probe_search still allows one */
    int probe_on;
    int probe_search;
    uint64_t probe_at;
    uint64_t probe_pml4;
    uint32_t probe_nregs;
    uint32_t probe_max;
    int probe_ids[SAME_MAX];
    uint64_t *probe_no_stop; /* sorted */
    uint32_t probe_nno_stop;
    uint64_t probes;         /* made since start_probes */
    uint64_t probe_log[PROBE_LOG_MAX][2]; /* the first ones: (own count, bulk units) */
    uint64_t probe_searches; /* searches armed since start_probes */
    uint64_t probe_addr;     /* where the last one was armed */
    /* stop_when_same: the arrivals at stop_addr stop the guest only when these
     * registers equal those of the first arrival (read when it comes, with no
     * stop), and the search ends by itself after same_max arrivals past the
     * first without one. */
    int same_on;
    int same_have_first;
    uint32_t same_nregs;
    uint32_t same_arrivals; /* arrivals since the first */
    uint32_t same_max;
    int same_ids[SAME_MAX];
    uint64_t same_first[SAME_MAX];
    uint64_t events_seen; /* recorded or dropped since reset, taken or not */
    WatchEvent *events; /* EVENT_CAP entries, allocated by the first watch */
    uint32_t nevents;
    uint64_t events_dropped;
    /* How to walk frames in code whose frame pointer is not at the saved one
     * (the Microsoft x64 layout): per function [start, end), where the saved
     * rbp and the return address are, relative to its rbp. None: the System V
     * chain ([rbp] the caller's rbp, [rbp + 8] the return address). */
    UnwindEntry *unwind;
    uint32_t nunwind;
    struct HeapGuard *guard; /* see guard.h; NULL: no redzones kept */
    struct BlockCount *bc;   /* see blockcount.h; NULL: the code hook counts */
    /* checkpoints(): the watchdog's checkpoints passed here, with no stop, when the run
     * made progress (see checkpoint_passes); the owner still decides every other one.
     * checkpoint_walk(): the Dirty count's tables (at ck_root, in the first RAM bank) and
     * the bulk routines' code, where being is progress. */
    int ck_on;
    uint64_t ck_next;      /* the next checkpoint's count */
    uint64_t ck_run_budget;
    uint64_t ck_interval;
    int64_t ck_count;      /* Dirty leaves at the last checkpoint */
    uint64_t ck_passed;    /* checkpoints passed here since reset */
    int ck_walk;           /* checkpoint_walk was given */
    uint64_t ck_root;
    int ck_level;
    int64_t ck_max_pages;
    int64_t ck_max_tables;
    uint32_t ck_nranges;
    uint64_t ck_ranges[CK_RANGES_MAX][2];

    /* Bit i: the 64-byte line i of `map` may hold a non-zero counter (every
     * write to the map sets its line's bit), so that reset() and a reader of
     * the map go through the few lines a run touched, not all 64 KiB. */
    uint64_t map_lines[MAP_SIZE / 64 / 64];
    uint8_t map[MAP_SIZE];
} TracerState;

static inline void map_line_touched(TracerState *s, uint32_t index)
{
    s->map_lines[index >> 12] |= 1ULL << ((index >> 6) & 63);
}

/* ------------------------------------------------------------------------ */
/* Hook callbacks (run without the GIL)                                      */
/* ------------------------------------------------------------------------ */

static void clear_stop_pending(TracerState *s)
{
    s->stop_pending = 0;
    s->budget = s->saved_budget;
}

static uint64_t load_le64(const uint8_t *p)
{
    /* The guest is little-endian whatever the host is; compilers turn this
     * into a single load on little-endian hosts. */
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) {
        v = (v << 8) | p[i];
    }
    return v;
}

/* uc_mem_read takes guest-PHYSICAL addresses even with paging on (Unicorn
 * 2.1.4), so the walk is right only where the stack is identity-mapped, as
 * the kernel's is.  uc_vmem_read would translate, but its page walk sets
 * Accessed bits in the page tables: a guest-visible write that the write hook
 * never sees, so a dirty-page restore would miss it. */
/* The unwind entry of the function a return address returns into. */
static const UnwindEntry *unwind_for(const TracerState *s, uint64_t ret)
{
    uint64_t pc = ret - 1; /* the call, which may be the function's last instruction */
    uint32_t lo = 0, hi = s->nunwind;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (s->unwind[mid].end <= pc) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo < s->nunwind && s->unwind[lo].start <= pc && pc < s->unwind[lo].end) {
        return &s->unwind[lo];
    }
    return NULL;
}

static uint8_t *bank_host(TracerState *s, uint64_t phys, uint64_t size, uint32_t *bank);

/* uc_mem_read's answer: when `direct`, straight from the RAM bank that holds all `n` bytes
 * (the very memory Unicorn reads there), through Unicorn otherwise or outside the banks. */
static int ram_read(TracerState *s, void *uc, uint64_t addr, uint8_t *out, uint64_t n,
                    int direct)
{
    const uint8_t *host = direct ? bank_host(s, addr, n, NULL) : NULL;
    if (host != NULL) {
        memcpy(out, host, (size_t)n);
        return 0;
    }
    return s->mem_read(uc, addr, out, n);
}

/* Frames are read directly only with direct_reads (the lean runs). */
static int guest_read(TracerState *s, void *uc, uint64_t addr, uint8_t *out, uint64_t n)
{
    return ram_read(s, uc, addr, out, n, s->direct_reads);
}

static uint32_t walk_frames(TracerState *s, void *uc, uint64_t rsp, uint64_t rbp,
                            uint64_t *frames)
{
    uint8_t buf[16];
    uint32_t n = 0;
    /* At a function's entry or its ret the return address is on top of the
     * stack, not behind rbp: the frame there is the caller's. */
    if (guest_read(s, uc, rsp, buf, 8) != 0) {
        return 0;
    }
    frames[n++] = load_le64(buf);
    if (s->nunwind > 0) {
        /* the Microsoft x64 layout: each caller's entry says where its saved
         * rbp and return address are; rising rbp values, as below */
        while (n < MAX_FRAMES && rbp != 0 && (rbp & 7) == 0) {
            const UnwindEntry *u = unwind_for(s, frames[n - 1]);
            uint8_t word[8];
            if (u == NULL || guest_read(s, uc, rbp + (uint64_t)u->ret, word, 8) != 0) {
                break;
            }
            uint64_t ret = load_le64(word);
            if (guest_read(s, uc, rbp + (uint64_t)u->saved_rbp, word, 8) != 0) {
                break;
            }
            uint64_t next = load_le64(word);
            frames[n++] = ret;
            if (next <= rbp) {
                break;
            }
            rbp = next;
        }
        return n;
    }
    /* Requiring rising, aligned frame pointers ends the walk on a corrupt
     * or absent chain instead of looping or reading junk forever. */
    while (n < MAX_FRAMES && rbp != 0 && (rbp & 7) == 0 && rbp <= UINT64_MAX - 15) {
        if (guest_read(s, uc, rbp, buf, 16) != 0) {
            break;
        }
        uint64_t next = load_le64(buf);
        frames[n++] = load_le64(buf + 8);
        if (next <= rbp) {
            break;
        }
        rbp = next;
    }
    return n;
}

static void record_block(TracerState *s, uint64_t address);
static void record_entry(TracerState *s, uint64_t address);
static void mark_page(TracerState *s, uint64_t page);
static void console_put(TracerState *s, uint8_t byte);
#include "bulk.h"
#include "guard.h"
#include "dirtycount.h"

/* The budget stopped the guest at the watchdog's checkpoint, before the instruction at `pc`
 * runs: whether the guest goes on from here with no stop, as the watchdog would let it after
 * one. Only where the watchdog's verdict is progress: a page Dirty now that was not at the
 * last checkpoint (a count whose walk gives up is no verdict: no early stop, as there), or
 * `pc` in a bulk routine. The next checkpoint is then armed as the watchdog arms it, before
 * it the next probe if that comes first. Any other stop is the owner's: a stalled run, the
 * run's budget, a service or an arrival of the cycle search at the same count, no tables to
 * count. The caller makes what the guest's resume would make: its block entry at `pc`. */
static NOINLINE int checkpoint_passes(TracerState *s, uint64_t pc)
{
    if (!s->ck_on || s->icount != s->ck_next || s->budget != s->ck_next ||
        s->bulk_limit != s->ck_next || s->icount >= s->ck_run_budget || s->stop_pending ||
        s->service_pending || s->stop_hit || s->exit_hit || s->nbanks == 0 ||
        s->reg_write == NULL) {
        return 0;
    }
    const Bank *low = &s->banks[0];
    int64_t count = dirty_count(low->host, low->base, low->size, s->ck_root, s->ck_level,
                                s->ck_max_pages, s->ck_max_tables);
    int progress = count < 0 || count > s->ck_count;
    for (uint32_t i = 0; !progress && i < s->ck_nranges; i++) {
        progress = s->ck_ranges[i][0] <= pc && pc < s->ck_ranges[i][1];
    }
    if (!progress) {
        return 0;
    }
    if (count >= 0) {
        s->ck_count = count;
    }
    s->ck_passed++;
    uint64_t room = s->ck_run_budget - s->icount;
    s->ck_next = s->icount + (s->ck_interval < room ? s->ck_interval : room);
    uint64_t budget = s->ck_next;
    if (s->probe_on && s->probe_at != UINT64_MAX) {
        uint64_t own = s->icount - s->bulk_units;
        uint64_t probe = s->icount + (s->probe_at > own ? s->probe_at - own : 0);
        budget = probe < budget ? probe : budget;
    }
    s->budget = budget;
    s->bulk_limit = s->ck_next;
    return 1;
}

static void bc_drop(struct BlockCount *bc, int all);

/* A checkpoint passed in the code hook, before the instruction at `pc`: the guest starts
 * again there, as after a stop. The blocks made precise for the stop count whole again, as
 * `extend` makes them, and the block the guest is in is left at once: Unicorn ends it right
 * after the hook when its pc is written, and goes on at `pc` with a block entry of its own,
 * where the instruction is announced again. */
static void resume_at(TracerState *s, void *uc, uint64_t pc)
{
    if (s->bc != NULL) {
        bc_drop(s->bc, 0);
    }
    (void)s->reg_write(uc, UC_X86_REG_RIP, &pc);
}

#include "blockcount.h"

/* Outside a run, after the watched addresses or bulk sites changed. */
static int sync_points(TracerState *s)
{
    if (s->bc != NULL && bc_sync_points(s, s->bc) < 0) {
        PyErr_SetString(PyExc_RuntimeError, "uc_hook_add failed for a point");
        return -1;
    }
    return 0;
}

/* Out of line so the common case of the code hook stays a few instructions. */
static void rebuild_filter(TracerState *s);

/* An arrival at a stop_when_same address: whether it stops the guest. */
static NOINLINE int same_arrival(TracerState *s, void *uc)
{
    uint64_t regs[SAME_MAX];
    for (uint32_t r = 0; r < s->same_nregs; r++) {
        regs[r] = 0;
        (void)s->reg_read(uc, s->same_ids[r], &regs[r]);
    }
    /* as a stop re-armed here would: this instruction is no second arrival */
    s->stop_armed_at = s->icount;
    if (!s->same_have_first) {
        memcpy(s->same_first, regs, sizeof(uint64_t) * s->same_nregs);
        s->same_have_first = 1;
        return 0;
    }
    s->same_arrivals++;
    if (memcmp(regs, s->same_first, sizeof(uint64_t) * s->same_nregs) == 0) {
        return 1;
    }
    if (s->same_arrivals >= s->same_max) {
        s->same_on = 0;
        s->stop_addr = UINT64_MAX;
        rebuild_filter(s);
    }
    return 0;
}

static NOINLINE void watch_check(TracerState *s, void *uc, uint64_t address)
{
    if (address == s->stop_addr && s->icount != s->stop_armed_at &&
        (s->same_on ? same_arrival(s, uc) : --s->stop_left == 0)) {
        /* stop like the budget does: before the instruction, uncounted, so
         * it runs (and gives its watch event) when the guest resumes */
        s->stop_addr = UINT64_MAX;
        s->same_on = 0;
        s->stop_hit = 1;
        s->budget = s->icount;
        s->bulk_limit = s->icount;
        return;
    }
    uint32_t i = 0;
    while (i < s->nwatched && s->watched[i] < address) {
        i++;
    }
    if (i == s->nwatched || s->watched[i] != address) {
        /* a watched address is never fast-forwarded: its events would go */
        for (uint32_t b = 0; b < s->nbulk; b++) {
            if (s->bulk_sites[b] == address) {
                if (s->bulk_kinds[b] == BULK_OUTSB) {
                    console_forward(s, uc, address, 0);
                } else {
                    bulk_forward(s, uc, address, s->bulk_kinds[b]);
                }
                return;
            }
        }
        return;
    }
    s->events_seen++;
    uint64_t regs[W_NREGS];
    for (int r = 0; r < W_NREGS; r++) {
        regs[r] = 0;
        (void)s->reg_read(uc, watch_regs[r], &regs[r]);
    }
    if (s->guard != NULL) {
        guard_event(s, s->guard, uc, address, regs);
    }
    if (s->nevents == EVENT_CAP) {
        s->events_dropped++;
        return;
    }
    WatchEvent *e = &s->events[s->nevents++];
    e->address = address;
    e->instructions = s->icount;
    memcpy(e->regs, regs, sizeof(regs));
    e->nframes = walk_frames(s, uc, e->regs[W_RSP], e->regs[W_RBP], e->frames);
}

/* Arm the search of stop_when_same at `address`, its registers set. */
static void arm_same(TracerState *s, uint64_t address, uint32_t max_arrivals)
{
    s->same_max = max_arrivals;
    s->same_on = 1;
    s->stop_addr = address;
    s->stop_left = 1;
    s->stop_armed_at = s->icount;
    s->stop_hit = 0;
    rebuild_filter(s);
}

/* A probe of the cycle search at its count, made here rather than at a stop (see
 * start_probes): logged, the next one armed at twice the count outside bulk moves (or the
 * budget's limit, if that comes first), and a search for an arrival at `block` with the same
 * registers armed as stop_when_same arms it, where the search may stop. As the owner's
 * probe does at a stop, except that a run with too many pages written to capture is found
 * so only when an arrival stops (the owner then turns probe_search off). */
static NOINLINE void probe_natively(TracerState *s, void *uc, uint64_t block, int have_block)
{
    uint64_t own = s->icount - s->bulk_units;
    if (s->probes < PROBE_LOG_MAX) {
        s->probe_log[s->probes][0] = own;
        s->probe_log[s->probes][1] = s->bulk_units;
    }
    s->probes++;
    s->probe_at = 2 * own;
    uint64_t next = s->icount + (own ? own : 1);
    s->budget = next < s->bulk_limit ? next : s->bulk_limit;
    if (!s->probe_search || !have_block) {
        return;
    }
    uint32_t lo = 0, hi = s->probe_nno_stop;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (s->probe_no_stop[mid] < block) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo < s->probe_nno_stop && s->probe_no_stop[lo] == block) {
        return;
    }
    uint64_t cr3 = 0;
    if (s->reg_read(uc, UC_X86_REG_CR3, &cr3) != 0 || (cr3 & CR3_ADDR_MASK) != s->probe_pml4) {
        return;
    }
    memcpy(s->same_ids, s->probe_ids, sizeof(int) * s->probe_nregs);
    s->same_nregs = s->probe_nregs;
    s->same_have_first = 0;
    s->same_arrivals = 0;
    arm_same(s, block, s->probe_max);
    s->probe_searches++;
    s->probe_addr = block;
}

static void code_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    TracerState *s = (TracerState *)user_data;
    (void)size;
    if (UNLIKELY(address == s->exit_addr)) {
        /* before anything else, as Unicorn's `until` comes before any hook */
        s->exit_hit = 1;
        s->emu_stop(uc);
        return;
    }
    if (s->icount < s->budget) {
        /* Watching happens only here, for instructions that will run: one
         * the budget or a service stop keeps from running is announced
         * again when the guest resumes, and must not give a second event. */
        if (UNLIKELY(address - s->watch_min <= s->watch_span)) {
            uint64_t bit = address & (WATCH_FILTER_BITS - 1);
            if (UNLIKELY((s->watch_filter[bit >> 6] >> (bit & 63)) & 1)) {
                watch_check(s, uc, address);
                /* a fast-forward may have used up the budget: stop exactly
                 * where the iterations it stood for would have stopped */
                if (UNLIKELY(s->icount >= s->budget)) {
                    if (checkpoint_passes(s, address)) {
                        resume_at(s, uc, address);
                        return;
                    }
                    s->exhausted = 1;
                    s->emu_stop(uc);
                    return;
                }
            }
        }
        s->icount++;
        return;
    }
    if (s->stop_pending) {
        /* The instruction after a service OUT: announced, but Unicorn stops
         * before running it, so it is not counted. */
        clear_stop_pending(s);
        return;
    }
    if (s->probe_on && s->budget < s->bulk_limit) {
        /* a probe's count: made here, in the block recorded last, and the guest goes on */
        probe_natively(s, uc, s->ring[(s->ring_pos - 1) & (RING_SIZE - 1)], s->ring_pos != 0);
        if (s->icount < s->budget) {
            code_hook(uc, address, size, user_data);
            return;
        }
    }
    if (checkpoint_passes(s, address)) {
        resume_at(s, uc, address);
        return;
    }
    /* Unicorn checks for a stop request right after the code hook, so the
     * instruction this hook announced is not executed and the count stays
     * exactly at the budget. */
    s->exhausted = 1;
    s->emu_stop(uc);
}

static void record_block(TracerState *s, uint64_t address)
{
    s->ring[s->ring_pos & (RING_SIZE - 1)] = address;
    s->ring_pos++;
    if (s->coverage_on) {
        /* Fibonacci hashing: the top 16 bits of the product depend on every
         * address bit, unlike a plain mask of the low bits. */
        uint32_t cur = (uint32_t)((address * COVERAGE_MULTIPLIER) >> 48);
        map_line_touched(s, cur ^ s->prev_loc);
        uint8_t *counter = &s->map[cur ^ s->prev_loc];
        /* Saturating, so a hot loop can never wrap its edge back to zero. */
        if (*counter != 0xff) {
            (*counter)++;
        }
        s->prev_loc = cur >> 1;
    }
}

/* A block entry: recorded, but for the block a resume starts mid-way, which an
 * uninterrupted run has no entry for (quiet_resume). */
static void record_entry(TracerState *s, uint64_t address)
{
    if (s->quiet_block) {
        s->quiet_block = 0;
    } else {
        record_block(s, address);
    }
}

static void block_hook_counting(TracerState *s, void *uc, uint64_t address, uint32_t size);

static void block_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    TracerState *s = (TracerState *)user_data;
    if (UNLIKELY(address == s->exit_addr)) {
        /* a block the guest never enters under Unicorn's `until`: the code
         * hook at its first instruction stops it, counting off */
        if (s->bc != NULL) {
            s->exit_hit = 1;
            s->emu_stop(uc);
        }
        return;
    }
    if (s->bc != NULL) {
        block_hook_counting(s, uc, address, size);
        return;
    }
    if (s->stop_pending) {
        /* The service OUT's stop was honoured without announcing the next
         * instruction to this tracer: at the next block's entry check when
         * the OUT ended its block, or before any code hook when another one
         * is registered (Unicorn then checks for a stop before calling them).
         * A block starting means the guest was resumed, so the announcement
         * the code hook was told to ignore will never come. */
        clear_stop_pending(s);
    }
    record_entry(s, address);
}

/* The block hook while blocks are counted (see blockcount.h): the entry is
 * recorded as without counting, once, and a budget that ends at the entry
 * stops the guest there, as the code hook would at the first instruction. */
static void block_hook_counting(TracerState *s, void *uc, uint64_t address, uint32_t size)
{
    if (s->stop_pending) {
        clear_stop_pending(s);
    }
    int action = bc_entry(s, s->bc, uc, address, size);
    if (action == BLOCK_RESTARTED) {
        return;
    }
    record_entry(s, address);
    if (action == BLOCK_COUNTED && s->bc->cur_console) {
        console_forward(s, uc, address, 1);
    }
    if (action == BLOCK_STOP) {
        s->exhausted = 1;
        s->emu_stop(uc);
    }
}

static uint64_t hash_page(uint64_t page)
{
    return page * COVERAGE_MULTIPLIER;
}

/* Returns 0 on allocation failure (the set is left intact). */
static int other_grow(TracerState *s)
{
    size_t new_cap = s->other_cap ? s->other_cap * 2 : 64;
    uint64_t *slots = calloc(new_cap, sizeof(uint64_t));
    if (slots == NULL) {
        return 0;
    }
    for (size_t i = 0; i < s->other_cap; i++) {
        uint64_t key = s->other[i];
        if (key == 0) {
            continue;
        }
        size_t j = (size_t)(hash_page(key) >> 32) & (new_cap - 1);
        while (slots[j] != 0) {
            j = (j + 1) & (new_cap - 1);
        }
        slots[j] = key;
    }
    free(s->other);
    s->other = slots;
    s->other_cap = new_cap;
    return 1;
}

static void other_add(TracerState *s, uint64_t page)
{
    /* page < 2^52, so the key can never be 0 */
    uint64_t key = page + 1;
    if ((s->other_len + 1) * 2 > s->other_cap && !other_grow(s)) {
        /* Out of memory inside a hook: losing the page silently would make
         * a later partial restore wrong, so poison the set instead. */
        s->unknown = 1;
        return;
    }
    size_t j = (size_t)(hash_page(key) >> 32) & (s->other_cap - 1);
    while (s->other[j] != 0) {
        if (s->other[j] == key) {
            return;
        }
        j = (j + 1) & (s->other_cap - 1);
    }
    s->other[j] = key;
    s->other_len++;
}

static inline void region_mark(Region *r, uint64_t index)
{
    uint64_t bit = 1ULL << (index & 63);
    uint64_t *word = &r->bitmap[index >> 6];
    if (!(*word & bit)) {
        *word |= bit;
        r->dirty[r->ndirty++] = (uint32_t)index;
    }
}

static void mark_page(TracerState *s, uint64_t page)
{
    Region *r;
    if (s->nregions > 0) {
        r = &s->regions[s->last_region];
        /* Unsigned wrap turns "below the base" into "too large". */
        if (page - r->first_page < r->npages) {
            region_mark(r, page - r->first_page);
            return;
        }
        for (Py_ssize_t i = 0; i < s->nregions; i++) {
            r = &s->regions[i];
            if (page - r->first_page < r->npages) {
                s->last_region = i;
                region_mark(r, page - r->first_page);
                return;
            }
        }
    }
    other_add(s, page);
}

static int paging_enabled(TracerState *s, void *uc)
{
    uint64_t cr0 = 0;
    if (s->reg_read == NULL || s->reg_read(uc, UC_X86_REG_CR0, &cr0) != 0) {
        return 1; /* cannot tell: assume the worst */
    }
    return (cr0 & CR0_PG) != 0;
}

static void write_hook(void *uc, int type, uint64_t address, int size, int64_t value,
                       void *user_data)
{
    TracerState *s = (TracerState *)user_data;
    (void)type;
    (void)value;
    /* Unicorn 2.1 reports the guest-physical address of the first byte. */
    uint64_t first = address >> PAGE_SHIFT;
    uint64_t span = size > 0 ? (uint64_t)size - 1 : 0;
    uint64_t last = (address + span) >> PAGE_SHIFT;
    mark_page(s, first);
    if (last != first) {
        /* A page-crossing store is reported once, with the physical address
         * of its first byte only.  Without paging the tail is on the next
         * physical page; with paging it is wherever the next virtual page
         * maps, which the callback cannot learn.  Mark the adjacent page
         * anyway (harmless if wrong) and flag the set as incomplete. */
        mark_page(s, last);
        if (paging_enabled(s, uc)) {
            uint64_t cr3 = 0;
            if (s->identity_cr3 != 0 && s->reg_read(uc, UC_X86_REG_CR3, &cr3) == 0 &&
                (cr3 & ~0xfffULL) == s->identity_cr3) {
                s->identity_crossings++;
            } else {
                s->unknown = 1;
            }
        }
    }
}

static void console_put(TracerState *s, uint8_t byte)
{
    if (s->console_len == s->console_cap) {
        size_t new_cap = s->console_cap ? s->console_cap * 2 : CONSOLE_INITIAL;
        if (new_cap > CONSOLE_CAP) {
            new_cap = CONSOLE_CAP;
        }
        uint8_t *grown = new_cap > s->console_cap ? realloc(s->console, new_cap) : NULL;
        if (grown == NULL) {
            /* Full, or out of memory inside a hook: losing bytes of a log is
             * acceptable as long as the loss is counted. */
            s->console_dropped++;
            return;
        }
        s->console = grown;
        s->console_cap = new_cap;
    }
    s->console[s->console_len++] = byte;
}

static void log_port(TracerState *s, int is_in, uint32_t port, int size, uint32_t value)
{
    if (s->port_log_len < PORT_LOG_SIZE) {
        PortEvent *e = &s->port_log[s->port_log_len++];
        e->port = port;
        e->value = value;
        e->size = (uint8_t)size;
        e->is_in = (uint8_t)is_in;
    }
}

static uint32_t size_mask(int size)
{
    return size >= 4 ? 0xffffffffu : (1u << (8 * size)) - 1;
}

/* Prototype of uc_cb_insn_out_t. */
static void out_hook(void *uc, uint32_t port, int size, uint32_t value, void *user_data)
{
    TracerState *s = (TracerState *)user_data;
    if (port == s->console_port) {
        console_put(s, (uint8_t)value);
        return;
    }
    if (port == s->service_port) {
        s->service_value = value;
        s->service_pending = 1;
        s->zeros_trusted = 0; /* the firmware's writes set no Dirty bit */
        if (s->bc != NULL && s->bc->cur_counted) {
            /* no code hook comes to honour the stop at the next instruction */
            s->bc->inexact = 1;
        }
        if (!s->stop_pending) {
            s->saved_budget = s->budget;
            s->budget = s->icount;
            s->stop_pending = 1;
        }
        /* The OUT itself has completed; Unicorn honours the stop at the next
         * instruction boundary, which the always-present code hook makes
         * exact (without one it would run on to the end of the block). */
        s->emu_stop(uc);
        return;
    }
    log_port(s, 0, port, size, value);
}

/* Prototype of uc_cb_insn_in_t.  Unicorn asks only the first registered IN
 * hook, so this one answers for every port. */
static uint32_t in_hook(void *uc, uint32_t port, int size, void *user_data)
{
    TracerState *s = (TracerState *)user_data;
    (void)uc;
    uint32_t mask = size_mask(size);
    if (port == s->console_port) {
        return s->console_read_value & mask;
    }
    /* No device behind the port: the bus floats high. */
    log_port(s, 1, port, size, mask);
    return mask;
}

/* ------------------------------------------------------------------------ */
/* TracerState type                                                          */
/* ------------------------------------------------------------------------ */


static void state_clear_dirty(TracerState *s)
{
    for (Py_ssize_t i = 0; i < s->nregions; i++) {
        Region *r = &s->regions[i];
        /* Clear only the bits that were set: cheaper than wiping 4 KiB of
         * bitmap for a 128 MiB region after a run that dirtied ten pages. */
        for (uint64_t k = 0; k < r->ndirty; k++) {
            uint32_t index = r->dirty[k];
            r->bitmap[index >> 6] &= ~(1ULL << (index & 63));
        }
        r->ndirty = 0;
    }
    if (s->other_len != 0) {
        memset(s->other, 0, s->other_cap * sizeof(uint64_t));
        s->other_len = 0;
    }
    s->unknown = 0;
}

static void state_free_regions(TracerState *s)
{
    if (s->regions != NULL) {
        for (Py_ssize_t i = 0; i < s->nregions; i++) {
            PyMem_RawFree(s->regions[i].bitmap);
            PyMem_RawFree(s->regions[i].dirty);
        }
        PyMem_RawFree(s->regions);
        s->regions = NULL;
    }
    s->nregions = 0;
}

static void State_dealloc(TracerState *s)
{
    state_free_regions(s);
    free(s->other);
    s->other = NULL;
    free(s->console);
    s->console = NULL;
    for (uint32_t i = 0; i < BANK_MAX; i++) {
        PyMem_RawFree(s->absent[i]);
        s->absent[i] = NULL;
    }
    PyMem_RawFree(s->zero_bits);
    s->zero_bits = NULL;
    PyMem_RawFree(s->events);
    PyMem_RawFree(s->unwind);
    PyMem_Free(s->probe_no_stop);
    PyMem_RawFree(s->guard);
    /* the owner stops counting (its hooks) before it lets the state go (detach) */
    bc_free(s->bc);
    s->bc = NULL;
    s->events = NULL;
    s->guard = NULL;
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static int parse_region(PyObject *item, Region *r)
{
    unsigned long long base, size;
    if (!PyArg_ParseTuple(item, "KK;region must be a (base, size) pair", &base, &size)) {
        return -1;
    }
    if (size == 0 || (base | size) & ((1ULL << PAGE_SHIFT) - 1)) {
        PyErr_Format(PyExc_ValueError,
                     "region (0x%llx, 0x%llx) must be non-empty and page-aligned", base, size);
        return -1;
    }
    if (base + size < base) {
        PyErr_SetString(PyExc_ValueError, "region wraps around the address space");
        return -1;
    }
    uint64_t npages = size >> PAGE_SHIFT;
    if (npages > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "region larger than 2^32 pages");
        return -1;
    }
    r->first_page = base >> PAGE_SHIFT;
    r->npages = npages;
    r->bitmap = PyMem_RawCalloc((size_t)((npages + 63) / 64), sizeof(uint64_t));
    r->dirty = PyMem_RawMalloc((size_t)npages * sizeof(uint32_t));
    if (r->bitmap == NULL || r->dirty == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static PyObject *State_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"regions",      "coverage",     "emu_stop",
                             "reg_read",     "console_port", "service_port",
                             "console_read_value", "mem_read", "reg_write", NULL};
    PyObject *regions_obj;
    int coverage;
    unsigned long long emu_stop, reg_read, mem_read = 0, reg_write = 0;
    unsigned int console_port = 0xe9, service_port = 0xf0, console_read_value = 0xe9;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OpKK|$IIIKK", kwlist, &regions_obj, &coverage,
                                     &emu_stop, &reg_read, &console_port, &service_port,
                                     &console_read_value, &mem_read, &reg_write)) {
        return NULL;
    }
    if (console_port > 0xffff || service_port > 0xffff || console_port == service_port) {
        PyErr_SetString(PyExc_ValueError,
                        "console and service ports must be distinct 16-bit port numbers");
        return NULL;
    }
    if (emu_stop == 0) {
        PyErr_SetString(PyExc_ValueError, "emu_stop address must not be 0");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(regions_obj, "regions must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    TracerState *s = (TracerState *)type->tp_alloc(type, 0);
    if (s == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    /* tp_alloc zero-fills, so counters, map, ring and set start empty. */
    s->budget = UINT64_MAX;
    s->bulk_limit = UINT64_MAX;
    s->watch_min = UINT64_MAX;
    s->mem_read = (uc_mem_read_fn)(uintptr_t)mem_read;
    s->reg_write = (uc_reg_write_fn)(uintptr_t)reg_write;
    s->memo_site = UINT64_MAX;
    s->stop_addr = UINT64_MAX;
    s->exit_addr = UINT64_MAX;
    s->coverage_on = coverage;
    s->emu_stop = (uc_emu_stop_fn)(uintptr_t)emu_stop;
    s->reg_read = (uc_reg_read_fn)(uintptr_t)reg_read;
    s->console_port = console_port;
    s->service_port = service_port;
    s->console_read_value = console_read_value;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > 0) {
        s->regions = PyMem_RawCalloc((size_t)n, sizeof(Region));
        if (s->regions == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        /* Count the region before parsing so a failure frees what it got. */
        s->nregions = i + 1;
        if (parse_region(PySequence_Fast_GET_ITEM(seq, i), &s->regions[i]) < 0) {
            goto fail;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        for (Py_ssize_t j = i + 1; j < n; j++) {
            Region *a = &s->regions[i], *b = &s->regions[j];
            if (a->first_page < b->first_page + b->npages &&
                b->first_page < a->first_page + a->npages) {
                PyErr_Format(PyExc_ValueError, "regions %zd and %zd overlap", i, j);
                goto fail;
            }
        }
    }
    Py_DECREF(seq);
    return (PyObject *)s;

fail:
    Py_DECREF(seq);
    Py_DECREF(s);
    return NULL;
}

static int compare_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static PyObject *State_reset(TracerState *s, PyObject *arg)
{
    unsigned long long budget = PyLong_AsUnsignedLongLong(arg);
    if (budget == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    s->icount = 0;
    s->budget = budget;
    s->bulk_limit = budget;
    s->stop_pending = 0;
    s->exhausted = 0;
    s->prev_loc = 0;
    s->ring_pos = 0;
    s->identity_crossings = 0;
    s->console_len = 0;
    s->console_dropped = 0;
    s->service_pending = 0;
    s->port_log_len = 0;
    s->nevents = 0;
    s->events_dropped = 0;
    if (s->guard != NULL) {
        guard_clear(s->guard);
    }
    s->bulk_units = 0;
    s->console_units = 0;
    s->copies_left_absent = 0;
    s->pages_left_absent = 0;
    s->zeros_trusted = s->zero_bits != NULL;
    s->zeros_taken = 0;
    s->memo_site = UINT64_MAX;
    if (s->stop_addr != UINT64_MAX) {
        s->stop_addr = UINT64_MAX;
        rebuild_filter(s);
    }
    s->stop_left = 0;
    s->stop_hit = 0;
    s->exit_hit = 0;
    s->probe_on = 0; /* a run's probes are started after its reset */
    s->ck_on = 0;    /* and its checkpoints */
    s->ck_passed = 0;
    s->same_on = 0;
    s->quiet_block = 0;
    s->events_seen = 0;
    for (size_t w = 0; w < sizeof(s->map_lines) / sizeof(s->map_lines[0]); w++) {
        for (uint64_t bits = s->map_lines[w]; bits != 0; bits &= bits - 1) {
            memset(s->map + (w * 64 + (size_t)__builtin_ctzll(bits)) * 64, 0, 64);
        }
        s->map_lines[w] = 0;
    }
    state_clear_dirty(s);
    if (s->bc != NULL) {
        s->bc->cur_counted = 0;
        s->bc->inexact = 0;
    }
    Py_RETURN_NONE;
}

/* Before the memory is put back after a run: the ranges made precise for it go
 * stale, and the blocks translated over those of the run before are dropped
 * (Unicorn finds them by a page walk, which sets Accessed bits the restore
 * then puts back). */
static PyObject *State_end_run(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    if (s->bc != NULL) {
        bc_clean_stale(s->bc);
        bc_drop(s->bc, 0);
    }
    Py_RETURN_NONE;
}

static PyObject *State_extend(TracerState *s, PyObject *args)
{
    unsigned long long budget, limit;
    PyObject *limit_obj = Py_None;
    if (!PyArg_ParseTuple(args, "K|O", &budget, &limit_obj)) {
        return NULL;
    }
    if (limit_obj == Py_None) {
        limit = budget;
    } else {
        limit = PyLong_AsUnsignedLongLong(limit_obj);
        if (limit == (unsigned long long)-1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    if (budget < s->icount || limit < budget) {
        PyErr_SetString(PyExc_ValueError, "a budget cannot be extended below the count, "
                                          "nor a limit below the budget");
        return NULL;
    }
    s->bulk_limit = limit;
    if (s->bc != NULL) {
        /* the guest resumes: the blocks made precise for this stop count whole again */
        bc_drop(s->bc, 0);
    }
    /* While a service stop is pending the real budget is parked. */
    if (s->stop_pending) {
        s->saved_budget = budget;
    } else {
        s->budget = budget;
    }
    s->exhausted = 0;
    Py_RETURN_NONE;
}

/* The code hook's filter lets through the watched addresses and the bulk
 * sites. */
static void rebuild_filter(TracerState *s)
{
    uint64_t lo = UINT64_MAX, hi = 0;
    memset(s->watch_filter, 0, sizeof(s->watch_filter));
    uint32_t n = s->nwatched + s->nbulk + (s->stop_addr != UINT64_MAX);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t a = i < s->nwatched ? s->watched[i]
                     : i < s->nwatched + s->nbulk ? s->bulk_sites[i - s->nwatched]
                                                   : s->stop_addr;
        uint64_t bit = a & (WATCH_FILTER_BITS - 1);
        s->watch_filter[bit >> 6] |= 1ULL << (bit & 63);
        lo = a < lo ? a : lo;
        hi = a > hi ? a : hi;
    }
    if (lo == UINT64_MAX && hi == 0) {
        s->watch_min = UINT64_MAX;
        s->watch_span = 0;
    } else {
        s->watch_min = lo;
        s->watch_span = hi - lo;
    }
}

static PyObject *State_bulk(TracerState *s, PyObject *args)
{
    PyObject *sites_obj, *banks_obj;
    if (!PyArg_ParseTuple(args, "OO", &sites_obj, &banks_obj)) {
        return NULL;
    }
    PyObject *sites = PySequence_Fast(sites_obj, "sites must be a sequence");
    if (sites == NULL) {
        return NULL;
    }
    PyObject *banks = PySequence_Fast(banks_obj, "banks must be a sequence");
    if (banks == NULL) {
        Py_DECREF(sites);
        return NULL;
    }
    Py_ssize_t nsites = PySequence_Fast_GET_SIZE(sites), nbanks = PySequence_Fast_GET_SIZE(banks);
    uint64_t addr[BULK_MAX];
    uint8_t kinds[BULK_MAX];
    Bank parsed[BANK_MAX];
    if (nsites > BULK_MAX || nbanks > BANK_MAX) {
        PyErr_Format(PyExc_ValueError, "at most %d bulk sites and %d banks", BULK_MAX, BANK_MAX);
        goto fail;
    }
    if (nsites > 0 && s->reg_write == NULL) {
        PyErr_SetString(PyExc_ValueError, "bulk sites need the reg_write address");
        goto fail;
    }
    for (Py_ssize_t i = 0; i < nsites; i++) {
        unsigned long long a;
        int kind;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(sites, i), "Ki;a site is (address, kind)",
                              &a, &kind)) {
            goto fail;
        }
        if (kind != BULK_STOSQ && kind != BULK_MOVSQ && kind != BULK_OUTSB) {
            PyErr_Format(PyExc_ValueError, "unknown bulk kind %d", kind);
            goto fail;
        }
        addr[i] = a;
        kinds[i] = (uint8_t)kind;
    }
    for (Py_ssize_t i = 0; i < nbanks; i++) {
        unsigned long long base, size, host;
        int absent_zero = 0;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(banks, i),
                              "KKK|p;a bank is (base, size, host_address[, absent_zero])",
                              &base, &size, &host, &absent_zero)) {
            goto fail;
        }
        if (host == 0 || size == 0 || base + size < base) {
            PyErr_SetString(PyExc_ValueError, "bad RAM bank");
            goto fail;
        }
        parsed[i] = (Bank){base, size, (uint8_t *)(uintptr_t)host, absent_zero};
    }
    for (Py_ssize_t i = 0; i < BANK_MAX; i++) {
        size_t len = i < nbanks && parsed[i].absent_zero
                         ? (size_t)((parsed[i].size >> PAGE_SHIFT) + 7) / 8 : 0;
        if (len != s->absent_len[i] || (len > 0 && s->absent[i] == NULL)) {
            PyMem_RawFree(s->absent[i]);
            s->absent[i] = len > 0 ? PyMem_RawCalloc(len, 1) : NULL;
            if (len > 0 && s->absent[i] == NULL) {
                parsed[i].absent_zero = 0; /* no room to note the pages: fill them all */
                len = 0;
            }
            s->absent_len[i] = len;
        } else if (len > 0) {
            memset(s->absent[i], 0, len);
        }
        s->absent_lo[i] = s->absent_hi[i] = 0;
    }
    Py_DECREF(sites);
    Py_DECREF(banks);
    memcpy(s->bulk_sites, addr, sizeof(uint64_t) * (size_t)nsites);
    memcpy(s->bulk_kinds, kinds, (size_t)nsites);
    memcpy(s->banks, parsed, sizeof(Bank) * (size_t)nbanks);
    s->nbulk = (uint32_t)nsites;
    s->nbanks = (uint32_t)nbanks;
    s->memo_site = UINT64_MAX;
    rebuild_filter(s);
    if (sync_points(s) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;

fail:
    Py_DECREF(sites);
    Py_DECREF(banks);
    return NULL;
}

static PyObject *State_stop_at(TracerState *s, PyObject *args)
{
    PyObject *addr_obj;
    unsigned long long nth = 1;
    if (!PyArg_ParseTuple(args, "O|K", &addr_obj, &nth)) {
        return NULL;
    }
    if (addr_obj == Py_None) {
        s->stop_addr = UINT64_MAX;
    } else {
        unsigned long long a = PyLong_AsUnsignedLongLong(addr_obj);
        if (a == (unsigned long long)-1 && PyErr_Occurred()) {
            return NULL;
        }
        if (a == UINT64_MAX || nth == 0) {
            PyErr_SetString(PyExc_ValueError, "bad stop address or arrival count");
            return NULL;
        }
        s->stop_addr = a;
        s->stop_left = nth;
        s->stop_armed_at = s->icount;
    }
    s->same_on = 0;
    s->stop_hit = 0;
    rebuild_filter(s);
    Py_RETURN_NONE;
}

/* Register ids for stop_when_same: 1 to SAME_MAX Unicorn ids into `out`; how many, or -1
 * with the error set. */
static Py_ssize_t parse_register_ids(PyObject *obj, int out[SAME_MAX])
{
    PyObject *ids = PySequence_Fast(obj, "register ids must be a sequence");
    if (ids == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ids);
    if (n < 1 || n > SAME_MAX) {
        Py_DECREF(ids);
        PyErr_Format(PyExc_ValueError, "between 1 and %d registers", SAME_MAX);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(ids, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(ids);
            return -1;
        }
        out[i] = (int)v;
    }
    Py_DECREF(ids);
    return n;
}

static PyObject *State_stop_when_same(TracerState *s, PyObject *args)
{
    unsigned long long a;
    PyObject *ids_obj;
    unsigned int max_arrivals;
    if (!PyArg_ParseTuple(args, "KOI", &a, &ids_obj, &max_arrivals)) {
        return NULL;
    }
    if (a == UINT64_MAX || max_arrivals == 0) {
        PyErr_SetString(PyExc_ValueError, "bad stop address or arrival count");
        return NULL;
    }
    if (ids_obj != Py_None) {
        int parsed[SAME_MAX];
        Py_ssize_t n = parse_register_ids(ids_obj, parsed);
        if (n < 0) {
            return NULL;
        }
        memcpy(s->same_ids, parsed, sizeof(int) * (size_t)n);
        s->same_nregs = (uint32_t)n;
        s->same_have_first = 0;
        s->same_arrivals = 0;
    } else if (!s->same_have_first) {
        PyErr_SetString(PyExc_ValueError, "no search to go on with");
        return NULL;
    }
    arm_same(s, a, max_arrivals);
    Py_RETURN_NONE;
}

static PyObject *State_set_exit(TracerState *s, PyObject *arg)
{
    uint64_t a = UINT64_MAX;
    if (arg != Py_None) {
        a = PyLong_AsUnsignedLongLong(arg);
        if (a == (uint64_t)-1 && PyErr_Occurred()) {
            return NULL;
        }
    }
    s->exit_addr = a;
    s->exit_hit = 0;
    Py_RETURN_NONE;
}

static PyObject *State_start_probes(TracerState *s, PyObject *args)
{
    unsigned long long first, pml4;
    PyObject *ids_obj, *no_stop_obj;
    unsigned int max_arrivals;
    if (!PyArg_ParseTuple(args, "KKOIO", &first, &pml4, &ids_obj, &max_arrivals,
                          &no_stop_obj)) {
        return NULL;
    }
    if (max_arrivals == 0 || first == 0) {
        PyErr_SetString(PyExc_ValueError, "arrivals and a first probe must be above 0");
        return NULL;
    }
    /* None: the registers and addresses of the last call (a run's are its job's) */
    if (ids_obj != Py_None) {
        int parsed[SAME_MAX];
        Py_ssize_t n = parse_register_ids(ids_obj, parsed);
        if (n < 0) {
            return NULL;
        }
        memcpy(s->probe_ids, parsed, sizeof(int) * (size_t)n);
        s->probe_nregs = (uint32_t)n;
    }
    if (no_stop_obj != Py_None) {
        PyObject *no_stop = PySequence_Fast(no_stop_obj, "no_stop must be a sequence");
        if (no_stop == NULL) {
            return NULL;
        }
        Py_ssize_t m = PySequence_Fast_GET_SIZE(no_stop);
        uint64_t *addresses = PyMem_Malloc(sizeof(uint64_t) * (size_t)(m ? m : 1));
        if (addresses == NULL) {
            Py_DECREF(no_stop);
            return PyErr_NoMemory();
        }
        for (Py_ssize_t i = 0; i < m; i++) {
            addresses[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(no_stop, i));
            if (addresses[i] == (uint64_t)-1 && PyErr_Occurred()) {
                Py_DECREF(no_stop);
                PyMem_Free(addresses);
                return NULL;
            }
        }
        Py_DECREF(no_stop);
        qsort(addresses, (size_t)m, sizeof(uint64_t), compare_u64);
        PyMem_Free(s->probe_no_stop);
        s->probe_no_stop = addresses;
        s->probe_nno_stop = (uint32_t)m;
    }
    s->probe_max = max_arrivals;
    s->probe_pml4 = pml4 & CR3_ADDR_MASK;
    s->probe_at = first;
    s->probes = 0;
    s->probe_searches = 0;
    s->probe_addr = UINT64_MAX;
    s->probe_search = 1;
    s->probe_on = 1;
    Py_RETURN_NONE;
}

static PyObject *State_stop_probes(TracerState *s, PyObject *arg)
{
    int searches_only = PyObject_IsTrue(arg);
    if (searches_only < 0) {
        return NULL;
    }
    s->probe_search = 0;
    if (!searches_only) {
        s->probe_on = 0;
        s->probe_at = UINT64_MAX;
    }
    Py_RETURN_NONE;
}

static PyObject *State_probe_log(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    uint64_t n = s->probes < PROBE_LOG_MAX ? s->probes : PROBE_LOG_MAX;
    PyObject *out = PyList_New((Py_ssize_t)n);
    for (uint64_t i = 0; out != NULL && i < n; i++) {
        PyObject *item = Py_BuildValue("(KK)", (unsigned long long)s->probe_log[i][0],
                                       (unsigned long long)s->probe_log[i][1]);
        if (item == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)i, item);
    }
    return out;
}

static PyObject *State_checkpoint_walk(TracerState *s, PyObject *args)
{
    unsigned long long root;
    int level;
    long long max_pages, max_tables;
    PyObject *ranges_obj;
    if (!PyArg_ParseTuple(args, "KiLLO", &root, &level, &max_pages, &max_tables, &ranges_obj)) {
        return NULL;
    }
    PyObject *ranges = PySequence_Fast(ranges_obj, "ranges must be a sequence");
    if (ranges == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ranges);
    uint64_t parsed[CK_RANGES_MAX][2];
    if (n > CK_RANGES_MAX) {
        Py_DECREF(ranges);
        return PyErr_Format(PyExc_ValueError, "at most %d ranges", CK_RANGES_MAX);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long lo, hi;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(ranges, i), "KK;a range is (start, end)",
                              &lo, &hi)) {
            Py_DECREF(ranges);
            return NULL;
        }
        parsed[i][0] = lo;
        parsed[i][1] = hi;
    }
    Py_DECREF(ranges);
    memcpy(s->ck_ranges, parsed, sizeof(parsed[0]) * (size_t)n);
    s->ck_nranges = (uint32_t)n;
    s->ck_root = root;
    s->ck_level = level;
    s->ck_max_pages = max_pages;
    s->ck_max_tables = max_tables;
    s->ck_walk = 1;
    Py_RETURN_NONE;
}

static PyObject *State_checkpoints(TracerState *s, PyObject *args)
{
    int on;
    unsigned long long next, run_budget, interval;
    long long count;
    if (!PyArg_ParseTuple(args, "pKLKK", &on, &next, &count, &run_budget, &interval)) {
        return NULL;
    }
    if (on && (!s->ck_walk || interval == 0)) {
        PyErr_SetString(PyExc_ValueError, "checkpoints need checkpoint_walk and an interval");
        return NULL;
    }
    s->ck_on = on;
    s->ck_next = next;
    s->ck_count = count;
    s->ck_run_budget = run_budget;
    s->ck_interval = interval;
    Py_RETURN_NONE;
}

static PyObject *State_get_checkpoint(TracerState *s, void *closure)
{
    (void)closure;
    /* (the next checkpoint's count, Dirty leaves at the last one, passed here since reset) */
    return Py_BuildValue("(KLK)", (unsigned long long)s->ck_next, (long long)s->ck_count,
                         (unsigned long long)s->ck_passed);
}

static PyObject *State_get_probe(TracerState *s, void *closure)
{
    (void)closure;
    /* (next probe's count or None, probes made, searches armed, where the last one was) */
    PyObject *at = s->probe_on && s->probe_at != UINT64_MAX
                       ? PyLong_FromUnsignedLongLong(s->probe_at) : Py_NewRef(Py_None);
    if (at == NULL) {
        return NULL;
    }
    return Py_BuildValue("(NKKK)", at, (unsigned long long)s->probes,
                         (unsigned long long)s->probe_searches,
                         (unsigned long long)s->probe_addr);
}

static PyObject *State_quiet_resume(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    s->quiet_block = 1;
    Py_RETURN_NONE;
}

/* Remove every hook of block counting and forget it. */
static void bc_stop(TracerState *s)
{
    BlockCount *bc = s->bc;
    if (bc == NULL) {
        return;
    }
    s->bc = NULL;
    bc_drop(bc, 1);
    bc_clean_stale(bc);
    for (uint32_t i = 0; i < bc->npoints; i++) {
        (void)bc->hook_del(bc->uc, bc->points[i].hook);
    }
    bc_free(bc);
}

/* A sequence of at most `max` (start, end) pairs with start < end; the count, or -1. */
static Py_ssize_t parse_ranges(PyObject *obj, uint64_t (*out)[2], Py_ssize_t max,
                               const char *what)
{
    PyObject *seq = PySequence_Fast(obj, "ranges must be a sequence");
    if (seq == NULL) {
        return -1;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > max) {
        PyErr_Format(PyExc_ValueError, "at most %zd %s ranges", max, what);
        n = -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long lo, hi;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KK;a range is (start, end)",
                              &lo, &hi)) {
            n = -1;
            break;
        }
        if (lo >= hi) {
            PyErr_Format(PyExc_ValueError, "%s range (0x%llx, 0x%llx) is empty", what, lo, hi);
            n = -1;
            break;
        }
        out[i][0] = lo;
        out[i][1] = hi;
    }
    Py_DECREF(seq);
    return n;
}

#define PRECISE_GIVEN_MAX 16

static PyObject *State_count_blocks(TracerState *s, PyObject *args)
{
    unsigned long long uc, hook_add, hook_del, ctl, until;
    PyObject *text_obj, *precise_obj;
    uint64_t text[BC_TEXT_MAX][2], precise[PRECISE_GIVEN_MAX][2];
    if (!PyArg_ParseTuple(args, "KKKKOOK", &uc, &hook_add, &hook_del, &ctl, &text_obj,
                          &precise_obj, &until)) {
        return NULL;
    }
    if (s->bc != NULL) {
        PyErr_SetString(PyExc_ValueError, "blocks are counted already");
        return NULL;
    }
    if (uc == 0 || hook_add == 0 || hook_del == 0 || ctl == 0 || s->reg_write == NULL) {
        PyErr_SetString(PyExc_ValueError, "counting blocks needs the engine, uc_hook_add, "
                                          "uc_hook_del, uc_ctl and reg_write");
        return NULL;
    }
    Py_ssize_t ntext = parse_ranges(text_obj, text, BC_TEXT_MAX, "text");
    Py_ssize_t nprecise = ntext < 0 ? -1
                          : parse_ranges(precise_obj, precise, PRECISE_GIVEN_MAX, "precise");
    if (nprecise < 0) {
        return NULL;
    }
    BlockCount *bc = calloc(1, sizeof(BlockCount));
    if (bc == NULL || bc_grow(bc) < 0) {
        free(bc);
        return PyErr_NoMemory();
    }
    bc->uc = (void *)(uintptr_t)uc;
    bc->hook_add = (uc_hook_add_fn)(uintptr_t)hook_add;
    bc->hook_del = (uc_hook_del_fn)(uintptr_t)hook_del;
    bc->ctl = (uc_ctl_fn)(uintptr_t)ctl;
    bc->until = until;
    bc->gen = 1;
    memcpy(bc->text, text, sizeof(uint64_t) * 2 * (size_t)ntext);
    bc->ntext = (uint32_t)ntext;
    s->bc = bc;
    for (Py_ssize_t i = 0; i < nprecise; i++) {
        if (bc_covered(bc, precise[i][0], precise[i][1]) != 0) {
            PyErr_SetString(PyExc_ValueError, "precise ranges must not overlap");
            bc_stop(s);
            return NULL;
        }
        if (bc_add_range(s, bc, bc->uc, precise[i][0], precise[i][1], 0) < 0) {
            PyErr_SetString(PyExc_RuntimeError, "uc_hook_add failed");
            bc_stop(s);
            return NULL;
        }
    }
    if (sync_points(s) < 0) {
        bc_stop(s);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *State_stop_counting_blocks(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    bc_stop(s);
    Py_RETURN_NONE;
}

static PyObject *State_settle(TracerState *s, PyObject *arg)
{
    unsigned long long pc = PyLong_AsUnsignedLongLong(arg);
    if (pc == (unsigned long long)-1 && PyErr_Occurred()) {
        return NULL;
    }
    if (s->bc == NULL) {
        Py_RETURN_TRUE;
    }
    return PyBool_FromLong(bc_settle(s->bc, s, pc) == 0);
}

static PyObject *State_block_counts(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    BlockCount *bc = s->bc;
    if (bc == NULL) {
        Py_RETURN_NONE;
    }
    PyObject *ranges = PyList_New((Py_ssize_t)bc->nranges);
    if (ranges == NULL) {
        return NULL;
    }
    for (uint32_t i = 0; i < bc->nranges; i++) {
        PyObject *r = Py_BuildValue("(KKO)", (unsigned long long)bc->ranges[i].begin,
                                    (unsigned long long)bc->ranges[i].end,
                                    bc->ranges[i].per_run ? Py_True : Py_False);
        if (r == NULL) {
            Py_DECREF(ranges);
            return NULL;
        }
        PyList_SET_ITEM(ranges, (Py_ssize_t)i, r);
    }
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:N,s:I,s:O}",
                         "counted", (unsigned long long)bc->counted,
                         "counted_instructions", (unsigned long long)bc->counted_insns,
                         "precise", (unsigned long long)bc->precise_calls,
                         "points", (unsigned long long)bc->point_calls,
                         "restarts", (unsigned long long)bc->restarts, "ranges", ranges,
                         "blocks", bc->used, "inexact", bc->inexact ? Py_True : Py_False);
}

/* The offset of the first 8-byte word at or after `from` where the maps differ, or
 * MAP_SIZE. */
static size_t next_change(const uint8_t *a, const uint8_t *b, size_t from)
{
    for (size_t w = from; w < MAP_SIZE; w += 8) {
        uint64_t wa, wb;
        memcpy(&wa, a + w, 8);
        memcpy(&wb, b + w, 8);
        if (wa != wb) {
            return w;
        }
    }
    return MAP_SIZE;
}

static PyObject *State_skip(TracerState *s, PyObject *args)
{
    unsigned long long instructions, blocks, periods;
    Py_buffer before, after;
    if (!PyArg_ParseTuple(args, "KKKy*y*", &instructions, &blocks, &periods, &before, &after)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (before.len != MAP_SIZE || after.len != MAP_SIZE) {
        PyErr_SetString(PyExc_ValueError, "coverage maps must be MAP_SIZE bytes");
        goto done;
    }
    if (instructions > s->budget - s->icount || s->stop_pending || s->ring_pos < RING_SIZE) {
        PyErr_SetString(PyExc_ValueError, "skip past the budget, during a service stop or "
                                          "before the recent blocks are full");
        goto done;
    }
    /* A period touches a few dozen edges of the 64 KiB maps: only the 8-byte words that
     * differ (few) are looked at, here and in the update below. */
    const uint8_t *b = before.buf, *a = after.buf;
    for (size_t w = next_change(a, b, 0); w < MAP_SIZE; w = next_change(a, b, w + 8)) {
        for (size_t i = w; i < w + 8; i++) {
            if (a[i] < b[i]) {
                PyErr_SetString(PyExc_ValueError, "coverage map went down");
                goto done;
            }
        }
    }
    s->icount += instructions;
    uint64_t old[RING_SIZE];
    memcpy(old, s->ring, sizeof(old));
    for (uint64_t k = 0; k < RING_SIZE; k++) {
        uint64_t n = s->ring_pos - RING_SIZE + k;
        s->ring[(n + blocks) & (RING_SIZE - 1)] = old[n & (RING_SIZE - 1)];
    }
    s->ring_pos += blocks;
    if (s->coverage_on) {
        for (size_t w = next_change(a, b, 0); w < MAP_SIZE; w = next_change(a, b, w + 8)) {
            for (size_t i = w; i < w + 8; i++) {
                uint64_t d = (uint64_t)(a[i] - b[i]);
                if (d != 0) {
                    map_line_touched(s, (uint32_t)i);
                    uint64_t v = periods >= 255 ? 255 : s->map[i] + d * periods;
                    s->map[i] = (uint8_t)(v > 255 ? 255 : v);
                }
            }
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&before);
    PyBuffer_Release(&after);
    return result;
}

/* PySequence_Fast(obj) of at most `max` items, or NULL with ValueError or
 * TypeError set; `what` names the items in the messages. */
static PyObject *bounded_sequence(PyObject *obj, Py_ssize_t max, const char *what)
{
    PyObject *seq = PySequence_Fast(obj, "expected a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > max) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "at most %zd %s, got %zd", max, what, n);
    }
    return seq;
}

static PyObject *State_watch(TracerState *s, PyObject *arg)
{
    uint64_t addresses[WATCH_MAX];
    PyObject *seq = bounded_sequence(arg, WATCH_MAX, "watched addresses");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long a = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (a == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        addresses[i] = a;
    }
    Py_DECREF(seq);
    if (n > 0) {
        if (s->reg_read == NULL || s->mem_read == NULL) {
            PyErr_SetString(PyExc_ValueError, "watching needs the reg_read and mem_read addresses");
            return NULL;
        }
        if (s->events == NULL) {
            s->events = PyMem_RawMalloc(EVENT_CAP * sizeof(WatchEvent));
            if (s->events == NULL) {
                return PyErr_NoMemory();
            }
        }
    }
    qsort(addresses, (size_t)n, sizeof(uint64_t), compare_u64);
    /* Build the new set completely before publishing it: nothing runs
     * concurrently, but a failure above must leave the old set intact. */
    uint32_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (count > 0 && s->watched[count - 1] == addresses[i]) {
            continue;
        }
        s->watched[count++] = addresses[i];
    }
    s->nwatched = count;
    rebuild_filter(s);
    if (sync_points(s) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/* unwind([(start, end, saved_rbp, ret), ...]) sorted by start, not
 * overlapping; an empty sequence restores the System V chain. */
static PyObject *State_unwind(TracerState *s, PyObject *arg)
{
    PyObject *seq = PySequence_Fast(arg, "unwind entries must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    UnwindEntry *table = NULL;
    if (n > 0) {
        if ((size_t)n > UINT32_MAX / sizeof(UnwindEntry)) {
            Py_DECREF(seq);
            return PyErr_NoMemory();
        }
        table = PyMem_RawMalloc((size_t)n * sizeof(UnwindEntry));
        if (table == NULL) {
            Py_DECREF(seq);
            return PyErr_NoMemory();
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long start, end;
        long long saved_rbp, ret;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "KKLL", &start, &end,
                              &saved_rbp, &ret)) {
            PyMem_RawFree(table);
            Py_DECREF(seq);
            return NULL;
        }
        if (start >= end || (i > 0 && start < table[i - 1].end)) {
            PyMem_RawFree(table);
            Py_DECREF(seq);
            return PyErr_Format(PyExc_ValueError,
                                "unwind entries must be sorted, non-empty, not overlapping");
        }
        table[i] = (UnwindEntry){start, end, saved_rbp, ret};
    }
    Py_DECREF(seq);
    PyMem_RawFree(s->unwind);
    s->unwind = table;
    s->nunwind = (uint32_t)n;
    Py_RETURN_NONE;
}

static PyObject *State_watched(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyTuple_New((Py_ssize_t)s->nwatched);
    if (out == NULL) {
        return NULL;
    }
    for (uint32_t i = 0; i < s->nwatched; i++) {
        PyObject *a = PyLong_FromUnsignedLongLong(s->watched[i]);
        if (a == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, (Py_ssize_t)i, a);
    }
    return out;
}

static PyObject *event_tuple(const WatchEvent *e)
{
    PyObject *frames = PyTuple_New((Py_ssize_t)e->nframes);
    if (frames == NULL) {
        return NULL;
    }
    for (uint32_t k = 0; k < e->nframes; k++) {
        PyObject *f = PyLong_FromUnsignedLongLong(e->frames[k]);
        if (f == NULL) {
            Py_DECREF(frames);
            return NULL;
        }
        PyTuple_SET_ITEM(frames, (Py_ssize_t)k, f);
    }
    /* "N" hands the frames reference to the tuple, also on failure. */
    return Py_BuildValue("(KKKKKKKKKKKN)", e->address, e->instructions, e->regs[W_RIP],
                         e->regs[W_RSP], e->regs[W_RBP], e->regs[W_RAX], e->regs[W_RDI],
                         e->regs[W_RSI], e->regs[W_RDX], e->regs[W_RCX], e->regs[W_R8],
                         frames);
}

static PyObject *State_take_events(TracerState *s, PyObject *args)
{
    PyTypeObject *type = NULL;
    if (!PyArg_ParseTuple(args, "|O!", &PyType_Type, &type)) {
        return NULL;
    }
    if (type != NULL &&
        (!PyType_IsSubtype(type, &PyTuple_Type) || type->tp_basicsize != PyTuple_Type.tp_basicsize)) {
        PyErr_SetString(PyExc_TypeError, "an event type must be a NamedTuple");
        return NULL;
    }
    PyObject *out = PyList_New((Py_ssize_t)s->nevents);
    if (out == NULL) {
        return NULL;
    }
    for (uint32_t k = 0; k < s->nevents; k++) {
        PyObject *item = event_tuple(&s->events[k]);
        if (item != NULL && type != NULL) {
            /* made as tuple.__new__(type, item) makes it, without a call into Python */
            PyObject *wrapped = PyTuple_Pack(1, item);
            Py_DECREF(item);
            item = wrapped == NULL ? NULL : PyTuple_Type.tp_new(type, wrapped, NULL);
            Py_XDECREF(wrapped);
        }
        if (item == NULL) {
            /* Keep the events so nothing is lost on a retry. */
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)k, item);
    }
    s->nevents = 0;
    return out;
}

/* guard(width, sites, args): keep heap redzones (guard.h) of `width` bytes
 * around the allocations made through `sites`, a sequence of (address, role)
 * with role 0..5 (allocate entry, its return, deallocate entry, its return,
 * reallocate entry, its return); `args`: the registers (indexes into a watch
 * event's registers) of allocate's size, deallocate's pointer, reallocate's
 * pointer and new size. Width 0 turns them off. */
static PyObject *State_guard(TracerState *s, PyObject *args)
{
    unsigned int width;
    int regs[4];
    PyObject *sites_obj;
    if (!PyArg_ParseTuple(args, "IO(iiii)", &width, &sites_obj, &regs[0], &regs[1], &regs[2],
                          &regs[3])) {
        return NULL;
    }
    if (width > GUARD_WIDTH_MAX) {
        return PyErr_Format(PyExc_ValueError, "a redzone is at most %d bytes", GUARD_WIDTH_MAX);
    }
    for (int k = 0; k < 4; k++) {
        if (regs[k] < 0 || regs[k] >= W_NREGS) {
            return PyErr_Format(PyExc_ValueError, "no watched register %d", regs[k]);
        }
    }
    PyObject *seq = bounded_sequence(sites_obj, GUARD_SITES_MAX, "allocator sites");
    if (seq == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    uint64_t sites[GUARD_SITES_MAX];
    uint8_t roles[GUARD_SITES_MAX];
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long address;
        int role;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "Ki;a site is (address, role)",
                              &address, &role)) {
            Py_DECREF(seq);
            return NULL;
        }
        if (role < 0 || role >= G_ROLES) {
            Py_DECREF(seq);
            return PyErr_Format(PyExc_ValueError, "unknown allocator site role %d", role);
        }
        sites[i] = address;
        roles[i] = (uint8_t)role;
    }
    Py_DECREF(seq);
    if (width == 0) {
        PyMem_RawFree(s->guard);
        s->guard = NULL;
        Py_RETURN_NONE;
    }
    if (s->reg_read == NULL || s->mem_read == NULL) {
        PyErr_SetString(PyExc_ValueError, "redzones need the reg_read and mem_read addresses");
        return NULL;
    }
    if (s->guard == NULL) {
        s->guard = PyMem_RawCalloc(1, sizeof(HeapGuard));
        if (s->guard == NULL) {
            return PyErr_NoMemory();
        }
    }
    HeapGuard *g = s->guard;
    guard_clear(g);
    g->width = width;
    memcpy(g->args, regs, sizeof(regs));
    memcpy(g->sites, sites, sizeof(uint64_t) * (size_t)n);
    memcpy(g->roles, roles, (size_t)n);
    g->nsites = (uint32_t)n;
    Py_RETURN_NONE;
}

/* check_guards(): the end of a run is a check like an allocator call's entry,
 * unless the run stopped inside the allocator (its headers half-written). */
static PyObject *State_check_guards(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    HeapGuard *g = s->guard;
    if (g != NULL && g->npending == 0 && g->nlive > 0 && g->uc != NULL) {
        guard_check(s, g, g->uc);
    }
    Py_RETURN_NONE;
}

static PyObject *State_take_guard_hits(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    HeapGuard *g = s->guard;
    uint32_t n = g != NULL ? g->nhits : 0;
    PyObject *out = PyList_New((Py_ssize_t)n);
    if (out == NULL) {
        return NULL;
    }
    for (uint32_t k = 0; k < n; k++) {
        const GuardHit *h = &g->hits[k];
        PyObject *item = Py_BuildValue("(KKKKNII)", h->instructions, h->ptr, h->size,
                                       h->address, PyBool_FromLong(h->after), h->was, h->now);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)k, item);
    }
    if (g != NULL) {
        g->nhits = 0;
    }
    return out;
}

static int append_pair(PyObject *list, long long region, unsigned long long page)
{
    PyObject *pair = Py_BuildValue("(LK)", region, page);
    if (pair == NULL) {
        return -1;
    }
    int rc = PyList_Append(list, pair);
    Py_DECREF(pair);
    return rc;
}

static PyObject *State_take_dirty(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    /* Output is sorted by (region, page) so both implementations agree and
     * a restore can copy in address order. */
    if (s->unknown) {
        PyObject *pair = Py_BuildValue("(ii)", -1, -1);
        if (pair == NULL || PyList_Append(out, pair) < 0) {
            Py_XDECREF(pair);
            goto fail;
        }
        Py_DECREF(pair);
    }
    if (s->other_len != 0) {
        uint64_t *pages = PyMem_RawMalloc(s->other_len * sizeof(uint64_t));
        if (pages == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        size_t k = 0;
        for (size_t i = 0; i < s->other_cap; i++) {
            if (s->other[i] != 0) {
                pages[k++] = s->other[i] - 1;
            }
        }
        qsort(pages, k, sizeof(uint64_t), compare_u64);
        for (size_t i = 0; i < k; i++) {
            if (append_pair(out, -1, pages[i]) < 0) {
                PyMem_RawFree(pages);
                goto fail;
            }
        }
        PyMem_RawFree(pages);
    }
    for (Py_ssize_t i = 0; i < s->nregions; i++) {
        Region *r = &s->regions[i];
        qsort(r->dirty, (size_t)r->ndirty, sizeof(uint32_t), compare_u32);
        for (uint64_t k = 0; k < r->ndirty; k++) {
            if (append_pair(out, i, r->dirty[k]) < 0) {
                goto fail;
            }
        }
    }
    state_clear_dirty(s);
    return out;

fail:
    /* Leave the dirty state untouched so nothing is lost on a retry. */
    Py_DECREF(out);
    return NULL;
}

static PyObject *State_coverage_lines(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    uint8_t out[sizeof(s->map_lines)];
    for (size_t k = 0; k < sizeof(out); k++) { /* bit i of byte i // 8 on any host */
        out[k] = (uint8_t)(s->map_lines[k / 8] >> (8 * (k % 8)));
    }
    return PyBytes_FromStringAndSize((const char *)out, sizeof(out));
}

static PyObject *State_recent_blocks(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    uint64_t count = s->ring_pos < RING_SIZE ? s->ring_pos : RING_SIZE;
    PyObject *out = PyList_New((Py_ssize_t)count);
    if (out == NULL) {
        return NULL;
    }
    uint64_t start = s->ring_pos - count;
    for (uint64_t k = 0; k < count; k++) {
        PyObject *addr =
            PyLong_FromUnsignedLongLong(s->ring[(start + k) & (RING_SIZE - 1)]);
        if (addr == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)k, addr);
    }
    return out;
}

static PyObject *State_get_instructions(TracerState *s, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(s->icount);
}

static PyObject *State_get_budget(TracerState *s, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(s->stop_pending ? s->saved_budget : s->budget);
}

static PyObject *State_console(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    return PyBytes_FromStringAndSize((const char *)s->console, (Py_ssize_t)s->console_len);
}

static PyObject *State_trust_zeros(TracerState *s, PyObject *arg)
{
    uint8_t *bits = NULL;
    Py_ssize_t len = 0;
    if (arg != Py_None) {
        Py_buffer view;
        if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
            return NULL;
        }
        len = view.len;
        bits = PyMem_RawMalloc(len > 0 ? (size_t)len : 1);
        if (bits == NULL) {
            PyBuffer_Release(&view);
            return PyErr_NoMemory();
        }
        memcpy(bits, view.buf, (size_t)len);
        PyBuffer_Release(&view);
    }
    PyMem_RawFree(s->zero_bits);
    s->zero_bits = bits;
    s->zero_len = (size_t)len;
    s->zeros_trusted = bits != NULL;
    Py_RETURN_NONE;
}

static PyObject *State_take_left_absent(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    PyObject *list = PyList_New((Py_ssize_t)s->nbanks);
    if (list == NULL) {
        return NULL;
    }
    for (uint32_t i = 0; i < s->nbanks; i++) {
        PyObject *item;
        if (s->absent[i] == NULL || s->absent_hi[i] <= s->absent_lo[i]) {
            item = Py_NewRef(Py_None);
        } else {
            item = PyBytes_FromStringAndSize((const char *)s->absent[i],
                                             (Py_ssize_t)s->absent_hi[i]);
            if (item == NULL) {
                Py_DECREF(list);
                return NULL;
            }
            memset(s->absent[i] + s->absent_lo[i], 0, s->absent_hi[i] - s->absent_lo[i]);
            s->absent_lo[i] = s->absent_hi[i] = 0;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
}

static PyObject *State_take_service(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    if (!s->service_pending) {
        Py_RETURN_NONE;
    }
    s->service_pending = 0;
    return PyLong_FromUnsignedLong(s->service_value);
}

static PyObject *State_port_log(TracerState *s, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New((Py_ssize_t)s->port_log_len);
    if (out == NULL) {
        return NULL;
    }
    for (uint32_t k = 0; k < s->port_log_len; k++) {
        const PortEvent *e = &s->port_log[k];
        PyObject *item = Py_BuildValue("(sIII)", e->is_in ? "in" : "out", e->port,
                                       (unsigned int)e->size, e->value);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, (Py_ssize_t)k, item);
    }
    return out;
}

static PyObject *State_get_console_dropped(TracerState *s, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(s->console_dropped);
}

static PyObject *State_get_events_dropped(TracerState *s, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(s->events_dropped);
}

static PyObject *State_get_exhausted(TracerState *s, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(s->exhausted);
}

static PyObject *State_get_address(TracerState *s, void *Py_UNUSED(closure))
{
    return PyLong_FromVoidPtr((void *)s);
}

static int State_getbuffer(TracerState *s, Py_buffer *view, int flags)
{
    /* Read-only: only reset() may clear the map, keeping both
     * implementations' semantics identical. */
    return PyBuffer_FillInfo(view, (PyObject *)s, s->map, MAP_SIZE, 1, flags);
}

static PyBufferProcs State_as_buffer = {
    .bf_getbuffer = (getbufferproc)State_getbuffer,
    .bf_releasebuffer = NULL,
};

static PyMethodDef State_methods[] = {
    {"guard", (PyCFunction)State_guard, METH_VARARGS,
     "guard(width, sites, args) -> None\n\nKeep redzones of width bytes around the "
     "allocations made through sites ((address, role): 0 allocate entry, 1 its return, 2 "
     "deallocate entry, 3 its return, 4 reallocate entry, 5 its return); each must be watched. "
     "args: the watch-event register indexes of allocate's size, deallocate's pointer, "
     "reallocate's pointer and new size. Width 0: none."},
    {"check_guards", (PyCFunction)State_check_guards, METH_NOARGS,
     "check_guards() -> None\n\nCompare the redzones now, as an allocator call's entry does "
     "(nothing if the run stopped inside the allocator)."},
    {"take_guard_hits", (PyCFunction)State_take_guard_hits, METH_NOARGS,
     "take_guard_hits() -> list[tuple]\n\nReturn and forget the redzone hits: "
     "(instructions, ptr, size, address, after, was, now)."},
    {"reset", (PyCFunction)State_reset, METH_O,
     "reset(budget) -> None\n\nZero counters, coverage, recent blocks and dirty sets; "
     "stop the guest before instruction number budget + 1."},
    {"checkpoint_walk", (PyCFunction)State_checkpoint_walk, METH_VARARGS,
     "checkpoint_walk(root, accessed_level, max_pages, max_tables, ranges) -> None\n\n"
     "What the watchdog's checkpoints count: the Dirty leaves under the tables at root in "
     "the first RAM bank (as dirty_leaves counts them), and the code ranges [start, end) of "
     "the bulk routines, where being is progress."},
    {"checkpoints", (PyCFunction)State_checkpoints, METH_VARARGS,
     "checkpoints(on, next, count, run_budget, interval) -> None\n\nAt the checkpoint "
     "`next` (an exact stop of the budget) and the later ones, pass those where the run made "
     "progress here, with no stop: a Dirty count above `count`, or the guest in a bulk "
     "routine; the next one is then `interval` further, never past `run_budget`. Off after "
     "reset."},
    {"extend", (PyCFunction)State_extend, METH_VARARGS,
     "extend(budget, limit=None) -> None\n\nRaise the budget (counted since reset) of a run "
     "the budget stopped, so the guest can be resumed where it stopped. With a limit, the "
     "stop is not counted in bulk-move iterations: each one performed natively from now on "
     "moves it on by one, never past the limit."},
    {"take_dirty", (PyCFunction)State_take_dirty, METH_NOARGS,
     "take_dirty() -> list[tuple[int, int]]\n\nReturn and clear the pages written since "
     "the last take or reset, sorted."},
    {"coverage_lines", (PyCFunction)State_coverage_lines, METH_NOARGS,
     "coverage_lines() -> bytes\n\nA bitmap of the coverage map's 64-byte lines (bit i of "
     "byte i // 8: line i) outside which every counter is zero."},
    {"recent_blocks", (PyCFunction)State_recent_blocks, METH_NOARGS,
     "recent_blocks() -> list[int]\n\nStart addresses of the last 64 executed blocks, "
     "oldest first."},
    {"console", (PyCFunction)State_console, METH_NOARGS,
     "console() -> bytes\n\nBytes written to the console port since reset."},
    {"trust_zeros", (PyCFunction)State_trust_zeros, METH_O,
     "trust_zeros(bitmap | None) -> None\n\nThe first bank's pages (bit i of byte i // 8: "
     "page i) that the snapshot has as zeros and only the guest writes: from the next reset "
     "on, a zero fill under identity_cr3 leaves such a page alone while its leaf there has "
     "Dirty clear, until a boot service runs. The owner must run the input again without "
     "this (None) when the Dirty bits cannot vouch for the run (zeros_taken > 0)."},
    {"take_left_absent", (PyCFunction)State_take_left_absent, METH_NOARGS,
     "take_left_absent() -> list[bytes | None]\n\nPer bank given to bulk(), the pages zero "
     "fills left to the host since the last take, as a bitmap (bit i of byte i // 8: page "
     "i; None: none), and forget them."},
    {"take_service", (PyCFunction)State_take_service, METH_NOARGS,
     "take_service() -> int | None\n\nReturn and clear the pending service request."},
    {"port_log", (PyCFunction)State_port_log, METH_NOARGS,
     "port_log() -> list[tuple[str, int, int, int]]\n\nThe first 64 accesses to other "
     "ports since reset: (\"out\" or \"in\", port, size, value)."},
    {"unwind", (PyCFunction)State_unwind, METH_O,
     PyDoc_STR("unwind(entries): how to walk frames in Microsoft x64 code")},
    {"watch", (PyCFunction)State_watch, METH_O,
     "watch(addresses) -> None\n\nReplace the watched code addresses (at most 32); kept by "
     "reset."},
    {"stop_at", (PyCFunction)State_stop_at, METH_VARARGS,
     "stop_at(address, nth=1) -> None\n\nStop before the nth next arrival at address, like "
     "a budget stop (uncounted); None cancels."},
    {"stop_when_same", (PyCFunction)State_stop_when_same, METH_VARARGS,
     "stop_when_same(address, register_ids, max_arrivals) -> None\n\nStop before the next "
     "arrival at address whose registers equal those of the first arrival (read then, "
     "without a stop), like stop_at; give up after max_arrivals arrivals past the first. "
     "register_ids None: go on with the current search (its first arrival and count)."},
    {"count_blocks", (PyCFunction)State_count_blocks, METH_VARARGS,
     "count_blocks(uc, uc_hook_add, uc_hook_del, uc_ctl, text, precise, until) -> None\n\n"
     "Count instructions per translated block from now on (see blockcount.h); the global "
     "code hook must be gone. text: the [start, end) ranges of fixed code; precise: ranges "
     "run under the code hook always; until: where every run stops (emu_start's until, or "
     "the exit of set_exit)."},
    {"start_probes", (PyCFunction)State_start_probes, METH_VARARGS,
     "start_probes(first, pml4, register_ids, max_arrivals, no_stop) -> None\n\nMake the "
     "cycle search's probes here from now on, without a stop: at `first` instructions "
     "outside bulk moves, then at twice each probe's count, when the budget (set there by "
     "the owner, below its limit) is reached. Each arms stop_when_same(the block the guest "
     "is in, register_ids, max_arrivals) where it may stop: not in no_stop, CR3 at pml4. "
     "register_ids or no_stop None: those of the last call. reset ends them."},
    {"stop_probes", (PyCFunction)State_stop_probes, METH_O,
     "stop_probes(searches_only) -> None\n\nNo more searches armed by probes; and, unless "
     "searches_only, no more probes."},
    {"probe_log", (PyCFunction)State_probe_log, METH_NOARGS,
     "probe_log() -> [(count, bulk_units)]\n\nThe first 64 probes since start_probes: "
     "the count outside bulk moves and the bulk units at each."},
    {"set_exit", (PyCFunction)State_set_exit, METH_O,
     "set_exit(address) -> None\n\nStop the guest before the instruction at address, "
     "uncounted, before any other hook acts there, as Unicorn's until does (None or 2**64-1: "
     "no exit); kept by reset."},
    {"stop_counting_blocks", (PyCFunction)State_stop_counting_blocks, METH_NOARGS,
     "stop_counting_blocks() -> None\n\nRemove the hooks of counting per block (points and "
     "precise ranges) and forget it; the owner detaches, or adds a code hook over all code."},
    {"end_run", (PyCFunction)State_end_run, METH_NOARGS,
     "end_run() -> None\n\nA run is over and its memory about to be put back: counting per "
     "block lets go of what it made precise for the run."},
    {"settle", (PyCFunction)State_settle, METH_O,
     "settle(pc) -> bool\n\nAfter a fault at pc: take back the instructions of the block "
     "it interrupted that never ran. False if they cannot be counted (the count is then "
     "not exact)."},
    {"block_counts", (PyCFunction)State_block_counts, METH_NOARGS,
     "block_counts() -> dict | None\n\nCounting per block, since it began: block entries "
     "counted whole and the instructions they held, instructions announced in precise "
     "ranges, points announced in blocks counted whole, blocks made precise on the spot; "
     "the precise ranges now ((start, end, for this run only)), blocks known, and whether a "
     "count since the last reset cannot be vouched for. None when not counting blocks."},
    {"quiet_resume", (PyCFunction)State_quiet_resume, METH_NOARGS,
     "quiet_resume() -> None\n\nLeave the next block entry out of the recent blocks and "
     "the coverage."},
    {"skip", (PyCFunction)State_skip, METH_VARARGS,
     "skip(instructions, blocks, periods, before, after) -> None\n\nAccount for `periods` "
     "repetitions of a periodic stretch: count, recent blocks, coverage (after - before per "
     "repetition)."},
    {"bulk", (PyCFunction)State_bulk, METH_VARARGS,
     "bulk(sites, banks) -> None\n\nReplace the bulk sites ((address, kind), kind 0 for rep "
     "stosq, 1 for rep movsq) and the RAM banks ((base, size, host_address[, absent_zero])) "
     "they may use; absent_zero: a private anonymous mapping, whose pages the host does not "
     "hold read as zeros."},
    {"watched", (PyCFunction)State_watched, METH_NOARGS,
     "watched() -> tuple[int, ...]\n\nThe watched addresses, sorted."},
    {"take_events", (PyCFunction)State_take_events, METH_VARARGS,
     "take_events(type=None) -> list[tuple]\n\nReturn and forget the watch events: (address, "
     "instructions, rip, rsp, rbp, rax, rdi, rsi, rdx, rcx, r8, frames), as instances of "
     "`type` (a NamedTuple of those fields) if given."},
    {NULL, NULL, 0, NULL},
};

static PyObject *State_get_identity_cr3(TracerState *s, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(s->identity_cr3);
}

static int State_set_identity_cr3(TracerState *s, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "identity_cr3 cannot be deleted");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    s->identity_cr3 = v & ~0xfffULL;
    return 0;
}

static PyObject *State_get_identity_crossings(TracerState *s, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(s->identity_crossings);
}

static PyObject *State_get_bulk_units(TracerState *s, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(s->bulk_units);
}

static PyObject *State_get_console_units(TracerState *s, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(s->console_units);
}

static PyObject *State_get_copies_left_absent(TracerState *s, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(s->copies_left_absent);
}

static PyObject *State_get_zeros_taken(TracerState *s, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(s->zeros_taken);
}

static PyObject *State_get_pages_left_absent(TracerState *s, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(s->pages_left_absent);
}

static PyObject *State_get_bulk_on(TracerState *s, void *closure)
{
    (void)closure;
    return PyBool_FromLong(s->bulk_on);
}

static int State_set_bulk_on(TracerState *s, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "bulk_on cannot be deleted");
        return -1;
    }
    int on = PyObject_IsTrue(value);
    if (on < 0) {
        return -1;
    }
    s->bulk_on = on;
    s->memo_site = UINT64_MAX;
    return 0;
}

static PyObject *State_get_stop_hit(TracerState *s, void *closure)
{
    (void)closure;
    return PyBool_FromLong(s->stop_hit);
}

static PyObject *State_get_exit_hit(TracerState *s, void *closure)
{
    (void)closure;
    return PyBool_FromLong(s->exit_hit);
}

static PyObject *State_get_blocks(TracerState *s, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(s->ring_pos);
}

static PyObject *State_get_event_count(TracerState *s, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(s->events_seen);
}

static PyObject *State_get_same_arrivals(TracerState *s, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(s->same_arrivals);
}

static PyObject *State_get_direct_reads(TracerState *s, void *closure)
{
    (void)closure;
    return PyBool_FromLong(s->direct_reads);
}

static int State_set_direct_reads(TracerState *s, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_TypeError, "cannot delete direct_reads");
        return -1;
    }
    int on = PyObject_IsTrue(value);
    if (on < 0) {
        return -1;
    }
    s->direct_reads = on;
    return 0;
}

static PyObject *State_get_count_inexact(TracerState *s, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(s->bc != NULL && s->bc->inexact);
}

static PyGetSetDef State_getset[] = {
    {"count_inexact", (getter)State_get_count_inexact, NULL,
     "Counting per block: whether a count since the last reset cannot be vouched for.", NULL},
    {"direct_reads", (getter)State_get_direct_reads, (setter)State_set_direct_reads,
     "Whether watch events read their frames from the RAM banks given to bulk() (the same "
     "bytes) instead of through uc_mem_read.", NULL},
    {"same_arrivals", (getter)State_get_same_arrivals, NULL,
     "Arrivals past the first of the current stop_when_same search.", NULL},
    {"stop_hit", (getter)State_get_stop_hit, NULL, "True once stop_at stopped the guest.", NULL},
    {"checkpoint", (getter)State_get_checkpoint, NULL,
     "(next checkpoint, Dirty count at the last one, checkpoints passed here since reset)",
     NULL},
    {"probe", (getter)State_get_probe, NULL,
     "(next probe's count outside bulk moves or None, probes made, searches armed, the "
     "address of the last one) since start_probes.", NULL},
    {"exit_hit", (getter)State_get_exit_hit, NULL,
     "True once the guest stopped at the exit (set_exit) since reset.", NULL},
    {"blocks", (getter)State_get_blocks, NULL, "Block entries recorded since reset.", NULL},
    {"event_count", (getter)State_get_event_count, NULL,
     "Watch events recorded or dropped since reset, taken or not.", NULL},
    {"bulk_on", (getter)State_get_bulk_on, (setter)State_set_bulk_on,
     "Whether the bulk sites are fast-forwarded (off: they only pass the filter).", NULL},
    {"bulk_units", (getter)State_get_bulk_units, NULL,
     "Iterations of bulk sites fast-forwarded since reset.", NULL},
    {"console_units", (getter)State_get_console_units, NULL,
     "Console bytes of string sites put in one step since reset.", NULL},
    {"copies_left_absent", (getter)State_get_copies_left_absent, NULL,
     "Pages bulk copies left to the host (zeros onto pages it holds none of) since reset.",
     NULL},
    {"zeros_taken", (getter)State_get_zeros_taken, NULL,
     "Pages zero fills left alone on the guest's word (trust_zeros) since reset.", NULL},
    {"pages_left_absent", (getter)State_get_pages_left_absent, NULL,
     "Whole pages of fast-forwarded zero fills the host did not hold, so left alone, since "
     "reset.", NULL},
    {"identity_cr3", (getter)State_get_identity_cr3, (setter)State_set_identity_cr3,
     "CR3 of identity page tables (0: none); crossing stores under it mark the next page.",
     NULL},
    {"identity_crossings", (getter)State_get_identity_crossings, NULL,
     "Page-crossing stores since reset resolved through identity_cr3.", NULL},
    {"instructions", (getter)State_get_instructions, NULL,
     "Guest instructions started since reset.", NULL},
    {"budget", (getter)State_get_budget, NULL, "Armed instruction budget.", NULL},
    {"console_dropped", (getter)State_get_console_dropped, NULL,
     "Console bytes since reset that did not fit in the buffer.", NULL},
    {"events_dropped", (getter)State_get_events_dropped, NULL,
     "Watch events since reset that did not fit in the buffer.", NULL},
    {"exhausted", (getter)State_get_exhausted, NULL, "True once the budget stopped the guest.",
     NULL},
    {"address", (getter)State_get_address, NULL,
     "Address of the C state, to pass as the hooks' user_data.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StateType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kernel_emu._tracer.State",
    .tp_doc = PyDoc_STR("State(regions, coverage, emu_stop, reg_read, *, console_port=0xe9, "
                        "service_port=0xf0, console_read_value=0xe9, mem_read=0)\n\n"
                        "Counters shared with the native hook callbacks.  The owner must "
                        "keep it alive for as long as any hook using its address is "
                        "registered."),
    .tp_basicsize = sizeof(TracerState),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = State_new,
    .tp_dealloc = (destructor)State_dealloc,
    .tp_methods = State_methods,
    .tp_getset = State_getset,
    .tp_as_buffer = &State_as_buffer,
};

/* ------------------------------------------------------------------------ */
/* Module                                                                    */
/* ------------------------------------------------------------------------ */

static int add_address(PyObject *module, const char *name, void (*fn)(void))
{
    PyObject *value = PyLong_FromUnsignedLongLong((unsigned long long)(uintptr_t)fn);
    if (value == NULL) {
        return -1;
    }
    if (PyModule_AddObject(module, name, value) < 0) {
        Py_DECREF(value);
        return -1;
    }
    return 0;
}

static struct PyModuleDef tracer_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "kernel_emu._tracer",
    .m_doc = PyDoc_STR("Native Unicorn hook callbacks; use kernel_emu.tracing instead."),
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__tracer(void)
{
    pagemap_setup();
    if (PyType_Ready(&StateType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&tracer_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&StateType);
    if (PyModule_AddObject(m, "State", (PyObject *)&StateType) < 0) {
        Py_DECREF(&StateType);
        goto fail;
    }
    if (add_address(m, "CODE_HOOK", (void (*)(void))code_hook) < 0 ||
        add_address(m, "BLOCK_HOOK", (void (*)(void))block_hook) < 0 ||
        add_address(m, "WRITE_HOOK", (void (*)(void))write_hook) < 0 ||
        add_address(m, "OUT_HOOK", (void (*)(void))out_hook) < 0 ||
        add_address(m, "IN_HOOK", (void (*)(void))in_hook) < 0 ||
        PyModule_AddIntConstant(m, "CONSOLE_CAP", CONSOLE_CAP) < 0 ||
        PyModule_AddIntConstant(m, "PORT_LOG_SIZE", PORT_LOG_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "RING_SIZE", RING_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "MAP_SIZE", MAP_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "WATCH_MAX", WATCH_MAX) < 0 ||
        PyModule_AddIntConstant(m, "EVENT_CAP", EVENT_CAP) < 0 ||
        PyModule_AddIntConstant(m, "MAX_FRAMES", MAX_FRAMES) < 0) {
        goto fail;
    }
    return m;

fail:
    Py_DECREF(m);
    return NULL;
}
