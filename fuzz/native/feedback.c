/*
 * Guest feedback for libFuzzer, with no Python on the per-block or
 * per-compare path.
 *
 * - Edge coverage: the tracer keeps a 64 KiB AFL-style hit-count map per
 *   run.  `collect` copies it into a counter array that lives as long as the
 *   process and is registered once with libFuzzer as inline 8-bit counters
 *   (the tracer's own map moves when a full boot builds a new machine, so it
 *   cannot be registered itself).  It also folds the map into a union of
 *   every edge seen so far, so the harness can show an edge count.
 * - Compares: a Unicorn UC_HOOK_TCG_OPCODE hook on SUB with the CMP flag
 *   hands both operands of every guest `cmp` to libFuzzer's
 *   __sanitizer_cov_trace_cmp4/8, whose addresses the harness looks up in
 *   the libFuzzer module Atheris loaded.  With no addresses set the hook
 *   only counts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAP_SIZE 65536

typedef void (*trace_cmp8_fn)(uint64_t, uint64_t);
typedef void (*trace_cmp4_fn)(uint32_t, uint32_t);

/* What the compare hook touches; separate from the Python object so its
 * address can be handed to Unicorn as the hook's user data. */
typedef struct {
    trace_cmp8_fn cmp8;
    trace_cmp4_fn cmp4;
    uint64_t compares;
} HookState;

typedef struct {
    PyObject_HEAD
    HookState hook;
    uint64_t edges;
    uint8_t *counters; /* registered with libFuzzer: never freed or moved */
    uint8_t seen[MAP_SIZE];
    /* the 8-byte words of `counters` the last collect wrote, which the next one clears:
     * a run touches a few hundred of the 8,192 */
    uint16_t written[MAP_SIZE / 8];
    uint32_t nwritten;
} Feedback;

/* Signature of uc_hook_tcg_op_2 in unicorn.h; `size` is the operand width
 * in bits. */
static void cmp_hook(void *uc, uint64_t address, uint64_t arg1, uint64_t arg2,
                     uint32_t size, void *user_data)
{
    HookState *h = (HookState *)user_data;
    (void)uc;
    (void)address;
    h->compares++;
    if (size <= 32) {
        if (h->cmp4 != NULL) {
            h->cmp4((uint32_t)arg1, (uint32_t)arg2);
        }
    } else if (h->cmp8 != NULL) {
        h->cmp8(arg1, arg2);
    }
}

static int Feedback_init(Feedback *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"cmp8", "cmp4", NULL};
    unsigned long long cmp8 = 0, cmp4 = 0;

    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|$KK", kwlist, &cmp8, &cmp4)) {
        return -1;
    }
    if (self->counters == NULL) {
        /* Deliberately leaked with the process: libFuzzer keeps reading the
         * array after this object could have been collected. */
        self->counters = PyMem_RawCalloc(MAP_SIZE, 1);
        if (self->counters == NULL) {
            PyErr_NoMemory();
            return -1;
        }
    }
    self->hook.cmp8 = (trace_cmp8_fn)(uintptr_t)cmp8;
    self->hook.cmp4 = (trace_cmp4_fn)(uintptr_t)cmp4;
    return 0;
}

static PyObject *Feedback_route(Feedback *self, PyObject *args)
{
    unsigned long long cmp8, cmp4;

    if (!PyArg_ParseTuple(args, "KK", &cmp8, &cmp4)) {
        return NULL;
    }
    self->hook.cmp8 = (trace_cmp8_fn)(uintptr_t)cmp8;
    self->hook.cmp4 = (trace_cmp4_fn)(uintptr_t)cmp4;
    Py_RETURN_NONE;
}

/* 8 bytes from anywhere (the map's buffer need not be aligned) */
static inline uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* One 64-byte line of a run's map (at byte `line`): its non-zero words into the counters,
 * and how many of its edges are new. */
static uint64_t collect_line(Feedback *self, const uint8_t *map, size_t line)
{
    const uint8_t *p = map + line;
    uint64_t fresh = 0;
    if ((load64(p) | load64(p + 8) | load64(p + 16) | load64(p + 24) | load64(p + 32) |
         load64(p + 40) | load64(p + 48) | load64(p + 56)) == 0) {
        return 0;
    }
    for (size_t i = line; i < line + 64; i += 8) {
        uint64_t hit, seen;
        memcpy(&hit, map + i, 8);
        if (hit == 0) {
            continue;
        }
        memcpy(self->counters + i, &hit, 8);
        self->written[self->nwritten++] = (uint16_t)(i / 8);
        /* without a branch per byte (edges hash to scattered bytes, where a branch
         * mispredicts): 1 in each byte that is not zero, less the bytes seen before,
         * summed by a multiply (eight bytes of 0 or 1 add up to at most 8) */
        hit |= hit >> 4;
        hit |= hit >> 2;
        hit |= hit >> 1;
        hit &= 0x0101010101010101ULL;
        memcpy(&seen, self->seen + i, 8);
        fresh += ((hit & ~seen) * 0x0101010101010101ULL) >> 56;
        seen |= hit;
        memcpy(self->seen + i, &seen, 8);
    }
    return fresh;
}

static PyObject *Feedback_collect(Feedback *self, PyObject *args)
{
    PyObject *arg, *lines_arg = Py_None;
    Py_buffer view, lines = {0};
    const uint8_t *map;
    uint64_t fresh = 0;

    if (!PyArg_ParseTuple(args, "O|O", &arg, &lines_arg)) {
        return NULL;
    }
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (view.len != MAP_SIZE) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "coverage map must be %d bytes, not %zd",
                     MAP_SIZE, view.len);
        return NULL;
    }
    if (lines_arg != Py_None) {
        if (PyObject_GetBuffer(lines_arg, &lines, PyBUF_SIMPLE) < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
        if (lines.len != MAP_SIZE / 64 / 8) {
            PyErr_Format(PyExc_ValueError, "the lines bitmap must be %d bytes, not %zd",
                         MAP_SIZE / 64 / 8, lines.len);
            PyBuffer_Release(&lines);
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    map = (const uint8_t *)view.buf;
    /* The counters become the map: the words the last map wrote are cleared, this map's
     * non-zero words written (libFuzzer clears the counters before each run itself, but
     * collect must not depend on being called by it). */
    for (uint32_t k = 0; k < self->nwritten; k++) {
        memset(self->counters + (size_t)self->written[k] * 8, 0, 8);
    }
    self->nwritten = 0;
    if (lines.buf != NULL) {
        /* only the lines the tracer says a run touched: every other byte is zero */
        const uint8_t *bits = (const uint8_t *)lines.buf;
        for (size_t k = 0; k < (size_t)lines.len; k++) {
            for (unsigned b = bits[k]; b != 0; b &= b - 1) {
                fresh += collect_line(self, map, (k * 8 + (size_t)__builtin_ctz(b)) * 64);
            }
        }
        PyBuffer_Release(&lines);
    } else {
        /* Almost every word of a run's map is zero: a line of 64 bytes is tested at once,
         * and only a line with a hit is gone through word by word. */
        for (size_t line = 0; line < MAP_SIZE; line += 64) {
            fresh += collect_line(self, map, line);
        }
    }
    PyBuffer_Release(&view);
    self->edges += fresh;
    return PyLong_FromUnsignedLongLong(fresh);
}

static PyObject *Feedback_get_edges(Feedback *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->edges);
}

static PyObject *Feedback_get_compares(Feedback *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->hook.compares);
}

static PyObject *Feedback_get_counters_address(Feedback *self, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr(self->counters);
}

static PyObject *Feedback_get_hook_state(Feedback *self, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr(&self->hook);
}

static PyMethodDef Feedback_methods[] = {
    {"route", (PyCFunction)Feedback_route, METH_VARARGS,
     "route(cmp8, cmp4) -> None\n\nSend compares to these __sanitizer_cov_trace_cmp8/4 "
     "addresses (0: only count them)."},
    {"collect", (PyCFunction)Feedback_collect, METH_VARARGS,
     "collect(coverage_map, lines=None) -> int\n\nCopy one run's 64 KiB hit-count map into "
     "the libFuzzer counters and return how many edges were never seen before. `lines`: a "
     "bitmap of the map's 64-byte lines (bit i of byte i // 8: line i) outside which every "
     "counter is zero (the tracer's coverage_lines); None: any line may have hits."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Feedback_getset[] = {
    {"edges", (getter)Feedback_get_edges, NULL, "distinct edges seen so far", NULL},
    {"compares", (getter)Feedback_get_compares, NULL, "guest compares reported so far", NULL},
    {"counters_address", (getter)Feedback_get_counters_address, NULL,
     "address of the 64 KiB counter array to register with libFuzzer", NULL},
    {"hook_state", (getter)Feedback_get_hook_state, NULL,
     "user-data address for the compare hook", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject FeedbackType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fuzz._feedback.Feedback",
    .tp_basicsize = sizeof(Feedback),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("Feedback(*, cmp8=0, cmp4=0): guest coverage and compares for "
                        "libFuzzer"),
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Feedback_init,
    .tp_methods = Feedback_methods,
    .tp_getset = Feedback_getset,
};

static struct PyModuleDef feedback_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fuzz._feedback",
    .m_doc = "Native guest-coverage and compare feedback for libFuzzer.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__feedback(void)
{
    PyObject *m;

    if (PyType_Ready(&FeedbackType) < 0) {
        return NULL;
    }
    m = PyModule_Create(&feedback_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&FeedbackType);
    if (PyModule_AddObject(m, "Feedback", (PyObject *)&FeedbackType) < 0 ||
        PyModule_AddIntConstant(m, "MAP_SIZE", MAP_SIZE) < 0 ||
        PyModule_AddObject(m, "CMP_HOOK", PyLong_FromVoidPtr((void *)cmp_hook)) < 0) {
        Py_DECREF(&FeedbackType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
