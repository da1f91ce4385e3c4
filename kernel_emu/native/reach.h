/* The leak oracle's common case natively: whether every allocation live at the stop is
 * reached from the roots, so that kernel_emu.leaks.leak_findings (the reference) has
 * nothing to report. Included by walk.c after held_words, whose search it shares.
 *
 * leaks_reached(ram, base, live, roots, values, scan_limit, max_live) -> bool
 *   ram, base   the first RAM bank: its bytes and guest address
 *   live        the live allocations: items whose [1] is the pointer and [2] the size
 *               (kernel_emu.allocations.Allocation)
 *   roots       [(start, size)]: the regions scanned first (the kernel's writable
 *               segments, a halted kernel's live stack)
 *   values      the registers' values: an allocation one of them equals is reached
 *   scan_limit  how much of an allocation is scanned at most, as in the reference
 *   True only when the reference finds every allocation reached. A region the reference
 *   scans but that lies outside `ram` is not scanned here, which can only leave an
 *   allocation unreached: False, and the caller runs the reference, which gives the
 *   finding. False too for more than max_live allocations (the caller's reference then
 *   judges as before, and memory here stays bounded).
 *
 *   What is reached does not depend on the order regions are scanned in; as the reference
 *   does, the smallest region left goes first and the scan ends once nothing is pending,
 *   so the megabytes of a loaded segment's buffer are seldom read.
 */

typedef struct {
    uint64_t start, size;
    int done;
} ReachRegion;

typedef struct {
    uint64_t ptr, size;
    int reached;
} LiveBlock;

static int compare_live(const void *a, const void *b)
{
    uint64_t x = ((const LiveBlock *)a)->ptr, y = ((const LiveBlock *)b)->ptr;
    return (x > y) - (x < y);
}

/* The index of the allocation at `ptr` in `pending` (ascending), or -1. */
static Py_ssize_t live_at(const LiveBlock *pending, Py_ssize_t n, uint64_t ptr)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (pending[mid].ptr < ptr) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo < n && pending[lo].ptr == ptr ? lo : -1;
}

/* The region an allocation reached makes: its payload, at least a byte, at most scan_limit. */
static uint64_t reach_extent(uint64_t size, uint64_t scan_limit)
{
    uint64_t n = size ? size : 1;
    return n < scan_limit ? n : scan_limit;
}

/* `ptr` found in a reached region or a register: the allocation there, if one not reached
 * yet, is reached now, and its payload a region to scan. */
static void reach(LiveBlock *pending, Py_ssize_t nlive, uint64_t ptr, uint64_t scan_limit,
                  ReachRegion *regions, Py_ssize_t *nregions, Py_ssize_t *left)
{
    Py_ssize_t i = live_at(pending, nlive, ptr);
    if (i >= 0 && !pending[i].reached) {
        pending[i].reached = 1;
        (*left)--;
        regions[(*nregions)++] = (ReachRegion){ptr, reach_extent(pending[i].size, scan_limit), 0};
    }
}

static PyObject *leaks_reached(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer ram;
    unsigned long long base, scan_limit;
    Py_ssize_t max_live;
    PyObject *live_arg, *roots_arg, *values_arg;
    if (!PyArg_ParseTuple(args, "y*KOOOKn", &ram, &base, &live_arg, &roots_arg, &values_arg,
                          &scan_limit, &max_live)) {
        return NULL;
    }
    PyObject *result = NULL;
    PyObject *live = PySequence_Fast(live_arg, "live must be a sequence");
    PyObject *roots = live ? PySequence_Fast(roots_arg, "roots must be a sequence") : NULL;
    PyObject *values = roots ? PySequence_Fast(values_arg, "values must be a sequence") : NULL;
    LiveBlock *pending = NULL;  /* ascending by pointer */
    ReachRegion *regions = NULL;
    if (values == NULL) {
        goto done;
    }
    Py_ssize_t nlive = PySequence_Fast_GET_SIZE(live);
    Py_ssize_t nroots = PySequence_Fast_GET_SIZE(roots);
    if (nlive == 0) {
        result = Py_NewRef(Py_True);
        goto done;
    }
    if (nlive > max_live) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    pending = PyMem_Calloc((size_t)nlive, sizeof(LiveBlock));
    /* every allocation adds at most one region, once reached */
    regions = PyMem_Malloc(sizeof(ReachRegion) * (size_t)(nroots + nlive));
    if (pending == NULL || regions == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nlive; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(live, i);
        PyObject *ptr = PySequence_GetItem(item, 1);
        PyObject *size = ptr ? PySequence_GetItem(item, 2) : NULL;
        if (size != NULL) {
            pending[i].ptr = PyLong_AsUnsignedLongLong(ptr);
            pending[i].size = PyLong_AsUnsignedLongLong(size);
        }
        Py_XDECREF(ptr);
        Py_XDECREF(size);
        if (size == NULL || PyErr_Occurred()) {
            goto done;
        }
    }
    qsort(pending, (size_t)nlive, sizeof(LiveBlock), compare_live);
    for (Py_ssize_t i = 1; i < nlive; i++) {
        if (pending[i].ptr == pending[i - 1].ptr) {
            /* the reference keys them by pointer: not two live allocations, not judged here */
            result = Py_NewRef(Py_False);
            goto done;
        }
    }
    Py_ssize_t nregions = 0;
    for (Py_ssize_t i = 0; i < nroots; i++) {
        unsigned long long start, size;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(roots, i), "KK;a root is (start, size)",
                              &start, &size)) {
            goto done;
        }
        regions[nregions++] = (ReachRegion){start, size, 0};
    }
    Py_ssize_t left = nlive;
    for (Py_ssize_t v = 0; v < PySequence_Fast_GET_SIZE(values); v++) {
        uint64_t value = PyLong_AsUnsignedLongLong(PySequence_Fast_GET_ITEM(values, v));
        if (value == (uint64_t)-1 && PyErr_Occurred()) {
            goto done;
        }
        reach(pending, nlive, value, scan_limit, regions, &nregions, &left);
    }
    const uint8_t *bytes = ram.buf;
    uint64_t ram_size = (uint64_t)ram.len;
    while (left > 0) {
        ReachRegion *next = NULL;
        for (Py_ssize_t r = 0; r < nregions; r++) {
            if (!regions[r].done && (next == NULL || regions[r].size < next->size)) {
                next = &regions[r];
            }
        }
        if (next == NULL) {
            break;
        }
        next->done = 1;
        uint64_t start = next->start, size = next->size;
        if (size == 0 || start < base || start - base > ram_size ||
            size > ram_size - (start - base)) {
            continue; /* the reference reads it from another bank, or not at all */
        }
        const uint8_t *data = bytes + (start - base);
        for (uint64_t at = (8 - (start & 7)) & 7; at + 8 <= size && left > 0; at += 8) {
            uint64_t word;
            memcpy(&word, data + at, 8);
            if (word < pending[0].ptr || word > pending[nlive - 1].ptr) {
                continue;
            }
            reach(pending, nlive, word, scan_limit, regions, &nregions, &left);
        }
    }
    result = Py_NewRef(left == 0 ? Py_True : Py_False);
done:
    PyMem_Free(pending);
    PyMem_Free(regions);
    Py_XDECREF(values);
    Py_XDECREF(roots);
    Py_XDECREF(live);
    PyBuffer_Release(&ram);
    return result;
}
