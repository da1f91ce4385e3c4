/* Native walks of amd64 4-level page tables.
 *
 * The oracles walk the address space the kernel is about to enter ring 3 with after every
 * run; in Python that is tens of microseconds per input, a visible share of a fuzzing
 * execution. This is the same walk as kernel_emu.pagewalk.walk_user, reading the guest's
 * RAM straight from the host buffer that backs it.
 *
 * user_leaves(ram, base, cr3, max_leaves, runs=0) -> (leaves, tables) | None
 *   ram        an object exporting the RAM bank's bytes (the mmap behind it)
 *   base       the guest-physical address of ram[0]
 *   leaves     [(vaddr, paddr, size, writable, executable, count, descending)] in walk
 *              order, vaddr canonical: `count` leaves of `size` bytes with the same rights,
 *              one after the other in virtual memory, and in physical memory each one page
 *              above the one before (or, when `descending`, one page below: the kernel hands
 *              out frames from the top down). Without `runs`, count is always 1; with it,
 *              such 4 KiB leaves are merged (a 16 MiB segment is a few entries instead of
 *              4096). At most max_leaves leaves (not entries).
 *   tables     [table address] of every table visited
 *   None       a table lies outside `ram`: the caller walks in Python instead
 *
 * user_space_judge(ram, base, cr3, rsp, user_top, segments, file, kernel_phys, stack,
 *                  max_leaves) -> () | tuple | None
 *   What the user-space oracle finds, check by check (None: ask the oracle in Python):
 *   see userspace.h.
 *
 * dirty_leaves(ram, base, root, accessed_level, max_pages, max_tables, form=0)
 *     -> (pages, tables, executable) | int | None
 *   The same RAM, every present entry, user or not, in walk order:
 *   pages      the physical address of each 4 KiB page under a leaf with the Dirty bit
 *   tables     every table visited
 *   executable [(vaddr, paddr, size)] of the leaves with the Accessed bit that no level
 *              marks NX, vaddr canonical
 *   Non-leaf entries at level `accessed_level` (0: none) without the Accessed bit are not
 *   descended. None when a table lies outside `ram` or the walk would pass max_pages or
 *   max_tables.
 *   With form 1, pages and tables come as bitmaps over the RAM's pages instead (bit i of
 *   byte i / 8 ... of a bytearray: the page at base + i * 4096), and a dirty page outside
 *   `ram` gives None too: the snapshot restore's set arithmetic is then a few passes over
 *   bitmaps (bits_meet, bits_or below) instead of thousands of list items for a run that
 *   loaded megabytes.
 *   kernel_emu.dirtylog.dirty_leaves_python is the reference; snapshot restores use this
 *   after every run, where the Python walk would cost tens of microseconds.
 *
 *   With form 2, only len(pages), without building anything (the watchdog's progress
 *   check at every checkpoint of a run that loads megabytes).
 *
 * held_words(data, start, keys) -> [key]
 *   The keys (ints below 2**64, in their given order) that `data`, at guest address
 *   `start`, holds as a little-endian word at an 8-aligned address: the leak oracle's
 *   question of every region it reaches (kernel_emu.leaks._held is the reference). One pass
 *   over the words with a binary search each, ending once every key is found.
 *
 * leaks_reached(ram, base, live, roots, values, scan_limit, max_live) -> bool
 *   Whether every live allocation is reached from the roots, as kernel_emu.leaks judges it
 *   (the reference): see reach.h.
 *
 * restore_pages(ram, saved, bitmap, give_back=None) -> None
 *   The copy half of a snapshot restore, which a run that loaded megabytes needs for
 *   thousands of pages: each page whose bit is set in `bitmap` (as above) gets saved[index]
 *   (4 KiB of bytes) or, where that is None, zeros, written into the writable buffer `ram`;
 *   `saved` is a list with one item per page of `ram`.  Pages due zeros that are also in the
 *   bitmap `give_back` (`ram` must then be a private anonymous mapping) are given back to
 *   the host instead (madvise MADV_DONTNEED): it maps zeros there again when the page is
 *   next touched, and a zero fill of it (bulk.h) leaves it alone.
 *
 * bits_meet(a, b), bits_or(a, b), bits_and_indexes(a, b)
 *   Such bitmaps combined: whether they share a page, all pages of both, the pages of both.
 *
 * replay_allocations(events, alloc_entry, returns, dealloc_entry, realloc_entry, registers,
 *                    allocation) -> (live, freed) | None
 *   kernel_emu.allocations.replay's common case natively (it is the reference): the run's
 *   allocator events (tuples: address, instructions, rip, rsp, rbp, rax, then registers)
 *   replayed into the allocations live at the end and those freed on the way, each an
 *   `allocation` (a NamedTuple: seq, ptr, size, the event that returned it, the event of its
 *   last resize or None), in the order the reference lists them. `returns`: the ret addresses of allocate and reallocate;
 *   `realloc_entry` -1 for none; `registers`: the tuple indexes of allocate's size,
 *   deallocate's pointer, reallocate's pointer and its new size. None for anything the
 *   reference would report (an allocation over a live one, a free or resize of a pointer
 *   not live) or a table too large: the caller then replays in Python, findings and all.
 *
 * heap_blocks(ram, base, heap_base, heap_end, layout, (head, listed), by_address, max_blocks,
 *             block)
 *     -> [block] | None
 *   kernel_emu.heapwalk.walk_heap's common case natively (it is the reference), for a heap
 *   whose blocks tile it: the blocks from heap_base, each a `block` (a NamedTuple: addr,
 *   size, free, magic_ok, prev, next), when nothing is wrong with the heap. `layout`: (header
 *   size, what the size field counts beyond the payload, the offsets of size, free byte,
 *   magic, prev and next, the magic); `head` the free list's first node, checked if `listed`;
 *   `by_address` whether the list is kept in address order. None for anything the
 *   reference would report (a bad magic or size, blocks that do not end at heap_end, a
 *   free list that loops, leaves the blocks or the free ones, or misses a free block), for
 *   max_blocks blocks or more, or a heap outside `ram`: the caller walks in Python.
 *
 * log_lines(text) -> [what] | None
 *   What each line of a run's console says, as kernel_emu.klog reads it: see klog.h.
 *
 * pt_loads(data, segment) -> (segment, ...)
 *   kernel_emu.elfview.load_segments natively (its Python body is the reference): the PT_LOAD
 *   entries of the ELF64 little-endian file `data`, each a `segment` (a NamedTuple: vaddr,
 *   memsz, filesz, offset, flags), read e_phentsize apart (at least an Elf64_Phdr) while
 *   whole entries fit in the file; () for anything else.
 *
 * read_register(uc_reg_read, uc, regid), write_register(uc_reg_write, uc, regid, value)
 *   One register through Unicorn's C API, without ctypes's per-call conversions.
 *
 * read_registers(uc_reg_read, uc, regids)
 *   A tuple of registers' values in one call (the oracles read them all once a run).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "pagemap.h"
#include "dirtycount.h"

#define P 1ULL
#define W 2ULL
#define U 4ULL
#define A 0x20ULL
#define D 0x40ULL
#define PS 0x80ULL
#define NX (1ULL << 63)
#define ADDR_MASK 0x000FFFFFFFFFF000ULL
#define PAGE 4096ULL
/* what dirty_leaves returns */
#define FORM_LISTS 0
#define FORM_BITMAPS 1
#define FORM_COUNT 2
#define FORM_UNION 3 /* one bitmap of the pages and the tables, none of them forbidden */

typedef struct {
    uint64_t vaddr, paddr, size, count;
    int writable, executable, descending;
} Run;

typedef struct {
    const uint8_t *ram;
    uint64_t base;
    uint64_t size;
    Py_ssize_t max_leaves;
    Py_ssize_t seen;  /* leaves so far */
    int runs;
    Run run;          /* the entry being built; count 0: none */
    PyObject *leaves; /* leaves and tables NULL: into the arrays below (userspace.h) */
    PyObject *tables;
    int outside;
    Run *out;
    Py_ssize_t nout, capout;
    uint64_t *tabs;
    Py_ssize_t ntabs, captabs;
} Walk;

/* Append one item to a PyMem array that grows by doubling; -1 with MemoryError set. */
static int grow(void **items, Py_ssize_t *n, Py_ssize_t *cap, size_t size)
{
    if (*n < *cap) {
        return 0;
    }
    Py_ssize_t more = *cap ? 2 * *cap : 64;
    void *bigger = PyMem_Realloc(*items, (size_t)more * size);
    if (bigger == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *items = bigger;
    *cap = more;
    return 0;
}

static int flush_run(Walk *w)
{
    Run *r = &w->run;
    if (r->count == 0) {
        return 0;
    }
    if (w->leaves == NULL) {
        if (grow((void **)&w->out, &w->nout, &w->capout, sizeof *w->out) < 0) {
            return -1;
        }
        w->out[w->nout++] = *r;
        r->count = 0;
        return 0;
    }
    PyObject *item = Py_BuildValue("(KKKOOKO)", (unsigned long long)r->vaddr,
                                   (unsigned long long)r->paddr, (unsigned long long)r->size,
                                   r->writable ? Py_True : Py_False,
                                   r->executable ? Py_True : Py_False,
                                   (unsigned long long)r->count,
                                   r->descending ? Py_True : Py_False);
    r->count = 0;
    if (item == NULL) {
        return -1;
    }
    int rc = PyList_Append(w->leaves, item);
    Py_DECREF(item);
    return rc;
}

static int add_leaf(Walk *w, uint64_t vaddr, uint64_t paddr, uint64_t size, int writable,
                    int executable)
{
    if (vaddr & (1ULL << 47)) {
        vaddr |= 0xFFFF000000000000ULL;
    }
    w->seen++;
    Run *r = &w->run;
    if (w->runs && r->count && size == PAGE && r->size == PAGE &&
        r->writable == writable && r->executable == executable &&
        vaddr == r->vaddr + r->count * PAGE) {
        /* a second leaf sets the direction; a later one must keep it */
        int up = paddr == r->paddr + r->count * PAGE;
        int down = paddr == r->paddr - r->count * PAGE;
        if (r->count == 1 ? (up || down) : (r->descending ? down : up)) {
            r->descending = down;
            r->count++;
            return 0;
        }
    }
    if (flush_run(w) < 0) {
        return -1;
    }
    *r = (Run){vaddr, paddr, size, 1, writable, executable, 0};
    return 0;
}

static int walk(Walk *w, uint64_t table, int level, uint64_t base, int writable, int nx)
{
    table &= ADDR_MASK;
    if (table < w->base || table - w->base > w->size - PAGE) {
        w->outside = 1;
        return 0;
    }
    if (w->tables == NULL) {
        if (grow((void **)&w->tabs, &w->ntabs, &w->captabs, sizeof *w->tabs) < 0) {
            return -1;
        }
        w->tabs[w->ntabs++] = table;
    } else {
        PyObject *addr = PyLong_FromUnsignedLongLong(table);
        if (addr == NULL || PyList_Append(w->tables, addr) < 0) {
            Py_XDECREF(addr);
            return -1;
        }
        Py_DECREF(addr);
    }
    const uint8_t *entries = w->ram + (table - w->base);
    unsigned shift = 12 + 9 * (unsigned)(level - 1);
    for (unsigned i = 0; i < 512; i++) {
        uint64_t e;
        memcpy(&e, entries + 8 * i, sizeof e);
        if ((e & (P | U)) != (P | U)) {
            continue;
        }
        if (w->seen >= w->max_leaves) {
            return 0;
        }
        uint64_t vaddr = base | ((uint64_t)i << shift);
        int wr = writable && (e & W);
        int x = nx || (e & NX);
        if (level == 1 || ((level == 2 || level == 3) && (e & PS))) {
            uint64_t size = 1ULL << shift;
            if (add_leaf(w, vaddr, e & ADDR_MASK & ~(size - 1), size, wr, !x) < 0) {
                return -1;
            }
        } else {
            if (walk(w, e & ADDR_MASK, level - 1, vaddr, wr, x) < 0) {
                return -1;
            }
            if (w->outside) {
                return 0;
            }
        }
    }
    return 0;
}

static PyObject *user_leaves(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer ram;
    unsigned long long base, cr3;
    Py_ssize_t max_leaves;
    int runs = 0;
    if (!PyArg_ParseTuple(args, "y*KKn|p", &ram, &base, &cr3, &max_leaves, &runs)) {
        return NULL;
    }
    Walk w = {ram.buf, base, (uint64_t)ram.len, max_leaves, 0, runs, {0, 0, 0, 0, 0, 0, 0},
              PyList_New(0), PyList_New(0), 0, NULL, 0, 0, NULL, 0, 0};
    PyObject *result = NULL;
    if (w.leaves != NULL && w.tables != NULL && (uint64_t)ram.len >= PAGE &&
        walk(&w, cr3, 4, 0, 1, 0) == 0 && flush_run(&w) == 0) {
        if (w.outside) {
            result = Py_NewRef(Py_None);
        } else {
            result = PyTuple_Pack(2, w.leaves, w.tables);
        }
    } else if (!PyErr_Occurred()) {
        result = Py_NewRef(Py_None);
    }
    Py_XDECREF(w.leaves);
    Py_XDECREF(w.tables);
    PyBuffer_Release(&ram);
    return result;
}

#include "userspace.h"

typedef struct {
    const uint8_t *ram;
    uint64_t base;
    uint64_t size;
    int accessed_level;
    Py_ssize_t max_pages;
    Py_ssize_t max_tables;
    Py_ssize_t npages, ntables;
    PyObject *pages;       /* pages, tables and executable NULL: only count the pages */
    PyObject *tables;
    PyObject *executable;
    uint8_t *page_bits;    /* bitmaps over the RAM's pages instead of the two lists */
    uint8_t *table_bits;
    const uint8_t *forbidden; /* pages whose Dirty leaf makes the walk give up, or NULL */
    Py_ssize_t forbidden_len;
    int give_up;
} DirtyWalk;

static void set_bit(uint8_t *bits, uint64_t index)
{
    bits[index / 8] |= (uint8_t)(1u << (index % 8));
}

static int append_u64(PyObject *list, uint64_t value)
{
    PyObject *item = PyLong_FromUnsignedLongLong(value);
    if (item == NULL || PyList_Append(list, item) < 0) {
        Py_XDECREF(item);
        return -1;
    }
    Py_DECREF(item);
    return 0;
}

static int dirty_walk(DirtyWalk *d, uint64_t table, int level, uint64_t base, int nx)
{
    table &= ADDR_MASK;
    /* Tables may be shared or loop back: the cap bounds the work whatever the guest wrote
     * into them. */
    if (table < d->base || table - d->base > d->size - PAGE || d->ntables >= d->max_tables) {
        d->give_up = 1;
        return 0;
    }
    d->ntables++;
    if (d->table_bits != NULL) {
        set_bit(d->table_bits, (table - d->base) / PAGE);
    } else if (d->tables != NULL && append_u64(d->tables, table) < 0) {
        return -1;
    }
    const uint8_t *entries = d->ram + (table - d->base);
    unsigned shift = 12 + 9 * (unsigned)(level - 1);
    for (unsigned i = 0; i < 512; i++) {
        uint64_t e;
        memcpy(&e, entries + 8 * i, sizeof e);
        if (!(e & P)) {
            continue;
        }
        uint64_t vaddr = base | ((uint64_t)i << shift);
        int x_off = nx || (e & NX);
        if (level == 1 || ((level == 2 || level == 3) && (e & PS))) {
            uint64_t size = 1ULL << shift;
            uint64_t paddr = e & ADDR_MASK & ~(size - 1);
            if ((e & A) && !x_off && d->executable != NULL) {
                uint64_t canonical = (vaddr & (1ULL << 47)) ? vaddr | 0xFFFF000000000000ULL
                                                             : vaddr;
                PyObject *item = Py_BuildValue("(KKK)", (unsigned long long)canonical,
                                               (unsigned long long)paddr,
                                               (unsigned long long)size);
                if (item == NULL || PyList_Append(d->executable, item) < 0) {
                    Py_XDECREF(item);
                    return -1;
                }
                Py_DECREF(item);
            }
            if (!(e & D)) {
                continue;
            }
            if ((uint64_t)(d->max_pages - d->npages) < size / PAGE) {
                d->give_up = 1;
                return 0;
            }
            d->npages += (Py_ssize_t)(size / PAGE);
            if (d->page_bits != NULL) {
                /* a page outside the RAM cannot be a bit: the caller restores everything */
                if (size > d->size || paddr < d->base || paddr - d->base > d->size - size) {
                    d->give_up = 1;
                    return 0;
                }
                for (uint64_t off = 0; off < size; off += PAGE) {
                    uint64_t index = (paddr - d->base + off) / PAGE;
                    if (d->forbidden != NULL && (Py_ssize_t)(index / 8) < d->forbidden_len &&
                        (d->forbidden[index / 8] >> (index % 8) & 1)) {
                        d->give_up = 1;
                        return 0;
                    }
                    set_bit(d->page_bits, index);
                }
                continue;
            }
            for (uint64_t off = 0; d->pages != NULL && off < size; off += PAGE) {
                if (append_u64(d->pages, paddr + off) < 0) {
                    return -1;
                }
            }
        } else if (level != d->accessed_level || (e & A)) {
            if (dirty_walk(d, e, level - 1, vaddr, x_off) < 0) {
                return -1;
            }
            if (d->give_up) {
                return 0;
            }
        }
    }
    return 0;
}

static PyObject *dirty_leaves(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer ram;
    unsigned long long base, root;
    Py_buffer forbidden = {0};
    int accessed_level, form = FORM_LISTS;
    Py_ssize_t max_pages, max_tables;
    if (!PyArg_ParseTuple(args, "y*KKinn|iy*", &ram, &base, &root, &accessed_level, &max_pages,
                          &max_tables, &form, &forbidden)) {
        return NULL;
    }
    if (form == FORM_COUNT) {
        /* only counting (the watchdog at a checkpoint): the walk the tracer counts with */
        int64_t n = dirty_count(ram.buf, base, (uint64_t)ram.len, root, accessed_level,
                                max_pages, max_tables);
        PyBuffer_Release(&ram);
        if (forbidden.obj != NULL) {
            PyBuffer_Release(&forbidden);
        }
        return n < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(n);
    }
    Py_ssize_t nbytes = (ram.len / (Py_ssize_t)PAGE + 7) / 8;
    DirtyWalk d = {ram.buf, base, (uint64_t)ram.len, accessed_level, max_pages, max_tables,
                   0, 0, NULL, NULL, NULL, NULL, NULL, NULL, 0, 0};
    PyObject *page_bits = NULL, *table_bits = NULL;
    int ready = 1;
    if (form == FORM_UNION) {
        /* the bytes object is filled before anyone sees it */
        page_bits = PyBytes_FromStringAndSize(NULL, nbytes);
        ready = page_bits != NULL;
        if (ready) {
            d.page_bits = d.table_bits = (uint8_t *)PyBytes_AS_STRING(page_bits);
            memset(d.page_bits, 0, (size_t)nbytes);
            d.forbidden = forbidden.buf;
            d.forbidden_len = forbidden.buf != NULL ? forbidden.len : 0;
        }
    } else if (form == FORM_BITMAPS) {
        page_bits = PyByteArray_FromStringAndSize(NULL, nbytes);
        table_bits = PyByteArray_FromStringAndSize(NULL, nbytes);
        ready = page_bits != NULL && table_bits != NULL;
        if (ready) {
            d.page_bits = (uint8_t *)PyByteArray_AS_STRING(page_bits);
            d.table_bits = (uint8_t *)PyByteArray_AS_STRING(table_bits);
            memset(d.page_bits, 0, (size_t)nbytes);
            memset(d.table_bits, 0, (size_t)nbytes);
        }
    } else if (form == FORM_LISTS) {
        d.pages = PyList_New(0);
        d.tables = PyList_New(0);
        ready = d.pages != NULL && d.tables != NULL;
    } else if (form != FORM_COUNT) {
        PyBuffer_Release(&ram);
        if (forbidden.obj != NULL) {
            PyBuffer_Release(&forbidden);
        }
        return PyErr_Format(PyExc_ValueError, "unknown form %d", form);
    }
    if (form != FORM_COUNT && form != FORM_UNION) {
        d.executable = PyList_New(0);
        ready = ready && d.executable != NULL;
    }
    PyObject *result = NULL;
    if (ready && (uint64_t)ram.len >= PAGE && max_pages >= 0 &&
        dirty_walk(&d, root, 4, 0, 0) == 0) {
        if (d.give_up) {
            result = Py_NewRef(Py_None);
        } else if (form == FORM_COUNT) {
            result = PyLong_FromSsize_t(d.npages);
        } else if (form == FORM_UNION) {
            result = Py_NewRef(page_bits);
        } else if (form == FORM_BITMAPS) {
            result = PyTuple_Pack(3, page_bits, table_bits, d.executable);
        } else {
            result = PyTuple_Pack(3, d.pages, d.tables, d.executable);
        }
    } else if (!PyErr_Occurred()) {
        result = Py_NewRef(Py_None);
    }
    Py_XDECREF(page_bits);
    Py_XDECREF(table_bits);
    Py_XDECREF(d.pages);
    Py_XDECREF(d.tables);
    Py_XDECREF(d.executable);
    PyBuffer_Release(&ram);
    if (forbidden.obj != NULL) {
        PyBuffer_Release(&forbidden);
    }
    return result;
}

/* How a page due zeros that a zero fill left to the host (bulk.h) is restored,
 * by its pagemap entry and, where the host holds it, what it reads: */
enum {
    ZERO_KEEP,      /* absent, or the host's zero page: zeros, and no cost to leave so */
    ZERO_GIVE_BACK, /* zeros of this process's own (the host drops it), swapped out, or
                       shared with a forked parent */
    ZERO_WRITE,     /* data of this process's own: written over, the next run may well
                       write it again */
};

static int zero_kind(uint64_t entry, const uint8_t *page)
{
    if (pagemap_zero(entry, page) != PAGE_DATA) {
        return ZERO_KEEP;
    }
    if ((entry & PAGEMAP_PRESENT) && (entry & PAGEMAP_EXCLUSIVE)) {
        return page_reads_zero(page) ? ZERO_GIVE_BACK : ZERO_WRITE;
    }
    return ZERO_GIVE_BACK;
}

static void zero_span(uint8_t *at, size_t count, int kind)
{
    if (kind == ZERO_KEEP) {
        return;
    }
#ifdef __linux__
    /* elsewhere a page given back need not read as zeros again */
    if (kind == ZERO_GIVE_BACK && madvise(at, count * PAGE, MADV_DONTNEED) == 0) {
        return;
    }
#endif
    memset(at, 0, count * PAGE);
}

/* Zero `count` pages from `at`; with `give_back`, pages a zero fill left to the
 * host, each as zero_kind says. */
static void zero_pages(uint8_t *at, Py_ssize_t count, int give_back)
{
    if (count == 0) {
        return;
    }
    if (!give_back) {
        memset(at, 0, (size_t)count * PAGE);
        return;
    }
    uint64_t entries[PAGEMAP_BATCH];
    for (Py_ssize_t done = 0; done < count;) {
        size_t n = (size_t)(count - done) < PAGEMAP_BATCH ? (size_t)(count - done) : PAGEMAP_BATCH;
        uint8_t *from = at + done * (Py_ssize_t)PAGE;
        if (pagemap_read((uintptr_t)from, n, entries) != 0) {
            zero_span(from, n, ZERO_GIVE_BACK);
        } else {
            uint8_t kinds[PAGEMAP_BATCH]; /* each page read once, at most */
            for (size_t i = 0; i < n; i++) {
                kinds[i] = (uint8_t)zero_kind(entries[i], from + i * PAGE);
            }
            for (size_t i = 0; i < n;) {
                size_t j = i + 1;
                while (j < n && kinds[j] == kinds[i]) {
                    j++;
                }
                zero_span(from + i * PAGE, j - i, kinds[i]);
                i = j;
            }
        }
        done += (Py_ssize_t)n;
    }
}

static PyObject *restore_pages(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer ram, bits, back = {0};
    PyObject *saved;
    if (!PyArg_ParseTuple(args, "w*O!y*|z*", &ram, &PyList_Type, &saved, &bits, &back)) {
        return NULL;
    }
    PyObject *result = NULL;
    uint8_t *base = ram.buf;
    const uint8_t *mask = bits.buf;
    const uint8_t *give = back.buf; /* NULL: none given back */
    Py_ssize_t npages = ram.len / (Py_ssize_t)PAGE;
    /* the pages due zeros, gathered into runs given back or written alike */
    Py_ssize_t zeros_from = 0, zeros = 0;
    int zeros_back = 0;
    if ((uintptr_t)base % PAGE != 0) {
        give = NULL; /* madvise takes whole host pages */
    }
    if (PyList_GET_SIZE(saved) != npages || bits.len > (npages + 7) / 8) {
        PyErr_SetString(PyExc_ValueError, "saved pages and bitmap must match the buffer");
        goto done;
    }
    for (Py_ssize_t byte = 0; byte < bits.len; byte++) {
        for (unsigned bit = 0; mask[byte] >> bit; bit++) {
            if (!(mask[byte] >> bit & 1)) {
                continue;
            }
            Py_ssize_t index = byte * 8 + bit;
            if (index >= npages) {
                PyErr_Format(PyExc_ValueError, "page %zd outside the buffer", index);
                goto done;
            }
            PyObject *content = PyList_GET_ITEM(saved, index);
            if (content == Py_None) {
                int to_host = give != NULL && byte < back.len && (give[byte] >> bit & 1);
                if (zeros > 0 && zeros_from + zeros == index && zeros_back == to_host) {
                    zeros++;
                } else {
                    zero_pages(base + zeros_from * PAGE, zeros, zeros_back);
                    zeros_from = index;
                    zeros = 1;
                    zeros_back = to_host;
                }
            } else if (PyBytes_Check(content) && PyBytes_GET_SIZE(content) == PAGE) {
                memcpy(base + index * PAGE, PyBytes_AS_STRING(content), PAGE);
            } else {
                PyErr_SetString(PyExc_TypeError, "a saved page must be 4096 bytes or None");
                goto done;
            }
        }
    }
    result = Py_NewRef(Py_None);
done:
    /* also on an error: the pages gathered so far are restored as the others were */
    zero_pages(base + zeros_from * PAGE, zeros, zeros_back);
    if (back.obj != NULL) {
        PyBuffer_Release(&back);
    }
    PyBuffer_Release(&bits);
    PyBuffer_Release(&ram);
    return result;
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The first index of the ascending keys[0..n) whose key is not below `word`. */
static Py_ssize_t lower_bound(const uint64_t *keys, Py_ssize_t n, uint64_t word)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (keys[mid] < word) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

static PyObject *held_words(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data;
    unsigned long long start;
    PyObject *keys_arg;
    if (!PyArg_ParseTuple(args, "y*KO", &data, &start, &keys_arg)) {
        return NULL;
    }
    PyObject *result = NULL, *keys = PySequence_Fast(keys_arg, "keys must be a sequence");
    uint64_t *distinct = NULL; /* the keys ascending, each once */
    uint8_t *hit = NULL;       /* by position in `distinct` */
    if (keys == NULL) {
        goto done;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    result = PyList_New(0);
    if (result == NULL || n == 0) {
        goto done;
    }
    distinct = PyMem_Malloc(sizeof(uint64_t) * (size_t)n);
    hit = PyMem_Calloc((size_t)n, 1);
    if (distinct == NULL || hit == NULL) {
        PyErr_NoMemory();
        Py_CLEAR(result);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        distinct[i] = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(keys, i));
        if (distinct[i] == (uint64_t)-1 && PyErr_Occurred()) {
            Py_CLEAR(result);
            goto done;
        }
    }
    qsort(distinct, (size_t)n, sizeof(uint64_t), compare_u64);
    Py_ssize_t count = 1;
    for (Py_ssize_t i = 1; i < n; i++) {
        if (distinct[i] != distinct[count - 1]) {
            distinct[count++] = distinct[i];
        }
    }
    const uint8_t *bytes = data.buf;
    Py_ssize_t found = 0;
    for (Py_ssize_t at = (Py_ssize_t)((8 - (start & 7)) & 7);
         at + 8 <= data.len && found < count; at += 8) {
        uint64_t word;
        memcpy(&word, bytes + at, 8);
        Py_ssize_t i = lower_bound(distinct, count, word);
        if (i < count && distinct[i] == word && !hit[i]) {
            hit[i] = 1;
            found++;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
        /* converted above without error, so again without one */
        if (hit[lower_bound(distinct, count, PyLong_AsUnsignedLongLong(key))] &&
            PyList_Append(result, key) < 0) {
            Py_CLEAR(result);
            goto done;
        }
    }
done:
    PyMem_Free(distinct);
    PyMem_Free(hit);
    Py_XDECREF(keys);
    PyBuffer_Release(&data);
    return result;
}

#include "reach.h"
#include "klog.h"

/* Bitmaps of pages, as dirty_leaves and restore_pages use them: bit i of byte i / 8 (bit i %
 * 8) is page i; two bitmaps may differ in length, the shorter read as zeros past its end.
 *   bits_meet(a, b) -> bool: whether a page is in both;
 *   bits_or(a, b) -> bytes: the pages in either;
 *   bits_and_indexes(a, b) -> [int]: the pages in both, ascending. */
/* Whether two 64-byte blocks of bitmaps share a bit: a 4 KiB bitmap is mostly zeros, and a
 * block at a time passes them quickly. */
static int block_meets(const uint8_t *x, const uint8_t *y)
{
    uint64_t u[8], v[8], any = 0;
    memcpy(u, x, 64);
    memcpy(v, y, 64);
    for (int k = 0; k < 8; k++) {
        any |= u[k] & v[k];
    }
    return any != 0;
}

/* The two bitmaps of a call, and the length they share; 0 and an exception on bad
 * arguments (the caller releases both buffers when it got them). */
static int two_bitmaps(PyObject *args, Py_buffer *a, Py_buffer *b, Py_ssize_t *shared)
{
    if (!PyArg_ParseTuple(args, "y*y*", a, b)) {
        return 0;
    }
    *shared = a->len < b->len ? a->len : b->len;
    return 1;
}

static PyObject *bits_meet(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer a, b;
    Py_ssize_t n;
    if (!two_bitmaps(args, &a, &b, &n)) {
        return NULL;
    }
    const uint8_t *x = a.buf, *y = b.buf;
    int meet = 0;
    Py_ssize_t i = 0;
    for (; i + 64 <= n && !meet; i += 64) {
        meet = block_meets(x + i, y + i);
    }
    for (; i < n && !meet; i++) {
        meet = (x[i] & y[i]) != 0;
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return PyBool_FromLong(meet);
}

static PyObject *bits_or(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer a, b;
    Py_ssize_t n;
    if (!two_bitmaps(args, &a, &b, &n)) {
        return NULL;
    }
    Py_buffer *longer = a.len >= b.len ? &a : &b, *shorter = a.len >= b.len ? &b : &a;
    PyObject *out = PyBytes_FromStringAndSize(longer->buf, longer->len);
    if (out != NULL) {
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
        const uint8_t *y = shorter->buf;
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) {
            uint64_t u, v;
            memcpy(&u, o + i, 8);
            memcpy(&v, y + i, 8);
            u |= v;
            memcpy(o + i, &u, 8);
        }
        for (; i < n; i++) {
            o[i] |= y[i];
        }
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return out;
}

static PyObject *bits_and_indexes(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer a, b;
    Py_ssize_t n;
    if (!two_bitmaps(args, &a, &b, &n)) {
        return NULL;
    }
    const uint8_t *x = a.buf, *y = b.buf;
    PyObject *out = PyList_New(0);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        if (i + 64 <= n && (i & 63) == 0 && !block_meets(x + i, y + i)) {
            i += 63; /* 64 bytes without a common bit */
            continue;
        }
        unsigned both = x[i] & y[i];
        for (unsigned bit = 0; both >> bit; bit++) {
            if (!(both >> bit & 1)) {
                continue;
            }
            PyObject *index = PyLong_FromSsize_t(i * 8 + bit);
            if (index == NULL || PyList_Append(out, index) < 0) {
                Py_XDECREF(index);
                Py_CLEAR(out);
                break;
            }
            Py_DECREF(index);
        }
    }
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    return out;
}

/* read_register(uc_reg_read, uc, regid) -> int: one register through Unicorn's C API, at the
 * addresses the caller passes (uc_reg_read and the engine handle), without the per-call
 * argument conversions of ctypes; OSError with Unicorn's status if it fails. Only for
 * registers of at most 64 bits, which is what Machine.reg reads. */
typedef int (*uc_reg_read_fn)(void *uc, int regid, void *value);

/* The first three arguments of both register calls: the function, the engine, the register;
 * 0 and an exception when they are not that. */
static int register_call(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want,
                         const char *usage, void **fn, void **uc, int *regid)
{
    if (nargs != want) {
        PyErr_SetString(PyExc_TypeError, usage);
        return 0;
    }
    unsigned long long f = PyLong_AsUnsignedLongLong(args[0]);
    unsigned long long u = PyLong_AsUnsignedLongLong(args[1]);
    long r = PyLong_AsLong(args[2]);
    if (PyErr_Occurred()) {
        return 0;
    }
    if (f == 0 || u == 0) {
        PyErr_Format(PyExc_ValueError, "%s: a null function or engine", usage);
        return 0;
    }
    *fn = (void *)(uintptr_t)f;
    *uc = (void *)(uintptr_t)u;
    *regid = (int)r;
    return 1;
}

static PyObject *read_register(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    void *fn, *uc;
    int regid;
    if (!register_call(args, nargs, 3, "read_register(uc_reg_read, uc, regid)", &fn, &uc,
                       &regid)) {
        return NULL;
    }
    /* room for any register, though only 64-bit ones are asked for */
    uint64_t value[8] = {0};
    int status = ((uc_reg_read_fn)fn)(uc, regid, value);
    if (status != 0) {
        return PyErr_Format(PyExc_OSError, "uc_reg_read failed with status %d", status);
    }
    return PyLong_FromUnsignedLongLong(value[0]);
}

/* read_registers(uc_reg_read, uc, regids) -> tuple of int: each register of the tuple
 * `regids` in turn, as read_register reads one. */
static PyObject *read_registers(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long f, u;
    PyObject *ids;
    if (!PyArg_ParseTuple(args, "KKO!:read_registers", &f, &u, &PyTuple_Type, &ids)) {
        return NULL;
    }
    if (f == 0 || u == 0) {
        PyErr_SetString(PyExc_ValueError, "read_registers: a null function or engine");
        return NULL;
    }
    uc_reg_read_fn fn = (uc_reg_read_fn)(uintptr_t)f;
    void *uc = (void *)(uintptr_t)u;
    Py_ssize_t n = PyTuple_GET_SIZE(ids);
    PyObject *out = PyTuple_New(n);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long regid = PyLong_AsLong(PyTuple_GET_ITEM(ids, i));
        if (regid == -1 && PyErr_Occurred()) {
            Py_DECREF(out);
            return NULL;
        }
        uint64_t value[8] = {0};
        int status = fn(uc, (int)regid, value);
        if (status != 0) {
            Py_DECREF(out);
            return PyErr_Format(PyExc_OSError, "uc_reg_read failed with status %d", status);
        }
        PyObject *v = PyLong_FromUnsignedLongLong(value[0]);
        if (v == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, v);
    }
    return out;
}

/* write_register(uc_reg_write, uc, regid, value) -> None: the same for a write. */
typedef int (*uc_reg_write_fn)(void *uc, int regid, const void *value);

static PyObject *write_register(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    void *fn, *uc;
    int regid;
    if (!register_call(args, nargs, 4, "write_register(uc_reg_write, uc, regid, value)", &fn,
                       &uc, &regid)) {
        return NULL;
    }
    uint64_t value[8] = {PyLong_AsUnsignedLongLong(args[3])};
    if (PyErr_Occurred()) {
        return NULL;
    }
    int status = ((uc_reg_write_fn)fn)(uc, regid, value);
    if (status != 0) {
        return PyErr_Format(PyExc_OSError, "uc_reg_write failed with status %d", status);
    }
    Py_RETURN_NONE;
}


/* ------------------------------------------------------------------------------------------
 * Rows handed back as a NamedTuple of the caller's (no fields of its own beyond the tuple's),
 * made as tuple.__new__(type, fields) makes them, without a call into Python. */

static int is_named_tuple(PyTypeObject *type)
{
    if (PyType_IsSubtype(type, &PyTuple_Type) && type->tp_basicsize == PyTuple_Type.tp_basicsize) {
        return 1;
    }
    PyErr_Format(PyExc_TypeError, "%s is not a NamedTuple", type->tp_name);
    return 0;
}

/* `fields` (a new reference, NULL after a failure) as a `type`; NULL on failure. */
static PyObject *as_named(PyTypeObject *type, PyObject *fields)
{
    PyObject *wrapped = fields == NULL ? NULL : PyTuple_Pack(1, fields);
    PyObject *row = wrapped == NULL ? NULL : PyTuple_Type.tp_new(type, wrapped, NULL);
    Py_XDECREF(fields);
    Py_XDECREF(wrapped);
    return row;
}

/* ------------------------------------------------------------------------------------------
 * A file's PT_LOAD entries (see pt_loads above). */

#define EHDR64_SIZE 64
#define PHDR64_SIZE 56

/* The little-endian word at `p` (a file's or the guest's: both are little-endian, as is
 * the host). */
static uint64_t le_u64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static uint32_t le_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static PyObject *pt_loads(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf;
    PyTypeObject *type;
    if (!PyArg_ParseTuple(args, "y*O!", &buf, &PyType_Type, &type)) {
        return NULL;
    }
    if (!is_named_tuple(type)) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    const uint8_t *d = buf.buf;
    uint64_t size = (uint64_t)buf.len, phoff = 0, stride = 0, count = 0, loads = 0;
    if (size >= EHDR64_SIZE && memcmp(d, "\x7f" "ELF", 4) == 0 && d[4] == 2 && d[5] == 1) {
        phoff = le_u64(d + 32);
        uint64_t phentsize = (uint64_t)d[54] | (uint64_t)d[55] << 8;
        uint64_t phnum = (uint64_t)d[56] | (uint64_t)d[57] << 8;
        if (phnum != 0 && phoff < size && size - phoff >= PHDR64_SIZE) {
            stride = phentsize > PHDR64_SIZE ? phentsize : PHDR64_SIZE;
            count = (size - phoff - PHDR64_SIZE) / stride + 1;
            count = count < phnum ? count : phnum;  /* phnum < 65536, the reference's cap */
        }
    }
    for (uint64_t i = 0; i < count; i++) {
        loads += le_u32(d + phoff + i * stride) == 1;
    }
    PyObject *out = PyTuple_New((Py_ssize_t)loads);
    Py_ssize_t k = 0;
    for (uint64_t i = 0; out != NULL && i < count; i++) {
        const uint8_t *ph = d + phoff + i * stride;
        if (le_u32(ph) != 1) {
            continue;
        }
        PyObject *row = as_named(type, Py_BuildValue(
            "(KKKKk)", (unsigned long long)le_u64(ph + 16), (unsigned long long)le_u64(ph + 40),
            (unsigned long long)le_u64(ph + 32), (unsigned long long)le_u64(ph + 8),
            (unsigned long)le_u32(ph + 4)));
        if (row == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyTuple_SET_ITEM(out, k++, row);
    }
    PyBuffer_Release(&buf);
    return out;
}

/* ------------------------------------------------------------------------------------------
 * The allocator replay's common case (see replay_allocations above). */

#define REPLAY_MAX 65536

typedef struct {
    uint64_t ptr, size, seq;
    Py_ssize_t returned, resized; /* event indexes; -1: none */
    uint64_t order;               /* when it became live: a dict's insertion order */
} Live;

typedef struct {
    uint64_t rsp, size, old_ptr;
    int resize;      /* a reallocate's call */
    int have_was;    /* `was`: the allocation it resizes, as it was at the call */
    Live was;
} Pending;

typedef struct {
    Live *items;      /* sorted by ptr */
    Py_ssize_t n;
} LiveSet;

/* The index of the first item whose ptr is >= ptr. */
static Py_ssize_t live_lower(const LiveSet *set, uint64_t ptr)
{
    Py_ssize_t lo = 0, hi = set->n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (set->items[mid].ptr < ptr) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

static Live *live_find(LiveSet *set, uint64_t ptr)
{
    Py_ssize_t i = live_lower(set, ptr);
    return i < set->n && set->items[i].ptr == ptr ? &set->items[i] : NULL;
}

static void live_remove(LiveSet *set, Live *item)
{
    Py_ssize_t i = item - set->items;
    memmove(&set->items[i], &set->items[i + 1], (size_t)(set->n - i - 1) * sizeof(Live));
    set->n--;
}

/* Whether [ptr, ptr + max(size, 1)) shares a byte with a live allocation, as
 * allocations._overlapping finds it; -1 where an end passes 2**64 (Python's integers do not
 * wrap: the caller leaves such a run to the reference). */
static int live_overlaps(const LiveSet *set, uint64_t ptr, uint64_t size)
{
    uint64_t end, before_end;
    if (__builtin_add_overflow(ptr, size ? size : 1, &end)) {
        return -1;
    }
    Py_ssize_t i = live_lower(set, ptr);
    if (i < set->n && set->items[i].ptr == ptr) {
        return 1; /* one starting at ptr itself */
    }
    if (i > 0) { /* the last starting before ptr */
        const Live *before = &set->items[i - 1];
        if (__builtin_add_overflow(before->ptr, before->size ? before->size : 1, &before_end)) {
            return -1;
        }
        if (ptr < before_end) {
            return 1;
        }
    }
    return i < set->n && set->items[i].ptr < end;
}

static int event_u64(PyObject *event, Py_ssize_t index, uint64_t *out)
{
    if (!PyTuple_Check(event) || index >= PyTuple_GET_SIZE(event)) {
        PyErr_SetString(PyExc_ValueError, "an event is a tuple of the watched registers");
        return -1;
    }
    *out = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(event, index));
    return *out == (uint64_t)-1 && PyErr_Occurred() ? -1 : 0;
}

static int cmp_order(const void *a, const void *b)
{
    uint64_t x = ((const Live *)a)->order, y = ((const Live *)b)->order;
    return x < y ? -1 : x > y;
}

/* `items` as `type`s (seq, ptr, size, returned, resized), their event indexes turned into
 * the events themselves. */
static PyObject *live_rows(const Live *items, Py_ssize_t n, PyObject *events,
                           PyTypeObject *type)
{
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *returned = items[i].returned >= 0
                                 ? PySequence_Fast_GET_ITEM(events, items[i].returned)
                                 : Py_None;
        PyObject *resized = items[i].resized >= 0
                                ? PySequence_Fast_GET_ITEM(events, items[i].resized)
                                : Py_None;
        PyObject *row = as_named(
            type, Py_BuildValue("(KKKOO)", (unsigned long long)items[i].seq,
                                (unsigned long long)items[i].ptr,
                                (unsigned long long)items[i].size, returned, resized));
        if (row == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, row);
    }
    return out;
}

static PyObject *replay_allocations(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *events_obj, *returns_obj;
    PyTypeObject *type;
    unsigned long long alloc_entry, dealloc_entry;
    long long realloc_entry;
    Py_ssize_t reg[4];
    if (!PyArg_ParseTuple(args, "OKOKL(nnnn)O!", &events_obj, &alloc_entry, &returns_obj,
                          &dealloc_entry, &realloc_entry, &reg[0], &reg[1], &reg[2],
                          &reg[3], &PyType_Type, &type)) {
        return NULL;
    }
    if (!is_named_tuple(type)) {
        return NULL;
    }
    PyObject *events = PySequence_Fast(events_obj, "events must be a sequence");
    if (events == NULL) {
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(events);
    PyObject *result = NULL;
    Live *live_items = NULL, *freed = NULL;
    Pending *pending = NULL;
    if (n > REPLAY_MAX) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    live_items = PyMem_Malloc((size_t)(n + 1) * sizeof(Live));
    freed = PyMem_Malloc((size_t)(n + 1) * sizeof(Live));
    pending = PyMem_Malloc((size_t)(n + 1) * sizeof(Pending));
    if (live_items == NULL || freed == NULL || pending == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    LiveSet live = {live_items, 0};
    Py_ssize_t nfreed = 0, npending = 0;
    uint64_t seq = 0, order = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *ev = PySequence_Fast_GET_ITEM(events, k);
        uint64_t address, rsp;
        if (event_u64(ev, 0, &address) < 0 || event_u64(ev, 3, &rsp) < 0) {
            goto done;
        }
        if (address == alloc_entry) {
            Pending *p = &pending[npending++];
            memset(p, 0, sizeof *p);
            p->rsp = rsp;
            if (event_u64(ev, reg[0], &p->size) < 0) {
                goto done;
            }
        } else if (realloc_entry >= 0 && address == (uint64_t)realloc_entry) {
            Pending *p = &pending[npending++];
            memset(p, 0, sizeof *p);
            p->rsp = rsp;
            p->resize = 1;
            if (event_u64(ev, reg[2], &p->old_ptr) < 0 || event_u64(ev, reg[3], &p->size) < 0) {
                goto done;
            }
            Live *was = live_find(&live, p->old_ptr);
            if (was != NULL) {
                p->was = *was;
                p->have_was = 1;
            } else if (p->old_ptr) {
                result = Py_NewRef(Py_None); /* a resize of a pointer not live */
                goto done;
            }
        } else if (PySet_Contains(returns_obj, PyTuple_GET_ITEM(ev, 0)) == 1) {
            Py_ssize_t match = npending - 1; /* nearly always the innermost call */
            while (match >= 0 && pending[match].rsp != rsp) {
                match--;
            }
            if (match < 0) {
                continue;
            }
            Pending call = pending[match];
            memmove(&pending[match], &pending[match + 1],
                    (size_t)(npending - match - 1) * sizeof(Pending));
            npending--;
            uint64_t ptr;
            if (event_u64(ev, 5, &ptr) < 0) { /* rax */
                goto done;
            }
            if (!ptr) {
                continue;
            }
            Live made = {ptr, call.size, 0, k, -1, 0};
            if (call.resize) {
                Live *old = live_find(&live, call.old_ptr);
                if (ptr != call.old_ptr && old != NULL) { /* moved, not by its own calls */
                    live_remove(&live, old);
                }
                Live *here = live_find(&live, ptr);
                int have_was = call.have_was;
                Live was = call.was;
                if (here != NULL) { /* in place, or moved by its own allocate */
                    if (!have_was) {
                        was = *here;
                        have_was = 1;
                    }
                    live_remove(&live, here);
                }
                if (have_was) {
                    made.returned = was.returned;
                    made.resized = k;
                }
            }
            made.seq = ++seq;
            if (live_overlaps(&live, ptr, call.size) != 0) {
                result = Py_NewRef(Py_None); /* handed out over a live allocation */
                goto done;
            }
            made.order = order++;
            Py_ssize_t at = live_lower(&live, ptr);
            memmove(&live.items[at + 1], &live.items[at], (size_t)(live.n - at) * sizeof(Live));
            live.items[at] = made;
            live.n++;
        } else if (PyErr_Occurred()) {
            goto done;
        } else if (address == dealloc_entry) {
            uint64_t ptr;
            if (event_u64(ev, reg[1], &ptr) < 0) {
                goto done;
            }
            if (!ptr) {
                continue;
            }
            Live *ended = live_find(&live, ptr);
            if (ended == NULL) {
                result = Py_NewRef(Py_None); /* a free of a pointer not live */
                goto done;
            }
            freed[nfreed++] = *ended;
            live_remove(&live, ended);
        }
    }
    qsort(live.items, (size_t)live.n, sizeof(Live), cmp_order);
    PyObject *rows = live_rows(live.items, live.n, events, type);
    PyObject *gone = rows == NULL ? NULL : live_rows(freed, nfreed, events, type);
    if (gone != NULL) {
        result = PyTuple_Pack(2, rows, gone);
    }
    Py_XDECREF(rows);
    Py_XDECREF(gone);
done:
    PyMem_Free(live_items);
    PyMem_Free(freed);
    PyMem_Free(pending);
    Py_DECREF(events);
    return result;
}


/* ------------------------------------------------------------------------------------------
 * The heap walk's common case (see heap_blocks above). */

typedef struct {
    uint64_t addr, size, prev, next;
    uint8_t free, listed;
} HeapBlock;

#define HEAP_BLOCKS_FIRST 64

/* The index of the block at `addr`, or -1 (blocks are in address order). */
static Py_ssize_t heap_find(const HeapBlock *blocks, Py_ssize_t n, uint64_t addr)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (blocks[mid].addr < addr) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < n && blocks[lo].addr == addr ? lo : -1;
}

static PyObject *heap_blocks(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer ram;
    unsigned long long base, heap_base, heap_end, magic;
    unsigned long long hs, counted, off[5]; /* size, free, magic, prev, next */
    unsigned long long head;
    int listed, by_address;
    Py_ssize_t max_blocks;
    PyTypeObject *type;
    if (!PyArg_ParseTuple(args, "y*KKK(KKKKKKKK)(Kp)pnO!", &ram, &base, &heap_base, &heap_end,
                          &hs, &counted, &off[0], &off[1], &off[2], &off[3], &off[4], &magic,
                          &head, &listed, &by_address, &max_blocks, &PyType_Type, &type)) {
        return NULL;
    }
    PyObject *result = NULL;
    /* a heap holds a few blocks in most runs: the array grows as they come, from room on
     * the stack (allocating the cap's worth, megabytes, cost a system call or two a run) */
    HeapBlock first[HEAP_BLOCKS_FIRST];
    HeapBlock *blocks = first;
    if (!is_named_tuple(type)) {
        goto done;
    }
    uint64_t len = (uint64_t)ram.len, widest = 0;
    for (int k = 0; k < 5; k++) {
        uint64_t end = off[k] + (k == 1 ? 1 : 8);
        widest = end > widest ? end : widest;
    }
    /* the whole heap and every header field in `ram`, with room for the sums below */
    if (heap_base < base || heap_end < heap_base || heap_end - base > len || hs > (1ULL << 32) ||
        widest > hs || max_blocks <= 0 || heap_end >= (1ULL << 62)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    uint64_t heap_size = heap_end - heap_base;
    Py_ssize_t cap = max_blocks, n = 0;
    uint64_t most = heap_size / hs + 1; /* blocks the heap holds at most (hs >= widest > 0) */
    if ((uint64_t)cap > most) {
        cap = (Py_ssize_t)most;
    }
    Py_ssize_t room = HEAP_BLOCKS_FIRST;
    const uint8_t *mem = (const uint8_t *)ram.buf;
    uint64_t addr = heap_base;
    while (addr < heap_end) {
        if (n >= cap || addr + hs > heap_end) {
            result = Py_NewRef(Py_None); /* past the cap, or a header past the heap's end */
            goto done;
        }
        if (n == room) {
            Py_ssize_t grown = room * 2 < cap ? room * 2 : cap;
            HeapBlock *more = PyMem_Malloc((size_t)grown * sizeof(HeapBlock));
            if (more == NULL) {
                PyErr_NoMemory();
                goto done;
            }
            memcpy(more, blocks, (size_t)n * sizeof(HeapBlock));
            if (blocks != first) {
                PyMem_Free(blocks);
            }
            blocks = more;
            room = grown;
        }
        uint64_t at = addr - base;
        HeapBlock *b = &blocks[n++];
        b->addr = addr;
        b->size = le_u64(mem + at + off[0]);
        b->free = mem[at + off[1]] != 0;
        b->prev = le_u64(mem + at + off[3]);
        b->next = le_u64(mem + at + off[4]);
        b->listed = 0;
        if (le_u64(mem + at + off[2]) != magic || b->size > heap_size) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        uint64_t next = addr + hs + b->size - counted;
        if (next > heap_end || next <= addr) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        addr = next; /* never past heap_end: the blocks end exactly there */
    }
    if (listed) {
        /* the free list from its head: every node a free block, met once, linked back to
         * the one before (in address order if so kept); then every free block met */
        uint64_t node = head, prev = 0;
        while (node) {
            Py_ssize_t i = heap_find(blocks, n, node);
            if (i < 0 || blocks[i].listed || !blocks[i].free || blocks[i].prev != prev ||
                (by_address && prev && node <= prev)) {
                result = Py_NewRef(Py_None);
                goto done;
            }
            blocks[i].listed = 1;
            prev = node;
            node = blocks[i].next;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            if (blocks[i].free && !blocks[i].listed) {
                result = Py_NewRef(Py_None);
                goto done;
            }
        }
    }
    PyObject *out = PyList_New(n);
    if (out == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *row = as_named(
            type, Py_BuildValue("(KKOOKK)", (unsigned long long)blocks[i].addr,
                                (unsigned long long)blocks[i].size,
                                blocks[i].free ? Py_True : Py_False, Py_True,
                                (unsigned long long)blocks[i].prev,
                                (unsigned long long)blocks[i].next));
        if (row == NULL) {
            Py_DECREF(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, row);
    }
    result = out;
done:
    if (blocks != first) {
        PyMem_Free(blocks);
    }
    PyBuffer_Release(&ram);
    return result;
}

static PyMethodDef methods[] = {
    {"bits_meet", bits_meet, METH_VARARGS, "bits_meet(a, b) -> bool"},
    {"bits_or", bits_or, METH_VARARGS, "bits_or(a, b) -> bytes"},
    {"bits_and_indexes", bits_and_indexes, METH_VARARGS, "bits_and_indexes(a, b) -> [int]"},
    {"read_register", (PyCFunction)(void (*)(void))read_register, METH_FASTCALL,
     "read_register(uc_reg_read, uc, regid) -> int"},
    {"read_registers", read_registers, METH_VARARGS,
     "read_registers(uc_reg_read, uc, regids) -> tuple of int"},
    {"write_register", (PyCFunction)(void (*)(void))write_register, METH_FASTCALL,
     "write_register(uc_reg_write, uc, regid, value) -> None"},
    {"restore_pages", restore_pages, METH_VARARGS,
     "restore_pages(ram, saved, bitmap, give_back=None) -> None\n\nCopy the saved pages "
     "(bytes, or None for zeros) over the pages of ram the bitmap names; those due zeros "
     "that the bitmap give_back also names (ram a private anonymous mapping) are given back "
     "to the host instead of written."},
    {"user_leaves", user_leaves, METH_VARARGS,
     "user_leaves(ram, base, cr3, max_leaves, runs=0) -> (leaves, tables) | None"},
    {"user_space_judge", user_space_judge, METH_VARARGS,
     "user_space_judge(ram, base, cr3, rsp, user_top, segments, file, kernel_phys, stack, "
     "max_leaves) -> () | tuple | None\n\nWhat kernel_emu.userspace.user_space_findings "
     "finds, check by check: () nothing; None: only the Python oracle can say."},
    {"dirty_leaves", dirty_leaves, METH_VARARGS,
     "dirty_leaves(ram, base, root, accessed_level, max_pages, max_tables, form=0, "
     "forbidden=None) -> (pages, tables, executable) | int | bytes | None"},
    {"held_words", held_words, METH_VARARGS, "held_words(data, start, keys) -> [key]"},
    {"log_lines", log_lines, METH_O,
     "log_lines(text) -> [what] | None\n\nWhat each line of a console says, as "
     "kernel_emu.klog reads it; None: only that reading can say."},
    {"pt_loads", pt_loads, METH_VARARGS,
     "pt_loads(data, segment) -> (segment, ...)\n\nThe PT_LOAD entries of an ELF64 "
     "little-endian file, as kernel_emu.elfview.load_segments reads them."},
    {"leaks_reached", leaks_reached, METH_VARARGS,
     "leaks_reached(ram, base, live, roots, values, scan_limit, max_live) -> bool"},
    {"heap_blocks", heap_blocks, METH_VARARGS,
     "heap_blocks(ram, base, heap_base, heap_end, layout, (head, listed), by_address, "
     "max_blocks, block) -> [block] | None"},
    {"replay_allocations", replay_allocations, METH_VARARGS,
     "replay_allocations(events, alloc_entry, returns, dealloc_entry, realloc_entry, "
     "registers, allocation) -> (live, freed) | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kernel_emu._walk",
    "Native walks of guest page tables.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__walk(void)
{
    pagemap_setup();
    return PyModule_Create(&module);
}
