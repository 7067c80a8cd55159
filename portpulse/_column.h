/* Shared by the C extensions that read numpy columns (portpulse/_arrays.c, sinks/_lineformat.c,
 * processors/_hampel.c, processors/_windows.c):
 * a column is a C-contiguous buffer of fixed-size items, taken with its count checked. */
#ifndef PORTPULSE_COLUMN_H
#define PORTPULSE_COLUMN_H

#include <Python.h>

typedef struct {
    Py_buffer view;
    int held; /* the view is to be released */
} Column;

/* obj as a C-contiguous buffer of ``itemsize``-byte items (``writable``: to be written), its item
 * count at *n (*n >= 0 on entry: must be that count). 0, or -1 with ValueError (or the buffer's
 * error) set; the caller releases c->view when c->held. */
static int take(PyObject *obj, Column *c, Py_ssize_t itemsize, Py_ssize_t *n, int writable, const char *what) {
    if (PyObject_GetBuffer(obj, &c->view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) return -1;
    c->held = 1;
    if (c->view.len % itemsize || (c->view.len && c->view.itemsize != itemsize)) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd-byte items", what, itemsize);
        return -1;
    }
    Py_ssize_t count = c->view.len / itemsize;
    if (*n >= 0 && count != *n) {
        PyErr_Format(PyExc_ValueError, "%s: %zd items, expected %zd", what, count, *n);
        return -1;
    }
    *n = count;
    return 0;
}

#endif
