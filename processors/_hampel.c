/* The compiled half of processors/clean.py's checks 4 and 5 for the usual batch: every candidate
 * newer than its series' history. Each candidate is judged against the readings before it (the
 * history's tail, then the batch's earlier candidates of its series) and the history rows are
 * then appended to in place, instead of numpy building the sequences, running a median network
 * column by column and moving whole rows.
 *
 * judge_appended(values, ts, offsets, verdicts, series, counts, cv, ct, co, floor, max_rate,
 *                k_sigma, window, out) -> bool
 *
 *   values, ts, offsets, verdicts: the history, (k, H) float64 / int64 / int64 / uint8, written;
 *   series, counts: int64 (g,), the distinct series (rows) of the candidates and how many each;
 *   cv, ct, co:     float64 / int64 / int64 (m,), the candidates' values, times (ns) and offsets,
 *                   grouped by series in ``series`` order, each group in time order;
 *   floor, max_rate: float64, per series id: the spike floor and the rate limit (per s);
 *   k_sigma:        the spike threshold in MADs; window: the Hampel window W (1 <= W <= H);
 *   out:            uint8 (m,), written: each candidate's verdict (OK, SPIKE or RATE).
 *
 * Returns True when every candidate was judged and the history appended to. Returns False, with
 * nothing changed but ``out``, when a window is not in time order or W is wider than this module
 * sorts on the stack: clean.py's numpy path then judges the batch. Raises ValueError for shapes
 * that do not fit together or a series outside the history.
 *
 * earliest_offsets(offsets, series, out) -> None
 *
 *   offsets: the history's int64 (k, H); series: int64 (n,) rows; out: int64 (n,), written: the
 *   smallest offset of each row (History.earliest_offset), one short pass per row instead of
 *   numpy's gather of whole rows and a reduction along them.
 *
 * The arithmetic is clean.py's _judge_full_windows, operation for operation (setup.py turns off
 * fused multiply-add contraction), so the verdicts are the same bit for bit: the median of c values is the middle one (the mean of the middle two for
 * even c); a window with e empty slots (NaN, which in time order come first) is judged as the full
 * window of its last W - e slots, and one with none filled is OK.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../portpulse/_column.h"
#include "../portpulse/_sort.h"

#define MAX_WINDOW 64
enum { OK = 0, SPIKE = 4, RATE = 5 };

#ifdef __SSE2__
#include <emmintrin.h>
/* minsd / maxsd: compilers otherwise tend to turn a compare-exchange into a branch. */
static inline double lesser(double x, double y) { return _mm_cvtsd_f64(_mm_min_sd(_mm_set_sd(x), _mm_set_sd(y))); }
static inline double greater(double x, double y) { return _mm_cvtsd_f64(_mm_max_sd(_mm_set_sd(x), _mm_set_sd(y))); }
#else
static inline double lesser(double x, double y) { return x < y ? x : y; }
static inline double greater(double x, double y) { return x > y ? x : y; }
#endif

#define EXCHANGE(i, j)                  \
    do {                                \
        double x_ = v##i, y_ = v##j;    \
        v##i = lesser(x_, y_);          \
        v##j = greater(x_, y_);         \
    } while (0)

/* Sorts a[0..8) ascending by a branchless 19-comparator network: a window's values are random,
 * so an insertion sort's branches mispredict about once per element. */
static void sort8(double *a) {
    double v0 = a[0], v1 = a[1], v2 = a[2], v3 = a[3], v4 = a[4], v5 = a[5], v6 = a[6], v7 = a[7];
    EXCHANGE(0, 2); EXCHANGE(1, 3); EXCHANGE(4, 6); EXCHANGE(5, 7);
    EXCHANGE(0, 4); EXCHANGE(1, 5); EXCHANGE(2, 6); EXCHANGE(3, 7);
    EXCHANGE(0, 1); EXCHANGE(2, 3); EXCHANGE(4, 5); EXCHANGE(6, 7);
    EXCHANGE(2, 4); EXCHANGE(3, 5);
    EXCHANGE(1, 4); EXCHANGE(3, 6);
    EXCHANGE(1, 2); EXCHANGE(3, 4); EXCHANGE(5, 6);
    a[0] = v0, a[1] = v1, a[2] = v2, a[3] = v3, a[4] = v4, a[5] = v5, a[6] = v6, a[7] = v7;
}

/* Sorts a[0..c) ascending, c <= MAX_WINDOW; a has room for at least 8 values. Up to 8 values are
 * padded with +inf (no value judged is infinite: check 1 rejected those) and sorted by network. */
static void sort_window(double *a, int c) {
    if (c > 8) {
        insertion_sort(a, c);
        return;
    }
    for (int i = c; i < 8; i++) a[i] = INFINITY;
    sort8(a);
}

static double median_sorted(const double *a, int c) {
    return c % 2 ? a[c / 2] : (a[c / 2 - 1] + a[c / 2]) / 2;
}

/* The verdict of x at time t against the full window of c values wv and times wt (time order). */
static unsigned char judge(const double *wv, const int64_t *wt, int c, double x, int64_t t, double floor,
                           double max_rate, double k_sigma) {
    double sorted[MAX_WINDOW];
    for (int j = 0; j < c; j++) sorted[j] = wv[j];
    sort_window(sorted, c);
    double med = median_sorted(sorted, c);
    double age = (double)(t - wt[c - 1 - (c - 1) / 2]);
    if (c % 2 == 0) age = (age + (double)(t - wt[c - 1 - c / 2])) / 2;
    double dev = fabs(x - med);
    unsigned char verdict = (age > 0 && dev / (age / 1e9) > max_rate) ? RATE : OK;
    if (c >= 3 && dev > k_sigma * floor) {
        double spread[MAX_WINDOW];
        for (int j = 0; j < c; j++) spread[j] = fabs(wv[j] - med);
        sort_window(spread, c);
        double scale = 1.4826 * median_sorted(spread, c);
        if (!(scale >= floor)) scale = floor; /* np.maximum, NaN-free here */
        if (dev > k_sigma * scale) verdict = SPIKE;
    }
    return verdict;
}

/* Rows of the history are scattered over tens of MB: ask for the ones a few groups ahead. */
#define PREFETCH_AHEAD 8
static inline void prefetch_row(const void *start, Py_ssize_t bytes) {
#if defined(__GNUC__)
    for (Py_ssize_t at = 0; at < bytes; at += 64) __builtin_prefetch((const char *)start + at, 1);
    __builtin_prefetch((const char *)start + bytes - 1, 1);
#else
    (void)start, (void)bytes;
#endif
}

static PyObject *judge_appended(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *objs[14];
    double k_sigma;
    Py_ssize_t window;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOdnO", &objs[0], &objs[1], &objs[2], &objs[3], &objs[4], &objs[5],
                          &objs[6], &objs[7], &objs[8], &objs[9], &objs[10], &k_sigma, &window, &objs[13]))
        return NULL;
    Column values = {0}, ts = {0}, offsets = {0}, verdicts = {0}, series = {0}, counts = {0}, cv = {0}, ct = {0},
           co = {0}, floor = {0}, max_rate = {0}, out = {0};
    Column *held[] = {&values, &ts, &offsets, &verdicts, &series, &counts, &cv, &ct, &co, &floor, &max_rate, &out};
    PyObject *result = NULL;
    Py_ssize_t cells = -1, g = -1, m = -1, limits = -1;
    if (take(objs[0], &values, 8, &cells, 1, "values") < 0 || take(objs[1], &ts, 8, &cells, 1, "ts") < 0 ||
        take(objs[2], &offsets, 8, &cells, 1, "offsets") < 0 || take(objs[3], &verdicts, 1, &cells, 1, "verdicts") < 0 ||
        take(objs[4], &series, 8, &g, 0, "series") < 0 || take(objs[5], &counts, 8, &g, 0, "counts") < 0 ||
        take(objs[6], &cv, 8, &m, 0, "cv") < 0 || take(objs[7], &ct, 8, &m, 0, "ct") < 0 ||
        take(objs[8], &co, 8, &m, 0, "co") < 0 || take(objs[9], &floor, 8, &limits, 0, "floor") < 0 ||
        take(objs[10], &max_rate, 8, &limits, 0, "max_rate") < 0 || take(objs[13], &out, 1, &m, 1, "out") < 0)
        goto done;
    if (values.view.ndim != 2) {
        PyErr_SetString(PyExc_ValueError, "values: expected a (series, H) array");
        goto done;
    }
    Py_ssize_t k = values.view.shape[0], h = values.view.shape[1];
    if (ts.view.ndim != 2 || offsets.view.ndim != 2 || verdicts.view.ndim != 2 || ts.view.shape[1] != h ||
        offsets.view.shape[1] != h || verdicts.view.shape[1] != h) {
        PyErr_SetString(PyExc_ValueError, "ts, offsets and verdicts must have the shape of values");
        goto done;
    }
    if (window < 1 || window > h) {
        PyErr_Format(PyExc_ValueError, "window %zd outside 1..%zd", window, h);
        goto done;
    }
    double *hv = values.view.buf, *x = cv.view.buf;
    int64_t *ht = ts.view.buf, *ho = offsets.view.buf, *t = ct.view.buf, *o = co.view.buf;
    unsigned char *hd = verdicts.view.buf, *verdict = out.view.buf;
    const int64_t *rows = series.view.buf, *count = counts.view.buf;
    const double *floors = floor.view.buf, *rates = max_rate.view.buf;
    Py_ssize_t total = 0;
    for (Py_ssize_t j = 0; j < g; j++) {
        if (rows[j] < 0 || rows[j] >= k || rows[j] >= limits || count[j] < 0) {
            PyErr_Format(PyExc_ValueError, "group %zd: series %lld of %zd (limits %zd), count %lld", j,
                         (long long)rows[j], k, limits, (long long)count[j]);
            goto done;
        }
        total += count[j];
    }
    if (total != m) {
        PyErr_Format(PyExc_ValueError, "counts sum to %zd, %zd candidates", total, m);
        goto done;
    }
    if (window > MAX_WINDOW) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    /* Judge every candidate before changing anything: a window out of time order leaves it all to numpy. */
    int w = (int)window;
    double seq_v[2 * MAX_WINDOW];
    int64_t seq_t[2 * MAX_WINDOW];
    Py_ssize_t first = 0;
    for (Py_ssize_t j = 0; j < g; j++) {
        if (j + PREFETCH_AHEAD < g) {
            Py_ssize_t ahead = rows[j + PREFETCH_AHEAD] * h + (h - w);
            prefetch_row(hv + ahead, w * (Py_ssize_t)sizeof(double));
            prefetch_row(ht + ahead, w * (Py_ssize_t)sizeof(int64_t));
        }
        const double *row_v = hv + rows[j] * h + (h - w);
        const int64_t *row_t = ht + rows[j] * h + (h - w);
        /* A sliding copy of the sequence: the history's last w slots, then candidates as they come. */
        for (int q = 0; q < w; q++) { /* a loop, not memcpy: w is a handful of slots */
            seq_v[q] = row_v[q];
            seq_t[q] = row_t[q];
        }
        int empty = 0, back = 0; /* in the current window: NaN slots, pairs falling in time */
        for (int q = 0; q < w; q++) {
            empty += isnan(seq_v[q]) != 0;
            if (q && seq_t[q] < seq_t[q - 1]) back++;
        }
        int filled_from = 0; /* the window is seq[filled_from .. filled_from + w) */
        double floor_j = floors[rows[j]], rate_j = rates[rows[j]];
        for (int64_t i = 0; i < count[j]; i++) {
            Py_ssize_t c_i = first + i;
            if (back) {
                result = Py_NewRef(Py_False);
                goto done;
            }
            int c = w - empty;
            verdict[c_i] = c == 0 ? OK
                                  : judge(seq_v + filled_from + empty, seq_t + filled_from + empty, c, x[c_i], t[c_i],
                                          floor_j, rate_j, k_sigma);
            /* Slide: drop the oldest slot, take this candidate. */
            if (filled_from + w == 2 * MAX_WINDOW) {
                memmove(seq_v, seq_v + filled_from, (size_t)w * sizeof(double));
                memmove(seq_t, seq_t + filled_from, (size_t)w * sizeof(int64_t));
                filled_from = 0;
            }
            empty -= isnan(seq_v[filled_from]) != 0;
            if (w > 1) { /* the pair leaving the window, and the one entering it */
                if (seq_t[filled_from + 1] < seq_t[filled_from]) back--;
                if (t[c_i] < seq_t[filled_from + w - 1]) back++;
            }
            seq_v[filled_from + w] = x[c_i];
            seq_t[filled_from + w] = t[c_i];
            filled_from++;
        }
        first += count[j];
    }
    /* Append: each row keeps its H newest, oldest first. */
    first = 0;
    for (Py_ssize_t j = 0; j < g; j++) {
        if (j + PREFETCH_AHEAD < g) {
            Py_ssize_t ahead = rows[j + PREFETCH_AHEAD] * h;
            prefetch_row(hv + ahead, h * (Py_ssize_t)sizeof(double));
            prefetch_row(ht + ahead, h * (Py_ssize_t)sizeof(int64_t));
            prefetch_row(ho + ahead, h * (Py_ssize_t)sizeof(int64_t));
            prefetch_row(hd + ahead, h);
        }
        Py_ssize_t c = count[j], base = rows[j] * h;
        if (c == 0) continue;
        Py_ssize_t keep = c < h ? h - c : 0, from = first + c - (h - keep);
        /* Loops, not memmove: a row is a handful of slots, shifted by one or two. */
        for (Py_ssize_t q = 0; q < keep; q++) {
            hv[base + q] = hv[base + c + q];
            ht[base + q] = ht[base + c + q];
            ho[base + q] = ho[base + c + q];
            hd[base + q] = hd[base + c + q];
        }
        for (Py_ssize_t q = 0; q < h - keep; q++) {
            hv[base + keep + q] = x[from + q];
            ht[base + keep + q] = t[from + q];
            ho[base + keep + q] = o[from + q];
            hd[base + keep + q] = verdict[from + q];
        }
        first += c;
    }
    result = Py_NewRef(Py_True);
done:
    for (size_t c = 0; c < sizeof held / sizeof held[0]; c++)
        if (held[c]->held) PyBuffer_Release(&held[c]->view);
    return result;
}

static PyObject *earliest_offsets(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *offsets_obj, *series_obj, *out_obj;
    if (!PyArg_ParseTuple(args, "OOO", &offsets_obj, &series_obj, &out_obj)) return NULL;
    Column offsets = {0}, series = {0}, out = {0};
    PyObject *result = NULL;
    Py_ssize_t cells = -1, n = -1;
    if (take(offsets_obj, &offsets, 8, &cells, 0, "offsets") < 0 || take(series_obj, &series, 8, &n, 0, "series") < 0 ||
        take(out_obj, &out, 8, &n, 1, "out") < 0)
        goto done;
    if (offsets.view.ndim != 2 || offsets.view.shape[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "offsets: expected a (series, H) array, H >= 1");
        goto done;
    }
    Py_ssize_t k = offsets.view.shape[0], h = offsets.view.shape[1];
    const int64_t *held = offsets.view.buf, *rows = series.view.buf;
    int64_t *earliest = out.view.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (rows[i] < 0 || rows[i] >= k) {
            PyErr_Format(PyExc_ValueError, "series %lld outside the %zd rows", (long long)rows[i], k);
            goto done;
        }
        const int64_t *row = held + rows[i] * h;
        int64_t least = row[0];
        for (Py_ssize_t j = 1; j < h; j++) least = row[j] < least ? row[j] : least;
        earliest[i] = least;
    }
    result = Py_NewRef(Py_None);
done:
    if (offsets.held) PyBuffer_Release(&offsets.view);
    if (series.held) PyBuffer_Release(&series.view);
    if (out.held) PyBuffer_Release(&out.view);
    return result;
}

static PyMethodDef methods[] = {
    {"judge_appended", judge_appended, METH_VARARGS, "Checks 4-5 and the history append (see the module comment)."},
    {"earliest_offsets", earliest_offsets, METH_VARARGS, "Each row's smallest offset (see the module comment)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_hampel", NULL, -1, methods};

PyMODINIT_FUNC PyInit__hampel(void) { return PyModule_Create(&module); }
