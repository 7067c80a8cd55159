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
5. ``RATE``: ``|x - median| / dt > max_rate_per_s`` with ``dt`` the time since the newest
   window value (only when ``dt > 0``). Comparing with the median rather than the last value
   keeps a spike from also rejecting the good reading after it.

The window uses readings that passed checks 1-3 (not 4-5), which removes any sequential
dependency: the whole batch is judged in one vectorised pass and the result equals the slow
reference in ``tests/unit/test_kernels.py`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["DUPLICATE", "NON_FINITE", "OK", "OUT_OF_RANGE", "RATE", "REASON_NAMES", "SPIKE", "History", "clean"]

OK, NON_FINITE, OUT_OF_RANGE, DUPLICATE, SPIKE, RATE = range(6)
REASON_NAMES = ("ok", "non_finite", "out_of_range", "duplicate", "spike", "rate_of_change")
_NO_TS = np.iinfo(np.int64).min


@dataclass(frozen=True, slots=True)
class History:
    """Per series, the last ``W`` readings that passed checks 1-3, oldest first, left-padded.

    ``values``: float64 ``(k, W)``, NaN where empty; ``ts``: int64 ``(k, W)``, int64 min where empty.
    """

    values: npt.NDArray[np.float64]
    ts: npt.NDArray[np.int64]

    @classmethod
    def empty(cls, series: int, window: int) -> History:
        return cls(np.full((series, window), np.nan), np.full((series, window), _NO_TS, dtype=np.int64))

    def grow(self, series: int) -> History:
        """The same history with room for ``series`` series (new ones empty)."""
        k, w = self.values.shape
        if series <= k:
            return self
        more = History.empty(series - k, w)
        return History(np.vstack([self.values, more.values]), np.vstack([self.ts, more.ts]))


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
) -> tuple[npt.NDArray[np.uint8], History]:
    """Judge ``n`` readings.

    ``series``, ``ts_ns`` (ns), ``value``: shape ``(n,)``, in arrival order; ``lo``, ``hi``,
    ``max_rate_per_s``, ``spike_floor``: per-series limits, shape ``(k,)`` (use -inf/inf/inf/0
    for metrics the catalogue does not know); ``history``: ``(k, W)`` from the previous batch.
    Returns the reason code per reading (uint8 ``(n,)``, input order) and the new history.
    """
    n = len(series)
    window = history.values.shape[1]
    reason = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return reason, history
    order = np.lexsort((np.arange(n), ts_ns, series))
    s, t, v = series[order], ts_ns[order], value[order]
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
    seen_before = np.any(history.ts[s] == t[:, None], axis=1)
    r[valid & (earlier_valid_in_run | seen_before)] = DUPLICATE

    cand = np.flatnonzero(r == OK)
    cs = s[cand]
    # Extended sequence per series in the batch: W history values, then its candidates in order.
    uniq, first, counts = np.unique(cs, return_index=True, return_counts=True)
    new_history = History(history.values.copy(), history.ts.copy())
    if len(cand):
        ext_len = window + counts
        ext_off = np.concatenate([[0], np.cumsum(ext_len)[:-1]])
        total = int(ext_len.sum())
        ext_v = np.empty(total)
        ext_t = np.empty(total, dtype=np.int64)
        hist_pos = ext_off[:, None] + np.arange(window)[None, :]
        ext_v[hist_pos] = history.values[uniq]
        ext_t[hist_pos] = history.ts[uniq]
        group = np.repeat(np.arange(len(uniq)), counts)
        rank = np.arange(len(cand)) - first[group]
        pos = ext_off[group] + window + rank
        ext_v[pos] = v[cand]
        ext_t[pos] = t[cand]
        win = (ext_off[group] + rank)[:, None] + np.arange(window)[None, :]
        win_v = ext_v[win]
        med, count = _row_median(win_v)
        mad, _ = _row_median(np.abs(win_v - med[:, None]))
        scale = np.maximum(1.4826 * np.nan_to_num(mad), spike_floor[cs])
        x = v[cand]
        spike = (count >= 3) & (np.abs(x - med) > k_sigma * scale)
        newest_t = ext_t[win[:, -1]]
        dt_s = (t[cand] - newest_t) / 1e9
        has_prev = (count >= 1) & (newest_t != _NO_TS) & (dt_s > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            too_fast = has_prev & (np.abs(x - med) / np.where(has_prev, dt_s, 1.0) > max_rate_per_s[cs])
        r[cand[spike]] = SPIKE
        r[cand[~spike & too_fast]] = RATE
        # The new history: the last W values of each extended sequence.
        tail = (ext_off + counts)[:, None] + np.arange(window)[None, :]
        new_history.values[uniq] = ext_v[tail]
        new_history.ts[uniq] = ext_t[tail]
    reason[order] = r
    return reason, new_history
