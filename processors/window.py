"""Event-time window kernels: pure numpy, and a compiled aggregation of in-order rows.

A window spec (size, step) gives tumbling (step == size) or hopping (step < size) windows
aligned to the Unix epoch. :func:`assign` maps readings to the windows that contain them;
:func:`aggregate` reduces rows grouped by an integer key in one sorted pass.

Aggregates per key over accepted values: ``count``, ``mean``, ``min``, ``max``, ``last`` (value
with the greatest timestamp), ``stddev`` (population, ddof=0), ``p95`` (exact, linear
interpolation between closest ranks like ``numpy.percentile``), and ``rejected`` (distinct
timestamps of rows flagged by cleaning, kept out of the other aggregates). Like the store they
mirror (InfluxDB keeps one point per series and time), a key counts one accepted value per
timestamp: the later row of equal (key, ts) replaces the earlier.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from portpulse.arrays import code_groups, group_starts, stable_order

__all__ = [
    "AGGREGATE_KERNEL",
    "Aggregates",
    "ClosedBuckets",
    "ClosedRows",
    "OpenWindows",
    "WindowSpec",
    "aggregate",
    "assign",
    "concat_rows",
    "duration_ns",
    "parse_windows",
]

_UNITS = {"s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9, "d": 86_400 * 10**9}


def _compiled() -> Callable[..., tuple[int, bytearray, bytearray] | None] | None:
    try:
        from portpulse.processors._windows import aggregate_in_order
    except ImportError:  # installed where no C compiler was at hand: numpy aggregates every window
        return None
    return aggregate_in_order


_COMPILED_AGGREGATE = _compiled()
#: what aggregates closing windows of in-order rows: "compiled" or "numpy" (logged at start-up)
AGGREGATE_KERNEL = "numpy" if _COMPILED_AGGREGATE is None else "compiled"


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """Windows of ``size_ns`` every ``step_ns``; ``name`` suffixes the measurement (``air_1m``)."""

    name: str
    size_ns: int
    step_ns: int

    def __post_init__(self) -> None:
        if self.size_ns <= 0 or self.step_ns <= 0 or self.size_ns % self.step_ns:
            raise ValueError(f"window {self.name}: size must be a positive multiple of the step")


def parse_windows(text: str) -> tuple[WindowSpec, ...]:
    """``"10s,1m,15m"`` (tumbling) or ``"5m/1m"`` (5-minute windows every minute)."""
    specs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        size_txt, _, step_txt = part.partition("/")
        size, step = duration_ns(size_txt), duration_ns(step_txt) if step_txt else duration_ns(size_txt)
        specs.append(WindowSpec(size_txt if not step_txt else f"{size_txt}_{step_txt}", size, step))
    return tuple(specs)


def duration_ns(text: str) -> int:
    """``"10s"``, ``"15m"``, ``"1h"`` or ``"7d"`` in ns; ValueError for anything else."""
    m = re.fullmatch(r"(\d+)([smhd])", text)
    if not m:
        raise ValueError(f"not a duration like 10s, 15m, 1h or 7d: {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2)]


def assign(ts_ns: npt.NDArray[np.int64], spec: WindowSpec) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Every (row, window start) pair with the row's timestamp in [start, start + size).

    Returns the row indices and window starts (ns), both of shape ``(n * size / step,)``.
    """
    per_row = spec.size_ns // spec.step_ns
    last_start = (ts_ns // spec.step_ns) * spec.step_ns
    if per_row == 1:  # tumbling: one window per row
        return np.arange(len(ts_ns), dtype=np.int64), last_start
    rows = np.repeat(np.arange(len(ts_ns), dtype=np.int64), per_row)
    back = np.tile(np.arange(per_row, dtype=np.int64), len(ts_ns)) * spec.step_ns
    return rows, last_start[rows] - back


@dataclass(frozen=True, slots=True)
class Aggregates:
    """One row per distinct key, keys ascending; float fields are NaN when ``count`` is 0."""

    key: npt.NDArray[np.int64]
    count: npt.NDArray[np.int64]
    rejected: npt.NDArray[np.int64]
    mean: npt.NDArray[np.float64]
    min: npt.NDArray[np.float64]
    max: npt.NDArray[np.float64]
    last: npt.NDArray[np.float64]
    stddev: npt.NDArray[np.float64]
    p95: npt.NDArray[np.float64]
    first_row: npt.NDArray[np.int64]  # index (into the inputs) of a row of each key

    def __len__(self) -> int:
        return len(self.key)


def _sorted_within_groups(
    x: npt.NDArray[np.float64], starts: npt.NDArray[np.int64], sizes: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """``x`` (rows grouped: group g is ``x[starts[g] : starts[g] + sizes[g]]``) with each group sorted.

    Groups of similar size (windows of many sensors) are sorted as the rows of one +inf-padded
    matrix; very uneven ones by one stable argsort of the values and a stable sort by group.
    """
    m, g = len(x), len(starts)
    width = int(sizes.max()) if g else 0
    if g and int(sizes.min()) == width:  # groups of one size: a matrix as it is
        whole = x.reshape(g, width).copy()
        whole.sort(axis=1)
        return whole.reshape(-1)
    group = np.repeat(np.arange(g, dtype=np.int64), sizes)
    if g * width <= 4 * m + 4096:
        # Flat cell of each row: group g's rows fill cells g * width + 0, 1, ...
        cell = np.arange(m, dtype=np.int64)
        cell += np.repeat(np.arange(g, dtype=np.int64) * width - starts, sizes)
        padded = np.full(g * width, np.inf)
        padded[cell] = x
        padded.reshape(g, width).sort(axis=1)
        out: npt.NDArray[np.float64] = padded[cell]
        return out
    by_value = np.argsort(x, kind="stable")
    return x[by_value[stable_order(group[by_value])]]


def _one_per_instant(
    k: npt.NDArray[np.int64], t: npt.NDArray[np.int64], a: npt.NDArray[np.bool_], increasing: bool
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """For rows grouped by key ``k`` (arrival order within a key): which accepted rows count (the
    last accepted of each (key, ts)) and which rejected rows count (the first rejected of each
    (key, ts)), both bool ``(m,)``. ``increasing``: ts rises strictly within each key."""
    m = len(k)
    if increasing:  # nothing repeats
        return a, ~a
    order = np.lexsort((t, k))  # stable: equal (key, ts) keep their arrival order
    ks, ts_, acc = k[order], t[order], a[order]
    run = np.ones(m, dtype=bool)
    run[1:] = (ks[1:] != ks[:-1]) | (ts_[1:] != ts_[:-1])
    run_id = np.cumsum(run) - 1
    last_acc = np.full(int(run_id[-1]) + 1, -1, dtype=np.int64)
    np.maximum.at(last_acc, run_id[acc], np.flatnonzero(acc))
    first_rej = np.full(len(last_acc), m, dtype=np.int64)
    np.minimum.at(first_rej, run_id[~acc], np.flatnonzero(~acc))
    keep_acc = np.zeros(m, dtype=bool)
    keep_rej = np.zeros(m, dtype=bool)
    keep_acc[order[last_acc[last_acc >= 0]]] = True
    keep_rej[order[first_rej[first_rej < m]]] = True
    return keep_acc, keep_rej


def _p95(
    v: npt.NDArray[np.float64], starts: npt.NDArray[np.int64], count: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """The 95th percentile (linear interpolation) of each group's ``count`` first values of ``v``
    (ascending within groups); NaN where a group has none."""
    has = count > 0
    pos = 0.95 * (count - 1)
    lo_i = np.floor(pos).astype(np.int64)
    hi_i = np.minimum(lo_i + 1, np.maximum(count - 1, 0))
    frac = pos - lo_i
    with np.errstate(invalid="ignore"):
        p95: npt.NDArray[np.float64] = np.where(
            has, v[starts + np.maximum(lo_i, 0)] * (1 - frac) + v[starts + hi_i] * frac, np.nan
        )
    return p95


def _sequential_sums(x: npt.NDArray[np.float64], sizes: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Per group of consecutive rows (``sizes`` ``(g,)``), the sum of its ``x`` from 0.0, one
    value after the other (bincount adds in row order): the compiled kernel's order exactly."""
    group = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    return np.bincount(group, weights=x, minlength=len(sizes)).astype(np.float64, copy=False)


def _aggregate_in_order(
    k: npt.NDArray[np.int64],
    order: npt.NDArray[np.int64],
    value_k: npt.NDArray[np.float64],
    starts: npt.NDArray[np.int64],
    total: npt.NDArray[np.int64],
) -> Aggregates:
    """:func:`aggregate` when every row is accepted and counts (time rises within each key): the
    same values with the passes that sort out rejections, repeats and the latest instant left out."""
    v = _sorted_within_groups(value_k + 0.0, starts, total)  # + 0.0: -0.0 sorts as 0.0, whatever comes first
    mean = _sequential_sums(v, total) / total
    deviation = v - np.repeat(mean, total)
    stddev = np.sqrt(_sequential_sums(deviation * deviation, total) / total)
    last = starts + total - 1
    rejected = np.zeros(len(starts), dtype=np.int64)
    return Aggregates(k[starts], total, rejected, mean, v[starts], v[last], value_k[last], stddev,
                      _p95(v, starts, total), order[starts])  # fmt: skip


def _aggregate_compiled(
    key: npt.NDArray[np.int64],
    ts_ns: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    accepted: npt.NDArray[np.bool_],
) -> Aggregates | None:
    """:func:`aggregate` of rows whose times rise within each key, by the C kernel
    (``_windows.c``), or None where it declines (keys too spread, a time not rising, an accepted
    value not finite)."""
    assert _COMPILED_AGGREGATE is not None
    done = _COMPILED_AGGREGATE(
        np.ascontiguousarray(key, dtype=np.int64),
        np.ascontiguousarray(ts_ns, dtype=np.int64),
        np.ascontiguousarray(value, dtype=np.float64),
        np.ascontiguousarray(accepted, dtype=np.bool_).view(np.uint8),
    )
    if done is None:
        return None
    g, ints, floats = done
    key_g, count, rejected, first_row = np.frombuffer(ints, dtype=np.int64).reshape(4, g)
    mean, vmin, vmax, last, stddev, p95 = np.frombuffer(floats, dtype=np.float64).reshape(6, g)
    return Aggregates(key_g, count, rejected, mean, vmin, vmax, last, stddev, p95, first_row)


def aggregate(
    key: npt.NDArray[np.int64],
    ts_ns: npt.NDArray[np.int64],
    value: npt.NDArray[np.float64],
    accepted: npt.NDArray[np.bool_],
) -> Aggregates:
    """Aggregate rows by ``key`` (all inputs shape ``(m,)``; rows of a key in arrival order)."""
    m = len(key)
    if m == 0:
        e_i, e_f = np.empty(0, np.int64), np.empty(0)
        return Aggregates(e_i, e_i, e_i, e_f, e_f, e_f, e_f, e_f, e_f, e_i)
    if _COMPILED_AGGREGATE is not None:
        compiled = _aggregate_compiled(key, ts_ns, value, accepted)
        if compiled is not None:
            return compiled
    # Group rows by key (stable), then order each group's values: accepted ascending, rejected
    # (+inf) last. Sums run over that value order, so results do not depend on the input order.
    if bool(np.all(key[1:] >= key[:-1])):  # already grouped (the engine keeps rows sorted)
        order = np.arange(m, dtype=np.int64)
        k, a, t, value_k = key, accepted, ts_ns, value
    else:
        order = stable_order(key)
        k, a, t, value_k = key[order], accepted[order], ts_ns[order], value[order]
    same_key = k[1:] == k[:-1]
    increasing = not bool(np.any(same_key & (t[1:] <= t[:-1])))
    a, counted_rejection = _one_per_instant(k, t, a, increasing)
    starts = group_starts(k)
    total = np.diff(np.append(starts, m))
    if increasing and bool(a.all()):
        return _aggregate_in_order(k, order, value_k, starts, total)
    v = _sorted_within_groups(np.where(a, value_k + 0.0, np.inf), starts, total)
    count = np.add.reduceat(a.astype(np.int64), starts)
    rejected = np.add.reduceat(counted_rejection.astype(np.int64), starts)
    # Accepted values are the first `count` of each group in v.
    in_group = np.arange(m) - np.repeat(starts, total)
    good = in_group < np.repeat(count, total)
    va = np.where(good, v, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = _sequential_sums(va, total) / count
        deviation = va - np.repeat(mean, total)
        sq = _sequential_sums(np.where(good, deviation * deviation, 0.0), total)
        stddev = np.sqrt(sq / count)
    has = count > 0
    vmin = np.where(has, v[starts], np.nan)
    vmax = np.where(has, v[np.maximum(starts + count - 1, starts)], np.nan)
    p95 = _p95(v, starts, count)
    # last: among accepted rows of a key, the value at the greatest ts.
    score_t = np.where(a, t, np.iinfo(np.int64).min)
    max_t = np.maximum.reduceat(score_t, starts)
    at_max = a & (score_t == np.repeat(max_t, total))
    last_row = np.maximum.reduceat(np.where(at_max, order, -1), starts)
    last = np.where(has, value[np.maximum(last_row, 0)], np.nan)
    return Aggregates(k[starts], count, rejected, mean, vmin, vmax, last, stddev, p95, order[starts])


@dataclass(frozen=True, slots=True)
class ClosedRows:
    """Rows of closed windows, all ``(m,)``."""

    spec: npt.NDArray[np.int64]
    series: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    ok: npt.NDArray[np.bool_]
    partition: npt.NDArray[np.int64]

    def take(self, rows: npt.NDArray[np.bool_] | npt.NDArray[np.int64]) -> ClosedRows:
        """The rows at ``rows`` (a mask or indices)."""
        return ClosedRows(*(getattr(self, f)[rows] for f in ClosedRows.__dataclass_fields__))


@dataclass(frozen=True, slots=True)
class ClosedBuckets:
    """Rows of closed windows, bucket after bucket: bucket j (window spec ``spec[j]``, start
    ``start[j]``, partition ``partition[j]``, all ``(b,)``) holds rows ``bounds[j]:bounds[j + 1]``
    (``bounds`` ``(b + 1,)``) of the columns ``series``, ``ts_ns``, ``value``, ``ok`` ``(m,)``, in
    the order they were added."""

    spec: npt.NDArray[np.int64]
    start: npt.NDArray[np.int64]
    partition: npt.NDArray[np.int64]
    bounds: npt.NDArray[np.int64]
    series: npt.NDArray[np.int64]
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    ok: npt.NDArray[np.bool_]

    def bucket(self) -> npt.NDArray[np.int64]:
        """Each row's bucket ``(m,)``."""
        return np.repeat(np.arange(len(self.spec), dtype=np.int64), np.diff(self.bounds))

    def rows(self, mask: npt.NDArray[np.bool_]) -> ClosedRows:
        """The rows at ``mask`` ``(m,)`` with their window spec, start and partition."""
        bucket = self.bucket()[mask]
        return ClosedRows(self.spec[bucket], self.series[mask], self.start[bucket], self.ts_ns[mask],
                          self.value[mask], self.ok[mask], self.partition[bucket])  # fmt: skip


def concat_rows(parts: list[ClosedRows]) -> ClosedRows | None:
    """``parts`` one after the other; None when there are none."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return ClosedRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ClosedRows.__dataclass_fields__))


@dataclass(slots=True)
class _Bucket:
    """Rows of one (window spec, window start, partition), as appended chunks (one per step)."""

    # (series, ts_ns, value, ok, replay_from) per chunk; replay_from: the earliest offset a replay
    # needs to judge that row the same way again.
    chunks: list[
        tuple[
            npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.bool_],
            npt.NDArray[np.int64],
        ]
    ]  # fmt: skip
    replay_from: int  # the earliest of its rows' replay_from
    series: npt.NDArray[np.int64]  # distinct series with rows here (ascending), as of the last merge
    added: list[npt.NDArray[np.int64]]  # distinct series of the chunks appended since

    def distinct_series(self) -> npt.NDArray[np.int64]:
        """The distinct series with rows here (merged on demand: adding stays proportional to the step)."""
        if self.added:
            parts = [p for p in (self.series, *self.added) if len(p)]
            top = max(int(p[-1]) for p in parts) + 1 if parts else 0  # each part is ascending
            if sum(map(len, parts)) >= top // 4:
                # A window of many steps of a fleet: the same series again and again. Marking them
                # in a table over the ids costs a write per row; sorting them all costs far more.
                seen = np.zeros(top, dtype=bool)
                for p in parts:
                    seen[p] = True
                self.series = np.flatnonzero(seen)
            else:
                self.series = np.unique(np.concatenate([self.series, *self.added]))
            self.added = []
        return self.series

    @property
    def rows(self) -> int:
        return sum(len(c[0]) for c in self.chunks)


def _buckets_of(
    start: npt.NDArray[np.int64], partition: npt.NDArray[np.int64]
) -> list[tuple[int, int, npt.NDArray[np.int64]]]:
    """The rows ``(m,)`` of each (window start, partition), rows ascending: ``(start, partition,
    rows)``. A step's rows mostly share one window start: then a comparison pass per partition,
    not a sort."""
    if int(start.min()) == int(start.max()) and int(partition.min()) >= 0:
        return [(int(start[0]), p, rows) for p, rows in code_groups(partition)]
    order = np.lexsort((partition, start))  # stable: a bucket's rows keep their order
    s, p = start[order], partition[order]
    cut = np.flatnonzero((s[1:] != s[:-1]) | (p[1:] != p[:-1])) + 1
    bounds = zip([0, *cut.tolist()], [*cut.tolist(), len(order)], strict=True)
    return [(int(s[a]), int(p[a]), order[a:b]) for a, b in bounds]


class OpenWindows:
    """Readings of the windows still open, kept per (spec, window start, partition).

    Exact aggregates (p95) need every reading until its window closes: a 15-minute window at
    30 000 readings/s holds 27 M of them. Buckets keep adding proportional to the step rather
    than to what the windows hold. Windows close per series (each series has
    its own event time), so a bucket knows its series: closing compares their closed-until
    times with the bucket's end and touches rows only when some of them closed.
    """

    def __init__(self) -> None:
        self._buckets: dict[tuple[int, int, int], _Bucket] = {}
        self.rows = 0

    def add(
        self,
        spec: int,
        start: npt.NDArray[np.int64],
        partition: npt.NDArray[np.int64],
        series: npt.NDArray[np.int64],
        ts_ns: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
        ok: npt.NDArray[np.bool_],
        replay_from: npt.NDArray[np.int64],
    ) -> None:
        """Rows ``(m,)`` of window spec ``spec`` starting at ``start``, in order (kept per bucket)."""
        if not len(start):
            return
        for window_start, p, rows in _buckets_of(start, partition):
            key = (spec, window_start, p)
            earliest = int(replay_from[rows].min())
            chunk_series = series[rows]
            if bool(np.all(chunk_series[1:] >= chunk_series[:-1])):  # the engine's rows come grouped
                distinct = chunk_series[np.flatnonzero(np.diff(chunk_series, prepend=-1))]
            else:
                distinct = np.unique(chunk_series)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket([], earliest, distinct, [])
            else:
                bucket.added.append(distinct)
            bucket.chunks.append((chunk_series, ts_ns[rows], value[rows], ok[rows], replay_from[rows]))
            bucket.replay_from = min(bucket.replay_from, earliest)
        self.rows += len(start)

    def close(self, sizes: list[int], closed_until: npt.NDArray[np.int64]) -> ClosedBuckets | None:
        """Remove the rows of every window whose end (start + ``sizes[spec]``) is at or before its
        series' ``closed_until[spec, series]`` (int64 ``(specs, k)``); their rows, or None when
        none closed."""
        latest = closed_until.max(axis=1) if closed_until.size else np.full(len(sizes), np.iinfo(np.int64).min)
        keys: list[tuple[int, int, int]] = []
        counts: list[int] = []
        parts: list[list[Any]] = [[], [], [], []]  # series, ts_ns, value, ok: chunks of every bucket
        for key in [k for k in self._buckets if k[1] + sizes[k[0]] <= latest[k[0]]]:
            spec, start, _ = key
            bucket = self._buckets[key]
            end = start + sizes[spec]
            present = bucket.distinct_series()
            ready = closed_until[spec, present] >= end
            if not ready.any():
                continue
            if ready.all():
                del self._buckets[key]
                columns = [[c[k] for c in bucket.chunks] for k in range(4)]  # joined once, with the others
            else:
                # Chunk by chunk: joining the bucket's chunks first would copy every row once more.
                columns = [[], [], [], []]
                kept = []
                for chunk in bucket.chunks:
                    take = closed_until[spec, chunk[0]] >= end
                    if take.all():
                        for k in range(4):
                            columns[k].append(chunk[k])
                        continue
                    if take.any():
                        for k in range(4):
                            columns[k].append(chunk[k][take])
                        keep = ~take
                        kept.append((chunk[0][keep], chunk[1][keep], chunk[2][keep], chunk[3][keep], chunk[4][keep]))
                    else:
                        kept.append(chunk)
                bucket.chunks = kept
                bucket.series = present[~ready]
                bucket.replay_from = min(int(c[4].min()) for c in kept)
            m = sum(len(c) for c in columns[0])
            self.rows -= m
            keys.append(key)
            counts.append(m)
            for k in range(4):
                parts[k] += columns[k]
        if not keys:
            return None
        spec_b, start_b, partition_b = (np.array(c, dtype=np.int64) for c in zip(*keys, strict=True))
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        series_c, ts_c, value_c, ok_c = (np.concatenate(p) for p in parts)
        return ClosedBuckets(spec_b, start_b, partition_b, bounds, series_c, ts_c, value_c, ok_c)

    def set_ok(self, spec: int, start: int, partition: int, series: int, ts_ns: int, ok: bool) -> None:
        """Change the verdict of an open window's reading (one judged again)."""
        bucket = self._buckets.get((spec, start, partition))
        if bucket is None:
            return
        for chunk in bucket.chunks:
            chunk[3][(chunk[0] == series) & (chunk[1] == ts_ns)] = ok

    def series(self) -> npt.NDArray[np.int64]:
        """The series with rows in some open window (distinct, ascending)."""
        if not self._buckets:
            return np.empty(0, dtype=np.int64)
        return np.unique(np.concatenate([b.distinct_series() for b in self._buckets.values()]))

    def replay_from(self) -> dict[int, int]:
        """Per partition, the earliest offset a replay needs to rebuild its open windows."""
        out: dict[int, int] = {}
        for (_, _, partition), bucket in self._buckets.items():
            out[partition] = min(out.get(partition, bucket.replay_from), bucket.replay_from)
        return out

    def drop(self, partitions: set[int]) -> None:
        """Forget the windows of these partitions."""
        for key in [k for k in self._buckets if k[2] in partitions]:
            self.rows -= self._buckets.pop(key).rows
