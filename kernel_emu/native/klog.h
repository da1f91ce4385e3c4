/* What the lines of a run's console say, natively: kernel_emu.klog._line_says (the
 * reference) for every line of a text at once. Included by walk.c.
 *
 * log_lines(text) -> [what] | None
 *   text  the console as decoded
 *   What each line that says something says, in order, as the reference gives it:
 *   (0, vaddr, memsz, filesz, offset, flags) a segment-table row, (1, count) the table's
 *   count, (2, entry), (3, reason) a rejection, (4, message, "file:line" or None) a panic,
 *   (5, (base, top)) the kernel stack, (6, (rip, rsp, cr3)) the entry into ring 3.
 *   None for a text this cannot read exactly as the reference does: one with a character
 *   outside ASCII or another line break than "\n" (str.splitlines knows more), or with a
 *   number the reference reads as 2**64 or more.
 *
 * Within such a text the reference's patterns come down to these: \d is [0-9], and \s (and
 * what str.strip strips) is a space, a tab or \x1f, the only whitespace a line of it can
 * hold.
 */

#define LOG_SEG 0
#define LOG_COUNT 1
#define LOG_ENTRY 2
#define LOG_REJECTED 3
#define LOG_PANIC 4
#define LOG_KSTACK 5
#define LOG_USER 6

typedef struct {
    const char *p, *end;
    int wide; /* a number past what the reference reads as the value here */
} Cursor;

static int log_space(char c)
{
    return c == ' ' || c == '\t' || c == '\x1f';
}

static int log_hex_digit(char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* Consume the literal `lit`; 0 (nothing consumed) when the text does not go on with it. */
static int take(Cursor *c, const char *lit)
{
    size_t n = strlen(lit);
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, lit, n) != 0) {
        return 0;
    }
    c->p += n;
    return 1;
}

/* 0x followed by hex digits, greedily, as (0x[0-9a-fA-F]+) and int(_, 16) read it. */
static int take_hex(Cursor *c, uint64_t *value)
{
    if (!take(c, "0x") || c->p == c->end || !log_hex_digit(*c->p)) {
        return 0;
    }
    uint64_t v = 0;
    int digits = 0;
    while (c->p < c->end && log_hex_digit(*c->p)) {
        char ch = *c->p++;
        int d = ch <= '9' ? ch - '0' : (ch | 0x20) - 'a' + 10;
        if (digits || d) {
            digits++;
        }
        if (digits > 16) {
            c->wide = 1;
        }
        v = v << 4 | (uint64_t)d;
    }
    *value = v;
    return 1;
}

/* (\d+), greedily, as int(_) reads it. */
static int take_decimal(Cursor *c, uint64_t *value)
{
    const char *start = c->p;
    uint64_t v = 0;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
        uint64_t d = (uint64_t)(*c->p++ - '0');
        if (v > (UINT64_MAX - d) / 10) {
            c->wide = 1;
        }
        v = v * 10 + d;
    }
    *value = v;
    return c->p > start;
}

/* \s*$ */
static int at_blank_end(const char *p, const char *end)
{
    while (p < end && log_space(*p)) {
        p++;
    }
    return p == end;
}

static PyObject *hex_pair_or_triple(const uint64_t *v, int n)
{
    return n == 2 ? Py_BuildValue("(KK)", (unsigned long long)v[0], (unsigned long long)v[1])
                  : Py_BuildValue("(KKK)", (unsigned long long)v[0], (unsigned long long)v[1],
                                  (unsigned long long)v[2]);
}

/* The panic line's body (after "[PANIC] "): `^(.*?)(?: at ([^\s:]+):(\d+))?\s*$`, the
 * shortest message after which the rest is a location and blanks, or blanks alone (the
 * location tried first at each length, as the optional group is). */
static PyObject *panic_says(const char *body, const char *end)
{
    for (const char *p = body; p <= end; p++) {
        const char *q = p;
        if (end - q > 4 && memcmp(q, " at ", 4) == 0) {
            const char *file = q + 4, *f = file;
            while (f < end && !log_space(*f) && *f != ':') {
                f++;
            }
            if (f > file && f < end && *f == ':') {
                const char *num = f + 1, *d = num;
                while (d < end && *d >= '0' && *d <= '9') {
                    d++;
                }
                if (d > num && at_blank_end(d, end)) {
                    /* "file:line": the text from the file name to the line's last digit */
                    PyObject *where = PyUnicode_FromStringAndSize(file, d - file);
                    if (where == NULL) {
                        return NULL;
                    }
                    return Py_BuildValue("(is#N)", LOG_PANIC, body, (Py_ssize_t)(p - body),
                                         where);
                }
            }
        }
        if (at_blank_end(p, end)) {
            return Py_BuildValue("(is#O)", LOG_PANIC, body, (Py_ssize_t)(p - body), Py_None);
        }
    }
    return NULL; /* unreachable: the end itself is blank */
}

/* What the line [p, end) says: a new tuple, Py_None (borrowed) when nothing, NULL on an
 * error; *wide when it says something with a number past what this reads exactly. */
static PyObject *line_says(const char *p, const char *end, int *wide)
{
    Cursor c = {p, end, 0};
    PyObject *out = Py_None;
    uint64_t v[5], ignored;
    if (take(&c, "[elf] seg ")) {
        /* the row's index is not read as a number: any length will do */
        int index = take_decimal(&c, &ignored);
        c.wide = 0;
        if (index && take(&c, " vaddr=") && take_hex(&c, &v[0]) &&
            take(&c, " memsz=") && take_hex(&c, &v[1]) && take(&c, " filesz=") &&
            take_hex(&c, &v[2]) && take(&c, " offset=") && take_hex(&c, &v[3]) &&
            take(&c, " flags=") && take_hex(&c, &v[4]) && at_blank_end(c.p, end)) {
            out = Py_BuildValue("(iKKKKK)", LOG_SEG, (unsigned long long)v[0],
                                (unsigned long long)v[1], (unsigned long long)v[2],
                                (unsigned long long)v[3], (unsigned long long)v[4]);
        }
    } else if (take(&c, "[elf] segments count=")) {
        if (take_decimal(&c, &v[0]) && at_blank_end(c.p, end)) {
            out = Py_BuildValue("(iK)", LOG_COUNT, (unsigned long long)v[0]);
        }
    } else if (take(&c, "[elf] entry=")) {
        if (take_hex(&c, &v[0]) && at_blank_end(c.p, end)) {
            out = Py_BuildValue("(iK)", LOG_ENTRY, (unsigned long long)v[0]);
        }
    } else if (take(&c, "rejected: ")) {
        const char *a = c.p, *b = end;
        while (a < b && log_space(*a)) {
            a++;
        }
        while (b > a && log_space(b[-1])) {
            b--;
        }
        out = Py_BuildValue("(is#)", LOG_REJECTED, a, (Py_ssize_t)(b - a));
    } else if (take(&c, "[PANIC] ")) {
        out = panic_says(c.p, end);
    } else if (take(&c, "[mm] kstack base=")) {
        if (take_hex(&c, &v[0]) && take(&c, " top=") && take_hex(&c, &v[1])) {
            PyObject *pair = hex_pair_or_triple(v, 2);
            out = pair == NULL ? NULL : Py_BuildValue("(iN)", LOG_KSTACK, pair);
        }
    } else if (take(&c, "[user] enter rip=")) {
        if (take_hex(&c, &v[0]) && take(&c, " rsp=") && take_hex(&c, &v[1]) &&
            take(&c, " cr3=") && take_hex(&c, &v[2])) {
            PyObject *triple = hex_pair_or_triple(v, 3);
            out = triple == NULL ? NULL : Py_BuildValue("(iN)", LOG_USER, triple);
        }
    }
    /* a number too wide matters only to a line that says something */
    *wide = c.wide && out != Py_None;
    return out;
}

static PyObject *log_lines(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "log_lines() takes a str");
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(arg)) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyUnicode_GET_LENGTH(arg);
    const char *text = (const char *)PyUnicode_1BYTE_DATA(arg);
    for (Py_ssize_t i = 0; i < n; i++) {
        char ch = text[i];
        /* every line break of str.splitlines within ASCII, but "\n" */
        if (ch == '\r' || ch == '\x0b' || ch == '\x0c' || (ch >= '\x1c' && ch <= '\x1e')) {
            Py_RETURN_NONE;
        }
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        return NULL;
    }
    const char *p = text, *end = text + n;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        if (eol == NULL) {
            eol = end;
        }
        int wide = 0;
        PyObject *what = line_says(p, eol, &wide);
        if (what == NULL || wide) {
            if (what != Py_None) {
                Py_XDECREF(what);
            }
            Py_DECREF(out);
            if (what == NULL) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        if (what != Py_None) {
            int failed = PyList_Append(out, what);
            Py_DECREF(what);
            if (failed < 0) {
                Py_DECREF(out);
                return NULL;
            }
        }
        p = eol + 1;
    }
    return out;
}
