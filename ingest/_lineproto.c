/* Tokenizer for plain InfluxDB line protocol: the compiled half of ingest/decode.py's fast path.
 *
 * tokenize(texts: list[str] | list[bytes]) -> (heads, known, new, names, codes, widths, lines, values, stamps) | None
 * tokenize_line(text: str) -> (head, names, values, stamp) | None
 * forget_heads() -> None: empties the table of heads
 *
 * For texts (a delivery's messages) of lines ``measurement[,tags] name=value[,name=value...] timestamp`` where
 *   - every text (a str, or bytes as received) is ASCII with no control character but "\n" (so
 *     nothing escaped, quoted or commented: no '\\', '"' or '#'), empty lines skipped, and holds
 *     at least one line;
 *   - every line has exactly three sections separated by single spaces;
 *   - every line of a text holds the same field names in the same order, none twice;
 *   - every value is a plain decimal float ([+-]digits[.digits][e[+-]digits]) that is finite;
 *   - every timestamp is 1-19 ASCII digits below 2**63,
 * tokenize returns
 *   heads:  bytearray, int64 in native order, one per line: the code of its head (measurement and
 *           tag set, as written) in the module's table of heads, which keeps every head it is
 *           given until forget_heads() (a fleet's heads recur in every delivery: no str per line);
 *   known:  int, the heads the table held before this call (0 after forget_heads());
 *   new:    list[str], the heads this call added, in code order (codes known, known + 1, ...);
 *   names:  list[str], the distinct field names, first seen first;
 *   codes:  bytearray, int64 in native order, one per value: its name's index in ``names``;
 *   widths: bytearray, int64, one per text: the fields of each of its lines;
 *   lines:  bytearray, int64, one per text: its lines;
 *   values: bytearray, float64 in native order, every value, text by text and line by line;
 *   stamps: bytearray, int64 in native order, one per line (as written, unit not applied).
 * tokenize_line takes text of one line (empty lines aside) and returns its head (str), names
 * (list[str]), values (list[float]) and stamp (int): a sensor's own report, without arrays.
 * Anything else returns None, and the Python tokenizer (which accepts more: underscores in
 * numbers, lines of differing fields) decides. Values are correctly rounded, as float() rounds
 * them (see plain_float), so both tokenizers give bit-identical values.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../portpulse/_hash.h"

typedef struct {
    const char *start;
    Py_ssize_t len;
} Span;

/* Bytes that keep a text off the fast path: control characters other than '\n', non-ASCII,
 * and what line protocol escapes, quotes or comments with. */
static unsigned char not_plain[256];

static void init_tables(void) {
    for (int c = 0; c < 256; c++) {
        not_plain[c] = (c < 0x20 && c != '\n') || c >= 0x7f || c == '\\' || c == '"' || c == '#';
    }
}

static int is_digit(char c) { return c >= '0' && c <= '9'; }

static const double powers_of_ten[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                       1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                       1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* s[0:n] as a double when it is a plain decimal [+-]?(D+(.D*)?|.D+)([eE][+-]?D+)?. Returns 0 when
 * it is not. Otherwise sets *out and returns 1: through Clinger's fast path when the digits make
 * an integer below 2**53 and the decimal exponent is within +-22 (both factors are then exact
 * doubles, so one IEEE multiplication or division rounds correctly), else through
 * PyOS_string_to_double (float()'s own conversion; it returns +-inf on overflow). */
static int plain_float(const char *s, Py_ssize_t n, double *out) {
    Py_ssize_t k = 0, digits = 0, significant = 0;
    int negative = 0, exponent = 0, scale = 0;
    uint64_t mantissa = 0;
    if (k < n && (s[k] == '+' || s[k] == '-')) negative = s[k++] == '-';
    for (int fraction = 0; fraction < 2; fraction++) {
        while (k < n && is_digit(s[k])) {
            digits++;
            if (mantissa != 0 || s[k] != '0') {
                if (++significant <= 19) mantissa = mantissa * 10 + (uint64_t)(s[k] - '0');
            }
            scale -= fraction && significant <= 19;
            scale += !fraction && significant > 19;
            k++;
        }
        if (fraction == 0) {
            if (k < n && s[k] == '.') {
                k++;
            } else {
                break;
            }
        }
    }
    if (digits == 0) return 0;
    if (k < n && (s[k] == 'e' || s[k] == 'E')) {
        k++;
        int exponent_negative = 0;
        Py_ssize_t exponent_digits = 0;
        if (k < n && (s[k] == '+' || s[k] == '-')) exponent_negative = s[k++] == '-';
        while (k < n && is_digit(s[k])) {
            if (exponent < 100000) exponent = exponent * 10 + (s[k] - '0');
            exponent_digits++;
            k++;
        }
        if (exponent_digits == 0) return 0;
        if (exponent_negative) exponent = -exponent;
    }
    if (k != n) return 0;
    int power = scale + exponent;
    if (significant <= 19 && mantissa <= (1ULL << 53) && power >= -22 && power <= 22) {
        double value = (double)mantissa;
        value = power < 0 ? value / powers_of_ten[-power] : value * powers_of_ten[power];
        *out = negative ? -value : value;
        return 1;
    }
    char *end = NULL;
    double value = PyOS_string_to_double(s, &end, NULL);
    if ((value == -1.0 && PyErr_Occurred()) || end != s + n) {
        PyErr_Clear();
        return 0;
    }
    *out = value;
    return 1;
}

typedef struct {
    double *values;
    int64_t *stamps;
    Span *heads;
    Span *names;         /* the current text's first line's field names */
    Py_ssize_t n_values, n_lines, width;
    Py_ssize_t first_line; /* the current text's first line */
    Py_ssize_t max_names;
} Tokens;

static void free_tokens(Tokens *t) {
    free(t->values);
    free(t->stamps);
    free(t->heads);
    free(t->names);
}

/* One line s[0:n] (no '\n'). Returns 1 when it is plain and matches its text's first line's names. */
static int take_line(const char *s, Py_ssize_t n, Tokens *t) {
    const char *first_space = memchr(s, ' ', (size_t)n);
    if (first_space == NULL || first_space == s) return 0;
    Py_ssize_t fields_at = first_space - s + 1;
    const char *second_space = memchr(s + fields_at, ' ', (size_t)(n - fields_at));
    if (second_space == NULL) return 0;
    Py_ssize_t stamp_at = second_space - s + 1;
    Py_ssize_t fields_end = stamp_at - 1;
    if (fields_end == fields_at) return 0;

    /* timestamp: 1-19 digits, below 2**63 */
    Py_ssize_t stamp_len = n - stamp_at;
    if (stamp_len < 1 || stamp_len > 19) return 0;
    uint64_t stamp = 0;
    for (Py_ssize_t k = stamp_at; k < n; k++) {
        if (!is_digit(s[k])) return 0; /* also a third space */
        stamp = stamp * 10 + (uint64_t)(s[k] - '0');
    }
    if (stamp > (uint64_t)INT64_MAX) return 0;

    /* fields: name=value separated by ',' */
    int first = t->n_lines == t->first_line;
    Py_ssize_t field = 0, k = fields_at;
    while (k < fields_end) {
        Py_ssize_t name_at = k;
        if (!first) {
            /* the name this line must have here: compared whole, not scanned for */
            if (field >= t->width) return 0;
            Py_ssize_t len = t->names[field].len;
            if (len > fields_end - k - 1 || s[k + len] != '=' || memcmp(t->names[field].start, s + k, (size_t)len) != 0)
                return 0;
            k += len;
        } else {
            while (k < fields_end && s[k] != '=' && s[k] != ',') k++;
            if (k == fields_end || s[k] != '=' || k == name_at) return 0;
            if (field >= t->max_names) return 0;
            t->names[field].start = s + name_at;
            t->names[field].len = k - name_at;
        }
        Py_ssize_t value_at = ++k;
        while (k < fields_end && s[k] != ',' && s[k] != '=') k++;
        if (k < fields_end && s[k] == '=') return 0;
        Py_ssize_t value_len = k - value_at;
        double value;
        if (value_len == 0 || !plain_float(s + value_at, value_len, &value) || !isfinite(value)) return 0;
        t->values[t->n_values++] = value;
        field++;
        if (k < fields_end) {
            k++; /* the ',' */
            if (k == fields_end) return 0; /* a trailing ',' */
        }
    }
    if (first) {
        t->width = field;
    } else if (field != t->width) {
        return 0;
    }
    t->heads[t->n_lines].start = s;
    t->heads[t->n_lines].len = first_space - s;
    t->stamps[t->n_lines] = (int64_t)stamp;
    t->n_lines++;
    return 1;
}

static PyObject *spans_to_list(const Span *spans, Py_ssize_t n) {
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyUnicode_DecodeASCII(spans[k].start, spans[k].len, NULL);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, item);
    }
    return list;
}

/* The text of ``arg`` when it is an ASCII str with no byte off the plain path, adding its newlines
 * and '=' to the counts; NULL when not (with an exception set when ``arg`` is not a str). */
static const char *plain_text(PyObject *arg, Py_ssize_t *size, Py_ssize_t *newlines, Py_ssize_t *equals) {
    const char *text;
    if (PyBytes_Check(arg)) { /* a payload as received: plain text is ASCII, so it reads the same */
        text = PyBytes_AS_STRING(arg);
        *size = PyBytes_GET_SIZE(arg);
    } else if (PyUnicode_Check(arg)) {
        if (!PyUnicode_IS_ASCII(arg)) return NULL;
        text = (const char *)PyUnicode_1BYTE_DATA(arg);
        *size = PyUnicode_GET_LENGTH(arg);
    } else {
        PyErr_SetString(PyExc_TypeError, "expected a str or bytes");
        return NULL;
    }
    /* no early exit: a branch-free pass the compiler can unroll */
    unsigned char bad = 0;
    Py_ssize_t lines = 0, fields = 0;
    for (Py_ssize_t k = 0; k < *size; k++) {
        unsigned char c = (unsigned char)text[k];
        bad |= not_plain[c];
        lines += c == '\n';
        fields += c == '=';
    }
    *newlines += lines;
    *equals += fields;
    return bad ? NULL : text;
}

static int alloc_tokens(Tokens *t, Py_ssize_t lines, Py_ssize_t equals) {
    t->values = malloc(sizeof(double) * (size_t)(equals + 1));
    t->stamps = malloc(sizeof(int64_t) * (size_t)(lines + 1));
    t->heads = malloc(sizeof(Span) * (size_t)(lines + 1));
    t->names = malloc(sizeof(Span) * (size_t)(equals + 1));
    t->max_names = equals + 1;
    if (!t->values || !t->stamps || !t->heads || !t->names) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Cuts text[0:size] into ``t`` as a new text. Returns 1 when every line is plain and uniform and
 * there is one at least, else 0. */
static int cut(const char *text, Py_ssize_t size, Tokens *t) {
    t->first_line = t->n_lines;
    t->width = 0;
    Py_ssize_t at = 0;
    while (at < size) {
        const char *newline = memchr(text + at, '\n', (size_t)(size - at));
        Py_ssize_t end = newline ? newline - text : size;
        if (end > at && !take_line(text + at, end - at, t)) return 0;
        at = end + 1;
    }
    return t->n_lines > t->first_line;
}

/* The index of s[0:n] among the distinct names (added when new); -1 when the table is full. */
static Py_ssize_t name_code(Span *distinct, Py_ssize_t *n_distinct, Py_ssize_t capacity, const char *s, Py_ssize_t n) {
    for (Py_ssize_t d = 0; d < *n_distinct; d++) {
        if (distinct[d].len == n && memcmp(distinct[d].start, s, (size_t)n) == 0) return d;
    }
    if (*n_distinct == capacity) return -1;
    distinct[*n_distinct].start = s;
    distinct[*n_distinct].len = n;
    return (*n_distinct)++;
}

#define MAX_DISTINCT_NAMES 256

/* The table of heads: their bytes one after the other in ``arena``, an entry per head (its code
 * is its index), and open addressing over the entries (-1: an empty slot), at most half full. */
typedef struct {
    size_t start;
    Py_ssize_t len;
    uint64_t hash;
} Head;

static struct {
    char *arena;
    size_t used, capacity;
    Head *heads;
    Py_ssize_t n, max;
    int64_t *slots;
    size_t n_slots;
    uint64_t seed;
} table;

static void forget(void) {
    free(table.arena);
    free(table.heads);
    free(table.slots);
    uint64_t seed = table.seed;
    memset(&table, 0, sizeof(table));
    table.seed = seed;
}

static int grow_slots(size_t n_slots) {
    int64_t *slots = malloc(sizeof(int64_t) * n_slots);
    if (slots == NULL) return -1;
    memset(slots, 0xff, sizeof(int64_t) * n_slots);
    for (Py_ssize_t code = 0; code < table.n; code++) {
        size_t at = table.heads[code].hash & (n_slots - 1);
        while (slots[at] >= 0) at = (at + 1) & (n_slots - 1);
        slots[at] = code;
    }
    free(table.slots);
    table.slots = slots;
    table.n_slots = n_slots;
    return 0;
}

/* The code of head s[0:n], added to the table when new; -1 when out of memory. */
static int64_t head_code(const char *s, Py_ssize_t n) {
    uint64_t hash = hash_bytes((const unsigned char *)s, n, table.seed);
    size_t mask = table.n_slots - 1, at = hash & mask;
    for (; table.n_slots && table.slots[at] >= 0; at = (at + 1) & mask) {
        const Head *h = &table.heads[table.slots[at]];
        if (h->hash == hash && h->len == n && memcmp(table.arena + h->start, s, (size_t)n) == 0)
            return table.slots[at];
    }
    if (table.used + (size_t)n > table.capacity) {
        size_t capacity = table.capacity ? table.capacity : 1 << 16;
        while (table.used + (size_t)n > capacity) capacity *= 2;
        char *arena = realloc(table.arena, capacity);
        if (arena == NULL) return -1;
        table.arena = arena;
        table.capacity = capacity;
    }
    if (table.n == table.max) {
        Py_ssize_t max = table.max ? table.max * 2 : 1024;
        Head *heads = realloc(table.heads, sizeof(Head) * (size_t)max);
        if (heads == NULL) return -1;
        table.heads = heads;
        table.max = max;
    }
    memcpy(table.arena + table.used, s, (size_t)n);
    table.heads[table.n] = (Head){table.used, n, hash};
    table.used += (size_t)n;
    int64_t code = table.n++;
    if ((size_t)table.n * 2 > table.n_slots) return grow_slots(table.n_slots ? table.n_slots * 2 : 2048) < 0 ? -1 : code;
    table.slots[at] = code;
    return code;
}

/* Each line's head code into ``codes``; the heads added, as str in code order. On failure the
 * table is emptied (the caller knows it by ``known`` of its next call). */
static PyObject *intern_heads(const Tokens *t, int64_t *codes, Py_ssize_t known) {
    for (Py_ssize_t k = 0; k < t->n_lines; k++) {
        codes[k] = head_code(t->heads[k].start, t->heads[k].len);
        if (codes[k] < 0) {
            forget();
            return PyErr_NoMemory();
        }
    }
    PyObject *added = PyList_New(table.n - known);
    for (Py_ssize_t code = known; added && code < table.n; code++) {
        PyObject *head = PyUnicode_DecodeASCII(table.arena + table.heads[code].start, table.heads[code].len, NULL);
        if (head == NULL) {
            Py_CLEAR(added);
            break;
        }
        PyList_SET_ITEM(added, code - known, head);
    }
    if (added == NULL) forget();
    return added;
}

static PyObject *tokenize(PyObject *module, PyObject *arg) {
    (void)module;
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "expected a list of str or bytes");
        return NULL;
    }
    Py_ssize_t n_texts = PyList_GET_SIZE(arg), newlines = 0, equals = 0;
    if (n_texts == 0) Py_RETURN_NONE;
    const char **texts = malloc(sizeof(char *) * (size_t)n_texts);
    Py_ssize_t *sizes = malloc(sizeof(Py_ssize_t) * (size_t)n_texts);
    int64_t *widths = malloc(sizeof(int64_t) * (size_t)n_texts);
    int64_t *lines = malloc(sizeof(int64_t) * (size_t)n_texts);
    Tokens t = {0};
    int64_t *codes = NULL, *head_codes = NULL;
    Span distinct[MAX_DISTINCT_NAMES];
    Py_ssize_t n_distinct = 0;
    PyObject *result = NULL;
    if (!texts || !sizes || !widths || !lines) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_texts; i++) {
        texts[i] = plain_text(PyList_GET_ITEM(arg, i), &sizes[i], &newlines, &equals);
        if (texts[i] == NULL) {
            if (!PyErr_Occurred()) result = Py_NewRef(Py_None);
            goto done;
        }
    }
    if (alloc_tokens(&t, newlines + n_texts, equals) < 0) goto done;
    codes = malloc(sizeof(int64_t) * (size_t)(equals + 1));
    if (codes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_texts; i++) {
        Py_ssize_t values_before = t.n_values;
        if (!cut(texts[i], sizes[i], &t)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        int64_t text_codes[MAX_DISTINCT_NAMES];
        if (t.width > MAX_DISTINCT_NAMES) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        for (Py_ssize_t f = 0; f < t.width; f++) {
            Py_ssize_t code = name_code(distinct, &n_distinct, MAX_DISTINCT_NAMES, t.names[f].start, t.names[f].len);
            int repeated = 0;
            for (Py_ssize_t g = 0; g < f; g++) repeated |= text_codes[g] == code;
            if (code < 0 || repeated) { /* too many names, or a field twice in a line */
                result = Py_NewRef(Py_None);
                goto done;
            }
            text_codes[f] = code;
        }
        for (Py_ssize_t v = values_before; v < t.n_values; v += t.width) {
            memcpy(codes + v, text_codes, sizeof(int64_t) * (size_t)t.width);
        }
        widths[i] = t.width;
        lines[i] = t.n_lines - t.first_line;
    }
    head_codes = malloc(sizeof(int64_t) * (size_t)(t.n_lines + 1));
    if (head_codes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t known = table.n;
    PyObject *added = intern_heads(&t, head_codes, known);
    PyObject *heads = added ? PyByteArray_FromStringAndSize((const char *)head_codes, t.n_lines * 8) : NULL;
    PyObject *names = heads ? spans_to_list(distinct, n_distinct) : NULL;
    PyObject *code_bytes = names ? PyByteArray_FromStringAndSize((const char *)codes, t.n_values * 8) : NULL;
    PyObject *width_bytes = code_bytes ? PyByteArray_FromStringAndSize((const char *)widths, n_texts * 8) : NULL;
    PyObject *line_bytes = width_bytes ? PyByteArray_FromStringAndSize((const char *)lines, n_texts * 8) : NULL;
    PyObject *values = line_bytes ? PyByteArray_FromStringAndSize((const char *)t.values, t.n_values * 8) : NULL;
    PyObject *stamps = values ? PyByteArray_FromStringAndSize((const char *)t.stamps, t.n_lines * 8) : NULL;
    if (stamps == NULL) {
        if (added != NULL) forget(); /* heads the caller will never learn */
        Py_XDECREF(added);
        Py_XDECREF(heads);
        Py_XDECREF(names);
        Py_XDECREF(code_bytes);
        Py_XDECREF(width_bytes);
        Py_XDECREF(line_bytes);
        Py_XDECREF(values);
        goto done;
    }
    result = Py_BuildValue("(NnNNNNNNN)", heads, known, added, names, code_bytes, width_bytes, line_bytes, values, stamps);
done:
    free(head_codes);
    free(texts);
    free(sizes);
    free(widths);
    free(lines);
    free(codes);
    free_tokens(&t);
    return result;
}

static PyObject *tokenize_line(PyObject *module, PyObject *arg) {
    (void)module;
    Py_ssize_t size = 0, newlines = 0, equals = 0;
    const char *text = plain_text(arg, &size, &newlines, &equals);
    if (text == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    Tokens t = {0};
    if (alloc_tokens(&t, newlines + 1, equals) < 0) {
        free_tokens(&t);
        return NULL;
    }
    if (!cut(text, size, &t) || t.n_lines != 1) {
        free_tokens(&t);
        Py_RETURN_NONE;
    }
    PyObject *head = PyUnicode_DecodeASCII(t.heads[0].start, t.heads[0].len, NULL);
    PyObject *names = head ? spans_to_list(t.names, t.width) : NULL;
    PyObject *values = names ? PyList_New(t.n_values) : NULL;
    for (Py_ssize_t k = 0; values && k < t.n_values; k++) {
        PyObject *value = PyFloat_FromDouble(t.values[k]);
        if (value == NULL) {
            Py_CLEAR(values);
            break;
        }
        PyList_SET_ITEM(values, k, value);
    }
    PyObject *stamp = values ? PyLong_FromLongLong(t.stamps[0]) : NULL;
    free_tokens(&t);
    if (stamp == NULL) {
        Py_XDECREF(head);
        Py_XDECREF(names);
        Py_XDECREF(values);
        return NULL;
    }
    return Py_BuildValue("(NNNN)", head, names, values, stamp);
}

static PyObject *forget_heads(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    forget();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"tokenize", tokenize, METH_O,
     "tokenize(texts) -> (heads, known, new, names, codes, widths, lines, values, stamps) or None: plain line "
     "protocol, each text of uniform lines."},
    {"forget_heads", forget_heads, METH_NOARGS, "forget_heads() -> None: empties the table of heads."},
    {"tokenize_line", tokenize_line, METH_O,
     "tokenize_line(text) -> (head, names, values, stamp) or None: one plain line, as Python objects."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lineproto", "Compiled tokenizer for plain InfluxDB line protocol.", -1, methods,
};

PyMODINIT_FUNC PyInit__lineproto(void) {
    init_tables();
    /* Drawn at import: crafted heads cannot count on colliding (the hash is no cryptographic one). */
    table.seed = ((uint64_t)(uintptr_t)&table * 0x9E3779B97F4A7C15ull) ^ (uint64_t)time(NULL);
    return PyModule_Create(&module);
}
