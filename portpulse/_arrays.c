/* The compiled halves of portpulse/arrays.py's factorise, distinct_codes and pair_lines.
 *
 * factorise(items) -> (bytearray, list)
 *
 *   items: a list of hashable objects (a batch's sensor ids, sites, domains, metric names).
 *   Returns int64 codes (n,) and the distinct items (the first object of each), in order of first
 *   appearance: what arrays.factorise computes with a dict.
 *
 * A batch names few distinct objects many times over (a report's sensor, site and domain on each
 * of its metrics; the same metric name objects in every report), so each item is first looked up
 * by identity in a small direct-mapped table and only a miss costs a dict lookup (which compares
 * by equality: equal items that are different objects still share a code).
 *
 * distinct_codes(key) -> (bytearray, bytearray)
 *
 *   key: int64 (n,). Returns the row of each distinct value's first occurrence (int64 (g,)) and
 *   every row's code (int64 (n,), an index into those rows), distinct values in order of first
 *   appearance: one pass through a table indexed by value where the values span at most a few
 *   times n (codes combined from factorised columns), else through an open-addressing hash table.
 *
 * pair_lines(point, ts) -> None | (bytearray, bytearray)
 *
 *   point, ts: int64 (n,). Rows sharing a (point, ts) pair are one line: returns each row's line
 *   (int64 (n,)) and the first row of every line (int64 (k,)), lines in (point, ts) order, what
 *   arrays.pair_lines computes with two stable sorts. One counting sort by point (points are slot
 *   numbers, a dense range), then each point's rows stably ordered by ts: a few rows each, in
 *   place. None, having kept nothing, when the points span more than a few times n.
 *
 * key_slots_put(slot_key, slot_row, keys, first_row) -> None
 *
 *   slot_key, slot_row: int64 (s,), writable, s a power of two: an open-addressing hash table of
 *   keys and their rows (row -1: an empty slot). keys: int64 (m,), distinct and not in the table;
 *   key i goes in with row first_row + i. ValueError, having changed nothing, when s is not a power
 *   of two, the table would be more than half full, or a key is there already.
 *
 * key_slots_find(slot_key, slot_row, keys) -> bytearray
 *
 *   Each key's row in that table (int64 (m,)), -1 where it is absent.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_column.h"

#define CACHE_SLOTS 256
#define MORE_POINTS_THAN_ROWS 4 /* a value range up to this many times n (plus a little) is tabled */
#define SMALL_RUN 32            /* a point's rows up to this many are ordered by insertion */

static PyObject *factorise(PyObject *module, PyObject *items) {
    (void)module;
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "items must be a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(items);
    PyObject *codes = PyByteArray_FromStringAndSize(NULL, n * 8);
    PyObject *table = PyDict_New(), *distinct = PyList_New(0), *result = NULL;
    if (codes == NULL || table == NULL || distinct == NULL) goto done;
    int64_t *code = (int64_t *)PyByteArray_AS_STRING(codes);
    /* The list holds every item for the whole call, so an address names one object throughout. */
    PyObject *seen[CACHE_SLOTS] = {0};
    int64_t seen_code[CACHE_SLOTS];
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(items, i);
        size_t slot = ((uintptr_t)item >> 4 ^ (uintptr_t)item >> 12) & (CACHE_SLOTS - 1);
        if (seen[slot] == item) {
            code[i] = seen_code[slot];
            continue;
        }
        PyObject *known = PyDict_GetItemWithError(table, item); /* borrowed */
        int64_t c;
        if (known != NULL) {
            c = PyLong_AsLongLong(known);
        } else {
            if (PyErr_Occurred()) goto done; /* unhashable */
            c = PyList_GET_SIZE(distinct);
            PyObject *number = PyLong_FromLongLong(c);
            if (number == NULL) goto done;
            int failed = PyDict_SetItem(table, item, number) < 0 || PyList_Append(distinct, item) < 0;
            Py_DECREF(number);
            if (failed) goto done;
        }
        seen[slot] = item;
        seen_code[slot] = c;
        code[i] = c;
    }
    result = PyTuple_Pack(2, codes, distinct);
done:
    Py_XDECREF(codes);
    Py_XDECREF(table);
    Py_XDECREF(distinct);
    return result;
}

/* A 64-bit mix (splitmix64's finaliser): keys are often small consecutive integers. */
static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    return x ^ (x >> 31);
}

static PyObject *distinct_codes(PyObject *module, PyObject *key_obj) {
    (void)module;
    Column key = {0};
    PyObject *first_obj = NULL, *codes_obj = NULL, *result = NULL;
    int64_t *slot = NULL, *slot_key = NULL;
    Py_ssize_t n = -1;
    if (take(key_obj, &key, 8, &n, 0, "key") < 0) goto done;
    const int64_t *k = key.view.buf;
    first_obj = PyByteArray_FromStringAndSize(NULL, n * 8);
    codes_obj = PyByteArray_FromStringAndSize(NULL, n * 8);
    if (first_obj == NULL || codes_obj == NULL) goto done;
    int64_t *first = (int64_t *)PyByteArray_AS_STRING(first_obj), *code = (int64_t *)PyByteArray_AS_STRING(codes_obj);
    Py_ssize_t g = 0;
    int64_t lo = n ? k[0] : 0, hi = lo;
    for (Py_ssize_t i = 1; i < n; i++) {
        lo = k[i] < lo ? k[i] : lo;
        hi = k[i] > hi ? k[i] : hi;
    }
    if (n && (uint64_t)hi - (uint64_t)lo < (uint64_t)(MORE_POINTS_THAN_ROWS * n + 4096)) {
        /* slot[value - lo]: the value's code, -1 until it is seen */
        Py_ssize_t span = (Py_ssize_t)(hi - lo) + 1;
        slot = PyMem_Malloc((size_t)span * sizeof(int64_t));
        if (slot == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        memset(slot, 0xff, (size_t)span * sizeof(int64_t));
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t *c = &slot[k[i] - lo];
            if (*c < 0) {
                *c = g;
                first[g++] = i;
            }
            code[i] = *c;
        }
    } else if (n) {
        Py_ssize_t size = 16;
        while (size < 2 * n) size *= 2;
        slot = PyMem_Malloc((size_t)size * sizeof(int64_t)); /* a code, or -1 for an empty slot */
        slot_key = PyMem_Malloc((size_t)size * sizeof(int64_t));
        if (slot == NULL || slot_key == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        memset(slot, 0xff, (size_t)size * sizeof(int64_t));
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_ssize_t at = (Py_ssize_t)(mix64((uint64_t)k[i]) & (uint64_t)(size - 1));
            while (slot[at] >= 0 && slot_key[at] != k[i]) at = (at + 1) & (size - 1);
            if (slot[at] < 0) {
                slot[at] = g;
                slot_key[at] = k[i];
                first[g++] = i;
            }
            code[i] = slot[at];
        }
    }
    if (PyByteArray_Resize(first_obj, g * 8) < 0) goto done;
    result = PyTuple_Pack(2, first_obj, codes_obj);
done:
    PyMem_Free(slot);
    PyMem_Free(slot_key);
    Py_XDECREF(first_obj);
    Py_XDECREF(codes_obj);
    if (key.held) PyBuffer_Release(&key.view);
    return result;
}

/* Orders row[0..m) by ts[row], stably: insertion for a few rows, else a merge sort through tmp. */
static void order_by_ts(int64_t *row, int64_t *tmp, Py_ssize_t m, const int64_t *ts) {
    if (m <= SMALL_RUN) {
        for (Py_ssize_t i = 1; i < m; i++) {
            int64_t r = row[i], t = ts[r];
            Py_ssize_t j = i;
            for (; j > 0 && ts[row[j - 1]] > t; j--) row[j] = row[j - 1];
            row[j] = r;
        }
        return;
    }
    Py_ssize_t half = m / 2;
    order_by_ts(row, tmp, half, ts);
    order_by_ts(row + half, tmp, m - half, ts);
    if (ts[row[half - 1]] <= ts[row[half]]) return; /* already in order: rows come in runs */
    memcpy(tmp, row, (size_t)half * sizeof(int64_t));
    Py_ssize_t a = 0, b = half, k = 0;
    while (a < half && b < m) row[k++] = ts[row[b]] < ts[tmp[a]] ? row[b++] : tmp[a++];
    while (a < half) row[k++] = tmp[a++];
}

static PyObject *pair_lines(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *point_obj, *ts_obj;
    if (!PyArg_ParseTuple(args, "OO", &point_obj, &ts_obj)) return NULL;
    Column point = {0}, ts = {0};
    PyObject *lines_obj = NULL, *first_obj = NULL, *result = NULL;
    int64_t *start = NULL, *order = NULL, *tmp = NULL;
    Py_ssize_t n = -1;
    if (take(point_obj, &point, 8, &n, 0, "point") < 0 || take(ts_obj, &ts, 8, &n, 0, "ts") < 0) goto done;
    const int64_t *p = point.view.buf, *t = ts.view.buf;
    if (n == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    int64_t lo = p[0], hi = p[0];
    for (Py_ssize_t i = 1; i < n; i++) {
        lo = p[i] < lo ? p[i] : lo;
        hi = p[i] > hi ? p[i] : hi;
    }
    if ((uint64_t)hi - (uint64_t)lo >= (uint64_t)(MORE_POINTS_THAN_ROWS * n + 4096)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t span = (Py_ssize_t)(hi - lo) + 1;
    start = PyMem_Calloc((size_t)span + 1, sizeof(int64_t));
    order = PyMem_Malloc((size_t)n * sizeof(int64_t));
    tmp = PyMem_Malloc((size_t)(n / 2 + 1) * sizeof(int64_t));
    lines_obj = PyByteArray_FromStringAndSize(NULL, n * 8);
    first_obj = PyByteArray_FromStringAndSize(NULL, n * 8);
    if (start == NULL || order == NULL || tmp == NULL || lines_obj == NULL || first_obj == NULL) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) start[p[i] - lo + 1]++;
    for (Py_ssize_t s = 0; s < span; s++) start[s + 1] += start[s];
    for (Py_ssize_t i = 0; i < n; i++) order[start[p[i] - lo]++] = i; /* start[s] now ends point s */
    int64_t *line = (int64_t *)PyByteArray_AS_STRING(lines_obj), *first = (int64_t *)PyByteArray_AS_STRING(first_obj);
    Py_ssize_t k = 0, from = 0;
    for (Py_ssize_t s = 0; s < span; s++) {
        Py_ssize_t to = start[s];
        if (to == from) continue;
        order_by_ts(order + from, tmp, to - from, t);
        for (Py_ssize_t i = from; i < to; i++) {
            int64_t r = order[i];
            if (i == from || t[r] != t[order[i - 1]]) first[k++] = r;
            line[r] = k - 1;
        }
        from = to;
    }
    if (PyByteArray_Resize(first_obj, k * 8) < 0) goto done;
    result = PyTuple_Pack(2, lines_obj, first_obj);
done:
    PyMem_Free(start);
    PyMem_Free(order);
    PyMem_Free(tmp);
    Py_XDECREF(lines_obj);
    Py_XDECREF(first_obj);
    if (point.held) PyBuffer_Release(&point.view);
    if (ts.held) PyBuffer_Release(&ts.view);
    return result;
}

/* The slot of key in a table of size slots (a power of two): its own, or the empty one that ends
 * its probe sequence. The table is at most half full, so the probe ends. */
static inline Py_ssize_t key_slot(const int64_t *slot_key, const int64_t *slot_row, Py_ssize_t size, int64_t key) {
    Py_ssize_t at = (Py_ssize_t)(mix64((uint64_t)key) & (uint64_t)(size - 1));
    while (slot_row[at] >= 0 && slot_key[at] != key) at = (at + 1) & (size - 1);
    return at;
}

/* The two table columns and the keys, checked: 0, or -1 with an exception set. */
static int key_slots(PyObject *args, const char *format, Column *slot_key, Column *slot_row, Column *keys,
                     Py_ssize_t *size, Py_ssize_t *m, int writable, Py_ssize_t *first_row) {
    PyObject *slot_key_obj, *slot_row_obj, *keys_obj;
    if (first_row ? !PyArg_ParseTuple(args, format, &slot_key_obj, &slot_row_obj, &keys_obj, first_row)
                  : !PyArg_ParseTuple(args, format, &slot_key_obj, &slot_row_obj, &keys_obj))
        return -1;
    *size = *m = -1;
    if (take(slot_key_obj, slot_key, 8, size, writable, "slot_key") < 0 ||
        take(slot_row_obj, slot_row, 8, size, writable, "slot_row") < 0 || take(keys_obj, keys, 8, m, 0, "keys") < 0)
        return -1;
    if (*size == 0 || (*size & (*size - 1))) {
        PyErr_Format(PyExc_ValueError, "a table of %zd slots: expected a power of two", *size);
        return -1;
    }
    return 0;
}

static void release(Column *a, Column *b, Column *c) {
    if (a->held) PyBuffer_Release(&a->view);
    if (b->held) PyBuffer_Release(&b->view);
    if (c->held) PyBuffer_Release(&c->view);
}

static PyObject *key_slots_put(PyObject *module, PyObject *args) {
    (void)module;
    Column slot_key = {0}, slot_row = {0}, keys = {0};
    Py_ssize_t size, m, first_row;
    PyObject *result = NULL;
    if (key_slots(args, "OOOn", &slot_key, &slot_row, &keys, &size, &m, 1, &first_row) < 0) goto done;
    int64_t *sk = slot_key.view.buf, *sr = slot_row.view.buf;
    const int64_t *k = keys.view.buf;
    Py_ssize_t held = 0;
    for (Py_ssize_t s = 0; s < size; s++) held += sr[s] >= 0;
    if (first_row < 0 || 2 * (held + m) > size) {
        PyErr_Format(PyExc_ValueError, "%zd keys into a table of %zd slots holding %zd (first row %zd)", m, size,
                     held, first_row);
        goto done;
    }
    for (Py_ssize_t i = 0; i < m; i++) {
        Py_ssize_t at = key_slot(sk, sr, size, k[i]);
        if (sr[at] >= 0) {
            /* Undone newest first: each key's probe sequence is then as it was when it went in. */
            for (Py_ssize_t j = i - 1; j >= 0; j--) sr[key_slot(sk, sr, size, k[j])] = -1;
            PyErr_Format(PyExc_ValueError, "key %lld is in the table already", (long long)k[i]);
            goto done;
        }
        sk[at] = k[i];
        sr[at] = first_row + i;
    }
    result = Py_NewRef(Py_None);
done:
    release(&slot_key, &slot_row, &keys);
    return result;
}

static PyObject *key_slots_find(PyObject *module, PyObject *args) {
    (void)module;
    Column slot_key = {0}, slot_row = {0}, keys = {0};
    Py_ssize_t size, m;
    PyObject *rows_obj = NULL;
    if (key_slots(args, "OOO", &slot_key, &slot_row, &keys, &size, &m, 0, NULL) < 0) goto done;
    const int64_t *sk = slot_key.view.buf, *sr = slot_row.view.buf, *k = keys.view.buf;
    rows_obj = PyByteArray_FromStringAndSize(NULL, m * 8);
    if (rows_obj == NULL) goto done;
    int64_t *row = (int64_t *)PyByteArray_AS_STRING(rows_obj);
    for (Py_ssize_t i = 0; i < m; i++) row[i] = sr[key_slot(sk, sr, size, k[i])];
done:
    release(&slot_key, &slot_row, &keys);
    return rows_obj;
}

static PyMethodDef methods[] = {
    {"factorise", factorise, METH_O, "Codes and distinct items (see the module comment)."},
    {"distinct_codes", distinct_codes, METH_O, "First rows and codes of distinct values (see the module comment)."},
    {"pair_lines", pair_lines, METH_VARARGS, "Each row's line and each line's first row (see the module comment)."},
    {"key_slots_put", key_slots_put, METH_VARARGS, "Keys into a hash table (see the module comment)."},
    {"key_slots_find", key_slots_find, METH_VARARGS, "The rows of keys in a hash table (see the module comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_arrays", NULL, -1, methods};

PyMODINIT_FUNC PyInit__arrays(void) { return PyModule_Create(&module); }
