"""Processor kernels against slow, obvious reference implementations (hypothesis)."""

from __future__ import annotations

import contextlib
import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portpulse.processors import clean as clean_module
from portpulse.processors import window as window_module
from portpulse.processors.clean import (
    DUPLICATE,
    HAMPEL_KERNEL,
    NO_OFFSET,
    NON_FINITE,
    OK,
    OUT_OF_RANGE,
    RATE,
    REPEAT,
    SPIKE,
    History,
    clean,
)
from portpulse.processors.window import AGGREGATE_KERNEL, WindowSpec, aggregate, assign, parse_windows
from tests.unit.compiled import compiled_half

W = 5
# Both kernels of checks 4-5 for batches newer than their history: the compiled one and numpy's.
KERNELS = ["compiled", "numpy"]


def hampel_kernel(kernel: str) -> contextlib.AbstractContextManager[None]:
    """Judge checks 4-5 with ``kernel`` inside the block."""
    return compiled_half(clean_module, "_COMPILED_JUDGE", kernel)


def test_the_compiled_hampel_kernel_is_built() -> None:
    assert HAMPEL_KERNEL == "compiled", "processors/_hampel.c is not compiled (setup.py)"


Hist = dict[int, list[tuple[int, float, int]]]  # series -> [(ts, value, verdict)] in event time


def reference_clean(
    readings: list[tuple[int, int, float]],
    lo: list[float],
    hi: list[float],
    rate: list[float],
    floor: list[float],
    hist: Hist,
    k_sigma: float,
    window: int = W,
    kept: int | None = None,
) -> tuple[list[int], Hist, set[tuple[int, int, int]]]:
    """One batch, exactly as documented: checks 1-3 one reading at a time in (series, ts, arrival)
    order; then every reading that passed them, and every history reading with one of them among
    the ``window`` readings before it, is judged against the ``window`` readings before it in
    event time (history and batch). Returns the reasons, the history (the ``window`` newest) and
    the history readings whose verdict changed (series, ts, new verdict). The history holds the
    ``kept`` newest (default ``window``): the engine keeps a slack beyond the window."""
    hist = {s: list(h) for s, h in hist.items()}
    order = sorted(range(len(readings)), key=lambda i: (readings[i][0], readings[i][1], i))
    reasons = [OK] * len(readings)
    seen: dict[tuple[int, int], float] = {(s, t): v for s, h in hist.items() for t, v, _ in h}
    passed: dict[int, list[tuple[int, float, int, int]]] = {}
    for i in order:
        s, t, v = readings[i]
        if not math.isfinite(v):
            reasons[i] = NON_FINITE
        elif not lo[s] <= v <= hi[s]:
            reasons[i] = OUT_OF_RANGE
        elif (s, t) in seen:
            reasons[i] = REPEAT if seen[(s, t)] == v else DUPLICATE
        else:
            seen[(s, t)] = v
            passed.setdefault(s, []).append((t, v, OK, i))
    flips: set[tuple[int, int, int]] = set()
    for s, items in passed.items():
        merged = sorted([(t, v, d, -1) for t, v, d in hist.get(s, [])] + items)
        judged = []
        for j, (t, v, old, i) in enumerate(merged):
            window_items = merged[max(0, j - window) : j]
            if i < 0 and all(x[3] < 0 for x in window_items):
                judged.append((t, v, old))
                continue
            verdict = OK
            if window_items:
                vals = [x[1] for x in window_items]
                med = statistics.median(vals)
                mad = statistics.median([abs(x - med) for x in vals])
                scale = max(1.4826 * mad, floor[s])
                dt = statistics.median([t - x[0] for x in window_items]) / 1e9
                if len(vals) >= 3 and abs(v - med) > k_sigma * scale:
                    verdict = SPIKE
                elif dt > 0 and abs(v - med) / dt > rate[s]:
                    verdict = RATE
            if i >= 0:
                reasons[i] = verdict
            elif verdict != old:
                flips.add((s, t, verdict))
            judged.append((t, v, verdict))
        hist[s] = judged
    return reasons, {s: h[-(kept or window) :] for s, h in hist.items()}, flips


values = st.one_of(
    st.floats(min_value=-50, max_value=150, allow_nan=False, width=32),
    st.sampled_from([math.nan, math.inf, -math.inf, 1000.0, 10.0, 10.0]),
)


@settings(max_examples=300, deadline=None)
@given(
    batches=st.lists(
        st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40), values), max_size=40), min_size=1, max_size=3
    ),
    window=st.sampled_from([W, 7, 2]),
    slack=st.sampled_from([0, 0, 3, 8]),
    advancing=st.booleans(),
    kernel=st.sampled_from(KERNELS),
)
def test_clean_equals_reference(
    batches: list[list[tuple[int, int, float]]], window: int, slack: int, advancing: bool, kernel: str
) -> None:
    k = 4
    lo, hi = [0.0, -10.0, 0.0, -math.inf], [100.0, 50.0, 100.0, math.inf]
    rate, floor = [5.0, 1e9, 20.0, math.inf], [1.0, 0.5, 2.0, 0.0]
    # The engine's shape: a history ``slack`` readings longer than the Hampel window.
    history = History.empty(k, window + slack)
    ref_hist: Hist = {}
    for b, batch in enumerate(batches):
        # Advancing: each batch newer than the last (a live fleet), so the history is appended to.
        shift = 41 * b if advancing else 0
        readings = [(s, (t + shift) * 1_000_000_000, v) for s, t, v in batch]
        expected, ref_hist, flips = reference_clean(
            readings, lo, hi, rate, floor, ref_hist, 4.0, window, kept=window + slack
        )
        with hampel_kernel(kernel):
            got, history, rejudged = clean(
                np.array([r[0] for r in readings], dtype=np.int64),
                np.array([r[1] for r in readings], dtype=np.int64),
                np.array([r[2] for r in readings], dtype=np.float64),
                np.array(lo),
                np.array(hi),
                np.array(rate),
                np.array(floor),
                history,
                window=window,
            )
        assert got.tolist() == expected
        assert set(zip(rejudged.series.tolist(), rejudged.ts_ns.tolist(), rejudged.verdict.tolist(),
                       strict=True)) == flips  # fmt: skip
        for s in range(k):
            kept = [
                (int(t), float(v), int(d))
                for t, v, d in zip(history.ts[s], history.values[s], history.verdict[s], strict=True)
                if not math.isnan(v)
            ]
            assert kept == ref_hist.get(s, [])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([7, 5, 2]), st.sampled_from([0.1, 0.3, 0.6]))
def test_windows_judged_by_their_filled_slots_equal_the_nan_aware_judging(seed: int, w: int, emptiness: float) -> None:
    """Windows whose empty slots come first and whose filled slots are in time order (a series'
    first readings) are judged as full windows of their filled slots; every window, whatever its
    empty slots and time order, gets the verdict of the general NaN-aware path."""
    from portpulse.processors.clean import _judge_any_windows, _judge_windows, _Sequence

    rng = np.random.default_rng(seed)
    for _ in range(20):
        n = int(rng.integers(w + 1, 60))
        empty = rng.random(n) < emptiness
        empty[: int(rng.integers(0, w + 1))] = True  # a new series: its first slots empty
        values = np.where(empty, np.nan, rng.choice([40.0, 41.0, 39.5, 60.0, 40.5], n))
        step = rng.integers(0, 30, n) if rng.random() < 0.5 else np.arange(n)  # shuffled or in order
        times = np.where(empty, np.iinfo(np.int64).min, step * 1_000_000_000)
        series = np.zeros(n, dtype=np.int64)
        pos = np.flatnonzero(~empty[w:]) + w
        floor, rate = np.array([0.2]), np.array([1.0])
        got = _judge_windows(values, times, series, pos, w, floor, rate, 4.0)
        want = _judge_any_windows(_Sequence(values, times, series, w, floor, rate, 4.0), pos)
        assert got.tolist() == want.tolist()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([(7, 8), (5, 0), (2, 3), (1, 2), (4, 1), (8, 1), (9, 2), (16, 0)]))
def test_the_compiled_hampel_kernel_gives_numpys_verdicts_and_history_bit_for_bit(
    seed: int, shape: tuple[int, int]
) -> None:
    """A fleet's batches (many series, some new, some bringing several readings, values near
    their thresholds) judged by both kernels: the same reasons and the same history, every bit
    of every slot (verdicts, values, times, offsets)."""
    window, slack = shape
    rng = np.random.default_rng(seed)
    k = 300
    limits = (np.full(k, -1e9), np.full(k, 1e9), rng.choice([0.5, 3.0, np.inf], k), rng.choice([0.0, 0.2, 1.0], k))
    histories = {kernel: History.empty(k, window + slack) for kernel in KERNELS}
    seen: set[int] = set()
    for step in range(6):
        live = np.flatnonzero(rng.random(k) < 0.3 + 0.1 * step)  # series join as the steps go on
        counts = rng.choice([1, 1, 1, 2, 3, window + slack + 2], len(live))
        series = np.repeat(live, counts)
        n = len(series)
        seconds = step * 100 + np.concatenate([np.sort(rng.choice(90, c, replace=False)) for c in counts])
        ts = seconds * 10**9 + rng.integers(0, 1000, n) * 10**6  # in time order within a series
        values = np.round(rng.normal(40, rng.choice([0.1, 1.0, 5.0]), n), int(rng.integers(0, 3)))
        values[rng.random(n) < 0.02] = 400.0  # spikes
        offsets = np.arange(step * 10_000, step * 10_000 + n, dtype=np.int64)
        got = {}
        for kernel in KERNELS:
            with hampel_kernel(kernel):
                reason, histories[kernel], rejudged = clean(
                    series, ts, values, *limits, histories[kernel], 4.0, offsets, window
                )
            assert len(rejudged) == 0  # every batch newer than the history: nothing to judge again
            got[kernel] = reason
        assert got["compiled"].tolist() == got["numpy"].tolist()
        seen |= set(got["numpy"].tolist())
        a, b = histories["compiled"], histories["numpy"]
        assert a.values.tobytes() == b.values.tobytes()
        assert a.ts.tobytes() == b.ts.tobytes()
        assert a.offsets.tobytes() == b.offsets.tobytes()
        assert a.verdict.tobytes() == b.verdict.tobytes()
    assert seen >= ({OK, RATE, SPIKE} if window >= 3 else {OK, RATE})  # each verdict was at stake


def test_the_compiled_hampel_kernel_declines_a_window_out_of_time_order_and_refuses_bad_shapes() -> None:
    """Out of time order it changes nothing and says so (numpy judges); shapes that do not fit
    together, or a series outside the history, are a ValueError, not memory read astray."""
    judge = clean_module._COMPILED_JUDGE
    assert judge is not None
    history = History.empty(2, 4)
    history.values[0] = [40.0, 41.0, 40.0, 42.0]
    history.ts[0] = [1, 3, 2, 4]  # a window out of time order
    before = history.copy()
    one = np.array([1], dtype=np.int64)
    verdict = np.empty(1, dtype=np.uint8)
    limits = np.zeros(2), np.full(2, np.inf)
    args = (np.array([0]), one, np.array([40.0]), np.array([9]), np.array([7]), *limits, 4.0, 3, verdict)
    assert judge(history.values, history.ts, history.offsets, history.verdict, *args) is False
    for name in ("values", "ts", "offsets", "verdict"):
        assert getattr(before, name).tobytes() == getattr(history, name).tobytes(), name
    history.ts[0] = [1, 2, 3, 4]
    # The third candidate's window (4, 5, 3) is out of order.
    three = (np.array([0]), np.array([3]), np.full(3, 40.0), np.array([5, 3, 6]), np.zeros(3, np.int64), *limits)
    held = (history.values, history.ts, history.offsets, history.verdict)
    assert judge(*held, *three, 4.0, 3, np.empty(3, np.uint8)) is False
    assert history.ts[0].tolist() == [1, 2, 3, 4]
    # A candidate no newer than its window's middle (age 0): never too fast, however far it is.
    far = (np.array([0]), one, np.array([90.0]), np.array([3]), np.array([7]), np.full(2, 1e9), np.full(2, 0.1))
    assert judge(history.values, history.ts, history.offsets, history.verdict, *far, 4.0, 3, verdict) is True
    assert verdict.tolist() == [OK] and history.ts[0].tolist() == [2, 3, 4, 3]
    history.ts[0] = [1, 2, 3, 4]
    assert judge(history.values, history.ts, history.offsets, history.verdict, *args) is True
    assert history.ts[0].tolist() == [2, 3, 4, 9] and history.offsets[0].tolist()[-1] == 7
    # A series outside the history, counts that do not sum to the candidates, a negative count.
    for series, counts in ((np.array([2]), one), (np.array([0]), np.array([2])), (np.array([0]), np.array([-1]))):
        with pytest.raises(ValueError):
            judge(history.values, history.ts, history.offsets, history.verdict, series, counts, *args[2:])
    with pytest.raises(ValueError):  # a window wider than the history
        judge(history.values, history.ts, history.offsets, history.verdict, *args[:-3], 4.0, 5, verdict)
    with pytest.raises(ValueError):  # a history of other shapes
        judge(history.values, history.ts[:, :3].copy(), history.offsets, history.verdict, *args)


def test_a_grown_history_keeps_its_rows_and_adds_empty_ones() -> None:
    """Room for more series: the rows held stay as they were, bit for bit, every new row is empty
    (as :meth:`History.empty` makes it), and it grows by half again at least."""
    rng = np.random.default_rng(11)
    history = History.empty(3, 4)
    history.values[:] = rng.random((3, 4))
    history.ts[:] = rng.integers(0, 10**12, (3, 4))
    history.offsets[:] = rng.integers(0, 10**6, (3, 4))
    history.verdict[:] = rng.integers(0, 3, (3, 4))
    assert history.grow(3) is history
    assert History.empty(10, 2).grow(11).values.shape == (15, 2)  # half again: fewer copies as a fleet grows
    for wanted, rows in ((4, 4), (5, 5), (20, 20)):
        grown = history.grow(wanted)
        empty = History.empty(rows - 3, 4)
        for name in ("values", "ts", "offsets", "verdict"):
            old, new = getattr(history, name), getattr(grown, name)
            assert new.shape == (rows, 4) and new.dtype == old.dtype, name
            assert new[:3].tobytes() == old.tobytes(), name
            assert new[3:].tobytes() == getattr(empty, name).tobytes(), name


def test_the_earliest_offset_of_a_history_is_the_least_of_its_row_compiled_or_not() -> None:
    rng = np.random.default_rng(5)
    history = History.empty(50, 15)
    filled = rng.random((50, 15)) < 0.7
    filled[:5] = False  # five series with nothing held yet
    history.offsets[filled] = rng.integers(0, 10**12, int(filled.sum()))
    series = rng.integers(0, 50, 400)
    want = [min(history.offsets[s].tolist()) for s in series.tolist()]  # NO_OFFSET for an empty row
    assert NO_OFFSET in want and len(set(want)) > 30
    assert history.earliest_offset(series).tolist() == want
    assert clean_module._COMPILED_EARLIEST is not None
    with compiled_half(clean_module, "_COMPILED_EARLIEST", "numpy"):
        assert history.earliest_offset(series).tolist() == want
    with pytest.raises(ValueError):
        history.earliest_offset(np.array([50]))


def test_clean_catches_a_spike_and_keeps_the_next_good_value() -> None:
    t = np.arange(10, dtype=np.int64) * 10**9
    v = np.array([40, 41, 40, 42, 41, 400, 41, 40, 42, 41], dtype=np.float64)
    reason, _, _ = clean(
        np.zeros(10, np.int64),
        t,
        v,
        np.array([0.0]),
        np.array([2000.0]),
        np.array([50.0]),
        np.array([1.0]),
        History.empty(1, 7),
    )
    assert reason.tolist() == [OK] * 5 + [SPIKE] + [OK] * 4


def test_history_remembers_where_its_readings_came_from() -> None:
    """A replay from the smallest offset in the history rebuilds it: the offsets are those of the
    last W readings that passed checks 1-3, in event-time order, spikes included."""
    t = np.array([9, 0, 1, 2, 3, 4, 5, 6, 7, 8], dtype=np.int64) * 10**9  # first one out of order
    v = np.array([40, 40, 41, 40, 42, 41, 400, 41, 40, -5], dtype=np.float64)  # a spike, one out of range
    offsets = np.arange(100, 110, dtype=np.int64)
    limits = (np.array([0.0]), np.array([2000.0]), np.array([50.0]), np.array([1.0]))
    reason, history, _ = clean(np.zeros(10, np.int64), t, v, *limits, History.empty(1, 7), offset=offsets)
    assert reason[6] == SPIKE and reason[9] == OUT_OF_RANGE
    # Passing 1-3, by time: ts 0..7 (offsets 101..108) and ts 9 (offset 100); the last 7 by time.
    assert history.offsets[0].tolist() == [103, 104, 105, 106, 107, 108, 100]
    forgotten = history.forget(np.array([True]))
    assert forgotten.offsets[0].tolist() == [NO_OFFSET] * 7 and np.isnan(forgotten.values).all()


def test_assign_tumbling_and_hopping() -> None:
    ts = np.array([0, 59, 60, 119], dtype=np.int64) * 10**9
    rows, starts = assign(ts, WindowSpec("1m", 60 * 10**9, 60 * 10**9))
    assert rows.tolist() == [0, 1, 2, 3] and (starts // 10**9).tolist() == [0, 0, 60, 60]
    rows, starts = assign(np.array([70 * 10**9]), WindowSpec("2m_1m", 120 * 10**9, 60 * 10**9))
    assert rows.tolist() == [0, 0] and (starts // 10**9).tolist() == [60, 0]
    assert [s.name for s in parse_windows("10s,1m,5m/1m")] == ["10s", "1m", "5m_1m"]


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 100), st.floats(-1e6, 1e6, allow_nan=False), st.booleans()),
        max_size=80,
    )
)
def test_aggregate_equals_reference(rows: list[tuple[int, int, float, bool]]) -> None:
    key = np.array([r[0] for r in rows], dtype=np.int64)
    ts = np.array([r[1] for r in rows], dtype=np.int64)
    val = np.array([r[2] for r in rows], dtype=np.float64)
    acc = np.array([r[3] for r in rows], dtype=bool)
    agg = aggregate(key, ts, val, acc)
    assert agg.key.tolist() == sorted(set(key.tolist()))
    for j, k in enumerate(agg.key.tolist()):
        members = [(i, r) for i, r in enumerate(rows) if r[0] == k]
        # One accepted value per instant, the later row's (a store's upsert); rejected instants.
        by_instant = {r[1]: r[2] for _, r in members if r[3]}
        good = list(by_instant.values())
        assert agg.count[j] == len(good) and agg.rejected[j] == len({r[1] for _, r in members if not r[3]})
        assert rows[int(agg.first_row[j])][0] == k
        if not good:
            assert math.isnan(agg.mean[j]) and math.isnan(agg.p95[j]) and math.isnan(agg.last[j])
            continue
        assert agg.min[j] == min(good) and agg.max[j] == max(good)
        assert math.isclose(agg.mean[j], statistics.fmean(good), rel_tol=1e-9, abs_tol=1e-6)
        assert math.isclose(agg.stddev[j], statistics.pstdev(good), rel_tol=1e-6, abs_tol=1e-6)
        assert math.isclose(agg.p95[j], float(np.percentile(good, 95)), rel_tol=1e-9, abs_tol=1e-9)
        assert agg.last[j] == by_instant[max(by_instant)]


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=12),
    equal=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_aggregate_in_time_order_gives_the_bits_of_any_arrival_order(sizes: list[int], equal: bool, seed: int) -> None:
    """Windows whose readings are all accepted and arrive in time order (the short path) aggregate
    to exactly the values the same readings give in another arrival order (the general path), so
    a window computed in memory and the same window recomputed from the store agree to the bit."""
    rng = np.random.default_rng(seed)
    sizes = [sizes[0]] * len(sizes) if equal else sizes
    key = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    ts = np.concatenate([np.sort(rng.choice(10_000, n, replace=False)) for n in sizes]).astype(np.int64)
    value = np.round(rng.normal(40, 5, len(key)), int(rng.integers(0, 4)))
    accepted = np.ones(len(key), dtype=bool)
    in_order = aggregate(key, ts, value, accepted)
    shuffled = np.concatenate([np.flatnonzero(key == k)[::-1] for k in range(len(sizes))])  # latest first
    other = aggregate(key[shuffled], ts[shuffled], value[shuffled], accepted[shuffled])
    for name in ("key", "count", "rejected", "mean", "min", "max", "last", "stddev", "p95"):
        assert np.array_equal(getattr(in_order, name), getattr(other, name), equal_nan=True), name
    assert in_order.count.tolist() == sizes and in_order.last.tolist() == [
        float(value[key == k][-1]) for k in range(len(sizes))
    ]


def test_the_compiled_window_aggregation_is_built() -> None:
    assert AGGREGATE_KERNEL == "compiled", "processors/_windows.c is not compiled (setup.py)"


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 70),
    keys=st.integers(1, 60),
    spread=st.sampled_from([1, 3, 10**6]),
    decimals=st.integers(0, 3),
)
def test_the_compiled_window_aggregation_gives_numpys_aggregates_bit_for_bit(
    seed: int, steps: int, keys: int, spread: int, decimals: int
) -> None:
    """Closing windows as the engine hands them over: step after step, each step's rows grouped by
    key, a key present in some steps only, values with ties (and -0.0) in any order, some rows
    rejected (NaN among them), some keys with none accepted. Every field
    of the compiled kernel's aggregates, first row included, equals numpy's (-0.0 counts as 0.0
    in min, max and p95, whatever the order it arrived in); keys too spread for its table
    (``spread``) leave the work to numpy."""
    rng = np.random.default_rng(seed)
    parts = []
    for step in range(steps):
        present = np.flatnonzero(rng.random(keys) < 0.8)
        parts.append(np.stack([present * spread, np.full(len(present), step)]))
    key, step_of = np.concatenate(parts, axis=1) if parts else np.empty((2, 0), dtype=np.int64)
    key, ts = key.astype(np.int64), (step_of * 10**9 + rng.integers(0, 10**6, len(key))).astype(np.int64)
    value = np.round(rng.normal(0, rng.choice([0.001, 5.0, 1e6]), len(key)), decimals)
    value[rng.random(len(key)) < 0.05] = -0.0
    accepted = rng.random(len(key)) > rng.choice([0.0, 0.1, 0.9])
    value[~accepted & (rng.random(len(key)) < 0.5)] = np.nan
    with compiled_half(window_module, "_COMPILED_AGGREGATE", "compiled"):
        compiled = aggregate(key, ts, value, accepted)
        taken = window_module._aggregate_compiled(key, ts, value, accepted) if len(key) else None
    with compiled_half(window_module, "_COMPILED_AGGREGATE", "numpy"):
        numpy_made = aggregate(key, ts, value, accepted)
    span = int(key.max() - key.min()) if len(key) else 0
    assert (taken is not None) == (len(key) > 0 and span < 4 * len(key) + 4096)  # which path ran
    for name in ("key", "count", "rejected", "mean", "min", "max", "last", "stddev", "p95", "first_row"):
        assert getattr(compiled, name).tobytes() == getattr(numpy_made, name).tobytes(), name


def test_the_compiled_window_aggregation_declines_what_numpy_must_sort_out() -> None:
    """Times not rising within a key (a repeat, a reading out of order) or an accepted value not
    finite: the kernel declines and aggregate() gives numpy's answer; a rejected value may be
    anything; ragged inputs are a ValueError."""
    kernel = window_module._COMPILED_AGGREGATE
    assert kernel is not None
    key = np.array([0, 1, 0, 1], dtype=np.int64)
    rising = np.array([1, 1, 2, 2], dtype=np.int64)
    value = np.array([1.0, 2.0, 3.0, 4.0])
    ok = np.ones(4, dtype=np.uint8)
    assert kernel(key, rising, value, ok) is not None
    assert kernel(key, rising, np.array([1.0, np.inf, 3.0, 4.0]), np.array([1, 0, 1, 1], dtype=np.uint8)) is not None
    for ts, v in ((np.array([1, 1, 1, 2]), value), (np.array([2, 1, 1, 2]), value),
                  (rising, np.array([1.0, np.inf, 3.0, 4.0]))):  # fmt: skip
        assert kernel(key, ts.astype(np.int64), v, ok) is None
    got = aggregate(key, np.array([1, 1, 1, 2], dtype=np.int64), value, np.ones(4, dtype=bool))
    assert got.count.tolist() == [1, 2] and got.last.tolist() == [3.0, 4.0]  # the later row of an instant
    with pytest.raises(ValueError, match="items"):
        kernel(key, rising[:3], value, ok)


def test_sorting_network_sorts_every_binary_input_and_random_rows() -> None:
    from itertools import product

    from portpulse.processors.clean import _sort_columns

    binary = np.array(list(product([0.0, 1.0], repeat=7)))  # the 0-1 principle: all 128 inputs
    rows = np.vstack([binary, np.random.default_rng(3).normal(size=(500, 7))])
    ordered = np.stack(_sort_columns([rows[:, j] for j in range(7)]), axis=1)
    assert np.array_equal(ordered, np.sort(rows, axis=1))


def test_sorting_and_median_networks_for_other_window_sizes() -> None:
    from itertools import product

    from portpulse.processors.clean import _full_median, _sort_columns

    for w in (1, 2, 3, 4, 5, 6, 8, 9, 11):
        binary = np.array(list(product([0.0, 1.0], repeat=w)))
        rows = np.vstack([binary, np.random.default_rng(w).normal(size=(300, w))])
        cols = [rows[:, j].copy() for j in range(w)]
        assert np.array_equal(np.stack(_sort_columns(cols), axis=1), np.sort(rows, axis=1)), w
        assert np.array_equal(_full_median(cols), np.median(rows, axis=1)), w


def test_stable_order_equals_a_stable_argsort_packed_or_not() -> None:
    from portpulse.arrays import stable_order

    rng = np.random.default_rng(5)
    for key in (
        rng.integers(0, 30, 5000),  # many ties: packed
        rng.integers(-(2**62), 2**62, 5000),  # too wide to pack: argsort
        np.zeros(1, dtype=np.int64),
        np.empty(0, dtype=np.int64),
    ):
        key = key.astype(np.int64)
        assert stable_order(key).tolist() == np.argsort(key, kind="stable").tolist()


def test_aggregate_with_very_uneven_groups_equals_reference() -> None:
    """One key with thousands of rows next to many single-row keys: the argsort path, not padding."""
    rng = np.random.default_rng(11)
    key = np.concatenate([np.zeros(5000, dtype=np.int64), np.arange(1, 200, dtype=np.int64)])
    rng.shuffle(key)
    value = rng.normal(10, 3, len(key))
    accepted = rng.random(len(key)) > 0.1
    agg = aggregate(key, np.arange(len(key), dtype=np.int64), value, accepted)
    for j, k in enumerate(agg.key.tolist()):
        good = value[(key == k) & accepted]
        if not len(good):
            assert math.isnan(agg.p95[j])
            continue
        assert agg.count[j] == len(good) and agg.min[j] == good.min() and agg.max[j] == good.max()
        assert math.isclose(agg.p95[j], float(np.percentile(good, 95)), rel_tol=1e-12)
        assert math.isclose(agg.mean[j], float(good.mean()), rel_tol=1e-9)


def test_window_keys_are_one_per_spec_series_start_and_ordered_like_them() -> None:
    from portpulse.processors.engine import _window_key

    windows = parse_windows("10s,1m,5m/1m")
    rng = np.random.default_rng(2)
    n = 2000
    spec = rng.integers(0, len(windows), n).astype(np.int64)
    series = rng.integers(0, 50, n).astype(np.int64)
    steps = np.array([w.step_ns for w in windows], dtype=np.int64)
    start = 1_764_000_000 * 10**9 + rng.integers(0, 40, n) * steps[spec]
    key = _window_key(spec, series, start, windows)
    triples = list(zip(spec.tolist(), series.tolist(), start.tolist(), strict=True))
    by_key = sorted(range(n), key=lambda i: (key[i], i))
    by_triple = sorted(range(n), key=lambda i: (triples[i], i))
    assert by_key == by_triple
    assert len(set(key.tolist())) == len(set(triples))


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 1), st.integers(0, 5), st.integers(0, 2), st.integers(0, 7)), max_size=30),
        min_size=1, max_size=6,
    ),
    st.lists(st.lists(st.integers(-1, 12), min_size=16, max_size=16), min_size=6, max_size=6),
    st.sampled_from([1, 1000]),
)  # fmt: skip
def test_open_windows_close_exactly_the_rows_added_per_window_and_series_in_order(
    steps: list[list[tuple[int, int, int, int]]], closed_until: list[list[int]], spread: int
) -> None:
    """Rows (spec, start, partition, series) added over several steps come back once, when their
    window ends at or before their own series' closed-until time, in the order they were added
    (per window and series); replay offsets and dropped partitions follow. Series ids ``spread``
    apart: few series among many ids, as well as all of them."""
    from portpulse.processors.window import OpenWindows

    sizes = [2, 5]
    store = OpenWindows()
    held: list[tuple[int, int, int, int, int]] = []  # (spec, start, partition, series, offset)
    offset = 0
    for rows, until_flat in zip(steps, closed_until, strict=False):
        until = np.array(until_flat, dtype=np.int64).reshape(2, 8)
        until_by_id = np.repeat(until, spread, axis=1)  # series s has id s * spread
        for spec in (0, 1):
            mine = [r for r in rows if r[0] == spec]
            col = [np.array([r[k] for r in mine], dtype=np.int64) for k in range(4)]
            offsets = np.arange(offset, offset + len(mine), dtype=np.int64)
            store.add(spec, col[1], col[2], col[3] * spread, offsets * 10, offsets / 2, offsets % 2 == 0, offsets)
            held += [(*r, int(o)) for r, o in zip(mine, offsets.tolist(), strict=True)]
            offset += len(mine)
        assert store.rows == len(held)
        replay = {p: min(r[4] for r in held if r[2] == p) for p in {r[2] for r in held}}
        assert store.replay_from() == replay
        buckets = store.close(sizes, until_by_id)
        due = [r for r in held if r[1] + sizes[r[0]] <= until[r[0], r[3]]]
        held = [r for r in held if r not in due]
        if buckets is None:
            assert not due
            continue
        # One bucket per (spec, start, partition), its rows between its bounds.
        keys = list(zip(buckets.spec.tolist(), buckets.start.tolist(), buckets.partition.tolist(), strict=True))
        assert len(set(keys)) == len(keys) and buckets.bounds[-1] == len(buckets.series)
        closed = buckets.rows(np.ones(len(buckets.series), dtype=bool))
        assert (np.diff(buckets.bounds) > 0).all()
        got = sorted(zip(closed.spec.tolist(), closed.start.tolist(), closed.partition.tolist(),
                         (closed.series // spread).tolist(), (closed.ts_ns // 10).tolist(), strict=True))  # fmt: skip
        assert got == sorted(due)
        assert (closed.value * 20 == closed.ts_ns).all() and (closed.ok == (closed.ts_ns % 20 == 0)).all()
        for key in {r[:4] for r in due}:  # per window and series: the order of adding
            mask = (closed.spec == key[0]) & (closed.start == key[1]) & (closed.partition == key[2])
            mask &= closed.series == key[3] * spread
            assert (closed.ts_ns[mask] // 10).tolist() == [r[4] for r in due if r[:4] == key]
    store.drop({0, 1})
    assert store.rows == sum(1 for r in held if r[2] == 2)
    assert set(store.replay_from()) <= {2}


@given(st.lists(st.integers(0, 40), max_size=200), st.sampled_from([1, 1, 10**6]))
def test_code_groups_are_the_groups_of_a_stable_sort(codes: list[int], scale: int) -> None:
    """Few values (one pass each), many, and sparse large ones (the sort): the same groups."""
    from portpulse.arrays import code_groups

    code = np.array(codes, dtype=np.int64) * scale
    order = np.argsort(code, kind="stable")
    want = [(v * scale, order[code[order] == v * scale].tolist()) for v in sorted(set(codes))]
    assert [(value, rows.tolist()) for value, rows in code_groups(code)] == want


def factoriser(kind: str) -> contextlib.AbstractContextManager[None]:
    """Factorise with ``kind`` ("compiled" or "python") inside the block."""
    from portpulse import arrays

    return compiled_half(arrays, "_COMPILED_FACTORISE", kind)


def test_the_compiled_factoriser_is_built() -> None:
    from portpulse.arrays import FACTORISER

    assert FACTORISER == "compiled", "portpulse/_arrays.c is not compiled (setup.py)"


@given(
    st.lists(st.sampled_from(["no2", "pm25", "quai", ""]), max_size=40),
    st.sampled_from(["compiled", "python"]),
    st.integers(0, 600),
)
def test_factorise_codes_index_the_distinct_items_in_first_seen_order(items: list[str], kind: str, more: int) -> None:
    from portpulse.arrays import factorise

    items = items + [f"s-{i % 400}" for i in range(more)]  # more names than the identity table's slots
    fresh = ["".join(list(s)) for s in items]  # equal strings as distinct objects, as a parser makes them
    with factoriser(kind):
        codes, distinct = factorise(fresh)
        shared, shared_distinct = factorise(items * 2)  # the same objects again and again
        assert factorise(tuple(items))[0].tolist() == codes.tolist()
    assert distinct == list(dict.fromkeys(items))
    assert [distinct[c] for c in codes.tolist()] == items and codes.dtype == np.int64
    assert shared.tolist() == codes.tolist() * 2 and shared_distinct == distinct


@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c", "dd", ""]), st.integers(1, 9)), max_size=30),
    st.sampled_from(["compiled", "python"]),
)
def test_factorise_column_of_runs_equals_factorise_of_every_item(runs: list[tuple[str, int]], kind: str) -> None:
    from portpulse.arrays import factorise, factorise_column

    items = [name for name, length in runs for _ in range(length)]
    fresh = np.array(["".join(list(s)) for s in items], dtype=object)  # equal, not identical: compared by value
    with factoriser(kind):
        codes, distinct = factorise_column(fresh)
    assert distinct == list(dict.fromkeys(items))
    assert [distinct[c] for c in codes.tolist()] == items and codes.dtype == np.int64
    assert factorise(items)[0].tolist() == codes.tolist()


def test_factorise_refuses_unhashable_items_compiled_or_not() -> None:
    from portpulse.arrays import factorise

    for kind in ("compiled", "python"):
        with factoriser(kind), pytest.raises(TypeError):
            factorise(["s-1", ["s-2"]])


@given(
    st.lists(st.tuples(st.integers(-2, 2), st.integers(0, 3)), max_size=120),
    st.sampled_from(["any", "sorted", "one instant", "points far apart", "one point"]),
    st.sampled_from(["compiled", "numpy"]),
)
def test_pair_lines_makes_one_line_per_point_and_instant(rows: list[tuple[int, int]], shape: str, kind: str) -> None:
    from portpulse import arrays

    if shape == "sorted":  # the path that skips the sorts
        rows = sorted(rows)
    elif shape == "one instant":  # one sort, by point
        rows = [(p, 7) for p, _ in rows]
    elif shape == "points far apart":  # too wide a range for the compiled counting sort
        rows = [(p * 10**12, t) for p, t in rows]
    elif shape == "one point":  # beyond 32 rows: the compiled merge sort
        rows = [(1, t) for _, t in rows] * 4
    point = np.array([p for p, _ in rows], dtype=np.int64)
    ts = np.array([t for _, t in rows], dtype=np.int64)
    with compiled_half(arrays, "_COMPILED_PAIR_LINES", kind):
        line, first = arrays.pair_lines(point, ts)
    pairs = sorted(set(rows))  # lines in (point, ts) order
    assert line.tolist() == [pairs.index(row) for row in rows]
    assert first.tolist() == [rows.index(pair) for pair in pairs]  # each line's first row


def test_late_records_are_json_with_every_field_and_never_fail_on_odd_values() -> None:
    import json

    from portpulse.processors.engine import LateReading
    from portpulse.processors.loop import late_record

    record = json.loads(
        late_record(LateReading(3, "air", "no2-1", "no2", 1_764_000_000_123_456_789, 41.25, 12 * 10**9))
    )
    assert record == {"domain": "air", "sensor_id": "no2-1", "metric": "no2", "ts_ns": 1_764_000_000_123_456_789,
                      "value": 41.25, "reason": "beyond_correction_horizon", "lateness_ns": 12 * 10**9}  # fmt: skip
    assert (
        json.loads(late_record(LateReading(0, "air", "s", "m", 0, float("nan"), 1)))["value"] is None
    )  # valid JSON, not NaN
