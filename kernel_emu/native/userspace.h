/* The user-space oracle natively: what kernel_emu.userspace.user_space_findings_python (the
 * reference) finds in the address space a run that stopped at the kernel's `iretq` into
 * ring 3 leaves, check by check, for the caller to word. Included by walk.c, whose walk it
 * shares.
 *
 * user_space_judge(ram, base, cr3, rsp, user_top, segments, file, kernel_phys, stack,
 *                  max_leaves) -> () | tuple | None
 *   ram, base   the first RAM bank, as for user_leaves
 *   cr3, rsp    the registers at the stop: the tables to walk, and the `iretq` frame
 *   segments    [(vaddr, memsz, filesz, offset, flags)]: the input's PT_LOAD entries
 *   file        the input's bytes (empty: the file contents are not compared)
 *   kernel_phys [(lo, hi)]: physical ranges no user page may map
 *   stack       (lo, hi) of the user stack the kernel announced, or None
 *   ()          the reference finds nothing (nearly every run);
 *   (bounds, stack_ok, pages, bad, uncovered, content, entry_ok), the reference's checks in
 *   its order:
 *     bounds     the first segment past the user half, or -1
 *     stack_ok   the ring-3 stack passes (False: its finding is the reference's to make,
 *                by a walk of its one page)
 *     pages      [(segment, page, rights, writable, executable)]: each segment's first
 *                wrong page of its first and last, in segment order; rights False: not
 *                mapped for user mode; True: mapped with other rights than those of every
 *                segment in that page (writable, executable: the mapping's)
 *     bad        (vaddr, paddr, what): the first user leaf in walk order in the upper half
 *                (what -2), over kernel_phys[what], or over a page table of this address
 *                space (what -1); or None
 *     uncovered  with no page wrong, the first user leaf no program header covers and
 *                that is not near the stack; or None
 *     content    with nothing found before: (segment, at, got, want), the first byte at
 *                either end of a segment's file bytes or at its BSS's start that reads
 *                otherwise than the file (or zero) says; or None
 *     entry_ok   the `iretq` enters ring 3 at user-executable code (False: its finding is
 *                the reference's to make)
 *   None        wherever this cannot follow the reference exactly (a table, frame or byte
 *   outside `ram`, max_leaves leaves or more, more than MAX_JUDGED_SEGMENTS segments, a
 *   segment past 2**64, a window of a segment's contents on a page the walk does not hold):
 *   the caller then runs the reference.
 */

#define MAX_JUDGED_SEGMENTS 256
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

/* What the reference finds, piece by piece, as user_space_judge returns it (see above). */
typedef struct {
    Py_ssize_t seg;
    uint64_t page;
    int rights;   /* 0: not mapped for user mode; 1: mapped with other rights */
    int writable, executable;
} PageFinding;

typedef struct {
    Py_ssize_t bounds;      /* the first segment past the user half; -1: none */
    int stack_ok, entry_ok; /* the `iretq` frame's checks pass */
    PageFinding *pages;     /* at most one per segment, in segment order */
    Py_ssize_t npages;
    int bad;                /* a user leaf in the upper half, over kernel memory or a table */
    uint64_t bad_vaddr, bad_paddr;
    Py_ssize_t bad_what;    /* its kernel_phys index; BAD_TABLE, BAD_UPPER */
    int uncovered;
    uint64_t uncovered_vaddr;
    int content;            /* a byte of segment content_seg, content_at bytes in, differs */
    Py_ssize_t content_seg;
    uint64_t content_at;
    int content_got, content_want;
} Judged;

#define BAD_TABLE (-1)
#define BAD_UPPER (-2)

/* The user leaf holding the page `page` as the reference's page walk finds it, which reads
 * only the index bits (47..12) of the address: its canonical form is looked up in the runs. */
static int space_page(const Space *s, uint64_t page, Run *leaf)
{
    uint64_t key = page & 0x0000FFFFFFFFFFFFULL;
    if (key & (1ULL << 47)) {
        key |= 0xFFFF000000000000ULL;
    }
    return space_leaf(s, key, leaf);
}

/* Compares `size` bytes of user memory at `vaddr` with `want` (NULL: zeros), as the
 * reference reads them: 0 all equal, 1 the first differing at *k (reading *got), -1 when a
 * byte lies on a page the runs do not hold or outside the bank (the reference reads those
 * through a walk of its own, or skips them: only it can say). */
static int space_diff(const Space *s, uint64_t vaddr, const uint8_t *want, uint64_t size,
                      uint64_t *k, int *got)
{
    uint64_t done = 0;
    while (done < size) {
        Run leaf;
        if (!space_leaf(s, vaddr + done, &leaf)) {
            return -1;
        }
        uint64_t chunk = leaf.vaddr + leaf.size - (vaddr + done);
        if (chunk > size - done || chunk == 0) {
            chunk = size - done;
        }
        uint64_t paddr = leaf.paddr + (vaddr + done - leaf.vaddr);
        if (paddr < s->base || paddr - s->base > s->size || chunk > s->size - (paddr - s->base)) {
            return -1;
        }
        const uint8_t *mem = s->ram + (paddr - s->base);
        for (uint64_t i = 0; i < chunk; i++) {
            uint8_t expect = want != NULL ? want[done + i] : 0;
            if (mem[i] != expect) {
                *k = done + i;
                *got = mem[i];
                return 1;
            }
        }
        done += chunk;
    }
    return 0;
}

/* The first leaf, in walk order, in the upper half or over kernel memory or a page table
 * (kernel_emu.userspace.first_bad_mapping), into j->bad and its fields; left clear: none. */
static void first_bad_leaf(const Space *s, const uint64_t *tables, Py_ssize_t ntables,
                           uint64_t user_top, const uint64_t (*phys)[2], Py_ssize_t nphys,
                           Judged *j)
{
    for (Py_ssize_t r = 0; r < s->nruns; r++) {
        const Run *run = &s->runs[r];
        uint64_t size = run->size, n = run->count;
        /* leaf i maps [low + i*size, +size) in physical order; walk order is the same or,
         * for a descending run, the reverse */
        u128 low = run->descending ? run->paddr - (n - 1) * size : run->paddr;
        u128 high = low + (u128)n * size;
        u128 best = n;  /* the first such leaf in walk order; n: none */
        for (Py_ssize_t k = 0; k < nphys; k++) {
            if (!(phys[k][0] < high && low < phys[k][1])) {
                continue;
            }
            u128 first = low + size > phys[k][0] ? 0 : (phys[k][0] - low - size) / size + 1;
            u128 last = ((u128)phys[k][1] - low + size - 1) / size - 1;
            if (last > n - 1) {
                last = n - 1;
            }
            if (first <= last) {
                u128 walk_first = run->descending ? n - 1 - last : first;
                if (walk_first < best) {
                    best = walk_first;
                }
            }
        }
        u128 tmin = 0, tmax = 0;
        int any = 0;
        for (Py_ssize_t t = 0; t < ntables; t++) {
            if (low <= tables[t] && tables[t] < high) {
                u128 at = ((u128)tables[t] - low) / size;
                tmin = !any || at < tmin ? at : tmin;
                tmax = !any || at > tmax ? at : tmax;
                any = 1;
            }
        }
        if (any) {
            u128 walk_first = run->descending ? n - 1 - tmax : tmin;
            if (walk_first < best) {
                best = walk_first;
            }
        }
        if ((u128)run->vaddr + (u128)n * size > user_top) {
            /* the first leaf at or past user_top: ceil((user_top - vaddr) / size), at least 0 */
            u128 k = run->vaddr >= user_top ? 0 : ((u128)user_top - run->vaddr + size - 1) / size;
            if (k < best) {
                best = k;
            }
        }
        if (best >= n) {
            continue;
        }
        uint64_t step = (uint64_t)best * size;
        j->bad = 1;
        j->bad_vaddr = run->vaddr + step;
        j->bad_paddr = run->descending ? run->paddr - step : run->paddr + step;
        if (j->bad_vaddr >= user_top) {
            j->bad_what = BAD_UPPER;
            return;
        }
        j->bad_what = BAD_TABLE;
        for (Py_ssize_t k = 0; k < nphys; k++) {
            if (phys[k][0] < (u128)j->bad_paddr + size && j->bad_paddr < phys[k][1]) {
                j->bad_what = k;
                break;
            }
        }
        return;
    }
}

/* The reference's checks, in its order, on the walk `s` and the parsed arguments, into `j`;
 * 0 where this cannot follow the reference exactly (the caller then runs it). */
static int user_space_judged(const Space *s, const uint64_t *tables, Py_ssize_t ntables,
                             uint64_t rsp, uint64_t user_top, const Seg *segs, Py_ssize_t n,
                             const uint8_t *file, uint64_t file_len,
                             const uint64_t (*phys)[2], Py_ssize_t nphys,
                             const uint64_t *stack, uint64_t (*covered)[2], Judged *j)
{
    int ok = 1;
    j->bounds = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        u128 end = (u128)segs[i].vaddr + segs[i].memsz;
        if (end > ((u128)1 << 64)) {
            return 0;  /* past 2**64: the reference's page arithmetic goes on unbounded */
        }
        if (segs[i].memsz && end > user_top && j->bounds < 0) {
            j->bounds = i;
        }
    }
    /* the `iretq` frame: into ring 3, with a user-writable stack and user-executable code */
    uint64_t rip = space_u64(s, rsp, &ok), cs = space_u64(s, rsp + 8, &ok);
    uint64_t user_rsp = space_u64(s, rsp + 24, &ok);
    if (!ok) {
        return 0;
    }
    Run leaf;
    j->stack_ok = (cs & 3) != 3 || (space_leaf(s, user_rsp - 8, &leaf) && leaf.writable);
    j->entry_ok = (cs & 3) == 3 && space_leaf(s, rip, &leaf) && leaf.executable;
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
            PageFinding *f = &j->pages[j->npages];
            if (!space_page(s, pages[k], &leaf)) {
                *f = (PageFinding){i, pages[k], 0, 0, 0};
                j->npages++;
                break;
            }
            uint64_t flags = 0;
            for (Py_ssize_t m = 0; m < n; m++) {
                if (segs[m].memsz && (segs[m].vaddr & ~(PAGE - 1)) <= pages[k] &&
                    pages[k] < (u128)segs[m].vaddr + segs[m].memsz) {
                    flags |= segs[m].flags;
                }
            }
            if (leaf.writable != !!(flags & 2) || leaf.executable != !!(flags & 1)) {
                *f = (PageFinding){i, pages[k], 1, leaf.writable, leaf.executable};
                j->npages++;
                break;
            }
        }
    }
    first_bad_leaf(s, tables, ntables, user_top, phys, nphys, j);
    /* with no segment page wrong: every user leaf covered by a program header, or near
     * the stack */
    if (j->npages == 0) {
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
        for (Py_ssize_t r = 0; r < s->nruns && !j->uncovered; r++) {
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
                    j->uncovered = 1;
                    j->uncovered_vaddr = (uint64_t)vaddr;
                    break;
                }
                vaddr += (past - vaddr) / run->size * run->size + run->size;
            }
        }
    }
    /* with nothing found so far: each segment's file bytes at both ends, and its BSS's
     * first bytes */
    if (file_len == 0 || j->bounds >= 0 || !j->stack_ok || j->npages || j->bad || j->uncovered) {
        return 1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        const Seg *g = &segs[i];
        u128 hi = (u128)g->vaddr + g->memsz;
        if (!g->memsz || g->filesz > g->memsz || (u128)g->offset + g->filesz > file_len) {
            continue;
        }
        int shared = 0;  /* another span meets it: the ELF does not say which one wins */
        for (Py_ssize_t m = 0; m < n && !shared; m++) {
            shared = m != i && segs[m].vaddr < hi &&
                     (u128)segs[m].vaddr + segs[m].memsz > g->vaddr;
        }
        if (shared) {
            continue;
        }
        const uint8_t *data = file + g->offset;
        /* the window at each end of the file bytes is as long as either */
        uint64_t ends = g->filesz < CONTENT_WINDOW ? g->filesz : CONTENT_WINDOW;
        uint64_t bss = g->memsz - g->filesz < CONTENT_WINDOW ? g->memsz - g->filesz
                                                              : CONTENT_WINDOW;
        uint64_t at[3] = {0, g->filesz - ends, g->filesz}, len[3] = {ends, ends, bss};
        for (int w = 0; w < 3; w++) {
            uint64_t k;
            int got;
            int d = space_diff(s, g->vaddr + at[w], w < 2 ? data + at[w] : NULL, len[w], &k,
                               &got);
            if (d < 0) {
                return 0;
            }
            if (d > 0) {
                j->content = 1;
                j->content_seg = i;
                j->content_at = at[w] + k;
                j->content_got = got;
                j->content_want = w < 2 ? data[at[w] + k] : 0;
                return 1;
            }
        }
    }
    return 1;
}

/* `j` as the caller's tuple (see above). */
static PyObject *judged_tuple(const Judged *j)
{
    if (j->bounds < 0 && j->stack_ok && j->npages == 0 && !j->bad && !j->uncovered &&
        !j->content && j->entry_ok) {
        return PyTuple_New(0);
    }
    PyObject *pages = PyList_New(j->npages);
    if (pages == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < j->npages; i++) {
        const PageFinding *f = &j->pages[i];
        PyObject *item = Py_BuildValue("(nKiNN)", f->seg, (unsigned long long)f->page,
                                       f->rights, PyBool_FromLong(f->writable),
                                       PyBool_FromLong(f->executable));
        if (item == NULL) {
            Py_DECREF(pages);
            return NULL;
        }
        PyList_SET_ITEM(pages, i, item);
    }
    PyObject *bad = j->bad ? Py_BuildValue("(KKn)", (unsigned long long)j->bad_vaddr,
                                           (unsigned long long)j->bad_paddr, j->bad_what)
                           : Py_NewRef(Py_None);
    PyObject *uncovered = j->uncovered ? PyLong_FromUnsignedLongLong(j->uncovered_vaddr)
                                       : Py_NewRef(Py_None);
    PyObject *content = j->content ? Py_BuildValue("(nKii)", j->content_seg,
                                                   (unsigned long long)j->content_at,
                                                   j->content_got, j->content_want)
                                   : Py_NewRef(Py_None);
    if (bad == NULL || uncovered == NULL || content == NULL) {
        Py_DECREF(pages);
        Py_XDECREF(bad);
        Py_XDECREF(uncovered);
        Py_XDECREF(content);
        return NULL;
    }
    return Py_BuildValue("(nNNNNNN)", j->bounds, PyBool_FromLong(j->stack_ok), pages, bad,
                         uncovered, content, PyBool_FromLong(j->entry_ok));
}

static PyObject *user_space_judge(PyObject *self, PyObject *args)
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
    PyObject *out = NULL;
    Seg *segs = NULL;
    PageFinding *found = NULL;
    uint64_t (*phys)[2] = NULL;
    uint64_t (*covered)[2] = NULL;
    Walk w = {ram.buf, base, (uint64_t)ram.len, max_leaves, 0, 1, {0, 0, 0, 0, 0, 0, 0},
              NULL, NULL, 0, NULL, 0, 0, NULL, 0, 0};
    Py_ssize_t n = PySequence_Size(segments), nphys = PySequence_Size(kernel_phys);
    uint64_t stack[2];
    if (n < 0 || nphys < 0) {
        goto done;
    }
    if (n > MAX_JUDGED_SEGMENTS || (uint64_t)ram.len < PAGE ||
        (stack_arg != Py_None && u64_items(stack_arg, stack, 2) < 0)) {
        goto done;
    }
    segs = PyMem_Calloc((size_t)n + 1, sizeof *segs);
    phys = PyMem_Calloc((size_t)nphys + 1, sizeof *phys);
    covered = PyMem_Calloc((size_t)n + 1, sizeof *covered);
    found = PyMem_Calloc((size_t)n + 1, sizeof *found);
    if (segs == NULL || phys == NULL || covered == NULL || found == NULL) {
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
        Judged j;
        memset(&j, 0, sizeof j);
        j.pages = found;
        if (user_space_judged(&s, w.tabs, w.ntabs, rsp, user_top, segs, n, file.buf,
                              (uint64_t)file.len, (const uint64_t (*)[2])phys, nphys,
                              stack_arg != Py_None ? stack : NULL, covered, &j)) {
            out = judged_tuple(&j);
        }
    }
done:
    PyMem_Free(segs);
    PyMem_Free(phys);
    PyMem_Free(covered);
    PyMem_Free(found);
    PyMem_Free(w.out);
    PyMem_Free(w.tabs);
    PyBuffer_Release(&ram);
    PyBuffer_Release(&file);
    /* an error left set is ours (no memory); what the check could not read is cleared */
    if (PyErr_Occurred()) {
        Py_XDECREF(out);
        return NULL;
    }
    return out != NULL ? out : Py_NewRef(Py_None);
}
