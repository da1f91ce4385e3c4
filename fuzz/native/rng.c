/*
 * A pseudo-random generator that is cheap to seed, for the ELF mutator.
 *
 * The mutator draws a fresh generator for every call libFuzzer makes (the
 * call is then a function of its input, size limit and seed).  Seeding
 * Python's Mersenne Twister fills 624 words of state, ~4 us a call, about a
 * third of a whole mutation; this generator is xoshiro256** (Blackman and
 * Vigna, "Scrambled linear pseudorandom number generators", 2018) with its
 * four words of state expanded from the seed by SplitMix64, as its authors
 * recommend.  It is not for anything that needs unpredictability.
 *
 * Generator(seed) -> an object with random() and getrandbits(k), the two
 * primitives random.Random builds every other draw from.  `seed` is any
 * non-negative int; each of its 64-bit words, low first, is folded into the
 * SplitMix64 state.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject_HEAD
    uint64_t s[4];
} Generator;

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t next(Generator *g)
{
    uint64_t *s = g->s;
    const uint64_t result = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

static int Generator_init(Generator *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"seed", NULL};
    PyObject *seed;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!:Generator", kwlist, &PyLong_Type,
                                     &seed)) {
        return -1;
    }
    if (_PyLong_Sign(seed) < 0) {
        PyErr_SetString(PyExc_ValueError, "the seed must not be negative");
        return -1;
    }
    uint64_t mix = 0;
    PyObject *rest = Py_NewRef(seed);
    PyObject *shift = PyLong_FromLong(64);
    if (shift == NULL) {
        Py_DECREF(rest);
        return -1;
    }
    /* one word at a time, low first; a seed below 2**64 is one word */
    do {
        uint64_t word = PyLong_AsUnsignedLongLongMask(rest);
        if (word == (uint64_t)-1 && PyErr_Occurred()) {
            goto fail;
        }
        mix ^= word;
        splitmix64(&mix);
        PyObject *higher = PyNumber_Rshift(rest, shift);
        if (higher == NULL) {
            goto fail;
        }
        Py_SETREF(rest, higher);
    } while (PyObject_IsTrue(rest));
    Py_DECREF(rest);
    Py_DECREF(shift);
    for (int i = 0; i < 4; i++) {
        self->s[i] = splitmix64(&mix);
    }
    return 0;
fail:
    Py_DECREF(rest);
    Py_DECREF(shift);
    return -1;
}

static PyObject *Generator_random(Generator *self, PyObject *Py_UNUSED(ignored))
{
    /* the top 53 bits, as a double in [0, 1) */
    return PyFloat_FromDouble((double)(next(self) >> 11) * 0x1.0p-53);
}

static PyObject *Generator_getrandbits(Generator *self, PyObject *arg)
{
    Py_ssize_t k = PyLong_AsSsize_t(arg);
    if (k == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (k < 0) {
        PyErr_SetString(PyExc_ValueError, "number of bits must be non-negative");
        return NULL;
    }
    if (k == 0) {
        return PyLong_FromLong(0);
    }
    if (k <= 64) {
        return PyLong_FromUnsignedLongLong(next(self) >> (64 - k));
    }
    Py_ssize_t words = (k + 63) / 64;
    uint64_t *buf = PyMem_Malloc((size_t)words * 8);
    if (buf == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < words; i++) {
        buf[i] = next(self);
    }
    if (k % 64) {
        buf[words - 1] >>= 64 - k % 64;
    }
    /* words are little-endian on the hosts this builds for (x86-64, aarch64) */
    PyObject *out = _PyLong_FromByteArray((const unsigned char *)buf, (size_t)words * 8, 1, 0);
    PyMem_Free(buf);
    return out;
}

static PyMethodDef Generator_methods[] = {
    {"random", (PyCFunction)Generator_random, METH_NOARGS,
     "random() -> float\n\nThe next number in [0, 1), with 53 random bits."},
    {"getrandbits", (PyCFunction)Generator_getrandbits, METH_O,
     "getrandbits(k) -> int\n\nA non-negative int with k random bits."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject GeneratorType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fuzz._rng.Generator",
    .tp_basicsize = sizeof(Generator),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("Generator(seed): xoshiro256** seeded by SplitMix64 from a "
                        "non-negative int"),
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Generator_init,
    .tp_methods = Generator_methods,
};

static struct PyModuleDef rng_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fuzz._rng",
    .m_doc = "A pseudo-random generator that is cheap to seed, for the ELF mutator.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__rng(void)
{
    if (PyType_Ready(&GeneratorType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&rng_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&GeneratorType);
    if (PyModule_AddObject(m, "Generator", (PyObject *)&GeneratorType) < 0) {
        Py_DECREF(&GeneratorType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
