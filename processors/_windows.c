/* The compiled half of processors/window.py's aggregate for the usual closing windows: each key's
 * times rising in arrival order (no instant twice, so every row counts). One counting sort by key (keys are
 * (bucket, series) codes, a dense range) and one pass per key, instead of numpy's sort of the
 * keys, gathers of every column, a padded matrix sorted row by row and a reduction per statistic.
 *
 * aggregate_in_order(key, ts, value, accepted) -> None | (groups, ints, floats)
 *
 *   key:      int64 (m,), the rows' keys, in arrival order; ts: int64 (m,) ns; value: float64 (m,);
 *   accepted: uint8 (m,), 1 where cleaning accepted the row (the others count as rejected).
 *
 * Returns None, having computed nothing that is kept, when the keys span more than a few times m
 * (a table per key would not pay), a key's times do not rise strictly in arrival order, or an
 * accepted value is not finite: numpy then aggregates. Otherwise ``groups`` g, ``ints`` a
 * bytearray of 4 x g int64 (key ascending, count of accepted rows, count of rejected rows, first
 * row in arrival order) and ``floats`` one of 6 x g float64 (mean, min, max, last, stddev, p95 of
 * the accepted values; NaN where a key has none), column after column. Raises ValueError for
 * ragged inputs.
 *
 * The arithmetic is window.py's _aggregate_in_order, operation for operation (setup.py turns off
 * fused multiply-add contraction): sums run from 0.0 over each key's accepted values in ascending order,
 * one after the other (numpy: bincount with weights); stddev from the squared deviations from the
 * mean, the same way; p95 by linear interpolation at 0.95 * (count - 1).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../portpulse/_column.h"
#include "../portpulse/_sort.h"

#define MORE_KEYS_THAN_ROWS 4 /* a key range up to this many times m (plus a little) is tabled */

/* Sorts a[0..n) ascending (no NaN): quicksort, median of three, small parts by insertion. */
static void sort_values(double *a, Py_ssize_t n) {
    while (n > 24) {
        double x = a[0], y = a[n / 2], z = a[n - 1];
        double pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        Py_ssize_t i = 0, j = n - 1;
        for (;;) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i >= j) break;
            double t = a[i];
            a[i] = a[j];
            a[j] = t;
            i++;
            j--;
        }
        /* a[0..j] <= pivot <= a[j+1..n): recurse into the smaller part, loop on the larger */
        Py_ssize_t left = j + 1;
        if (left <= 0 || left >= n) break; /* no progress (cannot happen with a median of three) */
        if (left < n - left) {
            sort_values(a, left);
            a += left;
            n -= left;
        } else {
            sort_values(a + left, n - left);
            n = left;
        }
    }
    insertion_sort(a, n);
}

static PyObject *aggregate_in_order(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *key_obj, *ts_obj, *value_obj, *accepted_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &key_obj, &ts_obj, &value_obj, &accepted_obj)) return NULL;
    Column key = {0}, ts = {0}, value = {0}, accepted = {0};
    PyObject *result = NULL, *ints_obj = NULL, *floats_obj = NULL;
    int64_t *slot_count = NULL, *order = NULL;
    double *scratch = NULL;
    Py_ssize_t m = -1;
    if (take(key_obj, &key, 8, &m, 0, "key") < 0 || take(ts_obj, &ts, 8, &m, 0, "ts") < 0 ||
        take(value_obj, &value, 8, &m, 0, "value") < 0 || take(accepted_obj, &accepted, 1, &m, 0, "accepted") < 0)
        goto done;
    const int64_t *k = key.view.buf, *t = ts.view.buf;
    const double *v = value.view.buf;
    const unsigned char *ok = accepted.view.buf;
    if (m == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    int64_t lo = k[0], hi = k[0];
    for (Py_ssize_t i = 0; i < m; i++) {
        if (ok[i] && !isfinite(v[i])) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        lo = k[i] < lo ? k[i] : lo;
        hi = k[i] > hi ? k[i] : hi;
    }
    /* hi - lo in unsigned arithmetic: keys may span all of int64 */
    if ((uint64_t)hi - (uint64_t)lo >= (uint64_t)(MORE_KEYS_THAN_ROWS * m + 4096)) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_ssize_t slots = (Py_ssize_t)(hi - lo) + 1;
    slot_count = PyMem_Calloc((size_t)slots + 1, sizeof(int64_t));
    order = PyMem_Malloc((size_t)m * sizeof(int64_t));
    if (slot_count == NULL || order == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < m; i++) slot_count[k[i] - lo + 1]++;
    Py_ssize_t groups = 0, widest = 0;
    for (Py_ssize_t s = 1; s <= slots; s++) {
        groups += slot_count[s] > 0;
        widest = slot_count[s] > widest ? (Py_ssize_t)slot_count[s] : widest;
        slot_count[s] += slot_count[s - 1]; /* slot_count[s]: where slot s's rows start */
    }
    for (Py_ssize_t i = 0; i < m; i++) order[slot_count[k[i] - lo]++] = i; /* stable: arrival order */
    /* Now slot_count[s] is where slot s's rows end (slot s - 1's start is behind it). */
    scratch = PyMem_Malloc((size_t)widest * sizeof(double));
    ints_obj = PyByteArray_FromStringAndSize(NULL, groups * 4 * 8);
    floats_obj = PyByteArray_FromStringAndSize(NULL, groups * 6 * 8);
    if (scratch == NULL || ints_obj == NULL || floats_obj == NULL) {
        if (scratch == NULL) PyErr_NoMemory();
        goto done;
    }
    int64_t *out_key = (int64_t *)PyByteArray_AS_STRING(ints_obj), *out_count = out_key + groups,
            *out_rejected = out_count + groups, *out_first = out_rejected + groups;
    double *out_mean = (double *)PyByteArray_AS_STRING(floats_obj), *out_min = out_mean + groups,
           *out_max = out_min + groups, *out_last = out_max + groups, *out_std = out_last + groups,
           *out_p95 = out_std + groups;
    Py_ssize_t g = 0, begin = 0;
    for (Py_ssize_t s = 0; s < slots; s++) {
        Py_ssize_t end = (Py_ssize_t)slot_count[s];
        Py_ssize_t c = end - begin;
        if (c == 0) continue;
        const int64_t *rows = order + begin;
        for (Py_ssize_t j = 1; j < c; j++) {
            if (t[rows[j]] <= t[rows[j - 1]]) { /* not rising: numpy sorts out repeats and order */
                result = Py_NewRef(Py_None);
                goto done;
            }
        }
        /* The accepted values; + 0.0 turns -0.0 into 0.0: equal values, but which one sorts
         * first would decide min. The last accepted row is the latest accepted instant. */
        Py_ssize_t n = 0, last_row = -1;
        for (Py_ssize_t j = 0; j < c; j++) {
            if (!ok[rows[j]]) continue;
            scratch[n++] = v[rows[j]] + 0.0;
            last_row = rows[j];
        }
        sort_values(scratch, n);
        double sum = 0.0;
        for (Py_ssize_t j = 0; j < n; j++) sum += scratch[j];
        double mean = sum / (double)n, squares = 0.0; /* n == 0: NaN, as numpy gives */
        for (Py_ssize_t j = 0; j < n; j++) {
            double d = scratch[j] - mean;
            squares += d * d;
        }
        out_key[g] = lo + s;
        out_count[g] = n;
        out_rejected[g] = c - n;
        out_first[g] = rows[0];
        out_mean[g] = mean;
        out_std[g] = sqrt(squares / (double)n);
        if (n == 0) {
            out_min[g] = out_max[g] = out_last[g] = out_p95[g] = NAN;
        } else {
            double pos = 0.95 * (double)(n - 1);
            Py_ssize_t below = (Py_ssize_t)floor(pos), above = below + 1 < n - 1 ? below + 1 : n - 1;
            double frac = pos - (double)below;
            out_min[g] = scratch[0];
            out_max[g] = scratch[n - 1];
            out_last[g] = v[last_row];
            out_p95[g] = scratch[below] * (1 - frac) + scratch[above] * frac;
        }
        g++;
        begin = end;
    }
    result = Py_BuildValue("nOO", groups, ints_obj, floats_obj);
done:
    Py_XDECREF(ints_obj);
    Py_XDECREF(floats_obj);
    PyMem_Free(slot_count);
    PyMem_Free(order);
    PyMem_Free(scratch);
    Column *held[] = {&key, &ts, &value, &accepted};
    for (size_t c = 0; c < sizeof held / sizeof held[0]; c++)
        if (held[c]->held) PyBuffer_Release(&held[c]->view);
    return result;
}

static PyMethodDef methods[] = {
    {"aggregate_in_order", aggregate_in_order, METH_VARARGS, "Window aggregates of in-order rows (see the module comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_windows", NULL, -1, methods};

PyMODINIT_FUNC PyInit__windows(void) { return PyModule_Create(&module); }
