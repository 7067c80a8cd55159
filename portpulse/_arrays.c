/* The compiled half of portpulse/arrays.py's factorise: codes of hashable items in one pass.
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define CACHE_SLOTS 256

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

static PyMethodDef methods[] = {
    {"factorise", factorise, METH_O, "Codes and distinct items (see the module comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_arrays", NULL, -1, methods};

PyMODINIT_FUNC PyInit__arrays(void) { return PyModule_Create(&module); }
