/* Tokenizer for plain InfluxDB line protocol: the compiled half of ingest/decode.py's fast path.
 *
 * tokenize(text: str) -> (heads, names, values, stamps) | None
 * tokenize_line(text: str) -> (head, names, values, stamp) | None
 *
 * For text of lines ``measurement[,tags] name=value[,name=value...] timestamp`` where
 *   - the text is ASCII with no control character but "\n" (so nothing escaped, quoted or
 *     commented: no '\\', '"' or '#'), empty lines skipped;
 *   - every line has exactly three sections separated by single spaces;
 *   - every line holds the same field names in the same order;
 *   - every value is a plain decimal float ([+-]digits[.digits][e[+-]digits]) that is finite;
 *   - every timestamp is 1-19 ASCII digits below 2**63,
 * it returns
 *   heads:  list[str], one per line (measurement and tag set, as written);
 *   names:  list[str], the field names of a line;
 *   values: bytearray, float64 in native order, len(heads) * len(names) of them, line by line;
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

typedef struct {
    Py_ssize_t start, len;
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
    Span *names; /* the first line's field names */
    Py_ssize_t n_values, n_lines, width;
} Tokens;

static void free_tokens(Tokens *t) {
    free(t->values);
    free(t->stamps);
    free(t->heads);
    free(t->names);
}

/* One line s[0:n] (no '\n'). Returns 1 when it is plain and matches the first line's names. */
static int take_line(const char *text, Py_ssize_t at, Py_ssize_t n, Tokens *t, Py_ssize_t max_names) {
    const char *s = text + at;
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
    Py_ssize_t field = 0, k = fields_at;
    while (k < fields_end) {
        Py_ssize_t name_at = k;
        while (k < fields_end && s[k] != '=' && s[k] != ',') k++;
        if (k == fields_end || s[k] != '=' || k == name_at) return 0;
        Py_ssize_t name_len = k - name_at;
        Py_ssize_t value_at = ++k;
        while (k < fields_end && s[k] != ',' && s[k] != '=') k++;
        if (k < fields_end && s[k] == '=') return 0;
        Py_ssize_t value_len = k - value_at;
        double value;
        if (value_len == 0 || !plain_float(s + value_at, value_len, &value) || !isfinite(value)) return 0;
        if (t->n_lines == 0) {
            if (field >= max_names) return 0;
            t->names[field].start = at + name_at;
            t->names[field].len = name_len;
        } else if (field >= t->width || t->names[field].len != name_len ||
                   memcmp(text + t->names[field].start, s + name_at, (size_t)name_len) != 0) {
            return 0;
        }
        t->values[t->n_values++] = value;
        field++;
        if (k < fields_end) {
            k++; /* the ',' */
            if (k == fields_end) return 0; /* a trailing ',' */
        }
    }
    if (t->n_lines == 0) {
        t->width = field;
    } else if (field != t->width) {
        return 0;
    }
    t->heads[t->n_lines].start = at;
    t->heads[t->n_lines].len = first_space - s;
    t->stamps[t->n_lines] = (int64_t)stamp;
    t->n_lines++;
    return 1;
}

static PyObject *spans_to_list(const char *text, const Span *spans, Py_ssize_t n) {
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *item = PyUnicode_DecodeASCII(text + spans[k].start, spans[k].len, NULL);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, item);
    }
    return list;
}

/* Cuts ``arg`` into ``t`` (freed by the caller). Returns 1 when every line is plain and uniform,
 * 0 when not (or when it holds no line), -1 with an exception set. */
static int cut(PyObject *arg, const char **text_out, Tokens *t) {
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "expected a str");
        return -1;
    }
    if (!PyUnicode_IS_ASCII(arg)) return 0;
    const char *text = (const char *)PyUnicode_1BYTE_DATA(arg);
    Py_ssize_t size = PyUnicode_GET_LENGTH(arg);
    *text_out = text;

    Py_ssize_t newlines = 0, equals = 0;
    for (Py_ssize_t k = 0; k < size; k++) {
        unsigned char c = (unsigned char)text[k];
        if (not_plain[c]) return 0;
        newlines += c == '\n';
        equals += c == '=';
    }
    t->values = malloc(sizeof(double) * (size_t)(equals + 1));
    t->stamps = malloc(sizeof(int64_t) * (size_t)(newlines + 1));
    t->heads = malloc(sizeof(Span) * (size_t)(newlines + 1));
    t->names = malloc(sizeof(Span) * (size_t)(equals + 1));
    if (!t->values || !t->stamps || !t->heads || !t->names) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t at = 0;
    while (at < size) {
        const char *newline = memchr(text + at, '\n', (size_t)(size - at));
        Py_ssize_t end = newline ? newline - text : size;
        if (end > at && !take_line(text, at, end - at, t, equals + 1)) return 0;
        at = end + 1;
    }
    return t->n_lines > 0;
}

static PyObject *tokenize(PyObject *module, PyObject *arg) {
    (void)module;
    const char *text = NULL;
    Tokens t = {0};
    int found = cut(arg, &text, &t);
    if (found <= 0) {
        free_tokens(&t);
        if (found < 0) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *heads = spans_to_list(text, t.heads, t.n_lines);
    PyObject *names = heads ? spans_to_list(text, t.names, t.width) : NULL;
    PyObject *values = names ? PyByteArray_FromStringAndSize((const char *)t.values, t.n_values * 8) : NULL;
    PyObject *stamps = values ? PyByteArray_FromStringAndSize((const char *)t.stamps, t.n_lines * 8) : NULL;
    free_tokens(&t);
    if (stamps == NULL) {
        Py_XDECREF(heads);
        Py_XDECREF(names);
        Py_XDECREF(values);
        return NULL;
    }
    return Py_BuildValue("(NNNN)", heads, names, values, stamps);
}

static PyObject *tokenize_line(PyObject *module, PyObject *arg) {
    (void)module;
    const char *text = NULL;
    Tokens t = {0};
    int found = cut(arg, &text, &t);
    if (found <= 0 || t.n_lines != 1) {
        free_tokens(&t);
        if (found < 0) return NULL;
        Py_RETURN_NONE;
    }
    PyObject *head = PyUnicode_DecodeASCII(text + t.heads[0].start, t.heads[0].len, NULL);
    PyObject *names = head ? spans_to_list(text, t.names, t.width) : NULL;
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

static PyMethodDef methods[] = {
    {"tokenize", tokenize, METH_O,
     "tokenize(text) -> (heads, names, values, stamps) or None: plain line protocol of uniform lines."},
    {"tokenize_line", tokenize_line, METH_O,
     "tokenize_line(text) -> (head, names, values, stamp) or None: one plain line, as Python objects."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_lineproto", "Compiled tokenizer for plain InfluxDB line protocol.", -1, methods,
};

PyMODINIT_FUNC PyInit__lineproto(void) {
    init_tables();
    return PyModule_Create(&module);
}
