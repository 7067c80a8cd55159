"""Cleaning kernel: pure numpy, arrays in, arrays out, no I/O, no clock.

For readings of ``k`` series (one series = one sensor and metric), :func:`clean` returns a
reason code per reading (``OK`` or why it is rejected) and the per-series history carried to
the next batch. Checks, first match wins:

1. ``NON_FINITE``: NaN or ±inf.
2. ``OUT_OF_RANGE``: outside the catalogue's [lo, hi].
3. ``REPEAT``: same series, timestamp and value as an earlier reading (in this batch, in arrival
   order, or in the carried history): the same reading delivered twice (at-least-once), not
   a fault; callers drop it. ``DUPLICATE``: same series and timestamp, another value.
4. ``SPIKE`` (Hampel filter): ``|x - median| > k_sigma * max(1.4826 * MAD, floor)`` over the
   *window*: the ``W`` readings of the series that passed checks 1-3 immediately before it in
   event time, among the carried history and this batch (so a late or out-of-order reading is
   judged against its neighbours in event time, not against the newest readings). Needs at
   least 3 values in the window.
5. ``RATE``: ``|x - median| / dt > max_rate_per_s`` with ``dt`` the median time from the window's
   readings to this one (only when ``dt > 0``): value and time both measured from the window's
   middle, so a steady trend passes at its true slope. Comparing with the median rather than
   the last value keeps a spike from also rejecting the good reading after it.

The window uses readings that passed checks 1-3 (not 4-5), which removes any sequential
dependency: the whole batch is judged in one vectorised pass and the result equals the slow
reference in ``tests/unit/test_kernels.py`` exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt

from portpulse.arrays import group_starts, stable_order, stable_sort

_T = TypeVar("_T", bound=np.generic)

__all__ = [
    "DUPLICATE",
    "HAMPEL_KERNEL",
    "NON_FINITE",
    "NO_OFFSET",
    "OK",
    "OUT_OF_RANGE",
    "RATE",
    "REASON_NAMES",
    "REINSTATED",
    "REPEAT",
    "SPIKE",
    "History",
    "Rejudged",
    "clean",
    "series_time_order",
]  # fmt: skip

OK, NON_FINITE, OUT_OF_RANGE, DUPLICATE, SPIKE, RATE, REPEAT, REINSTATED = range(8)
# REINSTATED marks a stored rejection withdrawn: a reading rejected, then accepted when a reading
# before it in event time arrived later (a store cannot delete one field of a point).
REASON_NAMES = ("ok", "non_finite", "out_of_range", "duplicate", "spike", "rate_of_change", "repeat", "reinstated")
_NO_TS = np.iinfo(np.int64).min
NO_OFFSET = np.iinfo(np.int64).max  # an empty history slot


def _compiled() -> tuple[Callable[..., bool] | None, Callable[..., None] | None]:
    try:
        from portpulse.processors._hampel import earliest_offsets, judge_appended
    except ImportError:  # installed where no C compiler was at hand: numpy judges every batch
        return None, None
    return judge_appended, earliest_offsets


_COMPILED_JUDGE, _COMPILED_EARLIEST = _compiled()
#: what judges checks 4-5 of a batch newer than its history: "compiled" or "numpy" (logged at start-up)
HAMPEL_KERNEL = "numpy" if _COMPILED_JUDGE is None else "compiled"


@dataclass(frozen=True, slots=True)
class History:
    """Per series, the ``H`` newest readings (in event time) that passed checks 1-3, oldest
    first, left-padded.

    ``values``: float64 ``(k, H)``, NaN where empty; ``ts``: int64 ``(k, H)``, int64 min where
    empty; ``offsets``: int64 ``(k, H)``, where each reading came from (the caller's Kafka offset),
    int64 max where empty; ``verdict``: uint8 ``(k, H)``, each reading's verdict so far (``OK``,
    ``SPIKE`` or ``RATE``). A replay that starts at or before a series' smallest offset rebuilds
    its history exactly.
    """

    values: npt.NDArray[np.float64]
    ts: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]
    verdict: npt.NDArray[np.uint8]

    @classmethod
    def empty(cls, series: int, window: int) -> History:
        return cls(
            np.full((series, window), np.nan),
            np.full((series, window), _NO_TS, dtype=np.int64),
            np.full((series, window), NO_OFFSET, dtype=np.int64),
            np.zeros((series, window), dtype=np.uint8),
        )

    def copy(self) -> History:
        return History(self.values.copy(), self.ts.copy(), self.offsets.copy(), self.verdict.copy())

    def grow(self, series: int) -> History:
        """The same history with room for at least ``series`` series (new rows empty). It grows by
        half again at least: a fleet's first minutes add series every batch, and copying every row
        each time would cost more than judging them (more would fill rows that may never be
        used). Each byte of the new arrays is written once."""
        k, w = self.values.shape
        if series <= k:
            return self
        rows = max(series, k + k // 2)

        def grown(old: npt.NDArray[_T], fill: float) -> npt.NDArray[_T]:
            array = np.empty((rows, w), dtype=old.dtype)
            array[:k] = old
            array[k:] = fill
            return array

        return History(grown(self.values, np.nan), grown(self.ts, _NO_TS), grown(self.offsets, NO_OFFSET),
                       grown(self.verdict, 0))  # fmt: skip

    def merge(
        self,
        series: npt.NDArray[np.int64],
        ts: npt.NDArray[np.int64],
        values: npt.NDArray[np.float64],
        offsets: npt.NDArray[np.int64],
        verdict: npt.NDArray[np.uint8],
    ) -> History:
        """The same history with readings ``(m,)`` of ``series`` added where they are among their
        series' ``H`` newest (readings judged apart from the batch they came in); a reading it
        holds already (same series and time) takes the given verdict."""
        if not len(series):
            return self
        out = self.copy()
        h = self.values.shape[1]
        for sid in np.unique(series).tolist():
            mine = series == sid
            held = np.isin(out.ts[sid], ts[mine])
            if held.any():  # re-judged readings: keep one copy, with the new verdict
                again = np.isin(ts[mine], out.ts[sid])
                lookup = dict(zip(ts[mine][again].tolist(), verdict[mine][again].tolist(), strict=True))
                out.verdict[sid, held] = [lookup[t] for t in out.ts[sid, held].tolist()]
                mine = mine.copy()
                mine[np.flatnonzero(mine)[again]] = False
            t = np.concatenate([out.ts[sid], ts[mine]])
            order = np.argsort(t, kind="stable")[-h:]
            out.ts[sid] = t[order]
            out.values[sid] = np.concatenate([out.values[sid], values[mine]])[order]
            out.offsets[sid] = np.concatenate([out.offsets[sid], offsets[mine]])[order]
            out.verdict[sid] = np.concatenate([out.verdict[sid], verdict[mine]])[order]
        return out

    def append(
        self,
        series: npt.NDArray[np.int64],
        counts: npt.NDArray[np.int64],
        readings: tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint8]],
    ) -> None:
        """Append, in place, readings newer than everything their series holds: ``series`` ``(g,)``
        distinct, ``counts`` ``(g,)`` readings each; ``readings``: values, ts, offsets and
        verdicts ``(sum(counts),)``, grouped by series in that order, each group in time order.
        Every row keeps its ``H`` newest.

        Rows are moved whole, a group of equal counts at a time: a fleet's series mostly bring
        the same number of readings per batch."""
        h = self.values.shape[1]
        first = np.cumsum(counts) - counts
        columns: tuple[npt.NDArray[Any], ...] = (self.values, self.ts, self.offsets, self.verdict)
        added: tuple[npt.NDArray[Any], ...] = readings
        equal = len(counts) and counts.min() == counts.max()
        for c in [int(counts[0])] if equal else np.unique(counts).tolist():
            group = np.flatnonzero(counts == c)
            rows = series[group]
            newest = first[group][:, None] + np.arange(max(c - h, 0), c)[None, :]  # (len(group), min(c, h))
            # One reading for each series in the call: the readings line up with the rows.
            every_one = c == 1 and len(group) == len(readings[0])
            for array, new in zip(columns, added, strict=True):
                if c < h:
                    # Two narrower moves beat joining a new row block: the gather on the right is a
                    # copy, so the overlap is safe.
                    array[rows, : h - c] = array[rows, c:]
                    if every_one:
                        array[rows, h - 1] = new
                    else:
                        array[rows, h - c :] = new[newest]
                else:
                    array[rows] = new[newest]

    def earliest_offset(self, series: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The smallest offset each of ``series`` ``(n,)`` holds (``NO_OFFSET`` for an empty
        history): where a replay must start to rebuild it."""
        if _COMPILED_EARLIEST is None:
            return self.offsets[series].min(axis=1)  # type: ignore[no-any-return]
        out = np.empty(len(series), dtype=np.int64)
        _COMPILED_EARLIEST(self.offsets, np.ascontiguousarray(series, dtype=np.int64), out)
        return out

    def forget(self, series: npt.NDArray[np.bool_]) -> History:
        """The same history with the series where ``series`` (bool, one per series id: at most as
        many as the history has rows) is true emptied."""
        out = self.copy()
        rows = np.flatnonzero(series)
        out.values[rows], out.ts[rows], out.offsets[rows], out.verdict[rows] = np.nan, _NO_TS, NO_OFFSET, OK
        return out


@dataclass(frozen=True, slots=True)
class Rejudged:
    """Readings judged before whose verdict changed because a reading before them in event time
    arrived later (their Hampel window changed): series, ts_ns, value, offset and the new
    verdict, all ``(m,)``."""

    series: npt.NDArray[np.int64]
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    offset: npt.NDArray[np.int64]
    verdict: npt.NDArray[np.uint8]

    def __len__(self) -> int:
        return len(self.series)

    @staticmethod
    def none() -> Rejudged:
        e = np.empty(0, dtype=np.int64)
        return Rejudged(e, e, np.empty(0), e, np.empty(0, dtype=np.uint8))


# An optimal 16-comparator sorting network for 7 inputs (Knuth, TAOCP 5.3.4): sorting a
# window column-wise with np.minimum/np.maximum is ~10x faster than np.sort on (m, 7) rows.
_NETWORK_7 = (
    (0, 6), (2, 3), (4, 5), (0, 2), (1, 4), (3, 6), (0, 1), (2, 5),
    (3, 4), (1, 2), (4, 6), (2, 3), (4, 5), (1, 2), (3, 4), (5, 6),
)  # fmt: skip


@functools.cache
def _sorting_network(w: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, that sort ``w`` values: the optimal one for 7, else Batcher's
    odd-even merge sort for the next power of two without the comparators that touch padding
    wires (padding with +inf, they never exchange anything)."""
    if w == 7:
        return _NETWORK_7
    size = 1 << max(w - 1, 1).bit_length()
    pairs: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((a, b) for a, b in pairs if b < w)


@functools.cache
def _median_network(w: int) -> tuple[tuple[int, int, bool, bool], ...]:
    """The sorting network pruned to what the middle output(s) need: (i, j, need min, need max).

    For 7 inputs: 22 min/max operations instead of 32."""
    live = {(w - 1) // 2, w // 2}
    ops: list[tuple[int, int, bool, bool]] = []
    for i, j in reversed(_sorting_network(w)):
        need_lo, need_hi = i in live, j in live
        if need_lo or need_hi:
            ops.append((i, j, need_lo, need_hi))
            live |= {i, j}
    return tuple(reversed(ops))


def _sort_columns(cols: list[npt.NDArray[np.float64]]) -> list[npt.NDArray[np.float64]]:
    """Sort each row of a window given as W columns of shape ``(m,)`` (no NaN; +inf sorts last)."""
    c = list(cols)
    for i, j in _sorting_network(len(c)):
        c[i], c[j] = np.minimum(c[i], c[j]), np.maximum(c[i], c[j])
    return c


def _full_median(cols: list[npt.NDArray[np.float64]], owned: bool = False) -> npt.NDArray[np.float64]:
    """Median of each row of a window given as W columns, every value present (no NaN).

    Works in place on the columns when ``owned`` (the caller's scratch), else on copies: the
    network then allocates nothing per comparator.
    """
    c = list(cols) if owned else [col.copy() for col in cols]
    spare = np.empty_like(c[0])
    for i, j, need_lo, need_hi in _median_network(len(c)):
        a, b = c[i], c[j]
        if need_lo and need_hi:
            np.maximum(a, b, out=spare)
            np.minimum(a, b, out=a)
            c[j], spare = spare, b
        elif need_lo:
            np.minimum(a, b, out=a)
        else:
            np.maximum(a, b, out=b)
    w = len(c)
    if w % 2:
        return c[w // 2]
    return (c[w // 2 - 1] + c[w // 2]) / 2


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


def _in_series_time_order(series: npt.NDArray[np.int64], ts_ns: npt.NDArray[np.int64]) -> bool:
    same = series[1:] == series[:-1]
    return bool(np.all((series[1:] > series[:-1]) | (same & (ts_ns[1:] >= ts_ns[:-1]))))


def series_time_order(
    series: npt.NDArray[np.int64], ts_ns: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Stable order by (series, ts) of readings ``(n,)``, and ``series`` and ``ts_ns`` in that
    order: by series alone when each series already arrived in time order (the usual case), else
    by ts then series (two stable passes)."""
    order, s = stable_sort(series)
    t = ts_ns[order]
    if bool(np.all((t[1:] >= t[:-1]) | (s[1:] != s[:-1]))):
        return order, s, t
    by_time = stable_order(ts_ns)
    by_series, s = stable_sort(series[by_time])
    order = by_time[by_series]
    return order, s, ts_ns[order]


#: Rows per step of the window statistics: their columns stay in the core's cache.
_STATS_CHUNK = 8192


def _verdict(
    x: npt.NDArray[np.float64],
    med: npt.NDArray[np.float64],
    mad: npt.NDArray[np.float64],
    age_ns: npt.NDArray[np.float64],
    count: npt.NDArray[np.int64] | int,
    floor: npt.NDArray[np.float64],
    max_rate: npt.NDArray[np.float64],
    k_sigma: float,
) -> npt.NDArray[np.uint8]:
    """Checks 4 and 5 for values ``x`` against their windows' median, MAD, median age (ns) and count."""
    dev = np.abs(x - med)
    full = isinstance(count, int)  # every window holds `count` values (none empty): no NaN MAD
    scale = np.maximum(1.4826 * (mad if full else np.nan_to_num(mad)), floor)
    spike = dev > k_sigma * scale
    if not full or count < 3:
        spike &= count >= 3
    dt_s = age_ns / 1e9
    has_prev = dt_s > 0
    if not full or count < 1:
        has_prev &= count >= 1
    with np.errstate(divide="ignore", invalid="ignore"):
        too_fast = has_prev & (dev / np.where(has_prev, dt_s, 1.0) > max_rate)
    out = np.where(spike, np.uint8(SPIKE), np.uint8(OK))
    out[~spike & too_fast] = RATE
    return out


def _judge_windows(
    values: npt.NDArray[np.float64],
    times: npt.NDArray[np.int64],
    series_of: npt.NDArray[np.int64],
    pos: npt.NDArray[np.int64],
    w: int,
    floor: npt.NDArray[np.float64],
    max_rate: npt.NDArray[np.float64],
    k_sigma: float,
) -> npt.NDArray[np.uint8]:
    """Verdict (OK, SPIKE or RATE) for the value at each position ``p`` in ``pos`` ``(m,)``
    against its window ``values[p - w : p]``; a NaN value / ``_NO_TS`` time marks an empty slot;
    ``series_of`` is the series of each position (indexing ``floor`` and ``max_rate``).

    Windows that are full and in time order (all but a series' first readings in most batches)
    take the fast path, :func:`_judge_full_windows`, in cache-sized chunks; the others take the
    general NaN-aware path, :func:`_judge_any_windows`. When most positions are asked for (many
    readings per series), every window is judged from contiguous slices ("dense") and the
    verdicts picked afterwards, which saves a gather per column.
    """
    seq = _Sequence(values, times, series_of, w, floor, max_rate, k_sigma)
    m, total = len(pos), len(values)
    # Prefix counts answer "is this window full / in time order" in O(1) per window.
    empty_before = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(np.isnan(values), out=empty_before[1:])
    back_before = np.zeros(total + 1, dtype=np.int64)  # back_before[x]: q in [1, x) with t[q] < t[q-1]
    np.cumsum(times[1:] < times[:-1], out=back_before[2:])
    dense = total - w <= 2 * m
    n_windows = total - w if dense else m
    verdict = np.empty(n_windows, dtype=np.uint8)
    fast = np.empty(n_windows, dtype=bool)
    for a in range(0, n_windows, _STATS_CHUNK):
        b = min(a + _STATS_CHUNK, n_windows)
        starts: slice | npt.NDArray[np.int64] = slice(a, b) if dense else pos[a:b] - w
        fast[a:b] = (_slot(empty_before, w, starts) == _slot(empty_before, 0, starts)) & (
            _slot(back_before, w, starts) == _slot(back_before, 1, starts)
        )
        verdict[a:b] = _judge_full_windows(seq, starts)
    if dense:
        verdict, fast = verdict[pos - w], fast[pos - w]
    slow = np.flatnonzero(~fast)
    if len(slow):
        # A series' first readings: a window in time order whose empty slots (the oldest time
        # there is) therefore all come first is a full window of its ``c`` filled slots (none
        # filled: nothing to judge against, OK), judged by size like the full ones.
        start = pos[slow] - w
        empty = empty_before[start + w] - empty_before[start]
        prefix = back_before[start + w] == back_before[start + 1]
        for c in range(w):
            of_size = prefix & (empty == w - c)
            if not of_size.any():
                continue
            rows = slow[of_size]
            verdict[rows] = OK if c == 0 else _judge_full_windows(seq._replace(w=c), pos[rows] - c)
        slow = slow[~prefix]
    if len(slow):
        verdict[slow] = _judge_any_windows(seq, pos[slow])
    return verdict


def _slot(array: npt.NDArray[_T], slot: int, starts: slice | npt.NDArray[np.int64]) -> npt.NDArray[_T]:
    """``array[start + slot]`` for each window start: a view for a contiguous run of starts
    (a slice), a gather for scattered ones."""
    if isinstance(starts, slice):
        return array[starts.start + slot : starts.stop + slot]
    return array[starts + slot]


class _Sequence(NamedTuple):
    """What :func:`_judge_windows` judges over: values, times and the series of each position
    ``(total,)``, the window size ``w``, and the per-series thresholds (indexed by series)."""

    values: npt.NDArray[np.float64]
    times: npt.NDArray[np.int64]
    series_of: npt.NDArray[np.int64]
    w: int
    floor: npt.NDArray[np.float64]
    max_rate: npt.NDArray[np.float64]
    k_sigma: float


def _judge_full_windows(seq: _Sequence, starts: slice | npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """:func:`_verdict` for windows assumed full and in time order (the caller discards the
    others): a pruned median network over the columns, and the age median read off the middle
    slot(s), since in time order the ages fall with the slot."""
    values, times, series_of, w, floor, max_rate, k_sigma = seq
    cols = [_slot(values, j, starts) for j in range(w)]
    x, t, series = _slot(values, w, starts), _slot(times, w, starts), _slot(series_of, w, starts)
    med = _full_median(cols)
    age = (t - _slot(times, w - 1 - (w - 1) // 2, starts)).astype(np.float64)
    if w % 2 == 0:
        age = (age + (t - _slot(times, w - 1 - w // 2, starts)).astype(np.float64)) / 2
    # Checks 4 and 5 of _verdict: the rate check on every window; the spike check only where the
    # value is further than k x floor from the median (the scale is at least the floor), so the
    # MAD, a second median network, is needed for those rows alone.
    dev_x = np.abs(x - med)
    with np.errstate(divide="ignore", invalid="ignore"):
        too_fast = dev_x / (age / 1e9) > max_rate[series]
    too_fast &= age > 0
    out = np.where(too_fast, np.uint8(RATE), np.uint8(OK))
    chunk_floor = floor[series]
    need = np.flatnonzero(dev_x > k_sigma * chunk_floor) if w >= 3 else np.empty(0, np.int64)
    if len(need):
        around = med[need]
        mad = _full_median([np.abs(col[need] - around) for col in cols], owned=True)
        scale = np.maximum(1.4826 * mad, chunk_floor[need])
        out[need[dev_x[need] > k_sigma * scale]] = SPIKE
    return out


def _judge_any_windows(seq: _Sequence, pos: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """:func:`_verdict` for windows with empty slots or out of time order: NaN-aware medians of
    the values, their deviations and the ages."""
    values, times, series_of, w, floor, max_rate, k_sigma = seq
    start = pos - w
    cols = [values[start + j] for j in range(w)]
    med, count = _column_median(cols)
    mad = _column_median([np.abs(col - med) for col in cols])[0]
    t = times[pos]
    ages = []
    for j in range(w):
        tj = times[start + j]
        empty = tj == _NO_TS
        ages.append(np.where(empty, np.nan, (t - np.where(empty, t, tj)).astype(np.float64)))
    age = _column_median(ages)[0]
    series = series_of[pos]
    return _verdict(values[pos], med, mad, age, count, floor[series], max_rate[series], k_sigma)


@dataclass(frozen=True, slots=True)
class _Ext:
    """Per series of a batch, its history and candidates as one sequence in event time: values,
    ts, offsets and verdicts (candidates' are placeholders) ``(total,)``; each sequence's start
    and length ``(g,)``; every candidate's position ``(m,)``; whether the sequences are the
    history then the candidates (no candidate older than its series' history). In that case the
    sequences hold only the last ``window`` readings of the history, and no offsets or verdicts
    (empty arrays): judging needs no more, and the history is appended to directly."""

    v: npt.NDArray[np.float64]
    t: npt.NDArray[np.int64]
    o: npt.NDArray[np.int64]
    d: npt.NDArray[np.uint8]
    off: npt.NDArray[np.int64]
    length: npt.NDArray[np.int64]
    pos: npt.NDArray[np.int64]
    in_order: bool


def _extended(
    history: History,
    uniq: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    v: npt.NDArray[np.float64],
    t: npt.NDArray[np.int64],
    o: npt.NDArray[np.int64],
    cand: npt.NDArray[np.int64],
    every: bool,
    window: int,
    in_order: bool,
) -> _Ext:
    """Per series of the batch (``uniq``, with ``counts`` candidates each), one sequence of its
    history and its candidates in event-time order; returns values, ts, offsets, each sequence's
    start and length, and the position of every candidate (in candidate order).

    When every candidate is newer than its series' history (``in_order``, the usual batch) the
    sequence is the last ``window`` readings of the history then the candidates. Otherwise
    ``window`` empty slots go first, so the window before any position stays inside its own
    sequence, and each sequence is sorted by time.
    """
    cv, ct, co = (v, t, o) if every else (v[cand], t[cand], o[cand])
    first = np.cumsum(counts) - counts
    if in_order:
        return _history_then_candidates(history, uniq, counts, cv, ct, first, window)
    kept = history.values.shape[1]
    hist_t = history.ts[uniq]
    pad = window
    ext_len = pad + kept + counts
    ext_off = np.concatenate([[0], np.cumsum(ext_len)[:-1]])
    total = int(ext_len.sum())
    ext_v = np.full(total, np.nan)
    ext_t = np.full(total, _NO_TS, dtype=np.int64)
    ext_o = np.full(total, NO_OFFSET, dtype=np.int64)
    ext_d = np.zeros(total, dtype=np.uint8)
    hist_pos = (ext_off + pad)[:, None] + np.arange(kept)[None, :]
    ext_v[hist_pos] = history.values[uniq]
    ext_t[hist_pos] = hist_t
    ext_o[hist_pos] = history.offsets[uniq]
    ext_d[hist_pos] = history.verdict[uniq]
    # Candidate i of series group g follows its group's pad and history block.
    pos = np.arange(len(cv), dtype=np.int64)
    pos += np.repeat(ext_off + pad + kept - first, counts)
    ext_v[pos], ext_t[pos], ext_o[pos] = cv, ct, co
    group = np.repeat(np.arange(len(uniq), dtype=np.int64), ext_len)
    order = np.lexsort((ext_t, group))  # empty slots (int64 min) first in each group
    where = np.empty(total, dtype=np.int64)
    where[order] = np.arange(total, dtype=np.int64)
    return _Ext(ext_v[order], ext_t[order], ext_o[order], ext_d[order], ext_off, ext_len, where[pos], False)


def _history_then_candidates(
    history: History,
    uniq: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    cv: npt.NDArray[np.float64],
    ct: npt.NDArray[np.int64],
    first: npt.NDArray[np.int64],
    window: int,
) -> _Ext:
    """:func:`_extended` when every candidate is newer than its series' history: per series its
    last ``window`` history values and times (whole rows, moved at once) then its candidates."""
    ext_len = window + counts
    ext_off = np.cumsum(ext_len) - ext_len
    none = np.empty(0, dtype=np.int64)
    if len(counts) and counts.min() == counts.max():
        # Every series brings as many candidates (a fleet's batch): the sequences are the rows of
        # one (series, window + count) matrix, filled by two block copies per column.
        c = int(counts[0])
        v_rows, t_rows = np.empty((len(uniq), window + c)), np.empty((len(uniq), window + c), dtype=np.int64)
        v_rows[:, :window], t_rows[:, :window] = history.values[uniq, -window:], history.ts[uniq, -window:]
        v_rows[:, window:], t_rows[:, window:] = cv.reshape(-1, c), ct.reshape(-1, c)
        pos = ((ext_off + window)[:, None] + np.arange(c)[None, :]).reshape(-1)
        return _Ext(v_rows.reshape(-1), t_rows.reshape(-1), none, none.astype(np.uint8), ext_off, ext_len, pos, True)
    total = int(ext_len.sum())
    ext_v = np.empty(total)
    ext_t = np.empty(total, dtype=np.int64)
    hist_pos = ext_off[:, None] + np.arange(window)[None, :]
    ext_v[hist_pos] = history.values[uniq, -window:]
    ext_t[hist_pos] = history.ts[uniq, -window:]
    pos = np.arange(len(cv), dtype=np.int64)
    pos += np.repeat(ext_off + window - first, counts)
    ext_v[pos], ext_t[pos] = cv, ct
    return _Ext(ext_v, ext_t, none, none.astype(np.uint8), ext_off, ext_len, pos, True)


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
    window: int | None = None,
) -> tuple[npt.NDArray[np.uint8], History, Rejudged]:
    """Judge ``n`` readings.

    ``series``, ``ts_ns`` (ns), ``value``: shape ``(n,)``, in arrival order; ``lo``, ``hi``,
    ``max_rate_per_s``, ``spike_floor``: per-series limits, shape ``(k,)`` (use -inf/inf/inf/0
    for metrics the catalogue does not know); ``history``: ``(k, H)`` from the previous batch
    (the H newest readings that passed checks 1-3); ``window``: the Hampel window W <= H (default
    H). ``offset``: where each reading came from ``(n,)`` (kept in the history; zeros when
    omitted). Returns the reason code per reading (uint8 ``(n,)``, input order) and the new
    history: ``history`` itself, its rows of this batch's series updated in place (copying every
    series' rows each batch cost more than the judging); and the readings of the history whose
    verdict changed because a reading of this batch is among the W before them in event time
    (:class:`Rejudged`): verdicts depend on the set of readings, not on their arrival order.
    """
    n = len(series)
    kept = history.values.shape[1]
    window = kept if window is None else window
    reason = np.zeros(n, dtype=np.uint8)
    if n == 0:
        return reason, history, Rejudged.none()
    # Callers that keep their batch in (series, ts) order (the engine does) skip the permutation.
    presorted = _in_series_time_order(series, ts_ns)
    if presorted:
        order = np.arange(n, dtype=np.int64)
        s, t, v = series, ts_ns, value
        o = np.zeros(n, dtype=np.int64) if offset is None else offset
    else:
        order, s, t = series_time_order(series, ts_ns)
        v = value[order]
        o = np.zeros(n, dtype=np.int64) if offset is None else offset[order]
    r = np.zeros(n, dtype=np.uint8)

    finite = np.isfinite(v)
    r[~finite] = NON_FINITE
    in_range = (v >= lo[s]) & (v <= hi[s])
    r[finite & ~in_range] = OUT_OF_RANGE
    # A duplicate repeats the (series, ts) of an earlier reading that passed checks 1-2; a valid
    # reading after a rejected one at the same instant is a correction, not a duplicate. With
    # the same value too it is a repeat (the same reading delivered again).
    valid = r == OK
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = (s[1:] != s[:-1]) | (t[1:] != t[:-1])
    if new_run.all():  # no two readings of a series at one instant (the usual batch)
        repeat, duplicate = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    else:
        run_start = np.maximum.accumulate(np.where(new_run, np.arange(n), 0))
        valid_before = np.cumsum(valid) - valid  # valid readings strictly before each position
        earlier_valid_in_run = valid_before - valid_before[run_start] > 0
        # The first valid reading of each run: what later ones in the run are compared with.
        first_valid = np.where(valid, np.arange(n), n)
        first_valid = np.minimum.reduceat(first_valid, np.flatnonzero(new_run))[np.cumsum(new_run) - 1]
        same_as_first = v == v[np.minimum(first_valid, n - 1)]
        repeat = valid & earlier_valid_in_run & same_as_first
        duplicate = valid & earlier_valid_in_run & ~same_as_first
    # Only readings not newer than everything in their series' history can repeat one of its
    # timestamps; where one does, the history's reading is the one kept.
    maybe = np.flatnonzero(valid & (t <= history.ts[s, -1]))  # the newest is the last slot
    if len(maybe):
        hit = history.ts[s[maybe]] == t[maybe, None]
        seen = hit.any(axis=1)
        same = (hit & (history.values[s[maybe]] == v[maybe, None])).any(axis=1)
        repeat[maybe[seen]] = same[seen]
        duplicate[maybe[seen]] = ~same[seen]
    r[duplicate] = DUPLICATE
    r[repeat] = REPEAT

    cand = np.flatnonzero(r == OK)
    cs = s[cand]
    # Extended sequence per series in the batch: W history values, then its candidates in order.
    # cs is sorted (the candidates keep the (series, ts) order): runs, not np.unique's sort.
    first = group_starts(cs)
    uniq, counts = cs[first], np.diff(np.append(first, len(cs)))
    new_history = history  # updated in place: the caller hands its history on
    rejudged = Rejudged.none()
    if len(cand):
        judge = functools.partial(_judge_candidates, history, r, v, t, o, window, spike_floor, max_rate_per_s, k_sigma)
        # Series whose candidates are all newer than their history (the usual case) take the
        # short path; one late reading sends only its own series down the long one.
        newer = t[cand[first]] > history.ts[uniq, -1]
        if newer.all() or not newer.any():
            rejudged = judge(uniq, counts, cand, len(cand) == n, bool(newer[0]))
        else:
            judge(uniq[newer], counts[newer], cand[np.repeat(newer, counts)], False, True)
            rejudged = judge(uniq[~newer], counts[~newer], cand[np.repeat(~newer, counts)], False, False)
    if presorted:
        return r, new_history, rejudged
    reason[order] = r
    return reason, new_history, rejudged


def _judge_candidates(
    history: History,
    r: npt.NDArray[np.uint8],
    v: npt.NDArray[np.float64],
    t: npt.NDArray[np.int64],
    o: npt.NDArray[np.int64],
    window: int,
    spike_floor: npt.NDArray[np.float64],
    max_rate: npt.NDArray[np.float64],
    k_sigma: float,
    uniq: npt.NDArray[np.int64],
    counts: npt.NDArray[np.int64],
    cand: npt.NDArray[np.int64],
    every: bool,
    in_order: bool,
) -> Rejudged:
    """Checks 4-5 for the candidates ``cand`` (rows of ``v``, ``t``, ``o`` in (series, ts) order;
    ``every``: all rows) of series ``uniq`` with ``counts`` each (``in_order``: all newer than
    their series' history): their verdicts into ``r``, the history updated in place; returns the
    history's readings whose verdict changed."""
    kept = history.values.shape[1]
    if in_order and _COMPILED_JUDGE is not None:
        # One C pass judges each candidate against the readings before it and appends them to
        # the history; it declines (changing nothing) a window out of time order.
        cv, ct, co = (v, t, o) if every else (v[cand], t[cand], o[cand])
        verdict = np.empty(len(cv), dtype=np.uint8)
        limits = np.ascontiguousarray(spike_floor, np.float64), np.ascontiguousarray(max_rate, np.float64)
        if _COMPILED_JUDGE(history.values, history.ts, history.offsets, history.verdict, uniq, counts,
                           cv, ct, co, *limits, k_sigma, window, verdict):  # fmt: skip
            r[cand] = verdict
            return Rejudged.none()
    ext = _extended(history, uniq, counts, v, t, o, cand, every, window, in_order)
    ext_series = np.repeat(uniq, ext.length)
    verdict = _judge_windows(ext.v, ext.t, ext_series, ext.pos, window, spike_floor, max_rate, k_sigma)
    r[cand] = verdict
    if ext.in_order:
        history.append(uniq, counts, (v, t, o, verdict) if every else (v[cand], t[cand], o[cand], verdict))
        return Rejudged.none()
    ext.d[ext.pos] = verdict
    rejudged = _rejudge(ext, ext_series, window, spike_floor, max_rate, k_sigma)
    # The new history: the last H values of each extended sequence (the newest in event time).
    tail = (ext.off + ext.length - kept)[:, None] + np.arange(kept)[None, :]
    history.values[uniq] = ext.v[tail]
    history.ts[uniq] = ext.t[tail]
    history.offsets[uniq] = ext.o[tail]
    history.verdict[uniq] = ext.d[tail]
    return rejudged


def _rejudge(
    ext: _Ext,
    ext_series: npt.NDArray[np.int64],
    window: int,
    spike_floor: npt.NDArray[np.float64],
    max_rate: npt.NDArray[np.float64],
    k_sigma: float,
) -> Rejudged:
    """Judge again the history's readings that have a candidate among the ``window`` readings
    before them (their window changed); those whose verdict changed, with it (``ext.d`` is
    updated)."""
    total = len(ext.v)
    is_cand = np.zeros(total, dtype=bool)
    is_cand[ext.pos] = True
    before = np.zeros(total + 1, dtype=np.int64)
    np.cumsum(is_cand, out=before[1:])
    q = np.arange(total)
    # Sequences start with `window` empty slots here, so a window never reaches the previous one.
    affected = ~is_cand & (ext.t != _NO_TS) & (before[q] - before[np.maximum(q - window, 0)] > 0)
    again = np.flatnonzero(affected)
    if not len(again):
        return Rejudged.none()
    new = _judge_windows(ext.v, ext.t, ext_series, again, window, spike_floor, max_rate, k_sigma)
    changed = again[new != ext.d[again]]
    ext.d[again] = new
    return Rejudged(ext_series[changed], ext.t[changed], ext.v[changed], ext.o[changed], ext.d[changed])
