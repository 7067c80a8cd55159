"""The processor's state machine: cleaning, windows, watermarks and safe commit offsets.

No I/O and no clock: the Kafka loop passes decoded readings and the current time in, and gets
points for the sink, late readings and per-partition commit positions out. All state is per
Kafka partition (a sensor's readings share one partition), so a rebalance drops exactly the
revoked partitions' state and a restarted processor rebuilds it by replaying from the committed
offset. Each commit carries the partition's watermark as metadata: after a restart, windows that
ended at or before it were already emitted, and replayed readings for them are skipped instead of
re-emitting a partial window.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from portpulse.catalogue import Catalogue, MetricSpec
from portpulse.points import Categorical, PointColumns
from portpulse.sorting import distinct_codes, group_starts, stable_order
from processors.clean import NO_OFFSET, OK, REASON_NAMES, History, clean, series_time_order
from processors.window import OpenWindows, WindowSpec, aggregate, assign

__all__ = ["EngineOutput", "EngineSettings", "ProcessorEngine", "Readings"]

_NEG = np.iinfo(np.int64).min
_Limits = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]


@dataclass(frozen=True, slots=True)
class EngineSettings:
    windows: tuple[WindowSpec, ...]
    allowed_lateness_ns: int = 10 * 10**9
    idle_timeout_s: float = 30.0
    hampel_window: int = 7
    k_sigma: float = 4.0


@dataclass(frozen=True, slots=True)
class Readings:
    """Decoded Kafka records as columns ``(n,)``: object arrays ``domain``, ``sensor_id``, ``site``,
    ``metric``; int64 ``ts_ns``; float64 ``value``; int64 ``partition`` (the loop's id for a topic
    partition) and ``offset`` (the Kafka offset of the record that carried the reading)."""

    domain: npt.NDArray[np.object_]
    sensor_id: npt.NDArray[np.object_]
    site: npt.NDArray[np.object_]
    metric: npt.NDArray[np.object_]
    ts_ns: npt.NDArray[np.int64]
    value: npt.NDArray[np.float64]
    partition: npt.NDArray[np.int64]
    offset: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.ts_ns)


@dataclass(slots=True)
class EngineOutput:
    points: list[tuple[str, PointColumns]] = field(default_factory=list)  # (kind "raw"/window name, points)
    late: list[tuple[int, str, str, str, int, float, int]] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    windows_emitted: int = 0
    replayed: int = 0


@dataclass(slots=True)
class _Partition:
    max_ts: int = _NEG
    watermark: int = _NEG
    last_arrival_s: float = 0.0
    next_offset: int = -1  # one past the highest offset consumed


class ProcessorEngine:
    """Clean, window and track watermarks for the partitions this processor owns."""

    def __init__(self, settings: EngineSettings, catalogue: Catalogue) -> None:
        self._s = settings
        self._catalogue = catalogue
        self._series: dict[tuple[str, str, str], int] = {}
        self._series_domain: list[str] = []
        self._series_sensor: list[str] = []
        self._series_site: list[str] = []
        self._series_metric: list[str] = []
        self._lo: list[float] = []
        self._hi: list[float] = []
        self._rate: list[float] = []
        self._floor: list[float] = []
        self._limit_arrays: _Limits | None = None
        # (domain, sensor, site, metric as sent) -> (series id, unit factor): resolved once.
        self._resolved: dict[tuple[str, str, str, str], tuple[int, float]] = {}
        # Raw-point groups: one per (domain, metric); the group of each series.
        self._groups: dict[tuple[str, str], int] = {}
        self._group_keys: list[tuple[str, str]] = []
        self._series_group: list[int] = []
        self._series_group_array = np.empty(0, dtype=np.int64)
        self._history = History.empty(0, settings.hampel_window)
        # Partition that last carried each series: a revoked partition's series forget their
        # cleaning history, or its new owner's replay would look like duplicates here later.
        self._series_part = np.full(0, -1, dtype=np.int64)
        self._parts: dict[int, _Partition] = {}
        self._restored: dict[int, int] = {}  # partition -> offsets below this were consumed before a restart
        # Open window rows (one per reading and window it falls in); replay_from: the earliest
        # Kafka offset a replay needs to judge that reading the same way again.
        self._open = OpenWindows()

    # ------------------------------------------------------------ series registry

    def _register(self, domain: str, sensor: str, site: str, metric: str) -> int:
        base, factor = metric, 1.0
        spec = self._catalogue.get(domain, metric)
        if spec is None and "_" in metric:
            # Unit normalisation: "no2_ppb" is no2 given in ppb when the catalogue converts ppb.
            name, _, unit = metric.rpartition("_")
            candidate = self._catalogue.get(domain, name)
            if candidate is not None and unit in candidate.convert:
                spec, base, factor = candidate, name, candidate.convert[unit]
        key = (domain, sensor, base)
        if key in self._series and factor == 1.0:
            return self._series[key]
        sid = self._series.setdefault(key, len(self._series_domain))
        if sid == len(self._series_domain):
            self._series_domain.append(domain)
            self._series_sensor.append(sensor)
            self._series_site.append(site)
            self._series_metric.append(base)
            self._lo.append(spec.min if spec else -np.inf)
            self._hi.append(spec.max if spec else np.inf)
            self._rate.append(spec.max_rate_per_s if spec else np.inf)
            self._floor.append(_spike_floor(spec))
            group = self._groups.setdefault((domain, base), len(self._group_keys))
            if group == len(self._group_keys):
                self._group_keys.append((domain, base))
            self._series_group.append(group)
        return sid

    def _limits(self) -> _Limits:
        """Per-series lo, hi, max rate and spike floor as arrays, rebuilt only when series were added."""
        have = 0 if self._limit_arrays is None else len(self._limit_arrays[0])
        if self._limit_arrays is None or have != len(self._lo):
            # Append only the new series' limits: a fleet's first minutes add series every step.
            new = [np.array(x[have:], dtype=np.float64) for x in (self._lo, self._hi, self._rate, self._floor)]
            old = self._limit_arrays or tuple(np.empty(0) for _ in range(4))
            lo, hi, rate, floor = (np.concatenate([a, b]) for a, b in zip(old, new, strict=True))
            self._limit_arrays = (lo, hi, rate, floor)
        return self._limit_arrays

    def _series_ids(
        self, r: Readings, key_code: npt.NDArray[np.int64] | None
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
        """Series id and unit factor of every reading ``(n,)``: Python work per distinct key only.
        ``key_code`` (optional, int64 ``(n,)``): readings with equal codes have equal (domain,
        sensor_id, site, metric); it spares building a key tuple per reading."""
        if key_code is not None:
            first, codes = distinct_codes(key_code)
            distinct = list(zip(*(getattr(r, f)[first].tolist() for f in ("domain", "sensor_id", "site", "metric")),
                                strict=True))  # fmt: skip
        else:
            keys = list(zip(r.domain.tolist(), r.sensor_id.tolist(), r.site.tolist(), r.metric.tolist(), strict=True))
            distinct = list(dict.fromkeys(keys))
            position = {key: j for j, key in enumerate(distinct)}
            codes = np.fromiter(map(position.__getitem__, keys), dtype=np.int64, count=len(keys))
        ids = np.empty(len(distinct), dtype=np.int64)
        factors = np.ones(len(distinct))
        for j, key in enumerate(distinct):
            hit = self._resolved.get(key)
            if hit is None:
                sid = self._register(*key)
                metric = key[3]
                factor = 1.0
                if self._series_metric[sid] != metric:
                    spec = self._catalogue.get(key[0], self._series_metric[sid])
                    factor = spec.convert[metric.rpartition("_")[2]] if spec else 1.0
                hit = self._resolved[key] = (sid, factor)
            ids[j], factors[j] = hit
        return ids[codes], factors[codes]

    # ------------------------------------------------------------ main step

    def ingest(
        self,
        r: Readings,
        now_s: float,
        caught_up: frozenset[int] = frozenset(),
        key_code: npt.NDArray[np.int64] | None = None,
    ) -> EngineOutput:
        """Clean ``r``, add it to windows, close what the watermarks allow; returns what to send.
        ``key_code``: optional labels of the readings' series keys (see :meth:`_series_ids`).

        ``caught_up``: partitions with nothing more to read (no lag). Only those can be idle: a
        partition that merely was not fetched for a while (a rebalance, a slow sink) still has data.
        """
        out = EngineOutput()
        if len(r):
            series, factor = self._series_ids(r, key_code)
            # One (series, ts) order for the whole step: cleaning, windows and aggregates then
            # work on grouped rows and skip their own sorts and gathers.
            order, series_sorted, _ = series_time_order(series, r.ts_ns)
            if not np.array_equal(order, np.arange(len(order))):
                r = Readings(*(getattr(r, f)[order] for f in Readings.__dataclass_fields__))
                series, factor = series_sorted, factor[order]
            value = r.value * factor
            k = len(self._series_domain)
            self._history = self._history.grow(k)
            if len(self._series_part) < k:
                self._series_part = np.concatenate([self._series_part, np.full(k - len(self._series_part), -1)])
            self._series_part[series] = r.partition
            # Replaying from here rebuilds the cleaning history these readings were judged with.
            replay_from = np.minimum(r.offset, self._history.offsets.min(axis=1)[series])
            reason, self._history = clean(
                series, r.ts_ns, value,
                *self._limits(),
                self._history, self._s.k_sigma, r.offset,
            )  # fmt: skip
            for code, count in zip(*np.unique(reason, return_counts=True), strict=True):
                if code != OK:
                    out.rejected[REASON_NAMES[int(code)]] = int(count)
            ok = reason == OK
            self._raw_points(series[ok], r.ts_ns[ok], value[ok], out)
            self._advance(r, now_s)
            self._add_to_windows(series, r, value, ok, replay_from, out)
        self._idle(now_s, caught_up)
        self._close(out)
        return out

    def _raw_points(
        self,
        series: npt.NDArray[np.int64],
        ts: npt.NDArray[np.int64],
        value: npt.NDArray[np.float64],
        out: EngineOutput,
    ) -> None:
        if not len(series):
            return
        if len(self._series_group_array) != len(self._series_group):
            self._series_group_array = np.array(self._series_group, dtype=np.int64)
        group = self._series_group_array[series]
        order = stable_order(group)
        starts = group_starts(group[order])
        ends = np.append(starts[1:], len(order))
        for begin, end in zip(starts.tolist(), ends.tolist(), strict=True):
            idx = order[begin:end]
            domain, metric = self._group_keys[int(group[idx[0]])]
            out.points.append(("raw", PointColumns(domain, self._tags(series[idx]), {metric: value[idx]}, ts[idx])))

    def _tags(self, series: npt.NDArray[np.int64]) -> dict[str, npt.NDArray[np.object_] | Categorical]:
        uniq, inverse = np.unique(series, return_inverse=True)
        sensors = np.array([self._series_sensor[s] for s in uniq.tolist()], dtype=object)
        sites = np.array([self._series_site[s] for s in uniq.tolist()], dtype=object)
        inv = inverse.astype(np.int64).reshape(-1)
        return {"sensor_id": Categorical(inv, sensors), "site": Categorical(inv, sites)}

    def _advance(self, r: Readings, now_s: float) -> None:
        for p in np.unique(r.partition).tolist():
            mask = r.partition == p
            state = self._parts.setdefault(p, _Partition())
            state.max_ts = max(state.max_ts, int(r.ts_ns[mask].max()))
            state.next_offset = max(state.next_offset, int(r.offset[mask].max()) + 1)
            state.last_arrival_s = now_s

    def _add_to_windows(
        self,
        series: npt.NDArray[np.int64],
        r: Readings,
        value: npt.NDArray[np.float64],
        ok: npt.NDArray[np.bool_],
        replay_from: npt.NDArray[np.int64],
        out: EngineOutput,
    ) -> None:
        wm = self._watermarks(r.partition)
        late_rows: set[int] = set()
        for spec_i, spec in enumerate(self._s.windows):
            rows, starts = assign(r.ts_ns, spec)
            closed = starts + spec.size_ns <= wm[rows]
            if closed.any():
                # Behind the watermark: late, unless it is a replay of what was emitted before a restart.
                replay = closed & (r.offset[rows] < self._replay_until(r.partition[rows]))
                out.replayed += int(replay.sum())
                late_rows.update(rows[closed & ~replay].tolist())
            rows, starts = rows[~closed], starts[~closed]
            self._open.add(spec_i, starts, r.partition[rows], series[rows], r.ts_ns[rows], value[rows], ok[rows],
                           replay_from[rows])  # fmt: skip
        for i in sorted(late_rows):
            p = int(r.partition[i])
            out.late.append((p, str(r.domain[i]), str(r.sensor_id[i]), str(r.metric[i]), int(r.ts_ns[i]),
                             float(r.value[i]), self._parts[p].watermark - int(r.ts_ns[i])))  # fmt: skip

    def _per_partition(
        self, values: dict[int, int], default: int, partitions: npt.NDArray[np.int64]
    ) -> npt.NDArray[np.int64]:
        """``values[p]`` for each entry of ``partitions``: a small lookup table, not a loop per row."""
        if not len(partitions):
            return np.empty(0, dtype=np.int64)
        table = np.full(int(partitions.max()) + 1, default, dtype=np.int64)
        for p, v in values.items():
            if p < len(table):
                table[p] = v
        return table[partitions]

    def _watermarks(self, partitions: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return self._per_partition({p: st.watermark for p, st in self._parts.items()}, _NEG, partitions)

    def _replay_until(self, partitions: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return self._per_partition(self._restored, -1, partitions)

    def _idle(self, now_s: float, caught_up: frozenset[int]) -> None:
        for p, state in self._parts.items():
            if state.max_ts == _NEG:
                continue
            state.watermark = max(state.watermark, state.max_ts - self._s.allowed_lateness_ns)
            quiet_s = now_s - state.last_arrival_s
            if p in caught_up and quiet_s >= self._s.idle_timeout_s:
                # Nothing arrived for a while: let event time follow the clock so windows close.
                state.watermark = max(state.watermark, state.max_ts + int(quiet_s * 1e9) - self._s.allowed_lateness_ns)

    def _close(self, out: EngineOutput) -> None:
        sizes = [w.size_ns for w in self._s.windows]
        closed = self._open.close(sizes, {p: st.watermark for p, st in self._parts.items()}, _NEG)
        if closed is None:
            return
        spec, series, start = closed.spec, closed.series, closed.start
        key = _window_key(spec, series, start, self._s.windows)
        agg = aggregate(key, closed.ts_ns, closed.value, closed.ok)
        first = agg.first_row
        a_spec, a_series, a_start = spec[first], series[first], start[first]
        out.windows_emitted += len(agg)
        domains = np.array(self._series_domain, dtype=object)[a_series]
        metrics = np.array(self._series_metric, dtype=object)[a_series]
        groups: dict[tuple[int, str, str], list[int]] = {}
        for j, g in enumerate(zip(a_spec.tolist(), domains.tolist(), metrics.tolist(), strict=True)):
            groups.setdefault(g, []).append(j)
        for (spec_i, domain, metric), rows in groups.items():
            idx = np.array(rows, dtype=np.int64)
            fields = {
                f"{metric}_count": agg.count[idx].astype(np.float64),
                f"{metric}_rejected": agg.rejected[idx].astype(np.float64),
                f"{metric}_mean": agg.mean[idx],
                f"{metric}_min": agg.min[idx],
                f"{metric}_max": agg.max[idx],
                f"{metric}_last": agg.last[idx],
                f"{metric}_stddev": agg.stddev[idx],
                f"{metric}_p95": agg.p95[idx],
            }
            name = self._s.windows[spec_i].name
            out.points.append((name, PointColumns(f"{domain}_{name}", self._tags(a_series[idx]), fields, a_start[idx])))

    # ------------------------------------------------------------ offsets and rebalances

    def safe_offsets(self) -> dict[int, tuple[int, int, int]]:
        """Per partition: (offset to commit, watermark, next offset consumed).

        The commit offset is the earliest record a replay needs to rebuild the open windows *and*
        the cleaning history their readings and the next ones are judged with (so a restarted
        processor makes the same decisions), or one past the last consumed record when nothing is
        open; the other two travel as commit metadata for :meth:`restore`.
        """
        parts = [p for p, state in self._parts.items() if state.next_offset >= 0]
        if not parts:
            return {}
        size = max(parts) + 1
        need = np.full(size, NO_OFFSET, dtype=np.int64)
        owned = (self._series_part >= 0) & (self._series_part < size)
        np.minimum.at(need, self._series_part[owned], self._history.offsets.min(axis=1)[owned])
        for p, replay_from in self._open.replay_from().items():
            if p < size:
                need[p] = min(int(need[p]), replay_from)
        out = {}
        for p in parts:
            state = self._parts[p]
            out[p] = (min(int(need[p]), state.next_offset), state.watermark, state.next_offset)
        return out

    def restore(self, partition: int, watermark: int, consumed_until: int) -> None:
        """A partition assigned with committed metadata: windows ending at or before ``watermark``
        were emitted, and records below ``consumed_until`` were consumed then. Replayed records for
        those windows are skipped (counted as replayed); newer ones behind the watermark are late."""
        state = self._parts.setdefault(partition, _Partition())
        state.watermark = max(state.watermark, watermark)
        self._restored[partition] = consumed_until

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget revoked partitions (their windows are rebuilt by whoever gets them)."""
        gone = set(partitions)
        for p in gone:
            self._parts.pop(p, None)
            self._restored.pop(p, None)
        forget = np.isin(self._series_part, np.array(sorted(gone), dtype=np.int64))
        if forget.any():
            self._history = self._history.forget(forget)
            self._series_part[forget] = -1
        self._open.drop(gone)

    @property
    def open_rows(self) -> int:
        return self._open.rows

    def next_offset(self, partition: int) -> int:
        """One past the highest offset consumed from ``partition`` (-1 before the first record)."""
        state = self._parts.get(partition)
        return state.next_offset if state else -1

    def watermark(self, partition: int) -> int:
        state = self._parts.get(partition)
        return state.watermark if state else _NEG


def _window_key(
    spec: npt.NDArray[np.int64],
    series: npt.NDArray[np.int64],
    start: npt.NDArray[np.int64],
    windows: tuple[WindowSpec, ...],
) -> npt.NDArray[np.int64]:
    """One int64 key per (window spec, series, window start), ordered like those triples: packed
    arithmetic when it fits 63 bits (window starts are multiples of the steps' gcd), else ranks."""
    if not len(spec):
        return np.empty(0, dtype=np.int64)
    step = math.gcd(*(w.step_ns for w in windows))
    slot = (start - int(start.min())) // step
    n_slots, n_series = int(slot.max()) + 1, int(series.max()) + 1
    if len(windows) * n_series * n_slots < 2**62:
        return (spec * n_series + series) * n_slots + slot
    _, key = np.unique(np.stack([spec, series, start]), axis=1, return_inverse=True)
    return key.reshape(-1).astype(np.int64)


def _spike_floor(spec: MetricSpec | None) -> float:
    """The Hampel scale floor of a metric: infinite turns the spike check off."""
    if spec is None:
        return 1e-9
    if not spec.spike_check:
        return np.inf
    return spec.spike_floor if spec.spike_floor is not None else 0.01 * (spec.max - spec.min)
