"""The processor engine with fakes at its seams (no network): windows per series, corrections
recomputed from an in-memory store, restarts from commit metadata.

The expected aggregates are computed here from what the store holds, with the standard library
and ``numpy.percentile``, never with the engine's kernels.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portpulse.arrays import factorise_column
from portpulse.contract.catalogue import load_catalogue
from portpulse.contract.points import Categorical, MemoryPointSink
from portpulse.processors.engine import (
    EngineOutput,
    EngineSettings,
    KeyCodes,
    PartitionPosition,
    ProcessorEngine,
    Readings,
    Recompute,
    _names_array,
    _names_at,
)
from portpulse.processors.window import ClosedRows, parse_windows

T = TypeVar("T")
S = 10**9
MINUTE = 60 * S
T0 = 1_764_000_000 * S // MINUTE * MINUTE
Row = tuple[str, int, int, float]  # (sensor, partition, ts_ns, value)
Window = tuple[str, int]  # (sensor, window start ns)


def done(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (the memory store's)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise AssertionError("the coroutine suspended")


class Run:
    """One engine and one store, fed like the Kafka loop feeds them."""

    def __init__(
        self, lateness_s: float = 2.0, idle_s: float = 5.0, engine: ProcessorEngine | None = None, windows: str = "1m"
    ) -> None:
        settings = EngineSettings(parse_windows(windows), int(lateness_s * S), idle_s)
        self.engine = engine or ProcessorEngine(settings, load_catalogue())
        self.store = MemoryPointSink()
        self.offsets: dict[int, int] = {}
        self.outputs: list[EngineOutput] = []

    def feed(self, rows: Iterable[Row], now_s: float, offsets: list[int] | None = None) -> EngineOutput:
        rows = list(rows)
        if offsets is None:
            offsets = []
            for _, p, _, _ in rows:
                offsets.append(self.offsets.get(p, 0))
                self.offsets[p] = offsets[-1] + 1
        for (_, p, _, _), o in zip(rows, offsets, strict=True):
            self.offsets[p] = max(self.offsets.get(p, 0), o + 1)
        readings = Readings(
            np.array(["air"] * len(rows), dtype=object),
            np.array([r[0] for r in rows], dtype=object),
            np.array(["quai"] * len(rows), dtype=object),
            np.array(["no2"] * len(rows), dtype=object),
            np.array([r[2] for r in rows], dtype=np.int64),
            np.array([r[3] for r in rows], dtype=np.float64),
            np.array([r[1] for r in rows], dtype=np.int64),
            np.array(offsets, dtype=np.int64),
        )
        out = self.engine.ingest(readings, now_s, frozenset(self.offsets))
        self._store(out, now_s)
        self.outputs.append(out)
        return out

    def _store(self, out: EngineOutput, now_s: float) -> None:
        """In the loop's order (``Processor._process``): each phase leaves the store consistent
        before the next reads it."""
        self._write_and_retract(out)
        if out.deferred is not None:
            stored = [done(self.store.read(q)) for q in self.engine.neighbour_ranges(out.deferred)]
            more = self.engine.ingest_deferred(out.deferred, stored, now_s)
            self._write_and_retract(more)
            out.absorb(more)
        if len(out.recompute):
            stored = [done(self.store.read(q)) for q in self.engine.stored_ranges(out.recompute)]
            for kind, points in self.engine.recomputed(out.recompute, stored).points:
                done(self.store.write(points, f"processor:{kind}"))

    def _write_and_retract(self, out: EngineOutput) -> None:
        for kind, points in out.points:
            done(self.store.write(points, f"processor:{kind}"))
        for domain, metric, instants in self.engine.retractions(out.retract):
            done(self.store.retract(domain, metric, instants))
        out.points, out.retract = [], []

    def settle(self, now_s: float) -> None:
        """Long after the last reading: every series idle, every window closed."""
        self.feed([], now_s)

    def aggregates(self, window: str = "1m") -> dict[Window, dict[str, float]]:
        out: dict[Window, dict[str, float]] = {}
        for (measurement, sensor, name, ts), value in self.store.stored().items():
            if measurement == f"air_{window}":
                out.setdefault((sensor, ts), {})[name.removeprefix("no2_")] = float(value)
        return out


def batch_computation(store: MemoryPointSink, size_ns: int = MINUTE) -> dict[Window, dict[str, float]]:
    """The aggregates (windows of ``size_ns``) of what the store holds as raw points and rejected
    readings."""
    values: dict[Window, dict[int, float]] = {}
    rejected: dict[Window, set[int]] = {}
    for (measurement, sensor, name, ts), value in store.stored().items():
        window = (sensor, ts // size_ns * size_ns)
        if measurement == "air" and name == "no2":
            values.setdefault(window, {})[ts] = float(value)
        elif measurement == "air_rejected" and name == "no2_reason" and value != "reinstated":
            rejected.setdefault(window, set()).add(ts)
    out: dict[Window, dict[str, float]] = {}
    for window in values.keys() | rejected.keys():
        by_time = values.get(window, {})
        v = list(by_time.values())
        stats = {"count": float(len(v)), "rejected": float(len(rejected.get(window, ())))}
        if v:
            stats |= {
                "mean": statistics.fmean(v), "min": min(v), "max": max(v), "stddev": statistics.pstdev(v),
                "p95": float(np.percentile(v, 95)), "last": by_time[max(by_time)],
            }  # fmt: skip
        out[window] = stats
    return out


def assert_same(got: dict[Window, dict[str, float]], want: dict[Window, dict[str, float]]) -> None:
    assert sorted(got) == sorted(want)
    for key, expected in want.items():
        have = got[key]
        assert have["count"] == expected["count"] and have["rejected"] == expected["rejected"], key
        for stat in ("mean", "min", "max", "last", "stddev", "p95"):
            if stat in expected:
                assert math.isclose(have[stat], expected[stat], rel_tol=1e-9, abs_tol=1e-9), (key, stat)
            else:
                assert math.isnan(have.get(stat, math.nan)), (key, stat)


def fleet(sensors: int, seconds: int, seed: int = 1, jumpy: bool = False) -> list[Row]:
    """Readings every second per sensor, values near 40, a few out of range; two partitions.
    ``jumpy``: also spikes and level shifts, whose first readings the Hampel filter rejects until
    its window holds enough of the new level (verdicts that depend on the neighbours)."""
    rng = np.random.default_rng(seed)
    rows = []
    for t in range(seconds):
        for k in range(sensors):
            level = 140.0 if jumpy and (t // 9 + k) % 4 == 3 else 40.0
            value = round(level + float(rng.normal(0, 1)), 2) if rng.random() > 0.03 else -5.0
            if jumpy and rng.random() < 0.04:
                value = 400.0
            rows.append((f"s{k}", k % 2, T0 + t * S + k * 10**6, value))
    return rows


def test_in_order_fleet_windows_equal_the_batch_computation() -> None:
    run = Run()
    rows = fleet(3, 185)
    for i in range(0, len(rows), 40):
        run.feed(rows[i : i + 40], now_s=i / 40)
    run.settle(1000.0)
    got = run.aggregates()
    assert len(got) == 3 * 4  # 3 minutes and 5 s per sensor
    assert_same(got, batch_computation(run.store))
    assert sum(o.corrections for o in run.outputs) == 0 and not any(o.late for o in run.outputs)


@settings(max_examples=60, deadline=None)
@given(
    order=st.permutations(range(150)),
    cuts=st.lists(st.integers(1, 149), max_size=12),
    pauses=st.lists(st.floats(0, 20), min_size=13, max_size=13),
    jumpy=st.booleans(),
)
def test_any_order_and_any_delay_gives_the_same_final_aggregates(
    order: list[int], cuts: list[int], pauses: list[float], jumpy: bool
) -> None:
    """The same readings in any arrival order, in any batches, with pauses long enough for
    windows to close on the idle timeout in between: the stored raw points, rejections and
    aggregates end up the same as in order (so do the cleaning verdicts, spikes and level shifts
    included), and the aggregates equal the batch computation over the stored raw points."""
    rows = fleet(2, 75, seed=3, jumpy=jumpy)  # 150 readings: 2 sensors, 75 s (two 1-minute windows each)
    in_order = Run()
    in_order.feed(rows, now_s=0.0)
    in_order.settle(1000.0)
    shuffled = Run()
    now = 0.0
    bounds = [0, *sorted(set(cuts)), len(rows)]
    for j, (a, b) in enumerate(itertools.pairwise(bounds)):
        shuffled.feed([rows[i] for i in order[a:b]], now_s=now)
        now += pauses[j]
    shuffled.settle(now + 1000.0)
    expected = batch_computation(shuffled.store)
    assert_same(shuffled.aggregates(), expected)
    assert_same(in_order.aggregates(), expected)
    raw = {k: v for k, v in shuffled.store.stored().items() if k[0] == "air"}
    assert raw == {k: v for k, v in in_order.store.stored().items() if k[0] == "air"}


def test_a_clock_running_ahead_moves_only_its_own_windows() -> None:
    """One sensor 30 s ahead on the same partition: the others' windows stay whole, nothing is
    corrected or late, and every window of theirs holds 60 readings."""
    run = Run(lateness_s=2.0, idle_s=30.0)
    rows = [(s, 0, ts + (30 * S if s == "s0" else 0), v) for s, _, ts, v in fleet(4, 180, seed=5)]
    for i in range(0, len(rows), 20):  # arrival order = wall-clock order
        run.feed(rows[i : i + 20], now_s=i / 4)
    run.settle(10_000.0)
    got = run.aggregates()
    assert all(got[(s, T0 + m * MINUTE)]["count"] + got[(s, T0 + m * MINUTE)]["rejected"] == 60
               for s in ("s1", "s2", "s3") for m in range(3))  # fmt: skip
    assert sum(o.corrections for o in run.outputs) == 0
    assert_same(got, batch_computation(run.store))


def test_a_backlog_after_silence_fills_its_windows_without_late_readings() -> None:
    """A gateway silent for five minutes (its windows closed by the idle timeout meanwhile), then
    its buffer delivered at once: no reading is lost to a window; the window it went silent in is
    corrected from the store."""
    run = Run(lateness_s=2.0, idle_s=5.0)
    rows = fleet(2, 420, seed=9)
    live = [r for r in rows if r[0] == "s0"]
    quiet = [r for r in rows if r[0] == "s1"]
    before = [r for r in quiet if r[2] < T0 + 90 * S]  # s1 reports for 90 s, then goes silent
    backlog = [r for r in quiet if r[2] >= T0 + 90 * S]
    now = 0.0
    for t in range(420):
        run.feed([r for r in live if r[2] // S == T0 // S + t] + [r for r in before if r[2] // S == T0 // S + t], now)
        now += 1.0
    out = run.feed(backlog, now)  # the gateway is back: 330 s of readings at once
    assert out.corrections > 0 and not out.late
    run.settle(now + 1000.0)
    got = run.aggregates()
    assert all(got[(s, T0 + m * MINUTE)]["count"] + got[(s, T0 + m * MINUTE)]["rejected"] == 60
               for s in ("s0", "s1") for m in range(7))  # fmt: skip
    assert_same(got, batch_computation(run.store))


@pytest.mark.parametrize("windows", ["1m", "10s,1m", "1m/20s"])
def test_a_series_resuming_inside_windows_closed_on_idle_reopens_them_and_reads_the_store_once(windows: str) -> None:
    """A sensor quiet past the idle timeout (its windows emitted with what they had), then
    reporting again inside them: they take its readings in memory, with no read of the store at
    each step, and each is recomputed from the store once, at the step whose reading takes its
    event time past the window's end plus the lateness; every window then holds all its readings."""
    run = Run(lateness_s=2.0, idle_s=5.0, windows=windows)
    rows = fleet(1, 150, seed=13)  # one reading a second from T0
    for t in range(20):
        run.feed([rows[t]], now_s=float(t))
    run.settle(30.0)  # quiet past the idle timeout: every window holding T0 + 19 s is emitted
    name = parse_windows(windows)[-1].name
    assert sum(run.aggregates(name)[("s0", T0)][k] for k in ("count", "rejected")) == 20
    resumed = {t: run.feed([rows[t]], now_s=31.0 + t) for t in range(25, 150)}
    assert all(resumed[t].corrections > 0 for t in range(25, 40))  # inside emitted windows
    recomputed = [(t, int(out.recompute.spec[k]), int(out.recompute.start[k]))
                  for t, out in resumed.items() for k in range(len(out.recompute))]  # fmt: skip
    expected = {"1m": [(62, 0, T0)], "10s,1m": [(62, 1, T0)], "1m/20s": [(42, 0, T0 - 20 * S), (62, 0, T0)]}
    assert recomputed == expected[windows]
    # Read back: only what the store held when the sensor resumed (T0 + 19 s); memory holds the rest.
    reads = [q for t, _, _ in recomputed for q in run.engine.stored_ranges(resumed[t].recompute)]
    assert reads and all(q.stop_ns == T0 + 19 * S + 1 for q in reads)
    run.settle(10_000.0)
    got = run.aggregates(name)
    assert got[("s0", T0)]["count"] + got[("s0", T0)]["rejected"] == 55  # 20 before the silence, 35 after
    if "/" in windows:  # the window from T0 - 20 s: 20 readings before, 15 after
        assert got[("s0", T0 - 20 * S)]["count"] + got[("s0", T0 - 20 * S)]["rejected"] == 35
    else:
        assert_same(got, batch_computation(run.store))


def test_a_window_asked_twice_is_recomputed_once_from_the_later_point_with_the_rows_memory_holds() -> None:
    """Windows to recompute merge into one entry per window, keeping the later ``upto`` (reading
    more of the store is exact whatever memory holds), sorted; held rows are kept with them."""

    def i(*v: int) -> npt.NDArray[np.int64]:
        return np.array(v, dtype=np.int64)

    held = ClosedRows(i(0), i(7), i(T0), i(T0 + 30 * S), np.array([41.0]), np.array([True]), i(0))
    out = EngineOutput()
    out.add_recompute([(i(0, 1), i(7, 3), i(T0, T0), i(T0 + 20 * S, T0 + MINUTE))], held)
    more = EngineOutput()
    more.add_recompute([(i(0, 0), i(7, 2), i(T0, T0), i(T0 + MINUTE, T0 + 5 * S))])
    out.absorb(more)
    r = out.recompute
    assert list(zip(r.spec.tolist(), r.series.tolist(), r.start.tolist(), r.upto.tolist(), strict=True)) == [
        (0, 2, T0, T0 + 5 * S), (0, 7, T0, T0 + MINUTE), (1, 3, T0, T0 + MINUTE)
    ]  # fmt: skip
    assert r.held is not None and r.held.ts_ns.tolist() == [T0 + 30 * S]
    assert len(Recompute.of([])) == 0 and Recompute.of([]).held is None


def test_a_restart_replays_from_the_commit_and_ends_with_the_same_aggregates() -> None:
    """Crash after a commit, a new engine restores each partition from the commit metadata and
    replays from the committed offset (a late reading among the replay too): the stored
    aggregates equal an uninterrupted run's and the batch computation."""
    rows = fleet(4, 200, seed=11)
    rows.insert(500, ("s2", 0, T0 + 3 * S + 2 * 10**6, 41.0))  # out of order by two minutes
    whole = Run(idle_s=5.0)
    for i in range(0, len(rows), 50):
        whole.feed(rows[i : i + 50], now_s=i / 50)
    whole.settle(10_000.0)

    first = Run(idle_s=5.0)
    committed: dict[int, PartitionPosition] = {}
    for i in range(0, 450, 50):
        committed = first.engine.safe_offsets()  # what the loop commits before each step
        first.feed(rows[i : i + 50], now_s=i / 50)
    crashed_at = 450 + 23  # a step half-done: its points were written, nothing committed after
    first.feed(rows[450:crashed_at], now_s=9.0)

    second = Run(idle_s=5.0)
    second.store = first.store  # the same InfluxDB
    names = second.engine.window_names()
    for p, (_, consumed, closed) in committed.items():
        second.engine.restore(p, consumed, dict(zip(names, closed, strict=True)))
    offsets = {p: 0 for p in (0, 1)}
    numbered = []
    for row in rows:
        numbered.append((row, offsets[row[1]]))
        offsets[row[1]] += 1
    replay = [(row, o) for row, o in numbered if o >= committed[row[1]].commit]
    for i in range(0, len(replay), 50):
        part = replay[i : i + 50]
        second.feed([r for r, _ in part], now_s=20 + i / 50, offsets=[o for _, o in part])
    second.settle(10_000.0)
    expected = batch_computation(second.store)
    assert_same(second.aggregates(), expected)
    assert_same(whole.aggregates(), expected)
    assert sum(o.replayed for o in second.outputs) > 0


def test_repeats_are_dropped_and_conflicting_duplicates_rejected_once() -> None:
    run = Run()
    base = [("s0", 0, T0 + t * S, 40.0 + t % 3) for t in range(10)]
    out = run.feed([*base, base[4], base[4]], now_s=0.0)  # the same reading delivered three times
    assert out.repeated == 2 and out.rejected == {}
    out = run.feed([base[5], ("s0", 0, base[6][2], 99.0)], now_s=1.0)  # again, and another value
    assert out.repeated == 1 and out.rejected == {"duplicate": 1}
    run.settle(1000.0)
    got = run.aggregates()[("s0", T0)]
    assert got["count"] == 10 and got["rejected"] == 1
    assert got["mean"] == statistics.fmean(40.0 + t % 3 for t in range(10))


def test_a_partition_whose_last_records_are_repeats_is_consumed_to_its_end() -> None:
    # A redelivery (a replayed dead letter, QoS 1 after a bridge restart) at a partition's tail:
    # the partition is caught up only if the repeats count as consumed, and only then may its
    # quiet series close on the idle timeout.
    run = Run()
    base = [("s0", 0, T0 + t * S, 40.0) for t in range(5)]
    run.feed(base, now_s=0.0)
    assert run.engine.next_offset(0) == 5
    out = run.feed([base[1], base[3]], now_s=1.0)
    assert out.repeated == 2 and run.engine.next_offset(0) == 7


def test_readings_beyond_the_correction_horizon_go_to_the_late_topic_with_their_age() -> None:
    settings = EngineSettings(parse_windows("1m"), 2 * S, 5.0, horizon_ns=3600 * S)
    run = Run(engine=ProcessorEngine(settings, load_catalogue()))
    wall = T0 + 7200 * S
    text = [np.array(x, dtype=object) for x in (["air"] * 2, ["s0"] * 2, ["quai"] * 2, ["no2"] * 2)]
    numbers = [np.array([T0, wall - 60 * S]), np.array([40.0, 41.0]), np.array([0, 0]), np.array([0, 1])]
    readings = Readings(*text, *numbers)
    out = run.engine.ingest(readings, 0.0, frozenset({0}), wall_ns=wall)
    assert [(late.sensor_id, late.ts_ns, late.lateness_ns) for late in out.late] == [("s0", T0, 3600 * S)]
    assert sum(len(p) for kind, p in out.points if kind == "raw") == 1
    assert run.engine.safe_offsets()[0].consumed_until == 2  # both records consumed


def test_a_reading_far_out_of_order_is_judged_against_its_neighbours_in_the_store() -> None:
    """Readings a minute behind their series (far beyond the in-memory history): a spike among
    them is rejected, the same reading again is a repeat, another value at a stored instant a
    duplicate; the corrected window counts each once."""
    run = Run(lateness_s=2.0, idle_s=5.0)
    rows = [("s0", 0, T0 + t * S, 40.0 + (t % 5) * 0.5) for t in range(130)]
    for i in range(0, 130, 10):
        run.feed(rows[i : i + 10], now_s=i / 10)
    before = run.aggregates()[("s0", T0)]
    out = run.feed([("s0", 0, T0 + 30 * S + S // 2, 400.0), rows[20], ("s0", 0, rows[21][2], 39.0)], now_s=20.0)
    assert out.deferred is not None and len(out.deferred.series) == 3
    assert out.rejected == {"spike": 1, "duplicate": 1} and out.repeated == 1
    run.settle(1000.0)
    after = run.aggregates()[("s0", T0)]
    assert (before["count"], before["rejected"]) == (60, 0)
    assert (after["count"], after["rejected"]) == (60, 2) and after["mean"] == before["mean"]
    assert_same(run.aggregates(), batch_computation(run.store))


def test_series_that_stop_reporting_are_forgotten_and_their_slots_reused() -> None:
    """Sensors come and go: state follows the ones that report. A forgotten sensor that comes
    back with a reading for a window it had emitted gets that window recomputed from the store."""
    settings = EngineSettings(parse_windows("1m"), 2 * S, 5.0, series_ttl_s=100.0)
    run = Run(engine=ProcessorEngine(settings, load_catalogue()))
    for generation in range(5):  # 50 new sensors every 200 s, each reporting for a minute
        rows = [(f"g{generation}-{k}", 0, T0 + (generation * 200 + t) * S, 40.0) for t in range(60) for k in range(50)]
        for i in range(0, len(rows), 500):
            run.feed(rows[i : i + 500], now_s=generation * 200 + i / 50)
    assert run.engine.series_count <= 100  # two generations at most, not all 250 sensors
    assert len(run.engine._series_domain) <= 150
    out = run.feed([("g0-3", 0, T0 + 30 * S + S // 2, 41.0)], now_s=1200.0)  # g0-3 is back, 20 minutes late
    run.settle(5000.0)
    assert out.corrections == 0  # forgotten: nothing says the window was emitted, until it closes
    got = run.aggregates()[("g0-3", T0)]
    assert got["count"] == 61 and got["max"] == 41.0
    assert_same(run.aggregates(), batch_computation(run.store))


def test_a_replayed_reading_keeps_the_verdict_it_was_given_against_the_store() -> None:
    """A spike far out of order is judged against the store; the processor crashes before the
    commit moves past it. On replay its series' history holds only what the replay rebuilt, not
    the stored readings it was judged with: it takes its stored verdict instead of being judged
    again (which here would accept it), so no raw point appears for it."""
    readings = [("s0", 0, T0 + t * S, 40.0 + (t % 3) * 0.5) for t in range(41)]
    spike = ("s0", 0, T0 + 6 * S + S // 2, 400.0)
    arrivals = [*readings[:20], spike, *readings[20:]]  # offsets 0..41: the spike is offset 20
    first = Run(windows="10s")
    committed: dict[int, PartitionPosition] = {}
    for i in range(0, len(arrivals), 3):
        first.feed(arrivals[i : i + 3], now_s=i / 3)
        committed = first.engine.safe_offsets()  # what a commit after this step would carry
    assert sum(o.rejected.get("spike", 0) for o in first.outputs) == 1
    commit, consumed, closed = committed[0]
    assert commit <= 20 < consumed, "the spike must be among the replayed readings"
    second = Run(windows="10s")
    second.store = first.store
    second.engine.restore(0, consumed, dict(zip(second.engine.window_names(), closed, strict=True)))
    for i in range(commit, len(arrivals), 3):
        part = arrivals[i : i + 3]
        second.feed(part, now_s=100 + i / 3, offsets=list(range(i, i + len(part))))
    second.settle(10_000.0)
    stored = second.store.stored()
    assert ("air", "s0", "no2", spike[2]) not in stored
    assert stored[("air_rejected", "s0", "no2_reason", spike[2])] == "spike"
    assert_same(second.aggregates("10s"), batch_computation(second.store, 10 * S))


def _windows_emitted(run: Run) -> set[Window]:
    return set(run.aggregates())


def test_a_quiet_series_closes_on_the_idle_timeout_only_once_its_partition_is_caught_up() -> None:
    """Processing time is a fake clock (``now_s``): a series' last window stays open while it has
    been quiet for less than the idle timeout, or while its partition still has records to read."""
    run = Run(lateness_s=2.0, idle_s=5.0)
    run.feed([("s0", 0, T0 + t * S, 40.0) for t in range(10)], now_s=100.0)
    assert _windows_emitted(run) == set()
    run.feed([], now_s=104.9)  # quiet for 4.9 s < 5 s
    assert _windows_emitted(run) == set()
    behind = Readings(*(np.array([], dtype=d) for d in (object, object, object, object, np.int64, np.float64,
                                                           np.int64, np.int64)))  # fmt: skip
    out = run.engine.ingest(behind, 200.0, caught_up=frozenset())  # quiet long enough, partition behind
    assert out.windows_emitted == 0
    run.feed([], now_s=200.0)  # quiet long enough and caught up
    assert _windows_emitted(run) == {("s0", T0)}
    assert run.aggregates()[("s0", T0)]["count"] == 10


def test_the_commit_offset_stays_at_the_first_record_an_open_window_needs() -> None:
    run = Run(lateness_s=2.0, idle_s=1000.0)
    run.feed([("s0", 0, T0 + t * S, 40.0) for t in range(30)], now_s=0.0)  # offsets 0..29, one open window
    offset, consumed, closed = run.engine.safe_offsets()[0]
    assert (offset, consumed) == (0, 30)
    assert closed == (T0,)  # closed up to the start of the open window: nothing emitted yet
    # The next minute's readings pass the first window's end by more than the lateness: it closes.
    run.feed([("s0", 0, T0 + MINUTE + t * S, 40.0) for t in range(5)], now_s=1.0)  # offsets 30..34
    offset, consumed, closed = run.engine.safe_offsets()[0]
    assert consumed == 35 and closed == (T0 + MINUTE,)
    assert 0 < offset <= 30  # the history kept for cleaning may reach back a few records, not to 0
    assert _windows_emitted(run) == {("s0", T0)}


def test_a_revoked_partition_is_forgotten_and_the_others_go_on() -> None:
    run = Run(lateness_s=2.0, idle_s=5.0)
    run.feed([(f"s{p}", p, T0 + t * S, 40.0) for t in range(10) for p in (0, 1)], now_s=0.0)
    run.engine.drop([0])
    assert set(run.engine.safe_offsets()) == {1}
    run.settle(1000.0)
    assert _windows_emitted(run) == {("s1", T0)}  # s0's window is rebuilt by the partition's new owner
    assert run.engine.next_offset(0) == -1 and run.engine.next_offset(1) == 10


def test_a_step_that_rejudges_in_memory_and_defers_reads_a_consistent_store() -> None:
    """Sensor s1 of a jumpy fleet (a level shift to 140 at t = 54..62 s, 40 around it) arrives
    in two steps, the second bringing most of the shift: some of it far out of order (judged
    against the store), some in memory, which rejects 63 and 64 (accepted in the first step)
    again. Their raw values must leave the store before the deferred readings' neighbours are
    read back, or those neighbours count 63 and 64 twice and 65 escapes the spike check. (A
    case hypothesis found for the property test above.)"""
    rows = [r for r in fleet(2, 75, seed=3, jumpy=True) if r[0] == "s1"]
    second = {1, 4, 7, 10, 11, 13, 22, 23, 29, 32, 35, 39, 40, 42, 43, 45, 46, 47, 48, 49, 50, 51, 52, 53, 56, 57,
              58, 59, 60, 62, 65, 68, 72, 73}  # fmt: skip
    in_order = Run()
    in_order.feed(rows, now_s=0.0)
    in_order.settle(1000.0)
    split = Run()
    split.feed([r for i, r in enumerate(rows) if i not in second], now_s=0.0)
    split.feed([r for i, r in enumerate(rows) if i in second], now_s=0.0)
    split.settle(1000.0)
    raw = {k: v for k, v in split.store.stored().items() if k[0] == "air"}
    assert ("air", "s1", "no2", T0 + 65 * S + 10**6) not in raw  # a spike against 58..64
    assert raw == {k: v for k, v in in_order.store.stored().items() if k[0] == "air"}
    assert_same(split.aggregates(), batch_computation(split.store))


def test_a_new_reading_that_conflicts_with_a_replayed_one_is_the_duplicate() -> None:
    """After a restart the replay and the first new records can share a step: the new reading at
    an instant a replayed reading holds is the duplicate (offset order decides, as without the
    restart), and the window keeps the replayed value."""
    rows = [("s0", 0, T0 + t * 5 * S, 42.0 + (t % 7) / 2) for t in range(24)]  # offsets 0..23, two minutes
    first = Run(lateness_s=2.0)
    first.feed(rows[:20], now_s=0.0)
    committed = first.engine.safe_offsets()[0]
    assert committed.commit <= 11 < committed.consumed_until == 20  # reading 11 (t = 55 s) is replayed
    second = Run(lateness_s=2.0)
    second.store = first.store
    second.engine.restore(0, committed.consumed_until, dict(zip(second.engine.window_names(), committed.closed,
                                                                strict=True)))  # fmt: skip
    conflict = ("s0", 0, rows[11][2], 99.0)
    replay = rows[committed.commit : 20]
    second.feed([*replay, conflict, *rows[20:]], now_s=1.0,
                 offsets=[*range(committed.commit, 20), 20, *range(21, 25)])  # fmt: skip
    assert sum(o.rejected.get("duplicate", 0) for o in second.outputs) == 1
    second.settle(1000.0)
    stored = second.store.stored()
    assert stored[("air", "s0", "no2", rows[11][2])] == rows[11][3]
    assert stored[("air_rejected", "s0", "no2_reason", rows[11][2])] == "duplicate"
    assert_same(second.aggregates(), batch_computation(second.store))
    assert second.aggregates()[("s0", T0)]["count"] == 12


def test_a_report_is_one_line_with_its_metrics_as_fields_and_a_rejected_metric_is_absent() -> None:
    """Three metrics of two sensors at two instants: one raw line per sensor and instant; the
    out-of-range value is only in the rejected line; one window line per sensor with every metric."""
    run = Run()
    rows = [  # (sensor, metric, seconds, value)
        (sensor, metric, t, v)
        for t in (1, 2)
        for sensor in ("s0", "s1")
        for metric, v in (("no2", 40.0 + t), ("pm25", 8.0 + t), ("o3", 60.0 + t))
    ]
    rows[4] = ("s1", "pm25", 1, -3.0)  # below the catalogue's minimum
    n = len(rows)
    readings = Readings(
        np.array(["air"] * n, dtype=object),
        np.array([r[0] for r in rows], dtype=object),
        np.array(["quai"] * n, dtype=object),
        np.array([r[1] for r in rows], dtype=object),
        np.array([T0 + r[2] * S for r in rows], dtype=np.int64),
        np.array([r[3] for r in rows], dtype=np.float64),
        np.zeros(n, dtype=np.int64),
        np.arange(n, dtype=np.int64),
    )
    out = run.engine.ingest(readings, 0.0, frozenset({0}))
    raw = [points for kind, points in out.points if kind == "raw"]
    assert len(raw) == 1 and len(raw[0]) == 4  # 2 sensors x 2 instants
    sensor_tag = raw[0].tags["sensor_id"]
    assert isinstance(sensor_tag, Categorical)
    sensors = sensor_tag.categories[sensor_tag.codes].tolist()
    lines = {
        (sensor, int(ts)): {name: float(column[i]) for name, column in raw[0].fields.items()}
        for i, (sensor, ts) in enumerate(zip(sensors, raw[0].ts_ns.tolist(), strict=True))
    }
    assert lines[("s0", T0 + S)] == {"no2": 41.0, "pm25": 9.0, "o3": 61.0}
    assert lines[("s1", T0 + 2 * S)] == {"no2": 42.0, "pm25": 10.0, "o3": 62.0}
    s1_first = lines[("s1", T0 + S)]
    assert s1_first["no2"] == 41.0 and s1_first["o3"] == 61.0 and math.isnan(s1_first["pm25"])
    rejected = [points for kind, points in out.points if kind == "rejected"]
    assert len(rejected) == 1 and len(rejected[0]) == 1
    assert rejected[0].fields["pm25_reason"].tolist() == ["out_of_range"]
    assert rejected[0].fields["pm25"].tolist() == [-3.0]
    assert sorted(rejected[0].fields) == ["pm25", "pm25_reason"]
    run._store(out, 0.0)
    run.offsets[0] = n
    run.settle(1_000.0)
    stored = run.store.stored()
    for sensor, (pm25_count, pm25_rejected) in {"s0": (2.0, 0.0), "s1": (1.0, 1.0)}.items():
        assert stored[("air_1m", sensor, "no2_count", T0)] == 2.0
        assert stored[("air_1m", sensor, "o3_mean", T0)] == 61.5
        assert stored[("air_1m", sensor, "pm25_count", T0)] == pm25_count
        assert stored[("air_1m", sensor, "pm25_rejected", T0)] == pm25_rejected
    window_writes = [points for source, points in run.store.writes if source == "processor:1m"]
    assert sum(len(points) for points in window_writes) == 2  # one line per sensor, 24 fields each
    assert all(len(points.fields) == 24 for points in window_writes)


def test_series_resolve_by_source_and_metric_labels_whatever_labels_the_decoder_gives() -> None:
    """Readings are resolved to series through (domain, sensor, site) and metric labels. Labels
    that split equal keys, labels computed from the columns and a metric sent in another unit
    name the same series; forgetting the series forgets what was resolved for them."""
    settings = EngineSettings(parse_windows("1m"), 2 * S, 5.0, series_ttl_s=100.0)
    rows = [  # (sensor, site, metric as sent, seconds, value)
        ("s0", "quai", "no2", 1, 40.0),
        ("s0", "quai", "no2_ppb", 2, 20.0),  # 20 ppb = 37.6 µg/m³, the same series
        ("s1", "quai", "no2", 1, 50.0),
        ("s1", "digue", "o3", 2, 60.0),
        ("s0", "quai", "no2", 3, 41.0),
    ]
    n = len(rows)
    readings = Readings(
        np.array(["air"] * n, dtype=object),
        np.array([r[0] for r in rows], dtype=object),
        np.array([r[1] for r in rows], dtype=object),
        np.array([r[2] for r in rows], dtype=object),
        np.array([T0 + r[3] * S for r in rows], dtype=np.int64),
        np.array([r[4] for r in rows], dtype=np.float64),
        np.zeros(n, dtype=np.int64),
        np.arange(n, dtype=np.int64),
    )
    split = KeyCodes(np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64) * 7)  # every label distinct
    raws = []
    for codes in (None, split, KeyCodes.of(readings)):
        engine = ProcessorEngine(settings, load_catalogue())
        out = engine.ingest(readings, 0.0, frozenset({0}), codes)
        raw = [points for kind, points in out.points if kind == "raw"]
        assert len(raw) == 1
        sensor = raw[0].tags["sensor_id"]
        assert isinstance(sensor, Categorical)
        raws.append(
            sorted(
                (s, (int(t) - T0) // S, name, round(float(column[i]), 6))
                for name, column in raw[0].fields.items()
                for i, (s, t) in enumerate(zip(sensor.categories[sensor.codes].tolist(), raw[0].ts_ns, strict=True))
                if not math.isnan(column[i])
            )
        )
        assert engine.series_count == 3  # s0 no2 (twice in µg/m³, once in ppb), s1 no2, s1 o3
    assert raws[0] == raws[1] == raws[2]
    assert raws[0] == [("s0", 1, "no2", 40.0), ("s0", 2, "no2", 37.6), ("s0", 3, "no2", 41.0),
                       ("s1", 1, "no2", 50.0), ("s1", 2, "o3", 60.0)]  # fmt: skip
    closed = engine.ingest(Readings.empty(), 10_000.0, frozenset({0}))  # every window closes (idle)
    counts = []
    for kind, p in closed.points:
        tag = p.tags["sensor_id"]
        assert kind != "raw" and isinstance(tag, Categorical)
        sensors = tag.categories[tag.codes].tolist()
        counts += [(s, name, int(c)) for name, column in p.fields.items() if name.endswith("_count")
                   for s, c in zip(sensors, column, strict=True) if not math.isnan(c)]  # fmt: skip
    counts.sort()
    assert counts == [("s0", "no2_count", 3), ("s1", "no2_count", 1), ("s1", "o3_count", 1)]  # one window each
    engine.ingest(Readings.empty(), 10_200.0, frozenset({0}))  # every series is forgotten
    assert engine.series_count == 0
    assert engine._source_ids == {} and engine._metric_ids == {} and len(engine._resolved) == 0
    again = engine.ingest(readings.take(np.array([1])), 10_201.0, frozenset({0}))
    assert [p.fields["no2"].tolist() for kind, p in again.points if kind == "raw"] == [[20.0 * 1.88]]


@given(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 9)), min_size=1, max_size=30),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_reordered_readings_keep_each_reading_with_its_names(
    rows: list[tuple[str, int]], rng: Any, categorical: bool
) -> None:
    """The step's reorder leaves the name columns ungathered behind one index; whatever is taken
    from it afterwards (twice, by indices or a mask) still names each reading's own sensor."""
    n = len(rows)
    sensors = np.array([f"{s}{t}" for s, t in rows], dtype=object)
    codes, distinct = factorise_column(sensors)
    names: Any = Categorical(codes, np.array(distinct, dtype=object)) if categorical else sensors
    readings = Readings(names, names, names, names, np.arange(n, dtype=np.int64), np.arange(n, dtype=np.float64),
                        np.zeros(n, dtype=np.int64), np.arange(n, dtype=np.int64))  # fmt: skip
    order = np.array(rng.sample(range(n), n), dtype=np.int64)
    again = np.array(rng.sample(range(n), rng.randint(0, n)), dtype=np.int64)
    mask = np.array([rng.random() < 0.5 for _ in range(len(again))], dtype=bool)
    last = np.array(rng.sample(range(int(mask.sum())), int(mask.sum())), dtype=np.int64)
    taken = readings.reordered(order).reordered(again).take(mask).take(last)
    want = sensors[order][again][mask][last].tolist()
    ts = taken.ts_ns.tolist()
    assert [sensors[t] for t in ts] == want
    for column in (taken.domain, taken.sensor_id, taken.site, taken.metric):
        assert _names_at(column) == want
        assert _names_array(column).tolist() == want
    if len(ts):
        assert _names_at(taken.sensor_id, np.array([0])) == want[:1]
