/* Shared by the C extensions that sort a few doubles (processors/_hampel.c, processors/_windows.c). */
#ifndef PORTPULSE_SORT_H
#define PORTPULSE_SORT_H

#include <Python.h>

/* Sorts a[0..n) ascending by insertion (no NaN): the fastest for a handful of values. */
static void insertion_sort(double *a, Py_ssize_t n) {
    for (Py_ssize_t i = 1; i < n; i++) {
        double x = a[i];
        Py_ssize_t j = i - 1;
        while (j >= 0 && a[j] > x) {
            a[j + 1] = a[j];
            j--;
        }
        a[j + 1] = x;
    }
}

#endif
