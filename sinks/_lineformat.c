/* The compiled half of sinks/lineprotocol.py's encode_lines: lines of float and string fields
 * written in one pass, instead of byte matrices per piece assembled and masked by numpy.
 *
 * encode(keys, key_ends, series, ts, accepted, names, columns) -> (body, line_ends)
 *
 *   keys:      bytes, every distinct series key ("measurement,tag=value...", escaped) joined;
 *   key_ends:  int64 buffer (k,), where key j ends in ``keys`` (it starts where j - 1 ends);
 *   series:    int64 buffer (n,), each row's key;
 *   ts:        int64 buffer (n,), each row's timestamp, precision already applied;
 *   accepted:  uint8 buffer (n,), the rows to write (each with at least one finite field);
 *   names:     tuple of bytes, each field's escaped key followed by "=", in line order;
 *   columns:   tuple, one item per name: a float64 buffer (n,), where NaN and +-inf leave the field
 *              out; or a string column as a pair (codes, texts): an int64 buffer (n,) indexing the
 *              tuple ``texts`` of bytes (each already quoted and escaped), -1 leaving the field out.
 *
 * Returns the body (one line per accepted row, in row order, each ending in "\n") and a bytearray
 * of int64 offsets just past each line's newline. A value is written exactly: with the fewest
 * decimals (at most 6) whose integer arithmetic gives it back (as recorded by the numpy encoder:
 * rint(v * 10^k) / 10^k == v, |v| < 2^53 / 10^6); else, from 1e-3 to 2^52, correctly rounded to 17
 * significant digits (put_significant); else as repr() writes it (PyOS_double_to_string, shortest
 * round trip). Raises ValueError for ragged columns or a key or text index out of range.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../portpulse/_column.h"

#define MAX_FIELDS 64
#define MAX_DECIMALS 6
/* Longest text of one value: repr of a double is at most 24 characters ("-2.2250738585072014e-308"). */
#define VALUE_ROOM 32

static const double scales[MAX_DECIMALS + 1] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6};
static const int64_t powers[MAX_DECIMALS + 1] = {1, 10, 100, 1000, 10000, 100000, 1000000};
static const uint64_t tens[20] = {1ULL, 10ULL, 100ULL, 1000ULL, 10000ULL, 100000ULL, 1000000ULL, 10000000ULL,
                                  100000000ULL, 1000000000ULL, 10000000000ULL, 100000000000ULL,
                                  1000000000000ULL, 10000000000000ULL, 100000000000000ULL,
                                  1000000000000000ULL, 10000000000000000ULL, 100000000000000000ULL,
                                  1000000000000000000ULL, 10000000000000000000ULL};
/* |v| below this: v * 10^6 is below 2^53, so the scaled integer is exact. */
static const double small_limit = 9007199254740992.0 / 1e6;

/* x / 10 by the multiply-and-shift a compiler emits for speed, written out: in blocks it deems
 * cold a compiler may emit a hardware divide instead (tens of cycles per digit). */
static inline uint64_t tenth(uint64_t x) { return (uint64_t)(((unsigned __int128)x * 0xCCCCCCCCCCCCCCCDULL) >> 67); }

/* The decimal digits of x at out, returning the end. */
static char *put_unsigned(char *out, uint64_t x) {
    char digits[20];
    int n = 0;
    do {
        uint64_t q = tenth(x);
        digits[n++] = (char)('0' + (x - q * 10));
        x = q;
    } while (x);
    while (n) *out++ = digits[--n];
    return out;
}

static char *put_int64(char *out, int64_t x) {
    if (x < 0) {
        *out++ = '-';
        return put_unsigned(out, (uint64_t)0 - (uint64_t)x);
    }
    return put_unsigned(out, (uint64_t)x);
}

/* Finite v with 1e-3 <= |v| < 2^52 written at out with 17 or 18 significant digits,
 * correctly rounded (so it reads back as v), trailing zeros dropped; returns the end. Returns NULL
 * for any other v. v = M * 2^-s exactly (M < 2^53), so v * 10^k = M * 10^k / 2^s is computed
 * exactly in 128 bits and rounded half to even once. */
static char *put_significant(char *out, double v) {
    double a = fabs(v);
    if (!(a >= 1e-3 && a < 4503599627370496.0)) return NULL;
    int e;
    double f = frexp(a, &e); /* a = f * 2^e, f in [0.5, 1) */
    uint64_t mantissa = (uint64_t)ldexp(f, 53);
    int shift = 53 - e; /* 0..62 in this range; 0 is an integer of 53 bits, which repr writes */
    if (shift < 1) return NULL;
    int k = 16 - (int)floor(log10(a));
    for (int attempt = 0; attempt < 2; attempt++, k++) {
        if (k < 0 || k > 19) return NULL;
        unsigned __int128 scaled = (unsigned __int128)mantissa * tens[k];
        unsigned __int128 whole = scaled >> shift, rest = scaled - (whole << shift);
        unsigned __int128 half = (unsigned __int128)1 << (shift - 1);
        if (rest > half || (rest == half && (whole & 1))) whole++;
        if (whole < (unsigned __int128)tens[16]) continue; /* log10 rounded up (just below 10^p): one place more */
        if (v < 0) *out++ = '-';
        uint64_t n = (uint64_t)whole, unit = tens[k];
        out = put_unsigned(out, n / unit);
        uint64_t fraction = n % unit;
        int digits = k;
        while (digits && fraction - tenth(fraction) * 10 == 0) {
            fraction = tenth(fraction);
            digits--;
        }
        if (digits) {
            *out++ = '.';
            for (int d = digits - 1; d >= 0; d--) {
                uint64_t q = tenth(fraction);
                out[d] = (char)('0' + (fraction - q * 10));
                fraction = q;
            }
            out += digits;
        }
        return out;
    }
    return NULL;
}

/* Finite v written exactly at out; returns the end, or NULL with MemoryError set. */
static char *put_float(char *out, double v) {
    if (fabs(v) < small_limit) {
        for (int k = 0; k <= MAX_DECIMALS; k++) {
            double m = nearbyint(v * scales[k]);
            if (m / scales[k] != v) continue;
            int64_t whole = (int64_t)fabs(m);
            if (m < 0 || (m == 0 && signbit(v))) *out++ = '-';
            out = put_unsigned(out, (uint64_t)(whole / powers[k]));
            if (k) {
                *out++ = '.';
                uint64_t fraction = (uint64_t)(whole % powers[k]);
                for (int d = k - 1; d >= 0; d--) {
                    uint64_t q = tenth(fraction);
                    out[d] = (char)('0' + (fraction - q * 10));
                    fraction = q;
                }
                out += k;
            }
            return out;
        }
    }
    char *end = put_significant(out, v);
    if (end != NULL) return end;
    char *text = PyOS_double_to_string(v, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) return NULL;
    size_t len = strlen(text);
    memcpy(out, text, len);
    PyMem_Free(text);
    return out + len;
}

/* What one field writes: its name (with "="), and its float column or its codes and texts. */
#define SHORT_NAME 16
typedef struct {
    const char *name;
    Py_ssize_t name_len;
    char short_name[SHORT_NAME]; /* the name zero-padded, when it fits: copied as one fixed block */
    const double *values;
    const int64_t *codes;
    PyObject *texts; /* NULL: a float column */
} FieldOut;

static PyObject *encode(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *keys_obj, *key_ends_obj, *series_obj, *ts_obj, *accepted_obj, *names, *columns_obj;
    if (!PyArg_ParseTuple(args, "OOOOOO!O!", &keys_obj, &key_ends_obj, &series_obj, &ts_obj, &accepted_obj,
                          &PyTuple_Type, &names, &PyTuple_Type, &columns_obj))
        return NULL;
    Py_ssize_t fields = PyTuple_GET_SIZE(names);
    if (fields != PyTuple_GET_SIZE(columns_obj) || fields < 1 || fields > MAX_FIELDS) {
        PyErr_Format(PyExc_ValueError, "%zd field names and %zd columns (1 to %d)", fields,
                     PyTuple_GET_SIZE(columns_obj), MAX_FIELDS);
        return NULL;
    }
    Column keys = {0}, key_ends = {0}, series = {0}, ts = {0}, accepted = {0}, columns[MAX_FIELDS];
    memset(columns, 0, sizeof columns);
    PyObject *texts[MAX_FIELDS] = {NULL}; /* a string column's texts; NULL: a float column */
    PyObject *body = NULL, *ends = NULL, *result = NULL;
    Py_ssize_t k = -1, n = -1, any = -1;
    if (take(keys_obj, &keys, 1, &any, 0, "keys") < 0 || take(key_ends_obj, &key_ends, 8, &k, 0, "key_ends") < 0 ||
        take(series_obj, &series, 8, &n, 0, "series") < 0 || take(ts_obj, &ts, 8, &n, 0, "ts") < 0 ||
        take(accepted_obj, &accepted, 1, &n, 0, "accepted") < 0)
        goto done;
    for (Py_ssize_t f = 0; f < fields; f++) {
        if (!PyBytes_Check(PyTuple_GET_ITEM(names, f))) {
            PyErr_SetString(PyExc_TypeError, "field names must be bytes");
            goto done;
        }
        PyObject *column = PyTuple_GET_ITEM(columns_obj, f);
        if (PyTuple_Check(column)) {
            if (PyTuple_GET_SIZE(column) != 2 || !PyTuple_Check(PyTuple_GET_ITEM(column, 1))) {
                PyErr_SetString(PyExc_TypeError, "a string column is a pair (codes, tuple of bytes)");
                goto done;
            }
            texts[f] = PyTuple_GET_ITEM(column, 1);
            for (Py_ssize_t t = 0; t < PyTuple_GET_SIZE(texts[f]); t++) {
                if (!PyBytes_Check(PyTuple_GET_ITEM(texts[f], t))) {
                    PyErr_SetString(PyExc_TypeError, "string field texts must be bytes");
                    goto done;
                }
            }
            column = PyTuple_GET_ITEM(column, 0);
        }
        if (take(column, &columns[f], 8, &n, 0, "field column") < 0) goto done;
    }
    const char *key_text = keys.view.buf;
    const int64_t *key_end = key_ends.view.buf, *row_series = series.view.buf, *row_ts = ts.view.buf;
    const unsigned char *row_accepted = accepted.view.buf;
    FieldOut field_out[MAX_FIELDS];
    Py_ssize_t names_room = 0;
    for (Py_ssize_t f = 0; f < fields; f++) {
        PyObject *name = PyTuple_GET_ITEM(names, f);
        field_out[f] = (FieldOut){.name = PyBytes_AS_STRING(name), .name_len = PyBytes_GET_SIZE(name),
                                  .values = columns[f].view.buf, .codes = columns[f].view.buf, .texts = texts[f]};
        memset(field_out[f].short_name, 0, SHORT_NAME);
        if (field_out[f].name_len <= SHORT_NAME)
            memcpy(field_out[f].short_name, field_out[f].name, (size_t)field_out[f].name_len);
        Py_ssize_t value_room = VALUE_ROOM;
        if (texts[f] != NULL) {
            value_room = 0;
            Py_ssize_t count = PyTuple_GET_SIZE(texts[f]);
            for (Py_ssize_t t = 0; t < count; t++) {
                Py_ssize_t len = PyBytes_GET_SIZE(PyTuple_GET_ITEM(texts[f], t));
                value_room = len > value_room ? len : value_room;
            }
            for (Py_ssize_t i = 0; i < n; i++) {
                if (field_out[f].codes[i] < -1 || field_out[f].codes[i] >= count) {
                    PyErr_Format(PyExc_ValueError, "row %zd: text %lld outside the %zd texts", i,
                                 (long long)field_out[f].codes[i], count);
                    goto done;
                }
            }
        }
        names_room += PyBytes_GET_SIZE(PyTuple_GET_ITEM(names, f)) + 1 + value_room;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        if (key_end[j] < (j ? key_end[j - 1] : 0) || key_end[j] > keys.view.len) {
            PyErr_SetString(PyExc_ValueError, "key_ends must rise within keys");
            goto done;
        }
    }
    /* Room for every accepted line at its longest; the body is cut to what was written. */
    Py_ssize_t room = 0, lines = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!row_accepted[i]) continue;
        int64_t s = row_series[i];
        if (s < 0 || s >= k) {
            PyErr_Format(PyExc_ValueError, "row %zd: series %lld outside the %zd keys", i, (long long)s, k);
            goto done;
        }
        room += key_end[s] - (s ? key_end[s - 1] : 0) + names_room + 1 + 24 + 1; /* the time as 24 bytes (see below) */
        lines++;
    }
    body = PyBytes_FromStringAndSize(NULL, room);
    ends = PyByteArray_FromStringAndSize(NULL, lines * 8);
    if (body == NULL || ends == NULL) goto done;
    char *start = PyBytes_AS_STRING(body), *out = start;
    int64_t *line_end = (int64_t *)PyByteArray_AS_STRING(ends);
    char last_text[24]; /* the text of the last timestamp written, last_len characters */
    int64_t last_ts = 0;
    int last_len = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!row_accepted[i]) continue;
        int64_t s = row_series[i];
        Py_ssize_t key_start = s ? key_end[s - 1] : 0;
        memcpy(out, key_text + key_start, (size_t)(key_end[s] - key_start));
        out += key_end[s] - key_start;
        char separator = ' ';
        for (Py_ssize_t f = 0; f < fields; f++) {
            const FieldOut *field = &field_out[f];
            const char *text;
            Py_ssize_t text_len;
            double v = 0;
            if (field->texts != NULL) {
                int64_t code = field->codes[i];
                if (code < 0) continue;
                PyObject *item = PyTuple_GET_ITEM(field->texts, code);
                text = PyBytes_AS_STRING(item);
                text_len = PyBytes_GET_SIZE(item);
            } else {
                v = field->values[i];
                if (!isfinite(v)) continue;
                text = NULL;
                text_len = 0;
            }
            *out++ = separator;
            separator = ',';
            /* A short name as 16 bytes: what follows it is overwritten next, and every line has
             * room to spare at its end (its time and newline). */
            if (field->name_len <= SHORT_NAME)
                memcpy(out, field->short_name, SHORT_NAME);
            else
                memcpy(out, field->name, (size_t)field->name_len);
            out += field->name_len;
            if (text != NULL) {
                memcpy(out, text, (size_t)text_len);
                out += text_len;
                continue;
            }
            out = put_float(out, v);
            if (out == NULL) goto done;
        }
        *out++ = ' ';
        if (row_ts[i] != last_ts || last_len == 0) { /* lines of a batch mostly share their time */
            last_ts = row_ts[i];
            last_len = (int)(put_int64(last_text, last_ts) - last_text);
        }
        memcpy(out, last_text, sizeof last_text); /* fixed size: inlined; the room allows it */
        out += last_len;
        *out++ = '\n';
        *line_end++ = out - start;
    }
    if (_PyBytes_Resize(&body, out - start) < 0) goto done;
    result = PyTuple_Pack(2, body, ends);
done:
    Py_XDECREF(body);
    Py_XDECREF(ends);
    Column *held[] = {&keys, &key_ends, &series, &ts, &accepted};
    for (size_t c = 0; c < sizeof held / sizeof held[0]; c++)
        if (held[c]->held) PyBuffer_Release(&held[c]->view);
    for (Py_ssize_t f = 0; f < fields; f++)
        if (columns[f].held) PyBuffer_Release(&columns[f].view);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, "Lines of float and string fields (see the module comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lineformat", NULL, -1, methods};

PyMODINIT_FUNC PyInit__lineformat(void) { return PyModule_Create(&module); }
