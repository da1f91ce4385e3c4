/* The user-space oracle's common case natively: whether a run that stopped at the kernel's
 * `iretq` into ring 3 leaves kernel_emu.userspace.user_space_findings (the reference)
 * nothing to report. Included by walk.c, whose walk it shares.
 *
 * user_space_check(ram, base, cr3, rsp, user_top, segments, file, kernel_phys, stack,
 *                  max_leaves) -> int
 *   ram, base   the first RAM bank, as for user_leaves
 *   cr3, rsp    the registers at the stop: the tables to walk, and the `iretq` frame
 *   segments    [(vaddr, memsz, filesz, offset, flags)]: the input's PT_LOAD entries
 *   file        the input's bytes (empty: the file contents are not compared)
 *   kernel_phys [(lo, hi)]: physical ranges no user page may map
 *   stack       (lo, hi) of the user stack the kernel announced, or None
 *   1 (USER_SPACE_CLEAN) only when the reference would find nothing; 2 (USER_SPACE_ENTRY)
 *   only when it would find nothing but the entry (every check before it passed, and the
 *   `iretq` enters ring 3 at a page that is not user-executable), whose finding the caller
 *   makes alone; 0 whenever anything else may be wrong,
 *   and wherever this check cannot follow the reference exactly (a table, frame or byte
 *   outside `ram`, max_leaves leaves or more, more than MAX_CLEAN_SEGMENTS segments, a
 *   window of a segment's contents not mapped): the caller then runs the reference, which
 *   gives the findings. The reference's checks, in its order, each made the strict way:
 *   every segment within the user half; the ring-3 stack user-writable; each segment's
 *   first and last page user-mapped with the rights of every segment in that page; no user
 *   leaf in the upper half or over kernel memory or a page table of this address space;
 *   every user leaf covered by a program header or near the stack; each segment's first
 *   and last file bytes and first BSS bytes as the file has them; the entry at user-
 *   executable code.
 */

#define MAX_CLEAN_SEGMENTS 256
#define USER_SPACE_CLEAN 1
#define USER_SPACE_ENTRY 2
#define CONTENT_WINDOW 64

typedef unsigned __int128 u128;

typedef struct {
    uint64_t vaddr, memsz, filesz, offset, flags;
} Seg;

typedef struct {
    const uint8_t *ram;
    uint64_t base, size;
    const Run *runs;
    Py_ssize_t nruns;
} Space;

/* The word at physical `at` in the bank; 0 when outside it (`*ok` cleared). */
static uint64_t space_u64(const Space *s, uint64_t at, int *ok)
{
    if (at < s->base || at - s->base > s->size - 8) {
        *ok = 0;
        return 0;
    }
    uint64_t value;
    memcpy(&value, s->ram + (at - s->base), sizeof value);
    return value;
}

/* The user leaf holding `vaddr` (its start, frame, size, rights), from the walk's runs,
 * which are in ascending virtual order; 0 when no run holds it. */
static int space_leaf(const Space *s, uint64_t vaddr, Run *leaf)
{
    Py_ssize_t lo = 0, hi = s->nruns;
    while (lo < hi) {  /* the first run starting past vaddr */
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (s->runs[mid].vaddr <= vaddr) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo == 0) {
        return 0;
    }
    const Run *r = &s->runs[lo - 1];
    uint64_t k = (vaddr - r->vaddr) / r->size;
    if (k >= r->count) {
        return 0;
    }
    *leaf = *r;
    leaf->vaddr = r->vaddr + k * r->size;
    leaf->paddr = r->descending ? r->paddr - k * r->size : r->paddr + k * r->size;
    leaf->count = 1;
    leaf->descending = 0;
    return 1;
}

/* Whether `size` bytes of user memory at `vaddr` read as `want` (NULL: zeros); 0 also when
 * any of them is not mapped or lies outside the bank. */
static int space_reads(const Space *s, uint64_t vaddr, const uint8_t *want, uint64_t size)
{
    while (size > 0) {
        Run leaf;
        if (!space_leaf(s, vaddr, &leaf)) {
            return 0;
        }
        uint64_t chunk = leaf.vaddr + leaf.size - vaddr;
        if (chunk > size || chunk == 0) {
            chunk = size;
        }
        uint64_t paddr = leaf.paddr + (vaddr - leaf.vaddr);
        if (paddr < s->base || paddr - s->base > s->size || chunk > s->size - (paddr - s->base)) {
            return 0;
        }
        const uint8_t *got = s->ram + (paddr - s->base);
        if (want != NULL) {
            if (memcmp(got, want, chunk) != 0) {
                return 0;
            }
            want += chunk;
        } else {
            for (uint64_t i = 0; i < chunk; i++) {
                if (got[i]) {
                    return 0;
                }
            }
        }
        vaddr += chunk;
        size -= chunk;
    }
    return 1;
}

static int u64_item(PyObject *seq, Py_ssize_t i, uint64_t *out)
{
    PyObject *item = PySequence_GetItem(seq, i);
    if (item == NULL) {
        return -1;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(item);
    Py_DECREF(item);
    if (value == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    *out = value;
    return 0;
}

/* `n` ints from the sequence `seq`; -1 (error cleared) for anything else, a negative value
 * or one of 2**64 or more among them. */
static int u64_items(PyObject *seq, uint64_t *out, Py_ssize_t n)
{
    if (!PySequence_Check(seq) || PySequence_Size(seq) != n) {
        PyErr_Clear();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (u64_item(seq, i, &out[i]) < 0) {
            PyErr_Clear();
            return -1;
        }
    }
    return 0;
}

static int compare_range(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;
    if (x[0] != y[0]) {
        return x[0] < y[0] ? -1 : 1;
    }
    return x[1] < y[1] ? -1 : x[1] > y[1];
}

/* The checks, on the walk `s` and the parsed arguments: USER_SPACE_CLEAN, nothing to
 * report; USER_SPACE_ENTRY, nothing but the entry; 0: anything else may be wrong. */
static int user_space_verdict(const Space *s, const uint64_t *tables, Py_ssize_t ntables,
                              uint64_t rsp, uint64_t user_top, const Seg *segs, Py_ssize_t n,
                              const uint8_t *file, uint64_t file_len,
                              const uint64_t (*phys)[2], Py_ssize_t nphys,
                              const uint64_t *stack, uint64_t (*covered)[2])
{
    int ok = 1;
    /* every segment within the user half */
    for (Py_ssize_t i = 0; i < n; i++) {
        if (segs[i].memsz && (u128)segs[i].vaddr + segs[i].memsz > user_top) {
            return 0;
        }
    }
    /* the `iretq` frame: into ring 3, with a user-writable stack */
    uint64_t rip = space_u64(s, rsp, &ok), cs = space_u64(s, rsp + 8, &ok);
    uint64_t user_rsp = space_u64(s, rsp + 24, &ok);
    Run leaf;
    if (!ok || (cs & 3) != 3 || !space_leaf(s, user_rsp - 8, &leaf) || !leaf.writable) {
        return 0;
    }
    /* each segment's first and last page mapped with the rights of all segments there */
    Py_ssize_t ncovered = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (segs[i].memsz == 0) {
            continue;
        }
        uint64_t first = segs[i].vaddr & ~(PAGE - 1);
        uint64_t last = (segs[i].vaddr + segs[i].memsz - 1) & ~(PAGE - 1);
        if (last < first || last - first > (1ULL << 32)) {
            continue;
        }
        covered[ncovered][0] = first;
        covered[ncovered][1] = last;
        ncovered++;
        uint64_t pages[2] = {first, last};
        for (int k = 0; k < 2; k++) {
            if (!space_leaf(s, pages[k], &leaf)) {
                return 0;
            }
            uint64_t flags = 0;
            for (Py_ssize_t j = 0; j < n; j++) {
                if (segs[j].memsz && (segs[j].vaddr & ~(PAGE - 1)) <= pages[k] &&
                    pages[k] < (u128)segs[j].vaddr + segs[j].memsz) {
                    flags |= segs[j].flags;
                }
            }
            if (leaf.writable != !!(flags & 2) || leaf.executable != !!(flags & 1)) {
                return 0;
            }
        }
    }
    /* no user leaf in the upper half, over kernel memory or over a page table */
    for (Py_ssize_t r = 0; r < s->nruns; r++) {
        const Run *run = &s->runs[r];
        u128 low = run->descending ? run->paddr - (run->count - 1) * run->size : run->paddr;
        u128 high = low + (u128)run->count * run->size;
        if ((u128)run->vaddr + (u128)run->count * run->size > user_top) {
            return 0;
        }
        for (Py_ssize_t k = 0; k < nphys; k++) {
            if (phys[k][0] < high && low < phys[k][1]) {
                return 0;
            }
        }
        for (Py_ssize_t t = 0; t < ntables; t++) {
            if (low <= tables[t] && tables[t] < high) {
                return 0;
            }
        }
    }
    /* every user leaf covered by a program header, or near the stack */
    qsort(covered, (size_t)ncovered, sizeof covered[0], compare_range);
    Py_ssize_t nmerged = 0;
    for (Py_ssize_t i = 0; i < ncovered; i++) {
        if (nmerged && covered[i][0] <= (u128)covered[nmerged - 1][1] + PAGE) {
            if (covered[i][1] > covered[nmerged - 1][1]) {
                covered[nmerged - 1][1] = covered[i][1];
            }
        } else {
            covered[nmerged][0] = covered[i][0];
            covered[nmerged][1] = covered[i][1];
            nmerged++;
        }
    }
    for (Py_ssize_t r = 0; r < s->nruns; r++) {
        const Run *run = &s->runs[r];
        u128 end = (u128)run->vaddr + (u128)run->count * run->size;
        u128 vaddr = run->vaddr;
        Py_ssize_t m = 0;
        while (vaddr < end && vaddr < user_top) {
            while (m < nmerged && covered[m][1] < vaddr) {
                m++;
            }
            u128 past;
            if (m < nmerged && covered[m][0] <= vaddr) {
                past = covered[m][1];
            } else if (stack != NULL && stack[0] <= vaddr && vaddr <= stack[1]) {
                past = stack[1];
            } else {
                return 0;
            }
            vaddr += (past - vaddr) / run->size * run->size + run->size;
        }
    }
    /* each segment's file bytes at both ends, and its BSS's first bytes */
    if (file_len > 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            const Seg *g = &segs[i];
            u128 hi = (u128)g->vaddr + g->memsz;
            if (!g->memsz || g->filesz > g->memsz || (u128)g->offset + g->filesz > file_len ||
                hi > ((u128)1 << 64)) {
                continue;
            }
            int shared = 0;  /* another span meets it: the ELF does not say which one wins */
            for (Py_ssize_t j = 0; j < n && !shared; j++) {
                shared = j != i && segs[j].vaddr < hi &&
                         (u128)segs[j].vaddr + segs[j].memsz > g->vaddr;
            }
            if (shared) {
                continue;
            }
            const uint8_t *data = file + g->offset;
            /* the window at each end of the file bytes is as long as either */
            uint64_t ends = g->filesz < CONTENT_WINDOW ? g->filesz : CONTENT_WINDOW;
            uint64_t bss = g->memsz - g->filesz < CONTENT_WINDOW ? g->memsz - g->filesz
                                                                  : CONTENT_WINDOW;
            if (!space_reads(s, g->vaddr, data, ends) ||
                !space_reads(s, g->vaddr + (g->filesz - ends), data + (g->filesz - ends), ends) ||
                !space_reads(s, g->vaddr + g->filesz, NULL, bss)) {
                return 0;
            }
        }
    }
    /* the entry: user-executable code (the last check: all the others passed) */
    return space_leaf(s, rip, &leaf) && leaf.executable ? USER_SPACE_CLEAN : USER_SPACE_ENTRY;
}

static PyObject *user_space_check(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer ram, file;
    unsigned long long base, cr3, rsp, user_top;
    PyObject *segments, *kernel_phys, *stack_arg;
    Py_ssize_t max_leaves;
    if (!PyArg_ParseTuple(args, "y*KKKKOy*OOn", &ram, &base, &cr3, &rsp, &user_top, &segments,
                          &file, &kernel_phys, &stack_arg, &max_leaves)) {
        return NULL;
    }
    int verdict = 0;
    Seg *segs = NULL;
    uint64_t (*phys)[2] = NULL;
    uint64_t (*covered)[2] = NULL;
    Walk w = {ram.buf, base, (uint64_t)ram.len, max_leaves, 0, 1, {0, 0, 0, 0, 0, 0, 0},
              NULL, NULL, 0, NULL, 0, 0, NULL, 0, 0};
    Py_ssize_t n = PySequence_Size(segments), nphys = PySequence_Size(kernel_phys);
    uint64_t stack[2];
    if (n < 0 || nphys < 0) {
        goto done;
    }
    if (n > MAX_CLEAN_SEGMENTS || (uint64_t)ram.len < PAGE ||
        (stack_arg != Py_None && u64_items(stack_arg, stack, 2) < 0)) {
        goto done;
    }
    segs = PyMem_Calloc((size_t)n + 1, sizeof *segs);
    phys = PyMem_Calloc((size_t)nphys + 1, sizeof *phys);
    covered = PyMem_Calloc((size_t)n + 1, sizeof *covered);
    if (segs == NULL || phys == NULL || covered == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t v[5];
        PyObject *item = PySequence_GetItem(segments, i);
        int bad = item == NULL || u64_items(item, v, 5) < 0;
        Py_XDECREF(item);
        if (bad) {
            PyErr_Clear();
            goto done;
        }
        segs[i] = (Seg){v[0], v[1], v[2], v[3], v[4]};
    }
    for (Py_ssize_t i = 0; i < nphys; i++) {
        PyObject *item = PySequence_GetItem(kernel_phys, i);
        int bad = item == NULL || u64_items(item, phys[i], 2) < 0;
        Py_XDECREF(item);
        if (bad) {
            PyErr_Clear();
            goto done;
        }
    }
    if (walk(&w, cr3, 4, 0, 1, 0) < 0 || flush_run(&w) < 0) {
        goto done;
    }
    if (!w.outside && w.seen < max_leaves) {
        Space s = {ram.buf, base, (uint64_t)ram.len, w.out, w.nout};
        verdict = user_space_verdict(&s, w.tabs, w.ntabs, rsp, user_top, segs, n, file.buf,
                                     (uint64_t)file.len, (const uint64_t (*)[2])phys, nphys,
                                     stack_arg != Py_None ? stack : NULL, covered);
    }
done:
    PyMem_Free(segs);
    PyMem_Free(phys);
    PyMem_Free(covered);
    PyMem_Free(w.out);
    PyMem_Free(w.tabs);
    PyBuffer_Release(&ram);
    PyBuffer_Release(&file);
    /* an error left set is ours (no memory); what the check could not read is cleared */
    return PyErr_Occurred() ? NULL : PyLong_FromLong(verdict);
}
