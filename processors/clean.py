"""Cleaning kernel: pure numpy, arrays in, arrays out, no I/O, no clock.

For readings of ``k`` series (one series = one sensor and metric), :func:`clean` returns a
reason code per reading (``OK`` or why it is rejected) and the per-series history carried to
the next batch. Checks, first match wins:

1. ``NON_FINITE``: NaN or ±inf.
2. ``OUT_OF_RANGE``: outside the catalogue's [lo, hi].
3. ``DUPLICATE``: same series and timestamp as an earlier reading (in this batch, in arrival
   order, or in the carried history).
4. ``SPIKE`` (Hampel filter): ``|x - median| > k_sigma * max(1.4826 * MAD, floor)`` over the
   *window*: the previous ``W`` readings of the series that passed checks 1-3, in event-time
   order, the carried history first. Needs at least 3 values in the window.
5. ``RATE``: ``|x - median| / dt > max_rate_per_s`` with ``dt`` the median time from the window's
   readings to this one (only when ``dt > 0``): value and time both measured from the window's
   middle, so a steady trend passes at its true slope. Comparing with the median rather than
   the last value keeps a spike from also rejecting the good reading after it.

The window uses readings that passed checks 1-3 (not 4-5), which removes any sequential
dependency: the whole batch is judged in one vectorised pass and the result equals the slow
reference in ``tests/unit/test_kernels.py`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "DUPLICATE", "NON_FINITE", "NO_OFFSET", "OK", "OUT_OF_RANGE", "RATE", "REASON_NAMES", "SPIKE", "History", "clean",
]  # fmt: skip

OK, NON_FINITE, OUT_OF_RANGE, DUPLICATE, SPIKE, RATE = range(6)
REASON_NAMES = ("ok", "non_finite", "out_of_range", "duplicate", "spike", "rate_of_change")
_NO_TS = np.iinfo(np.int64).min
NO_OFFSET = np.iinfo(np.int64).max  # an empty history slot


@dataclass(frozen=True, slots=True)
class History:
    """Per series, the last ``W`` readings that passed checks 1-3, oldest first, left-padded.

    ``values``: float64 ``(k, W)``, NaN where empty; ``ts``: int64 ``(k, W)``, int64 min where
    empty; ``offsets``: int64 ``(k, W)``, where each reading came from (the caller's Kafka offset),
    int64 max where empty. A replay that starts at or before a series' smallest offset rebuilds
    its history exactly.
    """

    values: npt.NDArray[np.float64]
    ts: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]

    @classmethod
    def empty(cls, series: int, window: int) -> History:
        return cls(
            np.full((series, window), np.nan),
            np.full((series, window), _NO_TS, dtype=np.int64),
            np.full((series, window), NO_OFFSET, dtype=np.int64),
        )

    def grow(self, series: int) -> History:
        """The same history with room for ``series`` series (new ones empty)."""
        k, w = self.values.shape
        if series <= k:
            return self
        more = History.empty(series - k, w)
        return History(
            np.vstack([self.values, more.values]),
            np.vstack([self.ts, more.ts]),
            np.vstack([self.offsets, more.offsets]),
        )

    def forget(self, series: npt.NDArray[np.bool_]) -> History:
        """The same history with the series where ``series`` (bool ``(k,)``) is true emptied."""
        values, ts, offsets = self.values.copy(), self.ts.copy(), self.offsets.copy()
        values[series], ts[series], offsets[series] = np.nan, _NO_TS, NO_OFFSET
        return History(values, ts, offsets)


# An optimal 16-comparator sorting network for 7 inputs (Knuth, TAOCP 5.3.4): sorting a
# window column-wise with np.minimum/np.maximum is ~10x faster than np.sort on (m, 7) rows.
_NETWORK_7 = (
    (0, 6), (2, 3), (4, 5), (0, 2), (1, 4), (3, 6), (0, 1), (2, 5),
    (3, 4), (1, 2), (4, 6), (2, 3), (4, 5), (1, 2), (3, 4), (5, 6),
)  # fmt: skip


def _sort_columns(cols: list[npt.NDArray[np.float64]]) -> list[npt.NDArray[np.float64]]:
    """Sort each row of a window given as W columns of shape ``(m,)`` (no NaN; +inf sorts last)."""
    if len(cols) != 7:
        rows = np.sort(np.stack(cols, axis=1), axis=1)
        return [rows[:, j] for j in range(rows.shape[1])]
    c = list(cols)
    for i, j in _NETWORK_7:
        lo, hi = np.minimum(c[i], c[j]), np.maximum(c[i], c[j])
        c[i], c[j] = lo, hi
    return c


def _column_median(cols: list[npt.NDArray[np.float64]]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Median of each row of a window (W columns, NaN = empty) ignoring NaN, and the count of values."""
    w = len(cols)
    count = np.zeros(len(cols[0]), dtype=np.int64)
    filled = []
    for col in cols:
        present = ~np.isnan(col)
        count += present
        filled.append(np.where(present, col, np.inf))
    ordered = _sort_columns(filled)
    med = np.full(len(count), np.nan)
    full = count == w
    med[full] = (ordered[(w - 1) // 2][full] + ordered[w // 2][full]) / 2
    partial = np.flatnonzero((count > 0) & ~full)
    if len(partial):
        rows = np.stack([o[partial] for o in ordered], axis=1)
        c = count[partial]
        a = np.take_along_axis(rows, ((c - 1) // 2)[:, None], axis=1)[:, 0]
        b = np.take_along_axis(rows, (c // 2)[:, None], axis=1)[:, 0]
        med[partial] = (a + b) / 2
    return med, count


def _row_median(rows: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """Median of each row ignoring NaN, and the number of non-NaN values (median NaN when none)."""
    s = np.sort(rows, axis=1)  # NaN sorts last
    count = np.sum(~np.isnan(rows), axis=1)
    lo = np.clip((count - 1) // 2, 0, None)
    hi = np.clip(count // 2, 0, None)
    a = np.take_along_axis(s, lo[:, None], axis=1)[:, 0]
    b = np.take_along_axis(s, hi[:, None], axis=1)[:, 0]
    med = np.where(count > 0, (a + b) / 2, np.nan)
    return med, count


def _series_time_order(series: npt.NDArray[np.int64], ts_ns: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Stable order by (series, ts): one int64 sort key when the batch's time span allows it."""
    span = int(ts_ns.max()) - int(ts_ns.min())
    top = int(series.max()) if len(series) else 0
    if span < 2**40 and top < 2**22:
        key = (series << 40) | (ts_ns - ts_ns.min())
        return np.argsort(key, kind="stable")
    return np.lexsort((ts_ns, series))  # lexsort is stable: ties keep arrival order


def clean(
    series: npt.NDArray[np.int64],
    ts_ns: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    lo: npt.NDArray[np.float64],
    hi: npt.NDArray[np.float64],
    max_rate_per_s: npt.NDArray[np.float64],
    spike_floor: npt.NDArray[np.float64],
    history: History,
    k_sigma: float = 4.0,
    offset: npt.NDArray[np.int64] | None = None,
) -> tuple[npt.NDArray[np.uint8], History]:
    """Judge ``n`` readings.

    ``series``, ``ts_ns`` (ns), ``value``: shape ``(n,)``, in arrival order; ``lo``, ``hi``,
    ``max_rate_per_s``, ``spike_floor``: per-series limits, shape ``(k,)`` (use -inf/inf/inf/0
    for metrics the catalogue does not know); ``history``: ``(k, W)`` from the previous batch.
    ``offset``: where each reading came from ``(n,)`` (kept in the history; zeros when omitted).
    Returns the reason code per reading (uint8 ``(n,)``, input order) and the new history.
    """
    n = len(series)
    window = history.values.shape[1]
    reason = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return reason, history
    order = _series_time_order(series, ts_ns)
    s, t, v = series[order], ts_ns[order], value[order]
    o = np.zeros(n, dtype=np.int64) if offset is None else offset[order]
    r = np.zeros(n, dtype=np.uint8)

    finite = np.isfinite(v)
    r[~finite] = NON_FINITE
    in_range = (v >= lo[s]) & (v <= hi[s])
    r[finite & ~in_range] = OUT_OF_RANGE
    # A duplicate repeats the (series, ts) of an earlier reading that passed checks 1-2; a valid
    # reading after a rejected one at the same instant is a correction, not a duplicate.
    valid = r == OK
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (s[1:] != s[:-1]) | (t[1:] != t[:-1])
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
    valid_before = np.cumsum(valid) - valid  # valid readings strictly before each position
    earlier_valid_in_run = valid_before - valid_before[run_start] > 0
    # Only readings not newer than everything in their series' history can repeat one of its
    # timestamps (the history is in processing order, not necessarily in time order).
    seen_before = np.zeros(n, dtype=bool)
    maybe = np.flatnonzero(t <= history.ts.max(axis=1)[s])
    if len(maybe):
        seen_before[maybe] = np.any(history.ts[s[maybe]] == t[maybe, None], axis=1)
    r[valid & (earlier_valid_in_run | seen_before)] = DUPLICATE

    cand = np.flatnonzero(r == OK)
    cs = s[cand]
    # Extended sequence per series in the batch: W history values, then its candidates in order.
    # cs is sorted (the candidates keep the (series, ts) order): runs, not np.unique's sort.
    first = np.flatnonzero(np.concatenate([[True], cs[1:] != cs[:-1]])) if len(cs) else np.empty(0, np.int64)
    uniq, counts = cs[first], np.diff(np.append(first, len(cs)))
    new_history = History(history.values.copy(), history.ts.copy(), history.offsets.copy())
    if len(cand):
        ext_len = window + counts
        ext_off = np.concatenate([[0], np.cumsum(ext_len)[:-1]])
        total = int(ext_len.sum())
        ext_v = np.empty(total)
        ext_t = np.empty(total, dtype=np.int64)
        ext_o = np.empty(total, dtype=np.int64)
        hist_pos = ext_off[:, None] + np.arange(window)[None, :]
        ext_v[hist_pos] = history.values[uniq]
        ext_t[hist_pos] = history.ts[uniq]
        ext_o[hist_pos] = history.offsets[uniq]
        group = np.repeat(np.arange(len(uniq)), counts)
        rank = np.arange(len(cand)) - first[group]
        pos = ext_off[group] + window + rank
        ext_v[pos] = v[cand]
        ext_t[pos] = t[cand]
        ext_o[pos] = o[cand]
        start = ext_off[group] + rank
        cols = [ext_v[start + j] for j in range(window)]  # the window as W columns of shape (m,)
        med, count = _column_median(cols)
        mad, _ = _column_median([np.abs(col - med) for col in cols])
        scale = np.maximum(1.4826 * np.nan_to_num(mad), spike_floor[cs])
        x = v[cand]
        spike = (count >= 3) & (np.abs(x - med) > k_sigma * scale)
        # Age of the window: the median of (t - its timestamps), i.e. the time since its middle,
        # so a steady trend is measured at its true slope, not at W/2 times it.
        ages = []
        for j in range(window):
            tj = ext_t[start + j]
            empty = tj == _NO_TS
            ages.append(np.where(empty, np.nan, (t[cand] - np.where(empty, t[cand], tj)).astype(np.float64)))
        age, _ = _column_median(ages)
        dt_s = age / 1e9
        has_prev = (count >= 1) & (dt_s > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            too_fast = has_prev & (np.abs(x - med) / np.where(has_prev, dt_s, 1.0) > max_rate_per_s[cs])
        r[cand[spike]] = SPIKE
        r[cand[~spike & too_fast]] = RATE
        # The new history: the last W values of each extended sequence.
        tail = (ext_off + counts)[:, None] + np.arange(window)[None, :]
        new_history.values[uniq] = ext_v[tail]
        new_history.ts[uniq] = ext_t[tail]
        new_history.offsets[uniq] = ext_o[tail]
    reason[order] = r
    return reason, new_history
